//! The block backend of simulated guests' virtual disks: the node-side half of [`super::disk`].
//!
//! For every local VM, [`spawn`] runs a task that serves the guest's disk queue: it earns credit
//! at the guest's disk rate (held back by the guest's throttle, like its vCPUs), takes the writes
//! the guest issues ([`super::guest::GuestDriver::next_disk_write`]), performs each through the node's
//! `VolumeHost` — routed to the volume's primary and acknowledged once durable on every in-sync
//! replica — and reports the outcome to the guest. A write whose outcome is unknown counts as
//! failed, so the guest issues it again (same block, same bytes) before anything later. No write
//! is issued while the host's lease ([`super::fence`]) is lapsed.
//! [`geometries`] turns a VM's catalog volumes into the disks its guest is told about, and
//! [`check_disks`] is the disk half of a VM check: read each disk's region between two looks at
//! the journal and judge it with [`super::disk::check_disk`].
//!
//! Must not: decide run state or placement (that is [`super::host`]), or write anything the guest
//! did not issue.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use haven_proto::vm::DiskCheckReport;
use haven_proto::VolumeId;
use tracing::debug;

use haven_proto::VmId;

use super::disk::{check_disk, DiskGeometry, DiskWrite};
use super::error::VmError;
use super::guest::GuestDriver;
use super::guest::RunState;
use super::host::{VmHost, VmInstance};
use crate::storage::Store;
use crate::volume::host::VolumeHost;

/// How often a disk task wakes to issue the writes its guest earned.
const DISK_TICK: Duration = Duration::from_millis(5);
/// Largest read a disk check asks of a volume at once.
const CHECK_READ_BYTES: u64 = 1 << 20;

/// The disks the guest of a VM with `volumes` has: each volume the catalog knows, in the geometry
/// its size and block size give (volumes too small to hold a record are left out).
pub(super) fn geometries(store: &Store, volumes: &[VolumeId]) -> Vec<DiskGeometry> {
    volumes
        .iter()
        .filter_map(|v| crate::catalog::volumes::volume(store, *v).ok().flatten())
        .filter_map(|r| DiskGeometry::of_volume(r.id.0, r.size_bytes, r.block_size))
        .collect()
}

/// Serve `inst`'s disk queue until the instance leaves `host` (stopped, moved, replaced).
pub(super) fn spawn(host: &Arc<VmHost>, inst: &Arc<VmInstance>) {
    let (host, inst) = (Arc::downgrade(host), Arc::downgrade(inst));
    tokio::spawn(serve(host, inst));
}

async fn serve(host: Weak<VmHost>, inst: Weak<VmInstance>) {
    let mut tick = tokio::time::interval(DISK_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut credit = 0f64;
    let mut last = Instant::now();
    loop {
        tick.tick().await;
        let (Some(host), Some(inst)) = (host.upgrade(), inst.upgrade()) else { return };
        if !host.instance(inst.id).is_some_and(|current| Arc::ptr_eq(&current, &inst)) {
            return;
        }
        let guest = inst.guest.clone();
        let now = Instant::now();
        let elapsed = now - last;
        last = now;
        let rate = guest.spec().disk_writes_per_sec as f64;
        // A host without its lease (cut off from the quorum) may no longer own this VM: it writes
        // nothing, so a copy restored elsewhere meanwhile keeps its disks to itself.
        if rate == 0.0 || guest.state() != RunState::Running || !host.lease_valid() {
            credit = 0.0;
            continue;
        }
        let throttle = guest.workload_stats().throttle_percent.min(99);
        credit += rate * elapsed.as_secs_f64() * f64::from(100 - throttle) / 100.0;
        // Catch up after a late wake-up, but never burst more than ~50 ms of writes.
        credit = credit.min(rate * 0.05 + 1.0);
        let volumes = &host.volumes;
        while credit >= 1.0 {
            let Some(write) = guest.next_disk_write() else { break };
            credit -= 1.0;
            // An HA-protected guest's write is an output: released once the standby holds it.
            let write = match host.ha_gate() {
                Some(gate) => match gate.disk_write(inst.id, write, &guest) {
                    Some(w) => w,
                    None => continue,
                },
                None => write,
            };
            perform(volumes.clone(), guest.clone(), inst.id, write, None);
        }
    }
}

/// Perform `write` of `vm`'s `guest` through the volume's primary, on a task of its own, and
/// tell the guest how it went (a failed write is issued again). An HA pair's primary writes
/// with its generation (`ha_generation`), which the volume fences.
pub fn perform(
    volumes: Arc<VolumeHost>,
    guest: Arc<dyn GuestDriver>,
    vm: VmId,
    write: DiskWrite,
    ha_generation: Option<u64>,
) {
    tokio::spawn(async move {
        let (volume, seq) = (write.volume, write.seq);
        let result = match ha_generation {
            Some(g) => volumes.write_fenced(VolumeId(volume), write.offset, write.data, vm, g).await,
            None => volumes.write_to(VolumeId(volume), write.offset, write.data, true).await,
        };
        let outcome = match &result {
            Ok(_) => "acked",
            Err(e) if e.code() == haven_proto::ErrorCode::Fenced => "fenced",
            Err(_) => "failed",
        };
        metrics::counter!("haven_vm_disk_writes_total", "outcome" => outcome).increment(1);
        if let Err(e) = &result {
            debug!(%vm, volume, seq, error = %e, "guest disk write failed; the guest issues it again");
        }
        guest.complete_disk_write(volume, seq, result.is_ok());
    });
}

/// Check every disk of `inst`'s guest against its journal (see [`super::disk`]). Lost, torn,
/// misplaced or future blocks are `Internal` errors naming the block; a disk that cannot be read
/// now, or that changed under the check, is `Unavailable` (ask again).
pub(super) async fn check_disks(host: &VmHost, inst: &VmInstance) -> Result<Vec<DiskCheckReport>, VmError> {
    let guest = &inst.guest;
    let before = guest.disk_journal();
    if before.is_empty() {
        return Ok(Vec::new());
    }
    let volumes = host.volumes.clone();
    let mut regions = Vec::with_capacity(before.len());
    for log in &before {
        let g = log.geometry;
        let len = g.blocks * u64::from(g.block_size);
        let mut region = Vec::with_capacity(len as usize);
        let mut offset = 0;
        while offset < len {
            let n = (len - offset).min(CHECK_READ_BYTES);
            let part = volumes.read_from(VolumeId(g.volume), offset, n as u32, None).await.map_err(|e| {
                VmError::unavailable(format!("reading disk vol-{} to check it: {}", g.volume, e.message()))
            })?;
            region.extend_from_slice(&part);
            offset += n;
        }
        regions.push(region);
    }
    let after = guest.disk_journal();
    let pattern = guest.spec().pattern;
    let mut reports = Vec::with_capacity(before.len());
    for (log, region) in before.iter().zip(&regions) {
        let volume = log.geometry.volume;
        let Some(later) = after.iter().find(|l| l.geometry.volume == volume) else {
            let why = format!("disk vol-{volume} was detached during the check; ask again");
            return Err(VmError::unavailable(why));
        };
        match check_disk(pattern, log, later, region) {
            Ok(c) => reports.push(DiskCheckReport {
                volume: VolumeId(volume),
                blocks_written: c.blocks_written,
                acked: c.acked,
                issued: c.issued,
            }),
            Err(e) if e.is_transient() => return Err(VmError::unavailable(e.to_string())),
            Err(e) => return Err(VmError::internal(format!("{}: {e}", inst.id))),
        }
    }
    Ok(reports)
}
