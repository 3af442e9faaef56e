//! The catalog's plan table: group live-migration plans (C1) and host drain, and the meaning of
//! every [`PlanCommand`].
//!
//! Deterministic like the rest of the catalog: every time comes from the command (`at_ms`), every
//! choice (drain placement) from catalog state in key order. Invariants kept here: a VM is in at
//! most one non-final plan (the `planvm/` index holds exactly the VMs of non-final plans); a
//! plan's state only moves along [`PlanState::may_advance_to`], as a compare-and-set that also
//! refuses a controller of an older Raft term than the plan's last driver; `Migrating` is entered
//! only with a recovery point covering every VM of the group; `RestoreGroup` moves the whole
//! group at once. This module must not decide *when* a plan advances — that is the leader's
//! controller (`controllers::plans`).
//!
//! Key layout: `plan/<id BE>` → bincode [`MigrationPlan`]; `planvm/<vm BE>` → plan id (BE) while
//! the plan is not final.

use std::collections::BTreeMap;

use haven_proto::plan::{
    bounded_note, DrainSkip, FailBackMode, MigrationPlan, PlanCommand, PlanOutcome, PlanPatch, PlanQuery,
    PlanQueryResult, PlanSettings, PlanState, PlanStep, PlanVm, PlanVmPhase, MAX_PLAN_STEPS,
};
use haven_proto::vm::{HostCapacity, VmRecord, VmRunState};
use haven_proto::{NodeId, VmId};

use super::vms::{used_on, CAP, VM};
use super::{corrupt, get_store, scan_store, CatalogTxn};
use crate::storage::{Store, StoreError, CF_CATALOG};

pub(super) const PLAN: &[u8] = b"plan/";
pub(super) const PLANVM: &[u8] = b"planvm/";

fn id_key(prefix: &[u8], id: u64) -> Vec<u8> {
    [prefix, &id.to_be_bytes()[..]].concat()
}

fn refused(reason: impl Into<String>) -> PlanOutcome {
    PlanOutcome::Refused { reason: reason.into(), not_found: false }
}

fn not_found(reason: impl Into<String>) -> PlanOutcome {
    PlanOutcome::Refused { reason: reason.into(), not_found: true }
}

fn push_step(plan: &mut MigrationPlan, at_ms: u64, note: &str) {
    if plan.steps.len() >= MAX_PLAN_STEPS {
        // Keep the first step (what was planned) and the newest ones.
        plan.steps.remove(1);
        plan.steps_dropped += 1;
    }
    plan.steps.push(PlanStep { at_ms, state: plan.state, note: bounded_note(note) });
    plan.updated_at_ms = plan.updated_at_ms.max(at_ms);
}

fn list(vms: &[VmId]) -> String {
    vms.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")
}

fn plan_id_of(bytes: &[u8]) -> Result<u64, StoreError> {
    Ok(u64::from_be_bytes(bytes.try_into().map_err(|_| corrupt("plan index entry".into()))?))
}

/// VMs that non-final plans still move forward, with their destination: the destination keeps
/// room for them (see [`used_on`]).
fn reservations_from(plans: &[MigrationPlan]) -> Vec<(VmId, NodeId)> {
    plans.iter().filter(|p| p.state.is_forward()).flat_map(|p| p.vms.iter().map(move |v| (*v, p.to))).collect()
}

impl CatalogTxn<'_> {
    fn plan(&self, id: u64) -> Result<Option<MigrationPlan>, StoreError> {
        self.get_as(&id_key(PLAN, id))
    }

    fn put_plan(&mut self, p: &MigrationPlan) -> Result<(), StoreError> {
        self.put_as(id_key(PLAN, p.id), p)
    }

    /// The non-final plan `vm` belongs to, if any.
    pub(super) fn active_plan_of(&self, vm: VmId) -> Result<Option<MigrationPlan>, StoreError> {
        match self.get(&id_key(PLANVM, vm.0))? {
            Some(v) => self.plan(plan_id_of(&v)?),
            None => Ok(None),
        }
    }

    fn active_plans(&self) -> Result<Vec<MigrationPlan>, StoreError> {
        let mut ids: Vec<u64> =
            self.scan(PLANVM)?.into_iter().map(|(_, v)| plan_id_of(&v)).collect::<Result<_, _>>()?;
        ids.sort_unstable();
        ids.dedup();
        let mut out = Vec::new();
        for id in ids {
            if let Some(p) = self.plan(id)? {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// See [`reservations_from`].
    pub(super) fn reservations(&self) -> Result<Vec<(VmId, NodeId)>, StoreError> {
        Ok(reservations_from(&self.active_plans()?))
    }

    /// Free VM memory on each host with a recorded capacity, counting reservations.
    fn free_by_host(&self) -> Result<BTreeMap<NodeId, u64>, StoreError> {
        let caps: Vec<HostCapacity> = self.scan_as(CAP)?;
        let vms: Vec<VmRecord> = self.scan_as(VM)?;
        let res = self.reservations()?;
        Ok(caps.iter().map(|c| (c.host, c.memory_mib.saturating_sub(used_on(&vms, c.host, &res, None)))).collect())
    }

    fn finish(&mut self, plan: &MigrationPlan) -> Result<(), StoreError> {
        for vm in &plan.vms {
            let key = id_key(PLANVM, vm.0);
            if let Some(v) = self.get(&key)? {
                if plan_id_of(&v)? == plan.id {
                    self.delete(key);
                }
            }
        }
        Ok(())
    }

    /// Why `vms` cannot form a new plan to `to`, or their records and source host.
    fn check_group(
        &self,
        vms: &[VmId],
        to: NodeId,
    ) -> Result<Result<(Vec<VmRecord>, NodeId), PlanOutcome>, StoreError> {
        let mut records = Vec::new();
        for id in vms {
            match self.vm(*id)? {
                Some(r) => records.push(r),
                None => return Ok(Err(not_found(format!("no VM {id}")))),
            }
        }
        let from = records[0].host;
        if let Some(r) = records.iter().find(|r| r.host != from) {
            return Ok(Err(refused(format!(
                "a plan moves VMs from one host: {} is on {from} but {} is on {}",
                records[0].id, r.id, r.host
            ))));
        }
        if to == from {
            let verb = if vms.len() == 1 { "runs" } else { "run" };
            return Ok(Err(refused(format!(
                "{} already {verb} on {to}: the source and the destination are the same host",
                list(vms)
            ))));
        }
        for r in &records {
            if self.pair(r.id)?.is_some() {
                return Ok(Err(refused(format!(
                    "{} is protected by an HA pair, which keeps it on its hosts: delete the pair to move it in a plan",
                    r.id
                ))));
            }
            if let Some(p) = self.active_plan_of(r.id)? {
                return Ok(Err(refused(format!("{} is already in plan {} ({}, {})", r.id, p.id, p.name, p.state))));
            }
            if let Some(t) = r.migrating_to {
                return Ok(Err(refused(format!("{} is already migrating to {t}", r.id))));
            }
            if r.desired != VmRunState::Running {
                return Ok(Err(refused(format!(
                    "{} is not meant to be running (desired {:?}): a live-migration plan moves running VMs",
                    r.id, r.desired
                ))));
            }
        }
        Ok(Ok((records, from)))
    }

    #[allow(clippy::too_many_arguments)]
    fn new_plan(
        &mut self,
        name: Option<String>,
        records: &[VmRecord],
        from: NodeId,
        to: NodeId,
        settings: &PlanSettings,
        drain: bool,
        at_ms: u64,
    ) -> Result<MigrationPlan, StoreError> {
        let id = self.next_id("plan")?;
        let mut vms: Vec<VmId> = records.iter().map(|r| r.id).collect();
        vms.sort();
        let name = match (name, drain) {
            (Some(n), _) => n,
            (None, true) => format!("drain-{}-to-{}-{id}", from.0, to.0),
            (None, false) => format!("plan-{id}"),
        };
        let mut plan = MigrationPlan {
            id,
            name,
            progress: vms.iter().map(|v| PlanVm { vm: *v, phase: PlanVmPhase::Waiting, note: None }).collect(),
            vms,
            from,
            to,
            max_parallel: settings.max_parallel,
            options: settings.options.clone(),
            timeout_ms: settings.timeout_ms,
            drain,
            state: PlanState::Created,
            created_at_ms: at_ms,
            updated_at_ms: at_ms,
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
        };
        let mib: u64 = records.iter().map(|r| r.memory_mib).sum();
        let note = format!("planned: move {} ({mib} MiB) from {from} to {to}", list(&plan.vms));
        push_step(&mut plan, at_ms, &note);
        self.put_plan(&plan)?;
        for vm in &plan.vms {
            self.put(id_key(PLANVM, vm.0), id.to_be_bytes().to_vec());
        }
        Ok(plan)
    }

    /// Apply one plan command.
    pub fn apply_plan(&mut self, cmd: &PlanCommand) -> Result<PlanOutcome, StoreError> {
        Ok(match cmd {
            PlanCommand::Create { name, vms, to, settings, at_ms } => {
                let mut vms = vms.clone();
                vms.sort();
                vms.dedup();
                let (records, from) = match self.check_group(&vms, *to)? {
                    Ok(x) => x,
                    Err(refusal) => return Ok(refusal),
                };
                if self.draining(*to)? {
                    return Ok(refused(format!("{to} is draining; it takes no VMs")));
                }
                let need: u64 = records.iter().map(|r| r.memory_mib).sum();
                match self.free_by_host()?.get(to) {
                    None => return Ok(not_found(format!("{to} is not a host that offers VM memory"))),
                    Some(&free) if free < need => {
                        return Ok(refused(format!(
                            "{to} has {free} MiB free; the group ({}) needs {need} MiB",
                            list(&vms)
                        )))
                    }
                    Some(_) => {}
                }
                PlanOutcome::Plan(Box::new(self.new_plan(
                    name.clone(),
                    &records,
                    from,
                    *to,
                    settings,
                    false,
                    *at_ms,
                )?))
            }
            PlanCommand::Drain { host, settings, at_ms } => self.drain(*host, settings, *at_ms)?,
            PlanCommand::Adopt { id, term, leader, at_ms } => {
                let Some(mut plan) = self.plan(*id)? else { return Ok(not_found(format!("no plan {id}"))) };
                if *term < plan.driver_term {
                    return Ok(refused(format!(
                        "plan {id} is driven by the leader of term {}; a controller of term {term} may not take it",
                        plan.driver_term
                    )));
                }
                if plan.driver != Some(*leader) || plan.driver_term != *term {
                    let note = match plan.driver {
                        Some(old) if old != *leader => {
                            format!("{leader} (term {term}) takes the plan over from {old} at {}", plan.state)
                        }
                        _ => format!("{leader} (term {term}) drives the plan"),
                    };
                    plan.driver = Some(*leader);
                    plan.driver_term = *term;
                    push_step(&mut plan, *at_ms, &note);
                    self.put_plan(&plan)?;
                }
                PlanOutcome::Plan(Box::new(plan))
            }
            PlanCommand::Advance { id, term, leader, expected, to, patch, note, at_ms } => {
                let Some(mut plan) = self.plan(*id)? else { return Ok(not_found(format!("no plan {id}"))) };
                if *term < plan.driver_term {
                    return Ok(refused(format!(
                        "plan {id} is driven by the leader of term {}; a controller of term {term} may not move it",
                        plan.driver_term
                    )));
                }
                if plan.state != *expected {
                    return Ok(refused(format!("plan {id} is {}, not {expected}", plan.state)));
                }
                if !expected.may_advance_to(*to) {
                    return Ok(refused(format!("plan {id} cannot go from {expected} to {to}")));
                }
                match (to, patch) {
                    (PlanState::Snapshotting, PlanPatch::None) => {}
                    (PlanState::Migrating, PlanPatch::Recovery(r)) => {
                        let mut covered: Vec<VmId> = r.images.iter().map(|i| i.vm).collect();
                        covered.sort();
                        if covered != plan.vms || r.host != plan.from {
                            return Ok(refused(format!(
                                "the recovery point must hold one image per VM of plan {id}, taken on {}",
                                plan.from
                            )));
                        }
                        plan.recovery = Some(r.clone());
                    }
                    (PlanState::Consolidating, PlanPatch::None) => {}
                    (PlanState::Succeeded, PlanPatch::Consolidated { resume_spread_ms, paused_ms }) => {
                        plan.resume_spread_ms = Some(*resume_spread_ms);
                        plan.consolidation_pause_ms = Some(*paused_ms);
                        for p in &mut plan.progress {
                            p.phase = PlanVmPhase::Arrived;
                        }
                    }
                    (PlanState::FailingBack, PlanPatch::Failure(reason)) => {
                        plan.failure = Some(bounded_note(reason));
                    }
                    (PlanState::FailedBack, PlanPatch::FailedBack(mode)) => {
                        plan.fail_back = Some(*mode);
                        let phase = match mode {
                            FailBackMode::RestoredFromSnapshot => PlanVmPhase::Restored,
                            _ => PlanVmPhase::AtSource,
                        };
                        for p in &mut plan.progress {
                            p.phase = phase;
                        }
                    }
                    _ => return Ok(refused(format!("moving plan {id} to {to} needs other details than {patch:?}"))),
                }
                plan.state = *to;
                plan.driver = Some(*leader);
                plan.driver_term = *term;
                push_step(&mut plan, *at_ms, note);
                if to.is_terminal() {
                    self.finish(&plan)?;
                }
                self.put_plan(&plan)?;
                PlanOutcome::Plan(Box::new(plan))
            }
            PlanCommand::VmPhase { id, term, vm, phase, note, at_ms } => {
                let Some(mut plan) = self.plan(*id)? else { return Ok(not_found(format!("no plan {id}"))) };
                if *term < plan.driver_term {
                    return Ok(refused(format!("plan {id} is driven by the leader of term {}", plan.driver_term)));
                }
                if plan.state.is_terminal() {
                    return Ok(refused(format!("plan {id} is {}", plan.state)));
                }
                let Some(entry) = plan.progress.iter_mut().find(|p| p.vm == *vm) else {
                    return Ok(not_found(format!("{vm} is not in plan {id}")));
                };
                let changed = entry.phase != *phase || entry.note != *note;
                entry.phase = *phase;
                entry.note = note.as_deref().map(bounded_note);
                if changed {
                    let text = match note {
                        Some(n) => format!("{vm}: {} ({n})", phase.as_str()),
                        None => format!("{vm}: {}", phase.as_str()),
                    };
                    push_step(&mut plan, *at_ms, &text);
                }
                plan.driver_term = plan.driver_term.max(*term);
                self.put_plan(&plan)?;
                PlanOutcome::Plan(Box::new(plan))
            }
            PlanCommand::RestoreGroup { id, term, reason, at_ms } => {
                let Some(mut plan) = self.plan(*id)? else { return Ok(not_found(format!("no plan {id}"))) };
                if *term < plan.driver_term {
                    return Ok(refused(format!("plan {id} is driven by the leader of term {}", plan.driver_term)));
                }
                if plan.restore.is_some() {
                    return Ok(PlanOutcome::Plan(Box::new(plan))); // already done: idempotent
                }
                if plan.state != PlanState::FailingBack {
                    return Ok(refused(format!("plan {id} is {}; only a plan failing back is restored", plan.state)));
                }
                if plan.recovery.is_none() {
                    return Ok(refused(format!("plan {id} has no recovery snapshot to restore from")));
                }
                let mut generations = Vec::new();
                for vm in plan.vms.clone() {
                    let Some(mut r) = self.vm(vm)? else { continue };
                    r.host = plan.from;
                    r.migrating_to = None;
                    r.generation += 1;
                    generations.push((vm, r.generation));
                    self.put_vm(&r)?;
                }
                plan.restore = Some(generations);
                plan.driver_term = plan.driver_term.max(*term);
                let note = format!(
                    "the whole group is placed back on {} to be restored from the recovery snapshot: {reason}",
                    plan.from
                );
                push_step(&mut plan, *at_ms, &note);
                self.put_plan(&plan)?;
                PlanOutcome::Plan(Box::new(plan))
            }
            PlanCommand::RecoveryReleased { id, term, at_ms } => {
                let Some(mut plan) = self.plan(*id)? else { return Ok(not_found(format!("no plan {id}"))) };
                if !plan.state.is_terminal() {
                    return Ok(refused(format!("plan {id} is {}; its recovery snapshot is still needed", plan.state)));
                }
                if !plan.recovery_released {
                    plan.recovery_released = true;
                    plan.driver_term = plan.driver_term.max(*term);
                    let host = plan.recovery.as_ref().map_or(plan.from, |r| r.host);
                    push_step(&mut plan, *at_ms, &format!("recovery images deleted from {host}"));
                    self.put_plan(&plan)?;
                }
                PlanOutcome::Plan(Box::new(plan))
            }
            PlanCommand::Cancel { id, reason, at_ms } => {
                let Some(mut plan) = self.plan(*id)? else { return Ok(not_found(format!("no plan {id}"))) };
                match plan.state {
                    s if s.is_forward() => {
                        plan.state = PlanState::FailingBack;
                        plan.failure = Some(bounded_note(&format!("cancelled: {reason}")));
                        push_step(&mut plan, *at_ms, &format!("cancelled: {reason}"));
                        self.put_plan(&plan)?;
                        PlanOutcome::Plan(Box::new(plan))
                    }
                    PlanState::Consolidating => {
                        return Ok(refused(format!(
                            "plan {id} is consolidating: every VM has arrived at {}; it can no longer be cancelled",
                            plan.to
                        )))
                    }
                    PlanState::FailingBack => return Ok(refused(format!("plan {id} is already failing back"))),
                    s => return Ok(refused(format!("plan {id} has already ended ({s})"))),
                }
            }
        })
    }

    fn drain(&mut self, host: NodeId, settings: &PlanSettings, at_ms: u64) -> Result<PlanOutcome, StoreError> {
        let mut free = self.free_by_host()?;
        if !free.contains_key(&host) {
            return Ok(not_found(format!("{host} is not a host that offers VM memory")));
        }
        self.set_draining(host, true);
        let mut skipped = Vec::new();
        let mut movable = Vec::new();
        let vms: Vec<VmRecord> = self.scan_as(VM)?;
        for r in vms.into_iter().filter(|r| r.host == host) {
            let reason = if let Some(p) = self.active_plan_of(r.id)? {
                Some(format!("already in plan {} ({})", p.id, p.state))
            } else if let Some(t) = r.migrating_to {
                Some(format!("already migrating to {t}"))
            } else if self.pair(r.id)?.is_some() {
                Some("protected by an HA pair (a failover, not a migration, moves it off this host)".to_string())
            } else if r.desired != VmRunState::Running {
                Some(format!("not running (desired {:?}); start it or move it when it runs", r.desired))
            } else {
                None
            };
            match reason {
                Some(reason) => skipped.push(DrainSkip { vm: r.id, reason }),
                None => movable.push(r),
            }
        }
        // Biggest first (ties by id), each to the host with the most free memory (ties by id).
        movable.sort_by(|a, b| b.memory_mib.cmp(&a.memory_mib).then(a.id.cmp(&b.id)));
        let mut targets = Vec::new();
        for h in free.keys() {
            if *h != host && !self.draining(*h)? {
                targets.push(*h);
            }
        }
        let mut groups: BTreeMap<NodeId, Vec<VmRecord>> = BTreeMap::new();
        for r in movable {
            let best = targets
                .iter()
                .filter(|h| free[*h] >= r.memory_mib)
                .max_by(|a, b| free[*a].cmp(&free[*b]).then(b.cmp(a)))
                .copied();
            match best {
                Some(h) => {
                    if let Some(f) = free.get_mut(&h) {
                        *f -= r.memory_mib;
                    }
                    groups.entry(h).or_default().push(r);
                }
                None => skipped.push(DrainSkip {
                    vm: r.id,
                    reason: format!("no other host has {} MiB free for it", r.memory_mib),
                }),
            }
        }
        let mut plans = Vec::new();
        for (to, records) in groups {
            let mut plan = self.new_plan(None, &records, host, to, settings, true, at_ms)?;
            push_step(&mut plan, at_ms, &format!("{host} is draining"));
            self.put_plan(&plan)?;
            plans.push(plan);
        }
        skipped.sort_by_key(|s| s.vm);
        Ok(PlanOutcome::Drained { host, plans, skipped })
    }
}

/// Every plan, oldest first.
pub fn plans(store: &Store) -> Result<Vec<MigrationPlan>, StoreError> {
    scan_store(store, PLAN)
}

pub fn plan(store: &Store, id: u64) -> Result<Option<MigrationPlan>, StoreError> {
    get_store(store, &id_key(PLAN, id))
}

/// Plans that still need the controller (see [`MigrationPlan::needs_work`]).
pub fn plans_needing_work(store: &Store) -> Result<Vec<MigrationPlan>, StoreError> {
    Ok(plans(store)?.into_iter().filter(MigrationPlan::needs_work).collect())
}

/// Non-final plans, via the `planvm/` index.
pub fn active_plans(store: &Store) -> Result<Vec<MigrationPlan>, StoreError> {
    let mut ids = Vec::new();
    for item in
        store.db().iterator_cf(store.cf(CF_CATALOG), rocksdb::IteratorMode::From(PLANVM, rocksdb::Direction::Forward))
    {
        let (k, v) = item?;
        if !k.starts_with(PLANVM) {
            break;
        }
        ids.push(plan_id_of(&v)?);
    }
    ids.sort_unstable();
    ids.dedup();
    let mut out = Vec::new();
    for id in ids {
        if let Some(p) = plan(store, id)? {
            out.push(p);
        }
    }
    Ok(out)
}

/// See [`reservations_from`].
pub fn reservations(store: &Store) -> Result<Vec<(VmId, NodeId)>, StoreError> {
    Ok(reservations_from(&active_plans(store)?))
}

fn find_plan(store: &Store, name_or_id: &str) -> Result<Option<MigrationPlan>, StoreError> {
    let digits = name_or_id.strip_prefix("plan-").unwrap_or(name_or_id);
    if let Ok(id) = digits.parse::<u64>() {
        return plan(store, id);
    }
    Ok(plans(store)?.into_iter().rev().find(|p| p.name == name_or_id))
}

pub fn query(store: &Store, q: &PlanQuery) -> Result<PlanQueryResult, StoreError> {
    Ok(match q {
        PlanQuery::Plans => PlanQueryResult::Plans(plans(store)?),
        PlanQuery::Plan { name_or_id } => PlanQueryResult::Plan(find_plan(store, name_or_id)?.map(Box::new)),
    })
}

#[cfg(test)]
mod tests {
    use haven_proto::plan::{RecoveryImage, RecoveryPoint};
    use haven_proto::vm::{MigrationOptions, VmCommand, VmOutcome, WorkloadKind};
    use haven_proto::{CatalogCommand, CommandOutcome};
    use rocksdb::WriteBatch;

    use super::*;

    fn apply(store: &Store, cmd: CatalogCommand) -> CommandOutcome {
        let mut batch = WriteBatch::default();
        let out = CatalogTxn::new(store, &mut batch).apply(&cmd).unwrap();
        store.db().write(batch).unwrap();
        out
    }

    fn vm_cmd(store: &Store, cmd: VmCommand) -> VmOutcome {
        match apply(store, CatalogCommand::Vm(cmd)) {
            CommandOutcome::Vm(o) => o,
            other => panic!("{other:?}"),
        }
    }

    fn plan_cmd(store: &Store, cmd: PlanCommand) -> PlanOutcome {
        match apply(store, CatalogCommand::Plan(cmd)) {
            CommandOutcome::Plan(o) => o,
            other => panic!("{other:?}"),
        }
    }

    fn refusal(o: PlanOutcome) -> (String, bool) {
        match o {
            PlanOutcome::Refused { reason, not_found } => (reason, not_found),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn the_plan(o: PlanOutcome) -> MigrationPlan {
        match o {
            PlanOutcome::Plan(p) => *p,
            other => panic!("expected a plan, got {other:?}"),
        }
    }

    /// Three hosts with `cap` MiB each; `n` running VMs of `mib` on node-1.
    fn setup(cap: u64, n: u64, mib: u64) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for h in 1..=3 {
            vm_cmd(&store, VmCommand::SetCapacity(HostCapacity { host: NodeId(h), memory_mib: cap }));
        }
        for i in 1..=n {
            let created = vm_cmd(
                &store,
                VmCommand::Create {
                    name: format!("v{i}"),
                    memory_mib: mib,
                    vcpus: 1,
                    workload: WorkloadKind::Uniform,
                    dirty_pages_per_sec: 0,
                    disk_writes_per_sec: 0,
                    host: Some(NodeId(1)),
                },
            );
            assert!(matches!(created, VmOutcome::Vm(_)), "{created:?}");
            vm_cmd(&store, VmCommand::SetDesired { vm: VmId(i), desired: VmRunState::Running });
        }
        (dir, store)
    }

    fn create(vms: &[u64], to: u64) -> PlanCommand {
        PlanCommand::Create {
            name: None,
            vms: vms.iter().map(|v| VmId(*v)).collect(),
            to: NodeId(to),
            settings: PlanSettings::default(),
            at_ms: 1000,
        }
    }

    fn advance(id: u64, term: u64, expected: PlanState, to: PlanState, patch: PlanPatch) -> PlanCommand {
        PlanCommand::Advance {
            id,
            term,
            leader: NodeId(1),
            expected,
            to,
            patch,
            note: format!("{expected} -> {to}"),
            at_ms: 2000,
        }
    }

    fn recovery(vms: &[u64]) -> RecoveryPoint {
        RecoveryPoint {
            host: NodeId(1),
            host_incarnation: 7,
            taken_at_ms: 1500,
            paused_ms: 3,
            images: vms
                .iter()
                .map(|v| RecoveryImage {
                    vm: VmId(*v),
                    image: format!("plan-1/vm-{v}"),
                    image_digest: "ab".into(),
                    memory_digest: "cd".into(),
                    last_seq: 7,
                    bytes: 100,
                })
                .collect(),
            volume_snapshots: vec![],
        }
    }

    #[test]
    fn bad_plans_are_refused_with_reasons() {
        let (_d, store) = setup(1024, 3, 64);
        assert!(refusal(plan_cmd(&store, create(&[1, 9], 2))).1, "unknown VM is not found");
        assert!(refusal(plan_cmd(&store, create(&[1], 9))).1, "unknown host is not found");
        assert!(refusal(plan_cmd(&store, create(&[1, 2], 1))).0.contains("same host"));
        the_plan(plan_cmd(&store, create(&[1, 2], 2)));
        let (r, nf) = refusal(plan_cmd(&store, create(&[2, 3], 3)));
        assert!(r.contains("already in plan 1") && !nf, "{r}");
        // Room: 100 MiB hosts, the group needs 100 MiB, node-2 already holds 60.
        let (_d2, small) = setup(100, 2, 50);
        let filler = VmCommand::Create {
            name: "filler".into(),
            memory_mib: 60,
            vcpus: 1,
            workload: WorkloadKind::Uniform,
            dirty_pages_per_sec: 0,
            disk_writes_per_sec: 0,
            host: Some(NodeId(2)),
        };
        assert!(matches!(vm_cmd(&small, filler), VmOutcome::Vm(_)));
        let (r, _) = refusal(plan_cmd(&small, create(&[1, 2], 2)));
        assert!(r.contains("MiB free"), "{r}");
        vm_cmd(&store, VmCommand::SetDesired { vm: VmId(3), desired: VmRunState::Stopped });
        assert!(refusal(plan_cmd(&store, create(&[3], 3))).0.contains("not meant to be running"));
    }

    #[test]
    fn a_plan_walks_its_states_by_compare_and_set() {
        let (_d, store) = setup(1024, 2, 64);
        let p = the_plan(plan_cmd(&store, create(&[2, 1], 2)));
        assert_eq!(p.vms, vec![VmId(1), VmId(2)]);
        assert_eq!(p.state, PlanState::Created);
        // Wrong expected state, skipping a state, a stale term: all refused.
        let r =
            refusal(plan_cmd(&store, advance(1, 5, PlanState::Migrating, PlanState::Consolidating, PlanPatch::None)));
        assert!(r.0.contains("not migrating"), "{r:?}");
        assert!(refusal(plan_cmd(&store, advance(1, 5, PlanState::Created, PlanState::Migrating, PlanPatch::None)))
            .0
            .contains("cannot go"));
        the_plan(plan_cmd(&store, advance(1, 5, PlanState::Created, PlanState::Snapshotting, PlanPatch::None)));
        let stale =
            advance(1, 4, PlanState::Snapshotting, PlanState::Migrating, PlanPatch::Recovery(recovery(&[1, 2])));
        assert!(refusal(plan_cmd(&store, stale)).0.contains("term 5"));
        // A recovery point must cover the whole group.
        let partial = advance(1, 5, PlanState::Snapshotting, PlanState::Migrating, PlanPatch::Recovery(recovery(&[1])));
        assert!(refusal(plan_cmd(&store, partial)).0.contains("one image per VM"));
        let p = the_plan(plan_cmd(
            &store,
            advance(1, 6, PlanState::Snapshotting, PlanState::Migrating, PlanPatch::Recovery(recovery(&[1, 2]))),
        ));
        assert_eq!(p.driver_term, 6);
        assert!(p.recovery.is_some());
        // The destination keeps room for the group while it moves forward.
        let res = reservations(&store).unwrap();
        assert_eq!(res, vec![(VmId(1), NodeId(2)), (VmId(2), NodeId(2))]);
        the_plan(plan_cmd(&store, advance(1, 6, PlanState::Migrating, PlanState::Consolidating, PlanPatch::None)));
        let cancel = PlanCommand::Cancel { id: 1, reason: "x".into(), at_ms: 3000 };
        assert!(refusal(plan_cmd(&store, cancel)).0.contains("no longer be cancelled"));
        let done = PlanPatch::Consolidated { resume_spread_ms: 2, paused_ms: 5 };
        let p = the_plan(plan_cmd(&store, advance(1, 6, PlanState::Consolidating, PlanState::Succeeded, done)));
        assert_eq!(p.resume_spread_ms, Some(2));
        assert!(p.needs_work(), "recovery images still to delete");
        assert!(active_plans(&store).unwrap().is_empty(), "final plans leave the index");
        // The VMs may join a new plan now.
        the_plan(plan_cmd(&store, create(&[1], 3)));
        let p = the_plan(plan_cmd(&store, PlanCommand::RecoveryReleased { id: 1, term: 6, at_ms: 4000 }));
        assert!(!p.needs_work());
        assert_eq!(p.steps.len(), 6, "{:#?}", p.steps);
    }

    #[test]
    fn cancel_fails_back_and_restore_moves_the_whole_group() {
        let (_d, store) = setup(1024, 2, 64);
        the_plan(plan_cmd(&store, create(&[1, 2], 2)));
        the_plan(plan_cmd(&store, advance(1, 1, PlanState::Created, PlanState::Snapshotting, PlanPatch::None)));
        the_plan(plan_cmd(
            &store,
            advance(1, 1, PlanState::Snapshotting, PlanState::Migrating, PlanPatch::Recovery(recovery(&[1, 2]))),
        ));
        // vm-1 moved to node-2, vm-2 is on its way.
        vm_cmd(&store, VmCommand::BeginMigration { vm: VmId(1), to: NodeId(2), plan: Some(1) });
        vm_cmd(&store, VmCommand::CommitMigration { vm: VmId(1), expected_generation: 1, to: NodeId(2) });
        vm_cmd(&store, VmCommand::BeginMigration { vm: VmId(2), to: NodeId(2), plan: Some(1) });
        let restore = PlanCommand::RestoreGroup { id: 1, term: 1, reason: "node-2 died".into(), at_ms: 5 };
        assert!(refusal(plan_cmd(&store, restore.clone())).0.contains("only a plan failing back"));
        let p = the_plan(plan_cmd(&store, PlanCommand::Cancel { id: 1, reason: "operator".into(), at_ms: 4 }));
        assert_eq!(p.state, PlanState::FailingBack);
        assert_eq!(p.failure.as_deref(), Some("cancelled: operator"));
        let p = the_plan(plan_cmd(&store, restore.clone()));
        assert_eq!(p.restore, Some(vec![(VmId(1), 3), (VmId(2), 2)]));
        for id in [1, 2] {
            let VmOutcome::Vm(v) = vm_cmd(&store, VmCommand::SetDesired { vm: VmId(id), desired: VmRunState::Running })
            else {
                panic!()
            };
            assert_eq!((v.host, v.migrating_to), (NodeId(1), None));
        }
        // Idempotent: a second restore changes nothing.
        assert_eq!(the_plan(plan_cmd(&store, restore)), p);
        let p = the_plan(plan_cmd(
            &store,
            advance(
                1,
                1,
                PlanState::FailingBack,
                PlanState::FailedBack,
                PlanPatch::FailedBack(FailBackMode::RestoredFromSnapshot),
            ),
        ));
        assert!(p.progress.iter().all(|v| v.phase == PlanVmPhase::Restored));
    }

    #[test]
    fn drain_groups_vms_by_destination_and_blocks_placement() {
        let (_d, store) = setup(200, 3, 64);
        vm_cmd(&store, VmCommand::SetDesired { vm: VmId(3), desired: VmRunState::Paused });
        let out = plan_cmd(
            &store,
            PlanCommand::Drain {
                host: NodeId(1),
                settings: PlanSettings {
                    max_parallel: 1,
                    options: MigrationOptions { max_downtime_ms: 50, ..MigrationOptions::default() },
                    timeout_ms: 60_000,
                },
                at_ms: 9,
            },
        );
        let PlanOutcome::Drained { host, plans, skipped } = out else { panic!("{out:?}") };
        assert_eq!(host, NodeId(1));
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert_eq!(skipped[0].vm, VmId(3));
        // 200 MiB hosts: vm-1 goes to node-2 (most free, ties by id), vm-2 to node-3.
        assert_eq!(plans.len(), 2, "{plans:?}");
        assert_eq!((plans[0].to, plans[0].vms.clone()), (NodeId(2), vec![VmId(1)]));
        assert_eq!((plans[1].to, plans[1].vms.clone()), (NodeId(3), vec![VmId(2)]));
        assert!(plans.iter().all(|p| p.drain && p.from == NodeId(1)));
        // Nothing new lands on the draining host.
        let late = VmCommand::Create {
            name: "late".into(),
            memory_mib: 10,
            vcpus: 1,
            workload: WorkloadKind::Uniform,
            dirty_pages_per_sec: 0,
            disk_writes_per_sec: 0,
            host: Some(NodeId(1)),
        };
        let VmOutcome::Refused { reason, .. } = vm_cmd(&store, late) else { panic!() };
        assert!(reason.contains("draining"), "{reason}");
        vm_cmd(&store, VmCommand::SetDraining { host: NodeId(1), draining: false });
        assert!(refusal(plan_cmd(&store, create(&[3], 2))).0.contains("not meant to be running"));
    }
}
