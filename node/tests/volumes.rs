//! Volumes end to end: real `haven-node` processes, stock `qemu-io` over NBD, kill -9 of the
//! primary, resync after the outage (block counts asserted from the primary's metrics), labeled
//! snapshot corruption caught and repaired, and bad input refused with stored data intact.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::{cluster_with, metric};
use haven_client::devcluster::LocalCluster;
use haven_client::error::ClientError;
use haven_client::proto::volume::{IntegrityVerdict, VolumeRecord};
use haven_client::proto::{ErrorCode, NodeId, VolumeId};
use haven_client::volumes::VolumeSpec;
use haven_client::HavenClient;

const HEALTHY: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

/// Volume tests inject corruption, a testing-only request.
fn cluster(dir: &std::path::Path) -> LocalCluster {
    cluster_with(dir, &[("HAVEN_ALLOW_FAULT_INJECTION", "1")])
}

async fn healthy(c: &mut LocalCluster) -> HavenClient {
    let client = c.client().unwrap();
    let ids: Vec<u64> = c.nodes().iter().map(|n| n.id).collect();
    c.wait_healthy(&client, &ids, HEALTHY).await.expect("cluster healthy");
    // Hosts are recorded by the leader's registry loop shortly after the election.
    for _ in 0..100 {
        if client.volumes().await.is_ok() && host_count(&client).await == ids.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client
}

async fn host_count(client: &HavenClient) -> usize {
    match client.read(haven_client::proto::CatalogQuery::Hosts, false).await {
        Ok(haven_client::proto::QueryResult::Hosts(h)) => h.len(),
        _ => 0,
    }
}

fn nbd_url(c: &LocalCluster, node: NodeId, export: &str) -> String {
    let addr = c.node(node.0).unwrap().nbd.expect("nbd address");
    format!("nbd://{addr}/{export}")
}

/// Run qemu-io with commands; returns (success, stdout+stderr).
fn qemu_io(url: &str, cmds: &[&str]) -> (bool, String) {
    qemu_io_opts(url, &[], cmds)
}

fn qemu_io_opts(url: &str, opts: &[&str], cmds: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]).args(opts);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    cmd.arg(url);
    let out = cmd.output().expect("qemu-io must be installed (Debian: qemu-utils)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let ok = out.status.success() && !text.contains("failed") && !text.contains("error");
    (ok, text)
}

async fn wait_volume(client: &HavenClient, name: &str, what: &str, ok: impl Fn(&VolumeRecord) -> bool) -> VolumeRecord {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(v) = client.volume(name).await {
            if ok(&v) {
                return v;
            }
            if Instant::now() > deadline {
                panic!("{what}: volume is {v:?}");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A counter from a node's Prometheus endpoint (0 when absent).
fn block(fill: u8) -> Vec<u8> {
    vec![fill; 4096]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_pattern_survives_primary_kill_and_resync_sends_only_changed_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cluster(tmp.path());
    let client = healthy(&mut c).await;
    let v = client.create_volume(&VolumeSpec::new("disk1", 16 * MIB, 2)).await.expect("create volume");
    let (primary, replica) = (v.primary, *v.replicas.iter().find(|h| **h != v.primary).unwrap());
    let third = c.nodes().iter().map(|n| NodeId(n.id)).find(|n| !v.replicas.contains(n)).unwrap();
    // Served from a host that holds no replica: writes go through the primary.
    wait_volume(&client, "disk1", "device actors up", |_| true).await;
    let (ok, out) = qemu_io(&nbd_url(&c, third, "disk1"), &["write -P 0xab 0 1M", "flush"]);
    assert!(ok, "qemu-io write failed: {out}");
    let s1 = client.snapshot(v.id, "s1", None).await.expect("snapshot");
    assert_eq!(s1.hosts.len(), 2, "snapshot on both replicas: {s1:?}");

    // kill -9 the primary; the leader promotes the in-sync replica.
    c.kill(primary.0).unwrap();
    let after = wait_volume(&client, "disk1", "failover", |r| r.primary == replica).await;
    assert_eq!(after.in_sync, vec![replica]);
    let (ok, out) = qemu_io(&nbd_url(&c, replica, "disk1"), &["read -P 0xab 0 1M"]);
    assert!(ok, "pattern lost after failover: {out}");

    // Ten blocks change while the old primary is away.
    for i in 0..10u64 {
        client.write_volume(v.id, (100 + i * 3) * 4096, &block(0x40 + i as u8)).await.expect("write after failover");
    }
    let before = metric(&c, replica, "haven_resync_blocks_total");
    c.start(primary.0).unwrap();
    wait_volume(&client, "disk1", "old primary back in sync", |r| r.in_sync.contains(&primary)).await;
    let sent = metric(&c, replica, "haven_resync_blocks_total") - before;
    assert_eq!(sent, 10.0, "resync from the common snapshot sends exactly the changed blocks");

    // Kill the new primary too: the resynced host serves everything.
    c.kill(replica.0).unwrap();
    wait_volume(&client, "disk1", "second failover", |r| r.primary == primary).await;
    let (ok, out) = qemu_io(&nbd_url(&c, primary, "disk1"), &["read -P 0xab 0 400k", "read -P 0x49 520192 4k"]);
    assert!(ok, "data after second failover: {out}");
    let events = client.volume_events(Some(v.id), 50).await.unwrap();
    assert!(events.iter().any(|e| e.kind == "failover"), "{events:?}");
    assert!(events.iter().any(|e| e.kind == "resync_done"), "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_without_common_snapshot_sends_only_differing_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cluster(tmp.path());
    let client = healthy(&mut c).await;
    let v = client.create_volume(&VolumeSpec::new("disk2", 8 * MIB, 2)).await.expect("create volume");
    let replica = *v.replicas.iter().find(|h| **h != v.primary).unwrap();
    let data: Vec<u8> = (0..64 * 4096).map(|i| (i / 4096) as u8).collect();
    client.write_volume(v.id, 0, &data).await.expect("initial write");

    c.kill(replica.0).unwrap();
    // The first write after the kill waits out the ack deadline, then drops the replica.
    for b in [5u64, 6, 40, 70, 71] {
        client.write_volume(v.id, b * 4096, &block(0xEE)).await.expect("write while replica is down");
    }
    let r = client.volume("disk2").await.unwrap();
    assert_eq!(r.in_sync, vec![v.primary], "dead replica left the in-sync set");
    let before = metric(&c, v.primary, "haven_resync_blocks_total");
    c.start(replica.0).unwrap();
    wait_volume(&client, "disk2", "replica back in sync", |r| r.in_sync.contains(&replica)).await;
    let sent = metric(&c, v.primary, "haven_resync_blocks_total") - before;
    assert_eq!(sent, 5.0, "Merkle resync sends only the blocks that differ");
    // The resynced replica now holds the same data: take a snapshot and compare digests.
    let s = client.snapshot(v.id, "after", Some("check")).await.unwrap();
    assert!(matches!(s.verdict, IntegrityVerdict::Match { .. }), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labeled_snapshot_catches_corruption_and_repairs_it_and_bad_input_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cluster(tmp.path());
    let client = healthy(&mut c).await;
    let v = client.create_volume(&VolumeSpec::new("disk3", 4 * MIB, 2)).await.expect("create volume");
    let replica = *v.replicas.iter().find(|h| **h != v.primary).unwrap();
    for b in 0..8u64 {
        client.write_volume(v.id, b * 4096, &block(b as u8 + 1)).await.unwrap();
    }
    let s = client.snapshot(v.id, "daily-1", Some("daily")).await.unwrap();
    assert!(matches!(s.verdict, IntegrityVerdict::Match { .. }), "{s:?}");

    client.inject_corruption(v.id, replica, 3, block(0x66)).await.unwrap();
    match client.verify_snapshot(v.id, s.id).await.unwrap() {
        IntegrityVerdict::Mismatch { blocks, total_differing, .. } => {
            assert_eq!(blocks, vec![3]);
            assert_eq!(total_differing, 1);
        }
        other => panic!("corruption not caught: {other:?}"),
    }
    let events = client.volume_events(Some(v.id), 50).await.unwrap();
    assert!(events.iter().any(|e| e.kind == "snapshot_mismatch"), "{events:?}");
    match client.repair_snapshot(v.id, s.id, v.primary).await.unwrap() {
        IntegrityVerdict::Repaired { source, blocks } => {
            assert_eq!(source, v.primary);
            assert_eq!(blocks, vec![3]);
        }
        other => panic!("not repaired: {other:?}"),
    }
    assert!(matches!(client.verify_snapshot(v.id, s.id).await.unwrap(), IntegrityVerdict::Match { .. }));

    // Bad input: typed errors, nothing stored changes.
    let code = |e: ClientError| e.code();
    let e = client.read_volume(VolumeId(999), 0, 4096, None).await.unwrap_err();
    assert_eq!(code(e), Some(ErrorCode::NotFound));
    let e = client.write_volume(v.id, 4 * MIB, &block(1)).await.unwrap_err();
    assert_eq!(code(e), Some(ErrorCode::InvalidRequest));
    let e = client.write_volume(v.id, 100, &block(1)).await.unwrap_err();
    assert_eq!(code(e), Some(ErrorCode::InvalidRequest));
    let e = client.write_volume(v.id, 0, &[1u8; 100]).await.unwrap_err();
    assert_eq!(code(e), Some(ErrorCode::InvalidRequest));
    let e = client.create_volume(&VolumeSpec::new("odd", 1000, 2)).await.unwrap_err();
    assert!(e.to_string().contains("multiple of the block size"), "{e}");
    let e = client.create_volume(&VolumeSpec::new("disk3", MIB, 2)).await.unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");

    // A malformed NBD request (bad magic after a valid handshake) closes that connection only.
    let nbd = c.node(v.primary.0).unwrap().nbd.unwrap();
    let mut s = TcpStream::connect(nbd).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    s.write_all(&[0xde; 64]).unwrap();
    let mut buf = [0u8; 64];
    let closed = matches!(s.read(&mut buf), Ok(0) | Err(_)) || matches!(s.read(&mut buf), Ok(0) | Err(_));
    assert!(closed, "server kept a connection that sent garbage");
    let (ok, out) = qemu_io(&nbd_url(&c, v.primary, "disk3"), &["read -P 0x04 12k 4k", "read -P 0x01 0 4k"]);
    assert!(ok, "stored data changed by bad input: {out}");
    let (ok, out) = qemu_io(&nbd_url(&c, v.primary, "nosuch"), &["read 0 4k"]);
    assert!(!ok, "unknown export must fail: {out}");
    // The snapshot is exported read-only.
    let (ok, _) = qemu_io(&nbd_url(&c, v.primary, "disk3@daily-1"), &["write -P 0x01 0 4k"]);
    assert!(!ok, "a snapshot export must refuse writes");
    let (ok, out) = qemu_io_opts(&nbd_url(&c, v.primary, "disk3@daily-1"), &["-r"], &["read -P 0x04 12k 4k"]);
    assert!(ok, "snapshot export read: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_resync_resumes_and_resends_at_most_one_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    // 2 MiB/s: the 4 MiB resync below takes about two seconds, long enough to interrupt.
    let mut c = cluster_with(tmp.path(), &[("HAVEN_RESYNC_MAX_BYTES_PER_SEC", "2097152")]);
    let client = healthy(&mut c).await;
    let v = client.create_volume(&VolumeSpec::new("disk4", 16 * MIB, 2)).await.expect("create volume");
    let replica = *v.replicas.iter().find(|h| **h != v.primary).unwrap();
    client.write_volume(v.id, 0, &block(1)).await.unwrap();
    client.snapshot(v.id, "base", None).await.unwrap();
    c.kill(replica.0).unwrap();
    let changed = 1024u64;
    for i in 0..4u64 {
        let data: Vec<u8> = (0..MIB).map(|b| (b / 4096 + i) as u8).collect();
        client.write_volume(v.id, MIB + i * MIB, &data).await.expect("write while replica is down");
    }
    let before = metric(&c, v.primary, "haven_resync_blocks_total");
    c.start(replica.0).unwrap();
    // Interrupt once at least one chunk has landed.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = client.replication_status(v.id).await.unwrap();
        let progress = status.replicas.iter().find(|r| r.host == replica).and_then(|r| r.resync.clone());
        if let Some(p) = progress {
            assert_eq!(p.blocks_total, changed, "only the changed blocks are planned: {p:?}");
            if p.blocks_sent >= 256 && p.blocks_sent < changed {
                break;
            }
        }
        assert!(Instant::now() < deadline, "resync never showed progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.kill(replica.0).unwrap();
    c.start(replica.0).unwrap();
    wait_volume(&client, "disk4", "replica back in sync", |r| r.in_sync.contains(&replica)).await;
    let sent = metric(&c, v.primary, "haven_resync_blocks_total") - before;
    assert!(sent >= changed as f64, "everything changed was sent ({sent})");
    assert!(sent <= (changed + 256) as f64, "an interruption re-sends at most one chunk: sent {sent} for {changed}");
    let s = client.snapshot(v.id, "after", Some("check")).await.unwrap();
    assert!(matches!(s.verdict, IntegrityVerdict::Match { .. }), "{s:?}");
}

async fn wait_async_caught_up(client: &HavenClient, vol: VolumeId, target: NodeId) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = client.replication_status(vol).await {
            if s.replicas.iter().any(|r| r.host == target && r.state == "async" && r.lag_seq == 0) {
                return;
            }
            assert!(Instant::now() < deadline, "async copy on {target} never caught up: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_relationship_ships_writes_and_reverses() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cluster(tmp.path());
    let client = healthy(&mut c).await;
    let v = client.create_volume(&VolumeSpec::new("dr1", 4 * MIB, 1)).await.expect("create volume");
    let source = v.primary;
    let target = c.nodes().iter().map(|n| NodeId(n.id)).find(|n| *n != source).unwrap();
    let data: Vec<u8> = (0..64 * 4096).map(|i| (i / 4096 + 7) as u8).collect();
    client.write_volume(v.id, 0, &data).await.unwrap();
    let rel = client.create_relationship(v.id, target, 64 * MIB).await.expect("relationship");
    // The copy is filled by a resync, then fed every write in order.
    wait_async_caught_up(&client, v.id, target).await;
    for b in 64..96u64 {
        client.write_volume(v.id, b * 4096, &block(b as u8)).await.unwrap();
    }
    wait_async_caught_up(&client, v.id, target).await;

    client.reverse_relationship(v.id, rel.id).await.expect("reverse");
    let after = client.volume("dr1").await.unwrap();
    assert_eq!((after.primary, after.replicas.clone()), (target, vec![target]));
    let rels = client.relationships().await.unwrap();
    assert_eq!(rels.iter().find(|r| r.id == rel.id).unwrap().target, source);
    // Every write made at the old primary is served by the new one.
    assert_eq!(client.read_volume(v.id, 0, 64 * 4096, None).await.unwrap(), data);
    for b in 64..96u64 {
        assert_eq!(client.read_volume(v.id, b * 4096, 4096, None).await.unwrap(), block(b as u8));
    }
    // And writes now ship back to the old primary.
    client.write_volume(v.id, 200 * 4096, &block(0x77)).await.unwrap();
    wait_async_caught_up(&client, v.id, source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_and_clone_restore_a_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cluster(tmp.path());
    let client = healthy(&mut c).await;
    let v = client.create_volume(&VolumeSpec::new("disk5", 8 * MIB, 2)).await.expect("create volume");
    for b in 0..4u64 {
        client.write_volume(v.id, b * 4096, &block(0x10 + b as u8)).await.unwrap();
    }
    let good = client.snapshot(v.id, "good", None).await.unwrap();
    for b in 0..4u64 {
        client.write_volume(v.id, b * 4096, &block(0xBD)).await.unwrap();
    }
    client.write_volume(v.id, 1000 * 4096, &block(0xBD)).await.unwrap();
    let later = client.snapshot(v.id, "later", None).await.unwrap();

    // A clone of the good snapshot is a new volume with its content.
    let clone = client.clone_snapshot(v.id, good.id, "disk5-good").await.expect("clone");
    assert_eq!(clone.cloned_from, Some((v.id, good.id)));
    for b in 0..4u64 {
        assert_eq!(client.read_volume(clone.id, b * 4096, 4096, None).await.unwrap(), block(0x10 + b as u8));
    }
    assert_eq!(client.read_volume(clone.id, 1000 * 4096, 4096, None).await.unwrap(), block(0));

    // Rolling back returns every in-sync replica to the snapshot; later snapshots go.
    client.rollback(v.id, good.id).await.expect("rollback");
    for b in 0..4u64 {
        assert_eq!(client.read_volume(v.id, b * 4096, 4096, None).await.unwrap(), block(0x10 + b as u8));
    }
    assert_eq!(client.read_volume(v.id, 1000 * 4096, 4096, None).await.unwrap(), block(0));
    let snaps = client.snapshots(v.id).await.unwrap();
    assert!(snaps.iter().all(|s| s.id != later.id), "{snaps:?}");
    // The replicas agree after the rollback.
    let check = client.snapshot(v.id, "after-rollback", Some("check")).await.unwrap();
    assert!(matches!(check.verdict, IntegrityVerdict::Match { .. }), "{check:?}");
    // Writes carry on after the rollback.
    client.write_volume(v.id, 5 * 4096, &block(0x55)).await.unwrap();
    assert_eq!(client.read_volume(v.id, 5 * 4096, 4096, None).await.unwrap(), block(0x55));
}
