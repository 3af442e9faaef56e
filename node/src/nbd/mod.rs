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
//!
//! Who may open what is decided per connection ([`tls`]): TLS through `NBD_OPT_STARTTLS` with a
//! client certificate from the cluster CA, whose identity grants read-write or read-only access;
//! `NBD_OPT_LIST` shows only what the connection may open. [`NbdSettings`] is the `[nbd]` section
//! of the node's configuration.

pub mod protocol;
pub mod server;
pub mod tls;

use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub use server::{serve, NbdServerConfig};
pub use tls::{Access, TlsMode, TlsPolicy};

/// `[nbd]` in `haven.toml`: how the node's NBD server (bound at `nbd_listen`) admits clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdSettings {
    /// `off`, `optional` or `required` (the default); see [`tls`]. `off` and `optional` serve
    /// clients without a certificate, so they are accepted only with a loopback `nbd_listen`.
    #[serde(default)]
    pub tls: TlsMode,
    /// A connection in transmission with no request for this long (and nothing in flight), or
    /// whose client does not take a reply for this long, is closed.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// How long a client may take from connecting (TLS included) to choosing an export.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
}

fn default_idle_timeout_ms() -> u64 {
    600_000
}

fn default_handshake_timeout_ms() -> u64 {
    10_000
}

impl Default for NbdSettings {
    fn default() -> Self {
        Self {
            tls: TlsMode::default(),
            idle_timeout_ms: default_idle_timeout_ms(),
            handshake_timeout_ms: default_handshake_timeout_ms(),
        }
    }
}

/// Longest idle or handshake timeout accepted (a day).
const MAX_TIMEOUT_MS: u64 = 86_400_000;

impl NbdSettings {
    /// Check the settings for a server listening at `listen` (`HOST:PORT`, if any).
    pub fn validate(&self, listen: Option<&str>) -> Result<(), String> {
        for (what, ms) in
            [("idle_timeout_ms", self.idle_timeout_ms), ("handshake_timeout_ms", self.handshake_timeout_ms)]
        {
            if !(100..=MAX_TIMEOUT_MS).contains(&ms) {
                return Err(format!("[nbd] {what} = {ms} is out of range (100..={MAX_TIMEOUT_MS})"));
            }
        }
        if let Some(addr) = listen {
            if self.tls != TlsMode::Required && !is_loopback(addr) {
                return Err(format!(
                    "[nbd] tls = \"{}\" serves clients without a certificate, so nbd_listen must be a loopback \
                     address (127.0.0.1, [::1] or localhost), not {addr:?}; use tls = \"required\" to listen elsewhere",
                    self.tls
                ));
            }
        }
        Ok(())
    }
}

/// Whether `HOST:PORT` names a loopback host (`localhost`, 127.0.0.0/8, `[::1]`).
pub fn is_loopback(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

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
/// been checked against [`ExportInfo`] (in range, aligned to `block_size` except for `trim`,
/// within the server's maximum payload for reads and writes) before any of these is called.
pub trait ExportBackend: Send + Sync + 'static {
    fn info(&self) -> ExportInfo;
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'static, Result<Vec<u8>, BackendError>>;
    /// `fua`: the write must be durable before the reply (NBD_CMD_FLAG_FUA).
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> BoxFuture<'static, Result<(), BackendError>>;
    fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'static, Result<(), BackendError>>;
    /// Advisory: `offset` and `len` may be unaligned; trimming less (the whole blocks inside
    /// the range, or nothing) is correct.
    fn trim(&self, offset: u64, len: u32) -> BoxFuture<'static, Result<(), BackendError>>;
    /// Every write acknowledged before this call is durable when it returns.
    fn flush(&self) -> BoxFuture<'static, Result<(), BackendError>>;
}

/// One export as `NBD_OPT_LIST` may show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportListing {
    pub name: String,
    /// The export is read-only for everyone (what [`ExportInfo::read_only`] will say), so a
    /// connection allowed only read-only exports is shown it.
    pub read_only: bool,
}

/// Names and opens exports. The server asks it once per NBD_OPT_GO / NBD_OPT_INFO / NBD_OPT_LIST.
pub trait ExportResolver: Send + Sync + 'static {
    /// Every export (NBD_OPT_LIST); the server shows each connection those it may open.
    fn list(&self) -> BoxFuture<'static, Result<Vec<ExportListing>, BackendError>>;
    /// Open `name` (the empty string means the default export, if there is one). An unknown name
    /// is `Err` with [`NbdErrno::Inval`] and a message naming it; the server answers
    /// NBD_REP_ERR_UNKNOWN with that message.
    fn open(&self, name: &str) -> BoxFuture<'static, Result<Arc<dyn ExportBackend>, BackendError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses() {
        for yes in ["127.0.0.1:10809", "127.1.2.3:1", "[::1]:10809", "localhost:10809", "LOCALHOST:1"] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in ["0.0.0.0:10809", "10.0.0.1:10809", "[::]:10809", "haven1:10809", "example.com:1"] {
            assert!(!is_loopback(no), "{no}");
        }
    }

    #[test]
    fn settings_validation() {
        let required = NbdSettings::default();
        assert_eq!(required.tls, TlsMode::Required);
        assert!(required.validate(Some("0.0.0.0:10809")).is_ok());
        assert!(required.validate(None).is_ok());
        for tls in [TlsMode::Off, TlsMode::Optional] {
            let s = NbdSettings { tls, ..NbdSettings::default() };
            assert!(s.validate(Some("127.0.0.1:10809")).is_ok());
            assert!(s.validate(None).is_ok());
            let err = s.validate(Some("0.0.0.0:10809")).unwrap_err();
            assert!(err.contains("loopback"), "{err}");
        }
        let zero = NbdSettings { idle_timeout_ms: 0, ..NbdSettings::default() };
        assert!(zero.validate(None).unwrap_err().contains("idle_timeout_ms"));
        let huge = NbdSettings { handshake_timeout_ms: MAX_TIMEOUT_MS + 1, ..NbdSettings::default() };
        assert!(huge.validate(None).unwrap_err().contains("handshake_timeout_ms"));
    }

    #[test]
    fn settings_parse_from_toml() {
        let s: NbdSettings = toml::from_str("tls = \"optional\"\nidle_timeout_ms = 5000\n").unwrap();
        assert_eq!(s, NbdSettings { tls: TlsMode::Optional, idle_timeout_ms: 5000, ..NbdSettings::default() });
        assert!(toml::from_str::<NbdSettings>("tls = \"maybe\"").is_err());
        assert!(toml::from_str::<NbdSettings>("idle = 1").is_err());
    }
}
