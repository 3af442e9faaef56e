//! `fio` over NBD: the field's standard I/O benchmark, driving any NBD server (Haven's exports,
//! `qemu-nbd`) through its `nbd` engine (libnbd), so every server is measured by the same client.
//!
//! This module runs one fio job and parses its JSON report into IOPS, bandwidth and completion
//! latency percentiles per direction. It starts no server and decides nothing about targets.
//! Every failure names the command it ran; none panics.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};

/// The latency percentiles every run reports (fio's `--percentile_list`).
const PERCENTILES: &str = "50:99:99.9";

/// One fio job: what it does, not where or for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FioJob {
    /// Short label for tables, e.g. `randwrite 4k d1`.
    pub name: &'static str,
    /// fio's `--rw`: `read`, `write`, `randread`, `randwrite` or `randrw`.
    pub rw: &'static str,
    pub block_bytes: u64,
    pub depth: u32,
    /// `randrw` only: percentage of reads (`--rwmixread`).
    pub read_percent: Option<u32>,
}

impl FioJob {
    pub fn reads(&self) -> bool {
        self.rw.contains("read") || self.rw == "randrw"
    }

    pub fn writes(&self) -> bool {
        self.rw.contains("write") || self.rw == "randrw"
    }
}

/// How a job is run: time-based over the first `size_bytes` of the export.
#[derive(Debug, Clone, Copy)]
pub struct FioRun {
    /// Measured seconds (`--runtime`, with `--time_based`: the job wraps around the range).
    pub seconds: u64,
    /// Unmeasured warm-up seconds before them (`--ramp_time`).
    pub ramp_seconds: u64,
    pub size_bytes: u64,
}

/// One direction (reads or writes) of a finished job.
#[derive(Debug, Clone, Copy, Default)]
pub struct FioSide {
    pub ios: u64,
    pub iops: f64,
    pub bytes_per_s: f64,
    /// Completion latency percentiles, microseconds (0 when the side did no I/O).
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

impl FioSide {
    pub fn mib_per_s(&self) -> f64 {
        self.bytes_per_s / (1u64 << 20) as f64
    }
}

/// What one fio job measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct FioResult {
    pub read: FioSide,
    pub write: FioSide,
    /// I/O errors fio counted (`total_err`); a healthy run has none.
    pub errors: u64,
}

impl FioResult {
    pub fn iops(&self) -> f64 {
        self.read.iops + self.write.iops
    }

    pub fn mib_per_s(&self) -> f64 {
        self.read.mib_per_s() + self.write.mib_per_s()
    }

    /// The side whose latency a table shows: writes for any job that writes (the replicated
    /// direction), else reads.
    pub fn latency_side(&self, job: &FioJob) -> FioSide {
        if job.writes() {
            self.write
        } else {
            self.read
        }
    }
}

/// fio's arguments for `job` run as `run` against `uri` (`nbd://HOST:PORT/EXPORT`).
pub fn args(job: &FioJob, run: &FioRun, uri: &str) -> Vec<String> {
    let mut a = vec![
        format!("--name={}", job.name.replace(' ', "-")),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        format!("--rw={}", job.rw),
        format!("--bs={}", job.block_bytes),
        format!("--iodepth={}", job.depth),
        format!("--size={}", run.size_bytes),
        "--time_based".into(),
        format!("--runtime={}", run.seconds.max(1)),
        format!("--percentile_list={PERCENTILES}"),
        "--output-format=json".into(),
    ];
    if run.ramp_seconds > 0 {
        a.push(format!("--ramp_time={}", run.ramp_seconds));
    }
    if let Some(p) = job.read_percent {
        a.push(format!("--rwmixread={p}"));
    }
    a
}

/// Fill the first `size_bytes` of `uri` once, sequentially in 1 MiB writes, so reads measure
/// stored data (a sparse file or an unwritten volume answers reads without touching storage).
pub fn fill_args(size_bytes: u64, uri: &str) -> Vec<String> {
    vec![
        "--name=fill".into(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--rw=write".into(),
        "--bs=1M".into(),
        "--iodepth=16".into(),
        format!("--size={size_bytes}"),
        "--output-format=json".into(),
    ]
}

/// The command line, for the report.
pub fn command_line(args: &[String]) -> String {
    std::iter::once("fio".to_string()).chain(args.iter().cloned()).collect::<Vec<_>>().join(" ")
}

/// Run fio with `args`, giving up after `timeout`; parses its JSON report.
pub async fn run(args: &[String], timeout: Duration) -> anyhow::Result<FioResult> {
    let cmd = command_line(args);
    let child = tokio::process::Command::new("fio")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("fio not found: install it (Debian: apt-get install fio; scripts/bench does)")
        }
        other => other.with_context(|| format!("starting `{cmd}`"))?,
    };
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(r) => r.with_context(|| format!("running `{cmd}`"))?,
        Err(_) => bail!("`{cmd}` did not finish within {timeout:?} (killed)"),
    };
    if !out.status.success() {
        bail!("`{cmd}` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    parse(&String::from_utf8_lossy(&out.stdout)).with_context(|| format!("reading the report of `{cmd}`"))
}

/// Parse fio's JSON report (fio may print notes before the document).
pub fn parse(stdout: &str) -> anyhow::Result<FioResult> {
    let doc = stdout.find('{').map_or("", |i| &stdout[i..]);
    let json: serde_json::Value = serde_json::from_str(doc).context("fio printed no JSON report")?;
    let job = &json["jobs"][0];
    anyhow::ensure!(job.is_object(), "the report has no jobs[0]");
    Ok(FioResult {
        read: side(&job["read"]).context("jobs[0].read")?,
        write: side(&job["write"]).context("jobs[0].write")?,
        errors: job["error"].as_u64().unwrap_or(0).max(job["total_err"].as_u64().unwrap_or(0)),
    })
}

fn side(v: &serde_json::Value) -> anyhow::Result<FioSide> {
    let num = |key: &str| v[key].as_f64().with_context(|| format!("no {key}"));
    let ios = v["total_ios"].as_u64().context("no total_ios")?;
    let pct = |p: &str| -> f64 { v["clat_ns"]["percentile"][p].as_f64().map_or(0.0, |ns| ns / 1e3) };
    Ok(FioSide {
        ios,
        iops: num("iops")?,
        bytes_per_s: num("bw_bytes")?,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        p999_us: pct("99.900000"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_report_after_notes() {
        let report = r#"note: both iodepth >= 1 and synchronous I/O engine selected
{"jobs": [{"error": 0, "total_err": 0,
  "read": {"total_ios": 10, "iops": 100.5, "bw_bytes": 411648,
           "clat_ns": {"percentile": {"50.000000": 66000, "99.000000": 120000, "99.900000": 300000}}},
  "write": {"total_ios": 0, "iops": 0.0, "bw_bytes": 0, "clat_ns": {}}}]}"#;
        let r = parse(report).unwrap();
        assert_eq!(r.read.ios, 10);
        assert!((r.read.p50_us - 66.0).abs() < 1e-9);
        assert!((r.read.p999_us - 300.0).abs() < 1e-9);
        assert_eq!(r.write.ios, 0);
        assert_eq!(r.write.p50_us, 0.0);
        assert!((r.iops() - 100.5).abs() < 1e-9);
    }

    #[test]
    fn a_report_without_jobs_is_an_error() {
        assert!(parse("{}").is_err());
        assert!(parse("fio: engine nbd not loadable").is_err());
    }

    #[test]
    fn mixed_jobs_carry_their_read_share() {
        let job = FioJob { name: "randrw 4k d16", rw: "randrw", block_bytes: 4096, depth: 16, read_percent: Some(70) };
        let a = args(&job, &FioRun { seconds: 8, ramp_seconds: 1, size_bytes: 1 << 30 }, "nbd://h:1/e");
        assert!(a.contains(&"--rwmixread=70".to_string()));
        assert!(a.contains(&"--ramp_time=1".to_string()));
        assert!(job.reads() && job.writes());
    }
}
