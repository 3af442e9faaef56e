//! The group live-migration vocabulary (C1): what the catalog records about a migration plan
//! ([`MigrationPlan`]: a consistency group of VMs moving from one host to another, its recovery
//! point and its step log), the catalog commands that create and drive plans ([`PlanCommand`]),
//! the queries that read them ([`PlanQuery`]), and the group operations the leader's plan
//! controller asks of a host ([`GroupRequest`]: pause-all + recovery snapshot, consolidation,
//! restore from the recovery snapshot, release).
//!
//! A plan's life: `Created → Snapshotting → Migrating → Consolidating → Succeeded`, or from any
//! state before `Succeeded` to `FailingBack → FailedBack`. Every transition is a compare-and-set
//! on the state ([`PlanCommand::Advance`]) carrying the proposer's Raft term, so a deposed
//! leader's controller cannot move a plan a newer leader drives. Times in plans are supplied by
//! the proposer (`at_ms`), never read from a clock where a command is applied.
//!
//! Names, sizes and limits are checked by [`PlanCommand::validate`] before anything is proposed.
//! No I/O here.

use rkyv::{Archive, Deserialize, Serialize};

use crate::ids::{NodeId, VmId, VolumeId};
use crate::vm::{MigrationOptions, VmStatus};

/// Most VMs in one plan (one consistency group).
pub const MAX_PLAN_VMS: usize = 64;
/// Most VMs one plan migrates at once.
pub const MAX_PLAN_PARALLEL: u32 = 16;
/// Steps kept in a plan's log; older ones (after the first) are dropped and counted.
pub const MAX_PLAN_STEPS: usize = 200;
/// Longest note or reason recorded in a plan (longer ones are cut, on a char boundary).
pub const MAX_NOTE_LEN: usize = 1024;
/// Shortest and longest plan timeout.
pub const MIN_PLAN_TIMEOUT_MS: u64 = 1_000;
pub const MAX_PLAN_TIMEOUT_MS: u64 = 7 * 24 * 3_600_000;
/// The timeout a plan gets when the client does not choose one (10 minutes).
pub const DEFAULT_PLAN_TIMEOUT_MS: u64 = 600_000;

/// Where a plan is. `Succeeded` and `FailedBack` are final.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash,
)]
#[rkyv(derive(Debug))]
pub enum PlanState {
    /// Recorded; nothing done yet.
    Created,
    /// The source pauses the whole group, writes each guest's memory image, resumes the group.
    Snapshotting,
    /// VMs live-migrate one by one (up to `max_parallel` at once), group consistency ignored.
    Migrating,
    /// Every VM arrived; the destination pauses and resumes the group together.
    Consolidating,
    Succeeded,
    /// Something failed: in-flight migrations are cancelled and moved VMs come back (live, or the
    /// whole group from the recovery snapshot).
    FailingBack,
    /// Every VM runs at the source again.
    FailedBack,
}

impl PlanState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::FailedBack)
    }

    /// States in which the plan still moves VMs forward (and reserves room at the destination).
    pub fn is_forward(self) -> bool {
        matches!(self, Self::Created | Self::Snapshotting | Self::Migrating)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Snapshotting => "snapshotting",
            Self::Migrating => "migrating",
            Self::Consolidating => "consolidating",
            Self::Succeeded => "succeeded",
            Self::FailingBack => "failing_back",
            Self::FailedBack => "failed_back",
        }
    }

    /// Whether `self → to` is a transition of the plan state machine.
    pub fn may_advance_to(self, to: PlanState) -> bool {
        use PlanState::*;
        matches!(
            (self, to),
            (Created, Snapshotting)
                | (Snapshotting, Migrating)
                | (Migrating, Consolidating)
                | (Consolidating, Succeeded)
                | (Created | Snapshotting | Migrating | Consolidating, FailingBack)
                | (FailingBack, FailedBack)
        )
    }
}

impl std::fmt::Display for PlanState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One guest's memory image in a recovery point, written durably on the source host.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct RecoveryImage {
    pub vm: VmId,
    /// `plan-<plan>/vm-<vm>` under the source's `<data-dir>/recovery/`; the host derives the
    /// path from (plan, vm) itself and never from this text.
    pub image: String,
    /// blake3 of the image file's body (hex): everything but its last 32 bytes, which hold this
    /// digest.
    pub image_digest: String,
    /// The guest's memory digest when the image was taken (hex).
    pub memory_digest: String,
    /// The guest's last workload write when the image was taken.
    pub last_seq: u64,
    /// Image file size in bytes.
    pub bytes: u64,
}

/// The group's fail-back point: taken at the source while every VM of the group was paused, so
/// it is crash-consistent across the group.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct RecoveryPoint {
    /// Where the images are (the plan's source).
    pub host: NodeId,
    /// The source's process incarnation when it took the snapshot: if it differs now, the
    /// source restarted and every guest it held lost its memory.
    pub host_incarnation: u64,
    pub taken_at_ms: u64,
    /// How long the group was paused to take it.
    pub paused_ms: u64,
    pub images: Vec<RecoveryImage>,
    /// Snapshot id per attached volume (empty until VMs have volumes).
    pub volume_snapshots: Vec<(VolumeId, u64)>,
}

/// Where one VM of a plan is, as the controller last recorded it.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash,
)]
#[rkyv(derive(Debug))]
pub enum PlanVmPhase {
    /// At the source, not started.
    Waiting,
    Migrating,
    Arrived,
    /// Its migration failed (the plan fails back).
    Failed,
    /// Live-migrating back to the source.
    Returning,
    /// Back at the source (never left, live-migrated back, or restored from the snapshot).
    AtSource,
    Restored,
}

impl PlanVmPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Migrating => "migrating",
            Self::Arrived => "arrived",
            Self::Failed => "failed",
            Self::Returning => "returning",
            Self::AtSource => "at_source",
            Self::Restored => "restored",
        }
    }
}

#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct PlanVm {
    pub vm: VmId,
    pub phase: PlanVmPhase,
    pub note: Option<String>,
}

/// One entry of a plan's step log.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct PlanStep {
    /// Wall-clock time (ms since the Unix epoch) supplied by the proposer.
    pub at_ms: u64,
    /// The plan's state after the step.
    pub state: PlanState,
    pub note: String,
}

/// How a failed plan brought its VMs home.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum FailBackMode {
    /// No VM had left the source; in-flight migrations were cancelled.
    NothingMoved,
    /// The VMs that had moved were live-migrated back.
    MigratedBack,
    /// The whole group was restored at the source from the recovery snapshot.
    RestoredFromSnapshot,
}

/// A group live-migration plan as the catalog records it.
///
/// Invariants kept by the catalog: a VM is in at most one non-final plan; the state only moves
/// along [`PlanState::may_advance_to`]; `Migrating` is entered only with a recovery point;
/// `driver_term` never decreases.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct MigrationPlan {
    pub id: u64,
    pub name: String,
    /// The consistency group, ascending.
    pub vms: Vec<VmId>,
    pub from: NodeId,
    pub to: NodeId,
    pub max_parallel: u32,
    pub options: MigrationOptions,
    pub timeout_ms: u64,
    /// Created by `host drain`.
    pub drain: bool,
    pub state: PlanState,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub recovery: Option<RecoveryPoint>,
    /// One entry per VM, in `vms` order.
    pub progress: Vec<PlanVm>,
    pub steps: Vec<PlanStep>,
    /// Steps dropped from the log to keep it bounded.
    pub steps_dropped: u64,
    /// Why the plan failed back.
    pub failure: Option<String>,
    pub fail_back: Option<FailBackMode>,
    /// Spread between the first and the last resume at the destination (consolidation), ms.
    pub resume_spread_ms: Option<u64>,
    /// How long the group was paused at the destination to consolidate, ms.
    pub consolidation_pause_ms: Option<u64>,
    /// Set when the group was forced back to the source for a restore from the recovery
    /// snapshot: each VM's generation after the move. The source installs these from the images.
    pub restore: Option<Vec<(VmId, u64)>>,
    /// The recovery images were deleted from the source.
    pub recovery_released: bool,
    /// The leader that last drove the plan and its Raft term.
    pub driver: Option<NodeId>,
    pub driver_term: u64,
}

impl MigrationPlan {
    pub fn vm_phase(&self, vm: VmId) -> Option<PlanVmPhase> {
        self.progress.iter().find(|p| p.vm == vm).map(|p| p.phase)
    }

    /// The recovery image of `vm`, if the recovery point was taken.
    pub fn image(&self, vm: VmId) -> Option<&RecoveryImage> {
        self.recovery.as_ref().and_then(|r| r.images.iter().find(|i| i.vm == vm))
    }

    /// The plan still needs a controller: not final, or final with recovery images to delete.
    pub fn needs_work(&self) -> bool {
        !self.state.is_terminal() || (self.recovery.is_some() && !self.recovery_released)
    }
}

/// Settings of a new plan.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct PlanSettings {
    /// Most VMs migrating at once (1..=[`MAX_PLAN_PARALLEL`]).
    pub max_parallel: u32,
    pub options: MigrationOptions,
    /// The plan fails back if it has not reached `Consolidating` this long after creation.
    pub timeout_ms: u64,
}

impl Default for PlanSettings {
    fn default() -> Self {
        Self {
            max_parallel: 2,
            options: MigrationOptions { max_downtime_ms: 300, ..MigrationOptions::default() },
            timeout_ms: DEFAULT_PLAN_TIMEOUT_MS,
        }
    }
}

/// What a step of the controller records besides the new state.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum PlanPatch {
    None,
    /// `Snapshotting → Migrating`: the recovery point.
    Recovery(RecoveryPoint),
    /// `→ FailingBack`: why.
    Failure(String),
    /// `Consolidating → Succeeded`.
    Consolidated {
        resume_spread_ms: u64,
        paused_ms: u64,
    },
    /// `FailingBack → FailedBack`.
    FailedBack(FailBackMode),
}

/// A catalog change about plans (a variant of `CatalogCommand`).
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum PlanCommand {
    /// Plan moving `vms` (all on one host) to `to`. Refused for unknown VMs or hosts, VMs on
    /// different hosts, `to` = their host, a VM already in a plan or migrating or not meant to
    /// be running, a draining destination, or a destination without room for the whole group.
    Create { name: Option<String>, vms: Vec<VmId>, to: NodeId, settings: PlanSettings, at_ms: u64 },
    /// Mark `host` draining and plan moving every running VM on it to hosts with room (one plan
    /// per destination host, each one consistency group). VMs that cannot move are listed.
    Drain { host: NodeId, settings: PlanSettings, at_ms: u64 },
    /// The controller of the leader in `term` takes the plan over (recorded in the step log when
    /// the driver changes). Refused for a term older than the plan's driver's.
    Adopt { id: u64, term: u64, leader: NodeId, at_ms: u64 },
    /// Compare-and-set of the state, by the controller of the leader in `term`.
    Advance {
        id: u64,
        term: u64,
        leader: NodeId,
        expected: PlanState,
        to: PlanState,
        patch: PlanPatch,
        note: String,
        at_ms: u64,
    },
    /// Record where one VM is.
    VmPhase { id: u64, term: u64, vm: VmId, phase: PlanVmPhase, note: Option<String>, at_ms: u64 },
    /// `FailingBack` only: force every VM of the group back to the source (generation bump,
    /// migration cleared) so the source installs it from the recovery snapshot. Idempotent.
    RestoreGroup { id: u64, term: u64, reason: String, at_ms: u64 },
    /// A final plan's recovery images were deleted.
    RecoveryReleased { id: u64, term: u64, at_ms: u64 },
    /// Stop a plan that has not reached `Consolidating`: it fails back.
    Cancel { id: u64, reason: String, at_ms: u64 },
}

fn plan_name_ok(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err("plan name must be 1..=128 bytes".into());
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(format!("plan name {name:?} may contain only letters, digits, '-', '_' and '.'"));
    }
    if name.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("plan name {name:?} must not be all digits (it would read as an id)"));
    }
    Ok(())
}

impl PlanSettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_parallel == 0 || self.max_parallel > MAX_PLAN_PARALLEL {
            return Err(format!("parallel migrations {} must be in 1..={MAX_PLAN_PARALLEL}", self.max_parallel));
        }
        if !(MIN_PLAN_TIMEOUT_MS..=MAX_PLAN_TIMEOUT_MS).contains(&self.timeout_ms) {
            return Err(format!(
                "plan timeout {} ms must be in {MIN_PLAN_TIMEOUT_MS}..={MAX_PLAN_TIMEOUT_MS} ms",
                self.timeout_ms
            ));
        }
        if self.options.max_downtime_ms == 0 || self.options.max_downtime_ms > 60_000 {
            return Err(format!("max downtime {} ms must be in 1..=60000 ms", self.options.max_downtime_ms));
        }
        Ok(())
    }
}

fn note_ok(what: &str, note: &str) -> Result<(), String> {
    if note.len() > 4 * MAX_NOTE_LEN {
        return Err(format!("{what} is {} bytes, limit {}", note.len(), 4 * MAX_NOTE_LEN));
    }
    Ok(())
}

impl PlanCommand {
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Create { name, vms, settings, .. } => {
                if let Some(n) = name {
                    plan_name_ok(n)?;
                }
                if vms.is_empty() {
                    return Err("a plan needs at least one VM".into());
                }
                if vms.len() > MAX_PLAN_VMS {
                    return Err(format!("a plan holds at most {MAX_PLAN_VMS} VMs, got {}", vms.len()));
                }
                let mut sorted = vms.clone();
                sorted.sort();
                if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
                    return Err(format!("{} is listed twice", w[0]));
                }
                settings.validate()
            }
            Self::Drain { settings, .. } => settings.validate(),
            Self::Advance { note, patch, .. } => {
                note_ok("note", note)?;
                match patch {
                    PlanPatch::Failure(r) => note_ok("failure reason", r),
                    PlanPatch::Recovery(r) if r.images.len() > MAX_PLAN_VMS => Err("too many recovery images".into()),
                    _ => Ok(()),
                }
            }
            Self::VmPhase { note, .. } => note.as_deref().map_or(Ok(()), |n| note_ok("note", n)),
            Self::RestoreGroup { reason, .. } | Self::Cancel { reason, .. } => note_ok("reason", reason),
            Self::RecoveryReleased { .. } | Self::Adopt { .. } => Ok(()),
        }
    }
}

/// Cut `s` to at most [`MAX_NOTE_LEN`] bytes on a char boundary.
pub fn bounded_note(s: &str) -> String {
    if s.len() <= MAX_NOTE_LEN {
        return s.to_string();
    }
    let mut end = MAX_NOTE_LEN - 3;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// A VM `host drain` could not plan to move, and why.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct DrainSkip {
    pub vm: VmId,
    pub reason: String,
}

/// What applying a [`PlanCommand`] did.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum PlanOutcome {
    Plan(Box<MigrationPlan>),
    Drained { host: NodeId, plans: Vec<MigrationPlan>, skipped: Vec<DrainSkip> },
    Refused { reason: String, not_found: bool },
}

/// Reads of the plan table.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum PlanQuery {
    /// Every plan, oldest first.
    Plans,
    /// By id (`plan-3` or `3`) or name (the newest plan with that name).
    Plan { name_or_id: String },
}

#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum PlanQueryResult {
    Plans(Vec<MigrationPlan>),
    Plan(Option<Box<MigrationPlan>>),
}

/// A group operation on one host, asked of its host agent by the leader's plan controller.
/// Long operations run as a job on the host keyed by plan: asking again while it runs answers
/// [`GroupResponse::Pending`], asking after it finished answers its result (a failed job is
/// forgotten once reported, so asking again retries).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum GroupRequest {
    /// At the source: pause every VM of the group, take each guest's memory image and a recovery
    /// snapshot of each of its disks, resume them all; write the images durably (fsync) under
    /// `<data-dir>/recovery/plan-<plan>/`.
    Snapshot { plan: u64, vms: Vec<VmId> },
    /// At the destination: pause every VM of the group, then resume them together.
    Consolidate { plan: u64, vms: Vec<VmId> },
    /// At the source: replace each VM's guest with the one in its recovery image (checked
    /// against the recorded digests), at the generation the catalog gave it, and start them
    /// together. All images load or nothing changes.
    /// The group's disks are rolled back to `volume_snapshots` first.
    Restore {
        plan: u64,
        images: Vec<RecoveryImage>,
        generations: Vec<(VmId, u64)>,
        volume_snapshots: Vec<(VolumeId, u64)>,
    },
    /// Delete the plan's recovery images and its disks' recovery snapshots.
    Release { plan: u64, volume_snapshots: Vec<(VolumeId, u64)> },
}

impl GroupRequest {
    pub fn plan(&self) -> u64 {
        match self {
            Self::Snapshot { plan, .. }
            | Self::Consolidate { plan, .. }
            | Self::Restore { plan, .. }
            | Self::Release { plan, .. } => *plan,
        }
    }
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum GroupResponse {
    /// The job is still running; ask again.
    Pending,
    /// `incarnation`: the host process that took it (see `ActorReply::Description`).
    Snapshot {
        images: Vec<RecoveryImage>,
        /// One recovery snapshot per disk of the group's VMs, taken while the group was paused.
        volume_snapshots: Vec<(VolumeId, u64)>,
        paused_ms: u64,
        incarnation: u64,
    },
    Consolidated {
        resume_spread_ms: u64,
        paused_ms: u64,
        /// The group's disks whose primary moved to the destination during the pause.
        disks_moved: Vec<VolumeId>,
        /// The group's disks whose primary stayed where it was, each with the reason.
        disks_kept: Vec<(VolumeId, String)>,
    },
    Restored(Vec<VmStatus>),
    Released {
        files: u32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_follow_the_state_machine() {
        use PlanState::*;
        assert!(Created.may_advance_to(Snapshotting));
        assert!(Migrating.may_advance_to(FailingBack));
        assert!(Consolidating.may_advance_to(FailingBack));
        assert!(!Succeeded.may_advance_to(FailingBack));
        assert!(!FailedBack.may_advance_to(FailingBack));
        assert!(!Created.may_advance_to(Migrating));
        assert!(!FailingBack.may_advance_to(Succeeded));
        assert!(FailingBack.may_advance_to(FailedBack));
    }

    #[test]
    fn validation_refuses_bad_plans() {
        let create = |vms: Vec<u64>, settings: PlanSettings| PlanCommand::Create {
            name: None,
            vms: vms.into_iter().map(VmId).collect(),
            to: NodeId(2),
            settings,
            at_ms: 0,
        };
        assert!(create(vec![1, 2], PlanSettings::default()).validate().is_ok());
        assert!(create(vec![], PlanSettings::default()).validate().unwrap_err().contains("at least one"));
        assert!(create(vec![1, 1], PlanSettings::default()).validate().unwrap_err().contains("twice"));
        let many = (1..=MAX_PLAN_VMS as u64 + 1).collect();
        assert!(create(many, PlanSettings::default()).validate().is_err());
        let zero = PlanSettings { max_parallel: 0, ..PlanSettings::default() };
        assert!(create(vec![1], zero).validate().unwrap_err().contains("parallel"));
        let short = PlanSettings { timeout_ms: 5, ..PlanSettings::default() };
        assert!(create(vec![1], short).validate().unwrap_err().contains("timeout"));
        let named = PlanCommand::Create {
            name: Some("bad name".into()),
            vms: vec![VmId(1)],
            to: NodeId(2),
            settings: PlanSettings::default(),
            at_ms: 0,
        };
        assert!(named.validate().is_err());
    }

    #[test]
    fn notes_are_bounded_on_char_boundaries() {
        let long = "é".repeat(MAX_NOTE_LEN);
        let cut = bounded_note(&long);
        assert!(cut.len() <= MAX_NOTE_LEN);
        assert!(cut.ends_with("..."));
        assert_eq!(bounded_note("short"), "short");
    }
}
