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
//! Baseline, measured in the same run on the same runtime: plain TCP on loopback (no TLS), bulk
//! over one connection, and a length-prefixed ping-pong over one connection with TCP_NODELAY.
//! The report gives QUIC/TCP ratios; the target is QUIC bulk >= 0.3x TCP.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use haven_benches::latency::Latency;
use haven_benches::report::ratio;
use haven_benches::{Cell, Report, Table, TargetCheck};
use haven_client::wire::{self, TlsMaterial, SERVER_NAME};
use haven_node::pki::CertificateAuthority;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest ping frame the echo servers accept.
const MAX_PING: usize = 1 << 20;
/// Target ratio of QUIC to TCP bulk throughput.
const TARGET_BULK_RATIO: f64 = 0.3;

#[derive(Parser, Debug)]
#[command(about = "QUIC (mutual TLS) vs plain TCP on loopback: bulk throughput and small-message round trips")]
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
    let endpoint = quinn::Endpoint::server(tls.quic_server_config()?, "127.0.0.1:0".parse()?)?;
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
// TCP

/// Accept TCP connections on 127.0.0.1 and run `serve` on each.
async fn tcp_server<F, Fut>(serve: F) -> anyhow::Result<SocketAddr>
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let fut = serve(stream);
            tokio::spawn(async move {
                if let Err(e) = fut.await {
                    eprintln!("transport_bench: TCP connection failed: {e:#}");
                }
            });
        }
    });
    Ok(addr)
}

/// Bulk sink: count bytes until the peer shuts down its write side, answer with the count, and
/// repeat (one connection carries every run).
async fn tcp_sink(mut stream: TcpStream) -> anyhow::Result<()> {
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
async fn tcp_echo(mut stream: TcpStream) -> anyhow::Result<()> {
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
    }
}

async fn tcp_bulk_once(addr: SocketAddr, total: u64, chunk: &[u8]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
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
    Ok(took)
}

async fn tcp_round_trip(stream: &mut TcpStream, msg: &[u8], reply: &mut [u8]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut out = Vec::with_capacity(4 + msg.len());
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(msg);
    stream.write_all(&out).await?;
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let len = u32::from_be_bytes(header) as usize;
    anyhow::ensure!(len == msg.len() && len <= reply.len(), "TCP echo returned a {len}-byte frame");
    stream.read_exact(&mut reply[..len]).await?;
    Ok(start.elapsed())
}

// ---------------------------------------------------------------------------------------------

struct Figures {
    quic_bulk: BulkResult,
    tcp_bulk: BulkResult,
    quic_rtt: Latency,
    tcp_rtt: Latency,
    quic_rtt_wall: Duration,
    tcp_rtt_wall: Duration,
}

async fn run(args: &Args, bulk_bytes: u64, round_trips: usize) -> anyhow::Result<Figures> {
    let scratch = tempfile::Builder::new().prefix("haven-transport-bench").tempdir()?;
    let (server_tls, client_tls) = tls_pair(scratch.path())?;
    let (_sink_ep, sink_addr) = quic_server(&server_tls, quic_sink)?;
    let (_echo_ep, echo_addr) = quic_server(&server_tls, quic_echo)?;
    let client = wire::client_endpoint(&client_tls)?;
    let bulk_conn = quic_connect(&client, sink_addr).await?;
    let echo_conn = quic_connect(&client, echo_addr).await?;
    let tcp_sink_addr = tcp_server(tcp_sink).await?;
    let tcp_echo_addr = tcp_server(tcp_echo).await?;

    let chunk: Vec<u8> = (0..args.chunk_kib.max(1) * 1024).map(|i| (i % 251) as u8).collect();
    let runs = args.bulk_runs.max(1);

    // Bulk: alternate transports run by run so both see the same machine conditions. The first
    // (unreported) run of each warms windows and allocators.
    let warm = bulk_bytes.min(16 << 20);
    quic_bulk_once(&bulk_conn, warm, &chunk).await?;
    tcp_bulk_once(tcp_sink_addr, warm, &chunk).await?;
    let (mut quic_runs, mut tcp_runs) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        let q = quic_bulk_once(&bulk_conn, bulk_bytes, &chunk).await?;
        let t = tcp_bulk_once(tcp_sink_addr, bulk_bytes, &chunk).await?;
        eprintln!(
            "transport_bench: bulk run {run}/{runs}: QUIC {:.0} MiB/s, TCP {:.0} MiB/s",
            mib_per_s(bulk_bytes, q),
            mib_per_s(bulk_bytes, t)
        );
        quic_runs.push(mib_per_s(bulk_bytes, q));
        tcp_runs.push(mib_per_s(bulk_bytes, t));
    }
    quic_runs.sort_by(f64::total_cmp);
    tcp_runs.sort_by(f64::total_cmp);

    // Round trips.
    let msg: Vec<u8> = (0..args.msg_bytes.max(1)).map(|i| i as u8).collect();
    let mut reply = vec![0u8; msg.len()];
    let mut tcp = TcpStream::connect(tcp_echo_addr).await?;
    tcp.set_nodelay(true)?;
    for _ in 0..args.warmup {
        quic_round_trip(&echo_conn, &msg).await?;
        tcp_round_trip(&mut tcp, &msg, &mut reply).await?;
    }
    eprintln!("transport_bench: timing {round_trips} round trips per transport ...");
    let mut quic_rtt = Latency::new();
    let start = Instant::now();
    for _ in 0..round_trips {
        quic_rtt.record(quic_round_trip(&echo_conn, &msg).await?);
    }
    let quic_rtt_wall = start.elapsed();
    let mut tcp_rtt = Latency::new();
    let start = Instant::now();
    for _ in 0..round_trips {
        tcp_rtt.record(tcp_round_trip(&mut tcp, &msg, &mut reply).await?);
    }
    let tcp_rtt_wall = start.elapsed();

    bulk_conn.close(0u32.into(), b"done");
    echo_conn.close(0u32.into(), b"done");
    client.wait_idle().await;
    Ok(Figures {
        quic_bulk: BulkResult { runs: quic_runs },
        tcp_bulk: BulkResult { runs: tcp_runs },
        quic_rtt,
        tcp_rtt,
        quic_rtt_wall,
        tcp_rtt_wall,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bulk_mib = args.bulk_mib.unwrap_or(if args.run.quick { 64 } else { 256 }).max(1);
    let round_trips = args.round_trips.unwrap_or(if args.run.quick { 2_000 } else { 10_000 }).max(1);
    let f = run(&args, bulk_mib << 20, round_trips).await?;

    let mut report = Report::new(
        "transport_bench",
        "QUIC with the project's mutual-TLS config vs plain TCP, both on 127.0.0.1 in one process",
    );
    report.param("bulk_mib", bulk_mib);
    report.param("chunk_kib", args.chunk_kib as u64);
    report.param("bulk_runs", args.bulk_runs.max(1) as u64);
    report.param("round_trips", round_trips as u64);
    report.param("msg_bytes", args.msg_bytes as u64);

    let mut t =
        Table::new("Loopback transport: QUIC (measured) beside TCP (baseline)", &["metric", "QUIC", "TCP", "QUIC/TCP"]);
    let bulk_label = format!("bulk MiB/s, 1 stream, {bulk_mib} MiB in {} KiB writes", args.chunk_kib);
    t.row(vec![
        Cell::text(format!("{bulk_label} (median)")),
        Cell::num(f.quic_bulk.median(), 0),
        Cell::num(f.tcp_bulk.median(), 0),
        Cell::ratio(ratio(f.quic_bulk.median(), f.tcp_bulk.median())),
    ]);
    t.row(vec![
        Cell::text(format!("{bulk_label} (best)")),
        Cell::num(f.quic_bulk.best(), 0),
        Cell::num(f.tcp_bulk.best(), 0),
        Cell::ratio(ratio(f.quic_bulk.best(), f.tcp_bulk.best())),
    ]);
    let (q, tc) = (f.quic_rtt.summary(), f.tcp_rtt.summary());
    let rt = format!("{} B round trip", args.msg_bytes);
    t.row(vec![
        Cell::text(format!("{rt} p50 us (QUIC: new stream each)")),
        Cell::num(q.p50_us(), 1),
        Cell::num(tc.p50_us(), 1),
        Cell::ratio(ratio(q.p50_ms, tc.p50_ms)),
    ]);
    t.row(vec![
        Cell::text(format!("{rt} p99 us")),
        Cell::num(q.p99_us(), 1),
        Cell::num(tc.p99_us(), 1),
        Cell::ratio(ratio(q.p99_ms, tc.p99_ms)),
    ]);
    t.row(vec![
        Cell::text(format!("{rt} max us")),
        Cell::num(q.max_ms * 1e3, 1),
        Cell::num(tc.max_ms * 1e3, 1),
        Cell::ratio(ratio(q.max_ms, tc.max_ms)),
    ]);
    let per_s = |n: u64, wall: Duration| n as f64 / wall.as_secs_f64();
    let (qps, tps) = (per_s(q.count, f.quic_rtt_wall), per_s(tc.count, f.tcp_rtt_wall));
    t.row(vec![
        Cell::text(format!("{rt}s per second (one at a time)")),
        Cell::num(qps, 0),
        Cell::num(tps, 0),
        Cell::ratio(ratio(qps, tps)),
    ]);
    report.tables.push(t);
    report.targets.push(TargetCheck::at_least(
        "QUIC bulk throughput / TCP bulk throughput (median)",
        ratio(f.quic_bulk.median(), f.tcp_bulk.median()),
        TARGET_BULK_RATIO,
        "x",
        2,
    ));
    report.note(
        "QUIC runs TLS 1.3 (ring) with client certificates; the TCP baseline is unencrypted, so the ratio includes \
         the cost of encryption as well as of the QUIC stack. Server and client share one Tokio runtime.",
    );
    std::process::exit(report.print(args.run.json, args.run.enforce_targets));
}
