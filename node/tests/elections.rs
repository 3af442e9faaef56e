//! Multi-process: Haven's election timer with pre-vote (`raft::election`, `raft::campaign`) on a
//! 3-node cluster of real `haven-node` processes. A follower that was stopped (SIGSTOP) long
//! past its election timeout and then resumes must not cost the cluster its leader: its first
//! tick sees no leader contact for a second, but its pre-vote is refused by the others, who
//! still hear the leader. With openraft's own timer (`[raft] prevote = false`) the resumed
//! follower raises the term and the leader steps down.

mod common;

use std::time::Duration;

const HEALTHY: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn a_resumed_follower_does_not_unseat_the_leader() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = common::cluster_of(dir.path(), 3, 10_000);
    let client = c.client().unwrap();
    let ids = common::ids(&c);
    let before = c.wait_healthy(&client, &ids, HEALTHY).await.expect("healthy");
    let follower = *ids.iter().find(|id| **id != before.id.0).unwrap();
    for round in 1..=3 {
        c.signal(follower, libc::SIGSTOP).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        c.signal(follower, libc::SIGCONT).unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = c.wait_healthy(&client, &ids, HEALTHY).await.expect("healthy after resume");
        assert_eq!(
            (now.id, now.term),
            (before.id, before.term),
            "round {round}: node-{follower} resumed after 1 s stopped and the leadership changed"
        );
    }
    client.kv_put("elections/after", b"1").await.expect("the leader still commits");
}
