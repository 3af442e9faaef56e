//! Issue 13 (reads where the data is), with real `haven-node` processes: a 2-replica volume's
//! reads through the node holding the other in-sync replica are served from that node's copy
//! (counted in its `haven_volume_local_reads_total`, not inferred from timing) and return the
//! latest acknowledged write. Then that node is frozen with SIGSTOP; the primary's next write
//! goes unanswered there, so the primary drops it from the in-sync set — which the leader
//! commits only once the frozen node's read lease has lapsed — and acknowledges the write.
//! Woken, the node must never answer with the block as it was before that write.

use std::time::{Duration, Instant};

mod common;

use common::{client_of, cluster_configured, eventually, first_byte, healthy_with_hosts, metric};
use haven_client::devcluster::LocalCluster;
use haven_client::proto::{NodeId, VolumeId};
use haven_client::volumes::VolumeSpec;

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;

/// `metric` summed over every node but `except` (a frozen node's admin port accepts a
/// connection and never answers).
fn metric_elsewhere(c: &LocalCluster, except: NodeId, name: &str) -> f64 {
    c.nodes().iter().filter(|n| n.id != except.0).map(|n| metric(c, NodeId(n.id), name)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_sync_replica_serves_reads_locally_and_a_dropped_one_never_serves_stale_data() {
    let tmp = tempfile::tempdir().unwrap();
    // On by default; set here so the test keeps meaning what it says if the default changes.
    let mut c = cluster_configured(tmp.path(), &[], &[("volume", "local_reads", toml::Value::Boolean(true))]);
    let client = healthy_with_hosts(&mut c).await;
    let v = client.create_volume(&VolumeSpec::new("near", 8 * MIB, 2)).await.expect("create volume");
    let vol: VolumeId = v.id;
    let primary = v.primary;
    let replica = *v.replicas.iter().find(|h| **h != primary).expect("two replicas");
    let at_primary = client_of(&c, &[primary.0]);
    let at_replica = client_of(&c, &[replica.0]);
    eventually("volume served", || at_primary.read_volume(vol, 0, BLOCK as u32, None)).await;

    // Every acknowledged write is what the replica's node answers next, from its own copy.
    eventually("the replica's node serves a read locally", || async {
        at_primary.write_volume(vol, 0, &[0x10; BLOCK]).await.map_err(|e| e.to_string())?;
        at_replica.read_volume(vol, 0, BLOCK as u32, None).await.map_err(|e| e.to_string())?;
        let local = metric(&c, replica, "haven_volume_local_reads_total");
        if local >= 1.0 {
            Ok(())
        } else {
            Err("no read served locally yet (no lease yet?)".to_string())
        }
    })
    .await;
    let before = metric(&c, replica, "haven_volume_local_reads_total");
    let rounds = 20u8;
    for k in 1..=rounds {
        let pattern = 0x20 + k;
        at_primary.write_volume(vol, 0, &[pattern; BLOCK]).await.expect("write through the primary");
        let data = at_replica.read_volume(vol, 0, BLOCK as u32, None).await.expect("read through the replica");
        assert_eq!(first_byte(&data), pattern, "round {k}: the replica's node returned an older write");
    }
    let served = metric(&c, replica, "haven_volume_local_reads_total") - before;
    assert!(
        served >= f64::from(rounds) * 0.9,
        "only {served} of {rounds} reads through {replica} were served from its copy"
    );

    // Freeze the replica's node while it holds a lease; the primary acknowledges a new write
    // only after dropping it, and the drop only after its lease lapsed.
    at_primary.write_volume(vol, 0, &[0xaa; BLOCK]).await.expect("write 0xaa");
    assert_eq!(first_byte(&at_replica.read_volume(vol, 0, BLOCK as u32, None).await.unwrap()), 0xaa);
    let waits_before = metric_elsewhere(&c, replica, "haven_volume_lease_revocation_waits_total");
    c.signal(replica.0, libc::SIGSTOP).unwrap();
    let frozen = Instant::now();
    eventually("write 0xbb acknowledged without the frozen replica", || {
        at_primary.write_volume(vol, 0, &[0xbb; BLOCK])
    })
    .await;
    let acked_after = frozen.elapsed();
    let record = client.volume("near").await.expect("volume record");
    assert!(!record.in_sync.contains(&replica), "{replica} left the in-sync set: {record:?}");
    assert!(
        metric_elsewhere(&c, replica, "haven_volume_lease_revocation_waits_total") > waits_before,
        "the leader held the drop back for the frozen replica's lease"
    );

    c.signal(replica.0, libc::SIGCONT).unwrap();
    // At once, and while the woken node catches up with the catalog and is resynced: every
    // answer must be the acknowledged 0xbb, whoever serves it.
    let woke = Instant::now();
    let local_at_wake = metric(&c, replica, "haven_volume_local_reads_total");
    let mut reads = 0;
    while woke.elapsed() < Duration::from_secs(3) {
        match at_replica.read_volume(vol, 0, BLOCK as u32, None).await {
            Ok(data) => {
                let b = first_byte(&data);
                assert_eq!(
                    b,
                    0xbb,
                    "read {reads} at {replica} {:?} after waking returned {b:#04x}: older than the write \
                     acknowledged while it was frozen — a stale read",
                    woke.elapsed()
                );
                reads += 1;
            }
            Err(e) => panic!("read at {replica} after waking failed: {e}"),
        }
    }
    // Resynced and back in the set, it serves reads locally again.
    eventually("the replica rejoins the in-sync set", || async {
        match client.volume("near").await {
            Ok(r) if r.in_sync.contains(&replica) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eventually("local reads again, of the newest write", || async {
        let data = at_replica.read_volume(vol, 0, BLOCK as u32, None).await.map_err(|e| e.to_string())?;
        assert_eq!(first_byte(&data), 0xbb);
        let local = metric(&c, replica, "haven_volume_local_reads_total") - local_at_wake;
        if local >= 1.0 {
            Ok(())
        } else {
            Err("not served locally yet".to_string())
        }
    })
    .await;
    eprintln!(
        "{served} of {rounds} reads through {replica} served locally; frozen, the write was acknowledged after \
         {acked_after:?}; {reads} reads at {replica} after waking, all 0xbb"
    );
}
