//! The share layer's errors. Every function of `share::host` returns [`ShareError`]; it becomes
//! a wire error once, where a request leaves the layer (the share actor's replies and the node
//! service's answer to a client). Failures another member reported travel on unchanged
//! ([`ShareError::Peer`]).

use haven_proto::{ErrorCode, WireError};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ShareError {
    /// No such share, or this node is not a member of it.
    #[error("{0}")]
    NotFound(String),
    /// The request is wrong (a key or value over the limits, a diff that does not apply, a
    /// message of another generation); repeating it cannot help.
    #[error("{0}")]
    Invalid(String),
    /// Cannot be done now (a member unreachable, a reset under way); a later try may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// The change is durable where it was made but was not acknowledged as asked in time.
    #[error("{0}")]
    Timeout(String),
    /// A storage failure.
    #[error("{0}")]
    Internal(String),
    /// Another member refused; its error, unchanged.
    #[error("{}", .0.message)]
    Peer(WireError),
}

impl ShareError {
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

    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Invalid(_) => ErrorCode::InvalidRequest,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Timeout(_) => ErrorCode::Timeout,
            Self::Internal(_) => ErrorCode::Internal,
            Self::Peer(w) => w.code,
        }
    }
}

impl From<WireError> for ShareError {
    fn from(e: WireError) -> Self {
        Self::Peer(e)
    }
}

impl From<ShareError> for WireError {
    fn from(e: ShareError) -> Self {
        match e {
            ShareError::Peer(w) => w,
            other => WireError::new(other.code(), other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_errors_keep_their_meaning_on_the_wire() {
        let cases = [
            (ShareError::not_found("a"), ErrorCode::NotFound),
            (ShareError::invalid("b"), ErrorCode::InvalidRequest),
            (ShareError::unavailable("c"), ErrorCode::Unavailable),
            (ShareError::Timeout("d".into()), ErrorCode::Timeout),
            (ShareError::internal("e"), ErrorCode::Internal),
        ];
        for (e, code) in cases {
            let msg = e.to_string();
            let w = WireError::from(e);
            assert_eq!((w.code, w.message), (code, msg));
        }
    }
}
