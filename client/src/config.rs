//! The client's view of a cluster: node addresses and the certificate material to reach them,
//! stored as `client.toml` in a cluster directory (written by `havenctl dev up`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ClientError;
use crate::wire::TlsMaterial;

/// File name of the client configuration inside a cluster directory.
pub const CLIENT_CONFIG_FILE: &str = "client.toml";

/// How to reach a cluster. Relative paths are relative to the file's directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// QUIC addresses of (some of) the nodes; any one reachable node is enough.
    pub nodes: Vec<SocketAddr>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Per-request deadline, including retries, in milliseconds.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
}

fn default_deadline_ms() -> u64 {
    10_000
}

impl ClusterConfig {
    /// Load from a `client.toml` file or from a directory containing one.
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        let file = if path.is_dir() { path.join(CLIENT_CONFIG_FILE) } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file)
            .map_err(|e| ClientError::Config(format!("cannot read {}: {e}", file.display())))?;
        let mut cfg: ClusterConfig =
            toml::from_str(&text).map_err(|e| ClientError::Config(format!("{}: {}", file.display(), e.message())))?;
        let base = file.parent().unwrap_or(Path::new("."));
        for p in [&mut cfg.ca, &mut cfg.cert, &mut cfg.key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if cfg.nodes.is_empty() {
            return Err(ClientError::Config(format!("{}: `nodes` is empty", file.display())));
        }
        Ok(cfg)
    }

    /// Write as `client.toml` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<PathBuf, ClientError> {
        let file = dir.join(CLIENT_CONFIG_FILE);
        let text = toml::to_string(self).map_err(|e| ClientError::Config(e.to_string()))?;
        std::fs::write(&file, text)
            .map_err(|e| ClientError::Config(format!("cannot write {}: {e}", file.display())))?;
        Ok(file)
    }

    pub fn tls(&self) -> Result<TlsMaterial, ClientError> {
        TlsMaterial::load(&self.ca, &self.cert, &self.key).map_err(|e| ClientError::Config(e.to_string()))
    }
}
