//! The compose backend: the 3-node cluster of `docker-compose.yml`, brought up under its own
//! project name with certificates in the run's directory. Host faults are `docker-compose
//! kill/start/pause/unpause`; a node is isolated by disconnecting its container from the compose
//! network. Finer link faults (one-way, delay, loss, reorder) need the local backend's relays and
//! are refused here by scenario validation.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use haven_client::{ClusterConfig, HavenClient};

use crate::relay::LinkShape;
use crate::scenario::{FaultKind, Scenario};

/// The image `scripts/docker-image` builds.
pub const IMAGE: &str = "haven-node:dev";
const QUIC_PORT_BASE: u16 = 17000;

pub struct ComposeBackend {
    compose_file: PathBuf,
    project: String,
    certs_dir: PathBuf,
    isolated: BTreeSet<u64>,
}

/// Find `docker-compose.yml`: `$HAVEN_COMPOSE_FILE`, else in the current directory or above.
pub fn compose_file() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("HAVEN_COMPOSE_FILE") {
        return Ok(PathBuf::from(p));
    }
    let mut dir = std::env::current_dir()?;
    loop {
        let candidate = dir.join("docker-compose.yml");
        if candidate.is_file() {
            return Ok(candidate);
        }
        if !dir.pop() {
            bail!("docker-compose.yml not found here or above; set HAVEN_COMPOSE_FILE");
        }
    }
}

impl ComposeBackend {
    pub async fn start(scenario: &Scenario, work_dir: &Path) -> anyhow::Result<Self> {
        if scenario.cluster.unsafe_ack_before_commit {
            bail!("cluster.unsafe_ack_before_commit is only supported by the local backend");
        }
        let image = Command::new("docker").args(["image", "inspect", IMAGE]).output().context("running docker")?;
        if !image.status.success() {
            bail!("docker image {IMAGE} is missing; build it with scripts/docker-image");
        }
        let certs_dir = std::path::absolute(work_dir.join("compose-certs"))?;
        std::fs::create_dir_all(&certs_dir)?;
        let project = format!("havenchaos{}", std::process::id());
        let me = Self { compose_file: compose_file()?, project, certs_dir, isolated: BTreeSet::new() };
        me.compose(&["up", "-d"]).context("docker-compose up")?;
        Ok(me)
    }

    fn compose(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("docker-compose")
            .arg("-f")
            .arg(&self.compose_file)
            .arg("-p")
            .arg(&self.project)
            .args(args)
            .env("HAVEN_COMPOSE_CERTS", &self.certs_dir)
            .output()
            .context("running docker-compose")?;
        if !out.status.success() {
            bail!("docker-compose {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn container(&self, id: u64) -> anyhow::Result<String> {
        let c = self.compose(&["ps", "-q", &format!("haven{id}")])?;
        if c.is_empty() {
            bail!("no container for haven{id}");
        }
        Ok(c)
    }

    fn docker(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new("docker").args(args).output().context("running docker")?;
        if !out.status.success() {
            bail!("docker {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    fn network(&self) -> String {
        format!("{}_default", self.project)
    }

    pub fn node_ids(&self) -> Vec<u64> {
        vec![1, 2, 3]
    }

    pub fn node_addr(&self, id: u64) -> Option<SocketAddr> {
        (1..=3).contains(&id).then(|| SocketAddr::from(([127, 0, 0, 1], QUIC_PORT_BASE + id as u16)))
    }

    pub fn client(&self) -> anyhow::Result<HavenClient> {
        self.client_of(&self.node_ids())
    }

    /// A client that talks only to `ids`.
    pub fn client_of(&self, ids: &[u64]) -> anyhow::Result<HavenClient> {
        let cfg = ClusterConfig {
            nodes: ids.iter().filter_map(|id| self.node_addr(*id)).collect(),
            ca: self.certs_dir.join("ca.pem"),
            cert: self.certs_dir.join("client/client.pem"),
            key: self.certs_dir.join("client/client.key"),
            deadline_ms: 10_000,
        };
        Ok(HavenClient::new(&cfg)?)
    }

    pub async fn host_fault(&mut self, kind: FaultKind, id: u64) -> anyhow::Result<()> {
        let svc = format!("haven{id}");
        match kind {
            FaultKind::Kill => self.compose(&["kill", "-s", "SIGKILL", &svc])?,
            FaultKind::Pause => self.compose(&["pause", &svc])?,
            other => bail!("{other} is not a host fault"),
        };
        Ok(())
    }

    pub async fn host_heal(&mut self, kind: FaultKind, id: u64) -> anyhow::Result<()> {
        let svc = format!("haven{id}");
        match kind {
            FaultKind::Kill => self.compose(&["start", &svc])?,
            FaultKind::Pause => self.compose(&["unpause", &svc])?,
            other => bail!("{other} is not a host fault"),
        };
        Ok(())
    }

    /// Only whole-node isolation exists here: blocking any of a node's links disconnects it.
    pub async fn shape(&mut self, a: u64, _b: u64, shape: LinkShape) -> anyhow::Result<()> {
        if shape == LinkShape::healthy() {
            if self.isolated.remove(&a) {
                let c = self.container(a)?;
                self.docker(&["network", "connect", "--alias", &format!("haven{a}"), &self.network(), &c])?;
            }
            return Ok(());
        }
        if !shape.blocked || shape.delay > Duration::ZERO || shape.loss_pct > 0 || shape.reorder_pct > 0 {
            bail!("the compose backend only isolates nodes; use the local backend for finer link faults");
        }
        if self.isolated.insert(a) {
            let c = self.container(a)?;
            self.docker(&["network", "disconnect", &self.network(), &c])?;
        }
        Ok(())
    }

    pub async fn heal_links(&mut self) -> anyhow::Result<()> {
        for id in std::mem::take(&mut self.isolated) {
            let c = self.container(id)?;
            self.docker(&["network", "connect", "--alias", &format!("haven{id}"), &self.network(), &c])?;
        }
        Ok(())
    }

    pub async fn wait_healthy(&mut self, client: &HavenClient, timeout: Duration) -> anyhow::Result<u64> {
        let nodes: Vec<(u64, SocketAddr)> =
            self.node_ids().into_iter().filter_map(|id| self.node_addr(id).map(|a| (id, a))).collect();
        Ok(haven_client::devcluster::wait_healthy(client, &nodes, timeout).await?.id.0)
    }

    pub async fn teardown(&mut self) {
        if let Err(e) = self.compose(&["down", "-v", "--remove-orphans"]) {
            tracing::warn!(error = %format!("{e:#}"), "docker-compose down failed");
        }
    }
}
