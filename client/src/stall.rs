//! Stalled requests: when to stop waiting on the node a request was sent to.
//!
//! A leader that dies without a word (kill -9, a lost host, SIGSTOP) leaves the client's cached
//! QUIC connection looking open until QUIC's idle timeout, and a request sent on it just waits.
//! Raft elects a new leader sooner than that. So once a request has gone unanswered for
//! [`StallPolicy::stall_after`], [`crate::HavenClient`] asks the members who leads (the local
//! `Status` every node answers without forwarding) and asks the stalled node itself over the same
//! connection. [`StallWatch`] turns those answers into a verdict: give up on the stalled node only
//! when another member is shown to lead in a term newer than the one the stalled node was serving
//! in, and the stalled node has either stopped answering or was that older term's leader (a
//! deposed leader cannot finish a leader-only request). A slow but live cluster never produces
//! that proof, and a live node that was not the leader (a follower forwarding, a volume's
//! primary) is left to answer for itself, so a slow request is not abandoned.
//!
//! Giving up never means re-sending: what the caller does with a request that may have been
//! applied is decided by `client.rs` (`Indeterminate` for a write). This module is pure: no I/O,
//! no clock (times are passed in).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use haven_proto::{NodeId, NodeRole, NodeStatus};

/// How the client watches a request that gets no reply. Every field is a bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StallPolicy {
    /// A request unanswered this long is stalled and the probes start. Well under QUIC's 1 s
    /// idle timeout (`wire::transport_config`) and under a typical Raft election, so a new
    /// leader is seen as soon as it is elected; a false alarm costs only a few `Status` requests.
    pub stall_after: Duration,
    /// Pause between probe rounds (one `Status` per member per round at most).
    pub probe_interval: Duration,
    /// Longest one `Status` probe may take; an unanswered probe of the stalled node counts as
    /// silence. A node answers `Status` locally (no disk, no Raft), so on loopback or a LAN this
    /// is ample; when nobody has named the stalled node leader yet (the followers already lost
    /// its heartbeats), its silence is what lets the client move, so this bounds that wait.
    pub probe_timeout: Duration,
    /// Probe rounds per stalled request; after them the request just waits out its own timeout.
    /// 0 disables stall probing.
    pub max_probe_rounds: u32,
    /// Members asked per round besides the stalled node.
    pub max_probe_peers: usize,
    /// `Status` probes in flight at once across every request of one client (and its clones),
    /// so a burst of stalled requests cannot flood the survivors.
    pub max_probes_in_flight: usize,
}

impl Default for StallPolicy {
    fn default() -> Self {
        Self {
            stall_after: Duration::from_millis(150),
            probe_interval: Duration::from_millis(50),
            probe_timeout: Duration::from_millis(150),
            // 60 x 50 ms = 3 s of probing, inside the client's 5 s attempt timeout.
            max_probe_rounds: 60,
            max_probe_peers: 8,
            max_probes_in_flight: 32,
        }
    }
}

impl StallPolicy {
    /// Never probe: a stalled request waits for its reply, QUIC's idle timeout or its deadline.
    pub fn disabled() -> Self {
        Self { max_probe_rounds: 0, ..Self::default() }
    }

    pub fn is_enabled(&self) -> bool {
        self.max_probe_rounds > 0
    }
}

/// What one member (not the stalled node) said about who leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderReport {
    pub term: u64,
    /// The leader it names and that leader's address, when it names one it can place.
    pub leader: Option<(NodeId, SocketAddr)>,
    /// The member reporting is that leader itself (its own role is `Leader`).
    pub self_reported: bool,
}

impl LeaderReport {
    /// Read a node's status. A leader whose address is missing from the membership (or does not
    /// parse) cannot be routed to, so it is reported as no leader.
    pub fn from_status(status: &NodeStatus) -> Self {
        let leader = status.leader.and_then(|id| {
            let member = status.members.iter().find(|m| m.id == id)?;
            Some((id, member.addr.parse().ok()?))
        });
        let self_reported = status.role == NodeRole::Leader && status.leader == Some(status.id);
        Self { term: status.term, leader, self_reported }
    }
}

/// The proof that the stalled node no longer serves the request: `leader` leads in `term`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    pub leader_id: NodeId,
    pub leader: SocketAddr,
    pub term: u64,
}

/// The state of one stalled request: when to probe next and what the answers prove.
#[derive(Debug, Clone)]
pub struct StallWatch {
    stalled: SocketAddr,
    /// When the first probe round is due (`sent + stall_after`).
    first_round_at: Instant,
    interval: Duration,
    rounds_done: u32,
    max_rounds: u32,
    /// The term the stalled node gave in its first answer to a probe (it was alive then, and
    /// serving the request in that term or an older one).
    own_term: Option<u64>,
    /// The stalled node said it was the leader, or another member named it leader.
    was_leader: bool,
    /// The newest term in which another member named the stalled node as leader.
    led_term: Option<u64>,
    /// The last probe of the stalled node went unanswered.
    silent: bool,
    /// The newest report naming a leader other than the stalled node.
    newest_other: Option<(Moved, bool)>,
}

impl StallWatch {
    /// Watch a request sent to `stalled` at `sent`.
    pub fn new(stalled: SocketAddr, sent: Instant, policy: &StallPolicy) -> Self {
        Self {
            stalled,
            first_round_at: sent + policy.stall_after,
            interval: policy.probe_interval,
            rounds_done: 0,
            max_rounds: policy.max_probe_rounds,
            own_term: None,
            was_leader: false,
            led_term: None,
            silent: false,
            newest_other: None,
        }
    }

    /// When the next probe round is due; `None` once every round allowed has been started.
    pub fn next_round_at(&self) -> Option<Instant> {
        (self.rounds_done < self.max_rounds).then(|| self.first_round_at + self.interval * self.rounds_done)
    }

    /// Count a probe round as started.
    pub fn round_started(&mut self) {
        self.rounds_done = self.rounds_done.saturating_add(1);
    }

    pub fn rounds_done(&self) -> u32 {
        self.rounds_done
    }

    /// The stalled node answered a `Status` probe: it is alive, in `term`, and `leads` or not.
    /// Only its first answer sets the baseline: a later one may already be in the new term whose
    /// leader would prove the move.
    pub fn stalled_answered(&mut self, term: u64, leads: bool) {
        self.own_term.get_or_insert(term);
        self.was_leader |= leads;
        self.silent = false;
    }

    /// A `Status` probe of the stalled node failed or timed out.
    pub fn stalled_silent(&mut self) {
        self.silent = true;
    }

    /// Whether the stalled node's last probe went unanswered: its connection, not only the
    /// request, is then in doubt.
    pub fn stalled_is_silent(&self) -> bool {
        self.silent
    }

    /// Another member's answer.
    pub fn report(&mut self, report: &LeaderReport) {
        let Some((leader_id, leader)) = report.leader else { return };
        if leader == self.stalled {
            self.led_term = self.led_term.max(Some(report.term));
            self.was_leader = true;
            return;
        }
        let moved = Moved { leader_id, leader, term: report.term };
        self.newest_other = match self.newest_other {
            // Raft has one leader per term: a second report of it may add its own word.
            Some((m, vouched)) if m == moved => Some((m, vouched || report.self_reported)),
            Some((m, vouched)) if m.term >= report.term => Some((m, vouched)),
            _ => Some((moved, report.self_reported)),
        };
    }

    /// The proof, once the answers hold one: another member leads in a term newer than any the
    /// stalled node is known to have served in, and the stalled node is silent or was the
    /// leader. When nothing ties the stalled node to a term (it never answered and nobody named
    /// it leader), it must have gone silent and the other leader must have vouched for itself.
    pub fn verdict(&self) -> Option<Moved> {
        let (moved, self_reported) = self.newest_other?;
        let newer = match self.own_term.max(self.led_term) {
            Some(baseline) => moved.term > baseline,
            None => self.silent && self_reported,
        };
        (newer && (self.silent || self.was_leader)).then_some(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 7000 + n))
    }

    fn names(leader: u16, term: u64) -> LeaderReport {
        LeaderReport { term, leader: Some((NodeId(leader as u64), addr(leader))), self_reported: false }
    }

    fn vouches(leader: u16, term: u64) -> LeaderReport {
        LeaderReport { self_reported: true, ..names(leader, term) }
    }

    fn watch() -> StallWatch {
        StallWatch::new(addr(1), Instant::now(), &StallPolicy::default())
    }

    #[test]
    fn a_dead_leader_is_left_once_another_leads_in_a_newer_term() {
        let mut w = watch();
        w.stalled_silent();
        w.report(&names(1, 5));
        assert_eq!(w.verdict(), None, "followers still name the stalled leader");
        w.report(&LeaderReport { term: 6, leader: None, self_reported: false });
        assert_eq!(w.verdict(), None, "an election without a winner proves nothing");
        w.report(&names(2, 6));
        assert_eq!(w.verdict(), Some(Moved { leader_id: NodeId(2), leader: addr(2), term: 6 }));
    }

    #[test]
    fn a_slow_but_live_node_is_not_abandoned() {
        // A follower that forwards to a live leader: everyone names leader 2 in term 5.
        let mut w = watch();
        w.stalled_answered(5, false);
        w.report(&vouches(2, 5));
        w.report(&names(2, 5));
        assert_eq!(w.verdict(), None);
    }

    #[test]
    fn a_live_follower_answers_for_itself_even_when_the_leader_changes() {
        // A follower forwarding to a leader that died, or a volume's primary busy with a request
        // that needs no leader: it still answers, so it is waited for.
        let mut w = watch();
        w.stalled_answered(5, false);
        w.report(&names(2, 5));
        w.report(&vouches(3, 6));
        assert_eq!(w.verdict(), None);
        // ... unless it stops answering too.
        w.stalled_silent();
        assert_eq!(w.verdict().map(|m| m.leader_id), Some(NodeId(3)));
    }

    #[test]
    fn a_live_but_deposed_leader_is_left() {
        // A leader cut off from its followers still answers, but cannot commit the request.
        let mut w = watch();
        w.stalled_answered(5, true);
        // Its later answers come from the new term; the first one is the baseline.
        w.stalled_answered(6, false);
        w.report(&vouches(3, 6));
        assert_eq!(w.verdict().map(|m| m.leader_id), Some(NodeId(3)));
    }

    #[test]
    fn without_a_baseline_a_silent_node_is_left_only_for_a_leader_that_vouches_for_itself() {
        let mut w = watch();
        w.report(&names(2, 6));
        assert_eq!(w.verdict(), None, "a follower's word, and the stalled node not known silent");
        w.stalled_silent();
        assert_eq!(w.verdict(), None, "still only a follower's word");
        w.report(&vouches(2, 6));
        assert_eq!(w.verdict().map(|m| m.term), Some(6));

        let mut live = watch();
        live.report(&vouches(2, 6));
        assert_eq!(live.verdict(), None, "a stalled node that has not gone silent is waited for");
    }

    #[test]
    fn silence_is_the_last_probe_s() {
        let mut w = watch();
        assert!(!w.stalled_is_silent());
        w.stalled_silent();
        w.stalled_answered(3, false);
        assert!(!w.stalled_is_silent(), "it answered after all");
        w.stalled_silent();
        assert!(w.stalled_is_silent(), "and then stopped answering");
    }

    #[test]
    fn an_older_or_equal_term_never_proves_a_move() {
        let mut w = watch();
        w.stalled_silent();
        w.report(&names(1, 7));
        w.report(&vouches(2, 7));
        w.report(&names(3, 6));
        assert_eq!(w.verdict(), None);
        // The stalled node re-elected in a newer term raises the bar again.
        w.report(&names(2, 8));
        w.report(&names(1, 8));
        assert_eq!(w.verdict(), None);
        w.report(&names(2, 9));
        assert_eq!(w.verdict().map(|m| m.term), Some(9));
    }

    #[test]
    fn an_unplaceable_leader_is_no_leader() {
        let mut status = NodeStatus {
            id: NodeId(2),
            role: NodeRole::Leader,
            term: 4,
            leader: Some(NodeId(2)),
            last_log_index: None,
            last_applied_index: None,
            members: vec![],
            healthy: true,
            version: String::new(),
        };
        assert_eq!(LeaderReport::from_status(&status).leader, None);
        status.members.push(haven_proto::MemberInfo {
            id: NodeId(2),
            addr: addr(2).to_string(),
            admin_addr: String::new(),
            voter: true,
            matched_index: None,
        });
        let report = LeaderReport::from_status(&status);
        assert_eq!(report, LeaderReport { term: 4, leader: Some((NodeId(2), addr(2))), self_reported: true });
    }

    #[test]
    fn probe_rounds_are_paced_and_bounded() {
        let sent = Instant::now();
        let policy = StallPolicy { max_probe_rounds: 3, ..StallPolicy::default() };
        let mut w = StallWatch::new(addr(1), sent, &policy);
        let mut due = Vec::new();
        while let Some(at) = w.next_round_at() {
            due.push(at - sent);
            w.round_started();
        }
        assert_eq!(due, [150, 200, 250].map(Duration::from_millis));
        assert_eq!(StallWatch::new(addr(1), sent, &StallPolicy::disabled()).next_round_at(), None);
    }
}
