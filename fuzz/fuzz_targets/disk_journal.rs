//! The disk journal entry decoder (`DiskLog::decode`), one entry per disk in a guest's device
//! state.
//!
//! Properties: no panic; an accepted entry took at most the input, re-encodes to exactly the
//! bytes it took, and satisfies the documented invariants (valid geometry, stream nonce not 0,
//! `acked <= issued <= acked + 1`, 1..=MAX_BRANCHES branch points with strictly increasing starts
//! from at least 1); the operations a guest performs on a loaded journal — issuing the next
//! write, forking a new timeline on restore — work and keep those invariants.
#![no_main]

use haven_fuzz::Bytes;
use haven_node::vm::disk::{DiskGeometry, DiskLog, DiskWrite, MAX_BRANCHES};
use haven_node::vm::guest::WorkloadPattern;
use libfuzzer_sys::fuzz_target;

fn check_invariants(log: &DiskLog) {
    let g = log.geometry;
    let size = g.blocks.checked_mul(u64::from(g.block_size)).expect("geometry size overflows");
    assert_eq!(DiskGeometry::of_volume(g.volume, size, g.block_size), Some(g), "impossible geometry {g:?}");
    assert_ne!(log.stream, 0);
    assert!(
        log.acked <= log.issued && log.issued <= log.acked.saturating_add(1),
        "acked {} issued {}",
        log.acked,
        log.issued
    );
    assert!(!log.branches.is_empty() && log.branches.len() <= MAX_BRANCHES);
    assert!(log.branches[0].start >= 1);
    assert!(log.branches.windows(2).all(|w| w[0].start < w[1].start));
}

fuzz_target!(init: haven_fuzz::seeds::write_if_asked("disk_journal"), |data: &[u8]| {
    let Ok((mut log, used)) = DiskLog::decode(data) else { return };
    assert!(used <= data.len());
    let mut bytes = Vec::new();
    log.encode(&mut bytes);
    assert_eq!(bytes, &data[..used], "a decoded journal entry re-encodes differently");
    check_invariants(&log);

    // The next write the guest issues (the failed one again, else the one after the last
    // acknowledged) exists and lands inside the disk's region.
    let next = if log.issued > log.acked { Some(log.issued) } else { log.acked.checked_add(1) };
    let next = next.unwrap_or_else(|| panic!("a journal acknowledged up to {} leaves no next write", log.acked));
    let write = DiskWrite::of(&log, WorkloadPattern::Uniform, next);
    assert_eq!(write.data.len(), log.geometry.block_size as usize);
    assert!(write.block < log.geometry.blocks && write.offset == write.block * u64::from(log.geometry.block_size));

    let mut rest = Bytes::new(&data[used..]);
    let forks = rest.u8() % 12;
    for _ in 0..forks {
        log.fork(rest.u64() | 1);
        check_invariants(&log);
        let mut bytes = Vec::new();
        log.encode(&mut bytes);
        assert_eq!(DiskLog::decode(&bytes).map(|(l, _)| l).as_ref(), Ok(&log), "a forked entry does not round trip");
    }
});
