//! Watches the cluster during a run: polls every node's status and records each change of who
//! claims leadership, so the report can draw leader changes and measure failover times.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use haven_client::proto::NodeRole;
use haven_client::HavenClient;
use serde::Serialize;

/// Who claimed leadership at a moment (only changes are recorded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaderSample {
    pub t_ms: u64,
    /// (node, term) of every node that reported itself leader.
    pub leaders: Vec<(u64, u64)>,
}

/// Poll every node every `period` until `stop`, recording leadership changes. Each node is polled
/// by its own task, so a dead or paused node (whose polls time out) does not slow down noticing
/// the others.
pub async fn run(
    client: HavenClient,
    nodes: Vec<(u64, SocketAddr)>,
    epoch: Instant,
    period: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
    samples: Arc<Mutex<Vec<LeaderSample>>>,
) {
    let client = client.with_deadline(Duration::from_millis(100));
    let claims: Arc<Mutex<BTreeMap<u64, Option<u64>>>> = Arc::default();
    let tasks: Vec<_> = nodes
        .into_iter()
        .map(|(id, addr)| {
            let (client, claims, samples, stop) = (client.clone(), claims.clone(), samples.clone(), stop.clone());
            tokio::spawn(async move {
                loop {
                    if *stop.borrow() {
                        return;
                    }
                    let claim = match tokio::time::timeout(Duration::from_millis(100), client.status_of(addr)).await {
                        Ok(Ok(s)) if s.role == NodeRole::Leader => Some(s.term),
                        _ => None,
                    };
                    let t_ms = epoch.elapsed().as_millis() as u64;
                    let leaders = {
                        let mut c = claims.lock().expect("claims lock");
                        c.insert(id, claim);
                        c.iter().filter_map(|(n, t)| t.map(|t| (*n, t))).collect::<Vec<_>>()
                    };
                    {
                        let mut s = samples.lock().expect("samples lock");
                        if s.last().map(|l| &l.leaders) != Some(&leaders) {
                            s.push(LeaderSample { t_ms, leaders });
                        }
                    }
                    tokio::time::sleep(period).await;
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

/// Milliseconds from `t_ms` until a node other than `victim` claims leadership with a term
/// above `term_before`, if that happened.
pub fn failover_ms(samples: &[LeaderSample], t_ms: u64, victim: u64, term_before: u64) -> Option<u64> {
    samples
        .iter()
        .filter(|s| s.t_ms >= t_ms)
        .find(|s| s.leaders.iter().any(|&(n, term)| n != victim && term > term_before))
        .map(|s| s.t_ms - t_ms)
}

/// The leader (and its term) most recently observed at or before `t_ms`.
pub fn leader_at(samples: &[LeaderSample], t_ms: u64) -> Option<(u64, u64)> {
    samples.iter().rev().find(|s| s.t_ms <= t_ms).and_then(|s| s.leaders.iter().max_by_key(|(_, term)| *term).copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_is_first_new_leader_with_higher_term() {
        let s = vec![
            LeaderSample { t_ms: 0, leaders: vec![(1, 1)] },
            LeaderSample { t_ms: 100, leaders: vec![] },
            LeaderSample { t_ms: 180, leaders: vec![(1, 1)] },
            LeaderSample { t_ms: 350, leaders: vec![(2, 2)] },
        ];
        assert_eq!(failover_ms(&s, 90, 1, 1), Some(260));
        assert_eq!(leader_at(&s, 50), Some((1, 1)));
        assert_eq!(failover_ms(&s, 400, 2, 2), None);
    }
}
