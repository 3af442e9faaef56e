//! The VM workload: `count` running guests are live-migrated, one migration at a time, to a
//! random other host while the faults fire; every migration is recorded in the
//! [`History`](crate::history) as a `migrate` op (Ok = done, Fail = ended without moving the VM,
//! Info = unknown). Alongside, a sampler asks every node's VM actor for each guest's status
//! (state and write counter), so a guest that keeps running on a host the catalog does not place
//! it on is caught while it happens, not only at the end.
//!
//! This module does the I/O of the VM checkers (sampling, the final placement survey, memory
//! checks); the judging is [`crate::checker::vms`], which only looks at what was observed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use haven_client::proto::vm::{MigrationOptions, VmMessage, VmRecord, VmRequest, VmResponse, VmRunState};
use haven_client::proto::{ActorAddr, ActorKind, ActorMessage, ActorReply, NodeId, VmId};
use haven_client::vms::{VmCheck, VmSpec};
use haven_client::volumes::VolumeSpec;
use haven_client::HavenClient;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tracing::{info, warn};

use crate::history::{Op, OpKind, Outcome};
use crate::scenario::VmWorkloadSpec;

/// How often the sampler surveys every node.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// The history key of a VM.
pub fn vm_key(vm: u64) -> String {
    format!("vm/{vm}")
}

fn vm_name(i: usize) -> String {
    format!("chaos-vm-{i}")
}

/// Create (or adopt, on a cluster that has them) the workload's VMs, start them and wait until
/// each one's workload runs.
pub async fn setup(client: &HavenClient, spec: &VmWorkloadSpec, within: Duration) -> anyhow::Result<Vec<VmRecord>> {
    let deadline = Instant::now() + within;
    // Hosts record their capacity a moment after the cluster is up.
    loop {
        let hosts = client.vm_capacity().await.map(|c| c.len()).unwrap_or(0);
        if hosts >= 2 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "fewer than 2 hosts offer VM capacity");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut vms = Vec::new();
    for i in 0..spec.count {
        let name = vm_name(i);
        let mut record = match client.vm(&name).await {
            Ok(r) => r,
            Err(_) => {
                let mut s = VmSpec::new(&name, spec.memory_mib);
                s.dirty_pages_per_sec = spec.dirty_rate;
                s.disk_writes_per_sec = spec.disk_rate;
                client.create_vm(&s).await.with_context(|| format!("creating {name}"))?
            }
        };
        if spec.disk_rate > 0 && record.volumes.is_empty() {
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
        vms.push(record);
    }
    for v in &vms {
        loop {
            match client.vm_status(v.id).await {
                Ok(s) if s.state == "running" && s.writes > 0 => break,
                _ if Instant::now() >= deadline => anyhow::bail!("{} {:?} never started running", v.id, v.name),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    info!(vms = vms.len(), "VM workload ready");
    Ok(vms)
}

/// One node's answer about one VM at one moment.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GuestSighting {
    pub t_ms: u64,
    pub vm: u64,
    pub node: u64,
    /// `running`, `paused`, `created`, `stopped`.
    pub state: String,
    pub writes: u64,
    /// The catalog's placement when the survey began: (host, generation).
    pub placed_on: u64,
    pub generation: u64,
}

/// Where each VM was seen during the run (the sampler's log).
pub type Sightings = Arc<Mutex<Vec<GuestSighting>>>;

/// Ask `node`'s actor for `vm` directly (not routed by the catalog): `Some(state, writes)` if a
/// guest is installed there.
async fn status_on(client: &HavenClient, node: u64, vm: VmId) -> Option<(String, u64)> {
    let addr = ActorAddr { node: NodeId(node), kind: ActorKind::Vm, id: vm.0 };
    match client.actor(addr, ActorMessage::Vm(VmMessage::Client(VmRequest::Status { vm }))).await {
        Ok(ActorReply::Vm(VmResponse::Status(s))) => Some((s.state, s.writes)),
        _ => None,
    }
}

/// Survey every node about every VM once (each VM's catalog record read first); returns the
/// records read and the sightings.
async fn survey(
    client: &HavenClient,
    vms: &[VmId],
    nodes: &[u64],
    epoch: Instant,
) -> (Vec<VmRecord>, Vec<GuestSighting>) {
    let (mut records, mut out) = (Vec::new(), Vec::new());
    for &vm in vms {
        let Ok(record) = client.vm(&vm.0.to_string()).await else { continue };
        let mut asks = tokio::task::JoinSet::new();
        for &n in nodes {
            let client = client.clone();
            asks.spawn(async move { (n, status_on(&client, n, vm).await) });
        }
        while let Some(Ok((node, seen))) = asks.join_next().await {
            if let Some((state, writes)) = seen {
                out.push(GuestSighting {
                    t_ms: epoch.elapsed().as_millis() as u64,
                    vm: vm.0,
                    node,
                    state,
                    writes,
                    placed_on: record.host.0,
                    generation: record.generation,
                });
            }
        }
        records.push(record);
    }
    (records, out)
}

/// Run the migrator and the sampler until `stop`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    spec: &VmWorkloadSpec,
    seed: u64,
    vms: Vec<VmId>,
    nodes: Vec<u64>,
    client: HavenClient,
    epoch: Instant,
    stop: tokio::sync::watch::Receiver<bool>,
    history: Arc<Mutex<Vec<Op>>>,
    sightings: Sightings,
) {
    let sampler = {
        let (client, vms, nodes, mut stop, sightings) =
            (client.clone().with_deadline(Duration::from_secs(1)), vms.clone(), nodes.clone(), stop.clone(), sightings);
        tokio::spawn(async move {
            while !*stop.borrow() {
                let (_, seen) = survey(&client, &vms, &nodes, epoch).await;
                sightings.lock().expect("sightings").extend(seen);
                tokio::select! {
                    _ = tokio::time::sleep(SAMPLE_EVERY) => {}
                    _ = stop.changed() => {}
                }
            }
        })
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_0f76);
    let in_flight: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let mut waiters = Vec::new();
    let mut stop_main = stop.clone();
    let options = MigrationOptions { max_downtime_ms: spec.max_downtime.as_millis() as u64, ..Default::default() };
    while !*stop.borrow() {
        tokio::select! {
            _ = tokio::time::sleep(spec.migrate_every) => {}
            _ = stop_main.changed() => break,
        }
        let idle: Vec<VmId> =
            vms.iter().copied().filter(|v| !in_flight.lock().expect("in flight").contains(&v.0)).collect();
        if idle.is_empty() {
            continue;
        }
        let vm = idle[rng.random_range(0..idle.len())];
        let Ok(record) = client.vm(&vm.0.to_string()).await else { continue };
        let others: Vec<u64> = nodes.iter().copied().filter(|n| *n != record.host.0).collect();
        let to = others[rng.random_range(0..others.len())];
        let invoke = epoch.elapsed();
        in_flight.lock().expect("in flight").insert(vm.0);
        let (client, history, in_flight, options, timeout) =
            (client.clone(), history.clone(), in_flight.clone(), options.clone(), spec.migration_timeout);
        waiters.push(tokio::spawn(async move {
            let (outcome, error) = migrate_and_wait(&client, vm, NodeId(to), options, timeout).await;
            Op {
                id: 0,
                client: 0,
                key: vm_key(vm.0),
                kind: OpKind::Migrate { vm: vm.0, to },
                invoke_us: invoke.as_micros() as u64,
                complete_us: epoch.elapsed().as_micros() as u64,
                outcome,
                error,
            }
            .record(&history);
            in_flight.lock().expect("in flight").remove(&vm.0);
        }));
    }
    for w in waiters {
        let _ = w.await;
    }
    let _ = sampler.await;
}

/// Start one migration and follow it to its end.
async fn migrate_and_wait(
    client: &HavenClient,
    vm: VmId,
    to: NodeId,
    options: MigrationOptions,
    timeout: Duration,
) -> (Outcome, Option<String>) {
    let started = Instant::now();
    if let Err(e) = client.migrate_vm(vm, to, options).await {
        return (Outcome::of_error(&e), Some(e.to_string()));
    }
    let mut last = None;
    while started.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(100)).await;
        match client.migration_progress(vm).await {
            Ok(r) if r.phase == "done" && r.to == Some(to) => {
                return (Outcome::Ok { read: None, cas_matched: None }, None)
            }
            Ok(r) if matches!(r.phase.as_str(), "failed" | "cancelled") && r.to == Some(to) => {
                return (Outcome::Fail, r.reason.clone().or(Some(r.phase)))
            }
            Ok(r) => last = Some(r.phase),
            Err(e) => last = Some(e.to_string()),
        }
    }
    warn!(%vm, %to, ?last, "migration did not end in time");
    (Outcome::Info, Some(format!("not ended after {timeout:?}; last seen: {}", last.unwrap_or_default())))
}

/// After healing: survey until every VM is installed exactly on its catalog host and running
/// there, or `within` has passed; returns the last survey and the catalog records it judged.
pub async fn final_survey(
    client: &HavenClient,
    vms: &[VmId],
    nodes: &[u64],
    epoch: Instant,
    within: Duration,
) -> (Vec<VmRecord>, Vec<GuestSighting>) {
    let client = client.clone().with_deadline(Duration::from_secs(2));
    let deadline = Instant::now() + within;
    let ids: Vec<u64> = vms.iter().map(|v| v.0).collect();
    loop {
        let (records, seen) = survey(&client, vms, nodes, epoch).await;
        let settled = crate::checker::vms::placed_once_at_end(&ids, &records, &seen).is_empty();
        if settled || Instant::now() >= deadline {
            return (records, seen);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Each VM's memory and disk check through its host (retried briefly: a guest just restarted
/// may still be starting, a disk's primary may still be failing over).
pub async fn data_checks(client: &HavenClient, vms: &[VmId]) -> BTreeMap<u64, Result<VmCheck, String>> {
    let mut out = BTreeMap::new();
    for &vm in vms {
        let mut result = Err("not checked".to_string());
        for _ in 0..10 {
            result = client.vm_check(vm).await.map_err(|e| e.to_string());
            if result.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        out.insert(vm.0, result);
    }
    out
}
