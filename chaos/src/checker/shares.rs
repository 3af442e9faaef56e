//! The share checker: judge what the share workload observed (no I/O here).
//!
//! - `share-converged` — after healing, every member's copy of the share is identical (within
//!   the scenario's `heal_within`), and that copy holds every acknowledged put or a put that may
//!   legally follow it ([`super::ha::judge_final`]: each member's writer puts its own keys one at
//!   a time, so a key's puts are ordered).

use std::collections::BTreeMap;

use super::ha::{judge_final, FinalState, PutAttempt};
use super::CheckResult;
use crate::history::{Op, OpKind};
use crate::shares::{decode_share_value, share_key};

pub const NAME: &str = "share-converged";

/// A member's entries (key, value), in key order.
pub type Entries = Vec<(String, Vec<u8>)>;

/// A member's copy: its entries, or why it could not be read.
pub type MemberCopy = Result<Entries, String>;

/// `share-converged` over every member's final copy; `converged_ms` is how long after the final
/// reads began the copies were first seen identical (None: never, within `within_ms`).
pub fn converged(
    history: &[Op],
    copies: &BTreeMap<u64, MemberCopy>,
    converged_ms: Option<u64>,
    within_ms: u64,
) -> CheckResult {
    let puts: Vec<PutAttempt> = history
        .iter()
        .filter_map(|o| match o.kind {
            OpKind::SharePut { member, slot, n } => Some(PutAttempt {
                op: o.id,
                key: share_key(member, slot),
                n,
                acked: o.is_ok(),
                invoke_us: o.invoke_us,
                complete_us: o.complete_us,
            }),
            _ => None,
        })
        .collect();
    let mut problems = Vec::new();
    for (m, c) in copies {
        if let Err(e) = c {
            problems.push(format!("node-{m}'s copy could not be read: {e}"));
        }
    }
    let read: Vec<(u64, &Entries)> = copies.iter().filter_map(|(m, c)| c.as_ref().ok().map(|c| (*m, c))).collect();
    let Some(&(first, reference)) = read.first() else {
        return CheckResult::fail(NAME, "no member's copy could be read".into(), Vec::new());
    };
    for (m, c) in &read[1..] {
        if *c != reference {
            let a: BTreeMap<&String, &Vec<u8>> = reference.iter().map(|(k, v)| (k, v)).collect();
            let b: BTreeMap<&String, &Vec<u8>> = c.iter().map(|(k, v)| (k, v)).collect();
            let differ: Vec<&String> =
                a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).take(6).copied().collect();
            problems.push(format!(
                "node-{m}'s copy differs from node-{first}'s after {within_ms} ms ({} vs {} keys; first differing: {})",
                c.len(),
                reference.len(),
                differ.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
    }
    let state: FinalState = reference
        .iter()
        .map(|(k, v)| {
            let member = k.strip_prefix('m').and_then(|r| r.split('/').next()).and_then(|m| m.parse().ok());
            (k.clone(), member.and_then(|m| decode_share_value(m, v)))
        })
        .collect();
    let j = judge_final(&puts, &state);
    let mut offending = Vec::new();
    for v in &j.violations {
        problems.push(format!("in node-{first}'s copy: {}", v.what));
        if let Some(op) = v.lost_op.and_then(|id| history.get(id)) {
            offending.push(op.clone());
        }
    }
    if j.acked_puts == 0 {
        problems.push("no share put was acknowledged: nothing was tested".into());
    }
    if problems.is_empty() {
        CheckResult::pass(
            NAME,
            format!(
                "{} members hold identical copies ({} keys) {} ms after healing; {} acknowledged puts, every one of {} \
                 keys holds its last acknowledged value or a later one",
                read.len(),
                reference.len(),
                converged_ms.unwrap_or(0),
                j.acked_puts,
                j.keys_judged
            ),
        )
    } else {
        offending.truncate(12);
        CheckResult::fail(NAME, format!("{} problem(s): {}", problems.len(), problems.join("; ")), offending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Outcome;
    use crate::shares::share_value;

    fn op(id: usize, member: u64, slot: u64, n: u64) -> Op {
        Op {
            id,
            client: member as usize,
            key: format!("share/{member}/k{slot}"),
            kind: OpKind::SharePut { member, slot, n },
            invoke_us: id as u64 * 100,
            complete_us: id as u64 * 100 + 50,
            outcome: Outcome::Ok { read: None, cas_matched: None },
            error: None,
        }
    }

    #[test]
    fn diverged_or_lossy_copies_fail() {
        let h = vec![op(0, 1, 0, 1), op(1, 2, 0, 1), op(2, 1, 0, 2)];
        let good = vec![(share_key(1, 0), share_value(1, 2)), (share_key(2, 0), share_value(2, 1))];
        let copies = BTreeMap::from([(1, Ok(good.clone())), (2, Ok(good.clone())), (3, Ok(good.clone()))]);
        assert!(converged(&h, &copies, Some(10), 1000).passed);
        let mut stale = good.clone();
        stale[0].1 = share_value(1, 1);
        let diverged = BTreeMap::from([(1, Ok(good.clone())), (2, Ok(stale.clone()))]);
        assert!(!converged(&h, &diverged, None, 1000).passed);
        // Identical everywhere but the last acknowledged put of m1/k0 is lost.
        let lossy = BTreeMap::from([(1, Ok(stale.clone())), (2, Ok(stale))]);
        let r = converged(&h, &lossy, Some(10), 1000);
        assert!(!r.passed && r.offending.len() == 1 && r.offending[0].id == 2, "{}", r.summary);
        let unreadable = BTreeMap::from([(1, Ok(good)), (2, Err("down".into()))]);
        assert!(!converged(&h, &unreadable, None, 1000).passed);
    }
}
