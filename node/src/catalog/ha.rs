//! The catalog's HA-pair table (C6): which host is each protected VM's primary and which its
//! standby, in which mode, at which generation, and the last failover.
//!
//! The meaning of every [`HaCommand`] is the pure `ha::core::failover::apply` (compare-and-set
//! on the pair's generation, refusals typed as `PairError`); this module feeds it the current
//! record and the hosts, and adds what only the catalog can check: the VM exists, the primary
//! of a new pair is the VM's host, a multi-operation pair has no disk workload (its two guests
//! run side by side, and only one may write the VM's disks). A `Failover` also moves the VM's
//! `host` to the new primary (a generation bump on the VM, as a migration commit does), so
//! every node's VM reconcile agrees with the pair about where the VM runs. Deleting a VM
//! deletes its pair (`vms`).
//!
//! **Invariants** (checked by `invariants` after every command that writes a pair): the record
//! passes `HaPairRecord::validate`, its generation grows by exactly one per change, and the
//! primary is the VM's catalog host.
//!
//! Key layout: `hapair/<vm BE>` → bincode [`HaPairRecord`].

use haven_proto::ha::{HaCommand, HaMode, HaOutcome, HaPairRecord, HaQuery, HaQueryResult};
use haven_proto::vm::VmRecord;
use haven_proto::{NodeId, VmId};

use super::{get_store, scan_store, CatalogTxn};
use crate::ha::core::failover::{self, HostInfo, PairError};
use crate::storage::{Store, StoreError};

pub(super) const HAPAIR: &[u8] = b"hapair/";

pub(super) fn pair_key(vm: VmId) -> Vec<u8> {
    [HAPAIR, &vm.0.to_be_bytes()[..]].concat()
}

fn refused(e: PairError) -> HaOutcome {
    let not_found = matches!(e, PairError::NoSuchPair(_));
    HaOutcome::Refused { reason: e.to_string(), not_found }
}

/// Why a VM cannot be (or stay) in a pair of `mode`; `None` if it can.
pub fn unsuited(vm: &VmRecord, mode: HaMode) -> Option<String> {
    match mode {
        HaMode::MultiOperation if vm.disk_writes_per_sec > 0 && !vm.volumes.is_empty() => Some(format!(
            "{} writes its disks: in multi-operation mode both guests run, and only one may write \
             the disks (use redundant mode, or set its disk write rate to 0)",
            vm.id
        )),
        _ => None,
    }
}

impl CatalogTxn<'_> {
    pub(super) fn pair(&self, vm: VmId) -> Result<Option<HaPairRecord>, StoreError> {
        self.get_as(&pair_key(vm))
    }

    fn ha_hosts(&self) -> Result<Vec<HostInfo>, StoreError> {
        let hosts: Vec<haven_proto::HostRecord> = self.scan_as(super::HOST_PREFIX)?;
        hosts.iter().map(|h| Ok(HostInfo { id: h.id, draining: self.draining(h.id)? })).collect()
    }

    pub(super) fn apply_ha(&mut self, cmd: &HaCommand) -> Result<HaOutcome, StoreError> {
        let vm = cmd.vm();
        let Some(mut record) = self.vm(vm)? else {
            if let HaCommand::Delete { .. } = cmd {
                // A VM deleted since: its pair went with it.
                return Ok(refused(PairError::NoSuchPair(vm)));
            }
            return Ok(HaOutcome::Refused { reason: format!("no VM {vm}"), not_found: true });
        };
        if let Some(refusal) = self.vm_refusal(&record, cmd) {
            return Ok(HaOutcome::Refused { reason: refusal, not_found: false });
        }
        let before = self.pair(vm)?;
        let after = match failover::apply(before.as_ref(), cmd, &self.ha_hosts()?) {
            Ok(after) => after,
            Err(e) => return Ok(refused(e)),
        };
        match &after {
            Some(pair) => {
                if pair.primary != record.host {
                    self.move_vm_to(&mut record, pair.primary)?;
                }
                self.put_as(pair_key(vm), pair)?;
            }
            None => self.delete(pair_key(vm)),
        }
        Ok(HaOutcome::Pair(after))
    }

    /// What the VM's own record forbids: a pair whose primary is not the VM's host, a mode the
    /// VM cannot run in, or a pair for a VM that is migrating.
    fn vm_refusal(&self, vm: &VmRecord, cmd: &HaCommand) -> Option<String> {
        match cmd {
            HaCommand::Create { primary, mode, .. } => {
                if *primary != vm.host {
                    return Some(format!("{} runs on {}, not {primary}", vm.id, vm.host));
                }
                if let Some(t) = vm.migrating_to {
                    return Some(format!("{} is migrating to {t}; protect it once it arrived", vm.id));
                }
                unsuited(vm, *mode)
            }
            HaCommand::SetMode { mode, .. } => unsuited(vm, *mode),
            _ => None,
        }
    }

    /// A failover moved the VM: its record follows, as a migration commit would move it.
    fn move_vm_to(&mut self, vm: &mut VmRecord, host: NodeId) -> Result<(), StoreError> {
        vm.host = host;
        vm.migrating_to = None;
        vm.generation += 1;
        self.put_vm(vm)
    }

    /// The pair of a VM being deleted goes with it.
    pub(super) fn delete_pair_of(&mut self, vm: VmId) {
        self.delete(pair_key(vm));
    }
}

/// The pair protecting `vm`, from applied state.
pub fn pair(store: &Store, vm: VmId) -> Result<Option<HaPairRecord>, StoreError> {
    get_store(store, &pair_key(vm))
}

/// Every pair, in VM order.
pub fn pairs(store: &Store) -> Result<Vec<HaPairRecord>, StoreError> {
    scan_store(store, HAPAIR)
}

pub fn query(store: &Store, q: &HaQuery) -> Result<HaQueryResult, StoreError> {
    Ok(match q {
        HaQuery::Get { vm } => HaQueryResult::Pair(pair(store, *vm)?),
        HaQuery::List => HaQueryResult::Pairs(pairs(store)?),
    })
}

#[cfg(test)]
mod tests {
    use haven_proto::ha::{PairState, MIN_EPOCH_MS};
    use haven_proto::vm::{HostCapacity, VmCommand, VmOutcome, WorkloadKind};
    use haven_proto::{CatalogCommand, CommandOutcome, HostRecord};
    use rocksdb::WriteBatch;

    use super::*;

    fn apply(store: &Store, cmd: CatalogCommand) -> CommandOutcome {
        let mut batch = WriteBatch::default();
        let mut txn = CatalogTxn::new(store, &mut batch);
        let out = txn.apply(&cmd).unwrap();
        store.db().write(batch).unwrap();
        out
    }

    fn ha(store: &Store, cmd: HaCommand) -> HaOutcome {
        match apply(store, CatalogCommand::Ha(cmd)) {
            CommandOutcome::Ha(o) => o,
            other => panic!("not an HA outcome: {other:?}"),
        }
    }

    fn pair_of(out: HaOutcome) -> HaPairRecord {
        match out {
            HaOutcome::Pair(Some(p)) => p,
            other => panic!("no pair: {other:?}"),
        }
    }

    /// Three hosts with room, and one VM on host 1 (`disk_rate` disk writes per second).
    fn setup(disk_rate: u64) -> (tempfile::TempDir, Store, VmRecord) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for id in 1..=3 {
            let host =
                HostRecord { id: NodeId(id), addr: format!("127.0.0.1:{}", 7000 + id), admin_addr: String::new() };
            apply(&store, CatalogCommand::UpsertHost(host));
            let cap = HostCapacity { host: NodeId(id), memory_mib: 1024 };
            apply(&store, CatalogCommand::Vm(VmCommand::SetCapacity(cap)));
        }
        let create = VmCommand::Create {
            name: "web".into(),
            memory_mib: 64,
            vcpus: 1,
            workload: WorkloadKind::Uniform,
            dirty_pages_per_sec: 100,
            disk_writes_per_sec: disk_rate,
            host: Some(NodeId(1)),
        };
        let vm = match apply(&store, CatalogCommand::Vm(create)) {
            CommandOutcome::Vm(VmOutcome::Vm(v)) => v,
            other => panic!("{other:?}"),
        };
        (dir, store, vm)
    }

    fn create(vm: VmId, primary: u64, standby: Option<u64>, mode: HaMode) -> HaCommand {
        HaCommand::Create { vm, primary: NodeId(primary), standby: standby.map(NodeId), mode }
    }

    #[test]
    fn a_failover_moves_the_vm_with_its_pair_and_stale_commands_change_nothing() {
        let (_d, store, vm) = setup(0);
        let redundant = HaMode::Redundant { epoch_ms: MIN_EPOCH_MS };
        let p = pair_of(ha(&store, create(vm.id, 1, Some(2), redundant)));
        assert_eq!(
            (p.primary, p.standby, p.state, p.generation),
            (NodeId(1), Some(NodeId(2)), PairState::Protecting, 1)
        );
        let failover = |expected_generation| HaCommand::Failover {
            vm: vm.id,
            expected_generation,
            to: NodeId(2),
            at_ms: 5,
            reason: "lost".into(),
        };
        let p = pair_of(ha(&store, failover(1)));
        assert_eq!((p.primary, p.state, p.generation), (NodeId(2), PairState::FailingOver, 2));
        let moved = crate::catalog::vms::vm(&store, vm.id).unwrap().unwrap();
        assert_eq!((moved.host, moved.generation), (NodeId(2), vm.generation + 1), "the VM follows its pair");
        // The same failover again (a retried proposal) is a stale compare-and-set.
        assert!(matches!(ha(&store, failover(1)), HaOutcome::Refused { .. }));
        assert_eq!(pair(&store, vm.id).unwrap().unwrap().generation, 2);
    }

    #[test]
    fn the_vm_record_decides_what_a_pair_may_be() {
        let (_d, store, vm) = setup(50);
        let redundant = HaMode::Redundant { epoch_ms: 30 };
        // Not the VM's host; multi-operation for a VM writing disks (once it has one).
        assert!(matches!(ha(&store, create(vm.id, 2, Some(3), redundant)), HaOutcome::Refused { .. }));
        let unknown = ha(&store, create(VmId(77), 1, None, redundant));
        assert!(matches!(unknown, HaOutcome::Refused { not_found: true, .. }), "{unknown:?}");
        let mut with_disk = vm.clone();
        with_disk.volumes = vec![haven_proto::VolumeId(9)];
        assert!(unsuited(&with_disk, HaMode::MultiOperation).is_some());
        assert!(unsuited(&vm, HaMode::MultiOperation).is_none(), "no disk: nothing to write twice");
        // No standby on a draining host.
        let mut batch = WriteBatch::default();
        CatalogTxn::new(&store, &mut batch).set_draining(NodeId(3), true);
        store.db().write(batch).unwrap();
        let draining = ha(&store, create(vm.id, 1, Some(3), redundant));
        assert!(matches!(&draining, HaOutcome::Refused { reason, .. } if reason.contains("draining")), "{draining:?}");
        // Deleting the VM deletes its pair.
        pair_of(ha(&store, create(vm.id, 1, None, redundant)));
        apply(&store, CatalogCommand::Vm(VmCommand::Delete { vm: vm.id }));
        assert_eq!(pair(&store, vm.id).unwrap(), None);
    }
}
