//! Node configuration: a TOML file in the data dir (written by `haven-node init`), overridden by
//! environment variables, overridden by flags. This module owns the file format and the data-dir
//! layout; it must not start anything.
//!
//! Data-dir layout:
//! ```text
//! <data-dir>/haven.toml       this configuration
//! <data-dir>/tls/ca.pem       the cluster CA certificate
//! <data-dir>/tls/node.pem     this node's certificate (signed by the CA)
//! <data-dir>/tls/node.key     its private key (mode 0600)
//! <data-dir>/bootstrap.toml   initial members; present until the first run initialises Raft
//! <data-dir>/db/              RocksDB: raft_log, raft_meta, catalog, sm_meta, snapshot
//! <data-dir>/blocks/          RocksDB: blocks, volume_meta (the data path; see `storage`)
//! <data-dir>/recovery/plan-N/vm-M.img   recovery images of migration plan N (source host only)
//! ```

use std::path::{Path, PathBuf};

use haven_proto::MemberSpec;
use serde::{Deserialize, Serialize};

mod tunables;

pub use tunables::{FenceTunables, PlanTunables, RaftTunables, StorageLayout, StorageTunables, VolumeTunables};

pub const CONFIG_FILE: &str = "haven.toml";
pub const BOOTSTRAP_FILE: &str = "bootstrap.toml";
pub const TLS_DIR: &str = "tls";
pub const DB_DIR: &str = "db";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Everything a node needs to run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id (> 0), unique in the cluster.
    pub id: u64,
    /// Address the QUIC endpoint binds.
    pub listen: String,
    /// Address other nodes and clients dial (defaults to `listen`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Address the admin HTTP server binds (`/metrics`, `/health`, `/status`).
    pub admin_listen: String,
    /// Admin address as others should reach it (defaults to `admin_listen`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_admin: Option<String>,
    /// Deadline for a client request handled by this node, in milliseconds.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    #[serde(default)]
    pub raft: RaftTunables,
    /// Where the node keeps its databases (`[storage]`: one for Raft, one for blocks by default).
    #[serde(default)]
    pub storage: StorageTunables,
    /// Address the NBD server binds (volumes as NBD exports); none = no NBD server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_listen: Option<String>,
    /// How the NBD server admits clients (`[nbd]`: TLS mode, idle and handshake timeouts).
    #[serde(default)]
    pub nbd: crate::nbd::NbdSettings,
    #[serde(default)]
    pub volume: VolumeTunables,
    /// Guest memory this host offers to VMs, in MiB.
    #[serde(default = "default_vm_memory_mib")]
    pub vm_memory_mib: u64,
    /// Timing of migration plans (the leader's plan controller and group operations).
    #[serde(default)]
    pub plans: PlanTunables,
    /// Self-fencing: how long a host without quorum contact keeps running guests (`vm::fence`).
    #[serde(default)]
    pub fence: FenceTunables,
    /// HA pairs (`[ha]`): heartbeat period and loss window, retransmission, epochs in flight.
    #[serde(default)]
    pub ha: crate::ha::core::HaTunables,
    /// Dial these nodes at another address than the one in the membership (node id → HOST:PORT).
    /// The chaos harness points each link at its own fault-injecting relay this way.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub dial_via: std::collections::BTreeMap<String, String>,
    /// What peers and clients may make this node hold (frame deadline, connections, bytes).
    #[serde(default)]
    pub transport: crate::transport::TransportLimits,
    /// TESTING ONLY: accept fault-injection requests (`volume corrupt`). Off by default; refused
    /// requests say how to turn it on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_fault_injection: bool,
}

fn default_vm_memory_mib() -> u64 {
    16 * 1024
}

fn default_request_timeout_ms() -> u64 {
    5_000
}

/// The initial voters, written by `haven-node init --bootstrap` on exactly one node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Bootstrap {
    pub members: Vec<BootstrapMember>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootstrapMember {
    pub id: u64,
    pub addr: String,
    pub admin_addr: String,
}

impl From<&BootstrapMember> for MemberSpec {
    fn from(m: &BootstrapMember) -> Self {
        MemberSpec { id: m.id.into(), addr: m.addr.clone(), admin_addr: m.admin_addr.clone() }
    }
}

impl Bootstrap {
    /// Parse `id@addr@admin_addr,...` (the `--bootstrap` flag).
    pub fn parse_members(spec: &str) -> Result<Self, ConfigError> {
        let mut members = Vec::new();
        for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
            let fields: Vec<&str> = part.trim().split('@').collect();
            let [id, addr, admin] = fields[..] else {
                return Err(ConfigError::Invalid(format!("bootstrap member {part:?} is not ID@QUIC_ADDR@ADMIN_ADDR")));
            };
            let id: u64 = id
                .parse()
                .map_err(|_| ConfigError::Invalid(format!("bootstrap member {part:?}: id {id:?} is not a number")))?;
            check_addr("bootstrap member address", addr)?;
            check_addr("bootstrap member admin address", admin)?;
            members.push(BootstrapMember { id, addr: addr.into(), admin_addr: admin.into() });
        }
        if members.is_empty() {
            return Err(ConfigError::Invalid("bootstrap needs at least one member".into()));
        }
        Ok(Self { members })
    }
}

/// Check `host:port` syntax (the host may be a name, resolved when dialled).
pub fn check_addr(what: &str, addr: &str) -> Result<(), ConfigError> {
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(ConfigError::Invalid(format!("{what} {addr:?} is not HOST:PORT"))),
    }
}

impl NodeConfig {
    /// The `dial_via` table with parsed node ids (call after [`NodeConfig::validate`]).
    pub fn dial_overrides(&self) -> std::collections::HashMap<u64, String> {
        self.dial_via.iter().filter_map(|(k, v)| Some((k.parse().ok()?, v.clone()))).collect()
    }

    pub fn advertise(&self) -> &str {
        self.advertise.as_deref().unwrap_or(&self.listen)
    }

    pub fn advertise_admin(&self) -> &str {
        self.advertise_admin.as_deref().unwrap_or(&self.admin_listen)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(ConfigError::Invalid("node id must be greater than 0".into()));
        }
        check_addr("listen", &self.listen)?;
        check_addr("admin_listen", &self.admin_listen)?;
        check_addr("advertise", self.advertise())?;
        check_addr("advertise_admin", self.advertise_admin())?;
        self.raft.to_openraft(self.id).map_err(ConfigError::Invalid)?;
        self.fence.validate(self.raft.election_timeout_max_ms).map_err(ConfigError::Invalid)?;
        self.transport.validate().map_err(ConfigError::Invalid)?;
        self.volume.validate().map_err(ConfigError::Invalid)?;
        self.nbd.validate(self.nbd_listen.as_deref()).map_err(ConfigError::Invalid)?;
        for (id, addr) in &self.dial_via {
            id.parse::<u64>().map_err(|_| ConfigError::Invalid(format!("dial_via key {id:?} is not a node id")))?;
            check_addr(&format!("dial_via.{id}"), addr)?;
        }
        for (what, addr) in [("advertise", self.advertise()), ("advertise_admin", self.advertise_admin())] {
            if let Some(ip) = addr.rsplit_once(':').and_then(|(h, _)| h.parse::<std::net::IpAddr>().ok()) {
                if ip.is_unspecified() {
                    return Err(ConfigError::Invalid(format!(
                        "{what} {addr:?} is not dialable; set it to an address other nodes can reach"
                    )));
                }
            }
        }
        Ok(())
    }

    pub fn load(data_dir: &Path) -> Result<Self, ConfigError> {
        let path = data_dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path, message: e.message().to_string() })
    }

    pub fn save(&self, data_dir: &Path) -> Result<(), ConfigError> {
        let path = data_dir.join(CONFIG_FILE);
        let text = toml::to_string(self).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        std::fs::write(&path, text).map_err(|source| ConfigError::Read { path, source })
    }
}

impl Bootstrap {
    pub fn load(data_dir: &Path) -> Result<Option<Self>, ConfigError> {
        let path = data_dir.join(BOOTSTRAP_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        toml::from_str(&text).map(Some).map_err(|e| ConfigError::Parse { path, message: e.message().to_string() })
    }

    pub fn save(&self, data_dir: &Path) -> Result<(), ConfigError> {
        let path = data_dir.join(BOOTSTRAP_FILE);
        let text = toml::to_string(self).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        std::fs::write(&path, text).map_err(|source| ConfigError::Read { path, source })
    }

    /// Remove the bootstrap file once Raft is initialised, so it is never applied twice.
    pub fn consume(data_dir: &Path) -> std::io::Result<()> {
        match std::fs::remove_file(data_dir.join(BOOTSTRAP_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_spec_parses_and_rejects() {
        let b = Bootstrap::parse_members("1@127.0.0.1:7001@127.0.0.1:9001,2@h2:7001@h2:9001").unwrap();
        assert_eq!(b.members.len(), 2);
        assert_eq!(b.members[1].addr, "h2:7001");
        assert!(Bootstrap::parse_members("x@a:1@b:2").is_err());
        assert!(Bootstrap::parse_members("1@nope@b:2").is_err());
        assert!(Bootstrap::parse_members("1@a:1").is_err());
        assert!(Bootstrap::parse_members("").is_err());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err =
            toml::from_str::<NodeConfig>("id = 1\nlisten = \"a:1\"\nadmin_listen = \"a:2\"\nbogus = 3\n").unwrap_err();
        assert!(err.message().contains("bogus"), "{}", err.message());
    }
}
