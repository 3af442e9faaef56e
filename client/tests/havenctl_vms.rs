//! `havenctl vm | migration` end to end: a real three-node cluster driven only through the CLI —
//! create and start a VM under a steady workload, live-migrate it with `--watch`, check that it
//! keeps running on its new host with its memory intact — and the errors an operator sees for bad
//! input. Needs the haven-node binary beside havenctl (`cargo build -p haven-node`).

use std::path::Path;
use std::time::{Duration, Instant};

mod common;

use common::{fails_with, healthy_cluster, ok, ok_json, usage_error};
use serde_json::Value;

/// Poll `vm show NAME --json` until `done` accepts it.
fn wait_show(name: &str, cluster: &Path, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let show = ok_json(&["vm", "show", name], cluster);
        if done(&show) {
            return show;
        }
        assert!(Instant::now() < deadline, "{name} never {what}: {show}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn running_with_writes(show: &Value) -> bool {
    show["status"]["state"] == "running" && show["status"]["writes"].as_u64().unwrap_or(0) > 0
}

#[test]
fn vm_create_run_migrate_check_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = healthy_cluster(tmp.path());
    let c = cluster.dir().to_path_buf();
    let c = c.as_path();

    // Every host records the memory it offers to VMs once the cluster is up.
    let deadline = Instant::now() + Duration::from_secs(20);
    let caps = loop {
        let caps = ok_json(&["vm", "capacity"], c);
        if caps.as_array().unwrap().len() == 3 {
            break caps;
        }
        assert!(Instant::now() < deadline, "hosts never recorded their capacity: {caps}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let hosts: Vec<u64> = caps.as_array().unwrap().iter().map(|h| h["host"].as_u64().unwrap()).collect();
    assert!(caps[0]["free_mib"].as_u64().unwrap() > 64, "{caps}");

    // Create and start: the record says where it went and that it should run.
    let vm = ok_json(&["vm", "create", "v1", "--memory", "64MiB", "--dirty-rate", "500", "--start"], c);
    assert_eq!(vm["name"], "v1", "{vm}");
    assert_eq!(vm["memory_mib"], 64, "{vm}");
    assert_eq!(vm["desired"], "Running", "{vm}");
    let source = vm["host"].as_u64().unwrap();
    let before = wait_show("v1", c, "ran", running_with_writes);
    assert_eq!(before["vm"]["host"].as_u64(), Some(source), "{before}");
    let seq_before = before["status"]["last_seq"].as_u64().unwrap();

    // Live-migrate with --watch: the final report says done.
    let dest = *hosts.iter().find(|&&h| h != source).expect("another host");
    let dest_s = format!("node-{dest}");
    let report = ok_json(&["migration", "start", "v1", "--to", &dest_s, "--max-downtime", "50ms", "--watch"], c);
    assert_eq!(report["phase"], "done", "{report}");
    assert_eq!(report["to"].as_u64(), Some(dest), "{report}");

    // It now lives on the destination and keeps running from where it was.
    let moved = wait_show("v1", c, "ran on the destination", |s| {
        s["vm"]["host"].as_u64() == Some(dest) && s["status"]["host"].as_u64() == Some(dest) && running_with_writes(s)
    });
    assert!(moved["vm"]["migrating_to"].is_null(), "{moved}");
    let writes = moved["status"]["writes"].as_u64().unwrap();
    let later = wait_show("v1", c, "kept writing", |s| s["status"]["writes"].as_u64().unwrap_or(0) > writes);
    assert!(later["status"]["last_seq"].as_u64().unwrap() > seq_before, "workload went back: {before} then {later}");
    let check = ok_json(&["vm", "check", "v1"], c);
    assert_eq!(check["host"].as_u64(), Some(dest), "{check}");
    ok(&["vm", "check", "v1"], c);

    // Listing commands parse and show the VM where it is now.
    let list = ok_json(&["vm", "list"], c);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["host"].as_u64(), Some(dest), "{list}");
    let migrations = ok_json(&["migration", "list"], c);
    assert_eq!(migrations[0]["name"], "v1", "{migrations}");
    ok(&["vm", "list"], c);
    ok(&["vm", "show", "v1"], c);
    ok(&["vm", "capacity"], c);
    ok(&["migration", "list"], c);

    // Bad input: one clear line and a non-zero exit, before anything is sent where possible.
    fails_with(&["vm", "show", "nosuch"], c, 1, "not found");
    fails_with(&["migration", "start", "v1", "--to", &dest.to_string()], c, 1, "already runs on");
    fails_with(&["vm", "create", "v1", "--memory", "64MiB"], c, 1, "already exists");
    fails_with(&["vm", "create", "big", "--memory", "64GiB"], c, 1, "MiB free");
    fails_with(&["vm", "delete", "v1"], c, 1, "--yes");
    usage_error(&["vm", "create", "big", "--memory", "100000GiB"], c, "too large");
    usage_error(&["vm", "create", "x", "--memory", "12X"], c, "invalid size \"12X\"");
    usage_error(&["vm", "create", "x", "--memory", "1000"], c, "whole number of MiB");
    usage_error(&["vm", "create", "x", "--memory", "64MiB", "--workload", "random"], c, "invalid workload");
    usage_error(&["migration", "start", "v1", "--to", "nodeX"], c, "invalid host");
    usage_error(&["migration", "start", "v1", "--to", "2", "--max-downtime", "soon"], c, "invalid duration");

    // Deleting with --yes removes it.
    ok(&["vm", "delete", "v1", "--yes"], c);
    fails_with(&["vm", "show", "v1"], c, 1, "not found");
}
