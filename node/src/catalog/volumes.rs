//! The catalog's volume tables: volumes, snapshots, snapshot policies, asynchronous
//! relationships and volume events, and the meaning of every [`VolumeCommand`].
//!
//! Everything here is deterministic (see the parent module): placement of a new volume picks
//! the hosts holding the fewest replicas, ties broken by id, from the catalog's host table; ids
//! come from counters in the catalog. A refused command changes nothing and yields
//! [`VolumeOutcome::Refused`] identically on every replica.
//!
//! Key layout (all in the `catalog` column family):
//! - `vol/<id BE>` → bincode [`VolumeRecord`]; `volname/<name>` → id (BE)
//! - `snap/<volume BE><id BE>` → bincode [`SnapshotRecord`]
//! - `policy/<name>` → bincode [`SnapshotPolicy`]
//! - `rel/<id BE>` → bincode [`Relationship`]
//! - `event/<id BE>` → bincode [`VolumeEvent`] (the newest [`MAX_EVENTS`] are kept)
//! - `counter/<table>` → next id (BE)
//!
//! Invariant kept by [`apply`]: `primary ∈ in_sync ⊆ replicas`, and `epoch` grows on every change
//! of primary or in-sync set.

use haven_proto::volume::{
    IntegrityVerdict, Relationship, RelationshipState, SnapshotPolicy, SnapshotRecord, VolumeCommand, VolumeEvent,
    VolumeOutcome, VolumeQuery, VolumeQueryResult, VolumeRecord,
};
use haven_proto::{NodeId, VolumeId};

use super::{get_store, resolve_name, scan_store, CatalogTxn};
use crate::storage::{Store, StoreError};

/// Events kept in the catalog; older ones are dropped as new ones arrive.
pub const MAX_EVENTS: u64 = 10_000;

pub(super) const VOL: &[u8] = b"vol/";
const VOLNAME: &[u8] = b"volname/";
const SNAP: &[u8] = b"snap/";
const POLICY: &[u8] = b"policy/";
const REL: &[u8] = b"rel/";
const EVENT: &[u8] = b"event/";

fn key(prefix: &[u8], parts: &[u64]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    for p in parts {
        k.extend_from_slice(&p.to_be_bytes());
    }
    k
}

fn name_key(prefix: &[u8], name: &str) -> Vec<u8> {
    [prefix, name.as_bytes()].concat()
}

fn refused(reason: impl Into<String>) -> VolumeOutcome {
    VolumeOutcome::Refused { reason: reason.into(), not_found: false }
}

fn not_found(reason: impl Into<String>) -> VolumeOutcome {
    VolumeOutcome::Refused { reason: reason.into(), not_found: true }
}

impl CatalogTxn<'_> {
    pub(super) fn volume(&self, id: VolumeId) -> Result<Option<VolumeRecord>, StoreError> {
        self.get_as(&key(VOL, &[id.0]))
    }

    fn snapshot(&self, volume: VolumeId, id: u64) -> Result<Option<SnapshotRecord>, StoreError> {
        self.get_as(&key(SNAP, &[volume.0, id]))
    }

    /// Apply one volume command.
    pub fn apply_volume(&mut self, cmd: &VolumeCommand) -> Result<VolumeOutcome, StoreError> {
        Ok(match cmd {
            VolumeCommand::Create { name, size_bytes, block_size, replica_count, hosts, cloned_from } => {
                if self.get(&name_key(VOLNAME, name))?.is_some() {
                    return Ok(refused(format!("a volume named {name:?} already exists")));
                }
                let known: Vec<NodeId> =
                    self.scan_as::<haven_proto::HostRecord>(b"host/")?.into_iter().map(|h| h.id).collect();
                let placed = if hosts.is_empty() {
                    let volumes: Vec<VolumeRecord> = self.scan_as(VOL)?;
                    let mut load: Vec<(usize, NodeId)> =
                        known.iter().map(|h| (volumes.iter().filter(|v| v.replicas.contains(h)).count(), *h)).collect();
                    load.sort();
                    load.into_iter().take(*replica_count as usize).map(|(_, h)| h).collect::<Vec<_>>()
                } else {
                    if let Some(h) = hosts.iter().find(|h| !known.contains(h)) {
                        return Ok(refused(format!("{h} is not a cluster host")));
                    }
                    let mut seen = hosts.clone();
                    seen.sort();
                    seen.dedup();
                    if seen.len() != hosts.len() {
                        return Ok(refused("a host is named twice"));
                    }
                    hosts.clone()
                };
                if placed.len() < *replica_count as usize {
                    return Ok(refused(format!(
                        "{replica_count} replicas need {replica_count} hosts; the cluster has {}",
                        known.len()
                    )));
                }
                let id = VolumeId(self.next_id("volume")?);
                let record = VolumeRecord {
                    id,
                    name: name.clone(),
                    size_bytes: *size_bytes,
                    block_size: *block_size,
                    primary: placed[0],
                    in_sync: placed.clone(),
                    replicas: placed,
                    epoch: 1,
                    cloned_from: *cloned_from,
                };
                self.put_as(key(VOL, &[id.0]), &record)?;
                self.put(name_key(VOLNAME, name), id.0.to_be_bytes().to_vec());
                VolumeOutcome::Volume(record)
            }
            VolumeCommand::Resize { volume, size_bytes } => {
                let Some(mut v) = self.volume(*volume)? else { return Ok(not_found(format!("no volume {volume}"))) };
                if let Err(e) = haven_proto::volume::size_ok(*size_bytes, v.block_size) {
                    return Ok(refused(e));
                }
                v.size_bytes = *size_bytes;
                self.put_as(key(VOL, &[volume.0]), &v)?;
                VolumeOutcome::Volume(v)
            }
            VolumeCommand::Delete { volume } => {
                let Some(v) = self.volume(*volume)? else { return Ok(not_found(format!("no volume {volume}"))) };
                if let Some(vm) = self.vm_with_disk(*volume)? {
                    return Ok(refused(format!("{volume} is a disk of {} {:?}; detach it first", vm.id, vm.name)));
                }
                self.delete(key(VOL, &[volume.0]));
                self.delete(name_key(VOLNAME, &v.name));
                for (k, _) in self.scan(&key(SNAP, &[volume.0]))? {
                    self.delete(k);
                }
                for p in self.scan_as::<SnapshotPolicy>(POLICY)? {
                    if p.volume == *volume {
                        self.delete(name_key(POLICY, &p.name));
                    }
                }
                for r in self.scan_as::<Relationship>(REL)? {
                    if r.volume == *volume {
                        self.delete(key(REL, &[r.id]));
                    }
                }
                VolumeOutcome::Done
            }
            VolumeCommand::SetReplication { volume, expected_epoch, primary, in_sync } => {
                let Some(mut v) = self.volume(*volume)? else { return Ok(not_found(format!("no volume {volume}"))) };
                if v.epoch != *expected_epoch {
                    return Ok(refused(format!("{volume} is at epoch {}, not {expected_epoch}", v.epoch)));
                }
                if let Some(h) = in_sync.iter().find(|h| !v.replicas.contains(h)) {
                    return Ok(refused(format!("{h} holds no replica of {volume}")));
                }
                v.primary = *primary;
                v.in_sync = in_sync.clone();
                v.in_sync.sort();
                v.in_sync.dedup();
                v.epoch += 1;
                self.put_as(key(VOL, &[volume.0]), &v)?;
                VolumeOutcome::Volume(v)
            }
            VolumeCommand::ReserveSnapshot { volume, name, label, kind, created_ms } => {
                if self.volume(*volume)?.is_none() {
                    return Ok(not_found(format!("no volume {volume}")));
                }
                let existing: Vec<SnapshotRecord> = self.scan_as(&key(SNAP, &[volume.0]))?;
                if existing.iter().any(|s| s.name == *name) {
                    return Ok(refused(format!("{volume} already has a snapshot named {name:?}")));
                }
                let id = self.next_id("snapshot")?;
                let record = SnapshotRecord {
                    volume: *volume,
                    id,
                    name: name.clone(),
                    label: label.clone(),
                    kind: *kind,
                    seq: 0,
                    hosts: Vec::new(),
                    complete: false,
                    verdict: IntegrityVerdict::NotChecked,
                    digests: Vec::new(),
                    created_ms: *created_ms,
                };
                self.put_as(key(SNAP, &[volume.0, id]), &record)?;
                VolumeOutcome::Snapshot(record)
            }
            VolumeCommand::CompleteSnapshot { volume, id, seq, hosts } => {
                let Some(mut s) = self.snapshot(*volume, *id)? else {
                    return Ok(not_found(format!("no snapshot {id} of {volume}")));
                };
                s.seq = *seq;
                s.hosts = hosts.clone();
                s.complete = true;
                self.put_as(key(SNAP, &[volume.0, *id]), &s)?;
                VolumeOutcome::Snapshot(s)
            }
            VolumeCommand::DeleteSnapshot { volume, id } => {
                if self.snapshot(*volume, *id)?.is_none() {
                    return Ok(not_found(format!("no snapshot {id} of {volume}")));
                }
                self.delete(key(SNAP, &[volume.0, *id]));
                VolumeOutcome::Done
            }
            VolumeCommand::SetVerdict { volume, id, verdict, digests } => {
                let Some(mut s) = self.snapshot(*volume, *id)? else {
                    return Ok(not_found(format!("no snapshot {id} of {volume}")));
                };
                s.verdict = verdict.clone();
                s.digests = digests.clone();
                self.put_as(key(SNAP, &[volume.0, *id]), &s)?;
                VolumeOutcome::Snapshot(s)
            }
            VolumeCommand::PutPolicy(p) => {
                if self.volume(p.volume)?.is_none() {
                    return Ok(not_found(format!("no volume {}", p.volume)));
                }
                self.put_as(name_key(POLICY, &p.name), p)?;
                VolumeOutcome::Policy(p.clone())
            }
            VolumeCommand::DeletePolicy { name } => {
                let k = name_key(POLICY, name);
                if self.get(&k)?.is_none() {
                    return Ok(not_found(format!("no policy {name:?}")));
                }
                self.delete(k);
                VolumeOutcome::Done
            }
            VolumeCommand::CreateRelationship { volume, target, max_lag_bytes } => {
                let Some(v) = self.volume(*volume)? else { return Ok(not_found(format!("no volume {volume}"))) };
                if v.replicas.contains(target) {
                    return Ok(refused(format!("{target} already holds a synchronous replica of {volume}")));
                }
                let hosts: Vec<haven_proto::HostRecord> = self.scan_as(b"host/")?;
                if !hosts.iter().any(|h| h.id == *target) {
                    return Ok(refused(format!("{target} is not a cluster host")));
                }
                let rels: Vec<Relationship> = self.scan_as(REL)?;
                if rels.iter().any(|r| r.volume == *volume && r.target == *target) {
                    return Ok(refused(format!("{volume} already has a relationship to {target}")));
                }
                let r = Relationship {
                    id: self.next_id("relationship")?,
                    volume: *volume,
                    target: *target,
                    state: RelationshipState::Active,
                    max_lag_bytes: *max_lag_bytes,
                };
                self.put_as(key(REL, &[r.id]), &r)?;
                VolumeOutcome::Relationship(r)
            }
            VolumeCommand::SetRelationshipState { id, state } => {
                let Some(mut r) = self.get_as::<Relationship>(&key(REL, &[*id]))? else {
                    return Ok(not_found(format!("no relationship {id}")));
                };
                r.state = *state;
                self.put_as(key(REL, &[*id]), &r)?;
                VolumeOutcome::Relationship(r)
            }
            VolumeCommand::DeleteRelationship { id } => {
                let k = key(REL, &[*id]);
                if self.get(&k)?.is_none() {
                    return Ok(not_found(format!("no relationship {id}")));
                }
                self.delete(k);
                VolumeOutcome::Done
            }
            VolumeCommand::ReverseRelationship { id, expected_epoch } => {
                let Some(mut r) = self.get_as::<Relationship>(&key(REL, &[*id]))? else {
                    return Ok(not_found(format!("no relationship {id}")));
                };
                let Some(mut v) = self.volume(r.volume)? else {
                    return Ok(not_found(format!("no volume {}", r.volume)));
                };
                if v.epoch != *expected_epoch {
                    return Ok(refused(format!("{} is at epoch {}, not {expected_epoch}", v.id, v.epoch)));
                }
                if v.replicas.len() != 1 {
                    return Ok(refused(format!(
                        "reversing needs a 1-replica volume; {} has {} replicas",
                        v.id,
                        v.replicas.len()
                    )));
                }
                let old = v.primary;
                v.replicas = vec![r.target];
                v.primary = r.target;
                v.in_sync = vec![r.target];
                v.epoch += 1;
                r.target = old;
                self.put_as(key(VOL, &[v.id.0]), &v)?;
                self.put_as(key(REL, &[*id]), &r)?;
                VolumeOutcome::Volume(v)
            }
            VolumeCommand::Event { volume, kind, message, host } => {
                let id = self.next_id("event")?;
                let e = VolumeEvent { id, volume: *volume, kind: kind.clone(), message: message.clone(), host: *host };
                self.put_as(key(EVENT, &[id]), &e)?;
                if id > MAX_EVENTS {
                    self.delete(key(EVENT, &[id - MAX_EVENTS]));
                }
                VolumeOutcome::Done
            }
        })
    }
}

/// Every volume, in id order.
pub fn volumes(store: &Store) -> Result<Vec<VolumeRecord>, StoreError> {
    scan_store(store, VOL)
}

/// One volume by id.
pub fn volume(store: &Store, id: VolumeId) -> Result<Option<VolumeRecord>, StoreError> {
    get_store(store, &key(VOL, &[id.0]))
}

/// One volume by name, `vol-<id>` or `<id>`.
pub fn find_volume(store: &Store, name_or_id: &str) -> Result<Option<VolumeRecord>, StoreError> {
    match resolve_name(store, name_or_id, "vol-", VOLNAME)? {
        Some(id) => volume(store, VolumeId(id)),
        None => Ok(None),
    }
}

/// A volume's snapshots, in id (= creation) order.
pub fn snapshots(store: &Store, volume: VolumeId) -> Result<Vec<SnapshotRecord>, StoreError> {
    scan_store(store, &key(SNAP, &[volume.0]))
}

pub fn policies(store: &Store) -> Result<Vec<SnapshotPolicy>, StoreError> {
    scan_store(store, POLICY)
}

pub fn relationships(store: &Store) -> Result<Vec<Relationship>, StoreError> {
    scan_store(store, REL)
}

/// Answer a volume query from applied state.
pub fn query(store: &Store, q: &VolumeQuery) -> Result<VolumeQueryResult, StoreError> {
    Ok(match q {
        VolumeQuery::Volumes => VolumeQueryResult::Volumes(volumes(store)?),
        VolumeQuery::Volume { name_or_id } => VolumeQueryResult::Volume(find_volume(store, name_or_id)?),
        VolumeQuery::Snapshots { volume } => VolumeQueryResult::Snapshots(snapshots(store, *volume)?),
        VolumeQuery::Policies => VolumeQueryResult::Policies(policies(store)?),
        VolumeQuery::Relationships => VolumeQueryResult::Relationships(relationships(store)?),
        VolumeQuery::Events { volume, limit } => {
            let mut all: Vec<VolumeEvent> = scan_store(store, EVENT)?;
            all.retain(|e| volume.is_none_or(|v| e.volume == v));
            let keep = (*limit as usize).min(super::MAX_SCAN as usize);
            let skip = all.len().saturating_sub(keep);
            VolumeQueryResult::Events(all.split_off(skip))
        }
    })
}
