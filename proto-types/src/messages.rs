//! Request and response vocabularies: what clients ask nodes ([`ClientRequest`]) and what actors
//! say to each other ([`ActorMessage`]). Both travel inside an [`crate::Envelope`] body; the same
//! actor message type is used whether the target actor is local or on another node.

use rkyv::{Archive, Deserialize, Serialize};

use crate::auth::Caller;
use crate::catalog::{CatalogCommand, CatalogQuery, CommandOutcome, QueryResult};
use crate::client_command::ClientCommand;
use crate::ha::HaMessage;
use crate::ids::NodeId;
use crate::share::{ShareMessage, ShareReply, ShareRequest, ShareResponse};
use crate::vm::{VmMessage, VmRequest, VmResponse};
use crate::volume::{DeviceMessage, DeviceReply, VolumeRequest, VolumeResponse};

/// A member to put in the initial cluster configuration or to add later.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct MemberSpec {
    pub id: NodeId,
    /// QUIC address (ip:port).
    pub addr: String,
    /// Admin HTTP address (ip:port).
    pub admin_addr: String,
}

/// A request from a client (SDK, havenctl, another node forwarding).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ClientRequest {
    /// This node's view of the cluster (answered locally, never forwarded).
    Status,
    /// The leader's view of the cluster, including replication progress (forwarded to the leader).
    LeaderStatus,
    /// Apply a client's catalog command through Raft (forwarded to the leader).
    Write { command: ClientCommand },
    /// Read catalog state. `linearizable` reads go through the leader's read index.
    Read { query: CatalogQuery, linearizable: bool },
    /// Add a member: as a learner first, then (if `voter`) promoted to voter.
    AddMember { member: MemberSpec, voter: bool },
    /// Remove a member from the voters and learners.
    RemoveMember { id: NodeId },
    /// A volume data or snapshot request, routed to the volume's primary.
    Volume(VolumeRequest),
    /// A request about a running VM, routed to the VM's host.
    Vm(VmRequest),
    /// Who the node sees on this connection: the identity and role its certificate carries.
    WhoAmI,
    /// This node's certificate and the cluster CA's: identities, serials and expiry.
    Certificates,
    /// A request about a shared dataset, answered by one of its members.
    Share(ShareRequest),
}

impl ClientRequest {
    /// Short name for logs, spans and metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::LeaderStatus => "leader_status",
            Self::Write { .. } => "write",
            Self::Read { .. } => "read",
            Self::AddMember { .. } => "add_member",
            Self::RemoveMember { .. } => "remove_member",
            Self::Volume(_) => "volume",
            Self::Vm(_) => "vm",
            Self::WhoAmI => "whoami",
            Self::Certificates => "certificates",
            Self::Share(_) => "share",
        }
    }
}

/// A request only nodes may send (the transport refuses it from a client certificate).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum NodeRequest {
    /// Propose any catalog command, internal ones included (forwarded to the leader once).
    /// Answered with [`ClientResponse::Written`].
    Propose { command: CatalogCommand },
    /// Ask the leader for read leases on the volumes this node holds an in-sync replica of,
    /// primary or not (see `volume::core::lease` in the node). Answered with [`ClientResponse::ReadLeases`] once the
    /// leader confirmed with a quorum that it still leads (forwarded to the leader once).
    ReadLeases,
}

/// One certificate as a node reports it (`havenctl cluster certs`).
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct CertificateInfo {
    /// `ca`, or the identity's URI (`haven://node/2`).
    pub identity: String,
    pub subject: String,
    pub serial: String,
    /// Validity, in seconds since the Unix epoch.
    pub not_before_unix_s: i64,
    pub not_after_unix_s: i64,
    /// SHA-256 of the DER, hex.
    pub sha256: String,
    /// The node that reported it.
    pub reported_by: NodeId,
}

/// A node's role in Raft.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum NodeRole {
    Leader,
    Follower,
    Candidate,
    Learner,
    /// Not yet part of an initialised cluster.
    Uninitialized,
    Shutdown,
}

/// One member as a node's Raft membership sees it.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct MemberInfo {
    pub id: NodeId,
    pub addr: String,
    pub admin_addr: String,
    pub voter: bool,
    /// On the leader's status only: the last log index known to be replicated to this member.
    pub matched_index: Option<u64>,
}

/// A node's view of itself and the cluster.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct NodeStatus {
    pub id: NodeId,
    pub role: NodeRole,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: Option<u64>,
    pub last_applied_index: Option<u64>,
    pub members: Vec<MemberInfo>,
    /// True when this node is a member and knows a leader.
    pub healthy: bool,
    pub version: String,
}

/// A node's answer to a [`ClientRequest`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ClientResponse {
    Status(NodeStatus),
    /// A write was committed at `index` and applied with `outcome`.
    Written {
        index: u64,
        outcome: CommandOutcome,
    },
    Read(QueryResult),
    /// Membership (or init) done; the membership log index.
    MembershipChanged {
        index: u64,
    },
    Volume(VolumeResponse),
    Vm(VmResponse),
    /// The caller as the node authenticated it.
    Identity(Caller),
    Certificates(Vec<CertificateInfo>),
    /// The volumes (and their epochs) the leader's catalog lists the asking node in sync for
    /// and is not revoking a lease on.
    ReadLeases(Vec<(crate::ids::VolumeId, u64)>),
    Share(ShareResponse),
}

/// A message to an actor. Every actor answers `Ping` and `Describe`; device actors take
/// [`DeviceMessage`]s; VM and memory-bank actors add their variants in later issues.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ActorMessage {
    /// Liveness probe carrying an opaque nonce that is echoed back.
    Ping { nonce: u64 },
    /// Describe the actor and its host.
    Describe,
    /// For a device actor (one per volume replica per host).
    Device(DeviceMessage),
    /// For a VM actor (one per VM, on its host).
    Vm(VmMessage),
    /// For a node's share actor.
    Share(ShareMessage),
    /// For a node's HA actor: checkpoints, application updates, seals, takeover orders,
    /// heartbeats (node-only). `from` is the sending node; the receiving service checks it
    /// against the certificate the envelope came with.
    Ha { from: NodeId, msg: HaMessage },
}

/// An actor's reply.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ActorReply {
    Pong {
        nonce: u64,
        from: NodeId,
    },
    /// `incarnation` is drawn at random when the node process starts: it changes exactly when
    /// the node restarted.
    Description {
        node: NodeId,
        kind: String,
        handled: u64,
        uptime_ms: u64,
        incarnation: u64,
    },
    Device(DeviceReply),
    Vm(VmResponse),
    Share(ShareReply),
    /// An HA message was taken (its effects happen asynchronously; refusals come back as
    /// `HaMessage::Refused` messages).
    HaTaken,
}
