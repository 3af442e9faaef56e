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

/// Creates one [`PeerLink`] per target node.
#[derive(Clone)]
pub struct NetworkFactory {
    transport: Transport,
    acks: PeerAcks,
}

impl NetworkFactory {
    /// `acks` is filled with every successful AppendEntries reply.
    pub fn new(transport: Transport, acks: PeerAcks) -> Self {
        Self { transport, acks }
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
        let payload = encode(&rpc).ok();
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
