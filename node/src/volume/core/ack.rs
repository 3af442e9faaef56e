//! When a primary may acknowledge a write: the rule of synchronous replication, as a value.
//!
//! A write gets a write-order point and goes to this host's sequencer and to every other
//! in-sync replica at once. It is acknowledged only when it is applied here **and** every one of
//! those replicas applied it — or, for the ones that did not answer or refused, only after the
//! catalog has dropped them from the in-sync set (a replica that missed an acknowledged write
//! must never be promoted). If this host's own apply failed, or dropping the failed replicas
//! could not be committed, the write may still be applied somewhere that can become primary: its
//! outcome is unknown, never "not applied".
//!
//! Pure: replies are fed in by the driver (`replica::write`, and the model's primary), which
//! also carries out [`AckDecision::DropThenAck`].

use std::collections::BTreeSet;

use haven_proto::NodeId;

/// One write waiting for its acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingWrite {
    pub point: u64,
    pub epoch: u64,
    waiting: BTreeSet<NodeId>,
    failed: Vec<NodeId>,
    local: Option<bool>,
}

/// What to do with a write once every answer is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckDecision {
    /// Applied here and on every in-sync replica: acknowledge.
    Ack,
    /// Applied here, but these replicas missed it: drop them from the in-sync set (through
    /// the catalog), and acknowledge only once that is committed; if it cannot be, the outcome
    /// is unknown.
    DropThenAck(Vec<NodeId>),
    /// Not applied here: the outcome is unknown (a replica may hold it).
    Unknown,
}

impl PendingWrite {
    /// A write at `point` in `epoch`, sent to `replicas` (the in-sync set without this host).
    pub fn new(point: u64, epoch: u64, replicas: impl IntoIterator<Item = NodeId>) -> Self {
        Self { point, epoch, waiting: replicas.into_iter().collect(), failed: Vec::new(), local: None }
    }

    /// This host's sequencer applied the write (`true`) or refused it.
    pub fn local(&mut self, applied: bool) {
        self.local.get_or_insert(applied);
    }

    /// `from` answered: applied, or not (refused, or an error). Answers from hosts not waited
    /// for (late duplicates) change nothing.
    pub fn reply(&mut self, from: NodeId, applied: bool) {
        if self.waiting.remove(&from) && !applied {
            self.failed.push(from);
        }
    }

    /// The acknowledgement deadline passed: every replica still silent counts as failed, and a
    /// local apply still pending as refused.
    pub fn expire(&mut self) {
        let silent = std::mem::take(&mut self.waiting);
        self.failed.extend(silent);
        self.local.get_or_insert(false);
    }

    /// The decision, once every answer is in (`None` before).
    pub fn decision(&self) -> Option<AckDecision> {
        let local = self.local?;
        if !self.waiting.is_empty() {
            return None;
        }
        Some(match (local, self.failed.is_empty()) {
            (false, _) => AckDecision::Unknown,
            (true, true) => AckDecision::Ack,
            (true, false) => AckDecision::DropThenAck(self.failed.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(v: u64) -> NodeId {
        NodeId(v)
    }

    #[test]
    fn ack_waits_for_every_answer_and_the_local_apply() {
        let mut w = PendingWrite::new(7, 2, [n(2), n(3)]);
        assert_eq!(w.decision(), None);
        w.reply(n(2), true);
        w.local(true);
        assert_eq!(w.decision(), None, "node 3 has not answered");
        w.reply(n(3), true);
        assert_eq!(w.decision(), Some(AckDecision::Ack));
    }

    #[test]
    fn ack_a_replica_that_missed_the_write_is_dropped_first() {
        let mut w = PendingWrite::new(7, 2, [n(2), n(3)]);
        w.local(true);
        w.reply(n(2), false);
        w.reply(n(2), true); // a late duplicate changes nothing
        w.reply(n(9), false); // nor does a host not waited for
        assert_eq!(w.decision(), None);
        w.expire();
        assert_eq!(w.decision(), Some(AckDecision::DropThenAck(vec![n(2), n(3)])));
    }

    #[test]
    fn ack_a_write_not_applied_here_has_an_unknown_outcome() {
        let mut w = PendingWrite::new(7, 2, [n(2)]);
        w.reply(n(2), true);
        w.local(false);
        assert_eq!(w.decision(), Some(AckDecision::Unknown));
        let mut alone = PendingWrite::new(1, 1, []);
        alone.expire();
        assert_eq!(alone.decision(), Some(AckDecision::Unknown), "expired before the local apply");
        let mut done = PendingWrite::new(1, 1, []);
        done.local(true);
        done.expire();
        assert_eq!(done.decision(), Some(AckDecision::Ack), "expiry after the local apply changes nothing");
    }
}
