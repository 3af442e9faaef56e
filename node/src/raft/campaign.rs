//! Drives this node's elections (`raft::election`) instead of openraft's own timer: ticks the
//! timer on Raft's runtime, feeds it leader contact (accepted AppendEntries and snapshots, from
//! `service`; this node's own leadership), asks the voters for pre-votes when the timer says so,
//! and triggers openraft's election only with a majority's support. Also answers other nodes'
//! pre-votes. Thin: every decision is `election`'s; this module owns the wiring and the wire
//! format of a pre-vote (bincode inside a `RaftRpc::PreVote` envelope on the consensus
//! connection).
//!
//! A restarted member needs no grace period: while the others hear a leader they refuse its
//! pre-votes. Off (`[raft] prevote = false`, the leadership benchmark's baseline): openraft's
//! timer elects, with the rejoin grace of `node::rejoin_quietly`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use haven_proto::{ActorAddr, Body, NodeId, RaftRpc};
use openraft::ServerState;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use super::election::{is_majority, prevote_granted, Decision, ElectionTimer, LogPos, Refusal};
use super::log_store::LogStore;
use super::{decode, encode, LogId, Raft};
use crate::transport::Transport;

/// Ticks per heartbeat interval (a 15 ms heartbeat ticks every 5 ms).
const TICKS_PER_HEARTBEAT: u32 = 3;

/// A candidate's question: would you vote for me? Changes nothing on either side.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreVoteRequest {
    pub candidate: u64,
    pub last_log_id: Option<LogId>,
}

/// The answer: `Ok` = yes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreVoteReply {
    pub granted: Result<(), PreVoteRefusal>,
}

/// [`Refusal`] on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PreVoteRefusal {
    LeaderRecent,
    LogBehind,
    LogUnreadable,
}

impl From<Refusal> for PreVoteRefusal {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::LeaderRecent => Self::LeaderRecent,
            Refusal::LogBehind => Self::LogBehind,
        }
    }
}

fn pos(id: Option<&LogId>) -> LogPos {
    id.map(|l| (l.leader_id.term, l.index))
}

/// This node's election state, shared by the driver and the RPC handler. Cheap to clone.
#[derive(Clone)]
pub struct Elections {
    timer: Arc<Mutex<ElectionTimer>>,
    /// How recently a leader must have been heard from for this node to refuse a pre-vote: its
    /// openraft leader lease (the upper end of its election band), which openraft applies to
    /// real votes too.
    lease: Duration,
    tick: Duration,
    /// The last log id pre-votes compare.
    log: LogStore,
}

impl Elections {
    /// The timer for node `id`: it campaigns after its band's lease plus a timeout drawn from
    /// its band (what openraft 0.9's own timer waited), plus any stall allowance.
    /// `cfg` is this node's openraft configuration (`RaftTunables::to_openraft`: its band).
    pub fn new(cfg: &openraft::Config, log: LogStore, now: Instant) -> Self {
        let lease = Duration::from_millis(cfg.election_timeout_max);
        let timeout = rand::rng().random_range(cfg.election_timeout_min..=cfg.election_timeout_max);
        let wait = lease + Duration::from_millis(timeout);
        let heartbeat = Duration::from_millis(cfg.heartbeat_interval);
        let tick = (heartbeat / TICKS_PER_HEARTBEAT).max(Duration::from_millis(1));
        Self { timer: Arc::new(Mutex::new(ElectionTimer::new(now, wait, tick))), lease, tick, log }
    }

    /// Leader contact at `at` (an AppendEntries or snapshot chunk from the current leader).
    pub fn contact(&self, at: Instant) {
        self.timer.lock().expect("election timer lock").contact(at);
    }

    /// Answer a pre-vote from a candidate (a log this node cannot read refuses it).
    pub fn answer(&self, req: &PreVoteRequest, now: Instant) -> PreVoteReply {
        let recent = self.timer.lock().expect("election timer lock").leader_is_recent(now, self.lease);
        let granted = match self.log.last_log_id() {
            Ok(mine) => prevote_granted(recent, pos(req.last_log_id.as_ref()), pos(mine.as_ref())).map_err(Into::into),
            Err(e) => {
                tracing::warn!(error = %e, "pre-vote: cannot read the last log id; refusing");
                Err(PreVoteRefusal::LogUnreadable)
            }
        };
        debug!(candidate = req.candidate, ?granted, "pre-vote");
        PreVoteReply { granted }
    }

    /// Tick the timer until Raft shuts down; campaign when it says so and a majority supports
    /// it. Runs on Raft's runtime.
    pub async fn run(self, id: u64, raft: Raft, transport: Transport) {
        let mut ticks = tokio::time::interval(self.tick);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut metrics = raft.metrics();
        loop {
            ticks.tick().await;
            if metrics.has_changed().is_err() {
                return; // Raft is gone
            }
            let leading = metrics.borrow_and_update().state == ServerState::Leader;
            let decision = self.timer.lock().expect("election timer lock").tick(Instant::now(), leading);
            if decision != Decision::Campaign {
                continue;
            }
            // The voters only when campaigning, not on every tick.
            let voters: Vec<(u64, String)> = {
                let m = metrics.borrow();
                let membership = m.membership_config.membership();
                membership.voter_ids().filter_map(|v| membership.get_node(&v).map(|n| (v, n.addr.clone()))).collect()
            };
            if !voters.iter().any(|(v, _)| *v == id) {
                continue; // a learner never campaigns
            }
            // Whatever the outcome, the next attempt is a full wait away.
            self.contact(Instant::now());
            let Ok(last_log_id) = self.log.last_log_id() else { continue };
            let req = PreVoteRequest { candidate: id, last_log_id };
            if self.canvass(id, &voters, &req, &transport).await {
                info!(node = id, "pre-vote won; starting an election");
                metrics::counter!("haven_raft_elections_started_total").increment(1);
                if raft.trigger().elect().await.is_err() {
                    return;
                }
            }
        }
    }

    /// Ask every other voter for a pre-vote; true as soon as a majority (this node's own
    /// included) supports it, false once one cannot (a dead voter is not waited for).
    async fn canvass(&self, id: u64, voters: &[(u64, String)], req: &PreVoteRequest, transport: &Transport) -> bool {
        use futures::stream::{FuturesUnordered, StreamExt};
        let timeout = self.lease;
        let mut asks: FuturesUnordered<_> =
            voters.iter().filter(|(v, _)| *v != id).map(|(v, addr)| ask(transport, *v, addr, req, timeout)).collect();
        let (mut grants, mut refusals) = (1, 0);
        let mut won = is_majority(grants, voters.len());
        while !won && !is_majority(refusals, voters.len()) {
            let Some(reply) = asks.next().await else { break };
            match reply {
                Ok(PreVoteReply { granted: Ok(()) }) => grants += 1,
                other => {
                    debug!(node = id, reply = ?other, "pre-vote refused or unanswered");
                    refusals += 1;
                }
            }
            won = is_majority(grants, voters.len());
        }
        metrics::counter!("haven_raft_prevotes_total", "outcome" => if won { "won" } else { "lost" }).increment(1);
        if !won {
            debug!(node = id, grants, refusals, voters = voters.len(), "pre-vote lost; not campaigning");
        }
        won
    }
}

/// One pre-vote request to `target`.
async fn ask(
    transport: &Transport,
    target: u64,
    addr: &str,
    req: &PreVoteRequest,
    timeout: Duration,
) -> Result<PreVoteReply, String> {
    let addr = transport.dial_addr(NodeId(target), addr).await?;
    let payload = encode(req)?;
    let body = Body::Raft { rpc: RaftRpc::PreVote, payload };
    let reply =
        transport.request(addr, ActorAddr::node(NodeId(target)), body, 0, timeout).await.map_err(|e| e.to_string())?;
    match reply.body {
        Body::RaftReply { payload } => decode(&payload),
        Body::Error(e) => Err(e.to_string()),
        other => Err(format!("unexpected reply kind {:?}", other.kind())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RaftTunables;

    #[test]
    fn a_voter_that_hears_its_leader_refuses() {
        let now = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::new(crate::storage::Store::open(dir.path()).unwrap()).unwrap();
        let e = Elections::new(&RaftTunables::default().to_openraft(2).unwrap(), log, now);
        e.contact(now);
        let req = PreVoteRequest { candidate: 1, last_log_id: None };
        assert_eq!(e.answer(&req, now + Duration::from_millis(10)).granted, Err(PreVoteRefusal::LeaderRecent));
        assert_eq!(e.answer(&req, now + Duration::from_secs(1)).granted, Ok(()));
    }

    #[test]
    fn every_band_lease_ends_before_any_first_campaign() {
        // The stagger invariant `RaftTunables::to_openraft` keeps for openraft's timer must hold
        // for this one: the earliest campaign (node 1's wait) comes after every voter's lease,
        // so the first candidate after a leader's death is supported.
        let t = RaftTunables::default();
        let now = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::new(crate::storage::Store::open(dir.path()).unwrap()).unwrap();
        for _ in 0..100 {
            let all: Vec<Elections> =
                (1..=3).map(|id| Elections::new(&t.to_openraft(id).unwrap(), log.clone(), now)).collect();
            let waits: Vec<Duration> = all.iter().map(|e| e.timer.lock().unwrap().wait()).collect();
            let leases: Vec<Duration> = all.iter().map(|e| e.lease).collect();
            assert!(waits.iter().min() > leases.iter().max(), "waits {waits:?} leases {leases:?}");
        }
    }
}
