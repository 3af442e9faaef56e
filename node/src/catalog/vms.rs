//! The catalog's VM tables: VMs, host capacity and host drain marks, and the meaning of every
//! [`VmCommand`].
//!
//! Deterministic like the rest of the catalog. Placement is capacity aware: a VM goes to the
//! host with the most free memory that fits it (ties by id), or to the host asked for if it has
//! room; draining hosts take no VMs. A host without a recorded capacity offers none. A host's
//! used memory counts its VMs, VMs migrating to it, and VMs a migration plan still moves there
//! (reservations, see `plans`). Invariants kept by [`CatalogTxn::apply_vm`]: a VM has exactly
//! one `host`; `CommitMigration` moves it only from a matching `generation` and an announced
//! `migrating_to`, and bumps the generation; a VM in a migration plan is migrated only by that
//! plan and is not deleted.
//!
//! Key layout: `vm/<id BE>` → bincode [`VmRecord`]; `vmname/<name>` → id; `cap/<host BE>` →
//! bincode [`HostCapacity`]; `drain/<host BE>` → empty (the host is draining).

use haven_proto::vm::{HostCapacity, VmCommand, VmOutcome, VmQuery, VmQueryResult, VmRecord, VmRunState};
use haven_proto::{NodeId, VmId};

use super::{get_store, resolve_name, scan_store, CatalogTxn};
use crate::storage::{Store, StoreError, CF_CATALOG};

pub(super) const VM: &[u8] = b"vm/";
const VMNAME: &[u8] = b"vmname/";
pub(super) const CAP: &[u8] = b"cap/";
const DRAIN: &[u8] = b"drain/";

fn id_key(prefix: &[u8], id: u64) -> Vec<u8> {
    [prefix, &id.to_be_bytes()[..]].concat()
}

fn name_key(name: &str) -> Vec<u8> {
    [VMNAME, name.as_bytes()].concat()
}

fn refused(reason: impl Into<String>) -> VmOutcome {
    VmOutcome::Refused { reason: reason.into(), not_found: false }
}

fn not_found(reason: impl Into<String>) -> VmOutcome {
    VmOutcome::Refused { reason: reason.into(), not_found: true }
}

/// Memory used on `host` by `vms` (leaving out `excluding`): a VM counts where it runs, where it
/// is migrating to, and where a plan reserves room for it (`reservations`), once per host.
pub(super) fn used_on(vms: &[VmRecord], host: NodeId, reservations: &[(VmId, NodeId)], excluding: Option<VmId>) -> u64 {
    vms.iter()
        .filter(|v| Some(v.id) != excluding)
        .filter(|v| v.host == host || v.migrating_to == Some(host) || reservations.contains(&(v.id, host)))
        .map(|v| v.memory_mib)
        .sum()
}

impl CatalogTxn<'_> {
    pub(super) fn vm(&self, id: VmId) -> Result<Option<VmRecord>, StoreError> {
        self.get_as(&id_key(VM, id.0))
    }

    pub(super) fn put_vm(&mut self, v: &VmRecord) -> Result<(), StoreError> {
        self.put_as(id_key(VM, v.id.0), v)
    }

    pub(super) fn draining(&self, host: NodeId) -> Result<bool, StoreError> {
        Ok(self.get(&id_key(DRAIN, host.0))?.is_some())
    }

    pub(super) fn set_draining(&mut self, host: NodeId, draining: bool) {
        if draining {
            self.put(id_key(DRAIN, host.0), Vec::new());
        } else {
            self.delete(id_key(DRAIN, host.0));
        }
    }

    /// Free memory on `host` not counting `excluding`; `None` if the host offers no VM memory.
    fn free_mib(&self, host: NodeId, excluding: Option<VmId>) -> Result<Option<u64>, StoreError> {
        let caps: Vec<HostCapacity> = self.scan_as(CAP)?;
        let vms: Vec<VmRecord> = self.scan_as(VM)?;
        let res = self.reservations()?;
        Ok(caps
            .iter()
            .find(|c| c.host == host)
            .map(|c| c.memory_mib.saturating_sub(used_on(&vms, host, &res, excluding))))
    }

    /// The VM `volume` is a disk of, if any.
    pub(super) fn vm_with_disk(&self, volume: haven_proto::VolumeId) -> Result<Option<VmRecord>, StoreError> {
        Ok(self.scan_as::<VmRecord>(VM)?.into_iter().find(|v| v.volumes.contains(&volume)))
    }

    /// Apply one VM command.
    pub fn apply_vm(&mut self, cmd: &VmCommand) -> Result<VmOutcome, StoreError> {
        Ok(match cmd {
            VmCommand::Create { name, memory_mib, vcpus, workload, dirty_pages_per_sec, disk_writes_per_sec, host } => {
                if self.get(&name_key(name))?.is_some() {
                    return Ok(refused(format!("a VM named {name:?} already exists")));
                }
                let caps: Vec<HostCapacity> = self.scan_as(CAP)?;
                let vms: Vec<VmRecord> = self.scan_as(VM)?;
                let res = self.reservations()?;
                let free = |h: NodeId| {
                    caps.iter().find(|c| c.host == h).map(|c| c.memory_mib.saturating_sub(used_on(&vms, h, &res, None)))
                };
                let placed = match host {
                    Some(h) => match free(*h) {
                        None => return Ok(not_found(format!("{h} is not a host that offers VM memory"))),
                        Some(_) if self.draining(*h)? => {
                            return Ok(refused(format!("{h} is draining; it takes no new VMs")))
                        }
                        Some(f) if f < *memory_mib => {
                            return Ok(refused(format!("{h} has {f} MiB free; the VM needs {memory_mib} MiB")))
                        }
                        Some(_) => *h,
                    },
                    None => {
                        let mut best: Option<(u64, NodeId)> = None;
                        for c in &caps {
                            if self.draining(c.host)? {
                                continue;
                            }
                            let f = free(c.host).unwrap_or(0);
                            if f >= *memory_mib && best.is_none_or(|(bf, bh)| f > bf || (f == bf && c.host < bh)) {
                                best = Some((f, c.host));
                            }
                        }
                        match best {
                            Some((_, h)) => h,
                            None => {
                                return Ok(refused(format!(
                                    "no host that is not draining has {memory_mib} MiB free for the VM"
                                )))
                            }
                        }
                    }
                };
                let next = self.next_id("vm")?;
                let record = VmRecord {
                    id: VmId(next),
                    name: name.clone(),
                    memory_mib: *memory_mib,
                    vcpus: *vcpus,
                    workload: *workload,
                    dirty_pages_per_sec: *dirty_pages_per_sec,
                    disk_writes_per_sec: *disk_writes_per_sec,
                    host: placed,
                    desired: VmRunState::Stopped,
                    generation: 1,
                    migrating_to: None,
                    volumes: Vec::new(),
                };
                self.put_vm(&record)?;
                self.put(name_key(name), next.to_be_bytes().to_vec());
                VmOutcome::Vm(record)
            }
            VmCommand::SetDesired { vm, desired } => {
                let Some(mut v) = self.vm(*vm)? else { return Ok(not_found(format!("no VM {vm}"))) };
                v.desired = *desired;
                self.put_vm(&v)?;
                VmOutcome::Vm(v)
            }
            VmCommand::Delete { vm } => {
                let Some(v) = self.vm(*vm)? else { return Ok(not_found(format!("no VM {vm}"))) };
                if v.migrating_to.is_some() {
                    return Ok(refused(format!("{vm} is migrating; cancel the migration first")));
                }
                if let Some(p) = self.active_plan_of(*vm)? {
                    return Ok(refused(format!(
                        "{vm} is in migration plan {} ({}); cancel the plan or let it finish first",
                        p.id, p.state
                    )));
                }
                self.delete(id_key(VM, vm.0));
                self.delete(name_key(&v.name));
                self.delete_pair_of(*vm);
                VmOutcome::Done
            }
            VmCommand::SetCapacity(c) => {
                self.put_as(id_key(CAP, c.host.0), c)?;
                VmOutcome::Done
            }
            VmCommand::BeginMigration { vm, to, plan } => {
                let Some(mut v) = self.vm(*vm)? else { return Ok(not_found(format!("no VM {vm}"))) };
                if v.host == *to {
                    return Ok(refused(format!("{vm} already runs on {to}")));
                }
                if let Some(t) = v.migrating_to {
                    return Ok(refused(format!("{vm} is already migrating to {t}")));
                }
                if let Some(pair) = self.pair(*vm)? {
                    let standby = pair.standby.map_or("none".to_string(), |s| s.to_string());
                    return Ok(refused(format!(
                        "{vm} is protected by an HA pair (standby {standby}); a migration would move it away                          from its pair: delete the pair first (havenctl ha delete), migrate, and protect it again"
                    )));
                }
                let active = self.active_plan_of(*vm)?;
                match (&active, plan) {
                    (Some(p), Some(id)) if p.id == *id => {}
                    (Some(p), _) => {
                        let why = format!("{vm} is in migration plan {} ({}); the plan moves it", p.id, p.state);
                        return Ok(refused(format!("{why} (cancel the plan to move it yourself)")));
                    }
                    (None, Some(id)) => return Ok(refused(format!("{vm} is not in an active plan {id}"))),
                    (None, None) => {}
                }
                // A plan failing back may bring its VMs home to a draining source.
                let homecoming = active.as_ref().is_some_and(|p| {
                    p.state == haven_proto::plan::PlanState::FailingBack && p.from == *to && v.host == p.to
                });
                if self.draining(*to)? && !homecoming {
                    return Ok(refused(format!("{to} is draining; it takes no VMs")));
                }
                match self.free_mib(*to, Some(*vm))? {
                    None => return Ok(not_found(format!("{to} is not a host that offers VM memory"))),
                    Some(f) if f < v.memory_mib => {
                        return Ok(refused(format!("{to} has {f} MiB free; {vm} needs {} MiB", v.memory_mib)))
                    }
                    Some(_) => {}
                }
                v.migrating_to = Some(*to);
                self.put_vm(&v)?;
                VmOutcome::Vm(v)
            }
            VmCommand::CommitMigration { vm, expected_generation, to } => {
                let Some(mut v) = self.vm(*vm)? else { return Ok(not_found(format!("no VM {vm}"))) };
                if v.generation != *expected_generation || v.migrating_to != Some(*to) {
                    return Ok(refused(format!(
                        "{vm} is at generation {} migrating to {:?}; not committing a move to {to}",
                        v.generation, v.migrating_to
                    )));
                }
                v.host = *to;
                v.migrating_to = None;
                v.generation += 1;
                self.put_vm(&v)?;
                VmOutcome::Vm(v)
            }
            VmCommand::AbortMigration { vm } => {
                let Some(mut v) = self.vm(*vm)? else { return Ok(not_found(format!("no VM {vm}"))) };
                v.migrating_to = None;
                self.put_vm(&v)?;
                VmOutcome::Vm(v)
            }
            VmCommand::AttachVolume { vm, volume } | VmCommand::DetachVolume { vm, volume } => {
                let attach = matches!(cmd, VmCommand::AttachVolume { .. });
                let Some(mut v) = self.vm(*vm)? else { return Ok(not_found(format!("no VM {vm}"))) };
                if v.migrating_to.is_some() {
                    return Ok(refused(format!("{vm} is migrating; attach or detach disks when it rests")));
                }
                if let Some(p) = self.active_plan_of(*vm)? {
                    return Ok(refused(format!(
                        "{vm} is in migration plan {} ({}); its disks are fixed",
                        p.id, p.state
                    )));
                }
                if attach {
                    if self.volume(*volume)?.is_none() {
                        return Ok(not_found(format!("no volume {volume}")));
                    }
                    if let Some(other) = self.vm_with_disk(*volume)? {
                        return Ok(refused(format!("{volume} is already a disk of {} {:?}", other.id, other.name)));
                    }
                    if v.volumes.len() >= haven_proto::vm::MAX_VM_VOLUMES {
                        return Ok(refused(format!(
                            "{vm} has {} disks, the most a VM may have",
                            haven_proto::vm::MAX_VM_VOLUMES
                        )));
                    }
                    v.volumes.push(*volume);
                } else {
                    if !v.volumes.contains(volume) {
                        return Ok(not_found(format!("{volume} is not a disk of {vm}")));
                    }
                    v.volumes.retain(|x| x != volume);
                }
                self.put_vm(&v)?;
                VmOutcome::Vm(v)
            }
            VmCommand::SetDraining { host, draining } => {
                if self.get(&id_key(CAP, host.0))?.is_none() {
                    return Ok(not_found(format!("{host} is not a host that offers VM memory")));
                }
                self.set_draining(*host, *draining);
                VmOutcome::Done
            }
        })
    }
}

pub fn vms(store: &Store) -> Result<Vec<VmRecord>, StoreError> {
    scan_store(store, VM)
}

pub fn vm(store: &Store, id: VmId) -> Result<Option<VmRecord>, StoreError> {
    get_store(store, &id_key(VM, id.0))
}

/// A VM by name, `vm-<id>` or `<id>`.
pub fn find_vm(store: &Store, name_or_id: &str) -> Result<Option<VmRecord>, StoreError> {
    match resolve_name(store, name_or_id, "vm-", VMNAME)? {
        Some(id) => vm(store, VmId(id)),
        None => Ok(None),
    }
}

pub fn query(store: &Store, q: &VmQuery) -> Result<VmQueryResult, StoreError> {
    Ok(match q {
        VmQuery::Vms => VmQueryResult::Vms(vms(store)?),
        VmQuery::Vm { name_or_id } => VmQueryResult::Vm(find_vm(store, name_or_id)?),
        VmQuery::Capacity => {
            let all = vms(store)?;
            let caps: Vec<HostCapacity> = scan_store(store, CAP)?;
            let res = super::plans::reservations(store)?;
            VmQueryResult::Capacity(caps.into_iter().map(|c| (c.clone(), used_on(&all, c.host, &res, None))).collect())
        }
        VmQuery::Draining => VmQueryResult::Draining(draining_hosts(store)?),
    })
}

/// Hosts marked draining, in id order.
pub fn draining_hosts(store: &Store) -> Result<Vec<NodeId>, StoreError> {
    let mut out = Vec::new();
    for item in
        store.db().iterator_cf(store.cf(CF_CATALOG), rocksdb::IteratorMode::From(DRAIN, rocksdb::Direction::Forward))
    {
        let (k, _) = item?;
        if !k.starts_with(DRAIN) {
            break;
        }
        let id: [u8; 8] = k[DRAIN.len()..].try_into().map_err(|_| super::corrupt("drain key".into()))?;
        out.push(NodeId(u64::from_be_bytes(id)));
    }
    Ok(out)
}
