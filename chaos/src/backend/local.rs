//! The local backend: a [`LocalCluster`] of real processes, with a [`LinkFabric`] relay on every
//! link when the scenario has link faults. Host faults are signals: SIGKILL (restart at heal),
//! SIGSTOP/SIGCONT.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use haven_client::devcluster::{DevClusterSpec, LocalCluster};
use haven_client::HavenClient;

use crate::relay::{LinkFabric, LinkShape};
use crate::scenario::{FaultKind, Scenario};

pub struct LocalBackend {
    cluster: LocalCluster,
    fabric: Option<LinkFabric>,
}

impl LocalBackend {
    pub async fn start(scenario: &Scenario, work_dir: &std::path::Path) -> anyhow::Result<Self> {
        let mut spec = DevClusterSpec::new(work_dir.join("cluster"), scenario.cluster.nodes);
        spec.election_timeout_ms = scenario.cluster.election_timeout_ms;
        if scenario.cluster.unsafe_ack_before_commit {
            spec.env.insert("HAVEN_UNSAFE_ACK_BEFORE_COMMIT".into(), "1".into());
        }
        let mut cluster = LocalCluster::create(&spec).context("creating the local cluster")?;
        let fabric = if scenario.fault_kinds().iter().any(|k| k.is_link_fault()) {
            let nodes: BTreeMap<u64, SocketAddr> = cluster.nodes().iter().map(|n| (n.id, n.addr)).collect();
            let fabric = LinkFabric::start(&spec.host, &nodes, scenario.seed).await.context("starting link relays")?;
            for id in nodes.keys() {
                cluster.set_dial_via(*id, &fabric.dial_via(*id))?;
            }
            Some(fabric)
        } else {
            None
        };
        cluster.start_all()?;
        Ok(Self { cluster, fabric })
    }

    pub fn node_ids(&self) -> Vec<u64> {
        self.cluster.nodes().iter().map(|n| n.id).collect()
    }

    pub fn node_addr(&self, id: u64) -> Option<SocketAddr> {
        self.cluster.node(id).ok().map(|n| n.addr)
    }

    pub fn client(&self) -> anyhow::Result<HavenClient> {
        Ok(self.cluster.client()?)
    }

    /// A client that talks only to `ids`.
    pub fn client_of(&self, ids: &[u64]) -> anyhow::Result<HavenClient> {
        let mut cfg = self.cluster.client_config();
        cfg.nodes = ids.iter().map(|id| self.cluster.node(*id).map(|n| n.addr)).collect::<Result<_, _>>()?;
        Ok(HavenClient::new(&cfg)?)
    }

    pub fn host_fault(&mut self, kind: FaultKind, id: u64) -> anyhow::Result<()> {
        match kind {
            FaultKind::Kill => self.cluster.kill(id)?,
            FaultKind::Pause => self.cluster.signal(id, libc::SIGSTOP)?,
            other => bail!("{other} is not a host fault"),
        }
        Ok(())
    }

    pub fn host_heal(&mut self, kind: FaultKind, id: u64) -> anyhow::Result<()> {
        match kind {
            FaultKind::Kill => self.cluster.start(id)?,
            FaultKind::Pause => self.cluster.signal(id, libc::SIGCONT)?,
            other => bail!("{other} is not a host fault"),
        }
        Ok(())
    }

    pub fn shape(&mut self, a: u64, b: u64, shape: LinkShape) -> anyhow::Result<()> {
        let Some(f) = &self.fabric else { bail!("link faults need relays, which this run did not start") };
        f.shape(a, b, shape);
        Ok(())
    }

    pub fn heal_links(&mut self) {
        if let Some(f) = &self.fabric {
            f.heal_all();
        }
    }

    pub async fn wait_healthy(&mut self, client: &HavenClient, timeout: Duration) -> anyhow::Result<u64> {
        let ids = self.node_ids();
        Ok(self.cluster.wait_healthy(client, &ids, timeout).await?.id.0)
    }

    pub fn teardown(&mut self) {
        // SIGCONT first so paused nodes can exit on SIGTERM.
        for id in self.node_ids() {
            let _ = self.cluster.signal(id, libc::SIGCONT);
        }
        self.cluster.stop_all(Duration::from_secs(5));
    }
}
