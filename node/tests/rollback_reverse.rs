//! Issue 11, race 3, end to end with real `haven-node` processes: a rollback reuses write-order
//! points but tells only in-sync replicas, so an async (DR) copy that already holds the
//! rolled-back writes acknowledges the reused points as applied and goes silently stale; a
//! `replication reverse` then promotes it. The promise tested: after the reverse, the new
//! primary holds the snapshot's content plus every write acknowledged after the rollback.

use std::time::{Duration, Instant};

mod common;

use common::{cluster_with, eventually, healthy_with_hosts};
use haven_client::proto::{NodeId, VolumeId};
use haven_client::volumes::VolumeSpec;
use haven_client::HavenClient;

const MIB: u64 = 1 << 20;

async fn wait_caught_up(client: &HavenClient, vol: VolumeId, target: NodeId) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = client.replication_status(vol).await {
            if s.replicas.iter().any(|r| r.host == target && r.state == "async" && r.lag_seq == 0) {
                return;
            }
            assert!(Instant::now() < deadline, "the DR copy on {target} never caught up: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What `data` holds, in words: "all 0xaa" or the first differing byte.
fn pattern(data: &[u8], want: u8) -> String {
    match data.iter().position(|b| *b != want) {
        None => format!("all {want:#04x}"),
        Some(i) => format!("byte {i} is {:#04x} (first byte {:#04x}), not {want:#04x}", data[i], data[0]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_after_rollback_serves_the_snapshot_plus_later_acknowledged_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cluster_with(tmp.path(), &[]);
    let client = healthy_with_hosts(&mut c).await;
    let mut spec = VolumeSpec::new("dr", 8 * MIB, 1);
    spec.hosts = vec![NodeId(1)];
    let v = client.create_volume(&spec).await.expect("create volume");
    assert_eq!(v.primary, NodeId(1));
    eventually("volume served", || client.read_volume(v.id, 0, 4096, None)).await;
    let rel = client.create_relationship(v.id, NodeId(2), 64 * MIB).await.expect("relationship");
    // As with the CLI (one command at a time), the copy is filled and then fed each write in
    // order before the next step: it holds 0xbb, at write point 2, when the rollback comes.
    wait_caught_up(&client, v.id, NodeId(2)).await;

    let seq_a = client.write_volume(v.id, 0, &vec![0xaa; MIB as usize]).await.expect("write 0xaa at 0");
    let s1 = client.snapshot(v.id, "s1", None).await.expect("snapshot s1");
    let seq_b = client.write_volume(v.id, 0, &vec![0xbb; MIB as usize]).await.expect("write 0xbb at 0");
    wait_caught_up(&client, v.id, NodeId(2)).await;
    client.rollback(v.id, s1.id).await.expect("rollback to s1");
    let seq_c = client.write_volume(v.id, 2 * MIB, &vec![0xcc; MIB as usize]).await.expect("write 0xcc at 2 MiB");
    println!("write points: 0xaa {seq_a}, s1 at {}, 0xbb {seq_b}, after the rollback 0xcc {seq_c}", s1.seq);
    // The primary itself serves the promised content.
    assert_eq!(pattern(&client.read_volume(v.id, 0, MIB as u32, None).await.unwrap(), 0xaa), "all 0xaa");
    wait_caught_up(&client, v.id, NodeId(2)).await;
    println!("replication before the reverse: {:?}", client.replication_status(v.id).await.unwrap());

    client.reverse_relationship(v.id, rel.id).await.expect("reverse");
    let after = client.volume("dr").await.unwrap();
    assert_eq!(after.primary, NodeId(2), "the DR copy became the primary: {after:?}");
    let at0 = eventually("read at 0", || client.read_volume(v.id, 0, MIB as u32, None)).await;
    let at2 = eventually("read at 2 MiB", || client.read_volume(v.id, 2 * MIB, MIB as u32, None)).await;
    let (got0, got2) = (pattern(&at0, 0xaa), pattern(&at2, 0xcc));
    assert!(
        got0 == "all 0xaa" && got2 == "all 0xcc",
        "after the reverse the new primary (node-2) must hold s1's content at 0 and the acknowledged \
         0xcc at 2 MiB; at 0: {got0}; at 2 MiB: {got2}"
    );
}
