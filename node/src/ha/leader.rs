//! The leader's HA loop: while this node leads, a [`FailoverCore`] is fed the catalog's hosts
//! and pair records and every host's heartbeat, and its decisions are carried out — failovers,
//! re-protection and standby replacement proposed to the catalog (compare-and-sets on the pair
//! generation), takeover orders sent, events logged and counted. A new leader starts a new core
//! (volatile by design: the records say where every pair is, and every host gets a full
//! heartbeat window before it counts as lost).
//!
//! Must not: decide (the core does) or touch guests (`super::host` does).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use haven_proto::ha::{HaCommand, HaMessage};
use haven_proto::{ActorMessage, CatalogCommand, NodeId};
use tracing::{debug, info, warn};

use super::core::failover::{FailoverCore, HostInfo, LeaderAction, LeaderEvent};
use super::core::HaTunables;
use crate::controllers::LeaderHandles;

/// How often the leader decides.
const TICK: Duration = Duration::from_millis(20);

/// The leader's HA state on this node, shared by the loop and the HA actor (heartbeats and
/// takeover answers arrive there).
#[derive(Clone)]
pub struct LeaderSlot {
    handles: LeaderHandles,
    tun: HaTunables,
    started: Instant,
    core: Arc<Mutex<Option<FailoverCore>>>,
    /// The failovers already measured, per pair (`failovers` of its record).
    measured: Arc<Mutex<std::collections::HashMap<haven_proto::VmId, u64>>>,
}

impl LeaderSlot {
    pub fn new(handles: LeaderHandles, tun: HaTunables) -> Self {
        Self { handles, tun, started: Instant::now(), core: Arc::default(), measured: Arc::default() }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The current Raft leader, as this node knows it.
    pub fn leader_id(&self) -> Option<NodeId> {
        self.handles.view.metrics().borrow().current_leader.map(NodeId)
    }

    /// A heartbeat or a takeover answer; dropped unless this node leads.
    pub fn on_message(&self, from: NodeId, msg: &HaMessage) {
        let now = self.now_ms();
        let mut core = self.core.lock().expect("ha leader lock");
        if let Some(core) = core.as_mut() {
            if let Err(e) = core.on_message(from, msg, now) {
                debug!(%from, error = %e, "HA message refused by the leader");
            }
        }
    }

    /// Decide every [`TICK`] while leading, forever.
    pub async fn run(self) {
        loop {
            tokio::time::sleep(TICK).await;
            if !self.handles.view.is_leader() {
                *self.core.lock().expect("ha leader lock") = None;
                continue;
            }
            let actions = match self.decide() {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "HA leader: reading the catalog");
                    continue;
                }
            };
            for action in actions {
                self.act(action);
            }
        }
    }

    fn decide(&self) -> Result<Vec<LeaderAction>, crate::storage::StoreError> {
        let store = &self.handles.store;
        let draining: HashSet<NodeId> = crate::catalog::vms::draining_hosts(store)?.into_iter().collect();
        let hosts: Vec<HostInfo> = crate::catalog::hosts(store)?
            .iter()
            .map(|h| HostInfo { id: h.id, draining: draining.contains(&h.id) })
            .collect();
        let pairs = crate::catalog::ha::pairs(store)?;
        self.measure_failovers(&pairs);
        let now = self.now_ms();
        let mut guard = self.core.lock().expect("ha leader lock");
        let core = guard.get_or_insert_with(|| {
            info!("leading: HA failover decisions start (every host gets a full heartbeat window)");
            FailoverCore::new(self.tun.clone(), now)
        });
        core.set_hosts(&hosts);
        for r in &pairs {
            if let Err(e) = core.on_record(r) {
                warn!(vm = %r.vm, error = %e, "HA pair record refused by the leader");
            }
        }
        let live: HashSet<_> = pairs.iter().map(|r| r.vm).collect();
        let stale: Vec<_> = core.vms().into_iter().filter(|vm| !live.contains(vm)).collect();
        for vm in stale {
            core.on_deleted(vm);
        }
        Ok(core.tick(now))
    }

    /// `haven_ha_failover_seconds`: from the decision to the new primary running the VM, once
    /// per failover, when its record carries the time it took.
    fn measure_failovers(&self, pairs: &[haven_proto::ha::HaPairRecord]) {
        let mut measured = self.measured.lock().expect("ha measured lock");
        for r in pairs {
            let Some(f) = r.last_failover.as_ref().filter(|f| f.took_ms > 0) else { continue };
            let seen = measured.entry(r.vm).or_insert(0);
            if *seen < r.failovers {
                *seen = r.failovers;
                metrics::histogram!("haven_ha_failover_seconds").record(f.took_ms as f64 / 1000.0);
                info!(vm = %r.vm, from = %f.from, to = %f.to, took_ms = f.took_ms, "HA failover complete");
            }
        }
    }

    fn act(&self, action: LeaderAction) {
        match action {
            LeaderAction::Propose(cmd) => {
                let proposer = self.handles.proposer.clone();
                tokio::spawn(async move {
                    let what = describe(&cmd);
                    match proposer.write(CatalogCommand::Ha(cmd), 0).await {
                        Ok(r) => info!(change = %what, outcome = ?r, "HA change proposed"),
                        Err(e) => warn!(change = %what, error = %e, "HA change not committed (retried)"),
                    }
                });
            }
            LeaderAction::Send { to, msg } => {
                let registry = self.handles.registry.clone();
                let from = self.handles.view.id();
                tokio::spawn(async move {
                    let addr = super::host::actor(to);
                    if let Err(e) = registry.send_timeout(addr, ActorMessage::Ha { from, msg }, TICK * 50).await {
                        debug!(%to, error = %e, "HA order not delivered (resent)");
                    }
                });
            }
            LeaderAction::Event(e) => event(&e),
        }
    }
}

fn describe(cmd: &HaCommand) -> String {
    match cmd {
        HaCommand::Failover { vm, to, reason, .. } => format!("fail {vm} over to {to} ({reason})"),
        HaCommand::Reprotect { vm, standby: Some(s), .. } => format!("protect {vm} with standby {s}"),
        HaCommand::Reprotect { vm, standby: None, .. } => format!("record {vm} degraded (no standby)"),
        other => format!("{other:?}"),
    }
}

fn event(e: &LeaderEvent) {
    let name = match e {
        LeaderEvent::PrimaryLost { .. } => "primary_lost",
        LeaderEvent::NoReadyStandby { .. } => "no_ready_standby",
        LeaderEvent::StandbyLost { .. } => "standby_lost",
        LeaderEvent::TakeoverFailed { .. } => "takeover_failed",
        LeaderEvent::VmLost { .. } => "vm_lost",
    };
    metrics::counter!("haven_ha_events_total", "event" => name).increment(1);
    match e {
        LeaderEvent::VmLost { .. } | LeaderEvent::NoReadyStandby { .. } | LeaderEvent::TakeoverFailed { .. } => {
            warn!(event = ?e, "HA")
        }
        _ => info!(event = ?e, "HA"),
    }
}
