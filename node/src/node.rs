//! Assembles and runs one node: opens the store, binds the transport, starts Raft, the actors,
//! the controllers and the admin server, applies the bootstrap configuration once, and shuts
//! everything down in order when asked. This module owns start-up order and shutdown; it must
//! not contain request logic.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use anyhow::{anyhow, bail, Context as _};
use haven_client::wire::TlsMaterial;
use haven_proto::{ActorAddr, ActorKind, MemberSpec, NodeId};
use metrics_exporter_prometheus::PrometheusHandle;
use openraft::ServerState;
use tracing::{info, warn};

use crate::actors::host_agent::HostAgent;
use crate::actors::ActorRegistry;
use crate::cluster::{Proposer, RaftView};
use crate::config::{Bootstrap, NodeConfig, TLS_DIR};
use crate::controllers::LeaderHandles;
use crate::raft::campaign::Elections;
use crate::raft::log_store::LogStore;
use crate::raft::network::NetworkFactory;
use crate::raft::state_machine::StateMachineStore;
use crate::raft::{HavenNode, Raft, RaftRuntime};
use crate::service::NodeService;
use crate::storage::Stores;
use crate::transport::Transport;

/// Load this node's TLS material from `<data-dir>/tls`.
pub fn load_tls(data_dir: &Path) -> anyhow::Result<TlsMaterial> {
    let tls = data_dir.join(TLS_DIR);
    TlsMaterial::load(&tls.join("ca.pem"), &tls.join("node.pem"), &tls.join("node.key"))
        .map_err(|e| anyhow!("{e} (run `haven-node init` first)"))
}

/// Check this node's certificate before serving: it must name node `id` and, like the CA's, be
/// within its validity period. Returns both as `havenctl cluster certs` reports them.
pub fn check_certificates(tls: &TlsMaterial, id: NodeId) -> anyhow::Result<Vec<haven_proto::CertificateInfo>> {
    use crate::identity;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let node_der = identity::first_cert_der(&tls.cert_pem)?;
    match identity::caller_from_der(&node_der) {
        Ok(haven_proto::Caller::Node(n)) if n == id => {}
        Ok(other) => bail!("this node's certificate names {other}, not {id}; issue it with `haven-node init`"),
        Err(e) => bail!("this node's certificate: {e}; re-initialise the node (`haven-node init --force`) to get one"),
    }
    let infos = [identity::first_cert_der(&tls.ca_pem)?, node_der]
        .iter()
        .map(|der| identity::certificate_info(der, id))
        .collect::<Result<Vec<_>, _>>()?;
    for info in &infos {
        identity::check_validity(info, now as i64).map_err(|e| anyhow!("refusing to start: {e}"))?;
    }
    Ok(infos)
}

/// Run a node until `shutdown` resolves. Must be called inside an actix `System` whose Tokio
/// runtime is multi-threaded (see `cli`), because actors start on the current thread.
pub async fn run(
    data_dir: &Path,
    cfg: NodeConfig,
    prometheus: PrometheusHandle,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    cfg.validate()?;
    let id = NodeId(cfg.id);
    let tls = load_tls(data_dir)?;
    let certificates = check_certificates(&tls, id)?;
    let stores = Stores::open(data_dir, cfg.storage.layout)
        .with_context(|| format!("opening the databases in {}", data_dir.display()))?;
    info!(node = %id, layout = %stores.layout, "databases open");
    // Raft and the catalog use the control database; only the volume host sees the data one.
    let store = stores.control.clone();

    let listen = crate::transport::resolve(&cfg.listen).await.map_err(|e| anyhow!(e))?;
    let transport = Transport::bind(
        id,
        listen,
        &tls,
        cfg.dial_overrides(),
        crate::transport::TransportOptions {
            limits: cfg.transport.clone(),
            allow_fault_injection: cfg.allow_fault_injection,
        },
    )
    .with_context(|| format!("binding QUIC on {listen}"))?;
    let raft_config = Arc::new(cfg.raft.to_openraft(cfg.id).map_err(|e| anyhow!(e))?);
    let peer_acks = crate::raft::network::PeerAcks::default();
    let lease = crate::vm::fence::HostLease::new(&cfg.fence);
    let leader_contact = crate::raft::network::LeaderContact::default();
    let raft_runtime = RaftRuntime::new(cfg.raft.dedicated_threads).context("starting Raft's threads")?;
    let log_store = LogStore::new(store.clone()).context("starting the WAL sync thread")?;
    let elections =
        cfg.raft.prevote.then(|| Elections::new(&raft_config, log_store.clone(), std::time::Instant::now()));
    let raft = raft_runtime
        .run(Raft::new(
            cfg.id,
            raft_config,
            NetworkFactory::new(transport.clone(), peer_acks.clone(), leader_contact.clone()),
            log_store,
            StateMachineStore::new(store.clone()),
        ))
        .await
        .context("starting raft")?;
    if let Some(e) = &elections {
        let (e, raft, transport) = (e.clone(), raft.clone(), transport.clone());
        raft_runtime.spawn(e.run(cfg.id, raft, transport));
    }

    let resolver_raft = raft.clone();
    let registry = ActorRegistry::new(
        id,
        transport.clone(),
        Arc::new(move |node: NodeId| {
            resolver_raft.metrics().borrow().membership_config.membership().get_node(&node.0).map(|n| n.addr.clone())
        }),
        Duration::from_millis(cfg.request_timeout_ms),
    );
    // The layers first, each with narrow handles (`cluster`); the service last, around them.
    let view = RaftView::new(id, raft.clone());
    let request_timeout = Duration::from_millis(cfg.request_timeout_ms);
    let lease_lapse = Duration::from_millis(cfg.volume.read_lease_ms + cfg.volume.read_lease_margin_ms);
    let proposer = Proposer::new(
        id,
        raft.clone(),
        store.clone(),
        transport.clone(),
        request_timeout,
        unsafe_ack_before_commit(),
        lease_lapse,
    )
    .with_batching(cfg.raft.batch_proposals);
    let leader = LeaderHandles {
        view: view.clone(),
        store: store.clone(),
        proposer: proposer.clone(),
        registry: registry.clone(),
    };
    tokio::spawn(crate::vm::fence::watch_raft(raft.clone(), lease.clone(), leader_contact));
    let volumes = crate::volume::host::VolumeHost::new(
        id,
        store.clone(),
        stores.data.clone(),
        proposer.clone(),
        registry.clone(),
        cfg.volume.clone(),
    )?;
    let vms = crate::vm::host::VmHost::new(
        crate::vm::host::VmHostHandles {
            view: view.clone(),
            store: store.clone(),
            proposer: proposer.clone(),
            registry: registry.clone(),
            transport: transport.clone(),
            lease: lease.clone(),
            volumes: volumes.clone(),
        },
        cfg.vm_memory_mib,
        data_dir.to_path_buf(),
        cfg.plans.capture_in_memory_mib << 20,
    );
    let shares = crate::share::host::ShareHost::new(
        id,
        store.clone(),
        registry.clone(),
        data_dir,
        Duration::from_millis(cfg.request_timeout_ms),
    )?;
    let share_actor = crate::actors::share::ShareActor::new(shares.clone(), id).start();
    registry.register(crate::share::host::actor(id), share_actor.recipient());
    let ha_leader = crate::ha::leader::LeaderSlot::new(leader.clone(), cfg.ha.clone());
    let ha = crate::ha::host::HaHost::new(vms.clone(), registry.clone(), data_dir, cfg.ha.clone(), ha_leader.clone())?;
    vms.set_ha_gate(Arc::new(ha.clone()));
    let ha_actor = crate::actors::ha::HaActor::new(ha.clone(), id).start();
    registry.register(crate::ha::host::actor(id), ha_actor.recipient());
    let host_agent = HostAgent::new(id, Some(vms.clone())).start();
    registry.register(ActorAddr::host_agent(id), host_agent.recipient());
    transport.set_stream_handler(ActorKind::Vm, crate::vm::host::stream_handler(vms.clone()));
    transport.set_stream_handler(ActorKind::Device, crate::volume::stream::stream_handler(volumes.clone()));
    let service = Arc::new(NodeService {
        id,
        raft: raft.clone(),
        view: view.clone(),
        store: store.clone(),
        transport: transport.clone(),
        registry,
        proposer,
        volumes: volumes.clone(),
        vms: vms.clone(),
        shares: shares.clone(),
        lease,
        certificates,
        elections: elections.clone(),
    });

    let handler_service = service.clone();
    if cfg.allow_fault_injection {
        warn!("fault injection is ENABLED on this node (testing only)");
    }
    let server = tokio::spawn(transport.clone().serve(Arc::new(move |caller, env| {
        let s = handler_service.clone();
        Box::pin(s.handle(caller, env))
    })));

    let (admin_listener, admin_addr) = crate::admin::bind(&cfg.admin_listen)
        .await
        .with_context(|| format!("binding admin HTTP on {}", cfg.admin_listen))?;
    let (admin_stop_tx, admin_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let admin = tokio::spawn(crate::admin::serve(admin_listener, view, prometheus, async {
        let _ = admin_stop_rx.await;
    }));
    tokio::spawn(watch_raft_metrics(raft.clone()));
    tokio::spawn(crate::controllers::host_registry::run(leader.clone(), Duration::from_secs(1)));
    tokio::spawn(crate::controllers::volumes::run(leader.clone(), volumes.clone(), cfg.volume.clone()));
    let plan_deps = crate::controllers::plans::PlanDeps { vms: vms.clone(), peer_acks, fence: cfg.fence.clone() };
    let (probe, down_after) =
        (Duration::from_millis(cfg.volume.probe_ms), Duration::from_millis(cfg.volume.host_down_ms));
    tokio::spawn(crate::controllers::shares::run(leader.clone(), probe, down_after));
    tokio::spawn(crate::controllers::plans::run(leader, plan_deps, cfg.plans.clone()));
    // Device actors start on this (the actix system's) thread.
    actix::spawn(volumes.clone().run());
    tokio::spawn(volumes.clone().renew_read_leases());
    actix::spawn(vms.clone().run());
    tokio::spawn(shares.run());
    tokio::spawn(ha.run());
    tokio::spawn(ha_leader.run());
    let (nbd_stop_tx, nbd_stop_rx) = tokio::sync::oneshot::channel::<()>();
    if let Some(nbd_listen) = &cfg.nbd_listen {
        let addr = crate::transport::resolve(nbd_listen).await.map_err(|e| anyhow!(e))?;
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding NBD on {nbd_listen}"))?;
        info!(node = %id, nbd = %addr, tls = %cfg.nbd.tls, "serving volumes over NBD");
        tokio::spawn(crate::nbd::serve(
            listener,
            crate::volume::export::VolumeExports::new(volumes.clone()),
            crate::nbd::NbdServerConfig {
                max_payload: haven_proto::volume::MAX_IO_LEN,
                handshake_timeout: Duration::from_millis(cfg.nbd.handshake_timeout_ms),
                idle_timeout: Duration::from_millis(cfg.nbd.idle_timeout_ms),
                tls: nbd_tls_policy(&cfg.nbd, &tls)?,
                ..crate::nbd::NbdServerConfig::default()
            },
            async {
                let _ = nbd_stop_rx.await;
            },
        ));
    }

    // With pre-vote a restarted member cannot unseat a live leader (its voters still hear the
    // leader and refuse), so only openraft's own timer needs the rejoin grace.
    if elections.is_none() && raft.is_initialized().await? {
        tokio::spawn(rejoin_quietly(raft.clone(), cfg.raft.election_timeout_max_ms));
    }
    bootstrap_if_pending(data_dir, &raft).await?;
    info!(node = %id, quic = %transport.local_addr()?, admin = %admin_addr, "node running");

    shutdown.await;
    info!(node = %id, "shutting down");
    let _ = admin_stop_tx.send(());
    let _ = nbd_stop_tx.send(());
    if let Err(e) = raft.shutdown().await {
        warn!(error = %e, "raft shutdown");
    }
    drop(raft_runtime);
    transport.close();
    server.abort();
    let _ = admin.await;
    store.sync_wal().context("final WAL sync")?;
    stores.data.sync_wal().context("final WAL sync of the block database")?;
    info!(node = %id, "stopped");
    Ok(())
}

/// The NBD server's TLS policy: STARTTLS presents this node's certificate and requires a client
/// certificate from the cluster CA.
fn nbd_tls_policy(settings: &crate::nbd::NbdSettings, tls: &TlsMaterial) -> anyhow::Result<crate::nbd::TlsPolicy> {
    use crate::nbd::{tls::server_config, TlsMode, TlsPolicy};
    let config = || server_config(&tls.ca_pem, &tls.cert_pem, &tls.key_pem);
    Ok(match settings.tls {
        TlsMode::Off => TlsPolicy::Off,
        TlsMode::Optional => TlsPolicy::Optional(config()?),
        TlsMode::Required => TlsPolicy::Required(config()?),
    })
}

/// Initialise Raft from `<data-dir>/bootstrap.toml` if it is there, then delete the file so it
/// is applied exactly once per data dir.
async fn bootstrap_if_pending(data_dir: &Path, raft: &Raft) -> anyhow::Result<()> {
    let Some(bootstrap) = Bootstrap::load(data_dir)? else { return Ok(()) };
    if raft.is_initialized().await? {
        warn!("bootstrap.toml present but raft state exists; ignoring it");
    } else {
        let members: std::collections::BTreeMap<u64, HavenNode> = bootstrap
            .members
            .iter()
            .map(|m| {
                let spec = MemberSpec::from(m);
                (spec.id.0, HavenNode { addr: spec.addr, admin_addr: spec.admin_addr })
            })
            .collect();
        info!(members = members.len(), "initialising a new cluster");
        raft.initialize(members).await.context("initialising raft")?;
    }
    Bootstrap::consume(data_dir).context("removing bootstrap.toml")?;
    Ok(())
}

/// A restarted member holds back from campaigning for a grace period of a few election
/// timeouts. It still votes and follows, so a healthy leader simply reaches it; without the grace,
/// a node that comes back before the leader's backed-off replication reaches it starts an
/// election with a higher term and unseats that leader — an extra failover per restart. (The
/// leader id restored from the persisted vote cannot tell us whether that leader is still alive,
/// so the grace is time-based.) After a full-cluster restart this delays the first election by
/// the grace period. (Only with `[raft] prevote = false`: pre-vote makes this unnecessary.)
async fn rejoin_quietly(raft: Raft, election_timeout_max_ms: u64) {
    raft.runtime_config().elect(false);
    tokio::time::sleep(Duration::from_millis(election_timeout_max_ms * 6)).await;
    raft.runtime_config().elect(true);
}

/// Publish Raft's state as metrics: term, indexes, leadership and leader changes.
async fn watch_raft_metrics(raft: Raft) {
    let mut rx = raft.metrics();
    let mut last_leader = None;
    loop {
        {
            let m = rx.borrow_and_update();
            metrics::gauge!("haven_raft_term").set(m.current_term as f64);
            metrics::gauge!("haven_raft_last_log_index").set(m.last_log_index.unwrap_or(0) as f64);
            metrics::gauge!("haven_raft_last_applied_index").set(m.last_applied.map(|l| l.index).unwrap_or(0) as f64);
            metrics::gauge!("haven_raft_is_leader").set(if m.state == ServerState::Leader { 1.0 } else { 0.0 });
            if m.current_leader.is_some() && m.current_leader != last_leader {
                metrics::counter!("haven_raft_leader_changes_total").increment(1);
                last_leader = m.current_leader;
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Read the test-only `HAVEN_UNSAFE_ACK_BEFORE_COMMIT` switch, warning loudly when it is on.
fn unsafe_ack_before_commit() -> bool {
    let on = std::env::var("HAVEN_UNSAFE_ACK_BEFORE_COMMIT").is_ok_and(|v| v == "1");
    if on {
        warn!("HAVEN_UNSAFE_ACK_BEFORE_COMMIT=1: writes are acknowledged BEFORE commit; test use only");
    }
    on
}
