//! openraft's storage test suite ([`openraft::testing::Suite`]) run against Haven's Raft log store
//! and state machine, each case on a fresh RocksDB in its own temporary directory (the layout
//! `node` uses: the database in `db/`, snapshot files beside it).
//!
//! Every case of the suite is its own test, so a failure names the case; `whole_suite` runs
//! `Suite::test_all` as well, so a case a newer openraft adds is not silently skipped. Beyond the
//! suite, `transferred_snapshot_is_kept_whole` checks what the suite does not: the snapshot a
//! follower keeps after an install is complete, so it can serve it in turn.

// The suite's cases return openraft's (large) StorageError; so do these tests.
#![allow(clippy::result_large_err)]

use haven_node::raft::log_store::LogStore;
use haven_node::raft::snapshot_file;
use haven_node::raft::state_machine::StateMachineStore;
use haven_node::raft::{StorageError, TypeConfig};
use haven_node::storage::Store;
use openraft::storage::RaftStateMachine;
use openraft::testing::{StoreBuilder, Suite};
use openraft::{AnyError, RaftSnapshotBuilder, StorageIOError};
use tempfile::TempDir;
use tokio::io::AsyncReadExt;

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

/// The suite's snapshot transfer hands `install_snapshot` the leader's snapshot file in place of
/// the one `begin_receiving_snapshot` returned (any `SnapshotData` is a valid argument); the
/// follower must then keep a complete copy, not the empty file it created for the transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transferred_snapshot_is_kept_whole() -> Result<(), StorageError> {
    let (_leader_dir, _leader_log, mut leader) = HavenStoreBuilder.build().await?;
    let (_follower_dir, _follower_log, mut follower) = HavenStoreBuilder.build().await?;
    let put = |index: u64| openraft::Entry::<TypeConfig> {
        log_id: openraft::testing::log_id(1, 1, index),
        payload: openraft::EntryPayload::Normal(haven_proto::CatalogCommand::KvPut {
            key: format!("k{index}"),
            value: vec![index as u8; 100],
        }),
    };
    leader.apply((1..=5).map(put)).await?;
    let built = leader.get_snapshot_builder().await.build_snapshot().await?;

    let mut receiving = follower.begin_receiving_snapshot().await?;
    *receiving = *built.snapshot;
    follower.install_snapshot(&built.meta, receiving).await?;

    let current = follower.get_current_snapshot().await?.expect("a current snapshot after the install");
    assert_eq!(current.meta, built.meta);
    let mut bytes = Vec::new();
    let mut file = current.snapshot;
    file.read_to_end(&mut bytes).await.expect("reading the follower's snapshot");
    let records = snapshot_file::verify(&bytes[..]).expect("the follower's snapshot file is complete");
    assert_eq!(records, 5, "every catalog record is in the follower's snapshot");
    Ok(())
}
