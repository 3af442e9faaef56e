//! The node's one RocksDB and its column families.
//!
//! Everything a node persists lives in one RocksDB instance so that a write batch spanning the
//! Raft log, the catalog and (later) volume blocks is atomic, and so that one fsync of the shared
//! write-ahead log makes every earlier write durable. This module owns opening the database and
//! naming the column families; what goes into each belongs to its user (`raft::log_store`,
//! `raft::state_machine`).

use std::path::Path;
use std::sync::Arc;

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

const ALL_CFS: [&str; 7] = [CF_RAFT_LOG, CF_RAFT_META, CF_CATALOG, CF_SM_META, CF_SNAPSHOT, CF_BLOCKS, CF_VOLUME_META];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt record in {cf}: {reason}")]
    Corrupt { cf: &'static str, reason: String },
}

/// A handle on the node's database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
}

impl Store {
    /// Open (creating if needed) the database at `path` with every column family.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        let cfs = ALL_CFS.iter().map(|name| {
            let mut cf_opts = Options::default();
            if *name == CF_BLOCKS {
                // Values are whole volume blocks (4 KiB): 64 KiB table blocks keep range reads to
                // a few block-cache lookups per MiB instead of one per volume block (~6x faster
                // 1 MiB reads), and a cache of our own keeps a working set hot.
                let mut table = rocksdb::BlockBasedOptions::default();
                table.set_block_size(64 << 10);
                table.set_block_cache(&rocksdb::Cache::new_lru_cache(64 << 20));
                cf_opts.set_block_based_table_factory(&table);
                // Block contents go to blob files at flush and stay there: compaction rewrites only
                // the small keys, not every 4 KiB value again at each level (LSM write
                // amplification was most of the write path's cost). Blob GC reclaims overwritten
                // blocks.
                cf_opts.set_enable_blob_files(true);
                cf_opts.set_min_blob_size(1024);
                cf_opts.set_enable_blob_gc(true);
                cf_opts.set_write_buffer_size(128 << 20);
            }
            if *name == CF_VOLUME_META {
                // Volume high-water marks are raised with a u64-max merge (see volume::blockstore).
                cf_opts.set_merge_operator_associative(
                    crate::volume::blockstore::HWM_MERGE_OPERATOR,
                    crate::volume::blockstore::hwm_merge,
                );
            }
            ColumnFamilyDescriptor::new(*name, cf_opts)
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        Ok(Self { db: Arc::new(db) })
    }

    pub fn db(&self) -> &DB {
        &self.db
    }

    /// The handle of a column family this module created.
    pub fn cf(&self, name: &'static str) -> &ColumnFamily {
        // Every name in ALL_CFS is created by `open`, so a missing handle is a bug, not bad data.
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
