//! The vocabulary of shared datasets (capability C2, differential sharing): what the catalog
//! records about a share ([`ShareRecord`]: its members and which member is the hub), the catalog
//! commands that change it ([`ShareCommand`]), the diffs members exchange ([`ShareDiff`]), the
//! requests clients make of a member ([`ShareRequest`]) and the messages members send each other
//! ([`ShareMessage`]).
//!
//! A share is a key-value document (a byte blob is the document with one key). Every member holds
//! the live copy; members synchronise with the hub in lockstep rounds, each side diffing its live
//! copy against the shadow it agreed with the other (see `node/src/share/core`). Sizes are
//! checked by `validate` before anything is proposed or applied. No I/O here.

use rkyv::{Archive, Deserialize, Serialize};

use crate::ids::{NodeId, ShareId};

/// Most members a share can have.
pub const MAX_SHARE_MEMBERS: usize = 8;
/// Longest share name.
pub const MAX_SHARE_NAME_LEN: usize = 64;
/// Longest key in a shared document.
pub const MAX_SHARE_KEY_LEN: usize = 256;
/// Largest value in a shared document.
pub const MAX_SHARE_VALUE_LEN: usize = 1 << 20;
/// Largest shared document (keys plus values). A reset carries the whole document in one frame,
/// so this stays well under `MAX_FRAME_LEN` (16 MiB).
pub const MAX_SHARE_DOC_BYTES: u64 = 8 << 20;
/// Most keys in a shared document.
pub const MAX_SHARE_KEYS: usize = 65_536;
/// Most operations in one diff.
pub const MAX_DIFF_OPS: usize = 65_536;

/// A shared dataset as the catalog records it.
///
/// **Invariant:** `hub ∈ members`, members are distinct and sorted, and `generation` grows on
/// every change of `hub` or `members` (each change is a compare-and-set on it). Members sync only
/// with the hub of the generation they know; a message of another generation is refused.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct ShareRecord {
    pub id: ShareId,
    pub name: String,
    pub members: Vec<NodeId>,
    pub hub: NodeId,
    pub generation: u64,
}

/// Catalog changes to shares. `Create`, `Delete` and `SetMembers` come from clients; `MoveHub`
/// only from the leader's share controller (a node proposal).
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ShareCommand {
    /// A new share on `members` (2 to [`MAX_SHARE_MEMBERS`] distinct hosts); the hub is the first.
    Create { name: String, members: Vec<NodeId> },
    /// Forget a share; its members drop their copies.
    Delete { share: ShareId },
    /// Replace the member set, if the share is still at `expected_generation`. The hub stays if it
    /// is still a member, else the first member that stays (else the first new member) becomes
    /// hub: a member that stays holds the document.
    SetMembers { share: ShareId, members: Vec<NodeId>, expected_generation: u64 },
    /// Make `hub` the hub, if the share is still at `expected_generation`.
    MoveHub { share: ShareId, hub: NodeId, expected_generation: u64 },
}

impl ShareCommand {
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Create { name, members } => {
                validate_name(name)?;
                validate_members(members)
            }
            Self::Delete { .. } | Self::MoveHub { .. } => Ok(()),
            Self::SetMembers { members, .. } => validate_members(members),
        }
    }
}

/// A share name: 1 to 64 characters of `[A-Za-z0-9._-]`, not starting with a digit (so it is never
/// read as an id).
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_SHARE_NAME_LEN {
        return Err(format!("a share name has 1 to {MAX_SHARE_NAME_LEN} characters, got {}", name.len()));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Err(format!("share name {name:?} may hold only letters, digits, '.', '_' and '-'"));
    }
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!("share name {name:?} must not start with a digit"));
    }
    Ok(())
}

fn validate_members(members: &[NodeId]) -> Result<(), String> {
    if members.len() < 2 || members.len() > MAX_SHARE_MEMBERS {
        return Err(format!("a share has 2 to {MAX_SHARE_MEMBERS} members, got {}", members.len()));
    }
    let mut sorted = members.to_vec();
    sorted.sort();
    sorted.dedup();
    if sorted.len() != members.len() {
        return Err("a share's members must be distinct hosts".into());
    }
    Ok(())
}

/// What applying a [`ShareCommand`] did.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ShareOutcome {
    Share(ShareRecord),
    Deleted,
    Refused { reason: String, not_found: bool },
}

/// Reads of the share table.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ShareQuery {
    Shares,
    /// By id (`share-3` or `3`) or name.
    Share {
        name_or_id: String,
    },
}

#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ShareQueryResult {
    Shares(Vec<ShareRecord>),
    Share(Option<ShareRecord>),
}

/// One change to a document.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ShareOp {
    /// Set `key` to `value` (whole value: for new keys and values rewritten beyond a splice).
    Put { key: String, value: Vec<u8> },
    /// Remove `key`.
    Delete { key: String },
    /// In the value of `key`, replace the `removed` bytes at `at` by `inserted`. `old_crc` is the
    /// CRC32C of the bytes replaced and `old_len` the length of the value the splice was computed
    /// against: a fuzzy apply uses them to tell whether the splice still fits.
    Splice { key: String, at: u64, removed: u64, inserted: Vec<u8>, old_len: u64, old_crc: u32 },
}

impl ShareOp {
    pub fn key(&self) -> &str {
        match self {
            Self::Put { key, .. } | Self::Delete { key } | Self::Splice { key, .. } => key,
        }
    }

    /// Bytes this operation puts on the wire beyond its fixed header: key and payload.
    pub fn payload_bytes(&self) -> u64 {
        let payload = match self {
            Self::Put { value, .. } => value.len(),
            Self::Delete { .. } => 0,
            Self::Splice { inserted, .. } => inserted.len(),
        };
        (self.key().len() + payload) as u64
    }
}

/// A document diff: operations applied in order. Exact against the base it was computed from.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq, Default,
)]
#[rkyv(derive(Debug))]
pub struct ShareDiff {
    pub ops: Vec<ShareOp>,
}

impl ShareDiff {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.ops.len() > MAX_DIFF_OPS {
            return Err(format!("a diff holds at most {MAX_DIFF_OPS} operations, got {}", self.ops.len()));
        }
        for op in &self.ops {
            validate_key(op.key())?;
            match op {
                ShareOp::Put { value, .. } => validate_value_len(value.len() as u64)?,
                ShareOp::Delete { .. } => {}
                ShareOp::Splice { at, removed, inserted, old_len, .. } => {
                    let end = at.checked_add(*removed).ok_or("splice range overflows")?;
                    if end > *old_len {
                        return Err(format!("splice {at}+{removed} ends past the value's {old_len} bytes"));
                    }
                    validate_value_len(*old_len)?;
                    validate_value_len(inserted.len() as u64)?;
                }
            }
        }
        Ok(())
    }
}

pub fn validate_key(key: &str) -> Result<(), String> {
    if key.len() > MAX_SHARE_KEY_LEN {
        return Err(format!("a share key has at most {MAX_SHARE_KEY_LEN} bytes, got {}", key.len()));
    }
    Ok(())
}

fn validate_value_len(len: u64) -> Result<(), String> {
    if len > MAX_SHARE_VALUE_LEN as u64 {
        return Err(format!("a share value has at most {MAX_SHARE_VALUE_LEN} bytes, got {len}"));
    }
    Ok(())
}

/// How long a client's put waits.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ShareAck {
    /// Durable on the member that took it, and reflected (durably) by the hub.
    Hub,
    /// Durable on every member of the share.
    AllMembers,
}

/// What a client asks of a share, answered by one member's share actor (the one named, else the
/// node that got the request if it is a member, else the hub).
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ShareRequest {
    /// Change the live copy at `member` (set `value`, or delete when `None`).
    Put { share: ShareId, member: Option<NodeId>, key: String, value: Option<Vec<u8>>, ack: ShareAck },
    /// Read the live copy at `member`: one key, or the whole document. With `after_version`, wait
    /// (up to `wait_ms`) until the member's live version is past it (`share watch`).
    Get { share: ShareId, member: Option<NodeId>, key: Option<String>, after_version: Option<u64>, wait_ms: u32 },
    /// Each member's sync state, asked of every member by the node that got the request.
    Members { share: ShareId },
}

impl ShareRequest {
    pub fn share(&self) -> ShareId {
        match self {
            Self::Put { share, .. } | Self::Get { share, .. } | Self::Members { share } => *share,
        }
    }

    pub fn is_read_only(&self) -> bool {
        !matches!(self, Self::Put { .. })
    }
}

/// One member's view of a share.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct ShareMemberStatus {
    pub member: NodeId,
    /// Whether it answered (a member that did not has only `member` set).
    pub reachable: bool,
    pub hub: NodeId,
    pub generation: u64,
    /// Changes to the live copy so far (local puts and reflected diffs).
    pub live_version: u64,
    pub keys: u64,
    pub bytes: u64,
    /// blake3 of the live document, hex (equal digests = equal copies).
    pub digest: String,
    /// Live copy equal to the shadow agreed with the hub (a spoke), or with every spoke (the hub).
    pub in_sync: bool,
    pub diffs_sent: u64,
    pub diffs_reflected: u64,
    /// Outbound diffs that carried back a change this member had reflected from that same peer.
    pub echoes: u64,
    pub diff_payload_bytes_sent: u64,
}

#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ShareResponse {
    /// A put is durable (as the request's `ack` asked) at the member's `live_version`.
    Put {
        member: NodeId,
        live_version: u64,
    },
    /// The live copy (or one key of it) at `member`.
    Doc {
        member: NodeId,
        live_version: u64,
        entries: Vec<(String, Vec<u8>)>,
    },
    Members(Vec<ShareMemberStatus>),
}

/// One lockstep round from a spoke to the hub: the spoke's live copy diffed against the shadow
/// both agreed at `base_version`.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct SyncRequest {
    pub share: ShareId,
    pub generation: u64,
    pub spoke: NodeId,
    pub round: u64,
    pub base_version: u64,
    pub diff: ShareDiff,
}

/// The hub's answer: its live copy diffed against the shadow after the spoke's diff; both sides'
/// shadows are then equal at `version`.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct SyncReply {
    pub round: u64,
    pub version: u64,
    pub diff: ShareDiff,
}

/// Messages between the members of a share (node-only).
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ShareMessage {
    /// A client's request, relayed to the member that answers it.
    Client(ShareRequest),
    /// A spoke's round ([`ShareReply::Synced`]).
    Sync(SyncRequest),
    /// A spoke with no shadow agreed with this hub asks for the hub's whole document
    /// ([`ShareReply::Reset`]).
    Reset { share: ShareId, generation: u64, spoke: NodeId },
    /// The hub tells a spoke its live copy changed (the spoke starts a round).
    Poke { share: ShareId, generation: u64 },
}

impl ShareMessage {
    pub fn share(&self) -> ShareId {
        match self {
            Self::Client(r) => r.share(),
            Self::Sync(s) => s.share,
            Self::Reset { share, .. } | Self::Poke { share, .. } => *share,
        }
    }
}

#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ShareReply {
    Client(ShareResponse),
    Synced(SyncReply),
    /// The hub's whole document, as the shadow both sides now agree at `version`.
    Reset {
        version: u64,
        entries: Vec<(String, Vec<u8>)>,
    },
    Poked,
    /// The member refused the message for a reason the sender's state machine acts on.
    Refused(ShareRefusal),
}

/// Why a member refused a sync message (`ShareReply::Refused`).
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ShareRefusal {
    /// The refusing member is at `generation`: whoever is behind refreshes the share record.
    Generation { generation: u64 },
    /// The round does not fit the hub's shadow: the spoke resets.
    Diverged { round: u64 },
    /// The refusing member is not the hub (the sender's record is stale, or the receiver's).
    NotHub,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_members_are_checked() {
        let ok = ShareCommand::Create { name: "app-state".into(), members: vec![NodeId(1), NodeId(2)] };
        assert!(ok.validate().is_ok());
        for name in ["", "9lives", "a b", &"x".repeat(65)] {
            let c = ShareCommand::Create { name: name.into(), members: vec![NodeId(1), NodeId(2)] };
            assert!(c.validate().is_err(), "{name:?}");
        }
        for members in [vec![NodeId(1)], vec![NodeId(1), NodeId(1)], (1..=9).map(NodeId).collect()] {
            let c = ShareCommand::Create { name: "s".into(), members };
            assert!(c.validate().is_err());
        }
    }

    #[test]
    fn diffs_are_bounded() {
        let splice = |at, removed, old_len| ShareDiff {
            ops: vec![ShareOp::Splice { key: "k".into(), at, removed, inserted: vec![], old_len, old_crc: 0 }],
        };
        assert!(splice(2, 3, 5).validate().is_ok());
        assert!(splice(3, 3, 5).validate().is_err());
        assert!(splice(u64::MAX, 2, 5).validate().is_err());
        let long_key = ShareDiff { ops: vec![ShareOp::Delete { key: "k".repeat(300) }] };
        assert!(long_key.validate().is_err());
    }
}
