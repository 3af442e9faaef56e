//! `havenctl` end to end: a real local cluster driven only through the CLI, including membership
//! changes and the errors an operator sees for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn havenctl() -> Command {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_havenctl"));
    let mut cmd = Command::new(&bin);
    // haven-node is built into the same directory as havenctl by `cargo test --workspace`.
    cmd.env("HAVEN_NODE_BIN", bin.with_file_name("haven-node"));
    cmd.env_remove("HAVEN_CLUSTER");
    cmd
}

fn run(args: &[&str], cluster: Option<&Path>) -> Output {
    let mut cmd = havenctl();
    if let Some(c) = cluster {
        cmd.arg("--cluster").arg(c);
    }
    cmd.args(args).output().expect("running havenctl")
}

fn ok_json(args: &[&str], cluster: Option<&Path>) -> Value {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let out = run(&full, cluster);
    assert!(out.status.success(), "havenctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("havenctl {args:?}: bad JSON ({e}): {:?}", out.stdout))
}

/// Assert a command fails with one clear line on stderr containing `needle`.
fn fails_with(args: &[&str], cluster: Option<&Path>, needle: &str) {
    let out = run(args, cluster);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "havenctl {args:?} should fail");
    assert_eq!(stderr.trim_end().lines().count(), 1, "havenctl {args:?}: one line expected, got:\n{stderr}");
    assert!(stderr.contains(needle), "havenctl {args:?}: expected {needle:?} in {stderr:?}");
}

struct DevCluster(PathBuf);

impl Drop for DevCluster {
    fn drop(&mut self) {
        let _ = run(&["dev", "down", "--dir", self.0.to_str().unwrap()], None);
    }
}

#[test]
fn dev_cluster_membership_kv_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let dir_s = dir.to_str().unwrap();
    let up = ok_json(&["dev", "up", "--nodes", "3", "--dir", dir_s], None);
    let _guard = DevCluster(dir.clone());
    assert_eq!(up["nodes"].as_array().unwrap().len(), 3);
    let c = Some(dir.as_path());

    let status = ok_json(&["cluster", "status"], c);
    assert!(status["leader"].as_u64().is_some(), "{status}");
    assert_eq!(status["members"].as_array().unwrap().len(), 3);
    assert!(status["members"].as_array().unwrap().iter().all(|m| m["health"] == "healthy"), "{status}");

    ok_json(&["kv", "put", "greeting", "hello"], c);
    assert_eq!(ok_json(&["kv", "get", "greeting"], c)["value"], "hello");
    let cas = ok_json(&["kv", "cas", "greeting", "--expected", "hello", "bye"], c);
    assert_eq!(cas["succeeded"], true);
    fails_with(&["kv", "cas", "greeting", "--expected", "hello", "again"], c, "did not match");

    // The host agent of every node answers, routed through whichever node the client reaches.
    for id in ["1", "2", "3"] {
        let pong = ok_json(&["host", "ping", id], c);
        assert_eq!(pong["from"].to_string(), id);
    }

    // Membership: start a fourth process, add it, see it, remove it.
    let new = ok_json(&["dev", "add-node", "--dir", dir_s], None);
    let (id, addr, admin) = (
        new["id"].to_string(),
        new["addr"].as_str().unwrap().to_string(),
        new["admin_addr"].as_str().unwrap().to_string(),
    );
    assert_eq!(id, "4");
    ok_json(&["cluster", "add", &id, &addr, &admin], c);
    let status = ok_json(&["cluster", "status"], c);
    let members = status["members"].as_array().unwrap();
    assert_eq!(members.len(), 4, "{status}");
    assert!(members.iter().any(|m| m["id"] == 4 && m["voter"] == true), "{status}");
    fails_with(&["cluster", "add", &id, &addr, &admin], c, "already a member");
    ok_json(&["cluster", "remove", "4"], c);
    let status = ok_json(&["cluster", "status"], c);
    assert_eq!(status["members"].as_array().unwrap().len(), 3, "{status}");
    assert_eq!(ok_json(&["kv", "get", "greeting"], c)["value"], "bye");

    // Bad input: one clear line and a non-zero exit.
    fails_with(&["cluster", "remove", "99"], c, "node-99 is not a member");
    fails_with(&["cluster", "add", "7", "not-an-address", "127.0.0.1:1"], c, "not HOST:PORT");
    fails_with(&["cluster", "add", "7", "127.0.0.1:1", "127.0.0.1:2"], c, "cannot reach");
    fails_with(&["kv", "get", "missing"], c, "not found");
    fails_with(&["host", "ping", "42"], c, "not a cluster member");
    fails_with(&["cluster", "status"], None, "no cluster given");
    fails_with(&["cluster", "status"], Some(&tmp.path().join("nope")), "cannot read");
    fails_with(&["dev", "up", "--nodes", "3", "--dir", dir_s], None, "already holds a cluster");

    // An unreachable cluster: a config naming a port where nothing listens.
    let cfg = std::fs::read_to_string(dir.join("client.toml")).unwrap();
    let nodes_line = cfg.lines().find(|l| l.starts_with("nodes")).unwrap();
    let patched =
        cfg.replace(nodes_line, "nodes = [\"127.0.0.1:9\"]").replace("deadline_ms = 10000", "deadline_ms = 1500");
    // client.toml's certificate paths are relative to its directory, so write the copy beside it.
    let unreachable = dir.join("unreachable.toml");
    std::fs::write(&unreachable, patched).unwrap();
    fails_with(&["cluster", "status"], Some(&unreachable), "cluster unreachable");

    let down = ok_json(&["dev", "down", "--dir", dir_s], None);
    assert_eq!(down["stopped"].as_array().unwrap().len(), 4);
}

#[test]
fn usage_errors_exit_non_zero() {
    let out = havenctl().args(["cluster", "frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = havenctl().args(["dev", "up", "--nodes", "0", "--dir", "/tmp/x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let help = havenctl().arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("dev up --nodes 3"));
}
