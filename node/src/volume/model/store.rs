//! The model's block store: every version of every block, tagged with the write that made it,
//! plus snapshots, the high-water mark and the persisted resync cursor. It survives a crash
//! (every write in the model is a durable write).

use std::collections::BTreeMap;

use crate::volume::core::cursor::Cursor;

/// A write's identity; 0 is "never written" (zeroes).
pub type WriteId = u64;

/// Set in the id of a range zeroing: its versions read as zeroes.
pub const ZEROING: WriteId = 1 << 63;

/// Whether a version of write `w` holds data (not zeroes).
pub fn is_data(w: WriteId) -> bool {
    w != 0 && w & ZEROING == 0
}

#[derive(Debug, Clone, Default)]
pub struct Store {
    /// block → (point → write).
    versions: BTreeMap<u64, BTreeMap<u64, WriteId>>,
    pub hwm: u64,
    /// snapshot id → point.
    pub snaps: BTreeMap<u64, u64>,
    pub cursor: Option<Cursor>,
}

impl Store {
    pub fn apply(&mut self, writes: &[(u64, u64, WriteId)]) {
        self.apply_capped(writes, u64::MAX);
    }

    /// `apply`, raising the high-water mark to at most `cap` (a resync's later versions).
    pub fn apply_capped(&mut self, writes: &[(u64, u64, WriteId)], cap: u64) {
        for &(block, seq, w) in writes {
            self.versions.entry(block).or_default().insert(seq, w);
            self.hwm = self.hwm.max(seq.min(cap));
            self.retain(block);
        }
    }

    /// The real block store's range zeroing: a Zero version (of the zeroing write `w`) at
    /// `point` only for the blocks in `[first, first + count)` whose newest version below
    /// `point` is data, and none where a version at `point` is stored already.
    pub fn zero_range(&mut self, first: u64, count: u64, point: u64, w: WriteId) {
        assert!(!is_data(w), "a zeroing's versions are zeroes");
        let stored: Vec<u64> = self.versions.range(first..first + count).map(|(b, _)| *b).collect();
        for b in stored {
            let v = self.versions.get_mut(&b).expect("listed");
            if !v.contains_key(&point) && v.range(..point).next_back().is_some_and(|(_, w)| is_data(*w)) {
                v.insert(point, w);
                self.retain(b);
            }
        }
        self.hwm = self.hwm.max(point);
    }

    /// Every version of `block` after `after`: (point, write).
    pub fn versions_after(&self, block: u64, after: u64) -> Vec<(u64, WriteId)> {
        self.versions.get(&block).map_or(Vec::new(), |v| v.range(after + 1..).map(|(s, w)| (*s, *w)).collect())
    }

    /// The real block store's retention rule: per block, only the newest version in each
    /// interval between snapshot points survives, so a view is exact only at a snapshot's
    /// point or at the newest point.
    fn retain(&mut self, block: u64) {
        let cuts: Vec<u64> = self.snaps.values().copied().collect();
        let interval = |seq: u64| cuts.iter().filter(|c| **c < seq).count();
        let Some(v) = self.versions.get_mut(&block) else { return };
        let mut newest_per_interval: BTreeMap<usize, u64> = BTreeMap::new();
        for &seq in v.keys() {
            newest_per_interval.insert(interval(seq), seq);
        }
        v.retain(|seq, _| newest_per_interval.get(&interval(*seq)) == Some(seq));
    }

    /// Whether the view at `point` is exact here: the newest point, or a snapshot's.
    pub fn exact_at(&self, point: u64) -> bool {
        point >= self.hwm || self.snaps.values().any(|s| *s == point)
    }

    /// The newest version of `block` at or below `at`: (point, write).
    pub fn read(&self, block: u64, at: u64) -> (u64, WriteId) {
        self.versions.get(&block).and_then(|v| v.range(..=at).next_back()).map_or((0, 0), |(s, w)| (*s, *w))
    }

    /// Forget every version after `to`, and snapshots after it.
    pub fn rollback(&mut self, to: u64) {
        for v in self.versions.values_mut() {
            v.retain(|s, _| *s <= to);
        }
        self.snaps.retain(|_, s| *s <= to);
        self.hwm = to;
        let blocks: Vec<u64> = self.versions.keys().copied().collect();
        for b in blocks {
            self.retain(b);
        }
    }

    /// Collapse every block to its newest version at point 0, for a Merkle compare.
    pub fn rebase(&mut self) {
        for v in self.versions.values_mut() {
            if let Some((_, w)) = v.iter().next_back().map(|(s, w)| (*s, *w)) {
                v.clear();
                v.insert(0, w);
            }
        }
        self.snaps.clear();
        self.hwm = 0;
    }

    /// Blocks with a version in `(after, upto]`.
    pub fn changed_blocks(&self, after: u64, upto: u64) -> Vec<u64> {
        if after >= upto {
            return Vec::new();
        }
        self.versions.iter().filter(|(_, v)| v.range(after + 1..=upto).next().is_some()).map(|(b, _)| *b).collect()
    }

    /// The content (write per block) as of `at`.
    pub fn content(&self, at: u64, blocks: u64) -> Vec<WriteId> {
        (0..blocks).map(|b| self.read(b, at).1).collect()
    }
}
