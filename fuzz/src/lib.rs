//! Shared pieces of Haven's fuzz targets (`fuzz_targets/*.rs`, see `README.md`): an allocator
//! that measures the peak heap a decoder uses, a byte reader for turning fuzz input into
//! parameters, the tokio runtime async targets run on, the fixed guest the VM targets use, and
//! every target's seed corpus ([`seeds`]).
//!
//! Nothing here decodes anything itself: the targets call Haven's own decoders and check
//! properties of what they return.

pub mod nbd_model;
pub mod seeds;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use haven_node::vm::guest::{GuestSpec, WorkloadPattern};

/// The system allocator, counting the bytes live and the peak since the last [`measure`].
pub struct CountingAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

fn shrank(n: usize) {
    LIVE.fetch_sub(n, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; the counters are only bookkeeping.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Runs `f` and returns its result with the peak of heap bytes allocated during the call above
/// what was live before it (memory the result still holds counts).
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let r = f();
    let peak = PEAK.load(Ordering::Relaxed);
    (r, peak.saturating_sub(base))
}

/// Asserts that a decoder's peak heap use stayed within `per_byte` times its input plus `slack`.
#[track_caller]
pub fn assert_alloc_bounded(what: &str, peak: usize, input_len: usize, per_byte: usize, slack: usize) {
    let bound = input_len.saturating_mul(per_byte).saturating_add(slack);
    assert!(
        peak <= bound,
        "{what}: allocated {peak} bytes at peak for {input_len} input bytes (bound {per_byte} x input + {slack})"
    );
}

/// Reads fixed-size values off the front of fuzz input; past the end it yields zeroes.
pub struct Bytes<'a> {
    rest: &'a [u8],
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { rest: data }
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.rest.len());
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        head
    }

    /// Whether the input is used up.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    pub fn rest(self) -> &'a [u8] {
        self.rest
    }

    pub fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    pub fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let t = self.take(2);
        b[..t.len()].copy_from_slice(t);
        u16::from_le_bytes(b)
    }

    pub fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let t = self.take(4);
        b[..t.len()].copy_from_slice(t);
        u32::from_le_bytes(b)
    }

    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let t = self.take(8);
        b[..t.len()].copy_from_slice(t);
        u64::from_le_bytes(b)
    }
}

/// One current-thread tokio runtime (with timers) per process, reused by every iteration.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a current-thread runtime")
    })
}

/// Pages of the guest the VM targets load state into (small, so one iteration stays cheap).
pub const GUEST_PAGES: u64 = 16;

/// The guest the VM targets (vCPU state, recovery images, migration) use; the seed generator
/// writes its corpus from guests of this spec.
pub fn guest_spec() -> GuestSpec {
    GuestSpec {
        memory_pages: GUEST_PAGES,
        vcpus: 2,
        pattern: WorkloadPattern::Uniform,
        dirty_pages_per_sec: 0,
        disk_writes_per_sec: 0,
        seed: 7,
    }
}

/// Plan and VM the recovery-image target loads images for.
pub const IMAGE_PLAN: u64 = 3;
pub const IMAGE_VM: u64 = 5;

/// Lower-case hex, as the catalog records digests.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
