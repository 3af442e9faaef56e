//! Fault-injecting UDP relays for local clusters.
//!
//! Every directed pair of nodes (A, B) gets its own relay: A dials the relay instead of B (through
//! the node's `dial_via` setting) and the relay forwards datagrams to B and B's answers back to A.
//! Traffic from A to B therefore crosses two relays — A's own connections to B (relay (A,B),
//! forward direction) and B's connections to A (relay (B,A), backward direction) — and
//! [`LinkFabric::shape`] sets both, so a link can be cut, delayed, made lossy or reordered in
//! one direction only. Relays see only opaque QUIC datagrams; they never parse them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// What happens to packets in one direction of a link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkShape {
    /// Drop everything.
    pub blocked: bool,
    /// Added latency.
    pub delay: Duration,
    /// Percentage of packets dropped.
    pub loss_pct: u32,
    /// Percentage of packets held back 5–25 ms so they arrive out of order.
    pub reorder_pct: u32,
}

impl LinkShape {
    pub fn healthy() -> Self {
        Self::default()
    }
}

struct Relay {
    listen: SocketAddr,
    forward: Arc<Mutex<LinkShape>>,
    backward: Arc<Mutex<LinkShape>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn pump(
    from: Arc<UdpSocket>,
    to: Arc<UdpSocket>,
    shape: Arc<Mutex<LinkShape>>,
    peer: Arc<Mutex<Option<SocketAddr>>>,
    learn_peer: bool,
    seed: u64,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, src) = match from.recv_from(&mut buf).await {
            Ok(r) => r,
            // The forwarding socket is connected to its node; while that node is down (killed, or
            // not started yet) the kernel reports ICMP port-unreachable as ECONNREFUSED here.
            // The relay must outlive that, like a network link outlives a host.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        if learn_peer {
            *peer.lock().expect("peer lock") = Some(src);
        }
        let s = *shape.lock().expect("shape lock");
        if s.blocked || (s.loss_pct > 0 && rng.random_range(0..100) < s.loss_pct) {
            continue;
        }
        let dest = if learn_peer { None } else { *peer.lock().expect("peer lock") };
        if !learn_peer && dest.is_none() {
            continue;
        }
        let mut delay = s.delay;
        if s.reorder_pct > 0 && rng.random_range(0..100) < s.reorder_pct {
            delay += Duration::from_millis(rng.random_range(5..25));
        }
        let packet = buf[..n].to_vec();
        let to = to.clone();
        let send = async move {
            let _ = match dest {
                Some(d) => to.send_to(&packet, d).await,
                None => to.send(&packet).await,
            };
        };
        if delay.is_zero() {
            send.await;
        } else {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                send.await;
            });
        }
    }
}

impl Relay {
    async fn start(host: &str, target: SocketAddr, seed: u64) -> std::io::Result<Self> {
        let front = Arc::new(UdpSocket::bind(format!("{host}:0")).await?);
        let back = Arc::new(UdpSocket::bind(format!("{host}:0")).await?);
        back.connect(target).await?;
        let forward = Arc::new(Mutex::new(LinkShape::healthy()));
        let backward = Arc::new(Mutex::new(LinkShape::healthy()));
        let peer = Arc::new(Mutex::new(None));
        let tasks = vec![
            tokio::spawn(pump(front.clone(), back.clone(), forward.clone(), peer.clone(), true, seed)),
            tokio::spawn(pump(back, front.clone(), backward.clone(), peer, false, seed.wrapping_add(1))),
        ];
        Ok(Self { listen: front.local_addr()?, forward, backward, tasks })
    }
}

/// All relays of a cluster, keyed by directed pair (dialler, dialled).
pub struct LinkFabric {
    relays: BTreeMap<(u64, u64), Relay>,
}

impl LinkFabric {
    /// Start a relay for every ordered pair of `nodes` (id → real QUIC address).
    pub async fn start(host: &str, nodes: &BTreeMap<u64, SocketAddr>, seed: u64) -> std::io::Result<Self> {
        let mut relays = BTreeMap::new();
        for &a in nodes.keys() {
            for (&b, &addr_b) in nodes {
                if a != b {
                    relays.insert((a, b), Relay::start(host, addr_b, seed ^ (a << 8) ^ b).await?);
                }
            }
        }
        Ok(Self { relays })
    }

    /// The addresses node `id` must dial to reach each peer through its relay.
    pub fn dial_via(&self, id: u64) -> BTreeMap<u64, SocketAddr> {
        self.relays.iter().filter(|((a, _), _)| *a == id).map(|((_, b), r)| (*b, r.listen)).collect()
    }

    /// Shape traffic flowing from `a` to `b` (one direction).
    pub fn shape(&self, a: u64, b: u64, shape: LinkShape) {
        if let Some(r) = self.relays.get(&(a, b)) {
            *r.forward.lock().expect("shape lock") = shape;
        }
        if let Some(r) = self.relays.get(&(b, a)) {
            *r.backward.lock().expect("shape lock") = shape;
        }
    }

    /// Every node id with a relay.
    pub fn nodes(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.relays.keys().map(|(a, _)| *a).collect();
        ids.dedup();
        ids
    }

    /// Restore every link.
    pub fn heal_all(&self) {
        for r in self.relays.values() {
            *r.forward.lock().expect("shape lock") = LinkShape::healthy();
            *r.backward.lock().expect("shape lock") = LinkShape::healthy();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn relays_forward_and_cut_one_way() {
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let nodes = BTreeMap::from([(1, a.local_addr().unwrap()), (2, b.local_addr().unwrap())]);
        let fabric = LinkFabric::start("127.0.0.1", &nodes, 1).await.unwrap();
        let via = fabric.dial_via(1)[&2];
        let mut buf = [0u8; 16];
        // a → b through the relay, and b's answer back.
        a.send_to(b"ping", via).await.unwrap();
        let (n, relay_back) = b.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ping");
        b.send_to(b"pong", relay_back).await.unwrap();
        let (n, _) = a.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"pong");
        // Cut a → b only: b's packets still reach a.
        fabric.shape(1, 2, LinkShape { blocked: true, ..Default::default() });
        a.send_to(b"lost", via).await.unwrap();
        let r = tokio::time::timeout(Duration::from_millis(200), b.recv_from(&mut buf)).await;
        assert!(r.is_err(), "a → b must be cut");
        b.send_to(b"still", relay_back).await.unwrap();
        let (n, _) = a.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"still");
        fabric.heal_all();
        a.send_to(b"back", via).await.unwrap();
        let (n, _) = b.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"back");
    }
}
