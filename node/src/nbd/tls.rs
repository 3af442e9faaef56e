//! Who may do what on an NBD connection: the TLS mode of the server ([`TlsMode`],
//! [`TlsPolicy`]), the rustls server configuration `NBD_OPT_STARTTLS` upgrades to (built from
//! the node's PEM material: the cluster CA as the only root, a client certificate required), and
//! the [`Access`] a connection gets from the identity in its client certificate, or from having
//! none.
//!
//! | connection | read-write exports (volumes) | read-only exports (snapshots) |
//! |---|---|---|
//! | `tls = "off"` (loopback listener only): anyone | read-write | read |
//! | TLS with a node or `admin` certificate | read-write | read |
//! | TLS with a `reader` certificate | read (advertised `NBD_FLAG_READ_ONLY`; writes get EPERM) | read |
//! | `tls = "optional"` (loopback listener only), no TLS | refused (`NBD_REP_ERR_TLS_REQD`), not listed | read |
//! | `tls = "required"`, before STARTTLS | refused (`NBD_REP_ERR_TLS_REQD`) | refused |
//! | TLS with a certificate naming no usable identity | refused (`NBD_REP_ERR_POLICY`) | refused |
//!
//! rustls has checked the chain to the cluster CA and the validity period before an identity is
//! read; `crate::identity` reads it. This module does no I/O and must not know what an export
//! is beyond whether it is read-only.

use std::sync::Arc;

use haven_proto::{Caller, Role};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use super::protocol::{self as p, TlsPhase};
use crate::identity::IdentityError;

/// How the NBD server uses TLS (`[nbd] tls` in `haven.toml`, `--nbd-tls`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// No TLS; every client may read and write every volume. Loopback listeners only.
    Off,
    /// TLS offered; a client that does not negotiate it may only read snapshots. Loopback
    /// listeners only.
    Optional,
    /// TLS with a client certificate from the cluster CA before anything else (the default).
    #[default]
    Required,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Optional => "optional",
            Self::Required => "required",
        }
    }
}

impl std::fmt::Display for TlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "optional" => Ok(Self::Optional),
            "required" => Ok(Self::Required),
            other => Err(format!("unknown NBD TLS mode {other:?} (expected off, optional or required)")),
        }
    }
}

/// The server's TLS mode with the configuration STARTTLS uses.
#[derive(Debug, Clone)]
pub enum TlsPolicy {
    Off,
    Optional(Arc<rustls::ServerConfig>),
    Required(Arc<rustls::ServerConfig>),
}

impl TlsPolicy {
    /// The TLS phase a new connection starts haggling in.
    pub fn initial_phase(&self) -> TlsPhase {
        match self {
            Self::Off => TlsPhase::Unavailable,
            Self::Optional(_) => TlsPhase::Offered,
            Self::Required(_) => TlsPhase::Required,
        }
    }

    /// What a connection may do before (or without) TLS.
    pub fn initial_access(&self) -> Access {
        match self {
            Self::Off => Access::Full,
            Self::Optional(_) => Access::ReadOnlyExports,
            Self::Required(_) => Access::Denied("TLS is required".into()),
        }
    }

    /// The rustls configuration for STARTTLS, when TLS is offered at all.
    pub fn server_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        match self {
            Self::Off => None,
            Self::Optional(c) | Self::Required(c) => Some(c.clone()),
        }
    }
}

/// What one connection may open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Every export as it is (read-write volumes, read-only snapshots).
    Full,
    /// Every export, read-only.
    ReadOnly,
    /// Only exports that are read-only anyway (a client without TLS under `tls = "optional"`).
    ReadOnlyExports,
    /// Nothing; the reason is sent to the client.
    Denied(String),
}

/// Why an export may not be opened: the option reply type and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRefusal {
    pub reply_type: u32,
    pub message: String,
}

impl Access {
    /// The access a TLS client gets from the identity its certificate names: a node or an
    /// `admin` client reads and writes, a `reader` only reads.
    pub fn for_identity(identity: Result<Caller, IdentityError>) -> Self {
        match identity {
            Ok(Caller::Node(_)) | Ok(Caller::Client { role: Role::Admin, .. }) => Self::Full,
            Ok(Caller::Client { role: Role::Reader, .. }) => Self::ReadOnly,
            Err(e) => Self::Denied(format!("client certificate refused: {e}")),
        }
    }

    /// Whether an export that is (`read_only`) or is not read-only by itself may be opened
    /// (and so listed).
    pub fn may_open(&self, read_only: bool) -> bool {
        match self {
            Self::Full | Self::ReadOnly => true,
            Self::ReadOnlyExports => read_only,
            Self::Denied(_) => false,
        }
    }

    /// Whether listing is refused outright, and how.
    pub fn list_refusal(&self) -> Option<OpenRefusal> {
        match self {
            Self::Denied(reason) => Some(OpenRefusal { reply_type: p::REP_ERR_POLICY, message: reason.clone() }),
            _ => None,
        }
    }

    /// Decide opening export `name` whose backend is (`read_only`) or is not read-only:
    /// `Ok(true)` when it must be served read-only, `Ok(false)` as it is.
    pub fn open(&self, name: &str, read_only: bool) -> Result<bool, OpenRefusal> {
        match self {
            Self::Full => Ok(read_only),
            Self::ReadOnly => Ok(true),
            Self::ReadOnlyExports if read_only => Ok(true),
            Self::ReadOnlyExports => Err(OpenRefusal {
                reply_type: p::REP_ERR_TLS_REQD,
                message: format!(
                    "export {name:?} is writable and needs TLS with a client certificate; without TLS only read-only exports are served"
                ),
            }),
            Self::Denied(reason) => Err(OpenRefusal { reply_type: p::REP_ERR_POLICY, message: reason.clone() }),
        }
    }
}

/// The NBD TLS configuration could not be built from the node's material.
#[derive(Debug, thiserror::Error)]
pub enum NbdTlsError {
    #[error("NBD TLS: CA certificate: {0}")]
    Ca(String),
    #[error("NBD TLS: node certificate: {0}")]
    Cert(String),
    #[error("NBD TLS: node private key: {0}")]
    Key(String),
    #[error("NBD TLS: {0}")]
    Config(String),
}

/// The rustls server configuration for STARTTLS: presents the node's certificate and requires a
/// client certificate chaining to the cluster CA (TLS 1.2 or 1.3, ring provider).
pub fn server_config(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<rustls::ServerConfig>, NbdTlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.map_err(|e| NbdTlsError::Ca(e.to_string()))?).map_err(|e| NbdTlsError::Ca(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(NbdTlsError::Ca("no certificate in the CA file".into()));
    }
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| NbdTlsError::Cert(e.to_string()))?;
    if chain.is_empty() {
        return Err(NbdTlsError::Cert("no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| NbdTlsError::Key(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| NbdTlsError::Config(e.to_string()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| NbdTlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| NbdTlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_proto::NodeId;

    fn client(role: Role) -> Result<Caller, IdentityError> {
        Ok(Caller::Client { role, name: "t".into() })
    }

    #[test]
    fn identities_map_to_access() {
        assert_eq!(Access::for_identity(Ok(Caller::Node(NodeId(2)))), Access::Full);
        assert_eq!(Access::for_identity(client(Role::Admin)), Access::Full);
        assert_eq!(Access::for_identity(client(Role::Reader)), Access::ReadOnly);
        assert!(
            matches!(Access::for_identity(Err(IdentityError::NoIdentity)), Access::Denied(m) if m.contains("no haven://"))
        );
    }

    #[test]
    fn open_and_list_table() {
        let denied = Access::Denied("TLS is required".into());
        // (access, export read-only?, open result as Ok(serve read-only) / Err(reply type))
        let cases: Vec<(&Access, bool, Result<bool, u32>)> = vec![
            (&Access::Full, false, Ok(false)),
            (&Access::Full, true, Ok(true)),
            (&Access::ReadOnly, false, Ok(true)),
            (&Access::ReadOnly, true, Ok(true)),
            (&Access::ReadOnlyExports, false, Err(p::REP_ERR_TLS_REQD)),
            (&Access::ReadOnlyExports, true, Ok(true)),
            (&denied, false, Err(p::REP_ERR_POLICY)),
            (&denied, true, Err(p::REP_ERR_POLICY)),
        ];
        for (access, read_only, want) in cases {
            let got = access.open("disk", read_only).map_err(|r| r.reply_type);
            assert_eq!(got, want, "{access:?} opening a read_only={read_only} export");
            // Listed exactly when it may be opened.
            assert_eq!(access.may_open(read_only), want.is_ok(), "{access:?} listing read_only={read_only}");
        }
        assert_eq!(denied.list_refusal().map(|r| r.reply_type), Some(p::REP_ERR_POLICY));
        assert_eq!(Access::ReadOnlyExports.list_refusal(), None);
    }

    #[test]
    fn policies_start_where_the_mode_says() {
        assert_eq!(TlsPolicy::Off.initial_phase(), TlsPhase::Unavailable);
        assert_eq!(TlsPolicy::Off.initial_access(), Access::Full);
        assert!(TlsPolicy::Off.server_config().is_none());
        assert_eq!("optional".parse::<TlsMode>(), Ok(TlsMode::Optional));
        assert!("on".parse::<TlsMode>().is_err());
        assert_eq!(TlsMode::default(), TlsMode::Required);
    }

    #[test]
    fn server_config_from_issued_material() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::pki::CertificateAuthority::load_or_create(dir.path()).unwrap();
        let (cert, key) = ca.issue_node(NodeId(1), 1).unwrap();
        server_config(ca.cert_pem().as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap();
        assert!(matches!(server_config(b"", cert.as_bytes(), key.as_bytes()), Err(NbdTlsError::Ca(_))));
        assert!(matches!(server_config(ca.cert_pem().as_bytes(), b"", key.as_bytes()), Err(NbdTlsError::Cert(_))));
        assert!(matches!(server_config(ca.cert_pem().as_bytes(), cert.as_bytes(), b""), Err(NbdTlsError::Key(_))));
    }
}
