//! Resync after an offline event (C5): bring a replica (or an async copy) that missed writes back
//! in sync, sending only what it lacks.
//!
//! Protocol (primary drives, replica obeys):
//! 1. `ResyncPrepare` carries the primary's snapshots. The replica picks the newest one it shares
//!    (same id at the same write point). Its own writes after that point never reached the
//!    others' in-sync set; it **preserves** their current content (listed by
//!    `VolumeRequest::Preserved`, reported as an event) and rolls back to the common point. With
//!    no common snapshot it collapses its blocks to one version each (`rebase`) for a Merkle
//!    compare. It persists a cursor so an interrupted resync resumes instead of starting over.
//! 2. With its I/O gate held, the primary pins its view at target point `T` (an internal
//!    snapshot), tells the replica `T` (the replica's sequencer jumps to `T + 1`), and starts
//!    forwarding new writes to it.
//! 3. The primary sends, in chunks of [`RESYNC_CHUNK_BLOCKS`], the blocks changed in `(S, T]`
//!    (common snapshot `S`) — or, with no common snapshot, the blocks whose hashes differ — as of
//!    `T`. The replica applies each chunk durably, then advances its cursor, so an interruption
//!    re-sends at most the chunk in flight. Once a range zeroing was ordered after `T`, chunks
//!    are read with no write in flight and carry each block's later versions too (a forwarded
//!    range zeroing applied before a chunk cannot see the data the chunk brings).
//! 4. With the gate held again and every forwarded write acknowledged, the primary adds the
//!    replica to the in-sync set through Raft.
//!
//! This module must not decide *when* a replica needs resync beyond "listed but not in sync";
//! the primary's supervisor tick calls [`resync_one`].

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use haven_proto::volume::{DeviceMessage, DeviceReply, PreservedWrites, ReplicaBlock, ResyncProgress, VolumeCommand};
use haven_proto::{NodeId, VolumeId};
use tracing::{info, warn};

use super::blockstore::{BlockContent, BlockStore};
use super::core::cursor::{transfer_plan, Cursor};
use super::error::VolumeError;
use super::merkle::{MerkleTree, CHUNK_BLOCKS};
use super::replica::{from_content, to_block_write, FollowKind, VolumeReplica, INTERNAL_SNAPSHOT_BASE};

/// Blocks per resync message (1 MiB at 4 KiB blocks): the most an interruption can re-send.
pub const RESYNC_CHUNK_BLOCKS: usize = 256;

const CURSOR_KEY: &str = "resync/cursor";
const PRESERVED_PREFIX: &str = "preserved/";

fn load_cursor(replica: &VolumeReplica) -> Result<Option<Cursor>, VolumeError> {
    read_cursor(&replica.blocks, replica.vol)
}

fn read_cursor(blocks: &BlockStore, vol: VolumeId) -> Result<Option<Cursor>, VolumeError> {
    match blocks.meta_get(vol, CURSOR_KEY).map_err(VolumeError::internal)? {
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(VolumeError::internal),
        None => Ok(None),
    }
}

/// The epoch a resync under way was prepared for (0 if none): a restarted replica follows at
/// least that epoch, so a late message from an older primary is not applied over the transfer
/// (found by the volume model, seed 189024).
pub(crate) fn prepared_epoch(blocks: &BlockStore, vol: VolumeId) -> Result<u64, VolumeError> {
    Ok(read_cursor(blocks, vol)?.map_or(0, |c| c.epoch))
}

fn store_cursor(replica: &VolumeReplica, c: &Cursor) -> Result<(), VolumeError> {
    let bytes = serde_json::to_vec(c).map_err(VolumeError::internal)?;
    replica.blocks.meta_put(replica.vol, CURSOR_KEY, &bytes).map_err(VolumeError::internal)
}

/// Replica side of step 1.
pub async fn prepare(
    replica: &Arc<VolumeReplica>,
    epoch: u64,
    primary_snaps: Vec<(u64, u64)>,
) -> Result<DeviceReply, VolumeError> {
    if replica.role().is_primary() {
        return Err(VolumeError::invalid("a primary is not resynced"));
    }
    if let Some(c) = load_cursor(replica)? {
        // Resume only under the primary that prepared us, while it still holds the common
        // snapshot; otherwise prepare again (another epoch may have rewritten history).
        if c.resumable(epoch, &primary_snaps) {
            return Ok(DeviceReply::ResyncReady { common: c.base, resume: c.resume() });
        }
        replica.blocks.meta_delete(replica.vol, CURSOR_KEY).map_err(VolumeError::internal)?;
    }
    let local = replica.blocks.snapshots(replica.vol).map_err(VolumeError::internal)?;
    let common = local
        .iter()
        .filter(|s| s.id < INTERNAL_SNAPSHOT_BASE && primary_snaps.contains(&(s.id, s.seq)))
        .max_by_key(|s| s.seq)
        .map(|s| (s.id, s.seq));
    let (blocks, vol, bs) = (replica.blocks.clone(), replica.vol, replica.block_size);
    match common {
        Some((id, seq)) => {
            let changed = divergent_blocks(replica, seq).await?;
            if !changed.is_empty() {
                let pid = preserve(replica, Some(id), &changed).await?;
                replica
                    .event(
                        "divergent_writes_preserved",
                        format!(
                            "{} block(s) written on {} after snapshot {id} are not on the primary; \
                             kept as preserved set {pid} there before resync",
                            changed.len(),
                            replica.node
                        ),
                        Some(replica.node),
                    )
                    .await;
            }
            replica.seq.reset(epoch, seq + 1, || blocks.rollback(vol, seq)).await.map_err(VolumeError::internal)?;
        }
        None => {
            replica.seq.reset(epoch, 1, || blocks.rebase(vol)).await.map_err(VolumeError::internal)?;
        }
    }
    let _ = bs;
    store_cursor(replica, &Cursor::prepared(common, epoch))?;
    info!(vol = %replica.vol, ?common, "prepared for resync");
    Ok(DeviceReply::ResyncReady { common, resume: None })
}

/// Blocks this (rejoining) host changed after point `base` whose newest local version the
/// primary does not hold at the same point with the same content: writes that never reached it.
async fn divergent_blocks(replica: &Arc<VolumeReplica>, base: u64) -> Result<Vec<u64>, VolumeError> {
    let (store, vol) = (replica.blocks.clone(), replica.vol);
    let mine = tokio::task::spawn_blocking(move || -> Result<Vec<(u64, u64, [u8; 32])>, VolumeError> {
        let mut out = Vec::new();
        for b in store.changed_blocks(vol, base, None).map_err(VolumeError::internal)? {
            if let Some((seq, content)) = store.read_version(vol, b, None).map_err(VolumeError::internal)? {
                let h = match content {
                    BlockContent::Data(d) => super::merkle::block_hash(&d),
                    BlockContent::Zero => [1u8; 32],
                    BlockContent::Appended(_) => unreachable!("reads return Data, never Appended"),
                };
                out.push((b, seq, h));
            }
        }
        Ok(out)
    })
    .await
    .map_err(VolumeError::internal)??;
    if mine.is_empty() {
        return Ok(Vec::new());
    }
    let primary = replica.record().primary;
    let zero = super::merkle::zero_block_hash(replica.block_size);
    let theirs = match replica
        .send_device(
            primary,
            DeviceMessage::VersionHashes {
                volume: replica.vol,
                versions: mine.iter().map(|(b, s, _)| (*b, *s)).collect(),
            },
            replica.ack_timeout().max(Duration::from_secs(30)),
        )
        .await
    {
        Ok(DeviceReply::Hashes(h)) => h,
        // Cannot tell: keep everything rather than risk dropping a write.
        _ => return Ok(mine.into_iter().map(|(b, _, _)| b).collect()),
    };
    Ok(mine
        .iter()
        .zip(theirs)
        .filter(|((_, _, h), t)| {
            let same = *h == *t || (*h == [1u8; 32] && *t == zero);
            !same
        })
        .map(|((b, _, _), _)| *b)
        .collect())
}

/// Keep the current content of `blocks` under a new preserved set; returns its id.
async fn preserve(replica: &Arc<VolumeReplica>, base: Option<u64>, blocks: &[u64]) -> Result<u64, VolumeError> {
    let existing = replica.blocks.meta_scan(replica.vol, PRESERVED_PREFIX).map_err(VolumeError::internal)?;
    let pid = existing.iter().filter(|(k, _)| k.ends_with("/set")).count() as u64 + 1;
    for &b in blocks {
        let data = replica.read(b, 1, None).await?;
        replica
            .blocks
            .meta_put(replica.vol, &format!("{PRESERVED_PREFIX}{pid:08}/block/{b:020}"), &data)
            .map_err(VolumeError::internal)?;
    }
    let set = PreservedWrites { id: pid, host: replica.node, base_snapshot: base, blocks: blocks.to_vec() };
    let bytes = serde_json::to_vec(&set).map_err(VolumeError::internal)?;
    replica
        .blocks
        .meta_put(replica.vol, &format!("{PRESERVED_PREFIX}{pid:08}/set"), &bytes)
        .map_err(VolumeError::internal)?;
    Ok(pid)
}

/// The preserved sets on this host.
pub fn list_preserved(replica: &VolumeReplica) -> Result<Vec<PreservedWrites>, VolumeError> {
    replica
        .blocks
        .meta_scan(replica.vol, PRESERVED_PREFIX)
        .map_err(VolumeError::internal)?
        .into_iter()
        .filter(|(k, _)| k.ends_with("/set"))
        .map(|(_, v)| serde_json::from_slice(&v).map_err(VolumeError::internal))
        .collect()
}

/// Replica side of steps 2 and 3.
pub async fn receive(
    replica: &Arc<VolumeReplica>,
    epoch: u64,
    target: u64,
    blocks: Vec<ReplicaBlock>,
    next_block: u64,
) -> Result<DeviceReply, VolumeError> {
    let mut cursor = load_cursor(replica)?.ok_or_else(|| {
        VolumeError::invalid(format!("{} on {} is not prepared for resync", replica.vol, replica.node))
    })?;
    if cursor.begin(target) {
        // A (re)started transfer: writes after `target` will be forwarded from now on. The
        // claim on what is already here stays as it was until the chunks cover it.
        replica.seq.reset(epoch, target + 1, || ()).await;
        store_cursor(replica, &cursor)?;
    } else {
        // The same transfer after this process restarted: its sequencer restarted from the
        // high-water mark, but everything up to `target` arrives by resync.
        replica.seq.advance_to(target + 1).await;
    }
    // The message that begins a transfer carries no blocks: it claims nothing.
    if !blocks.is_empty() {
        let writes: Vec<_> = blocks.iter().map(to_block_write).collect();
        let (store, vol, bs) = (replica.blocks.clone(), replica.vol, replica.block_size);
        // Durable before the cursor moves past them. Versions after `target` (see
        // `send_chunk`) may be ahead of what this copy applied: they must not raise its
        // high-water mark, or a restart would resume above points it has not applied.
        tokio::task::spawn_blocking(move || store.apply_capped(vol, bs, &writes, true, target))
            .await
            .map_err(VolumeError::internal)?
            .map_err(VolumeError::internal)?;
        cursor.received_below(next_block);
        store_cursor(replica, &cursor)?;
    }
    Ok(DeviceReply::Applied { seq: target })
}

/// Replica side of step 4: the cursor goes only once every forwarded write up to `last` is
/// applied, so a refused finish leaves a resumable resync behind.
pub async fn finish(replica: &Arc<VolumeReplica>, target: u64, last: u64) -> Result<DeviceReply, VolumeError> {
    let cursor = load_cursor(replica)?;
    if cursor.as_ref().map(|c| c.target) != Some(target) {
        return Err(VolumeError::invalid(format!("no resync to point {target} is under way")));
    }
    let applied = replica.seq.next() - 1;
    if applied < last {
        return Err(VolumeError::unavailable(format!(
            "{} on {} has applied up to {applied}, not {last}",
            replica.vol, replica.node
        )));
    }
    // The transfer's blocks may all be older than the target: record that every point up to
    // `applied` is here before the cursor (which covered restarts until now) goes (found by
    // the volume model: a copy restarted after a resync resumed its points below the target,
    // and as a new primary handed them out again).
    replica.blocks.raise_high_water_mark(replica.vol, applied).map_err(VolumeError::internal)?;
    replica.blocks.meta_delete(replica.vol, CURSOR_KEY).map_err(VolumeError::internal)?;
    Ok(DeviceReply::Applied { seq: applied })
}

/// Primary side of the divergence check: hashes of our versions written at exactly the given
/// points (zeroes where we have no such version).
pub async fn version_hashes(
    replica: &Arc<VolumeReplica>,
    versions: Vec<(u64, u64)>,
) -> Result<DeviceReply, VolumeError> {
    let (store, vol, bs) = (replica.blocks.clone(), replica.vol, replica.block_size);
    let out = tokio::task::spawn_blocking(move || -> Result<Vec<[u8; 32]>, VolumeError> {
        let zero = super::merkle::zero_block_hash(bs);
        versions
            .into_iter()
            .map(|(block, seq)| {
                Ok(match store.read_version(vol, block, Some(seq)).map_err(VolumeError::internal)? {
                    Some((s, BlockContent::Data(d))) if s == seq => super::merkle::block_hash(&d),
                    Some((s, BlockContent::Zero)) if s == seq => zero,
                    _ => [0u8; 32],
                })
            })
            .collect()
    })
    .await
    .map_err(VolumeError::internal)??;
    Ok(DeviceReply::Hashes(out))
}

/// A resync belongs to the epoch it started in: a rollback since then rewrote what it
/// prepared against, and re-creating the follower at step 2 would erase the rollback's "this
/// copy is broken" (found by the volume model: a rollback between prepare and step 2 left a
/// stale async copy marked caught up). Checked under the I/O gate, which a rollback holds.
fn same_epoch(replica: &VolumeReplica, epoch: u64) -> Result<(), VolumeError> {
    match replica.primary_epoch()? {
        now if now == epoch => Ok(()),
        now => Err(VolumeError::unavailable(format!("epoch {epoch} ended (now {now}) during the resync"))),
    }
}

fn set_progress(replica: &VolumeReplica, host: NodeId, f: impl FnOnce(&mut ResyncProgress)) {
    if let Some(fol) = replica.followers.lock().expect("followers lock").get_mut(host) {
        f(fol.resync.get_or_insert_with(ResyncProgress::default));
    }
}

fn follower_broken(replica: &VolumeReplica, host: NodeId) -> bool {
    replica.followers.lock().expect("followers lock").get(host).is_none_or(|f| f.broken)
}

/// Primary side: resync `host` (a listed replica not in sync, or an async copy with a hole).
/// Returns the number of blocks sent.
pub async fn resync_one(replica: Arc<VolumeReplica>, host: NodeId) -> Result<u64, VolumeError> {
    if !replica.resyncs_running.lock().expect("resync lock").insert(host) {
        return Ok(0);
    }
    let result = run(&replica, host).await;
    replica.resyncs_running.lock().expect("resync lock").remove(&host);
    if let Err(e) = &result {
        warn!(vol = %replica.vol, %host, error = %e, "resync interrupted; it will resume");
        replica.followers.lock().expect("followers lock").mark_broken(host);
    }
    result
}

async fn run(replica: &Arc<VolumeReplica>, host: NodeId) -> Result<u64, VolumeError> {
    let epoch = replica.primary_epoch()?;
    let long = replica.ack_timeout().max(Duration::from_secs(30));
    let snaps: Vec<(u64, u64)> = replica
        .blocks
        .snapshots(replica.vol)
        .map_err(VolumeError::internal)?
        .into_iter()
        .filter(|s| s.id < INTERNAL_SNAPSHOT_BASE)
        .map(|s| (s.id, s.seq))
        .collect();
    let ready = replica
        .send_device(host, DeviceMessage::ResyncPrepare { volume: replica.vol, epoch, snapshots: snaps }, long)
        .await?;
    let DeviceReply::ResyncReady { common, resume } = ready else {
        return Err(VolumeError::internal(format!("unexpected reply {ready:?}")));
    };
    let pin = INTERNAL_SNAPSHOT_BASE + host.0;
    let is_async = replica
        .followers
        .lock()
        .expect("followers lock")
        .get(host)
        .is_some_and(|f| matches!(f.kind, FollowKind::Async { .. }));
    // Step 2: pin T and start forwarding, with no write in flight.
    let target = {
        let _gate = replica.gate.write().await;
        same_epoch(replica, epoch)?;
        let target = replica.next_seq.load(Ordering::SeqCst) - 1;
        let _ = replica.blocks.snapshot_delete(replica.vol, pin);
        replica.blocks.snapshot_create(replica.vol, pin, target).map_err(VolumeError::internal)?;
        let start = resume.map_or(0, |(_, nb)| nb);
        replica
            .send_device(
                host,
                DeviceMessage::ResyncBlocks {
                    volume: replica.vol,
                    epoch,
                    target_seq: target,
                    blocks: vec![],
                    next_block: start,
                },
                long,
            )
            .await?;
        let progress = ResyncProgress {
            mode: if common.is_some() { "common_snapshot".into() } else { "merkle".into() },
            base_snapshot: common.map(|(id, _)| id),
            target_seq: target,
            resumed_at_block: start,
            ..Default::default()
        };
        replica.followers.lock().expect("followers lock").start_resync(host, target, progress);
        target
    };
    // Step 3: what to send.
    let size_blocks = replica.record().size_blocks();
    let to_send: Vec<u64> = match common {
        Some((_, base_seq)) => {
            let (store, vol) = (replica.blocks.clone(), replica.vol);
            tokio::task::spawn_blocking(move || -> Result<Vec<u64>, VolumeError> {
                let mut set: BTreeSet<u64> = BTreeSet::new();
                for range in transfer_plan(base_seq, resume) {
                    let changed =
                        store.changed_blocks(vol, range.after, Some(target)).map_err(VolumeError::internal)?;
                    set.extend(changed.into_iter().filter(|b| range.contains(*b)));
                }
                Ok(set.into_iter().filter(|b| *b < size_blocks).collect())
            })
            .await
            .map_err(VolumeError::internal)??
        }
        None => merkle_diff(replica, host, pin, target, size_blocks, long).await?,
    };
    set_progress(replica, host, |p| p.blocks_total = to_send.len() as u64);
    info!(vol = %replica.vol, %host, ?common, target, blocks = to_send.len(), "resync started");
    let started = Instant::now();
    let mut sent_blocks = 0u64;
    let mut sent_bytes = 0u64;
    for chunk in to_send.chunks(RESYNC_CHUNK_BLOCKS) {
        if follower_broken(replica, host) {
            return Err(VolumeError::unavailable("a forwarded write failed during resync"));
        }
        let next_block = chunk.last().map_or(0, |b| b + 1);
        let with_later = replica.last_zero_seq.load(Ordering::SeqCst) > target;
        let mut bytes = send_chunk(replica, host, epoch, target, chunk, next_block, with_later, long).await?;
        if !with_later && replica.last_zero_seq.load(Ordering::SeqCst) > target {
            // A range zeroing was ordered while this chunk travelled: the copy may have applied
            // it before the chunk, which then brought back data the range zeroed. Send it again.
            bytes += send_chunk(replica, host, epoch, target, chunk, next_block, true, long).await?;
        }
        sent_blocks += chunk.len() as u64;
        metrics::counter!("haven_resync_blocks_total").increment(chunk.len() as u64);
        metrics::counter!("haven_resync_bytes_total").increment(bytes);
        set_progress(replica, host, |p| {
            p.blocks_sent += chunk.len() as u64;
            p.bytes_sent += bytes;
        });
        sent_bytes += bytes;
        let rate = replica.tunables.resync_max_bytes_per_sec;
        if rate > 0 {
            // Stay under the configured bandwidth: sleep until the bytes sent so far are due.
            let due = Duration::from_secs_f64(sent_bytes as f64 / rate as f64);
            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(ahead).await;
            }
        }
    }
    // Step 4: join the in-sync set once every forwarded write is acknowledged.
    {
        let _gate = replica.gate.write().await;
        same_epoch(replica, epoch)?;
        let deadline = Instant::now() + long;
        loop {
            let (broken, outstanding) = {
                let f = replica.followers.lock().expect("followers lock");
                let fol = f.get(host);
                (fol.is_none_or(|f| f.broken), fol.map_or(0, |f| f.outstanding.len()))
            };
            if broken {
                return Err(VolumeError::unavailable("a forwarded write failed during resync"));
            }
            if outstanding == 0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(VolumeError::outcome_unknown("forwarded writes not acknowledged"));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let last = replica.next_seq.load(Ordering::SeqCst) - 1;
        let reply = replica
            .send_device(
                host,
                DeviceMessage::ResyncFinish { volume: replica.vol, epoch, target_seq: target, last_seq: last },
                long,
            )
            .await?;
        match reply {
            DeviceReply::Applied { seq } if seq >= last => {}
            other => {
                return Err(VolumeError::internal(format!(
                    "replica not caught up at finish: {other:?} (primary at {last})"
                )))
            }
        }
        if is_async {
            if let Some(f) = replica.followers.lock().expect("followers lock").get_mut(host) {
                f.acked_seq = last;
                if let Some(r) = f.resync.as_mut() {
                    r.done = true;
                }
            }
        } else {
            let record = replica.record();
            let mut in_sync = record.in_sync.clone();
            in_sync.push(host);
            let rec = replica
                .propose(VolumeCommand::SetReplication {
                    volume: replica.vol,
                    expected_epoch: record.epoch,
                    primary: replica.node,
                    in_sync,
                })
                .await?;
            replica.followers.lock().expect("followers lock").remove(host);
            replica.set_record(rec);
        }
    }
    let _ = replica.blocks.snapshot_delete(replica.vol, pin);
    let mode = if common.is_some() { "common snapshot" } else { "Merkle compare" };
    replica
        .event(
            "resync_done",
            format!(
                "{host} resynced by {mode} to point {target}: {sent_blocks} block(s) sent in {:.1}s",
                started.elapsed().as_secs_f64()
            ),
            Some(host),
        )
        .await;
    Ok(sent_blocks)
}

/// Send the blocks of `chunk` as of `target` (step 3); returns the data bytes sent.
///
/// `with_later`: a range zeroing was ordered after `target`. The copy applies forwarded writes
/// while chunks arrive, and a range zeroing writes Zero versions only where data is stored when
/// it is applied, so one applied before a chunk misses the blocks the chunk brings. So the chunk
/// is read with no write in flight (every point handed out is applied here) and carries each
/// block's later versions too, as this host holds them: the copy then holds every version a
/// forwarded write would have left, whatever the order (versions are idempotent). Such a chunk
/// may need several messages; only the last claims progress.
#[allow(clippy::too_many_arguments)]
async fn send_chunk(
    replica: &Arc<VolumeReplica>,
    host: NodeId,
    epoch: u64,
    target: u64,
    chunk: &[u64],
    next_block: u64,
    with_later: bool,
    long: Duration,
) -> Result<u64, VolumeError> {
    let _gate = match with_later {
        true => Some(replica.gate.write().await),
        false => None,
    };
    same_epoch(replica, epoch)?;
    let (store, vol, wanted) = (replica.blocks.clone(), replica.vol, chunk.to_vec());
    let versions = tokio::task::spawn_blocking(move || read_chunk(&store, vol, &wanted, target, with_later))
        .await
        .map_err(VolumeError::internal)??;
    let bytes: u64 = versions.iter().map(|b| b.data.as_ref().map_or(0, |d| d.len() as u64)).sum();
    let messages: Vec<&[ReplicaBlock]> = versions.chunks(RESYNC_CHUNK_BLOCKS).collect();
    let last = messages.len().saturating_sub(1);
    for (i, part) in messages.into_iter().enumerate() {
        // An earlier part claims only what earlier chunks covered.
        let claim = if i == last { next_block } else { chunk.first().copied().unwrap_or(0) };
        let msg = DeviceMessage::ResyncBlocks {
            volume: vol,
            epoch,
            target_seq: target,
            blocks: part.to_vec(),
            next_block: claim,
        };
        replica.send_device(host, msg, long).await?;
    }
    Ok(bytes)
}

/// `blocks`' versions as of `target` (seq 0 Zero where there is none), each followed by its
/// versions after `target` when `with_later`.
fn read_chunk(
    store: &BlockStore,
    vol: VolumeId,
    blocks: &[u64],
    target: u64,
    with_later: bool,
) -> Result<Vec<ReplicaBlock>, VolumeError> {
    let mut out = Vec::with_capacity(blocks.len());
    for &b in blocks {
        out.push(match store.read_version(vol, b, Some(target)).map_err(VolumeError::internal)? {
            Some((seq, content)) => from_content(b, seq, content),
            None => ReplicaBlock { block: b, seq: 0, data: None },
        });
        if with_later {
            for (seq, content) in store.versions_after(vol, b, target).map_err(VolumeError::internal)? {
                out.push(from_content(b, seq, content));
            }
        }
    }
    Ok(out)
}

/// Blocks whose hashes differ between our view at `target` and the replica's current view.
async fn merkle_diff(
    replica: &Arc<VolumeReplica>,
    host: NodeId,
    pin: u64,
    target: u64,
    size_blocks: u64,
    long: Duration,
) -> Result<Vec<u64>, VolumeError> {
    let (store, vol, bs) = (replica.blocks.clone(), replica.vol, replica.block_size);
    let ours = tokio::task::spawn_blocking(move || store.merkle(vol, bs, size_blocks, Some(target)))
        .await
        .map_err(VolumeError::internal)?
        .map_err(VolumeError::internal)?;
    let theirs = match replica
        .send_device(host, DeviceMessage::MerkleChunks { volume: replica.vol, snapshot: None }, long)
        .await?
    {
        DeviceReply::Chunks { block_size, size_blocks, chunks } => {
            MerkleTree::from_chunk_hashes(block_size, size_blocks, chunks)
        }
        other => return Err(VolumeError::internal(format!("unexpected reply {other:?}"))),
    };
    let mut out = Vec::new();
    for chunk in ours.differing_chunks(&theirs) {
        let (store, vol) = (replica.blocks.clone(), replica.vol);
        let mine =
            tokio::task::spawn_blocking(move || store.chunk_block_hashes(vol, bs, size_blocks, chunk, Some(target)))
                .await
                .map_err(VolumeError::internal)?
                .map_err(VolumeError::internal)?;
        let DeviceReply::Hashes(other) = replica
            .send_device(host, DeviceMessage::ChunkHashes { volume: replica.vol, snapshot: None, chunk }, long)
            .await?
        else {
            return Err(VolumeError::internal("unexpected chunk hash reply"));
        };
        let first = chunk * CHUNK_BLOCKS;
        for i in 0..mine.len() {
            if mine.get(i) != other.get(i) {
                out.push(first + i as u64);
            }
        }
    }
    let _ = pin;
    Ok(out)
}

/// Primary: start resyncs for listed replicas that are not in sync and async copies with a hole.
pub fn tick(replica: &Arc<VolumeReplica>) {
    if !replica.role().is_primary() {
        return;
    }
    let record = replica.record();
    let mut wanted: Vec<NodeId> =
        record.replicas.iter().copied().filter(|h| *h != replica.node && !record.in_sync.contains(h)).collect();
    {
        let f = replica.followers.lock().expect("followers lock");
        wanted.retain(|h| f.get(*h).is_none_or(|f| f.broken));
        wanted.extend(f.broken_async());
    }
    for host in wanted {
        if replica.resyncs_running.lock().expect("resync lock").contains(&host) {
            continue;
        }
        tokio::spawn(resync_one(replica.clone(), host));
    }
}
