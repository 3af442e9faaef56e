//! `havenctl dev`: a local cluster of real haven-node processes for trying Haven out and for tests.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use haven_client::devcluster::{locate_node_binary, DevClusterSpec, LocalCluster};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::output::Output;

/// The node's testing switch for fault injection (`haven-node run --allow-fault-injection`).
const ALLOW_FAULTS_ENV: &str = "HAVEN_ALLOW_FAULT_INJECTION";

#[derive(Subcommand)]
pub enum DevCommand {
    /// Create and start N nodes on loopback, wait until they elect a leader, write DIR/client.toml.
    Up(UpArgs),
    /// Stop every node of the cluster in DIR (SIGTERM, then SIGKILL after a grace period).
    Down {
        /// Cluster directory given to `dev up`.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Create and start one more node (not yet a member); add it with `havenctl cluster add`.
    AddNode {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Args)]
pub struct UpArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
    nodes: u64,
    /// Directory for data dirs, certificates and logs (created; must not hold a cluster).
    #[arg(long)]
    dir: PathBuf,
    /// Raft election timeout lower bound in ms.
    #[arg(long, default_value_t = 80)]
    election_timeout_ms: u64,
    /// Path of the haven-node binary (default: next to havenctl, then PATH).
    #[arg(long, env = "HAVEN_NODE_BIN")]
    node_bin: Option<PathBuf>,
    /// Seconds to wait for the cluster to become healthy.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// TESTING ONLY: let the nodes accept fault injection (`havenctl volume corrupt`).
    #[arg(long)]
    allow_fault_injection: bool,
}

pub async fn run(cmd: DevCommand, out: &Output) -> anyhow::Result<()> {
    match cmd {
        DevCommand::Up(a) => up(a, out).await,
        DevCommand::Down { dir } => {
            let mut cluster = LocalCluster::open(&dir)?;
            let stopped = cluster.stop_all(Duration::from_secs(10));
            out.done(&format!("stopped {} node(s) in {}", stopped.len(), dir.display()), json!({"stopped": stopped}));
            Ok(())
        }
        DevCommand::AddNode { dir } => {
            let mut cluster = LocalCluster::open(&dir)?;
            let node = cluster.add_node()?;
            out.done(
                &format!(
                    "started node {} (not a member yet); add it with:\n  havenctl --cluster {} cluster add {} {} {}",
                    node.id,
                    dir.display(),
                    node.id,
                    node.addr,
                    node.admin
                ),
                json!({"id": node.id, "addr": node.addr.to_string(), "admin_addr": node.admin.to_string()}),
            );
            Ok(())
        }
    }
}

async fn up(a: UpArgs, out: &Output) -> anyhow::Result<()> {
    let mut spec = DevClusterSpec::new(&a.dir, a.nodes as usize);
    spec.node_bin = a.node_bin.unwrap_or_else(locate_node_binary);
    spec.election_timeout_ms = a.election_timeout_ms;
    if a.allow_fault_injection {
        spec.env.insert(ALLOW_FAULTS_ENV.into(), "1".into());
    }
    let bar = if out.is_json() { ProgressBar::hidden() } else { ProgressBar::new_spinner() };
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("static template"));
    bar.enable_steady_tick(Duration::from_millis(100));
    bar.set_message(format!("creating {} nodes in {}", a.nodes, a.dir.display()));
    let mut cluster = LocalCluster::create(&spec)?;
    bar.set_message("starting processes");
    cluster.start_all()?;
    cluster.detach();
    bar.set_message("waiting for a leader");
    let client = cluster.client()?;
    let ids: Vec<u64> = cluster.nodes().iter().map(|n| n.id).collect();
    let leader = cluster
        .wait_healthy(&client, &ids, Duration::from_secs(a.timeout))
        .await
        .with_context(|| format!("see the logs in {}/node-*/node.log", cluster.dir().display()))?;
    bar.finish_and_clear();
    let dir = cluster.dir().display().to_string();
    let nodes: Vec<_> = cluster
        .nodes()
        .iter()
        .map(|n| {
            json!({"id": n.id, "addr": n.addr.to_string(), "admin": n.admin.to_string(),
                   "nbd": n.nbd.map(|a| a.to_string()), "pid": n.pid})
        })
        .collect();
    let nbd = cluster.nodes()[0].nbd.map_or_else(|| "(no NBD server)".to_string(), |a| a.to_string());
    out.done(
        &format!(
            "Haven cluster of {} nodes is up; leader is {} (term {}).\n\
             \n  export HAVEN_CLUSTER={dir}\n  havenctl cluster status\n  havenctl kv put hello world && havenctl kv get hello\n\
             \n  havenctl volume create disk1 --size 64MiB --replicas 2\n  qemu-io -f raw nbd://{nbd}/disk1 -c 'write -P 0xab 0 1M'\n\
             \nMetrics and health: http://{}/metrics  http://{}/health\nLogs: {dir}/node-*/node.log\n\
             Stop it with: havenctl dev down --dir {dir}",
            ids.len(),
            leader.id,
            leader.term,
            cluster.nodes()[0].admin,
            cluster.nodes()[0].admin,
        ),
        json!({"dir": dir, "leader": leader.id.0, "term": leader.term, "nodes": nodes, "client_config": format!("{dir}/client.toml")}),
    );
    Ok(())
}
