//! Multi-process tests of Raft's limits: large entries reach a follower that fell behind and a
//! member added late, a wiped follower catches up from a snapshot bigger than any frame, forged
//! Raft requests are refused without harm, and a node whose store holds a poisoned vote starts.

mod common;

use std::time::{Duration, Instant};

use haven_client::devcluster::LocalCluster;
use haven_client::proto::{ActorAddr, Body, MemberSpec, NodeId, RaftRpc};
use haven_client::HavenClient;
use haven_node::raft::{encode, Vote};
use openraft::raft::VoteRequest;

const HEALTHY: Duration = Duration::from_secs(30);
/// How long a follower may take to apply what the leader has, once it can hear the leader.
const CATCH_UP: Duration = Duration::from_secs(30);
const VALUE_BYTES: usize = 120_000;

/// Put until acknowledged (a put whose outcome is unknown is repeated; the value is the same).
async fn put_acked(client: &HavenClient, key: &str, value: &[u8]) -> u64 {
    for _ in 0..20 {
        match client.kv_put(key, value).await {
            Ok(index) => return index,
            Err(e) => eprintln!("retrying put {key}: {e}"),
        }
    }
    panic!("put {key} never acknowledged");
}

/// Write `count` values of `bytes` bytes under `prefix`; returns the last acknowledged index.
async fn write_values(client: &HavenClient, prefix: &str, count: usize, bytes: usize) -> u64 {
    let started = Instant::now();
    let mut last = 0;
    for i in 0..count {
        let value = vec![(i % 251) as u8; bytes];
        last = put_acked(client, &format!("{prefix}/{i:04}"), &value).await;
    }
    eprintln!("wrote {count} values of {bytes} bytes in {:?}; last index {last}", started.elapsed());
    last
}

/// Wait until node `id` applied `index`; returns how long that took.
async fn wait_applied(client: &HavenClient, c: &LocalCluster, id: u64, index: u64, within: Duration) -> Duration {
    let addr = c.node(id).unwrap().addr;
    let started = Instant::now();
    let mut seen = None;
    while started.elapsed() < within {
        if let Ok(s) = client.status_of(addr).await {
            seen = s.last_applied_index;
            if seen.unwrap_or(0) >= index {
                return started.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("node {id} applied only {seen:?} of {index} after {within:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_follower_catches_up_on_large_values() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = common::cluster_of(tmp.path(), 3, 10_000);
    let client = c.client().unwrap();
    let leader = c.wait_healthy(&client, &common::ids(&c), HEALTHY).await.unwrap().id.0;
    let paused = common::ids(&c).into_iter().find(|&i| i != leader).unwrap();

    c.signal(paused, libc::SIGSTOP).unwrap();
    let last = write_values(&client, "big", 150, VALUE_BYTES).await;
    c.signal(paused, libc::SIGCONT).unwrap();

    let took = wait_applied(&client, &c, paused, last, CATCH_UP).await;
    eprintln!("the paused follower applied index {last} {took:?} after SIGCONT");
    let leader_admin = c.node(leader).unwrap().admin;
    eprintln!(
        "leader shrank AppendEntries {} times",
        common::metric_sample(leader_admin, "haven_raft_append_shrunk_total").await
    );
    c.wait_healthy(&client, &common::ids(&c), HEALTHY).await.expect("one leader, every node healthy");
}

/// Add `spec` as a voter and wait until the leader's membership shows it as one. The leader lets
/// the learner catch up (up to 20 s) before promoting it, which can outlast one SDK attempt (5 s):
/// an attempt whose outcome is unknown, or whose retry finds the node already a member, is settled
/// by reading the membership.
async fn join_as_voter(client: &HavenClient, spec: MemberSpec) {
    let id = spec.id;
    if let Err(e) = client.add_member(spec, true).await {
        eprintln!("add_member: {e}; reading the membership to settle it");
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(40) {
        if let Ok(s) = client.leader_status().await {
            if s.members.iter().any(|m| m.id == id && m.voter) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{id} did not become a voter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_added_behind_large_values_catches_up() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = common::cluster_of(tmp.path(), 3, 10_000);
    let client = c.client().unwrap();
    c.wait_healthy(&client, &common::ids(&c), HEALTHY).await.unwrap();
    write_values(&client, "big", 200, VALUE_BYTES).await;

    let new = c.add_node().unwrap();
    let started = Instant::now();
    let spec = MemberSpec { id: NodeId(new.id), addr: new.addr.to_string(), admin_addr: new.admin.to_string() };
    join_as_voter(&client, spec).await;
    eprintln!("the fourth member became a voter {:?} after the join began", started.elapsed());

    let leader = c.wait_healthy(&client, &common::ids(&c), HEALTHY).await.expect("one leader among four");
    assert_eq!(leader.members.len(), 4);
    let last = put_acked(&client, "after-join", b"ok").await;
    let took = wait_applied(&client, &c, new.id, last, CATCH_UP).await;
    eprintln!("the new member applied index {last} {took:?} after the write");
    assert_eq!(client.kv_get("big/0199").await.unwrap().map(|v| v.len()), Some(VALUE_BYTES));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_follower_installs_a_snapshot_larger_than_a_frame() {
    const SNAPSHOT_AFTER: u64 = 50;
    // 130 values of 512 KiB: a 65 MiB catalog, four times the frame limit.
    const VALUES: usize = 130;
    const BIG_BYTES: usize = 512 << 10;
    let tmp = tempfile::tempdir().unwrap();
    let mut c = common::cluster_of(tmp.path(), 3, SNAPSHOT_AFTER);
    let client = c.client().unwrap();
    let leader = c.wait_healthy(&client, &common::ids(&c), HEALTHY).await.unwrap().id.0;
    let wiped = common::ids(&c).into_iter().find(|&i| i != leader).unwrap();

    common::wipe_and_reinit(&mut c, wiped, 80, SNAPSHOT_AFTER);
    write_values(&client, "huge", VALUES, BIG_BYTES).await;
    let catalog_bytes = (VALUES * BIG_BYTES) as u64;
    assert!(catalog_bytes > 4 * haven_client::proto::MAX_FRAME_LEN as u64);

    c.start(wiped).unwrap();
    let last = put_acked(&client, "after-wipe", b"ok").await;
    let took = wait_applied(&client, &c, wiped, last, Duration::from_secs(60)).await;
    eprintln!("the wiped follower applied index {last} {took:?} after restarting");
    let admin = c.node(wiped).unwrap().admin;
    assert!(
        common::metric_sample(admin, "haven_raft_snapshots_installed_total").await >= 1.0,
        "the wiped follower caught up from a snapshot"
    );
    let addr = c.node(wiped).unwrap().addr;
    let read = client
        .call_node(
            addr,
            haven_client::proto::ClientRequest::Read {
                query: haven_client::proto::CatalogQuery::KvGet { key: format!("huge/{:04}", VALUES - 1) },
                linearizable: false,
            },
        )
        .await
        .unwrap();
    match read {
        haven_client::proto::ClientResponse::Read(haven_client::proto::QueryResult::Value(Some(v))) => {
            assert_eq!(v.len(), BIG_BYTES);
        }
        other => panic!("the wiped follower lacks the last value: {other:?}"),
    }
    // Snapshot files are on disk, not in RocksDB: one current file per node.
    let snapshots = std::fs::read_dir(c.node(wiped).unwrap().data_dir.join("raft-snapshots")).unwrap().count();
    assert_eq!(snapshots, 1, "only the current snapshot file is kept");
}

/// A transport holding node `id`'s certificate, as that node would send from.
fn impersonate(c: &LocalCluster, id: u64) -> haven_node::transport::Transport {
    let tls = haven_node::node::load_tls(&c.node(id).unwrap().data_dir).unwrap();
    let any_port = "127.0.0.1:0".parse().unwrap();
    let options = haven_node::transport::TransportOptions::default();
    haven_node::transport::Transport::bind(NodeId(id), any_port, &tls, Default::default(), options).unwrap()
}

async fn send_vote(from: &haven_node::transport::Transport, c: &LocalCluster, to: u64, req: &VoteRequest<u64>) -> Body {
    let payload = encode(req).unwrap();
    let reply = from
        .request(
            c.node(to).unwrap().addr,
            ActorAddr::node(NodeId(to)),
            Body::Raft { rpc: RaftRpc::Vote, payload },
            0,
            Duration::from_secs(5),
        )
        .await
        .expect("the node answers");
    reply.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_votes_are_refused_and_the_leader_stays() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = common::cluster_of(tmp.path(), 3, 10_000);
    let client = c.client().unwrap();
    let before = c.wait_healthy(&client, &common::ids(&c), HEALTHY).await.unwrap();
    let leader = before.id.0;
    let follower = common::ids(&c).into_iter().find(|&i| i != leader).unwrap();
    let other = common::ids(&c).into_iter().find(|&i| i != leader && i != follower).unwrap();
    let node = impersonate(&c, follower);

    // A real node's identity, a term that would overflow openraft, sent to every node.
    let huge = VoteRequest { vote: Vote::new(u64::MAX, follower), last_log_id: None };
    for to in [leader, other] {
        match send_vote(&node, &c, to, &huge).await {
            Body::Error(e) => {
                assert!(e.message.contains("refused") && e.message.contains("ceiling"), "{}", e.message);
            }
            other => panic!("a vote with term u64::MAX must be refused, got {:?}", other.kind()),
        }
    }
    // A vote for another candidate than the sender.
    let forged = VoteRequest { vote: Vote::new(before.term + 1_000_000, other), last_log_id: None };
    match send_vote(&node, &c, leader, &forged).await {
        Body::Error(e) => assert!(e.message.contains("sent by node"), "{}", e.message),
        other => panic!("a vote naming another candidate must be refused, got {:?}", other.kind()),
    }

    // Nothing changed: same leader, same term, writes go through, every node still runs.
    let after = c.wait_healthy(&client, &common::ids(&c), HEALTHY).await.unwrap();
    assert_eq!((after.id, after.term), (before.id, before.term), "the leader keeps its term");
    put_acked(&client, "still", b"serving").await;
    for id in common::ids(&c) {
        assert!(c.is_running(id), "node {id} is still running");
    }
    let admin = c.node(leader).unwrap().admin;
    assert_eq!(common::metric_sample(admin, "haven_raft_refused_total{reason=\"term_too_high\"}").await, 1.0);
    assert_eq!(common::metric_sample(admin, "haven_raft_refused_total{reason=\"not_from_sender\"}").await, 1.0);
    let log = std::fs::read_to_string(c.node(leader).unwrap().data_dir.join("node.log")).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_poisoned_vote_starts_and_the_cluster_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = common::cluster_of(tmp.path(), 3, 10_000);
    let client = c.client().unwrap();
    let leader = c.wait_healthy(&client, &common::ids(&c), HEALTHY).await.unwrap().id.0;
    let poisoned = common::ids(&c).into_iter().find(|&i| i != leader).unwrap();
    put_acked(&client, "before", b"poison").await;

    // What a node without the guard persisted after granting a forged vote.
    c.kill(poisoned).unwrap();
    {
        use openraft::storage::RaftLogStorage;
        let db = c.node(poisoned).unwrap().data_dir.join("db");
        let store = haven_node::storage::Store::open(&db).unwrap();
        let mut log = haven_node::raft::log_store::LogStore::new(store).unwrap();
        log.save_vote(&Vote::new(u64::MAX, leader)).await.unwrap();
    }
    // The log store's WAL thread holds the database until it notices the store is gone.
    tokio::time::sleep(Duration::from_millis(500)).await;

    c.start(poisoned).unwrap();
    let after = c.wait_healthy(&client, &common::ids(&c), HEALTHY).await.expect("the cluster elects a leader");
    let last = put_acked(&client, "after", b"poison").await;
    wait_applied(&client, &c, poisoned, last, CATCH_UP).await;
    // The cluster moved on from the replacement vote's term (2^61), far below the ceiling (2^62).
    assert!(after.term > 1 << 61 && after.term < 1 << 62, "term {}", after.term);
    assert!(c.is_running(poisoned), "the node with the poisoned vote keeps running");
    let log = std::fs::read_to_string(c.node(poisoned).unwrap().data_dir.join("node.log")).unwrap();
    assert!(log.contains("above the term ceiling"), "the replacement is logged:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
}
