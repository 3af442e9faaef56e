//! A seeded, deterministic model test of HA pairs (C6): one VM protected on three hosts (primary
//! 1, standby 2, host 3 for re-protection) with a leader (node 10) running the real
//! [`FailoverCore`] over a catalog that applies the real [`apply`], each host running the real
//! [`PairHost`], over a network that delays, reorders, duplicates and drops messages and cuts any
//! two nodes apart; a seeded scheduler interleaves the guest's workload, kills (a host loses its
//! guest and every volatile state; what `Persist` stored and its catalog copy survive), freezes
//! (a host takes no step, then wakes with stale beliefs and reads what queued up meanwhile),
//! leader restarts (the failover core starts over from the catalog), and live mode switches.
//!
//! The guest: `PAGES` pages of `PAGE_SIZE` bytes written by a workload (each write stamps the
//! page with a global write count, so memories differ whenever histories do), and a stream of
//! outputs with sequence numbers whose content is derived from the generation its timeline
//! started at — a timeline that forked from another gives the same sequence number other bytes.
//! In redundant mode outputs stand for disk writes, in multi-operation mode for acknowledgements
//! of application updates (the application state is the log of outputs). The outside world (the
//! sink, standing for the volume) records every released output with its generation and refuses
//! one older than the newest it accepted; its refusals go back to the sender, whose driver
//! re-releases the output at its current generation if it still is primary.
//!
//! Checkers, each failure naming the seed: (1) every output the outside accepted is in the state
//! a new primary starts from, with the same content (redundant: in the checkpoint; multi-op: in
//! the application state), and every acceptance matches the surviving timeline; (2) every
//! output the outside accepts at generation `g` comes from the record's primary of `g`, and no
//! host acknowledges a checkpoint or update of a generation it sealed; (3) a redundant takeover
//! starts from memory and device state equal to what the old primary captured for that epoch;
//! (4) after healing, exactly one host runs the VM, the one the record names, protected, and
//! the outside holds exactly the surviving guest's outputs; (5) across mode switches nothing is
//! lost (the same checks hold whatever the modes were). Driver rule checked on every effect:
//! nothing leaves a host (message, guest start, release) before the durable state it depends on
//! was persisted. A refused message must leave the host's state unchanged.
//!
//! Replay one seed: `HAVEN_MODEL_SEED=S cargo test -p haven-node --lib ha::model`; hunt:
//! `HAVEN_MODEL_SEEDS=N`; `HAVEN_MODEL_VERBOSE=1` logs every delivery. Test-only; no clock, no
//! I/O.

use std::collections::{BTreeMap, BTreeSet};

use haven_proto::ha::{HaCommand, HaHeartbeat, HaMessage, HaMode, HaPairRecord, PairState};
use haven_proto::ids::{NodeId, VmId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::core::failover::{apply, FailoverCore, HostInfo, LeaderAction, LeaderEvent, PairError};
use super::core::standby::{ImageShape, TakeoverState};
use super::core::{refusal_message, Durable, Effect, HaError, HaMetric, HaTunables, PairHost, Role};

const VM: VmId = VmId(1);
const LEADER: NodeId = NodeId(10);
const SINK: NodeId = NodeId(20);
const HOSTS: [NodeId; 3] = [NodeId(1), NodeId(2), NodeId(3)];
const PAGES: u64 = 24;
const PAGE_SIZE: u32 = 16;
const SHAPE: ImageShape = ImageShape { pages: PAGES, page_size: PAGE_SIZE };
const STEP_MS: u64 = 10;
/// Faults, switches and the workload run until then; then everything heals and must settle.
const ACTIVE_MS: u64 = 3_000;
/// The pair must settle within this long after healing.
const SETTLE_MS: u64 = 30_000;

fn tunables() -> HaTunables {
    HaTunables {
        heartbeat_ms: 50,
        heartbeat_loss_ms: 250,
        retransmit_ms: 40,
        takeover_retry_ms: 60,
        propose_retry_ms: 300,
        max_epochs_in_flight: 3,
        max_staged_epochs: 6,
        frame_pages: 5,
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub mode: HaMode,
    /// Drop, duplicate and delay messages; cut, kill and freeze hosts.
    pub faults: bool,
    pub switches: bool,
    pub leader_restarts: bool,
    /// Host 3 is marked draining (re-protection must not pick it).
    pub drain3: bool,
}

// ---- the guest ----------------------------------------------------------------------------------

/// The content of output `seq` of a timeline started at generation `branch`.
fn content(branch: u64, seq: u64) -> u64 {
    (branch.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seq.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)).rotate_left(17) | 1
}

fn encode(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn decode(bytes: &[u8]) -> Result<Vec<u64>, String> {
    if !bytes.len().is_multiple_of(8) {
        return Err(format!("{} bytes are not whole words", bytes.len()));
    }
    Ok(bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect())
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Guest {
    pages: Vec<Vec<u8>>,
    dirty: BTreeSet<u64>,
    writes: u64,
    branch: u64,
    /// `outputs[i]`: the content of output `i + 1`.
    outputs: Vec<u64>,
    /// Outputs handed to the sink by this instance (the driver's side of `Release`).
    released: u64,
    paused: bool,
    stopped: bool,
}

impl Guest {
    fn boot(branch: u64) -> Self {
        Self {
            pages: vec![vec![0; PAGE_SIZE as usize]; PAGES as usize],
            dirty: BTreeSet::new(),
            writes: 0,
            branch,
            outputs: Vec::new(),
            released: 0,
            paused: false,
            stopped: false,
        }
    }

    fn running(&self) -> bool {
        !self.paused && !self.stopped
    }

    fn write_page(&mut self, page: u64) {
        self.writes += 1;
        let mut bytes = encode(&[self.writes, page << 32 | (self.branch & 0xffff_ffff)]);
        bytes.truncate(PAGE_SIZE as usize);
        self.pages[page as usize] = bytes;
        self.dirty.insert(page);
    }

    /// vCPU and devices: the write count, the branch and the output journal.
    fn device_state(&self) -> Vec<u8> {
        let mut words = vec![self.writes, self.branch];
        words.extend(&self.outputs);
        encode(&words)
    }

    fn from_state(state: &TakeoverState, generation: u64) -> Result<Self, String> {
        let mut g = Self::boot(generation);
        match state {
            TakeoverState::Image(image) => {
                for (p, bytes) in &image.pages {
                    g.pages[*p as usize] = bytes.clone();
                }
                let words = decode(&image.device_state)?;
                let [writes, _branch, outputs @ ..] = &words[..] else { return Err("short device state".into()) };
                g.writes = *writes;
                g.outputs = outputs.to_vec();
                if g.outputs.len() as u64 != image.outputs {
                    return Err(format!("image says {} outputs, its device state {}", image.outputs, g.outputs.len()));
                }
            }
            TakeoverState::App(app) => {
                g.outputs = decode(&app.snapshot)?;
                if g.outputs.len() as u64 != app.snapshot_seq {
                    return Err(format!("snapshot at {} holds {} outputs", app.snapshot_seq, g.outputs.len()));
                }
                for (seq, data) in &app.updates {
                    let [c] = decode(data)?[..] else { return Err(format!("update {seq} is not one word")) };
                    if *seq != g.outputs.len() as u64 + 1 {
                        return Err(format!("update {seq} after {} outputs", g.outputs.len()));
                    }
                    g.outputs.push(c);
                }
            }
        }
        Ok(g)
    }
}

// ---- the world ----------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Payload {
    Ha(HaMessage),
    /// A released output, host → sink.
    Output {
        generation: u64,
        seq: u64,
        content: u64,
    },
    /// The sink refused an output of an older generation, sink → host.
    SinkRefused {
        generation: u64,
        seq: u64,
    },
}

#[derive(Debug, Clone)]
struct InFlight {
    from: NodeId,
    to: NodeId,
    at_ms: u64,
    payload: Payload,
}

struct Host {
    pair: PairHost,
    /// What the last `Persist` stored (survives a kill).
    persisted: Durable,
    /// The host's copy of the catalog (survives a kill).
    known: Option<HaPairRecord>,
    guest: Option<Guest>,
    up: bool,
    restart_at_ms: u64,
    frozen_until_ms: u64,
    learn_at_ms: u64,
    incarnation: u64,
    beat_seq: u64,
    next_beat_ms: u64,
}

struct Leader {
    core: FailoverCore,
    up: bool,
    restart_at_ms: u64,
}

/// The outside world: what it accepted, per output sequence number.
#[derive(Default)]
struct Sink {
    max_generation: u64,
    accepted: BTreeMap<u64, (u64, u64, NodeId)>,
    /// Who wrote at each generation the sink accepted.
    writers: BTreeMap<u64, NodeId>,
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub outputs: u64,
    pub accepted: u64,
    pub refused_old_generation: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub kills: u64,
    pub freezes: u64,
    pub cuts: u64,
    pub leader_restarts: u64,
    pub failovers: u64,
    pub fail_backs: u64,
    pub takeovers: u64,
    pub seals_refused: u64,
    pub reprotects: u64,
    pub switches: u64,
    pub switches_refused: u64,
    pub cas_refused: u64,
    pub epochs: u64,
    pub full_epochs: u64,
    pub max_pause_ms: u64,
    pub max_lag_ms: u64,
    pub takeover_checks: u64,
    pub max_failover_ms: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.outputs += o.outputs;
        self.accepted += o.accepted;
        self.refused_old_generation += o.refused_old_generation;
        self.delivered += o.delivered;
        self.dropped += o.dropped;
        self.kills += o.kills;
        self.freezes += o.freezes;
        self.cuts += o.cuts;
        self.leader_restarts += o.leader_restarts;
        self.failovers += o.failovers;
        self.fail_backs += o.fail_backs;
        self.takeovers += o.takeovers;
        self.seals_refused += o.seals_refused;
        self.reprotects += o.reprotects;
        self.switches += o.switches;
        self.switches_refused += o.switches_refused;
        self.cas_refused += o.cas_refused;
        self.epochs += o.epochs;
        self.full_epochs += o.full_epochs;
        self.max_pause_ms = self.max_pause_ms.max(o.max_pause_ms);
        self.max_lag_ms = self.max_lag_ms.max(o.max_lag_ms);
        self.takeover_checks += o.takeover_checks;
        self.max_failover_ms = self.max_failover_ms.max(o.max_failover_ms);
    }
}

/// A capture as the primary took it: memory and device state.
type Captured = (Vec<Vec<u8>>, Vec<u8>);

/// A takeover as the model saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Takeover {
    host: NodeId,
    generation: u64,
    /// The mirror point it started from: `(generation, epoch or seq)`.
    point: (u64, u64),
    /// Outputs the state held.
    outputs: u64,
}

pub struct World {
    cfg: Config,
    rng: StdRng,
    now_ms: u64,
    tun: HaTunables,
    /// Every record so far; index = generation - 1.
    records: Vec<HaPairRecord>,
    proposals: Vec<(u64, HaCommand)>,
    leader: Leader,
    hosts: BTreeMap<NodeId, Host>,
    net: Vec<InFlight>,
    cut: BTreeSet<(NodeId, NodeId)>,
    sink: Sink,
    /// The surviving timeline: the outputs of the guest that most recently started or resumed
    /// as primary (as of its death, if it died).
    timeline: Vec<u64>,
    timeline_host: NodeId,
    /// What each primary captured: `(generation, epoch)` → (memory, device state).
    captures: BTreeMap<(u64, u64), Captured>,
    last_takeover: Option<Takeover>,
    /// A kill may happen (one per period of full protection).
    kill_budget: bool,
    active: bool,
    trace: Vec<String>,
    verbose: bool,
    stats: Stats,
}

fn pair(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    (a.min(b), a.max(b))
}

fn brief(p: &Payload) -> String {
    match p {
        Payload::Ha(HaMessage::Checkpoint(c)) => {
            format!(
                "checkpoint g{} e{} f{}{}{}",
                c.generation,
                c.epoch,
                c.frame,
                if c.full { " full" } else { "" },
                if c.last { " last" } else { "" }
            )
        }
        Payload::Ha(HaMessage::Heartbeat(h)) => {
            format!("heartbeat {:?}", h.pairs.first().map(|p| (p.generation, p.holding)))
        }
        Payload::Ha(m) => format!("{m:?}"),
        other => format!("{other:?}"),
    }
}

impl World {
    pub fn new(cfg: Config, seed: u64) -> Self {
        let tun = tunables();
        let record = HaPairRecord {
            vm: VM,
            primary: HOSTS[0],
            standby: Some(HOSTS[1]),
            mode: cfg.mode,
            state: PairState::Protecting,
            generation: 1,
            failovers: 0,
            last_failover: None,
        };
        let mut leader = Leader { core: FailoverCore::new(tun.clone(), 0), up: true, restart_at_ms: 0 };
        let mut w = Self {
            cfg,
            rng: StdRng::seed_from_u64(seed),
            now_ms: 0,
            tun: tun.clone(),
            records: vec![record.clone()],
            proposals: Vec::new(),
            leader: Leader { core: FailoverCore::new(tun.clone(), 0), up: true, restart_at_ms: 0 },
            hosts: BTreeMap::new(),
            net: Vec::new(),
            cut: BTreeSet::new(),
            sink: Sink::default(),
            timeline: Vec::new(),
            timeline_host: HOSTS[0],
            captures: BTreeMap::new(),
            last_takeover: None,
            kill_budget: true,
            active: true,
            trace: Vec::new(),
            verbose: std::env::var_os("HAVEN_MODEL_VERBOSE").is_some(),
            stats: Stats::default(),
        };
        leader.core.set_hosts(&w.host_infos());
        leader.core.on_record(&record).expect("a valid record");
        w.leader = leader;
        for id in HOSTS {
            let pair = PairHost::new(id, VM, SHAPE, tun.clone(), Durable::default());
            let host = Host {
                pair,
                persisted: Durable::default(),
                known: None,
                guest: None,
                up: true,
                restart_at_ms: 0,
                frozen_until_ms: 0,
                learn_at_ms: 0,
                incarnation: 1,
                beat_seq: 0,
                next_beat_ms: 0,
            };
            w.hosts.insert(id, host);
        }
        let (primary, fx) = PairHost::running_here(HOSTS[0], &record, SHAPE, tun, 0, 0).expect("the VM's host");
        let h1 = w.hosts.get_mut(&HOSTS[0]).expect("host 1");
        h1.pair = primary;
        h1.known = Some(record.clone());
        h1.guest = Some(Guest::boot(1));
        w.carry_out(HOSTS[0], fx).expect("start");
        for id in &HOSTS[1..] {
            w.learn(*id, record.clone()).expect("learn");
        }
        w
    }

    fn host_infos(&self) -> Vec<HostInfo> {
        HOSTS.iter().map(|&id| HostInfo { id, draining: self.cfg.drain3 && id == HOSTS[2] }).collect()
    }

    fn log(&mut self, line: String) {
        self.trace.push(format!("{:>6}ms {line}", self.now_ms));
    }

    fn host(&self, id: NodeId) -> &Host {
        &self.hosts[&id]
    }

    fn host_mut(&mut self, id: NodeId) -> &mut Host {
        self.hosts.get_mut(&id).expect("a host")
    }

    fn latest(&self) -> &HaPairRecord {
        self.records.last().expect("a record")
    }

    fn frozen(&self, id: NodeId) -> bool {
        self.hosts.get(&id).is_some_and(|h| h.frozen_until_ms > self.now_ms)
    }

    fn awake(&self, id: NodeId) -> bool {
        self.hosts.get(&id).is_some_and(|h| h.up && h.frozen_until_ms <= self.now_ms)
    }

    // ---- the network --------------------------------------------------------------------------

    fn send(&mut self, from: NodeId, to: NodeId, payload: Payload) {
        let sink = matches!(payload, Payload::Output { .. } | Payload::SinkRefused { .. });
        if !sink && self.cut.contains(&pair(from, to)) {
            self.stats.dropped += 1;
            return;
        }
        let faults = self.active && self.cfg.faults;
        if !sink && faults && self.rng.random_bool(0.03) {
            self.stats.dropped += 1;
            return;
        }
        let copies = if faults && self.rng.random_bool(0.03) { 2 } else { 1 };
        // Heartbeats arrive within half the loss window or not at all (the failure detector's
        // assumption, see `FailoverCore::fresh`).
        let heartbeat = matches!(payload, Payload::Ha(HaMessage::Heartbeat(_)));
        for _ in 0..copies {
            let delay = match (sink, heartbeat, faults && self.rng.random_bool(0.1)) {
                (true, _, true) => self.rng.random_range(100..1_500),
                (false, true, true) => self.rng.random_range(50..=self.tun.heartbeat_loss_ms / 2),
                (false, false, true) => self.rng.random_range(50..400),
                (_, _, false) => self.rng.random_range(1..15),
            };
            self.net.push(InFlight { from, to, at_ms: self.now_ms + delay, payload: payload.clone() });
        }
    }

    /// Deliver message `i` (the scheduler picked it among those due).
    fn deliver(&mut self, i: usize) -> Result<(), String> {
        let m = self.net.swap_remove(i);
        let sink = matches!(m.payload, Payload::Output { .. } | Payload::SinkRefused { .. });
        if self.frozen(m.to) {
            let wake = self.host(m.to).frozen_until_ms;
            self.net.push(InFlight { at_ms: wake, ..m });
            return Ok(());
        }
        let leader_down = m.to == LEADER && !self.leader.up;
        let host_down = self.hosts.get(&m.to).is_some_and(|h| !h.up);
        let lost = !sink && self.active && self.cfg.faults && self.rng.random_bool(0.02);
        if leader_down || host_down || (!sink && self.cut.contains(&pair(m.from, m.to))) || lost {
            self.stats.dropped += 1;
            return Ok(());
        }
        self.stats.delivered += 1;
        if self.verbose {
            self.log(format!("deliver {} -> {}: {}", m.from, m.to, brief(&m.payload)));
        }
        match (m.to, m.payload) {
            (SINK, Payload::Output { generation, seq, content }) => self.sink_output(m.from, generation, seq, content),
            (LEADER, Payload::Ha(msg)) => self.leader_message(m.from, &msg),
            (to, Payload::SinkRefused { generation, seq }) => self.sink_refused(to, generation, seq),
            (to, Payload::Ha(msg)) => self.host_message(m.from, to, &msg),
            (to, p) => Err(format!("{to} got {p:?}")),
        }
    }

    fn deliver_due(&mut self) -> Result<(), String> {
        loop {
            let due: Vec<usize> = (0..self.net.len()).filter(|&i| self.net[i].at_ms <= self.now_ms).collect();
            if due.is_empty() {
                return Ok(());
            }
            let i = due[self.rng.random_range(0..due.len())];
            self.deliver(i)?;
        }
    }

    // ---- the outside world --------------------------------------------------------------------

    /// The sink takes an output unless it saw a newer generation; checkers (1) and (2).
    fn sink_output(&mut self, from: NodeId, generation: u64, seq: u64, content: u64) -> Result<(), String> {
        if generation < self.sink.max_generation {
            self.stats.refused_old_generation += 1;
            self.send(SINK, from, Payload::SinkRefused { generation, seq });
            return Ok(());
        }
        self.sink.max_generation = generation;
        let primary = self.records.get(generation as usize - 1).map(|r| r.primary);
        if primary != Some(from) {
            return Err(format!("the outside accepted output {seq} of generation {generation} from {from}, whose primary is {primary:?}"));
        }
        if let Some((g, h)) = self.sink.writers.range(generation + 1..).find(|(_, h)| **h != from) {
            return Err(format!(
                "two primaries: the outside accepted output {seq} of generation {generation} from {from} after it accepted generation {g} from {h}"
            ));
        }
        if let Some((c, g, h)) = self.sink.accepted.get(&seq) {
            if *c != content {
                return Err(format!(
                    "fork: output {seq} came as {c:x} (generation {g}, from {h}) and as {content:x} (generation {generation}, from {from})"
                ));
            }
        }
        let expected = self.timeline.get(seq as usize - 1);
        if expected != Some(&content) {
            return Err(format!(
                "the outside accepted output {seq} ({content:x}, generation {generation}, from {from}) that the surviving timeline (on {}, {} outputs) has as {expected:x?}",
                self.timeline_host,
                self.timeline.len()
            ));
        }
        self.stats.accepted += 1;
        self.sink.writers.insert(generation, from);
        self.sink.accepted.insert(seq, (content, generation, from));
        Ok(())
    }

    /// The sink refused an output of an older generation: the host's core decides whether it is
    /// released again.
    fn sink_refused(&mut self, to: NodeId, generation: u64, seq: u64) -> Result<(), String> {
        let fx = self.host_mut(to).pair.on_output_refused(seq, generation);
        self.carry_out(to, fx)
    }

    // ---- the hosts' driver --------------------------------------------------------------------

    fn carry_out(&mut self, h: NodeId, fx: Vec<Effect>) -> Result<(), String> {
        for e in fx {
            self.effect(h, e)?;
        }
        Ok(())
    }

    fn check_persisted(&self, h: NodeId, what: &str) -> Result<(), String> {
        let host = self.host(h);
        match host.pair.durable == host.persisted {
            true => Ok(()),
            false => Err(format!("{h} let {what} out before persisting {:?}", host.pair.durable)),
        }
    }

    fn effect(&mut self, h: NodeId, e: Effect) -> Result<(), String> {
        match e {
            Effect::Persist(d) => self.host_mut(h).persisted = d,
            Effect::Send { to, msg } => {
                self.check_persisted(h, "a message")?;
                self.check_no_ack_after_seal(h, &msg)?;
                self.send(h, to, Payload::Ha(msg));
            }
            Effect::PauseAndCapture { epoch, full } => self.capture(h, epoch, full)?,
            Effect::Unpause => self.guest_mut(h)?.paused = false,
            Effect::CaptureAppState { token } => self.capture_app(h, token)?,
            Effect::Release { upto, generation } => self.release(h, upto, generation)?,
            Effect::ReleaseAgain { seqs, generation } => self.release_again(h, &seqs, generation)?,
            Effect::StartGuest { generation, state } => self.start_guest(h, generation, &state)?,
            Effect::StopGuest => self.guest_mut(h)?.stopped = true,
            Effect::RestartGuest => self.restart_guest(h)?,
            Effect::DiscardGuest => {
                self.log(format!("{h} discards its guest"));
                self.host_mut(h).guest = None;
            }
            Effect::RefreshRecord => self.hasten(h),
            Effect::Metric(m) => self.metric(m),
        }
        Ok(())
    }

    fn metric(&mut self, m: HaMetric) {
        match m {
            HaMetric::Epoch(r) => {
                self.stats.epochs += 1;
                self.stats.full_epochs += u64::from(r.full);
                self.stats.max_pause_ms = self.stats.max_pause_ms.max(r.pause_ms);
            }
            HaMetric::EpochAcked { lag_ms, .. } | HaMetric::UpdateAcked { lag_ms, .. } => {
                self.stats.max_lag_ms = self.stats.max_lag_ms.max(lag_ms)
            }
        }
    }

    fn guest_mut(&mut self, h: NodeId) -> Result<&mut Guest, String> {
        self.host_mut(h).guest.as_mut().ok_or_else(|| format!("{h} has no guest"))
    }

    /// Checker (2), second half: a host that sealed generation `g` acknowledges nothing below.
    fn check_no_ack_after_seal(&self, h: NodeId, msg: &HaMessage) -> Result<(), String> {
        let generation = match msg {
            HaMessage::CheckpointAck(a) => a.generation,
            HaMessage::AppAck(a) => a.generation,
            _ => return Ok(()),
        };
        let sealed = self.host(h).pair.durable.sealed_below;
        match generation < sealed {
            true => Err(format!("{h} acknowledged {msg:?} after sealing below generation {sealed}")),
            false => Ok(()),
        }
    }

    fn capture(&mut self, h: NodeId, epoch: u64, full: bool) -> Result<(), String> {
        let now = self.now_ms;
        let host = self.host_mut(h);
        let generation = host.pair.primary().map(|p| p.generation).ok_or("a capture on a host that is not primary")?;
        let g = host.guest.as_mut().ok_or("a capture without a guest")?;
        g.paused = true;
        let pick: Vec<u64> = if full { (0..PAGES).collect() } else { g.dirty.iter().copied().collect() };
        let pages = pick.iter().map(|&p| (p, g.pages[p as usize].clone())).collect();
        g.dirty.clear();
        let device = g.device_state();
        let memory = g.pages.clone();
        let fx = host.pair.on_captured(epoch, pages, device.clone(), now);
        self.captures.insert((generation, epoch), (memory, device));
        let fx = fx.map_err(|e| format!("{h}: capture of epoch {epoch} refused: {e}"))?;
        self.carry_out(h, fx)
    }

    fn capture_app(&mut self, h: NodeId, token: u64) -> Result<(), String> {
        let now = self.now_ms;
        let host = self.host_mut(h);
        let g = host.guest.as_ref().ok_or("an application capture without a guest")?;
        let (seq, state) = (g.outputs.len() as u64, encode(&g.outputs));
        let fx = host.pair.on_app_state(token, seq, state, now);
        let fx = fx.map_err(|e| format!("{h}: application capture refused: {e}"))?;
        self.carry_out(h, fx)
    }

    fn release(&mut self, h: NodeId, upto: u64, generation: u64) -> Result<(), String> {
        self.check_persisted(h, "an output")?;
        let primary = self.records.get(generation as usize - 1).map(|r| r.primary);
        if primary != Some(h) {
            return Err(format!("{h} released outputs at generation {generation}, whose primary is {primary:?}"));
        }
        let g = self.guest_mut(h)?;
        if upto > g.outputs.len() as u64 {
            return Err(format!("{h} released up to {upto} with {} outputs issued", g.outputs.len()));
        }
        let from = g.released + 1;
        let sends: Vec<(u64, u64)> = (from..=upto).map(|seq| (seq, g.outputs[seq as usize - 1])).collect();
        g.released = g.released.max(upto);
        for (seq, content) in sends {
            self.send(h, SINK, Payload::Output { generation, seq, content });
        }
        Ok(())
    }

    fn release_again(&mut self, h: NodeId, seqs: &[u64], generation: u64) -> Result<(), String> {
        self.check_persisted(h, "an output")?;
        let primary = self.records.get(generation as usize - 1).map(|r| r.primary);
        if primary != Some(h) {
            return Err(format!("{h} released outputs again at generation {generation}, whose primary is {primary:?}"));
        }
        let g = self.guest_mut(h)?;
        if seqs.iter().any(|s| *s > g.released) {
            return Err(format!("{h} releases {seqs:?} again, having released {}", g.released));
        }
        let sends: Vec<(u64, u64)> = seqs.iter().map(|s| (*s, g.outputs[*s as usize - 1])).collect();
        for (seq, content) in sends {
            self.send(h, SINK, Payload::Output { generation, seq, content });
        }
        Ok(())
    }

    /// A takeover: checkers (1) and (3), then this guest is the surviving timeline.
    fn start_guest(&mut self, h: NodeId, generation: u64, state: &TakeoverState) -> Result<(), String> {
        self.check_persisted(h, "its guest")?;
        let guest =
            Guest::from_state(state, generation).map_err(|e| format!("{h} takes over from a bad state: {e}"))?;
        let (point_gen, point) = state.point();
        self.log(format!(
            "{h} takes over at generation {generation} from {point_gen}/{point} with {} outputs",
            guest.outputs.len()
        ));
        self.check_holds_accepted(h, &guest.outputs)?;
        if guest.outputs.len() > self.timeline.len() || guest.outputs[..] != self.timeline[..guest.outputs.len()] {
            return Err(format!("{h} takes over with outputs that are not a prefix of the surviving timeline"));
        }
        if let TakeoverState::Image(image) = state {
            let (memory, device) = self.captures.get(&(image.generation, image.epoch)).ok_or_else(|| {
                format!("{h} starts from epoch {} of generation {}, never captured", image.epoch, image.generation)
            })?;
            if guest.pages != *memory || image.device_state != *device {
                return Err(format!(
                    "{h} starts from an image that differs from epoch {} of generation {} as captured",
                    image.epoch, image.generation
                ));
            }
        }
        self.stats.takeovers += 1;
        let outputs = guest.outputs.len() as u64;
        self.last_takeover = Some(Takeover { host: h, generation, point: state.point(), outputs });
        self.stats.takeover_checks += self.sink.accepted.len() as u64;
        self.timeline = guest.outputs.clone();
        self.timeline_host = h;
        self.host_mut(h).guest = Some(guest);
        Ok(())
    }

    fn check_holds_accepted(&self, h: NodeId, outputs: &[u64]) -> Result<(), String> {
        for (seq, (c, g, from)) in &self.sink.accepted {
            if outputs.get(*seq as usize - 1) != Some(c) {
                return Err(format!(
                    "{h} becomes primary without output {seq} ({c:x}) that the outside accepted at generation {g} from {from} ({} outputs held)",
                    outputs.len()
                ));
            }
        }
        Ok(())
    }

    /// A fail-back: the deposed guest runs again and is the surviving timeline.
    fn restart_guest(&mut self, h: NodeId) -> Result<(), String> {
        self.check_persisted(h, "its guest")?;
        let outputs = self.guest_mut(h)?.outputs.clone();
        self.log(format!("{h} restarts its kept guest ({} outputs)", outputs.len()));
        self.check_holds_accepted(h, &outputs)?;
        self.stats.fail_backs += 1;
        self.guest_mut(h)?.stopped = false;
        self.timeline = outputs;
        self.timeline_host = h;
        Ok(())
    }

    fn hasten(&mut self, h: NodeId) {
        let soon = self.now_ms + 10;
        let host = self.host_mut(h);
        host.learn_at_ms = host.learn_at_ms.min(soon);
    }

    /// A message for a host's pair. A refusal must leave the host unchanged and be an error the
    /// protocol expects; it goes back to the sender.
    fn host_message(&mut self, from: NodeId, to: NodeId, msg: &HaMessage) -> Result<(), String> {
        let now = self.now_ms;
        let before = self.host(to).pair.clone();
        let result = self.host_mut(to).pair.on_message(from, msg, now);
        let e = match result {
            Ok(fx) => return self.carry_out(to, fx),
            Err(e) => e,
        };
        if self.host(to).pair != before {
            return Err(format!("{to} changed although it refused {msg:?}: {e}"));
        }
        match &e {
            HaError::Generation { ours, theirs } if theirs > ours => self.hasten(to),
            HaError::Sealed { .. } => self.stats.seals_refused += 1,
            HaError::Generation { .. }
            | HaError::NotFromPrimary { .. }
            | HaError::NotStandby
            | HaError::NoBase { .. }
            | HaError::NoAppState { .. }
            | HaError::TooFarAhead { .. } => {}
            other => {
                return Err(format!(
                    "{to} refused {} from {from} unexpectedly: {other}",
                    brief(&Payload::Ha(msg.clone()))
                ))
            }
        }
        if self.verbose {
            self.log(format!("{to} refuses {from}'s {}: {e}", brief(&Payload::Ha(msg.clone()))));
        }
        if let Some(refusal) = refusal_message(VM, msg, &e) {
            self.send(to, from, Payload::Ha(refusal));
        }
        Ok(())
    }

    /// `h` reads `record` from its catalog copy.
    fn learn(&mut self, h: NodeId, record: HaPairRecord) -> Result<(), String> {
        let now = self.now_ms;
        let host = self.host_mut(h);
        host.known = Some(record.clone());
        let fx = host.pair.on_record(&record, now).map_err(|e| format!("{h} refused record {record:?}: {e}"))?;
        if self.verbose {
            self.log(format!(
                "{h} learns generation {} ({:?}, primary {}, standby {:?})",
                record.generation, record.state, record.primary, record.standby
            ));
        }
        self.carry_out(h, fx)
    }

    /// Hosts that can reach the catalog learn a newer record when due: the next one, or (half the
    /// time) the newest, as a driver reading the current record skips generations.
    fn learning(&mut self) -> Result<(), String> {
        if !self.leader.up {
            return Ok(());
        }
        for h in HOSTS {
            let host = self.host(h);
            let known = host.known.as_ref().map_or(0, |r| r.generation) as usize;
            let due = host.learn_at_ms <= self.now_ms && known < self.records.len();
            if !self.awake(h) || !due || self.cut.contains(&pair(h, LEADER)) {
                continue;
            }
            let index = if self.rng.random_bool(0.5) { self.records.len() - 1 } else { known };
            let record = self.records[index].clone();
            self.learn(h, record)?;
        }
        Ok(())
    }

    fn heartbeats(&mut self) {
        for h in HOSTS {
            if !self.awake(h) || self.host(h).next_beat_ms > self.now_ms {
                continue;
            }
            let (now, period) = (self.now_ms, self.tun.heartbeat_ms);
            let host = self.host_mut(h);
            host.next_beat_ms = now + period;
            host.beat_seq += 1;
            let hb = HaHeartbeat {
                host: h,
                incarnation: host.incarnation,
                seq: host.beat_seq,
                pairs: vec![host.pair.status()],
            };
            self.send(h, LEADER, Payload::Ha(HaMessage::Heartbeat(hb)));
        }
    }

    fn host_ticks(&mut self) -> Result<(), String> {
        for h in HOSTS {
            if !self.awake(h) {
                continue;
            }
            let now = self.now_ms;
            let fx = self.host_mut(h).pair.tick(now);
            self.carry_out(h, fx)?;
        }
        Ok(())
    }

    /// The guest of the host that runs the VM writes pages and now and then issues an output.
    fn workload(&mut self) -> Result<(), String> {
        for h in HOSTS {
            let running = self.host(h).guest.as_ref().is_some_and(Guest::running);
            if !self.awake(h) || !running || self.host(h).pair.primary().is_none() {
                continue;
            }
            for _ in 0..self.rng.random_range(1..4) {
                let page = self.rng.random_range(0..PAGES);
                self.guest_mut(h)?.write_page(page);
            }
            if self.rng.random_bool(0.4) {
                self.issue_output(h)?;
            }
        }
        Ok(())
    }

    fn issue_output(&mut self, h: NodeId) -> Result<(), String> {
        let now = self.now_ms;
        let g = self.guest_mut(h)?;
        let seq = g.outputs.len() as u64 + 1;
        let c = content(g.branch, seq);
        g.outputs.push(c);
        if self.timeline_host == h {
            self.timeline.push(c);
        }
        self.stats.outputs += 1;
        let fx = self.host_mut(h).pair.on_output(seq, encode(&[c]), now);
        let fx = fx.map_err(|e| format!("{h}: output {seq} refused: {e}"))?;
        self.carry_out(h, fx)
    }

    // ---- the leader and the catalog -----------------------------------------------------------

    fn leader_message(&mut self, from: NodeId, msg: &HaMessage) -> Result<(), String> {
        let now = self.now_ms;
        self.leader.core.on_message(from, msg, now).map_err(|e| format!("the leader refused {msg:?} from {from}: {e}"))
    }

    fn leader_tick(&mut self) -> Result<(), String> {
        if !self.leader.up {
            return Ok(());
        }
        let now = self.now_ms;
        for action in self.leader.core.tick(now) {
            match action {
                LeaderAction::Propose(cmd) => {
                    let at = now + self.rng.random_range(2..20);
                    self.proposals.push((at, cmd));
                }
                LeaderAction::Send { to, msg } => self.send(LEADER, to, Payload::Ha(msg)),
                LeaderAction::Event(LeaderEvent::VmLost { host, generation, .. }) => {
                    return Err(format!(
                        "the leader reports the VM lost: {host} started it at generation {generation} and lost it"
                    ));
                }
                LeaderAction::Event(e) => self.log(format!("leader: {e:?}")),
            }
        }
        Ok(())
    }

    /// Commit the proposals that are due (a compare-and-set: a stale one is refused).
    fn commit_proposals(&mut self) -> Result<(), String> {
        if !self.leader.up {
            return Ok(());
        }
        let (due, later): (Vec<_>, Vec<_>) = self.proposals.drain(..).partition(|(at, _)| *at <= self.now_ms);
        self.proposals = later;
        for (_, cmd) in due {
            self.commit(&cmd)?;
        }
        Ok(())
    }

    fn commit(&mut self, cmd: &HaCommand) -> Result<(), String> {
        let current = self.latest().clone();
        let next = match apply(Some(&current), cmd, &self.host_infos()) {
            Ok(Some(r)) => r,
            Ok(None) => return Err(format!("{cmd:?} deleted the pair")),
            Err(PairError::Generation { .. }) => {
                self.stats.cas_refused += 1;
                return Ok(());
            }
            Err(e) => return Err(format!("the catalog refused {cmd:?}: {e}")),
        };
        self.log(format!(
            "commit generation {}: {:?} primary {} standby {:?} {:?}",
            next.generation, next.state, next.primary, next.standby, next.mode
        ));
        match cmd {
            HaCommand::Failover { .. } => self.stats.failovers += 1,
            HaCommand::Reprotect { failover_took_ms, .. } => {
                self.stats.reprotects += 1;
                self.stats.max_failover_ms = self.stats.max_failover_ms.max(failover_took_ms.unwrap_or(0));
            }
            HaCommand::SetMode { .. } => self.stats.switches += 1,
            _ => {}
        }
        self.records.push(next.clone());
        self.leader.core.on_record(&next).map_err(|e| format!("the leader refused its own record: {e}"))?;
        for h in HOSTS {
            let late = self.rng.random_bool(0.2);
            let delay = if late { self.rng.random_range(300..1_000) } else { self.rng.random_range(5..150) };
            let now = self.now_ms;
            let host = self.host_mut(h);
            host.learn_at_ms = host.learn_at_ms.max(now + delay);
        }
        Ok(())
    }

    // ---- faults ---------------------------------------------------------------------------------

    /// A kill now is a single fault: the pair is fully protected, nothing is frozen or cut, and
    /// the leader has fresh word of both hosts (so it cannot take the standby for dead and drop
    /// it just as the primary dies — a double fault no single-standby design survives).
    fn kill_allowed(&self) -> bool {
        let r = self.latest();
        let fresh = |h: Option<NodeId>| h.is_some_and(|h| self.leader.core.fresh(h, self.now_ms));
        self.kill_budget
            && self.fully_protected()
            && self.cut.is_empty()
            && self.leader.up
            && HOSTS.iter().all(|h| !self.frozen(*h))
            && fresh(Some(r.primary))
            && fresh(r.standby)
    }

    /// Record primary and standby both hold the VM at the newest generation.
    fn fully_protected(&self) -> bool {
        let r = self.latest();
        let Some(s) = r.standby else { return false };
        let p_ok = self.host(r.primary).pair.primary().is_some_and(|p| p.generation == r.generation)
            && self.host(r.primary).guest.is_some();
        let s_ok = self.host(s).pair.standby().is_some_and(|st| st.generation == r.generation && st.ready());
        r.state == PairState::Protecting && p_ok && s_ok && HOSTS.iter().all(|h| self.host(*h).up)
    }

    pub fn kill(&mut self, h: NodeId) {
        self.log(format!("{h} is killed"));
        self.stats.kills += 1;
        self.kill_budget = false;
        let restart = self.now_ms + self.rng.random_range(100..1_200);
        let tun = self.tun.clone();
        let host = self.host_mut(h);
        host.up = false;
        host.restart_at_ms = restart;
        host.frozen_until_ms = 0;
        host.guest = None;
        host.pair = PairHost::new(h, VM, SHAPE, tun, host.persisted);
        self.net.retain(|m| m.to != h);
    }

    fn restart(&mut self, h: NodeId) -> Result<(), String> {
        self.log(format!("{h} restarts"));
        let host = self.host_mut(h);
        host.up = true;
        host.incarnation += 1;
        host.beat_seq = 0;
        let known = host.known.clone();
        match known {
            Some(r) => self.learn(h, r),
            None => Ok(()),
        }
    }

    pub fn freeze(&mut self, h: NodeId, ms: u64) {
        self.log(format!("{h} freezes for {ms} ms"));
        self.stats.freezes += 1;
        let until = self.now_ms + ms;
        self.host_mut(h).frozen_until_ms = until;
    }

    pub fn cut(&mut self, a: NodeId, b: NodeId) {
        self.log(format!("cut {a} from {b}"));
        self.stats.cuts += 1;
        self.cut.insert(pair(a, b));
    }

    pub fn heal(&mut self) {
        if !self.cut.is_empty() {
            self.log("heal".into());
        }
        self.cut.clear();
    }

    fn restart_leader_later(&mut self) -> Result<(), String> {
        self.log("the leader restarts".into());
        self.stats.leader_restarts += 1;
        self.leader.up = false;
        self.leader.restart_at_ms = self.now_ms + self.rng.random_range(100..700);
        for (_, cmd) in std::mem::take(&mut self.proposals) {
            if self.rng.random_bool(0.5) {
                self.commit(&cmd)?;
            }
        }
        self.net.retain(|m| m.to != LEADER);
        Ok(())
    }

    fn start_leader(&mut self) -> Result<(), String> {
        let mut core = FailoverCore::new(self.tun.clone(), self.now_ms);
        core.set_hosts(&self.host_infos());
        core.on_record(self.latest()).map_err(|e| format!("the new leader refused the record: {e}"))?;
        self.leader = Leader { core, up: true, restart_at_ms: 0 };
        Ok(())
    }

    /// Ask the leader for a live mode switch (refused while failing over).
    pub fn switch_mode(&mut self, mode: HaMode) -> bool {
        if !self.leader.up {
            return false;
        }
        match self.leader.core.switch_mode(VM, mode, self.now_ms) {
            Ok(cmd) => {
                self.log(format!("switch to {mode:?} requested"));
                let at = self.now_ms + 5;
                self.proposals.push((at, cmd));
                true
            }
            Err(PairError::FailingOver(_) | PairError::SameMode(_)) => {
                self.stats.switches_refused += 1;
                false
            }
            Err(e) => panic!("mode switch refused unexpectedly: {e}"),
        }
    }

    fn random_mode(&mut self) -> HaMode {
        match self.latest().mode {
            HaMode::MultiOperation => HaMode::Redundant { epoch_ms: [10, 20, 30][self.rng.random_range(0..3)] },
            HaMode::Redundant { .. } => HaMode::MultiOperation,
        }
    }

    fn random_fault(&mut self) -> Result<(), String> {
        let nodes = [HOSTS[0], HOSTS[1], HOSTS[2], LEADER];
        let a = nodes[self.rng.random_range(0..4)];
        let h = HOSTS[self.rng.random_range(0..3)];
        match self.rng.random_range(0..100u32) {
            0..25 => {
                let b = nodes[self.rng.random_range(0..4)];
                if a != b {
                    self.cut(a, b);
                }
            }
            25..45 => self.heal(),
            45..62 if self.awake(h) => {
                let ms = self.rng.random_range(100..1_500);
                self.freeze(h, ms);
            }
            62..85 if self.kill_allowed() => self.kill(h),
            85..95 if self.cfg.leader_restarts && self.leader.up => self.restart_leader_later()?,
            _ => {}
        }
        Ok(())
    }

    // ---- time -----------------------------------------------------------------------------------

    fn step(&mut self) -> Result<(), String> {
        self.now_ms += STEP_MS;
        if !self.leader.up && self.leader.restart_at_ms <= self.now_ms {
            self.start_leader()?;
        }
        for h in HOSTS {
            if !self.host(h).up && self.host(h).restart_at_ms <= self.now_ms {
                self.restart(h)?;
            }
        }
        self.commit_proposals()?;
        self.learning()?;
        if self.active {
            self.workload()?;
            if self.cfg.faults && self.rng.random_bool(0.015) {
                self.random_fault()?;
            }
            if self.cfg.switches && self.rng.random_bool(0.004) {
                let mode = self.random_mode();
                self.switch_mode(mode);
            }
        }
        self.deliver_due()?;
        self.host_ticks()?;
        self.heartbeats();
        self.leader_tick()?;
        if !self.kill_budget && self.fully_protected() {
            self.kill_budget = true;
        }
        Ok(())
    }

    pub fn pass(&mut self, ms: u64) -> Result<(), String> {
        let until = self.now_ms + ms;
        while self.now_ms < until {
            self.step()?;
        }
        Ok(())
    }

    pub fn run(&mut self) -> Result<Stats, String> {
        while self.now_ms < ACTIVE_MS {
            self.step()?;
        }
        self.settle_and_check()?;
        Ok(self.stats.clone())
    }

    // ---- settling and the end checks ------------------------------------------------------------

    fn quiet(&self) -> bool {
        let r = self.latest();
        let primary_ok =
            self.host(r.primary).pair.primary().is_some_and(|p| p.generation == r.generation && p.released == p.issued)
                && self.host(r.primary).guest.as_ref().is_some_and(Guest::running);
        let standby_ok = match r.standby {
            Some(s) => self.host(s).pair.standby().is_some_and(|st| st.generation == r.generation && st.ready()),
            None => {
                !HOSTS.iter().any(|h| *h != r.primary && !self.host_infos().iter().any(|i| i.id == *h && i.draining))
            }
        };
        let learned = HOSTS.iter().all(|h| self.host(*h).known.as_ref().is_some_and(|k| k.generation == r.generation));
        let outputs_landed = !self.net.iter().any(|m| !matches!(m.payload, Payload::Ha(_)));
        self.leader.up
            && self.proposals.is_empty()
            && HOSTS.iter().all(|h| self.awake(*h))
            && r.state != PairState::FailingOver
            && learned
            && primary_ok
            && standby_ok
            && outputs_landed
    }

    /// Heal everything, stop the workload, let the pair settle, and check the end state.
    pub fn settle_and_check(&mut self) -> Result<(), String> {
        self.active = false;
        self.heal();
        for h in HOSTS {
            let now = self.now_ms;
            let host = self.host_mut(h);
            host.frozen_until_ms = host.frozen_until_ms.min(now);
            host.restart_at_ms = host.restart_at_ms.min(now);
        }
        self.leader.restart_at_ms = self.leader.restart_at_ms.min(self.now_ms);
        let deadline = self.now_ms + SETTLE_MS;
        while !self.quiet() {
            if self.now_ms > deadline {
                return Err(format!("no quiescence {SETTLE_MS} ms after healing: {}", self.summary()));
            }
            self.step()?;
        }
        self.check_end()
    }

    fn summary(&self) -> String {
        let r = self.latest();
        let hosts: Vec<String> = HOSTS
            .iter()
            .map(|h| {
                let host = self.host(*h);
                let role = match host.pair.role() {
                    Role::Idle => "idle".to_string(),
                    Role::Primary(p) => {
                        format!("primary g{} issued {} released {}", p.generation, p.issued, p.released)
                    }
                    Role::Standby(s) => format!("standby g{} ready {}", s.generation, s.ready()),
                    Role::Deposed { at_generation, .. } => format!("deposed at g{at_generation}"),
                };
                let guest = host.guest.as_ref().map(|g| (g.outputs.len(), g.running()));
                format!(
                    "{h}: up {} {role} guest {guest:?} knows g{:?}",
                    host.up,
                    host.known.as_ref().map(|k| k.generation)
                )
            })
            .collect();
        format!(
            "record g{} {:?} primary {} standby {:?}; {}",
            r.generation,
            r.state,
            r.primary,
            r.standby,
            hosts.join("; ")
        )
    }

    /// Checker (4) and the end of (1): one host runs the VM, the one the record names, and the
    /// outside holds exactly its outputs.
    fn check_end(&self) -> Result<(), String> {
        let r = self.latest();
        let running: Vec<NodeId> =
            HOSTS.iter().copied().filter(|h| self.host(*h).guest.as_ref().is_some_and(Guest::running)).collect();
        if running != vec![r.primary] {
            return Err(format!("after settling the VM runs on {running:?}, the record names {}", r.primary));
        }
        let held: Vec<NodeId> = HOSTS.iter().copied().filter(|h| self.host(*h).guest.is_some()).collect();
        if held != vec![r.primary] {
            return Err(format!("after settling guests are held on {held:?}"));
        }
        let outputs = &self.host(r.primary).guest.as_ref().ok_or("no guest")?.outputs;
        if *outputs != self.timeline {
            return Err(format!(
                "the running guest's {} outputs are not the surviving timeline's {}",
                outputs.len(),
                self.timeline.len()
            ));
        }
        let accepted: Vec<u64> = self.sink.accepted.values().map(|(c, _, _)| *c).collect();
        let keys_ok = self.sink.accepted.keys().copied().eq(1..=outputs.len() as u64);
        if !keys_ok || accepted != *outputs {
            let missing: Vec<u64> =
                (1..=outputs.len() as u64).filter(|s| !self.sink.accepted.contains_key(s)).take(10).collect();
            return Err(format!(
                "the outside holds {} outputs (up to {:?}, missing {missing:?}), the VM issued {}",
                accepted.len(),
                self.sink.accepted.keys().next_back(),
                outputs.len()
            ));
        }
        Ok(())
    }
}

// ---- running seeds ------------------------------------------------------------------------------

fn config_for(seed: u64) -> Config {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x4a11);
    let mode = match rng.random_bool(0.5) {
        true => HaMode::Redundant { epoch_ms: [10, 20, 30][rng.random_range(0..3)] },
        false => HaMode::MultiOperation,
    };
    Config {
        mode,
        faults: rng.random_bool(0.85),
        switches: rng.random_bool(0.5),
        leader_restarts: rng.random_bool(0.3),
        drain3: rng.random_bool(0.2),
    }
}

fn failure(seed: u64, cfg: &Config, w: &World, violation: &str) -> String {
    let start = w.trace.len().saturating_sub(if w.verbose { 100_000 } else { 60 });
    format!(
        "seed {seed} ({cfg:?}): {violation}\n--- last events ---\n{}\n--- replay: HAVEN_MODEL_SEED={seed} cargo test -p \
         haven-node --lib ha::model",
        w.trace[start..].join("\n")
    )
}

fn run_seed(seed: u64) -> Result<Stats, String> {
    let cfg = config_for(seed);
    let mut w = World::new(cfg, seed);
    w.run().map_err(|violation| failure(seed, &cfg, &w, &violation))
}

/// Two thousand seeds by default; `HAVEN_MODEL_SEEDS=N` hunts, `HAVEN_MODEL_SEED=S` replays.
#[test]
fn ha_model_seeds() {
    crate::model_seeds::run_seeds("ha", 2_000, run_seed, |total, s| total.add(s));
}

// ---- directed schedules -------------------------------------------------------------------------

const REDUNDANT: HaMode = HaMode::Redundant { epoch_ms: 20 };

fn quiet(mode: HaMode) -> Config {
    Config { mode, faults: false, switches: false, leader_restarts: false, drain3: false }
}

/// A directed schedule's step; a violation panics with the trace (these are deterministic: rerun
/// the test itself to replay).
fn expect(w: &World, r: Result<(), String>) {
    if let Err(e) = r {
        let start = w.trace.len().saturating_sub(60);
        panic!("{e}\n--- last events ---\n{}", w.trace[start..].join("\n"));
    }
}

/// A world whose standby holds a complete copy.
fn protected(mode: HaMode) -> World {
    let mut w = World::new(quiet(mode), 7);
    let r = w.pass(400);
    expect(&w, r);
    assert!(w.fully_protected(), "{}", w.summary());
    w
}

fn primary_of(w: &World, h: NodeId) -> Option<&super::core::Primary> {
    w.host(h).pair.primary()
}

#[test]
fn killing_the_primary_mid_epoch_fails_over_to_the_last_complete_checkpoint() {
    let mut w = protected(REDUNDANT);
    let (p, s) = (HOSTS[0], HOSTS[1]);
    // Let a capture happen, then drop its frames so the epoch never completes at the standby.
    let before = w.stats.epochs;
    while w.stats.epochs == before {
        let r = w.step();
        expect(&w, r);
    }
    let lost_epoch = w.captures.keys().next_back().map(|(_, e)| *e).unwrap();
    w.net.retain(|m| !(m.from == p && m.to == s && matches!(m.payload, Payload::Ha(HaMessage::Checkpoint(_)))));
    let issued = primary_of(&w, p).map(|x| x.issued).unwrap();
    w.kill(p);
    let r = w.pass(1_500);
    expect(&w, r);
    let rec = w.latest().clone();
    assert_eq!(rec.primary, s, "{}", w.summary());
    assert_eq!(w.stats.takeovers, 1);
    let f = rec.last_failover.as_ref().unwrap();
    assert!(f.took_ms > 0 && f.took_ms < 2_000, "failover took {} ms", f.took_ms);
    let Takeover { host, generation, point: (point_gen, epoch), outputs } = w.last_takeover.unwrap();
    assert_eq!((host, generation, point_gen), (s, 2, 1));
    assert!(epoch < lost_epoch && outputs <= issued, "started from epoch {epoch}, the lost one was {lost_epoch}");
    let r = w.settle_and_check();
    expect(&w, r);
    assert!(w.latest().standby.is_some());
}

#[test]
fn a_partitioned_primary_keeps_running_but_releases_nothing_after_the_seal() {
    for mode in [REDUNDANT, HaMode::MultiOperation] {
        let mut w = protected(mode);
        let (p, s) = (HOSTS[0], HOSTS[1]);
        w.cut(p, LEADER);
        let r = w.pass(1_500);
        expect(&w, r);
        assert_eq!(w.latest().primary, s, "{mode:?}: {}", w.summary());
        // The old primary still believes, and its guest still runs, but once the standby sealed
        // it gets no acknowledgement: every output it released is in the new primary's state.
        assert!(primary_of(&w, p).is_some() || matches!(w.host(p).pair.role(), Role::Deposed { .. }));
        let sealed_at = w.host(s).pair.durable.sealed_below;
        assert_eq!(sealed_at, w.records.iter().find(|r| r.primary == s).unwrap().generation);
        let released_old = w.host(p).guest.as_ref().map_or(0, |g| g.released);
        assert!(released_old <= w.timeline.len() as u64);
        let r = w.pass(1_000);
        expect(&w, r);
        assert_eq!(w.host(p).guest.as_ref().map_or(0, |g| g.released), released_old, "nothing new released");
        let r = w.settle_and_check();
        expect(&w, r);
        assert!(w.host(p).guest.is_none(), "the old primary dropped its guest once it learned");
    }
}

#[test]
fn a_frozen_primary_wakes_deposed_and_changes_nothing_outside() {
    let mut w = protected(REDUNDANT);
    let (p, s) = (HOSTS[0], HOSTS[1]);
    w.freeze(p, 2_000);
    let r = w.pass(1_000);
    expect(&w, r);
    assert_eq!(w.latest().primary, s, "{}", w.summary());
    let accepted = w.sink.accepted.len();
    let r = w.pass(1_500); // the old primary wakes, captures, sends stale frames, gets sealed
    expect(&w, r);
    assert!(w.sink.accepted.len() >= accepted);
    assert!(w.stats.seals_refused > 0 || w.host(p).pair.primary().is_none(), "{}", w.summary());
    let r = w.settle_and_check();
    expect(&w, r);
}

#[test]
fn duplicate_and_late_checkpoint_frames_are_applied_once() {
    let mut w = protected(REDUNDANT);
    let s = HOSTS[1];
    let mut copies = Vec::new();
    for _ in 0..30 {
        for m in &w.net {
            if matches!(m.payload, Payload::Ha(HaMessage::Checkpoint(_))) {
                copies.push(m.clone());
            }
        }
        let r = w.step();
        expect(&w, r);
    }
    // Every frame again, in reverse, now and much later.
    copies.reverse();
    let now = w.now_ms;
    w.net.extend(copies.iter().cloned().map(|m| InFlight { at_ms: now, ..m }));
    w.net.extend(copies.iter().cloned().map(|m| InFlight { at_ms: now + 700, ..m }));
    let r = w.pass(1_000);
    expect(&w, r);
    let st = w.host(s).pair.standby().expect("still standby");
    let Some(TakeoverState::Image(image)) = st.state() else { panic!("no image") };
    let (memory, device) = &w.captures[&(image.generation, image.epoch)];
    let pages: Vec<Vec<u8>> =
        (0..PAGES).map(|p| image.pages.get(&p).cloned().unwrap_or_else(|| vec![0; PAGE_SIZE as usize])).collect();
    assert_eq!((&pages, &image.device_state), (memory, device), "the standby's image is exactly a captured epoch");
    let r = w.settle_and_check();
    expect(&w, r);
}

#[test]
fn mode_switches_under_load_lose_nothing() {
    let mut w = protected(REDUNDANT);
    for (i, mode) in
        [HaMode::MultiOperation, HaMode::Redundant { epoch_ms: 10 }, HaMode::MultiOperation].into_iter().enumerate()
    {
        assert!(w.switch_mode(mode), "switch {i} refused: {}", w.summary());
        let r = w.pass(60);
        expect(&w, r);
        if i == 1 {
            // Kill the primary right after a switch: the standby starts from what it kept.
            let p = w.latest().primary;
            w.kill(p);
        }
        let r = w.pass(1_500);
        expect(&w, r);
    }
    assert!(w.stats.switches >= 3 && w.stats.takeovers == 1, "{:?}", w.stats);
    let r = w.settle_and_check();
    expect(&w, r);
}

#[test]
fn a_mode_switch_is_refused_while_failing_over() {
    let mut w = protected(HaMode::MultiOperation);
    w.kill(HOSTS[0]);
    let mut refused = false;
    for _ in 0..100 {
        let r = w.step();
        expect(&w, r);
        let failing = w.latest().state == PairState::FailingOver || w.leader.core.loss(w.latest(), w.now_ms).is_some();
        if failing {
            let switch = w.leader.core.switch_mode(VM, REDUNDANT, w.now_ms);
            assert_eq!(switch, Err(PairError::FailingOver(VM)));
            let stale = HaCommand::SetMode { vm: VM, mode: REDUNDANT, expected_generation: w.latest().generation };
            if w.latest().state == PairState::FailingOver {
                assert_eq!(apply(Some(w.latest()), &stale, &w.host_infos()), Err(PairError::FailingOver(VM)));
            }
            refused = true;
        }
    }
    assert!(refused);
    let r = w.settle_and_check();
    expect(&w, r);
}

#[test]
fn reprotection_picks_the_third_host_and_skips_a_draining_one() {
    let mut w = protected(REDUNDANT);
    w.kill(HOSTS[0]);
    w.host_mut(HOSTS[0]).restart_at_ms = u64::MAX; // stays down
    let r = w.pass(2_000);
    expect(&w, r);
    let rec = w.latest().clone();
    assert_eq!((rec.primary, rec.standby, rec.state), (HOSTS[1], Some(HOSTS[2]), PairState::Protecting));
    assert_eq!(rec.failovers, 1);
    w.host_mut(HOSTS[0]).restart_at_ms = w.now_ms;
    let r = w.settle_and_check();
    expect(&w, r);

    let mut w = World::new(Config { drain3: true, ..quiet(REDUNDANT) }, 3);
    let r = w.pass(400);
    expect(&w, r);
    w.kill(HOSTS[0]);
    w.host_mut(HOSTS[0]).restart_at_ms = w.now_ms + 2_000;
    let r = w.pass(1_500);
    expect(&w, r);
    let rec = w.latest().clone();
    assert_eq!((rec.primary, rec.standby, rec.state), (HOSTS[1], None, PairState::Degraded), "3 drains, 1 is down");
    let r = w.pass(1_500);
    expect(&w, r);
    assert_eq!(w.latest().standby, Some(HOSTS[0]), "the old primary's host, once back");
    let r = w.settle_and_check();
    expect(&w, r);
}

#[test]
fn a_takeover_by_an_empty_standby_hands_the_vm_back() {
    let mut w = protected(REDUNDANT);
    let (p, s) = (HOSTS[0], HOSTS[1]);
    // The leader hears neither host for a while; then the standby restarts (its mirror gone) and
    // a stale heartbeat of its previous process, saying it is ready, reaches the leader.
    w.cut(p, LEADER);
    w.cut(s, LEADER);
    let r = w.pass(300);
    expect(&w, r);
    assert_eq!(w.latest().generation, 1, "no failover to a silent standby");
    let ready = w.host(s).pair.status();
    w.kill(s);
    w.host_mut(s).restart_at_ms = w.now_ms + 10;
    w.cut.remove(&pair(s, LEADER));
    let hb = HaHeartbeat { host: s, incarnation: 1, seq: 1_000, pairs: vec![ready] };
    let now = w.now_ms;
    w.leader.core.on_message(s, &HaMessage::Heartbeat(hb), now).unwrap();
    let r = w.pass(400);
    expect(&w, r);
    assert!(w.records.iter().any(|r| r.primary == s), "failed over to the empty standby: {}", w.summary());
    assert_eq!(w.latest().state, PairState::FailingOver, "{}", w.summary());
    w.heal();
    let r = w.pass(1_500);
    expect(&w, r);
    let rec = w.records.iter().find(|r| r.failovers == 2).cloned();
    assert_eq!(rec.map(|r| r.primary), Some(p), "handed back: {}", w.summary());
    assert_eq!(w.stats.fail_backs, 1);
    let r = w.settle_and_check();
    expect(&w, r);
}

#[test]
fn a_new_leader_resumes_a_failover_from_the_record() {
    let mut w = protected(HaMode::MultiOperation);
    w.kill(HOSTS[0]);
    while w.latest().state != PairState::FailingOver {
        let r = w.step();
        expect(&w, r);
    }
    let r = w.restart_leader_later();
    expect(&w, r);
    let r = w.pass(1_500);
    expect(&w, r);
    assert_eq!((w.latest().primary, w.latest().state), (HOSTS[1], PairState::Protecting));
    let r = w.settle_and_check();
    expect(&w, r);
}

#[test]
fn bad_inputs_are_refused_with_typed_errors_and_change_nothing() {
    use haven_proto::ha::{Checkpoint, HaRefusal};

    let mut w = protected(REDUNDANT);
    let (p, s) = (HOSTS[0], HOSTS[1]);
    let g = w.latest().generation;
    let frame = |generation, epoch, pages: Vec<(u64, Vec<u8>)>| {
        HaMessage::Checkpoint(Checkpoint {
            vm: VM,
            generation,
            epoch,
            frame: 0,
            full: true,
            last: true,
            outputs: 0,
            pages,
            device_state: vec![],
        })
    };
    type Expected = fn(&HaError) -> bool;
    let cases: Vec<(NodeId, HaMessage, Expected)> = vec![
        (p, frame(g, 900, vec![(PAGES, vec![0; 16])]), |e| matches!(e, HaError::BadPage { .. })),
        (p, frame(g, 900, vec![(1, vec![0; 3])]), |e| matches!(e, HaError::BadPage { len: 3, .. })),
        (p, frame(g + 1, 900, vec![]), |e| matches!(e, HaError::Generation { .. })),
        (HOSTS[2], frame(g, 900, vec![]), |e| matches!(e, HaError::NotFromPrimary { .. })),
        (p, HaMessage::TookOver { vm: VM, generation: g }, |e| matches!(e, HaError::NotForHost)),
        (p, HaMessage::Seal { vm: VmId(77), generation: g }, |e| matches!(e, HaError::WrongVm { .. })),
    ];
    for (from, msg, expected) in cases {
        let before = w.host(s).pair.clone();
        let e = w.host_mut(s).pair.on_message(from, &msg, 0).unwrap_err();
        assert!(expected(&e), "{e:?}");
        assert_eq!(w.host(s).pair, before, "{e}");
    }
    let e = w.host_mut(s).pair.on_message(p, &frame(g + 1, 900, vec![]), 0).unwrap_err();
    assert_eq!(
        refusal_message(VM, &frame(g + 1, 900, vec![]), &e)
            .map(|m| matches!(m, HaMessage::Refused { refusal: HaRefusal::Generation { .. }, .. })),
        Some(true)
    );
    let bad_record = HaPairRecord { standby: Some(s), primary: s, ..w.latest().clone() };
    assert!(matches!(w.host_mut(p).pair.on_record(&bad_record, 0), Err(HaError::BadRecord(_))));
    assert!(matches!(w.host_mut(s).pair.on_output(1, vec![], 0), Err(HaError::NotPrimary)));
    let issued = primary_of(&w, p).unwrap().issued;
    assert!(matches!(w.host_mut(p).pair.on_output(issued + 5, vec![], 0), Err(HaError::OutputOrder { .. })));
    let own = HaCommand::Create { vm: VmId(2), primary: p, standby: Some(p), mode: REDUNDANT };
    assert!(matches!(w.leader.core.check(&own), Err(PairError::Invalid(_))));
    let mut draining = w.host_infos();
    draining[2].draining = true;
    let onto = HaCommand::Create { vm: VmId(2), primary: p, standby: Some(HOSTS[2]), mode: REDUNDANT };
    assert_eq!(apply(None, &onto, &draining), Err(PairError::StandbyDraining { host: HOSTS[2] }));
    let r = w.settle_and_check();
    expect(&w, r);
}
