//! The VM layer's errors. Every function of the layer returns [`VmError`]; it becomes a wire
//! error once, where a request leaves the layer (the VM actor's and host agent's replies, the
//! node service's answer to a client).
//!
//! Failures another node, the catalog or the volume layer reported travel on unchanged
//! ([`VmError::Peer`], [`VmError::Volume`]), so a client sees the original code and message.

use haven_proto::{ErrorCode, WireError};

use crate::volume::error::VolumeError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum VmError {
    /// No such VM, plan job or host.
    #[error("{0}")]
    NotFound(String),
    /// The request itself is wrong (a state the VM is not in, a bad target); repeating it
    /// cannot help.
    #[error("{0}")]
    Invalid(String),
    /// Cannot be done now (fenced, a migration or group job under way, a peer unreachable); a
    /// later try may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// A storage failure or a broken invariant (a guest's memory or disk check failing is one).
    #[error("{0}")]
    Internal(String),
    /// A guest disk's volume refused.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// Another node or the catalog refused; its error, unchanged.
    #[error("{}", .0.message)]
    Peer(WireError),
}

impl VmError {
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::NotFound(m.into())
    }

    pub fn invalid(m: impl Into<String>) -> Self {
        Self::Invalid(m.into())
    }

    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::Unavailable(m.into())
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::Internal(e.to_string())
    }

    /// The message, without the code.
    pub fn message(&self) -> String {
        match self {
            Self::Peer(w) => w.message.clone(),
            Self::Volume(v) => v.message(),
            other => other.to_string(),
        }
    }

    /// The wire code this error is answered with.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Invalid(_) => ErrorCode::InvalidRequest,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Internal(_) => ErrorCode::Internal,
            Self::Volume(v) => v.code(),
            Self::Peer(w) => w.code,
        }
    }
}

impl From<WireError> for VmError {
    fn from(e: WireError) -> Self {
        Self::Peer(e)
    }
}

impl From<VmError> for WireError {
    fn from(e: VmError) -> Self {
        match e {
            VmError::Peer(w) => w,
            VmError::Volume(v) => v.into(),
            other => WireError::new(other.code(), other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_errors_keep_their_meaning_on_the_wire() {
        let cases = [
            (VmError::not_found("a"), ErrorCode::NotFound),
            (VmError::invalid("b"), ErrorCode::InvalidRequest),
            (VmError::unavailable("c"), ErrorCode::Unavailable),
            (VmError::internal("d"), ErrorCode::Internal),
            (VmError::from(VolumeError::not_primary("e")), ErrorCode::NotPrimary),
        ];
        for (e, code) in cases {
            let msg = e.to_string();
            let w = WireError::from(e);
            assert_eq!((w.code, w.message), (code, msg));
        }
        let peer =
            WireError { code: ErrorCode::NotLeader, message: "leader is node-2".into(), leader: Some((2, "x".into())) };
        assert_eq!(WireError::from(VmError::from(peer.clone())), peer);
    }
}
