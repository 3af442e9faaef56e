//! Volumes on this host: the block store that keeps every replica's block versions and
//! snapshots in the node's RocksDB ([`blockstore`]) and the Merkle digests that let two copies be
//! compared without shipping data ([`merkle`]).
//!
//! On top of the block store, [`replica`] is the engine behind each device actor (write
//! ordering, synchronous replication, snapshots), with [`sequencer`] applying writes in order,
//! [`stream`] carrying each write to the replicas on one long-lived replication stream per peer,
//! [`snapshots`], [`integrity`] (labeled snapshot comparison and repair) and [`resync`] (catching
//! up a replica after an outage) as its parts; [`host`] keeps the engines in step with the catalog
//! and routes requests to primaries; [`export`] serves volumes over NBD.
//!
//! Which host holds which replica, who is primary and which replicas are in sync is the
//! catalog's business (changed only through Raft); failover is decided by the leader's volume
//! controller (`controllers::volumes`).

pub mod blockstore;
pub mod core;
pub mod error;
pub mod export;
pub mod extents;
pub mod host;
pub mod integrity;
pub mod merkle;
#[cfg(test)]
mod model;
pub mod replica;
pub mod resync;
pub mod reversal;
pub mod sequencer;
pub mod snapshots;
pub mod stream;
