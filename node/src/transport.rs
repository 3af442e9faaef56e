//! The node's QUIC endpoint: accepting peers and clients, binding each connection to the identity
//! its certificate names, validating and authorizing every inbound frame, and sending requests to
//! other nodes.
//!
//! One quinn endpoint serves and dials, with the cluster CA required on both sides (mutual TLS).
//! On every accepted connection the peer's leaf certificate is read (`identity`); a certificate
//! naming no identity closes the connection. Each inbound stream carries one request envelope;
//! it is size-checked, validated and version-checked, then authorized against the connection's
//! identity (`authz`: sender binding, flags, relaying, the request table) before the
//! [`InboundHandler`] sees it. A bad frame is logged, counted in `haven_transport_errors_total`,
//! and closes that peer's connection; a refused request is answered `PermissionDenied` and counted
//! in `haven_authz_refused_total` — the node and its other connections carry on. Raft RPCs, other
//! requests (actor messages) and bulk flows (migration pages, volume replication) use three separate
//! connections per peer ([`Transport::send`] picks by body; [`Transport::open_bulk`]), so
//! neither replication traffic nor bulk congestion delays a heartbeat.
//!
//! **Bounded resources** ([`TransportLimits`]): connections per peer IP address; a frame's bytes
//! must all arrive within `frame_deadline` of its first byte, or the connection is closed; a
//! frame's buffer grows as bytes arrive; the bytes of frames being read or handled are capped per
//! connection and per node (a frame waits for room, within its deadline). QUIC itself caps
//! concurrent streams per connection and unread bytes per connection (`haven_client::wire`).
//! Every refusal is counted in `haven_transport_refused_total{reason}`.
//! This module must not interpret request bodies.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use haven_client::wire::{self, Connector, TlsMaterial, WireIoError};
use haven_proto::frame::{FrameHeader, FRAME_HEADER_LEN, MAX_FRAME_LEN};
use haven_proto::{
    ActorAddr, ActorKind, Body, Caller, Envelope, EnvelopeFlags, ErrorCode, NodeId, ProtoError, WireError,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn, Instrument};

use crate::authz;

/// QUIC application close code for a peer that sent a bad frame.
pub const CLOSE_BAD_FRAME: u32 = 0x4856_0001;
/// QUIC application close code for a peer whose certificate names no usable identity.
pub const CLOSE_BAD_IDENTITY: u32 = 0x4856_0002;
/// QUIC application close code for a peer that did not finish a frame within the deadline.
pub const CLOSE_SLOW_FRAME: u32 = 0x4856_0003;
/// QUIC stream reset code for a request refused for lack of in-flight room.
pub const RESET_NO_ROOM: u32 = 0x4856_0004;

/// Handles one validated, authorized inbound request and returns the reply body. The caller is
/// the effective one (`authz::authorize`): the relayed client, else the connection's identity.
pub type InboundHandler = Arc<dyn Fn(Caller, Envelope) -> BoxFuture<'static, Body> + Send + Sync>;

/// Limits on what peers may make this node hold (the `[transport]` configuration section).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TransportLimits {
    /// A frame's bytes must all arrive within this long of its first byte.
    pub frame_deadline_ms: u64,
    /// Connections one peer IP address may hold open at once.
    pub max_connections_per_ip: usize,
    /// Bytes of request frames being read or handled at once on one connection.
    pub max_inflight_bytes_per_connection: usize,
    /// Bytes of request frames being read or handled at once on the whole node.
    pub max_inflight_bytes_per_node: usize,
}

impl Default for TransportLimits {
    fn default() -> Self {
        Self {
            frame_deadline_ms: 10_000,
            max_connections_per_ip: 64,
            max_inflight_bytes_per_connection: 64 << 20,
            max_inflight_bytes_per_node: 256 << 20,
        }
    }
}

impl TransportLimits {
    pub fn validate(&self) -> Result<(), String> {
        if self.frame_deadline_ms == 0 || self.max_connections_per_ip == 0 {
            return Err("transport: frame_deadline_ms and max_connections_per_ip must be positive".into());
        }
        if self.max_inflight_bytes_per_connection < MAX_FRAME_LEN
            || self.max_inflight_bytes_per_node < self.max_inflight_bytes_per_connection
        {
            return Err(format!(
                "transport: need {MAX_FRAME_LEN} <= max_inflight_bytes_per_connection <= max_inflight_bytes_per_node"
            ));
        }
        Ok(())
    }

    fn frame_deadline(&self) -> Duration {
        Duration::from_millis(self.frame_deadline_ms)
    }
}

/// How the transport treats inbound requests.
#[derive(Debug, Clone, Default)]
pub struct TransportOptions {
    pub limits: TransportLimits,
    /// Allow fault-injection requests (`--allow-fault-injection`; tests and chaos runs only).
    pub allow_fault_injection: bool,
}

/// One outbound request: where it goes, what it carries, and whom a relayed request is for.
pub struct Outbound {
    pub dest: ActorAddr,
    pub body: Body,
    pub flags: u32,
    pub on_behalf_of: Option<Caller>,
}

/// Byte budgets shared by every connection of a node.
struct Budgets {
    node: Arc<Semaphore>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Takes over a bulk stream opened by a request flagged [`EnvelopeFlags::STREAM`] (a live
/// migration's page stream, a volume's replication stream); it owns both halves from then on.
pub type StreamHandler =
    Arc<dyn Fn(Envelope, quinn::SendStream, quinn::RecvStream) -> BoxFuture<'static, ()> + Send + Sync>;

/// The registered stream handlers, by the kind of actor a stream's opening envelope is for.
type StreamHandlers = Arc<std::sync::RwLock<HashMap<ActorKind, StreamHandler>>>;

/// The node's transport. Cheap to clone.
#[derive(Clone)]
pub struct Transport {
    node: NodeId,
    endpoint: quinn::Endpoint,
    control: Connector,
    /// Raft RPCs only: their own connection per peer (own congestion window and flow-control
    /// credit), so replication of volume blocks on `control` never queues a heartbeat.
    consensus: Connector,
    bulk: Connector,
    dial_via: Arc<HashMap<u64, String>>,
    streams: StreamHandlers,
    options: Arc<TransportOptions>,
    budgets: Arc<Budgets>,
}

impl Transport {
    /// Bind the endpoint on `listen` with this node's TLS material.
    pub fn bind(
        node: NodeId,
        listen: SocketAddr,
        tls: &TlsMaterial,
        dial_via: HashMap<u64, String>,
        options: TransportOptions,
    ) -> Result<Self, WireIoError> {
        let server = tls.quic_server_config()?;
        // A stateless-reset key that survives restarts (derived from the node's private key):
        // when a peer sends on a connection to our previous process, this process answers with a
        // stateless reset and the peer reconnects at once instead of waiting out its idle timeout.
        let secret = ring::digest::digest(
            &ring::digest::SHA256,
            &[b"haven stateless reset v1".as_slice(), &tls.key_pem].concat(),
        );
        let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_ref());
        let bind_err = |e: std::io::Error| WireIoError::Connect { addr: listen, reason: format!("bind: {e}") };
        let socket = wire::bind_udp(listen).map_err(bind_err)?;
        // Connection ids carry a keyed hash that the endpoint checks before it answers an unknown
        // id with a reset; derive that key from the same secret so the restarted process
        // recognises its predecessor's ids.
        let cid_key = u64::from_le_bytes(secret.as_ref()[..8].try_into().expect("SHA-256 is 32 bytes"));
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
        wire::tune_endpoint_config(&mut endpoint_config);
        endpoint_config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
        let mut endpoint = quinn::Endpoint::new(endpoint_config, Some(server), socket, Arc::new(quinn::TokioRuntime))
            .map_err(bind_err)?;
        endpoint.set_default_client_config(tls.quic_client_config()?);
        let connect_timeout = Duration::from_millis(500);
        let max_backoff = Duration::from_millis(200);
        Ok(Self {
            node,
            control: Connector::new(endpoint.clone(), connect_timeout, max_backoff),
            consensus: Connector::new(endpoint.clone(), connect_timeout, max_backoff),
            bulk: Connector::new(endpoint.clone(), connect_timeout, max_backoff),
            endpoint,
            dial_via: Arc::new(dial_via),
            streams: Arc::default(),
            budgets: Arc::new(Budgets {
                node: Arc::new(Semaphore::new(options.limits.max_inflight_bytes_per_node)),
                per_ip: Mutex::default(),
            }),
            options: Arc::new(options),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    pub fn node_id(&self) -> NodeId {
        self.node
    }

    /// The address to dial for node `node`, whose membership address is `advertised`: a
    /// configured `dial_via` override wins; names are resolved.
    pub async fn dial_addr(&self, node: NodeId, advertised: &str) -> Result<SocketAddr, String> {
        resolve(self.dial_via.get(&node.0).map(String::as_str).unwrap_or(advertised)).await
    }

    /// Send a request envelope to the node at `addr` and wait for its reply.
    pub async fn request(
        &self,
        addr: SocketAddr,
        dest: ActorAddr,
        body: Body,
        flags: u32,
        timeout: Duration,
    ) -> Result<Envelope, WireIoError> {
        self.send(addr, Outbound { dest, body, flags, on_behalf_of: None }, timeout).await
    }

    /// Send `out` to the node at `addr` and wait for its reply.
    pub async fn send(&self, addr: SocketAddr, out: Outbound, timeout: Duration) -> Result<Envelope, WireIoError> {
        let connector = if matches!(out.body, Body::Raft { .. }) { &self.consensus } else { &self.control };
        let mut env = Envelope::new(connector.next_msg_id(), self.node, out.dest, out.body);
        env.flags = out.flags;
        env.on_behalf_of = out.on_behalf_of;
        let kind = env.kind().as_str();
        let span = tracing::debug_span!("rpc", %addr, kind, msg_id = env.msg_id);
        match connector.request(addr, &env, timeout).instrument(span).await {
            Ok(done) => {
                metrics::counter!("haven_transport_messages_total", "direction" => "out", "kind" => kind).increment(1);
                metrics::counter!("haven_transport_bytes_total", "direction" => "out").increment(done.sent as u64);
                metrics::counter!("haven_transport_bytes_total", "direction" => "in").increment(done.received as u64);
                Ok(done.reply)
            }
            Err(e) => {
                let what = if matches!(e, WireIoError::Timeout { .. }) { "timeout" } else { "request" };
                metrics::counter!("haven_transport_errors_total", "kind" => what).increment(1);
                Err(e)
            }
        }
    }

    /// Open a stream for a bulk flow (memory pages, blocks) to `addr`, on a connection separate
    /// from the one that carries Raft and control requests.
    pub async fn open_bulk(&self, addr: SocketAddr) -> Result<(quinn::SendStream, quinn::RecvStream), WireIoError> {
        let conn = self.bulk.connection(addr).await?;
        let (send, recv) = conn.open_bi().await?;
        // Lower priority than anything else the connection carries.
        let _ = send.set_priority(-1);
        Ok((send, recv))
    }

    /// Register the handler for inbound bulk streams whose opening envelope is for an actor of
    /// `kind` (at start-up: VM migrations, volume replication).
    pub fn set_stream_handler(&self, kind: ActorKind, handler: StreamHandler) {
        self.streams.write().expect("stream handlers lock").insert(kind, handler);
    }

    /// Open a bulk stream to `addr`: `body` (flagged [`EnvelopeFlags::STREAM`]) tells the peer
    /// what the stream is for; the returned halves then carry the caller's own framing.
    pub async fn open_stream(
        &self,
        addr: SocketAddr,
        dest: ActorAddr,
        body: Body,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), WireIoError> {
        let (mut send, recv) = self.open_bulk(addr).await?;
        let mut env = Envelope::new(self.bulk.next_msg_id(), self.node, dest, body);
        env.flags = EnvelopeFlags::STREAM;
        wire::write_envelope(&mut send, &env).await?;
        Ok((send, recv))
    }

    /// Accept connections until the endpoint closes, handing each valid, authorized request to
    /// `handler`.
    pub async fn serve(self, handler: InboundHandler) {
        while let Some(incoming) = self.endpoint.accept().await {
            let remote = incoming.remote_address();
            let Some(slot) =
                ConnectionSlot::take(&self.budgets, remote.ip(), self.options.limits.max_connections_per_ip)
            else {
                warn!(%remote, "refused connection: too many from this address");
                refused("connections_per_ip");
                incoming.refuse();
                continue;
            };
            let ctx = Inbound {
                node: self.node,
                handler: handler.clone(),
                streams: self.streams.clone(),
                options: self.options.clone(),
                node_budget: self.budgets.node.clone(),
            };
            tokio::spawn(async move {
                let _slot = slot;
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        // Includes peers without a certificate signed by the cluster CA.
                        warn!(%remote, error = %e, "refused connection: handshake failed");
                        metrics::counter!("haven_transport_errors_total", "kind" => "handshake").increment(1);
                        return;
                    }
                };
                let caller = match crate::identity::connection_caller(&conn) {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(%remote, error = %e, "refused connection: no usable identity");
                        refused("identity");
                        conn.close(CLOSE_BAD_IDENTITY.into(), e.to_string().as_bytes());
                        return;
                    }
                };
                serve_connection(ctx, conn, Arc::new(caller)).await;
            });
        }
    }

    /// Close the endpoint (graceful shutdown).
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutdown");
    }
}

fn refused(reason: &'static str) {
    metrics::counter!("haven_transport_refused_total", "reason" => reason).increment(1);
}

/// One connection's place in the per-IP count, given back when the connection ends.
struct ConnectionSlot {
    budgets: Arc<Budgets>,
    ip: IpAddr,
}

impl ConnectionSlot {
    fn take(budgets: &Arc<Budgets>, ip: IpAddr, max: usize) -> Option<Self> {
        let mut per_ip = budgets.per_ip.lock().expect("per-ip lock");
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Self { budgets: budgets.clone(), ip })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut per_ip = self.budgets.per_ip.lock().expect("per-ip lock");
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// What serving one connection needs.
#[derive(Clone)]
struct Inbound {
    node: NodeId,
    handler: InboundHandler,
    streams: StreamHandlers,
    options: Arc<TransportOptions>,
    node_budget: Arc<Semaphore>,
}

/// Why a request stream ended without a reply.
enum StreamEnd {
    /// The peer went away or gave up on this request (its timeout).
    Abandoned(WireIoError),
    /// The peer sent bytes that are not a valid frame: it is broken or hostile.
    BadFrame(ProtoError),
    /// The frame did not arrive within the deadline.
    TooSlow,
    /// No room for the frame's bytes within the deadline.
    NoRoom,
}

impl From<WireIoError> for StreamEnd {
    fn from(e: WireIoError) -> Self {
        match e {
            WireIoError::Proto(p) => Self::BadFrame(p),
            other => Self::Abandoned(other),
        }
    }
}

async fn serve_connection(ctx: Inbound, conn: quinn::Connection, caller: Arc<Caller>) {
    let remote = conn.remote_address();
    debug!(%remote, %caller, "connection accepted");
    let conn_budget = Arc::new(Semaphore::new(ctx.options.limits.max_inflight_bytes_per_connection));
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(%remote, error = %e, "connection ended");
                return;
            }
        };
        let (ctx, conn, caller, conn_budget) = (ctx.clone(), conn.clone(), caller.clone(), conn_budget.clone());
        tokio::spawn(async move {
            match serve_stream(&ctx, &caller, send, recv, conn_budget).await {
                Ok(()) => {}
                Err(StreamEnd::BadFrame(e)) => {
                    warn!(%remote, error = %e, "rejected frame; closing connection");
                    metrics::counter!("haven_transport_errors_total", "kind" => "bad_frame").increment(1);
                    conn.close(CLOSE_BAD_FRAME.into(), e.to_string().as_bytes());
                }
                Err(StreamEnd::TooSlow) => {
                    warn!(%remote, "frame not received within the deadline; closing connection");
                    refused("frame_deadline");
                    conn.close(CLOSE_SLOW_FRAME.into(), b"frame deadline");
                }
                Err(StreamEnd::NoRoom) => {
                    debug!(%remote, "no in-flight room for a frame within its deadline");
                    refused("inflight_bytes");
                }
                Err(StreamEnd::Abandoned(e)) => {
                    debug!(%remote, error = %e, "stream ended before the reply was delivered");
                    metrics::counter!("haven_transport_errors_total", "kind" => "abandoned").increment(1);
                }
            }
        });
    }
}

/// Read one request frame within the deadline, holding in-flight room for its bytes. The permits
/// are held until the caller drops them (after the reply is written).
async fn read_request(
    ctx: &Inbound,
    recv: &mut quinn::RecvStream,
    send: &mut quinn::SendStream,
    conn_budget: Arc<Semaphore>,
) -> Result<(rkyv::util::AlignedVec, [OwnedSemaphorePermit; 2]), StreamEnd> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    // Waiting for a request's first byte is not bounded here (QUIC's idle timeout is); once it
    // starts, the whole frame must follow within the deadline.
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(got)) => {
            return Err(StreamEnd::BadFrame(ProtoError::Truncated { expected: FRAME_HEADER_LEN, got }))
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(StreamEnd::Abandoned(WireIoError::Read(e.to_string()))),
    }
    let deadline = tokio::time::Instant::now() + ctx.options.limits.frame_deadline();
    let len = FrameHeader::parse(header, MAX_FRAME_LEN).map_err(StreamEnd::BadFrame)?.len;
    let permits = async {
        let bytes = u32::try_from(len).expect("frames are below 4 GiB");
        let conn = conn_budget.acquire_many_owned(bytes).await.expect("budget never closed");
        let node = ctx.node_budget.clone().acquire_many_owned(bytes).await.expect("budget never closed");
        [conn, node]
    };
    let Ok(permits) = tokio::time::timeout_at(deadline, permits).await else {
        let _ = send.reset(RESET_NO_ROOM.into());
        return Err(StreamEnd::NoRoom);
    };
    match tokio::time::timeout_at(deadline, wire::read_body(recv, len)).await {
        Ok(Ok(buf)) => Ok((buf, permits)),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(StreamEnd::TooSlow),
    }
}

async fn serve_stream(
    ctx: &Inbound,
    caller: &Caller,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    conn_budget: Arc<Semaphore>,
) -> Result<(), StreamEnd> {
    let started = Instant::now();
    let (buf, _permits) = read_request(ctx, &mut recv, &mut send, conn_budget).await?;
    let request = Envelope::decode(&buf).map_err(StreamEnd::BadFrame)?;
    if let Err(m) = haven_proto::limits::check_request(&request.body) {
        refused("list_bound");
        let body = Body::Error(WireError::new(ErrorCode::LimitExceeded, m));
        return reply(ctx, request.msg_id, request.sender, body, &mut send).await;
    }
    let req = authz::Request {
        sender: request.sender,
        flags: request.flags,
        on_behalf_of: request.on_behalf_of.as_ref(),
        body: &request.body,
    };
    let effective = match authz::authorize(caller, &req, ctx.options.allow_fault_injection) {
        Ok(c) => c,
        Err(refusal) => {
            warn!(%caller, kind = request.kind().as_str(), error = %refusal, "refused request");
            metrics::counter!("haven_authz_refused_total", "reason" => refusal.reason()).increment(1);
            let body = Body::Error(WireError::new(ErrorCode::PermissionDenied, refusal.to_string()));
            return reply(ctx, request.msg_id, request.sender, body, &mut send).await;
        }
    };
    if request.flags & EnvelopeFlags::STREAM != 0 {
        let handler = ctx.streams.read().expect("stream handlers lock").get(&request.dest.kind).cloned();
        match handler {
            Some(h) => h(request, send, recv).await,
            None => {
                let _ = send.reset(0u32.into());
            }
        }
        return Ok(());
    }
    let kind = request.kind().as_str();
    metrics::counter!("haven_transport_messages_total", "direction" => "in", "kind" => kind).increment(1);
    metrics::counter!("haven_transport_bytes_total", "direction" => "in")
        .increment((buf.len() + FRAME_HEADER_LEN) as u64);
    drop(buf);
    let span = tracing::debug_span!("handle", kind, msg_id = request.msg_id, caller = %effective);
    let (msg_id, sender) = (request.msg_id, request.sender);
    let reply_body = (ctx.handler)(effective, request).instrument(span).await;
    reply(ctx, msg_id, sender, reply_body, &mut send).await?;
    metrics::histogram!("haven_transport_handle_seconds", "kind" => kind).record(started.elapsed().as_secs_f64());
    Ok(())
}

/// Answer `request` with `body`. A reply too big for one frame is replaced, before a byte is
/// sent, by a `LimitExceeded` error naming its size (handlers bound their replies; this is the
/// backstop that keeps an oversized one from closing the connection as a bad frame).
async fn reply(
    ctx: &Inbound,
    msg_id: u64,
    sender: NodeId,
    body: Body,
    send: &mut quinn::SendStream,
) -> Result<(), StreamEnd> {
    let to = ActorAddr::node(sender);
    let mut bytes = Envelope::new(msg_id, ctx.node, to, body).encode().map_err(StreamEnd::BadFrame)?;
    if bytes.len() > MAX_FRAME_LEN {
        warn!(bytes = bytes.len(), "reply exceeds the frame limit; refused");
        refused("reply_too_large");
        let msg = format!("the reply of {} bytes exceeds the {MAX_FRAME_LEN}-byte frame limit", bytes.len());
        let body = Body::Error(WireError::new(ErrorCode::LimitExceeded, msg));
        bytes = Envelope::new(msg_id, ctx.node, to, body).encode().map_err(StreamEnd::BadFrame)?;
    }
    let sent = wire::write_archive(send, bytes).await?;
    send.finish().map_err(WireIoError::from)?;
    metrics::counter!("haven_transport_bytes_total", "direction" => "out").increment(sent as u64);
    Ok(())
}

/// Resolve `host:port` (a name or an IP literal) to one socket address.
pub async fn resolve(addr: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to no address"))
}
