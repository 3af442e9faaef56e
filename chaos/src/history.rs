//! The operation history a workload records: one [`Op`] per client operation with its invoke
//! and completion times and its outcome. Checkers judge the run from this alone (the operations
//! workload adds what its read-backs saw, keyed by op id). Register and append operations come
//! from the register workload, `block_write`s from the block workload, `migrate`s from the VM
//! workload, `ops_write`s and `volume_op`s from the operations workload, `app_put`s from the HA
//! workload and `share_put`s from the share workload.

use serde::{Deserialize, Serialize};

/// What an operation asked for. Register values are `u64`; `None` means absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "f", rename_all = "lowercase")]
pub enum OpKind {
    Read,
    Write {
        value: u64,
    },
    Cas {
        expected: Option<u64>,
        new: u64,
    },
    /// A write to a key no other operation touches (`ack/<client>/<seq>`), for the
    /// acknowledged-writes checker.
    Append {
        value: u64,
    },
    /// A write of one 4 KiB block of the block workload's volume (key `blk/<block>`): the `n`th
    /// write attempted to that block. Only the block checker looks at these.
    #[serde(rename = "block_write")]
    BlockWrite {
        block: u64,
        n: u64,
    },
    /// A read of one block of the block workload's volume by its writer, during the run,
    /// through one node chosen at random: `n` is the write it found (0: zeroes). Only a read
    /// that decoded as this block's own is recorded. The fresh-block-reads checker looks at
    /// these.
    #[serde(rename = "block_read")]
    BlockRead {
        block: u64,
        n: u64,
    },
    /// A live migration of VM `vm` to host `to` by the VM workload (key `vm/<vm>`): Ok = the
    /// migration finished there, Fail = it ended without moving the VM, Info = unknown.
    #[serde(rename = "migrate")]
    Migrate {
        vm: u64,
        to: u64,
    },
    /// A write of one 4 KiB block of the operations workload's volume (key `ops/blk/<block>`):
    /// the `n`th write attempted to that block (content as [`crate::blocks::encode`]).
    #[serde(rename = "ops_write")]
    OpsWrite {
        block: u64,
        n: u64,
    },
    /// A user operation on the operations workload's volume (key `ops/<name>`).
    #[serde(rename = "volume_op")]
    VolumeOp {
        op: VolumeOpKind,
    },
    /// An application put to HA VM `vm` (history key `ha/<vm>/k<slot>`): the `n`th put of that
    /// VM's workload (every attempt numbered), setting application key `k<slot>` to
    /// [`crate::ha::app_value`]`(vm, n)`. Ok = acknowledged (released by the pair).
    #[serde(rename = "app_put")]
    AppPut {
        vm: u64,
        slot: u64,
        n: u64,
    },
    /// A put to the share workload's share at `member` (history key `share/<member>/k<slot>`):
    /// the `n`th put of that member's writer, setting share key `m<member>/k<slot>` to
    /// [`crate::shares::share_value`]`(member, n)`.
    #[serde(rename = "share_put")]
    SharePut {
        member: u64,
        slot: u64,
        n: u64,
    },
}

/// What the operations workload did to its volume. Snapshots are numbered by the workload
/// (1, 2, ... in the order it asked for them; named `<volume>-s<snap>`), not by the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum VolumeOpKind {
    Snapshot {
        snap: u64,
    },
    Rollback {
        snap: u64,
    },
    /// Copy snapshot `snap` into a new volume.
    Clone {
        snap: u64,
    },
    /// Grow the volume to `size` bytes.
    Resize {
        size: u64,
    },
    /// Create an async (DR) relationship to host `target`.
    RelCreate {
        target: u64,
    },
    RelPause {
        id: u64,
    },
    RelResume {
        id: u64,
    },
    /// Reverse relationship `id`: its copy on `to` becomes the primary, `from` (the primary
    /// before) receives the copy.
    RelReverse {
        id: u64,
        from: u64,
        to: u64,
    },
    RelDelete {
        id: u64,
    },
    /// A read-back; what it saw is in the workload's observations under this op's id.
    Read {
        of: ReadOf,
    },
}

/// What a read-back of the operations workload read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "of", rename_all = "snake_case")]
pub enum ReadOf {
    /// The volume's owned blocks as they are now.
    Volume,
    /// Snapshot `snap`'s owned blocks.
    Snapshot { snap: u64 },
    /// The owned blocks of the clone of snapshot `snap`.
    Clone { snap: u64 },
    /// The last block of the volume after a resize (never written, so zeroes).
    Tail { offset: u64 },
}

impl VolumeOpKind {
    /// A short name for reports (`snapshot`, `rollback`, `rel_reverse`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Snapshot { .. } => "snapshot",
            Self::Rollback { .. } => "rollback",
            Self::Clone { .. } => "clone",
            Self::Resize { .. } => "resize",
            Self::RelCreate { .. } => "rel_create",
            Self::RelPause { .. } => "rel_pause",
            Self::RelResume { .. } => "rel_resume",
            Self::RelReverse { .. } => "rel_reverse",
            Self::RelDelete { .. } => "rel_delete",
            Self::Read { .. } => "read",
        }
    }
}

impl OpKind {
    pub fn is_block(&self) -> bool {
        matches!(self, Self::BlockWrite { .. })
    }

    pub fn is_migration(&self) -> bool {
        matches!(self, Self::Migrate { .. })
    }

    /// An operation of the operations workload (its writes, operations and read-backs).
    pub fn is_operations(&self) -> bool {
        matches!(self, Self::OpsWrite { .. } | Self::VolumeOp { .. })
    }

    pub fn is_app_put(&self) -> bool {
        matches!(self, Self::AppPut { .. })
    }

    pub fn is_share_put(&self) -> bool {
        matches!(self, Self::SharePut { .. })
    }

    /// An operation of the register workload (judged by `linearizable` / `acknowledged-writes`).
    pub fn is_register(&self) -> bool {
        matches!(self, Self::Read | Self::Write { .. } | Self::Cas { .. } | Self::Append { .. })
    }
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Outcome {
    /// Acknowledged. For reads, the value read; for CAS, whether it matched.
    Ok { read: Option<u64>, cas_matched: Option<bool> },
    /// Certainly had no effect.
    Fail,
    /// May or may not have taken effect (timed out, connection lost in flight).
    Info,
}

impl Outcome {
    /// How an operation that returned `e` ended: `Fail` only when the error proves it had no
    /// effect (nothing reachable, or the cluster refused it), else `Info`.
    pub fn of_error(e: &haven_client::ClientError) -> Self {
        use haven_client::ClientError as E;
        match e {
            E::Unreachable { .. } | E::Server(_) | E::Config(_) => Self::Fail,
            E::Indeterminate(_) | E::Protocol(_) | E::Wire(_) => Self::Info,
        }
    }

    /// How a put to a node that may hold it past its answer (an HA primary waiting for its
    /// standby, a share member durable before its hub reflected it) ended: `Fail` only for a
    /// refusal — the cluster said why it did nothing — and `Info` for everything else, an
    /// `Unavailable` or an unreachable cluster included (the put may still be released).
    pub fn of_put_error(e: &haven_client::ClientError) -> Self {
        use haven_client::proto::ErrorCode as C;
        use haven_client::ClientError as E;
        match e {
            E::Config(_) => Self::Fail,
            E::Server(w)
                if matches!(w.code, C::InvalidRequest | C::NotFound | C::PermissionDenied | C::LimitExceeded) =>
            {
                Self::Fail
            }
            _ => Self::Info,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub id: usize,
    pub client: usize,
    pub key: String,
    pub kind: OpKind,
    /// Microseconds since the run started.
    pub invoke_us: u64,
    pub complete_us: u64,
    pub outcome: Outcome,
    /// Error text for failed and indeterminate operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Op {
    /// Append a completed operation to the run's shared history; its id is its position there
    /// (returned).
    pub fn record(self, history: &std::sync::Mutex<Vec<Op>>) -> usize {
        let mut h = history.lock().expect("history lock");
        let id = h.len();
        h.push(Op { id, ..self });
        id
    }

    pub fn is_ok(&self) -> bool {
        matches!(self.outcome, Outcome::Ok { .. })
    }

    pub fn latency_ms(&self) -> f64 {
        (self.complete_us.saturating_sub(self.invoke_us)) as f64 / 1000.0
    }
}
