//! Helpers for the volume benchmarks: a `qemu-nbd` baseline server (fio drives it, see
//! `fio`), a node's Prometheus counters, and waits on a volume's catalog record.
//!
//! Every helper fails with a message naming what it ran and what came back; none panics.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use haven_client::proto::volume::VolumeRecord;
use haven_client::HavenClient;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The first line of `tool --version`, or why there is none.
pub fn tool_version(tool: &str) -> String {
    match std::process::Command::new(tool).arg("--version").stdin(Stdio::null()).output() {
        Ok(o) => String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim().to_string(),
        Err(e) => format!("{tool} not runnable: {e}"),
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; another process may take it meanwhile).
pub fn free_tcp_port() -> anyhow::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).context("finding a free TCP port on 127.0.0.1")
}

/// Wait until something accepts TCP connections at `addr`.
pub async fn wait_port(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listening at {addr} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `qemu-nbd` process serving a raw file, killed when dropped.
pub struct QemuNbd {
    child: tokio::process::Child,
    pub addr: SocketAddr,
    pub export: String,
    pub command: String,
}

impl QemuNbd {
    /// Create a sparse raw file of `size` bytes at `file` and serve it as export `export`.
    pub async fn start(file: &Path, export: &str, size: u64) -> anyhow::Result<Self> {
        let f = std::fs::File::create(file).with_context(|| format!("creating {}", file.display()))?;
        f.set_len(size).with_context(|| format!("sizing {}", file.display()))?;
        drop(f);
        let addr = free_tcp_port()?;
        let args: Vec<String> = vec![
            "-f".into(),
            "raw".into(),
            "-x".into(),
            export.into(),
            "-p".into(),
            addr.port().to_string(),
            "-b".into(),
            addr.ip().to_string(),
            "--persistent".into(),
            file.display().to_string(),
        ];
        let command = format!("qemu-nbd {}", args.join(" "));
        let mut child = tokio::process::Command::new("qemu-nbd")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting `{command}` (is qemu-utils installed?)"))?;
        if let Err(e) = wait_port(addr, Duration::from_secs(10)).await {
            let _ = child.start_kill();
            let mut err = String::new();
            if let Some(mut s) = child.stderr.take() {
                let _ = tokio::time::timeout(Duration::from_secs(1), s.read_to_string(&mut err)).await;
            }
            bail!("`{command}` did not come up: {e}; its stderr: {}", err.trim());
        }
        Ok(Self { child, addr, export: export.into(), command })
    }

    pub fn url(&self) -> String {
        format!("nbd://{}/{}", self.addr, self.export)
    }

    /// Stop the server and wait for it to exit.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// The sum of every sample of the Prometheus metric `name` (all label sets) on the admin
/// endpoint at `admin`; 0 when the metric has not been recorded yet.
pub async fn metric_sum(admin: SocketAddr, name: &str) -> anyhow::Result<f64> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(admin).await?;
        s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {admin}\r\n\r\n").as_bytes()).await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    let body = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .with_context(|| format!("GET http://{admin}/metrics timed out"))?
        .with_context(|| format!("GET http://{admin}/metrics"))?;
    if !body.starts_with("HTTP/1.") || !body.lines().next().is_some_and(|l| l.contains(" 200")) {
        bail!("GET http://{admin}/metrics: {}", body.lines().next().unwrap_or("empty answer"));
    }
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Poll the catalog until `name`'s record satisfies `ok`; fails after `timeout` with the last
/// record (or error) seen.
pub async fn wait_volume(
    client: &HavenClient,
    name: &str,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&VolumeRecord) -> bool,
) -> anyhow::Result<VolumeRecord> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match client.volume(name).await {
            Ok(v) if ok(&v) => return Ok(v),
            Ok(v) => format!("{v:?}"),
            Err(e) => format!("error: {e}"),
        };
        if Instant::now() > deadline {
            bail!("{what}: not reached after {timeout:?}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until the catalog lists `n` hosts (the leader records them shortly after its election;
/// volumes can only be placed on recorded hosts).
pub async fn wait_hosts(client: &HavenClient, n: usize, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match client.hosts().await {
            Ok(h) if h.len() >= n => return Ok(()),
            Ok(h) => format!("{} host(s)", h.len()),
            Err(e) => format!("error: {e}"),
        };
        if Instant::now() > deadline {
            bail!("catalog does not list {n} hosts after {timeout:?}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
