//! Reversing a relationship: the primary of a 1-replica volume hands the volume to the
//! relationship's async copy, which becomes primary while the old primary takes the copy's place.
//! Owns the hand-over and the marker that keeps it safe when the proposal's answer is lost. It
//! orders no write and applies nothing itself.
//!
//! Architecture invariant: **once a primary has proposed a reversal at epoch E, it acknowledges
//! no write at E again.** The proposal may commit long after the proposer stopped waiting: the
//! leader first waits out the primary's read lease (`core::lease`), and a new leader may commit
//! an entry an old one appended. A write acknowledged meanwhile would be missing from the new
//! primary (chaos `volume-operations`, seed 3: the primary's proposal timed out, it went on
//! acknowledging writes, and the reversal committed under them). So the primary:
//!
//! 1. waits, with its I/O gate held, until the copy holds every write;
//! 2. steps down and records E durably (`reversal/proposed` in its block store's metadata, so a
//!    restart knows it too), then proposes;
//! 3. serves again only after a compare-and-set at E ([`settle`]) has committed, after which the
//!    reversal can no longer commit, or once its own catalog shows an epoch past E. A refusal
//!    is not enough: it means the epoch moved on at the leader, and a catalog here still at E
//!    would let this host take over at E beside the new primary (chaos `volume-operations`,
//!    seed 3, again; the volume model finds it too once catalog views lag).
//!
//! The volume model covers both (`model::sim`: `reverse_fence`, `marker_until_seen`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use haven_proto::volume::{VolumeCommand, VolumeOutcome, VolumeRecord};
use haven_proto::{CatalogCommand, ClientResponse, CommandOutcome, NodeId, VolumeId};
use tracing::{info, warn};

use super::blockstore::BlockStore;
use super::core::primary::CopyState;
use super::error::VolumeError;
use super::replica::VolumeReplica;

/// Per-volume metadata key holding the epoch of a reversal proposed and not yet settled.
const PROPOSED_KEY: &str = "reversal/proposed";

/// The epoch of a reversal this host proposed for `vol` and has not settled (none: `None`).
pub(crate) fn load(blocks: &BlockStore, vol: VolumeId) -> Result<Option<u64>, VolumeError> {
    let Some(b) = blocks.meta_get(vol, PROPOSED_KEY).map_err(VolumeError::internal)? else { return Ok(None) };
    let raw: [u8; 8] = b
        .as_slice()
        .try_into()
        .map_err(|_| VolumeError::internal(format!("{vol}: a reversal marker of {} bytes, not 8", b.len())))?;
    Ok(Some(u64::from_le_bytes(raw)))
}

fn record_proposed(replica: &VolumeReplica, epoch: u64) -> Result<(), VolumeError> {
    replica.blocks.meta_put(replica.vol, PROPOSED_KEY, &epoch.to_le_bytes()).map_err(VolumeError::internal)?;
    replica.set_reversal_pending(Some(epoch));
    Ok(())
}

/// Forget the marker: the reversal committed, or can no longer commit.
pub(crate) fn clear(replica: &VolumeReplica) -> Result<(), VolumeError> {
    replica.blocks.meta_delete(replica.vol, PROPOSED_KEY).map_err(VolumeError::internal)?;
    replica.set_reversal_pending(None);
    Ok(())
}

/// Primary: hand the volume to the async copy of `relationship` once it holds every write
/// (writes wait meanwhile), then become that relationship's target.
pub(crate) async fn reverse(replica: &Arc<VolumeReplica>, relationship: u64) -> Result<(), VolumeError> {
    if replica.reversal_in_flight.swap(true, Ordering::SeqCst) {
        return Err(VolumeError::unavailable(format!("{} is already being reversed", replica.vol)));
    }
    let _in_flight = InFlight(replica);
    let rel = crate::catalog::volumes::relationships(&replica.ctx.store)
        .map_err(VolumeError::internal)?
        .into_iter()
        .find(|r| r.id == relationship && r.volume == replica.vol)
        .ok_or_else(|| VolumeError::not_found(format!("{} has no relationship {relationship}", replica.vol)))?;
    let deadline = Instant::now() + replica.ack_timeout().max(Duration::from_secs(30));
    // Wait for the copy with the gate released first: a resync of the copy needs the gate
    // (holding it while waiting stalled writes and the resync alike until the deadline; found
    // by the chaos operations workload, seeds 2 and 31). Then, with the gate held and no write
    // in flight, only forwarded writes may still be outstanding.
    let gate = loop {
        replica.wait_for_copy(rel.target, |s| s != CopyState::NeedsResync, deadline).await?;
        let gate = replica.gate.write().await;
        replica.primary_epoch()?;
        let settle = Instant::now() + replica.ack_timeout() * 5;
        if replica.wait_for_copy(rel.target, |s| s == CopyState::CaughtUp, settle.min(deadline)).await.is_ok() {
            break gate;
        }
        if Instant::now() > deadline {
            return Err(VolumeError::outcome_unknown(format!("the copy on {} did not catch up", rel.target)));
        }
    };
    replica.primary_epoch()?;
    // The catalog's epoch, which the proposal expects (our role's may lag it: an observation of
    // a newer epoch waits for the gate we hold before adopting it).
    let epoch = replica.record().epoch;
    replica.step_down();
    record_proposed(replica, epoch)?;
    let cmd = VolumeCommand::ReverseRelationship { id: relationship, expected_epoch: epoch };
    match propose_cas(replica, cmd).await {
        Proposed::Applied(rec) => {
            clear(replica)?;
            finish(replica, rec, rel.target).await;
            Ok(())
        }
        Proposed::Refused(why) => {
            // Not applied, but the refusal may mean the epoch moved on at the leader while this
            // host's catalog still shows `epoch`: taking over again now could put two primaries
            // at work. The marker stays; `observe` clears it once the catalog here is past
            // `epoch`, or settles it if the catalog still names this host primary there.
            Err(VolumeError::unavailable(format!("the reversal was refused: {why}")))
        }
        Proposed::Unknown(e) => {
            warn!(vol = %replica.vol, error = %e, "reversal proposal unanswered; settling it");
            drop(gate); // taking over again needs it
            match settle(replica, epoch).await {
                Settled::Kept => {
                    Err(VolumeError::unavailable(format!("the reversal did not take effect ({e}); nothing changed")))
                }
                Settled::Moved => Err(VolumeError::outcome_unknown(format!(
                    "the reversal's answer was lost ({e}) and the volume has since moved past epoch {epoch}"
                ))),
                Settled::Unknown(why) => Err(VolumeError::outcome_unknown(format!(
                    "the reversal's answer was lost ({e}); this host stays stepped down until it learns the \
                     outcome ({why})"
                ))),
            }
        }
    }
}

/// The answer to a compare-and-set on the volume's epoch.
enum Proposed {
    Applied(VolumeRecord),
    /// Not applied (the epoch moved on, or the command was invalid).
    Refused(String),
    /// No answer: it may have been applied, or may still be.
    Unknown(String),
}

async fn propose_cas(replica: &VolumeReplica, cmd: VolumeCommand) -> Proposed {
    match replica.ctx.proposer.write(CatalogCommand::Volume(cmd), 0).await {
        Ok(ClientResponse::Written { outcome: CommandOutcome::Volume(VolumeOutcome::Volume(rec)), .. }) => {
            Proposed::Applied(rec)
        }
        Ok(ClientResponse::Written {
            outcome: CommandOutcome::Volume(VolumeOutcome::Refused { reason, .. }), ..
        }) => Proposed::Refused(reason),
        Ok(other) => Proposed::Unknown(format!("unexpected answer {other:?}")),
        Err(e) => Proposed::Unknown(e.to_string()),
    }
}

/// Clears `reversal_in_flight` however the call ends (a dropped request included); a marker
/// left behind is then settled by the next catalog observation.
struct InFlight<'a>(&'a VolumeReplica);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.reversal_in_flight.store(false, Ordering::SeqCst);
    }
}

async fn finish(replica: &Arc<VolumeReplica>, rec: VolumeRecord, new_primary: NodeId) {
    info!(vol = %replica.vol, new_primary = %rec.primary, "relationship reversed");
    replica.set_record(rec);
    replica
        .event(
            "relationship_reversed",
            format!("{new_primary} is now primary; {} holds the async copy", replica.node),
            Some(new_primary),
        )
        .await;
}

/// What [`settle`] found out.
pub(crate) enum Settled {
    /// This host is still primary, at a new epoch; the reversal can never commit.
    Kept,
    /// The epoch moved past the reversal's: it committed, or something else did first. The
    /// marker goes once this host's catalog shows it.
    Moved,
    /// The compare-and-set's own answer was lost; try again later.
    Unknown(String),
}

/// Settle a reversal proposed at `epoch` whose outcome this host never learned: propose the
/// same primary and in-sync set at `epoch`. If that commits, the reversal (which expects
/// `epoch` too) is refused whenever it arrives, and this host adopts the new epoch.
pub(crate) async fn settle(replica: &Arc<VolumeReplica>, epoch: u64) -> Settled {
    let record = replica.record();
    if record.epoch > epoch {
        return match clear(replica) {
            Ok(()) => Settled::Moved,
            Err(e) => Settled::Unknown(e.to_string()),
        };
    }
    let cmd = VolumeCommand::SetReplication {
        volume: replica.vol,
        expected_epoch: epoch,
        primary: replica.node,
        in_sync: record.in_sync.clone(),
    };
    let rec = match propose_cas(replica, cmd).await {
        Proposed::Applied(rec) => rec,
        // The epoch moved past `epoch` at the leader, which this host's catalog may not show
        // yet: the marker stays until it does (a takeover meanwhile could be at a stale epoch).
        Proposed::Refused(_) => return Settled::Moved,
        Proposed::Unknown(e) => return Settled::Unknown(e),
    };
    let new_epoch = rec.epoch;
    replica.set_record(rec);
    if let Err(e) = clear(replica) {
        return Settled::Unknown(e.to_string());
    }
    match replica.adopt(new_epoch).await {
        Ok(()) => {
            info!(vol = %replica.vol, epoch = new_epoch, "reversal settled: still primary");
            Settled::Kept
        }
        // The next catalog observation adopts again.
        Err(e) => Settled::Unknown(e.to_string()),
    }
}
