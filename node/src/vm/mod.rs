//! Virtual machines (C1): the simulated guest behind a driver trait ([`guest`]), its disk
//! workload and the check that proves its disks lost nothing ([`disk`], served by
//! [`disk_backend`]), the pre-copy live-migration engine that moves a guest's memory between
//! hosts ([`migration`]), and the
//! group operations of migration plans — pause-all, recovery images, consolidation, restore
//! ([`group`]).
//!
//! There is no hypervisor on these hosts, so a VM is a guest model that behaves like one where it
//! matters: memory of N pages with dirty tracking, a vCPU state, attached volumes, and a workload
//! whose every write carries a sequence number and checksum. Controllers and actors talk to a
//! guest only through [`guest::GuestDriver`], so a real hypervisor driver (QEMU over QMP) can be
//! added without touching them. `guest` and `migration` must not talk to the network or the
//! catalog; [`host`] is the node-side glue that does (placement, run state, migration streams),
//! and [`group`] acts on a host's VMs for the leader's plan controller without writing the catalog.
//! [`fence`] is the host lease: a host without recent quorum contact pauses its guests and runs
//! none, so a cut-off host cannot keep a VM running after the catalog moved it elsewhere.

pub mod disk;
pub mod disk_backend;
pub mod error;
pub mod fence;
pub mod group;
pub mod guest;
pub mod host;
pub mod link;
pub mod migration;
