//! `ha_bench`: HA pairs (C6) on a real 3-node local cluster of `haven-node` processes, simulated
//! guests, with the unprotected VM measured in the same run as the baseline.
//!
//! 1. Throughput cost of protection: a VM of `--memory-mib` (64) dirtying `--dirty-rate` (5000)
//!    pages/s, writing `--disk-rate` (200) blocks/s to a `--replicas` (3) replica volume, runs
//!    for `--secs` (10; 3 with --quick) unprotected, then (a fresh VM each time) protected in
//!    redundant mode at each of `--epochs` (10,30,100 ms); then a VM without a disk unprotected
//!    and in multi-operation mode (which refuses VMs that write their disks). Per config: the
//!    guest's page writes/s (`vm_status().writes` delta), acknowledged disk writes/s
//!    (`vm_check().disks[0].acked` delta), and sequential `app_put`s for `--put-secs` (3; 1 with
//!    --quick): rate and latency p50/p99 (an unprotected VM has no application state to put to:
//!    n/a).
//! 2. Checkpoint pauses in redundant mode, from the primary's `ha_status` (a histogram of whole
//!    ms with buckets 1, 2, 3, 5, 7, 10, 15, ... ms, over every epoch since the pair started).
//!    Target: p99 <= 10 ms.
//! 3. Failover: `--reps` (3; 1 with --quick) times per mode, redundant at `--failover-epoch-ms`
//!    (30, the VM with its disk) and multi-operation (no disk), each on a fresh 3-node cluster
//!    and a fresh VM and pair whose primary and standby are the two hosts that do not lead Raft
//!    (so the kill costs no election): `kill -9` the primary's host, then time until the catalog
//!    names the standby primary (the leader's decision, observed), and until `vm_status` answers
//!    `running` on the standby (probes every 20 ms through the survivors); beside the catalog's
//!    `last_failover.took_ms` (decision -> running, on the leader's clock), and whether the
//!    application puts acknowledged before the kill are all there. Detection waits
//!    `[ha] heartbeat_loss_ms` (600 ms by default) by design. Targets: kill -> running <= 2 s
//!    redundant, <= 1 s multi-operation (worst repetition). `--restart-killed` runs every
//!    repetition on one cluster instead, restarting the killed node after each; a pair that fails
//!    over before its kill is reported as a failed repetition, with the node log lines about it.
//!
//! The simulated guest keeps one disk write in flight per disk and the bench's puts are
//! sequential, so under redundant mode's output commit each completes at most once per epoch.
//!
//! A config or repetition that fails prints what failed and the run goes on; the exit status is
//! then 1.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use haven_benches::cluster::{ClusterFlags, RunningCluster, HEALTHY_TIMEOUT};
use haven_benches::latency::{max_of, quantile, quantile_ms};
use haven_benches::report::ratio;
use haven_benches::{Cell, Report, Table, TargetCheck};
use haven_client::proto::ha::{HaMode, HaVmStatus};
use haven_client::proto::vm::VmRunState;
use haven_client::proto::{NodeId, VmId, VolumeId};
use haven_client::vms::VmSpec;
use haven_client::volumes::VolumeSpec;
use haven_client::HavenClient;

/// Checkpoint pause p99 in redundant mode, at most.
const TARGET_PAUSE_P99_MS: f64 = 10.0;
/// kill -9 of the primary's host -> VM running on the standby, at most (worst repetition).
const TARGET_FAILOVER_REDUNDANT_MS: f64 = 2_000.0;
const TARGET_FAILOVER_MULTI_MS: f64 = 1_000.0;
/// The bench's disk: small, so each `vm_check` reads it whole quickly.
const DISK_BYTES: u64 = 4 << 20;
/// Acknowledged puts made before each kill (and looked for after the failover).
const PUTS_BEFORE_KILL: u64 = 20;
/// How long a failover may take before the repetition is reported as failed.
const FAILOVER_GIVE_UP: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(about = "HA pairs: throughput cost of redundant and multi-operation protection vs an unprotected VM, \
                   checkpoint pauses, failover time after kill -9 of the primary's host")]
struct Args {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 64)]
    memory_mib: u64,
    /// Page writes per second of the guest's workload.
    #[arg(long, default_value_t = 5000)]
    dirty_rate: u64,
    /// Disk writes per second of the guest's workload (configs with a disk).
    #[arg(long, default_value_t = 200)]
    disk_rate: u64,
    /// Replicas of the guest's volume (1 to 3).
    #[arg(long, default_value_t = 3)]
    replicas: u8,
    /// Redundant-mode checkpoint epochs to measure, in ms, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "10,30,100")]
    epochs: Vec<u32>,
    /// Measured seconds per throughput config (default 10; 3 with --quick).
    #[arg(long)]
    secs: Option<f64>,
    /// Seconds of sequential application puts per protected config (default 3; 1 with --quick).
    #[arg(long)]
    put_secs: Option<f64>,
    /// Failover repetitions per mode (default 3; 1 with --quick).
    #[arg(long)]
    reps: Option<usize>,
    /// Checkpoint epoch of the redundant pairs that are failed over, in ms.
    #[arg(long, default_value_t = 30)]
    failover_epoch_ms: u32,
    /// Run every failover repetition on one cluster, restarting the killed node after each,
    /// instead of a fresh cluster per repetition.
    #[arg(long)]
    restart_killed: bool,
    /// Skip the throughput part (1 and 2).
    #[arg(long)]
    no_throughput: bool,
    /// Skip the failover part (3).
    #[arg(long)]
    no_failover: bool,
    #[command(flatten)]
    cluster: ClusterFlags,
    #[command(flatten)]
    run: haven_benches::report::RunFlags,
}

/// Where a bench VM runs: its host, the standby's, and the Raft leader (holds the volume's
/// primary; never killed).
#[derive(Debug, Clone, Copy)]
struct Placement {
    primary: NodeId,
    standby: NodeId,
    leader: NodeId,
}

/// A healthy 3-node cluster in `dir` whose hosts all recorded their VM capacity.
async fn start_cluster(
    args: &Args,
    node_bin: &std::path::Path,
    dir: &std::path::Path,
) -> anyhow::Result<RunningCluster> {
    let cluster = RunningCluster::start(dir, 3, node_bin, args.cluster.election_timeout_ms()).await?;
    let client = cluster.cluster.client()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.vm_capacity().await.map(|c| c.len()).unwrap_or(0) < 3 {
        if Instant::now() > deadline {
            bail!("hosts never recorded their VM capacity");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(cluster)
}

/// The primary and standby are the two hosts that do not lead Raft.
async fn placement(cluster: &RunningCluster, client: &HavenClient) -> anyhow::Result<Placement> {
    let leader = client.leader_status().await.context("asking who leads")?.id;
    let others: Vec<NodeId> = cluster.ids.iter().map(|&i| NodeId(i)).filter(|n| *n != leader).collect();
    if others.len() < 2 {
        bail!("need 2 hosts besides the leader {leader}, have {others:?}");
    }
    Ok(Placement { primary: others[0], standby: others[1], leader })
}

/// Retry `f` until it succeeds or 20 s pass (a leader change or a host still starting).
async fn eventually<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => bail!("{what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn wait_running(client: &HavenClient, vm: VmId, on: NodeId) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = client.vm_status(vm).await {
            if s.host == on && s.state == "running" && s.writes > 0 {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{vm} is not running on {on}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A bench VM and its disk.
struct BenchVm {
    id: VmId,
    volume: Option<VolumeId>,
}

/// Create a running VM on `at.primary`; with `disk`, a volume of `replicas` whose primary is the
/// leader (then the standby, then the VM's host) attached as its disk.
async fn make_vm(client: &HavenClient, args: &Args, name: &str, disk: bool, at: Placement) -> anyhow::Result<BenchVm> {
    let mut spec = VmSpec::new(name, args.memory_mib);
    spec.dirty_pages_per_sec = args.dirty_rate;
    spec.disk_writes_per_sec = if disk { args.disk_rate } else { 0 };
    spec.host = Some(at.primary);
    let v = eventually(&format!("creating {name}"), || async {
        match client.create_vm(&spec).await {
            Ok(v) => Ok(v),
            Err(e) => client.vm(name).await.map_err(|_| e),
        }
    })
    .await?;
    let mut volume = None;
    if disk {
        let vname = format!("{name}-disk");
        let mut vspec = VolumeSpec::new(&vname, DISK_BYTES, args.replicas);
        vspec.hosts = [at.leader, at.standby, at.primary].into_iter().take(usize::from(args.replicas)).collect();
        let vol = eventually(&format!("creating {vname}"), || async {
            match client.create_volume(&vspec).await {
                Ok(v) => Ok(v),
                Err(e) => client.volume(&vname).await.map_err(|_| e),
            }
        })
        .await?;
        client.attach_volume(v.id, vol.id).await.with_context(|| format!("attaching {vname} to {name}"))?;
        volume = Some(vol.id);
    }
    client.set_vm_state(v.id, VmRunState::Running).await.with_context(|| format!("starting {name}"))?;
    wait_running(client, v.id, at.primary).await?;
    Ok(BenchVm { id: v.id, volume })
}

/// Protect `vm` with a standby on `at.standby` and wait until the standby could take over.
async fn protect(client: &HavenClient, vm: VmId, at: Placement, mode: HaMode) -> anyhow::Result<()> {
    let pair = client.create_ha_pair(vm, Some(at.standby), mode).await.with_context(|| format!("protecting {vm}"))?;
    if pair.primary != at.primary || pair.standby != Some(at.standby) {
        bail!("the pair of {vm} is {} -> {:?}, asked for {} -> {}", pair.primary, pair.standby, at.primary, at.standby);
    }
    client.wait_ha_ready(vm, Duration::from_secs(60)).await.with_context(|| format!("waiting for {vm}'s standby"))?;
    Ok(())
}

/// Delete the VM (and so its pair) and its volume, so the next config runs alone. Best effort.
async fn remove(client: &HavenClient, vm: &BenchVm) {
    if let Err(e) = eventually("deleting the VM", || client.delete_vm(vm.id)).await {
        eprintln!("ha_bench: {e:#}");
    }
    if let Some(vol) = vm.volume {
        if let Err(e) = eventually("deleting the volume", || client.delete_volume(vol)).await {
            eprintln!("ha_bench: {e:#}");
        }
    }
    // Let the host tear the guests down before the next config measures.
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// A counter read at (about) an instant: the middle of the request that read it.
async fn sample<T, E, F: std::future::Future<Output = Result<T, E>>>(f: F) -> Result<(Instant, T), E> {
    let t = Instant::now();
    let v = f.await?;
    Ok((t + t.elapsed() / 2, v))
}

fn rate(a: (Instant, u64), b: (Instant, u64)) -> f64 {
    ratio(b.1.saturating_sub(a.1) as f64, (b.0 - a.0).as_secs_f64())
}

/// The disk's acknowledged writes (the first disk), retried: a check disturbed by the guest is
/// asked again.
async fn acked_writes(client: &HavenClient, vm: VmId) -> anyhow::Result<(Instant, u64)> {
    eventually("checking the guest's disk", || async {
        let (t, c) = sample(client.vm_check(vm)).await?;
        match c.disks.first() {
            Some(d) => Ok((t, d.acked)),
            None => Err(anyhow::anyhow!("{vm} reports no disk")),
        }
    })
    .await
}

struct Puts {
    count: usize,
    failed: usize,
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Sequential `app_put`s of 64-byte values for `secs`.
async fn puts_for(client: &HavenClient, vm: VmId, secs: f64) -> Puts {
    let mut lat = Vec::new();
    let mut failed = 0;
    let started = Instant::now();
    let mut i = 0u64;
    while started.elapsed().as_secs_f64() < secs {
        let value = format!("{i:064}").into_bytes();
        let t = Instant::now();
        match client.app_put(vm, &format!("k{:04}", i % 512), Some(value)).await {
            Ok(_) => lat.push(t.elapsed()),
            Err(e) => {
                failed += 1;
                if failed == 1 {
                    eprintln!("ha_bench: app_put on {vm} failed: {e}");
                }
            }
        }
        i += 1;
    }
    Puts {
        count: lat.len(),
        failed,
        per_sec: lat.len() as f64 / started.elapsed().as_secs_f64(),
        p50_ms: quantile_ms(&lat, 0.5),
        p99_ms: quantile_ms(&lat, 0.99),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Protection {
    None,
    Redundant(u32),
    MultiOp,
}

impl Protection {
    fn name(&self, disk: bool) -> String {
        match self {
            Self::None if disk => "none (baseline)".into(),
            Self::None => "none, no disk (baseline)".into(),
            Self::Redundant(e) => format!("redundant, epoch {e} ms"),
            Self::MultiOp => "multi-operation, no disk".into(),
        }
    }

    fn mode(&self) -> Option<HaMode> {
        match *self {
            Self::None => None,
            Self::Redundant(epoch_ms) => Some(HaMode::Redundant { epoch_ms }),
            Self::MultiOp => Some(HaMode::MultiOperation),
        }
    }
}

/// How long a throughput config measures the guest, then puts.
#[derive(Debug, Clone, Copy)]
struct Window {
    secs: f64,
    put_secs: f64,
}

/// What one throughput config measured.
struct Measured {
    page_wps: f64,
    disk_acked_ps: Option<f64>,
    puts: Option<Puts>,
    /// The primary's HA view at the start and the end of the window, and the seconds between.
    ha: Option<(HaVmStatus, HaVmStatus, f64)>,
}

async fn throughput(
    client: &HavenClient,
    args: &Args,
    at: Placement,
    name: &str,
    p: Protection,
    disk: bool,
    window: Window,
) -> anyhow::Result<Measured> {
    let Window { secs, put_secs } = window;
    let vm = make_vm(client, args, name, disk, at).await?;
    let measured = async {
        if let Some(mode) = p.mode() {
            protect(client, vm.id, at, mode).await?;
        }
        // Let the workload (and the checkpoint loop) settle.
        tokio::time::sleep(Duration::from_millis(if args.run.quick { 500 } else { 1000 })).await;
        let ha0 = match p.mode() {
            Some(_) => Some(sample(client.ha_status(vm.id, None)).await.context("HA status of the primary")?),
            None => None,
        };
        let w0 = sample(client.vm_status(vm.id)).await.context("VM status")?;
        let a0 = if disk { Some(acked_writes(client, vm.id).await?) } else { None };
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        let w1 = sample(client.vm_status(vm.id)).await.context("VM status")?;
        let a1 = if disk { Some(acked_writes(client, vm.id).await?) } else { None };
        let ha1 = match p.mode() {
            Some(_) => Some(sample(client.ha_status(vm.id, None)).await.context("HA status of the primary")?),
            None => None,
        };
        let puts = match p.mode() {
            Some(_) => Some(puts_for(client, vm.id, put_secs).await),
            None => None,
        };
        anyhow::Ok(Measured {
            page_wps: rate((w0.0, w0.1.writes), (w1.0, w1.1.writes)),
            disk_acked_ps: a0.zip(a1).map(|(a, b)| rate(a, b)),
            puts,
            ha: ha0.zip(ha1).map(|((t0, h0), (t1, h1))| (h0, h1, (t1 - t0).as_secs_f64())),
        })
    }
    .await;
    remove(client, &vm).await;
    measured
}

/// One failover repetition's figures.
struct Failover {
    from: NodeId,
    to: NodeId,
    decision_ms: Option<f64>,
    running_ms: Option<f64>,
    took_ms: Option<u64>,
    kept: usize,
    acked: usize,
}

/// Run `probe` every `every` (several in flight, each abandoned after `timeout`) until one says
/// yes; the time since `t0` when it answered, or `None` after `give_up`.
async fn first_yes<F, Fut>(t0: Instant, every: Duration, timeout: Duration, give_up: Duration, probe: F) -> Option<f64>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while t0.elapsed() < give_up {
        tokio::select! {
            _ = tick.tick() => {
                let fut = probe();
                set.spawn(async move {
                    match tokio::time::timeout(timeout, fut).await {
                        Ok(true) => Some(t0.elapsed().as_secs_f64() * 1e3),
                        _ => None,
                    }
                });
            }
            Some(Ok(Some(ms))) = set.join_next(), if !set.is_empty() => return Some(ms),
        }
    }
    None
}

/// Whether a node log line names `vm` (`vm-7`, not `vm-70`; or `VmId(7)`) or is an HA line.
fn about(line: &str, vm: VmId) -> bool {
    let name = vm.to_string();
    let named =
        line.match_indices(&name).any(|(i, _)| !line[i + name.len()..].starts_with(|c: char| c.is_ascii_digit()));
    named || line.contains(&format!("VmId({})", vm.0)) || line.contains(" HA ")
}

/// Node log lines about `vm` (and the HA leader's), the last few per node.
fn log_excerpt(cluster: &RunningCluster, vm: VmId) -> String {
    let mut out = String::new();
    for n in cluster.cluster.nodes() {
        let path = n.data_dir.join("node.log");
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        let lines: Vec<&str> = text.lines().filter(|l| about(l, vm)).collect();
        out.push_str(&format!(
            "--- {} (last {} of {} lines about {vm} or HA)\n",
            path.display(),
            lines.len().min(25),
            lines.len()
        ));
        for l in lines.iter().skip(lines.len().saturating_sub(25)) {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

async fn failover_once(
    cluster: &mut RunningCluster,
    args: &Args,
    name: &str,
    mode: HaMode,
    restart: bool,
) -> anyhow::Result<Failover> {
    let client = cluster.cluster.client()?;
    let at = placement(cluster, &client).await?;
    let leader_first = cluster.client_leader_first(at.leader)?;
    let disk = matches!(mode, HaMode::Redundant { .. });
    let vm = make_vm(&leader_first, args, name, disk, at).await?;
    protect(&leader_first, vm.id, at, mode).await?;
    let mut acked = Vec::new();
    for i in 0..PUTS_BEFORE_KILL {
        let key = format!("before/{i:03}");
        leader_first
            .app_put(vm.id, &key, Some(key.clone().into_bytes()))
            .await
            .with_context(|| format!("put {key}"))?;
        acked.push(key);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = leader_first.ha_pair(vm.id).await.context("reading the pair before the kill")?;
    if before.primary != at.primary || before.failovers > 0 {
        eprintln!("{}", log_excerpt(cluster, vm.id));
        bail!(
            "the pair of {} failed over BEFORE the kill (primary now {}, {} failovers, last {:?}); node log lines on \
             stderr",
            vm.id,
            before.primary,
            before.failovers,
            before.last_failover
        );
    }

    // A client that knows only the survivors, connected before the kill.
    let survivors = cluster.client_for(&[at.leader.0, at.standby.0])?;
    survivors.ha_pair(vm.id).await.context("reading the pair before the kill")?;
    let t0 = Instant::now();
    tokio::task::block_in_place(|| cluster.cluster.kill(at.primary.0)).context("kill -9 of the primary's host")?;
    eprintln!("ha_bench: {name}: killed {} (primary of {}), standby {}", at.primary, vm.id, at.standby);
    let every = Duration::from_millis(20);
    let (decision_ms, running_ms) = tokio::join!(
        first_yes(t0, every, Duration::from_secs(2), FAILOVER_GIVE_UP, || {
            let c = survivors.clone();
            let (vm, to) = (vm.id, at.standby);
            async move { c.ha_pair(vm).await.is_ok_and(|p| p.primary == to && p.failovers > 0) }
        }),
        first_yes(t0, every, Duration::from_secs(2), FAILOVER_GIVE_UP, || {
            let c = survivors.clone();
            let (vm, to) = (vm.id, at.standby);
            async move { c.vm_status(vm).await.is_ok_and(|s| s.host == to && s.state == "running") }
        }),
    );
    let mut took_ms = None;
    if running_ms.is_some() {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(p) = survivors.ha_pair(vm.id).await {
                if let Some(f) = p.last_failover.filter(|f| f.took_ms > 0 && f.to == at.standby) {
                    took_ms = Some(f.took_ms);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let kept = match eventually("reading the application state", || survivors.app_get(vm.id)).await {
        Ok(view) => acked.iter().filter(|k| view.entries.iter().any(|(key, v)| key == *k && v == k.as_bytes())).count(),
        Err(e) => {
            eprintln!("ha_bench: {name}: {e:#}");
            0
        }
    };
    if running_ms.is_none() || took_ms.is_none() {
        eprintln!(
            "ha_bench: {name}: the failover of {} from {} to {} did not complete (decision {decision_ms:?} ms, running \
             {running_ms:?} ms, took_ms {took_ms:?}); pair now: {:?}\n{}",
            vm.id,
            at.primary,
            at.standby,
            survivors.ha_pair(vm.id).await,
            log_excerpt(cluster, vm.id)
        );
    }

    let figures =
        Failover { from: at.primary, to: at.standby, decision_ms, running_ms, took_ms, kept, acked: acked.len() };
    if !restart {
        return Ok(figures);
    }
    // Bring the killed host back and wait for a healthy cluster before the next repetition.
    cluster.cluster.start(at.primary.0).with_context(|| format!("restarting {}", at.primary))?;
    let fresh = cluster.cluster.client()?;
    cluster
        .cluster
        .wait_healthy(&fresh, &cluster.ids.clone(), HEALTHY_TIMEOUT)
        .await
        .context("cluster healthy after the restart")?;
    let fresh = cluster.client_leader_first(placement(cluster, &fresh).await?.leader)?;
    remove(&fresh, &vm).await;
    Ok(figures)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args = Args::parse();
    haven_benches::report::exit_with("ha_bench", run(&args).await)
}

async fn run(args: &Args) -> anyhow::Result<i32> {
    let q = args.run.quick;
    let secs = args.secs.unwrap_or(if q { 3.0 } else { 10.0 }).max(0.5);
    let put_secs = args.put_secs.unwrap_or(if q { 1.0 } else { 3.0 }).max(0.1);
    let reps = args.reps.unwrap_or(if q { 1 } else { 3 }).max(1);
    anyhow::ensure!((1..=3).contains(&args.replicas), "--replicas must be 1 to 3");
    let loss_ms = haven_node::ha::core::HaTunables::default().heartbeat_loss_ms;
    let mut report = Report::new(
        "ha_bench",
        "HA pairs on a local 3-node cluster: guest and output throughput unprotected vs redundant (per epoch) and \
         multi-operation, checkpoint pauses, failover time after kill -9 of the primary's host",
    );
    report.param("memory_mib", args.memory_mib);
    report.param("dirty_rate", args.dirty_rate);
    report.param("disk_rate", args.disk_rate);
    report.param("replicas", u64::from(args.replicas));
    report.param("secs", secs);
    report.param("put_secs", put_secs);
    report.param("reps", reps as u64);
    report.param("heartbeat_loss_ms", loss_ms);

    let (node_bin, scratch) = args.cluster.prepare("haven-ha-bench")?;
    let mut failed = false;

    if !args.no_throughput {
        let cluster = start_cluster(args, &node_bin, &scratch.path().join("throughput")).await?;
        let client = cluster.cluster.client()?;
        let at = placement(&cluster, &client).await?;
        let client = cluster.client_leader_first(at.leader)?;
        report.note(format!(
            "roles: VMs on {}, standbys on {}, volume primary and Raft leader {}",
            at.primary, at.standby, at.leader
        ));
        let mut table = Table::new(
            format!(
                "1. Throughput: {} MiB guest dirtying {} pages/s, {} disk writes/s to a {}-replica volume (configs \
                 with a disk), {secs} s window per config; puts: sequential app_put of 64 B for {put_secs} s",
                args.memory_mib, args.dirty_rate, args.disk_rate, args.replicas
            ),
            &[
                "protection",
                "page writes/s",
                "x baseline",
                "disk writes acked/s",
                "x baseline",
                "app puts/s",
                "put p50 ms",
                "put p99 ms",
                "puts",
            ],
        );
        let mut pauses = Table::new(
            "2. Checkpoints in redundant mode (the primary's ha_status over the window; pauses: histogram bucket \
             upper bounds in whole ms, over every epoch since the pair started)",
            &[
                "epoch ms",
                "epochs/s",
                "acked/s",
                "epoch KiB mean",
                "pause p50 ms",
                "pause p99 ms",
                "mirror lag ms (end)",
                "outputs released/s",
            ],
        );
        let mut configs: Vec<(Protection, bool)> = vec![(Protection::None, true)];
        configs.extend(args.epochs.iter().map(|&e| (Protection::Redundant(e), true)));
        configs.push((Protection::None, false));
        configs.push((Protection::MultiOp, false));
        let (mut base_disk, mut base_nodisk): (Option<Measured>, Option<Measured>) = (None, None);
        for (n, (p, disk)) in configs.into_iter().enumerate() {
            let label = p.name(disk);
            eprintln!("ha_bench: throughput: {label}");
            match throughput(&client, args, at, &format!("tp{n}"), p, disk, Window { secs, put_secs }).await {
                Ok(m) => {
                    let base = if disk { base_disk.as_ref() } else { base_nodisk.as_ref() };
                    let x_pages = base.map_or(f64::NAN, |b| ratio(m.page_wps, b.page_wps));
                    let disk_cells = match (m.disk_acked_ps, base.and_then(|b| b.disk_acked_ps)) {
                        (Some(d), Some(b)) => [Cell::num(d, 0), Cell::ratio(ratio(d, b))],
                        (Some(d), None) => [Cell::num(d, 0), Cell::text("n/a")],
                        (None, _) => [Cell::text("n/a"), Cell::text("n/a")],
                    };
                    let [d0, d1] = disk_cells;
                    let put_cells = match &m.puts {
                        Some(pt) => vec![
                            Cell::num(pt.per_sec, 1),
                            Cell::num(pt.p50_ms, 2),
                            Cell::num(pt.p99_ms, 2),
                            Cell::int(pt.count as u64),
                        ],
                        None => vec![Cell::text("n/a"), Cell::text("n/a"), Cell::text("n/a"), Cell::text("n/a")],
                    };
                    if let Some(pt) = m.puts.as_ref().filter(|pt| pt.failed > 0) {
                        report.note(format!("{label}: {} of {} app_puts failed", pt.failed, pt.failed + pt.count));
                        failed = true;
                    }
                    let mut row = vec![
                        Cell::text(&label),
                        Cell::num(m.page_wps, 0),
                        if p == Protection::None { Cell::text("1 (baseline)") } else { Cell::ratio(x_pages) },
                        d0,
                        if p == Protection::None && disk { Cell::text("1 (baseline)") } else { d1 },
                    ];
                    row.extend(put_cells);
                    table.row(row);
                    if let (Protection::Redundant(e), Some((h0, h1, window_s))) = (p, &m.ha) {
                        let per_s = |a: u64, b: u64| b.saturating_sub(a) as f64 / window_s;
                        pauses.row(vec![
                            Cell::int(u64::from(e)),
                            Cell::num(per_s(h0.epochs, h1.epochs), 1),
                            Cell::num(per_s(h0.epochs_acked, h1.epochs_acked), 1),
                            Cell::num(h1.epoch_bytes_mean as f64 / 1024.0, 1),
                            Cell::int(h1.pause_p50_ms),
                            Cell::int(h1.pause_p99_ms),
                            Cell::int(h1.mirror_lag_ms),
                            Cell::num(per_s(h0.outputs_released, h1.outputs_released), 1),
                        ]);
                        report.targets.push(TargetCheck::at_most(
                            format!("checkpoint pause p99, redundant epoch {e} ms"),
                            h1.pause_p99_ms as f64,
                            TARGET_PAUSE_P99_MS,
                            "ms",
                            0,
                        ));
                    }
                    if p == Protection::None {
                        if disk {
                            base_disk = Some(m);
                        } else {
                            base_nodisk = Some(m);
                        }
                    }
                }
                Err(e) => {
                    eprintln!("ha_bench: {label} FAILED: {e:#}");
                    report.note(format!("throughput {label} FAILED: {e:#}"));
                    failed = true;
                    let mut row = vec![Cell::text(format!("{label} (FAILED)"))];
                    row.extend((0..8).map(|_| Cell::text("-")));
                    table.row(row);
                    if let Protection::Redundant(e) = p {
                        report.targets.push(TargetCheck {
                            what: format!("checkpoint pause p99, redundant epoch {e} ms"),
                            target: format!("<= {TARGET_PAUSE_P99_MS} ms"),
                            measured: "not measured (the config failed)".into(),
                            met: false,
                        });
                    }
                }
            }
        }
        report.tables.push(table);
        report.tables.push(pauses);
    }

    if !args.no_failover {
        let mut table = Table::new(
            format!(
                "3. Failover after kill -9 of the primary's host ({reps} per mode, a fresh VM and pair {}, primary and \
                 standby the two non-leader hosts). Detection takes [ha] heartbeat_loss_ms = {loss_ms} ms by design \
                 (a primary is lost only after that much silence)",
                if args.restart_killed {
                    "on one cluster, the killed node restarted after each"
                } else {
                    "on a fresh cluster each"
                }
            ),
            &[
                "mode",
                "rep",
                "primary -> standby",
                "kill -> decision ms",
                "kill -> running ms",
                "took_ms (decision -> running)",
                "acked puts kept",
            ],
        );
        let modes = [
            (
                format!("redundant, epoch {} ms, disk", args.failover_epoch_ms),
                HaMode::Redundant { epoch_ms: args.failover_epoch_ms },
                TARGET_FAILOVER_REDUNDANT_MS,
            ),
            ("multi-operation, no disk".to_string(), HaMode::MultiOperation, TARGET_FAILOVER_MULTI_MS),
        ];
        let mut shared = None;
        for (m, (label, mode, target)) in modes.into_iter().enumerate() {
            let mut walls = Vec::new();
            let mut complete = true;
            for rep in 1..=reps {
                eprintln!("ha_bench: failover: {label}, rep {rep}");
                let mut fresh = None;
                let dir = scratch.path().join(format!("failover-{m}-{rep}"));
                let cluster = match (args.restart_killed, &mut shared) {
                    (true, Some(c)) => Ok(c),
                    (true, slot @ None) => {
                        start_cluster(args, &node_bin, &scratch.path().join("failover")).await.map(|c| slot.insert(c))
                    }
                    (false, _) => start_cluster(args, &node_bin, &dir).await.map(|c| fresh.insert(c)),
                };
                let attempt = match cluster {
                    Ok(c) => failover_once(c, args, &format!("fo{m}-{rep}"), mode, args.restart_killed).await,
                    Err(e) => Err(e),
                };
                drop(fresh);
                match attempt {
                    Ok(f) => {
                        match f.running_ms {
                            Some(w) => walls.push(w),
                            None => complete = false,
                        }
                        if f.running_ms.is_none() || f.took_ms.is_none() || f.kept < f.acked {
                            failed = true;
                            report.note(format!(
                                "{label} rep {rep}: FAILOVER INCOMPLETE OR LOSSY: decision {:?} ms, running {:?} ms, \
                                 took_ms {:?}, {} of {} acknowledged puts kept (node log lines on stderr)",
                                f.decision_ms, f.running_ms, f.took_ms, f.kept, f.acked
                            ));
                        }
                        table.row(vec![
                            Cell::text(&label),
                            Cell::int(rep as u64),
                            Cell::text(format!("{} -> {}", f.from, f.to)),
                            Cell::opt(f.decision_ms, 0),
                            Cell::opt(f.running_ms, 0),
                            Cell::opt(f.took_ms.map(|t| t as f64), 0),
                            Cell::text(format!("{}/{}", f.kept, f.acked)),
                        ]);
                    }
                    Err(e) => {
                        eprintln!("ha_bench: failover {label} rep {rep} FAILED: {e:#}");
                        report.note(format!("failover {label} rep {rep} FAILED: {e:#}"));
                        failed = true;
                        complete = false;
                        let mut row = vec![Cell::text(format!("{label} (FAILED)")), Cell::int(rep as u64)];
                        row.extend((0..5).map(|_| Cell::text("-")));
                        table.row(row);
                        // A shared cluster may be short of a node now: bring every node back.
                        if let Some(c) = shared.as_mut() {
                            for id in c.ids.clone() {
                                let _ = c.cluster.start(id);
                            }
                            let client = c.cluster.client()?;
                            c.cluster.wait_healthy(&client, &c.ids.clone(), HEALTHY_TIMEOUT).await?;
                        }
                    }
                }
            }
            let what = format!("failover kill -> running, {label} (worst of {reps})");
            report.targets.push(if walls.is_empty() || !complete {
                TargetCheck {
                    what,
                    target: format!("<= {target:.0} ms"),
                    measured: format!(
                        "{} of {reps} completed{}",
                        walls.len(),
                        if walls.is_empty() { String::new() } else { format!(", worst {:.0} ms", max_of(&walls)) }
                    ),
                    met: false,
                }
            } else {
                TargetCheck::at_most(what, max_of(&walls), target, "ms", 0)
            });
            if walls.len() > 1 {
                report.note(format!(
                    "{label}: kill -> running median {:.0} ms over {} reps",
                    quantile(&walls, 0.5),
                    walls.len()
                ));
            }
        }
        report.tables.push(table);
    }

    report.note(
        "x baseline: against the unprotected VM of the same shape measured in this run (with a disk for redundant \
         mode, without for multi-operation); n/a: an unprotected VM has no application state to put to, and \
         multi-operation refuses VMs that write their disks",
    );
    report.note("disk writes acked/s: the delta of vm_check's acknowledged disk writes over the window");
    report.note(
        "redundant mode: an output (a disk write, a put's answer) is released once the standby acknowledged the \
         epoch that issued it; the simulated guest keeps one disk write in flight per disk and the puts are \
         sequential, so each completes at most once per epoch (disk writes/s and puts/s ~ epochs/s, put latency ~ \
         one epoch)",
    );
    report.note("checkpoint pauses are whole ms in the buckets 1, 2, 3, 5, 7, 10, 15, ... ms: 1 means at most 1 ms");
    report.note(
        "multi-operation: the standby's guest runs its own copy of the workload beside the primary's, on the same \
         machine",
    );
    report.note(
        "kill -> decision: until the catalog names the standby primary (polled every 20 ms through the survivors); \
         kill -> running: until vm_status answers running on the standby (probes every 20 ms); took_ms: the catalog's last_failover \
         (the leader's decision until the new primary reported it runs the VM)",
    );
    report.note("the nodes, the guests' workload threads and this process share this machine's CPUs");
    let code = report.print(args.run.json, args.run.enforce_targets);
    Ok(if failed { 1 } else { code })
}
