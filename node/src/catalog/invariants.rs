//! The catalog's invariants, checked after every applied command on the records it wrote.
//!
//! [`check`] is pure: it judges the [`Change`]s of one command (each watched record the command
//! wrote, before and after) against a read-only [`CatalogView`] of the state after it. The parent
//! module collects the changes while it applies (`CatalogTxn::apply`), and [`report`]s a
//! violation: logged, counted in `haven_catalog_invariant_violations_total{invariant}`, and a
//! panic in debug builds and tests. This module must not change state or refuse a command: the
//! command is already applied, identically on every replica, and apply must never stall. It
//! reads only the records the command wrote and the plan or index entries they name, so the check
//! stays cheap.
//!
//! Checked:
//! - volumes: `primary ∈ in_sync ⊆ replicas`, no host twice in `replicas` or `in_sync`; the epoch
//!   never decreases, and grows whenever the primary, the in-sync set or the replicas change
//!   (device actors refuse replication traffic from older epochs); the block size never changes;
//! - VMs: the generation never decreases, and grows whenever the VM changes `host` (commit and
//!   restore are compare-and-sets on it); a VM never migrates to the host it runs on; no disk is
//!   listed twice; a VM in a live plan is not deleted;
//! - plans: a VM is in at most one live (non-final) plan, and the `planvm/` index holds exactly
//!   the VMs of live plans, each pointing at its plan; a plan starts `Created` and its state moves
//!   only along [`PlanState::may_advance_to`]; its driver's term never decreases; its group is
//!   non-empty, ascending and without repeats; `Migrating`, `Consolidating` and `Succeeded` hold a
//!   recovery point with one image per VM of the group, taken on the source; a restore places
//!   every VM it lists on the source, not migrating, at the generation it records;
//! - shares: the hub is a member, members are distinct and sorted, and the generation grows by
//!   exactly one whenever the hub or the members change (and never otherwise).

use haven_proto::ha::HaPairRecord;
use haven_proto::plan::{MigrationPlan, PlanState};
use haven_proto::share::ShareRecord;
use haven_proto::vm::VmRecord;
use haven_proto::volume::VolumeRecord;
use haven_proto::{CatalogCommand, NodeId, VmId, VolumeId};

use super::ha::HAPAIR;
use super::plans::{PLAN, PLANVM};
use super::shares::SHARE;
use super::vms::VM;
use super::volumes::VOL;
use super::CatalogTxn;
use crate::raft::decode;
use crate::storage::{StoreError, CF_CATALOG};

/// A broken catalog invariant, named after the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvariantViolation {
    #[error("{volume}: primary {primary} is not in the in-sync set {in_sync:?}")]
    PrimaryNotInSync { volume: VolumeId, primary: NodeId, in_sync: Vec<NodeId> },
    #[error("{volume}: in-sync {host} holds no replica (replicas {replicas:?})")]
    InSyncNotReplica { volume: VolumeId, host: NodeId, replicas: Vec<NodeId> },
    #[error("{volume}: {host} is listed twice in its {list}")]
    DuplicateHost { volume: VolumeId, host: NodeId, list: &'static str },
    #[error("{volume}: epoch went back from {before} to {after}")]
    EpochDecreased { volume: VolumeId, before: u64, after: u64 },
    #[error("{volume}: primary, in-sync set or replicas changed at epoch {epoch} without a new epoch")]
    EpochNotBumped { volume: VolumeId, epoch: u64 },
    #[error("{volume}: block size changed from {before} to {after}")]
    BlockSizeChanged { volume: VolumeId, before: u32, after: u32 },
    #[error("{vm}: generation went back from {before} to {after}")]
    GenerationDecreased { vm: VmId, before: u64, after: u64 },
    #[error("{vm}: moved from {from} to {to} at generation {generation} without a new generation")]
    MovedWithoutNewGeneration { vm: VmId, from: NodeId, to: NodeId, generation: u64 },
    #[error("{vm}: migrating to {host}, where it already runs")]
    MigratingToOwnHost { vm: VmId, host: NodeId },
    #[error("{vm}: {volume} is listed twice among its disks")]
    DuplicateDisk { vm: VmId, volume: VolumeId },
    #[error("{vm} was deleted while in live plan {plan}")]
    DeletedInLivePlan { vm: VmId, plan: u64 },
    #[error("{vm} is in two live plans, {first} and {second}")]
    VmInTwoLivePlans { vm: VmId, first: u64, second: u64 },
    #[error("{vm} is indexed to plan {plan}, which {why}")]
    BadPlanIndex { vm: VmId, plan: u64, why: &'static str },
    #[error("plan {plan} is {state}, but {vm} is indexed to {index:?}, not to it")]
    LivePlanNotIndexed { plan: u64, state: PlanState, vm: VmId, index: Option<u64> },
    #[error("plan {plan} has ended ({state}), but {vm} is still indexed to it")]
    EndedPlanIndexed { plan: u64, state: PlanState, vm: VmId },
    #[error("plan {plan} went from {before:?} to {after}, which is not a plan transition")]
    IllegalTransition { plan: u64, before: Option<PlanState>, after: PlanState },
    #[error("plan {plan}: its driver's term went back from {before} to {after}")]
    DriverTermDecreased { plan: u64, before: u64, after: u64 },
    #[error("plan {plan}: its group {vms:?} is empty, not ascending or repeats a VM")]
    BadGroup { plan: u64, vms: Vec<VmId> },
    #[error("plan {plan} is {state} without a recovery point holding one image per VM, taken on {from}")]
    NoRecoveryPoint { plan: u64, state: PlanState, from: NodeId },
    #[error("plan {plan} restored its group to {from}, but {vm} is {found}")]
    RestoreIncomplete { plan: u64, from: NodeId, vm: VmId, found: String },
    #[error("{0}")]
    BadShare(String),
    #[error("bad HA pair: {0}")]
    BadPair(String),
    #[error("{share}: generation went from {before} to {after} (hub or members changed: {moved})")]
    ShareGeneration { share: haven_proto::ShareId, before: u64, after: u64, moved: bool },
    #[error("cannot read a record to check it: {0}")]
    Unreadable(String),
}

impl InvariantViolation {
    /// The rule broken, as the metric's `invariant` label.
    pub fn name(&self) -> &'static str {
        match self {
            Self::PrimaryNotInSync { .. } => "primary_not_in_sync",
            Self::InSyncNotReplica { .. } => "in_sync_not_replica",
            Self::DuplicateHost { .. } => "duplicate_host",
            Self::EpochDecreased { .. } => "epoch_decreased",
            Self::EpochNotBumped { .. } => "epoch_not_bumped",
            Self::BlockSizeChanged { .. } => "block_size_changed",
            Self::GenerationDecreased { .. } => "generation_decreased",
            Self::MovedWithoutNewGeneration { .. } => "moved_without_new_generation",
            Self::MigratingToOwnHost { .. } => "migrating_to_own_host",
            Self::DuplicateDisk { .. } => "duplicate_disk",
            Self::DeletedInLivePlan { .. } => "deleted_in_live_plan",
            Self::VmInTwoLivePlans { .. } => "vm_in_two_live_plans",
            Self::BadPlanIndex { .. } => "bad_plan_index",
            Self::LivePlanNotIndexed { .. } => "live_plan_not_indexed",
            Self::EndedPlanIndexed { .. } => "ended_plan_indexed",
            Self::IllegalTransition { .. } => "illegal_transition",
            Self::DriverTermDecreased { .. } => "driver_term_decreased",
            Self::BadGroup { .. } => "bad_group",
            Self::NoRecoveryPoint { .. } => "no_recovery_point",
            Self::RestoreIncomplete { .. } => "restore_incomplete",
            Self::BadShare(_) => "bad_share",
            Self::BadPair(_) => "bad_ha_pair",
            Self::ShareGeneration { .. } => "share_generation",
            Self::Unreadable(_) => "unreadable",
        }
    }
}

impl From<StoreError> for InvariantViolation {
    fn from(e: StoreError) -> Self {
        Self::Unreadable(e.to_string())
    }
}

/// One watched record a command wrote: its value before and after the command (`None`: absent).
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Volume {
        before: Option<VolumeRecord>,
        after: Option<VolumeRecord>,
    },
    Vm {
        id: VmId,
        before: Option<VmRecord>,
        after: Option<VmRecord>,
    },
    Plan {
        id: u64,
        before: Option<Box<MigrationPlan>>,
        after: Option<Box<MigrationPlan>>,
    },
    /// The `planvm/` index entry of `vm`: the plan it names.
    PlanIndex {
        vm: VmId,
        before: Option<u64>,
        after: Option<u64>,
    },
    Share {
        before: Option<ShareRecord>,
        after: Option<ShareRecord>,
    },
    HaPair {
        before: Option<HaPairRecord>,
        after: Option<HaPairRecord>,
    },
}

/// The catalog as it is after the command, as far as the checks read it.
pub trait CatalogView {
    fn plan(&self, id: u64) -> Result<Option<MigrationPlan>, StoreError>;
    /// The plan `vm`'s `planvm/` index entry names.
    fn plan_index(&self, vm: VmId) -> Result<Option<u64>, StoreError>;
    fn vm(&self, id: VmId) -> Result<Option<VmRecord>, StoreError>;
}

/// Whether writes to `key` are checked (volumes, VMs, plans and the plan index).
pub fn watched(key: &[u8]) -> bool {
    [VOL, VM, PLAN, PLANVM, SHARE, HAPAIR].iter().any(|prefix| key.starts_with(prefix))
}

fn id_key(prefix: &[u8], id: u64) -> Vec<u8> {
    [prefix, &id.to_be_bytes()[..]].concat()
}

/// The big-endian u64 in `bytes` (an id in a key or an index entry).
fn be_u64(bytes: &[u8]) -> Result<u64, InvariantViolation> {
    let raw: [u8; 8] = bytes.try_into().map_err(|_| InvariantViolation::Unreadable(format!("id bytes {bytes:?}")))?;
    Ok(u64::from_be_bytes(raw))
}

fn record<T: serde::de::DeserializeOwned>(bytes: Option<&[u8]>) -> Result<Option<T>, InvariantViolation> {
    bytes.map(|b| decode(b).map_err(InvariantViolation::Unreadable)).transpose()
}

fn index(bytes: Option<&[u8]>) -> Result<Option<u64>, InvariantViolation> {
    bytes.map(be_u64).transpose()
}

/// The change a write to the watched `key` made, from its raw values before and after.
pub fn change(key: &[u8], before: Option<&[u8]>, after: Option<&[u8]>) -> Result<Option<Change>, InvariantViolation> {
    Ok(Some(if key.starts_with(VOL) {
        Change::Volume { before: record(before)?, after: record(after)? }
    } else if key.starts_with(VM) {
        Change::Vm { id: VmId(be_u64(&key[VM.len()..])?), before: record(before)?, after: record(after)? }
    } else if key.starts_with(PLANVM) {
        Change::PlanIndex { vm: VmId(be_u64(&key[PLANVM.len()..])?), before: index(before)?, after: index(after)? }
    } else if key.starts_with(HAPAIR) {
        Change::HaPair { before: record(before)?, after: record(after)? }
    } else if key.starts_with(SHARE) {
        Change::Share { before: record(before)?, after: record(after)? }
    } else if key.starts_with(PLAN) {
        Change::Plan { id: be_u64(&key[PLAN.len()..])?, before: record(before)?, after: record(after)? }
    } else {
        return Ok(None);
    }))
}

/// Check every invariant the `changes` of one command could break; the first violation found.
pub fn check(changes: &[Change], view: &impl CatalogView) -> Result<(), InvariantViolation> {
    for change in changes {
        match change {
            Change::Volume { before, after } => check_volume(before.as_ref(), after.as_ref())?,
            Change::Vm { id, before, after } => check_vm(*id, before.as_ref(), after.as_ref(), view)?,
            Change::Plan { id, before, after } => check_plan(*id, before.as_deref(), after.as_deref(), view)?,
            Change::PlanIndex { vm, before, after } => check_index(*vm, *before, *after, view)?,
            Change::Share { before, after } => check_share(before.as_ref(), after.as_ref())?,
            Change::HaPair { before, after } => check_pair(before.as_ref(), after.as_ref(), view)?,
        }
    }
    Ok(())
}

/// Log, count and (in debug builds and tests) panic on `violation`, found after applying `cmd`.
pub fn report(violation: &InvariantViolation, cmd: &CatalogCommand) {
    metrics::counter!("haven_catalog_invariant_violations_total", "invariant" => violation.name()).increment(1);
    tracing::error!(%violation, command = ?cmd, "a catalog invariant is broken after applying a command");
    debug_assert!(false, "catalog invariant broken after applying {cmd:?}: {violation}");
}

/// The first element of `list` that appears twice.
fn repeated<T: Ord + Copy>(list: &[T]) -> Option<T> {
    let mut sorted = list.to_vec();
    sorted.sort();
    sorted.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
}

fn check_volume(before: Option<&VolumeRecord>, after: Option<&VolumeRecord>) -> Result<(), InvariantViolation> {
    let Some(v) = after else { return Ok(()) };
    let volume = v.id;
    if !v.in_sync.contains(&v.primary) {
        return Err(InvariantViolation::PrimaryNotInSync { volume, primary: v.primary, in_sync: v.in_sync.clone() });
    }
    if let Some(host) = v.in_sync.iter().find(|h| !v.replicas.contains(h)) {
        return Err(InvariantViolation::InSyncNotReplica { volume, host: *host, replicas: v.replicas.clone() });
    }
    for (list, hosts) in [("replicas", &v.replicas), ("in-sync set", &v.in_sync)] {
        if let Some(host) = repeated(hosts) {
            return Err(InvariantViolation::DuplicateHost { volume, host, list });
        }
    }
    let Some(b) = before else { return Ok(()) };
    if v.epoch < b.epoch {
        return Err(InvariantViolation::EpochDecreased { volume, before: b.epoch, after: v.epoch });
    }
    let moved = (b.primary, &b.in_sync, &b.replicas) != (v.primary, &v.in_sync, &v.replicas);
    if moved && v.epoch == b.epoch {
        return Err(InvariantViolation::EpochNotBumped { volume, epoch: v.epoch });
    }
    if v.block_size != b.block_size {
        return Err(InvariantViolation::BlockSizeChanged { volume, before: b.block_size, after: v.block_size });
    }
    Ok(())
}

fn check_share(before: Option<&ShareRecord>, after: Option<&ShareRecord>) -> Result<(), InvariantViolation> {
    let Some(s) = after else { return Ok(()) };
    super::shares::check(s).map_err(InvariantViolation::BadShare)?;
    let Some(b) = before else { return Ok(()) };
    let moved = (b.hub, &b.members) != (s.hub, &s.members);
    let expected = if moved { b.generation + 1 } else { b.generation };
    if s.generation != expected {
        return Err(InvariantViolation::ShareGeneration {
            share: s.id,
            before: b.generation,
            after: s.generation,
            moved,
        });
    }
    Ok(())
}

fn check_pair(
    before: Option<&HaPairRecord>,
    after: Option<&HaPairRecord>,
    view: &impl CatalogView,
) -> Result<(), InvariantViolation> {
    let Some(p) = after else { return Ok(()) };
    p.validate().map_err(InvariantViolation::BadPair)?;
    let expected = before.map_or(1, |b| b.generation + 1);
    if p.generation != expected {
        return Err(InvariantViolation::BadPair(format!(
            "{}: generation {} after {:?} (each change bumps it by one)",
            p.vm,
            p.generation,
            before.map(|b| b.generation)
        )));
    }
    match view.vm(p.vm)? {
        Some(v) if v.host == p.primary => Ok(()),
        Some(v) => {
            Err(InvariantViolation::BadPair(format!("{}: primary {} but the VM runs on {}", p.vm, p.primary, v.host)))
        }
        None => Err(InvariantViolation::BadPair(format!("{}: a pair for a VM that does not exist", p.vm))),
    }
}

fn check_vm(
    vm: VmId,
    before: Option<&VmRecord>,
    after: Option<&VmRecord>,
    view: &impl CatalogView,
) -> Result<(), InvariantViolation> {
    let Some(v) = after else {
        return match live_plan_of(vm, view)? {
            Some(plan) if before.is_some() => Err(InvariantViolation::DeletedInLivePlan { vm, plan: plan.id }),
            _ => Ok(()),
        };
    };
    if v.migrating_to == Some(v.host) {
        return Err(InvariantViolation::MigratingToOwnHost { vm, host: v.host });
    }
    if let Some(volume) = repeated(&v.volumes) {
        return Err(InvariantViolation::DuplicateDisk { vm, volume });
    }
    let Some(b) = before else { return Ok(()) };
    if v.generation < b.generation {
        return Err(InvariantViolation::GenerationDecreased { vm, before: b.generation, after: v.generation });
    }
    if v.host != b.host && v.generation == b.generation {
        return Err(InvariantViolation::MovedWithoutNewGeneration {
            vm,
            from: b.host,
            to: v.host,
            generation: v.generation,
        });
    }
    Ok(())
}

/// The live plan `vm`'s index entry names, if the entry exists and the plan is live.
fn live_plan_of(vm: VmId, view: &impl CatalogView) -> Result<Option<MigrationPlan>, InvariantViolation> {
    let Some(id) = view.plan_index(vm)? else { return Ok(None) };
    Ok(view.plan(id)?.filter(|p| !p.state.is_terminal()))
}

fn check_index(
    vm: VmId,
    before: Option<u64>,
    after: Option<u64>,
    view: &impl CatalogView,
) -> Result<(), InvariantViolation> {
    if let Some(id) = after {
        let why = match view.plan(id)? {
            None => Some("does not exist"),
            Some(p) if p.state.is_terminal() => Some("has ended"),
            Some(p) if !p.vms.contains(&vm) => Some("does not hold it"),
            Some(_) => None,
        };
        if let Some(why) = why {
            return Err(InvariantViolation::BadPlanIndex { vm, plan: id, why });
        }
    }
    // The entry was moved off or removed: the plan it named must no longer hold the VM live.
    let Some(old) = before.filter(|old| Some(*old) != after) else { return Ok(()) };
    let Some(plan) = view.plan(old)?.filter(|p| !p.state.is_terminal() && p.vms.contains(&vm)) else { return Ok(()) };
    Err(match after {
        Some(second) => InvariantViolation::VmInTwoLivePlans { vm, first: old, second },
        None => InvariantViolation::LivePlanNotIndexed { plan: old, state: plan.state, vm, index: None },
    })
}

fn check_plan(
    id: u64,
    before: Option<&MigrationPlan>,
    after: Option<&MigrationPlan>,
    view: &impl CatalogView,
) -> Result<(), InvariantViolation> {
    let Some(p) = after else { return Ok(()) };
    let legal = match before {
        None => p.state == PlanState::Created,
        Some(b) => b.state == p.state || b.state.may_advance_to(p.state),
    };
    if !legal {
        return Err(InvariantViolation::IllegalTransition {
            plan: id,
            before: before.map(|b| b.state),
            after: p.state,
        });
    }
    if let Some(b) = before.filter(|b| p.driver_term < b.driver_term) {
        return Err(InvariantViolation::DriverTermDecreased { plan: id, before: b.driver_term, after: p.driver_term });
    }
    if p.vms.is_empty() || !p.vms.windows(2).all(|w| w[0] < w[1]) {
        return Err(InvariantViolation::BadGroup { plan: id, vms: p.vms.clone() });
    }
    check_recovery(p)?;
    check_plan_index(p, view)?;
    if before.is_some_and(|b| b.restore.is_none()) {
        check_restore(p, view)?;
    }
    Ok(())
}

/// Past `Snapshotting` on the way forward, a plan holds a recovery point for its whole group.
fn check_recovery(p: &MigrationPlan) -> Result<(), InvariantViolation> {
    if !matches!(p.state, PlanState::Migrating | PlanState::Consolidating | PlanState::Succeeded) {
        return Ok(());
    }
    let covered = p.recovery.as_ref().is_some_and(|r| {
        let mut vms: Vec<VmId> = r.images.iter().map(|i| i.vm).collect();
        vms.sort();
        r.host == p.from && vms == p.vms
    });
    if covered {
        return Ok(());
    }
    Err(InvariantViolation::NoRecoveryPoint { plan: p.id, state: p.state, from: p.from })
}

/// A live plan is what each of its VMs' index entries names; an ended one is named by none.
fn check_plan_index(p: &MigrationPlan, view: &impl CatalogView) -> Result<(), InvariantViolation> {
    for vm in &p.vms {
        let index = view.plan_index(*vm)?;
        if p.state.is_terminal() && index == Some(p.id) {
            return Err(InvariantViolation::EndedPlanIndexed { plan: p.id, state: p.state, vm: *vm });
        }
        if !p.state.is_terminal() && index != Some(p.id) {
            return Err(InvariantViolation::LivePlanNotIndexed { plan: p.id, state: p.state, vm: *vm, index });
        }
    }
    Ok(())
}

/// A restore just recorded placed every VM it lists back on the source, at its new generation.
fn check_restore(p: &MigrationPlan, view: &impl CatalogView) -> Result<(), InvariantViolation> {
    for (vm, generation) in p.restore.iter().flatten() {
        let found = match view.vm(*vm)? {
            None => "gone".to_string(),
            Some(r) if r.host != p.from || r.migrating_to.is_some() || r.generation != *generation => {
                format!("on {} migrating to {:?} at generation {}", r.host, r.migrating_to, r.generation)
            }
            Some(_) => continue,
        };
        return Err(InvariantViolation::RestoreIncomplete { plan: p.id, from: p.from, vm: *vm, found });
    }
    Ok(())
}

impl CatalogTxn<'_> {
    /// The changes the command being applied made to watched records (see [`watched`]), in key
    /// order.
    pub(super) fn changes(&self) -> Result<Vec<Change>, InvariantViolation> {
        let mut out = Vec::new();
        for (key, earlier) in &self.written {
            // Not written earlier in this batch: the store still holds the value from before it.
            let before = match earlier {
                Some(value) => value.clone(),
                None => self.store.db().get_cf(self.store.cf(CF_CATALOG), key).map_err(StoreError::from)?,
            };
            let after = self.get(key)?;
            out.extend(change(key, before.as_deref(), after.as_deref())?);
        }
        Ok(out)
    }
}

impl CatalogView for CatalogTxn<'_> {
    fn plan(&self, id: u64) -> Result<Option<MigrationPlan>, StoreError> {
        self.get_as(&id_key(PLAN, id))
    }

    fn plan_index(&self, vm: VmId) -> Result<Option<u64>, StoreError> {
        let Some(bytes) = self.get(&id_key(PLANVM, vm.0))? else { return Ok(None) };
        be_u64(&bytes).map(Some).map_err(|e| super::corrupt(e.to_string()))
    }

    fn vm(&self, id: VmId) -> Result<Option<VmRecord>, StoreError> {
        self.get_as(&id_key(VM, id.0))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use haven_proto::plan::{
        FailBackMode, PlanCommand, PlanPatch, PlanSettings, PlanVm, PlanVmPhase, RecoveryImage, RecoveryPoint,
    };
    use haven_proto::vm::{HostCapacity, MigrationOptions, VmCommand, VmRunState, WorkloadKind};
    use haven_proto::volume::VolumeCommand;
    use haven_proto::{CommandOutcome, HostRecord};
    use rocksdb::WriteBatch;

    use super::*;
    use crate::storage::Store;

    /// A catalog held in maps, for states the commands would never produce.
    #[derive(Default)]
    struct Fake {
        plans: BTreeMap<u64, MigrationPlan>,
        index: BTreeMap<VmId, u64>,
        vms: BTreeMap<VmId, VmRecord>,
    }

    impl CatalogView for Fake {
        fn plan(&self, id: u64) -> Result<Option<MigrationPlan>, StoreError> {
            Ok(self.plans.get(&id).cloned())
        }

        fn plan_index(&self, vm: VmId) -> Result<Option<u64>, StoreError> {
            Ok(self.index.get(&vm).copied())
        }

        fn vm(&self, id: VmId) -> Result<Option<VmRecord>, StoreError> {
            Ok(self.vms.get(&id).cloned())
        }
    }

    fn nodes(ids: &[u64]) -> Vec<NodeId> {
        ids.iter().map(|h| NodeId(*h)).collect()
    }

    fn volume(primary: u64, in_sync: &[u64], replicas: &[u64], epoch: u64) -> VolumeRecord {
        VolumeRecord {
            id: VolumeId(1),
            name: "v".into(),
            size_bytes: 1 << 20,
            block_size: 4096,
            replicas: nodes(replicas),
            primary: NodeId(primary),
            in_sync: nodes(in_sync),
            epoch,
            cloned_from: None,
        }
    }

    fn vm(id: u64, host: u64, generation: u64) -> VmRecord {
        VmRecord {
            id: VmId(id),
            name: format!("vm{id}"),
            memory_mib: 64,
            vcpus: 1,
            workload: WorkloadKind::Uniform,
            dirty_pages_per_sec: 0,
            disk_writes_per_sec: 0,
            host: NodeId(host),
            desired: VmRunState::Running,
            generation,
            migrating_to: None,
            volumes: Vec::new(),
        }
    }

    fn recovery(vms: &[u64], host: u64) -> RecoveryPoint {
        RecoveryPoint {
            host: NodeId(host),
            host_incarnation: 7,
            taken_at_ms: 1500,
            paused_ms: 3,
            images: vms
                .iter()
                .map(|v| RecoveryImage {
                    vm: VmId(*v),
                    image: format!("img-{v}"),
                    image_digest: "ab".into(),
                    memory_digest: "cd".into(),
                    last_seq: 7,
                    bytes: 100,
                })
                .collect(),
            volume_snapshots: vec![],
        }
    }

    fn plan(id: u64, vms: &[u64], state: PlanState) -> MigrationPlan {
        let vms: Vec<VmId> = vms.iter().map(|v| VmId(*v)).collect();
        MigrationPlan {
            id,
            name: format!("plan-{id}"),
            progress: vms.iter().map(|v| PlanVm { vm: *v, phase: PlanVmPhase::Waiting, note: None }).collect(),
            vms,
            from: NodeId(1),
            to: NodeId(2),
            max_parallel: 1,
            options: MigrationOptions::default(),
            timeout_ms: 60_000,
            drain: false,
            state,
            created_at_ms: 0,
            updated_at_ms: 0,
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
            driver_term: 1,
        }
    }

    /// A view holding `plans`, each VM of a live one indexed to it.
    fn with_plans(plans: &[MigrationPlan]) -> Fake {
        let mut fake = Fake::default();
        for p in plans {
            if !p.state.is_terminal() {
                fake.index.extend(p.vms.iter().map(|v| (*v, p.id)));
            }
            fake.plans.insert(p.id, p.clone());
        }
        fake
    }

    fn volume_change(before: Option<VolumeRecord>, after: VolumeRecord) -> Result<(), InvariantViolation> {
        check(&[Change::Volume { before, after: Some(after) }], &Fake::default())
    }

    fn vm_change(before: VmRecord, after: VmRecord, view: &Fake) -> Result<(), InvariantViolation> {
        check(&[Change::Vm { id: after.id, before: Some(before), after: Some(after) }], view)
    }

    fn plan_change(before: Option<MigrationPlan>, after: MigrationPlan) -> Result<(), InvariantViolation> {
        let view = with_plans(std::slice::from_ref(&after));
        check(&[Change::Plan { id: after.id, before: before.map(Box::new), after: Some(Box::new(after)) }], &view)
    }

    fn rule(result: Result<(), InvariantViolation>) -> &'static str {
        result.expect_err("a violation").name()
    }

    #[test]
    fn volume_membership_is_checked() {
        assert_eq!(volume_change(None, volume(1, &[1, 2], &[1, 2, 3], 1)), Ok(()));
        assert_eq!(rule(volume_change(None, volume(3, &[1, 2], &[1, 2, 3], 1))), "primary_not_in_sync");
        assert_eq!(rule(volume_change(None, volume(1, &[1, 4], &[1, 2, 3], 1))), "in_sync_not_replica");
        assert_eq!(rule(volume_change(None, volume(1, &[1], &[1, 2, 1], 1))), "duplicate_host");
        assert_eq!(rule(volume_change(None, volume(1, &[1, 1], &[1, 2], 1))), "duplicate_host");
        assert_eq!(rule(volume_change(None, volume(1, &[], &[], 1))), "primary_not_in_sync");
    }

    #[test]
    fn volume_epochs_only_grow_and_grow_on_every_membership_change() {
        let before = volume(1, &[1, 2], &[1, 2, 3], 5);
        assert_eq!(volume_change(Some(before.clone()), volume(2, &[2, 3], &[1, 2, 3], 6)), Ok(()));
        let resized = VolumeRecord { size_bytes: 2 << 20, ..before.clone() };
        assert_eq!(volume_change(Some(before.clone()), resized), Ok(()), "a resize keeps the epoch");
        assert_eq!(rule(volume_change(Some(before.clone()), volume(1, &[1, 2], &[1, 2, 3], 4))), "epoch_decreased");
        assert_eq!(rule(volume_change(Some(before.clone()), volume(1, &[1], &[1, 2, 3], 5))), "epoch_not_bumped");
        assert_eq!(rule(volume_change(Some(before.clone()), volume(2, &[1, 2], &[1, 2, 3], 5))), "epoch_not_bumped");
        assert_eq!(rule(volume_change(Some(before.clone()), volume(1, &[1, 2], &[1, 2], 5))), "epoch_not_bumped");
        let reblocked = VolumeRecord { block_size: 512, ..before.clone() };
        assert_eq!(rule(volume_change(Some(before), reblocked)), "block_size_changed");
    }

    #[test]
    fn a_vm_moves_only_with_a_new_generation() {
        let view = Fake::default();
        assert_eq!(vm_change(vm(1, 1, 3), vm(1, 2, 4), &view), Ok(()));
        assert_eq!(rule(vm_change(vm(1, 1, 3), vm(1, 2, 3), &view)), "moved_without_new_generation");
        assert_eq!(rule(vm_change(vm(1, 1, 3), vm(1, 1, 2), &view)), "generation_decreased");
        let to_self = VmRecord { migrating_to: Some(NodeId(1)), ..vm(1, 1, 3) };
        assert_eq!(rule(vm_change(vm(1, 1, 3), to_self, &view)), "migrating_to_own_host");
        let disks = VmRecord { volumes: vec![VolumeId(4), VolumeId(5), VolumeId(4)], ..vm(1, 1, 3) };
        assert_eq!(rule(vm_change(vm(1, 1, 3), disks, &view)), "duplicate_disk");
        let live = with_plans(&[plan(1, &[1], PlanState::Migrating)]);
        let deleted = [Change::Vm { id: VmId(1), before: Some(vm(1, 1, 3)), after: None }];
        assert_eq!(rule(check(&deleted, &live)), "deleted_in_live_plan");
        assert_eq!(check(&deleted, &Fake::default()), Ok(()));
    }

    #[test]
    fn a_vm_is_in_at_most_one_live_plan() {
        // vm-1's entry moves from live plan 1 to plan 2: it is in both.
        let view = with_plans(&[plan(1, &[1, 2], PlanState::Migrating), plan(2, &[1], PlanState::Created)]);
        let moved = [Change::PlanIndex { vm: VmId(1), before: Some(1), after: Some(2) }];
        assert_eq!(rule(check(&moved, &view)), "vm_in_two_live_plans");
        // Plan 1 is touched while its VM's entry names plan 2.
        let plan_1 =
            [Change::Plan { id: 1, before: None, after: Some(Box::new(plan(1, &[1, 2], PlanState::Created))) }];
        let mut view = with_plans(&[plan(1, &[1, 2], PlanState::Created)]);
        view.index.insert(VmId(1), 2);
        assert_eq!(rule(check(&plan_1, &view)), "live_plan_not_indexed");
        // A live plan's entry removed; an entry naming an ended plan; an ended plan still named.
        let view = with_plans(&[plan(1, &[1], PlanState::Migrating)]);
        let removed = [Change::PlanIndex { vm: VmId(1), before: Some(1), after: None }];
        assert_eq!(rule(check(&removed, &view)), "live_plan_not_indexed");
        let mut view = with_plans(&[plan(1, &[1], PlanState::Succeeded)]);
        let added = [Change::PlanIndex { vm: VmId(1), before: None, after: Some(1) }];
        assert_eq!(rule(check(&added, &view)), "bad_plan_index");
        view.index.insert(VmId(1), 1);
        let ended = plan(1, &[1], PlanState::FailedBack);
        let before = plan(1, &[1], PlanState::FailingBack);
        assert_eq!(
            rule(check(&[Change::Plan { id: 1, before: Some(Box::new(before)), after: Some(Box::new(ended)) }], &view)),
            "ended_plan_indexed"
        );
        // Ending a plan removes its entries: fine.
        let done = with_plans(&[plan(1, &[1], PlanState::FailedBack)]);
        assert_eq!(check(&removed, &done), Ok(()));
    }

    #[test]
    fn plans_move_along_their_state_machine() {
        assert_eq!(plan_change(None, plan(1, &[1, 2], PlanState::Created)), Ok(()));
        assert_eq!(rule(plan_change(None, plan(1, &[1], PlanState::Snapshotting))), "illegal_transition");
        let created = plan(1, &[1], PlanState::Created);
        let jumped = MigrationPlan { recovery: Some(recovery(&[1], 1)), ..plan(1, &[1], PlanState::Migrating) };
        assert_eq!(rule(plan_change(Some(created.clone()), jumped)), "illegal_transition");
        let older = MigrationPlan { driver_term: 0, ..created.clone() };
        assert_eq!(rule(plan_change(Some(created.clone()), older)), "driver_term_decreased");
        assert_eq!(rule(plan_change(None, plan(1, &[2, 1], PlanState::Created))), "bad_group");
        assert_eq!(rule(plan_change(None, plan(1, &[], PlanState::Created))), "bad_group");
        let snapshotting = plan(1, &[1, 2], PlanState::Snapshotting);
        let bare = plan(1, &[1, 2], PlanState::Migrating);
        assert_eq!(rule(plan_change(Some(snapshotting.clone()), bare.clone())), "no_recovery_point");
        let partial = MigrationPlan { recovery: Some(recovery(&[1], 1)), ..bare.clone() };
        assert_eq!(rule(plan_change(Some(snapshotting.clone()), partial)), "no_recovery_point");
        let elsewhere = MigrationPlan { recovery: Some(recovery(&[1, 2], 3)), ..bare.clone() };
        assert_eq!(rule(plan_change(Some(snapshotting.clone()), elsewhere)), "no_recovery_point");
        let whole = MigrationPlan { recovery: Some(recovery(&[1, 2], 1)), ..bare };
        assert_eq!(plan_change(Some(snapshotting), whole), Ok(()));
    }

    #[test]
    fn a_restore_places_the_whole_group_on_the_source() {
        let failing =
            MigrationPlan { recovery: Some(recovery(&[1, 2], 1)), ..plan(1, &[1, 2], PlanState::FailingBack) };
        let restored = MigrationPlan { restore: Some(vec![(VmId(1), 4), (VmId(2), 3)]), ..failing.clone() };
        let mut view = with_plans(std::slice::from_ref(&restored));
        view.vms.insert(VmId(1), vm(1, 1, 4));
        view.vms.insert(VmId(2), vm(2, 1, 3));
        let changes = [Change::Plan { id: 1, before: Some(Box::new(failing)), after: Some(Box::new(restored)) }];
        assert_eq!(check(&changes, &view), Ok(()));
        view.vms.insert(VmId(2), vm(2, 2, 3));
        assert_eq!(rule(check(&changes, &view)), "restore_incomplete");
    }

    fn apply(store: &Store, cmd: CatalogCommand) -> CommandOutcome {
        let mut batch = WriteBatch::default();
        let out = CatalogTxn::new(store, &mut batch).apply(&cmd).unwrap();
        store.db().write(batch).unwrap();
        out
    }

    fn hosts_with_capacity(store: &Store) {
        for h in 1..=3 {
            let host = HostRecord { id: NodeId(h), addr: format!("h{h}:1"), admin_addr: format!("h{h}:2") };
            apply(store, CatalogCommand::UpsertHost(host));
            apply(
                store,
                CatalogCommand::Vm(VmCommand::SetCapacity(HostCapacity { host: NodeId(h), memory_mib: 1024 })),
            );
        }
    }

    fn create_volume(name: &str, replica_count: u8, hosts: &[u64]) -> CatalogCommand {
        CatalogCommand::Volume(VolumeCommand::Create {
            name: name.into(),
            size_bytes: 1 << 20,
            block_size: 4096,
            replica_count,
            hosts: nodes(hosts),
            cloned_from: None,
        })
    }

    fn create_vm(name: &str) -> CatalogCommand {
        CatalogCommand::Vm(VmCommand::Create {
            name: name.into(),
            memory_mib: 64,
            vcpus: 1,
            workload: WorkloadKind::Uniform,
            dirty_pages_per_sec: 0,
            disk_writes_per_sec: 0,
            host: Some(NodeId(1)),
        })
    }

    fn advance(id: u64, expected: PlanState, to: PlanState, patch: PlanPatch) -> CatalogCommand {
        let note = format!("{expected} -> {to}");
        CatalogCommand::Plan(PlanCommand::Advance {
            id,
            term: 2,
            leader: NodeId(1),
            expected,
            to,
            patch,
            note,
            at_ms: 2,
        })
    }

    fn refused(out: &CommandOutcome) -> bool {
        format!("{out:?}").contains("Refused")
    }

    /// The command sequences of the catalog's own tests (volumes, replication changes, reversal,
    /// VM moves and disks, plans forward, cancelled and restored, drains), one command per batch
    /// and all in one batch: none trips a check (a violation panics in tests).
    #[test]
    fn normal_command_sequences_keep_every_invariant() {
        use PlanState::*;
        let vol = |v: u64| VolumeId(v);
        let vm_id = |v: u64| VmId(v);
        let sequence = vec![
            create_volume("a", 3, &[]),
            CatalogCommand::Volume(VolumeCommand::SetReplication {
                volume: vol(1),
                expected_epoch: 1,
                primary: NodeId(2),
                in_sync: nodes(&[3, 2]),
            }),
            CatalogCommand::Volume(VolumeCommand::Resize { volume: vol(1), size_bytes: 2 << 20 }),
            create_volume("dr", 1, &[1]),
            CatalogCommand::Volume(VolumeCommand::CreateRelationship {
                volume: vol(2),
                target: NodeId(3),
                max_lag_bytes: 0,
            }),
            CatalogCommand::Volume(VolumeCommand::ReverseRelationship { id: 1, expected_epoch: 1 }),
            create_vm("v1"),
            create_vm("v2"),
            create_vm("v3"),
            CatalogCommand::Vm(VmCommand::AttachVolume { vm: vm_id(1), volume: vol(1) }),
            CatalogCommand::Vm(VmCommand::DetachVolume { vm: vm_id(1), volume: vol(1) }),
            CatalogCommand::Volume(VolumeCommand::Delete { volume: vol(1) }),
        ];
        let running =
            (1..=3).map(|v| CatalogCommand::Vm(VmCommand::SetDesired { vm: vm_id(v), desired: VmRunState::Running }));
        let sequence: Vec<CatalogCommand> = sequence
            .into_iter()
            .chain(running)
            .chain([
                CatalogCommand::Vm(VmCommand::BeginMigration { vm: vm_id(3), to: NodeId(3), plan: None }),
                CatalogCommand::Vm(VmCommand::AbortMigration { vm: vm_id(3) }),
                CatalogCommand::Plan(PlanCommand::Create {
                    name: None,
                    vms: vec![vm_id(2), vm_id(1)],
                    to: NodeId(2),
                    settings: PlanSettings::default(),
                    at_ms: 1,
                }),
                CatalogCommand::Plan(PlanCommand::Adopt { id: 1, term: 2, leader: NodeId(1), at_ms: 1 }),
                advance(1, Created, Snapshotting, PlanPatch::None),
                advance(1, Snapshotting, Migrating, PlanPatch::Recovery(recovery(&[1, 2], 1))),
                CatalogCommand::Vm(VmCommand::BeginMigration { vm: vm_id(1), to: NodeId(2), plan: Some(1) }),
                CatalogCommand::Vm(VmCommand::CommitMigration { vm: vm_id(1), expected_generation: 1, to: NodeId(2) }),
                CatalogCommand::Vm(VmCommand::BeginMigration { vm: vm_id(2), to: NodeId(2), plan: Some(1) }),
                CatalogCommand::Plan(PlanCommand::Cancel { id: 1, reason: "operator".into(), at_ms: 3 }),
                CatalogCommand::Plan(PlanCommand::RestoreGroup { id: 1, term: 2, reason: "x".into(), at_ms: 4 }),
                advance(1, FailingBack, FailedBack, PlanPatch::FailedBack(FailBackMode::RestoredFromSnapshot)),
                CatalogCommand::Plan(PlanCommand::RecoveryReleased { id: 1, term: 2, at_ms: 5 }),
                CatalogCommand::Plan(PlanCommand::Drain {
                    host: NodeId(1),
                    settings: PlanSettings::default(),
                    at_ms: 6,
                }),
                advance(2, Created, Snapshotting, PlanPatch::None),
                advance(2, Snapshotting, Migrating, PlanPatch::Recovery(recovery(&[1, 3], 1))),
                advance(2, Migrating, Consolidating, PlanPatch::None),
                advance(2, Consolidating, Succeeded, PlanPatch::Consolidated { resume_spread_ms: 1, paused_ms: 1 }),
                CatalogCommand::Vm(VmCommand::SetDraining { host: NodeId(1), draining: false }),
                CatalogCommand::Vm(VmCommand::Delete { vm: vm_id(3) }),
            ])
            .collect();

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        hosts_with_capacity(&store);
        for cmd in &sequence {
            let out = apply(&store, cmd.clone());
            assert!(!refused(&out), "{cmd:?} was refused: {out:?}");
        }

        // The same sequence in one batch: checks see the batch's own earlier writes.
        let dir = tempfile::tempdir().unwrap();
        let batched = Store::open(dir.path()).unwrap();
        hosts_with_capacity(&batched);
        let mut batch = WriteBatch::default();
        let mut txn = CatalogTxn::new(&batched, &mut batch);
        for cmd in &sequence {
            let out = txn.apply(cmd).unwrap();
            assert!(!refused(&out), "{cmd:?} was refused in a batch: {out:?}");
        }
    }

    /// A command that skipped validation (a primary outside its in-sync set) is caught by apply.
    #[test]
    #[should_panic(expected = "primary node-3 is not in the in-sync set")]
    fn apply_reports_a_violation() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        hosts_with_capacity(&store);
        apply(&store, create_volume("a", 3, &[]));
        let unvalidated = VolumeCommand::SetReplication {
            volume: VolumeId(1),
            expected_epoch: 1,
            primary: NodeId(3),
            in_sync: nodes(&[1, 2]),
        };
        assert!(CatalogCommand::Volume(unvalidated.clone()).validate().is_err(), "validation refuses it");
        apply(&store, CatalogCommand::Volume(unvalidated));
    }
}
