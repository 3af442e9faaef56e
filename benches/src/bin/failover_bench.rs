//! `failover_bench`: how long a 3-node loopback cluster of real `haven-node` processes is without
//! a leader after the leader is killed with SIGKILL.
//!
//! Each round (`--rounds`, default 20; 5 with `--quick`): find the leader, kill -9 it, then
//! measure from the kill
//! (a) until a survivor reports a new leader in a newer term (`status_of` on every survivor every
//!     `--poll-ms`), and
//! (b) until a write is acknowledged: a `KvPut` is sent to every survivor every `--poll-ms`
//!     (`call_node`, several may be in flight; followers forward to the leader they know) and
//!     the first acknowledgement counts;
//! (c) optionally (`--sdk-probe`), until a `kv_put` retried through a `HavenClient` that was in use
//!     before the kill (leader cached, connections open) succeeds: what an application sees. The
//!     first put goes to the dead leader and ends `Indeterminate` (the client's stall watch shows
//!     it the new leader); the next one goes there.
//!
//! Then the killed node is restarted (after `--restart-delay-ms`) and the cluster must be healthy,
//! with one leader and term for `--settle-ms`, before the next round. Reported: median, p99 and
//! max over rounds, and a per-round table (with the Raft terms each round used).
//!
//! Baseline rows: the configured Raft election timeout range (min..2 x min from
//! `--election-timeout-ms`, as `haven-node init` sets it), and openraft 0.9's effective wait
//! before a follower that has followed a leader stands for election: its leader lease
//! (= the max) plus its election timeout, i.e. 3 x min..4 x min.
//! Targets: median <= 300 ms, p99 < 1 s.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use haven_benches::cluster::{await_new_leader, client_for, LeaderWatch, RunningCluster, HEALTHY_TIMEOUT};
use haven_benches::latency::quantile_ms;
use haven_benches::{Cell, Report, Table, TargetCheck};
use haven_client::proto::{ClientCommand, ClientRequest, ClientResponse, NodeId, NodeStatus};
use haven_client::HavenClient;
use tokio::task::JoinSet;

const TARGET_MEDIAN_MS: f64 = 300.0;
const TARGET_P99_MS: f64 = 1000.0;

#[derive(Parser, Debug)]
#[command(about = "Leader kill -9 -> new leader and first acknowledged write, on a 3-node loopback cluster")]
struct Args {
    /// Kill/restart rounds (default 20; 5 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Interval between status polls and between write probes, in ms.
    #[arg(long, default_value_t = 5)]
    poll_ms: u64,
    /// Longest a single status poll or write probe may take before it is abandoned, in ms.
    #[arg(long, default_value_t = 2000)]
    probe_timeout_ms: u64,
    /// Most write probes in flight at once (probes to a follower that still forwards to the dead
    /// leader hang until they time out).
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// Give up on a round after this many seconds without a new leader or an acknowledged write.
    #[arg(long, default_value_t = 30)]
    round_timeout_secs: u64,
    /// Before each kill the cluster must keep the same leader and term for this long, in ms
    /// (default 1000; 500 with --quick), so a restarted node that is still disrupting elections
    /// does not spill into the next round.
    #[arg(long)]
    settle_ms: Option<u64>,
    /// Wait this long after a round's measurements before restarting the killed node, in ms.
    /// With 0 the node usually returns while the survivors' QUIC connections to its dead process
    /// are still open (they expire after QUIC's 1 s idle timeout); above that it rejoins cleanly.
    #[arg(long, default_value_t = 0)]
    restart_delay_ms: u64,
    /// Also time a retried kv_put through a HavenClient that was in use before the kill.
    #[arg(long)]
    sdk_probe: bool,
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    #[command(flatten)]
    cluster: haven_benches::cluster::ClusterFlags,
    #[command(flatten)]
    run: haven_benches::report::RunFlags,
}

/// What one round measured; `None` when the round gave up first.
#[derive(Debug, Clone, Default)]
struct Round {
    killed: u64,
    new_leader: Option<u64>,
    leader_known: Option<Duration>,
    write_acked: Option<Duration>,
    sdk_write: Option<Duration>,
    /// SDK puts that failed before the first success (normally 1: the Indeterminate one).
    sdk_failed: u64,
    /// Times the SDK client's stall watch moved its leader hint this round.
    sdk_moves: u64,
    rejoin: Option<Duration>,
    /// Raft terms the round consumed, from the kill until the cluster settled again: 1 for a
    /// clean failover, more when elections were repeated (e.g. the restarted node campaigned).
    terms: u64,
    probes_sent: u64,
    probes_refused: u64,
    probes_timed_out: u64,
}

/// How one write probe ended.
enum ProbeOutcome {
    Acked(Instant),
    Refused,
    TimedOut,
}

/// What the probes of one round share.
struct Probes {
    /// A client created for this round, with live connections to every survivor.
    client: HavenClient,
    survivors: Vec<(u64, SocketAddr)>,
    /// The moment of the kill.
    t0: Instant,
    poll: Duration,
    probe_timeout: Duration,
    /// Time since `t0` after which the round gives up.
    give_up: Duration,
}

impl Probes {
    /// (a): poll every survivor until one reports a leader other than `killed` in a term after
    /// `old_term`. Returns the time since the kill and the new leader.
    async fn watch_for_leader(&self, killed: u64, old_term: u64) -> Option<(Duration, u64)> {
        let addrs: Vec<SocketAddr> = self.survivors.iter().map(|(_, a)| *a).collect();
        let watch = LeaderWatch { poll: self.poll, probe_timeout: self.probe_timeout, give_up: self.give_up };
        await_new_leader(&self.client, &addrs, killed, old_term, self.t0, watch).await
    }

    /// (b): every `poll`, send a put to each survivor (up to `max_in_flight` outstanding); the
    /// first acknowledgement ends the wait. Returns its time since the kill.
    async fn probe_writes(&self, key: String, max_in_flight: usize, round: &mut Round) -> Option<Duration> {
        let mut set: JoinSet<ProbeOutcome> = JoinSet::new();
        let mut seq = 0u64;
        let mut next_send = Instant::now();
        loop {
            if self.t0.elapsed() > self.give_up {
                return None;
            }
            if Instant::now() >= next_send {
                next_send = Instant::now() + self.poll;
                for &(_, addr) in &self.survivors {
                    if set.len() >= max_in_flight {
                        break;
                    }
                    seq += 1;
                    round.probes_sent += 1;
                    let (client, key, probe_timeout) = (self.client.clone(), key.clone(), self.probe_timeout);
                    let value = seq.to_be_bytes().to_vec();
                    set.spawn(async move {
                        let req = ClientRequest::Write { command: ClientCommand::KvPut { key, value } };
                        match tokio::time::timeout(probe_timeout, client.call_node(addr, req)).await {
                            Ok(Ok(ClientResponse::Written { .. })) => ProbeOutcome::Acked(Instant::now()),
                            Ok(_) => ProbeOutcome::Refused,
                            Err(_) => ProbeOutcome::TimedOut,
                        }
                    });
                }
            }
            let wait = next_send.saturating_duration_since(Instant::now());
            tokio::select! {
                Some(res) = set.join_next(), if !set.is_empty() => match res {
                    Ok(ProbeOutcome::Acked(at)) => return Some(at.duration_since(self.t0)),
                    Ok(ProbeOutcome::Refused) | Err(_) => round.probes_refused += 1,
                    Ok(ProbeOutcome::TimedOut) => round.probes_timed_out += 1,
                },
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// (c): retry a put through an SDK client that was in use before the kill, as an application
/// would. Returns the time of the first success and how many puts failed before it.
async fn sdk_write(client: &HavenClient, key: &str, t0: Instant, give_up: Duration) -> (Option<Duration>, u64) {
    let mut failed = 0;
    while t0.elapsed() < give_up {
        let remaining = give_up.saturating_sub(t0.elapsed());
        if let Ok(Ok(_)) = tokio::time::timeout(remaining, client.kv_put(key, b"sdk")).await {
            return (Some(t0.elapsed()), failed);
        }
        failed += 1;
    }
    (None, failed)
}

/// Wait until every node is healthy and the leader and term stay the same for `settle`.
/// Returns the leader's status then.
async fn settle_cluster(running: &mut RunningCluster, settle: Duration) -> anyhow::Result<NodeStatus> {
    let ids = running.ids.clone();
    let checker = client_for(&running.cluster, &ids)?;
    let mut last = running.cluster.wait_healthy(&checker, &ids, HEALTHY_TIMEOUT).await?;
    let mut changes = 0;
    loop {
        tokio::time::sleep(settle).await;
        let now = running.cluster.wait_healthy(&checker, &ids, HEALTHY_TIMEOUT).await?;
        if now.id == last.id && now.term == last.term {
            return Ok(now);
        }
        changes += 1;
        anyhow::ensure!(changes < 50, "the cluster keeps changing leader (now {} in term {})", now.id, now.term);
        last = now;
    }
}

async fn run_round(
    args: &Args,
    running: &mut RunningCluster,
    number: usize,
    poll: Duration,
    probe_timeout: Duration,
    settle: Duration,
) -> anyhow::Result<Round> {
    let ids = running.ids.clone();
    let checker = client_for(&running.cluster, &ids)?;
    let before = running.cluster.wait_healthy(&checker, &ids, HEALTHY_TIMEOUT).await?;
    drop(checker);
    let killed = before.id.0;
    let survivors: Vec<(u64, SocketAddr)> = ids
        .iter()
        .filter(|id| **id != killed)
        .map(|id| running.cluster.node(*id).map(|n| (*id, n.addr)))
        .collect::<Result<_, _>>()?;
    // Fresh probe client with live connections to every survivor, so no handshake is timed.
    let survivor_ids: Vec<u64> = survivors.iter().map(|(id, _)| *id).collect();
    let probe = client_for(&running.cluster, &survivor_ids)?;
    for (_, addr) in &survivors {
        probe.status_of(*addr).await?;
    }
    let sdk = if args.sdk_probe {
        let c = running.client_leader_first(NodeId(killed))?;
        c.kv_put(&format!("bench/failover/sdk-warm/{number}"), b"warm").await?;
        Some(c)
    } else {
        None
    };

    let mut round = Round { killed, ..Round::default() };
    let give_up = Duration::from_secs(args.round_timeout_secs);
    let t0 = Instant::now();
    tokio::task::block_in_place(|| running.cluster.kill(killed))?;

    let probes = Probes { client: probe, survivors, t0, poll, probe_timeout, give_up };
    let key = format!("bench/failover/{number}");
    let sdk_key = format!("bench/failover/sdk/{number}");
    let (leader, write, sdk_time) = {
        let leader_fut = probes.watch_for_leader(killed, before.term);
        let write_fut = probes.probe_writes(key, args.max_in_flight.max(1), &mut round);
        let sdk_fut = async {
            match &sdk {
                Some(c) => sdk_write(c, &sdk_key, t0, give_up).await,
                None => (None, 0),
            }
        };
        tokio::join!(leader_fut, write_fut, sdk_fut)
    };
    round.leader_known = leader.map(|(d, _)| d);
    round.new_leader = leader.map(|(_, l)| l);
    round.write_acked = write;
    (round.sdk_write, round.sdk_failed) = sdk_time;
    round.sdk_moves = sdk.as_ref().map_or(0, |c| c.stall_stats().leader_moves);

    // Restart the killed node and wait until all nodes agree on a leader again. A fresh client:
    // cached connections to the killed process would hang until QUIC's idle timeout.
    tokio::time::sleep(Duration::from_millis(args.restart_delay_ms)).await;
    let restart = Instant::now();
    running.cluster.start(killed)?;
    let checker = client_for(&running.cluster, &ids)?;
    running.cluster.wait_healthy(&checker, &ids, HEALTHY_TIMEOUT).await?;
    round.rejoin = Some(restart.elapsed());
    let settled = settle_cluster(running, settle).await?;
    round.terms = settled.term.saturating_sub(before.term);
    let fmt = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3));
    eprintln!(
        "failover_bench: round {number}: killed node-{killed} (term {}), new leader {} known after {}, write acked \
         after {}{}, rejoined after {}, {} term(s) used",
        before.term,
        round.new_leader.map_or("-".to_string(), |l| format!("node-{l}")),
        fmt(round.leader_known),
        fmt(round.write_acked),
        if args.sdk_probe { format!(", SDK write after {}", fmt(round.sdk_write)) } else { String::new() },
        fmt(round.rejoin),
        round.terms,
    );
    Ok(round)
}

fn stats_row(t: &mut Table, name: &str, samples: &[Option<Duration>], target: &str) {
    let ok: Vec<Duration> = samples.iter().flatten().copied().collect();
    t.row(vec![
        Cell::text(name),
        Cell::text(format!("{}/{}", ok.len(), samples.len())),
        Cell::num(quantile_ms(&ok, 0.5), 1),
        Cell::num(quantile_ms(&ok, 0.99), 1),
        Cell::num(quantile_ms(&ok, 1.0), 1),
        Cell::num(quantile_ms(&ok, 0.0), 1),
        Cell::text(target),
    ]);
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.nodes >= 3, "--nodes must be at least 3 so a quorum survives the kill");
    let rounds = args.rounds.unwrap_or(if args.run.quick { 5 } else { 20 }).max(1);
    let settle = Duration::from_millis(args.settle_ms.unwrap_or(if args.run.quick { 500 } else { 1000 }));
    let poll = Duration::from_millis(args.poll_ms.max(1));
    let probe_timeout = Duration::from_millis(args.probe_timeout_ms.max(1));
    let election_ms = args.cluster.election_timeout_ms();
    let (node_bin, scratch) = args.cluster.prepare("haven-failover-bench")?;

    let dir = scratch.path().join("cluster");
    eprintln!("failover_bench: starting a {}-node cluster in {}", args.nodes, dir.display());
    let mut running = RunningCluster::start(&dir, args.nodes, &node_bin, election_ms).await?;
    // One acknowledged write so every node has applied something before the first kill.
    running.client_leader_first(running.leader.id)?.kv_put("bench/failover/ready", b"1").await?;

    let mut results = Vec::with_capacity(rounds);
    settle_cluster(&mut running, settle).await?;
    for n in 1..=rounds {
        results.push(run_round(&args, &mut running, n, poll, probe_timeout, settle).await?);
    }
    drop(running);

    let mut report = Report::new(
        "failover_bench",
        format!("leader kill -9 -> new leader / first acknowledged write, {}-node loopback cluster", args.nodes),
    );
    report.param("rounds", rounds as u64);
    report.param("election_timeout_ms", election_ms);
    report.param("poll_ms", poll.as_millis() as u64);
    report.param("probe_timeout_ms", probe_timeout.as_millis() as u64);
    report.param("settle_ms", settle.as_millis() as u64);
    report.param("restart_delay_ms", args.restart_delay_ms);
    report.param("sdk_probe", args.sdk_probe);

    let target = format!("median <= {TARGET_MEDIAN_MS:.0} ms, p99 < {TARGET_P99_MS:.0} ms");
    let mut t = Table::new(
        "Failover after kill -9 of the leader (ms from the kill; 'ok' = rounds that finished)",
        &["measure", "ok", "median ms", "p99 ms", "max ms", "min ms", "target"],
    );
    let leader: Vec<Option<Duration>> = results.iter().map(|r| r.leader_known).collect();
    let write: Vec<Option<Duration>> = results.iter().map(|r| r.write_acked).collect();
    stats_row(&mut t, "(a) kill -> new leader known (status poll)", &leader, &target);
    stats_row(&mut t, "(b) kill -> first acknowledged write (probes)", &write, &target);
    if args.sdk_probe {
        let sdk: Vec<Option<Duration>> = results.iter().map(|r| r.sdk_write).collect();
        stats_row(&mut t, "(c) kill -> first write via a pre-kill HavenClient", &sdk, "-");
    }
    let (min, max) = (election_ms, election_ms * 2);
    t.row(vec![
        Cell::text(format!("baseline: configured election timeout {min}..{max} ms")),
        Cell::text("-"),
        Cell::Empty,
        Cell::Empty,
        Cell::int(max),
        Cell::int(min),
        Cell::text("-"),
    ]);
    // A follower that has followed a leader waits its lease (= election_timeout_max) plus its
    // election timeout (drawn once per process from min..max) after the last leader contact
    // before it stands: Haven's timer (`raft::campaign`) keeps openraft 0.9's rule
    // (RaftCore::handle_tick_election), then asks for pre-votes.
    t.row(vec![
        Cell::text(format!("baseline: lease + election timeout {}..{} ms", max + min, max + max)),
        Cell::text("-"),
        Cell::Empty,
        Cell::Empty,
        Cell::int(max + max),
        Cell::int(max + min),
        Cell::text("-"),
    ]);
    let rejoin: Vec<Option<Duration>> = results.iter().map(|r| r.rejoin).collect();
    stats_row(&mut t, "info: restart of killed node -> all healthy", &rejoin, "-");
    report.tables.push(t);

    let ms = |d: Option<Duration>| Cell::opt(d.map(|d| d.as_secs_f64() * 1e3), 1);
    let mut per = Table::new(
        "Rounds",
        &["round", "killed", "new leader", "(a) leader ms", "(b) write ms", "(c) SDK ms", "rejoin ms", "terms"],
    );
    for (i, r) in results.iter().enumerate() {
        per.row(vec![
            Cell::int(i as u64 + 1),
            Cell::text(format!("node-{}", r.killed)),
            r.new_leader.map_or(Cell::Empty, |l| Cell::text(format!("node-{l}"))),
            ms(r.leader_known),
            ms(r.write_acked),
            ms(r.sdk_write),
            ms(r.rejoin),
            Cell::int(r.terms),
        ]);
    }
    report.tables.push(per);

    for (what, samples) in [("(a) new leader known", &leader), ("(b) first acknowledged write", &write)] {
        // A round that never finished counts as infinitely slow.
        let all: Vec<Duration> = samples.iter().map(|s| s.unwrap_or(Duration::MAX)).collect();
        report.targets.push(TargetCheck::at_most(
            format!("{what}: median"),
            quantile_ms(&all, 0.5),
            TARGET_MEDIAN_MS,
            "ms",
            1,
        ));
        report.targets.push(TargetCheck::below(
            format!("{what}: p99"),
            quantile_ms(&all, 0.99),
            TARGET_P99_MS,
            "ms",
            1,
        ));
    }
    let (sent, refused, timed_out) = results
        .iter()
        .fold((0, 0, 0), |(s, r, t), x| (s + x.probes_sent, r + x.probes_refused, t + x.probes_timed_out));
    report.note(format!(
        "write probes over all rounds: {sent} sent, {refused} refused (no leader yet / not leader), {timed_out} timed \
         out after {} ms (typically forwarded to the dead leader); the rest were cancelled once one was acknowledged",
        probe_timeout.as_millis()
    ));
    report.note(format!(
        "a follower stands for election only after openraft's leader lease (= election_timeout_max, {max} ms) plus its \
         own election timeout ({min}..{max} ms) have passed without a heartbeat (its vote being committed), so with \
         these settings (a) is normally at least {} ms minus one heartbeat interval, and 2 x {max} ms more when the \
         candidate has lately seen a longer log than its own (openraft's smaller_log_timeout)",
        max + min
    ));
    let terms: u64 = results.iter().map(|r| r.terms).sum();
    report.note(format!(
        "'terms' = Raft terms a round used from the kill until the cluster held one leader for {} ms again ({terms} \
         over {rounds} rounds); 1 is a clean failover, more means repeated elections (e.g. the restarted node \
         campaigning before the leader reaches it)",
        settle.as_millis()
    ));
    if args.sdk_probe {
        let failed: u64 = results.iter().map(|r| r.sdk_failed).sum();
        let moved = results.iter().filter(|r| r.sdk_moves > 0).count();
        report.note(format!(
            "(c): {failed} SDK put(s) failed before the first success over {rounds} rounds (normally one per round: \
             the put in flight to the dead leader, Indeterminate); the client's stall watch moved its leader hint \
             in {moved} of {rounds} rounds (the others waited for QUIC's idle timeout)"
        ));
    }
    let failed = results.iter().filter(|r| r.leader_known.is_none() || r.write_acked.is_none()).count();
    if failed > 0 {
        report.note(format!("{failed} round(s) gave up after {} s", args.round_timeout_secs));
    }
    let code = report.print(args.run.json, args.run.enforce_targets);
    // `exit` skips destructors: remove the scratch directory first.
    drop(scratch);
    std::process::exit(code);
}
