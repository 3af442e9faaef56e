//! Consensus: openraft configured for Haven.
//!
//! The Raft log and the state machine both live in the node's control database ([`log_store`],
//! [`state_machine`]; volume blocks have a database of their own, see `storage`); RPCs travel as
//! envelopes over the QUIC transport ([`network`]). The state machine is the catalog
//! ([`crate::catalog`]). openraft's tasks run on threads of their own ([`RaftRuntime`]), so block
//! I/O and request handling on the node's shared pool cannot delay a heartbeat. This module owns
//! the type configuration and the Raft tunables; it must not contain catalog logic.

// openraft's trait methods return its own (large) StorageError; our helpers return the same type
// so `?` works without conversions.
#![allow(clippy::result_large_err)]

pub mod batch;
pub mod campaign;
pub mod election;
pub mod guard;
pub mod limits;
pub mod log_store;
pub mod network;
pub mod snapshot_file;
pub mod state_machine;

use std::fmt;
use std::time::Duration;

use haven_proto::{CatalogCommand, CommandOutcome};
use serde::{Deserialize, Serialize};

use crate::config::RaftTunables;

/// What the membership records about each node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HavenNode {
    /// QUIC address.
    pub addr: String,
    /// Admin HTTP address.
    pub admin_addr: String,
}

impl fmt::Display for HavenNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (admin {})", self.addr, self.admin_addr)
    }
}

openraft::declare_raft_types!(
    /// Haven's Raft type configuration.
    pub TypeConfig:
        D = CatalogCommand,
        R = CommandOutcome,
        NodeId = u64,
        Node = HavenNode,
        SnapshotData = tokio::fs::File,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<u64>;
pub type Vote = openraft::Vote<u64>;
pub type StorageError = openraft::StorageError<u64>;
pub type StoredMembership = openraft::StoredMembership<u64, HavenNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<u64, HavenNode>;

/// Where openraft's tasks run (the core, replication to each follower, log and state-machine
/// I/O): by default a runtime of their own with two worker threads (`haven-raft`), else the
/// node's shared pool (`[raft] dedicated_threads = false`, the leadership benchmark's baseline).
///
/// openraft spawns its tasks on the runtime that calls `Raft::new`, and its storage calls are
/// synchronous RocksDB writes made from those tasks: on the shared pool a Raft append or vote
/// write occupied one of the two worker threads the NBD server and device actors also need, and
/// the core waited behind them for its tick. Two threads, not one: while the core blocks in a
/// state-machine fsync (which shares the disk with block writes), the replication tasks must
/// still send heartbeats. The `Raft` handle itself works from any runtime.
pub struct RaftRuntime {
    runtime: Option<tokio::runtime::Runtime>,
}

impl RaftRuntime {
    pub fn new(dedicated: bool) -> std::io::Result<Self> {
        let runtime = dedicated
            .then(|| {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("haven-raft")
                    .enable_all()
                    .build()
            })
            .transpose()?;
        Ok(Self { runtime })
    }

    /// Run `work` on Raft's runtime in the background.
    pub fn spawn<F>(&self, work: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        match &self.runtime {
            Some(rt) => drop(rt.spawn(work)),
            None => drop(tokio::spawn(work)),
        }
    }

    /// Run `work` (and everything it spawns) on Raft's runtime and wait for its output.
    pub async fn run<F>(&self, work: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.runtime {
            Some(rt) => match rt.spawn(work).await {
                Ok(out) => out,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            },
            None => work.await,
        }
    }
}

impl Drop for RaftRuntime {
    fn drop(&mut self) {
        // Dropped from async code at shutdown, where a blocking runtime drop would panic.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Entries per AppendEntries at most (openraft `max_payload_entries`).
pub const MAX_PAYLOAD_ENTRIES: u64 = 256;

/// The snapshot size openraft's snapshot deadline is sized for (1 GiB). Larger snapshots still
/// install if the link and disk are faster than the minimum rate `limits` allows for.
pub const MAX_SNAPSHOT_INSTALL_BYTES: u64 = 1 << 30;

impl RaftTunables {
    /// The openraft configuration for node `node_id`.
    ///
    /// openraft 0.9 draws a node's election timeout once per process and checks it on a tick of
    /// 1.5 heartbeats, so two survivors whose draws land within a tick of each other time out
    /// together after every split vote — a livelock that lasted seconds in chaos runs. With
    /// `stagger_elections`, node ids map onto three disjoint bands inside
    /// [`election_timeout_min_ms`, `election_timeout_max_ms`] (lower ids first), separated by more
    /// than a tick, so the survivors of any single failure never draw colliding timeouts.
    ///
    /// [`election_timeout_min_ms`]: RaftTunables::election_timeout_min_ms
    /// [`election_timeout_max_ms`]: RaftTunables::election_timeout_max_ms
    pub fn to_openraft(&self, node_id: u64) -> Result<openraft::Config, String> {
        let (min, max) = (self.election_timeout_min_ms, self.election_timeout_max_ms);
        let (lo, hi) = if self.stagger_elections && max > min {
            // Bands of width (max-min)/8 starting (max-min)*7/16 apart: 80-160 ms gives [80,90),
            // [115,125), [150,160). Band gaps (25 ms) exceed the tick (1.5 heartbeats), and every
            // band's lease (its upper end) ends before any other node's first election fires
            // (lease + own timeout >= 170 ms), so the first candidate after a failure is granted.
            let k = node_id.saturating_sub(1) % 3;
            let lo = min + k * (max - min) * 7 / 16;
            (lo, lo + ((max - min) / 8).max(1))
        } else {
            (min, max)
        };
        #[allow(deprecated)] // send_snapshot_timeout: set to 0 so every chunk uses one deadline
        let cfg = openraft::Config {
            cluster_name: "haven".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: lo,
            election_timeout_max: hi,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_after_entries),
            max_in_snapshot_log_to_keep: self.keep_after_snapshot,
            // Bytes, not entries, bound an AppendEntries (`limits`, `network`); the count only
            // caps how many small entries one round reads and sends (256 entries of ~200 bytes
            // is ~50 KiB, quick to send within a heartbeat interval).
            max_payload_entries: MAX_PAYLOAD_ENTRIES,
            // Chunks well under a frame; each chunk's own timeout fits its size (`network`), and
            // this outer deadline is long enough to install a snapshot of MAX_SNAPSHOT_INSTALL_BYTES
            // at the slowest rate allowed for.
            snapshot_max_chunk_size: limits::SNAPSHOT_CHUNK_BYTES as u64,
            install_snapshot_timeout: limits::install_snapshot_deadline(MAX_SNAPSHOT_INSTALL_BYTES).as_millis() as u64,
            send_snapshot_timeout: 0,
            // With pre-vote, `campaign` decides when to elect (`Trigger::elect`).
            enable_elect: !self.prevote,
            ..Default::default()
        };
        cfg.validate().map_err(|e| e.to_string())
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
}

/// bincode options used for everything openraft hands us: fixed limits so a hostile peer cannot
/// make us allocate unbounded memory while decoding.
pub fn codec() -> impl bincode::Options + Copy {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_limit(haven_proto::MAX_FRAME_LEN as u64)
        .with_fixint_encoding()
        .allow_trailing_bytes()
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    use bincode::Options;
    codec().serialize(value).map_err(|e| e.to_string())
}

pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    use bincode::Options;
    codec().deserialize(bytes).map_err(|e| e.to_string())
}
