//! The timing knobs of each layer, as `haven.toml` spells them (`[raft]`, `[fence]`, `[volume]`,
//! `[plans]`): plain data with defaults and checks, and nothing else. The layers that use them
//! take them as values; this module depends on none of them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Raft timing and log-compaction knobs (from the node configuration).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RaftTunables {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many applied entries.
    pub snapshot_after_entries: u64,
    /// Entries kept in the log after a snapshot (so slightly-behind followers avoid a snapshot).
    pub keep_after_snapshot: u64,
    /// Give each node its own election-timeout band by node id (see `RaftTunables::to_openraft` in `raft`).
    pub stagger_elections: bool,
    /// Run openraft on threads of its own (`raft::RaftRuntime`) instead of the shared pool.
    pub dedicated_threads: bool,
    /// Elect with Haven's timer (`raft::election`: pre-vote, and local stalls are not held
    /// against the leader) instead of openraft's own. Every node of a cluster must use the same
    /// value: a node without it refuses every pre-vote.
    pub prevote: bool,
    /// Batch catalog proposals made together on the leader into one Raft entry
    /// (`raft::batch`): one leader fsync for many writes instead of one each. Off by default
    /// until the follower side keeps up under load: with it, `catalog_bench` on a loaded
    /// two-core machine saw AppendEntries outlast their one-heartbeat deadline (follower fsyncs
    /// of bigger batches on a contended disk) and leaders change mid-run.
    pub batch_proposals: bool,
}

/// Defaults tuned for a LAN (failover in ~200–300 ms, see `benches/`; etcd's election timeout
/// alone is 1 s).
impl Default for RaftTunables {
    fn default() -> Self {
        Self {
            heartbeat_ms: 15,
            election_timeout_min_ms: 80,
            election_timeout_max_ms: 160,
            stagger_elections: true,
            dedicated_threads: true,
            prevote: true,
            batch_proposals: false,
            snapshot_after_entries: 10_000,
            keep_after_snapshot: 1_000,
        }
    }
}

/// Fencing timing (`[fence]` in `haven.toml`). Every node of a cluster must use the same values:
/// the leader waits out the destination's lease with its own `fence_after_ms`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct FenceTunables {
    /// A host without quorum contact this long pauses its guests. It must exceed the worst
    /// election (no leader sends heartbeats meanwhile, and a healthy host must not fence): with
    /// the default Raft timing (election timeouts 80–160 ms, staggered by node id) failover takes
    /// about 200–300 ms, a split vote a few hundred more, and (only with `raft.prevote` off) a
    /// restarted member holds back its own elections for 6 × the longest election timeout
    /// (~1 s). 4 s leaves a wide margin; the
    /// cost is that a failing-back plan waits this long (plus the margin) before restoring a
    /// group whose destination went silent. [`FenceTunables::validate`] requires at least ten
    /// longest election timeouts.
    pub fence_after_ms: u64,
    /// Added to `fence_after_ms` by the leader before it treats a silent host as fenced: covers
    /// clock-rate differences between hosts and the delay between a host accepting a heartbeat
    /// and the leader reading its reply.
    pub clock_margin_ms: u64,
    /// After a lapse, contact must be unbroken this long before the lease is valid again.
    pub rejoin_after_ms: u64,
}

impl Default for FenceTunables {
    fn default() -> Self {
        Self { fence_after_ms: 4_000, clock_margin_ms: 1_000, rejoin_after_ms: 500 }
    }
}

impl FenceTunables {
    /// The defaults, with `fence_after_ms` raised to ten longest election timeouts for slower
    /// Raft timing (`haven-node init --election-timeout-ms`).
    pub fn for_elections(election_timeout_max_ms: u64) -> Self {
        let d = Self::default();
        Self { fence_after_ms: d.fence_after_ms.max(election_timeout_max_ms.saturating_mul(10)), ..d }
    }

    /// Check against the Raft timing: the lease must outlast any election.
    pub fn validate(&self, election_timeout_max_ms: u64) -> Result<(), String> {
        let floor = election_timeout_max_ms.saturating_mul(10);
        if self.fence_after_ms < floor {
            return Err(format!(
                "fence.fence_after_ms {} must be at least 10 longest election timeouts ({floor} ms), or healthy \
                 hosts fence themselves during elections",
                self.fence_after_ms
            ));
        }
        if self.rejoin_after_ms >= self.fence_after_ms {
            return Err(format!(
                "fence.rejoin_after_ms {} must be shorter than fence.fence_after_ms {}",
                self.rejoin_after_ms, self.fence_after_ms
            ));
        }
        Ok(())
    }

    pub fn fence_after(&self) -> Duration {
        Duration::from_millis(self.fence_after_ms)
    }

    /// How long after a host's last possible contact the leader treats it as fenced.
    pub fn fenced_after_silence(&self) -> Duration {
        Duration::from_millis(self.fence_after_ms.saturating_add(self.clock_margin_ms))
    }
}

/// Time-based behaviour of volumes (from the node config; tests shrink it).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct VolumeTunables {
    /// How long the primary waits for a replica's acknowledgement before dropping it from the
    /// in-sync set.
    pub replica_ack_timeout_ms: u64,
    /// How often the primary retries resyncing replicas that are not in sync.
    pub resync_retry_ms: u64,
    /// How often a node re-reads the catalog for volume changes.
    pub catalog_poll_ms: u64,
    /// The leader declares a host down after this long without an answer to its probes.
    pub host_down_ms: u64,
    /// How often the leader probes hosts.
    pub probe_ms: u64,
    /// Bandwidth cap of one resync in bytes per second (0 = none).
    pub resync_max_bytes_per_sec: u64,
    /// How long a client or NBD request keeps retrying while a volume fails over (kept below the
    /// SDK's 5 s attempt timeout so the SDK sees the answer).
    pub failover_wait_ms: u64,
    /// How long a host holding an in-sync replica (the primary or not) may serve reads after
    /// asking the leader for a read lease (`volume::core::lease`); hosts ask every quarter of
    /// it. The leader fails a volume over, or removes a host from its in-sync set, only
    /// `read_lease_ms` + `read_lease_margin_ms` after that host's last request, so this is added
    /// to every failover and to the write that drops an unresponsive replica.
    pub read_lease_ms: u64,
    /// Covers a read that checked its lease just before it ended and is then served late
    /// (a descheduled task, a slow disk), and clock-rate differences between hosts.
    pub read_lease_margin_ms: u64,
    /// Serve reads from this host's in-sync replica (under a read lease) instead of routing
    /// them to the primary. On by default; off routes every read to the primary (the
    /// benchmark's same-run baseline). It was off for a while because the chaos scenario
    /// `volume-operations` (seed 3) read a block one write old right after a relationship
    /// reversal; the cause was not local reads but a reversal committing after its proposer
    /// gave up waiting (`volume::reversal`), and that scenario failed with them off too.
    pub local_reads: bool,
}

impl Default for VolumeTunables {
    fn default() -> Self {
        Self {
            replica_ack_timeout_ms: 1_000,
            resync_retry_ms: 1_000,
            catalog_poll_ms: 50,
            host_down_ms: 1_000,
            probe_ms: 200,
            failover_wait_ms: 4_000,
            read_lease_ms: 1_000,
            read_lease_margin_ms: 500,
            local_reads: true,
            resync_max_bytes_per_sec: 0,
        }
    }
}

impl VolumeTunables {
    /// A lease must be renewable between elections, and a client's failover wait must outlast
    /// the lease plus its margin, or reads fail before the volume can fail over.
    pub fn validate(&self) -> Result<(), String> {
        if self.read_lease_ms < 100 {
            return Err(format!("volume.read_lease_ms {} must be at least 100", self.read_lease_ms));
        }
        let lapse = self.read_lease_ms.saturating_add(self.read_lease_margin_ms);
        if self.failover_wait_ms <= lapse.saturating_add(self.host_down_ms) {
            return Err(format!(
                "volume.failover_wait_ms {} must exceed read_lease_ms + read_lease_margin_ms + host_down_ms ({} ms): \
                 requests would give up before a failover can happen",
                self.failover_wait_ms,
                lapse.saturating_add(self.host_down_ms)
            ));
        }
        Ok(())
    }
}

/// Timing of migration plans. Tests shrink these.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PlanTunables {
    /// How often the controller looks at plans and polls migrations.
    pub poll_ms: u64,
    /// A destination silent this long fails the plan back.
    pub host_down_ms: u64,
    /// Longest one VM's live migration may take before the plan fails back.
    pub vm_migration_timeout_ms: u64,
    /// Longest a group operation (snapshot, consolidation, restore) may take on a host.
    pub group_op_timeout_ms: u64,
    /// How long fail-back waits for cancelled migrations to stop before it retries.
    pub cancel_wait_ms: u64,
    /// Group snapshots up to this many MiB of guest memory are pre-copied into in-memory shadows
    /// while the group runs (the pause copies only the pages written since the last round) and
    /// written after it resumes; bigger ones are written to disk while the group is paused.
    pub capture_in_memory_mib: u64,
}

impl Default for PlanTunables {
    fn default() -> Self {
        Self {
            poll_ms: 100,
            host_down_ms: 2_000,
            vm_migration_timeout_ms: 300_000,
            group_op_timeout_ms: 120_000,
            cancel_wait_ms: 30_000,
            capture_in_memory_mib: 1024,
        }
    }
}

/// Where a node keeps its column families (`[storage] layout` in `haven.toml`; see `storage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageLayout {
    /// Raft and the catalog in `db/`, volume blocks in `blocks/`: separate WALs and fsyncs.
    #[default]
    Split,
    /// Everything in `db/`, one WAL (nodes before the split; the leadership benchmark's baseline).
    Shared,
}

impl std::fmt::Display for StorageLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Split => "split",
            Self::Shared => "shared",
        })
    }
}

/// Storage settings (`[storage]` in `haven.toml`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct StorageTunables {
    /// `split` (default): Raft and the catalog in their own RocksDB, apart from volume blocks.
    /// `shared`: one RocksDB for everything, as before the split (for measuring the difference).
    pub layout: StorageLayout,
}
