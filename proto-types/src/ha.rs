//! The vocabulary of HA pairs (capability C6): what the catalog records about a VM's pair
//! ([`HaPairRecord`]), the catalog commands that change it ([`HaCommand`]), and the messages the
//! primary, the standby and the leader exchange ([`HaMessage`]): checkpoint frames and their
//! acknowledgements (redundant mode), application-state snapshots, updates and acknowledgements
//! (multi-operation mode), the seal, the takeover order and its answers, and the per-host
//! heartbeat that carries each pair's state on that host ([`HaHeartbeat`]).
//!
//! The fencing rule these messages serve (see `node/src/ha/core`): the standby is the arbiter of
//! output. A primary releases an output only after the standby acknowledged the checkpoint epoch
//! (or the application update) that holds it; a standby that takes over at generation `g` first
//! seals itself (it acknowledges nothing of a generation below `g` any more), and every released
//! output carries the pair's generation so the sink refuses an older one once it saw a newer one.
//!
//! Sizes are checked by `validate` before anything is proposed or handled. No I/O here.

use rkyv::{Archive, Deserialize, Serialize};

use crate::ids::{NodeId, VmId};
use crate::vm::VM_PAGE_SIZE;

/// Most pages one checkpoint frame carries (4 MiB of 4 KiB pages).
pub const MAX_PAGES_PER_FRAME: usize = 1024;
/// Most frames one checkpoint epoch spans (4 GiB of pages in full frames).
pub const MAX_FRAMES_PER_EPOCH: u32 = 1 << 20;
/// Largest device (vCPU, devices, output journal) state in a checkpoint.
pub const MAX_DEVICE_STATE_BYTES: usize = 4 << 20;
/// Largest application update in multi-operation mode.
pub const MAX_APP_UPDATE_BYTES: usize = 1 << 20;
/// Largest application-state snapshot in multi-operation mode (one frame, well under 16 MiB).
pub const MAX_APP_STATE_BYTES: usize = 8 << 20;
/// Checkpoint epoch length bounds in redundant mode.
pub const MIN_EPOCH_MS: u32 = 5;
pub const MAX_EPOCH_MS: u32 = 10_000;
/// Longest failover reason recorded.
pub const MAX_REASON_LEN: usize = 256;
/// Most pair entries in one heartbeat.
pub const MAX_HEARTBEAT_PAIRS: usize = 4096;

/// How the pair protects its VM. Switched live by [`HaCommand::SetMode`] (a generation bump).
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum HaMode {
    /// The standby mirrors the VM's memory and device state as checkpoint epochs of `epoch_ms`
    /// while its VM is stopped; outputs of an epoch are released once the epoch is safe there.
    Redundant { epoch_ms: u32 },
    /// The standby's VM runs; the application's state is mirrored update by update and each
    /// update is acknowledged to the application's clients once the standby has it.
    MultiOperation,
}

impl HaMode {
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Redundant { epoch_ms } if !(MIN_EPOCH_MS..=MAX_EPOCH_MS).contains(epoch_ms) => {
                Err(format!("a checkpoint epoch lasts {MIN_EPOCH_MS} to {MAX_EPOCH_MS} ms, got {epoch_ms}"))
            }
            _ => Ok(()),
        }
    }
}

/// Where a pair is in its life.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum PairState {
    /// A standby is assigned (it may still be taking its first full copy).
    Protecting,
    /// `primary` was the standby and is taking over; no standby yet. Mode switches are refused.
    FailingOver,
    /// No standby: the primary releases outputs as they come.
    Degraded,
}

/// The last failover of a pair.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct FailoverRecord {
    /// When the leader decided (its proposer-supplied time, ms).
    pub at_ms: u64,
    pub from: NodeId,
    pub to: NodeId,
    pub reason: String,
    /// From the decision until the new primary reported it runs the VM (0 until then).
    pub took_ms: u64,
}

/// A VM's HA pair as the catalog records it.
///
/// **Invariants:** `standby != Some(primary)`; `state == Protecting` iff `standby.is_some()` (but
/// `FailingOver`, which has no standby); `generation` grows by one on every change, each change a
/// compare-and-set on it. A primary releases an output of generation `g` only with the
/// acknowledgement of the standby of generation `g` (or freely when `g` has none).
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct HaPairRecord {
    pub vm: VmId,
    pub primary: NodeId,
    pub standby: Option<NodeId>,
    pub mode: HaMode,
    pub state: PairState,
    pub generation: u64,
    pub failovers: u64,
    pub last_failover: Option<FailoverRecord>,
}

impl HaPairRecord {
    /// The shape rules every record obeys (the catalog apply keeps them; a core refuses a record
    /// that breaks them).
    pub fn validate(&self) -> Result<(), String> {
        self.mode.validate()?;
        if self.standby == Some(self.primary) {
            return Err(format!("{}: the standby {} is the primary's own host", self.vm, self.primary));
        }
        let consistent = match self.state {
            PairState::Protecting => self.standby.is_some(),
            PairState::FailingOver | PairState::Degraded => self.standby.is_none(),
        };
        if !consistent {
            return Err(format!("{}: state {:?} with standby {:?}", self.vm, self.state, self.standby));
        }
        if self.state == PairState::FailingOver && self.last_failover.as_ref().is_none_or(|f| f.to != self.primary) {
            return Err(format!("{}: failing over without a failover to {}", self.vm, self.primary));
        }
        Ok(())
    }
}

/// Catalog changes to HA pairs. `Create`, `Delete` and `SetMode` come from clients (admin);
/// `Failover` and `Reprotect` only from the leader's failover controller.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum HaCommand {
    /// Protect `vm` (running on `primary`, its catalog host) with `standby` (none: degraded until
    /// the leader finds one).
    Create {
        vm: VmId,
        primary: NodeId,
        standby: Option<NodeId>,
        mode: HaMode,
    },
    Delete {
        vm: VmId,
    },
    /// Switch mode live, if the pair is still at `expected_generation` and not failing over.
    SetMode {
        vm: VmId,
        mode: HaMode,
        expected_generation: u64,
    },
    /// Make `to` the primary (the standby; or, while failing over, the previous primary when the
    /// takeover failed), if the pair is still at `expected_generation`.
    Failover {
        vm: VmId,
        expected_generation: u64,
        to: NodeId,
        at_ms: u64,
        reason: String,
    },
    /// Give the pair a new standby (none: degraded), if still at `expected_generation`; ends a
    /// failover (recording how long it took).
    Reprotect {
        vm: VmId,
        expected_generation: u64,
        standby: Option<NodeId>,
        failover_took_ms: Option<u64>,
    },
}

impl HaCommand {
    pub fn vm(&self) -> VmId {
        match self {
            Self::Create { vm, .. }
            | Self::Delete { vm }
            | Self::SetMode { vm, .. }
            | Self::Failover { vm, .. }
            | Self::Reprotect { vm, .. } => *vm,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Create { primary, standby, mode, .. } => {
                mode.validate()?;
                match *standby == Some(*primary) {
                    true => Err(format!("the standby {primary} is the VM's own host")),
                    false => Ok(()),
                }
            }
            Self::SetMode { mode, .. } => mode.validate(),
            Self::Failover { reason, .. } if reason.len() > MAX_REASON_LEN => {
                Err(format!("a failover reason has at most {MAX_REASON_LEN} bytes, got {}", reason.len()))
            }
            _ => Ok(()),
        }
    }
}

/// One frame of a checkpoint epoch, primary → standby. An epoch is frames `0..=n`, the one with
/// `last` set being `n`; that one carries the device state and the output count. A `full` epoch
/// holds every page (absent pages are zero); otherwise the pages written since the previous epoch.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Checkpoint {
    pub vm: VmId,
    pub generation: u64,
    pub epoch: u64,
    pub frame: u32,
    pub full: bool,
    pub last: bool,
    /// Outputs the guest had issued when the epoch was captured (the epoch holds all of them).
    pub outputs: u64,
    /// `(page index, page bytes)`, indexes strictly ascending.
    pub pages: Vec<(u64, Vec<u8>)>,
    pub device_state: Vec<u8>,
}

impl Checkpoint {
    pub fn validate(&self) -> Result<(), String> {
        if self.pages.len() > MAX_PAGES_PER_FRAME {
            return Err(format!(
                "a checkpoint frame holds at most {MAX_PAGES_PER_FRAME} pages, got {}",
                self.pages.len()
            ));
        }
        if self.frame >= MAX_FRAMES_PER_EPOCH {
            return Err(format!("checkpoint frame {} beyond the {MAX_FRAMES_PER_EPOCH} of an epoch", self.frame));
        }
        if self.device_state.len() > MAX_DEVICE_STATE_BYTES {
            return Err(format!("device state of {} bytes, at most {MAX_DEVICE_STATE_BYTES}", self.device_state.len()));
        }
        if !self.last && !self.device_state.is_empty() {
            return Err("only the last frame of an epoch carries device state".into());
        }
        if let Some((page, bytes)) = self.pages.iter().find(|(_, b)| b.len() as u64 > VM_PAGE_SIZE) {
            return Err(format!("page {page} of {} bytes, at most {VM_PAGE_SIZE}", bytes.len()));
        }
        if self.pages.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err("checkpoint pages must be strictly ascending".into());
        }
        Ok(())
    }

    /// Bytes of pages and device state.
    pub fn payload_bytes(&self) -> u64 {
        (self.pages.iter().map(|(_, b)| b.len()).sum::<usize>() + self.device_state.len()) as u64
    }
}

/// The standby committed every epoch up to `epoch` (cumulative), standby → primary.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct CheckpointAck {
    pub vm: VmId,
    pub generation: u64,
    pub epoch: u64,
}

/// The application's whole state, covering updates `..=seq`, primary → standby (the first
/// message of a multi-operation generation).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct AppSnapshot {
    pub vm: VmId,
    pub generation: u64,
    pub seq: u64,
    pub state: Vec<u8>,
}

/// One application-state update, primary → standby; `seq` counts the guest's outputs.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct AppUpdate {
    pub vm: VmId,
    pub generation: u64,
    pub seq: u64,
    pub data: Vec<u8>,
}

/// The standby applied every update up to `seq` (cumulative), standby → primary.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct AppAck {
    pub vm: VmId,
    pub generation: u64,
    pub seq: u64,
}

/// Why a host refused an HA message; the sender's state machine acts on it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum HaRefusal {
    /// The refusing host is at `generation`: whoever is behind refreshes the pair record.
    Generation { generation: u64 },
    /// The refusing host took over (or was told to) at `generation`: the sender is deposed.
    Sealed { generation: u64 },
    /// The standby has no image to apply a delta epoch on: send a full one.
    NeedFull,
    /// The standby has no application state to apply an update on: send a snapshot.
    NeedSnapshot,
    /// The frame does not fit what the standby staged (a bug or a forged frame): not retried as is.
    Malformed,
}

/// What a host holds of a pair (reported in every heartbeat).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum Holding {
    /// The host knows the pair but holds none of its state (it restarted, or it has no role).
    Nothing,
    /// Runs the VM as primary.
    Primary,
    /// Was primary, was deposed, keeps the paused guest until the takeover is recorded complete.
    Deposed,
    /// Standby with a complete checkpoint (or application state) it could start from.
    StandbyReady,
    /// Standby still taking its first copy.
    StandbySyncing,
}

/// One pair's state on the reporting host.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct PairStatus {
    pub vm: VmId,
    /// The newest generation the host knows for the pair.
    pub generation: u64,
    pub holding: Holding,
}

/// A host's heartbeat to the leader, every `heartbeat_ms`. `(incarnation, seq)` grows
/// lexicographically (the incarnation with every process start, `seq` with every heartbeat), so
/// the leader ignores a late one.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct HaHeartbeat {
    pub host: NodeId,
    pub incarnation: u64,
    pub seq: u64,
    pub pairs: Vec<PairStatus>,
}

/// Messages of HA pairs (node-only).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum HaMessage {
    Checkpoint(Checkpoint),
    CheckpointAck(CheckpointAck),
    AppSnapshot(AppSnapshot),
    AppUpdate(AppUpdate),
    AppAck(AppAck),
    /// New primary → old primary: the sender took over at `generation`; stop (best effort: the
    /// seal holds whether or not this arrives).
    Seal {
        vm: VmId,
        generation: u64,
    },
    /// Leader → the record's primary after a failover committed: seal and take over at
    /// `generation` (resent until answered).
    TakeOver {
        vm: VmId,
        generation: u64,
    },
    /// The host runs the VM as primary at `generation`.
    TookOver {
        vm: VmId,
        generation: u64,
    },
    /// The host cannot start the VM at `generation`: it holds no state (`lost`: it did start it
    /// at `generation`, then lost it, so it may have released outputs there).
    CannotTakeOver {
        vm: VmId,
        generation: u64,
        lost: bool,
    },
    /// The receiver refused the sender's message of `generation`.
    Refused {
        vm: VmId,
        generation: u64,
        refusal: HaRefusal,
    },
    Heartbeat(HaHeartbeat),
}

impl HaMessage {
    /// The pair a message is about (`None`: a heartbeat, about every pair of its host).
    pub fn vm(&self) -> Option<VmId> {
        Some(match self {
            Self::Checkpoint(c) => c.vm,
            Self::CheckpointAck(a) => a.vm,
            Self::AppSnapshot(s) => s.vm,
            Self::AppUpdate(u) => u.vm,
            Self::AppAck(a) => a.vm,
            Self::Seal { vm, .. }
            | Self::TakeOver { vm, .. }
            | Self::TookOver { vm, .. }
            | Self::CannotTakeOver { vm, .. }
            | Self::Refused { vm, .. } => *vm,
            Self::Heartbeat(_) => return None,
        })
    }

    /// Bounds on sizes and counts, checked once per inbound message.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Checkpoint(c) => c.validate(),
            Self::AppSnapshot(s) if s.state.len() > MAX_APP_STATE_BYTES => {
                Err(format!("application state of {} bytes, at most {MAX_APP_STATE_BYTES}", s.state.len()))
            }
            Self::AppUpdate(u) if u.data.len() > MAX_APP_UPDATE_BYTES => {
                Err(format!("application update of {} bytes, at most {MAX_APP_UPDATE_BYTES}", u.data.len()))
            }
            Self::Heartbeat(h) if h.pairs.len() > MAX_HEARTBEAT_PAIRS => {
                Err(format!("a heartbeat reports at most {MAX_HEARTBEAT_PAIRS} pairs, got {}", h.pairs.len()))
            }
            _ => Ok(()),
        }
    }
}

/// Catalog reads of HA pairs.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum HaQuery {
    Get { vm: VmId },
    List,
}

#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum HaQueryResult {
    Pair(Option<HaPairRecord>),
    Pairs(Vec<HaPairRecord>),
}

/// The outcome of an [`HaCommand`].
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum HaOutcome {
    /// The pair's record after the command (`None`: deleted).
    Pair(Option<HaPairRecord>),
    /// Nothing changed (`not_found`: the VM or the pair does not exist).
    Refused { reason: String, not_found: bool },
}

/// Most keys of a VM's application state; longest key and value of one entry.
pub const MAX_APP_KEYS: usize = 4096;
pub const MAX_APP_KEY_LEN: usize = 256;
pub const MAX_APP_VALUE_LEN: usize = 64 << 10;

/// Check one application entry's sizes.
pub fn validate_app_entry(key: &str, value: &[u8]) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_APP_KEY_LEN {
        return Err(format!("an application key has 1 to {MAX_APP_KEY_LEN} bytes, got {}", key.len()));
    }
    if value.len() > MAX_APP_VALUE_LEN {
        return Err(format!("an application value has at most {MAX_APP_VALUE_LEN} bytes, got {}", value.len()));
    }
    Ok(())
}

/// A host's view of one HA-protected VM, answered by `VmRequest::HaStatus` on any host that
/// knows the pair (the primary reports its mirror, the standby what it holds).
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq, Default,
)]
#[rkyv(derive(Debug))]
pub struct HaVmStatus {
    pub vm: VmId,
    pub host: NodeId,
    /// `primary`, `standby-ready`, `standby-syncing`, `deposed` or `none`.
    pub role: String,
    pub generation: u64,
    /// Outputs (disk writes, application updates) the guest issued and the host released.
    pub outputs_issued: u64,
    pub outputs_released: u64,
    /// Redundant mode: checkpoint epochs taken and acknowledged, their mean size and the pause p99.
    pub epochs: u64,
    pub epochs_acked: u64,
    pub epoch_bytes_mean: u64,
    pub pause_p50_ms: u64,
    pub pause_p99_ms: u64,
    /// How long the oldest unacknowledged epoch or update has waited.
    pub mirror_lag_ms: u64,
    /// On a standby: the epoch (redundant) or update (multi-operation) it could start from.
    pub standby_point: Option<u64>,
    /// On a host that took over: the epoch or update it started from.
    pub took_over_from: Option<u64>,
}

/// A VM's application state (a key-value document) as its primary holds it.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq, Default,
)]
#[rkyv(derive(Debug))]
pub struct AppView {
    pub vm: VmId,
    pub host: NodeId,
    pub generation: u64,
    /// Updates applied (the output sequence of the last one).
    pub applied: u64,
    pub entries: Vec<(String, Vec<u8>)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(pages: Vec<(u64, Vec<u8>)>, last: bool, device_state: Vec<u8>) -> Checkpoint {
        Checkpoint {
            vm: VmId(1),
            generation: 1,
            epoch: 1,
            frame: 0,
            full: false,
            last,
            outputs: 0,
            pages,
            device_state,
        }
    }

    #[test]
    fn checkpoint_frames_are_bounded() {
        assert!(frame(vec![(1, vec![0; 16]), (3, vec![1; 16])], true, vec![1]).validate().is_ok());
        assert!(frame(vec![(3, vec![0; 16]), (1, vec![0; 16])], true, vec![]).validate().is_err());
        assert!(frame(vec![(1, vec![0; 16]), (1, vec![0; 16])], true, vec![]).validate().is_err());
        assert!(frame(vec![(1, vec![0; 5000])], true, vec![]).validate().is_err());
        assert!(frame(vec![], false, vec![1]).validate().is_err());
        let many = (0..=MAX_PAGES_PER_FRAME as u64).map(|p| (p, vec![])).collect();
        assert!(frame(many, true, vec![]).validate().is_err());
        let big = HaMessage::AppUpdate(AppUpdate {
            vm: VmId(1),
            generation: 1,
            seq: 1,
            data: vec![0; MAX_APP_UPDATE_BYTES + 1],
        });
        assert!(big.validate().is_err());
    }

    #[test]
    fn records_and_commands_are_checked() {
        let mut r = HaPairRecord {
            vm: VmId(1),
            primary: NodeId(1),
            standby: Some(NodeId(2)),
            mode: HaMode::Redundant { epoch_ms: 20 },
            state: PairState::Protecting,
            generation: 1,
            failovers: 0,
            last_failover: None,
        };
        assert!(r.validate().is_ok());
        r.standby = Some(NodeId(1));
        assert!(r.validate().is_err());
        r.standby = None;
        assert!(r.validate().is_err(), "protecting without a standby");
        r.state = PairState::FailingOver;
        assert!(r.validate().is_err(), "failing over without a failover record");
        let create = |standby, epoch_ms| HaCommand::Create {
            vm: VmId(1),
            primary: NodeId(1),
            standby,
            mode: HaMode::Redundant { epoch_ms },
        };
        assert!(create(Some(NodeId(2)), 20).validate().is_ok());
        assert!(create(Some(NodeId(1)), 20).validate().is_err());
        assert!(create(Some(NodeId(2)), 1).validate().is_err());
    }
}
