//! Multi-process tests: real `haven-node` processes on loopback, killed with SIGKILL, restarted,
//! and fed bad frames and untrusted certificates.

use std::time::Duration;

use haven_client::devcluster::{DevClusterSpec, LocalCluster};
use haven_client::proto::{CatalogQuery, ClientRequest, ClientResponse, MemberSpec, NodeId, QueryResult};
use haven_client::wire::{self, TlsMaterial};
use haven_client::{ClusterConfig, HavenClient};

const HEALTHY: Duration = Duration::from_secs(30);

fn cluster(dir: &std::path::Path, nodes: usize, snapshot_after: u64) -> LocalCluster {
    let mut spec = DevClusterSpec::new(dir.join("cluster"), nodes);
    spec.node_bin = env!("CARGO_BIN_EXE_haven-node").into();
    spec.snapshot_after = snapshot_after;
    let mut c = LocalCluster::create(&spec).expect("create cluster");
    c.start_all().expect("start cluster");
    c
}

fn all(c: &LocalCluster) -> Vec<u64> {
    c.nodes().iter().map(|n| n.id).collect()
}

async fn local_read(client: &HavenClient, c: &LocalCluster, id: u64, key: &str) -> Option<Vec<u8>> {
    let addr = c.node(id).unwrap().addr;
    match client
        .call_node(addr, ClientRequest::Read { query: CatalogQuery::KvGet { key: key.into() }, linearizable: false })
        .await
        .unwrap()
    {
        ClientResponse::Read(QueryResult::Value(v)) => v,
        other => panic!("unexpected {other:?}"),
    }
}

/// Put until acknowledged: a put whose outcome was unknown (the node died with the request in
/// flight) is simply repeated — the value is the same, so a repeat is harmless. Only the final,
/// acknowledged put counts.
async fn put_acked(client: &HavenClient, key: &str, value: &[u8]) -> u64 {
    for _ in 0..20 {
        match client.kv_put(key, value).await {
            Ok(index) => return index,
            Err(e) => eprintln!("retrying put {key}: {e}"),
        }
    }
    panic!("put {key} never acknowledged");
}

async fn wait_applied(client: &HavenClient, c: &LocalCluster, id: u64, index: u64) {
    let addr = c.node(id).unwrap().addr;
    for _ in 0..600 {
        if let Ok(s) = client.status_of(addr).await {
            if s.last_applied_index.unwrap_or(0) >= index {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("node {id} never applied index {index}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_restart_and_full_restart_keep_acknowledged_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cluster(tmp.path(), 3, 10_000);
    let client = c.client().unwrap();
    let first = c.wait_healthy(&client, &all(&c), HEALTHY).await.expect("initial election");
    let mut acked = Vec::new();
    for i in 0..50 {
        let key = format!("k/{i:03}");
        put_acked(&client, &key, key.as_bytes()).await;
        acked.push(key);
    }

    // kill -9 the leader: the survivors elect a new one and writes continue.
    let old = first.id.0;
    c.kill(old).unwrap();
    let survivors: Vec<u64> = all(&c).into_iter().filter(|&i| i != old).collect();
    let second = c.wait_healthy(&client, &survivors, HEALTHY).await.expect("failover election");
    assert_ne!(second.id.0, old, "a killed node cannot stay leader");
    assert!(second.term > first.term, "a new election means a new term");
    let mut last_index = 0;
    for i in 50..100 {
        let key = format!("k/{i:03}");
        last_index = put_acked(&client, &key, key.as_bytes()).await;
        acked.push(key);
    }

    // The killed node restarts and catches up.
    c.start(old).unwrap();
    c.wait_healthy(&client, &all(&c), HEALTHY).await.expect("rejoin");
    wait_applied(&client, &c, old, last_index).await;
    assert_eq!(local_read(&client, &c, old, "k/099").await.as_deref(), Some(&b"k/099"[..]));

    // Full-cluster crash and restart: every acknowledged write is still there.
    for id in all(&c) {
        c.kill(id).unwrap();
    }
    c.start_all().unwrap();
    c.wait_healthy(&client, &all(&c), HEALTHY).await.expect("election after full restart");
    for key in &acked {
        assert_eq!(client.kv_get(key).await.unwrap().as_deref(), Some(key.as_bytes()), "lost {key}");
    }
    let hosts = client.hosts().await.unwrap();
    assert_eq!(hosts.len(), 3, "every member is recorded in the catalog: {hosts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn far_behind_follower_catches_up_from_a_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cluster(tmp.path(), 3, 40);
    let client = c.client().unwrap();
    let leader = c.wait_healthy(&client, &all(&c), HEALTHY).await.unwrap().id.0;
    let lagging = all(&c).into_iter().find(|&i| i != leader).unwrap();
    c.kill(lagging).unwrap();
    let mut last = 0;
    for i in 0..300 {
        last = put_acked(&client, &format!("s/{i}"), b"v").await;
    }
    c.start(lagging).unwrap();
    wait_applied(&client, &c, lagging, last).await;
    assert_eq!(local_read(&client, &c, lagging, "s/0").await.as_deref(), Some(&b"v"[..]));
    assert_eq!(local_read(&client, &c, lagging, "s/299").await.as_deref(), Some(&b"v"[..]));
    let metrics = http_get(c.node(lagging).unwrap().admin, "/metrics").await;
    assert!(
        metrics.lines().any(|l| l.starts_with("haven_raft_snapshots_installed_total") && !l.ends_with(" 0")),
        "the lagging node should have installed a snapshot:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_a_cluster_certificate_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cluster(tmp.path(), 3, 10_000);
    let client = c.client().unwrap();
    c.wait_healthy(&client, &all(&c), HEALTHY).await.unwrap();

    // A client with a certificate from another CA cannot talk to any node.
    let node_bin = env!("CARGO_BIN_EXE_haven-node");
    let rogue_ca = tmp.path().join("rogue-ca");
    let rogue_client = tmp.path().join("rogue-client");
    let out = std::process::Command::new(node_bin)
        .args(["issue-cert", "--ca-dir"])
        .arg(&rogue_ca)
        .arg("--out")
        .arg(&rogue_client)
        .output()
        .unwrap();
    assert!(!out.status.success(), "issue-cert must not create a CA implicitly");
    let rogue = LocalCluster::create(&{
        let mut s = DevClusterSpec::new(tmp.path().join("rogue"), 1);
        s.node_bin = node_bin.into();
        s
    })
    .unwrap();
    let rogue_cfg = ClusterConfig { nodes: c.client_config().nodes, ..rogue.client_config() };
    let rogue_client = HavenClient::new(&rogue_cfg).unwrap().with_deadline(Duration::from_secs(2));
    let err = rogue_client.status().await.expect_err("a foreign certificate must be refused");
    assert!(err.to_string().contains("unreachable"), "{err}");

    // A node with a foreign certificate cannot join: the leader cannot reach it over mutual TLS,
    // and the membership is unchanged.
    let mut rogue = rogue;
    rogue.start(1).unwrap();
    let rn = rogue.node(1).unwrap().clone();
    let err = client
        .add_member(MemberSpec { id: NodeId(9), addr: rn.addr.to_string(), admin_addr: rn.admin.to_string() }, true)
        .await
        .expect_err("a node without a CA-signed certificate must not join");
    assert!(err.to_string().contains("cannot reach"), "{err}");
    assert_eq!(client.status().await.unwrap().members.len(), 3);
    // The rogue node logged the refused handshake from the cluster's leader.
    let rogue_log = std::fs::read_to_string(rn.data_dir.join("node.log")).unwrap();
    assert!(rogue_log.contains("handshake failed"), "{rogue_log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_are_rejected_and_the_node_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cluster(tmp.path(), 1, 10_000);
    let client = c.client().unwrap();
    c.wait_healthy(&client, &[1], HEALTHY).await.unwrap();
    client.kv_put("precious", b"data").await.unwrap();
    let cfg = c.client_config();
    let tls = TlsMaterial::load(&cfg.ca, &cfg.cert, &cfg.key).unwrap();
    let endpoint = wire::client_endpoint(&tls).unwrap();
    let addr = c.node(1).unwrap().addr;

    let mut wrong_version = haven_client::proto::Envelope::new(
        1,
        NodeId(0),
        haven_client::proto::ActorAddr::node(NodeId(1)),
        haven_client::proto::Body::Client(ClientRequest::Status),
    );
    wrong_version.version = 42;
    let wrong_version = wrong_version.encode().unwrap();
    let mut wrong_version_frame = (wrong_version.len() as u32).to_be_bytes().to_vec();
    wrong_version_frame.extend_from_slice(&wrong_version);

    let oversized = ((haven_client::proto::MAX_FRAME_LEN + 1) as u32).to_be_bytes().to_vec();
    let mut truncated = 100u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(&[7u8; 10]);
    let mut garbage = 64u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xA5; 64]);

    for (name, bytes) in [
        ("garbage", garbage),
        ("truncated", truncated),
        ("oversized", oversized),
        ("wrong version", wrong_version_frame),
    ] {
        let conn = endpoint.connect(addr, wire::SERVER_NAME).unwrap().await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&bytes).await.unwrap();
        send.finish().unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), wire::read_envelope(&mut recv)).await.unwrap();
        assert!(reply.is_err(), "{name}: a bad frame must not get an answer");
        let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.unwrap();
        assert!(
            matches!(reason, quinn::ConnectionError::ApplicationClosed(_)),
            "{name}: the node closes the connection, got {reason:?}"
        );
        // The node keeps serving, and stored data is intact.
        assert_eq!(client.kv_get("precious").await.unwrap().as_deref(), Some(&b"data"[..]), "{name}");
    }
    let metrics = http_get(c.node(1).unwrap().admin, "/metrics").await;
    let bad = metrics
        .lines()
        .find(|l| l.starts_with("haven_transport_errors_total{kind=\"bad_frame\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(bad >= 4.0, "each bad frame is counted: {bad}");
    let log = std::fs::read_to_string(c.node(1).unwrap().data_dir.join("node.log")).unwrap();
    for needle in ["frame of", "truncated", "unsupported protocol version 42", "failed validation"] {
        assert!(log.contains(needle), "node log should mention {needle:?}:\n{log}");
    }
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
