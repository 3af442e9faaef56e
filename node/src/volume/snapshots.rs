//! Snapshots driven by a volume's primary: take (at one write-order point on every in-sync
//! replica), delete, roll back, and copy into another volume (clone).
//!
//! A snapshot is reserved in the catalog first (which allocates its id), then taken with the
//! primary's I/O gate held exclusively, so the write-order point it names has no write in flight:
//! every write acknowledged before the request is in it, every write after it is not, and each
//! replica's copy is the same. Then the catalog records the point and the hosts that hold it.
//! This module must not compare copies (that is `integrity`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use haven_proto::volume::{DeviceMessage, SnapshotKind, SnapshotRecord, VolumeCommand, VolumeOutcome};
use haven_proto::{CatalogCommand, CommandOutcome, NodeId, VolumeId};
use tracing::{info, warn};

use super::error::VolumeError;
use super::merkle::zero_block_hash;
use super::replica::VolumeReplica;

async fn propose_snapshot(replica: &VolumeReplica, cmd: VolumeCommand) -> Result<Option<SnapshotRecord>, VolumeError> {
    match replica.ctx.proposer.write(CatalogCommand::Volume(cmd), 0).await? {
        haven_proto::ClientResponse::Written {
            outcome: CommandOutcome::Volume(VolumeOutcome::Snapshot(s)), ..
        } => Ok(Some(s)),
        haven_proto::ClientResponse::Written { outcome: CommandOutcome::Volume(VolumeOutcome::Done), .. } => Ok(None),
        haven_proto::ClientResponse::Written {
            outcome: CommandOutcome::Volume(VolumeOutcome::Refused { reason, not_found }),
            ..
        } => Err(if not_found { VolumeError::NotFound(reason) } else { VolumeError::Invalid(reason) }),
        other => Err(VolumeError::internal(format!("unexpected outcome {other:?}"))),
    }
}

/// Take a crash-consistent snapshot on every in-sync replica.
pub async fn take(
    replica: &Arc<VolumeReplica>,
    name: String,
    label: Option<String>,
    kind: SnapshotKind,
) -> Result<SnapshotRecord, VolumeError> {
    let created_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let reserved = propose_snapshot(
        replica,
        VolumeCommand::ReserveSnapshot { volume: replica.vol, name: name.clone(), label, kind, created_ms },
    )
    .await?
    .ok_or_else(|| VolumeError::internal("reserve returned no record"))?;
    let id = reserved.id;
    let (seq, hosts) = {
        let _gate = replica.gate.write().await;
        let epoch = replica.primary_epoch()?;
        // Every write that took a point below `next_seq` has finished (we hold the gate).
        let seq = replica.next_seq.load(Ordering::SeqCst) - 1;
        let others = replica.other_in_sync();
        replica.blocks.snapshot_create(replica.vol, id, seq).map_err(VolumeError::internal)?;
        let msg = |h: NodeId| {
            replica.send_device(
                h,
                DeviceMessage::SnapshotAt { volume: replica.vol, epoch, id, seq },
                replica.ack_timeout(),
            )
        };
        let replies = join_all(others.iter().map(|h| msg(*h))).await;
        let mut hosts = vec![replica.node];
        for (h, r) in others.iter().zip(replies) {
            match r {
                Ok(_) => hosts.push(*h),
                Err(e) => warn!(vol = %replica.vol, host = %h, error = %e, "snapshot not taken on a replica"),
            }
        }
        // Whole async copies get it too when they can (best effort: it gives them a common
        // point). Never a copy with a hole or one mid-resync: its snapshot would later pass for
        // a common point, and a resync from it would skip what the copy lacks (found by the
        // volume model, seed 3).
        let followers: Vec<NodeId> = replica.followers.lock().expect("followers lock").whole_copies();
        for h in followers {
            if msg(h).await.is_ok() {
                hosts.push(h);
            }
        }
        (seq, hosts)
    };
    let snap = propose_snapshot(replica, VolumeCommand::CompleteSnapshot { volume: replica.vol, id, seq, hosts })
        .await?
        .ok_or_else(|| VolumeError::internal("complete returned no record"))?;
    metrics::counter!("haven_volume_snapshots_total").increment(1);
    info!(vol = %replica.vol, id, seq, %name, "snapshot taken");
    Ok(snap)
}

/// Delete a snapshot from every host that has it and from the catalog.
pub async fn delete(replica: &Arc<VolumeReplica>, id: u64) -> Result<(), VolumeError> {
    let epoch = replica.record().epoch;
    let snaps = crate::catalog::volumes::snapshots(&replica.ctx.store, replica.vol).map_err(VolumeError::internal)?;
    let Some(snap) = snaps.into_iter().find(|s| s.id == id) else {
        return Err(VolumeError::not_found(format!("no snapshot {id} of {}", replica.vol)));
    };
    for h in &snap.hosts {
        if *h == replica.node {
            replica.blocks.snapshot_delete(replica.vol, id).map_err(VolumeError::internal)?;
        } else if let Err(e) = replica
            .send_device(*h, DeviceMessage::DropSnapshot { volume: replica.vol, epoch, id }, replica.ack_timeout())
            .await
        {
            // A host that is down keeps the snapshot; it stays harmless (it only pins blocks)
            // and never counts as common, because the primary no longer lists it.
            warn!(vol = %replica.vol, host = %h, error = %e, "snapshot not dropped on a host");
        }
    }
    propose_snapshot(replica, VolumeCommand::DeleteSnapshot { volume: replica.vol, id }).await?;
    Ok(())
}

/// Return the volume to a snapshot's content on every in-sync replica.
pub async fn rollback(replica: &Arc<VolumeReplica>, id: u64) -> Result<(), VolumeError> {
    let seq = replica.snapshot_seq(id)?;
    let later: Vec<u64> = {
        let _gate = replica.gate.write().await;
        replica.primary_epoch()?;
        // A rollback rewrites history: points after `seq` will be handed out again. It starts a
        // new epoch, so forwarded writes from before it are refused wherever they land late,
        // and every follower breaks (its copy holds points we no longer have; its sequencer
        // would acknowledge the reused points as already applied): a resync catches it up
        // (issue 11, race 3).
        let epoch = replica.new_epoch().await?;
        replica.followers.lock().expect("followers lock").history_rewritten(seq);
        let others = replica.other_in_sync();
        let later: Vec<u64> = replica
            .blocks
            .snapshots(replica.vol)
            .map_err(VolumeError::internal)?
            .iter()
            .filter(|s| s.seq > seq)
            .map(|s| s.id)
            .collect();
        let (blocks, vol) = (replica.blocks.clone(), replica.vol);
        replica.seq.reset(epoch, seq + 1, || blocks.rollback(vol, seq)).await.map_err(VolumeError::internal)?;
        replica.next_seq.store(seq + 1, Ordering::SeqCst);
        let replies = join_all(others.iter().map(|h| {
            replica.send_device(
                *h,
                DeviceMessage::RollbackTo { volume: replica.vol, epoch, seq },
                replica.ack_timeout(),
            )
        }))
        .await;
        let failed: Vec<NodeId> = others.iter().zip(replies).filter(|(_, r)| r.is_err()).map(|(h, _)| *h).collect();
        if !failed.is_empty() {
            replica.drop_in_sync(&failed, epoch).await?;
        }
        later
    };
    for id in later.into_iter().filter(|i| *i < super::replica::INTERNAL_SNAPSHOT_BASE) {
        let _ = propose_snapshot(replica, VolumeCommand::DeleteSnapshot { volume: replica.vol, id }).await;
    }
    replica.event("rollback", format!("rolled back to snapshot {id} (write point {seq})"), None).await;
    Ok(())
}

/// Copy snapshot `id`'s blocks into `target` (a new volume of at least the same size), through
/// the target's primary. All-zero chunks are skipped using the snapshot's Merkle tree.
pub async fn copy_into(replica: &Arc<VolumeReplica>, id: u64, target: VolumeId) -> Result<(), VolumeError> {
    let at = replica.snapshot_seq(id)?;
    let record = replica.record();
    let host = replica.ctx.host()?;
    let target_rec = crate::catalog::volumes::volume(&replica.ctx.store, target)
        .map_err(VolumeError::internal)?
        .ok_or_else(|| VolumeError::not_found(format!("no volume {target}")))?;
    if target_rec.size_bytes < record.size_bytes || target_rec.block_size != record.block_size {
        return Err(VolumeError::invalid(format!(
            "{target} is smaller than {} or has another block size",
            replica.vol
        )));
    }
    let (blocks, vol, bs, size_blocks) =
        (replica.blocks.clone(), replica.vol, replica.block_size, record.size_blocks());
    let tree = tokio::task::spawn_blocking(move || blocks.merkle(vol, bs, size_blocks, Some(at)))
        .await
        .map_err(VolumeError::internal)?
        .map_err(VolumeError::internal)?;
    let zero = super::merkle::chunk_hash(&vec![zero_block_hash(bs); super::merkle::CHUNK_BLOCKS as usize]);
    for (chunk, hash) in tree.chunks.iter().enumerate() {
        let first = chunk as u64 * super::merkle::CHUNK_BLOCKS;
        let count = super::merkle::CHUNK_BLOCKS.min(size_blocks - first);
        if count == super::merkle::CHUNK_BLOCKS && *hash == zero {
            continue;
        }
        let data = replica.read(first, count, Some(id)).await?;
        host.write_to(target, first * bs as u64, data, true).await?;
    }
    Ok(())
}
