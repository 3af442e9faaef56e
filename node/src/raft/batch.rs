//! Proposal batching on the leader: catalog commands proposed while earlier ones are being
//! appended travel to Raft together, as one [`CatalogCommand::Batch`] entry.
//!
//! Why: openraft 0.9 appends each client write on its own and waits, inside its core, for the
//! fsync that covers it before it appends the next, so the leader's log takes one entry per fsync
//! whatever the log store's group commit could offer (`catalog_bench` showed every leader WAL sync
//! covering exactly one entry). [`Batcher`] keeps at most [`MAX_ENTRIES_IN_FLIGHT`] entries on
//! their way through Raft; proposals that arrive meanwhile wait and go together in the next one,
//! so one fsync covers all of them. A proposal that arrives alone goes alone, as the command
//! itself (the log entry and the latency are what they were without batching).
//!
//! Durability is unchanged: a proposer is answered only when openraft reports the entry
//! committed (fsynced on a quorum) and applied, and then only with its own command's outcome.
//! The grouping ([`Limits::admits`]) is pure; a batch carries each command's encoding
//! ([`super::encode`]), so the entry type is not recursive. This module must not interpret
//! commands.

use haven_proto::catalog::MAX_BATCH_COMMANDS;
use haven_proto::{CatalogCommand, CommandOutcome};
use openraft::error::{ClientWriteError, ForwardToLeader, RaftError};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::{HavenNode, Raft};

/// Entries the batcher has handed to Raft and not yet seen committed and applied.
pub const MAX_ENTRIES_IN_FLIGHT: usize = 2;
/// Encoded bytes of the commands one batch carries at most (a quarter of an AppendEntries'
/// byte budget, `limits::APPEND_MAX_BYTES`); a larger command goes alone.
pub const MAX_BATCH_BYTES: usize = 1 << 20;

/// How big a batch may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_commands: usize,
    pub max_bytes: usize,
}

impl Limits {
    pub const DEFAULT: Limits = Limits { max_commands: MAX_BATCH_COMMANDS, max_bytes: MAX_BATCH_BYTES };

    /// Whether a batch of `commands` commands and `bytes` bytes takes one more of `next_bytes`.
    /// An empty batch takes anything (a command too large to share an entry goes alone).
    pub fn admits(&self, commands: usize, bytes: usize, next_bytes: usize) -> bool {
        commands == 0 || (commands < self.max_commands && bytes.saturating_add(next_bytes) <= self.max_bytes)
    }
}

/// A committed proposal: the index of the entry that carried it and its own outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub index: u64,
    pub outcome: CommandOutcome,
}

/// Why a proposal was not answered with its outcome.
#[derive(Debug, Clone)]
pub enum Failed {
    /// This node does not lead: nothing was appended.
    Forward(ForwardToLeader<u64, HavenNode>),
    /// Raft failed after the entry may have been appended: the outcome is unknown.
    Unknown(String),
}

type Reply = oneshot::Sender<Result<Committed, Failed>>;

struct Pending {
    command: CatalogCommand,
    /// The command's encoding, what a batch carries.
    encoded: Vec<u8>,
    reply: Reply,
}

/// Hands proposals to Raft, batching those that arrive together. Cheap to clone; the task that
/// proposes ends when the last clone is dropped.
#[derive(Clone)]
pub struct Batcher {
    queue: mpsc::UnboundedSender<Pending>,
}

impl Batcher {
    /// Start the proposing task on the current Tokio runtime.
    pub fn start(raft: Raft, limits: Limits) -> Self {
        let (queue, pending) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, limits, pending));
        Self { queue }
    }

    /// Propose `command` (already validated, never a batch) and wait until it is committed and
    /// applied, or failed.
    pub async fn propose(&self, command: CatalogCommand) -> Result<Committed, Failed> {
        // Too large to encode: it goes alone, and Raft refuses it as it always did.
        let encoded = super::encode(&command).unwrap_or_default();
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { command, encoded, reply })
            .map_err(|_| Failed::Unknown("the proposal batcher stopped".into()))?;
        answer.await.map_err(|_| Failed::Unknown("the proposal batcher dropped the proposal".into()))?
    }
}

/// Take proposals as room in flight allows, each time with every proposal waiting that fits.
async fn run(raft: Raft, limits: Limits, mut pending: mpsc::UnboundedReceiver<Pending>) {
    let in_flight = Arc::new(Semaphore::new(MAX_ENTRIES_IN_FLIGHT));
    let mut carried: Option<Pending> = None;
    loop {
        let permit = in_flight.clone().acquire_owned().await.expect("the semaphore is never closed");
        let first = match carried.take() {
            Some(p) => p,
            None => match pending.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let (mut batch, mut bytes) = (Vec::new(), first.encoded.len());
        batch.push(first);
        while let Ok(next) = pending.try_recv() {
            let next_bytes = if next.encoded.is_empty() { usize::MAX } else { next.encoded.len() };
            if !limits.admits(batch.len(), bytes, next_bytes) {
                carried = Some(next);
                break;
            }
            bytes = bytes.saturating_add(next_bytes);
            batch.push(next);
        }
        tokio::spawn(propose(raft.clone(), batch, permit));
    }
}

/// Propose one batch (alone: the command itself) and answer each proposer.
async fn propose(raft: Raft, mut batch: Vec<Pending>, _permit: OwnedSemaphorePermit) {
    metrics::histogram!("haven_raft_proposal_batch_commands").record(batch.len() as f64);
    if batch.len() == 1 {
        let Pending { command, reply, .. } = batch.pop().expect("one proposal");
        let answer = raft.client_write(command).await.map(|r| Committed { index: r.log_id.index, outcome: r.data });
        let _ = reply.send(answer.map_err(failed));
        return;
    }
    let (commands, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.encoded, p.reply)).unzip();
    let count = commands.len();
    let answers = match raft.client_write(CatalogCommand::Batch(commands)).await {
        Ok(r) => split(r.log_id.index, r.data, count),
        Err(e) => vec![Err(failed(e)); count],
    };
    for (reply, answer) in replies.into_iter().zip(answers) {
        let _ = reply.send(answer);
    }
}

/// One answer per command of a batch of `count` committed at `index` with `outcome`.
fn split(index: u64, outcome: CommandOutcome, count: usize) -> Vec<Result<Committed, Failed>> {
    match outcome {
        CommandOutcome::Batch(outcomes) if outcomes.len() == count => outcomes
            .iter()
            .map(|bytes| match super::decode::<CommandOutcome>(bytes) {
                Ok(outcome) => Ok(Committed { index, outcome }),
                Err(e) => Err(Failed::Unknown(format!("the outcome of a command committed at {index}: {e}"))),
            })
            .collect(),
        other => {
            let e = format!("a batch of {count} commands committed at {index} was answered with {other:?}");
            vec![Err(Failed::Unknown(e)); count]
        }
    }
}

/// openraft's answer to a write, as a [`Failed`].
pub fn failed(e: RaftError<u64, ClientWriteError<u64, HavenNode>>) -> Failed {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Failed::Forward(f),
        other => Failed::Unknown(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Group `sizes` as `run` does when they all wait at once.
    fn group(limits: Limits, sizes: &[usize]) -> Vec<Vec<usize>> {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut current: Vec<usize> = Vec::new();
        for &size in sizes {
            if !limits.admits(current.len(), current.iter().sum(), size) {
                groups.push(std::mem::take(&mut current));
            }
            current.push(size);
        }
        groups.extend((!current.is_empty()).then_some(current));
        groups
    }

    #[test]
    fn a_batch_stays_within_its_limits_and_a_large_command_goes_alone() {
        let limits = Limits { max_commands: 3, max_bytes: 100 };
        assert!(limits.admits(0, 0, 1_000), "an empty batch takes anything");
        assert!(!limits.admits(1, 1_000, 1));
        assert!(limits.admits(2, 60, 40));
        assert!(!limits.admits(2, 60, 41));
        assert!(!limits.admits(3, 3, 1), "at most three commands");
        assert_eq!(group(limits, &[10, 500, 10, 10, 10, 10]), vec![vec![10], vec![500], vec![10, 10, 10], vec![10]]);
    }

    #[test]
    fn seeded_groupings_keep_order_lose_nothing_and_are_maximal() {
        for seed in 0..200u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let limits = Limits { max_commands: rng.random_range(1..8), max_bytes: rng.random_range(1..500) };
            let sizes: Vec<usize> = (0..rng.random_range(0..60)).map(|_| rng.random_range(1..200)).collect();
            let groups = group(limits, &sizes);
            assert_eq!(groups.concat(), sizes, "seed {seed}: order kept, nothing lost or repeated");
            for (i, g) in groups.iter().enumerate() {
                assert!(!g.is_empty() && g.len() <= limits.max_commands, "seed {seed}: {g:?}");
                assert!(g.len() == 1 || g.iter().sum::<usize>() <= limits.max_bytes, "seed {seed}: {g:?}");
                if let Some(next) = groups.get(i + 1) {
                    assert!(!limits.admits(g.len(), g.iter().sum(), next[0]), "seed {seed}: {g:?} could take more");
                }
            }
        }
    }

    #[test]
    fn a_batch_answer_is_split_in_order_and_a_mismatch_fails_every_proposal() {
        let outcomes = vec![CommandOutcome::Deleted { existed: true }, CommandOutcome::Put { previous: None }];
        let encoded = outcomes.iter().map(|o| crate::raft::encode(o).unwrap()).collect();
        let answers = split(7, CommandOutcome::Batch(encoded), 2);
        let got: Vec<_> = answers.into_iter().map(|a| a.unwrap()).collect();
        assert_eq!(got, outcomes.into_iter().map(|outcome| Committed { index: 7, outcome }).collect::<Vec<_>>());
        let wrong = split(7, CommandOutcome::Batch(vec![crate::raft::encode(&CommandOutcome::Internal).unwrap()]), 2);
        assert!(wrong.iter().all(|a| matches!(a, Err(Failed::Unknown(_)))));
        assert_eq!(wrong.len(), 2);
    }
}
