//! The envelope: the one archived type that crosses a process boundary.
//!
//! Every frame holds exactly one [`Envelope`]. [`Envelope::decode`] validates the archive with
//! bytecheck, then checks the protocol version, and only then deserializes; it never reads an
//! archive unchecked. A failure is a typed [`ProtoError`] for the transport to log and to close
//! the peer connection with.

use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

use crate::auth::Caller;
use crate::error::{ProtoError, WireError};
use crate::ids::{ActorAddr, NodeId};
use crate::messages::{ActorMessage, ActorReply, ClientRequest, ClientResponse, NodeRequest};

/// The protocol version this build speaks. A peer sending another version is refused.
/// Version 2 added [`Envelope::on_behalf_of`]; version 3 volume replication streams
/// (`DeviceMessage::ReplicationStream` replaced `Replicate`, `ReplicateZero` and `SyncWal`) and
/// `CatalogCommand::Batch`, which changed the archived layout.
pub const PROTOCOL_VERSION: u16 = 3;

/// Bit flags in [`Envelope::flags`].
pub struct EnvelopeFlags;

impl EnvelopeFlags {
    /// The request was forwarded by another node; the receiver must not forward it again.
    pub const FORWARDED: u32 = 1;
    /// The request opens a bulk stream: after this envelope the stream carries the body's own
    /// (validated) framing in both directions instead of one reply envelope.
    pub const STREAM: u32 = 2;
}

/// Which Raft RPC a [`Body::Raft`] carries.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum RaftRpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
    /// Would you vote for me? (Haven's pre-vote, `raft::campaign`; changes no state.)
    PreVote,
}

/// What an envelope carries.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum Body {
    /// An openraft RPC. openraft's types are serde-only, so `payload` is their bincode encoding;
    /// it is decoded with a size limit by the receiver.
    Raft { rpc: RaftRpc, payload: Vec<u8> },
    /// The reply to a Raft RPC (bincode of openraft's `Result<Response, RaftError>`).
    RaftReply { payload: Vec<u8> },
    /// A client request.
    Client(ClientRequest),
    /// A request only nodes may send.
    Node(NodeRequest),
    /// A successful reply to a client request.
    ClientReply(ClientResponse),
    /// A message for the actor at [`Envelope::dest`].
    Actor(ActorMessage),
    /// An actor's reply.
    ActorReply(ActorReply),
    /// A request failed.
    Error(WireError),
}

/// The kind of an envelope, for logs and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    Raft,
    RaftReply,
    Client,
    Node,
    ClientReply,
    Actor,
    ActorReply,
    Error,
}

impl MessageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raft => "raft",
            Self::RaftReply => "raft_reply",
            Self::Client => "client",
            Self::Node => "node",
            Self::ClientReply => "client_reply",
            Self::Actor => "actor",
            Self::ActorReply => "actor_reply",
            Self::Error => "error",
        }
    }
}

impl Body {
    pub fn kind(&self) -> MessageKind {
        match self {
            Self::Raft { .. } => MessageKind::Raft,
            Self::RaftReply { .. } => MessageKind::RaftReply,
            Self::Client(_) => MessageKind::Client,
            Self::Node(_) => MessageKind::Node,
            Self::ClientReply(_) => MessageKind::ClientReply,
            Self::Actor(_) => MessageKind::Actor,
            Self::ActorReply(_) => MessageKind::ActorReply,
            Self::Error(_) => MessageKind::Error,
        }
    }
}

/// One message on the wire.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Envelope {
    /// Protocol version of the sender; must equal [`PROTOCOL_VERSION`].
    pub version: u16,
    /// Sender-chosen id; a reply carries the id of its request.
    pub msg_id: u64,
    /// Sending node (`NodeId(0)` for clients).
    pub sender: NodeId,
    /// The actor this is for.
    pub dest: ActorAddr,
    /// [`EnvelopeFlags`] bits.
    pub flags: u32,
    /// Set by a node that relays a request it received from someone else (a client's write
    /// forwarded to the leader, a client's actor message routed to the owning node): the original
    /// caller, whom the receiver authorizes instead of the relaying node. Receivers honour it only
    /// on a connection authenticated as a node; from a client it is refused.
    pub on_behalf_of: Option<Caller>,
    pub body: Body,
}

impl Envelope {
    /// A new envelope at the current protocol version.
    pub fn new(msg_id: u64, sender: NodeId, dest: ActorAddr, body: Body) -> Self {
        Self { version: PROTOCOL_VERSION, msg_id, sender, dest, flags: 0, on_behalf_of: None, body }
    }

    pub fn kind(&self) -> MessageKind {
        self.body.kind()
    }

    /// Archive the envelope. The result is aligned for [`Envelope::access`].
    pub fn encode(&self) -> Result<AlignedVec, ProtoError> {
        rkyv::to_bytes::<rancor::Error>(self).map_err(|e| ProtoError::Codec(e.to_string()))
    }

    /// Validate `bytes` as an archived envelope and check its version, without copying.
    ///
    /// `bytes` must be 16-byte aligned (read frames into an [`AlignedVec`]); an unaligned buffer
    /// is reported as invalid rather than read.
    pub fn access(bytes: &[u8]) -> Result<&ArchivedEnvelope, ProtoError> {
        let archived =
            rkyv::access::<ArchivedEnvelope, rancor::Error>(bytes).map_err(|e| ProtoError::Invalid(e.to_string()))?;
        let version = archived.version.to_native();
        if version != PROTOCOL_VERSION {
            return Err(ProtoError::UnsupportedVersion { got: version, supported: PROTOCOL_VERSION });
        }
        Ok(archived)
    }

    /// Validate, check the version, and deserialize into an owned envelope.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, ProtoError> {
        let archived = Self::access(bytes)?;
        rkyv::deserialize::<Envelope, rancor::Error>(archived).map_err(|e| ProtoError::Invalid(e.to_string()))
    }
}

/// Copy `bytes` into a buffer aligned for [`Envelope::access`].
pub fn aligned_copy(bytes: &[u8]) -> AlignedVec {
    let mut v = AlignedVec::with_capacity(bytes.len());
    v.extend_from_slice(bytes);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client_command::ClientCommand;
    use crate::ids::ActorAddr;

    fn sample() -> Envelope {
        Envelope::new(
            7,
            NodeId(1),
            ActorAddr::node(NodeId(2)),
            Body::Client(ClientRequest::Write {
                command: ClientCommand::KvPut { key: "k".into(), value: vec![1, 2, 3] },
            }),
        )
    }

    #[test]
    fn round_trip() {
        let env = sample();
        let bytes = env.encode().unwrap();
        assert_eq!(Envelope::decode(&bytes).unwrap(), env);
    }

    #[test]
    fn wrong_version_is_refused() {
        let mut env = sample();
        env.version = 99;
        let bytes = env.encode().unwrap();
        assert_eq!(
            Envelope::decode(&bytes),
            Err(ProtoError::UnsupportedVersion { got: 99, supported: PROTOCOL_VERSION })
        );
    }

    #[test]
    fn garbage_and_truncation_are_refused() {
        let bytes = sample().encode().unwrap();
        let truncated = aligned_copy(&bytes[..bytes.len() / 2]);
        assert!(matches!(Envelope::decode(&truncated), Err(ProtoError::Invalid(_))));
        let garbage = aligned_copy(&[0xAB; 97]);
        assert!(matches!(Envelope::decode(&garbage), Err(ProtoError::Invalid(_))));
        assert!(matches!(Envelope::decode(&[]), Err(ProtoError::Invalid(_))));
    }

    #[test]
    fn every_single_byte_corruption_is_refused_or_decodes() {
        // Flipping any byte must never panic: it either fails validation or decodes to some
        // (possibly different) well-formed envelope.
        let bytes = sample().encode().unwrap();
        for i in 0..bytes.len() {
            let mut b = aligned_copy(&bytes);
            b[i] ^= 0xFF;
            let _ = Envelope::decode(&b);
        }
    }
}

#[cfg(test)]
mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Arbitrary bytes never panic the decoder: they are refused or decode to a well-formed
        /// envelope at the current version.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let aligned = aligned_copy(&bytes);
            if let Ok(env) = Envelope::decode(&aligned) {
                prop_assert_eq!(env.version, PROTOCOL_VERSION);
            }
        }

        #[test]
        fn any_payload_round_trips(payload in proptest::collection::vec(any::<u8>(), 0..4096), id in any::<u64>()) {
            let env = Envelope::new(id, NodeId(3), ActorAddr::node(NodeId(4)), Body::Raft { rpc: RaftRpc::Vote, payload });
            let bytes = env.encode().unwrap();
            prop_assert_eq!(Envelope::decode(&bytes).unwrap(), env);
        }
    }
}
