//! Haven's wire types: the rkyv-archived [`Envelope`] every node and client exchanges, the ids that
//! name things in a cluster, the client and actor message vocabularies, and the frame format that
//! carries an envelope on a QUIC stream.
//!
//! This crate owns the *shape* of bytes on the wire and the rules for trusting them: every archive
//! that crossed a process boundary is validated (bytecheck) by [`Envelope::decode`] before a single
//! field is read. It must not do I/O, spawn tasks or know about Raft internals; the node and the
//! client crates build transports on top of it.

pub mod auth;
pub mod catalog;
pub mod client_command;
pub mod envelope;
pub mod error;
pub mod frame;
pub mod ha;
pub mod ids;
pub mod limits;
pub mod messages;
pub mod plan;
pub mod replication;
pub mod share;
pub mod vm;
pub mod volume;

pub use auth::{Caller, Role};
pub use catalog::{CatalogCommand, CatalogQuery, CommandOutcome, HostRecord, QueryResult};
pub use client_command::{
    ClientCommand, ClientHaCommand, ClientPlanCommand, ClientShareCommand, ClientVmCommand, ClientVolumeCommand,
};
pub use envelope::{aligned_copy, Body, Envelope, EnvelopeFlags, MessageKind, RaftRpc, PROTOCOL_VERSION};
pub use error::{ErrorCode, ProtoError, WireError};
pub use frame::{FrameHeader, FRAME_HEADER_LEN, MAX_FRAME_LEN};
pub use ids::{ActorAddr, ActorKind, NodeId, ShareId, VmId, VolumeId};
pub use messages::{
    ActorMessage, ActorReply, CertificateInfo, ClientRequest, ClientResponse, MemberInfo, MemberSpec, NodeRequest,
    NodeRole, NodeStatus,
};
