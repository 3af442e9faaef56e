//! One chaos run: start the backend, run the workload while the fault schedule fires, heal
//! everything, then judge the run with the checkers and write the report. With `[blocks]`, the
//! volume is created once the cluster is healthy (before the clock starts) and the block
//! workload runs alongside the register workload; likewise `[operations]` and its volume,
//! `[vms]`, `[ha]` (guests protected by HA pairs, their application puts and a role sampler) and
//! `[shares]` (one shared dataset written at every member).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tracing::{info, warn};

use crate::backend::Backend;
use crate::blocks::{self, InSync};
use crate::checker::blocks::BlockCheck;
use crate::checker::operations::{Observations, OperationsCheck};
use crate::checker::{self, CheckResult, Stats};
use crate::ha;
use crate::history::{Op, Outcome};
use crate::monitor::{self, LeaderSample};
use crate::operations;
use crate::relay::LinkShape;
use crate::scenario::{FaultKind, FaultSpec, Scenario, Target};
use crate::shares;
use crate::vms;
use crate::workload;
use haven_client::proto::ha::HaPairRecord;
use haven_client::proto::share::{ShareMemberStatus, ShareRecord};
use haven_client::proto::vm::VmRecord;
use haven_client::proto::volume::{VolumeEvent, VolumeRecord};
use haven_client::proto::VmId;

/// A fault as it actually happened.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    pub kind: FaultKind,
    pub target: String,
    /// The node it hit (None when skipped).
    pub node: Option<u64>,
    pub at_ms: u64,
    pub healed_ms: Option<u64>,
    /// Whether the node was the leader when the fault fired.
    pub hit_leader: bool,
    /// Whether the node was the block volume's primary (as the catalog last said) when it fired.
    pub hit_volume_primary: bool,
    /// The HA VMs whose pair's primary the node was (as the catalog last said) when it fired.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hit_ha_primary: Vec<u64>,
    /// The other end of a `cut`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<u64>,
    /// Time until another node led with a higher term (leader faults only).
    pub failover_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OpCounts {
    pub ok: usize,
    pub failed: usize,
    pub indeterminate: usize,
}

impl OpCounts {
    fn of<'a>(ops: impl Iterator<Item = &'a Op> + Clone) -> Self {
        Self {
            ok: ops.clone().filter(|o| o.is_ok()).count(),
            failed: ops.clone().filter(|o| matches!(o.outcome, Outcome::Fail)).count(),
            indeterminate: ops.filter(|o| matches!(o.outcome, Outcome::Info)).count(),
        }
    }
}

/// What the block workload did and how its volume ended up.
#[derive(Debug, Clone, Serialize)]
pub struct BlockReport {
    /// The volume as created.
    pub volume: VolumeRecord,
    /// The volume as the catalog recorded it after the checks.
    pub final_volume: Option<VolumeRecord>,
    /// The acknowledged-blocks checker's counts and violations (absent when that checker is off).
    pub check: Option<BlockCheck>,
    /// Replica progress after healing (reported, not judged).
    pub in_sync: InSync,
    /// The volume's last 100 events.
    pub events: Vec<VolumeEvent>,
}
/// What the VM workload saw and how its VMs ended up.
#[derive(Debug, Clone, Serialize)]
pub struct VmReport {
    /// The VMs as the catalog recorded them after healing.
    pub final_vms: Vec<VmRecord>,
    /// Where each VM was installed after healing (one entry per node holding it).
    pub final_sightings: Vec<crate::vms::GuestSighting>,
    /// Surveys taken during the run.
    pub sightings: usize,
}

/// What the HA workload saw and how its pairs ended up.
#[derive(Debug, Clone, Serialize)]
pub struct HaReport {
    /// The VMs and their pairs as set up.
    pub vms: Vec<ha::HaVm>,
    /// What the healed cluster said: pairs, application states, data checks, the last survey.
    pub final_state: ha::HaFinal,
    /// The longest time a guest was seen running on two hosts at once (ms).
    pub longest_overlap_ms: u64,
    /// The sampler's log: every host's role and guest state per survey, and the catalog's pairs.
    pub observations: ha::HaObservations,
}

/// What the share workload did and how its share ended up.
#[derive(Debug, Clone, Serialize)]
pub struct ShareReport {
    /// The share as created.
    pub share: ShareRecord,
    /// The share as the catalog recorded it after the checks.
    pub final_share: Option<ShareRecord>,
    /// How long after the final reads began every member's copy was identical (None: never).
    pub converged_ms: Option<u64>,
    /// Each member's sync state after the checks.
    pub members: Vec<ShareMemberStatus>,
}

/// What the operations workload did and how its volume ended up.
#[derive(Debug, Clone, Serialize)]
pub struct OperationsReport {
    /// The volume as created.
    pub volume: VolumeRecord,
    /// The volume as the catalog recorded it after the checks.
    pub final_volume: Option<VolumeRecord>,
    /// Per operation, writes, read-backs judged and violations.
    pub check: OperationsCheck,
    /// What the read-backs and catalog reads saw, by op id.
    pub observations: Observations,
    /// The volume's last 100 events.
    pub events: Vec<VolumeEvent>,
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub scenario: Scenario,
    pub seed: u64,
    pub replay: String,
    pub passed: bool,
    pub wall_seconds: f64,
    pub faults: Vec<FaultRecord>,
    /// Register-workload operations.
    pub operations: OpCounts,
    /// Block writes (with `[blocks]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_writes: Option<OpCounts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocks: Option<BlockReport>,
    /// Migrations (with `[vms]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migrations: Option<OpCounts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vms: Option<VmReport>,
    /// The operations workload's writes and operations (with `[operations]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_operations: Option<OpCounts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operations_workload: Option<OperationsReport>,
    /// Application puts to the HA VMs (with `[ha]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_puts: Option<OpCounts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ha: Option<HaReport>,
    /// Share puts (with `[shares]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share_puts: Option<OpCounts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shares: Option<ShareReport>,
    pub failover_ms: Stats,
    pub heal_ms: Option<u64>,
    pub checkers: Vec<CheckResult>,
    pub leader_timeline: Vec<LeaderSample>,
    #[serde(skip)]
    pub history: Vec<Op>,
}

/// Options that are not part of the scenario.
pub struct RunOptions {
    pub scenario_path: PathBuf,
    pub out_dir: PathBuf,
}

/// Run `scenario` and write its report into `opts.out_dir`.
pub async fn run(scenario: Scenario, opts: &RunOptions) -> anyhow::Result<RunReport> {
    let wall = Instant::now();
    std::fs::create_dir_all(&opts.out_dir).with_context(|| format!("creating {}", opts.out_dir.display()))?;
    let schedule = scenario.schedule();
    info!(name = %scenario.name, seed = scenario.seed, faults = schedule.len(), "starting chaos run");
    let mut backend = Backend::start(&scenario, &opts.out_dir).await?;
    let result = drive(&scenario, &schedule, &mut backend, opts, wall).await;
    backend.teardown().await;
    let report = result?;
    crate::report::write(&report, &opts.out_dir)?;
    Ok(report)
}

async fn drive(
    scenario: &Scenario,
    schedule: &[FaultSpec],
    backend: &mut Backend,
    opts: &RunOptions,
    wall: Instant,
) -> anyhow::Result<RunReport> {
    backend.wait_healthy(Duration::from_secs(60)).await.context("the cluster did not become healthy")?;
    let volume = match &scenario.blocks {
        Some(spec) => Some(
            blocks::setup_volume(&backend.client()?, spec, Duration::from_secs(60))
                .await
                .context("setting up the block workload's volume")?,
        ),
        None => None,
    };
    let vm_records = match &scenario.vms {
        Some(spec) => Some(
            vms::setup(&backend.client()?, spec, Duration::from_secs(60))
                .await
                .context("setting up the VM workload's guests")?,
        ),
        None => None,
    };
    let ops_volume = match &scenario.operations {
        Some(spec) => Some(
            operations::setup(&backend.client()?, spec, Duration::from_secs(60))
                .await
                .context("setting up the operations workload's volume")?,
        ),
        None => None,
    };
    let node_ids = backend.node_ids();
    let ha_vms = match &scenario.ha {
        Some(spec) => Some(
            ha::setup(&backend.client()?, spec, &node_ids, Duration::from_secs(60) + spec.ready_within)
                .await
                .context("setting up the HA workload's pairs")?,
        ),
        None => None,
    };
    let share = match &scenario.shares {
        Some(spec) => Some(
            shares::setup(&backend.client()?, spec, &node_ids, Duration::from_secs(60))
                .await
                .context("setting up the share workload's share")?,
        ),
        None => None,
    };
    let epoch = Instant::now();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let history = Arc::new(Mutex::new(Vec::new()));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let nodes: Vec<(u64, std::net::SocketAddr)> =
        backend.node_ids().into_iter().filter_map(|id| backend.node_addr(id).map(|a| (id, a))).collect();
    let monitor = tokio::spawn(monitor::run(
        backend.client()?,
        nodes.clone(),
        epoch,
        Duration::from_millis(10),
        stop_rx.clone(),
        samples.clone(),
    ));
    let clients = (0..scenario.workload.clients).map(|_| backend.client()).collect::<anyhow::Result<Vec<_>>>()?;
    let workload = {
        let spec = scenario.workload.clone();
        let (seed, history, stop) = (scenario.seed, history.clone(), stop_rx.clone());
        tokio::spawn(async move { workload::run(&spec, seed, clients, epoch, stop, history).await })
    };
    let block_workload = match (&scenario.blocks, &volume) {
        (Some(spec), Some(vol)) => {
            let clients = (0..spec.writers).map(|_| backend.client()).collect::<anyhow::Result<Vec<_>>>()?;
            let readers = nodes.iter().map(|n| backend.client_of(n.0)).collect::<anyhow::Result<Vec<_>>>()?;
            let (spec, id, seed, history, stop) =
                (spec.clone(), vol.id, scenario.seed, history.clone(), stop_rx.clone());
            Some(tokio::spawn(
                async move { blocks::run(&spec, seed, id, clients, readers, epoch, stop, history).await },
            ))
        }
        _ => None,
    };
    let sightings: vms::Sightings = Arc::default();
    let vm_workload = match (&scenario.vms, &vm_records) {
        (Some(spec), Some(records)) => {
            let ids: Vec<VmId> = records.iter().map(|r| r.id).collect();
            let node_ids: Vec<u64> = nodes.iter().map(|n| n.0).collect();
            let (spec, seed, history, stop, sightings, client) =
                (spec.clone(), scenario.seed, history.clone(), stop_rx.clone(), sightings.clone(), backend.client()?);
            Some(tokio::spawn(async move {
                vms::run(&spec, seed, ids, node_ids, client, epoch, stop, history, sightings).await
            }))
        }
        _ => None,
    };
    let ha_observations: ha::SharedObservations = Arc::default();
    let ha_node_clients = match &ha_vms {
        Some(_) => {
            nodes.iter().map(|n| backend.client_of(n.0).map(|c| (n.0, c))).collect::<anyhow::Result<Vec<_>>>()?
        }
        None => Vec::new(),
    };
    let ha_workload = match (&scenario.ha, &ha_vms) {
        (Some(spec), Some(vms)) => {
            let env = ha::Env {
                spec: spec.clone(),
                vms: vms.clone(),
                put_clients: vms.iter().map(|_| backend.client()).collect::<anyhow::Result<Vec<_>>>()?,
                node_clients: ha_node_clients.clone(),
                catalog: backend.client()?,
                epoch,
                history: history.clone(),
                observations: ha_observations.clone(),
            };
            Some(tokio::spawn(ha::run(env, stop_rx.clone())))
        }
        _ => None,
    };
    let share_workload = match (&scenario.shares, &share) {
        (Some(spec), Some(share)) => {
            let clients = share.members.iter().map(|_| backend.client()).collect::<anyhow::Result<Vec<_>>>()?;
            let (spec, share, history, stop) = (spec.clone(), share.clone(), history.clone(), stop_rx.clone());
            Some(tokio::spawn(async move { shares::run(&spec, &share, clients, epoch, stop, history).await }))
        }
        _ => None,
    };
    let observations: operations::SharedObservations = Arc::default();
    let ops_env = ops_volume.as_ref().zip(scenario.operations.as_ref()).map(|(v, spec)| operations::Env {
        spec: spec.clone(),
        seed: scenario.seed,
        volume: v.clone(),
        nodes: nodes.iter().map(|n| n.0).collect(),
        epoch,
        history: history.clone(),
        observations: observations.clone(),
    });
    let ops_workload = match &ops_env {
        Some(env) => {
            let clients = (0..=env.spec.writers).map(|_| backend.client()).collect::<anyhow::Result<Vec<_>>>()?;
            let (env, stop) = (env.clone(), stop_rx.clone());
            Some(tokio::spawn(async move { operations::run(env, clients, stop).await }))
        }
        None => None,
    };
    // Asks the catalog for the volume's primary when a fault fires: the block workload's
    // volume, else the operations workload's.
    let probe = backend.client()?.with_deadline(Duration::from_secs(1));
    let probed = volume.as_ref().or(ops_volume.as_ref()).map(|v| v.id);
    let mut volume_primary = volume.as_ref().or(ops_volume.as_ref()).map(|v| v.primary.0);
    // Likewise each HA VM's primary (the `ha_primary` target is the first VM's).
    let mut ha_primaries: BTreeMap<u64, u64> = ha_vms.iter().flatten().map(|v| (v.id.0, v.pair.primary.0)).collect();
    let first_ha_vm = ha_vms.as_ref().and_then(|v| v.first()).map(|v| v.id.0);

    // Fire the schedule. Heals are kept in a queue ordered by time so that process faults heal
    // in order even when they overlap.
    let mut rng = rand::rngs::StdRng::seed_from_u64(scenario.seed ^ 0x7a4_9e7);
    let mut records: Vec<FaultRecord> = Vec::new();
    let mut pending_heals: BTreeMap<(Duration, usize), (FaultKind, u64)> = BTreeMap::new();
    let mut faulted: HashMap<u64, FaultKind> = HashMap::new();
    for spec in schedule {
        heal_due(backend, &mut pending_heals, &mut faulted, &mut records, epoch, spec.at).await;
        sleep_until(epoch, spec.at).await;
        if let Some(vol) = probed {
            // The catalog's view; when it cannot be asked, the last answer stands.
            if let Ok(v) = probe.volume(&vol.0.to_string()).await {
                volume_primary = Some(v.primary.0);
            }
        }
        if let Some(vms) = &ha_vms {
            ha_primaries.extend(ha::primaries(&probe, vms).await);
        }
        if probed.is_some() || ha_vms.is_some() {
            // Asking may have taken a while: apply the heals that fell due meanwhile first.
            let now = epoch.elapsed();
            heal_due(backend, &mut pending_heals, &mut faulted, &mut records, epoch, now).await;
        }
        let t_ms = epoch.elapsed().as_millis() as u64;
        let leader = monitor::leader_at(&samples.lock().expect("samples"), t_ms);
        let ha_primary = first_ha_vm.and_then(|vm| ha_primaries.get(&vm).copied());
        let node =
            pick_target(spec.target, leader.map(|l| l.0), volume_primary, ha_primary, &nodes, &faulted, &mut rng);
        let mut record = FaultRecord {
            kind: spec.kind,
            target: spec.target.to_string(),
            node,
            at_ms: t_ms,
            healed_ms: None,
            hit_leader: node.is_some() && node == leader.map(|l| l.0),
            hit_volume_primary: node.is_some() && node == volume_primary,
            hit_ha_primary: ha_primaries.iter().filter(|(_, p)| Some(**p) == node).map(|(vm, _)| *vm).collect(),
            peer: None,
            failover_ms: None,
            skipped: None,
        };
        match node {
            None => {
                record.skipped =
                    Some("no eligible node (all targets already faulted, or no leader / primary known)".into())
            }
            Some(n) => match inject(backend, spec, n, &nodes, &mut rng).await {
                Ok(peer) => {
                    record.peer = peer;
                    info!(kind = %spec.kind, node = n, t_ms, "fault injected");
                    faulted.insert(n, spec.kind);
                    pending_heals.insert((spec.at + spec.heal_after, records.len()), (spec.kind, n));
                }
                Err(e) => record.skipped = Some(format!("injection failed: {e:#}")),
            },
        }
        records.push(record);
    }
    heal_due(backend, &mut pending_heals, &mut faulted, &mut records, epoch, scenario.duration).await;
    sleep_until(epoch, scenario.duration).await;

    // End of the run: stop the clients, heal everything, and time the recovery.
    let _ = stop_tx.send(true);
    let _ = workload.await;
    if let Some(w) = block_workload {
        let _ = w.await;
    }
    if let Some(w) = vm_workload {
        let _ = w.await;
    }
    if let Some(w) = ops_workload {
        let _ = w.await;
    }
    if let Some(w) = ha_workload {
        let _ = w.await;
    }
    if let Some(w) = share_workload {
        let _ = w.await;
    }
    heal_due(backend, &mut pending_heals, &mut faulted, &mut records, epoch, Duration::MAX).await;
    backend.heal_links().await?;
    let healed_at = Instant::now();
    let heal = backend.wait_healthy(scenario.checkers.heal_within).await;
    let heal_ms = heal.as_ref().ok().map(|_| healed_at.elapsed().as_millis() as u64);
    let _ = monitor.await;

    if let Some(env) = &ops_env {
        operations::final_read(env, &backend.client()?).await;
    }
    let history = std::mem::take(&mut *history.lock().expect("history"));
    let samples = std::mem::take(&mut *samples.lock().expect("samples"));
    for r in &mut records {
        if let (true, Some(n)) = (r.hit_leader, r.node) {
            if let Some((_, term)) = monitor::leader_at(&samples, r.at_ms) {
                r.failover_ms = monitor::failover_ms(&samples, r.at_ms, n, term);
            }
        }
    }

    let mut checks = Vec::new();
    checks.push(match &heal {
        Ok(leader) => CheckResult::pass(
            "heals",
            format!("one healthy leader (node-{leader}) {} ms after the last fault healed", heal_ms.unwrap_or(0)),
        ),
        Err(e) => CheckResult::fail(
            "heals",
            format!("not healthy within {:?} of healing: {e:#}", scenario.checkers.heal_within),
            Vec::new(),
        ),
    });
    let registers = scenario.workload.clients > 0;
    if scenario.checkers.linearizable && registers {
        checks.push(checker::linearizable(&history));
    }
    if scenario.checkers.acknowledged_writes && registers {
        checks.push(match final_appends(backend, scenario.workload.clients).await {
            Ok(state) => checker::acknowledged_writes(&history, &state),
            Err(e) => {
                CheckResult::fail("acknowledged-writes", format!("could not read back the writes: {e:#}"), Vec::new())
            }
        });
    }
    let block_report = match (&scenario.blocks, volume) {
        (Some(spec), Some(vol)) => {
            let client = backend.client()?;
            let check = if scenario.checkers.acknowledged_blocks {
                let read = blocks::read_back(&client, spec, vol.id, spec.recover_within).await;
                let (result, check) = checker::blocks::acknowledged_blocks(&history, spec, &read);
                checks.push(result);
                checks.push(checker::blocks::fresh_reads(&history));
                Some(check)
            } else {
                None
            };
            let in_sync = match blocks::wait_in_sync(&client, vol.id, spec.in_sync_within).await {
                Ok(s) | Err(s) => s,
            };
            checks.push(CheckResult::pass("replicas-in-sync", in_sync.describe()));
            let (final_volume, events) = blocks::describe_volume(&client, vol.id).await;
            Some(BlockReport { volume: vol, final_volume, check, in_sync, events })
        }
        _ => None,
    };
    let vm_report = match (&scenario.vms, vm_records) {
        (Some(spec), Some(records)) => {
            let client = backend.client()?;
            let ids: Vec<VmId> = records.iter().map(|r| r.id).collect();
            let node_ids: Vec<u64> = nodes.iter().map(|n| n.0).collect();
            let (final_vms, final_sightings) =
                vms::final_survey(&client, &ids, &node_ids, epoch, spec.recover_within).await;
            let seen = std::mem::take(&mut *sightings.lock().expect("sightings"));
            let raw: Vec<u64> = ids.iter().map(|v| v.0).collect();
            checks.push(checker::vms::runs_once(
                checker::vms::runs_twice_during(&seen),
                checker::vms::placed_once_at_end(&raw, &final_vms, &final_sightings),
                ids.len(),
                seen.len(),
            ));
            checks.push(checker::vms::data(&vms::data_checks(&client, &ids).await));
            checks.push(checker::vms::migrations(&history));
            Some(VmReport { final_vms, final_sightings, sightings: seen.len() })
        }
        _ => None,
    };
    let ops_report = match &ops_env {
        Some(env) => Some(judge_operations(backend, env, &history, &mut checks).await?),
        None => None,
    };
    let ha_report = match (&scenario.ha, ha_vms) {
        (Some(spec), Some(vms)) => {
            let observations = std::mem::take(&mut *ha_observations.lock().expect("observations"));
            let client = backend.client()?;
            Some(
                judge_ha(spec, &client, &ha_node_clients, vms, observations, &records, &history, epoch, &mut checks)
                    .await,
            )
        }
        _ => None,
    };
    let share_report = match share {
        Some(share) => {
            let client = backend.client()?;
            let within = scenario.checkers.heal_within;
            let (copies, converged_ms) = shares::final_copies(&client, &share, within).await;
            checks.push(checker::shares::converged(&history, &copies, converged_ms, within.as_millis() as u64));
            let final_share = client.share(&share.id.0.to_string()).await.ok();
            let members = client.share_members(share.id).await.unwrap_or_default();
            Some(ShareReport { share, final_share, converged_ms, members })
        }
        None => None,
    };
    let leader_faults: Vec<&FaultRecord> = records.iter().filter(|r| r.hit_leader).collect();
    let failovers: Vec<f64> = leader_faults.iter().filter_map(|r| r.failover_ms).map(|m| m as f64).collect();
    let unrecovered = leader_faults.iter().filter(|r| r.failover_ms.is_none() && r.kind != FaultKind::Delay).count();
    checks.push(CheckResult {
        name: "failover".into(),
        passed: true,
        summary: format!(
            "{} leader faults, {} failovers measured{}",
            leader_faults.len(),
            failovers.len(),
            if unrecovered > 0 {
                format!(" ({unrecovered} healed before another node took over)")
            } else {
                String::new()
            }
        ),
        offending: Vec::new(),
    });

    let counts = OpCounts::of(history.iter().filter(|o| o.kind.is_register()));
    let block_writes = scenario.blocks.as_ref().map(|_| OpCounts::of(history.iter().filter(|o| o.kind.is_block())));
    let passed = checks.iter().all(|c| c.passed);
    Ok(RunReport {
        replay: replay_command(&opts.scenario_path, scenario.seed),
        seed: scenario.seed,
        scenario: scenario.clone(),
        passed,
        wall_seconds: wall.elapsed().as_secs_f64(),
        faults: records,
        operations: counts,
        block_writes,
        blocks: block_report,
        migrations: scenario.vms.as_ref().map(|_| OpCounts::of(history.iter().filter(|o| o.kind.is_migration()))),
        vms: vm_report,
        volume_operations: ops_env.as_ref().map(|_| OpCounts::of(history.iter().filter(|o| o.kind.is_operations()))),
        operations_workload: ops_report,
        app_puts: scenario.ha.as_ref().map(|_| OpCounts::of(history.iter().filter(|o| o.kind.is_app_put()))),
        ha: ha_report,
        share_puts: scenario.shares.as_ref().map(|_| OpCounts::of(history.iter().filter(|o| o.kind.is_share_put()))),
        shares: share_report,
        failover_ms: Stats::of(failovers),
        heal_ms,
        checkers: checks,
        leader_timeline: samples,
        history,
    })
}

/// The operations workload's checkers and report (after its final read-back).
async fn judge_operations(
    backend: &Backend,
    env: &operations::Env,
    history: &[Op],
    checks: &mut Vec<CheckResult>,
) -> anyhow::Result<OperationsReport> {
    let client = backend.client()?;
    let observations = std::mem::take(&mut *env.observations.lock().expect("observations"));
    let (data, catalog, check) =
        checker::operations::check(history, &observations, env.spec.ownership().owned_blocks());
    checks.push(data);
    checks.push(catalog);
    let (final_volume, events) = blocks::describe_volume(&client, env.volume.id).await;
    Ok(OperationsReport { volume: env.volume.clone(), final_volume, check, observations, events })
}

/// The HA workload's checkers and report: the final survey and reads, then `ha-single-primary`,
/// `ha-acked-updates`, `ha-data` and `ha-failovers`.
#[allow(clippy::too_many_arguments)]
async fn judge_ha(
    spec: &crate::scenario::HaSpec,
    client: &haven_client::HavenClient,
    node_clients: &[(u64, haven_client::HavenClient)],
    vms: Vec<ha::HaVm>,
    observations: ha::HaObservations,
    faults: &[FaultRecord],
    history: &[Op],
    epoch: Instant,
    checks: &mut Vec<CheckResult>,
) -> HaReport {
    use checker::ha as judge;
    let final_state = ha::final_state(client, node_clients, &vms, epoch, spec.recover_within).await;
    let max_overlap_ms = spec.max_overlap.as_millis() as u64;
    let mut all: Vec<ha::HaSighting> = observations.sightings.clone();
    all.extend(final_state.sightings.iter().cloned());
    let (runs, longest_overlap_ms) = judge::double_runs(&observations.sightings, max_overlap_ms);
    let at_end = judge::placed_once_at_end(&vms, &final_state.survey_pairs, &final_state.sightings);
    checks.push(judge::single_primary(
        judge::two_primaries(&all),
        runs,
        at_end,
        longest_overlap_ms,
        observations.sightings.len(),
        max_overlap_ms,
    ));
    checks.push(judge::acked_updates(history, &final_state.views));
    checks.push(checker::vms::data_named("ha-data", &final_state.checks));
    let kills: Vec<judge::PrimaryKill> = faults
        .iter()
        .filter(|f| f.kind == FaultKind::Kill && f.skipped.is_none())
        .flat_map(|f| f.hit_ha_primary.iter().map(move |vm| (f, *vm)))
        .filter_map(|(f, vm)| f.node.map(|node| judge::PrimaryKill { vm, node, at_ms: f.at_ms }))
        .collect();
    let initial: BTreeMap<u64, HaPairRecord> = vms.iter().map(|v| (v.id.0, v.pair.clone())).collect();
    checks.push(judge::failovers(&kills, &observations.pairs, &initial, &final_state.pairs));
    HaReport { vms, final_state, longest_overlap_ms, observations }
}

fn replay_command(path: &Path, seed: u64) -> String {
    format!("havenctl chaos run {} --seed {seed}", path.display())
}

async fn sleep_until(epoch: Instant, at: Duration) {
    let now = epoch.elapsed();
    if at > now && at != Duration::MAX {
        tokio::time::sleep(at - now).await;
    }
}

/// Apply every heal due before `until`, at its time.
async fn heal_due(
    backend: &mut Backend,
    pending: &mut BTreeMap<(Duration, usize), (FaultKind, u64)>,
    faulted: &mut HashMap<u64, FaultKind>,
    records: &mut [FaultRecord],
    epoch: Instant,
    until: Duration,
) {
    while let Some((&(at, idx), &(kind, node))) = pending.iter().next() {
        if at > until {
            return;
        }
        pending.remove(&(at, idx));
        if until != Duration::MAX {
            sleep_until(epoch, at).await;
        }
        let result = if kind.is_link_fault() {
            let mut r = Ok(());
            for other in backend.node_ids().into_iter().filter(|&o| o != node) {
                r = r.and(backend.shape(node, other, LinkShape::healthy()).await);
                r = r.and(backend.shape(other, node, LinkShape::healthy()).await);
            }
            r
        } else {
            backend.host_heal(kind, node).await
        };
        match result {
            Ok(()) => info!(%kind, node, "fault healed"),
            Err(e) => warn!(%kind, node, error = %format!("{e:#}"), "heal failed"),
        }
        faulted.remove(&node);
        if let Some(r) = records.get_mut(idx) {
            r.healed_ms = Some(epoch.elapsed().as_millis() as u64);
        }
    }
}

fn pick_target(
    target: Target,
    leader: Option<u64>,
    volume_primary: Option<u64>,
    ha_primary: Option<u64>,
    nodes: &[(u64, std::net::SocketAddr)],
    faulted: &HashMap<u64, FaultKind>,
    rng: &mut impl Rng,
) -> Option<u64> {
    let healthy: Vec<u64> = nodes.iter().map(|n| n.0).filter(|n| !faulted.contains_key(n)).collect();
    let pick = |v: &[u64], rng: &mut dyn rand::RngCore| (!v.is_empty()).then(|| v[rng.random_range(0..v.len())]);
    match target {
        Target::Leader => leader.filter(|l| healthy.contains(l)),
        Target::Follower => {
            let f: Vec<u64> = healthy.iter().copied().filter(|n| Some(*n) != leader).collect();
            pick(&f, rng)
        }
        Target::Random => pick(&healthy, rng),
        Target::Node(n) => healthy.contains(&n).then_some(n),
        Target::VolumePrimary => volume_primary.filter(|p| healthy.contains(p)),
        Target::HaPrimary => ha_primary.filter(|p| healthy.contains(p)),
    }
}

/// Inject `spec` on `node`; returns the other end of a `cut`.
async fn inject(
    backend: &mut Backend,
    spec: &FaultSpec,
    node: u64,
    nodes: &[(u64, std::net::SocketAddr)],
    rng: &mut impl Rng,
) -> anyhow::Result<Option<u64>> {
    let others: Vec<u64> = nodes.iter().map(|n| n.0).filter(|&n| n != node).collect();
    let cut = LinkShape { blocked: true, ..LinkShape::default() };
    match spec.kind {
        FaultKind::Cut => {
            anyhow::ensure!(!others.is_empty(), "a cut needs a second node");
            let peer = others[rng.random_range(0..others.len())];
            backend.shape(node, peer, cut).await?;
            backend.shape(peer, node, cut).await?;
            return Ok(Some(peer));
        }
        FaultKind::Kill | FaultKind::Pause => backend.host_fault(spec.kind, node).await?,
        FaultKind::Isolate => {
            for &o in &others {
                backend.shape(node, o, cut).await?;
                backend.shape(o, node, cut).await?;
            }
        }
        FaultKind::Partition => {
            for &o in &others {
                backend.shape(node, o, cut).await?;
            }
        }
        FaultKind::Delay | FaultKind::Loss | FaultKind::Reorder => {
            let amount = spec.amount;
            let shape = match spec.kind {
                FaultKind::Delay => {
                    LinkShape { delay: Duration::from_millis(amount.unwrap_or(50) as u64), ..LinkShape::default() }
                }
                FaultKind::Loss => LinkShape { loss_pct: amount.unwrap_or(30), ..LinkShape::default() },
                _ => LinkShape {
                    reorder_pct: amount.unwrap_or(30),
                    delay: Duration::from_millis(1),
                    ..LinkShape::default()
                },
            };
            for &o in &others {
                backend.shape(node, o, shape).await?;
                backend.shape(o, node, shape).await?;
            }
        }
    }
    Ok(None)
}

/// Read back every append key through the leader (linearizable scans, one per client).
async fn final_appends(backend: &Backend, clients: usize) -> anyhow::Result<HashMap<String, Vec<u8>>> {
    let client = backend.client()?;
    let mut out = HashMap::new();
    for c in 0..clients {
        let entries = client.kv_scan(&format!("{}{c}/", workload::APPEND_PREFIX), 100_000).await?;
        out.extend(entries);
    }
    Ok(out)
}
