//! The HA driver's errors. Every function of `ha::host` returns [`HaHostError`]; it becomes a
//! wire error once, where a request leaves the layer (the VM host's answer to a client, the HA
//! actor's reply).

use haven_proto::{ErrorCode, VmId, WireError};

#[derive(Debug, Clone, thiserror::Error)]
pub enum HaHostError {
    /// The VM has no HA pair this host follows.
    #[error("{0} is not protected by an HA pair on this host (havenctl ha create protects it)")]
    NotProtected(VmId),
    /// This host is not the pair's primary (any more): ask the VM's host.
    #[error("{0}")]
    NotPrimary(String),
    /// The request is wrong (an application key or value over the limits).
    #[error("{0}")]
    Invalid(String),
    /// The standby did not acknowledge in time; the update is held and may still be released.
    #[error("{0}")]
    Unavailable(String),
    /// `<data-dir>/ha` could not be read or written.
    #[error("{path}: {error}")]
    Io { path: String, error: String },
    /// A durable seal file that does not parse: kept for a human, the node does not start.
    #[error("{0}: corrupt HA state file: {1}")]
    Corrupt(String, String),
    #[error("bad [ha] configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Internal(String),
}

impl HaHostError {
    pub fn io(path: &std::path::Path, e: std::io::Error) -> Self {
        Self::Io { path: path.display().to_string(), error: e.to_string() }
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::Internal(e.to_string())
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NotProtected(_) => ErrorCode::NotFound,
            Self::NotPrimary(_) | Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Invalid(_) | Self::Config(_) => ErrorCode::InvalidRequest,
            Self::Io { .. } | Self::Corrupt(..) | Self::Internal(_) => ErrorCode::Internal,
        }
    }
}

impl From<HaHostError> for WireError {
    fn from(e: HaHostError) -> Self {
        WireError::new(e.code(), e.to_string())
    }
}
