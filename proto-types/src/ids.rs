//! Identifiers for the things a Haven cluster names: nodes, VMs, volumes, and actors.
//!
//! Ids are plain integers wrapped in newtypes so a `VmId` can never be passed where a `NodeId` is
//! meant. They are archived by rkyv (for envelopes) and serialized by serde (for Raft log entries).

use std::fmt;

use rkyv::{Archive, Deserialize, Serialize};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(
            Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize,
            Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default,
        )]
        #[rkyv(derive(Debug, PartialEq, Eq, Hash))]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }

        impl From<u64> for $name {
            fn from(v: u64) -> Self {
                Self(v)
            }
        }

        impl From<&Archived<$name>> for $name {
            fn from(a: &Archived<$name>) -> Self {
                Self(a.0.to_native())
            }
        }
    };
}

use rkyv::Archived;

id_type!(
    /// A cluster member. Also the Raft node id.
    NodeId,
    "node-"
);
id_type!(
    /// A virtual machine.
    VmId,
    "vm-"
);
id_type!(
    /// A replicated block volume.
    VolumeId,
    "vol-"
);
id_type!(
    /// A shared dataset (C2).
    ShareId,
    "share-"
);

/// The kind of an actor; with a node and an id it forms an [`ActorAddr`].
#[derive(
    Archive,
    Serialize,
    Deserialize,
    serde::Serialize,
    serde::Deserialize,
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
)]
#[rkyv(derive(Debug, PartialEq, Eq, Hash))]
pub enum ActorKind {
    /// The node itself: Raft RPCs and client requests are addressed here.
    Node,
    /// The per-host agent actor (one per node).
    HostAgent,
    /// A VM actor (later issues).
    Vm,
    /// A storage device actor (later issues).
    Device,
    /// A memory bank actor (later issues).
    MemBank,
    /// A share actor: one per node, serving the shares whose member the node is.
    Share,
    /// The HA actor: one per node, for the pairs the node is primary or standby of, and on the
    /// leader for heartbeats and takeover answers.
    Ha,
}

/// Where a message goes: an actor of `kind` with `id`, living on `node`.
#[derive(
    Archive,
    Serialize,
    Deserialize,
    serde::Serialize,
    serde::Deserialize,
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
)]
#[rkyv(derive(Debug, PartialEq, Eq, Hash))]
pub struct ActorAddr {
    pub node: NodeId,
    pub kind: ActorKind,
    pub id: u64,
}

impl ActorAddr {
    /// The node endpoint of `node` (Raft and client requests).
    pub fn node(node: NodeId) -> Self {
        Self { node, kind: ActorKind::Node, id: 0 }
    }

    /// The host agent of `node`.
    pub fn host_agent(node: NodeId) -> Self {
        Self { node, kind: ActorKind::HostAgent, id: node.0 }
    }
}

impl fmt::Display for ActorAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{:?}/{}", self.node, self.kind, self.id)
    }
}

impl From<&ArchivedActorKind> for ActorKind {
    fn from(a: &ArchivedActorKind) -> Self {
        match a {
            ArchivedActorKind::Node => ActorKind::Node,
            ArchivedActorKind::HostAgent => ActorKind::HostAgent,
            ArchivedActorKind::Vm => ActorKind::Vm,
            ArchivedActorKind::Device => ActorKind::Device,
            ArchivedActorKind::MemBank => ActorKind::MemBank,
            ArchivedActorKind::Share => ActorKind::Share,
            ArchivedActorKind::Ha => ActorKind::Ha,
        }
    }
}

impl From<&ArchivedActorAddr> for ActorAddr {
    fn from(a: &ArchivedActorAddr) -> Self {
        Self { node: (&a.node).into(), kind: (&a.kind).into(), id: a.id.to_native() }
    }
}
