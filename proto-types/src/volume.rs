//! The volume vocabulary: what the catalog records about replicated block volumes, their
//! snapshots, snapshot policies and asynchronous relationships ([`VolumeRecord`],
//! [`SnapshotRecord`], ...), the catalog commands that change it ([`VolumeCommand`]), what clients
//! ask of a volume ([`VolumeRequest`]) and what device actors say to each other
//! ([`DeviceMessage`]).
//!
//! Sizes and names are checked by [`VolumeCommand::validate`] and [`VolumeRequest::validate`]
//! before anything is proposed or executed. This module must stay free of I/O.

use rkyv::{Archive, Deserialize, Serialize};

use crate::ids::{NodeId, VolumeId};

/// Default block size of a new volume.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Largest volume (16 TiB).
pub const MAX_VOLUME_SIZE: u64 = 16 << 40;
/// Largest payload of one read or write request (well under the 16 MiB frame limit; the NBD
/// export advertises it as its maximum block size).
pub const MAX_IO_LEN: u32 = 8 << 20;
/// Largest volume, snapshot, policy or label name.
pub const MAX_NAME_LEN: usize = 128;

/// A replicated block volume as the catalog records it.
///
/// Invariants (kept by the catalog's apply): `primary ∈ in_sync ⊆ replicas`; `epoch` grows by one
/// on every change of `primary` or `in_sync`, and device actors refuse replication traffic from
/// an older epoch, so a deposed primary can never complete a write.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub name: String,
    pub size_bytes: u64,
    pub block_size: u32,
    /// Every host holding a replica.
    pub replicas: Vec<NodeId>,
    /// The host that orders and acknowledges writes.
    pub primary: NodeId,
    /// Replicas holding every acknowledged write; only these may be promoted.
    pub in_sync: Vec<NodeId>,
    pub epoch: u64,
    /// The snapshot this volume was cloned from, if any.
    pub cloned_from: Option<(VolumeId, u64)>,
}

impl VolumeRecord {
    pub fn size_blocks(&self) -> u64 {
        self.size_bytes / self.block_size as u64
    }
}

/// Why a snapshot exists.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum SnapshotKind {
    /// Asked for by a user.
    User,
    /// Made by a labeled snapshot policy; compared across replicas.
    Labeled,
    /// A recovery point taken by a plan (migration fail-back point).
    Recovery,
}

/// The result of comparing a snapshot's copies on two replicas.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum IntegrityVerdict {
    NotChecked,
    /// Every copy has the same Merkle root (hex).
    Match {
        root: String,
        hosts: Vec<NodeId>,
    },
    /// The copies on `hosts` differ at `blocks` (block numbers, ascending, at most 1024 listed).
    Mismatch {
        hosts: Vec<NodeId>,
        blocks: Vec<u64>,
        total_differing: u64,
    },
    /// `blocks` were copied from `source` onto the other copies, which now match.
    Repaired {
        source: NodeId,
        blocks: Vec<u64>,
    },
}

/// A snapshot: the view of a volume at write-order point `seq`, present on `hosts`.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct SnapshotRecord {
    pub volume: VolumeId,
    pub id: u64,
    pub name: String,
    /// The replication label of the policy that made it, if any.
    pub label: Option<String>,
    pub kind: SnapshotKind,
    /// Write-order point; 0 while the snapshot is still being taken.
    pub seq: u64,
    /// Hosts whose block store holds this snapshot.
    pub hosts: Vec<NodeId>,
    /// False until every host in `hosts` has recorded it.
    pub complete: bool,
    pub verdict: IntegrityVerdict,
    /// Merkle root per host (hex), as last computed.
    pub digests: Vec<(NodeId, String)>,
    /// Unix milliseconds when requested (from the requester's clock; informational).
    pub created_ms: u64,
}

/// A labeled snapshot policy (C9): snapshots of `volume` carrying `label`, every `interval_secs`
/// (0 = only on request), compared between primary and synchronous replica, newest `keep` kept.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct SnapshotPolicy {
    pub name: String,
    pub volume: VolumeId,
    pub label: String,
    pub interval_secs: u64,
    pub keep: u32,
}

/// State of an asynchronous relationship.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum RelationshipState {
    Active,
    Paused,
}

/// An asynchronous (DR) copy of `volume` on `target`, shipped in write order with bounded lag.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Relationship {
    pub id: u64,
    pub volume: VolumeId,
    /// Host holding the DR copy.
    pub target: NodeId,
    pub state: RelationshipState,
    /// Unshipped bytes above which the shipper stops queueing and falls back to a resync.
    pub max_lag_bytes: u64,
}

/// Something that happened to a volume that an operator should see.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct VolumeEvent {
    pub id: u64,
    pub volume: VolumeId,
    /// Short machine-readable kind: `failover`, `replica_out_of_sync`, `resync_done`,
    /// `divergent_writes_preserved`, `snapshot_mismatch`, `snapshot_repaired`, ...
    pub kind: String,
    pub message: String,
    pub host: Option<NodeId>,
}

/// A catalog change about volumes (a variant of `CatalogCommand`).
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum VolumeCommand {
    /// Create a volume; the catalog places it on the `replica_count` hosts holding the fewest
    /// replicas (ties by id), or on `hosts` when given. The first host is primary.
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
    /// Replace primary and in-sync set if the volume is still at `expected_epoch`; bumps the epoch.
    SetReplication {
        volume: VolumeId,
        expected_epoch: u64,
        primary: NodeId,
        in_sync: Vec<NodeId>,
    },
    /// Reserve a snapshot id (the record starts incomplete with seq 0).
    ReserveSnapshot {
        volume: VolumeId,
        name: String,
        label: Option<String>,
        kind: SnapshotKind,
        created_ms: u64,
    },
    /// Record where a reserved snapshot was taken.
    CompleteSnapshot {
        volume: VolumeId,
        id: u64,
        seq: u64,
        hosts: Vec<NodeId>,
    },
    DeleteSnapshot {
        volume: VolumeId,
        id: u64,
    },
    SetVerdict {
        volume: VolumeId,
        id: u64,
        verdict: IntegrityVerdict,
        digests: Vec<(NodeId, String)>,
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
    /// Swap roles: the async copy's host becomes the (single) primary and the old primary becomes
    /// the relationship's target. Only for a 1-replica volume still at `expected_epoch`.
    ReverseRelationship {
        id: u64,
        expected_epoch: u64,
    },
    Event {
        volume: VolumeId,
        kind: String,
        message: String,
        host: Option<NodeId>,
    },
}

fn name_ok(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("{what} name must be 1..={MAX_NAME_LEN} bytes"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(format!("{what} name {name:?} may contain only letters, digits, '-', '_' and '.'"));
    }
    if name.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("{what} name {name:?} must not be all digits (it would read as an id)"));
    }
    Ok(())
}

/// Check a volume size against a block size.
pub fn size_ok(size_bytes: u64, block_size: u32) -> Result<(), String> {
    if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
        return Err(format!("block size {block_size} must be a power of two in 512..=65536"));
    }
    if size_bytes == 0 || size_bytes > MAX_VOLUME_SIZE {
        return Err(format!("size {size_bytes} must be in 1..={MAX_VOLUME_SIZE} bytes"));
    }
    if !size_bytes.is_multiple_of(block_size as u64) {
        return Err(format!("size {size_bytes} is not a multiple of the block size {block_size}"));
    }
    Ok(())
}

impl VolumeCommand {
    /// Check names and sizes before the command is proposed.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Create { name, size_bytes, block_size, replica_count, hosts, .. } => {
                name_ok("volume", name)?;
                size_ok(*size_bytes, *block_size)?;
                if !(1..=3).contains(replica_count) {
                    return Err(format!("replica count {replica_count} must be 1, 2 or 3"));
                }
                if !hosts.is_empty() && hosts.len() != *replica_count as usize {
                    return Err(format!("{} hosts given for {replica_count} replicas", hosts.len()));
                }
                Ok(())
            }
            Self::Resize { size_bytes, .. } => {
                if *size_bytes == 0 || *size_bytes > MAX_VOLUME_SIZE {
                    return Err(format!("size {size_bytes} must be in 1..={MAX_VOLUME_SIZE} bytes"));
                }
                Ok(())
            }
            Self::ReserveSnapshot { name, label, .. } => {
                name_ok("snapshot", name)?;
                label.as_deref().map(|l| name_ok("label", l)).transpose()?;
                Ok(())
            }
            Self::PutPolicy(p) => {
                name_ok("policy", &p.name)?;
                name_ok("label", &p.label)?;
                if p.keep == 0 {
                    return Err("a policy must keep at least one snapshot".into());
                }
                Ok(())
            }
            Self::DeletePolicy { name } => name_ok("policy", name),
            Self::Event { kind, message, .. } => {
                if kind.len() > MAX_NAME_LEN || message.len() > 4096 {
                    return Err("event kind or message too long".into());
                }
                Ok(())
            }
            Self::SetReplication { in_sync, primary, .. } => {
                if !in_sync.contains(primary) {
                    return Err("the primary must be in the in-sync set".into());
                }
                Ok(())
            }
            Self::Delete { .. }
            | Self::CompleteSnapshot { .. }
            | Self::DeleteSnapshot { .. }
            | Self::SetVerdict { .. }
            | Self::CreateRelationship { .. }
            | Self::SetRelationshipState { .. }
            | Self::DeleteRelationship { .. }
            | Self::ReverseRelationship { .. } => Ok(()),
        }
    }
}

/// What applying a [`VolumeCommand`] did.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum VolumeOutcome {
    Volume(VolumeRecord),
    Snapshot(SnapshotRecord),
    Relationship(Relationship),
    Policy(SnapshotPolicy),
    /// Deleted (or recorded) with no record to return.
    Done,
    /// The command was refused; nothing changed. Deterministic on every replica.
    Refused {
        reason: String,
        not_found: bool,
    },
}

/// Reads of the volume tables.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum VolumeQuery {
    Volumes,
    /// By id (`vol-7` or `7`) or by name.
    Volume {
        name_or_id: String,
    },
    Snapshots {
        volume: VolumeId,
    },
    Policies,
    Relationships,
    Events {
        volume: Option<VolumeId>,
        limit: u32,
    },
}

/// Answers to a [`VolumeQuery`].
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum VolumeQueryResult {
    Volumes(Vec<VolumeRecord>),
    Volume(Option<VolumeRecord>),
    Snapshots(Vec<SnapshotRecord>),
    Policies(Vec<SnapshotPolicy>),
    Relationships(Vec<Relationship>),
    Events(Vec<VolumeEvent>),
}

/// A request a client makes of a volume's data or snapshots; any node routes it to the volume's
/// primary device actor.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum VolumeRequest {
    /// Write `data` at `offset` (both multiples of the block size). Acknowledged when durable
    /// (WAL fsynced) on every in-sync replica.
    Write {
        volume: VolumeId,
        offset: u64,
        data: Vec<u8>,
    },
    /// Read `len` bytes at `offset`, newest data or as of `snapshot`.
    Read {
        volume: VolumeId,
        offset: u64,
        len: u32,
        snapshot: Option<u64>,
    },
    /// Take a crash-consistent snapshot on every in-sync replica at one write-order point.
    Snapshot {
        volume: VolumeId,
        name: String,
        label: Option<String>,
        kind: SnapshotKind,
    },
    DeleteSnapshot {
        volume: VolumeId,
        snapshot: u64,
    },
    /// Return the volume to a snapshot's content on every in-sync replica (later snapshots go).
    Rollback {
        volume: VolumeId,
        snapshot: u64,
    },
    /// Compare the snapshot's copies (Merkle roots, then differing blocks) and record the verdict.
    Verify {
        volume: VolumeId,
        snapshot: u64,
    },
    /// Copy the differing blocks of a snapshot from `source`'s copy onto the others.
    Repair {
        volume: VolumeId,
        snapshot: u64,
        source: NodeId,
    },
    /// Copy a snapshot into an existing (new, empty) volume.
    CopyInto {
        volume: VolumeId,
        snapshot: u64,
        target: VolumeId,
    },
    /// Progress of replication and resync for each replica (asked of the primary).
    ReplicationStatus {
        volume: VolumeId,
    },
    /// FAULT INJECTION: overwrite a block's stored bytes on `host` in place (integrity tests).
    InjectCorruption {
        volume: VolumeId,
        host: NodeId,
        block: u64,
        data: Vec<u8>,
    },
    /// Writes the given replica host preserved when it rolled back to rejoin.
    Preserved {
        volume: VolumeId,
        host: NodeId,
    },
    /// Make the async copy of relationship `relationship` the primary (after it caught up with
    /// writes paused) and ship from there back to the old primary.
    ReverseRelationship {
        volume: VolumeId,
        relationship: u64,
    },
}

impl VolumeRequest {
    pub fn volume(&self) -> VolumeId {
        match self {
            Self::Write { volume, .. }
            | Self::Read { volume, .. }
            | Self::Snapshot { volume, .. }
            | Self::DeleteSnapshot { volume, .. }
            | Self::Rollback { volume, .. }
            | Self::Verify { volume, .. }
            | Self::Repair { volume, .. }
            | Self::CopyInto { volume, .. }
            | Self::ReplicationStatus { volume }
            | Self::InjectCorruption { volume, .. }
            | Self::Preserved { volume, .. }
            | Self::ReverseRelationship { volume, .. } => *volume,
        }
    }

    /// Short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Write { .. } => "write",
            Self::Read { .. } => "read",
            Self::Snapshot { .. } => "snapshot",
            Self::DeleteSnapshot { .. } => "delete_snapshot",
            Self::Rollback { .. } => "rollback",
            Self::Verify { .. } => "verify",
            Self::Repair { .. } => "repair",
            Self::CopyInto { .. } => "copy_into",
            Self::ReplicationStatus { .. } => "replication_status",
            Self::InjectCorruption { .. } => "inject_corruption",
            Self::Preserved { .. } => "preserved",
            Self::ReverseRelationship { .. } => "reverse_relationship",
        }
    }

    /// Whether repeating the request after an unknown outcome is harmless.
    pub fn is_idempotent(&self) -> bool {
        matches!(
            self,
            Self::Write { .. }
                | Self::Read { .. }
                | Self::Verify { .. }
                | Self::ReplicationStatus { .. }
                | Self::Preserved { .. }
                | Self::DeleteSnapshot { .. }
        )
    }

    /// Requests that change no data: reads, and checks that at most record what they find. An
    /// unknown outcome of one of these is nothing to report as indeterminate.
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Self::Read { .. } | Self::Verify { .. } | Self::ReplicationStatus { .. } | Self::Preserved { .. }
        )
    }

    /// Sizes checked before routing (alignment and range need the volume record).
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Write { data, .. } if data.is_empty() || data.len() > MAX_IO_LEN as usize => {
                Err(format!("write of {} bytes: must be 1..={MAX_IO_LEN}", data.len()))
            }
            Self::Read { len, .. } if *len == 0 || *len > MAX_IO_LEN => {
                Err(format!("read of {len} bytes: must be 1..={MAX_IO_LEN}"))
            }
            Self::Snapshot { name, label, .. } => {
                name_ok("snapshot", name)?;
                label.as_deref().map(|l| name_ok("label", l)).transpose()?;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// How a replica is doing, as the primary sees it.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct ReplicaProgress {
    pub host: NodeId,
    /// `in_sync`, `resyncing`, `stale`, `async`, `paused`.
    pub state: String,
    /// Highest write-order point this replica acknowledged.
    pub acked_seq: u64,
    pub lag_seq: u64,
    pub lag_bytes: u64,
    /// Age of the oldest unacknowledged write shipped to it (the recovery point objective), ms.
    pub lag_ms: u64,
    pub resync: Option<ResyncProgress>,
}

/// Progress of one resync.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq, Default,
)]
#[rkyv(derive(Debug))]
pub struct ResyncProgress {
    /// `common_snapshot` or `merkle`.
    pub mode: String,
    /// The common snapshot the resync started from.
    pub base_snapshot: Option<u64>,
    /// Write-order point the resync brings the replica to.
    pub target_seq: u64,
    pub blocks_total: u64,
    pub blocks_sent: u64,
    pub bytes_sent: u64,
    /// Blocks the replica had already received before an interruption.
    pub resumed_at_block: u64,
    pub done: bool,
}

/// The answer to a [`VolumeRequest`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum VolumeResponse {
    /// A write acknowledged at write-order point `seq`.
    Written {
        seq: u64,
    },
    Data(Vec<u8>),
    Snapshot(SnapshotRecord),
    Verdict(IntegrityVerdict),
    Replication {
        epoch: u64,
        primary: NodeId,
        next_seq: u64,
        replicas: Vec<ReplicaProgress>,
    },
    Preserved(Vec<PreservedWrites>),
    Done,
}

/// Writes a rejoining host had made after the newest common snapshot that never reached the
/// others, kept on that host rather than silently dropped.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct PreservedWrites {
    pub id: u64,
    pub host: NodeId,
    /// The common snapshot the host rolled back to.
    pub base_snapshot: Option<u64>,
    /// Blocks whose local content was preserved (ascending).
    pub blocks: Vec<u64>,
}

/// One block version carried between replicas.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct ReplicaBlock {
    pub block: u64,
    /// Write-order point that produced this version.
    pub seq: u64,
    /// `None` = zeroes (trim / write-zeroes).
    pub data: Option<Vec<u8>>,
}

/// Messages between device actors (one per volume per host).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum DeviceMessage {
    /// A client request delivered to the primary.
    Client(VolumeRequest),
    /// NBD-style I/O delivered to the primary: `durable` = FUA (fsync on every in-sync replica
    /// before the reply); otherwise the write is in every in-sync replica's WAL (safe against
    /// process crashes) and a later `Flush` makes it durable against power loss.
    WriteBlocks { volume: VolumeId, offset: u64, data: Option<Vec<u8>>, len: u32, durable: bool },
    /// Fsync every in-sync replica's WAL.
    Flush { volume: VolumeId },
    /// Primary → replica (or resyncing / async copy): opens the volume's replication stream. Sent
    /// only as the first envelope of a bulk stream flagged `STREAM`; the stream then carries
    /// [`crate::replication`] frames (writes, range zeroings, WAL syncs and their
    /// acknowledgements) until either side closes it.
    ReplicationStream { volume: VolumeId },
    /// Primary → replica: record snapshot `id` at `seq` (after every write ≤ seq was applied).
    SnapshotAt { volume: VolumeId, epoch: u64, id: u64, seq: u64 },
    /// Primary → replica: forget snapshot `id`.
    DropSnapshot { volume: VolumeId, epoch: u64, id: u64 },
    /// Primary → replica: roll back to `seq` (drop later versions and snapshots).
    RollbackTo { volume: VolumeId, epoch: u64, seq: u64 },
    /// New primary → in-sync replica: drop anything after `seq` (never acknowledged) and expect
    /// `seq + 1` next.
    Adopt { volume: VolumeId, epoch: u64, seq: u64 },
    /// Primary → rejoining replica: here are my snapshots; prepare to resync.
    ResyncPrepare { volume: VolumeId, epoch: u64, snapshots: Vec<(u64, u64)> },
    /// Primary → resyncing replica: block versions as of `target_seq`; `next_block` is the cursor
    /// to persist once they are durable.
    ResyncBlocks { volume: VolumeId, epoch: u64, target_seq: u64, blocks: Vec<ReplicaBlock>, next_block: u64 },
    /// Primary → resyncing replica: resync to `target_seq` is complete once the replica has
    /// applied every forwarded write up to `last_seq`.
    ResyncFinish { volume: VolumeId, epoch: u64, target_seq: u64, last_seq: u64 },
    /// Rejoining replica → primary: for each (block, seq), the hash of the primary's version of
    /// that block written at exactly that point (all zeroes when it has none): tells which of the
    /// rejoining host's writes reached the primary.
    VersionHashes { volume: VolumeId, versions: Vec<(u64, u64)> },
    /// Merkle chunk hashes of the view at snapshot `snapshot` (None = newest).
    MerkleChunks { volume: VolumeId, snapshot: Option<u64> },
    /// Per-block hashes of `chunk` at `snapshot`.
    ChunkHashes { volume: VolumeId, snapshot: Option<u64>, chunk: u64 },
    /// Read block versions at `snapshot` (None = newest).
    ReadVersions { volume: VolumeId, snapshot: Option<u64>, blocks: Vec<u64> },
    /// Write block contents into snapshot `snapshot`'s view and the newest view (repair).
    RepairBlocks { volume: VolumeId, snapshot: u64, blocks: Vec<ReplicaBlock> },
    /// Fault injection: overwrite a stored block in place.
    Corrupt { volume: VolumeId, block: u64, data: Vec<u8> },
    /// The host's preserved divergent writes.
    ListPreserved { volume: VolumeId },
    /// NBD TRIM / WRITE_ZEROES delivered to the primary: zero `block_count` blocks from
    /// `first_block` (any length the volume holds; the primary orders it as one or more range
    /// writes of at most [`MAX_ZERO_BLOCKS_PER_MESSAGE`](crate::limits::MAX_ZERO_BLOCKS_PER_MESSAGE)
    /// blocks each). `durable` as for `WriteBlocks`.
    ZeroBlocks { volume: VolumeId, first_block: u64, block_count: u64, durable: bool },
    /// A durable write by `writer`'s guest at HA pair generation `generation`: the primary
    /// refuses it (`Fenced`) once it took a write of `writer` at a newer generation, so a
    /// deposed primary's late write never lands over its successor's.
    FencedWrite { volume: VolumeId, offset: u64, data: Vec<u8>, writer: crate::ids::VmId, generation: u64 },
}

/// Checks a block range `[first_block, first_block + block_count)` against a volume of
/// `size_blocks` blocks: non-empty, no overflow, inside the volume. Returns the end block.
pub fn check_block_range(first_block: u64, block_count: u64, size_blocks: u64) -> Result<u64, String> {
    if block_count == 0 {
        return Err(format!("empty block range at block {first_block}"));
    }
    match first_block.checked_add(block_count) {
        Some(end) if end <= size_blocks => Ok(end),
        Some(end) => Err(format!("blocks {first_block}..{end} run past the end of the volume ({size_blocks} blocks)")),
        None => Err(format!("block range {first_block} + {block_count} overflows")),
    }
}

impl DeviceMessage {
    pub fn volume(&self) -> VolumeId {
        match self {
            Self::Client(r) => r.volume(),
            Self::WriteBlocks { volume, .. }
            | Self::FencedWrite { volume, .. }
            | Self::Flush { volume }
            | Self::ReplicationStream { volume }
            | Self::SnapshotAt { volume, .. }
            | Self::DropSnapshot { volume, .. }
            | Self::RollbackTo { volume, .. }
            | Self::Adopt { volume, .. }
            | Self::ResyncPrepare { volume, .. }
            | Self::ResyncBlocks { volume, .. }
            | Self::ResyncFinish { volume, .. }
            | Self::VersionHashes { volume, .. }
            | Self::MerkleChunks { volume, .. }
            | Self::ChunkHashes { volume, .. }
            | Self::ReadVersions { volume, .. }
            | Self::RepairBlocks { volume, .. }
            | Self::Corrupt { volume, .. }
            | Self::ListPreserved { volume }
            | Self::ZeroBlocks { volume, .. } => *volume,
        }
    }
}

/// Device actors' replies.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum DeviceReply {
    Client(VolumeResponse),
    /// Applied (and durable if asked) up to `seq`.
    Applied {
        seq: u64,
    },
    /// Resync can start: the newest common snapshot (id, seq) if any, and the persisted cursor of
    /// an interrupted resync (target seq, next block) if any.
    ResyncReady {
        common: Option<(u64, u64)>,
        resume: Option<(u64, u64)>,
    },
    Chunks {
        block_size: u32,
        size_blocks: u64,
        chunks: Vec<[u8; 32]>,
    },
    Hashes(Vec<[u8; 32]>),
    Versions(Vec<ReplicaBlock>),
    Done,
}
