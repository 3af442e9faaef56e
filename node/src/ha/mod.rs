//! HA pairs (capability C6): a VM protected by a standby on a second host, in redundant mode
//! (the standby mirrors memory and device state as checkpoint epochs while its VM is stopped) or
//! multi-operation mode (the standby's VM runs and the application's state is mirrored), switched
//! live. [`core`] holds the pure state machines — the primary's checkpoint epochs and output
//! commit, the standby's staging, commit, seal and takeover, the multi-operation mirror, and the
//! leader's failover decision — and the seeded model test runs a whole pair on them over a
//! faulty network and checks that the outside never sees a state the surviving VM lacks.
//!
//! [`host`] is the node's driver (the guest, the outputs, the seal on disk, messages, the
//! heartbeat) and [`leader`] the leader's loop that carries out the failover decisions; the
//! actor (`actors::ha`) is their mailbox. Nothing below `core` does I/O.

pub mod core;
pub mod error;
pub mod host;
pub mod leader;
#[cfg(test)]
mod model;
