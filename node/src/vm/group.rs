//! Group operations on one host's VMs for migration plans (C1): pause a consistency group at
//! once, take its recovery snapshot (each guest's memory image — pre-copied into a shadow while
//! the group runs, so the pause copies only the last dirty pages — written durably, and a
//! snapshot of each of its disks), resume it together; consolidate a group at the destination
//! (pause all, move the disks' primaries here, resume all, measure the resume spread); restore a
//! group from its recovery images and disk snapshots; release them.
//!
//! This module owns the recovery image file format and the host's group jobs. It must not
//! decide anything about plans (the leader's controller does); the only catalog change it makes
//! is the disks' primary handover during consolidation (a compare-and-set on each volume's
//! epoch). It reads the catalog to check that the VMs it touches are placed here. Everything read from an
//! image file is validated and bounded before use: the header against the VM the catalog names,
//! sizes against the file length, pages strictly ascending and in range, the whole file against
//! its trailing blake3 and the digest recorded in the catalog, and the loaded guest's memory
//! digest and last write against the recorded ones. A bad image is a typed [`ImageError`];
//! nothing is installed unless every image of the group loads.
//!
//! # Image file (`<data-dir>/recovery/plan-<plan>/vm-<vm>.img`, little endian)
//!
//! ```text
//! magic "HVNRIMG1" | version u16 | reserved u16 (0) | plan u64 | vm u64 | memory_pages u64
//! | last_seq u64 | memory_digest [32] | vcpu_len u32 | page_count u64
//! | vcpu state (vcpu_len bytes) | page_count × (page u64, 4096 bytes), pages ascending
//! | blake3 of everything before [32]
//! ```
//! Only non-zero pages are stored. A file is written to `*.tmp`, fsynced, renamed into place,
//! and the directory fsynced, so a recorded image is complete on disk.
//!
//! # Jobs
//!
//! Snapshot, consolidation and restore can outlast one request, so each runs as a job keyed by
//! (plan, kind): a request starts the job or joins the one running and waits a little for its
//! result; otherwise it answers `Pending`, and the controller asks again. A successful result is
//! kept (so a controller that asks again — a new leader, say — gets the same answer instead of
//! a second snapshot); a failed one is reported once and forgotten. Group jobs on one host run
//! one at a time.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use haven_proto::plan::{GroupRequest, GroupResponse, RecoveryImage};
use haven_proto::vm::{VmRecord, VmRunState, VmStatus};
use haven_proto::volume::{SnapshotKind, VolumeCommand, VolumeOutcome, VolumeRequest, VolumeResponse};
use haven_proto::{CatalogCommand, ClientResponse, CommandOutcome, ErrorCode, VmId, VolumeId};
use tokio::sync::watch;
use tracing::{info, warn};

use super::error::VmError;
use super::guest::{GuestDriver, GuestError, GuestSpec, RunState, SimulatedGuest, PAGE_SIZE};
use super::host::{Origin, VmHost, VmInstance};
use super::migration::MAX_VCPU_STATE_BYTES;

/// Directory under the data dir holding recovery images.
pub const RECOVERY_DIR: &str = "recovery";
const IMAGE_MAGIC: [u8; 8] = *b"HVNRIMG1";
const IMAGE_VERSION: u16 = 1;
const HEADER_LEN: u64 = 8 + 2 + 2 + 8 + 8 + 8 + 8 + 32 + 4 + 8;
const PAGE_ENTRY_LEN: u64 = 8 + PAGE_SIZE as u64;
const TRAILER_LEN: u64 = 32;
/// How long a group request waits for its job before answering `Pending`.
const JOB_WAIT: Duration = Duration::from_millis(1500);
/// How long a group job waits for the catalog (applied here) to place the group here.
const PLACEMENT_WAIT: Duration = Duration::from_secs(10);
/// Longest a consolidation waits for the paused group's disk writes before it leaves the disks'
/// primaries where they are.
const DISK_HANDOVER_DRAIN: Duration = Duration::from_secs(1);
/// Longest a consolidation waits for the disks' primary handovers to commit (they are proposed
/// together, so this bounds the extra pause).
const DISK_HANDOVER_WAIT: Duration = Duration::from_secs(2);

/// Why a recovery image could not be written or loaded.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path} is not a recovery image this host can use: {reason}")]
    BadHeader { path: PathBuf, reason: String },
    #[error("{path} is {actual} bytes; its header says {expected}")]
    SizeMismatch { path: PathBuf, expected: u64, actual: u64 },
    #[error("{path} is damaged or not the recorded image: {what} is {found}, expected {expected}")]
    DigestMismatch { path: PathBuf, what: &'static str, expected: String, found: String },
    #[error("{path}: bad page entry: {reason}")]
    BadPage { path: PathBuf, reason: String },
    #[error("{path}: the guest refused the image: {source}")]
    Guest { path: PathBuf, source: GuestError },
}

pub fn hex(h: &[u8]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// `<data-dir>/recovery/plan-<plan>`.
pub fn plan_dir(data_dir: &Path, plan: u64) -> PathBuf {
    data_dir.join(RECOVERY_DIR).join(format!("plan-{plan}"))
}

/// `<data-dir>/recovery/plan-<plan>/vm-<vm>.img`.
pub fn image_path(data_dir: &Path, plan: u64, vm: VmId) -> PathBuf {
    plan_dir(data_dir, plan).join(format!("vm-{}.img", vm.0))
}

/// The image's name as the catalog records it.
pub fn image_id(plan: u64, vm: VmId) -> String {
    format!("plan-{plan}/vm-{}", vm.0)
}

/// What a written image holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    pub digest: [u8; 32],
    pub bytes: u64,
    pub memory_digest: [u8; 32],
    pub last_seq: u64,
}

/// A writer that hashes what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: blake3::Hasher,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
}

impl<R: Read> HashingReader<R> {
    fn read_exact_hashed(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_exact(buf)?;
        self.hasher.update(buf);
        Ok(())
    }
}

/// Write the image body (header, vCPU state, non-zero pages; no trailer) of a paused guest.
/// Returns the memory digest and last write recorded in the header.
pub fn encode_body<W: Write + ?Sized>(
    guest: &dyn GuestDriver,
    plan: u64,
    vm: VmId,
    w: &mut W,
) -> std::io::Result<([u8; 32], u64)> {
    let spec = guest.spec();
    let vcpu = guest.vcpu_state();
    if vcpu.len() > MAX_VCPU_STATE_BYTES {
        return Err(std::io::Error::other(format!("vCPU state of {} bytes is too large", vcpu.len())));
    }
    let memory_digest = guest.memory_digest();
    let last_seq = guest.workload_stats().last_seq;
    let mut pages = Vec::new();
    for p in 0..spec.memory_pages {
        if !guest.is_zero_page(p).map_err(std::io::Error::other)? {
            pages.push(p);
        }
    }
    w.write_all(&IMAGE_MAGIC)?;
    w.write_all(&IMAGE_VERSION.to_le_bytes())?;
    w.write_all(&0u16.to_le_bytes())?;
    w.write_all(&plan.to_le_bytes())?;
    w.write_all(&vm.0.to_le_bytes())?;
    w.write_all(&spec.memory_pages.to_le_bytes())?;
    w.write_all(&last_seq.to_le_bytes())?;
    w.write_all(&memory_digest)?;
    w.write_all(&(vcpu.len() as u32).to_le_bytes())?;
    w.write_all(&(pages.len() as u64).to_le_bytes())?;
    w.write_all(&vcpu)?;
    let mut buf = vec![0u8; PAGE_SIZE];
    for p in pages {
        guest.read_page(p, &mut buf).map_err(std::io::Error::other)?;
        w.write_all(&p.to_le_bytes())?;
        w.write_all(&buf)?;
    }
    Ok((memory_digest, last_seq))
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_path_buf();
    move |source| ImageError::Io { what, path, source }
}

/// Write an image file durably: `body` writes everything but the trailer. The file is written
/// to `*.tmp`, fsynced, renamed into place and its directory fsynced.
pub fn write_image_file(
    path: &Path,
    body: impl FnOnce(&mut dyn Write) -> std::io::Result<([u8; 32], u64)>,
) -> Result<ImageSummary, ImageError> {
    let dir = path.parent().ok_or_else(|| ImageError::BadHeader {
        path: path.to_path_buf(),
        reason: "an image path needs a directory".into(),
    })?;
    std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    let tmp = path.with_extension("img.tmp");
    let file = File::create(&tmp).map_err(io_err("creating", &tmp))?;
    let mut w =
        HashingWriter { inner: BufWriter::with_capacity(1 << 20, file), hasher: blake3::Hasher::new(), written: 0 };
    let (memory_digest, last_seq) = body(&mut w).map_err(io_err("writing", &tmp))?;
    let digest = *w.hasher.finalize().as_bytes();
    let bytes = w.written + TRAILER_LEN;
    let mut inner = w.inner;
    inner.write_all(&digest).map_err(io_err("writing", &tmp))?;
    let file = inner.into_inner().map_err(|e| ImageError::Io {
        what: "writing",
        path: tmp.clone(),
        source: e.into_error(),
    })?;
    // Durable before it is reported: the catalog will point at this file.
    file.sync_all().map_err(io_err("syncing", &tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io_err("renaming", path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("syncing", dir))?;
    Ok(ImageSummary { digest, bytes, memory_digest, last_seq })
}

fn le_u16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Build an unstarted guest of `spec` from the image at `path`, checking it against `expected`
/// (the catalog's record of the image) and `plan`/`vm`. See the module docs for every check.
pub fn load_image(
    path: &Path,
    plan: u64,
    vm: VmId,
    spec: GuestSpec,
    expected: &RecoveryImage,
) -> Result<Arc<SimulatedGuest>, ImageError> {
    let bad = |reason: String| ImageError::BadHeader { path: path.to_path_buf(), reason };
    let file = File::open(path).map_err(io_err("opening", path))?;
    let actual = file.metadata().map_err(io_err("reading", path))?.len();
    if actual < HEADER_LEN + TRAILER_LEN {
        return Err(ImageError::SizeMismatch { path: path.to_path_buf(), expected: HEADER_LEN + TRAILER_LEN, actual });
    }
    let mut r = HashingReader { inner: BufReader::with_capacity(1 << 20, file), hasher: blake3::Hasher::new() };
    let mut header = [0u8; HEADER_LEN as usize];
    r.read_exact_hashed(&mut header).map_err(io_err("reading", path))?;
    if header[0..8] != IMAGE_MAGIC {
        return Err(bad("bad magic".into()));
    }
    let version = le_u16(&header[8..10]);
    if version != IMAGE_VERSION || le_u16(&header[10..12]) != 0 {
        return Err(bad(format!("unsupported version {version}")));
    }
    let (h_plan, h_vm, pages) = (le_u64(&header[12..20]), le_u64(&header[20..28]), le_u64(&header[28..36]));
    if h_plan != plan || h_vm != vm.0 {
        return Err(bad(format!("it holds vm-{h_vm} of plan {h_plan}, not {vm} of plan {plan}")));
    }
    if pages != spec.memory_pages {
        return Err(bad(format!("it holds {pages} pages; {vm} has {}", spec.memory_pages)));
    }
    let last_seq = le_u64(&header[36..44]);
    let mut memory_digest = [0u8; 32];
    memory_digest.copy_from_slice(&header[44..76]);
    let vcpu_len = le_u32(&header[76..80]) as u64;
    let page_count = le_u64(&header[80..88]);
    if vcpu_len > MAX_VCPU_STATE_BYTES as u64 {
        return Err(bad(format!("vCPU state of {vcpu_len} bytes exceeds {MAX_VCPU_STATE_BYTES}")));
    }
    if page_count > pages {
        return Err(bad(format!("{page_count} stored pages in a guest of {pages}")));
    }
    let expected_len = page_count
        .checked_mul(PAGE_ENTRY_LEN)
        .and_then(|p| p.checked_add(HEADER_LEN + vcpu_len + TRAILER_LEN))
        .ok_or_else(|| bad("sizes overflow".into()))?;
    if expected_len != actual {
        return Err(ImageError::SizeMismatch { path: path.to_path_buf(), expected: expected_len, actual });
    }
    let mut vcpu = vec![0u8; vcpu_len as usize];
    r.read_exact_hashed(&mut vcpu).map_err(io_err("reading", path))?;
    let guest = SimulatedGuest::new(spec);
    let mut entry = vec![0u8; PAGE_ENTRY_LEN as usize];
    let mut next_min = 0u64;
    for _ in 0..page_count {
        r.read_exact_hashed(&mut entry).map_err(io_err("reading", path))?;
        let page = le_u64(&entry[..8]);
        if page < next_min || page >= pages {
            return Err(ImageError::BadPage {
                path: path.to_path_buf(),
                reason: format!("page {page} out of order or out of range (next at least {next_min}, {pages} pages)"),
            });
        }
        next_min = page + 1;
        guest.write_page(page, &entry[8..]).map_err(|source| ImageError::Guest { path: path.to_path_buf(), source })?;
    }
    let computed = *r.hasher.finalize().as_bytes();
    let mut trailer = [0u8; 32];
    r.inner.read_exact(&mut trailer).map_err(io_err("reading", path))?;
    if trailer != computed {
        return Err(ImageError::DigestMismatch {
            path: path.to_path_buf(),
            what: "the file's blake3",
            expected: hex(&trailer),
            found: hex(&computed),
        });
    }
    if hex(&computed) != expected.image_digest {
        return Err(ImageError::DigestMismatch {
            path: path.to_path_buf(),
            what: "the image digest",
            expected: expected.image_digest.clone(),
            found: hex(&computed),
        });
    }
    guest.load_vcpu_state(&vcpu).map_err(|source| ImageError::Guest { path: path.to_path_buf(), source })?;
    let loaded = guest.memory_digest();
    if loaded != memory_digest || hex(&loaded) != expected.memory_digest {
        return Err(ImageError::DigestMismatch {
            path: path.to_path_buf(),
            what: "the loaded memory digest",
            expected: expected.memory_digest.clone(),
            found: hex(&loaded),
        });
    }
    let seq = guest.workload_stats().last_seq;
    if seq != last_seq || seq != expected.last_seq {
        return Err(bad(format!("it resumes at write {seq}; the recovery point says {}", expected.last_seq)));
    }
    Ok(guest)
}

// ---------------------------------------------------------------------------------------------
// Group jobs

type JobResult = Result<GroupResponse, VmError>;
/// Group jobs by (plan, kind), each with the channel its result arrives on.
type Jobs = HashMap<(u64, &'static str), watch::Receiver<Option<JobResult>>>;

/// The host's group-operation state (part of [`VmHost`]).
pub struct GroupState {
    data_dir: PathBuf,
    capture_limit_bytes: u64,
    /// One group job at a time on this host.
    serial: tokio::sync::Mutex<()>,
    jobs: Mutex<Jobs>,
    /// VMs a group job holds: the reconcile loop leaves their run state alone. Reconcile applies
    /// run states while holding this lock, so a job that inserted a VM here knows reconcile will
    /// not resume it underneath.
    pub(super) held: Mutex<HashSet<VmId>>,
    /// Guests a restore stopped whose disk writes may still be in flight: every restore waits for
    /// them before rolling disks back, also when an earlier attempt gave up waiting.
    retired: Mutex<Vec<(String, Arc<dyn GuestDriver>)>>,
}

impl GroupState {
    pub fn new(data_dir: PathBuf, capture_limit_bytes: u64) -> Self {
        Self {
            data_dir,
            capture_limit_bytes,
            serial: tokio::sync::Mutex::new(()),
            jobs: Mutex::new(HashMap::new()),
            held: Mutex::new(HashSet::new()),
            retired: Mutex::new(Vec::new()),
        }
    }
}

/// Releases held VMs when dropped.
struct Hold<'a> {
    state: &'a GroupState,
    vms: Vec<VmId>,
}

impl<'a> Hold<'a> {
    fn new(state: &'a GroupState, vms: &[VmId]) -> Self {
        state.held.lock().expect("held lock").extend(vms.iter().copied());
        Hold { state, vms: vms.to_vec() }
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut held = self.state.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for vm in &self.vms {
            held.remove(vm);
        }
    }
}

fn blocking_failed(e: tokio::task::JoinError) -> VmError {
    VmError::internal(format!("group job thread failed: {e}"))
}

/// Pause every guest; on failure resume the ones paused and report which could not pause.
fn pause_all(insts: &[Arc<VmInstance>]) -> Result<(), VmError> {
    for (i, inst) in insts.iter().enumerate() {
        if let Err(e) = inst.guest.pause() {
            for done in &insts[..i] {
                let _ = done.guest.resume();
            }
            return Err(VmError::unavailable(format!("cannot pause {}: {e}", inst.id)));
        }
    }
    Ok(())
}

/// The guests of `insts`, named, for [`super::disk::drain`].
fn named_guests(insts: &[Arc<VmInstance>]) -> Vec<(String, Arc<dyn GuestDriver>)> {
    insts.iter().map(|i| (i.id.to_string(), i.guest.clone())).collect()
}

/// Resume every paused guest back to back; the instants of the first and last resume. A host
/// without its lease (`lease_valid` false) resumes none: they stay paused until reconcile
/// resumes them with the lease back.
fn resume_all(insts: &[Arc<VmInstance>], lease_valid: bool) -> (Vec<String>, Option<(Instant, Instant)>) {
    let mut errors = Vec::new();
    if !lease_valid {
        errors.push("this host's lease lapsed (no quorum contact): the group stays paused".to_string());
        return (errors, None);
    }
    let mut first = None;
    let mut last = None;
    for inst in insts {
        match inst.guest.resume() {
            Ok(()) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
            }
            Err(e) => errors.push(format!("{}: {e}", inst.id)),
        }
    }
    (errors, first.zip(last))
}

impl VmHost {
    /// A group request from the leader's plan controller.
    pub async fn group(self: &Arc<Self>, req: GroupRequest) -> Result<GroupResponse, VmError> {
        let plan = req.plan();
        match req {
            GroupRequest::Snapshot { vms, .. } => {
                let me = self.clone();
                self.job(plan, "snapshot", async move { me.snapshot(plan, vms).await }).await
            }
            GroupRequest::Consolidate { vms, .. } => {
                let me = self.clone();
                self.job(plan, "consolidate", async move { me.consolidate(plan, vms).await }).await
            }
            GroupRequest::Restore { images, generations, volume_snapshots, .. } => {
                let me = self.clone();
                self.job(plan, "restore", async move { me.restore(plan, images, generations, volume_snapshots).await })
                    .await
            }
            GroupRequest::Release { volume_snapshots, .. } => self.release(plan, volume_snapshots).await,
        }
    }

    /// Start or join the job `(plan, kind)`; see the module docs.
    async fn job(
        self: &Arc<Self>,
        plan: u64,
        kind: &'static str,
        work: impl std::future::Future<Output = JobResult> + Send + 'static,
    ) -> JobResult {
        let key = (plan, kind);
        let mut rx = {
            let mut jobs = self.group.jobs.lock().expect("jobs lock");
            match jobs.get(&key) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    jobs.insert(key, rx.clone());
                    tokio::spawn(async move {
                        let result = work.await;
                        if let Err(e) = &result {
                            warn!(plan, kind, error = %e, "group job failed");
                        }
                        let _ = tx.send(Some(result));
                    });
                    rx
                }
            }
        };
        let done = tokio::time::timeout(JOB_WAIT, rx.wait_for(Option::is_some)).await;
        let result = match done {
            Err(_) => return Ok(GroupResponse::Pending),
            Ok(Err(_)) => Err(VmError::internal(format!("group job {kind} of plan {plan} vanished"))),
            Ok(Ok(r)) => r.clone().unwrap_or(Ok(GroupResponse::Pending)),
        };
        if result.is_err() {
            // Report a failure once; asking again retries.
            self.group.jobs.lock().expect("jobs lock").remove(&key);
        }
        result
    }

    /// The group's records and local instances, once the catalog applied here places every VM
    /// of `vms` here (not migrating) and each runs; waits a bounded time for that.
    async fn local_group(&self, vms: &[VmId]) -> Result<Vec<(VmRecord, Arc<VmInstance>)>, VmError> {
        let deadline = Instant::now() + PLACEMENT_WAIT;
        loop {
            let mut out = Vec::new();
            let mut problem = None;
            for vm in vms {
                let record = self.record(*vm)?;
                if record.host != self.node && record.migrating_to == Some(self.node) {
                    // Moved here by a commit this host's catalog has not applied yet.
                    problem = Some(format!("the catalog here does not show {vm} arrived yet"));
                    break;
                }
                if record.host != self.node {
                    return Err(VmError::invalid(format!("{vm} runs on {}, not {}", record.host, self.node)));
                }
                if let Some(t) = record.migrating_to {
                    problem = Some(format!("{vm} is migrating to {t}"));
                    break;
                }
                match self.instance(*vm) {
                    Some(inst) if inst.guest.state() == RunState::Running => out.push((record, inst)),
                    Some(inst) => {
                        problem = Some(format!("{vm} is {:?} on {}, not running", inst.guest.state(), self.node));
                        break;
                    }
                    None => {
                        problem = Some(format!("{vm} is not installed on {} yet", self.node));
                        break;
                    }
                }
            }
            match problem {
                None => return Ok(out),
                Some(p) if Instant::now() >= deadline => return Err(VmError::unavailable(p)),
                Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Pre-copy each guest into a shadow while it runs (groups within the in-memory limit), pause
    /// the group, drain its disk writes, finish the capture (the shadows' last dirty pages and
    /// device state, or whole images for a group over the limit), snapshot its disks, resume the
    /// group, write the images durably.
    async fn snapshot(self: Arc<Self>, plan: u64, vms: Vec<VmId>) -> JobResult {
        let _serial = self.group.serial.lock().await;
        let group = self.local_group(&vms).await?;
        let insts: Vec<Arc<VmInstance>> = group.iter().map(|(_, i)| i.clone()).collect();
        let total: u64 = insts.iter().map(|i| i.guest.spec().memory_pages * PAGE_SIZE as u64).sum();
        let in_memory = total <= self.group.capture_limit_bytes;
        let data_dir = self.group.data_dir.clone();
        let hold = Hold::new(&self.group, &vms);
        // While the group runs: copy memory into shadows, then the pages written meanwhile,
        // until few are left; the pause then copies only the last of them.
        let shadows = if in_memory {
            let sources: Vec<_> = insts.iter().map(|i| (i.id, i.guest.clone())).collect();
            let shadows = tokio::task::spawn_blocking(move || Shadows::precopy(sources))
                .await
                .map_err(blocking_failed)?
                .map_err(|e| VmError::internal(format!("pre-copying the group: {e}")))?;
            Some(shadows)
        } else {
            None
        };
        let paused_at = Instant::now();
        pause_all(&insts)?;
        // Disk writes in flight finish first: each guest's journal then says exactly what its
        // disks hold, and the disks' snapshots below hold nothing the journals do not know.
        if let Err(e) = super::disk::drain(named_guests(&insts), super::disk::DISK_DRAIN_LIMIT).await {
            resume_all(&insts, self.lease_valid());
            return Err(VmError::unavailable(format!("recovery snapshot not taken: {e}")));
        }
        // All paused: the group is frozen at one point, so what is captured now is
        // crash-consistent across the group.
        let captured = {
            let insts = insts.clone();
            let data_dir = data_dir.clone();
            tokio::task::spawn_blocking(move || -> Result<Vec<Captured>, String> {
                if let Some(shadows) = shadows {
                    return shadows.finish().map_err(|e| format!("finishing the capture: {e}"));
                }
                insts
                    .iter()
                    .map(|inst| {
                        let path = image_path(&data_dir, plan, inst.id);
                        let guest = inst.guest.clone();
                        let s = write_image_file(&path, |w| encode_body(guest.as_ref(), plan, inst.id, w))
                            .map_err(|e| e.to_string())?;
                        Ok(Captured::Written(inst.id, s))
                    })
                    .collect()
            })
            .await
        };
        // The disks too, still paused: memory and disks are one cut.
        let disks = match &captured {
            Ok(Ok(_)) => Some(self.snapshot_disks(plan, &vms).await),
            _ => None,
        };
        let (errors, _) = resume_all(&insts, self.lease_valid());
        let paused_ms = paused_at.elapsed().as_millis() as u64;
        drop(hold);
        if !errors.is_empty() {
            warn!(plan, ?errors, "could not resume every VM after the recovery snapshot; reconcile will retry");
        }
        let captured = captured.map_err(blocking_failed)?.map_err(VmError::internal)?;
        let volume_snapshots = disks.unwrap_or(Ok(Vec::new()))?;
        let images = tokio::task::spawn_blocking(move || -> Result<Vec<RecoveryImage>, ImageError> {
            captured
                .into_iter()
                .map(|c| {
                    let (vm, summary) = match c {
                        Captured::Written(vm, s) => (vm, s),
                        Captured::Shadow(vm, copy) => {
                            let s = write_image_file(&image_path(&data_dir, plan, vm), |w| {
                                encode_body(copy.as_ref(), plan, vm, w)
                            })?;
                            (vm, s)
                        }
                    };
                    Ok(RecoveryImage {
                        vm,
                        image: image_id(plan, vm),
                        image_digest: hex(&summary.digest),
                        memory_digest: hex(&summary.memory_digest),
                        last_seq: summary.last_seq,
                        bytes: summary.bytes,
                    })
                })
                .collect()
        })
        .await
        .map_err(blocking_failed)?
        .map_err(|e| VmError::internal(e.to_string()))?;
        info!(plan, vms = images.len(), paused_ms, in_memory, "recovery snapshot taken");
        metrics::histogram!("haven_plan_snapshot_pause_seconds").record(paused_ms as f64 / 1e3);
        Ok(GroupResponse::Snapshot { images, volume_snapshots, paused_ms, incarnation: crate::actors::incarnation() })
    }

    /// Pause the whole group here, drain its disk writes, hand its disks' primaries to this host,
    /// then resume the group together. Refused if a VM's guest here did not arrive by migration
    /// (this host restarted and booted it fresh: its memory is lost).
    async fn consolidate(self: Arc<Self>, plan: u64, vms: Vec<VmId>) -> JobResult {
        let _serial = self.group.serial.lock().await;
        let group = self.local_group(&vms).await?;
        if let Some((_, i)) = group.iter().find(|(_, i)| i.origin == Origin::Booted) {
            return Err(VmError::internal(format!(
                "{} was booted fresh on {} (the host restarted): its migrated memory is lost",
                i.id, self.node
            )));
        }
        let insts: Vec<Arc<VmInstance>> = group.iter().map(|(_, i)| i.clone()).collect();
        let hold = Hold::new(&self.group, &vms);
        let started = Instant::now();
        pause_all(&insts)?;
        // With no disk write in flight, the disks' primaries move without a write to retry.
        let (disks_moved, disks_kept) = match super::disk::drain(named_guests(&insts), DISK_HANDOVER_DRAIN).await {
            Ok(()) => self.take_disk_primaries(&group).await,
            Err(e) => {
                let kept = group.iter().flat_map(|(r, _)| r.volumes.iter().map(|v| (*v, e.clone()))).collect();
                (Vec::new(), kept)
            }
        };
        let (errors, span) = resume_all(&insts, self.lease_valid());
        drop(hold);
        if !errors.is_empty() {
            return Err(VmError::internal(format!("could not resume the group: {}", errors.join("; "))));
        }
        let (first, last) = span.unwrap_or((started, started));
        let spread_ms = (last - first).as_millis() as u64;
        let paused_ms = (last - started).as_millis() as u64;
        info!(
            plan,
            spread_us = (last - first).as_micros() as u64,
            paused_ms,
            disks_moved = disks_moved.len(),
            "group consolidated"
        );
        metrics::histogram!("haven_plan_resume_spread_seconds").record((last - first).as_secs_f64());
        Ok(GroupResponse::Consolidated { resume_spread_ms: spread_ms, paused_ms, disks_moved, disks_kept })
    }

    /// Make this host the primary of every disk of `group` it holds an in-sync replica of (a
    /// compare-and-set on each volume's epoch, so a failover that raced ahead wins). Disks without
    /// an in-sync replica here, or whose change did not commit in time, keep their primary; the
    /// reasons are returned for the plan's log. The group is paused and drained meanwhile.
    async fn take_disk_primaries(
        &self,
        group: &[(VmRecord, Arc<VmInstance>)],
    ) -> (Vec<VolumeId>, Vec<(VolumeId, String)>) {
        let (mut moved, mut kept) = (Vec::new(), Vec::new());
        let mut handovers = Vec::new();
        for vol in group.iter().flat_map(|(r, _)| r.volumes.iter().copied()) {
            let record = match crate::catalog::volumes::volume(&self.store, vol) {
                Ok(Some(r)) => r,
                Ok(None) => continue, // deleted: nothing to move
                Err(e) => {
                    kept.push((vol, format!("catalog read failed: {e}")));
                    continue;
                }
            };
            if record.primary == self.node {
                continue;
            }
            if !record.in_sync.contains(&self.node) {
                kept.push((
                    vol,
                    format!("{} holds no in-sync replica; the primary stays on {}", self.node, record.primary),
                ));
                continue;
            }
            let cmd = VolumeCommand::SetReplication {
                volume: vol,
                expected_epoch: record.epoch,
                primary: self.node,
                in_sync: record.in_sync.clone(),
            };
            let write = self.proposer.write(CatalogCommand::Volume(cmd), 0);
            handovers.push(async move { (vol, record.primary, tokio::time::timeout(DISK_HANDOVER_WAIT, write).await) });
        }
        for (vol, from, result) in futures::future::join_all(handovers).await {
            match result {
                Ok(Ok(ClientResponse::Written {
                    outcome: CommandOutcome::Volume(VolumeOutcome::Volume(v)), ..
                })) if v.primary == self.node => {
                    info!(%vol, %from, to = %self.node, "disk primary moved with its VM");
                    moved.push(vol);
                }
                Ok(Ok(other)) => kept.push((vol, format!("handover refused: {other:?}"))),
                Ok(Err(e)) => kept.push((vol, format!("handover not committed: {e}"))),
                Err(_) => kept.push((vol, format!("handover undecided after {} ms", DISK_HANDOVER_WAIT.as_millis()))),
            }
        }
        (moved, kept)
    }

    /// Replace the group's guests with the ones in their recovery images and start them together.
    async fn restore(
        self: Arc<Self>,
        plan: u64,
        images: Vec<RecoveryImage>,
        generations: Vec<(VmId, u64)>,
        volume_snapshots: Vec<(VolumeId, u64)>,
    ) -> JobResult {
        let _serial = self.group.serial.lock().await;
        // Wait for the catalog here to place every VM here at its new generation.
        let deadline = Instant::now() + PLACEMENT_WAIT;
        let records = loop {
            let mut records = Vec::new();
            let mut waiting = None;
            for (vm, generation) in &generations {
                let r = self.record(*vm)?;
                if r.generation > *generation {
                    return Err(VmError::invalid(format!(
                        "{vm} moved on since the restore (generation {} > {generation})",
                        r.generation
                    )));
                }
                if r.host != self.node || r.generation != *generation {
                    waiting = Some(format!("{vm} is at generation {} on {}", r.generation, r.host));
                    break;
                }
                records.push((r, *generation));
            }
            match waiting {
                None => break records,
                Some(w) if Instant::now() >= deadline => {
                    return Err(VmError::unavailable(format!("the catalog here does not place the group yet: {w}")))
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let todo: Vec<(VmRecord, u64)> =
            records.into_iter().filter(|(r, g)| self.instance(r.id).is_none_or(|i| i.generation() < *g)).collect();
        if !todo.is_empty() {
            let data_dir = self.group.data_dir.clone();
            let mut jobs = Vec::new();
            for (r, g) in &todo {
                let image = images
                    .iter()
                    .find(|i| i.vm == r.id)
                    .cloned()
                    .ok_or_else(|| VmError::invalid(format!("no recovery image for {}", r.id)))?;
                jobs.push((r.clone(), *g, image));
            }
            // Every image loads and checks out, or nothing changes.
            let loaded = tokio::task::spawn_blocking(move || -> Result<Vec<_>, ImageError> {
                jobs.into_iter()
                    .map(|(r, g, image)| {
                        let guest = load_image(
                            &image_path(&data_dir, plan, r.id),
                            plan,
                            r.id,
                            super::host::spec_of(&r),
                            &image,
                        )?;
                        Ok((r, g, guest as Arc<dyn GuestDriver>))
                    })
                    .collect()
            })
            .await
            .map_err(blocking_failed)?
            .map_err(|e| VmError::internal(format!("recovery snapshot unusable: {e}")))?;
            let ids: Vec<VmId> = loaded.iter().map(|(r, _, _)| r.id).collect();
            let hold = Hold::new(&self.group, &ids);
            // The live guests are given up for the snapshot: stop them, and let their disk writes
            // in flight finish, before their disks go back.
            let retired = {
                let mut retired = self.group.retired.lock().expect("retired lock");
                for (r, _, _) in &loaded {
                    if let Some(old) = self.remove_instance(r.id) {
                        let _ = old.guest.stop();
                        retired.push((old.id.to_string(), old.guest.clone()));
                    }
                    self.drop_incoming(r.id);
                }
                retired.clone()
            };
            super::disk::drain(retired, super::disk::DISK_DRAIN_LIMIT)
                .await
                .map_err(|e| VmError::unavailable(format!("restore waits for the old guests: {e}")))?;
            self.group.retired.lock().expect("retired lock").retain(|(_, g)| g.disk_writes_in_flight() > 0);
            // A failed rollback fails the job; the controller asks again (rolling back to the same
            // snapshot twice is harmless), and reconcile boots none of these VMs meanwhile.
            self.rollback_disks(&volume_snapshots).await?;
            let mut installed = Vec::new();
            for (r, g, guest) in loaded {
                // The timeline the image was taken from went on after it (and was given up):
                // the restored guest's disk writes start a new branch.
                guest.fork_disk_timeline();
                installed.push((r.desired, self.install(r.id, guest, g, Origin::Restored)));
            }
            // Start the group together (as the catalog wants it).
            for (desired, inst) in &installed {
                if !self.lease_valid() {
                    break; // reconcile starts the rest once the lease is back
                }
                let result = match desired {
                    VmRunState::Running => inst.guest.start(),
                    VmRunState::Paused => inst.guest.start().and_then(|_| inst.guest.pause()),
                    VmRunState::Stopped => Ok(()),
                };
                if let Err(e) = result {
                    warn!(vm = %inst.id, error = %e, "restored guest did not start; reconcile will retry");
                }
            }
            drop(hold);
            info!(plan, vms = installed.len(), "group restored from its recovery snapshot");
        }
        let mut statuses = Vec::new();
        for (vm, _) in &generations {
            let inst = self.instance(*vm).ok_or_else(|| VmError::internal(format!("{vm} vanished")))?;
            statuses.push(self.status_of(&inst));
        }
        Ok(GroupResponse::Restored(statuses))
    }

    /// One recovery snapshot of every disk of `vms` (the group is paused). A snapshot left by an
    /// earlier attempt of the same plan is replaced: it does not match the new memory images.
    async fn snapshot_disks(&self, plan: u64, vms: &[VmId]) -> Result<Vec<(VolumeId, u64)>, VmError> {
        let mut disks = Vec::new();
        for vm in vms {
            disks.extend(self.record(*vm)?.volumes);
        }
        if disks.is_empty() {
            return Ok(Vec::new());
        }
        let volumes = &self.volumes;
        let name = format!("plan-{plan}-recovery");
        // The disks are independent volumes: snapshot them together, so the pause lasts about
        // one snapshot rather than one per disk.
        let snapshot_one = |vol: VolumeId| {
            let (volumes, name) = (volumes.clone(), name.clone());
            async move {
                let stale = crate::catalog::volumes::snapshots(&self.store, vol)
                    .map_err(|e| VmError::internal(e.to_string()))?
                    .into_iter()
                    .find(|s| s.name == name);
                if let Some(s) = stale {
                    volumes.client(VolumeRequest::DeleteSnapshot { volume: vol, snapshot: s.id }).await?;
                }
                let req = VolumeRequest::Snapshot { volume: vol, name, label: None, kind: SnapshotKind::Recovery };
                match volumes.client(req).await? {
                    VolumeResponse::Snapshot(s) => Ok((vol, s.id)),
                    other => Err(VmError::internal(format!("{vol} answered a snapshot with {other:?}"))),
                }
            }
        };
        futures::future::join_all(disks.into_iter().map(snapshot_one)).await.into_iter().collect()
    }

    /// Roll every disk back to its recovery snapshot.
    async fn rollback_disks(&self, snapshots: &[(VolumeId, u64)]) -> Result<(), VmError> {
        if snapshots.is_empty() {
            return Ok(());
        }
        for (vol, snap) in snapshots {
            self.volumes
                .client(VolumeRequest::Rollback { volume: *vol, snapshot: *snap })
                .await
                .map_err(|e| e.context(format!("rolling {vol} back to its recovery snapshot {snap}")))?;
        }
        Ok(())
    }

    /// Delete the plan's recovery images and its disks' recovery snapshots, and forget its jobs.
    async fn release(self: &Arc<Self>, plan: u64, volume_snapshots: Vec<(VolumeId, u64)>) -> JobResult {
        if !volume_snapshots.is_empty() {
            for (vol, snap) in &volume_snapshots {
                match self.volumes.client(VolumeRequest::DeleteSnapshot { volume: *vol, snapshot: *snap }).await {
                    Ok(_) => {}
                    Err(e) if e.code() == ErrorCode::NotFound => {} // released before, or the volume is gone
                    Err(e) => return Err(e.into()),
                }
            }
        }
        self.group.jobs.lock().expect("jobs lock").retain(|(p, _), _| *p != plan);
        let dir = plan_dir(&self.group.data_dir, plan);
        let files = tokio::task::spawn_blocking(move || -> std::io::Result<u32> {
            let mut n = 0;
            match std::fs::read_dir(&dir) {
                Ok(entries) => {
                    for e in entries {
                        let e = e?;
                        std::fs::remove_file(e.path())?;
                        n += 1;
                    }
                    std::fs::remove_dir(&dir)?;
                    if let Some(parent) = dir.parent() {
                        File::open(parent)?.sync_all()?;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            Ok(n)
        })
        .await
        .map_err(blocking_failed)?
        .map_err(|e| VmError::internal(format!("deleting the recovery images of plan {plan}: {e}")))?;
        if files > 0 {
            info!(plan, files, "recovery images deleted");
        }
        Ok(GroupResponse::Released { files })
    }

    /// Live status of a local VM.
    pub(super) fn status_of(&self, inst: &VmInstance) -> VmStatus {
        let s = inst.guest.workload_stats();
        VmStatus {
            vm: inst.id,
            host: self.node,
            state: format!("{:?}", inst.guest.state()).to_lowercase(),
            writes: s.writes,
            last_seq: s.last_seq,
            throttle_percent: s.throttle_percent,
            digest: hex(&inst.guest.memory_digest()),
            origin: inst.origin.as_str().into(),
        }
    }

    /// Whether `record` waits for a restore from a recovery snapshot on this host: a plan failing
    /// back placed it here at this generation and no guest of that generation runs here yet.
    /// Reconcile neither boots nor touches such a VM; the restore job installs it.
    pub(super) fn restore_pending(&self, record: &VmRecord, plans: &[haven_proto::plan::MigrationPlan]) -> bool {
        let installed = self.instance(record.id).map(|i| i.generation());
        plans.iter().any(|p| {
            p.from == self.node
                && p.restore.as_ref().is_some_and(|r| {
                    r.iter()
                        .any(|(vm, g)| *vm == record.id && *g == record.generation && installed.is_none_or(|i| i < *g))
                })
        })
    }
}

/// What a snapshot captured of one guest while the group was paused.
enum Captured {
    /// A frozen copy of the guest as it was paused (its image is written after the group resumed).
    Shadow(VmId, Arc<SimulatedGuest>),
    /// Written to disk while paused (groups over the in-memory limit).
    Written(VmId, ImageSummary),
}

/// Pre-copy rounds while the group runs before the pause copies the rest.
const SHADOW_ROUNDS: usize = 6;
/// A round that found this few pages written since the previous one ends the pre-copy.
const SHADOW_SETTLED_PAGES: usize = 256;

/// Live copies of a group's guests, kept current by dirty logging (the recovery snapshot's
/// pre-copy: the group is paused only for the pages written since the last round). Dirty logging
/// on the sources ends when the shadows are finished or dropped.
struct Shadows {
    guests: Vec<(VmId, Arc<dyn GuestDriver>, Arc<SimulatedGuest>)>,
}

impl Shadows {
    /// Copy every guest's memory while it runs, then what was written meanwhile, until a round
    /// finds few pages (or [`SHADOW_ROUNDS`] passed). On a blocking thread.
    fn precopy(sources: Vec<(VmId, Arc<dyn GuestDriver>)>) -> Result<Self, GuestError> {
        let guests: Vec<_> =
            sources.into_iter().map(|(vm, g)| (vm, g.clone(), SimulatedGuest::new(g.spec()))).collect();
        let shadows = Shadows { guests };
        for (_, source, _) in &shadows.guests {
            source.start_dirty_log(); // every page counts as dirty once
        }
        let mut buf = vec![0u8; PAGE_SIZE];
        for _ in 0..SHADOW_ROUNDS {
            let mut copied = 0;
            for (_, source, copy) in &shadows.guests {
                copied = copied.max(copy_dirty(source.as_ref(), copy, &mut buf)?);
            }
            if copied <= SHADOW_SETTLED_PAGES {
                break;
            }
        }
        Ok(shadows)
    }

    /// With the group paused: copy the last dirty pages and the device state of every guest.
    fn finish(self) -> Result<Vec<Captured>, GuestError> {
        let mut buf = vec![0u8; PAGE_SIZE];
        let mut out = Vec::with_capacity(self.guests.len());
        for (vm, source, copy) in &self.guests {
            copy_dirty(source.as_ref(), copy, &mut buf)?;
            copy.load_vcpu_state(&source.vcpu_state())?;
            out.push(Captured::Shadow(*vm, copy.clone()));
        }
        Ok(out) // dropping `self` ends the dirty logging
    }
}

impl Drop for Shadows {
    fn drop(&mut self) {
        for (_, source, _) in &self.guests {
            source.stop_dirty_log();
        }
    }
}

/// Copy the pages `source` dirtied since the last call into `copy`; how many.
fn copy_dirty(source: &dyn GuestDriver, copy: &SimulatedGuest, buf: &mut [u8]) -> Result<usize, GuestError> {
    let dirty = source.take_dirty();
    for &page in &dirty {
        if source.is_zero_page(page)? {
            if !copy.is_zero_page(page)? {
                buf.fill(0);
                copy.write_page(page, buf)?;
            }
            continue;
        }
        source.read_page(page, buf)?;
        copy.write_page(page, buf)?;
    }
    Ok(dirty.len())
}

#[cfg(test)]
mod tests {
    use super::super::guest::WorkloadPattern;
    use super::*;

    fn spec(pages: u64) -> GuestSpec {
        GuestSpec {
            memory_pages: pages,
            vcpus: 2,
            pattern: WorkloadPattern::Uniform,
            dirty_pages_per_sec: 0,
            disk_writes_per_sec: 0,
            seed: 7,
        }
    }

    fn record_of(s: &ImageSummary, vm: VmId) -> RecoveryImage {
        RecoveryImage {
            vm,
            image: image_id(3, vm),
            image_digest: hex(&s.digest),
            memory_digest: hex(&s.memory_digest),
            last_seq: s.last_seq,
            bytes: s.bytes,
        }
    }

    fn saved(dir: &Path, pages: u64, writes: u64) -> (Arc<SimulatedGuest>, PathBuf, RecoveryImage) {
        let g = SimulatedGuest::new(spec(pages));
        g.step(writes);
        let path = image_path(dir, 3, VmId(5));
        let guest = g.clone();
        let s = write_image_file(&path, |w| encode_body(guest.as_ref(), 3, VmId(5), w)).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), s.bytes);
        (g, path, record_of(&s, VmId(5)))
    }

    #[test]
    fn an_image_restores_the_guest_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let (g, path, rec) = saved(dir.path(), 512, 300);
        let restored = load_image(&path, 3, VmId(5), spec(512), &rec).unwrap();
        assert_eq!(restored.memory_digest(), g.memory_digest());
        assert_eq!(restored.vcpu_state(), g.vcpu_state());
        assert_eq!(restored.check_memory().unwrap(), g.check_memory().unwrap());
        assert_eq!(restored.state(), RunState::Created);
        // The restored guest continues the workload where the image was taken.
        restored.step(5);
        g.step(5);
        assert_eq!(restored.memory_digest(), g.memory_digest());
        assert!(!path.with_extension("img.tmp").exists());
    }

    #[test]
    fn shadows_pre_copied_while_running_equal_the_paused_guests() {
        let mut s = spec(2048);
        s.dirty_pages_per_sec = 20_000;
        let guests: Vec<Arc<SimulatedGuest>> =
            (0..2).map(|i| SimulatedGuest::new(GuestSpec { seed: i, ..s.clone() })).collect();
        for g in &guests {
            g.step(3000);
            g.start().unwrap();
        }
        let sources = guests.iter().enumerate().map(|(i, g)| (VmId(i as u64), g.clone() as Arc<dyn GuestDriver>));
        let shadows = Shadows::precopy(sources.collect()).unwrap();
        std::thread::sleep(Duration::from_millis(30)); // the guests keep writing after the pre-copy
        for g in &guests {
            g.pause().unwrap();
        }
        let captured = shadows.finish().unwrap();
        for (g, c) in guests.iter().zip(captured) {
            let Captured::Shadow(_, copy) = c else { panic!("in-memory capture expected") };
            assert_eq!(copy.memory_digest(), g.memory_digest());
            assert_eq!(copy.vcpu_state(), g.vcpu_state());
            assert!(copy.check_memory().is_ok());
            // Dirty logging ended with the capture.
            g.step(10);
            assert!(g.take_dirty().is_empty());
        }
    }

    #[test]
    fn damaged_or_foreign_images_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_g, path, rec) = saved(dir.path(), 256, 100);
        // Wrong VM, wrong plan, wrong size of guest.
        assert!(matches!(load_image(&path, 3, VmId(6), spec(256), &rec), Err(ImageError::BadHeader { .. })));
        assert!(matches!(load_image(&path, 4, VmId(5), spec(256), &rec), Err(ImageError::BadHeader { .. })));
        assert!(matches!(load_image(&path, 3, VmId(5), spec(128), &rec), Err(ImageError::BadHeader { .. })));
        // Not the recorded image.
        let other = RecoveryImage { image_digest: "00".repeat(32), ..rec.clone() };
        assert!(matches!(load_image(&path, 3, VmId(5), spec(256), &other), Err(ImageError::DigestMismatch { .. })));
        // A flipped byte in a page.
        let mut bytes = std::fs::read(&path).unwrap();
        let vcpu_len = le_u32(&bytes[76..80]) as usize;
        let mid = HEADER_LEN as usize + vcpu_len + 8 + 100; // inside the first stored page
        bytes[mid] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let Err(e) = load_image(&path, 3, VmId(5), spec(256), &rec) else { panic!("a damaged image loaded") };
        assert!(
            matches!(e, ImageError::DigestMismatch { .. } | ImageError::BadPage { .. } | ImageError::Guest { .. }),
            "{e}"
        );
        bytes[mid] ^= 0x40;
        // Truncated, and a header claiming more pages than the file holds.
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        assert!(matches!(load_image(&path, 3, VmId(5), spec(256), &rec), Err(ImageError::SizeMismatch { .. })));
        let mut lying = bytes.clone();
        lying[80..88].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &lying).unwrap();
        assert!(matches!(load_image(&path, 3, VmId(5), spec(256), &rec), Err(ImageError::BadHeader { .. })));
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(load_image(&path, 3, VmId(5), spec(256), &rec), Err(ImageError::SizeMismatch { .. })));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(load_image(&path, 3, VmId(5), spec(256), &rec), Err(ImageError::Io { .. })));
        // The intact file still loads.
        std::fs::write(&path, &bytes).unwrap();
        load_image(&path, 3, VmId(5), spec(256), &rec).unwrap();
    }
}
