//! Bounds on every list a request carries, checked once per inbound envelope by
//! [`check_request`] (the transport calls it after validation, before authorization and before
//! any handler), so no handler ever loops over, allocates for, or replies to an unbounded list.
//!
//! The bounds follow from the largest legitimate message: one write is at most
//! [`MAX_IO_LEN`] bytes of blocks no smaller than [`MIN_BLOCK_SIZE`]; resync and repair move at
//! most one such batch. Anything above is refused with a message naming the list and its bound.
//! Catalog commands carry their own checks (`CatalogCommand::validate`, run by the node's service
//! before it proposes one), so they are not checked again here. This module must not do
//! I/O or look at anything but sizes.

use crate::envelope::Body;
use crate::messages::{ActorMessage, ClientRequest};
use crate::plan::{GroupRequest, MAX_PLAN_VMS};
use crate::share::{ShareMessage, ShareRequest, MAX_SHARE_KEYS, MAX_SHARE_VALUE_LEN};
use crate::vm::{VmMessage, VmRequest, MAX_VM_VOLUMES};
use crate::volume::{DeviceMessage, ReplicaBlock, VolumeRequest, MAX_IO_LEN, MAX_VOLUME_SIZE};

/// Smallest volume block size.
pub const MIN_BLOCK_SIZE: usize = 512;
/// Largest volume block size.
pub const MAX_BLOCK_SIZE: usize = 65_536;
/// Most blocks (or block versions) one message may name: a whole write of the smallest blocks.
pub const MAX_BLOCKS_PER_MESSAGE: usize = MAX_IO_LEN as usize / MIN_BLOCK_SIZE;
/// Most blocks one range-zeroing replication frame (`ReplRequest::Zero`) may cover. Applying one
/// costs in proportion to the blocks in the range that hold data, so this bounds the work per
/// message: at most this many versions read and Zero versions written, as many blocks as the
/// largest write of 4 KiB blocks carries, well within a replica's acknowledgement timeout; a
/// longer TRIM or WRITE_ZEROES is ordered as several consecutive range writes.
pub const MAX_ZERO_BLOCKS_PER_MESSAGE: u64 = MAX_IO_LEN as u64 / 4096;
/// Most blocks a request to zero (`ZeroBlocks`, to the primary) may cover: the largest volume
/// of the smallest blocks. The primary also checks the range against the volume's size.
pub const MAX_ZERO_BLOCKS_PER_REQUEST: u64 = MAX_VOLUME_SIZE / MIN_BLOCK_SIZE as u64;
/// Most snapshots one resync may name.
pub const MAX_SNAPSHOTS_PER_MESSAGE: usize = 4096;

/// Check every list in a request body against its bound.
pub fn check_request(body: &Body) -> Result<(), String> {
    match body {
        Body::Client(ClientRequest::Volume(v)) => volume_request(v),
        Body::Actor(ActorMessage::Device(d)) => device_message(d),
        Body::Actor(ActorMessage::Vm(VmMessage::Group(g))) => group_request(g),
        Body::Client(ClientRequest::Share(r)) => share_request(r),
        Body::Actor(ActorMessage::Share(m)) => share_message(m),
        Body::Actor(ActorMessage::Ha { msg, .. }) => msg.validate(),
        Body::Client(ClientRequest::Vm(r)) | Body::Actor(ActorMessage::Vm(VmMessage::Client(r))) => vm_request(r),
        _ => Ok(()),
    }
}

fn vm_request(r: &VmRequest) -> Result<(), String> {
    match r {
        VmRequest::AppPut { key, value, .. } => {
            crate::ha::validate_app_entry(key, value.as_deref().unwrap_or_default())
        }
        _ => Ok(()),
    }
}

fn volume_request(v: &VolumeRequest) -> Result<(), String> {
    v.validate()?;
    match v {
        VolumeRequest::InjectCorruption { data, .. } => bytes("corruption data", data.len(), MAX_BLOCK_SIZE),
        _ => Ok(()),
    }
}

fn device_message(d: &DeviceMessage) -> Result<(), String> {
    match d {
        DeviceMessage::Client(v) => volume_request(v),
        DeviceMessage::WriteBlocks { data, len, .. } => {
            bytes("write", *len as usize, MAX_IO_LEN as usize)?;
            bytes("write data", data.as_ref().map_or(0, Vec::len), MAX_IO_LEN as usize)
        }
        DeviceMessage::FencedWrite { data, .. } => bytes("write data", data.len(), MAX_IO_LEN as usize),
        DeviceMessage::ResyncBlocks { blocks, .. } | DeviceMessage::RepairBlocks { blocks, .. } => {
            replica_blocks(blocks)
        }
        DeviceMessage::ResyncPrepare { snapshots, .. } => {
            count("snapshots", snapshots.len(), MAX_SNAPSHOTS_PER_MESSAGE)
        }
        DeviceMessage::VersionHashes { versions, .. } => count("versions", versions.len(), MAX_BLOCKS_PER_MESSAGE),
        DeviceMessage::ReadVersions { blocks, .. } => count("blocks", blocks.len(), MAX_BLOCKS_PER_MESSAGE),
        DeviceMessage::Corrupt { data, .. } => bytes("corruption data", data.len(), MAX_BLOCK_SIZE),
        DeviceMessage::ZeroBlocks { first_block, block_count, .. } => {
            block_range("zeroed", *first_block, *block_count, MAX_ZERO_BLOCKS_PER_REQUEST)
        }
        DeviceMessage::Flush { .. }
        | DeviceMessage::ReplicationStream { .. }
        | DeviceMessage::SnapshotAt { .. }
        | DeviceMessage::DropSnapshot { .. }
        | DeviceMessage::RollbackTo { .. }
        | DeviceMessage::Adopt { .. }
        | DeviceMessage::ResyncFinish { .. }
        | DeviceMessage::MerkleChunks { .. }
        | DeviceMessage::ChunkHashes { .. }
        | DeviceMessage::ListPreserved { .. } => Ok(()),
    }
}

fn share_request(r: &ShareRequest) -> Result<(), String> {
    match r {
        ShareRequest::Put { key, value, .. } => {
            crate::share::validate_key(key)?;
            bytes("share value", value.as_ref().map_or(0, Vec::len), MAX_SHARE_VALUE_LEN)
        }
        ShareRequest::Get { key, .. } => key.as_deref().map_or(Ok(()), crate::share::validate_key),
        ShareRequest::Members { .. } => Ok(()),
    }
}

fn share_message(m: &ShareMessage) -> Result<(), String> {
    match m {
        ShareMessage::Client(r) => share_request(r),
        ShareMessage::Sync(s) => {
            count("diff operations", s.diff.ops.len(), MAX_SHARE_KEYS)?;
            s.diff.validate()
        }
        ShareMessage::Reset { .. } | ShareMessage::Poke { .. } => Ok(()),
    }
}

fn replica_blocks(blocks: &[ReplicaBlock]) -> Result<(), String> {
    count("blocks", blocks.len(), MAX_BLOCKS_PER_MESSAGE)?;
    let mut total = 0usize;
    for b in blocks {
        let len = b.data.as_ref().map_or(0, Vec::len);
        bytes("block data", len, MAX_BLOCK_SIZE)?;
        total += len;
    }
    bytes("blocks' data", total, MAX_IO_LEN as usize)
}

fn group_request(g: &GroupRequest) -> Result<(), String> {
    match g {
        GroupRequest::Snapshot { vms, .. } | GroupRequest::Consolidate { vms, .. } => {
            count("VMs", vms.len(), MAX_PLAN_VMS)
        }
        GroupRequest::Restore { images, generations, volume_snapshots, .. } => {
            count("images", images.len(), MAX_PLAN_VMS)?;
            count("generations", generations.len(), MAX_PLAN_VMS)?;
            count("volume snapshots", volume_snapshots.len(), MAX_PLAN_VMS * MAX_VM_VOLUMES)
        }
        GroupRequest::Release { volume_snapshots, .. } => {
            count("volume snapshots", volume_snapshots.len(), MAX_PLAN_VMS * MAX_VM_VOLUMES)
        }
    }
}

/// A block range: at most `max` blocks, and its end representable.
fn block_range(what: &str, first: u64, n: u64, max: u64) -> Result<(), String> {
    if n > max {
        return Err(format!("{n} blocks {what} in one message; the limit is {max}"));
    }
    if first.checked_add(n).is_none() {
        return Err(format!("blocks {what} from {first}: {first} + {n} overflows"));
    }
    Ok(())
}

fn count(what: &str, n: usize, max: usize) -> Result<(), String> {
    if n > max {
        return Err(format!("{n} {what} in one message; the limit is {max}"));
    }
    Ok(())
}

fn bytes(what: &str, n: usize, max: usize) -> Result<(), String> {
    if n > max {
        return Err(format!("{what} of {n} bytes in one message; the limit is {max}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::VolumeId;

    fn replicate(blocks: Vec<ReplicaBlock>) -> Body {
        Body::Actor(ActorMessage::Device(DeviceMessage::ResyncBlocks {
            volume: VolumeId(1),
            epoch: 1,
            target_seq: 1,
            blocks,
            next_block: 0,
        }))
    }

    #[test]
    fn lists_at_their_bound_pass_and_one_more_is_refused() {
        let block = |data: usize| ReplicaBlock { block: 0, seq: 1, data: Some(vec![0; data]) };
        assert!(check_request(&replicate(vec![block(MIN_BLOCK_SIZE); MAX_BLOCKS_PER_MESSAGE])).is_ok());
        let err = check_request(&replicate(vec![block(0); MAX_BLOCKS_PER_MESSAGE + 1])).unwrap_err();
        assert!(err.contains("limit"), "{err}");
        assert!(check_request(&replicate(vec![block(MAX_BLOCK_SIZE + 1)])).is_err());
        // Many big blocks: each within the block bound, their sum above one write.
        assert!(
            check_request(&replicate(vec![block(MAX_BLOCK_SIZE); MAX_IO_LEN as usize / MAX_BLOCK_SIZE + 1])).is_err()
        );
        let read = Body::Actor(ActorMessage::Device(DeviceMessage::ReadVersions {
            volume: VolumeId(1),
            snapshot: None,
            blocks: vec![0; MAX_BLOCKS_PER_MESSAGE + 1],
        }));
        assert!(check_request(&read).is_err());
        let release = Body::Actor(ActorMessage::Vm(VmMessage::Group(GroupRequest::Release {
            plan: 1,
            volume_snapshots: vec![(VolumeId(1), 1); MAX_PLAN_VMS * MAX_VM_VOLUMES + 1],
        })));
        assert!(check_request(&release).is_err());
    }

    fn zero(first_block: u64, block_count: u64) -> Body {
        let volume = VolumeId(1);
        Body::Actor(ActorMessage::Device(DeviceMessage::ZeroBlocks {
            volume,
            first_block,
            block_count,
            durable: false,
        }))
    }

    #[test]
    fn zero_ranges_are_bounded_and_never_overflow() {
        // Replicated range zeroings (`ReplRequest::Zero`) are bounded by `replication`.
        // A request to the primary may cover a whole volume of the smallest blocks: 4 GiB of
        // 4 KiB blocks is well inside.
        assert!(check_request(&zero(0, (4 << 30) / 4096)).is_ok());
        assert!(check_request(&zero(0, MAX_ZERO_BLOCKS_PER_REQUEST)).is_ok());
        assert!(check_request(&zero(0, MAX_ZERO_BLOCKS_PER_REQUEST + 1)).is_err());
        assert!(check_request(&zero(u64::MAX - 1, 2)).unwrap_err().contains("overflows"));
    }
}
