//! The HA-pair cores: pure state machines with no I/O, no clock, no threads and no randomness.
//! Messages, records and a time value (`now_ms`) go in; [`Effect`]s come out, which the driver
//! carries out in order.
//!
//! - [`checkpoint`]: the redundant-mode primary (epoch timer, capture handshake, epochs in
//!   flight, release on acknowledgement, pause accounting).
//! - [`mirror`]: multi-operation mode, both sides (application updates acknowledged only once
//!   the standby has them).
//! - [`standby`]: the standby (staging and atomic commit of epochs, acknowledgement after
//!   commit, the state a takeover starts from).
//! - [`failover`]: the leader's decision (heartbeats and records in; failover, re-protection and
//!   takeover orders out) and the catalog apply of [`haven_proto::ha::HaCommand`].
//! - here: [`Primary`] (one generation's output gate over the mode's mirror) and [`PairHost`]
//!   (one host's role in one pair — primary, standby, deposed or nothing — its transitions on
//!   records, the seal and the takeover).
//!
//! **The fencing argument** (why a takeover need not wait for the old primary's 4 s host lease):
//! the standby is the arbiter of output. (1) A primary of generation `g` releases an output only
//! once its standby acknowledged an epoch (or an update) holding it; (2) a standby acknowledges
//! only what it committed, and commits whole epochs in order; (3) a host told to take over at
//! `g' > g` first persists `sealed_below = g'` and from then on refuses every message of a
//! generation below `g'`, so it acknowledges nothing more of `g`; (4) it starts from its newest
//! commit, which holds every output it ever acknowledged, hence every output the old primary can
//! ever release; (5) every released output carries its generation and the sink refuses one older
//! than the newest it saw, so a write the old primary released before the seal cannot land over
//! the new primary's. Whatever the old primary believes afterwards, alive behind a partition or
//! woken from a freeze, it can release nothing the new primary lacks.
//!
//! Driver rules: carry out effects in order; `Persist` makes [`Durable`] durable (fsync) before
//! any later effect — above all before `StartGuest` and before any message; an error from a
//! message handler changed nothing, and its [`HaError::refusal`] goes back to the sender as
//! `HaMessage::Refused`; a `Generation` error or a `RefreshRecord` effect means the pair's record
//! should be read again from the catalog; every output released carries its generation, and a
//! sink's refusal of one (it saw a newer generation) goes to [`PairHost::on_output_refused`].
//!
//! Architecture invariant: nothing here may depend on tokio, RocksDB, the transport or the
//! catalog store; a core is a value a test can clone and step by hand.

pub mod checkpoint;
pub mod failover;
pub mod mirror;
pub mod standby;

use std::collections::BTreeSet;

use haven_proto::ha::{
    HaMessage, HaMode, HaPairRecord, HaRefusal, Holding, PairState, PairStatus, MAX_PAGES_PER_FRAME,
};
use haven_proto::ids::{NodeId, VmId};
use serde::{Deserialize, Serialize};

use self::checkpoint::{CheckpointPrimary, EpochReport, PauseAccounting};
use self::mirror::MirrorPrimary;
use self::standby::{primary_generation, ImageShape, Standby, TakeoverState};

/// The timing and size knobs of HA pairs (plain data; the driver moves them under
/// `config::tunables` when it lands).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HaTunables {
    /// Each host sends the leader a heartbeat this often.
    pub heartbeat_ms: u64,
    /// A primary unheard of this long is lost (and a standby, replaced).
    pub heartbeat_loss_ms: u64,
    /// Frames, snapshots and updates unacknowledged this long are sent again.
    pub retransmit_ms: u64,
    /// The leader resends a takeover order this often until it is answered.
    pub takeover_retry_ms: u64,
    /// The leader proposes a catalog change again if the record did not move in this long.
    pub propose_retry_ms: u64,
    /// Checkpoint epochs sent and not acknowledged at most; the next capture waits.
    pub max_epochs_in_flight: usize,
    /// Epochs a standby stages ahead of its image at most.
    pub max_staged_epochs: usize,
    /// Pages per checkpoint frame.
    pub frame_pages: usize,
}

impl Default for HaTunables {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            heartbeat_loss_ms: 600,
            retransmit_ms: 50,
            takeover_retry_ms: 100,
            propose_retry_ms: 1_000,
            max_epochs_in_flight: 4,
            max_staged_epochs: 8,
            frame_pages: MAX_PAGES_PER_FRAME,
        }
    }
}

impl HaTunables {
    pub fn check(&self) -> Result<(), String> {
        if self.heartbeat_ms == 0 || self.heartbeat_loss_ms < 3 * self.heartbeat_ms {
            return Err(format!(
                "ha.heartbeat_loss_ms {} must be at least three heartbeats of {} ms",
                self.heartbeat_loss_ms, self.heartbeat_ms
            ));
        }
        if self.retransmit_ms == 0 || self.takeover_retry_ms == 0 || self.propose_retry_ms == 0 {
            return Err("ha retransmit, takeover and propose retry periods must be positive".into());
        }
        if self.max_epochs_in_flight == 0 || self.max_epochs_in_flight > self.max_staged_epochs {
            return Err(format!(
                "ha.max_epochs_in_flight {} must be 1 to max_staged_epochs {}",
                self.max_epochs_in_flight, self.max_staged_epochs
            ));
        }
        if !(1..=MAX_PAGES_PER_FRAME).contains(&self.frame_pages) {
            return Err(format!("ha.frame_pages {} must be 1 to {MAX_PAGES_PER_FRAME}", self.frame_pages));
        }
        Ok(())
    }
}

/// What the metrics are fed from: checkpoint epoch length, size and pause; mirroring lag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaMetric {
    Epoch(EpochReport),
    EpochAcked { epoch: u64, lag_ms: u64 },
    UpdateAcked { seq: u64, lag_ms: u64 },
}

/// What a host core asks of its driver, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Make this [`Durable`] durable (fsync) before any later effect.
    Persist(Durable),
    Send {
        to: NodeId,
        msg: HaMessage,
    },
    /// Pause the guest's vCPUs and capture epoch `epoch` — every page if `full`, else the pages
    /// written since the previous capture (resetting the dirty log) — and the device state; then
    /// call `on_captured`.
    PauseAndCapture {
        epoch: u64,
        full: bool,
    },
    /// Resume the vCPUs after a capture.
    Unpause,
    /// Capture the application's state (covering every output issued so far); then call
    /// `on_app_state` with this token.
    CaptureAppState {
        token: u64,
    },
    /// Release to the outside every output `..=upto` not released yet, in order, each tagged
    /// with `generation`.
    Release {
        upto: u64,
        generation: u64,
    },
    /// Release these outputs (released before, then refused by the sink for an older
    /// generation) again, tagged with `generation`.
    ReleaseAgain {
        seqs: Vec<u64>,
        generation: u64,
    },
    /// Start the VM here as primary of `generation` from `state`.
    StartGuest {
        generation: u64,
        state: TakeoverState,
    },
    /// This host was deposed: stop the guest and release nothing more, but keep it (a failed
    /// takeover elsewhere may hand the VM back).
    StopGuest,
    /// Run the guest kept since the deposition again (the VM came back to this host).
    RestartGuest,
    /// Drop the guest and its unreleased outputs: another host runs the VM.
    DiscardGuest,
    /// The pair's record changed somewhere: read it again from the catalog.
    RefreshRecord,
    Metric(HaMetric),
}

/// Why a host core refused an event. On error nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HaError {
    #[error("a message about {theirs}, this pair protects {ours}")]
    WrongVm { ours: VmId, theirs: VmId },
    #[error("bad pair record: {0}")]
    BadRecord(String),
    #[error("a message of generation {theirs}, this host is at generation {ours}")]
    Generation { ours: u64, theirs: u64 },
    #[error("this host took over at generation {generation}: the sender is deposed")]
    Sealed { generation: u64 },
    #[error("a message from {from}, the primary is {primary}")]
    NotFromPrimary { from: NodeId, primary: NodeId },
    #[error("this host is not the pair's standby")]
    NotStandby,
    #[error("this host is not the pair's primary")]
    NotPrimary,
    #[error("not a message for a standby")]
    NotForStandby,
    #[error("not a message for a host (the leader's)")]
    NotForHost,
    #[error("a {mode:?} standby got a message of the other mode")]
    WrongMode { mode: HaMode },
    #[error("delta epoch {epoch} without an image to apply it on")]
    NoBase { epoch: u64 },
    #[error("update {seq} without application state to apply it on")]
    NoAppState { seq: u64 },
    #[error("{at} is too far ahead of {committed}")]
    TooFarAhead { at: u64, committed: u64 },
    #[error("page {page} of {len} bytes does not fit the VM")]
    BadPage { page: u64, len: usize },
    #[error("frame {frame} of epoch {epoch}: {why}")]
    Inconsistent { epoch: u64, frame: u32, why: &'static str },
    #[error("an acknowledgement of epoch {epoch}, never captured (the next is {next})")]
    UnknownEpoch { epoch: u64, next: u64 },
    #[error("an acknowledgement of update {seq}, never sent")]
    UnknownSeq { seq: u64 },
    #[error("a capture for {got}, the core asked for {expected:?}")]
    Capture { expected: Option<u64>, got: u64 },
    #[error("page {page} captured twice")]
    DuplicatePage { page: u64 },
    #[error("output {got} issued, the next is {expected}")]
    OutputOrder { expected: u64, got: u64 },
}

impl HaError {
    /// What the sender must be told, if anything.
    pub fn refusal(&self) -> Option<HaRefusal> {
        match self {
            Self::Generation { ours, .. } => Some(HaRefusal::Generation { generation: *ours }),
            Self::Sealed { generation } => Some(HaRefusal::Sealed { generation: *generation }),
            Self::NoBase { .. } => Some(HaRefusal::NeedFull),
            Self::NoAppState { .. } => Some(HaRefusal::NeedSnapshot),
            Self::Inconsistent { .. } | Self::BadPage { .. } | Self::WrongMode { .. } => Some(HaRefusal::Malformed),
            _ => None,
        }
    }
}

/// The refusal to send back for `msg` refused with `e`, if any.
pub fn refusal_message(vm: VmId, msg: &HaMessage, e: &HaError) -> Option<HaMessage> {
    let generation = primary_generation(msg)?;
    e.refusal().map(|refusal| HaMessage::Refused { vm, generation, refusal })
}

/// What a host keeps of a pair across restarts (the driver persists it at [`Effect::Persist`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Durable {
    /// Every primary → standby message of a generation below this is refused (the seal).
    pub sealed_below: u64,
    /// The generation this host last started (or resumed) the VM as primary through a takeover:
    /// asked to take over at it again without the guest, it answers `lost`.
    pub started_at: Option<u64>,
}

/// The mirror a primary feeds, by the record's mode and standby.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mirror {
    /// No standby: outputs are released as they come.
    Unprotected,
    Checkpoint(CheckpointPrimary),
    App(MirrorPrimary),
}

/// The primary of a pair at one generation: the output gate (`issued`, `released`) over the
/// mode's mirror. A new generation restarts the mirror (a full epoch or a snapshot first);
/// outputs not released yet wait for it.
///
/// **Invariants:** `released <= issued`; `released` only grows; a `Release` of generation `g`
/// follows an acknowledgement of `g`'s standby, or `g` has no standby.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Primary {
    pub vm: VmId,
    pub generation: u64,
    pub standby: Option<NodeId>,
    pub mode: HaMode,
    pub issued: u64,
    pub released: u64,
    pub accounting: PauseAccounting,
    tun: HaTunables,
    mirror: Mirror,
    next_epoch: u64,
    next_token: u64,
    /// A capture asked by a mirror since replaced: its result only unpauses the guest.
    stray_capture: Option<u64>,
    stray_token: Option<u64>,
    /// Released outputs the sink refused because it had seen a newer generation than this
    /// primary's: released again if this host is primary at a newer generation.
    refused: BTreeSet<u64>,
}

impl Primary {
    /// The primary of `generation`, whose guest issued `issued` outputs and released
    /// `released` of them.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        vm: VmId,
        generation: u64,
        standby: Option<NodeId>,
        mode: HaMode,
        issued: u64,
        released: u64,
        tun: HaTunables,
        now_ms: u64,
    ) -> (Self, Vec<Effect>) {
        debug_assert!(released <= issued);
        let mut p = Self {
            vm,
            generation,
            standby,
            mode,
            issued,
            released,
            accounting: PauseAccounting::default(),
            tun,
            mirror: Mirror::Unprotected,
            next_epoch: 1,
            next_token: 1,
            stray_capture: None,
            stray_token: None,
            refused: BTreeSet::new(),
        };
        let fx = p.start_mirror(now_ms);
        (p, fx)
    }

    /// A newer record keeps this host primary: restart the mirror for it.
    pub fn follow(&mut self, generation: u64, standby: Option<NodeId>, mode: HaMode, now_ms: u64) -> Vec<Effect> {
        debug_assert!(generation > self.generation);
        self.generation = generation;
        self.standby = standby;
        self.mode = mode;
        let mut fx = self.start_mirror(now_ms);
        if !self.refused.is_empty() {
            let seqs = std::mem::take(&mut self.refused).into_iter().collect();
            fx.push(Effect::ReleaseAgain { seqs, generation });
        }
        fx
    }

    /// The sink refused output `seq`, released at `generation`, having seen a newer one. An
    /// output released before is covered by any standby that can take over at this primary's
    /// generation (it was issued before that generation began), so at a newer generation it is
    /// released again at once; at this primary's own generation the sink knows a newer primary:
    /// this host is stale, keeps the output for a generation that makes it primary again, and
    /// refreshes its record.
    pub fn on_output_refused(&mut self, seq: u64, generation: u64) -> Vec<Effect> {
        if seq > self.released {
            return Vec::new();
        }
        if generation < self.generation {
            return vec![Effect::ReleaseAgain { seqs: vec![seq], generation: self.generation }];
        }
        self.refused.insert(seq);
        vec![Effect::RefreshRecord]
    }

    fn start_mirror(&mut self, now_ms: u64) -> Vec<Effect> {
        self.retire_mirror();
        let (mirror, fx) = match (self.standby, self.mode) {
            (None, _) => {
                let fx = (self.issued > self.released)
                    .then_some(Effect::Release { upto: self.issued, generation: self.generation });
                (Mirror::Unprotected, fx.into_iter().collect())
            }
            (Some(s), HaMode::Redundant { epoch_ms }) => {
                let c = CheckpointPrimary::new(
                    self.vm,
                    s,
                    self.generation,
                    epoch_ms,
                    self.next_epoch,
                    self.tun.clone(),
                    now_ms,
                );
                (Mirror::Checkpoint(c), Vec::new())
            }
            (Some(s), HaMode::MultiOperation) => {
                let token = self.next_token;
                self.next_token += 1;
                let (m, fx) = MirrorPrimary::new(self.vm, s, self.generation, token, self.tun.clone());
                (Mirror::App(m), fx)
            }
        };
        self.mirror = mirror;
        self.finish(fx)
    }

    /// Remember the old mirror's capture in progress (its result only unpauses the guest) and
    /// keep epoch numbers growing.
    fn retire_mirror(&mut self) {
        match &self.mirror {
            Mirror::Checkpoint(c) => {
                self.next_epoch = c.next_epoch();
                if let Some(cap) = c.capturing() {
                    self.stray_capture = Some(cap.epoch);
                    self.next_epoch = cap.epoch + 1;
                }
            }
            Mirror::App(m) => self.stray_token = m.capturing().or(self.stray_token),
            Mirror::Unprotected => {}
        }
    }

    /// Keep `released` monotonic (dropping releases that add nothing) and the accounting current.
    fn finish(&mut self, fx: Vec<Effect>) -> Vec<Effect> {
        fx.into_iter()
            .filter_map(|e| match e {
                Effect::Release { upto, .. } if upto <= self.released => None,
                Effect::Release { upto, generation } => {
                    debug_assert!(upto <= self.issued, "release of {upto} with {} issued", self.issued);
                    debug_assert_eq!(generation, self.generation);
                    self.released = upto;
                    Some(e)
                }
                Effect::Metric(m) => {
                    match m {
                        HaMetric::Epoch(r) => self.accounting.record(&r),
                        HaMetric::EpochAcked { lag_ms, .. } | HaMetric::UpdateAcked { lag_ms, .. } => {
                            self.accounting.record_ack(lag_ms)
                        }
                    }
                    Some(e)
                }
                e => Some(e),
            })
            .collect()
    }

    /// The guest issued output `seq` (the next one); `data` is the update in multi-operation mode.
    pub fn on_output(&mut self, seq: u64, data: Vec<u8>, now_ms: u64) -> Result<Vec<Effect>, HaError> {
        if seq != self.issued + 1 {
            return Err(HaError::OutputOrder { expected: self.issued + 1, got: seq });
        }
        self.issued = seq;
        let fx = match &mut self.mirror {
            Mirror::Unprotected => vec![Effect::Release { upto: seq, generation: self.generation }],
            Mirror::Checkpoint(_) => Vec::new(),
            Mirror::App(m) => m.on_output(seq, data, now_ms),
        };
        Ok(self.finish(fx))
    }

    /// The capture of `epoch` asked by `PauseAndCapture`.
    pub fn on_captured(
        &mut self,
        epoch: u64,
        pages: Vec<(u64, Vec<u8>)>,
        device_state: Vec<u8>,
        now_ms: u64,
    ) -> Result<Vec<Effect>, HaError> {
        if self.stray_capture == Some(epoch) {
            self.stray_capture = None;
            return Ok(vec![Effect::Unpause]);
        }
        let issued = self.issued;
        let fx = match &mut self.mirror {
            Mirror::Checkpoint(c) => c.on_captured(epoch, pages, device_state, issued, now_ms)?,
            _ => return Err(HaError::Capture { expected: None, got: epoch }),
        };
        Ok(self.finish(fx))
    }

    /// The application state asked by `CaptureAppState { token }`, covering outputs `..=seq`.
    pub fn on_app_state(&mut self, token: u64, seq: u64, state: Vec<u8>, now_ms: u64) -> Result<Vec<Effect>, HaError> {
        if self.stray_token == Some(token) {
            self.stray_token = None;
            return Ok(Vec::new());
        }
        if seq > self.issued {
            return Err(HaError::OutputOrder { expected: self.issued, got: seq });
        }
        let fx = match &mut self.mirror {
            Mirror::App(m) => m.on_app_state(token, seq, state, now_ms)?,
            _ => return Err(HaError::Capture { expected: None, got: token }),
        };
        Ok(self.finish(fx))
    }

    /// An acknowledgement or a refusal from the standby. Anything not from this generation's
    /// standby is ignored.
    pub fn on_reply(&mut self, from: NodeId, msg: &HaMessage, now_ms: u64) -> Result<Vec<Effect>, HaError> {
        if let HaMessage::Refused { refusal: HaRefusal::Generation { generation }, .. } = msg {
            let newer = *generation > self.generation;
            return Ok(newer.then_some(Effect::RefreshRecord).into_iter().collect());
        }
        if Some(from) != self.standby {
            return Ok(Vec::new());
        }
        let token = self.next_token;
        let fx = match (&mut self.mirror, msg) {
            (Mirror::Checkpoint(c), HaMessage::CheckpointAck(a)) if a.generation == self.generation => {
                c.on_ack(a.epoch, now_ms)?
            }
            (Mirror::App(m), HaMessage::AppAck(a)) if a.generation == self.generation => m.on_ack(a.seq, now_ms)?,
            (mirror, HaMessage::Refused { generation, refusal, .. }) if *generation == self.generation => {
                match (mirror, refusal) {
                    (Mirror::Checkpoint(c), HaRefusal::NeedFull | HaRefusal::Malformed) => {
                        c.on_need_full();
                        Vec::new()
                    }
                    (Mirror::App(m), HaRefusal::NeedSnapshot | HaRefusal::Malformed) => {
                        self.next_token += 1;
                        m.on_need_snapshot(token)
                    }
                    _ => Vec::new(),
                }
            }
            _ => Vec::new(),
        };
        Ok(self.finish(fx))
    }

    pub fn tick(&mut self, now_ms: u64) -> Vec<Effect> {
        let fx = match &mut self.mirror {
            Mirror::Checkpoint(c) => c.tick(now_ms),
            Mirror::App(m) => m.tick(now_ms),
            Mirror::Unprotected => Vec::new(),
        };
        self.finish(fx)
    }

    /// The mirroring lag: age of the oldest epoch or update the standby has not acknowledged.
    pub fn mirror_lag_ms(&self, now_ms: u64) -> u64 {
        match &self.mirror {
            Mirror::Checkpoint(c) => c.lag_ms(now_ms),
            Mirror::App(m) => m.lag_ms(now_ms),
            Mirror::Unprotected => 0,
        }
    }
}

/// One host's role in one pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Holds nothing of the pair.
    Idle,
    Primary(Box<Primary>),
    Standby(Box<Standby>),
    /// Was primary; another host was made primary at `at_generation` and may not have started
    /// yet. The guest is stopped and kept.
    Deposed {
        at_generation: u64,
        primary: Box<Primary>,
    },
}

/// One host's part in one pair: follows the pair's records and messages, seals and takes over.
///
/// **Invariants:** `durable.sealed_below` only grows, and no acknowledgement of a generation
/// below it ever leaves this host; the guest runs only in role `Primary`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairHost {
    pub me: NodeId,
    pub vm: VmId,
    pub durable: Durable,
    shape: ImageShape,
    tun: HaTunables,
    /// The newest generation this host heard of (from a record, a takeover order or a seal).
    generation: u64,
    record: Option<HaPairRecord>,
    role: Role,
}

impl PairHost {
    /// A host that holds nothing of the pair (yet, or any more after a restart).
    pub fn new(me: NodeId, vm: VmId, shape: ImageShape, tun: HaTunables, durable: Durable) -> Self {
        Self { me, vm, durable, shape, tun, generation: 0, record: None, role: Role::Idle }
    }

    /// The host the VM runs on when its pair is created: primary of `record`, with `issued`
    /// outputs so far, all released.
    pub fn running_here(
        me: NodeId,
        record: &HaPairRecord,
        shape: ImageShape,
        tun: HaTunables,
        issued: u64,
        now_ms: u64,
    ) -> Result<(Self, Vec<Effect>), HaError> {
        record.validate().map_err(HaError::BadRecord)?;
        if record.primary != me {
            return Err(HaError::NotPrimary);
        }
        let (p, fx) = Primary::start(
            record.vm,
            record.generation,
            record.standby,
            record.mode,
            issued,
            issued,
            tun.clone(),
            now_ms,
        );
        let mut host = Self::new(me, record.vm, shape, tun, Durable::default());
        host.generation = record.generation;
        host.record = Some(record.clone());
        host.role = Role::Primary(Box::new(p));
        Ok((host, fx))
    }

    pub fn role(&self) -> &Role {
        &self.role
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn record(&self) -> Option<&HaPairRecord> {
        self.record.as_ref()
    }

    pub fn primary(&self) -> Option<&Primary> {
        match &self.role {
            Role::Primary(p) => Some(p),
            _ => None,
        }
    }

    pub fn standby(&self) -> Option<&Standby> {
        match &self.role {
            Role::Standby(s) => Some(s),
            _ => None,
        }
    }

    pub fn standby_mut(&mut self) -> Option<&mut Standby> {
        match &mut self.role {
            Role::Standby(s) => Some(s),
            _ => None,
        }
    }

    /// This pair's line in the host's heartbeat.
    pub fn status(&self) -> PairStatus {
        let holding = match &self.role {
            Role::Idle => Holding::Nothing,
            Role::Primary(_) => Holding::Primary,
            Role::Deposed { .. } => Holding::Deposed,
            Role::Standby(s) if s.ready() => Holding::StandbyReady,
            Role::Standby(_) => Holding::StandbySyncing,
        };
        PairStatus { vm: self.vm, generation: self.generation, holding }
    }

    // ---- records ----------------------------------------------------------------------------

    /// A record from the catalog. Older or equal generations than the newest record seen change
    /// nothing.
    pub fn on_record(&mut self, record: &HaPairRecord, now_ms: u64) -> Result<Vec<Effect>, HaError> {
        if record.vm != self.vm {
            return Err(HaError::WrongVm { ours: self.vm, theirs: record.vm });
        }
        record.validate().map_err(HaError::BadRecord)?;
        if self.record.as_ref().is_some_and(|k| k.generation >= record.generation) {
            return Ok(Vec::new());
        }
        self.record = Some(record.clone());
        self.generation = self.generation.max(record.generation);
        let role = std::mem::replace(&mut self.role, Role::Idle);
        let (role, fx) = if record.primary == self.me {
            self.as_primary(role, record, now_ms)
        } else if record.standby == Some(self.me) {
            self.as_standby(role, record)
        } else {
            self.as_other(role, record)
        };
        self.role = role;
        Ok(fx)
    }

    fn as_primary(&mut self, role: Role, r: &HaPairRecord, now_ms: u64) -> (Role, Vec<Effect>) {
        match role {
            Role::Primary(mut p) if r.generation > p.generation => {
                let fx = p.follow(r.generation, r.standby, r.mode, now_ms);
                (Role::Primary(p), fx)
            }
            Role::Standby(s) if r.generation > s.generation => self.take_over(*s, r.generation, Some(r), now_ms),
            Role::Deposed { at_generation, primary } if r.generation > at_generation => {
                self.resume(primary, r.generation, r.standby, r.mode, now_ms)
            }
            // The guest is not here (this host restarted): the leader sees `Nothing` and fails
            // over, or, while failing over to this host, hears that it cannot take over.
            other => (other, Vec::new()),
        }
    }

    fn as_standby(&mut self, role: Role, r: &HaPairRecord) -> (Role, Vec<Effect>) {
        let fresh = || Role::Standby(Box::new(Standby::new(r, self.shape, self.tun.clone())));
        match role {
            Role::Standby(mut s) if r.generation > s.generation => {
                s.follow(r);
                (Role::Standby(s), Vec::new())
            }
            Role::Standby(s) => (Role::Standby(s), Vec::new()),
            Role::Primary(_) | Role::Deposed { .. } => (fresh(), vec![Effect::DiscardGuest]),
            Role::Idle => (fresh(), Vec::new()),
        }
    }

    /// Another host is primary. While it is still taking over, a former primary keeps its guest
    /// stopped (the takeover may fail and hand the VM back); after, it drops it.
    fn as_other(&mut self, role: Role, r: &HaPairRecord) -> (Role, Vec<Effect>) {
        let failing_over = r.state == PairState::FailingOver;
        match role {
            Role::Primary(primary) if failing_over => {
                (Role::Deposed { at_generation: r.generation, primary }, vec![Effect::StopGuest])
            }
            Role::Deposed { at_generation, primary } if failing_over => {
                (Role::Deposed { at_generation, primary }, vec![])
            }
            Role::Primary(_) | Role::Deposed { .. } => (Role::Idle, vec![Effect::DiscardGuest]),
            Role::Standby(_) | Role::Idle => (Role::Idle, Vec::new()),
        }
    }

    // ---- seal and takeover ------------------------------------------------------------------

    /// Seal at `generation` and start from the standby's newest state. Without one, the host
    /// stays sealed and empty (`Idle`).
    fn take_over(
        &mut self,
        s: Standby,
        generation: u64,
        record: Option<&HaPairRecord>,
        now_ms: u64,
    ) -> (Role, Vec<Effect>) {
        self.durable.sealed_below = self.durable.sealed_below.max(generation);
        let (old_primary, mode) = (s.primary, s.mode);
        let Some(state) = s.take_over() else {
            return (Role::Idle, vec![Effect::Persist(self.durable)]);
        };
        self.durable.started_at = Some(generation);
        let (standby, mode) = record.map_or((None, mode), |r| (r.standby, r.mode));
        let outputs = state.outputs();
        let (p, pfx) = Primary::start(self.vm, generation, standby, mode, outputs, 0, self.tun.clone(), now_ms);
        let seal = HaMessage::Seal { vm: self.vm, generation };
        let mut fx = vec![
            Effect::Persist(self.durable),
            Effect::StartGuest { generation, state },
            Effect::Send { to: old_primary, msg: seal },
        ];
        fx.extend(pfx);
        (Role::Primary(Box::new(p)), fx)
    }

    /// The deposed guest is the VM again at `generation` (its takeover elsewhere failed).
    fn resume(
        &mut self,
        mut p: Box<Primary>,
        generation: u64,
        standby: Option<NodeId>,
        mode: HaMode,
        now_ms: u64,
    ) -> (Role, Vec<Effect>) {
        self.durable.started_at = Some(generation);
        let mut fx = vec![Effect::Persist(self.durable), Effect::RestartGuest];
        fx.extend(p.follow(generation, standby, mode, now_ms));
        (Role::Primary(p), fx)
    }

    /// The leader's order after a failover to this host committed at `generation`. Answers
    /// `TookOver` once the VM runs here at `generation`, `CannotTakeOver` when this host holds
    /// nothing (`lost` if it had started the VM at `generation`: it may have released outputs
    /// there that exist nowhere else), nothing to a stale order.
    fn on_take_over(&mut self, from: NodeId, generation: u64, now_ms: u64) -> Vec<Effect> {
        self.generation = self.generation.max(generation);
        let role = std::mem::replace(&mut self.role, Role::Idle);
        let (role, mut fx) = match role {
            Role::Primary(mut p) if p.generation < generation => {
                self.durable.started_at = Some(generation);
                let mut fx = vec![Effect::Persist(self.durable)];
                fx.extend(p.follow(generation, None, p.mode, now_ms));
                (Role::Primary(p), fx)
            }
            Role::Standby(s) if s.generation < generation => self.take_over(*s, generation, None, now_ms),
            Role::Deposed { at_generation, primary } if generation > at_generation => {
                let mode = primary.mode;
                self.resume(primary, generation, None, mode, now_ms)
            }
            Role::Idle => {
                self.durable.sealed_below = self.durable.sealed_below.max(generation);
                (Role::Idle, vec![Effect::Persist(self.durable)])
            }
            other => (other, Vec::new()),
        };
        self.role = role;
        let vm = self.vm;
        let answer = match &self.role {
            Role::Primary(p) if p.generation == generation => Some(HaMessage::TookOver { vm, generation }),
            Role::Idle => {
                let lost = self.durable.started_at == Some(generation);
                Some(HaMessage::CannotTakeOver { vm, generation, lost })
            }
            _ => None,
        };
        fx.extend(answer.map(|msg| Effect::Send { to: from, msg }));
        fx
    }

    /// A seal (from the new primary, or its refusal of this host's message): if it names a
    /// newer generation than this host's, this host is deposed.
    fn on_seal(&mut self, generation: u64) -> Vec<Effect> {
        let role = std::mem::replace(&mut self.role, Role::Idle);
        let (role, fx) = match role {
            Role::Primary(p) if generation > p.generation => {
                self.generation = self.generation.max(generation);
                (
                    Role::Deposed { at_generation: generation, primary: p },
                    vec![Effect::StopGuest, Effect::RefreshRecord],
                )
            }
            other => (other, Vec::new()),
        };
        self.role = role;
        fx
    }

    // ---- messages ---------------------------------------------------------------------------

    /// A message from a peer (`from`: its sender, as the transport authenticated it).
    pub fn on_message(&mut self, from: NodeId, msg: &HaMessage, now_ms: u64) -> Result<Vec<Effect>, HaError> {
        match msg.vm() {
            Some(vm) if vm == self.vm => {}
            Some(vm) => return Err(HaError::WrongVm { ours: self.vm, theirs: vm }),
            None => return Err(HaError::NotForHost),
        }
        match msg {
            HaMessage::Checkpoint(_) | HaMessage::AppSnapshot(_) | HaMessage::AppUpdate(_) => {
                self.on_primary_message(from, msg)
            }
            HaMessage::Refused { refusal: HaRefusal::Sealed { generation }, .. }
            | HaMessage::Seal { generation, .. } => Ok(self.on_seal(*generation)),
            HaMessage::CheckpointAck(_) | HaMessage::AppAck(_) | HaMessage::Refused { .. } => match &mut self.role {
                Role::Primary(p) => p.on_reply(from, msg, now_ms),
                _ => Ok(Vec::new()),
            },
            HaMessage::TakeOver { generation, .. } => Ok(self.on_take_over(from, *generation, now_ms)),
            HaMessage::TookOver { .. } | HaMessage::CannotTakeOver { .. } | HaMessage::Heartbeat(_) => {
                Err(HaError::NotForHost)
            }
        }
    }

    /// A checkpoint frame, snapshot or update: only a standby of the sender's generation that
    /// has not sealed it takes one.
    fn on_primary_message(&mut self, from: NodeId, msg: &HaMessage) -> Result<Vec<Effect>, HaError> {
        let generation = primary_generation(msg).ok_or(HaError::NotForStandby)?;
        if generation < self.durable.sealed_below {
            return Err(HaError::Sealed { generation: self.durable.sealed_below });
        }
        match &mut self.role {
            Role::Standby(s) => s.on_message(from, msg),
            Role::Primary(p) if generation < p.generation => Err(HaError::Sealed { generation: p.generation }),
            _ if generation != self.generation => {
                Err(HaError::Generation { ours: self.generation, theirs: generation })
            }
            _ => Err(HaError::NotStandby),
        }
    }

    // ---- the guest --------------------------------------------------------------------------

    pub fn on_output(&mut self, seq: u64, data: Vec<u8>, now_ms: u64) -> Result<Vec<Effect>, HaError> {
        match &mut self.role {
            Role::Primary(p) => p.on_output(seq, data, now_ms),
            _ => Err(HaError::NotPrimary),
        }
    }

    /// A capture's result. A deposed host keeps its guest stopped (no `Unpause`).
    pub fn on_captured(
        &mut self,
        epoch: u64,
        pages: Vec<(u64, Vec<u8>)>,
        device_state: Vec<u8>,
        now_ms: u64,
    ) -> Result<Vec<Effect>, HaError> {
        match &mut self.role {
            Role::Primary(p) => p.on_captured(epoch, pages, device_state, now_ms),
            Role::Deposed { .. } => Ok(Vec::new()),
            _ => Err(HaError::Capture { expected: None, got: epoch }),
        }
    }

    pub fn on_app_state(&mut self, token: u64, seq: u64, state: Vec<u8>, now_ms: u64) -> Result<Vec<Effect>, HaError> {
        match &mut self.role {
            Role::Primary(p) => p.on_app_state(token, seq, state, now_ms),
            Role::Deposed { .. } => Ok(Vec::new()),
            _ => Err(HaError::Capture { expected: None, got: token }),
        }
    }

    pub fn tick(&mut self, now_ms: u64) -> Vec<Effect> {
        match &mut self.role {
            Role::Primary(p) => p.tick(now_ms),
            Role::Standby(s) => s.tick(now_ms),
            _ => Vec::new(),
        }
    }

    /// The sink refused output `seq` released at `generation` (it saw a newer generation). A
    /// primary releases it again at its newer generation; a deposed host keeps it in case the VM
    /// comes back (a fail-back), so no output it released is missing from the outside.
    pub fn on_output_refused(&mut self, seq: u64, generation: u64) -> Vec<Effect> {
        match &mut self.role {
            Role::Primary(p) => p.on_output_refused(seq, generation),
            Role::Deposed { primary, .. } => {
                primary.on_output_refused(seq, u64::MAX);
                Vec::new()
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use haven_proto::ha::{Checkpoint, FailoverRecord};

    use super::*;

    const VM: VmId = VmId(4);
    const SHAPE: ImageShape = ImageShape { pages: 4, page_size: 8 };
    const P: NodeId = NodeId(1);
    const S: NodeId = NodeId(2);
    const LEADER: NodeId = NodeId(9);

    fn record(generation: u64) -> HaPairRecord {
        HaPairRecord {
            vm: VM,
            primary: P,
            standby: Some(S),
            mode: HaMode::Redundant { epoch_ms: 20 },
            state: PairState::Protecting,
            generation,
            failovers: 0,
            last_failover: None,
        }
    }

    fn failed_over(generation: u64) -> HaPairRecord {
        let f = FailoverRecord { at_ms: 0, from: P, to: S, reason: "test".into(), took_ms: 0 };
        HaPairRecord {
            primary: S,
            standby: None,
            state: PairState::FailingOver,
            failovers: 1,
            last_failover: Some(f),
            ..record(generation)
        }
    }

    fn full_frame(generation: u64, epoch: u64, outputs: u64) -> HaMessage {
        HaMessage::Checkpoint(Checkpoint {
            vm: VM,
            generation,
            epoch,
            frame: 0,
            full: true,
            last: true,
            outputs,
            pages: vec![(1, vec![epoch as u8; 8])],
            device_state: vec![7],
        })
    }

    fn standby_host() -> PairHost {
        let mut s = PairHost::new(S, VM, SHAPE, HaTunables::default(), Durable::default());
        s.on_record(&record(1), 0).unwrap();
        s
    }

    fn sent(fx: &[Effect]) -> Vec<&HaMessage> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Send { msg, .. } => Some(msg),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_takeover_persists_the_seal_before_it_starts_and_refuses_the_old_primary_after() {
        let mut s = standby_host();
        assert!(matches!(sent(&s.on_message(P, &full_frame(1, 3, 5), 0).unwrap())[..], [HaMessage::CheckpointAck(_)]));
        let fx = s.on_message(LEADER, &HaMessage::TakeOver { vm: VM, generation: 2 }, 10).unwrap();
        let durable = Durable { sealed_below: 2, started_at: Some(2) };
        assert_eq!(fx[0], Effect::Persist(durable), "persisted first: {fx:?}");
        let Effect::StartGuest { generation: 2, state: TakeoverState::Image(image) } = &fx[1] else { panic!("{fx:?}") };
        assert_eq!((image.epoch, image.outputs), (3, 5));
        assert!(fx.contains(&Effect::Release { upto: 5, generation: 2 }), "re-released, unprotected: {fx:?}");
        let msgs = sent(&fx);
        assert!(msgs.contains(&&HaMessage::Seal { vm: VM, generation: 2 }));
        assert!(msgs.contains(&&HaMessage::TookOver { vm: VM, generation: 2 }));
        let e = s.on_message(P, &full_frame(1, 4, 6), 20).unwrap_err();
        assert_eq!(e, HaError::Sealed { generation: 2 });
        // Killed before its catalog showed the failover: the seal survives in `Durable`.
        let mut restarted = PairHost::new(S, VM, SHAPE, HaTunables::default(), durable);
        restarted.on_record(&record(1), 30).unwrap();
        assert_eq!(restarted.on_message(P, &full_frame(1, 4, 6), 40).unwrap_err(), HaError::Sealed { generation: 2 });
        let fx = restarted.on_message(LEADER, &HaMessage::TakeOver { vm: VM, generation: 2 }, 50).unwrap();
        assert!(sent(&fx).contains(&&HaMessage::CannotTakeOver { vm: VM, generation: 2, lost: true }));
    }

    #[test]
    fn a_standby_without_state_cannot_take_over_and_says_so() {
        let mut s = standby_host();
        let fx = s.on_message(LEADER, &HaMessage::TakeOver { vm: VM, generation: 2 }, 0).unwrap();
        let durable = Durable { sealed_below: 2, started_at: None };
        assert_eq!(fx[0], Effect::Persist(durable));
        assert!(sent(&fx).contains(&&HaMessage::CannotTakeOver { vm: VM, generation: 2, lost: false }));
        assert_eq!(s.status().holding, Holding::Nothing);
        assert_eq!(s.on_message(P, &full_frame(1, 1, 0), 5).unwrap_err(), HaError::Sealed { generation: 2 });
    }

    #[test]
    fn a_deposed_primary_keeps_its_guest_until_the_takeover_is_recorded_and_can_get_it_back() {
        let (mut p, _) = PairHost::running_here(P, &record(1), SHAPE, HaTunables::default(), 3, 0).unwrap();
        assert_eq!(p.on_output(4, vec![], 1).unwrap(), vec![], "gated: a standby is assigned");
        let fx = p.on_message(S, &HaMessage::Seal { vm: VM, generation: 2 }, 2).unwrap();
        assert_eq!(fx, vec![Effect::StopGuest, Effect::RefreshRecord]);
        assert_eq!(p.status().holding, Holding::Deposed);
        assert!(p.on_message(S, &HaMessage::Seal { vm: VM, generation: 2 }, 3).unwrap().is_empty());
        assert!(p.on_record(&failed_over(2), 4).unwrap().is_empty(), "still failing over: keep the guest");
        let back = HaPairRecord {
            primary: P,
            last_failover: Some(FailoverRecord { at_ms: 0, from: S, to: P, reason: "back".into(), took_ms: 0 }),
            failovers: 2,
            generation: 3,
            ..failed_over(3)
        };
        let fx = p.on_record(&back, 5).unwrap();
        assert_eq!(fx[..2], [Effect::Persist(Durable { sealed_below: 0, started_at: Some(3) }), Effect::RestartGuest]);
        assert!(fx.contains(&Effect::Release { upto: 4, generation: 3 }), "{fx:?}");
        let done = HaPairRecord { standby: Some(S), state: PairState::Protecting, generation: 4, ..back.clone() };
        p.on_record(&done, 6).unwrap();
        let moved = HaPairRecord { primary: S, standby: None, state: PairState::Degraded, generation: 5, ..done };
        assert_eq!(p.on_record(&moved, 7).unwrap(), vec![Effect::DiscardGuest]);
        assert_eq!(p.status().holding, Holding::Nothing);
    }

    #[test]
    fn refused_outputs_are_released_again_only_by_a_newer_primary() {
        let r = HaPairRecord { standby: None, state: PairState::Degraded, ..record(1) };
        let (mut p, _) = PairHost::running_here(P, &r, SHAPE, HaTunables::default(), 0, 0).unwrap();
        assert_eq!(p.on_output(1, vec![], 0).unwrap(), vec![Effect::Release { upto: 1, generation: 1 }]);
        assert!(p.on_output_refused(2, 1).is_empty(), "never released");
        assert_eq!(p.on_output_refused(1, 1), vec![Effect::RefreshRecord], "the sink knows a newer primary");
        let next = HaPairRecord { generation: 2, ..r };
        let fx = p.on_record(&next, 1).unwrap();
        assert_eq!(fx, vec![Effect::ReleaseAgain { seqs: vec![1], generation: 2 }]);
        assert_eq!(p.on_output_refused(1, 1), vec![Effect::ReleaseAgain { seqs: vec![1], generation: 2 }]);
    }

    #[test]
    fn tunables_are_checked() {
        assert!(HaTunables::default().check().is_ok());
        let bad = [
            HaTunables { heartbeat_loss_ms: 200, ..HaTunables::default() },
            HaTunables { max_epochs_in_flight: 9, ..HaTunables::default() },
            HaTunables { frame_pages: 0, ..HaTunables::default() },
        ];
        assert!(bad.iter().all(|t| t.check().is_err()));
    }
}
