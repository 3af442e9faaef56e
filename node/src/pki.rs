//! The cluster's certificate authority and the certificates it issues (rcgen).
//!
//! `haven-node init` creates a CA (or reuses one it is given) and signs a certificate for the
//! node; the same CA signs client certificates for havenctl and the SDK. Each certificate names
//! one identity as a URI SAN (`haven://node/3`, `haven://client/admin/cli`; see
//! `haven_proto::auth`) that the transport binds to every connection. Node certificates allow
//! ServerAuth and ClientAuth and carry the server name [`haven_client::wire::SERVER_NAME`], so
//! any node can be dialled by the same name; client certificates allow ClientAuth only, so a
//! client can never act as a node. Every certificate has a bounded validity period. Private keys
//! are written with mode 0600. This module must not open network connections.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use haven_client::wire::SERVER_NAME;
use haven_proto::{Caller, NodeId, Role};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// How long a new CA is valid.
pub const CA_VALID_DAYS: u32 = 3650;
/// How long a node certificate is valid by default.
pub const NODE_VALID_DAYS: u32 = 825;
/// How long a client certificate is valid by default.
pub const CLIENT_VALID_DAYS: u32 = 365;

/// File names inside a CA directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_path_buf(), source }
}

/// A CA loaded from (or created in) a directory.
pub struct CertificateAuthority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl CertificateAuthority {
    /// Load `ca.pem` and `ca.key` from `dir`, creating a new CA there when neither exists.
    pub fn load_or_create(dir: &Path) -> Result<Self, PkiError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Self::load(&cert_path, &key_path),
            (false, false) => {
                fs::create_dir_all(dir).map_err(io_err(dir))?;
                let ca = Self::create()?;
                write_private(&key_path, ca.issuer.key().serialize_pem().as_bytes())?;
                fs::write(&cert_path, &ca.cert_pem).map_err(io_err(&cert_path))?;
                Ok(ca)
            }
            _ => Err(PkiError::Invalid(format!(
                "{} holds only one of {CA_CERT} and {CA_KEY}; refusing to overwrite it",
                dir.display()
            ))),
        }
    }

    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let cert_pem = fs::read_to_string(cert_path).map_err(io_err(cert_path))?;
        let key_pem = fs::read_to_string(key_path).map_err(io_err(key_path))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(Self { cert_pem, issuer })
    }

    fn create() -> Result<Self, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Haven cluster CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, CA_VALID_DAYS);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self { cert_pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issue node `id`'s certificate: `haven://node/<id>`, usable as a TLS server and client
    /// (nodes are both), valid for `days`. Returns (cert PEM, key PEM).
    pub fn issue_node(&self, id: NodeId, days: u32) -> Result<(String, String), PkiError> {
        let caller = Caller::Node(id);
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_string(), "localhost".to_string()])?;
        params.subject_alt_names.push(SanType::URI(caller.uri().try_into()?));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, &format!("node-{}", id.0), days)
    }

    /// Issue a client certificate `haven://client/<role>/<name>`: ClientAuth only, valid for
    /// `days`. Returns (cert PEM, key PEM).
    pub fn issue_client(&self, role: Role, name: &str, days: u32) -> Result<(String, String), PkiError> {
        haven_proto::auth::client_name_ok(name).map_err(PkiError::Invalid)?;
        let caller = Caller::Client { role, name: name.to_string() };
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names.push(SanType::URI(caller.uri().try_into()?));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, name, days)
    }

    /// A certificate of the kind issued before identities existed (no identity URI, both
    /// usages): the transport must refuse it.
    #[cfg(test)]
    pub fn issue_legacy_for_tests(&self, common_name: &str) -> Result<(String, String), PkiError> {
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, common_name, 30)
    }

    fn sign(&self, mut params: CertificateParams, common_name: &str, days: u32) -> Result<(String, String), PkiError> {
        if days == 0 {
            return Err(PkiError::Invalid("a certificate must be valid for at least one day".into()));
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        // KeyEncipherment too: qemu's tls-creds-x509 (NBD over TLS) refuses a certificate whose
        // critical key usage lacks it, whatever the key type.
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        set_validity(&mut params, days);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Write `ca.pem`, `<stem>.pem` and `<stem>.key` into `dir`.
    pub fn write_into(&self, dir: &Path, stem: &str, (cert, key): (String, String)) -> Result<(), PkiError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let ca_path = dir.join(CA_CERT);
        fs::write(&ca_path, &self.cert_pem).map_err(io_err(&ca_path))?;
        let cert_path = dir.join(format!("{stem}.pem"));
        fs::write(&cert_path, cert).map_err(io_err(&cert_path))?;
        write_private(&dir.join(format!("{stem}.key")), key.as_bytes())
    }
}

/// Valid from an hour ago (clock skew between hosts) for `days` days.
fn set_validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    let mut f =
        fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_is_created_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let again = CertificateAuthority::load_or_create(dir.path()).unwrap();
        assert_eq!(ca.cert_pem(), again.cert_pem());
        let (cert, key) = again.issue_node(NodeId(1), 1).unwrap();
        assert!(cert.contains("BEGIN CERTIFICATE"));
        assert!(key.contains("PRIVATE KEY"));
    }

    #[test]
    fn half_a_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(CA_CERT), "x").unwrap();
        assert!(matches!(CertificateAuthority::load_or_create(dir.path()), Err(PkiError::Invalid(_))));
    }
}
