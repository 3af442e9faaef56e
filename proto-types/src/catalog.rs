//! The catalog's command and query vocabulary.
//!
//! A [`CatalogCommand`] is what the leader appends to the Raft log; every node's state machine
//! applies it deterministically and produces a [`CommandOutcome`]. A [`CatalogQuery`] reads the
//! applied state. Later capabilities (volumes, plans, pairs, ...) add variants here; they must stay
//! deterministic: no clocks, no randomness, no I/O outside the state machine's own store.

use rkyv::{Archive, Deserialize, Serialize};

use crate::ha::{HaCommand, HaOutcome, HaQuery, HaQueryResult};
use crate::ids::NodeId;
use crate::plan::{PlanCommand, PlanOutcome, PlanQuery, PlanQueryResult};
use crate::share::{ShareCommand, ShareOutcome, ShareQuery, ShareQueryResult};
use crate::vm::{VmCommand, VmOutcome, VmQuery, VmQueryResult};
use crate::volume::{VolumeCommand, VolumeOutcome, VolumeQuery, VolumeQueryResult};

/// Largest key in the generic key-value namespace.
pub const MAX_KV_KEY_LEN: usize = 1024;
/// Largest value in the generic key-value namespace.
pub const MAX_KV_VALUE_LEN: usize = 1024 * 1024;
/// Most commands one [`CatalogCommand::Batch`] carries.
pub const MAX_BATCH_COMMANDS: usize = 256;

/// A host (cluster member) as the catalog records it.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct HostRecord {
    pub id: NodeId,
    /// QUIC address peers and clients dial.
    pub addr: String,
    /// Admin HTTP address (`/metrics`, `/health`, `/status`).
    pub admin_addr: String,
}

/// A state-changing catalog operation, replicated through Raft.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum CatalogCommand {
    /// Set `key` to `value` in the generic namespace.
    KvPut { key: String, value: Vec<u8> },
    /// Remove `key` from the generic namespace.
    KvDelete { key: String },
    /// Set `key` to `new` only if its current value equals `expected` (`None` = absent).
    /// `new: None` deletes.
    KvCas { key: String, expected: Option<Vec<u8>>, new: Option<Vec<u8>> },
    /// Record (or update) a host.
    UpsertHost(HostRecord),
    /// Forget a host.
    RemoveHost { id: NodeId },
    /// Volumes, snapshots, policies, relationships, events.
    Volume(VolumeCommand),
    /// VMs and host capacity.
    Vm(VmCommand),
    /// Group live-migration plans and host drain.
    Plan(PlanCommand),
    /// Several commands in one Raft entry, applied in order as if each were an entry of its own;
    /// the outcome is [`CommandOutcome::Batch`], one outcome per command. Each element is the
    /// encoding (the node's Raft codec, bincode) of one command that is not a batch: bytes, not
    /// commands, so the type is not recursive and no decoder can be driven into deep nesting by
    /// hostile bytes. Only the leader's proposer forms batches (from proposals that arrive
    /// together: one fsync on the leader for all of them); a batch from a peer or a client is
    /// refused. Appended last, so the encoding of every other command is unchanged.
    Batch(Vec<Vec<u8>>),
    /// Shared datasets (C2): creation, members, hub.
    Share(ShareCommand),
    /// HA pairs (C6): protection, mode switches, failovers, re-protection.
    Ha(HaCommand),
}

impl CatalogCommand {
    /// Check sizes and names before the command reaches the log. A command that fails here is
    /// never proposed, so the log only ever holds commands every node can apply.
    pub fn validate(&self) -> Result<(), String> {
        fn key_ok(key: &str) -> Result<(), String> {
            if key.is_empty() {
                return Err("key must not be empty".into());
            }
            if key.len() > MAX_KV_KEY_LEN {
                return Err(format!("key is {} bytes, limit {MAX_KV_KEY_LEN}", key.len()));
            }
            Ok(())
        }
        fn value_ok(v: &[u8]) -> Result<(), String> {
            if v.len() > MAX_KV_VALUE_LEN {
                return Err(format!("value is {} bytes, limit {MAX_KV_VALUE_LEN}", v.len()));
            }
            Ok(())
        }
        match self {
            Self::KvPut { key, value } => {
                key_ok(key)?;
                value_ok(value)
            }
            Self::KvDelete { key } => key_ok(key),
            Self::KvCas { key, expected, new } => {
                key_ok(key)?;
                expected.as_deref().map(value_ok).transpose()?;
                new.as_deref().map(value_ok).transpose()?;
                Ok(())
            }
            Self::UpsertHost(h) => {
                if h.addr.parse::<std::net::SocketAddr>().is_err() {
                    return Err(format!("host address {:?} is not ip:port", h.addr));
                }
                Ok(())
            }
            Self::RemoveHost { .. } => Ok(()),
            Self::Volume(v) => v.validate(),
            Self::Vm(v) => v.validate(),
            Self::Plan(p) => p.validate(),
            Self::Batch(commands) => Self::validate_batch(commands),
            Self::Share(s) => s.validate(),
            Self::Ha(h) => h.validate(),
        }
    }

    /// A batch: 1 to [`MAX_BATCH_COMMANDS`] encoded commands, none empty (the proposer validated
    /// each command before encoding it; applying decodes them).
    fn validate_batch(commands: &[Vec<u8>]) -> Result<(), String> {
        if commands.is_empty() || commands.len() > MAX_BATCH_COMMANDS {
            return Err(format!("a batch holds {} commands, allowed 1 to {MAX_BATCH_COMMANDS}", commands.len()));
        }
        match commands.iter().position(Vec::is_empty) {
            Some(i) => Err(format!("command {i} of a batch is empty")),
            None => Ok(()),
        }
    }
}

/// What applying a command did.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum CommandOutcome {
    /// A put; the previous value, if any.
    Put {
        previous: Option<Vec<u8>>,
    },
    /// A delete; whether the key existed.
    Deleted {
        existed: bool,
    },
    /// A compare-and-set; whether it matched, and the value now stored.
    Cas {
        succeeded: bool,
        current: Option<Vec<u8>>,
    },
    /// A host was recorded or removed.
    Host,
    /// A Raft membership or blank entry (no catalog effect).
    Internal,
    Volume(VolumeOutcome),
    Vm(VmOutcome),
    Plan(PlanOutcome),
    /// The outcomes of a [`CatalogCommand::Batch`], in its order, each encoded as its command was
    /// (never sent: the leader's proposer answers each proposer with its own outcome).
    Batch(Vec<Vec<u8>>),
    Share(ShareOutcome),
    Ha(HaOutcome),
}

/// A read of applied catalog state.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum CatalogQuery {
    KvGet {
        key: String,
    },
    /// Keys (and values) starting with `prefix`, in key order, at most `limit`.
    KvScan {
        prefix: String,
        limit: u32,
    },
    Hosts,
    Volume(VolumeQuery),
    Vm(VmQuery),
    Plan(PlanQuery),
    Share(ShareQuery),
    Ha(HaQuery),
}

/// The answer to a [`CatalogQuery`].
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum QueryResult {
    Value(Option<Vec<u8>>),
    Entries(Vec<(String, Vec<u8>)>),
    Hosts(Vec<HostRecord>),
    Volume(VolumeQueryResult),
    Vm(VmQueryResult),
    Plan(PlanQueryResult),
    Share(ShareQueryResult),
    Ha(HaQueryResult),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_refuses_oversized_and_empty() {
        assert!(CatalogCommand::KvPut { key: "".into(), value: vec![] }.validate().is_err());
        assert!(CatalogCommand::KvPut { key: "a".repeat(2000), value: vec![] }.validate().is_err());
        assert!(CatalogCommand::KvPut { key: "a".into(), value: vec![0; MAX_KV_VALUE_LEN + 1] }.validate().is_err());
        assert!(CatalogCommand::KvPut { key: "a".into(), value: vec![1] }.validate().is_ok());
        let bad_host = HostRecord { id: NodeId(1), addr: "nope".into(), admin_addr: String::new() };
        assert!(CatalogCommand::UpsertHost(bad_host).validate().is_err());
    }

    #[test]
    fn a_batch_holds_one_to_the_limit_of_encoded_commands() {
        let item = vec![1u8, 2, 3];
        assert!(CatalogCommand::Batch(vec![item.clone(); 2]).validate().is_ok());
        assert!(CatalogCommand::Batch(vec![item.clone(); MAX_BATCH_COMMANDS]).validate().is_ok());
        assert!(CatalogCommand::Batch(vec![item.clone(); MAX_BATCH_COMMANDS + 1]).validate().is_err());
        assert!(CatalogCommand::Batch(vec![]).validate().is_err());
        assert!(CatalogCommand::Batch(vec![item.clone(), vec![]]).validate().is_err());
    }
}
