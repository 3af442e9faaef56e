//! NBD (Network Block Device) export of volumes, so stock clients (`qemu-img`, `qemu-io`,
//! `nbd-client`) can read and write them.
//!
//! This module owns the wire protocol (fixed newstyle handshake, option haggling, transmission
//! phase) and nothing else: what an export *is* comes from an [`ExportResolver`], and every byte
//! read or written goes through an [`ExportBackend`]. It must not know about volumes, replicas or
//! Raft. Every request from the network is checked (magic, type, flags, offset and length against
//! the export size and block-size constraints, payload length limits) before the backend sees it;
//! a malformed request gets an NBD error reply or, if framing is lost, the connection is closed.
//! Stored data is never touched by a refused request.

pub mod protocol;
pub mod server;

use std::sync::Arc;

use futures::future::BoxFuture;

pub use server::{serve, NbdServerConfig};

/// An NBD error number, as sent in a simple or structured reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdErrno {
    /// EPERM (1): operation not permitted (e.g. a write to a read-only export).
    Perm,
    /// EIO (5): the backend failed.
    Io,
    /// ENOMEM (12).
    NoMem,
    /// EINVAL (22): bad offset, length, alignment or flags.
    Inval,
    /// ENOSPC (28): a write past the end of the export.
    NoSpc,
    /// EOVERFLOW (75): a request larger than the export's maximum payload.
    Overflow,
    /// ENOTSUP (95): a command this export does not support.
    NotSup,
    /// ESHUTDOWN (108): the server is shutting down.
    Shutdown,
}

impl NbdErrno {
    /// The value on the wire (the NBD protocol's errno numbering).
    pub fn code(self) -> u32 {
        match self {
            Self::Perm => 1,
            Self::Io => 5,
            Self::NoMem => 12,
            Self::Inval => 22,
            Self::NoSpc => 28,
            Self::Overflow => 75,
            Self::NotSup => 95,
            Self::Shutdown => 108,
        }
    }
}

/// Why a backend refused or failed an operation.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    pub errno: NbdErrno,
    pub message: String,
}

impl BackendError {
    pub fn new(errno: NbdErrno, message: impl Into<String>) -> Self {
        Self { errno, message: message.into() }
    }
}

/// What a client learns about an export during option haggling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Smallest unit the backend accepts: offsets and lengths must be multiples of it.
    pub block_size: u32,
    /// Writes, trims and write-zeroes are refused with EPERM.
    pub read_only: bool,
    /// A one-line description (NBD_INFO_DESCRIPTION).
    pub description: String,
}

/// One open export: the data path the server calls for each request. Offsets and lengths have
/// been checked against [`ExportInfo`] (in range, aligned to `block_size`, within the server's
/// maximum payload) before any of these is called.
pub trait ExportBackend: Send + Sync + 'static {
    fn info(&self) -> ExportInfo;
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'static, Result<Vec<u8>, BackendError>>;
    /// `fua`: the write must be durable before the reply (NBD_CMD_FLAG_FUA).
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> BoxFuture<'static, Result<(), BackendError>>;
    fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'static, Result<(), BackendError>>;
    fn trim(&self, offset: u64, len: u32) -> BoxFuture<'static, Result<(), BackendError>>;
    /// Every write acknowledged before this call is durable when it returns.
    fn flush(&self) -> BoxFuture<'static, Result<(), BackendError>>;
}

/// Names and opens exports. The server asks it once per NBD_OPT_GO / NBD_OPT_INFO / NBD_OPT_LIST.
pub trait ExportResolver: Send + Sync + 'static {
    /// Every export name (NBD_OPT_LIST).
    fn list(&self) -> BoxFuture<'static, Result<Vec<String>, BackendError>>;
    /// Open `name` (the empty string means the default export, if there is one). An unknown name
    /// is `Err` with [`NbdErrno::Inval`] and a message naming it; the server answers
    /// NBD_REP_ERR_UNKNOWN with that message.
    fn open(&self, name: &str) -> BoxFuture<'static, Result<Arc<dyn ExportBackend>, BackendError>>;
}
