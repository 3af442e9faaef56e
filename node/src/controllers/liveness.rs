//! Which hosts answer: the leader's probe of every host agent, shared by the controllers that
//! act on a host going silent (volume failover, share hub moves). A host is up while it answered
//! a ping within `down_after`; a host first seen counts as up for one full window, so a new
//! leader judges no host before giving it time to answer. Holds no state a new leader needs.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use haven_proto::{ActorAddr, ActorMessage, NodeId};

use super::LeaderHandles;
use crate::catalog;

pub struct HostLiveness {
    last_ok: HashMap<NodeId, Instant>,
    down_after: Duration,
}

impl HostLiveness {
    pub fn new(down_after: Duration) -> Self {
        Self { last_ok: HashMap::new(), down_after }
    }

    /// Forget every host (a fresh leadership judges nobody before a full window).
    pub fn clear(&mut self) {
        self.last_ok.clear();
    }

    /// Ping every recorded host's agent once (each within `timeout`); this node is up.
    pub async fn probe(&mut self, leader: &LeaderHandles, timeout: Duration) {
        let me = leader.view.id();
        let now = Instant::now();
        let Ok(hosts) = catalog::hosts(&leader.store) else { return };
        let probes = hosts.iter().filter(|h| h.id != me).map(|h| {
            let (registry, id) = (leader.registry.clone(), h.id);
            async move {
                let ping = registry.send_timeout(ActorAddr::host_agent(id), ActorMessage::Ping { nonce: 0 }, timeout);
                (id, ping.await.is_ok())
            }
        });
        for (id, ok) in futures::future::join_all(probes).await {
            let entry = self.last_ok.entry(id).or_insert(now);
            if ok {
                *entry = Instant::now();
            }
        }
        self.last_ok.insert(me, Instant::now());
    }

    pub fn is_up(&self, id: &NodeId) -> bool {
        self.last_ok.get(id).is_some_and(|t| t.elapsed() < self.down_after)
    }
}
