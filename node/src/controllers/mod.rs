//! Controllers: reconcile loops that run on the leader and move the catalog towards what it
//! should be, one idempotent command at a time. A new leader simply starts reconciling from the
//! catalog as it finds it, so a leader change never abandons work. Controllers propose commands
//! through [`crate::cluster::Proposer`]; they must not write storage directly.

pub mod host_registry;
pub mod liveness;
#[cfg(test)]
mod plan_model;
pub mod plan_step;
pub mod plans;
pub mod shares;
pub mod volumes;

use crate::actors::ActorRegistry;
use crate::cluster::{Proposer, RaftView};
use crate::storage::Store;

/// What every controller holds: whether this node leads, catalog reads, proposals and actor
/// messages. Nothing else of the node.
#[derive(Clone)]
pub struct LeaderHandles {
    pub view: RaftView,
    pub store: Store,
    pub proposer: Proposer,
    pub registry: ActorRegistry,
}
