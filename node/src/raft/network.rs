//! openraft's network over the QUIC transport: each Raft RPC is a [`Body::Raft`] envelope whose
//! payload is the bincode encoding of openraft's request; the reply carries openraft's result.
//!
//! Transport failures map onto openraft's error kinds: a peer we cannot dial is `Unreachable`
//! (openraft backs off), anything else is a `Network` error (retried). This module must not
//! retry on its own; openraft owns retries and timeouts.
//!
//! [`PeerAcks`] records, per peer, when this node last read a successful AppendEntries reply from
//! it: the latest moment that peer can have renewed its host lease from this node's
//! heartbeats (see `vm::fence`). The plan controller waits until that is old enough before it
//! restores VMs a cut-off peer may still run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use haven_client::wire::WireIoError;
use haven_proto::{ActorAddr, Body, NodeId, RaftRpc};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};

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
        PeerLink { target, addr: node.addr.clone(), transport: self.transport.clone(), acks: self.acks.clone() }
    }
}

/// Raft RPCs to one peer.
pub struct PeerLink {
    target: u64,
    addr: String,
    transport: Transport,
    acks: PeerAcks,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct LinkError(String);

type RpcErr<E> = RPCError<u64, HavenNode, RaftError<u64, E>>;

impl PeerLink {
    async fn call<Req, Resp, E>(&self, rpc: RaftRpc, req: &Req, option: &RPCOption) -> Result<Resp, RpcErr<E>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        let addr = self
            .transport
            .dial_addr(NodeId(self.target), &self.addr)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&LinkError(e))))?;
        let payload = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&LinkError(e))))?;
        let reply = self
            .transport
            .request(addr, ActorAddr::node(NodeId(self.target)), Body::Raft { rpc, payload }, 0, option.hard_ttl())
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
        let reply = self.call(RaftRpc::AppendEntries, &rpc, &option).await;
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
        self.call(RaftRpc::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RpcErr<openraft::error::Infallible>> {
        self.call(RaftRpc::Vote, &rpc, &option).await
    }
}
