//! The leader's share controller: a share whose hub host stopped answering gets a new hub, the
//! lowest-id member that answers, through one `MoveHub` command (a compare-and-set on the share's
//! generation). Members learn the new generation from their catalogs and reset with the new hub,
//! each keeping the edits it had not yet synced (`share::core`), so nothing a member holds is
//! lost; when the old hub returns it is a spoke and sends what the new hub lacks.
//!
//! [`hub_moves`] decides (pure); [`run`] probes hosts and proposes. Keeps no state a new leader
//! would need.

use std::time::Duration;

use haven_proto::share::{ShareCommand, ShareRecord};
use haven_proto::{CatalogCommand, NodeId};
use tracing::{info, warn};

use super::liveness::HostLiveness;
use super::LeaderHandles;
use crate::catalog;

/// For each share whose hub is down and that has a member up: the command moving its hub there.
pub fn hub_moves(shares: &[ShareRecord], is_up: impl Fn(&NodeId) -> bool) -> Vec<ShareCommand> {
    shares
        .iter()
        .filter(|s| !is_up(&s.hub))
        .filter_map(|s| {
            let hub = s.members.iter().copied().find(|m| *m != s.hub && is_up(m))?;
            Some(ShareCommand::MoveHub { share: s.id, hub, expected_generation: s.generation })
        })
        .collect()
}

/// Run until the process ends; acts only while this node leads.
pub async fn run(leader: LeaderHandles, probe: Duration, down_after: Duration) {
    let mut hosts = HostLiveness::new(down_after);
    let mut was_leader = false;
    loop {
        tokio::time::sleep(probe).await;
        if leader.proposer.leading_since().is_none() {
            was_leader = false;
            continue;
        }
        if !was_leader {
            hosts.clear();
            was_leader = true;
        }
        let Ok(shares) = catalog::shares::shares(&leader.store) else { continue };
        if shares.is_empty() {
            continue;
        }
        hosts.probe(&leader, probe * 2).await;
        for cmd in hub_moves(&shares, |id| hosts.is_up(id)) {
            let ShareCommand::MoveHub { share, hub, .. } = &cmd else { continue };
            let (share, hub) = (*share, *hub);
            match leader.proposer.write(CatalogCommand::Share(cmd), 0).await {
                Ok(_) => {
                    metrics::counter!("haven_share_hub_moves_total").increment(1);
                    info!(%share, new_hub = %hub, "share hub stopped answering; moved the hub");
                }
                Err(e) => warn!(%share, error = %e, "hub move not committed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use haven_proto::ShareId;

    use super::*;

    fn share(id: u64, members: &[u64], hub: u64) -> ShareRecord {
        ShareRecord {
            id: ShareId(id),
            name: format!("s{id}"),
            members: members.iter().map(|&m| NodeId(m)).collect(),
            hub: NodeId(hub),
            generation: 4,
        }
    }

    #[test]
    fn a_down_hub_moves_to_the_lowest_member_up_and_nothing_else_moves() {
        let shares = [share(1, &[1, 2, 3], 1), share(2, &[2, 3], 3), share(3, &[1, 3], 3)];
        let up = |n: &NodeId| n.0 != 1 && n.0 != 3;
        let moves = hub_moves(&shares, up);
        assert_eq!(
            moves,
            vec![
                ShareCommand::MoveHub { share: ShareId(1), hub: NodeId(2), expected_generation: 4 },
                ShareCommand::MoveHub { share: ShareId(2), hub: NodeId(2), expected_generation: 4 },
            ]
        );
        assert!(hub_moves(&shares, |_| true).is_empty());
    }
}
