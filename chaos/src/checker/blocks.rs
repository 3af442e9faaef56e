//! The `acknowledged_blocks` checker: every acknowledged block write is present after healing.
//!
//! For each block a writer owns, let `acked` be the highest n of an acknowledged write to it and
//! `attempted` the highest n of any write attempted to it. Writes to one block are issued one at
//! a time by its owner, so a read-back passes iff it is
//! - an intact block (magic, checksum, filler) naming the right writer and block, with
//!   `acked <= n <= attempted`: a later unacknowledged write may have landed, an earlier one may
//!   not replace an acknowledged one, and nothing never written may appear; or
//! - all zeroes, when no write to the block was ever acknowledged; or
//! - an intact block holding an *indeterminate* write older than the last acknowledged one: a
//!   write that never completed may take effect at any time after it was issued (that is
//!   linearizable), so only a failed or acknowledged older write replacing a newer acknowledged
//!   one is a loss.
//!
//! Every write that was not acknowledged (failed or indeterminate) counts as maybe applied when
//! it is newer than the last acknowledged one.

use std::collections::BTreeMap;

use serde::Serialize;

use super::CheckResult;
use crate::blocks::{decode, Decoded};
use crate::history::{Op, OpKind, Outcome};
use crate::scenario::BlockSpec;

pub const NAME: &str = "acknowledged-blocks";

/// A block that read back wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockViolation {
    pub block: u64,
    pub writer: usize,
    /// n of the last acknowledged write (the smallest n allowed).
    pub last_acked_n: Option<u64>,
    /// n of the last attempted write (the largest n allowed).
    pub max_attempted_n: Option<u64>,
    /// n found, when the block was intact.
    pub found_n: Option<u64>,
    /// What was found, in words.
    pub found: String,
}

/// The block checker's counts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BlockCheck {
    pub attempted_writes: usize,
    pub acknowledged_writes: usize,
    pub failed_writes: usize,
    pub indeterminate_writes: usize,
    pub blocks_checked: usize,
    /// Blocks with at least one acknowledged write.
    pub blocks_acknowledged: usize,
    /// Blocks that read back as a later, unacknowledged write.
    pub blocks_with_unacked_newer: usize,
    /// Blocks that read back as an indeterminate write older than their last acknowledged one
    /// (it took effect late).
    pub blocks_with_late_indeterminate: usize,
    pub violations: Vec<BlockViolation>,
}

/// Every `block_read` made during the run must find its block's newest write acknowledged before
/// the read was sent, or a later one — or an indeterminate write, which may take effect at any
/// time after it was sent, also after a later acknowledged one (a retry still under way inside
/// the cluster when the client gave up), as [`acknowledged_blocks`] allows too. A primary cut off
/// from the cluster that kept serving reads after a new primary acknowledged writes fails this
/// (issue 11, race 4); the end-of-run read-back cannot see it.
pub fn fresh_reads(history: &[Op]) -> CheckResult {
    // Per block, the acknowledged writes as (completed at, n), in completion order, and the
    // indeterminate ones.
    let mut acked: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    let mut indeterminate: std::collections::BTreeSet<(u64, u64)> = std::collections::BTreeSet::new();
    for op in history {
        match (op.kind, op.outcome) {
            (OpKind::BlockWrite { block, n }, Outcome::Ok { .. }) => {
                acked.entry(block).or_default().push((op.complete_us, n));
            }
            (OpKind::BlockWrite { block, n }, Outcome::Info) => {
                indeterminate.insert((block, n));
            }
            _ => {}
        }
    }
    for v in acked.values_mut() {
        v.sort_unstable();
    }
    let mut reads = 0;
    for op in history {
        let OpKind::BlockRead { block, n } = op.kind else { continue };
        reads += 1;
        let before = acked.get(&block).map_or(&[][..], |v| &v[..v.partition_point(|(at, _)| *at < op.invoke_us)]);
        let Some(&(_, newest)) = before.iter().max_by_key(|(_, n)| *n) else { continue };
        if n < newest && !indeterminate.contains(&(block, n)) {
            let write = history
                .iter()
                .find(|w| w.kind == OpKind::BlockWrite { block, n: newest } && matches!(w.outcome, Outcome::Ok { .. }))
                .cloned();
            return CheckResult::fail(
                "fresh-block-reads",
                format!(
                    "block {block} read as write {n} at {} us, after write {newest} to it was acknowledged: a stale read",
                    op.invoke_us
                ),
                write.into_iter().chain([op.clone()]).collect(),
            );
        }
    }
    CheckResult::pass(
        "fresh-block-reads",
        format!("{reads} reads during the run, none older than an acknowledged write"),
    )
}

#[derive(Default)]
struct PerBlock<'a> {
    acked: Option<u64>,
    attempted: Option<u64>,
    last_acked_op: Option<&'a Op>,
    indeterminate: std::collections::BTreeSet<u64>,
}

/// Judge `read_back` (every owned block: its bytes, or why it could not be read) against the
/// `block_write`s of `history`.
pub fn acknowledged_blocks(
    history: &[Op],
    spec: &BlockSpec,
    read_back: &BTreeMap<u64, Result<Vec<u8>, String>>,
) -> (CheckResult, BlockCheck) {
    let mut per: BTreeMap<u64, PerBlock> = BTreeMap::new();
    let mut check = BlockCheck::default();
    for op in history {
        let OpKind::BlockWrite { block, n } = op.kind else { continue };
        check.attempted_writes += 1;
        let p = per.entry(block).or_default();
        p.attempted = p.attempted.max(Some(n));
        match op.outcome {
            Outcome::Ok { .. } => {
                check.acknowledged_writes += 1;
                if p.acked < Some(n) {
                    p.acked = Some(n);
                    p.last_acked_op = Some(op);
                }
            }
            Outcome::Fail => check.failed_writes += 1,
            Outcome::Info => {
                check.indeterminate_writes += 1;
                p.indeterminate.insert(n);
            }
        }
    }
    let mut offending = Vec::new();
    for block in spec.ownership().owned_blocks() {
        let writer = spec.ownership().owner(block).expect("owned block has an owner");
        let p = per.remove(&block).unwrap_or_default();
        check.blocks_checked += 1;
        if p.acked.is_some() {
            check.blocks_acknowledged += 1;
        }
        // (n found, what was found) when the block is wrong.
        let wrong: Option<(Option<u64>, String)> = match read_back.get(&block) {
            None => Some((None, "not read back".into())),
            Some(Err(e)) => Some((None, format!("unreadable: {e}"))),
            Some(Ok(bytes)) => match decode(bytes) {
                Decoded::Zero => p.acked.map(|a| (None, format!("zeroes, but write n={a} was acknowledged"))),
                Decoded::Corrupt(why) => Some((None, format!("corrupt: {why}"))),
                Decoded::Valid { writer: w, block: b, n } => {
                    if w != writer as u64 || b != block {
                        Some((Some(n), format!("writer {w}'s block {b} (n={n}) instead of writer {writer}'s")))
                    } else if p.acked.is_some_and(|a| n < a) && p.indeterminate.contains(&n) {
                        check.blocks_with_late_indeterminate += 1;
                        None
                    } else if let Some(a) = p.acked.filter(|&a| n < a) {
                        Some((
                            Some(n),
                            format!("n={n}, older than the acknowledged n={a}: an acknowledged write was lost"),
                        ))
                    } else if p.attempted.is_none_or(|a| n > a) {
                        let last = p.attempted.map_or("none".to_string(), |a| format!("n={a}"));
                        Some((Some(n), format!("n={n}, but the last write attempted was {last}")))
                    } else {
                        if p.acked < Some(n) {
                            check.blocks_with_unacked_newer += 1;
                        }
                        None
                    }
                }
            },
        };
        if let Some((found_n, found)) = wrong {
            check.violations.push(BlockViolation {
                block,
                writer,
                last_acked_n: p.acked,
                max_attempted_n: p.attempted,
                found_n,
                found,
            });
            if let Some(op) = p.last_acked_op {
                offending.push(op.clone());
            }
        }
    }
    let result = if check.violations.is_empty() {
        CheckResult::pass(
            NAME,
            format!(
                "{} blocks hold their last acknowledged write or a later attempt ({} acknowledged writes to {} blocks; {} blocks show a later unacknowledged write, {} an older indeterminate one that took effect late)",
                check.blocks_checked, check.acknowledged_writes, check.blocks_acknowledged, check.blocks_with_unacked_newer,
                check.blocks_with_late_indeterminate
            ),
        )
    } else {
        let first = &check.violations[0];
        offending.truncate(12);
        CheckResult::fail(
            NAME,
            format!(
                "{} of {} blocks read back wrong ({} acknowledged writes); first: block {} (writer {}): expected n in {}..={}, found {}",
                check.violations.len(),
                check.blocks_checked,
                check.acknowledged_writes,
                first.block,
                first.writer,
                first.last_acked_n.map_or("0 (zeroes)".into(), |n| n.to_string()),
                first.max_attempted_n.map_or("-".into(), |n| n.to_string()),
                first.found
            ),
            offending,
        )
    };
    (result, check)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::{block_key, encode};
    use crate::scenario::Scenario;

    fn spec() -> BlockSpec {
        let s = Scenario::parse(
            "name='t'\nduration='5s'\n[cluster]\nbackend='local'\n[blocks]\nwriters=2\nblocks_per_writer=4\n",
        )
        .unwrap();
        s.blocks.unwrap()
    }

    fn write(id: usize, block: u64, n: u64, outcome: Outcome) -> Op {
        Op {
            id,
            client: (block / 4) as usize,
            key: block_key(block),
            kind: OpKind::BlockWrite { block, n },
            invoke_us: id as u64 * 10,
            complete_us: id as u64 * 10 + 5,
            outcome,
            error: None,
        }
    }

    const OK: Outcome = Outcome::Ok { read: None, cas_matched: None };

    /// Every owned block zero except `overrides`.
    fn state(overrides: &[(u64, Vec<u8>)]) -> BTreeMap<u64, Result<Vec<u8>, String>> {
        let mut m: BTreeMap<u64, Result<Vec<u8>, String>> = (0..8).map(|b| (b, Ok(vec![0u8; 4096]))).collect();
        for (b, d) in overrides {
            m.insert(*b, Ok(d.clone()));
        }
        m
    }

    fn read(block: u64, n: u64, invoke_us: u64) -> Op {
        Op {
            id: 0,
            client: 0,
            key: block_key(block),
            kind: OpKind::BlockRead { block, n },
            invoke_us,
            complete_us: invoke_us + 5,
            outcome: OK,
            error: None,
        }
    }

    #[test]
    fn fresh_reads_never_go_back_before_an_acknowledged_write() {
        let mut h = vec![write(0, 5, 1, OK), write(0, 5, 2, OK), write(0, 5, 3, Outcome::Info)];
        for (i, op) in h.iter_mut().enumerate() {
            op.invoke_us = i as u64 * 100;
            op.complete_us = i as u64 * 100 + 50;
        }
        // Write 2 completed at 150 us: a read sent at 120 may see 1, one sent at 160 may not.
        h.push(read(5, 1, 120));
        h.push(read(5, 3, 160)); // the indeterminate write, later: fine
        assert!(fresh_reads(&h).passed, "{}", fresh_reads(&h).summary);
        // The indeterminate write 3 may land after a later acknowledged one.
        let mut late = h.clone();
        let mut w4 = write(3, 5, 4, OK);
        (w4.invoke_us, w4.complete_us) = (300, 350);
        late.push(w4);
        late.push(read(5, 3, 400));
        assert!(fresh_reads(&late).passed, "{}", fresh_reads(&late).summary);
        h.push(read(5, 1, 160));
        let r = fresh_reads(&h);
        assert!(!r.passed && r.summary.contains("stale read"), "{}", r.summary);
        assert_eq!(r.offending.len(), 2, "the acknowledged write and the stale read");
        assert!(fresh_reads(&[read(7, 0, 10)]).passed, "zeroes before any acknowledged write");
    }

    #[test]
    fn older_value_after_an_ack_is_a_violation() {
        let h = vec![write(0, 1, 1, OK), write(1, 1, 2, OK)];
        let (r, c) = acknowledged_blocks(&h, &spec(), &state(&[(1, encode(0, 1, 1))]));
        assert!(!r.passed, "{}", r.summary);
        assert_eq!(c.violations.len(), 1);
        let v = &c.violations[0];
        assert_eq!(
            (v.block, v.writer, v.last_acked_n, v.max_attempted_n, v.found_n),
            (1, 0, Some(2), Some(2), Some(1))
        );
        assert_eq!(r.offending.len(), 1);
        assert_eq!(r.offending[0].kind, OpKind::BlockWrite { block: 1, n: 2 });
    }

    #[test]
    fn older_indeterminate_value_may_land_late_but_an_older_failed_one_may_not() {
        // n=1 never completed, n=2 was acknowledged: n=1 may still take effect after n=2.
        let h = vec![write(0, 1, 1, Outcome::Info), write(1, 1, 2, OK)];
        let (r, c) = acknowledged_blocks(&h, &spec(), &state(&[(1, encode(0, 1, 1))]));
        assert!(r.passed, "{}", r.summary);
        assert_eq!(c.blocks_with_late_indeterminate, 1);
        // A write reported failed must never replace a later acknowledged one.
        let h = vec![write(0, 1, 1, Outcome::Fail), write(1, 1, 2, OK)];
        let (r, c) = acknowledged_blocks(&h, &spec(), &state(&[(1, encode(0, 1, 1))]));
        assert!(!r.passed, "{}", r.summary);
        assert_eq!(c.violations[0].found_n, Some(1));
    }

    #[test]
    fn later_unacknowledged_value_passes() {
        let h = vec![
            write(0, 5, 1, OK),
            write(1, 5, 2, Outcome::Info),
            write(2, 5, 3, Outcome::Fail),
            write(3, 6, 1, Outcome::Info),
        ];
        let read = state(&[(5, encode(1, 5, 3)), (6, encode(1, 6, 1))]);
        let (r, c) = acknowledged_blocks(&h, &spec(), &read);
        assert!(r.passed, "{}", r.summary);
        assert_eq!((c.acknowledged_writes, c.attempted_writes, c.blocks_checked), (1, 4, 8));
        assert_eq!(c.blocks_with_unacked_newer, 2);
        // The acknowledged value itself also passes.
        let (r, _) = acknowledged_blocks(&h, &spec(), &state(&[(5, encode(1, 5, 1))]));
        assert!(r.passed, "{}", r.summary);
    }

    #[test]
    fn zeroes_pass_only_when_never_acknowledged() {
        let h = vec![write(0, 2, 1, Outcome::Info), write(1, 3, 1, Outcome::Fail)];
        let (r, _) = acknowledged_blocks(&h, &spec(), &state(&[]));
        assert!(r.passed, "zeroes for never-acknowledged blocks: {}", r.summary);
        let h = vec![write(0, 2, 1, OK)];
        let (r, c) = acknowledged_blocks(&h, &spec(), &state(&[]));
        assert!(!r.passed, "zeroes after an ack: {}", r.summary);
        assert_eq!((c.violations[0].block, c.violations[0].found_n), (2, None));
        assert!(c.violations[0].found.contains("zeroes"));
    }

    #[test]
    fn foreign_future_corrupt_and_unreadable_blocks_are_violations() {
        let h = vec![write(0, 0, 1, OK), write(1, 4, 1, Outcome::Info)];
        let mut torn = encode(0, 0, 1);
        torn[4000] ^= 0xff;
        let mut read = state(&[
            (0, torn),
            (1, encode(1, 1, 1)), // another writer's content
            (4, encode(1, 4, 2)), // n never attempted
            (7, encode(1, 7, 1)), // written though never attempted
        ]);
        read.insert(3, Err("timed out".into()));
        let (r, c) = acknowledged_blocks(&h, &spec(), &read);
        assert!(!r.passed);
        let blocks: Vec<u64> = c.violations.iter().map(|v| v.block).collect();
        assert_eq!(blocks, vec![0, 1, 3, 4, 7]);
    }
}
