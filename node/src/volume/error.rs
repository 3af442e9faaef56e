//! The volume layer's errors. Every function of the layer returns [`VolumeError`]; it becomes a
//! wire error once, where a request leaves the layer (the device actor's reply, the node
//! service's answer to a client, the NBD export's errno comes from it too).
//!
//! A failure another node (or the catalog, through the leader) reported arrives as a wire error
//! and travels on unchanged in [`VolumeError::Peer`], so a client sees the original code and
//! message, whichever host it came from.

use haven_proto::{ErrorCode, WireError};

#[derive(Debug, Clone, thiserror::Error)]
pub enum VolumeError {
    /// This host is not the volume's primary (any more), or serves no reads without a lease:
    /// ask the primary the catalog names (routing retries).
    #[error("{0}")]
    NotPrimary(String),
    /// No such volume, snapshot, relationship or replica.
    #[error("{0}")]
    NotFound(String),
    /// The request itself is wrong (range, size, state it asks for); repeating it cannot help.
    #[error("{0}")]
    Invalid(String),
    /// Cannot be done now (a replica unreachable, a takeover or resync under way); a later try
    /// may succeed, and nothing was changed.
    #[error("{0}")]
    Unavailable(String),
    /// The request may or may not have been carried out (a write sent to the replicas but not
    /// confirmed, a deadline passed).
    #[error("{0}")]
    OutcomeUnknown(String),
    /// Over a bound this layer keeps.
    #[error("{0}")]
    LimitExceeded(String),
    /// A storage failure or a broken invariant.
    #[error("{0}")]
    Internal(String),
    /// A fenced write from a superseded writer (an HA pair's older generation).
    #[error("{0}")]
    Fenced(String),
    /// Another node or the catalog refused; its error, unchanged.
    #[error("{}", .0.message)]
    Peer(WireError),
}

impl VolumeError {
    pub fn not_primary(m: impl Into<String>) -> Self {
        Self::NotPrimary(m.into())
    }

    pub fn not_found(m: impl Into<String>) -> Self {
        Self::NotFound(m.into())
    }

    pub fn invalid(m: impl Into<String>) -> Self {
        Self::Invalid(m.into())
    }

    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::Unavailable(m.into())
    }

    pub fn outcome_unknown(m: impl Into<String>) -> Self {
        Self::OutcomeUnknown(m.into())
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::Internal(e.to_string())
    }

    /// The wire code this error is answered with.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NotPrimary(_) => ErrorCode::NotPrimary,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Invalid(_) => ErrorCode::InvalidRequest,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::OutcomeUnknown(_) => ErrorCode::Timeout,
            Self::LimitExceeded(_) => ErrorCode::LimitExceeded,
            Self::Internal(_) => ErrorCode::Internal,
            Self::Fenced(_) => ErrorCode::Fenced,
            Self::Peer(w) => w.code,
        }
    }

    /// The same error, its message prefixed with what was being done.
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        let m = |s: String| format!("{what}: {s}");
        match self {
            Self::NotPrimary(s) => Self::NotPrimary(m(s)),
            Self::NotFound(s) => Self::NotFound(m(s)),
            Self::Invalid(s) => Self::Invalid(m(s)),
            Self::Unavailable(s) => Self::Unavailable(m(s)),
            Self::OutcomeUnknown(s) => Self::OutcomeUnknown(m(s)),
            Self::LimitExceeded(s) => Self::LimitExceeded(m(s)),
            Self::Internal(s) => Self::Internal(m(s)),
            Self::Fenced(s) => Self::Fenced(m(s)),
            Self::Peer(w) => Self::Peer(WireError { message: m(w.message), ..w }),
        }
    }

    /// The message, without the code.
    pub fn message(&self) -> String {
        match self {
            Self::Peer(w) => w.message.clone(),
            other => other.to_string(),
        }
    }
}

impl From<WireError> for VolumeError {
    fn from(e: WireError) -> Self {
        Self::Peer(e)
    }
}

impl From<VolumeError> for WireError {
    fn from(e: VolumeError) -> Self {
        match e {
            VolumeError::Peer(w) => w,
            other => WireError::new(other.code(), other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_errors_keep_their_meaning_on_the_wire() {
        let cases = [
            (VolumeError::not_primary("a"), ErrorCode::NotPrimary),
            (VolumeError::not_found("b"), ErrorCode::NotFound),
            (VolumeError::invalid("c"), ErrorCode::InvalidRequest),
            (VolumeError::unavailable("d"), ErrorCode::Unavailable),
            (VolumeError::outcome_unknown("e"), ErrorCode::Timeout),
            (VolumeError::internal("f"), ErrorCode::Internal),
        ];
        for (e, code) in cases {
            let msg = e.message();
            let w = WireError::from(e);
            assert_eq!((w.code, w.message), (code, msg));
        }
        // A peer's error passes through unchanged, leader hint included.
        let peer =
            WireError { code: ErrorCode::NotLeader, message: "leader is node-2".into(), leader: Some((2, "x".into())) };
        assert_eq!(WireError::from(VolumeError::from(peer.clone())), peer);
    }
}
