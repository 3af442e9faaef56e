//! The replication cores: pure state machines for what a volume replica decides, with no I/O,
//! no clock and no locks. Inputs are messages (and, where time matters, a time value passed in);
//! outputs are what the driver must store or send. The async code in [`super`] drives them, and
//! the seeded model tests in [`super::model`] run whole replica sets on them with a scheduler
//! that reorders, drops, duplicates, crashes and partitions.
//!
//! Architecture invariant: nothing here may depend on tokio, RocksDB, the transport or the
//! catalog store; a core is a value you can clone into a test and step by hand.

pub mod ack;
pub mod cursor;
pub mod lease;
pub mod primary;
pub mod sequencer;
