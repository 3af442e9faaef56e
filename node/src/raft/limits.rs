//! Byte and time bounds on Raft RPCs: how many bytes one AppendEntries or snapshot chunk may
//! carry, how many entries to ask for when a request is over budget, the per-peer AppendEntries budget that adapts to
//! what the link delivers within openraft's deadline, and the timeout a snapshot chunk gets for
//! its size.
//!
//! Pure: no I/O, no clock (callers pass elapsed times). `network` applies these to each RPC,
//! `log_store` to the entries it reads for replication, and `mod.rs` to openraft's config. This
//! module must not send or store anything.

use std::time::Duration;

use haven_proto::MAX_FRAME_LEN;

/// Room left in a frame for the envelope around a Raft payload (ids, flags, rkyv framing: a few
/// hundred bytes in practice).
pub const ENVELOPE_HEADROOM_BYTES: usize = 64 << 10;

/// The largest Raft payload that fits one frame. Nothing bigger can be sent at all.
pub const MAX_RPC_PAYLOAD_BYTES: usize = MAX_FRAME_LEN - ENVELOPE_HEADROOM_BYTES;

/// The most entry bytes one AppendEntries carries (4 MiB, a quarter of a frame). The log reader
/// stops reading entries past it, so openraft never holds more than this per follower round.
pub const APPEND_MAX_BYTES: usize = 4 << 20;

/// The least an adaptive AppendEntries budget shrinks to. One entry is sent whatever its size
/// (up to [`MAX_RPC_PAYLOAD_BYTES`]), so a small budget slows replication but never stops it.
pub const APPEND_MIN_BYTES: usize = 64 << 10;

/// Where a peer's AppendEntries budget starts.
pub const APPEND_START_BYTES: usize = 512 << 10;

/// Snapshot chunk size (openraft `snapshot_max_chunk_size`): 4 MiB, well under a frame.
pub const SNAPSHOT_CHUNK_BYTES: usize = 4 << 20;

/// The slowest transfer (and snapshot install) rate a snapshot RPC's timeout allows for.
pub const SNAPSHOT_MIN_RATE_BYTES_PER_SEC: u64 = 4 << 20;

/// Fixed part of a snapshot RPC's timeout (connection, scheduling, fsync).
pub const SNAPSHOT_RPC_BASE: Duration = Duration::from_secs(2);

const _: () = assert!(SNAPSHOT_CHUNK_BYTES < MAX_RPC_PAYLOAD_BYTES);
const _: () = assert!(APPEND_MAX_BYTES < MAX_RPC_PAYLOAD_BYTES);
const _: () = assert!(APPEND_MIN_BYTES <= APPEND_START_BYTES && APPEND_START_BYTES <= APPEND_MAX_BYTES);

/// What to do with an encoded AppendEntries of `payload_bytes` holding `entries` entries, under
/// `budget_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendPlan {
    /// Send it as it is.
    Send,
    /// Ask openraft to resend only this many entries (`PayloadTooLarge`): the share of the
    /// entries the budget holds if they are of similar size, at least one and always fewer than
    /// now, so repeated shrinking reaches a request that fits or a single entry.
    Shrink { entries: usize },
    /// A single entry larger than any frame: it cannot be replicated.
    EntryTooLarge,
}

pub fn plan_append(payload_bytes: usize, entries: usize, budget_bytes: usize) -> AppendPlan {
    if payload_bytes <= budget_bytes {
        return AppendPlan::Send;
    }
    if entries > 1 {
        let share = (entries as u128 * budget_bytes as u128 / payload_bytes as u128) as usize;
        return AppendPlan::Shrink { entries: share.clamp(1, entries - 1) };
    }
    if payload_bytes <= MAX_RPC_PAYLOAD_BYTES {
        // One entry over the budget still goes: it is the only way forward.
        return AppendPlan::Send;
    }
    AppendPlan::EntryTooLarge
}

/// A peer's AppendEntries byte budget. openraft 0.9 gives every AppendEntries one heartbeat
/// interval to complete (its own timeout around the network call), whatever its size, so the
/// budget follows what this link delivers in that time: doubled after a full-sized request that
/// finished within half the deadline, halved after one that took more than three quarters of it
/// or was cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendBudget {
    bytes: usize,
}

impl Default for AppendBudget {
    fn default() -> Self {
        Self { bytes: APPEND_START_BYTES }
    }
}

impl AppendBudget {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// A request of `sent_bytes` completed after `elapsed`, with `deadline` allowed.
    pub fn completed(&mut self, sent_bytes: usize, elapsed: Duration, deadline: Duration) {
        if elapsed > deadline * 3 / 4 {
            self.shrink();
        } else if elapsed <= deadline / 2 && sent_bytes >= self.bytes / 2 {
            self.bytes = (self.bytes * 2).min(APPEND_MAX_BYTES);
        }
    }

    /// A request did not complete in time (openraft cancelled it, or the transport timed out).
    pub fn timed_out(&mut self) {
        self.shrink();
    }

    fn shrink(&mut self) {
        self.bytes = (self.bytes / 2).max(APPEND_MIN_BYTES);
    }
}

/// The timeout for one snapshot chunk of `chunk_bytes`; the last chunk (`done`) also covers
/// installing the whole snapshot of `snapshot_bytes` on the receiver, which happens before it
/// answers. Never more than openraft's own deadline `hard_ttl`.
pub fn snapshot_rpc_timeout(chunk_bytes: usize, done: bool, snapshot_bytes: u64, hard_ttl: Duration) -> Duration {
    let work_bytes = (chunk_bytes as u64).saturating_add(if done { snapshot_bytes } else { 0 });
    let fitted =
        SNAPSHOT_RPC_BASE + Duration::from_millis(work_bytes.saturating_mul(1000) / SNAPSHOT_MIN_RATE_BYTES_PER_SEC);
    fitted.min(hard_ttl)
}

/// openraft's `install_snapshot_timeout`: the deadline of every snapshot RPC, large enough for
/// installing a snapshot of `max_snapshot_bytes` at the minimum rate. [`snapshot_rpc_timeout`]
/// gives each chunk less when it needs less.
pub fn install_snapshot_deadline(max_snapshot_bytes: u64) -> Duration {
    snapshot_rpc_timeout(SNAPSHOT_CHUNK_BYTES, true, max_snapshot_bytes, Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_shrink_towards_the_budget_and_send_single_entries() {
        let kib120 = 120 << 10;
        // 150 values of 120 KiB: 18 MiB, more than a frame.
        assert_eq!(plan_append(150 * kib120, 150, APPEND_MAX_BYTES), AppendPlan::Shrink { entries: 34 });
        assert_eq!(plan_append(34 * kib120, 34, APPEND_MAX_BYTES), AppendPlan::Send);
        assert_eq!(plan_append(0, 0, APPEND_MIN_BYTES), AppendPlan::Send);
        // Never the same count again, never zero.
        assert_eq!(plan_append(APPEND_MIN_BYTES + 1, 2, APPEND_MIN_BYTES), AppendPlan::Shrink { entries: 1 });
        assert_eq!(plan_append(usize::MAX, 5, 1), AppendPlan::Shrink { entries: 1 });
        assert_eq!(plan_append(APPEND_MAX_BYTES * 2, 1, APPEND_MIN_BYTES), AppendPlan::Send);
        assert_eq!(plan_append(MAX_RPC_PAYLOAD_BYTES + 1, 1, APPEND_MIN_BYTES), AppendPlan::EntryTooLarge);
    }

    #[test]
    fn budget_grows_on_fast_full_requests_and_shrinks_on_slow_ones() {
        let deadline = Duration::from_millis(16);
        let mut b = AppendBudget::default();
        b.completed(APPEND_START_BYTES, Duration::from_millis(2), deadline);
        assert_eq!(b.bytes(), APPEND_START_BYTES * 2);
        // A heartbeat says nothing about what a big request would take.
        b.completed(100, Duration::from_millis(1), deadline);
        assert_eq!(b.bytes(), APPEND_START_BYTES * 2);
        // Neither fast nor slow: unchanged.
        b.completed(APPEND_START_BYTES * 2, Duration::from_millis(10), deadline);
        assert_eq!(b.bytes(), APPEND_START_BYTES * 2);
        b.completed(APPEND_START_BYTES * 2, Duration::from_millis(13), deadline);
        assert_eq!(b.bytes(), APPEND_START_BYTES);
        for _ in 0..20 {
            b.timed_out();
        }
        assert_eq!(b.bytes(), APPEND_MIN_BYTES);
        for _ in 0..20 {
            let full = b.bytes();
            b.completed(full, Duration::ZERO, deadline);
        }
        assert_eq!(b.bytes(), APPEND_MAX_BYTES);
    }

    #[test]
    fn snapshot_timeouts_fit_their_size() {
        let ttl = Duration::from_secs(600);
        let chunk = snapshot_rpc_timeout(SNAPSHOT_CHUNK_BYTES, false, 1 << 30, ttl);
        assert_eq!(chunk, SNAPSHOT_RPC_BASE + Duration::from_secs(1));
        // The last chunk also pays for installing the whole snapshot (64 MiB: 16 s more).
        let last = snapshot_rpc_timeout(SNAPSHOT_CHUNK_BYTES, true, 64 << 20, ttl);
        assert_eq!(last, chunk + Duration::from_secs(16));
        assert_eq!(snapshot_rpc_timeout(SNAPSHOT_CHUNK_BYTES, true, u64::MAX, ttl), ttl);
        assert_eq!(install_snapshot_deadline(1 << 30), SNAPSHOT_RPC_BASE + Duration::from_secs(257));
    }
}
