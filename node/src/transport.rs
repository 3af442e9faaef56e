//! The node's QUIC endpoint: accepting peers and clients, validating every inbound frame, and
//! sending requests to other nodes.
//!
//! One quinn endpoint serves and dials, with the cluster CA required on both sides (mutual TLS).
//! Each inbound stream carries one request envelope; it is size-checked, validated and
//! version-checked before the [`InboundHandler`] sees it. A bad frame is logged, counted in
//! `haven_transport_errors_total`, and closes that peer's connection — the node and its other
//! connections carry on. Control requests and bulk flows use separate connections per peer
//! ([`Transport::request`] and [`Transport::open_bulk`]), so bulk congestion never delays Raft.
//! This module must not interpret request bodies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use haven_client::wire::{self, Connector, TlsMaterial, WireIoError};
use haven_proto::frame::{FRAME_HEADER_LEN, MAX_FRAME_LEN};
use haven_proto::{ActorAddr, Body, Envelope, EnvelopeFlags, NodeId};
use tracing::{debug, warn, Instrument};

/// QUIC application close code for a peer that sent a bad frame.
pub const CLOSE_BAD_FRAME: u32 = 0x4856_0001;

/// Handles one validated inbound request and returns the reply body.
pub type InboundHandler = Arc<dyn Fn(Envelope) -> BoxFuture<'static, Body> + Send + Sync>;

/// Takes over a bulk stream opened by a request flagged [`EnvelopeFlags::STREAM`] (for example a
/// live migration's page stream); it owns both halves from then on.
pub type StreamHandler =
    Arc<dyn Fn(Envelope, quinn::SendStream, quinn::RecvStream) -> BoxFuture<'static, ()> + Send + Sync>;

/// The node's transport. Cheap to clone.
#[derive(Clone)]
pub struct Transport {
    node: NodeId,
    endpoint: quinn::Endpoint,
    control: Connector,
    bulk: Connector,
    dial_via: Arc<HashMap<u64, String>>,
    streams: Arc<std::sync::OnceLock<StreamHandler>>,
}

impl Transport {
    /// Bind the endpoint on `listen` with this node's TLS material.
    pub fn bind(
        node: NodeId,
        listen: SocketAddr,
        tls: &TlsMaterial,
        dial_via: HashMap<u64, String>,
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
        let socket = std::net::UdpSocket::bind(listen).map_err(bind_err)?;
        // Connection ids carry a keyed hash that the endpoint checks before it answers an unknown
        // id with a reset; derive that key from the same secret so the restarted process
        // recognises its predecessor's ids.
        let cid_key = u64::from_le_bytes(secret.as_ref()[..8].try_into().expect("SHA-256 is 32 bytes"));
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
        endpoint_config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
        let mut endpoint = quinn::Endpoint::new(endpoint_config, Some(server), socket, Arc::new(quinn::TokioRuntime))
            .map_err(bind_err)?;
        endpoint.set_default_client_config(tls.quic_client_config()?);
        let connect_timeout = Duration::from_millis(500);
        let max_backoff = Duration::from_millis(200);
        Ok(Self {
            node,
            control: Connector::new(endpoint.clone(), connect_timeout, max_backoff),
            bulk: Connector::new(endpoint.clone(), connect_timeout, max_backoff),
            endpoint,
            dial_via: Arc::new(dial_via),
            streams: Arc::default(),
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
        let mut env = Envelope::new(self.control.next_msg_id(), self.node, dest, body);
        env.flags = flags;
        let kind = env.kind().as_str();
        let span = tracing::debug_span!("rpc", %addr, kind, msg_id = env.msg_id);
        match self.control.request(addr, &env, timeout).instrument(span).await {
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

    /// Register the handler for inbound bulk streams (once, at start-up).
    pub fn set_stream_handler(&self, handler: StreamHandler) {
        let _ = self.streams.set(handler);
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

    /// Accept connections until the endpoint closes, handing each valid request to `handler`.
    pub async fn serve(self, handler: InboundHandler) {
        while let Some(incoming) = self.endpoint.accept().await {
            let handler = handler.clone();
            let streams = self.streams.clone();
            let node = self.node;
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        // Includes peers without a certificate signed by the cluster CA.
                        warn!(%remote, error = %e, "refused connection: handshake failed");
                        metrics::counter!("haven_transport_errors_total", "kind" => "handshake").increment(1);
                        return;
                    }
                };
                serve_connection(node, conn, handler, streams).await;
            });
        }
    }

    /// Close the endpoint (graceful shutdown).
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutdown");
    }
}

async fn serve_connection(
    node: NodeId,
    conn: quinn::Connection,
    handler: InboundHandler,
    streams: Arc<std::sync::OnceLock<StreamHandler>>,
) {
    let remote = conn.remote_address();
    debug!(%remote, "connection accepted");
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(%remote, error = %e, "connection ended");
                return;
            }
        };
        let handler = handler.clone();
        let streams = streams.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            match serve_stream(node, send, recv, handler, streams).await {
                Ok(()) => {}
                // The peer sent bytes that are not a valid frame: it is broken or hostile.
                Err(e @ WireIoError::Proto(_)) => {
                    warn!(%remote, error = %e, "rejected frame; closing connection");
                    metrics::counter!("haven_transport_errors_total", "kind" => "bad_frame").increment(1);
                    conn.close(CLOSE_BAD_FRAME.into(), e.to_string().as_bytes());
                }
                // The peer went away or gave up on this request (its timeout): nothing wrong
                // with the connection's other streams.
                Err(e) => {
                    debug!(%remote, error = %e, "stream ended before the reply was delivered");
                    metrics::counter!("haven_transport_errors_total", "kind" => "abandoned").increment(1);
                }
            }
        });
    }
}

async fn serve_stream(
    node: NodeId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    handler: InboundHandler,
    streams: Arc<std::sync::OnceLock<StreamHandler>>,
) -> Result<(), WireIoError> {
    let started = Instant::now();
    let buf = wire::read_frame(&mut recv, MAX_FRAME_LEN).await?;
    let request = Envelope::decode(&buf)?;
    if request.flags & EnvelopeFlags::STREAM != 0 {
        match streams.get() {
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
    let span = tracing::debug_span!("handle", kind, msg_id = request.msg_id, sender = %request.sender);
    let (msg_id, sender) = (request.msg_id, request.sender);
    let reply_body = handler(request).instrument(span).await;
    let reply = Envelope::new(msg_id, node, ActorAddr::node(sender), reply_body);
    let sent = wire::write_envelope(&mut send, &reply).await?;
    send.finish()?;
    metrics::counter!("haven_transport_bytes_total", "direction" => "out").increment(sent as u64);
    metrics::histogram!("haven_transport_handle_seconds", "kind" => kind).record(started.elapsed().as_secs_f64());
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
