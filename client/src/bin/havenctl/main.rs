//! `havenctl`: the Haven command line over the SDK. Every command takes `--json`; errors are one
//! line on stderr with a non-zero exit status.

mod certs;
mod dev;
mod ha;
mod output;
mod plan;
mod share;
mod units;
mod vm;
mod volume;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand};
use haven_client::proto::{ActorAddr, ActorMessage, ActorReply, MemberSpec, NodeId};
use haven_client::{ClusterConfig, HavenClient};
use serde_json::json;

use output::Output;

#[derive(Parser)]
#[command(
    name = "havenctl",
    version,
    about = "Operate a Haven cluster",
    long_about = "Operate a Haven cluster.\n\nStart a local cluster with `havenctl dev up --nodes 3 --dir /tmp/haven`, \
then point other commands at it with `--cluster /tmp/haven` or `export HAVEN_CLUSTER=/tmp/haven`."
)]
struct Cli {
    /// Cluster directory (or client.toml) written by `havenctl dev up`.
    #[arg(long, global = true, env = "HAVEN_CLUSTER")]
    cluster: Option<PathBuf>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a local cluster of real haven-node processes.
    #[command(subcommand)]
    Dev(dev::DevCommand),
    /// Inspect and change cluster membership.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// The generic key-value namespace of the catalog.
    #[command(subcommand)]
    Kv(KvCommand),
    /// Hosts: list, ping a host agent, drain (move every VM off) and undrain.
    #[command(subcommand)]
    Host(HostCommand),
    /// Replicated block volumes: create, list, show, resize, delete, read, write, status, events.
    #[command(subcommand)]
    Volume(volume::VolumeCmd),
    /// Volume snapshots: create, list, delete, rollback, clone, verify and repair.
    #[command(subcommand)]
    Snapshot(volume::SnapshotCmd),
    /// Labeled snapshot policies (periodic snapshots compared across replicas).
    #[command(subcommand)]
    Policy(volume::PolicyCmd),
    /// Asynchronous (DR) replication relationships and replication progress.
    #[command(subcommand)]
    Replication(volume::ReplicationCmd),
    /// Virtual machines: create, list, show, start, pause, resume, stop, delete, check, capacity,
    /// and their application state (app-put, app-get).
    #[command(subcommand)]
    Vm(vm::VmCmd),
    /// Live migration of VMs between hosts: start, watch, cancel, list; group plans with a
    /// recovery snapshot: plan, plans, plan-show, plan-watch, plan-cancel.
    #[command(subcommand)]
    Migration(vm::MigrationCmd),
    /// Shared datasets (differential sharing): create, list, put, get, watch, members.
    #[command(subcommand)]
    Share(share::ShareCmd),
    /// HA pairs: keep a standby copy of a VM on a second host and fail over to it automatically
    /// (redundant checkpointing or multi-operation): create, list, show, set-mode, delete.
    #[command(subcommand, after_help = ha::MODES_HELP)]
    Ha(ha::HaCmd),
    /// Run chaos scenarios (fault injection + checkers): `havenctl chaos run SCENARIO.toml`.
    /// Runs the haven-chaos binary installed beside havenctl; see `havenctl chaos --help`.
    #[command(disable_help_flag = true)]
    Chaos {
        /// Arguments for haven-chaos (e.g. `run chaos/scenarios/smoke.toml --seed 7`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Leader, term, members with role and health, last applied index.
    Status,
    /// Add a running, uninitialised node as a learner and promote it to voter.
    Add(AddArgs),
    /// Remove a member.
    Remove {
        /// Node id to remove.
        id: u64,
    },
    /// The cluster CA's and every member's certificate: identity, serial, expiry (asked of each
    /// member), and this client's own certificate.
    Certs,
    /// The identity and role the cluster sees this client as (from its certificate).
    Whoami,
}

#[derive(Args)]
struct AddArgs {
    /// The new node's id.
    id: u64,
    /// Its QUIC address (HOST:PORT).
    addr: String,
    /// Its admin HTTP address (HOST:PORT).
    admin_addr: String,
    /// Leave it a learner (non-voting).
    #[arg(long)]
    learner: bool,
}

#[derive(Subcommand)]
enum KvCommand {
    /// Set KEY to VALUE.
    Put { key: String, value: String },
    /// Read KEY (linearizable).
    Get { key: String },
    /// Delete KEY.
    Delete { key: String },
    /// Set KEY to NEW only if it currently equals EXPECTED (use --absent for "does not exist").
    Cas {
        key: String,
        #[arg(long, conflicts_with = "absent")]
        expected: Option<String>,
        #[arg(long)]
        absent: bool,
        new: String,
    },
    /// List keys starting with PREFIX.
    List {
        #[arg(default_value = "")]
        prefix: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum HostCommand {
    /// Ping node ID's host agent (routed through any node).
    Ping { id: u64 },
    /// Show the hosts recorded in the catalog and whether each is draining.
    List,
    #[command(flatten)]
    Drain(plan::HostDrainCmd),
}

fn main() -> ExitCode {
    // Like other Unix tools, stop quietly when the reader of our output goes away
    // (`havenctl ... | head`): Rust ignores SIGPIPE by default, which turns it into a panic on
    // the next print.
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let out = Output::new(cli.json);
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("havenctl: error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli, &out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            out.error(&e);
            ExitCode::FAILURE
        }
    }
}

fn cluster_config(cli_cluster: &Option<PathBuf>) -> anyhow::Result<ClusterConfig> {
    let Some(path) = cli_cluster else {
        bail!("no cluster given: pass --cluster DIR or set HAVEN_CLUSTER (see `havenctl dev up --help`)");
    };
    Ok(ClusterConfig::load(path)?)
}

async fn dispatch(cli: Cli, out: &Output) -> anyhow::Result<()> {
    let client = || -> anyhow::Result<HavenClient> { Ok(HavenClient::new(&cluster_config(&cli.cluster)?)?) };
    match cli.command {
        Command::Dev(cmd) => dev::run(cmd, out).await,
        Command::Chaos { mut args } => {
            let bin = haven_client::devcluster::locate_binary("haven-chaos", "HAVEN_CHAOS_BIN");
            if args.is_empty() {
                args.push("--help".into());
            }
            if cli.json && args.first().is_some_and(|a| a == "run" || a == "plan") {
                args.push("--json".into());
            }
            let status = std::process::Command::new(&bin).args(&args).status().with_context(|| {
                format!("starting {} (build it with `cargo build --bin haven-chaos`)", bin.display())
            })?;
            if !status.success() {
                // haven-chaos printed its own summary or error; keep its exit status meaning.
                std::process::exit(status.code().unwrap_or(1));
            }
            Ok(())
        }
        Command::Cluster(ClusterCommand::Status) => cluster_status(&client()?, out).await,
        Command::Cluster(ClusterCommand::Certs) => {
            certs::cluster_certs(&client()?, &cluster_config(&cli.cluster)?, out).await
        }
        Command::Cluster(ClusterCommand::Whoami) => {
            let me = client()?.whoami().await?;
            out.value(&format!("connected as {me}"), serde_json::to_value(&me)?);
            Ok(())
        }
        Command::Cluster(ClusterCommand::Add(a)) => {
            let index = client()?
                .add_member(MemberSpec { id: NodeId(a.id), addr: a.addr.clone(), admin_addr: a.admin_addr }, !a.learner)
                .await?;
            out.done(
                &format!(
                    "node-{} added as {} (membership index {index})",
                    a.id,
                    if a.learner { "learner" } else { "voter" }
                ),
                json!({"added": a.id, "voter": !a.learner, "index": index}),
            );
            Ok(())
        }
        Command::Cluster(ClusterCommand::Remove { id }) => {
            let index = client()?.remove_member(NodeId(id)).await?;
            out.done(&format!("node-{id} removed (membership index {index})"), json!({"removed": id, "index": index}));
            Ok(())
        }
        Command::Kv(cmd) => kv(cmd, &client()?, out).await,
        Command::Volume(cmd) => volume::volume(cmd, &client, out).await,
        Command::Snapshot(cmd) => volume::snapshot(cmd, &client, out).await,
        Command::Policy(cmd) => volume::policy(cmd, &client, out).await,
        Command::Replication(cmd) => volume::replication(cmd, &client, out).await,
        Command::Vm(cmd) => vm::vm(cmd, &client, out).await,
        Command::Migration(cmd) => vm::migration(cmd, &client, out).await,
        Command::Share(cmd) => share::share(cmd, &client, out).await,
        Command::Ha(cmd) => ha::ha(cmd, &client, out).await,
        Command::Host(HostCommand::Ping { id }) => {
            let c = client()?;
            let started = std::time::Instant::now();
            let nonce = rand::random::<u64>();
            let reply = c.actor(ActorAddr::host_agent(NodeId(id)), ActorMessage::Ping { nonce }).await?;
            let rtt = started.elapsed();
            match reply {
                ActorReply::Pong { nonce: n, from } if n == nonce => {
                    out.done(
                        &format!("pong from {from} in {:.2} ms", rtt.as_secs_f64() * 1e3),
                        json!({"from": from.0, "rtt_ms": rtt.as_secs_f64() * 1e3}),
                    );
                    Ok(())
                }
                other => Err(anyhow!("unexpected reply {other:?}")),
            }
        }
        Command::Host(HostCommand::Drain(cmd)) => plan::host(cmd, &client, out).await,
        Command::Host(HostCommand::List) => {
            let c = client()?;
            let hosts = c.hosts().await?;
            let draining = c.draining_hosts().await?;
            out.table(
                &["id", "address", "admin", "draining"],
                hosts
                    .iter()
                    .map(|h| {
                        let d = if draining.contains(&h.id) { "yes" } else { "no" };
                        vec![h.id.to_string(), h.addr.clone(), h.admin_addr.clone(), d.into()]
                    })
                    .collect(),
                serde_json::Value::Array(
                    hosts
                        .iter()
                        .map(|h| {
                            let mut v = serde_json::to_value(h).unwrap_or_default();
                            v["draining"] = json!(draining.contains(&h.id));
                            v
                        })
                        .collect(),
                ),
            );
            Ok(())
        }
    }
}

async fn cluster_status(client: &HavenClient, out: &Output) -> anyhow::Result<()> {
    let st = match client.clone().with_deadline(Duration::from_secs(3)).leader_status().await {
        Ok(s) => s,
        // No leader: show what any node knows.
        Err(_) => client.status().await.context("asking for the cluster status")?,
    };
    let mut rows = Vec::new();
    let mut members = Vec::new();
    for m in &st.members {
        // Ask the member itself; where this machine cannot reach it (e.g. a container name),
        // fall back to the leader's replication view.
        let leader_view = || match (m.matched_index, st.last_log_index) {
            (Some(matched), Some(last)) => {
                format!("replicating ({} behind, leader's view)", last.saturating_sub(matched))
            }
            _ => "not reachable from here".to_string(),
        };
        let health = match m.addr.parse() {
            Ok(addr) => match client.clone().with_deadline(Duration::from_secs(2)).status_of(addr).await {
                Ok(s) => (if s.healthy { "healthy" } else { "unhealthy" }.to_string(), Some(s)),
                Err(e) => (format!("unreachable ({e})"), None),
            },
            Err(_) => (leader_view(), None),
        };
        let role = health.1.as_ref().map(|s| format!("{:?}", s.role).to_lowercase()).unwrap_or_else(|| "-".into());
        let applied =
            health.1.as_ref().and_then(|s| s.last_applied_index).map(|i| i.to_string()).unwrap_or_else(|| "-".into());
        rows.push(vec![
            m.id.to_string(),
            if m.voter { "voter" } else { "learner" }.into(),
            role.clone(),
            m.addr.clone(),
            health.0.clone(),
            applied.clone(),
        ]);
        members.push(json!({
            "id": m.id.0, "voter": m.voter, "role": role, "addr": m.addr, "admin_addr": m.admin_addr,
            "health": health.0, "last_applied_index": health.1.as_ref().and_then(|s| s.last_applied_index),
        }));
    }
    let summary = format!(
        "leader {}, term {}, last applied index {}",
        st.leader.map(|l| l.to_string()).unwrap_or_else(|| "none".into()),
        st.term,
        st.last_applied_index.map(|i| i.to_string()).unwrap_or_else(|| "-".into())
    );
    out.headline(&summary);
    if let Ok(me) = client.whoami().await {
        out.headline(&format!("connected as {me}"));
    }
    out.table(
        &["id", "membership", "role", "address", "health", "applied"],
        rows,
        json!({"leader": st.leader.map(|l| l.0), "term": st.term, "last_applied_index": st.last_applied_index, "members": members}),
    );
    Ok(())
}

async fn kv(cmd: KvCommand, client: &HavenClient, out: &Output) -> anyhow::Result<()> {
    match cmd {
        KvCommand::Put { key, value } => {
            let index = client.kv_put(&key, value.as_bytes()).await?;
            out.done(&format!("{key} written at index {index}"), json!({"key": key, "index": index}));
        }
        KvCommand::Get { key } => match client.kv_get(&key).await? {
            Some(v) => {
                out.value(&String::from_utf8_lossy(&v), json!({"key": key, "value": String::from_utf8_lossy(&v)}))
            }
            None => bail!("key {key:?} not found"),
        },
        KvCommand::Delete { key } => {
            let existed = client.kv_delete(&key).await?;
            out.done(
                &if existed { format!("{key} deleted") } else { format!("{key} did not exist") },
                json!({"key": key, "existed": existed}),
            );
        }
        KvCommand::Cas { key, expected, absent, new } => {
            if expected.is_none() && !absent {
                bail!("give --expected VALUE or --absent");
            }
            let (ok, current) =
                client.kv_cas(&key, expected.as_deref().map(str::as_bytes), Some(new.as_bytes())).await?;
            let current = current.map(|c| String::from_utf8_lossy(&c).into_owned());
            if !ok {
                out.done(
                    &format!("compare failed; {key} is {}", current.as_deref().unwrap_or("absent")),
                    json!({"key": key, "succeeded": false, "current": current}),
                );
                bail!("compare-and-set on {key:?} did not match");
            }
            out.done(&format!("{key} set"), json!({"key": key, "succeeded": true, "current": current}));
        }
        KvCommand::List { prefix, limit } => {
            let entries = client.kv_scan(&prefix, limit).await?;
            out.table(
                &["key", "value"],
                entries.iter().map(|(k, v)| vec![k.clone(), String::from_utf8_lossy(v).into_owned()]).collect(),
                serde_json::Value::Array(
                    entries.iter().map(|(k, v)| json!({"key": k, "value": String::from_utf8_lossy(v)})).collect(),
                ),
            );
        }
    }
    Ok(())
}
