//! The operations checkers: what each user operation on the operations workload's volume
//! promises, judged from the history and what the read-backs saw. Pure: no I/O.
//!
//! **`operation-data`** replays a model of the volume's content. Per block it keeps the same
//! "acknowledged or later attempted" rule as [`super::blocks`]: at a cut (an interval of real
//! time in which the state was fixed: a snapshot, a read-back), a block may hold the newest
//! write acknowledged before the cut or any write issued before the cut ends that is newer; an
//! indeterminate write may also land late (at any time after it was issued); all zeroes only
//! when nothing acknowledged is there. On top of that the model knows the operations:
//! - a **snapshot** S holds what the volume held at S's cut; its read-back must be allowed
//!   there, and once read it *is* S's content (a snapshot never changes);
//! - after a **rollback** to S the volume holds S's content plus the writes that may have landed
//!   after the rollback began: writes acknowledged before it began are gone (rolled back), writes
//!   overlapping it may or may not be there, writes acknowledged after it ended must be;
//! - a rollback whose outcome is unknown leaves both lineages possible (either content passes);
//! - a **clone** of S holds S's content;
//! - **resize** keeps every block and the new tail reads as zeroes;
//! - **reverse** changes nothing in the content: the new primary (the former DR copy) holds
//!   every acknowledged write and no rolled-back data, so the read-back after a reverse is
//!   judged by the same model as any other.
//!
//! **`operation-catalog`** judges each acknowledged catalog operation's direct effect, seen in
//! the catalog right after it: a created relationship exists and is active, pause/resume set
//! its state, delete removes it, reverse moves the primary to the former copy and points the
//! relationship at the old primary, and resize sets the size.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::CheckResult;
use crate::history::{Op, OpKind, Outcome, ReadOf, VolumeOpKind};

pub const DATA: &str = "operation-data";
pub const CATALOG: &str = "operation-catalog";

/// What one block read back as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "is", rename_all = "snake_case")]
pub enum Seen {
    Zero,
    /// The intact `n`th write of the block's owner.
    Write {
        n: u64,
    },
    /// An intact block of another writer or block.
    Foreign {
        writer: u64,
        block: u64,
        n: u64,
    },
    Corrupt {
        why: String,
    },
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Zero => f.write_str("zeroes"),
            Self::Write { n } => write!(f, "n={n}"),
            Self::Foreign { writer, block, n } => write!(f, "writer {writer}'s block {block} n={n}"),
            Self::Corrupt { why } => write!(f, "corrupt ({why})"),
        }
    }
}

/// One async relationship of the volume as the catalog listed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelView {
    pub id: u64,
    pub target: u64,
    pub paused: bool,
}

/// The volume as the catalog showed it right after an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogView {
    pub primary: u64,
    pub size_bytes: u64,
    pub relationships: Vec<RelView>,
}

/// What the operations workload saw, keyed by op id: block contents of each successful
/// read-back, the catalog after each acknowledged catalog operation, and the workload's
/// snapshot numbers mapped to catalog snapshot ids (for the report).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Observations {
    pub reads: BTreeMap<usize, BTreeMap<u64, Seen>>,
    pub catalog: BTreeMap<usize, CatalogView>,
    pub snapshot_ids: BTreeMap<u64, u64>,
    /// The read-back after healing (its op id), judged even when it failed.
    pub final_read: Option<usize>,
}

/// A block that read back as something the operations do not allow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DataViolation {
    /// The read-back's op id.
    pub read: usize,
    /// What was read, after which operation.
    pub what: String,
    pub block: u64,
    pub allowed: String,
    pub found: String,
}

/// An acknowledged operation whose effect the catalog did not show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CatalogViolation {
    pub op: usize,
    pub promise: String,
    pub found: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    pub ok: usize,
    pub failed: usize,
    pub indeterminate: usize,
}

/// The operations checkers' counts and violations.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OperationsCheck {
    /// Per operation name (`snapshot`, `rollback`, `rel_reverse`, `read`, ...).
    pub operations: BTreeMap<String, Counts>,
    pub writes: Counts,
    /// Read-backs judged (successful ones), and the blocks in them.
    pub reads_judged: usize,
    pub blocks_judged: usize,
    /// Reads per what they read after (`after rollback`, `after rel_reverse`, `snapshot`, ...).
    pub judged_by_context: BTreeMap<String, usize>,
    /// The most lineages (possible contents after rollbacks of unknown outcome) at once.
    pub max_lineages: usize,
    pub catalog_judged: usize,
    pub violations: Vec<DataViolation>,
    pub catalog_violations: Vec<CatalogViolation>,
}

type Allowed = BTreeSet<Option<u64>>;

/// A possible history of the volume's content: `base` (a snapshot's content, or zeroes) from a
/// rollback that ran during `from` (invoke, complete µs).
#[derive(Debug, Clone, PartialEq)]
struct Lineage {
    base: Option<u64>,
    from: (u64, u64),
}

struct Model<'a> {
    /// Writes per block, in n order.
    writes: BTreeMap<u64, Vec<&'a Op>>,
    blocks: Vec<u64>,
    lineages: Vec<Lineage>,
    snaps: BTreeMap<u64, BTreeMap<u64, Allowed>>,
}

impl<'a> Model<'a> {
    fn new(history: &'a [Op], blocks: Vec<u64>) -> Self {
        let mut writes: BTreeMap<u64, Vec<&Op>> = BTreeMap::new();
        for op in history {
            if let OpKind::OpsWrite { block, .. } = op.kind {
                writes.entry(block).or_default().push(op);
            }
        }
        for w in writes.values_mut() {
            w.sort_by_key(|o| n_of(o));
        }
        Self { writes, blocks, lineages: vec![Lineage { base: None, from: (0, 0) }], snaps: BTreeMap::new() }
    }

    /// What `block` may hold at the cut `(inv, comp)` in `lin`.
    fn allowed_in(&self, block: u64, lin: &Lineage, cut: (u64, u64)) -> Allowed {
        let issued: Vec<&Op> = self
            .writes
            .get(&block)
            .map(|w| w.iter().copied().filter(|o| o.invoke_us < cut.1).collect())
            .unwrap_or_default();
        // The newest write certainly made in this lineage and certainly before the cut.
        let lower = issued
            .iter()
            .copied()
            .filter(|o| o.is_ok() && o.invoke_us > lin.from.1 && o.complete_us < cut.0)
            .map(n_of)
            .max();
        let mut out = Allowed::new();
        match lower {
            Some(lo) => {
                out.extend(issued.iter().copied().filter(|o| n_of(o) >= lo || unknown(o)).map(|o| Some(n_of(o))))
            }
            None => {
                match lin.base {
                    None => {
                        out.insert(None);
                    }
                    Some(s) => out.extend(self.snaps.get(&s).and_then(|c| c.get(&block)).into_iter().flatten()),
                }
                // Writes not certainly over before the rollback began (or of unknown outcome).
                let maybe = issued.iter().copied().filter(|o| unknown(o) || o.complete_us > lin.from.0);
                out.extend(maybe.map(|o| Some(n_of(o))));
            }
        }
        out
    }

    /// What `block` may hold at the cut, over every possible lineage.
    fn allowed(&self, block: u64, cut: (u64, u64)) -> Allowed {
        self.lineages.iter().flat_map(|l| self.allowed_in(block, l, cut)).collect()
    }

    fn rollback(&mut self, snap: u64, op: &Op) {
        if !self.snaps.contains_key(&snap) {
            return; // never acknowledged: the workload does not roll back to it
        }
        let lin = Lineage { base: Some(snap), from: (op.invoke_us, op.complete_us) };
        if op.is_ok() {
            self.lineages = vec![lin];
        } else if !self.lineages.contains(&lin) {
            self.lineages.push(lin);
        }
    }
}

fn n_of(o: &Op) -> u64 {
    match o.kind {
        OpKind::OpsWrite { n, .. } => n,
        _ => 0,
    }
}

/// An indeterminate write: it may take effect at any time after it was issued.
fn unknown(o: &Op) -> bool {
    matches!(o.outcome, Outcome::Info)
}

fn describe(a: &Allowed) -> String {
    let items: Vec<String> = a.iter().map(|v| v.map_or("zeroes".to_string(), |n| format!("n={n}"))).collect();
    format!("{{{}}}", items.join(", "))
}

fn passes(seen: &Seen, allowed: &Allowed) -> bool {
    match seen {
        Seen::Zero => allowed.contains(&None),
        Seen::Write { n } => allowed.contains(&Some(*n)),
        Seen::Foreign { .. } | Seen::Corrupt { .. } => false,
    }
}

fn count(c: &mut Counts, outcome: Outcome) {
    match outcome {
        Outcome::Ok { .. } => c.ok += 1,
        Outcome::Fail => c.failed += 1,
        Outcome::Info => c.indeterminate += 1,
    }
}

/// Judge the operations workload's run. `blocks` are the owned block numbers.
pub fn check(
    history: &[Op],
    obs: &Observations,
    blocks: std::ops::Range<u64>,
) -> (CheckResult, CheckResult, OperationsCheck) {
    let mut model = Model::new(history, blocks.collect());
    let mut c = OperationsCheck { max_lineages: 1, ..Default::default() };
    let mut offending: Vec<Op> = Vec::new();
    let mut last: Option<&Op> = None;
    for op in history {
        let kind = match op.kind {
            OpKind::OpsWrite { .. } => {
                count(&mut c.writes, op.outcome);
                continue;
            }
            OpKind::VolumeOp { op: k } => k,
            _ => continue,
        };
        count(c.operations.entry(kind.name().into()).or_default(), op.outcome);
        match kind {
            VolumeOpKind::Snapshot { snap } if op.is_ok() => {
                let cut = (op.invoke_us, op.complete_us);
                let content = model.blocks.iter().map(|&b| (b, model.allowed(b, cut))).collect();
                model.snaps.insert(snap, content);
            }
            VolumeOpKind::Rollback { snap } => {
                model.rollback(snap, op);
                c.max_lineages = c.max_lineages.max(model.lineages.len());
            }
            VolumeOpKind::Read { of } => {
                judge_read(&mut model, &mut c, obs, op, of, last, &mut offending);
                continue;
            }
            _ => {}
        }
        judge_catalog(&mut c, obs, op, kind);
        last = Some(op);
    }
    if let Some(id) = obs.final_read {
        if history.get(id).is_none_or(|o| !o.is_ok()) {
            c.violations.push(DataViolation {
                read: id,
                what: "the volume after healing".into(),
                block: 0,
                allowed: "a readable volume".into(),
                found: history.get(id).and_then(|o| o.error.clone()).unwrap_or_else(|| "no read".into()),
            });
        }
    }
    offending.truncate(12);
    (data_result(&c, offending), catalog_result(&c, history), c)
}

fn judge_read(
    model: &mut Model,
    c: &mut OperationsCheck,
    obs: &Observations,
    op: &Op,
    of: ReadOf,
    last: Option<&Op>,
    offending: &mut Vec<Op>,
) {
    let Some(seen) = obs.reads.get(&op.id).filter(|_| op.is_ok()) else { return };
    let last_name = match last.map(|l| l.kind) {
        Some(OpKind::VolumeOp { op: k }) => k.name(),
        _ => "start",
    };
    let last_name = if obs.final_read == Some(op.id) { "healing" } else { last_name };
    let after = last.map_or(String::new(), |l| format!(" after {last_name} (last operation #{})", l.id));
    let (what, context) = match of {
        ReadOf::Volume => (format!("the volume{after}"), format!("volume after {last_name}")),
        ReadOf::Snapshot { snap } => (format!("snapshot {snap}"), "snapshot".into()),
        ReadOf::Clone { snap } => (format!("the clone of snapshot {snap}"), "clone".into()),
        ReadOf::Tail { offset } => (format!("the new tail at {offset}{after}"), "resize tail".into()),
    };
    c.reads_judged += 1;
    *c.judged_by_context.entry(context).or_default() += 1;
    let cut = (op.invoke_us, op.complete_us);
    let mut bad = false;
    for (&block, s) in seen {
        c.blocks_judged += 1;
        let allowed = match of {
            ReadOf::Volume => model.allowed(block, cut),
            ReadOf::Snapshot { snap } | ReadOf::Clone { snap } => {
                model.snaps.get(&snap).and_then(|m| m.get(&block)).cloned().unwrap_or_default()
            }
            ReadOf::Tail { .. } => Allowed::from([None]),
        };
        if passes(s, &allowed) {
            // A snapshot never changes: once read, this is its content.
            if let ReadOf::Snapshot { snap } = of {
                let v = match s {
                    Seen::Write { n } => Some(*n),
                    _ => None,
                };
                model.snaps.entry(snap).or_default().insert(block, Allowed::from([v]));
            }
            continue;
        }
        bad = true;
        c.violations.push(DataViolation {
            read: op.id,
            what: what.clone(),
            block,
            allowed: describe(&allowed),
            found: s.to_string(),
        });
    }
    if bad {
        offending.extend(last.cloned());
        offending.push(op.clone());
    }
}

fn judge_catalog(c: &mut OperationsCheck, obs: &Observations, op: &Op, kind: VolumeOpKind) {
    if !op.is_ok() {
        return;
    }
    let Some(view) = obs.catalog.get(&op.id) else { return };
    let rel = |id: u64| view.relationships.iter().find(|r| r.id == id);
    let (promise, kept): (String, bool) = match kind {
        VolumeOpKind::RelCreate { target } => (
            format!("an active relationship to node-{target}"),
            view.relationships.iter().any(|r| r.target == target && !r.paused),
        ),
        VolumeOpKind::RelPause { id } => (format!("relationship {id} paused"), rel(id).is_some_and(|r| r.paused)),
        VolumeOpKind::RelResume { id } => (format!("relationship {id} active"), rel(id).is_some_and(|r| !r.paused)),
        VolumeOpKind::RelDelete { id } => (format!("relationship {id} gone"), rel(id).is_none()),
        VolumeOpKind::RelReverse { id, from, to } => (
            format!("primary node-{to}, relationship {id} pointing at node-{from}"),
            view.primary == to && rel(id).is_some_and(|r| r.target == from),
        ),
        VolumeOpKind::Resize { size } => (format!("size {size} bytes"), view.size_bytes >= size),
        _ => return,
    };
    c.catalog_judged += 1;
    if !kept {
        c.catalog_violations.push(CatalogViolation { op: op.id, promise, found: format!("{view:?}") });
    }
}

fn data_result(c: &OperationsCheck, offending: Vec<Op>) -> CheckResult {
    let ops: usize = c.operations.iter().filter(|(k, _)| k.as_str() != "read").map(|(_, v)| v.ok).sum();
    if let Some(first) = c.violations.first() {
        return CheckResult::fail(
            DATA,
            format!(
                "{} blocks read back wrong in {} reads; first: {} (read #{}), block {}: allowed {}, found {}",
                c.violations.len(),
                c.violations.iter().map(|v| v.read).collect::<BTreeSet<_>>().len(),
                first.what,
                first.read,
                first.block,
                first.allowed,
                first.found
            ),
            offending,
        );
    }
    let by: Vec<String> = c.judged_by_context.iter().map(|(k, v)| format!("{v} {k}")).collect();
    CheckResult::pass(
        DATA,
        format!(
            "{} read-backs ({} blocks: {}) hold what {ops} acknowledged operations and {} acknowledged writes promise",
            c.reads_judged,
            c.blocks_judged,
            by.join(", "),
            c.writes.ok
        ),
    )
}

fn catalog_result(c: &OperationsCheck, history: &[Op]) -> CheckResult {
    match c.catalog_violations.first() {
        None => CheckResult::pass(
            CATALOG,
            format!("{} acknowledged catalog operations show their effect", c.catalog_judged),
        ),
        Some(v) => CheckResult::fail(
            CATALOG,
            format!(
                "{} of {} acknowledged catalog operations did not show their effect; first #{}: expected {}, found {}",
                c.catalog_violations.len(),
                c.catalog_judged,
                v.op,
                v.promise,
                v.found
            ),
            c.catalog_violations.iter().filter_map(|v| history.get(v.op).cloned()).take(12).collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: Outcome = Outcome::Ok { read: None, cas_matched: None };

    /// Builds a history one op at a time, each taking 5 µs, 10 µs after the previous one.
    #[derive(Default)]
    struct H {
        ops: Vec<Op>,
        obs: Observations,
    }

    impl H {
        fn at(&mut self, kind: OpKind, outcome: Outcome, invoke_us: u64, complete_us: u64) -> usize {
            let id = self.ops.len();
            let key = format!("ops/{id}");
            self.ops.push(Op { id, client: 0, key, kind, invoke_us, complete_us, outcome, error: None });
            id
        }
        fn next(&mut self, kind: OpKind, outcome: Outcome) -> usize {
            let t = self.ops.last().map_or(10, |o| o.complete_us + 10);
            self.at(kind, outcome, t, t + 5)
        }
        fn write(&mut self, block: u64, n: u64, outcome: Outcome) -> usize {
            self.next(OpKind::OpsWrite { block, n }, outcome)
        }
        fn op(&mut self, op: VolumeOpKind, outcome: Outcome) -> usize {
            self.next(OpKind::VolumeOp { op }, outcome)
        }
        fn read(&mut self, of: ReadOf, seen: &[Seen]) -> usize {
            let id = self.op(VolumeOpKind::Read { of }, OK);
            self.obs.reads.insert(id, seen.iter().cloned().enumerate().map(|(b, s)| (b as u64, s)).collect());
            id
        }
        fn check(&self) -> (CheckResult, CheckResult, OperationsCheck) {
            check(&self.ops, &self.obs, 0..2)
        }
    }

    fn w(n: u64) -> Seen {
        Seen::Write { n }
    }

    /// Issue 11, race 3: write, snapshot, overwrite, roll back, write elsewhere, reverse.
    fn race_three(after_reverse: &[Seen]) -> (CheckResult, OperationsCheck) {
        let mut h = H::default();
        h.op(VolumeOpKind::RelCreate { target: 2 }, OK);
        h.write(0, 1, OK);
        h.op(VolumeOpKind::Snapshot { snap: 1 }, OK);
        h.read(ReadOf::Snapshot { snap: 1 }, &[w(1), Seen::Zero]);
        h.write(0, 2, OK);
        h.op(VolumeOpKind::Rollback { snap: 1 }, OK);
        h.write(1, 1, OK);
        h.op(VolumeOpKind::RelReverse { id: 1, from: 1, to: 2 }, OK);
        h.read(ReadOf::Volume, after_reverse);
        let (data, _, c) = h.check();
        (data, c)
    }

    #[test]
    fn race_three_is_caught_and_the_right_content_passes() {
        let (r, c) = race_three(&[w(2), Seen::Zero]);
        assert!(!r.passed, "{}", r.summary);
        let found: Vec<(u64, &str)> = c.violations.iter().map(|v| (v.block, v.found.as_str())).collect();
        assert_eq!(found, vec![(0, "n=2"), (1, "zeroes")]);
        assert!(c.violations[0].what.contains("after rel_reverse"), "{:?}", c.violations[0]);
        assert_eq!(c.violations[0].allowed, "{n=1}");
        let (r, c) = race_three(&[w(1), w(1)]);
        assert!(r.passed, "{}", r.summary);
        assert_eq!((c.reads_judged, c.blocks_judged), (2, 4));
    }

    #[test]
    fn a_snapshot_holds_what_was_acknowledged_before_it_and_nothing_after() {
        let snapshot_then = |seen: Seen, second: Outcome| {
            let mut h = H::default();
            h.write(0, 1, OK);
            h.write(0, 2, second);
            h.op(VolumeOpKind::Snapshot { snap: 1 }, OK);
            h.write(0, 3, OK);
            h.read(ReadOf::Snapshot { snap: 1 }, &[seen, Seen::Zero]);
            h.check().0.passed
        };
        assert!(snapshot_then(w(2), OK));
        assert!(!snapshot_then(w(1), OK), "an acknowledged write missing from the snapshot");
        assert!(!snapshot_then(w(3), OK), "a write made after the snapshot in it");
        assert!(!snapshot_then(Seen::Zero, OK));
        // An indeterminate write may or may not be in it.
        assert!(snapshot_then(w(1), Outcome::Info) && snapshot_then(w(2), Outcome::Info));
    }

    #[test]
    fn a_write_overlapping_the_snapshot_may_be_in_it_or_not() {
        for seen in [w(1), w(2)] {
            let mut h = H::default();
            h.write(0, 1, OK);
            h.at(OpKind::OpsWrite { block: 0, n: 2 }, OK, 100, 130);
            h.at(OpKind::VolumeOp { op: VolumeOpKind::Snapshot { snap: 1 } }, OK, 110, 120);
            h.read(ReadOf::Snapshot { snap: 1 }, &[seen, Seen::Zero]);
            assert!(h.check().0.passed);
        }
    }

    #[test]
    fn rollback_keeps_the_snapshot_plus_later_writes_and_overlapping_ones_either_way() {
        let run = |block1: Seen| {
            let mut h = H::default();
            h.write(1, 1, OK);
            h.op(VolumeOpKind::Snapshot { snap: 1 }, OK);
            h.write(1, 2, OK);
            // Write 3 to block 1 overlaps the rollback: it may have landed before or after it.
            h.at(OpKind::OpsWrite { block: 1, n: 3 }, OK, 100, 200);
            h.at(OpKind::VolumeOp { op: VolumeOpKind::Rollback { snap: 1 } }, OK, 110, 120);
            h.read(ReadOf::Volume, &[Seen::Zero, block1]);
            h.check().0
        };
        assert!(run(w(1)).passed, "the snapshot's content");
        assert!(run(w(3)).passed, "the overlapping write landed after the rollback");
        let r = run(w(2));
        assert!(!r.passed, "rolled-back data resurrected");
        assert!(r.summary.contains("allowed {n=1, n=3}"), "{}", r.summary);
    }

    #[test]
    fn a_rollback_of_unknown_outcome_allows_both_contents() {
        for (seen, ok) in [(w(1), true), (w(2), true), (Seen::Zero, false)] {
            let mut h = H::default();
            h.write(0, 1, OK);
            h.op(VolumeOpKind::Snapshot { snap: 1 }, OK);
            h.write(0, 2, OK);
            h.op(VolumeOpKind::Rollback { snap: 1 }, Outcome::Info);
            h.read(ReadOf::Volume, &[seen, Seen::Zero]);
            let (r, _, c) = h.check();
            assert_eq!(r.passed, ok, "{}", r.summary);
            assert_eq!(c.max_lineages, 2);
        }
    }

    #[test]
    fn a_clone_holds_the_snapshot_as_read() {
        let run = |clone: Seen| {
            let mut h = H::default();
            h.write(0, 1, Outcome::Info);
            h.op(VolumeOpKind::Snapshot { snap: 1 }, OK);
            // The snapshot read pins its content: the indeterminate write is in it.
            h.read(ReadOf::Snapshot { snap: 1 }, &[w(1), Seen::Zero]);
            h.write(0, 2, OK);
            h.op(VolumeOpKind::Clone { snap: 1 }, OK);
            h.read(ReadOf::Clone { snap: 1 }, &[clone, Seen::Zero]);
            h.check().0.passed
        };
        assert!(run(w(1)));
        assert!(!run(Seen::Zero), "the snapshot was read holding n=1");
        assert!(!run(w(2)));
        assert!(!run(Seen::Foreign { writer: 9, block: 0, n: 1 }));
    }

    #[test]
    fn an_unreadable_final_read_fails_and_resize_tails_must_be_zero() {
        let mut h = H::default();
        h.op(VolumeOpKind::Resize { size: 1 << 20 }, OK);
        h.read(ReadOf::Tail { offset: (1 << 20) - 4096 }, &[w(1)]);
        let id = h.op(VolumeOpKind::Read { of: ReadOf::Volume }, Outcome::Fail);
        h.obs.final_read = Some(id);
        let (r, _, c) = h.check();
        assert!(!r.passed);
        assert_eq!(c.violations.len(), 2, "{:?}", c.violations);
    }

    #[test]
    fn catalog_effects_are_judged() {
        let view = |primary, rels: Vec<RelView>| CatalogView { primary, size_bytes: 8 << 20, relationships: rels };
        let rel = |target, paused| RelView { id: 1, target, paused };
        let mut h = H::default();
        let a = h.op(VolumeOpKind::RelCreate { target: 2 }, OK);
        h.obs.catalog.insert(a, view(1, vec![rel(2, false)]));
        let b = h.op(VolumeOpKind::RelPause { id: 1 }, OK);
        h.obs.catalog.insert(b, view(1, vec![rel(2, false)]));
        let c = h.op(VolumeOpKind::RelReverse { id: 1, from: 1, to: 2 }, OK);
        h.obs.catalog.insert(c, view(2, vec![rel(1, false)]));
        let d = h.op(VolumeOpKind::RelDelete { id: 1 }, Outcome::Info);
        h.obs.catalog.insert(d, view(2, vec![rel(1, false)]));
        let (_, r, check) = h.check();
        assert!(!r.passed);
        assert_eq!(check.catalog_judged, 3, "the indeterminate delete is not judged");
        assert_eq!(check.catalog_violations.iter().map(|v| v.op).collect::<Vec<_>>(), vec![b]);
    }
}
