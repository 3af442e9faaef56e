//! When a follower may campaign, and whether to support a peer that wants to: Haven's election
//! timer with pre-vote and a stall allowance. Pure: no I/O, no clock (every instant is passed
//! in), no locks; `raft::campaign` drives it.
//!
//! openraft 0.9's own timer starts an election when the last heartbeat it *processed* is older
//! than its wait, and it has no pre-vote. On a loaded 2-core machine both go wrong:
//! - **Stalls.** When the whole machine stalls (page reclaim, writeback, a noisy neighbour; we
//!   measured 60–130 ms pauses of every thread of every node at once while `fio` wrote to a
//!   volume), a follower's first tick after the pause sees a heartbeat gap longer than its wait
//!   although the leader was never gone, and campaigns. [`ElectionTimer`] counts the time its own
//!   ticks arrived late as *stalled* and adds it to the wait: a pause that stopped this node's
//!   clock also stopped it from hearing the leader, so it is not evidence against the leader.
//! - **Disruption.** A candidate raises its term before asking for votes; even when every voter
//!   refuses it (they still hear the leader), its higher term later makes the leader step down.
//!   With pre-vote ([`prevote_granted`]) a node first asks the voters whether they would vote
//!   for it, without changing any term, and campaigns only with a majority's support: a voter
//!   supports it only if it has not heard from a leader for its own wait either (and is not a
//!   leader in contact with a quorum), and the candidate's log is at least as up to date.
//!
//! A real failure is not delayed: when the leader dies, no tick is late, and the wait is what
//! openraft's was (lease + election timeout of the node's band, `RaftTunables::to_openraft`).
//!
//! **Invariant:** the stall allowance is bounded ([`MAX_STALL_ALLOWANCE_FACTOR`] waits), so a
//! node whose ticks are always late still campaigns eventually.

use std::time::{Duration, Instant};

/// The stall allowance never exceeds this many waits.
pub const MAX_STALL_ALLOWANCE_FACTOR: u32 = 4;

/// What a follower's timer says at a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Keep following (or keep quiet).
    Wait,
    /// No leader contact for the wait (plus stall allowance): ask the voters for pre-votes.
    Campaign,
}

/// A follower's election timer.
#[derive(Debug, Clone)]
pub struct ElectionTimer {
    /// How long without leader contact before campaigning (lease + election timeout).
    wait: Duration,
    /// How often the driver ticks; a tick later than this by more than `tick` counts as stall.
    tick: Duration,
    /// The last leader contact, or when the timer (re)started.
    contact: Instant,
    /// Time this node's ticks were late since `contact`.
    stalled: Duration,
    last_tick: Instant,
}

impl ElectionTimer {
    pub fn new(now: Instant, wait: Duration, tick: Duration) -> Self {
        assert!(tick > Duration::ZERO && wait > tick, "an election wait of {wait:?} needs ticks shorter than it");
        Self { wait, tick, contact: now, stalled: Duration::ZERO, last_tick: now }
    }

    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// An AppendEntries from the current leader (or this node's own leadership) at `at`.
    pub fn contact(&mut self, at: Instant) {
        if at >= self.contact {
            self.contact = at;
            self.stalled = Duration::ZERO;
        }
    }

    /// The deadline after which this node would campaign.
    pub fn deadline(&self) -> Instant {
        self.contact + self.wait + self.stalled
    }

    /// A tick at `now`; `leading` = this node is the leader (its own contact).
    pub fn tick(&mut self, now: Instant, leading: bool) -> Decision {
        let late = now.saturating_duration_since(self.last_tick).saturating_sub(self.tick);
        self.last_tick = self.last_tick.max(now);
        if late > self.tick {
            // Bounded, so ticks that are always late cannot hold off a campaign for ever.
            self.stalled = (self.stalled + late).min(self.wait * MAX_STALL_ALLOWANCE_FACTOR);
        }
        if leading {
            self.contact(now);
            return Decision::Wait;
        }
        if now >= self.deadline() {
            Decision::Campaign
        } else {
            Decision::Wait
        }
    }

    /// Whether this node has heard from a leader within `lease` (stall allowance included): if
    /// so it must not support a candidate.
    pub fn leader_is_recent(&self, now: Instant, lease: Duration) -> bool {
        now < self.contact + lease + self.stalled
    }
}

/// A log position as pre-vote compares it: (term, index) of the last entry.
pub type LogPos = Option<(u64, u64)>;

/// Why a voter refused a pre-vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It heard from a leader within its lease (or is a leader in contact with a quorum).
    LeaderRecent,
    /// The candidate's log is behind the voter's: it could not win a vote.
    LogBehind,
}

/// The voter's answer to a pre-vote from a candidate whose last log entry is `candidate_log`.
pub fn prevote_granted(leader_recent: bool, candidate_log: LogPos, my_log: LogPos) -> Result<(), Refusal> {
    if leader_recent {
        return Err(Refusal::LeaderRecent);
    }
    if candidate_log < my_log {
        return Err(Refusal::LogBehind);
    }
    Ok(())
}

/// Whether `grants` pre-votes (the candidate's own included) are a majority of `voters`.
pub fn is_majority(grants: usize, voters: usize) -> bool {
    grants * 2 > voters
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const MS: Duration = Duration::from_millis(1);

    fn timer(t0: Instant) -> ElectionTimer {
        ElectionTimer::new(t0, 175 * MS, 5 * MS)
    }

    /// Tick every `tick` from `from` until `until`; the first instant a campaign is asked for.
    fn run(t: &mut ElectionTimer, from: Instant, until: Instant, tick: Duration) -> Option<Instant> {
        let mut now = from;
        while now <= until {
            if t.tick(now, false) == Decision::Campaign {
                return Some(now);
            }
            now += tick;
        }
        None
    }

    #[test]
    fn a_silent_leader_is_replaced_after_the_wait() {
        let t0 = Instant::now();
        let mut t = timer(t0);
        t.contact(t0);
        let at = run(&mut t, t0 + 5 * MS, t0 + 1000 * MS, 5 * MS).expect("campaigns");
        assert_eq!(at, t0 + 175 * MS);
    }

    #[test]
    fn heartbeats_keep_it_quiet() {
        let t0 = Instant::now();
        let mut t = timer(t0);
        let mut now = t0;
        for _ in 0..1000 {
            now += 5 * MS;
            if (now - t0).as_millis().is_multiple_of(15) {
                t.contact(now);
            }
            assert_eq!(t.tick(now, false), Decision::Wait);
        }
    }

    #[test]
    fn a_machine_stall_is_not_held_against_the_leader() {
        // Heartbeats every 15 ms until t0; then the whole machine pauses 300 ms (no ticks, no
        // heartbeats processed), then the first tick comes before the next heartbeat.
        let t0 = Instant::now();
        let mut t = timer(t0);
        t.contact(t0);
        assert_eq!(t.tick(t0 + 5 * MS, false), Decision::Wait);
        let after = t0 + 305 * MS;
        assert_eq!(t.tick(after, false), Decision::Wait, "the pause was local");
        t.contact(after + 10 * MS); // the leader's next heartbeat
        assert_eq!(t.tick(after + 15 * MS, false), Decision::Wait);
    }

    #[test]
    fn the_stall_allowance_is_bounded() {
        let t0 = Instant::now();
        let mut t = timer(t0);
        // Every tick 100 ms late, for ever: still campaigns, within (1 + factor) waits + a tick.
        let at = run(&mut t, t0 + 105 * MS, t0 + 5000 * MS, 105 * MS).expect("campaigns");
        assert!(at <= t0 + t.wait() * (1 + MAX_STALL_ALLOWANCE_FACTOR) + 105 * MS, "{:?}", at - t0);
    }

    #[test]
    fn a_leader_never_campaigns_and_counts_as_contact() {
        let t0 = Instant::now();
        let mut t = timer(t0);
        assert_eq!(t.tick(t0 + 500 * MS, true), Decision::Wait);
        assert!(t.leader_is_recent(t0 + 501 * MS, 100 * MS));
    }

    #[test]
    fn prevote_rules() {
        assert_eq!(prevote_granted(true, Some((3, 10)), Some((3, 9))), Err(Refusal::LeaderRecent));
        assert_eq!(prevote_granted(false, Some((3, 8)), Some((3, 9))), Err(Refusal::LogBehind));
        assert_eq!(prevote_granted(false, Some((2, 50)), Some((3, 1))), Err(Refusal::LogBehind));
        assert_eq!(prevote_granted(false, Some((3, 9)), Some((3, 9))), Ok(()));
        assert_eq!(prevote_granted(false, Some((4, 1)), Some((3, 9))), Ok(()));
        assert_eq!(prevote_granted(false, None, None), Ok(()));
        assert!(is_majority(2, 3) && !is_majority(1, 3) && is_majority(3, 5) && !is_majority(2, 4));
    }

    /// Seeded schedules: a leader heartbeats every 15 ms, sometimes the machine pauses (all
    /// nodes: ticks and heartbeats stop together, for up to 2.5 waits), sometimes the leader
    /// dies. Pre-vote followers never campaign while the leader lives, and campaign within
    /// wait + stall allowance + one tick after it dies. Replay: `HAVEN_ELECTION_SEED=N`.
    #[test]
    fn seeded_schedules_campaign_only_for_a_dead_leader() {
        let seeds: u64 = std::env::var("HAVEN_ELECTION_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2000);
        let only: Option<u64> = std::env::var("HAVEN_ELECTION_SEED").ok().and_then(|s| s.parse().ok());
        for seed in only.map_or(0..seeds, |s| s..s + 1) {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let t0 = Instant::now();
            let tick = 5 * MS;
            let mut t = ElectionTimer::new(t0, Duration::from_millis(rng.random_range(100..400)), tick);
            let death = t0 + Duration::from_millis(rng.random_range(200..5000));
            let mut now = t0;
            let mut next_heartbeat = t0;
            let mut campaigned = None;
            while now < death + 10 * t.wait() && campaigned.is_none() {
                let step = if rng.random_ratio(1, 200) {
                    Duration::from_millis(rng.random_range(10..(t.wait().as_millis() as u64 * 5 / 2)))
                } else {
                    tick
                };
                now += step;
                // After a pause the leader's overdue heartbeat is delivered within one interval.
                if now < death && now >= next_heartbeat {
                    let delivered = now + Duration::from_millis(rng.random_range(0..15));
                    if t.tick(now, false) == Decision::Campaign {
                        campaigned = Some(now);
                        break;
                    }
                    now = delivered;
                    t.contact(now);
                    next_heartbeat = now + 15 * MS;
                    continue;
                }
                if t.tick(now, false) == Decision::Campaign {
                    campaigned = Some(now);
                }
            }
            let at = campaigned.unwrap_or_else(|| panic!("seed {seed}: never campaigned after the leader died"));
            assert!(at >= death, "seed {seed}: campaigned {:?} before the leader died", death - at);
        }
    }
}
