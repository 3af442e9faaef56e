//! Request handling: what a node does with each validated, authorized inbound envelope — Raft
//! RPCs go to openraft, client requests to the catalog (through the leader), node proposals to
//! the catalog, actor messages to the actor registry.
//!
//! The transport has already authorized every request (`authz`) and hands over the effective
//! caller. Clients propose [`ClientCommand`]s only; node components propose any
//! [`CatalogCommand`] through [`NodeService::write`], which travels as a node-only
//! [`NodeRequest::Propose`]. When this node relays a client's request (a write forwarded to the
//! leader, an actor message routed to its owner) it names the client in `on_behalf_of`, so the
//! receiver authorizes the client, not this node.
//!
//! Writes and linearizable reads must be served by the leader: a follower forwards them once
//! (marking the envelope [`EnvelopeFlags::FORWARDED`]) and a forwarded request that lands on a
//! non-leader is answered `NotLeader` with a hint, never forwarded again. A write is answered
//! only after openraft reports it committed (durable on a quorum) and applied.
//!
//! An AppendEntries this node accepts renews its host lease (`vm::fence`): the one place a
//! follower learns it is in contact with a quorum.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use haven_client::wire::WireIoError;
use haven_proto::{
    ActorAddr, Body, Caller, CatalogCommand, CertificateInfo, ClientCommand, ClientRequest, ClientResponse,
    CommandOutcome, Envelope, EnvelopeFlags, ErrorCode, MemberInfo, MemberSpec, NodeId, NodeRequest, NodeRole,
    NodeStatus, RaftRpc, WireError,
};
use openraft::error::{ClientWriteError, RaftError};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use openraft::{ChangeMembers, ServerState};
use tracing::{info, warn, Instrument};

use crate::actors::ActorRegistry;
use crate::catalog;
use crate::raft::guard::{self, GuardError};
use crate::raft::{decode, encode, HavenNode, Raft, TypeConfig};
use crate::storage::Store;
use crate::transport::{Outbound, Transport};

/// Everything needed to answer requests on one node.
pub struct NodeService {
    pub id: NodeId,
    pub raft: Raft,
    pub store: Store,
    pub transport: Transport,
    pub registry: ActorRegistry,
    pub request_timeout: Duration,
    /// TEST ONLY (`HAVEN_UNSAFE_ACK_BEFORE_COMMIT=1`): acknowledge writes as soon as they are
    /// proposed, before they are committed. Exists so the chaos harness can prove its checkers
    /// catch lost acknowledged writes; never set it anywhere else.
    pub unsafe_ack_before_commit: bool,
    /// The node's volumes (set once at start-up, after this service exists).
    pub volumes: std::sync::OnceLock<Arc<crate::volume::host::VolumeHost>>,
    /// The node's VMs (set once at start-up).
    pub vms: std::sync::OnceLock<Arc<crate::vm::host::VmHost>>,
    /// This host's lease on running guests, renewed by accepted AppendEntries (see `vm::fence`).
    pub lease: Arc<crate::vm::fence::HostLease>,
    /// When each peer last acknowledged this node's AppendEntries (filled by `raft::network`).
    pub peer_acks: crate::raft::network::PeerAcks,
    /// Fencing timing (the plan controller waits out a silent destination's lease with it).
    pub fence: crate::vm::fence::FenceTunables,
    /// This node's certificate and the CA's, as `ClientRequest::Certificates` reports them.
    pub certificates: Vec<CertificateInfo>,
}

fn err(code: ErrorCode, msg: impl Into<String>) -> WireError {
    WireError::new(code, msg)
}

/// How a request reached this node, for forwarding it on: its flags, and the client it is
/// relayed for (`None` when this node or another node is the caller).
struct Relay {
    flags: u32,
    on_behalf_of: Option<Caller>,
}

/// A command this node could not commit, with openraft's pointer to the leader.
type Redirect = (CatalogCommand, openraft::error::ForwardToLeader<u64, HavenNode>);

/// Answer a Raft request the guard refused: logged, counted by reason, and told to the sender.
fn refuse(rpc: RaftRpc, from: NodeId, refused: GuardError) -> Body {
    warn!(?rpc, %from, error = %refused, "refused raft request");
    metrics::counter!("haven_raft_refused_total", "reason" => refused.reason()).increment(1);
    Body::Error(err(ErrorCode::InvalidRequest, format!("{rpc:?} from {from} refused: {refused}")))
}

impl NodeService {
    /// Handle one inbound envelope from `caller` (authorized by the transport) and produce the
    /// reply body.
    pub async fn handle(self: Arc<Self>, caller: Caller, env: Envelope) -> Body {
        match env.body {
            Body::Raft { rpc, payload } => self.handle_raft(env.sender, rpc, &payload).await,
            Body::Client(req) => {
                let name = req.name();
                let span = tracing::info_span!("client_request", request = name, %caller);
                match self.handle_client(req, env.flags, caller).instrument(span).await {
                    Ok(r) => Body::ClientReply(r),
                    Err(e) => {
                        metrics::counter!("haven_client_errors_total", "request" => name).increment(1);
                        Body::Error(e)
                    }
                }
            }
            Body::Node(NodeRequest::Propose { command }) => {
                let proposed = match command.validate() {
                    Ok(()) => self.propose(command, env.flags).await,
                    Err(m) => Err(err(ErrorCode::InvalidRequest, m)),
                };
                proposed.map_or_else(Body::Error, Body::ClientReply)
            }
            Body::Actor(msg) => {
                let routed = if env.dest.node == self.id {
                    self.registry.deliver_local(env.dest, msg).await
                } else if env.flags & EnvelopeFlags::FORWARDED == 0 && !caller.is_node() {
                    // From a client: route to the owning node in the client's name.
                    self.registry.relay(env.dest, msg, caller).await
                } else {
                    Err(err(ErrorCode::NotFound, format!("{} does not live on {}", env.dest, self.id)))
                };
                match routed {
                    Ok(r) => Body::ActorReply(r),
                    Err(e) => Body::Error(e),
                }
            }
            other => Body::Error(err(
                ErrorCode::InvalidRequest,
                format!("a {} message is not a request", other.kind().as_str()),
            )),
        }
    }

    /// `from` is the node that sent the RPC, as authenticated by its certificate (the transport
    /// refuses Raft RPCs from anything but a node, and envelopes whose sender is not the
    /// connection's node).
    ///
    /// Every request passes the Raft guard (`raft::guard`) first: one it refuses is answered with
    /// a `Body::Error` naming the reason, counted in `haven_raft_refused_total{reason}`, and never
    /// reaches openraft.
    async fn handle_raft(&self, from: NodeId, rpc: RaftRpc, payload: &[u8]) -> Body {
        let reply = match rpc {
            RaftRpc::AppendEntries => match decode::<AppendEntriesRequest<TypeConfig>>(payload) {
                Ok(req) => match guard::check_append_entries(&req, from.0) {
                    Ok(()) => encode(&self.append_entries(req).await),
                    Err(refused) => return refuse(rpc, from, refused),
                },
                Err(e) => Err(e),
            },
            RaftRpc::Vote => match decode(payload) {
                Ok(req) => match guard::check_vote_request(&req, from.0) {
                    Ok(()) => encode(&self.raft.vote(req).await),
                    Err(refused) => return refuse(rpc, from, refused),
                },
                Err(e) => Err(e),
            },
            RaftRpc::InstallSnapshot => match decode(payload) {
                Ok(req) => match guard::check_install_snapshot(&req, from.0) {
                    Ok(()) => encode(&self.raft.install_snapshot(req).await),
                    Err(refused) => return refuse(rpc, from, refused),
                },
                Err(e) => Err(e),
            },
        };
        match reply {
            Ok(payload) => Body::RaftReply { payload },
            Err(e) => {
                warn!(?rpc, error = %e, "malformed raft payload");
                metrics::counter!("haven_transport_errors_total", "kind" => "raft_payload").increment(1);
                Body::Error(err(ErrorCode::InvalidRequest, format!("malformed {rpc:?} payload: {e}")))
            }
        }
    }

    /// Hand a guarded AppendEntries to openraft; an accepted one renews the host lease.
    async fn append_entries(
        &self,
        req: AppendEntriesRequest<TypeConfig>,
    ) -> Result<AppendEntriesResponse<u64>, RaftError<u64>> {
        let received = Instant::now();
        let leader_commit = req.leader_commit.map(|l| l.index);
        let reply = self.raft.append_entries(req).await;
        // Accepted from the current leader: quorum contact for the host lease, which counts once
        // the catalog applied what the leader had committed.
        if matches!(reply, Ok(AppendEntriesResponse::Success | AppendEntriesResponse::PartialSuccess(_))) {
            let applied = self.raft.metrics().borrow().last_applied.map(|l| l.index);
            self.lease.follower_contact(received, leader_commit, applied);
        }
        reply
    }

    /// The node's volume host, once started.
    pub fn volumes(&self) -> Option<Arc<crate::volume::host::VolumeHost>> {
        self.volumes.get().cloned()
    }

    /// This node's view of itself and the cluster.
    pub fn status(&self) -> NodeStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let members: Vec<MemberInfo> = membership
            .nodes()
            .map(|(id, n)| MemberInfo {
                id: NodeId(*id),
                addr: n.addr.clone(),
                admin_addr: n.admin_addr.clone(),
                voter: voters.contains(id),
                matched_index: m.replication.as_ref().and_then(|r| r.get(id).cloned().flatten()).map(|l| l.index),
            })
            .collect();
        let is_member = members.iter().any(|x| x.id == self.id);
        let role = match m.state {
            _ if members.is_empty() => NodeRole::Uninitialized,
            ServerState::Leader => NodeRole::Leader,
            ServerState::Follower => NodeRole::Follower,
            ServerState::Candidate => NodeRole::Candidate,
            ServerState::Learner => NodeRole::Learner,
            ServerState::Shutdown => NodeRole::Shutdown,
        };
        NodeStatus {
            id: self.id,
            role,
            term: m.current_term,
            leader: m.current_leader.map(NodeId),
            last_log_index: m.last_log_index,
            last_applied_index: m.last_applied.map(|l| l.index),
            healthy: is_member && m.current_leader.is_some() && role != NodeRole::Shutdown,
            members,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    async fn handle_client(&self, req: ClientRequest, flags: u32, caller: Caller) -> Result<ClientResponse, WireError> {
        let relay = Relay { flags, on_behalf_of: (!caller.is_node()).then(|| caller.clone()) };
        match req {
            ClientRequest::Status => Ok(ClientResponse::Status(self.status())),
            ClientRequest::WhoAmI => Ok(ClientResponse::Identity(caller)),
            ClientRequest::Certificates => Ok(ClientResponse::Certificates(self.certificates.clone())),
            ClientRequest::LeaderStatus => match self.leader_only() {
                Ok(()) => Ok(ClientResponse::Status(self.status())),
                Err((leader, node)) => {
                    self.forward(Body::Client(ClientRequest::LeaderStatus), leader, node, relay).await
                }
            },
            ClientRequest::Write { command } => {
                command.validate().map_err(|m| err(ErrorCode::InvalidRequest, m))?;
                self.client_write(command, relay).await
            }
            ClientRequest::Read { query, linearizable } => {
                if linearizable {
                    let r = tokio::time::timeout(self.request_timeout, self.raft.ensure_linearizable()).await;
                    match r {
                        Err(_) => return Err(err(ErrorCode::Timeout, "leadership could not be confirmed in time")),
                        Ok(Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f)))) => {
                            let body = Body::Client(ClientRequest::Read { query, linearizable });
                            return self.forward(body, f.leader_id, f.leader_node, relay).await;
                        }
                        Ok(Err(e)) => return Err(err(ErrorCode::Unavailable, e.to_string())),
                        Ok(Ok(_)) => {}
                    }
                }
                catalog::query(&self.store, &query)
                    .map(ClientResponse::Read)
                    .map_err(|e| err(ErrorCode::Internal, e.to_string()))
            }
            ClientRequest::AddMember { member, voter } => self.add_member(member, voter, relay).await,
            ClientRequest::RemoveMember { id } => self.remove_member(id, relay).await,
            ClientRequest::Volume(req) => {
                let host = self.volumes().ok_or_else(|| err(ErrorCode::Unavailable, "volumes are not running yet"))?;
                host.client(req).await.map(ClientResponse::Volume)
            }
            ClientRequest::Vm(req) => {
                let host =
                    self.vms.get().cloned().ok_or_else(|| err(ErrorCode::Unavailable, "VMs are not running yet"))?;
                host.client(req).await.map(ClientResponse::Vm)
            }
        }
    }

    /// Propose a command from this node (any catalog command, internal ones included) and wait
    /// until it is committed and applied; forwarded to the leader as a node request.
    pub async fn write(&self, command: CatalogCommand, flags: u32) -> Result<ClientResponse, WireError> {
        debug_assert!(command.validate().is_ok(), "node components propose valid commands: {command:?}");
        self.propose(command, flags).await
    }

    async fn propose(&self, command: CatalogCommand, flags: u32) -> Result<ClientResponse, WireError> {
        match self.commit(command).await? {
            Ok(done) => Ok(done),
            Err((command, f)) => {
                let body = Body::Node(NodeRequest::Propose { command });
                self.forward(body, f.leader_id, f.leader_node, Relay { flags, on_behalf_of: None }).await
            }
        }
    }

    /// A client's write: committed here when this node leads, else forwarded in the client's name.
    async fn client_write(&self, command: ClientCommand, relay: Relay) -> Result<ClientResponse, WireError> {
        match self.commit(command.clone().into()).await? {
            Ok(done) => Ok(done),
            Err((_, f)) => {
                let body = Body::Client(ClientRequest::Write { command });
                self.forward(body, f.leader_id, f.leader_node, relay).await
            }
        }
    }

    /// Commit `command` through this node's Raft. `Ok(Err(..))` gives the command back with the
    /// leader to forward it to.
    async fn commit(&self, command: CatalogCommand) -> Result<Result<ClientResponse, Redirect>, WireError> {
        if self.unsafe_ack_before_commit && self.raft.metrics().borrow().state == ServerState::Leader {
            // Deliberately broken (see the field): the entry is only proposed, not committed.
            return match self.raft.client_write_ff(command).await {
                Ok(_pending) => {
                    Ok(Ok(ClientResponse::Written { index: 0, outcome: CommandOutcome::Put { previous: None } }))
                }
                Err(e) => Err(err(ErrorCode::Unavailable, e.to_string())),
            };
        }
        let started = Instant::now();
        let result = tokio::time::timeout(self.request_timeout, self.raft.client_write(command.clone())).await;
        match result {
            Err(_) => Err(err(ErrorCode::Timeout, "write not committed before the deadline; it may still commit")),
            Ok(Ok(resp)) => {
                metrics::histogram!("haven_raft_commit_seconds").record(started.elapsed().as_secs_f64());
                Ok(Ok(ClientResponse::Written { index: resp.log_id.index, outcome: resp.data }))
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => Ok(Err((command, f))),
            // Anything else (e.g. the node shutting down) may strike after the entry was appended.
            Ok(Err(e)) => Err(err(ErrorCode::Timeout, format!("write outcome unknown: {e}"))),
        }
    }

    /// Send a leader-only request to the leader, once.
    async fn forward(
        &self,
        body: Body,
        leader: Option<u64>,
        leader_node: Option<HavenNode>,
        relay: Relay,
    ) -> Result<ClientResponse, WireError> {
        let (Some(leader), Some(node)) = (leader, leader_node) else {
            return Err(err(ErrorCode::NoLeader, "no leader is known; an election may be in progress"));
        };
        let hint = Some((leader, node.addr.clone()));
        if relay.flags & EnvelopeFlags::FORWARDED != 0 || leader == self.id.0 {
            return Err(WireError {
                code: ErrorCode::NotLeader,
                message: format!("leader is node-{leader}"),
                leader: hint,
            });
        }
        let addr = self.transport.dial_addr(NodeId(leader), &node.addr).await.map_err(|m| WireError {
            code: ErrorCode::NotLeader,
            message: m,
            leader: hint.clone(),
        })?;
        let out = Outbound {
            dest: ActorAddr::node(NodeId(leader)),
            body,
            flags: EnvelopeFlags::FORWARDED,
            on_behalf_of: relay.on_behalf_of,
        };
        let reply = self.transport.send(addr, out, self.request_timeout).await;
        match reply {
            Ok(Envelope { body: Body::ClientReply(r), .. }) => Ok(r),
            Ok(Envelope { body: Body::Error(e), .. }) => Err(e),
            Ok(other) => Err(err(ErrorCode::Internal, format!("leader sent a {} reply", other.kind().as_str()))),
            Err(e @ (WireIoError::Connect { .. } | WireIoError::BackingOff { .. })) => Err(WireError {
                code: ErrorCode::NotLeader,
                message: format!("cannot reach leader: {e}"),
                leader: hint,
            }),
            Err(e) => Err(err(ErrorCode::Timeout, format!("forwarded to node-{leader}, outcome unknown: {e}"))),
        }
    }

    fn leader_only(&self) -> Result<(), (Option<u64>, Option<HavenNode>)> {
        let m = self.raft.metrics().borrow().clone();
        if m.state == ServerState::Leader {
            return Ok(());
        }
        let node = m.current_leader.and_then(|l| m.membership_config.membership().get_node(&l).cloned());
        Err((m.current_leader, node))
    }

    /// Ask a would-be member for its status, retrying for up to 3 s (a node just started may
    /// not accept connections yet). Not reaching it is a final answer about this request
    /// (InvalidRequest), never "this leader is unavailable": with a retryable code, clients
    /// re-sent the whole request until their deadline ran out mid-attempt and reported
    /// "outcome unknown".
    async fn probe_new_member(&self, member: &MemberSpec) -> Result<Envelope, WireError> {
        let give_up = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let left = give_up.saturating_duration_since(tokio::time::Instant::now());
            let attempt = async {
                let addr = self.transport.dial_addr(member.id, &member.addr).await?;
                self.transport
                    .request(addr, ActorAddr::node(member.id), Body::Client(ClientRequest::Status), 0, left)
                    .await
                    .map_err(|e| e.to_string())
            };
            match attempt.await {
                Ok(reply) => return Ok(reply),
                Err(e) if tokio::time::Instant::now() >= give_up => {
                    return Err(err(
                        ErrorCode::InvalidRequest,
                        format!("cannot reach {} at {}: {e}", member.id, member.addr),
                    ))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200).min(left)).await,
            }
        }
    }

    async fn add_member(&self, member: MemberSpec, voter: bool, relay: Relay) -> Result<ClientResponse, WireError> {
        if let Err((leader, node)) = self.leader_only() {
            return self.forward(Body::Client(ClientRequest::AddMember { member, voter }), leader, node, relay).await;
        }
        crate::config::check_addr("member address", &member.addr)
            .map_err(|e| err(ErrorCode::InvalidRequest, e.to_string()))?;
        crate::config::check_addr("member admin address", &member.admin_addr)
            .map_err(|e| err(ErrorCode::InvalidRequest, e.to_string()))?;
        if member.id.0 == 0 {
            return Err(err(ErrorCode::InvalidRequest, "node id must be greater than 0"));
        }
        let status = self.status();
        if status.members.iter().any(|m| m.id == member.id) {
            return Err(err(ErrorCode::InvalidRequest, format!("{} is already a member", member.id)));
        }
        // Refuse before touching the membership unless the new node answers over mutual TLS as
        // the id it claims and is not already part of a cluster.
        let probe = self.probe_new_member(&member).await?;
        match probe.body {
            Body::ClientReply(ClientResponse::Status(s)) if s.id != member.id => {
                return Err(err(
                    ErrorCode::InvalidRequest,
                    format!("{} answers as {}, not {}", member.addr, s.id, member.id),
                ));
            }
            Body::ClientReply(ClientResponse::Status(s)) if s.role != NodeRole::Uninitialized => {
                return Err(err(ErrorCode::InvalidRequest, format!("{} already belongs to a cluster", member.id)));
            }
            Body::ClientReply(ClientResponse::Status(_)) => {}
            other => return Err(err(ErrorCode::Unavailable, format!("unexpected probe reply {:?}", other.kind()))),
        }
        let node = HavenNode { addr: member.addr.clone(), admin_addr: member.admin_addr.clone() };
        let added = tokio::time::timeout(self.request_timeout * 4, self.raft.add_learner(member.id.0, node, true))
            .await
            .map_err(|_| err(ErrorCode::Timeout, "the new learner did not catch up in time"))?
            .map_err(|e| err(ErrorCode::Unavailable, e.to_string()))?;
        info!(id = %member.id, addr = %member.addr, "added learner");
        let mut index = added.log_id.index;
        if voter {
            let changed = self
                .raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([member.id.0])), false)
                .await
                .map_err(|e| err(ErrorCode::Unavailable, e.to_string()))?;
            index = changed.log_id.index;
            info!(id = %member.id, "promoted to voter");
        }
        Ok(ClientResponse::MembershipChanged { index })
    }

    async fn remove_member(&self, id: NodeId, relay: Relay) -> Result<ClientResponse, WireError> {
        if let Err((leader, node)) = self.leader_only() {
            return self.forward(Body::Client(ClientRequest::RemoveMember { id }), leader, node, relay).await;
        }
        let status = self.status();
        let Some(target) = status.members.iter().find(|m| m.id == id) else {
            return Err(err(ErrorCode::NotFound, format!("{id} is not a member")));
        };
        let change = if target.voter {
            if status.members.iter().filter(|m| m.voter).count() == 1 {
                return Err(err(ErrorCode::InvalidRequest, format!("{id} is the last voter")));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id.0]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id.0]))
        };
        let changed =
            self.raft.change_membership(change, false).await.map_err(|e| err(ErrorCode::Unavailable, e.to_string()))?;
        info!(%id, "removed member");
        Ok(ClientResponse::MembershipChanged { index: changed.log_id.index })
    }
}
