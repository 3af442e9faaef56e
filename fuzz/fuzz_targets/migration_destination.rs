//! The destination side of a live migration (`migrate_destination`) reading a hostile page
//! stream over an in-memory pipe into a fresh guest. The first input byte is a mode: bit 0
//! prepends a valid stream header and `Hello` for the target's guest, bit 1 replaces the digest
//! of every 32-byte `Complete` frame with the right one (so the fuzzer can reach success); the
//! rest is the stream.
//!
//! A model reads the same stream by the format's rules (frame kinds and size limits, `Pages`
//! validated whole — page numbers, encodings, XOR deltas, no trailing bytes — before any page is
//! written) and applies it to a second guest. Properties: no panic and no hang; the destination
//! fails exactly when the model does (and reports `Aborted` exactly for an `Abort`); afterwards
//! the destination guest's memory, memory digest and vCPU state equal the model's — so a refused
//! frame changed nothing and an accepted one changed exactly its pages — and the guest was never
//! started.
#![no_main]

use std::sync::Arc;

use haven_fuzz::{guest_spec, runtime, GUEST_PAGES};
use haven_node::fuzz_api::xor_apply;
use haven_node::vm::guest::{GuestDriver, RunState, SimulatedGuest, PAGE_SIZE};
use haven_node::vm::migration::{migrate_destination, MigrationError, MigrationProgress, MAGIC, PROTOCOL_VERSION};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

// The page stream format (see `vm::migration`): kind u8, payload length u32 LE, payload.
const K_HELLO: u8 = 0x01;
const K_PAGES: u8 = 0x02;
const K_VCPU: u8 = 0x03;
const K_COMPLETE: u8 = 0x04;
const K_ABORT: u8 = 0x05;
const K_SYNC: u8 = 0x06;
const MAX_PAGES: usize = 256;
const ENC_ZERO: u8 = 0;
const ENC_FULL: u8 = 1;
const ENC_XOR: u8 = 2;

fn max_payload(kind: u8) -> Option<usize> {
    Some(match kind {
        K_HELLO => 16,
        K_PAGES => 6 + MAX_PAGES * (9 + 2 + PAGE_SIZE),
        K_VCPU => 1 << 20,
        K_COMPLETE | 0x82 => 32,
        K_ABORT | 0x83 => 4096,
        K_SYNC | 0x84 => 0,
        0x81 => 12,
        _ => return None,
    })
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    Complete,
    Aborted,
    Failed(&'static str),
}

/// A validated `Pages` frame: (page, encoding, data) entries.
fn validate_pages(p: &[u8]) -> Option<Vec<(u64, u8, &[u8])>> {
    let count = u16::from_le_bytes(p.get(4..6)?.try_into().ok()?) as usize;
    if count == 0 || count > MAX_PAGES {
        return None;
    }
    let mut pos: usize = 6;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = p.get(pos..pos.checked_add(n)?)?;
        pos += n;
        Some(s)
    };
    let mut entries = Vec::new();
    for _ in 0..count {
        let page = u64::from_le_bytes(take(8)?.try_into().ok()?);
        if page >= GUEST_PAGES {
            return None;
        }
        let enc = take(1)?[0];
        let data = match enc {
            ENC_ZERO => &[][..],
            ENC_FULL => take(PAGE_SIZE)?,
            ENC_XOR => {
                let len = u16::from_le_bytes(take(2)?.try_into().ok()?) as usize;
                if len >= PAGE_SIZE {
                    return None;
                }
                let d = take(len)?;
                xor_apply(d, None).ok()?;
                d
            }
            _ => return None,
        };
        entries.push((page, enc, data));
    }
    (pos == p.len()).then_some(entries)
}

/// Reads `stream` by the format's rules into `model`; returns how it ends and the bytes to send
/// (`stream` with `Complete` digests fixed when `fix_digest`).
fn model(stream: &[u8], model: &SimulatedGuest, fix_digest: bool) -> (End, Vec<u8>) {
    let mut send = stream.to_vec();
    let Some(header) = stream.get(..6) else { return (End::Failed("short header"), send) };
    if header[..4] != MAGIC || u16::from_le_bytes([header[4], header[5]]) != PROTOCOL_VERSION {
        return (End::Failed("bad header"), send);
    }
    let mut pos: usize = 6;
    let mut hello = false;
    let mut vcpu = false;
    loop {
        let Some(h) = stream.get(pos..pos + 5) else { return (End::Failed("stream ended"), send) };
        let kind = h[0];
        let len = u32::from_le_bytes(h[1..5].try_into().unwrap()) as usize;
        let Some(max) = max_payload(kind) else { return (End::Failed("unknown kind"), send) };
        if len > max {
            return (End::Failed("oversized frame"), send);
        }
        let Some(payload) = stream.get(pos + 5..pos + 5 + len) else { return (End::Failed("truncated"), send) };
        let at = pos + 5;
        pos += 5 + len;
        if !hello {
            if kind != K_HELLO || len != 16 {
                return (End::Failed("no Hello"), send);
            }
            let page_size = u32::from_le_bytes(payload[..4].try_into().unwrap()) as usize;
            let pages = u64::from_le_bytes(payload[4..12].try_into().unwrap());
            if page_size != PAGE_SIZE || pages != GUEST_PAGES {
                return (End::Failed("guest mismatch"), send);
            }
            hello = true;
            continue;
        }
        match kind {
            K_PAGES => {
                let Some(entries) = validate_pages(payload) else { return (End::Failed("bad Pages"), send) };
                let mut page = vec![0u8; PAGE_SIZE];
                for (n, enc, data) in entries {
                    match enc {
                        ENC_ZERO => model.write_page(n, &vec![0; PAGE_SIZE]).unwrap(),
                        ENC_FULL => model.write_page(n, data).unwrap(),
                        _ => {
                            model.read_page(n, &mut page).unwrap();
                            xor_apply(data, Some(&mut page)).unwrap();
                            model.write_page(n, &page).unwrap();
                        }
                    }
                }
            }
            K_VCPU => {
                if model.load_vcpu_state(payload).is_err() {
                    return (End::Failed("bad vCPU state"), send);
                }
                vcpu = true;
            }
            K_COMPLETE => {
                if len != 32 || !vcpu {
                    return (End::Failed("bad Complete"), send);
                }
                let digest = model.memory_digest();
                if fix_digest {
                    send[at..at + 32].copy_from_slice(&digest);
                }
                if send[at..at + 32] != digest {
                    return (End::Failed("digest mismatch"), send);
                }
                return (End::Complete, send);
            }
            K_SYNC => {}
            K_ABORT => return (End::Aborted, send),
            _ => return (End::Failed("frame for the source"), send),
        }
    }
}

fn memory(g: &SimulatedGuest) -> Vec<u8> {
    let mut all = vec![0u8; PAGE_SIZE * GUEST_PAGES as usize];
    for (n, page) in all.chunks_mut(PAGE_SIZE).enumerate() {
        g.read_page(n as u64, page).unwrap();
    }
    all
}

fuzz_target!(init: haven_fuzz::seeds::write_if_asked("migration_destination"), |data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut stream = Vec::new();
    if mode & 1 != 0 {
        stream.extend_from_slice(&MAGIC);
        stream.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        stream.push(K_HELLO);
        stream.extend_from_slice(&16u32.to_le_bytes());
        stream.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        stream.extend_from_slice(&GUEST_PAGES.to_le_bytes());
        stream.extend_from_slice(&2u32.to_le_bytes());
    }
    stream.extend_from_slice(rest);

    let expected = SimulatedGuest::new(guest_spec());
    let (end, send) = model(&stream, &expected, mode & 2 != 0);

    let guest = SimulatedGuest::new(guest_spec());
    let result = runtime().block_on(async {
        let (mut src, dst) = tokio::io::duplex(256 * 1024);
        let (tx, _rx) = watch::channel(MigrationProgress::default());
        let run = migrate_destination(guest.clone() as Arc<dyn GuestDriver>, dst, tx);
        let feed = async {
            let (mut rd, mut wr) = tokio::io::split(&mut src);
            let write = async {
                let _ = wr.write_all(&send).await;
                let _ = wr.shutdown().await;
            };
            let read = async {
                let mut sink = Vec::new();
                let _ = rd.read_to_end(&mut sink).await;
            };
            tokio::join!(write, read);
        };
        let (result, ()) = tokio::join!(run, feed);
        result
    });

    match (&end, &result) {
        (End::Complete, Ok(_)) | (End::Aborted, Err(MigrationError::Aborted(_))) => {}
        (End::Failed(_), Err(e)) if !matches!(e, MigrationError::Aborted(_)) => {}
        _ => panic!("the model ends with {end:?}, the destination with {result:?}"),
    }
    assert_eq!(guest.state(), RunState::Created, "the destination started its guest");
    assert!(memory(&guest) == memory(&expected), "destination memory differs from the model ({end:?}, {result:?})");
    assert_eq!(guest.memory_digest(), expected.memory_digest());
    assert_eq!(guest.vcpu_state(), expected.vcpu_state(), "vCPU state differs from the model");
});
