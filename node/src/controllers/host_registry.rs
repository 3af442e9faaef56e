//! Keeps the catalog's host table equal to the Raft membership: every member has a
//! [`HostRecord`] with its current addresses, and removed members lose theirs.

use std::sync::Arc;
use std::time::Duration;

use haven_proto::{CatalogCommand, HostRecord};
use openraft::ServerState;
use tracing::{debug, warn};

use crate::catalog;
use crate::service::NodeService;

/// Run until the service's Raft shuts down.
pub async fn run(service: Arc<NodeService>, period: Duration) {
    let mut metrics = service.raft.metrics();
    loop {
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(period) => {}
        }
        if metrics.borrow().state != ServerState::Leader {
            continue;
        }
        if let Err(e) = reconcile_once(&service).await {
            debug!(error = %e, "host registry reconcile deferred");
        }
    }
}

async fn reconcile_once(service: &NodeService) -> Result<(), String> {
    let wanted: Vec<HostRecord> = service
        .status()
        .members
        .into_iter()
        .map(|m| HostRecord { id: m.id, addr: m.addr, admin_addr: m.admin_addr })
        .collect();
    let recorded = catalog::hosts(&service.store).map_err(|e| e.to_string())?;
    for host in &wanted {
        if !recorded.contains(host) {
            service.write(CatalogCommand::UpsertHost(host.clone()), 0).await.map_err(|e| e.to_string())?;
        }
    }
    for host in &recorded {
        if !wanted.iter().any(|w| w.id == host.id) {
            if let Err(e) = service.write(CatalogCommand::RemoveHost { id: host.id }, 0).await {
                warn!(id = %host.id, error = %e, "could not remove host record");
            }
        }
    }
    Ok(())
}
