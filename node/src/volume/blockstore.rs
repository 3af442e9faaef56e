//! The per-host block store: every volume replica's block versions and local snapshots, kept in
//! the node's RocksDB.
//!
//! This module owns the `blocks` and `volume_meta` column families. It does no networking and
//! knows nothing of the catalog: which replicas exist, who is primary and when a snapshot is
//! taken are decided elsewhere (the device actor and the controllers); this module only stores
//! what it is told and answers reads, diffs and Merkle digests of what it has.
//!
//! # Versions and snapshots
//!
//! Every write a primary accepts carries a write-order sequence number `seq` (strictly increasing
//! per volume, starting at 1; seq 0 is used only by [`BlockStore::rebase`]). A block is stored as
//! versions keyed by seq, and a local snapshot is just a seq point: the view at seq `S` is, for
//! each block, its newest version with seq ≤ `S`. Blocks never written, and versions written as
//! [`BlockContent::Zero`], read as zeros.
//!
//! # Key layout
//!
//! All integers are big-endian so that key order is numeric order.
//!
//! - `blocks`: `vol(8) | block(8) | seq(8)` → where the block's bytes are: a 25-byte
//!   [`ExtentRef`] into the extent segments (`volume::extents`), or an empty value for `Zero`.
//!   A value of exactly the block size is the bytes themselves (stores written before extents,
//!   and [`BlockStore::inject_corruption`]); both read the same. The versions of one block are adjacent and ascending by seq, and the
//!   blocks of one volume are adjacent and ascending, so a range read, a diff or a Merkle tree is
//!   one forward pass.
//! - `volume_meta`:
//!   - `vol(8) | 0x01` → high-water mark, `seq(8)`: the largest seq ever applied. Raised with a
//!     u64-max merge ([`HWM_MERGE_OPERATOR`], installed by `Store::open`) so concurrent applies
//!     need not read it; set with a plain put by rollback and rebase.
//!   - `vol(8) | 0x02 | id(8)` → `seq(8)`: local snapshot `id` at seq point `seq`.
//!   - `vol(8) | 0x03 | key(utf-8)` → caller's bytes ([`BlockStore::meta_put`] and friends).
//!
//! # Retention invariant
//!
//! Let the distinct snapshot seqs be `S1 < S2 < … < Sk`; they cut the seq line into intervals
//! `[0, S1], (S1, S2], …, (Sk, ∞)`. For each block the store keeps exactly the newest version in
//! each interval that has one: the newest one in `(Sj-1, Sj]` is what snapshot `Sj` sees (older
//! intervals' maxima are shadowed only if this one is non-empty), and the newest one in the last
//! interval is the current content. Every other version is invisible to every view and is deleted
//! (or never written) by [`BlockStore::apply`]; deleting a snapshot merges two intervals and
//! deletes the loser. A version is only ever dropped because a *newer version in the same
//! interval* is known to be stored (or written in the same batch).
//!
//! Consequently the views that are exact are the current one and those at local snapshot seqs.
//! A snapshot must be created at a seq point no write above which has been applied yet (in
//! practice: at the current high-water mark, once every write up to it has arrived), otherwise
//! versions it would need may already have been dropped. Likewise [`BlockStore::rollback`] and
//! [`BlockStore::changed_blocks`] are exact at snapshot seqs, the high-water mark and `None`.
//!
//! # Extents and their garbage
//!
//! Block data is appended to segment files, one `pwritev` per apply, before the batch holding its
//! references is written; a durable write syncs the segments before the WAL (see
//! `volume::extents` for the invariants). A reference dropped by retention, rollback, truncation
//! or volume deletion leaves dead bytes behind; [`BlockStore::collect_garbage`] finds sealed
//! segments no reference points into (one scan of the references under a database snapshot)
//! and deletes them after a WAL sync, and moves the live blocks out of mostly dead segments.
//! The background thread of [`BlockStore::start_gc`] runs it once enough has been appended.
//!
//! # Concurrency
//!
//! Each volume has an in-memory snapshot list behind a `RwLock`. `apply` holds it shared while it
//! reads the touched blocks' existing versions, computes what to keep and writes its batch, so
//! several applies on one volume run concurrently but never while the snapshot list changes;
//! snapshot create/delete, rollback, rebase, truncate and delete_volume hold it exclusively.
//! Two concurrent applies may each miss the other's versions. That is harmless because an
//! apply drops a version only when it sees a newer one in the same interval, and that newer one
//! is never dropped unless something newer still in that interval exists: the newest version of
//! each interval over *all* applies is never dropped by anyone. The worst a race can do is leave
//! an unneeded older version behind (each apply thought the other's version was absent); reads
//! always pick the newest eligible version, so it is invisible, and the next apply to that block
//! or the next snapshot delete removes it.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;

use haven_proto::VolumeId;
use rocksdb::{DBRawIterator, MergeOperands, ReadOptions, WriteBatch};

use crate::storage::{Store, CF_BLOCKS, CF_VOLUME_META};
use crate::volume::extents::{AppendGuard, ExtentError, ExtentRef, SegmentReader, Segments, SEGMENT_BYTES};
use crate::volume::merkle::{
    block_hash, chunk_count, chunk_hash, chunk_len, zero_block_hash, zero_chunk_hash, Hash, MerkleTree, CHUNK_BLOCKS,
};

/// Name of the u64-max merge operator `Store::open` installs on `volume_meta`.
pub const HWM_MERGE_OPERATOR: &str = "haven.u64_max";

const TAG_HWM: u8 = 0x01;
const TAG_SNAPSHOT: u8 = 0x02;
const TAG_META: u8 = 0x03;

const BLOCK_KEY_LEN: usize = 24;

/// Rebase rewrites every block; it commits in batches of about this many bytes.
const REBASE_BATCH_BYTES: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BlockStoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt record in {cf}: {reason}")]
    Corrupt { cf: &'static str, reason: String },
    #[error("invalid write: {0}")]
    InvalidWrite(String),
    /// A read or scan asked for something impossible (zero block size, range overflow).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("snapshot {id} of {vol} exists at seq {existing}, not {requested}")]
    SnapshotConflict { vol: VolumeId, id: u64, existing: u64, requested: u64 },
    #[error("block {block} of {vol} was never written")]
    NotWritten { vol: VolumeId, block: u64 },
    #[error(transparent)]
    Extent(#[from] ExtentError),
}

/// Garbage collection is due once this much has been appended since the last one, or as many
/// bytes as it found live, whichever is more: its scan reads every reference, so it runs once
/// per that many bytes written and stays a small share of the work (a profile of 1 MiB writes
/// with a collection every 256 MiB had the collector at 13% of the CPU).
const GC_MIN_APPENDED_BYTES: u64 = 4 * SEGMENT_BYTES;
/// A sealed segment whose live bytes are below this share of its size has them moved out.
const GC_SPARSE_PERCENT: u64 = 50;
/// At most this many live bytes are moved per collection, in batches of [`GC_MOVE_BATCH_BYTES`]
/// (each holds its volume's snapshot lock, so applies to it wait for one batch at most).
const GC_MOVE_MAX_BYTES: u64 = 1 << 30;
const GC_MOVE_BATCH_BYTES: u64 = 4 << 20;
/// How often the background collector checks whether a collection is due.
const GC_POLL: Duration = Duration::from_secs(1);

/// What one [`BlockStore::collect_garbage`] found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Bytes of all segments before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Bytes references point at, in every segment.
    pub live_bytes: u64,
    pub deleted_segments: usize,
    pub moved_bytes: u64,
}

fn corrupt(cf: &'static str, reason: impl Into<String>) -> BlockStoreError {
    BlockStoreError::Corrupt { cf, reason: reason.into() }
}

/// The content of one block version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockContent {
    /// Exactly block-size bytes.
    Data(Vec<u8>),
    /// An all-zero block (stored as an empty value).
    Zero,
    /// Bytes this store already appended to its segments ([`BlockStore::append_blocks`]), so
    /// that applying the write only records the reference. Written, never read back: reads
    /// return `Data`.
    Appended(ExtentRef),
}

/// One block version to store.
#[derive(Debug, Clone)]
pub struct BlockWrite {
    pub block: u64,
    pub seq: u64,
    pub content: BlockContent,
}

/// A write that zeroes `count` blocks from `first` at write-order point `seq` (NBD TRIM and
/// WRITE_ZEROES): stored as Zero versions only for the blocks that hold data when it is applied,
/// so its cost follows the data in the range, not the range's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroRange {
    pub first: u64,
    pub count: u64,
    pub seq: u64,
}

impl ZeroRange {
    /// One past the last block; `None` if the range is empty or its end overflows.
    pub fn end(&self) -> Option<u64> {
        self.first.checked_add(self.count).filter(|_| self.count > 0)
    }
}

/// One write-order point's change to the store, as a replica's sequencer applies it.
#[derive(Debug, Clone)]
pub enum StoreOp {
    Blocks(Vec<BlockWrite>),
    Zero(ZeroRange),
}

/// A local snapshot: the view of the volume at seq point `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LocalSnapshot {
    pub id: u64,
    pub seq: u64,
}

/// The volume's snapshots as cached in memory.
#[derive(Debug, Default)]
struct Snapshots {
    /// Ordered by (seq, id).
    list: Vec<LocalSnapshot>,
    /// The distinct seqs of `list`, ascending: the interval boundaries of the retention rule.
    seqs: Vec<u64>,
}

impl Snapshots {
    fn new(mut list: Vec<LocalSnapshot>) -> Self {
        list.sort_by_key(|s| (s.seq, s.id));
        let mut seqs: Vec<u64> = list.iter().map(|s| s.seq).collect();
        seqs.dedup();
        Self { list, seqs }
    }
}

/// Whether a block with `versions` (seq ascending, `true` = Data) needs a Zero version at `seq`
/// to read as zeroes there: its newest version below `seq` is Data, and no version at `seq` is
/// stored yet (a re-applied range changes nothing).
fn needs_zero(versions: &[(u64, bool)], seq: u64) -> bool {
    let below = versions.partition_point(|v| v.0 < seq);
    let at_seq = versions.get(below).is_some_and(|v| v.0 == seq);
    !at_seq && below > 0 && versions[below - 1].1
}

/// Which retention interval `seq` falls in, given the ascending distinct snapshot seqs: 0 for
/// `[0, S1]`, j for `(Sj, Sj+1]`, k for `(Sk, ∞)`.
fn interval(snap_seqs: &[u64], seq: u64) -> usize {
    snap_seqs.partition_point(|&s| s < seq)
}

/// Given one block's version seqs (ascending, distinct), calls `keep(i, needed)` for each:
/// needed iff it is the newest version of its retention interval.
fn retention(snap_seqs: &[u64], seqs: &[u64], mut keep: impl FnMut(usize, bool)) {
    for (i, &s) in seqs.iter().enumerate() {
        let needed = match seqs.get(i + 1) {
            None => true,
            Some(&next) => interval(snap_seqs, next) != interval(snap_seqs, s),
        };
        keep(i, needed);
    }
}

#[derive(Default)]
struct VolState {
    /// `None` until loaded from disk.
    snaps: RwLock<Option<Snapshots>>,
}

struct Inner {
    store: Store,
    segs: Arc<Segments>,
    vols: Mutex<HashMap<VolumeId, Arc<VolState>>>,
    /// Live bytes the last collection found (what the next one's trigger scales with).
    last_live_bytes: Mutex<u64>,
    /// Set by bulk deletions (rollback, truncate, snapshot and volume deletion): collect soon.
    gc_wanted: std::sync::atomic::AtomicBool,
}

/// How a stored value of a block version reads.
enum Stored<'a> {
    Zero,
    Inline(&'a [u8]),
    Extent(ExtentRef),
}

/// Decode a stored value of `block`@`seq`.
fn decode_value(value: &[u8], block_size: u32, block: u64, seq: u64) -> Result<Stored<'_>, BlockStoreError> {
    if value.is_empty() {
        return Ok(Stored::Zero);
    }
    if value.len() == block_size as usize {
        return Ok(Stored::Inline(value));
    }
    match ExtentRef::decode(value) {
        Some(r) if r.len == block_size => Ok(Stored::Extent(r)),
        Some(r) => Err(corrupt(
            CF_BLOCKS,
            format!("block {block} seq {seq}: extent of {} bytes, block size {block_size}", r.len),
        )),
        None => {
            Err(corrupt(CF_BLOCKS, format!("block {block} seq {seq}: {} bytes, block size {block_size}", value.len())))
        }
    }
}

/// The bytes of a stored value: borrowed when inline, read (and verified) from its segment when an
/// extent, `None` for Zero.
fn resolve<'v>(
    reader: &SegmentReader<'_>,
    value: &'v [u8],
    block_size: u32,
    block: u64,
    seq: u64,
) -> Result<Option<Cow<'v, [u8]>>, BlockStoreError> {
    Ok(match decode_value(value, block_size, block, seq)? {
        Stored::Zero => None,
        Stored::Inline(d) => Some(Cow::Borrowed(d)),
        Stored::Extent(r) => {
            let mut buf = vec![0u8; r.len as usize];
            reader.read(&r, &mut buf)?;
            Some(Cow::Owned(buf))
        }
    })
}

/// A stored value as [`BlockContent`]; a value of unknown block size is taken from its own
/// length (inline) or reference.
fn content_of(reader: &SegmentReader<'_>, value: &[u8], block: u64, seq: u64) -> Result<BlockContent, BlockStoreError> {
    let block_size = ExtentRef::decode(value).map_or(value.len() as u32, |r| r.len);
    Ok(match resolve(reader, value, block_size, block, seq)? {
        None => BlockContent::Zero,
        Some(d) => BlockContent::Data(d.into_owned()),
    })
}

/// The block store of this host. Cheap to clone.
#[derive(Clone)]
pub struct BlockStore {
    inner: Arc<Inner>,
}

// ---- keys ----

pub(crate) fn block_key(vol: VolumeId, block: u64, seq: u64) -> [u8; BLOCK_KEY_LEN] {
    let mut k = [0u8; BLOCK_KEY_LEN];
    k[..8].copy_from_slice(&vol.0.to_be_bytes());
    k[8..16].copy_from_slice(&block.to_be_bytes());
    k[16..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// (block, seq) of a `blocks` key that must belong to `vol`.
pub(crate) fn parse_block_key(vol: VolumeId, key: &[u8]) -> Result<(u64, u64), BlockStoreError> {
    let k: &[u8; BLOCK_KEY_LEN] =
        key.try_into().map_err(|_| corrupt(CF_BLOCKS, format!("block key of {} bytes", key.len())))?;
    if k[..8] != vol.0.to_be_bytes() {
        return Err(corrupt(CF_BLOCKS, format!("key of another volume in the range of {vol}")));
    }
    let block = u64::from_be_bytes([k[8], k[9], k[10], k[11], k[12], k[13], k[14], k[15]]);
    let seq = u64::from_be_bytes([k[16], k[17], k[18], k[19], k[20], k[21], k[22], k[23]]);
    Ok((block, seq))
}

fn vol_prefix(vol: VolumeId) -> Vec<u8> {
    vol.0.to_be_bytes().to_vec()
}

/// The smallest key greater than every key starting with `prefix`; `None` if there is none
/// (the prefix is all 0xFF).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last != 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Exclusive upper key for blocks `< end_block` of `vol` (`None`: to the end of the volume).
fn blocks_upper(vol: VolumeId, end_block: Option<u64>) -> Option<Vec<u8>> {
    match end_block {
        Some(b) => Some(block_key(vol, b, 0).to_vec()),
        None => prefix_end(&vol_prefix(vol)),
    }
}

fn hwm_key(vol: VolumeId) -> Vec<u8> {
    let mut k = vol_prefix(vol);
    k.push(TAG_HWM);
    k
}

fn snapshot_prefix(vol: VolumeId) -> Vec<u8> {
    let mut k = vol_prefix(vol);
    k.push(TAG_SNAPSHOT);
    k
}

fn snapshot_key(vol: VolumeId, id: u64) -> Vec<u8> {
    let mut k = snapshot_prefix(vol);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn meta_key(vol: VolumeId, key: &str) -> Vec<u8> {
    let mut k = vol_prefix(vol);
    k.push(TAG_META);
    k.extend_from_slice(key.as_bytes());
    k
}

fn decode_u64(cf: &'static str, what: &str, v: &[u8]) -> Result<u64, BlockStoreError> {
    let b: [u8; 8] = v.try_into().map_err(|_| corrupt(cf, format!("{what} of {} bytes", v.len())))?;
    Ok(u64::from_be_bytes(b))
}

fn check_block_size(block_size: u32) -> Result<(), BlockStoreError> {
    if block_size == 0 {
        return Err(BlockStoreError::InvalidRequest("block size 0".into()));
    }
    Ok(())
}

/// The u64-max merge operator of the high-water mark (installed on `volume_meta` by
/// `Store::open` under [`HWM_MERGE_OPERATOR`]). It never fails: a failing merge during compaction
/// would stop RocksDB's background work, so malformed input yields an empty (poisoned) value that
/// [`BlockStore::high_water_mark`] reports as corrupt; a later put (rollback, rebase) replaces it.
pub fn hwm_merge(_key: &[u8], existing: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    Some(hwm_merge_values(existing.into_iter().chain(operands.iter())))
}

/// The merge itself, over the existing value (if any) followed by the operands: the largest
/// 8-byte big-endian value, or the empty (poisoned) value if any input is not 8 bytes.
pub(crate) fn hwm_merge_values<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut max = 0u64;
    for v in values {
        match <[u8; 8]>::try_from(v) {
            Ok(b) => max = max.max(u64::from_be_bytes(b)),
            Err(_) => return Vec::new(),
        }
    }
    max.to_be_bytes().to_vec()
}

/// Fill the slots of `out` (`bs` bytes each) that have an extent, reading runs that are
/// contiguous both in `out` and in one segment with one read, then verifying each block.
fn read_extent_runs(
    reader: &SegmentReader<'_>,
    extents: &[Option<ExtentRef>],
    bs: usize,
    out: &mut [u8],
) -> Result<(), BlockStoreError> {
    let mut i = 0;
    while i < extents.len() {
        let Some(first) = extents[i] else {
            i += 1;
            continue;
        };
        let mut run = vec![first];
        while let Some(Some(next)) = extents.get(i + run.len()) {
            let prev = run[run.len() - 1];
            if next.seg != first.seg || next.offset != prev.end() {
                break;
            }
            run.push(*next);
        }
        let bytes = &mut out[i * bs..(i + run.len()) * bs];
        reader.read_raw(first.seg, first.offset, bytes)?;
        for (r, block) in run.iter().zip(bytes.chunks_exact(bs)) {
            crate::volume::extents::verify(r, block)?;
        }
        i += run.len();
    }
    Ok(())
}

/// The Merkle block hash of a stored value. An extent is hashed as read, unverified: a block whose
/// bytes went bad hashes differently, which is how a scrub finds and repairs it.
fn stored_hash(
    reader: &SegmentReader<'_>,
    value: &[u8],
    block_size: u32,
    block: u64,
    seq: u64,
    zero: Hash,
    buf: &mut Vec<u8>,
) -> Result<Hash, BlockStoreError> {
    Ok(match decode_value(value, block_size, block, seq)? {
        Stored::Zero => zero,
        Stored::Inline(d) => block_hash(d),
        Stored::Extent(r) => {
            buf.resize(r.len as usize, 0);
            reader.read_raw(r.seg, r.offset, buf)?;
            block_hash(buf)
        }
    })
}

impl BlockStore {
    /// Open the block store of the database `store`; its extent segments live in the database's
    /// directory under `extents/` (RocksDB ignores files it did not name).
    pub fn open(store: Store) -> Result<Self, BlockStoreError> {
        Self::open_with(store, SEGMENT_BYTES)
    }

    /// [`Self::open`] with segments sealed at `segment_bytes` (tests use tiny ones).
    pub(crate) fn open_with(store: Store, segment_bytes: u64) -> Result<Self, BlockStoreError> {
        let segs = Arc::new(Segments::open(&store.db().path().join("extents"), segment_bytes)?);
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                segs,
                vols: Mutex::new(HashMap::new()),
                last_live_bytes: Mutex::new(0),
                gc_wanted: Default::default(),
            }),
        })
    }

    fn segs(&self) -> &Arc<Segments> {
        &self.inner.segs
    }

    /// Append the bytes of the `Data` writes to the segments now, out of write order, and return
    /// the writes with `Appended` content, to be applied (in order) later: the copy of the bytes
    /// then happens in parallel with other writes instead of inside the volume's ordered apply.
    /// Hold the guard until the apply is done (or given up).
    /// On an error the writes are left as they were.
    pub fn append_blocks(&self, writes: &mut [BlockWrite]) -> Result<Option<AppendGuard>, BlockStoreError> {
        let bufs: Vec<&[u8]> = writes
            .iter()
            .filter_map(|w| match &w.content {
                BlockContent::Data(d) => Some(d.as_slice()),
                _ => None,
            })
            .collect();
        if bufs.is_empty() {
            return Ok(None);
        }
        let (refs, guard) = self.segs().append(&bufs)?;
        let mut refs = refs.into_iter();
        for w in writes.iter_mut().filter(|w| matches!(w.content, BlockContent::Data(_))) {
            w.content = BlockContent::Appended(refs.next().expect("one reference per Data write"));
        }
        Ok(Some(guard))
    }

    fn store(&self) -> &Store {
        &self.inner.store
    }

    fn vol_state(&self, vol: VolumeId) -> Arc<VolState> {
        // Entries are never removed, so every caller for one volume shares one lock.
        let mut vols = self.inner.vols.lock().unwrap_or_else(PoisonError::into_inner);
        vols.entry(vol).or_default().clone()
    }

    fn load_snapshots(&self, vol: VolumeId) -> Result<Snapshots, BlockStoreError> {
        let prefix = snapshot_prefix(vol);
        let mut it = self.iter(CF_VOLUME_META, prefix.clone(), prefix_end(&prefix));
        it.seek(&prefix);
        let mut list = Vec::new();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let id = decode_u64(CF_VOLUME_META, "snapshot key id", k.get(prefix.len()..).unwrap_or_default())?;
            let seq = decode_u64(CF_VOLUME_META, "snapshot seq", v)?;
            list.push(LocalSnapshot { id, seq });
            it.next();
        }
        it.status()?;
        Ok(Snapshots::new(list))
    }

    /// Runs `f` with the volume's snapshot list held shared (loading it first if needed).
    fn with_snapshots<R>(
        &self,
        vol: VolumeId,
        f: impl FnOnce(&Snapshots) -> Result<R, BlockStoreError>,
    ) -> Result<R, BlockStoreError> {
        let state = self.vol_state(vol);
        loop {
            {
                let guard = state.snaps.read().unwrap_or_else(PoisonError::into_inner);
                if let Some(snaps) = guard.as_ref() {
                    return f(snaps);
                }
            }
            let mut guard = state.snaps.write().unwrap_or_else(PoisonError::into_inner);
            if guard.is_none() {
                *guard = Some(self.load_snapshots(vol)?);
            }
        }
    }

    /// Runs `f` with the volume's snapshot list held exclusively (loading it first if needed).
    /// `f` must update the list only after its writes succeeded.
    fn with_snapshots_mut<R>(
        &self,
        vol: VolumeId,
        f: impl FnOnce(&mut Snapshots) -> Result<R, BlockStoreError>,
    ) -> Result<R, BlockStoreError> {
        let state = self.vol_state(vol);
        let mut guard = state.snaps.write().unwrap_or_else(PoisonError::into_inner);
        if guard.is_none() {
            *guard = Some(self.load_snapshots(vol)?);
        }
        f(guard.get_or_insert_with(Snapshots::default))
    }

    /// A raw iterator over `cf` bounded to `[lower, upper)`, not yet positioned.
    fn iter(&self, cf: &'static str, lower: Vec<u8>, upper: Option<Vec<u8>>) -> DBRawIterator<'_> {
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(lower);
        if let Some(upper) = upper {
            opts.set_iterate_upper_bound(upper);
        }
        let store = self.store();
        store.db().raw_iterator_cf_opt(store.cf(cf), opts)
    }

    /// An iterator over the blocks `[first, end)` of `vol` (`end` None: to the end), positioned
    /// at the first key.
    fn block_iter(&self, vol: VolumeId, first: u64, end: Option<u64>) -> DBRawIterator<'_> {
        let lower = block_key(vol, first, 0).to_vec();
        let mut it = self.iter(CF_BLOCKS, lower.clone(), blocks_upper(vol, end));
        it.seek(&lower);
        it
    }

    /// Write `batch`; `durable` syncs the extent segments and then the WAL (data before the
    /// references to it, see `volume::extents`).
    fn write(&self, batch: WriteBatch, durable: bool) -> Result<(), BlockStoreError> {
        if durable {
            self.segs().sync_dirty()?;
        }
        let opts = if durable { Store::durable() } else { Store::relaxed() };
        Ok(self.store().db().write_opt(batch, &opts)?)
    }

    /// Make every block write applied so far durable: fsync the extent segments written since
    /// their last sync, then the block database's WAL (the catalog's is another file, see
    /// `storage`).
    pub fn sync(&self) -> Result<(), BlockStoreError> {
        self.segs().sync_dirty()?;
        Ok(self.store().db().flush_wal(true)?)
    }

    /// Calls `f(block, seqs)` for every block of `vol` in `[first, end)` that has versions, with
    /// its version seqs ascending. Keys only (one forward pass).
    fn scan_versions(
        &self,
        vol: VolumeId,
        first: u64,
        end: Option<u64>,
        mut f: impl FnMut(u64, &[u64]) -> Result<(), BlockStoreError>,
    ) -> Result<(), BlockStoreError> {
        let mut it = self.block_iter(vol, first, end);
        let mut current: Option<u64> = None;
        let mut seqs: Vec<u64> = Vec::new();
        while let Some(k) = it.key() {
            let (block, seq) = parse_block_key(vol, k)?;
            if current != Some(block) {
                if let Some(b) = current {
                    f(b, &seqs)?;
                }
                current = Some(block);
                seqs.clear();
            }
            seqs.push(seq);
            it.next();
        }
        it.status()?;
        if let Some(b) = current {
            f(b, &seqs)?;
        }
        Ok(())
    }

    /// Like [`Self::scan_versions`], with each version's kind (`true`: Data, `false`: Zero).
    fn scan_version_kinds(
        &self,
        vol: VolumeId,
        first: u64,
        end: Option<u64>,
        mut f: impl FnMut(u64, &[(u64, bool)]) -> Result<(), BlockStoreError>,
    ) -> Result<(), BlockStoreError> {
        let mut it = self.block_iter(vol, first, end);
        let mut current: Option<u64> = None;
        let mut versions: Vec<(u64, bool)> = Vec::new();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let (block, seq) = parse_block_key(vol, k)?;
            if current != Some(block) {
                if let Some(b) = current {
                    f(b, &versions)?;
                }
                current = Some(block);
                versions.clear();
            }
            versions.push((seq, !v.is_empty()));
            it.next();
        }
        it.status()?;
        if let Some(b) = current {
            f(b, &versions)?;
        }
        Ok(())
    }

    /// Calls `f(block, content)` for every block of `vol` in `[first, end)` that has a version
    /// visible at `at`, ascending, with that version's stored value (empty for Zero).
    fn scan_view(
        &self,
        vol: VolumeId,
        first: u64,
        end: Option<u64>,
        at: Option<u64>,
        mut f: impl FnMut(u64, u64, &[u8]) -> Result<(), BlockStoreError>,
    ) -> Result<(), BlockStoreError> {
        let mut it = self.block_iter(vol, first, end);
        // The candidate of the current block: a later version of the same block visible at `at`
        // replaces it, so it is handed to `f` only when the next block starts.
        let mut pending: Option<(u64, u64)> = None;
        let mut buf: Vec<u8> = Vec::new();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let (block, seq) = parse_block_key(vol, k)?;
            if at.is_none_or(|at| seq <= at) {
                if let Some((b, s)) = pending {
                    if b != block {
                        f(b, s, &buf)?;
                    }
                }
                pending = Some((block, seq));
                buf.clear();
                buf.extend_from_slice(v);
            }
            it.next();
        }
        it.status()?;
        if let Some((b, s)) = pending {
            f(b, s, &buf)?;
        }
        Ok(())
    }

    /// Apply writes atomically in one RocksDB write batch; `durable` fsyncs the WAL before
    /// returning. Data must be exactly `block_size` bytes. A version whose (block, seq) is
    /// already stored is overwritten identically; within one call the last of several writes
    /// with the same (block, seq) wins. Old versions are pruned per the retention invariant
    /// (module doc) in the same batch, and the volume's high-water mark is raised to the largest
    /// seq in `writes`. Safe to call concurrently for one volume (module doc, Concurrency).
    pub fn apply(
        &self,
        vol: VolumeId,
        block_size: u32,
        writes: &[BlockWrite],
        durable: bool,
    ) -> Result<(), BlockStoreError> {
        self.apply_capped(vol, block_size, writes, durable, u64::MAX)
    }

    /// [`Self::apply`], raising the high-water mark to at most `hwm_cap` (a resync stores
    /// versions newer than the points its copy has applied; see `resync`).
    pub fn apply_capped(
        &self,
        vol: VolumeId,
        block_size: u32,
        writes: &[BlockWrite],
        durable: bool,
        hwm_cap: u64,
    ) -> Result<(), BlockStoreError> {
        if block_size == 0 {
            return Err(BlockStoreError::InvalidWrite("block size 0".into()));
        }
        for w in writes {
            let len = match &w.content {
                BlockContent::Data(d) => d.len(),
                BlockContent::Appended(r) => r.len as usize,
                BlockContent::Zero => continue,
            };
            if len != block_size as usize {
                return Err(BlockStoreError::InvalidWrite(format!(
                    "block {} seq {}: {len} bytes, block size {block_size}",
                    w.block, w.seq,
                )));
            }
        }
        let Some(max_seq) = writes.iter().map(|w| w.seq).max() else {
            return Ok(());
        };
        // Writes by (block, seq); the stable sort keeps the caller's order among duplicates, and
        // the dedup keeps the last of them.
        let mut order: Vec<usize> = (0..writes.len()).collect();
        order.sort_by_key(|&i| (writes[i].block, writes[i].seq));
        let mut deduped: Vec<usize> = Vec::with_capacity(order.len());
        for i in order {
            match deduped.last_mut() {
                Some(last) if (writes[*last].block, writes[*last].seq) == (writes[i].block, writes[i].seq) => *last = i,
                _ => deduped.push(i),
            }
        }

        self.with_snapshots(vol, |snaps| {
            let store = self.store();
            let blocks_cf = store.cf(CF_BLOCKS);
            let mut batch = WriteBatch::default();
            // One iterator for the whole call. Touched blocks are visited ascending, so after a
            // block's versions the iterator already sits on the first key of a later block: it
            // is re-seeked only when that key is before the next touched block (sparse writes).
            let lower = block_key(vol, writes[deduped[0]].block, 0).to_vec();
            let mut it = self.iter(CF_BLOCKS, lower.clone(), blocks_upper(vol, None));
            it.seek(&lower);
            // (seq, index into `writes` if written now, already stored)
            let mut versions: Vec<(u64, Option<usize>, bool)> = Vec::new();
            let mut seqs: Vec<u64> = Vec::new();
            // Data versions to store: (block, seq, index into `writes`); their bytes are appended
            // to the extent segments in one run once the whole call is decided.
            let mut data_puts: Vec<(u64, u64, usize)> = Vec::new();
            let mut start = 0;
            while start < deduped.len() {
                let block = writes[deduped[start]].block;
                let mut end = start;
                while end < deduped.len() && writes[deduped[end]].block == block {
                    end += 1;
                }
                let group = &deduped[start..end];
                start = end;

                let first_key = block_key(vol, block, 0);
                if it.key().is_some_and(|k| k < &first_key[..]) {
                    it.seek(first_key);
                }
                versions.clear();
                let mut next_new = group.iter().peekable();
                while let Some(k) = it.key() {
                    if k[..k.len().min(16)] != first_key[..16] {
                        break;
                    }
                    let (_, seq) = parse_block_key(vol, k)?;
                    while let Some(&&i) = next_new.peek() {
                        if writes[i].seq < seq {
                            versions.push((writes[i].seq, Some(i), false));
                            next_new.next();
                        } else {
                            break;
                        }
                    }
                    match next_new.peek() {
                        Some(&&i) if writes[i].seq == seq => {
                            versions.push((seq, Some(i), true));
                            next_new.next();
                        }
                        _ => versions.push((seq, None, true)),
                    }
                    it.next();
                }
                it.status()?;
                versions.extend(next_new.map(|&i| (writes[i].seq, Some(i), false)));

                seqs.clear();
                seqs.extend(versions.iter().map(|v| v.0));
                retention(&snaps.seqs, &seqs, |idx, needed| {
                    let (seq, new, stored) = versions[idx];
                    match (needed, new) {
                        (true, Some(i)) => match &writes[i].content {
                            BlockContent::Data(_) => data_puts.push((block, seq, i)),
                            BlockContent::Zero => batch.put_cf(blocks_cf, block_key(vol, block, seq), b""),
                            BlockContent::Appended(r) => {
                                batch.put_cf(blocks_cf, block_key(vol, block, seq), r.encode())
                            }
                        },
                        (false, _) if stored => batch.delete_cf(blocks_cf, block_key(vol, block, seq)),
                        _ => {}
                    }
                });
            }
            drop(it);
            let bufs: Vec<&[u8]> = data_puts
                .iter()
                .map(|&(_, _, i)| match &writes[i].content {
                    BlockContent::Data(d) => d.as_slice(),
                    _ => unreachable!("only Data versions are appended"),
                })
                .collect();
            // The guard keeps the segment from looking idle to the collector until the batch
            // holding the references is written.
            let (refs, _appending) = if bufs.is_empty() {
                (Vec::new(), None)
            } else {
                let (refs, guard) = self.segs().append(&bufs)?;
                (refs, Some(guard))
            };
            for (&(block, seq, _), r) in data_puts.iter().zip(&refs) {
                batch.put_cf(blocks_cf, block_key(vol, block, seq), r.encode());
            }
            batch.merge_cf(store.cf(CF_VOLUME_META), hwm_key(vol), max_seq.min(hwm_cap).to_be_bytes());
            self.write(batch, durable)
        })
    }

    /// Apply a range zeroing: one pass over the range's stored keys; a Zero version at
    /// `range.seq` is added to every block whose newest version below `range.seq` is Data (the
    /// others already read as zeroes there), pruned per the retention invariant in the same
    /// batch; the high-water mark is raised to `range.seq` even when no block held data.
    /// Returns how many Zero versions it stored. Exact when every version below `range.seq` that
    /// will ever be stored is stored already (a replica's sequencer applies in order; a resync
    /// sends a block's later versions with it, see `resync`). Re-applying it is harmless.
    pub fn zero_range(&self, vol: VolumeId, range: ZeroRange, durable: bool) -> Result<u64, BlockStoreError> {
        let end = range.end().ok_or_else(|| {
            BlockStoreError::InvalidWrite(format!("zeroing {} blocks from {}", range.count, range.first))
        })?;
        self.with_snapshots(vol, |snaps| {
            let store = self.store();
            let blocks_cf = store.cf(CF_BLOCKS);
            let mut batch = WriteBatch::default();
            let mut zeroed = 0u64;
            let mut seqs: Vec<u64> = Vec::new();
            self.scan_version_kinds(vol, range.first, Some(end), |block, versions| {
                if !needs_zero(versions, range.seq) {
                    return Ok(());
                }
                seqs.clear();
                seqs.extend(versions.iter().map(|v| v.0));
                let at = seqs.partition_point(|&q| q < range.seq);
                seqs.insert(at, range.seq);
                retention(&snaps.seqs, &seqs, |i, needed| match (i == at, needed) {
                    (true, true) => {
                        batch.put_cf(blocks_cf, block_key(vol, block, range.seq), b"");
                        zeroed += 1;
                    }
                    (false, false) => batch.delete_cf(blocks_cf, block_key(vol, block, seqs[i])),
                    _ => {}
                });
                Ok(())
            })?;
            batch.merge_cf(store.cf(CF_VOLUME_META), hwm_key(vol), range.seq.to_be_bytes());
            self.write(batch, durable)?;
            Ok(zeroed)
        })
    }

    /// `count` blocks from `first` as seen at `at` (None: newest; Some(S): newest version with
    /// seq ≤ S): `count * block_size` bytes, zeros for blocks never written or written Zero.
    /// One iterator pass over the range.
    pub fn read(
        &self,
        vol: VolumeId,
        block_size: u32,
        first: u64,
        count: u32,
        at: Option<u64>,
    ) -> Result<Vec<u8>, BlockStoreError> {
        check_block_size(block_size)?;
        let bs = block_size as usize;
        let len = (count as usize)
            .checked_mul(bs)
            .ok_or_else(|| BlockStoreError::InvalidRequest(format!("{count} blocks of {block_size} bytes")))?;
        // One past the last block; None when that is 2^64 (the range ends with block u64::MAX).
        let end_wide = u128::from(first) + u128::from(count);
        if end_wide > 1u128 << 64 {
            return Err(BlockStoreError::InvalidRequest(format!("blocks {first}+{count} overflow")));
        }
        let end = u64::try_from(end_wide).ok();
        let mut out = vec![0u8; len];
        if count == 0 {
            return Ok(out);
        }
        // Held before the iterator exists, so no segment it finds a reference into is deleted
        // before it is read.
        let reader = self.segs().reader();
        let mut it = self.block_iter(vol, first, end);
        // The newest visible extent of each slot; read after the pass, in runs.
        let mut extents: Vec<Option<ExtentRef>> = vec![None; count as usize];
        // Versions of a block come oldest first: each visible one overwrites the previous, so
        // the slot ends up holding the newest visible version.
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let (block, seq) = parse_block_key(vol, k)?;
            if at.is_none_or(|at| seq <= at) {
                if block < first || end.is_some_and(|end| block >= end) {
                    return Err(corrupt(CF_BLOCKS, format!("block {block} outside iterated range")));
                }
                let i = (block - first) as usize;
                let slot = &mut out[i * bs..(i + 1) * bs];
                extents[i] = None;
                match decode_value(v, block_size, block, seq)? {
                    Stored::Zero => slot.fill(0),
                    Stored::Inline(d) => slot.copy_from_slice(d),
                    Stored::Extent(r) => extents[i] = Some(r),
                }
            }
            it.next();
        }
        it.status()?;
        drop(it);
        read_extent_runs(&reader, &extents, bs, &mut out)?;
        Ok(out)
    }

    /// The newest version of `block` visible at `at`, with its seq (None if there is none).
    pub fn read_version(
        &self,
        vol: VolumeId,
        block: u64,
        at: Option<u64>,
    ) -> Result<Option<(u64, BlockContent)>, BlockStoreError> {
        let lower = block_key(vol, block, 0).to_vec();
        let upper = match block.checked_add(1) {
            Some(next) => blocks_upper(vol, Some(next)),
            None => blocks_upper(vol, None),
        };
        let reader = self.segs().reader();
        let mut it = self.iter(CF_BLOCKS, lower, upper);
        it.seek_for_prev(block_key(vol, block, at.unwrap_or(u64::MAX)));
        let found = match (it.key(), it.value()) {
            (Some(k), Some(v)) => {
                let (b, seq) = parse_block_key(vol, k)?;
                if b != block {
                    return Err(corrupt(CF_BLOCKS, format!("found block {b} looking for {block}")));
                }
                Some((seq, content_of(&reader, v, block, seq)?))
            }
            _ => None,
        };
        it.status()?;
        Ok(found)
    }

    /// Every stored version of `block` with seq > `after`, ascending.
    pub fn versions_after(
        &self,
        vol: VolumeId,
        block: u64,
        after: u64,
    ) -> Result<Vec<(u64, BlockContent)>, BlockStoreError> {
        let Some(from) = after.checked_add(1) else { return Ok(Vec::new()) };
        let lower = block_key(vol, block, from).to_vec();
        let upper = match block.checked_add(1) {
            Some(next) => blocks_upper(vol, Some(next)),
            None => blocks_upper(vol, None),
        };
        let reader = self.segs().reader();
        let mut it = self.iter(CF_BLOCKS, lower.clone(), upper);
        it.seek(&lower);
        let mut out = Vec::new();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let (b, seq) = parse_block_key(vol, k)?;
            if b != block {
                return Err(corrupt(CF_BLOCKS, format!("found block {b} looking for {block}")));
            }
            out.push((seq, content_of(&reader, v, block, seq)?));
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// The largest seq ever applied to `vol` (0 if none), as lowered by rollback and rebase.
    pub fn high_water_mark(&self, vol: VolumeId) -> Result<u64, BlockStoreError> {
        let store = self.store();
        match store.db().get_pinned_cf(store.cf(CF_VOLUME_META), hwm_key(vol))? {
            None => Ok(0),
            Some(v) => decode_u64(CF_VOLUME_META, "high-water mark", &v),
        }
    }

    /// Raise the high-water mark to `seq` durably (a resync delivered every point up to `seq`,
    /// though the versions it sent may all be older): after a restart the sequencer resumes
    /// above it, never at a point this copy already holds.
    pub fn raise_high_water_mark(&self, vol: VolumeId, seq: u64) -> Result<(), BlockStoreError> {
        let mut batch = WriteBatch::default();
        batch.merge_cf(self.store().cf(CF_VOLUME_META), hwm_key(vol), seq.to_be_bytes());
        self.write(batch, true)
    }

    /// Record local snapshot `id` at seq point `seq`, durably. Idempotent for the same
    /// (id, seq); [`BlockStoreError::SnapshotConflict`] if `id` exists at another seq.
    /// The snapshot preserves the view at `seq` only if no write above `seq` has been applied
    /// yet (see the module doc).
    pub fn snapshot_create(&self, vol: VolumeId, id: u64, seq: u64) -> Result<(), BlockStoreError> {
        self.with_snapshots_mut(vol, |snaps| {
            if let Some(s) = snaps.list.iter().find(|s| s.id == id) {
                if s.seq == seq {
                    return Ok(());
                }
                return Err(BlockStoreError::SnapshotConflict { vol, id, existing: s.seq, requested: seq });
            }
            let store = self.store();
            let mut batch = WriteBatch::default();
            batch.put_cf(store.cf(CF_VOLUME_META), snapshot_key(vol, id), seq.to_be_bytes());
            self.write(batch, true)?;
            let mut list = std::mem::take(&mut snaps.list);
            list.push(LocalSnapshot { id, seq });
            *snaps = Snapshots::new(list);
            Ok(())
        })
    }

    /// Forget snapshot `id` and delete the versions only it needed, durably (one pass over the
    /// volume's keys unless another snapshot shares its seq). Returns whether it existed.
    pub fn snapshot_delete(&self, vol: VolumeId, id: u64) -> Result<bool, BlockStoreError> {
        self.want_gc();
        self.with_snapshots_mut(vol, |snaps| {
            let Some(pos) = snaps.list.iter().position(|s| s.id == id) else {
                return Ok(false);
            };
            let mut remaining = snaps.list.clone();
            let gone = remaining.remove(pos);
            let after = Snapshots::new(remaining);
            let store = self.store();
            let blocks_cf = store.cf(CF_BLOCKS);
            let mut batch = WriteBatch::default();
            batch.delete_cf(store.cf(CF_VOLUME_META), snapshot_key(vol, id));
            if !after.seqs.contains(&gone.seq) {
                // Only versions of the two merged intervals around `gone.seq` can lose.
                self.scan_versions(vol, 0, None, |block, seqs| {
                    retention(&after.seqs, seqs, |i, needed| {
                        if !needed {
                            batch.delete_cf(blocks_cf, block_key(vol, block, seqs[i]));
                        }
                    });
                    Ok(())
                })?;
            }
            self.write(batch, true)?;
            *snaps = after;
            Ok(true)
        })
    }

    /// The volume's local snapshots, ordered by seq (then id).
    pub fn snapshots(&self, vol: VolumeId) -> Result<Vec<LocalSnapshot>, BlockStoreError> {
        self.with_snapshots(vol, |snaps| Ok(snaps.list.clone()))
    }

    /// Distinct block numbers having a stored version with seq in `(after, upto]` (`upto` None:
    /// no upper bound), ascending. Exact when `upto` is None, the high-water mark or a local
    /// snapshot's seq (other versions may have been pruned). One pass over the volume's keys.
    pub fn changed_blocks(&self, vol: VolumeId, after: u64, upto: Option<u64>) -> Result<Vec<u64>, BlockStoreError> {
        let mut out = Vec::new();
        self.scan_versions(vol, 0, None, |block, seqs| {
            if seqs.iter().any(|&s| s > after && upto.is_none_or(|u| s <= u)) {
                out.push(block);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Drop every version with seq > `to_seq` and every snapshot with seq > `to_seq`, and set
    /// the high-water mark to `to_seq`, durably. Returns the affected blocks ascending. The view
    /// at `to_seq` is exact when `to_seq` is a local snapshot's seq (or ≥ the high-water mark).
    pub fn rollback(&self, vol: VolumeId, to_seq: u64) -> Result<Vec<u64>, BlockStoreError> {
        self.want_gc();
        self.with_snapshots_mut(vol, |snaps| {
            let store = self.store();
            let blocks_cf = store.cf(CF_BLOCKS);
            let meta_cf = store.cf(CF_VOLUME_META);
            let mut batch = WriteBatch::default();
            let mut affected = Vec::new();
            self.scan_versions(vol, 0, None, |block, seqs| {
                let mut hit = false;
                for &s in seqs.iter().filter(|&&s| s > to_seq) {
                    batch.delete_cf(blocks_cf, block_key(vol, block, s));
                    hit = true;
                }
                if hit {
                    affected.push(block);
                }
                Ok(())
            })?;
            let (keep, dropped): (Vec<_>, Vec<_>) = snaps.list.iter().copied().partition(|s| s.seq <= to_seq);
            for s in dropped {
                batch.delete_cf(meta_cf, snapshot_key(vol, s.id));
            }
            batch.put_cf(meta_cf, hwm_key(vol), to_seq.to_be_bytes());
            self.write(batch, true)?;
            *snaps = Snapshots::new(keep);
            Ok(affected)
        })
    }

    /// Collapse every block to its newest content stored at seq 0, drop all snapshots, set the
    /// high-water mark to 0; durable. Commits in several batches for large volumes: snapshots
    /// go first, then blocks (each block's collapse is atomic, so the current view is intact at
    /// every point), then the high-water mark; an interrupted rebase can simply be repeated.
    pub fn rebase(&self, vol: VolumeId) -> Result<(), BlockStoreError> {
        self.want_gc();
        self.with_snapshots_mut(vol, |snaps| {
            let store = self.store();
            let blocks_cf = store.cf(CF_BLOCKS);
            let meta_cf = store.cf(CF_VOLUME_META);

            let mut batch = WriteBatch::default();
            for s in &snaps.list {
                batch.delete_cf(meta_cf, snapshot_key(vol, s.id));
            }
            self.write(batch, true)?;
            *snaps = Snapshots::default();

            let mut batch = WriteBatch::default();
            let mut it = self.block_iter(vol, 0, None);
            let mut current: Option<u64> = None;
            let mut seqs: Vec<u64> = Vec::new();
            let mut newest: Vec<u8> = Vec::new();
            let flush = |batch: &mut WriteBatch, block: u64, seqs: &[u64], newest: &[u8]| {
                if seqs == [0] {
                    return;
                }
                for &s in seqs.iter().filter(|&&s| s != 0) {
                    batch.delete_cf(blocks_cf, block_key(vol, block, s));
                }
                batch.put_cf(blocks_cf, block_key(vol, block, 0), newest);
            };
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                let (block, seq) = parse_block_key(vol, k)?;
                if current != Some(block) {
                    if let Some(b) = current {
                        flush(&mut batch, b, &seqs, &newest);
                        if batch.size_in_bytes() >= REBASE_BATCH_BYTES {
                            self.write(std::mem::take(&mut batch), false)?;
                        }
                    }
                    current = Some(block);
                    seqs.clear();
                }
                seqs.push(seq);
                newest.clear();
                newest.extend_from_slice(v);
                it.next();
            }
            it.status()?;
            drop(it);
            if let Some(b) = current {
                flush(&mut batch, b, &seqs, &newest);
            }
            batch.put_cf(meta_cf, hwm_key(vol), 0u64.to_be_bytes());
            self.write(batch, true)
        })
    }

    /// The Merkle tree of the view at `at` over blocks `[0, size_blocks)`: one ordered pass over
    /// the volume's keys; chunks with no stored block use the cached all-zero chunk hash.
    pub fn merkle(
        &self,
        vol: VolumeId,
        block_size: u32,
        size_blocks: u64,
        at: Option<u64>,
    ) -> Result<MerkleTree, BlockStoreError> {
        check_block_size(block_size)?;
        let n_chunks = chunk_count(size_blocks);
        let zero = zero_block_hash(block_size);
        let mut chunks: Vec<Hash> = Vec::new();
        let pad = |chunks: &mut Vec<Hash>, upto: u64| {
            while (chunks.len() as u64) < upto {
                chunks.push(zero_chunk_hash(block_size, chunk_len(size_blocks, chunks.len() as u64)));
            }
        };
        // The chunk being filled and its block hashes.
        let mut current: Option<(u64, Vec<Hash>)> = None;
        let reader = self.segs().reader();
        let mut buf = Vec::new();
        self.scan_view(vol, 0, Some(size_blocks), at, |block, seq, value| {
            let hash = stored_hash(&reader, value, block_size, block, seq, zero, &mut buf)?;
            let chunk = block / CHUNK_BLOCKS;
            if current.as_ref().is_none_or(|(c, _)| *c != chunk) {
                if let Some((_, hashes)) = current.take() {
                    chunks.push(chunk_hash(&hashes));
                }
                pad(&mut chunks, chunk);
                current = Some((chunk, vec![zero; chunk_len(size_blocks, chunk) as usize]));
            }
            if let Some((_, hashes)) = current.as_mut() {
                let slot = hashes
                    .get_mut((block % CHUNK_BLOCKS) as usize)
                    .ok_or_else(|| corrupt(CF_BLOCKS, format!("block {block} beyond {size_blocks}")))?;
                *slot = hash;
            }
            Ok(())
        })?;
        if let Some((_, hashes)) = current.take() {
            chunks.push(chunk_hash(&hashes));
        }
        pad(&mut chunks, n_chunks);
        Ok(MerkleTree::from_chunk_hashes(block_size, size_blocks, chunks))
    }

    /// The block hashes of chunk `chunk` at `at`: [`CHUNK_BLOCKS`] entries, fewer for a short
    /// last chunk, none past the end.
    pub fn chunk_block_hashes(
        &self,
        vol: VolumeId,
        block_size: u32,
        size_blocks: u64,
        chunk: u64,
        at: Option<u64>,
    ) -> Result<Vec<Hash>, BlockStoreError> {
        check_block_size(block_size)?;
        let len = chunk_len(size_blocks, chunk);
        let zero = zero_block_hash(block_size);
        let mut hashes = vec![zero; len as usize];
        if len == 0 {
            return Ok(hashes);
        }
        let first = chunk * CHUNK_BLOCKS;
        let reader = self.segs().reader();
        let mut buf = Vec::new();
        self.scan_view(vol, first, Some(first + len), at, |block, seq, value| {
            let hash = stored_hash(&reader, value, block_size, block, seq, zero, &mut buf)?;
            let slot = block
                .checked_sub(first)
                .and_then(|i| hashes.get_mut(i as usize))
                .ok_or_else(|| corrupt(CF_BLOCKS, format!("block {block} outside chunk {chunk}")))?;
            *slot = hash;
            Ok(())
        })?;
        Ok(hashes)
    }

    /// Delete `[from, to)` of `cf` (`to` None: to the end of the key space) in `batch`.
    fn delete_range(
        &self,
        batch: &mut WriteBatch,
        cf: &'static str,
        from: Vec<u8>,
        to: Option<Vec<u8>>,
    ) -> Result<(), BlockStoreError> {
        let handle = self.store().cf(cf);
        match to {
            Some(to) => batch.delete_range_cf(handle, from, to),
            None => {
                // Only for the volume u64::MAX, whose keys are the last of the key space.
                let mut it = self.iter(cf, from.clone(), None);
                it.seek(&from);
                while let Some(k) = it.key() {
                    batch.delete_cf(handle, k);
                    it.next();
                }
                it.status()?;
            }
        }
        Ok(())
    }

    /// Drop blocks ≥ `new_size_blocks` (all versions), durably.
    pub fn truncate(&self, vol: VolumeId, new_size_blocks: u64) -> Result<(), BlockStoreError> {
        self.want_gc();
        self.with_snapshots_mut(vol, |_| {
            let mut batch = WriteBatch::default();
            self.delete_range(
                &mut batch,
                CF_BLOCKS,
                block_key(vol, new_size_blocks, 0).to_vec(),
                blocks_upper(vol, None),
            )?;
            self.write(batch, true)
        })
    }

    /// Remove everything of `vol`: blocks, snapshots, high-water mark and metadata. Durable.
    pub fn delete_volume(&self, vol: VolumeId) -> Result<(), BlockStoreError> {
        self.want_gc();
        self.with_snapshots_mut(vol, |snaps| {
            let prefix = vol_prefix(vol);
            let mut batch = WriteBatch::default();
            self.delete_range(&mut batch, CF_BLOCKS, prefix.clone(), prefix_end(&prefix))?;
            self.delete_range(&mut batch, CF_VOLUME_META, prefix.clone(), prefix_end(&prefix))?;
            self.write(batch, true)?;
            *snaps = Snapshots::default();
            Ok(())
        })
    }

    /// FAULT INJECTION (chaos harness and integrity tests only): overwrite the stored bytes of
    /// the newest version of `block` in place, keeping its seq, as silent corruption would.
    /// `data` must be empty (the version then reads as Zero) or, if the stored version is Data,
    /// of the same length. [`BlockStoreError::NotWritten`] if the block has no version.
    pub fn inject_corruption(&self, vol: VolumeId, block: u64, data: &[u8]) -> Result<(), BlockStoreError> {
        self.with_snapshots(vol, |_| {
            let Some((seq, content)) = self.read_version(vol, block, None)? else {
                return Err(BlockStoreError::NotWritten { vol, block });
            };
            if let BlockContent::Data(old) = &content {
                if !data.is_empty() && data.len() != old.len() {
                    return Err(BlockStoreError::InvalidWrite(format!(
                        "corruption of {} bytes for a block of {}",
                        data.len(),
                        old.len()
                    )));
                }
            }
            let store = self.store();
            let mut batch = WriteBatch::default();
            batch.put_cf(store.cf(CF_BLOCKS), block_key(vol, block, seq), data);
            self.write(batch, true)
        })
    }

    /// Reclaim extent space: delete the sealed segments no reference points into, and move the
    /// live blocks out of mostly dead ones (at most [`GC_MOVE_MAX_BYTES`] per call), deleting
    /// those too once emptied. Safe to run beside every other operation (module doc).
    pub fn collect_garbage(&self) -> Result<GcReport, BlockStoreError> {
        self.inner.gc_wanted.store(false, std::sync::atomic::Ordering::Relaxed);
        self.segs().take_appended_bytes();
        let bytes_before = self.segs().total_bytes();
        let mut report = GcReport { bytes_before, ..GcReport::default() };
        let sparse = self.sweep(&mut report)?;
        if !sparse.is_empty() {
            report.moved_bytes = self.move_live_blocks(&sparse)?;
            self.sweep(&mut report)?;
        }
        report.bytes_after = self.segs().total_bytes();
        *self.inner.last_live_bytes.lock().unwrap_or_else(PoisonError::into_inner) = report.live_bytes;
        metrics::gauge!("haven_extent_bytes", "kind" => "total").set(report.bytes_after as f64);
        metrics::gauge!("haven_extent_bytes", "kind" => "live").set(report.live_bytes as f64);
        Ok(report)
    }

    /// One mark pass: counts the live bytes of each idle sealed segment under a database snapshot,
    /// deletes those with none (after a sync, so that no dropped reference can come back), and
    /// returns the sparse ones.
    fn sweep(&self, report: &mut GcReport) -> Result<BTreeSet<u64>, BlockStoreError> {
        // Taken before the snapshot: every reference into these segments is committed by now.
        let idle: BTreeMap<u64, u64> = self.segs().sealed_idle().into_iter().collect();
        if idle.is_empty() {
            return Ok(BTreeSet::new());
        }
        let mut live: HashMap<u64, u64> = HashMap::new();
        let db = self.store().db();
        let snap = db.snapshot();
        let mut opts = ReadOptions::default();
        // A scan of everything: keep it from evicting the working set.
        opts.fill_cache(false);
        let mut it = snap.raw_iterator_cf_opt(self.store().cf(CF_BLOCKS), opts);
        it.seek_to_first();
        while let Some(v) = it.value() {
            if let Some(r) = ExtentRef::decode(v) {
                *live.entry(r.seg).or_default() += u64::from(r.len);
            }
            it.next();
        }
        it.status()?;
        drop(it);
        drop(snap);
        let dead: Vec<u64> = idle.keys().copied().filter(|s| !live.contains_key(s)).collect();
        if !dead.is_empty() {
            // The deletions of their last references must not be undone by a power loss.
            self.store().db().flush_wal(true)?;
            self.segs().delete(&dead)?;
            report.deleted_segments += dead.len();
        }
        report.live_bytes = live.values().sum();
        let mut budget = GC_MOVE_MAX_BYTES;
        let mut sparse = BTreeSet::new();
        for (&seg, &size) in &idle {
            let l = live.get(&seg).copied().unwrap_or(0);
            if l > 0 && l * 100 < size * GC_SPARSE_PERCENT && l <= budget {
                budget -= l;
                sparse.insert(seg);
            }
        }
        Ok(sparse)
    }

    /// Copy the live blocks of the `sparse` segments to the active segment and repoint their
    /// references; returns the bytes moved. Each batch holds its volume's snapshot lock, so no
    /// apply, rollback or deletion changes a reference between its check and its rewrite.
    fn move_live_blocks(&self, sparse: &BTreeSet<u64>) -> Result<u64, BlockStoreError> {
        let mut by_vol: BTreeMap<u64, Vec<(Vec<u8>, ExtentRef)>> = BTreeMap::new();
        let mut it = self.iter(CF_BLOCKS, Vec::new(), None);
        it.seek_to_first();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if let (Some(r), Some(vol)) = (ExtentRef::decode(v), k.get(..8)) {
                if sparse.contains(&r.seg) {
                    let vol = u64::from_be_bytes(vol.try_into().expect("8 bytes"));
                    by_vol.entry(vol).or_default().push((k.to_vec(), r));
                }
            }
            it.next();
        }
        it.status()?;
        drop(it);
        let mut moved = 0u64;
        for (vol, refs) in by_vol {
            let mut batch_start = 0;
            while batch_start < refs.len() {
                let mut end = batch_start;
                let mut bytes = 0u64;
                while end < refs.len() && bytes < GC_MOVE_BATCH_BYTES {
                    bytes += u64::from(refs[end].1.len);
                    end += 1;
                }
                moved += self.with_snapshots_mut(VolumeId(vol), |_| self.move_batch(&refs[batch_start..end]))?;
                batch_start = end;
            }
        }
        // Before any sweep deletes the old segments, the copies and new references are durable.
        self.sync()?;
        Ok(moved)
    }

    /// Move one batch of references (their volume's snapshot lock held): those still pointing
    /// where the scan saw them get a copy of their bytes, checksum kept as it was (a block that
    /// went bad stays detectably bad).
    fn move_batch(&self, refs: &[(Vec<u8>, ExtentRef)]) -> Result<u64, BlockStoreError> {
        let store = self.store();
        let blocks_cf = store.cf(CF_BLOCKS);
        let current = store.db().batched_multi_get_cf(blocks_cf, refs.iter().map(|(k, _)| k), false);
        let mut keep: Vec<(&[u8], ExtentRef)> = Vec::new();
        for ((key, r), now) in refs.iter().zip(current) {
            if now?.is_some_and(|v| ExtentRef::decode(&v) == Some(*r)) {
                keep.push((key, *r));
            }
        }
        let mut datas: Vec<Vec<u8>> = Vec::with_capacity(keep.len());
        {
            let reader = self.segs().reader();
            for (_, r) in &keep {
                let mut buf = vec![0u8; r.len as usize];
                reader.read_raw(r.seg, r.offset, &mut buf)?;
                datas.push(buf);
            }
        }
        let bufs: Vec<&[u8]> = datas.iter().map(Vec::as_slice).collect();
        if bufs.is_empty() {
            return Ok(0);
        }
        let (new_refs, _appending) = self.segs().append(&bufs)?;
        let mut batch = WriteBatch::default();
        let mut moved = 0;
        for ((key, old), new) in keep.iter().zip(new_refs) {
            batch.put_cf(blocks_cf, key, ExtentRef { crc: old.crc, ..new }.encode());
            moved += u64::from(old.len);
        }
        self.write(batch, false)?;
        Ok(moved)
    }

    /// Whether a collection is due: enough appended since the last one (scaled with the live
    /// bytes it found), or a bulk deletion since.
    pub fn gc_due(&self) -> bool {
        let last_live = *self.inner.last_live_bytes.lock().unwrap_or_else(PoisonError::into_inner);
        self.inner.gc_wanted.load(std::sync::atomic::Ordering::Relaxed)
            || self.segs().appended_bytes() >= GC_MIN_APPENDED_BYTES.max(last_live)
    }

    fn want_gc(&self) {
        self.inner.gc_wanted.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Start the background collector: a thread that runs [`Self::collect_garbage`] whenever
    /// [`Self::gc_due`], and ends once every other handle on this store is dropped.
    pub fn start_gc(&self) -> std::io::Result<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        std::thread::Builder::new().name("haven-extent-gc".into()).spawn(move || loop {
            std::thread::sleep(GC_POLL);
            let Some(inner) = weak.upgrade() else { return };
            let store = BlockStore { inner };
            if !store.gc_due() {
                continue;
            }
            match store.collect_garbage() {
                Ok(r) => tracing::debug!(?r, "extent garbage collected"),
                Err(e) => tracing::warn!(error = %e, "extent garbage collection failed"),
            }
        })?;
        Ok(())
    }

    /// A per-volume metadata value.
    pub fn meta_get(&self, vol: VolumeId, key: &str) -> Result<Option<Vec<u8>>, BlockStoreError> {
        let store = self.store();
        Ok(store.db().get_cf(store.cf(CF_VOLUME_META), meta_key(vol, key))?)
    }

    /// Store a per-volume metadata value, durably.
    pub fn meta_put(&self, vol: VolumeId, key: &str, value: &[u8]) -> Result<(), BlockStoreError> {
        let store = self.store();
        let mut batch = WriteBatch::default();
        batch.put_cf(store.cf(CF_VOLUME_META), meta_key(vol, key), value);
        self.write(batch, true)
    }

    /// Delete a per-volume metadata value, durably (absent keys are fine).
    pub fn meta_delete(&self, vol: VolumeId, key: &str) -> Result<(), BlockStoreError> {
        let store = self.store();
        let mut batch = WriteBatch::default();
        batch.delete_cf(store.cf(CF_VOLUME_META), meta_key(vol, key));
        self.write(batch, true)
    }

    /// Every per-volume metadata entry whose key starts with `prefix`, ascending by key.
    pub fn meta_scan(&self, vol: VolumeId, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, BlockStoreError> {
        let lower = meta_key(vol, prefix);
        let skip = lower.len() - prefix.len();
        let mut it = self.iter(CF_VOLUME_META, lower.clone(), prefix_end(&lower));
        it.seek(&lower);
        let mut out = Vec::new();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let key = std::str::from_utf8(k.get(skip..).unwrap_or_default())
                .map_err(|_| corrupt(CF_VOLUME_META, "metadata key is not utf-8"))?
                .to_owned();
            out.push((key, v.to_vec()));
            it.next();
        }
        it.status()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    const BS: u32 = 512;
    const VOL: VolumeId = VolumeId(7);
    const TEST_SEGMENT_BYTES: u64 = 4096;

    fn open() -> (tempfile::TempDir, BlockStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // Tiny segments: every test rolls through several, and collections have work to do.
        (dir, BlockStore::open_with(store, TEST_SEGMENT_BYTES).unwrap())
    }

    fn data(bs: u32, fill: u8) -> BlockContent {
        BlockContent::Data(vec![fill; bs as usize])
    }

    fn w(block: u64, seq: u64, fill: u8) -> BlockWrite {
        BlockWrite { block, seq, content: data(BS, fill) }
    }

    fn wz(block: u64, seq: u64) -> BlockWrite {
        BlockWrite { block, seq, content: BlockContent::Zero }
    }

    /// The (block, seq) keys stored for `vol`.
    fn keys(s: &BlockStore, vol: VolumeId) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        s.scan_versions(vol, 0, None, |b, seqs| {
            out.extend(seqs.iter().map(|&q| (b, q)));
            Ok(())
        })
        .unwrap();
        out
    }

    fn raw_key_count(s: &BlockStore, cf: &'static str) -> usize {
        let store = s.store();
        store.db().iterator_cf(store.cf(cf), rocksdb::IteratorMode::Start).count()
    }

    /// The expected read result: one fill byte per block (0 for zero/unwritten).
    fn expect(bs: u32, fills: &[u8]) -> Vec<u8> {
        fills.iter().flat_map(|&f| std::iter::repeat_n(f, bs as usize)).collect()
    }

    #[test]
    fn read_newest_and_at_snapshot_points() {
        let (_d, s) = open();
        s.apply(VOL, BS, &[w(0, 1, 0xA), w(1, 2, 0xB)], true).unwrap();
        s.snapshot_create(VOL, 1, 2).unwrap();
        s.apply(VOL, BS, &[w(0, 3, 0xC), wz(1, 4)], false).unwrap();
        s.apply(VOL, BS, &[w(2, 5, 0xD)], false).unwrap();

        assert_eq!(s.read(VOL, BS, 0, 4, None).unwrap(), expect(BS, &[0xC, 0, 0xD, 0]));
        assert_eq!(s.read(VOL, BS, 0, 4, Some(2)).unwrap(), expect(BS, &[0xA, 0xB, 0, 0]));
        assert_eq!(s.read(VOL, BS, 1, 2, Some(4)).unwrap(), expect(BS, &[0, 0]));
        assert_eq!(s.read(VOL, BS, 0, 4, Some(0)).unwrap(), expect(BS, &[0, 0, 0, 0]));
        assert_eq!(s.read(VOL, BS, 10, 0, None).unwrap(), Vec::<u8>::new());
        // Another volume sees nothing.
        assert_eq!(s.read(VolumeId(8), BS, 0, 2, None).unwrap(), expect(BS, &[0, 0]));

        assert_eq!(s.read_version(VOL, 0, None).unwrap(), Some((3, data(BS, 0xC))));
        assert_eq!(s.read_version(VOL, 0, Some(2)).unwrap(), Some((1, data(BS, 0xA))));
        assert_eq!(s.read_version(VOL, 1, None).unwrap(), Some((4, BlockContent::Zero)));
        assert_eq!(s.read_version(VOL, 2, Some(4)).unwrap(), None);
        assert_eq!(s.read_version(VOL, 3, None).unwrap(), None);
        assert_eq!(s.read_version(VOL, u64::MAX, None).unwrap(), None);
        assert_eq!(s.high_water_mark(VOL).unwrap(), 5);
        assert_eq!(s.high_water_mark(VolumeId(8)).unwrap(), 0);
        assert_eq!(s.snapshots(VOL).unwrap(), vec![LocalSnapshot { id: 1, seq: 2 }]);

        // Everything survives a reopen (snapshots reloaded lazily).
        let path = _d.path().to_owned();
        drop(s);
        let s = BlockStore::open_with(Store::open(&path).unwrap(), TEST_SEGMENT_BYTES).unwrap();
        assert_eq!(s.read(VOL, BS, 0, 4, Some(2)).unwrap(), expect(BS, &[0xA, 0xB, 0, 0]));
        assert_eq!(s.snapshots(VOL).unwrap(), vec![LocalSnapshot { id: 1, seq: 2 }]);
        assert_eq!(s.high_water_mark(VOL).unwrap(), 5);
    }

    #[test]
    fn retention_keeps_exactly_what_snapshots_need() {
        let (_d, s) = open();
        for seq in 1..=5 {
            s.apply(VOL, BS, &[w(0, seq, seq as u8)], false).unwrap();
        }
        assert_eq!(keys(&s, VOL), vec![(0, 5)]);
        s.snapshot_create(VOL, 10, 5).unwrap();
        s.apply(VOL, BS, &[w(0, 6, 6)], false).unwrap();
        s.apply(VOL, BS, &[w(0, 7, 7), w(1, 7, 7)], false).unwrap();
        assert_eq!(keys(&s, VOL), vec![(0, 5), (0, 7), (1, 7)]);
        s.snapshot_create(VOL, 11, 7).unwrap();
        s.snapshot_create(VOL, 12, 7).unwrap();
        s.snapshot_create(VOL, 12, 7).unwrap(); // idempotent
        assert!(matches!(s.snapshot_create(VOL, 12, 8), Err(BlockStoreError::SnapshotConflict { .. })));
        s.apply(VOL, BS, &[w(0, 8, 8)], false).unwrap();
        s.apply(VOL, BS, &[w(0, 9, 9)], false).unwrap();
        assert_eq!(keys(&s, VOL), vec![(0, 5), (0, 7), (0, 9), (1, 7)]);

        assert!(s.snapshot_delete(VOL, 10).unwrap());
        assert!(!s.snapshot_delete(VOL, 10).unwrap());
        assert_eq!(keys(&s, VOL), vec![(0, 7), (0, 9), (1, 7)]);
        // Another snapshot still holds seq 7.
        assert!(s.snapshot_delete(VOL, 11).unwrap());
        assert_eq!(keys(&s, VOL), vec![(0, 7), (0, 9), (1, 7)]);
        assert_eq!(s.read(VOL, BS, 0, 2, Some(7)).unwrap(), expect(BS, &[7, 7]));
        assert!(s.snapshot_delete(VOL, 12).unwrap());
        assert_eq!(keys(&s, VOL), vec![(0, 9), (1, 7)]);
        assert_eq!(s.snapshots(VOL).unwrap(), vec![]);
        assert_eq!(raw_key_count(&s, CF_BLOCKS), 2);
        assert_eq!(s.read(VOL, BS, 0, 2, None).unwrap(), expect(BS, &[9, 7]));
    }

    #[test]
    fn out_of_order_and_duplicate_applies_are_harmless() {
        let (_d, s) = open();
        s.apply(VOL, BS, &[w(0, 2, 2)], true).unwrap();
        s.snapshot_create(VOL, 1, 2).unwrap();
        s.apply(VOL, BS, &[w(0, 4, 4)], false).unwrap();
        s.apply(VOL, BS, &[w(0, 3, 3)], false).unwrap(); // late: shadowed by 4, not stored
        s.apply(VOL, BS, &[w(0, 2, 2)], false).unwrap(); // retry of a stored version
        s.apply(VOL, BS, &[w(0, 1, 1)], false).unwrap(); // late, below the snapshot: shadowed by 2
        s.apply(VOL, BS, &[w(0, 4, 4), w(0, 4, 4)], false).unwrap(); // duplicate within a batch
        assert_eq!(keys(&s, VOL), vec![(0, 2), (0, 4)]);
        assert_eq!(s.read(VOL, BS, 0, 1, None).unwrap(), expect(BS, &[4]));
        assert_eq!(s.read(VOL, BS, 0, 1, Some(2)).unwrap(), expect(BS, &[2]));
        assert_eq!(s.high_water_mark(VOL).unwrap(), 4);

        // One batch out of order, with several versions of one block: only the newest lands.
        s.apply(VOL, BS, &[w(1, 9, 9), w(1, 7, 7), w(2, 8, 8), w(1, 8, 8)], false).unwrap();
        assert_eq!(keys(&s, VOL), vec![(0, 2), (0, 4), (1, 9), (2, 8)]);
        // A late write to an untouched interval below the snapshot is kept: the snapshot sees it.
        s.apply(VOL, BS, &[w(3, 1, 1)], false).unwrap();
        assert_eq!(s.read(VOL, BS, 3, 1, Some(2)).unwrap(), expect(BS, &[1]));
        assert_eq!(s.high_water_mark(VOL).unwrap(), 9);
        s.apply(VOL, BS, &[], true).unwrap();
        assert_eq!(s.high_water_mark(VOL).unwrap(), 9);
    }

    #[test]
    fn sparse_and_dense_batches_find_existing_versions() {
        let (_d, s) = open();
        let first: Vec<_> = (0..300).map(|b| w(b, 1, 1)).chain([w(1 << 40, 1, 1), w(u64::MAX, 1, 1)]).collect();
        s.apply(VOL, BS, &first, false).unwrap();
        let second: Vec<_> =
            (0..300).step_by(3).map(|b| w(b, 2, 2)).chain([w(1 << 40, 2, 2), w(u64::MAX, 2, 2)]).collect();
        s.apply(VOL, BS, &second, false).unwrap();
        let k = keys(&s, VOL);
        assert_eq!(k.len(), 302);
        assert!(k.iter().all(|&(b, q)| q == if b % 3 == 0 || b >= 300 { 2 } else { 1 }));
        let fills: Vec<u8> = (0..300).map(|b| if b % 3 == 0 { 2 } else { 1 }).collect();
        assert_eq!(s.read(VOL, BS, 0, 300, None).unwrap(), expect(BS, &fills));
        assert_eq!(s.read(VOL, BS, u64::MAX, 1, None).unwrap(), expect(BS, &[2]));
    }

    #[test]
    fn changed_blocks_between_seq_points() {
        let (_d, s) = open();
        s.apply(VOL, BS, &[w(0, 1, 1), w(5, 2, 1)], false).unwrap();
        s.snapshot_create(VOL, 1, 2).unwrap();
        s.apply(VOL, BS, &[w(3, 3, 1), wz(5, 4)], false).unwrap();
        s.snapshot_create(VOL, 2, 4).unwrap();
        s.apply(VOL, BS, &[w(9, 5, 1), w(3, 6, 1)], false).unwrap();
        assert_eq!(s.changed_blocks(VOL, 0, None).unwrap(), vec![0, 3, 5, 9]);
        assert_eq!(s.changed_blocks(VOL, 2, None).unwrap(), vec![3, 5, 9]);
        assert_eq!(s.changed_blocks(VOL, 2, Some(4)).unwrap(), vec![3, 5]);
        assert_eq!(s.changed_blocks(VOL, 0, Some(2)).unwrap(), vec![0, 5]);
        assert_eq!(s.changed_blocks(VOL, 4, None).unwrap(), vec![3, 9]);
        assert_eq!(s.changed_blocks(VOL, 6, None).unwrap(), Vec::<u64>::new());
    }

    #[test]
    fn rollback_to_a_snapshot() {
        let (_d, s) = open();
        s.apply(VOL, BS, &[w(0, 1, 1), w(1, 2, 2)], true).unwrap();
        s.snapshot_create(VOL, 1, 2).unwrap();
        s.apply(VOL, BS, &[w(0, 3, 3), w(2, 4, 4)], true).unwrap();
        s.snapshot_create(VOL, 2, 4).unwrap();
        s.apply(VOL, BS, &[w(0, 5, 5), w(3, 6, 6)], true).unwrap();
        let before = s.read(VOL, BS, 0, 4, Some(2)).unwrap();
        assert_eq!(s.rollback(VOL, 2).unwrap(), vec![0, 2, 3]);
        assert_eq!(s.read(VOL, BS, 0, 4, None).unwrap(), before);
        assert_eq!(s.snapshots(VOL).unwrap(), vec![LocalSnapshot { id: 1, seq: 2 }]);
        assert_eq!(s.high_water_mark(VOL).unwrap(), 2);
        assert_eq!(keys(&s, VOL), vec![(0, 1), (1, 2)]);
        // Writes resume above the rollback point and the high-water mark follows them.
        s.apply(VOL, BS, &[w(2, 3, 9)], true).unwrap();
        assert_eq!(s.high_water_mark(VOL).unwrap(), 3);
        assert_eq!(s.rollback(VOL, 10).unwrap(), Vec::<u64>::new());
        assert_eq!(s.high_water_mark(VOL).unwrap(), 10);
    }

    #[test]
    fn zero_range_writes_only_blocks_with_data_and_keeps_snapshots_exact() {
        let (_d, s) = open();
        s.apply(VOL, BS, &[w(0, 1, 1), w(2, 2, 2), wz(3, 3), w(1 << 30, 4, 4)], true).unwrap();
        s.snapshot_create(VOL, 1, 4).unwrap();
        // A huge range costs what its data costs: three blocks hold data, one is already Zero.
        let range = ZeroRange { first: 0, count: 1 << 40, seq: 5 };
        assert_eq!(s.zero_range(VOL, range, true).unwrap(), 3);
        assert_eq!(keys(&s, VOL), vec![(0, 1), (0, 5), (2, 2), (2, 5), (3, 3), (1 << 30, 4), (1 << 30, 5)]);
        assert_eq!(s.read(VOL, BS, 0, 4, None).unwrap(), expect(BS, &[0, 0, 0, 0]));
        assert_eq!(s.read(VOL, BS, 0, 4, Some(4)).unwrap(), expect(BS, &[1, 0, 2, 0]));
        assert_eq!(s.changed_blocks(VOL, 4, None).unwrap(), vec![0, 2, 1 << 30]);
        assert_eq!(s.high_water_mark(VOL).unwrap(), 5);
        // Idempotent; a range over nothing still moves the high-water mark.
        assert_eq!(s.zero_range(VOL, range, true).unwrap(), 0);
        assert_eq!(s.zero_range(VOL, ZeroRange { first: 10, count: 5, seq: 6 }, false).unwrap(), 0);
        assert_eq!(s.high_water_mark(VOL).unwrap(), 6);
        // A Zero version shadowed by a newer one in its interval is not stored; an older one is pruned.
        s.apply(VOL, BS, &[w(2, 7, 7)], false).unwrap();
        assert_eq!(s.zero_range(VOL, ZeroRange { first: 2, count: 1, seq: 8 }, false).unwrap(), 1);
        assert_eq!(keys(&s, VOL).iter().filter(|k| k.0 == 2).copied().collect::<Vec<_>>(), vec![(2, 2), (2, 8)]);
        // Rollback to the snapshot brings the data back.
        s.rollback(VOL, 4).unwrap();
        assert_eq!(s.read(VOL, BS, 0, 4, None).unwrap(), expect(BS, &[1, 0, 2, 0]));
        // Bad ranges are refused with nothing stored.
        for bad in [ZeroRange { first: 0, count: 0, seq: 9 }, ZeroRange { first: u64::MAX, count: 2, seq: 9 }] {
            assert!(matches!(s.zero_range(VOL, bad, true), Err(BlockStoreError::InvalidWrite(_))));
        }
        assert_eq!(s.high_water_mark(VOL).unwrap(), 4);
    }

    #[test]
    fn versions_after_lists_a_blocks_later_versions() {
        let (_d, s) = open();
        s.apply(VOL, BS, &[w(1, 1, 1)], true).unwrap();
        s.snapshot_create(VOL, 1, 1).unwrap();
        s.apply(VOL, BS, &[wz(1, 3), w(2, 4, 4)], true).unwrap();
        assert_eq!(s.versions_after(VOL, 1, 0).unwrap(), vec![(1, data(BS, 1)), (3, BlockContent::Zero)]);
        assert_eq!(s.versions_after(VOL, 1, 1).unwrap(), vec![(3, BlockContent::Zero)]);
        assert_eq!(s.versions_after(VOL, 1, 3).unwrap(), vec![]);
        assert_eq!(s.versions_after(VOL, 1, u64::MAX).unwrap(), vec![]);
        assert_eq!(s.versions_after(VOL, u64::MAX, 0).unwrap(), vec![]);
    }

    #[test]
    fn rebase_collapses_to_seq_zero() {
        let (_d, s) = open();
        s.apply(VOL, BS, &[w(0, 1, 1), w(1, 2, 2), w(2, 3, 3)], true).unwrap();
        s.snapshot_create(VOL, 1, 3).unwrap();
        s.apply(VOL, BS, &[w(0, 4, 4), wz(1, 5)], true).unwrap();
        s.rebase(VOL).unwrap();
        assert_eq!(keys(&s, VOL), vec![(0, 0), (1, 0), (2, 0)]);
        assert_eq!(s.read(VOL, BS, 0, 3, None).unwrap(), expect(BS, &[4, 0, 3]));
        assert_eq!(s.read_version(VOL, 0, None).unwrap(), Some((0, data(BS, 4))));
        assert_eq!(s.read_version(VOL, 1, None).unwrap(), Some((0, BlockContent::Zero)));
        assert_eq!(s.snapshots(VOL).unwrap(), vec![]);
        assert_eq!(s.high_water_mark(VOL).unwrap(), 0);
        // Idempotent, and new writes stack on top.
        s.rebase(VOL).unwrap();
        assert_eq!(keys(&s, VOL), vec![(0, 0), (1, 0), (2, 0)]);
        s.apply(VOL, BS, &[w(2, 1, 7)], true).unwrap();
        assert_eq!(keys(&s, VOL), vec![(0, 0), (1, 0), (2, 1)]);
        assert_eq!(s.read(VOL, BS, 2, 1, None).unwrap(), expect(BS, &[7]));
    }

    #[test]
    fn merkle_matches_across_write_orders_and_localizes_corruption() {
        const SIZE: u64 = 600; // chunks of 256, 256, 88
        let bs = 4096;
        let dw = |block, seq, fill| BlockWrite { block, seq, content: data(bs, fill) };
        let (_da, a) = open();
        let (_db, b) = open();
        // Same final content: a writes it directly; b writes other things first, in another
        // order and with other seqs, represents zeros three ways, and keeps a snapshot.
        a.apply(VOL, bs, &[dw(0, 1, 1), dw(300, 2, 2), dw(599, 3, 3), dw(10, 4, 0)], true).unwrap();
        b.apply(VOL, bs, &[dw(599, 10, 3), dw(300, 11, 9), dw(7, 12, 5)], true).unwrap();
        b.snapshot_create(VOL, 1, 12).unwrap();
        b.apply(VOL, bs, &[dw(300, 20, 2), BlockWrite { block: 7, seq: 21, content: BlockContent::Zero }], true)
            .unwrap();
        b.apply(VOL, bs, &[dw(0, 22, 1)], true).unwrap();
        b.apply(VOL, bs, &[dw(700, 23, 1)], true).unwrap(); // beyond the size: ignored
        let ta = a.merkle(VOL, bs, SIZE, None).unwrap();
        let tb = b.merkle(VOL, bs, SIZE, None).unwrap();
        assert_eq!(ta.chunks.len(), 3);
        assert_eq!(ta, tb);
        assert_ne!(b.merkle(VOL, bs, SIZE, Some(12)).unwrap(), tb);
        assert_eq!(b.merkle(VOL, bs, SIZE, Some(12)).unwrap().differing_chunks(&tb), vec![0, 1]);

        // An empty volume's tree is the all-zero tree.
        let empty = a.merkle(VolumeId(99), bs, SIZE, None).unwrap();
        let z = zero_block_hash(bs);
        let zeros = |n: usize| chunk_hash(&vec![z; n]);
        assert_eq!(empty, MerkleTree::from_chunk_hashes(bs, SIZE, vec![zeros(256), zeros(256), zeros(88)]));
        assert_eq!(a.merkle(VOL, bs, 0, None).unwrap().chunks, Vec::<Hash>::new());

        // The tree agrees with per-chunk block hashes.
        for c in 0..3 {
            let hashes = a.chunk_block_hashes(VOL, bs, SIZE, c, None).unwrap();
            assert_eq!(hashes.len(), chunk_len(SIZE, c) as usize);
            assert_eq!(chunk_hash(&hashes), ta.chunks[c as usize]);
        }
        assert!(a.chunk_block_hashes(VOL, bs, SIZE, 3, None).unwrap().is_empty());

        let mut bad = vec![2u8; bs as usize];
        bad[100] ^= 0xFF;
        b.inject_corruption(VOL, 300, &bad).unwrap();
        assert_eq!(b.read_version(VOL, 300, None).unwrap(), Some((20, BlockContent::Data(bad.clone()))));
        let tb = b.merkle(VOL, bs, SIZE, None).unwrap();
        assert_eq!(ta.differing_chunks(&tb), vec![1]);
        let ha = a.chunk_block_hashes(VOL, bs, SIZE, 1, None).unwrap();
        let hb = b.chunk_block_hashes(VOL, bs, SIZE, 1, None).unwrap();
        let differing: Vec<usize> = (0..ha.len()).filter(|&i| ha[i] != hb[i]).collect();
        assert_eq!(differing, vec![300 - 256]);
        assert_eq!(hb[44], block_hash(&bad));

        assert!(matches!(b.inject_corruption(VOL, 301, &bad), Err(BlockStoreError::NotWritten { .. })));
        assert!(matches!(b.inject_corruption(VOL, 300, &bad[..10]), Err(BlockStoreError::InvalidWrite(_))));
    }

    #[test]
    fn truncate_drops_blocks_past_the_end() {
        let (_d, s) = open();
        let writes: Vec<_> = (0..10).map(|b| w(b, b + 1, 1)).collect();
        s.apply(VOL, BS, &writes, true).unwrap();
        s.snapshot_create(VOL, 1, 10).unwrap();
        s.apply(VOL, BS, &[w(7, 11, 2), w(2, 12, 2)], true).unwrap();
        s.truncate(VOL, 5).unwrap();
        assert_eq!(keys(&s, VOL).into_iter().map(|(b, _)| b).collect::<BTreeSet<_>>(), (0..5).collect());
        assert_eq!(s.read(VOL, BS, 0, 10, None).unwrap(), expect(BS, &[1, 1, 2, 1, 1, 0, 0, 0, 0, 0]));
        assert_eq!(s.read(VOL, BS, 0, 10, Some(10)).unwrap(), expect(BS, &[1, 1, 1, 1, 1, 0, 0, 0, 0, 0]));
        s.truncate(VOL, 0).unwrap();
        assert_eq!(keys(&s, VOL), vec![]);
    }

    #[test]
    fn delete_volume_leaves_no_keys() {
        let (_d, s) = open();
        for vol in [VOL, VolumeId(u64::MAX)] {
            s.apply(vol, BS, &[w(0, 1, 1), w(u64::MAX, 2, 2)], true).unwrap();
            s.snapshot_create(vol, 1, 1).unwrap();
            s.apply(vol, BS, &[w(0, 3, 3)], true).unwrap();
            s.meta_put(vol, "cursor", b"x").unwrap();
        }
        s.apply(VolumeId(8), BS, &[w(0, 1, 1)], true).unwrap();
        s.meta_put(VolumeId(8), "cursor", b"y").unwrap();
        let blocks_before = raw_key_count(&s, CF_BLOCKS);
        assert_eq!(blocks_before, 3 + 3 + 1);

        s.delete_volume(VOL).unwrap();
        s.delete_volume(VolumeId(u64::MAX)).unwrap();
        assert_eq!(raw_key_count(&s, CF_BLOCKS), 1);
        // Only volume 8's high-water mark and metadata remain.
        assert_eq!(raw_key_count(&s, CF_VOLUME_META), 2);
        for vol in [VOL, VolumeId(u64::MAX)] {
            assert_eq!(keys(&s, vol), vec![]);
            assert_eq!(s.snapshots(vol).unwrap(), vec![]);
            assert_eq!(s.high_water_mark(vol).unwrap(), 0);
            assert_eq!(s.meta_get(vol, "cursor").unwrap(), None);
        }
        assert_eq!(s.read(VolumeId(8), BS, 0, 1, None).unwrap(), expect(BS, &[1]));
        assert_eq!(s.meta_get(VolumeId(8), "cursor").unwrap(), Some(b"y".to_vec()));
    }

    #[test]
    fn bad_block_size_is_refused_with_nothing_stored() {
        let (_d, s) = open();
        let short = BlockWrite { block: 1, seq: 2, content: BlockContent::Data(vec![1; BS as usize - 1]) };
        assert!(matches!(s.apply(VOL, BS, &[w(0, 1, 1), short], true), Err(BlockStoreError::InvalidWrite(_))));
        assert!(matches!(s.apply(VOL, 0, &[wz(0, 1)], true), Err(BlockStoreError::InvalidWrite(_))));
        assert_eq!(raw_key_count(&s, CF_BLOCKS), 0);
        assert_eq!(s.high_water_mark(VOL).unwrap(), 0);
        assert!(matches!(s.read(VOL, 0, 0, 1, None), Err(BlockStoreError::InvalidRequest(_))));
        assert!(matches!(s.read(VOL, BS, u64::MAX, 2, None), Err(BlockStoreError::InvalidRequest(_))));
    }

    #[test]
    fn corrupt_records_are_errors_not_panics() {
        let (_d, s) = open();
        s.apply(VOL, BS, &[w(0, 1, 1)], true).unwrap();
        let store = s.store().clone();
        // A value of the wrong length.
        store.db().put_cf(store.cf(CF_BLOCKS), block_key(VOL, 1, 1), [1u8; 3]).unwrap();
        assert!(matches!(s.read(VOL, BS, 0, 2, None), Err(BlockStoreError::Corrupt { .. })));
        assert!(matches!(s.merkle(VOL, BS, 10, None), Err(BlockStoreError::Corrupt { .. })));
        // A key of the wrong length.
        store.db().put_cf(store.cf(CF_BLOCKS), [0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 5], b"").unwrap();
        assert!(matches!(s.changed_blocks(VOL, 0, None), Err(BlockStoreError::Corrupt { .. })));
        assert!(matches!(s.read(VOL, BS, 4, 2, None), Err(BlockStoreError::Corrupt { .. })));
        // Writes next to it neither see it nor fail.
        s.apply(VOL, BS, &[w(4, 2, 1), w(5, 2, 1)], true).unwrap();
        // A bad high-water mark and a bad snapshot record.
        store.db().put_cf(store.cf(CF_VOLUME_META), hwm_key(VolumeId(3)), [1u8; 2]).unwrap();
        assert!(matches!(s.high_water_mark(VolumeId(3)), Err(BlockStoreError::Corrupt { .. })));
        store.db().put_cf(store.cf(CF_VOLUME_META), snapshot_key(VolumeId(4), 1), [1u8; 2]).unwrap();
        assert!(matches!(s.snapshots(VolumeId(4)), Err(BlockStoreError::Corrupt { .. })));
        store.db().put_cf(store.cf(CF_VOLUME_META), meta_key(VolumeId(5), "a"), b"ok").unwrap();
        let mut bad = meta_key(VolumeId(5), "b");
        bad.push(0xFF);
        store.db().put_cf(store.cf(CF_VOLUME_META), bad, b"x").unwrap();
        assert!(matches!(s.meta_scan(VolumeId(5), ""), Err(BlockStoreError::Corrupt { .. })));
    }

    #[test]
    fn hwm_merge_takes_the_max_and_poisons_bad_input() {
        let (_d, s) = open();
        let store = s.store().clone();
        let cf = store.cf(CF_VOLUME_META);
        for v in [5u64, 3, 9, 1] {
            store.db().merge_cf(cf, hwm_key(VOL), v.to_be_bytes()).unwrap();
        }
        assert_eq!(s.high_water_mark(VOL).unwrap(), 9);
        store.db().flush_cf(cf).unwrap();
        store.db().merge_cf(cf, hwm_key(VOL), 4u64.to_be_bytes()).unwrap();
        assert_eq!(s.high_water_mark(VOL).unwrap(), 9);
        store.db().merge_cf(cf, hwm_key(VOL), [1u8]).unwrap();
        assert!(matches!(s.high_water_mark(VOL), Err(BlockStoreError::Corrupt { .. })));
        store.db().compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        assert!(matches!(s.high_water_mark(VOL), Err(BlockStoreError::Corrupt { .. })));
        s.rollback(VOL, 2).unwrap();
        assert_eq!(s.high_water_mark(VOL).unwrap(), 2);
    }

    #[test]
    fn metadata_get_put_delete_scan() {
        let (_d, s) = open();
        s.meta_put(VOL, "resync/a", b"1").unwrap();
        s.meta_put(VOL, "resync/b", b"2").unwrap();
        s.meta_put(VOL, "resyncz", b"3").unwrap();
        s.meta_put(VOL, "preserved/9", b"4").unwrap();
        s.meta_put(VolumeId(8), "resync/a", b"5").unwrap();
        assert_eq!(s.meta_get(VOL, "resync/a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(s.meta_get(VOL, "missing").unwrap(), None);
        assert_eq!(
            s.meta_scan(VOL, "resync/").unwrap(),
            vec![("resync/a".to_string(), b"1".to_vec()), ("resync/b".to_string(), b"2".to_vec())]
        );
        assert_eq!(s.meta_scan(VOL, "").unwrap().len(), 4);
        s.meta_delete(VOL, "resync/a").unwrap();
        s.meta_delete(VOL, "never").unwrap();
        assert_eq!(s.meta_scan(VOL, "resync/").unwrap(), vec![("resync/b".to_string(), b"2".to_vec())]);
        // Metadata does not disturb the block store's own records.
        s.apply(VOL, BS, &[w(0, 4, 1)], true).unwrap();
        s.snapshot_create(VOL, 1, 4).unwrap();
        assert_eq!(s.meta_scan(VOL, "").unwrap().len(), 3);
        assert_eq!(s.high_water_mark(VOL).unwrap(), 4);
    }

    #[test]
    fn concurrent_applies_read_the_newest_version() {
        let (_d, s) = open();
        const THREADS: u64 = 4;
        const ROUNDS: u64 = 50;
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let s = s.clone();
                scope.spawn(move || {
                    for r in 0..ROUNDS {
                        // Seqs interleave across threads; every thread touches blocks 0..8.
                        let seq = r * THREADS + t + 1;
                        let writes: Vec<_> = (0..8).map(|b| w(b, seq, (seq % 251) as u8)).collect();
                        s.apply(VOL, BS, &writes, false).unwrap();
                        if t == 0 && r == ROUNDS / 2 {
                            // Snapshots may interleave with applies: they are serialized against them.
                            let _ = s.snapshot_create(VOL, 1, seq);
                        }
                    }
                });
            }
        });
        let max = ROUNDS * THREADS;
        assert_eq!(s.high_water_mark(VOL).unwrap(), max);
        assert_eq!(s.read(VOL, BS, 0, 8, None).unwrap(), expect(BS, &[(max % 251) as u8; 8]));
        // Leftovers of races disappear on the next write to the block.
        s.snapshot_delete(VOL, 1).unwrap();
        let writes: Vec<_> = (0..8).map(|b| w(b, max + 1, 1)).collect();
        s.apply(VOL, BS, &writes, false).unwrap();
        assert_eq!(keys(&s, VOL), (0..8).map(|b| (b, max + 1)).collect::<Vec<_>>());
    }

    #[test]
    fn overwritten_extents_are_reclaimed_and_every_view_survives() {
        let (d, s) = open();
        // 16 blocks, each rewritten 20 times: 320 extents of 512 bytes over 8-block segments.
        for round in 1..=20u64 {
            let writes: Vec<_> = (0..16).map(|b| w(b, round * 100 + b, round as u8)).collect();
            s.apply(VOL, BS, &writes[..8], false).unwrap();
            s.apply(VOL, BS, &writes[8..], false).unwrap();
            if round == 5 {
                s.snapshot_create(VOL, 1, s.high_water_mark(VOL).unwrap()).unwrap();
            }
        }
        let before = s.segs().segment_count();
        let r = s.collect_garbage().unwrap();
        assert!(r.deleted_segments > 0 && r.bytes_after < r.bytes_before, "{r:?}");
        // Live: 16 current blocks and 16 kept for the snapshot, in at most a few segments.
        assert!(s.segs().segment_count() < before / 4, "{} of {before} segments left", s.segs().segment_count());
        assert_eq!(r.live_bytes, 32 * u64::from(BS), "{r:?}");
        assert_eq!(s.read(VOL, BS, 0, 16, None).unwrap(), expect(BS, &[20; 16]));
        let snap = s.snapshots(VOL).unwrap()[0].seq;
        assert_eq!(s.read(VOL, BS, 0, 16, Some(snap)).unwrap(), expect(BS, &[5; 16]));
        // Deleting the snapshot frees its blocks at the next collection.
        s.snapshot_delete(VOL, 1).unwrap();
        assert!(s.gc_due());
        let r = s.collect_garbage().unwrap();
        assert_eq!(r.live_bytes, 16 * u64::from(BS), "{r:?}");
        // And a reopened store reads the same (references survive, old segments stay gone).
        let path = d.path().to_owned();
        drop(s);
        let s = BlockStore::open_with(Store::open(&path).unwrap(), TEST_SEGMENT_BYTES).unwrap();
        assert_eq!(s.read(VOL, BS, 0, 16, None).unwrap(), expect(BS, &[20; 16]));
    }

    #[test]
    fn sparse_segments_have_their_live_blocks_moved_and_checksums_kept() {
        let (_d, s) = open();
        // One full segment of 8 blocks; then 6 of them overwritten: 2 live of 8 (25%).
        s.apply(VOL, BS, &(0..8).map(|b| w(b, 1, 0xA0 + b as u8)).collect::<Vec<_>>(), false).unwrap();
        s.apply(VOL, BS, &(0..6).map(|b| w(b, 2, 0xB0 + b as u8)).collect::<Vec<_>>(), false).unwrap();
        // Corrupt a live block of the sparse segment on disk: it must stay detectably bad.
        let Stored::Extent(r7) = decode_value(&raw_value(&s, 7, 1), BS, 7, 1).unwrap() else { panic!("not an extent") };
        s.segs().overwrite(r7.seg, r7.offset, &[0xFF; 4]).unwrap();
        s.apply(VOL, BS, &[w(9, 3, 1)], false).unwrap(); // seals the first segments
        let r = s.collect_garbage().unwrap();
        assert_eq!(r.moved_bytes, 2 * u64::from(BS), "{r:?}");
        assert!(ExtentRef::decode(&raw_value(&s, 6, 1)).unwrap().seg != r7.seg, "block 6 moved");
        assert_eq!(s.read(VOL, BS, 6, 1, None).unwrap(), expect(BS, &[0xA6]));
        assert!(matches!(s.read(VOL, BS, 7, 1, None), Err(BlockStoreError::Extent(ExtentError::Checksum { .. }))));
        // The Merkle hash of the bad block is that of its bytes as stored, so a scrub sees it differ.
        let hashes = s.chunk_block_hashes(VOL, BS, 16, 0, None).unwrap();
        assert_ne!(hashes[7], block_hash(&vec![0xA7; BS as usize]));
        assert_eq!(hashes[6], block_hash(&vec![0xA6; BS as usize]));
    }

    #[test]
    fn collections_beside_writers_and_readers_change_no_view() {
        let (_d, s) = open();
        const ROUNDS: u64 = 200;
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let writer = s.clone();
            let done = &done;
            scope.spawn(move || {
                for r in 1..=ROUNDS {
                    let writes: Vec<_> = (0..4).map(|b| w(b + (r % 4) * 4, r, (r % 251) as u8)).collect();
                    writer.apply(VOL, BS, &writes, false).unwrap();
                }
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            let gc = s.clone();
            scope.spawn(move || {
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    gc.collect_garbage().unwrap();
                }
            });
            let reader = s.clone();
            scope.spawn(move || {
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    // Every block reads as some round's fill, whole: never torn, never an error.
                    let data = reader.read(VOL, BS, 0, 16, None).unwrap();
                    for block in data.chunks(BS as usize) {
                        assert!(block.iter().all(|&x| x == block[0]), "a torn block");
                    }
                }
            });
        });
        for group in 0..4u64 {
            // The last round that wrote group g is the largest r ≤ ROUNDS with r % 4 == g.
            let last = (1..=ROUNDS).filter(|r| r % 4 == group).max().unwrap();
            let got = s.read(VOL, BS, group * 4, 4, None).unwrap();
            assert_eq!(got, expect(BS, &[(last % 251) as u8; 4]));
        }
        s.collect_garbage().unwrap();
        let r = s.collect_garbage().unwrap();
        assert_eq!(r.live_bytes, 16 * u64::from(BS), "{r:?}");
    }

    #[test]
    fn writes_appended_ahead_apply_as_references_and_stay_collectable_until_applied() {
        let (_d, s) = open();
        let mut writes: Vec<_> = (0..8).map(|b| w(b, 1, 0xC0 + b as u8)).collect();
        writes.push(wz(8, 1));
        let guard = s.append_blocks(&mut writes).unwrap().expect("data was appended");
        assert!(writes[..8].iter().all(|w| matches!(w.content, BlockContent::Appended(_))));
        assert_eq!(writes[8].content, BlockContent::Zero);
        // Roll to a new segment so the appended one is sealed: while the guard is held, no
        // collection may take it for dead, although nothing references it yet.
        s.apply(VOL, BS, &[w(20, 2, 1)], false).unwrap();
        s.collect_garbage().unwrap();
        s.apply(VOL, BS, &writes, false).unwrap();
        drop(guard);
        s.collect_garbage().unwrap();
        let want: Vec<u8> = (0..8).map(|b| 0xC0 + b as u8).chain([0]).collect();
        assert_eq!(s.read(VOL, BS, 0, 9, None).unwrap(), expect(BS, &want));
        // A wrong length is refused like a wrong Data length.
        let bad = ExtentRef::decode(&raw_value(&s, 0, 1)).unwrap();
        let bad = BlockWrite { block: 0, seq: 3, content: BlockContent::Appended(ExtentRef { len: 7, ..bad }) };
        assert!(matches!(s.apply(VOL, BS, &[bad], false), Err(BlockStoreError::InvalidWrite(_))));
    }

    /// The raw stored value of `block`@`seq` of VOL.
    fn raw_value(s: &BlockStore, block: u64, seq: u64) -> Vec<u8> {
        let store = s.store();
        store.db().get_cf(store.cf(CF_BLOCKS), block_key(VOL, block, seq)).unwrap().expect("stored")
    }

    // ---- model-based property test ----

    const PBS: u32 = 64;
    const PSIZE: u64 = 300;
    const PBLOCKS: [u64; 7] = [0, 1, 2, 255, 256, 257, 299];

    #[derive(Debug, Clone)]
    enum Op {
        /// New writes with fresh seqs (block index, fill: None = Zero), applied as one batch or
        /// one by one in reverse seq order.
        Writes(Vec<(usize, Option<u8>)>, bool),
        /// Re-apply a version from the model's history.
        Dup(usize),
        Snap,
        DelSnap(usize),
        Rollback(usize),
        /// Zero `count` blocks from `first` with a fresh seq, as one range write.
        Zero(u64, u64),
        /// Re-apply a range zeroing from the model's history (a retried or replayed write).
        DupZero(usize),
        /// Collect extent garbage (the views must not change).
        Gc,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (
                proptest::collection::vec((0..PBLOCKS.len(), proptest::option::of(any::<u8>())), 1..5),
                any::<bool>()
            )
                .prop_map(|(w, rev)| Op::Writes(w, rev)),
            2 => any::<usize>().prop_map(Op::Dup),
            2 => Just(Op::Snap),
            1 => any::<usize>().prop_map(Op::DelSnap),
            1 => any::<usize>().prop_map(Op::Rollback),
            3 => (0..PSIZE, 1..=PSIZE).prop_map(|(first, count)| Op::Zero(first, count.min(PSIZE - first))),
            1 => any::<usize>().prop_map(Op::DupZero),
            2 => Just(Op::Gc),
        ]
    }

    #[derive(Default)]
    struct Model {
        /// block → seq → fill (None = Zero): every version ever applied (not pruned).
        history: BTreeMap<u64, BTreeMap<u64, Option<u8>>>,
        snaps: BTreeMap<u64, u64>,
        hwm: u64,
        /// Every range zeroing applied (not rolled back).
        zeroes: Vec<ZeroRange>,
    }

    impl Model {
        fn view(&self, block: u64, at: Option<u64>) -> u8 {
            self.history
                .get(&block)
                .and_then(|v| v.range(..=at.unwrap_or(u64::MAX)).next_back())
                .and_then(|(_, f)| *f)
                .unwrap_or(0)
        }

        fn snap_seqs(&self) -> Vec<u64> {
            self.snaps.values().copied().collect::<BTreeSet<_>>().into_iter().collect()
        }

        /// The versions the retention invariant says are stored.
        fn needed(&self) -> Vec<(u64, u64)> {
            let seqs = self.snap_seqs();
            let mut out = Vec::new();
            for (&b, versions) in &self.history {
                let vs: Vec<u64> = versions.keys().copied().collect();
                retention(&seqs, &vs, |i, needed| {
                    if needed {
                        out.push((b, vs[i]));
                    }
                });
            }
            out
        }
    }

    fn content(fill: Option<u8>) -> BlockContent {
        match fill {
            Some(f) => data(PBS, f),
            None => BlockContent::Zero,
        }
    }

    fn check(s: &BlockStore, m: &Model) -> Result<(), TestCaseError> {
        prop_assert_eq!(keys(s, VOL), m.needed());
        prop_assert_eq!(s.high_water_mark(VOL).unwrap(), m.hwm);
        let mut expected_snaps: Vec<LocalSnapshot> =
            m.snaps.iter().map(|(&id, &seq)| LocalSnapshot { id, seq }).collect();
        expected_snaps.sort_by_key(|s| (s.seq, s.id));
        prop_assert_eq!(s.snapshots(VOL).unwrap(), expected_snaps);
        let points: Vec<Option<u64>> = std::iter::once(None).chain(m.snap_seqs().into_iter().map(Some)).collect();
        for &at in &points {
            let fills: Vec<u8> = (0..PSIZE).map(|b| m.view(b, at)).collect();
            prop_assert_eq!(s.read(VOL, PBS, 0, PSIZE as u32, at).unwrap(), expect(PBS, &fills));
            for &b in &PBLOCKS {
                let got = s.read_version(VOL, b, at).unwrap().map(|(_, c)| c);
                let want = m
                    .history
                    .get(&b)
                    .and_then(|v| v.range(..=at.unwrap_or(u64::MAX)).next_back())
                    .map(|(_, &f)| content(f));
                prop_assert_eq!(got, want);
            }
            let chunks: Vec<Hash> = (0..chunk_count(PSIZE))
                .map(|c| {
                    let first = c * CHUNK_BLOCKS;
                    let hashes: Vec<Hash> = (first..first + chunk_len(PSIZE, c))
                        .map(|b| block_hash(&vec![m.view(b, at); PBS as usize]))
                        .collect();
                    chunk_hash(&hashes)
                })
                .collect();
            prop_assert_eq!(s.merkle(VOL, PBS, PSIZE, at).unwrap(), MerkleTree::from_chunk_hashes(PBS, PSIZE, chunks));
            // Blocks changed after each snapshot point, up to this point.
            for &after in m.snap_seqs().iter().filter(|&&a| at.is_none_or(|at| a <= at)) {
                let want: Vec<u64> = m
                    .history
                    .iter()
                    .filter(|(_, v)| v.keys().any(|&q| q > after && at.is_none_or(|at| q <= at)))
                    .map(|(&b, _)| b)
                    .collect();
                prop_assert_eq!(s.changed_blocks(VOL, after, at).unwrap(), want);
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn matches_in_memory_model(ops in proptest::collection::vec(op(), 1..30)) {
            let (_d, s) = open();
            let mut m = Model::default();
            let mut next_seq = 1u64;
            let mut next_snap = 1u64;
            for op in ops {
                match op {
                    Op::Writes(ws, reverse) => {
                        let writes: Vec<BlockWrite> = ws
                            .iter()
                            .map(|&(i, fill)| {
                                let seq = next_seq;
                                next_seq += 1;
                                BlockWrite { block: PBLOCKS[i], seq, content: content(fill) }
                            })
                            .collect();
                        if reverse {
                            for wr in writes.iter().rev() {
                                s.apply(VOL, PBS, std::slice::from_ref(wr), false).unwrap();
                            }
                        } else {
                            s.apply(VOL, PBS, &writes, true).unwrap();
                        }
                        for (wr, &(_, fill)) in writes.iter().zip(&ws) {
                            m.history.entry(wr.block).or_default().insert(wr.seq, fill);
                            m.hwm = m.hwm.max(wr.seq);
                        }
                    }
                    Op::Dup(i) => {
                        let all: Vec<(u64, u64, Option<u8>)> = m
                            .history
                            .iter()
                            .flat_map(|(&b, v)| v.iter().map(move |(&q, &f)| (b, q, f)))
                            .collect();
                        if !all.is_empty() {
                            let (block, seq, fill) = all[i % all.len()];
                            s.apply(VOL, PBS, &[BlockWrite { block, seq, content: content(fill) }], false).unwrap();
                        }
                    }
                    Op::Zero(first, count) => {
                        let range = ZeroRange { first, count, seq: next_seq };
                        next_seq += 1;
                        // Exactly the blocks whose newest content is Data get a Zero version.
                        let with_data: Vec<u64> = (first..first + count)
                            .filter(|b| m.history.get(b).and_then(|v| v.values().next_back()).is_some_and(|f| f.is_some()))
                            .collect();
                        prop_assert_eq!(s.zero_range(VOL, range, false).unwrap(), with_data.len() as u64);
                        for b in with_data {
                            m.history.entry(b).or_default().insert(range.seq, None);
                        }
                        m.hwm = m.hwm.max(range.seq);
                        m.zeroes.push(range);
                    }
                    Op::Gc => {
                        s.collect_garbage().unwrap();
                    }
                    Op::DupZero(i) => {
                        if !m.zeroes.is_empty() {
                            let range = m.zeroes[i % m.zeroes.len()];
                            s.zero_range(VOL, range, false).unwrap();
                        }
                    }
                    Op::Snap => {
                        s.snapshot_create(VOL, next_snap, m.hwm).unwrap();
                        m.snaps.insert(next_snap, m.hwm);
                        next_snap += 1;
                    }
                    Op::DelSnap(i) => {
                        let ids: Vec<u64> = m.snaps.keys().copied().collect();
                        if ids.is_empty() {
                            prop_assert!(!s.snapshot_delete(VOL, 999).unwrap());
                        } else {
                            let id = ids[i % ids.len()];
                            prop_assert!(s.snapshot_delete(VOL, id).unwrap());
                            m.snaps.remove(&id);
                        }
                    }
                    Op::Rollback(i) => {
                        let seqs = m.snap_seqs();
                        if !seqs.is_empty() {
                            let to = seqs[i % seqs.len()];
                            let want: Vec<u64> = m
                                .needed()
                                .into_iter()
                                .filter(|&(_, q)| q > to)
                                .map(|(b, _)| b)
                                .collect::<BTreeSet<_>>()
                                .into_iter()
                                .collect();
                            prop_assert_eq!(s.rollback(VOL, to).unwrap(), want);
                            for v in m.history.values_mut() {
                                v.retain(|&q, _| q <= to);
                            }
                            m.history.retain(|_, v| !v.is_empty());
                            m.snaps.retain(|_, &mut q| q <= to);
                            m.zeroes.retain(|z| z.seq <= to);
                            m.hwm = to;
                        }
                    }
                }
                check(&s, &m)?;
            }
        }
    }
}
