//! The plan controller's decisions as pure functions: given a plan as the catalog records it,
//! the group's VM records and what the controller observed (a host answering or not, its process
//! incarnation, a guest's status, how long something has been under way), decide what happens
//! next — which VM phases to record, which migrations to start, whether the plan fails back, how
//! a failing-back group comes home.
//!
//! `controllers::plans` (the async driver) gathers the observations and carries the decisions
//! out; the model test (`plan_model`) drives the same functions against a simulated cluster.
//! Times are passed in as milliseconds: `now_ms` on the wall clock (plan deadlines are recorded
//! in wall-clock ms by the proposer) and `mono_ms` on a monotonic clock the caller chooses (how
//! long a migration or a silence has lasted).
//!
//! This module must not do I/O, read a clock, propose commands or spawn tasks.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use haven_proto::plan::{MigrationPlan, PlanVmPhase};
use haven_proto::vm::VmRecord;
use haven_proto::{NodeId, VmId};

use crate::config::FenceTunables;
use crate::vm::fence::remaining_wait;

/// `ms` as a duration for humans.
pub fn ms_text(ms: u64) -> String {
    if ms >= 10_000 {
        format!("{} s", ms / 1000)
    } else {
        format!("{ms} ms")
    }
}

/// Why a plan still moving forward must fail back because its deadline passed, if it did.
pub fn deadline_failure(plan: &MigrationPlan, now_ms: u64) -> Option<String> {
    (plan.state.is_forward() && now_ms > plan.created_at_ms.saturating_add(plan.timeout_ms))
        .then(|| format!("the plan did not move its VMs within its timeout of {}", ms_text(plan.timeout_ms)))
}

/// What one migrate (or migrate-back) call of the driver remembers between its rounds.
#[derive(Debug, Clone, Default)]
pub struct MigrateMemory {
    /// When each migration was first seen under way (`mono_ms`).
    pub started_ms: BTreeMap<VmId, u64>,
    /// Since when the destination has not answered (`mono_ms`).
    pub silent_since_ms: Option<u64>,
    /// The destination's process incarnation when it first answered.
    pub dest_incarnation: Option<u64>,
}

/// Whether the plan can keep migrating given what the destination answered this round (`dest`:
/// its process incarnation, `None` if it did not answer). The reason to fail back, if any.
pub fn migrate_health(
    plan: &MigrationPlan,
    mem: &mut MigrateMemory,
    dest: Option<u64>,
    mono_ms: u64,
    host_down_ms: u64,
) -> Option<String> {
    match dest {
        Some(now) => {
            mem.silent_since_ms = None;
            let first = *mem.dest_incarnation.get_or_insert(now);
            let received = plan.progress.iter().any(|v| v.phase == PlanVmPhase::Arrived);
            if now != first && received {
                return Some(format!("destination {} restarted: the VMs it had received are lost", plan.to));
            }
            mem.dest_incarnation = Some(now);
            None
        }
        None => {
            let since = *mem.silent_since_ms.get_or_insert(mono_ms);
            (mono_ms.saturating_sub(since) >= host_down_ms)
                .then(|| format!("destination {} stopped answering", plan.to))
        }
    }
}

/// Whether migrating back can go on given whether the destination answered this round
/// (`answered`), the reason to stop if not: it has been silent for `host_down_ms`.
pub fn back_health(
    plan: &MigrationPlan,
    mem: &mut MigrateMemory,
    answered: Option<u64>,
    mono_ms: u64,
    host_down_ms: u64,
) -> Option<String> {
    if answered.is_some() {
        mem.silent_since_ms = None;
        return None;
    }
    let since = *mem.silent_since_ms.get_or_insert(mono_ms);
    (mono_ms.saturating_sub(since) >= host_down_ms).then(|| format!("{} stopped answering", plan.to))
}

/// Whether the source answered with another process incarnation than the one that took the
/// recovery snapshot (`now`: what it answered, `None` if it did not): its guests lost their memory.
pub fn source_restarted(plan: &MigrationPlan, now: Option<u64>) -> bool {
    plan.recovery.as_ref().is_some_and(|r| now.is_some_and(|n| n != r.host_incarnation))
}

/// The failure reason when the source restarted since the recovery snapshot.
pub fn source_restart_reason(plan: &MigrationPlan) -> String {
    format!("source {} restarted since the recovery snapshot", plan.from)
}

/// How a round of migrating ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrateEnd {
    /// The plan fails back for this reason.
    Fail(String),
    /// `vm`'s migration took too long: cancel it, record it `Failed` with `why`, fail back.
    TimedOut { vm: VmId, why: String },
    /// `vm`'s migration was recorded as started and the VM rests at the source again: ask its
    /// host why, record it `Failed`, fail back.
    Bounced { vm: VmId },
    /// Every VM arrived: advance to `Consolidating` with this note.
    AllArrived { note: String },
    /// Start these migrations (possibly none), then wait for the next round.
    Start(Vec<VmId>),
}

/// One round of `Migrating`: the phases to record (in order; unchanged ones are skipped by the
/// caller), then how the round ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateRound {
    pub phases: Vec<(VmId, PlanVmPhase)>,
    pub end: MigrateEnd,
}

/// Decide a round of `Migrating` from the group's records (`records[i]` is `plan.vms[i]`'s,
/// `None` if the VM is gone).
pub fn migrate_round(
    plan: &MigrationPlan,
    records: &[Option<VmRecord>],
    mem: &mut MigrateMemory,
    mono_ms: u64,
    vm_timeout_ms: u64,
) -> MigrateRound {
    let mut phases = Vec::new();
    let mut arrived = 0;
    let mut in_flight = 0;
    let mut waiting = Vec::new();
    for (vm, r) in plan.vms.iter().zip(records) {
        let Some(r) = r else {
            return MigrateRound { phases, end: MigrateEnd::Fail(format!("{vm} no longer exists")) };
        };
        if r.host == plan.to && r.migrating_to.is_none() {
            arrived += 1;
            phases.push((*vm, PlanVmPhase::Arrived));
        } else if r.host == plan.from && r.migrating_to == Some(plan.to) {
            in_flight += 1;
            let since = *mem.started_ms.entry(*vm).or_insert(mono_ms);
            phases.push((*vm, PlanVmPhase::Migrating));
            if mono_ms.saturating_sub(since) > vm_timeout_ms {
                let why = format!("did not finish within {}", ms_text(vm_timeout_ms));
                return MigrateRound { phases, end: MigrateEnd::TimedOut { vm: *vm, why } };
            }
        } else if r.host == plan.from && r.migrating_to.is_none() {
            if plan.vm_phase(*vm) == Some(PlanVmPhase::Migrating) {
                return MigrateRound { phases, end: MigrateEnd::Bounced { vm: *vm } };
            }
            waiting.push(*vm);
        } else {
            let why = format!(
                "{vm} is on {} (migrating to {:?}); the plan moves it from {} to {}",
                r.host, r.migrating_to, plan.from, plan.to
            );
            return MigrateRound { phases, end: MigrateEnd::Fail(why) };
        }
    }
    if arrived == plan.vms.len() {
        let note = format!("all {} VMs arrived at {}; restoring group consistency there", arrived, plan.to);
        return MigrateRound { phases, end: MigrateEnd::AllArrived { note } };
    }
    let room = (plan.max_parallel as usize).saturating_sub(in_flight);
    MigrateRound { phases, end: MigrateEnd::Start(waiting.into_iter().take(room).collect()) }
}

/// Why the group cannot be snapshotted (a VM gone or not resting at the source), if so.
pub fn snapshot_blocker(plan: &MigrationPlan, records: &[Option<VmRecord>]) -> Option<String> {
    plan.vms.iter().zip(records).find_map(|(vm, r)| match r {
        None => Some(format!("{vm} no longer exists")),
        Some(r) if r.host != plan.from || r.migrating_to.is_some() => {
            Some(format!("{vm} is on {} (migrating to {:?}), not resting on {}", r.host, r.migrating_to, plan.from))
        }
        Some(_) => None,
    })
}

/// Why the group cannot be consolidated (a VM gone or not resting at the destination), if so.
pub fn consolidate_blocker(plan: &MigrationPlan, records: &[Option<VmRecord>]) -> Option<String> {
    plan.vms.iter().zip(records).find_map(|(vm, r)| match r {
        None => Some(format!("{vm} no longer exists")),
        Some(r) if r.host != plan.to || r.migrating_to.is_some() => {
            Some(format!("{vm} is on {}, not {}", r.host, plan.to))
        }
        Some(_) => None,
    })
}

/// A guest at the destination that booted there (`origin` "booted") lost the memory its
/// migration brought: the destination restarted after it arrived. The group must not be
/// consolidated (the plan fails back and restores it from the recovery snapshot). `origins`: what
/// each VM's guest at the destination reported.
pub fn booted_at_destination(plan: &MigrationPlan, origins: &[(VmId, String)]) -> Option<String> {
    origins
        .iter()
        .find(|(_, origin)| origin == "booted")
        .map(|(vm, _)| format!("destination {} restarted: {vm} lost the memory it had received", plan.to))
}

/// A VM of the group found on neither the source nor the destination: only the recovery
/// snapshot can bring the group back together.
pub fn stray(plan: &MigrationPlan, records: &[VmRecord]) -> Option<String> {
    records
        .iter()
        .find(|r| r.host != plan.from && r.host != plan.to)
        .map(|r| format!("{} turned up on {}", r.id, r.host))
}

/// A guest at the source whose last write is behind its recovery image lost its memory.
pub fn behind_recovery_point(plan: &MigrationPlan, vm: VmId, last_seq: u64) -> Option<String> {
    plan.image(vm).filter(|i| last_seq < i.last_seq).map(|i| {
        format!(
            "{vm} on {} is at write {last_seq}, behind its recovery point ({}): it lost its memory",
            plan.from, i.last_seq
        )
    })
}

/// How a failing-back group comes home, once in-flight migrations stopped and the checks that
/// need the recovery snapshot (`need_image`) were made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailBackRoute {
    /// Force the group back to the source and restore it from the recovery snapshot.
    Restore(String),
    /// The snapshot is needed but the plan has none: wait (retry) with this reason.
    NoSnapshot(String),
    /// Live-migrate these VMs back from the answering destination.
    MigrateBack(Vec<VmId>),
    /// The destination holds VMs and does not answer: wait until it is fenced, then restore.
    AwaitFence(Vec<VmId>),
    /// Every VM rests at the source: verify the group there.
    Verify,
}

/// Choose the fail-back route. `dest_alive`: the destination's agent answered this round.
pub fn fail_back_route(
    plan: &MigrationPlan,
    records: &[VmRecord],
    need_image: Option<String>,
    dest_alive: bool,
) -> FailBackRoute {
    if let Some(reason) = need_image {
        return restore_or_wait(plan, reason);
    }
    let at_dest: Vec<VmId> = records.iter().filter(|r| r.host == plan.to).map(|r| r.id).collect();
    match (at_dest.is_empty(), dest_alive) {
        (true, _) => FailBackRoute::Verify,
        (false, true) => FailBackRoute::MigrateBack(at_dest),
        (false, false) => FailBackRoute::AwaitFence(at_dest),
    }
}

/// Restore the group for `reason`, or wait if there is no recovery snapshot to restore from.
pub fn restore_or_wait(plan: &MigrationPlan, reason: String) -> FailBackRoute {
    if plan.recovery.is_none() {
        return FailBackRoute::NoSnapshot(format!("{reason}, and the plan has no recovery snapshot; waiting"));
    }
    FailBackRoute::Restore(reason)
}

/// How a round of migrating back ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackEnd {
    /// Every VM rests at the source.
    Home,
    Fail(String),
    /// `vm` did not come back in time: cancel its migration and fail.
    TimedOut {
        vm: VmId,
        why: String,
    },
    /// `vm`'s migration back was started and it rests at the destination again.
    Bounced {
        vm: VmId,
    },
    /// Record these `Returning` and start migrating them back (possibly none), then wait.
    Start(Vec<VmId>),
}

/// Decide a round of migrating `vms` back (`records[i]` is `vms[i]`'s, `None` if gone).
pub fn migrate_back_round(
    plan: &MigrationPlan,
    vms: &[VmId],
    records: &[Option<VmRecord>],
    mem: &mut MigrateMemory,
    mono_ms: u64,
    vm_timeout_ms: u64,
) -> BackEnd {
    let mut home = 0;
    let mut in_flight = 0;
    let mut waiting = Vec::new();
    for (vm, r) in vms.iter().zip(records) {
        let Some(r) = r else {
            home += 1;
            continue;
        };
        if r.host == plan.from && r.migrating_to.is_none() {
            home += 1;
        } else if r.host == plan.to && r.migrating_to == Some(plan.from) {
            in_flight += 1;
            let since = *mem.started_ms.entry(*vm).or_insert(mono_ms);
            if mono_ms.saturating_sub(since) > vm_timeout_ms {
                return BackEnd::TimedOut {
                    vm: *vm,
                    why: format!("{vm} did not come back within {}", ms_text(vm_timeout_ms)),
                };
            }
        } else if r.host == plan.to {
            if mem.started_ms.contains_key(vm) {
                return BackEnd::Bounced { vm: *vm };
            }
            waiting.push(*vm);
        } else {
            return BackEnd::Fail(format!("{vm} is on {}", r.host));
        }
    }
    if home == vms.len() {
        return BackEnd::Home;
    }
    let room = (plan.max_parallel as usize).saturating_sub(in_flight);
    BackEnd::Start(waiting.into_iter().take(room).collect())
}

/// Whether a VM of the group may have left the source (the plan recorded it migrating, arrived,
/// failed mid-migration or returning), so a copy may run on the destination.
pub fn may_have_left(plan: &MigrationPlan) -> bool {
    plan.progress.iter().any(|v| !matches!(v.phase, PlanVmPhase::Waiting | PlanVmPhase::AtSource))
}

/// How much longer the leader `me` must wait before `host` can no longer hold a host lease:
/// `last_ack` is `host`'s last acknowledged AppendEntries, `leading_since` when `me` became leader
/// (see [`remaining_wait`]). The leader never acknowledges its own AppendEntries, yet holds its
/// lease while it leads: it is never fenced in its own eyes (only its holding none of the group
/// ends a wait for it).
pub fn fence_wait(
    host: NodeId,
    me: NodeId,
    last_ack: Option<Instant>,
    leading_since: Instant,
    now: Instant,
    t: &FenceTunables,
) -> Duration {
    if host == me {
        return t.fenced_after_silence();
    }
    remaining_wait(last_ack, leading_since, now, t)
}

/// What a guest answered about itself, as far as verifying a failed-back group needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSeen {
    pub host: NodeId,
    /// `created`, `running`, `paused`, `stopped`.
    pub state: String,
    pub last_seq: u64,
    /// `booted`, `migrated`, `restored`.
    pub origin: String,
}

/// Why verifying a failed-back group did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unverified {
    /// A VM lost or damaged its memory: only the recovery snapshot can bring the group back.
    Lost(String),
    /// Not yet (a VM still starting, a host not answering): check again later.
    NotYet(String),
}

/// Whether `r` rests where a failed-back group must be.
pub fn verify_placement(plan: &MigrationPlan, r: &VmRecord) -> Result<(), Unverified> {
    if r.host != plan.from || r.migrating_to.is_some() {
        return Err(Unverified::NotYet(format!(
            "{} is on {} (migrating to {:?}), not {}",
            r.id, r.host, r.migrating_to, plan.from
        )));
    }
    Ok(())
}

/// Whether the guest `r` answered with (`s`, already running as `r.desired` asks) is the
/// failed-back one: at the source, restored from its image after a restore (`restored`), and not
/// behind its recovery point.
pub fn verify_guest(plan: &MigrationPlan, r: &VmRecord, s: &GuestSeen, restored: bool) -> Result<(), Unverified> {
    if restored && s.origin != "restored" {
        return Err(Unverified::NotYet(format!("{} on {} is {}, not restored yet", r.id, plan.from, s.origin)));
    }
    if s.host != plan.from {
        return Err(Unverified::NotYet(format!("{} answers from {}, not {}", r.id, s.host, plan.from)));
    }
    if let Some(image) = plan.image(r.id) {
        if s.last_seq < image.last_seq {
            return Err(Unverified::Lost(format!(
                "{} is behind its recovery point ({} < {}): it lost its memory",
                r.id, s.last_seq, image.last_seq
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use haven_proto::plan::{PlanState, PlanVm};
    use haven_proto::vm::{MigrationOptions, VmRunState, WorkloadKind};

    use super::*;

    fn plan(phases: &[PlanVmPhase]) -> MigrationPlan {
        let vms: Vec<VmId> = (1..=phases.len() as u64).map(VmId).collect();
        MigrationPlan {
            id: 1,
            name: "p".into(),
            progress: vms.iter().zip(phases).map(|(vm, phase)| PlanVm { vm: *vm, phase: *phase, note: None }).collect(),
            vms,
            from: NodeId(1),
            to: NodeId(2),
            max_parallel: 1,
            options: MigrationOptions::default(),
            timeout_ms: 10_000,
            drain: false,
            state: PlanState::Migrating,
            created_at_ms: 1_000,
            updated_at_ms: 1_000,
            recovery: None,
            steps: Vec::new(),
            steps_dropped: 0,
            failure: None,
            fail_back: None,
            resume_spread_ms: None,
            consolidation_pause_ms: None,
            restore: None,
            recovery_released: false,
            driver: None,
            driver_term: 0,
        }
    }

    fn record(id: u64, host: u64, migrating_to: Option<u64>) -> Option<VmRecord> {
        Some(VmRecord {
            id: VmId(id),
            name: format!("v{id}"),
            memory_mib: 64,
            vcpus: 1,
            workload: WorkloadKind::Uniform,
            dirty_pages_per_sec: 0,
            disk_writes_per_sec: 0,
            host: NodeId(host),
            desired: VmRunState::Running,
            generation: 1,
            migrating_to: migrating_to.map(NodeId),
            volumes: Vec::new(),
        })
    }

    #[test]
    fn plan_step_migrate_round_starts_within_max_parallel_and_sees_arrivals() {
        use PlanVmPhase::*;
        let p = plan(&[Waiting, Waiting, Waiting]);
        let mut mem = MigrateMemory::default();
        let records = [record(1, 2, None), record(2, 1, Some(2)), record(3, 1, None)];
        let round = migrate_round(&p, &records, &mut mem, 0, 100);
        assert_eq!(round.phases, vec![(VmId(1), Arrived), (VmId(2), Migrating)]);
        assert_eq!(round.end, MigrateEnd::Start(vec![]), "one in flight fills max_parallel 1");
        let late = migrate_round(&p, &records, &mut mem, 101, 100);
        assert!(matches!(late.end, MigrateEnd::TimedOut { vm: VmId(2), .. }), "{late:?}");
        let bounced = plan(&[Migrating]);
        let end = migrate_round(&bounced, &[record(1, 1, None)], &mut MigrateMemory::default(), 0, 100).end;
        assert_eq!(end, MigrateEnd::Bounced { vm: VmId(1) });
        let all = migrate_round(&plan(&[Migrating]), &[record(1, 2, None)], &mut mem, 0, 100).end;
        assert!(matches!(all, MigrateEnd::AllArrived { .. }));
    }

    #[test]
    fn plan_step_fail_back_route_prefers_the_live_path_and_waits_for_the_fence() {
        let p = plan(&[PlanVmPhase::Arrived, PlanVmPhase::Waiting]);
        let records: Vec<VmRecord> = [record(1, 2, None), record(2, 1, None)].into_iter().flatten().collect();
        assert_eq!(fail_back_route(&p, &records, None, true), FailBackRoute::MigrateBack(vec![VmId(1)]));
        assert_eq!(fail_back_route(&p, &records, None, false), FailBackRoute::AwaitFence(vec![VmId(1)]));
        assert!(matches!(fail_back_route(&p, &records, Some("x".into()), true), FailBackRoute::NoSnapshot(_)));
        assert_eq!(fail_back_route(&p, &records[1..], None, false), FailBackRoute::Verify);
        assert!(may_have_left(&p));
    }

    #[test]
    fn plan_step_destination_restart_after_an_arrival_fails_the_plan() {
        let p = plan(&[PlanVmPhase::Arrived]);
        let mut mem = MigrateMemory::default();
        assert_eq!(migrate_health(&p, &mut mem, Some(7), 0, 100), None);
        assert!(migrate_health(&p, &mut mem, Some(8), 10, 100).is_some_and(|r| r.contains("restarted")));
        let mut mem = MigrateMemory::default();
        assert_eq!(migrate_health(&p, &mut mem, None, 0, 100), None);
        assert!(migrate_health(&p, &mut mem, None, 100, 100).is_some_and(|r| r.contains("stopped answering")));
        assert!(deadline_failure(&p, 11_001).is_some() && deadline_failure(&p, 11_000).is_none());
    }

    #[test]
    fn plan_step_the_leader_is_never_fenced_in_its_own_eyes() {
        let t = FenceTunables::default();
        let elected = Instant::now();
        let later = elected + Duration::from_secs(60);
        assert_eq!(fence_wait(NodeId(2), NodeId(1), None, elected, later, &t), Duration::ZERO);
        assert_eq!(fence_wait(NodeId(1), NodeId(1), None, elected, later, &t), t.fenced_after_silence());
    }
}
