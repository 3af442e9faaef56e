//! The block store's key layout (`blocks` keys `vol | block | seq`, big-endian; range ends by
//! `prefix_end`) and the high-water merge operator RocksDB runs on `volume_meta` (u64 max;
//! malformed input poisons the value instead of failing compaction).
//!
//! Properties: no panic; a key parses iff it is 24 bytes of the asked volume, and then re-encodes
//! to itself; byte order of keys is (block, seq) order; `prefix_end` is the least key above every
//! key with the prefix (`None` only for all-0xFF prefixes); the merge is the maximum of its
//! 8-byte inputs, poisoned (empty) iff any input is not 8 bytes, and associative — merging any
//! split of the operands partially first (as RocksDB may) gives the same value.
#![no_main]

use haven_fuzz::Bytes;
use haven_node::fuzz_api::{block_key, hwm_merge, parse_block_key, prefix_end};
use haven_proto::VolumeId;
use libfuzzer_sys::fuzz_target;

fn keys(data: &[u8]) {
    let mut b = Bytes::new(data);
    let vol = VolumeId(b.u64());
    let key_len = b.u8() as usize % 32;
    let key = b.take(key_len);
    match parse_block_key(vol, key) {
        Ok((block, seq)) => {
            assert_eq!(key.len(), 24);
            assert_eq!(&block_key(vol, block, seq)[..], key, "block key round trip");
        }
        Err(_) => assert!(key.len() != 24 || key[..8] != vol.0.to_be_bytes(), "a good key was refused"),
    }
    let (b1, s1, b2, s2) = (b.u64(), b.u64(), b.u64(), b.u64());
    let (k1, k2) = (block_key(vol, b1, s1), block_key(vol, b2, s2));
    assert_eq!(k1.cmp(&k2), (b1, s1).cmp(&(b2, s2)), "key order is not (block, seq) order");
    assert_eq!(parse_block_key(vol, &k1).unwrap(), (b1, s1));

    let prefix_len = b.u8() as usize % 12;
    let prefix = b.take(prefix_len);
    match prefix_end(prefix) {
        None => assert!(prefix.iter().all(|x| *x == 0xFF), "no end for {prefix:02x?}"),
        Some(end) => {
            // Above every key with the prefix, and the least such key: the prefix with its
            // trailing 0xFFs dropped and its last other byte raised by one.
            let mut longest = prefix.to_vec();
            longest.extend_from_slice(&[0xFF; 32]);
            assert!(end.as_slice() > longest.as_slice() && !end.starts_with(prefix));
            let keep = prefix.iter().rposition(|x| *x != 0xFF).expect("a prefix with an end has a non-0xFF byte");
            let mut least = prefix[..=keep].to_vec();
            least[keep] += 1;
            assert_eq!(end, least);
        }
    }
}

fn merge(data: &[u8]) {
    // Operands: a length byte (0..=11, 8 most often) then that many bytes, until the input ends.
    let mut b = Bytes::new(data);
    let split = b.u8() as usize;
    let mut operands: Vec<&[u8]> = Vec::new();
    loop {
        let Some(len) = b.take(1).first().map(|l| if *l < 0xC0 { 8 } else { (*l as usize) % 12 }) else { break };
        operands.push(b.take(len));
    }
    let merged = hwm_merge(operands.iter().copied());
    if operands.iter().any(|o| o.len() != 8) {
        assert!(merged.is_empty(), "malformed operands did not poison the value");
    } else {
        let max = operands.iter().map(|o| u64::from_be_bytes((*o).try_into().unwrap())).max().unwrap_or(0);
        assert_eq!(merged, max.to_be_bytes(), "the merge is not the maximum");
    }
    // Associativity: a partial merge of a prefix, then the full merge with the rest.
    let k = split.min(operands.len());
    let partial = hwm_merge(operands[..k].iter().copied());
    let full = hwm_merge(std::iter::once(&partial[..]).chain(operands[k..].iter().copied()));
    assert_eq!(full, merged, "partial merging changed the result");
}

fuzz_target!(init: haven_fuzz::seeds::write_if_asked("blockstore_keys"), |data: &[u8]| {
    keys(data);
    merge(data);
});
