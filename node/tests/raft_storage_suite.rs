//! openraft's storage test suite ([`openraft::testing::Suite`]) run against Haven's Raft log store
//! and state machine, each case on a fresh RocksDB in its own temporary directory (the layout
//! `node` uses: the database in `db/`, snapshot files beside it).
//!
//! Every case of the suite is its own test, so a failure names the case; `whole_suite` runs
//! `Suite::test_all` as well, so a case a newer openraft adds is not silently skipped.

// The suite's cases return openraft's (large) StorageError; so do these tests.
#![allow(clippy::result_large_err)]

use haven_node::raft::log_store::LogStore;
use haven_node::raft::state_machine::StateMachineStore;
use haven_node::raft::{StorageError, TypeConfig};
use haven_node::storage::Store;
use openraft::testing::{StoreBuilder, Suite};
use openraft::{AnyError, StorageIOError};
use tempfile::TempDir;

/// Builds a log store and a state machine over one fresh database (as `node::run` does).
struct HavenStoreBuilder;

fn setup_error(what: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::IO { source: StorageIOError::write(AnyError::error(format!("{what}: {e}"))) }
}

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for HavenStoreBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().map_err(|e| setup_error("temporary directory", e))?;
        let store = Store::open(&dir.path().join("db")).map_err(|e| setup_error("opening the store", e))?;
        let log = LogStore::new(store.clone()).map_err(|e| setup_error("starting the WAL syncer", e))?;
        Ok((dir, log, StateMachineStore::new(store)))
    }
}

type HavenSuite = Suite<TypeConfig, LogStore, StateMachineStore, HavenStoreBuilder, TempDir>;

/// One test per suite case taking a fresh log store and state machine.
macro_rules! suite_cases {
    ($($case:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() -> Result<(), StorageError> {
            let (_dir, log, sm) = HavenStoreBuilder.build().await?;
            HavenSuite::$case(log, sm).await
        }
    )*};
}

// The cases of `Suite::test_store` in openraft 0.9.25, in its order.
suite_cases!(
    last_membership_in_log_initial,
    last_membership_in_log,
    last_membership_in_log_multi_step,
    get_membership_initial,
    get_membership_from_log_and_empty_sm,
    get_membership_from_empty_log_and_sm,
    get_membership_from_log_le_sm_last_applied,
    get_membership_from_log_gt_sm_last_applied_1,
    get_membership_from_log_gt_sm_last_applied_2,
    get_initial_state_without_init,
    get_initial_state_membership_from_log_and_sm,
    get_initial_state_with_state,
    get_initial_state_last_log_gt_sm,
    get_initial_state_last_log_lt_sm,
    get_initial_state_log_ids,
    get_initial_state_re_apply_committed,
    save_vote,
    get_log_entries,
    limited_get_log_entries,
    try_get_log_entry,
    initial_logs,
    get_log_state,
    get_log_id,
    last_id_in_log,
    last_applied_state,
    purge_logs_upto_0,
    purge_logs_upto_5,
    purge_logs_upto_20,
    delete_logs_since_11,
    delete_logs_since_0,
    append_to_log,
    snapshot_meta,
    apply_single,
    apply_multiple,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_snapshot() -> Result<(), StorageError> {
    HavenSuite::transfer_snapshot(&HavenStoreBuilder).await
}

/// `Suite::test_all` builds its own runtimes, so this test is synchronous.
#[test]
fn whole_suite() -> Result<(), StorageError> {
    HavenSuite::test_all(HavenStoreBuilder)
}
