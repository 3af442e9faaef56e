//! The simulated guest's disk workload: which block each disk write goes to, the self-checking
//! record it leaves there, the journal of acknowledged writes the guest keeps, and the check that
//! proves from journal and disk contents that no acknowledged write was lost, torn, misplaced or
//! rolled back.
//!
//! # Streams and the journal
//!
//! Every disk a guest has (a volume attached to the VM in the catalog) carries one write *stream*:
//! a nonce chosen when the guest first sees the disk, and a sequence of writes numbered from 1.
//! Write `seq` goes to block [`choose_block`]`(pattern, stream, seq)` within the disk's first
//! `blocks` blocks (at most [`DISK_REGION_BLOCKS`]) and fills it with a record: magic, stream,
//! block, seq, branch, checksum, and filler derived from them.
//!
//! A *branch* is a timeline of the stream. When a guest is restored from a recovery image, the
//! timeline the image was taken from may have gone on elsewhere (the live guest kept writing
//! after the snapshot); the restored guest forks a new branch at its next write, so the same
//! seq written on the two timelines differs on disk, and a disk that was not rolled back with
//! the guest is caught even after the restored guest has rewritten the same seqs. The journal
//! keeps the last [`MAX_BRANCHES`] branch points per disk. The guest's journal entry per disk,
//! [`DiskLog`], says how far the stream got: `acked` (the last write the volume acknowledged as
//! durable on every in-sync replica) and `issued` (`acked`, or `acked + 1` while a write is in
//! flight or failed; a failed write is issued again before any later one). So at most one write
//! per disk is outstanding, and the disk's content is a function of the journal.
//!
//! The journal is part of the guest's device state (`GuestDriver::vcpu_state`), like a real
//! guest's knowledge of what its disk acknowledged lives in its memory: it moves with a live
//! migration and is captured in a plan's recovery image. After a fail-back, the disks (rolled back
//! to their recovery snapshot) and the journal (restored from the image) must agree, which
//! [`check_disk`] verifies block by block:
//!
//! - every block holds, for this stream, exactly the last write the journal says went there, or a
//!   later one the journal had issued by the end of the check (never an older one: **lost**);
//! - no block holds a write the journal never issued (**future**: the disk is ahead of the guest,
//!   e.g. not rolled back with its memory), a write of a timeline the guest abandoned
//!   (**forked**), a record of another block (**foreign**), or a record whose checksum or filler
//!   does not match (**torn**).
//!
//! Blocks of other streams (an earlier attachment, another writer) count as never written.
//!
//! [`drain`] is the one way to wait for a paused guest's disk writes in flight.
//!
//! Must not: do I/O — the host's block backend (`super::disk_backend`) performs writes and
//! reads; this module only says what they must be and judges what came back.

use super::guest::{fill, filled_from, le_u64, mix, WorkloadPattern};

/// First eight bytes of every block the disk workload wrote.
pub const DISK_MAGIC: [u8; 8] = *b"HVNDISK1";
/// Bytes of the record at the start of a written block; the filler follows.
/// Layout (little endian): magic 0..8, stream 8..16, block 16..24, seq 24..32,
/// checksum 32..40 (first 8 bytes of blake3 over bytes 0..32 and 40..block_size), branch 40..48.
const RECORD_LEN: usize = 48;
/// Most blocks of one disk the workload writes (the check reads all of them).
pub const DISK_REGION_BLOCKS: u64 = 1024;
/// Most disks one guest's journal holds (the catalog allows as many volumes per VM).
pub const MAX_GUEST_DISKS: usize = haven_proto::vm::MAX_VM_VOLUMES;
/// Branch points one disk's journal keeps (older writes are checked without their branch).
pub const MAX_BRANCHES: usize = 8;
/// Bytes of a [`DiskLog`] in the device state before its branch points.
const DISK_LOG_FIXED_BYTES: usize = 8 + 4 + 8 + 8 + 8 + 8 + 4;
/// Bytes of one branch point in the device state.
const BRANCH_BYTES: usize = 16;

/// A disk as the guest sees it: which volume, its block size, and how many blocks it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskGeometry {
    pub volume: u64,
    pub block_size: u32,
    /// Blocks the workload writes, from block 0: `min(volume blocks, DISK_REGION_BLOCKS)`.
    pub blocks: u64,
}

impl DiskGeometry {
    /// The geometry for a volume of `size_bytes` in `block_size` blocks; `None` if the volume is
    /// too small to hold a record or the block size is not one a record fits.
    pub fn of_volume(volume: u64, size_bytes: u64, block_size: u32) -> Option<Self> {
        let blocks = (size_bytes / u64::from(block_size.max(1))).min(DISK_REGION_BLOCKS);
        let geometry = Self { volume, block_size, blocks };
        geometry.is_valid().then_some(geometry)
    }

    fn is_valid(&self) -> bool {
        self.block_size.is_power_of_two()
            && (512..=1 << 20).contains(&self.block_size)
            && (1..=DISK_REGION_BLOCKS).contains(&self.blocks)
    }
}

/// Where a branch (timeline) of a disk's stream begins: writes `start..` until the next branch
/// carry `nonce`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Branch {
    pub start: u64,
    pub nonce: u64,
}

/// The highest sequence number a guest workload uses, for memory pages and disk writes alike: far
/// beyond any real run (2^63 writes), and low enough that `seq + 1` never overflows. Decoders
/// refuse anything above it and workloads stop issuing at it, so every state a guest reaches can
/// be saved, loaded and run on.
pub const MAX_SEQ: u64 = u64::MAX / 2;

/// One disk's entry in the guest's journal. Invariants: `acked <= issued <= acked + 1`;
/// `branches` is non-empty, at most [`MAX_BRANCHES`] long, with strictly increasing starts, and
/// every start is at least 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLog {
    pub geometry: DiskGeometry,
    /// Nonce of this disk's write stream (never 0).
    pub stream: u64,
    /// Last write acknowledged durable.
    pub acked: u64,
    /// Last write handed to the disk (`acked + 1` while one is outstanding or failed).
    pub issued: u64,
    /// The stream's timelines, oldest first; writes before the first start are not checked
    /// against a branch (its point was dropped to keep the journal bounded).
    pub branches: Vec<Branch>,
}

impl DiskLog {
    pub fn new(geometry: DiskGeometry, stream: u64) -> Self {
        assert!(stream != 0, "stream nonce 0 is reserved");
        Self { geometry, stream, acked: 0, issued: 0, branches: vec![Branch { start: 1, nonce: stream }] }
    }

    /// The branch nonce write `seq` carries (`None` if its branch point was dropped).
    pub fn branch_of(&self, seq: u64) -> Option<u64> {
        self.branches.iter().rev().find(|b| b.start <= seq).map(|b| b.nonce)
    }

    /// Start a new timeline at the next write not yet issued, marked by `nonce` (a restore: the
    /// timeline this state was saved from may have gone on elsewhere). A write in flight when the
    /// state was saved stays on its branch (it is issued again with the same bytes).
    pub fn fork(&mut self, nonce: u64) {
        let start = self.issued + 1;
        self.branches.retain(|b| b.start < start);
        self.branches.push(Branch { start, nonce });
        if self.branches.len() > MAX_BRANCHES {
            self.branches.remove(0);
        }
    }

    /// Appends the log's bytes to the device state.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.geometry.volume.to_le_bytes());
        out.extend_from_slice(&self.geometry.block_size.to_le_bytes());
        out.extend_from_slice(&self.geometry.blocks.to_le_bytes());
        out.extend_from_slice(&self.stream.to_le_bytes());
        out.extend_from_slice(&self.acked.to_le_bytes());
        out.extend_from_slice(&self.issued.to_le_bytes());
        out.extend_from_slice(&(self.branches.len() as u32).to_le_bytes());
        for b in &self.branches {
            out.extend_from_slice(&b.start.to_le_bytes());
            out.extend_from_slice(&b.nonce.to_le_bytes());
        }
    }

    /// Parses one log from the front of `b`, checking its invariants; returns it and the bytes
    /// it took.
    pub fn decode(b: &[u8]) -> Result<(Self, usize), String> {
        if b.len() < DISK_LOG_FIXED_BYTES {
            return Err(format!("disk log truncated at {} bytes", b.len()));
        }
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8-byte slice"));
        let geometry = DiskGeometry {
            volume: u64_at(0),
            block_size: u32::from_le_bytes(b[8..12].try_into().expect("4-byte slice")),
            blocks: u64_at(12),
        };
        let count = u32::from_le_bytes(b[44..48].try_into().expect("4-byte slice")) as usize;
        if count == 0 || count > MAX_BRANCHES {
            return Err(format!("disk {} has {count} branches (1..={MAX_BRANCHES})", geometry.volume));
        }
        let len = DISK_LOG_FIXED_BYTES + count * BRANCH_BYTES;
        if b.len() < len {
            return Err(format!("disk log truncated at {} bytes, expected {len}", b.len()));
        }
        let branches: Vec<Branch> = (0..count)
            .map(|i| {
                let at = DISK_LOG_FIXED_BYTES + i * BRANCH_BYTES;
                Branch { start: u64_at(at), nonce: u64_at(at + 8) }
            })
            .collect();
        let log = Self { geometry, stream: u64_at(20), acked: u64_at(28), issued: u64_at(36), branches };
        if !geometry.is_valid() {
            return Err(format!("disk {} has an impossible geometry {geometry:?}", geometry.volume));
        }
        if log.stream == 0 {
            return Err(format!("disk {} has stream 0", geometry.volume));
        }
        if log.issued < log.acked || log.issued > log.acked.saturating_add(1) {
            return Err(format!("disk {} has issued {} against acked {}", geometry.volume, log.issued, log.acked));
        }
        // The guest issues `acked + 1` next and a restore forks at `issued + 1`: both must exist.
        if log.issued > MAX_SEQ {
            return Err(format!("disk {} has issued write {}, above the limit {MAX_SEQ}", geometry.volume, log.issued));
        }
        if log.branches[0].start == 0 || log.branches.windows(2).any(|w| w[0].start >= w[1].start) {
            return Err(format!("disk {} has branch points out of order", geometry.volume));
        }
        Ok((log, len))
    }
}

/// A write the guest wants performed: `data` at byte `offset` of `volume`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskWrite {
    pub volume: u64,
    pub block: u64,
    pub seq: u64,
    pub offset: u64,
    pub data: Vec<u8>,
}

impl DiskWrite {
    /// Write `seq` of `log`'s stream, on the branch the journal says `seq` belongs to.
    pub fn of(log: &DiskLog, pattern: WorkloadPattern, seq: u64) -> Self {
        let g = log.geometry;
        let branch = log.branch_of(seq).unwrap_or(log.stream);
        let block = choose_block(pattern, log.stream, branch, seq, g.blocks);
        let mut data = vec![0u8; g.block_size as usize];
        write_record(&mut data, log.stream, block, seq, branch);
        Self { volume: g.volume, block, seq, offset: block * u64::from(g.block_size), data }
    }
}

/// How long pausing a guest may wait for its disk writes in flight before the operation that
/// paused it (stop-and-copy, a recovery snapshot, a restore) gives up.
pub const DISK_DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits until none of `guests` (paused or stopped, so they issue nothing new) has a disk write in
/// flight: what a hypervisor's drain of block I/O does before a guest's state is captured or its
/// disks change hands. An error names the guests still waiting after `limit`.
pub async fn drain(
    guests: Vec<(String, std::sync::Arc<dyn super::guest::GuestDriver>)>,
    limit: std::time::Duration,
) -> Result<(), String> {
    let busy: Vec<_> = guests.into_iter().filter(|(_, g)| g.disk_writes_in_flight() > 0).collect();
    if busy.is_empty() {
        return Ok(()); // the common case costs no thread hop
    }
    let stuck = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + limit;
        busy.into_iter()
            .filter(|(_, g)| !g.wait_disk_idle(deadline.saturating_duration_since(std::time::Instant::now())))
            .map(|(name, _)| name)
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| format!("disk drain thread failed: {e}"))?;
    if stuck.is_empty() {
        Ok(())
    } else {
        Err(format!("disk writes of {} did not finish within {} ms", stuck.join(", "), limit.as_millis()))
    }
}

/// The block write `seq` of `stream` on `branch` goes to, among `blocks` (a pure function of its
/// inputs; the pattern is the guest's memory pattern applied to the disk's region). Two branches
/// send the same seq to different blocks, so a new timeline does not simply overwrite what an
/// abandoned one left behind.
pub fn choose_block(pattern: WorkloadPattern, stream: u64, branch: u64, seq: u64, blocks: u64) -> u64 {
    let blocks = blocks.max(1);
    let key = stream ^ branch.rotate_left(17);
    match pattern {
        WorkloadPattern::Uniform => mix(key, seq) % blocks,
        WorkloadPattern::HotSet { hot_pages } => mix(key, seq) % hot_pages.clamp(1, blocks),
        WorkloadPattern::Sequential => seq.wrapping_sub(1).wrapping_add(mix(key, 0)) % blocks,
    }
}

fn record_checksum(buf: &[u8]) -> [u8; 8] {
    let mut h = blake3::Hasher::new();
    h.update(&buf[..32]);
    h.update(&buf[40..]);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    out
}

fn filler_state(stream: u64, block: u64, seq: u64, branch: u64) -> u64 {
    mix(stream ^ block.rotate_left(29) ^ branch.rotate_left(47) ^ 0x4449_534B, seq)
}

fn write_record(buf: &mut [u8], stream: u64, block: u64, seq: u64, branch: u64) {
    buf[0..8].copy_from_slice(&DISK_MAGIC);
    buf[8..16].copy_from_slice(&stream.to_le_bytes());
    buf[16..24].copy_from_slice(&block.to_le_bytes());
    buf[24..32].copy_from_slice(&seq.to_le_bytes());
    buf[40..48].copy_from_slice(&branch.to_le_bytes());
    fill(&mut buf[RECORD_LEN..], filler_state(stream, block, seq, branch));
    let sum = record_checksum(buf);
    buf[32..40].copy_from_slice(&sum);
}

/// What a disk check found wrong. Volumes are catalog ids, blocks are indexes in the volume.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskCheckError {
    #[error("disk vol-{volume} block {block} is torn: {reason}")]
    Torn { volume: u64, block: u64, reason: String },
    #[error("disk vol-{volume} block {block} holds write {seq}, which belongs in block {belongs}")]
    Foreign { volume: u64, block: u64, seq: u64, belongs: u64 },
    #[error(
        "disk vol-{volume} block {block} holds write {seq}, but the guest only issued up to write {issued} \
         (the disk is ahead of the guest)"
    )]
    Future { volume: u64, block: u64, seq: u64, issued: u64 },
    #[error(
        "disk vol-{volume} block {block} should hold acknowledged write {expected} or a later one, \
         but holds {found} (0 = none): an acknowledged write was lost or rolled back"
    )]
    Lost { volume: u64, block: u64, expected: u64, found: u64 },
    #[error(
        "disk vol-{volume} block {block} holds write {seq} of a timeline the guest abandoned (it was restored \
         from a snapshot and the disk was not rolled back with it)"
    )]
    Forked { volume: u64, block: u64, seq: u64 },
    #[error("disk vol-{volume} changed while it was checked ({why})")]
    Changed { volume: u64, why: String },
}

impl DiskCheckError {
    /// Whether the check itself was disturbed (ask again) rather than the data being wrong.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Changed { .. })
    }
}

/// What a successful [`check_disk`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskCheck {
    pub volume: u64,
    /// Blocks holding a write of this stream.
    pub blocks_written: u64,
    /// The journal's `acked` when the check began (every one of them verified).
    pub acked: u64,
    /// The journal's `issued` when the check ended (nothing later found).
    pub issued: u64,
}

/// Checks the disk region `data` (`blocks * block_size` bytes, read after the journal said
/// `before` and before it said `after`) against the guest's journal; see the module docs.
pub fn check_disk(
    pattern: WorkloadPattern,
    before: &DiskLog,
    after: &DiskLog,
    data: &[u8],
) -> Result<DiskCheck, DiskCheckError> {
    let g = before.geometry;
    let volume = g.volume;
    if after.geometry != g || after.stream != before.stream {
        return Err(DiskCheckError::Changed { volume, why: "the disk was replaced".into() });
    }
    if after.branches != before.branches {
        return Err(DiskCheckError::Changed { volume, why: "the guest was restored".into() });
    }
    if after.acked < before.acked {
        return Err(DiskCheckError::Changed { volume, why: "the journal went back (the guest was replaced)".into() });
    }
    let bs = g.block_size as usize;
    if data.len() as u64 != g.blocks * bs as u64 {
        return Err(DiskCheckError::Changed { volume, why: format!("read {} bytes", data.len()) });
    }
    // The last acknowledged write each block must hold (or be past).
    let mut expected = vec![0u64; g.blocks as usize];
    for branch in 0..before.branches.len() {
        let Branch { start, nonce } = before.branches[branch];
        let end = before.branches.get(branch + 1).map_or(before.acked, |next| (next.start - 1).min(before.acked));
        for seq in start..=end {
            expected[choose_block(pattern, before.stream, nonce, seq, g.blocks) as usize] = seq;
        }
    }
    let mut check = DiskCheck { volume, blocks_written: 0, acked: before.acked, issued: after.issued };
    for (block, buf) in data.chunks_exact(bs).enumerate() {
        let block = block as u64;
        let (found, branch) = stream_seq(buf, before.stream, block, volume)?;
        if found > 0 {
            check.blocks_written += 1;
            if before.branch_of(found).is_some_and(|b| b != branch) {
                return Err(DiskCheckError::Forked { volume, block, seq: found });
            }
            let belongs = choose_block(pattern, before.stream, branch, found, g.blocks);
            if belongs != block {
                return Err(DiskCheckError::Foreign { volume, block, seq: found, belongs });
            }
            if found > after.issued {
                return Err(DiskCheckError::Future { volume, block, seq: found, issued: after.issued });
            }
        }
        let want = expected[block as usize];
        if found < want {
            return Err(DiskCheckError::Lost { volume, block, expected: want, found });
        }
    }
    Ok(check)
}

/// The seq and branch of `stream`'s record in `buf`; seq 0 if the block holds no record of this
/// stream.
fn stream_seq(buf: &[u8], stream: u64, block: u64, volume: u64) -> Result<(u64, u64), DiskCheckError> {
    if buf[0..8] != DISK_MAGIC || le_u64(&buf[8..16]) != stream {
        return Ok((0, 0));
    }
    let torn = |reason: &str| DiskCheckError::Torn { volume, block, reason: reason.to_string() };
    if buf[32..40] != record_checksum(buf) {
        return Err(torn("record checksum mismatch"));
    }
    let recorded_block = le_u64(&buf[16..24]);
    let seq = le_u64(&buf[24..32]);
    if seq == 0 {
        return Err(torn("record has seq 0"));
    }
    let branch = le_u64(&buf[40..48]);
    if !filled_from(&buf[RECORD_LEN..], filler_state(stream, recorded_block, seq, branch)) {
        return Err(torn("filler does not match the record"));
    }
    if recorded_block != block {
        return Err(DiskCheckError::Foreign { volume, block, seq, belongs: recorded_block });
    }
    Ok((seq, branch))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u32 = 512;

    fn log(blocks: u64) -> DiskLog {
        DiskLog::new(DiskGeometry { volume: 3, block_size: BS, blocks }, 0xfeed)
    }

    /// Apply writes `seqs` of `log`'s stream to `disk`, in order.
    fn apply(disk: &mut [u8], log: &DiskLog, pattern: WorkloadPattern, seqs: std::ops::RangeInclusive<u64>) {
        for seq in seqs {
            let w = DiskWrite::of(log, pattern, seq);
            disk[w.offset as usize..w.offset as usize + w.data.len()].copy_from_slice(&w.data);
        }
    }

    /// A disk region with writes `1..=upto` of `log`'s stream applied in order.
    fn disk_after(log: &DiskLog, pattern: WorkloadPattern, upto: u64) -> Vec<u8> {
        let mut disk = vec![0u8; (log.geometry.blocks * u64::from(BS)) as usize];
        apply(&mut disk, log, pattern, 1..=upto);
        disk
    }

    fn at(l: &DiskLog, acked: u64, issued: u64) -> DiskLog {
        DiskLog { acked, issued, ..l.clone() }
    }

    #[test]
    fn an_intact_disk_checks_out_for_every_pattern() {
        for pattern in [WorkloadPattern::Uniform, WorkloadPattern::HotSet { hot_pages: 5 }, WorkloadPattern::Sequential]
        {
            let l = log(16);
            let disk = disk_after(&l, pattern, 100);
            let c = check_disk(pattern, &at(&l, 100, 100), &at(&l, 100, 100), &disk).unwrap();
            assert_eq!((c.acked, c.issued), (100, 100));
            assert!(c.blocks_written >= 1 && c.blocks_written <= 16, "{pattern:?}: {c:?}");
            // The write in flight may or may not have landed.
            let disk_more = disk_after(&l, pattern, 101);
            check_disk(pattern, &at(&l, 100, 101), &at(&l, 100, 101), &disk_more).unwrap();
            check_disk(pattern, &at(&l, 100, 101), &at(&l, 100, 101), &disk).unwrap();
        }
    }

    #[test]
    fn a_running_guest_may_write_on_during_the_check() {
        let l = log(8);
        let p = WorkloadPattern::Uniform;
        let disk = disk_after(&l, p, 60);
        check_disk(p, &at(&l, 50, 50), &at(&l, 60, 61), &disk).unwrap();
        // But what was acknowledged before the check began must all be there.
        let short = disk_after(&l, p, 40);
        assert!(matches!(check_disk(p, &at(&l, 50, 50), &at(&l, 60, 61), &short), Err(DiskCheckError::Lost { .. })));
    }

    #[test]
    fn lost_future_torn_and_foreign_blocks_are_found() {
        let p = WorkloadPattern::Sequential;
        let l = log(4);
        let done = at(&l, 6, 6);
        // Lost: write 6 missing; its block (that of write 2, four blocks back) still holds write 2.
        let disk = disk_after(&l, p, 5);
        let block = DiskWrite::of(&l, p, 6).block;
        assert_eq!(
            check_disk(p, &done, &done, &disk),
            Err(DiskCheckError::Lost { volume: 3, block, expected: 6, found: 2 })
        );
        // Future: the disk holds write 7, which the guest never issued (not rolled back with it).
        let disk = disk_after(&l, p, 7);
        let block = DiskWrite::of(&l, p, 7).block;
        assert_eq!(
            check_disk(p, &done, &done, &disk),
            Err(DiskCheckError::Future { volume: 3, block, seq: 7, issued: 6 })
        );
        // Torn: one byte of block 0's filler flipped.
        let mut disk = disk_after(&l, p, 6);
        disk[100] ^= 1;
        assert!(matches!(check_disk(p, &done, &done, &disk), Err(DiskCheckError::Torn { block: 0, .. })));
        // Foreign: block 3's content copied into block 0.
        let mut disk = disk_after(&l, p, 6);
        let b3 = disk[3 * BS as usize..4 * BS as usize].to_vec();
        disk[..BS as usize].copy_from_slice(&b3);
        assert!(matches!(check_disk(p, &done, &done, &disk), Err(DiskCheckError::Foreign { block: 0, .. })));
        // Another stream's records count as never written: here, as lost writes.
        let other = DiskLog::new(l.geometry, 0xbeef);
        let disk = disk_after(&other, p, 6);
        assert!(matches!(check_disk(p, &done, &done, &disk), Err(DiskCheckError::Lost { found: 0, .. })));
        // A replaced disk or guest is a disturbed check, not bad data.
        let e = check_disk(p, &done, &at(&other, 6, 6), &disk_after(&l, p, 6)).unwrap_err();
        assert!(e.is_transient(), "{e}");
    }

    #[test]
    fn a_disk_not_rolled_back_with_a_restored_guest_is_caught() {
        let p = WorkloadPattern::Uniform;
        let l = log(64);
        // The recovery point: writes 1..=20 acknowledged, 21 in flight. The guest it was taken
        // from went on to write 40 before it was given up.
        let snap = at(&l, 20, 21);
        let mut restored = snap.clone();
        restored.fork(0xb2a);
        assert_eq!((restored.branch_of(21), restored.branch_of(22)), (Some(l.stream), Some(0xb2a)));
        // Rolled back, then written on by the restored guest (21 again, on its old branch): fine.
        let mut disk = disk_after(&l, p, 20);
        apply(&mut disk, &restored, p, 21..=30);
        let now = at(&restored, 30, 30);
        check_disk(p, &now, &now, &disk).unwrap();
        // Not rolled back: the abandoned timeline's writes give it away, also once the restored
        // guest has written as far as the abandoned one got (its writes land elsewhere).
        let mut disk = disk_after(&l, p, 40);
        apply(&mut disk, &restored, p, 21..=40);
        let now = at(&restored, 40, 40);
        assert!(matches!(check_disk(p, &now, &now, &disk), Err(DiskCheckError::Forked { .. })));
        // The journal keeps the last MAX_BRANCHES branch points, and a fork made before anything
        // new was issued replaces the branch it would shadow.
        let mut many = at(&l, 5, 5);
        for i in 1..=MAX_BRANCHES as u64 + 3 {
            many.fork(0x100 + i);
            many.issued += 1;
            many.acked += 1;
        }
        assert_eq!(many.branches.len(), MAX_BRANCHES);
        let mut twice = at(&l, 5, 5);
        twice.fork(0x1);
        twice.fork(0x2);
        assert_eq!(twice.branches, [Branch { start: 1, nonce: l.stream }, Branch { start: 6, nonce: 0x2 }]);
    }

    #[test]
    fn logs_round_trip_and_bad_logs_are_refused() {
        let l = at(&log(1024), 41, 42);
        let mut bytes = Vec::new();
        l.encode(&mut bytes);
        assert_eq!(DiskLog::decode(&bytes), Ok((l.clone(), bytes.len())));
        assert!(DiskLog::decode(&bytes[..bytes.len() - 1]).is_err());
        for (acked, issued) in [(5, 4), (5, 7)] {
            let mut b = Vec::new();
            at(&l, acked, issued).encode(&mut b);
            assert!(DiskLog::decode(&b).is_err(), "acked {acked} issued {issued}");
        }
        let mut b = Vec::new();
        DiskLog { geometry: DiskGeometry { volume: 1, block_size: 1000, blocks: 4 }, ..l.clone() }.encode(&mut b);
        assert!(DiskLog::decode(&b).is_err());
    }

    /// Found by the `disk_journal` fuzz target: a journal whose counters are at u64::MAX decoded,
    /// and the guest's next write (`acked + 1`) or a restore's fork (`issued + 1`) overflowed.
    #[test]
    fn logs_without_a_next_write_are_refused() {
        let l = log(1024);
        for (acked, issued) in [(u64::MAX, u64::MAX), (u64::MAX - 1, u64::MAX), (MAX_SEQ, MAX_SEQ + 1)] {
            let mut b = Vec::new();
            at(&l, acked, issued).encode(&mut b);
            assert!(DiskLog::decode(&b).is_err(), "acked {acked} issued {issued}");
        }
        let mut b = Vec::new();
        at(&l, MAX_SEQ, MAX_SEQ).encode(&mut b);
        let (mut last, _) = DiskLog::decode(&b).unwrap();
        last.fork(0x3);
        assert_eq!(last.branches.last(), Some(&Branch { start: MAX_SEQ + 1, nonce: 0x3 }));
    }

    #[test]
    fn geometry_follows_the_volume() {
        assert_eq!(
            DiskGeometry::of_volume(7, 64 << 20, 4096),
            Some(DiskGeometry { volume: 7, block_size: 4096, blocks: DISK_REGION_BLOCKS })
        );
        assert_eq!(DiskGeometry::of_volume(7, 8192, 4096).map(|g| g.blocks), Some(2));
        assert_eq!(DiskGeometry::of_volume(7, 100, 4096), None);
        assert_eq!(DiskGeometry::of_volume(7, 1 << 20, 100), None);
    }
}
