//! Errors about bytes on the wire ([`ProtoError`]) and errors a node reports to its caller
//! ([`WireError`], carried inside a response envelope with a machine-readable [`ErrorCode`]).

use rkyv::{Archive, Deserialize, Serialize};

/// Why a frame or an archive was refused. Receivers log it, count it, and close the peer
/// connection; nothing stored is touched.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProtoError {
    #[error("empty frame")]
    EmptyFrame,
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge { len: usize, max: usize },
    #[error("frame truncated: expected {expected} bytes, stream ended after {got}")]
    Truncated { expected: usize, got: usize },
    #[error("archive failed validation: {0}")]
    Invalid(String),
    #[error("unsupported protocol version {got} (this build speaks {supported})")]
    UnsupportedVersion { got: u16, supported: u16 },
    #[error("payload codec error: {0}")]
    Codec(String),
    #[error("unexpected message: {0}")]
    Unexpected(String),
}

/// A machine-readable error class, so clients can decide whether to retry.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug, PartialEq, Eq))]
pub enum ErrorCode {
    /// This node is not the leader; `leader` in the [`WireError`] says who is, if known.
    NotLeader,
    /// No leader is known right now (election in progress, or no quorum).
    NoLeader,
    /// The request was malformed or violated a rule (bad key, bad address, ...).
    InvalidRequest,
    /// The thing named does not exist (unknown node, unknown actor, ...).
    NotFound,
    /// A timeout elapsed while waiting on the cluster.
    Timeout,
    /// The node is not part of an initialised cluster yet.
    NotInitialized,
    /// The cluster is already initialised.
    AlreadyInitialized,
    /// The request could not be carried out now; retrying later may succeed.
    Unavailable,
    /// A bug or a storage failure on the node.
    Internal,
    /// This host is not (or no longer) the volume's primary; the catalog names the current one.
    NotPrimary,
    /// The caller's identity may not make this request (a client sending a node-only message,
    /// a `reader` writing, an envelope whose sender is not its certificate's identity).
    PermissionDenied,
    /// A limit was reached (frame size, streams, in-flight bytes, list length); the request was
    /// refused before any work was done.
    LimitExceeded,
    /// The writer was superseded: a newer owner (an HA pair's newer generation) writes this
    /// resource now, and an older one's write is refused.
    Fenced,
}

impl ErrorCode {
    /// Whether a client may retry the same request (possibly at another node).
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::NotLeader | Self::NoLeader | Self::Timeout | Self::Unavailable | Self::NotPrimary)
    }
}

/// An error returned by a node in a response envelope.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq, thiserror::Error,
)]
#[rkyv(derive(Debug))]
#[error("{code:?}: {message}")]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
    /// For [`ErrorCode::NotLeader`]: the leader's id and QUIC address, when known.
    pub leader: Option<(u64, String)>,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), leader: None }
    }
}
