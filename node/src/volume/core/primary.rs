//! A primary's followers: the replicas and async (DR) copies it feeds writes to without waiting
//! for them, and what it knows of each one's progress. No I/O; time is passed in.
//!
//! A follower is either a listed replica being resynced or an async copy. Each forwarded write
//! is tracked until its reply; a failed or skipped write makes the follower **broken** (its copy
//! has a hole) until a resync fills it. Every follower carries a generation: a reply from an
//! earlier generation (sent before the follower broke, or before a rollback rewrote history) is
//! ignored, so a late acknowledgement can never make a copy look newer than it is.
//!
//! Architecture invariant: a follower that is not broken holds every point from `since_seq` up
//! to `acked_seq` of THIS primary's history. Anything that rewrites history below the newest
//! point (a rollback) must call [`Followers::history_rewritten`], which breaks every follower:
//! their copies hold points the primary no longer has, and a follower's sequencer would
//! acknowledge the reused points as "already applied" (issue 11, race 3).

use std::collections::BTreeMap;
use std::time::Instant;

use haven_proto::volume::{ReplicaProgress, ResyncProgress};
use haven_proto::NodeId;

/// Why a follower is fed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowKind {
    Resync,
    Async { max_lag_bytes: u64 },
}

/// A replica fed writes that acknowledgements do not wait for.
#[derive(Debug, Clone)]
pub struct Follower {
    pub kind: FollowKind,
    /// A forwarded write failed or was skipped since `since_seq`: the copy has a hole.
    pub broken: bool,
    pub since_seq: u64,
    pub acked_seq: u64,
    /// Unacknowledged forwarded writes: seq → (bytes, sent at).
    pub outstanding: BTreeMap<u64, (u64, Instant)>,
    pub resync: Option<ResyncProgress>,
    generation: u64,
}

impl Follower {
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn is_async(&self) -> bool {
        matches!(self.kind, FollowKind::Async { .. })
    }

    fn lag_bytes(&self) -> u64 {
        self.outstanding.values().map(|(b, _)| b).sum()
    }

    fn break_copy(&mut self, generation: u64) {
        self.broken = true;
        self.outstanding.clear();
        self.generation = generation;
    }
}

/// One forwarded write the driver must send, and report back with [`Followers::forwarded`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub host: NodeId,
    pub generation: u64,
}

/// Every follower of one primary.
#[derive(Debug, Default)]
pub struct Followers {
    map: BTreeMap<NodeId, Follower>,
    last_generation: u64,
}

impl Followers {
    fn generation(&mut self) -> u64 {
        self.last_generation += 1;
        self.last_generation
    }

    pub fn get(&self, host: NodeId) -> Option<&Follower> {
        self.map.get(&host)
    }

    pub fn get_mut(&mut self, host: NodeId) -> Option<&mut Follower> {
        self.map.get_mut(&host)
    }

    pub fn iter(&self) -> impl Iterator<Item = (NodeId, &Follower)> {
        self.map.iter().map(|(h, f)| (*h, f))
    }

    pub fn hosts(&self) -> Vec<NodeId> {
        self.map.keys().copied().collect()
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }

    pub fn remove(&mut self, host: NodeId) {
        self.map.remove(&host);
    }

    /// Keep the followers the catalog still wants: listed replicas not in sync, and the
    /// volume's active async targets. A new async target starts broken: it has a hole until a
    /// resync fills it.
    pub fn retain_wanted(&mut self, replicas: &[NodeId], in_sync: &[NodeId], async_targets: &[(NodeId, u64)]) {
        self.map.retain(|host, fol| match fol.kind {
            FollowKind::Async { .. } => async_targets.iter().any(|(h, _)| h == host),
            FollowKind::Resync => replicas.contains(host) && !in_sync.contains(host),
        });
        for &(host, max_lag_bytes) in async_targets {
            if !self.map.contains_key(&host) {
                let generation = self.generation();
                self.map.insert(host, new_follower(FollowKind::Async { max_lag_bytes }, 0, generation, true));
            }
        }
    }

    /// A resync of `host` towards point `target` starts forwarding: writes after `target` go to
    /// it from now on, in a new generation.
    pub fn start_resync(&mut self, host: NodeId, target: u64, progress: ResyncProgress) {
        let kind = self.map.get(&host).map_or(FollowKind::Resync, |f| f.kind);
        let generation = self.generation();
        let mut f = new_follower(kind, target, generation, false);
        f.resync = Some(progress);
        self.map.insert(host, f);
    }

    /// Point `seq` (`bytes` long) was ordered at `now`: which followers to forward it to. An async
    /// copy that would fall more than its lag budget behind breaks instead (a resync catches it
    /// up later).
    pub fn forward(&mut self, seq: u64, bytes: u64, now: Instant) -> Vec<Forward> {
        let mut out = Vec::new();
        let last = &mut self.last_generation;
        for (host, f) in self.map.iter_mut() {
            if f.broken {
                continue;
            }
            if let FollowKind::Async { max_lag_bytes } = f.kind {
                if f.lag_bytes() + bytes > max_lag_bytes {
                    *last += 1;
                    f.break_copy(*last);
                    continue;
                }
            }
            f.outstanding.insert(seq, (bytes, now));
            out.push(Forward { host: *host, generation: f.generation });
        }
        out
    }

    /// The reply to a forwarded write. Replies from an earlier generation are ignored.
    pub fn forwarded(&mut self, fwd: Forward, seq: u64, ok: bool) {
        let Some(f) = self.map.get_mut(&fwd.host) else { return };
        if f.generation != fwd.generation {
            return;
        }
        f.outstanding.remove(&seq);
        if ok {
            f.acked_seq = f.acked_seq.max(seq);
        } else {
            self.last_generation += 1;
            f.break_copy(self.last_generation);
        }
    }

    /// `host`'s copy has a hole (a resync failed).
    pub fn mark_broken(&mut self, host: NodeId) {
        let generation = self.generation();
        if let Some(f) = self.map.get_mut(&host) {
            f.break_copy(generation);
        }
    }

    /// The primary's history changed below its newest point (a rollback to `seq`): no follower
    /// holds this history any more, so every one breaks and will be resynced.
    pub fn history_rewritten(&mut self, seq: u64) {
        for host in self.hosts() {
            self.mark_broken(host);
            if let Some(f) = self.map.get_mut(&host) {
                f.acked_seq = f.acked_seq.min(seq);
                f.resync = None;
            }
        }
    }

    /// The followers whose copy is a whole prefix of this primary's history: async copies that
    /// are not broken and not mid-resync. Only these may take a snapshot: a snapshot on a copy
    /// with a hole (or one still being filled by a resync) would later pass for a common point
    /// and a resync from it would skip what the hole lacks.
    pub fn whole_copies(&self) -> Vec<NodeId> {
        self.map
            .iter()
            .filter(|(_, f)| f.is_async() && !f.broken && f.resync.as_ref().is_none_or(|r| r.done))
            .map(|(h, _)| *h)
            .collect()
    }

    /// Async copies with a hole, which a resync must fill.
    pub fn broken_async(&self) -> Vec<NodeId> {
        self.map.iter().filter(|(_, f)| f.broken && f.is_async()).map(|(h, _)| *h).collect()
    }

    /// Whether `host`'s async copy holds every point up to `last` with nothing outstanding.
    pub fn caught_up(&self, host: NodeId, last: u64) -> Option<CopyState> {
        let f = self.map.get(&host)?;
        if f.broken || f.resync.as_ref().is_some_and(|r| !r.done) {
            return Some(CopyState::NeedsResync);
        }
        Some(if f.outstanding.is_empty() && f.acked_seq >= last { CopyState::CaughtUp } else { CopyState::Behind })
    }
}

/// How far an async copy is from the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyState {
    CaughtUp,
    Behind,
    NeedsResync,
}

fn new_follower(kind: FollowKind, since_seq: u64, generation: u64, broken: bool) -> Follower {
    Follower { kind, broken, since_seq, acked_seq: since_seq, outstanding: BTreeMap::new(), resync: None, generation }
}

/// A follower's progress as `replication status` reports it (`idle` names a host not fed).
pub fn progress(host: NodeId, f: Option<&Follower>, next: u64, idle: &str, now: Instant) -> ReplicaProgress {
    let Some(f) = f else {
        return ReplicaProgress {
            host,
            state: idle.into(),
            acked_seq: 0,
            lag_seq: next - 1,
            lag_bytes: 0,
            lag_ms: 0,
            resync: None,
        };
    };
    let state = match (&f.resync, f.broken, f.kind) {
        (Some(r), false, _) if !r.done => "resyncing",
        // A hole in the copy: nothing is shipped until a resync fills it.
        (_, true, FollowKind::Async { .. }) => "needs_resync",
        (_, true, FollowKind::Resync) => idle,
        (_, false, FollowKind::Async { .. }) => "async",
        (_, false, FollowKind::Resync) => "resyncing",
    };
    let oldest = f.outstanding.values().map(|(_, t)| *t).min();
    ReplicaProgress {
        host,
        state: state.into(),
        acked_seq: f.acked_seq,
        lag_seq: (next - 1).saturating_sub(f.acked_seq),
        lag_bytes: f.lag_bytes(),
        lag_ms: oldest.map_or(0, |t| now.saturating_duration_since(t).as_millis() as u64),
        resync: f.resync.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fol(f: &Followers, h: u64) -> &Follower {
        f.get(NodeId(h)).unwrap()
    }

    #[test]
    fn a_late_reply_from_before_a_rollback_does_not_advance_a_copy() {
        let now = Instant::now();
        let mut f = Followers::default();
        f.start_resync(NodeId(2), 10, ResyncProgress { done: true, ..Default::default() });
        let fwd = f.forward(11, 4096, now);
        assert_eq!(fwd.len(), 1);
        f.history_rewritten(5);
        assert!(fol(&f, 2).broken);
        f.forwarded(fwd[0], 11, true);
        assert_eq!(fol(&f, 2).acked_seq, 5, "a reply from before the rollback is ignored");
        assert_eq!(f.caught_up(NodeId(2), 5), Some(CopyState::NeedsResync));
    }

    #[test]
    fn only_whole_copies_take_snapshots() {
        let mut f = Followers::default();
        f.retain_wanted(&[NodeId(1), NodeId(2)], &[NodeId(1)], &[(NodeId(3), u64::MAX), (NodeId(4), u64::MAX)]);
        f.start_resync(NodeId(2), 5, ResyncProgress::default());
        f.start_resync(NodeId(3), 5, ResyncProgress { done: true, ..Default::default() });
        assert_eq!(f.whole_copies(), vec![NodeId(3)], "not the broken copy 4, not the replica 2 mid-resync");
        f.history_rewritten(1);
        assert!(f.whole_copies().is_empty());
    }

    #[test]
    fn an_async_copy_over_its_lag_budget_breaks() {
        let now = Instant::now();
        let mut f = Followers::default();
        f.retain_wanted(&[], &[], &[(NodeId(3), 8192)]);
        assert!(fol(&f, 3).broken, "a new async copy has a hole until resynced");
        f.start_resync(NodeId(3), 0, ResyncProgress { done: true, ..Default::default() });
        assert_eq!(f.forward(1, 4096, now).len(), 1);
        assert_eq!(f.forward(2, 4096, now).len(), 1);
        assert!(f.forward(3, 4096, now).is_empty());
        assert!(fol(&f, 3).broken);
        assert_eq!(f.broken_async(), vec![NodeId(3)]);
    }
}
