//! Scenario files: what cluster to build, what workload to run, which faults to inject when, and
//! which checkers judge the run. This module parses and validates them and expands the fault
//! schedule deterministically from the seed; it must not touch a cluster.
//!
//! ```toml
//! name = "leader-kills"
//! seed = 7
//! duration = "20s"
//! [cluster]
//! backend = "local"        # or "compose"
//! nodes = 3
//! [workload]
//! clients = 4
//! keys = 4                 # registers for read/write/cas (linearizability)
//! rate = 40                # operations per second per client
//! [[faults]]
//! at = "4s"
//! kind = "kill"            # kill | pause | partition | isolate | cut | delay | loss | reorder
//! target = "leader"        # leader | follower | random | node:N | volume_primary | ha_primary
//! heal_after = "2s"        # restart / resume / reconnect after this long
//! [random_faults]
//! per_minute = 6
//! kinds = ["kill", "pause", "isolate"]
//! targets = ["leader", "volume_primary"]   # optional; default leader, follower, random
//!                          # (also ha_primary: the first HA VM's primary, with [ha])
//! [blocks]                 # optional: a block-volume workload (absent = none)
//! volume_size = "16MiB"    # or a number of bytes
//! replicas = 2             # 2 or 3
//! writers = 4
//! blocks_per_writer = 64   # each writer owns a disjoint range of 4 KiB blocks
//! rate = 200               # block writes per second, all writers together
//! [operations]             # optional: user operations on a volume of its own (absent = none)
//! volume_size = "8MiB"
//! replicas = 1             # 1 lets `replication reverse` run (it needs a 1-replica volume)
//! writers = 2              # writers overwriting their own blocks meanwhile
//! blocks_per_writer = 16
//! write_rate = 40          # block writes per second, all writers together
//! op_every = "1s"          # one operation (snapshot, rollback, clone, ...) this often
//! kinds = ["snapshot", "rollback", "clone", "resize", "replication"]
//! [vms]                    # optional: running guests live-migrated between hosts (absent = none)
//! count = 3
//! memory_mib = 32
//! dirty_rate = 500         # page writes per second per guest
//! migrate_every = "2s"     # start a migration this often
//! [ha]                     # optional: HA-protected guests under an application put load (absent = none)
//! count = 2
//! modes = ["redundant", "multi_operation"]   # VM i gets modes[i % len]
//! epoch_ms = 50            # checkpoint epoch of the redundant pairs
//! put_rate = 20            # application puts per second per VM
//! [shares]                 # optional: one shared dataset on every node, written at every member
//! put_rate = 10            # puts per second per member
//! [checkers]
//! heal_within = "15s"
//! ```
//!
//! `workload.clients = 0` turns the register workload off (for block-only runs).

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Deserializer, Serialize};

/// A parsed, validated scenario.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    /// Seed for the fault schedule and the workload's operations.
    #[serde(default)]
    pub seed: u64,
    /// How long the workload and faults run (faults are healed at the end).
    #[serde(with = "dur")]
    pub duration: Duration,
    pub cluster: ClusterSpec,
    #[serde(default)]
    pub workload: WorkloadSpec,
    #[serde(default)]
    pub faults: Vec<FaultSpec>,
    #[serde(default)]
    pub random_faults: Option<RandomFaults>,
    /// The block-volume workload, if any.
    #[serde(default)]
    pub blocks: Option<BlockSpec>,
    /// The VM live-migration workload, if any.
    #[serde(default)]
    pub vms: Option<VmWorkloadSpec>,
    /// The volume-operations workload (snapshots, rollbacks, clones, resizes, DR relationships
    /// on a volume of its own, with writers alongside), if any.
    #[serde(default)]
    pub operations: Option<OperationsSpec>,
    /// HA-protected guests under an application put load, if any.
    #[serde(default)]
    pub ha: Option<HaSpec>,
    /// One shared dataset written at every member, if any.
    #[serde(default)]
    pub shares: Option<ShareSpec>,
    #[serde(default)]
    pub checkers: CheckerSpec,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Local,
    Compose,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    pub backend: Backend,
    #[serde(default = "three")]
    pub nodes: usize,
    #[serde(default = "election_ms")]
    pub election_timeout_ms: u64,
    /// TEST ONLY: nodes acknowledge writes before commit, so checkers must fail.
    #[serde(default)]
    pub unsafe_ack_before_commit: bool,
}

fn three() -> usize {
    3
}
fn election_ms() -> u64 {
    80
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Register-workload clients; 0 turns the register workload off.
    #[serde(default = "four")]
    pub clients: usize,
    /// Number of registers the read/write/cas operations use.
    #[serde(default = "four")]
    pub keys: usize,
    /// Operations per second per client.
    #[serde(default = "rate")]
    pub rate: u32,
    /// Per-operation deadline (after which the outcome is indeterminate).
    #[serde(default = "op_timeout", with = "dur")]
    pub op_timeout: Duration,
}

fn four() -> usize {
    4
}
fn rate() -> u32 {
    40
}
fn op_timeout() -> Duration {
    Duration::from_secs(2)
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        Self { clients: four(), keys: four(), rate: rate(), op_timeout: op_timeout() }
    }
}

/// The block-volume workload: `writers` writers, each owning `blocks_per_writer` consecutive
/// 4 KiB blocks of one volume, overwrite their blocks with self-describing content; the
/// `acknowledged_blocks` checker reads them back after healing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BlockSpec {
    /// The volume's name.
    #[serde(default = "volume_name")]
    pub volume: String,
    /// "16MiB", "1GiB", "4096B" or a number of bytes; a multiple of 4 KiB.
    #[serde(default = "volume_size", with = "size")]
    pub volume_size: u64,
    /// Copies of each block (2 or 3).
    #[serde(default = "two")]
    pub replicas: u8,
    #[serde(default = "four")]
    pub writers: usize,
    #[serde(default = "sixty_four")]
    pub blocks_per_writer: u64,
    /// Block writes per second, all writers together.
    #[serde(default = "block_rate")]
    pub rate: u32,
    /// Per-write deadline (after which the outcome is indeterminate).
    #[serde(default = "op_timeout", with = "dur")]
    pub op_timeout: Duration,
    /// After healing, how long the volume may take to serve reads again.
    #[serde(default = "recover_within", with = "dur")]
    pub recover_within: Duration,
    /// After healing, how long to wait for every replica to be in sync (reported, not judged).
    #[serde(default = "in_sync_within", with = "dur")]
    pub in_sync_within: Duration,
}

/// The VM workload: `count` running guests, live-migrated one at a time to a random other host
/// every `migrate_every` while the faults fire; the `vm-runs-once` and `vm-data` checkers judge
/// where and how they run after healing (and `vm-runs-once` also samples during the run).
/// With a `disk_rate`, each guest also writes a disk of its own (see `disk_mib`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmWorkloadSpec {
    #[serde(default = "three")]
    pub count: usize,
    /// Guest memory in MiB.
    #[serde(default = "vm_memory_mib")]
    pub memory_mib: u64,
    /// Page writes per second of each guest's workload.
    #[serde(default = "vm_dirty_rate")]
    pub dirty_rate: u64,
    /// Block writes per second of each guest's disk workload (0 = the guests have no disks).
    #[serde(default)]
    pub disk_rate: u64,
    /// Size of each guest's disk, a 2-replica volume attached to it when `disk_rate` > 0.
    #[serde(default = "vm_disk_mib")]
    pub disk_mib: u64,
    /// A migration starts this often (of a VM not already moving).
    #[serde(default = "migrate_every", with = "dur")]
    pub migrate_every: Duration,
    /// Longest pause the migrations accept.
    #[serde(default = "max_downtime", with = "dur")]
    pub max_downtime: Duration,
    /// A migration not ended after this long counts as indeterminate.
    #[serde(default = "migration_timeout", with = "dur")]
    pub migration_timeout: Duration,
    /// After healing, how long every VM may take to run again exactly where the catalog says.
    #[serde(default = "recover_within", with = "dur")]
    pub recover_within: Duration,
}

/// The operations workload: `writers` writers overwrite their own blocks of one volume (as the
/// block workload does) while one client performs, every `op_every`, a seeded user operation on
/// it; the `operation-data` and `operation-catalog` checkers judge every read-back against what
/// each operation promises.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OperationsSpec {
    #[serde(default = "ops_volume_name")]
    pub volume: String,
    #[serde(default = "ops_volume_size", with = "size")]
    pub volume_size: u64,
    /// Synchronous replicas (1..=3); `replication reverse` needs 1.
    #[serde(default = "one")]
    pub replicas: u8,
    #[serde(default = "two_writers")]
    pub writers: usize,
    #[serde(default = "sixteen")]
    pub blocks_per_writer: u64,
    /// Block writes per second, all writers together.
    #[serde(default = "ops_write_rate")]
    pub write_rate: u32,
    /// One operation starts this often (after the previous one ended).
    #[serde(default = "op_every", with = "dur")]
    pub op_every: Duration,
    /// The operations to draw from.
    #[serde(default = "ops_kinds")]
    pub kinds: Vec<OpsKind>,
    /// Per-write deadline (after which the outcome is indeterminate).
    #[serde(default = "op_timeout", with = "dur")]
    pub op_timeout: Duration,
    /// Per-operation deadline (a reverse waits for the copy to catch up).
    #[serde(default = "operation_timeout", with = "dur")]
    pub operation_timeout: Duration,
    /// After healing, how long the volume may take to serve the final read-back.
    #[serde(default = "recover_within", with = "dur")]
    pub recover_within: Duration,
}

/// An operation family of the operations workload.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum OpsKind {
    Snapshot,
    Rollback,
    Clone,
    Resize,
    /// Async relationship create, pause, resume, reverse and delete.
    Replication,
}

fn ops_volume_name() -> String {
    "chaos-ops".into()
}
fn ops_volume_size() -> u64 {
    8 << 20
}
fn one() -> u8 {
    1
}
fn two_writers() -> usize {
    2
}
fn sixteen() -> u64 {
    16
}
fn ops_write_rate() -> u32 {
    40
}
fn op_every() -> Duration {
    Duration::from_secs(1)
}
fn operation_timeout() -> Duration {
    Duration::from_secs(10)
}
fn ops_kinds() -> Vec<OpsKind> {
    vec![OpsKind::Snapshot, OpsKind::Rollback, OpsKind::Clone, OpsKind::Resize, OpsKind::Replication]
}

impl OperationsSpec {
    /// Which writer owns which blocks.
    pub fn ownership(&self) -> Ownership {
        Ownership { writers: self.writers, blocks_per_writer: self.blocks_per_writer }
    }

    fn validate(&self, nodes: usize) -> Result<(), String> {
        if self.volume.is_empty() || self.volume.len() > 100 {
            return Err("operations.volume: the name must be 1..=100 bytes".into());
        }
        if !(1..=3).contains(&self.replicas) || self.replicas as usize > nodes {
            return Err(format!("operations.replicas: {} is outside 1..=3 or above the {nodes} nodes", self.replicas));
        }
        if self.kinds.contains(&OpsKind::Replication) && self.replicas as usize >= nodes {
            return Err(format!(
                "operations.kinds: replication needs a host without a replica; {} replicas on {nodes} nodes",
                self.replicas
            ));
        }
        if self.volume_size == 0 || !self.volume_size.is_multiple_of(BLOCK_BYTES) {
            return Err(format!(
                "operations.volume_size: {} bytes is not a positive multiple of 4 KiB",
                self.volume_size
            ));
        }
        if self.writers == 0 || self.blocks_per_writer == 0 || self.writers > 64 || self.blocks_per_writer > 4096 {
            return Err("operations: writers must be 1..=64 and blocks_per_writer 1..=4096".into());
        }
        let needed = self.writers as u64 * self.blocks_per_writer * BLOCK_BYTES;
        if needed > self.volume_size {
            return Err(format!(
                "operations.volume_size: {needed} bytes of owned blocks do not fit in {} bytes",
                self.volume_size
            ));
        }
        if !(1..=5000).contains(&self.write_rate) {
            return Err(format!("operations.write_rate: {} is outside 1..=5000", self.write_rate));
        }
        if self.kinds.is_empty() {
            return Err("operations.kinds: name at least one operation".into());
        }
        if self.op_every < Duration::from_millis(50) || self.op_timeout.is_zero() || self.operation_timeout.is_zero() {
            return Err("operations: op_every must be at least 50ms, the timeouts greater than zero".into());
        }
        Ok(())
    }
}

fn vm_memory_mib() -> u64 {
    32
}
fn vm_dirty_rate() -> u64 {
    500
}
fn vm_disk_mib() -> u64 {
    8
}
fn migrate_every() -> Duration {
    Duration::from_secs(2)
}
fn max_downtime() -> Duration {
    Duration::from_millis(300)
}
fn migration_timeout() -> Duration {
    Duration::from_secs(20)
}

impl VmWorkloadSpec {
    fn validate(&self, nodes: usize) -> Result<(), String> {
        if !(1..=16).contains(&self.count) {
            return Err(format!("vms.count: {} is outside 1..=16", self.count));
        }
        if !(1..=1024).contains(&self.memory_mib) {
            return Err(format!("vms.memory_mib: {} is outside 1..=1024", self.memory_mib));
        }
        if nodes < 2 {
            return Err("vms: migrations need at least 2 nodes".into());
        }
        if self.dirty_rate > 1_000_000 {
            return Err(format!("vms.dirty_rate: {} page writes/s is above 1000000", self.dirty_rate));
        }
        if self.migrate_every < Duration::from_millis(100) {
            return Err("vms.migrate_every: must be at least 100ms".into());
        }
        if self.migration_timeout.is_zero() || self.recover_within.is_zero() {
            return Err("vms: migration_timeout and recover_within must be greater than zero".into());
        }
        Ok(())
    }
}

/// The HA workload: `count` running guests, each protected by an HA pair (VM `i` in mode
/// `modes[i % len]`; even VMs get a standby the harness picks, odd ones let the leader pick),
/// while one client per VM puts keys of its application state (`app_put`) at `put_rate`, and a
/// sampler asks every host for the pair's role there and the guest's run state. The checkers
/// `ha-acked-updates`, `ha-single-primary`, `ha-data` and `ha-failovers` judge the run.
/// Redundant VMs write a disk of their own when `disk_rate` > 0; multi-operation VMs never do
/// (the catalog refuses a multi-operation pair for a VM that writes disks).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HaSpec {
    #[serde(default = "two_vms")]
    pub count: usize,
    /// Guest memory in MiB.
    #[serde(default = "vm_memory_mib")]
    pub memory_mib: u64,
    /// Page writes per second of each guest's workload.
    #[serde(default = "vm_dirty_rate")]
    pub dirty_rate: u64,
    /// Block writes per second of each redundant guest's disk (0 = no disks).
    #[serde(default)]
    pub disk_rate: u64,
    /// Size of each redundant guest's disk (a 2-replica volume), MiB.
    #[serde(default = "vm_disk_mib")]
    pub disk_mib: u64,
    /// The pairs' modes, cycled over the VMs.
    #[serde(default = "ha_modes")]
    pub modes: Vec<HaModeSpec>,
    /// The redundant pairs' checkpoint epoch (5..=10000 ms).
    #[serde(default = "epoch_ms")]
    pub epoch_ms: u32,
    /// Keys each VM's put workload cycles through (a put overwrites the key's previous value).
    #[serde(default = "sixteen_keys")]
    pub keys: u64,
    /// Application puts per second per VM (one at a time).
    #[serde(default = "put_rate")]
    pub put_rate: u32,
    /// Per-put deadline (after which the outcome is indeterminate).
    #[serde(default = "put_timeout", with = "dur")]
    pub op_timeout: Duration,
    /// At setup, how long each pair's standby may take to be ready.
    #[serde(default = "ready_within", with = "dur")]
    pub ready_within: Duration,
    /// After healing, how long each VM may take to answer from its primary again.
    #[serde(default = "recover_within", with = "dur")]
    pub recover_within: Duration,
    /// Longest a guest may be seen running on two hosts at once (not counting a multi-operation
    /// standby's guest, which runs by design). A primary cut off from the cluster does not know
    /// it was deposed and runs on until its host lease lapses (`[fence] fence_after_ms`, 4 s);
    /// the default adds one second of sampling slack to that bound.
    #[serde(default = "max_overlap", with = "dur")]
    pub max_overlap: Duration,
}

/// The mode of an HA pair in a scenario.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HaModeSpec {
    /// Checkpoint epochs of `epoch_ms` to a stopped standby.
    Redundant,
    /// The standby's guest runs beside the primary's; application updates are mirrored.
    MultiOperation,
}

fn two_vms() -> usize {
    2
}
fn ha_modes() -> Vec<HaModeSpec> {
    vec![HaModeSpec::Redundant, HaModeSpec::MultiOperation]
}
fn epoch_ms() -> u32 {
    50
}
fn sixteen_keys() -> u64 {
    16
}
fn put_rate() -> u32 {
    20
}
fn put_timeout() -> Duration {
    Duration::from_secs(5)
}
fn ready_within() -> Duration {
    Duration::from_secs(30)
}
fn max_overlap() -> Duration {
    Duration::from_secs(5)
}

impl HaSpec {
    /// The mode of VM `i`.
    pub fn mode_of(&self, i: usize) -> HaModeSpec {
        self.modes[i % self.modes.len()]
    }

    fn validate(&self, nodes: usize) -> Result<(), String> {
        if !(1..=8).contains(&self.count) {
            return Err(format!("ha.count: {} is outside 1..=8", self.count));
        }
        if nodes < 2 {
            return Err("ha: a pair needs at least 2 nodes (a primary and a standby)".into());
        }
        if !(1..=1024).contains(&self.memory_mib) {
            return Err(format!("ha.memory_mib: {} is outside 1..=1024", self.memory_mib));
        }
        if self.dirty_rate > 1_000_000 {
            return Err(format!("ha.dirty_rate: {} page writes/s is above 1000000", self.dirty_rate));
        }
        if self.modes.is_empty() {
            return Err("ha.modes: name at least one mode (redundant, multi_operation)".into());
        }
        if !(5..=10_000).contains(&self.epoch_ms) {
            return Err(format!("ha.epoch_ms: {} is outside 5..=10000", self.epoch_ms));
        }
        if !(1..=1000).contains(&self.keys) {
            return Err(format!("ha.keys: {} is outside 1..=1000", self.keys));
        }
        if !(1..=1000).contains(&self.put_rate) {
            return Err(format!("ha.put_rate: {} puts per second is outside 1..=1000", self.put_rate));
        }
        if self.disk_rate > 0 && !(1..=1024).contains(&self.disk_mib) {
            return Err(format!("ha.disk_mib: {} is outside 1..=1024", self.disk_mib));
        }
        if self.op_timeout.is_zero() || self.ready_within.is_zero() || self.recover_within.is_zero() {
            return Err("ha: op_timeout, ready_within and recover_within must be greater than zero".into());
        }
        if self.max_overlap < Duration::from_millis(500) {
            return Err("ha.max_overlap: must be at least 500ms (two sightings apart)".into());
        }
        Ok(())
    }
}

/// The share workload: one shared dataset (C2) on every node; one writer per member puts its own
/// keys (`keys` of them, cycled) at that member at `put_rate` while the faults fire. The
/// `share-converged` checker reads every member's copy after healing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShareSpec {
    #[serde(default = "share_name")]
    pub name: String,
    /// Keys each member's writer cycles through.
    #[serde(default = "eight_keys")]
    pub keys: u64,
    /// Puts per second per member (one at a time).
    #[serde(default = "share_put_rate")]
    pub put_rate: u32,
    /// Wait for every member to hold a put (`all`) or for the hub to reflect it (`hub`).
    #[serde(default = "share_ack")]
    pub ack: ShareAckSpec,
    /// Per-put deadline (after which the outcome is indeterminate).
    #[serde(default = "put_timeout", with = "dur")]
    pub op_timeout: Duration,
}

/// When a share put is acknowledged.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ShareAckSpec {
    Hub,
    All,
}

fn share_name() -> String {
    "chaos-share".into()
}
fn eight_keys() -> u64 {
    8
}
fn share_put_rate() -> u32 {
    10
}
fn share_ack() -> ShareAckSpec {
    ShareAckSpec::Hub
}

impl ShareSpec {
    fn validate(&self, nodes: usize) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > 100 {
            return Err("shares.name: the name must be 1..=100 bytes".into());
        }
        if nodes < 2 {
            return Err("shares: a share needs at least 2 members (nodes)".into());
        }
        if !(1..=1000).contains(&self.keys) {
            return Err(format!("shares.keys: {} is outside 1..=1000", self.keys));
        }
        if !(1..=1000).contains(&self.put_rate) {
            return Err(format!("shares.put_rate: {} puts per second is outside 1..=1000", self.put_rate));
        }
        if self.op_timeout.is_zero() {
            return Err("shares.op_timeout: must be greater than zero".into());
        }
        Ok(())
    }
}

/// The block size the block workload writes (the volume's default block size).
pub const BLOCK_BYTES: u64 = 4096;

fn volume_name() -> String {
    "chaos-blocks".into()
}
fn volume_size() -> u64 {
    16 << 20
}
fn two() -> u8 {
    2
}
fn sixty_four() -> u64 {
    64
}
fn block_rate() -> u32 {
    200
}
fn recover_within() -> Duration {
    Duration::from_secs(20)
}
fn in_sync_within() -> Duration {
    Duration::from_secs(30)
}

/// How a workload's volume is shared out between its writers: writer `w` owns the
/// `blocks_per_writer` consecutive blocks from `w * blocks_per_writer` (the block and operations
/// workloads alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ownership {
    pub writers: usize,
    pub blocks_per_writer: u64,
}

impl Ownership {
    /// The block numbers writer `w` owns.
    pub fn blocks_of(&self, w: usize) -> std::ops::Range<u64> {
        let first = w as u64 * self.blocks_per_writer;
        first..first + self.blocks_per_writer
    }

    /// Which writer owns `block`, if any.
    pub fn owner(&self, block: u64) -> Option<usize> {
        let w = (block / self.blocks_per_writer) as usize;
        (w < self.writers).then_some(w)
    }

    /// Every owned block.
    pub fn owned_blocks(&self) -> std::ops::Range<u64> {
        0..self.writers as u64 * self.blocks_per_writer
    }
}

impl BlockSpec {
    /// Which writer owns which blocks.
    pub fn ownership(&self) -> Ownership {
        Ownership { writers: self.writers, blocks_per_writer: self.blocks_per_writer }
    }
}

/// One kind of fault.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum FaultKind {
    /// kill -9 the node; restarted at heal.
    Kill,
    /// SIGSTOP the node; SIGCONT at heal.
    Pause,
    /// Cut every link between the target and the other nodes, both ways.
    Isolate,
    /// Cut links from the target to the others only (one-way): it still hears them.
    Partition,
    /// Add latency on the target's links.
    Delay,
    /// Drop a share of the target's packets.
    Loss,
    /// Delay a random share of the target's packets so they arrive out of order.
    Reorder,
    /// Cut the links between the target and one other node (chosen by the seed), both ways.
    Cut,
}

impl FaultKind {
    /// Whether the fault acts on links (needs relays) rather than processes.
    pub fn is_link_fault(self) -> bool {
        matches!(self, Self::Isolate | Self::Partition | Self::Delay | Self::Loss | Self::Reorder | Self::Cut)
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        f.write_str(&s)
    }
}

/// Which node a fault hits, resolved when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Target {
    Leader,
    Follower,
    Random,
    Node(u64),
    /// The block workload volume's primary (else the operations workload's), as the catalog
    /// names it when the fault fires.
    VolumePrimary,
    /// The primary of the first HA VM's pair, as the catalog names it when the fault fires.
    HaPrimary,
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "leader" => Ok(Self::Leader),
            "follower" => Ok(Self::Follower),
            "random" => Ok(Self::Random),
            "volume_primary" => Ok(Self::VolumePrimary),
            "ha_primary" | "ha-primary" => Ok(Self::HaPrimary),
            other => other.strip_prefix("node:").and_then(|n| n.parse().ok()).map(Self::Node).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "unknown target {other:?}; use leader, follower, random, volume_primary, ha_primary or node:N"
                ))
            }),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Leader => f.write_str("leader"),
            Self::Follower => f.write_str("follower"),
            Self::Random => f.write_str("random"),
            Self::Node(n) => write!(f, "node:{n}"),
            Self::VolumePrimary => f.write_str("volume_primary"),
            Self::HaPrimary => f.write_str("ha_primary"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    #[serde(with = "dur")]
    pub at: Duration,
    pub kind: FaultKind,
    #[serde(default = "leader")]
    pub target: Target,
    #[serde(default = "heal_after", with = "dur")]
    pub heal_after: Duration,
    /// Delay in ms (delay/reorder) or drop percentage (loss).
    #[serde(default)]
    pub amount: Option<u32>,
}

fn leader() -> Target {
    Target::Leader
}
fn heal_after() -> Duration {
    Duration::from_secs(2)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RandomFaults {
    pub per_minute: f64,
    pub kinds: Vec<FaultKind>,
    #[serde(default = "heal_after", with = "dur")]
    pub heal_after: Duration,
    /// Targets to draw from (default: leader, follower, random).
    #[serde(default)]
    pub targets: Option<Vec<Target>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckerSpec {
    #[serde(default = "yes")]
    pub linearizable: bool,
    #[serde(default = "yes")]
    pub acknowledged_writes: bool,
    /// Every acknowledged block write is present after healing (only with `[blocks]`).
    #[serde(default = "yes")]
    pub acknowledged_blocks: bool,
    /// The cluster must have one healthy leader within this long after the last fault heals.
    #[serde(default = "heal_within", with = "dur")]
    pub heal_within: Duration,
}

fn yes() -> bool {
    true
}
fn heal_within() -> Duration {
    Duration::from_secs(15)
}

impl Default for CheckerSpec {
    fn default() -> Self {
        Self { linearizable: true, acknowledged_writes: true, acknowledged_blocks: true, heal_within: heal_within() }
    }
}

/// A scenario file could not be used; the message names the field.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ScenarioError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text).map_err(|message| ScenarioError::Invalid { path: path.display().to_string(), message })
    }

    /// Parse and validate scenario text. Errors name the offending field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let s: Scenario = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            match e.span() {
                Some(span) => {
                    let start = span.start.min(text.len());
                    let line = text[..start].matches('\n').count() + 1;
                    let source = text.lines().nth(line - 1).unwrap_or("").trim();
                    format!("line {line} (`{source}`): {msg}")
                }
                None => msg,
            }
        })?;
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), String> {
        if self.duration.is_zero() {
            return Err("duration: must be greater than zero".into());
        }
        if !(1..=9).contains(&self.cluster.nodes) {
            return Err(format!("cluster.nodes: {} is outside 1..=9", self.cluster.nodes));
        }
        if self.workload.keys == 0 || self.workload.rate == 0 {
            return Err("workload: keys and rate must be greater than zero (clients = 0 turns it off)".into());
        }
        if let Some(b) = &self.blocks {
            b.validate(self.cluster.nodes)?;
        }
        if let Some(v) = &self.vms {
            v.validate(self.cluster.nodes)?;
        }
        if let Some(o) = &self.operations {
            o.validate(self.cluster.nodes)?;
        }
        if let Some(h) = &self.ha {
            h.validate(self.cluster.nodes)?;
        }
        if let Some(s) = &self.shares {
            s.validate(self.cluster.nodes)?;
        }
        let check_target = |what: &str, t: Target| -> Result<(), String> {
            match t {
                Target::Node(n) if n == 0 || n as usize > self.cluster.nodes => {
                    Err(format!("{what}: node:{n} is not in a {}-node cluster", self.cluster.nodes))
                }
                Target::VolumePrimary if self.blocks.is_none() && self.operations.is_none() => Err(format!(
                    "{what}: volume_primary needs a [blocks] or [operations] section (a volume to have a primary)"
                )),
                Target::HaPrimary if self.ha.is_none() => {
                    Err(format!("{what}: ha_primary needs an [ha] section (a pair to have a primary)"))
                }
                _ => Ok(()),
            }
        };
        for (i, f) in self.faults.iter().enumerate() {
            if f.at >= self.duration {
                return Err(format!(
                    "faults[{i}].at: {:?} is not before the end of the run ({:?})",
                    f.at, self.duration
                ));
            }
            check_target(&format!("faults[{i}].target"), f.target)?;
            if f.kind == FaultKind::Loss && f.amount.is_some_and(|a| a > 100) {
                return Err(format!("faults[{i}].amount: loss is a percentage (0..=100)"));
            }
        }
        if let Some(r) = &self.random_faults {
            if !(r.per_minute > 0.0 && r.per_minute.is_finite()) {
                return Err("random_faults.per_minute: must be a positive number".into());
            }
            if r.kinds.is_empty() {
                return Err("random_faults.kinds: give at least one fault kind".into());
            }
            if let Some(targets) = &r.targets {
                if targets.is_empty() {
                    return Err("random_faults.targets: give at least one target (or leave it out)".into());
                }
                for (i, t) in targets.iter().enumerate() {
                    check_target(&format!("random_faults.targets[{i}]"), *t)?;
                }
            }
        }
        if self.cluster.backend == Backend::Compose {
            if self.cluster.nodes != 3 {
                return Err("cluster.nodes: the compose backend runs the 3-node docker-compose.yml".into());
            }
            let fine = [FaultKind::Partition, FaultKind::Delay, FaultKind::Loss, FaultKind::Reorder, FaultKind::Cut];
            let kinds: Vec<FaultKind> = self
                .faults
                .iter()
                .map(|f| f.kind)
                .chain(self.random_faults.iter().flat_map(|r| r.kinds.clone()))
                .collect();
            if let Some(k) = kinds.iter().find(|k| fine.contains(k)) {
                return Err(format!("faults: {k} needs the local backend's relays; the compose backend supports kill, pause and isolate"));
            }
        }
        Ok(())
    }

    /// Every fault of the run, explicit and random, in time order. Same scenario and seed, same
    /// schedule.
    pub fn schedule(&self) -> Vec<FaultSpec> {
        let mut out = self.faults.clone();
        if let Some(r) = &self.random_faults {
            let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed ^ 0x5eed_fa17);
            let mean_gap = 60.0 / r.per_minute;
            let mut t = 0.0f64;
            loop {
                // Exponential inter-arrival times (a Poisson process).
                let u: f64 = rng.random_range(f64::EPSILON..1.0);
                t += -mean_gap * u.ln();
                if t >= self.duration.as_secs_f64() {
                    break;
                }
                let kind = r.kinds[rng.random_range(0..r.kinds.len())];
                let target = match &r.targets {
                    Some(targets) => targets[rng.random_range(0..targets.len())],
                    None => match rng.random_range(0..3) {
                        0 => Target::Leader,
                        1 => Target::Follower,
                        _ => Target::Random,
                    },
                };
                out.push(FaultSpec {
                    at: Duration::from_secs_f64(t),
                    kind,
                    target,
                    heal_after: r.heal_after,
                    amount: None,
                });
            }
        }
        out.sort_by_key(|f| f.at);
        out
    }

    /// The fault kinds a run uses (link faults need relays).
    pub fn fault_kinds(&self) -> BTreeSet<FaultKind> {
        self.schedule().iter().map(|f| f.kind).collect()
    }
}

impl BlockSpec {
    fn validate(&self, nodes: usize) -> Result<(), String> {
        if self.volume.is_empty() || self.volume.len() > 128 {
            return Err("blocks.volume: the name must be 1..=128 bytes".into());
        }
        if !(2..=3).contains(&self.replicas) {
            return Err(format!("blocks.replicas: {} is not 2 or 3", self.replicas));
        }
        if self.replicas as usize > nodes {
            return Err(format!(
                "blocks.replicas: {} replicas need as many nodes; the cluster has {nodes}",
                self.replicas
            ));
        }
        if self.volume_size == 0 || !self.volume_size.is_multiple_of(BLOCK_BYTES) {
            return Err(format!("blocks.volume_size: {} bytes is not a positive multiple of 4 KiB", self.volume_size));
        }
        if self.writers == 0 || self.blocks_per_writer == 0 {
            return Err("blocks: writers and blocks_per_writer must be greater than zero".into());
        }
        let needed = (self.writers as u64).saturating_mul(self.blocks_per_writer).saturating_mul(BLOCK_BYTES);
        if needed > self.volume_size {
            return Err(format!(
                "blocks.volume_size: {} writers x {} blocks x 4 KiB = {needed} bytes do not fit in {} bytes",
                self.writers, self.blocks_per_writer, self.volume_size
            ));
        }
        if !(1..=5000).contains(&self.rate) {
            return Err(format!("blocks.rate: {} writes per second is outside 1..=5000", self.rate));
        }
        if self.op_timeout.is_zero() {
            return Err("blocks.op_timeout: must be greater than zero".into());
        }
        Ok(())
    }
}

/// Byte sizes as "16MiB", "512KiB", "4096B" (or a bare number of bytes).
mod size {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*n)
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(i64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Int(n) => u64::try_from(n).map_err(|_| serde::de::Error::custom(format!("size {n} is negative"))),
            Raw::Text(t) => parse(&t).map_err(serde::de::Error::custom),
        }
    }

    pub(super) fn parse(t: &str) -> Result<u64, String> {
        let t = t.trim();
        let (num, unit) = t.find(|c: char| c.is_ascii_alphabetic()).map(|i| t.split_at(i)).unwrap_or((t, "B"));
        let n: u64 = num
            .trim()
            .parse()
            .map_err(|_| format!("size {t:?} is not a whole number with a unit (B, KiB, MiB, GiB)"))?;
        let scale: u64 = match unit {
            "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            _ => return Err(format!("size {t:?} has unknown unit {unit:?} (use B, KiB, MiB, GiB or TiB)")),
        };
        n.checked_mul(scale).ok_or_else(|| format!("size {t:?} is too large"))
    }
}

/// Durations as "250ms", "3s", "2m" (or a bare number of seconds).
mod dur {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Int(i64),
        Float(f64),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = match Raw::deserialize(d)? {
            Raw::Int(n) => n as f64,
            Raw::Float(f) => f,
            Raw::Text(t) => parse(&t).map_err(serde::de::Error::custom)?,
        };
        if secs < 0.0 || !secs.is_finite() {
            return Err(serde::de::Error::custom(format!("duration {secs}s is negative")));
        }
        Ok(Duration::from_secs_f64(secs))
    }

    fn parse(t: &str) -> Result<f64, String> {
        let t = t.trim();
        let (num, unit) = t.find(|c: char| c.is_ascii_alphabetic()).map(|i| t.split_at(i)).unwrap_or((t, "s"));
        let n: f64 =
            num.trim().parse().map_err(|_| format!("duration {t:?} is not a number with a unit (ms, s, m)"))?;
        let scale = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            _ => return Err(format!("duration {t:?} has unknown unit {unit:?} (use ms, s or m)")),
        };
        if n < 0.0 {
            return Err(format!("duration {t:?} is negative"));
        }
        Ok(n * scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
name = "t"
seed = 3
duration = "10s"
[cluster]
backend = "local"
[[faults]]
at = "2s"
kind = "kill"
[random_faults]
per_minute = 30
kinds = ["pause", "isolate"]
"#;

    #[test]
    fn parses_and_schedules_deterministically() {
        let s = Scenario::parse(OK).unwrap();
        assert_eq!(s.duration, Duration::from_secs(10));
        let a = s.schedule();
        assert_eq!(a, s.schedule(), "same seed, same schedule");
        assert!(a.len() > 1);
        assert!(a.windows(2).all(|w| w[0].at <= w[1].at));
        let mut other = s.clone();
        other.seed = 4;
        assert_ne!(a, other.schedule(), "another seed, another schedule");
    }

    #[test]
    fn errors_name_the_field() {
        let bad_kind = OK.replace("kind = \"kill\"", "kind = \"meteor\"");
        let e = Scenario::parse(&bad_kind).unwrap_err();
        assert!(e.contains("meteor") && e.contains("line 9 (`kind = \"meteor\"`)"), "{e}");
        let negative = OK.replace("duration = \"10s\"", "duration = \"-5s\"");
        let e = Scenario::parse(&negative).unwrap_err();
        assert!(e.contains("negative") && e.contains("line 4"), "{e}");
        let missing = OK.replace("backend = \"local\"\n", "");
        let e = Scenario::parse(&missing).unwrap_err();
        assert!(e.contains("backend"), "{e}");
        let late = OK.replace("at = \"2s\"", "at = \"20s\"");
        assert!(Scenario::parse(&late).unwrap_err().contains("faults[0].at"));
        let unknown = format!("{OK}\nbogus = 1\n");
        let e = Scenario::parse(&unknown).unwrap_err();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn blocks_section_parses_and_validates() {
        assert!(Scenario::parse(OK).unwrap().blocks.is_none(), "absent = no block workload");
        let with = |b: &str| format!("{OK}\n[blocks]\n{b}\n");
        let s = Scenario::parse(&with("volume_size = \"16MiB\"\nreplicas = 3\nwriters = 2")).unwrap();
        let b = s.blocks.unwrap();
        assert_eq!((b.volume_size, b.replicas, b.writers, b.blocks_per_writer), (16 << 20, 3, 2, 64));
        assert_eq!(b.ownership().blocks_of(1), 64..128);
        assert_eq!((b.ownership().owner(127), b.ownership().owner(128)), (Some(1), None));
        assert_eq!(Scenario::parse(&with("volume_size = 1048576")).unwrap().blocks.unwrap().volume_size, 1 << 20);
        let e = Scenario::parse(&with("volume_size = \"16MB\"")).unwrap_err();
        assert!(e.contains("line 15") && e.contains("unknown unit"), "{e}");
        let e = Scenario::parse(&with("replicas = 1")).unwrap_err();
        assert!(e.contains("blocks.replicas"), "{e}");
        let e = Scenario::parse(&with("volume_size = \"64KiB\"")).unwrap_err();
        assert!(e.contains("blocks.volume_size") && e.contains("do not fit"), "{e}");
        let e = Scenario::parse(&with("volume_size = 5000")).unwrap_err();
        assert!(e.contains("multiple of 4 KiB"), "{e}");
        let e = Scenario::parse(&with("writerz = 2")).unwrap_err();
        assert!(e.contains("writerz") && e.contains("line 15"), "{e}");
        let small = OK.replace("[cluster]\nbackend = \"local\"", "[cluster]\nbackend = \"local\"\nnodes = 2");
        let e = Scenario::parse(&format!("{small}\n[blocks]\nreplicas = 3\n")).unwrap_err();
        assert!(e.contains("blocks.replicas") && e.contains("has 2"), "{e}");
    }

    #[test]
    fn volume_primary_targets_need_blocks() {
        let primary = OK.replace("kind = \"kill\"", "kind = \"kill\"\ntarget = \"volume_primary\"");
        let e = Scenario::parse(&primary).unwrap_err();
        assert!(e.contains("faults[0].target") && e.contains("[blocks]"), "{e}");
        let s = Scenario::parse(&format!("{primary}\n[blocks]\n")).unwrap();
        assert_eq!(s.faults[0].target, Target::VolumePrimary);
        let targets =
            OK.replace("kinds = [\"pause\", \"isolate\"]", "kinds = [\"cut\"]\ntargets = [\"volume_primary\"]");
        assert!(Scenario::parse(&targets).unwrap_err().contains("random_faults.targets[0]"));
        let s = Scenario::parse(&format!("{targets}\n[blocks]\n")).unwrap();
        let random: Vec<_> = s.schedule().into_iter().filter(|f| f.kind == FaultKind::Cut).collect();
        assert!(!random.is_empty() && random.iter().all(|f| f.target == Target::VolumePrimary));
    }

    #[test]
    fn ha_and_shares_sections_parse_and_validate() {
        let s = Scenario::parse(&format!("{OK}\n[ha]\n[shares]\n")).unwrap();
        let h = s.ha.unwrap();
        assert_eq!(
            (h.count, h.epoch_ms, h.mode_of(0), h.mode_of(1)),
            (2, 50, HaModeSpec::Redundant, HaModeSpec::MultiOperation)
        );
        assert_eq!(s.shares.unwrap().ack, ShareAckSpec::Hub);
        let with = |b: &str| format!("{OK}\n[ha]\n{b}\n");
        let e = Scenario::parse(&with("epoch_ms = 2")).unwrap_err();
        assert!(e.contains("ha.epoch_ms"), "{e}");
        let e = Scenario::parse(&with("modes = []")).unwrap_err();
        assert!(e.contains("ha.modes"), "{e}");
        let e = Scenario::parse(&with("modes = [\"mirrored\"]")).unwrap_err();
        assert!(e.contains("mirrored") && e.contains("line 15"), "{e}");
        let e = Scenario::parse(&format!("{OK}\n[shares]\nput_rate = 0\n")).unwrap_err();
        assert!(e.contains("shares.put_rate"), "{e}");
        let primary = OK.replace("kind = \"kill\"", "kind = \"kill\"\ntarget = \"ha_primary\"");
        let e = Scenario::parse(&primary).unwrap_err();
        assert!(e.contains("faults[0].target") && e.contains("[ha]"), "{e}");
        let s = Scenario::parse(&format!("{primary}\n[ha]\n")).unwrap();
        assert_eq!(s.faults[0].target, Target::HaPrimary);
        assert_eq!(s.faults[0].target.to_string(), "ha_primary");
    }
}
