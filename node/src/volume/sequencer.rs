//! Applies one replica's writes strictly in write order, with group commit.
//!
//! Writes reach a replica over concurrent streams, so write-order point `n + 1` may arrive before
//! `n`. The [`Sequencer`] holds early arrivals until the gap fills and then applies every
//! contiguous ready point in ONE block-store batch (one WAL fsync for all of them when any asks
//! for durability). The replica's state is therefore always a prefix of the primary's write
//! order, which is what lets a newly promoted primary tell the others "drop everything after my
//! last point" without losing an acknowledged write.
//!
//! Every submit carries the primary's epoch; a [`Sequencer::reset`] to a newer epoch fails the
//! older epoch's pending writes and refuses any that arrive later. This module must not talk to
//! the network or the catalog.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use haven_proto::VolumeId;
use tokio::sync::oneshot;

use super::blockstore::{BlockStore, BlockWrite};

/// Why a write-order point was not applied.
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
const MAX_PENDING: usize = 16_384;
/// Largest number of points applied in one batch.
const MAX_BATCH_POINTS: usize = 1024;

struct Pending {
    blocks: Vec<BlockWrite>,
    durable: bool,
    waiters: Vec<oneshot::Sender<Result<(), SequencerError>>>,
}

struct State {
    epoch: u64,
    /// The next point to apply; everything below it is applied.
    next: u64,
    pending: BTreeMap<u64, Pending>,
    draining: bool,
    broken: Option<String>,
}

/// In-order, group-committed application of one volume replica's writes. Cheap to clone.
#[derive(Clone)]
pub struct Sequencer {
    vol: VolumeId,
    block_size: u32,
    store: BlockStore,
    state: Arc<Mutex<State>>,
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
            state: Arc::new(Mutex::new(State { epoch, next, pending: BTreeMap::new(), draining: false, broken: None })),
            apply_lock: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Every point below this has been applied.
    pub fn next(&self) -> u64 {
        self.state.lock().expect("sequencer lock").next
    }

    pub fn epoch(&self) -> u64 {
        self.state.lock().expect("sequencer lock").epoch
    }

    /// Raise the epoch without touching pending writes (a new primary that kept our prefix).
    pub fn observe_epoch(&self, epoch: u64) {
        let mut st = self.state.lock().expect("sequencer lock");
        st.epoch = st.epoch.max(epoch);
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
        let (tx, rx) = oneshot::channel();
        let start_drain = {
            let mut st = self.state.lock().expect("sequencer lock");
            if epoch < st.epoch {
                return Err(SequencerError::StaleEpoch { got: epoch, current: st.epoch });
            }
            if let Some(reason) = &st.broken {
                return Err(SequencerError::Store(reason.clone()));
            }
            st.epoch = epoch;
            if seq < st.next {
                return Ok(());
            }
            if st.pending.len() >= MAX_PENDING {
                return Err(SequencerError::Overloaded(st.pending.len()));
            }
            let entry =
                st.pending.entry(seq).or_insert_with(|| Pending { blocks, durable: false, waiters: Vec::new() });
            entry.durable |= durable;
            entry.waiters.push(tx);
            let ready = st.pending.keys().next() == Some(&st.next);
            let start = ready && !st.draining;
            if start {
                st.draining = true;
            }
            start
        };
        if start_drain {
            let me = self.clone();
            tokio::spawn(async move { me.drain().await });
        }
        rx.await.unwrap_or(Err(SequencerError::Discarded { seq, epoch }))
    }

    /// Apply contiguous ready points in batches until none is ready.
    async fn drain(self) {
        loop {
            let guard = self.apply_lock.lock().await;
            let mut batch: Vec<(u64, Pending)> = {
                let mut st = self.state.lock().expect("sequencer lock");
                let mut batch = Vec::new();
                while batch.len() < MAX_BATCH_POINTS {
                    let next = st.next + batch.len() as u64;
                    match st.pending.remove(&next) {
                        Some(p) => batch.push((next, p)),
                        None => break,
                    }
                }
                if batch.is_empty() {
                    st.draining = false;
                    return;
                }
                batch
            };
            let durable = batch.iter().any(|(_, p)| p.durable);
            let writes: Vec<BlockWrite> = batch.iter_mut().flat_map(|(_, p)| std::mem::take(&mut p.blocks)).collect();
            let (store, vol, bs) = (self.store.clone(), self.vol, self.block_size);
            // Durability: when any point in the batch asked for it, `apply` returns only after
            // the WAL holding the whole batch is fsynced.
            let small = writes.len() as u64 * bs as u64 <= 256 * 1024;
            let result = if !durable && small {
                // No fsync: a small batch is a memtable insert and one WAL write(2), cheaper
                // than a hop to the blocking pool.
                store.apply(vol, bs, &writes, false).map_err(|e| e.to_string())
            } else {
                tokio::task::spawn_blocking(move || store.apply(vol, bs, &writes, durable))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
            };
            let mut st = self.state.lock().expect("sequencer lock");
            match result {
                Ok(()) => {
                    st.next += batch.len() as u64;
                    metrics::counter!("haven_volume_points_applied_total").increment(batch.len() as u64);
                    for (_, p) in batch {
                        for w in p.waiters {
                            let _ = w.send(Ok(()));
                        }
                    }
                }
                Err(reason) => {
                    // A failed apply leaves the replica unable to keep a prefix: refuse
                    // everything from now on; the primary drops it from the in-sync set.
                    st.broken = Some(reason.clone());
                    st.draining = false;
                    for (_, p) in batch.into_iter().chain(std::mem::take(&mut st.pending)) {
                        for w in p.waiters {
                            let _ = w.send(Err(SequencerError::Store(reason.clone())));
                        }
                    }
                    return;
                }
            }
            drop(st);
            drop(guard);
        }
    }

    /// Move the next expected point forward to `next` (a resync delivered everything below it),
    /// keeping writes already waiting at or above it and failing those below.
    pub async fn advance_to(&self, next: u64) {
        let _guard = self.apply_lock.lock().await;
        let (stale, start) = {
            let mut st = self.state.lock().expect("sequencer lock");
            if next <= st.next {
                return;
            }
            let keep = st.pending.split_off(&next);
            let stale = std::mem::replace(&mut st.pending, keep);
            st.next = next;
            let start = st.pending.keys().next() == Some(&st.next) && !st.draining;
            if start {
                st.draining = true;
            }
            (stale, start)
        };
        for (seq, p) in stale {
            for w in p.waiters {
                let _ = w.send(Err(SequencerError::Discarded { seq, epoch: 0 }));
            }
        }
        if start {
            let me = self.clone();
            tokio::spawn(async move { me.drain().await });
        }
    }

    /// Move to `epoch` with `next` as the next expected point: pending writes are failed, later
    /// submits from older epochs are refused. `before` runs while no batch is being applied
    /// (the caller's rollback of the block store goes there).
    pub async fn reset<T>(&self, epoch: u64, next: u64, before: impl FnOnce() -> T) -> T {
        let _guard = self.apply_lock.lock().await;
        let discarded = {
            let mut st = self.state.lock().expect("sequencer lock");
            st.epoch = st.epoch.max(epoch);
            std::mem::take(&mut st.pending)
        };
        let out = before();
        {
            let mut st = self.state.lock().expect("sequencer lock");
            st.next = next;
            st.broken = None;
            st.draining = false;
        }
        for (seq, p) in discarded {
            for w in p.waiters {
                let _ = w.send(Err(SequencerError::Discarded { seq, epoch }));
            }
        }
        out
    }
}
