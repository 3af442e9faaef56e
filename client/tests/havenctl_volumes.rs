//! `havenctl volume | snapshot | policy | replication` end to end: a real three-node cluster
//! driven only through the CLI — create, write, read back, snapshot, corrupt a replica, verify
//! (exit 1 naming the block), repair, verify again — and the errors an operator sees for bad input.

use std::time::{Duration, Instant};

mod common;

use common::{fails_with, healthy_cluster, ok, ok_json, run, usage_error};
use serde_json::Value;

#[test]
fn volume_snapshot_corrupt_verify_repair_and_bad_input() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let cluster = healthy_cluster(tmp.path());
    let c = cluster.dir().to_path_buf();
    let c = c.as_path();

    // Create: the record says where it went.
    let vol = ok_json(&["volume", "create", "v1", "--size", "8MiB", "--replicas", "2"], c);
    assert_eq!(vol["name"], "v1", "{vol}");
    assert_eq!(vol["size_bytes"], 8 << 20, "{vol}");
    let primary = vol["primary"].as_u64().unwrap();
    let replicas: Vec<u64> = vol["replicas"].as_array().unwrap().iter().map(|r| r.as_u64().unwrap()).collect();
    assert_eq!(replicas.len(), 2, "{vol}");
    let secondary = *replicas.iter().find(|&&r| r != primary).expect("a non-primary replica");
    let (primary_s, secondary_s) = (primary.to_string(), format!("node-{secondary}"));

    // Write a pattern and a file, read both back into a file and from stdout.
    let w = ok_json(&["volume", "write", "v1", "--offset", "0", "--pattern", "0xAB", "--length", "16KiB"], c);
    assert!(w["seq"].as_u64().unwrap() > 0, "{w}");
    let file: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let src = tmp.path().join("src.bin");
    std::fs::write(&src, &file).unwrap();
    ok(&["volume", "write", "vol-1", "--offset", "16K", "--file", src.to_str().unwrap()], c);
    let dst = tmp.path().join("dst.bin");
    ok(&["volume", "read", "v1", "--offset", "0", "--length", "24KiB", "--out", dst.to_str().unwrap()], c);
    let back = std::fs::read(&dst).unwrap();
    let mut expected = vec![0xABu8; 16 << 10];
    expected.extend_from_slice(&file);
    assert!(back == expected, "read back differs from what was written");
    let raw = ok(&["volume", "read", "1", "--offset", "16384", "--length", "8192"], c);
    assert!(raw.stdout == file, "raw read to a pipe differs ({} bytes)", raw.stdout.len());

    // A labeled snapshot is compared across the replicas at once.
    let snap = ok_json(&["snapshot", "create", "v1", "s1", "--label", "daily"], c);
    assert!(snap["verdict"]["Match"].is_object(), "{snap}");
    let snaps = ok_json(&["snapshot", "list", "v1"], c);
    assert_eq!(snaps.as_array().unwrap().len(), 1, "{snaps}");

    // Damage block 0 on the non-primary replica: verify exits 1 and names the block.
    let hurt = ok_json(&["volume", "corrupt", "v1", "--host", &secondary_s, "--block", "0"], c);
    assert_eq!(hurt["block"], 0, "{hurt}");
    let out = fails_with(&["snapshot", "verify", "v1", "s1"], c, 1, "differs across replicas at 1 block (0)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("MISMATCH") && stdout.contains("differing blocks: 0"), "{stdout}");
    let out = run(&["--json", "snapshot", "verify", "v1", "s1"], c);
    assert_eq!(out.status.code(), Some(1));
    let verdict: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verdict["verdict"]["Mismatch"]["blocks"], serde_json::json!([0]), "{verdict}");

    // Repair from the primary's copy; verify is clean again.
    let repaired = ok_json(&["snapshot", "repair", "v1", "s1", "--from", &primary_s], c);
    assert!(repaired["verdict"]["Repaired"].is_object(), "{repaired}");
    let verdict = ok_json(&["snapshot", "verify", "v1", "s1"], c);
    assert!(verdict["verdict"]["Match"].is_object(), "{verdict}");
    ok(&["snapshot", "verify", "v1", "s1"], c);

    // Listing, showing and status parse.
    let list = ok_json(&["volume", "list"], c);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["name"], "v1", "{list}");
    let show = ok_json(&["volume", "show", "v1"], c);
    assert_eq!(show["volume"]["name"], "v1", "{show}");
    assert_eq!(show["snapshots"].as_array().unwrap().len(), 1, "{show}");
    let status = ok_json(&["volume", "status", "v1"], c);
    assert_eq!(status["primary"].as_u64(), Some(primary), "{status}");
    assert_eq!(status["replicas"].as_array().unwrap().len(), 2, "{status}");
    ok(&["volume", "show", "v1"], c);
    ok(&["volume", "list"], c);

    // Bad input: one clear line and a non-zero exit, before anything is sent where possible.
    fails_with(&["volume", "show", "nosuch"], c, 1, "not found");
    fails_with(&["volume", "create", "bad", "--size", "1000"], c, 1, "not a multiple of the block size");
    fails_with(
        &["volume", "write", "v1", "--offset", "1", "--pattern", "0x01", "--length", "4096"],
        c,
        1,
        "not aligned",
    );
    fails_with(&["volume", "read", "v1", "--offset", "8MiB", "--length", "4096"], c, 1, "past the end");
    fails_with(&["volume", "delete", "v1"], c, 1, "--yes");
    fails_with(&["volume", "resize", "v1", "--size", "4MiB"], c, 1, "--yes");
    let odd = tmp.path().join("odd.bin");
    std::fs::write(&odd, [1u8; 100]).unwrap();
    fails_with(&["volume", "write", "v1", "--offset", "0", "--file", odd.to_str().unwrap()], c, 1, "pad it");
    fails_with(&["snapshot", "verify", "v1", "nosuch"], c, 1, "not found");
    usage_error(&["volume", "create", "bad", "--size", "12X"], c, "invalid size \"12X\"");
    usage_error(&["volume", "corrupt", "v1", "--host", "nodeX", "--block", "0"], c, "invalid host");
    usage_error(&["volume", "write", "v1", "--offset", "0"], c, "--file");

    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
}
