//! The SDK's VM API: create, list, start, pause, resume, stop and delete VMs; live status and
//! memory and disk checks; live migration (start, progress, cancel); host capacity; the VM's
//! application state (put, get) and a host's view of its HA pair.
//!
//! Catalog changes go through Raft; live requests go to the VM's host through any node.

use haven_proto::ha::{validate_app_entry, AppView, HaVmStatus};
pub use haven_proto::vm::DiskCheckReport;
use haven_proto::vm::{
    HostCapacity, MigrationOptions, MigrationReport, VmOutcome, VmQuery, VmQueryResult, VmRecord, VmRequest,
    VmResponse, VmRunState, VmStatus, WorkloadKind,
};
use haven_proto::{
    CatalogQuery, ClientCommand, ClientRequest, ClientResponse, ClientVmCommand, CommandOutcome, NodeId, QueryResult,
    VmId,
};

use crate::error::ClientError;
use crate::HavenClient;

/// What `create_vm` needs.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub workload: WorkloadKind,
    /// Page writes per second the guest's workload aims at (0 = idle).
    pub dirty_pages_per_sec: u64,
    /// Block writes per second the guest's workload aims at, over its attached disks (0 = none).
    pub disk_writes_per_sec: u64,
    /// Place on this host instead of letting the leader choose.
    pub host: Option<NodeId>,
}

impl VmSpec {
    pub fn new(name: impl Into<String>, memory_mib: u64) -> Self {
        Self {
            name: name.into(),
            memory_mib,
            vcpus: 1,
            workload: WorkloadKind::Uniform,
            dirty_pages_per_sec: 0,
            disk_writes_per_sec: 0,
            host: None,
        }
    }
}

/// What checking a guest verified: its memory, and each disk its workload writes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VmCheck {
    pub pages_written: u64,
    pub max_seq: u64,
    pub last_seq: u64,
    pub disks: Vec<DiskCheckReport>,
}

impl HavenClient {
    async fn vm_command(&self, cmd: ClientVmCommand) -> Result<VmOutcome, ClientError> {
        cmd.validate().map_err(|m| ClientError::refused(m, false))?;
        match self.write(ClientCommand::Vm(cmd)).await? {
            (_, CommandOutcome::Vm(VmOutcome::Refused { reason, not_found })) => {
                Err(ClientError::refused(reason, not_found))
            }
            (_, CommandOutcome::Vm(o)) => Ok(o),
            (_, other) => Err(ClientError::unexpected(other)),
        }
    }

    async fn vm_query(&self, q: VmQuery) -> Result<VmQueryResult, ClientError> {
        match self.read(CatalogQuery::Vm(q), true).await? {
            QueryResult::Vm(r) => Ok(r),
            other => Err(ClientError::unexpected(other)),
        }
    }

    async fn vm_request(&self, req: VmRequest) -> Result<VmResponse, ClientError> {
        match self.call(ClientRequest::Vm(req)).await? {
            ClientResponse::Vm(r) => Ok(r),
            other => Err(ClientError::unexpected(other)),
        }
    }

    pub async fn create_vm(&self, spec: &VmSpec) -> Result<VmRecord, ClientError> {
        let cmd = ClientVmCommand::Create {
            name: spec.name.clone(),
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            workload: spec.workload,
            dirty_pages_per_sec: spec.dirty_pages_per_sec,
            disk_writes_per_sec: spec.disk_writes_per_sec,
            host: spec.host,
        };
        match self.vm_command(cmd).await? {
            VmOutcome::Vm(v) => Ok(v),
            other => Err(ClientError::unexpected(other)),
        }
    }

    pub async fn vms(&self) -> Result<Vec<VmRecord>, ClientError> {
        match self.vm_query(VmQuery::Vms).await? {
            VmQueryResult::Vms(v) => Ok(v),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// A VM by name, `vm-N` or `N`; a clear `NotFound` error if there is none.
    pub async fn vm(&self, name_or_id: &str) -> Result<VmRecord, ClientError> {
        match self.vm_query(VmQuery::Vm { name_or_id: name_or_id.into() }).await? {
            VmQueryResult::Vm(Some(v)) => Ok(v),
            VmQueryResult::Vm(None) => Err(ClientError::refused(format!("no VM {name_or_id:?}"), true)),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// Ask for a run state (start = Running, pause = Paused, stop = Stopped); the VM's host
    /// applies it within a moment.
    pub async fn set_vm_state(&self, vm: VmId, desired: VmRunState) -> Result<VmRecord, ClientError> {
        match self.vm_command(ClientVmCommand::SetDesired { vm, desired }).await? {
            VmOutcome::Vm(v) => Ok(v),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// Attach `volume` as a disk of `vm` (snapshotted and rolled back with it by plans).
    pub async fn attach_volume(&self, vm: VmId, volume: haven_proto::VolumeId) -> Result<VmRecord, ClientError> {
        match self.vm_command(ClientVmCommand::AttachVolume { vm, volume }).await? {
            VmOutcome::Vm(v) => Ok(v),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// Detach `volume` from `vm`.
    pub async fn detach_volume(&self, vm: VmId, volume: haven_proto::VolumeId) -> Result<VmRecord, ClientError> {
        match self.vm_command(ClientVmCommand::DetachVolume { vm, volume }).await? {
            VmOutcome::Vm(v) => Ok(v),
            other => Err(ClientError::unexpected(other)),
        }
    }

    pub async fn delete_vm(&self, vm: VmId) -> Result<(), ClientError> {
        self.vm_command(ClientVmCommand::Delete { vm }).await.map(|_| ())
    }

    pub async fn vm_status(&self, vm: VmId) -> Result<VmStatus, ClientError> {
        match self.vm_request(VmRequest::Status { vm }).await? {
            VmResponse::Status(s) => Ok(s),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// Verify the guest on its host: every written page intact and the last write present; on
    /// every disk, every acknowledged write present and nothing the guest did not write.
    pub async fn vm_check(&self, vm: VmId) -> Result<VmCheck, ClientError> {
        match self.vm_request(VmRequest::Check { vm }).await? {
            VmResponse::Check { pages_written, max_seq, last_seq, disks } => {
                Ok(VmCheck { pages_written, max_seq, last_seq, disks })
            }
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// Start a live migration to `to`; follow it with [`Self::migration_progress`].
    pub async fn migrate_vm(
        &self,
        vm: VmId,
        to: NodeId,
        options: MigrationOptions,
    ) -> Result<MigrationReport, ClientError> {
        match self.vm_request(VmRequest::Migrate { vm, to, options, plan: None }).await? {
            VmResponse::Migration(r) => Ok(r),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// The migration under way or the last one, as the source host reports it.
    pub async fn migration_progress(&self, vm: VmId) -> Result<MigrationReport, ClientError> {
        match self.vm_request(VmRequest::MigrationProgress { vm }).await? {
            VmResponse::Migration(r) => Ok(r),
            other => Err(ClientError::unexpected(other)),
        }
    }

    pub async fn cancel_migration(&self, vm: VmId) -> Result<(), ClientError> {
        self.vm_request(VmRequest::CancelMigration { vm }).await.map(|_| ())
    }

    /// Set `key` of the VM's application state (`None`: delete it). Answered once the update is
    /// released: in an HA pair, once the standby holds it. Returns the update's output sequence.
    pub async fn app_put(&self, vm: VmId, key: &str, value: Option<Vec<u8>>) -> Result<u64, ClientError> {
        validate_app_entry(key, value.as_deref().unwrap_or_default()).map_err(|m| ClientError::refused(m, false))?;
        match self.vm_request(VmRequest::AppPut { vm, key: key.into(), value }).await? {
            VmResponse::AppPut { seq } => Ok(seq),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// The VM's application state as its primary holds it.
    pub async fn app_get(&self, vm: VmId) -> Result<AppView, ClientError> {
        match self.vm_request(VmRequest::AppGet { vm }).await? {
            VmResponse::App(a) => Ok(a),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// The VM's HA pair as host `at` sees it (`None`: the VM's host): its role, generation,
    /// checkpoint or update mirroring, and released outputs.
    pub async fn ha_status(&self, vm: VmId, at: Option<NodeId>) -> Result<HaVmStatus, ClientError> {
        match self.vm_request(VmRequest::HaStatus { vm, at }).await? {
            VmResponse::Ha(s) => Ok(s),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// Each host's VM memory capacity and the memory its VMs use (MiB).
    pub async fn vm_capacity(&self) -> Result<Vec<(HostCapacity, u64)>, ClientError> {
        match self.vm_query(VmQuery::Capacity).await? {
            VmQueryResult::Capacity(c) => Ok(c),
            other => Err(ClientError::unexpected(other)),
        }
    }
}
