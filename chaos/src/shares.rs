//! The share workload: one shared dataset (C2) whose members are every node; one writer per
//! member puts its own keys (`m<member>/k<slot>`) at that member, one put at a time, while the
//! faults fire. Every put is recorded in the [`History`](crate::history) as a `share_put` (Ok =
//! acknowledged as the scenario's `ack` asks; Fail = certainly not applied; Info = unknown: a
//! put that timed out waiting for the hub is durable at its member and syncs later).
//!
//! This module does the I/O of the `share-converged` checker (setup, puts, reading every
//! member's copy after healing); the judging is [`crate::checker::shares`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use haven_client::proto::share::{ShareAck, ShareRecord};
use haven_client::proto::NodeId;
use haven_client::HavenClient;
use tracing::info;

use crate::checker::shares::MemberCopy;
use crate::history::{Op, OpKind, Outcome};
use crate::scenario::{ShareAckSpec, ShareSpec};

/// The share key member `member`'s writer puts in slot `slot`.
pub fn share_key(member: u64, slot: u64) -> String {
    format!("m{member}/k{slot}")
}

/// The value the `n`th put of member `member`'s writer writes.
pub fn share_value(member: u64, n: u64) -> Vec<u8> {
    format!("m{member}/n{n}").into_bytes()
}

/// The put number a value of member `member`'s writer carries (None: not one it wrote).
pub fn decode_share_value(member: u64, v: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(v).ok()?;
    let (who, n) = s.split_once('/')?;
    (who == format!("m{member}")).then_some(())?;
    n.strip_prefix('n')?.parse().ok()
}

/// Create (or adopt) the share on every node and wait until every member answers.
pub async fn setup(
    client: &HavenClient,
    spec: &ShareSpec,
    nodes: &[u64],
    within: Duration,
) -> anyhow::Result<ShareRecord> {
    let deadline = Instant::now() + within;
    let members: Vec<NodeId> = nodes.iter().copied().map(NodeId).collect();
    let share = match client.share(&spec.name).await {
        Ok(s) => s,
        Err(_) => match client.create_share(&spec.name, &members).await {
            Ok(s) => s,
            Err(e) => {
                client.share(&spec.name).await.map_err(|_| e).with_context(|| format!("creating {}", spec.name))?
            }
        },
    };
    loop {
        let status = client.share_members(share.id).await;
        let ready = status.as_ref().is_ok_and(|m| m.len() == members.len() && m.iter().all(|s| s.reachable));
        if ready {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "share {} never had every member answering: {status:?}", spec.name);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    info!(share = %share.id, members = ?share.members, hub = %share.hub, "share workload ready");
    Ok(share)
}

/// Run one writer per member until `stop`.
pub async fn run(
    spec: &ShareSpec,
    share: &ShareRecord,
    clients: Vec<HavenClient>,
    epoch: Instant,
    stop: tokio::sync::watch::Receiver<bool>,
    history: Arc<Mutex<Vec<Op>>>,
) {
    let mut writers = Vec::new();
    for (member, client) in share.members.iter().copied().zip(clients) {
        let (spec, share, history, mut stop) = (spec.clone(), share.id, history.clone(), stop.clone());
        let client = client.with_deadline(spec.op_timeout);
        let ack = match spec.ack {
            ShareAckSpec::Hub => ShareAck::Hub,
            ShareAckSpec::All => ShareAck::AllMembers,
        };
        writers.push(tokio::spawn(async move {
            let period = Duration::from_secs_f64(1.0 / f64::from(spec.put_rate));
            let mut n = 0u64;
            while !*stop.borrow() {
                n += 1;
                let slot = (n - 1) % spec.keys;
                let invoke = epoch.elapsed();
                let key = share_key(member.0, slot);
                let result = client.share_put(share, Some(member), &key, Some(share_value(member.0, n)), ack).await;
                let (outcome, error) = match result {
                    Ok(_) => (Outcome::Ok { read: None, cas_matched: None }, None),
                    Err(e) => (Outcome::of_put_error(&e), Some(e.to_string())),
                };
                Op {
                    id: 0,
                    client: member.0 as usize,
                    key: format!("share/{}/k{slot}", member.0),
                    kind: OpKind::SharePut { member: member.0, slot, n },
                    invoke_us: invoke.as_micros() as u64,
                    complete_us: epoch.elapsed().as_micros() as u64,
                    outcome,
                    error,
                }
                .record(&history);
                let spent = epoch.elapsed().saturating_sub(invoke);
                if spent < period {
                    tokio::select! {
                        _ = tokio::time::sleep(period - spent) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }));
    }
    for w in writers {
        let _ = w.await;
    }
}

/// After healing: read every member's copy until all are identical or `within` passed. Returns
/// the last copies read and how long it took them to agree (None: they never did).
pub async fn final_copies(
    client: &HavenClient,
    share: &ShareRecord,
    within: Duration,
) -> (BTreeMap<u64, MemberCopy>, Option<u64>) {
    let client = client.clone().with_deadline(Duration::from_secs(2));
    let began = Instant::now();
    loop {
        let mut copies = BTreeMap::new();
        for &m in &share.members {
            let doc = client.share_get(share.id, Some(m), None, None, Duration::ZERO).await;
            copies.insert(m.0, doc.map(|d| d.entries).map_err(|e| e.to_string()));
        }
        let read: Vec<&Vec<(String, Vec<u8>)>> = copies.values().filter_map(|c| c.as_ref().ok()).collect();
        let agreed = read.len() == copies.len() && read.windows(2).all(|w| w[0] == w[1]);
        if agreed {
            return (copies, Some(began.elapsed().as_millis() as u64));
        }
        if began.elapsed() >= within {
            return (copies, None);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
