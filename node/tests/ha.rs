//! HA pairs end to end (C6): real `haven-node` processes, a simulated guest protected by a
//! standby on a second host, and the primary's host killed with `kill -9` under load.
//!
//! - Redundant mode: the standby takes over from the last complete checkpoint. The guest's
//!   memory check proves memory and vCPU state are one consistent cut (no page from the future,
//!   the last write present), the disk check proves every disk write the guest was acknowledged
//!   is on its disk and none it never issued, and every application update that was
//!   acknowledged to a client is in the new primary's state.
//! - Multi-operation mode (switched to live from redundant mode): the standby's running guest
//!   takes over with every acknowledged application update.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

mod common;

use common::{cluster_with, eventually};
use haven_client::devcluster::LocalCluster;
use haven_client::proto::ha::{HaMode, HaPairRecord, PairState};
use haven_client::proto::vm::{VmRecord, VmRunState};
use haven_client::proto::volume::VolumeRecord;
use haven_client::proto::{NodeId, VmId};
use haven_client::vms::VmSpec;
use haven_client::volumes::VolumeSpec;
use haven_client::HavenClient;

const HEALTHY: Duration = Duration::from_secs(30);

async fn cluster(dir: &std::path::Path) -> (LocalCluster, HavenClient) {
    let mut c = cluster_with(dir, &[]);
    let client = c.client().unwrap();
    let ids: Vec<u64> = c.nodes().iter().map(|n| n.id).collect();
    c.wait_healthy(&client, &ids, HEALTHY).await.expect("cluster healthy");
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.vm_capacity().await.map(|c| c.len()).unwrap_or(0) < ids.len() {
        assert!(Instant::now() < deadline, "hosts never recorded their capacity");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (c, client)
}

/// Create a volume; a creation whose outcome was unknown (a leader change) is looked up.
async fn volume(client: &HavenClient, name: &str, size: u64, replicas: u8) -> VolumeRecord {
    eventually("create volume", || async {
        match client.create_volume(&VolumeSpec::new(name, size, replicas)).await {
            Ok(v) => Ok(v),
            Err(e) => client.volume(name).await.map_err(|_| e),
        }
    })
    .await
}

async fn running(client: &HavenClient, vm: VmId) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = client.vm_status(vm).await {
            if s.state == "running" && s.writes > 0 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{vm} never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A host that is neither the VM's nor the Raft leader (so killing the primary does not also
/// cost an election, unless the primary leads).
async fn standby_for(c: &LocalCluster, client: &HavenClient, v: &VmRecord) -> NodeId {
    let leader = client.leader_status().await.map(|s| s.id).ok();
    let others: Vec<NodeId> = c.nodes().iter().map(|n| NodeId(n.id)).filter(|n| *n != v.host).collect();
    others.iter().copied().find(|n| Some(*n) != leader).unwrap_or(others[0])
}

async fn wait_standby_ready(client: &HavenClient, vm: VmId, standby: NodeId) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = client.ha_status(vm, Some(standby)).await;
        if st.as_ref().is_ok_and(|s| s.role == "standby-ready") {
            return;
        }
        assert!(Instant::now() < deadline, "the standby of {vm} never became ready: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Put keys `k<from>..` until `stop` says so; the keys whose put was acknowledged, with values.
async fn put_until(client: &HavenClient, vm: VmId, from: u64, stop: impl Fn(u64) -> bool) -> BTreeMap<String, Vec<u8>> {
    let mut acked = BTreeMap::new();
    let mut i = from;
    while !stop(i) {
        let (key, value) = (format!("k{i:05}"), format!("value of {i}").into_bytes());
        if client.app_put(vm, &key, Some(value.clone())).await.is_ok() {
            acked.insert(key, value);
        }
        i += 1;
    }
    acked
}

/// Wait until the pair's primary is `to`, protected again or degraded, and the VM runs there.
async fn wait_failed_over(client: &HavenClient, vm: VmId, to: NodeId) -> HaPairRecord {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pair = client.ha_pair(vm).await;
        if let Ok(p) = &pair {
            if p.primary == to && p.state != PairState::FailingOver {
                if let Ok(s) = client.vm_status(vm).await {
                    if s.host == to && s.state == "running" {
                        return p.clone();
                    }
                }
            }
        }
        assert!(Instant::now() < deadline, "{vm} never failed over to {to}: {pair:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every acknowledged put is in the VM's application state now.
async fn assert_app_has(client: &HavenClient, vm: VmId, acked: &BTreeMap<String, Vec<u8>>) {
    let view = eventually("application state after the failover", || client.app_get(vm)).await;
    let have: BTreeMap<String, Vec<u8>> = view.entries.into_iter().collect();
    for (k, v) in acked {
        assert_eq!(have.get(k), Some(v), "acknowledged update {k} is missing after the failover");
    }
    eprintln!("{} acknowledged updates present of {} held", acked.len(), have.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redundant_pair_survives_kill_9_of_the_primary_with_nothing_acknowledged_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, client) = cluster(tmp.path()).await;
    let mut spec = VmSpec::new("ha1", 64);
    spec.dirty_pages_per_sec = 2000;
    spec.disk_writes_per_sec = 100;
    let v = client.create_vm(&spec).await.expect("create vm");
    let disk = volume(&client, "ha1-disk", 4 << 20, 3).await;
    client.attach_volume(v.id, disk.id).await.expect("attach");
    client.set_vm_state(v.id, VmRunState::Running).await.unwrap();
    running(&client, v.id).await;
    let standby = standby_for(&c, &client, &v).await;
    let pair =
        client.create_ha_pair(v.id, Some(standby), HaMode::Redundant { epoch_ms: 30 }).await.expect("create pair");
    assert_eq!((pair.primary, pair.standby), (v.host, Some(standby)));
    wait_standby_ready(&client, v.id, standby).await;
    let acked = put_until(&client, v.id, 0, |i| i >= 40).await;
    assert_eq!(acked.len(), 40, "puts are acknowledged while the pair is healthy");
    let st = client.ha_status(v.id, None).await.expect("primary status");
    eprintln!("primary before the kill: {st:?}");
    assert!(st.epochs_acked > 0 && st.outputs_released > 0, "{st:?}");

    c.kill(v.host.0).expect("kill -9 the primary");
    let killed_at = Instant::now();
    let after = wait_failed_over(&client, v.id, standby).await;
    eprintln!("failed over in {:?} (catalog: {:?})", killed_at.elapsed(), after.last_failover);
    let status = eventually("status after the takeover", || client.vm_status(v.id)).await;
    assert_eq!(status.origin, "taken-over", "{status:?}");
    let st = eventually("new primary status", || client.ha_status(v.id, None)).await;
    assert!(st.took_over_from.is_some(), "{st:?}");

    // Memory and vCPU state are one cut; every acknowledged disk write and update is there.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let check = eventually("memory and disk check after the takeover", || client.vm_check(v.id)).await;
    assert!(check.max_seq <= check.last_seq, "{check:?}");
    assert_eq!(check.disks.len(), 1, "{check:?}");
    assert_app_has(&client, v.id, &acked).await;
    // The VM goes on: new updates are acknowledged (degraded or protected again).
    let more = put_until(&client, v.id, 1000, |i| i >= 1005).await;
    assert_eq!(more.len(), 5);

    // The old primary restarts holding nothing: it boots no copy of its own, the VM stays where
    // it is, and the pair is protected by a ready standby again.
    c.start(v.host.0).expect("restart the old primary");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = roles(&client, &c, v.id).await;
        let ready = r.iter().any(|(_, role, _)| role == "standby-ready");
        let primaries = r.iter().filter(|(_, role, _)| role == "primary").count();
        assert!(primaries <= 1, "two primaries: {r:?}");
        if ready && primaries == 1 {
            eprintln!("roles after the old primary's restart: {r:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the pair was never protected again: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = eventually("status after the restart", || client.vm_status(v.id)).await;
    assert_eq!((status.host, status.origin.as_str()), (standby, "taken-over"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_operation_pair_switched_live_survives_kill_9_with_every_acknowledged_update() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, client) = cluster(tmp.path()).await;
    let mut spec = VmSpec::new("ha2", 32);
    spec.dirty_pages_per_sec = 500;
    let v = client.create_vm(&spec).await.expect("create vm");
    client.set_vm_state(v.id, VmRunState::Running).await.unwrap();
    running(&client, v.id).await;
    let standby = standby_for(&c, &client, &v).await;
    client.create_ha_pair(v.id, Some(standby), HaMode::Redundant { epoch_ms: 50 }).await.expect("create pair");
    wait_standby_ready(&client, v.id, standby).await;
    let mut acked = put_until(&client, v.id, 0, |i| i >= 10).await;
    // Live switch: the standby's guest starts and takes the application state as updates.
    let switched = client.set_ha_mode(v.id, HaMode::MultiOperation).await.expect("switch mode");
    assert_eq!(switched.mode, HaMode::MultiOperation);
    wait_standby_ready(&client, v.id, standby).await;
    acked.extend(put_until(&client, v.id, 10, |i| i >= 60).await);
    assert_eq!(acked.len(), 60, "puts are acknowledged across the mode switch");

    c.kill(v.host.0).expect("kill -9 the primary");
    let killed_at = Instant::now();
    let after = wait_failed_over(&client, v.id, standby).await;
    eprintln!("failed over in {:?} (catalog: {:?})", killed_at.elapsed(), after.last_failover);
    assert_app_has(&client, v.id, &acked).await;
    let check = eventually("memory check after the takeover", || client.vm_check(v.id)).await;
    assert!(check.max_seq <= check.last_seq, "{check:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pair_requests_get_clear_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let (_c, client) = cluster(tmp.path()).await;
    let mut spec = VmSpec::new("ha3", 32);
    spec.dirty_pages_per_sec = 100;
    spec.disk_writes_per_sec = 10;
    let v = client.create_vm(&spec).await.expect("create vm");
    let disk = volume(&client, "ha3-disk", 1 << 20, 1).await;
    client.attach_volume(v.id, disk.id).await.expect("attach");
    // The standby on the VM's own host, multi-operation for a VM that writes its disks, an
    // unknown VM, an unprotected VM's application state: each refused, saying why.
    let own = client.create_ha_pair(v.id, Some(v.host), HaMode::Redundant { epoch_ms: 50 }).await;
    assert!(own.is_err(), "{own:?}");
    let multi = client.create_ha_pair(v.id, None, HaMode::MultiOperation).await.unwrap_err();
    assert!(multi.to_string().contains("writes its disks"), "{multi}");
    let unknown = client.create_ha_pair(VmId(999), None, HaMode::MultiOperation).await;
    assert!(unknown.is_err(), "{unknown:?}");
    let epoch = client.create_ha_pair(v.id, None, HaMode::Redundant { epoch_ms: 1 }).await.unwrap_err();
    assert!(epoch.to_string().contains("epoch"), "{epoch}");
    let app = client.app_put(v.id, "k", Some(b"v".to_vec())).await.unwrap_err();
    assert!(app.to_string().contains("not protected"), "{app}");
    // A protected VM cannot be migrated away from its pair.
    client.set_vm_state(v.id, VmRunState::Running).await.unwrap();
    running(&client, v.id).await;
    client.create_ha_pair(v.id, None, HaMode::Redundant { epoch_ms: 50 }).await.expect("degraded pair");
    let to = NodeId(if v.host.0 == 1 { 2 } else { 1 });
    let migrate = client.migrate_vm(v.id, to, Default::default()).await.unwrap_err();
    assert!(migrate.to_string().contains("HA pair"), "{migrate}");
}

/// The roles every live host reports for `vm`'s pair.
async fn roles(client: &HavenClient, c: &LocalCluster, vm: VmId) -> Vec<(NodeId, String, u64)> {
    let mut out = Vec::new();
    for n in c.nodes() {
        if let Ok(s) = client.ha_status(vm, Some(NodeId(n.id))).await {
            out.push((s.host, s.role, s.generation));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_woken_after_the_failover_is_deposed_and_releases_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, client) = cluster(tmp.path()).await;
    let mut spec = VmSpec::new("ha4", 32);
    spec.dirty_pages_per_sec = 1000;
    spec.disk_writes_per_sec = 100;
    let v = client.create_vm(&spec).await.expect("create vm");
    let disk = volume(&client, "ha4-disk", 4 << 20, 3).await;
    client.attach_volume(v.id, disk.id).await.expect("attach");
    client.set_vm_state(v.id, VmRunState::Running).await.unwrap();
    running(&client, v.id).await;
    let standby = standby_for(&c, &client, &v).await;
    client.create_ha_pair(v.id, Some(standby), HaMode::Redundant { epoch_ms: 30 }).await.expect("create pair");
    wait_standby_ready(&client, v.id, standby).await;
    let acked = put_until(&client, v.id, 0, |i| i >= 20).await;

    // SIGSTOP: the primary stops answering (its guest and outputs frozen mid-flight) for less
    // than its host lease (4 s), so it wakes believing it still runs the VM.
    c.signal(v.host.0, libc::SIGSTOP).expect("SIGSTOP the primary");
    wait_failed_over(&client, v.id, standby).await;
    let more = put_until(&client, v.id, 100, |i| i >= 110).await;
    c.signal(v.host.0, libc::SIGCONT).expect("SIGCONT the old primary");

    // Once awake, the old primary learns it was deposed (the new primary refuses its
    // checkpoints as sealed, and the catalog moved the VM): one primary, at the new generation.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = roles(&client, &c, v.id).await;
        let primaries: Vec<_> = r.iter().filter(|(_, role, _)| role == "primary").collect();
        let old = r.iter().find(|(h, _, _)| *h == v.host);
        if primaries.len() == 1 && primaries[0].0 == standby && old.is_some_and(|(_, role, _)| role != "primary") {
            eprintln!("roles after the wake-up: {r:?}");
            break;
        }
        assert!(primaries.len() <= 1 || primaries[0].2 != primaries[1].2, "two primaries at one generation: {r:?}");
        assert!(Instant::now() < deadline, "the old primary was never deposed: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = eventually("status on the new primary", || client.vm_status(v.id)).await;
    assert_eq!((status.host, status.state.as_str()), (standby, "running"), "{status:?}");
    // Every acknowledged update and disk write is there; no late write of the old primary
    // landed over the new one's (the volume fences its generation).
    let check = eventually("memory and disk check after the wake-up", || client.vm_check(v.id)).await;
    assert!(check.max_seq <= check.last_seq, "{check:?}");
    let mut all = acked;
    all.extend(more);
    assert_app_has(&client, v.id, &all).await;
}
