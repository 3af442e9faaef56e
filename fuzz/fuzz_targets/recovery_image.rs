//! Recovery image loading (`vm::group::load_image`): a file claiming to be the image of the
//! target's VM, checked against a catalog record. The first input byte is a mode whose bits fix
//! what the fuzzer cannot forge — bit 0 the vCPU state's checksum, bit 1 the header's memory
//! digest and last write (computed from the pages and state in the file), bit 2 the trailing
//! blake3 — and the catalog record is read from the (fixed) file, as a consistent but hostile
//! source would have recorded it.
//!
//! Properties: no panic; peak allocation at most 4× the file plus 2 MiB (its read buffer and the
//! guest), whatever sizes the header claims; a loaded guest is unstarted, has the memory digest
//! and last write the header and record promise, holds at most the stored pages, and survives a
//! round trip: written back as an image and loaded again, it has the same memory and vCPU state.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use haven_fuzz::{assert_alloc_bounded, guest_spec, hex, measure, GUEST_PAGES, IMAGE_PLAN, IMAGE_VM};
use haven_node::vm::group::{encode_body, image_path, load_image, write_image_file};
use haven_node::vm::guest::{GuestDriver, RunState, SimulatedGuest, PAGE_SIZE};
use haven_proto::plan::RecoveryImage;
use haven_proto::VmId;
use libfuzzer_sys::fuzz_target;

const HEADER_LEN: usize = 88;
/// Where `last_seq` sits in a vCPU state (after magic, version, flags, pages, vcpus, seed, pattern
/// tag and hot pages).
const VCPU_LAST_SEQ_AT: usize = 4 + 2 + 2 + 8 + 4 + 8 + 1 + 8;

fn scratch_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base =
            if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = base.join(format!("haven-fuzz-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory for image files");
        dir
    })
}

fn le_u32(b: &[u8]) -> usize {
    u32::from_le_bytes(b[..4].try_into().unwrap()) as usize
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

/// Applies the mode's fix-ups to an image body (no trailer).
fn fix(body: &mut [u8], mode: u8) {
    if body.len() < HEADER_LEN {
        return;
    }
    let vcpu_len = le_u32(&body[76..80]);
    let vcpu_end = HEADER_LEN.saturating_add(vcpu_len);
    if mode & 1 != 0 && vcpu_len >= 32 && vcpu_end <= body.len() {
        let sum = *blake3::hash(&body[HEADER_LEN..vcpu_end - 32]).as_bytes();
        body[vcpu_end - 32..vcpu_end].copy_from_slice(&sum);
    }
    if mode & 2 != 0 && vcpu_end <= body.len() {
        let scratch = SimulatedGuest::new(guest_spec());
        let count = le_u64(&body[80..88]);
        let mut pos = vcpu_end;
        for _ in 0..count.min(GUEST_PAGES) {
            let Some(entry) = body.get(pos..pos + 8 + PAGE_SIZE) else { break };
            let page = le_u64(entry);
            if page < GUEST_PAGES {
                scratch.write_page(page, &entry[8..]).unwrap();
            }
            pos += 8 + PAGE_SIZE;
        }
        body[44..76].copy_from_slice(&scratch.memory_digest());
        if vcpu_len >= VCPU_LAST_SEQ_AT + 8 {
            let at = HEADER_LEN + VCPU_LAST_SEQ_AT;
            let seq: [u8; 8] = body[at..at + 8].try_into().unwrap();
            body[36..44].copy_from_slice(&seq);
        }
    }
}

fuzz_target!(init: haven_fuzz::seeds::write_if_asked("recovery_image"), |data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut file = rest.to_vec();
    if mode & 4 != 0 {
        fix(&mut file, mode);
        let sum = *blake3::hash(&file).as_bytes();
        file.extend_from_slice(&sum);
    } else if file.len() >= 32 {
        let n = file.len() - 32;
        fix(&mut file[..n], mode);
    }
    let header = file.get(..HEADER_LEN).unwrap_or(&[0u8; HEADER_LEN][..]).to_vec();
    let record = RecoveryImage {
        vm: VmId(IMAGE_VM),
        image: format!("plan-{IMAGE_PLAN}/vm-{IMAGE_VM}"),
        image_digest: hex(&file[file.len().saturating_sub(32)..]),
        memory_digest: hex(&header[44..76]),
        last_seq: le_u64(&header[36..44]),
        bytes: file.len() as u64,
    };
    let path = image_path(scratch_dir(), IMAGE_PLAN, VmId(IMAGE_VM));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &file).unwrap();

    let (loaded, peak) = measure(|| load_image(&path, IMAGE_PLAN, VmId(IMAGE_VM), guest_spec(), &record));
    assert_alloc_bounded("load_image", peak, file.len(), 4, 2 << 20);
    let Ok(guest) = loaded else { return };

    assert_eq!(guest.state(), RunState::Created, "a loaded guest was started");
    assert_eq!(hex(&guest.memory_digest()), record.memory_digest);
    assert_eq!(guest.workload_stats().last_seq, record.last_seq);
    let stored = le_u64(&header[80..88]);
    let nonzero = (0..GUEST_PAGES).filter(|p| !guest.is_zero_page(*p).unwrap()).count() as u64;
    assert!(nonzero <= stored, "{nonzero} non-zero pages from {stored} stored");

    // Round trip: write the loaded guest back as an image and load that.
    let again = scratch_dir().join("roundtrip").join("vm.img");
    let summary = write_image_file(&again, |w| encode_body(guest.as_ref(), IMAGE_PLAN, VmId(IMAGE_VM), w))
        .expect("writing a loaded guest's image");
    let record2 = RecoveryImage {
        image_digest: hex(&summary.digest),
        memory_digest: hex(&summary.memory_digest),
        last_seq: summary.last_seq,
        bytes: summary.bytes,
        ..record
    };
    let reloaded = load_image(&again, IMAGE_PLAN, VmId(IMAGE_VM), guest_spec(), &record2)
        .unwrap_or_else(|e| panic!("an image written from a loaded guest does not load: {e}"));
    assert_eq!(reloaded.memory_digest(), guest.memory_digest());
    assert_eq!(reloaded.vcpu_state(), guest.vcpu_state());
});
