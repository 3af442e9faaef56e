//! The NBD server: accepting TCP connections, the fixed newstyle handshake and option haggling
//! (with `NBD_OPT_STARTTLS`), and the transmission phase (validating each request, running it on
//! the export's [`ExportBackend`], and writing replies).
//!
//! One connection = one task that reads requests off the socket in order; each accepted request
//! runs as its own task (up to [`MAX_IN_FLIGHT`] per connection, and a bounded number of payload
//! bytes), and every reply goes through the connection's single writer, so replies never
//! interleave and small replies are batched into one write. A request's share of the in-flight
//! limits is released only once its reply has been written to the socket, so a client that does
//! not read its replies stops the server from reading its requests instead of making it hold
//! more. Requests are checked against the export's [`ExportInfo`] and the server's limits before
//! the backend sees them; a refused request gets an errno reply (a refused write's payload is
//! still read off the socket, so the stream stays framed); anything that loses framing (bad
//! magic, a write payload larger than the limit) closes the connection. Only simple replies are
//! used (structured replies are declined during haggling).
//!
//! TLS follows the NBD document: `NBD_OPT_STARTTLS` (never `NBD_OPT_EXPORT_NAME`-style implicit
//! TLS), after which haggling starts over inside TLS; which options pass before TLS is
//! [`p::gate_option`]'s decision, what the connection may open is [`Access`]'s (see
//! [`super::tls`]). Time is bounded: the whole handshake by `handshake_timeout`; in
//! transmission, a connection with nothing in flight that sends no request for `idle_timeout`,
//! or a client that stops mid-request or takes no reply for that long, is closed.
//!
//! Metrics: `haven_nbd_ops_total{op}` (every request read, refused or not),
//! `haven_nbd_errors_total{op}` (refused or failed requests; `op="handshake"`/`"protocol"` for
//! connections closed on a protocol violation, `"tls"` for failed TLS handshakes, `"access"` for
//! options refused by access rules, `"connection_limit"` for refused connections),
//! `haven_nbd_bytes_total{op}` (payload bytes of successful reads and writes),
//! `haven_nbd_op_seconds{op}` (backend latency), `haven_nbd_idle_closed_total` and the
//! `haven_nbd_connections` gauge.
//!
//! This module must not know what an export is: names come from the [`ExportResolver`], data
//! from the [`ExportBackend`]. Wire encoding lives in [`super::protocol`].

use std::future::Future;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf, WriteHalf,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn, Instrument};

use super::protocol::{self as p, OptionGate, ProtocolError, Request, TlsPhase};
use super::tls::{Access, OpenRefusal, TlsPolicy};
use super::{BackendError, ExportBackend, ExportInfo, ExportResolver, NbdErrno};
use crate::identity::{self, IdentityError};

/// Requests of one connection that may run on the backend at once.
pub const MAX_IN_FLIGHT: usize = 64;
/// How long a connection may take to finish its in-flight requests after shutdown before it is
/// dropped (e.g. a client that stopped reading replies).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Read exactly `len` payload bytes into a new buffer, without zeroing it first (a 1 MiB write's
/// `memset` was 2% of the CPU of `write 1M`). Each read is limited to what is still missing, so
/// nothing past the payload (the next request) is consumed.
async fn read_payload<R: tokio::io::AsyncRead + Unpin>(rd: &mut R, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let missing = (len - buf.len()) as u64;
        if (&mut *rd).take(missing).read_buf(&mut buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    debug_assert_eq!(buf.len(), len);
    Ok(buf)
}

/// Unit of the byte budget semaphore.
const BUDGET_UNIT: u64 = 4096;
/// Socket read buffer. Write payloads larger than this bypass it.
const READ_BUFFER: usize = 128 * 1024;
/// Read replies at least this large are written straight from the backend's buffer (one
/// vectored write with the pending headers) instead of being copied into the batch.
const DIRECT_WRITE_MIN: usize = 64 * 1024;
/// The writer flushes its batch once it holds this much, even if more replies are queued.
const BATCH_FLUSH: usize = 256 * 1024;

/// Server limits and admission.
#[derive(Debug, Clone)]
pub struct NbdServerConfig {
    /// Largest read or write a client may request (bytes); advertised as the maximum block size
    /// (rounded down to a multiple of the export's block size). A write announcing more than
    /// this closes the connection, since its payload cannot reasonably be skipped.
    pub max_payload: u32,
    /// Connections served at once; further connections are accepted and closed immediately.
    pub max_connections: usize,
    /// Read and write payload bytes one connection may hold, from reading a request until its
    /// reply is written (at least `max_payload`, so every valid request can run).
    pub max_bytes_in_flight: u64,
    /// How long a client may take from connecting (TLS included) to entering transmission.
    pub handshake_timeout: Duration,
    /// In transmission: how long a connection with nothing in flight may send no request, and
    /// how long a client may stall mid-request or leave a reply unread, before it is closed.
    pub idle_timeout: Duration,
    /// TLS and the access of clients without it.
    pub tls: TlsPolicy,
}

impl Default for NbdServerConfig {
    fn default() -> Self {
        Self {
            max_payload: 32 << 20,
            max_connections: 256,
            max_bytes_in_flight: 64 << 20,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            tls: TlsPolicy::Off,
        }
    }
}

/// Serve NBD on `listener` until `shutdown` completes.
///
/// On shutdown the listener is closed, connections still haggling are dropped, and connections
/// in transmission stop reading requests, finish (and reply to) those already running, then
/// close; a connection still busy after [`SHUTDOWN_GRACE`] is dropped. `serve` returns once
/// every connection has ended. Errors on individual connections are logged and counted; they
/// never end the server.
pub async fn serve(
    listener: TcpListener,
    resolver: Arc<dyn ExportResolver>,
    config: NbdServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let config = Arc::new(config);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, tls = ?config.tls.initial_phase(), "nbd server listening");
    }
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => log_join(done),
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Typically EMFILE/ENFILE: back off instead of spinning.
                        warn!(error = %e, "nbd accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                while let Some(done) = connections.try_join_next() {
                    log_join(done);
                }
                if connections.len() >= config.max_connections {
                    warn!(%peer, limit = config.max_connections, "nbd connection refused: too many connections");
                    metrics::counter!("haven_nbd_errors_total", "op" => "connection_limit").increment(1);
                    continue;
                }
                if let Err(e) = stream.set_nodelay(true) {
                    debug!(%peer, error = %e, "nbd: could not set TCP_NODELAY");
                }
                let span = tracing::info_span!("nbd_conn", %peer);
                connections.spawn(
                    serve_connection(stream, peer, resolver.clone(), config.clone(), stop_rx.clone()).instrument(span),
                );
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    debug!(connections = connections.len(), "nbd server stopping; waiting for connections");
    while let Some(done) = connections.join_next().await {
        log_join(done);
    }
    info!("nbd server stopped");
}

fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        warn!(error = %e, "nbd connection task failed");
    }
}

/// Why a connection ended other than by the client's choice.
#[derive(Debug, Error)]
enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("option data of {0} bytes is too large")]
    OptionTooBig(u32),
    #[error("NBD_OPT_EXPORT_NAME for {name:?} refused: {message}")]
    ExportNameRefused { name: String, message: String },
    #[error("NBD_OPT_EXPORT_NAME before TLS, which this server requires")]
    ExportNameBeforeTls,
    #[error("client sent {0} bytes after NBD_OPT_STARTTLS before the TLS handshake")]
    DataBeforeTls(usize),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("client stalled for {0:?} in the middle of a request")]
    Stalled(Duration),
}

impl ConnError {
    /// A closed or reset socket is how clients commonly leave; not worth a warning.
    fn is_disconnect(&self) -> bool {
        use std::io::ErrorKind::*;
        matches!(self, Self::Io(e) if matches!(e.kind(), UnexpectedEof | ConnectionReset | BrokenPipe | ConnectionAborted))
    }
}

/// Decrements the connection gauge however the connection ends.
struct ConnectionGauge;

impl ConnectionGauge {
    fn new() -> Self {
        metrics::gauge!("haven_nbd_connections").increment(1.0);
        Self
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        metrics::gauge!("haven_nbd_connections").decrement(1.0);
    }
}

/// A connection's streams after haggling: in the clear, or inside TLS.
enum Streams<S> {
    Plain(BufReader<ReadHalf<S>>, WriteHalf<S>),
    Tls(BufReader<ReadHalf<TlsStream<S>>>, WriteHalf<TlsStream<S>>),
}

/// What one connection's byte stream must be: a TCP socket, or (fuzzing, tests) an in-memory
/// pipe.
pub(crate) trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> ByteStream for S {}

/// One connection over `stream`: handshake (TLS included), then transmission, until the client
/// leaves or `stop` turns true. `peer` names the client in logs.
pub(crate) async fn serve_connection<S: ByteStream>(
    stream: S,
    peer: SocketAddr,
    resolver: Arc<dyn ExportResolver>,
    config: Arc<NbdServerConfig>,
    mut stop: watch::Receiver<bool>,
) {
    let _gauge = ConnectionGauge::new();
    debug!("nbd connection accepted");
    let haggled = tokio::select! {
        biased;
        _ = stopped(&mut stop) => {
            debug!("nbd server shutting down during handshake; closing");
            return;
        }
        r = tokio::time::timeout(config.handshake_timeout, handshake(stream, &*resolver, &config, peer)) => {
            r.unwrap_or(Err(ConnError::HandshakeTimeout))
        }
    };
    let (streams, export) = match haggled {
        Ok(Some(chosen)) => chosen,
        Ok(None) => {
            debug!("nbd client ended option haggling");
            return;
        }
        Err(e) => {
            if e.is_disconnect() {
                debug!(error = %e, "nbd client left during handshake");
            } else {
                warn!(%peer, error = %e, "nbd handshake failed; closing connection");
                let op = if matches!(e, ConnError::Tls(_)) { "tls" } else { "handshake" };
                metrics::counter!("haven_nbd_errors_total", "op" => op).increment(1);
            }
            return;
        }
    };
    debug!(export = %export.name, size = export.info.size, read_only = export.info.read_only, "nbd transmission started");
    let mut grace = stop.clone();
    let served = async {
        match streams {
            Streams::Plain(rd, wr) => transmission(rd, wr, export, &config, peer, stop).await,
            Streams::Tls(rd, wr) => transmission(rd, wr, export, &config, peer, stop).await,
        }
    };
    tokio::select! {
        r = served => match r {
            Ok(()) => debug!("nbd connection closed"),
            Err(e) if e.is_disconnect() => debug!(error = %e, "nbd client disconnected"),
            Err(e) => warn!(%peer, error = %e, "nbd connection ended"),
        },
        _ = async { stopped(&mut grace).await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
            warn!(%peer, "nbd connection still busy after the shutdown grace period; dropping it");
        }
    }
}

/// Resolves when the server is stopping (or has gone away).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The export a client chose with `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`.
struct Export {
    name: String,
    backend: Arc<dyn ExportBackend>,
    /// What the client was told; `read_only` includes what the connection's access imposes.
    info: ExportInfo,
}

/// Transmission flags for an export: every command this server implements, plus `READ_ONLY`.
fn transmission_flags(info: &ExportInfo) -> u16 {
    let mut flags = p::FLAG_HAS_FLAGS
        | p::FLAG_SEND_FLUSH
        | p::FLAG_SEND_FUA
        | p::FLAG_SEND_TRIM
        | p::FLAG_SEND_WRITE_ZEROES
        | p::FLAG_CAN_MULTI_CONN;
    if info.read_only {
        flags |= p::FLAG_READ_ONLY;
    }
    flags
}

/// The export's block size, treating a (bogus) 0 as 1.
fn block_size(info: &ExportInfo) -> u32 {
    info.block_size.max(1)
}

/// `NBD_INFO_BLOCK_SIZE` values: minimum = preferred = the export's block size, maximum =
/// `max_payload` rounded down to a multiple of it (but at least one block).
fn block_size_constraints(info: &ExportInfo, max_payload: u32) -> (u32, u32, u32) {
    let bs = block_size(info);
    let max = (max_payload / bs * bs).max(bs);
    (bs, bs, max)
}

/// The option reply for a resolver failure.
fn open_error_reply(errno: NbdErrno) -> u32 {
    match errno {
        NbdErrno::Perm => p::REP_ERR_POLICY,
        NbdErrno::Shutdown => p::REP_ERR_SHUTDOWN,
        _ => p::REP_ERR_UNKNOWN,
    }
}

/// The message sent with an option refused by [`p::gate_option`].
fn gate_message(option: u32, reply_type: u32) -> &'static str {
    match reply_type {
        p::REP_ERR_TLS_REQD => {
            "TLS is required: send NBD_OPT_STARTTLS and present a client certificate from the cluster CA"
        }
        p::REP_ERR_UNSUP => "TLS is not enabled on this server",
        _ if option == p::OPT_STARTTLS => "TLS is already active, or NBD_OPT_STARTTLS carried data",
        _ => "option refused",
    }
}

/// Where haggling stands on one connection.
struct Haggle<'a> {
    resolver: &'a dyn ExportResolver,
    config: &'a NbdServerConfig,
    peer: SocketAddr,
    no_zeroes: bool,
    phase: TlsPhase,
    access: Access,
}

/// How one round of haggling ended.
enum Haggled {
    Export(Export),
    /// `NBD_OPT_ABORT`.
    Aborted,
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake comes next.
    StartTls,
}

/// Greeting, option haggling, and (after `NBD_OPT_STARTTLS`) the TLS handshake and haggling
/// inside TLS. `Ok(None)`: the client aborted (`NBD_OPT_ABORT`).
async fn handshake<S: ByteStream>(
    stream: S,
    resolver: &dyn ExportResolver,
    config: &NbdServerConfig,
    peer: SocketAddr,
) -> Result<Option<(Streams<S>, Export)>, ConnError> {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
    wr.write_all(&p::encode_greeting()).await?;
    let mut flags = [0u8; p::CLIENT_FLAGS_LEN];
    rd.read_exact(&mut flags).await?;
    let client = p::decode_client_flags(&flags)?;
    let mut h = Haggle {
        resolver,
        config,
        peer,
        no_zeroes: client.no_zeroes,
        phase: config.tls.initial_phase(),
        access: config.tls.initial_access(),
    };
    match haggle(&mut rd, &mut wr, &h).await? {
        Haggled::Export(export) => return Ok(Some((Streams::Plain(rd, wr), export))),
        Haggled::Aborted => return Ok(None),
        Haggled::StartTls => {}
    }
    // The gate only starts TLS when the policy offers it.
    let tls_config = config
        .tls
        .server_config()
        .ok_or(ConnError::Protocol(ProtocolError::BadOptionData("NBD_OPT_STARTTLS without TLS configured")))?;
    // The client must wait for our ACK before its ClientHello; anything buffered already would
    // be plaintext injected ahead of TLS.
    if !rd.buffer().is_empty() {
        return Err(ConnError::DataBeforeTls(rd.buffer().len()));
    }
    let plain = rd.into_inner().unsplit(wr);
    let tls = tokio_rustls::TlsAcceptor::from(tls_config).accept(plain).await.map_err(ConnError::Tls)?;
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(IdentityError::NoCertificate)
        .and_then(|leaf| identity::caller_from_der(leaf));
    match &identity {
        Ok(caller) => info!(%peer, %caller, "nbd client authenticated"),
        Err(e) => warn!(%peer, error = %e, "nbd client certificate names no usable identity; refusing its options"),
    }
    h.phase = TlsPhase::Established;
    h.access = Access::for_identity(identity);
    let (rd, mut wr) = tokio::io::split(tls);
    let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
    match haggle(&mut rd, &mut wr, &h).await? {
        Haggled::Export(export) => Ok(Some((Streams::Tls(rd, wr), export))),
        Haggled::Aborted => {
            let _ = wr.shutdown().await;
            Ok(None)
        }
        Haggled::StartTls => {
            Err(ConnError::Protocol(ProtocolError::BadOptionData("NBD_OPT_STARTTLS accepted inside TLS")))
        }
    }
}

/// Open `name` for this connection, or say why not (without opening anything the connection
/// may not see at all).
async fn open_export(h: &Haggle<'_>, name: &str) -> Result<(Arc<dyn ExportBackend>, ExportInfo), OpenRefusal> {
    if let Some(refusal) = h.access.list_refusal() {
        return Err(refusal);
    }
    let backend = h.resolver.open(name).await.map_err(|e| {
        debug!(export = %name, error = %e, "nbd: export not available");
        OpenRefusal { reply_type: open_error_reply(e.errno), message: e.message }
    })?;
    let mut info = backend.info();
    info.read_only = h.access.open(name, info.read_only)?;
    Ok((backend, info))
}

/// Write `out` and flush it (inside TLS, written bytes sit in the TLS layer until flushed).
async fn send<W: AsyncWrite + Unpin>(wr: &mut W, out: &[u8]) -> std::io::Result<()> {
    wr.write_all(out).await?;
    wr.flush().await
}

/// Option haggling on one stream, until an export is chosen, the client aborts, or STARTTLS.
async fn haggle<R, W>(rd: &mut R, wr: &mut W, h: &Haggle<'_>) -> Result<Haggled, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let mut header = [0u8; p::OPTION_HEADER_LEN];
        rd.read_exact(&mut header).await?;
        let opt = p::decode_option_header(&header)?;
        let mut out = Vec::new();
        if opt.len > p::MAX_OPTION_DATA {
            // Skipping up to 4 GiB of option data is not worth it: refuse and hang up.
            if opt.option != p::OPT_EXPORT_NAME {
                p::put_option_reply(&mut out, opt.option, p::REP_ERR_TOO_BIG, b"option data too large");
                let _ = send(wr, &out).await;
            }
            return Err(ConnError::OptionTooBig(opt.len));
        }
        let mut data = vec![0u8; opt.len as usize];
        rd.read_exact(&mut data).await?;

        match p::gate_option(opt.option, opt.len, h.phase) {
            OptionGate::Proceed => {}
            OptionGate::StartTls => {
                p::put_option_reply(&mut out, opt.option, p::REP_ACK, &[]);
                send(wr, &out).await?;
                return Ok(Haggled::StartTls);
            }
            OptionGate::Refuse(reply_type) => {
                debug!(option = opt.option, reply_type, "nbd: option refused by the TLS rules");
                if reply_type == p::REP_ERR_TLS_REQD {
                    metrics::counter!("haven_nbd_errors_total", "op" => "access").increment(1);
                }
                p::put_option_reply(&mut out, opt.option, reply_type, gate_message(opt.option, reply_type).as_bytes());
                send(wr, &out).await?;
                continue;
            }
            OptionGate::Close => return Err(ConnError::ExportNameBeforeTls),
        }

        match opt.option {
            p::OPT_EXPORT_NAME => {
                // This option cannot be refused with an error reply: failure means closing.
                let name = p::decode_string(&data)?;
                let (backend, info) = match open_export(h, &name).await {
                    Ok(opened) => opened,
                    Err(refusal) => return Err(ConnError::ExportNameRefused { name, message: refusal.message }),
                };
                send(wr, &p::encode_export_name_reply(info.size, transmission_flags(&info), h.no_zeroes)).await?;
                return Ok(Haggled::Export(Export { name, backend, info }));
            }
            p::OPT_ABORT => {
                p::put_option_reply(&mut out, opt.option, p::REP_ACK, &[]);
                // The client may already have hung up; that is fine.
                let _ = send(wr, &out).await;
                return Ok(Haggled::Aborted);
            }
            p::OPT_LIST => {
                if !data.is_empty() {
                    p::put_option_reply(&mut out, opt.option, p::REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                } else if let Some(refusal) = h.access.list_refusal() {
                    metrics::counter!("haven_nbd_errors_total", "op" => "access").increment(1);
                    let msg = p::clamp_string(&refusal.message);
                    p::put_option_reply(&mut out, opt.option, refusal.reply_type, msg.as_bytes());
                } else {
                    match h.resolver.list().await {
                        Ok(exports) => {
                            for export in exports.iter().filter(|e| h.access.may_open(e.read_only)) {
                                let name = p::encode_rep_server(&export.name);
                                p::put_option_reply(&mut out, opt.option, p::REP_SERVER, &name);
                            }
                            p::put_option_reply(&mut out, opt.option, p::REP_ACK, &[]);
                        }
                        Err(e) => {
                            let msg = p::clamp_string(&e.message);
                            p::put_option_reply(&mut out, opt.option, open_error_reply(e.errno), msg.as_bytes());
                        }
                    }
                }
            }
            p::OPT_INFO | p::OPT_GO => {
                let request = match p::decode_info_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        warn!(peer = %h.peer, error = %e, "nbd: malformed NBD_OPT_INFO/GO");
                        p::put_option_reply(&mut out, opt.option, p::REP_ERR_INVALID, e.to_string().as_bytes());
                        send(wr, &out).await?;
                        continue;
                    }
                };
                match open_export(h, &request.name).await {
                    Err(refusal) => {
                        if matches!(refusal.reply_type, p::REP_ERR_POLICY | p::REP_ERR_TLS_REQD) {
                            metrics::counter!("haven_nbd_errors_total", "op" => "access").increment(1);
                        }
                        let msg = p::clamp_string(&refusal.message);
                        p::put_option_reply(&mut out, opt.option, refusal.reply_type, msg.as_bytes());
                    }
                    Ok((backend, info)) => {
                        put_info_replies(&mut out, opt.option, &request, &info, h.config.max_payload);
                        if opt.option == p::OPT_GO {
                            send(wr, &out).await?;
                            return Ok(Haggled::Export(Export { name: request.name, backend, info }));
                        }
                    }
                }
            }
            other => {
                // Includes STRUCTURED_REPLY: simple replies only.
                debug!(option = other, "nbd: unsupported option");
                p::put_option_reply(&mut out, other, p::REP_ERR_UNSUP, b"option not supported by this server");
            }
        }
        send(wr, &out).await?;
    }
}

/// The `NBD_REP_INFO` replies and final `NBD_REP_ACK` for a successful INFO or GO.
fn put_info_replies(out: &mut Vec<u8>, option: u32, request: &p::InfoRequest, info: &ExportInfo, max_payload: u32) {
    p::put_option_reply(out, option, p::REP_INFO, &p::encode_info_export(info.size, transmission_flags(info)));
    if request.requests.contains(&p::INFO_NAME) {
        p::put_option_reply(out, option, p::REP_INFO, &p::encode_info_name(&request.name));
    }
    if !info.description.is_empty() || request.requests.contains(&p::INFO_DESCRIPTION) {
        p::put_option_reply(out, option, p::REP_INFO, &p::encode_info_description(&info.description));
    }
    let (min, preferred, max) = block_size_constraints(info, max_payload);
    p::put_option_reply(out, option, p::REP_INFO, &p::encode_info_block_size(min, preferred, max));
    p::put_option_reply(out, option, p::REP_ACK, &[]);
}

/// A transmission command, as far as the server understands it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    WriteZeroes,
    /// Any other type (including CACHE and BLOCK_STATUS, which are not advertised). Assumed to
    /// carry no payload.
    Other(u16),
}

impl Command {
    pub fn from_wire(kind: u16) -> Self {
        match kind {
            p::CMD_READ => Self::Read,
            p::CMD_WRITE => Self::Write,
            p::CMD_DISC => Self::Disc,
            p::CMD_FLUSH => Self::Flush,
            p::CMD_TRIM => Self::Trim,
            p::CMD_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Other(other),
        }
    }

    /// The `op` label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Disc => "disc",
            Self::Flush => "flush",
            Self::Trim => "trim",
            Self::WriteZeroes => "write_zeroes",
            Self::Other(_) => "unknown",
        }
    }

    fn modifies(self) -> bool {
        matches!(self, Self::Write | Self::Trim | Self::WriteZeroes)
    }
}

/// Check a request against the export and the server's limits, before the backend sees it.
///
/// Order: unknown command or flags → EINVAL; a modifying command on a read-only export → EPERM;
/// zero length (except FLUSH/DISC) → EINVAL; READ/WRITE longer than `max_payload` → EOVERFLOW;
/// offset or length not a multiple of the block size → EINVAL, except for TRIM; a range past the
/// end (or overflowing) → ENOSPC for WRITE/WRITE_ZEROES, EINVAL otherwise.
///
/// TRIM and WRITE_ZEROES may be as long as the wire allows (the maximum block size bounds
/// payloads only). A TRIM may be unaligned: it is advisory, the backend trims the whole blocks
/// inside it, and qemu sends the unaligned head and tail of a discard as requests of their own
/// even to a server that advertised a minimum block size. WRITE_ZEROES must be exact, so it
/// keeps to the advertised minimum (the export's block size, `NBD_INFO_BLOCK_SIZE`): the NBD
/// spec lets a server refuse a request that ignores it with EINVAL, and qemu, which honours it,
/// zeroes a partial block itself by read-modify-write before sending aligned requests.
pub fn validate_request(req: &Request, info: &ExportInfo, max_payload: u32) -> Result<Command, NbdErrno> {
    let cmd = Command::from_wire(req.kind);
    let allowed_flags = match cmd {
        Command::Other(_) => return Err(NbdErrno::Inval),
        // FUA is valid on every command once SEND_FUA is advertised (clients do set it widely).
        Command::WriteZeroes => p::CMD_FLAG_FUA | p::CMD_FLAG_NO_HOLE,
        _ => p::CMD_FLAG_FUA,
    };
    if req.flags & !allowed_flags != 0 {
        return Err(NbdErrno::Inval);
    }
    if matches!(cmd, Command::Flush | Command::Disc) {
        // Offset and length are reserved (zero) for these; ignore whatever was sent.
        return Ok(cmd);
    }
    if cmd.modifies() && info.read_only {
        return Err(NbdErrno::Perm);
    }
    if req.len == 0 {
        return Err(NbdErrno::Inval);
    }
    if matches!(cmd, Command::Read | Command::Write) && req.len > max_payload {
        return Err(NbdErrno::Overflow);
    }
    let bs = u64::from(block_size(info));
    let aligned = req.offset.is_multiple_of(bs) && u64::from(req.len).is_multiple_of(bs);
    if !aligned && cmd != Command::Trim {
        return Err(NbdErrno::Inval);
    }
    let in_range = req.offset.checked_add(u64::from(req.len)).is_some_and(|end| end <= info.size);
    if !in_range {
        return Err(match cmd {
            Command::Write | Command::WriteZeroes => NbdErrno::NoSpc,
            _ => NbdErrno::Inval,
        });
    }
    Ok(cmd)
}

/// A request's share of the connection's limits (a slot and its payload bytes), held from
/// reading the request until its reply has been written to the socket.
struct Held {
    _slot: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

/// One reply for the writer task.
struct Reply {
    handle: u64,
    error: u32,
    /// A successful read's data.
    data: Option<Vec<u8>>,
    /// Released by the writer once the reply is written.
    held: Option<Held>,
}

impl Reply {
    fn error(handle: u64, errno: NbdErrno) -> Self {
        Self { handle, error: errno.code(), data: None, held: None }
    }
}

/// The byte budget, in [`BUDGET_UNIT`]s, for payloads in flight on one connection: the
/// configured bytes, but room for at least one maximal request.
fn byte_budget(max_bytes_in_flight: u64, max_payload: u32) -> u32 {
    let bytes = max_bytes_in_flight.max(u64::from(max_payload)).max(BUDGET_UNIT);
    u32::try_from(bytes.div_ceil(BUDGET_UNIT)).unwrap_or(u32::MAX)
}

/// Budget units a request holds until its reply is written (payload bytes only; at least one
/// unit).
fn request_cost(cmd: Command, len: u32) -> u32 {
    match cmd {
        Command::Read | Command::Write => u64::from(len).div_ceil(BUDGET_UNIT).max(1) as u32,
        _ => 1,
    }
}

/// Everything a request task needs.
struct Job {
    cmd: Command,
    req: Request,
    payload: Option<Vec<u8>>,
    backend: Arc<dyn ExportBackend>,
    peer: SocketAddr,
}

async fn transmission<R, W>(
    rd: R,
    wr: W,
    export: Export,
    config: &NbdServerConfig,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    R: AsyncBufRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let (tx, rx) = mpsc::channel::<Reply>(MAX_IN_FLIGHT * 2);
    // The writer runs in this task, not a spawned one, so dropping the connection drops it too.
    let (read_result, write_result) =
        tokio::join!(read_requests(rd, tx, export, config, peer, stop), write_replies(wr, rx, config.idle_timeout));
    if let Err(e) = write_result {
        // Usually the client went away (or stopped reading); the reader then stops as well.
        debug!(error = %e, "nbd reply writer stopped");
    }
    read_result
}

/// `f`, or an error once the client has made it wait `limit`.
async fn within<T>(
    limit: Duration,
    f: impl Future<Output = std::io::Result<T>>,
) -> Result<std::io::Result<T>, ConnError> {
    tokio::time::timeout(limit, f).await.map_err(|_| ConnError::Stalled(limit))
}

/// The reading side of transmission: decode and check each request, then hand it to a task.
/// Returns once no more requests will be read and every accepted request has replied (or
/// failed to, because the writer is gone); dropping `tx` then ends the writer.
async fn read_requests<R: AsyncBufRead + Unpin>(
    mut rd: R,
    tx: mpsc::Sender<Reply>,
    export: Export,
    config: &NbdServerConfig,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let max_payload = config.max_payload;
    let idle = config.idle_timeout;
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let budget_total = byte_budget(config.max_bytes_in_flight, max_payload);
    let budget = Arc::new(Semaphore::new(budget_total as usize));
    let mut running = JoinSet::new();

    let ended: Result<(), ConnError> = loop {
        // Wait for the next request without consuming any of it (`fill_buf` is cancel-safe), so
        // the idle check below never cuts a request header in two.
        let more = tokio::select! {
            biased;
            _ = stopped(&mut stop) => {
                debug!("nbd server shutting down; finishing in-flight requests");
                break Ok(());
            }
            _ = tx.closed() => break Ok(()), // the writer failed
            r = rd.fill_buf() => r.map(|buf| !buf.is_empty()),
            _ = tokio::time::sleep(idle) => {
                while let Some(done) = running.try_join_next() {
                    log_join(done);
                }
                // Requests still running (or replies not yet written: they hold slots) mean the
                // connection is busy, not idle.
                if running.is_empty() && slots.available_permits() == MAX_IN_FLIGHT {
                    debug!(idle_ms = idle.as_millis() as u64, "nbd connection idle; closing it");
                    metrics::counter!("haven_nbd_idle_closed_total").increment(1);
                    break Ok(());
                }
                continue;
            }
        };
        match more {
            Ok(true) => {}
            Ok(false) => break Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            Err(e) => break Err(e.into()),
        }
        let mut header = [0u8; p::REQUEST_LEN];
        match within(idle, rd.read_exact(&mut header)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => break Err(e.into()),
            Err(e) => break Err(e),
        }
        while let Some(done) = running.try_join_next() {
            log_join(done);
        }
        let req = match p::decode_request(&header) {
            Ok(r) => r,
            Err(e) => {
                warn!(%peer, error = %e, "nbd: bad request header; closing connection");
                metrics::counter!("haven_nbd_errors_total", "op" => "protocol").increment(1);
                break Ok(());
            }
        };
        let cmd = Command::from_wire(req.kind);
        let label = cmd.label();
        metrics::counter!("haven_nbd_ops_total", "op" => label).increment(1);

        if cmd == Command::Write && req.len > max_payload {
            warn!(%peer, len = req.len, max_payload, "nbd: write larger than the maximum payload; closing connection");
            metrics::counter!("haven_nbd_errors_total", "op" => label).increment(1);
            let _ = tx.send(Reply::error(req.handle, NbdErrno::Overflow)).await;
            break Ok(());
        }
        let cmd = match validate_request(&req, &export.info, max_payload) {
            Ok(cmd) => cmd,
            Err(errno) => {
                debug!(
                    op = label,
                    flags = req.flags,
                    offset = req.offset,
                    len = req.len,
                    errno = errno.code(),
                    "nbd: request refused"
                );
                metrics::counter!("haven_nbd_errors_total", "op" => label).increment(1);
                if cmd == Command::Write {
                    // Keep the stream framed: the refused payload is still on the socket.
                    let skipped = tokio::select! {
                        biased;
                        _ = stopped(&mut stop) => break Ok(()),
                        r = within(idle, skip(&mut rd, u64::from(req.len))) => r,
                    };
                    match skipped {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => break Err(e.into()),
                        Err(e) => break Err(e),
                    }
                }
                if tx.send(Reply::error(req.handle, errno)).await.is_err() {
                    break Ok(());
                }
                continue;
            }
        };
        if cmd == Command::Disc {
            debug!("nbd client sent NBD_CMD_DISC");
            break Ok(());
        }

        // Back-pressure: stop reading the socket while the connection is at its limits. Both
        // permits are released only when the reply has been written.
        let permits = tokio::select! {
            biased;
            _ = stopped(&mut stop) => break Ok(()),
            _ = tx.closed() => break Ok(()), // the writer failed (e.g. a client not reading)
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => budget
                    .clone()
                    .acquire_many_owned(request_cost(cmd, req.len).min(budget_total))
                    .await
                    .map(|bytes| Held { _slot: slot, _bytes: bytes }),
                Err(e) => Err(e),
            },
        };
        let Ok(held) = permits else {
            break Ok(()); // the semaphores are never closed
        };
        let payload = if cmd == Command::Write {
            let r = tokio::select! {
                biased;
                _ = stopped(&mut stop) => break Ok(()),
                r = within(idle, read_payload(&mut rd, req.len as usize)) => r,
            };
            match r {
                Ok(Ok(buf)) => Some(buf),
                Ok(Err(e)) => break Err(e.into()),
                Err(e) => break Err(e),
            }
        } else {
            None
        };
        let job = Job { cmd, req, payload, backend: export.backend.clone(), peer };
        let tx = tx.clone();
        running.spawn(
            async move {
                let mut reply = execute(job).await;
                reply.held = Some(held);
                // If the writer is gone the reply is dropped here, and its permits with it.
                let _ = tx.send(reply).await;
            }
            .in_current_span(),
        );
    };

    // Soft disconnect, shutdown or error: every request already accepted still gets its reply.
    while let Some(done) = running.join_next().await {
        log_join(done);
    }
    ended
}

/// Read and discard `len` bytes.
async fn skip<R: AsyncRead + Unpin>(rd: &mut R, len: u64) -> std::io::Result<()> {
    let copied = tokio::io::copy(&mut rd.take(len), &mut tokio::io::sink()).await?;
    if copied < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Run one validated request on the backend and build its reply.
async fn execute(job: Job) -> Reply {
    let Job { cmd, req, payload, backend, peer } = job;
    let label = cmd.label();
    let fua = req.flags & p::CMD_FLAG_FUA != 0;
    let started = Instant::now();
    let result: Result<Option<Vec<u8>>, BackendError> = match cmd {
        Command::Read => match backend.read(req.offset, req.len).await {
            Ok(data) if data.len() == req.len as usize => Ok(Some(data)),
            Ok(data) => Err(BackendError::new(
                NbdErrno::Io,
                format!("backend returned {} bytes for a {}-byte read", data.len(), req.len),
            )),
            Err(e) => Err(e),
        },
        Command::Write => backend.write(req.offset, payload.unwrap_or_default(), fua).await.map(|()| None),
        // NO_HOLE needs nothing special: the backend always writes zeroes.
        Command::WriteZeroes => backend.write_zeroes(req.offset, req.len, fua).await.map(|()| None),
        Command::Trim => backend.trim(req.offset, req.len).await.map(|()| None),
        Command::Flush => backend.flush().await.map(|()| None),
        // Refused by validation / handled by the reader.
        Command::Disc | Command::Other(_) => Err(BackendError::new(NbdErrno::Inval, "not a data command")),
    };
    metrics::histogram!("haven_nbd_op_seconds", "op" => label).record(started.elapsed().as_secs_f64());
    match result {
        Ok(data) => {
            if matches!(cmd, Command::Read | Command::Write) {
                metrics::counter!("haven_nbd_bytes_total", "op" => label).increment(u64::from(req.len));
            }
            Reply { handle: req.handle, error: 0, data, held: None }
        }
        Err(e) => {
            warn!(
                %peer, op = label, offset = req.offset, len = req.len, errno = e.errno.code(), error = %e,
                "nbd: backend failed"
            );
            metrics::counter!("haven_nbd_errors_total", "op" => label).increment(1);
            Reply::error(req.handle, e.errno)
        }
    }
}

/// The single writer of a connection: replies in completion order, small ones batched into one
/// write, large read data written from its own buffer together with the pending headers. A
/// reply's permits (and data) are dropped only after it has been written and flushed. A client
/// that takes no reply bytes for `stall` ends the connection. Ends (after shutting down the
/// write side) when every sender is gone, or on a write error.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Reply>,
    stall: Duration,
) -> std::io::Result<()> {
    let stalled = || std::io::Error::new(std::io::ErrorKind::TimedOut, format!("client took no reply for {stall:?}"));
    let mut batch: Vec<u8> = Vec::with_capacity(DIRECT_WRITE_MIN);
    // The limits held by the replies in `batch`.
    let mut batched: Vec<Held> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(reply) = next.take() {
            let Reply { handle, error, data, held } = reply;
            batch.extend_from_slice(&p::encode_simple_reply(error, handle));
            batched.extend(held);
            match data {
                Some(data) if data.len() >= DIRECT_WRITE_MIN => {
                    tokio::time::timeout(stall, async {
                        write_all_pair(&mut wr, &batch, &data).await?;
                        wr.flush().await
                    })
                    .await
                    .map_err(|_| stalled())??;
                    batch.clear();
                    batched.clear();
                }
                Some(data) => batch.extend_from_slice(&data),
                None => {}
            }
            if batch.len() >= BATCH_FLUSH {
                tokio::time::timeout(stall, send(&mut wr, &batch)).await.map_err(|_| stalled())??;
                batch.clear();
                batched.clear();
            }
            next = rx.try_recv().ok();
        }
        if !batch.is_empty() {
            tokio::time::timeout(stall, send(&mut wr, &batch)).await.map_err(|_| stalled())??;
            batch.clear();
            batched.clear();
        }
    }
    wr.shutdown().await
}

/// Write `a` then `b` with vectored writes (usually one syscall).
async fn write_all_pair<W: AsyncWrite + Unpin>(wr: &mut W, mut a: &[u8], mut b: &[u8]) -> std::io::Result<()> {
    while !a.is_empty() || !b.is_empty() {
        let n = if a.is_empty() {
            wr.write(b).await?
        } else {
            wr.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(size: u64, block_size: u32, read_only: bool) -> ExportInfo {
        ExportInfo { size, block_size, read_only, description: String::new() }
    }

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request { flags, kind, handle: 1, offset, len }
    }

    #[test]
    fn validation_table() {
        const MIB: u64 = 1 << 20;
        let rw = info(MIB, 512, false);
        let ro = info(MIB, 512, true);
        let big = info(8 << 30, 512, false);
        let max = 64 * 1024;
        use p::*;
        use Command as C;
        use NbdErrno as E;
        let cases: Vec<(&str, &ExportInfo, Request, Result<Command, NbdErrno>)> = vec![
            ("read ok", &rw, req(CMD_READ, 0, 0, 4096), Ok(C::Read)),
            ("read last block", &rw, req(CMD_READ, 0, MIB - 512, 512), Ok(C::Read)),
            ("write fua ok", &rw, req(CMD_WRITE, CMD_FLAG_FUA, 512, 512), Ok(C::Write)),
            ("wz no_hole ok", &rw, req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, MIB as u32), Ok(C::WriteZeroes)),
            ("trim ok (beyond max payload)", &rw, req(CMD_TRIM, 0, 0, MIB as u32), Ok(C::Trim)),
            ("flush ignores offset/len", &rw, req(CMD_FLUSH, 0, 7, 3), Ok(C::Flush)),
            ("flush fua", &rw, req(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), Ok(C::Flush)),
            ("disc", &rw, req(CMD_DISC, 0, 0, 0), Ok(C::Disc)),
            ("read on ro ok", &ro, req(CMD_READ, 0, 0, 512), Ok(C::Read)),
            ("flush on ro ok", &ro, req(CMD_FLUSH, 0, 0, 0), Ok(C::Flush)),
            ("unknown command", &rw, req(99, 0, 0, 512), Err(E::Inval)),
            ("cache not advertised", &rw, req(CMD_CACHE, 0, 0, 512), Err(E::Inval)),
            ("block status not negotiated", &rw, req(CMD_BLOCK_STATUS, 0, 0, 512), Err(E::Inval)),
            ("unknown flag", &rw, req(CMD_READ, 0x100, 0, 512), Err(E::Inval)),
            ("DF not advertised", &rw, req(CMD_READ, CMD_FLAG_DF, 0, 512), Err(E::Inval)),
            ("no_hole on write", &rw, req(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 512), Err(E::Inval)),
            ("fast zero not advertised", &rw, req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512), Err(E::Inval)),
            ("write on ro", &ro, req(CMD_WRITE, 0, 0, 512), Err(E::Perm)),
            ("trim on ro", &ro, req(CMD_TRIM, 0, 0, 512), Err(E::Perm)),
            ("wz on ro", &ro, req(CMD_WRITE_ZEROES, 0, 0, 512), Err(E::Perm)),
            ("zero-length read", &rw, req(CMD_READ, 0, 0, 0), Err(E::Inval)),
            ("zero-length write", &rw, req(CMD_WRITE, 0, 0, 0), Err(E::Inval)),
            ("zero-length trim", &rw, req(CMD_TRIM, 0, 0, 0), Err(E::Inval)),
            ("read too big", &rw, req(CMD_READ, 0, 0, max + 512), Err(E::Overflow)),
            ("write too big", &rw, req(CMD_WRITE, 0, 0, max + 512), Err(E::Overflow)),
            ("unaligned offset", &rw, req(CMD_READ, 0, 1, 512), Err(E::Inval)),
            ("unaligned length", &rw, req(CMD_READ, 0, 0, 513), Err(E::Inval)),
            ("unaligned write", &rw, req(CMD_WRITE, 0, 100, 512), Err(E::Inval)),
            ("read past end", &rw, req(CMD_READ, 0, MIB, 512), Err(E::Inval)),
            ("read straddling end", &rw, req(CMD_READ, 0, MIB - 512, 1024), Err(E::Inval)),
            ("trim past end", &rw, req(CMD_TRIM, 0, MIB, 512), Err(E::Inval)),
            ("write past end", &rw, req(CMD_WRITE, 0, MIB, 512), Err(E::NoSpc)),
            ("wz past end", &rw, req(CMD_WRITE_ZEROES, 0, MIB - 512, 1024), Err(E::NoSpc)),
            ("offset overflow", &rw, req(CMD_READ, 0, u64::MAX - 511, 512), Err(E::Inval)),
            ("trim unaligned head and tail ok", &rw, req(CMD_TRIM, 0, 100, 1000), Ok(C::Trim)),
            ("trim inside one block ok", &rw, req(CMD_TRIM, 0, 1, 10), Ok(C::Trim)),
            ("trim unaligned to the end ok", &rw, req(CMD_TRIM, 0, MIB - 1, 1), Ok(C::Trim)),
            ("trim unaligned past end", &rw, req(CMD_TRIM, 0, MIB - 1, 2), Err(E::Inval)),
            ("trim unaligned overflow", &rw, req(CMD_TRIM, 0, u64::MAX - 10, 100), Err(E::Inval)),
            ("wz unaligned offset", &rw, req(CMD_WRITE_ZEROES, 0, 100, 512), Err(E::Inval)),
            ("wz unaligned length", &rw, req(CMD_WRITE_ZEROES, 0, 0, 1000), Err(E::Inval)),
            ("trim on ro unaligned", &ro, req(CMD_TRIM, 0, 1, 10), Err(E::Perm)),
            ("trim 4 GiB - 1", &big, req(CMD_TRIM, 0, 0, u32::MAX), Ok(C::Trim)),
            ("trim 4 GiB - 1 at 4 GiB", &big, req(CMD_TRIM, 0, 4 << 30, u32::MAX), Ok(C::Trim)),
            (
                "wz largest aligned",
                &big,
                req(CMD_WRITE_ZEROES, CMD_FLAG_FUA, 4 << 30, u32::MAX - 511),
                Ok(C::WriteZeroes),
            ),
            ("wz 4 GiB - 1 unaligned", &big, req(CMD_WRITE_ZEROES, 0, 0, u32::MAX), Err(E::Inval)),
            ("wz past a big end", &big, req(CMD_WRITE_ZEROES, 0, (8 << 30) - 512, 1024), Err(E::NoSpc)),
            ("read 4 GiB - 1 too big", &big, req(CMD_READ, 0, 0, u32::MAX), Err(E::Overflow)),
            ("write offset overflow", &rw, req(CMD_WRITE, 0, u64::MAX - 511, 512), Err(E::NoSpc)),
        ];
        for (what, info, request, want) in cases {
            assert_eq!(validate_request(&request, info, max), want, "{what}");
        }
    }

    #[test]
    fn zero_block_size_is_treated_as_one() {
        let odd = info(1000, 0, false);
        assert_eq!(validate_request(&req(p::CMD_READ, 0, 3, 7), &odd, 4096), Ok(Command::Read));
        assert_eq!(block_size_constraints(&odd, 4096), (1, 1, 4096));
    }

    #[test]
    fn block_size_constraints_round_max_down() {
        assert_eq!(block_size_constraints(&info(0, 4096, false), 32 << 20), (4096, 4096, 32 << 20));
        assert_eq!(block_size_constraints(&info(0, 4096, false), 10_000), (4096, 4096, 8192));
        assert_eq!(block_size_constraints(&info(0, 4096, false), 100), (4096, 4096, 4096));
    }

    #[test]
    fn flags_reflect_read_only() {
        let rw = transmission_flags(&info(0, 512, false));
        assert_eq!(rw & p::FLAG_READ_ONLY, 0);
        for f in [p::FLAG_HAS_FLAGS, p::FLAG_SEND_FLUSH, p::FLAG_SEND_FUA, p::FLAG_SEND_TRIM, p::FLAG_CAN_MULTI_CONN] {
            assert_ne!(rw & f, 0);
        }
        assert_ne!(transmission_flags(&info(0, 512, true)) & p::FLAG_READ_ONLY, 0);
    }

    #[test]
    fn info_replies_for_go() {
        let mut out = Vec::new();
        let request = p::InfoRequest { name: "disk".into(), requests: vec![p::INFO_NAME, p::INFO_BLOCK_SIZE] };
        let info = ExportInfo { size: 1 << 20, block_size: 512, read_only: false, description: "a disk".into() };
        put_info_replies(&mut out, p::OPT_GO, &request, &info, 1 << 16);
        let mut types = Vec::new();
        let mut rest = &out[..];
        while !rest.is_empty() {
            let h = p::decode_option_reply_header(rest).unwrap();
            let data = &rest[p::OPTION_REPLY_HEADER_LEN..p::OPTION_REPLY_HEADER_LEN + h.len as usize];
            assert_eq!(h.option, p::OPT_GO);
            types.push((h.reply_type, data.get(..2).map(|t| u16::from_be_bytes([t[0], t[1]]))));
            rest = &rest[p::OPTION_REPLY_HEADER_LEN + h.len as usize..];
        }
        assert_eq!(
            types,
            vec![
                (p::REP_INFO, Some(p::INFO_EXPORT)),
                (p::REP_INFO, Some(p::INFO_NAME)),
                (p::REP_INFO, Some(p::INFO_DESCRIPTION)),
                (p::REP_INFO, Some(p::INFO_BLOCK_SIZE)),
                (p::REP_ACK, None),
            ]
        );
    }

    #[test]
    fn budget_and_cost() {
        assert_eq!(byte_budget(64 << 20, 32 << 20), (64 << 20) / 4096);
        // Never less than one maximal request, nor than one unit.
        assert_eq!(byte_budget(1 << 20, 32 << 20), (32 << 20) / 4096);
        assert_eq!(byte_budget(0, 512), 1);
        assert_eq!(byte_budget(5000, 512), 2);
        assert_eq!(request_cost(Command::Read, 1), 1);
        assert_eq!(request_cost(Command::Write, 4097), 2);
        assert_eq!(request_cost(Command::Trim, u32::MAX), 1);
        assert!(request_cost(Command::Read, 32 << 20) <= byte_budget(0, 32 << 20));
    }
}
