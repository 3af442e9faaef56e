//! The leader's volume controller: notices hosts that stopped answering and fails their volumes
//! over to an in-sync replica, and runs labeled snapshot policies on schedule.
//!
//! Failover: every `probe_ms` the leader pings each host's agent; a host silent for
//! `host_down_ms` is down. A volume whose primary is down gets a new primary chosen from its
//! in-sync replicas that are up (lowest id first), through one `SetReplication` command that
//! also removes the old primary from the in-sync set — so the old primary, when it returns, is
//! a stale replica that must resync (C5) before it counts again. Only in-sync replicas hold
//! every acknowledged write, so no acknowledged write is lost. Before it fails a volume over,
//! the controller waits until the old primary's read lease has lapsed for certain
//! (`volume::core::lease`): a primary that is only cut off would otherwise keep serving reads
//! the new primary has overwritten (the proposer holds the `SetReplication` back for the same
//! wait, as for every removal from the in-sync set, so waiting here first keeps the request
//! from tying up a proposal). The controller keeps no state a new leader would need: it
//! starts from the catalog and fresh probes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use haven_proto::volume::{SnapshotKind, VolumeCommand, VolumeRequest};
use haven_proto::{CatalogCommand, NodeId};
use tracing::{debug, info, warn};

use super::LeaderHandles;
use crate::catalog;
use crate::config::VolumeTunables;
use crate::volume::host::VolumeHost;

/// Run until the process ends; acts only while this node leads.
pub async fn run(leader: LeaderHandles, volumes: Arc<VolumeHost>, tunables: VolumeTunables) {
    let probe = Duration::from_millis(tunables.probe_ms);
    let down_after = Duration::from_millis(tunables.host_down_ms);
    let mut hosts = super::liveness::HostLiveness::new(down_after);
    let mut policy_runs: HashMap<String, Instant> = HashMap::new();
    let mut was_leader = false;
    // How long after a host's last lease request its read lease has lapsed for certain.
    let lapse = Duration::from_millis(tunables.read_lease_ms + tunables.read_lease_margin_ms);
    loop {
        tokio::time::sleep(probe).await;
        // Noted at or after the election (the proposer's, shared with the in-sync removals it
        // holds back): later than it was only lengthens the wait for an old primary's lease.
        let Some(leading_since) = leader.proposer.leading_since() else {
            was_leader = false;
            continue;
        };
        if !was_leader {
            // Fresh leadership: give every host a full detection window before judging it.
            hosts.clear();
            policy_runs.clear();
            was_leader = true;
        }
        hosts.probe(&leader, probe * 2).await;
        let is_up = |id: &NodeId| hosts.is_up(id);
        let lease_wait = |host: NodeId| leader.proposer.read_lease_wait(host, leading_since, lapse);
        fail_over(&leader, &is_up, &lease_wait).await;
        run_policies(&leader, &volumes, &mut policy_runs).await;
    }
}

async fn fail_over(leader: &LeaderHandles, is_up: &impl Fn(&NodeId) -> bool, lease_wait: &impl Fn(NodeId) -> Duration) {
    let Ok(volumes) = catalog::volumes::volumes(&leader.store) else { return };
    for v in volumes {
        if is_up(&v.primary) {
            continue;
        }
        let wait = lease_wait(v.primary);
        if !wait.is_zero() {
            debug!(vol = %v.id, primary = %v.primary, ?wait, "primary is down; waiting for its read lease to lapse");
            continue;
        }
        let Some(new_primary) = v.in_sync.iter().copied().filter(|h| *h != v.primary).find(is_up) else {
            warn!(vol = %v.id, primary = %v.primary, "primary is down and no in-sync replica is up; waiting");
            continue;
        };
        let in_sync: Vec<NodeId> = v.in_sync.iter().copied().filter(|h| *h != v.primary).collect();
        let cmd =
            VolumeCommand::SetReplication { volume: v.id, expected_epoch: v.epoch, primary: new_primary, in_sync };
        match leader.proposer.write(CatalogCommand::Volume(cmd), 0).await {
            Ok(_) => {
                metrics::counter!("haven_volume_failovers_total").increment(1);
                info!(vol = %v.id, old = %v.primary, new = %new_primary, "failed over");
                let msg = format!("{} stopped answering; {new_primary} promoted to primary", v.primary);
                let event =
                    VolumeCommand::Event { volume: v.id, kind: "failover".into(), message: msg, host: Some(v.primary) };
                let _ = leader.proposer.write(CatalogCommand::Volume(event), 0).await;
            }
            Err(e) => warn!(vol = %v.id, error = %e, "failover not committed"),
        }
    }
}

async fn run_policies(leader: &LeaderHandles, host: &Arc<VolumeHost>, runs: &mut HashMap<String, Instant>) {
    let Ok(policies) = catalog::volumes::policies(&leader.store) else { return };
    for p in policies.into_iter().filter(|p| p.interval_secs > 0) {
        let due = runs.get(&p.name).is_none_or(|t| t.elapsed() >= Duration::from_secs(p.interval_secs));
        if !due {
            continue;
        }
        runs.insert(p.name.clone(), Instant::now());
        let host = host.clone();
        let store = leader.store.clone();
        tokio::spawn(async move {
            let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
            let req = VolumeRequest::Snapshot {
                volume: p.volume,
                name: format!("{}-{ms}", p.label),
                label: Some(p.label.clone()),
                kind: SnapshotKind::Labeled,
            };
            if let Err(e) = host.client(req).await {
                warn!(policy = %p.name, error = %e, "scheduled labeled snapshot failed");
                return;
            }
            // Keep the newest `keep` snapshots carrying the label.
            let Ok(snaps) = catalog::volumes::snapshots(&store, p.volume) else { return };
            let labeled: Vec<u64> =
                snaps.iter().filter(|s| s.label.as_deref() == Some(p.label.as_str())).map(|s| s.id).collect();
            let excess = labeled.len().saturating_sub(p.keep as usize);
            for id in labeled.into_iter().take(excess) {
                let _ = host.client(VolumeRequest::DeleteSnapshot { volume: p.volume, snapshot: id }).await;
            }
        });
    }
}
