//! Pre-copy live migration of a guest's memory and vCPU state between two hosts.
//!
//! This module owns two things and nothing else:
//!
//! * the **pre-copy algorithm** ([`migrate_source`] / [`migrate_destination`]): copy all memory
//!   while the guest keeps running, then re-copy the pages it dirtied, round after round, until
//!   what is left can be copied within [`MigrationConfig::max_downtime_ms`]; then pause, copy the
//!   rest plus the vCPU state, and compare memory digests. When the guest dirties memory faster
//!   than the link can copy it, auto-converge throttles the guest's vCPUs (or the migration is
//!   refused with [`MigrationError::NotConverging`]); [`predict`] gives the same answer up front;
//! * the **page stream format**: length-prefixed frames behind a magic/version header, every frame
//!   validated in full before anything is applied. Pages travel as `Zero` (no payload), `Full`
//!   (one page) or `XorDelta` (XOR against the copy of that page sent earlier in this migration,
//!   zero runs run-length encoded, like QEMU's XBZRLE).
//!
//! It must not touch the catalog or decide placement. The caller provides the byte stream (a QUIC
//! bulk stream in production, `tokio::io::duplex` in tests) and commits the ownership change.
//!
//! # Ownership contract — the VM must never run in two places
//!
//! * [`migrate_source`] returns `Ok` with the **source guest still paused** and the destination
//!   guest **loaded but not started**. Only then does the caller commit the ownership change in
//!   the catalog; after the commit succeeds it calls `stop()` on the source guest and tells the
//!   destination to resume its guest. If the commit fails, the caller resumes the source and
//!   discards the destination guest.
//! * On every error (cancel, non-convergence, digest mismatch, I/O, protocol), the source guest is
//!   left running as it was before the migration (resumed if the engine paused it, throttle back
//!   to 0, dirty logging stopped), and the destination guest is left unstarted.
//! * [`migrate_destination`] never starts its guest.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Notify};

use super::guest::{GuestDriver, GuestError, RunState, PAGE_SIZE};
use super::link::RateLimited;

/// First bytes each side writes on the stream.
pub const MAGIC: [u8; 4] = *b"HVMG";
/// Version of the page stream format; both sides must speak the same one.
pub const PROTOCOL_VERSION: u16 = 2;
/// Most pages carried by one `Pages` frame.
pub const MAX_PAGES_PER_FRAME: usize = 256;
/// Largest vCPU state blob accepted.
pub const MAX_VCPU_STATE_BYTES: usize = 1 << 20;
/// Largest reason string accepted in `Abort` / `Failed`.
const MAX_REASON_BYTES: usize = 4096;
/// `page: u64` + `encoding: u8`.
const ENTRY_HEADER: usize = 9;
/// `kind: u8` + `len: u32`.
const FRAME_HEADER: usize = 5;
/// `round: u32` + `count: u16`.
const PAGES_HEADER: usize = 6;
const MAX_PAGES_PAYLOAD: usize = PAGES_HEADER + MAX_PAGES_PER_FRAME * (ENTRY_HEADER + 2 + PAGE_SIZE);

// Frame kinds, source → destination.
const K_HELLO: u8 = 0x01;
const K_PAGES: u8 = 0x02;
const K_VCPU: u8 = 0x03;
const K_COMPLETE: u8 = 0x04;
const K_ABORT: u8 = 0x05;
/// Source → destination: answer `SyncAck` once every earlier frame is applied. Sent before the
/// source pauses, so the pause does not also wait for a backlog of pre-copy frames in flight.
const K_SYNC: u8 = 0x06;
// Frame kinds, destination → source.
const K_HELLO_ACK: u8 = 0x81;
const K_READY: u8 = 0x82;
const K_FAILED: u8 = 0x83;
const K_SYNC_ACK: u8 = 0x84;

// Page encodings.
const ENC_ZERO: u8 = 0;
const ENC_FULL: u8 = 1;
const ENC_XOR: u8 = 2;

/// Throttle steps of auto-converge: first step, increment, ceiling (percent of vCPU time taken).
const THROTTLE_INITIAL: u8 = 30;
const THROTTLE_STEP: u8 = 20;
const THROTTLE_MAX: u8 = 99;

/// What the auto-converge policy makes of a pre-copy round that missed the downtime target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Converge {
    /// Keep copying at the current throttle.
    Keep,
    /// Not converging, for this reason: throttle harder ([`next_throttle`]) or give up.
    Stalled(String),
}

/// The convergence policy, pure: `history` holds the dirty bytes left after each round of the
/// current window (since round 1 ended, or the last throttle step), `window` how long that
/// window has run. Unthrottled, pre-copy is stalled when the remainder did not shrink by 10%
/// over `converge_check_rounds` rounds; throttled, unless it at least halves every round; either
/// way when the window outlasts `converge_check_ms`.
pub(crate) fn converge_policy(
    config: &MigrationConfig,
    throttle: u8,
    history: &[u64],
    window: Option<Duration>,
    round: u32,
) -> Converge {
    let checks = config.converge_check_rounds.max(1) as usize;
    let n = history.len();
    let stalled = if throttle == 0 {
        n >= checks && history[n - 1] * 10 >= history[n - checks] * 9
    } else {
        n >= 2 && history[n - 1] * 2 > history[n - 2]
    };
    let timed_out = window.is_some_and(|w| w >= Duration::from_millis(config.converge_check_ms));
    if stalled {
        Converge::Stalled(format!("remaining dirty memory did not shrink over the last rounds (round {round})"))
    } else if timed_out {
        Converge::Stalled(format!("no convergence within {} ms", config.converge_check_ms))
    } else {
        Converge::Keep
    }
}

/// The throttle after a stall: the first step, then one increment, capped at the ceiling
/// (`Ok(None)`: already there, keep going until `max_rounds`); without auto-converge the
/// migration gives up with `why`.
pub(crate) fn next_throttle(config: &MigrationConfig, throttle: u8, why: &str) -> Result<Option<u8>, MigrationError> {
    if !config.auto_converge {
        return Err(MigrationError::NotConverging { reason: why.to_string() });
    }
    if throttle >= THROTTLE_MAX {
        return Ok(None);
    }
    Ok(Some(if throttle == 0 { THROTTLE_INITIAL } else { throttle.saturating_add(THROTTLE_STEP).min(THROTTLE_MAX) }))
}

/// Tuning of one migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MigrationConfig {
    /// Longest pause of the guest we accept for the final stop-and-copy.
    pub max_downtime_ms: u64,
    /// Throttle the guest's vCPUs when pre-copy does not converge (otherwise give up).
    pub auto_converge: bool,
    /// Give up after this many pre-copy rounds.
    pub max_rounds: u32,
    /// Pre-copy is "not converging" when the remaining dirty bytes did not shrink meaningfully
    /// over this many rounds...
    pub converge_check_rounds: u32,
    /// ...or this long after the first full round without reaching the downtime target.
    pub converge_check_ms: u64,
    /// Pages of previously sent content the source keeps for XOR deltas (0 disables deltas).
    pub xbzrle_cache_pages: u64,
    /// Pace the stream to this many bytes per second (0 = as fast as the link goes).
    pub max_bandwidth_bytes_per_sec: u64,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            max_downtime_ms: 50,
            auto_converge: true,
            max_rounds: 30,
            converge_check_rounds: 3,
            converge_check_ms: 5000,
            xbzrle_cache_pages: 16384,
            max_bandwidth_bytes_per_sec: 0,
        }
    }
}

/// Where a migration is. Only moves forward; `Done`, `Failed` and `Cancelled` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Phase {
    #[default]
    Precopy,
    Converging,
    StopAndCopy,
    Done,
    Failed,
    Cancelled,
}

impl Phase {
    fn rank(self) -> u8 {
        match self {
            Phase::Precopy => 0,
            Phase::Converging => 1,
            Phase::StopAndCopy => 2,
            Phase::Done | Phase::Failed | Phase::Cancelled => 3,
        }
    }

    /// Whether the migration is over.
    pub fn is_final(self) -> bool {
        self.rank() == 3
    }
}

/// Published after every batch and round. `bytes_sent` never decreases, `phase` only moves forward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct MigrationProgress {
    pub phase: Phase,
    pub round: u32,
    /// Stream bytes written (source) or received (destination), frames included.
    pub bytes_sent: u64,
    pub pages_remaining: u64,
    pub bytes_remaining: u64,
    pub dirty_pages_per_sec: f64,
    pub bandwidth_bytes_per_sec: f64,
    pub eta_ms: u64,
    pub expected_downtime_ms: u64,
    pub throttle_percent: u8,
}

/// A cancel signal shared between the caller and the engine.
#[derive(Debug, Clone, Default)]
pub struct CancelToken {
    inner: Arc<CancelInner>,
}

#[derive(Debug, Default)]
struct CancelInner {
    flag: AtomicBool,
    notify: Notify,
}

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.inner.flag.store(true, Ordering::SeqCst);
        self.inner.notify.notify_waiters();
    }

    pub fn is_cancelled(&self) -> bool {
        self.inner.flag.load(Ordering::SeqCst)
    }

    /// Completes once [`cancel`](Self::cancel) has been called.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("migration stream I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent something that is not a valid frame, or a frame out of place.
    #[error("migration protocol violation: {0}")]
    Protocol(String),
    /// The two sides cannot migrate this guest (memory size, page size, guest state).
    #[error("migration handshake failed: {0}")]
    Handshake(String),
    #[error("guest: {0}")]
    Guest(String),
    #[error("migration not converging: {reason}")]
    NotConverging { reason: String },
    #[error("migration cancelled")]
    Cancelled,
    /// The source aborted the migration (seen at the destination).
    #[error("migration aborted by the source: {0}")]
    Aborted(String),
    /// The destination reported a failure (seen at the source).
    #[error("destination failed: {0}")]
    Remote(String),
    #[error("memory digest mismatch: source {src_digest}, destination {dst_digest}")]
    DigestMismatch { src_digest: String, dst_digest: String },
}

impl From<GuestError> for MigrationError {
    fn from(e: GuestError) -> Self {
        MigrationError::Guest(e.to_string())
    }
}

fn proto(msg: impl Into<String>) -> MigrationError {
    MigrationError::Protocol(msg.into())
}

/// Result of a successful migration at the source. The source guest is still **paused**.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceOutcome {
    pub rounds: u32,
    pub bytes_sent: u64,
    pub pages_sent: u64,
    pub zero_pages: u64,
    pub full_pages: u64,
    pub delta_pages: u64,
    /// From pausing the guest to receiving the destination's `Ready`.
    pub downtime_ms: u64,
    pub total_ms: u64,
    pub max_throttle_percent: u8,
    pub digest: [u8; 32],
}

/// Result of a successful migration at the destination. The guest is loaded but **not started**.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DestinationOutcome {
    pub rounds: u32,
    pub bytes_received: u64,
    pub pages_received: u64,
    pub zero_pages: u64,
    pub full_pages: u64,
    pub delta_pages: u64,
    pub total_ms: u64,
    pub digest: [u8; 32],
}

// ---------------------------------------------------------------------------------------------
// Prediction
// ---------------------------------------------------------------------------------------------

/// What the geometric pre-copy model expects of a migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Reaches the downtime target within [`PREDICT_MAX_ROUNDS`] rounds without throttling.
    pub converges: bool,
    /// Whole migration, stop-and-copy included (`u64::MAX` when it does not converge).
    pub total_ms: u64,
    /// Expected pause (for a non-converging migration: the pause if stopped after the last round).
    pub downtime_ms: u64,
    /// Pre-copy rounds before stop-and-copy.
    pub rounds: u32,
    /// When it does not converge: the smallest vCPU throttle that makes it converge (`None` when
    /// it converges anyway, or when not even 99% would do).
    pub needs_throttle_percent: Option<u8>,
}

/// Rounds [`predict`] simulates (matches [`MigrationConfig::max_rounds`]' default).
pub const PREDICT_MAX_ROUNDS: u32 = 30;

/// Geometric pre-copy model: round 1 copies all memory in `M/B`; each later round copies what the
/// previous round dirtied (`R' = min(M, R·D/B)`); stop-and-copy when `R/B ≤ max_downtime`. With
/// `D ≥ B` the remainder never shrinks, so only throttling (scaling `D`) can make it converge.
pub fn predict(
    memory_bytes: u64,
    dirty_bytes_per_sec: u64,
    bandwidth_bytes_per_sec: u64,
    max_downtime_ms: u64,
) -> Prediction {
    let base = simulate(memory_bytes, dirty_bytes_per_sec as f64, bandwidth_bytes_per_sec, max_downtime_ms);
    if base.converges {
        return base;
    }
    let needs = (1..=THROTTLE_MAX).find(|p| {
        let d = dirty_bytes_per_sec as f64 * (100 - *p) as f64 / 100.0;
        simulate(memory_bytes, d, bandwidth_bytes_per_sec, max_downtime_ms).converges
    });
    Prediction { needs_throttle_percent: needs, ..base }
}

fn simulate(memory: u64, dirty: f64, bw: u64, max_downtime_ms: u64) -> Prediction {
    if bw == 0 {
        return Prediction {
            converges: false,
            total_ms: u64::MAX,
            downtime_ms: u64::MAX,
            rounds: 0,
            needs_throttle_percent: None,
        };
    }
    let m = memory as f64;
    let b = bw as f64;
    let target = max_downtime_ms as f64 / 1000.0;
    let mut to_send = m;
    let mut elapsed = 0.0;
    for round in 1..=PREDICT_MAX_ROUNDS {
        let t = to_send / b;
        elapsed += t;
        let remaining = (dirty * t).min(m);
        let downtime = remaining / b;
        if downtime <= target {
            return Prediction {
                converges: true,
                total_ms: ((elapsed + downtime) * 1000.0).ceil() as u64,
                downtime_ms: (downtime * 1000.0).ceil() as u64,
                rounds: round,
                needs_throttle_percent: None,
            };
        }
        to_send = remaining;
    }
    Prediction {
        converges: false,
        total_ms: u64::MAX,
        downtime_ms: (to_send / b * 1000.0).ceil() as u64,
        rounds: PREDICT_MAX_ROUNDS,
        needs_throttle_percent: None,
    }
}

// ---------------------------------------------------------------------------------------------
// XOR delta (XBZRLE-like) encoding
// ---------------------------------------------------------------------------------------------

/// Encodes `new XOR old` as `(zero_run: uleb128, data_run: uleb128, data_run bytes of XOR)*`;
/// trailing zeros are implicit. Returns false (leaving `out` unspecified) once `out` would exceed
/// `limit` bytes.
pub(crate) fn xor_encode(new: &[u8], old: &[u8], out: &mut Vec<u8>, limit: usize) -> bool {
    out.clear();
    let n = new.len();
    let mut i = 0;
    while i < n {
        let zero_start = i;
        while i < n && new[i] == old[i] {
            i += 1;
        }
        if i == n {
            break;
        }
        let data_start = i;
        // A data run ends at the first pair of unchanged bytes (a lone equal byte is cheaper to
        // carry as a zero XOR byte than to split the run).
        while i < n && (new[i] != old[i] || (i + 1 < n && new[i + 1] != old[i + 1])) {
            i += 1;
        }
        put_uleb(out, data_start - zero_start);
        put_uleb(out, i - data_start);
        out.extend(new[data_start..i].iter().zip(&old[data_start..i]).map(|(a, b)| a ^ b));
        if out.len() > limit {
            return false;
        }
    }
    true
}

fn put_uleb(out: &mut Vec<u8>, mut v: usize) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn get_uleb(enc: &[u8], pos: &mut usize) -> Result<usize, MigrationError> {
    let mut v = 0usize;
    for shift in [0, 7, 14] {
        let byte = *enc.get(*pos).ok_or_else(|| proto("xor delta: truncated run length"))?;
        *pos += 1;
        v |= ((byte & 0x7f) as usize) << shift;
        if byte & 0x80 == 0 {
            if v > PAGE_SIZE {
                return Err(proto("xor delta: run length beyond the page"));
            }
            return Ok(v);
        }
    }
    Err(proto("xor delta: run length too long"))
}

/// Walks an XOR delta, checking it is well formed; XORs it into `page` when given.
pub(crate) fn xor_apply(enc: &[u8], mut page: Option<&mut [u8]>) -> Result<(), MigrationError> {
    let mut pos = 0;
    let mut at = 0usize;
    while pos < enc.len() {
        let zero_run = get_uleb(enc, &mut pos)?;
        let data_run = get_uleb(enc, &mut pos)?;
        if data_run == 0 {
            return Err(proto("xor delta: empty data run"));
        }
        at += zero_run;
        if at + data_run > PAGE_SIZE {
            return Err(proto("xor delta: runs beyond the page"));
        }
        let data = enc.get(pos..pos + data_run).ok_or_else(|| proto("xor delta: truncated data run"))?;
        if let Some(page) = page.as_deref_mut() {
            for (p, d) in page[at..at + data_run].iter_mut().zip(data) {
                *p ^= d;
            }
        }
        pos += data_run;
        at += data_run;
    }
    Ok(())
}

fn is_zero(buf: &[u8]) -> bool {
    buf.iter().all(|b| *b == 0)
}

/// Direct-mapped cache of the last content sent per page (bounded, like QEMU's XBZRLE cache).
struct XbzrleCache {
    tags: Vec<u64>,
    data: Vec<u8>,
}

impl XbzrleCache {
    const EMPTY: u64 = u64::MAX;

    fn new(capacity_pages: u64, memory_pages: u64) -> Self {
        let slots = capacity_pages.min(memory_pages) as usize;
        Self { tags: vec![Self::EMPTY; slots], data: vec![0; slots * PAGE_SIZE] }
    }

    fn slot(&self, page: u64) -> Option<usize> {
        if self.tags.is_empty() {
            None
        } else {
            Some((page % self.tags.len() as u64) as usize)
        }
    }

    fn get(&self, page: u64) -> Option<&[u8]> {
        let s = self.slot(page)?;
        (self.tags[s] == page).then(|| &self.data[s * PAGE_SIZE..(s + 1) * PAGE_SIZE])
    }

    fn insert(&mut self, page: u64, content: &[u8]) {
        if let Some(s) = self.slot(page) {
            self.tags[s] = page;
            self.data[s * PAGE_SIZE..(s + 1) * PAGE_SIZE].copy_from_slice(content);
        }
    }

    fn remove(&mut self, page: u64) {
        if let Some(s) = self.slot(page) {
            if self.tags[s] == page {
                self.tags[s] = Self::EMPTY;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------------------------

fn max_payload(kind: u8) -> Option<usize> {
    Some(match kind {
        K_HELLO => 4 + 8 + 4,
        K_PAGES => MAX_PAGES_PAYLOAD,
        K_VCPU => MAX_VCPU_STATE_BYTES,
        K_COMPLETE => 32,
        K_ABORT | K_FAILED => MAX_REASON_BYTES,
        K_HELLO_ACK => 4 + 8,
        K_READY => 32,
        K_SYNC | K_SYNC_ACK => 0,
        _ => return None,
    })
}

fn stream_header() -> [u8; 6] {
    let mut h = [0u8; 6];
    h[..4].copy_from_slice(&MAGIC);
    h[4..].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    h
}

async fn read_stream_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<(), MigrationError> {
    let mut h = [0u8; 6];
    read_exact_or_proto(r, &mut h, "stream header").await?;
    if h[..4] != MAGIC {
        return Err(proto("bad magic: not a Haven migration stream"));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != PROTOCOL_VERSION {
        return Err(MigrationError::Handshake(format!(
            "protocol version {version} (this node speaks {PROTOCOL_VERSION})"
        )));
    }
    Ok(())
}

async fn read_exact_or_proto<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    what: &str,
) -> Result<(), MigrationError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(proto(format!("truncated {what}"))),
        Err(e) => Err(e.into()),
    }
}

/// Reads one frame into `buf` (its payload). `Ok(None)` on a clean end of stream between frames.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Result<Option<u8>, MigrationError> {
    let mut header = [0u8; FRAME_HEADER];
    let n = r.read(&mut header).await?;
    if n == 0 {
        return Ok(None);
    }
    read_exact_or_proto(r, &mut header[n..], "frame header").await?;
    let kind = header[0];
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let max = max_payload(kind).ok_or_else(|| proto(format!("unknown frame kind {kind:#04x}")))?;
    if len > max {
        return Err(proto(format!("frame kind {kind:#04x}: length {len} exceeds {max}")));
    }
    buf.clear();
    buf.resize(len, 0);
    read_exact_or_proto(r, buf, "frame payload").await?;
    Ok(Some(kind))
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(FRAME_HEADER + payload.len());
    f.push(kind);
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

fn reason_frame(kind: u8, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    frame(kind, &reason.as_bytes()[..end])
}

fn parse_reason(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload).into_owned()
}

fn parse_digest(payload: &[u8], what: &str) -> Result<[u8; 32], MigrationError> {
    payload.try_into().map_err(|_| proto(format!("{what}: digest must be 32 bytes")))
}

fn hex(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

// ---------------------------------------------------------------------------------------------
// Source
// ---------------------------------------------------------------------------------------------

/// Migrates `guest` (running or paused) to the destination at the other end of `stream`.
///
/// On `Ok` the source guest is left **PAUSED** and the destination holds an identical, unstarted
/// guest (digests compared). The caller MUST then commit the ownership change in the catalog, and
/// only after that `stop()` this guest and tell the destination to resume its copy — never resume
/// both. On `Err` this guest is left as it was (running unless it was paused before the call),
/// with throttle 0 and dirty logging stopped; the destination has been told to `Abort` where the
/// stream still allowed it.
pub async fn migrate_source<S: AsyncRead + AsyncWrite + Unpin>(
    guest: Arc<dyn GuestDriver>,
    stream: S,
    config: MigrationConfig,
    progress: watch::Sender<MigrationProgress>,
    cancel: CancelToken,
) -> Result<SourceOutcome, MigrationError> {
    match config.max_bandwidth_bytes_per_sec {
        0 => migrate_source_on(guest, stream, config, progress, cancel).await,
        cap => migrate_source_on(guest, RateLimited::new(stream, cap), config, progress, cancel).await,
    }
}

async fn migrate_source_on<S: AsyncRead + AsyncWrite + Unpin>(
    guest: Arc<dyn GuestDriver>,
    stream: S,
    config: MigrationConfig,
    progress: watch::Sender<MigrationProgress>,
    cancel: CancelToken,
) -> Result<SourceOutcome, MigrationError> {
    let spec = guest.spec();
    let mut src = Source {
        guest: guest.clone(),
        stream,
        cache: XbzrleCache::new(config.xbzrle_cache_pages, spec.memory_pages),
        config,
        progress,
        cancel,
        memory_pages: spec.memory_pages,
        buf: Vec::with_capacity(FRAME_HEADER + MAX_PAGES_PAYLOAD),
        page: vec![0; PAGE_SIZE],
        delta: Vec::with_capacity(PAGE_SIZE),
        poisoned: false,
        paused_by_us: false,
        dirty_logging: false,
        throttle: 0,
        max_throttle: 0,
        prog: MigrationProgress::default(),
        pages_sent: 0,
        zero_pages: 0,
        full_pages: 0,
        delta_pages: 0,
        round_bytes: 0,
        round_pages: 0,
        bw_bytes: 0.0,
        bw_secs: 0.0,
        window_start: None,
        last_step: None,
        warm: None,
    };
    let started = Instant::now();
    let result = src.run(started).await;
    match result {
        Ok(outcome) => {
            src.guest.stop_dirty_log();
            src.guest.set_throttle(0);
            src.set_phase(Phase::Done);
            src.publish();
            tracing::info!(
                rounds = outcome.rounds,
                bytes = outcome.bytes_sent,
                downtime_ms = outcome.downtime_ms,
                total_ms = outcome.total_ms,
                "migration source done; guest paused awaiting ownership commit"
            );
            Ok(outcome)
        }
        Err(err) => {
            src.cleanup(&err).await;
            tracing::warn!(error = %err, "migration source failed; guest left at the source");
            Err(err)
        }
    }
}

struct Source<S> {
    guest: Arc<dyn GuestDriver>,
    stream: S,
    config: MigrationConfig,
    progress: watch::Sender<MigrationProgress>,
    cancel: CancelToken,
    memory_pages: u64,
    cache: XbzrleCache,
    /// Frame being built.
    buf: Vec<u8>,
    page: Vec<u8>,
    delta: Vec<u8>,
    /// A frame write was interrupted: the stream is mid-frame and must not be written again.
    poisoned: bool,
    paused_by_us: bool,
    dirty_logging: bool,
    throttle: u8,
    max_throttle: u8,
    prog: MigrationProgress,
    pages_sent: u64,
    zero_pages: u64,
    full_pages: u64,
    delta_pages: u64,
    round_bytes: u64,
    round_pages: u64,
    /// Decayed sums behind the bandwidth estimate.
    bw_bytes: f64,
    bw_secs: f64,
    /// Start of the current convergence window (end of round 1, then each throttle step).
    window_start: Option<Instant>,
    last_step: Option<Instant>,
    /// Background digest that keeps the guest's page hashes fresh during pre-copy, so the digest
    /// at switch-over only rehashes pages written since (see [`Source::warm_digest`]).
    warm: Option<tokio::task::JoinHandle<[u8; 32]>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Source<S> {
    async fn run(&mut self, started: Instant) -> Result<SourceOutcome, MigrationError> {
        self.publish();
        let state = self.guest.state();
        if !matches!(state, RunState::Running | RunState::Paused) {
            return Err(MigrationError::Guest(format!("cannot migrate a guest in state {state:?}")));
        }
        self.handshake().await?;

        self.guest.start_dirty_log();
        self.dirty_logging = true;
        // Clear the initial all-dirty set: round 1 reads every page after this point, and any
        // write from now on is logged for round 2.
        let _ = self.guest.take_dirty();
        // The first digest hashes all written memory: run it alongside round 1.
        self.warm_digest();
        let mut last_take = Instant::now();
        let mut round = 1u32;
        self.prog.round = 1;
        self.send_round(1, 0..self.memory_pages, self.memory_pages, true).await?;

        let mut history: Vec<u64> = Vec::new();
        let mut dirty;
        loop {
            self.check_cancel()?;
            let now = Instant::now();
            dirty = self.guest.take_dirty();
            let since = now.duration_since(last_take).as_secs_f64().max(1e-6);
            last_take = now;
            let dirty_rate = dirty.len() as f64 / since;
            let (remaining_bytes, downtime_ms) = self.estimate(dirty.len() as u64, round);
            self.prog.dirty_pages_per_sec = dirty_rate;
            self.prog.pages_remaining = dirty.len() as u64;
            self.prog.bytes_remaining = remaining_bytes;
            self.prog.expected_downtime_ms = downtime_ms;
            self.prog.eta_ms = downtime_ms;
            self.publish();
            tracing::debug!(round, dirty = dirty.len(), dirty_rate, downtime_ms, "pre-copy round done");
            if downtime_ms <= self.config.max_downtime_ms {
                break;
            }
            if self.window_start.is_none() {
                self.window_start = Some(now);
            }
            history.push(remaining_bytes);
            if self.converge_step(&mut history, round)? {
                history.clear();
                history.push(remaining_bytes);
            }
            if round >= self.config.max_rounds {
                return Err(MigrationError::NotConverging {
                    reason: format!(
                        "{} pages still dirty after {round} rounds (throttle {}%)",
                        dirty.len(),
                        self.throttle
                    ),
                });
            }
            round += 1;
            self.prog.round = round;
            self.warm_digest();
            let n = dirty.len() as u64;
            self.send_round(round, dirty.into_iter(), n, false).await?;
        }

        // Drain the pipe first: the destination acknowledges once it has applied everything sent
        // so far, while the guest still runs; only then pause.
        self.send_frame_bytes(frame(K_SYNC, &[])).await?;
        self.flush().await?;
        match self.read_reply("SyncAck").await? {
            (K_SYNC_ACK, _) => {}
            (K_FAILED, payload) => return Err(MigrationError::Remote(parse_reason(&payload))),
            (other, _) => return Err(proto(format!("expected SyncAck, got frame kind {other:#04x}"))),
        }
        dirty.extend(self.guest.take_dirty());

        // Stop-and-copy.
        self.set_phase(Phase::StopAndCopy);
        let paused_at = Instant::now();
        if self.guest.state() == RunState::Running {
            self.guest.pause()?;
            self.paused_by_us = true;
        }
        // Disk writes in flight finish (or fail) before the device state, which records what the
        // disks acknowledged, is captured; none may land from here once the destination runs.
        super::disk::drain(vec![("the guest".into(), self.guest.clone())], super::disk::DISK_DRAIN_LIMIT)
            .await
            .map_err(MigrationError::Guest)?;
        let mut last = self.guest.take_dirty();
        last.extend(dirty);
        last.sort_unstable();
        last.dedup();
        let n = last.len() as u64;
        // Memory no longer changes: hash it on a blocking thread while the last pages go out. The
        // warm-up digests left only the pages written since the last of them to rehash (a warm-up
        // still running is waited for inside `memory_digest`, and its work is not repeated).
        self.warm = None;
        let guest = self.guest.clone();
        let digest_task = tokio::task::spawn_blocking(move || guest.memory_digest());
        self.send_round(round, last.into_iter(), n, false).await?;
        let vcpu = self.guest.vcpu_state();
        if vcpu.len() > MAX_VCPU_STATE_BYTES {
            return Err(MigrationError::Guest(format!("vCPU state of {} bytes is too large", vcpu.len())));
        }
        self.send_frame_bytes(frame(K_VCPU, &vcpu)).await?;
        let digest = digest_task.await.map_err(|e| MigrationError::Guest(format!("digest task: {e}")))?;
        self.send_frame_bytes(frame(K_COMPLETE, &digest)).await?;
        self.flush().await?;

        let (kind, payload) = self.read_reply("Ready").await?;
        let downtime = paused_at.elapsed();
        match kind {
            K_READY => {
                let remote = parse_digest(&payload, "Ready")?;
                if remote != digest {
                    return Err(MigrationError::DigestMismatch { src_digest: hex(&digest), dst_digest: hex(&remote) });
                }
            }
            K_FAILED => return Err(MigrationError::Remote(parse_reason(&payload))),
            other => return Err(proto(format!("expected Ready, got frame kind {other:#04x}"))),
        }
        Ok(SourceOutcome {
            rounds: round,
            bytes_sent: self.prog.bytes_sent,
            pages_sent: self.pages_sent,
            zero_pages: self.zero_pages,
            full_pages: self.full_pages,
            delta_pages: self.delta_pages,
            downtime_ms: ms(downtime),
            total_ms: ms(started.elapsed()),
            max_throttle_percent: self.max_throttle,
            digest,
        })
    }

    /// Starts a background digest unless one is still running: the guest then only has to
    /// rehash pages written after it. Its result is not used (memory keeps changing).
    fn warm_digest(&mut self) {
        if self.warm.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let guest = self.guest.clone();
        self.warm = Some(tokio::task::spawn_blocking(move || guest.memory_digest()));
    }

    async fn handshake(&mut self) -> Result<(), MigrationError> {
        let mut hello = Vec::with_capacity(16);
        hello.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        hello.extend_from_slice(&self.memory_pages.to_le_bytes());
        hello.extend_from_slice(&self.guest.spec().vcpus.to_le_bytes());
        let mut out = stream_header().to_vec();
        out.extend_from_slice(&frame(K_HELLO, &hello));
        self.send_frame_bytes(out).await?;
        self.flush().await?;
        let cancel = self.cancel.clone();
        tokio::select! {
            r = read_stream_header(&mut self.stream) => r?,
            _ = cancel.cancelled() => return Err(MigrationError::Cancelled),
        }
        let (kind, payload) = self.read_reply("HelloAck").await?;
        match kind {
            K_HELLO_ACK => {
                if payload.len() != 12 {
                    return Err(proto("HelloAck: bad length"));
                }
                let page_size =
                    u32::from_le_bytes(payload[0..4].try_into().map_err(|_| proto("short field"))?) as usize;
                let pages = u64::from_le_bytes(payload[4..12].try_into().map_err(|_| proto("short field"))?);
                if page_size != PAGE_SIZE || pages != self.memory_pages {
                    return Err(MigrationError::Handshake(format!(
                        "destination guest has {pages} pages of {page_size} bytes, source {} of {PAGE_SIZE}",
                        self.memory_pages
                    )));
                }
                Ok(())
            }
            K_FAILED => Err(MigrationError::Handshake(parse_reason(&payload))),
            other => Err(proto(format!("expected HelloAck, got frame kind {other:#04x}"))),
        }
    }

    /// Reads the next frame from the destination (cancellable).
    async fn read_reply(&mut self, what: &str) -> Result<(u8, Vec<u8>), MigrationError> {
        let mut payload = Vec::new();
        let cancel = self.cancel.clone();
        let kind = tokio::select! {
            r = read_frame(&mut self.stream, &mut payload) => r?,
            _ = cancel.cancelled() => return Err(MigrationError::Cancelled),
        };
        match kind {
            Some(k) => Ok((k, payload)),
            None => Err(proto(format!("destination closed the stream before {what}"))),
        }
    }

    /// Expected bytes and downtime for copying `pages` dirty pages now.
    fn estimate(&self, pages: u64, round: u32) -> (u64, u64) {
        let per_page = if round <= 1 || self.round_pages == 0 {
            (PAGE_SIZE + ENTRY_HEADER) as u64
        } else {
            (self.round_bytes / self.round_pages).clamp(ENTRY_HEADER as u64, (PAGE_SIZE + ENTRY_HEADER) as u64)
        };
        let bytes = pages * per_page;
        let bw = self.bandwidth();
        let downtime = if bytes == 0 {
            0
        } else if bw <= 0.0 {
            u64::MAX
        } else {
            (bytes as f64 / bw * 1000.0).ceil() as u64
        };
        (bytes, downtime)
    }

    fn bandwidth(&self) -> f64 {
        if self.bw_secs > 0.0 {
            self.bw_bytes / self.bw_secs
        } else {
            0.0
        }
    }

    /// Decides on non-convergence at the end of `round`. Returns whether the throttle was raised
    /// (the caller then restarts its shrink history).
    fn converge_step(&mut self, history: &mut [u64], round: u32) -> Result<bool, MigrationError> {
        let window = self.window_elapsed();
        match converge_policy(&self.config, self.throttle, history, window, round) {
            Converge::Keep => Ok(false),
            Converge::Stalled(why) => self.raise_throttle(why),
        }
    }

    /// How long the current convergence window has run (since round 1 ended, or the last
    /// throttle step).
    fn window_elapsed(&self) -> Option<Duration> {
        self.last_step.or(self.window_start).map(|t| t.elapsed())
    }

    fn window_timed_out(&self) -> bool {
        self.window_elapsed().is_some_and(|d| d >= Duration::from_millis(self.config.converge_check_ms))
    }

    fn raise_throttle(&mut self, why: String) -> Result<bool, MigrationError> {
        let Some(throttle) = next_throttle(&self.config, self.throttle, &why)? else { return Ok(false) };
        self.throttle = throttle;
        self.max_throttle = self.max_throttle.max(self.throttle);
        self.guest.set_throttle(self.throttle);
        self.last_step = Some(Instant::now());
        self.prog.throttle_percent = self.throttle;
        self.set_phase(Phase::Converging);
        self.publish();
        tracing::info!(throttle = self.throttle, reason = %why, "auto-converge: throttling guest");
        Ok(true)
    }

    /// Sends `pages` (an iterator of `total` page numbers) in `Pages` frames.
    async fn send_round(
        &mut self,
        round: u32,
        pages: impl Iterator<Item = u64>,
        total: u64,
        first: bool,
    ) -> Result<(), MigrationError> {
        let round_start = Instant::now();
        let bytes_before = self.prog.bytes_sent;
        let mut left = total;
        let mut count = 0usize;
        self.begin_pages(round);
        for page in pages {
            self.encode_page(page)?;
            count += 1;
            left -= 1;
            if count == MAX_PAGES_PER_FRAME {
                self.finish_pages(count).await?;
                count = 0;
                self.begin_pages(round);
                self.prog.pages_remaining = left;
                self.publish();
                self.check_cancel()?;
                // A round that runs past the convergence window is a convergence failure
                // (or a throttle step) without waiting for its end.
                if !first && self.phase_allows_midround_check() && self.window_timed_out() {
                    let why = format!("no convergence within {} ms", self.config.converge_check_ms);
                    self.raise_throttle(why)?;
                }
            }
        }
        if count > 0 {
            self.finish_pages(count).await?;
        }
        self.flush().await?;
        let secs = round_start.elapsed().as_secs_f64();
        let bytes = self.prog.bytes_sent - bytes_before;
        self.round_bytes = bytes;
        self.round_pages = total;
        // Decayed sums: recent rounds weigh more, a big round 1 still anchors tiny later rounds.
        self.bw_bytes = self.bw_bytes * 0.5 + bytes as f64;
        self.bw_secs = self.bw_secs * 0.5 + secs;
        self.prog.bandwidth_bytes_per_sec = self.bandwidth();
        self.prog.pages_remaining = 0;
        self.publish();
        Ok(())
    }

    fn phase_allows_midround_check(&self) -> bool {
        matches!(self.prog.phase, Phase::Precopy | Phase::Converging)
    }

    fn begin_pages(&mut self, round: u32) {
        self.buf.clear();
        self.buf.push(K_PAGES);
        self.buf.extend_from_slice(&[0; 4]);
        self.buf.extend_from_slice(&round.to_le_bytes());
        self.buf.extend_from_slice(&[0; 2]);
    }

    async fn finish_pages(&mut self, count: usize) -> Result<(), MigrationError> {
        let len = (self.buf.len() - FRAME_HEADER) as u32;
        self.buf[1..5].copy_from_slice(&len.to_le_bytes());
        self.buf[FRAME_HEADER + 4..FRAME_HEADER + 6].copy_from_slice(&(count as u16).to_le_bytes());
        let buf = std::mem::take(&mut self.buf);
        let r = self.send_frame_bytes_ref(&buf).await;
        self.buf = buf;
        r
    }

    fn encode_page(&mut self, page: u64) -> Result<(), MigrationError> {
        self.pages_sent += 1;
        // The zero map is tracked (no scan); a page that reads back all-zero is zero as well.
        let zero = if self.guest.is_zero_page(page)? {
            true
        } else {
            self.guest.read_page(page, &mut self.page)?;
            is_zero(&self.page)
        };
        self.buf.extend_from_slice(&page.to_le_bytes());
        if zero {
            self.buf.push(ENC_ZERO);
            self.cache.remove(page);
            self.zero_pages += 1;
            return Ok(());
        }
        let delta_ok = match self.cache.get(page) {
            Some(old) => xor_encode(&self.page, old, &mut self.delta, PAGE_SIZE - 3),
            None => false,
        };
        if delta_ok {
            self.buf.push(ENC_XOR);
            self.buf.extend_from_slice(&(self.delta.len() as u16).to_le_bytes());
            self.buf.extend_from_slice(&self.delta);
            self.delta_pages += 1;
        } else {
            self.buf.push(ENC_FULL);
            self.buf.extend_from_slice(&self.page);
            self.full_pages += 1;
        }
        self.cache.insert(page, &self.page);
        Ok(())
    }

    async fn send_frame_bytes(&mut self, bytes: Vec<u8>) -> Result<(), MigrationError> {
        self.send_frame_bytes_ref(&bytes).await
    }

    /// Writes whole frames; cancellable (an interrupted write poisons the stream).
    async fn send_frame_bytes_ref(&mut self, bytes: &[u8]) -> Result<(), MigrationError> {
        self.check_cancel()?;
        if self.poisoned {
            return Err(proto("stream is mid-frame after an interrupted write"));
        }
        self.poisoned = true;
        let cancel = self.cancel.clone();
        let result = {
            let write = self.stream.write_all(bytes);
            tokio::pin!(write);
            tokio::select! {
                r = &mut write => r.map_err(MigrationError::from),
                _ = cancel.cancelled() => {
                    // Finish the frame in flight (bounded), so the destination can still be told
                    // to Abort at a frame boundary instead of seeing a torn frame.
                    match tokio::time::timeout(Duration::from_millis(500), &mut write).await {
                        Ok(Ok(())) => Err(MigrationError::Cancelled),
                        _ => return Err(MigrationError::Cancelled),
                    }
                }
            }
        };
        // The whole frame went out (possibly followed by a cancel).
        self.poisoned = false;
        self.prog.bytes_sent += bytes.len() as u64;
        result
    }

    async fn flush(&mut self) -> Result<(), MigrationError> {
        let cancel = self.cancel.clone();
        tokio::select! {
            r = self.stream.flush() => r?,
            _ = cancel.cancelled() => return Err(MigrationError::Cancelled),
        }
        Ok(())
    }

    fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.cancel.is_cancelled() {
            Err(MigrationError::Cancelled)
        } else {
            Ok(())
        }
    }

    fn set_phase(&mut self, phase: Phase) {
        if !self.prog.phase.is_final() && phase.rank() >= self.prog.phase.rank() {
            self.prog.phase = phase;
        }
    }

    fn publish(&self) {
        self.progress.send_replace(self.prog.clone());
    }

    /// Leaves the source guest as it was: dirty log off, throttle 0, resumed if we paused it;
    /// tells the destination to abort when the stream is still usable.
    async fn cleanup(&mut self, err: &MigrationError) {
        if self.dirty_logging {
            self.guest.stop_dirty_log();
            self.dirty_logging = false;
        }
        self.guest.set_throttle(0);
        self.throttle = 0;
        self.prog.throttle_percent = 0;
        if self.paused_by_us {
            if let Err(e) = self.guest.resume() {
                tracing::error!(error = %e, "migration: could not resume the source guest");
            }
            self.paused_by_us = false;
        }
        if !self.poisoned && !matches!(err, MigrationError::Remote(_) | MigrationError::Io(_)) {
            let abort = reason_frame(K_ABORT, &err.to_string());
            let send = async {
                self.stream.write_all(&abort).await?;
                self.stream.flush().await
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), send).await;
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), self.stream.shutdown()).await;
        self.set_phase(if matches!(err, MigrationError::Cancelled) { Phase::Cancelled } else { Phase::Failed });
        self.publish();
    }
}

// ---------------------------------------------------------------------------------------------
// Destination
// ---------------------------------------------------------------------------------------------

/// Receives a migration into `guest` (created, not running). On `Ok` the guest holds the source's
/// memory and vCPU state with matching digests and has told the source `Ready`; it is NOT started:
/// the caller starts it (`start()`, Created → Running) only after the ownership change is committed. On `Err` (including the
/// source's `Abort` or the stream ending before completion) the guest is left unstarted, to be
/// discarded.
pub async fn migrate_destination<S: AsyncRead + AsyncWrite + Unpin>(
    guest: Arc<dyn GuestDriver>,
    mut stream: S,
    progress: watch::Sender<MigrationProgress>,
) -> Result<DestinationOutcome, MigrationError> {
    let started = Instant::now();
    let mut dst = Destination {
        guest,
        prog: MigrationProgress::default(),
        progress,
        memory_pages: 0,
        pages: 0,
        zero: 0,
        full: 0,
        delta: 0,
        page: vec![0; PAGE_SIZE],
        zeros: vec![0; PAGE_SIZE],
    };
    dst.progress.send_replace(dst.prog.clone());
    let result = dst.run(&mut stream, started).await;
    match &result {
        Ok(o) => {
            dst.prog.phase = Phase::Done;
            tracing::info!(rounds = o.rounds, bytes = o.bytes_received, "migration destination ready");
        }
        Err(e) => {
            // Tell the source why, unless the failure is the source's own doing or the stream is gone.
            if !matches!(e, MigrationError::Aborted(_) | MigrationError::Io(_) | MigrationError::DigestMismatch { .. })
            {
                let f = reason_frame(K_FAILED, &e.to_string());
                let send = async {
                    stream.write_all(&f).await?;
                    stream.flush().await
                };
                let _ = tokio::time::timeout(Duration::from_secs(1), send).await;
            }
            dst.prog.phase = if matches!(e, MigrationError::Aborted(_)) { Phase::Cancelled } else { Phase::Failed };
            tracing::warn!(error = %e, "migration destination failed; guest left unstarted");
        }
    }
    dst.progress.send_replace(dst.prog.clone());
    result
}

struct Destination {
    guest: Arc<dyn GuestDriver>,
    prog: MigrationProgress,
    progress: watch::Sender<MigrationProgress>,
    memory_pages: u64,
    pages: u64,
    zero: u64,
    full: u64,
    delta: u64,
    page: Vec<u8>,
    zeros: Vec<u8>,
}

/// One validated page of a `Pages` frame.
struct Entry<'a> {
    page: u64,
    enc: u8,
    data: &'a [u8],
}

impl Destination {
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        started: Instant,
    ) -> Result<DestinationOutcome, MigrationError> {
        read_stream_header(stream).await?;
        stream.write_all(&stream_header()).await?;
        let mut payload = Vec::with_capacity(MAX_PAGES_PAYLOAD);
        match read_frame(stream, &mut payload).await? {
            Some(K_HELLO) => {}
            Some(k) => return Err(proto(format!("expected Hello, got frame kind {k:#04x}"))),
            None => return Err(proto("source closed the stream before Hello")),
        }
        if payload.len() != 16 {
            return Err(proto("Hello: bad length"));
        }
        let page_size = u32::from_le_bytes(payload[0..4].try_into().map_err(|_| proto("short field"))?) as usize;
        let pages = u64::from_le_bytes(payload[4..12].try_into().map_err(|_| proto("short field"))?);
        let spec = self.guest.spec();
        let state = self.guest.state();
        if page_size != PAGE_SIZE || pages != spec.memory_pages {
            return Err(MigrationError::Handshake(format!(
                "source guest has {pages} pages of {page_size} bytes, destination {} of {PAGE_SIZE}",
                spec.memory_pages
            )));
        }
        if state == RunState::Running {
            return Err(MigrationError::Handshake("destination guest is already running".into()));
        }
        self.memory_pages = spec.memory_pages;
        let mut ack = Vec::with_capacity(12);
        ack.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        ack.extend_from_slice(&spec.memory_pages.to_le_bytes());
        stream.write_all(&frame(K_HELLO_ACK, &ack)).await?;
        stream.flush().await?;
        self.prog.bytes_sent = (6 + FRAME_HEADER + 16) as u64;

        let mut vcpu_loaded = false;
        loop {
            let kind = read_frame(stream, &mut payload).await?;
            let Some(kind) = kind else {
                return Err(proto("source closed the stream before completing the migration"));
            };
            self.prog.bytes_sent += (FRAME_HEADER + payload.len()) as u64;
            match kind {
                K_PAGES => {
                    let (round, entries) = self.validate_pages(&payload)?;
                    self.apply(&entries)?;
                    if round > self.prog.round {
                        self.prog.round = round;
                    }
                    self.progress.send_replace(self.prog.clone());
                }
                K_VCPU => {
                    self.guest.load_vcpu_state(&payload)?;
                    vcpu_loaded = true;
                    if self.prog.phase.rank() < Phase::StopAndCopy.rank() {
                        self.prog.phase = Phase::StopAndCopy;
                    }
                    self.progress.send_replace(self.prog.clone());
                }
                K_COMPLETE => {
                    let src_digest = parse_digest(&payload, "Complete")?;
                    if !vcpu_loaded {
                        return Err(proto("Complete before the vCPU state"));
                    }
                    // The guest hashed each page as it was written (`write_page`), so this is a pass
                    // over the page-hash table, not over memory.
                    let guest = self.guest.clone();
                    let digest = tokio::task::spawn_blocking(move || guest.memory_digest())
                        .await
                        .map_err(|e| MigrationError::Guest(format!("digest task: {e}")))?;
                    if digest != src_digest {
                        let err =
                            MigrationError::DigestMismatch { src_digest: hex(&src_digest), dst_digest: hex(&digest) };
                        stream.write_all(&reason_frame(K_FAILED, &err.to_string())).await?;
                        stream.flush().await?;
                        return Err(err);
                    }
                    stream.write_all(&frame(K_READY, &digest)).await?;
                    stream.flush().await?;
                    return Ok(DestinationOutcome {
                        rounds: self.prog.round,
                        bytes_received: self.prog.bytes_sent,
                        pages_received: self.pages,
                        zero_pages: self.zero,
                        full_pages: self.full,
                        delta_pages: self.delta,
                        total_ms: ms(started.elapsed()),
                        digest,
                    });
                }
                K_SYNC => {
                    stream.write_all(&frame(K_SYNC_ACK, &[])).await?;
                    stream.flush().await?;
                }
                K_ABORT => return Err(MigrationError::Aborted(parse_reason(&payload))),
                other => return Err(proto(format!("unexpected frame kind {other:#04x} at the destination"))),
            }
        }
    }

    /// Parses and checks a whole `Pages` frame; nothing is applied unless all of it is valid.
    fn validate_pages<'a>(&self, p: &'a [u8]) -> Result<(u32, Vec<Entry<'a>>), MigrationError> {
        if p.len() < PAGES_HEADER {
            return Err(proto("Pages: truncated header"));
        }
        let round = u32::from_le_bytes(p[0..4].try_into().map_err(|_| proto("short field"))?);
        let count = u16::from_le_bytes(p[4..6].try_into().map_err(|_| proto("short field"))?) as usize;
        if count == 0 || count > MAX_PAGES_PER_FRAME {
            return Err(proto(format!("Pages: {count} pages in one frame")));
        }
        let mut entries = Vec::with_capacity(count);
        let mut pos = PAGES_HEADER;
        let take = |pos: &mut usize, n: usize| -> Result<&'a [u8], MigrationError> {
            let s = p.get(*pos..*pos + n).ok_or_else(|| proto("Pages: truncated entry"))?;
            *pos += n;
            Ok(s)
        };
        for _ in 0..count {
            let page = u64::from_le_bytes(take(&mut pos, 8)?.try_into().map_err(|_| proto("short field"))?);
            if page >= self.memory_pages {
                return Err(proto(format!("Pages: page {page} beyond {} pages", self.memory_pages)));
            }
            let enc = take(&mut pos, 1)?[0];
            let data = match enc {
                ENC_ZERO => &[][..],
                ENC_FULL => take(&mut pos, PAGE_SIZE)?,
                ENC_XOR => {
                    let len =
                        u16::from_le_bytes(take(&mut pos, 2)?.try_into().map_err(|_| proto("short field"))?) as usize;
                    if len >= PAGE_SIZE {
                        return Err(proto("Pages: xor delta larger than a page"));
                    }
                    let d = take(&mut pos, len)?;
                    xor_apply(d, None)?;
                    d
                }
                other => return Err(proto(format!("Pages: unknown page encoding {other}"))),
            };
            entries.push(Entry { page, enc, data });
        }
        if pos != p.len() {
            return Err(proto("Pages: trailing bytes after the last entry"));
        }
        Ok((round, entries))
    }

    fn apply(&mut self, entries: &[Entry<'_>]) -> Result<(), MigrationError> {
        for e in entries {
            match e.enc {
                ENC_ZERO => {
                    if !self.guest.is_zero_page(e.page)? {
                        self.guest.write_page(e.page, &self.zeros)?;
                    }
                    self.zero += 1;
                }
                ENC_FULL => {
                    self.guest.write_page(e.page, e.data)?;
                    self.full += 1;
                }
                _ => {
                    // XOR against what this page holds now: the copy the source sent last.
                    self.guest.read_page(e.page, &mut self.page)?;
                    xor_apply(e.data, Some(&mut self.page))?;
                    self.guest.write_page(e.page, &self.page)?;
                    self.delta += 1;
                }
            }
            self.pages += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::guest::{GuestSpec, MemoryCheck, SimulatedGuest, WorkloadPattern, WorkloadStats};
    use tokio::io::DuplexStream;

    const MIB: u64 = 1 << 20;

    #[test]
    fn converge_policy_unthrottled_needs_ten_percent_over_the_check_rounds() {
        let cfg = MigrationConfig::default(); // 3 check rounds, 5 s window
        let w = Some(Duration::from_millis(100));
        assert_eq!(converge_policy(&cfg, 0, &[1000, 950], w, 2), Converge::Keep, "too few rounds to judge");
        assert_eq!(converge_policy(&cfg, 0, &[1000, 950, 899], w, 3), Converge::Keep, "shrank by more than 10%");
        assert!(
            matches!(converge_policy(&cfg, 0, &[1000, 950, 900], w, 3), Converge::Stalled(m) if m.contains("round 3"))
        );
        let late = Some(Duration::from_millis(5_000));
        assert!(matches!(converge_policy(&cfg, 0, &[1000], late, 2), Converge::Stalled(m) if m.contains("5000 ms")));
        assert_eq!(converge_policy(&cfg, 0, &[1000], None, 1), Converge::Keep, "no window before round 1 ends");
    }

    #[test]
    fn converge_policy_throttled_needs_the_remainder_to_halve() {
        let cfg = MigrationConfig::default();
        let w = Some(Duration::from_millis(100));
        assert_eq!(converge_policy(&cfg, 30, &[1000, 500], w, 5), Converge::Keep);
        assert!(matches!(converge_policy(&cfg, 30, &[1000, 501], w, 5), Converge::Stalled(_)));
        assert_eq!(next_throttle(&cfg, 0, "x").unwrap(), Some(THROTTLE_INITIAL));
        assert_eq!(next_throttle(&cfg, 30, "x").unwrap(), Some(50));
        assert_eq!(next_throttle(&cfg, 90, "x").unwrap(), Some(THROTTLE_MAX));
        assert_eq!(next_throttle(&cfg, THROTTLE_MAX, "x").unwrap(), None, "at the ceiling: keep going");
        let off = MigrationConfig { auto_converge: false, ..cfg };
        assert!(
            matches!(next_throttle(&off, 0, "slow"), Err(MigrationError::NotConverging { reason }) if reason == "slow")
        );
    }

    fn spec(pages: u64, pattern: WorkloadPattern, rate: u64) -> GuestSpec {
        GuestSpec { memory_pages: pages, vcpus: 2, pattern, dirty_pages_per_sec: rate, disk_writes_per_sec: 0, seed: 7 }
    }

    struct Run {
        src: Result<SourceOutcome, MigrationError>,
        dst: Result<DestinationOutcome, MigrationError>,
        updates: Vec<MigrationProgress>,
    }

    /// Runs both sides over a duplex (the source's writes optionally rate-limited); `cancel_after`
    /// cancels the source after that long.
    async fn migrate(
        source: Arc<dyn GuestDriver>,
        dest: Arc<dyn GuestDriver>,
        config: MigrationConfig,
        limit: Option<u64>,
        cancel_after: Option<Duration>,
    ) -> Run {
        let (a, b) = tokio::io::duplex(64 << 20);
        let (tx, mut rx) = watch::channel(MigrationProgress::default());
        let collector = tokio::spawn(async move {
            let mut seen = vec![rx.borrow_and_update().clone()];
            while rx.changed().await.is_ok() {
                seen.push(rx.borrow_and_update().clone());
            }
            seen
        });
        let (dtx, _drx) = watch::channel(MigrationProgress::default());
        let dst = tokio::spawn(migrate_destination(dest, b, dtx));
        let cancel = CancelToken::new();
        if let Some(after) = cancel_after {
            let c = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                c.cancel();
            });
        }
        let src = match limit {
            Some(rate) => migrate_source(source, RateLimited::new(a, rate), config, tx, cancel).await,
            None => migrate_source::<DuplexStream>(source, a, config, tx, cancel).await,
        };
        let dst = dst.await.unwrap();
        let updates = collector.await.unwrap();
        Run { src, dst, updates }
    }

    fn assert_monotonic(updates: &[MigrationProgress]) {
        for w in updates.windows(2) {
            assert!(w[1].bytes_sent >= w[0].bytes_sent, "bytes_sent went back: {:?} -> {:?}", w[0], w[1]);
            assert!(w[1].phase.rank() >= w[0].phase.rank(), "phase went back: {:?} -> {:?}", w[0].phase, w[1].phase);
        }
    }

    /// Pauses the destination after `ms` of running and checks its memory.
    fn run_destination_for(dest: &SimulatedGuest, ms: u64) -> (MemoryCheck, WorkloadStats) {
        dest.start().unwrap();
        std::thread::sleep(Duration::from_millis(ms));
        dest.stop().unwrap();
        (dest.check_memory().unwrap(), dest.workload_stats())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_guest_migrates_quickly_and_zero_pages_are_free() {
        let pages = 64 * MIB / PAGE_SIZE as u64;
        let s = spec(pages, WorkloadPattern::Uniform, 0);
        let source = SimulatedGuest::new(s.clone());
        source.step(1000);
        source.start().unwrap();
        let dest = SimulatedGuest::new(s);
        let run = migrate(source.clone(), dest.clone(), MigrationConfig::default(), None, None).await;
        let out = run.src.unwrap();
        let din = run.dst.unwrap();
        println!("idle 64 MiB: {out:?}");
        assert!((1..=2).contains(&out.rounds), "{} rounds", out.rounds);
        assert_eq!(out.digest, din.digest);
        assert_eq!(out.digest, dest.memory_digest());
        assert_eq!(source.state(), RunState::Paused, "source stays paused until the caller commits");
        assert!(out.bytes_sent < 64 * MIB / 10, "sent {} bytes for a mostly-zero 64 MiB guest", out.bytes_sent);
        assert!(out.zero_pages >= pages - 1000);
        assert_eq!(out.pages_sent, out.zero_pages + out.full_pages + out.delta_pages);
        assert_eq!(din.pages_received, out.pages_sent);
        assert_eq!(din.bytes_received, out.bytes_sent);
        assert_monotonic(&run.updates);
        assert_eq!(run.updates.last().unwrap().phase, Phase::Done);

        // Caller's side of the contract: commit, stop the source, start the destination.
        source.stop().unwrap();
        let (check, stats) = run_destination_for(&dest, 0);
        assert_eq!(check.last_seq, 1000);
        assert_eq!(stats.last_seq, 1000);
        dest.step(5);
        assert_eq!(dest.check_memory().unwrap().last_seq, 1005, "the workload's sequence continues");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn guest_under_steady_workload_migrates() {
        let s = spec(4096, WorkloadPattern::HotSet { hot_pages: 1024 }, 5000);
        let source = SimulatedGuest::new(s.clone());
        source.start().unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let dest = SimulatedGuest::new(s);
        let run = migrate(source.clone(), dest.clone(), MigrationConfig::default(), None, None).await;
        let out = run.src.unwrap();
        let din = run.dst.unwrap();
        println!("steady workload 16 MiB: {out:?}");
        assert_eq!(out.digest, din.digest);
        assert_eq!(source.state(), RunState::Paused);
        assert_eq!(source.workload_stats().throttle_percent, 0);
        let src_seq = source.workload_stats().last_seq;
        assert!(src_seq > 0);
        source.stop().unwrap();
        let (check, stats) = run_destination_for(&dest, 100);
        assert!(stats.last_seq > src_seq, "destination continued from seq {src_seq} to {}", stats.last_seq);
        assert_eq!(check.last_seq, stats.last_seq);
        assert_monotonic(&run.updates);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_guest_under_load_has_short_downtime() {
        // 256 MiB, nearly every page written, 2000 pages/s while migrating. Neither side scans all
        // memory while the guest is paused (the source's digest was warmed during pre-copy, the
        // destination hashed pages as they arrived). Run alone to read the figure; the bound is
        // loose because CI machines vary. Most of what remains is the destination applying the
        // pre-copy frames still buffered in the 64 MiB duplex when the source pauses.
        let pages = 256 * MIB / PAGE_SIZE as u64;
        let s = spec(pages, WorkloadPattern::Uniform, 2000);
        let source = SimulatedGuest::new(s.clone());
        source.step(2 * pages);
        source.start().unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let dest = SimulatedGuest::new(s);
        let run = migrate(source.clone(), dest.clone(), MigrationConfig::default(), None, None).await;
        let out = run.src.unwrap();
        let din = run.dst.unwrap();
        println!("256 MiB @2000 pages/s: downtime {} ms, {out:?}", out.downtime_ms);
        assert_eq!(out.digest, din.digest);
        assert_eq!(dest.memory_digest(), source.memory_digest());
        assert!(out.downtime_ms < 250, "downtime {} ms", out.downtime_ms);
        source.stop().unwrap();
        run_destination_for(&dest, 20);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn auto_converge_throttles_a_fast_writer_until_it_fits() {
        let s = spec(2048, WorkloadPattern::Uniform, 20_000);
        let source = SimulatedGuest::new(s.clone());
        source.start().unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let dest = SimulatedGuest::new(s);
        let config = MigrationConfig { converge_check_ms: 2000, ..MigrationConfig::default() };
        let run = migrate(source.clone(), dest.clone(), config, Some(20 * MIB), None).await;
        let out = run.src.unwrap();
        let din = run.dst.unwrap();
        println!("auto-converge 8 MiB @20 MiB/s: {out:?}");
        assert!(out.max_throttle_percent >= THROTTLE_INITIAL);
        // Pages logged dirty by a write that happened before this round read them are unchanged
        // since they were sent: they go as (empty) XOR deltas.
        assert!(out.delta_pages > 0, "{out:?}");
        assert_eq!(din.delta_pages, out.delta_pages);
        assert!(run.updates.iter().any(|u| u.phase == Phase::Converging && u.throttle_percent > 0));
        assert_eq!(out.digest, din.digest);
        assert_eq!(source.workload_stats().throttle_percent, 0, "throttle reset after the migration");
        assert_monotonic(&run.updates);
        source.stop().unwrap();
        run_destination_for(&dest, 20);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_auto_converge_a_fast_writer_is_refused() {
        let s = spec(2048, WorkloadPattern::Uniform, 20_000);
        let source = SimulatedGuest::new(s.clone());
        source.start().unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let dest = SimulatedGuest::new(s);
        let config = MigrationConfig { auto_converge: false, ..MigrationConfig::default() };
        let started = Instant::now();
        let run = migrate(source.clone(), dest.clone(), config, Some(20 * MIB), None).await;
        let elapsed = started.elapsed();
        let err = run.src.unwrap_err();
        println!("no auto-converge: {err} after {elapsed:?}, {:?}", run.updates.last());
        assert!(matches!(err, MigrationError::NotConverging { .. }), "{err:?}");
        assert!(run.updates.last().unwrap().round <= 3, "gave up in round {}", run.updates.last().unwrap().round);
        assert!(elapsed < Duration::from_secs(6));
        assert_eq!(source.state(), RunState::Running);
        assert_eq!(source.workload_stats().throttle_percent, 0);
        assert!(source.take_dirty().is_empty(), "dirty log stopped");
        assert!(matches!(run.dst, Err(MigrationError::Aborted(_))), "{:?}", run.dst);
        assert_eq!(dest.state(), RunState::Created);
        assert_eq!(run.updates.last().unwrap().phase, Phase::Failed);
        source.stop().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancel_mid_migration_leaves_the_source_running() {
        let s = spec(4096, WorkloadPattern::Uniform, 2000);
        let source = SimulatedGuest::new(s.clone());
        source.step(4000);
        source.start().unwrap();
        let dest = SimulatedGuest::new(s);
        let run = migrate(
            source.clone(),
            dest.clone(),
            MigrationConfig::default(),
            Some(20 * MIB),
            Some(Duration::from_millis(150)),
        )
        .await;
        assert!(matches!(run.src, Err(MigrationError::Cancelled)), "{:?}", run.src);
        assert!(matches!(run.dst, Err(MigrationError::Aborted(_))), "destination must fail: {:?}", run.dst);
        println!("cancel: destination saw {:?}", run.dst.unwrap_err());
        assert_eq!(source.state(), RunState::Running);
        assert_eq!(source.workload_stats().throttle_percent, 0);
        assert_eq!(dest.state(), RunState::Created);
        assert_eq!(run.updates.last().unwrap().phase, Phase::Cancelled);
        assert_monotonic(&run.updates);
        source.stop().unwrap();
        source.check_memory().unwrap();
    }

    /// A paused guest whose "workload" rewrites a few bytes of some pages each time the dirty log
    /// is read: the partial writes that XOR deltas are for (the simulated workload rewrites whole
    /// pages, where a delta is never smaller than the page).
    struct Scribbler {
        inner: Arc<SimulatedGuest>,
        calls: std::sync::atomic::AtomicU64,
    }

    impl GuestDriver for Scribbler {
        fn spec(&self) -> GuestSpec {
            self.inner.spec()
        }
        fn state(&self) -> RunState {
            self.inner.state()
        }
        fn start(&self) -> Result<(), GuestError> {
            self.inner.start()
        }
        fn pause(&self) -> Result<(), GuestError> {
            self.inner.pause()
        }
        fn resume(&self) -> Result<(), GuestError> {
            self.inner.resume()
        }
        fn stop(&self) -> Result<(), GuestError> {
            self.inner.stop()
        }
        fn start_dirty_log(&self) {
            self.inner.start_dirty_log()
        }
        fn take_dirty(&self) -> Vec<u64> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            let mut buf = vec![0u8; PAGE_SIZE];
            for page in (0..self.inner.spec().memory_pages).step_by(8) {
                self.inner.read_page(page, &mut buf).unwrap();
                buf[100 + (call as usize % 64)] ^= 0x5a;
                buf[3000] = call as u8;
                self.inner.write_page(page, &buf).unwrap();
            }
            self.inner.take_dirty()
        }
        fn stop_dirty_log(&self) {
            self.inner.stop_dirty_log()
        }
        fn read_page(&self, page: u64, out: &mut [u8]) -> Result<(), GuestError> {
            self.inner.read_page(page, out)
        }
        fn write_page(&self, page: u64, data: &[u8]) -> Result<(), GuestError> {
            self.inner.write_page(page, data)
        }
        fn is_zero_page(&self, page: u64) -> Result<bool, GuestError> {
            self.inner.is_zero_page(page)
        }
        fn vcpu_state(&self) -> Vec<u8> {
            self.inner.vcpu_state()
        }
        fn load_vcpu_state(&self, state: &[u8]) -> Result<(), GuestError> {
            self.inner.load_vcpu_state(state)
        }
        fn memory_digest(&self) -> [u8; 32] {
            self.inner.memory_digest()
        }
        fn set_throttle(&self, percent: u8) {
            self.inner.set_throttle(percent)
        }
        fn workload_stats(&self) -> WorkloadStats {
            self.inner.workload_stats()
        }
        fn check_memory(&self) -> Result<MemoryCheck, GuestError> {
            self.inner.check_memory()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn xor_deltas_carry_partially_rewritten_pages() {
        let s = spec(1024, WorkloadPattern::Sequential, 0);
        let inner = SimulatedGuest::new(s.clone());
        inner.step(1024);
        inner.start().unwrap();
        inner.pause().unwrap();
        let source = Arc::new(Scribbler { inner: inner.clone(), calls: Default::default() });
        let dest = SimulatedGuest::new(s);
        let run = migrate(source, dest.clone(), MigrationConfig::default(), None, None).await;
        let out = run.src.unwrap();
        let din = run.dst.unwrap();
        println!("xor deltas: {out:?}");
        assert!(out.delta_pages >= 128, "re-sent pages went as deltas: {out:?}");
        assert_eq!(din.delta_pages, out.delta_pages);
        assert_eq!(out.digest, din.digest);
        assert_eq!(dest.memory_digest(), inner.memory_digest());
        // A delta frame is far smaller than the pages it carries.
        let full_bytes = out.full_pages * (PAGE_SIZE + ENTRY_HEADER) as u64;
        assert!(out.bytes_sent < full_bytes + out.delta_pages * 64 + 64 * 1024);
        assert_eq!(inner.state(), RunState::Paused, "a guest paused before the migration stays paused");

        // Without a cache, the same pages go in full.
        let inner2 = SimulatedGuest::new(inner.spec());
        inner2.step(1024);
        inner2.start().unwrap();
        inner2.pause().unwrap();
        let source2 = Arc::new(Scribbler { inner: inner2, calls: Default::default() });
        let dest2 = SimulatedGuest::new(inner.spec());
        let config = MigrationConfig { xbzrle_cache_pages: 0, ..MigrationConfig::default() };
        let out2 = migrate(source2, dest2, config, None, None).await.src.unwrap();
        assert_eq!(out2.delta_pages, 0);
        assert!(out2.bytes_sent > out.bytes_sent + 128 * 4000);
    }

    #[test]
    fn xor_encoding_round_trips_and_rejects_bad_input() {
        let old: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7) as u8).collect();
        let mut new = old.clone();
        for i in [0usize, 1, 5, 200, 201, 203, 4095] {
            new[i] ^= 0xff;
        }
        let mut enc = Vec::new();
        assert!(xor_encode(&new, &old, &mut enc, PAGE_SIZE));
        assert!(enc.len() < 40, "{} bytes", enc.len());
        let mut page = old.clone();
        xor_apply(&enc, Some(&mut page)).unwrap();
        assert_eq!(page, new);
        // Identical pages: empty delta.
        assert!(xor_encode(&old, &old, &mut enc, PAGE_SIZE));
        assert!(enc.is_empty());
        // A whole-page rewrite does not fit the limit.
        let other: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 13 + 1) as u8).collect();
        assert!(!xor_encode(&other, &old, &mut enc, PAGE_SIZE - 3));
        // Malformed: run beyond the page, truncated data, empty data run, overlong varint.
        for bad in [&[0x80, 0x20, 1, 0][..], &[0, 4, 1, 2], &[0, 0], &[0xff, 0xff, 0xff, 0x01, 1, 0], &[0x80]] {
            assert!(matches!(xor_apply(bad, None), Err(MigrationError::Protocol(_))), "{bad:?}");
        }
    }

    /// Runs a destination over hand-written bytes (after a valid handshake when `handshake`).
    async fn feed_destination(
        handshake: bool,
        bytes: Vec<u8>,
    ) -> (Result<DestinationOutcome, MigrationError>, Arc<SimulatedGuest>) {
        let dest = SimulatedGuest::new(spec(16, WorkloadPattern::Uniform, 0));
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let (tx, _rx) = watch::channel(MigrationProgress::default());
        let task = tokio::spawn(migrate_destination(dest.clone(), b, tx));
        if handshake {
            let mut hello = Vec::new();
            hello.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
            hello.extend_from_slice(&16u64.to_le_bytes());
            hello.extend_from_slice(&2u32.to_le_bytes());
            a.write_all(&stream_header()).await.unwrap();
            a.write_all(&frame(K_HELLO, &hello)).await.unwrap();
        }
        let _ = a.write_all(&bytes).await;
        let _ = a.shutdown().await;
        let r = tokio::time::timeout(Duration::from_secs(5), task).await.expect("destination hung").unwrap();
        (r, dest)
    }

    fn pages_frame(entries: &[(u64, u8, Vec<u8>)]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&1u32.to_le_bytes());
        p.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        for (page, enc, data) in entries {
            p.extend_from_slice(&page.to_le_bytes());
            p.push(*enc);
            if *enc == ENC_XOR {
                p.extend_from_slice(&(data.len() as u16).to_le_bytes());
            }
            p.extend_from_slice(data);
        }
        frame(K_PAGES, &p)
    }

    #[tokio::test]
    async fn malformed_frames_are_protocol_errors() {
        let full = vec![0xabu8; PAGE_SIZE];
        let good = (0u64, ENC_FULL, full.clone());
        let mut truncated = pages_frame(std::slice::from_ref(&good));
        truncated.truncate(100);
        let mut oversized = vec![K_PAGES];
        oversized.extend_from_slice(&u32::MAX.to_le_bytes());
        let cases: Vec<(&str, bool, Vec<u8>)> = vec![
            ("garbage", false, b"GET / HTTP/1.1\r\n\r\n".to_vec()),
            ("empty stream", false, Vec::new()),
            ("bad page number", true, pages_frame(&[good.clone(), (16, ENC_FULL, full.clone())])),
            ("truncated frame", true, truncated),
            ("oversized frame", true, oversized),
            ("unknown kind", true, frame(0x42, b"hi")),
            ("unknown encoding", true, pages_frame(&[good.clone(), (1, 9, Vec::new())])),
            ("bad delta", true, pages_frame(&[good.clone(), (1, ENC_XOR, vec![0x80, 0x20, 1, 0])])),
            ("short full page", true, pages_frame(&[(0, ENC_FULL, vec![1; 100])])),
            ("zero pages in frame", true, pages_frame(&[])),
            ("complete before vcpu", true, frame(K_COMPLETE, &[0; 32])),
            ("bad digest length", true, frame(K_COMPLETE, &[0; 3])),
            ("source-bound frame", true, frame(K_READY, &[0; 32])),
            ("bad vcpu state", true, frame(K_VCPU, b"nope")),
        ];
        for (name, handshake, bytes) in cases {
            let (r, dest) = feed_destination(handshake, bytes).await;
            let err = r.expect_err(name);
            let ok = matches!(err, MigrationError::Protocol(_))
                || (name == "bad vcpu state" && matches!(err, MigrationError::Guest(_)));
            assert!(ok, "{name}: {err:?}");
            assert!(dest.is_zero_page(0).unwrap(), "{name}: nothing applied from an invalid frame");
            assert_eq!(dest.state(), RunState::Created);
        }
        // The stream ending cleanly after valid pages is still an error (no Ready).
        let (r, dest) = feed_destination(true, pages_frame(&[good])).await;
        assert!(matches!(r, Err(MigrationError::Protocol(_))), "{r:?}");
        assert!(!dest.is_zero_page(0).unwrap());
        // Abort is reported as such.
        let (r, _) = feed_destination(true, reason_frame(K_ABORT, "operator")).await;
        assert!(matches!(r, Err(MigrationError::Aborted(ref why)) if why == "operator"), "{r:?}");
    }

    #[tokio::test]
    async fn handshake_refuses_a_different_memory_size() {
        let source = SimulatedGuest::new(spec(64, WorkloadPattern::Uniform, 0));
        source.start().unwrap();
        let dest = SimulatedGuest::new(spec(32, WorkloadPattern::Uniform, 0));
        let run = migrate(source.clone(), dest, MigrationConfig::default(), None, None).await;
        assert!(matches!(run.src, Err(MigrationError::Handshake(_))), "{:?}", run.src);
        assert!(matches!(run.dst, Err(MigrationError::Handshake(_))), "{:?}", run.dst);
        assert_eq!(source.state(), RunState::Running);
        source.stop().unwrap();
    }

    #[test]
    fn predict_cases() {
        let gib = 1u64 << 30;
        // Idle guest: one round, downtime ~0.
        let p = predict(gib, 0, gib, 50);
        assert!(p.converges);
        assert_eq!(p.rounds, 1);
        assert_eq!(p.downtime_ms, 0);
        assert_eq!(p.needs_throttle_percent, None);
        assert!((1000..=1001).contains(&p.total_ms), "{p:?}");
        // Dirtying at a tenth of the bandwidth: geometric shrink, a few rounds.
        let p = predict(gib, gib / 10, gib, 50);
        assert!(p.converges, "{p:?}");
        assert!((2..=4).contains(&p.rounds), "{p:?}");
        assert!(p.downtime_ms <= 50);
        assert!(p.total_ms > 1000 && p.total_ms < 1200, "{p:?}");
        // Dirty rate at or above the bandwidth never converges without throttling.
        for dirty in [gib, 2 * gib] {
            let p = predict(gib, dirty, gib, 50);
            assert!(!p.converges, "{p:?}");
            let t = p.needs_throttle_percent.expect("throttling helps");
            assert!(t >= if dirty == gib { 1 } else { 50 }, "{p:?}");
            let d = dirty as f64 * f64::from(100 - t) / 100.0;
            assert!(predict(gib, d as u64, gib, 50).converges);
        }
        // Hopeless: even 99% throttle leaves more than the link can take.
        let p = predict(gib, 10_000 * gib, gib / 1000, 1);
        assert!(!p.converges);
        assert_eq!(p.needs_throttle_percent, None);
        // No bandwidth.
        assert!(!predict(gib, 0, 0, 50).converges);
        // Tiny VM fits in the downtime even with a huge dirty rate.
        assert!(predict(1 << 20, 100 * gib, gib, 50).converges);
    }

    #[test]
    fn config_defaults_and_serde() {
        let c = MigrationConfig::default();
        assert_eq!((c.max_downtime_ms, c.auto_converge, c.max_rounds), (50, true, 30));
        assert_eq!((c.converge_check_rounds, c.converge_check_ms, c.xbzrle_cache_pages), (3, 5000, 16384));
        let parsed: MigrationConfig = serde_json::from_str(r#"{"max_downtime_ms": 10}"#).unwrap();
        assert_eq!(parsed, MigrationConfig { max_downtime_ms: 10, ..c });
        let p = MigrationProgress { phase: Phase::Converging, throttle_percent: 30, ..Default::default() };
        let back: MigrationProgress = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }
}
