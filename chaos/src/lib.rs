//! Haven's chaos harness. A [`scenario::Scenario`] names a cluster, a workload, a fault schedule
//! and checkers; [`run::run`] builds the cluster through a [`backend`], runs the
//! [`workload`] while faults fire (host faults by signal or docker, link faults through
//! [`relay`]s), heals everything, and judges the recorded [`history`] with the [`checker`]s. The
//! [`report`] is JSON, a text summary and a timeline picture. Same scenario and seed, same fault
//! schedule and same client operations; the report prints the one-line replay command. With a
//! `[blocks]` section a [`blocks`] workload writes to a replicated volume alongside, judged by
//! [`checker::blocks`]; with `[vms]` a [`vms`] workload live-migrates guests between hosts,
//! judged by [`checker::vms`] (no VM lost, none running twice, memory intact); with
//! `[operations]` an [`operations`] workload snapshots, rolls back, clones, resizes and drives DR
//! relationships of a volume while writers write to it, judged by [`checker::operations`]; with
//! `[ha]` an [`ha`] workload protects guests with HA pairs and puts to their application state
//! while a sampler watches every host's role, judged by [`checker::ha`] (nothing acknowledged
//! lost, one primary, data intact, failovers happen); with `[shares]` a [`shares`] workload
//! writes one shared dataset at every member, judged by [`checker::shares`] (copies converge,
//! nothing acknowledged lost).

pub mod backend;
pub mod blocks;
pub mod checker;
pub mod ha;
pub mod history;
pub mod monitor;
pub mod operations;
pub mod relay;
pub mod report;
pub mod run;
pub mod scenario;
pub mod shares;
pub mod vms;
pub mod workload;
