//! The VM vocabulary: what the catalog records about virtual machines and host capacity
//! ([`VmRecord`], [`HostCapacity`]), the catalog commands that change it ([`VmCommand`]), and what
//! clients ask of a VM ([`VmRequest`]), answered by the VM actor on the VM's host. Host drain
//! marks live here too (`SetDraining`); group migration plans are in [`crate::plan`].
//!
//! Names and sizes are checked by `validate` before anything is proposed. No I/O here.

use rkyv::{Archive, Deserialize, Serialize};

use crate::ids::{NodeId, VmId, VolumeId};
use crate::plan::{GroupRequest, GroupResponse};

/// Guest page size.
pub const VM_PAGE_SIZE: u64 = 4096;
/// Largest guest (64 GiB).
pub const MAX_VM_MEMORY_MIB: u64 = 64 << 10;

/// How the guest's workload picks pages to write.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum WorkloadKind {
    Uniform,
    /// Most writes land in the first `hot_pages` pages.
    HotSet {
        hot_pages: u64,
    },
    Sequential,
}

/// What the operator wants the VM to be doing.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum VmRunState {
    Stopped,
    Running,
    Paused,
}

/// A VM as the catalog records it. Invariant: the VM runs only on `host`; a migration moves
/// `host` in one `CommitMigration` command (which bumps `generation`) while the source is paused.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct VmRecord {
    pub id: VmId,
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub workload: WorkloadKind,
    /// Page writes per second the guest's workload aims at.
    pub dirty_pages_per_sec: u64,
    /// Block writes per second the guest's workload aims at, spread over its disks.
    pub disk_writes_per_sec: u64,
    pub host: NodeId,
    pub desired: VmRunState,
    pub generation: u64,
    /// The migration under way, if any.
    pub migrating_to: Option<NodeId>,
    /// The VM's disks: a migration plan's recovery snapshot snapshots them with the group's
    /// memory, and failing back to it rolls them back.
    pub volumes: Vec<VolumeId>,
}

/// Most volumes attached to one VM.
pub const MAX_VM_VOLUMES: usize = 16;
/// Highest disk write rate a guest's workload may aim at.
pub const MAX_DISK_WRITES_PER_SEC: u64 = 100_000;

impl VmRecord {
    pub fn memory_pages(&self) -> u64 {
        self.memory_mib * (1 << 20) / VM_PAGE_SIZE
    }
}

/// Memory a host offers to VMs.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct HostCapacity {
    pub host: NodeId,
    pub memory_mib: u64,
}

/// A catalog change about VMs (a variant of `CatalogCommand`).
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum VmCommand {
    /// Create a VM; placed on `host` if given (refused if it lacks room), else on the host with
    /// the most free memory that fits it (ties by id).
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
    SetCapacity(HostCapacity),
    /// Record that a migration to `to` started (refused if one is under way, `to` lacks room or
    /// is draining, or the VM is in a plan other than `plan`). A plan failing back may move its
    /// VMs home to a draining source.
    BeginMigration {
        vm: VmId,
        to: NodeId,
        plan: Option<u64>,
    },
    /// Move the VM to `to` (the destination holds its memory; the source is paused). Bumps the
    /// generation; refused unless the VM is still at `expected_generation` and migrating to `to`.
    CommitMigration {
        vm: VmId,
        expected_generation: u64,
        to: NodeId,
    },
    /// The migration ended without moving the VM (failed or cancelled).
    AbortMigration {
        vm: VmId,
    },
    /// Attach a volume as one of the VM's disks (refused while the VM migrates or is in a plan).
    AttachVolume {
        vm: VmId,
        volume: VolumeId,
    },
    /// Detach a volume (refused while the VM migrates or is in a plan).
    DetachVolume {
        vm: VmId,
        volume: VolumeId,
    },
    /// Mark a host draining (no VM is placed on it or migrated to it) or clear the mark.
    SetDraining {
        host: NodeId,
        draining: bool,
    },
}

fn name_ok(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err("VM name must be 1..=128 bytes".into());
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(format!("VM name {name:?} may contain only letters, digits, '-', '_' and '.'"));
    }
    if name.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("VM name {name:?} must not be all digits (it would read as an id)"));
    }
    Ok(())
}

impl VmCommand {
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Create { name, memory_mib, vcpus, disk_writes_per_sec, .. } => {
                name_ok(name)?;
                if *disk_writes_per_sec > MAX_DISK_WRITES_PER_SEC {
                    return Err(format!(
                        "{disk_writes_per_sec} disk writes per second: at most {MAX_DISK_WRITES_PER_SEC}"
                    ));
                }
                if *memory_mib == 0 || *memory_mib > MAX_VM_MEMORY_MIB {
                    return Err(format!("memory {memory_mib} MiB must be in 1..={MAX_VM_MEMORY_MIB}"));
                }
                if *vcpus == 0 || *vcpus > 256 {
                    return Err(format!("{vcpus} vCPUs: must be 1..=256"));
                }
                Ok(())
            }
            Self::SetCapacity(c) if c.memory_mib > 1 << 30 => Err("capacity too large".into()),
            _ => Ok(()),
        }
    }
}

/// What applying a [`VmCommand`] did.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum VmOutcome {
    Vm(VmRecord),
    Done,
    Refused { reason: String, not_found: bool },
}

/// Reads of the VM tables.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum VmQuery {
    Vms,
    /// By id (`vm-3` or `3`) or name.
    Vm {
        name_or_id: String,
    },
    Capacity,
    /// Hosts marked draining.
    Draining,
}

#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum VmQueryResult {
    Vms(Vec<VmRecord>),
    Vm(Option<VmRecord>),
    /// Each host's capacity and the memory its VMs use (or that plans reserve there).
    Capacity(Vec<(HostCapacity, u64)>),
    Draining(Vec<NodeId>),
}

/// Migration settings a client may choose.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct MigrationOptions {
    pub max_downtime_ms: u64,
    pub auto_converge: bool,
    /// Cap on the migration stream's rate in bytes per second (0 = as fast as the link goes).
    pub max_bandwidth_bytes_per_sec: u64,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        Self { max_downtime_ms: 50, auto_converge: true, max_bandwidth_bytes_per_sec: 0 }
    }
}

/// A request about a running VM, answered by the VM actor on its host.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum VmRequest {
    /// Live state: run state, workload counters, memory digest.
    Status { vm: VmId },
    /// Verify the guest's memory (every written page intact, the last write present) and its
    /// disks (every acknowledged disk write present, nothing the guest did not write).
    Check { vm: VmId },
    /// Live-migrate to `to` (on behalf of migration plan `plan`, if any).
    Migrate { vm: VmId, to: NodeId, options: MigrationOptions, plan: Option<u64> },
    /// Progress of the migration under way (or the last one).
    MigrationProgress { vm: VmId },
    /// Cancel the migration under way; the VM keeps running at the source.
    CancelMigration { vm: VmId },
    /// Set `key` of the VM's application state (its HA-mirrored key-value document; `None`
    /// deletes). Answered once the update is released: in an HA pair, only after the standby
    /// holds it (the epoch that holds it, or the update itself).
    AppPut { vm: VmId, key: String, value: Option<Vec<u8>> },
    /// The VM's application state as its primary holds it.
    AppGet { vm: VmId },
    /// The HA pair's state on the asked host (`at`: that host; `None`: the VM's host).
    HaStatus { vm: VmId, at: Option<NodeId> },
}

impl VmRequest {
    pub fn vm(&self) -> VmId {
        match self {
            Self::Status { vm }
            | Self::Check { vm }
            | Self::Migrate { vm, .. }
            | Self::MigrationProgress { vm }
            | Self::CancelMigration { vm }
            | Self::AppPut { vm, .. }
            | Self::AppGet { vm }
            | Self::HaStatus { vm, .. } => *vm,
        }
    }
}

/// A VM's live state on its host.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct VmStatus {
    pub vm: VmId,
    pub host: NodeId,
    /// `created`, `running`, `paused`, `stopped`.
    pub state: String,
    pub writes: u64,
    pub last_seq: u64,
    pub throttle_percent: u8,
    /// blake3 of all guest memory, hex.
    pub digest: String,
    /// Where the guest's memory came from on this host: `booted` (fresh memory: created here,
    /// or the host restarted), `migrated` or `restored` (from a recovery snapshot).
    pub origin: String,
}

/// A migration's progress or result as the source reports it.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq, Default,
)]
#[rkyv(derive(Debug))]
pub struct MigrationReport {
    /// `precopy`, `converging`, `stop_and_copy`, `done`, `failed`, `cancelled`.
    pub phase: String,
    pub to: Option<NodeId>,
    pub round: u32,
    pub bytes_sent: u64,
    pub bytes_remaining: u64,
    pub dirty_pages_per_sec: u64,
    pub bandwidth_bytes_per_sec: u64,
    pub eta_ms: u64,
    pub expected_downtime_ms: u64,
    pub throttle_percent: u8,
    /// When done: measured pause (source paused → destination ready).
    pub downtime_ms: Option<u64>,
    pub total_ms: Option<u64>,
    /// Why it failed or was cancelled.
    pub reason: Option<String>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum VmResponse {
    Status(VmStatus),
    Check {
        pages_written: u64,
        max_seq: u64,
        last_seq: u64,
        /// One entry per disk the guest writes.
        disks: Vec<DiskCheckReport>,
    },
    Migration(MigrationReport),
    Done,
    /// Answer to a [`VmMessage::Group`].
    Group(GroupResponse),
    /// Answer to `AppPut`: the update's output sequence number.
    AppPut {
        seq: u64,
    },
    App(crate::ha::AppView),
    Ha(crate::ha::HaVmStatus),
}

/// What checking one of a guest's disks verified.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct DiskCheckReport {
    pub volume: VolumeId,
    /// Blocks holding a write of the guest's current write stream.
    pub blocks_written: u64,
    /// Disk writes acknowledged when the check began (every one verified present or superseded).
    pub acked: u64,
    /// Disk writes issued when the check ended (nothing later found on the disk).
    pub issued: u64,
}

/// Messages to VM actors (one per VM on its host).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum VmMessage {
    Client(VmRequest),
    /// Source → destination host agent: open this bulk stream as the incoming migration of
    /// `vm` (sent as the first envelope of the stream).
    IncomingMigration {
        vm: VmId,
        generation: u64,
    },
    /// Source → destination: the catalog now places the VM with you; start it. Carries the
    /// migration's final report so the new host can answer progress queries.
    ResumeMigrated {
        vm: VmId,
        report: MigrationReport,
    },
    /// Leader's plan controller → a host agent: a group operation on that host's VMs.
    Group(GroupRequest),
}
