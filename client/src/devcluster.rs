//! A local cluster of real `haven-node` processes on loopback: create data dirs and certificates,
//! start, stop, signal (kill -9, pause, resume) and wait for health.
//!
//! Used by `havenctl dev up/down`, the multi-process tests, the benchmarks and the chaos harness,
//! so there is one way to run a cluster on one machine. The cluster directory holds `ca/` (the
//! cluster CA), `client/` (a client certificate), `client.toml` (for the SDK and havenctl),
//! `cluster.toml` (this manifest: ids, ports, pids) and one `node-N/` data dir per node with its
//! `node.log`. This module never deletes a directory it did not create.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use haven_proto::{NodeId, NodeRole, NodeStatus};
use serde::{Deserialize, Serialize};

use crate::config::ClusterConfig;
use crate::HavenClient;

pub const MANIFEST_FILE: &str = "cluster.toml";

#[derive(Debug, thiserror::Error)]
pub enum DevClusterError {
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("cluster not healthy after {waited:?}: {detail}")]
    NotHealthy { waited: Duration, detail: String },
    #[error("unknown node {0}")]
    UnknownNode(u64),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DevClusterError {
    let what = what.into();
    move |source| DevClusterError::Io { what, source }
}

/// How to build a local cluster.
#[derive(Debug, Clone)]
pub struct DevClusterSpec {
    pub dir: PathBuf,
    pub nodes: usize,
    pub node_bin: PathBuf,
    /// Lower bound of the Raft election timeout.
    pub election_timeout_ms: u64,
    /// Snapshot after this many entries (small values exercise snapshot catch-up).
    pub snapshot_after: u64,
    /// Loopback IP to bind (e.g. 127.0.0.1).
    pub host: String,
    /// Extra environment for every node process.
    pub env: BTreeMap<String, String>,
    /// Host/replica failure detection threshold in ms (None = the node's default).
    pub failure_detect_ms: Option<u64>,
}

impl DevClusterSpec {
    pub fn new(dir: impl Into<PathBuf>, nodes: usize) -> Self {
        Self {
            dir: dir.into(),
            nodes,
            node_bin: locate_node_binary(),
            election_timeout_ms: 80,
            snapshot_after: 10_000,
            host: "127.0.0.1".into(),
            env: BTreeMap::new(),
            failure_detect_ms: None,
        }
    }
}

/// One node as the manifest records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeEntry {
    pub id: u64,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// NBD server address (volumes as NBD exports).
    #[serde(default)]
    pub nbd: Option<SocketAddr>,
    pub data_dir: PathBuf,
    #[serde(default)]
    pub pid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
struct Manifest {
    node_bin: PathBuf,
    election_timeout_ms: u64,
    snapshot_after: u64,
    host: String,
    /// Extra environment for every node process (e.g. test-only switches).
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    failure_detect_ms: Option<u64>,
    nodes: Vec<NodeEntry>,
}

/// The `haven-node` binary: `$HAVEN_NODE_BIN`, else next to the running executable (or one
/// directory up, for test binaries in `target/*/deps`), else `haven-node` on `PATH`.
pub fn locate_node_binary() -> PathBuf {
    locate_binary("haven-node", "HAVEN_NODE_BIN")
}

/// A companion binary `name`: `$env_var`, else next to the running executable (or one directory
/// up), else `name` on `PATH`.
pub fn locate_binary(name: &str, env_var: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_var) {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from(name)
}

/// Pick a free port (UDP for QUIC, TCP for admin and NBD) on `host`.
///
/// The port is free when chosen but only bound later, by the node. A port from the kernel's
/// ephemeral range could meanwhile be handed to any process's outgoing socket (a QUIC client
/// endpoint, say), and the node would fail to bind it. So ports are drawn at random from below
/// that range, where the kernel never allocates on its own; only another explicit pick can
/// collide, and the bind check below rules out ports already taken.
fn free_port(host: &str, udp: bool) -> Result<SocketAddr, DevClusterError> {
    use rand::Rng;
    let check = |port: u16| -> std::io::Result<SocketAddr> {
        let addr = format!("{host}:{port}");
        if udp {
            UdpSocket::bind(&addr).and_then(|s| s.local_addr())
        } else {
            TcpListener::bind(&addr).and_then(|s| s.local_addr())
        }
    };
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32768);
    if ephemeral_start > 12_000 {
        let mut rng = rand::rng();
        for _ in 0..64 {
            if let Ok(a) = check(rng.random_range(10_000..ephemeral_start)) {
                return Ok(a);
            }
        }
    }
    let what = if udp { "UDP" } else { "TCP" };
    check(0).map_err(io(format!("finding a free {what} port on {host}")))
}

/// A local cluster. Children started by this value are killed when it is dropped unless
/// [`LocalCluster::detach`] was called (as `havenctl dev up` does).
pub struct LocalCluster {
    dir: PathBuf,
    manifest: Manifest,
    children: BTreeMap<u64, Child>,
    detached: bool,
}

impl LocalCluster {
    /// Create data dirs, certificates and configs for a new cluster in `spec.dir` (which must not
    /// already hold one). Nothing is started.
    pub fn create(spec: &DevClusterSpec) -> Result<Self, DevClusterError> {
        if spec.nodes == 0 {
            return Err(DevClusterError::Setup("a cluster needs at least one node".into()));
        }
        if spec.dir.join(MANIFEST_FILE).exists() {
            return Err(DevClusterError::Setup(format!(
                "{} already holds a cluster; run `havenctl dev down --dir {}` or choose another --dir",
                spec.dir.display(),
                spec.dir.display()
            )));
        }
        std::fs::create_dir_all(&spec.dir).map_err(io(format!("creating {}", spec.dir.display())))?;
        let dir = spec.dir.canonicalize().map_err(io(format!("resolving {}", spec.dir.display())))?;
        let mut manifest = Manifest {
            node_bin: spec.node_bin.clone(),
            election_timeout_ms: spec.election_timeout_ms,
            snapshot_after: spec.snapshot_after,
            host: spec.host.clone(),
            env: spec.env.clone(),
            failure_detect_ms: spec.failure_detect_ms,
            nodes: Vec::new(),
        };
        for id in 1..=spec.nodes as u64 {
            manifest.nodes.push(NodeEntry {
                id,
                addr: free_port(&spec.host, true)?,
                admin: free_port(&spec.host, false)?,
                nbd: Some(free_port(&spec.host, false)?),
                data_dir: dir.join(format!("node-{id}")),
                pid: None,
            });
        }
        let bootstrap =
            manifest.nodes.iter().map(|n| format!("{}@{}@{}", n.id, n.addr, n.admin)).collect::<Vec<_>>().join(",");
        let cluster = Self { dir, manifest, children: BTreeMap::new(), detached: false };
        for i in 0..cluster.manifest.nodes.len() {
            let node = cluster.manifest.nodes[i].clone();
            cluster.init_node(&node, (i == 0).then_some(bootstrap.as_str()))?;
        }
        let (ca, client) = (cluster.dir.join("ca"), cluster.dir.join("client"));
        cluster.run_node_bin(
            "issuing the client certificate",
            &["issue-cert".as_ref(), "--ca-dir".as_ref(), ca.as_os_str(), "--out".as_ref(), client.as_os_str()],
        )?;
        // Relative paths keep the directory relocatable; `ClusterConfig::load` resolves them.
        let portable = ClusterConfig {
            ca: "client/ca.pem".into(),
            cert: "client/client.pem".into(),
            key: "client/client.key".into(),
            ..cluster.client_config()
        };
        portable.save(&cluster.dir).map_err(|e| DevClusterError::Setup(e.to_string()))?;
        cluster.save()?;
        Ok(cluster)
    }

    /// Open an existing cluster directory (to stop it, signal it, or add nodes).
    pub fn open(dir: &Path) -> Result<Self, DevClusterError> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            DevClusterError::Setup(format!("{}: {e} (is this a `havenctl dev up` directory?)", path.display()))
        })?;
        let manifest: Manifest = toml::from_str(&text)
            .map_err(|e| DevClusterError::Setup(format!("{}: {}", path.display(), e.message())))?;
        Ok(Self { dir: dir.to_path_buf(), manifest, children: BTreeMap::new(), detached: true })
    }

    fn save(&self) -> Result<(), DevClusterError> {
        let text = toml::to_string(&self.manifest).map_err(|e| DevClusterError::Setup(e.to_string()))?;
        let path = self.dir.join(MANIFEST_FILE);
        std::fs::write(&path, text).map_err(io(format!("writing {}", path.display())))
    }

    fn run_node_bin(&self, what: &str, args: &[&std::ffi::OsStr]) -> Result<(), DevClusterError> {
        let out = Command::new(&self.manifest.node_bin)
            .args(args)
            .output()
            .map_err(io(format!("running {}", self.manifest.node_bin.display())))?;
        if !out.status.success() {
            return Err(DevClusterError::Setup(format!(
                "{what} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    fn init_node(&self, node: &NodeEntry, bootstrap: Option<&str>) -> Result<(), DevClusterError> {
        let (id, addr, admin) = (node.id.to_string(), node.addr.to_string(), node.admin.to_string());
        let (election, snapshot) =
            (self.manifest.election_timeout_ms.to_string(), self.manifest.snapshot_after.to_string());
        let ca = self.dir.join("ca");
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "init".as_ref(),
            "--data-dir".as_ref(),
            node.data_dir.as_os_str(),
            "--id".as_ref(),
            id.as_ref(),
            "--listen".as_ref(),
            addr.as_ref(),
            "--admin-listen".as_ref(),
            admin.as_ref(),
            "--ca-dir".as_ref(),
            ca.as_os_str(),
            "--election-timeout-ms".as_ref(),
            election.as_ref(),
            "--snapshot-after".as_ref(),
            snapshot.as_ref(),
        ];
        let nbd = node.nbd.map(|a| a.to_string());
        if let Some(nbd) = &nbd {
            // A dev cluster listens on loopback only, so its NBD server takes plain clients
            // (`qemu-io nbd://...`) with full access; a node's own default is to require TLS.
            // Set `HAVEN_NBD_TLS` in the spec's `env` to run the nodes in another mode.
            let flags: [&std::ffi::OsStr; 4] =
                ["--nbd-listen".as_ref(), nbd.as_ref(), "--nbd-tls".as_ref(), "off".as_ref()];
            args.extend(flags);
        }
        let detect = self.manifest.failure_detect_ms.map(|v| v.to_string());
        if let Some(d) = &detect {
            args.push("--failure-detect-ms".as_ref());
            args.push(d.as_ref());
        }
        if let Some(b) = bootstrap {
            args.push("--bootstrap".as_ref());
            args.push(b.as_ref());
        }
        self.run_node_bin(&format!("haven-node init for node {}", node.id), &args)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn nodes(&self) -> &[NodeEntry] {
        &self.manifest.nodes
    }

    pub fn node(&self, id: u64) -> Result<&NodeEntry, DevClusterError> {
        self.manifest.nodes.iter().find(|n| n.id == id).ok_or(DevClusterError::UnknownNode(id))
    }

    /// The SDK configuration for this cluster.
    pub fn client_config(&self) -> ClusterConfig {
        ClusterConfig {
            nodes: self.manifest.nodes.iter().map(|n| n.addr).collect(),
            ca: self.dir.join("client/ca.pem"),
            cert: self.dir.join("client/client.pem"),
            key: self.dir.join("client/client.key"),
            deadline_ms: 10_000,
        }
    }

    pub fn client(&self) -> Result<HavenClient, DevClusterError> {
        HavenClient::new(&self.client_config()).map_err(|e| DevClusterError::Setup(e.to_string()))
    }

    /// Keep the processes running after this value is dropped.
    pub fn detach(&mut self) {
        self.detached = true;
    }

    pub fn start_all(&mut self) -> Result<(), DevClusterError> {
        let ids: Vec<u64> = self.manifest.nodes.iter().map(|n| n.id).collect();
        for id in ids {
            self.start(id)?;
        }
        Ok(())
    }

    /// Start (or restart) node `id` in its own process group, logging to `<data-dir>/node.log`.
    pub fn start(&mut self, id: u64) -> Result<(), DevClusterError> {
        if self.is_running(id) {
            return Ok(());
        }
        let node = self.node(id)?.clone();
        let log_path = node.data_dir.join("node.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?;
        let log2 = log.try_clone().map_err(io("duplicating log handle"))?;
        let mut cmd = Command::new(&self.manifest.node_bin);
        cmd.arg("run").arg("--data-dir").arg(&node.data_dir).stdin(Stdio::null()).stdout(log).stderr(log2);
        cmd.envs(&self.manifest.env);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info,openraft=warn");
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().map_err(io(format!("starting {}", self.manifest.node_bin.display())))?;
        let pid = child.id();
        self.children.insert(id, child);
        if let Some(n) = self.manifest.nodes.iter_mut().find(|n| n.id == id) {
            n.pid = Some(pid);
        }
        self.save()
    }

    /// Whether node `id`'s recorded process is alive (and is a haven-node).
    pub fn is_running(&mut self, id: u64) -> bool {
        if let Some(child) = self.children.get_mut(&id) {
            return matches!(child.try_wait(), Ok(None));
        }
        let Some(pid) = self.manifest.nodes.iter().find(|n| n.id == id).and_then(|n| n.pid) else { return false };
        pid_is_haven_node(pid)
    }

    /// Send `signal` (e.g. `libc::SIGKILL`, `SIGSTOP`, `SIGCONT`, `SIGTERM`) to node `id`.
    pub fn signal(&mut self, id: u64, signal: i32) -> Result<(), DevClusterError> {
        let pid = self.node(id)?.pid.ok_or_else(|| DevClusterError::Setup(format!("node {id} was never started")))?;
        if !self.is_running(id) {
            return Err(DevClusterError::Setup(format!("node {id} is not running")));
        }
        // SAFETY: kill(2) with a pid we started and just checked is alive; no memory is touched.
        let rc = unsafe { libc::kill(pid as i32, signal) };
        if rc != 0 {
            return Err(DevClusterError::Io {
                what: format!("signalling node {id}"),
                source: std::io::Error::last_os_error(),
            });
        }
        if signal == libc::SIGKILL || signal == libc::SIGTERM {
            self.reap(id, Duration::from_secs(10));
        }
        Ok(())
    }

    /// kill -9 node `id` and wait for it to be gone.
    pub fn kill(&mut self, id: u64) -> Result<(), DevClusterError> {
        self.signal(id, libc::SIGKILL)
    }

    fn reap(&mut self, id: u64, within: Duration) {
        let deadline = Instant::now() + within;
        if let Some(mut child) = self.children.remove(&id) {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        } else {
            while Instant::now() < deadline && self.is_running(id) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGTERM every node, then SIGKILL any still running after `grace`.
    pub fn stop_all(&mut self, grace: Duration) -> Vec<u64> {
        let ids: Vec<u64> = self.manifest.nodes.iter().map(|n| n.id).collect();
        let mut stopped = Vec::new();
        for &id in &ids {
            if self.is_running(id) {
                let pid = self.manifest.nodes.iter().find(|n| n.id == id).and_then(|n| n.pid).unwrap_or(0);
                // SAFETY: as in `signal`.
                unsafe { libc::kill(pid as i32, libc::SIGCONT) };
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                stopped.push(id);
            }
        }
        for &id in &stopped {
            self.reap(id, grace);
            if self.is_running(id) {
                let _ = self.signal(id, libc::SIGKILL);
            }
        }
        for n in &mut self.manifest.nodes {
            n.pid = None;
        }
        let _ = self.save();
        stopped
    }

    /// Make node `id` dial each peer in `via` (peer id → address) instead of the peer's membership
    /// address; takes effect at the node's next start. Used to route links through relays.
    pub fn set_dial_via(&self, id: u64, via: &BTreeMap<u64, SocketAddr>) -> Result<(), DevClusterError> {
        let table: toml::Table = via.iter().map(|(k, v)| (k.to_string(), toml::Value::String(v.to_string()))).collect();
        self.edit_config(id, |doc| {
            doc.insert("dial_via".into(), toml::Value::Table(table));
        })
    }

    /// Set `[section] key = value` in node `id`'s `haven.toml`; takes effect at the node's next
    /// start (benchmarks use it to run a baseline configuration, e.g. `storage.layout`).
    pub fn set_config(&self, id: u64, section: &str, key: &str, value: toml::Value) -> Result<(), DevClusterError> {
        self.edit_config(id, |doc| {
            let entry = doc.entry(section.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(t) = entry {
                t.insert(key.to_string(), value);
            }
        })
    }

    fn edit_config(&self, id: u64, edit: impl FnOnce(&mut toml::Table)) -> Result<(), DevClusterError> {
        let path = self.node(id)?.data_dir.join("haven.toml");
        let text = std::fs::read_to_string(&path).map_err(io(format!("reading {}", path.display())))?;
        let mut doc: toml::Table = toml::from_str(&text)
            .map_err(|e| DevClusterError::Setup(format!("{}: {}", path.display(), e.message())))?;
        edit(&mut doc);
        let text = toml::to_string(&doc).map_err(|e| DevClusterError::Setup(e.to_string()))?;
        std::fs::write(&path, text).map_err(io(format!("writing {}", path.display())))
    }

    /// Create and start a new node that is not part of the cluster yet (for `cluster add`).
    pub fn add_node(&mut self) -> Result<NodeEntry, DevClusterError> {
        let id = self.manifest.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        let node = NodeEntry {
            id,
            addr: free_port(&self.manifest.host, true)?,
            admin: free_port(&self.manifest.host, false)?,
            nbd: Some(free_port(&self.manifest.host, false)?),
            data_dir: self.dir.join(format!("node-{id}")),
            pid: None,
        };
        self.init_node(&node, None)?;
        self.manifest.nodes.push(node.clone());
        self.save()?;
        self.start(id)?;
        Ok(node)
    }

    /// Wait until every node in `expect` reports healthy and they agree on one leader.
    pub async fn wait_healthy(
        &mut self,
        client: &HavenClient,
        expect: &[u64],
        timeout: Duration,
    ) -> Result<NodeStatus, DevClusterError> {
        let nodes =
            expect.iter().map(|&id| Ok((id, self.node(id)?.addr))).collect::<Result<Vec<_>, DevClusterError>>()?;
        wait_healthy(client, &nodes, timeout).await
    }
}

/// Wait until every node in `nodes` (id, address) reports healthy and they agree on one leader,
/// which must be among them. Returns the leader's status.
pub async fn wait_healthy(
    client: &HavenClient,
    nodes: &[(u64, SocketAddr)],
    timeout: Duration,
) -> Result<NodeStatus, DevClusterError> {
    let start = Instant::now();
    loop {
        let detail = match check_health(client, nodes).await {
            Ok(s) => return Ok(s),
            Err(d) => d,
        };
        if start.elapsed() > timeout {
            return Err(DevClusterError::NotHealthy { waited: timeout, detail });
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn check_health(client: &HavenClient, nodes: &[(u64, SocketAddr)]) -> Result<NodeStatus, String> {
    let mut leader: Option<NodeId> = None;
    let mut leader_status = None;
    for &(id, addr) in nodes {
        let st = client.status_of(addr).await.map_err(|e| format!("node {id}: {e}"))?;
        if !st.healthy {
            return Err(format!("node {id} is {:?} without a leader", st.role));
        }
        match leader {
            None => leader = st.leader,
            Some(l) if Some(l) != st.leader => {
                return Err(format!("nodes disagree on the leader ({l} vs {:?})", st.leader))
            }
            _ => {}
        }
        if st.role == NodeRole::Leader {
            leader_status = Some(st);
        }
    }
    leader_status.ok_or_else(|| "the leader is not among the expected nodes yet".into())
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if !self.detached {
            for (_, mut child) in std::mem::take(&mut self.children) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn pid_is_haven_node(pid: u32) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => {
            let first = cmdline.split(|b| *b == 0).next().unwrap_or_default();
            // A zombie has an empty cmdline: treat it as not running.
            String::from_utf8_lossy(first).ends_with("haven-node")
        }
        Err(_) => false,
    }
}
