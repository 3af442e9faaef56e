//! The leader's failover decision for HA pairs, and the catalog's apply of [`HaCommand`].
//!
//! [`FailoverCore`] takes the pair records (from the catalog), the hosts (with their drain
//! marks) and every host's heartbeat with the time it arrived, and decides, per pair:
//! - the primary is **lost** when unheard of for `heartbeat_loss_ms` (counted from this leader's
//!   start for a host never heard, so a new leader gives everyone a full window), or when its own
//!   heartbeat says it holds nothing of the pair (it restarted);
//! - then, if the standby is up and reports a complete checkpoint (or application state) at the
//!   record's generation, it proposes the failover — a compare-and-set on the generation making
//!   the standby primary, state `FailingOver` — and once that is in the catalog orders the new
//!   primary to seal and take over (resent until answered). No wait for the old primary's lease:
//!   the seal and the sink's generation check fence it (see `super`);
//! - once the new primary runs the VM, it re-protects the pair: the lowest-id host that is up,
//!   is not the VM's host and is not draining becomes the standby, or the pair is recorded
//!   degraded. A degraded pair gets a standby as soon as one is up; a silent standby is
//!   replaced (or dropped: the primary must not wait for it forever to release outputs), but
//!   only while the primary is fresh (heard within a quarter of the loss window): a standby that went
//!   silent just before the primary died may hold the only copy;
//! - when the new primary answers that it holds no state (it restarted and never started the
//!   VM), the failover is handed back to the previous primary if that one is up and still holds
//!   its guest; when it answers that it started and lost the VM, the VM is lost (its outputs
//!   since the takeover exist nowhere else) and the leader says so rather than fork it.
//!
//! A mode switch is refused while a pair fails over (or its primary is lost and a failover is
//! due). [`apply`] is the catalog's pure apply of every [`HaCommand`] with its refusals.
//!
//! Must not: do I/O, read a clock, or act on a record it has not been given (it proposes; the
//! catalog decides).

use std::collections::BTreeMap;

use haven_proto::ha::{
    FailoverRecord, HaCommand, HaHeartbeat, HaMessage, HaMode, HaPairRecord, Holding, PairState, PairStatus,
};
use haven_proto::ids::{NodeId, VmId};

use super::HaTunables;

/// A host as the catalog lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostInfo {
    pub id: NodeId,
    pub draining: bool,
}

/// Why the leader or the catalog refused a pair change. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairError {
    #[error("{0} has no HA pair")]
    NoSuchPair(VmId),
    #[error("{0} already has an HA pair")]
    PairExists(VmId),
    #[error("the standby of {vm} would be {host}, the VM's own host")]
    StandbyIsPrimary { vm: VmId, host: NodeId },
    #[error("{host} is draining: no standby is placed there")]
    StandbyDraining { host: NodeId },
    #[error("{0} is not a host of this cluster")]
    UnknownHost(NodeId),
    #[error("the pair of {vm} is at generation {actual}, not {expected}")]
    Generation { vm: VmId, expected: u64, actual: u64 },
    #[error("the pair of {0} is failing over: no mode switch until it is protected again")]
    FailingOver(VmId),
    #[error("the pair of {0} already runs in that mode")]
    SameMode(VmId),
    #[error("{to} cannot take {vm} over: {why}")]
    NotACandidate { vm: VmId, to: NodeId, why: &'static str },
    #[error("bad pair record: {0}")]
    BadRecord(String),
    #[error("invalid command: {0}")]
    Invalid(String),
    #[error("not a message for the leader")]
    NotForLeader,
    #[error("a heartbeat naming {named} came from {from}")]
    WrongSender { from: NodeId, named: NodeId },
}

// ---- the catalog's apply ----------------------------------------------------------------------

/// Apply `cmd` to the pair's current `record` (`None`: no pair): the new record (`None`: deleted)
/// or a refusal. Pure; the catalog calls it inside its apply.
pub fn apply(
    record: Option<&HaPairRecord>,
    cmd: &HaCommand,
    hosts: &[HostInfo],
) -> Result<Option<HaPairRecord>, PairError> {
    cmd.validate().map_err(PairError::Invalid)?;
    match cmd {
        HaCommand::Create { vm, primary, standby, mode } => create(record, *vm, *primary, *standby, *mode, hosts),
        HaCommand::Delete { vm } => current(record, *vm, None).map(|_| None),
        HaCommand::SetMode { vm, mode, expected_generation } => {
            let r = current(record, *vm, Some(*expected_generation))?;
            if r.state == PairState::FailingOver {
                return Err(PairError::FailingOver(*vm));
            }
            if r.mode == *mode {
                return Err(PairError::SameMode(*vm));
            }
            Ok(Some(HaPairRecord { mode: *mode, generation: r.generation + 1, ..r.clone() }))
        }
        HaCommand::Failover { vm, expected_generation, to, at_ms, reason } => {
            let r = current(record, *vm, Some(*expected_generation))?;
            check_candidate(r, *to, hosts)?;
            let failover =
                FailoverRecord { at_ms: *at_ms, from: r.primary, to: *to, reason: reason.clone(), took_ms: 0 };
            Ok(Some(HaPairRecord {
                primary: *to,
                standby: None,
                state: PairState::FailingOver,
                generation: r.generation + 1,
                failovers: r.failovers + 1,
                last_failover: Some(failover),
                ..r.clone()
            }))
        }
        HaCommand::Reprotect { vm, expected_generation, standby, failover_took_ms } => {
            let r = current(record, *vm, Some(*expected_generation))?;
            if let Some(s) = standby {
                check_standby(*vm, r.primary, *s, hosts)?;
            }
            let mut last_failover = r.last_failover.clone();
            if let (Some(f), Some(took)) = (&mut last_failover, failover_took_ms) {
                f.took_ms = *took;
            }
            let state = if standby.is_some() { PairState::Protecting } else { PairState::Degraded };
            Ok(Some(HaPairRecord {
                standby: *standby,
                state,
                generation: r.generation + 1,
                last_failover,
                ..r.clone()
            }))
        }
    }
}

fn create(
    record: Option<&HaPairRecord>,
    vm: VmId,
    primary: NodeId,
    standby: Option<NodeId>,
    mode: HaMode,
    hosts: &[HostInfo],
) -> Result<Option<HaPairRecord>, PairError> {
    if record.is_some() {
        return Err(PairError::PairExists(vm));
    }
    known(primary, hosts)?;
    if let Some(s) = standby {
        check_standby(vm, primary, s, hosts)?;
    }
    let state = if standby.is_some() { PairState::Protecting } else { PairState::Degraded };
    Ok(Some(HaPairRecord { vm, primary, standby, mode, state, generation: 1, failovers: 0, last_failover: None }))
}

/// The pair's record, checked against the expected generation (a compare-and-set).
fn current(record: Option<&HaPairRecord>, vm: VmId, expected: Option<u64>) -> Result<&HaPairRecord, PairError> {
    let r = record.filter(|r| r.vm == vm).ok_or(PairError::NoSuchPair(vm))?;
    match expected {
        Some(e) if e != r.generation => Err(PairError::Generation { vm, expected: e, actual: r.generation }),
        _ => Ok(r),
    }
}

fn known(host: NodeId, hosts: &[HostInfo]) -> Result<&HostInfo, PairError> {
    hosts.iter().find(|h| h.id == host).ok_or(PairError::UnknownHost(host))
}

fn check_standby(vm: VmId, primary: NodeId, standby: NodeId, hosts: &[HostInfo]) -> Result<(), PairError> {
    if standby == primary {
        return Err(PairError::StandbyIsPrimary { vm, host: standby });
    }
    if known(standby, hosts)?.draining {
        return Err(PairError::StandbyDraining { host: standby });
    }
    Ok(())
}

/// A failover goes to the standby of a protected pair, or — while failing over, the takeover
/// having failed — back to the primary before.
fn check_candidate(r: &HaPairRecord, to: NodeId, hosts: &[HostInfo]) -> Result<(), PairError> {
    known(to, hosts)?;
    let ok = match r.state {
        PairState::Protecting => r.standby == Some(to),
        PairState::FailingOver => r.last_failover.as_ref().is_some_and(|f| f.from == to),
        PairState::Degraded => false,
    };
    match ok {
        true => Ok(()),
        false => Err(PairError::NotACandidate {
            vm: r.vm,
            to,
            why: "it is neither the standby nor the primary before a failed takeover",
        }),
    }
}

// ---- the leader's decision --------------------------------------------------------------------

/// Why a primary counts as lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    Silent {
        silent_ms: u64,
    },
    /// Its heartbeat says it holds nothing of the pair (it restarted).
    HoldsNothing,
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Silent { silent_ms } => write!(f, "no heartbeat for {silent_ms} ms"),
            Self::HoldsNothing => write!(f, "the host holds nothing of the VM (it restarted)"),
        }
    }
}

/// What the leader reports (once per pair generation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaderEvent {
    PrimaryLost {
        vm: VmId,
        host: NodeId,
        loss: Loss,
    },
    /// The primary is lost and no standby holds a complete state: the VM waits for its host.
    NoReadyStandby {
        vm: VmId,
        generation: u64,
    },
    StandbyLost {
        vm: VmId,
        host: NodeId,
    },
    /// The new primary holds no state and the previous one cannot take the VM back (yet).
    TakeoverFailed {
        vm: VmId,
        host: NodeId,
        generation: u64,
    },
    /// The new primary started the VM and lost it: its outputs since exist nowhere else.
    VmLost {
        vm: VmId,
        host: NodeId,
        generation: u64,
    },
}

/// What the leader's driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaderAction {
    /// Propose this catalog change (a compare-and-set); the outcome comes back as a record.
    Propose(HaCommand),
    Send {
        to: NodeId,
        msg: HaMessage,
    },
    Event(LeaderEvent),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct HostSeen {
    draining: bool,
    heard_ms: Option<u64>,
    /// `(incarnation, seq)` of the newest heartbeat taken.
    beat: Option<(u64, u64)>,
    pairs: BTreeMap<VmId, PairStatus>,
}

/// The new primary's answer to a takeover order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    TookOver,
    Cannot { lost: bool },
}

const NOTE_LOST: u8 = 1;
const NOTE_NO_STANDBY: u8 = 2;
const NOTE_TAKEOVER_FAILED: u8 = 4;
const NOTE_VM_LOST: u8 = 8;

/// One pair as the leader follows it; everything but `record` is about `record.generation`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Track {
    record: HaPairRecord,
    proposed_ms: Option<u64>,
    takeover_sent_ms: Option<u64>,
    answer: Option<Answer>,
    noted: u8,
}

/// The leader's failover decision over every pair. Volatile: a new leader starts a new one and
/// feeds it the catalog's records; a failover in progress resumes from its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverCore {
    tun: HaTunables,
    started_ms: u64,
    hosts: BTreeMap<NodeId, HostSeen>,
    pairs: BTreeMap<VmId, Track>,
}

impl FailoverCore {
    pub fn new(tun: HaTunables, now_ms: u64) -> Self {
        Self { tun, started_ms: now_ms, hosts: BTreeMap::new(), pairs: BTreeMap::new() }
    }

    pub fn record(&self, vm: VmId) -> Option<&HaPairRecord> {
        self.pairs.get(&vm).map(|t| &t.record)
    }

    /// The pairs the leader follows.
    pub fn vms(&self) -> Vec<VmId> {
        self.pairs.keys().copied().collect()
    }

    pub fn host_infos(&self) -> Vec<HostInfo> {
        self.hosts.iter().map(|(id, h)| HostInfo { id: *id, draining: h.draining }).collect()
    }

    /// The catalog's hosts and drain marks (hosts not listed are forgotten).
    pub fn set_hosts(&mut self, hosts: &[HostInfo]) {
        self.hosts.retain(|id, _| hosts.iter().any(|h| h.id == *id));
        for h in hosts {
            let seen = self.hosts.entry(h.id).or_insert_with(|| HostSeen {
                draining: h.draining,
                heard_ms: None,
                beat: None,
                pairs: BTreeMap::new(),
            });
            seen.draining = h.draining;
        }
    }

    /// A pair record from the catalog; an older or equal generation changes nothing.
    pub fn on_record(&mut self, record: &HaPairRecord) -> Result<(), PairError> {
        record.validate().map_err(PairError::BadRecord)?;
        if self.pairs.get(&record.vm).is_some_and(|t| t.record.generation >= record.generation) {
            return Ok(());
        }
        let track = Track { record: record.clone(), proposed_ms: None, takeover_sent_ms: None, answer: None, noted: 0 };
        self.pairs.insert(record.vm, track);
        Ok(())
    }

    pub fn on_deleted(&mut self, vm: VmId) {
        self.pairs.remove(&vm);
    }

    /// A message to the leader: a heartbeat, or a new primary's answer to a takeover order.
    pub fn on_message(&mut self, from: NodeId, msg: &HaMessage, now_ms: u64) -> Result<(), PairError> {
        let (vm, generation, answer) = match msg {
            HaMessage::Heartbeat(hb) => return self.on_heartbeat(from, hb, now_ms),
            HaMessage::TookOver { vm, generation } => (*vm, *generation, Answer::TookOver),
            HaMessage::CannotTakeOver { vm, generation, lost } => (*vm, *generation, Answer::Cannot { lost: *lost }),
            _ => return Err(PairError::NotForLeader),
        };
        if let Some(t) = self.pairs.get_mut(&vm) {
            let current = t.record.generation == generation && t.record.primary == from;
            if current && t.record.state == PairState::FailingOver {
                t.answer = Some(answer);
            }
        }
        Ok(())
    }

    fn on_heartbeat(&mut self, from: NodeId, hb: &HaHeartbeat, now_ms: u64) -> Result<(), PairError> {
        if hb.host != from {
            return Err(PairError::WrongSender { from, named: hb.host });
        }
        let seen = self.hosts.get_mut(&from).ok_or(PairError::UnknownHost(from))?;
        let beat = (hb.incarnation, hb.seq);
        if seen.beat.is_some_and(|b| b >= beat) {
            return Ok(());
        }
        seen.beat = Some(beat);
        seen.heard_ms = Some(now_ms);
        seen.pairs = hb.pairs.iter().map(|p| (p.vm, *p)).collect();
        Ok(())
    }

    // ---- what the leader knows of hosts -------------------------------------------------------

    /// How long `host` has not been heard from (from this leader's start for a host never heard).
    pub fn silent_ms(&self, host: NodeId, now_ms: u64) -> u64 {
        let heard = self.hosts.get(&host).and_then(|h| h.heard_ms).unwrap_or(self.started_ms);
        now_ms.saturating_sub(heard.max(self.started_ms))
    }

    /// Heard from within `heartbeat_loss_ms`.
    pub fn up(&self, host: NodeId, now_ms: u64) -> bool {
        self.hosts.contains_key(&host) && self.silent_ms(host, now_ms) < self.tun.heartbeat_loss_ms
    }

    fn status(&self, host: NodeId, vm: VmId) -> Option<PairStatus> {
        self.hosts.get(&host).and_then(|h| h.pairs.get(&vm)).copied()
    }

    /// Heard within a quarter of the loss window (`F = L/4`): a primary must be *fresh* before
    /// the leader drops its silent standby. Dropping the standby lets the primary release
    /// unprotected; if the primary is itself dead, the silent standby may hold the only copy,
    /// and dropping it turns an unavailable VM into a lost one. Why a quarter: if the primary
    /// dies at `t` while its standby was fresh (heard after `t - F`), the standby is declared
    /// silent no earlier than `t - F + L`; heartbeats delivered within `d <= L - 2F = L/2` make
    /// the dead primary look heard at most until `t + d`, so at that moment it has been silent
    /// at least `L - F - d >= F`: not fresh, no drop; it is declared lost instead, and the
    /// standby stays a failover candidate. The driver must deliver heartbeats within `L/2`
    /// (drop late ones) for this to hold.
    pub fn fresh(&self, host: NodeId, now_ms: u64) -> bool {
        self.up(host, now_ms) && self.silent_ms(host, now_ms) < self.tun.heartbeat_loss_ms / 4
    }

    /// Whether (and why) the pair's primary is lost.
    pub fn loss(&self, r: &HaPairRecord, now_ms: u64) -> Option<Loss> {
        if !self.up(r.primary, now_ms) {
            return Some(Loss::Silent { silent_ms: self.silent_ms(r.primary, now_ms) });
        }
        let holds_nothing = self.status(r.primary, r.vm).is_some_and(|s| s.holding == Holding::Nothing);
        holds_nothing.then_some(Loss::HoldsNothing)
    }

    /// The standby is up and holds a state to start from at the record's generation.
    fn standby_ready(&self, r: &HaPairRecord, now_ms: u64) -> Option<NodeId> {
        let s = r.standby?;
        let st = self.status(s, r.vm)?;
        let ready = st.holding == Holding::StandbyReady && st.generation == r.generation;
        (ready && self.up(s, now_ms)).then_some(s)
    }

    fn holds_guest(&self, host: NodeId, vm: VmId, now_ms: u64) -> bool {
        let holding = self.status(host, vm).map(|s| s.holding);
        self.up(host, now_ms) && matches!(holding, Some(Holding::Primary | Holding::Deposed))
    }

    /// The standby a pair gets: the lowest-id host that is up, is not the VM's host (nor
    /// `exclude`) and is not draining.
    pub fn choose_standby(&self, r: &HaPairRecord, exclude: Option<NodeId>, now_ms: u64) -> Option<NodeId> {
        self.hosts
            .iter()
            .filter(|(id, h)| **id != r.primary && Some(**id) != exclude && !h.draining)
            .map(|(id, _)| *id)
            .find(|id| self.up(*id, now_ms))
    }

    // ---- client requests ------------------------------------------------------------------------

    /// Check a command against the pair as the leader knows it (the catalog checks again).
    pub fn check(&self, cmd: &HaCommand) -> Result<(), PairError> {
        apply(self.record(cmd.vm()), cmd, &self.host_infos()).map(|_| ())
    }

    /// The command that switches `vm` to `mode` live, unless the pair fails over — or is about
    /// to: its primary is lost, or a change for this generation is proposed.
    pub fn switch_mode(&self, vm: VmId, mode: HaMode, now_ms: u64) -> Result<HaCommand, PairError> {
        let t = self.pairs.get(&vm).ok_or(PairError::NoSuchPair(vm))?;
        let busy = t.record.state == PairState::FailingOver
            || self.loss(&t.record, now_ms).is_some()
            || t.proposed_ms.is_some();
        if busy {
            return Err(PairError::FailingOver(vm));
        }
        let cmd = HaCommand::SetMode { vm, mode, expected_generation: t.record.generation };
        self.check(&cmd)?;
        Ok(cmd)
    }

    // ---- decisions ------------------------------------------------------------------------------

    /// Decide for every pair.
    pub fn tick(&mut self, now_ms: u64) -> Vec<LeaderAction> {
        let vms: Vec<VmId> = self.pairs.keys().copied().collect();
        vms.into_iter().flat_map(|vm| self.decide(vm, now_ms)).collect()
    }

    fn decide(&mut self, vm: VmId, now_ms: u64) -> Vec<LeaderAction> {
        let Some(t) = self.pairs.get(&vm) else { return Vec::new() };
        if t.proposed_ms.is_some_and(|at| now_ms < at + self.tun.propose_retry_ms) {
            return Vec::new();
        }
        match t.record.state {
            PairState::FailingOver => self.drive_takeover(vm, now_ms),
            PairState::Protecting | PairState::Degraded => self.watch(vm, now_ms),
        }
    }

    fn propose(&mut self, vm: VmId, cmd: HaCommand, now_ms: u64) -> Vec<LeaderAction> {
        if let Some(t) = self.pairs.get_mut(&vm) {
            t.proposed_ms = Some(now_ms);
        }
        vec![LeaderAction::Propose(cmd)]
    }

    /// An event, once per pair generation.
    fn note(&mut self, vm: VmId, flag: u8, event: LeaderEvent) -> Vec<LeaderAction> {
        let Some(t) = self.pairs.get_mut(&vm) else { return Vec::new() };
        let first = t.noted & flag == 0;
        t.noted |= flag;
        first.then_some(LeaderAction::Event(event)).into_iter().collect()
    }

    /// A protected or degraded pair: fail over from a lost primary, replace a silent standby,
    /// give a degraded pair a standby.
    fn watch(&mut self, vm: VmId, now_ms: u64) -> Vec<LeaderAction> {
        let r = self.pairs[&vm].record.clone();
        if let Some(loss) = self.loss(&r, now_ms) {
            return self.primary_lost(&r, loss, now_ms);
        }
        match r.standby {
            Some(s) if !self.up(s, now_ms) && self.fresh(r.primary, now_ms) => {
                let mut out = self.note(vm, NOTE_LOST, LeaderEvent::StandbyLost { vm, host: s });
                let standby = self.choose_standby(&r, Some(s), now_ms);
                let cmd =
                    HaCommand::Reprotect { vm, expected_generation: r.generation, standby, failover_took_ms: None };
                out.extend(self.propose(vm, cmd, now_ms));
                out
            }
            Some(_) => Vec::new(),
            None => match self.choose_standby(&r, None, now_ms) {
                Some(h) => {
                    let standby = Some(h);
                    let cmd =
                        HaCommand::Reprotect { vm, expected_generation: r.generation, standby, failover_took_ms: None };
                    self.propose(vm, cmd, now_ms)
                }
                None => Vec::new(),
            },
        }
    }

    fn primary_lost(&mut self, r: &HaPairRecord, loss: Loss, now_ms: u64) -> Vec<LeaderAction> {
        let vm = r.vm;
        let mut out = self.note(vm, NOTE_LOST, LeaderEvent::PrimaryLost { vm, host: r.primary, loss });
        match self.standby_ready(r, now_ms) {
            Some(to) => {
                let reason = format!("{} lost: {loss}", r.primary);
                let cmd = HaCommand::Failover { vm, expected_generation: r.generation, to, at_ms: now_ms, reason };
                out.extend(self.propose(vm, cmd, now_ms));
            }
            None => {
                let generation = r.generation;
                out.extend(self.note(vm, NOTE_NO_STANDBY, LeaderEvent::NoReadyStandby { vm, generation }));
            }
        }
        out
    }

    /// A pair failing over: order the takeover until answered; then re-protect, or hand the VM
    /// back when the new primary holds nothing.
    fn drive_takeover(&mut self, vm: VmId, now_ms: u64) -> Vec<LeaderAction> {
        let t = &self.pairs[&vm];
        let (r, answer, sent) = (t.record.clone(), t.answer, t.takeover_sent_ms);
        let (to, generation) = (r.primary, r.generation);
        let running = self.status(to, vm).is_some_and(|s| s.holding == Holding::Primary && s.generation >= generation);
        if answer == Some(Answer::TookOver) || running {
            let took = r.last_failover.as_ref().map(|f| now_ms.saturating_sub(f.at_ms));
            let standby = self.choose_standby(&r, None, now_ms);
            let cmd = HaCommand::Reprotect { vm, expected_generation: generation, standby, failover_took_ms: took };
            return self.propose(vm, cmd, now_ms);
        }
        match answer {
            Some(Answer::TookOver) => Vec::new(),
            Some(Answer::Cannot { lost: true }) => {
                self.note(vm, NOTE_VM_LOST, LeaderEvent::VmLost { vm, host: to, generation })
            }
            Some(Answer::Cannot { lost: false }) => self.fail_back(&r, now_ms),
            None if sent.is_none_or(|at| now_ms >= at + self.tun.takeover_retry_ms) => {
                if let Some(t) = self.pairs.get_mut(&vm) {
                    t.takeover_sent_ms = Some(now_ms);
                }
                vec![LeaderAction::Send { to, msg: HaMessage::TakeOver { vm, generation } }]
            }
            None => Vec::new(),
        }
    }

    /// The new primary never started the VM: the primary before it takes it back if it still
    /// holds its guest.
    fn fail_back(&mut self, r: &HaPairRecord, now_ms: u64) -> Vec<LeaderAction> {
        let (vm, generation) = (r.vm, r.generation);
        let from = r.last_failover.as_ref().map(|f| f.from);
        match from.filter(|f| self.holds_guest(*f, vm, now_ms)) {
            Some(back) => {
                let reason = format!("takeover by {} failed: it holds no state", r.primary);
                let cmd = HaCommand::Failover { vm, expected_generation: generation, to: back, at_ms: now_ms, reason };
                self.propose(vm, cmd, now_ms)
            }
            None => {
                let event = LeaderEvent::TakeoverFailed { vm, host: r.primary, generation };
                self.note(vm, NOTE_TAKEOVER_FAILED, event)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use haven_proto::ha::HaMode;

    use super::*;

    const VM: VmId = VmId(9);
    const REDUNDANT: HaMode = HaMode::Redundant { epoch_ms: 20 };

    fn hosts(draining: &[u64]) -> Vec<HostInfo> {
        (1..=4).map(|i| HostInfo { id: NodeId(i), draining: draining.contains(&i) }).collect()
    }

    fn created() -> HaPairRecord {
        let cmd = HaCommand::Create { vm: VM, primary: NodeId(1), standby: Some(NodeId(2)), mode: REDUNDANT };
        apply(None, &cmd, &hosts(&[])).unwrap().unwrap()
    }

    fn beat(core: &mut FailoverCore, host: u64, seq: u64, holding: Holding, generation: u64, now: u64) {
        let hb = HaHeartbeat {
            host: NodeId(host),
            incarnation: 1,
            seq,
            pairs: vec![PairStatus { vm: VM, generation, holding }],
        };
        core.on_message(NodeId(host), &HaMessage::Heartbeat(hb), now).unwrap();
    }

    #[test]
    fn bad_pairs_are_refused_with_typed_errors() {
        let h = hosts(&[3]);
        let create = |standby| HaCommand::Create { vm: VM, primary: NodeId(1), standby, mode: REDUNDANT };
        assert!(matches!(apply(None, &create(Some(NodeId(1))), &h), Err(PairError::Invalid(_))));
        assert_eq!(apply(None, &create(Some(NodeId(3))), &h), Err(PairError::StandbyDraining { host: NodeId(3) }));
        assert_eq!(apply(None, &create(Some(NodeId(7))), &h), Err(PairError::UnknownHost(NodeId(7))));
        let r = created();
        assert_eq!(apply(Some(&r), &create(Some(NodeId(2))), &h), Err(PairError::PairExists(VM)));
        let reprotect =
            |standby| HaCommand::Reprotect { vm: VM, expected_generation: 1, standby, failover_took_ms: None };
        assert_eq!(
            apply(Some(&r), &reprotect(Some(NodeId(1))), &h),
            Err(PairError::StandbyIsPrimary { vm: VM, host: NodeId(1) })
        );
        assert_eq!(
            apply(Some(&r), &reprotect(Some(NodeId(3))), &h),
            Err(PairError::StandbyDraining { host: NodeId(3) })
        );
        let stale = HaCommand::SetMode { vm: VM, mode: HaMode::MultiOperation, expected_generation: 0 };
        assert!(matches!(apply(Some(&r), &stale, &h), Err(PairError::Generation { expected: 0, actual: 1, .. })));
        let wrong = HaCommand::Failover { vm: VM, expected_generation: 1, to: NodeId(4), at_ms: 0, reason: "x".into() };
        assert!(matches!(apply(Some(&r), &wrong, &h), Err(PairError::NotACandidate { .. })));
        let mut core = FailoverCore::new(HaTunables::default(), 0);
        core.set_hosts(&h);
        let bad = HaPairRecord { standby: Some(NodeId(1)), ..r.clone() };
        assert!(matches!(core.on_record(&bad), Err(PairError::BadRecord(_))));
        assert!(core.record(VM).is_none(), "nothing changed");
        core.on_record(&r).unwrap();
        let same = HaCommand::SetMode { vm: VM, mode: REDUNDANT, expected_generation: 1 };
        assert_eq!(core.check(&same), Err(PairError::SameMode(VM)));
    }

    #[test]
    fn a_lost_primary_fails_over_to_a_ready_standby_which_is_reprotected() {
        let tun = HaTunables::default();
        let mut core = FailoverCore::new(tun.clone(), 0);
        core.set_hosts(&hosts(&[]));
        let r = created();
        core.on_record(&r).unwrap();
        for (t, seq) in [(100, 1), (200, 2)] {
            beat(&mut core, 1, seq, Holding::Primary, 1, t);
            beat(&mut core, 2, seq, Holding::StandbySyncing, 1, t);
            beat(&mut core, 3, seq, Holding::Nothing, 0, t);
        }
        assert!(core.tick(300).is_empty());
        beat(&mut core, 2, 3, Holding::StandbyReady, 1, 700);
        beat(&mut core, 3, 3, Holding::Nothing, 0, 700);
        let out = core.tick(800);
        assert!(matches!(&out[0], LeaderAction::Event(LeaderEvent::PrimaryLost { loss: Loss::Silent { .. }, .. })));
        let LeaderAction::Propose(cmd) = &out[1] else { panic!("{out:?}") };
        assert!(matches!(cmd, HaCommand::Failover { to: NodeId(2), expected_generation: 1, .. }));
        assert_eq!(core.switch_mode(VM, HaMode::MultiOperation, 800), Err(PairError::FailingOver(VM)));
        assert!(core.tick(850).is_empty(), "proposed: wait for the record");
        let failing = apply(Some(&r), cmd, &core.host_infos()).unwrap().unwrap();
        core.on_record(&failing).unwrap();
        assert_eq!(core.switch_mode(VM, HaMode::MultiOperation, 860), Err(PairError::FailingOver(VM)));
        let out = core.tick(860);
        assert_eq!(out, vec![LeaderAction::Send { to: NodeId(2), msg: HaMessage::TakeOver { vm: VM, generation: 2 } }]);
        assert!(core.tick(900).is_empty(), "resent only after takeover_retry_ms");
        assert_eq!(core.tick(960).len(), 1);
        core.on_message(NodeId(2), &HaMessage::TookOver { vm: VM, generation: 2 }, 970).unwrap();
        let out = core.tick(980);
        let [LeaderAction::Propose(cmd)] = &out[..] else { panic!("{out:?}") };
        let expected = HaCommand::Reprotect {
            vm: VM,
            expected_generation: 2,
            standby: Some(NodeId(3)),
            failover_took_ms: Some(180),
        };
        assert_eq!(cmd, &expected, "the lowest-id host up that is not the VM's");
        let protected = apply(Some(&failing), cmd, &core.host_infos()).unwrap().unwrap();
        assert_eq!((protected.state, protected.failovers), (PairState::Protecting, 1));
        assert_eq!(
            protected.last_failover.as_ref().map(|f| (f.from, f.to, f.took_ms)),
            Some((NodeId(1), NodeId(2), 180))
        );
    }

    #[test]
    fn a_restarted_primary_counts_as_lost_and_a_failed_takeover_goes_back() {
        let mut core = FailoverCore::new(HaTunables::default(), 0);
        core.set_hosts(&hosts(&[]));
        let r = created();
        core.on_record(&r).unwrap();
        beat(&mut core, 1, 1, Holding::Nothing, 1, 100);
        beat(&mut core, 2, 1, Holding::StandbyReady, 1, 100);
        let out = core.tick(100);
        assert!(out
            .iter()
            .any(|a| matches!(a, LeaderAction::Event(LeaderEvent::PrimaryLost { loss: Loss::HoldsNothing, .. }))));
        let Some(LeaderAction::Propose(cmd)) = out.last() else { panic!("{out:?}") };
        let failing = apply(Some(&r), cmd, &core.host_infos()).unwrap().unwrap();
        core.on_record(&failing).unwrap();
        core.tick(110);
        let cannot = HaMessage::CannotTakeOver { vm: VM, generation: 2, lost: false };
        core.on_message(NodeId(2), &cannot, 120).unwrap();
        let out = core.tick(130);
        assert!(matches!(&out[..], [LeaderAction::Event(LeaderEvent::TakeoverFailed { .. })]), "{out:?}");
        beat(&mut core, 1, 2, Holding::Deposed, 2, 140);
        let out = core.tick(140);
        let [LeaderAction::Propose(cmd)] = &out[..] else { panic!("{out:?}") };
        assert!(matches!(cmd, HaCommand::Failover { to: NodeId(1), expected_generation: 2, .. }));
        let back = apply(Some(&failing), cmd, &core.host_infos()).unwrap().unwrap();
        assert_eq!((back.primary, back.state, back.failovers), (NodeId(1), PairState::FailingOver, 2));
    }

    #[test]
    fn silent_standbys_are_replaced_and_degraded_pairs_get_one() {
        let mut core = FailoverCore::new(HaTunables::default(), 0);
        core.set_hosts(&hosts(&[3]));
        let r = created();
        core.on_record(&r).unwrap();
        beat(&mut core, 1, 1, Holding::Primary, 1, 500);
        beat(&mut core, 4, 1, Holding::Nothing, 0, 500);
        assert!(core.tick(700).is_empty(), "the primary is not fresh: it may be dying too");
        beat(&mut core, 1, 2, Holding::Primary, 1, 650);
        let out = core.tick(700);
        let Some(LeaderAction::Propose(cmd)) = out.last() else { panic!("{out:?}") };
        let expected =
            HaCommand::Reprotect { vm: VM, expected_generation: 1, standby: Some(NodeId(4)), failover_took_ms: None };
        assert_eq!(cmd, &expected, "3 drains, 2 is silent");
        let degraded = HaPairRecord { standby: None, state: PairState::Degraded, generation: 5, ..r };
        core.on_record(&degraded).unwrap();
        beat(&mut core, 1, 3, Holding::Primary, 5, 1_000);
        beat(&mut core, 2, 2, Holding::Nothing, 0, 1_000);
        let out = core.tick(1_000);
        assert!(matches!(&out[..], [LeaderAction::Propose(HaCommand::Reprotect { standby: Some(NodeId(2)), .. })]));
    }
}
