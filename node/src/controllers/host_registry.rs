//! Keeps the catalog's host table equal to the Raft membership: every member has a
//! [`HostRecord`] with its current addresses, and removed members lose theirs.

use std::time::Duration;

use haven_proto::{CatalogCommand, HostRecord};
use openraft::ServerState;
use tracing::{debug, warn};

use super::LeaderHandles;
use crate::catalog;

/// Run until the node's Raft shuts down.
pub async fn run(leader: LeaderHandles, period: Duration) {
    let mut metrics = leader.view.metrics();
    loop {
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(period) => {}
        }
        if metrics.borrow().state != ServerState::Leader {
            continue;
        }
        if let Err(e) = reconcile_once(&leader).await {
            debug!(error = %e, "host registry reconcile deferred");
        }
    }
}

async fn reconcile_once(leader: &LeaderHandles) -> Result<(), String> {
    let wanted: Vec<HostRecord> = leader
        .view
        .status()
        .members
        .into_iter()
        .map(|m| HostRecord { id: m.id, addr: m.addr, admin_addr: m.admin_addr })
        .collect();
    let recorded = catalog::hosts(&leader.store).map_err(|e| e.to_string())?;
    for host in &wanted {
        if !recorded.contains(host) {
            leader.proposer.write(CatalogCommand::UpsertHost(host.clone()), 0).await.map_err(|e| e.to_string())?;
        }
    }
    for host in &recorded {
        if !wanted.iter().any(|w| w.id == host.id) {
            if let Err(e) = leader.proposer.write(CatalogCommand::RemoveHost { id: host.id }, 0).await {
                warn!(id = %host.id, error = %e, "could not remove host record");
            }
        }
    }
    Ok(())
}
