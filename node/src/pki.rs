//! The cluster's certificate authority and the certificates it issues (rcgen).
//!
//! `haven-node init` creates a CA (or reuses one it is given) and signs a certificate for the
//! node; the same CA signs client certificates for havenctl and the SDK. Every certificate
//! carries the server name [`haven_client::wire::SERVER_NAME`] so any node can be dialled by the
//! same name; trust comes only from the CA signature. Private keys are written with mode 0600.
//! This module must not open network connections.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use haven_client::wire::SERVER_NAME;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

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
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self { cert_pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issue a certificate usable both as a TLS server and a TLS client (nodes are both), with
    /// `common_name` as its subject. Returns (cert PEM, key PEM).
    pub fn issue(&self, common_name: &str) -> Result<(String, String), PkiError> {
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_string(), "localhost".to_string()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issue a certificate and write `ca.pem`, `<stem>.pem` and `<stem>.key` into `dir`.
    pub fn issue_into(&self, dir: &Path, stem: &str, common_name: &str) -> Result<(), PkiError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let (cert, key) = self.issue(common_name)?;
        let ca_path = dir.join(CA_CERT);
        fs::write(&ca_path, &self.cert_pem).map_err(io_err(&ca_path))?;
        let cert_path = dir.join(format!("{stem}.pem"));
        fs::write(&cert_path, cert).map_err(io_err(&cert_path))?;
        write_private(&dir.join(format!("{stem}.key")), key.as_bytes())
    }
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
        let (cert, key) = again.issue("node-1").unwrap();
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
