//! The VM checkers: judge what the VM workload observed (no I/O here).
//!
//! - `vm-runs-once` — no VM lost, none running twice. During the run: a host the catalog does not
//!   place a VM on must not keep running it. A sighting pair proves it when the same host shows
//!   the guest `running` with its write counter advanced between two surveys at least
//!   [`MIN_GAP_MS`] apart, while the catalog placed the VM elsewhere at one unchanged generation
//!   (so no migration committed in between: a source stops its copy as soon as the commit lands,
//!   and one that cannot tell keeps it paused). After healing: every VM is installed on exactly
//!   one host, its catalog host, and runs there, with no migration left announced.
//! - `vm-data` — every VM's memory checks out (each written page intact, none newer than the
//!   guest's last write) and so does every disk it writes (each acknowledged disk write present or
//!   superseded, nothing the guest did not write, no torn or misplaced block).
//! - `migrations` — at least one migration finished: a run that moved nothing tested nothing.

use std::collections::BTreeMap;

use haven_client::proto::vm::VmRecord;
use haven_client::vms::VmCheck;
use serde::Serialize;

use super::CheckResult;
use crate::history::{Op, Outcome};
use crate::vms::GuestSighting;

/// Two sightings must be at least this far apart to prove a guest kept running.
pub const MIN_GAP_MS: u64 = 400;

/// A VM seen running where it should not be (or not running where it should).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmViolation {
    pub vm: u64,
    pub what: String,
}

/// Guests that kept running on a host the catalog did not place them on, during the run.
pub fn runs_twice_during(sightings: &[GuestSighting]) -> Vec<VmViolation> {
    let mut last: BTreeMap<(u64, u64), &GuestSighting> = BTreeMap::new();
    let mut out = Vec::new();
    for s in sightings {
        if let Some(prev) = last.get(&(s.vm, s.node)) {
            let misplaced = s.node != s.placed_on && prev.node != prev.placed_on;
            let same_placement = prev.generation == s.generation && prev.placed_on == s.placed_on;
            if misplaced
                && same_placement
                && prev.state == "running"
                && s.state == "running"
                && s.writes > prev.writes
                && s.t_ms >= prev.t_ms + MIN_GAP_MS
            {
                out.push(VmViolation {
                    vm: s.vm,
                    what: format!(
                        "vm-{} kept running on node-{} from {} ms to {} ms (writes {} -> {}) while the catalog \
                         placed it on node-{} (generation {})",
                        s.vm, s.node, prev.t_ms, s.t_ms, prev.writes, s.writes, s.placed_on, s.generation
                    ),
                });
            }
        }
        last.insert((s.vm, s.node), s);
    }
    out
}

/// After healing: each VM installed exactly once, on its catalog host, running, not migrating.
pub fn placed_once_at_end(vms: &[u64], records: &[VmRecord], seen: &[GuestSighting]) -> Vec<VmViolation> {
    let mut out = Vec::new();
    for &vm in vms {
        let Some(r) = records.iter().find(|r| r.id.0 == vm) else {
            out.push(VmViolation { vm, what: format!("vm-{vm} is missing from the catalog") });
            continue;
        };
        let on: Vec<&GuestSighting> = seen.iter().filter(|s| s.vm == vm).collect();
        let hosts: Vec<String> = on.iter().map(|s| format!("node-{} ({})", s.node, s.state)).collect();
        if let Some(to) = r.migrating_to {
            out.push(VmViolation { vm, what: format!("vm-{vm} still announces a migration to {to}") });
        }
        match on.as_slice() {
            [] => out
                .push(VmViolation { vm, what: format!("vm-{vm} runs nowhere (the catalog places it on {})", r.host) }),
            [one] if one.node == r.host.0 && one.state == "running" => {}
            [one] if one.node == r.host.0 => out.push(VmViolation {
                vm,
                what: format!("vm-{vm} is {} on its host {}, not running", one.state, r.host),
            }),
            _ => out.push(VmViolation {
                vm,
                what: format!("vm-{vm} is installed on {} but the catalog places it on {}", hosts.join(", "), r.host),
            }),
        }
    }
    out
}

/// `vm-runs-once` from both parts.
pub fn runs_once(during: Vec<VmViolation>, at_end: Vec<VmViolation>, vms: usize, sightings: usize) -> CheckResult {
    const NAME: &str = "vm-runs-once";
    if during.is_empty() && at_end.is_empty() {
        return CheckResult::pass(
            NAME,
            format!(
                "{vms} VMs each ran on one host only ({sightings} sightings during the run); after healing each runs \
                 exactly where the catalog places it"
            ),
        );
    }
    let all: Vec<String> = during.iter().chain(at_end.iter()).map(|v| v.what.clone()).collect();
    CheckResult::fail(
        NAME,
        format!("{} problem(s); first: {}", all.len(), all.first().cloned().unwrap_or_default()),
        Vec::new(),
    )
}

/// `vm-data`: every check passed.
pub fn data(checks: &BTreeMap<u64, Result<VmCheck, String>>) -> CheckResult {
    data_named("vm-data", checks)
}

/// The `vm-data` judgement under another checker's name (`ha-data`).
pub fn data_named(name: &str, checks: &BTreeMap<u64, Result<VmCheck, String>>) -> CheckResult {
    let bad: Vec<String> = checks
        .iter()
        .filter_map(|(vm, r)| match r {
            Err(e) => Some(format!("vm-{vm}: {e}")),
            Ok(c) if c.max_seq > c.last_seq => Some(format!(
                "vm-{vm}: a page carries write {} but the guest's last write is {}",
                c.max_seq, c.last_seq
            )),
            Ok(_) => None,
        })
        .collect();
    if bad.is_empty() {
        let ok: Vec<&VmCheck> = checks.values().filter_map(|r| r.as_ref().ok()).collect();
        let pages: u64 = ok.iter().map(|c| c.pages_written).sum();
        let disks: usize = ok.iter().map(|c| c.disks.len()).sum();
        let acked: u64 = ok.iter().flat_map(|c| &c.disks).map(|d| d.acked).sum();
        CheckResult::pass(
            name,
            format!(
                "{} VMs' memory and {disks} disks check out ({pages} written pages, {acked} acknowledged disk \
                 writes verified)",
                checks.len()
            ),
        )
    } else {
        CheckResult::fail(name, format!("{} VM(s) failed: {}", bad.len(), bad.join("; ")), Vec::new())
    }
}

/// `migrations`: at least one finished.
pub fn migrations(history: &[Op]) -> CheckResult {
    const NAME: &str = "migrations";
    let ops: Vec<&Op> = history.iter().filter(|o| o.kind.is_migration()).collect();
    let done = ops.iter().filter(|o| o.is_ok()).count();
    let failed = ops.iter().filter(|o| o.outcome == Outcome::Fail).count();
    let unknown = ops.len() - done - failed;
    let summary =
        format!("{} migrations: {done} done, {failed} ended without moving the VM, {unknown} unknown", ops.len());
    if done > 0 {
        CheckResult::pass(NAME, summary)
    } else {
        CheckResult::fail(
            NAME,
            format!("no migration finished: {summary}"),
            ops.into_iter().take(12).cloned().collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(t_ms: u64, node: u64, state: &str, writes: u64, placed_on: u64, generation: u64) -> GuestSighting {
        GuestSighting { t_ms, vm: 1, node, state: state.into(), writes, placed_on, generation }
    }

    #[test]
    fn a_misplaced_guest_that_keeps_writing_is_caught() {
        let s = vec![seen(0, 2, "running", 10, 1, 4), seen(500, 2, "running", 50, 1, 4)];
        assert_eq!(runs_twice_during(&s).len(), 1);
    }

    #[test]
    fn a_switch_over_between_surveys_is_not_a_double_run() {
        // Generation changed between the sightings: a migration committed in between.
        let s = vec![seen(0, 2, "running", 10, 2, 4), seen(500, 2, "running", 50, 1, 5)];
        assert!(runs_twice_during(&s).is_empty());
        // Paused (a source waiting to learn its commit's fate) or not advancing: not running.
        let s = vec![seen(0, 2, "paused", 10, 1, 4), seen(500, 2, "paused", 10, 1, 4)];
        assert!(runs_twice_during(&s).is_empty());
        // Too close together to prove anything.
        let s = vec![seen(0, 2, "running", 10, 1, 4), seen(100, 2, "running", 12, 1, 4)];
        assert!(runs_twice_during(&s).is_empty());
    }

    #[test]
    fn end_state_needs_exactly_one_running_copy_on_the_catalog_host() {
        use haven_client::proto::vm::{VmRunState, WorkloadKind};
        use haven_client::proto::{NodeId, VmId};
        let rec = VmRecord {
            id: VmId(1),
            name: "a".into(),
            memory_mib: 8,
            vcpus: 1,
            workload: WorkloadKind::Uniform,
            dirty_pages_per_sec: 0,
            disk_writes_per_sec: 0,
            host: NodeId(1),
            desired: VmRunState::Running,
            generation: 3,
            migrating_to: None,
            volumes: Vec::new(),
        };
        let ok = vec![seen(0, 1, "running", 5, 1, 3)];
        assert!(placed_once_at_end(&[1], std::slice::from_ref(&rec), &ok).is_empty());
        let twice = vec![seen(0, 1, "running", 5, 1, 3), seen(0, 2, "paused", 5, 1, 3)];
        assert_eq!(placed_once_at_end(&[1], std::slice::from_ref(&rec), &twice).len(), 1);
        assert_eq!(placed_once_at_end(&[1], std::slice::from_ref(&rec), &[]).len(), 1);
        let elsewhere = vec![seen(0, 2, "running", 5, 1, 3)];
        assert_eq!(placed_once_at_end(&[1], std::slice::from_ref(&rec), &elsewhere).len(), 1);
        assert_eq!(placed_once_at_end(&[1], &[], &ok).len(), 1);
    }
}
