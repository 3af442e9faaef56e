//! What a client may propose: [`ClientCommand`], the subset of [`CatalogCommand`] that havenctl and
//! the SDK send in a `ClientRequest::Write`.
//!
//! Node-internal commands — replication changes (`SetReplication`), snapshot bookkeeping, integrity
//! verdicts, events, host registration and capacity, migration begin/commit/abort, and the plan
//! controller's steps — have no variant here, so a client request cannot carry one: the type
//! system keeps the two apart. Nodes propose internal commands with a node-only request. A client
//! command becomes a catalog command only through [`From`], on the node, after authorization.

use rkyv::{Archive, Deserialize, Serialize};

use crate::catalog::CatalogCommand;
use crate::ha::{HaCommand, HaMode};
use crate::ids::{NodeId, VmId, VolumeId};
use crate::plan::{PlanCommand, PlanSettings};
use crate::share::ShareCommand;
use crate::vm::{VmCommand, VmRunState, WorkloadKind};
use crate::volume::{RelationshipState, SnapshotPolicy, VolumeCommand};

/// A catalog change a client may ask for.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ClientCommand {
    /// Set `key` to `value` in the generic namespace.
    KvPut {
        key: String,
        value: Vec<u8>,
    },
    /// Remove `key` from the generic namespace.
    KvDelete {
        key: String,
    },
    /// Set `key` to `new` only if its current value equals `expected` (`None` = absent).
    KvCas {
        key: String,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
    },
    Volume(ClientVolumeCommand),
    Vm(ClientVmCommand),
    Plan(ClientPlanCommand),
    Share(ClientShareCommand),
    Ha(ClientHaCommand),
}

/// HA pair changes a client may ask for (see [`HaCommand`]); the leader's failover controller
/// proposes failovers and re-protection.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ClientHaCommand {
    /// Protect `vm`, which runs on `primary` (its catalog host; the catalog refuses another).
    Create {
        vm: VmId,
        primary: NodeId,
        standby: Option<NodeId>,
        mode: HaMode,
    },
    Delete {
        vm: VmId,
    },
    SetMode {
        vm: VmId,
        mode: HaMode,
        expected_generation: u64,
    },
}

impl From<ClientHaCommand> for HaCommand {
    fn from(c: ClientHaCommand) -> Self {
        use ClientHaCommand as C;
        match c {
            C::Create { vm, primary, standby, mode } => Self::Create { vm, primary, standby, mode },
            C::Delete { vm } => Self::Delete { vm },
            C::SetMode { vm, mode, expected_generation } => Self::SetMode { vm, mode, expected_generation },
        }
    }
}

impl ClientHaCommand {
    /// Same checks as [`HaCommand::validate`].
    pub fn validate(&self) -> Result<(), String> {
        HaCommand::from(self.clone()).validate()
    }
}

/// Share changes a client may ask for (see [`ShareCommand`]); the leader's share controller
/// moves hubs.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ClientShareCommand {
    Create { name: String, members: Vec<NodeId> },
    Delete { share: crate::ids::ShareId },
    SetMembers { share: crate::ids::ShareId, members: Vec<NodeId>, expected_generation: u64 },
}

impl From<ClientShareCommand> for ShareCommand {
    fn from(c: ClientShareCommand) -> Self {
        use ClientShareCommand as C;
        match c {
            C::Create { name, members } => Self::Create { name, members },
            C::Delete { share } => Self::Delete { share },
            C::SetMembers { share, members, expected_generation } => {
                Self::SetMembers { share, members, expected_generation }
            }
        }
    }
}

/// Volume changes a client may ask for (see [`VolumeCommand`] for their meaning).
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ClientVolumeCommand {
    Create {
        name: String,
        size_bytes: u64,
        block_size: u32,
        replica_count: u8,
        hosts: Vec<NodeId>,
        cloned_from: Option<(VolumeId, u64)>,
    },
    Resize {
        volume: VolumeId,
        size_bytes: u64,
    },
    Delete {
        volume: VolumeId,
    },
    PutPolicy(SnapshotPolicy),
    DeletePolicy {
        name: String,
    },
    CreateRelationship {
        volume: VolumeId,
        target: NodeId,
        max_lag_bytes: u64,
    },
    SetRelationshipState {
        id: u64,
        state: RelationshipState,
    },
    DeleteRelationship {
        id: u64,
    },
}

/// VM changes a client may ask for (see [`VmCommand`]).
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ClientVmCommand {
    Create {
        name: String,
        memory_mib: u64,
        vcpus: u32,
        workload: WorkloadKind,
        dirty_pages_per_sec: u64,
        disk_writes_per_sec: u64,
        host: Option<NodeId>,
    },
    SetDesired {
        vm: VmId,
        desired: VmRunState,
    },
    Delete {
        vm: VmId,
    },
    AttachVolume {
        vm: VmId,
        volume: VolumeId,
    },
    DetachVolume {
        vm: VmId,
        volume: VolumeId,
    },
    SetDraining {
        host: NodeId,
        draining: bool,
    },
}

/// Plan changes a client may ask for (see [`PlanCommand`]); the leader's plan controller
/// proposes every other plan step.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ClientPlanCommand {
    Create { name: Option<String>, vms: Vec<VmId>, to: NodeId, settings: PlanSettings, at_ms: u64 },
    Drain { host: NodeId, settings: PlanSettings, at_ms: u64 },
    Cancel { id: u64, reason: String, at_ms: u64 },
}

impl ClientCommand {
    /// Same checks as [`CatalogCommand::validate`].
    pub fn validate(&self) -> Result<(), String> {
        CatalogCommand::from(self.clone()).validate()
    }

    /// Short name for logs and refusals.
    pub fn name(&self) -> &'static str {
        match self {
            Self::KvPut { .. } => "kv_put",
            Self::KvDelete { .. } => "kv_delete",
            Self::KvCas { .. } => "kv_cas",
            Self::Volume(_) => "volume",
            Self::Vm(_) => "vm",
            Self::Plan(_) => "plan",
            Self::Share(_) => "share",
            Self::Ha(_) => "ha",
        }
    }
}

impl ClientVolumeCommand {
    /// Same checks as [`VolumeCommand::validate`].
    pub fn validate(&self) -> Result<(), String> {
        VolumeCommand::from(self.clone()).validate()
    }
}

impl ClientVmCommand {
    /// Same checks as [`VmCommand::validate`].
    pub fn validate(&self) -> Result<(), String> {
        VmCommand::from(self.clone()).validate()
    }
}

impl ClientShareCommand {
    /// Same checks as [`ShareCommand::validate`].
    pub fn validate(&self) -> Result<(), String> {
        ShareCommand::from(self.clone()).validate()
    }
}

impl ClientPlanCommand {
    /// Same checks as [`PlanCommand::validate`].
    pub fn validate(&self) -> Result<(), String> {
        PlanCommand::from(self.clone()).validate()
    }
}

impl From<ClientCommand> for CatalogCommand {
    fn from(c: ClientCommand) -> Self {
        match c {
            ClientCommand::KvPut { key, value } => Self::KvPut { key, value },
            ClientCommand::KvDelete { key } => Self::KvDelete { key },
            ClientCommand::KvCas { key, expected, new } => Self::KvCas { key, expected, new },
            ClientCommand::Volume(v) => Self::Volume(v.into()),
            ClientCommand::Vm(v) => Self::Vm(v.into()),
            ClientCommand::Plan(p) => Self::Plan(p.into()),
            ClientCommand::Share(s) => Self::Share(s.into()),
            ClientCommand::Ha(h) => Self::Ha(h.into()),
        }
    }
}

impl From<ClientVolumeCommand> for VolumeCommand {
    fn from(c: ClientVolumeCommand) -> Self {
        use ClientVolumeCommand as C;
        match c {
            C::Create { name, size_bytes, block_size, replica_count, hosts, cloned_from } => {
                Self::Create { name, size_bytes, block_size, replica_count, hosts, cloned_from }
            }
            C::Resize { volume, size_bytes } => Self::Resize { volume, size_bytes },
            C::Delete { volume } => Self::Delete { volume },
            C::PutPolicy(p) => Self::PutPolicy(p),
            C::DeletePolicy { name } => Self::DeletePolicy { name },
            C::CreateRelationship { volume, target, max_lag_bytes } => {
                Self::CreateRelationship { volume, target, max_lag_bytes }
            }
            C::SetRelationshipState { id, state } => Self::SetRelationshipState { id, state },
            C::DeleteRelationship { id } => Self::DeleteRelationship { id },
        }
    }
}

impl From<ClientVmCommand> for VmCommand {
    fn from(c: ClientVmCommand) -> Self {
        use ClientVmCommand as C;
        match c {
            C::Create { name, memory_mib, vcpus, workload, dirty_pages_per_sec, disk_writes_per_sec, host } => {
                Self::Create { name, memory_mib, vcpus, workload, dirty_pages_per_sec, disk_writes_per_sec, host }
            }
            C::SetDesired { vm, desired } => Self::SetDesired { vm, desired },
            C::Delete { vm } => Self::Delete { vm },
            C::AttachVolume { vm, volume } => Self::AttachVolume { vm, volume },
            C::DetachVolume { vm, volume } => Self::DetachVolume { vm, volume },
            C::SetDraining { host, draining } => Self::SetDraining { host, draining },
        }
    }
}

impl From<ClientPlanCommand> for PlanCommand {
    fn from(c: ClientPlanCommand) -> Self {
        use ClientPlanCommand as C;
        match c {
            C::Create { name, vms, to, settings, at_ms } => Self::Create { name, vms, to, settings, at_ms },
            C::Drain { host, settings, at_ms } => Self::Drain { host, settings, at_ms },
            C::Cancel { id, reason, at_ms } => Self::Cancel { id, reason, at_ms },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_commands_convert_and_validate_like_catalog_commands() {
        let ok = ClientCommand::KvPut { key: "k".into(), value: vec![1] };
        assert!(ok.validate().is_ok());
        assert_eq!(CatalogCommand::from(ok), CatalogCommand::KvPut { key: "k".into(), value: vec![1] });
        let bad = ClientCommand::KvPut { key: String::new(), value: vec![] };
        assert!(bad.validate().is_err());
        let drain = ClientCommand::Vm(ClientVmCommand::SetDraining { host: NodeId(2), draining: true });
        assert_eq!(
            CatalogCommand::from(drain),
            CatalogCommand::Vm(VmCommand::SetDraining { host: NodeId(2), draining: true })
        );
    }
}
