//! The trust boundary, end to end against real `haven-node` processes: what a client certificate
//! (admin or reader) may not send, directly or relayed through another node; a node that claims
//! another node's id; envelope flags only nodes may set; fault injection without the testing
//! switch; and the resource bounds (a trickled 16 MiB frame, a flood of streams) with the node's
//! resident memory measured before and after.
//!
//! Every refusal must be a typed `PermissionDenied` (or `LimitExceeded`) reply, counted in the
//! node's metrics, with the cluster's state unchanged.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

mod common;

use common::{cluster_with, metric};
use haven_client::devcluster::LocalCluster;
use haven_client::proto::plan::GroupRequest;
use haven_client::proto::vm::VmMessage;
use haven_client::proto::volume::{DeviceMessage, VolumeRequest};
use haven_client::proto::{
    ActorAddr, ActorKind, ActorMessage, Body, Caller, CatalogCommand, ClientCommand, ClientRequest, Envelope,
    EnvelopeFlags, ErrorCode, NodeId, NodeRequest, RaftRpc, Role, VmId, VolumeId,
};
use haven_client::wire::{self, TlsMaterial, SERVER_NAME};
use haven_client::HavenClient;

const HEALTHY: Duration = Duration::from_secs(30);

async fn healthy(c: &mut LocalCluster) -> HavenClient {
    let client = c.client().unwrap();
    c.wait_healthy(&client, &[1, 2, 3], HEALTHY).await.expect("cluster healthy");
    client
}

/// A client certificate of `role` issued by the cluster's CA with the stock CLI.
fn client_material(c: &LocalCluster, role: &str, name: &str) -> TlsMaterial {
    let out_dir = c.dir().join(format!("certs-{name}"));
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_haven-node"))
        .args(["issue-cert", "--ca-dir"])
        .arg(c.dir().join("ca"))
        .arg("--out")
        .arg(&out_dir)
        .args(["--role", role, "--name", name])
        .status()
        .unwrap();
    assert!(status.success(), "issue-cert --role {role}");
    TlsMaterial::load(
        &out_dir.join("ca.pem"),
        &out_dir.join(format!("{name}.pem")),
        &out_dir.join(format!("{name}.key")),
    )
    .unwrap()
}

/// A genuine node certificate for node `id` from the cluster's CA (what a stolen node key gives).
fn node_material(c: &LocalCluster, id: u64) -> TlsMaterial {
    let ca_dir = c.dir().join("ca");
    let ca = haven_node::pki::CertificateAuthority::load(&ca_dir.join("ca.pem"), &ca_dir.join("ca.key")).unwrap();
    let (cert, key) = ca.issue_node(NodeId(id), 1).unwrap();
    TlsMaterial { ca_pem: ca.cert_pem().as_bytes().to_vec(), cert_pem: cert.into_bytes(), key_pem: key.into_bytes() }
}

/// A raw connection speaking frames the way the node's own transport does.
struct Raw {
    conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

impl Raw {
    async fn connect(material: &TlsMaterial, addr: SocketAddr) -> Self {
        let endpoint = wire::client_endpoint(material).unwrap();
        let conn = endpoint.connect(addr, SERVER_NAME).unwrap().await.expect("handshake");
        Self { conn, _endpoint: endpoint }
    }

    async fn send(
        &self,
        sender: u64,
        dest: ActorAddr,
        flags: u32,
        on_behalf_of: Option<Caller>,
        body: Body,
    ) -> Envelope {
        let mut env = Envelope::new(rand::random(), NodeId(sender), dest, body);
        env.flags = flags;
        env.on_behalf_of = on_behalf_of;
        let (reply, _, _) =
            tokio::time::timeout(Duration::from_secs(10), wire::exchange(&self.conn, &env)).await.unwrap().unwrap();
        reply
    }
}

fn assert_denied(reply: &Envelope, what: &str) {
    match &reply.body {
        Body::Error(e) if e.code == ErrorCode::PermissionDenied => {}
        other => panic!("{what}: expected PermissionDenied, got {other:?}"),
    }
}

fn denials(c: &LocalCluster, node: u64) -> f64 {
    metric(c, NodeId(node), "haven_authz_refused_total")
}

fn vote(term: u64, candidate: u64) -> Body {
    let req = openraft::raft::VoteRequest::<u64>::new(openraft::Vote::new(term, candidate), None);
    Body::Raft { rpc: RaftRpc::Vote, payload: haven_node::raft::encode(&req).unwrap() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cannot_speak_for_nodes_and_readers_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster_with(dir.path(), &[]);
    let client = healthy(&mut c).await;
    client.kv_put("guard", b"original").await.unwrap();
    let leader = client.leader_status().await.unwrap();
    let (leader_id, term) = (leader.leader.unwrap().0, leader.term);
    let follower = [1, 2, 3].into_iter().find(|n| *n != leader_id).unwrap();
    let addr = |n: u64| c.node(n).unwrap().addr;
    let admin = client_material(&c, "admin", "ops");
    let reader = client_material(&c, "reader", "grafana");
    let before: f64 = [1, 2, 3].iter().map(|n| denials(&c, *n)).sum();

    // Node-only messages, from an admin client, sent to the leader and to a follower that would
    // relay them to their owner.
    let forged: Vec<(&str, Body, ActorAddr)> = vec![
        ("Raft Vote", vote(1_000_000, 99), ActorAddr::node(NodeId(leader_id))),
        (
            "internal catalog command",
            Body::Node(NodeRequest::Propose {
                command: CatalogCommand::KvPut { key: "guard".into(), value: b"forged".to_vec() },
            }),
            ActorAddr::node(NodeId(leader_id)),
        ),
        (
            "device RollbackTo",
            Body::Actor(ActorMessage::Device(DeviceMessage::RollbackTo { volume: VolumeId(1), epoch: 1000, seq: 0 })),
            ActorAddr { node: NodeId(leader_id), kind: ActorKind::Device, id: 1 },
        ),
        (
            "group Release",
            Body::Actor(ActorMessage::Vm(VmMessage::Group(GroupRequest::Release {
                plan: 1,
                volume_snapshots: vec![],
            }))),
            ActorAddr::host_agent(NodeId(leader_id)),
        ),
        (
            "incoming migration",
            Body::Actor(ActorMessage::Vm(VmMessage::IncomingMigration { vm: VmId(1), generation: 1 })),
            ActorAddr { node: NodeId(leader_id), kind: ActorKind::Vm, id: 1 },
        ),
    ];
    for material in [&admin, &reader] {
        for target in [leader_id, follower] {
            let raw = Raw::connect(material, addr(target)).await;
            for (what, body, dest) in &forged {
                let reply = raw.send(0, *dest, 0, None, body.clone()).await;
                assert_denied(&reply, &format!("{what} to node {target}"));
            }
            // The envelope flags only nodes set.
            let ping = Body::Actor(ActorMessage::Ping { nonce: 1 });
            let host = ActorAddr::host_agent(NodeId(target));
            assert_denied(&raw.send(0, host, EnvelopeFlags::FORWARDED, None, ping.clone()).await, "FORWARDED flag");
            assert_denied(&raw.send(0, host, EnvelopeFlags::STREAM, None, forged[4].1.clone()).await, "STREAM flag");
            // Claiming to be a node, or to relay for someone.
            assert_denied(&raw.send(target, host, 0, None, ping.clone()).await, "client claiming a node id");
            let boss = Caller::Client { role: Role::Admin, name: "boss".into() };
            assert_denied(&raw.send(0, host, 0, Some(boss), ping.clone()).await, "client relaying");
            // What clients may do still works, relayed to the owning node included.
            let other = ActorAddr::host_agent(NodeId(if target == 1 { 2 } else { 1 }));
            match raw.send(0, other, 0, None, ping).await.body {
                Body::ActorReply(_) => {}
                other => panic!("a relayed ping must work: {other:?}"),
            }
        }
    }

    // A reader can read but not write, also through a follower that forwards to the leader.
    let reader_raw = Raw::connect(&reader, addr(follower)).await;
    let write = Body::Client(ClientRequest::Write {
        command: ClientCommand::KvPut { key: "guard".into(), value: b"reader".to_vec() },
    });
    assert_denied(&reader_raw.send(0, ActorAddr::node(NodeId(follower)), 0, None, write).await, "reader write");
    let volume_write = Body::Client(ClientRequest::Volume(VolumeRequest::Write {
        volume: VolumeId(1),
        offset: 0,
        data: vec![0; 4096],
    }));
    assert_denied(
        &reader_raw.send(0, ActorAddr::node(NodeId(follower)), 0, None, volume_write).await,
        "reader volume write",
    );
    match reader_raw.send(0, ActorAddr::node(NodeId(follower)), 0, None, Body::Client(ClientRequest::WhoAmI)).await.body
    {
        Body::ClientReply(haven_client::proto::ClientResponse::Identity(Caller::Client {
            role: Role::Reader,
            name,
        })) => {
            assert_eq!(name, "grafana")
        }
        other => panic!("whoami: {other:?}"),
    }

    // Fault injection is refused without the testing switch, even for an admin.
    let admin_raw = Raw::connect(&admin, addr(leader_id)).await;
    let corrupt = Body::Client(ClientRequest::Volume(VolumeRequest::InjectCorruption {
        volume: VolumeId(1),
        host: NodeId(1),
        block: 0,
        data: vec![0; 16],
    }));
    let reply = admin_raw.send(0, ActorAddr::node(NodeId(leader_id)), 0, None, corrupt).await;
    match &reply.body {
        Body::Error(e) if e.code == ErrorCode::PermissionDenied && e.message.contains("--allow-fault-injection") => {}
        other => panic!("fault injection without the switch: {other:?}"),
    }

    // A genuine node certificate cannot claim another node's id.
    let node1 = node_material(&c, 1);
    let impostor = Raw::connect(&node1, addr(leader_id)).await;
    assert_denied(
        &impostor.send(2, ActorAddr::node(NodeId(leader_id)), 0, None, vote(term + 5, 2)).await,
        "node 1 as node 2",
    );

    // Nothing changed: same leader and term, the value untouched; every refusal was counted.
    let after = client.leader_status().await.unwrap();
    assert_eq!((after.leader.unwrap().0, after.term), (leader_id, term), "leadership must not move");
    assert_eq!(client.kv_get("guard").await.unwrap().as_deref(), Some(&b"original"[..]));
    let refused: f64 = [1, 2, 3].iter().map(|n| denials(&c, *n)).sum::<f64>() - before;
    let expected = 2 * 2 * (forged.len() + 4) + 2 + 1 + 1;
    assert!(refused >= expected as f64, "{refused} refusals counted, expected at least {expected}");
    c.stop_all(Duration::from_secs(5));
}

/// Resident and peak memory of a process, in KiB (`VmRSS`, `VmHWM`).
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn set_frame_deadline(c: &LocalCluster, node: u64, ms: u64) {
    let path = c.node(node).unwrap().data_dir.join("haven.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let default =
        format!("frame_deadline_ms = {}", haven_node::transport::TransportLimits::default().frame_deadline_ms);
    assert!(text.contains(&default), "haven init writes the [transport] section: {text}");
    std::fs::write(path, text.replace(&default, &format!("frame_deadline_ms = {ms}"))).unwrap();
}

fn pid_of(c: &LocalCluster, node: u64) -> u32 {
    c.node(node).unwrap().pid.expect("a started node has a pid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_frames_and_stream_floods_cost_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster_with(dir.path(), &[]);
    c.stop_all(Duration::from_secs(5));
    for n in [1, 2, 3] {
        set_frame_deadline(&c, n, 2_000);
    }
    c.start_all().unwrap();
    let client = healthy(&mut c).await;
    let _ = client;
    let target = 3;
    let pid = pid_of(&c, target);
    let addr = c.node(target).unwrap().addr;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (idle_rss, _) = rss_kib(pid);
    let admin = client_material(&c, "admin", "flood");

    // 16 streams each declaring a 16 MiB frame and trickling a byte every 100 ms: 256 MiB
    // declared. The node holds what arrived, and closes the connection at the frame deadline.
    let raw = Raw::connect(&admin, addr).await;
    let started = Instant::now();
    let mut streams = Vec::new();
    for _ in 0..16 {
        let (mut send, recv) = raw.conn.open_bi().await.unwrap();
        send.write_all(&(16u32 << 20).to_be_bytes()).await.unwrap();
        streams.push((send, recv));
    }
    let closed = loop {
        let mut failed = false;
        for (send, _) in streams.iter_mut() {
            if send.write_all(&[0]).await.is_err() {
                failed = true;
            }
        }
        if failed || raw.conn.close_reason().is_some() {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the trickling connection was never closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (trickle_rss, _) = rss_kib(pid);
    assert!(closed >= Duration::from_millis(1_500), "closed after {closed:?}, before the 2 s deadline");
    println!("trickle: connection closed after {closed:?}; RSS idle {idle_rss} KiB, during {trickle_rss} KiB");
    assert!(
        trickle_rss < idle_rss + 32 * 1024,
        "256 MiB declared and trickled grew RSS from {idle_rss} to {trickle_rss} KiB"
    );

    // 2,000 streams opened at once on one connection, each declaring 1 MiB and sending 1 KiB.
    let raw = Raw::connect(&admin, addr).await;
    let mut opened = Vec::new();
    let flood_started = Instant::now();
    let mut peak = 0;
    for i in 0..2_000 {
        // quinn lets us open as many as the node allows concurrently (1,024); the rest wait.
        let open = tokio::time::timeout(Duration::from_millis(50), raw.conn.open_bi()).await;
        let Ok(Ok((mut send, recv))) = open else { break };
        let _ = send.write_all(&(1u32 << 20).to_be_bytes()).await;
        let _ = send.write_all(&[7u8; 1024]).await;
        opened.push((send, recv));
        if i % 250 == 0 {
            peak = peak.max(rss_kib(pid).0);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    peak = peak.max(rss_kib(pid).0);
    println!(
        "stream flood: {} streams opened in {:?}; RSS idle {idle_rss} KiB, peak {peak} KiB",
        opened.len(),
        flood_started.elapsed()
    );
    assert!(opened.len() >= 1_000, "only {} streams could be opened", opened.len());
    assert!(peak < idle_rss + 96 * 1024, "2,000 streams grew RSS from {idle_rss} to {peak} KiB");
    drop(opened);

    // The node still serves, and it counted what it refused.
    let fresh = c.client().unwrap();
    fresh.kv_put("after", b"flood").await.unwrap();
    assert!(metric(&c, NodeId(target), "haven_transport_refused_total") >= 1.0);
    let (_, hwm) = rss_kib(pid);
    println!("node {target}: idle RSS {idle_rss} KiB, peak RSS (VmHWM) over the whole test {hwm} KiB");
    c.stop_all(Duration::from_secs(5));
}
