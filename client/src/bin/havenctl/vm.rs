//! `havenctl vm | migration`: virtual machines (create, list, show, run state, delete, memory
//! check, host capacity, application state) and their live migration (start, watch with a
//! progress bar, cancel, list). Group migration plans (`migration plan …`) live in `plan.rs`.
//!
//! VMs are named by name, `vm-N` or `N`; hosts by `N` or `node-N`. Memory sizes, workloads,
//! rates and durations are checked by clap value parsers before anything is sent.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use clap::{Args, Subcommand};
use haven_client::error::ClientError;
use haven_client::proto::vm::{
    MigrationOptions, MigrationReport, VmRecord, VmRunState, WorkloadKind, MAX_VM_MEMORY_MIB, VM_PAGE_SIZE,
};
use haven_client::proto::{ErrorCode, NodeId, VmId};
use haven_client::vms::VmSpec;
use haven_client::HavenClient;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::output::Output;
use crate::units::{duration_text, number_and_unit};
use crate::volume::{human_bytes, parse_host, parse_size};

// ---------------------------------------------------------------------------------------------
// Commands

#[derive(Subcommand)]
pub enum VmCmd {
    /// Create a VM (placed on the host with the most free memory unless --host is given).
    #[command(after_help = "Example:\n  havenctl vm create web --memory 256MiB --dirty-rate 2000 --start\n  \
        havenctl vm create db --memory 1GiB --vcpus 2 --workload hotset:4096 --host node-2\n  \
        havenctl vm create app --memory 128MiB --disk-rate 200   # then: vm attach app app-disk; vm start app")]
    Create(CreateArgs),
    /// List VMs: host, memory, desired state and the migration under way.
    List,
    /// Show a VM's record and its live status on its host.
    #[command(after_help = "Example:\n  havenctl vm show web\n  havenctl vm show vm-1 --json")]
    Show {
        /// VM name, vm-N or N.
        vm: String,
    },
    /// Ask for the VM to run (its host starts it within a moment).
    Start {
        /// VM name, vm-N or N.
        vm: String,
    },
    /// Ask for the VM to pause (its memory stays on its host).
    Pause {
        /// VM name, vm-N or N.
        vm: String,
    },
    /// Resume a paused VM (the same as `vm start`).
    Resume {
        /// VM name, vm-N or N.
        vm: String,
    },
    /// Ask for the VM to stop.
    Stop {
        /// VM name, vm-N or N.
        vm: String,
    },
    /// Delete a VM and its memory (needs --yes).
    #[command(after_help = "Example:\n  havenctl vm delete web --yes")]
    Delete {
        /// VM name, vm-N or N.
        vm: String,
        /// Confirm: the VM and its memory are destroyed.
        #[arg(long)]
        yes: bool,
    },
    /// Verify the guest on its host: memory (every written page intact, the last write present)
    /// and disks (every acknowledged disk write present, nothing the guest did not write); exits 1
    /// if the check fails.
    Check {
        /// VM name, vm-N or N.
        vm: String,
    },
    /// Attach a volume as a disk of a VM (a migration plan snapshots and rolls back a VM's disks
    /// with its memory).
    Attach {
        /// VM name, vm-N or N.
        vm: String,
        /// Volume name, vol-N or N.
        volume: String,
    },
    /// Detach a disk from a VM.
    Detach {
        /// VM name, vm-N or N.
        vm: String,
        /// Volume name, vol-N or N.
        volume: String,
    },
    /// Memory each host offers to VMs: capacity, used and free.
    Capacity,
    /// Set KEY of the VM's application state (a key-value document the guest keeps) to VALUE,
    /// or delete it with --delete. Answered once the update is released: in an HA pair, only
    /// after the standby holds it (`havenctl ha --help`).
    #[command(
        after_help = "Example:\n  havenctl vm app-put web greeting hello\n  havenctl vm app-put web greeting --delete"
    )]
    AppPut(AppPutArgs),
    /// Print the VM's application state as its primary holds it (one key with --key). Values are
    /// printed as text when they are UTF-8, else as hex; --json gives both.
    #[command(after_help = "Example:\n  havenctl vm app-get web\n  havenctl vm app-get web --key greeting --json")]
    AppGet {
        /// VM name, vm-N or N.
        vm: String,
        /// Print only this key's value.
        #[arg(long)]
        key: Option<String>,
    },
}

#[derive(Args)]
pub struct AppPutArgs {
    /// VM name, vm-N or N.
    vm: String,
    /// The key (1 to 256 bytes).
    key: String,
    /// The value (as UTF-8 text, at most 64 KiB).
    #[arg(required_unless_present = "delete", conflicts_with = "delete")]
    value: Option<String>,
    /// Delete KEY instead of setting it.
    #[arg(long)]
    delete: bool,
}

#[derive(Args)]
pub struct CreateArgs {
    /// VM name (letters, digits, '-', '_', '.'; not all digits).
    name: String,
    /// Guest memory: a whole number of MiB written with K/M/G/T (powers of 1024), e.g. 256MiB or 1G.
    #[arg(long, value_parser = parse_memory)]
    memory: u64,
    /// Virtual CPUs (1-256).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    vcpus: u32,
    /// How the guest's workload picks the pages it writes: uniform, hotset:PAGES (most writes in
    /// the first PAGES pages) or sequential.
    #[arg(long, default_value = "uniform", value_parser = parse_workload)]
    workload: WorkloadKind,
    /// Page writes per second the guest's workload aims at (0 = idle).
    #[arg(long, default_value_t = 0, value_name = "PAGES_PER_SEC")]
    dirty_rate: u64,
    /// Block writes per second the guest's workload aims at, spread over the disks attached to it
    /// (`vm attach`); each write carries a sequence number and checksum that `vm check` verifies.
    #[arg(long, default_value_t = 0, value_name = "WRITES_PER_SEC",
          value_parser = clap::value_parser!(u64).range(0..=haven_client::proto::vm::MAX_DISK_WRITES_PER_SEC))]
    disk_rate: u64,
    /// Place the VM on this host (N or node-N) instead of letting the cluster choose.
    #[arg(long, value_parser = parse_host)]
    host: Option<NodeId>,
    /// Start the VM once it is created.
    #[arg(long)]
    start: bool,
}

#[derive(Subcommand)]
pub enum MigrationCmd {
    /// Live-migrate a running VM to another host (pre-copy, then a short stop-and-copy).
    #[command(after_help = "Example:\n  havenctl migration start web --to node-3 --watch\n  \
        havenctl migration start web --to 2 --max-downtime 50ms --no-auto-converge")]
    Start(StartArgs),
    /// Follow a VM's migration with a progress bar until it is done, failed or cancelled
    /// (exit 1 unless it is done).
    #[command(after_help = "Example:\n  havenctl migration watch web")]
    Watch {
        /// VM name, vm-N or N.
        vm: String,
    },
    /// Cancel a VM's migration; the VM keeps running where it is.
    Cancel {
        /// VM name, vm-N or N.
        vm: String,
    },
    /// List VMs with the migration under way and the last migration report their host gives.
    List,
    #[command(flatten)]
    Plans(crate::plan::PlanCmd),
}

#[derive(Args)]
pub struct StartArgs {
    /// VM name, vm-N or N.
    vm: String,
    /// Destination host (N or node-N).
    #[arg(long, value_parser = parse_host)]
    to: NodeId,
    /// Longest pause to accept for the final stop-and-copy (e.g. 50ms, 1s, or milliseconds).
    #[arg(long, default_value = "300ms", value_parser = parse_millis)]
    max_downtime: u64,
    /// Do not slow the guest down when its writes outpace the copy.
    #[arg(long)]
    no_auto_converge: bool,
    /// Cap the migration stream at this many bytes per second (e.g. 100MiB; 0 = no cap), to
    /// leave room for other traffic on the link.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    max_bandwidth: u64,
    /// Follow the migration with a progress bar until it ends (exit 1 unless it is done).
    #[arg(long)]
    watch: bool,
}

// ---------------------------------------------------------------------------------------------
// Value parsers (run by clap before anything is sent)

/// Guest memory in MiB, from a size such as `256MiB` or `1G` that is a whole number of MiB.
fn parse_memory(s: &str) -> Result<u64, String> {
    let bytes = parse_size(s)?;
    if bytes == 0 {
        return Err(format!("memory {s:?} must be greater than zero"));
    }
    if bytes % (1 << 20) != 0 {
        return Err(format!("memory {s:?} is not a whole number of MiB (write e.g. 256MiB or 1GiB)"));
    }
    let mib = bytes >> 20;
    if mib > MAX_VM_MEMORY_MIB {
        return Err(format!("memory {s:?} is too large: a VM may have at most {} GiB", MAX_VM_MEMORY_MIB >> 10));
    }
    Ok(mib)
}

/// `uniform`, `sequential` or `hotset:PAGES`.
fn parse_workload(s: &str) -> Result<WorkloadKind, String> {
    let t = s.trim().to_ascii_lowercase();
    match t.as_str() {
        "uniform" => Ok(WorkloadKind::Uniform),
        "sequential" => Ok(WorkloadKind::Sequential),
        _ => match t.strip_prefix("hotset:") {
            Some(n) => match n.parse::<u64>() {
                Ok(0) | Err(_) => {
                    Err(format!("invalid workload {s:?}: hotset needs a page count above 0, e.g. hotset:1024"))
                }
                Ok(hot_pages) => Ok(WorkloadKind::HotSet { hot_pages }),
            },
            None => Err(format!("invalid workload {s:?}: expected uniform, sequential or hotset:PAGES")),
        },
    }
}

/// Milliseconds: `50`, `50ms`, `2s`.
pub(crate) fn parse_millis(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid duration {s:?}: expected milliseconds such as 50, 50ms or 1s");
    let (n, unit) = number_and_unit(s).ok_or_else(bad)?;
    let ms = match unit.trim() {
        "" | "ms" => Some(n),
        "s" => n.checked_mul(1000),
        _ => return Err(bad()),
    };
    match ms {
        Some(0) => Err(format!("duration {s:?} must be greater than zero")),
        Some(ms) => Ok(ms),
        None => Err(bad()),
    }
}

// ---------------------------------------------------------------------------------------------
// Formatting

fn state_text(s: VmRunState) -> &'static str {
    match s {
        VmRunState::Running => "running",
        VmRunState::Paused => "paused",
        VmRunState::Stopped => "stopped",
    }
}

fn workload_text(w: &WorkloadKind) -> String {
    match w {
        WorkloadKind::Uniform => "uniform".into(),
        WorkloadKind::HotSet { hot_pages } => format!("hotset:{hot_pages}"),
        WorkloadKind::Sequential => "sequential".into(),
    }
}

fn mib(n: u64) -> String {
    human_bytes(n << 20)
}

fn vm_summary(v: &VmRecord) -> String {
    format!(
        "{} {:?}: {}, {} vCPU{}, workload {} at {} pages/s{}; on {}, desired {}, generation {}{}",
        v.id,
        v.name,
        mib(v.memory_mib),
        v.vcpus,
        if v.vcpus == 1 { "" } else { "s" },
        workload_text(&v.workload),
        v.dirty_pages_per_sec,
        if v.disk_writes_per_sec > 0 { format!(" and {} disk writes/s", v.disk_writes_per_sec) } else { String::new() },
        v.host,
        state_text(v.desired),
        v.generation,
        v.migrating_to.map(|t| format!("; migrating to {t}")).unwrap_or_default()
    )
}

fn is_final(phase: &str) -> bool {
    matches!(phase, "done" | "failed" | "cancelled")
}

fn report_text(vm: VmId, r: &MigrationReport) -> String {
    let to = r.to.map(|t| t.to_string()).unwrap_or_else(|| "?".into());
    match r.phase.as_str() {
        "done" => format!(
            "{vm} migrated to {to}: {} sent in {} round{}{}{}",
            human_bytes(r.bytes_sent),
            r.round,
            if r.round == 1 { "" } else { "s" },
            r.total_ms.map(|t| format!(", {}", duration_text(t))).unwrap_or_default(),
            r.downtime_ms.map(|d| format!(", downtime {d} ms")).unwrap_or_default()
        ),
        "failed" | "cancelled" => format!(
            "migration of {vm} to {to} {}: {}; the VM stays where it was",
            r.phase,
            r.reason.as_deref().unwrap_or("no reason given")
        ),
        phase => format!(
            "migration of {vm} to {to}: {phase}, round {}, {} sent, {} remaining, {}",
            r.round,
            human_bytes(r.bytes_sent),
            human_bytes(r.bytes_remaining),
            progress_message(r)
        ),
    }
}

fn progress_message(r: &MigrationReport) -> String {
    format!(
        "{}: round {}, dirty {} pages/s, throttle {}%, ETA {}, expected downtime {} ms",
        r.phase,
        r.round,
        r.dirty_pages_per_sec,
        r.throttle_percent,
        duration_text(r.eta_ms),
        r.expected_downtime_ms
    )
}

/// An application value for people: the text if it is UTF-8, else `hex:` and its bytes in hex.
fn app_value_text(v: &[u8]) -> String {
    match std::str::from_utf8(v) {
        Ok(t) => t.to_string(),
        Err(_) => format!("hex:{}", app_value_hex(v)),
    }
}

fn app_value_hex(v: &[u8]) -> String {
    v.iter().map(|b| format!("{b:02x}")).collect()
}

/// An application entry for machines: its text (`null` unless UTF-8) and its hex, always.
fn app_entry_json(key: &str, v: &[u8]) -> Value {
    json!({"key": key, "value": std::str::from_utf8(v).ok(), "hex": app_value_hex(v), "bytes": v.len()})
}

// ---------------------------------------------------------------------------------------------
// Handlers

type ClientFn<'a> = &'a dyn Fn() -> anyhow::Result<HavenClient>;

pub async fn vm(cmd: VmCmd, client: ClientFn<'_>, out: &Output) -> anyhow::Result<()> {
    let c = client()?;
    match cmd {
        VmCmd::Create(a) => {
            let spec = VmSpec {
                name: a.name,
                memory_mib: a.memory,
                vcpus: a.vcpus,
                workload: a.workload,
                dirty_pages_per_sec: a.dirty_rate,
                disk_writes_per_sec: a.disk_rate,
                host: a.host,
            };
            if let WorkloadKind::HotSet { hot_pages } = spec.workload {
                let pages = spec.memory_mib * (1 << 20) / VM_PAGE_SIZE;
                if hot_pages > pages {
                    bail!("hotset:{hot_pages} is more pages than the VM has ({pages} pages of {VM_PAGE_SIZE} B)");
                }
            }
            let mut v = c.create_vm(&spec).await?;
            if a.start {
                v = c.set_vm_state(v.id, VmRunState::Running).await?;
            }
            out.done(&format!("created {}", vm_summary(&v)), serde_json::to_value(&v)?);
        }
        VmCmd::List => {
            let vms = c.vms().await?;
            out.table(
                &["id", "name", "host", "memory", "desired", "migrating to"],
                vms.iter()
                    .map(|v| {
                        vec![
                            v.id.to_string(),
                            v.name.clone(),
                            v.host.to_string(),
                            mib(v.memory_mib),
                            state_text(v.desired).into(),
                            v.migrating_to.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
                        ]
                    })
                    .collect(),
                serde_json::to_value(&vms)?,
            );
        }
        VmCmd::Show { vm } => show(&c, &vm, out).await?,
        VmCmd::Start { vm } | VmCmd::Resume { vm } => set_state(&c, &vm, VmRunState::Running, out).await?,
        VmCmd::Pause { vm } => set_state(&c, &vm, VmRunState::Paused, out).await?,
        VmCmd::Stop { vm } => set_state(&c, &vm, VmRunState::Stopped, out).await?,
        VmCmd::Delete { vm, yes } => {
            if !yes {
                bail!("deleting VM {vm:?} destroys it and its memory; pass --yes to confirm");
            }
            let v = c.vm(&vm).await?;
            c.delete_vm(v.id).await?;
            out.done(&format!("deleted {} {:?}", v.id, v.name), json!({"deleted": v.id, "name": v.name}));
        }
        VmCmd::Attach { vm, volume } => attach_disk(&c, &vm, &volume, true, out).await?,
        VmCmd::Detach { vm, volume } => attach_disk(&c, &vm, &volume, false, out).await?,
        VmCmd::Check { vm } => {
            let v = c.vm(&vm).await?;
            let check = c.vm_check(v.id).await.map_err(|e| anyhow!("check of {} failed: {e}", v.id))?;
            let mut machine = serde_json::to_value(&check)?;
            machine["vm"] = json!(v.id);
            machine["host"] = json!(v.host);
            let mut text = format!(
                "memory of {} {:?} on {} is intact: {} pages written, last write seq {} present (max seq {})",
                v.id, v.name, v.host, check.pages_written, check.last_seq, check.max_seq
            );
            for d in &check.disks {
                text.push_str(&format!(
                    "\ndisk {} is intact: all {} acknowledged writes present ({} blocks written, {} issued)",
                    d.volume, d.acked, d.blocks_written, d.issued
                ));
            }
            out.done(&text, machine);
        }
        VmCmd::AppPut(a) => app_put(&c, a, out).await?,
        VmCmd::AppGet { vm, key } => app_get(&c, &vm, key, out).await?,
        VmCmd::Capacity => {
            let caps = c.vm_capacity().await?;
            out.table(
                &["host", "capacity", "used", "free"],
                caps.iter()
                    .map(|(cap, used)| {
                        vec![
                            cap.host.to_string(),
                            mib(cap.memory_mib),
                            mib(*used),
                            mib(cap.memory_mib.saturating_sub(*used)),
                        ]
                    })
                    .collect(),
                Value::Array(
                    caps.iter()
                        .map(|(cap, used)| {
                            json!({"host": cap.host, "memory_mib": cap.memory_mib, "used_mib": used,
                                   "free_mib": cap.memory_mib.saturating_sub(*used)})
                        })
                        .collect(),
                ),
            );
        }
    }
    Ok(())
}

async fn set_state(c: &HavenClient, name: &str, desired: VmRunState, out: &Output) -> anyhow::Result<()> {
    let v = c.vm(name).await?;
    let v = c.set_vm_state(v.id, desired).await?;
    out.done(
        &format!("{} {:?} on {}: desired state {}", v.id, v.name, v.host, state_text(v.desired)),
        serde_json::to_value(&v)?,
    );
    Ok(())
}

/// `vm attach` / `vm detach`.
async fn attach_disk(c: &HavenClient, vm: &str, volume: &str, attach: bool, out: &Output) -> anyhow::Result<()> {
    let v = c.vm(vm).await?;
    let vol = c.volume(volume).await?;
    let r = if attach { c.attach_volume(v.id, vol.id).await? } else { c.detach_volume(v.id, vol.id).await? };
    let disks: Vec<String> = r.volumes.iter().map(|d| d.to_string()).collect();
    out.done(
        &format!(
            "{} {} {:?} {} {} {:?}; its disks: {}",
            if attach { "attached" } else { "detached" },
            vol.id,
            vol.name,
            if attach { "to" } else { "from" },
            v.id,
            v.name,
            if disks.is_empty() { "none".to_string() } else { disks.join(", ") }
        ),
        json!({"vm": v.id, "volume": vol.id, "attached": attach, "volumes": r.volumes}),
    );
    Ok(())
}

async fn app_put(c: &HavenClient, a: AppPutArgs, out: &Output) -> anyhow::Result<()> {
    let v = c.vm(&a.vm).await?;
    let value = if a.delete { None } else { a.value.map(String::into_bytes) };
    let deleted = value.is_none();
    let seq = c.app_put(v.id, &a.key, value).await?;
    out.done(
        &format!(
            "{} {:?}: {:?} {} (update {seq}, released)",
            v.id,
            v.name,
            a.key,
            if deleted { "deleted" } else { "written" }
        ),
        json!({"vm": v.id, "key": a.key, "deleted": deleted, "seq": seq}),
    );
    Ok(())
}

async fn app_get(c: &HavenClient, vm: &str, key: Option<String>, out: &Output) -> anyhow::Result<()> {
    let v = c.vm(vm).await?;
    let app = c.app_get(v.id).await?;
    if let Some(k) = key {
        let Some((_, value)) = app.entries.iter().find(|(e, _)| *e == k) else {
            bail!("key {k:?} not found in the application state of {} {:?}", v.id, v.name)
        };
        let mut machine = app_entry_json(&k, value);
        machine["vm"] = json!(v.id);
        machine["applied"] = json!(app.applied);
        out.value(&app_value_text(value), machine);
        return Ok(());
    }
    out.headline(&format!(
        "{} {:?} on {}: generation {}, {} updates applied, {} keys",
        v.id,
        v.name,
        app.host,
        app.generation,
        app.applied,
        app.entries.len()
    ));
    out.table(
        &["key", "value"],
        app.entries.iter().map(|(k, e)| vec![k.clone(), app_value_text(e)]).collect(),
        json!({"vm": v.id, "host": app.host, "generation": app.generation, "applied": app.applied,
               "entries": app.entries.iter().map(|(k, e)| app_entry_json(k, e)).collect::<Vec<_>>()}),
    );
    Ok(())
}

async fn show(c: &HavenClient, name: &str, out: &Output) -> anyhow::Result<()> {
    let v = c.vm(name).await?;
    // The host may be unreachable (that may be why someone is looking): show the record anyway.
    let status = c.vm_status(v.id).await;
    if out.is_json() {
        let (st, err) = match &status {
            Ok(s) => (serde_json::to_value(s)?, Value::Null),
            Err(e) => (Value::Null, json!(e.to_string())),
        };
        out.value("", json!({"vm": v, "status": st, "status_error": err}));
        return Ok(());
    }
    out.headline(&vm_summary(&v));
    if !v.volumes.is_empty() {
        let disks: Vec<String> = v.volumes.iter().map(|d| d.to_string()).collect();
        out.headline(&format!("Disks: {}", disks.join(", ")));
    }
    match &status {
        Ok(s) => out.headline(&format!(
            "Live on {}: {}, {} writes, last write seq {}, throttle {}%, memory digest {}",
            s.host,
            s.state,
            s.writes,
            s.last_seq,
            s.throttle_percent,
            if s.digest.len() > 16 { format!("{}…", &s.digest[..16]) } else { s.digest.clone() }
        )),
        Err(e) => out.headline(&format!("Live status: unavailable ({e})")),
    }
    Ok(())
}

pub async fn migration(cmd: MigrationCmd, client: ClientFn<'_>, out: &Output) -> anyhow::Result<()> {
    let c = client()?;
    match cmd {
        MigrationCmd::Start(a) => {
            let v = c.vm(&a.vm).await?;
            if v.host == a.to {
                bail!("{} {:?} already runs on {}; give another host with --to", v.id, v.name, a.to);
            }
            if let Some(t) = v.migrating_to {
                bail!(
                    "{} {:?} is already migrating to {t}; follow it with `havenctl migration watch {}`",
                    v.id,
                    v.name,
                    v.name
                );
            }
            let options = MigrationOptions {
                max_downtime_ms: a.max_downtime,
                auto_converge: !a.no_auto_converge,
                max_bandwidth_bytes_per_sec: a.max_bandwidth,
            };
            let first = c.migrate_vm(v.id, a.to, options).await?;
            if a.watch {
                if !out.is_json() {
                    println!("migrating {} {:?} from {} to {}", v.id, v.name, v.host, a.to);
                }
                watch(&c, &v, Some(a.to), Some(first), out).await?;
            } else {
                let mut machine = serde_json::to_value(&first)?;
                machine["vm"] = json!(v.id);
                out.done(
                    &format!(
                        "migration of {} {:?} from {} to {} started ({}); follow it with `havenctl migration watch {}`",
                        v.id, v.name, v.host, a.to, first.phase, v.name
                    ),
                    machine,
                );
            }
        }
        MigrationCmd::Watch { vm } => {
            let v = c.vm(&vm).await?;
            watch(&c, &v, v.migrating_to, None, out).await?;
        }
        MigrationCmd::Cancel { vm } => {
            let v = c.vm(&vm).await?;
            c.cancel_migration(v.id).await?;
            out.done(
                &format!(
                    "cancelling the migration of {} {:?}{}; it keeps running on {}",
                    v.id,
                    v.name,
                    v.migrating_to.map(|t| format!(" to {t}")).unwrap_or_default(),
                    v.host
                ),
                json!({"vm": v.id, "cancelled": true, "host": v.host}),
            );
        }
        MigrationCmd::List => {
            let vms = c.vms().await?;
            let quick = c.clone().with_deadline(Duration::from_secs(2));
            let mut rows = Vec::new();
            let mut machine = Vec::new();
            for v in &vms {
                let report = quick.migration_progress(v.id).await;
                let (phase, progress, extra) = match &report {
                    Ok(r) => (r.phase.clone(), migration_progress_cell(r), report_extra(r)),
                    Err(e) if e.code() == Some(ErrorCode::NotFound) => ("-".into(), "-".into(), "-".into()),
                    Err(e) => ("?".into(), "-".into(), format!("no report ({e})")),
                };
                rows.push(vec![
                    v.id.to_string(),
                    v.name.clone(),
                    v.host.to_string(),
                    v.migrating_to.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
                    phase,
                    progress,
                    extra,
                ]);
                let (r, err) = match &report {
                    Ok(r) => (serde_json::to_value(r)?, Value::Null),
                    Err(e) => (Value::Null, json!(e.to_string())),
                };
                machine.push(json!({"vm": v.id, "name": v.name, "host": v.host, "migrating_to": v.migrating_to,
                                    "report": r, "report_error": err}));
            }
            out.table(
                &["vm", "name", "host", "migrating to", "last phase", "progress", "details"],
                rows,
                Value::Array(machine),
            );
        }
        MigrationCmd::Plans(cmd) => crate::plan::plan(cmd, client, out).await?,
    }
    Ok(())
}

fn migration_progress_cell(r: &MigrationReport) -> String {
    let total = r.bytes_sent + r.bytes_remaining;
    if total == 0 {
        return "-".into();
    }
    format!(
        "{} / {} ({:.0}%)",
        human_bytes(r.bytes_sent),
        human_bytes(total),
        r.bytes_sent as f64 * 100.0 / total as f64
    )
}

fn report_extra(r: &MigrationReport) -> String {
    let to = r.to.map(|t| format!("to {t}, ")).unwrap_or_default();
    match r.phase.as_str() {
        "done" => format!(
            "{to}{} round(s){}{}",
            r.round,
            r.downtime_ms.map(|d| format!(", downtime {d} ms")).unwrap_or_default(),
            r.total_ms.map(|t| format!(", total {}", duration_text(t))).unwrap_or_default()
        ),
        "failed" | "cancelled" => format!("{to}{}", r.reason.as_deref().unwrap_or("no reason given")),
        _ => format!("{to}{}", progress_message(r)),
    }
}

/// Follow a migration until it ends. `to` is the destination if known (from `migration start` or
/// the VM record); `first` is the report `migrate_vm` answered with.
///
/// Once the catalog moves the VM, its requests go to the destination, which holds no report of
/// the migration: a VM found on `to` with no migration under way has therefore finished, and the
/// last report seen stands in for the source's final one.
async fn watch(
    c: &HavenClient,
    v: &VmRecord,
    mut to: Option<NodeId>,
    first: Option<MigrationReport>,
    out: &Output,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let bar = if out.is_json() { ProgressBar::hidden() } else { ProgressBar::new(0) };
    bar.set_style(
        ProgressStyle::with_template("[{bar:40}] {bytes}/{total_bytes} ({percent}%) {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let mut last = first;
    let mut last_ok = Instant::now();
    let mut synthesized = false;
    let fin: MigrationReport = loop {
        let polled = c.migration_progress(v.id).await;
        match polled {
            Ok(r) if is_final(&r.phase) => break r,
            Ok(r) => {
                last_ok = Instant::now();
                if to.is_none() {
                    to = r.to;
                }
                bar.set_length(r.bytes_sent + r.bytes_remaining);
                bar.set_position(r.bytes_sent);
                bar.set_message(progress_message(&r));
                last = Some(r);
            }
            Err(e) => {
                // The request may have gone to a host that does not hold the migration: ask the
                // catalog where the VM is.
                let record = c.vm(&v.id.to_string()).await;
                match &record {
                    Ok(now)
                        if now.migrating_to.is_none() && to.is_some_and(|t| now.host == t && now.host != v.host) =>
                    {
                        let mut done = last.clone().unwrap_or_default();
                        done.phase = "done".into();
                        done.to = Some(now.host);
                        done.bytes_sent = done.bytes_sent.max(bar.position());
                        done.bytes_remaining = 0;
                        done.eta_ms = 0;
                        synthesized = true;
                        break done;
                    }
                    Ok(now) if now.migrating_to.is_none() && last.is_none() && to.is_none() => {
                        bar.finish_and_clear();
                        bail!("no migration of {} {:?} to follow ({e})", v.id, v.name);
                    }
                    Ok(now) if now.migrating_to.is_none() && now.host == v.host && last.is_some() => {
                        // Ended without moving; the source's report (with the reason) should
                        // answer on the next poll. Keep asking for a while.
                        if last_ok.elapsed() > Duration::from_secs(10) {
                            bar.finish_and_clear();
                            bail!("migration of {} ended without moving it (it stays on {}): {e}", v.id, now.host);
                        }
                    }
                    _ => {
                        if last_ok.elapsed() > Duration::from_secs(30) {
                            bar.finish_and_clear();
                            return Err(anyhow::Error::new(e)
                                .context(format!("asking for the progress of {}'s migration", v.id)));
                        }
                    }
                }
                if !matches!(&e, ClientError::Server(_)) {
                    bar.println(format!("(migration progress unavailable: {e}; retrying)"));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if fin.phase == "done" {
        bar.set_length(fin.bytes_sent.max(1));
        bar.set_position(fin.bytes_sent.max(1));
    }
    bar.finish_and_clear();
    let mut machine = serde_json::to_value(&fin)?;
    machine["vm"] = json!(v.id);
    let mut human = report_text(v.id, &fin);
    if synthesized {
        // The source's final report (downtime, total time) went away with the VM.
        machine["final_report"] = json!(false);
        machine["watched_ms"] = json!(started.elapsed().as_millis() as u64);
        human.push_str(&format!(
            " (watched for {}; the source's final report with the downtime was no longer available)",
            duration_text(started.elapsed().as_millis() as u64)
        ));
    }
    out.done(&human, machine);
    match fin.phase.as_str() {
        "done" => Ok(()),
        phase => Err(anyhow!("migration of {} {phase}: {}", v.id, fin.reason.as_deref().unwrap_or("no reason given"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers() {
        assert_eq!(parse_memory("256MiB"), Ok(256));
        assert_eq!(parse_memory("1G"), Ok(1024));
        assert!(parse_memory("12X").is_err());
        assert!(parse_memory("0").is_err());
        assert!(parse_memory("1000").unwrap_err().contains("whole number of MiB"));
        assert!(parse_memory("100000GiB").unwrap_err().contains("too large"));
        assert_eq!(parse_workload("uniform"), Ok(WorkloadKind::Uniform));
        assert_eq!(parse_workload("hotset:64"), Ok(WorkloadKind::HotSet { hot_pages: 64 }));
        assert_eq!(parse_workload("Sequential"), Ok(WorkloadKind::Sequential));
        assert!(parse_workload("hotset:0").is_err());
        assert!(parse_workload("random").is_err());
        assert_eq!(parse_millis("50ms"), Ok(50));
        assert_eq!(parse_millis("50"), Ok(50));
        assert_eq!(parse_millis("2s"), Ok(2000));
        assert!(parse_millis("0").is_err());
        assert!(parse_millis("fast").is_err());
    }

    #[test]
    fn app_values() {
        assert_eq!(app_value_text(b"hello"), "hello");
        assert_eq!(app_value_text(&[0xff, 0x00]), "hex:ff00");
        let j = app_entry_json("k", &[0xff]);
        assert_eq!(j["value"], Value::Null);
        assert_eq!(j["hex"], "ff");
        assert_eq!(app_entry_json("k", b"a")["value"], "a");
    }
}
