//! Shared by the multi-process node tests: a three-node cluster of real `haven-node` processes
//! with a short failure-detection threshold.
#![allow(dead_code)] // each test binary uses its own subset

use haven_client::devcluster::{DevClusterSpec, LocalCluster};

/// Start a 3-node cluster under `dir` with extra node environment `env`.
/// HAVEN_TEST_KEEP=DIR keeps node data and logs under DIR for a post-mortem.
pub fn cluster_with(dir: &std::path::Path, env: &[(&str, &str)]) -> LocalCluster {
    let dir = match std::env::var("HAVEN_TEST_KEEP") {
        Ok(keep) => std::path::Path::new(&keep).join(dir.file_name().unwrap()),
        Err(_) => dir.to_path_buf(),
    };
    let mut spec = DevClusterSpec::new(dir.join("cluster"), 3);
    spec.node_bin = env!("CARGO_BIN_EXE_haven-node").into();
    spec.failure_detect_ms = Some(600);
    spec.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let mut c = LocalCluster::create(&spec).expect("create cluster");
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
