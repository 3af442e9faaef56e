//! The HA driver of one node: runs a [`PairHost`] per HA pair this node is primary or standby
//! of, and carries out its effects — the guest (pause, capture, resume, start from a
//! checkpoint, stop, discard, through `vm::host`), the outputs the guest issues (disk writes
//! and application updates, held until the standby holds the state that issued them), the
//! durable seal (`<data-dir>/ha/<vm>.durable`), messages to other nodes' HA actors, the
//! catalog's pair records, and the heartbeat to the leader.
//!
//! **Driver rules** (`super::core`): effects run in order, under the pair's lock; `Persist` is
//! fsynced before the next effect (above all before a guest starts or a message leaves);
//! sends leave on tasks of their own and answers come back as messages. A capture pauses the
//! guest with its run state held from reconcile, reads the dirty pages and the device state
//! (the guest's vCPU state and disk journal, then the application state), and resumes it only
//! when the core says so.
//!
//! The application (`VmRequest::AppPut`/`AppGet`) is a key-value document (C2's [`Doc`]) per
//! protected VM, kept by its primary: in redundant mode it travels in every checkpoint's device
//! state, in multi-operation mode each put travels as an update — the C2 diff between the old
//! and the new value of the key — and the standby folds it into its own copy. A put is answered
//! once released.
//!
//! Must not: decide anything about epochs, acknowledgements, seals or takeovers (the core
//! does), or write the catalog (the leader's loop in `super::leader` proposes).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use haven_proto::ha::{AppView, HaHeartbeat, HaMessage, HaMode, HaPairRecord, HaVmStatus, PairState, PairStatus};
use haven_proto::share::ShareDiff;
use haven_proto::vm::VM_PAGE_SIZE;
use haven_proto::vm::{VmRequest, VmResponse};
use haven_proto::{ActorAddr, ActorKind, ActorMessage, NodeId, VmId, WireError};
use tracing::{debug, info, warn};

use super::core::standby::{ImageShape, TakeoverState};
use super::core::{refusal_message, Durable, Effect, HaMetric, HaTunables, PairHost, Role};
use super::error::HaHostError;
use crate::actors::ActorRegistry;
use crate::share::core::doc::{self, Doc};
use crate::vm::disk::DiskWrite;
use crate::vm::guest::{GuestDriver, RunState, SimulatedGuest};
use crate::vm::host::{HaGate, Origin, VmHost};

/// How long one HA message may take before the sender stops waiting (the core retransmits).
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the driver ticks every pair (the shortest checkpoint epoch is 5 ms).
const TICK: Duration = Duration::from_millis(5);
/// How often the pair records are read from the catalog.
const RECORD_EVERY: Duration = Duration::from_millis(50);
/// Longest an application put waits for its release.
const PUT_WAIT: Duration = Duration::from_secs(20);
/// A multi-operation standby compacts its mirrored state once this many updates piled up.
const COMPACT_EVERY: usize = 256;
/// Bytes of the device-state header: the vCPU part's length.
const DEVICE_HEADER: usize = 8;

/// The address of `node`'s HA actor.
pub fn actor(node: NodeId) -> ActorAddr {
    ActorAddr { node, kind: ActorKind::Ha, id: 0 }
}

/// An output the guest issued and the pair has not released yet.
enum Pending {
    Disk { write: DiskWrite, guest: Arc<dyn GuestDriver> },
    App,
}

/// One pair on this host: the core, the outputs it gates, the application document.
struct PairSlot {
    core: PairHost,
    pending: BTreeMap<u64, Pending>,
    issued: u64,
    released: u64,
    app: Doc,
    /// The standby's folded application state (multi-operation), as of update `app_applied`.
    standby_app: Option<(u64, Doc)>,
    epochs: u64,
    epoch_bytes: u64,
    took_over_from: Option<u64>,
}

struct Slot {
    vm: VmId,
    state: Mutex<PairSlot>,
    /// Bumped whenever outputs are released (application puts wait on it).
    released: tokio::sync::watch::Sender<u64>,
    /// The pair's line of the last heartbeat, sent again while a step holds the pair's lock.
    beat: Mutex<Option<PairStatus>>,
}

pub struct HaHost {
    me: NodeId,
    vms: Arc<VmHost>,
    registry: ActorRegistry,
    dir: PathBuf,
    tun: HaTunables,
    started: Instant,
    slots: Mutex<BTreeMap<VmId, Arc<Slot>>>,
    beat_seq: std::sync::atomic::AtomicU64,
    leader: super::leader::LeaderSlot,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl HaHost {
    pub fn new(
        vms: Arc<VmHost>,
        registry: ActorRegistry,
        data_dir: &std::path::Path,
        tun: HaTunables,
        leader: super::leader::LeaderSlot,
    ) -> Result<Arc<Self>, HaHostError> {
        tun.check().map_err(HaHostError::Config)?;
        let dir = data_dir.join("ha");
        std::fs::create_dir_all(&dir).map_err(|e| HaHostError::io(&dir, e))?;
        Ok(Arc::new(Self {
            me: vms.node,
            vms,
            registry,
            dir,
            tun,
            started: Instant::now(),
            slots: Mutex::default(),
            beat_seq: std::sync::atomic::AtomicU64::new(0),
            leader,
        }))
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn slot(&self, vm: VmId) -> Option<Arc<Slot>> {
        lock(&self.slots).get(&vm).cloned()
    }

    /// Tick every pair and follow the catalog, forever; heartbeats go from a task of their own,
    /// so a long capture or takeover step never delays them into a false loss (chaos runs saw
    /// a host that had just taken two VMs over declared silent for 610 ms).
    pub async fn run(self: Arc<Self>) {
        let beats = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(beats.tun.heartbeat_ms));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let host = beats.clone();
                // The slot locks are std mutexes a step may hold for a capture: off the runtime.
                let _ = tokio::task::spawn_blocking(move || host.heartbeat()).await;
            }
        });
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_records = Instant::now() - RECORD_EVERY;
        loop {
            tick.tick().await;
            if last_records.elapsed() >= RECORD_EVERY {
                last_records = Instant::now();
                if let Err(e) = self.follow_records() {
                    warn!(error = %e, "reading HA pair records");
                }
            }
            let slots: Vec<_> = lock(&self.slots).values().cloned().collect();
            for slot in slots {
                let now = self.now_ms();
                let _ = self.step(&slot, |core| Ok(core.tick(now)));
            }
        }
    }

    // ---- records ----------------------------------------------------------------------------

    fn follow_records(&self) -> Result<(), HaHostError> {
        let pairs = crate::catalog::ha::pairs(self.vms.store()).map_err(HaHostError::internal)?;
        let mut seen = HashSet::new();
        for r in pairs {
            let named = r.primary == self.me || r.standby == Some(self.me);
            if !named && self.slot(r.vm).is_none() {
                continue;
            }
            seen.insert(r.vm);
            let slot = match self.slot(r.vm) {
                Some(s) => s,
                None => self.new_slot(&r)?,
            };
            let now = self.now_ms();
            self.adopt_running_guest(&slot, &r);
            self.standby_guest(&slot, &r);
            if let Err(e) = self.step(&slot, |core| core.on_record(&r, now)) {
                warn!(vm = %r.vm, error = %e, "HA pair record refused on this host");
            }
        }
        let gone: Vec<_> = lock(&self.slots).keys().filter(|vm| !seen.contains(vm)).copied().collect();
        for vm in gone {
            self.drop_slot(vm);
        }
        Ok(())
    }

    /// A slot for a pair this host just learned of: primary of the guest running here (the pair
    /// was created, or is degraded and reconcile booted it), or a host that holds nothing yet.
    fn new_slot(&self, r: &HaPairRecord) -> Result<Arc<Slot>, HaHostError> {
        let shape = self.shape(r.vm)?;
        let durable = self.load_durable(r.vm)?;
        let core = PairHost::new(self.me, r.vm, shape, self.tun.clone(), durable);
        let slot = Arc::new(Slot {
            vm: r.vm,
            state: Mutex::new(PairSlot {
                core,
                pending: BTreeMap::new(),
                issued: 0,
                released: 0,
                app: Doc::new(),
                standby_app: None,
                epochs: 0,
                epoch_bytes: 0,
                took_over_from: None,
            }),
            released: tokio::sync::watch::channel(0).0,
            beat: Mutex::new(None),
        });
        lock(&self.slots).insert(r.vm, slot.clone());
        info!(vm = %r.vm, generation = r.generation, "HA pair followed on this host");
        Ok(slot)
    }

    /// If this host holds nothing of the pair but runs its guest as the catalog's primary, it
    /// becomes the primary of the running guest: the pair was created for a VM running here
    /// (whatever generation the record reached before this host first read it — the leader may
    /// already have given it a standby), or it is degraded and reconcile booted the guest.
    /// Reconcile boots no guest for a protected pair (`owns`), so a guest here with nothing of
    /// the pair held is one of those two.
    fn adopt_running_guest(&self, slot: &Slot, r: &HaPairRecord) {
        let mut s = lock(&slot.state);
        let idle = matches!(s.core.role(), Role::Idle);
        if !idle || r.primary != self.me || self.vms.instance(r.vm).is_none() {
            return;
        }
        let Ok(shape) = self.shape(r.vm) else { return };
        match PairHost::running_here(self.me, r, shape, self.tun.clone(), s.issued, self.now_ms()) {
            Ok((core, fx)) => {
                let durable = s.core.durable;
                s.core = core;
                s.core.durable = durable;
                if let Some(inst) = self.vms.instance(r.vm) {
                    inst.guest.start_dirty_log();
                }
                info!(vm = %r.vm, generation = r.generation, "HA primary of the guest running here");
                self.run_effects(slot, &mut s, fx);
            }
            Err(e) => warn!(vm = %r.vm, error = %e, "cannot protect the guest running here"),
        }
    }

    /// A multi-operation standby runs its own guest beside the primary's (its outputs go
    /// nowhere until it takes over); in any other role this host runs no standby guest.
    fn standby_guest(&self, slot: &Slot, r: &HaPairRecord) {
        let s = lock(&slot.state);
        let standby_here = matches!(s.core.role(), Role::Standby(_));
        let primary_here = matches!(s.core.role(), Role::Primary(_));
        drop(s);
        // Also while the catalog already names this host primary and the takeover order is on
        // its way: the standby's running guest is the one that takes over.
        let wanted = standby_here && r.mode == HaMode::MultiOperation;
        let have = self.vms.instance(r.vm);
        match (wanted, have) {
            (true, None) => {
                let Ok(spec) = self.vms.spec_of(r.vm) else { return };
                let guest: Arc<dyn GuestDriver> = SimulatedGuest::new(spec);
                self.vms.install_guest(r.vm, guest.clone(), r.generation, Origin::HaStandby);
                if self.vms.lease_valid() {
                    let _ = guest.start();
                }
                info!(vm = %r.vm, "multi-operation standby: the guest runs here beside the primary's");
            }
            // A standby's guest goes when this host stops being the multi-operation standby (the
            // pair switched to redundant mode, or another host was made standby — chaos seed 21
            // found it running on beside the pair's two for good); once it took over it stays.
            (false, Some(inst)) if !primary_here && inst.origin == Origin::HaStandby => {
                self.vms.discard_guest(r.vm);
                info!(vm = %r.vm, "no longer the multi-operation standby: the standby's guest stops");
            }
            _ => {}
        }
    }

    fn drop_slot(&self, vm: VmId) {
        let Some(slot) = lock(&self.slots).remove(&vm) else { return };
        let mut s = lock(&slot.state);
        // Unprotected now: what waited for the standby goes out.
        let upto = s.issued;
        let generation = s.core.generation();
        self.release(&slot, &mut s, upto, generation);
        let standby_guest = self.vms.instance(vm).is_some_and(|i| i.origin == Origin::HaStandby);
        if standby_guest && !matches!(s.core.role(), Role::Primary(_)) {
            self.vms.discard_guest(vm);
        }
        let _ = std::fs::remove_file(self.durable_path(vm));
        info!(%vm, "HA pair gone; this host no longer follows it");
    }

    fn shape(&self, vm: VmId) -> Result<ImageShape, HaHostError> {
        let spec = self.vms.spec_of(vm).map_err(|e| HaHostError::internal(e.to_string()))?;
        Ok(ImageShape { pages: spec.memory_pages, page_size: VM_PAGE_SIZE as u32 })
    }

    // ---- stepping the core ------------------------------------------------------------------

    /// Run one core step on `slot` and carry out its effects.
    fn step(
        &self,
        slot: &Slot,
        f: impl FnOnce(&mut PairHost) -> Result<Vec<Effect>, super::core::HaError>,
    ) -> Result<(), super::core::HaError> {
        let mut s = lock(&slot.state);
        let fx = f(&mut s.core)?;
        self.run_effects(slot, &mut s, fx);
        Ok(())
    }

    fn run_effects(&self, slot: &Slot, s: &mut PairSlot, fx: Vec<Effect>) {
        let mut queue: std::collections::VecDeque<Effect> = fx.into();
        while let Some(effect) = queue.pop_front() {
            let more = self.effect(slot, s, effect);
            for e in more.into_iter().rev() {
                queue.push_front(e);
            }
        }
    }

    /// Carry out one effect; what the core answers to it comes back to run next.
    fn effect(&self, slot: &Slot, s: &mut PairSlot, effect: Effect) -> Vec<Effect> {
        let vm = slot.vm;
        let now = self.now_ms();
        match effect {
            Effect::Persist(d) => {
                if let Err(e) = self.persist(vm, &d) {
                    // Without the seal on disk nothing after it may happen: stop here, loudly.
                    panic!("{vm}: persisting the HA seal failed: {e}");
                }
                Vec::new()
            }
            Effect::Send { to, msg } => {
                self.send(to, msg);
                Vec::new()
            }
            Effect::PauseAndCapture { epoch, full } => self.capture(s, vm, epoch, full, now),
            Effect::Unpause => {
                self.unpause(vm);
                Vec::new()
            }
            Effect::CaptureAppState { token } => {
                let state = bincode::serialize(&s.app).unwrap_or_default();
                s.core.on_app_state(token, s.issued, state, now).unwrap_or_else(|e| {
                    warn!(%vm, error = %e, "application state capture refused");
                    Vec::new()
                })
            }
            Effect::Release { upto, generation } => {
                self.release(slot, s, upto, generation);
                Vec::new()
            }
            Effect::ReleaseAgain { seqs, generation } => {
                debug!(%vm, ?seqs, generation, "outputs to release again (the sink refused them)");
                Vec::new()
            }
            Effect::StartGuest { generation, state } => {
                self.start_guest(s, vm, generation, state);
                Vec::new()
            }
            Effect::StopGuest => {
                if let Some(inst) = self.vms.instance(vm) {
                    let _ = inst.guest.pause();
                }
                info!(%vm, "deposed: the guest is stopped and kept");
                Vec::new()
            }
            Effect::RestartGuest => {
                self.unpause(vm);
                Vec::new()
            }
            Effect::DiscardGuest => {
                self.vms.discard_guest(vm);
                s.pending.clear();
                Vec::new()
            }
            Effect::RefreshRecord => {
                if let Ok(Some(r)) = crate::catalog::ha::pair(self.vms.store(), vm) {
                    return s.core.on_record(&r, now).unwrap_or_default();
                }
                Vec::new()
            }
            Effect::Metric(m) => {
                self.metric(s, vm, m);
                Vec::new()
            }
        }
    }

    fn send(&self, to: NodeId, msg: HaMessage) {
        let registry = self.registry.clone();
        let from = self.me;
        tokio::spawn(async move {
            let kind = ha_message_name(&msg);
            if let Err(e) = registry.send_timeout(actor(to), ActorMessage::Ha { from, msg }, SEND_TIMEOUT).await {
                debug!(%to, kind, error = %e, "HA message not delivered (the sender's core resends)");
            }
        });
    }

    // ---- the guest --------------------------------------------------------------------------

    /// Pause the guest, read the pages of epoch `epoch` and its device state, hand them to the
    /// core. The run state is held from reconcile until the core's `Unpause`.
    fn capture(&self, s: &mut PairSlot, vm: VmId, epoch: u64, full: bool, now: u64) -> Vec<Effect> {
        let Some(inst) = self.vms.instance(vm) else {
            warn!(%vm, epoch, "capture asked but no guest runs here");
            return Vec::new();
        };
        let guest = inst.guest.clone();
        let began = Instant::now();
        let (pages, device_state) = self.vms.with_run_state_held(vm, || {
            let was_running = guest.state() == RunState::Running;
            let _ = guest.pause();
            let pages = read_pages(guest.as_ref(), full);
            let device = encode_device_state(&guest.vcpu_state(), &s.app);
            if was_running {
                // Resumed right away: the core's `Unpause` follows the capture at once, and the
                // copy above is already the epoch's consistent cut.
                let _ = guest.resume();
            }
            (pages, device)
        });
        metrics::histogram!("haven_ha_capture_pause_seconds").record(began.elapsed().as_secs_f64());
        s.core.on_captured(epoch, pages, device_state, now).unwrap_or_else(|e| {
            warn!(%vm, epoch, error = %e, "capture result refused");
            Vec::new()
        })
    }

    fn unpause(&self, vm: VmId) {
        let Some(inst) = self.vms.instance(vm) else { return };
        let desired_running = crate::catalog::vms::vm(self.vms.store(), vm)
            .ok()
            .flatten()
            .is_some_and(|r| r.desired == haven_proto::vm::VmRunState::Running && r.host == self.me);
        if desired_running && self.vms.lease_valid() && inst.guest.state() == RunState::Paused {
            let _ = inst.guest.resume();
        }
    }

    /// Start the VM here from the standby's state (the catalog names this host its primary).
    fn start_guest(&self, s: &mut PairSlot, vm: VmId, generation: u64, state: TakeoverState) {
        let point = state.point().1;
        s.issued = state.outputs();
        s.released = s.issued;
        s.took_over_from = Some(point);
        match state {
            TakeoverState::Image(image) => match self.guest_from_image(vm, &image) {
                Ok((guest, app)) => {
                    s.app = app;
                    guest.start_dirty_log();
                    self.vms.install_guest(vm, guest.clone(), generation, Origin::TakenOver);
                    if self.vms.lease_valid() {
                        let _ = guest.start();
                    }
                    info!(%vm, generation, epoch = image.epoch, "took over from the last complete checkpoint");
                }
                Err(e) => warn!(%vm, error = %e, "the checkpoint does not load; the VM cannot start here"),
            },
            TakeoverState::App(app) => {
                s.app = match s.standby_app.take() {
                    Some((applied, doc)) if applied == app.applied() => doc,
                    _ => fold_app_state(&app).unwrap_or_else(|e| {
                        warn!(%vm, error = %e, "the mirrored application state does not fold; starting empty");
                        Doc::new()
                    }),
                };
                // The standby's own guest runs on as the primary's.
                if let Some(inst) = self.vms.instance(vm) {
                    inst.guest.start_dirty_log();
                } else if let Ok(spec) = self.vms.spec_of(vm) {
                    let guest: Arc<dyn GuestDriver> = SimulatedGuest::new(spec);
                    self.vms.install_guest(vm, guest.clone(), generation, Origin::TakenOver);
                    let _ = guest.start();
                }
                info!(%vm, generation, applied = app.applied(), "took over with the mirrored application state");
            }
        }
    }

    fn guest_from_image(
        &self,
        vm: VmId,
        image: &super::core::standby::Image,
    ) -> Result<(Arc<dyn GuestDriver>, Doc), String> {
        let spec = self.vms.spec_of(vm).map_err(|e| e.to_string())?;
        let guest: Arc<dyn GuestDriver> = SimulatedGuest::new(spec);
        for (page, bytes) in &image.pages {
            let mut full = vec![0u8; VM_PAGE_SIZE as usize];
            full[..bytes.len()].copy_from_slice(bytes);
            guest.write_page(*page, &full).map_err(|e| e.to_string())?;
        }
        let (vcpu, app) = decode_device_state(&image.device_state)?;
        guest.load_vcpu_state(vcpu).map_err(|e| e.to_string())?;
        Ok((guest, app))
    }

    // ---- outputs ----------------------------------------------------------------------------

    /// Release outputs `..=upto`: disk writes go to their volumes tagged with `generation`
    /// (the volume refuses them once it saw a newer one), puts are answered.
    fn release(&self, slot: &Slot, s: &mut PairSlot, upto: u64, generation: u64) {
        let due: Vec<u64> = s.pending.range(..=upto).map(|(k, _)| *k).collect();
        for seq in due {
            if let Some(Pending::Disk { write, guest }) = s.pending.remove(&seq) {
                let volumes = self.vms.volumes().clone();
                crate::vm::disk_backend::perform(volumes, guest, slot.vm, write, Some(generation));
            }
        }
        s.released = s.released.max(upto);
        slot.released.send_replace(s.released);
    }

    /// A new output of the primary: the next sequence number, held until released.
    fn issue(&self, slot: &Slot, s: &mut PairSlot, pending: Pending, data: Vec<u8>) -> Result<u64, HaHostError> {
        let seq = s.issued + 1;
        let fx = s.core.on_output(seq, data, self.now_ms()).map_err(|e| HaHostError::NotPrimary(e.to_string()))?;
        s.issued = seq;
        s.pending.insert(seq, pending);
        self.run_effects(slot, s, fx);
        Ok(seq)
    }

    /// An application or HA status request about a VM this host follows.
    pub async fn request(&self, req: VmRequest) -> Result<VmResponse, HaHostError> {
        match req {
            VmRequest::AppPut { vm, key, value } => {
                self.app_put(vm, key, value).await.map(|seq| VmResponse::AppPut { seq })
            }
            VmRequest::AppGet { vm } => self.app_get(vm).map(VmResponse::App),
            VmRequest::HaStatus { vm, .. } => self.status(vm).map(VmResponse::Ha),
            other => Err(HaHostError::Invalid(format!("not an HA request: {other:?}"))),
        }
    }

    /// Set `key` in the VM's application state; answered once released (the standby has it).
    pub async fn app_put(&self, vm: VmId, key: String, value: Option<Vec<u8>>) -> Result<u64, HaHostError> {
        let slot = self.slot(vm).ok_or(HaHostError::NotProtected(vm))?;
        let seq = {
            let mut s = lock(&slot.state);
            if !matches!(s.core.role(), Role::Primary(_)) {
                return Err(HaHostError::NotPrimary(format!("{} is not {vm}'s primary", self.me)));
            }
            let old = s.app.clone();
            s.app.set(&key, value).map_err(|e| HaHostError::Invalid(e.to_string()))?;
            let update = encode_update(&old, &s.app);
            self.issue(&slot, &mut s, Pending::App, update)?
        };
        let mut rx = slot.released.subscribe();
        let released = tokio::time::timeout(PUT_WAIT, rx.wait_for(|released| *released >= seq)).await;
        match released.map(|r| r.is_ok()) {
            Ok(true) => Ok(seq),
            _ => Err(HaHostError::Unavailable(format!(
                "update {seq} of {vm} was not acknowledged by the standby within {PUT_WAIT:?}"
            ))),
        }
    }

    pub fn app_get(&self, vm: VmId) -> Result<AppView, HaHostError> {
        let slot = self.slot(vm).ok_or(HaHostError::NotProtected(vm))?;
        let s = lock(&slot.state);
        if !matches!(s.core.role(), Role::Primary(_)) {
            return Err(HaHostError::NotPrimary(format!("{} is not {vm}'s primary", self.me)));
        }
        Ok(AppView {
            vm,
            host: self.me,
            generation: s.core.generation(),
            applied: s.released,
            entries: s.app.entries(),
        })
    }

    pub fn status(&self, vm: VmId) -> Result<HaVmStatus, HaHostError> {
        let slot = self.slot(vm).ok_or(HaHostError::NotProtected(vm))?;
        let s = lock(&slot.state);
        let now = self.now_ms();
        let mut st = HaVmStatus {
            vm,
            host: self.me,
            generation: s.core.generation(),
            outputs_issued: s.issued,
            outputs_released: s.released,
            epochs: s.epochs,
            epoch_bytes_mean: s.epoch_bytes.checked_div(s.epochs).unwrap_or(0),
            took_over_from: s.took_over_from,
            ..Default::default()
        };
        st.role = match s.core.role() {
            Role::Idle => "none",
            Role::Primary(p) => {
                st.pause_p50_ms = p.accounting.pause_quantile_ms(0.5);
                st.pause_p99_ms = p.accounting.pause_quantile_ms(0.99);
                st.epochs_acked = p.accounting.acked;
                st.mirror_lag_ms = p.mirror_lag_ms(now);
                "primary"
            }
            Role::Standby(sb) => {
                st.standby_point = sb.point();
                if sb.ready() {
                    "standby-ready"
                } else {
                    "standby-syncing"
                }
            }
            Role::Deposed { .. } => "deposed",
        }
        .to_string();
        Ok(st)
    }

    // ---- messages ---------------------------------------------------------------------------

    /// A message from `from`'s HA driver or the leader.
    pub fn on_message(&self, from: NodeId, msg: HaMessage) {
        match &msg {
            HaMessage::Heartbeat(_) | HaMessage::TookOver { .. } | HaMessage::CannotTakeOver { .. } => {
                self.leader.on_message(from, &msg);
                return;
            }
            _ => {}
        }
        let Some(vm) = msg.vm() else { return };
        let slot = match self.slot(vm) {
            Some(s) => s,
            None => {
                // A pair this host has not read yet: read the records and look again.
                let _ = self.follow_records();
                match self.slot(vm) {
                    Some(s) => s,
                    None => return debug!(%vm, %from, "HA message for a pair this host does not follow"),
                }
            }
        };
        let now = self.now_ms();
        let mut s = lock(&slot.state);
        match s.core.on_message(from, &msg, now) {
            Ok(fx) => {
                self.fold_standby_app(&mut s);
                self.run_effects(&slot, &mut s, fx)
            }
            Err(e) => {
                debug!(%vm, %from, error = %e, "HA message refused");
                if let Some(reply) = refusal_message(vm, &msg, &e) {
                    self.send(from, reply);
                }
            }
        }
    }

    /// A multi-operation standby keeps a folded copy of the application state as updates come:
    /// only the updates after its copy are applied, and every [`COMPACT_EVERY`] updates the
    /// core's state is compacted to the folded copy (so neither grows with the update count).
    fn fold_standby_app(&self, s: &mut PairSlot) {
        let Some(app) = s.core.standby().and_then(|sb| sb.app_state()) else {
            s.standby_app = None;
            return;
        };
        let folded = match s.standby_app.take() {
            Some((applied, mut doc)) if applied >= app.snapshot_seq && applied <= app.applied() => {
                let newer = app.updates.iter().filter(|(seq, _)| *seq > applied);
                apply_updates(&mut doc, newer).map(|()| doc)
            }
            _ => fold_app_state(app),
        };
        let applied = app.applied();
        let backlog = app.updates.len();
        match folded {
            Ok(doc) => {
                if backlog >= COMPACT_EVERY {
                    let snapshot = bincode::serialize(&doc).unwrap_or_default();
                    if let Some(sb) = s.core.standby_mut() {
                        sb.compact_app(applied, snapshot);
                    }
                }
                s.standby_app = Some((applied, doc));
            }
            Err(e) => warn!(vm = %s.core.vm, error = %e, "the mirrored application state does not fold"),
        }
    }

    fn heartbeat(&self) {
        let slots: Vec<_> = lock(&self.slots).values().cloned().collect();
        let pairs: Vec<PairStatus> = slots
            .iter()
            .filter_map(|slot| {
                let mut last = lock(&slot.beat);
                match slot.state.try_lock() {
                    Ok(s) => *last = Some(s.core.status()),
                    // Never beaten yet: wait for the step (a missing line would read as "holds
                    // nothing" to the leader).
                    Err(_) if last.is_none() => *last = Some(lock(&slot.state).core.status()),
                    Err(_) => {}
                }
                *last
            })
            .collect();
        let seq = self.beat_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let beat = HaHeartbeat { host: self.me, incarnation: crate::actors::incarnation(), seq, pairs };
        if let Some(leader) = self.leader.leader_id() {
            let msg = HaMessage::Heartbeat(beat);
            if leader == self.me {
                self.leader.on_message(self.me, &msg);
            } else {
                self.send(leader, msg);
            }
        }
    }

    fn metric(&self, s: &mut PairSlot, vm: VmId, m: HaMetric) {
        let label = vm.to_string();
        match m {
            HaMetric::Epoch(r) => {
                s.epochs += 1;
                s.epoch_bytes += r.bytes;
                metrics::histogram!("haven_ha_epoch_bytes", "vm" => label.clone()).record(r.bytes as f64);
                metrics::histogram!("haven_ha_epoch_pages", "vm" => label.clone()).record(r.pages as f64);
                metrics::histogram!("haven_ha_epoch_length_seconds", "vm" => label.clone())
                    .record(r.epoch_ms as f64 / 1000.0);
                metrics::histogram!("haven_ha_checkpoint_pause_seconds", "vm" => label)
                    .record(r.pause_ms as f64 / 1000.0);
            }
            HaMetric::EpochAcked { lag_ms, .. } | HaMetric::UpdateAcked { lag_ms, .. } => {
                metrics::gauge!("haven_ha_mirror_lag_seconds", "vm" => label).set(lag_ms as f64 / 1000.0);
            }
        }
    }

    // ---- the seal on disk ---------------------------------------------------------------------

    fn durable_path(&self, vm: VmId) -> PathBuf {
        self.dir.join(format!("{}.durable", vm.0))
    }

    fn load_durable(&self, vm: VmId) -> Result<Durable, HaHostError> {
        let path = self.durable_path(vm);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| HaHostError::Corrupt(path.display().to_string(), e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Durable::default()),
            Err(e) => Err(HaHostError::io(&path, e)),
        }
    }

    /// Write `d` to a temporary file, fsync it, rename it into place and fsync the directory.
    fn persist(&self, vm: VmId, d: &Durable) -> Result<(), HaHostError> {
        use std::io::Write;
        let path = self.durable_path(vm);
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec(d).map_err(HaHostError::internal)?;
        let mut f = std::fs::File::create(&tmp).map_err(|e| HaHostError::io(&tmp, e))?;
        f.write_all(&bytes).and_then(|_| f.sync_all()).map_err(|e| HaHostError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| HaHostError::io(&path, e))?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| HaHostError::io(&self.dir, e))
    }
}

impl HaGate for Arc<HaHost> {
    fn owns(&self, vm: VmId) -> bool {
        HaHost::owns(self, vm)
    }

    fn disk_write(&self, vm: VmId, write: DiskWrite, guest: &Arc<dyn GuestDriver>) -> Option<DiskWrite> {
        HaHost::disk_write(self, vm, write, guest)
    }

    fn holds_run_state(&self, vm: VmId) -> bool {
        // Chaos (ha-pairs, a primary frozen then woken): reconcile resumed the guest a seal had
        // just stopped, because the failover had not reached this host's catalog yet.
        self.slot(vm).is_some_and(|slot| matches!(lock(&slot.state).core.role(), Role::Deposed { .. }))
    }

    fn request(&self, req: VmRequest) -> BoxFuture<'static, Result<VmResponse, WireError>> {
        let host = self.clone();
        Box::pin(async move { HaHost::request(&host, req).await.map_err(WireError::from) })
    }
}

impl HaHost {
    fn owns(&self, vm: VmId) -> bool {
        // Before this driver first read the pair (a restart: reconcile may run first), the
        // catalog decides: a protected pair's VM is its standby's checkpoint, never a fresh boot.
        let Some(slot) = self.slot(vm) else {
            return crate::catalog::ha::pair(self.vms.store(), vm)
                .ok()
                .flatten()
                .is_some_and(|r| r.state != PairState::Degraded);
        };
        let s = lock(&slot.state);
        match s.core.role() {
            // A new primary's guest stays even while this host's catalog still places the VM
            // on the old primary (the takeover order can overtake the commit's apply here).
            Role::Standby(_) | Role::Deposed { .. } | Role::Primary(_) => true,
            // After a restart: the standby's checkpoint, not a fresh boot, is the VM — unless no
            // standby exists, and then booting here is all there is.
            Role::Idle => s.core.record().is_some_and(|r| r.state != PairState::Degraded),
        }
    }

    fn disk_write(&self, vm: VmId, write: DiskWrite, guest: &Arc<dyn GuestDriver>) -> Option<DiskWrite> {
        let Some(slot) = self.slot(vm) else { return Some(write) };
        let mut s = lock(&slot.state);
        if !matches!(s.core.role(), Role::Primary(_)) {
            // A standby's or deposed guest writes nothing; the write is failed and issued again
            // if this guest ever becomes the VM.
            guest.complete_disk_write(write.volume, write.seq, false);
            return None;
        }
        let (volume, seq) = (write.volume, write.seq);
        let pending = Pending::Disk { write, guest: guest.clone() };
        if let Err(e) = self.issue(&slot, &mut s, pending, Vec::new()) {
            // Failed back to the guest (it issues the write again), never left in flight.
            warn!(%vm, error = %e, "disk write not taken as an HA output");
            guest.complete_disk_write(volume, seq, false);
        }
        None
    }
}

/// Every page (`full`: the nonzero ones, resetting the dirty log) or the pages written since the
/// last capture, read from a paused guest.
fn read_pages(guest: &dyn GuestDriver, full: bool) -> Vec<(u64, Vec<u8>)> {
    let dirty = guest.take_dirty();
    let pages: Vec<u64> = if full {
        (0..guest.spec().memory_pages).filter(|p| !guest.is_zero_page(*p).unwrap_or(false)).collect()
    } else {
        dirty
    };
    pages
        .into_iter()
        .filter_map(|p| {
            let mut buf = vec![0u8; VM_PAGE_SIZE as usize];
            guest.read_page(p, &mut buf).ok().map(|_| (p, buf))
        })
        .collect()
}

/// Device state: the vCPU part's length (u64 LE), the vCPU part, the application document.
fn encode_device_state(vcpu: &[u8], app: &Doc) -> Vec<u8> {
    let app = bincode::serialize(app).unwrap_or_default();
    let mut out = Vec::with_capacity(DEVICE_HEADER + vcpu.len() + app.len());
    out.extend_from_slice(&(vcpu.len() as u64).to_le_bytes());
    out.extend_from_slice(vcpu);
    out.extend_from_slice(&app);
    out
}

fn decode_device_state(b: &[u8]) -> Result<(&[u8], Doc), String> {
    let header: [u8; DEVICE_HEADER] =
        b.get(..DEVICE_HEADER).and_then(|h| h.try_into().ok()).ok_or("device state shorter than its header")?;
    let n = u64::from_le_bytes(header) as usize;
    let vcpu =
        b.get(DEVICE_HEADER..DEVICE_HEADER.saturating_add(n)).ok_or("device state shorter than its vCPU part")?;
    let app = bincode::deserialize(&b[DEVICE_HEADER + n..]).map_err(|e| format!("application state: {e}"))?;
    Ok((vcpu, app))
}

/// The C2 diff from `old` to `new` (one key changed), as an update's bytes.
fn encode_update(old: &Doc, new: &Doc) -> Vec<u8> {
    bincode::serialize(&doc::diff(old, new)).unwrap_or_default()
}

/// A standby's application state: its snapshot with every update after it applied.
fn fold_app_state(app: &super::core::mirror::AppState) -> Result<Doc, String> {
    let mut d: Doc = if app.snapshot.is_empty() {
        Doc::new()
    } else {
        bincode::deserialize(&app.snapshot).map_err(|e| format!("application snapshot: {e}"))?
    };
    apply_updates(&mut d, app.updates.iter())?;
    Ok(d)
}

/// Apply updates (C2 diffs, in order) to `d`; an empty update changed no application state.
fn apply_updates<'a>(d: &mut Doc, updates: impl Iterator<Item = &'a (u64, Vec<u8>)>) -> Result<(), String> {
    for (seq, bytes) in updates.filter(|(_, b)| !b.is_empty()) {
        let diff: ShareDiff = bincode::deserialize(bytes).map_err(|e| format!("update {seq}: {e}"))?;
        doc::apply_strict(d, &diff).map_err(|e| format!("update {seq}: {e}"))?;
    }
    Ok(())
}

fn ha_message_name(msg: &HaMessage) -> &'static str {
    match msg {
        HaMessage::Checkpoint(_) => "checkpoint",
        HaMessage::CheckpointAck(_) => "checkpoint_ack",
        HaMessage::AppSnapshot(_) => "app_snapshot",
        HaMessage::AppUpdate(_) => "app_update",
        HaMessage::AppAck(_) => "app_ack",
        HaMessage::Seal { .. } => "seal",
        HaMessage::TakeOver { .. } => "take_over",
        HaMessage::TookOver { .. } => "took_over",
        HaMessage::CannotTakeOver { .. } => "cannot_take_over",
        HaMessage::Refused { .. } => "refused",
        HaMessage::Heartbeat(_) => "heartbeat",
    }
}
