//! The HA workload: `count` running guests, each protected by an HA pair (redundant or
//! multi-operation, as the scenario's `[ha] modes` cycle), while one client per VM puts keys of
//! the VM's application state (`app_put`) one at a time and a sampler asks every host, through a
//! client connected to that host itself, for the pair's role there (`HaStatus`) and the guest's
//! run state (`Status`) — so a host cut off from its peers is still seen. Every put is recorded
//! in the [`History`](crate::history) as an `app_put` (Ok = acknowledged, i.e. released by the
//! pair; Fail = certainly not applied; Info = unknown).
//!
//! This module does the I/O of the HA checkers (setup, puts, sampling, the final reads); the
//! judging is [`crate::checker::ha`], which only looks at what was observed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use haven_client::proto::ha::{AppView, HaMode, HaPairRecord, PairState};
use haven_client::proto::vm::{VmMessage, VmRequest, VmResponse, VmRunState};
use haven_client::proto::{ActorAddr, ActorKind, ActorMessage, ActorReply, NodeId, VmId};
use haven_client::vms::{VmCheck, VmSpec};
use haven_client::volumes::VolumeSpec;
use haven_client::HavenClient;
use serde::Serialize;
use tracing::{info, warn};

use crate::history::{Op, OpKind, Outcome};
use crate::scenario::{HaModeSpec, HaSpec};

/// How often the sampler surveys every host (half the VM sampler's period: a failover's
/// switch-over lasts about a second).
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Longest one question of a survey may take.
const ASK_WITHIN: Duration = Duration::from_secs(1);

/// The application key of slot `slot`.
pub fn app_key(slot: u64) -> String {
    format!("k{slot}")
}

/// The history key of VM `vm`'s application key `slot`.
pub fn history_key(vm: u64, slot: u64) -> String {
    format!("ha/{vm}/{}", app_key(slot))
}

/// The value the `n`th put of VM `vm`'s workload writes.
pub fn app_value(vm: u64, n: u64) -> Vec<u8> {
    format!("vm{vm}/n{n}").into_bytes()
}

/// The put number an application value of VM `vm` carries (None: not a value this workload
/// wrote for that VM).
pub fn decode_app_value(vm: u64, v: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(v).ok()?;
    let (who, n) = s.split_once('/')?;
    (who == format!("vm{vm}")).then_some(())?;
    n.strip_prefix('n')?.parse().ok()
}

fn vm_name(i: usize) -> String {
    format!("chaos-ha-{i}")
}

/// One protected VM of the workload.
#[derive(Debug, Clone, Serialize)]
pub struct HaVm {
    pub id: VmId,
    pub name: String,
    pub mode: HaMode,
    /// The pair once its standby was ready at setup.
    pub pair: HaPairRecord,
}

impl HaVm {
    pub fn multi_operation(&self) -> bool {
        self.mode == HaMode::MultiOperation
    }
}

/// Create (or adopt) the workload's VMs, start them, protect each with a pair and wait until
/// every standby is ready.
pub async fn setup(client: &HavenClient, spec: &HaSpec, nodes: &[u64], within: Duration) -> anyhow::Result<Vec<HaVm>> {
    let deadline = Instant::now() + within;
    loop {
        let hosts = client.vm_capacity().await.map(|c| c.len()).unwrap_or(0);
        if hosts >= 2 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "fewer than 2 hosts offer VM capacity");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut created = Vec::new();
    for i in 0..spec.count {
        let name = vm_name(i);
        let mode = match spec.mode_of(i) {
            HaModeSpec::Redundant => HaMode::Redundant { epoch_ms: spec.epoch_ms },
            HaModeSpec::MultiOperation => HaMode::MultiOperation,
        };
        // Multi-operation mode runs two guests; only one may write the disks, so those get none.
        let disk_rate = if mode == HaMode::MultiOperation { 0 } else { spec.disk_rate };
        let mut record = match client.vm(&name).await {
            Ok(r) => r,
            Err(_) => {
                let mut s = VmSpec::new(&name, spec.memory_mib);
                s.dirty_pages_per_sec = spec.dirty_rate;
                s.disk_writes_per_sec = disk_rate;
                client.create_vm(&s).await.with_context(|| format!("creating {name}"))?
            }
        };
        if disk_rate > 0 && record.volumes.is_empty() {
            let disk = format!("{name}-disk");
            let volume = match client.volume(&disk).await {
                Ok(v) => v,
                Err(_) => client
                    .create_volume(&VolumeSpec::new(&disk, spec.disk_mib << 20, 2))
                    .await
                    .with_context(|| format!("creating {disk}"))?,
            };
            record = client.attach_volume(record.id, volume.id).await.with_context(|| format!("attaching {disk}"))?;
        }
        client.set_vm_state(record.id, VmRunState::Running).await.with_context(|| format!("starting {name}"))?;
        created.push((i, record, mode));
    }
    for (_, v, _) in &created {
        loop {
            match client.vm_status(v.id).await {
                Ok(s) if s.state == "running" && s.writes > 0 => break,
                _ if Instant::now() >= deadline => anyhow::bail!("{} {:?} never started running", v.id, v.name),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    let leader = client.leader_status().await.map(|s| s.id.0).ok();
    let mut vms = Vec::new();
    for (i, record, mode) in created {
        let pair = match client.ha_pair(record.id).await {
            Ok(p) => p,
            Err(_) => {
                // Even VMs: a standby the harness picks (not the VM's host, the leader if it can
                // help it); odd VMs: the leader picks one.
                let standby = (i % 2 == 0).then(|| {
                    let others: Vec<u64> = nodes.iter().copied().filter(|n| *n != record.host.0).collect();
                    NodeId(others.iter().copied().find(|n| Some(*n) != leader).unwrap_or(others[0]))
                });
                match client.create_ha_pair(record.id, standby, mode).await {
                    Ok(p) => p,
                    // An outcome unknown (a leader change): the pair may exist.
                    Err(e) => client.ha_pair(record.id).await.map_err(|_| e).with_context(|| {
                        format!("protecting {} with a {mode:?} pair (standby {standby:?})", record.name)
                    })?,
                }
            }
        };
        info!(vm = %record.id, ?mode, primary = %pair.primary, standby = ?pair.standby, "HA pair created");
        vms.push(HaVm { id: record.id, name: record.name.clone(), mode, pair });
    }
    for v in &mut vms {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
        client.wait_ha_ready(v.id, left).await.with_context(|| format!("waiting for {}'s standby", v.name))?;
        v.pair = client.ha_pair(v.id).await.with_context(|| format!("reading {}'s pair", v.name))?;
    }
    info!(vms = vms.len(), "HA workload ready");
    Ok(vms)
}

/// One host's answer about one HA VM at one moment (the sampler's log).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HaSighting {
    pub t_ms: u64,
    pub vm: u64,
    pub node: u64,
    /// The pair's role on this host: `primary`, `standby-ready`, `standby-syncing`, `deposed`,
    /// `none` (None: the host follows no such pair, or did not answer).
    pub role: Option<String>,
    /// The newest pair generation the host heard of.
    pub generation: Option<u64>,
    /// The guest's run state there: `running`, `paused`, ... (None: no guest, or no answer).
    pub state: Option<String>,
    pub writes: Option<u64>,
    /// The pair runs in multi-operation mode (its standby's guest runs by design).
    pub multi_operation: bool,
}

/// The catalog's pair record at one moment.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PairSample {
    pub t_ms: u64,
    pub vm: u64,
    pub primary: u64,
    pub standby: Option<u64>,
    pub generation: u64,
    pub failovers: u64,
}

impl PairSample {
    fn of(t_ms: u64, p: &HaPairRecord) -> Self {
        Self {
            t_ms,
            vm: p.vm.0,
            primary: p.primary.0,
            standby: p.standby.map(|s| s.0),
            generation: p.generation,
            failovers: p.failovers,
        }
    }
}

/// What the sampler saw during the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HaObservations {
    pub sightings: Vec<HaSighting>,
    /// The catalog's pair records, one per VM and survey (when the catalog answered).
    pub pairs: Vec<PairSample>,
}

pub type SharedObservations = Arc<Mutex<HaObservations>>;

/// Ask `node` (through a client connected to it) for its role in `vm`'s pair and the guest's
/// state there.
async fn ask(client: &HavenClient, node: u64, vm: &HaVm, epoch: Instant) -> HaSighting {
    let ask = |kind, req| async move {
        let addr = ActorAddr { node: NodeId(node), kind, id: if kind == ActorKind::Vm { vm.id.0 } else { 0 } };
        let msg = ActorMessage::Vm(VmMessage::Client(req));
        match tokio::time::timeout(ASK_WITHIN, client.actor(addr, msg)).await {
            Ok(Ok(ActorReply::Vm(r))) => Some(r),
            _ => None,
        }
    };
    let (role, status) = tokio::join!(
        ask(ActorKind::Ha, VmRequest::HaStatus { vm: vm.id, at: Some(NodeId(node)) }),
        ask(ActorKind::Vm, VmRequest::Status { vm: vm.id })
    );
    let (role, generation) = match role {
        Some(VmResponse::Ha(s)) => (Some(s.role), Some(s.generation)),
        _ => (None, None),
    };
    let (state, writes) = match status {
        Some(VmResponse::Status(s)) => (Some(s.state), Some(s.writes)),
        _ => (None, None),
    };
    HaSighting {
        t_ms: epoch.elapsed().as_millis() as u64,
        vm: vm.id.0,
        node,
        role,
        generation,
        state,
        writes,
        multi_operation: vm.multi_operation(),
    }
}

/// Survey every host about every VM once (one sighting per host and VM, answered or not).
async fn survey(nodes: &[(u64, HavenClient)], vms: &[HaVm], epoch: Instant) -> Vec<HaSighting> {
    let mut asks = tokio::task::JoinSet::new();
    for v in vms {
        for (n, c) in nodes {
            let (n, c, v) = (*n, c.clone(), v.clone());
            asks.spawn(async move { ask(&c, n, &v, epoch).await });
        }
    }
    let mut out = Vec::new();
    while let Some(r) = asks.join_next().await {
        if let Ok(s) = r {
            out.push(s);
        }
    }
    out.sort_by_key(|s| (s.vm, s.node));
    out
}

/// The catalog's pair records (those that could be read within a second).
async fn pairs(catalog: &HavenClient, vms: &[HaVm]) -> Vec<HaPairRecord> {
    let mut out = Vec::new();
    for v in vms {
        if let Ok(Ok(p)) = tokio::time::timeout(ASK_WITHIN, catalog.ha_pair(v.id)).await {
            out.push(p);
        }
    }
    out
}

/// The primary host of each VM's pair as the catalog names it now (VMs it could not be asked
/// about are left out).
pub async fn primaries(catalog: &HavenClient, vms: &[HaVm]) -> BTreeMap<u64, u64> {
    pairs(catalog, vms).await.into_iter().map(|p| (p.vm.0, p.primary.0)).collect()
}

/// Everything the HA workload runs with.
pub struct Env {
    pub spec: HaSpec,
    pub vms: Vec<HaVm>,
    /// One client per VM for its puts.
    pub put_clients: Vec<HavenClient>,
    /// A client connected to each host only, for the sampler.
    pub node_clients: Vec<(u64, HavenClient)>,
    /// For the catalog's pair records.
    pub catalog: HavenClient,
    pub epoch: Instant,
    pub history: Arc<Mutex<Vec<Op>>>,
    pub observations: SharedObservations,
}

/// Run the put workload and the sampler until `stop`.
pub async fn run(env: Env, stop: tokio::sync::watch::Receiver<bool>) {
    let Env { spec, vms, put_clients, node_clients, catalog, epoch, history, observations } = env;
    let sampler = {
        let (vms, mut stop) = (vms.clone(), stop.clone());
        let catalog = catalog.with_deadline(ASK_WITHIN);
        let nodes: Vec<(u64, HavenClient)> =
            node_clients.into_iter().map(|(n, c)| (n, c.with_deadline(ASK_WITHIN))).collect();
        tokio::spawn(async move {
            while !*stop.borrow() {
                let (seen, records) = tokio::join!(survey(&nodes, &vms, epoch), pairs(&catalog, &vms));
                let t_ms = epoch.elapsed().as_millis() as u64;
                {
                    let mut o = observations.lock().expect("observations");
                    o.sightings.extend(seen);
                    o.pairs.extend(records.iter().map(|p| PairSample::of(t_ms, p)));
                }
                tokio::select! {
                    _ = tokio::time::sleep(SAMPLE_EVERY) => {}
                    _ = stop.changed() => {}
                }
            }
        })
    };
    let mut writers = Vec::new();
    for (i, (v, client)) in vms.iter().zip(put_clients).enumerate() {
        let (spec, vm, history, stop) = (spec.clone(), v.id, history.clone(), stop.clone());
        let client = client.with_deadline(spec.op_timeout);
        writers.push(tokio::spawn(async move { put_loop(&spec, i, vm, client, epoch, stop, history).await }));
    }
    for w in writers {
        let _ = w.await;
    }
    let _ = sampler.await;
}

/// One VM's puts, one at a time at `put_rate`: put `n` sets key `k((n-1) % keys)`.
async fn put_loop(
    spec: &HaSpec,
    client_id: usize,
    vm: VmId,
    client: HavenClient,
    epoch: Instant,
    mut stop: tokio::sync::watch::Receiver<bool>,
    history: Arc<Mutex<Vec<Op>>>,
) {
    let period = Duration::from_secs_f64(1.0 / f64::from(spec.put_rate));
    let mut n = 0u64;
    while !*stop.borrow() {
        n += 1;
        let slot = (n - 1) % spec.keys;
        let invoke = epoch.elapsed();
        let result = client.app_put(vm, &app_key(slot), Some(app_value(vm.0, n))).await;
        let (outcome, error) = match result {
            Ok(_) => (Outcome::Ok { read: None, cas_matched: None }, None),
            Err(e) => (Outcome::of_put_error(&e), Some(e.to_string())),
        };
        Op {
            id: 0,
            client: client_id,
            key: history_key(vm.0, slot),
            kind: OpKind::AppPut { vm: vm.0, slot, n },
            invoke_us: invoke.as_micros() as u64,
            complete_us: epoch.elapsed().as_micros() as u64,
            outcome,
            error,
        }
        .record(&history);
        let spent = epoch.elapsed().saturating_sub(invoke);
        if spent < period {
            tokio::select! {
                _ = tokio::time::sleep(period - spent) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

/// What the healed cluster says about the HA VMs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HaFinal {
    /// Each VM's application state as its primary holds it.
    pub views: BTreeMap<u64, Result<AppView, String>>,
    /// Each VM's pair record after the reads.
    pub pairs: BTreeMap<u64, Result<HaPairRecord, String>>,
    /// Each VM's memory and disk check on its primary.
    pub checks: BTreeMap<u64, Result<VmCheck, String>>,
    /// The last survey of every host (roles and guests).
    pub sightings: Vec<HaSighting>,
    /// The catalog's pair records read with that survey.
    pub survey_pairs: BTreeMap<u64, HaPairRecord>,
    /// How long after the final reads began every pair had one primary, running (None: never
    /// within `recover_within`).
    pub settled_ms: Option<u64>,
}

/// After healing: survey until every pair has exactly one primary, the catalog's, running the
/// guest (and no other host running it outside a multi-operation standby), or `recover_within`
/// passed; then read each VM's application state from that primary and check its memory and
/// disks there.
pub async fn final_state(
    catalog: &HavenClient,
    node_clients: &[(u64, HavenClient)],
    vms: &[HaVm],
    epoch: Instant,
    within: Duration,
) -> HaFinal {
    let began = Instant::now();
    let deadline = began + within;
    let catalog = catalog.clone().with_deadline(Duration::from_secs(2));
    let nodes: Vec<(u64, HavenClient)> =
        node_clients.iter().map(|(n, c)| (*n, c.clone().with_deadline(ASK_WITHIN))).collect();
    let mut out = HaFinal::default();
    loop {
        let seen = survey(&nodes, vms, epoch).await;
        let records: BTreeMap<u64, HaPairRecord> =
            pairs(&catalog, vms).await.into_iter().map(|p| (p.vm.0, p)).collect();
        let settled = records.len() == vms.len()
            && records.values().all(|p| p.state != PairState::FailingOver)
            && crate::checker::ha::placed_once_at_end(vms, &records, &seen).is_empty();
        out.sightings = seen;
        out.survey_pairs = records;
        if settled {
            out.settled_ms = Some(began.elapsed().as_millis() as u64);
            break;
        }
        if Instant::now() >= deadline {
            warn!("HA pairs did not settle on one running primary each within {within:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for v in vms {
        let view = loop {
            let pair = catalog.ha_pair(v.id).await;
            let view = match (&pair, catalog.app_get(v.id).await) {
                (Ok(p), Ok(a)) if a.host == p.primary && p.state != PairState::FailingOver => Ok(a),
                (Ok(p), Ok(a)) => Err(format!("answered by node-{} while the pair is {p:?}", a.host.0)),
                (Err(e), _) => Err(format!("pair: {e}")),
                (_, Err(e)) => Err(e.to_string()),
            };
            if view.is_ok() || Instant::now() >= deadline {
                break view;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        out.views.insert(v.id.0, view);
        let mut check = Err("not checked".to_string());
        for attempt in 0.. {
            check = catalog.vm_check(v.id).await.map_err(|e| e.to_string());
            if check.is_ok() || (attempt >= 10 && Instant::now() >= deadline) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        out.checks.insert(v.id.0, check);
        out.pairs.insert(v.id.0, catalog.ha_pair(v.id).await.map_err(|e| e.to_string()));
    }
    out
}
