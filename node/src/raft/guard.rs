//! The Raft guard: checks every inbound Vote, AppendEntries and InstallSnapshot before openraft
//! sees it, and refuses one that could crash or mislead openraft.
//!
//! Owns the bounds on terms and log indexes ([`MAX_TERM`], [`MAX_LOG_INDEX`]), the rule that a
//! request's candidate or leader is the node that sent it, and the shape checks openraft asserts
//! instead of checking (consecutive entries, ordered log ids). Pure: no I/O, no clock,
//! no metrics — the caller (`service::handle_raft`) counts and answers refusals. It must not
//! decide anything Raft decides (whether a vote is granted, whether entries match).

use super::{Entry, LogId, SnapshotMeta, TypeConfig, Vote};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};

/// The highest term an inbound request may carry (2^62).
///
/// openraft adds to terms and indexes without overflow checks: a candidate's term is its vote's
/// term + 1, a log index is followed by index + 1, a replication range end is start + a count of
/// entries. With every term and index at most 2^62, any sum of three such values still fits in a
/// u64, so none of that arithmetic can overflow. The bound costs nothing real: a term is spent
/// per election, and 2^62 elections at one per millisecond take over 100 million years.
pub const MAX_TERM: u64 = 1 << 62;

/// The highest log index an inbound request may carry (2^62, for the same reason as
/// [`MAX_TERM`]: a million entries a second would take 146,000 years to reach it).
pub const MAX_LOG_INDEX: u64 = 1 << 62;

// term + 1, index + 1 and start + count of in-range values never overflow.
const _: () = assert!(MAX_TERM <= u64::MAX / 3 && MAX_LOG_INDEX <= u64::MAX / 3);

/// The largest snapshot a follower accepts to receive, in bytes (1 TiB). A chunk's offset places
/// bytes in the receiving file; without a bound a forged offset near u64::MAX makes the receiver
/// seek (or allocate) absurdly far.
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 40;

/// Why a request was refused. `reason()` is the metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    #[error("{what} has term {term}, above the ceiling {MAX_TERM}")]
    TermTooHigh { what: &'static str, term: u64 },
    #[error("{what} has index {index}, above the ceiling {MAX_LOG_INDEX}")]
    IndexTooHigh { what: &'static str, index: u64 },
    #[error("{rpc} names node {claimed} as its {role}, but was sent by node {from}")]
    NotFromSender { rpc: &'static str, role: &'static str, claimed: u64, from: u64 },
    #[error("entry {position} has index {got}, expected {expected} (entries must follow prev_log_id without gaps)")]
    EntriesNotConsecutive { position: usize, expected: u64, got: u64 },
    #[error("{what} has term {term}, above the request's own term {vote_term}")]
    TermAboveVote { what: &'static str, term: u64, vote_term: u64 },
    #[error("entry {position} has term {term}, below the previous entry's term {previous}")]
    TermsDecrease { position: usize, term: u64, previous: u64 },
    #[error("snapshot chunk ends at byte {end}, beyond the {MAX_SNAPSHOT_BYTES}-byte snapshot limit")]
    SnapshotTooLarge { end: u128 },
}

impl GuardError {
    /// Short, fixed label for `haven_raft_refused_total{reason=...}`.
    pub fn reason(&self) -> &'static str {
        match self {
            GuardError::TermTooHigh { .. } => "term_too_high",
            GuardError::IndexTooHigh { .. } => "index_too_high",
            GuardError::NotFromSender { .. } => "not_from_sender",
            GuardError::EntriesNotConsecutive { .. } => "entries_not_consecutive",
            GuardError::TermAboveVote { .. } => "term_above_vote",
            GuardError::TermsDecrease { .. } => "terms_decrease",
            GuardError::SnapshotTooLarge { .. } => "snapshot_too_large",
        }
    }
}

fn check_term(what: &'static str, term: u64) -> Result<(), GuardError> {
    if term > MAX_TERM {
        return Err(GuardError::TermTooHigh { what, term });
    }
    Ok(())
}

fn check_log_id(what: &'static str, id: Option<&LogId>, vote_term: u64) -> Result<(), GuardError> {
    let Some(id) = id else { return Ok(()) };
    check_term(what, id.leader_id.term)?;
    if id.index > MAX_LOG_INDEX {
        return Err(GuardError::IndexTooHigh { what, index: id.index });
    }
    if id.leader_id.term > vote_term {
        return Err(GuardError::TermAboveVote { what, term: id.leader_id.term, vote_term });
    }
    Ok(())
}

/// The request's vote: within the ceiling, and naming `from` as candidate / leader.
fn check_vote(rpc: &'static str, role: &'static str, vote: &Vote, from: u64) -> Result<(), GuardError> {
    check_term("vote", vote.leader_id.term)?;
    if vote.leader_id.node_id != from {
        return Err(GuardError::NotFromSender { rpc, role, claimed: vote.leader_id.node_id, from });
    }
    Ok(())
}

/// Check a Vote request from node `from`.
pub fn check_vote_request(req: &VoteRequest<u64>, from: u64) -> Result<(), GuardError> {
    check_vote("Vote", "candidate", &req.vote, from)?;
    check_log_id("last_log_id", req.last_log_id.as_ref(), req.vote.leader_id.term)
}

/// Check a pre-vote from node `from`: it names `from` as candidate, and its last log id is within
/// the ceilings.
pub fn check_prevote(candidate: u64, last_log_id: Option<&LogId>, from: u64) -> Result<(), GuardError> {
    if candidate != from {
        return Err(GuardError::NotFromSender { rpc: "PreVote", role: "candidate", claimed: candidate, from });
    }
    check_log_id("last_log_id", last_log_id, MAX_TERM)
}

/// Check an AppendEntries request from node `from`.
pub fn check_append_entries(req: &AppendEntriesRequest<TypeConfig>, from: u64) -> Result<(), GuardError> {
    let term = req.vote.leader_id.term;
    check_vote("AppendEntries", "leader", &req.vote, from)?;
    check_log_id("prev_log_id", req.prev_log_id.as_ref(), term)?;
    check_log_id("leader_commit", req.leader_commit.as_ref(), term)?;
    check_entries(req.prev_log_id.as_ref(), &req.entries, term)
}

/// Entries follow `prev` without gaps, with terms never decreasing and never above `vote_term`.
fn check_entries(prev: Option<&LogId>, entries: &[Entry], vote_term: u64) -> Result<(), GuardError> {
    // The first log index is 0 (openraft's initial membership entry).
    let first = prev.map_or(0, |p| p.index + 1);
    let mut previous_term = prev.map_or(0, |p| p.leader_id.term);
    for (expected, (position, entry)) in (first..).zip(entries.iter().enumerate()) {
        check_log_id("entry", Some(&entry.log_id), vote_term)?;
        if entry.log_id.index != expected {
            return Err(GuardError::EntriesNotConsecutive { position, expected, got: entry.log_id.index });
        }
        if entry.log_id.leader_id.term < previous_term {
            return Err(GuardError::TermsDecrease {
                position,
                term: entry.log_id.leader_id.term,
                previous: previous_term,
            });
        }
        previous_term = entry.log_id.leader_id.term;
    }
    Ok(())
}

/// Check an InstallSnapshot chunk from node `from`.
pub fn check_install_snapshot(req: &InstallSnapshotRequest<TypeConfig>, from: u64) -> Result<(), GuardError> {
    let term = req.vote.leader_id.term;
    check_vote("InstallSnapshot", "leader", &req.vote, from)?;
    check_snapshot_meta(&req.meta, term)?;
    let end = u128::from(req.offset) + req.data.len() as u128;
    if end > u128::from(MAX_SNAPSHOT_BYTES) {
        return Err(GuardError::SnapshotTooLarge { end });
    }
    Ok(())
}

fn check_snapshot_meta(meta: &SnapshotMeta, vote_term: u64) -> Result<(), GuardError> {
    check_log_id("snapshot last_log_id", meta.last_log_id.as_ref(), vote_term)?;
    check_log_id("snapshot membership log id", meta.last_membership.log_id().as_ref(), vote_term)
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_proto::CatalogCommand;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 0), index)
    }

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Normal(CatalogCommand::KvDelete { key: "k".into() }),
        }
    }

    fn vote(term: u64, node: u64, committed: bool) -> Vote {
        let mut v = Vote::new(term, node);
        v.committed = committed;
        v
    }

    fn append(term: u64, leader: u64, prev: Option<LogId>, entries: Vec<Entry>) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest { vote: vote(term, leader, true), prev_log_id: prev, leader_commit: prev, entries }
    }

    #[test]
    fn prevotes_are_bounded_and_bound_to_the_sender() {
        assert_eq!(check_prevote(2, Some(&log_id(6, 40)), 2), Ok(()));
        assert_eq!(check_prevote(2, None, 2), Ok(()));
        let err = check_prevote(3, None, 2).unwrap_err();
        assert_eq!(err, GuardError::NotFromSender { rpc: "PreVote", role: "candidate", claimed: 3, from: 2 });
        assert_eq!(check_prevote(2, Some(&log_id(u64::MAX, 1)), 2).unwrap_err().reason(), "term_too_high");
        assert_eq!(check_prevote(2, Some(&log_id(1, u64::MAX)), 2).unwrap_err().reason(), "index_too_high");
    }

    #[test]
    fn vote_requests_are_bounded_and_bound_to_the_sender() {
        let ok = VoteRequest { vote: Vote::new(7, 2), last_log_id: Some(log_id(6, 40)) };
        assert_eq!(check_vote_request(&ok, 2), Ok(()));
        let at_ceiling = VoteRequest { vote: Vote::new(MAX_TERM, 2), last_log_id: None };
        assert_eq!(check_vote_request(&at_ceiling, 2), Ok(()));

        let huge = VoteRequest { vote: Vote::new(u64::MAX, 2), last_log_id: None };
        let err = check_vote_request(&huge, 2).unwrap_err();
        assert_eq!(err.reason(), "term_too_high");
        assert!(err.to_string().contains("18446744073709551615"), "{err}");

        let forged = VoteRequest { vote: Vote::new(7, 3), last_log_id: None };
        let err = check_vote_request(&forged, 2).unwrap_err();
        assert_eq!(err, GuardError::NotFromSender { rpc: "Vote", role: "candidate", claimed: 3, from: 2 });
        assert!(err.to_string().contains("sent by node 2"), "{err}");

        let bad_last = VoteRequest { vote: Vote::new(7, 2), last_log_id: Some(log_id(6, u64::MAX)) };
        assert_eq!(check_vote_request(&bad_last, 2).unwrap_err().reason(), "index_too_high");
        let bad_last_term = VoteRequest { vote: Vote::new(7, 2), last_log_id: Some(log_id(u64::MAX, 1)) };
        assert_eq!(check_vote_request(&bad_last_term, 2).unwrap_err().reason(), "term_too_high");
    }

    #[test]
    fn append_entries_are_checked_field_by_field() {
        let good = append(5, 1, Some(log_id(4, 9)), vec![entry(4, 10), entry(5, 11)]);
        assert_eq!(check_append_entries(&good, 1), Ok(()));
        let heartbeat = append(5, 1, None, vec![]);
        assert_eq!(check_append_entries(&heartbeat, 1), Ok(()));
        let from_start = append(5, 1, None, vec![entry(0, 0), entry(1, 1)]);
        assert_eq!(check_append_entries(&from_start, 1), Ok(()));

        assert_eq!(check_append_entries(&good, 2).unwrap_err().reason(), "not_from_sender");

        let mut commit = good.clone();
        commit.leader_commit = Some(log_id(5, MAX_LOG_INDEX + 1));
        assert_eq!(check_append_entries(&commit, 1).unwrap_err().reason(), "index_too_high");

        let mut prev = good.clone();
        prev.prev_log_id = Some(log_id(6, 9));
        assert_eq!(check_append_entries(&prev, 1).unwrap_err().reason(), "term_above_vote");

        let gap = append(5, 1, Some(log_id(4, 9)), vec![entry(4, 10), entry(5, 12)]);
        let err = check_append_entries(&gap, 1).unwrap_err();
        assert_eq!(err, GuardError::EntriesNotConsecutive { position: 1, expected: 11, got: 12 });

        let back = append(5, 1, Some(log_id(4, 9)), vec![entry(5, 10), entry(4, 11)]);
        assert_eq!(check_append_entries(&back, 1).unwrap_err().reason(), "terms_decrease");

        let future = append(5, 1, Some(log_id(4, 9)), vec![entry(6, 10)]);
        assert_eq!(check_append_entries(&future, 1).unwrap_err().reason(), "term_above_vote");

        let mut huge = append(u64::MAX, 1, None, vec![]);
        huge.vote.leader_id.term = u64::MAX;
        assert_eq!(check_append_entries(&huge, 1).unwrap_err().reason(), "term_too_high");
    }

    #[test]
    fn snapshot_chunks_are_bounded() {
        let meta = SnapshotMeta {
            last_log_id: Some(log_id(5, 100)),
            last_membership: Default::default(),
            snapshot_id: "5-100-0".into(),
        };
        let req = InstallSnapshotRequest { vote: vote(5, 1, true), meta, offset: 0, data: vec![1; 16], done: false };
        assert_eq!(check_install_snapshot(&req, 1), Ok(()));
        assert_eq!(check_install_snapshot(&req, 3).unwrap_err().reason(), "not_from_sender");

        let mut far = req.clone();
        far.offset = u64::MAX - 3;
        assert_eq!(check_install_snapshot(&far, 1).unwrap_err().reason(), "snapshot_too_large");

        let mut poisoned = req.clone();
        poisoned.meta.last_log_id = Some(log_id(u64::MAX, 1));
        assert_eq!(check_install_snapshot(&poisoned, 1).unwrap_err().reason(), "term_too_high");
    }
}
