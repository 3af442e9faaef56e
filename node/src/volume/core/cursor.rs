//! A resync's persisted progress and the transfer plan derived from it. No I/O.
//!
//! A replica being resynced persists a [`Cursor`]: the common snapshot it started from, the
//! target point of the transfer under way, and a claim about what it already holds: "every block
//! below `next_block` holds its content as of point `as_of` or newer". An interrupted resync
//! resumes from that claim, possibly towards a newer target, and [`transfer_plan`] says which
//! blocks the primary must send so that nothing changed after the claim is skipped.
//!
//! Architecture invariant: the claim only ever widens to a newer point when the new claim covers
//! at least the old block range; otherwise the older, wider claim is kept. Keeping an older
//! claim re-sends more, never less. (Overwriting the claim with the new target before the blocks
//! below the old cursor had caught up to it was issue 11's race 2.)

use serde::{Deserialize, Serialize};

/// What a replica holds of a resync in progress.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claim {
    /// Every block below `next_block` holds its content as of this point or newer...
    pub as_of: u64,
    pub next_block: u64,
}

/// The replica's persisted resync state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Cursor {
    /// The common snapshot (id, seq) the resync started from; None = Merkle compare.
    pub base: Option<(u64, u64)>,
    /// The target point of the transfer under way (0 = not started).
    pub target: u64,
    /// What the replica already holds; None = nothing yet. Cursors written before this field
    /// existed load with None: they resume from the start, which is always safe.
    #[serde(default)]
    pub claim: Option<Claim>,
    /// The epoch of the primary that prepared the replica. A rollback or a failover starts a
    /// new epoch and may rewrite any point, so a cursor from another epoch is void: the
    /// replica prepares again (rolls back to a common snapshot) instead of resuming. Cursors
    /// written before this field existed load as epoch 0, which no primary has.
    #[serde(default)]
    pub epoch: u64,
}

impl Cursor {
    /// A replica rolled back to `base` (or rebased for a Merkle compare) for the primary at
    /// `epoch`, nothing received yet.
    pub fn prepared(base: Option<(u64, u64)>, epoch: u64) -> Self {
        Self { base, target: 0, claim: None, epoch }
    }

    /// Whether a resync for the primary at `epoch`, which holds the snapshots `primary_snaps`
    /// (id, point), may resume from this cursor rather than prepare again.
    pub fn resumable(&self, epoch: u64, primary_snaps: &[(u64, u64)]) -> bool {
        self.epoch == epoch && self.base.is_none_or(|b| primary_snaps.contains(&b))
    }

    /// Where a resumed transfer may start: `(as_of, next_block)`.
    pub fn resume(&self) -> Option<(u64, u64)> {
        self.claim.map(|c| (c.as_of, c.next_block))
    }

    /// A transfer towards `target` begins (or restarts); returns whether the target changed.
    /// The claim is kept: the blocks it covers are still as of its point.
    pub fn begin(&mut self, target: u64) -> bool {
        let changed = self.target != target;
        self.target = target;
        changed
    }

    /// Every block below `next_block` now holds its content as of the current target (point 0
    /// is a real target: a primary rebased for a Merkle compare holds its blocks at point 0).
    pub fn received_below(&mut self, next_block: u64) {
        match self.claim {
            Some(c) if next_block < c.next_block => {}
            _ => self.claim = Some(Claim { as_of: self.target, next_block }),
        }
    }
}

/// Blocks changed after point `after`, restricted to the block range `[from_block, below_block)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangedAfter {
    pub after: u64,
    pub from_block: u64,
    pub below_block: Option<u64>,
}

impl ChangedAfter {
    pub fn contains(&self, block: u64) -> bool {
        block >= self.from_block && self.below_block.is_none_or(|b| block < b)
    }
}

/// What a primary must send to bring a replica that shares the snapshot at `base_seq` up to a
/// target: every block changed after `base_seq`, except that blocks the replica's claim covers
/// need only the changes after the claim's point.
pub fn transfer_plan(base_seq: u64, resume: Option<(u64, u64)>) -> Vec<ChangedAfter> {
    match resume {
        None | Some((_, 0)) => vec![ChangedAfter { after: base_seq, from_block: 0, below_block: None }],
        Some((as_of, next_block)) => vec![
            ChangedAfter { after: as_of.max(base_seq), from_block: 0, below_block: Some(next_block) },
            ChangedAfter { after: base_seq, from_block: next_block, below_block: None },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retargeted_transfer_keeps_the_older_claim_until_it_is_covered() {
        let mut c = Cursor::prepared(Some((1, 10)), 7);
        c.begin(20);
        c.received_below(100);
        assert_eq!(c.resume(), Some((20, 100)));
        // Resumed towards 30: the first chunks lie below the old cursor.
        assert!(c.begin(30));
        c.received_below(40);
        assert_eq!(c.resume(), Some((20, 100)), "blocks 40..100 are only as of 20");
        c.received_below(150);
        assert_eq!(c.resume(), Some((30, 150)));
        assert!(c.resumable(7, &[(1, 10)]));
        assert!(!c.resumable(8, &[(1, 10)]), "another epoch may have rewritten history");
        assert!(!c.resumable(7, &[(2, 20)]), "the common snapshot is gone");
    }

    #[test]
    fn the_plan_covers_every_block_changed_after_the_claim() {
        assert_eq!(transfer_plan(10, None), vec![ChangedAfter { after: 10, from_block: 0, below_block: None }]);
        let plan = transfer_plan(10, Some((20, 100)));
        assert!(plan[0].contains(99) && !plan[0].contains(100) && plan[0].after == 20);
        assert!(plan[1].contains(100) && plan[1].after == 10);
    }

    #[test]
    fn old_cursors_without_a_claim_resume_from_the_start() {
        let old = r#"{"base":[1,10],"target":20,"next_block":100}"#;
        let c: Cursor = serde_json::from_str(old).unwrap();
        assert_eq!(c.resume(), None);
        assert!(!c.resumable(1, &[(1, 10)]));
    }
}
