//! Shared datasets (C2) end to end on real `haven-node` processes: three members editing at once
//! converge to identical copies; a diff a member reflects is never sent back (counted); a member
//! frozen with SIGSTOP catches up with diffs the size of what changed; a hub killed with kill -9
//! is replaced and no acknowledged change is lost; bad requests get clear errors and change
//! nothing.

use std::time::{Duration, Instant};

mod common;

use common::{cluster_with, healthy_with_hosts};
use haven_client::proto::share::{ShareAck, ShareMemberStatus, ShareRecord};
use haven_client::proto::{ErrorCode, NodeId, ShareId};
use haven_client::HavenClient;

const SETTLE: Duration = Duration::from_secs(30);

fn nodes(ids: &[u64]) -> Vec<NodeId> {
    ids.iter().map(|&i| NodeId(i)).collect()
}

/// Wait until every member answers, holds the same digest and is in sync; their statuses.
async fn converged(client: &HavenClient, share: ShareId, members: usize) -> Vec<ShareMemberStatus> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let status = client.share_members(share).await.unwrap_or_default();
        let reachable: Vec<_> = status.iter().filter(|m| m.reachable).collect();
        let same = reachable.windows(2).all(|w| w[0].digest == w[1].digest);
        if reachable.len() == members && same && reachable.iter().all(|m| m.in_sync) {
            return status;
        }
        assert!(Instant::now() < deadline, "share {share} never converged: {status:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn doc_at(client: &HavenClient, share: ShareId, member: u64) -> Vec<(String, Vec<u8>)> {
    client.share_get(share, Some(NodeId(member)), None, None, Duration::ZERO).await.unwrap().entries
}

async fn put(client: &HavenClient, share: ShareId, member: u64, key: &str, value: &[u8]) -> u64 {
    client.share_put(share, Some(NodeId(member)), key, Some(value.to_vec()), ShareAck::Hub).await.unwrap()
}

async fn create(client: &HavenClient, name: &str, members: &[u64]) -> ShareRecord {
    client.create_share(name, &nodes(members)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_edits_converge_and_reflected_diffs_never_echo() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster_with(dir.path(), &[]);
    let client = healthy_with_hosts(&mut c).await;

    // Two members: a change made at the spoke is reflected by the hub and nothing goes back.
    let pair = create(&client, "pair", &[1, 2]).await;
    assert_eq!(pair.hub, NodeId(1));
    put(&client, pair.id, 2, "greeting", b"hello").await;
    let status = converged(&client, pair.id, 2).await;
    let (hub, spoke) = (&status[0], &status[1]);
    assert_eq!((hub.member, spoke.member), (NodeId(1), NodeId(2)));
    assert_eq!(spoke.diffs_sent, 1, "the spoke sent its change once: {spoke:?}");
    assert_eq!(hub.diffs_reflected, 1, "the hub reflected it: {hub:?}");
    assert_eq!(hub.diffs_sent, 0, "a reflected diff produced an outbound diff (echo): {hub:?}");
    assert_eq!((hub.echoes, spoke.echoes), (0, 0));
    assert_eq!(doc_at(&client, pair.id, 1).await, vec![("greeting".to_string(), b"hello".to_vec())]);

    // Three members edit at once: their own keys, and one key all of them fight over.
    let trio = create(&client, "trio", &[1, 2, 3]).await;
    let writers = (1..=3u64).map(|m| {
        let client = client.clone();
        async move {
            for i in 0..15 {
                put(&client, trio.id, m, &format!("m{m}/k{i}"), format!("v{i}").as_bytes()).await;
                put(&client, trio.id, m, "contested", format!("from {m} #{i}").as_bytes()).await;
            }
        }
    });
    futures::future::join_all(writers).await;
    let status = converged(&client, trio.id, 3).await;
    let docs =
        [doc_at(&client, trio.id, 1).await, doc_at(&client, trio.id, 2).await, doc_at(&client, trio.id, 3).await];
    assert!(docs.iter().all(|d| *d == docs[0]), "copies differ: {docs:?}");
    for m in 1..=3 {
        for i in 0..15 {
            let key = format!("m{m}/k{i}");
            let held = docs[0].iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone());
            assert_eq!(held, Some(format!("v{i}").into_bytes()), "acknowledged {key} missing");
        }
    }
    assert!(status.iter().all(|m| m.echoes == 0), "echoes counted: {status:#?}");
    println!("three members converged: {status:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_member_catches_up_and_a_killed_hub_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster_with(dir.path(), &[]);
    let client = healthy_with_hosts(&mut c).await;
    let share = create(&client, "big", &[1, 2, 3]).await;

    // A 64 KiB value, then a frozen spoke misses 20 small in-place edits of it.
    let mut blob = vec![7u8; 64 << 10];
    put(&client, share.id, 1, "blob", &blob).await;
    converged(&client, share.id, 3).await;
    let before: u64 = client.share_members(share.id).await.unwrap()[0].diff_payload_bytes_sent;
    c.signal(3, libc::SIGSTOP).unwrap();
    for i in 0..20usize {
        blob[i * 3000..i * 3000 + 16].copy_from_slice(&[i as u8; 16]);
        put(&client, share.id, 2, "blob", &blob).await;
    }
    c.signal(3, libc::SIGCONT).unwrap();
    let status = converged(&client, share.id, 3).await;
    assert_eq!(doc_at(&client, share.id, 3).await, vec![("blob".to_string(), blob.clone())]);
    // The hub sent spoke 2's edits on to spoke 3: diffs the size of the change, not the value.
    let sent = status[0].diff_payload_bytes_sent - before;
    println!("hub sent {sent} payload bytes for 20 edits of 16 bytes in a 64 KiB value");
    assert!(sent < 16 << 10, "catching up cost {sent} bytes; the value is 64 KiB");

    // kill -9 the hub: the leader moves the hub, and every acknowledged change survives.
    put(&client, share.id, 3, "before-kill", b"1").await;
    c.kill(1).unwrap();
    let deadline = Instant::now() + SETTLE;
    let moved = loop {
        if let Ok(s) = client.share("big").await {
            if s.hub != NodeId(1) {
                break s;
            }
        }
        assert!(Instant::now() < deadline, "the hub never moved off the killed node");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let deadline = Instant::now() + SETTLE;
    while client.share_put(share.id, Some(NodeId(3)), "after-kill", Some(b"2".to_vec()), ShareAck::Hub).await.is_err() {
        assert!(Instant::now() < deadline, "no put acknowledged after the hub moved to {}", moved.hub);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.start(1).unwrap();
    converged(&client, share.id, 3).await;
    let doc = doc_at(&client, share.id, 1).await;
    for key in ["before-kill", "after-kill", "blob"] {
        assert!(doc.iter().any(|(k, _)| k == key), "{key} missing at the restarted old hub: {doc:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_share_requests_get_clear_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster_with(dir.path(), &[]);
    let client = healthy_with_hosts(&mut c).await;
    let s = create(&client, "s", &[1, 2]).await;
    put(&client, s.id, 1, "k", b"v").await;

    let one = client.create_share("solo", &nodes(&[1])).await.unwrap_err();
    assert!(one.to_string().contains("2 to 8 members"), "{one}");
    let stranger = client.create_share("far", &nodes(&[1, 9])).await.unwrap_err();
    assert!(stranger.to_string().contains("node-9 is not a host"), "{stranger}");
    let twice = client.create_share("s", &nodes(&[1, 2])).await.unwrap_err();
    assert!(twice.to_string().contains("already exists"), "{twice}");
    let unknown = client.share("nope").await.unwrap_err();
    assert!(unknown.to_string().contains("no share"), "{unknown}");
    let missing = client.share_get(ShareId(99), None, None, None, Duration::ZERO).await.unwrap_err();
    assert_eq!(missing.code(), Some(ErrorCode::NotFound), "{missing}");
    let outsider = client.share_put(s.id, Some(NodeId(3)), "k", Some(b"x".to_vec()), ShareAck::Hub).await.unwrap_err();
    assert!(outsider.to_string().contains("node-3 is not a member"), "{outsider}");
    let long_key = "k".repeat(300);
    let too_long = client.share_put(s.id, None, &long_key, Some(vec![1]), ShareAck::Hub).await.unwrap_err();
    assert!(too_long.to_string().contains("at most 256"), "{too_long}");
    let stale = ShareRecord { generation: 0, ..s.clone() };
    let cas = client.set_share_members(&stale, &nodes(&[1, 3])).await.unwrap_err();
    assert!(cas.to_string().contains("generation"), "{cas}");

    // Nothing changed: the share is as it was, on both members.
    assert_eq!(client.share("s").await.unwrap(), s);
    converged(&client, s.id, 2).await;
    assert_eq!(doc_at(&client, s.id, 2).await, vec![("k".to_string(), b"v".to_vec())]);
}
