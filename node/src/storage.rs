//! The node's RocksDB databases and their column families.
//!
//! A node keeps two databases by default (`StorageLayout::Split`):
//! - the **control** database (`<data-dir>/db/`): the Raft log and vote, the catalog (the state
//!   machine) and its snapshot. Small, latency-critical writes: a Raft append or vote waits on
//!   this database's write-ahead log and fsync only.
//! - the **data** database (`<data-dir>/blocks/`): references to volume block versions and
//!   per-host volume metadata; the block bytes themselves are in its `extents/` directory
//!   (`volume::extents`).
//!
//! **Architecture Invariant:** no write batch spans both databases. Nothing needs one: blocks
//! are made durable by their own fsync before a write is acknowledged (`volume::blockstore`),
//! and the catalog records only what Raft committed. Keeping them apart is what keeps consensus
//! from queueing behind block I/O: with one database, a Raft append waited behind 1 MiB block
//! batches on the same WAL mutex and fsync, and memtable stalls caused by block writes stopped
//! the Raft log too (dozens of elections a minute under `fio`; see `benches/README.md`,
//! `leadership_bench`).
//!
//! `StorageLayout::Shared` (one database holding every column family) is what nodes did before the
//! split. It remains for data dirs created then (detected on open) and as the baseline the
//! leadership benchmark measures; unit tests use it for convenience.
//!
//! This module owns opening the databases and naming the column families; what goes into each
//! belongs to its user (`raft::log_store`, `raft::state_machine`, `volume::blockstore`).

use std::path::Path;
use std::sync::Arc;

use crate::config::StorageLayout;
use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, WriteOptions, DB};

/// Raft log entries, keyed by big-endian index.
pub const CF_RAFT_LOG: &str = "raft_log";
/// Raft vote, committed id and last purged id.
pub const CF_RAFT_META: &str = "raft_meta";
/// The catalog (the state machine's data).
pub const CF_CATALOG: &str = "catalog";
/// State machine metadata: last applied log id and membership.
pub const CF_SM_META: &str = "sm_meta";
/// The current state-machine snapshot.
pub const CF_SNAPSHOT: &str = "snapshot";

/// Volume block versions on this host (see `volume::blockstore`).
pub const CF_BLOCKS: &str = "blocks";
/// Per-host volume replica metadata: local snapshots, resync cursors, preserved divergent writes.
pub const CF_VOLUME_META: &str = "volume_meta";

/// The column families of the control database (Raft and the catalog).
pub const CONTROL_CFS: [&str; 5] = [CF_RAFT_LOG, CF_RAFT_META, CF_CATALOG, CF_SM_META, CF_SNAPSHOT];
/// The column families of the data database (volume blocks).
pub const DATA_CFS: [&str; 2] = [CF_BLOCKS, CF_VOLUME_META];

/// The control database's directory under the data dir (with `StorageLayout::Shared`, the only one).
pub const CONTROL_DIR: &str = "db";
/// The data database's directory under the data dir (`StorageLayout::Split` only).
pub const DATA_DIR: &str = "blocks";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt record in {cf}: {reason}")]
    Corrupt { cf: &'static str, reason: String },
    #[error("{0}")]
    Layout(String),
}

/// The node's databases: `control` for Raft and the catalog, `data` for volume blocks. With
/// `StorageLayout::Shared` both are handles on the same database.
#[derive(Clone)]
pub struct Stores {
    pub control: Store,
    pub data: Store,
    pub layout: StorageLayout,
}

impl Stores {
    /// Open (creating if needed) the databases under `data_dir`. A data dir created before the
    /// split (its `db/` holds the block column families) opens as `StorageLayout::Shared` whatever
    /// `wanted` says, with a warning: its blocks cannot move without a rewrite. Asking for
    /// `Shared` on a split data dir is refused (the blocks would be missing).
    pub fn open(data_dir: &Path, wanted: StorageLayout) -> Result<Self, StoreError> {
        let control_path = data_dir.join(CONTROL_DIR);
        let data_path = data_dir.join(DATA_DIR);
        let legacy = existing_cfs(&control_path).iter().any(|cf| DATA_CFS.contains(&cf.as_str()));
        let layout = match (wanted, legacy) {
            (StorageLayout::Split, true) => {
                tracing::warn!(
                    dir = %control_path.display(),
                    "this data dir keeps volume blocks in the Raft database (created before the split); \
                     running with storage layout \"shared\": re-create the node to separate them"
                );
                StorageLayout::Shared
            }
            (StorageLayout::Shared, false) if data_path.exists() => {
                return Err(StoreError::Layout(format!(
                    "storage layout \"shared\" asked for, but this data dir keeps volume blocks in {}: \
                     remove `[storage] layout` from haven.toml or re-create the node",
                    data_path.display()
                )))
            }
            (wanted, _) => wanted,
        };
        let stores = match layout {
            StorageLayout::Shared => {
                let all = Store::open(&control_path)?;
                Self { control: all.clone(), data: all, layout }
            }
            StorageLayout::Split => Self {
                control: Store::open_with(&control_path, &CONTROL_CFS)?,
                data: Store::open_with(&data_path, &DATA_CFS)?,
                layout,
            },
        };
        Ok(stores)
    }
}

/// The column families of the database at `path` (none if there is no database yet).
fn existing_cfs(path: &Path) -> Vec<String> {
    if !path.join("CURRENT").exists() {
        return Vec::new();
    }
    DB::list_cf(&Options::default(), path).unwrap_or_default()
}

/// A handle on one database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
}

impl Store {
    /// Open (creating if needed) one database at `path` holding every column family (the
    /// `StorageLayout::Shared` database; unit tests use it for convenience).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let all: Vec<&'static str> = CONTROL_CFS.iter().chain(DATA_CFS.iter()).copied().collect();
        Self::open_with(path, &all)
    }

    /// Open (creating if needed) the database at `path` with the column families `cfs`.
    pub fn open_with(path: &Path, cfs: &[&'static str]) -> Result<Self, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        let descriptors = cfs.iter().map(|name| ColumnFamilyDescriptor::new(*name, cf_options(name)));
        let db = DB::open_cf_descriptors(&opts, path, descriptors)?;
        Ok(Self { db: Arc::new(db) })
    }

    pub fn db(&self) -> &DB {
        &self.db
    }

    /// The handle of a column family this module created.
    pub fn cf(&self, name: &'static str) -> &ColumnFamily {
        // Each database is opened with the column families its users ask of it, so a missing
        // handle is a bug (a block read on the control database), not bad data.
        self.db.cf_handle(name).unwrap_or_else(|| panic!("column family {name} was not opened"))
    }

    /// Write options for data that must be durable before it is acknowledged: the WAL is
    /// fsynced before `write` returns.
    pub fn durable() -> WriteOptions {
        let mut w = WriteOptions::default();
        w.set_sync(true);
        w
    }

    /// Write options for data that may be rebuilt from the (durable) Raft log: written to the WAL
    /// but not fsynced; the next durable write (or [`Store::sync_wal`]) makes it durable too.
    pub fn relaxed() -> WriteOptions {
        WriteOptions::default()
    }

    /// Fsync the write-ahead log, making every earlier write durable.
    pub fn sync_wal(&self) -> Result<(), StoreError> {
        Ok(self.db.flush_wal(true)?)
    }
}

/// The options of column family `name`.
fn cf_options(name: &str) -> Options {
    let mut cf_opts = Options::default();
    if name == CF_BLOCKS {
        // Values are 25-byte references into the extent segments (`volume::extents`): a 64 KiB
        // table block holds about a thousand, so a 1 MiB range read is one block-cache lookup,
        // and a cache of our own keeps the working set of references hot.
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_size(64 << 10);
        table.set_block_cache(&rocksdb::Cache::new_lru_cache(64 << 20));
        cf_opts.set_block_based_table_factory(&table);
        // Whole blocks stored inline (stores from before extents, injected corruption) go to blob
        // files at flush, so compaction does not rewrite them at every level.
        cf_opts.set_enable_blob_files(true);
        cf_opts.set_min_blob_size(1024);
        cf_opts.set_enable_blob_gc(true);
        // Small memtables: every overwrite of a block deletes its older version, and until a
        // flush drops the pair, each apply's iterator and each collector scan step over those
        // tombstones (with 128 MiB, 1 MiB writes to a 128 MiB volume spent a fifth of their CPU
        // there). References are small, so a 16 MiB memtable still holds ~200k of them.
        cf_opts.set_write_buffer_size(16 << 20);
        // Room for a burst while one is flushed, so writes do not stall behind a flush.
        cf_opts.set_max_write_buffer_number(4);
    }
    if name == CF_VOLUME_META {
        // Volume high-water marks are raised with a u64-max merge (see volume::blockstore).
        cf_opts.set_merge_operator_associative(
            crate::volume::blockstore::HWM_MERGE_OPERATOR,
            crate::volume::blockstore::hwm_merge,
        );
    }
    cf_opts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_blocks_out_of_the_control_database() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::open(dir.path(), StorageLayout::Split).unwrap();
        assert_eq!(stores.layout, StorageLayout::Split);
        assert!(stores.control.db().cf_handle(CF_BLOCKS).is_none());
        assert!(stores.data.db().cf_handle(CF_RAFT_LOG).is_none());
        assert_ne!(stores.control.db().path(), stores.data.db().path());
    }

    #[test]
    fn a_data_dir_from_before_the_split_opens_shared() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(&dir.path().join(CONTROL_DIR)).unwrap());
        let stores = Stores::open(dir.path(), StorageLayout::Split).unwrap();
        assert_eq!(stores.layout, StorageLayout::Shared);
        assert!(stores.data.db().cf_handle(CF_BLOCKS).is_some());
        assert!(!dir.path().join(DATA_DIR).exists(), "no empty blocks database beside the old one");
    }

    #[test]
    fn shared_on_a_split_data_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Stores::open(dir.path(), StorageLayout::Split).unwrap());
        let err = Stores::open(dir.path(), StorageLayout::Shared).err().expect("refused");
        assert!(err.to_string().contains("layout"), "{err}");
    }
}
