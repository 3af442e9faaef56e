//! The Raft log and vote in RocksDB (`raft_log`, `raft_meta` column families).
//!
//! Invariant: an entry or a vote is fsynced before openraft is told it is stored — `append`'s
//! flush callback is called by the WAL syncer thread only after an fsync that covers the entries,
//! and `save_vote` returns only after a synchronous write. Entries are keyed by big-endian index so
//! iteration order is log order. A persisted vote above the guard's term ceiling (written before
//! the guard existed) is replaced when it is read, so such a node can start (see
//! [`recovered_vote`]). This module must not interpret entry payloads.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::AnyError;
use openraft::{LogState, OptionalSend, RaftLogReader, StorageIOError};
use rocksdb::{Direction, IteratorMode, WriteBatch};

use super::guard::MAX_TERM;
use super::limits;
use super::{decode, encode, Entry, LogId, StorageError, TypeConfig, Vote};
use crate::storage::{Store, CF_RAFT_LOG, CF_RAFT_META};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

fn io(e: StorageIOError<u64>) -> StorageError {
    StorageError::IO { source: e }
}

fn any(msg: String) -> AnyError {
    AnyError::error(msg)
}

/// The Raft log store. Clones share the database and the WAL syncer.
#[derive(Clone)]
pub struct LogStore {
    store: Store,
    syncer: Arc<Syncer>,
}

/// The WAL sync thread and its queue. Dropping the last log store closes the queue and waits
/// for the thread to end, so the thread never outlives its owners holding the database: a
/// RocksDB still closing on a detached thread while the process exits aborts it ("pthread lock:
/// Invalid argument", seen once at the end of a test binary).
struct Syncer {
    queue: Option<std::sync::mpsc::Sender<LogFlushed<TypeConfig>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Syncer {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(t) = self.thread.take() {
            // Bounded: the thread ends after at most one WAL sync once the queue is closed.
            let _ = t.join();
        }
    }
}

impl LogStore {
    /// A log store over `store`, with its WAL sync thread started.
    pub fn new(store: Store) -> std::io::Result<Self> {
        let (queue, pending) = std::sync::mpsc::channel();
        let sync_store = store.clone();
        let thread =
            std::thread::Builder::new().name("haven-wal-sync".into()).spawn(move || wal_syncer(sync_store, pending))?;
        Ok(Self { store, syncer: Arc::new(Syncer { queue: Some(queue), thread: Some(thread) }) })
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        let db = self.store.db();
        let raw = db.get_cf(self.store.cf(CF_RAFT_META), key).map_err(|e| io(StorageIOError::read(&e)))?;
        raw.map(|b| decode(&b).map_err(|e| io(StorageIOError::read(any(e))))).transpose()
    }

    fn put_meta_durable<T: serde::Serialize>(&self, key: &[u8], value: &T) -> Result<(), StorageError> {
        self.put_meta(key, value, &Store::durable())
    }

    fn put_meta<T: serde::Serialize>(
        &self,
        key: &[u8],
        value: &T,
        opts: &rocksdb::WriteOptions,
    ) -> Result<(), StorageError> {
        let bytes = encode(value).map_err(|e| io(StorageIOError::write(any(e))))?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.store.cf(CF_RAFT_META), key, bytes);
        self.store.db().write_opt(batch, opts).map_err(|e| io(StorageIOError::write(&e)))
    }

    /// The id of the last entry in the log as stored (written, maybe not yet fsynced), else the
    /// last purged one: what pre-votes compare (`raft::campaign`).
    pub fn last_log_id(&self) -> Result<Option<LogId>, StorageError> {
        let last_purged: Option<LogId> = self.get_meta(KEY_LAST_PURGED)?;
        Ok(self.last_entry_log_id()?.or(last_purged))
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId>, StorageError> {
        let db = self.store.db();
        let mut it = db.iterator_cf(self.store.cf(CF_RAFT_LOG), IteratorMode::End);
        match it.next() {
            None => Ok(None),
            Some(Err(e)) => Err(io(StorageIOError::read_logs(&e))),
            Some(Ok((_, v))) => {
                let entry: Entry = decode(&v).map_err(|e| io(StorageIOError::read_logs(any(e))))?;
                Ok(Some(entry.log_id))
            }
        }
    }
}

/// Durability point of the Raft log. Takes every append waiting for durability, fsyncs the WAL
/// once (which covers all of them: they were written before they were queued), then reports them
/// stored, in order. Ends when every `LogStore` clone is dropped.
fn wal_syncer(store: Store, pending: std::sync::mpsc::Receiver<LogFlushed<TypeConfig>>) {
    while let Ok(first) = pending.recv() {
        let mut batch = vec![first];
        batch.extend(pending.try_iter());
        let started = std::time::Instant::now();
        let result = store.sync_wal();
        metrics::histogram!("haven_raft_wal_sync_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("haven_raft_wal_sync_batch").record(batch.len() as f64);
        for callback in batch {
            callback.log_io_completed(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            });
        }
    }
}

/// The term of the vote that replaces a poisoned one (2^61, half the guard's ceiling).
pub const RECOVERY_TERM: u64 = MAX_TERM / 2;

// Elections after a recovery cannot reach the ceiling in practice (2^61 terms of room).
const _: () = assert!(MAX_TERM - RECOVERY_TERM >= 1 << 61);

/// The vote a node starts with when its persisted `vote` is above the guard's ceiling
/// ([`MAX_TERM`]), or `None` when `vote` is fine.
///
/// Such a vote can only have been written by a version without the guard, from a forged request;
/// kept, it makes openraft overflow (`term + 1`) at the node's first election, on every start.
/// The replacement must keep Raft's promise about votes: with openraft's leader ids
/// (`(term, node_id)`, totally ordered) a node only ever grants votes in increasing order, so it
/// must never again grant one at or below a vote it granted before. The node can have granted
/// votes up to the one it held before the forged vote overwrote it, and that vote is lost — but
/// its term was reached one election at a time (nothing but a forged request jumps terms), so it
/// is astronomically far below 2^61. The replacement is therefore `(RECOVERY_TERM = 2^61, node 0)`,
/// uncommitted: node ids start at 1, so it names no real candidate, and it is above every vote the
/// node can have granted, so every vote it grants from now on is too. Its peers adopt the term when
/// they first hear from it (a higher term always wins), and elections carry on from there, with
/// 2^61 terms of room below the ceiling.
pub fn recovered_vote(vote: &Vote) -> Option<Vote> {
    if vote.leader_id.term <= MAX_TERM {
        return None;
    }
    let safe = Vote { leader_id: openraft::LeaderId { term: RECOVERY_TERM, node_id: NOBODY }, committed: false };
    debug_assert!(safe.leader_id.term < MAX_TERM, "the recovered term leaves room for elections");
    Some(safe)
}

/// No node has id 0 (`config` refuses it): the candidate a recovered vote names.
const NOBODY: u64 = 0;

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl LogStore {
    /// Entries in `range`, stopping before the one that would take the total stored size past
    /// `max_bytes` (but always including the first).
    fn read_entries<RB: RangeBounds<u64>>(&self, range: RB, max_bytes: usize) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let db = self.store.db();
        let from = index_key(start);
        let it = db.iterator_cf(self.store.cf(CF_RAFT_LOG), IteratorMode::From(&from, Direction::Forward));
        let mut out = Vec::new();
        let mut total_bytes = 0usize;
        for item in it {
            let (k, v) = item.map_err(|e| io(StorageIOError::read_logs(&e)))?;
            let idx = u64::from_be_bytes(
                k.as_ref().try_into().map_err(|_| io(StorageIOError::read_logs(any("bad log key".into()))))?,
            );
            total_bytes = total_bytes.saturating_add(v.len());
            if !range.contains(&idx) || (total_bytes > max_bytes && !out.is_empty()) {
                break;
            }
            let entry: Entry = decode(&v).map_err(|e| io(StorageIOError::read_log_at_index(idx, any(e))))?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.read_entries(range, usize::MAX)
    }

    /// For replication: at most [`limits::APPEND_MAX_BYTES`] of entries (stored bytes are the
    /// bincode encoding openraft's request carries), so a far-behind follower is sent bounded
    /// batches.
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        self.read_entries(start..end, limits::APPEND_MAX_BYTES)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.get_meta(KEY_LAST_PURGED)?;
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: self.last_log_id()? })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        // Durable before return: a vote must survive a crash or the node could vote twice in a term.
        self.put_meta_durable(KEY_VOTE, vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        let Some(vote) = self.get_meta::<Vote>(KEY_VOTE)? else { return Ok(None) };
        let Some(safe) = recovered_vote(&vote) else { return Ok(Some(vote)) };
        tracing::warn!(
            poisoned = %vote,
            replacement = %safe,
            "the persisted Raft vote is above the term ceiling {MAX_TERM}; replacing it (it can only come from a forged \
             vote accepted before the Raft guard existed)"
        );
        self.put_meta_durable(KEY_VOTE, &safe)?;
        Ok(Some(safe))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not fsynced: a committed id that is lost or stale after a crash is only lower than the
        // truth, which is safe (the leader re-sends it); fsyncing here would block RaftCore on
        // every commit.
        self.put_meta(KEY_COMMITTED, &committed, &Store::relaxed())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.store.cf(CF_RAFT_LOG);
        let mut batch = WriteBatch::default();
        for entry in entries {
            let bytes = encode(&entry).map_err(|e| io(StorageIOError::write_logs(any(e))))?;
            batch.put_cf(cf, index_key(entry.log_id.index), bytes);
        }
        // The entries are written to the WAL now and made durable by the syncer thread, which
        // calls `callback` only after an fsync that covers them (see `wal_syncer`): only then do
        // they count towards a quorum. RaftCore is not blocked meanwhile, and appends that arrive
        // during one fsync share the next (group commit).
        if let Err(e) = self.store.db().write_opt(batch, &Store::relaxed()) {
            callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
            return Err(io(StorageIOError::write_logs(&e)));
        }
        let queue = self.syncer.queue.as_ref().expect("the queue lives as long as its syncer");
        if let Err(std::sync::mpsc::SendError(callback)) = queue.send(callback) {
            callback.log_io_completed(Err(std::io::Error::other("WAL sync thread stopped")));
            return Err(io(StorageIOError::write_logs(any("WAL sync thread stopped".into()))));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.store.cf(CF_RAFT_LOG), index_key(log_id.index), index_key(u64::MAX));
        self.store.db().write_opt(batch, &Store::durable()).map_err(|e| io(StorageIOError::write_logs(&e)))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Applied state-machine writes are not fsynced individually; make them durable before the
        // log entries that could rebuild them disappear.
        self.store.sync_wal().map_err(|e| io(StorageIOError::write_logs(&e)))?;
        self.put_meta_durable(KEY_LAST_PURGED, &log_id)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.store.cf(CF_RAFT_LOG), index_key(0), index_key(log_id.index.saturating_add(1)));
        self.store.db().write_opt(batch, &Store::relaxed()).map_err(|e| io(StorageIOError::write_logs(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, LogStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        (dir, LogStore::new(store).unwrap())
    }

    fn put_entry(log: &LogStore, index: u64, value_bytes: usize) {
        let entry = Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 0), index),
            payload: openraft::EntryPayload::Normal(haven_proto::CatalogCommand::KvPut {
                key: format!("k{index}"),
                value: vec![7; value_bytes],
            }),
        };
        let db = log.store.db();
        db.put_cf(log.store.cf(CF_RAFT_LOG), index_key(index), encode(&entry).unwrap()).unwrap();
    }

    #[tokio::test]
    async fn replication_reads_are_bounded_by_bytes() {
        let (_dir, mut log) = open();
        let value_bytes = 120 << 10;
        for index in 1..=100 {
            put_entry(&log, index, value_bytes);
        }
        let limited = log.limited_get_log_entries(1, 101).await.unwrap();
        assert_eq!(limited.len(), limits::APPEND_MAX_BYTES / (value_bytes + 100), "whole entries up to the budget");
        assert_eq!(limited.first().unwrap().log_id.index, 1);
        assert_eq!(log.limited_get_log_entries(90, 93).await.unwrap().len(), 3, "small ranges are whole");
        assert_eq!(log.try_get_log_entries(1..101).await.unwrap().len(), 100, "plain reads are not limited");

        // An entry larger than the budget is still returned, alone.
        put_entry(&log, 101, limits::APPEND_MAX_BYTES + 1);
        put_entry(&log, 102, 10);
        let big = log.limited_get_log_entries(101, 103).await.unwrap();
        assert_eq!(big.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), vec![101]);
    }

    #[test]
    fn only_votes_above_the_ceiling_are_replaced() {
        assert_eq!(recovered_vote(&Vote::new(12, 3)), None);
        assert_eq!(recovered_vote(&Vote::new(MAX_TERM, 3)), None);
        let safe = recovered_vote(&Vote::new(MAX_TERM + 1, 3)).unwrap();
        assert_eq!(safe.leader_id.term, RECOVERY_TERM);
        assert_eq!(safe.leader_id.node_id, NOBODY, "the replacement names no real candidate");
        // Above any vote the node can have granted: any real candidate's vote at a lower term.
        assert!(safe > Vote::new(RECOVERY_TERM - 1, u64::MAX));
        assert!(!safe.committed);
    }

    #[tokio::test]
    async fn a_poisoned_vote_is_replaced_durably_on_load() {
        let (_dir, mut log) = open();
        assert_eq!(log.read_vote().await.unwrap(), None);
        log.save_vote(&Vote::new(9, 2)).await.unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(9, 2)));

        let mut poisoned = Vote::new(u64::MAX, 7);
        poisoned.committed = true;
        log.save_vote(&poisoned).await.unwrap();
        let loaded = log.read_vote().await.unwrap().unwrap();
        assert_eq!(loaded.leader_id.term, RECOVERY_TERM);
        assert_eq!(loaded.leader_id.node_id, NOBODY);
        assert!(!loaded.committed);
        // The replacement was written back: what is stored now is the safe vote itself.
        assert_eq!(log.get_meta::<Vote>(KEY_VOTE).unwrap(), Some(loaded));
        assert_eq!(log.read_vote().await.unwrap(), Some(loaded));
    }
}
