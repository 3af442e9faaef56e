//! The frame: how one envelope travels on a QUIC stream.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of rkyv archive. The length
//! is checked against [`MAX_FRAME_LEN`] *before* any buffer is allocated, so a peer cannot make a
//! node reserve memory by announcing a huge frame. This module only encodes and checks headers;
//! reading from a stream is the transport's job.

use crate::error::ProtoError;

/// Bytes in a frame header.
pub const FRAME_HEADER_LEN: usize = 4;

/// The largest envelope a node accepts (16 MiB). Bulk data (memory pages, blocks) is sent as a
/// sequence of frames below this bound, never as one giant frame.
pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// A parsed, bounds-checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Length of the archive that follows.
    pub len: usize,
}

impl FrameHeader {
    /// Parse a header, refusing empty frames and frames above `max_len`.
    pub fn parse(bytes: [u8; FRAME_HEADER_LEN], max_len: usize) -> Result<Self, ProtoError> {
        let len = u32::from_be_bytes(bytes) as usize;
        if len == 0 {
            return Err(ProtoError::EmptyFrame);
        }
        if len > max_len {
            return Err(ProtoError::FrameTooLarge { len, max: max_len });
        }
        Ok(Self { len })
    }

    /// Encode a header for an archive of `len` bytes.
    pub fn encode(len: usize) -> Result<[u8; FRAME_HEADER_LEN], ProtoError> {
        if len == 0 {
            return Err(ProtoError::EmptyFrame);
        }
        if len > MAX_FRAME_LEN {
            return Err(ProtoError::FrameTooLarge { len, max: MAX_FRAME_LEN });
        }
        Ok((len as u32).to_be_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_bounds() {
        let h = FrameHeader::encode(1234).unwrap();
        assert_eq!(FrameHeader::parse(h, MAX_FRAME_LEN).unwrap().len, 1234);
        assert!(matches!(FrameHeader::parse([0; 4], MAX_FRAME_LEN), Err(ProtoError::EmptyFrame)));
        let big = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        assert!(matches!(FrameHeader::parse(big, MAX_FRAME_LEN), Err(ProtoError::FrameTooLarge { .. })));
        assert!(FrameHeader::encode(MAX_FRAME_LEN + 1).is_err());
    }
}
