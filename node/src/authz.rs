//! The authorization table: who may send what. One module, one match ([`required`]), checked by
//! the transport for every inbound envelope before any handler sees it.
//!
//! The connection's identity comes from its certificate (`identity`); the envelope's `sender` must
//! agree with it, and only a node may set the `FORWARDED` or `STREAM` flags or relay a request on
//! behalf of someone else (`Envelope::on_behalf_of`). The *effective* caller — the original
//! client of a relayed request, else the connection's identity — is what the table authorizes, so
//! a node relaying a client's message never lends the client its own rights.
//!
//! | request | node | admin | reader |
//! |---|---|---|---|
//! | Raft RPCs, node requests (internal catalog proposals), device/VM/group actor messages, bulk streams (migrations, volume replication) | yes | no | no |
//! | a client's volume/VM request addressed to the device or VM actor | as through the node endpoint | | |
//! | client writes, membership changes, volume and VM changes | yes | yes | no |
//! | fault injection (`volume corrupt`) | only when the node runs with `--allow-fault-injection` | same | no |
//! | status, reads, lists, shows, actor ping/describe | yes | yes | yes |
//!
//! This module is pure: no I/O, no clock. It must not look inside payloads beyond the request
//! kind (sizes and contents are validated where they are decoded).

use haven_proto::share::{ShareMessage, ShareRequest};
use haven_proto::vm::{VmMessage, VmRequest};
use haven_proto::volume::{DeviceMessage, VolumeRequest};
use haven_proto::{ActorMessage, Body, Caller, ClientRequest, EnvelopeFlags, NodeId, Role};

/// Every flag bit this build knows.
const KNOWN_FLAGS: u32 = EnvelopeFlags::FORWARDED | EnvelopeFlags::STREAM;

/// What a request needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Any authenticated caller.
    Any,
    /// An `admin` client or a node.
    Admin,
    /// Like `Admin`, and only while fault injection is enabled on this node.
    Fault,
    /// Only a node.
    Node,
}

/// Why a request was refused. Each variant is a `reason` label of
/// `haven_authz_refused_total`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("envelope claims sender {claimed} but the connection's certificate is {actual}")]
    SenderMismatch { claimed: NodeId, actual: Caller },
    #[error("{caller} may not set envelope flags {flags:#x} (only nodes forward or open streams)")]
    Flags { caller: Caller, flags: u32 },
    #[error("unknown envelope flags {0:#x}")]
    UnknownFlags(u32),
    #[error("{caller} may not relay on behalf of {on_behalf_of} (only nodes relay, and only for clients)")]
    Relay { caller: Caller, on_behalf_of: Caller },
    #[error("{what} is for cluster nodes only; {caller} may not send it")]
    NodeOnly { what: &'static str, caller: Caller },
    #[error("{what} needs an admin certificate; {caller} may only read")]
    ReadOnly { what: &'static str, caller: Caller },
    #[error(
        "{what} is fault injection, refused: start the node with --allow-fault-injection (testing only) to allow it"
    )]
    FaultsDisabled { what: &'static str },
}

impl Refusal {
    /// The metric label for this refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::SenderMismatch { .. } => "sender_mismatch",
            Self::Flags { .. } => "flags",
            Self::UnknownFlags(_) => "unknown_flags",
            Self::Relay { .. } => "relay",
            Self::NodeOnly { .. } => "node_only",
            Self::ReadOnly { .. } => "read_only",
            Self::FaultsDisabled { .. } => "faults_disabled",
        }
    }
}

/// What the caller on a connection is allowed, as one envelope's header and body ask it.
pub struct Request<'a> {
    pub sender: NodeId,
    pub flags: u32,
    pub on_behalf_of: Option<&'a Caller>,
    pub body: &'a Body,
}

/// Authorize one inbound envelope from the connection authenticated as `conn`. Returns the
/// effective caller (the relayed client, else `conn`).
pub fn authorize(conn: &Caller, req: &Request<'_>, faults_allowed: bool) -> Result<Caller, Refusal> {
    check_header(conn, req)?;
    let effective = req.on_behalf_of.cloned().unwrap_or_else(|| conn.clone());
    let (what, need) = required(req.body);
    permit(&effective, what, need, faults_allowed)?;
    Ok(effective)
}

/// Sender binding, flags and relaying: everything about the envelope's header.
fn check_header(conn: &Caller, req: &Request<'_>) -> Result<(), Refusal> {
    let expected_sender = conn.node().unwrap_or(NodeId(0));
    if req.sender != expected_sender {
        return Err(Refusal::SenderMismatch { claimed: req.sender, actual: conn.clone() });
    }
    if req.flags & !KNOWN_FLAGS != 0 {
        return Err(Refusal::UnknownFlags(req.flags & !KNOWN_FLAGS));
    }
    if req.flags != 0 && !conn.is_node() {
        return Err(Refusal::Flags { caller: conn.clone(), flags: req.flags });
    }
    match req.on_behalf_of {
        None => Ok(()),
        Some(Caller::Client { .. }) if conn.is_node() && req.flags & EnvelopeFlags::STREAM == 0 => Ok(()),
        Some(other) => Err(Refusal::Relay { caller: conn.clone(), on_behalf_of: other.clone() }),
    }
}

fn permit(caller: &Caller, what: &'static str, need: Need, faults_allowed: bool) -> Result<(), Refusal> {
    let role = match caller {
        Caller::Node(_) => None,
        Caller::Client { role, .. } => Some(*role),
    };
    match (need, role) {
        (Need::Any, _) => Ok(()),
        (Need::Node, None) => Ok(()),
        (Need::Node, Some(_)) => Err(Refusal::NodeOnly { what, caller: caller.clone() }),
        (Need::Admin | Need::Fault, Some(Role::Reader)) => Err(Refusal::ReadOnly { what, caller: caller.clone() }),
        (Need::Fault, _) if !faults_allowed => Err(Refusal::FaultsDisabled { what }),
        (Need::Admin | Need::Fault, None | Some(Role::Admin)) => Ok(()),
    }
}

/// The table: what each request is called in refusals, and what it needs.
pub fn required(body: &Body) -> (&'static str, Need) {
    match body {
        Body::Raft { .. } => ("a Raft RPC", Need::Node),
        Body::Node(_) => ("a node request (internal catalog proposal)", Need::Node),
        Body::Client(req) => client_request(req),
        Body::Actor(ActorMessage::Ping { .. }) => ("an actor ping", Need::Any),
        Body::Actor(ActorMessage::Describe) => ("an actor describe", Need::Any),
        // A client's request addressed straight to the actor that serves it needs what the same
        // request through the node endpoint needs.
        Body::Actor(ActorMessage::Device(DeviceMessage::Client(v))) => volume_request(v),
        Body::Actor(ActorMessage::Vm(VmMessage::Client(v))) => vm_request(v),
        // Opens a volume's replication stream (`volume::stream`): writes between replicas.
        Body::Actor(ActorMessage::Device(DeviceMessage::ReplicationStream { .. })) => {
            ("a replication stream", Need::Node)
        }
        Body::Actor(ActorMessage::Device(_)) => ("a device message", Need::Node),
        Body::Actor(ActorMessage::Vm(VmMessage::Group(_))) => ("a group request", Need::Node),
        Body::Actor(ActorMessage::Vm(VmMessage::IncomingMigration { .. })) => ("an incoming migration", Need::Node),
        Body::Actor(ActorMessage::Vm(_)) => ("a VM actor message", Need::Node),
        Body::Actor(ActorMessage::Share(ShareMessage::Client(r))) => share_request(r),
        // Diffs between members (a round, a reset, a poke) change every member's copy.
        Body::Actor(ActorMessage::Share(_)) => ("a share sync message", Need::Node),
        // Checkpoints, application updates, seals and takeover orders decide what a VM is.
        Body::Actor(ActorMessage::Ha { .. }) => ("an HA pair message", Need::Node),
        // Replies sent as requests are refused by the service as malformed, whoever sends them.
        Body::RaftReply { .. } | Body::ClientReply(_) | Body::ActorReply(_) | Body::Error(_) => ("a reply", Need::Any),
    }
}

fn client_request(req: &ClientRequest) -> (&'static str, Need) {
    match req {
        ClientRequest::Status
        | ClientRequest::LeaderStatus
        | ClientRequest::Read { .. }
        | ClientRequest::WhoAmI
        | ClientRequest::Certificates => (req.name(), Need::Any),
        ClientRequest::Write { .. } => ("a catalog write", Need::Admin),
        ClientRequest::AddMember { .. } | ClientRequest::RemoveMember { .. } => ("a membership change", Need::Admin),
        ClientRequest::Volume(v) => volume_request(v),
        ClientRequest::Vm(v) => vm_request(v),
        ClientRequest::Share(r) => share_request(r),
    }
}

fn share_request(req: &ShareRequest) -> (&'static str, Need) {
    match req {
        ShareRequest::Get { .. } | ShareRequest::Members { .. } => ("a share read", Need::Any),
        ShareRequest::Put { .. } => ("a share change", Need::Admin),
    }
}

fn vm_request(req: &VmRequest) -> (&'static str, Need) {
    match req {
        VmRequest::Status { .. }
        | VmRequest::Check { .. }
        | VmRequest::MigrationProgress { .. }
        | VmRequest::HaStatus { .. } => ("a VM status request", Need::Any),
        VmRequest::AppGet { .. } => ("an application state read", Need::Any),
        VmRequest::AppPut { .. } => ("an application state change", Need::Admin),
        VmRequest::Migrate { .. } | VmRequest::CancelMigration { .. } => ("a VM migration request", Need::Admin),
    }
}

fn volume_request(req: &VolumeRequest) -> (&'static str, Need) {
    match req {
        VolumeRequest::InjectCorruption { .. } => ("volume corruption injection", Need::Fault),
        VolumeRequest::Read { .. } | VolumeRequest::ReplicationStatus { .. } | VolumeRequest::Preserved { .. } => {
            ("a volume read", Need::Any)
        }
        VolumeRequest::Write { .. }
        | VolumeRequest::Snapshot { .. }
        | VolumeRequest::DeleteSnapshot { .. }
        | VolumeRequest::Rollback { .. }
        | VolumeRequest::Verify { .. }
        | VolumeRequest::Repair { .. }
        | VolumeRequest::CopyInto { .. }
        | VolumeRequest::ReverseRelationship { .. } => ("a volume change", Need::Admin),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_proto::plan::GroupRequest;
    use haven_proto::{ClientCommand, NodeRequest, RaftRpc, VolumeId};

    fn node(n: u64) -> Caller {
        Caller::Node(NodeId(n))
    }
    fn admin() -> Caller {
        Caller::Client { role: Role::Admin, name: "cli".into() }
    }
    fn reader() -> Caller {
        Caller::Client { role: Role::Reader, name: "ro".into() }
    }

    fn ask(conn: &Caller, body: Body) -> Result<Caller, Refusal> {
        let sender = conn.node().unwrap_or(NodeId(0));
        authorize(conn, &Request { sender, flags: 0, on_behalf_of: None, body: &body }, false)
    }

    fn raft() -> Body {
        Body::Raft { rpc: RaftRpc::Vote, payload: vec![] }
    }
    fn prevote() -> Body {
        Body::Raft { rpc: RaftRpc::PreVote, payload: vec![] }
    }
    fn replication_stream() -> Body {
        Body::Actor(ActorMessage::Device(DeviceMessage::ReplicationStream { volume: VolumeId(1) }))
    }
    fn propose() -> Body {
        Body::Node(NodeRequest::Propose { command: haven_proto::CatalogCommand::KvDelete { key: "k".into() } })
    }
    fn device() -> Body {
        Body::Actor(ActorMessage::Device(DeviceMessage::RollbackTo { volume: VolumeId(1), epoch: 1000, seq: 0 }))
    }
    fn group() -> Body {
        Body::Actor(ActorMessage::Vm(VmMessage::Group(GroupRequest::Release { plan: 1, volume_snapshots: vec![] })))
    }
    fn takeover() -> Body {
        let msg = haven_proto::ha::HaMessage::TakeOver { vm: haven_proto::VmId(1), generation: 2 };
        Body::Actor(ActorMessage::Ha { from: NodeId(1), msg })
    }
    fn incoming() -> Body {
        Body::Actor(ActorMessage::Vm(VmMessage::IncomingMigration { vm: haven_proto::VmId(1), generation: 1 }))
    }
    fn write() -> Body {
        Body::Client(ClientRequest::Write { command: ClientCommand::KvPut { key: "k".into(), value: vec![] } })
    }
    fn volume_write() -> Body {
        Body::Client(ClientRequest::Volume(VolumeRequest::Write { volume: VolumeId(1), offset: 0, data: vec![0] }))
    }
    fn corrupt() -> Body {
        Body::Client(ClientRequest::Volume(VolumeRequest::InjectCorruption {
            volume: VolumeId(1),
            host: NodeId(1),
            block: 0,
            data: vec![],
        }))
    }

    fn share_sync() -> Body {
        Body::Actor(ActorMessage::Share(ShareMessage::Sync(haven_proto::share::SyncRequest {
            share: haven_proto::ShareId(1),
            generation: 1,
            spoke: NodeId(2),
            round: 0,
            base_version: 0,
            diff: Default::default(),
        })))
    }
    fn share_reset() -> Body {
        let reset = ShareMessage::Reset { share: haven_proto::ShareId(1), generation: 1, spoke: NodeId(2) };
        Body::Actor(ActorMessage::Share(reset))
    }

    #[test]
    fn share_diffs_come_only_from_nodes_and_puts_from_admins() {
        for body in [share_sync(), share_reset()] {
            assert_eq!(ask(&node(2), body.clone()), Ok(node(2)));
            for c in [admin(), reader()] {
                assert!(matches!(ask(&c, body.clone()), Err(Refusal::NodeOnly { .. })), "{body:?} from {c}");
            }
        }
        let share = haven_proto::ShareId(1);
        let put = ShareRequest::Put {
            share,
            member: None,
            key: "k".into(),
            value: Some(vec![1]),
            ack: haven_proto::share::ShareAck::Hub,
        };
        let get = ShareRequest::Get { share, member: None, key: None, after_version: None, wait_ms: 0 };
        for body in [
            Body::Client(ClientRequest::Share(put.clone())),
            Body::Actor(ActorMessage::Share(ShareMessage::Client(put))),
        ] {
            assert!(ask(&admin(), body.clone()).is_ok());
            assert!(matches!(ask(&reader(), body), Err(Refusal::ReadOnly { .. })));
        }
        for body in [
            Body::Client(ClientRequest::Share(get.clone())),
            Body::Actor(ActorMessage::Share(ShareMessage::Client(get))),
        ] {
            assert!(ask(&reader(), body).is_ok());
        }
    }

    #[test]
    fn node_only_messages_are_refused_to_every_client_role() {
        for body in [raft(), prevote(), replication_stream(), propose(), device(), group(), incoming(), takeover()] {
            assert_eq!(ask(&node(2), body.clone()), Ok(node(2)));
            for c in [admin(), reader()] {
                assert!(matches!(ask(&c, body.clone()), Err(Refusal::NodeOnly { .. })), "{body:?} from {c}");
            }
        }
    }

    #[test]
    fn only_nodes_open_replication_streams() {
        let body = replication_stream();
        let open = |conn: &Caller| {
            let sender = conn.node().unwrap_or(NodeId(0));
            authorize(conn, &Request { sender, flags: EnvelopeFlags::STREAM, on_behalf_of: None, body: &body }, true)
        };
        assert_eq!(open(&node(2)), Ok(node(2)));
        for c in [admin(), reader()] {
            assert!(matches!(open(&c), Err(Refusal::Flags { .. })), "{c} opening a replication stream");
        }
        // Relayed for a client: refused whatever the relaying node may do itself.
        let a = admin();
        let req = Request { sender: NodeId(2), flags: EnvelopeFlags::STREAM, on_behalf_of: Some(&a), body: &body };
        assert!(matches!(authorize(&node(2), &req, true), Err(Refusal::Relay { .. })));
        let req = Request { sender: NodeId(2), flags: 0, on_behalf_of: Some(&a), body: &body };
        assert!(matches!(authorize(&node(2), &req, true), Err(Refusal::NodeOnly { .. })));
    }

    #[test]
    fn readers_read_and_admins_write() {
        for body in [write(), volume_write()] {
            assert!(ask(&admin(), body.clone()).is_ok());
            assert!(ask(&node(1), body.clone()).is_ok());
            assert!(matches!(ask(&reader(), body), Err(Refusal::ReadOnly { .. })));
        }
        let read = Body::Client(ClientRequest::Volume(VolumeRequest::Read {
            volume: VolumeId(1),
            offset: 0,
            len: 4096,
            snapshot: None,
        }));
        let vm_status =
            Body::Actor(ActorMessage::Vm(VmMessage::Client(VmRequest::Status { vm: haven_proto::VmId(1) })));
        let vm_migrate = Body::Actor(ActorMessage::Vm(VmMessage::Client(VmRequest::Migrate {
            vm: haven_proto::VmId(1),
            to: NodeId(2),
            options: Default::default(),
            plan: None,
        })));
        assert!(matches!(ask(&reader(), vm_migrate.clone()), Err(Refusal::ReadOnly { .. })));
        assert!(ask(&admin(), vm_migrate).is_ok());
        let vm = haven_proto::VmId(1);
        let app_put = Body::Client(ClientRequest::Vm(VmRequest::AppPut { vm, key: "k".into(), value: None }));
        assert!(matches!(ask(&reader(), app_put.clone()), Err(Refusal::ReadOnly { .. })));
        assert!(ask(&admin(), app_put).is_ok());
        for read in [VmRequest::AppGet { vm }, VmRequest::HaStatus { vm, at: None }] {
            assert!(ask(&reader(), Body::Client(ClientRequest::Vm(read))).is_ok());
        }
        let device_write = Body::Actor(ActorMessage::Device(DeviceMessage::Client(VolumeRequest::Write {
            volume: VolumeId(1),
            offset: 0,
            data: vec![0],
        })));
        assert!(matches!(ask(&reader(), device_write), Err(Refusal::ReadOnly { .. })));
        for c in [admin(), reader(), node(3)] {
            assert!(ask(&c, vm_status.clone()).is_ok());
            assert!(ask(&c, read.clone()).is_ok());
            assert!(ask(&c, Body::Client(ClientRequest::Status)).is_ok());
            assert!(ask(&c, Body::Actor(ActorMessage::Ping { nonce: 1 })).is_ok());
        }
    }

    #[test]
    fn fault_injection_needs_the_switch_and_an_admin() {
        assert!(matches!(ask(&admin(), corrupt()), Err(Refusal::FaultsDisabled { .. })));
        let body = corrupt();
        let req = Request { sender: NodeId(0), flags: 0, on_behalf_of: None, body: &body };
        assert!(authorize(&admin(), &req, true).is_ok());
        assert!(matches!(authorize(&reader(), &req, true), Err(Refusal::ReadOnly { .. })));
    }

    #[test]
    fn the_sender_must_be_the_certificate_identity() {
        let body = raft();
        let claim = |conn: &Caller, sender| {
            authorize(conn, &Request { sender: NodeId(sender), flags: 0, on_behalf_of: None, body: &body }, false)
        };
        assert!(matches!(claim(&node(2), 3), Err(Refusal::SenderMismatch { .. })));
        assert!(matches!(claim(&node(2), 0), Err(Refusal::SenderMismatch { .. })));
        assert!(matches!(claim(&admin(), 1), Err(Refusal::SenderMismatch { .. })));
        assert!(claim(&node(2), 2).is_ok());
    }

    #[test]
    fn only_nodes_set_flags_or_relay_and_relays_authorize_the_original_caller() {
        let ping = Body::Actor(ActorMessage::Ping { nonce: 1 });
        for flags in [EnvelopeFlags::FORWARDED, EnvelopeFlags::STREAM] {
            let req = Request { sender: NodeId(0), flags, on_behalf_of: None, body: &ping };
            assert!(matches!(authorize(&admin(), &req, false), Err(Refusal::Flags { .. })));
        }
        let req = Request { sender: NodeId(1), flags: 1 << 7, on_behalf_of: None, body: &ping };
        assert!(matches!(authorize(&node(1), &req, false), Err(Refusal::UnknownFlags(_))));
        // A client cannot claim to relay.
        let a = admin();
        let req = Request { sender: NodeId(0), flags: 0, on_behalf_of: Some(&a), body: &ping };
        assert!(matches!(authorize(&reader(), &req, false), Err(Refusal::Relay { .. })));
        // A node relaying for a client lends it none of its rights.
        let dev = device();
        let req = Request { sender: NodeId(1), flags: EnvelopeFlags::FORWARDED, on_behalf_of: Some(&a), body: &dev };
        assert!(matches!(authorize(&node(1), &req, false), Err(Refusal::NodeOnly { .. })));
        let w = write();
        let r = reader();
        let req = Request { sender: NodeId(1), flags: EnvelopeFlags::FORWARDED, on_behalf_of: Some(&r), body: &w };
        assert!(matches!(authorize(&node(1), &req, false), Err(Refusal::ReadOnly { .. })));
        let req = Request { sender: NodeId(1), flags: EnvelopeFlags::FORWARDED, on_behalf_of: Some(&a), body: &w };
        assert_eq!(authorize(&node(1), &req, false), Ok(admin()));
        // Nodes speak only for themselves.
        let n2 = node(2);
        let req = Request { sender: NodeId(1), flags: 0, on_behalf_of: Some(&n2), body: &w };
        assert!(matches!(authorize(&node(1), &req, false), Err(Refusal::Relay { .. })));
    }
}
