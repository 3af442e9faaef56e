//! The wire layer shared by nodes and clients: TLS material, QUIC endpoint construction (transport
//! parameters, UDP sockets), frame reading and writing, and a [`Connector`] that reuses
//! connections and backs off from peers that cannot be reached.
//!
//! One request is one bidirectional QUIC stream: the caller writes one frame and finishes its
//! side, the callee answers with one frame. Streams are independent, so a slow bulk stream never
//! delays a Raft heartbeat on the same connection. This module must not interpret request bodies;
//! it moves validated envelopes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use haven_proto::frame::{FrameHeader, FRAME_HEADER_LEN, MAX_FRAME_LEN};
use haven_proto::{Envelope, ProtoError};
use rkyv::util::AlignedVec;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The TLS server name every node certificate carries. Identity comes from the cluster CA's
/// signature, not from the name.
pub const SERVER_NAME: &str = "haven-node";
/// ALPN protocol id; a peer speaking anything else is refused during the handshake.
pub const ALPN: &[u8] = b"haven/1";

/// Errors moving envelopes.
#[derive(Debug, thiserror::Error)]
pub enum WireIoError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("{addr} is backing off after a failed connection ({remaining_ms} ms left)")]
    BackingOff { addr: SocketAddr, remaining_ms: u64 },
    #[error("request to {addr} timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error("stream read failed: {0}")]
    Read(String),
    #[error("bad frame: {0}")]
    Proto(#[from] ProtoError),
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// PEM-encoded certificate material for one endpoint: the cluster CA, this endpoint's
/// certificate and its private key.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl TlsMaterial {
    /// Read `ca.pem`, and the cert and key at the given paths.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, WireIoError> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| WireIoError::Tls(format!("reading {}: {e}", p.display())));
        Ok(Self { ca_pem: read(ca)?, cert_pem: read(cert)?, key_pem: read(key)? })
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, WireIoError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&self.ca_pem) {
            let cert = cert.map_err(|e| WireIoError::Tls(format!("CA certificate: {e}")))?;
            roots.add(cert).map_err(|e| WireIoError::Tls(format!("CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(WireIoError::Tls("CA file holds no certificate".into()));
        }
        Ok(Arc::new(roots))
    }

    fn chain(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), WireIoError> {
        let certs = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| WireIoError::Tls(format!("certificate: {e}")))?;
        if certs.is_empty() {
            return Err(WireIoError::Tls("certificate file holds no certificate".into()));
        }
        let key =
            PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| WireIoError::Tls(format!("private key: {e}")))?;
        Ok((certs, key))
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// TLS 1.3 client configuration (ring): trusts only the cluster CA, presents our certificate,
    /// offers [`ALPN`]. QUIC wraps it; the transport benchmark's TCP+TLS baseline uses it as is.
    pub fn tls_client_config(&self) -> Result<rustls::ClientConfig, WireIoError> {
        let (certs, key) = self.chain()?;
        let mut tls = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| WireIoError::Tls(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(certs, key)
            .map_err(|e| WireIoError::Tls(e.to_string()))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        Ok(tls)
    }

    /// TLS 1.3 server configuration (ring): requires a client certificate signed by the cluster
    /// CA, offers [`ALPN`].
    pub fn tls_server_config(&self) -> Result<rustls::ServerConfig, WireIoError> {
        let (certs, key) = self.chain()?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, Self::provider())
            .build()
            .map_err(|e| WireIoError::Tls(e.to_string()))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| WireIoError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| WireIoError::Tls(e.to_string()))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        Ok(tls)
    }

    /// QUIC client configuration: [`Self::tls_client_config`] with Haven's transport parameters.
    pub fn quic_client_config(&self) -> Result<quinn::ClientConfig, WireIoError> {
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(self.tls_client_config()?)
            .map_err(|e| WireIoError::Tls(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(transport_config()));
        Ok(config)
    }

    /// QUIC server configuration: [`Self::tls_server_config`] with Haven's transport parameters.
    pub fn quic_server_config(&self) -> Result<quinn::ServerConfig, WireIoError> {
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(self.tls_server_config()?)
            .map_err(|e| WireIoError::Tls(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(Arc::new(transport_config()));
        Ok(config)
    }
}

/// Kernel buffer requested for each QUIC socket, each direction. Linux caps it at
/// `net.core.rmem_max` / `wmem_max` (often 4 MiB, as here; the default buffer is 208 KiB, which a
/// bulk stream overruns: the drops were QUIC losses and congestion backoffs in
/// `transport_bench`). Kernel memory, per socket, not per connection.
pub const UDP_SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Transport parameters shared by both ends: keep connections alive so reuse works, and notice
/// a dead peer within a few seconds.
fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // A peer that vanished without a reset (killed host, cut link) is given up after 1 s, so
    // requests stuck on it fail over instead of waiting for their own deadline.
    t.keep_alive_interval(Some(Duration::from_millis(250)));
    t.max_idle_timeout(Some(Duration::from_secs(1).try_into().expect("1 s fits a VarInt")));
    t.max_concurrent_bidi_streams(1024u32.into());
    t.max_concurrent_uni_streams(256u32.into());
    // Flow control, the bounds of what a peer can make us hold: 8 MiB unread per stream, 32 MiB
    // per connection (ARCHITECTURE.md, `transport`). 8 MiB covers a 1 ms round trip at 8 GB/s,
    // so a single bulk stream is not held back by its window on a LAN.
    t.stream_receive_window((8u32 * 1024 * 1024).into());
    t.receive_window((32u32 * 1024 * 1024).into());
    t.send_window(32 * 1024 * 1024);
    // Path MTU discovery stays at quinn's default (1452 bytes at most): raised to a jumbo frame
    // (8952), loopback connections ended at 1200 after their bulk losses (quinn's black-hole
    // detection), which `transport_bench` showed as slower, not faster.
    // Segmentation offload (GSO) is quinn's default; `transport_bench` shows whether it batched.
    t.enable_segmentation_offload(true);
    t
}

/// Write one envelope as a frame.
pub async fn write_envelope(send: &mut quinn::SendStream, env: &Envelope) -> Result<usize, WireIoError> {
    write_archive(send, env.encode()?).await
}

/// Write an encoded envelope as one frame without copying it: quinn sends from the archive's
/// own buffer. Returns bytes written.
pub async fn write_archive(send: &mut quinn::SendStream, archive: AlignedVec) -> Result<usize, WireIoError> {
    let header = FrameHeader::encode(archive.len())?;
    let len = FRAME_HEADER_LEN + archive.len();
    let mut chunks = [bytes::Bytes::copy_from_slice(&header), bytes::Bytes::from_owner(archive)];
    send.write_all_chunks(&mut chunks).await?;
    Ok(len)
}

/// Write raw archive bytes as one frame (header + bytes), with one copy into quinn's send
/// buffer. Returns bytes written.
pub async fn write_frame(send: &mut quinn::SendStream, archive: &[u8]) -> Result<usize, WireIoError> {
    let header = FrameHeader::encode(archive.len())?;
    let mut frame = bytes::BytesMut::with_capacity(FRAME_HEADER_LEN + archive.len());
    frame.extend_from_slice(&header);
    frame.extend_from_slice(archive);
    let len = frame.len();
    send.write_chunk(frame.freeze()).await?;
    Ok(len)
}

/// Read one frame into an aligned buffer, refusing frames above `max_len` before reading on.
///
/// The buffer grows as bytes arrive, never to the declared length up front: a peer that declares
/// 16 MiB and sends a trickle costs what it sent, not what it claimed.
pub async fn read_frame(recv: &mut quinn::RecvStream, max_len: usize) -> Result<AlignedVec, WireIoError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    read_exact(recv, &mut header).await?;
    let header = FrameHeader::parse(header, max_len)?;
    read_body(recv, header.len).await
}

/// Read exactly `len` bytes of a frame body. The buffer grows with the bytes that arrived (QUIC
/// hands over the chunks it holds), never to `len` up front.
pub async fn read_body(recv: &mut quinn::RecvStream, len: usize) -> Result<AlignedVec, WireIoError> {
    let mut buf = AlignedVec::new();
    while buf.len() < len {
        match recv.read_chunk(len - buf.len(), true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) => return Err(ProtoError::Truncated { expected: len, got: buf.len() }.into()),
            Err(e) => return Err(WireIoError::Read(e.to_string())),
        }
    }
    Ok(buf)
}

async fn read_exact(recv: &mut quinn::RecvStream, buf: &mut [u8]) -> Result<(), WireIoError> {
    match recv.read_exact(buf).await {
        Ok(()) => Ok(()),
        Err(quinn::ReadExactError::FinishedEarly(got)) => {
            Err(ProtoError::Truncated { expected: buf.len(), got }.into())
        }
        Err(quinn::ReadExactError::ReadError(e)) => Err(WireIoError::Read(e.to_string())),
    }
}

/// Read and validate one envelope.
pub async fn read_envelope(recv: &mut quinn::RecvStream) -> Result<(Envelope, usize), WireIoError> {
    let buf = read_frame(recv, MAX_FRAME_LEN).await?;
    let env = Envelope::decode(&buf)?;
    Ok((env, buf.len() + FRAME_HEADER_LEN))
}

/// One request/response exchange on a fresh stream of `conn`.
///
/// A caller that stops waiting (its timeout dropped this future) abandons the request: the
/// stream is reset, so QUIC stops retransmitting it. Without that, a request held up by a
/// partition would still be delivered — and carried out — when the link heals, long after its
/// sender reported it failed.
pub async fn exchange(conn: &quinn::Connection, request: &Envelope) -> Result<(Envelope, usize, usize), WireIoError> {
    let (send, mut recv) = conn.open_bi().await?;
    let mut send = ResetUnlessAnswered(Some(send));
    let stream = send.0.as_mut().expect("stream present until answered");
    let sent = write_envelope(stream, request).await?;
    stream.finish()?;
    let (reply, received) = read_envelope(&mut recv).await?;
    send.0 = None;
    Ok((reply, sent, received))
}

/// Resets the request stream when dropped before the reply arrived (see [`exchange`]).
struct ResetUnlessAnswered(Option<quinn::SendStream>);

impl Drop for ResetUnlessAnswered {
    fn drop(&mut self) {
        if let Some(mut stream) = self.0.take() {
            // Fails only if the peer already received everything or stopped the stream.
            let _ = stream.reset(quinn::VarInt::from_u32(0));
        }
    }
}

/// A completed request: the reply and the bytes each way (frame headers included).
#[derive(Debug)]
pub struct Exchanged {
    pub reply: Envelope,
    pub sent: usize,
    pub received: usize,
}

/// Endpoint-wide QUIC settings with a random stateless-reset key (a node derives its key from its
/// private key instead and applies [`tune_endpoint_config`] itself: `node::transport`).
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    tune_endpoint_config(&mut config);
    config
}

/// The endpoint-wide settings every Haven endpoint shares (quinn's defaults today; one place to
/// change them for nodes and clients alike).
pub fn tune_endpoint_config(_config: &mut quinn::EndpointConfig) {}

/// The UDP socket of a QUIC endpoint, bound to `addr`, with buffers of
/// [`UDP_SOCKET_BUFFER_BYTES`] where the kernel allows (smaller ones are kept, not an error).
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Err(e) = socket.set_recv_buffer_size(UDP_SOCKET_BUFFER_BYTES) {
        tracing::debug!(error = %e, "cannot enlarge the UDP receive buffer");
    }
    if let Err(e) = socket.set_send_buffer_size(UDP_SOCKET_BUFFER_BYTES) {
        tracing::debug!(error = %e, "cannot enlarge the UDP send buffer");
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A client-only QUIC endpoint on an ephemeral port.
pub fn client_endpoint(material: &TlsMaterial) -> Result<quinn::Endpoint, WireIoError> {
    let bind: SocketAddr = "0.0.0.0:0".parse().expect("literal address");
    let err = |e: std::io::Error| WireIoError::Tls(format!("binding client endpoint: {e}"));
    let socket = bind_udp(bind).map_err(err)?;
    let mut endpoint =
        quinn::Endpoint::new(endpoint_config(), None, socket, Arc::new(quinn::TokioRuntime)).map_err(err)?;
    endpoint.set_default_client_config(material.quic_client_config()?);
    Ok(endpoint)
}

/// A dial in flight, shared by every caller waiting for the same peer. It runs as its own task,
/// so a caller that gives up (its request timed out) does not abort the handshake: the next
/// request finds the connection ready instead of starting over.
type Dial = futures::future::Shared<futures::future::BoxFuture<'static, Result<quinn::Connection, String>>>;

#[derive(Default)]
struct PeerState {
    conn: Option<quinn::Connection>,
    dialing: Option<Dial>,
    failures: u32,
    retry_at: Option<Instant>,
}

/// Dials peers, keeps one live connection per address, and backs off exponentially (capped) from
/// a peer whose last dial failed, so a dead node costs a fast error instead of a handshake
/// timeout on every request.
#[derive(Clone)]
pub struct Connector {
    endpoint: quinn::Endpoint,
    peers: Arc<Mutex<HashMap<SocketAddr, PeerState>>>,
    next_msg_id: Arc<AtomicU64>,
    connect_timeout: Duration,
    max_backoff: Duration,
}

impl Connector {
    pub fn new(endpoint: quinn::Endpoint, connect_timeout: Duration, max_backoff: Duration) -> Self {
        Self {
            endpoint,
            peers: Arc::default(),
            next_msg_id: Arc::new(AtomicU64::new(rand::random::<u32>() as u64)),
            connect_timeout,
            max_backoff,
        }
    }

    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// A fresh message id for an outgoing request.
    pub fn next_msg_id(&self) -> u64 {
        self.next_msg_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A live connection to `addr`, reusing the cached one when it is still open and joining a
    /// dial already in flight.
    pub async fn connection(&self, addr: SocketAddr) -> Result<quinn::Connection, WireIoError> {
        let dial = {
            let mut peers = self.peers.lock().expect("peer map lock poisoned");
            let state = peers.entry(addr).or_default();
            if let Some(conn) = &state.conn {
                if conn.close_reason().is_none() {
                    return Ok(conn.clone());
                }
                state.conn = None;
            }
            match &state.dialing {
                Some(d) => d.clone(),
                None => {
                    if let Some(at) = state.retry_at {
                        let now = Instant::now();
                        if at > now {
                            return Err(WireIoError::BackingOff { addr, remaining_ms: (at - now).as_millis() as u64 });
                        }
                    }
                    let d = self.spawn_dial(addr);
                    state.dialing = Some(d.clone());
                    d
                }
            }
        };
        dial.await.map_err(|reason| WireIoError::Connect { addr, reason })
    }

    fn spawn_dial(&self, addr: SocketAddr) -> Dial {
        use futures::FutureExt;
        let this = self.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let result = this.dial(addr).await;
            tracing::debug!(%addr, ok = result.is_ok(), elapsed_ms = started.elapsed().as_millis() as u64, "dial finished");
            let mut peers = this.peers.lock().expect("peer map lock poisoned");
            let state = peers.entry(addr).or_default();
            state.dialing = None;
            match &result {
                Ok(conn) => {
                    state.failures = 0;
                    state.retry_at = None;
                    state.conn = Some(conn.clone());
                }
                Err(_) => {
                    state.failures = state.failures.saturating_add(1);
                    let backoff = Duration::from_millis(20u64 << state.failures.min(8)).min(this.max_backoff);
                    state.retry_at = Some(Instant::now() + backoff);
                }
            }
            result.map_err(|e| e.to_string())
        });
        async move { task.await.unwrap_or_else(|e| Err(format!("dial task failed: {e}"))) }.boxed().shared()
    }

    async fn dial(&self, addr: SocketAddr) -> Result<quinn::Connection, WireIoError> {
        let connecting = self
            .endpoint
            .connect(addr, SERVER_NAME)
            .map_err(|e| WireIoError::Connect { addr, reason: e.to_string() })?;
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(WireIoError::Connect { addr, reason: e.to_string() }),
            Err(_) => Err(WireIoError::Connect {
                addr,
                reason: format!("handshake timed out after {:?}", self.connect_timeout),
            }),
        }
    }

    /// Forget the cached connection to `addr` (after an error on it).
    pub fn invalidate(&self, addr: SocketAddr) {
        if let Some(state) = self.peers.lock().expect("peer map lock poisoned").get_mut(&addr) {
            state.conn = None;
        }
    }

    /// Forget `conn` as the cached connection to `addr`, unless a newer one has replaced it (a
    /// caller that gave up on an old connection must not drop the fresh one another dialled).
    pub fn forget(&self, addr: SocketAddr, conn: &quinn::Connection) {
        if let Some(state) = self.peers.lock().expect("peer map lock poisoned").get_mut(&addr) {
            if state.conn.as_ref().is_some_and(|c| c.stable_id() == conn.stable_id()) {
                state.conn = None;
            }
        }
    }

    /// Send `request` to `addr` and wait for the reply, all within `timeout`.
    pub async fn request(
        &self,
        addr: SocketAddr,
        request: &Envelope,
        timeout: Duration,
    ) -> Result<Exchanged, WireIoError> {
        let fut = async {
            let conn = self.connection(addr).await?;
            match exchange(&conn, request).await {
                Ok((reply, sent, received)) => Ok(Exchanged { reply, sent, received }),
                Err(e) => {
                    if matches!(e, WireIoError::Connection(_)) {
                        self.invalidate(addr);
                    }
                    Err(e)
                }
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(WireIoError::Timeout { addr, after: timeout }),
        }
    }
}
