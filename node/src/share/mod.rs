//! Shared datasets (capability C2, differential sharing): every member of a share holds a live
//! copy of a key-value document and syncs it with the share's hub by exchanging diffs. [`core`]
//! holds the pure state machines (documents and diffs, the sync channel, one member); the seeded
//! model test runs whole shares on them over a lossy network.

pub mod core;
pub mod error;
pub mod files;
pub mod host;
#[cfg(test)]
mod model;
