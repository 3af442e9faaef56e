//! The differential-sharing cores: pure state machines with no I/O, no clock, no threads and no
//! randomness. [`doc`] owns documents and diffs (exact and fuzzy application), [`channel`] the
//! lockstep sync between a spoke and the hub, [`member`] one member of one share (its role, the
//! generation check, retransmission). The share driver runs a [`member::Member`] per share and
//! carries out its effects; the seeded model test in `super::model` runs several over a network
//! that delays, reorders, duplicates and drops.
//!
//! Architecture invariant: nothing here may depend on tokio, RocksDB, the transport or the
//! catalog store; a core is a value you can clone into a test and step by hand.

pub mod channel;
pub mod doc;
pub mod member;
