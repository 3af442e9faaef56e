//! Identities read from certificates: which [`Caller`] a peer's certificate names, and what the
//! node reports about certificates (`havenctl cluster certs`, the start-up expiry check).
//!
//! A certificate names exactly one identity as a `haven://` URI subject alternative name (see
//! `haven_proto::auth`). A node identity also needs both the ServerAuth and ClientAuth extended
//! key usages; a client identity must not carry ServerAuth, so a client certificate can never
//! serve as a node. TLS (rustls, with the cluster CA as the only root) has already checked the
//! signature chain and the validity period before anything here runs; this module only reads the
//! verified leaf. It must not do I/O or decide what a caller may do (that is `authz`).

use haven_proto::{Caller, CertificateInfo, NodeId};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why a certificate does not name a usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("certificate cannot be parsed: {0}")]
    Unparsable(String),
    #[error("certificate names no haven:// identity (issue it with `haven-node issue-cert`)")]
    NoIdentity,
    #[error("certificate names {0} haven:// identities; exactly one is allowed")]
    SeveralIdentities(usize),
    #[error("certificate identity: {0}")]
    BadUri(String),
    #[error("{caller} certificate lacks the {usage} extended key usage a node certificate needs")]
    NodeUsage { caller: String, usage: &'static str },
    #[error("client certificate for {0} must not allow ServerAuth")]
    ClientServerAuth(String),
    #[error("certificate {what} expired at {not_after} (unix seconds); issue a new one")]
    Expired { what: String, not_after: i64 },
    #[error("certificate {what} is not valid before {not_before} (unix seconds)")]
    NotYetValid { what: String, not_before: i64 },
}

/// The identity a DER-encoded certificate names.
pub fn caller_from_der(der: &[u8]) -> Result<Caller, IdentityError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let uris = identity_uris(&cert)?;
    let uri = match uris.as_slice() {
        [] => return Err(IdentityError::NoIdentity),
        [one] => *one,
        many => return Err(IdentityError::SeveralIdentities(many.len())),
    };
    let caller = Caller::parse_uri(uri).map_err(IdentityError::BadUri)?;
    let eku = cert.extended_key_usage().map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let (server, client) = eku.map(|e| (e.value.server_auth, e.value.client_auth)).unwrap_or((false, false));
    match &caller {
        Caller::Node(_) if !server => Err(IdentityError::NodeUsage { caller: caller.to_string(), usage: "ServerAuth" }),
        Caller::Node(_) if !client => Err(IdentityError::NodeUsage { caller: caller.to_string(), usage: "ClientAuth" }),
        Caller::Client { .. } if server => Err(IdentityError::ClientServerAuth(caller.to_string())),
        _ => Ok(caller),
    }
}

fn identity_uris<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, IdentityError> {
    let san = cert.subject_alternative_name().map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    Ok(san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) if u.starts_with(haven_proto::auth::URI_SCHEME) => {
                        Some(*u)
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The identity of the peer on an authenticated QUIC connection (its leaf certificate).
pub fn connection_caller(conn: &quinn::Connection) -> Result<Caller, IdentityError> {
    let identity = conn.peer_identity().ok_or(IdentityError::NoCertificate)?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().map_err(|_| IdentityError::NoCertificate)?;
    let leaf = chain.first().ok_or(IdentityError::NoCertificate)?;
    caller_from_der(leaf)
}

/// The first certificate in a PEM file's bytes, as DER.
pub fn first_cert_der(pem: &[u8]) -> Result<CertificateDer<'static>, IdentityError> {
    CertificateDer::pem_slice_iter(pem)
        .next()
        .ok_or_else(|| IdentityError::Unparsable("no certificate in PEM".into()))?
        .map_err(|e| IdentityError::Unparsable(e.to_string()))
}

/// What `havenctl cluster certs` shows about one certificate. `identity` is the identity URI,
/// or `ca` for a CA certificate.
pub fn certificate_info(der: &[u8], reported_by: NodeId) -> Result<CertificateInfo, IdentityError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let identity = if cert.is_ca() {
        "ca".to_string()
    } else {
        identity_uris(&cert)?.first().map(|u| u.to_string()).unwrap_or_else(|| "(none)".into())
    };
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    Ok(CertificateInfo {
        identity,
        subject: cert.subject().to_string(),
        serial: cert.raw_serial_as_string(),
        not_before_unix_s: cert.validity().not_before.timestamp(),
        not_after_unix_s: cert.validity().not_after.timestamp(),
        sha256: digest.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
        reported_by,
    })
}

/// Refuse a certificate outside its validity period at `now_unix_s` (a node checks its own
/// certificate and the CA's before it starts, so it fails with this message instead of every
/// peer refusing its handshakes).
pub fn check_validity(info: &CertificateInfo, now_unix_s: i64) -> Result<(), IdentityError> {
    let what = format!("{} ({})", info.identity, info.subject);
    if now_unix_s > info.not_after_unix_s {
        return Err(IdentityError::Expired { what, not_after: info.not_after_unix_s });
    }
    if now_unix_s < info.not_before_unix_s {
        return Err(IdentityError::NotYetValid { what, not_before: info.not_before_unix_s });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::CertificateAuthority;
    use haven_proto::Role;

    fn der_of(pem: &str) -> Vec<u8> {
        first_cert_der(pem.as_bytes()).unwrap().to_vec()
    }

    #[test]
    fn issued_certificates_name_their_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let (node, _) = ca.issue_node(NodeId(3), 30).unwrap();
        assert_eq!(caller_from_der(&der_of(&node)).unwrap(), Caller::Node(NodeId(3)));
        let (client, _) = ca.issue_client(Role::Reader, "grafana", 30).unwrap();
        assert_eq!(
            caller_from_der(&der_of(&client)).unwrap(),
            Caller::Client { role: Role::Reader, name: "grafana".into() }
        );
        let ca_info = certificate_info(&der_of(ca.cert_pem()), NodeId(1)).unwrap();
        assert_eq!(ca_info.identity, "ca");
        let info = certificate_info(&der_of(&node), NodeId(1)).unwrap();
        assert_eq!(info.identity, "haven://node/3");
        assert!(info.not_after_unix_s - info.not_before_unix_s >= 30 * 86_400);
        check_validity(&info, info.not_before_unix_s + 10).unwrap();
        assert!(matches!(check_validity(&info, info.not_after_unix_s + 1), Err(IdentityError::Expired { .. })));
    }

    #[test]
    fn a_certificate_without_identity_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let (legacy, _) = ca.issue_legacy_for_tests("client").unwrap();
        assert_eq!(caller_from_der(&der_of(&legacy)), Err(IdentityError::NoIdentity));
        assert!(matches!(caller_from_der(b"not a certificate"), Err(IdentityError::Unparsable(_))));
    }
}
