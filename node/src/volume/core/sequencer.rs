//! The sequencer's state machine: which write-order points a replica has applied, which are
//! waiting for a gap to fill, and which epoch it follows. No I/O, no clock, no locks.
//!
//! A replica applies writes strictly in write order, so its contents are always a prefix of the
//! primary's order. [`SeqCore`] decides; the async [`crate::volume::sequencer::Sequencer`] stores
//! what [`SeqCore::take_ready`] hands it and reports back with [`SeqCore::applied`] or
//! [`SeqCore::fail`]. The payload type `P` is the driver's (blocks plus waiters there, plain
//! blocks in the model tests).
//!
//! Architecture invariant: `next` only moves forward through `applied` (a batch the store
//! wrote) or `advance_to` (a resync delivered everything below), and only moves back through
//! `reset` (a rollback the store performed). Nothing else changes what counts as applied.

use std::collections::BTreeMap;

/// Why a write-order point was not accepted.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SequencerError {
    #[error("write from epoch {got} refused: this replica follows epoch {current}")]
    StaleEpoch { got: u64, current: u64 },
    #[error("pending write {seq} discarded by a reset to epoch {epoch}")]
    Discarded { seq: u64, epoch: u64 },
    #[error("block store: {0}")]
    Store(String),
    #[error("too many writes waiting for a gap to fill ({0})")]
    Overloaded(usize),
}

/// Largest number of out-of-order points held while waiting for a gap.
pub const MAX_PENDING: usize = 16_384;
/// Largest number of points applied in one batch.
pub const MAX_BATCH_POINTS: usize = 1024;

/// What [`SeqCore::admit`] decided about a submitted point.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Already applied (a retried write): done, nothing to store.
    AlreadyApplied,
    /// Held until every earlier point is applied; `ready` says whether a batch can start now.
    Queued { ready: bool },
}

/// One replica's write-order bookkeeping.
#[derive(Debug)]
pub struct SeqCore<P> {
    epoch: u64,
    /// The next point to apply; everything below it is applied.
    next: u64,
    /// Early arrivals, by point. Every key is `>= next`.
    pending: BTreeMap<u64, P>,
    /// A batch is with the store; no other batch may start until it is reported.
    applying: bool,
    /// The store failed: the replica can no longer keep a prefix, so it refuses everything.
    broken: Option<String>,
}

impl<P> SeqCore<P> {
    /// A core whose next expected point is `next` (the store's high-water mark + 1).
    pub fn new(epoch: u64, next: u64) -> Self {
        assert!(next >= 1, "write-order points start at 1");
        Self { epoch, next, pending: BTreeMap::new(), applying: false, broken: None }
    }

    /// Every point below this has been applied.
    pub fn next(&self) -> u64 {
        self.next
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Raise the epoch without touching pending points.
    pub fn observe_epoch(&mut self, epoch: u64) {
        self.epoch = self.epoch.max(epoch);
    }

    /// Accept point `seq` of `epoch`, merging into an already-held copy of the same point with
    /// `merge`. Refuses stale epochs, a broken replica and overload.
    pub fn admit(
        &mut self,
        epoch: u64,
        seq: u64,
        payload: P,
        merge: impl FnOnce(&mut P, P),
    ) -> Result<Admit, SequencerError> {
        if epoch < self.epoch {
            return Err(SequencerError::StaleEpoch { got: epoch, current: self.epoch });
        }
        if let Some(reason) = &self.broken {
            return Err(SequencerError::Store(reason.clone()));
        }
        self.epoch = epoch;
        if seq < self.next {
            return Ok(Admit::AlreadyApplied);
        }
        let held = self.pending.len();
        match self.pending.get_mut(&seq) {
            Some(existing) => merge(existing, payload),
            None if held >= MAX_PENDING => return Err(SequencerError::Overloaded(held)),
            None => {
                self.pending.insert(seq, payload);
            }
        }
        Ok(Admit::Queued { ready: self.ready() })
    }

    /// Whether a batch can be handed to the store now.
    pub fn ready(&self) -> bool {
        !self.applying && self.broken.is_none() && self.pending.keys().next() == Some(&self.next)
    }

    /// Hand the contiguous ready points (at most [`MAX_BATCH_POINTS`]) to the store. The driver
    /// must report the batch with [`Self::applied`] or [`Self::fail`] before the next one.
    pub fn take_ready(&mut self) -> Vec<(u64, P)> {
        if !self.ready() {
            return Vec::new();
        }
        let mut batch = Vec::new();
        while batch.len() < MAX_BATCH_POINTS {
            let point = self.next + batch.len() as u64;
            match self.pending.remove(&point) {
                Some(p) => batch.push((point, p)),
                None => break,
            }
        }
        self.applying = !batch.is_empty();
        batch
    }

    /// The store wrote the batch of `points` points taken last.
    pub fn applied(&mut self, points: u64) {
        assert!(self.applying, "applied() without a batch in flight");
        self.applying = false;
        self.next += points;
        debug_assert!(self.pending.keys().next().is_none_or(|k| *k >= self.next));
    }

    /// The store failed the batch taken last: refuse everything from now on. Returns the
    /// pending points, whose submitters must be told.
    pub fn fail(&mut self, reason: String) -> Vec<(u64, P)> {
        self.applying = false;
        self.broken = Some(reason);
        std::mem::take(&mut self.pending).into_iter().collect()
    }

    /// Move forward to `next` (a resync delivered everything below it): keeps points at or
    /// above it and returns the ones below, which will never be applied by this core.
    pub fn advance_to(&mut self, next: u64) -> Vec<(u64, P)> {
        assert!(!self.applying, "advance_to() while a batch is in flight");
        if next <= self.next {
            return Vec::new();
        }
        let keep = self.pending.split_off(&next);
        self.next = next;
        std::mem::replace(&mut self.pending, keep).into_iter().collect()
    }

    /// Follow `epoch` from point `next` on (the store was rolled back to `next - 1`, or a
    /// transfer restarts there): every pending point is discarded and returned, the broken flag
    /// is cleared, and later submits of older epochs are refused.
    pub fn reset(&mut self, epoch: u64, next: u64) -> Vec<(u64, P)> {
        assert!(!self.applying, "reset() while a batch is in flight");
        assert!(next >= 1, "write-order points start at 1");
        self.epoch = self.epoch.max(epoch);
        self.next = next;
        self.broken = None;
        std::mem::take(&mut self.pending).into_iter().collect()
    }

    /// Fence at `epoch` keeping what is applied: pending points (an older primary's writes
    /// still waiting for a gap) are discarded and returned, so nothing but `epoch`'s own
    /// writes can be applied from `next()` on. A new primary calls this before it reads
    /// `next()` to choose its first point.
    pub fn fence(&mut self, epoch: u64) -> Vec<(u64, P)> {
        let next = self.next;
        self.reset(epoch, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keep(_: &mut u32, _: u32) {}

    #[test]
    fn applies_in_order_and_batches_contiguous_points() {
        let mut c = SeqCore::new(1, 1);
        assert_eq!(c.admit(1, 2, 20, keep), Ok(Admit::Queued { ready: false }));
        assert_eq!(c.admit(1, 3, 30, keep), Ok(Admit::Queued { ready: false }));
        assert!(c.take_ready().is_empty());
        assert_eq!(c.admit(1, 1, 10, keep), Ok(Admit::Queued { ready: true }));
        assert_eq!(c.take_ready(), vec![(1, 10), (2, 20), (3, 30)]);
        c.applied(3);
        assert_eq!(c.next(), 4);
        assert_eq!(c.admit(1, 2, 99, keep), Ok(Admit::AlreadyApplied));
    }

    #[test]
    fn refuses_stale_epochs_and_fence_drops_an_old_primarys_pending_points() {
        let mut c = SeqCore::new(1, 5);
        c.admit(1, 6, 60, keep).unwrap();
        let dropped = c.fence(2);
        assert_eq!(dropped, vec![(6, 60)]);
        assert_eq!(c.next(), 5);
        assert_eq!(c.admit(1, 5, 0, keep), Err(SequencerError::StaleEpoch { got: 1, current: 2 }));
        assert_eq!(c.admit(2, 5, 50, keep), Ok(Admit::Queued { ready: true }));
    }

    #[test]
    fn a_failed_store_refuses_everything_until_reset() {
        let mut c = SeqCore::new(1, 1);
        c.admit(1, 1, 1, keep).unwrap();
        c.admit(1, 3, 3, keep).unwrap();
        assert_eq!(c.take_ready(), vec![(1, 1)]);
        assert_eq!(c.fail("disk".into()), vec![(3, 3)]);
        assert!(matches!(c.admit(1, 2, 2, keep), Err(SequencerError::Store(_))));
        c.reset(1, 2);
        assert_eq!(c.admit(1, 2, 2, keep), Ok(Admit::Queued { ready: true }));
    }

    #[test]
    fn advance_keeps_later_points_and_returns_earlier_ones() {
        let mut c = SeqCore::new(1, 1);
        c.admit(1, 3, 3, keep).unwrap();
        c.admit(1, 8, 8, keep).unwrap();
        assert_eq!(c.advance_to(5), vec![(3, 3)]);
        assert_eq!(c.next(), 5);
        assert_eq!(c.pending_len(), 1);
    }
}
