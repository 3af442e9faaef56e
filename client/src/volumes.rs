//! The SDK's volume API: create, resize, delete and list volumes; read and write blocks;
//! snapshots (take, list, delete, roll back, clone, verify, repair); labeled snapshot policies;
//! asynchronous relationships; replication progress and events.
//!
//! Catalog changes go through Raft (`ClientRequest::Write`); data and snapshot requests go to the
//! volume's primary through any node (`ClientRequest::Volume`). Refusals come back as
//! [`ClientError::Server`] with a clear message.

use haven_proto::volume::{
    IntegrityVerdict, PreservedWrites, Relationship, RelationshipState, ReplicaProgress, SnapshotKind, SnapshotPolicy,
    SnapshotRecord, VolumeEvent, VolumeOutcome, VolumeQuery, VolumeQueryResult, VolumeRecord, VolumeRequest,
    VolumeResponse, DEFAULT_BLOCK_SIZE,
};
use haven_proto::{
    CatalogQuery, ClientCommand, ClientRequest, ClientResponse, ClientVolumeCommand, CommandOutcome, ErrorCode, NodeId,
    QueryResult, VolumeId,
};

use crate::error::ClientError;
use crate::HavenClient;

/// What `create_volume` needs.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    pub name: String,
    pub size_bytes: u64,
    pub block_size: u32,
    pub replicas: u8,
    /// Place on these hosts (first = primary) instead of letting the leader choose.
    pub hosts: Vec<NodeId>,
}

impl VolumeSpec {
    pub fn new(name: impl Into<String>, size_bytes: u64, replicas: u8) -> Self {
        Self { name: name.into(), size_bytes, block_size: DEFAULT_BLOCK_SIZE, replicas, hosts: Vec::new() }
    }
}

/// Replication progress as the primary reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplicationStatus {
    pub epoch: u64,
    pub primary: NodeId,
    pub next_seq: u64,
    pub replicas: Vec<ReplicaProgress>,
}

impl HavenClient {
    async fn volume_command(&self, cmd: ClientVolumeCommand) -> Result<VolumeOutcome, ClientError> {
        match self.write(ClientCommand::Volume(cmd)).await? {
            (_, CommandOutcome::Volume(VolumeOutcome::Refused { reason, not_found })) => {
                Err(ClientError::refused(reason, not_found))
            }
            (_, CommandOutcome::Volume(o)) => Ok(o),
            (_, other) => Err(ClientError::unexpected(other)),
        }
    }

    async fn volume_query(&self, q: VolumeQuery) -> Result<VolumeQueryResult, ClientError> {
        match self.read(CatalogQuery::Volume(q), true).await? {
            QueryResult::Volume(r) => Ok(r),
            other => Err(ClientError::unexpected(other)),
        }
    }

    async fn volume_request(&self, req: VolumeRequest) -> Result<VolumeResponse, ClientError> {
        match self.call(ClientRequest::Volume(req)).await? {
            ClientResponse::Volume(r) => Ok(r),
            other => Err(ClientError::unexpected(other)),
        }
    }

    pub async fn create_volume(&self, spec: &VolumeSpec) -> Result<VolumeRecord, ClientError> {
        self.create_volume_from(spec, None).await
    }

    async fn create_volume_from(
        &self,
        spec: &VolumeSpec,
        cloned_from: Option<(VolumeId, u64)>,
    ) -> Result<VolumeRecord, ClientError> {
        let cmd = ClientVolumeCommand::Create {
            name: spec.name.clone(),
            size_bytes: spec.size_bytes,
            block_size: spec.block_size,
            replica_count: spec.replicas,
            hosts: spec.hosts.clone(),
            cloned_from,
        };
        cmd.validate().map_err(|m| ClientError::refused(m, false))?;
        match self.volume_command(cmd).await? {
            VolumeOutcome::Volume(v) => Ok(v),
            other => Err(ClientError::unexpected(other)),
        }
    }

    pub async fn volumes(&self) -> Result<Vec<VolumeRecord>, ClientError> {
        match self.volume_query(VolumeQuery::Volumes).await? {
            VolumeQueryResult::Volumes(v) => Ok(v),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// A volume by name, `vol-N` or `N`; a clear `NotFound` error if there is none.
    pub async fn volume(&self, name_or_id: &str) -> Result<VolumeRecord, ClientError> {
        match self.volume_query(VolumeQuery::Volume { name_or_id: name_or_id.into() }).await? {
            VolumeQueryResult::Volume(Some(v)) => Ok(v),
            VolumeQueryResult::Volume(None) => Err(ClientError::refused(format!("no volume {name_or_id:?}"), true)),
            other => Err(ClientError::unexpected(other)),
        }
    }

    pub async fn resize_volume(&self, volume: VolumeId, size_bytes: u64) -> Result<VolumeRecord, ClientError> {
        match self.volume_command(ClientVolumeCommand::Resize { volume, size_bytes }).await? {
            VolumeOutcome::Volume(v) => Ok(v),
            other => Err(ClientError::unexpected(other)),
        }
    }

    pub async fn delete_volume(&self, volume: VolumeId) -> Result<(), ClientError> {
        self.volume_command(ClientVolumeCommand::Delete { volume }).await.map(|_| ())
    }

    /// Write whole blocks; returns the write-order point once durable on every in-sync replica.
    pub async fn write_volume(&self, volume: VolumeId, offset: u64, data: &[u8]) -> Result<u64, ClientError> {
        match self.volume_request(VolumeRequest::Write { volume, offset, data: data.to_vec() }).await? {
            VolumeResponse::Written { seq } => Ok(seq),
            other => Err(ClientError::unexpected(other)),
        }
    }

    pub async fn read_volume(
        &self,
        volume: VolumeId,
        offset: u64,
        len: u32,
        snapshot: Option<u64>,
    ) -> Result<Vec<u8>, ClientError> {
        match self.volume_request(VolumeRequest::Read { volume, offset, len, snapshot }).await? {
            VolumeResponse::Data(d) => Ok(d),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// Take a snapshot; with a label it is a labeled snapshot, compared across replicas at once.
    pub async fn snapshot(
        &self,
        volume: VolumeId,
        name: &str,
        label: Option<&str>,
    ) -> Result<SnapshotRecord, ClientError> {
        let kind = if label.is_some() { SnapshotKind::Labeled } else { SnapshotKind::User };
        let req = VolumeRequest::Snapshot { volume, name: name.into(), label: label.map(Into::into), kind };
        match self.volume_request(req).await? {
            VolumeResponse::Snapshot(s) => Ok(s),
            other => Err(ClientError::unexpected(other)),
        }
    }

    pub async fn snapshots(&self, volume: VolumeId) -> Result<Vec<SnapshotRecord>, ClientError> {
        match self.volume_query(VolumeQuery::Snapshots { volume }).await? {
            VolumeQueryResult::Snapshots(s) => Ok(s),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// A snapshot by name or id.
    pub async fn find_snapshot(&self, volume: VolumeId, name_or_id: &str) -> Result<SnapshotRecord, ClientError> {
        self.snapshots(volume)
            .await?
            .into_iter()
            .find(|s| s.name == name_or_id || s.id.to_string() == name_or_id)
            .ok_or_else(|| ClientError::refused(format!("{volume} has no snapshot {name_or_id:?}"), true))
    }

    pub async fn delete_snapshot(&self, volume: VolumeId, snapshot: u64) -> Result<(), ClientError> {
        self.volume_request(VolumeRequest::DeleteSnapshot { volume, snapshot }).await.map(|_| ())
    }

    pub async fn rollback(&self, volume: VolumeId, snapshot: u64) -> Result<(), ClientError> {
        self.volume_request(VolumeRequest::Rollback { volume, snapshot }).await.map(|_| ())
    }

    /// Clone a snapshot into a new volume named `name` (same size and replica count).
    pub async fn clone_snapshot(
        &self,
        volume: VolumeId,
        snapshot: u64,
        name: &str,
    ) -> Result<VolumeRecord, ClientError> {
        let src = self.volume(&volume.0.to_string()).await?;
        let spec = VolumeSpec {
            name: name.into(),
            size_bytes: src.size_bytes,
            block_size: src.block_size,
            replicas: src.replicas.len() as u8,
            hosts: Vec::new(),
        };
        let target = self.create_volume_from(&spec, Some((volume, snapshot))).await?;
        self.copy_into(volume, snapshot, target.id).await?;
        Ok(target)
    }

    /// Copy a snapshot into `target`. The source's primary looks `target` up in its own copy of
    /// the catalog, which may not have applied the target's creation yet: a `NotFound` naming
    /// the target is retried until the deadline (copying again is harmless).
    async fn copy_into(&self, volume: VolumeId, snapshot: u64, target: VolumeId) -> Result<(), ClientError> {
        let deadline = std::time::Instant::now() + self.deadline();
        let missing = format!("no volume {target}");
        loop {
            match self.volume_request(VolumeRequest::CopyInto { volume, snapshot, target }).await {
                Ok(_) => return Ok(()),
                Err(ClientError::Server(e))
                    if e.code == ErrorCode::NotFound
                        && e.message.contains(&missing)
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub async fn verify_snapshot(&self, volume: VolumeId, snapshot: u64) -> Result<IntegrityVerdict, ClientError> {
        match self.volume_request(VolumeRequest::Verify { volume, snapshot }).await? {
            VolumeResponse::Verdict(v) => Ok(v),
            other => Err(ClientError::unexpected(other)),
        }
    }

    pub async fn repair_snapshot(
        &self,
        volume: VolumeId,
        snapshot: u64,
        source: NodeId,
    ) -> Result<IntegrityVerdict, ClientError> {
        match self.volume_request(VolumeRequest::Repair { volume, snapshot, source }).await? {
            VolumeResponse::Verdict(v) => Ok(v),
            other => Err(ClientError::unexpected(other)),
        }
    }

    pub async fn replication_status(&self, volume: VolumeId) -> Result<ReplicationStatus, ClientError> {
        match self.volume_request(VolumeRequest::ReplicationStatus { volume }).await? {
            VolumeResponse::Replication { epoch, primary, next_seq, replicas } => {
                Ok(ReplicationStatus { epoch, primary, next_seq, replicas })
            }
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// The writes `host` preserved when it rolled back to rejoin.
    pub async fn preserved_writes(&self, volume: VolumeId, host: NodeId) -> Result<Vec<PreservedWrites>, ClientError> {
        match self.volume_request(VolumeRequest::Preserved { volume, host }).await? {
            VolumeResponse::Preserved(p) => Ok(p),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// FAULT INJECTION: overwrite a stored block on one host in place (integrity testing).
    pub async fn inject_corruption(
        &self,
        volume: VolumeId,
        host: NodeId,
        block: u64,
        data: Vec<u8>,
    ) -> Result<(), ClientError> {
        self.volume_request(VolumeRequest::InjectCorruption { volume, host, block, data }).await.map(|_| ())
    }

    pub async fn volume_events(&self, volume: Option<VolumeId>, limit: u32) -> Result<Vec<VolumeEvent>, ClientError> {
        match self.volume_query(VolumeQuery::Events { volume, limit }).await? {
            VolumeQueryResult::Events(e) => Ok(e),
            other => Err(ClientError::unexpected(other)),
        }
    }

    pub async fn put_policy(&self, policy: SnapshotPolicy) -> Result<SnapshotPolicy, ClientError> {
        match self.volume_command(ClientVolumeCommand::PutPolicy(policy)).await? {
            VolumeOutcome::Policy(p) => Ok(p),
            other => Err(ClientError::unexpected(other)),
        }
    }

    pub async fn policies(&self) -> Result<Vec<SnapshotPolicy>, ClientError> {
        match self.volume_query(VolumeQuery::Policies).await? {
            VolumeQueryResult::Policies(p) => Ok(p),
            other => Err(ClientError::unexpected(other)),
        }
    }

    pub async fn delete_policy(&self, name: &str) -> Result<(), ClientError> {
        self.volume_command(ClientVolumeCommand::DeletePolicy { name: name.into() }).await.map(|_| ())
    }

    /// Run a policy now: a labeled snapshot named `<label>-<n>`, compared across replicas.
    pub async fn run_policy(&self, name: &str) -> Result<SnapshotRecord, ClientError> {
        let policy = self
            .policies()
            .await?
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| ClientError::refused(format!("no policy {name:?}"), true))?;
        let n = self.snapshots(policy.volume).await?.len() + 1;
        let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let snap = self.snapshot(policy.volume, &format!("{}-{ms}-{n}", policy.label), Some(&policy.label)).await?;
        // Keep the newest `keep` snapshots carrying the label, as the scheduled runs do.
        let labeled: Vec<u64> = self
            .snapshots(policy.volume)
            .await?
            .into_iter()
            .filter(|s| s.label.as_deref() == Some(policy.label.as_str()))
            .map(|s| s.id)
            .collect();
        let excess = labeled.len().saturating_sub(policy.keep as usize);
        for id in labeled.into_iter().take(excess) {
            self.delete_snapshot(policy.volume, id).await?;
        }
        Ok(snap)
    }

    pub async fn create_relationship(
        &self,
        volume: VolumeId,
        target: NodeId,
        max_lag_bytes: u64,
    ) -> Result<Relationship, ClientError> {
        match self.volume_command(ClientVolumeCommand::CreateRelationship { volume, target, max_lag_bytes }).await? {
            VolumeOutcome::Relationship(r) => Ok(r),
            other => Err(ClientError::unexpected(other)),
        }
    }

    pub async fn set_relationship_state(&self, id: u64, state: RelationshipState) -> Result<Relationship, ClientError> {
        match self.volume_command(ClientVolumeCommand::SetRelationshipState { id, state }).await? {
            VolumeOutcome::Relationship(r) => Ok(r),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// Swap a relationship's direction: its async copy becomes the volume's primary once caught
    /// up (writes wait meanwhile), and the old primary receives the async copy.
    pub async fn reverse_relationship(&self, volume: VolumeId, id: u64) -> Result<(), ClientError> {
        self.volume_request(VolumeRequest::ReverseRelationship { volume, relationship: id }).await.map(|_| ())
    }

    pub async fn delete_relationship(&self, id: u64) -> Result<(), ClientError> {
        self.volume_command(ClientVolumeCommand::DeleteRelationship { id }).await.map(|_| ())
    }

    pub async fn relationships(&self) -> Result<Vec<Relationship>, ClientError> {
        match self.volume_query(VolumeQuery::Relationships).await? {
            VolumeQueryResult::Relationships(r) => Ok(r),
            other => Err(ClientError::unexpected(other)),
        }
    }
}
