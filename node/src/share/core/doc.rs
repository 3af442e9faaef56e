//! Shared documents and their diffs: the [`Doc`] type (a key-value map that keeps its size in
//! bytes), exact diffs between two documents ([`diff`]), and the two ways a diff is applied:
//! [`apply_strict`] (all or nothing, for shadows: the diff must fit exactly) and [`apply_fuzzy`]
//! (best effort, for live copies, as in Neil Fraser's Differential Synchronization: what still
//! fits applies, what does not is skipped and counted as a conflict).
//!
//! Diffs come from peers: they may be malformed or not fit. Applying one never panics; a strict
//! apply that does not fit is a typed [`PatchError`] and leaves the document unchanged, and no
//! apply ever takes a document past the share limits (`MAX_SHARE_*`).
//!
//! This module owns the byte-level arithmetic of diffs. It must not do I/O, read a clock or keep
//! any state beyond the document itself.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use haven_proto::share::{
    validate_key, ShareDiff, ShareOp, MAX_DIFF_OPS, MAX_SHARE_DOC_BYTES, MAX_SHARE_KEYS, MAX_SHARE_KEY_LEN,
    MAX_SHARE_VALUE_LEN,
};

/// Runs of differing bytes separated by fewer equal bytes than this are sent as one splice: a
/// splice's header (offset, lengths, CRC) costs about as much.
pub const MERGE_GAP_BYTES: usize = 24;
/// A changed value is sent whole (a `Put`) when its splices would carry at least this share of
/// the new value (percent). Kept above 1/1.1 so a `Put` never costs more than 1.1 × its splices.
pub const PUT_THRESHOLD_PERCENT: usize = 92;
/// Most payload bytes one round carries (see [`diff_bounded`]): with the op headers of at most
/// `MAX_DIFF_OPS` ops this keeps a round well inside one frame (`MAX_FRAME_LEN`, 16 MiB), which
/// a diff replacing one full document by another (old keys deleted, new ones put) would not be.
pub const MAX_ROUND_PAYLOAD_BYTES: u64 = MAX_SHARE_DOC_BYTES;
/// Bytes compared at a time when looking for differing runs (equal chunks are skipped whole).
const SCAN_CHUNK_BYTES: usize = 64;

/// Why a diff was refused by [`apply_strict`] or a document could not be built or changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    #[error("malformed diff: {0}")]
    Invalid(String),
    #[error("delete of key {key:?}, which is absent")]
    DeleteAbsent { key: String },
    #[error("splice on key {key:?}, which is absent")]
    SpliceAbsent { key: String },
    #[error("splice on key {key:?} computed against a {expected_len}-byte value, the value has {found_len} bytes")]
    LengthMismatch { key: String, expected_len: u64, found_len: u64 },
    #[error("splice on key {key:?} at {at}: the bytes it replaces differ (CRC mismatch)")]
    CrcMismatch { key: String, at: u64 },
    #[error("key {key:?} appears twice")]
    DuplicateKey { key: String },
    #[error("a share key has at most {MAX_SHARE_KEY_LEN} bytes, got {len}")]
    KeyTooLong { len: usize },
    #[error("value of key {key:?} would have {len_bytes} bytes, the limit is {MAX_SHARE_VALUE_LEN}")]
    ValueTooLarge { key: String, len_bytes: u64 },
    #[error("the document would have {doc_bytes} bytes, the limit is {MAX_SHARE_DOC_BYTES}")]
    DocTooLarge { doc_bytes: u64 },
    #[error("the document would have {keys} keys, the limit is {MAX_SHARE_KEYS}")]
    TooManyKeys { keys: usize },
}

/// A shared document: keys to byte values, ordered by key, with its size kept up to date.
///
/// **Invariant:** `bytes` is the sum of `key.len() + value.len()` over all entries. Serialized as
/// the bare map (the size is recomputed when read back).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Doc {
    entries: BTreeMap<String, Vec<u8>>,
    bytes: u64,
}

impl serde::Serialize for Doc {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde::Serialize::serialize(&self.entries, s)
    }
}

impl<'de> serde::Deserialize<'de> for Doc {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let entries: BTreeMap<String, Vec<u8>> = serde::Deserialize::deserialize(d)?;
        let bytes = entries.iter().map(|(k, v)| entry_bytes(k, v)).sum();
        Ok(Self { entries, bytes })
    }
}

fn entry_bytes(key: &str, value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64
}

impl Doc {
    pub fn new() -> Self {
        Self::default()
    }

    /// A document from entries that came from a peer or a client: keys distinct and every limit
    /// kept, else a typed error.
    pub fn from_entries(entries: Vec<(String, Vec<u8>)>) -> Result<Self, PatchError> {
        if entries.len() > MAX_SHARE_KEYS {
            return Err(PatchError::TooManyKeys { keys: entries.len() });
        }
        let mut doc = Self::new();
        for (key, value) in entries {
            check_entry(&key, &value)?;
            if doc.entries.contains_key(&key) {
                return Err(PatchError::DuplicateKey { key });
            }
            doc.insert_raw(key, value);
        }
        if doc.bytes > MAX_SHARE_DOC_BYTES {
            return Err(PatchError::DocTooLarge { doc_bytes: doc.bytes });
        }
        Ok(doc)
    }

    /// Every entry, in key order.
    pub fn entries(&self) -> Vec<(String, Vec<u8>)> {
        self.entries.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.entries.get(key).map(Vec::as_slice)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Vec<u8>)> {
        self.entries.iter()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sum of `key.len() + value.len()` over all entries.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// blake3 of the document, hex: equal digests, equal documents.
    pub fn digest(&self) -> String {
        digest(self)
    }

    /// Set `key` to `value` (`None`: delete it), refusing anything past the limits with the
    /// document unchanged. Returns whether the document changed.
    pub fn set(&mut self, key: &str, value: Option<Vec<u8>>) -> Result<bool, PatchError> {
        let Some(value) = value else {
            return Ok(self.remove_raw(key).is_some());
        };
        check_entry(key, &value)?;
        if self.get(key) == Some(value.as_slice()) {
            return Ok(false);
        }
        let old = self.get(key).map(|v| entry_bytes(key, v));
        let keys = self.len() + usize::from(old.is_none());
        check_doc(self.bytes - old.unwrap_or(0) + entry_bytes(key, &value), keys)?;
        self.insert_raw(key.to_string(), value);
        Ok(true)
    }

    fn insert_raw(&mut self, key: String, value: Vec<u8>) -> Option<Vec<u8>> {
        self.bytes += entry_bytes(&key, &value);
        let old = self.entries.insert(key.clone(), value);
        if let Some(old) = &old {
            self.bytes -= entry_bytes(&key, old);
        }
        old
    }

    fn remove_raw(&mut self, key: &str) -> Option<Vec<u8>> {
        let old = self.entries.remove(key)?;
        self.bytes -= entry_bytes(key, &old);
        Some(old)
    }

    /// Replace `removed` bytes at `at` in the value of `key` by `inserted`. The caller checked
    /// the key exists and the range fits.
    fn splice_raw(&mut self, key: &str, at: usize, removed: usize, inserted: &[u8]) {
        let Some(value) = self.entries.get_mut(key) else {
            debug_assert!(false, "splice_raw on absent key {key:?}");
            return;
        };
        debug_assert!(at + removed <= value.len());
        value.splice(at..at + removed, inserted.iter().copied());
        self.bytes = self.bytes - removed as u64 + inserted.len() as u64;
    }
}

fn check_entry(key: &str, value: &[u8]) -> Result<(), PatchError> {
    if key.len() > MAX_SHARE_KEY_LEN {
        return Err(PatchError::KeyTooLong { len: key.len() });
    }
    if value.len() > MAX_SHARE_VALUE_LEN {
        return Err(PatchError::ValueTooLarge { key: key.to_string(), len_bytes: value.len() as u64 });
    }
    Ok(())
}

fn check_doc(doc_bytes: u64, keys: usize) -> Result<(), PatchError> {
    if doc_bytes > MAX_SHARE_DOC_BYTES {
        return Err(PatchError::DocTooLarge { doc_bytes });
    }
    if keys > MAX_SHARE_KEYS {
        return Err(PatchError::TooManyKeys { keys });
    }
    Ok(())
}

/// blake3 over a length-prefixed encoding of the document (key count, then each key and value
/// with its length), hex.
pub fn digest(doc: &Doc) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&(doc.len() as u64).to_le_bytes());
    for (key, value) in doc.iter() {
        h.update(&(key.len() as u64).to_le_bytes());
        h.update(key.as_bytes());
        h.update(&(value.len() as u64).to_le_bytes());
        h.update(value);
    }
    h.finalize().to_hex().to_string()
}

/// What applying a diff did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Operations that applied (a delete of an absent key counts, in a fuzzy apply).
    pub ops_applied: u64,
    /// Operations a fuzzy apply skipped: the splice no longer fits, or a limit would be passed.
    pub conflicts: u64,
    /// Keys whose value changed, in key order.
    pub changed_keys: Vec<String>,
}

impl Applied {
    pub fn changed(&self) -> bool {
        !self.changed_keys.is_empty()
    }
}

/// Walk the keys of two documents in order, calling `f(key, in_base, in_target)` for every key
/// whose value differs (absent on one side counts as differing).
fn for_each_difference(base: &Doc, target: &Doc, mut f: impl FnMut(&str, Option<&[u8]>, Option<&[u8]>)) {
    let mut b = base.entries.iter().peekable();
    let mut t = target.entries.iter().peekable();
    loop {
        match (b.peek(), t.peek()) {
            (None, None) => return,
            (Some((bk, bv)), None) => {
                f(bk, Some(bv), None);
                b.next();
            }
            (None, Some((tk, tv))) => {
                f(tk, None, Some(tv));
                t.next();
            }
            (Some((bk, bv)), Some((tk, tv))) => match bk.cmp(tk) {
                std::cmp::Ordering::Less => {
                    f(bk, Some(bv), None);
                    b.next();
                }
                std::cmp::Ordering::Greater => {
                    f(tk, None, Some(tv));
                    t.next();
                }
                std::cmp::Ordering::Equal => {
                    if bv != tv {
                        f(bk, Some(bv), Some(tv));
                    }
                    b.next();
                    t.next();
                }
            },
        }
    }
}

/// The exact diff from `base` to `target`: `apply_strict(base, diff(base, target))` gives
/// `target`. New keys are `Put`, removed keys `Delete`, changed values splices when those are
/// cheaper than resending the value.
pub fn diff(base: &Doc, target: &Doc) -> ShareDiff {
    let mut ops = Vec::new();
    for_each_difference(base, target, |key, old, new| match (old, new) {
        (_, None) => ops.push(ShareOp::Delete { key: key.to_string() }),
        (None, Some(new)) => ops.push(ShareOp::Put { key: key.to_string(), value: new.to_vec() }),
        (Some(old), Some(new)) => value_ops(key, old, new, &mut ops),
    });
    ShareDiff { ops }
}

/// What a round carries: [`diff`] cut to [`MAX_DIFF_OPS`] ops and [`MAX_ROUND_PAYLOAD_BYTES`]
/// (see [`diff_bounded`]), and whether that is all of it.
pub fn round_diff(base: &Doc, target: &Doc) -> (ShareDiff, bool) {
    diff_bounded(base, target, MAX_DIFF_OPS, MAX_ROUND_PAYLOAD_BYTES)
}

/// A prefix of [`diff`] that stays within `max_ops` ops and `max_payload_bytes` (by
/// [`ShareOp::payload_bytes`]): whole keys in key order, a key whose splices would pass
/// `max_ops` sent as one `Put`. Never empty when the documents differ (the first key goes even
/// if it alone passes the byte budget). Returns whether it is the whole diff; if not, applying
/// it to `base` gives a document between the two, and the rest follows from there.
pub fn diff_bounded(base: &Doc, target: &Doc, max_ops: usize, max_payload_bytes: u64) -> (ShareDiff, bool) {
    assert!(max_ops >= 1, "a bounded diff needs room for one op");
    let (mut ops, mut payload, mut complete) = (Vec::new(), 0u64, true);
    for_each_difference(base, target, |key, old, new| {
        if !complete {
            return;
        }
        let mut key_ops = Vec::new();
        match (old, new) {
            (_, None) => key_ops.push(ShareOp::Delete { key: key.to_string() }),
            (None, Some(new)) => key_ops.push(ShareOp::Put { key: key.to_string(), value: new.to_vec() }),
            (Some(old), Some(new)) => value_ops(key, old, new, &mut key_ops),
        }
        if ops.len() + key_ops.len() > max_ops {
            if let Some(new) = new {
                key_ops = vec![ShareOp::Put { key: key.to_string(), value: new.to_vec() }];
            }
        }
        let key_payload: u64 = key_ops.iter().map(ShareOp::payload_bytes).sum();
        let fits = ops.len() + key_ops.len() <= max_ops && payload + key_payload <= max_payload_bytes;
        if !fits && !ops.is_empty() {
            complete = false;
            return;
        }
        payload += key_payload;
        ops.extend(key_ops);
    });
    (ShareDiff { ops }, complete)
}

/// The ops that turn `old` into `new` (which differ): splices, or one `Put` when the splices
/// would carry nearly the whole new value anyway.
fn value_ops(key: &str, old: &[u8], new: &[u8], out: &mut Vec<ShareOp>) {
    debug_assert_ne!(old, new);
    // (range in old, range in new) per splice; ranges in old are as the value is when the splice
    // applies (equal-length splices do not shift, and there is one splice otherwise).
    let splices: Vec<(Range<usize>, Range<usize>)> = if old.len() == new.len() {
        differing_runs(old, new, MERGE_GAP_BYTES).into_iter().map(|r| (r.clone(), r)).collect()
    } else {
        vec![middle(old, new)]
    };
    let inserted: usize = splices.iter().map(|(_, n)| n.len()).sum();
    if inserted * 100 >= new.len() * PUT_THRESHOLD_PERCENT {
        out.push(ShareOp::Put { key: key.to_string(), value: new.to_vec() });
        return;
    }
    for (o, n) in splices {
        out.push(ShareOp::Splice {
            key: key.to_string(),
            at: o.start as u64,
            removed: o.len() as u64,
            inserted: new[n].to_vec(),
            old_len: old.len() as u64,
            old_crc: crc32c::crc32c(&old[o]),
        });
    }
}

/// The ranges where two equal-length values differ, runs closer than `merge_gap` equal bytes
/// merged into one (`merge_gap` 0: every maximal run on its own).
fn differing_runs(old: &[u8], new: &[u8], merge_gap: usize) -> Vec<Range<usize>> {
    assert_eq!(old.len(), new.len(), "differing_runs needs equal lengths");
    let mut runs: Vec<Range<usize>> = Vec::new();
    let mut start = 0;
    for (o, n) in old.chunks(SCAN_CHUNK_BYTES).zip(new.chunks(SCAN_CHUNK_BYTES)) {
        if o != n {
            for (i, (a, b)) in o.iter().zip(n).enumerate() {
                if a != b {
                    push_byte(&mut runs, start + i, merge_gap);
                }
            }
        }
        start += o.len();
    }
    runs
}

/// Extend the last run to cover byte `at`, or start a new run if the gap is too wide.
fn push_byte(runs: &mut Vec<Range<usize>>, at: usize, merge_gap: usize) {
    match runs.last_mut() {
        Some(last) if at - last.end < merge_gap.max(1) => last.end = at + 1,
        _ => runs.push(at..at + 1),
    }
}

/// The changed middle of two values: the ranges in `old` and `new` between their common prefix
/// and their common suffix (which do not overlap).
fn middle(old: &[u8], new: &[u8]) -> (Range<usize>, Range<usize>) {
    let prefix = old.iter().zip(new).take_while(|(a, b)| a == b).count();
    let room = old.len().min(new.len()) - prefix;
    let suffix = old.iter().rev().zip(new.iter().rev()).take(room).take_while(|(a, b)| a == b).count();
    (prefix..old.len() - suffix, prefix..new.len() - suffix)
}

/// How much changed between two documents, for sizing what a diff between them should cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Change {
    /// Bytes that differ: for equal-length values the differing bytes, else the larger of the
    /// two changed middles; a new key its key and value, a removed key its key.
    pub bytes: u64,
    /// Maximal runs of differing bytes (one per new, removed or resized key).
    pub runs: u64,
    /// Longest key among the changed ones.
    pub max_key_len: u64,
}

impl Change {
    /// What the payload of the diff (`ShareOp::payload_bytes` summed) may be: 1.1 × the changed
    /// bytes, plus per run its key and the equal bytes a merge of nearby runs resends.
    pub fn payload_budget(&self) -> u64 {
        self.bytes * 11 / 10 + 1 + self.runs * (self.max_key_len + 2 * MERGE_GAP_BYTES as u64)
    }
}

/// See [`Change`].
pub fn change(base: &Doc, target: &Doc) -> Change {
    let mut c = Change::default();
    for_each_difference(base, target, |key, old, new| {
        c.max_key_len = c.max_key_len.max(key.len() as u64);
        match (old, new) {
            (Some(_), None) => (c.bytes, c.runs) = (c.bytes + key.len() as u64, c.runs + 1),
            (None, Some(new)) => (c.bytes, c.runs) = (c.bytes + entry_bytes(key, new), c.runs + 1),
            (Some(old), Some(new)) if old.len() == new.len() => {
                let runs = differing_runs(old, new, 0);
                c.bytes += runs.iter().map(|r| r.len() as u64).sum::<u64>();
                c.runs += runs.len() as u64;
            }
            (Some(old), Some(new)) => {
                let (o, n) = middle(old, new);
                c.bytes += o.len().max(n.len()) as u64;
                c.runs += 1;
            }
            (None, None) => {}
        }
    });
    c
}

/// Bytes that differ between two documents (see [`Change::bytes`]).
pub fn changed_bytes(base: &Doc, target: &Doc) -> u64 {
    change(base, target).bytes
}

/// Sum of [`ShareOp::payload_bytes`] over a diff: what it puts on the wire beyond op headers.
pub fn payload_bytes(diff: &ShareDiff) -> u64 {
    diff.ops.iter().map(ShareOp::payload_bytes).sum()
}

/// The distinct keys a diff touches, in key order.
pub fn diff_keys(diff: &ShareDiff) -> Vec<String> {
    diff.ops.iter().map(|op| op.key().to_string()).collect::<BTreeSet<_>>().into_iter().collect()
}

/// Apply `diff` exactly, or not at all: a delete or splice of an absent key, a splice against a
/// value of another length or with other bytes (CRC), or a result past the limits is an error,
/// and then `doc` is unchanged.
pub fn apply_strict(doc: &mut Doc, diff: &ShareDiff) -> Result<Applied, PatchError> {
    apply_strict_all(doc, &[diff])
}

/// [`apply_strict`] of several diffs one after the other, as one: all of them or nothing.
pub fn apply_strict_all(doc: &mut Doc, diffs: &[&ShareDiff]) -> Result<Applied, PatchError> {
    for diff in diffs {
        diff.validate().map_err(PatchError::Invalid)?;
    }
    // The new value of every key the diffs touch (`None`: deleted), built before anything in
    // `doc` changes. One copy of each touched value.
    let mut staged: BTreeMap<&str, Option<Vec<u8>>> = BTreeMap::new();
    for op in diffs.iter().flat_map(|d| &d.ops) {
        let key = op.key();
        let current = match staged.remove(key) {
            Some(v) => v,
            None => doc.get(key).map(<[u8]>::to_vec),
        };
        staged.insert(key, strict_op(op, current)?);
    }
    let (mut doc_bytes, mut keys) = (doc.bytes, doc.len());
    for (key, new) in &staged {
        if let Some(old) = doc.get(key) {
            doc_bytes -= entry_bytes(key, old);
            keys -= 1;
        }
        if let Some(new) = new {
            check_entry(key, new)?;
            doc_bytes += entry_bytes(key, new);
            keys += 1;
        }
    }
    check_doc(doc_bytes, keys)?;
    let ops_applied = diffs.iter().map(|d| d.ops.len() as u64).sum();
    let mut applied = Applied { ops_applied, ..Applied::default() };
    for (key, new) in staged {
        if doc.get(key) == new.as_deref() {
            continue;
        }
        applied.changed_keys.push(key.to_string());
        match new {
            Some(v) => doc.insert_raw(key.to_string(), v),
            None => doc.remove_raw(key),
        };
    }
    debug_assert_eq!(doc.bytes, doc.entries.iter().map(|(k, v)| entry_bytes(k, v)).sum::<u64>());
    Ok(applied)
}

/// One op of a strict apply on the current value of its key (`None`: absent).
fn strict_op(op: &ShareOp, current: Option<Vec<u8>>) -> Result<Option<Vec<u8>>, PatchError> {
    match op {
        ShareOp::Put { value, .. } => Ok(Some(value.clone())),
        ShareOp::Delete { key } => match current {
            Some(_) => Ok(None),
            None => Err(PatchError::DeleteAbsent { key: key.clone() }),
        },
        ShareOp::Splice { key, at, removed, inserted, old_len, old_crc } => {
            let Some(mut value) = current else {
                return Err(PatchError::SpliceAbsent { key: key.clone() });
            };
            if value.len() as u64 != *old_len {
                return Err(PatchError::LengthMismatch {
                    key: key.clone(),
                    expected_len: *old_len,
                    found_len: value.len() as u64,
                });
            }
            let range = splice_range(&value, *at, *removed, *old_crc)
                .ok_or_else(|| PatchError::CrcMismatch { key: key.clone(), at: *at })?;
            value.splice(range, inserted.iter().copied());
            Ok(Some(value))
        }
    }
}

/// The range a splice replaces, if it lies inside `value` and holds the bytes the splice was
/// computed against (their CRC32C).
fn splice_range(value: &[u8], at: u64, removed: u64, old_crc: u32) -> Option<Range<usize>> {
    let end = at.checked_add(removed)?;
    if end > value.len() as u64 {
        return None;
    }
    let range = at as usize..end as usize;
    (crc32c::crc32c(&value[range.clone()]) == old_crc).then_some(range)
}

/// Apply what still fits of `diff`: puts and deletes always (a delete of an absent key does
/// nothing), a splice where the bytes it replaces are still at its offset (by CRC, even if the
/// value's length changed since). Skips and counts as conflicts the splices that no longer fit,
/// malformed ops and ops that would pass a limit.
pub fn apply_fuzzy(doc: &mut Doc, diff: &ShareDiff) -> Applied {
    let mut applied = Applied::default();
    let mut changed = BTreeSet::new();
    for op in &diff.ops {
        match fuzzy_op(doc, op) {
            Some(true) => {
                applied.ops_applied += 1;
                changed.insert(op.key().to_string());
            }
            Some(false) => applied.ops_applied += 1,
            None => applied.conflicts += 1,
        }
    }
    debug_assert_eq!(doc.bytes, doc.entries.iter().map(|(k, v)| entry_bytes(k, v)).sum::<u64>());
    applied.changed_keys = changed.into_iter().collect();
    applied
}

/// One op of a fuzzy apply: `Some(changed)` if it applied, `None` if it was skipped.
fn fuzzy_op(doc: &mut Doc, op: &ShareOp) -> Option<bool> {
    let key = op.key();
    validate_key(key).ok()?;
    match op {
        ShareOp::Put { value, .. } => doc.set(key, Some(value.clone())).ok(),
        ShareOp::Delete { .. } => Some(doc.remove_raw(key).is_some()),
        ShareOp::Splice { at, removed, inserted, old_crc, .. } => {
            let value = doc.get(key)?;
            let range = splice_range(value, *at, *removed, *old_crc)?;
            if range.len() == inserted.len() && value[range.clone()] == inserted[..] {
                return Some(false);
            }
            let new_len = (value.len() - range.len()) as u64 + inserted.len() as u64;
            if new_len > MAX_SHARE_VALUE_LEN as u64 {
                return None;
            }
            check_doc(doc.bytes - range.len() as u64 + inserted.len() as u64, doc.len()).ok()?;
            doc.splice_raw(key, range.start, range.len(), inserted);
            Some(true)
        }
    }
}

/// One of this member's own edits, at the `live_version` it made.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LocalEdit {
    pub live_version: u64,
    pub op: ShareOp,
}

/// This member's own edits, per key, that nobody else's change has overtaken yet: what a reset
/// re-applies on the hub's document so that no hub move loses a write its member still holds
/// (even one the old hub had acknowledged and the new hub never got).
///
/// A key's edits are dropped once a change reflected from a peer touches the key after the hub
/// had them (see [`LocalEdits::overtaken`]); the ops of one key are kept no larger than the value
/// (past that they collapse into one `Put`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LocalEdits {
    by_key: BTreeMap<String, Vec<LocalEdit>>,
}

impl LocalEdits {
    /// This member changed `key` from `old` to `new` (`None`: absent), making `live_version`.
    pub fn record(&mut self, key: &str, old: Option<&[u8]>, new: Option<&[u8]>, live_version: u64) {
        let mut ops = Vec::new();
        match (old, new) {
            (_, None) => ops.push(ShareOp::Delete { key: key.to_string() }),
            (None, Some(n)) => ops.push(ShareOp::Put { key: key.to_string(), value: n.to_vec() }),
            (Some(o), Some(n)) if o == n => return,
            (Some(o), Some(n)) => value_ops(key, o, n, &mut ops),
        }
        let edits = self.by_key.entry(key.to_string()).or_default();
        if ops.iter().any(|op| !matches!(op, ShareOp::Splice { .. })) {
            edits.clear();
        }
        edits.extend(ops.into_iter().map(|op| LocalEdit { live_version, op }));
        let payload: u64 = edits.iter().map(|e| e.op.payload_bytes()).sum();
        if let Some(n) = new.filter(|n| payload > entry_bytes(key, n)) {
            *edits = vec![LocalEdit { live_version, op: ShareOp::Put { key: key.to_string(), value: n.to_vec() } }];
        }
    }

    /// A change from a peer touched `keys` after the hub had every edit made at or before
    /// `live_version`: those edits are overtaken (the later ones were not sent yet and stay).
    pub fn overtaken(&mut self, keys: &[String], live_version: u64) {
        for key in keys {
            if let Some(edits) = self.by_key.get_mut(key) {
                edits.retain(|e| e.live_version > live_version);
                if edits.is_empty() {
                    self.by_key.remove(key);
                }
            }
        }
    }

    /// The edits of every key for which `differs(key)` holds, in order, as one diff.
    pub fn ops_where(&self, differs: impl Fn(&str) -> bool) -> ShareDiff {
        let ops =
            self.by_key.iter().filter(|(k, _)| differs(k)).flat_map(|(_, edits)| edits.iter().map(|e| e.op.clone()));
        ShareDiff { ops: ops.collect() }
    }

    /// Keys with edits.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub fn contains(&self, key: &str) -> bool {
        self.by_key.contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn doc(entries: &[(&str, &[u8])]) -> Doc {
        Doc::from_entries(entries.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect()).unwrap()
    }

    fn big(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn diff_of_new_removed_and_changed_keys() {
        let base = doc(&[("a", b"1"), ("b", b"2"), ("c", &big(1000, 0))]);
        let mut target = doc(&[("b", b"2"), ("c", &big(1000, 0)), ("d", b"4")]);
        let mut c = big(1000, 0);
        c[500] ^= 0xff;
        target.set("c", Some(c)).unwrap();
        let d = diff(&base, &target);
        assert_eq!(d.ops.len(), 3, "{d:?}");
        assert!(matches!(&d.ops[0], ShareOp::Delete { key } if key == "a"));
        assert!(matches!(&d.ops[1], ShareOp::Splice { key, at: 500, removed: 1, .. } if key == "c"));
        assert!(matches!(&d.ops[2], ShareOp::Put { key, .. } if key == "d"));
        let mut applied = base.clone();
        apply_strict(&mut applied, &d).unwrap();
        assert_eq!(applied, target);
    }

    #[test]
    fn nearby_runs_merge_and_distant_runs_do_not() {
        let old = big(4096, 1);
        let mut new = old.clone();
        new[100] ^= 1;
        new[110] ^= 1; // 9 equal bytes between: merged
        new[2000] ^= 1; // far: its own splice
        let d = diff(&doc(&[("v", &old)]), &doc(&[("v", &new)]));
        let spans: Vec<(u64, u64)> = d
            .ops
            .iter()
            .map(|op| match op {
                ShareOp::Splice { at, removed, .. } => (*at, *removed),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(spans, vec![(100, 11), (2000, 1)]);
    }

    #[test]
    fn a_mostly_rewritten_value_is_put_whole() {
        let old = big(100, 1);
        let new = big(100, 2);
        let d = diff(&doc(&[("v", &old)]), &doc(&[("v", &new)]));
        assert!(matches!(&d.ops[..], [ShareOp::Put { .. }]), "{d:?}");
    }

    #[test]
    fn a_resized_value_gets_one_splice_over_its_middle() {
        let old = big(1000, 1);
        let mut new = old.clone();
        new.splice(400..410, b"inserted more bytes".iter().copied());
        let d = diff(&doc(&[("v", &old)]), &doc(&[("v", &new)]));
        match &d.ops[..] {
            [ShareOp::Splice { at, removed, inserted, old_len, .. }] => {
                assert_eq!((*at, *old_len), (400, 1000));
                assert!(*removed <= 10 && inserted.len() <= 19, "{removed} {}", inserted.len());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn strict_refuses_what_does_not_fit_and_changes_nothing() {
        let base = doc(&[("a", b"hello world"), ("b", b"x")]);
        let bad = [
            ShareOp::Delete { key: "zz".into() },
            ShareOp::Splice { key: "zz".into(), at: 0, removed: 1, inserted: vec![], old_len: 1, old_crc: 0 },
            ShareOp::Splice {
                key: "a".into(),
                at: 0,
                removed: 5,
                inserted: b"HELLO".to_vec(),
                old_len: 12,
                old_crc: crc32c::crc32c(b"hello"),
            },
            ShareOp::Splice { key: "a".into(), at: 0, removed: 5, inserted: vec![], old_len: 11, old_crc: 7 },
            ShareOp::Splice { key: "a".into(), at: 9, removed: 5, inserted: vec![], old_len: 11, old_crc: 0 },
            ShareOp::Put { key: "k".repeat(300), value: vec![] },
        ];
        for op in bad {
            let mut d = base.clone();
            // A good op first: it must not stick either.
            let diff = ShareDiff { ops: vec![ShareOp::Put { key: "b".into(), value: b"y".to_vec() }, op.clone()] };
            assert!(apply_strict(&mut d, &diff).is_err(), "{op:?}");
            assert_eq!(d, base, "{op:?}");
        }
    }

    #[test]
    fn limits_hold_in_both_applies() {
        let base = doc(&[("a", b"x")]);
        let huge = ShareDiff { ops: vec![ShareOp::Put { key: "b".into(), value: vec![0; MAX_SHARE_VALUE_LEN + 1] }] };
        let mut d = base.clone();
        assert!(matches!(apply_strict(&mut d, &huge), Err(PatchError::Invalid(_))));
        let a = apply_fuzzy(&mut d, &huge);
        assert_eq!((a.conflicts, d.clone()), (1, base.clone()));
        // Nine values of 1 MiB pass the 8 MiB document limit.
        let many = ShareDiff {
            ops: (0..9).map(|i| ShareOp::Put { key: format!("k{i}"), value: vec![0; MAX_SHARE_VALUE_LEN] }).collect(),
        };
        assert!(matches!(apply_strict(&mut d, &many), Err(PatchError::DocTooLarge { .. })));
        assert_eq!(d, base);
        let a = apply_fuzzy(&mut d, &many);
        assert!(a.conflicts >= 1 && d.bytes() <= MAX_SHARE_DOC_BYTES, "{a:?}");
    }

    #[test]
    fn fuzzy_applies_a_splice_after_an_edit_elsewhere_and_skips_one_that_collides() {
        let old = big(1000, 1);
        let mut edited = old.clone();
        edited[10] ^= 1;
        let d = diff(&doc(&[("v", &old)]), &doc(&[("v", &edited)]));
        // Elsewhere: bytes inserted after the splice's range; the splice still fits.
        let mut live = old.clone();
        live.splice(900..900, [1, 2, 3]);
        let mut live_doc = doc(&[("v", &live)]);
        let a = apply_fuzzy(&mut live_doc, &d);
        assert_eq!((a.ops_applied, a.conflicts), (1, 0));
        assert_eq!(live_doc.get("v").unwrap()[10], edited[10]);
        // The same bytes changed concurrently: conflict, value kept.
        let mut other = old.clone();
        other[10] ^= 2;
        let mut other_doc = doc(&[("v", &other)]);
        let a = apply_fuzzy(&mut other_doc, &d);
        assert_eq!((a.ops_applied, a.conflicts), (0, 1));
        assert_eq!(other_doc.get("v").unwrap(), &other[..]);
        // Delete of an absent key is nothing.
        let a = apply_fuzzy(&mut other_doc, &ShareDiff { ops: vec![ShareOp::Delete { key: "nope".into() }] });
        assert_eq!((a.ops_applied, a.conflicts, a.changed()), (1, 0, false));
    }

    #[test]
    fn a_bounded_diff_is_a_prefix_that_the_rest_completes() {
        let base = Doc::from_entries((0..300).map(|i| (format!("a{i:03}"), vec![1; 10])).collect()).unwrap();
        let target = Doc::from_entries((0..300).map(|i| (format!("b{i:03}"), vec![2; 10])).collect()).unwrap();
        let mut at = base.clone();
        let mut rounds = 0;
        loop {
            let (d, complete) = diff_bounded(&at, &target, 100, 1_000);
            assert!(!d.is_empty() && d.ops.len() <= 100 && payload_bytes(&d) <= 1_000, "{}", d.ops.len());
            apply_strict(&mut at, &d).unwrap();
            rounds += 1;
            if complete {
                break;
            }
        }
        assert_eq!(at, target);
        assert!(rounds >= 6, "600 ops in rounds of at most 100: {rounds}");
        // A value too big for the byte budget still goes (alone): every round makes progress.
        let large = doc(&[("v", &big(5_000, 1))]);
        let (d, complete) = diff_bounded(&Doc::new(), &large, 10, 1_000);
        assert!(complete && d.ops.len() == 1);
        // Splices past the op budget go as one put.
        let mut edited = big(5_000, 1);
        (0..50).for_each(|i| edited[i * 100] ^= 1);
        let (d, _) = diff_bounded(&large, &doc(&[("v", &edited)]), 10, u64::MAX);
        assert!(matches!(&d.ops[..], [ShareOp::Put { .. }]), "{}", d.ops.len());
    }

    #[test]
    fn serde_round_trip_recomputes_the_size() {
        let d = doc(&[("a", b"123"), ("bb", b"")]);
        let bytes = bincode::serialize(&d).unwrap();
        let back: Doc = bincode::deserialize(&bytes).unwrap();
        assert_eq!(back, d);
        assert_eq!(back.bytes(), 6);
        assert_eq!(d.digest(), back.digest());
        assert_ne!(d.digest(), doc(&[("a", b"12"), ("bb", b"3")]).digest());
    }

    // ---- properties ----------------------------------------------------------------------

    fn arb_doc() -> impl Strategy<Value = Doc> {
        proptest::collection::btree_map("[a-e]{1,2}", proptest::collection::vec(0u8..4, 0..40), 0..8)
            .prop_map(|m| Doc::from_entries(m.into_iter().collect()).unwrap())
    }

    /// An edit of a document: set, delete, overwrite some bytes, insert or remove some bytes.
    #[derive(Debug, Clone)]
    enum Edit {
        Set(String, Vec<u8>),
        Delete(usize),
        Overwrite(usize, usize, Vec<u8>),
        Resize(usize, usize, usize, Vec<u8>),
    }

    fn arb_edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            ("[a-f]{1,2}", proptest::collection::vec(0u8..4, 0..30)).prop_map(|(k, v)| Edit::Set(k, v)),
            any::<usize>().prop_map(Edit::Delete),
            (any::<usize>(), any::<usize>(), proptest::collection::vec(0u8..4, 1..8))
                .prop_map(|(k, at, b)| Edit::Overwrite(k, at, b)),
            (any::<usize>(), any::<usize>(), 0usize..6, proptest::collection::vec(0u8..4, 0..8))
                .prop_map(|(k, at, rm, b)| Edit::Resize(k, at, rm, b)),
        ]
    }

    fn edit(doc: &mut Doc, e: &Edit) {
        let keys: Vec<String> = doc.iter().map(|(k, _)| k.clone()).collect();
        let pick = |i: usize| (!keys.is_empty()).then(|| keys[i % keys.len()].clone());
        match e {
            Edit::Set(k, v) => {
                doc.set(k, Some(v.clone())).unwrap();
            }
            Edit::Delete(i) => {
                if let Some(k) = pick(*i) {
                    doc.set(&k, None).unwrap();
                }
            }
            Edit::Overwrite(i, at, bytes) => {
                if let Some(k) = pick(*i) {
                    let mut v = doc.get(&k).unwrap().to_vec();
                    if !v.is_empty() {
                        let at = at % v.len();
                        let end = (at + bytes.len()).min(v.len());
                        v[at..end].copy_from_slice(&bytes[..end - at]);
                        doc.set(&k, Some(v)).unwrap();
                    }
                }
            }
            Edit::Resize(i, at, rm, bytes) => {
                if let Some(k) = pick(*i) {
                    let mut v = doc.get(&k).unwrap().to_vec();
                    let at = at % (v.len() + 1);
                    let end = (at + rm).min(v.len());
                    v.splice(at..end, bytes.iter().copied());
                    doc.set(&k, Some(v)).unwrap();
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn diff_is_exact(base in arb_doc(), target in arb_doc()) {
            let d = diff(&base, &target);
            let mut got = base.clone();
            apply_strict(&mut got, &d).unwrap();
            prop_assert_eq!(got, target);
        }

        #[test]
        fn diff_of_edits_is_exact_and_fuzzy_on_its_base_equals_strict(
            base in arb_doc(),
            edits in proptest::collection::vec(arb_edit(), 0..8),
        ) {
            let mut target = base.clone();
            for e in &edits {
                edit(&mut target, e);
            }
            let d = diff(&base, &target);
            prop_assert!(payload_bytes(&d) <= change(&base, &target).payload_budget());
            let mut strict = base.clone();
            apply_strict(&mut strict, &d).unwrap();
            prop_assert_eq!(&strict, &target);
            let mut fuzzy = base.clone();
            let a = apply_fuzzy(&mut fuzzy, &d);
            prop_assert_eq!(a.conflicts, 0);
            prop_assert_eq!(&fuzzy, &target);
        }

        #[test]
        fn strict_refuses_a_diff_against_another_base(
            base in arb_doc(),
            other in arb_doc(),
            edits in proptest::collection::vec(arb_edit(), 1..6),
        ) {
            let mut target = base.clone();
            for e in &edits {
                edit(&mut target, e);
            }
            let d = diff(&base, &target);
            // Any other base: refused whole, or (a diff of puts, say) fits.
            let mut o = other.clone();
            if apply_strict(&mut o, &d).is_err() {
                prop_assert_eq!(&o, &other);
            }
            // The base without a key the diff deletes or splices: always refused, nothing changed.
            let needs = d.ops.iter().find(|op| !matches!(op, ShareOp::Put { .. })).map(|op| op.key().to_string());
            if let Some(key) = needs {
                let mut missing = base.clone();
                missing.set(&key, None).unwrap();
                let before = missing.clone();
                prop_assert!(apply_strict(&mut missing, &d).is_err());
                prop_assert_eq!(missing, before);
            }
        }

        #[test]
        fn in_place_edits_of_a_large_value_cost_what_changed(
            seed in any::<u8>(),
            writes in proptest::collection::vec((0usize..65_536, proptest::collection::vec(any::<u8>(), 1..200)), 1..8),
        ) {
            let old = big(65_536, seed);
            let mut new = old.clone();
            for (at, bytes) in &writes {
                let end = (at + bytes.len()).min(new.len());
                new[*at..end].copy_from_slice(&bytes[..end - at]);
            }
            let (base, target) = (doc(&[("value", &old)]), doc(&[("value", &new)]));
            let d = diff(&base, &target);
            let changed = changed_bytes(&base, &target);
            // Per write: its key and the equal bytes a merge with a neighbour resends.
            let allowance = writes.len() as u64 * ("value".len() + 2 * MERGE_GAP_BYTES) as u64 + 1;
            prop_assert!(
                payload_bytes(&d) * 10 <= changed * 11 + allowance * 10,
                "payload {} for {} changed bytes", payload_bytes(&d), changed
            );
            let mut got = base.clone();
            apply_strict(&mut got, &d).unwrap();
            prop_assert_eq!(got, target);
        }
    }
}
