//! The `haven-node` command line: `init` (configuration and certificates), `run` (the server),
//! `health` (probe a node's admin port; used by container health checks) and `issue-cert`
//! (client certificates from the cluster CA). Flags override environment variables, which
//! override the configuration file.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::config::RaftTunables;
use crate::config::{Bootstrap, NodeConfig, CONFIG_FILE, TLS_DIR};
use crate::pki::CertificateAuthority;

#[derive(Parser)]
#[command(name = "haven-node", version, about = "The Haven cluster node", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a data dir: configuration, a node certificate signed by the cluster CA (the CA is
    /// created in --ca-dir when it does not exist yet), and optionally the bootstrap membership.
    Init(InitArgs),
    /// Run the node until SIGTERM or SIGINT.
    Run(RunArgs),
    /// Initialise the data dir on first boot (same flags as `init`), then run. For containers,
    /// where the data dir is a volume that starts empty.
    Start(InitArgs),
    /// Probe a node's /health endpoint; exit 0 when healthy, 1 otherwise.
    Health(HealthArgs),
    /// Issue a client certificate (for havenctl or the SDK) from the cluster CA.
    IssueCert(IssueCertArgs),
}

#[derive(Args)]
struct InitArgs {
    /// Data directory to create.
    #[arg(long, env = "HAVEN_DATA_DIR")]
    data_dir: PathBuf,
    /// Node id, a positive integer unique in the cluster.
    #[arg(long, env = "HAVEN_NODE_ID")]
    id: u64,
    /// QUIC listen address (HOST:PORT).
    #[arg(long, env = "HAVEN_LISTEN", default_value = "0.0.0.0:7000")]
    listen: String,
    /// Address others dial to reach this node (defaults to --listen).
    #[arg(long, env = "HAVEN_ADVERTISE")]
    advertise: Option<String>,
    /// Admin HTTP listen address (HOST:PORT).
    #[arg(long, env = "HAVEN_ADMIN_LISTEN", default_value = "0.0.0.0:9000")]
    admin_listen: String,
    /// Admin address as others reach it (defaults to --admin-listen).
    #[arg(long, env = "HAVEN_ADVERTISE_ADMIN")]
    advertise_admin: Option<String>,
    /// Directory holding the cluster CA (ca.pem, ca.key); created with a new CA if absent.
    /// Defaults to <data-dir>/ca.
    #[arg(long, env = "HAVEN_CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// Initial voters as ID@QUIC_ADDR@ADMIN_ADDR,... — give it on exactly one node of a new
    /// cluster; that node initialises Raft on its first run.
    #[arg(long, env = "HAVEN_BOOTSTRAP")]
    bootstrap: Option<String>,
    /// Election timeout lower bound in ms (upper bound twice that, heartbeat a fifth).
    #[arg(long, default_value_t = RaftTunables::default().election_timeout_min_ms)]
    election_timeout_ms: u64,
    /// Snapshot the catalog after this many log entries.
    #[arg(long, default_value_t = RaftTunables::default().snapshot_after_entries)]
    snapshot_after: u64,
    /// Guest memory this host offers to VMs, in MiB.
    #[arg(long, env = "HAVEN_VM_MEMORY_MIB", default_value_t = 16 * 1024)]
    vm_memory_mib: u64,
    /// NBD listen address (HOST:PORT): volumes are served as NBD exports there.
    #[arg(long, env = "HAVEN_NBD_LISTEN")]
    nbd_listen: Option<String>,
    /// NBD TLS: `required` (STARTTLS with a client certificate from the cluster CA: `admin`
    /// reads and writes, `reader` only reads), `optional` (without TLS only snapshots can be
    /// read) or `off` (anyone reads and writes). `off` and `optional` need a loopback
    /// --nbd-listen.
    #[arg(long, env = "HAVEN_NBD_TLS", default_value_t = crate::nbd::TlsMode::Required)]
    nbd_tls: crate::nbd::TlsMode,
    /// How long a host or replica may stay silent before it is treated as failed, in ms
    /// (the leader's host-down threshold, the primary's replica acknowledgement deadline, and how
    /// long a migration plan waits for a silent destination before failing back).
    #[arg(long, default_value_t = crate::config::VolumeTunables::default().host_down_ms)]
    failure_detect_ms: u64,
    /// TESTING ONLY: accept fault-injection requests (`havenctl volume corrupt`). Written into
    /// the configuration; never set it on a cluster that holds data you care about.
    #[arg(long, env = "HAVEN_ALLOW_FAULT_INJECTION", value_parser = clap::builder::BoolishValueParser::new())]
    allow_fault_injection: bool,
    /// Overwrite an existing configuration.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct RunArgs {
    /// Data directory created by `haven-node init`.
    #[arg(long, env = "HAVEN_DATA_DIR")]
    data_dir: PathBuf,
    /// Override the QUIC listen address.
    #[arg(long, env = "HAVEN_LISTEN")]
    listen: Option<String>,
    /// Override the admin HTTP listen address.
    #[arg(long, env = "HAVEN_ADMIN_LISTEN")]
    admin_listen: Option<String>,
    /// Override the per-request deadline in milliseconds.
    #[arg(long, env = "HAVEN_REQUEST_TIMEOUT_MS")]
    request_timeout_ms: Option<u64>,
    /// Cap the bandwidth of each resync this node drives, in bytes per second (0 = no cap), so a
    /// returning replica does not starve foreground I/O.
    #[arg(long, env = "HAVEN_RESYNC_MAX_BYTES_PER_SEC")]
    resync_max_bytes_per_sec: Option<u64>,
    /// Override the guest memory this host offers to VMs, in MiB.
    #[arg(long, env = "HAVEN_VM_MEMORY_MIB")]
    vm_memory_mib: Option<u64>,
    /// TESTING ONLY: accept fault-injection requests (`havenctl volume corrupt`) this run.
    #[arg(long, env = "HAVEN_ALLOW_FAULT_INJECTION", value_parser = clap::builder::BoolishValueParser::new())]
    allow_fault_injection: bool,
    /// Override the NBD TLS mode (`off`, `optional`, `required`) this run.
    #[arg(long, env = "HAVEN_NBD_TLS")]
    nbd_tls: Option<crate::nbd::TlsMode>,
}

#[derive(Args)]
struct HealthArgs {
    /// Admin address to probe (HOST:PORT).
    #[arg(long, conflicts_with = "data_dir")]
    admin: Option<String>,
    /// Read the admin address from this data dir's configuration.
    #[arg(long, env = "HAVEN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Seconds to wait for an answer.
    #[arg(long, default_value_t = 3)]
    timeout: u64,
}

#[derive(Args)]
struct IssueCertArgs {
    /// Directory holding ca.pem and ca.key.
    #[arg(long)]
    ca_dir: PathBuf,
    /// Output directory (gets ca.pem, <name>.pem, <name>.key).
    #[arg(long)]
    out: PathBuf,
    /// Certificate name (file stem, common name, and the name in its identity
    /// `haven://client/ROLE/NAME`): letters, digits, '-', '_', '.'.
    #[arg(long, default_value = "client")]
    name: String,
    /// What the certificate may do: `admin` (everything a user may do) or `reader` (status,
    /// lists, shows and reads; no writes, no faults).
    #[arg(long, default_value = "admin")]
    role: haven_proto::Role,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = crate::pki::CLIENT_VALID_DAYS)]
    days: u32,
    /// Create the CA in --ca-dir if it does not exist yet.
    #[arg(long)]
    create_ca: bool,
    /// Also write a client.toml beside --out for these node addresses (HOST:PORT,...), so
    /// `havenctl --cluster DIR` works with the issued certificate.
    #[arg(long, value_delimiter = ',')]
    client_config_nodes: Vec<std::net::SocketAddr>,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Init(a) => init(a),
        Command::Run(a) => run(a),
        Command::Start(a) => start(a),
        Command::Health(a) => health(a),
        Command::IssueCert(a) => issue_cert(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("haven-node: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init(a: InitArgs) -> anyhow::Result<ExitCode> {
    let cfg_path = a.data_dir.join(CONFIG_FILE);
    if cfg_path.exists() && !a.force {
        bail!("{} already exists; refusing to overwrite an initialised node (use --force)", cfg_path.display());
    }
    let min = a.election_timeout_ms;
    let raft = RaftTunables {
        heartbeat_ms: (min / 5).max(5),
        election_timeout_min_ms: min,
        election_timeout_max_ms: min * 2,
        snapshot_after_entries: a.snapshot_after,
        keep_after_snapshot: (a.snapshot_after / 10).max(10),
        stagger_elections: true,
        dedicated_threads: true,
        prevote: true,
        batch_proposals: false,
    };
    let cfg = NodeConfig {
        id: a.id,
        listen: a.listen,
        advertise: a.advertise,
        admin_listen: a.admin_listen,
        advertise_admin: a.advertise_admin,
        request_timeout_ms: 5_000,
        raft,
        storage: Default::default(),
        dial_via: Default::default(),
        nbd_listen: a.nbd_listen,
        nbd: crate::nbd::NbdSettings { tls: a.nbd_tls, ..Default::default() },
        vm_memory_mib: a.vm_memory_mib,
        volume: crate::config::VolumeTunables {
            host_down_ms: a.failure_detect_ms,
            replica_ack_timeout_ms: a.failure_detect_ms,
            ..Default::default()
        },
        plans: crate::config::PlanTunables { host_down_ms: a.failure_detect_ms, ..Default::default() },
        fence: crate::config::FenceTunables::for_elections(min * 2),
        ha: Default::default(),
        transport: Default::default(),
        allow_fault_injection: a.allow_fault_injection,
    };
    cfg.validate()?;
    let bootstrap = a.bootstrap.as_deref().map(Bootstrap::parse_members).transpose()?;
    std::fs::create_dir_all(&a.data_dir).with_context(|| format!("creating {}", a.data_dir.display()))?;
    let ca_dir = a.ca_dir.unwrap_or_else(|| a.data_dir.join("ca"));
    let ca = CertificateAuthority::load_or_create(&ca_dir)?;
    let cert = ca.issue_node(haven_proto::NodeId(a.id), crate::pki::NODE_VALID_DAYS)?;
    ca.write_into(&a.data_dir.join(TLS_DIR), "node", cert)?;
    cfg.save(&a.data_dir)?;
    if let Some(b) = bootstrap {
        b.save(&a.data_dir)?;
    }
    println!("initialised node {} in {} (CA in {})", a.id, a.data_dir.display(), ca_dir.display());
    Ok(ExitCode::SUCCESS)
}

fn start(a: InitArgs) -> anyhow::Result<ExitCode> {
    let data_dir = a.data_dir.clone();
    if !data_dir.join(CONFIG_FILE).exists() {
        init(a)?;
    }
    run(RunArgs {
        data_dir,
        listen: None,
        admin_listen: None,
        request_timeout_ms: None,
        resync_max_bytes_per_sec: None,
        vm_memory_mib: None,
        allow_fault_injection: false,
        nbd_tls: None,
    })
}

fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = NodeConfig::load(&a.data_dir)?;
    if let Some(l) = a.listen {
        cfg.listen = l;
    }
    if let Some(l) = a.admin_listen {
        cfg.admin_listen = l;
    }
    if let Some(r) = a.resync_max_bytes_per_sec {
        cfg.volume.resync_max_bytes_per_sec = r;
    }
    if let Some(t) = a.request_timeout_ms {
        cfg.request_timeout_ms = t;
    }
    if let Some(m) = a.vm_memory_mib {
        cfg.vm_memory_mib = m;
    }
    cfg.allow_fault_injection |= a.allow_fault_injection;
    if let Some(tls) = a.nbd_tls {
        cfg.nbd.tls = tls;
    }
    let _telemetry = crate::telemetry::init_tracing("haven-node");
    let prometheus = crate::telemetry::init_metrics().map_err(|e| anyhow!("metrics recorder: {e}"))?;
    // Actors run on this thread (actix System); Raft, QUIC and request handling run on the
    // multi-threaded Tokio pool underneath it.
    let system = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("haven-worker")
            .build()
            .expect("building the tokio runtime")
    });
    let data_dir = a.data_dir.clone();
    system.block_on(crate::node::run(&data_dir, cfg, prometheus, shutdown_signal()))?;
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn health(a: HealthArgs) -> anyhow::Result<ExitCode> {
    let admin = match (a.admin, a.data_dir) {
        (Some(addr), _) => addr,
        (None, Some(dir)) => NodeConfig::load(&dir)?.advertise_admin().to_string(),
        (None, None) => bail!("give --admin HOST:PORT or --data-dir DIR"),
    };
    let (code, body) = http_get(&admin, "/health", Duration::from_secs(a.timeout))?;
    print!("{body}");
    Ok(if code == 200 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// A minimal HTTP/1.0 GET for the health probe (no client library needed for one request).
fn http_get(addr: &str, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let sock = addr
        .to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .ok_or_else(|| anyhow!("{addr} resolves to no address"))?;
    let mut s = TcpStream::connect_timeout(&sock, timeout).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).with_context(|| format!("reading from {addr}"))?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("{addr} did not answer with HTTP"))?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

fn issue_cert(a: IssueCertArgs) -> anyhow::Result<ExitCode> {
    let ca = if a.create_ca {
        CertificateAuthority::load_or_create(&a.ca_dir)?
    } else {
        CertificateAuthority::load(&a.ca_dir.join(crate::pki::CA_CERT), &a.ca_dir.join(crate::pki::CA_KEY))?
    };
    let cert = ca.issue_client(a.role, &a.name, a.days)?;
    ca.write_into(&a.out, &a.name, cert)?;
    println!("issued client certificate {} (role {}, valid {} days) in {}", a.name, a.role, a.days, a.out.display());
    if !a.client_config_nodes.is_empty() {
        let dir = a.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        let rel = a.out.file_name().map(PathBuf::from).unwrap_or_default();
        let cfg = haven_client::ClusterConfig {
            nodes: a.client_config_nodes.clone(),
            ca: rel.join(crate::pki::CA_CERT),
            cert: rel.join(format!("{}.pem", a.name)),
            key: rel.join(format!("{}.key", a.name)),
            deadline_ms: 10_000,
        };
        let path = cfg.save(dir)?;
        println!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
