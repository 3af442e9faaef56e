//! Issue 11, race 4 (volume half), with real `haven-node` processes: a primary frozen with
//! SIGSTOP is failed over from; a new write is acknowledged by the new primary; the old primary
//! is woken and immediately asked, directly, for the block. Its catalog is stale for a moment
//! after waking, so without read leases it answered from its own copy: the block as it was
//! before the acknowledged write. With them its lease has run out (the leader waited it out
//! before failing over), it refuses, and the read is routed to the new primary.

use std::time::{Duration, Instant};

mod common;

use common::{client_of, cluster_with, eventually, first_byte, healthy_with_hosts, metric};

use haven_client::proto::{NodeId, VolumeId};
use haven_client::volumes::VolumeSpec;

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_woken_old_primary_never_serves_a_block_the_new_primary_overwrote() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cluster_with(tmp.path(), &[]);
    let client = healthy_with_hosts(&mut c).await;
    let v = client.create_volume(&VolumeSpec::new("leased", 8 * MIB, 3)).await.expect("create volume");
    let vol: VolumeId = v.id;
    eventually("volume served", || client.read_volume(vol, 0, 4096, None)).await;
    eventually("first write", || client.write_volume(vol, 0, &[0xaa; 4096])).await;
    let old = v.primary;
    let others: Vec<u64> = c.nodes().iter().map(|n| n.id).filter(|id| *id != old.0).collect();
    let at_old = client_of(&c, &[old.0]);
    let at_others = client_of(&c, &others);
    let data = eventually("read at the primary", || at_old.read_volume(vol, 0, 4096, None)).await;
    assert_eq!(first_byte(&data), 0xaa);

    c.signal(old.0, libc::SIGSTOP).unwrap();
    let frozen = Instant::now();
    let new_primary: NodeId = eventually("failover", || async {
        match at_others.volume("leased").await {
            Ok(r) if r.primary != old => Ok(r.primary),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let failover = frozen.elapsed();
    eventually("write at the new primary", || at_others.write_volume(vol, 0, &[0xbb; 4096])).await;

    c.signal(old.0, libc::SIGCONT).unwrap();
    // At once, and again while the woken node catches up with the catalog: every answer must
    // be the acknowledged 0xbb.
    let woke = Instant::now();
    let mut reads = 0;
    while woke.elapsed() < Duration::from_secs(2) {
        match at_old.read_volume(vol, 0, 4096, None).await {
            Ok(data) => {
                let b = first_byte(&data);
                assert_eq!(
                    b,
                    0xbb,
                    "read {reads} at {old} {:?} after waking returned {b:#04x}: a block {new_primary} had \
                     overwritten (acknowledged) — a stale read",
                    woke.elapsed()
                );
                reads += 1;
            }
            Err(e) => panic!("read at {old} after waking failed: {e}"),
        }
    }
    let refused = metric(&c, old, "haven_volume_reads_without_lease_total");
    eprintln!(
        "failover from {old} to {new_primary} {failover:?} after SIGSTOP; {reads} reads at {old} after waking, \
         all 0xbb; {refused} refused for want of a lease"
    );
}
