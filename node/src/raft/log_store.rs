//! The Raft log and vote in RocksDB (`raft_log`, `raft_meta` column families).
//!
//! Invariant: an entry or a vote is fsynced before openraft is told it is stored — `append`'s
//! flush callback is called by the WAL syncer thread only after an fsync that covers the entries,
//! and `save_vote` returns only after a synchronous write. Entries are keyed by big-endian index so iteration order is log order. This module must
//! not interpret entry payloads.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::AnyError;
use openraft::{LogState, OptionalSend, RaftLogReader, StorageIOError};
use rocksdb::{Direction, IteratorMode, WriteBatch};

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
    syncer: std::sync::mpsc::Sender<LogFlushed<TypeConfig>>,
}

impl LogStore {
    /// A log store over `store`, with its WAL sync thread started.
    pub fn new(store: Store) -> std::io::Result<Self> {
        let (syncer, pending) = std::sync::mpsc::channel();
        let sync_store = store.clone();
        std::thread::Builder::new().name("haven-wal-sync".into()).spawn(move || wal_syncer(sync_store, pending))?;
        Ok(Self { store, syncer })
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

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let db = self.store.db();
        let from = index_key(start);
        let it = db.iterator_cf(self.store.cf(CF_RAFT_LOG), IteratorMode::From(&from, Direction::Forward));
        let mut out = Vec::new();
        for item in it {
            let (k, v) = item.map_err(|e| io(StorageIOError::read_logs(&e)))?;
            let idx = u64::from_be_bytes(
                k.as_ref().try_into().map_err(|_| io(StorageIOError::read_logs(any("bad log key".into()))))?,
            );
            if !range.contains(&idx) {
                break;
            }
            let entry: Entry = decode(&v).map_err(|e| io(StorageIOError::read_log_at_index(idx, any(e))))?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.get_meta(KEY_LAST_PURGED)?;
        let last = self.last_entry_log_id()?.or(last_purged);
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        // Durable before return: a vote must survive a crash or the node could vote twice in a term.
        self.put_meta_durable(KEY_VOTE, vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(KEY_VOTE)
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
        if let Err(std::sync::mpsc::SendError(callback)) = self.syncer.send(callback) {
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
