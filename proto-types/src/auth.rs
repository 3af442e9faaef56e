//! Who is speaking: the identities certificates carry and the roles clients hold.
//!
//! Every certificate the cluster CA issues names exactly one identity as a URI subject
//! alternative name: `haven://node/<id>` for a node, `haven://client/<role>/<name>` for a client.
//! This module owns that naming ([`Caller::uri`], [`Caller::parse_uri`]) and the [`Caller`] a
//! node binds to each connection; it must not parse certificates (the node does, with
//! `x509-parser`) nor decide what a caller may do (the node's authorization table does).

use std::fmt;

use rkyv::{Archive, Deserialize, Serialize};

use crate::ids::NodeId;

/// The URI scheme of Haven identities.
pub const URI_SCHEME: &str = "haven://";
/// Longest client name a certificate may carry.
pub const MAX_CLIENT_NAME_LEN: usize = 64;

/// What a client certificate allows.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash,
)]
#[rkyv(derive(Debug))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything a user may do: create, change and delete, migrate, drain.
    Admin,
    /// Status, lists, shows and reads; no writes and no faults.
    Reader,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Reader => "reader",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Self::Admin),
            "reader" => Ok(Self::Reader),
            other => Err(format!("unknown role {other:?} (expected admin or reader)")),
        }
    }
}

/// An authenticated identity: a cluster node, or a client holding a role.
#[derive(Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug))]
#[serde(rename_all = "lowercase")]
pub enum Caller {
    Node(NodeId),
    Client { role: Role, name: String },
}

impl Caller {
    pub fn is_node(&self) -> bool {
        matches!(self, Self::Node(_))
    }

    /// The node id, when the caller is a node.
    pub fn node(&self) -> Option<NodeId> {
        match self {
            Self::Node(id) => Some(*id),
            Self::Client { .. } => None,
        }
    }

    /// The URI a certificate names this identity with.
    pub fn uri(&self) -> String {
        match self {
            Self::Node(id) => format!("{URI_SCHEME}node/{}", id.0),
            Self::Client { role, name } => format!("{URI_SCHEME}client/{role}/{name}"),
        }
    }

    /// Parse an identity URI (the inverse of [`Caller::uri`]); anything else is refused.
    pub fn parse_uri(uri: &str) -> Result<Self, String> {
        let rest = uri.strip_prefix(URI_SCHEME).ok_or_else(|| format!("{uri:?} is not a haven:// identity"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["node", id] => match id.parse::<u64>() {
                Ok(n) if n > 0 && id.chars().all(|c| c.is_ascii_digit()) => Ok(Self::Node(NodeId(n))),
                _ => Err(format!("{uri:?}: node id must be a positive integer")),
            },
            ["client", role, name] => {
                let role = role.parse::<Role>().map_err(|e| format!("{uri:?}: {e}"))?;
                client_name_ok(name).map_err(|e| format!("{uri:?}: {e}"))?;
                Ok(Self::Client { role, name: name.to_string() })
            }
            _ => Err(format!("{uri:?} names neither haven://node/ID nor haven://client/ROLE/NAME")),
        }
    }
}

/// A client name: 1..=64 letters, digits, '-', '_' or '.'.
pub fn client_name_ok(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_CLIENT_NAME_LEN {
        return Err(format!("client name must be 1..={MAX_CLIENT_NAME_LEN} bytes"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(format!("client name {name:?} may contain only letters, digits, '-', '_' and '.'"));
    }
    Ok(())
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Node(id) => write!(f, "{id}"),
            Self::Client { role, name } => write!(f, "client {name} ({role})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip() {
        for c in [
            Caller::Node(NodeId(3)),
            Caller::Client { role: Role::Admin, name: "cli".into() },
            Caller::Client { role: Role::Reader, name: "grafana.1".into() },
        ] {
            assert_eq!(Caller::parse_uri(&c.uri()).unwrap(), c);
        }
    }

    #[test]
    fn malformed_uris_are_refused() {
        for bad in [
            "",
            "haven://",
            "https://node/1",
            "haven://node/0",
            "haven://node/-1",
            "haven://node/+1",
            "haven://node/1/2",
            "haven://node/18446744073709551616",
            "haven://client/root/x",
            "haven://client/admin/",
            "haven://client/admin/a/b",
            "haven://client/admin/bad name",
        ] {
            assert!(Caller::parse_uri(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
