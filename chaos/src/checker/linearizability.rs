//! A linearizability checker for a register with compare-and-set, after Wing & Gong with Lowe's
//! memoization (the algorithm behind Knossos and Porcupine), applied per key: linearizability
//! is compositional, so each register is checked on its own small history.
//!
//! Acknowledged operations must take effect between their invocation and their completion.
//! Indeterminate operations (`Info`) may take effect at any point after their invocation, or
//! never; since an effect after every observation is unobservable, "never" is the same as "last",
//! so they simply have no deadline. Failed operations and indeterminate reads had no effect and
//! are dropped. On failure the checker returns the smallest prefix of the key's history (closed
//! under real-time concurrency) that is already not linearizable.

use std::collections::HashSet;

use crate::history::{Op, OpKind, Outcome};

/// Search budget per key; a history needing more is reported as inconclusive.
const MAX_STEPS: u64 = 2_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// Not linearizable; the ops of the smallest offending prefix, in invocation order.
    Violation(Vec<Op>),
    /// The search budget ran out.
    Inconclusive,
}

type State = Option<u64>;

/// Apply `op` to `state` if its observed result is possible there.
fn step(state: State, op: &Op) -> Option<State> {
    match (op.kind, op.outcome) {
        (OpKind::Read, Outcome::Ok { read, .. }) => (read == state).then_some(state),
        (OpKind::Write { value } | OpKind::Append { value }, _) => Some(Some(value)),
        (OpKind::Cas { expected, new }, Outcome::Ok { cas_matched: Some(true), .. }) => {
            (state == expected).then_some(Some(new))
        }
        (OpKind::Cas { expected, .. }, Outcome::Ok { cas_matched: Some(false), .. }) => {
            (state != expected).then_some(state)
        }
        // An indeterminate CAS: if it happened, it behaved as CAS does.
        (OpKind::Cas { expected, new }, Outcome::Info) => Some(if state == expected { Some(new) } else { state }),
        _ => None,
    }
}

/// Whether this op participates (it may have had an effect or observed something).
fn relevant(op: &Op) -> bool {
    match op.outcome {
        Outcome::Ok { .. } => true,
        Outcome::Fail => false,
        Outcome::Info => !matches!(op.kind, OpKind::Read),
    }
}

/// Check one key's operations.
pub fn check_key(ops: &[Op]) -> Verdict {
    let mut ops: Vec<Op> = ops.iter().filter(|o| relevant(o)).cloned().collect();
    drop_unobservable(&mut ops);
    ops.sort_by_key(|o| (o.invoke_us, o.id));
    match search(&ops) {
        Some(true) => Verdict::Linearizable,
        Some(false) => Verdict::Violation(smallest_failing_prefix(&ops).unwrap_or(ops)),
        // Too many choices to settle the whole history; a violation may still show in a prefix.
        None => smallest_failing_prefix(&ops).map(Verdict::Violation).unwrap_or(Verdict::Inconclusive),
    }
}

/// Indeterminate writes whose value nobody observed may be assumed never to have happened —
/// unless a failed CAS exists on the key, which an unseen write could explain. Dropping them
/// keeps the search small without changing the verdict.
fn drop_unobservable(ops: &mut Vec<Op>) {
    let failed_cas = ops.iter().any(|o| matches!(o.outcome, Outcome::Ok { cas_matched: Some(false), .. }));
    if failed_cas {
        return;
    }
    let observed: HashSet<u64> = ops
        .iter()
        .filter_map(|o| match (o.kind, o.outcome) {
            (OpKind::Read, Outcome::Ok { read, .. }) => read,
            (OpKind::Cas { expected, .. }, _) => expected,
            _ => None,
        })
        .collect();
    ops.retain(|o| match (o.kind, o.outcome) {
        (OpKind::Write { value } | OpKind::Append { value } | OpKind::Cas { new: value, .. }, Outcome::Info) => {
            observed.contains(&value)
        }
        _ => true,
    });
}

/// Grow a prefix (ops invoked before some time, plus every op concurrent with them) until it
/// fails. Such prefixes of a linearizable history are linearizable, so the first failure is the
/// smallest offending part. `None` when no prefix is proven to fail.
fn smallest_failing_prefix(ops: &[Op]) -> Option<Vec<Op>> {
    let mut end = 0;
    while end < ops.len() {
        end += 1;
        // Close under concurrency: include ops invoked before any included op completed.
        let mut horizon = ops[..end].iter().map(deadline).max().unwrap_or(0);
        while end < ops.len() && ops[end].invoke_us < horizon {
            horizon = horizon.max(deadline(&ops[end]));
            end += 1;
        }
        if search(&ops[..end]) == Some(false) {
            let start = end.saturating_sub(12);
            return Some(ops[start..end].to_vec());
        }
    }
    None
}

fn deadline(op: &Op) -> u64 {
    match op.outcome {
        Outcome::Info => u64::MAX,
        _ => op.complete_us,
    }
}

/// Wing–Gong–Lowe search over `ops` (sorted by invocation). `Some(true)` linearizable,
/// `Some(false)` not, `None` when the step budget ran out.
fn search(ops: &[Op]) -> Option<bool> {
    let n = ops.len();
    let has_deadline = |j: usize| !matches!(ops[j].outcome, Outcome::Info);
    let must_finish = (0..n).filter(|&j| has_deadline(j)).count();
    let mut done = vec![false; n];
    let mut bits = Bits::new(n);
    let mut finished = 0usize;
    let mut state: State = None;
    let mut cache: HashSet<(Bits, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut from = 0usize;
    let mut steps = 0u64;
    loop {
        if finished == must_finish {
            return Some(true);
        }
        steps += 1;
        if steps > MAX_STEPS {
            return None;
        }
        // A candidate must be invoked before every pending op's deadline.
        let min_deadline = (0..n).filter(|&j| !done[j]).map(|j| deadline(&ops[j])).min().unwrap_or(u64::MAX);
        let mut chosen = None;
        let mut j = from;
        while j < n && ops[j].invoke_us <= min_deadline {
            if !done[j] {
                if let Some(next) = step(state, &ops[j]) {
                    let mut b = bits.clone();
                    b.set(j);
                    if !cache.contains(&(b.clone(), next)) {
                        chosen = Some((j, next, b));
                        break;
                    }
                }
            }
            j += 1;
        }
        match chosen {
            Some((j, next, b)) => {
                cache.insert((b.clone(), next));
                stack.push((j, state));
                done[j] = true;
                bits = b;
                if has_deadline(j) {
                    finished += 1;
                }
                state = next;
                from = 0;
            }
            None => {
                let Some((j, prev)) = stack.pop() else { return Some(false) };
                done[j] = false;
                bits.clear(j);
                if has_deadline(j) {
                    finished -= 1;
                }
                state = prev;
                from = j + 1;
            }
        }
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Self(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(id: usize, kind: OpKind, t: (u64, u64), outcome: Outcome) -> Op {
        Op { id, client: id, key: "k".into(), kind, invoke_us: t.0, complete_us: t.1, outcome, error: None }
    }
    fn ok() -> Outcome {
        Outcome::Ok { read: None, cas_matched: None }
    }
    fn read(v: Option<u64>) -> Outcome {
        Outcome::Ok { read: v, cas_matched: None }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![
            op(0, OpKind::Write { value: 1 }, (0, 10), ok()),
            op(1, OpKind::Read, (20, 30), read(Some(1))),
            op(
                2,
                OpKind::Cas { expected: Some(1), new: 2 },
                (40, 50),
                Outcome::Ok { read: None, cas_matched: Some(true) },
            ),
            op(3, OpKind::Read, (60, 70), read(Some(2))),
        ];
        assert_eq!(check_key(&h), Verdict::Linearizable);
    }

    #[test]
    fn stale_read_is_a_violation() {
        let h = vec![
            op(0, OpKind::Write { value: 1 }, (0, 10), ok()),
            op(1, OpKind::Write { value: 2 }, (20, 30), ok()),
            op(2, OpKind::Read, (40, 50), read(Some(1))),
            op(3, OpKind::Read, (60, 70), read(Some(2))),
        ];
        match check_key(&h) {
            Verdict::Violation(part) => {
                assert!(part.iter().any(|o| o.id == 2), "the stale read is in the offending part: {part:?}");
                assert!(!part.iter().any(|o| o.id == 3), "later ops are not: {part:?}");
            }
            v => panic!("expected a violation, got {v:?}"),
        }
    }

    #[test]
    fn concurrent_ops_may_take_either_order() {
        let h = vec![
            op(0, OpKind::Write { value: 1 }, (0, 100), ok()),
            op(1, OpKind::Read, (10, 20), read(None)),
            op(2, OpKind::Read, (30, 40), read(Some(1))),
            op(3, OpKind::Read, (50, 60), read(Some(1))),
        ];
        assert_eq!(check_key(&h), Verdict::Linearizable);
    }

    #[test]
    fn indeterminate_write_may_or_may_not_happen() {
        let lost =
            vec![op(0, OpKind::Write { value: 1 }, (0, 10), Outcome::Info), op(1, OpKind::Read, (20, 30), read(None))];
        assert_eq!(check_key(&lost), Verdict::Linearizable);
        let late = vec![
            op(0, OpKind::Write { value: 1 }, (0, 10), Outcome::Info),
            op(1, OpKind::Read, (20, 30), read(None)),
            op(2, OpKind::Read, (40, 50), read(Some(1))),
        ];
        assert_eq!(check_key(&late), Verdict::Linearizable);
        // But once seen, it cannot un-happen.
        let flip = vec![
            op(0, OpKind::Write { value: 1 }, (0, 10), Outcome::Info),
            op(1, OpKind::Read, (20, 30), read(Some(1))),
            op(2, OpKind::Read, (40, 50), read(None)),
        ];
        assert!(matches!(check_key(&flip), Verdict::Violation(_)));
    }

    #[test]
    fn failed_cas_must_have_seen_another_value() {
        let h = vec![
            op(0, OpKind::Write { value: 5 }, (0, 10), ok()),
            op(
                1,
                OpKind::Cas { expected: Some(5), new: 6 },
                (20, 30),
                Outcome::Ok { read: None, cas_matched: Some(false) },
            ),
        ];
        assert!(matches!(check_key(&h), Verdict::Violation(_)));
    }
}
