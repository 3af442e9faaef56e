//! `havenctl migration plan | plans | plan-show | plan-watch | plan-cancel` and
//! `havenctl host drain | undrain`: group live-migration plans (C1) — a consistency group of VMs
//! moved together behind a recovery snapshot, failing back to it on any failure — and host
//! drain, which plans moving every running VM off a host.
//!
//! Plans are named by `plan-N`, `N` or name; hosts by `N` or `node-N`; VMs by name, `vm-N` or
//! `N`. `--wait` follows plans with progress bars (indicatif) and exits 1 unless they succeed.
//! This file only parses, calls the SDK and prints; the leader drives the plans.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use haven_client::plans::PlanSpec;
use haven_client::proto::plan::{
    FailBackMode, MigrationPlan, PlanSettings, PlanState, PlanVmPhase, MAX_PLAN_PARALLEL, MAX_PLAN_VMS,
};
use haven_client::proto::vm::{MigrationOptions, VmRecord};
use haven_client::proto::{NodeId, VmId};
use haven_client::HavenClient;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

use crate::output::Output;
use crate::units::{duration_text, number_and_unit};
use crate::vm::parse_millis;
use crate::volume::{human_bytes, parse_host};

// ---------------------------------------------------------------------------------------------
// Commands

/// Plan subcommands of `havenctl migration`.
#[derive(Subcommand)]
pub enum PlanCmd {
    /// Move a consistency group of running VMs (all on one host) to another host: the source
    /// pauses the group for a moment to take a recovery snapshot, the VMs live-migrate (up to
    /// --parallel at once), then the destination pauses and resumes the group together. On any
    /// failure the plan fails back: VMs that moved come home, or the whole group is restored at
    /// the source from the snapshot.
    #[command(after_help = "Examples:\n  havenctl migration plan --vms web1,web2,db --to node-3 --wait\n  \
        havenctl migration plan --vms vm-4,vm-5 --to 2 --parallel 1 --max-downtime 100ms --name tier2")]
    Plan(PlanArgs),
    /// List migration plans: state, hosts, how many VMs arrived, and why a plan failed back.
    Plans,
    /// Show a plan: its VMs, recovery snapshot, result and every step it took.
    #[command(
        name = "plan-show",
        after_help = "Example:\n  havenctl migration plan-show 3\n  \
        havenctl migration plan-show tier2 --json"
    )]
    PlanShow {
        /// Plan id (plan-N or N) or name.
        plan: String,
    },
    /// Follow a plan with progress bars until it ends (exit 1 unless it succeeds).
    #[command(name = "plan-watch")]
    PlanWatch {
        /// Plan id (plan-N or N) or name.
        plan: String,
    },
    /// Cancel a plan before its VMs have all arrived: it fails back and every VM runs at the
    /// source again.
    #[command(
        name = "plan-cancel",
        after_help = "Example:\n  havenctl migration plan-cancel 3 --reason \"maintenance postponed\""
    )]
    PlanCancel {
        /// Plan id (plan-N or N) or name.
        plan: String,
        /// Why (recorded in the plan).
        #[arg(long, default_value = "cancelled by the operator")]
        reason: String,
        /// Follow the fail-back until it ends.
        #[arg(long)]
        wait: bool,
    },
}

/// How plans move VMs (shared by `migration plan` and `host drain`).
#[derive(Args)]
pub struct PlanTuning {
    /// Most VMs migrating at once (1-16).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=MAX_PLAN_PARALLEL as i64))]
    parallel: u32,
    /// Longest pause to accept for each VM's final stop-and-copy (e.g. 50ms, 1s, or milliseconds).
    #[arg(long, visible_alias = "max-downtime-ms", default_value = "300ms", value_parser = parse_millis)]
    max_downtime: u64,
    /// Do not slow a guest down when its writes outpace the copy (a VM that cannot converge
    /// then fails the plan back).
    #[arg(long)]
    no_auto_converge: bool,
    /// Fail back if the VMs have not all arrived this long after the plan was made (e.g. 90s,
    /// 10m, 1h, or milliseconds).
    #[arg(long, default_value = "10m", value_parser = parse_timeout)]
    timeout: u64,
    /// Follow the plan(s) with progress bars until they end (exit 1 unless all succeed).
    #[arg(long)]
    wait: bool,
}

impl PlanTuning {
    fn settings(&self) -> PlanSettings {
        PlanSettings {
            max_parallel: self.parallel,
            options: MigrationOptions {
                max_downtime_ms: self.max_downtime,
                auto_converge: !self.no_auto_converge,
                ..MigrationOptions::default()
            },
            timeout_ms: self.timeout,
        }
    }
}

#[derive(Args)]
pub struct PlanArgs {
    /// The VMs to move together, comma separated (names, vm-N or N); all on one host.
    #[arg(long, value_delimiter = ',', required = true, num_args = 1..)]
    vms: Vec<String>,
    /// Destination host (N or node-N).
    #[arg(long, value_parser = parse_host)]
    to: NodeId,
    /// A name for the plan (letters, digits, '-', '_', '.'; default plan-N).
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    tuning: PlanTuning,
}

/// Drain subcommands of `havenctl host`.
#[derive(Subcommand)]
pub enum HostDrainCmd {
    /// Mark a host draining (no VM is placed on or migrated to it) and plan moving every
    /// running VM off it, grouped by destination (hosts with the most free memory first). VMs
    /// that cannot move (not running, already in a plan, no room anywhere) are listed.
    #[command(
        after_help = "Examples:\n  havenctl host drain node-2 --wait\n  havenctl host drain 2 --parallel 1 --json"
    )]
    Drain {
        /// Host to empty (N or node-N).
        #[arg(value_parser = parse_host)]
        host: NodeId,
        #[command(flatten)]
        tuning: PlanTuning,
    },
    /// Clear a host's draining mark: it takes VMs again. Plans under way keep going.
    Undrain {
        /// Host (N or node-N).
        #[arg(value_parser = parse_host)]
        host: NodeId,
    },
}

/// `90s`, `10m`, `1h`, `500ms` or bare milliseconds; at least one second.
fn parse_timeout(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid timeout {s:?}: expected e.g. 90s, 10m, 1h or milliseconds");
    let (n, unit) = number_and_unit(s).ok_or_else(bad)?;
    let ms = match unit.trim() {
        "" | "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" | "min" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(bad()),
    }
    .ok_or_else(bad)?;
    if ms < 1000 {
        return Err(format!("timeout {s:?} is too short: at least 1s"));
    }
    Ok(ms)
}

// ---------------------------------------------------------------------------------------------
// Formatting

fn vm_list(vms: &[VmId]) -> String {
    vms.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")
}

fn arrived(p: &MigrationPlan) -> usize {
    p.progress.iter().filter(|v| v.phase == PlanVmPhase::Arrived).count()
}

fn fail_back_text(m: FailBackMode) -> &'static str {
    match m {
        FailBackMode::NothingMoved => "no VM had left the source",
        FailBackMode::MigratedBack => "the VMs that had moved were live-migrated back",
        FailBackMode::RestoredFromSnapshot => "the whole group was restored from the recovery snapshot",
    }
}

fn outcome_text(p: &MigrationPlan) -> String {
    match p.state {
        PlanState::Succeeded => format!(
            "plan {} ({}) succeeded: {} now run on {}; group consistency restored (resumed within {} ms)",
            p.id,
            p.name,
            vm_list(&p.vms),
            p.to,
            p.resume_spread_ms.map_or("?".into(), |s| s.to_string())
        ),
        PlanState::FailedBack => format!(
            "plan {} ({}) failed back: {}; {} run on {} again ({})",
            p.id,
            p.name,
            p.failure.as_deref().unwrap_or("no reason recorded"),
            vm_list(&p.vms),
            p.from,
            p.fail_back.map_or("", fail_back_text)
        ),
        s => format!("plan {} ({}) is {s}", p.id, p.name),
    }
}

fn detail(p: &MigrationPlan) -> String {
    match p.state {
        PlanState::Succeeded => {
            format!("resumed within {} ms", p.resume_spread_ms.map_or("?".into(), |s| s.to_string()))
        }
        PlanState::FailingBack | PlanState::FailedBack => {
            let how = p.fail_back.map(|m| format!(" ({})", fail_back_text(m))).unwrap_or_default();
            format!("{}{how}", p.failure.as_deref().unwrap_or("-"))
        }
        _ => p.steps.last().map(|s| s.note.clone()).unwrap_or_default(),
    }
}

fn plan_json(p: &MigrationPlan) -> anyhow::Result<Value> {
    let mut v = serde_json::to_value(p)?;
    v["arrived"] = json!(arrived(p));
    v["final"] = json!(p.state.is_terminal());
    Ok(v)
}

fn check_success(plans: &[MigrationPlan]) -> anyhow::Result<()> {
    let failed: Vec<String> = plans
        .iter()
        .filter(|p| p.state != PlanState::Succeeded)
        .map(|p| format!("plan {} {}: {}", p.id, p.state, p.failure.as_deref().unwrap_or("no reason recorded")))
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(anyhow!("{}", failed.join("; ")))
    }
}

// ---------------------------------------------------------------------------------------------
// Handlers

type ClientFn<'a> = &'a dyn Fn() -> anyhow::Result<HavenClient>;

pub async fn plan(cmd: PlanCmd, client: ClientFn<'_>, out: &Output) -> anyhow::Result<()> {
    let c = client()?;
    match cmd {
        PlanCmd::Plan(a) => {
            if a.vms.len() > MAX_PLAN_VMS {
                bail!("a plan holds at most {MAX_PLAN_VMS} VMs; {} given", a.vms.len());
            }
            let spec = PlanSpec { name: a.name.clone(), vms: a.vms.clone(), to: a.to, settings: a.tuning.settings() };
            let p = c.create_plan(&spec).await.context("planning the migration")?;
            if a.tuning.wait {
                if !out.is_json() {
                    println!("plan {} ({}): moving {} from {} to {}", p.id, p.name, vm_list(&p.vms), p.from, p.to);
                }
                let done = follow(&c, vec![p.id], out).await?;
                finish(&done, out)?;
            } else {
                out.done(
                    &format!(
                        "plan {} ({}) created: moving {} from {} to {}, up to {} at once; follow it with \
                         `havenctl migration plan-watch {}`",
                        p.id,
                        p.name,
                        vm_list(&p.vms),
                        p.from,
                        p.to,
                        p.max_parallel,
                        p.id
                    ),
                    plan_json(&p)?,
                );
            }
        }
        PlanCmd::Plans => {
            let plans = c.plans().await?;
            out.table(
                &["plan", "name", "state", "from", "to", "arrived", "details"],
                plans
                    .iter()
                    .map(|p| {
                        vec![
                            p.id.to_string(),
                            p.name.clone(),
                            p.state.to_string(),
                            p.from.to_string(),
                            p.to.to_string(),
                            format!("{}/{}", arrived(p), p.vms.len()),
                            detail(p),
                        ]
                    })
                    .collect(),
                Value::Array(plans.iter().map(plan_json).collect::<anyhow::Result<_>>()?),
            );
        }
        PlanCmd::PlanShow { plan } => {
            let p = c.plan(&plan).await?;
            show(&c, &p, out).await?;
        }
        PlanCmd::PlanWatch { plan } => {
            let p = c.plan(&plan).await?;
            let done = follow(&c, vec![p.id], out).await?;
            finish(&done, out)?;
        }
        PlanCmd::PlanCancel { plan, reason, wait } => {
            let p = c.plan(&plan).await?;
            let p = c.cancel_plan(p.id, &reason).await?;
            if wait {
                let done = follow(&c, vec![p.id], out).await?;
                out.done(&outcome_text(&done[0]), plan_json(&done[0])?);
            } else {
                out.done(
                    &format!(
                        "plan {} ({}) cancelled: failing back to {}; follow it with `havenctl migration plan-watch {}`",
                        p.id, p.name, p.from, p.id
                    ),
                    plan_json(&p)?,
                );
            }
        }
    }
    Ok(())
}

pub async fn host(cmd: HostDrainCmd, client: ClientFn<'_>, out: &Output) -> anyhow::Result<()> {
    let c = client()?;
    match cmd {
        HostDrainCmd::Drain { host, tuning } => {
            let report = c.drain_host(host, tuning.settings()).await.with_context(|| format!("draining {host}"))?;
            let mut lines = vec![format!(
                "{host} is draining: {} plan{}",
                report.plans.len(),
                if report.plans.len() == 1 { "" } else { "s" }
            )];
            for p in &report.plans {
                lines.push(format!("  plan {} ({}) → {}: {}", p.id, p.name, p.to, vm_list(&p.vms)));
            }
            for s in &report.skipped {
                lines.push(format!("  left on {host}: {} ({})", s.vm, s.reason));
            }
            let mut machine = serde_json::to_value(&report)?;
            if !tuning.wait {
                out.done(&lines.join("\n"), machine);
                return Ok(());
            }
            out.headline(&lines.join("\n"));
            let done = follow(&c, report.plans.iter().map(|p| p.id).collect(), out).await?;
            if out.is_json() {
                machine["plans"] = Value::Array(done.iter().map(plan_json).collect::<anyhow::Result<_>>()?);
                out.done("", machine);
                return check_success(&done);
            }
            finish(&done, out)?;
        }
        HostDrainCmd::Undrain { host } => {
            c.undrain_host(host).await.with_context(|| format!("undraining {host}"))?;
            out.done(&format!("{host} takes VMs again"), json!({"host": host, "draining": false}));
        }
    }
    Ok(())
}

/// Print the final plans (JSON: one object, or an array for several) and fail unless all
/// succeeded.
fn finish(done: &[MigrationPlan], out: &Output) -> anyhow::Result<()> {
    if out.is_json() {
        let v = if done.len() == 1 {
            plan_json(&done[0])?
        } else {
            Value::Array(done.iter().map(plan_json).collect::<anyhow::Result<_>>()?)
        };
        out.done("", v);
    } else {
        for p in done {
            println!("{}", outcome_text(p));
        }
    }
    check_success(done)
}

async fn show(c: &HavenClient, p: &MigrationPlan, out: &Output) -> anyhow::Result<()> {
    if out.is_json() {
        out.value("", plan_json(p)?);
        return Ok(());
    }
    let names: BTreeMap<VmId, String> =
        c.vms().await.map(|v: Vec<VmRecord>| v.into_iter().map(|r| (r.id, r.name)).collect()).unwrap_or_default();
    out.headline(&format!(
        "plan {} ({}): {} from {} to {}, {}up to {} at once, max downtime {} ms{}, timeout {}",
        p.id,
        p.name,
        p.state,
        p.from,
        p.to,
        if p.drain { "host drain, " } else { "" },
        p.max_parallel,
        p.options.max_downtime_ms,
        if p.options.auto_converge { "" } else { " (no auto-converge)" },
        duration_text(p.timeout_ms)
    ));
    match p.state {
        PlanState::Succeeded | PlanState::FailedBack => out.headline(&outcome_text(p)),
        PlanState::FailingBack => {
            out.headline(&format!("failing back: {}", p.failure.as_deref().unwrap_or("no reason recorded")))
        }
        _ => {}
    }
    if let Some(r) = &p.recovery {
        let bytes: u64 = r.images.iter().map(|i| i.bytes).sum();
        out.headline(&format!(
            "recovery snapshot on {}: {} images, {}, group paused {} ms{}",
            r.host,
            r.images.len(),
            human_bytes(bytes),
            r.paused_ms,
            if p.recovery_released { " (deleted)" } else { "" }
        ));
    }
    if let Some(d) = p.driver {
        out.headline(&format!("driven by {d} (term {})", p.driver_term));
    }
    out.table(
        &["vm", "name", "phase", "recovery point (write seq)", "note"],
        p.progress
            .iter()
            .map(|v| {
                vec![
                    v.vm.to_string(),
                    names.get(&v.vm).cloned().unwrap_or_else(|| "(deleted)".into()),
                    v.phase.as_str().into(),
                    p.image(v.vm).map_or("-".into(), |i| i.last_seq.to_string()),
                    v.note.clone().unwrap_or_default(),
                ]
            })
            .collect(),
        Value::Null,
    );
    if p.steps_dropped > 0 {
        out.headline(&format!("({} older steps not kept)", p.steps_dropped));
    }
    out.table(
        &["at", "state", "step"],
        p.steps
            .iter()
            .map(|s| {
                vec![
                    format!("+{}", duration_text(s.at_ms.saturating_sub(p.created_at_ms))),
                    s.state.to_string(),
                    s.note.clone(),
                ]
            })
            .collect(),
        Value::Null,
    );
    Ok(())
}

/// Follow plans until each ends, with a bar per plan (VMs arrived) and one per VM in flight
/// (bytes copied). Returns the final plans in the order given.
async fn follow(c: &HavenClient, ids: Vec<u64>, out: &Output) -> anyhow::Result<Vec<MigrationPlan>> {
    let multi = MultiProgress::with_draw_target(if out.is_json() {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    });
    let plan_style = ProgressStyle::with_template("{spinner} plan {prefix} [{bar:20}] {pos}/{len} VMs {msg}")
        .expect("static template")
        .progress_chars("=> ");
    let vm_style = ProgressStyle::with_template("    {prefix} [{bar:30}] {bytes}/{total_bytes} {msg}")
        .expect("static template")
        .progress_chars("=> ");
    let mut bars: BTreeMap<u64, ProgressBar> = BTreeMap::new();
    let mut vm_bars: BTreeMap<VmId, ProgressBar> = BTreeMap::new();
    let mut done: BTreeMap<u64, MigrationPlan> = BTreeMap::new();
    let mut failures = 0u32;
    let deadline_slack = Duration::from_secs(120);
    let started = std::time::Instant::now();
    while done.len() < ids.len() {
        for id in &ids {
            if done.contains_key(id) {
                continue;
            }
            let p = match c.plan(&id.to_string()).await {
                Ok(p) => {
                    failures = 0;
                    p
                }
                Err(e) => {
                    failures += 1;
                    if failures > 50 {
                        multi.clear().ok();
                        return Err(anyhow::Error::new(e).context(format!("following plan {id}")));
                    }
                    multi.println(format!("(plan {id} unavailable: {e}; retrying)")).ok();
                    continue;
                }
            };
            let bar = bars.entry(*id).or_insert_with(|| {
                let b = multi.add(ProgressBar::new(p.vms.len() as u64));
                b.set_style(plan_style.clone());
                b.set_prefix(format!("{} ({})", p.id, p.name));
                b.enable_steady_tick(Duration::from_millis(120));
                b
            });
            bar.set_position(arrived(&p) as u64);
            bar.set_message(format!("{}: {}", p.state, p.steps.last().map(|s| s.note.as_str()).unwrap_or("")));
            // One bar per VM while it migrates (forward or back).
            for v in &p.progress {
                let moving =
                    matches!(v.phase, PlanVmPhase::Migrating | PlanVmPhase::Returning) && !p.state.is_terminal();
                if !moving {
                    if let Some(b) = vm_bars.remove(&v.vm) {
                        b.finish_and_clear();
                        multi.remove(&b);
                    }
                    continue;
                }
                let b = vm_bars.entry(v.vm).or_insert_with(|| {
                    let b = multi.add(ProgressBar::new(0));
                    b.set_style(vm_style.clone());
                    b.set_prefix(v.vm.to_string());
                    b
                });
                if let Ok(r) = c.migration_progress(v.vm).await {
                    b.set_length(r.bytes_sent + r.bytes_remaining);
                    b.set_position(r.bytes_sent);
                    b.set_message(format!("{} round {}, throttle {}%", r.phase, r.round, r.throttle_percent));
                }
            }
            if p.state.is_terminal() {
                bar.finish_with_message(format!("{}", p.state));
                done.insert(*id, p);
            } else if started.elapsed() > Duration::from_millis(p.timeout_ms) + deadline_slack {
                multi.clear().ok();
                bail!(
                    "plan {id} is still {} long after its timeout; the leader keeps driving it \
                     (see `havenctl migration plan-show {id}`)",
                    p.state
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for b in vm_bars.values() {
        b.finish_and_clear();
    }
    multi.clear().ok();
    Ok(ids.iter().filter_map(|id| done.remove(id)).collect())
}

#[cfg(test)]
mod tests {
    use haven_client::proto::plan::DEFAULT_PLAN_TIMEOUT_MS;

    use super::*;

    #[test]
    fn timeouts_parse() {
        assert_eq!(parse_timeout("90s"), Ok(90_000));
        assert_eq!(parse_timeout("10m"), Ok(600_000));
        assert_eq!(parse_timeout("1h"), Ok(3_600_000));
        assert_eq!(parse_timeout("5000"), Ok(5000));
        assert!(parse_timeout("500ms").unwrap_err().contains("too short"));
        assert!(parse_timeout("soon").unwrap_err().contains("invalid timeout"));
        assert_eq!(DEFAULT_PLAN_TIMEOUT_MS, parse_timeout("10m").unwrap());
    }
}
