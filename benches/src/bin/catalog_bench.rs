//! `catalog_bench`: catalog write throughput and client-observed commit latency (`kv_put` through
//! the SDK until the write is committed on a quorum and applied) on a 3-node loopback cluster of
//! real `haven-node` processes, at 1 and at 64 concurrent clients (`--clients`).
//!
//! Baselines, measured in the same run:
//! (a) the same workload on a 1-node cluster (Raft without replication: one fsync per commit
//!     batch, no network hop between nodes);
//! (b) a local RocksDB put with a fsynced WAL (`Store::durable()`) in a scratch directory on the
//!     same filesystem, one writer: the cost of the one durability point every commit needs.
//!
//! Targets (issue 13): commit p50 <= 1 ms with 1 client, >= 10,000 writes/s with 64 clients (3
//! nodes). Baseline (b) is the floor the first target sits on: a commit needs the leader's fsync
//! and then (openraft 0.9 replicates an entry only after its leader append is durable) a
//! follower's.
//!
//! Clients are Tokio tasks sharing one `HavenClient` (one QUIC connection), aimed at the leader.
//! Each task overwrites its own `--keys-per-client` keys in turn with `--value-bytes` values.
//! Only one cluster runs at a time, so the baseline cluster does not compete for CPU.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use haven_benches::cluster::{RunningCluster, ScratchDir};
use haven_benches::latency::Latency;
use haven_benches::report::ratio;
use haven_benches::{Cell, LatencySummary, Report, Table, TargetCheck};
use haven_client::HavenClient;
use haven_node::storage::{Store, CF_CATALOG};
use rand::RngCore;

const TARGET_P50_MS: f64 = 1.0;
const TARGET_WRITES_PER_S: f64 = 10_000.0;

#[derive(Parser, Debug)]
#[command(
    about = "Catalog write throughput and commit latency: 3-node cluster vs 1-node cluster vs local RocksDB fsync"
)]
struct Args {
    /// Concurrent client tasks, comma separated; each level is measured on every cluster size.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    clients: Vec<usize>,
    /// Seconds of measured load per (cluster size, clients) pair and for the RocksDB baseline
    /// (default 10; 3 with --quick).
    #[arg(long)]
    secs: Option<f64>,
    /// Seconds of unmeasured load after a cluster starts (default 2; 1 with --quick).
    #[arg(long)]
    warmup_secs: Option<f64>,
    /// Bytes per value written.
    #[arg(long, default_value_t = 128)]
    value_bytes: usize,
    /// Start the nodes with `[raft] batch_proposals = true` (proposals made together go to Raft
    /// as one entry; off by default in the node).
    #[arg(long)]
    batch_proposals: bool,
    /// Distinct keys each client task cycles through (bounds the catalog's size).
    #[arg(long, default_value_t = 1024)]
    keys_per_client: u64,
    #[command(flatten)]
    cluster: haven_benches::cluster::ClusterFlags,
    #[command(flatten)]
    run: haven_benches::report::RunFlags,
}

/// The figures of one load run.
#[derive(Debug, Clone)]
struct LoadResult {
    clients: usize,
    ops: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    latency: LatencySummary,
}

impl LoadResult {
    fn per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

/// `clients` tasks each put in a loop for `duration`; latency is per acknowledged put.
async fn run_load(
    client: &HavenClient,
    clients: usize,
    duration: Duration,
    value: Arc<Vec<u8>>,
    keys: u64,
    tag: &str,
) -> LoadResult {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for task in 0..clients {
        let client = client.clone();
        let value = value.clone();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut latency = Latency::new();
            let (mut ops, mut errors, mut first_error) = (0u64, 0u64, None);
            let mut seq = 0u64;
            while start.elapsed() < duration {
                let key = format!("bench/{tag}/{task}/{}", seq % keys.max(1));
                seq += 1;
                let t = Instant::now();
                match client.kv_put(&key, &value).await {
                    Ok(_) => {
                        latency.record(t.elapsed());
                        ops += 1;
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            (latency, ops, errors, first_error)
        }));
    }
    let mut latency = Latency::new();
    let (mut ops, mut errors, mut first_error) = (0, 0, None);
    for t in tasks {
        match t.await {
            Ok((l, o, e, fe)) => {
                latency.merge(&l);
                ops += o;
                errors += e;
                if first_error.is_none() {
                    first_error = fe;
                }
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("client task failed: {e}"));
            }
        }
    }
    LoadResult { clients, ops, errors, first_error, elapsed: start.elapsed(), latency: latency.summary() }
}

/// Start a cluster of `nodes`, warm it up, then run every client level against it.
async fn bench_cluster(
    args: &Args,
    scratch: &ScratchDir,
    node_bin: &std::path::Path,
    nodes: usize,
    secs: Duration,
    warmup: Duration,
    value: Arc<Vec<u8>>,
) -> anyhow::Result<Vec<LoadResult>> {
    let dir = scratch.path().join(format!("cluster-{nodes}"));
    eprintln!("catalog_bench: starting a {nodes}-node cluster in {}", dir.display());
    let election_ms = args.cluster.election_timeout_ms();
    let batching = [("raft", "batch_proposals", toml::Value::Boolean(true))];
    let settings: &[_] = if args.batch_proposals { &batching } else { &[] };
    let running = RunningCluster::start_configured(&dir, nodes, node_bin, election_ms, settings).await?;
    let client = running.client_leader_first(running.leader.id)?;
    eprintln!("catalog_bench: {nodes}-node cluster healthy, leader {}; warming up", running.leader.id);
    let warm = run_load(
        &client,
        args.clients.iter().copied().max().unwrap_or(1),
        warmup,
        value.clone(),
        args.keys_per_client,
        "warmup",
    )
    .await;
    anyhow::ensure!(warm.ops > 0, "no write succeeded during warm-up: {}", warm.first_error.unwrap_or_default());
    let mut results = Vec::new();
    for &c in &args.clients {
        let r = run_load(&client, c.max(1), secs, value.clone(), args.keys_per_client, &format!("c{c}")).await;
        eprintln!(
            "catalog_bench: {nodes} node(s), {c} client(s): {:.0} writes/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
            r.per_sec(),
            r.latency.p50_ms,
            r.latency.p99_ms,
            r.errors
        );
        results.push(r);
    }
    drop(running);
    Ok(results)
}

/// Baseline (b): single-writer RocksDB puts with a fsynced WAL, into the catalog column family
/// of a fresh `Store`, for `secs`.
fn rocksdb_baseline(scratch: &ScratchDir, secs: Duration, value: &[u8], keys: u64) -> anyhow::Result<LoadResult> {
    let path = scratch.path().join("rocksdb-baseline");
    let store = Store::open(&path).with_context(|| format!("opening RocksDB at {}", path.display()))?;
    let cf = store.cf(CF_CATALOG);
    let opts = Store::durable();
    let mut latency = Latency::new();
    let mut ops = 0u64;
    let start = Instant::now();
    while start.elapsed() < secs {
        let key = format!("bench/rocksdb/{}", ops % keys.max(1));
        let t = Instant::now();
        store.db().put_cf_opt(cf, key.as_bytes(), value, &opts)?;
        latency.record(t.elapsed());
        ops += 1;
    }
    Ok(LoadResult {
        clients: 1,
        ops,
        errors: 0,
        first_error: None,
        elapsed: start.elapsed(),
        latency: latency.summary(),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(!args.clients.is_empty(), "--clients must name at least one level");
    let secs = Duration::from_secs_f64(args.secs.unwrap_or(if args.run.quick { 3.0 } else { 10.0 }).max(0.1));
    let warmup = Duration::from_secs_f64(args.warmup_secs.unwrap_or(if args.run.quick { 1.0 } else { 2.0 }).max(0.0));
    let (node_bin, scratch) = args.cluster.prepare("haven-catalog-bench")?;
    let mut value = vec![0u8; args.value_bytes];
    rand::rng().fill_bytes(&mut value);
    let value = Arc::new(value);

    eprintln!("catalog_bench: RocksDB fsync baseline ({:.1} s)", secs.as_secs_f64());
    let rocks = {
        let (scratch_path, value) = (&scratch, value.clone());
        tokio::task::block_in_place(|| rocksdb_baseline(scratch_path, secs, &value, args.keys_per_client))?
    };
    let one = bench_cluster(&args, &scratch, &node_bin, 1, secs, warmup, value.clone()).await?;
    let three = bench_cluster(&args, &scratch, &node_bin, 3, secs, warmup, value.clone()).await?;

    let mut report = Report::new(
        "catalog_bench",
        "catalog writes (kv_put, client-observed commit) on a 3-node loopback cluster, beside a 1-node cluster \
         and a local fsynced RocksDB put",
    );
    report.param("clients", args.clients.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(","));
    report.param("secs", secs.as_secs_f64());
    report.param("warmup_secs", warmup.as_secs_f64());
    report.param("value_bytes", args.value_bytes as u64);
    report.param("keys_per_client", args.keys_per_client);
    report.param("batch_proposals", args.batch_proposals);
    report.param("election_timeout_ms", args.cluster.election_timeout_ms());
    report.param("dir", scratch.path().display().to_string());

    let mut t = Table::new(
        "Catalog writes: measured (3 nodes) beside baselines; 'x baseline' columns compare the 3-node row with the row under it",
        &["scenario", "clients", "writes/s", "p50 ms", "p99 ms", "max ms", "errors", "writes/s x", "p50 x"],
    );
    let push = |t: &mut Table, name: &str, r: &LoadResult, vs: Option<&LoadResult>| {
        t.row(vec![
            Cell::text(name),
            Cell::int(r.clients as u64),
            Cell::num(r.per_sec(), 0),
            Cell::num(r.latency.p50_ms, 3),
            Cell::num(r.latency.p99_ms, 3),
            Cell::num(r.latency.max_ms, 3),
            Cell::int(r.errors),
            vs.map_or(Cell::Empty, |b| Cell::ratio(ratio(r.per_sec(), b.per_sec()))),
            vs.map_or(Cell::Empty, |b| Cell::ratio(ratio(r.latency.p50_ms, b.latency.p50_ms))),
        ]);
    };
    for (m, b) in three.iter().zip(&one) {
        push(&mut t, "3-node cluster (Raft, fsync on every node)", m, Some(b));
        push(&mut t, "  baseline (a): 1-node cluster, no replication", b, None);
    }
    if let Some(m1) = three.iter().find(|r| r.clients == 1) {
        push(&mut t, "3-node cluster (Raft, fsync on every node)", m1, Some(&rocks));
    }
    push(&mut t, "  baseline (b): RocksDB put + WAL fsync, in-process", &rocks, None);
    report.tables.push(t);

    if let Some(r) = three.iter().find(|r| r.clients == 1) {
        report.targets.push(TargetCheck::at_most(
            "commit p50, 3 nodes, 1 client",
            r.latency.p50_ms,
            TARGET_P50_MS,
            "ms",
            3,
        ));
    }
    if let Some(r) = three.iter().find(|r| r.clients == 64) {
        report.targets.push(TargetCheck::at_least(
            "writes/s, 3 nodes, 64 clients",
            r.per_sec(),
            TARGET_WRITES_PER_S,
            "writes/s",
            0,
        ));
    }
    for r in three.iter().chain(&one) {
        if let Some(e) = &r.first_error {
            report.note(format!("{} client(s): {} errors; first: {e}", r.clients, r.errors));
        }
    }
    report.note(format!(
        "all nodes, the benchmark client and the RocksDB baseline share this machine's {} CPUs; nodes run the dev-profile \
         haven-node binary at {}",
        haven_benches::cpus(),
        node_bin.display()
    ));
    let code = report.print(args.run.json, args.run.enforce_targets);
    // `exit` skips destructors: remove the scratch directory first.
    drop(scratch);
    std::process::exit(code);
}
