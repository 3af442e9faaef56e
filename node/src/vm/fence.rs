//! Self-fencing of cut-off hosts: a node may run guests only while it holds a [`HostLease`],
//! i.e. while it has recent contact with a Raft quorum.
//!
//! Why: a migration plan that loses its destination restores the whole group at the source from
//! the recovery snapshot. If the destination was only cut off (partitioned, or frozen by
//! SIGSTOP) rather than dead, its copies of the VMs would keep running until it could read the
//! catalog again — two running copies of one VM. With fencing, a host that lost quorum contact
//! for [`FenceTunables::fence_after_ms`] pauses every local guest and starts or resumes none, and
//! the leader's plan controller restores only once the destination can no longer hold a lease
//! (its last acknowledged contact is older than `fence_after_ms` + `clock_margin_ms`, see
//! [`remaining_wait`]).
//!
//! Where contact comes from:
//! - on the leader, openraft's `millis_since_quorum_ack` (the *sending* time of the newest
//!   AppendEntries a quorum acknowledged), read on every metrics change ([`watch_raft`]);
//! - on a follower, each AppendEntries it accepted from the current leader
//!   ([`HostLease::follower_contact`], called from the Raft RPC server path in `service.rs`),
//!   counted not at its receive time but as of the sending leader's own last quorum contact
//!   ([`contact_time`]: the frame says how long before sending that was). openraft 0.9 leaders
//!   do not step down when they lose their quorum, so counting the receive time let a deposed
//!   leader cut off with a minority keep that minority's leases alive after the new leader
//!   waited them out (issue 11, race 4). And it counts only once this node's catalog has
//!   applied everything the leader had committed when it sent that request, so a host never
//!   holds a lease on a catalog older than its contact;
//! - after a lapse, contact must be unbroken for [`FenceTunables::rejoin_after_ms`] before the
//!   lease is valid again: a process woken from SIGSTOP first reads the requests that waited in
//!   its socket buffers, sent before the catalog moved its VMs away; the fresh ones that follow
//!   carry the new commit index.
//!
//! All times are `Instant`s (monotonic). A SIGSTOP'd process wakes with an expired lease, which
//! is what we want. [`HostLease::is_valid`] is two atomic loads, for hot paths (every guest disk
//! write). The `haven_host_fenced` gauge is 1 while this host is fenced.
//!
//! This module owns the lease and its arithmetic. It must not touch guests (pausing them is
//! `vm::host`'s job), propose catalog commands, or talk to the network.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::ServerState;

use crate::config::FenceTunables;
use crate::raft::network::LeaderContact;
use crate::raft::Raft;

/// How much longer the leader must wait before a host whose last acknowledged contact was
/// `last_ack` (this leadership term's record, if any) can no longer hold a lease. Without a
/// record from this term, the host may have had contact with the previous leader until this one
/// took over (`leading_since`). Zero when the host is fenced for certain.
pub fn remaining_wait(last_ack: Option<Instant>, leading_since: Instant, now: Instant, t: &FenceTunables) -> Duration {
    crate::volume::core::lease::wait_until_lapsed(last_ack, leading_since, now, t.fenced_after_silence())
}

/// When a follower's contact through an AppendEntries received at `received` counts: as of the
/// sending leader's last quorum contact, `leader_quorum_age_ms` before it sent the request. The
/// transit time is unknown and taken as zero, which `clock_margin_ms` covers. `None` (no quorum
/// contact yet in the leader's term): it counts as no contact at all.
pub fn contact_time(received: Instant, leader_quorum_age_ms: Option<u64>) -> Option<Instant> {
    received.checked_sub(Duration::from_millis(leader_quorum_age_ms?))
}

/// A follower contact waiting for the catalog to catch up with the leader's commit index.
#[derive(Debug, Clone, Copy)]
struct PendingContact {
    at: Instant,
    leader_commit: u64,
}

/// What [`HostLease::observe`] saw change since the last call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceChange {
    Unchanged,
    /// The lease lapsed: the last quorum contact was this long ago (`None`: never).
    Lapsed {
        since_contact: Option<Duration>,
    },
    /// The lease is valid again.
    Restored,
}

/// This host's lease on running guests. Shared by the Raft RPC server (renews it), the metrics
/// watcher (renews it on the leader), the VM host (enforces it) and guest I/O paths (check it).
pub struct HostLease {
    base: Instant,
    fence_after: Duration,
    rejoin_after: Duration,
    /// Nanoseconds after `base` of the newest quorum contact, plus one; 0 = none yet.
    last_contact: AtomicU64,
    /// Same encoding: when the current unbroken run of contacts began.
    streak_start: AtomicU64,
    /// Serializes renewals (the two atomics move together); never taken by `is_valid`.
    renewing: Mutex<Option<PendingContact>>,
    /// Whether [`HostLease::observe`] last reported this host fenced.
    fenced: AtomicBool,
}

impl HostLease {
    pub fn new(t: &FenceTunables) -> Arc<Self> {
        Self::with_base(t, Instant::now())
    }

    fn with_base(t: &FenceTunables, base: Instant) -> Arc<Self> {
        metrics::gauge!("haven_host_fenced").set(1.0);
        Arc::new(Self {
            base,
            fence_after: t.fence_after(),
            rejoin_after: Duration::from_millis(t.rejoin_after_ms),
            last_contact: AtomicU64::new(0),
            streak_start: AtomicU64::new(0),
            renewing: Mutex::new(None),
            fenced: AtomicBool::new(true),
        })
    }

    fn encode(&self, t: Instant) -> u64 {
        // Contacts before `base` (a leader's ack reported just after start) count as `base`.
        (t.saturating_duration_since(self.base).as_nanos() as u64).saturating_add(1)
    }

    fn decode(&self, v: u64) -> Option<Instant> {
        (v > 0).then(|| self.base + Duration::from_nanos(v - 1))
    }

    /// Whether this host may run guests now: contact with a quorum within `fence_after`, unbroken
    /// for `rejoin_after` since the last lapse. Lock-free.
    pub fn is_valid(&self) -> bool {
        self.is_valid_at(Instant::now())
    }

    pub fn is_valid_at(&self, now: Instant) -> bool {
        // `last_contact` is stored after `streak_start` (Release), so this Acquire load sees the
        // streak that contact belongs to.
        let last = self.last_contact.load(Ordering::Acquire);
        let streak = self.streak_start.load(Ordering::Relaxed);
        let Some(last_at) = self.decode(last) else { return false };
        let held_for = Duration::from_nanos(last.saturating_sub(streak));
        now.saturating_duration_since(last_at) < self.fence_after && held_for >= self.rejoin_after
    }

    /// How long ago the last quorum contact was (`None`: never).
    pub fn since_contact(&self) -> Option<Duration> {
        self.decode(self.last_contact.load(Ordering::Acquire)).map(|t| t.elapsed())
    }

    fn renew_locked(&self, at: Instant) {
        let last = self.decode(self.last_contact.load(Ordering::Acquire));
        if last.is_some_and(|l| l >= at) {
            return;
        }
        // A contact after a lapse (or the first one) starts a new run.
        if last.is_none_or(|l| at.saturating_duration_since(l) >= self.fence_after) {
            self.streak_start.store(self.encode(at), Ordering::Relaxed);
        }
        self.last_contact.store(self.encode(at), Ordering::Release);
    }

    /// Quorum contact at `at` with a catalog that is current as of then (the leader's case).
    pub fn renew(&self, at: Instant) {
        let _guard = self.renewing.lock().expect("lease lock");
        self.renew_locked(at);
    }

    /// A follower accepted an AppendEntries received at `received`, sent when the leader's commit
    /// index was `leader_commit`; this node has applied up to `applied`. The contact counts once
    /// `applied` reaches `leader_commit` (now, or later through [`HostLease::applied`]).
    pub fn follower_contact(&self, received: Instant, leader_commit: Option<u64>, applied: Option<u64>) {
        let mut pending = self.renewing.lock().expect("lease lock");
        self.promote(&mut pending, applied);
        if leader_commit <= applied {
            self.renew_locked(received);
        } else if let (Some(leader_commit), None) = (leader_commit, *pending) {
            // Keep the oldest waiting contact: its commit index is fixed, so it is promoted as
            // soon as the catalog catches up, even while newer ones keep arriving.
            *pending = Some(PendingContact { at: received, leader_commit });
        }
    }

    /// This node's catalog has applied up to `applied`: a waiting follower contact may count.
    pub fn applied(&self, applied: Option<u64>) {
        let mut pending = self.renewing.lock().expect("lease lock");
        self.promote(&mut pending, applied);
    }

    fn promote(&self, pending: &mut Option<PendingContact>, applied: Option<u64>) {
        if let Some(p) = *pending {
            if Some(p.leader_commit) <= applied {
                self.renew_locked(p.at);
                *pending = None;
            }
        }
    }

    /// Compare the lease with what the last call saw and keep the `haven_host_fenced` gauge in
    /// step. The caller acts on a change (pausing guests, logging once).
    pub fn observe(&self) -> FenceChange {
        let valid = self.is_valid();
        let was_fenced = self.fenced.swap(!valid, Ordering::AcqRel);
        match (was_fenced, valid) {
            (false, false) => {
                metrics::gauge!("haven_host_fenced").set(1.0);
                FenceChange::Lapsed { since_contact: self.since_contact() }
            }
            (true, true) => {
                metrics::gauge!("haven_host_fenced").set(0.0);
                FenceChange::Restored
            }
            _ => FenceChange::Unchanged,
        }
    }
}

/// Renew `lease` from Raft's metrics until the node shuts down: on the leader from
/// `millis_since_quorum_ack` (openraft reports metrics on every turn of its loop, heartbeats
/// included), which also goes out with every AppendEntries through `contact`; on any node by
/// letting waiting follower contacts count once the catalog applied far enough.
pub async fn watch_raft(raft: Raft, lease: Arc<HostLease>, contact: LeaderContact) {
    let mut rx = raft.metrics();
    loop {
        {
            let m = rx.borrow_and_update();
            lease.applied(m.last_applied.map(|l| l.index));
            // Read as soon as it was reported, so `now - ms` is at most a scheduling delay later
            // than the acknowledged send time.
            let quorum_at = (m.state == ServerState::Leader)
                .then_some(m.millis_since_quorum_ack)
                .flatten()
                .and_then(|ms| Instant::now().checked_sub(Duration::from_millis(ms)));
            contact.set(quorum_at);
            if let Some(at) = quorum_at {
                lease.renew(at);
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunables() -> FenceTunables {
        FenceTunables { fence_after_ms: 4_000, clock_margin_ms: 1_000, rejoin_after_ms: 500 }
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn fence_lease_is_valid_only_within_fence_after_of_an_unbroken_run_of_contacts() {
        let t0 = Instant::now();
        let lease = HostLease::with_base(&tunables(), t0);
        assert!(!lease.is_valid_at(t0), "no contact yet");
        lease.renew(t0 + ms(10));
        assert!(!lease.is_valid_at(t0 + ms(20)), "a first contact alone does not make a run");
        for at in (100..=500).step_by(100) {
            lease.renew(t0 + ms(10 + at));
        }
        assert!(lease.is_valid_at(t0 + ms(600)));
        assert!(lease.is_valid_at(t0 + ms(510 + 3_999)));
        assert!(!lease.is_valid_at(t0 + ms(510 + 4_000)), "lapsed after fence_after without contact");
        // An older contact never moves the lease back.
        lease.renew(t0 + ms(50));
        assert!(lease.is_valid_at(t0 + ms(4_000)));
        // After a lapse (a SIGSTOP'd process waking up), contact must be unbroken for
        // rejoin_after again before the lease is valid.
        let wake = t0 + ms(20_000);
        lease.renew(wake);
        assert!(!lease.is_valid_at(wake + ms(1)));
        lease.renew(wake + ms(499));
        assert!(!lease.is_valid_at(wake + ms(500)));
        lease.renew(wake + ms(500));
        assert!(lease.is_valid_at(wake + ms(501)));
    }

    #[test]
    fn fence_follower_contact_counts_only_once_the_catalog_caught_up() {
        let t0 = Instant::now();
        let lease = HostLease::with_base(&FenceTunables { rejoin_after_ms: 0, ..tunables() }, t0);
        lease.follower_contact(t0 + ms(10), Some(7), Some(5));
        assert!(!lease.is_valid_at(t0 + ms(11)), "the catalog is behind what the leader had committed");
        // Newer contacts while behind: the oldest waiting one is kept.
        lease.follower_contact(t0 + ms(20), Some(9), Some(6));
        assert!(!lease.is_valid_at(t0 + ms(21)));
        lease.applied(Some(7));
        assert!(lease.is_valid_at(t0 + ms(21)), "promoted at its receive time once index 7 applied");
        assert!(!lease.is_valid_at(t0 + ms(10 + 4_000)), "the waiting contact at 20 ms was dropped, not renewed");
        lease.follower_contact(t0 + ms(30), None, None);
        assert!(lease.is_valid_at(t0 + ms(30 + 3_999)), "an empty log needs nothing applied");
    }

    #[test]
    fn fence_follower_contact_counts_from_the_leaders_last_quorum_contact() {
        let t0 = Instant::now() + ms(10_000);
        assert_eq!(contact_time(t0, Some(300)), Some(t0 - ms(300)));
        assert_eq!(contact_time(t0, None), None, "a leader without quorum contact renews nothing");
        // A deposed leader's heartbeats carry an ever older quorum contact: they cannot keep a
        // lease alive past fence_after from that contact.
        let lease = HostLease::with_base(&FenceTunables { rejoin_after_ms: 0, ..tunables() }, t0 - ms(10_000));
        let quorum_at = t0;
        for k in 0..100 {
            let received = t0 + ms(50 * k);
            let age = (received - quorum_at).as_millis() as u64;
            lease.follower_contact(contact_time(received, Some(age)).unwrap(), None, None);
        }
        assert!(lease.is_valid_at(t0 + ms(3_999)));
        assert!(!lease.is_valid_at(t0 + ms(4_000)), "heartbeats after the quorum contact extend nothing");
    }

    #[test]
    fn fence_observe_reports_each_change_once() {
        let t0 = Instant::now();
        let lease = HostLease::with_base(&FenceTunables { rejoin_after_ms: 0, ..tunables() }, t0);
        assert_eq!(lease.observe(), FenceChange::Unchanged, "a new lease starts fenced");
        lease.renew(Instant::now());
        assert_eq!(lease.observe(), FenceChange::Restored);
        assert_eq!(lease.observe(), FenceChange::Unchanged);
        let short = HostLease::with_base(&FenceTunables { fence_after_ms: 50, rejoin_after_ms: 0, ..tunables() }, t0);
        short.renew(Instant::now());
        assert_eq!(short.observe(), FenceChange::Restored);
        std::thread::sleep(ms(60));
        assert!(matches!(short.observe(), FenceChange::Lapsed { since_contact: Some(d) } if d >= ms(50)));
        assert_eq!(short.observe(), FenceChange::Unchanged);
    }

    #[test]
    fn fence_leader_waits_from_its_own_term_and_adds_the_margin() {
        let t = tunables();
        let start = Instant::now();
        let leading_since = start + ms(1_000);
        // No ack this term: from the election.
        assert_eq!(remaining_wait(None, leading_since, leading_since, &t), ms(5_000));
        // An ack from an earlier term counts as the election time.
        assert_eq!(remaining_wait(Some(start), leading_since, leading_since, &t), ms(5_000));
        // An ack this term: from the ack.
        let ack = leading_since + ms(2_000);
        assert_eq!(remaining_wait(Some(ack), leading_since, ack + ms(4_000), &t), ms(1_000));
        assert_eq!(remaining_wait(Some(ack), leading_since, ack + ms(6_000), &t), Duration::ZERO);
    }

    #[test]
    fn fence_tunables_must_outlast_elections() {
        assert!(FenceTunables::default().validate(160).is_ok());
        assert!(FenceTunables::default().validate(1_000).unwrap_err().contains("election"));
        assert!(FenceTunables::for_elections(1_000).validate(1_000).is_ok());
        assert_eq!(FenceTunables::for_elections(160), FenceTunables::default());
        let bad = FenceTunables { rejoin_after_ms: 5_000, ..FenceTunables::default() };
        assert!(bad.validate(160).unwrap_err().contains("rejoin_after_ms"));
    }
}
