//! Volume replication over the long-lived replication stream (`volume::stream`), with real
//! `haven-node` processes: writes reach the replica on the stream (not as one actor message
//! each); a replica frozen with SIGSTOP under a concurrent write load is dropped from the in-sync
//! set and writes go on being acknowledged; killed -9 and restarted, it is resynced, every
//! acknowledged write is readable, and the copies match. And a client certificate cannot open a
//! replication stream.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::{client_of, cluster_with, eventually, healthy_with_hosts, metric};
use haven_client::devcluster::LocalCluster;
use haven_client::proto::volume::{DeviceMessage, IntegrityVerdict};
use haven_client::proto::{
    ActorAddr, ActorKind, ActorMessage, Body, Envelope, EnvelopeFlags, ErrorCode, NodeId, VolumeId,
};
use haven_client::volumes::VolumeSpec;
use haven_client::wire::{self, SERVER_NAME};
use haven_client::HavenClient;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const WRITERS: u64 = 4;
const BLOCKS_PER_WRITER: u64 = 32;

/// The value of one labelled Prometheus series (`name{labels}` exactly as exported), 0 if absent.
fn series(c: &LocalCluster, node: u64, name: &str, labels: &[&str]) -> f64 {
    use std::io::{Read, Write};
    let admin = c.node(node).unwrap().admin;
    let mut s = std::net::TcpStream::connect(admin).expect("admin reachable");
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {admin}\r\n\r\n").as_bytes()).unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|lb| l.contains(lb)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Block `block` as write `n` leaves it: block and counter up front, the counter's low byte after.
fn pattern(block: u64, n: u64) -> Vec<u8> {
    let mut data = vec![(n & 0xff) as u8; BLOCK as usize];
    data[..8].copy_from_slice(&block.to_le_bytes());
    data[8..16].copy_from_slice(&n.to_le_bytes());
    data
}

/// The counter a block holds (0: never written), checked against its pattern.
fn counter_of(block: u64, data: &[u8]) -> u64 {
    if data.iter().all(|b| *b == 0) {
        return 0;
    }
    let n = u64::from_le_bytes(data[8..16].try_into().unwrap());
    assert_eq!(data, pattern(block, n).as_slice(), "block {block} holds a torn or foreign write");
    n
}

/// What the writers did, per block: the last acknowledged counter, the last attempted one, and
/// the counters whose outcome is unknown.
#[derive(Default)]
struct Ledger {
    acked: BTreeMap<u64, u64>,
    attempted: BTreeMap<u64, u64>,
    unknown: BTreeMap<u64, BTreeSet<u64>>,
}

impl Ledger {
    /// Every acknowledged write is there, or a later (or unknown) one of the same writer.
    fn check(&self, block: u64, held: u64) {
        let acked = self.acked.get(&block).copied().unwrap_or(0);
        let attempted = self.attempted.get(&block).copied().unwrap_or(0);
        let unknown = self.unknown.get(&block).is_some_and(|u| u.contains(&held));
        assert!(
            (held >= acked && held <= attempted) || unknown,
            "block {block} holds write {held}, but write {acked} was acknowledged (last attempted {attempted})"
        );
    }
}

/// Writes one writer's blocks round-robin, one write in flight, until `stop`.
async fn writer(client: HavenClient, vol: VolumeId, id: u64, stop: Arc<AtomicBool>, ledger: Arc<Mutex<Ledger>>) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let block = id * BLOCKS_PER_WRITER + n % BLOCKS_PER_WRITER;
        let counter = n * WRITERS + id;
        ledger.lock().unwrap().attempted.insert(block, counter);
        match client.write_volume(vol, block * BLOCK, &pattern(block, counter)).await {
            Ok(_) => {
                ledger.lock().unwrap().acked.insert(block, counter);
            }
            Err(_) => {
                ledger.lock().unwrap().unknown.entry(block).or_default().insert(counter);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_then_killed_replica_loses_no_acknowledged_write_and_resyncs() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cluster_with(tmp.path(), &[]);
    let client = healthy_with_hosts(&mut c).await;
    let v = client.create_volume(&VolumeSpec::new("streamed", 8 * MIB, 2)).await.expect("create volume");
    let vol = v.id;
    let (primary, replica) = (v.primary.0, v.replicas.iter().find(|h| **h != v.primary).unwrap().0);
    let at_primary = client_of(&c, &[primary]);
    let first = pattern(0, 0);
    eventually("volume served", || at_primary.write_volume(vol, 0, &first)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let actor_in = |c: &LocalCluster| {
        series(c, replica, "haven_transport_messages_total", &["direction=\"in\"", "kind=\"actor\""])
    };
    let actor_msgs_before = actor_in(&c);
    let mut tasks = Vec::new();
    for id in 0..WRITERS {
        let (client, stop, ledger) = (client_of(&c, &[primary]), stop.clone(), ledger.clone());
        tasks.push(tokio::spawn(writer(client, vol, id, stop, ledger)));
    }

    // Healthy: the writes reach the replica on its stream, not as an actor message each.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let actor_msgs = actor_in(&c) - actor_msgs_before;
    let seq_before_stop = at_primary.replication_status(vol).await.unwrap().next_seq;
    assert!(seq_before_stop > 50, "the writers made little progress: next point {seq_before_stop}");
    assert!(
        actor_msgs < (seq_before_stop / 4) as f64,
        "{actor_msgs} actor messages reached the replica for {seq_before_stop} writes: writes are not on the \
         replication stream"
    );
    assert!(metric(&c, NodeId(primary), "haven_volume_replication_streams_opened_total") >= 1.0);

    // Frozen: dropped from the in-sync set through Raft, and writes go on being acknowledged.
    c.signal(replica, libc::SIGSTOP).unwrap();
    let frozen = Instant::now();
    eventually("replica dropped from the in-sync set", || async {
        match at_primary.volume("streamed").await {
            Ok(r) if !r.in_sync.contains(&NodeId(replica)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let dropped_after = frozen.elapsed();
    let seq_at_drop = at_primary.replication_status(vol).await.unwrap().next_seq;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let seq_stalled = at_primary.replication_status(vol).await.unwrap().next_seq;
    assert!(
        seq_stalled > seq_at_drop + 10,
        "writes stopped while the replica was frozen ({seq_at_drop} → {seq_stalled})"
    );

    // Killed -9 while frozen; writes go on; then it comes back and is resynced.
    c.kill(replica).unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    c.start(replica).unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    eventually("replica resynced and back in sync", || async {
        match at_primary.volume("streamed").await {
            Ok(r) if r.in_sync.contains(&NodeId(replica)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // A write now needs the replica again: it goes on a new stream.
    let again = pattern(0, 1);
    eventually("write after the resync", || at_primary.write_volume(vol, 0, &again)).await;
    assert!(metric(&c, NodeId(primary), "haven_volume_replication_streams_opened_total") >= 2.0);

    // Every acknowledged write is readable, and both copies are the same.
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    for block in 1..WRITERS * BLOCKS_PER_WRITER {
        let data = at_primary.read_volume(vol, block * BLOCK, BLOCK as u32, None).await.unwrap();
        ledger.check(block, counter_of(block, &data));
    }
    let snap = at_primary.snapshot(vol, "after-resync", Some("check")).await.unwrap();
    match snap.verdict {
        IntegrityVerdict::Match { hosts, .. } => {
            assert!(hosts.contains(&NodeId(replica)) && hosts.contains(&NodeId(primary)), "{hosts:?}")
        }
        other => panic!("the copies differ after the resync: {other:?}"),
    }
    let dropped = metric(&c, NodeId(primary), "haven_volume_replica_dropped_total");
    assert!(dropped >= 1.0, "the frozen replica was never dropped");
    eprintln!(
        "{seq_before_stop} points before the freeze with {actor_msgs} actor messages at the replica; dropped \
         {dropped_after:?} after SIGSTOP; points {seq_at_drop} at the drop, {seq_stalled} a second later"
    );
    c.stop_all(Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_cannot_open_a_replication_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cluster_with(tmp.path(), &[]);
    let client = healthy_with_hosts(&mut c).await;
    let v = client.create_volume(&VolumeSpec::new("guarded", 8 * MIB, 2)).await.expect("create volume");
    let replica = v.replicas.iter().find(|h| **h != v.primary).unwrap().0;
    let addr: SocketAddr = c.node(replica).unwrap().addr;
    let before = metric(&c, NodeId(replica), "haven_authz_refused_total");
    let cfg = c.client_config();
    let material = wire::TlsMaterial::load(&cfg.ca, &cfg.cert, &cfg.key).unwrap();
    let endpoint = wire::client_endpoint(&material).unwrap();
    let conn = endpoint.connect(addr, SERVER_NAME).unwrap().await.expect("handshake");
    let dest = ActorAddr { node: NodeId(replica), kind: ActorKind::Device, id: v.id.0 };
    let hello = Body::Actor(ActorMessage::Device(DeviceMessage::ReplicationStream { volume: v.id }));
    for flags in [EnvelopeFlags::STREAM, 0] {
        let mut env = Envelope::new(1, NodeId(0), dest, hello.clone());
        env.flags = flags;
        let (reply, _, _) =
            tokio::time::timeout(Duration::from_secs(10), wire::exchange(&conn, &env)).await.unwrap().unwrap();
        match reply.body {
            Body::Error(e) if e.code == ErrorCode::PermissionDenied => {}
            other => panic!("a client opening a replication stream (flags {flags}): {other:?}"),
        }
    }
    assert!(metric(&c, NodeId(replica), "haven_authz_refused_total") >= before + 2.0);
    // The volume still replicates.
    let data = pattern(0, 7);
    eventually("write", || client.write_volume(v.id, 0, &data)).await;
    c.stop_all(Duration::from_secs(5));
}
