//! The VM side of one node: runs the guests the catalog places here, applies their desired run
//! state, answers VM requests (routing them to the VM's host), and drives live migrations — as
//! source (over a QUIC bulk stream to the destination) and as destination.
//!
//! A VM never runs in two places: the source pauses the guest for stop-and-copy, the destination
//! verifies the memory digest, the catalog moves the VM (`CommitMigration`, a compare-and-set on
//! the VM's generation), and only then does the source stop its guest and the destination resume
//! its copy. If the commit does not happen, the source resumes and the destination drops its copy.
//! Whatever is interrupted, the catalog's `host` says which copy may run, and every node's
//! reconcile loop obeys it.
//!
//! Migration plans add two hooks (the group operations themselves live in [`super::group`]):
//! reconcile leaves the run state of VMs a group job holds alone, and does not boot a VM that a
//! plan failing back placed here to be restored from its recovery snapshot — the restore job
//! installs it from the image. Each local guest remembers the catalog generation it was
//! installed for, which is how a restore knows what it already replaced.
//!
//! Fencing ([`super::fence`]): while this host's lease is not valid (no recent quorum contact),
//! every running local guest is paused (checked each reconcile tick and before answering a
//! status request), and reconcile starts or resumes none; guest I/O paths check
//! [`VmHost::lease_valid`]. When contact returns, reconcile resumes what the catalog still
//! places here, and stops what it moved away.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Actor;
use haven_proto::plan::PlanState;
use haven_proto::vm::{
    HostCapacity, MigrationOptions, MigrationReport, VmCommand, VmMessage, VmOutcome, VmRecord, VmRequest, VmResponse,
    VmRunState, WorkloadKind,
};
use haven_proto::{
    ActorAddr, ActorKind, ActorMessage, ActorReply, Body, CatalogCommand, ClientResponse, CommandOutcome, ErrorCode,
    NodeId, VmId, WireError,
};
use tracing::{info, warn};

use super::disk::DiskWrite;
use super::error::VmError;
use super::fence::{FenceChange, HostLease};
use super::group::GroupState;
use super::guest::{GuestDriver, GuestSpec, RunState, SimulatedGuest, WorkloadPattern};
use super::migration::{self, CancelToken, MigrationConfig, MigrationProgress};
use crate::actors::vm::VmActor;
use crate::actors::ActorRegistry;
use crate::cluster::{Proposer, RaftView};
use crate::storage::Store;
use crate::transport::Transport;
use crate::volume::host::VolumeHost;

pub(super) fn spec_of(r: &VmRecord) -> GuestSpec {
    GuestSpec {
        memory_pages: r.memory_pages(),
        vcpus: r.vcpus,
        pattern: match r.workload {
            WorkloadKind::Uniform => WorkloadPattern::Uniform,
            WorkloadKind::HotSet { hot_pages } => WorkloadPattern::HotSet { hot_pages },
            WorkloadKind::Sequential => WorkloadPattern::Sequential,
        },
        dirty_pages_per_sec: r.dirty_pages_per_sec,
        disk_writes_per_sec: r.disk_writes_per_sec,
        seed: r.id.0,
    }
}

/// The source's report of a migration in progress. The stream's end is not the migration's: the
/// VM moves only once the catalog commit lands (`commit_recorded`), and only then does the host
/// report "done"; until then the finished stream reports "committing". (A report of "done"
/// before the commit let a client see the VM still at the source after "done".)
fn report_from(p: &MigrationProgress, to: NodeId) -> MigrationReport {
    let phase = match p.phase {
        migration::Phase::Done => "committing".to_string(),
        other => format!("{other:?}").to_lowercase(),
    };
    MigrationReport {
        phase,
        to: Some(to),
        round: p.round,
        bytes_sent: p.bytes_sent,
        bytes_remaining: p.bytes_remaining,
        dirty_pages_per_sec: p.dirty_pages_per_sec as u64,
        bandwidth_bytes_per_sec: p.bandwidth_bytes_per_sec as u64,
        eta_ms: p.eta_ms,
        expected_downtime_ms: p.expected_downtime_ms,
        throttle_percent: p.throttle_percent,
        ..Default::default()
    }
}

/// One VM on this host.
pub struct VmInstance {
    pub id: VmId,
    pub guest: Arc<dyn GuestDriver>,
    /// The catalog generation this guest was installed for.
    generation: AtomicU64,
    pub origin: Origin,
    /// The latest migration's report (live while one runs).
    migration: Mutex<Option<MigrationReport>>,
    cancel: Mutex<Option<CancelToken>>,
    actor: Mutex<Option<actix::Addr<VmActor>>>,
}

/// Where a local guest's memory came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Booted here with fresh memory (created here, or this host restarted).
    Booted,
    /// Received by live migration.
    Migrated,
    /// Loaded from a recovery image.
    Restored,
    /// Started by an HA takeover from the standby's last complete checkpoint (or, in
    /// multi-operation mode, the standby's own running guest).
    TakenOver,
    /// An HA multi-operation standby's guest, running beside the primary's.
    HaStandby,
}

/// What `vm::host` asks of the HA driver (`ha::host`, which depends on `vm`, not the reverse).
pub trait HaGate: Send + Sync {
    /// Reconcile leaves this VM's guest here to the HA driver: it neither boots one, nor
    /// removes the one installed (a standby's, a deposed primary's).
    fn owns(&self, vm: VmId) -> bool;
    /// The guest of `vm` issued `write`. `None`: the HA driver took it (it performs it once
    /// the standby holds the state that issued it, and completes it on the guest); `Some`: `vm`
    /// is not protected here, perform it now.
    fn disk_write(&self, vm: VmId, write: DiskWrite, guest: &Arc<dyn GuestDriver>) -> Option<DiskWrite>;
    /// The HA driver holds this guest's run state: a deposed primary's guest stays stopped even
    /// while this host's (stale) catalog still places the VM here and wants it running.
    fn holds_run_state(&self, vm: VmId) -> bool;
    /// Answer an application or HA status request (`AppPut`, `AppGet`, `HaStatus`) here.
    fn request(&self, req: VmRequest) -> futures::future::BoxFuture<'static, Result<VmResponse, WireError>>;
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Booted => "booted",
            Origin::Migrated => "migrated",
            Origin::Restored => "restored",
            Origin::TakenOver => "taken-over",
            Origin::HaStandby => "ha-standby",
        }
    }
}

impl VmInstance {
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// What the VM host holds of the node: whether the cluster is healthy, catalog reads,
/// proposals, actor messages, migration streams, the host lease and the local volumes.
pub struct VmHostHandles {
    pub view: RaftView,
    pub store: Store,
    pub proposer: Proposer,
    pub registry: ActorRegistry,
    pub transport: Transport,
    pub lease: Arc<HostLease>,
    pub volumes: Arc<VolumeHost>,
}

/// This node's VMs.
pub struct VmHost {
    pub node: NodeId,
    pub(super) view: RaftView,
    pub(super) store: Store,
    pub(super) proposer: Proposer,
    pub(super) registry: ActorRegistry,
    transport: Transport,
    pub(super) volumes: Arc<VolumeHost>,
    capacity_mib: u64,
    vms: Mutex<HashMap<VmId, Arc<VmInstance>>>,
    /// Guests received by migration, waiting for the catalog to place them here.
    incoming: Mutex<HashMap<VmId, Arc<dyn GuestDriver>>>,
    /// VMs whose migration stream is being received here. The destination acknowledges the
    /// copy before its receiving task has put the guest in `incoming`, and the source may
    /// commit in between: reconcile must not boot such a VM fresh (a flaky plan test showed a
    /// destination booting a guest whose memory had just arrived).
    receiving: Mutex<std::collections::HashSet<VmId>>,
    /// Final reports of migrations that ended here (as destination).
    reports: Mutex<HashMap<VmId, MigrationReport>>,
    /// Link rate measured by the last migration from here (bytes/s), for predictions.
    last_bandwidth: Mutex<u64>,
    /// Group operations of migration plans (see [`super::group`]).
    pub(super) group: GroupState,
    /// Since when each local VM's catalog record announces a migration no migration here runs.
    stale: Mutex<HashMap<VmId, std::time::Instant>>,
    /// VMs a migration from here moved away by a commit the local catalog may not show yet:
    /// vm → the generation the commit replaced. Reconcile leaves them alone until it does (a
    /// source whose catalog lagged restarted its migrated guest; plan model seed 30898).
    departed: Mutex<HashMap<VmId, u64>>,
    /// The actix system's arbiter (set by [`VmHost::run`]): VM actors start there, also when a
    /// guest is installed from another thread (a restore job).
    arbiter: std::sync::OnceLock<actix::ArbiterHandle>,
    /// This host's lease on running guests (renewed by Raft contact, see [`super::fence`]).
    lease: Arc<HostLease>,
    /// The HA driver, once the node set it (see [`HaGate`]).
    ha: std::sync::OnceLock<Arc<dyn HaGate>>,
}

/// How long an announced migration with no migration running for it may stand (see
/// [`VmHost::withdraw_stale`]); longer than any gap between the announcement and the start.
const STALE_MIGRATION: Duration = Duration::from_secs(3);

impl VmHost {
    /// `data_dir` holds recovery images (`<data-dir>/recovery`); group snapshots up to
    /// `capture_limit_bytes` are captured in memory while the group is paused.
    pub fn new(
        h: VmHostHandles,
        capacity_mib: u64,
        data_dir: std::path::PathBuf,
        capture_limit_bytes: u64,
    ) -> Arc<Self> {
        Arc::new(Self {
            node: h.view.id(),
            view: h.view,
            store: h.store,
            proposer: h.proposer,
            registry: h.registry,
            transport: h.transport,
            volumes: h.volumes,
            capacity_mib,
            vms: Mutex::new(HashMap::new()),
            incoming: Mutex::new(HashMap::new()),
            receiving: Mutex::default(),
            reports: Mutex::new(HashMap::new()),
            last_bandwidth: Mutex::new(256 << 20),
            group: GroupState::new(data_dir, capture_limit_bytes),
            stale: Mutex::new(HashMap::new()),
            departed: Mutex::new(HashMap::new()),
            arbiter: std::sync::OnceLock::new(),
            lease: h.lease,
            ha: std::sync::OnceLock::new(),
        })
    }

    /// Hand HA-protected guests to `gate` (once, at node start).
    pub fn set_ha_gate(&self, gate: Arc<dyn HaGate>) {
        let _ = self.ha.set(gate);
    }

    pub(super) fn ha_gate(&self) -> Option<&Arc<dyn HaGate>> {
        self.ha.get()
    }

    fn ha_owns(&self, vm: VmId) -> bool {
        self.ha.get().is_some_and(|g| g.owns(vm))
    }

    pub fn volumes(&self) -> &Arc<VolumeHost> {
        &self.volumes
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Install `guest` as `vm`'s here (an HA takeover or standby), replacing any guest there.
    pub fn install_guest(self: &Arc<Self>, vm: VmId, guest: Arc<dyn GuestDriver>, generation: u64, origin: Origin) {
        if let Some(old) = self.remove_instance(vm) {
            let _ = old.guest.stop();
        }
        let inst = self.install(vm, guest, generation, origin);
        if let Ok(record) = self.record(vm) {
            inst.guest.set_disks(&super::disk_backend::geometries(&self.store, &record.volumes));
        }
    }

    /// Remove `vm`'s guest here and stop it (an HA host whose guest runs elsewhere now).
    pub fn discard_guest(&self, vm: VmId) {
        if let Some(inst) = self.remove_instance(vm) {
            let _ = inst.guest.stop();
        }
    }

    /// Run `f` on `vm`'s guest while reconcile cannot change its run state (an HA checkpoint
    /// capture pauses the guest and must resume it itself, after the capture).
    pub fn with_run_state_held<R>(&self, vm: VmId, f: impl FnOnce() -> R) -> R {
        self.group.held.lock().expect("held lock").insert(vm);
        let r = f();
        self.group.held.lock().expect("held lock").remove(&vm);
        r
    }

    /// The guest spec of `vm`'s catalog record.
    pub fn spec_of(&self, vm: VmId) -> Result<GuestSpec, VmError> {
        self.record(vm).map(|r| spec_of(&r))
    }

    pub fn instance(&self, vm: VmId) -> Option<Arc<VmInstance>> {
        self.vms.lock().expect("vms lock").get(&vm).cloned()
    }

    /// Whether this host may run guests (and write their disks) now: it has recent quorum
    /// contact. Lock-free.
    pub fn lease_valid(&self) -> bool {
        self.lease.is_valid()
    }

    /// Pause every running local guest if the lease lapsed (logged once per lapse).
    fn enforce_fence(&self) {
        match self.lease.observe() {
            FenceChange::Lapsed { since_contact } => {
                let ms = since_contact.map_or("ever".to_string(), |d| d.as_millis().to_string());
                warn!(node = %self.node, "fenced: no quorum contact for {ms} ms; pausing guests");
            }
            FenceChange::Restored => info!(node = %self.node, "quorum contact is back; the lease is valid again"),
            FenceChange::Unchanged => {}
        }
        if self.lease.is_valid() {
            return;
        }
        let guests: Vec<_> = self.vms.lock().expect("vms lock").values().cloned().collect();
        for inst in guests.into_iter().filter(|i| i.guest.state() == RunState::Running) {
            if let Err(e) = inst.guest.pause() {
                warn!(vm = %inst.id, error = %e, "fenced, but the guest could not be paused");
            }
        }
    }

    /// Keep guests in step with the catalog. Runs on the actix system thread (starts actors).
    pub async fn run(self: Arc<Self>) {
        let _ = self.arbiter.set(actix::Arbiter::current());
        loop {
            self.enforce_fence();
            if let Err(e) = self.reconcile().await {
                warn!(error = %e, "vm reconcile failed");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn reconcile(self: &Arc<Self>) -> Result<(), VmError> {
        // Read before the catalog: a valid lease means the catalog read below is at least as new
        // as the contact that renewed it.
        let may_run = self.lease.is_valid();
        let store = &self.store;
        if self.view.status().healthy {
            let caps =
                crate::catalog::vms::query(store, &haven_proto::vm::VmQuery::Capacity).map_err(VmError::internal)?;
            let recorded = match caps {
                haven_proto::vm::VmQueryResult::Capacity(c) => {
                    c.iter().any(|(c, _)| c.host == self.node && c.memory_mib == self.capacity_mib)
                }
                _ => false,
            };
            if !recorded {
                let cmd = VmCommand::SetCapacity(HostCapacity { host: self.node, memory_mib: self.capacity_mib });
                let _ = self.proposer.write(CatalogCommand::Vm(cmd), 0).await;
            }
        }
        let records = crate::catalog::vms::vms(store).map_err(VmError::internal)?;
        // Drop copies received by migrations that ended without moving the VM here.
        self.incoming.lock().expect("incoming lock").retain(|vm, _| {
            records.iter().any(|r| r.id == *vm && (r.host == self.node || r.migrating_to == Some(self.node)))
        });
        let mut mine: HashMap<VmId, VmRecord> =
            records.into_iter().filter(|r| r.host == self.node).map(|r| (r.id, r)).collect();
        self.skip_departed(&mut mine);
        // Plans failing back whose group this host restores from recovery images.
        let restoring: Vec<_> = crate::catalog::plans::active_plans(store)
            .map_err(VmError::internal)?
            .into_iter()
            .filter(|p| p.state == PlanState::FailingBack && p.from == self.node && p.restore.is_some())
            .collect();
        // Stop guests the catalog placed elsewhere (migrated away) or deleted.
        // Collected before asking the HA driver: it takes its pair's lock, then this one.
        let here: Vec<VmId> = self.vms.lock().expect("vms lock").keys().copied().collect();
        let gone: Vec<VmId> = here.into_iter().filter(|id| !mine.contains_key(id) && !self.ha_owns(*id)).collect();
        for id in gone {
            if let Some(inst) = self.remove_instance(id) {
                let _ = inst.guest.stop();
                info!(vm = %id, "guest stopped here (moved or deleted)");
            }
        }
        for (id, record) in mine {
            if !restoring.is_empty() && self.restore_pending(&record, &restoring) {
                continue; // the plan's restore job installs it from its recovery image
            }
            let inst = match self.instance(id) {
                Some(i) => i,
                // An HA pair's guest comes from its standby's checkpoint, never a fresh boot.
                None if self.ha_owns(id) => continue,
                // Its memory is arriving: the receiving task hands it over in a moment.
                None if self.receiving.lock().expect("receiving lock").contains(&id) => continue,
                None => {
                    // A guest that arrived by migration keeps its memory; otherwise a new guest
                    // boots (a host restart loses a simulated guest's memory, like a power cut).
                    let arrived = self.incoming.lock().expect("incoming lock").remove(&id);
                    let (guest, origin): (Arc<dyn GuestDriver>, _) = match arrived {
                        Some(g) => (g, Origin::Migrated),
                        None => (SimulatedGuest::new(spec_of(&record)), Origin::Booted),
                    };
                    self.install(id, guest, record.generation, origin)
                }
            };
            if record.migrating_to.is_some() {
                self.withdraw_stale(&record, &inst);
                continue; // the migration owns the run state until it ends
            }
            if inst.cancel.lock().expect("cancel lock").is_some() {
                continue; // a migration from here runs, whatever this (possibly stale) catalog says
            }
            if self.ha.get().is_some_and(|g| g.holds_run_state(id)) {
                continue; // deposed: another host runs the VM, whatever this catalog says yet
            }
            self.stale.lock().expect("stale lock").remove(&id);
            // Attach and detach are refused while a VM migrates, so its disks change only here.
            inst.guest.set_disks(&super::disk_backend::geometries(store, &record.volumes));
            // Hold the lock while applying, so a group job that holds this VM is not undone.
            let held = self.group.held.lock().expect("held lock");
            if held.contains(&id) {
                continue; // a group job (snapshot, consolidation, restore) owns the run state
            }
            let state = inst.guest.state();
            let result = match (record.desired, state) {
                (VmRunState::Running, RunState::Created | RunState::Stopped) if may_run => inst.guest.start(),
                (VmRunState::Running, RunState::Paused) if may_run => inst.guest.resume(),
                (VmRunState::Paused, RunState::Running) => inst.guest.pause(),
                (VmRunState::Stopped, RunState::Running | RunState::Paused) => inst.guest.stop(),
                _ => Ok(()),
            };
            drop(held);
            if let Err(e) = result {
                warn!(vm = %id, error = %e, "could not apply the desired run state");
            }
        }
        Ok(())
    }

    /// Take out of `mine` the VMs this host moved away by a commit its catalog does not show yet:
    /// they count as gone (never restarted here), and are forgotten once the catalog shows the
    /// move (or a newer generation placed back here).
    fn skip_departed(&self, mine: &mut HashMap<VmId, VmRecord>) {
        let mut departed = self.departed.lock().expect("departed lock");
        departed.retain(|vm, generation| mine.get(vm).is_some_and(|r| r.generation <= *generation));
        mine.retain(|vm, _| !departed.contains_key(vm));
    }

    /// Remove a local VM's instance and its actor (the caller stops the guest).
    pub(super) fn remove_instance(&self, id: VmId) -> Option<Arc<VmInstance>> {
        let inst = self.vms.lock().expect("vms lock").remove(&id);
        if inst.is_some() {
            self.registry.unregister(&ActorAddr { node: self.node, kind: ActorKind::Vm, id: id.0 });
        }
        inst
    }

    /// Forget a guest received by migration that the catalog never placed here.
    pub(super) fn drop_incoming(&self, id: VmId) {
        self.incoming.lock().expect("incoming lock").remove(&id);
    }

    pub(super) fn install(
        self: &Arc<Self>,
        id: VmId,
        guest: Arc<dyn GuestDriver>,
        generation: u64,
        origin: Origin,
    ) -> Arc<VmInstance> {
        let inst = Arc::new(VmInstance {
            id,
            guest,
            generation: AtomicU64::new(generation),
            origin,
            migration: Mutex::new(None),
            cancel: Mutex::new(None),
            actor: Mutex::new(None),
        });
        let me = self.clone();
        let actor = match self.arbiter.get() {
            Some(arbiter) => VmActor::start_in_arbiter(arbiter, move |_| VmActor::new(me, id)),
            None => VmActor::new(me, id).start(),
        };
        self.registry.register(ActorAddr { node: self.node, kind: ActorKind::Vm, id: id.0 }, actor.clone().recipient());
        *inst.actor.lock().expect("actor lock") = Some(actor);
        self.vms.lock().expect("vms lock").insert(id, inst.clone());
        super::disk_backend::spawn(self, &inst);
        info!(vm = %id, "guest installed");
        inst
    }

    pub(super) fn record(&self, vm: VmId) -> Result<VmRecord, VmError> {
        crate::catalog::vms::vm(&self.store, vm)
            .map_err(VmError::internal)?
            .ok_or_else(|| VmError::not_found(format!("no VM {vm}")))
    }

    /// A client's VM request: handled here if the VM runs here, else sent to its host.
    pub async fn client(self: &Arc<Self>, req: VmRequest) -> Result<VmResponse, VmError> {
        let record = self.record(req.vm())?;
        // Application and HA requests are the HA driver's, on the VM's host (or the host asked).
        if let VmRequest::AppPut { .. } | VmRequest::AppGet { .. } | VmRequest::HaStatus { .. } = req {
            let at = match req {
                VmRequest::HaStatus { at: Some(at), .. } => at,
                _ => record.host,
            };
            if at == self.node {
                return self.ha_request(req).await;
            }
            let addr = ActorAddr { node: at, kind: ActorKind::Ha, id: 0 };
            return match self.registry.send(addr, ActorMessage::Vm(VmMessage::Client(req))).await? {
                ActorReply::Vm(r) => Ok(r),
                other => Err(VmError::internal(format!("HA actor answered {other:?}"))),
            };
        }
        if record.host == self.node {
            return self.handle(VmMessage::Client(req)).await;
        }
        let addr = ActorAddr { node: record.host, kind: ActorKind::Vm, id: record.id.0 };
        match self.registry.send(addr, ActorMessage::Vm(VmMessage::Client(req))).await? {
            ActorReply::Vm(r) => Ok(r),
            other => Err(VmError::internal(format!("VM actor answered {other:?}"))),
        }
    }

    /// A message for one of this host's VM actors.
    pub async fn handle(self: &Arc<Self>, msg: VmMessage) -> Result<VmResponse, VmError> {
        match msg {
            VmMessage::Client(
                req @ (VmRequest::AppPut { .. } | VmRequest::AppGet { .. } | VmRequest::HaStatus { .. }),
            ) => self.ha_request(req).await,
            VmMessage::Client(req) => {
                let vm = req.vm();
                let inst = self
                    .instance(vm)
                    .ok_or_else(|| VmError::unavailable(format!("{vm} is not running on {} yet", self.node)))?;
                match req {
                    VmRequest::Status { .. } => {
                        // Never report `running` on a lapsed lease (a process just woken from
                        // SIGSTOP has not run its fence tick yet).
                        self.enforce_fence();
                        Ok(VmResponse::Status(self.status_of(&inst)))
                    }
                    VmRequest::Check { .. } => {
                        let c = inst.guest.check_memory().map_err(|e| VmError::internal(e.to_string()))?;
                        let disks = super::disk_backend::check_disks(self, &inst).await?;
                        Ok(VmResponse::Check {
                            pages_written: c.pages_written,
                            max_seq: c.max_seq,
                            last_seq: c.last_seq,
                            disks,
                        })
                    }
                    VmRequest::Migrate { to, options, plan, .. } => self.start_migration(inst, to, options, plan).await,
                    VmRequest::MigrationProgress { .. } => inst
                        .migration
                        .lock()
                        .expect("migration lock")
                        .clone()
                        .or_else(|| self.reports.lock().expect("reports lock").get(&vm).cloned())
                        .map(VmResponse::Migration)
                        .ok_or_else(|| VmError::not_found(format!("{vm} has no migration on record at {}", self.node))),
                    VmRequest::CancelMigration { .. } => match inst.cancel.lock().expect("cancel lock").as_ref() {
                        Some(token) => {
                            token.cancel();
                            Ok(VmResponse::Done)
                        }
                        None => Err(VmError::invalid(format!("{vm} is not migrating"))),
                    },
                    other @ (VmRequest::AppPut { .. } | VmRequest::AppGet { .. } | VmRequest::HaStatus { .. }) => {
                        self.ha_request(other).await
                    }
                }
            }
            VmMessage::ResumeMigrated { vm, report } => {
                self.reports.lock().expect("reports lock").insert(vm, report);
                // The catalog already names this host; reconcile installs and starts the guest.
                if let Err(e) = self.reconcile().await {
                    warn!(%vm, error = %e, "reconcile after migration");
                }
                Ok(VmResponse::Done)
            }
            VmMessage::IncomingMigration { .. } => {
                Err(VmError::invalid("an incoming migration arrives as a bulk stream"))
            }
            VmMessage::Group(req) => self.group(req).await.map(VmResponse::Group),
        }
    }

    async fn ha_request(&self, req: VmRequest) -> Result<VmResponse, VmError> {
        let gate = self.ha.get().ok_or_else(|| VmError::unavailable("the HA driver is not running yet"))?;
        Ok(gate.request(req).await?)
    }

    async fn propose(&self, cmd: VmCommand) -> Result<VmRecord, VmError> {
        match self.proposer.write(CatalogCommand::Vm(cmd), 0).await? {
            ClientResponse::Written { outcome: CommandOutcome::Vm(VmOutcome::Vm(v)), .. } => Ok(v),
            ClientResponse::Written {
                outcome: CommandOutcome::Vm(VmOutcome::Refused { reason, not_found }), ..
            } => Err(if not_found { VmError::NotFound(reason) } else { VmError::Invalid(reason) }),
            other => Err(VmError::internal(format!("unexpected outcome {other:?}"))),
        }
    }

    /// Source side: announce the migration, open the stream, and run it in the background.
    async fn start_migration(
        self: &Arc<Self>,
        inst: Arc<VmInstance>,
        to: NodeId,
        options: MigrationOptions,
        plan: Option<u64>,
    ) -> Result<VmResponse, VmError> {
        if to == self.node {
            return Err(VmError::invalid(format!("{} already runs on {to}", inst.id)));
        }
        if inst.guest.state() != RunState::Running {
            return Err(VmError::invalid(format!("{} is not running", inst.id)));
        }
        let peer = self
            .view
            .status()
            .members
            .into_iter()
            .find(|m| m.id == to)
            .ok_or_else(|| VmError::not_found(format!("{to} is not a cluster host")))?;
        // Predict from the guest's measured dirty rate and the last link rate seen (or a
        // conservative default) before touching anything; refuse what cannot meet the limit.
        let dirty = (inst.guest.workload_stats().achieved_pages_per_sec * super::guest::PAGE_SIZE as f64) as u64;
        let mut bandwidth = *self.last_bandwidth.lock().expect("bandwidth lock");
        if options.max_bandwidth_bytes_per_sec > 0 {
            bandwidth = bandwidth.min(options.max_bandwidth_bytes_per_sec);
        }
        let memory = inst.guest.spec().memory_pages * super::guest::PAGE_SIZE as u64;
        let prediction = migration::predict(memory, dirty, bandwidth, options.max_downtime_ms);
        if !prediction.converges && !options.auto_converge {
            return Err(VmError::invalid(format!(
                "{} dirties {} MiB/s against a link of about {} MiB/s: it cannot reach a {} ms pause without \
                     throttling (needs {}); allow auto-converge or raise the downtime limit",
                inst.id,
                dirty >> 20,
                bandwidth >> 20,
                options.max_downtime_ms,
                prediction.needs_throttle_percent.map_or("more than 99%".to_string(), |p| format!("{p}% throttle")),
            )));
        }
        // The token marks this VM's migration as under way from before it is announced until its
        // outcome is recorded: no second migration starts meanwhile, and reconcile does not treat
        // the announcement as stale.
        let cancel = CancelToken::new();
        {
            let mut slot = inst.cancel.lock().expect("cancel lock");
            if slot.is_some() {
                return Err(VmError::invalid(format!("a migration of {} is under way or ending", inst.id)));
            }
            *slot = Some(cancel.clone());
        }
        let release = |inst: &VmInstance| *inst.cancel.lock().expect("cancel lock") = None;
        let record = match self.propose(VmCommand::BeginMigration { vm: inst.id, to, plan }).await {
            Ok(r) => r,
            Err(e) => {
                // If the announcement committed after all, reconcile withdraws it once it is stale.
                release(&inst);
                return Err(e);
            }
        };
        let addr = match self.transport.dial_addr(to, &peer.addr).await {
            Ok(a) => a,
            Err(e) => {
                self.abort_recorded(inst.id, to, record.generation).await;
                release(&inst);
                return Err(VmError::unavailable(e));
            }
        };
        let hello =
            Body::Actor(ActorMessage::Vm(VmMessage::IncomingMigration { vm: inst.id, generation: record.generation }));
        let (send, recv) = match self
            .transport
            .open_stream(addr, ActorAddr { node: to, kind: ActorKind::Vm, id: inst.id.0 }, hello)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                self.abort_recorded(inst.id, to, record.generation).await;
                release(&inst);
                return Err(VmError::unavailable(format!("cannot open a migration stream to {to}: {e}")));
            }
        };
        let first = MigrationReport { phase: "precopy".into(), to: Some(to), ..Default::default() };
        *inst.migration.lock().expect("migration lock") = Some(first.clone());
        let me = self.clone();
        let config = MigrationConfig {
            max_downtime_ms: options.max_downtime_ms,
            auto_converge: options.auto_converge,
            max_bandwidth_bytes_per_sec: options.max_bandwidth_bytes_per_sec,
            ..MigrationConfig::default()
        };
        tokio::spawn(async move {
            me.run_source(inst, to, record.generation, config, tokio::io::join(recv, send), cancel).await
        });
        Ok(VmResponse::Migration(first))
    }

    async fn run_source<S>(
        self: Arc<Self>,
        inst: Arc<VmInstance>,
        to: NodeId,
        generation: u64,
        config: MigrationConfig,
        stream: S,
        cancel: CancelToken,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, mut rx) = tokio::sync::watch::channel(MigrationProgress::default());
        let watcher = {
            let inst = inst.clone();
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    let p = rx.borrow_and_update().clone();
                    *inst.migration.lock().expect("migration lock") = Some(report_from(&p, to));
                }
            })
        };
        let capped = config.max_bandwidth_bytes_per_sec > 0;
        let result = migration::migrate_source(inst.guest.clone(), stream, config, tx, cancel.clone()).await;
        watcher.abort();
        let mut report = inst.migration.lock().expect("migration lock").clone().unwrap_or_default();
        match result {
            Ok(outcome) => {
                // The source is paused and the destination holds a verified copy: move the VM.
                match self.commit_recorded(inst.id, generation, to).await {
                    Ok(()) => {
                        self.departed.lock().expect("departed lock").insert(inst.id, generation);
                        let _ = inst.guest.stop();
                        report.phase = "done".into();
                        report.downtime_ms = Some(outcome.downtime_ms);
                        report.total_ms = Some(outcome.total_ms);
                        report.bytes_sent = outcome.bytes_sent;
                        report.round = outcome.rounds;
                        // A capped migration measured the cap, not the link.
                        if report.bandwidth_bytes_per_sec > 0 && !capped {
                            *self.last_bandwidth.lock().expect("bandwidth lock") = report.bandwidth_bytes_per_sec;
                        }
                        info!(vm = %inst.id, %to, downtime_ms = outcome.downtime_ms, "migrated");
                        let addr = ActorAddr { node: to, kind: ActorKind::Vm, id: inst.id.0 };
                        // The destination installs the VM once it sees the commit; its actor may
                        // take a moment to appear.
                        let msg = VmMessage::ResumeMigrated { vm: inst.id, report: report.clone() };
                        for _ in 0..40 {
                            if self.registry.send(addr, ActorMessage::Vm(msg.clone())).await.is_ok() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    Err(e) => {
                        warn!(vm = %inst.id, error = %e, "migration not committed; resuming at the source");
                        if self.lease_valid() {
                            let _ = inst.guest.resume(); // fenced: reconcile resumes it later
                        }
                        self.abort_recorded(inst.id, to, generation).await;
                        report.phase = "failed".into();
                        report.reason = Some(format!("commit refused: {e}"));
                    }
                }
            }
            Err(e) => {
                warn!(vm = %inst.id, error = %e, "migration ended without moving the VM");
                self.abort_recorded(inst.id, to, generation).await;
                report.phase = if cancel.is_cancelled() { "cancelled".into() } else { "failed".into() };
                report.reason = Some(e.to_string());
            }
        }
        *inst.migration.lock().expect("migration lock") = Some(report);
        *inst.cancel.lock().expect("cancel lock") = None;
    }

    /// Commit the move of `vm` to `to` and learn its outcome for certain. A commit whose outcome
    /// is unknown (leader lost, deadline passed) is retried; the catalog applied here decides:
    /// moved (generation bumped, `host` = `to`) is success, anything else but the undecided
    /// announcement is failure. Meanwhile the guest stays paused, so it can never run on both
    /// hosts; without a quorum this waits as long as it takes.
    async fn commit_recorded(&self, vm: VmId, generation: u64, to: NodeId) -> Result<(), String> {
        let started = std::time::Instant::now();
        let mut pause = Duration::from_millis(50);
        let mut warned = false;
        loop {
            let last = match self.propose(VmCommand::CommitMigration { vm, expected_generation: generation, to }).await
            {
                Ok(_) => return Ok(()),
                Err(e) => e.message(),
            };
            match self.record(vm) {
                Ok(r) if r.host == to && r.generation > generation => return Ok(()),
                Ok(r) if r.host == self.node && r.generation == generation && r.migrating_to == Some(to) => {}
                Ok(r) => {
                    return Err(format!(
                        "{last} (the catalog has {vm} on {}, generation {}, migrating to {:?})",
                        r.host, r.generation, r.migrating_to
                    ))
                }
                Err(e) if e.code() == ErrorCode::NotFound => return Err(format!("{vm} was deleted: {last}")),
                Err(_) => {}
            }
            if !warned && started.elapsed() > Duration::from_secs(5) {
                warn!(%vm, %to, error = %last, "migration commit undecided; the guest stays paused until it is");
                warned = true;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Withdraw the announced migration of `vm` to `to`, retrying until the catalog applied here
    /// no longer shows it (the caller still holds the VM's migration token, so no newer migration
    /// of the VM can be announced meanwhile).
    async fn abort_recorded(&self, vm: VmId, to: NodeId, generation: u64) {
        let mut pause = Duration::from_millis(50);
        loop {
            match self.record(vm) {
                Ok(r) if r.migrating_to != Some(to) || r.generation != generation => return,
                Err(e) if e.code() == ErrorCode::NotFound => return,
                _ => {}
            }
            match self.propose(VmCommand::AbortMigration { vm }).await {
                Ok(r) if r.migrating_to.is_none() => {
                    // Applied; wait for this node's catalog to show it before returning.
                }
                Err(e) if e.code() == ErrorCode::NotFound => return,
                Err(e) => warn!(%vm, error = %e, "withdrawing the migration announcement; retrying"),
                Ok(_) => {}
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Withdraw announcements of migrations from this host that no migration here runs for
    /// (their source restarted, or the announcement's outcome was unknown to its proposer), once
    /// they have been stale for a while.
    fn withdraw_stale(self: &Arc<Self>, record: &VmRecord, inst: &VmInstance) {
        let running = inst.cancel.lock().expect("cancel lock").is_some();
        let mut stale = self.stale.lock().expect("stale lock");
        let Some(to) = record.migrating_to.filter(|_| !running) else {
            stale.remove(&record.id);
            return;
        };
        let since = *stale.entry(record.id).or_insert_with(std::time::Instant::now);
        if since.elapsed() < STALE_MIGRATION {
            return;
        }
        stale.remove(&record.id);
        warn!(vm = %record.id, %to, "withdrawing a migration announcement no migration here runs for");
        let (me, vm, generation) = (self.clone(), record.id, record.generation);
        tokio::spawn(async move { me.abort_recorded(vm, to, generation).await });
    }

    /// Destination side: receive a migration on a bulk stream.
    pub async fn incoming(self: Arc<Self>, vm: VmId, send: quinn::SendStream, recv: quinn::RecvStream) {
        // The source opens the stream right after `BeginMigration` committed; this node may not
        // have applied that entry yet, so give the catalog a moment before refusing.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let record = loop {
            match self.record(vm) {
                Ok(r) if r.migrating_to == Some(self.node) => break r,
                Ok(r) if tokio::time::Instant::now() >= deadline => {
                    warn!(%vm, "refusing a migration the catalog does not announce (to {:?})", r.migrating_to);
                    return;
                }
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    warn!(%vm, error = %e, "refusing a migration of an unknown VM");
                    return;
                }
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let guest: Arc<dyn GuestDriver> = SimulatedGuest::new(spec_of(&record));
        let (tx, _rx) = tokio::sync::watch::channel(MigrationProgress::default());
        self.receiving.lock().expect("receiving lock").insert(vm);
        let received = migration::migrate_destination(guest.clone(), tokio::io::join(recv, send), tx).await;
        match received {
            Ok(_) => {
                info!(%vm, "migration received; waiting for the catalog to place the VM here");
                self.incoming.lock().expect("incoming lock").insert(vm, guest);
            }
            Err(e) => warn!(%vm, error = %e, "incoming migration failed; copy dropped"),
        }
        self.receiving.lock().expect("receiving lock").remove(&vm);
    }
}

/// Route a stream that opened with an `IncomingMigration` envelope.
pub fn stream_handler(host: Arc<VmHost>) -> crate::transport::StreamHandler {
    Arc::new(move |env, send, recv| {
        let host = host.clone();
        Box::pin(async move {
            match env.body {
                Body::Actor(ActorMessage::Vm(VmMessage::IncomingMigration { vm, .. })) => {
                    host.incoming(vm, send, recv).await
                }
                other => warn!(kind = other.kind().as_str(), "unexpected bulk stream; dropped"),
            }
        })
    })
}
