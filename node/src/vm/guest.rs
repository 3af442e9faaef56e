//! The simulated guest and the driver trait every VM is reached through.
//!
//! This module owns [`GuestDriver`] — the interface controllers and the live-migration engine use to
//! run, pause, read, write and inspect a VM — and [`SimulatedGuest`], the guest model behind it on
//! hosts without a hypervisor. A simulated guest has `memory_pages` pages of 4 KiB with dirty-page
//! logging, a zero-page map, a fake vCPU state, and a workload thread that writes pages at a
//! configured rate. Every workload write stores a self-checking record (magic, page, global sequence
//! number, vCPU id, checksum, and filler derived from page and sequence), so [`GuestDriver::check_memory`]
//! can prove that no page is torn or foreign, nothing comes from the future, and the last write is present.
//!
//! # Memory digest
//!
//! [`GuestDriver::memory_digest`] of a simulated guest is a two-level hash:
//!
//! ```text
//! page_hash[p] = blake3(page p)                       (4096 bytes; all-zero pages: blake3 of 4096 zeroes)
//! digest       = blake3("HVNMEMD1" || memory_pages as u64 LE || PAGE_SIZE as u64 LE
//!                       || page_hash[0] || page_hash[1] || ... || page_hash[memory_pages - 1])
//! ```
//!
//! It changes iff memory changes (up to blake3 collisions) and any two guests with the same memory
//! agree on it. The guest keeps the `page_hash` table (32 bytes per page) and a "hash stale" bitmap;
//! every page write marks its page stale under the page's lock, and a digest rehashes only the stale
//! pages (zero pages from a precomputed hash, without reading them) before hashing the table. So a
//! digest costs roughly "pages written since the last digest" plus a pass over the table (8 MiB for
//! a 1 GiB guest). [`GuestDriver::write_page`] (a migration destination) hashes the page it writes
//! right away, while it is in cache, so a destination's digest finds nothing stale.
//!
//! A digest may run while the workload runs: a page's stale bit is cleared before the page is read
//! under its lock, so a write that lands after the page was rehashed leaves it stale for the next
//! digest; digests themselves are serialized.
//!
//! Must not: talk to the network or the catalog, or assume a Tokio runtime. Every method is
//! synchronous and short enough to call from async code: `pause`/`stop` wait for at most one
//! pacing batch of the workload thread (about a millisecond); `memory_digest` (after many writes)
//! and `check_memory` scan memory and belong on a blocking thread for large guests.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::disk::{DiskGeometry, DiskLog, DiskWrite, MAX_GUEST_DISKS};

/// Bytes in one guest page.
pub const PAGE_SIZE: usize = 4096;

/// First eight bytes of every page the workload wrote.
const PAGE_MAGIC: [u8; 8] = *b"HVNPAGE1";
/// Bytes of the record at the start of a written page; the filler follows.
/// Layout (little endian): magic 0..8, page 8..16, seq 16..24, vcpu 24..28, reserved 28..32 (zero),
/// checksum 32..40 (first 8 bytes of blake3 over bytes 0..32 and 40..PAGE_SIZE).
const RECORD_LEN: usize = 40;
/// Lock stripes over guest memory; page `p` is guarded by stripe `p % LOCK_STRIPES`.
const LOCK_STRIPES: usize = 1024;
/// How often the workload thread wakes up to write its next batch.
const PACING_INTERVAL: Duration = Duration::from_millis(1);
/// How long the achieved-rate window is.
const RATE_WINDOW: Duration = Duration::from_millis(100);

const VCPU_STATE_MAGIC: [u8; 4] = *b"HVCS";
/// Version 2 appends the disk journal (a count, then one [`DiskLog`] per disk); version 1 (no
/// disks) is still read.
const VCPU_STATE_VERSION: u16 = 2;
/// Fake registers per vCPU: rip, rsp, rax, rbx, rcx, rdx, rflags, cr3.
const REGS_PER_VCPU: usize = 8;
/// magic, version, flags, memory_pages, vcpus, seed, pattern tag, hot_pages, last_seq,
/// has_last_page, last_page, register-set count.
const VCPU_HEADER_LEN: usize = 4 + 2 + 2 + 8 + 4 + 8 + 1 + 8 + 8 + 1 + 8 + 4;
const VCPU_CHECKSUM_LEN: usize = 32;

/// Which pages the workload writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WorkloadPattern {
    /// Every page equally likely.
    Uniform,
    /// Only pages `0..hot_pages` (clamped to `1..=memory_pages`), equally likely.
    HotSet { hot_pages: u64 },
    /// Pages in order, wrapping around: write `seq` goes to page `(seq - 1) % memory_pages`.
    Sequential,
}

/// What a guest is: its size, vCPUs and workload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestSpec {
    pub memory_pages: u64,
    pub vcpus: u32,
    pub pattern: WorkloadPattern,
    /// page writes per second the workload aims at (0 = idle)
    pub dirty_pages_per_sec: u64,
    /// Disk writes per second the workload aims at, spread over its disks (0 = none); the host's
    /// block backend performs them (see [`super::disk`]).
    pub disk_writes_per_sec: u64,
    /// Seeds the workload's page and vCPU choices (together with the write's sequence number).
    pub seed: u64,
}

/// Lifecycle of a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RunState {
    Created,
    Running,
    Paused,
    Stopped,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum GuestError {
    #[error("cannot {op} a guest that is {from:?}")]
    BadState { from: RunState, op: &'static str },
    #[error("bad vCPU state: {0}")]
    BadVcpuState(String),
    #[error("page {page} is out of range (the guest has {pages} pages)")]
    OutOfRange { page: u64, pages: u64 },
    #[error("page buffer is {len} bytes, expected exactly 4096")]
    BadBuffer { len: usize },
    #[error("page {page} is torn: {reason}")]
    TornPage { page: u64, reason: String },
    #[error("page {page} holds the record of page {found}")]
    ForeignPage { page: u64, found: u64 },
    #[error("page {page} holds seq {seq}, later than the last write (seq {last_seq})")]
    FutureWrite { page: u64, seq: u64, last_seq: u64 },
    #[error("page {page} should hold the last write (seq {expected}) but holds seq {found} (0 = empty)")]
    LostWrite { page: u64, expected: u64, found: u64 },
    #[error("cannot start the workload thread: {0}")]
    Spawn(String),
}

/// Workload counters.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WorkloadStats {
    /// Workload writes performed on this guest object (not carried over by `load_vcpu_state`).
    pub writes: u64,
    /// Sequence number of the last workload write (carried over by `load_vcpu_state`).
    pub last_seq: u64,
    pub throttle_percent: u8,
    /// Writes per second over the last ~100 ms window while running; 0 when not running.
    pub achieved_pages_per_sec: f64,
}

// `achieved_pages_per_sec` is always finite (never NaN), so equality is total.
impl Eq for WorkloadStats {}

/// Result of a successful [`GuestDriver::check_memory`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryCheck {
    /// Non-zero pages, all of which hold a valid record.
    pub pages_written: u64,
    /// Highest seq found in memory.
    pub max_seq: u64,
    /// Seq of the last workload write (the guest's counter).
    pub last_seq: u64,
}

/// What controllers and migration use; a real hypervisor driver (QEMU over QMP) would implement it too.
pub trait GuestDriver: Send + Sync + 'static {
    fn spec(&self) -> GuestSpec;
    fn state(&self) -> RunState;
    /// Created|Stopped -> Running (the workload runs).
    fn start(&self) -> Result<(), GuestError>;
    /// Running -> Paused; no memory write happens after it returns.
    fn pause(&self) -> Result<(), GuestError>;
    /// Paused -> Running.
    fn resume(&self) -> Result<(), GuestError>;
    /// Any -> Stopped (the workload thread has ended when it returns).
    fn stop(&self) -> Result<(), GuestError>;
    /// From now on every page write marks the page dirty; all pages count as dirty once.
    fn start_dirty_log(&self);
    /// Pages dirtied since the last call, ascending; clears them.
    fn take_dirty(&self) -> Vec<u64>;
    /// Stops dirty logging and forgets pending dirty pages.
    fn stop_dirty_log(&self);
    /// Copies page `page` into `out` (exactly [`PAGE_SIZE`] bytes).
    fn read_page(&self, page: u64, out: &mut [u8]) -> Result<(), GuestError>;
    /// Overwrites page `page` with `data` (exactly [`PAGE_SIZE`] bytes); for a migration destination,
    /// so it is refused while the guest is running.
    fn write_page(&self, page: u64, data: &[u8]) -> Result<(), GuestError>;
    /// Whether the page is all zeroes (tracked, no scan).
    fn is_zero_page(&self, page: u64) -> Result<bool, GuestError>;
    /// Serialized vCPU/device state including the workload position.
    fn vcpu_state(&self) -> Vec<u8>;
    /// Loads a state from [`GuestDriver::vcpu_state`]; bad bytes -> `BadVcpuState`, nothing changed.
    fn load_vcpu_state(&self, state: &[u8]) -> Result<(), GuestError>;
    /// Digest of all guest memory: equal on two guests iff their memory is equal (see the module
    /// docs for the simulated guest's two-level definition). May be called while the guest runs.
    fn memory_digest(&self) -> [u8; 32];
    /// Auto-converge: hold the workload back this % of the time (clamped to 0..=99).
    fn set_throttle(&self, percent: u8);
    fn workload_stats(&self) -> WorkloadStats;
    /// Validates every written page and that the last write is present; see [`MemoryCheck`].
    fn check_memory(&self) -> Result<MemoryCheck, GuestError>;

    // Virtual disks. The host's block backend serves the guest's disk queue through these (see
    // `super::disk_backend`); a hypervisor doing its own disk I/O keeps the defaults.

    /// The disks the guest has now (from the catalog, any order). A disk it did not have starts a
    /// new write stream; a disk no longer listed is forgotten; a listed disk whose geometry
    /// changed starts over with a new stream.
    fn set_disks(&self, _disks: &[DiskGeometry]) {}
    /// The next disk write the guest wants performed now: only while running, only on a disk with
    /// no write outstanding (a failed write is issued again before any later one), round-robin
    /// over the disks. Its outcome must be reported with [`GuestDriver::complete_disk_write`].
    fn next_disk_write(&self) -> Option<DiskWrite> {
        None
    }
    /// The outcome of write `seq` to `volume`: acknowledged durable, or not (issued again later).
    fn complete_disk_write(&self, _volume: u64, _seq: u64, _acked: bool) {}
    /// Disk writes handed out and not completed.
    fn disk_writes_in_flight(&self) -> usize {
        0
    }
    /// Blocks until no disk write is in flight or `limit` passed; whether none is. For a blocking
    /// thread, after `pause`/`stop` (so no new write is issued meanwhile).
    fn wait_disk_idle(&self, _limit: Duration) -> bool {
        true
    }
    /// The disk journal, ordered by volume (see [`super::disk`]); part of [`GuestDriver::vcpu_state`].
    fn disk_journal(&self) -> Vec<DiskLog> {
        Vec::new()
    }
    /// The guest was restored from a saved state while the timeline that state came from may
    /// have gone on elsewhere: its next disk writes start a new branch, so the check tells the
    /// abandoned timeline's writes from its own.
    fn fork_disk_timeline(&self) {}
}

// ---------------------------------------------------------------------------------------------
// Memory and bitmaps

/// `pages * PAGE_SIZE` bytes, zeroed lazily by the allocator, guarded by striped reader/writer locks.
struct Memory {
    ptr: NonNull<u8>,
    len: usize,
    stripes: Box<[RwLock<()>]>,
}

// SAFETY: the bytes behind `ptr` are owned by `Memory` (a leaked `Box<[u8]>`) and every access to
// page `p` goes through `read`/`write`, which hold stripe `p % LOCK_STRIPES` shared or exclusive.
// Distinct pages never overlap, so no two threads ever hold a `&mut` and another reference to the
// same bytes.
unsafe impl Send for Memory {}
unsafe impl Sync for Memory {}

impl Memory {
    fn new(pages: u64) -> Self {
        let len = usize::try_from(pages)
            .ok()
            .and_then(|p| p.checked_mul(PAGE_SIZE))
            .unwrap_or_else(|| panic!("guest memory of {pages} pages does not fit in the address space"));
        // `vec![0; n]` uses the zeroing allocator: large guests are mapped lazily, not memset.
        let boxed: Box<[u8]> = vec![0u8; len].into_boxed_slice();
        let raw = Box::into_raw(boxed) as *mut u8;
        let ptr = NonNull::new(raw).unwrap_or(NonNull::dangling());
        let stripes = (0..LOCK_STRIPES).map(|_| RwLock::new(())).collect();
        Memory { ptr, len, stripes }
    }

    /// Runs `f` on page `page` (caller checked the range) under its stripe's shared lock.
    fn read<R>(&self, page: u64, f: impl FnOnce(&[u8]) -> R) -> R {
        let page = page as usize;
        debug_assert!((page + 1) * PAGE_SIZE <= self.len);
        let _guard = self.stripes[page % LOCK_STRIPES].read().unwrap_or_else(PoisonError::into_inner);
        // SAFETY: in bounds (checked by callers), and the stripe lock excludes writers of this page.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(page * PAGE_SIZE), PAGE_SIZE) };
        f(bytes)
    }

    /// Runs `f` on page `page` (caller checked the range) under its stripe's exclusive lock.
    fn write<R>(&self, page: u64, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let page = page as usize;
        debug_assert!((page + 1) * PAGE_SIZE <= self.len);
        let _guard = self.stripes[page % LOCK_STRIPES].write().unwrap_or_else(PoisonError::into_inner);
        // SAFETY: in bounds (checked by callers), and the exclusive stripe lock makes this the only
        // reference to this page's bytes.
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(page * PAGE_SIZE), PAGE_SIZE) };
        f(bytes)
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` came from `Box::into_raw` of a `Box<[u8]>` of length `len` in `new`.
        unsafe { drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len))) };
    }
}

/// One bit per page in atomic words.
struct Bitmap {
    words: Box<[AtomicU64]>,
    bits: u64,
}

impl Bitmap {
    fn new(bits: u64) -> Self {
        let words = bits.div_ceil(64) as usize;
        Bitmap { words: (0..words).map(|_| AtomicU64::new(0)).collect(), bits }
    }

    fn set(&self, i: u64) {
        self.words[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::AcqRel);
    }

    fn clear(&self, i: u64) {
        self.words[(i / 64) as usize].fetch_and(!(1 << (i % 64)), Ordering::AcqRel);
    }

    fn get(&self, i: u64) -> bool {
        self.words[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    fn set_all(&self) {
        for (w, word) in self.words.iter().enumerate() {
            let remaining = self.bits - w as u64 * 64;
            let mask = if remaining >= 64 { u64::MAX } else { (1u64 << remaining) - 1 };
            word.fetch_or(mask, Ordering::AcqRel);
        }
    }

    fn clear_all(&self) {
        for word in self.words.iter() {
            word.store(0, Ordering::Release);
        }
    }

    /// Set bits in ascending order, clearing them.
    fn take(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (w, word) in self.words.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                out.push(w as u64 * 64 + b);
                bits &= bits - 1;
            }
        }
        out
    }

    /// Set bits in ascending order.
    fn ones(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (w, word) in self.words.iter().enumerate() {
            let mut bits = word.load(Ordering::Acquire);
            while bits != 0 {
                out.push(w as u64 * 64 + bits.trailing_zeros() as u64);
                bits &= bits - 1;
            }
        }
        out
    }
}

/// Domain tag at the start of the digest's second level.
const DIGEST_TAG: &[u8; 8] = b"HVNMEMD1";

/// The first level of the memory digest: one blake3 hash per page, and which of them are stale.
struct PageHashes {
    /// `blake3(page p)` as four little-endian words. Stored only under page `p`'s stripe lock:
    /// exclusively by a write that hashes eagerly, or shared by a digest (which stores the hash of
    /// the bytes it read under that lock, the same value a concurrent reader would store).
    table: Box<[[AtomicU64; 4]]>,
    /// Pages whose entry may not match memory. Set under the page's exclusive lock by every write
    /// that does not hash eagerly; cleared by a digest before it reads the page.
    stale: Bitmap,
    /// blake3 of an all-zero page.
    zero: [u8; 32],
    /// Serializes digests: one digest must not hash the table while another has cleared a stale
    /// bit but not yet stored that page's new hash.
    digest: Mutex<()>,
}

impl PageHashes {
    fn new(pages: u64) -> Self {
        // Memory starts all zero, so every entry starts as the zero-page hash and nothing is stale.
        let zero = *blake3::hash(&[0u8; PAGE_SIZE]).as_bytes();
        let words = Self::words(&zero);
        let table = (0..pages).map(|_| words.map(AtomicU64::new)).collect();
        PageHashes { table, stale: Bitmap::new(pages), zero, digest: Mutex::new(()) }
    }

    fn words(hash: &[u8; 32]) -> [u64; 4] {
        std::array::from_fn(|i| le_u64(&hash[i * 8..]))
    }

    /// Caller holds page `page`'s stripe lock (shared or exclusive) and passes the page's bytes.
    fn store(&self, page: u64, buf: &[u8], nonzero: bool) {
        let hash = if nonzero { *blake3::hash(buf).as_bytes() } else { self.zero };
        for (slot, w) in self.table[page as usize].iter().zip(Self::words(&hash)) {
            slot.store(w, Ordering::Release);
        }
    }

    /// The second level over the current table (stale entries included as they are).
    fn combine(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(DIGEST_TAG);
        h.update(&(self.table.len() as u64).to_le_bytes());
        h.update(&(PAGE_SIZE as u64).to_le_bytes());
        let mut buf = Vec::with_capacity(2048 * 32);
        for chunk in self.table.chunks(2048) {
            buf.clear();
            for entry in chunk {
                for w in entry {
                    buf.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
                }
            }
            h.update(&buf);
        }
        *h.finalize().as_bytes()
    }
}

// ---------------------------------------------------------------------------------------------
// Workload records: counter-based choices (no RNG state to carry), self-checking pages

/// One step of the splitmix64 generator: the counter-based randomness of the workloads (memory
/// here, disks in [`super::disk`]).
pub(super) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A well-mixed 64-bit function of `a` and `b`.
pub(super) fn mix(a: u64, b: u64) -> u64 {
    let mut s = a ^ b.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    splitmix64(&mut s)
}

/// The page workload write number `seq` goes to (a pure function of spec and seq).
fn choose_page(spec: &GuestSpec, seq: u64) -> u64 {
    let pages = spec.memory_pages.max(1);
    match spec.pattern {
        WorkloadPattern::Uniform => mix(spec.seed, seq) % pages,
        WorkloadPattern::HotSet { hot_pages } => mix(spec.seed, seq) % hot_pages.clamp(1, pages),
        WorkloadPattern::Sequential => seq.wrapping_sub(1) % pages,
    }
}

/// The vCPU that performs workload write number `seq`.
fn choose_vcpu(spec: &GuestSpec, seq: u64) -> u32 {
    (mix(spec.seed ^ 0x5643_5055, seq) % u64::from(spec.vcpus.max(1))) as u32
}

fn filler_state(page: u64, seq: u64) -> u64 {
    mix(page ^ 0x4649_4C4C_4552, seq)
}

fn record_checksum(buf: &[u8]) -> [u8; 8] {
    let mut h = blake3::Hasher::new();
    h.update(&buf[..32]);
    h.update(&buf[RECORD_LEN..]);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    out
}

fn write_record(buf: &mut [u8], page: u64, seq: u64, vcpu: u32) {
    buf[0..8].copy_from_slice(&PAGE_MAGIC);
    buf[8..16].copy_from_slice(&page.to_le_bytes());
    buf[16..24].copy_from_slice(&seq.to_le_bytes());
    buf[24..28].copy_from_slice(&vcpu.to_le_bytes());
    buf[28..32].fill(0);
    fill(&mut buf[RECORD_LEN..], filler_state(page, seq));
    let sum = record_checksum(buf);
    buf[32..40].copy_from_slice(&sum);
}

/// Fill `buf` (a multiple of 8 bytes) with the splitmix64 sequence from `state`: the filler that
/// makes a workload record's whole page or block a function of its header.
pub(super) fn fill(buf: &mut [u8], mut state: u64) {
    for chunk in buf.chunks_exact_mut(8) {
        chunk.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
}

/// Whether `buf` holds exactly what [`fill`] writes from `state`.
pub(super) fn filled_from(buf: &[u8], mut state: u64) -> bool {
    buf.chunks_exact(8).all(|c| c == splitmix64(&mut state).to_le_bytes())
}

pub(super) fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Validates the record in a non-zero page; returns its seq.
fn verify_record(buf: &[u8], page: u64, vcpus: u32) -> Result<u64, GuestError> {
    let torn = |reason: &str| GuestError::TornPage { page, reason: reason.to_string() };
    if buf[0..8] != PAGE_MAGIC {
        return Err(torn("no workload record (bad magic)"));
    }
    if buf[32..40] != record_checksum(buf) {
        return Err(torn("record checksum mismatch"));
    }
    let found = le_u64(&buf[8..16]);
    let seq = le_u64(&buf[16..24]);
    let vcpu = u32::from_le_bytes([buf[24], buf[25], buf[26], buf[27]]);
    if !filled_from(&buf[RECORD_LEN..], filler_state(found, seq)) {
        return Err(torn("filler does not match the record's (page, seq)"));
    }
    if found != page {
        return Err(GuestError::ForeignPage { page, found });
    }
    if seq == 0 {
        return Err(torn("record has seq 0"));
    }
    if vcpu >= vcpus.max(1) || buf[28..32] != [0; 4] {
        return Err(torn("record has a bad vCPU id or reserved bytes"));
    }
    Ok(seq)
}

// ---------------------------------------------------------------------------------------------
// The guest

/// Workload position and fake registers: everything `vcpu_state` carries.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor {
    last_seq: u64,
    last_page: Option<u64>,
    regs: Vec<[u64; REGS_PER_VCPU]>,
}

impl Cursor {
    fn new(vcpus: usize) -> Self {
        // rip at the reset vector, rflags with the reserved bit and IF.
        Cursor { last_seq: 0, last_page: None, regs: vec![[0xfff0, 0, 0, 0, 0, 0, 0x202, 0]; vcpus] }
    }
}

struct Worker {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

struct Control {
    state: RunState,
    worker: Option<Worker>,
}

/// The guest's disk queue: its journal (ordered by volume) and the writes handed out.
#[derive(Default)]
struct DiskQueue {
    journal: Vec<DiskLog>,
    /// `(volume, seq)` of each write handed out and not completed.
    in_flight: Vec<(u64, u64)>,
    /// Index in `journal` the round-robin looks at first.
    next: usize,
}

/// A fresh, practically unique stream nonce for a disk of the guest seeded `seed` (never 0).
fn new_stream(seed: u64, volume: u64) -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = blake3::Hasher::new();
    h.update(b"haven disk stream");
    h.update(&seed.to_le_bytes());
    h.update(&volume.to_le_bytes());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    h.update(&now.as_nanos().to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    le_u64(&h.finalize().as_bytes()[..8]).max(1)
}

/// The guest model on hosts without a hypervisor. See the module docs.
pub struct SimulatedGuest {
    spec: GuestSpec,
    me: Weak<SimulatedGuest>,
    mem: Memory,
    dirty: Bitmap,
    nonzero: Bitmap,
    hashes: PageHashes,
    logging: AtomicBool,
    /// Held for a whole batch of workload writes, so seq order equals memory order.
    cursor: Mutex<Cursor>,
    /// Lifecycle; held across starting/joining the workload thread (which never takes it).
    ctl: Mutex<Control>,
    throttle: AtomicU8,
    writes: AtomicU64,
    achieved_bits: AtomicU64,
    /// The disk queue (lock order: `ctl`, then `cursor`, then `disks`).
    disks: Mutex<DiskQueue>,
    /// Signalled when the last disk write in flight completes.
    disk_idle: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SimulatedGuest {
    /// A new guest in state `Created` with all-zero memory. Panics only if `memory_pages * 4096`
    /// overflows the address space.
    pub fn new(spec: GuestSpec) -> Arc<Self> {
        Arc::new_cyclic(|me| SimulatedGuest {
            mem: Memory::new(spec.memory_pages),
            dirty: Bitmap::new(spec.memory_pages),
            nonzero: Bitmap::new(spec.memory_pages),
            hashes: PageHashes::new(spec.memory_pages),
            logging: AtomicBool::new(false),
            cursor: Mutex::new(Cursor::new(spec.vcpus.max(1) as usize)),
            ctl: Mutex::new(Control { state: RunState::Created, worker: None }),
            throttle: AtomicU8::new(0),
            writes: AtomicU64::new(0),
            achieved_bits: AtomicU64::new(0f64.to_bits()),
            disks: Mutex::new(DiskQueue::default()),
            disk_idle: Condvar::new(),
            me: me.clone(),
            spec,
        })
    }

    /// Perform n workload writes now, synchronously (in any state, serialized with the workload
    /// thread). Deterministic: write `seq` always goes to the same page with the same content.
    pub fn step(&self, n: u64) {
        self.write_batch(n);
    }

    fn write_batch(&self, n: u64) {
        if n == 0 || self.spec.memory_pages == 0 {
            return;
        }
        let mut cur = lock(&self.cursor);
        let n = n.min(super::disk::MAX_SEQ - cur.last_seq);
        for _ in 0..n {
            let seq = cur.last_seq + 1;
            let page = choose_page(&self.spec, seq);
            let vcpu = choose_vcpu(&self.spec, seq);
            self.store(page, false, |buf| {
                write_record(buf, page, seq, vcpu);
                true
            });
            cur.last_seq = seq;
            cur.last_page = Some(page);
            let regs = &mut cur.regs[vcpu as usize];
            regs[0] = 0xffff_ffff_8100_0000 + (seq & 0xffff) * 4; // rip
            regs[1] = 0xffff_c900_0000_0000 + (page % 4096) * 8; // rsp
            regs[2] = page; // rax
            regs[3] = seq; // rbx
            regs[4] = mix(self.spec.seed, seq); // rcx
            regs[5] = u64::from(vcpu); // rdx
            regs[7] = self.spec.seed & !0xfff; // cr3
        }
        self.writes.fetch_add(n, Ordering::Relaxed);
    }

    /// Writes a page under its lock; `f` returns whether the page is now non-zero. Before the
    /// lock is released, marks the page dirty (while logging) and either rehashes it (`hash_now`)
    /// or marks its hash stale.
    fn store(&self, page: u64, hash_now: bool, f: impl FnOnce(&mut [u8]) -> bool) {
        self.mem.write(page, |buf| {
            let nonzero = f(buf);
            if nonzero {
                self.nonzero.set(page);
            } else {
                self.nonzero.clear(page);
            }
            if hash_now {
                // Entry first, then the bit: a digest that sees the bit clear sees the new entry.
                self.hashes.store(page, buf, nonzero);
                self.hashes.stale.clear(page);
            } else {
                self.hashes.stale.set(page);
            }
            if self.logging.load(Ordering::SeqCst) {
                self.dirty.set(page);
            }
        });
    }

    /// Rehashes every stale page. Caller holds `hashes.digest`.
    fn refresh_hashes(&self) {
        for (w, word) in self.hashes.stale.words.iter().enumerate() {
            if word.load(Ordering::Acquire) == 0 {
                continue;
            }
            // Clear first, then read each page under its lock: a write after the read sets the
            // bit again, a write before it is in the bytes hashed.
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                self.mem.read(page, |buf| self.hashes.store(page, buf, self.nonzero.get(page)));
            }
        }
    }

    /// The digest computed from memory alone, ignoring the hash table (tests compare the two).
    #[cfg(test)]
    fn memory_digest_from_scratch(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(DIGEST_TAG);
        h.update(&self.spec.memory_pages.to_le_bytes());
        h.update(&(PAGE_SIZE as u64).to_le_bytes());
        for page in 0..self.spec.memory_pages {
            self.mem.read(page, |buf| {
                h.update(blake3::hash(buf).as_bytes());
            });
        }
        *h.finalize().as_bytes()
    }

    fn check_page(&self, page: u64) -> Result<(), GuestError> {
        if page >= self.spec.memory_pages {
            return Err(GuestError::OutOfRange { page, pages: self.spec.memory_pages });
        }
        Ok(())
    }

    fn spawn_worker(&self) -> Result<Worker, GuestError> {
        let stop = Arc::new(AtomicBool::new(false));
        let me = self.me.clone();
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("guest-workload".into())
            .spawn(move || run_workload(me, flag))
            .map_err(|e| GuestError::Spawn(e.to_string()))?;
        Ok(Worker { stop, handle })
    }

    /// Ends the workload thread and waits for it: no workload write happens after this returns.
    fn halt(&self, ctl: &mut Control) {
        if let Some(w) = ctl.worker.take() {
            w.stop.store(true, Ordering::SeqCst);
            // The thread never panics on its own; if it did, it is gone either way.
            let _ = w.handle.join();
        }
        self.achieved_bits.store(0f64.to_bits(), Ordering::Relaxed);
    }

    fn encode_vcpu_state(&self, cur: &Cursor, disks: &[DiskLog]) -> Vec<u8> {
        let mut out = Vec::with_capacity(VCPU_HEADER_LEN + cur.regs.len() * REGS_PER_VCPU * 8 + VCPU_CHECKSUM_LEN);
        out.extend_from_slice(&VCPU_STATE_MAGIC);
        out.extend_from_slice(&VCPU_STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.spec.memory_pages.to_le_bytes());
        out.extend_from_slice(&self.spec.vcpus.to_le_bytes());
        out.extend_from_slice(&self.spec.seed.to_le_bytes());
        let (tag, hot) = match self.spec.pattern {
            WorkloadPattern::Uniform => (0u8, 0u64),
            WorkloadPattern::HotSet { hot_pages } => (1, hot_pages),
            WorkloadPattern::Sequential => (2, 0),
        };
        out.push(tag);
        out.extend_from_slice(&hot.to_le_bytes());
        out.extend_from_slice(&cur.last_seq.to_le_bytes());
        out.push(u8::from(cur.last_page.is_some()));
        out.extend_from_slice(&cur.last_page.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&(cur.regs.len() as u32).to_le_bytes());
        for regs in &cur.regs {
            for r in regs {
                out.extend_from_slice(&r.to_le_bytes());
            }
        }
        out.extend_from_slice(&(disks.len() as u32).to_le_bytes());
        for log in disks {
            log.encode(&mut out);
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// The cursor and disk journal in `state` (version 1 carries no disks).
    fn decode_vcpu_state(&self, state: &[u8]) -> Result<(Cursor, Vec<DiskLog>), GuestError> {
        let bad = |m: String| GuestError::BadVcpuState(m);
        let nregs = self.spec.vcpus.max(1) as usize;
        let least = VCPU_HEADER_LEN + nregs * REGS_PER_VCPU * 8 + VCPU_CHECKSUM_LEN;
        if state.len() < least {
            return Err(bad(format!("{} bytes, expected at least {least} for this guest", state.len())));
        }
        let (body, sum) = state.split_at(state.len() - VCPU_CHECKSUM_LEN);
        if blake3::hash(body).as_bytes() != sum {
            return Err(bad("checksum mismatch".into()));
        }
        let mut r = Reader { buf: body, pos: 0 };
        if r.take(4)? != VCPU_STATE_MAGIC {
            return Err(bad("bad magic".into()));
        }
        let version = r.u16()?;
        if version != VCPU_STATE_VERSION && version != 1 {
            return Err(bad(format!("unsupported version {version}")));
        }
        let _flags = r.u16()?;
        let memory_pages = r.u64()?;
        let vcpus = r.u32()?;
        let seed = r.u64()?;
        let tag = r.u8()?;
        let hot = r.u64()?;
        let pattern = match tag {
            0 => WorkloadPattern::Uniform,
            1 => WorkloadPattern::HotSet { hot_pages: hot },
            2 => WorkloadPattern::Sequential,
            t => return Err(bad(format!("unknown workload pattern {t}"))),
        };
        if memory_pages != self.spec.memory_pages
            || vcpus != self.spec.vcpus
            || seed != self.spec.seed
            || pattern != self.spec.pattern
        {
            return Err(bad(format!(
                "state is for a guest with {memory_pages} pages, {vcpus} vCPUs, seed {seed}, {pattern:?}; \
                 this guest has {} pages, {} vCPUs, seed {}, {:?}",
                self.spec.memory_pages, self.spec.vcpus, self.spec.seed, self.spec.pattern
            )));
        }
        let last_seq = r.u64()?;
        let has_last = r.u8()?;
        let last_page_raw = r.u64()?;
        let last_page = match has_last {
            0 if last_seq == 0 && last_page_raw == 0 => None,
            1 if last_seq > 0 && last_page_raw < memory_pages => Some(last_page_raw),
            _ => return Err(bad("inconsistent last write".into())),
        };
        // The workload's next write is `last_seq + 1`: it must exist (the workload stops at the
        // limit, so every state it reaches loads again).
        if last_seq > super::disk::MAX_SEQ {
            return Err(bad(format!("last write {last_seq} is above the limit {}", super::disk::MAX_SEQ)));
        }
        if r.u32()? as usize != nregs {
            return Err(bad("wrong number of register sets".into()));
        }
        let mut regs = vec![[0u64; REGS_PER_VCPU]; nregs];
        for set in regs.iter_mut() {
            for reg in set.iter_mut() {
                *reg = r.u64()?;
            }
        }
        let mut disks: Vec<DiskLog> = Vec::new();
        if version >= 2 {
            let count = r.u32()? as usize;
            if count > MAX_GUEST_DISKS {
                return Err(bad(format!("{count} disks (at most {MAX_GUEST_DISKS})")));
            }
            for _ in 0..count {
                let (log, used) = DiskLog::decode(&body[r.pos..]).map_err(bad)?;
                r.take(used)?;
                if disks.last().is_some_and(|prev| prev.geometry.volume >= log.geometry.volume) {
                    return Err(bad("disks out of order or repeated".into()));
                }
                disks.push(log);
            }
        }
        if r.pos != body.len() {
            return Err(bad(format!("{} bytes left over", body.len() - r.pos)));
        }
        Ok((Cursor { last_seq, last_page, regs }, disks))
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], GuestError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        let end = end.ok_or_else(|| GuestError::BadVcpuState("truncated".into()))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, GuestError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, GuestError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, GuestError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, GuestError> {
        Ok(le_u64(self.take(8)?))
    }
}

/// The workload thread: every pacing interval, earn credit at the target rate scaled by
/// `(100 - throttle)%` (the guest is held back `throttle%` of the time) and write that many pages.
/// Exits when its stop flag is set or the guest is gone.
fn run_workload(me: Weak<SimulatedGuest>, stop: Arc<AtomicBool>) {
    let mut last = Instant::now();
    let mut credit = 0f64;
    let mut window_start = last;
    let mut window_writes = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let Some(guest) = me.upgrade() else { break };
        let now = Instant::now();
        let rate = guest.spec.dirty_pages_per_sec as f64;
        let throttle = guest.throttle.load(Ordering::Relaxed).min(99);
        credit += rate * (now - last).as_secs_f64() * f64::from(100 - throttle) / 100.0;
        // Catch up after a late wake-up, but never burst more than ~20 ms of writes.
        credit = credit.min(rate * 0.02 + 1.0);
        last = now;
        let n = credit.floor() as u64;
        credit -= n as f64;
        guest.write_batch(n);
        window_writes += n;
        let elapsed = now - window_start;
        if elapsed >= RATE_WINDOW {
            let achieved = window_writes as f64 / elapsed.as_secs_f64();
            guest.achieved_bits.store(achieved.to_bits(), Ordering::Relaxed);
            window_start = now;
            window_writes = 0;
        }
        drop(guest);
        std::thread::sleep(PACING_INTERVAL);
    }
}

impl Drop for SimulatedGuest {
    fn drop(&mut self) {
        // Tell a still-running workload thread to end; it may be the thread dropping us, so no join.
        let ctl = self.ctl.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = ctl.worker.take() {
            w.stop.store(true, Ordering::SeqCst);
        }
    }
}

impl GuestDriver for SimulatedGuest {
    fn spec(&self) -> GuestSpec {
        self.spec.clone()
    }

    fn state(&self) -> RunState {
        lock(&self.ctl).state
    }

    fn start(&self) -> Result<(), GuestError> {
        let mut ctl = lock(&self.ctl);
        match ctl.state {
            RunState::Created | RunState::Stopped => {
                ctl.worker = Some(self.spawn_worker()?);
                ctl.state = RunState::Running;
                Ok(())
            }
            from => Err(GuestError::BadState { from, op: "start" }),
        }
    }

    fn pause(&self) -> Result<(), GuestError> {
        let mut ctl = lock(&self.ctl);
        match ctl.state {
            RunState::Running => {
                self.halt(&mut ctl);
                ctl.state = RunState::Paused;
                Ok(())
            }
            from => Err(GuestError::BadState { from, op: "pause" }),
        }
    }

    fn resume(&self) -> Result<(), GuestError> {
        let mut ctl = lock(&self.ctl);
        match ctl.state {
            RunState::Paused => {
                ctl.worker = Some(self.spawn_worker()?);
                ctl.state = RunState::Running;
                Ok(())
            }
            from => Err(GuestError::BadState { from, op: "resume" }),
        }
    }

    fn stop(&self) -> Result<(), GuestError> {
        let mut ctl = lock(&self.ctl);
        self.halt(&mut ctl);
        ctl.state = RunState::Stopped;
        Ok(())
    }

    fn start_dirty_log(&self) {
        // Logging on first, then every page dirty: a write racing with this either saw logging on
        // or finished (under its page lock) before any later read of the page.
        self.logging.store(true, Ordering::SeqCst);
        self.dirty.set_all();
    }

    fn take_dirty(&self) -> Vec<u64> {
        self.dirty.take()
    }

    fn stop_dirty_log(&self) {
        self.logging.store(false, Ordering::SeqCst);
        self.dirty.clear_all();
    }

    fn read_page(&self, page: u64, out: &mut [u8]) -> Result<(), GuestError> {
        self.check_page(page)?;
        if out.len() != PAGE_SIZE {
            return Err(GuestError::BadBuffer { len: out.len() });
        }
        self.mem.read(page, |buf| out.copy_from_slice(buf));
        Ok(())
    }

    fn write_page(&self, page: u64, data: &[u8]) -> Result<(), GuestError> {
        self.check_page(page)?;
        if data.len() != PAGE_SIZE {
            return Err(GuestError::BadBuffer { len: data.len() });
        }
        // Hold the lifecycle lock so the guest cannot start underneath the write.
        let ctl = lock(&self.ctl);
        if ctl.state == RunState::Running {
            return Err(GuestError::BadState { from: ctl.state, op: "write_page" });
        }
        let nonzero = data.iter().any(|b| *b != 0);
        // Hash now, while the page is in cache: a destination's digest then finds nothing stale.
        self.store(page, true, |buf| {
            buf.copy_from_slice(data);
            nonzero
        });
        Ok(())
    }

    fn is_zero_page(&self, page: u64) -> Result<bool, GuestError> {
        self.check_page(page)?;
        Ok(!self.nonzero.get(page))
    }

    fn vcpu_state(&self) -> Vec<u8> {
        let cur = lock(&self.cursor);
        let disks = lock(&self.disks);
        self.encode_vcpu_state(&cur, &disks.journal)
    }

    fn load_vcpu_state(&self, state: &[u8]) -> Result<(), GuestError> {
        let ctl = lock(&self.ctl);
        if ctl.state == RunState::Running {
            return Err(GuestError::BadState { from: ctl.state, op: "load_vcpu_state" });
        }
        let (cursor, journal) = self.decode_vcpu_state(state)?;
        *lock(&self.cursor) = cursor;
        let mut disks = lock(&self.disks);
        disks.journal = journal;
        disks.next = 0;
        Ok(())
    }

    fn memory_digest(&self) -> [u8; 32] {
        let _serial = lock(&self.hashes.digest);
        self.refresh_hashes();
        self.hashes.combine()
    }

    fn set_throttle(&self, percent: u8) {
        self.throttle.store(percent.min(99), Ordering::Relaxed);
    }

    fn workload_stats(&self) -> WorkloadStats {
        WorkloadStats {
            writes: self.writes.load(Ordering::Relaxed),
            last_seq: lock(&self.cursor).last_seq,
            throttle_percent: self.throttle.load(Ordering::Relaxed),
            achieved_pages_per_sec: f64::from_bits(self.achieved_bits.load(Ordering::Relaxed)),
        }
    }

    /// Holds the workload (the cursor lock) for the whole scan, so a running guest is checked at
    /// one point in its write sequence; checks only pages the zero map marks non-zero.
    fn check_memory(&self) -> Result<MemoryCheck, GuestError> {
        let cur = lock(&self.cursor);
        let mut check = MemoryCheck { pages_written: 0, max_seq: 0, last_seq: cur.last_seq };
        for page in self.nonzero.ones() {
            let seq = self.mem.read(page, |buf| verify_record(buf, page, self.spec.vcpus))?;
            if seq > cur.last_seq {
                return Err(GuestError::FutureWrite { page, seq, last_seq: cur.last_seq });
            }
            check.pages_written += 1;
            check.max_seq = check.max_seq.max(seq);
        }
        if let Some(page) = cur.last_page {
            let found = if self.nonzero.get(page) { self.mem.read(page, |buf| le_u64(&buf[16..24])) } else { 0 };
            if found != cur.last_seq {
                return Err(GuestError::LostWrite { page, expected: cur.last_seq, found });
            }
        }
        Ok(check)
    }

    fn set_disks(&self, disks: &[DiskGeometry]) {
        let mut wanted: Vec<DiskGeometry> = disks.to_vec();
        wanted.sort_by_key(|g| g.volume);
        wanted.dedup_by_key(|g| g.volume);
        wanted.truncate(MAX_GUEST_DISKS);
        let mut q = lock(&self.disks);
        if q.journal.iter().map(|l| l.geometry).eq(wanted.iter().copied()) {
            return;
        }
        let old = std::mem::take(&mut q.journal);
        q.journal = wanted
            .into_iter()
            .map(|g| {
                old.iter()
                    .find(|l| l.geometry == g)
                    .cloned()
                    .unwrap_or_else(|| DiskLog::new(g, new_stream(self.spec.seed, g.volume)))
            })
            .collect();
        q.next = 0;
    }

    fn next_disk_write(&self) -> Option<DiskWrite> {
        // Under the lifecycle lock: once `pause` or `stop` returned, nothing new is issued.
        let ctl = lock(&self.ctl);
        if ctl.state != RunState::Running {
            return None;
        }
        let mut q = lock(&self.disks);
        let n = q.journal.len();
        let (log, seq) = (0..n).find_map(|i| {
            let idx = (q.next + i) % n;
            let log = q.journal[idx].clone();
            let volume = log.geometry.volume;
            if q.in_flight.iter().any(|(v, _)| *v == volume) {
                return None;
            }
            // A failed write goes again, before anything later.
            let seq = if log.issued > log.acked { log.issued } else { log.acked + 1 };
            if seq > super::disk::MAX_SEQ {
                return None; // this disk's stream is used up
            }
            q.journal[idx].issued = seq;
            q.in_flight.push((volume, seq));
            q.next = (idx + 1) % n;
            Some((log, seq))
        })?;
        drop(q);
        drop(ctl);
        Some(DiskWrite::of(&log, self.spec.pattern, seq))
    }

    fn complete_disk_write(&self, volume: u64, seq: u64, acked: bool) {
        let mut q = lock(&self.disks);
        let before = q.in_flight.len();
        q.in_flight.retain(|w| *w != (volume, seq));
        if q.in_flight.len() == before {
            return; // not handed out by this guest's journal (it was replaced meanwhile)
        }
        if acked {
            if let Some(log) = q.journal.iter_mut().find(|l| l.geometry.volume == volume && l.issued == seq) {
                debug_assert_eq!(log.acked + 1, seq, "one write per disk is outstanding");
                log.acked = seq;
            }
        }
        if q.in_flight.is_empty() {
            self.disk_idle.notify_all();
        }
    }

    fn disk_writes_in_flight(&self) -> usize {
        lock(&self.disks).in_flight.len()
    }

    fn wait_disk_idle(&self, limit: Duration) -> bool {
        let q = lock(&self.disks);
        let (q, _) = self
            .disk_idle
            .wait_timeout_while(q, limit, |q| !q.in_flight.is_empty())
            .unwrap_or_else(PoisonError::into_inner);
        q.in_flight.is_empty()
    }

    fn disk_journal(&self) -> Vec<DiskLog> {
        lock(&self.disks).journal.clone()
    }

    fn fork_disk_timeline(&self) {
        let mut q = lock(&self.disks);
        for log in q.journal.iter_mut() {
            log.fork(new_stream(self.spec.seed, log.geometry.volume));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn spec(pages: u64, pattern: WorkloadPattern, rate: u64) -> GuestSpec {
        GuestSpec {
            memory_pages: pages,
            vcpus: 2,
            pattern,
            dirty_pages_per_sec: rate,
            disk_writes_per_sec: 0,
            seed: 42,
        }
    }

    fn page_buf() -> Vec<u8> {
        vec![0u8; PAGE_SIZE]
    }

    #[test]
    fn lifecycle_transitions() {
        let g = SimulatedGuest::new(spec(64, WorkloadPattern::Uniform, 0));
        assert_eq!(g.state(), RunState::Created);
        assert_eq!(g.pause(), Err(GuestError::BadState { from: RunState::Created, op: "pause" }));
        assert_eq!(g.resume(), Err(GuestError::BadState { from: RunState::Created, op: "resume" }));
        g.start().unwrap();
        assert_eq!(g.state(), RunState::Running);
        assert_eq!(g.start(), Err(GuestError::BadState { from: RunState::Running, op: "start" }));
        assert_eq!(g.resume(), Err(GuestError::BadState { from: RunState::Running, op: "resume" }));
        g.pause().unwrap();
        assert_eq!(g.state(), RunState::Paused);
        assert_eq!(g.pause(), Err(GuestError::BadState { from: RunState::Paused, op: "pause" }));
        assert_eq!(g.start(), Err(GuestError::BadState { from: RunState::Paused, op: "start" }));
        g.resume().unwrap();
        assert_eq!(g.state(), RunState::Running);
        g.stop().unwrap();
        assert_eq!(g.state(), RunState::Stopped);
        assert_eq!(g.pause(), Err(GuestError::BadState { from: RunState::Stopped, op: "pause" }));
        assert_eq!(g.resume(), Err(GuestError::BadState { from: RunState::Stopped, op: "resume" }));
        g.stop().unwrap();
        g.start().unwrap();
        assert_eq!(g.state(), RunState::Running);
        g.stop().unwrap();
    }

    #[test]
    fn pause_stops_writes() {
        let g = SimulatedGuest::new(spec(128, WorkloadPattern::Uniform, 5000));
        g.start().unwrap();
        std::thread::sleep(Duration::from_millis(40));
        g.pause().unwrap();
        let (s1, d1) = (g.workload_stats(), g.memory_digest());
        assert!(s1.writes > 0, "the workload wrote nothing in 40 ms");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(g.workload_stats(), s1);
        assert_eq!(g.memory_digest(), d1);
        let check = g.check_memory().unwrap();
        assert_eq!(check.last_seq, s1.last_seq);
        assert_eq!(check.max_seq, s1.last_seq);
        g.resume().unwrap();
        g.stop().unwrap();
        assert!(g.check_memory().is_ok());
    }

    #[test]
    fn dirty_log_reports_exactly_the_pages_written() {
        let g = SimulatedGuest::new(spec(256, WorkloadPattern::Uniform, 0));
        g.step(10);
        assert!(g.take_dirty().is_empty(), "nothing is logged before start_dirty_log");
        g.start_dirty_log();
        assert_eq!(g.take_dirty(), (0..256).collect::<Vec<_>>());
        assert!(g.take_dirty().is_empty());
        g.step(50);
        let expected: Vec<u64> =
            (11..=60).map(|seq| choose_page(&g.spec, seq)).collect::<BTreeSet<_>>().into_iter().collect();
        assert_eq!(g.take_dirty(), expected);
        assert!(g.take_dirty().is_empty());
        // write_page marks too.
        g.write_page(7, &page_buf()).unwrap();
        assert_eq!(g.take_dirty(), vec![7]);
        g.stop_dirty_log();
        g.step(5);
        assert!(g.take_dirty().is_empty());
    }

    #[test]
    fn patterns_choose_pages_as_documented() {
        let s = spec(100, WorkloadPattern::HotSet { hot_pages: 8 }, 0);
        assert!((1..1000).all(|seq| choose_page(&s, seq) < 8));
        let s = spec(100, WorkloadPattern::Sequential, 0);
        assert_eq!((1..=3).map(|seq| choose_page(&s, seq)).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(choose_page(&s, 101), 0);
        let s = spec(100, WorkloadPattern::Uniform, 0);
        let distinct: BTreeSet<u64> = (1..1000).map(|seq| choose_page(&s, seq)).collect();
        assert!(distinct.len() > 90);
    }

    #[test]
    fn copy_to_second_guest_continues_the_workload() {
        for pattern in
            [WorkloadPattern::Uniform, WorkloadPattern::HotSet { hot_pages: 16 }, WorkloadPattern::Sequential]
        {
            let s = spec(512, pattern, 0);
            let src = SimulatedGuest::new(s.clone());
            src.step(300);
            let dst = SimulatedGuest::new(src.spec());
            let mut buf = page_buf();
            for page in 0..s.memory_pages {
                if !src.is_zero_page(page).unwrap() {
                    src.read_page(page, &mut buf).unwrap();
                    dst.write_page(page, &buf).unwrap();
                }
            }
            dst.load_vcpu_state(&src.vcpu_state()).unwrap();
            assert_eq!(dst.memory_digest(), src.memory_digest());
            assert_eq!(dst.vcpu_state(), src.vcpu_state());
            let check = dst.check_memory().unwrap();
            assert_eq!(check.last_seq, 300);
            assert_eq!(check.max_seq, 300);
            assert_eq!(check, src.check_memory().unwrap());

            dst.step(1);
            assert_eq!(dst.workload_stats().last_seq, 301);
            let page = choose_page(&s, 301);
            dst.read_page(page, &mut buf).unwrap();
            assert_eq!(le_u64(&buf[16..24]), 301);
            assert_eq!(dst.check_memory().unwrap().last_seq, 301);
            // Both hosts continue identically.
            src.step(1);
            assert_eq!(dst.memory_digest(), src.memory_digest());
            assert_eq!(dst.vcpu_state(), src.vcpu_state());
        }
    }

    #[test]
    fn running_destination_continues_and_checks() {
        let s = spec(128, WorkloadPattern::Uniform, 2000);
        let src = SimulatedGuest::new(s);
        src.start().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        src.pause().unwrap();
        let dst = SimulatedGuest::new(src.spec());
        let mut buf = page_buf();
        for page in 0..128 {
            src.read_page(page, &mut buf).unwrap();
            dst.write_page(page, &buf).unwrap();
        }
        dst.load_vcpu_state(&src.vcpu_state()).unwrap();
        let last = src.workload_stats().last_seq;
        dst.start().unwrap();
        assert_eq!(dst.write_page(0, &buf), Err(GuestError::BadState { from: RunState::Running, op: "write_page" }));
        std::thread::sleep(Duration::from_millis(20));
        dst.stop().unwrap();
        let check = dst.check_memory().unwrap();
        assert!(check.last_seq >= last);
        assert_eq!(check.max_seq, check.last_seq);
        src.stop().unwrap();
    }

    #[test]
    fn corruption_and_rollback_fail_check_memory() {
        let g = SimulatedGuest::new(spec(64, WorkloadPattern::Uniform, 0));
        g.step(100);
        let page = (0..64).find(|p| !g.is_zero_page(*p).unwrap()).unwrap();
        let mut orig = page_buf();
        g.read_page(page, &mut orig).unwrap();

        let mut bad = orig.clone();
        bad[2000] ^= 0x01;
        g.write_page(page, &bad).unwrap();
        match g.check_memory() {
            Err(GuestError::TornPage { page: p, .. }) => assert_eq!(p, page),
            other => panic!("expected a torn page {page}, got {other:?}"),
        }
        let mut bad = orig.clone();
        bad[20] ^= 0x80; // the seq field
        g.write_page(page, &bad).unwrap();
        assert!(matches!(g.check_memory(), Err(GuestError::TornPage { page: p, .. }) if p == page));
        g.write_page(page, &orig).unwrap();
        g.check_memory().unwrap();

        // A valid record in the wrong place.
        let other = (0..64).find(|p| *p != page).unwrap();
        g.write_page(other, &orig).unwrap();
        assert_eq!(g.check_memory(), Err(GuestError::ForeignPage { page: other, found: page }));
        let mut zero = page_buf();
        g.write_page(other, &zero).unwrap();
        assert!(g.is_zero_page(other).unwrap());
        g.check_memory().unwrap();

        // Rolling back the last write is caught.
        let next = choose_page(&g.spec, 101);
        g.read_page(next, &mut zero).unwrap();
        g.step(1);
        g.write_page(next, &zero).unwrap();
        assert!(matches!(g.check_memory(), Err(GuestError::LostWrite { page: p, expected: 101, .. }) if p == next));

        // A vCPU state older than memory means writes from the future.
        let h = SimulatedGuest::new(spec(64, WorkloadPattern::Uniform, 0));
        h.step(10);
        let old = h.vcpu_state();
        h.step(10);
        h.load_vcpu_state(&old).unwrap();
        assert!(matches!(h.check_memory(), Err(GuestError::FutureWrite { last_seq: 10, .. })));
    }

    #[test]
    fn load_vcpu_state_rejects_bad_bytes() {
        let g = SimulatedGuest::new(spec(64, WorkloadPattern::Uniform, 0));
        g.step(20);
        let good = g.vcpu_state();
        let target = SimulatedGuest::new(spec(64, WorkloadPattern::Uniform, 0));
        let before = target.vcpu_state();
        let mut flipped = good.clone();
        flipped[30] ^= 1;
        let mut bad_sum = good.clone();
        let last = bad_sum.len() - 1;
        bad_sum[last] ^= 1;
        let mut longer = good.clone();
        longer.push(0);
        for bytes in [&b"garbage"[..], &[], &good[..good.len() - 1], &good[..10], &flipped, &bad_sum, &longer] {
            assert!(matches!(target.load_vcpu_state(bytes), Err(GuestError::BadVcpuState(_))));
            assert_eq!(target.vcpu_state(), before, "a rejected state changed nothing");
        }
        // A state for another guest (different seed) is refused too.
        let other = SimulatedGuest::new(GuestSpec { seed: 7, ..spec(64, WorkloadPattern::Uniform, 0) });
        assert!(matches!(other.load_vcpu_state(&good), Err(GuestError::BadVcpuState(_))));
        target.load_vcpu_state(&good).unwrap();
        assert_eq!(target.workload_stats().last_seq, 20);
        target.start().unwrap();
        assert!(matches!(target.load_vcpu_state(&good), Err(GuestError::BadState { .. })));
        target.stop().unwrap();
    }

    /// Found with the `vcpu_state` fuzz target's property (the guest runs on from a loaded
    /// state): a state at write u64::MAX loaded, and the next workload write overflowed.
    #[test]
    fn a_state_with_no_next_write_is_refused() {
        let g = SimulatedGuest::new(spec(64, WorkloadPattern::Uniform, 0));
        g.step(1);
        let good = g.vcpu_state();
        let mut body = good[..good.len() - VCPU_CHECKSUM_LEN].to_vec();
        let at = 4 + 2 + 2 + 8 + 4 + 8 + 1 + 8; // last_seq
        body[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let sum = blake3::hash(&body);
        body.extend_from_slice(sum.as_bytes());
        let target = SimulatedGuest::new(spec(64, WorkloadPattern::Uniform, 0));
        assert!(matches!(target.load_vcpu_state(&body), Err(GuestError::BadVcpuState(_))));
        assert_eq!(target.workload_stats().last_seq, 0);
    }

    /// Found by the `vcpu_state` fuzz target: a state one write below the old limit loaded, ran
    /// on to u64::MAX, and the state it then saved no longer loaded. The workload now stops at
    /// `MAX_SEQ`, and every state it reaches loads again.
    #[test]
    fn a_workload_at_the_limit_stops_and_its_state_still_loads() {
        let g = SimulatedGuest::new(spec(64, WorkloadPattern::Uniform, 0));
        g.step(1);
        let good = g.vcpu_state();
        let mut body = good[..good.len() - VCPU_CHECKSUM_LEN].to_vec();
        let at = 4 + 2 + 2 + 8 + 4 + 8 + 1 + 8; // last_seq
        body[at..at + 8].copy_from_slice(&(super::super::disk::MAX_SEQ - 1).to_le_bytes());
        let sum = blake3::hash(&body);
        body.extend_from_slice(sum.as_bytes());
        let near = SimulatedGuest::new(spec(64, WorkloadPattern::Uniform, 0));
        near.load_vcpu_state(&body).unwrap();
        near.step(5);
        assert_eq!(near.workload_stats().last_seq, super::super::disk::MAX_SEQ);
        let again = SimulatedGuest::new(spec(64, WorkloadPattern::Uniform, 0));
        again.load_vcpu_state(&near.vcpu_state()).expect("a state the workload reached loads");
    }

    #[test]
    fn page_access_checks_range_and_length() {
        let g = SimulatedGuest::new(spec(8, WorkloadPattern::Uniform, 0));
        let mut buf = page_buf();
        assert_eq!(g.read_page(8, &mut buf), Err(GuestError::OutOfRange { page: 8, pages: 8 }));
        assert_eq!(g.write_page(9, &buf), Err(GuestError::OutOfRange { page: 9, pages: 8 }));
        assert_eq!(g.is_zero_page(8), Err(GuestError::OutOfRange { page: 8, pages: 8 }));
        assert_eq!(g.read_page(0, &mut buf[..100]), Err(GuestError::BadBuffer { len: 100 }));
        assert_eq!(g.write_page(0, &[1u8; 10]), Err(GuestError::BadBuffer { len: 10 }));
        assert!(g.is_zero_page(3).unwrap());
        assert_eq!(g.check_memory().unwrap(), MemoryCheck { pages_written: 0, max_seq: 0, last_seq: 0 });
    }

    #[test]
    fn throttle_reduces_the_achieved_rate() {
        let fast = SimulatedGuest::new(spec(64, WorkloadPattern::Uniform, 10_000));
        let slow = SimulatedGuest::new(spec(64, WorkloadPattern::Uniform, 10_000));
        slow.set_throttle(90);
        assert_eq!(slow.workload_stats().throttle_percent, 90);
        fast.start().unwrap();
        slow.start().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        fast.stop().unwrap();
        slow.stop().unwrap();
        let (f, s) = (fast.workload_stats().writes, slow.workload_stats().writes);
        assert!(s < f, "throttled guest wrote {s}, unthrottled {f}");
        slow.set_throttle(200);
        assert_eq!(slow.workload_stats().throttle_percent, 99);
        fast.check_memory().unwrap();
        slow.check_memory().unwrap();
    }

    #[test]
    fn large_guest_is_practical() {
        // 1 GiB: allocation is lazy, and checks only visit written pages.
        let g = SimulatedGuest::new(spec(262_144, WorkloadPattern::Uniform, 0));
        g.step(100);
        let check = g.check_memory().unwrap();
        assert_eq!(check.last_seq, 100);
        assert!(check.pages_written <= 100 && check.pages_written > 90);
        g.start_dirty_log();
        assert_eq!(g.take_dirty().len(), 262_144);
    }

    #[test]
    fn incremental_digest_matches_a_full_recompute() {
        let g = SimulatedGuest::new(spec(300, WorkloadPattern::Uniform, 0));
        let empty = g.memory_digest();
        assert_eq!(empty, g.memory_digest_from_scratch());
        let mut rng = 0x1234_5678u64;
        let mut buf = page_buf();
        let mut seen = BTreeSet::from([empty]);
        for round in 0..60 {
            let r = splitmix64(&mut rng);
            let page = (r >> 8) % 300;
            match r % 4 {
                0 => g.step(1 + (r >> 32) % 40),
                1 => {
                    // An arbitrary page, sometimes one byte away from the previous content.
                    g.read_page(page, &mut buf).unwrap();
                    buf[(r >> 20) as usize % PAGE_SIZE] ^= 1 << (r % 8);
                    g.write_page(page, &buf).unwrap();
                }
                2 => g.write_page(page, &page_buf()).unwrap(),
                _ => {
                    // Writes through both paths to the same page between digests.
                    g.step(3);
                    g.write_page(page, &vec![round as u8 + 1; PAGE_SIZE]).unwrap();
                    g.step(2);
                }
            }
            let d = g.memory_digest();
            assert_eq!(d, g.memory_digest_from_scratch(), "round {round}");
            assert_eq!(d, g.memory_digest(), "a digest with nothing stale is the same");
            seen.insert(d);
        }
        assert!(seen.len() > 50, "digests change with memory: {} distinct", seen.len());
        // Zeroing every page brings back the empty digest.
        for page in 0..300 {
            g.write_page(page, &page_buf()).unwrap();
        }
        assert_eq!(g.memory_digest(), empty);
    }

    #[test]
    fn concurrent_digests_never_miss_a_write() {
        let g = SimulatedGuest::new(spec(128, WorkloadPattern::Uniform, 100_000));
        let stop = Arc::new(AtomicBool::new(false));
        // Digests racing with the workload and with each other.
        let hammers: Vec<_> = (0..2)
            .map(|_| {
                let (g, stop) = (g.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        g.memory_digest();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        g.start().unwrap();
        for round in 0..50 {
            std::thread::sleep(Duration::from_millis(2));
            g.pause().unwrap();
            let writes = g.workload_stats().last_seq;
            assert_eq!(g.memory_digest(), g.memory_digest_from_scratch(), "round {round}, after {writes} writes");
            g.resume().unwrap();
        }
        g.stop().unwrap();
        stop.store(true, Ordering::SeqCst);
        let digests: u64 = hammers.into_iter().map(|h| h.join().unwrap()).sum();
        assert!(digests > 0);
        assert!(g.workload_stats().writes > 100);
        assert_eq!(g.memory_digest(), g.memory_digest_from_scratch());
        g.check_memory().unwrap();
    }

    fn disk(volume: u64) -> DiskGeometry {
        DiskGeometry { volume, block_size: 512, blocks: 8 }
    }

    #[test]
    fn disk_queue_issues_one_write_per_disk_and_retries_failures_first() {
        let g = SimulatedGuest::new(spec(16, WorkloadPattern::Sequential, 0));
        g.set_disks(&[disk(9), disk(4)]);
        assert_eq!(g.next_disk_write(), None, "a guest that is not running issues nothing");
        g.start().unwrap();
        let a = g.next_disk_write().unwrap();
        let b = g.next_disk_write().unwrap();
        assert_eq!((a.volume, a.seq, b.volume, b.seq), (4, 1, 9, 1), "round-robin, by volume");
        assert_eq!(g.next_disk_write(), None, "one write in flight per disk");
        assert_eq!(g.disk_writes_in_flight(), 2);
        g.complete_disk_write(4, 1, true);
        g.complete_disk_write(9, 1, false); // failed: issued again, same block and bytes
        let mut two = [g.next_disk_write().unwrap(), g.next_disk_write().unwrap()];
        two.sort_by_key(|w| w.volume);
        let [next, again] = two;
        assert_eq!((again.volume, again.seq, again.data == b.data), (9, 1, true));
        assert_eq!((next.volume, next.seq, next.block), (4, 2, (a.block + 1) % 8), "sequential");
        g.complete_disk_write(9, 1, true);
        // A completion nobody handed out changes nothing.
        g.complete_disk_write(4, 7, true);
        let journal = g.disk_journal();
        assert_eq!(
            journal.iter().map(|l| (l.geometry.volume, l.acked, l.issued)).collect::<Vec<_>>(),
            [(4, 1, 2), (9, 1, 1)]
        );
        // Paused: nothing new, and waiting for the one in flight ends when it completes.
        g.pause().unwrap();
        assert_eq!(g.next_disk_write(), None);
        assert!(!g.wait_disk_idle(Duration::from_millis(20)));
        let waiter = {
            let g = g.clone();
            std::thread::spawn(move || g.wait_disk_idle(Duration::from_secs(10)))
        };
        g.complete_disk_write(4, 2, true);
        assert!(waiter.join().unwrap());
        // Detaching forgets the disk; a disk seen again starts a new stream.
        let stream = g.disk_journal()[0].stream;
        g.set_disks(&[disk(9)]);
        g.set_disks(&[disk(9), disk(4)]);
        let fresh = g.disk_journal()[0].clone();
        assert_eq!((fresh.geometry.volume, fresh.acked, fresh.issued), (4, 0, 0));
        assert_ne!(fresh.stream, stream);
    }

    #[test]
    fn the_disk_journal_travels_in_the_vcpu_state() {
        let g = SimulatedGuest::new(spec(16, WorkloadPattern::Uniform, 0));
        g.set_disks(&[disk(2), disk(5)]);
        g.start().unwrap();
        for _ in 0..3 {
            let w = g.next_disk_write().unwrap();
            g.complete_disk_write(w.volume, w.seq, true);
        }
        let pending = g.next_disk_write().unwrap(); // in flight when the state is taken
        g.pause().unwrap();
        let state = g.vcpu_state();
        let copy = SimulatedGuest::new(g.spec());
        copy.load_vcpu_state(&state).unwrap();
        assert_eq!(copy.disk_journal(), g.disk_journal());
        assert_eq!(copy.vcpu_state(), state);
        // The copy issues the write that was in flight again before anything later.
        copy.start().unwrap();
        let first = copy.next_disk_write().unwrap();
        let other = copy.next_disk_write().unwrap();
        let mut got = [(first.volume, first.seq), (other.volume, other.seq)];
        got.sort_unstable();
        assert!(got.contains(&(pending.volume, pending.seq)), "{got:?} lacks {pending:?}");
        // Damaged disk sections are refused, and nothing changes.
        let mut bad = state.clone();
        let at = VCPU_HEADER_LEN + 2 * REGS_PER_VCPU * 8; // the disk count
        bad[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
        let body_len = bad.len() - VCPU_CHECKSUM_LEN;
        let sum = blake3::hash(&bad[..body_len]);
        bad[body_len..].copy_from_slice(sum.as_bytes());
        let fresh = SimulatedGuest::new(g.spec());
        assert!(matches!(fresh.load_vcpu_state(&bad), Err(GuestError::BadVcpuState(_))));
        assert!(fresh.disk_journal().is_empty());
        // A version 1 state (no disk section) still loads, with no disks.
        let mut v1 = state[..VCPU_HEADER_LEN + 2 * REGS_PER_VCPU * 8].to_vec();
        v1[4..6].copy_from_slice(&1u16.to_le_bytes());
        let sum = blake3::hash(&v1);
        v1.extend_from_slice(sum.as_bytes());
        fresh.load_vcpu_state(&v1).unwrap();
        assert!(fresh.disk_journal().is_empty());
        assert_eq!(fresh.workload_stats().last_seq, g.workload_stats().last_seq);
    }

    /// Performs `n` disk writes of `g` on the in-memory `disk`, acknowledging each.
    fn write_disk(g: &SimulatedGuest, disk: &mut [u8], n: usize) {
        for _ in 0..n {
            let w = g.next_disk_write().expect("a disk write");
            disk[w.offset as usize..w.offset as usize + w.data.len()].copy_from_slice(&w.data);
            g.complete_disk_write(w.volume, w.seq, true);
        }
    }

    #[test]
    fn a_restored_guest_checks_out_only_against_a_rolled_back_disk() {
        let s = GuestSpec { disk_writes_per_sec: 0, ..spec(16, WorkloadPattern::Sequential, 0) };
        let geometry = DiskGeometry { volume: 1, block_size: 4096, blocks: 1024 };
        let g = SimulatedGuest::new(s.clone());
        g.set_disks(&[geometry]);
        g.start().unwrap();
        let mut disk = vec![0u8; 1024 * 4096];
        write_disk(&g, &mut disk, 200);
        // The recovery point; the guest then goes on writing until it is given up.
        g.pause().unwrap();
        let image = g.vcpu_state();
        let snapshot = disk.clone();
        g.resume().unwrap();
        write_disk(&g, &mut disk, 500);
        let restore = |disk: &mut Vec<u8>| {
            let r = SimulatedGuest::new(s.clone());
            r.load_vcpu_state(&image).unwrap();
            r.fork_disk_timeline();
            r.set_disks(&[geometry]);
            r.start().unwrap();
            write_disk(&r, disk, 300);
            r.disk_journal().remove(0)
        };
        let mut rolled_back = snapshot;
        let journal = restore(&mut rolled_back);
        super::super::disk::check_disk(s.pattern, &journal, &journal, &rolled_back).unwrap();
        // Not rolled back: the given-up timeline's writes are still there, even where the
        // restored guest has written the same sequence numbers since.
        let journal = restore(&mut disk);
        let e = super::super::disk::check_disk(s.pattern, &journal, &journal, &disk).unwrap_err();
        assert!(matches!(e, super::super::disk::DiskCheckError::Forked { .. }), "{e}");
    }

    #[test]
    fn driver_is_object_safe() {
        let g: Arc<dyn GuestDriver> = SimulatedGuest::new(spec(4, WorkloadPattern::Sequential, 0));
        assert_eq!(g.spec().memory_pages, 4);
    }
}
