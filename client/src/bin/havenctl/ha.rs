//! `havenctl ha`: HA pairs (C6). A pair keeps a standby copy of a VM on a second host so the
//! cluster can fail the VM over to it when the primary's host dies, without the outside ever
//! seeing an output the standby does not hold. This module owns the commands (create, list,
//! show, set-mode, delete), their `--mode` parsing and the pair and status tables.
//!
//! VMs are named by name, `vm-N` or `N`; hosts by `N` or `node-N`.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Subcommand, ValueEnum};
use haven_client::ha::STANDBY_READY;
use haven_client::proto::ha::{
    FailoverRecord, HaMode, HaPairRecord, HaVmStatus, PairState, MAX_EPOCH_MS, MIN_EPOCH_MS,
};
use haven_client::proto::vm::VmRecord;
use haven_client::proto::{NodeId, VmId};
use haven_client::{ClientError, HavenClient};
use serde_json::{json, Value};

use crate::output::Output;
use crate::units::duration_text;
use crate::volume::{human_bytes, parse_host};

/// The checkpoint epoch of redundant mode when `--epoch-ms` is not given.
const DEFAULT_EPOCH_MS: u32 = 50;
/// How long `ha show` waits for one host's status.
const STATUS_DEADLINE: Duration = Duration::from_secs(3);

/// What `--help` says about the two modes (shared by `ha` and its subcommands).
pub const MODES_HELP: &str = "Modes:\n  \
    redundant  The standby mirrors the VM's memory and device state as checkpoint epochs of\n             \
    --epoch-ms (default 50 ms) while its copy of the VM stays stopped. Every output of the\n             \
    guest (disk writes, application updates) is held until the standby acknowledged the\n             \
    epoch that holds it, so after a failover the standby resumes from a state consistent\n             \
    with everything the outside saw. Costs a short pause per epoch and about one epoch of\n             \
    output latency; protects the whole guest.\n  \
    multi-op   Multi-operation: the standby's VM runs too, and the application's state (the\n             \
    key-value document of `vm app-put`) is mirrored update by update; each update is\n             \
    acknowledged once the standby applied it. No checkpoint pauses, but only the\n             \
    application's state is protected, and a VM that writes its disks cannot use it.\n\n\
    Failover is automatic: when the primary's host stops answering, the leader promotes the\n\
    standby (which seals itself so the old primary can release nothing more) and then looks\n\
    for a new standby.";

#[derive(Subcommand)]
pub enum HaCmd {
    /// Protect a VM with a standby on another host (the primary is the VM's current host).
    #[command(after_help = "Example:\n  havenctl ha create web --standby node-2\n  \
        havenctl ha create web --standby 2 --mode redundant --epoch-ms 20\n  \
        havenctl ha create app --mode multi-op     # the cluster picks the standby")]
    Create(CreateArgs),
    /// List HA pairs: primary, standby, mode, state, generation and the last failover.
    List,
    /// Show a pair's record and how its primary and standby see it: role, generation, checkpoint
    /// epochs and pauses (redundant) or updates (multi-op), mirror lag, outputs held and released.
    #[command(after_help = "Example:\n  havenctl ha show web\n  havenctl ha show vm-1 --json")]
    Show {
        /// VM name, vm-N or N.
        vm: String,
    },
    /// Switch a pair's mode live (or change the checkpoint epoch of redundant mode); the pair's
    /// generation moves on and the standby mirrors the VM the new way from there.
    #[command(after_help = "Example:\n  havenctl ha set-mode web --mode multi-op\n  \
        havenctl ha set-mode web --mode redundant --epoch-ms 20")]
    SetMode(ModeArgs),
    /// Unprotect a VM: its standby drops its copy; the VM keeps running on its primary.
    Delete {
        /// VM name, vm-N or N.
        vm: String,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    /// VM name, vm-N or N.
    vm: String,
    /// The standby's host (N or node-N); by default the cluster picks one (the pair is degraded
    /// until it has).
    #[arg(long, value_parser = parse_host)]
    standby: Option<NodeId>,
    #[command(flatten)]
    mode: ModeChoice,
}

#[derive(Args)]
pub struct ModeArgs {
    /// VM name, vm-N or N.
    vm: String,
    #[command(flatten)]
    mode: ModeChoice,
}

#[derive(Args)]
struct ModeChoice {
    /// How the standby mirrors the VM (see `havenctl ha --help`).
    #[arg(long, value_enum, default_value_t = ModeArg::Redundant)]
    mode: ModeArg,
    /// Redundant mode's checkpoint epoch in milliseconds (default 50): shorter means less output
    /// latency, more pauses.
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(MIN_EPOCH_MS as i64..=MAX_EPOCH_MS as i64))]
    epoch_ms: Option<u32>,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    /// Checkpoint the whole guest (memory, devices) to a stopped standby every --epoch-ms; each
    /// output waits until the standby acknowledged its epoch.
    Redundant,
    /// Both guests run; the application's state (`vm app-put`) is mirrored update by update, each
    /// acknowledged once the standby applied it (no pauses; not for VMs that write disks).
    #[value(name = "multi-op", alias = "multi-operation")]
    MultiOp,
}

impl ModeChoice {
    fn mode(&self) -> anyhow::Result<HaMode> {
        match (self.mode, self.epoch_ms) {
            (ModeArg::Redundant, ms) => Ok(HaMode::Redundant { epoch_ms: ms.unwrap_or(DEFAULT_EPOCH_MS) }),
            (ModeArg::MultiOp, None) => Ok(HaMode::MultiOperation),
            (ModeArg::MultiOp, Some(_)) => bail!("--epoch-ms applies to redundant mode only"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Formatting

fn mode_text(m: HaMode) -> String {
    match m {
        HaMode::Redundant { epoch_ms } => format!("redundant ({epoch_ms} ms epochs)"),
        HaMode::MultiOperation => "multi-op".into(),
    }
}

fn state_text(s: PairState) -> &'static str {
    match s {
        PairState::Protecting => "protecting",
        PairState::FailingOver => "failing over",
        PairState::Degraded => "degraded",
    }
}

fn node_text(n: Option<NodeId>) -> String {
    n.map(|n| n.to_string()).unwrap_or_else(|| "-".into())
}

fn failover_text(f: &Option<FailoverRecord>) -> String {
    match f {
        None => "-".into(),
        Some(f) if f.took_ms == 0 => format!("{} → {}, in progress", f.from, f.to),
        Some(f) => format!("{} → {}, took {}", f.from, f.to, duration_text(f.took_ms)),
    }
}

fn pair_json(p: &HaPairRecord, name: Option<&str>) -> Value {
    let (mode, epoch_ms) = match p.mode {
        HaMode::Redundant { epoch_ms } => ("redundant", Some(epoch_ms)),
        HaMode::MultiOperation => ("multi-op", None),
    };
    json!({"vm": p.vm, "name": name, "primary": p.primary, "standby": p.standby, "mode": mode,
           "epoch_ms": epoch_ms, "state": state_text(p.state), "generation": p.generation,
           "failovers": p.failovers, "last_failover": p.last_failover})
}

fn vm_label(vm: VmId, names: &HashMap<VmId, String>) -> String {
    match names.get(&vm) {
        Some(n) => format!("{vm} ({n})"),
        None => vm.to_string(),
    }
}

fn pair_row(p: &HaPairRecord, names: &HashMap<VmId, String>) -> Vec<String> {
    vec![
        vm_label(p.vm, names),
        p.primary.to_string(),
        node_text(p.standby),
        mode_text(p.mode),
        state_text(p.state).into(),
        p.generation.to_string(),
        p.failovers.to_string(),
        failover_text(&p.last_failover),
    ]
}

fn pair_summary(v: &VmRecord, p: &HaPairRecord) -> String {
    format!(
        "{} {:?}: primary {}, standby {}, {}, {}, generation {}, {} failover{}",
        v.id,
        v.name,
        p.primary,
        p.standby.map(|s| s.to_string()).unwrap_or_else(|| "none".into()),
        mode_text(p.mode),
        state_text(p.state),
        p.generation,
        p.failovers,
        if p.failovers == 1 { "" } else { "s" }
    )
}

fn last_failover_line(f: &FailoverRecord) -> String {
    let took = if f.took_ms == 0 { "in progress".into() } else { format!("took {}", duration_text(f.took_ms)) };
    format!("Last failover: {} → {} ({took}): {}", f.from, f.to, f.reason)
}

fn point_text(p: Option<u64>) -> String {
    p.map(|p| p.to_string()).unwrap_or_else(|| "-".into())
}

/// One host's status, a cell for each of [`STATUS_ROWS`] (a column of `ha show`'s table).
fn status_cells(s: &HaVmStatus) -> Vec<String> {
    vec![
        s.role.clone(),
        s.generation.to_string(),
        format!("{} / {}", s.epochs, s.epochs_acked),
        human_bytes(s.epoch_bytes_mean),
        format!("{} / {} ms", s.pause_p50_ms, s.pause_p99_ms),
        format!("{} ms", s.mirror_lag_ms),
        format!("{} / {}", s.outputs_issued, s.outputs_released),
        point_text(s.standby_point),
        point_text(s.took_over_from),
    ]
}

const STATUS_ROWS: [&str; 9] = [
    "role",
    "generation",
    "epochs taken / acked",
    "mean epoch size",
    "pause p50 / p99",
    "mirror lag",
    "outputs issued / released",
    "standby point",
    "took over from",
];

// ---------------------------------------------------------------------------------------------
// Handlers

type ClientFn<'a> = &'a dyn Fn() -> anyhow::Result<HavenClient>;

pub async fn ha(cmd: HaCmd, client: ClientFn<'_>, out: &Output) -> anyhow::Result<()> {
    match cmd {
        HaCmd::Create(a) => {
            let mode = a.mode.mode()?;
            create(&client()?, a, mode, out).await
        }
        HaCmd::List => list(&client()?, out).await,
        HaCmd::Show { vm } => show(&client()?, &vm, out).await,
        HaCmd::SetMode(a) => {
            let mode = a.mode.mode()?;
            set_mode(&client()?, &a.vm, mode, out).await
        }
        HaCmd::Delete { vm } => {
            let c = client()?;
            let v = c.vm(&vm).await?;
            c.delete_ha_pair(v.id).await?;
            out.done(
                &format!("{} {:?} is no longer protected; it keeps running on {}", v.id, v.name, v.host),
                json!({"vm": v.id, "deleted": true, "host": v.host}),
            );
            Ok(())
        }
    }
}

async fn create(c: &HavenClient, a: CreateArgs, mode: HaMode, out: &Output) -> anyhow::Result<()> {
    let v = c.vm(&a.vm).await?;
    let p = c.create_ha_pair(v.id, a.standby, mode).await?;
    let standby = match p.standby {
        Some(s) => format!("standby {s}"),
        None => "no standby yet (the cluster picks one)".into(),
    };
    out.done(
        &format!(
            "{} {:?} protected, {}: primary {}, {standby}, generation {}; follow it with `havenctl ha show {}`",
            v.id,
            v.name,
            mode_text(p.mode),
            p.primary,
            p.generation,
            v.name
        ),
        pair_json(&p, Some(&v.name)),
    );
    Ok(())
}

async fn list(c: &HavenClient, out: &Output) -> anyhow::Result<()> {
    let pairs = c.ha_pairs().await?;
    let names: HashMap<VmId, String> = c.vms().await?.into_iter().map(|v| (v.id, v.name)).collect();
    out.table(
        &["vm", "primary", "standby", "mode", "state", "generation", "failovers", "last failover"],
        pairs.iter().map(|p| pair_row(p, &names)).collect(),
        Value::Array(pairs.iter().map(|p| pair_json(p, names.get(&p.vm).map(String::as_str))).collect()),
    );
    Ok(())
}

async fn set_mode(c: &HavenClient, vm: &str, mode: HaMode, out: &Output) -> anyhow::Result<()> {
    let v = c.vm(vm).await?;
    let p = c.set_ha_mode(v.id, mode).await?;
    out.done(
        &format!("{} {:?} now {} (generation {})", v.id, v.name, mode_text(p.mode), p.generation),
        pair_json(&p, Some(&v.name)),
    );
    Ok(())
}

/// Each host of the pair with what it is meant to be and its answer (an error if it has none).
type HostStatus = (&'static str, NodeId, Result<HaVmStatus, ClientError>);

async fn statuses(c: &HavenClient, p: &HaPairRecord) -> Vec<HostStatus> {
    let quick = c.clone().with_deadline(STATUS_DEADLINE);
    let primary = quick.ha_status(p.vm, Some(p.primary));
    let standby = async {
        match p.standby {
            Some(s) => Some(("standby", s, quick.ha_status(p.vm, Some(s)).await)),
            None => None,
        }
    };
    let (primary, standby) = futures::join!(primary, standby);
    std::iter::once(("primary", p.primary, primary)).chain(standby).collect()
}

fn statuses_json(all: &[HostStatus]) -> anyhow::Result<Value> {
    let mut rows = Vec::new();
    for (meant, host, st) in all {
        let (status, error) = match st {
            Ok(s) => (serde_json::to_value(s)?, Value::Null),
            Err(e) => (Value::Null, json!(e.to_string())),
        };
        rows.push(json!({"as": meant, "host": host, "status": status, "error": error}));
    }
    Ok(Value::Array(rows))
}

async fn show(c: &HavenClient, name: &str, out: &Output) -> anyhow::Result<()> {
    let v = c.vm(name).await?;
    let p = c.ha_pair(v.id).await?;
    let all = statuses(c, &p).await;
    if out.is_json() {
        let pair = pair_json(&p, Some(&v.name));
        out.value("", json!({"pair": pair, "hosts": statuses_json(&all)?}));
        return Ok(());
    }
    out.headline(&pair_summary(&v, &p));
    if let Some(f) = &p.last_failover {
        out.headline(&last_failover_line(f));
    }
    print_statuses(&all, out);
    Ok(())
}

/// The hosts that answered side by side; one line for each that did not.
fn print_statuses(all: &[HostStatus], out: &Output) {
    let answered: Vec<_> = all.iter().filter_map(|(m, h, s)| s.as_ref().ok().map(|s| (*m, *h, s))).collect();
    if !answered.is_empty() {
        let header: Vec<String> =
            std::iter::once(String::new()).chain(answered.iter().map(|(m, h, _)| format!("{m} {h}"))).collect();
        let cells: Vec<Vec<String>> = answered.iter().map(|(_, _, s)| status_cells(s)).collect();
        let rows = STATUS_ROWS
            .iter()
            .enumerate()
            .map(|(i, what)| std::iter::once(what.to_string()).chain(cells.iter().map(|c| c[i].clone())).collect())
            .collect();
        out.table(&header.iter().map(String::as_str).collect::<Vec<_>>(), rows, Value::Null);
    }
    for (meant, host, st) in all {
        match st {
            Err(e) => out.headline(&format!("{meant} {host}: status unavailable ({e})")),
            Ok(s) if *meant == "standby" && s.role != STANDBY_READY => {
                out.headline(&format!("{meant} {host} is not ready to take over yet ({})", s.role))
            }
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choice(mode: ModeArg, epoch_ms: Option<u32>) -> ModeChoice {
        ModeChoice { mode, epoch_ms }
    }

    #[test]
    fn modes() {
        assert_eq!(choice(ModeArg::Redundant, None).mode().unwrap(), HaMode::Redundant { epoch_ms: 50 });
        assert_eq!(choice(ModeArg::Redundant, Some(20)).mode().unwrap(), HaMode::Redundant { epoch_ms: 20 });
        assert_eq!(choice(ModeArg::MultiOp, None).mode().unwrap(), HaMode::MultiOperation);
        assert!(choice(ModeArg::MultiOp, Some(20)).mode().is_err());
    }

    #[test]
    fn status_cells_match_rows() {
        assert_eq!(status_cells(&HaVmStatus::default()).len(), STATUS_ROWS.len());
    }

    #[test]
    fn failovers_read_well() {
        let f = FailoverRecord { at_ms: 1, from: NodeId(1), to: NodeId(2), reason: "host down".into(), took_ms: 0 };
        assert_eq!(failover_text(&Some(f.clone())), "node-1 → node-2, in progress");
        let done = FailoverRecord { took_ms: 830, ..f };
        assert_eq!(failover_text(&Some(done)), "node-1 → node-2, took 830 ms");
        assert_eq!(failover_text(&None), "-");
    }
}
