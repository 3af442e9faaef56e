//! The primary's read lease: how long a host may serve reads of a volume without asking anyone,
//! and how long the leader must wait before it may fail that volume over to another host.
//!
//! Why: writes need every in-sync replica, so a primary cut off from the cluster cannot
//! acknowledge one; reads need nobody, so without a lease a cut-off primary keeps answering them
//! from a copy a new primary has since overwritten (issue 11, race 4).
//!
//! The protocol, with the host's clock and the leader's clock never compared:
//! - the host asks the leader at `asked_at` (its clock); the leader notes when the request
//!   arrived (its clock, [`Grants::record`]) *before* it confirms with a quorum that it still
//!   leads, then answers with the volumes its catalog names the host primary of, and at which
//!   epoch;
//! - the host may serve reads of volume V at epoch E until `asked_at + duration`
//!   ([`ReadLease::granted`]), and only while its own role is primary at that same epoch;
//! - the leader fails V over from the host only once [`Grants::wait`] is zero: the newest
//!   request's arrival plus `duration` plus a clock margin. A request arrives after it was sent,
//!   so the host's lease has ended first. A leader without a record of the host (it was elected
//!   since) counts from its election: a grant by an earlier leader was confirmed by a quorum
//!   before that quorum voted for this one.
//!
//! Pure: instants are passed in. The driver is `volume::host` (asks, and hands grants to each
//! replica) and the leader's `controllers::volumes` (records and waits).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use haven_proto::NodeId;

/// A host's read lease on one volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadLease {
    /// `(epoch, until)`: reads at `epoch` may be served before `until`.
    held: Option<(u64, Instant)>,
}

impl ReadLease {
    /// The leader named this host primary at `epoch` in answer to a request sent at `asked_at`.
    pub fn granted(&mut self, epoch: u64, asked_at: Instant, duration: Duration) {
        let until = asked_at + duration;
        self.held = match self.held {
            // A late answer to an older request never shortens a newer grant at the same epoch.
            Some((e, old)) if e == epoch && old >= until => Some((e, old)),
            Some((e, _)) if e > epoch => self.held,
            _ => Some((epoch, until)),
        };
    }

    /// Whether reads at `epoch` (the replica's role) may be served at `now`.
    pub fn valid(&self, epoch: u64, now: Instant) -> bool {
        self.held.is_some_and(|(e, until)| e == epoch && now < until)
    }
}

/// The leader's record of when each host last asked for read leases, by the leader's clock.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    asked: BTreeMap<NodeId, Instant>,
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
}
