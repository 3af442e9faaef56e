//! VMs end to end: real `haven-node` processes run simulated guests; a guest under a steady
//! memory and disk workload live-migrates over QUIC, and its memory and every disk write it was
//! acknowledged check out at the destination; a destination
//! killed mid-migration leaves the VM running at the source; bad requests get clear errors.

use std::time::{Duration, Instant};

mod common;

use common::cluster_with;
use haven_client::devcluster::LocalCluster;
use haven_client::error::ClientError;
use haven_client::proto::vm::{MigrationOptions, VmRecord, VmRunState};
use haven_client::proto::{ErrorCode, NodeId, VmId};
use haven_client::vms::VmSpec;
use haven_client::volumes::VolumeSpec;
use haven_client::HavenClient;

const HEALTHY: Duration = Duration::from_secs(30);

async fn cluster(dir: &std::path::Path) -> (LocalCluster, HavenClient) {
    let mut c = cluster_with(dir, &[]);
    let client = c.client().unwrap();
    let ids: Vec<u64> = c.nodes().iter().map(|n| n.id).collect();
    c.wait_healthy(&client, &ids, HEALTHY).await.expect("cluster healthy");
    // Every host records its VM capacity once the cluster is up.
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.vm_capacity().await.map(|c| c.len()).unwrap_or(0) < ids.len() {
        assert!(Instant::now() < deadline, "hosts never recorded their capacity");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (c, client)
}

async fn running(client: &HavenClient, vm: VmId) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = client.vm_status(vm).await {
            if s.state == "running" && s.writes > 0 {
                return s.last_seq;
            }
        }
        assert!(Instant::now() < deadline, "{vm} never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_migration(client: &HavenClient, vm: VmId) -> haven_client::proto::vm::MigrationReport {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last_sent = 0;
    let mut last = None;
    loop {
        if let Ok(r) = client.migration_progress(vm).await {
            last = Some(r.clone());
            assert!(r.bytes_sent >= last_sent, "progress went backwards: {r:?}");
            last_sent = r.bytes_sent;
            if matches!(r.phase.as_str(), "done" | "failed" | "cancelled") {
                return r;
            }
        }
        assert!(Instant::now() < deadline, "migration of {vm} never ended: {last:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn other_host(c: &LocalCluster, v: &VmRecord) -> NodeId {
    c.nodes().iter().map(|n| NodeId(n.id)).find(|n| *n != v.host).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_under_load_live_migrates_and_keeps_its_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, client) = cluster(tmp.path()).await;
    let mut spec = VmSpec::new("g1", 256);
    spec.dirty_pages_per_sec = 2000;
    spec.disk_writes_per_sec = 200;
    let v = client.create_vm(&spec).await.expect("create vm");
    // Its disk: two replicas, neither necessarily on the VM's hosts (writes go to the primary).
    let disk = client.create_volume(&VolumeSpec::new("g1-disk", 8 << 20, 2)).await.expect("create volume");
    client.attach_volume(v.id, disk.id).await.expect("attach");
    client.set_vm_state(v.id, VmRunState::Running).await.unwrap();
    let before = running(&client, v.id).await;
    let disk_before = wait_disk_writes(&client, v.id, 50).await;
    let to = other_host(&c, &v);
    let opts = MigrationOptions::default();
    client.migrate_vm(v.id, to, opts).await.expect("start migration");
    let report = wait_migration(&client, v.id).await;
    assert_eq!(report.phase, "done", "{report:?}");
    eprintln!("migration report: {report:?}");
    let moved = client.vm("g1").await.unwrap();
    assert_eq!(moved.host, to);
    assert_eq!(moved.migrating_to, None);
    // The guest continues at the destination from where it was: nothing lost or rolled back.
    let after = running(&client, v.id).await;
    assert!(after > before, "workload did not continue: {after} <= {before}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let check = client.vm_check(v.id).await.expect("memory check at the destination");
    assert!(check.last_seq >= after && check.max_seq <= check.last_seq, "{check:?}");
    assert_eq!(client.vm_status(v.id).await.unwrap().host, to);
    // The disk journal came along: the guest keeps writing its disk from where it was, and every
    // write acknowledged before, during and after the move is on the disk.
    let disk_after = wait_disk_writes(&client, v.id, disk_before + 50).await;
    let check = client.vm_check(v.id).await.expect("disk check at the destination");
    assert_eq!(check.disks.len(), 1, "{check:?}");
    assert!(check.disks[0].acked >= disk_after && check.disks[0].blocks_written > 0, "{check:?}");
}

/// Wait until `vm`'s guest has at least `n` acknowledged disk writes (its check passing each time).
async fn wait_disk_writes(client: &HavenClient, vm: VmId, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let check = client.vm_check(vm).await;
        if let Ok(c) = &check {
            if let Some(d) = c.disks.first().filter(|d| d.acked >= n) {
                return d.acked;
            }
        }
        assert!(Instant::now() < deadline, "{vm} never reached {n} acknowledged disk writes: {check:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_killed_mid_migration_leaves_the_vm_running_at_the_source() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, client) = cluster(tmp.path()).await;
    // Enough written memory that the first pre-copy round takes a while (zero pages cost nothing).
    let mut spec = VmSpec::new("g2", 1024);
    spec.dirty_pages_per_sec = 100_000;
    let v = client.create_vm(&spec).await.expect("create vm");
    client.set_vm_state(v.id, VmRunState::Running).await.unwrap();
    running(&client, v.id).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The destination must not be the Raft leader's only peer we need: pick a non-leader.
    let leader = client.leader_status().await.unwrap().id;
    let to =
        c.nodes().iter().map(|n| NodeId(n.id)).find(|n| *n != v.host && *n != leader).unwrap_or(other_host(&c, &v));
    let opts = MigrationOptions::default();
    client.migrate_vm(v.id, to, opts).await.expect("start migration");
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.kill(to.0).unwrap();
    let report = wait_migration(&client, v.id).await;
    assert_ne!(report.phase, "done", "{report:?}");
    let r = client.vm("g2").await.unwrap();
    assert_eq!((r.host, r.migrating_to), (v.host, None));
    let s = client.vm_status(v.id).await.unwrap();
    assert_eq!(s.state, "running");
    client.vm_check(v.id).await.expect("memory intact at the source");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_vm_requests_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let (_c, client) = cluster(tmp.path()).await;
    let code = |e: ClientError| e.code();
    let e = client.vm_status(VmId(999)).await.unwrap_err();
    assert_eq!(code(e), Some(ErrorCode::NotFound));
    let v = client.create_vm(&VmSpec::new("g3", 64)).await.unwrap();
    let e = client.migrate_vm(v.id, v.host, MigrationOptions::default()).await;
    assert!(e.is_err(), "migration to the same host must be refused");
    let e = client.create_vm(&VmSpec::new("huge", 60 * 1024)).await.unwrap_err();
    assert!(e.to_string().contains("free"), "{e}");
    let e = client.create_vm(&VmSpec::new("g3", 64)).await.unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    let mut on_missing = VmSpec::new("g4", 64);
    on_missing.host = Some(NodeId(42));
    assert_eq!(code(client.create_vm(&on_missing).await.unwrap_err()), Some(ErrorCode::NotFound));
    let mut too_busy = VmSpec::new("g5", 64);
    too_busy.disk_writes_per_sec = haven_client::proto::vm::MAX_DISK_WRITES_PER_SEC + 1;
    let e = client.create_vm(&too_busy).await.unwrap_err();
    assert!(e.to_string().contains("disk writes per second"), "{e}");
    // A disk the catalog does not know, and a VM that is not there, are named in the error.
    let e = client.attach_volume(v.id, haven_client::proto::VolumeId(77)).await.unwrap_err();
    assert_eq!(code(e), Some(ErrorCode::NotFound));
    let e = client.vm_check(VmId(999)).await.unwrap_err();
    assert_eq!(code(e), Some(ErrorCode::NotFound));
}

/// A guest that dirties memory faster than the (capped) link copies it: with auto-converge the
/// source throttles it and the migration still finishes with the memory intact; without, the
/// migration is refused up front (or ends cancelled/failed) with a reason that says what to do,
/// and the VM keeps running at the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_outpacing_the_link_converges_only_with_auto_converge() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, client) = cluster(tmp.path()).await;
    let mut spec = VmSpec::new("hot", 16);
    spec.dirty_pages_per_sec = 4000; // ~10 MiB/s of distinct pages dirtied over 4096 pages
    let v = client.create_vm(&spec).await.expect("create vm");
    client.set_vm_state(v.id, VmRunState::Running).await.unwrap();
    let before = running(&client, v.id).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // let the dirty rate be measured
    let to = other_host(&c, &v);
    let slow = MigrationOptions { max_bandwidth_bytes_per_sec: 6 << 20, ..MigrationOptions::default() };

    // Without auto-converge: refused, or ended without moving the VM, with a clear reason.
    let strict = MigrationOptions { auto_converge: false, ..slow.clone() };
    match client.migrate_vm(v.id, to, strict).await {
        Err(e) => assert!(e.to_string().contains("auto-converge"), "unclear refusal: {e}"),
        Ok(_) => {
            let r = wait_migration(&client, v.id).await;
            assert!(matches!(r.phase.as_str(), "failed" | "cancelled"), "{r:?}");
            assert!(r.reason.as_deref().is_some_and(|m| m.contains("converge")), "{r:?}");
        }
    }
    let r = client.vm("hot").await.unwrap();
    assert_eq!((r.host, r.migrating_to), (v.host, None));
    assert_eq!(client.vm_status(v.id).await.unwrap().state, "running");

    // With auto-converge: throttled, and done.
    client.migrate_vm(v.id, to, slow).await.expect("start migration");
    let report = wait_migration(&client, v.id).await;
    eprintln!("auto-converged migration: {report:?}");
    assert_eq!(report.phase, "done", "{report:?}");
    assert!(report.throttle_percent > 0, "the guest was never throttled: {report:?}");
    assert_eq!(client.vm("hot").await.unwrap().host, to);
    let after = running(&client, v.id).await;
    assert!(after > before, "workload did not continue: {after} <= {before}");
    let check = client.vm_check(v.id).await.expect("memory check at the destination");
    assert!(check.max_seq <= check.last_seq, "{check:?}");
}
