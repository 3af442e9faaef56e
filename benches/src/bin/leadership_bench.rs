//! Leadership under data-path load: does block I/O on the leader cost the cluster its leader?
//!
//! For each configuration (`--configs`, default `isolated,shared`) on a fresh 3-node loopback
//! cluster of real `haven-node` processes:
//! 1. `fio --ioengine=nbd` saturates a 1-replica volume whose primary is the Raft leader
//!    (sequential 1 MiB writes at depth 16, `--secs`), while every node's status is polled; the
//!    elections are the terms the cluster went through meanwhile;
//! 2. then `--rounds` times: `kill -9` the leader and time until a survivor reports a new leader
//!    in a newer term; restart the node and let the cluster settle.
//!
//! `isolated` is how nodes run by default (Raft and the catalog in their own RocksDB, openraft on
//! its own threads, Haven's pre-vote election timer); `shared` is how they ran before (one
//! RocksDB and WAL for Raft and blocks, openraft on the shared pool, openraft's timer): the
//! baseline, measured in the same run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use haven_benches::cluster::{
    await_new_leader, client_for, ClusterFlags, LeaderWatch, RunningCluster, HEALTHY_TIMEOUT,
};
use haven_benches::fio::{self, FioJob, FioRun};
use haven_benches::latency::quantile_ms;
use haven_benches::report::{exit_with, Cell, Report, RunFlags, Table, TargetCheck};
use haven_benches::volume::{tool_version, wait_hosts};
use haven_client::proto::NodeId;
use haven_client::volumes::VolumeSpec;
use haven_client::HavenClient;

/// Leader failover target (issue 12): median time from kill -9 to a new leader.
const FAILOVER_P50_TARGET_MS: f64 = 300.0;

#[derive(Debug, Parser)]
#[command(about = "Elections while fio saturates a volume on the Raft leader, then leader failover after kill -9, \
             for the default (isolated) node configuration and the shared one nodes had before")]
struct Args {
    #[command(flatten)]
    run: RunFlags,
    #[command(flatten)]
    cluster: ClusterFlags,
    /// Configurations to measure, in order: isolated (default nodes), shared (one RocksDB, Raft
    /// on the shared pool, openraft's election timer), split-db (own RocksDB only), own-thread
    /// (own Raft threads only), no-prevote (isolated, but openraft's election timer).
    #[arg(long, value_delimiter = ',', default_value = "isolated,shared")]
    configs: Vec<Config>,
    /// Seconds of fio load per configuration (default 60; 15 with --quick).
    #[arg(long)]
    secs: Option<u64>,
    /// kill -9 rounds per configuration after the load (default 10; 3 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// fio block size, in KiB.
    #[arg(long, default_value_t = 1024)]
    bs_kib: u64,
    /// fio queue depth.
    #[arg(long, default_value_t = 16)]
    iodepth: u32,
    /// Size of the loaded volume, in MiB (fio wraps around it).
    #[arg(long, default_value_t = 2048)]
    volume_mib: u64,
    /// Interval of the status polls that watch the term, in ms.
    #[arg(long, default_value_t = 20)]
    poll_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Config {
    Isolated,
    Shared,
    SplitDb,
    OwnThread,
    NoPrevote,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Self::Isolated => "isolated (default)",
            Self::Shared => "shared (before)",
            Self::SplitDb => "split-db only",
            Self::OwnThread => "own-thread only",
            Self::NoPrevote => "isolated, no pre-vote",
        }
    }

    /// What each node's `haven.toml` says for this configuration.
    fn settings(self) -> Vec<(&'static str, &'static str, toml::Value)> {
        let (split, thread) = match self {
            Self::Isolated => (true, true),
            Self::Shared => (false, false),
            Self::SplitDb => (true, false),
            Self::OwnThread => (false, true),
            Self::NoPrevote => (true, true),
        };
        let prevote = self == Self::Isolated;
        vec![
            ("storage", "layout", toml::Value::String(if split { "split" } else { "shared" }.into())),
            ("raft", "dedicated_threads", toml::Value::Boolean(thread)),
            ("raft", "prevote", toml::Value::Boolean(prevote)),
        ]
    }
}

/// What one configuration measured.
struct Outcome {
    config: Config,
    fio_mib_s: f64,
    term_before: u64,
    term_after: u64,
    leaders_seen: usize,
    failovers: Vec<Option<Duration>>,
}

impl Outcome {
    fn elections(&self) -> u64 {
        self.term_after.saturating_sub(self.term_before)
    }
}

/// The highest term and every leader the status polls saw, until `stop` fires.
async fn watch_terms(
    client: HavenClient,
    nodes: Vec<SocketAddr>,
    poll: Duration,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> (u64, std::collections::BTreeSet<u64>) {
    let (mut term, mut leaders) = (0, std::collections::BTreeSet::new());
    loop {
        for addr in &nodes {
            if let Ok(Ok(st)) = tokio::time::timeout(Duration::from_secs(1), client.status_of(*addr)).await {
                term = term.max(st.term);
                leaders.extend(st.leader.map(|l| l.0));
            }
        }
        tokio::select! {
            _ = &mut stop => return (term, leaders),
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

/// Run fio's sequential-write load against `url` for `secs`; returns the write throughput in
/// MiB/s.
async fn run_fio(args: &Args, url: &str, secs: u64) -> anyhow::Result<f64> {
    let job = FioJob {
        name: "load",
        rw: "write",
        block_bytes: args.bs_kib.max(4) << 10,
        depth: args.iodepth,
        read_percent: None,
    };
    let run = FioRun { seconds: secs, ramp_seconds: 0, size_bytes: args.volume_mib << 20 };
    let r = fio::run(&fio::args(&job, &run, url), Duration::from_secs(secs + 120)).await?;
    Ok(r.write.mib_per_s())
}

/// Create a 1-replica volume on `leader` and wait until it takes a write.
async fn load_volume(client: &HavenClient, leader: NodeId, mib: u64) -> anyhow::Result<String> {
    let name = "leadership-load".to_string();
    let mut spec = VolumeSpec::new(&name, mib << 20, 1);
    spec.hosts = vec![leader];
    let v = client.create_volume(&spec).await.context("creating the loaded volume")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = client.write_volume(v.id, 0, &[0u8; 4096]).await {
        if Instant::now() > deadline {
            bail!("volume {name}: first write still fails after 30 s: {e}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(name)
}

/// Time from `kill -9` of the leader until a survivor reports a new leader in a newer term.
async fn failover_round(running: &mut RunningCluster, poll: Duration) -> anyhow::Result<Option<Duration>> {
    let ids = running.ids.clone();
    let checker = client_for(&running.cluster, &ids)?;
    let before = running.cluster.wait_healthy(&checker, &ids, HEALTHY_TIMEOUT).await?;
    let killed = before.id.0;
    let survivors: Vec<SocketAddr> = ids
        .iter()
        .filter(|id| **id != killed)
        .map(|id| running.cluster.node(*id).map(|n| n.addr))
        .collect::<Result<_, _>>()?;
    let survivor_ids: Vec<u64> = ids.iter().copied().filter(|id| *id != killed).collect();
    let probe = client_for(&running.cluster, &survivor_ids)?;
    for addr in &survivors {
        probe.status_of(*addr).await?; // connections up before the clock starts
    }
    let t0 = Instant::now();
    tokio::task::block_in_place(|| running.cluster.kill(killed))?;
    let watch = LeaderWatch { poll, probe_timeout: Duration::from_secs(2), give_up: HEALTHY_TIMEOUT };
    let found = await_new_leader(&probe, &survivors, killed, before.term, t0, watch).await;
    running.cluster.start(killed)?;
    let checker = client_for(&running.cluster, &ids)?;
    running.cluster.wait_healthy(&checker, &ids, HEALTHY_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_secs(1)).await; // the restarted node's rejoin grace
    Ok(found.map(|(d, _)| d))
}

async fn measure(
    args: &Args,
    config: Config,
    base: &std::path::Path,
    node_bin: &std::path::Path,
) -> anyhow::Result<Outcome> {
    let secs = args.secs.unwrap_or(if args.run.quick { 15 } else { 60 });
    let rounds = args.rounds.unwrap_or(if args.run.quick { 3 } else { 10 }).max(1);
    let dir = base.join(format!("{config:?}").to_lowercase());
    let election_ms = args.cluster.election_timeout_ms();
    eprintln!("leadership_bench: {}: starting a 3-node cluster in {}", config.name(), dir.display());
    let mut running = RunningCluster::start_configured(&dir, 3, node_bin, election_ms, &config.settings()).await?;
    let client = running.client_leader_first(running.leader.id)?;
    wait_hosts(&client, 3, Duration::from_secs(30)).await?;
    let leader = running.cluster.wait_healthy(&client, &running.ids, HEALTHY_TIMEOUT).await?;
    let export = load_volume(&client, leader.id, args.volume_mib).await?;
    let nbd = running.cluster.node(leader.id.0)?.nbd.context("the leader has no NBD address")?;

    let nodes: Vec<SocketAddr> = running.cluster.nodes().iter().map(|n| n.addr).collect();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let watcher = tokio::spawn(watch_terms(
        client_for(&running.cluster, &running.ids)?,
        nodes,
        Duration::from_millis(args.poll_ms.max(1)),
        stop_rx,
    ));
    eprintln!("leadership_bench: {}: fio {}s on node-{}'s NBD export {export}", config.name(), secs, leader.id.0);
    let fio = run_fio(args, &format!("nbd://{nbd}/{export}"), secs).await;
    let _ = stop_tx.send(());
    let (term_after, leaders) = watcher.await.context("term watcher")?;
    let fio_mib_s = fio?;

    let mut failovers = Vec::with_capacity(rounds);
    for n in 1..=rounds {
        let d = failover_round(&mut running, Duration::from_millis(5)).await?;
        eprintln!(
            "leadership_bench: {}: failover round {n}: {}",
            config.name(),
            d.map_or("no new leader".into(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3))
        );
        failovers.push(d);
    }
    Ok(Outcome {
        config,
        fio_mib_s,
        term_before: leader.term,
        term_after: term_after.max(leader.term),
        leaders_seen: leaders.len(),
        failovers,
    })
}

fn report(args: &Args, outcomes: &[Outcome]) -> Report {
    let mut report = Report::new(
        "leadership_bench",
        "elections while fio saturates a volume on the Raft leader; leader failover after kill -9 (3-node loopback)",
    );
    report.param("secs", args.secs.unwrap_or(if args.run.quick { 15 } else { 60 }));
    report.param("fio", format!("write bs={}k iodepth={} ({})", args.bs_kib, args.iodepth, tool_version("fio")));
    report.param("election_timeout_ms", args.cluster.election_timeout_ms());
    let mut load = Table::new(
        "elections under load",
        &["configuration", "fio MiB/s", "term before", "term after", "elections", "leaders seen"],
    );
    let mut failover =
        Table::new("leader failover after kill -9 (ms)", &["configuration", "rounds ok", "p50", "p90", "max"]);
    for o in outcomes {
        load.row(vec![
            Cell::text(o.config.name()),
            Cell::num(o.fio_mib_s, 1),
            Cell::int(o.term_before),
            Cell::int(o.term_after),
            Cell::int(o.elections()),
            Cell::int(o.leaders_seen as u64),
        ]);
        let ok: Vec<Duration> = o.failovers.iter().flatten().copied().collect();
        failover.row(vec![
            Cell::text(o.config.name()),
            Cell::text(format!("{}/{}", ok.len(), o.failovers.len())),
            Cell::num(quantile_ms(&ok, 0.5), 1),
            Cell::num(quantile_ms(&ok, 0.9), 1),
            Cell::num(quantile_ms(&ok, 1.0), 1),
        ]);
        if o.config == Config::Isolated {
            report.targets.push(TargetCheck::at_most(
                "elections under fio load (isolated)",
                o.elections() as f64,
                0.0,
                "",
                0,
            ));
            report.targets.push(TargetCheck::at_most(
                "leader failover p50 (isolated)",
                quantile_ms(&ok, 0.5),
                FAILOVER_P50_TARGET_MS,
                "ms",
                1,
            ));
        }
    }
    report.tables.push(load);
    report.tables.push(failover);
    report
}

async fn run(args: Args) -> anyhow::Result<i32> {
    let (node_bin, scratch) = args.cluster.prepare("haven-leadership-bench")?;
    let mut outcomes = Vec::new();
    for config in &args.configs {
        outcomes.push(measure(&args, *config, scratch.path(), &node_bin).await?);
    }
    Ok(report(&args, &outcomes).print(args.run.json, args.run.enforce_targets))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args = Args::parse();
    exit_with("leadership_bench", run(args).await)
}
