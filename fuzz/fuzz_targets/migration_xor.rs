//! The migration stream's XOR delta codec (`xor_encode` / `xor_apply`): deltas the encoder makes
//! from two pages built from the input, and the input itself as a delta from a hostile source.
//!
//! Properties: no panic; an encoded delta is valid, within its size limit, and turns the old page
//! into the new one; checking a delta (`xor_apply` without a page, as `Pages` validation does)
//! accepts exactly what applying it accepts; an empty delta changes nothing, and encoding the
//! effect of an accepted delta against the old page gives a delta with the same effect.
#![no_main]

use haven_fuzz::Bytes;
use haven_node::fuzz_api::{xor_apply, xor_encode};
use haven_node::vm::guest::PAGE_SIZE;
use libfuzzer_sys::fuzz_target;

fn page_from(seed: &[u8]) -> Vec<u8> {
    if seed.is_empty() {
        return vec![0; PAGE_SIZE];
    }
    seed.iter().copied().cycle().take(PAGE_SIZE).collect()
}

fuzz_target!(init: haven_fuzz::seeds::write_if_asked("migration_xor"), |data: &[u8]| {
    let mut b = Bytes::new(data);
    let limit = b.u16() as usize % (PAGE_SIZE + 1);
    let old_len = b.u8() as usize;
    let old = page_from(b.take(old_len));
    // Edits: (offset, run length, xor byte) triples turn the old page into the new one.
    let edits = b.u8() as usize % 32;
    let mut new = old.clone();
    for _ in 0..edits {
        let at = b.u16() as usize % PAGE_SIZE;
        let run = (b.u16() as usize % 512).min(PAGE_SIZE - at);
        let x = b.u8() | 1;
        for byte in &mut new[at..at + run] {
            *byte ^= x;
        }
    }
    let raw = b.rest();

    // Encoder → decoder round trip, under the full and a fuzzed limit.
    let mut enc = Vec::new();
    assert!(xor_encode(&new, &old, &mut enc, PAGE_SIZE * 3), "a delta never needs more than three pages");
    xor_apply(&enc, None).expect("an encoded delta is valid");
    let mut page = old.clone();
    xor_apply(&enc, Some(&mut page)).expect("an encoded delta applies");
    assert!(page == new, "the delta did not turn the old page into the new one");
    if xor_encode(&new, &old, &mut enc, limit) {
        assert!(enc.len() <= limit, "delta of {} bytes over its limit {limit}", enc.len());
        let mut page = old.clone();
        xor_apply(&enc, Some(&mut page)).expect("a delta within its limit applies");
        assert!(page == new);
    }

    // Hostile delta.
    let checked = xor_apply(raw, None);
    let mut page = old.clone();
    let applied = xor_apply(raw, Some(&mut page));
    assert_eq!(checked.is_ok(), applied.is_ok(), "checking and applying a delta disagree");
    if applied.is_ok() {
        assert!(!raw.is_empty() || page == old, "an empty delta changed the page");
        let mut again = Vec::new();
        assert!(xor_encode(&page, &old, &mut again, PAGE_SIZE * 3));
        let mut replay = old.clone();
        xor_apply(&again, Some(&mut replay)).expect("a re-encoded delta applies");
        assert!(replay == page, "re-encoding a delta's effect changed it");
    }
});
