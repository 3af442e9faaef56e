//! The leader's migration-plan controller (C1): drives every plan that is not final through
//! `Snapshotting → Migrating → Consolidating → Succeeded`, or through `FailingBack → FailedBack`
//! on any failure, and deletes a final plan's recovery images.
//!
//! Every step is idempotent and starts from the catalog: a new leader adopts each plan it finds
//! (`PlanCommand::Adopt`, recorded in the step log) and continues from the plan's state and the
//! VMs' records — a half-taken snapshot is taken again (the host's job joins or repeats it), a
//! VM found migrating is followed, a VM found at the source after its migration was recorded as
//! started has failed. Every state change is a compare-and-set carrying this leader's term, so a
//! deposed leader's controller cannot move a plan. A plan is never abandoned: forward steps fail
//! back on any error or on the plan's deadline; fail-back steps retry until every VM runs at the
//! source again.
//!
//! Fail-back: cancel in-flight migrations (those VMs keep running at the source); VMs that
//! arrived come back by live migration if the destination answers; otherwise — or if a VM at the
//! source lost its memory (its host restarted), or a migration back fails — the whole group is
//! restored at the source from the recovery snapshot (`RestoreGroup` forces every VM back to the
//! source with a generation bump, then the source installs each guest from its image). Then each
//! VM is checked at the source (`check_memory`, running, not behind its recovery point).
//!
//! Fencing: a destination that does not answer may only be cut off, its copies still running.
//! Before restoring a group some of whose VMs had left the source, the controller waits until
//! the destination can no longer hold a host lease (`vm::fence`): its last acknowledged
//! AppendEntries (`raft::network::PeerAcks`) — or, without one from this term, this leader's
//! election — is older than `fence_after_ms` + `clock_margin_ms`. By then it has paused its
//! guests, and it resumes none before its catalog shows the group moved back. If it answers
//! again before the group is placed back, fail-back takes the live path instead; if it answers
//! after, the restore waits until it holds none of the group's VMs. The wait is in the step log.
//!
//! This module proposes catalog commands through the `Proposer` and asks hosts to act by message;
//! it must not write storage directly or touch guests itself. It keeps no state a new leader
//! would need.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use haven_proto::plan::{
    FailBackMode, GroupRequest, GroupResponse, MigrationPlan, PlanCommand, PlanOutcome, PlanPatch, PlanState,
    PlanVmPhase, RecoveryPoint,
};
use haven_proto::vm::{VmRecord, VmRequest, VmResponse, VmRunState, VmStatus};
use haven_proto::{
    ActorAddr, ActorMessage, ActorReply, CatalogCommand, ClientResponse, CommandOutcome, ErrorCode, NodeId, VmId,
    WireError,
};
use openraft::ServerState;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::plan_step::{self, ms_text, BackEnd, FailBackRoute, GuestSeen, MigrateEnd, MigrateMemory, Unverified};
use super::LeaderHandles;
use crate::catalog;
use crate::config::{FenceTunables, PlanTunables};
use crate::raft::network::PeerAcks;
use crate::vm::host::VmHost;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What the plan controller needs besides the [`LeaderHandles`]: the local VM host (group jobs
/// on this node), the peers' last acknowledgements and the fencing timing (to wait out a silent
/// destination's host lease).
pub struct PlanDeps {
    pub vms: Arc<VmHost>,
    pub peer_acks: PeerAcks,
    pub fence: FenceTunables,
}

/// Run until the process ends; acts only while this node leads.
pub async fn run(leader: LeaderHandles, deps: PlanDeps, t: PlanTunables) {
    let deps = Arc::new(deps);
    let poll = Duration::from_millis(t.poll_ms.max(10));
    let mut tasks: HashMap<u64, JoinHandle<()>> = HashMap::new();
    let mut term: Option<u64> = None;
    let mut leading_since = Instant::now();
    let mut rounds = 0u64;
    loop {
        tokio::time::sleep(poll).await;
        let (state, current_term) = {
            let m = leader.view.metrics();
            let m = m.borrow();
            (m.state, m.current_term)
        };
        let leading = state == ServerState::Leader;
        if !leading || term != Some(current_term) {
            for (_, h) in tasks.drain() {
                h.abort();
            }
            term = leading.then_some(current_term);
            leading_since = Instant::now();
            rounds = 0;
            if !leading {
                continue;
            }
        }
        tasks.retain(|_, h| !h.is_finished());
        // Non-final plans every round (cheap: an index); final plans still holding recovery
        // images now and then (a scan of every plan).
        let plans = if rounds == 0 {
            catalog::plans::plans_needing_work(&leader.store)
        } else {
            catalog::plans::active_plans(&leader.store)
        };
        rounds = (rounds + 1) % 50;
        let Ok(plans) = plans else { continue };
        for p in plans {
            if tasks.contains_key(&p.id) || !p.needs_work() {
                continue;
            }
            let driver = Driver {
                leader: leader.clone(),
                deps: deps.clone(),
                t: t.clone(),
                term: current_term,
                leading_since,
                poll,
            };
            tasks.insert(p.id, tokio::spawn(driver.drive(p.id)));
        }
    }
}

/// Why a step did not complete.
#[derive(Debug)]
enum StepError {
    /// The plan must fail back, for this reason.
    Fail(String),
    /// Transient: try the step again later.
    Retry(String),
    /// This node no longer leads (or the plan is gone): stop driving.
    Lost,
}

use StepError::{Fail, Lost, Retry};

type Step = Result<(), StepError>;

/// Drives one plan for one leadership term.
struct Driver {
    leader: LeaderHandles,
    deps: Arc<PlanDeps>,
    t: PlanTunables,
    term: u64,
    /// When this node's controller saw it become leader in `term` (no earlier than the election).
    leading_since: Instant,
    poll: Duration,
}

/// What may end the wait for a silent destination to fence itself, besides its lease running out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FenceWait {
    /// Before the group is placed back: the destination answering again (fail-back then
    /// migrates the VMs back live).
    UnlessItAnswers,
    /// After: the destination answering that it holds none of the group's VMs.
    OrItHoldsNone,
}

impl Driver {
    fn me(&self) -> NodeId {
        self.leader.view.id()
    }

    fn leading(&self) -> bool {
        let m = self.leader.view.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_term == self.term
    }

    fn load(&self, id: u64) -> Result<MigrationPlan, StepError> {
        match catalog::plans::plan(&self.leader.store, id) {
            Ok(Some(p)) => Ok(p),
            Ok(None) => Err(Lost),
            Err(e) => Err(Retry(format!("reading plan {id}: {e}"))),
        }
    }

    fn record(&self, vm: VmId) -> Result<Option<VmRecord>, StepError> {
        catalog::vms::vm(&self.leader.store, vm).map_err(|e| Retry(format!("reading {vm}: {e}")))
    }

    async fn drive(self, id: u64) {
        let mut backoff = self.poll;
        let mut last_retry = String::new();
        let mut adopted = false;
        loop {
            if !self.leading() {
                return;
            }
            let plan = match self.load(id) {
                Ok(p) => p,
                Err(Lost) => return,
                Err(e) => {
                    warn!(plan = id, error = ?e, "plan unreadable");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if !adopted && !plan.state.is_terminal() {
                let cmd = PlanCommand::Adopt { id, term: self.term, leader: self.me(), at_ms: now_ms() };
                match self.propose(cmd).await {
                    Ok(_) => adopted = true,
                    Err(e) => {
                        if !self.leading() {
                            return;
                        }
                        warn!(plan = id, error = ?e, "could not adopt the plan");
                        tokio::time::sleep(backoff).await;
                        continue;
                    }
                }
            }
            let result = if let Some(why) = plan_step::deadline_failure(&plan, now_ms()) {
                Err(Fail(why))
            } else {
                match plan.state {
                    PlanState::Created => {
                        let note = format!("taking the recovery snapshot of the group on {}", plan.from);
                        self.advance(&plan, PlanState::Snapshotting, PlanPatch::None, note).await
                    }
                    PlanState::Snapshotting => self.snapshot(&plan).await,
                    PlanState::Migrating => self.migrate(&plan).await,
                    PlanState::Consolidating => self.consolidate(&plan).await,
                    PlanState::FailingBack => self.fail_back(&plan).await,
                    PlanState::Succeeded | PlanState::FailedBack => match self.release(&plan).await {
                        Ok(()) => return,
                        Err(e) => Err(e),
                    },
                }
            };
            match result {
                Ok(()) => {
                    backoff = self.poll;
                    last_retry.clear();
                }
                Err(Lost) => return,
                Err(Fail(reason)) => {
                    warn!(plan = id, %reason, "plan fails back");
                    let plan = match self.load(id) {
                        Ok(p) => p,
                        Err(_) => continue,
                    };
                    if plan.state.may_advance_to(PlanState::FailingBack) {
                        let note = format!("failing back: {reason}");
                        if let Err(e) =
                            self.advance(&plan, PlanState::FailingBack, PlanPatch::Failure(reason), note).await
                        {
                            warn!(plan = id, error = ?e, "could not record the failure; retrying");
                            tokio::time::sleep(backoff).await;
                        }
                    }
                }
                Err(Retry(reason)) => {
                    if reason != last_retry {
                        warn!(plan = id, state = %plan.state, %reason, "plan step will be retried");
                        last_retry = reason;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn propose(&self, cmd: PlanCommand) -> Result<MigrationPlan, StepError> {
        match self.leader.proposer.write(CatalogCommand::Plan(cmd), 0).await {
            Ok(ClientResponse::Written { outcome: CommandOutcome::Plan(PlanOutcome::Plan(p)), .. }) => Ok(*p),
            Ok(ClientResponse::Written {
                outcome: CommandOutcome::Plan(PlanOutcome::Refused { reason, .. }), ..
            }) => {
                if self.leading() {
                    Err(Retry(format!("refused: {reason}")))
                } else {
                    Err(Lost)
                }
            }
            Ok(other) => Err(Retry(format!("unexpected answer {other:?}"))),
            Err(e) if !self.leading() => {
                warn!(error = %e, "lost leadership while proposing a plan step");
                Err(Lost)
            }
            Err(e) => Err(Retry(e.message)),
        }
    }

    async fn advance(&self, plan: &MigrationPlan, to: PlanState, patch: PlanPatch, note: String) -> Step {
        info!(plan = plan.id, from = %plan.state, %to, %note, "plan advances");
        let cmd = PlanCommand::Advance {
            id: plan.id,
            term: self.term,
            leader: self.me(),
            expected: plan.state,
            to,
            patch,
            note,
            at_ms: now_ms(),
        };
        self.propose(cmd).await?;
        match to {
            PlanState::Succeeded => metrics::counter!("haven_plans_succeeded_total").increment(1),
            PlanState::FailedBack => metrics::counter!("haven_plans_failed_back_total").increment(1),
            _ => {}
        }
        Ok(())
    }

    /// Record where `vm` is, if that changed.
    async fn vm_phase(&self, plan: &MigrationPlan, vm: VmId, phase: PlanVmPhase, note: Option<String>) -> Step {
        let current = plan.progress.iter().find(|p| p.vm == vm);
        if current.is_some_and(|p| p.phase == phase && (note.is_none() || p.note == note)) {
            return Ok(());
        }
        let cmd = PlanCommand::VmPhase { id: plan.id, term: self.term, vm, phase, note, at_ms: now_ms() };
        self.propose(cmd).await.map(|_| ())
    }

    /// `host`'s process incarnation (it changes when the node restarts), if its agent answers.
    async fn incarnation(&self, host: NodeId) -> Option<u64> {
        let wait = Duration::from_millis((self.t.host_down_ms / 2).clamp(100, 1000));
        match self.leader.registry.send_timeout(ActorAddr::host_agent(host), ActorMessage::Describe, wait).await {
            Ok(ActorReply::Description { incarnation, .. }) => Some(incarnation),
            _ => None,
        }
    }

    async fn alive(&self, host: NodeId) -> bool {
        self.incarnation(host).await.is_some()
    }

    /// Whether the source restarted since it took the recovery snapshot: every guest it held
    /// then lost its memory.
    async fn source_restarted(&self, plan: &MigrationPlan) -> bool {
        let Some(r) = &plan.recovery else { return false };
        plan_step::source_restarted(plan, self.incarnation(r.host).await)
    }

    /// Ask `host` for a group operation and wait for its result (polling its job).
    async fn group_call(&self, host: NodeId, req: GroupRequest) -> Result<GroupResponse, WireError> {
        let deadline = Instant::now() + Duration::from_millis(self.t.group_op_timeout_ms);
        let mut silent_since: Option<Instant> = None;
        loop {
            if !self.leading() {
                return Err(WireError::new(ErrorCode::NotLeader, "lost leadership"));
            }
            let sent = self
                .leader
                .registry
                .send(ActorAddr::host_agent(host), ActorMessage::Vm(haven_proto::vm::VmMessage::Group(req.clone())))
                .await;
            match sent {
                Ok(ActorReply::Vm(VmResponse::Group(GroupResponse::Pending))) => silent_since = None,
                Ok(ActorReply::Vm(VmResponse::Group(r))) => return Ok(r),
                Ok(other) => {
                    return Err(WireError::new(ErrorCode::Internal, format!("{host} answered {other:?}")));
                }
                Err(e) if matches!(e.code, ErrorCode::Unavailable | ErrorCode::Timeout) => {
                    let since = *silent_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= Duration::from_millis(self.t.host_down_ms) {
                        return Err(WireError::new(e.code, format!("{host} does not answer: {}", e.message)));
                    }
                }
                Err(e) => return Err(e),
            }
            if Instant::now() >= deadline {
                return Err(WireError::new(
                    ErrorCode::Timeout,
                    format!("{host} did not finish within {}", ms_text(self.t.group_op_timeout_ms)),
                ));
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    async fn status(&self, vm: VmId) -> Result<VmStatus, WireError> {
        match self.deps.vms.client(VmRequest::Status { vm }).await? {
            VmResponse::Status(s) => Ok(s),
            other => Err(WireError::new(ErrorCode::Internal, format!("unexpected answer {other:?}"))),
        }
    }

    /// Why `vm`'s last migration ended, as its host reports it.
    async fn migration_reason(&self, vm: VmId) -> String {
        match self.deps.vms.client(VmRequest::MigrationProgress { vm }).await {
            Ok(VmResponse::Migration(r)) => {
                format!("{} ({})", r.phase, r.reason.unwrap_or_else(|| "no reason given".into()))
            }
            Ok(other) => format!("unexpected answer {other:?}"),
            Err(e) => format!("ended without moving it (no report: {})", e.message()),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Forward steps

    async fn snapshot(&self, plan: &MigrationPlan) -> Step {
        if let Some(why) = plan_step::snapshot_blocker(plan, &self.group_records(plan)?) {
            return Err(Fail(why));
        }
        let req = GroupRequest::Snapshot { plan: plan.id, vms: plan.vms.clone() };
        match self.group_call(plan.from, req).await {
            Ok(GroupResponse::Snapshot { images, volume_snapshots, paused_ms, incarnation }) => {
                let bytes: u64 = images.iter().map(|i| i.bytes).sum();
                let note = format!(
                    "recovery snapshot on {}: {} images, {} MiB, {} disk snapshots, group paused {paused_ms} ms; \
                     migrating up to {} at once",
                    plan.from,
                    images.len(),
                    bytes >> 20,
                    volume_snapshots.len(),
                    plan.max_parallel
                );
                let point = RecoveryPoint {
                    host: plan.from,
                    host_incarnation: incarnation,
                    taken_at_ms: now_ms(),
                    paused_ms,
                    images,
                    volume_snapshots,
                };
                self.advance(plan, PlanState::Migrating, PlanPatch::Recovery(point), note).await
            }
            Ok(other) => Err(Fail(format!("{} answered the snapshot with {other:?}", plan.from))),
            Err(e) if e.code == ErrorCode::NotLeader => Err(Lost),
            Err(e) => Err(Fail(format!("recovery snapshot on {} failed: {}", plan.from, e.message))),
        }
    }

    async fn migrate(&self, plan: &MigrationPlan) -> Step {
        let base = Instant::now();
        let mono = || base.elapsed().as_millis() as u64;
        let mut mem = MigrateMemory::default();
        loop {
            if !self.leading() {
                return Err(Lost);
            }
            let plan = self.load(plan.id)?;
            if plan.state != PlanState::Migrating {
                return Ok(()); // cancelled (or moved on): the caller reloads
            }
            if let Some(why) = plan_step::deadline_failure(&plan, now_ms()) {
                return Err(Fail(why));
            }
            // The destination must stay up and keep what it received; the source must not restart
            // (a restarted host lost its guests).
            let dest = self.incarnation(plan.to).await;
            if let Some(why) = plan_step::migrate_health(&plan, &mut mem, dest, mono(), self.t.host_down_ms) {
                return Err(Fail(why));
            }
            if self.source_restarted(&plan).await {
                return Err(Fail(plan_step::source_restart_reason(&plan)));
            }
            let records = self.group_records(&plan)?;
            let round = plan_step::migrate_round(&plan, &records, &mut mem, mono(), self.t.vm_migration_timeout_ms);
            for (vm, phase) in round.phases {
                self.vm_phase(&plan, vm, phase, None).await?;
            }
            let start = match round.end {
                MigrateEnd::Fail(why) => return Err(Fail(why)),
                MigrateEnd::TimedOut { vm, why } => {
                    let _ = self.deps.vms.client(VmRequest::CancelMigration { vm }).await;
                    self.vm_phase(&plan, vm, PlanVmPhase::Failed, Some(why.clone())).await?;
                    return Err(Fail(format!("{vm} {why}")));
                }
                MigrateEnd::Bounced { vm } => {
                    // Started (by this leader or an earlier one) and back at the source.
                    let why = self.migration_reason(vm).await;
                    self.vm_phase(&plan, vm, PlanVmPhase::Failed, Some(why.clone())).await?;
                    return Err(Fail(format!("migration of {vm} to {} failed: {why}", plan.to)));
                }
                MigrateEnd::AllArrived { note } => {
                    return self.advance(&plan, PlanState::Consolidating, PlanPatch::None, note).await
                }
                MigrateEnd::Start(vms) => vms,
            };
            for vm in start {
                let req = VmRequest::Migrate { vm, to: plan.to, options: plan.options.clone(), plan: Some(plan.id) };
                match self.deps.vms.client(req).await {
                    Ok(_) => {
                        mem.started_ms.insert(vm, mono());
                        info!(plan = plan.id, %vm, to = %plan.to, "migration started");
                        self.vm_phase(&plan, vm, PlanVmPhase::Migrating, None).await?;
                    }
                    Err(e) => {
                        if !self.leading() {
                            return Err(Lost);
                        }
                        self.vm_phase(&plan, vm, PlanVmPhase::Failed, Some(e.message())).await?;
                        return Err(Fail(format!("{vm} could not start migrating to {}: {}", plan.to, e.message())));
                    }
                }
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    async fn consolidate(&self, plan: &MigrationPlan) -> Step {
        if let Some(why) = plan_step::consolidate_blocker(plan, &self.group_records(plan)?) {
            return Err(Fail(why));
        }
        // A destination that restarted since a VM arrived booted it fresh: its memory is gone.
        let mut origins = Vec::new();
        for vm in &plan.vms {
            let s = self.status(*vm).await.map_err(|e| Retry(format!("{vm} at {}: {}", plan.to, e.message)))?;
            origins.push((*vm, s.origin));
        }
        if let Some(why) = plan_step::booted_at_destination(plan, &origins) {
            return Err(Fail(why));
        }
        let req = GroupRequest::Consolidate { plan: plan.id, vms: plan.vms.clone() };
        match self.group_call(plan.to, req).await {
            Ok(GroupResponse::Consolidated { resume_spread_ms, paused_ms, disks_moved, disks_kept }) => {
                let mut note = format!(
                    "group consistent on {}: paused together {paused_ms} ms, resumed within {resume_spread_ms} ms",
                    plan.to
                );
                if !disks_moved.is_empty() {
                    let list: Vec<String> = disks_moved.iter().map(|v| v.to_string()).collect();
                    note.push_str(&format!("; disk primaries moved here: {}", list.join(", ")));
                }
                for (vol, why) in &disks_kept {
                    note.push_str(&format!("; {vol} keeps its primary: {why}"));
                }
                let patch = PlanPatch::Consolidated { resume_spread_ms, paused_ms };
                self.advance(plan, PlanState::Succeeded, patch, note).await
            }
            Ok(other) => Err(Fail(format!("{} answered the consolidation with {other:?}", plan.to))),
            Err(e) if e.code == ErrorCode::NotLeader => Err(Lost),
            Err(e) => Err(Fail(format!("consolidation on {} failed: {}", plan.to, e.message))),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Fail-back

    /// Each VM's record in `plan.vms` order, `None` for a VM that no longer exists.
    fn group_records(&self, plan: &MigrationPlan) -> Result<Vec<Option<VmRecord>>, StepError> {
        plan.vms.iter().map(|vm| self.record(*vm)).collect()
    }

    /// The group's records; a VM that vanished is left out (it cannot run anywhere).
    fn records(&self, plan: &MigrationPlan) -> Result<Vec<VmRecord>, StepError> {
        let mut out = Vec::new();
        for vm in &plan.vms {
            match self.record(*vm)? {
                Some(r) => out.push(r),
                None => warn!(plan = plan.id, %vm, "a VM of the plan no longer exists"),
            }
        }
        Ok(out)
    }

    /// Cancel the group's migrations under way and wait (bounded) until none is.
    async fn stop_migrations(&self, plan: &MigrationPlan) -> Step {
        let deadline = Instant::now() + Duration::from_millis(self.t.cancel_wait_ms);
        let mut asked = false;
        loop {
            let moving: Vec<VmId> =
                self.records(plan)?.into_iter().filter(|r| r.migrating_to.is_some()).map(|r| r.id).collect();
            if moving.is_empty() {
                return Ok(());
            }
            if !asked {
                for vm in &moving {
                    if let Err(e) = self.deps.vms.client(VmRequest::CancelMigration { vm: *vm }).await {
                        warn!(plan = plan.id, %vm, error = %e, "cancel request not delivered; waiting for the migration to end");
                    }
                }
                asked = true;
            }
            if !self.leading() {
                return Err(Lost);
            }
            if Instant::now() >= deadline {
                let list: Vec<String> = moving.iter().map(|v| v.to_string()).collect();
                return Err(Retry(format!("waiting for the migrations of {} to stop", list.join(", "))));
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    /// Why the failing-back group can only come home from the recovery snapshot, if it must: a
    /// VM turned up elsewhere, or a host that restarted lost the guests it held — the source
    /// since the snapshot, the destination since a VM arrived (its guest there was booted fresh),
    /// or a VM at the source is behind its recovery point.
    async fn need_image(&self, plan: &MigrationPlan, records: &[VmRecord]) -> Result<Option<String>, StepError> {
        if let Some(why) = plan_step::stray(plan, records) {
            return Ok(Some(why));
        }
        if self.source_restarted(plan).await {
            return Ok(Some(format!("{} restarted since the recovery snapshot", plan.from)));
        }
        for r in records.iter().filter(|r| r.host == plan.to) {
            if let Ok(s) = self.status(r.id).await {
                if s.origin == "booted" {
                    return Ok(Some(format!("{} restarted: {} lost the memory it had received", plan.to, r.id)));
                }
            }
        }
        if plan.recovery.is_some() {
            for r in records.iter().filter(|r| r.host == plan.from) {
                let s =
                    self.status(r.id).await.map_err(|e| Retry(format!("{} at {}: {}", r.id, plan.from, e.message)))?;
                if let Some(why) = plan_step::behind_recovery_point(plan, r.id, s.last_seq) {
                    return Ok(Some(why));
                }
            }
        }
        Ok(None)
    }

    async fn fail_back(&self, plan: &MigrationPlan) -> Step {
        if plan.restore.is_some() {
            return self.finish_restore(plan).await;
        }
        self.stop_migrations(plan).await?;
        let plan = &self.load(plan.id)?;
        let records = self.records(plan)?;
        let need_image = self.need_image(plan, &records).await?;
        let dest_alive = need_image.is_none() && records.iter().any(|r| r.host == plan.to) && self.alive(plan.to).await;
        let need_image = match plan_step::fail_back_route(plan, &records, need_image, dest_alive) {
            FailBackRoute::Verify => None,
            FailBackRoute::Restore(reason) => Some(reason),
            FailBackRoute::NoSnapshot(why) => return Err(Retry(why)),
            FailBackRoute::MigrateBack(at_dest) => match self.migrate_back(plan, &at_dest).await {
                Ok(()) => None,
                Err(Lost) => return Err(Lost),
                Err(Fail(why) | Retry(why)) => {
                    self.stop_migrations(plan).await?;
                    Some(format!("migrating back failed: {why}"))
                }
            },
            FailBackRoute::AwaitFence(_) => {
                let fenced = self.await_fenced(plan, FenceWait::UnlessItAnswers).await?;
                Some(format!("destination {} does not answer; {fenced}", plan.to))
            }
        };
        if let Some(reason) = need_image {
            let reason = match plan_step::restore_or_wait(plan, reason) {
                FailBackRoute::Restore(reason) => reason,
                FailBackRoute::NoSnapshot(why) => return Err(Retry(why)),
                other => return Err(Retry(format!("unexpected fail-back route {other:?}"))),
            };
            let cmd = PlanCommand::RestoreGroup { id: plan.id, term: self.term, reason, at_ms: now_ms() };
            self.propose(cmd).await?;
            return Ok(()); // reload: the restore continues from the catalog
        }
        let plan = self.load(plan.id)?;
        let moved_back = plan.progress.iter().any(|p| matches!(p.phase, PlanVmPhase::Arrived | PlanVmPhase::Returning));
        match self.verify(&plan, false).await {
            Ok(summary) => {
                let (mode, how) = if moved_back {
                    (FailBackMode::MigratedBack, "the VMs that had moved were live-migrated back")
                } else {
                    (FailBackMode::NothingMoved, "no VM had left the source")
                };
                let note = format!("failed back: {how}; {summary}");
                self.advance(&plan, PlanState::FailedBack, PlanPatch::FailedBack(mode), note).await
            }
            Err(Unverified::Lost(why)) if plan.recovery.is_some() => {
                let cmd = PlanCommand::RestoreGroup { id: plan.id, term: self.term, reason: why, at_ms: now_ms() };
                self.propose(cmd).await.map(|_| ())
            }
            Err(Unverified::Lost(why) | Unverified::NotYet(why)) => Err(Retry(why)),
        }
    }

    /// Live-migrate `vms` from the destination back to the source, `max_parallel` at once.
    async fn migrate_back(&self, plan: &MigrationPlan, vms: &[VmId]) -> Step {
        let base = Instant::now();
        let mono = || base.elapsed().as_millis() as u64;
        let mut mem = MigrateMemory::default();
        loop {
            if !self.leading() {
                return Err(Lost);
            }
            let plan = self.load(plan.id)?;
            let answered = self.alive(plan.to).await.then_some(0);
            if let Some(why) = plan_step::back_health(&plan, &mut mem, answered, mono(), self.t.host_down_ms) {
                return Err(Fail(why));
            }
            let mut records = Vec::new();
            for vm in vms {
                records.push(self.record(*vm)?);
            }
            let round =
                plan_step::migrate_back_round(&plan, vms, &records, &mut mem, mono(), self.t.vm_migration_timeout_ms);
            let start = match round {
                BackEnd::Home => return Ok(()),
                BackEnd::Fail(why) => return Err(Fail(why)),
                BackEnd::TimedOut { vm, why } => {
                    let _ = self.deps.vms.client(VmRequest::CancelMigration { vm }).await;
                    return Err(Fail(why));
                }
                BackEnd::Bounced { vm } => {
                    let why = self.migration_reason(vm).await;
                    return Err(Fail(format!("{vm} could not migrate back: {why}")));
                }
                BackEnd::Start(vms) => vms,
            };
            for vm in start {
                self.vm_phase(&plan, vm, PlanVmPhase::Returning, None).await?;
                let req = VmRequest::Migrate { vm, to: plan.from, options: plan.options.clone(), plan: Some(plan.id) };
                match self.deps.vms.client(req).await {
                    Ok(_) => {
                        mem.started_ms.insert(vm, mono());
                    }
                    Err(e) => return Err(Fail(format!("{vm} could not start migrating back: {}", e.message()))),
                }
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    /// The group was forced back to the source: have the source install it from the images.
    async fn finish_restore(&self, plan: &MigrationPlan) -> Step {
        let (Some(recovery), Some(generations)) = (&plan.recovery, &plan.restore) else {
            return Err(Retry("restore without a recovery point".into()));
        };
        // Some VMs had left the source: a copy may still run on the destination until it fences.
        let fenced = if plan_step::may_have_left(plan) {
            format!("; {}", self.await_fenced(plan, FenceWait::OrItHoldsNone).await?)
        } else {
            String::new()
        };
        let req = GroupRequest::Restore {
            plan: plan.id,
            images: recovery.images.clone(),
            generations: generations.clone(),
            volume_snapshots: recovery.volume_snapshots.clone(),
        };
        match self.group_call(recovery.host, req).await {
            Ok(GroupResponse::Restored(_)) => {}
            Ok(other) => return Err(Retry(format!("{} answered the restore with {other:?}", recovery.host))),
            Err(e) if e.code == ErrorCode::NotLeader => return Err(Lost),
            Err(e) => return Err(Retry(format!("restore on {}: {}", recovery.host, e.message))),
        }
        // A check that fails on the restored group is not retried until it passes (the guests
        // would eventually overwrite the evidence): the plan ends, and its log says so.
        let summary = match self.verify(plan, true).await {
            Ok(summary) => summary,
            Err(Unverified::Lost(why)) => {
                tracing::error!(plan = plan.id, reason = %why, "the restored group failed its check");
                format!("BUT THE CHECK OF THE RESTORED GROUP FAILED: {why}")
            }
            Err(Unverified::NotYet(why)) => return Err(Retry(why)),
        };
        let note = format!(
            "failed back: the whole group was restored on {} from the recovery snapshot{fenced}; {summary}",
            recovery.host
        );
        self.advance(plan, PlanState::FailedBack, PlanPatch::FailedBack(FailBackMode::RestoredFromSnapshot), note).await
    }

    /// How long until the destination can no longer hold a host lease.
    fn fence_wait(&self, host: NodeId) -> Duration {
        let last_ack = self.deps.peer_acks.last(host.0);
        plan_step::fence_wait(host, self.me(), last_ack, self.leading_since, Instant::now(), &self.deps.fence)
    }

    /// Whether `plan.to` answers, itself, that it has no guest of any VM of the group.
    async fn holds_none(&self, plan: &MigrationPlan) -> bool {
        let wait = Duration::from_millis((self.t.host_down_ms / 2).clamp(100, 1000));
        for vm in &plan.vms {
            let addr = ActorAddr { node: plan.to, kind: haven_proto::ActorKind::Vm, id: vm.0 };
            let ask = ActorMessage::Vm(haven_proto::vm::VmMessage::Client(VmRequest::Status { vm: *vm }));
            match self.leader.registry.send_timeout(addr, ask, wait).await {
                Err(e) if e.code == ErrorCode::NotFound => {} // no actor for it there
                _ => return false,
            }
        }
        true
    }

    /// Wait until the destination can no longer hold a host lease (or `mode`'s other way out),
    /// and say how that was established, for the step log.
    async fn await_fenced(&self, plan: &MigrationPlan, mode: FenceWait) -> Result<String, StepError> {
        let started = Instant::now();
        let f = &self.deps.fence;
        let mut logged = false;
        loop {
            if !self.leading() {
                return Err(Lost);
            }
            let left = self.fence_wait(plan.to);
            if left.is_zero() {
                return Ok(format!(
                    "waited {} for {} to fence itself (no acknowledged Raft contact for over {} + {} margin)",
                    ms_text(started.elapsed().as_millis() as u64),
                    plan.to,
                    ms_text(f.fence_after_ms),
                    ms_text(f.clock_margin_ms),
                ));
            }
            match mode {
                FenceWait::UnlessItAnswers if self.alive(plan.to).await => {
                    return Err(Retry(format!(
                        "destination {} answers again; fail-back retries the live path",
                        plan.to
                    )));
                }
                FenceWait::OrItHoldsNone if self.holds_none(plan).await => {
                    return Ok(format!(
                        "{} answers again and holds none of the group's VMs (checked after {})",
                        plan.to,
                        ms_text(started.elapsed().as_millis() as u64)
                    ));
                }
                _ => {}
            }
            if !logged {
                info!(plan = plan.id, host = %plan.to, wait_ms = left.as_millis() as u64, "waiting for the destination to fence itself before restoring");
                logged = true;
            }
            tokio::time::sleep(self.poll.min(left)).await;
        }
    }

    /// Every VM of the group runs at the source (as desired), its memory checks out, and it is
    /// not behind its recovery point.
    /// After a restore (`restored`), each guest must be the one loaded from its image.
    async fn verify(&self, plan: &MigrationPlan, restored: bool) -> Result<String, Unverified> {
        use Unverified::{Lost as Gone, NotYet};
        if !restored && self.source_restarted(plan).await {
            return Err(Gone(format!("{} restarted since the recovery snapshot", plan.from)));
        }
        let mut checked = 0;
        for r in self.records(plan).map_err(|e| NotYet(format!("{e:?}")))? {
            plan_step::verify_placement(plan, &r)?;
            let deadline = Instant::now() + Duration::from_secs(5);
            let status = loop {
                match self.status(r.id).await {
                    Ok(s) if r.desired != VmRunState::Running || s.state == "running" => break s,
                    Ok(s) if Instant::now() >= deadline => {
                        return Err(NotYet(format!("{} is {} on {}, not running", r.id, s.state, plan.from)))
                    }
                    Err(e) if Instant::now() >= deadline => return Err(NotYet(format!("{}: {}", r.id, e.message))),
                    _ => tokio::time::sleep(self.poll).await,
                }
            };
            let seen =
                GuestSeen { host: status.host, state: status.state, last_seq: status.last_seq, origin: status.origin };
            plan_step::verify_guest(plan, &r, &seen, restored)?;
            match self.deps.vms.client(VmRequest::Check { vm: r.id }).await {
                Ok(VmResponse::Check { .. }) => checked += 1,
                Ok(other) => return Err(NotYet(format!("{}: unexpected answer {other:?}", r.id))),
                Err(e) if e.code() == ErrorCode::Internal => {
                    return Err(Gone(format!("check of {} failed: {}", r.id, e.message())))
                }
                Err(e) => return Err(NotYet(format!("check of {}: {}", r.id, e.message()))),
            }
        }
        Ok(format!("{checked} VMs run on {} and their memory and disks check out", plan.from))
    }

    /// Delete a final plan's recovery images from the host that holds them.
    async fn release(&self, plan: &MigrationPlan) -> Step {
        let Some(recovery) = &plan.recovery else { return Ok(()) };
        if plan.recovery_released {
            return Ok(());
        }
        let release = GroupRequest::Release { plan: plan.id, volume_snapshots: recovery.volume_snapshots.clone() };
        match self.group_call(recovery.host, release).await {
            Ok(GroupResponse::Released { .. }) => {}
            Ok(other) => return Err(Retry(format!("{} answered the release with {other:?}", recovery.host))),
            Err(e) if e.code == ErrorCode::NotLeader => return Err(Lost),
            Err(e) => {
                // The images stay until their host answers; try again much later.
                tokio::time::sleep(Duration::from_secs(5)).await;
                return Err(Retry(format!("deleting recovery images on {}: {}", recovery.host, e.message)));
            }
        }
        let cmd = PlanCommand::RecoveryReleased { id: plan.id, term: self.term, at_ms: now_ms() };
        self.propose(cmd).await.map(|_| ())
    }
}
