//! The Raft state machine: applies committed entries to the catalog and builds/installs
//! snapshots of it. Catalog and metadata live in RocksDB (`catalog`, `sm_meta`; `snapshot` holds
//! the record of the current snapshot); snapshot contents are files in
//! `<data-dir>/raft-snapshots/` in the streaming format of [`super::snapshot_file`].
//!
//! Invariants: the catalog changes and the new last-applied id of one `apply` call are written in
//! one atomic batch, so a crash never leaves an entry half-applied or applied twice. Those writes
//! are not fsynced on their own: committed entries stay in the fsynced Raft log until a snapshot
//! covers them, and `LogStore::purge` syncs the WAL first. A received snapshot is verified
//! completely (every length, the record count and the checksum) before anything is replaced, so a
//! corrupt snapshot cannot harm the current state; it then replaces the catalog in one atomic
//! batch, together with the applied id and the record of the new current snapshot. The file kept
//! as the current snapshot holds the data that was verified and installed, even when
//! `install_snapshot` is handed other data than the file `begin_receiving_snapshot` created (the
//! trait allows any `SnapshotData`; openraft's storage test suite does so).
//!
//! Memory: building streams the catalog from a RocksDB snapshot to a file, and openraft sends it
//! in chunks read from that file, so neither needs the catalog in memory. Installing holds the
//! catalog once, in the write batch that replaces it atomically (never as one frame or one
//! buffer besides). This module must not interpret catalog keys beyond their common prefix range.

use std::io::{BufReader, BufWriter, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::RaftStateMachine;
use openraft::{AnyError, EntryPayload, OptionalSend, RaftSnapshotBuilder, Snapshot, StorageIOError};
use rocksdb::{IteratorMode, WriteBatch};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::snapshot_file::{self, SnapshotReader, SnapshotWriter};
use super::{decode, encode, Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use crate::catalog::CatalogTxn;
use crate::storage::{Store, CF_CATALOG, CF_SM_META, CF_SNAPSHOT};
use haven_proto::CommandOutcome;

/// Last applied [`LogId`] (absent before the first entry is applied).
const KEY_APPLIED: &[u8] = b"applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
/// Format 1: the whole snapshot as one value (read once, to convert it).
const KEY_LEGACY_CURRENT: &[u8] = b"current";
/// The current snapshot's [`CurrentSnapshot`] record.
const KEY_CURRENT_FILE: &[u8] = b"current_file";
const LEGACY_SNAPSHOT_FORMAT: u32 = 1;
/// Directory of snapshot files, beside the database.
pub const SNAPSHOT_DIR: &str = "raft-snapshots";
const SNAPSHOT_EXT: &str = "snap";
/// Received, not yet installed (removed at start-up).
const INCOMING_EXT: &str = "part";
/// Being built (removed at start-up).
const BUILDING_EXT: &str = "tmp";
/// Buffer for streaming snapshot files.
const FILE_BUFFER_BYTES: usize = 1 << 20;

fn io(e: StorageIOError<u64>) -> StorageError {
    StorageError::IO { source: e }
}

fn any(msg: impl ToString) -> AnyError {
    AnyError::error(msg.to_string())
}

fn read_err(meta: Option<&SnapshotMeta>, e: impl ToString) -> StorageError {
    io(StorageIOError::read_snapshot(meta.map(|m| m.signature()), any(e)))
}

fn write_err(meta: Option<&SnapshotMeta>, e: impl ToString) -> StorageError {
    io(StorageIOError::write_snapshot(meta.map(|m| m.signature()), any(e)))
}

/// Format 1 of a snapshot: the whole catalog in one bincode value.
#[derive(Serialize, Deserialize)]
struct LegacyPayload {
    format: u32,
    catalog: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Serialize, Deserialize)]
struct LegacySnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// The record of the current snapshot: its meta and its file in [`SNAPSHOT_DIR`].
#[derive(Serialize, Deserialize)]
struct CurrentSnapshot {
    meta: SnapshotMeta,
    file: String,
}

/// The state machine. Clones share the database; openraft drives one clone for applying and
/// hands another to the snapshot builder.
#[derive(Clone)]
pub struct StateMachineStore {
    store: Store,
    snapshot_dir: PathBuf,
    snapshot_seq: Arc<AtomicU64>,
    /// The file openraft is writing a received snapshot into.
    incoming: Arc<Mutex<Option<PathBuf>>>,
}

impl StateMachineStore {
    /// A state machine over `store`; snapshot files go to [`SNAPSHOT_DIR`] beside the database.
    /// Leftovers of an interrupted build or transfer are removed.
    pub fn new(store: Store) -> Self {
        let db_path = store.db().path().to_path_buf();
        let snapshot_dir = db_path.parent().unwrap_or(&db_path).join(SNAPSHOT_DIR);
        let this = Self { store, snapshot_dir, snapshot_seq: Arc::new(AtomicU64::new(0)), incoming: Arc::default() };
        this.remove_files(|ext, _| ext == INCOMING_EXT || ext == BUILDING_EXT);
        this
    }

    /// Remove files of the snapshot directory for which `doomed(extension, name)` holds.
    fn remove_files(&self, doomed: impl Fn(&str, &str) -> bool) {
        let Ok(dir) = std::fs::read_dir(&self.snapshot_dir) else { return };
        for entry in dir.flatten() {
            let path = entry.path();
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if doomed(ext, name) {
                if let Err(e) = std::fs::remove_file(&path) {
                    warn!(path = %path.display(), error = %e, "cannot remove an old snapshot file");
                }
            }
        }
    }

    /// A new file name in the snapshot directory, unique across restarts.
    fn new_file_name(&self, ext: &str) -> String {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        format!("{nanos}-{seq}.{ext}")
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        let raw = self
            .store
            .db()
            .get_cf(self.store.cf(CF_SM_META), key)
            .map_err(|e| io(StorageIOError::read_state_machine(&e)))?;
        raw.map(|b| decode(&b).map_err(|e| io(StorageIOError::read_state_machine(any(e))))).transpose()
    }

    fn read_snapshot_record<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        let raw = self.store.db().get_cf(self.store.cf(CF_SNAPSHOT), key).map_err(|e| read_err(None, e))?;
        raw.map(|b| decode(&b).map_err(|e| read_err(None, e))).transpose()
    }

    /// The current snapshot's record, converting a format-1 snapshot on first use.
    fn current_snapshot(&self) -> Result<Option<CurrentSnapshot>, StorageError> {
        if let Some(current) = self.read_snapshot_record::<CurrentSnapshot>(KEY_CURRENT_FILE)? {
            return Ok(Some(current));
        }
        let Some(legacy) = self.read_snapshot_record::<LegacySnapshot>(KEY_LEGACY_CURRENT)? else { return Ok(None) };
        let meta = legacy.meta;
        let payload: LegacyPayload = decode(&legacy.data).map_err(|e| read_err(Some(&meta), e))?;
        if payload.format != LEGACY_SNAPSHOT_FORMAT {
            return Err(read_err(Some(&meta), format!("unknown snapshot format {}", payload.format)));
        }
        let file = self.write_snapshot_file(&meta, payload.catalog.into_iter().map(Ok))?;
        let current = CurrentSnapshot { meta, file };
        let mut batch = WriteBatch::default();
        self.record_current(&mut batch, &current)?;
        self.store.db().write_opt(batch, &Store::durable()).map_err(|e| write_err(Some(&current.meta), e))?;
        self.remove_files(|ext, name| ext == SNAPSHOT_EXT && name != current.file);
        info!(snapshot = %current.meta.snapshot_id, "converted the current snapshot to format 2");
        Ok(Some(current))
    }

    /// Put the record of `current` into `batch` (and drop a format-1 snapshot).
    fn record_current(&self, batch: &mut WriteBatch, current: &CurrentSnapshot) -> Result<(), StorageError> {
        let cf = self.store.cf(CF_SNAPSHOT);
        batch.put_cf(cf, KEY_CURRENT_FILE, encode(current).map_err(|e| write_err(Some(&current.meta), e))?);
        batch.delete_cf(cf, KEY_LEGACY_CURRENT);
        Ok(())
    }

    /// Stream `pairs` into a new, fsynced snapshot file; returns its name.
    fn write_snapshot_file<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &self,
        meta: &SnapshotMeta,
        pairs: impl Iterator<Item = Result<(K, V), StorageError>>,
    ) -> Result<String, StorageError> {
        let werr = |e: &dyn ToString| write_err(Some(meta), e.to_string());
        std::fs::create_dir_all(&self.snapshot_dir).map_err(|e| werr(&e))?;
        let name = self.new_file_name(SNAPSHOT_EXT);
        let building = self.snapshot_dir.join(self.new_file_name(BUILDING_EXT));
        let file = std::fs::File::create(&building).map_err(|e| werr(&e))?;
        let mut writer =
            SnapshotWriter::new(BufWriter::with_capacity(FILE_BUFFER_BYTES, file)).map_err(|e| werr(&e))?;
        for pair in pairs {
            let (k, v) = pair?;
            writer.push(k.as_ref(), v.as_ref()).map_err(|e| werr(&e))?;
        }
        let (buffered, _records) = writer.finish().map_err(|e| werr(&e))?;
        let file = buffered.into_inner().map_err(|e| werr(&e.into_error()))?;
        file.sync_all().map_err(|e| werr(&e))?;
        self.move_into_place(&building, &name).map_err(|e| werr(&e))?;
        Ok(name)
    }

    /// Rename `from` to `name` in the snapshot directory, durably.
    fn move_into_place(&self, from: &Path, name: &str) -> std::io::Result<()> {
        std::fs::rename(from, self.snapshot_dir.join(name))?;
        std::fs::File::open(&self.snapshot_dir)?.sync_all()
    }

    /// Build a snapshot of the catalog as of one RocksDB snapshot (blocking I/O).
    fn build_blocking(&self) -> Result<SnapshotMeta, StorageError> {
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
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match applied {
            Some(l) => format!("{}-{}-{seq}", l.leader_id.term, l.index),
            None => format!("0-0-{seq}"),
        };
        let meta = SnapshotMeta { last_log_id: applied, last_membership: membership, snapshot_id };
        let rows = view.iterator_cf(self.store.cf(CF_CATALOG), IteratorMode::Start);
        let file = self.write_snapshot_file(
            &meta,
            rows.map(|item| item.map_err(|e| io(StorageIOError::read_state_machine(&e)))),
        )?;
        let current = CurrentSnapshot { meta: meta.clone(), file };
        let mut batch = WriteBatch::default();
        self.record_current(&mut batch, &current)?;
        self.store.db().write_opt(batch, &Store::durable()).map_err(|e| write_err(Some(&meta), e))?;
        self.remove_files(|ext, name| ext == SNAPSHOT_EXT && name != current.file);
        Ok(meta)
    }

    async fn open_snapshot(&self, current: CurrentSnapshot) -> Result<Snapshot<TypeConfig>, StorageError> {
        let path = self.snapshot_dir.join(&current.file);
        let file = tokio::fs::File::open(&path).await.map_err(|e| read_err(Some(&current.meta), e))?;
        Ok(Snapshot { meta: current.meta, snapshot: Box::new(file) })
    }

    /// Verify, then install, the received snapshot file at `path` (blocking I/O).
    fn install_blocking(&self, meta: &SnapshotMeta, mut file: std::fs::File, path: &Path) -> Result<(), StorageError> {
        let rerr = |e: &dyn ToString| read_err(Some(meta), e.to_string());
        // Verify completely before touching the current state.
        file.seek(SeekFrom::Start(0)).map_err(|e| rerr(&e))?;
        let records =
            snapshot_file::verify(BufReader::with_capacity(FILE_BUFFER_BYTES, &file)).map_err(|e| rerr(&e))?;
        if !same_file(&file, path).map_err(|e| rerr(&e))? {
            // Handed other data than the file `begin_receiving_snapshot` created: keep what was
            // verified, not that (possibly empty) file.
            copy_into(&mut file, path).map_err(|e| write_err(Some(meta), e))?;
        }
        file.sync_all().map_err(|e| write_err(Some(meta), e))?;
        let name = self.new_file_name(SNAPSHOT_EXT);
        self.move_into_place(path, &name).map_err(|e| write_err(Some(meta), e))?;

        let cf = self.store.cf(CF_CATALOG);
        let mut batch = WriteBatch::default();
        // Every catalog key starts with an ASCII prefix (see `catalog`), so [.., 0xFF) covers them all.
        batch.delete_range_cf(cf, &[][..], &[0xFFu8][..]);
        file.seek(SeekFrom::Start(0)).map_err(|e| rerr(&e))?;
        let mut reader =
            SnapshotReader::new(BufReader::with_capacity(FILE_BUFFER_BYTES, &file)).map_err(|e| rerr(&e))?;
        while let Some((k, v)) = reader.next_record().map_err(|e| rerr(&e))? {
            batch.put_cf(cf, k, v);
        }
        let sm = self.store.cf(CF_SM_META);
        let w = |e: String| io(StorageIOError::write_state_machine(any(e)));
        match &meta.last_log_id {
            Some(l) => batch.put_cf(sm, KEY_APPLIED, encode(l).map_err(w)?),
            None => batch.delete_cf(sm, KEY_APPLIED),
        }
        batch.put_cf(sm, KEY_MEMBERSHIP, encode(&meta.last_membership).map_err(w)?);
        let current = CurrentSnapshot { meta: meta.clone(), file: name };
        self.record_current(&mut batch, &current)?;
        // Durable: after this the log before the snapshot may be purged.
        self.store.db().write_opt(batch, &Store::durable()).map_err(|e| io(StorageIOError::write_state_machine(&e)))?;
        self.remove_files(|ext, name| ext == SNAPSHOT_EXT && name != current.file);
        info!(snapshot = %meta.snapshot_id, records, "installed snapshot");
        Ok(())
    }
}

/// Whether `file` is the file at `path` (same device and inode).
fn same_file(file: &std::fs::File, path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let (open, named) = (file.metadata()?, std::fs::metadata(path)?);
    Ok(open.dev() == named.dev() && open.ino() == named.ino())
}

/// Replace the contents of the file at `path` with all of `from`, durably.
fn copy_into(from: &mut std::fs::File, path: &Path) -> std::io::Result<()> {
    from.seek(SeekFrom::Start(0))?;
    let mut to = std::fs::File::create(path)?;
    std::io::copy(from, &mut to)?;
    to.sync_all()
}

/// Run blocking snapshot work off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| write_err(None, format!("snapshot task failed: {e}")))?
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let this = self.clone();
        let meta = blocking(move || this.build_blocking()).await?;
        metrics::counter!("haven_raft_snapshots_built_total").increment(1);
        let current = self.current_snapshot()?.filter(|c| c.meta.snapshot_id == meta.snapshot_id);
        let current = current.ok_or_else(|| read_err(Some(&meta), "the snapshot just built is not current"))?;
        self.open_snapshot(current).await
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

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        tokio::fs::create_dir_all(&self.snapshot_dir).await.map_err(|e| write_err(None, e))?;
        let path = self.snapshot_dir.join(self.new_file_name(INCOMING_EXT));
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(|e| write_err(None, e))?;
        let previous = self.incoming.lock().expect("incoming snapshot lock").replace(path);
        if let Some(previous) = previous {
            // An abandoned transfer (the leader started over with another snapshot).
            let _ = tokio::fs::remove_file(previous).await;
        }
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let path = self.incoming.lock().expect("incoming snapshot lock").take();
        let path = path.ok_or_else(|| read_err(Some(meta), "no snapshot is being received"))?;
        let file = (*snapshot).into_std().await;
        let (this, owned_meta) = (self.clone(), meta.clone());
        let installed = blocking(move || this.install_blocking(&owned_meta, file, &path)).await;
        if installed.is_err() {
            // Leave nothing half-received behind (the file may be gone already if it was moved).
            self.remove_files(|ext, _| ext == INCOMING_EXT);
        }
        installed?;
        metrics::counter!("haven_raft_snapshots_installed_total").increment(1);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        match self.current_snapshot()? {
            Some(current) => Ok(Some(self.open_snapshot(current).await?)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_proto::CatalogCommand;
    use openraft::CommittedLeaderId;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn open() -> (tempfile::TempDir, StateMachineStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        (dir, StateMachineStore::new(store))
    }

    fn put(index: u64, key: &str, value_bytes: usize) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(CatalogCommand::KvPut {
                key: key.into(),
                value: vec![index as u8; value_bytes],
            }),
        }
    }

    fn catalog(sm: &StateMachineStore) -> Vec<snapshot_file::Record> {
        let db = sm.store.db();
        let rows = db.iterator_cf(sm.store.cf(CF_CATALOG), IteratorMode::Start);
        rows.map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap()).collect()
    }

    async fn snapshot_bytes(snapshot: Snapshot<TypeConfig>) -> (SnapshotMeta, Vec<u8>) {
        let mut data = Vec::new();
        let mut file = snapshot.snapshot;
        file.read_to_end(&mut data).await.unwrap();
        (snapshot.meta, data)
    }

    async fn receive(sm: &mut StateMachineStore, meta: &SnapshotMeta, data: &[u8]) -> Result<(), StorageError> {
        let mut file = sm.begin_receiving_snapshot().await.unwrap();
        file.write_all(data).await.unwrap();
        file.shutdown().await.unwrap();
        sm.install_snapshot(meta, file).await
    }

    #[tokio::test]
    async fn a_snapshot_streams_through_files_and_installs_whole() {
        let (_a_dir, mut a) = open();
        let entries: Vec<Entry> = (1..=40).map(|i| put(i, &format!("kv/{i:03}"), 10_000)).collect();
        a.apply(entries).await.unwrap();
        let built = a.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let (meta, data) = snapshot_bytes(built).await;
        assert_eq!(meta.last_log_id.map(|l| l.index), Some(40));
        assert!(data.len() > 40 * 10_000, "the file holds every value");
        // The current snapshot is that file, and it is the only one kept.
        let (again, same) = snapshot_bytes(a.get_current_snapshot().await.unwrap().unwrap()).await;
        assert_eq!((again.snapshot_id, same.len()), (meta.snapshot_id.clone(), data.len()));
        a.apply(vec![put(41, "kv/041", 10)]).await.unwrap();
        a.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(std::fs::read_dir(&a.snapshot_dir).unwrap().count(), 1);

        let (_b_dir, mut b) = open();
        b.apply(vec![put(1, "stale", 5)]).await.unwrap();
        // A damaged transfer is refused and changes nothing.
        let mut damaged = data.clone();
        let middle = damaged.len() / 2;
        damaged[middle] ^= 0x40;
        assert!(receive(&mut b, &meta, &damaged).await.is_err());
        assert_eq!(catalog(&b).len(), 1);
        assert_eq!(b.applied_state().await.unwrap().0.map(|l| l.index), Some(1));

        receive(&mut b, &meta, &data).await.unwrap();
        let a_rows = catalog(&a);
        assert_eq!(catalog(&b), a_rows[..a_rows.len() - 1].to_vec(), "the catalog as of the snapshot");
        assert_eq!(b.applied_state().await.unwrap().0, meta.last_log_id);
        let (current, _) = snapshot_bytes(b.get_current_snapshot().await.unwrap().unwrap()).await;
        assert_eq!(current.snapshot_id, meta.snapshot_id);
        let names: Vec<String> = std::fs::read_dir(&b.snapshot_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1, "no received or damaged file is left behind: {names:?}");
        assert!(names[0].ends_with(".snap"), "{names:?}");
    }

    #[tokio::test]
    async fn a_format_1_snapshot_is_converted_on_first_use() {
        let (_dir, mut sm) = open();
        let meta = SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 9)),
            last_membership: Default::default(),
            snapshot_id: "3-9-0".into(),
        };
        let catalog = vec![(b"kv/a".to_vec(), b"1".to_vec()), (b"kv/b".to_vec(), b"2".to_vec())];
        let data = encode(&LegacyPayload { format: LEGACY_SNAPSHOT_FORMAT, catalog }).unwrap();
        let legacy = encode(&LegacySnapshot { meta: meta.clone(), data }).unwrap();
        sm.store.db().put_cf(sm.store.cf(CF_SNAPSHOT), KEY_LEGACY_CURRENT, legacy).unwrap();

        let (converted, bytes) = snapshot_bytes(sm.get_current_snapshot().await.unwrap().unwrap()).await;
        assert_eq!(converted.snapshot_id, meta.snapshot_id);
        assert_eq!(snapshot_file::verify(&bytes[..]).unwrap(), 2);
        let legacy_left = sm.store.db().get_cf(sm.store.cf(CF_SNAPSHOT), KEY_LEGACY_CURRENT).unwrap();
        assert!(legacy_left.is_none(), "the format-1 value is dropped once converted");
    }
}
