//! The actor runtime: actix actors addressed by [`ActorAddr`] (node + kind + id), reachable the
//! same way whether they live on this node or another.
//!
//! [`ActorRegistry::send`] delivers an [`ActorMessage`] to a local actor's mailbox, or wraps it in
//! an envelope and sends it over the transport to the owning node, whose registry delivers it
//! locally. Actors own their state and are reached only by message. This module owns routing and
//! the mailbox-depth gauge; it must not contain actor behaviour (that lives in one file per kind).

pub mod device;
pub mod ha;
pub mod host_agent;
pub mod share;
pub mod vm;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::{Message, Recipient};
use haven_proto::{ActorAddr, ActorKind, ActorMessage, ActorReply, Body, Caller, ErrorCode, NodeId, WireError};

use crate::transport::{Outbound, Transport};

/// This node process's incarnation (drawn once per process start, larger than any earlier
/// process's on the same host), reported in every actor's description and HA heartbeat: a peer
/// that sees it change knows the node restarted.
pub fn incarnation() -> u64 {
    static INCARNATION: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    // The start time in nanoseconds: it grows with every restart of the process on a host, which
    // the HA leader relies on (it takes a host's heartbeat only if its (incarnation, seq) is
    // newer than the last one taken; a random draw smaller than the previous process's made the
    // leader ignore a restarted host for good — found by ha_bench). Random low bits keep two
    // processes started in the same nanosecond apart.
    *INCARNATION.get_or_init(|| {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        (nanos & !0xff) | u64::from(rand::random::<u8>()) | 1
    })
}

/// The message every actor accepts: one [`ActorMessage`], answered with an [`ActorReply`].
pub struct Deliver(pub ActorMessage);

impl Message for Deliver {
    type Result = Result<ActorReply, WireError>;
}

/// Finds a node's QUIC address (`host:port`) in the Raft membership.
pub type PeerResolver = Arc<dyn Fn(NodeId) -> Option<String> + Send + Sync>;

/// Routes messages to actors by address.
#[derive(Clone)]
pub struct ActorRegistry {
    node: NodeId,
    local: Arc<RwLock<HashMap<ActorAddr, Recipient<Deliver>>>>,
    transport: Transport,
    resolve: PeerResolver,
    timeout: Duration,
}

fn kind_label(kind: ActorKind) -> &'static str {
    match kind {
        ActorKind::Node => "node",
        ActorKind::HostAgent => "host_agent",
        ActorKind::Vm => "vm",
        ActorKind::Device => "device",
        ActorKind::MemBank => "membank",
        ActorKind::Share => "share",
        ActorKind::Ha => "ha",
    }
}

impl ActorRegistry {
    pub fn new(node: NodeId, transport: Transport, resolve: PeerResolver, timeout: Duration) -> Self {
        Self { node, local: Arc::default(), transport, resolve, timeout }
    }

    /// Register a local actor under `addr` (which must name this node).
    pub fn register(&self, addr: ActorAddr, recipient: Recipient<Deliver>) {
        assert_eq!(addr.node, self.node, "registering an actor for another node");
        self.local.write().expect("registry lock").insert(addr, recipient);
    }

    pub fn unregister(&self, addr: &ActorAddr) {
        self.local.write().expect("registry lock").remove(addr);
    }

    /// Deliver to a local actor. Used for messages that arrived over the transport as well.
    pub async fn deliver_local(&self, addr: ActorAddr, msg: ActorMessage) -> Result<ActorReply, WireError> {
        let recipient = self
            .local
            .read()
            .expect("registry lock")
            .get(&addr)
            .cloned()
            .ok_or_else(|| WireError::new(ErrorCode::NotFound, format!("no actor {addr} on this node")))?;
        let label = kind_label(addr.kind);
        let depth = metrics::gauge!("haven_actor_mailbox_depth", "kind" => label);
        depth.increment(1.0);
        let result = tokio::time::timeout(self.timeout, recipient.send(Deliver(msg))).await;
        depth.decrement(1.0);
        match result {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => Err(WireError::new(ErrorCode::Unavailable, format!("actor {addr}: {e}"))),
            Err(_) => {
                Err(WireError::new(ErrorCode::Timeout, format!("actor {addr} did not answer in {:?}", self.timeout)))
            }
        }
    }

    /// Send `msg` to the actor at `addr`, wherever it lives.
    pub async fn send(&self, addr: ActorAddr, msg: ActorMessage) -> Result<ActorReply, WireError> {
        self.send_timeout(addr, msg, self.timeout).await
    }

    /// [`Self::send`] with a deadline of its own (replication uses a short one to notice a dead
    /// replica quickly).
    pub async fn send_timeout(
        &self,
        addr: ActorAddr,
        msg: ActorMessage,
        timeout: Duration,
    ) -> Result<ActorReply, WireError> {
        self.send_as(addr, msg, timeout, None).await
    }

    /// Route a client's message to the node that owns `addr`, naming the client as the caller
    /// so the owner authorizes the client, not this node (`authz`).
    pub async fn relay(&self, addr: ActorAddr, msg: ActorMessage, client: Caller) -> Result<ActorReply, WireError> {
        debug_assert!(!client.is_node(), "nodes send in their own name");
        if addr.node == self.node {
            return Err(WireError::new(ErrorCode::Internal, format!("{addr} is local; deliver it, do not relay it")));
        }
        self.send_as(addr, msg, self.timeout, Some(client)).await
    }

    /// Open a bulk stream to the node that owns `addr`, announced by `msg` (flagged `STREAM`);
    /// the caller owns both halves and their framing from then on. `Unavailable` when the node
    /// cannot be reached.
    pub async fn open_stream(
        &self,
        addr: ActorAddr,
        msg: ActorMessage,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), WireError> {
        if addr.node == self.node {
            return Err(WireError::new(ErrorCode::Internal, format!("{addr} is local: no stream to open")));
        }
        let unavailable = |m: String| WireError::new(ErrorCode::Unavailable, m);
        let peer = (self.resolve)(addr.node)
            .ok_or_else(|| WireError::new(ErrorCode::NotFound, format!("{} is not a cluster member", addr.node)))?;
        let peer = self.transport.dial_addr(addr.node, &peer).await.map_err(unavailable)?;
        self.transport.open_stream(peer, addr, Body::Actor(msg)).await.map_err(|e| unavailable(e.to_string()))
    }

    async fn send_as(
        &self,
        addr: ActorAddr,
        msg: ActorMessage,
        timeout: Duration,
        on_behalf_of: Option<Caller>,
    ) -> Result<ActorReply, WireError> {
        if addr.node == self.node {
            return self.deliver_local(addr, msg).await;
        }
        let peer = (self.resolve)(addr.node)
            .ok_or_else(|| WireError::new(ErrorCode::NotFound, format!("{} is not a cluster member", addr.node)))?;
        let peer =
            self.transport.dial_addr(addr.node, &peer).await.map_err(|m| WireError::new(ErrorCode::Unavailable, m))?;
        // Only a failure to connect proves the message was not delivered; anything after it may
        // have been (`Timeout` = outcome unknown).
        let outbound = Outbound { dest: addr, body: Body::Actor(msg), flags: 0, on_behalf_of };
        let reply = self.transport.send(peer, outbound, timeout).await.map_err(|e| {
            use haven_client::wire::WireIoError as E;
            match e {
                E::Connect { .. } | E::BackingOff { .. } | E::Tls(_) => {
                    WireError::new(ErrorCode::Unavailable, e.to_string())
                }
                e => WireError::new(ErrorCode::Timeout, format!("outcome unknown: {e}")),
            }
        })?;
        match reply.body {
            Body::ActorReply(r) => Ok(r),
            Body::Error(e) => Err(e),
            other => Err(WireError::new(ErrorCode::Internal, format!("unexpected reply {:?}", other.kind()))),
        }
    }
}
