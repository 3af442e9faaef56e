//! Extent segments: the files that hold volume block data. The `blocks` column family keeps,
//! per block version, only a 25-byte [`ExtentRef`] pointing into one of these files.
//!
//! Why: a 1 MiB write stored as 256 RocksDB values was written twice (the write-ahead log, then
//! the blob file at memtable flush) plus a memtable copy; the profile of `write 1M` showed the
//! WAL's buffered `write(2)` copy and the flush copy as most of the workers' time. Here block
//! data is written once, with one `pwritev(2)` per apply, and RocksDB logs only the references.
//!
//! This module owns the directory `<block db>/extents/`: append-only segment files named by a
//! 16-hex-digit id, at most [`SEGMENT_BYTES`] each (one apply's run may overrun it). It knows
//! nothing of volumes, blocks or versions: it appends byte runs, reads them back, syncs them,
//! and deletes whole segments when told ([`Segments::delete`]); deciding which segments are dead
//! is the block store's garbage collection (`blockstore::BlockStore::collect_garbage`).
//!
//! # Invariants
//!
//! - **Appends go only to the active segment** (the newest). A segment below the active one is
//!   sealed: nothing new is written into it, and once its in-flight appends are done
//!   ([`Segments::sealed_idle`]) every reference into it is visible in the database.
//! - **Data before references.** A reference is written to the database only after its bytes
//!   were written here; it is made durable only after they were synced ([`Segments::sync_dirty`]
//!   before the WAL's fsync): a `FUA` write or a `FLUSH` never leaves a durable reference to
//!   bytes that are not.
//! - **Readers hold the file table.** [`Segments::reader`] holds the table shared for as long
//!   as the caller resolves references, and [`Segments::delete`] takes it exclusively: a
//!   segment is never unlinked under a reader that found a reference into it.
//!
//! Power loss (not a process crash) between a memtable flush and the next sync can leave a
//! reference whose bytes never reached the disk: each reference carries the CRC32C of its bytes,
//! and a mismatch is reported as corruption ([`ExtentError::Checksum`]), never returned as data.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};

/// A segment is sealed once an append would take it past this size (by default).
pub const SEGMENT_BYTES: u64 = 256 << 20;

/// Length of an encoded [`ExtentRef`].
pub const EXTENT_REF_LEN: usize = 25;
const EXTENT_REF_MAGIC: u8 = 0xE5;

/// `writev` takes at most this many buffers per call (Linux's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ExtentError {
    #[error("extent segment {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("extent segment {seg:016x} is missing (offset {offset})")]
    Missing { seg: u64, offset: u64 },
    #[error("extent in segment {seg:016x} at {offset}: checksum {found:08x}, expected {expected:08x}")]
    Checksum { seg: u64, offset: u64, expected: u32, found: u32 },
}

fn io_err(path: &Path, source: io::Error) -> ExtentError {
    ExtentError::Io { path: path.to_owned(), source }
}

/// Where one block version's bytes are: `len` bytes at `offset` of segment `seg`, whose CRC32C
/// is `crc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentRef {
    pub seg: u64,
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
}

impl ExtentRef {
    /// `magic(1) | seg(8) | offset(8) | len(4) | crc(4)`, big-endian.
    pub fn encode(&self) -> [u8; EXTENT_REF_LEN] {
        let mut out = [0u8; EXTENT_REF_LEN];
        out[0] = EXTENT_REF_MAGIC;
        out[1..9].copy_from_slice(&self.seg.to_be_bytes());
        out[9..17].copy_from_slice(&self.offset.to_be_bytes());
        out[17..21].copy_from_slice(&self.len.to_be_bytes());
        out[21..25].copy_from_slice(&self.crc.to_be_bytes());
        out
    }

    /// `None` unless `v` is an encoded reference.
    pub fn decode(v: &[u8]) -> Option<Self> {
        let v: &[u8; EXTENT_REF_LEN] = v.try_into().ok()?;
        if v[0] != EXTENT_REF_MAGIC {
            return None;
        }
        let u64_at = |i: usize| u64::from_be_bytes(v[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_be_bytes(v[i..i + 4].try_into().expect("4 bytes"));
        Some(Self { seg: u64_at(1), offset: u64_at(9), len: u32_at(17), crc: u32_at(21) })
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

struct Active {
    seg: u64,
    file: Arc<File>,
    /// Where the next append starts.
    next: u64,
}

/// The segment files of one block database. Cheap to share behind an `Arc`.
pub struct Segments {
    dir: PathBuf,
    /// [`SEGMENT_BYTES`] but in tests.
    segment_bytes: u64,
    files: RwLock<BTreeMap<u64, Arc<File>>>,
    active: Mutex<Active>,
    /// Appends reserved but not yet finished (their references not yet committed), per segment.
    in_flight: Mutex<HashMap<u64, u32>>,
    /// Segments written since their last sync.
    dirty: Mutex<BTreeSet<u64>>,
    /// Bytes appended since the last garbage collection (what triggers the next one).
    appended_bytes: AtomicU64,
}

/// An append whose references are not yet committed: keeps its segment from counting as idle
/// ([`Segments::sealed_idle`]) until dropped, which the holder does after its database write
/// (or once it gave the write up: its bytes are then garbage).
pub struct AppendGuard {
    segs: Arc<Segments>,
    seg: u64,
}

impl std::fmt::Debug for AppendGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AppendGuard({:016x})", self.seg)
    }
}

impl Drop for AppendGuard {
    fn drop(&mut self) {
        let mut in_flight = self.segs.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = in_flight.get_mut(&self.seg) {
            *n -= 1;
            if *n == 0 {
                in_flight.remove(&self.seg);
            }
        }
    }
}

/// The segment table held shared: references resolved through it stay readable until dropped.
pub struct SegmentReader<'a> {
    dir: &'a Path,
    files: RwLockReadGuard<'a, BTreeMap<u64, Arc<File>>>,
}

impl SegmentReader<'_> {
    /// Read `buf.len()` bytes at `offset` of `seg`, unchecked (the caller verifies checksums).
    pub fn read_raw(&self, seg: u64, offset: u64, buf: &mut [u8]) -> Result<(), ExtentError> {
        let file = self.files.get(&seg).ok_or(ExtentError::Missing { seg, offset })?;
        file.read_exact_at(buf, offset).map_err(|source| match source.kind() {
            io::ErrorKind::UnexpectedEof => ExtentError::Missing { seg, offset },
            _ => io_err(&self.dir.join(segment_name(seg)), source),
        })
    }

    /// Read the bytes of `r` into `buf` (exactly `r.len` long) and verify their checksum.
    pub fn read(&self, r: &ExtentRef, buf: &mut [u8]) -> Result<(), ExtentError> {
        debug_assert_eq!(buf.len(), r.len as usize);
        self.read_raw(r.seg, r.offset, buf)?;
        verify(r, buf)
    }
}

/// Check `data` against the checksum of `r`.
pub fn verify(r: &ExtentRef, data: &[u8]) -> Result<(), ExtentError> {
    let found = crc32c::crc32c(data);
    if found != r.crc {
        return Err(ExtentError::Checksum { seg: r.seg, offset: r.offset, expected: r.crc, found });
    }
    Ok(())
}

fn segment_name(seg: u64) -> String {
    format!("{seg:016x}.seg")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok()).flatten()
}

fn fsync_dir(dir: &Path) -> Result<(), ExtentError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir, e))
}

impl Segments {
    /// Open (creating if needed) the segments under `dir`, sealing at `segment_bytes`
    /// ([`SEGMENT_BYTES`] but in tests). Existing segments are sealed; appends go to a new one.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<Self, ExtentError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
            let entry = entry.map_err(|e| io_err(dir, e))?;
            let Some(seg) = entry.file_name().to_str().and_then(parse_segment_name) else { continue };
            let path = entry.path();
            let file = File::open(&path).map_err(|e| io_err(&path, e))?;
            files.insert(seg, Arc::new(file));
        }
        let seg = files.keys().next_back().map_or(1, |s| s + 1);
        let file = Self::create(dir, seg)?;
        files.insert(seg, file.clone());
        Ok(Self {
            dir: dir.to_owned(),
            segment_bytes,
            files: RwLock::new(files),
            active: Mutex::new(Active { seg, file, next: 0 }),
            in_flight: Mutex::new(HashMap::new()),
            dirty: Mutex::new(BTreeSet::new()),
            appended_bytes: AtomicU64::new(0),
        })
    }

    fn create(dir: &Path, seg: u64) -> Result<Arc<File>, ExtentError> {
        let path = dir.join(segment_name(seg));
        let file =
            OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(|e| io_err(&path, e))?;
        // The directory entry must be durable before any durable reference into the file.
        fsync_dir(dir)?;
        Ok(Arc::new(file))
    }

    /// Append `bufs` as one contiguous run with one `pwritev`; returns one reference per buffer
    /// and a guard to drop once the references are committed (or abandoned).
    pub fn append(self: &Arc<Self>, bufs: &[&[u8]]) -> Result<(Vec<ExtentRef>, AppendGuard), ExtentError> {
        let lens = bufs.iter().map(|b| u32::try_from(b.len())).collect::<Result<Vec<u32>, _>>().map_err(|_| {
            io_err(&self.dir, io::Error::new(io::ErrorKind::InvalidInput, "an extent of 4 GiB or more"))
        })?;
        let total: u64 = lens.iter().map(|&l| u64::from(l)).sum();
        let (seg, file, start) = self.reserve(total)?;
        let guard = AppendGuard { segs: self.clone(), seg };
        let path = || self.dir.join(segment_name(seg));
        pwritev_all(&file, start, bufs).map_err(|e| io_err(&path(), e))?;
        self.dirty.lock().unwrap_or_else(PoisonError::into_inner).insert(seg);
        self.appended_bytes.fetch_add(total, Ordering::Relaxed);
        let mut offset = start;
        let refs = bufs
            .iter()
            .zip(lens)
            .map(|(b, len)| {
                let r = ExtentRef { seg, offset, len, crc: crc32c::crc32c(b) };
                offset += u64::from(len);
                r
            })
            .collect();
        Ok((refs, guard))
    }

    /// Reserve `len` bytes in the active segment (rolling to a new one if it would overrun) and
    /// count the append in flight.
    fn reserve(&self, len: u64) -> Result<(u64, Arc<File>, u64), ExtentError> {
        let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        if active.next > 0 && active.next + len > self.segment_bytes {
            let seg = active.seg + 1;
            let file = Self::create(&self.dir, seg)?;
            self.files.write().unwrap_or_else(PoisonError::into_inner).insert(seg, file.clone());
            *active = Active { seg, file, next: 0 };
        }
        let start = active.next;
        active.next += len;
        *self.in_flight.lock().unwrap_or_else(PoisonError::into_inner).entry(active.seg).or_insert(0) += 1;
        Ok((active.seg, active.file.clone(), start))
    }

    /// Hold the file table shared while resolving references (see the module invariants).
    pub fn reader(&self) -> SegmentReader<'_> {
        SegmentReader { dir: &self.dir, files: self.files.read().unwrap_or_else(PoisonError::into_inner) }
    }

    /// Make every append so far durable (`fdatasync` of each segment written since its last sync).
    pub fn sync_dirty(&self) -> Result<(), ExtentError> {
        let dirty = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(PoisonError::into_inner));
        let files: Vec<(u64, Arc<File>)> = {
            let table = self.files.read().unwrap_or_else(PoisonError::into_inner);
            dirty.iter().filter_map(|s| table.get(s).map(|f| (*s, f.clone()))).collect()
        };
        for (seg, file) in files {
            if let Err(e) = file.sync_data() {
                // Keep it dirty so that the next sync tries again.
                self.dirty.lock().unwrap_or_else(PoisonError::into_inner).insert(seg);
                return Err(io_err(&self.dir.join(segment_name(seg)), e));
            }
        }
        Ok(())
    }

    /// The sealed segments with no append in flight, with their sizes in bytes: every reference
    /// into them is committed, and none will be added except by copying an existing one.
    pub fn sealed_idle(&self) -> Vec<(u64, u64)> {
        let active = self.active.lock().unwrap_or_else(PoisonError::into_inner).seg;
        let in_flight = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        let table = self.files.read().unwrap_or_else(PoisonError::into_inner);
        table
            .iter()
            .filter(|(s, _)| **s < active && !in_flight.contains_key(s))
            .map(|(s, f)| (*s, f.metadata().map_or(0, |m| m.len())))
            .collect()
    }

    /// Unlink sealed segments the caller has proved unreferenced (and whose dropping of the
    /// last reference is durable). Waits for readers holding the table, but holds it only to take
    /// the segments out: the unlink and the close that frees their cached pages (tens of ms for
    /// a full segment) happen after, so reads do not stall behind them.
    pub fn delete(&self, segs: &[u64]) -> Result<(), ExtentError> {
        let active = self.active.lock().unwrap_or_else(PoisonError::into_inner).seg;
        let removed: Vec<(u64, Option<Arc<File>>)> = {
            let mut table = self.files.write().unwrap_or_else(PoisonError::into_inner);
            segs.iter()
                .map(|&seg| {
                    assert!(seg < active, "deleting the active segment {seg:016x}");
                    (seg, table.remove(&seg))
                })
                .collect()
        };
        for (seg, file) in removed {
            self.dirty.lock().unwrap_or_else(PoisonError::into_inner).remove(&seg);
            let path = self.dir.join(segment_name(seg));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path, e)),
            }
            drop(file);
        }
        fsync_dir(&self.dir)
    }

    /// Bytes appended since the last call (garbage collection resets it).
    pub fn take_appended_bytes(&self) -> u64 {
        self.appended_bytes.swap(0, Ordering::Relaxed)
    }

    pub fn appended_bytes(&self) -> u64 {
        self.appended_bytes.load(Ordering::Relaxed)
    }

    /// Total bytes of all segments.
    pub fn total_bytes(&self) -> u64 {
        let table = self.files.read().unwrap_or_else(PoisonError::into_inner);
        table.values().map(|f| f.metadata().map_or(0, |m| m.len())).sum()
    }

    pub fn segment_count(&self) -> usize {
        self.files.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// FAULT INJECTION: overwrite stored bytes in place, as silent corruption would.
    pub fn overwrite(&self, seg: u64, offset: u64, data: &[u8]) -> Result<(), ExtentError> {
        let path = self.dir.join(segment_name(seg));
        let file = OpenOptions::new().write(true).open(&path).map_err(|e| io_err(&path, e))?;
        file.write_all_at(data, offset).map_err(|e| io_err(&path, e))?;
        file.sync_data().map_err(|e| io_err(&path, e))
    }
}

/// `pwritev(2)` all of `bufs` at `offset`, resuming after short writes.
fn pwritev_all(file: &File, mut offset: u64, bufs: &[&[u8]]) -> io::Result<()> {
    let mut iov: Vec<libc::iovec> = bufs
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| libc::iovec { iov_base: b.as_ptr() as *mut _, iov_len: b.len() })
        .collect();
    let mut first = 0;
    while first < iov.len() {
        let batch = &iov[first..iov.len().min(first + MAX_IOVECS)];
        let off = libc::off_t::try_from(offset).map_err(|_| io::Error::other("segment offset overflow"))?;
        // SAFETY: every iovec points into a live `&[u8]` of `bufs` (borrowed for this call), the
        // count is at most IOV_MAX, and pwritev only reads from them.
        let n = unsafe { libc::pwritev(file.as_raw_fd(), batch.as_ptr(), batch.len() as libc::c_int, off) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "pwritev wrote nothing"));
        }
        let mut written = n as usize;
        offset += written as u64;
        // Skip whole buffers written, then shorten a partly written one.
        while written > 0 {
            let v = &mut iov[first];
            if written >= v.iov_len {
                written -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: stays within the same buffer (written < iov_len).
                v.iov_base = unsafe { (v.iov_base as *mut u8).add(written) } as *mut _;
                v.iov_len -= written;
                written = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_round_trip_and_other_values_are_not_refs() {
        let r = ExtentRef { seg: 3, offset: 1 << 33, len: 4096, crc: 0xDEAD_BEEF };
        assert_eq!(ExtentRef::decode(&r.encode()), Some(r));
        assert_eq!(ExtentRef::decode(&[0u8; EXTENT_REF_LEN]), None);
        assert_eq!(ExtentRef::decode(&r.encode()[..24]), None);
        assert_eq!(ExtentRef::decode(b""), None);
    }

    #[test]
    fn appends_read_back_verified_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let segs = Arc::new(Segments::open(dir.path(), SEGMENT_BYTES).unwrap());
        let a = vec![0xA5u8; 4096];
        let b = vec![0x5Au8; 512];
        let (refs, guard) = segs.append(&[&a, &b]).unwrap();
        drop(guard);
        assert_eq!(refs[1].offset, refs[0].end());
        segs.sync_dirty().unwrap();
        drop(segs);

        let segs = Arc::new(Segments::open(dir.path(), SEGMENT_BYTES).unwrap());
        let mut buf = vec![0u8; 4096];
        segs.reader().read(&refs[0], &mut buf).unwrap();
        assert_eq!(buf, a);
        let mut buf = vec![0u8; 512];
        segs.reader().read(&refs[1], &mut buf).unwrap();
        assert_eq!(buf, b);
        // Reopening seals the old segment and appends to a new one.
        let (more, _g) = segs.append(&[&a]).unwrap();
        assert!(more[0].seg > refs[0].seg);
    }

    #[test]
    fn corruption_and_missing_segments_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let segs = Arc::new(Segments::open(dir.path(), SEGMENT_BYTES).unwrap());
        let (refs, _g) = segs.append(&[&[7u8; 512]]).unwrap();
        segs.overwrite(refs[0].seg, refs[0].offset + 10, &[8]).unwrap();
        let mut buf = vec![0u8; 512];
        assert!(matches!(segs.reader().read(&refs[0], &mut buf), Err(ExtentError::Checksum { .. })));
        let ghost = ExtentRef { seg: 999, ..refs[0] };
        assert!(matches!(segs.reader().read(&ghost, &mut buf), Err(ExtentError::Missing { .. })));
        let past_end = ExtentRef { offset: 1 << 20, ..refs[0] };
        assert!(matches!(segs.reader().read(&past_end, &mut buf), Err(ExtentError::Missing { .. })));
    }

    #[test]
    fn segments_roll_and_only_idle_sealed_ones_are_offered_for_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let segs = Arc::new(Segments::open(dir.path(), 4096).unwrap());
        let big = vec![1u8; 2049];
        let (r1, g1) = segs.append(&[&big]).unwrap();
        let (r2, g2) = segs.append(&[&big]).unwrap();
        assert_ne!(r1[0].seg, r2[0].seg, "the second run does not fit in the first segment");
        assert!(segs.sealed_idle().is_empty(), "the sealed segment has an append in flight");
        drop(g1);
        assert_eq!(segs.sealed_idle(), vec![(r1[0].seg, r1[0].len as u64)]);
        segs.delete(&[r1[0].seg]).unwrap();
        assert_eq!(segs.segment_count(), 1);
        drop(g2);
        let mut buf = vec![0u8; 16];
        assert!(segs.reader().read_raw(r1[0].seg, 0, &mut buf).is_err());
        segs.reader().read_raw(r2[0].seg, 0, &mut buf).unwrap();
    }
}
