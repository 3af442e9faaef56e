//! Frame headers (`FrameHeader::parse` / `encode`) and splitting a byte stream into frames the
//! way the transport reads it: header, bounds check, then exactly that many bytes.
//!
//! Properties: no panic; a parsed length is in `1..=max_len` and re-encodes to the same four
//! bytes; `encode` accepts exactly `1..=MAX_FRAME_LEN`; a frame stream splits into frames whose
//! lengths were all checked before the bytes were taken, and the split re-assembles to the input.
#![no_main]

use haven_fuzz::Bytes;
use haven_proto::{FrameHeader, FRAME_HEADER_LEN, MAX_FRAME_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(init: haven_fuzz::seeds::write_if_asked("frame_header"), |data: &[u8]| {
    let mut b = Bytes::new(data);
    // A limit anywhere from 0 to a little above MAX_FRAME_LEN.
    let max_len = (b.u32() as usize) % (MAX_FRAME_LEN + 2);
    let header: [u8; 4] = b.take(4).try_into().unwrap_or([0; 4]);
    let announced = u32::from_be_bytes(header) as usize;
    match FrameHeader::parse(header, max_len) {
        Ok(h) => {
            assert_eq!(h.len, announced);
            assert!(h.len >= 1 && h.len <= max_len, "accepted {} with limit {max_len}", h.len);
            if h.len <= MAX_FRAME_LEN {
                assert_eq!(FrameHeader::encode(h.len).expect("an accepted length encodes"), header);
            }
        }
        Err(_) => assert!(announced == 0 || announced > max_len, "refused {announced} with limit {max_len}"),
    }
    assert_eq!(FrameHeader::encode(announced).is_ok(), (1..=MAX_FRAME_LEN).contains(&announced));

    // The rest is a stream of frames, read with a small limit.
    let stream = b.rest();
    let limit = 64;
    let mut pos = 0;
    let mut rebuilt = Vec::new();
    while stream.len() - pos >= FRAME_HEADER_LEN {
        let header: [u8; 4] = stream[pos..pos + FRAME_HEADER_LEN].try_into().unwrap();
        let Ok(h) = FrameHeader::parse(header, limit) else { break };
        let body = &stream[pos + FRAME_HEADER_LEN..];
        if body.len() < h.len {
            break; // a truncated frame: the reader would wait for more
        }
        rebuilt.extend_from_slice(&FrameHeader::encode(h.len).unwrap());
        rebuilt.extend_from_slice(&body[..h.len]);
        pos += FRAME_HEADER_LEN + h.len;
    }
    assert_eq!(rebuilt, &stream[..pos]);
});
