//! Multi-process failover tests of the SDK: a client whose cached leader is killed (SIGKILL) or
//! stopped (SIGSTOP) finds the new leader through its stall probes, reports the write it had in
//! flight as indeterminate (never re-sends it), re-routes reads, and its next writes succeed on
//! the new leader. These tests assert behaviour, not speed: `failover_bench --sdk-probe` measures
//! how long it takes.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use haven_client::devcluster::{DevClusterSpec, LocalCluster};
use haven_client::{ClientError, HavenClient};

const HEALTHY: Duration = Duration::from_secs(30);
/// Only a bound on "returns at all" (a stopped leader must not hold a request forever); the
/// client's own deadline is 10 s.
const RETURNS_WITHIN: Duration = Duration::from_secs(30);

fn cluster(dir: &std::path::Path) -> LocalCluster {
    let mut spec = DevClusterSpec::new(dir.join("c"), 3);
    spec.node_bin = common::bin().with_file_name("haven-node");
    let mut c = LocalCluster::create(&spec).expect("creating the cluster");
    c.start_all().expect("starting the nodes");
    c
}

/// The leader's id and address once all three nodes agree on it.
async fn leader(c: &mut LocalCluster) -> (u64, SocketAddr) {
    let checker = c.client().unwrap();
    let status = c.wait_healthy(&checker, &[1, 2, 3], HEALTHY).await.expect("a healthy cluster");
    (status.id.0, c.node(status.id.0).unwrap().addr)
}

/// A client with the leader cached as its hint and a live connection to it.
async fn client_at(c: &LocalCluster, leader: SocketAddr) -> HavenClient {
    let mut cfg = c.client_config();
    cfg.nodes.sort_by_key(|a| *a != leader);
    let client = HavenClient::new(&cfg).unwrap();
    client.kv_put("warm", b"1").await.expect("a write before the failure");
    assert_eq!(client.leader_hint(), Some(leader), "the first write went to the leader");
    client
}

/// The client gave up on `old` because of a stall probe (not QUIC's idle timeout) and now
/// points at another node.
fn assert_moved_by_probe(client: &HavenClient, old: SocketAddr) {
    let stats = client.stall_stats();
    assert_eq!(stats.leader_moves, 1, "the stall watch moved the leader hint once: {stats:?}");
    assert!(stats.stalled_requests >= 1 && stats.probes_sent >= 1, "{stats:?}");
    let hint = client.leader_hint().expect("a leader hint after the move");
    assert_ne!(hint, old, "the hint left the failed leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_left_for_the_new_one_without_resending_the_write() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cluster(tmp.path());
    let (old_id, old) = leader(&mut c).await;
    let writer = client_at(&c, old).await;
    let reader = client_at(&c, old).await;

    c.kill(old_id).unwrap();
    let (write, read) = tokio::join!(
        tokio::time::timeout(RETURNS_WITHIN, writer.kv_put("in-flight", b"x")),
        tokio::time::timeout(RETURNS_WITHIN, reader.kv_get("warm")),
    );
    let write = write.expect("the write returns");
    assert!(matches!(write, Err(ClientError::Indeterminate(_))), "sent to the dead leader: {write:?}");
    let read = read.expect("the read returns");
    assert_eq!(read.expect("a read is re-sent to the new leader"), Some(b"1".to_vec()));
    assert_moved_by_probe(&writer, old);
    assert_moved_by_probe(&reader, old);

    // The next write goes to the new leader and succeeds; no further move was needed.
    let moved_to = writer.leader_hint();
    writer.kv_put("after", b"y").await.expect("the next write succeeds");
    assert_eq!(writer.stall_stats().leader_moves, 1);
    assert_eq!(writer.leader_hint(), moved_to, "the write was answered where the probe pointed");
    // Never re-sent: no node applied the write that was in flight to the dead leader.
    assert_eq!(writer.kv_get("in-flight").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_leader_does_not_hold_the_client_and_the_write_is_not_resent() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cluster(tmp.path());
    let (old_id, old) = leader(&mut c).await;
    let writer = client_at(&c, old).await;

    c.signal(old_id, libc::SIGSTOP).unwrap();
    let write = tokio::time::timeout(RETURNS_WITHIN, writer.kv_put("in-flight", b"x"))
        .await
        .expect("a stopped leader must not hold the write forever");
    assert!(matches!(write, Err(ClientError::Indeterminate(_))), "sent to the stopped leader: {write:?}");
    assert_moved_by_probe(&writer, old);
    writer.kv_put("after", b"y").await.expect("the next write succeeds on the new leader");
    // Only the stopped node holds the in-flight write, so while it is stopped a linearizable
    // read through the new leader must not see it: the client did not send it anywhere else.
    assert_eq!(writer.kv_get("in-flight").await.unwrap(), None, "the in-flight write was re-sent");

    // Resumed, the old leader still finds the write in its socket buffer and may carry it out
    // (as a follower it forwards it to the new leader): that is why it is Indeterminate. The
    // cluster heals either way.
    c.signal(old_id, libc::SIGCONT).unwrap();
    leader(&mut c).await;
    assert_eq!(writer.kv_get("after").await.unwrap(), Some(b"y".to_vec()));
}
