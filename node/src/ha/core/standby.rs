//! The standby side of a pair: what it holds to take over from, and the acknowledgements that let
//! the primary release outputs. In redundant mode it stages the frames of each checkpoint epoch
//! and commits an epoch only when all its frames are in, in one step ([`ImageReceiver`]: a full
//! epoch replaces the image, a delta epoch applies on the one before it); it acknowledges an
//! epoch only after committing it. In multi-operation mode it holds the application state
//! ([`super::mirror::AppMirror`]).
//!
//! A standby of generation `g` refuses messages of another generation, from anyone but the
//! primary of `g`, duplicate or stale frames (re-acknowledged, never applied twice), frames too
//! far ahead of its image, delta epochs without a base (`NeedFull`), and pages that do not fit
//! the VM. Sealing and takeover are `super::PairHost`'s: it checks the seal before a message gets
//! here, and [`Standby::take_over`] hands over the state to start from — the newest committed
//! checkpoint or application state of this generation, else the one kept from the generation
//! before (`fallback`: only across a mode switch, when nothing could have been released since).
//!
//! Must not: do I/O, read a clock, acknowledge anything it has not committed, or start a guest.

use std::collections::{BTreeMap, BTreeSet};

use haven_proto::ha::{AppAck, Checkpoint};
use haven_proto::ha::{CheckpointAck, HaMessage, HaMode, HaPairRecord, HaRefusal, PairState};
use haven_proto::ids::{NodeId, VmId};

use super::mirror::{AppMirror, AppState};
use super::{Effect, HaError, HaTunables};

/// The VM's memory layout, from its catalog record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageShape {
    pub pages: u64,
    pub page_size: u32,
}

/// A committed checkpoint: the VM's memory (pages absent are zero) and device state as captured
/// at `epoch` of `generation`, holding the guest's outputs `..=outputs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub generation: u64,
    pub epoch: u64,
    pub outputs: u64,
    pub pages: BTreeMap<u64, Vec<u8>>,
    pub device_state: Vec<u8>,
}

/// What a standby starts the VM from when it takes over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakeoverState {
    Image(Image),
    App(AppState),
}

impl TakeoverState {
    /// Outputs `..=outputs()` are in the state (the new primary re-releases them).
    pub fn outputs(&self) -> u64 {
        match self {
            Self::Image(i) => i.outputs,
            Self::App(a) => a.applied(),
        }
    }

    /// Where in the mirror it comes from: `(generation, epoch)` or `(generation, seq)`.
    pub fn point(&self) -> (u64, u64) {
        match self {
            Self::Image(i) => (i.generation, i.epoch),
            Self::App(a) => (a.generation, a.applied()),
        }
    }
}

/// The frames of one epoch received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Staged {
    full: bool,
    frames: BTreeSet<u32>,
    last: Option<u32>,
    pages: BTreeMap<u64, Vec<u8>>,
    device_state: Vec<u8>,
    outputs: u64,
}

impl Staged {
    fn complete(&self) -> bool {
        self.last.is_some_and(|n| self.frames.len() as u64 == u64::from(n) + 1)
    }

    /// Whether frame `f` fits what is staged: `Ok(false)` for a duplicate.
    fn check(&self, f: &Checkpoint) -> Result<bool, HaError> {
        let bad = |why| HaError::Inconsistent { epoch: f.epoch, frame: f.frame, why };
        if f.full != self.full {
            return Err(bad("full and delta frames in one epoch"));
        }
        if self.frames.contains(&f.frame) {
            return Ok(false);
        }
        if self.last.is_some_and(|n| f.frame > n) {
            return Err(bad("a frame after the last one"));
        }
        if f.last && (self.last.is_some() || self.frames.last().is_some_and(|&n| n > f.frame)) {
            return Err(bad("a second last frame"));
        }
        Ok(true)
    }

    fn add(&mut self, f: &Checkpoint) {
        self.frames.insert(f.frame);
        self.pages.extend(f.pages.iter().cloned());
        if f.last {
            self.last = Some(f.frame);
            self.device_state = f.device_state.clone();
            self.outputs = f.outputs;
        }
    }
}

/// Redundant mode's receiver of one generation: the committed image and the epochs staged.
///
/// **Invariants:** `committed` changes only by a whole epoch — a complete full epoch newer than
/// it, or the complete delta epoch right after it; staged epochs are all newer than it and at
/// most `max_staged`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReceiver {
    generation: u64,
    shape: ImageShape,
    max_staged: usize,
    committed: Option<Image>,
    staged: BTreeMap<u64, Staged>,
}

impl ImageReceiver {
    pub fn new(generation: u64, shape: ImageShape, max_staged: usize) -> Self {
        Self { generation, shape, max_staged, committed: None, staged: BTreeMap::new() }
    }

    pub fn committed(&self) -> Option<&Image> {
        self.committed.as_ref()
    }

    /// Take one frame. Returns the epoch to acknowledge: the committed one, when this frame
    /// completed an epoch or was a late copy of a committed one; `None` while staging.
    pub fn on_frame(&mut self, f: &Checkpoint) -> Result<Option<u64>, HaError> {
        let committed = self.committed.as_ref().map(|i| i.epoch);
        if let Some(c) = committed.filter(|c| f.epoch <= *c) {
            return Ok(Some(c));
        }
        let base_coming = self.staged.iter().any(|(e, s)| s.full && *e < f.epoch);
        if committed.is_none() && !f.full && !base_coming {
            return Err(HaError::NoBase { epoch: f.epoch });
        }
        self.check_pages(f)?;
        if f.last {
            self.check_outputs(f)?;
        }
        let fresh = match self.staged.get(&f.epoch) {
            Some(st) => st.check(f)?,
            None if self.staged.len() >= self.max_staged => {
                return Err(HaError::TooFarAhead { at: f.epoch, committed: committed.unwrap_or(0) })
            }
            None => true,
        };
        if !fresh {
            return Ok(None);
        }
        let st = self.staged.entry(f.epoch).or_insert_with(|| Staged {
            full: f.full,
            frames: BTreeSet::new(),
            last: None,
            pages: BTreeMap::new(),
            device_state: Vec::new(),
            outputs: 0,
        });
        st.add(f);
        Ok(self.commit_ready().then(|| self.committed.as_ref().map_or(0, |i| i.epoch)))
    }

    /// A generation's outputs only grow from epoch to epoch: a last frame claiming fewer than an
    /// epoch before it (committed or staged) or more than a staged one after it is refused
    /// (fuzz target `ha_pair` found the standby taking one and asserting later).
    fn check_outputs(&self, f: &Checkpoint) -> Result<(), HaError> {
        use std::ops::Bound::{Excluded, Unbounded};
        let bad = |why| Err(HaError::Inconsistent { epoch: f.epoch, frame: f.frame, why });
        let last = |s: &&Staged| s.last.is_some();
        let staged_before = self.staged.range(..f.epoch).map(|(_, s)| s).filter(last).map(|s| s.outputs).max();
        let floor = self.committed.as_ref().map_or(0, |i| i.outputs).max(staged_before.unwrap_or(0));
        if f.outputs < floor {
            return bad("fewer outputs than an epoch before it");
        }
        if self.staged.range((Excluded(f.epoch), Unbounded)).map(|(_, s)| s).filter(last).any(|s| s.outputs < f.outputs)
        {
            return bad("more outputs than an epoch after it");
        }
        Ok(())
    }

    fn check_pages(&self, f: &Checkpoint) -> Result<(), HaError> {
        let bad = f.pages.iter().find(|(p, b)| *p >= self.shape.pages || b.len() != self.shape.page_size as usize);
        match bad {
            Some((page, bytes)) => Err(HaError::BadPage { page: *page, len: bytes.len() }),
            None => Ok(()),
        }
    }

    /// Commit what is complete: the newest complete full epoch beyond the image, then each
    /// complete delta that follows. True if anything was committed.
    fn commit_ready(&mut self) -> bool {
        let committed = self.committed.as_ref().map(|i| i.epoch);
        let full = self.staged.iter().rev().find(|(_, s)| s.full && s.complete()).map(|(e, _)| *e);
        let mut progressed = false;
        if let Some(e) = full.filter(|e| committed.is_none_or(|c| *e > c)) {
            self.commit_full(e);
            progressed = true;
        }
        while let Some(image) = &self.committed {
            let next = image.epoch + 1;
            if !self.staged.get(&next).is_some_and(|s| !s.full && s.complete()) {
                break;
            }
            self.commit_delta(next);
            progressed = true;
        }
        progressed
    }

    fn commit_full(&mut self, epoch: u64) {
        let Some(st) = self.staged.remove(&epoch) else { return };
        self.staged = self.staged.split_off(&(epoch + 1));
        self.committed = Some(Image {
            generation: self.generation,
            epoch,
            outputs: st.outputs,
            pages: st.pages,
            device_state: st.device_state,
        });
    }

    fn commit_delta(&mut self, epoch: u64) {
        let (Some(st), Some(image)) = (self.staged.remove(&epoch), self.committed.as_mut()) else { return };
        debug_assert!(st.outputs >= image.outputs, "epoch {epoch} covers fewer outputs than the one before");
        image.pages.extend(st.pages);
        image.epoch = epoch;
        image.outputs = st.outputs;
        image.device_state = st.device_state;
    }
}

/// What a standby receives into, by mode.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Receiver {
    Image(ImageReceiver),
    App(AppMirror),
}

impl Receiver {
    fn new(mode: HaMode, generation: u64, shape: ImageShape, tun: &HaTunables) -> Self {
        match mode {
            HaMode::Redundant { .. } => Self::Image(ImageReceiver::new(generation, shape, tun.max_staged_epochs)),
            HaMode::MultiOperation => Self::App(AppMirror::new(generation)),
        }
    }

    fn state(&self) -> Option<TakeoverState> {
        match self {
            Self::Image(r) => r.committed().cloned().map(TakeoverState::Image),
            Self::App(m) => m.state().cloned().map(TakeoverState::App),
        }
    }

    fn into_state(self) -> Option<TakeoverState> {
        match self {
            Self::Image(r) => r.committed.map(TakeoverState::Image),
            Self::App(m) => m.into_state().map(TakeoverState::App),
        }
    }
}

/// The standby of one pair on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standby {
    pub vm: VmId,
    pub primary: NodeId,
    pub generation: u64,
    pub mode: HaMode,
    shape: ImageShape,
    tun: HaTunables,
    receiver: Receiver,
    /// The state committed in the generation before, kept across a mode switch until this
    /// generation commits one.
    fallback: Option<TakeoverState>,
    /// When this standby last asked for a snapshot (volatile).
    asked_ms: Option<u64>,
}

impl Standby {
    /// A fresh standby for `record` (which names this host standby): it holds nothing yet.
    pub fn new(record: &HaPairRecord, shape: ImageShape, tun: HaTunables) -> Self {
        Self {
            vm: record.vm,
            primary: record.primary,
            generation: record.generation,
            mode: record.mode,
            shape,
            receiver: Receiver::new(record.mode, record.generation, shape, &tun),
            tun,
            fallback: None,
            asked_ms: None,
        }
    }

    /// A newer record that names this host standby again. Only a mode switch — the very next
    /// generation, same primary, still protecting — keeps what was committed as the fallback:
    /// the primary released nothing there that this host has not acknowledged. Anything else
    /// (a generation skipped, another primary) starts over empty.
    pub fn follow(&mut self, record: &HaPairRecord) {
        debug_assert!(record.standby.is_some() && record.generation > self.generation);
        let switch = record.generation == self.generation + 1
            && record.primary == self.primary
            && record.state == PairState::Protecting;
        let kept = match switch {
            true => self.receiver.state().or(self.fallback.take()),
            false => None,
        };
        *self = Self { fallback: kept, ..Self::new(record, self.shape, self.tun.clone()) };
    }

    /// Holds a state to take over from.
    pub fn ready(&self) -> bool {
        self.fallback.is_some()
            || match &self.receiver {
                Receiver::Image(r) => r.committed().is_some(),
                Receiver::App(m) => m.ready(),
            }
    }

    /// The epoch (redundant) or update (multi-operation) a takeover would start from now,
    /// without copying the state.
    pub fn point(&self) -> Option<u64> {
        let now = match &self.receiver {
            Receiver::Image(r) => r.committed().map(|i| i.epoch),
            Receiver::App(m) => m.state().map(AppState::applied),
        };
        now.or_else(|| self.fallback.as_ref().map(|f| f.point().1))
    }

    /// This generation's multi-operation state, borrowed (the driver folds it as it grows).
    pub fn app_state(&self) -> Option<&AppState> {
        match &self.receiver {
            Receiver::App(m) => m.state(),
            Receiver::Image(_) => None,
        }
    }

    /// Replace the multi-operation snapshot by `snapshot`, the driver's fold of the state up to
    /// update `seq`, and drop the updates it covers (bounds what a standby keeps).
    pub fn compact_app(&mut self, seq: u64, snapshot: Vec<u8>) {
        if let Receiver::App(m) = &mut self.receiver {
            m.compact(seq, snapshot);
        }
    }

    /// What a takeover would start from now.
    pub fn state(&self) -> Option<TakeoverState> {
        self.receiver.state().or_else(|| self.fallback.clone())
    }

    /// A multi-operation standby without state asks for a snapshot every few retransmission
    /// periods: an idle primary sends no update that would draw the `NeedSnapshot` refusal, so a
    /// standby that restarted would otherwise wait forever. (In redundant mode the primary's
    /// next delta epoch draws `NeedFull`.)
    pub fn tick(&mut self, now_ms: u64) -> Vec<Effect> {
        let empty = matches!(&self.receiver, Receiver::App(m) if !m.ready());
        let due = self.asked_ms.is_none_or(|t| now_ms >= t + 4 * self.tun.retransmit_ms);
        if !empty || !due {
            return Vec::new();
        }
        self.asked_ms = Some(now_ms);
        let ask = HaMessage::Refused { vm: self.vm, generation: self.generation, refusal: HaRefusal::NeedSnapshot };
        vec![Effect::Send { to: self.primary, msg: ask }]
    }

    /// The state to start from: this generation's newest, else the fallback.
    pub fn take_over(self) -> Option<TakeoverState> {
        self.receiver.into_state().or(self.fallback)
    }

    /// A message from the primary: returns the acknowledgement to send, if any. On error nothing
    /// changed.
    pub fn on_message(&mut self, from: NodeId, msg: &HaMessage) -> Result<Vec<Effect>, HaError> {
        let generation = primary_generation(msg).ok_or(HaError::NotForStandby)?;
        if generation != self.generation {
            return Err(HaError::Generation { ours: self.generation, theirs: generation });
        }
        if from != self.primary {
            return Err(HaError::NotFromPrimary { from, primary: self.primary });
        }
        let ack = match (&mut self.receiver, msg) {
            (Receiver::Image(r), HaMessage::Checkpoint(f)) => r.on_frame(f)?.map(Ack::Epoch),
            (Receiver::App(m), HaMessage::AppSnapshot(s)) => Some(Ack::Seq(m.on_snapshot(s))),
            (Receiver::App(m), HaMessage::AppUpdate(u)) => m.on_update(u)?.map(Ack::Seq),
            _ => return Err(HaError::WrongMode { mode: self.mode }),
        };
        let ack = ack.map(|a| match a {
            Ack::Epoch(epoch) => self.checkpoint_ack(epoch),
            Ack::Seq(seq) => self.app_ack(seq),
        });
        Ok(ack.map(|msg| Effect::Send { to: self.primary, msg }).into_iter().collect())
    }

    fn checkpoint_ack(&self, epoch: u64) -> HaMessage {
        HaMessage::CheckpointAck(CheckpointAck { vm: self.vm, generation: self.generation, epoch })
    }

    fn app_ack(&self, seq: u64) -> HaMessage {
        HaMessage::AppAck(AppAck { vm: self.vm, generation: self.generation, seq })
    }
}

enum Ack {
    Epoch(u64),
    Seq(u64),
}

/// The generation of a primary → standby message.
pub fn primary_generation(msg: &HaMessage) -> Option<u64> {
    match msg {
        HaMessage::Checkpoint(c) => Some(c.generation),
        HaMessage::AppSnapshot(s) => Some(s.generation),
        HaMessage::AppUpdate(u) => Some(u.generation),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: ImageShape = ImageShape { pages: 8, page_size: 4 };

    fn frame(epoch: u64, frame: u32, last: bool, full: bool, pages: &[u64]) -> Checkpoint {
        Checkpoint {
            vm: VmId(1),
            generation: 5,
            epoch,
            frame,
            full,
            last,
            outputs: epoch * 10,
            pages: pages.iter().map(|&p| (p, vec![epoch as u8; 4])).collect(),
            device_state: if last { vec![epoch as u8] } else { vec![] },
        }
    }

    #[test]
    fn an_epoch_commits_only_when_complete_and_in_order() {
        let mut r = ImageReceiver::new(5, SHAPE, 4);
        assert!(matches!(r.on_frame(&frame(1, 0, true, false, &[0])), Err(HaError::NoBase { epoch: 1 })));
        assert_eq!(r.on_frame(&frame(1, 1, true, true, &[2])).unwrap(), None, "frame 0 is missing");
        assert_eq!(r.on_frame(&frame(2, 0, true, false, &[2])).unwrap(), None, "epoch 1 is not committed");
        assert!(r.committed().is_none());
        assert_eq!(r.on_frame(&frame(1, 0, false, true, &[0, 1])).unwrap(), Some(2), "1 then the staged 2");
        let image = r.committed().unwrap();
        assert_eq!((image.epoch, image.outputs, image.device_state.clone()), (2, 20, vec![2]));
        let pages: Vec<(u64, u8)> = image.pages.iter().map(|(p, b)| (*p, b[0])).collect();
        assert_eq!(pages, vec![(0, 1), (1, 1), (2, 2)]);
        assert_eq!(r.on_frame(&frame(1, 0, false, true, &[0, 1])).unwrap(), Some(2), "a stale copy re-acks");
        assert_eq!(r.committed().unwrap().pages[&0], vec![1; 4], "and changes nothing");
    }

    #[test]
    fn an_epoch_claiming_fewer_outputs_than_the_one_before_is_refused() {
        // Fuzz target ha_pair: a delta epoch with fewer outputs than the committed image was
        // taken, and its commit tripped a debug assertion (an image's outputs must only grow).
        let mut r = ImageReceiver::new(5, SHAPE, 4);
        r.on_frame(&frame(2, 0, true, true, &[0])).unwrap();
        let before = r.clone();
        let back = Checkpoint { outputs: 3, ..frame(3, 0, true, false, &[1]) };
        assert!(matches!(r.on_frame(&back), Err(HaError::Inconsistent { epoch: 3, .. })));
        assert_eq!(r, before, "nothing changed");
        // Staged out of order: an earlier epoch may not claim more than a later staged one.
        r.on_frame(&frame(5, 0, true, false, &[1])).unwrap();
        let ahead = Checkpoint { outputs: 99, ..frame(4, 0, true, false, &[1]) };
        assert!(matches!(r.on_frame(&ahead), Err(HaError::Inconsistent { epoch: 4, .. })));
        assert!(r.on_frame(&frame(4, 0, true, false, &[1])).is_ok());
        assert_eq!(r.on_frame(&frame(3, 0, true, false, &[1])).unwrap(), Some(5), "3, then the staged 4 and 5");
        assert_eq!(r.committed().unwrap().outputs, 50);
    }

    #[test]
    fn bad_frames_are_refused_and_change_nothing() {
        let mut r = ImageReceiver::new(5, SHAPE, 2);
        r.on_frame(&frame(1, 0, true, true, &[0])).unwrap();
        let before = r.clone();
        type Case = (Checkpoint, fn(&HaError) -> bool);
        let cases: Vec<Case> = vec![
            (frame(2, 0, true, false, &[8]), |e| matches!(e, HaError::BadPage { page: 8, .. })),
            (Checkpoint { pages: vec![(1, vec![0; 3])], ..frame(2, 0, true, false, &[]) }, |e| {
                matches!(e, HaError::BadPage { page: 1, len: 3 })
            }),
        ];
        for (f, expected) in cases {
            let e = r.on_frame(&f).unwrap_err();
            assert!(expected(&e), "{e:?}");
            assert_eq!(r, before);
        }
        r.on_frame(&frame(3, 1, true, false, &[1])).unwrap();
        let before = r.clone();
        let e = r.on_frame(&frame(3, 2, false, false, &[1])).unwrap_err();
        assert!(matches!(e, HaError::Inconsistent { why: "a frame after the last one", .. }), "{e:?}");
        let e = r.on_frame(&frame(3, 0, true, false, &[1])).unwrap_err();
        assert!(matches!(e, HaError::Inconsistent { why: "a second last frame", .. }), "{e:?}");
        let e = r.on_frame(&frame(3, 0, false, true, &[1])).unwrap_err();
        assert!(matches!(e, HaError::Inconsistent { .. }), "{e:?}");
        assert_eq!(r.on_frame(&frame(3, 1, true, false, &[1])).unwrap(), None, "a duplicate is ignored");
        r.on_frame(&frame(4, 0, true, false, &[1])).unwrap();
        let e = r.on_frame(&frame(5, 0, true, false, &[1])).unwrap_err();
        assert!(matches!(e, HaError::TooFarAhead { at: 5, committed: 1 }), "{e:?}");
        assert_eq!(r.committed(), before.committed());
    }

    #[test]
    fn a_complete_full_epoch_supersedes_what_is_staged_before_it() {
        let mut r = ImageReceiver::new(5, SHAPE, 4);
        r.on_frame(&frame(1, 0, true, true, &[0])).unwrap();
        r.on_frame(&frame(3, 0, true, false, &[3])).unwrap();
        assert_eq!(r.on_frame(&frame(4, 0, true, true, &[5])).unwrap(), Some(4));
        let image = r.committed().unwrap();
        assert_eq!(image.pages.keys().copied().collect::<Vec<_>>(), vec![5], "a full epoch is the whole memory");
    }

    fn record(generation: u64, mode: HaMode) -> HaPairRecord {
        HaPairRecord {
            vm: VmId(1),
            primary: NodeId(1),
            standby: Some(NodeId(2)),
            mode,
            state: PairState::Protecting,
            generation,
            failovers: 0,
            last_failover: None,
        }
    }

    #[test]
    fn a_mode_switch_keeps_the_committed_state_until_the_new_mode_commits() {
        let redundant = HaMode::Redundant { epoch_ms: 20 };
        let mut s = Standby::new(&record(5, redundant), SHAPE, HaTunables::default());
        assert!(!s.ready());
        let fx = s.on_message(NodeId(1), &HaMessage::Checkpoint(frame(1, 0, true, true, &[0]))).unwrap();
        assert!(matches!(&fx[..], [Effect::Send { to: NodeId(1), msg: HaMessage::CheckpointAck(a) }] if a.epoch == 1));
        let e = s.on_message(NodeId(3), &HaMessage::Checkpoint(frame(2, 0, true, false, &[0]))).unwrap_err();
        assert!(matches!(e, HaError::NotFromPrimary { .. }));
        s.follow(&record(6, HaMode::MultiOperation));
        assert!(s.ready(), "the image of generation 5 is kept");
        assert!(matches!(s.state(), Some(TakeoverState::Image(i)) if i.epoch == 1 && i.generation == 5));
        let stale = s.on_message(NodeId(1), &HaMessage::Checkpoint(frame(2, 0, true, false, &[0]))).unwrap_err();
        assert!(matches!(stale, HaError::Generation { ours: 6, theirs: 5 }));
        let snap = haven_proto::ha::AppSnapshot { vm: VmId(1), generation: 6, seq: 10, state: vec![1] };
        s.on_message(NodeId(1), &HaMessage::AppSnapshot(snap)).unwrap();
        assert!(matches!(s.state(), Some(TakeoverState::App(a)) if a.applied() == 10));
        s.follow(&record(8, redundant));
        assert!(!s.ready(), "a generation skipped: start over");
    }
}
