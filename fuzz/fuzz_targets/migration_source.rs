//! The source side of a live migration (`migrate_source`) reading a hostile destination's
//! replies over an in-memory pipe, migrating a paused guest. The first input byte is a mode:
//! bit 0 prepends a valid stream header and `HelloAck` for the target's guest, bit 1 replaces the
//! digest of every 32-byte `Ready` frame with the guest's (so the fuzzer can reach success); the
//! rest is what the destination sends.
//!
//! Properties: no panic and no hang; the migration succeeds exactly when the destination's bytes
//! are, in order, a valid header, a `HelloAck` for this guest, a `SyncAck` and a `Ready` with the
//! guest's memory digest; either way the guest is left paused with its throttle at 0 and dirty
//! logging off — as the ownership contract requires of a source — and its memory unchanged.
#![no_main]

use std::sync::Arc;

use haven_fuzz::{guest_spec, runtime, GUEST_PAGES};
use haven_node::vm::guest::{GuestDriver, RunState, SimulatedGuest, PAGE_SIZE};
use haven_node::vm::migration::{
    migrate_source, CancelToken, MigrationConfig, MigrationProgress, MAGIC, PROTOCOL_VERSION,
};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

const K_HELLO_ACK: u8 = 0x81;
const K_READY: u8 = 0x82;
const K_SYNC_ACK: u8 = 0x84;

/// Whether the destination's bytes are the ones a migration succeeds with (see the module docs);
/// fixes `Ready` digests in `stream` when `fix`.
fn succeeds(stream: &mut [u8], digest: &[u8; 32], fix: bool) -> bool {
    if stream.get(..6) != Some(&[&MAGIC[..], &PROTOCOL_VERSION.to_le_bytes()].concat()[..]) {
        return false;
    }
    let mut pos = 6;
    let mut frame = |stream: &mut [u8]| -> Option<(u8, std::ops::Range<usize>)> {
        let h = stream.get(pos..pos + 5)?;
        let (kind, len) = (h[0], u32::from_le_bytes(h[1..5].try_into().unwrap()) as usize);
        let body = pos + 5..pos + 5 + len;
        stream.get(body.clone())?;
        pos = body.end;
        Some((kind, body))
    };
    let Some((K_HELLO_ACK, hello)) = frame(stream) else { return false };
    let mut want = (PAGE_SIZE as u32).to_le_bytes().to_vec();
    want.extend_from_slice(&GUEST_PAGES.to_le_bytes());
    if stream[hello] != want[..] {
        return false;
    }
    let Some((K_SYNC_ACK, sync)) = frame(stream) else { return false };
    if !sync.is_empty() {
        return false;
    }
    let Some((K_READY, ready)) = frame(stream) else { return false };
    if ready.len() != 32 {
        return false;
    }
    if fix {
        stream[ready.clone()].copy_from_slice(digest);
    }
    stream[ready] == digest[..]
}

fuzz_target!(init: haven_fuzz::seeds::write_if_asked("migration_source"), |data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let guest = SimulatedGuest::new(guest_spec());
    guest.step(3);
    guest.start().unwrap();
    guest.pause().unwrap();
    let memory = guest.memory_digest();
    let before = guest.vcpu_state();

    let mut stream = Vec::new();
    if mode & 1 != 0 {
        stream.extend_from_slice(&MAGIC);
        stream.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        stream.push(K_HELLO_ACK);
        stream.extend_from_slice(&12u32.to_le_bytes());
        stream.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        stream.extend_from_slice(&GUEST_PAGES.to_le_bytes());
    }
    stream.extend_from_slice(rest);
    let expect_ok = succeeds(&mut stream, &memory, mode & 2 != 0);

    let result = runtime().block_on(async {
        let (src, mut dst) = tokio::io::duplex(256 * 1024);
        let (tx, _rx) = watch::channel(MigrationProgress::default());
        let config = MigrationConfig { converge_check_ms: 1000, ..MigrationConfig::default() };
        let run = migrate_source(guest.clone() as Arc<dyn GuestDriver>, src, config, tx, CancelToken::new());
        let reply = async {
            let (mut rd, mut wr) = tokio::io::split(&mut dst);
            let write = async {
                let _ = wr.write_all(&stream).await;
                let _ = wr.shutdown().await;
            };
            let read = async {
                let mut sink = Vec::new();
                let _ = rd.read_to_end(&mut sink).await;
            };
            tokio::join!(write, read);
        };
        let (result, ()) = tokio::join!(run, reply);
        result
    });

    assert_eq!(result.is_ok(), expect_ok, "expected success {expect_ok}, got {result:?}");
    assert_eq!(guest.state(), RunState::Paused, "the source guest is not left paused ({result:?})");
    assert_eq!(guest.workload_stats().throttle_percent, 0, "throttle left on");
    assert_eq!(guest.memory_digest(), memory, "the source's memory changed");
    assert_eq!(guest.vcpu_state(), before, "the source's vCPU state changed");
    guest.step(1);
    assert!(guest.take_dirty().is_empty(), "dirty logging left on ({result:?})");
    guest.stop().unwrap();
});
