//! The chaos harness end to end, through `havenctl chaos run`: the CI scenario passes every
//! checker, the deliberately broken cluster is caught, bad scenario files are refused with the
//! field named, a replicated block volume keeps every acknowledged write through primary kills
//! and link faults, user operations on a volume (snapshot, rollback, clone, resize, DR
//! relationships) keep their promises under faults, HA pairs fail over with nothing acknowledged
//! lost and one primary at a time while a shared dataset converges, and (when a Docker engine is
//! present) the compose cluster survives a kill.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_haven-chaos")).parent().unwrap().to_path_buf()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn havenctl(args: &[&str]) -> Output {
    let dir = bin_dir();
    Command::new(dir.join("havenctl"))
        .args(args)
        .env("HAVEN_CHAOS_BIN", env!("CARGO_BIN_EXE_haven-chaos"))
        .env("HAVEN_NODE_BIN", dir.join("haven-node"))
        .current_dir(repo())
        .output()
        .expect("running havenctl")
}

fn run_scenario(name: &str, out: &Path) -> (Output, serde_json::Value) {
    let scenario = repo().join("chaos/scenarios").join(name);
    let out_s = out.to_str().unwrap();
    let o = havenctl(&["--json", "chaos", "run", scenario.to_str().unwrap(), "--out", out_s]);
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap_or_default())
        .unwrap_or_else(|e| panic!("{name}: no report ({e}); stderr: {}", String::from_utf8_lossy(&o.stderr)));
    (o, report)
}

fn checker<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["checkers"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap()
}

#[test]
fn smoke_scenario_passes_every_checker() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, report) = run_scenario("smoke.toml", &tmp.path().join("run"));
    let summary = std::fs::read_to_string(tmp.path().join("run/summary.txt")).unwrap();
    assert!(o.status.success(), "smoke run failed:\n{summary}\n{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(report["passed"], true);
    let faults = report["faults"].as_array().unwrap();
    assert!(faults.iter().filter(|f| f["skipped"].is_null()).count() >= 4, "{summary}");
    assert!(report["operations"]["ok"].as_u64().unwrap() > 100, "{summary}");
    for name in ["heals", "linearizable", "acknowledged-writes"] {
        assert_eq!(checker(&report, name)["passed"], true, "{summary}");
    }
    assert!(report["failover_ms"]["samples"].as_u64().unwrap() >= 2, "{summary}");
    assert!(report["replay"].as_str().unwrap().contains("--seed 1"));
    let svg = std::fs::read_to_string(tmp.path().join("run/timeline.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "timeline is an SVG");
}

#[test]
fn volume_keeps_every_acknowledged_block_through_primary_kills() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, report) = run_scenario("volume-faults.toml", &tmp.path().join("run"));
    let summary = std::fs::read_to_string(tmp.path().join("run/summary.txt")).unwrap();
    assert!(o.status.success(), "volume-faults run failed:\n{summary}\n{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(report["passed"], true, "{summary}");
    for name in
        ["heals", "acknowledged-blocks", "fresh-block-reads", "replicas-in-sync", "linearizable", "acknowledged-writes"]
    {
        assert_eq!(checker(&report, name)["passed"], true, "{name}: {summary}");
    }
    let acked = report["block_writes"]["ok"].as_u64().unwrap();
    assert!(acked > 0, "no block write was acknowledged:\n{summary}");
    let check = &report["blocks"]["check"];
    assert_eq!(check["acknowledged_writes"].as_u64(), Some(acked), "{summary}");
    assert_eq!(check["blocks_checked"].as_u64(), Some(4 * 64), "{summary}");
    assert!(check["violations"].as_array().unwrap().is_empty(), "{summary}");
    let kills: Vec<&serde_json::Value> =
        report["faults"].as_array().unwrap().iter().filter(|f| f["kind"] == "kill" && f["skipped"].is_null()).collect();
    assert!(kills.iter().any(|f| f["hit_volume_primary"] == true), "no kill hit the volume's primary:\n{summary}");
    assert!(summary.contains("block writes:") && summary.contains("(volume primary)"), "{summary}");
    println!("{summary}");
}

/// Issue 11, race 4: the volume's primary isolated three times for 6 s while writers read their
/// blocks back through every node; no read may be older than an acknowledged write. (With the
/// read-lease check disabled, seed 11 fails `fresh-block-reads` with three stale reads.)
#[test]
fn reads_through_an_isolated_primary_are_never_stale() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, report) = run_scenario("volume-reads.toml", &tmp.path().join("run"));
    let summary = std::fs::read_to_string(tmp.path().join("run/summary.txt")).unwrap();
    assert!(o.status.success(), "volume-reads run failed:\n{summary}\n{}", String::from_utf8_lossy(&o.stderr));
    let fresh = checker(&report, "fresh-block-reads");
    assert_eq!(fresh["passed"], true, "{summary}");
    let reads: u64 = fresh["summary"].as_str().unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(reads > 100, "too few reads during the run to judge:\n{summary}");
    let isolations = report["faults"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "isolate" && f["hit_volume_primary"] == true)
        .count();
    assert_eq!(isolations, 3, "every isolation must hit the volume's primary:\n{summary}");
    println!("{summary}");
}

#[test]
fn vms_migrate_under_host_and_link_faults_and_run_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, report) = run_scenario("vm-migrations.toml", &tmp.path().join("run"));
    let summary = std::fs::read_to_string(tmp.path().join("run/summary.txt")).unwrap();
    assert!(o.status.success(), "vm-migrations run failed:\n{summary}\n{}", String::from_utf8_lossy(&o.stderr));
    for name in ["heals", "vm-runs-once", "vm-data", "migrations", "linearizable"] {
        assert_eq!(checker(&report, name)["passed"], true, "{name}: {summary}");
    }
    assert!(report["migrations"]["ok"].as_u64().unwrap() > 0, "{summary}");
    assert!(report["vms"]["sightings"].as_u64().unwrap() > 0, "the sampler saw nothing:\n{summary}");
    let vms = report["vms"]["final_vms"].as_array().unwrap();
    assert_eq!(vms.len(), 3, "{summary}");
    assert!(vms.iter().all(|v| v["migrating_to"].is_null()), "{summary}");
    println!("{summary}");
}

/// HA pairs (one redundant, one multi-operation) under a kill of the first pair's primary host, an
/// isolation of its primary and a link delay, with application puts throughout, and one share
/// written at every member: nothing acknowledged is lost, one primary at a time, the guests' data
/// checks out, the killed primary's pair failed over, and every member's copy converges.
#[test]
fn ha_pairs_fail_over_with_nothing_acknowledged_lost_and_shares_converge() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, report) = run_scenario("ha-pairs.toml", &tmp.path().join("run"));
    let summary = std::fs::read_to_string(tmp.path().join("run/summary.txt")).unwrap();
    println!("{summary}");
    for name in
        ["heals", "ha-acked-updates", "ha-single-primary", "ha-data", "ha-failovers", "share-converged", "linearizable"]
    {
        assert_eq!(checker(&report, name)["passed"], true, "{name}: {summary}");
    }
    assert!(o.status.success(), "ha-pairs run failed:\n{summary}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(report["app_puts"]["ok"].as_u64().unwrap() > 100, "too few acknowledged puts:\n{summary}");
    assert!(report["share_puts"]["ok"].as_u64().unwrap() > 0, "{summary}");
    let faults = report["faults"].as_array().unwrap();
    let kill = faults.iter().find(|f| f["kind"] == "kill").unwrap();
    assert!(kill["skipped"].is_null() && kill["hit_ha_primary"].as_array().is_some_and(|v| !v.is_empty()), "{summary}");
    let vms = report["ha"]["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 2, "{summary}");
    assert!(report["ha"]["observations"]["sightings"].as_array().unwrap().len() > 100, "{summary}");
}

/// Snapshots, rollbacks, clones, resizes and DR relationship create/pause/resume/reverse/delete
/// under kills, cuts and delays: every read-back holds what the operations promise.
#[test]
fn volume_operations_keep_their_promises_under_faults() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, report) = run_scenario("volume-operations.toml", &tmp.path().join("run"));
    let summary = std::fs::read_to_string(tmp.path().join("run/summary.txt")).unwrap();
    println!("{summary}");
    for name in ["heals", "operation-data", "operation-catalog", "linearizable", "acknowledged-writes"] {
        assert_eq!(checker(&report, name)["passed"], true, "{name}: {summary}");
    }
    assert!(o.status.success(), "volume-operations run failed:\n{summary}\n{}", String::from_utf8_lossy(&o.stderr));
    let check = &report["operations_workload"]["check"];
    let ok = |op: &str| check["operations"][op]["ok"].as_u64().unwrap_or(0);
    assert!(ok("snapshot") > 0 && ok("read") > 0, "{summary}");
    assert!(check["reads_judged"].as_u64().unwrap() > 0, "{summary}");
    assert!(check["writes"]["ok"].as_u64().unwrap() > 0, "{summary}");
    let kills: Vec<&serde_json::Value> =
        report["faults"].as_array().unwrap().iter().filter(|f| f["kind"] == "kill" && f["skipped"].is_null()).collect();
    assert!(kills.iter().any(|f| f["hit_volume_primary"] == true), "no kill hit the volume's primary:\n{summary}");
}

#[test]
fn acknowledging_before_commit_is_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, report) = run_scenario("broken-ack.toml", &tmp.path().join("run"));
    let summary = std::fs::read_to_string(tmp.path().join("run/summary.txt")).unwrap();
    assert_eq!(o.status.code(), Some(1), "a failed checker exits 1:\n{summary}");
    assert_eq!(report["passed"], false);
    let lost = checker(&report, "acknowledged-writes");
    let lin = checker(&report, "linearizable");
    assert!(lost["passed"] == false || lin["passed"] == false, "{summary}");
    // The offending operations are shown.
    assert!(summary.contains("FAIL") && summary.contains("invoked"), "{summary}");
}

#[test]
fn bad_scenario_files_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            "unknown kind",
            "name='x'\nduration='5s'\n[cluster]\nbackend='local'\n[[faults]]\nat='1s'\nkind='meteor'\n",
            "kind='meteor'",
        ),
        ("negative duration", "name='x'\nduration='-5s'\n[cluster]\nbackend='local'\n", "duration='-5s'"),
        ("missing backend", "name='x'\nduration='5s'\n[cluster]\nnodes=3\n", "backend"),
        ("missing duration", "name='x'\n[cluster]\nbackend='local'\n", "duration"),
        (
            "fault after the end",
            "name='x'\nduration='5s'\n[cluster]\nbackend='local'\n[[faults]]\nat='9s'\nkind='kill'\n",
            "faults[0].at",
        ),
        (
            "block replicas",
            "name='x'\nduration='5s'\n[cluster]\nbackend='local'\n[blocks]\nreplicas=4\n",
            "blocks.replicas",
        ),
        (
            "block size unit",
            "name='x'\nduration='5s'\n[cluster]\nbackend='local'\n[blocks]\nvolume_size='16MB'\n",
            "volume_size='16MB'",
        ),
        (
            "volume primary without blocks",
            "name='x'\nduration='5s'\n[cluster]\nbackend='local'\n[[faults]]\nat='1s'\nkind='kill'\ntarget='volume_primary'\n",
            "faults[0].target",
        ),
        (
            "HA primary without [ha]",
            "name='x'\nduration='5s'\n[cluster]\nbackend='local'\n[[faults]]\nat='1s'\nkind='kill'\ntarget='ha_primary'\n",
            "[ha]",
        ),
        (
            "HA epoch",
            "name='x'\nduration='5s'\n[cluster]\nbackend='local'\n[ha]\nepoch_ms=1\n",
            "ha.epoch_ms",
        ),
        (
            "compose with a delay",
            "name='x'\nduration='5s'\n[cluster]\nbackend='compose'\n[[faults]]\nat='1s'\nkind='delay'\n",
            "local backend",
        ),
    ];
    for (what, text, needle) in cases {
        let path = tmp.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let o =
            havenctl(&["chaos", "run", path.to_str().unwrap(), "--out", tmp.path().join("never").to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{what}: {err}");
        assert!(err.contains(needle), "{what}: expected {needle:?} in {err}");
        assert!(!tmp.path().join("never/cluster").exists(), "{what}: nothing may start");
    }
}

#[test]
fn compose_cluster_survives_a_container_kill() {
    let docker = Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]).output();
    let compose = Command::new("docker-compose").arg("version").output();
    match (&docker, &compose) {
        (Ok(d), Ok(c)) if d.status.success() && c.status.success() => {}
        _ => {
            println!("SKIPPED compose_cluster_survives_a_container_kill: no Docker engine or docker-compose here");
            return;
        }
    }
    let built = Command::new(repo().join("scripts/docker-image")).output().expect("scripts/docker-image");
    assert!(built.status.success(), "image build failed: {}", String::from_utf8_lossy(&built.stderr));
    let tmp = tempfile::tempdir().unwrap();
    let (o, report) = run_scenario("compose.toml", &tmp.path().join("run"));
    let summary = std::fs::read_to_string(tmp.path().join("run/summary.txt")).unwrap_or_default();
    assert!(o.status.success(), "compose run failed:\n{summary}\n{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(report["passed"], true, "{summary}");
}
