//! The volume side of one node: keeps a device actor (and its [`VolumeReplica`] engine) for
//! every volume this host holds a replica or an async copy of, in step with the catalog, and
//! routes client and NBD requests to each volume's primary — except reads, which a replica here
//! that is in sync and holds a read lease serves from this host's copy (`core::lease` says why
//! that never returns data older than an acknowledged write).
//!
//! Routing retries while a volume fails over: a request refused with `NotPrimary` or failing to
//! reach the primary is retried against whatever primary the catalog names next, for up to
//! `failover_wait_ms`. Only requests whose repetition is harmless are retried after an unknown
//! outcome (writes of whole blocks are: writing the same bytes twice leaves the same volume).
//! This module must not decide failover (the leader's volume controller does).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use actix::Actor;
use haven_proto::volume::{DeviceMessage, DeviceReply, RelationshipState, VolumeRecord, VolumeRequest, VolumeResponse};
use haven_proto::{ActorAddr, ActorKind, ActorMessage, ActorReply, ErrorCode, NodeId, VolumeId};
use tracing::{debug, info, warn};

use super::blockstore::BlockStore;
use super::error::VolumeError;
use super::replica::{zero_pieces, VolumeReplica};
use crate::actors::device::DeviceActor;
use crate::actors::ActorRegistry;
use crate::cluster::Proposer;
use crate::config::VolumeTunables;
use crate::storage::Store;

/// Most blocks one routed zeroing request covers: a few range writes' worth, so even one whose
/// every block holds data is answered well within the request timeout.
pub const ZERO_BLOCKS_PER_ROUTED_REQUEST: u64 = 8 * haven_proto::limits::MAX_ZERO_BLOCKS_PER_MESSAGE;

/// A running device: the engine and its actor's address.
type Device = (Arc<VolumeReplica>, actix::Addr<DeviceActor>);

/// What each replica holds of the cluster and of its host: catalog reads, proposals, messages
/// to other hosts' devices, a way to wake the host's lease loop, and (for a copy into another
/// volume) the host itself, weakly.
#[derive(Clone)]
pub struct VolumeCtx {
    /// The control database, for catalog reads. Blocks live in the host's [`BlockStore`] (its own
    /// database, see `storage`): syncing this one makes no block write durable.
    pub store: Store,
    pub proposer: Proposer,
    pub registry: ActorRegistry,
    /// Wakes [`VolumeHost::renew_read_leases`] (a replica that became primary wants a lease now).
    pub(crate) lease_wake: Arc<tokio::sync::Notify>,
    host: Weak<VolumeHost>,
}

impl VolumeCtx {
    /// This node's volume host (for requests routed to another volume's primary).
    pub(crate) fn host(&self) -> Result<Arc<VolumeHost>, VolumeError> {
        self.host.upgrade().ok_or_else(|| VolumeError::unavailable("the volume host is shutting down"))
    }
}

/// This node's volumes.
pub struct VolumeHost {
    pub node: NodeId,
    ctx: VolumeCtx,
    blocks: BlockStore,
    pub tunables: VolumeTunables,
    engines: Mutex<HashMap<VolumeId, Device>>,
}

impl VolumeHost {
    pub fn new(
        node: NodeId,
        store: Store,
        block_db: Store,
        proposer: Proposer,
        registry: ActorRegistry,
        tunables: VolumeTunables,
    ) -> Result<Arc<Self>, VolumeError> {
        let blocks = BlockStore::open(block_db).map_err(VolumeError::internal)?;
        blocks.start_gc().map_err(|e| VolumeError::internal(format!("starting the extent collector: {e}")))?;
        Ok(Arc::new_cyclic(|host| Self {
            node,
            ctx: VolumeCtx { store, proposer, registry, lease_wake: Arc::default(), host: host.clone() },
            blocks,
            tunables,
            engines: Mutex::new(HashMap::new()),
        }))
    }

    /// The catalog, as this node has applied it.
    pub fn store(&self) -> &Store {
        &self.ctx.store
    }

    pub fn engine(&self, vol: VolumeId) -> Option<Arc<VolumeReplica>> {
        self.engines.lock().expect("engines lock").get(&vol).map(|(e, _)| e.clone())
    }

    /// Keep device actors in step with the catalog until the node shuts down. Must run on the
    /// actix system's thread (it starts actors).
    pub async fn run(self: Arc<Self>) {
        let poll = Duration::from_millis(self.tunables.catalog_poll_ms);
        let mut last_tick = Instant::now();
        loop {
            if let Err(e) = self.reconcile().await {
                warn!(error = %e, "volume reconcile failed");
            }
            if last_tick.elapsed() >= Duration::from_millis(self.tunables.resync_retry_ms) {
                last_tick = Instant::now();
                for e in self.engines.lock().expect("engines lock").values().map(|(e, _)| e.clone()) {
                    super::resync::tick(&e);
                    e.publish_lag();
                }
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Ask the leader for read leases every quarter lease (and at once when a replica became
    /// primary, or in sync at a new epoch) until the node shuts down, and hand each grant to its
    /// replica. A request that fails leaves the leases to run out: a primary's reads then wait
    /// for a renewal or a failover, a replica's go to the primary. A host holding no in-sync
    /// replica does not ask (it needs no lease, and the leader then has no request of it to
    /// wait out).
    pub async fn renew_read_leases(self: Arc<Self>) {
        let every = Duration::from_millis(self.tunables.read_lease_ms / 4);
        loop {
            let asked_at = Instant::now();
            let serving = self.engines.lock().expect("engines lock").values().any(|(e, _)| e.wants_read_lease());
            if serving {
                match self.ctx.proposer.read_leases().await {
                    Ok(in_sync) => {
                        for (vol, epoch) in in_sync {
                            if let Some(e) = self.engine(vol) {
                                e.lease_granted(epoch, asked_at);
                            }
                        }
                    }
                    Err(e) => debug!(error = %e, "read lease request failed"),
                }
            }
            let wait = every.saturating_sub(asked_at.elapsed());
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.ctx.lease_wake.notified() => {}
            }
        }
    }

    async fn reconcile(&self) -> Result<(), VolumeError> {
        let store = &self.ctx.store;
        let volumes = crate::catalog::volumes::volumes(store).map_err(VolumeError::internal)?;
        let rels = crate::catalog::volumes::relationships(store).map_err(VolumeError::internal)?;
        let mut wanted: HashMap<VolumeId, (VolumeRecord, Vec<(NodeId, u64)>)> = HashMap::new();
        for v in volumes {
            let targets: Vec<(NodeId, u64)> = rels
                .iter()
                .filter(|r| r.volume == v.id && r.state == RelationshipState::Active)
                .map(|r| (r.target, r.max_lag_bytes))
                .collect();
            let holds =
                v.replicas.contains(&self.node) || rels.iter().any(|r| r.volume == v.id && r.target == self.node);
            if holds {
                wanted.insert(v.id, (v, targets));
            }
        }
        // Stop and delete what we no longer hold.
        let gone: Vec<VolumeId> =
            self.engines.lock().expect("engines lock").keys().filter(|id| !wanted.contains_key(id)).copied().collect();
        for id in gone {
            if let Some((_, addr)) = self.engines.lock().expect("engines lock").remove(&id) {
                self.ctx.registry.unregister(&ActorAddr { node: self.node, kind: ActorKind::Device, id: id.0 });
                drop(addr);
            }
            let blocks = self.blocks.clone();
            tokio::task::spawn_blocking(move || blocks.delete_volume(id))
                .await
                .map_err(VolumeError::internal)?
                .map_err(VolumeError::internal)?;
            info!(vol = %id, "volume removed from this host");
        }
        for (id, (record, targets)) in wanted {
            let engine = match self.engine(id) {
                Some(e) => e,
                None => {
                    let engine = VolumeReplica::open(
                        self.node,
                        record.clone(),
                        self.ctx.clone(),
                        self.blocks.clone(),
                        self.tunables.clone(),
                    )?;
                    let actor = DeviceActor::new(engine.clone()).start();
                    self.ctx.registry.register(
                        ActorAddr { node: self.node, kind: ActorKind::Device, id: id.0 },
                        actor.clone().recipient(),
                    );
                    self.engines.lock().expect("engines lock").insert(id, (engine.clone(), actor));
                    info!(vol = %id, primary = %record.primary, "device actor started");
                    engine
                }
            };
            if record.size_bytes < engine.record().size_bytes {
                let (blocks, bs) = (self.blocks.clone(), record.block_size as u64);
                let size = record.size_bytes / bs;
                tokio::task::spawn_blocking(move || blocks.truncate(id, size))
                    .await
                    .map_err(VolumeError::internal)?
                    .map_err(VolumeError::internal)?;
            }
            // Observing may run a takeover that talks to other hosts; do not hold up the others,
            // and do not start a second one while one is under way.
            if !engine.observing.swap(true, std::sync::atomic::Ordering::SeqCst) {
                let e = engine.clone();
                tokio::spawn(async move {
                    e.observe(record, targets).await;
                    e.observing.store(false, std::sync::atomic::Ordering::SeqCst);
                });
            }
        }
        Ok(())
    }

    fn volume_record(&self, vol: VolumeId) -> Result<VolumeRecord, VolumeError> {
        crate::catalog::volumes::volume(&self.ctx.store, vol)
            .map_err(VolumeError::internal)?
            .ok_or_else(|| VolumeError::not_found(format!("no volume {vol}")))
    }

    /// Send `msg` to `vol`'s primary device, retrying across a failover.
    /// Boxed because it is recursive: a request handled here may route another one (a clone
    /// copying into a volume whose primary is also this host).
    pub fn route(
        &self,
        vol: VolumeId,
        msg: DeviceMessage,
        retry_unknown: bool,
    ) -> futures::future::BoxFuture<'_, Result<DeviceReply, VolumeError>> {
        Box::pin(async move {
            let deadline = Instant::now() + Duration::from_millis(self.tunables.failover_wait_ms);
            let mut backoff = Duration::from_millis(20);
            // Set once an attempt may have been carried out: whatever the last attempt says,
            // the request's outcome is then unknown, and the answer must say so.
            let mut maybe_applied = false;
            loop {
                // Fast path: this host serves as the volume's primary (no catalog read).
                let local = self.engine(vol).filter(|e| e.role().is_primary());
                let record = match local {
                    Some(_) => None,
                    None => Some(self.volume_record(vol)?),
                };
                let result = if let Some(e) = local {
                    e.handle(msg.clone()).await
                } else if let Some(record) = record.as_ref().filter(|r| r.primary == self.node) {
                    match self.engine(record.id) {
                        Some(e) => e.handle(msg.clone()).await,
                        None => Err(VolumeError::unavailable(format!("{vol} is not open on {} yet", self.node))),
                    }
                } else if let Some(record) = record {
                    let addr = ActorAddr { node: record.primary, kind: ActorKind::Device, id: vol.0 };
                    let timeout = self.ctx.proposer.request_timeout();
                    match self.ctx.registry.send_timeout(addr, ActorMessage::Device(msg.clone()), timeout).await {
                        Ok(ActorReply::Device(r)) => Ok(r),
                        Ok(other) => Err(VolumeError::internal(format!("device answered {other:?}"))),
                        Err(e) => Err(VolumeError::from(e)),
                    }
                } else {
                    Err(VolumeError::internal("no route to the primary"))
                };
                if let Err(e) = &result {
                    maybe_applied |= e.code() == ErrorCode::Timeout;
                }
                match result {
                    Err(e) if Instant::now() < deadline && retryable(&e, retry_unknown) => {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(250));
                    }
                    Err(e) if maybe_applied && e.code() != ErrorCode::Timeout => {
                        return Err(VolumeError::outcome_unknown(format!(
                            "outcome unknown: an earlier attempt may have been applied; last attempt: {}",
                            e.message()
                        )))
                    }
                    other => return other,
                }
            }
        })
    }

    /// A client's volume request, answered by the primary (a read, here if it may be).
    pub async fn client(&self, req: VolumeRequest) -> Result<VolumeResponse, VolumeError> {
        req.validate().map_err(VolumeError::invalid)?;
        if let VolumeRequest::Read { volume, offset, len, snapshot } = &req {
            if let Some(data) = self.read_here(*volume, *offset, *len, *snapshot).await? {
                return Ok(VolumeResponse::Data(data));
            }
        }
        let vol = req.volume();
        let retry = req.is_idempotent();
        match self.route(vol, DeviceMessage::Client(req), retry).await? {
            DeviceReply::Client(r) => Ok(r),
            other => Err(VolumeError::internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Write whole blocks of `vol` through its primary (`data: None` = zero `len` bytes).
    pub async fn write_to(&self, vol: VolumeId, offset: u64, data: Vec<u8>, durable: bool) -> Result<u64, VolumeError> {
        let len = data.len() as u32;
        self.write_blocks(vol, offset, Some(data), len, durable).await
    }

    /// A guest write of `writer` at HA generation `generation` (see `DeviceMessage::FencedWrite`).
    pub async fn write_fenced(
        &self,
        vol: VolumeId,
        offset: u64,
        data: Vec<u8>,
        writer: haven_proto::VmId,
        generation: u64,
    ) -> Result<u64, VolumeError> {
        let msg = DeviceMessage::FencedWrite { volume: vol, offset, data, writer, generation };
        match self.route(vol, msg, true).await? {
            DeviceReply::Applied { seq } => Ok(seq),
            other => Err(VolumeError::internal(format!("unexpected reply {other:?}"))),
        }
    }

    pub async fn write_blocks(
        &self,
        vol: VolumeId,
        offset: u64,
        data: Option<Vec<u8>>,
        len: u32,
        durable: bool,
    ) -> Result<u64, VolumeError> {
        match self.route(vol, DeviceMessage::WriteBlocks { volume: vol, offset, data, len, durable }, true).await? {
            DeviceReply::Applied { seq } => Ok(seq),
            other => Err(VolumeError::internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Zero `block_count` blocks from `first_block` of `vol` through its primary (TRIM,
    /// WRITE_ZEROES), as requests of at most [`ZERO_BLOCKS_PER_ROUTED_REQUEST`] blocks (the primary
    /// orders each as range writes), so each routed request finishes well within the request
    /// timeout whatever the data in it. Retried across a failover: zeroing again is harmless.
    pub async fn zero_blocks(
        &self,
        vol: VolumeId,
        first_block: u64,
        block_count: u64,
        durable: bool,
    ) -> Result<u64, VolumeError> {
        let mut last = None;
        for (first_block, block_count) in zero_pieces(first_block, block_count, ZERO_BLOCKS_PER_ROUTED_REQUEST) {
            let msg = DeviceMessage::ZeroBlocks { volume: vol, first_block, block_count, durable };
            last = Some(match self.route(vol, msg, true).await? {
                DeviceReply::Applied { seq } => seq,
                other => return Err(VolumeError::internal(format!("unexpected reply {other:?}"))),
            });
        }
        last.ok_or_else(|| VolumeError::invalid(format!("zeroing no blocks of {vol}")))
    }

    pub async fn read_from(
        &self,
        vol: VolumeId,
        offset: u64,
        len: u32,
        snapshot: Option<u64>,
    ) -> Result<Vec<u8>, VolumeError> {
        match self.client(VolumeRequest::Read { volume: vol, offset, len, snapshot }).await? {
            VolumeResponse::Data(d) => Ok(d),
            other => Err(VolumeError::internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Serve a read from this host's replica when it is in sync under a read lease and not the
    /// primary (a primary serves it through [`Self::route`]); `None`: route it.
    async fn read_here(
        &self,
        vol: VolumeId,
        offset: u64,
        len: u32,
        snapshot: Option<u64>,
    ) -> Result<Option<Vec<u8>>, VolumeError> {
        if !self.tunables.local_reads {
            return Ok(None);
        }
        match self.engine(vol) {
            Some(e) if !e.role().is_primary() => e.read_here(offset, len, snapshot).await,
            _ => Ok(None),
        }
    }

    pub async fn flush(&self, vol: VolumeId) -> Result<(), VolumeError> {
        self.route(vol, DeviceMessage::Flush { volume: vol }, true).await.map(|_| ())
    }
}

/// Whether a failed routed request may be tried again against a (possibly new) primary.
fn retryable(e: &VolumeError, retry_unknown: bool) -> bool {
    match e.code() {
        ErrorCode::NotPrimary | ErrorCode::NotLeader | ErrorCode::NoLeader => true,
        // The new primary's device actor is not started yet.
        ErrorCode::NotFound => e.message().starts_with("no actor"),
        // Unavailable: the primary could not be reached, or refused part-way through a
        // multi-step request; Timeout: the outcome is unknown. Either is retried only when
        // repeating the request is harmless.
        ErrorCode::Unavailable | ErrorCode::Timeout => retry_unknown,
        _ => false,
    }
}
