//! Read leases: how long a host may serve reads of a volume from its own copy without asking
//! anyone, and how long the leader must wait before it may take that right away (fail the
//! volume over, or drop the host from the in-sync set).
//!
//! Why: writes need every in-sync replica, so a primary cut off from the cluster cannot
//! acknowledge one; reads need nobody, so without a lease a cut-off primary keeps answering them
//! from a copy a new primary has since overwritten (issue 11, race 4). The same holds for any
//! in-sync replica serving reads where the data is (issue 13).
//!
//! Who may serve reads: the primary, and every other replica the catalog lists **in sync**. An
//! in-sync replica has applied every acknowledged write: the primary acknowledges only once
//! every in-sync replica applied it (`core::ack`), replicas apply in write order (`sequencer`),
//! and a replica rejoins the set only through a resync that brings it every write. The danger
//! is a replica that left the set (the primary dropped it, then acknowledged writes it never
//! saw) or is cut off and does not know it. Hence:
//!
//! - the host asks the leader at `asked_at` (its clock); the leader notes when the request
//!   arrived (its clock, [`Grants::record`]) *before* it confirms with a quorum that it still
//!   leads, then answers with the volumes its catalog lists the host in sync for (primary or
//!   not), and at which epoch, leaving out the ones it is revoking ([`Grants::may_grant`]);
//! - the host may serve reads of volume V at epoch E until `asked_at + duration`
//!   ([`ReadLease::granted`]), and only while the newest epoch it knows of V is that same E (a
//!   replica that applied a write of a newer epoch asks again first);
//! - **a change that removes a host from V's in-sync set waits the host's lease out before it
//!   commits** ([`Grants::revoke`]): from the moment the leader starts it, it grants the host
//!   nothing on V at that epoch or older, and it commits only once the host's newest request
//!   from before then (or this leader's election) is `duration` plus a clock margin old. A
//!   request arrives after it was sent, so the host's lease has ended first. Only then can the
//!   primary acknowledge a write the host missed (`replica::drop_in_sync` returns after the
//!   commit). Every path that shrinks the set goes through it: dropping a replica that missed
//!   a write, a takeover or rollback whose replicas refuse, a failover, a reversal
//!   ([`removed_from_in_sync`]). Changes that keep a host in the set need no wait: it goes on
//!   receiving every write before it is acknowledged.
//! - A leader without a record of the host (it was elected since) counts from its election: a
//!   grant by an earlier leader was confirmed by a quorum before that quorum voted for this one.
//!
//! Pure: instants are passed in. The drivers are `volume::host` (asks, and hands grants to each
//! replica), `cluster::Proposer` (records, grants, revokes before committing a shrink) and the
//! leader's `controllers::volumes` (waits before a failover).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use haven_proto::volume::{VolumeCommand, VolumeRecord};
use haven_proto::{NodeId, VolumeId};

/// A host's read lease on one volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadLease {
    /// `(epoch, until)`: reads at `epoch` may be served before `until`.
    held: Option<(u64, Instant)>,
}

impl ReadLease {
    /// The leader listed this host in sync at `epoch` in answer to a request sent at `asked_at`.
    pub fn granted(&mut self, epoch: u64, asked_at: Instant, duration: Duration) {
        let until = asked_at + duration;
        self.held = match self.held {
            // A late answer to an older request never shortens a newer grant at the same epoch.
            Some((e, old)) if e == epoch && old >= until => Some((e, old)),
            Some((e, _)) if e > epoch => self.held,
            _ => Some((epoch, until)),
        };
    }

    /// Whether reads at `epoch` (the newest epoch the replica knows) may be served at `now`.
    pub fn valid(&self, epoch: u64, now: Instant) -> bool {
        self.held.is_some_and(|(e, until)| e == epoch && now < until)
    }
}

/// The leader's record of when each host last asked for read leases, by the leader's clock, and
/// of the leases it is taking away.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    asked: BTreeMap<NodeId, Instant>,
    revoked: BTreeMap<(NodeId, VolumeId), Revocation>,
}

/// The leader grants `host` nothing on the volume at `epoch` or older; the host can hold no such
/// lease from `until` on (computed when the revocation began, under `leading_since`).
#[derive(Debug, Clone, Copy)]
struct Revocation {
    epoch: u64,
    leading_since: Instant,
    until: Instant,
}

impl Grants {
    /// A lease request from `host` arrived at `received` (noted before leadership is confirmed).
    pub fn record(&mut self, host: NodeId, received: Instant) {
        let at = self.asked.entry(host).or_insert(received);
        *at = (*at).max(received);
    }

    /// How much longer before `host` can hold no read lease, for a leader in office since
    /// `leading_since`; `lapse_after` is the lease duration plus the clock margin.
    pub fn wait(&self, host: NodeId, leading_since: Instant, now: Instant, lapse_after: Duration) -> Duration {
        wait_until_lapsed(self.asked.get(&host).copied(), leading_since, now, lapse_after)
    }

    /// Start (or continue) taking `host`'s read lease on `volume` at `epoch` and older away:
    /// from now on [`Self::may_grant`] refuses it, and the returned wait is how long before the
    /// host can hold no such lease. The wait is fixed when the revocation begins (requests that
    /// arrive later cannot be granted it), so a host that keeps asking cannot hold it off;
    /// it starts over under a new term of this leader, which may not know what others granted.
    pub fn revoke(
        &mut self,
        host: NodeId,
        volume: VolumeId,
        epoch: u64,
        leading_since: Instant,
        now: Instant,
        lapse_after: Duration,
    ) -> Duration {
        let old = self.revoked.get(&(host, volume)).copied();
        if let Some(r) = old.filter(|r| r.epoch >= epoch && r.leading_since == leading_since) {
            return r.until.saturating_duration_since(now);
        }
        let wait = self.wait(host, leading_since, now, lapse_after);
        let epoch = old.map_or(epoch, |r| r.epoch.max(epoch));
        self.revoked.insert((host, volume), Revocation { epoch, leading_since, until: now + wait });
        wait
    }

    /// Whether `host` may be granted a read lease on `volume` at `epoch` (not being revoked).
    pub fn may_grant(&self, host: NodeId, volume: VolumeId, epoch: u64) -> bool {
        self.revoked.get(&(host, volume)).is_none_or(|r| epoch > r.epoch)
    }
}

/// A command that may take hosts out of a volume's in-sync set: the volume (or the relationship
/// naming it), the epoch its compare-and-set expects, and the set it leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InSyncChange {
    /// `SetReplication`: the new set is given.
    Set { volume: VolumeId, expected_epoch: u64, in_sync: Vec<NodeId> },
    /// `ReverseRelationship`: the relationship's target becomes the only replica.
    Reverse { relationship: u64, expected_epoch: u64 },
}

/// The in-sync change `cmd` makes, if it can make one (the catalog's apply is the reference).
pub fn in_sync_change(cmd: &VolumeCommand) -> Option<InSyncChange> {
    match cmd {
        VolumeCommand::SetReplication { volume, expected_epoch, in_sync, .. } => {
            Some(InSyncChange::Set { volume: *volume, expected_epoch: *expected_epoch, in_sync: in_sync.clone() })
        }
        VolumeCommand::ReverseRelationship { id, expected_epoch } => {
            Some(InSyncChange::Reverse { relationship: *id, expected_epoch: *expected_epoch })
        }
        _ => None,
    }
}

/// The hosts `record`'s in-sync set loses to a change that expects `expected_epoch` and leaves
/// `after`. None when the record is at another epoch: the compare-and-set refuses the change.
pub fn removed_from_in_sync(record: &VolumeRecord, expected_epoch: u64, after: &[NodeId]) -> Vec<NodeId> {
    if record.epoch != expected_epoch {
        return Vec::new();
    }
    record.in_sync.iter().copied().filter(|h| !after.contains(h)).collect()
}

/// How long until a lease last renewed at `last` (by this leader's clock; `None`: not in this
/// term) has lapsed for certain, `lapse_after` after its renewal. Without a renewal in this
/// leader's term the holder may have renewed with the previous leader up to this one's election.
pub fn wait_until_lapsed(
    last: Option<Instant>,
    leading_since: Instant,
    now: Instant,
    lapse_after: Duration,
) -> Duration {
    let reference = last.map_or(leading_since, |a| a.max(leading_since));
    (reference + lapse_after).saturating_duration_since(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn read_lease_holds_for_its_epoch_until_asked_at_plus_duration() {
        let t0 = Instant::now();
        let mut l = ReadLease::default();
        assert!(!l.valid(3, t0), "no grant yet");
        l.granted(3, t0, ms(500));
        assert!(l.valid(3, t0 + ms(499)));
        assert!(!l.valid(3, t0 + ms(500)), "ends at asked_at + duration, not at the answer");
        assert!(!l.valid(4, t0 + ms(1)), "a grant is for one epoch");
        // A late answer to an older request does not shorten the lease.
        l.granted(3, t0 + ms(300), ms(500));
        l.granted(3, t0 + ms(100), ms(500));
        assert!(l.valid(3, t0 + ms(799)));
        // A newer epoch replaces it; an older one never comes back.
        l.granted(4, t0 + ms(400), ms(500));
        assert!(!l.valid(3, t0 + ms(401)) && l.valid(4, t0 + ms(401)));
        l.granted(3, t0 + ms(450), ms(500));
        assert!(l.valid(4, t0 + ms(899)) && !l.valid(3, t0 + ms(451)));
    }

    #[test]
    fn read_lease_leader_waits_from_the_newest_request_or_its_election() {
        let t0 = Instant::now();
        let mut g = Grants::default();
        let lapse = ms(700);
        // Unknown host: from the election.
        assert_eq!(g.wait(NodeId(2), t0 + ms(100), t0 + ms(100), lapse), ms(700));
        g.record(NodeId(2), t0 + ms(300));
        g.record(NodeId(2), t0 + ms(200));
        assert_eq!(g.wait(NodeId(2), t0 + ms(100), t0 + ms(400), lapse), ms(600), "from the newest request");
        assert_eq!(g.wait(NodeId(2), t0 + ms(100), t0 + ms(1_000), lapse), Duration::ZERO);
        // A request seen before this leader's election counts as the election.
        assert_eq!(g.wait(NodeId(2), t0 + ms(500), t0 + ms(500), lapse), ms(700));
    }

    #[test]
    fn read_lease_revocation_fixes_its_wait_and_blocks_grants_up_to_its_epoch() {
        let t0 = Instant::now();
        let (h, v, lapse) = (NodeId(2), VolumeId(7), ms(700));
        let mut g = Grants::default();
        g.record(h, t0 + ms(100));
        assert!(g.may_grant(h, v, 5));
        assert_eq!(g.revoke(h, v, 5, t0, t0 + ms(200), lapse), ms(600), "from the newest request");
        assert!(!g.may_grant(h, v, 5) && !g.may_grant(h, v, 4), "nothing at the revoked epoch or older");
        assert!(g.may_grant(h, v, 6) && g.may_grant(h, VolumeId(8), 5), "newer epochs and other volumes");
        // The host keeps asking: its requests cannot be granted the lease, so the wait holds.
        g.record(h, t0 + ms(300));
        assert_eq!(g.revoke(h, v, 5, t0, t0 + ms(400), lapse), ms(400));
        assert_eq!(g.revoke(h, v, 4, t0, t0 + ms(900), lapse), Duration::ZERO, "an older epoch is covered");
        // A newer epoch starts over from the requests seen so far.
        assert_eq!(g.revoke(h, v, 6, t0, t0 + ms(900), lapse), ms(100));
        assert!(!g.may_grant(h, v, 6));
        // Under a new term of this leader the wait starts over from its election.
        assert_eq!(g.revoke(h, v, 6, t0 + ms(1_000), t0 + ms(1_000), lapse), ms(700));
        assert!(!g.may_grant(h, v, 6) && g.may_grant(h, v, 7));
    }

    #[test]
    fn in_sync_changes_name_the_hosts_they_remove() {
        let rec = VolumeRecord {
            id: VolumeId(1),
            name: "v".into(),
            size_bytes: 4096,
            block_size: 4096,
            replicas: vec![NodeId(1), NodeId(2), NodeId(3)],
            primary: NodeId(1),
            in_sync: vec![NodeId(1), NodeId(2), NodeId(3)],
            epoch: 4,
            cloned_from: None,
        };
        let set = VolumeCommand::SetReplication {
            volume: VolumeId(1),
            expected_epoch: 4,
            primary: NodeId(2),
            in_sync: vec![NodeId(2), NodeId(3)],
        };
        let Some(InSyncChange::Set { expected_epoch, in_sync, .. }) = in_sync_change(&set) else { panic!() };
        assert_eq!(removed_from_in_sync(&rec, expected_epoch, &in_sync), vec![NodeId(1)]);
        assert!(removed_from_in_sync(&rec, 3, &in_sync).is_empty(), "refused by the compare-and-set");
        let rev = VolumeCommand::ReverseRelationship { id: 9, expected_epoch: 4 };
        assert_eq!(in_sync_change(&rev), Some(InSyncChange::Reverse { relationship: 9, expected_epoch: 4 }));
        assert!(in_sync_change(&VolumeCommand::Resize { volume: VolumeId(1), size_bytes: 8192 }).is_none());
    }
}
