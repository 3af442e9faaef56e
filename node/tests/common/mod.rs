//! Shared by the multi-process node tests: a three-node cluster of real `haven-node` processes
//! with a short failure-detection threshold.
#![allow(dead_code)] // each test binary uses its own subset

use haven_client::devcluster::{DevClusterSpec, LocalCluster};

/// Start a 3-node cluster under `dir` with extra node environment `env`.
/// HAVEN_TEST_KEEP=DIR keeps node data and logs under DIR for a post-mortem.
pub fn cluster_with(dir: &std::path::Path, env: &[(&str, &str)]) -> LocalCluster {
    cluster_configured(dir, env, &[])
}

/// [`cluster_with`], with `[section] key = value` set in every node's `haven.toml` before the
/// first start.
pub fn cluster_configured(
    dir: &std::path::Path,
    env: &[(&str, &str)],
    settings: &[(&str, &str, toml::Value)],
) -> LocalCluster {
    let dir = match std::env::var("HAVEN_TEST_KEEP") {
        Ok(keep) => std::path::Path::new(&keep).join(dir.file_name().unwrap()),
        Err(_) => dir.to_path_buf(),
    };
    let mut spec = DevClusterSpec::new(dir.join("cluster"), 3);
    spec.node_bin = env!("CARGO_BIN_EXE_haven-node").into();
    spec.failure_detect_ms = Some(600);
    spec.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let mut c = LocalCluster::create(&spec).expect("create cluster");
    let ids: Vec<u64> = c.nodes().iter().map(|n| n.id).collect();
    for id in ids {
        for (section, key, value) in settings {
            c.set_config(id, section, key, value.clone()).expect("set config");
        }
    }
    c.start_all().expect("start cluster");
    c
}

/// The sum of every series of Prometheus metric `name` on `node`'s admin endpoint.
pub fn metric(c: &LocalCluster, node: haven_client::proto::NodeId, name: &str) -> f64 {
    use std::io::{Read, Write};
    let admin = c.node(node.0).unwrap().admin;
    let mut s = std::net::TcpStream::connect(admin).expect("admin reachable");
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {admin}\r\n\r\n").as_bytes()).unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Start a cluster of `nodes` processes under `dir`, snapshotting after `snapshot_after` entries
/// (the node keeps a tenth of that, at least 10, in its log after a snapshot).
pub fn cluster_of(dir: &std::path::Path, nodes: usize, snapshot_after: u64) -> LocalCluster {
    let mut spec = DevClusterSpec::new(dir.join("cluster"), nodes);
    spec.node_bin = env!("CARGO_BIN_EXE_haven-node").into();
    spec.snapshot_after = snapshot_after;
    let mut c = LocalCluster::create(&spec).expect("create cluster");
    c.start_all().expect("start cluster");
    c
}

/// A client of `c` once every node is healthy and the leader has recorded every host (its
/// registry loop does so shortly after the election; volumes are placed on recorded hosts).
pub async fn healthy_with_hosts(c: &mut LocalCluster) -> haven_client::HavenClient {
    use haven_client::proto::{CatalogQuery, QueryResult};
    let client = c.client().unwrap();
    let ids = ids(c);
    c.wait_healthy(&client, &ids, std::time::Duration::from_secs(30)).await.expect("cluster healthy");
    for _ in 0..100 {
        if let Ok(QueryResult::Hosts(h)) = client.read(CatalogQuery::Hosts, false).await {
            if h.len() == ids.len() {
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    client
}

/// Retry `f` every 100 ms for up to 30 s (device actors start shortly after the catalog names
/// them); panics with `what` and the last error.
pub async fn eventually<T, E: std::fmt::Debug, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if std::time::Instant::now() > deadline => panic!("{what}: {e:?}"),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
}

/// Every node id of `c`.
pub fn ids(c: &LocalCluster) -> Vec<u64> {
    c.nodes().iter().map(|n| n.id).collect()
}

/// kill -9 node `id`, delete its data dir, and `haven-node init` it again with the same id,
/// addresses and Raft settings (`election_timeout_ms`, `snapshot_after` as the cluster was
/// created with): it comes back with an empty store and a fresh certificate. Not started.
pub fn wipe_and_reinit(c: &mut LocalCluster, id: u64, election_timeout_ms: u64, snapshot_after: u64) {
    if c.is_running(id) {
        c.kill(id).unwrap();
    }
    let node = c.node(id).unwrap().clone();
    std::fs::remove_dir_all(&node.data_dir).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_haven-node"));
    cmd.arg("init").arg("--data-dir").arg(&node.data_dir).arg("--ca-dir").arg(c.dir().join("ca"));
    cmd.args(["--id", &id.to_string(), "--listen", &node.addr.to_string()]);
    cmd.args(["--admin-listen", &node.admin.to_string()]);
    cmd.args(["--election-timeout-ms", &election_timeout_ms.to_string()]);
    cmd.args(["--snapshot-after", &snapshot_after.to_string()]);
    if let Some(nbd) = node.nbd {
        cmd.args(["--nbd-listen", &nbd.to_string()]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "re-init of node {id}: {}", String::from_utf8_lossy(&out.stderr));
}

/// GET `path` from an admin server.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// The value of the Prometheus sample whose line starts with `series` (name and labels), or 0.
pub async fn metric_sample(addr: std::net::SocketAddr, series: &str) -> f64 {
    let text = http_get(addr, "/metrics").await;
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A client that talks only to the given nodes.
pub fn client_of(c: &LocalCluster, nodes: &[u64]) -> haven_client::HavenClient {
    let mut cfg = c.client_config();
    cfg.nodes = nodes.iter().map(|id| c.node(*id).unwrap().addr).collect();
    haven_client::HavenClient::new(&cfg).unwrap()
}

/// The one byte pattern a block written with a single pattern holds.
pub fn first_byte(data: &[u8]) -> u8 {
    assert!(data.iter().all(|b| *b == data[0]), "a block holds one pattern");
    data[0]
}
