//! The frames of a volume's replication stream: what a primary sends an in-sync replica (or a
//! resyncing or async copy) on the long-lived bulk stream it opens for the volume, and what the
//! replica answers.
//!
//! The stream opens with an envelope flagged `STREAM` whose body is
//! [`DeviceMessage::ReplicationStream`](crate::volume::DeviceMessage::ReplicationStream); after
//! it, each direction carries frames (the [`crate::frame`] header, then one rkyv archive): primary
//! → replica one [`ReplRequest`] per frame, replica → primary one [`ReplAcks`] per frame, which
//! acknowledges runs of applied write-order points at once. [`decode_request`] and
//! [`decode_acks`] validate the archive (bytecheck) and every bound before a field is used; a
//! frame that fails is a broken peer, and the stream is closed. This module must not do I/O.

use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

use crate::error::ProtoError;
use crate::limits::{MAX_BLOCKS_PER_MESSAGE, MAX_BLOCK_SIZE, MAX_ZERO_BLOCKS_PER_MESSAGE, MAX_ZERO_BLOCKS_PER_REQUEST};
use crate::volume::MAX_IO_LEN;

/// Most acknowledgements one [`ReplAcks`] frame may carry.
pub const MAX_ACKS_PER_FRAME: usize = 4096;
/// Longest refusal reason a frame may carry, in bytes (longer ones are cut by the sender).
pub const MAX_REASON_BYTES: usize = 1024;

/// Primary → replica: one write-order point to apply, or a WAL sync.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ReplRequest {
    /// Apply write `seq`: block versions of consecutive blocks from `first_block` (`None` =
    /// zeroes). `durable`: fsync the WAL before acknowledging.
    Write { epoch: u64, seq: u64, first_block: u64, blocks: Vec<Option<Vec<u8>>>, durable: bool },
    /// Apply write `seq`, which zeroes `[first_block, first_block + block_count)` (at most
    /// [`MAX_ZERO_BLOCKS_PER_MESSAGE`] blocks).
    Zero { epoch: u64, seq: u64, first_block: u64, block_count: u64, durable: bool },
    /// Fsync the WAL; answered with [`ReplAck::Synced`] carrying `tag`.
    Sync { epoch: u64, tag: u64 },
}

impl ReplRequest {
    /// The epoch the request was sent in.
    pub fn epoch(&self) -> u64 {
        match self {
            Self::Write { epoch, .. } | Self::Zero { epoch, .. } | Self::Sync { epoch, .. } => *epoch,
        }
    }

    /// Every bound a replica relies on: block counts and sizes, ranges that cannot overflow.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Self::Write { first_block, blocks, .. } => {
                if blocks.is_empty() || blocks.len() > MAX_BLOCKS_PER_MESSAGE {
                    return Err(format!("{} blocks in one write; 1..={MAX_BLOCKS_PER_MESSAGE} allowed", blocks.len()));
                }
                let mut total = 0usize;
                for b in blocks.iter().flatten() {
                    if b.len() > MAX_BLOCK_SIZE {
                        return Err(format!("a block of {} bytes; the limit is {MAX_BLOCK_SIZE}", b.len()));
                    }
                    total += b.len();
                }
                if total > MAX_IO_LEN as usize {
                    return Err(format!("a write of {total} bytes; the limit is {MAX_IO_LEN}"));
                }
                block_range(*first_block, blocks.len() as u64, MAX_ZERO_BLOCKS_PER_REQUEST)
            }
            Self::Zero { first_block, block_count, .. } => {
                if *block_count > MAX_ZERO_BLOCKS_PER_MESSAGE {
                    return Err(format!(
                        "{block_count} blocks zeroed in one message; the limit is {MAX_ZERO_BLOCKS_PER_MESSAGE}"
                    ));
                }
                block_range(*first_block, *block_count, MAX_ZERO_BLOCKS_PER_REQUEST)
            }
            Self::Sync { .. } => Ok(()),
        }
    }
}

/// `[first, first + count)` is non-empty and ends at or below `end_max`.
fn block_range(first: u64, count: u64, end_max: u64) -> Result<(), String> {
    match first.checked_add(count) {
        Some(end) if count > 0 && end <= end_max => Ok(()),
        _ => Err(format!("block range {first} + {count} is empty or ends past block {end_max}")),
    }
}

/// One acknowledgement on a replication stream.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ReplAck {
    /// Every point in `first..=last` that the primary sent on this stream was applied (and
    /// fsynced where it asked). A run only ever names points the replica applied itself.
    Applied { first: u64, last: u64 },
    /// Point `seq` was refused (stale epoch, bad range) or failed to apply.
    Refused { seq: u64, reason: String },
    /// The WAL sync tagged `tag` is done.
    Synced { tag: u64 },
    /// The WAL sync tagged `tag` was refused or failed.
    SyncFailed { tag: u64, reason: String },
}

/// Replica → primary: the acknowledgements that were ready together, in one frame.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct ReplAcks {
    pub acks: Vec<ReplAck>,
}

impl ReplAcks {
    pub fn check(&self) -> Result<(), String> {
        if self.acks.is_empty() || self.acks.len() > MAX_ACKS_PER_FRAME {
            return Err(format!("{} acknowledgements in one frame; 1..={MAX_ACKS_PER_FRAME} allowed", self.acks.len()));
        }
        for ack in &self.acks {
            match ack {
                ReplAck::Applied { first, last } if first > last => {
                    return Err(format!("acknowledged run {first}..={last} is empty"))
                }
                ReplAck::Refused { reason, .. } | ReplAck::SyncFailed { reason, .. }
                    if reason.len() > MAX_REASON_BYTES =>
                {
                    return Err(format!("a reason of {} bytes; the limit is {MAX_REASON_BYTES}", reason.len()))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// `reason`, cut at a character boundary to at most [`MAX_REASON_BYTES`].
pub fn short_reason(reason: &str) -> String {
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

/// Archive a request (aligned, ready to frame).
pub fn encode_request(req: &ReplRequest) -> Result<AlignedVec, ProtoError> {
    rkyv::to_bytes::<rancor::Error>(req).map_err(|e| ProtoError::Codec(e.to_string()))
}

/// Archive acknowledgements (aligned, ready to frame).
pub fn encode_acks(acks: &ReplAcks) -> Result<AlignedVec, ProtoError> {
    rkyv::to_bytes::<rancor::Error>(acks).map_err(|e| ProtoError::Codec(e.to_string()))
}

/// Validate (bytecheck, then bounds) and deserialize a request frame's body. `bytes` must be
/// 16-byte aligned; an unaligned buffer is reported as invalid rather than read.
pub fn decode_request(bytes: &[u8]) -> Result<ReplRequest, ProtoError> {
    let req = rkyv::from_bytes::<ReplRequest, rancor::Error>(bytes).map_err(|e| ProtoError::Invalid(e.to_string()))?;
    req.check().map_err(ProtoError::Invalid)?;
    Ok(req)
}

/// Validate (bytecheck, then bounds) and deserialize an acknowledgement frame's body.
pub fn decode_acks(bytes: &[u8]) -> Result<ReplAcks, ProtoError> {
    let acks = rkyv::from_bytes::<ReplAcks, rancor::Error>(bytes).map_err(|e| ProtoError::Invalid(e.to_string()))?;
    acks.check().map_err(ProtoError::Invalid)?;
    Ok(acks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::aligned_copy;

    fn write(blocks: Vec<Option<Vec<u8>>>) -> ReplRequest {
        ReplRequest::Write { epoch: 3, seq: 9, first_block: 4, blocks, durable: true }
    }

    #[test]
    fn requests_and_acks_round_trip() {
        for req in [
            write(vec![Some(vec![7; 4096]), None]),
            ReplRequest::Zero { epoch: 1, seq: 2, first_block: 0, block_count: 8, durable: false },
            ReplRequest::Sync { epoch: 1, tag: 77 },
        ] {
            assert_eq!(decode_request(&encode_request(&req).unwrap()).unwrap(), req);
        }
        let acks = ReplAcks {
            acks: vec![
                ReplAck::Applied { first: 1, last: 5 },
                ReplAck::Refused { seq: 6, reason: "stale".into() },
                ReplAck::Synced { tag: 1 },
            ],
        };
        assert_eq!(decode_acks(&encode_acks(&acks).unwrap()).unwrap(), acks);
    }

    #[test]
    fn out_of_bounds_frames_are_refused() {
        let bad = [
            write(vec![]),
            write(vec![Some(vec![0; MAX_BLOCK_SIZE + 1])]),
            ReplRequest::Write { epoch: 1, seq: 1, first_block: u64::MAX, blocks: vec![None], durable: false },
            ReplRequest::Zero {
                epoch: 1,
                seq: 1,
                first_block: 0,
                block_count: MAX_ZERO_BLOCKS_PER_MESSAGE + 1,
                durable: false,
            },
            ReplRequest::Zero { epoch: 1, seq: 1, first_block: u64::MAX - 1, block_count: 2, durable: false },
            ReplRequest::Zero { epoch: 1, seq: 1, first_block: 0, block_count: 0, durable: false },
        ];
        for req in bad {
            assert!(matches!(decode_request(&encode_request(&req).unwrap()), Err(ProtoError::Invalid(_))), "{req:?}");
        }
        let many = ReplAcks { acks: vec![ReplAck::Synced { tag: 0 }; MAX_ACKS_PER_FRAME + 1] };
        let backwards = ReplAcks { acks: vec![ReplAck::Applied { first: 5, last: 4 }] };
        let long = ReplAcks { acks: vec![ReplAck::Refused { seq: 1, reason: "x".repeat(MAX_REASON_BYTES + 1) }] };
        for acks in [ReplAcks { acks: vec![] }, many, backwards, long] {
            assert!(matches!(decode_acks(&encode_acks(&acks).unwrap()), Err(ProtoError::Invalid(_))));
        }
        assert_eq!(short_reason(&"é".repeat(MAX_REASON_BYTES)).len(), MAX_REASON_BYTES);
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        let bytes = encode_request(&write(vec![Some(vec![1; 512])])).unwrap();
        for i in 0..bytes.len() {
            let mut b = aligned_copy(&bytes);
            b[i] ^= 0xFF;
            let _ = decode_request(&b);
            let _ = decode_acks(&b);
        }
        assert!(decode_request(&aligned_copy(&[0xAB; 41])).is_err());
        assert!(decode_acks(&[]).is_err());
    }
}
