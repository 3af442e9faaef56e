//! `transport_bench`: QUIC throughput and round-trip latency on 127.0.0.1 between an in-process
//! quinn server and client using the project's mutual-TLS configuration
//! (`TlsMaterial::quic_server_config` / `quic_client_config`, certificates issued by
//! `CertificateAuthority`, frames written with `wire::write_frame` / `wire::read_frame`).
//!
//! Two measurements:
//! - bulk: one stream carrying `--bulk-mib` MiB in `--chunk-kib` KiB writes; the receiver counts
//!   the bytes and acknowledges; throughput is bytes / (open stream -> acknowledgement).
//! - round trip: a `--msg-bytes` request and response, each as one frame, on a new bidirectional
//!   stream per exchange (as the node does for every request); p50/p99 over `--round-trips`.
//!
//! Baselines, measured in the same run on the same runtime, each over one TCP connection per bulk
//! run and one for the ping-pong (TCP_NODELAY):
//! - TCP+TLS: tokio-rustls over TCP with the same rustls configurations QUIC wraps
//!   (`TlsMaterial::tls_server_config` / `tls_client_config`: ring provider, TLS 1.3 only, mutual
//!   certificates), so both negotiate the same cipher suite; the report names it. This is the
//!   like-for-like comparison: both encrypt every byte.
//! - plain TCP (no encryption): the ceiling of the loopback stack.
//!
//! Targets: QUIC bulk >= 0.6x TCP+TLS, and >= 0.3x plain TCP. The report also shows how QUIC sent
//! (datagrams per send call, i.e. whether segmentation offload batched them; path MTU; losses).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use haven_benches::latency::Latency;
use haven_benches::report::ratio;
use haven_benches::{Cell, Report, Table, TargetCheck};
use haven_client::wire::{self, TlsMaterial, SERVER_NAME};
use haven_node::pki::CertificateAuthority;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Largest ping frame the echo servers accept.
const MAX_PING: usize = 1 << 20;
/// Target ratio of QUIC to TCP+TLS bulk throughput (both encrypted).
const TARGET_BULK_RATIO_TLS: f64 = 0.6;
/// Target ratio of QUIC to plain (unencrypted) TCP bulk throughput.
const TARGET_BULK_RATIO_PLAIN: f64 = 0.3;

#[derive(Parser, Debug)]
#[command(
    about = "QUIC (mutual TLS) vs TCP+TLS and plain TCP on loopback: bulk throughput and small-message round trips"
)]
struct Args {
    /// MiB sent per bulk run (default 256; 64 with --quick).
    #[arg(long)]
    bulk_mib: Option<u64>,
    /// Size of each write on the bulk stream, in KiB.
    #[arg(long, default_value_t = 1024)]
    chunk_kib: usize,
    /// Bulk runs per transport; the median is reported (default 3).
    #[arg(long, default_value_t = 3)]
    bulk_runs: usize,
    /// Timed round trips per transport (default 10000; 2000 with --quick).
    #[arg(long)]
    round_trips: Option<usize>,
    /// Untimed round trips before timing starts.
    #[arg(long, default_value_t = 500)]
    warmup: usize,
    /// Request and response size in bytes for the round-trip test.
    #[arg(long, default_value_t = 64)]
    msg_bytes: usize,
    #[command(flatten)]
    run: haven_benches::report::RunFlags,
}

struct BulkResult {
    /// MiB/s of each run, sorted.
    runs: Vec<f64>,
}

impl BulkResult {
    fn median(&self) -> f64 {
        self.runs.get(self.runs.len() / 2).copied().unwrap_or(f64::NAN)
    }

    fn best(&self) -> f64 {
        self.runs.last().copied().unwrap_or(f64::NAN)
    }
}

fn mib_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / took.as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// QUIC

/// TLS material for an in-process server and client, signed by a fresh CA in `dir`.
fn tls_pair(dir: &std::path::Path) -> anyhow::Result<(TlsMaterial, TlsMaterial)> {
    let ca = CertificateAuthority::load_or_create(&dir.join("ca"))?;
    let material = |id: u64| -> anyhow::Result<TlsMaterial> {
        let (cert, key) = ca.issue_node(haven_client::proto::NodeId(id), 1)?;
        Ok(TlsMaterial {
            ca_pem: ca.cert_pem().as_bytes().to_vec(),
            cert_pem: cert.into_bytes(),
            key_pem: key.into_bytes(),
        })
    };
    Ok((material(1)?, material(2)?))
}

/// Bind a QUIC server on 127.0.0.1 that runs `serve_stream` for every bidirectional stream.
fn quic_server<F, Fut>(tls: &TlsMaterial, serve_stream: F) -> anyhow::Result<(quinn::Endpoint, SocketAddr)>
where
    F: Fn(quinn::SendStream, quinn::RecvStream) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let socket = wire::bind_udp("127.0.0.1:0".parse()?)?;
    let endpoint = quinn::Endpoint::new(
        wire::endpoint_config(),
        Some(tls.quic_server_config()?),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    let addr = endpoint.local_addr()?;
    let accept = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            let serve_stream = serve_stream.clone();
            tokio::spawn(async move {
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => return eprintln!("transport_bench: QUIC handshake failed: {e}"),
                };
                while let Ok((send, recv)) = conn.accept_bi().await {
                    let serve_stream = serve_stream.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_stream(send, recv).await {
                            eprintln!("transport_bench: QUIC stream failed: {e:#}");
                        }
                    });
                }
            });
        }
    });
    Ok((endpoint, addr))
}

/// Bulk sink: count every byte until the peer finishes, then answer with the count.
async fn quic_sink(mut send: quinn::SendStream, mut recv: quinn::RecvStream) -> anyhow::Result<()> {
    let mut total: u64 = 0;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        total += chunk.bytes.len() as u64;
    }
    send.write_all(&total.to_be_bytes()).await?;
    send.finish()?;
    Ok(())
}

/// Echo: read one frame and send it back as one frame.
async fn quic_echo(mut send: quinn::SendStream, mut recv: quinn::RecvStream) -> anyhow::Result<()> {
    let frame = wire::read_frame(&mut recv, MAX_PING).await?;
    wire::write_frame(&mut send, &frame).await?;
    send.finish()?;
    Ok(())
}

async fn quic_connect(client: &quinn::Endpoint, addr: SocketAddr) -> anyhow::Result<quinn::Connection> {
    client.connect(addr, SERVER_NAME)?.await.with_context(|| format!("QUIC handshake with {addr}"))
}

async fn quic_bulk_once(conn: &quinn::Connection, total: u64, chunk: &[u8]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut sent = 0u64;
    while sent < total {
        let n = (total - sent).min(chunk.len() as u64) as usize;
        send.write_all(&chunk[..n]).await?;
        sent += n as u64;
    }
    send.finish()?;
    let mut ack = [0u8; 8];
    recv.read_exact(&mut ack).await.context("reading the bulk acknowledgement")?;
    let took = start.elapsed();
    let got = u64::from_be_bytes(ack);
    anyhow::ensure!(got == total, "QUIC sink received {got} bytes, sent {total}");
    Ok(took)
}

async fn quic_round_trip(conn: &quinn::Connection, msg: &[u8]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await?;
    wire::write_frame(&mut send, msg).await?;
    send.finish()?;
    let reply = wire::read_frame(&mut recv, MAX_PING).await?;
    let took = start.elapsed();
    anyhow::ensure!(reply.len() == msg.len(), "QUIC echo returned {} bytes, sent {}", reply.len(), msg.len());
    Ok(took)
}

// ---------------------------------------------------------------------------------------------
// TCP and TCP+TLS

/// How a TCP baseline connects: plain, or TLS over TCP with the QUIC configurations' rustls.
#[derive(Clone)]
enum Tcp {
    Plain,
    Tls { acceptor: TlsAcceptor, connector: TlsConnector },
}

/// A client's TCP baseline stream, plain or TLS.
trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}

impl Tcp {
    fn tls(server: &TlsMaterial, client: &TlsMaterial) -> anyhow::Result<Self> {
        Ok(Self::Tls {
            acceptor: TlsAcceptor::from(Arc::new(server.tls_server_config()?)),
            connector: TlsConnector::from(Arc::new(client.tls_client_config()?)),
        })
    }

    async fn accept(&self, tcp: TcpStream) -> anyhow::Result<Box<dyn Duplex>> {
        tcp.set_nodelay(true)?;
        Ok(match self {
            Self::Plain => Box::new(tcp),
            Self::Tls { acceptor, .. } => Box::new(acceptor.accept(tcp).await.context("TLS accept")?),
        })
    }

    /// Connect and, for TLS, finish the handshake; returns the negotiated cipher suite.
    async fn connect(&self, addr: SocketAddr) -> anyhow::Result<(Box<dyn Duplex>, Option<String>)> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        Ok(match self {
            Self::Plain => (Box::new(tcp), None),
            Self::Tls { connector, .. } => {
                let name = rustls::pki_types::ServerName::try_from(SERVER_NAME)?;
                let tls = connector.connect(name, tcp).await.context("TLS handshake")?;
                let suite = tls.get_ref().1.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite()));
                (Box::new(tls), suite)
            }
        })
    }
}

/// Accept TCP connections on 127.0.0.1 and run `serve` on each (after the TLS handshake, for
/// TLS).
async fn tcp_server<F, Fut>(tcp: Tcp, serve: F) -> anyhow::Result<SocketAddr>
where
    F: Fn(Box<dyn Duplex>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (tcp, serve) = (tcp.clone(), serve.clone());
            tokio::spawn(async move {
                let served = async { serve(tcp.accept(stream).await?).await };
                if let Err(e) = served.await {
                    eprintln!("transport_bench: TCP connection failed: {e:#}");
                }
            });
        }
    });
    Ok(addr)
}

/// Bulk sink: count bytes until the peer shuts down its write side, then answer with the count.
async fn tcp_sink(mut stream: Box<dyn Duplex>) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total: u64 = 0;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    stream.write_all(&total.to_be_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

/// Echo length-prefixed frames until the peer closes.
async fn tcp_echo(mut stream: Box<dyn Duplex>) -> anyhow::Result<()> {
    let mut buf = vec![0u8; MAX_PING];
    loop {
        let mut header = [0u8; 4];
        match stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_be_bytes(header) as usize;
        anyhow::ensure!(len <= MAX_PING, "TCP echo: frame of {len} bytes exceeds {MAX_PING}");
        stream.read_exact(&mut buf[..len]).await?;
        // One write for header and body, like a framed transport with a write buffer.
        let mut out = Vec::with_capacity(4 + len);
        out.extend_from_slice(&header);
        out.extend_from_slice(&buf[..len]);
        stream.write_all(&out).await?;
        stream.flush().await?;
    }
}

/// One bulk run on a connection made (and, for TLS, handshaken) before the clock starts, as the
/// QUIC run uses an established connection. Returns the time and the negotiated cipher suite.
async fn tcp_bulk_once(
    tcp: &Tcp,
    addr: SocketAddr,
    total: u64,
    chunk: &[u8],
) -> anyhow::Result<(Duration, Option<String>)> {
    let (mut stream, suite) = tcp.connect(addr).await?;
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let n = (total - sent).min(chunk.len() as u64) as usize;
        stream.write_all(&chunk[..n]).await?;
        sent += n as u64;
    }
    stream.shutdown().await?;
    let mut ack = [0u8; 8];
    stream.read_exact(&mut ack).await.context("reading the bulk acknowledgement")?;
    let took = start.elapsed();
    let got = u64::from_be_bytes(ack);
    anyhow::ensure!(got == total, "TCP sink received {got} bytes, sent {total}");
    Ok((took, suite))
}

async fn tcp_round_trip(stream: &mut Box<dyn Duplex>, msg: &[u8], reply: &mut [u8]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut out = Vec::with_capacity(4 + msg.len());
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(msg);
    stream.write_all(&out).await?;
    stream.flush().await?;
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let len = u32::from_be_bytes(header) as usize;
    anyhow::ensure!(len == msg.len() && len <= reply.len(), "TCP echo returned a {len}-byte frame");
    stream.read_exact(&mut reply[..len]).await?;
    Ok(start.elapsed())
}

// ---------------------------------------------------------------------------------------------

/// The transports compared, in column order.
const TRANSPORTS: [&str; 3] = ["QUIC", "TCP+TLS", "TCP"];
const QUIC: usize = 0;
const TLS: usize = 1;
const PLAIN: usize = 2;

/// One transport's figures.
struct Measured {
    bulk: BulkResult,
    rtt: Latency,
    rtt_wall: Duration,
}

/// How QUIC put the bulk bytes on the wire: the sending connection's statistics, and the UDP
/// datagrams the kernel dropped for want of socket receive buffer meanwhile (machine-wide).
struct QuicWire {
    tx_datagrams: u64,
    tx_sends: u64,
    mtu: u16,
    lost_packets: u64,
    congestion_events: u64,
    rcvbuf_drops: Option<u64>,
}

impl QuicWire {
    fn read(sender: &quinn::Connection, rcvbuf_drops: Option<u64>) -> Self {
        let tx = sender.stats();
        Self {
            tx_datagrams: tx.udp_tx.datagrams,
            tx_sends: tx.udp_tx.ios,
            mtu: tx.path.current_mtu,
            lost_packets: tx.path.lost_packets,
            congestion_events: tx.path.congestion_events,
            rcvbuf_drops,
        }
    }
}

/// Linux's count of UDP datagrams dropped because a socket's receive buffer was full
/// (`RcvbufErrors` in /proc/net/snmp); `None` where it cannot be read.
fn udp_rcvbuf_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let column = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(column)?.parse().ok()
}

struct Figures {
    measured: [Measured; 3],
    /// The cipher suite the TCP+TLS baseline negotiated.
    tls_suite: Option<String>,
    quic_wire: QuicWire,
}

/// The three transports' servers and client connections.
struct Setup {
    quic: quinn::Endpoint,
    quic_bulk: quinn::Connection,
    quic_echo: quinn::Connection,
    tcp: [Tcp; 2],
    sinks: [SocketAddr; 2],
    echoes: [SocketAddr; 2],
    _servers: [quinn::Endpoint; 2],
    _scratch: tempfile::TempDir,
}

async fn setup() -> anyhow::Result<Setup> {
    let scratch = tempfile::Builder::new().prefix("haven-transport-bench").tempdir()?;
    let (server_tls, client_tls) = tls_pair(scratch.path())?;
    let (sink_ep, sink_addr) = quic_server(&server_tls, quic_sink)?;
    let (echo_ep, echo_addr) = quic_server(&server_tls, quic_echo)?;
    let quic = wire::client_endpoint(&client_tls)?;
    let quic_bulk = quic_connect(&quic, sink_addr).await?;
    let quic_echo = quic_connect(&quic, echo_addr).await?;
    let tcp = [Tcp::tls(&server_tls, &client_tls)?, Tcp::Plain];
    let sinks = [tcp_server(tcp[0].clone(), tcp_sink).await?, tcp_server(tcp[1].clone(), tcp_sink).await?];
    let echoes = [tcp_server(tcp[0].clone(), tcp_echo).await?, tcp_server(tcp[1].clone(), tcp_echo).await?];
    Ok(Setup { quic, quic_bulk, quic_echo, tcp, sinks, echoes, _servers: [sink_ep, echo_ep], _scratch: scratch })
}

/// Bulk runs, transports alternating run by run so all see the same machine conditions. The
/// first (unreported) run of each warms windows and allocators. Returns MiB/s per transport and
/// the TLS cipher suite.
async fn bulk(s: &Setup, runs: usize, bytes: u64, chunk: &[u8]) -> anyhow::Result<([BulkResult; 3], Option<String>)> {
    let warm = bytes.min(16 << 20);
    quic_bulk_once(&s.quic_bulk, warm, chunk).await?;
    for (tcp, sink) in s.tcp.iter().zip(s.sinks) {
        tcp_bulk_once(tcp, sink, warm, chunk).await?;
    }
    let mut rates: [Vec<f64>; 3] = Default::default();
    let mut suite = None;
    for run in 1..=runs {
        rates[QUIC].push(mib_per_s(bytes, quic_bulk_once(&s.quic_bulk, bytes, chunk).await?));
        for (k, (tcp, sink)) in [TLS, PLAIN].into_iter().zip(s.tcp.iter().zip(s.sinks)) {
            let (took, negotiated) = tcp_bulk_once(tcp, sink, bytes, chunk).await?;
            suite = suite.or(negotiated);
            rates[k].push(mib_per_s(bytes, took));
        }
        let last = |k: usize| rates[k].last().copied().unwrap_or(f64::NAN);
        eprintln!(
            "transport_bench: bulk run {run}/{runs}: QUIC {:.0}, TCP+TLS {:.0}, TCP {:.0} MiB/s",
            last(QUIC),
            last(TLS),
            last(PLAIN)
        );
    }
    Ok((
        rates.map(|mut runs| {
            runs.sort_by(f64::total_cmp);
            BulkResult { runs }
        }),
        suite,
    ))
}

/// Round trips: warm-up on every transport, then each timed in turn. Returns the latencies and
/// the wall time of each transport's timed loop.
async fn round_trips(s: &Setup, warmup: usize, count: usize, msg: &[u8]) -> anyhow::Result<[(Latency, Duration); 3]> {
    let mut reply = vec![0u8; msg.len()];
    let mut streams = Vec::new();
    for (tcp, echo) in s.tcp.iter().zip(s.echoes) {
        streams.push(tcp.connect(echo).await?.0);
    }
    for _ in 0..warmup {
        quic_round_trip(&s.quic_echo, msg).await?;
        for stream in &mut streams {
            tcp_round_trip(stream, msg, &mut reply).await?;
        }
    }
    eprintln!("transport_bench: timing {count} round trips per transport ...");
    let (mut quic, start) = (Latency::new(), Instant::now());
    for _ in 0..count {
        quic.record(quic_round_trip(&s.quic_echo, msg).await?);
    }
    let mut out = vec![(quic, start.elapsed())];
    for stream in &mut streams {
        let (mut lat, start) = (Latency::new(), Instant::now());
        for _ in 0..count {
            lat.record(tcp_round_trip(stream, msg, &mut reply).await?);
        }
        out.push((lat, start.elapsed()));
    }
    out.try_into().map_err(|_| anyhow::anyhow!("three transports"))
}

async fn run(args: &Args, bulk_bytes: u64, count: usize) -> anyhow::Result<Figures> {
    let s = setup().await?;
    let chunk: Vec<u8> = (0..args.chunk_kib.max(1) * 1024).map(|i| (i % 251) as u8).collect();
    let drops_before = udp_rcvbuf_errors();
    let (bulk, tls_suite) = bulk(&s, args.bulk_runs.max(1), bulk_bytes, &chunk).await?;
    let drops = udp_rcvbuf_errors().zip(drops_before).map(|(after, before)| after.saturating_sub(before));
    let quic_wire = QuicWire::read(&s.quic_bulk, drops);
    let msg: Vec<u8> = (0..args.msg_bytes.max(1)).map(|i| i as u8).collect();
    let rtts = round_trips(&s, args.warmup, count, &msg).await?;
    s.quic_bulk.close(0u32.into(), b"done");
    s.quic_echo.close(0u32.into(), b"done");
    s.quic.wait_idle().await;
    let mut rtts = rtts.into_iter();
    let measured = bulk.map(|bulk| {
        let (rtt, rtt_wall) = rtts.next().expect("one per transport");
        Measured { bulk, rtt, rtt_wall }
    });
    Ok(Figures { measured, tls_suite, quic_wire })
}

/// A table row: the metric, then each transport's value, then QUIC's ratio to each baseline.
fn row(t: &mut Table, metric: String, values: [f64; 3], decimals: usize) {
    let mut cells = vec![Cell::text(metric)];
    cells.extend(values.iter().map(|v| Cell::num(*v, decimals)));
    cells.push(Cell::ratio(ratio(values[QUIC], values[TLS])));
    cells.push(Cell::ratio(ratio(values[QUIC], values[PLAIN])));
    t.row(cells);
}

fn transport_table(args: &Args, bulk_mib: u64, f: &Figures) -> Table {
    let mut t = Table::new(
        "Loopback transport: QUIC (measured) beside TCP+TLS and plain TCP (baselines)",
        &["metric", TRANSPORTS[QUIC], TRANSPORTS[TLS], TRANSPORTS[PLAIN], "QUIC/TCP+TLS", "QUIC/TCP"],
    );
    let m = &f.measured;
    let bulk_label = format!("bulk MiB/s, 1 stream, {bulk_mib} MiB in {} KiB writes", args.chunk_kib);
    row(&mut t, format!("{bulk_label} (median)"), [0, 1, 2].map(|k| m[k].bulk.median()), 0);
    row(&mut t, format!("{bulk_label} (best)"), [0, 1, 2].map(|k| m[k].bulk.best()), 0);
    let sums = [0, 1, 2].map(|k| m[k].rtt.summary());
    let rt = format!("{} B round trip", args.msg_bytes);
    row(&mut t, format!("{rt} p50 us (QUIC: new stream each)"), [0, 1, 2].map(|k| sums[k].p50_us()), 1);
    row(&mut t, format!("{rt} p99 us"), [0, 1, 2].map(|k| sums[k].p99_us()), 1);
    row(&mut t, format!("{rt} max us"), [0, 1, 2].map(|k| sums[k].max_ms * 1e3), 1);
    let per_s = [0, 1, 2].map(|k| sums[k].count as f64 / m[k].rtt_wall.as_secs_f64());
    row(&mut t, format!("{rt}s per second (one at a time)"), per_s, 0);
    t
}

fn quic_wire_table(w: &QuicWire) -> Table {
    let mut t = Table::new("QUIC on the wire during the bulk runs (connection statistics)", &["metric", "value"]);
    let per = |a: u64, b: u64| if b == 0 { f64::NAN } else { a as f64 / b as f64 };
    let rows = [
        ("sender: UDP datagrams", Cell::int(w.tx_datagrams)),
        ("sender: datagrams per send call (GSO batching when > 1)", Cell::num(per(w.tx_datagrams, w.tx_sends), 1)),
        ("path MTU, bytes", Cell::int(u64::from(w.mtu))),
        ("packets declared lost", Cell::int(w.lost_packets)),
        ("congestion events", Cell::int(w.congestion_events)),
        (
            "UDP datagrams the kernel dropped, receive buffer full (all bulk runs)",
            Cell::opt(w.rcvbuf_drops.map(|d| d as f64), 0),
        ),
    ];
    for (metric, value) in rows {
        t.row(vec![Cell::text(metric), value]);
    }
    t
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bulk_mib = args.bulk_mib.unwrap_or(if args.run.quick { 64 } else { 256 }).max(1);
    let round_trips = args.round_trips.unwrap_or(if args.run.quick { 2_000 } else { 10_000 }).max(1);
    let f = run(&args, bulk_mib << 20, round_trips).await?;

    let mut report = Report::new(
        "transport_bench",
        "QUIC with the project's mutual-TLS config vs TCP+TLS (same rustls config) and plain TCP, all on 127.0.0.1 \
         in one process",
    );
    report.param("bulk_mib", bulk_mib);
    report.param("chunk_kib", args.chunk_kib as u64);
    report.param("bulk_runs", args.bulk_runs.max(1) as u64);
    report.param("round_trips", round_trips as u64);
    report.param("msg_bytes", args.msg_bytes as u64);
    report.param("tls_cipher_suite", f.tls_suite.clone().unwrap_or_else(|| "unknown".into()));
    report.tables.push(transport_table(&args, bulk_mib, &f));
    report.tables.push(quic_wire_table(&f.quic_wire));
    let median = |k: usize| f.measured[k].bulk.median();
    report.targets.push(TargetCheck::at_least(
        "QUIC bulk throughput / TCP+TLS bulk throughput (median)",
        ratio(median(QUIC), median(TLS)),
        TARGET_BULK_RATIO_TLS,
        "x",
        2,
    ));
    report.targets.push(TargetCheck::at_least(
        "QUIC bulk throughput / plain TCP bulk throughput (median)",
        ratio(median(QUIC), median(PLAIN)),
        TARGET_BULK_RATIO_PLAIN,
        "x",
        2,
    ));
    report.note(
        "QUIC and TCP+TLS both run TLS 1.3 with ring and client certificates, from the same rustls configurations \
         (QUIC wraps them), so they negotiate the same cipher suite (tls_cipher_suite above); plain TCP is \
         unencrypted. Server and client share one Tokio runtime; a TCP connection (and its TLS handshake) is made \
         before its bulk run's clock starts, as QUIC's bulk stream uses an established connection.",
    );
    std::process::exit(report.print(args.run.json, args.run.enforce_targets));
}
