//! `haven-node`: the Haven server. See `ARCHITECTURE.md` at the repository root for the map.
//!
//! [`node::run`] assembles one node: storage, transport, Raft, actors, controllers and the admin
//! server; [`cli`] is the `haven-node` command line over it.

pub mod actors;
pub mod admin;
pub mod authz;
pub mod catalog;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod controllers;
#[doc(hidden)]
pub mod fuzz_api;
pub mod ha;
pub mod identity;
#[cfg(test)]
mod model_seeds;
pub mod nbd;
pub mod node;
pub mod pki;
pub mod raft;
pub mod service;
pub mod share;
pub mod storage;
pub mod telemetry;
pub mod transport;
pub mod vm;
pub mod volume;
