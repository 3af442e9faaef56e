//! `plan_bench`: group live migration (C1) on a real 3-node local cluster: a consistency group of
//! running guests moved by one migration plan (recovery snapshot, parallel migrations, group
//! consolidation at the destination), beside the baseline of migrating the same guests one by
//! one with single live migrations, measured in the same run.
//!
//! Per run and mode: total time, the spread between the first and the last VM resuming at the
//! destination (the plan's consolidation resumes the group together; single migrations resume
//! each VM when its own migration ends), each VM's downtime, and for the plan its recovery
//! snapshot step (pre-copy into shadows while the group runs, then the group's pause, which is
//! shown apart) and consolidation pause. Runs alternate direction (host A → B, then B → A), so the
//! same guests are reused. Target: first-to-last resume within 100 ms in a group plan.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use haven_benches::cluster::{ClusterFlags, RunningCluster};
use haven_benches::latency::max_of;
use haven_benches::{Cell, Report, Table, TargetCheck};
use haven_client::plans::PlanSpec;
use haven_client::proto::plan::{PlanSettings, PlanState};
use haven_client::proto::vm::{MigrationOptions, VmRunState};
use haven_client::proto::{NodeId, VmId};
use haven_client::vms::VmSpec;
use haven_client::HavenClient;

/// First-to-last resume at the destination in a group plan.
const TARGET_SPREAD_MS: f64 = 100.0;

#[derive(Parser, Debug)]
#[command(about = "Group live migration (plan) vs one-by-one single migrations on a local 3-node cluster")]
struct Args {
    /// VMs in the group.
    #[arg(long, default_value_t = 3)]
    vms: usize,
    /// Guest memory in MiB (default 128; 32 with --quick).
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Page writes per second of each guest's workload.
    #[arg(long, default_value_t = 1000)]
    dirty_rate: u64,
    /// Plans (and baseline rounds) to run (default 3; 1 with --quick).
    #[arg(long)]
    runs: Option<usize>,
    /// Most VMs a plan migrates at once.
    #[arg(long, default_value_t = 3)]
    parallel: u32,
    #[command(flatten)]
    cluster: ClusterFlags,
    #[command(flatten)]
    run: haven_benches::report::RunFlags,
}

/// One mode's figures for one run.
struct Moved {
    total_ms: f64,
    spread_ms: Option<f64>,
    downtimes_ms: Vec<f64>,
    snapshot_ms: Option<f64>,
    snapshot_pause_ms: Option<f64>,
    consolidation_pause_ms: Option<f64>,
}

async fn wait_running(client: &HavenClient, vm: VmId, on: NodeId) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = client.vm_status(vm).await {
            if s.host == on && s.state == "running" && s.writes > 0 {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{vm} is not running on {on}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Baseline: single live migrations of `vms`, one after another, to `to`.
async fn one_by_one(client: &HavenClient, vms: &[VmId], to: NodeId) -> anyhow::Result<Moved> {
    let started = Instant::now();
    let mut resumed = Vec::new();
    let mut downtimes = Vec::new();
    for &vm in vms {
        client.migrate_vm(vm, to, MigrationOptions::default()).await.with_context(|| format!("migrating {vm}"))?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let report = loop {
            if let Ok(r) = client.migration_progress(vm).await {
                if r.to == Some(to) && matches!(r.phase.as_str(), "done" | "failed" | "cancelled") {
                    break r;
                }
            }
            if Instant::now() > deadline {
                bail!("migration of {vm} did not end");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if report.phase != "done" {
            bail!("migration of {vm} ended {}: {:?}", report.phase, report.reason);
        }
        resumed.push(started.elapsed());
        downtimes.push(report.downtime_ms.unwrap_or(0) as f64);
        wait_running(client, vm, to).await?;
    }
    let spread = resumed.last().zip(resumed.first()).map(|(l, f)| (*l - *f).as_secs_f64() * 1e3);
    Ok(Moved {
        total_ms: started.elapsed().as_secs_f64() * 1e3,
        spread_ms: spread,
        downtimes_ms: downtimes,
        snapshot_ms: None,
        snapshot_pause_ms: None,
        consolidation_pause_ms: None,
    })
}

/// The group as one plan to `to`.
async fn as_plan(client: &HavenClient, vms: &[VmId], to: NodeId, parallel: u32) -> anyhow::Result<Moved> {
    let started = Instant::now();
    let spec = PlanSpec {
        name: None,
        vms: vms.iter().map(|v| v.0.to_string()).collect(),
        to,
        settings: PlanSettings { max_parallel: parallel, ..PlanSettings::default() },
    };
    let plan = client.create_plan(&spec).await.context("creating the plan")?;
    let done = client.wait_plan(plan.id, Duration::from_secs(300), |_| {}).await.context("following the plan")?;
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    if done.state != PlanState::Succeeded {
        bail!("plan {} ended {:?}: {:?}", done.id, done.state, done.failure);
    }
    // Step times come from the proposers' clocks (all on this machine).
    let at = |s: PlanState| done.steps.iter().find(|st| st.state == s).map(|st| st.at_ms);
    let snapshot_ms =
        at(PlanState::Snapshotting).zip(at(PlanState::Migrating)).map(|(a, b)| b.saturating_sub(a) as f64);
    let mut downtimes = Vec::new();
    for &vm in vms {
        if let Ok(r) = client.migration_progress(vm).await {
            downtimes.push(r.downtime_ms.unwrap_or(0) as f64);
        }
    }
    Ok(Moved {
        total_ms,
        spread_ms: done.resume_spread_ms.map(|m| m as f64),
        downtimes_ms: downtimes,
        snapshot_ms,
        snapshot_pause_ms: done.recovery.as_ref().map(|r| r.paused_ms as f64),
        consolidation_pause_ms: done.consolidation_pause_ms.map(|m| m as f64),
    })
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args = Args::parse();
    haven_benches::report::exit_with("plan_bench", run(&args).await)
}

async fn run(args: &Args) -> anyhow::Result<i32> {
    let q = args.run.quick;
    let memory_mib = args.memory_mib.unwrap_or(if q { 32 } else { 128 }).max(1);
    let runs = args.runs.unwrap_or(if q { 1 } else { 3 }).max(1);
    let mut report = Report::new(
        "plan_bench",
        "Group live migration: one plan (recovery snapshot, parallel migrations, group consolidation) vs the same \
         VMs migrated one by one, on a local 3-node cluster",
    );
    report.param("vms", args.vms as u64);
    report.param("memory_mib", memory_mib);
    report.param("dirty_rate", args.dirty_rate);
    report.param("runs", runs as u64);
    report.param("parallel", args.parallel as u64);

    let (node_bin, scratch) = args.cluster.prepare("haven-plan-bench")?;
    let cluster = RunningCluster::start(scratch.path(), 3, &node_bin, args.cluster.election_timeout_ms()).await?;
    let client = cluster.cluster.client()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.vm_capacity().await.map(|c| c.len()).unwrap_or(0) < 3 {
        if Instant::now() > deadline {
            bail!("hosts never recorded their VM capacity");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (a, b) = (NodeId(cluster.ids[0]), NodeId(cluster.ids[1]));
    let mut vms = Vec::new();
    for i in 0..args.vms {
        let mut spec = VmSpec::new(format!("bench-{i}"), memory_mib);
        spec.dirty_pages_per_sec = args.dirty_rate;
        spec.host = Some(a);
        let v = client.create_vm(&spec).await.with_context(|| format!("creating bench-{i}"))?;
        client.set_vm_state(v.id, VmRunState::Running).await?;
        vms.push(v.id);
    }
    for &vm in &vms {
        wait_running(&client, vm, a).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut table = Table::new(
        format!(
            "{} VMs of {memory_mib} MiB, {} page writes/s each, on a 3-node local cluster (loopback QUIC)",
            args.vms, args.dirty_rate
        ),
        &[
            "mode",
            "run",
            "from -> to",
            "total ms",
            "first-to-last resume ms",
            "max downtime ms",
            "recovery snapshot ms",
            "group paused for it ms",
            "consolidation pause ms",
        ],
    );
    let mut spreads = Vec::new();
    let mut failed = false;
    let mut here = a;
    for run in 1..=runs {
        for plan in [false, true] {
            let there = if here == a { b } else { a };
            let mode = if plan { "group plan" } else { "baseline: one by one" };
            eprintln!("plan_bench: run {run}: {mode} {here} -> {there}");
            let moved = if plan {
                as_plan(&client, &vms, there, args.parallel).await
            } else {
                one_by_one(&client, &vms, there).await
            };
            match moved {
                Ok(m) => {
                    if plan {
                        if let Some(s) = m.spread_ms {
                            spreads.push(s);
                        }
                    }
                    table.row(vec![
                        Cell::text(mode),
                        Cell::int(run as u64),
                        Cell::text(format!("{here} -> {there}")),
                        Cell::num(m.total_ms, 0),
                        Cell::opt(m.spread_ms, 0),
                        Cell::num(max_of(&m.downtimes_ms), 0),
                        Cell::opt(m.snapshot_ms, 0),
                        Cell::opt(m.snapshot_pause_ms, 0),
                        Cell::opt(m.consolidation_pause_ms, 0),
                    ]);
                    here = there;
                }
                Err(e) => {
                    eprintln!("plan_bench: {mode} failed: {e:#}");
                    report.note(format!("run {run} {mode} FAILED: {e:#}"));
                    failed = true;
                    table.row(vec![
                        Cell::text(format!("{mode} (FAILED)")),
                        Cell::int(run as u64),
                        Cell::text(format!("{here} -> {there}")),
                        Cell::text("-"),
                        Cell::text("-"),
                        Cell::text("-"),
                        Cell::text("-"),
                        Cell::text("-"),
                        Cell::text("-"),
                    ]);
                    // Where the VMs are now is unknown; stop here.
                    break;
                }
            }
        }
        if failed {
            break;
        }
    }
    report.tables.push(table);
    let worst = max_of(&spreads);
    report.targets.push(if spreads.is_empty() {
        TargetCheck {
            what: "first-to-last VM resume in a group plan".into(),
            target: "<= 100 ms".into(),
            measured: "not measured (no plan succeeded)".into(),
            met: false,
        }
    } else {
        TargetCheck::at_most(
            format!("first-to-last VM resume in a group plan (max of {} plans)", spreads.len()),
            worst,
            TARGET_SPREAD_MS,
            "ms",
            0,
        )
    });
    report.note(
        "first-to-last resume: the plan's consolidation resumes the whole group at the destination together \
         (recorded in the plan); one by one, each VM resumes when its own migration ends",
    );
    report.note("the nodes, the guests' workload threads and this process share this machine's 2 CPUs");
    let code = report.print(args.run.json, args.run.enforce_targets);
    Ok(if failed { 1 } else { code })
}
