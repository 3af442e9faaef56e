//! The simulated world of the volume model: nodes on the pure cores, a catalog with
//! compare-and-set, a lossy network, and a seeded scheduler. See the parent module.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use haven_proto::volume::ResyncProgress;
use haven_proto::{NodeId, VolumeId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::store::{is_data, Store, WriteId, ZEROING};
use super::BLOCKS;
use crate::volume::core::ack::{AckDecision, PendingWrite};
use crate::volume::core::cursor::{transfer_plan, Cursor};
use crate::volume::core::lease::{Grants, ReadLease};
use crate::volume::core::primary::{CopyState, FollowKind, Followers, Forward};
use crate::volume::core::sequencer::{Admit, SeqCore};

/// What a point writes: blocks (block, point, write), or a range zeroing as the real replica
/// sends it (`ReplicateZero`).
#[derive(Debug, Clone)]
enum Payload {
    Blocks(Vec<(u64, u64, WriteId)>),
    Zero { first: u64, count: u64, point: u64, write: WriteId },
}

impl Payload {
    fn has_write(&self, write: WriteId) -> bool {
        match self {
            Self::Blocks(b) => b.iter().any(|(_, _, w)| *w == write),
            Self::Zero { write: w, .. } => *w == write,
        }
    }

    /// The sequencer driver's apply (`StoreOp::Blocks` or `StoreOp::Zero`).
    fn apply_to(&self, store: &mut Store) {
        match self {
            Self::Blocks(b) => store.apply(b),
            Self::Zero { first, count, point, write } => store.zero_range(*first, *count, *point, *write),
        }
    }
}

/// Milliseconds a primary waits for a replica's acknowledgement.
const ACK_TIMEOUT_MS: u64 = 60;
/// Blocks per resync chunk: small, so transfers get interrupted mid-way.
const CHUNK_BLOCKS: usize = 2;
/// A read lease, and the margin the leader adds before taking it away (the model's clocks
/// agree, so the margin only keeps the arithmetic honest).
const LEASE_MS: u64 = 80;
const LEASE_MARGIN_MS: u64 = 5;
/// The model's one volume, as the leader's lease bookkeeping names it.
const VOL: VolumeId = VolumeId(1);

#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Synchronous replicas (1 or 3); one more node holds the async copy.
    pub replicas: usize,
    /// Scheduler steps with faults and operations, before the healing phase.
    pub steps: usize,
    /// Primaries serve reads only under a read lease, and failover waits for it to lapse
    /// (`volume::core::lease`). Off: the code before issue 11's race 4 was fixed (and no
    /// replica serves reads).
    pub read_leases: bool,
    /// In-sync replicas that are not primary also serve reads under a read lease (issue 13).
    pub replica_reads: bool,
    /// Every change removing a host from the in-sync set waits until the leader has stopped
    /// granting it leases and its lease has lapsed (`Grants::revoke`). Off: removals commit at
    /// once, as before replicas served reads (failover still waits for the old primary's).
    pub drop_waits: bool,
    /// The Raft leader changes now and then: the new one knows no lease request and counts
    /// from its election.
    pub elections: bool,
    /// Clients also zero block ranges (TRIM / WRITE_ZEROES, replicated as one range per point).
    /// Off: the schedules as they were before range zeroing existed.
    pub zeroings: bool,
    /// A primary steps down before proposing a reversal, and one whose proposal's outcome it
    /// never learned settles it with a compare-and-set before serving again (`volume::reversal`).
    /// Off: the driver before the fix, which went on acknowledging writes after a reversal
    /// that timed out on its side and committed later (chaos `volume-operations`, seed 3).
    pub reverse_fence: bool,
    /// A node's catalog observation may see an older catalog than the leader's (its Raft log
    /// applied behind), as `VolumeReplica::observe` can. Off: every observation is current (the
    /// schedules before lagging views existed).
    pub lagging_views: bool,
    /// A primary keeps its reversal marker after a refused settle until its own view is past
    /// the epoch, and takes over at no epoch while the marker stands. Off: the driver's second
    /// try, which cleared the marker on a refusal (chaos `volume-operations`, seed 3, again).
    pub marker_until_seen: bool,
}

impl Config {
    pub fn new(replicas: usize) -> Self {
        assert!(replicas == 1 || replicas == 3, "the model runs 1 or 3 replicas");
        Self {
            replicas,
            steps: 300,
            read_leases: true,
            zeroings: true,
            replica_reads: true,
            drop_waits: true,
            elections: true,
            reverse_fence: true,
            lagging_views: true,
            marker_until_seen: true,
        }
    }

    /// The schedules as they were before replicas served reads (seeds found then replay).
    pub fn before_replica_reads(replicas: usize) -> Self {
        Self { replica_reads: false, drop_waits: false, elections: false, lagging_views: false, ..Self::new(replicas) }
    }
}

/// What a run did (summed over seeds to show the schedules cover every operation).
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub acked: u64,
    pub unknown: u64,
    pub reads: u64,
    pub reads_refused: u64,
    pub replica_reads: u64,
    pub drop_waits: u64,
    pub elections: u64,
    pub failovers: u64,
    pub snapshots: u64,
    pub rollbacks: u64,
    pub resyncs: u64,
    pub zeroings: u64,
    pub reversals: u64,
    pub reversals_unanswered: u64,
    pub settled_reversals: u64,
    pub crashes: u64,
    pub cuts: u64,
    pub dropped: u64,
    pub duplicated: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        for ((_, a), (_, b)) in self.counts_mut().into_iter().zip(o.counts()) {
            *a += b;
        }
    }

    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        let mut c = self.clone();
        c.counts_mut().into_iter().map(|(n, v)| (n, *v)).collect()
    }

    fn counts_mut(&mut self) -> Vec<(&'static str, &mut u64)> {
        vec![
            ("acknowledged write", &mut self.acked),
            ("write with an unknown outcome", &mut self.unknown),
            ("read", &mut self.reads),
            ("read refused without a lease", &mut self.reads_refused),
            ("read served by an in-sync replica", &mut self.replica_reads),
            ("in-sync removal waiting out a lease", &mut self.drop_waits),
            ("leader election", &mut self.elections),
            ("failover", &mut self.failovers),
            ("snapshot", &mut self.snapshots),
            ("rollback", &mut self.rollbacks),
            ("finished resync", &mut self.resyncs),
            ("range zeroing", &mut self.zeroings),
            ("reversal", &mut self.reversals),
            ("reversal proposed with its answer lost", &mut self.reversals_unanswered),
            ("lost reversal settled by keeping the volume", &mut self.settled_reversals),
            ("crash", &mut self.crashes),
            ("link cut", &mut self.cuts),
            ("dropped message", &mut self.dropped),
            ("duplicated message", &mut self.duplicated),
        ]
    }
}

#[derive(Debug, Clone)]
enum Msg {
    Replicate { epoch: u64, point: u64, payload: Payload, fwd: Option<Forward>, write: WriteId },
    Reply { ok: bool, point: u64, fwd: Option<Forward>, write: WriteId },
}

#[derive(Debug, Clone)]
struct Packet {
    from: usize,
    to: usize,
    at: u64,
    msg: Msg,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Catalog {
    pub epoch: u64,
    pub primary: usize,
    pub replicas: Vec<usize>,
    pub in_sync: Vec<usize>,
    /// The async (DR) relationship's target.
    pub async_target: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    Primary { epoch: u64 },
    Replica,
}

/// A write the primary waits to acknowledge (`core::ack`), and when it gives up waiting.
#[derive(Debug)]
struct Inflight {
    w: PendingWrite,
    deadline: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Prepare,
    Begin,
    Chunks,
    Finish,
}

#[derive(Debug)]
struct Resync {
    epoch: u64,
    phase: Phase,
    base: Option<(u64, u64)>,
    resume: Option<(u64, u64)>,
    target: u64,
    to_send: Vec<u64>,
    sent: usize,
}

#[derive(Debug)]
struct Node {
    up: bool,
    store: Store,
    seq: SeqCore<Payload>,
    role: Role,
    view: Catalog,
    /// Points this node must answer once applied: point → (requester, forward, write).
    owed: BTreeMap<u64, Vec<(usize, Option<Forward>, WriteId)>>,
    next: u64,
    followers: Followers,
    inflight: BTreeMap<WriteId, Inflight>,
    resyncs: BTreeMap<usize, Resync>,
    lease: ReadLease,
    /// Primary only: the newest point handed to a range zeroing (`VolumeReplica::last_zero_seq`).
    last_zero: u64,
    /// Primary only: a rollback holding the I/O gate until it has dropped these replicas (which
    /// refused it) at this epoch; no write, snapshot or takeover meanwhile.
    gate_drop: Option<(Vec<usize>, u64)>,
    /// A reversal this node proposed at this epoch, with an outcome it has not learned
    /// (persisted: survives a crash).
    unsettled: Option<u64>,
}

impl Node {
    fn new(view: Catalog) -> Self {
        Self {
            up: true,
            store: Store::default(),
            seq: SeqCore::new(0, 1),
            role: Role::Replica,
            view,
            owed: BTreeMap::new(),
            next: 1,
            followers: Followers::default(),
            inflight: BTreeMap::new(),
            resyncs: BTreeMap::new(),
            lease: ReadLease::default(),
            last_zero: 0,
            gate_drop: None,
            unsettled: None,
        }
    }

    fn applied(&self) -> u64 {
        self.seq.next() - 1
    }

    fn epoch_seen(&self) -> u64 {
        self.seq.epoch().max(self.view.epoch)
    }
}

pub struct World {
    cfg: Config,
    rng: StdRng,
    now: u64,
    base: Instant,
    nodes: Vec<Node>,
    cat: Catalog,
    net: Vec<Packet>,
    cut: BTreeSet<(usize, usize)>,
    /// The write order of the current lineage: what the newest primary holds, point by point.
    lineage: BTreeMap<u64, Payload>,
    /// The node whose history the lineage is (the last to adopt or roll back).
    head: Option<usize>,
    /// Acknowledged writes a rollback has not removed: write → (point, epoch, node).
    acked: Acked,
    /// A rollback whose primary still waits to drop replicas that refused it: the lineage and
    /// acknowledged writes from before it (a takeover meanwhile may bring them back).
    rollback_in_doubt: Option<(BTreeMap<u64, Payload>, Acked)>,
    /// The blocks each write went to: (first, count, a range zeroing).
    write_block: BTreeMap<WriteId, (u64, u64, bool)>,
    /// The leader's record of lease requests and revocations.
    grants: Grants,
    /// A reversal proposed and not yet committed or refused: (from, to, expected epoch).
    pending_reverse: Option<(usize, usize, u64)>,
    /// Catalogs as observed so far, by epoch: what a lagging node may still see.
    history: BTreeMap<u64, Catalog>,
    /// When the current leader was elected (the first at the start).
    leading_since: Instant,
    next_renewal: u64,
    ack_epochs: BTreeMap<u64, usize>,
    next_write: WriteId,
    next_snapshot: u64,
    pub stats: Stats,
    /// With `HAVEN_MODEL_TRACE` set, every step's story, printed with a violation.
    trace: Option<Vec<String>>,
}

type Check = Result<(), String>;

/// Acknowledged writes: write → (point, epoch, node).
type Acked = BTreeMap<WriteId, (u64, u64, usize)>;

impl World {
    pub fn new(cfg: Config, seed: u64) -> Self {
        let base = Instant::now();
        let replicas: Vec<usize> = (0..cfg.replicas).collect();
        let cat =
            Catalog { epoch: 1, primary: 0, replicas: replicas.clone(), in_sync: replicas, async_target: cfg.replicas };
        let nodes = (0..=cfg.replicas).map(|_| Node::new(cat.clone())).collect();
        Self {
            cfg,
            rng: StdRng::seed_from_u64(seed),
            now: 0,
            base,
            nodes,
            cat,
            net: Vec::new(),
            cut: BTreeSet::new(),
            lineage: BTreeMap::new(),
            head: None,
            acked: BTreeMap::new(),
            rollback_in_doubt: None,
            write_block: BTreeMap::new(),
            grants: Grants::default(),
            pending_reverse: None,
            history: BTreeMap::new(),
            leading_since: base,
            next_renewal: 0,
            ack_epochs: BTreeMap::new(),
            next_write: 1,
            next_snapshot: 1,
            stats: Stats::default(),
            trace: std::env::var_os("HAVEN_MODEL_TRACE").map(|_| Vec::new()),
        }
    }

    /// The seeded schedule: faults and operations, then heal and check.
    pub fn run(&mut self) -> Result<Stats, String> {
        let result = self.run_inner();
        if let (Err(_), Some(trace)) = (&result, &self.trace) {
            eprintln!("{}", trace.join("\n"));
        }
        result
    }

    fn run_inner(&mut self) -> Result<Stats, String> {
        for n in 0..self.nodes.len() {
            self.observe(n)?;
        }
        for _ in 0..self.cfg.steps {
            self.now += self.rng.random_range(0..4);
            self.renew_due();
            self.random_step()?;
        }
        self.log(|| "---- heal and settle".into());
        self.heal_and_settle()?;
        self.final_check()?;
        Ok(self.stats.clone())
    }

    fn log(&mut self, line: impl FnOnce() -> String) {
        if let Some(t) = self.trace.as_mut() {
            t.push(format!("{:>6} {}", self.now, line()));
        }
    }

    fn random_step(&mut self) -> Check {
        let n = self.rng.random_range(0..self.nodes.len());
        // Mostly the primary acts; sometimes a node that merely believes it is primary.
        let p = if self.rng.random_bool(0.9) { self.cat.primary } else { n };
        let roll = self.rng.random_range(0..100);
        match roll {
            0..28 => self.deliver_one(),
            37..40 if self.cfg.zeroings => {
                let first = self.rng.random_range(0..BLOCKS);
                let count = self.rng.random_range(1..=BLOCKS - first);
                self.client_zero(p, first, count)
            }
            28..40 => {
                let block = self.rng.random_range(0..BLOCKS);
                self.client_write(p, block)
            }
            40..46 => {
                // Reads go to whichever node believes it is primary, as a client's cached route
                // would.
                let block = self.rng.random_range(0..BLOCKS);
                let at = if self.rng.random_bool(0.5) { p } else { n };
                self.client_read(at, block)
            }
            46..53 => self.observe(n),
            53..57 => self.timeouts(),
            57..72 => self.resync_step(p),
            72..73 => self.crash(n),
            73..77 => self.restart(n),
            77..79 => self.cut_link(n),
            79..83 => self.heal_link(),
            83..86 => self.failover(),
            86..89 => self.snapshot(p),
            89..91 => self.rollback(p),
            91..93 => self.reverse(p, None),
            93..94 => {
                self.commit_pending_reverse();
                Ok(())
            }
            94..95 if self.cfg.elections => self.elect(),
            _ => {
                self.now += ACK_TIMEOUT_MS / 2;
                self.timeouts()
            }
        }
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_millis(self.now)
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.nodes[a].up && self.nodes[b].up && !self.cut.contains(&(a.min(b), a.max(b)))
    }

    // ---- network -------------------------------------------------------------------------

    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        if self.rng.random_range(0..100) < 3 {
            self.stats.dropped += 1;
            return;
        }
        let at = self.now + self.rng.random_range(1..30);
        self.net.push(Packet { from, to, at, msg });
    }

    fn deliver_one(&mut self) -> Check {
        if self.net.is_empty() {
            return Ok(());
        }
        // Any packet may go next: delivery order is the scheduler's choice.
        let i = self.rng.random_range(0..self.net.len());
        let p = self.net.swap_remove(i);
        self.now = self.now.max(p.at);
        if self.rng.random_range(0..100) < 3 {
            self.stats.duplicated += 1;
            self.net.push(p.clone());
        }
        if !self.reachable(p.from, p.to) {
            self.stats.dropped += 1;
            return Ok(());
        }
        self.dispatch(p)
    }

    /// Hand a delivered packet to its receiver.
    fn dispatch(&mut self, p: Packet) -> Check {
        match p.msg {
            Msg::Replicate { epoch, point, payload, fwd, write } => {
                self.on_replicate(p.to, p.from, epoch, point, payload, fwd, write);
                Ok(())
            }
            Msg::Reply { ok, point, fwd, write } => self.on_reply(p.to, p.from, ok, point, fwd, write),
        }
    }

    // ---- replica side ----------------------------------------------------------------------

    /// `check_epoch` of the device handler: refuse older epochs, remember newer ones.
    fn check_epoch(&mut self, n: usize, epoch: u64) -> bool {
        let node = &mut self.nodes[n];
        if epoch < node.epoch_seen() {
            return false;
        }
        node.seq.observe_epoch(epoch);
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn on_replicate(
        &mut self,
        n: usize,
        from: usize,
        epoch: u64,
        point: u64,
        payload: Payload,
        fwd: Option<Forward>,
        write: WriteId,
    ) {
        if !self.check_epoch(n, epoch) {
            return self.send(n, from, Msg::Reply { ok: false, point, fwd, write });
        }
        match self.nodes[n].seq.admit(epoch, point, payload, |_, _| {}) {
            Err(_) => self.send(n, from, Msg::Reply { ok: false, point, fwd, write }),
            Ok(Admit::AlreadyApplied) => self.send(n, from, Msg::Reply { ok: true, point, fwd, write }),
            Ok(Admit::Queued { .. }) => {
                self.nodes[n].owed.entry(point).or_default().push((from, fwd, write));
                self.drain(n);
            }
        }
    }

    /// Apply every ready batch and answer its points (the sequencer driver's `drain`).
    fn drain(&mut self, n: usize) {
        loop {
            let batch = self.nodes[n].seq.take_ready();
            if batch.is_empty() {
                return;
            }
            for (_, p) in &batch {
                p.apply_to(&mut self.nodes[n].store);
            }
            self.nodes[n].seq.applied(batch.len() as u64);
            for (point, _) in batch {
                self.answer(n, point, true);
            }
        }
    }

    fn answer(&mut self, n: usize, point: u64, ok: bool) {
        for (to, fwd, write) in self.nodes[n].owed.remove(&point).unwrap_or_default() {
            if to == n {
                if let Some(i) = self.nodes[n].inflight.get_mut(&write) {
                    i.w.local(ok);
                }
            } else {
                self.send(n, to, Msg::Reply { ok, point, fwd, write });
            }
        }
    }

    fn discard(&mut self, n: usize, points: Vec<(u64, Payload)>) {
        for (point, _) in points {
            self.answer(n, point, false);
        }
    }

    /// `Adopt` and `RollbackTo` at a replica: truncate to `point`, refusing if behind it or if
    /// the view there is not exact (then it is dropped from the in-sync set and resynced).
    fn truncate_at(&mut self, n: usize, epoch: u64, point: u64) -> bool {
        if !self.check_epoch(n, epoch) || self.nodes[n].applied() < point {
            return false;
        }
        if self.nodes[n].applied() > point && !self.nodes[n].store.exact_at(point) {
            return false;
        }
        let discarded = self.nodes[n].seq.reset(epoch, point + 1);
        self.discard(n, discarded);
        self.nodes[n].store.rollback(point);
        true
    }

    // ---- primary side: writes --------------------------------------------------------------

    fn client_write(&mut self, n: usize, block: u64) -> Check {
        self.order(n, block, 1, |point, write| Payload::Blocks(vec![(block, point, write)]))
    }

    /// A TRIM / WRITE_ZEROES of `count` blocks from `first`: one point, replicated as a range.
    fn client_zero(&mut self, n: usize, first: u64, count: u64) -> Check {
        if matches!(self.nodes[n].role, Role::Primary { .. }) && self.nodes[n].up {
            self.stats.zeroings += 1;
            self.nodes[n].last_zero = self.nodes[n].next;
        }
        self.order(n, first, count, |point, write| Payload::Zero { first, count, point, write })
    }

    /// The primary's `order`: one point for `payload`, applied here and replicated.
    fn order(&mut self, n: usize, first: u64, count: u64, payload: impl Fn(u64, WriteId) -> Payload) -> Check {
        let Role::Primary { epoch } = self.nodes[n].role else { return Ok(()) };
        if !self.nodes[n].up || self.nodes[n].gate_drop.is_some() {
            return Ok(()); // a rollback holds the gate: the write waits (here: is not issued)
        }
        let point = self.nodes[n].next;
        let zeroing = matches!(payload(point, 0), Payload::Zero { .. });
        let write = self.next_write | if zeroing { ZEROING } else { 0 };
        self.next_write += 1;
        self.nodes[n].next += 1;
        let payload = payload(point, write);
        self.write_block.insert(write, (first, count, zeroing));
        self.log(|| format!("n{n} write {write} blocks {first}+{count} at point {point} epoch {epoch}"));
        if self.is_head(n) {
            self.lineage.insert(point, payload.clone());
        }
        let now = self.instant();
        for fwd in self.nodes[n].followers.forward(point, 4096, now) {
            let msg = Msg::Replicate { epoch, point, payload: payload.clone(), fwd: Some(fwd), write };
            self.send(n, fwd.host.0 as usize, msg);
        }
        let others: Vec<usize> = self.nodes[n].view.in_sync.iter().copied().filter(|h| *h != n).collect();
        let deadline = self.now + ACK_TIMEOUT_MS;
        let inflight =
            Inflight { w: PendingWrite::new(point, epoch, others.iter().map(|h| NodeId(*h as u64))), deadline };
        self.nodes[n].inflight.insert(write, inflight);
        for h in others {
            self.send(n, h, Msg::Replicate { epoch, point, payload: payload.clone(), fwd: None, write });
        }
        match self.nodes[n].seq.admit(epoch, point, payload, |_, _| {}) {
            Err(_) => self.nodes[n].inflight.get_mut(&write).expect("just added").w.local(false),
            Ok(Admit::AlreadyApplied) => self.nodes[n].inflight.get_mut(&write).expect("just added").w.local(true),
            Ok(Admit::Queued { .. }) => {
                self.nodes[n].owed.entry(point).or_default().push((n, None, write));
                self.drain(n);
            }
        }
        self.try_complete(n, write)
    }

    fn on_reply(&mut self, n: usize, from: usize, ok: bool, point: u64, fwd: Option<Forward>, write: WriteId) -> Check {
        if let Some(fwd) = fwd {
            if matches!(self.nodes[n].role, Role::Primary { .. }) {
                self.nodes[n].followers.forwarded(fwd, point, ok);
            }
            return Ok(());
        }
        let Some(i) = self.nodes[n].inflight.get_mut(&write) else { return Ok(()) };
        i.w.reply(NodeId(from as u64), ok);
        self.try_complete(n, write)
    }

    fn timeouts(&mut self) -> Check {
        self.forward_timeouts();
        self.gate_drops();
        for n in 0..self.nodes.len() {
            let late: Vec<WriteId> =
                self.nodes[n].inflight.iter().filter(|(_, w)| w.deadline <= self.now).map(|(id, _)| *id).collect();
            for write in late {
                self.nodes[n].inflight.get_mut(&write).expect("listed").w.expire();
                self.try_complete(n, write)?;
            }
        }
        Ok(())
    }

    /// Rollbacks holding the gate for a drop: try the drop again (it commits once the leader's
    /// wait is over; refused, the rollback ends with an error, as `drop_in_sync`'s caller does).
    fn gate_drops(&mut self) {
        for n in 0..self.nodes.len() {
            let Some((failed, epoch)) = self.nodes[n].gate_drop.clone() else { continue };
            match self.drop_in_sync(n, &failed, epoch) {
                Dropped::Wait => {}
                Dropped::Yes => {
                    self.nodes[n].gate_drop = None;
                    self.rollback_in_doubt = None; // done: no replica that refused it counts
                }
                // Replaced meanwhile: the takeover decides which history stands.
                Dropped::No => self.nodes[n].gate_drop = None,
            }
        }
    }

    /// A forwarded write unanswered for 5 acknowledgement timeouts failed (the driver's send
    /// timeout), which breaks the copy.
    fn forward_timeouts(&mut self) {
        let now = self.instant();
        let limit = Duration::from_millis(5 * ACK_TIMEOUT_MS);
        for n in 0..self.nodes.len() {
            let late: Vec<(Forward, u64)> = self.nodes[n]
                .followers
                .iter()
                .flat_map(|(host, f)| {
                    let fwd = Forward { host, generation: f.generation() };
                    f.outstanding.iter().filter(move |(_, (_, at))| now - *at >= limit).map(move |(seq, _)| (fwd, *seq))
                })
                .collect();
            for (fwd, seq) in late {
                self.nodes[n].followers.forwarded(fwd, seq, false);
            }
        }
    }

    /// Acknowledge a write once every in-sync replica answered, dropping the ones that failed
    /// from the in-sync set first (the primary's `write`, deciding through `core::ack`).
    fn try_complete(&mut self, n: usize, write: WriteId) -> Check {
        let Some(decision) = self.nodes[n].inflight[&write].w.decision() else { return Ok(()) };
        let acked = match decision {
            AckDecision::Ack => true,
            AckDecision::DropThenAck(failed) => {
                let failed: Vec<usize> = failed.iter().map(|h| h.0 as usize).collect();
                let epoch = self.nodes[n].inflight[&write].w.epoch;
                match self.drop_in_sync(n, &failed, epoch) {
                    Dropped::Yes => true,
                    Dropped::No => false,
                    // The proposal waits out their leases; the write stays in flight (retried
                    // at the next timeouts).
                    Dropped::Wait => return Ok(()),
                }
            }
            AckDecision::Unknown => false,
        };
        let w = self.nodes[n].inflight.remove(&write).expect("present").w;
        if !acked {
            self.stats.unknown += 1;
            return Ok(());
        }
        self.acknowledge(n, write, w.point, w.epoch)
    }

    fn acknowledge(&mut self, n: usize, write: WriteId, point: u64, epoch: u64) -> Check {
        self.log(|| format!("n{n} ACK write {write} point {point} epoch {epoch}"));
        self.stats.acked += 1;
        if let Some(other) = self.ack_epochs.insert(epoch, n).filter(|o| *o != n) {
            return Err(format!("nodes {other} and {n} both acknowledged writes in epoch {epoch}"));
        }
        if !self.lineage.get(&point).is_some_and(|p| p.has_write(write)) {
            return Err(format!(
                "node {n} acknowledged write {write} at point {point}, which the lineage does not hold"
            ));
        }
        self.acked.insert(write, (point, epoch, n));
        Ok(())
    }

    /// Propose dropping `hosts` from the in-sync set: out when it returns, or not, or the
    /// leader is still waiting out their read leases.
    fn drop_in_sync(&mut self, n: usize, hosts: &[usize], epoch: u64) -> Dropped {
        let cur = self.cat.clone();
        if cur.primary != n {
            return Dropped::No;
        }
        if !hosts.iter().any(|h| cur.in_sync.contains(h)) {
            return Dropped::Yes;
        }
        if cur.epoch != epoch && cur.epoch != self.nodes[n].view.epoch {
            return Dropped::No;
        }
        let in_sync: Vec<usize> = cur.in_sync.iter().copied().filter(|h| !hosts.contains(h)).collect();
        if !self.shrink_ready(cur.epoch, &in_sync) {
            return Dropped::Wait;
        }
        self.log(|| format!("n{n} drops {hosts:?} from in-sync (epoch {})", cur.epoch));
        match self.set_replication(n, cur.epoch, n, in_sync) {
            Some(_) => Dropped::Yes,
            None => Dropped::No,
        }
    }

    /// The leader's side of a change leaving `after` in sync (`Proposer::revoke_read_leases`):
    /// true once it may commit, i.e. no host it removes can still hold a read lease. The first
    /// call stops the leader granting them one.
    fn shrink_ready(&mut self, expected: u64, after: &[usize]) -> bool {
        if !(self.cfg.read_leases && self.cfg.drop_waits) || self.cat.epoch != expected {
            return true;
        }
        let removed: Vec<usize> = self.cat.in_sync.iter().copied().filter(|h| !after.contains(h)).collect();
        let (now, since) = (self.instant(), self.leading_since);
        let lapse = Duration::from_millis(LEASE_MS + LEASE_MARGIN_MS);
        let wait = removed
            .iter()
            .map(|h| self.grants.revoke(NodeId(*h as u64), VOL, expected, since, now, lapse))
            .max()
            .unwrap_or_default();
        if !wait.is_zero() {
            self.stats.drop_waits += 1;
            self.log(|| format!("leader waits {wait:?} before removing {removed:?} from in-sync"));
        }
        wait.is_zero()
    }

    /// The catalog's compare-and-set; the proposer takes the new record in (`set_record`).
    /// Callers that may shrink the in-sync set ask [`Self::shrink_ready`] first.
    fn set_replication(&mut self, by: usize, expected: u64, primary: usize, in_sync: Vec<usize>) -> Option<u64> {
        if self.cat.epoch != expected {
            return None;
        }
        self.cat.primary = primary;
        self.cat.in_sync = in_sync;
        self.cat.epoch += 1;
        self.set_record(by);
        Some(self.cat.epoch)
    }

    fn set_record(&mut self, n: usize) {
        let cat = self.cat.clone();
        let node = &mut self.nodes[n];
        if matches!(node.role, Role::Primary { .. }) && cat.primary == n {
            node.role = Role::Primary { epoch: cat.epoch };
        }
        node.seq.observe_epoch(cat.epoch);
        node.view = cat;
    }

    fn is_head(&self, n: usize) -> bool {
        self.head == Some(n)
    }

    // ---- catalog observation and takeover ------------------------------------------------------

    /// The host supervisor's `observe`: take in the catalog, adopt when it names us primary.
    fn observe(&mut self, n: usize) -> Check {
        if !self.nodes[n].up {
            return Ok(());
        }
        let cat = self.observed_catalog(n);
        let node = &mut self.nodes[n];
        if cat.epoch >= node.view.epoch {
            node.view = cat.clone();
        }
        node.seq.observe_epoch(cat.epoch);
        let is_primary = cat.primary == n;
        if node.unsettled.is_some_and(|e| cat.epoch > e) {
            node.unsettled = None; // the epoch moved on: the reversal can no longer commit
        }
        if is_primary && node.unsettled.is_some() {
            return self.settle_reverse(n);
        }
        if is_primary && node.role != (Role::Primary { epoch: cat.epoch }) {
            self.adopt(n, cat.epoch)?;
        } else if !is_primary && matches!(node.role, Role::Primary { .. }) {
            self.demote(n);
        }
        if matches!(self.nodes[n].role, Role::Primary { .. }) {
            let targets = [(NodeId(cat.async_target as u64), u64::MAX)];
            self.nodes[n].followers.retain_wanted(&ids(&cat.replicas), &ids(&cat.in_sync), &targets);
        }
        Ok(())
    }

    /// The catalog node `n`'s observation sees: the current one, or (with lagging views) one
    /// at or after its view that its log has not applied past yet.
    fn observed_catalog(&mut self, n: usize) -> Catalog {
        self.history.insert(self.cat.epoch, self.cat.clone());
        if !self.cfg.lagging_views || self.rng.random_bool(0.7) {
            return self.cat.clone();
        }
        let seen: Vec<&Catalog> = self.history.range(self.nodes[n].view.epoch..).map(|(_, c)| c).collect();
        seen[self.rng.random_range(0..seen.len())].clone()
    }

    fn demote(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        node.role = Role::Replica;
        node.gate_drop = None;
        node.followers.clear();
        node.resyncs.clear();
        self.stats.unknown += node.inflight.len() as u64;
        node.inflight.clear();
    }

    /// Become primary at `epoch` (the replica's `adopt`): fence, truncate the others to our last
    /// point, then hand out points after it.
    fn adopt(&mut self, n: usize, epoch: u64) -> Check {
        if !self.nodes[n].inflight.is_empty() || self.nodes[n].gate_drop.is_some() {
            return Ok(()); // the I/O gate: wait for writes in flight
        }
        let view = &self.nodes[n].view;
        let marked = self.cfg.marker_until_seen && self.nodes[n].unsettled.is_some();
        if view.epoch != epoch || view.primary != n || marked {
            return Ok(()); // `VolumeReplica::adopt` re-checks its newest record
        }
        let fenced = self.nodes[n].seq.fence(epoch);
        self.discard(n, fenced);
        let last = self.nodes[n].applied();
        let others: Vec<usize> = self.nodes[n].view.in_sync.iter().copied().filter(|h| *h != n).collect();
        let failed: Vec<usize> =
            others.into_iter().filter(|h| !(self.reachable(n, *h) && self.truncate_at(*h, epoch, last))).collect();
        if !failed.is_empty() {
            self.drop_in_sync(n, &failed, epoch);
            return Ok(()); // the epoch moved on; the next observe adopts again
        }
        let node = &mut self.nodes[n];
        node.next = last + 1;
        node.role = Role::Primary { epoch };
        self.log(|| format!("n{n} ADOPTED epoch {epoch} at point {last}"));
        self.resolve_rollback_in_doubt(n, last);
        self.new_lineage(n, last, "took over")
    }

    /// `n` now holds the lineage up to `last`: everything acknowledged must be in it, and its
    /// content must be the lineage's.
    fn new_lineage(&mut self, n: usize, last: u64, why: &str) -> Check {
        if let Some((w, (point, _, by))) = self.acked.iter().find(|(_, (p, _, _))| *p > last) {
            return Err(format!(
                "node {n} {why} at point {last}, losing write {w} acknowledged by node {by} at point {point}"
            ));
        }
        self.lineage.split_off(&(last + 1));
        self.head = Some(n);
        self.check_copy(n, last, why)
    }

    /// `n`'s content as of `point` must be the lineage's.
    fn check_copy(&self, n: usize, point: u64, why: &str) -> Check {
        // Zeroes are zeroes whichever zeroing left them (a copy may hold a zeroing's version
        // where the primary, holding no data there, never stored one): compare contents.
        let contents = zeroes_as_zero;
        let want = contents(self.lineage_content(point));
        let have = contents(self.nodes[n].store.content(point, BLOCKS));
        if want != have {
            return Err(format!(
                "node {n} ({why}) holds {have:?} at point {point}, but the primary's write order gives {want:?}"
            ));
        }
        Ok(())
    }

    fn lineage_content(&self, point: u64) -> Vec<WriteId> {
        content_of(&self.lineage, point)
    }

    /// A takeover while a rollback is in doubt (its primary waited to drop replicas that refused
    /// it, and was replaced meanwhile): the rollback was never acknowledged, so the new primary
    /// may hold the history from before it; then that history, and the writes acknowledged in
    /// it, are the lineage again.
    fn resolve_rollback_in_doubt(&mut self, n: usize, last: u64) {
        let Some((lineage, acked)) = self.rollback_in_doubt.take() else { return };
        let zeroed = zeroes_as_zero;
        let have = zeroed(self.nodes[n].store.content(last, BLOCKS));
        if have != zeroed(self.lineage_content(last)) && have == zeroed(content_of(&lineage, last)) {
            self.log(|| format!("n{n} takes over with the history from before the rollback in doubt"));
            self.lineage = lineage;
            self.acked = acked;
        }
    }
}

/// Zeroes are zeroes whichever zeroing left them: a content with every zeroing's write as 0.
fn zeroes_as_zero(content: Vec<WriteId>) -> Vec<WriteId> {
    content.into_iter().map(|w| if is_data(w) { w } else { 0 }).collect()
}

/// The content of every block as of `point` in `lineage`.
fn content_of(lineage: &BTreeMap<u64, Payload>, point: u64) -> Vec<WriteId> {
    let mut content = vec![0; BLOCKS as usize];
    for payload in lineage.range(..=point).map(|(_, p)| p) {
        match payload {
            Payload::Blocks(b) => {
                for &(block, _, w) in b {
                    content[block as usize] = w;
                }
            }
            Payload::Zero { first, count, write, .. } => {
                for b in (*first..first + count).filter(|b| *b < BLOCKS) {
                    if is_data(content[b as usize]) {
                        content[b as usize] = *write;
                    }
                }
            }
        }
    }
    content
}

impl World {
    /// The leader's volume controller: a primary that is down or cut off fails over to an
    /// in-sync replica that is up.
    fn failover(&mut self) -> Check {
        let p = self.cat.primary;
        if self.nodes[p].up && !self.cut_off(p) {
            return Ok(());
        }
        if !self.lease_lapsed(p) {
            return Ok(()); // the controller waits out the old primary's read lease
        }
        let candidates: Vec<usize> =
            self.cat.in_sync.iter().copied().filter(|h| *h != p && self.nodes[*h].up).collect();
        if candidates.is_empty() {
            return Ok(());
        }
        let c = candidates[self.rng.random_range(0..candidates.len())];
        let in_sync: Vec<usize> = self.cat.in_sync.iter().copied().filter(|h| *h != p).collect();
        let expected = self.cat.epoch;
        if !self.shrink_ready(expected, &in_sync) {
            return Ok(()); // waited for above; only a new leader's election can hold it back here
        }
        self.log(|| format!("FAILOVER {p} -> {c}"));
        self.cat.primary = c;
        self.cat.in_sync = in_sync;
        self.cat.epoch = expected + 1;
        self.stats.failovers += 1;
        Ok(())
    }

    /// Whether `n` is cut off from most of the cluster (and so from the catalog's leader).
    fn cut_off(&self, n: usize) -> bool {
        (0..self.nodes.len()).filter(|h| *h != n && !self.reachable(n, *h)).count() >= 2
    }

    // ---- read leases (`volume::core::lease`) ---------------------------------------------------

    /// Every host asks for its read leases each quarter lease (`volume::host`'s lease loop);
    /// an answer is instant here, or lost when the host is cut off.
    fn renew_due(&mut self) {
        if self.now < self.next_renewal {
            return;
        }
        self.next_renewal = self.now + LEASE_MS / 4;
        for n in 0..self.nodes.len() {
            if self.rng.random_bool(0.9) {
                self.renew_lease(n);
            }
        }
    }

    /// Host `n` asks the leader for read leases: the leader notes the request, and grants one
    /// for the volume if its catalog names `n` primary.
    fn renew_lease(&mut self, n: usize) {
        if !self.nodes[n].up || self.cut_off(n) {
            return;
        }
        let now = self.instant();
        let host = NodeId(n as u64);
        self.grants.record(host, now);
        let listed = if self.replica_reads() { self.cat.in_sync.contains(&n) } else { self.cat.primary == n };
        if listed && self.grants.may_grant(host, VOL, self.cat.epoch) {
            self.nodes[n].lease.granted(self.cat.epoch, now, Duration::from_millis(LEASE_MS));
        }
    }

    fn replica_reads(&self) -> bool {
        self.cfg.read_leases && self.cfg.replica_reads
    }

    /// Whether the leader's wait for `p`'s read lease is over (always, without leases).
    fn lease_lapsed(&self, p: usize) -> bool {
        let lapse = Duration::from_millis(LEASE_MS + LEASE_MARGIN_MS);
        !self.cfg.read_leases || self.grants.wait(NodeId(p as u64), self.leading_since, self.instant(), lapse).is_zero()
    }

    /// A new Raft leader: it knows no lease request or revocation, and counts from now.
    fn elect(&mut self) -> Check {
        self.log(|| "LEADER ELECTED".into());
        self.stats.elections += 1;
        self.grants = Grants::default();
        self.leading_since = self.instant();
        Ok(())
    }

    /// A client reads `block` at `n`, which serves it if it believes it is primary (and holds a
    /// read lease), or, with replica reads, if it is a replica holding a read lease at the newest
    /// epoch it knows (`VolumeReplica::read_here`). The answer must be no older than any write
    /// acknowledged before it.
    fn client_read(&mut self, n: usize, block: u64) -> Check {
        if !self.nodes[n].up {
            return Ok(());
        }
        let (epoch, who) = match self.nodes[n].role {
            Role::Primary { epoch } => (epoch, "primary"),
            Role::Replica if self.replica_reads() => (self.nodes[n].epoch_seen(), "in-sync replica"),
            Role::Replica => return Ok(()),
        };
        if self.cfg.read_leases && !self.nodes[n].lease.valid(epoch, self.instant()) {
            self.stats.reads_refused += 1;
            return Ok(());
        }
        self.stats.reads += 1;
        if who != "primary" {
            self.stats.replica_reads += 1;
        }
        self.check_read(n, block, epoch, who)
    }

    /// `n` served a read of `block` (as `who`, at `epoch` in its own view): it must not be older
    /// than a write acknowledged before it.
    fn check_read(&self, n: usize, block: u64, epoch: u64, who: &str) -> Check {
        let (_, w) = self.nodes[n].store.read(block, u64::MAX);
        let seen_point = if w == 0 { Some(0) } else { self.acked.get(&w).map(|a| a.0) };
        let Some(seen_point) = seen_point else { return Ok(()) }; // not acknowledged: no promise
                                                                  // A zeroing changes only blocks holding data: one newer than a read of zeroes changed
                                                                  // nothing the read shows.
        let newer = self.acked.iter().find(|(id, (point, _, _))| {
            let (first, count, zeroing) = self.write_block[id];
            (first..first + count).contains(&block) && *point > seen_point && (!zeroing || is_data(w))
        });
        if let Some((id, (point, _, by))) = newer {
            return Err(format!(
                "node {n} ({who} at epoch {epoch} in its own view) read block {block} as write {w}, but write \
                 {id} to it was acknowledged at point {point} by node {by}: a stale read"
            ));
        }
        Ok(())
    }

    // ---- snapshots, rollback, reversal ---------------------------------------------------------

    /// The primary, with no write in flight, if `n` is one and is up.
    fn idle_primary(&self, n: usize) -> Option<u64> {
        match self.nodes[n].role {
            Role::Primary { epoch }
                if self.nodes[n].up && self.nodes[n].inflight.is_empty() && self.nodes[n].gate_drop.is_none() =>
            {
                Some(epoch)
            }
            _ => None,
        }
    }

    fn snapshot(&mut self, n: usize) -> Check {
        let Some(epoch) = self.idle_primary(n) else { return Ok(()) };
        let point = self.nodes[n].next - 1;
        let id = self.next_snapshot;
        self.next_snapshot += 1;
        self.nodes[n].store.snaps.insert(id, point);
        let mut hosts: Vec<usize> = self.nodes[n].view.in_sync.iter().copied().filter(|h| *h != n).collect();
        hosts.extend(self.nodes[n].followers.whole_copies().iter().map(|h| h.0 as usize));
        self.log(|| format!("n{n} SNAPSHOT {id} at point {point} to {hosts:?}"));
        for h in hosts {
            if self.reachable(n, h) && self.check_epoch(h, epoch) && self.nodes[h].applied() >= point {
                self.nodes[h].store.snaps.insert(id, point);
            }
        }
        self.stats.snapshots += 1;
        Ok(())
    }

    /// Roll the volume back to one of the primary's snapshots (`snapshots::rollback`).
    fn rollback(&mut self, n: usize) -> Check {
        if self.idle_primary(n).is_none() || !self.is_head(n) {
            return Ok(());
        }
        let snaps: Vec<(u64, u64)> = self.nodes[n].store.snaps.iter().map(|(i, s)| (*i, *s)).collect();
        if snaps.is_empty() {
            return Ok(());
        }
        let (id, point) = snaps[self.rng.random_range(0..snaps.len())];
        self.rollback_to(n, id, point)
    }

    fn rollback_to(&mut self, n: usize, id: u64, point: u64) -> Check {
        if self.idle_primary(n).is_none() || !self.is_head(n) {
            return Ok(());
        }
        self.log(|| format!("n{n} ROLLBACK to snapshot {id} at point {point}"));
        // A rollback starts a new epoch (`VolumeReplica::new_epoch`).
        if self.cat.primary != n {
            return Ok(());
        }
        let (expected, in_sync) = (self.cat.epoch, self.cat.in_sync.clone());
        let Some(epoch) = self.set_replication(n, expected, n, in_sync) else { return Ok(()) };
        self.nodes[n].followers.history_rewritten(point);
        let discarded = self.nodes[n].seq.reset(epoch, point + 1);
        self.discard(n, discarded);
        self.nodes[n].store.rollback(point);
        self.nodes[n].next = point + 1;
        let others: Vec<usize> = self.nodes[n].view.in_sync.iter().copied().filter(|h| *h != n).collect();
        let failed: Vec<usize> =
            others.into_iter().filter(|h| !(self.reachable(n, *h) && self.truncate_at(*h, epoch, point))).collect();
        if !failed.is_empty() && self.drop_in_sync(n, &failed, epoch) == Dropped::Wait {
            // The rollback keeps the gate until the leader let the drop commit; until then it
            // is in doubt.
            self.nodes[n].gate_drop = Some((failed, epoch));
            self.rollback_in_doubt = Some((self.lineage.clone(), self.acked.clone()));
        }
        self.acked.retain(|_, (p, _, _)| *p <= point);
        self.stats.rollbacks += 1;
        self.new_lineage(n, point, "rolled back")
    }

    /// Hand the volume to the async copy once it holds every write (1-replica volumes): the
    /// primary (holding its I/O gate) proposes the reversal; the leader commits it once the
    /// primary's read lease has lapsed, now or at a later step, and the primary may never hear
    /// back (`volume::reversal`).
    /// `answered`: whether the proposer hears back (`None`: drawn from the seed).
    fn reverse(&mut self, n: usize, answered: Option<bool>) -> Check {
        if self.cfg.replicas != 1 || self.idle_primary(n).is_none() || self.cat.primary != n {
            return Ok(());
        }
        if self.pending_reverse.is_some() || self.nodes[n].unsettled.is_some() {
            return Ok(());
        }
        let t = self.cat.async_target;
        let last = self.nodes[n].next - 1;
        if self.nodes[n].followers.caught_up(NodeId(t as u64), last) != Some(CopyState::CaughtUp) {
            return Ok(());
        }
        let epoch = self.cat.epoch;
        if answered.unwrap_or_else(|| self.rng.random_bool(0.5)) {
            // The leader is ready at once, and the answer arrives (the proposer waits for it).
            if !self.shrink_ready(epoch, &[t]) {
                return Ok(());
            }
            self.pending_reverse = Some((n, t, epoch));
            assert!(self.commit_pending_reverse(), "a ready reversal commits");
            self.demote(n);
            self.set_record(n);
            return self.observe(t);
        }
        // The answer is lost: the proposal commits now, later, or never.
        if self.cfg.reverse_fence {
            self.nodes[n].unsettled = Some(epoch);
            self.demote(n);
        }
        self.log(|| format!("n{n} proposes REVERSE -> {t} at point {last}, epoch {epoch}; the answer is lost"));
        self.pending_reverse = Some((n, t, epoch));
        self.stats.reversals_unanswered += 1;
        self.commit_pending_reverse();
        Ok(())
    }

    /// The leader's side of a pending reversal: commit it once the old primary's lease has
    /// lapsed, or refuse it if the epoch moved on. True if it committed now.
    fn commit_pending_reverse(&mut self) -> bool {
        let Some((from, to, expected)) = self.pending_reverse else { return false };
        if self.cat.epoch != expected {
            let epoch = self.cat.epoch;
            self.log(|| format!("REVERSE {from} -> {to} refused: epoch {epoch} is not {expected}"));
            self.pending_reverse = None;
            return false;
        }
        if !self.shrink_ready(expected, &[to]) {
            return false; // the primary leaves the in-sync set: its own lease first
        }
        self.cat =
            Catalog { epoch: expected + 1, primary: to, replicas: vec![to], in_sync: vec![to], async_target: from };
        self.pending_reverse = None;
        self.log(|| format!("REVERSE {from} -> {to} committed at epoch {}", expected + 1));
        self.stats.reversals += 1;
        true
    }

    /// A primary that proposed a reversal and never learned its outcome (`reversal::settle`):
    /// a compare-and-set at the proposal's epoch either keeps the volume here at a new epoch,
    /// so the reversal can no longer commit, or fails because it already did.
    fn settle_reverse(&mut self, n: usize) -> Check {
        let Some(e) = self.nodes[n].unsettled else { return Ok(()) };
        if !self.nodes[n].up || self.cut_off(n) {
            return Ok(());
        }
        let in_sync = self.cat.in_sync.clone();
        if let Some(epoch) = self.set_replication(n, e, n, in_sync) {
            self.log(|| format!("n{n} settled its reversal: still primary at epoch {epoch}"));
            self.nodes[n].unsettled = None;
            self.stats.settled_reversals += 1;
            return self.adopt(n, epoch);
        }
        if !self.cfg.marker_until_seen {
            self.nodes[n].unsettled = None; // refused: taken as settled at once
        }
        Ok(())
    }

    // ---- resync --------------------------------------------------------------------------------

    /// One step of one resync at primary `n`, starting resyncs where wanted (`resync::tick`).
    fn resync_step(&mut self, n: usize) -> Check {
        if !self.resync_tick(n) {
            return Ok(());
        }
        let hosts: Vec<usize> = self.nodes[n].resyncs.keys().copied().collect();
        if hosts.is_empty() {
            return Ok(());
        }
        let h = hosts[self.rng.random_range(0..hosts.len())];
        self.resync_run(n, h)
    }

    /// Start resyncs for listed replicas not in sync and async copies with a hole; false if
    /// `n` is not an up primary.
    fn resync_tick(&mut self, n: usize) -> bool {
        let Role::Primary { epoch } = self.nodes[n].role else { return false };
        if !self.nodes[n].up {
            return false;
        }
        let view = self.nodes[n].view.clone();
        let f = &self.nodes[n].followers;
        let mut wanted: Vec<usize> = view
            .replicas
            .iter()
            .copied()
            .filter(|h| *h != n && !view.in_sync.contains(h))
            .filter(|h| f.get(NodeId(*h as u64)).is_none_or(|f| f.broken))
            .collect();
        wanted.extend(f.broken_async().iter().map(|h| h.0 as usize));
        for h in wanted {
            self.nodes[n].resyncs.entry(h).or_insert(Resync {
                epoch,
                phase: Phase::Prepare,
                base: None,
                resume: None,
                target: 0,
                to_send: vec![],
                sent: 0,
            });
        }
        true
    }

    /// Advance primary `n`'s resync of `h` by one step; an interrupted one breaks the copy
    /// (the next tick starts it again, resuming where the replica's cursor allows).
    fn resync_run(&mut self, n: usize, h: usize) -> Check {
        if !self.nodes[n].resyncs.contains_key(&h) {
            return Ok(());
        }
        if self.resync_advance(n, h)? == Step::Interrupted {
            self.log(|| format!("n{n} resync n{h} interrupted"));
            self.nodes[n].resyncs.remove(&h);
            self.nodes[n].followers.mark_broken(NodeId(h as u64));
        }
        Ok(())
    }

    fn resync_advance(&mut self, n: usize, h: usize) -> Result<Step, String> {
        if !self.reachable(n, h) {
            return Ok(Step::Interrupted);
        }
        let r = &self.nodes[n].resyncs[&h];
        let (epoch, phase, target) = (r.epoch, r.phase, r.target);
        // A resync belongs to the epoch it started in: a rollback (or any new epoch) since then
        // may have rewritten what it prepared against (`resync::run` checks under the gate).
        if self.nodes[n].role != (Role::Primary { epoch }) {
            return Ok(Step::Interrupted);
        }
        match phase {
            Phase::Prepare => {
                let snaps: Vec<(u64, u64)> = self.nodes[n].store.snaps.iter().map(|(i, s)| (*i, *s)).collect();
                let Some((base, resume)) = self.replica_prepare(h, epoch, &snaps) else {
                    return Ok(Step::Interrupted);
                };
                let r = self.nodes[n].resyncs.get_mut(&h).expect("listed");
                (r.base, r.resume, r.phase) = (base, resume, Phase::Begin);
            }
            Phase::Begin => return self.resync_begin(n, h, epoch),
            Phase::Chunks => return self.resync_chunk(n, h, epoch, target),
            Phase::Finish => return self.resync_finish(n, h, target),
        }
        Ok(Step::Continue)
    }

    /// Step 2: pin the target point and start forwarding, with no write in flight.
    fn resync_begin(&mut self, n: usize, h: usize, epoch: u64) -> Result<Step, String> {
        if !self.nodes[n].inflight.is_empty() {
            return Ok(Step::Continue);
        }
        let target = self.nodes[n].next - 1;
        if !self.replica_receive(h, epoch, target, vec![], 0) {
            return Ok(Step::Interrupted);
        }
        let progress = ResyncProgress { target_seq: target, ..Default::default() };
        self.nodes[n].followers.start_resync(NodeId(h as u64), target, progress);
        let r = &self.nodes[n].resyncs[&h];
        let primary = &self.nodes[n].store;
        let to_send: Vec<u64> = match r.base {
            Some((_, base_seq)) => {
                let mut set = BTreeSet::new();
                for range in transfer_plan(base_seq, r.resume) {
                    set.extend(primary.changed_blocks(range.after, target).into_iter().filter(|b| range.contains(*b)));
                }
                set.into_iter().collect()
            }
            // The Merkle compare: blocks whose content differs.
            None => {
                (0..BLOCKS).filter(|b| primary.read(*b, target).1 != self.nodes[h].store.read(*b, u64::MAX).1).collect()
            }
        };
        let r = self.nodes[n].resyncs.get_mut(&h).expect("listed");
        (r.target, r.to_send, r.sent, r.phase) = (target, to_send, 0, Phase::Chunks);
        let (base, resume, to_send) = (r.base, r.resume, r.to_send.clone());
        self.log(|| format!("n{n} resync n{h} begin target {target} base {base:?} resume {resume:?} send {to_send:?}"));
        Ok(Step::Continue)
    }

    /// Step 3: one chunk of blocks as of the target.
    fn resync_chunk(&mut self, n: usize, h: usize, epoch: u64, target: u64) -> Result<Step, String> {
        if self.nodes[n].followers.get(NodeId(h as u64)).is_none_or(|f| f.broken) {
            return Ok(Step::Interrupted);
        }
        let r = &self.nodes[n].resyncs[&h];
        if r.sent >= r.to_send.len() {
            self.nodes[n].resyncs.get_mut(&h).expect("listed").phase = Phase::Finish;
            return Ok(Step::Continue);
        }
        let chunk: Vec<u64> = r.to_send[r.sent..].iter().take(CHUNK_BLOCKS).copied().collect();
        // Once a range zeroing was ordered after the target, each block travels with its later
        // versions (`resync::send_chunk`): a forwarded zeroing applied before this chunk could
        // not see the data the chunk brings.
        let with_later = self.nodes[n].last_zero > target;
        let store = &self.nodes[n].store;
        let blocks: Vec<(u64, u64, WriteId)> = chunk
            .iter()
            .flat_map(|b| {
                let (seq, w) = store.read(*b, target);
                let later = if with_later { store.versions_after(*b, target) } else { Vec::new() };
                std::iter::once((*b, seq, w)).chain(later.into_iter().map(|(s, w)| (*b, s, w)))
            })
            .collect();
        let next_block = chunk.last().map_or(0, |b| b + 1);
        if !self.replica_receive(h, epoch, target, blocks, next_block) {
            return Ok(Step::Interrupted);
        }
        self.log(|| format!("n{n} resync n{h} chunk {chunk:?} target {target}"));
        self.nodes[n].resyncs.get_mut(&h).expect("listed").sent += chunk.len();
        Ok(Step::Continue)
    }

    /// Step 4: with no write in flight and every forwarded write acknowledged, the replica
    /// joins the in-sync set (an async copy is marked caught up).
    fn resync_finish(&mut self, n: usize, h: usize, target: u64) -> Result<Step, String> {
        let hid = NodeId(h as u64);
        if !self.nodes[n].inflight.is_empty() {
            return Ok(Step::Continue);
        }
        let Some(f) = self.nodes[n].followers.get(hid) else { return Ok(Step::Interrupted) };
        if f.broken {
            return Ok(Step::Interrupted);
        }
        if !f.outstanding.is_empty() {
            return Ok(Step::Continue);
        }
        let is_async = matches!(f.kind, FollowKind::Async { .. });
        let last = self.nodes[n].next - 1;
        if !self.replica_finish(h, target, last) {
            return Ok(Step::Interrupted);
        }
        if self.is_head(n) {
            self.check_copy(h, last, "finished a resync")?;
        }
        self.log(|| format!("n{n} resync n{h} FINISHED at {last} (async {is_async})"));
        if is_async {
            let f = self.nodes[n].followers.get_mut(hid).expect("present");
            f.acked_seq = last;
            if let Some(p) = f.resync.as_mut() {
                p.done = true;
            }
        } else {
            let view = self.nodes[n].view.clone();
            let mut in_sync = view.in_sync.clone();
            in_sync.push(h);
            if self.set_replication(n, view.epoch, n, in_sync).is_none() {
                return Ok(Step::Interrupted);
            }
            self.nodes[n].followers.remove(hid);
        }
        self.nodes[n].resyncs.remove(&h);
        self.stats.resyncs += 1;
        Ok(Step::Continue)
    }

    /// Replica side of step 1 (`resync::prepare`).
    fn replica_prepare(&mut self, h: usize, epoch: u64, snaps: &[(u64, u64)]) -> Option<ResyncStart> {
        if !self.check_epoch(h, epoch) || matches!(self.nodes[h].role, Role::Primary { .. }) {
            return None;
        }
        let store = &mut self.nodes[h].store;
        if let Some(c) = store.cursor.take() {
            if c.resumable(epoch, snaps) {
                let start = (c.base, c.resume());
                store.cursor = Some(c);
                self.log(|| format!("n{h} prepared: resumes {start:?}"));
                return Some(start);
            }
        }
        let common = store.snaps.iter().map(|(i, s)| (*i, *s)).filter(|s| snaps.contains(s)).max_by_key(|(_, s)| *s);
        let next = match common {
            Some((_, seq)) => {
                store.rollback(seq);
                seq + 1
            }
            None => {
                store.rebase();
                1
            }
        };
        store.cursor = Some(Cursor::prepared(common, epoch));
        let discarded = self.nodes[h].seq.reset(epoch, next);
        self.discard(h, discarded);
        self.log(|| format!("n{h} prepared afresh: common {common:?}"));
        Some((common, None))
    }

    /// Replica side of steps 2 and 3 (`resync::receive`).
    fn replica_receive(
        &mut self,
        h: usize,
        epoch: u64,
        target: u64,
        blocks: Vec<(u64, u64, WriteId)>,
        next_block: u64,
    ) -> bool {
        if !self.check_epoch(h, epoch) {
            return false;
        }
        let Some(mut cursor) = self.nodes[h].store.cursor.take() else { return false };
        let discarded = if cursor.begin(target) {
            self.nodes[h].seq.reset(epoch, target + 1)
        } else {
            self.nodes[h].seq.advance_to(target + 1)
        };
        self.discard(h, discarded);
        if !blocks.is_empty() {
            self.nodes[h].store.apply_capped(&blocks, target);
            cursor.received_below(next_block);
        }
        self.nodes[h].store.cursor = Some(cursor);
        self.drain(h);
        true
    }

    /// Replica side of step 4 (`resync::finish`).
    fn replica_finish(&mut self, h: usize, target: u64, last: u64) -> bool {
        let node = &mut self.nodes[h];
        if node.store.cursor.as_ref().map(|c| c.target) != Some(target) || node.applied() < last {
            return false;
        }
        node.store.hwm = node.store.hwm.max(node.applied());
        node.store.cursor = None;
        true
    }

    // ---- faults ----------------------------------------------------------------------------------

    fn crash(&mut self, n: usize) -> Check {
        if !self.nodes[n].up {
            return Ok(());
        }
        self.stats.crashes += 1;
        self.log(|| format!("n{n} CRASH"));
        let node = &mut self.nodes[n];
        node.up = false;
        node.role = Role::Replica;
        // `VolumeReplica::open`: a resync under way fixes the epoch followed.
        let epoch = node.store.cursor.as_ref().map_or(0, |c| c.epoch);
        node.seq = SeqCore::new(epoch, node.store.hwm + 1);
        node.owed.clear();
        node.followers = Followers::default();
        self.stats.unknown += node.inflight.len() as u64;
        node.inflight.clear();
        node.resyncs.clear();
        node.lease = ReadLease::default();
        node.gate_drop = None;
        Ok(())
    }

    fn restart(&mut self, n: usize) -> Check {
        if !self.nodes[n].up {
            self.log(|| format!("n{n} RESTART"));
        }
        self.nodes[n].up = true;
        Ok(())
    }

    fn cut_link(&mut self, n: usize) -> Check {
        let m = self.rng.random_range(0..self.nodes.len());
        if m != n {
            self.log(|| format!("CUT {n}-{m}"));
            self.cut.insert((n.min(m), n.max(m)));
            self.stats.cuts += 1;
        }
        Ok(())
    }

    fn heal_link(&mut self) -> Check {
        if let Some(&c) = self.cut.iter().next() {
            self.cut.remove(&c);
        }
        Ok(())
    }

    // ---- the end -----------------------------------------------------------------------------

    /// Heal every fault and run deliveries, timeouts, observation and resyncs (no new writes
    /// or faults) until the replica set is whole again.
    fn heal_and_settle(&mut self) -> Check {
        self.cut.clear();
        for n in 0..self.nodes.len() {
            self.restart(n)?;
        }
        for _ in 0..4000 {
            if self.settled() {
                return Ok(());
            }
            self.now += 5;
            while !self.net.is_empty() {
                self.deliver_one()?;
            }
            self.now += ACK_TIMEOUT_MS;
            self.timeouts()?;
            for n in 0..self.nodes.len() {
                self.observe(n)?;
            }
            self.failover()?;
            self.commit_pending_reverse();
            let p = self.cat.primary;
            self.resync_step(p)?;
        }
        let p = &self.nodes[self.cat.primary];
        let copy = p.followers.get(NodeId(self.cat.async_target as u64));
        Err(format!(
            "the replica set did not settle after healing: catalog {:?}, primary role {:?} in flight {}, \
             async copy {:?}, resyncs {:?}",
            self.cat,
            p.role,
            p.inflight.len(),
            copy.map(|f| (f.broken, f.acked_seq, f.outstanding.len(), f.resync.as_ref().map(|r| r.done))),
            p.resyncs.iter().map(|(h, r)| (*h, r.phase)).collect::<Vec<_>>()
        ))
    }

    fn settled(&self) -> bool {
        let p = self.cat.primary;
        let node = &self.nodes[p];
        let last = node.next.saturating_sub(1);
        self.net.is_empty()
            && node.role == (Role::Primary { epoch: self.cat.epoch })
            && node.inflight.is_empty()
            // A rollback still holding the gate for a drop is not over (lagging views, seed 13434).
            && node.gate_drop.is_none()
            && self.cat.in_sync.len() == self.cat.replicas.len()
            && node.followers.caught_up(NodeId(self.cat.async_target as u64), last) == Some(CopyState::CaughtUp)
    }

    fn final_check(&self) -> Check {
        let p = self.cat.primary;
        if !self.is_head(p) {
            return Err(format!("the primary {p} is not the lineage's head {:?}", self.head));
        }
        let last = self.nodes[p].next - 1;
        self.check_copy(p, last, "primary at the end")?;
        for (w, (point, _, by)) in &self.acked {
            if !self.lineage.get(point).is_some_and(|pl| pl.has_write(*w)) {
                return Err(format!("write {w} acknowledged by node {by} at point {point} is not in the lineage"));
            }
        }
        for &h in &self.cat.in_sync {
            if self.nodes[h].applied() != last {
                return Err(format!("in-sync node {h} applied up to {}, the primary {last}", self.nodes[h].applied()));
            }
            self.check_copy(h, last, "in sync at the end")?;
        }
        let t = self.cat.async_target;
        let f = self.nodes[p].followers.get(NodeId(t as u64)).expect("settled means the copy is followed");
        self.check_copy(t, f.acked_seq, "async copy at its reported recovery point")
    }
}

/// Directed schedules: the races of issue 11 as exact step sequences.
#[cfg(test)]
impl World {
    pub fn start(&mut self) -> Check {
        (0..self.nodes.len()).try_for_each(|n| self.observe(n))
    }

    pub fn write(&mut self, n: usize, block: u64) -> Check {
        self.client_write(n, block)
    }

    /// Deliver, in point order, every packet `keep` selects (from, to, point); drop the rest if
    /// `drop_rest`.
    pub fn deliver(&mut self, keep: impl Fn(usize, usize, u64) -> bool, drop_rest: bool) -> Check {
        let point = |m: &Msg| match m {
            Msg::Replicate { point, .. } | Msg::Reply { point, .. } => *point,
        };
        let (mut go, rest): (Vec<Packet>, Vec<Packet>) =
            std::mem::take(&mut self.net).into_iter().partition(|p| keep(p.from, p.to, point(&p.msg)));
        self.net = if drop_rest { Vec::new() } else { rest };
        go.sort_by_key(|p| point(&p.msg));
        for p in go {
            self.net.insert(0, p);
            self.deliver_first()?;
        }
        Ok(())
    }

    fn deliver_first(&mut self) -> Check {
        let p = self.net.remove(0);
        if !self.reachable(p.from, p.to) {
            return Ok(());
        }
        self.dispatch(p)
    }

    /// Deliver everything, replies included, until the network is empty.
    pub fn deliver_all(&mut self) -> Check {
        while !self.net.is_empty() {
            self.deliver_first()?;
        }
        Ok(())
    }

    pub fn kill(&mut self, n: usize) -> Check {
        self.crash(n)
    }

    pub fn revive(&mut self, n: usize) {
        self.nodes[n].up = true;
    }

    pub fn cut(&mut self, a: usize, b: usize) {
        self.cut.insert((a.min(b), a.max(b)));
    }

    pub fn heal(&mut self) {
        self.cut.clear();
    }

    /// The controller fails the volume over to `c` (after the old primary's read lease lapsed)
    /// and `c` takes over.
    pub fn fail_over_to(&mut self, c: usize) -> Check {
        let old = self.cat.primary;
        let after: Vec<usize> = self.cat.in_sync.iter().copied().filter(|h| *h != old).collect();
        while !self.lease_lapsed(old) || !self.shrink_ready(self.cat.epoch, &after) {
            self.now += 1;
        }
        self.cat.in_sync.retain(|h| *h != old);
        self.cat.primary = c;
        self.cat.epoch += 1;
        // A takeover that drops unreachable replicas moves the epoch; observe again, as the
        // host supervisor does.
        for _ in 0..3 {
            self.observe(c)?;
        }
        Ok(())
    }

    pub fn take_snapshot(&mut self) -> Check {
        self.snapshot(self.cat.primary)
    }

    /// Roll back to the newest (or the oldest) snapshot the primary holds.
    pub fn roll_back(&mut self, newest: bool) -> Check {
        let n = self.cat.primary;
        let snaps = &self.nodes[n].store.snaps;
        let Some((&id, &point)) = (if newest { snaps.iter().next_back() } else { snaps.iter().next() }) else {
            return Err("no snapshot to roll back to".into());
        };
        self.rollback_to(n, id, point)
    }

    pub fn reverse_now(&mut self) -> Check {
        self.reverse(self.cat.primary, Some(true))
    }

    /// Advance primary `n`'s resync of `h` by one step; false once it is gone (done or broken).
    pub fn resync_once(&mut self, n: usize, h: usize) -> Result<bool, String> {
        self.resync_tick(n);
        self.resync_run(n, h)?;
        Ok(self.nodes[n].resyncs.contains_key(&h))
    }

    /// Let every write waiting for an acknowledgement time out.
    pub fn expire(&mut self) -> Check {
        self.now += ACK_TIMEOUT_MS;
        self.timeouts()
    }

    pub fn renew(&mut self, n: usize) {
        self.renew_lease(n);
    }

    pub fn read(&mut self, n: usize, block: u64) -> Check {
        self.client_read(n, block)
    }

    pub fn in_sync(&self) -> Vec<usize> {
        self.cat.in_sync.clone()
    }

    /// Heal, settle and run the end-of-run checks.
    pub fn settle_and_check(&mut self) -> Check {
        self.heal_and_settle()?;
        self.final_check()
    }
}

/// What proposing to drop replicas from the in-sync set came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dropped {
    /// They are out of the set.
    Yes,
    /// They are not (the compare-and-set failed, or this node is no longer primary).
    No,
    /// The leader is waiting out their read leases; ask again later.
    Wait,
}

#[derive(Debug, PartialEq, Eq)]
enum Step {
    Continue,
    Interrupted,
}

/// A resync's starting point: the common snapshot and where to resume.
type ResyncStart = (Option<(u64, u64)>, Option<(u64, u64)>);

fn ids(hosts: &[usize]) -> Vec<NodeId> {
    hosts.iter().map(|h| NodeId(*h as u64)).collect()
}
