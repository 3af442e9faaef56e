//! Request handling: what a node does with each validated, authorized inbound envelope — Raft
//! RPCs go to openraft, client requests to the catalog (through the leader), node proposals to
//! the catalog, actor messages to the actor registry.
//!
//! The transport has already authorized every request (`authz`) and hands over the effective
//! caller. Clients propose [`ClientCommand`]s only; node components propose any
//! [`CatalogCommand`] through `cluster::Proposer::write`, which travels as a node-only
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

use haven_proto::{
    ActorAddr, ActorMessage, Body, Caller, CertificateInfo, ClientRequest, ClientResponse, Envelope, EnvelopeFlags,
    ErrorCode, MemberSpec, NodeId, NodeRequest, NodeRole, RaftRpc, WireError,
};
use openraft::error::RaftError;
use openraft::raft::AppendEntriesResponse;
use openraft::ChangeMembers;
use tracing::{info, warn, Instrument};

use crate::actors::ActorRegistry;
use crate::catalog;
use crate::cluster::{Proposer, RaftView, Relay};
use crate::raft::campaign::{PreVoteRefusal, PreVoteReply, PreVoteRequest};
use crate::raft::guard::{self, GuardError};
use crate::raft::network::AppendFrame;
use crate::raft::{decode, encode, HavenNode, Raft};
use crate::share::host::ShareHost;
use crate::storage::Store;
use crate::transport::Transport;
use crate::vm::host::VmHost;
use crate::volume::host::VolumeHost;

/// Everything needed to answer requests on one node. Built last (`node::run`), around the hosts:
/// nothing below this layer holds it.
pub struct NodeService {
    pub id: NodeId,
    pub raft: Raft,
    pub view: RaftView,
    pub store: Store,
    pub transport: Transport,
    pub registry: ActorRegistry,
    pub proposer: Proposer,
    pub volumes: Arc<VolumeHost>,
    pub vms: Arc<VmHost>,
    pub shares: Arc<ShareHost>,
    /// This host's lease on running guests, renewed by accepted AppendEntries (see `vm::fence`).
    pub lease: Arc<crate::vm::fence::HostLease>,
    /// This node's certificate and the CA's, as `ClientRequest::Certificates` reports them.
    pub certificates: Vec<CertificateInfo>,
    /// This node's election timer (`raft::campaign`), fed by accepted AppendEntries and asked
    /// for pre-votes; `None` when openraft's own timer elects (`[raft] prevote = false`).
    pub elections: Option<crate::raft::campaign::Elections>,
}

fn err(code: ErrorCode, msg: impl Into<String>) -> WireError {
    WireError::new(code, msg)
}

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
                    Ok(()) => self.proposer.propose(command, env.flags).await,
                    Err(m) => Err(err(ErrorCode::InvalidRequest, m)),
                };
                proposed.map_or_else(Body::Error, Body::ClientReply)
            }
            Body::Node(NodeRequest::ReadLeases) => match caller.node() {
                Some(host) => {
                    self.proposer.grant_read_leases(host, env.flags).await.map_or_else(Body::Error, Body::ClientReply)
                }
                None => Body::Error(err(ErrorCode::PermissionDenied, "read leases are for nodes")),
            },
            Body::Actor(ActorMessage::Ha { from, .. }) if caller.node() != Some(from) => {
                metrics::counter!("haven_ha_forged_sender_total").increment(1);
                Body::Error(err(
                    ErrorCode::PermissionDenied,
                    format!("an HA message naming {from} as its sender came from {caller}"),
                ))
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
            RaftRpc::AppendEntries => match decode::<AppendFrame>(payload) {
                Ok(frame) => match guard::check_append_entries(&frame.req, from.0) {
                    Ok(()) => encode(&self.append_entries(frame).await),
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
                    Ok(()) => encode(&self.install_snapshot(req).await),
                    Err(refused) => return refuse(rpc, from, refused),
                },
                Err(e) => Err(e),
            },
            RaftRpc::PreVote => match decode::<PreVoteRequest>(payload) {
                Ok(req) => match guard::check_prevote(req.candidate, req.last_log_id.as_ref(), from.0) {
                    Ok(()) => encode(&self.prevote(&req)),
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

    /// A pre-vote: answered by this node's election timer; with openraft's own timer (no
    /// timer here) never granted, so no candidate counts on this node.
    fn prevote(&self, req: &PreVoteRequest) -> PreVoteReply {
        match &self.elections {
            Some(e) => e.answer(req, Instant::now()),
            None => PreVoteReply { granted: Err(PreVoteRefusal::LeaderRecent) },
        }
    }

    /// Hand a guarded snapshot chunk to openraft; one from the current leader is leader contact.
    async fn install_snapshot(
        &self,
        req: openraft::raft::InstallSnapshotRequest<crate::raft::TypeConfig>,
    ) -> Result<openraft::raft::InstallSnapshotResponse<u64>, RaftError<u64, openraft::error::InstallSnapshotError>>
    {
        let received = Instant::now();
        let sender = req.vote;
        let reply = self.raft.install_snapshot(req).await;
        // From this node's leader: the sender's vote is the one this node now holds (a stale
        // leader's chunk is answered with this node's higher vote, and is no contact).
        if let (Ok(_), Some(e)) = (&reply, &self.elections) {
            if sender == self.raft.metrics().borrow().vote {
                e.contact(received);
            }
        }
        reply
    }

    /// Hand a guarded AppendEntries to openraft; an accepted one renews the host lease, as of
    /// the sending leader's last quorum contact (`vm::fence::contact_time`), and is leader
    /// contact for the election timer (as of its arrival: a local stall after it is not the
    /// leader's silence).
    async fn append_entries(&self, frame: AppendFrame) -> Result<AppendEntriesResponse<u64>, RaftError<u64>> {
        let received = Instant::now();
        let leader_commit = frame.req.leader_commit.map(|l| l.index);
        let reply = self.raft.append_entries(frame.req).await;
        // Any answer but "higher vote" means the sender is this node's leader (a conflict is
        // the leader probing for where the logs agree).
        if let (Ok(r), Some(e)) = (&reply, &self.elections) {
            if !matches!(r, AppendEntriesResponse::HigherVote(_)) {
                e.contact(received);
            }
        }
        // Accepted from the current leader: quorum contact for the host lease, which counts once
        // the catalog applied what the leader had committed.
        let accepted = matches!(reply, Ok(AppendEntriesResponse::Success | AppendEntriesResponse::PartialSuccess(_)));
        if let Some(contact) = crate::vm::fence::contact_time(received, frame.leader_quorum_age_ms).filter(|_| accepted)
        {
            let applied = self.raft.metrics().borrow().last_applied.map(|l| l.index);
            self.lease.follower_contact(contact, leader_commit, applied);
        }
        reply
    }

    async fn handle_client(&self, req: ClientRequest, flags: u32, caller: Caller) -> Result<ClientResponse, WireError> {
        let relay = Relay { flags, on_behalf_of: (!caller.is_node()).then(|| caller.clone()) };
        match req {
            ClientRequest::Status => Ok(ClientResponse::Status(self.view.status())),
            ClientRequest::WhoAmI => Ok(ClientResponse::Identity(caller)),
            ClientRequest::Certificates => Ok(ClientResponse::Certificates(self.certificates.clone())),
            ClientRequest::LeaderStatus => match self.view.leader_only() {
                Ok(()) => Ok(ClientResponse::Status(self.view.status())),
                Err((leader, node)) => {
                    self.proposer.forward(Body::Client(ClientRequest::LeaderStatus), leader, node, relay).await
                }
            },
            ClientRequest::Write { command } => {
                command.validate().map_err(|m| err(ErrorCode::InvalidRequest, m))?;
                self.proposer.client_write(command, relay).await
            }
            ClientRequest::Read { query, linearizable } => {
                if linearizable {
                    if let Err(f) = self.proposer.confirm_leadership().await? {
                        let body = Body::Client(ClientRequest::Read { query, linearizable });
                        return self.proposer.forward(body, f.leader_id, f.leader_node, relay).await;
                    }
                }
                catalog::query(&self.store, &query)
                    .map(ClientResponse::Read)
                    .map_err(|e| err(ErrorCode::Internal, e.to_string()))
            }
            ClientRequest::AddMember { member, voter } => self.add_member(member, voter, relay).await,
            ClientRequest::RemoveMember { id } => self.remove_member(id, relay).await,
            ClientRequest::Volume(req) => {
                self.volumes.client(req).await.map(ClientResponse::Volume).map_err(WireError::from)
            }
            ClientRequest::Vm(req) => self.vms.client(req).await.map(ClientResponse::Vm).map_err(WireError::from),
            ClientRequest::Share(req) => {
                self.shares.client(req).await.map(ClientResponse::Share).map_err(WireError::from)
            }
        }
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
        if let Err((leader, node)) = self.view.leader_only() {
            return self
                .proposer
                .forward(Body::Client(ClientRequest::AddMember { member, voter }), leader, node, relay)
                .await;
        }
        crate::config::check_addr("member address", &member.addr)
            .map_err(|e| err(ErrorCode::InvalidRequest, e.to_string()))?;
        crate::config::check_addr("member admin address", &member.admin_addr)
            .map_err(|e| err(ErrorCode::InvalidRequest, e.to_string()))?;
        if member.id.0 == 0 {
            return Err(err(ErrorCode::InvalidRequest, "node id must be greater than 0"));
        }
        let status = self.view.status();
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
        let added =
            tokio::time::timeout(self.proposer.request_timeout() * 4, self.raft.add_learner(member.id.0, node, true))
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
        if let Err((leader, node)) = self.view.leader_only() {
            return self.proposer.forward(Body::Client(ClientRequest::RemoveMember { id }), leader, node, relay).await;
        }
        let status = self.view.status();
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
