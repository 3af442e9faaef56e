//! `havenctl migration plan … | host drain` end to end: a real three-node cluster driven only
//! through the CLI — a two-VM group plan followed with `--wait`, the plan list and its steps, a
//! host drain that empties a host and blocks new VMs there until `undrain`, and the errors an
//! operator sees for bad input. Needs the haven-node binary beside havenctl.

use std::time::{Duration, Instant};

mod common;

use common::{fails_with, healthy_cluster, ok, ok_json, usage_error};
use serde_json::Value;

fn host_of(name: &str, cluster: &std::path::Path) -> u64 {
    ok_json(&["vm", "show", name], cluster)["vm"]["host"].as_u64().unwrap()
}

#[test]
fn plans_and_drain_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = healthy_cluster(tmp.path());
    let c = cluster.dir().to_path_buf();
    let c = c.as_path();
    let deadline = Instant::now() + Duration::from_secs(20);
    while ok_json(&["vm", "capacity"], c).as_array().unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "hosts never recorded their capacity");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Two running VMs on node-1.
    for name in ["p1", "p2"] {
        ok(&["vm", "create", name, "--memory", "32MiB", "--dirty-rate", "500", "--host", "1", "--start"], c);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !["p1", "p2"].iter().all(|n| ok_json(&["vm", "show", n], c)["status"]["state"] == "running") {
        assert!(Instant::now() < deadline, "the VMs never ran");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A group plan, followed to its end.
    let p = ok_json(&["migration", "plan", "--vms", "p1,p2", "--to", "node-2", "--name", "pair", "--wait"], c);
    assert_eq!(p["state"], "Succeeded", "{p}");
    assert_eq!(p["arrived"], 2, "{p}");
    assert_eq!((p["from"].as_u64(), p["to"].as_u64()), (Some(1), Some(2)), "{p}");
    assert!(p["resume_spread_ms"].is_u64(), "{p}");
    assert_eq!(p["recovery"]["images"].as_array().unwrap().len(), 2, "{p}");
    assert_eq!((host_of("p1", c), host_of("p2", c)), (2, 2));
    let id = p["id"].as_u64().unwrap().to_string();
    let listed = ok_json(&["migration", "plans"], c);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["name"], "pair", "{listed}");
    let shown = ok_json(&["migration", "plan-show", "pair"], c);
    let notes: Vec<&str> = shown["steps"].as_array().unwrap().iter().map(|s| s["note"].as_str().unwrap()).collect();
    assert!(notes.iter().any(|n| n.contains("recovery snapshot on node-1")), "{notes:?}");
    assert!(notes.iter().any(|n| n.contains("group consistent on node-2")), "{notes:?}");
    let human = String::from_utf8(ok(&["migration", "plan-show", &id], c).stdout).unwrap();
    assert!(human.contains("succeeded") && human.contains("p1") && human.contains("vm-2"), "{human}");
    ok(&["migration", "plans"], c);

    // Drain node-2: both VMs leave it, and it takes no new VM until undrained.
    let drained = ok_json(&["host", "drain", "node-2", "--parallel", "1", "--wait"], c);
    let plans = drained["plans"].as_array().unwrap();
    assert!(!plans.is_empty() && plans.iter().all(|p| p["state"] == "Succeeded" && p["drain"] == true), "{drained}");
    assert!(drained["skipped"].as_array().unwrap().is_empty(), "{drained}");
    assert!(host_of("p1", c) != 2 && host_of("p2", c) != 2);
    let hosts = ok_json(&["host", "list"], c);
    let draining: Vec<u64> =
        hosts.as_array().unwrap().iter().filter(|h| h["draining"] == true).map(|h| h["id"].as_u64().unwrap()).collect();
    assert_eq!(draining, vec![2], "{hosts}");
    fails_with(&["vm", "create", "late", "--memory", "32MiB", "--host", "2"], c, 1, "draining");
    fails_with(&["migration", "plan", "--vms", "p1", "--to", "2"], c, 1, "draining");
    let undrained = ok_json(&["host", "undrain", "2"], c);
    assert_eq!(undrained["draining"], false, "{undrained}");
    ok(&["vm", "create", "late", "--memory", "32MiB", "--host", "2"], c);

    // Bad input: one clear line and a non-zero exit.
    let p1_host = host_of("p1", c).to_string();
    fails_with(&["migration", "plan", "--vms", "p1", "--to", &p1_host], c, 1, "same host");
    fails_with(&["migration", "plan", "--vms", "p1,nosuch", "--to", "2"], c, 1, "not found");
    fails_with(&["migration", "plan", "--vms", "late", "--to", "3"], c, 1, "not meant to be running");
    fails_with(&["migration", "plan", "--vms", "p1", "--to", "9"], c, 1, "node-9");
    fails_with(&["migration", "plan-show", "99"], c, 1, "no plan");
    fails_with(&["migration", "plan-cancel", &id], c, 1, "already ended");
    fails_with(&["host", "drain", "9"], c, 1, "node-9");
    usage_error(&["migration", "plan", "--vms", "p1", "--to", "2", "--parallel", "0"], c, "--parallel");
    usage_error(&["migration", "plan", "--vms", "p1", "--to", "2", "--timeout", "soon"], c, "invalid timeout");
    usage_error(&["migration", "plan", "--vms", "p1", "--to", "nodeX"], c, "invalid host");
    usage_error(&["migration", "plan", "--to", "2"], c, "--vms");
    let help = String::from_utf8(ok(&["migration", "plan", "--help"], c).stdout).unwrap();
    assert!(help.contains("recovery snapshot") && help.contains("--max-downtime"), "{help}");
    let _: Value = ok_json(&["migration", "plans"], c);
}
