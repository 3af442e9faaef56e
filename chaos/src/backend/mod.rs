//! Cluster backends: how a run gets a cluster and how faults reach it. `local` runs real
//! `haven-node` processes on loopback with a relay on every link; `compose` drives the
//! docker-compose cluster with `docker kill/pause/network disconnect`. Both expose the same
//! operations so the runner does not care which it has.

pub mod compose;
pub mod local;

use std::net::SocketAddr;

use haven_client::HavenClient;

use crate::relay::LinkShape;
use crate::scenario::{Backend as Kind, FaultKind, Scenario};

pub enum Backend {
    Local(local::LocalBackend),
    Compose(compose::ComposeBackend),
}

impl Backend {
    pub async fn start(scenario: &Scenario, work_dir: &std::path::Path) -> anyhow::Result<Self> {
        Ok(match scenario.cluster.backend {
            Kind::Local => Self::Local(local::LocalBackend::start(scenario, work_dir).await?),
            Kind::Compose => Self::Compose(compose::ComposeBackend::start(scenario, work_dir).await?),
        })
    }

    pub fn node_ids(&self) -> Vec<u64> {
        match self {
            Self::Local(b) => b.node_ids(),
            Self::Compose(b) => b.node_ids(),
        }
    }

    /// Where a client reaches node `id`.
    pub fn node_addr(&self, id: u64) -> Option<SocketAddr> {
        match self {
            Self::Local(b) => b.node_addr(id),
            Self::Compose(b) => b.node_addr(id),
        }
    }

    /// A fresh client (its own QUIC endpoint and connections).
    pub fn client(&self) -> anyhow::Result<HavenClient> {
        match self {
            Self::Local(b) => b.client(),
            Self::Compose(b) => b.client(),
        }
    }

    /// A client that talks only to node `id` (requests are served through that node, as a
    /// client with a cached route would send them).
    pub fn client_of(&self, id: u64) -> anyhow::Result<HavenClient> {
        match self {
            Self::Local(b) => b.client_of(&[id]),
            Self::Compose(b) => b.client_of(&[id]),
        }
    }

    /// Inject a process fault on node `id`.
    pub async fn host_fault(&mut self, kind: FaultKind, id: u64) -> anyhow::Result<()> {
        match self {
            Self::Local(b) => b.host_fault(kind, id),
            Self::Compose(b) => b.host_fault(kind, id).await,
        }
    }

    /// Undo a process fault on node `id` (restart or resume).
    pub async fn host_heal(&mut self, kind: FaultKind, id: u64) -> anyhow::Result<()> {
        match self {
            Self::Local(b) => b.host_heal(kind, id),
            Self::Compose(b) => b.host_heal(kind, id).await,
        }
    }

    /// Shape the traffic flowing from `a` to `b`.
    pub async fn shape(&mut self, a: u64, b: u64, shape: LinkShape) -> anyhow::Result<()> {
        match self {
            Self::Local(l) => l.shape(a, b, shape),
            Self::Compose(c) => c.shape(a, b, shape).await,
        }
    }

    pub async fn heal_links(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Local(b) => {
                b.heal_links();
                Ok(())
            }
            Self::Compose(b) => b.heal_links().await,
        }
    }

    /// Wait until every node reports healthy with one agreed leader.
    pub async fn wait_healthy(&mut self, timeout: std::time::Duration) -> anyhow::Result<u64> {
        let client = self.client()?;
        match self {
            Self::Local(b) => b.wait_healthy(&client, timeout).await,
            Self::Compose(b) => b.wait_healthy(&client, timeout).await,
        }
    }

    pub async fn teardown(&mut self) {
        match self {
            Self::Local(b) => b.teardown(),
            Self::Compose(b) => b.teardown().await,
        }
    }
}
