//! vCPU/device state decoding (`GuestDriver::load_vcpu_state` of the simulated guest: registers,
//! workload position and the disk journal), as it arrives in a migration's `Vcpu` frame or a
//! recovery image. The first input byte is a mode: bit 0 appends the blake3 checksum the format
//! ends with (so the fuzzer gets past it); the rest is the state.
//!
//! Properties: no panic; a refused state leaves the guest's state exactly as it was; an accepted
//! state re-encodes (`vcpu_state`) to bytes another guest accepts and re-encodes identically,
//! and to the input itself when the input is a current-version encoding with zero flags (and no
//! hot-page count for a pattern that has none); the guest can run on from an accepted state (one
//! workload write) and fork its disk timelines (what a restore does) keeping every journal
//! invariant.
#![no_main]

use haven_fuzz::{assert_alloc_bounded, guest_spec, measure};
use haven_node::vm::disk::DiskLog;
use haven_node::vm::guest::{GuestDriver, SimulatedGuest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(init: haven_fuzz::seeds::write_if_asked("vcpu_state"), |data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else { return };
    let mut state = body.to_vec();
    if mode & 1 != 0 {
        state.extend_from_slice(blake3::hash(body).as_bytes());
    }
    let guest = SimulatedGuest::new(guest_spec());
    guest.step(u64::from(mode >> 4)); // a guest that has run a little, so a refusal has something to keep
    let before = guest.vcpu_state();
    let (loaded, peak) = measure(|| guest.load_vcpu_state(&state));
    assert_alloc_bounded("load_vcpu_state", peak, state.len(), 4, 4096);
    if loaded.is_err() {
        assert_eq!(guest.vcpu_state(), before, "a refused state changed the guest");
        return;
    }

    let after = guest.vcpu_state();
    let other = SimulatedGuest::new(guest_spec());
    other.load_vcpu_state(&after).expect("a guest's own state loads into another guest");
    assert_eq!(other.vcpu_state(), after, "vCPU state round trip changed it");
    // The pattern's hot-page count is only read for the hot-set pattern (tag at 28, count at 29).
    let current_version = state.get(4..8) == Some(&[2, 0, 0, 0][..]);
    let hot_canonical = state[28] == 1 || state[29..37] == [0; 8];
    if current_version && hot_canonical {
        assert_eq!(after, state, "a current-version state did not re-encode to itself");
    }
    for log in guest.disk_journal() {
        let mut bytes = Vec::new();
        log.encode(&mut bytes);
        assert_eq!(DiskLog::decode(&bytes).map(|(l, _)| l), Ok(log), "a loaded journal entry does not round trip");
    }

    // Run on from the state, and fork the disk timelines as a restore does.
    guest.step(1);
    guest.fork_disk_timeline();
    for log in guest.disk_journal() {
        let mut bytes = Vec::new();
        log.encode(&mut bytes);
        DiskLog::decode(&bytes).expect("a forked journal keeps its invariants");
    }
    let resumed = guest.vcpu_state();
    SimulatedGuest::new(guest_spec()).load_vcpu_state(&resumed).expect("the state after running on loads");
});
