//! openraft's network over the QUIC transport: each Raft RPC is a [`Body::Raft`] envelope whose
//! payload is the bincode encoding of openraft's request; the reply carries openraft's result.
//!
//! Transport failures map onto openraft's error kinds: a peer we cannot dial is `Unreachable`
//! (openraft backs off), anything else is a `Network` error (retried). This module must not
//! retry on its own; openraft owns retries and timeouts.
//!
//! Sizes (see [`super::limits`]): an AppendEntries whose entries exceed the peer's byte budget is
//! refused locally with openraft's `PayloadTooLarge` and an entries hint, so openraft resends
//! fewer entries at once; the budget adapts to what the link delivers within openraft's deadline
//! of one heartbeat interval (cut-off requests halve it). A single entry too large for any frame
//! fails with an error naming it. A snapshot chunk's timeout fits its size (and, for the last
//! chunk, the install it triggers).
//!
//! [`PeerAcks`] records, per peer, when this node last read a successful AppendEntries reply from
//! it: the latest moment that peer can have renewed its host lease from this node's
//! heartbeats (see `vm::fence`). The plan controller waits until that is old enough before it
//! restores VMs a cut-off peer may still run.
//!
//! Every AppendEntries travels as an [`AppendFrame`]: openraft's request plus how long before
//! sending it this leader last heard from a quorum ([`LeaderContact`]). A follower counts the
//! request as quorum contact only that long before it arrived, so a deposed leader that lost
//! its quorum (openraft 0.9 leaders do not step down) cannot keep its followers' host leases
//! alive (issue 11, race 4).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use haven_client::wire::WireIoError;
use haven_proto::{ActorAddr, Body, NodeId, RaftRpc};
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};

use super::limits::{self, AppendBudget, AppendPlan};
use super::{decode, encode, HavenNode, TypeConfig};
use crate::transport::Transport;

/// When each peer last acknowledged an AppendEntries from this node (as leader), by this node's
/// monotonic clock: the time the successful reply was read, which is no earlier than the peer
/// accepted the request. Kept across terms; readers compare with when they became leader.
#[derive(Clone, Default)]
pub struct PeerAcks(Arc<Mutex<HashMap<u64, Instant>>>);

impl PeerAcks {
    fn record(&self, peer: u64, at: Instant) {
        let mut acks = self.0.lock().expect("peer acks lock");
        let last = acks.entry(peer).or_insert(at);
        *last = (*last).max(at);
    }

    /// The last successful AppendEntries reply read from `peer`, if any.
    pub fn last(&self, peer: u64) -> Option<Instant> {
        self.0.lock().expect("peer acks lock").get(&peer).copied()
    }
}

/// When this node, as leader, last heard from a quorum: the sending time of the newest
/// AppendEntries a quorum acknowledged (set by `vm::fence::watch_raft` from openraft's metrics;
/// `None` while not leading or before the first quorum acknowledgement of a term).
#[derive(Clone, Default)]
pub struct LeaderContact(Arc<Mutex<Option<Instant>>>);

impl LeaderContact {
    pub fn set(&self, at: Option<Instant>) {
        *self.0.lock().expect("leader contact lock") = at;
    }

    /// How long ago the last quorum contact was, rounded up to whole milliseconds.
    pub fn age_ms(&self, now: Instant) -> Option<u64> {
        let at = (*self.0.lock().expect("leader contact lock"))?;
        let age = now.saturating_duration_since(at);
        Some(age.as_millis() as u64 + u64::from(!age.subsec_nanos().is_multiple_of(1_000_000)))
    }
}

/// An AppendEntries as it travels: openraft's request and how many milliseconds before sending
/// it the leader last heard from a quorum (`None`: not yet in this term, so it renews no lease).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct AppendFrame {
    pub leader_quorum_age_ms: Option<u64>,
    pub req: AppendEntriesRequest<TypeConfig>,
}

/// [`AppendFrame`]'s encoding without copying the request's entries.
pub fn encode_append_frame(
    leader_quorum_age_ms: Option<u64>,
    req: &AppendEntriesRequest<TypeConfig>,
) -> Result<Vec<u8>, String> {
    #[derive(serde::Serialize)]
    struct Borrowed<'a> {
        leader_quorum_age_ms: Option<u64>,
        req: &'a AppendEntriesRequest<TypeConfig>,
    }
    encode(&Borrowed { leader_quorum_age_ms, req })
}

/// Creates one [`PeerLink`] per target node.
#[derive(Clone)]
pub struct NetworkFactory {
    transport: Transport,
    acks: PeerAcks,
    contact: LeaderContact,
}

impl NetworkFactory {
    /// `acks` is filled with every successful AppendEntries reply; `contact` is this node's
    /// last quorum contact as leader, sent with every AppendEntries.
    pub fn new(transport: Transport, acks: PeerAcks, contact: LeaderContact) -> Self {
        Self { transport, acks, contact }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerLink;

    async fn new_client(&mut self, target: u64, node: &HavenNode) -> PeerLink {
        PeerLink {
            target,
            addr: node.addr.clone(),
            transport: self.transport.clone(),
            acks: self.acks.clone(),
            contact: self.contact.clone(),
            budget: Arc::default(),
        }
    }
}

/// Raft RPCs to one peer.
pub struct PeerLink {
    target: u64,
    addr: String,
    transport: Transport,
    acks: PeerAcks,
    contact: LeaderContact,
    /// This peer's AppendEntries byte budget (shared with [`BudgetWatch`]).
    budget: Arc<Mutex<AppendBudget>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct LinkError(String);

/// Shrinks a peer's budget if dropped before [`BudgetWatch::done`]: openraft cancels an
/// AppendEntries (drops its future) when its deadline passes, so a drop means "too slow".
struct BudgetWatch {
    budget: Arc<Mutex<AppendBudget>>,
    sent_bytes: usize,
    started: Instant,
    deadline: Duration,
    finished: bool,
}

impl BudgetWatch {
    /// The request completed; only an answered one says how fast the link is.
    fn done(mut self, answered: bool) {
        self.finished = true;
        if answered {
            let elapsed = self.started.elapsed();
            self.budget.lock().expect("append budget lock").completed(self.sent_bytes, elapsed, self.deadline);
        }
    }
}

impl Drop for BudgetWatch {
    fn drop(&mut self) {
        if !self.finished {
            self.budget.lock().expect("append budget lock").timed_out();
        }
    }
}

type RpcErr<E> = RPCError<u64, HavenNode, RaftError<u64, E>>;

impl PeerLink {
    /// Send an encoded request and decode openraft's reply.
    async fn call<Resp, E>(&self, rpc: RaftRpc, payload: Vec<u8>, timeout: Duration) -> Result<Resp, RpcErr<E>>
    where
        Resp: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        let addr = self
            .transport
            .dial_addr(NodeId(self.target), &self.addr)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&LinkError(e))))?;
        let reply = self
            .transport
            .request(addr, ActorAddr::node(NodeId(self.target)), Body::Raft { rpc, payload }, 0, timeout)
            .await
            .map_err(|e| match e {
                WireIoError::Connect { .. } | WireIoError::BackingOff { .. } | WireIoError::Timeout { .. } => {
                    RPCError::Unreachable(Unreachable::new(&e))
                }
                other => RPCError::Network(NetworkError::new(&other)),
            })?;
        match reply.body {
            Body::RaftReply { payload } => {
                let result: Result<Resp, RaftError<u64, E>> =
                    decode(&payload).map_err(|e| RPCError::Network(NetworkError::new(&LinkError(e))))?;
                result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Body::Error(e) => Err(RPCError::Network(NetworkError::new(&e))),
            other => Err(RPCError::Network(NetworkError::new(&LinkError(format!(
                "unexpected reply kind {:?}",
                other.kind()
            ))))),
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcErr<openraft::error::Infallible>> {
        // openraft cuts the call off at `hard_ttl` (one heartbeat interval) whatever its size,
        // encoding included; the budget is what keeps requests small enough to make it. The
        // transport gets twice that, so openraft's cut-off comes first and `BudgetWatch` sees it
        // as a drop.
        let deadline = option.hard_ttl();
        let started = Instant::now();
        // Over a frame, bincode stops with a size-limit error: treat that as "more than a frame".
        let payload = encode_append_frame(self.contact.age_ms(started), &rpc).ok();
        let payload_bytes = payload.as_ref().map_or(limits::MAX_RPC_PAYLOAD_BYTES + 1, Vec::len);
        let budget_bytes = self.budget.lock().expect("append budget lock").bytes();
        let payload = match (limits::plan_append(payload_bytes, rpc.entries.len(), budget_bytes), payload) {
            (AppendPlan::Send, Some(payload)) => payload,
            (AppendPlan::Shrink { entries }, _) => {
                metrics::counter!("haven_raft_append_shrunk_total").increment(1);
                return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(entries as u64)));
            }
            (AppendPlan::EntryTooLarge | AppendPlan::Send, _) => {
                let index = rpc.entries.first().map(|e| e.log_id.index);
                let e = LinkError(format!(
                    "log entry {index:?} encodes to more than the {} bytes a frame can carry; it cannot be replicated",
                    limits::MAX_RPC_PAYLOAD_BYTES
                ));
                tracing::error!(target_node = self.target, error = %e, "append entries");
                return Err(RPCError::Network(NetworkError::new(&e)));
            }
        };
        let watch =
            BudgetWatch { budget: self.budget.clone(), sent_bytes: payload.len(), started, deadline, finished: false };
        let reply = self.call(RaftRpc::AppendEntries, payload, deadline * 2).await;
        watch.done(reply.is_ok());
        // Only these renew the peer's lease (a conflict or a higher vote does not).
        if matches!(reply, Ok(AppendEntriesResponse::Success | AppendEntriesResponse::PartialSuccess(_))) {
            self.acks.record(self.target, Instant::now());
        }
        reply
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RpcErr<InstallSnapshotError>> {
        let snapshot_bytes = rpc.offset + rpc.data.len() as u64;
        let timeout = limits::snapshot_rpc_timeout(rpc.data.len(), rpc.done, snapshot_bytes, option.hard_ttl());
        let payload = encode(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&LinkError(e))))?;
        self.call(RaftRpc::InstallSnapshot, payload, timeout).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RpcErr<openraft::error::Infallible>> {
        let payload = encode(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&LinkError(e))))?;
        self.call(RaftRpc::Vote, payload, option.hard_ttl()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_frame_round_trips_and_the_fuzz_seed_is_one() {
        let req = AppendEntriesRequest::<TypeConfig> {
            vote: openraft::Vote::new_committed(3, 1),
            prev_log_id: None,
            entries: vec![],
            leader_commit: None,
        };
        let bytes = encode_append_frame(Some(42), &req).unwrap();
        let frame: AppendFrame = decode(&bytes).unwrap();
        assert_eq!(frame.leader_quorum_age_ms, Some(42));
        assert_eq!(frame.req.vote, req.vote);
        // The fuzz target's seed (first byte: which decoder) must stay a valid frame.
        let seed =
            std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/raft_rpc/append-entries")).unwrap();
        let frame: AppendFrame = decode(&seed[1..]).unwrap();
        assert_eq!(frame.leader_quorum_age_ms, Some(12));
        assert!(!frame.req.entries.is_empty());
    }

    #[test]
    fn leader_contact_age_rounds_up_and_is_none_without_a_quorum_contact() {
        let c = LeaderContact::default();
        let now = Instant::now();
        assert_eq!(c.age_ms(now), None);
        c.set(Some(now));
        assert_eq!(c.age_ms(now), Some(0));
        assert_eq!(c.age_ms(now + Duration::from_micros(1_500)), Some(2), "rounded up: never younger than it is");
        c.set(None);
        assert_eq!(c.age_ms(now), None, "cleared when this node stops leading");
    }
}
