//! Group live-migration plans (C1) end to end on real `haven-node` processes: a three-VM group
//! under load moves and is consolidated at the destination; a destination killed -9 mid-plan
//! makes the plan fail back with the whole group restored at the source from its recovery
//! snapshot; a source killed -9 and restarted mid-plan restores the group from the images on its
//! disk; a destination frozen with SIGSTOP mid-plan fences itself, so the group is restored at
//! the source only once the destination's lease lapsed, and the woken destination never runs
//! (nor reports running) any of the group again; the leader killed mid-plan leaves the plan to
//! the next leader, which finishes it; bad plans are refused with clear, typed errors.
//!
//! Invariant checked throughout: a VM runs only where the catalog's `host` says — no other node
//! answers for it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;

use common::cluster_with;
use haven_client::devcluster::LocalCluster;
use haven_client::error::ClientError;
use haven_client::plans::PlanSpec;
use haven_client::proto::plan::{FailBackMode, MigrationPlan, PlanSettings, PlanState, PlanVmPhase};
use haven_client::proto::vm::{MigrationOptions, VmMessage, VmRequest, VmResponse, VmRunState, WorkloadKind};
use haven_client::proto::{ActorAddr, ActorKind, ActorMessage, ActorReply, ErrorCode, NodeId, VmId};
use haven_client::vms::VmSpec;
use haven_client::volumes::VolumeSpec;
use haven_client::HavenClient;

const HEALTHY: Duration = Duration::from_secs(30);

/// The multi-process tests share two cores; running them one at a time keeps their timing sane.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Cluster {
    c: LocalCluster,
    client: HavenClient,
    leader: NodeId,
    /// The two hosts that are not the leader: plans move VMs from `src` to `dst`.
    src: NodeId,
    dst: NodeId,
}

async fn cluster(dir: &Path, env: &[(&str, &str)]) -> Cluster {
    let mut c = cluster_with(dir, env);
    let client = c.client().unwrap();
    let ids: Vec<u64> = c.nodes().iter().map(|n| n.id).collect();
    let leader = c.wait_healthy(&client, &ids, HEALTHY).await.expect("cluster healthy").id;
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.vm_capacity().await.map(|c| c.len()).unwrap_or(0) < ids.len() {
        assert!(Instant::now() < deadline, "hosts never recorded their capacity");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let others: Vec<NodeId> = ids.iter().map(|i| NodeId(*i)).filter(|n| *n != leader).collect();
    Cluster { c, client, leader, src: others[0], dst: others[1] }
}

/// Disk writes per second of each group VM's disk workload: slow enough that a restored guest
/// does not rewrite its whole disk region (1024 blocks) before the test checks it, which would
/// hide a disk that was not rolled back.
const DISK_RATE: u64 = 25;
/// Size of each group VM's disk; the disk workload writes its first 4 MiB, so a test may write
/// its own marks at [`MARK_OFFSET`].
const DISK_BYTES: u64 = 8 << 20;
const MARK_OFFSET: u64 = 6 << 20;

/// Create `n` running VMs named `{prefix}1..` on `host` and wait until each has written memory.
/// A sequential workload fills every page quickly, so each VM has its whole memory to move. With
/// `disks`, each VM also writes a disk of its own, `{prefix}{i}-disk` (a replica on every host, so
/// it outlives any one host), and has acknowledged disk writes before this returns.
async fn group(
    client: &HavenClient,
    prefix: &str,
    n: usize,
    mib: u64,
    rate: u64,
    host: NodeId,
    disks: bool,
) -> Vec<VmId> {
    let mut ids = Vec::new();
    for i in 1..=n {
        let mut spec = VmSpec::new(format!("{prefix}{i}"), mib);
        spec.dirty_pages_per_sec = rate;
        spec.disk_writes_per_sec = if disks { DISK_RATE } else { 0 };
        spec.workload = WorkloadKind::Sequential;
        spec.host = Some(host);
        let v = client.create_vm(&spec).await.expect("create vm");
        if disks {
            let disk = VolumeSpec::new(format!("{prefix}{i}-disk"), DISK_BYTES, 3);
            let disk = client.create_volume(&disk).await.expect("create volume");
            client.attach_volume(v.id, disk.id).await.expect("attach the disk");
        }
        client.set_vm_state(v.id, VmRunState::Running).await.unwrap();
        ids.push(v.id);
    }
    for vm in &ids {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ran = client.vm_status(*vm).await.is_ok_and(|s| s.state == "running" && s.writes > 0);
            let wrote_disk = !disks || client.vm_check(*vm).await.is_ok_and(|c| c.disks.iter().any(|d| d.acked > 0));
            if ran && wrote_disk {
                break;
            }
            assert!(Instant::now() < deadline, "{vm} never ran (or never wrote its disk)");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    ids
}

fn settings(max_parallel: u32) -> PlanSettings {
    PlanSettings {
        max_parallel,
        options: MigrationOptions { max_downtime_ms: 300, ..MigrationOptions::default() },
        timeout_ms: 90_000,
    }
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}{i}")).collect()
}

fn steps_text(p: &MigrationPlan) -> String {
    p.steps.iter().map(|s| format!("  [{}] {}", s.state, s.note)).collect::<Vec<_>>().join("\n")
}

/// Follow a plan to its end; every version seen must keep the plan's invariants.
async fn wait_end(client: &HavenClient, id: u64) -> MigrationPlan {
    let mut states = Vec::new();
    let p = client
        .wait_plan(id, Duration::from_secs(90), |p| {
            if states.last() != Some(&p.state) {
                states.push(p.state);
            }
            if p.state == PlanState::Migrating {
                assert!(p.recovery.is_some(), "migrating without a recovery point: {p:?}");
            }
        })
        .await;
    let p = match p {
        Ok(p) => p,
        Err(e) => {
            let now = client.plan(&id.to_string()).await.map(|p| steps_text(&p)).unwrap_or_default();
            panic!("plan {id} did not end: {e}; it went through {states:?}:\n{now}")
        }
    };
    eprintln!("plan {id} went through {states:?}:\n{}", steps_text(&p));
    p
}

/// Poll the plan until `pred` holds (or the plan ends).
async fn wait_plan_until(
    client: &HavenClient,
    id: u64,
    what: &str,
    pred: impl Fn(&MigrationPlan) -> bool,
) -> MigrationPlan {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(p) = client.plan(&id.to_string()).await {
            if pred(&p) || p.state.is_terminal() {
                return p;
            }
        }
        assert!(Instant::now() < deadline, "plan {id} never {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The catalog places `vm` on `host`, the guest runs there, and no other node has a guest for it.
async fn assert_runs_only_on(c: &LocalCluster, client: &HavenClient, vm: VmId, host: NodeId) {
    let r = client.vm(&vm.to_string()).await.unwrap();
    assert_eq!((r.host, r.migrating_to), (host, None), "{vm} is not resting on {host}: {r:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.vm_status(vm).await {
            Ok(s) if s.host == host && s.state == "running" => break,
            other => assert!(Instant::now() < deadline, "{vm} does not run on {host}: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in c.nodes().iter().map(|n| NodeId(n.id)).filter(|n| *n != host) {
        let addr = ActorAddr { node: n, kind: ActorKind::Vm, id: vm.0 };
        let ask = ActorMessage::Vm(VmMessage::Client(VmRequest::Status { vm }));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match client.clone().with_deadline(Duration::from_secs(2)).actor(addr, ask.clone()).await {
                Ok(ActorReply::Vm(VmResponse::Status(s))) => {
                    // A leftover copy is stopped and dropped by its node's reconcile within moments.
                    assert!(Instant::now() < deadline, "{vm} still has a guest on {n} ({}), besides {host}", s.state);
                }
                Ok(other) => panic!("{n} answered {other:?} for {vm}"),
                Err(_) => break, // no actor there (or the node is down)
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Wait until the plan recorded its first VM arrived at the destination, while the others have
/// not: the moment the fault tests strike.
async fn wait_first_arrival(client: &HavenClient, id: u64) -> MigrationPlan {
    let p =
        wait_plan_until(client, id, "moved a VM", |p| p.progress.iter().any(|v| v.phase == PlanVmPhase::Arrived)).await;
    assert_eq!(p.state, PlanState::Migrating, "the plan got past migrating before the fault:\n{}", steps_text(&p));
    p
}

/// A running three-VM group with disks on `k.src` (VMs `{prefix}1..3`, 64 MiB, 8000 page writes/s),
/// and a plan moving it to `k.dst` one VM at a time, followed until its first VM arrived: the
/// group's VMs and the plan at that moment.
async fn plan_under_way(k: &Cluster, prefix: &str) -> (Vec<VmId>, MigrationPlan) {
    let vms = group(&k.client, prefix, 3, 64, 8000, k.src, true).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let plan = k.client.create_plan_by_id(None, vms.clone(), k.dst, settings(1)).await.expect("create plan");
    let p = wait_first_arrival(&k.client, plan.id).await;
    (vms, p)
}

/// The failed-back plan `p` restored its whole group at the source from the recovery snapshot:
/// every VM runs only there, was loaded from its image (not behind it), and its memory and disks check out.
async fn assert_restored_at_source(k: &Cluster, p: &MigrationPlan) {
    assert_eq!(p.state, PlanState::FailedBack, "{}", steps_text(p));
    assert_eq!(p.fail_back, Some(FailBackMode::RestoredFromSnapshot), "{}", steps_text(p));
    for vm in &p.vms {
        assert_runs_only_on(&k.c, &k.client, *vm, k.src).await;
        let image = p.image(*vm).expect("image");
        let s = k.client.vm_status(*vm).await.unwrap();
        assert_eq!(s.origin, "restored", "{vm}: {s:?}");
        assert!(s.last_seq >= image.last_seq, "{vm} is behind its recovery point: {} < {}", s.last_seq, image.last_seq);
        check_guest(&k.client, *vm).await;
    }
}

/// `vm`'s memory checks out, and so does each of its disks: every disk write the guest's journal
/// says was acknowledged is on the disk, and nothing the journal does not know of. After a
/// restore, that proves memory and disks came back to one cut. Returns the disks' acknowledged
/// write counts.
async fn check_guest(client: &HavenClient, vm: VmId) -> Vec<u64> {
    // A disk whose primary just failed over may be briefly unreadable: `Unavailable`, ask again.
    let deadline = Instant::now() + Duration::from_secs(20);
    let check = loop {
        match client.vm_check(vm).await {
            Err(e) if e.code() == Some(ErrorCode::Unavailable) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            other => break other.unwrap_or_else(|e| panic!("check of {vm} failed: {e}")),
        }
    };
    assert!(check.max_seq <= check.last_seq && check.pages_written > 0, "{vm}: {check:?}");
    check.disks.iter().map(|d| d.acked).collect()
}

fn image_dir(c: &LocalCluster, host: NodeId, plan: u64) -> PathBuf {
    c.node(host.0).unwrap().data_dir.join("recovery").join(format!("plan-{plan}"))
}

/// The recovery images named by the plan are on the source's disk, and match their digests.
fn assert_images_on_disk(c: &LocalCluster, p: &MigrationPlan) {
    let r = p.recovery.as_ref().expect("recovery point");
    for image in &r.images {
        let path = image_dir(c, r.host, p.id).join(format!("vm-{}.img", image.vm.0));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(bytes.len() as u64, image.bytes, "{}", path.display());
        // The body's blake3 is recorded and is the file's 32-byte trailer.
        let (body, trailer) = bytes.split_at(bytes.len() - 32);
        let digest = blake3::hash(body);
        assert_eq!(digest.to_hex().as_str(), image.image_digest, "{}", path.display());
        assert_eq!(digest.as_bytes(), trailer, "{}", path.display());
    }
}

/// The plan's recovery images are released (after the plan ended: wait for that, not the end).
async fn wait_released(c: &LocalCluster, client: &HavenClient, id: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let p = loop {
        match client.plan(&id.to_string()).await {
            Ok(p) if p.recovery_released => break p,
            last => assert!(Instant::now() < deadline, "plan {id} never released its recovery images: {last:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let dir = image_dir(c, p.from, id);
    assert!(!dir.exists(), "{} still exists after the release", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_vm_group_moves_and_is_consolidated_at_the_destination() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let k = cluster(tmp.path(), &[]).await;
    let client = &k.client;
    let vms = group(client, "g", 3, 48, 2000, k.src, true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut before = Vec::new();
    for vm in &vms {
        before.push(client.vm_status(*vm).await.unwrap().last_seq);
    }
    let spec = PlanSpec { name: Some("web-tier".into()), vms: names("g", 3), to: k.dst, settings: settings(2) };
    let plan = client.create_plan(&spec).await.expect("create plan");
    assert_eq!((plan.state, plan.from, plan.to, plan.vms.clone()), (PlanState::Created, k.src, k.dst, vms.clone()));
    assert_eq!(client.plan("web-tier").await.unwrap().id, plan.id, "plans are found by name");

    // While VMs move, the recovery images sit on the source's disk, intact.
    let moving = wait_plan_until(client, plan.id, "started migrating", |p| p.state == PlanState::Migrating).await;
    if moving.state == PlanState::Migrating {
        assert_images_on_disk(&k.c, &moving);
    }
    let p = wait_end(client, plan.id).await;
    assert_eq!(p.state, PlanState::Succeeded, "{}", steps_text(&p));
    assert!(p.failure.is_none() && p.fail_back.is_none(), "{p:?}");
    let r = p.recovery.as_ref().expect("a recovery point");
    assert_eq!(r.host, k.src);
    assert_eq!(r.images.len(), 3);
    assert!(r.images.iter().all(|i| i.last_seq > 0 && i.bytes > 0 && i.memory_digest.len() == 64), "{r:?}");
    assert!(p.resume_spread_ms.is_some() && p.consolidation_pause_ms.is_some(), "{p:?}");
    eprintln!(
        "resume spread {:?} ms, consolidation pause {:?} ms, snapshot pause {} ms",
        p.resume_spread_ms, p.consolidation_pause_ms, r.paused_ms
    );
    assert!(p.progress.iter().all(|v| v.phase == PlanVmPhase::Arrived), "{:?}", p.progress);
    // The step log tells the story in order.
    let order: Vec<PlanState> = p.steps.iter().map(|s| s.state).fold(Vec::new(), |mut acc, s| {
        if acc.last() != Some(&s) {
            acc.push(s);
        }
        acc
    });
    assert_eq!(
        order,
        [
            PlanState::Created,
            PlanState::Snapshotting,
            PlanState::Migrating,
            PlanState::Consolidating,
            PlanState::Succeeded
        ],
        "{}",
        steps_text(&p)
    );
    assert!(p.steps.windows(2).all(|w| w[0].at_ms <= w[1].at_ms), "{}", steps_text(&p));
    for (i, (vm, seq)) in vms.iter().zip(before).enumerate() {
        assert_runs_only_on(&k.c, client, *vm, k.dst).await;
        let s = client.vm_status(*vm).await.unwrap();
        assert_eq!(s.origin, "migrated", "{vm}: {s:?}");
        assert!(s.last_seq > seq, "{vm} did not keep running: {} <= {seq}", s.last_seq);
        // Each disk's primary moved with its VM (the destination holds an in-sync replica), and
        // every disk write acknowledged on either side of the move is there.
        let disk = client.volume(&format!("g{}-disk", i + 1)).await.unwrap();
        assert_eq!(disk.primary, k.dst, "{}'s primary stayed behind:\n{}", disk.id, steps_text(&p));
        assert!(check_guest(client, *vm).await.iter().all(|acked| *acked > 0), "{vm} wrote no disk");
    }
    assert!(p.steps.iter().any(|s| s.note.contains("disk primaries moved here")), "{}", steps_text(&p));
    wait_released(&k.c, client, plan.id).await;
    // The VMs are free for another plan.
    let back = client.create_plan_by_id(None, vms.clone(), k.src, settings(3)).await.expect("plan back");
    let p = wait_end(client, back.id).await;
    assert_eq!(p.state, PlanState::Succeeded, "{}", steps_text(&p));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_killed_mid_plan_fails_back_to_the_recovery_snapshot() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut k = cluster(tmp.path(), &[]).await;
    let client = k.client.clone();
    // Every VM writes a disk (a replica on every host, so it survives the kill): after failing
    // back, each disk must be exactly what its guest's restored journal says — the guests keep
    // writing their disks after the recovery point, so a disk not rolled back with its memory
    // fails the check.
    let vms = group(&client, "d", 3, 64, 8000, k.src, true).await;
    let disk = client.volume("d1-disk").await.expect("the first VM's disk");
    client.write_volume(disk.id, MARK_OFFSET, &[0xaa; 4096]).await.expect("write before the plan");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let plan = client.create_plan_by_id(None, vms.clone(), k.dst, settings(1)).await.expect("create plan");
    let p = wait_plan_until(&client, plan.id, "took its recovery snapshot", |p| p.recovery.is_some()).await;
    let r = p.recovery.as_ref().expect("recovery point");
    assert_eq!(r.volume_snapshots.len(), 3, "every disk is in the recovery snapshot: {r:?}");
    assert!(r.volume_snapshots.iter().any(|(v, _)| *v == disk.id), "{r:?}");
    // Written after the recovery point: the fail-back rolls it back.
    client.write_volume(disk.id, MARK_OFFSET, &[0xbb; 4096]).await.expect("write after the recovery snapshot");
    let e = client.delete_volume(disk.id).await.expect_err("an attached disk cannot be deleted");
    assert!(e.to_string().contains("detach"), "{e}");
    // Kill the destination once the first VM lives there and the others have not arrived.
    wait_first_arrival(&client, plan.id).await;
    k.c.kill(k.dst.0).unwrap();
    let p = wait_end(&client, plan.id).await;
    assert_eq!(p.state, PlanState::FailedBack, "{}", steps_text(&p));
    let why = p.failure.clone().expect("a recorded reason");
    assert!(why.contains(&k.dst.to_string()) || why.contains("migration"), "reason: {why}");
    // A VM had moved to the dead host: the whole group came back from the recovery snapshot.
    assert_eq!(p.fail_back, Some(FailBackMode::RestoredFromSnapshot), "{}", steps_text(&p));
    assert!(!steps_text(&p).contains("CHECK OF THE RESTORED GROUP FAILED"), "{}", steps_text(&p));
    assert!(p.restore.as_ref().is_some_and(|r| r.len() == 3), "{p:?}");
    assert_restored_at_source(&k, &p).await;
    let back = client.read_volume(disk.id, MARK_OFFSET, 4096, None).await.expect("read the disk");
    assert!(back.iter().all(|b| *b == 0xaa), "the disk was not rolled back to the recovery snapshot");
    wait_released(&k.c, &client, plan.id).await;
    let snaps = client.snapshots(disk.id).await.unwrap();
    assert!(snaps.iter().all(|s| !s.name.starts_with("plan-")), "recovery snapshot not released: {snaps:?}");
}

/// What `host` itself says about its guest of `vm`: `None` when it has no guest for it (or does
/// not answer).
async fn guest_state_on(client: &HavenClient, host: NodeId, vm: VmId) -> Option<String> {
    let addr = ActorAddr { node: host, kind: ActorKind::Vm, id: vm.0 };
    let ask = ActorMessage::Vm(VmMessage::Client(VmRequest::Status { vm }));
    match client.clone().with_deadline(Duration::from_secs(2)).actor(addr, ask).await {
        Ok(ActorReply::Vm(VmResponse::Status(s))) => Some(s.state),
        Ok(other) => panic!("{host} answered {other:?} for {vm}"),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_frozen_mid_plan_fences_itself_and_never_runs_the_group_again() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut k = cluster(tmp.path(), &[]).await;
    let client = k.client.clone();
    let (vms, p) = plan_under_way(&k, "f").await;
    let id = p.id;
    // Freeze it once the guest that arrived runs there: frozen, not killed, that guest is still in
    // its memory and running when the process wakes.
    let arrived = p.progress.iter().find(|v| v.phase == PlanVmPhase::Arrived).expect("an arrived VM").vm;
    let deadline = Instant::now() + Duration::from_secs(10);
    while guest_state_on(&client, k.dst, arrived).await.as_deref() != Some("running") {
        assert!(Instant::now() < deadline, "{arrived} never ran on {}", k.dst);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    k.c.signal(k.dst.0, libc::SIGSTOP).unwrap();
    let frozen = Instant::now();
    let p = wait_end(&client, id).await;
    let why = p.failure.clone().expect("a recorded reason");
    assert!(why.contains(&k.dst.to_string()) || why.contains("migration"), "reason: {why}");
    assert_eq!(p.fail_back, Some(FailBackMode::RestoredFromSnapshot), "{}", steps_text(&p));
    // The restore waited until the destination could no longer hold a lease.
    assert!(p.steps.iter().any(|s| s.note.contains("to fence itself")), "{}", steps_text(&p));
    assert!(frozen.elapsed() > Duration::from_secs(4), "restored before the destination's lease could lapse");
    for vm in &vms {
        let s = client.vm_status(*vm).await.unwrap();
        assert_eq!((s.host, s.state.as_str(), s.origin.as_str()), (k.src, "running", "restored"), "{vm}: {s:?}");
        check_guest(&client, *vm).await;
    }
    // Woken, the destination pauses the copies it still holds and then drops them: it never
    // reports one running, and ends with none.
    k.c.signal(k.dst.0, libc::SIGCONT).unwrap();
    let woke = Instant::now();
    let mut seen = Vec::new();
    loop {
        let mut held = 0;
        for vm in &vms {
            if let Some(state) = guest_state_on(&client, k.dst, *vm).await {
                assert_ne!(state, "running", "{vm} runs on the woken destination {} besides {}", k.dst, k.src);
                seen.push(state);
                held += 1;
            }
        }
        if held == 0 && woke.elapsed() > Duration::from_secs(5) {
            break;
        }
        assert!(woke.elapsed() < Duration::from_secs(30), "{} still holds guests of the group", k.dst);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("the woken destination reported its leftover guests as {seen:?}");
    assert_restored_at_source(&k, &p).await;
    wait_released(&k.c, &client, id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_restarted_mid_plan_restores_the_group_from_images_on_its_disk() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut k = cluster(tmp.path(), &[]).await;
    let client = k.client.clone();
    let (_, p) = plan_under_way(&k, "s").await;
    let id = p.id;
    // The source loses every guest it ran; only its recovery images (fsynced) survive.
    k.c.kill(k.src.0).unwrap();
    k.c.start(k.src.0).unwrap();
    let p = wait_end(&client, id).await;
    assert_restored_at_source(&k, &p).await;
    wait_released(&k.c, &client, id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_mid_plan_the_next_leader_finishes_it() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut k = cluster(tmp.path(), &[]).await;
    let client = k.client.clone();
    let (vms, p) = plan_under_way(&k, "l").await;
    let id = p.id;
    assert_eq!(p.driver, Some(k.leader));
    k.c.kill(k.leader.0).unwrap();
    let p = wait_end(&client, id).await;
    assert!(p.state.is_terminal());
    let new_driver = p.driver.expect("a driver");
    assert_ne!(new_driver, k.leader, "{}", steps_text(&p));
    assert!(p.steps.iter().any(|s| s.note.contains("takes the plan over")), "{}", steps_text(&p));
    let home = if p.state == PlanState::Succeeded { k.dst } else { k.src };
    for vm in &vms {
        assert_runs_only_on(&k.c, &client, *vm, home).await;
        check_guest(&client, *vm).await;
    }
    wait_released(&k.c, &client, id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_plans_get_clear_typed_errors() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    // Small hosts, so "no room" is easy to reach.
    let k = cluster(tmp.path(), &[("HAVEN_VM_MEMORY_MIB", "256")]).await;
    let client = &k.client;
    let vms = group(client, "b", 2, 32, 200, k.src, false).await;
    let code = |e: &ClientError| e.code();
    let refuse = |r: Result<MigrationPlan, ClientError>, c: ErrorCode, needle: &str| {
        let e = r.expect_err("the plan must be refused");
        assert_eq!(code(&e), Some(c), "{e}");
        assert!(e.to_string().contains(needle), "expected {needle:?} in {e}");
    };
    refuse(
        client.create_plan_by_id(None, vec![VmId(999)], k.dst, settings(1)).await,
        ErrorCode::NotFound,
        "no VM vm-999",
    );
    // Disks: unknown volume, unknown VM, one volume on two VMs, detaching what is not attached.
    let e = client.attach_volume(vms[0], haven_client::proto::VolumeId(77)).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::NotFound), "{e}");
    let disk = client.create_volume(&VolumeSpec::new("b-disk", 1 << 20, 2)).await.expect("create volume");
    let e = client.attach_volume(VmId(999), disk.id).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::NotFound), "{e}");
    assert_eq!(client.attach_volume(vms[0], disk.id).await.expect("attach").volumes, vec![disk.id]);
    let e = client.attach_volume(vms[1], disk.id).await.unwrap_err();
    assert!(e.to_string().contains("already a disk of"), "{e}");
    assert!(client.detach_volume(vms[0], disk.id).await.expect("detach").volumes.is_empty());
    let e = client.detach_volume(vms[0], disk.id).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::NotFound), "{e}");
    refuse(client.create_plan_by_id(None, vms.clone(), NodeId(42), settings(1)).await, ErrorCode::NotFound, "node-42");
    refuse(
        client.create_plan_by_id(None, vms.clone(), k.src, settings(1)).await,
        ErrorCode::InvalidRequest,
        "same host",
    );
    refuse(
        client.create_plan_by_id(None, vec![], k.dst, settings(1)).await,
        ErrorCode::InvalidRequest,
        "at least one VM",
    );
    refuse(
        client.create_plan_by_id(None, vec![vms[0], vms[0]], k.dst, settings(1)).await,
        ErrorCode::InvalidRequest,
        "listed twice",
    );
    let spec = PlanSpec { name: None, vms: vec!["nosuch".into()], to: k.dst, settings: settings(1) };
    let e = client.create_plan(&spec).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::NotFound), "{e}");

    // No room: the destination offers 256 MiB and already holds a 200 MiB VM.
    let mut filler = VmSpec::new("filler", 200);
    filler.host = Some(k.dst);
    let filler = client.create_vm(&filler).await.unwrap();
    refuse(
        client.create_plan_by_id(None, vms.clone(), k.dst, settings(1)).await,
        ErrorCode::InvalidRequest,
        "MiB free",
    );
    // A group spread over two hosts; a VM that is not running.
    refuse(
        client.create_plan_by_id(None, vec![vms[0], filler.id], k.leader, settings(1)).await,
        ErrorCode::InvalidRequest,
        "from one host",
    );
    refuse(
        client.create_plan_by_id(None, vec![filler.id], k.src, settings(1)).await,
        ErrorCode::InvalidRequest,
        "not meant to be running",
    );
    client.delete_vm(filler.id).await.unwrap();
    // A draining destination takes nothing.
    let drained = client.drain_host(k.dst, settings(1)).await.unwrap();
    assert!(drained.plans.is_empty() && drained.skipped.is_empty(), "{drained:?}");
    assert_eq!(client.draining_hosts().await.unwrap(), vec![k.dst]);
    refuse(
        client.create_plan_by_id(None, vms.clone(), k.dst, settings(1)).await,
        ErrorCode::InvalidRequest,
        "draining",
    );
    client.undrain_host(k.dst).await.unwrap();
    assert!(client.draining_hosts().await.unwrap().is_empty());

    // A VM already in a plan: refused for a second plan, for a hand-started migration and for
    // deletion. Cancelling the plan brings it home.
    let first = client.create_plan_by_id(None, vec![vms[0]], k.dst, settings(1)).await.unwrap();
    refuse(
        client.create_plan_by_id(None, vms.clone(), k.leader, settings(1)).await,
        ErrorCode::InvalidRequest,
        "already in plan",
    );
    let opts = MigrationOptions { max_downtime_ms: 300, ..MigrationOptions::default() };
    let e = client.migrate_vm(vms[0], k.leader, opts).await.unwrap_err();
    assert!(e.to_string().contains("plan"), "{e}");
    let e = client.delete_vm(vms[0]).await.unwrap_err();
    assert!(e.to_string().contains("plan"), "{e}");
    let cancelled = client.cancel_plan(first.id, "changed my mind").await;
    let p = match cancelled {
        Ok(p) => {
            assert_eq!(p.state, PlanState::FailingBack);
            wait_end(client, first.id).await
        }
        // It may have raced to consolidation already.
        Err(e) => {
            assert!(e.to_string().contains("consolidating") || e.to_string().contains("ended"), "{e}");
            wait_end(client, first.id).await
        }
    };
    if p.state == PlanState::FailedBack {
        assert!(p.failure.as_deref().is_some_and(|f| f.contains("changed my mind")), "{p:?}");
        assert_runs_only_on(&k.c, client, vms[0], k.src).await;
    }
    let e = client.cancel_plan(first.id, "again").await.unwrap_err();
    assert!(e.to_string().contains("ended"), "{e}");
    let e = client.plan("plan-77").await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::NotFound), "{e}");
}
