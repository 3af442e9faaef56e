//! Checkers: each judges one property of a finished run and returns a [`CheckResult`]. They read
//! the recorded history and what the healed cluster says; they never change the cluster.

pub mod blocks;
pub mod ha;
pub mod linearizability;
pub mod operations;
pub mod shares;
pub mod vms;

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::history::{Op, OpKind, Outcome};
use crate::workload::APPEND_PREFIX;

/// One checker's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    /// One line for the summary.
    pub summary: String,
    /// The minimal offending part of the history, when a checker failed on it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub offending: Vec<Op>,
}

impl CheckResult {
    pub fn pass(name: &str, summary: String) -> Self {
        Self { name: name.into(), passed: true, summary, offending: Vec::new() }
    }
    pub fn fail(name: &str, summary: String, offending: Vec<Op>) -> Self {
        Self { name: name.into(), passed: false, summary, offending }
    }
}

/// Linearizability of every register's history.
pub fn linearizable(history: &[Op]) -> CheckResult {
    let mut by_key: BTreeMap<&str, Vec<Op>> = BTreeMap::new();
    for op in history.iter().filter(|o| !o.key.starts_with(APPEND_PREFIX) && o.kind.is_register()) {
        by_key.entry(&op.key).or_default().push(op.clone());
    }
    let mut inconclusive = Vec::new();
    for (key, ops) in &by_key {
        match linearizability::check_key(ops) {
            linearizability::Verdict::Linearizable => {}
            linearizability::Verdict::Inconclusive => inconclusive.push(key.to_string()),
            linearizability::Verdict::Violation(part) => {
                return CheckResult::fail(
                    "linearizable",
                    format!("key {key}: no linearization exists; smallest offending part has {} ops", part.len()),
                    part,
                )
            }
        }
    }
    if !inconclusive.is_empty() {
        return CheckResult::fail(
            "linearizable",
            format!("search budget exhausted on {}; shorten the run or lower the rate", inconclusive.join(", ")),
            Vec::new(),
        );
    }
    let n: usize = by_key.values().map(Vec::len).sum();
    CheckResult::pass("linearizable", format!("{n} register ops on {} keys have a linearization", by_key.len()))
}

/// Every acknowledged append is present with its value in the healed cluster (`final_state`
/// is a linearizable scan of the append prefix).
pub fn acknowledged_writes(history: &[Op], final_state: &HashMap<String, Vec<u8>>) -> CheckResult {
    let acked: Vec<&Op> = history
        .iter()
        .filter(|o| matches!(o.kind, OpKind::Append { .. }) && matches!(o.outcome, Outcome::Ok { .. }))
        .collect();
    let mut lost = Vec::new();
    for op in &acked {
        let OpKind::Append { value } = op.kind else { continue };
        let present = final_state.get(&op.key).map(|v| v.as_slice() == value.to_string().as_bytes()).unwrap_or(false);
        if !present {
            lost.push((*op).clone());
        }
    }
    if lost.is_empty() {
        CheckResult::pass(
            "acknowledged-writes",
            format!("all {} acknowledged writes are readable after healing", acked.len()),
        )
    } else {
        let first: Vec<Op> = lost.iter().take(12).cloned().collect();
        CheckResult::fail(
            "acknowledged-writes",
            format!(
                "{} of {} acknowledged writes are missing after healing (first: {})",
                lost.len(),
                acked.len(),
                lost[0].key
            ),
            first,
        )
    }
}

/// Percentiles of a sample (nearest rank), in the sample's unit.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub samples: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Self { samples: v.len(), p50: rank(0.50), p99: rank(0.99), max: v[v.len() - 1] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_append_is_reported() {
        let op = |id, key: &str, value, outcome| Op {
            id,
            client: 0,
            key: key.into(),
            kind: OpKind::Append { value },
            invoke_us: 0,
            complete_us: 1,
            outcome,
            error: None,
        };
        let ok = Outcome::Ok { read: None, cas_matched: None };
        let h = vec![op(0, "ack/0/1", 1, ok), op(1, "ack/0/2", 2, ok), op(2, "ack/0/3", 3, Outcome::Info)];
        let state = HashMap::from([("ack/0/1".to_string(), b"1".to_vec())]);
        let r = acknowledged_writes(&h, &state);
        assert!(!r.passed);
        assert_eq!(r.offending.len(), 1);
        assert_eq!(r.offending[0].key, "ack/0/2");
    }

    #[test]
    fn stats_nearest_rank() {
        let s = Stats::of((1..=100).map(f64::from).collect());
        assert_eq!((s.p50, s.p99, s.max), (50.0, 99.0, 100.0));
    }
}
