//! Helpers shared by the CLI end-to-end tests: run `havenctl` against a cluster directory and
//! assert on its exit status, stderr and JSON output.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use haven_client::devcluster::{DevClusterSpec, LocalCluster};
use serde_json::Value;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_havenctl"))
}

pub fn run(args: &[&str], cluster: &Path) -> Output {
    Command::new(bin())
        .env_remove("HAVEN_CLUSTER")
        .arg("--cluster")
        .arg(cluster)
        .args(args)
        .output()
        .expect("running havenctl")
}

pub fn ok(args: &[&str], cluster: &Path) -> Output {
    let out = run(args, cluster);
    assert!(
        out.status.success(),
        "havenctl {args:?} failed ({:?}): {}{}; node logs in {}/node-*/node.log",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
        cluster.display()
    );
    out
}

pub fn parse(args: &[&str], out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("havenctl {args:?}: bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

pub fn ok_json(args: &[&str], cluster: &Path) -> Value {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    parse(args, &ok(&full, cluster))
}

/// Assert a command fails with exit status `code` and one clear line on stderr containing `needle`.
pub fn fails_with(args: &[&str], cluster: &Path, code: i32, needle: &str) -> Output {
    let out = run(args, cluster);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "havenctl {args:?}: stderr {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "havenctl {args:?}: one line expected, got:\n{stderr}");
    assert!(stderr.contains(needle), "havenctl {args:?}: expected {needle:?} in {stderr:?}");
    out
}

/// Like `fails_with`, for clap usage errors (exit 2; clap may add a usage hint after the message).
pub fn usage_error(args: &[&str], cluster: &Path, needle: &str) {
    let out = run(args, cluster);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "havenctl {args:?}: stderr {stderr}");
    assert!(stderr.contains(needle), "havenctl {args:?}: expected {needle:?} in {stderr:?}");
}

/// A healthy three-node cluster under `dir` (the haven-node binary beside havenctl), for tests
/// that then drive it only through the CLI.
pub fn healthy_cluster(dir: &Path) -> LocalCluster {
    let mut spec = DevClusterSpec::new(dir.join("c"), 3);
    spec.node_bin = bin().with_file_name("haven-node");
    // The CLI tests include `volume corrupt`, a testing-only request.
    spec.env.insert("HAVEN_ALLOW_FAULT_INJECTION".into(), "1".into());
    let mut cluster = LocalCluster::create(&spec).expect("creating the cluster");
    cluster.start_all().expect("starting the nodes");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = cluster.client().unwrap();
        cluster.wait_healthy(&client, &[1, 2, 3], std::time::Duration::from_secs(30)).await
    })
    .unwrap_or_else(|e| panic!("{e}; logs in {}/node-*/node.log", cluster.dir().display()));
    cluster
}
