//! The operations workload (`[operations]`): what users do to a volume, while faults land.
//! Writers overwrite their own 4 KiB blocks of a volume of its own (content as
//! [`crate::blocks::encode`], writer `WRITER_BASE + w`) and one client performs, every
//! `op_every`, a seeded operation: snapshot, rollback, clone, resize, or an async (DR)
//! relationship create / pause / resume / reverse / delete. After each acknowledged operation
//! it reads back what the operation promises something about (the snapshot, the volume, the
//! clone, the new tail) and the catalog, recording every attempt in the history and what it
//! saw in the [`Observations`]. Judging is [`crate::checker::operations`]; this module only does
//! the I/O. Replica changes (the SDK has no such operation) and VM migrations (the `[vms]`
//! workload) are not done here.
//!
//! Replay: the operation stream and the writers' blocks come from the scenario seed; which
//! operations are possible (a snapshot to roll back to, a relationship to pause) depends on
//! earlier outcomes, so a replay under the same outcomes issues the same operations.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use haven_client::proto::volume::{RelationshipState, VolumeRecord};
use haven_client::proto::{NodeId, VolumeId};
use haven_client::volumes::VolumeSpec;
use haven_client::{ClientError, HavenClient};
use rand::{Rng, SeedableRng};

use crate::blocks::{decode, encode, Decoded};
use crate::checker::operations::{CatalogView, Observations, RelView, Seen};
use crate::history::{Op, OpKind, Outcome, ReadOf, VolumeOpKind};
use crate::scenario::{OperationsSpec, OpsKind, BLOCK_BYTES};

/// Writer `w` of this workload writes content naming writer `WRITER_BASE + w`.
pub const WRITER_BASE: u64 = 1000;

/// Shared with the run: what the read-backs saw.
pub type SharedObservations = Arc<Mutex<Observations>>;

/// What one read block is, for `block` of writer `writer`.
pub fn seen(bytes: &[u8], writer: u64, block: u64) -> Seen {
    match decode(bytes) {
        Decoded::Zero => Seen::Zero,
        Decoded::Corrupt(why) => Seen::Corrupt { why },
        Decoded::Valid { writer: w, block: b, n } if w == writer && b == block => Seen::Write { n },
        Decoded::Valid { writer, block, n } => Seen::Foreign { writer, block, n },
    }
}

/// Create the workload's volume and wait until it serves reads.
pub async fn setup(client: &HavenClient, spec: &OperationsSpec, within: Duration) -> anyhow::Result<VolumeRecord> {
    let want = VolumeSpec::new(spec.volume.clone(), spec.volume_size, spec.replicas);
    crate::blocks::create_and_serve(client, &want, within).await
}

/// What the workload shares with its tasks.
#[derive(Clone)]
pub struct Env {
    pub spec: OperationsSpec,
    pub seed: u64,
    pub volume: VolumeRecord,
    pub nodes: Vec<u64>,
    pub epoch: Instant,
    pub history: Arc<Mutex<Vec<Op>>>,
    pub observations: SharedObservations,
}

impl Env {
    fn record(&self, client: usize, kind: OpKind, invoke: Duration, result: Result<(), &ClientError>) -> usize {
        let (outcome, error) = match result {
            Ok(()) => (Outcome::Ok { read: None, cas_matched: None }, None),
            Err(e) => (Outcome::of_error(e), Some(e.to_string())),
        };
        let key = match kind {
            OpKind::OpsWrite { block, .. } => format!("ops/blk/{block}"),
            OpKind::VolumeOp { op } => format!("ops/{}", op.name()),
            _ => "ops".into(),
        };
        Op {
            id: 0,
            client,
            key,
            kind,
            invoke_us: invoke.as_micros() as u64,
            complete_us: self.epoch.elapsed().as_micros() as u64,
            outcome,
            error,
        }
        .record(&self.history)
    }

    fn owned_len(&self) -> u64 {
        self.spec.ownership().owned_blocks().end * BLOCK_BYTES
    }
}

/// Run the writers and the operations client until `stop`. `clients` must hold
/// `spec.writers + 1` clients (the last one performs the operations).
pub async fn run(env: Env, mut clients: Vec<HavenClient>, stop: tokio::sync::watch::Receiver<bool>) {
    let Some(ops_client) = clients.pop() else { return };
    let mut tasks = Vec::new();
    for (w, client) in clients.into_iter().enumerate() {
        let (env, stop) = (env.clone(), stop.clone());
        tasks.push(tokio::spawn(async move { writer(env, w, client, stop).await }));
    }
    operations(&env, ops_client, stop).await;
    for t in tasks {
        let _ = t.await;
    }
}

async fn writer(env: Env, w: usize, client: HavenClient, stop: tokio::sync::watch::Receiver<bool>) {
    let client = client.with_deadline(env.spec.op_timeout);
    let gap = Duration::from_secs_f64(env.spec.writers as f64 / env.spec.write_rate as f64);
    let blocks = env.spec.ownership().blocks_of(w);
    let mut rng =
        rand::rngs::StdRng::seed_from_u64((env.seed ^ 0x0b5_b10c).wrapping_mul(1_000_003).wrapping_add(w as u64));
    let mut next_n: BTreeMap<u64, u64> = BTreeMap::new();
    while !*stop.borrow() {
        let block = rng.random_range(blocks.clone());
        let n = *next_n.entry(block).and_modify(|n| *n += 1).or_insert(1);
        let data = encode(WRITER_BASE + w as u64, block, n);
        let invoke = env.epoch.elapsed();
        let result = client.write_volume(env.volume.id, block * BLOCK_BYTES, &data).await;
        env.record(w, OpKind::OpsWrite { block, n }, invoke, result.as_ref().map(|_| ()));
        tokio::time::sleep(gap.saturating_sub(env.epoch.elapsed() - invoke)).await;
    }
}

/// What the operations client knows about the volume.
struct State {
    /// Acknowledged snapshots still there: (workload number, catalog id), oldest first.
    snaps: Vec<(u64, u64)>,
    next_snap: u64,
    size: u64,
    clones: u64,
}

/// How often each operation family is drawn, relative to the others.
fn weight(k: OpsKind) -> u32 {
    match k {
        OpsKind::Snapshot => 30,
        OpsKind::Rollback => 20,
        OpsKind::Clone => 10,
        OpsKind::Resize => 8,
        OpsKind::Replication => 32,
    }
}

fn draw(kinds: &[OpsKind], roll: u32) -> OpsKind {
    let total: u32 = kinds.iter().map(|k| weight(*k)).sum();
    let mut r = roll % total.max(1);
    for k in kinds {
        if r < weight(*k) {
            return *k;
        }
        r -= weight(*k);
    }
    OpsKind::Snapshot
}

async fn operations(env: &Env, client: HavenClient, stop: tokio::sync::watch::Receiver<bool>) {
    let client = client.with_deadline(env.spec.operation_timeout);
    let mut rng = rand::rngs::StdRng::seed_from_u64(env.seed ^ 0x0b5_0b5_0b5);
    let mut st = State { snaps: Vec::new(), next_snap: 1, size: env.volume.size_bytes, clones: 0 };
    let client_id = env.spec.writers;
    loop {
        tokio::time::sleep(env.spec.op_every).await;
        if *stop.borrow() {
            break;
        }
        let (roll, pick): (u32, u64) = (rng.random(), rng.random());
        let kind = match draw(&env.spec.kinds, roll) {
            OpsKind::Rollback | OpsKind::Clone if st.snaps.is_empty() => OpsKind::Snapshot,
            OpsKind::Resize if st.size >= 4 * env.spec.volume_size => OpsKind::Snapshot,
            k => k,
        };
        let op = Operation { env, client: &client, id: client_id };
        match kind {
            OpsKind::Snapshot => op.snapshot(&mut st).await,
            OpsKind::Rollback => op.rollback(&mut st, pick).await,
            OpsKind::Clone => op.clone_snapshot(&mut st, pick).await,
            OpsKind::Resize => op.resize(&mut st).await,
            OpsKind::Replication => op.replication(pick).await,
        }
    }
}

/// One operation of the operations client.
struct Operation<'a> {
    env: &'a Env,
    client: &'a HavenClient,
    /// The client number in the history.
    id: usize,
}

impl Operation<'_> {
    fn vol(&self) -> VolumeId {
        self.env.volume.id
    }

    fn done<T>(&self, op: VolumeOpKind, invoke: Duration, r: &Result<T, ClientError>) -> usize {
        self.env.record(self.id, OpKind::VolumeOp { op }, invoke, r.as_ref().map(|_| ()))
    }

    async fn snapshot(&self, st: &mut State) {
        let snap = st.next_snap;
        st.next_snap += 1;
        let invoke = self.env.epoch.elapsed();
        let r = self.client.snapshot(self.vol(), &format!("{}-s{snap}", self.env.spec.volume), None).await;
        self.done(VolumeOpKind::Snapshot { snap }, invoke, &r);
        if let Ok(s) = r {
            st.snaps.push((snap, s.id));
            self.env.observations.lock().expect("observations").snapshot_ids.insert(snap, s.id);
            self.read(ReadOf::Snapshot { snap }, self.vol(), Some(s.id)).await;
        }
    }

    async fn rollback(&self, st: &mut State, pick: u64) {
        let (snap, id) = st.snaps[(pick % st.snaps.len() as u64) as usize];
        let invoke = self.env.epoch.elapsed();
        let r = self.client.rollback(self.vol(), id).await;
        self.done(VolumeOpKind::Rollback { snap }, invoke, &r);
        if r.is_ok() {
            // Later snapshots went with the rollback.
            st.snaps.retain(|(k, _)| *k <= snap);
            self.read(ReadOf::Volume, self.vol(), None).await;
        }
    }

    async fn clone_snapshot(&self, st: &mut State, pick: u64) {
        let (snap, id) = st.snaps[(pick % st.snaps.len() as u64) as usize];
        st.clones += 1;
        let name = format!("{}-c{}", self.env.spec.volume, st.clones);
        let invoke = self.env.epoch.elapsed();
        let r = self.client.clone_snapshot(self.vol(), id, &name).await;
        self.done(VolumeOpKind::Clone { snap }, invoke, &r);
        if let Ok(clone) = &r {
            self.read(ReadOf::Clone { snap }, clone.id, None).await;
        }
        // Clones are not kept: delete it (by name, as the answer may have been lost).
        let cleanup = self.client.clone().with_deadline(Duration::from_secs(3));
        if let Ok(v) = cleanup.volume(&name).await {
            let _ = cleanup.delete_volume(v.id).await;
        }
    }

    async fn resize(&self, st: &mut State) {
        let size = st.size + (1 << 20);
        let invoke = self.env.epoch.elapsed();
        let r = self.client.resize_volume(self.vol(), size).await;
        let id = self.done(VolumeOpKind::Resize { size }, invoke, &r);
        if r.is_ok() {
            st.size = size;
            self.catalog(id).await;
            let tail = size - BLOCK_BYTES;
            self.read(ReadOf::Tail { offset: tail }, self.vol(), None).await;
        }
    }

    /// Create a relationship when there is none, else pause, resume, reverse or delete it.
    async fn replication(&self, pick: u64) {
        let Some(view) = catalog_view(self.client, &self.env.spec.volume, self.vol()).await else { return };
        let rel = view.relationships.first().cloned();
        let op = match rel {
            None => {
                let record = self.client.volume(&self.env.spec.volume).await.ok();
                let replicas: Vec<u64> = record.map(|r| r.replicas.iter().map(|h| h.0).collect()).unwrap_or_default();
                let free: Vec<u64> =
                    self.env.nodes.iter().copied().filter(|n| *n != view.primary && !replicas.contains(n)).collect();
                if free.is_empty() {
                    return;
                }
                VolumeOpKind::RelCreate { target: free[(pick % free.len() as u64) as usize] }
            }
            Some(r) => match pick % 100 {
                0..40 if self.env.spec.replicas == 1 && !r.paused => {
                    VolumeOpKind::RelReverse { id: r.id, from: view.primary, to: r.target }
                }
                0..75 if r.paused => VolumeOpKind::RelResume { id: r.id },
                0..75 => VolumeOpKind::RelPause { id: r.id },
                _ => VolumeOpKind::RelDelete { id: r.id },
            },
        };
        let invoke = self.env.epoch.elapsed();
        let r = match op {
            VolumeOpKind::RelCreate { target } => {
                self.client.create_relationship(self.vol(), NodeId(target), 256 << 20).await.map(|_| ())
            }
            VolumeOpKind::RelPause { id } => {
                self.client.set_relationship_state(id, RelationshipState::Paused).await.map(|_| ())
            }
            VolumeOpKind::RelResume { id } => {
                self.client.set_relationship_state(id, RelationshipState::Active).await.map(|_| ())
            }
            VolumeOpKind::RelReverse { id, .. } => self.client.reverse_relationship(self.vol(), id).await,
            VolumeOpKind::RelDelete { id } => self.client.delete_relationship(id).await,
            _ => Ok(()),
        };
        let id = self.done(op, invoke, &r);
        if r.is_ok() {
            self.catalog(id).await;
            if matches!(op, VolumeOpKind::RelReverse { .. }) {
                // The promise of a reverse: the former copy holds every acknowledged write.
                self.read(ReadOf::Volume, self.vol(), None).await;
            }
        }
    }

    /// Record the catalog's view of the volume right after op `id`.
    async fn catalog(&self, id: usize) {
        if let Some(view) = catalog_view(self.client, &self.env.spec.volume, self.vol()).await {
            self.env.observations.lock().expect("observations").catalog.insert(id, view);
        }
    }

    /// Read the owned blocks of `volume` (at `snapshot`), or the one tail block, and record it.
    async fn read(&self, of: ReadOf, volume: VolumeId, snapshot: Option<u64>) -> usize {
        read_back(self.env, self.client, self.id, of, volume, snapshot, self.env.spec.operation_timeout).await
    }
}

/// Read and record one read-back, retrying until `within` has passed.
async fn read_back(
    env: &Env,
    client: &HavenClient,
    client_id: usize,
    of: ReadOf,
    volume: VolumeId,
    snapshot: Option<u64>,
    within: Duration,
) -> usize {
    let (offset, len) = match of {
        ReadOf::Tail { offset } => (offset, BLOCK_BYTES),
        _ => (0, env.owned_len()),
    };
    let client = client.clone().with_deadline(Duration::from_secs(3).min(within));
    let invoke = env.epoch.elapsed();
    let start = Instant::now();
    let result = loop {
        match client.read_volume(volume, offset, len as u32, snapshot).await {
            Ok(d) if d.len() as u64 == len => break Ok(d),
            Ok(d) => break Err(ClientError::Protocol(format!("read of {len} bytes returned {}", d.len()))),
            Err(e) if start.elapsed() >= within => break Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let id =
        env.record(client_id, OpKind::VolumeOp { op: VolumeOpKind::Read { of } }, invoke, result.as_ref().map(|_| ()));
    if let Ok(data) = result {
        let first = offset / BLOCK_BYTES;
        let blocks = data
            .chunks(BLOCK_BYTES as usize)
            .enumerate()
            .map(|(i, b)| {
                let block = first + i as u64;
                let writer = env.spec.ownership().owner(block).map_or(u64::MAX, |w| WRITER_BASE + w as u64);
                (block, seen(b, writer, block))
            })
            .collect();
        env.observations.lock().expect("observations").reads.insert(id, blocks);
    }
    id
}

/// After healing: read the whole volume back (the last judgement of the run).
pub async fn final_read(env: &Env, client: &HavenClient) {
    let id =
        read_back(env, client, env.spec.writers, ReadOf::Volume, env.volume.id, None, env.spec.recover_within).await;
    env.observations.lock().expect("observations").final_read = Some(id);
}

/// The catalog's view of the volume and its relationships.
async fn catalog_view(client: &HavenClient, name: &str, volume: VolumeId) -> Option<CatalogView> {
    let client = client.clone().with_deadline(Duration::from_secs(3));
    let record = client.volume(name).await.ok()?;
    let relationships = client
        .relationships()
        .await
        .ok()?
        .into_iter()
        .filter(|r| r.volume == volume)
        .map(|r| RelView { id: r.id, target: r.target.0, paused: r.state == RelationshipState::Paused })
        .collect();
    Some(CatalogView { primary: record.primary.0, size_bytes: record.size_bytes, relationships })
}
