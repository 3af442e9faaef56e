//! Haven's Rust SDK.
//!
//! [`HavenClient`] talks to any node of a cluster over QUIC with mutual TLS and is redirected to
//! the leader for writes; [`wire`] is the framing and connection layer it shares with the node's
//! transport; [`devcluster`] starts and stops a local cluster of real `haven-node` processes (used
//! by `havenctl dev up`, the tests, the benchmarks and the chaos harness).
//!
//! The SDK must not depend on the server crate: it speaks only the protocol in `haven-proto`.

pub mod client;
pub mod config;
pub mod devcluster;
pub mod error;
pub mod ha;
pub mod plans;
pub mod shares;
pub mod stall;
pub mod vms;
pub mod volumes;
pub mod wire;

pub use client::{HavenClient, StallStats};
pub use config::ClusterConfig;
pub use error::ClientError;
pub use haven_proto as proto;
pub use stall::StallPolicy;
