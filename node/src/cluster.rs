//! Narrow handles onto this node's place in the cluster, held by the layers instead of the node
//! service:
//! - [`RaftView`]: this node's Raft state, read-only (who leads, the node's status);
//! - [`Proposer`]: commit catalog commands (here when this node leads, batched with those
//!   proposed together by `raft::batch` when that is on, else through the leader, once), ask the
//!   leader for volume read leases, and, as leader, grant them and take them away before a
//!   command removing their holder from a volume's in-sync set commits.
//!
//! Catalog reads go through `storage::Store`, actor messages through `actors::ActorRegistry`.
//!
//! Architecture invariant: the volume and VM hosts and the leader's controllers see the cluster
//! only through these handles, `Store` and `ActorRegistry`. None of them can reach
//! `service::NodeService`, which `node::run` builds last, around the hosts.
//!
//! This module must not handle inbound requests (that is `service`) or decide anything about
//! volumes or VMs.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use haven_client::wire::WireIoError;
use haven_proto::{
    ActorAddr, Body, Caller, CatalogCommand, ClientCommand, ClientRequest, ClientResponse, CommandOutcome, Envelope,
    EnvelopeFlags, ErrorCode, MemberInfo, NodeId, NodeRequest, NodeRole, NodeStatus, VolumeId, WireError,
};
use openraft::error::{CheckIsLeaderError, ForwardToLeader, RaftError};
use openraft::ServerState;
use tracing::debug;

use crate::catalog;
use crate::raft::batch::{self, Batcher, Failed};
use crate::raft::{HavenNode, Raft};
use crate::storage::Store;
use crate::transport::{Outbound, Transport};
use crate::volume::core::lease::{in_sync_change, removed_from_in_sync, Grants, InSyncChange};

/// This node's Raft state, read-only.
#[derive(Clone)]
pub struct RaftView {
    id: NodeId,
    raft: Raft,
}

impl RaftView {
    pub fn new(id: NodeId, raft: Raft) -> Self {
        Self { id, raft }
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// openraft's metrics, to read or to wait on.
    pub fn metrics(&self) -> tokio::sync::watch::Receiver<openraft::RaftMetrics<u64, HavenNode>> {
        self.raft.metrics()
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// `Ok` when this node leads; else who does, as far as this node knows.
    pub fn leader_only(&self) -> Result<(), (Option<u64>, Option<HavenNode>)> {
        let m = self.raft.metrics().borrow().clone();
        if m.state == ServerState::Leader {
            return Ok(());
        }
        let node = m.current_leader.and_then(|l| m.membership_config.membership().get_node(&l).cloned());
        Err((m.current_leader, node))
    }

    /// This node's view of itself and the cluster.
    pub fn status(&self) -> NodeStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
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
}

/// How a request reached this node, for forwarding it on: its flags, and the client it is
/// relayed for (`None` when this node or another node is the caller).
pub(crate) struct Relay {
    pub flags: u32,
    pub on_behalf_of: Option<Caller>,
}

impl Relay {
    /// A request of this node's own.
    pub fn own(flags: u32) -> Self {
        Self { flags, on_behalf_of: None }
    }
}

/// openraft's pointer to the leader.
type Forward = ForwardToLeader<u64, HavenNode>;
/// A command this node could not commit, with the pointer to the leader.
type Redirect = (CatalogCommand, Forward);
/// Hosts an in-sync change removes: the volume, the hosts, the epoch it expects.
type Removal = (VolumeId, Vec<NodeId>, u64);

/// Commits catalog commands and asks the leader for read leases. Cheap to clone.
#[derive(Clone)]
pub struct Proposer(Arc<ProposerInner>);

struct ProposerInner {
    id: NodeId,
    raft: Raft,
    /// The catalog, read after leadership is confirmed.
    store: Store,
    transport: Transport,
    request_timeout: Duration,
    /// TEST ONLY (`HAVEN_UNSAFE_ACK_BEFORE_COMMIT=1`): acknowledge writes as soon as they are
    /// proposed, before they are committed. Exists so the chaos harness can prove its checkers
    /// catch lost acknowledged writes; never set it anywhere else.
    unsafe_ack_before_commit: bool,
    /// When each host last asked this node, as leader, for volume read leases, and the leases
    /// being revoked (waited out before a failover or any other in-sync removal commits; see
    /// `volume::core::lease`).
    read_lease_grants: Mutex<Grants>,
    /// How long after a host's last lease request its lease has lapsed for certain (the lease
    /// plus its clock margin).
    read_lease_lapse: Duration,
    /// The term this node last led in, and when it first saw itself leading it.
    leading: Mutex<Option<(u64, Instant)>>,
    /// Hands commands to Raft, batching those proposed together (started on first use, on the
    /// runtime of the first proposal); `None`: each command goes to Raft on its own.
    batcher: Option<OnceLock<Batcher>>,
}

impl Proposer {
    pub fn new(
        id: NodeId,
        raft: Raft,
        store: Store,
        transport: Transport,
        request_timeout: Duration,
        unsafe_ack: bool,
        read_lease_lapse: Duration,
    ) -> Self {
        Self(Arc::new(ProposerInner {
            id,
            raft,
            store,
            transport,
            request_timeout,
            unsafe_ack_before_commit: unsafe_ack,
            read_lease_grants: Mutex::new(Grants::default()),
            read_lease_lapse,
            leading: Mutex::new(None),
            batcher: None,
        }))
    }

    /// Since when this node leads (by its clock), or `None` when it does not. Noted the first
    /// time it is asked in each term, which is at or after the election: later only lengthens
    /// the waits counted from it (`volume::core::lease`).
    pub fn leading_since(&self) -> Option<Instant> {
        let (state, term) = {
            let m = self.0.raft.metrics();
            let m = m.borrow();
            (m.state, m.current_term)
        };
        if state != ServerState::Leader {
            return None;
        }
        let mut leading = self.0.leading.lock().expect("leading lock");
        match *leading {
            Some((t, since)) if t == term => Some(since),
            _ => {
                let since = Instant::now();
                *leading = Some((term, since));
                Some(since)
            }
        }
    }

    /// Batch proposals made together into one Raft entry (`[raft] batch_proposals`,
    /// `raft::batch`). Call before the proposer is cloned.
    pub fn with_batching(mut self, on: bool) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            inner.batcher = on.then(OnceLock::new);
        }
        self
    }

    /// Hand `command` to Raft, through the batcher when batching is on; wait for commit and
    /// apply.
    async fn raft_write(&self, command: CatalogCommand) -> Result<batch::Committed, Failed> {
        let p = &self.0;
        match &p.batcher {
            Some(b) => b.get_or_init(|| Batcher::start(p.raft.clone(), batch::Limits::DEFAULT)).propose(command).await,
            None => match p.raft.client_write(command).await {
                Ok(r) => Ok(batch::Committed { index: r.log_id.index, outcome: r.data }),
                Err(e) => Err(batch::failed(e)),
            },
        }
    }

    /// The deadline of one request this node makes or handles.
    pub fn request_timeout(&self) -> Duration {
        self.0.request_timeout
    }

    /// Propose a command from this node (any catalog command, internal ones included) and wait
    /// until it is committed and applied; forwarded to the leader as a node request.
    pub async fn write(&self, command: CatalogCommand, flags: u32) -> Result<ClientResponse, WireError> {
        debug_assert!(command.validate().is_ok(), "node components propose valid commands: {command:?}");
        self.propose(command, flags).await
    }

    /// [`Self::write`] without the debug check (a command a peer proposed, already validated).
    /// A batch is refused: only this node's [`Batcher`] forms batches, from single commands.
    pub(crate) async fn propose(&self, command: CatalogCommand, flags: u32) -> Result<ClientResponse, WireError> {
        if matches!(command, CatalogCommand::Batch(_)) {
            return Err(WireError::new(ErrorCode::InvalidRequest, "a batch is formed by the leader, not proposed"));
        }
        match self.commit(command).await? {
            Ok(done) => Ok(done),
            Err((command, f)) => {
                let body = Body::Node(NodeRequest::Propose { command });
                self.forward(body, f.leader_id, f.leader_node, Relay::own(flags)).await
            }
        }
    }

    /// A client's write: committed here when this node leads, else forwarded in the client's name.
    pub(crate) async fn client_write(&self, command: ClientCommand, relay: Relay) -> Result<ClientResponse, WireError> {
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
        let p = &self.0;
        if p.unsafe_ack_before_commit && p.raft.metrics().borrow().state == ServerState::Leader {
            // Deliberately broken (see the field): the entry is only proposed, not committed.
            return match p.raft.client_write_ff(command).await {
                Ok(_pending) => {
                    Ok(Ok(ClientResponse::Written { index: 0, outcome: CommandOutcome::Put { previous: None } }))
                }
                Err(e) => Err(WireError::new(ErrorCode::Unavailable, e.to_string())),
            };
        }
        if let Err(f) = self.revoke_read_leases(&command).await? {
            return Ok(Err((command, f)));
        }
        let started = Instant::now();
        let result = tokio::time::timeout(p.request_timeout, self.raft_write(command.clone())).await;
        match result {
            Err(_) => {
                Err(WireError::new(ErrorCode::Timeout, "write not committed before the deadline; it may still commit"))
            }
            Ok(Ok(done)) => {
                metrics::histogram!("haven_raft_commit_seconds").record(started.elapsed().as_secs_f64());
                Ok(Ok(ClientResponse::Written { index: done.index, outcome: done.outcome }))
            }
            Ok(Err(Failed::Forward(f))) => Ok(Err((command, f))),
            // Anything else (e.g. the node shutting down) may strike after the entry was appended.
            Ok(Err(Failed::Unknown(e))) => {
                Err(WireError::new(ErrorCode::Timeout, format!("write outcome unknown: {e}")))
            }
        }
    }

    /// Confirm with a quorum that this node still leads (and has applied what it committed);
    /// `Ok(Err(..))` names the leader to forward to instead.
    pub(crate) async fn confirm_leadership(&self) -> Result<Result<(), ForwardToLeader<u64, HavenNode>>, WireError> {
        let confirmed = tokio::time::timeout(self.0.request_timeout, self.0.raft.ensure_linearizable()).await;
        match confirmed {
            Err(_) => Err(WireError::new(ErrorCode::Timeout, "leadership could not be confirmed in time")),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => Ok(Err(f)),
            Ok(Err(e)) => Err(WireError::new(ErrorCode::Unavailable, e.to_string())),
            Ok(Ok(_)) => Ok(Ok(())),
        }
    }

    /// This node's volume read leases: the volumes the leader lists it in sync for (primary or
    /// not), and at which epoch, confirmed by the leader with a quorum after the request left.
    pub async fn read_leases(&self) -> Result<Vec<(VolumeId, u64)>, WireError> {
        match self.grant_read_leases(self.0.id, 0).await? {
            ClientResponse::ReadLeases(v) => Ok(v),
            other => Err(WireError::new(ErrorCode::Internal, format!("read leases answered with {other:?}"))),
        }
    }

    /// `host` asks for read leases. Its arrival is noted before leadership is confirmed (the
    /// volume controller waits from it); a follower forwards the request to the leader once.
    pub(crate) async fn grant_read_leases(&self, host: NodeId, flags: u32) -> Result<ClientResponse, WireError> {
        self.0.read_lease_grants.lock().expect("grants lock").record(host, Instant::now());
        if let Err(f) = self.confirm_leadership().await? {
            let body = Body::Node(NodeRequest::ReadLeases);
            return self.forward(body, f.leader_id, f.leader_node, Relay::own(flags)).await;
        }
        let volumes =
            catalog::volumes::volumes(&self.0.store).map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?;
        // Checked after the catalog read: a revocation begun before it is seen here, and one
        // begun after it counts this request in its wait (`Grants::revoke`).
        let grants = self.0.read_lease_grants.lock().expect("grants lock");
        let in_sync = volumes
            .iter()
            .filter(|v| v.in_sync.contains(&host) && grants.may_grant(host, v.id, v.epoch))
            .map(|v| (v.id, v.epoch))
            .collect();
        Ok(ClientResponse::ReadLeases(in_sync))
    }

    /// Leader, before committing `command`: if it takes hosts out of a volume's in-sync set,
    /// grant them no more read leases on it and wait until none can still hold one
    /// (`volume::core::lease`), so the primary acknowledges nothing they missed while they may
    /// still serve reads. `Ok(Err(..))` when this node does not lead (forward the command).
    async fn revoke_read_leases(&self, command: &CatalogCommand) -> Result<Result<(), Forward>, WireError> {
        let CatalogCommand::Volume(cmd) = command else { return Ok(Ok(())) };
        let Some(change) = in_sync_change(cmd) else { return Ok(Ok(())) };
        loop {
            let Some(since) = self.leading_since() else { return Ok(Err(self.not_leading())) };
            let (vol, removed, epoch) = match self.removed_by(&change).await? {
                Ok(Some(found)) => found,
                Ok(None) => return Ok(Ok(())),
                Err(f) => return Ok(Err(f)),
            };
            let now = Instant::now();
            let wait = {
                let mut g = self.0.read_lease_grants.lock().expect("grants lock");
                let lapse = self.0.read_lease_lapse;
                removed.iter().map(|h| g.revoke(*h, vol, epoch, since, now, lapse)).max().unwrap_or_default()
            };
            if wait.is_zero() {
                return Ok(Ok(()));
            }
            metrics::counter!("haven_volume_lease_revocation_waits_total").increment(1);
            debug!(vol = %vol, ?removed, ?wait, "waiting out read leases before leaving the in-sync set");
            tokio::time::sleep(wait).await;
            // Counted under this term: if leadership changed meanwhile, start over (or forward).
        }
    }

    /// The volume `change` applies to, the hosts it removes from the in-sync set (none: `None`),
    /// and the epoch it expects, from this leader's catalog brought up to date first if behind;
    /// `Err` names the leader when this node turns out not to lead.
    async fn removed_by(&self, change: &InSyncChange) -> Result<Result<Option<Removal>, Forward>, WireError> {
        let internal = |e: crate::storage::StoreError| WireError::new(ErrorCode::Internal, e.to_string());
        let (vol, expected, after) = match change {
            InSyncChange::Set { volume, expected_epoch, in_sync } => (*volume, *expected_epoch, in_sync.clone()),
            InSyncChange::Reverse { relationship, expected_epoch } => {
                let rels = catalog::volumes::relationships(&self.0.store).map_err(internal)?;
                let Some(r) = rels.into_iter().find(|r| r.id == *relationship) else { return Ok(Ok(None)) };
                (r.volume, *expected_epoch, vec![r.target])
            }
        };
        let read = || catalog::volumes::volume(&self.0.store, vol).map_err(internal);
        let mut record = read()?;
        if record.as_ref().is_none_or(|r| r.epoch < expected) {
            // Applied behind what this leader committed: catch up, then look again.
            if let Err(f) = self.confirm_leadership().await? {
                return Ok(Err(f));
            }
            record = read()?;
        }
        let removed = record.as_ref().map(|r| removed_from_in_sync(r, expected, &after)).unwrap_or_default();
        Ok(Ok((!removed.is_empty()).then_some((vol, removed, expected))))
    }

    /// Where to forward a command when this node does not lead.
    fn not_leading(&self) -> Forward {
        let m = self.0.raft.metrics().borrow().clone();
        let node = m.current_leader.and_then(|l| m.membership_config.membership().get_node(&l).cloned());
        ForwardToLeader { leader_id: m.current_leader, leader_node: node }
    }

    /// How much longer before `host` can hold no read lease granted by this leader (in office
    /// since `leading_since`) or an earlier one; `lapse_after` is the lease plus its margin.
    pub fn read_lease_wait(&self, host: NodeId, leading_since: Instant, lapse_after: Duration) -> Duration {
        self.0.read_lease_grants.lock().expect("grants lock").wait(host, leading_since, Instant::now(), lapse_after)
    }

    /// Send a leader-only request to the leader, once.
    pub(crate) async fn forward(
        &self,
        body: Body,
        leader: Option<u64>,
        leader_node: Option<HavenNode>,
        relay: Relay,
    ) -> Result<ClientResponse, WireError> {
        let (Some(leader), Some(node)) = (leader, leader_node) else {
            return Err(WireError::new(ErrorCode::NoLeader, "no leader is known; an election may be in progress"));
        };
        let hint = Some((leader, node.addr.clone()));
        if relay.flags & EnvelopeFlags::FORWARDED != 0 || leader == self.0.id.0 {
            return Err(WireError {
                code: ErrorCode::NotLeader,
                message: format!("leader is node-{leader}"),
                leader: hint,
            });
        }
        let transport = &self.0.transport;
        let addr = transport.dial_addr(NodeId(leader), &node.addr).await.map_err(|m| WireError {
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
        let reply = transport.send(addr, out, self.0.request_timeout).await;
        match reply {
            Ok(Envelope { body: Body::ClientReply(r), .. }) => Ok(r),
            Ok(Envelope { body: Body::Error(e), .. }) => Err(e),
            Ok(other) => {
                Err(WireError::new(ErrorCode::Internal, format!("leader sent a {} reply", other.kind().as_str())))
            }
            Err(e @ (WireIoError::Connect { .. } | WireIoError::BackingOff { .. })) => Err(WireError {
                code: ErrorCode::NotLeader,
                message: format!("cannot reach leader: {e}"),
                leader: hint,
            }),
            Err(e) => {
                Err(WireError::new(ErrorCode::Timeout, format!("forwarded to node-{leader}, outcome unknown: {e}")))
            }
        }
    }
}
