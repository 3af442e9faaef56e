//! The NBD wire codec (`nbd::protocol`) and request validation (`nbd::server::validate_request`)
//! on arbitrary bytes: every decoder runs on the same input.
//!
//! Properties: no panic; every accepted message re-encodes to exactly the bytes it was decoded
//! from; refusals happen for the documented reasons only (bad magic, short input, bad strings,
//! inconsistent counts); `validate_request` accepts a request iff it is in range, aligned, within
//! the payload limit, uses only allowed flags and does not modify a read-only export — the rules
//! its documentation states, written out independently here.
#![no_main]

use haven_fuzz::Bytes;
use haven_node::nbd::protocol as p;
use haven_node::nbd::server::{validate_request, Command};
use haven_node::nbd::{ExportInfo, NbdErrno};
use libfuzzer_sys::fuzz_target;

fn codec(data: &[u8]) {
    match p::decode_client_flags(data) {
        Ok(f) => {
            let flags = u32::from_be_bytes(data[..4].try_into().unwrap());
            assert_eq!(flags & !(p::FLAG_C_FIXED_NEWSTYLE | p::FLAG_C_NO_ZEROES), 0);
            assert_ne!(flags & p::FLAG_C_FIXED_NEWSTYLE, 0);
            assert_eq!(f.no_zeroes, flags & p::FLAG_C_NO_ZEROES != 0);
        }
        Err(_) => assert!(
            data.len() < 4 || {
                let flags = u32::from_be_bytes(data[..4].try_into().unwrap());
                flags & p::FLAG_C_FIXED_NEWSTYLE == 0 || flags & !(p::FLAG_C_FIXED_NEWSTYLE | p::FLAG_C_NO_ZEROES) != 0
            },
            "good client flags refused"
        ),
    }

    match p::decode_option_header(data) {
        Ok(h) => {
            let mut again = p::encode_option(h.option, &[]);
            again[12..16].copy_from_slice(&h.len.to_be_bytes());
            assert_eq!(&again[..], &data[..p::OPTION_HEADER_LEN]);
        }
        Err(_) => assert!(data.len() < p::OPTION_HEADER_LEN || data[..8] != p::IHAVEOPT.to_be_bytes()),
    }

    match p::decode_option_reply_header(data) {
        Ok(h) => {
            let mut again = Vec::new();
            p::put_option_reply(&mut again, h.option, h.reply_type, &[]);
            again[16..20].copy_from_slice(&h.len.to_be_bytes());
            assert_eq!(&again[..], &data[..p::OPTION_REPLY_HEADER_LEN]);
        }
        Err(_) => assert!(data.len() < p::OPTION_REPLY_HEADER_LEN || data[..8] != p::OPTION_REPLY_MAGIC.to_be_bytes()),
    }

    if let Ok(r) = p::decode_info_request(data) {
        assert!(r.name.len() <= p::MAX_STRING_LEN && !r.name.contains('\0'));
        assert_eq!(p::encode_info_request(&r.name, &r.requests), data, "info request round trip");
    }

    match p::decode_request(data) {
        Ok(r) => assert_eq!(&p::encode_request(&r)[..], &data[..p::REQUEST_LEN], "request round trip"),
        Err(_) => assert!(data.len() < p::REQUEST_LEN || data[..4] != p::REQUEST_MAGIC.to_be_bytes()),
    }

    match p::decode_simple_reply(data) {
        Ok(r) => assert_eq!(&p::encode_simple_reply(r.error, r.handle)[..], &data[..p::SIMPLE_REPLY_LEN]),
        Err(_) => assert!(data.len() < p::SIMPLE_REPLY_LEN || data[..4] != p::SIMPLE_REPLY_MAGIC.to_be_bytes()),
    }

    match p::decode_string(data) {
        Ok(s) => assert_eq!(s.as_bytes(), data),
        Err(_) => assert!(data.len() > p::MAX_STRING_LEN || data.contains(&0) || std::str::from_utf8(data).is_err()),
    }
    let lossy = String::from_utf8_lossy(data);
    let clamped = p::clamp_string(&lossy);
    assert!(clamped.len() <= p::MAX_STRING_LEN && lossy.starts_with(clamped));
    assert!(clamped.len() == lossy.len() || clamped.len() + 4 > p::MAX_STRING_LEN);
}

fn validation(data: &[u8]) {
    let mut b = Bytes::new(data);
    let req = p::Request { flags: b.u16(), kind: b.u16() % 10, handle: b.u64(), offset: b.u64(), len: b.u32() };
    let shift = b.u8();
    let info = ExportInfo {
        size: b.u64() >> (shift % 64),
        block_size: if shift & 0x80 != 0 { 1 << (b.u8() % 16) } else { b.u32() },
        read_only: shift & 0x40 != 0,
        description: String::new(),
    };
    let max_payload = b.u32();
    let verdict = validate_request(&req, &info, max_payload);

    let cmd = Command::from_wire(req.kind);
    let allowed = match cmd {
        Command::WriteZeroes => p::CMD_FLAG_FUA | p::CMD_FLAG_NO_HOLE,
        _ => p::CMD_FLAG_FUA,
    };
    let known = !matches!(cmd, Command::Other(_)) && req.flags & !allowed == 0;
    let modifies = matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes);
    let bs = u64::from(info.block_size.max(1));
    let len = u64::from(req.len);
    let in_range = req.offset.checked_add(len).is_some_and(|end| end <= info.size);
    let fits = !matches!(cmd, Command::Read | Command::Write) || req.len <= max_payload;
    // TRIM is advisory and may be unaligned (the backend trims the whole blocks inside it).
    let aligned = cmd == Command::Trim || (req.offset % bs == 0 && len % bs == 0);
    let acceptable = known
        && (matches!(cmd, Command::Flush | Command::Disc)
            || (!(modifies && info.read_only) && req.len > 0 && fits && aligned && in_range));
    match verdict {
        Ok(c) => {
            assert!(acceptable, "accepted {req:?} on {info:?} (max payload {max_payload})");
            assert_eq!(c, cmd);
        }
        Err(errno) => {
            assert!(!acceptable, "refused {req:?} on {info:?} with {errno:?} (max payload {max_payload})");
            if modifies && info.read_only && known {
                assert_eq!(errno, NbdErrno::Perm, "a modification of a read-only export must be EPERM");
            }
        }
    }
}

fuzz_target!(init: haven_fuzz::seeds::write_if_asked("nbd_protocol"), |data: &[u8]| {
    codec(data);
    validation(data);
});
