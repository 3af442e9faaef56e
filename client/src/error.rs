//! Typed errors of the SDK. Every variant renders as one clear line for the CLI.

use haven_proto::{ErrorCode, WireError};

use crate::wire::WireIoError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The cluster configuration could not be read or is invalid.
    #[error("cluster config: {0}")]
    Config(String),
    /// No node answered before the deadline.
    #[error("cluster unreachable: no node answered ({tried} tried); last error: {last}")]
    Unreachable { tried: usize, last: String },
    /// A node refused the request.
    #[error("{}", describe(.0))]
    Server(WireError),
    /// The request was sent but no answer came back: it may or may not have been applied.
    #[error("outcome unknown: {0}")]
    Indeterminate(String),
    /// A node answered with something that is not an answer to the request.
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error(transparent)]
    Wire(#[from] WireIoError),
}

fn describe(e: &WireError) -> String {
    let what = match e.code {
        ErrorCode::NotLeader => "not the leader",
        ErrorCode::NoLeader => "no leader elected",
        ErrorCode::InvalidRequest => "invalid request",
        ErrorCode::NotFound => "not found",
        ErrorCode::Timeout => "timed out",
        ErrorCode::NotInitialized => "node not initialised",
        ErrorCode::AlreadyInitialized => "already initialised",
        ErrorCode::Unavailable => "unavailable",
        ErrorCode::Internal => "internal error",
        ErrorCode::NotPrimary => "not the volume's primary",
        ErrorCode::PermissionDenied => "permission denied",
        ErrorCode::LimitExceeded => "limit exceeded",
        ErrorCode::Fenced => "fenced (a newer owner writes this)",
    };
    format!("{what}: {}", e.message)
}

impl ClientError {
    /// A request the catalog refused (`not_found`: because what it names does not exist).
    pub(crate) fn refused(reason: String, not_found: bool) -> Self {
        let code = if not_found { ErrorCode::NotFound } else { ErrorCode::InvalidRequest };
        Self::Server(WireError::new(code, reason))
    }

    /// A node answered with something that does not fit the request.
    pub(crate) fn unexpected<T: std::fmt::Debug>(what: T) -> Self {
        Self::Protocol(format!("unexpected answer {what:?}"))
    }

    /// The server's error code, if a node answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Server(e) => Some(e.code),
            _ => None,
        }
    }
}
