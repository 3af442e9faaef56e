//! Applies one replica's writes strictly in write order, with group commit: the async driver of
//! [`SeqCore`](super::core::sequencer::SeqCore).
//!
//! Writes reach a replica over concurrent streams, so write-order point `n + 1` may arrive before
//! `n`. The core holds early arrivals until the gap fills; this driver then applies every
//! contiguous ready point in ONE block-store batch (one WAL fsync for all of them when any asks
//! for durability) and wakes their submitters. A range zeroing is a point of its own kind
//! ([`StoreOp::Zero`]): the ready points are applied in order as runs of block writes (one batch
//! each) and single range zeroings, and only the last store call of a drain fsyncs (one WAL, so
//! that fsync covers the earlier calls). The replica's state is therefore always a prefix
//! of the primary's write order, which is what lets a newly promoted primary tell the others
//! "drop everything after my last point" without losing an acknowledged write.
//!
//! Every submit carries the primary's epoch; a [`Sequencer::reset`] or [`Sequencer::fence`] to a
//! newer epoch fails the older epoch's pending writes and refuses any that arrive later. This
//! module must not talk to the network or the catalog, and decides nothing the core does not.

use std::sync::{Arc, Mutex};

use haven_proto::VolumeId;
use tokio::sync::oneshot;

use super::blockstore::{BlockStore, BlockWrite, StoreOp};
pub use super::core::sequencer::SequencerError;
use super::core::sequencer::{Admit, SeqCore};

struct Pending {
    op: StoreOp,
    durable: bool,
    waiters: Vec<oneshot::Sender<Result<(), SequencerError>>>,
}

/// A retried point keeps the first copy's blocks; its submitter waits for the same apply.
fn merge(held: &mut Pending, again: Pending) {
    held.durable |= again.durable;
    held.waiters.extend(again.waiters);
}

fn answer(points: Vec<(u64, Pending)>, err: impl Fn(u64) -> SequencerError) {
    for (seq, p) in points {
        for w in p.waiters {
            let _ = w.send(Err(err(seq)));
        }
    }
}

/// The ready points' changes in order, consecutive block writes joined into one batch.
fn runs(ops: impl Iterator<Item = StoreOp>) -> Vec<StoreOp> {
    let mut out: Vec<StoreOp> = Vec::new();
    for op in ops {
        match (out.last_mut(), op) {
            (Some(StoreOp::Blocks(run)), StoreOp::Blocks(more)) => run.extend(more),
            (_, op) => out.push(op),
        }
    }
    out
}

/// In-order, group-committed application of one volume replica's writes. Cheap to clone.
#[derive(Clone)]
pub struct Sequencer {
    vol: VolumeId,
    block_size: u32,
    store: BlockStore,
    core: Arc<Mutex<SeqCore<Pending>>>,
    /// Held while a batch is being written, so a reset never races an apply.
    apply_lock: Arc<tokio::sync::Mutex<()>>,
}

impl Sequencer {
    /// A sequencer whose next expected point is `next` (the block store's high-water mark + 1).
    pub fn new(vol: VolumeId, block_size: u32, store: BlockStore, epoch: u64, next: u64) -> Self {
        Self {
            vol,
            block_size,
            store,
            core: Arc::new(Mutex::new(SeqCore::new(epoch, next))),
            apply_lock: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    fn core(&self) -> std::sync::MutexGuard<'_, SeqCore<Pending>> {
        self.core.lock().expect("sequencer lock")
    }

    /// Every point below this has been applied.
    pub fn next(&self) -> u64 {
        self.core().next()
    }

    pub fn epoch(&self) -> u64 {
        self.core().epoch()
    }

    /// Raise the epoch without touching pending writes (a new primary that kept our prefix).
    pub fn observe_epoch(&self, epoch: u64) {
        self.core().observe_epoch(epoch);
    }

    /// Apply point `seq` once every earlier point is applied; resolves when it is (and, if
    /// `durable`, when the WAL holding it is fsynced). A point already applied resolves at once
    /// (a retried write is harmless).
    pub async fn submit(
        &self,
        epoch: u64,
        seq: u64,
        blocks: Vec<BlockWrite>,
        durable: bool,
    ) -> Result<(), SequencerError> {
        self.submit_op(epoch, seq, StoreOp::Blocks(blocks), durable).await
    }

    /// [`Self::submit`] for any kind of point (block writes or a range zeroing at `seq`).
    pub async fn submit_op(&self, epoch: u64, seq: u64, op: StoreOp, durable: bool) -> Result<(), SequencerError> {
        self.enqueue(epoch, seq, op, durable).await
    }

    /// Admit point `seq` now (in the caller's order, before anything is awaited) and return the
    /// future of its apply: a replication stream admits each frame's point as it reads it, so
    /// the points of a burst reach the core in stream order and are applied in one batch.
    pub fn enqueue(
        &self,
        epoch: u64,
        seq: u64,
        op: StoreOp,
        durable: bool,
    ) -> impl std::future::Future<Output = Result<(), SequencerError>> + Send + 'static {
        if let StoreOp::Zero(z) = &op {
            assert_eq!(z.seq, seq, "a range zeroing is applied at its own point");
        }
        let (tx, rx) = oneshot::channel();
        let admitted = self.core().admit(epoch, seq, Pending { op, durable, waiters: vec![tx] }, merge);
        let rx = match admitted {
            Err(e) => Err(e),
            Ok(Admit::AlreadyApplied) => Ok(None),
            Ok(Admit::Queued { ready }) => {
                if ready {
                    let me = self.clone();
                    tokio::spawn(async move { me.drain().await });
                }
                Ok(Some(rx))
            }
        };
        async move {
            match rx? {
                None => Ok(()),
                Some(rx) => rx.await.unwrap_or(Err(SequencerError::Discarded { seq, epoch })),
            }
        }
    }

    /// Apply contiguous ready points in batches until none is ready.
    async fn drain(self) {
        loop {
            let guard = self.apply_lock.lock().await;
            let mut batch = self.core().take_ready();
            if batch.is_empty() {
                return;
            }
            let durable = batch.iter().any(|(_, p)| p.durable);
            let ops = runs(batch.iter_mut().map(|(_, p)| std::mem::replace(&mut p.op, StoreOp::Blocks(Vec::new()))));
            let result = self.store_ops(ops, durable).await;
            let mut core = self.core();
            match result {
                Ok(()) => {
                    core.applied(batch.len() as u64);
                    drop(core);
                    metrics::counter!("haven_volume_points_applied_total").increment(batch.len() as u64);
                    for (_, p) in batch {
                        for w in p.waiters {
                            let _ = w.send(Ok(()));
                        }
                    }
                }
                Err(reason) => {
                    // A failed apply leaves the replica unable to keep a prefix: the core refuses
                    // everything from now on; the primary drops it from the in-sync set.
                    let pending = core.fail(reason.clone());
                    drop(core);
                    answer(batch.into_iter().chain(pending).collect(), |_| SequencerError::Store(reason.clone()));
                    return;
                }
            }
            drop(guard);
        }
    }

    /// Apply `ops` in order; when `durable`, the last call fsyncs the WAL (one WAL for every
    /// column family, so that covers the earlier calls too).
    async fn store_ops(&self, ops: Vec<StoreOp>, durable: bool) -> Result<(), String> {
        let last = ops.len().saturating_sub(1);
        for (i, op) in ops.into_iter().enumerate() {
            let sync = durable && i == last;
            match op {
                StoreOp::Blocks(writes) => self.store_batch(writes, sync).await?,
                StoreOp::Zero(range) => {
                    let (store, vol) = (self.store.clone(), self.vol);
                    let zeroed = tokio::task::spawn_blocking(move || store.zero_range(vol, range, sync))
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())?;
                    metrics::counter!("haven_volume_zeroed_blocks_total").increment(zeroed);
                }
            }
        }
        Ok(())
    }

    /// Durability: when any point in the batch asked for it, returns only after the WAL
    /// holding the whole batch is fsynced.
    async fn store_batch(&self, writes: Vec<BlockWrite>, durable: bool) -> Result<(), String> {
        let (store, vol, bs) = (self.store.clone(), self.vol, self.block_size);
        let small = writes.len() as u64 * bs as u64 <= 256 * 1024;
        if !durable && small {
            // No fsync: a small batch is a memtable insert and one WAL write(2), cheaper than a
            // hop to the blocking pool.
            return store.apply(vol, bs, &writes, false).map_err(|e| e.to_string());
        }
        tokio::task::spawn_blocking(move || store.apply(vol, bs, &writes, durable))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
    }

    /// Start draining if the core has a ready batch and no drain holds it.
    fn kick(&self) {
        if self.core().ready() {
            let me = self.clone();
            tokio::spawn(async move { me.drain().await });
        }
    }

    /// Move the next expected point forward to `next` (a resync delivered everything below it),
    /// keeping writes already waiting at or above it and failing those below.
    pub async fn advance_to(&self, next: u64) {
        let guard = self.apply_lock.lock().await;
        let stale = self.core().advance_to(next);
        drop(guard);
        answer(stale, |seq| SequencerError::Discarded { seq, epoch: 0 });
        self.kick();
    }

    /// Move to `epoch` with `next` as the next expected point: pending writes are failed, later
    /// submits from older epochs are refused. `before` runs while no batch is being applied
    /// (the caller's rollback of the block store goes there).
    pub async fn reset<T>(&self, epoch: u64, next: u64, before: impl FnOnce() -> T) -> T {
        let _guard = self.apply_lock.lock().await;
        // Fence first, so no older-epoch point is admitted while `before` changes the store.
        let mut discarded = self.core().fence(epoch);
        let out = before();
        discarded.extend(self.core().reset(epoch, next));
        answer(discarded, |seq| SequencerError::Discarded { seq, epoch });
        out
    }

    /// Fence at `epoch`, keeping what is applied, and return the next point: pending writes of
    /// older primaries are failed and never applied. A new primary fences before it chooses
    /// its first point (issue 11, race 1).
    pub async fn fence(&self, epoch: u64) -> u64 {
        let _guard = self.apply_lock.lock().await;
        let (discarded, next) = {
            let mut core = self.core();
            (core.fence(epoch), core.next())
        };
        answer(discarded, |seq| SequencerError::Discarded { seq, epoch });
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::blockstore::{BlockContent, ZeroRange};

    fn blocks(seq: u64) -> StoreOp {
        StoreOp::Blocks(vec![BlockWrite { block: seq, seq, content: BlockContent::Zero }])
    }

    fn zero(seq: u64) -> StoreOp {
        StoreOp::Zero(ZeroRange { first: 0, count: 10, seq })
    }

    fn shape(ops: &[StoreOp]) -> Vec<String> {
        ops.iter()
            .map(|op| match op {
                StoreOp::Blocks(w) => format!("b{:?}", w.iter().map(|w| w.seq).collect::<Vec<_>>()),
                StoreOp::Zero(z) => format!("z{}", z.seq),
            })
            .collect()
    }

    #[test]
    fn runs_keep_the_write_order_around_range_zeroings() {
        let ops = runs([blocks(1), blocks(2), zero(3), zero(4), blocks(5), blocks(6)].into_iter());
        assert_eq!(shape(&ops), ["b[1, 2]", "z3", "z4", "b[5, 6]"]);
        assert!(runs(std::iter::empty()).is_empty());
    }
}
