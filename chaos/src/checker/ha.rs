//! The HA checkers: judge what the HA workload observed (no I/O here).
//!
//! - `ha-acked-updates` — nothing acknowledged is lost. After healing, each VM's application
//!   state, read from its primary, holds for every key the value of the last acknowledged put
//!   of that key, or of a put that may legally have landed after it: an acknowledged put not
//!   over before the last acknowledged one began, or a put whose outcome the client does not
//!   know (it may take effect any time after it was sent). See [`judge_final`].
//! - `ha-single-primary` — never two hosts reporting role `primary` at the same pair
//!   generation; a host that knows it was deposed does not keep its guest running (two sightings
//!   at least [`DEPOSED_GRACE_MS`] apart, writes advancing); and the guest is never seen running
//!   on two hosts at once for longer than the spec's `max_overlap` (a multi-operation standby's
//!   guest runs beside the primary's by design and is not counted). A primary cut off from the
//!   cluster does not know it was deposed: it runs on until its host lease lapses, and only its
//!   outputs are fenced, so `max_overlap` is that bound, not zero.
//! - `ha-data` — each VM's memory and disk check passes on its primary after healing (the same
//!   judgement as `vm-data`, [`super::vms::data_named`]).
//! - `ha-failovers` — every kill of a VM's primary host was followed by a failover of that
//!   VM's pair (its `failovers` count grew), and at least one such kill happened: a run that
//!   failed nothing over tested nothing.

use std::collections::{BTreeMap, BTreeSet};

use haven_client::proto::ha::{AppView, HaPairRecord};
use serde::Serialize;

use super::CheckResult;
use crate::ha::{decode_app_value, HaSighting, PairSample};
use crate::history::{Op, OpKind};

/// A host that reports `deposed` must not be seen running its guest across sightings this far
/// apart (as the VM sampler's [`super::vms::MIN_GAP_MS`]: a deposed primary pauses at once).
pub const DEPOSED_GRACE_MS: u64 = super::vms::MIN_GAP_MS;

/// One put of a key-value workload, as [`judge_final`] needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutAttempt {
    /// The op in the history.
    pub op: usize,
    /// The key in the store judged (application key, share key).
    pub key: String,
    /// The put's number; the value it wrote decodes to it.
    pub n: u64,
    pub acked: bool,
    pub invoke_us: u64,
    pub complete_us: u64,
}

/// What the final state of a key-value store holds for one key: the put number its value
/// decodes to, or `None` when the value is not one the workload writes.
pub type FinalState = BTreeMap<String, Option<u64>>;

/// One key whose final value breaks the rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LostPut {
    pub key: String,
    pub what: String,
    /// The acknowledged put that is missing (its op id), when one is.
    pub lost_op: Option<usize>,
}

/// What [`judge_final`] counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FinalJudgement {
    /// Keys with at least one acknowledged put.
    pub keys_judged: usize,
    pub acked_puts: usize,
    /// Keys whose final value came from a put whose outcome was not acknowledged.
    pub unacked_present: Vec<usize>,
    pub violations: Vec<LostPut>,
}

/// Judge a store's final state against the puts that were attempted on it. For each key with an
/// acknowledged put, let `Q` be the acknowledged put that began last: the final value must be
/// present and come from a put `P` of that key that may follow `Q` in a linearization — `Q`
/// itself, an acknowledged `P` that did not complete before `Q` began, or a `P` without an
/// acknowledgement (its effect may land any time after it was sent). Keys without an
/// acknowledged put may be absent; any value present must be one the workload put to that key.
pub fn judge_final(puts: &[PutAttempt], state: &FinalState) -> FinalJudgement {
    let mut by_key: BTreeMap<&str, Vec<&PutAttempt>> = BTreeMap::new();
    for p in puts {
        by_key.entry(&p.key).or_default().push(p);
    }
    let mut out = FinalJudgement { acked_puts: puts.iter().filter(|p| p.acked).count(), ..Default::default() };
    for (key, found) in state {
        if !by_key.contains_key(key.as_str()) {
            out.violations.push(LostPut {
                key: key.clone(),
                what: format!("key {key} holds {}, but the workload never put it", show(*found)),
                lost_op: None,
            });
        }
    }
    for (key, attempts) in &by_key {
        let last_acked = attempts.iter().filter(|p| p.acked).max_by_key(|p| (p.invoke_us, p.n));
        let found = state.get(*key);
        if last_acked.is_some() {
            out.keys_judged += 1;
        }
        let Some(found) = found else {
            if let Some(q) = last_acked {
                out.violations.push(LostPut {
                    key: key.to_string(),
                    what: format!("key {key} is missing; acknowledged put #{} (n {}) wrote it", q.op, q.n),
                    lost_op: Some(q.op),
                });
            }
            continue;
        };
        let Some(n) = *found else {
            out.violations.push(LostPut {
                key: key.to_string(),
                what: format!("key {key} holds a value the workload never wrote"),
                lost_op: last_acked.map(|q| q.op),
            });
            continue;
        };
        let Some(p) = attempts.iter().find(|p| p.n == n) else {
            out.violations.push(LostPut {
                key: key.to_string(),
                what: format!("key {key} holds put n {n}, which was never put to this key"),
                lost_op: last_acked.map(|q| q.op),
            });
            continue;
        };
        if !p.acked {
            out.unacked_present.push(p.op);
        }
        if let Some(q) = last_acked {
            if p.acked && p.op != q.op && p.complete_us < q.invoke_us {
                out.violations.push(LostPut {
                    key: key.to_string(),
                    what: format!(
                        "key {key} holds acknowledged put #{} (n {}, done at {} us), but acknowledged put #{} (n {}, \
                         begun at {} us) overwrote it: the later acknowledged put is lost",
                        p.op, p.n, p.complete_us, q.op, q.n, q.invoke_us
                    ),
                    lost_op: Some(q.op),
                });
            }
        }
    }
    out
}

fn show(n: Option<u64>) -> String {
    n.map_or("a foreign value".to_string(), |n| format!("put n {n}"))
}

/// The application puts of VM `vm` in the history, keyed by application key.
fn app_puts(history: &[Op], vm: u64) -> Vec<PutAttempt> {
    history
        .iter()
        .filter_map(|o| match o.kind {
            OpKind::AppPut { vm: v, slot, n } if v == vm => Some(PutAttempt {
                op: o.id,
                key: crate::ha::app_key(slot),
                n,
                acked: o.is_ok(),
                invoke_us: o.invoke_us,
                complete_us: o.complete_us,
            }),
            _ => None,
        })
        .collect()
}

/// `ha-acked-updates` over each VM's final application state (read from its primary).
pub fn acked_updates(history: &[Op], finals: &BTreeMap<u64, Result<AppView, String>>) -> CheckResult {
    const NAME: &str = "ha-acked-updates";
    let (mut problems, mut offending) = (Vec::new(), Vec::new());
    let (mut acked, mut keys, mut unacked_present, mut said_unreachable) = (0, 0, 0, 0);
    for (&vm, view) in finals {
        let puts = app_puts(history, vm);
        let view = match view {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("vm-{vm}: the application state could not be read from its primary: {e}"));
                continue;
            }
        };
        let state: FinalState = view.entries.iter().map(|(k, v)| (k.clone(), decode_app_value(vm, v))).collect();
        let j = judge_final(&puts, &state);
        acked += j.acked_puts;
        keys += j.keys_judged;
        unacked_present += j.unacked_present.len();
        said_unreachable += j
            .unacked_present
            .iter()
            .filter_map(|id| history.get(*id))
            .filter(|o| o.error.as_deref().is_some_and(|e| e.starts_with("cluster unreachable")))
            .count();
        for v in j.violations {
            problems.push(format!("vm-{vm} (primary node-{}): {}", view.host.0, v.what));
            if let Some(op) = v.lost_op.and_then(|id| history.get(id)) {
                offending.push(op.clone());
            }
        }
    }
    if acked == 0 && problems.is_empty() {
        problems.push("no application put was acknowledged: nothing was tested".into());
    }
    let unknown = if unacked_present > 0 {
        format!(
            "; {unacked_present} key(s) hold a put the client got no acknowledgement for ({said_unreachable} of them \
             reported by the SDK as `cluster unreachable`, i.e. not applied)"
        )
    } else {
        String::new()
    };
    if problems.is_empty() {
        CheckResult::pass(
            NAME,
            format!(
                "{acked} acknowledged puts on {} VMs: every one of {keys} keys holds its last acknowledged value or a \
                 later one{unknown}",
                finals.len()
            ),
        )
    } else {
        offending.truncate(12);
        CheckResult::fail(NAME, format!("{} problem(s): {}{unknown}", problems.len(), problems.join("; ")), offending)
    }
}

/// A pair or guest seen where the design says it must not be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HaViolation {
    pub vm: u64,
    pub what: String,
}

/// Two hosts that reported role `primary` at the same generation (at any time during the run).
pub fn two_primaries(sightings: &[HaSighting]) -> Vec<HaViolation> {
    let mut seen: BTreeMap<(u64, u64), BTreeMap<u64, (u64, u64)>> = BTreeMap::new();
    for s in sightings {
        if let (Some("primary"), Some(g)) = (s.role.as_deref(), s.generation) {
            let span = seen.entry((s.vm, g)).or_default().entry(s.node).or_insert((s.t_ms, s.t_ms));
            span.0 = span.0.min(s.t_ms);
            span.1 = span.1.max(s.t_ms);
        }
    }
    seen.into_iter()
        .filter(|(_, hosts)| hosts.len() > 1)
        .map(|((vm, g), hosts)| {
            let who: Vec<String> =
                hosts.iter().map(|(n, (a, b))| format!("node-{n} (from {a} ms to {b} ms)")).collect();
            HaViolation { vm, what: format!("vm-{vm}: {} all reported primary at generation {g}", who.join(", ")) }
        })
        .collect()
}

/// Whether a sighting shows the guest running where it counts (not a multi-operation standby's
/// own guest, which runs by design).
fn active(s: &HaSighting) -> bool {
    let standby = s.role.as_deref().is_some_and(|r| r.starts_with("standby"));
    s.state.as_deref() == Some("running") && !(s.multi_operation && standby)
}

/// The guest ran on two hosts at once (as proven by sightings) for longer than `max_overlap_ms`,
/// or kept running on a host that reported itself deposed. Returns the violations and the
/// longest overlap seen (ms), whatever its length.
pub fn double_runs(sightings: &[HaSighting], max_overlap_ms: u64) -> (Vec<HaViolation>, u64) {
    let mut by_host: BTreeMap<(u64, u64), Vec<&HaSighting>> = BTreeMap::new();
    for s in sightings {
        by_host.entry((s.vm, s.node)).or_default().push(s);
    }
    let mut out = Vec::new();
    // Per VM and host: the time spans the guest was proven running there (two consecutive
    // sightings of that host, both running where it counts, writes advancing), merged.
    let mut spans: BTreeMap<u64, BTreeMap<u64, Vec<(u64, u64)>>> = BTreeMap::new();
    for ((vm, node), list) in &mut by_host {
        list.sort_by_key(|s| s.t_ms);
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for w in list.windows(2) {
            let (a, b) = (w[0], w[1]);
            let advanced = matches!((a.writes, b.writes), (Some(x), Some(y)) if y > x);
            if !(active(a) && active(b) && advanced) {
                continue;
            }
            let deposed = |s: &HaSighting| s.role.as_deref() == Some("deposed");
            if deposed(a) && deposed(b) && b.t_ms >= a.t_ms + DEPOSED_GRACE_MS {
                out.push(HaViolation {
                    vm: *vm,
                    what: format!(
                        "vm-{vm}: node-{node} reported itself deposed yet kept its guest running from {} ms to {} ms \
                         (writes {} -> {})",
                        a.t_ms,
                        b.t_ms,
                        a.writes.unwrap_or(0),
                        b.writes.unwrap_or(0)
                    ),
                });
            }
            match merged.last_mut() {
                Some(last) if last.1 >= a.t_ms => last.1 = last.1.max(b.t_ms),
                _ => merged.push((a.t_ms, b.t_ms)),
            }
        }
        spans.entry(*vm).or_default().insert(*node, merged);
    }
    let mut longest = 0;
    for (vm, hosts) in &spans {
        let hosts: Vec<(&u64, &Vec<(u64, u64)>)> = hosts.iter().collect();
        for (i, (a, sa)) in hosts.iter().enumerate() {
            for (b, sb) in &hosts[i + 1..] {
                for &(a0, a1) in sa.iter() {
                    for &(b0, b1) in sb.iter() {
                        let (from, to) = (a0.max(b0), a1.min(b1));
                        if to <= from {
                            continue;
                        }
                        longest = longest.max(to - from);
                        if to - from > max_overlap_ms {
                            out.push(HaViolation {
                                vm: *vm,
                                what: format!(
                                    "vm-{vm} ran on node-{a} and node-{b} at once from {from} ms to {to} ms ({} ms, \
                                     more than the {max_overlap_ms} ms allowed){}",
                                    to - from,
                                    roles_between(sightings, *vm, from, to)
                                ),
                            });
                        }
                    }
                }
            }
        }
    }
    (out, longest)
}

/// The roles hosts reported for `vm` between `from` and `to`, for a violation's text.
fn roles_between(sightings: &[HaSighting], vm: u64, from: u64, to: u64) -> String {
    let roles: BTreeSet<String> = sightings
        .iter()
        .filter(|s| s.vm == vm && s.t_ms >= from && s.t_ms <= to)
        .map(|s| {
            format!(
                "node-{} {}@{}",
                s.node,
                s.role.as_deref().unwrap_or("?"),
                s.generation.map_or("?".to_string(), |g| g.to_string())
            )
        })
        .collect();
    if roles.is_empty() {
        String::new()
    } else {
        format!("; roles seen meanwhile: {}", roles.into_iter().collect::<Vec<_>>().join(", "))
    }
}

/// After healing: each pair has exactly one host reporting `primary`, the catalog's primary,
/// running the guest, and no other host runs it (but a multi-operation standby).
pub fn placed_once_at_end(
    vms: &[crate::ha::HaVm],
    records: &BTreeMap<u64, HaPairRecord>,
    seen: &[HaSighting],
) -> Vec<HaViolation> {
    let mut out = Vec::new();
    for v in vms {
        let vm = v.id.0;
        let Some(r) = records.get(&vm) else {
            out.push(HaViolation { vm, what: format!("vm-{vm}'s pair could not be read") });
            continue;
        };
        let on: Vec<&HaSighting> = seen.iter().filter(|s| s.vm == vm).collect();
        let show = |s: &HaSighting| {
            format!(
                "node-{} {} ({})",
                s.node,
                s.role.as_deref().unwrap_or("?"),
                s.state.as_deref().unwrap_or("no guest")
            )
        };
        let all: Vec<String> = on.iter().map(|s| show(s)).collect();
        let primaries: Vec<u64> = on.iter().filter(|s| s.role.as_deref() == Some("primary")).map(|s| s.node).collect();
        if primaries != [r.primary.0] {
            out.push(HaViolation {
                vm,
                what: format!(
                    "vm-{vm}: hosts reporting primary {primaries:?}, the catalog names node-{} [{}]",
                    r.primary.0,
                    all.join(", ")
                ),
            });
            continue;
        }
        let running_elsewhere: Vec<String> =
            on.iter().filter(|s| s.node != r.primary.0 && active(s)).map(|s| show(s)).collect();
        if !running_elsewhere.is_empty() {
            out.push(HaViolation {
                vm,
                what: format!("vm-{vm} also runs on {} [{}]", running_elsewhere.join(", "), all.join(", ")),
            });
        }
        if !on.iter().any(|s| s.node == r.primary.0 && s.state.as_deref() == Some("running")) {
            out.push(HaViolation {
                vm,
                what: format!("vm-{vm} does not run on its primary node-{} [{}]", r.primary.0, all.join(", ")),
            });
        }
    }
    out
}

/// `ha-single-primary` from its parts.
pub fn single_primary(
    two: Vec<HaViolation>,
    runs: Vec<HaViolation>,
    at_end: Vec<HaViolation>,
    longest_overlap_ms: u64,
    sightings: usize,
    max_overlap_ms: u64,
) -> CheckResult {
    const NAME: &str = "ha-single-primary";
    if sightings == 0 {
        return CheckResult::fail(NAME, "the sampler saw nothing: nothing was tested".into(), Vec::new());
    }
    if two.is_empty() && runs.is_empty() && at_end.is_empty() {
        return CheckResult::pass(
            NAME,
            format!(
                "{sightings} sightings: one primary per generation; longest time a guest ran on two hosts at once \
                 {longest_overlap_ms} ms (allowed {max_overlap_ms} ms); after healing each pair has one primary, the \
                 catalog's, running its guest"
            ),
        );
    }
    let all: Vec<String> = two.iter().chain(runs.iter()).chain(at_end.iter()).map(|v| v.what.clone()).collect();
    CheckResult::fail(NAME, format!("{} problem(s): {}", all.len(), all.join("; ")), Vec::new())
}

/// A kill of VM `vm`'s primary host `node` at `at_ms` (as the catalog named it when it fired).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PrimaryKill {
    pub vm: u64,
    pub node: u64,
    pub at_ms: u64,
}

/// `ha-failovers`: every kill of a primary's host was followed by a failover of that pair (its
/// `failovers` count, as sampled before the kill, grew by the final record), and at least one
/// such kill happened.
pub fn failovers(
    kills: &[PrimaryKill],
    samples: &[PairSample],
    initial: &BTreeMap<u64, HaPairRecord>,
    finals: &BTreeMap<u64, Result<HaPairRecord, String>>,
) -> CheckResult {
    const NAME: &str = "ha-failovers";
    let total: u64 = finals.values().filter_map(|r| r.as_ref().ok()).map(|p| p.failovers).sum();
    let describe = |p: &HaPairRecord| match &p.last_failover {
        Some(f) => format!(
            "vm-{}: {} failover(s), last {} -> {} ({}, took {} ms)",
            p.vm.0, p.failovers, f.from, f.to, f.reason, f.took_ms
        ),
        None => format!("vm-{}: no failover", p.vm.0),
    };
    let pairs: Vec<String> = finals
        .iter()
        .map(|(vm, r)| match r {
            Ok(p) => describe(p),
            Err(e) => format!("vm-{vm}: pair unreadable ({e})"),
        })
        .collect();
    if kills.is_empty() {
        return CheckResult::fail(
            NAME,
            format!("no kill hit an HA primary's host: no failover was tested ({})", pairs.join("; ")),
            Vec::new(),
        );
    }
    let mut missing = Vec::new();
    for k in kills {
        let before = samples
            .iter()
            .filter(|s| s.vm == k.vm && s.t_ms < k.at_ms)
            .map(|s| s.failovers)
            .chain(initial.get(&k.vm).map(|p| p.failovers))
            .max()
            .unwrap_or(0);
        match finals.get(&k.vm) {
            Some(Ok(p)) if p.failovers > before => {}
            Some(Ok(p)) => missing.push(format!(
                "vm-{}'s primary node-{} was killed at {} ms but its pair never failed over after that (failovers {} \
                 before, {} at the end, primary node-{})",
                k.vm, k.node, k.at_ms, before, p.failovers, p.primary.0
            )),
            Some(Err(e)) => missing.push(format!("vm-{}: the pair could not be read after healing: {e}", k.vm)),
            None => missing.push(format!("vm-{}: no pair after healing", k.vm)),
        }
    }
    if missing.is_empty() {
        CheckResult::pass(
            NAME,
            format!(
                "{} kill(s) of a primary's host, each followed by a failover; {total} failover(s) in all ({})",
                kills.len(),
                pairs.join("; ")
            ),
        )
    } else {
        CheckResult::fail(NAME, format!("{}; pairs: {}", missing.join("; "), pairs.join("; ")), Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Outcome;

    fn put(op: usize, slot: u64, n: u64, acked: bool, invoke_us: u64, complete_us: u64) -> PutAttempt {
        PutAttempt { op, key: format!("k{slot}"), n, acked, invoke_us, complete_us }
    }

    #[test]
    fn a_missing_acknowledged_put_fails() {
        let puts = vec![put(0, 0, 1, true, 0, 10), put(1, 1, 2, true, 20, 30), put(2, 0, 3, true, 40, 50)];
        // k0's last acknowledged put (n 3) is gone, the older n 1 is back: lost.
        let state = FinalState::from([("k0".into(), Some(1)), ("k1".into(), Some(2))]);
        let j = judge_final(&puts, &state);
        assert_eq!(j.violations.len(), 1, "{j:?}");
        assert_eq!(j.violations[0].lost_op, Some(2));
        // k1 missing altogether.
        let state = FinalState::from([("k0".into(), Some(3))]);
        let j = judge_final(&puts, &state);
        assert_eq!(j.violations.iter().map(|v| v.lost_op).collect::<Vec<_>>(), vec![Some(1)]);
        // Both present with their last acknowledged values: fine.
        let state = FinalState::from([("k0".into(), Some(3)), ("k1".into(), Some(2))]);
        assert!(judge_final(&puts, &state).violations.is_empty());
        // A value nobody wrote.
        let state = FinalState::from([("k0".into(), None), ("k1".into(), Some(2)), ("k9".into(), Some(9))]);
        assert_eq!(judge_final(&puts, &state).violations.len(), 2);
    }

    #[test]
    fn a_put_of_unknown_outcome_may_land_later_and_concurrent_acks_may_win() {
        // n 2 timed out (unknown) before n 3 was acknowledged: it may still have landed after.
        let puts = vec![put(0, 0, 1, true, 0, 10), put(1, 0, 2, false, 20, 30), put(2, 0, 3, true, 40, 50)];
        let state = FinalState::from([("k0".into(), Some(2))]);
        let j = judge_final(&puts, &state);
        assert!(j.violations.is_empty(), "{j:?}");
        assert_eq!(j.unacked_present, vec![1]);
        // Two acknowledged puts that overlapped in time: either may be last.
        let puts = vec![put(0, 0, 1, true, 0, 50), put(1, 0, 2, true, 40, 60)];
        assert!(judge_final(&puts, &FinalState::from([("k0".into(), Some(1))])).violations.is_empty());
    }

    fn seen(t_ms: u64, node: u64, role: &str, generation: u64, state: &str, writes: u64) -> HaSighting {
        HaSighting {
            t_ms,
            vm: 1,
            node,
            role: Some(role.into()),
            generation: Some(generation),
            state: Some(state.into()),
            writes: Some(writes),
            multi_operation: false,
        }
    }

    #[test]
    fn two_primaries_at_one_generation_fail() {
        let s = vec![seen(0, 1, "primary", 3, "running", 5), seen(0, 2, "primary", 3, "running", 9)];
        assert_eq!(two_primaries(&s).len(), 1);
        let r = single_primary(two_primaries(&s), Vec::new(), Vec::new(), 0, s.len(), 5000);
        assert!(!r.passed, "{}", r.summary);
        // A failover: the old primary at its generation, the new one at the next.
        let s = vec![seen(0, 1, "primary", 3, "running", 5), seen(500, 2, "primary", 4, "running", 9)];
        assert!(two_primaries(&s).is_empty());
    }

    #[test]
    fn running_on_two_hosts_beyond_the_bound_fails() {
        let mut s = Vec::new();
        for i in 0..20u64 {
            let t = i * 500;
            s.push(seen(t, 1, "primary", 3, "running", 10 + i));
            s.push(seen(t, 2, "primary", 4, "running", 100 + i));
        }
        let (v, longest) = double_runs(&s, 5000);
        assert_eq!(longest, 9500);
        assert_eq!(v.len(), 1, "{v:?}");
        // Short overlaps (a switch-over between two sightings) are within the bound.
        let (v, longest) = double_runs(&s[..8], 5000);
        assert!(v.is_empty() && longest == 1500, "{v:?} {longest}");
        // A multi-operation standby's own guest runs by design.
        let mut m: Vec<HaSighting> = s
            .iter()
            .map(|x| {
                let mut x = x.clone();
                x.multi_operation = true;
                if x.node == 2 {
                    x.role = Some("standby-ready".into());
                }
                x
            })
            .collect();
        assert!(double_runs(&m, 5000).0.is_empty());
        // A redundant standby must never run it.
        for x in &mut m {
            x.multi_operation = false;
        }
        assert_eq!(double_runs(&m, 5000).0.len(), 1);
    }

    #[test]
    fn a_deposed_host_that_keeps_running_fails() {
        let s = vec![seen(0, 1, "deposed", 4, "running", 10), seen(500, 1, "deposed", 4, "running", 30)];
        assert_eq!(double_runs(&s, 5000).0.len(), 1);
        let paused = vec![seen(0, 1, "deposed", 4, "paused", 10), seen(500, 1, "deposed", 4, "paused", 10)];
        assert!(double_runs(&paused, 5000).0.is_empty());
    }

    #[test]
    fn acked_updates_reads_the_history() {
        let op = |id, slot, n, outcome| Op {
            id,
            client: 0,
            key: format!("ha/1/k{slot}"),
            kind: OpKind::AppPut { vm: 1, slot, n },
            invoke_us: id as u64 * 100,
            complete_us: id as u64 * 100 + 50,
            outcome,
            error: None,
        };
        let ok = Outcome::Ok { read: None, cas_matched: None };
        let h = vec![op(0, 0, 1, ok), op(1, 1, 2, ok), op(2, 0, 3, ok)];
        let view = |entries: Vec<(String, Vec<u8>)>| AppView { entries, ..Default::default() };
        let lost = view(vec![("k0".into(), crate::ha::app_value(1, 1)), ("k1".into(), crate::ha::app_value(1, 2))]);
        let r = acked_updates(&h, &BTreeMap::from([(1, Ok(lost))]));
        assert!(!r.passed && r.offending.len() == 1 && r.offending[0].id == 2, "{}", r.summary);
        let kept = view(vec![("k0".into(), crate::ha::app_value(1, 3)), ("k1".into(), crate::ha::app_value(1, 2))]);
        assert!(acked_updates(&h, &BTreeMap::from([(1, Ok(kept))])).passed);
        // Another VM's value is foreign here.
        let foreign = view(vec![("k0".into(), crate::ha::app_value(2, 3)), ("k1".into(), crate::ha::app_value(1, 2))]);
        assert!(!acked_updates(&h, &BTreeMap::from([(1, Ok(foreign))])).passed);
    }

    #[test]
    fn a_killed_primary_needs_a_failover_after_the_kill() {
        use haven_client::proto::ha::{HaMode, PairState};
        use haven_client::proto::{NodeId, VmId};
        let pair = |failovers| HaPairRecord {
            vm: VmId(1),
            primary: NodeId(2),
            standby: Some(NodeId(3)),
            mode: HaMode::MultiOperation,
            state: PairState::Protecting,
            generation: 4,
            failovers,
            last_failover: None,
        };
        let kills = [PrimaryKill { vm: 1, node: 1, at_ms: 8000 }];
        let before =
            |failovers| PairSample { t_ms: 7000, vm: 1, primary: 1, standby: Some(2), generation: 3, failovers };
        let initial = BTreeMap::from([(1, pair(0))]);
        let ok = failovers(&kills, &[before(0)], &initial, &BTreeMap::from([(1, Ok(pair(1)))]));
        assert!(ok.passed, "{}", ok.summary);
        let none = failovers(&kills, &[before(1)], &initial, &BTreeMap::from([(1, Ok(pair(1)))]));
        assert!(!none.passed, "{}", none.summary);
        assert!(!failovers(&[], &[], &initial, &BTreeMap::from([(1, Ok(pair(1)))])).passed);
    }
}
