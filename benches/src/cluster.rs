//! Local clusters for the whole-system benchmarks: a scratch directory, the `haven-node` binary,
//! and clients aimed at chosen nodes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use haven_client::devcluster::{locate_node_binary, DevClusterSpec, LocalCluster};
use haven_client::proto::{NodeId, NodeStatus};
use haven_client::HavenClient;

/// How long a freshly started cluster may take to elect a leader before the benchmark gives up.
pub const HEALTHY_TIMEOUT: Duration = Duration::from_secs(60);

/// A scratch directory for one benchmark run, removed on drop unless kept.
pub struct ScratchDir {
    tmp: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl ScratchDir {
    /// A new directory named `<prefix>…` under `base` (default: the system temp dir). With `keep`
    /// it survives the run (node logs stay readable) and its path is printed on stderr.
    pub fn new(prefix: &str, base: Option<&Path>, keep: bool) -> anyhow::Result<Self> {
        let base = base.map_or_else(std::env::temp_dir, Path::to_path_buf);
        std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&base)
            .with_context(|| format!("creating a scratch dir in {}", base.display()))?;
        let path = tmp.path().to_path_buf();
        if keep {
            eprintln!("keeping scratch dir {}", path.display());
            return Ok(Self { tmp: None, path: tmp.keep() });
        }
        Ok(Self { tmp: Some(tmp), path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the directory is removed at the end of the run.
    pub fn is_temporary(&self) -> bool {
        self.tmp.is_some()
    }
}

/// The `haven-node` binary: `explicit`, else `$HAVEN_NODE_BIN`, else next to this executable.
/// Fails with a hint when it is not there, instead of failing later inside cluster creation.
pub fn node_binary(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = explicit.unwrap_or_else(locate_node_binary);
    // A bare name is looked up on PATH by the OS; anything else must exist.
    if path.components().count() > 1 && !path.is_file() {
        bail!(
            "haven-node binary not found at {}; build it first with `cargo build -p haven-node --bin haven-node` \
             or pass --node-bin / set HAVEN_NODE_BIN",
            path.display()
        );
    }
    Ok(path)
}

/// The election timeout lower bound `DevClusterSpec` uses (and so `havenctl dev up`).
pub fn default_election_timeout_ms() -> u64 {
    DevClusterSpec::new(PathBuf::new(), 1).election_timeout_ms
}

/// A started, healthy local cluster.
pub struct RunningCluster {
    pub cluster: LocalCluster,
    pub ids: Vec<u64>,
    /// The leader's status when the cluster first became healthy.
    pub leader: NodeStatus,
}

impl RunningCluster {
    /// Create a cluster of `nodes` nodes in `dir`, start every node and wait until they agree on
    /// a leader.
    pub async fn start(dir: &Path, nodes: usize, node_bin: &Path, election_timeout_ms: u64) -> anyhow::Result<Self> {
        Self::start_configured(dir, nodes, node_bin, election_timeout_ms, &[]).await
    }

    /// [`RunningCluster::start`] with `settings` (`section`, `key`, value) written into every
    /// node's `haven.toml` before the first start.
    pub async fn start_configured(
        dir: &Path,
        nodes: usize,
        node_bin: &Path,
        election_timeout_ms: u64,
        settings: &[(&str, &str, toml::Value)],
    ) -> anyhow::Result<Self> {
        let mut spec = DevClusterSpec::new(dir, nodes);
        spec.node_bin = node_bin.to_path_buf();
        spec.election_timeout_ms = election_timeout_ms;
        let mut cluster =
            LocalCluster::create(&spec).with_context(|| format!("creating a cluster in {}", dir.display()))?;
        let ids: Vec<u64> = cluster.nodes().iter().map(|n| n.id).collect();
        for id in &ids {
            for (section, key, value) in settings {
                cluster.set_config(*id, section, key, value.clone())?;
            }
        }
        cluster.start_all().context("starting the cluster")?;
        let client = cluster.client().context("building a client")?;
        let leader = cluster
            .wait_healthy(&client, &ids, HEALTHY_TIMEOUT)
            .await
            .with_context(|| format!("waiting for the {nodes}-node cluster in {} to elect a leader", dir.display()))?;
        Ok(Self { cluster, ids, leader })
    }

    /// A new client (own endpoint, no cached connections) that knows only `nodes`, in that order.
    pub fn client_for(&self, nodes: &[u64]) -> anyhow::Result<HavenClient> {
        client_for(&self.cluster, nodes)
    }

    /// A new client that tries `leader` first. The SDK remembers whichever node answered a write
    /// as "the leader", even a follower that merely forwarded it, so a client that starts at a
    /// follower pays an extra hop on every write; benchmarks start at the leader.
    pub fn client_leader_first(&self, leader: NodeId) -> anyhow::Result<HavenClient> {
        let mut order = vec![leader.0];
        order.extend(self.ids.iter().copied().filter(|id| *id != leader.0));
        self.client_for(&order)
    }
}

/// A new client (own endpoint, no cached connections) that knows only `nodes`, in that order.
pub fn client_for(cluster: &LocalCluster, nodes: &[u64]) -> anyhow::Result<HavenClient> {
    let mut cfg = cluster.client_config();
    cfg.nodes = nodes.iter().map(|id| cluster.node(*id).map(|n| n.addr)).collect::<Result<_, _>>()?;
    Ok(HavenClient::new(&cfg)?)
}

/// Flags of the benchmarks that start clusters (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterFlags {
    /// The haven-node binary (default: $HAVEN_NODE_BIN, else next to this executable).
    #[arg(long)]
    pub node_bin: Option<std::path::PathBuf>,
    /// Directory for cluster data and any local baseline (default: the system temp dir). Put it
    /// on the filesystem whose fsync cost you want to measure.
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    /// Keep the scratch directory (node logs) after the run.
    #[arg(long)]
    pub keep_dir: bool,
    /// Raft election timeout lower bound for the clusters, in ms; the upper bound is twice this
    /// (default: `DevClusterSpec`'s, the same as `havenctl dev up`).
    #[arg(long)]
    pub election_timeout_ms: Option<u64>,
}

impl ClusterFlags {
    /// The election timeout asked for, or the dev-cluster default.
    pub fn election_timeout_ms(&self) -> u64 {
        self.election_timeout_ms.unwrap_or_else(default_election_timeout_ms)
    }

    /// The haven-node binary and a scratch directory named after `bench`.
    pub fn prepare(&self, bench: &str) -> anyhow::Result<(std::path::PathBuf, ScratchDir)> {
        let node_bin = node_binary(self.node_bin.clone())?;
        let scratch = ScratchDir::new(bench, self.dir.as_deref(), self.keep_dir)?;
        Ok((node_bin, scratch))
    }
}

/// How [`await_new_leader`] polls: every `poll`, each status request abandoned after
/// `probe_timeout`, giving up `give_up` after the kill.
#[derive(Debug, Clone, Copy)]
pub struct LeaderWatch {
    pub poll: Duration,
    pub probe_timeout: Duration,
    pub give_up: Duration,
}

/// After a leader (`killed`, leading in `old_term`) was stopped at `t0`: poll every survivor
/// until one reports a leader other than `killed` in a term after `old_term`. Returns the time
/// since `t0` and the new leader, or `None` once `watch.give_up` has passed.
pub async fn await_new_leader(
    client: &HavenClient,
    survivors: &[SocketAddr],
    killed: u64,
    old_term: u64,
    t0: std::time::Instant,
    watch: LeaderWatch,
) -> Option<(Duration, u64)> {
    let mut set = tokio::task::JoinSet::new();
    for &addr in survivors {
        let client = client.clone();
        set.spawn(async move {
            while t0.elapsed() < watch.give_up {
                if let Ok(Ok(st)) = tokio::time::timeout(watch.probe_timeout, client.status_of(addr)).await {
                    if let Some(NodeId(l)) = st.leader.filter(|l| st.term > old_term && l.0 != killed) {
                        return Some((t0.elapsed(), l));
                    }
                }
                tokio::time::sleep(watch.poll).await;
            }
            None
        });
    }
    while let Some(res) = set.join_next().await {
        if let Ok(Some(found)) = res {
            return Some(found);
        }
    }
    None
}
