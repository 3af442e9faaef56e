//! `migration_bench`: Haven's pre-copy live migration (`haven_node::vm::migration`) between two
//! simulated guests in this process, over a real loopback TCP connection (a `TcpListener` on
//! 127.0.0.1 and a `TcpStream`), with baselines measured in the same run:
//!
//! 1. link: bytes pushed through the same kind of loopback TCP pair, paced like the migrations to
//!    `--link-cap-mib` (128 MiB/s, a ~1 Gbit/s link; 0 = raw loopback, which a simulated guest
//!    cannot dirty memory fast enough to stress) — the link rate every dirty rate below is a
//!    fraction of;
//! 2. pre-copy: a guest (`--memory-mib`, 1024; 256 with --quick) about half of whose pages hold
//!    data, its workload dirtying pages uniformly at `--rates` percent of the link rate
//!    (0,10,30,50,80), migrated with max downtime 50 ms and auto-converge on, `--runs` times per
//!    rate (3; 1 with --quick): downtime (source paused -> destination Ready), total time, bytes
//!    sent / memory, rounds, max throttle, and whether the destination passes `check_memory` once
//!    started;
//! 3. baseline: stop-and-copy of the same guest (paused first, then the whole memory through the
//!    same engine and stream; downtime = pause -> Ready);
//! 4. non-convergence detection: auto-converge off, a workload dirtying memory faster than the
//!    link copies it (`--nc-rate-pct`, 200 % of the link): rounds and seconds until the engine
//!    gives up with `NotConverging`;
//! 5. progress: every `MigrationProgress` update the source published that the watcher saw;
//!    whether `bytes_sent` ever went backwards.
//!
//! A migration that fails prints what failed and the run goes on (exit status 1 at the end).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use haven_benches::latency::{max_of, quantile};
use haven_benches::report::ratio;
use haven_benches::{Cell, Report, Table, TargetCheck};
use haven_node::vm::guest::{GuestDriver, GuestSpec, SimulatedGuest, WorkloadPattern, PAGE_SIZE};
use haven_node::vm::link::RateLimited;
use haven_node::vm::migration::{
    migrate_destination, migrate_source, predict, CancelToken, MigrationConfig, MigrationError, MigrationProgress,
    Phase, SourceOutcome,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const MIB: u64 = 1 << 20;
/// Downtime p99 at 30 % of the link rate.
const TARGET_DOWNTIME_MS: f64 = 50.0;
const TARGET_DOWNTIME_PCT: u32 = 30;
/// Bytes sent / memory size at 50 % of the link rate.
const TARGET_SENT_RATIO: f64 = 1.3;
const TARGET_SENT_PCT: u32 = 50;
/// Non-convergence detected within this many rounds or seconds.
const TARGET_NC_ROUNDS: u32 = 3;
const TARGET_NC_SECS: f64 = 5.0;
/// How long the destination runs before `check_memory`.
const DEST_RUN: Duration = Duration::from_millis(20);
/// How long the source's workload runs before the migration starts (its rate settles).
const WARMUP: Duration = Duration::from_millis(200);

#[derive(Parser, Debug)]
#[command(about = "Pre-copy live migration over loopback TCP: downtime, bytes, rounds vs stop-and-copy")]
struct Args {
    /// Guest memory in MiB (default 1024; 256 with --quick).
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Dirty rates as percent of the measured link rate, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "0,10,30,50,80")]
    rates: Vec<u32>,
    /// Migrations per rate, and stop-and-copy runs (default 3; 1 with --quick).
    #[arg(long)]
    runs: Option<usize>,
    /// MiB pushed through loopback TCP to measure the link rate (default 512; 256 with --quick).
    #[arg(long)]
    link_mib: Option<u64>,
    /// Longest acceptable pause for the pre-copy migrations, ms.
    #[arg(long, default_value_t = 50)]
    max_downtime_ms: u64,
    /// Fraction of pages written before the migration (uniformly placed writes).
    #[arg(long, default_value_t = 0.5)]
    fill: f64,
    /// Model a link of this many MiB/s by pacing the loopback stream (the engine's
    /// `max_bandwidth_bytes_per_sec`); 0 = raw loopback. The default, a ~1 Gbit/s link, keeps the
    /// guest's achievable dirty rate above 80 % of the link so every row means what it says.
    #[arg(long, default_value_t = 128)]
    link_cap_mib: u64,
    /// Dirty rate (percent of the link) of the non-convergence run. Uniform writes repeat pages,
    /// so the rate of *distinct* pages dirtied stays below the link until well above 100 %.
    #[arg(long, default_value_t = 200)]
    nc_rate_pct: u32,
    #[command(flatten)]
    run: haven_benches::report::RunFlags,
}

/// A connected loopback TCP pair (client side, server side), Nagle off.
async fn tcp_pair() -> anyhow::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").await.context("binding 127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let client = client.context("connecting to the loopback listener")?;
    let (server, _) = accepted.context("accepting the loopback connection")?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    Ok((client, server))
}

/// Bytes per second through one loopback TCP connection: `bytes` in 1 MiB writes, the reader
/// counts them; timed from the first write until the reader has everything.
async fn link_rate(bytes: u64, cap: u64) -> anyhow::Result<(f64, Duration)> {
    let (tx, mut rx) = tcp_pair().await?;
    // The same pacing the engine applies to a capped migration.
    let mut tx: Box<dyn tokio::io::AsyncWrite + Unpin + Send> =
        if cap > 0 { Box::new(RateLimited::new(tx, cap)) } else { Box::new(tx) };
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; MIB as usize];
        let mut got = 0u64;
        while got < bytes {
            let n = rx.read(&mut buf).await?;
            if n == 0 {
                anyhow::bail!("stream ended after {got} of {bytes} bytes");
            }
            got += n as u64;
        }
        Ok(())
    });
    let chunk: Vec<u8> = (0..MIB).map(|i| (i * 31 + 7) as u8).collect();
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(MIB) as usize;
        tx.write_all(&chunk[..n]).await?;
        sent += n as u64;
    }
    tx.flush().await?;
    reader.await.context("link reader task")??;
    let el = t.elapsed();
    Ok((bytes as f64 / el.as_secs_f64(), el))
}

/// A guest of `pages` pages with `fill` of them written (uniformly placed writes), not started.
fn make_guest(pages: u64, rate: u64, fill: f64, seed: u64) -> Arc<SimulatedGuest> {
    let spec = GuestSpec {
        memory_pages: pages,
        vcpus: 2,
        pattern: WorkloadPattern::Uniform,
        dirty_pages_per_sec: rate,
        disk_writes_per_sec: 0,
        seed,
    };
    let g = SimulatedGuest::new(spec);
    // Uniform writes: non-zero fraction = 1 - exp(-writes / pages).
    let f = fill.clamp(0.0, 0.99);
    g.step((-(1.0 - f).ln() * pages as f64).round() as u64);
    g
}

/// One migration's figures.
struct MigRun {
    outcome: Result<SourceOutcome, String>,
    /// Source pause -> `migrate_source` returned Ok, measured here (stop-and-copy baseline).
    pause_to_ready_ms: Option<f64>,
    /// Wall time of the `migrate_source` call.
    wall: Duration,
    /// The destination's `check_memory` after `start()`: Ok(pages written) or the error.
    dest_check: Result<u64, String>,
    /// Workload writes/s achieved before the migration started.
    achieved_pps: f64,
    /// Workload writes during the migration (until the source paused).
    writes_during: u64,
    /// Source progress updates seen.
    updates: Vec<MigrationProgress>,
    /// The source's `NotConverging` error, when that is how it ended.
    not_converging: bool,
}

impl MigRun {
    fn progress_backwards(&self) -> usize {
        self.updates.windows(2).filter(|w| w[1].bytes_sent < w[0].bytes_sent).count()
    }

    fn last_round(&self) -> u32 {
        self.updates.iter().map(|u| u.round).max().unwrap_or(0)
    }

    /// Workload writes/s while the source ran during the migration (until it was paused).
    fn pps_during(&self) -> f64 {
        match &self.outcome {
            Ok(o) if o.total_ms > o.downtime_ms => {
                self.writes_during as f64 / ((o.total_ms - o.downtime_ms) as f64 / 1e3)
            }
            Ok(_) => f64::NAN,
            Err(_) => self.writes_during as f64 / self.wall.as_secs_f64(),
        }
    }

    /// The engine's own downtime estimate when it decided to stop and copy.
    fn expected_downtime(&self) -> Option<u64> {
        self.updates
            .iter()
            .take_while(|u| !matches!(u.phase, Phase::StopAndCopy | Phase::Done))
            .last()
            .map(|u| u.expected_downtime_ms)
    }

    fn bandwidth(&self) -> f64 {
        self.updates.iter().rev().map(|u| u.bandwidth_bytes_per_sec).find(|b| *b > 0.0).unwrap_or(f64::NAN)
    }
}

/// Migrates a fresh guest over a fresh loopback TCP pair. `stop_and_copy`: pause the source first
/// (the engine then copies everything with the guest paused, one round).
async fn one_migration(
    pages: u64,
    rate: u64,
    fill: f64,
    seed: u64,
    config: MigrationConfig,
    stop_and_copy: bool,
) -> anyhow::Result<MigRun> {
    let source = tokio::task::spawn_blocking(move || make_guest(pages, rate, fill, seed)).await?;
    let dest = SimulatedGuest::new(source.spec());
    let (a, b) = tcp_pair().await?;
    source.start().map_err(|e| anyhow::anyhow!("starting the source guest: {e}"))?;
    let (w0, t0) = (source.workload_stats().writes, Instant::now());
    tokio::time::sleep(WARMUP).await;
    let achieved_pps = (source.workload_stats().writes - w0) as f64 / t0.elapsed().as_secs_f64();
    let writes_before = source.workload_stats().writes;

    let (tx, mut rx) = watch::channel(MigrationProgress::default());
    let collector = tokio::spawn(async move {
        let mut seen = vec![rx.borrow_and_update().clone()];
        while rx.changed().await.is_ok() {
            seen.push(rx.borrow_and_update().clone());
        }
        seen
    });
    let (dtx, _drx) = watch::channel(MigrationProgress::default());
    let dst_task = tokio::spawn(migrate_destination(dest.clone(), b, dtx));
    let paused_at = if stop_and_copy {
        let t = Instant::now();
        source.pause().map_err(|e| anyhow::anyhow!("pausing the source guest: {e}"))?;
        Some(t)
    } else {
        None
    };
    let t = Instant::now();
    let src = migrate_source(source.clone(), a, config, tx, CancelToken::new()).await;
    let wall = t.elapsed();
    let pause_to_ready_ms = paused_at.map(|p| p.elapsed().as_secs_f64() * 1e3);
    // The source is paused now (on success and on failure alike until stop/resume below).
    let writes_during = source.workload_stats().writes - writes_before;
    let dst = dst_task.await.context("destination task")?;
    let updates = collector.await.context("progress collector")?;
    let not_converging = matches!(src, Err(MigrationError::NotConverging { .. }));
    let outcome = match (src, dst) {
        (Ok(o), Ok(_)) => Ok(o),
        (Ok(_), Err(d)) => Err(format!("source Ok but destination failed: {d}")),
        (Err(s), _) => Err(s.to_string()),
    };
    let dest_check = if outcome.is_ok() {
        // Ownership handed over: the source stops, the destination runs and is checked.
        let _ = source.stop();
        let d = dest.clone();
        let src_last = source.workload_stats().last_seq;
        tokio::task::spawn_blocking(move || -> Result<u64, String> {
            d.start().map_err(|e| format!("start: {e}"))?;
            std::thread::sleep(DEST_RUN);
            let c = d.check_memory().map_err(|e| e.to_string());
            let _ = d.stop();
            let c = c?;
            if c.last_seq < src_last {
                return Err(format!("destination last_seq {} < source's {src_last}", c.last_seq));
            }
            Ok(c.pages_written)
        })
        .await
        .context("check task")?
    } else {
        let _ = source.stop();
        Err("not migrated".into())
    };
    // Free the guests' memory on a blocking thread (large frees can take a moment).
    tokio::task::spawn_blocking(move || drop((source, dest))).await?;
    Ok(MigRun { outcome, pause_to_ready_ms, wall, dest_check, achieved_pps, writes_during, updates, not_converging })
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args = Args::parse();
    haven_benches::report::exit_with("migration_bench", run(&args).await)
}

/// Per-rate aggregate.
struct RateSummary {
    pct: u32,
    runs: Vec<MigRun>,
}

async fn run(args: &Args) -> anyhow::Result<i32> {
    let q = args.run.quick;
    let memory_mib = args.memory_mib.unwrap_or(if q { 256 } else { 1024 }).max(1);
    let runs = args.runs.unwrap_or(if q { 1 } else { 3 }).max(1);
    let link_mib = args.link_mib.unwrap_or(if q { 256 } else { 512 }).max(1);
    let memory = memory_mib * MIB;
    let pages = memory / PAGE_SIZE as u64;
    let command = std::env::args()
        .enumerate()
        .map(|(i, a)| {
            if i == 0 {
                std::path::Path::new(&a).file_name().map_or(a.clone(), |f| f.to_string_lossy().into_owned())
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    let mut report = Report::new(
        "migration_bench",
        "Pre-copy live migration of a simulated guest over loopback TCP (in-process engine, both guests here): \
         downtime, bytes and rounds vs the link rate and a stop-and-copy of the same guest",
    );
    report.param("memory_mib", memory_mib);
    report.param("rates_pct", args.rates.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(","));
    report.param("runs", runs as u64);
    report.param("link_mib", link_mib);
    report.param("max_downtime_ms", args.max_downtime_ms);
    report.param("fill", args.fill);
    report.param("link_cap_mib", args.link_cap_mib);
    let mut failed = false;

    // 1. The link.
    eprintln!("migration_bench: link: {link_mib} MiB through loopback TCP");
    let cap = args.link_cap_mib * MIB;
    // A paced link needs only ~2 s of bytes to show its rate.
    let link_mib = if cap > 0 { link_mib.min(2 * args.link_cap_mib).max(1) } else { link_mib };
    let link = match link_rate(link_mib * MIB, cap).await {
        Ok(l) => Some(l),
        Err(e) => {
            eprintln!("migration_bench: link measurement failed: {e:#}");
            report.note(format!("link measurement FAILED: {e:#}; nothing else can be measured"));
            failed = true;
            None
        }
    };
    let Some((link_bps, link_el)) = link else {
        report.print(args.run.json, args.run.enforce_targets);
        return Ok(1);
    };
    let mut tl = Table::new(
        format!("Baseline: loopback TCP link (one connection, 1 MiB writes, TCP_NODELAY)\ncommand: {command}"),
        &["what", "MiB", "s", "MiB/s", "pages/s (4 KiB)"],
    );
    tl.row(vec![
        Cell::text(if cap > 0 {
            format!("link: bytes through 127.0.0.1 TCP paced to {} MiB/s", args.link_cap_mib)
        } else {
            "link: raw bytes through 127.0.0.1 TCP".to_string()
        }),
        Cell::int(link_mib),
        Cell::num(link_el.as_secs_f64(), 3),
        Cell::num(link_bps / MIB as f64, 1),
        Cell::num(link_bps / PAGE_SIZE as f64, 0),
    ]);
    report.tables.push(tl);

    let precopy = MigrationConfig {
        max_downtime_ms: args.max_downtime_ms,
        auto_converge: true,
        max_bandwidth_bytes_per_sec: cap,
        ..Default::default()
    };
    let pps = |pct: u32| (pct as f64 / 100.0 * link_bps / PAGE_SIZE as f64).round() as u64;
    let mut all_updates_backwards = 0usize;
    let mut all_updates = 0usize;

    // 2. Pre-copy at each rate.
    let mut summaries: Vec<RateSummary> = Vec::new();
    let mut seed = 1u64;
    for &pct in &args.rates {
        let mut s = RateSummary { pct, runs: Vec::new() };
        for i in 0..runs {
            eprintln!(
                "migration_bench: pre-copy {memory_mib} MiB at {pct}% of the link ({} pages/s), run {}",
                pps(pct),
                i + 1
            );
            seed += 1;
            match one_migration(pages, pps(pct), args.fill, seed, precopy.clone(), false).await {
                Ok(r) => {
                    if let Err(e) = &r.outcome {
                        eprintln!("migration_bench: pre-copy at {pct}% run {} failed: {e}", i + 1);
                        report.note(format!("pre-copy at {pct}% run {} FAILED: {e}", i + 1));
                        failed = true;
                    } else if let Err(e) = &r.dest_check {
                        eprintln!("migration_bench: pre-copy at {pct}% run {}: destination check failed: {e}", i + 1);
                        report.note(format!("pre-copy at {pct}% run {}: destination check FAILED: {e}", i + 1));
                        failed = true;
                    }
                    s.runs.push(r);
                }
                Err(e) => {
                    eprintln!("migration_bench: pre-copy at {pct}% run {} could not run: {e:#}", i + 1);
                    report.note(format!("pre-copy at {pct}% run {} FAILED to run: {e:#}", i + 1));
                    failed = true;
                }
            }
        }
        summaries.push(s);
    }

    // 3. Stop-and-copy baseline (guest dirtying at the 30 % rate until paused).
    let sc_pct = TARGET_DOWNTIME_PCT;
    let mut sc_runs: Vec<MigRun> = Vec::new();
    for i in 0..runs {
        eprintln!("migration_bench: stop-and-copy {memory_mib} MiB, run {}", i + 1);
        seed += 1;
        let config = MigrationConfig { max_downtime_ms: u64::MAX, ..precopy.clone() };
        match one_migration(pages, pps(sc_pct), args.fill, seed, config, true).await {
            Ok(r) => {
                if let Err(e) = r.outcome.as_ref().map(|_| ()).and(r.dest_check.as_ref().map(|_| ())) {
                    eprintln!("migration_bench: stop-and-copy run {} failed: {e}", i + 1);
                    report.note(format!("stop-and-copy run {} FAILED: {e}", i + 1));
                    failed = true;
                }
                sc_runs.push(r);
            }
            Err(e) => {
                eprintln!("migration_bench: stop-and-copy run {} could not run: {e:#}", i + 1);
                report.note(format!("stop-and-copy run {} FAILED to run: {e:#}", i + 1));
                failed = true;
            }
        }
    }

    // Per-run table.
    let mut tr = Table::new(
        format!(
            "Pre-copy migrations, one row per run: {memory_mib} MiB guest, ~{:.0}% of pages non-zero, uniform \
             workload at a % of the link rate, max downtime {} ms, auto-converge on\ncommand: {command}",
            args.fill * 100.0,
            args.max_downtime_ms
        ),
        &[
            "mode",
            "% link",
            "run",
            "pages/s target",
            "pages/s before",
            "pages/s during",
            "est. downtime ms",
            "downtime ms",
            "total ms",
            "sent/mem",
            "rounds",
            "max throttle %",
            "engine MiB/s",
            "dest check",
            "updates",
            "backwards",
        ],
    );
    let row = |t: &mut Table, mode: &str, pct: u32, i: usize, r: &MigRun| {
        let (down, total, sent, rounds, thr) = match &r.outcome {
            Ok(o) => (
                Cell::num(r.pause_to_ready_ms.unwrap_or(o.downtime_ms as f64), 1),
                Cell::int(o.total_ms),
                Cell::ratio(o.bytes_sent as f64 / memory as f64),
                Cell::int(o.rounds as u64),
                Cell::int(o.max_throttle_percent as u64),
            ),
            Err(e) => (
                Cell::text(format!("FAILED: {}", e.chars().take(60).collect::<String>())),
                Cell::num(r.wall.as_secs_f64() * 1e3, 0),
                Cell::Empty,
                Cell::int(r.last_round() as u64),
                Cell::Empty,
            ),
        };
        t.row(vec![
            Cell::text(mode),
            Cell::int(pct as u64),
            Cell::int(i as u64 + 1),
            Cell::int(pps(pct)),
            Cell::num(r.achieved_pps, 0),
            Cell::num(r.pps_during(), 0),
            Cell::opt(r.expected_downtime().map(|d| d as f64), 0),
            down,
            total,
            sent,
            rounds,
            thr,
            Cell::num(r.bandwidth() / MIB as f64, 0),
            Cell::text(match &r.dest_check {
                Ok(_) => "ok".to_string(),
                Err(e) => format!("FAILED: {}", e.chars().take(50).collect::<String>()),
            }),
            Cell::int(r.updates.len() as u64),
            Cell::int(r.progress_backwards() as u64),
        ]);
    };
    for s in &summaries {
        for (i, r) in s.runs.iter().enumerate() {
            row(&mut tr, "pre-copy", s.pct, i, r);
            all_updates += r.updates.len();
            all_updates_backwards += r.progress_backwards();
        }
    }
    for (i, r) in sc_runs.iter().enumerate() {
        row(&mut tr, "baseline: stop-and-copy", sc_pct, i, r);
        all_updates += r.updates.len();
        all_updates_backwards += r.progress_backwards();
    }
    report.tables.push(tr);

    // Summary table with the stop-and-copy baseline.
    let sc_down: Vec<f64> = sc_runs.iter().filter_map(|r| r.outcome.as_ref().ok().and(r.pause_to_ready_ms)).collect();
    let sc_p50 = quantile(&sc_down, 0.5);
    let show_p99 = runs >= 20;
    let mut ts = Table::new(
        format!(
            "Pre-copy summary per dirty rate (downtime = source paused -> destination Ready; p99 shown from 20 runs); \
             baseline: stop-and-copy of the same guest (paused, then all memory through the same engine and \
             stream; downtime = pause -> Ready)\ncommand: {command}"
        ),
        &[
            "mode",
            "% link",
            "ok/runs",
            "downtime p50 ms",
            "p99 ms",
            "max ms",
            "x stop-and-copy",
            "total p50 ms",
            "predicted total ms",
            "sent/mem max",
            "rounds max",
            "predicted rounds",
            "max throttle %",
            "dest checks ok",
        ],
    );
    let summary_row = |t: &mut Table, mode: &str, pct: u32, rs: &[MigRun], down: Vec<f64>, baseline: bool| {
        let ok: Vec<&SourceOutcome> = rs.iter().filter_map(|r| r.outcome.as_ref().ok()).collect();
        let totals: Vec<f64> = ok.iter().map(|o| o.total_ms as f64).collect();
        let sent: Vec<f64> = ok.iter().map(|o| o.bytes_sent as f64 / memory as f64).collect();
        let p = predict(memory, pps(pct) * PAGE_SIZE as u64, link_bps as u64, args.max_downtime_ms);
        let p50 = quantile(&down, 0.5);
        t.row(vec![
            Cell::text(mode),
            Cell::int(pct as u64),
            Cell::text(format!("{}/{}", ok.len(), runs)),
            Cell::num(p50, 1),
            if show_p99 { Cell::num(quantile(&down, 0.99), 1) } else { Cell::Empty },
            Cell::num(max_of(&down), 1),
            if baseline { Cell::Empty } else { Cell::ratio(ratio(p50, sc_p50)) },
            Cell::num(quantile(&totals, 0.5), 0),
            if baseline {
                Cell::Empty
            } else if p.converges {
                Cell::int(p.total_ms)
            } else {
                Cell::text("no conv.")
            },
            Cell::ratio(max_of(&sent)),
            Cell::num(ok.iter().map(|o| o.rounds as f64).fold(f64::NAN, f64::max), 0),
            if baseline { Cell::Empty } else { Cell::int(p.rounds as u64) },
            Cell::num(ok.iter().map(|o| o.max_throttle_percent as f64).fold(f64::NAN, f64::max), 0),
            Cell::text(format!("{}/{}", rs.iter().filter(|r| r.dest_check.is_ok()).count(), runs)),
        ]);
        (p50, down)
    };
    let mut downtime_at: Vec<(u32, Vec<f64>)> = Vec::new();
    let mut sent_at: Vec<(u32, f64)> = Vec::new();
    for s in &summaries {
        let down: Vec<f64> =
            s.runs.iter().filter_map(|r| r.outcome.as_ref().ok().map(|o| o.downtime_ms as f64)).collect();
        let (_, down) = summary_row(&mut ts, "pre-copy", s.pct, &s.runs, down, false);
        downtime_at.push((s.pct, down));
        let sent: Vec<f64> = s
            .runs
            .iter()
            .filter_map(|r| r.outcome.as_ref().ok().map(|o| o.bytes_sent as f64 / memory as f64))
            .collect();
        if !sent.is_empty() && sent.len() == s.runs.len() {
            sent_at.push((s.pct, max_of(&sent)));
        }
    }
    summary_row(&mut ts, "baseline: stop-and-copy", sc_pct, &sc_runs, sc_down, true);
    report.tables.push(ts);

    // 4. Non-convergence detection.
    let nc_pct = args.nc_rate_pct;
    eprintln!("migration_bench: non-convergence: auto-converge off at {nc_pct}% of the link");
    seed += 1;
    let nc_config = MigrationConfig { auto_converge: false, ..precopy.clone() };
    let mut tn = Table::new(
        format!(
            "Non-convergence detection: auto-converge off, workload at {nc_pct}% of the link rate ({} pages/s), \
             converge_check_rounds {}, converge_check_ms {}\ncommand: {command}",
            pps(nc_pct),
            nc_config.converge_check_rounds,
            nc_config.converge_check_ms
        ),
        &[
            "result",
            "pages/s before",
            "pages/s during",
            "rounds",
            "s until the error",
            "engine MiB/s",
            "updates",
            "backwards",
        ],
    );
    let mut nc_measured: Option<(u32, f64, bool)> = None;
    match one_migration(pages, pps(nc_pct), args.fill, seed, nc_config, false).await {
        Ok(r) => {
            let result = match &r.outcome {
                Ok(o) => {
                    report.note(format!(
                        "non-convergence run: the migration converged anyway (rounds {}, downtime {} ms): the \
                         workload reached {:.0} pages/s during it ({:.1}% of the link, target {nc_pct}%), below \
                         the {:.0} pages/s the engine copied",
                        o.rounds,
                        o.downtime_ms,
                        r.pps_during(),
                        r.pps_during() * PAGE_SIZE as f64 / link_bps * 100.0,
                        r.bandwidth() / PAGE_SIZE as f64
                    ));
                    "converged (no NotConverging)".to_string()
                }
                Err(e) if r.not_converging => {
                    nc_measured = Some((r.last_round(), r.wall.as_secs_f64(), true));
                    format!("NotConverging: {}", e.chars().take(70).collect::<String>())
                }
                Err(e) => {
                    eprintln!("migration_bench: non-convergence run failed otherwise: {e}");
                    report.note(format!("non-convergence run FAILED with another error: {e}"));
                    failed = true;
                    format!("FAILED: {}", e.chars().take(70).collect::<String>())
                }
            };
            all_updates += r.updates.len();
            all_updates_backwards += r.progress_backwards();
            tn.row(vec![
                Cell::text(result),
                Cell::num(r.achieved_pps, 0),
                Cell::num(r.pps_during(), 0),
                Cell::int(r.last_round() as u64),
                Cell::num(r.wall.as_secs_f64(), 2),
                Cell::num(r.bandwidth() / MIB as f64, 0),
                Cell::int(r.updates.len() as u64),
                Cell::int(r.progress_backwards() as u64),
            ]);
        }
        Err(e) => {
            eprintln!("migration_bench: non-convergence run could not run: {e:#}");
            report.note(format!("non-convergence run FAILED to run: {e:#}"));
            failed = true;
        }
    }
    report.tables.push(tn);

    // Targets.
    match downtime_at.iter().find(|(p, _)| *p == TARGET_DOWNTIME_PCT) {
        Some((_, down)) if !down.is_empty() => {
            let (v, label) =
                if show_p99 { (quantile(down, 0.99), "p99") } else { (max_of(down), "max (stands in for p99)") };
            report.targets.push(TargetCheck::at_most(
                format!("downtime {label} at {TARGET_DOWNTIME_PCT}% of the link, {} run(s)", down.len()),
                v,
                TARGET_DOWNTIME_MS,
                "ms",
                1,
            ));
        }
        _ => report.targets.push(TargetCheck {
            what: format!("downtime p99 at {TARGET_DOWNTIME_PCT}% of the link"),
            target: format!("<= {TARGET_DOWNTIME_MS} ms"),
            measured: "not measured (no successful run at that rate)".into(),
            met: false,
        }),
    }
    match sent_at.iter().find(|(p, _)| *p == TARGET_SENT_PCT) {
        Some((_, v)) => report.targets.push(TargetCheck::at_most(
            format!("bytes sent / memory at {TARGET_SENT_PCT}% of the link (max over runs)"),
            *v,
            TARGET_SENT_RATIO,
            "x",
            2,
        )),
        None => report.targets.push(TargetCheck {
            what: format!("bytes sent / memory at {TARGET_SENT_PCT}% of the link"),
            target: format!("<= {TARGET_SENT_RATIO} x"),
            measured: "not measured (a run at that rate failed or the rate was not run)".into(),
            met: false,
        }),
    }
    report.targets.push(match nc_measured {
        Some((rounds, secs, _)) => TargetCheck {
            what: format!("non-convergence detected (auto-converge off, {nc_pct}% of the link)"),
            target: format!("within {TARGET_NC_ROUNDS} rounds or {TARGET_NC_SECS} s"),
            measured: format!("{rounds} rounds, {secs:.2} s"),
            met: rounds <= TARGET_NC_ROUNDS || secs <= TARGET_NC_SECS,
        },
        None => TargetCheck {
            what: format!("non-convergence detected (auto-converge off, {nc_pct}% of the link)"),
            target: format!("within {TARGET_NC_ROUNDS} rounds or {TARGET_NC_SECS} s"),
            measured: "no NotConverging error".into(),
            met: false,
        },
    });
    report.targets.push(TargetCheck {
        what: "progress: bytes_sent never decreases (every update seen, all migrations)".into(),
        target: "0 decreases".into(),
        measured: format!("{all_updates_backwards} decreases in {all_updates} updates"),
        met: all_updates_backwards == 0 && all_updates > 0,
    });

    report.note("group-plan targets (several VMs moved as one plan) are measured by plan_bench");
    report.note(
        "progress updates are what a tokio watch receiver saw (it keeps only the latest value, so updates published \
         back to back can be coalesced); every seen pair is compared",
    );
    report.note(format!(
        "'pages/s before' = workload writes/s over {} ms of running before the migration, 'pages/s during' = \
         writes/s while the source ran during the migration (throttle included); one thread writing self-checking \
         pages may fall short of high targets. 'est. downtime ms' = the engine's own estimate when it chose to stop \
         and copy; 'engine MiB/s' = its bandwidth estimate (page reads, encoding, the stream), below the raw link",
        WARMUP.as_millis()
    ));
    report.note(format!(
        "predicted = haven_node::vm::migration::predict(memory, target dirty bytes/s, raw link rate, {} ms); the \
         stop-and-copy downtime is measured here from pause() to migrate_source returning Ok (Ready received)",
        args.max_downtime_ms
    ));
    report.note(format!(
        "source, destination, the workload thread and the TCP stack share this machine's {} CPUs",
        haven_benches::cpus()
    ));
    let code = report.print(args.run.json, args.run.enforce_targets);
    Ok(if failed { 1 } else { code })
}
