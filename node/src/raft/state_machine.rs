//! The Raft state machine: applies committed entries to the catalog and builds/installs
//! snapshots of it, all in RocksDB (`catalog`, `sm_meta`, `snapshot` column families).
//!
//! Invariants: the catalog changes and the new last-applied id of one `apply` call are written in
//! one atomic batch, so a crash never leaves an entry half-applied or applied twice. Those writes
//! are not fsynced on their own: committed entries stay in the fsynced Raft log until a snapshot
//! covers them, and `LogStore::purge` syncs the WAL first. A snapshot is decoded completely
//! before anything is replaced, so a corrupt snapshot cannot harm the current state.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{AnyError, EntryPayload, OptionalSend, RaftSnapshotBuilder, Snapshot, StorageIOError};
use rocksdb::{IteratorMode, WriteBatch};
use serde::{Deserialize, Serialize};

use super::{decode, encode, Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use crate::catalog::CatalogTxn;
use crate::storage::{Store, CF_CATALOG, CF_SM_META, CF_SNAPSHOT};
use haven_proto::CommandOutcome;

/// Last applied [`LogId`] (absent before the first entry is applied).
const KEY_APPLIED: &[u8] = b"applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
const KEY_CURRENT: &[u8] = b"current";
const SNAPSHOT_FORMAT: u32 = 1;

fn io(e: StorageIOError<u64>) -> StorageError {
    StorageError::IO { source: e }
}

fn any(msg: impl ToString) -> AnyError {
    AnyError::error(msg.to_string())
}

/// The serialized form of a snapshot.
#[derive(Serialize, Deserialize)]
struct SnapshotPayload {
    format: u32,
    catalog: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// The state machine. Clones share the database; openraft drives one clone for applying and
/// hands another to the snapshot builder.
#[derive(Clone)]
pub struct StateMachineStore {
    store: Store,
    snapshot_seq: Arc<AtomicU64>,
}

impl StateMachineStore {
    pub fn new(store: Store) -> Self {
        Self { store, snapshot_seq: Arc::new(AtomicU64::new(0)) }
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        let raw = self
            .store
            .db()
            .get_cf(self.store.cf(CF_SM_META), key)
            .map_err(|e| io(StorageIOError::read_state_machine(&e)))?;
        raw.map(|b| decode(&b).map_err(|e| io(StorageIOError::read_state_machine(any(e))))).transpose()
    }

    fn current_snapshot(&self) -> Result<Option<StoredSnapshot>, StorageError> {
        let raw = self
            .store
            .db()
            .get_cf(self.store.cf(CF_SNAPSHOT), KEY_CURRENT)
            .map_err(|e| io(StorageIOError::read_snapshot(None, &e)))?;
        raw.map(|b| decode(&b).map_err(|e| io(StorageIOError::read_snapshot(None, any(e))))).transpose()
    }

    fn save_snapshot(&self, snap: &StoredSnapshot) -> Result<(), StorageError> {
        let bytes = encode(snap).map_err(|e| io(StorageIOError::write_snapshot(None, any(e))))?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.store.cf(CF_SNAPSHOT), KEY_CURRENT, bytes);
        self.store.db().write_opt(batch, &Store::durable()).map_err(|e| io(StorageIOError::write_snapshot(None, &e)))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Read the catalog and its applied id from one RocksDB snapshot, so they agree even if
        // entries are applied while we copy.
        let db = self.store.db();
        let view = db.snapshot();
        let read = |key: &[u8]| -> Result<Option<Vec<u8>>, StorageError> {
            view.get_cf(self.store.cf(CF_SM_META), key).map_err(|e| io(StorageIOError::read_state_machine(&e)))
        };
        let applied: Option<LogId> = read(KEY_APPLIED)?
            .map(|b| decode(&b).map_err(|e| io(StorageIOError::read_state_machine(any(e)))))
            .transpose()?;
        let membership: StoredMembership = read(KEY_MEMBERSHIP)?
            .map(|b| decode(&b).map_err(|e| io(StorageIOError::read_state_machine(any(e)))))
            .transpose()?
            .unwrap_or_default();
        let mut catalog = Vec::new();
        for item in view.iterator_cf(self.store.cf(CF_CATALOG), IteratorMode::Start) {
            let (k, v) = item.map_err(|e| io(StorageIOError::read_state_machine(&e)))?;
            catalog.push((k.to_vec(), v.to_vec()));
        }
        let data = encode(&SnapshotPayload { format: SNAPSHOT_FORMAT, catalog })
            .map_err(|e| io(StorageIOError::write_snapshot(None, any(e))))?;
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match applied {
            Some(l) => format!("{}-{}-{seq}", l.leader_id.term, l.index),
            None => format!("0-0-{seq}"),
        };
        let meta = SnapshotMeta { last_log_id: applied, last_membership: membership, snapshot_id };
        let stored = StoredSnapshot { meta: meta.clone(), data };
        self.save_snapshot(&stored)?;
        metrics::counter!("haven_raft_snapshots_built_total").increment(1);
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(stored.data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let applied: Option<LogId> = self.read_meta(KEY_APPLIED)?;
        let membership = self.read_meta(KEY_MEMBERSHIP)?.unwrap_or_default();
        Ok((applied, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandOutcome>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        let mut outcomes = Vec::new();
        let mut last_applied = None;
        let mut membership = None;
        {
            let mut txn = CatalogTxn::new(&self.store, &mut batch);
            for entry in entries {
                last_applied = Some(entry.log_id);
                let outcome = match &entry.payload {
                    EntryPayload::Blank => CommandOutcome::Internal,
                    EntryPayload::Normal(cmd) => {
                        txn.apply(cmd).map_err(|e| io(StorageIOError::apply(entry.log_id, any(e))))?
                    }
                    EntryPayload::Membership(m) => {
                        membership = Some(StoredMembership::new(Some(entry.log_id), m.clone()));
                        CommandOutcome::Internal
                    }
                };
                outcomes.push(outcome);
            }
        }
        let meta = self.store.cf(CF_SM_META);
        if let Some(l) = last_applied {
            batch.put_cf(meta, KEY_APPLIED, encode(&l).map_err(|e| io(StorageIOError::write_state_machine(any(e))))?);
        }
        if let Some(m) = membership {
            batch.put_cf(
                meta,
                KEY_MEMBERSHIP,
                encode(&m).map_err(|e| io(StorageIOError::write_state_machine(any(e))))?,
            );
        }
        // Not fsynced here: see the module comment (the Raft log is the durable record).
        self.store.db().write_opt(batch, &Store::relaxed()).map_err(|e| io(StorageIOError::write_state_machine(&e)))?;
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        // Decode completely before touching the current state.
        let payload: SnapshotPayload =
            decode(&data).map_err(|e| io(StorageIOError::read_snapshot(Some(meta.signature()), any(e))))?;
        if payload.format != SNAPSHOT_FORMAT {
            return Err(io(StorageIOError::read_snapshot(
                Some(meta.signature()),
                any(format!("unknown snapshot format {}", payload.format)),
            )));
        }
        let cf = self.store.cf(CF_CATALOG);
        let mut batch = WriteBatch::default();
        // Every catalog key starts with an ASCII prefix (see `catalog`), so [.., 0xFF) covers them all.
        batch.delete_range_cf(cf, &[][..], &[0xFFu8][..]);
        for (k, v) in &payload.catalog {
            batch.put_cf(cf, k, v);
        }
        let sm = self.store.cf(CF_SM_META);
        let w = |e: String| io(StorageIOError::write_state_machine(any(e)));
        match &meta.last_log_id {
            Some(l) => batch.put_cf(sm, KEY_APPLIED, encode(l).map_err(w)?),
            None => batch.delete_cf(sm, KEY_APPLIED),
        }
        batch.put_cf(sm, KEY_MEMBERSHIP, encode(&meta.last_membership).map_err(w)?);
        // Durable: after this the log before the snapshot may be purged.
        self.store.db().write_opt(batch, &Store::durable()).map_err(|e| io(StorageIOError::write_state_machine(&e)))?;
        self.save_snapshot(&StoredSnapshot { meta: meta.clone(), data })?;
        metrics::counter!("haven_raft_snapshots_installed_total").increment(1);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.current_snapshot()?.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}
