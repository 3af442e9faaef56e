//! Labeled snapshot integrity (C9): compare a snapshot's copies on different hosts by Merkle
//! digest — roots first, then the chunk hashes, then only the differing chunks' block hashes —
//! record the verdict in the catalog, raise an event on a mismatch, and repair from the copy the
//! user picks.
//!
//! No block data crosses the network to *compare*; only a repair ships the differing blocks.
//! This module must not take snapshots or change write order.

use std::sync::Arc;

use haven_proto::volume::{DeviceMessage, DeviceReply, IntegrityVerdict, ReplicaBlock, VolumeCommand};
use haven_proto::NodeId;
use tracing::warn;

use super::error::VolumeError;
use super::merkle::{Hash, MerkleTree};
use super::replica::{from_content, to_block_write, VolumeReplica};

/// Most differing blocks listed in a verdict.
const MAX_LISTED: usize = 1024;

fn hex(h: &Hash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a snapshot id (None = newest) puts us in write order.
fn at(replica: &VolumeReplica, snapshot: Option<u64>) -> Result<Option<u64>, VolumeError> {
    snapshot.map(|id| replica.snapshot_seq(id)).transpose()
}

/// This host's Merkle chunk hashes.
pub async fn chunks(replica: &Arc<VolumeReplica>, snapshot: Option<u64>) -> Result<DeviceReply, VolumeError> {
    // One 32-byte hash per chunk must fit one reply frame (with room for the envelope): refuse a
    // volume with more chunks before hashing it, rather than build a reply no frame can carry.
    let max_chunks = (haven_proto::MAX_FRAME_LEN - 64 * 1024) / 32;
    let chunks = replica.record().size_blocks().div_ceil(super::merkle::CHUNK_BLOCKS);
    if chunks > max_chunks as u64 {
        return Err(VolumeError::LimitExceeded(format!(
            "{chunks} Merkle chunks do not fit one reply (limit {max_chunks}); the volume is too large to compare"
        )));
    }
    let tree = local_tree(replica, snapshot).await?;
    Ok(DeviceReply::Chunks { block_size: tree.block_size, size_blocks: tree.size_blocks, chunks: tree.chunks })
}

async fn local_tree(replica: &Arc<VolumeReplica>, snapshot: Option<u64>) -> Result<MerkleTree, VolumeError> {
    let at = at(replica, snapshot)?;
    let (blocks, vol, bs, size) =
        (replica.blocks.clone(), replica.vol, replica.block_size, replica.record().size_blocks());
    tokio::task::spawn_blocking(move || blocks.merkle(vol, bs, size, at))
        .await
        .map_err(VolumeError::internal)?
        .map_err(VolumeError::internal)
}

/// This host's block hashes of one chunk.
pub async fn chunk_hashes(
    replica: &Arc<VolumeReplica>,
    snapshot: Option<u64>,
    chunk: u64,
) -> Result<DeviceReply, VolumeError> {
    let at = at(replica, snapshot)?;
    let (blocks, vol, bs, size) =
        (replica.blocks.clone(), replica.vol, replica.block_size, replica.record().size_blocks());
    let hashes = tokio::task::spawn_blocking(move || blocks.chunk_block_hashes(vol, bs, size, chunk, at))
        .await
        .map_err(VolumeError::internal)?
        .map_err(VolumeError::internal)?;
    Ok(DeviceReply::Hashes(hashes))
}

/// This host's block versions at a snapshot.
pub async fn read_versions(
    replica: &Arc<VolumeReplica>,
    snapshot: Option<u64>,
    wanted: Vec<u64>,
) -> Result<DeviceReply, VolumeError> {
    let at = at(replica, snapshot)?;
    let (blocks, vol) = (replica.blocks.clone(), replica.vol);
    let out = tokio::task::spawn_blocking(move || -> Result<Vec<ReplicaBlock>, VolumeError> {
        let mut out = Vec::with_capacity(wanted.len());
        for b in wanted {
            match blocks.read_version(vol, b, at).map_err(VolumeError::internal)? {
                Some((seq, content)) => out.push(from_content(b, seq, content)),
                None => out.push(ReplicaBlock { block: b, seq: 0, data: None }),
            }
        }
        Ok(out)
    })
    .await
    .map_err(VolumeError::internal)??;
    Ok(DeviceReply::Versions(out))
}

/// Overwrite, in place, the versions a snapshot sees with good copies (keeping each local
/// version's write-order point so newer versions still win in the newest view).
pub async fn repair_local(
    replica: &Arc<VolumeReplica>,
    snapshot: u64,
    good: Vec<ReplicaBlock>,
) -> Result<DeviceReply, VolumeError> {
    let at = replica.snapshot_seq(snapshot)?;
    let (blocks, vol, bs) = (replica.blocks.clone(), replica.vol, replica.block_size);
    tokio::task::spawn_blocking(move || -> Result<(), VolumeError> {
        let mut writes = Vec::with_capacity(good.len());
        for g in good {
            let seq =
                blocks.read_version(vol, g.block, Some(at)).map_err(VolumeError::internal)?.map_or(g.seq, |(s, _)| s);
            writes.push(to_block_write(&ReplicaBlock { seq, ..g }));
        }
        blocks.apply(vol, bs, &writes, true).map_err(VolumeError::internal)
    })
    .await
    .map_err(VolumeError::internal)??;
    Ok(DeviceReply::Done)
}

async fn tree_of(replica: &Arc<VolumeReplica>, host: NodeId, snapshot: u64) -> Result<MerkleTree, VolumeError> {
    if host == replica.node {
        return local_tree(replica, Some(snapshot)).await;
    }
    match replica
        .send_device(host, DeviceMessage::MerkleChunks { volume: replica.vol, snapshot: Some(snapshot) }, long(replica))
        .await?
    {
        DeviceReply::Chunks { block_size, size_blocks, chunks } => {
            Ok(MerkleTree::from_chunk_hashes(block_size, size_blocks, chunks))
        }
        other => Err(VolumeError::internal(format!("unexpected reply {other:?}"))),
    }
}

async fn hashes_of(
    replica: &Arc<VolumeReplica>,
    host: NodeId,
    snapshot: u64,
    chunk: u64,
) -> Result<Vec<Hash>, VolumeError> {
    let reply = if host == replica.node {
        chunk_hashes(replica, Some(snapshot), chunk).await?
    } else {
        replica
            .send_device(
                host,
                DeviceMessage::ChunkHashes { volume: replica.vol, snapshot: Some(snapshot), chunk },
                long(replica),
            )
            .await?
    };
    match reply {
        DeviceReply::Hashes(h) => Ok(h),
        other => Err(VolumeError::internal(format!("unexpected reply {other:?}"))),
    }
}

fn long(replica: &VolumeReplica) -> std::time::Duration {
    replica.ack_timeout().max(std::time::Duration::from_secs(30))
}

/// Blocks whose copies on `a` and `b` differ at `snapshot`: roots, then chunks, then blocks.
async fn differing_blocks(
    replica: &Arc<VolumeReplica>,
    snapshot: u64,
    a: NodeId,
    b: NodeId,
) -> Result<(MerkleTree, MerkleTree, Vec<u64>), VolumeError> {
    let (ta, tb) = futures::try_join!(tree_of(replica, a, snapshot), tree_of(replica, b, snapshot))?;
    let mut blocks = Vec::new();
    if ta.root != tb.root {
        for chunk in ta.differing_chunks(&tb) {
            let (ha, hb) =
                futures::try_join!(hashes_of(replica, a, snapshot, chunk), hashes_of(replica, b, snapshot, chunk))?;
            let first = chunk * super::merkle::CHUNK_BLOCKS;
            for i in 0..ha.len().max(hb.len()) {
                if ha.get(i) != hb.get(i) {
                    blocks.push(first + i as u64);
                }
            }
        }
    }
    Ok((ta, tb, blocks))
}

/// Compare every copy of `snapshot` with the primary's and record the verdict.
pub async fn verify(replica: &Arc<VolumeReplica>, snapshot: u64) -> Result<IntegrityVerdict, VolumeError> {
    let snap = crate::catalog::volumes::snapshots(&replica.ctx.store, replica.vol)
        .map_err(VolumeError::internal)?
        .into_iter()
        .find(|s| s.id == snapshot)
        .ok_or_else(|| VolumeError::not_found(format!("no snapshot {snapshot} of {}", replica.vol)))?;
    let record = replica.record();
    // Compare the primary's copy with each synchronous replica's copy.
    let others: Vec<NodeId> =
        snap.hosts.iter().copied().filter(|h| *h != replica.node && record.replicas.contains(h)).collect();
    let mut digests = Vec::new();
    let mut mismatch: Option<(Vec<NodeId>, Vec<u64>)> = None;
    let mut root = String::new();
    for other in &others {
        let (ta, tb, blocks) = differing_blocks(replica, snapshot, replica.node, *other).await?;
        root = hex(&ta.root);
        if digests.is_empty() {
            digests.push((replica.node, hex(&ta.root)));
        }
        digests.push((*other, hex(&tb.root)));
        if !blocks.is_empty() {
            let entry = mismatch.get_or_insert_with(|| (vec![replica.node], Vec::new()));
            entry.0.push(*other);
            entry.1.extend(blocks);
        }
    }
    let verdict = match mismatch {
        None if others.is_empty() => IntegrityVerdict::NotChecked,
        None => {
            let mut hosts = vec![replica.node];
            hosts.extend(others.iter().copied());
            IntegrityVerdict::Match { root, hosts }
        }
        Some((hosts, mut blocks)) => {
            blocks.sort_unstable();
            blocks.dedup();
            let total = blocks.len() as u64;
            blocks.truncate(MAX_LISTED);
            metrics::counter!("haven_snapshot_compare_total", "result" => "mismatch").increment(1);
            warn!(vol = %replica.vol, snapshot, ?hosts, differing = total, "snapshot copies differ");
            replica
                .event(
                    "snapshot_mismatch",
                    format!("snapshot {snapshot}: copies on {hosts:?} differ in {total} block(s): {blocks:?}"),
                    None,
                )
                .await;
            IntegrityVerdict::Mismatch { hosts, blocks, total_differing: total }
        }
    };
    if matches!(verdict, IntegrityVerdict::Match { .. }) {
        metrics::counter!("haven_snapshot_compare_total", "result" => "match").increment(1);
    }
    replica
        .propose_any(VolumeCommand::SetVerdict { volume: replica.vol, id: snapshot, verdict: verdict.clone(), digests })
        .await?;
    Ok(verdict)
}

/// Copy the blocks that differ from `source`'s copy of `snapshot` onto every other copy, then
/// verify again.
pub async fn repair(
    replica: &Arc<VolumeReplica>,
    snapshot: u64,
    source: NodeId,
) -> Result<IntegrityVerdict, VolumeError> {
    let snap = crate::catalog::volumes::snapshots(&replica.ctx.store, replica.vol)
        .map_err(VolumeError::internal)?
        .into_iter()
        .find(|s| s.id == snapshot)
        .ok_or_else(|| VolumeError::not_found(format!("no snapshot {snapshot} of {}", replica.vol)))?;
    if !snap.hosts.contains(&source) {
        return Err(VolumeError::invalid(format!("{source} holds no copy of snapshot {snapshot}")));
    }
    let mut repaired = Vec::new();
    for target in snap.hosts.iter().copied().filter(|h| *h != source) {
        let (_, _, blocks) = differing_blocks(replica, snapshot, source, target).await?;
        if blocks.is_empty() {
            continue;
        }
        let good = match if source == replica.node {
            read_versions(replica, Some(snapshot), blocks.clone()).await?
        } else {
            replica
                .send_device(
                    source,
                    DeviceMessage::ReadVersions {
                        volume: replica.vol,
                        snapshot: Some(snapshot),
                        blocks: blocks.clone(),
                    },
                    long(replica),
                )
                .await?
        } {
            DeviceReply::Versions(v) => v,
            other => return Err(VolumeError::internal(format!("unexpected reply {other:?}"))),
        };
        if target == replica.node {
            repair_local(replica, snapshot, good).await?;
        } else {
            replica
                .send_device(
                    target,
                    DeviceMessage::RepairBlocks { volume: replica.vol, snapshot, blocks: good },
                    long(replica),
                )
                .await?;
        }
        repaired.extend(blocks);
    }
    repaired.sort_unstable();
    repaired.dedup();
    let after = verify(replica, snapshot).await?;
    if !matches!(after, IntegrityVerdict::Match { .. }) {
        return Err(VolumeError::internal(format!("copies still differ after repair: {after:?}")));
    }
    replica
        .event(
            "snapshot_repaired",
            format!("snapshot {snapshot}: {} block(s) copied from {source}: {repaired:?}", repaired.len()),
            Some(source),
        )
        .await;
    let verdict = IntegrityVerdict::Repaired { source, blocks: repaired };
    let digests = crate::catalog::volumes::snapshots(&replica.ctx.store, replica.vol)
        .map_err(VolumeError::internal)?
        .into_iter()
        .find(|s| s.id == snapshot)
        .map(|s| s.digests)
        .unwrap_or_default();
    replica
        .propose_any(VolumeCommand::SetVerdict { volume: replica.vol, id: snapshot, verdict: verdict.clone(), digests })
        .await?;
    Ok(verdict)
}
