//! `havenctl volume | snapshot | policy | replication`: replicated block volumes, their
//! snapshots and integrity checks, labeled snapshot policies and asynchronous relationships.
//!
//! Volumes are named by name, `vol-N` or `N`; hosts by `N` or `node-N`; snapshots by name or id.
//! Sizes, ids and patterns are checked by clap value parsers, and sizes and alignment against the
//! block size before anything is sent.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::{ArgGroup, Args, Subcommand};
use haven_client::proto::volume::{
    size_ok, IntegrityVerdict, RelationshipState, ReplicaProgress, SnapshotPolicy, SnapshotRecord, VolumeEvent,
    VolumeRecord, DEFAULT_BLOCK_SIZE, MAX_IO_LEN,
};
use haven_client::proto::{NodeId, VolumeId, MAX_FRAME_LEN};
use haven_client::volumes::{ReplicationStatus, VolumeSpec};
use haven_client::HavenClient;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::output::Output;
use crate::units::number_and_unit;

// ---------------------------------------------------------------------------------------------
// Commands

#[derive(Subcommand)]
pub enum VolumeCmd {
    /// Create a replicated block volume and print where it was placed.
    #[command(after_help = "Example:\n  havenctl volume create db --size 64MiB --replicas 2\n  \
        havenctl volume create logs --size 1G --hosts 2,3   # node-2 is primary")]
    Create(CreateArgs),
    /// List volumes: size, replicas, primary, in-sync set and epoch.
    List,
    /// Show a volume: its record, snapshots, replication progress and recent events.
    #[command(after_help = "Example:\n  havenctl volume show db\n  havenctl volume show vol-3 --json")]
    Show {
        /// Volume name, vol-N or N.
        volume: String,
    },
    /// Change a volume's size (shrinking discards the data past the new end and needs --yes).
    #[command(after_help = "Example:\n  havenctl volume resize db --size 128MiB")]
    Resize {
        /// Volume name, vol-N or N.
        volume: String,
        /// New size (bytes, or K/M/G/T with optional iB/B; a multiple of the block size).
        #[arg(long, value_parser = parse_nonzero_size)]
        size: u64,
        /// Confirm a shrink: the data past the new end is lost.
        #[arg(long)]
        yes: bool,
    },
    /// Delete a volume and all its data and snapshots (needs --yes).
    #[command(after_help = "Example:\n  havenctl volume delete db --yes")]
    Delete {
        /// Volume name, vol-N or N.
        volume: String,
        /// Confirm: the volume's data and snapshots are destroyed.
        #[arg(long)]
        yes: bool,
    },
    /// Write a file or a repeated byte at an offset (offset and length: multiples of the block size).
    #[command(after_help = "Example:\n  havenctl volume write db --offset 0 --pattern 0xab --length 8KiB\n  \
        havenctl volume write db --offset 1MiB --file disk.img")]
    Write(WriteArgs),
    /// Read bytes at an offset (newest data or as of a snapshot) into a file or stdout.
    #[command(
        long_about = "Read bytes at an offset (newest data or as of a snapshot).\n\n\
            With --out the bytes go to that file. Without it they are written raw to stdout when \
            stdout is not a terminal (e.g. `| xxd`), and summarised as a short hexdump when it is. \
            With --json and no --out the bytes are included as hex.",
        after_help = "Example:\n  havenctl volume read db --offset 0 --length 8KiB --out /tmp/head.bin\n  \
            havenctl volume read db --offset 0 --length 4KiB --snapshot nightly | xxd | head"
    )]
    Read(ReadArgs),
    /// Recent volume events (failovers, resyncs, integrity verdicts), newest last.
    #[command(after_help = "Example:\n  havenctl volume events db --limit 20")]
    Events {
        /// Only this volume's events (name, vol-N or N).
        volume: Option<String>,
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
    },
    /// Replication progress per replica: state, acked seq, lag and resync progress.
    #[command(after_help = "Example:\n  havenctl volume status db")]
    Status {
        /// Volume name, vol-N or N.
        volume: String,
    },
    /// Follow replica resyncs with progress bars until none is resyncing or stale.
    ///
    /// Polls the replication status. A stale replica waits for its host to answer before its
    /// resync starts: use --timeout if the host may be down.
    #[command(after_help = "Example:\n  havenctl volume watch-resync db --host 3")]
    WatchResync(WatchArgs),
    /// Writes a replica preserved (instead of dropping) when it rolled back to rejoin.
    Preserved {
        /// Volume name, vol-N or N.
        volume: String,
        /// The replica host (N or node-N).
        #[arg(long, value_parser = parse_host)]
        host: NodeId,
    },
    /// FAULT INJECTION (testing only): overwrite one block on one replica.
    ///
    /// FAULT INJECTION, for testing integrity checks: the block's stored bytes on that one replica
    /// are overwritten in place, bypassing replication, so the replicas' copies differ.
    #[command(after_help = "Example (then `havenctl snapshot verify db nightly` reports block 0):\n  \
        havenctl volume corrupt db --host 2 --block 0 --pattern 0xee")]
    Corrupt {
        /// Volume name, vol-N or N.
        volume: String,
        /// The replica host to damage (N or node-N).
        #[arg(long, value_parser = parse_host)]
        host: NodeId,
        /// Block number (offset / block size).
        #[arg(long)]
        block: u64,
        /// Byte to fill the block with (0xEE or 238).
        #[arg(long, default_value = "0xEE", value_parser = parse_byte)]
        pattern: u8,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    /// Volume name (letters, digits, '-', '_', '.'; not all digits).
    name: String,
    /// Size: bytes, or K/M/G/T (powers of 1024) with optional iB/B, e.g. 64MiB.
    #[arg(long, value_parser = parse_nonzero_size)]
    size: u64,
    /// Number of synchronous replicas (1-3); default 2, or the number of --hosts.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=3))]
    replicas: Option<u8>,
    /// Block size in bytes (a power of two, 512-65536).
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE, value_parser = parse_block_size)]
    block_size: u32,
    /// Place the replicas on these hosts (comma-separated; the first is primary).
    #[arg(long, value_delimiter = ',', value_parser = parse_host)]
    hosts: Vec<NodeId>,
}

#[derive(Args)]
#[command(group(ArgGroup::new("source").required(true).args(["file", "pattern"])))]
pub struct WriteArgs {
    /// Volume name, vol-N or N.
    volume: String,
    /// Byte offset (a multiple of the block size; K/M/G/T accepted).
    #[arg(long, value_parser = parse_size)]
    offset: u64,
    /// Write this file's contents (its length must be a multiple of the block size).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Write this byte repeated --length times (0xAB or 171).
    #[arg(long, value_parser = parse_byte, requires = "length")]
    pattern: Option<u8>,
    /// Bytes to write with --pattern (a multiple of the block size).
    #[arg(long, value_parser = parse_nonzero_size, requires = "pattern")]
    length: Option<u64>,
}

#[derive(Args)]
pub struct ReadArgs {
    /// Volume name, vol-N or N.
    volume: String,
    /// Byte offset (a multiple of the block size; K/M/G/T accepted).
    #[arg(long, value_parser = parse_size)]
    offset: u64,
    /// Bytes to read (a multiple of the block size).
    #[arg(long, value_parser = parse_nonzero_size)]
    length: u64,
    /// Read as of this snapshot (name or id) instead of the newest data.
    #[arg(long)]
    snapshot: Option<String>,
    /// Write the bytes to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
pub struct WatchArgs {
    /// Volume name, vol-N or N.
    volume: String,
    /// Only follow this replica (N or node-N).
    #[arg(long, value_parser = parse_host)]
    host: Option<NodeId>,
    /// Poll interval in milliseconds.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    interval_ms: u64,
    /// Give up after this many seconds (default: wait for as long as it takes).
    #[arg(long)]
    timeout: Option<u64>,
}

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Take a crash-consistent snapshot on every in-sync replica; with --label it is compared
    /// across replicas at once.
    #[command(after_help = "Example:\n  havenctl snapshot create db before-upgrade\n  \
        havenctl snapshot create db daily-1 --label daily")]
    Create {
        /// Volume name, vol-N or N.
        volume: String,
        /// Snapshot name.
        name: String,
        /// Replication label: makes a labeled snapshot whose copies are compared at once.
        #[arg(long)]
        label: Option<String>,
    },
    /// List a volume's snapshots with their integrity verdicts.
    List {
        /// Volume name, vol-N or N.
        volume: String,
    },
    /// Delete a snapshot.
    Delete {
        /// Volume name, vol-N or N.
        volume: String,
        /// Snapshot name or id.
        snapshot: String,
    },
    /// Return the volume to a snapshot's content on every replica (later writes and snapshots are lost).
    #[command(after_help = "Example:\n  havenctl snapshot rollback db before-upgrade")]
    Rollback {
        /// Volume name, vol-N or N.
        volume: String,
        /// Snapshot name or id.
        snapshot: String,
    },
    /// Copy a snapshot into a new volume (same size and replica count).
    #[command(after_help = "Example:\n  havenctl snapshot clone db before-upgrade db-copy")]
    Clone {
        /// Volume name, vol-N or N.
        volume: String,
        /// Snapshot name or id.
        snapshot: String,
        /// Name of the new volume.
        new_name: String,
    },
    /// Compare a snapshot's copies across replicas; exits 1 and lists the differing blocks on a mismatch.
    #[command(
        after_help = "Example:\n  havenctl snapshot verify db daily-1 || havenctl snapshot repair db daily-1 --from 1"
    )]
    Verify {
        /// Volume name, vol-N or N.
        volume: String,
        /// Snapshot name or id.
        snapshot: String,
    },
    /// Copy a snapshot's differing blocks from one replica's copy onto the others.
    #[command(after_help = "Example:\n  havenctl snapshot repair db daily-1 --from node-1")]
    Repair {
        /// Volume name, vol-N or N.
        volume: String,
        /// Snapshot name or id.
        snapshot: String,
        /// The host whose copy is good (N or node-N).
        #[arg(long = "from", value_parser = parse_host)]
        from: NodeId,
    },
}

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Create or replace a labeled snapshot policy: snapshots of a volume every interval,
    /// compared across replicas, newest --keep kept.
    #[command(
        after_help = "Example:\n  havenctl policy create db-daily --volume db --label daily --every 24h --keep 7"
    )]
    Create {
        /// Policy name.
        name: String,
        /// Volume name, vol-N or N.
        #[arg(long)]
        volume: String,
        /// Replication label of the snapshots it takes.
        #[arg(long)]
        label: String,
        /// Interval (e.g. 60s, 15m, 24h, or seconds); 0 = only on `policy run`.
        #[arg(long, default_value = "0", value_parser = parse_interval)]
        every: u64,
        /// Number of snapshots to keep.
        #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..))]
        keep: u32,
    },
    /// List snapshot policies.
    List,
    /// Delete a policy (its snapshots stay).
    Delete {
        /// Policy name.
        name: String,
    },
    /// Take the policy's labeled snapshot now and print its verdict.
    Run {
        /// Policy name.
        name: String,
    },
}

#[derive(Subcommand)]
pub enum ReplicationCmd {
    /// Start asynchronous (DR) replication of a volume to a host, with bounded lag.
    #[command(after_help = "Example:\n  havenctl replication create db --target 3 --max-lag 256MiB")]
    Create {
        /// Volume name, vol-N or N.
        volume: String,
        /// Host to hold the DR copy (N or node-N).
        #[arg(long, value_parser = parse_host)]
        target: NodeId,
        /// Unshipped bytes above which shipping falls back to a resync.
        #[arg(long, default_value = "256MiB", value_parser = parse_nonzero_size)]
        max_lag: u64,
    },
    /// List asynchronous relationships.
    List,
    /// Pause shipping for a relationship.
    Pause {
        /// Relationship id (N or rel-N).
        #[arg(value_parser = parse_rel_id)]
        id: u64,
    },
    /// Resume shipping for a paused relationship.
    Resume {
        /// Relationship id (N or rel-N).
        #[arg(value_parser = parse_rel_id)]
        id: u64,
    },
    /// Reverse a relationship: its DR copy becomes the volume's primary once it holds every
    /// write (writes wait meanwhile), and the old primary receives the DR copy. 1-replica volumes.
    #[command(after_help = "Example:\n  havenctl replication reverse 1")]
    Reverse {
        /// Relationship id (N or rel-N).
        #[arg(value_parser = parse_rel_id)]
        id: u64,
    },
    /// Delete a relationship (the DR copy stops being updated).
    Delete {
        /// Relationship id (N or rel-N).
        #[arg(value_parser = parse_rel_id)]
        id: u64,
    },
    /// Replication progress per replica (same as `volume status`).
    Status {
        /// Volume name, vol-N or N.
        volume: String,
    },
}

// ---------------------------------------------------------------------------------------------
// Value parsers (run by clap before anything is sent)

/// Bytes, or a number with K, M, G or T (powers of 1024) and an optional `iB`/`B` suffix.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid size {s:?}: expected bytes or a number with K, M, G or T (e.g. 4096, 64MiB, 1G)");
    let (n, unit) = number_and_unit(s).ok_or_else(bad)?;
    let unit = unit.trim().to_ascii_lowercase();
    let shift = match unit.as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("size {s:?} is too large"))
}

fn parse_nonzero_size(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err(format!("size {s:?} must be greater than zero")),
        n => Ok(n),
    }
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    let n = parse_size(s)?;
    if !n.is_power_of_two() || !(512..=65536).contains(&n) {
        return Err(format!("block size {s:?} must be a power of two from 512 to 65536"));
    }
    Ok(n as u32)
}

/// A host: `N` or `node-N`.
pub fn parse_host(s: &str) -> Result<NodeId, String> {
    let t = s.trim();
    let digits = t.strip_prefix("node-").unwrap_or(t);
    match digits.parse::<u64>() {
        Ok(0) => Err(format!("invalid host {s:?}: node ids start at 1")),
        Ok(n) => Ok(NodeId(n)),
        Err(_) => Err(format!("invalid host {s:?}: expected a node id such as 2 or node-2")),
    }
}

fn parse_rel_id(s: &str) -> Result<u64, String> {
    let t = s.trim();
    t.strip_prefix("rel-")
        .unwrap_or(t)
        .parse()
        .map_err(|_| format!("invalid relationship id {s:?}: expected a number such as 3 (see `replication list`)"))
}

/// A byte: `0xAB` or `171`.
pub fn parse_byte(s: &str) -> Result<u8, String> {
    let t = s.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => t.parse(),
    };
    parsed.map_err(|_| format!("invalid byte {s:?}: expected 0x00-0xff or 0-255"))
}

/// Seconds: `0`, `90`, `90s`, `15m`, `24h`, `7d`.
pub fn parse_interval(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid interval {s:?}: expected e.g. 0, 90s, 15m, 24h or 7d");
    let (n, unit) = number_and_unit(s).ok_or_else(bad)?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

// ---------------------------------------------------------------------------------------------
// Formatting

/// `8 MiB`, `1.5 GiB`, `1000 B`.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && n >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    let scale = 1u64 << (10 * unit);
    if n.is_multiple_of(scale) {
        format!("{} {}", n / scale, UNITS[unit])
    } else {
        format!("{:.1} {}", n as f64 / scale as f64, UNITS[unit])
    }
}

fn hosts_list(hosts: &[NodeId]) -> String {
    if hosts.is_empty() {
        return "-".into();
    }
    hosts.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// Block numbers as ranges: `0-15, 20, 31-32`.
fn block_ranges(blocks: &[u64]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < blocks.len() {
        let mut j = i;
        while j + 1 < blocks.len() && blocks[j + 1] == blocks[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { blocks[i].to_string() } else { format!("{}-{}", blocks[i], blocks[j]) });
        i = j + 1;
    }
    parts.join(", ")
}

fn plural(n: u64, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

fn verdict_short(v: &IntegrityVerdict) -> String {
    match v {
        IntegrityVerdict::NotChecked => "-".into(),
        IntegrityVerdict::Match { .. } => "match".into(),
        IntegrityVerdict::Mismatch { total_differing, .. } => {
            format!("MISMATCH ({})", plural(*total_differing, "block"))
        }
        IntegrityVerdict::Repaired { blocks, .. } => format!("repaired ({})", plural(blocks.len() as u64, "block")),
    }
}

fn verdict_long(v: &IntegrityVerdict) -> String {
    match v {
        IntegrityVerdict::NotChecked => "not checked".into(),
        IntegrityVerdict::Match { root, hosts } => {
            format!("match: copies on {} have Merkle root {}", hosts_list(hosts), short_hex(root))
        }
        IntegrityVerdict::Mismatch { hosts, blocks, total_differing } => {
            let more = total_differing.saturating_sub(blocks.len() as u64);
            format!(
                "MISMATCH: copies on {} differ at {}; differing blocks: {}{}",
                hosts_list(hosts),
                plural(*total_differing, "block"),
                block_ranges(blocks),
                if more > 0 { format!(" (and {more} more)") } else { String::new() }
            )
        }
        IntegrityVerdict::Repaired { source, blocks } => {
            if blocks.is_empty() {
                format!("repaired from {source}: nothing differed")
            } else {
                format!(
                    "repaired: copied {} from {source} ({}); copies now match",
                    plural(blocks.len() as u64, "block"),
                    block_ranges(blocks)
                )
            }
        }
    }
}

fn short_hex(h: &str) -> String {
    if h.len() > 16 {
        format!("{}…", &h[..16])
    } else {
        h.to_string()
    }
}

fn volume_summary(v: &VolumeRecord) -> String {
    format!(
        "{} {:?}: {} ({} blocks of {} B); primary {}, replicas {}, in sync {}, epoch {}{}",
        v.id,
        v.name,
        human_bytes(v.size_bytes),
        v.size_blocks(),
        v.block_size,
        v.primary,
        hosts_list(&v.replicas),
        hosts_list(&v.in_sync),
        v.epoch,
        v.cloned_from.map(|(vol, snap)| format!("; cloned from {vol} snapshot {snap}")).unwrap_or_default()
    )
}

fn snapshot_summary(s: &SnapshotRecord) -> String {
    format!(
        "snapshot {} {:?} of {} at seq {} on {}{}{}; verdict: {}",
        s.id,
        s.name,
        s.volume,
        s.seq,
        hosts_list(&s.hosts),
        s.label.as_deref().map(|l| format!(", label {l}")).unwrap_or_default(),
        if s.complete { "" } else { " (incomplete)" },
        verdict_long(&s.verdict)
    )
}

fn snapshot_rows(snaps: &[SnapshotRecord]) -> Vec<Vec<String>> {
    snaps
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                s.name.clone(),
                s.label.clone().unwrap_or_else(|| "-".into()),
                format!("{:?}", s.kind).to_lowercase(),
                s.seq.to_string(),
                hosts_list(&s.hosts),
                if s.complete { "yes" } else { "no" }.into(),
                verdict_short(&s.verdict),
            ]
        })
        .collect()
}

const SNAPSHOT_HEADER: [&str; 8] = ["id", "name", "label", "kind", "seq", "hosts", "complete", "verdict"];

fn is_resyncing(r: &ReplicaProgress) -> bool {
    r.state == "resyncing" || r.resync.as_ref().is_some_and(|p| !p.done)
}

fn resync_cell(r: &ReplicaProgress) -> String {
    match &r.resync {
        None => "-".into(),
        Some(p) => {
            let pct = if p.blocks_total == 0 { 100.0 } else { p.blocks_sent as f64 * 100.0 / p.blocks_total as f64 };
            format!(
                "{} {}/{} blocks ({pct:.0}%){}{}",
                p.mode,
                p.blocks_sent,
                p.blocks_total,
                if p.resumed_at_block > 0 { format!(", resumed at {}", p.resumed_at_block) } else { String::new() },
                if p.done { ", done" } else { "" }
            )
        }
    }
}

fn replica_rows(st: &ReplicationStatus) -> Vec<Vec<String>> {
    st.replicas
        .iter()
        .map(|r| {
            vec![
                format!("{}{}", r.host, if r.host == st.primary { " (primary)" } else { "" }),
                r.state.clone(),
                r.acked_seq.to_string(),
                r.lag_seq.to_string(),
                human_bytes(r.lag_bytes),
                r.lag_ms.to_string(),
                resync_cell(r),
            ]
        })
        .collect()
}

const REPLICA_HEADER: [&str; 7] = ["host", "state", "acked seq", "lag seq", "lag bytes", "lag ms", "resync"];

fn event_rows(events: &[VolumeEvent]) -> Vec<Vec<String>> {
    events
        .iter()
        .map(|e| {
            vec![
                e.id.to_string(),
                e.volume.to_string(),
                e.kind.clone(),
                e.host.map(|h| h.to_string()).unwrap_or_else(|| "-".into()),
                e.message.clone(),
            ]
        })
        .collect()
}

const EVENT_HEADER: [&str; 5] = ["id", "volume", "kind", "host", "message"];

/// A few lines of hexdump (identical lines collapsed to `*`), at most `max` bytes.
fn hexdump(data: &[u8], base: u64, max: usize) -> String {
    let mut out = String::new();
    let mut prev: Option<&[u8]> = None;
    let mut starred = false;
    for (i, line) in data[..data.len().min(max)].chunks(16).enumerate() {
        if prev == Some(line) {
            if !starred {
                out.push_str("*\n");
                starred = true;
            }
            continue;
        }
        starred = false;
        prev = Some(line);
        let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
        let ascii: String =
            line.iter().map(|&b| if b.is_ascii_graphic() || b == b' ' { b as char } else { '.' }).collect();
        out.push_str(&format!("{:08x}  {:<47}  |{ascii}|\n", base + (i * 16) as u64, hex.join(" ")));
    }
    out
}

fn to_hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// Handlers

fn check_io(v: &VolumeRecord, offset: u64, len: u64, what: &str) -> anyhow::Result<()> {
    let bs = v.block_size as u64;
    if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
        bail!(
            "{what} of {len} bytes at offset {offset} is not aligned: offset and length must be multiples of {}'s \
             block size {bs}",
            v.id
        );
    }
    if offset.checked_add(len).is_none_or(|end| end > v.size_bytes) {
        bail!("{what} of {len} bytes at offset {offset} runs past the end of {} ({} bytes)", v.id, v.size_bytes);
    }
    Ok(())
}

/// Bytes per read or write request: a multiple of the block size, well inside both the largest
/// I/O request and the largest wire frame (a request must fit in one frame with its envelope).
fn io_chunk(v: &VolumeRecord) -> u64 {
    let bs = v.block_size as u64;
    let limit = (MAX_IO_LEN as u64).min(MAX_FRAME_LEN as u64 / 2).min(4 << 20);
    (limit / bs).max(1) * bs
}

type ClientFn<'a> = &'a dyn Fn() -> anyhow::Result<HavenClient>;

pub async fn volume(cmd: VolumeCmd, client: ClientFn<'_>, out: &Output) -> anyhow::Result<()> {
    match cmd {
        VolumeCmd::Create(a) => {
            let replicas = a.replicas.unwrap_or(if a.hosts.is_empty() { 2 } else { a.hosts.len() as u8 });
            size_ok(a.size, a.block_size).map_err(|m| anyhow!("{m}"))?;
            if !a.hosts.is_empty() && a.hosts.len() != replicas as usize {
                bail!("{} hosts given for {replicas} replicas (give one host per replica)", a.hosts.len());
            }
            let spec =
                VolumeSpec { name: a.name, size_bytes: a.size, block_size: a.block_size, replicas, hosts: a.hosts };
            let v = client()?.create_volume(&spec).await?;
            out.done(&format!("created {}", volume_summary(&v)), serde_json::to_value(&v)?);
        }
        VolumeCmd::List => {
            let vols = client()?.volumes().await?;
            out.table(
                &["id", "name", "size", "replicas", "primary", "in-sync", "epoch"],
                vols.iter()
                    .map(|v| {
                        vec![
                            v.id.to_string(),
                            v.name.clone(),
                            human_bytes(v.size_bytes),
                            hosts_list(&v.replicas),
                            v.primary.to_string(),
                            hosts_list(&v.in_sync),
                            v.epoch.to_string(),
                        ]
                    })
                    .collect(),
                serde_json::to_value(&vols)?,
            );
        }
        VolumeCmd::Show { volume } => show(&client()?, &volume, out).await?,
        VolumeCmd::Resize { volume, size, yes } => {
            let c = client()?;
            let v = c.volume(&volume).await?;
            size_ok(size, v.block_size).map_err(|m| anyhow!("{m}"))?;
            if size < v.size_bytes && !yes {
                bail!(
                    "shrinking {} from {} to {} discards the data past the new end; pass --yes to confirm",
                    v.id,
                    human_bytes(v.size_bytes),
                    human_bytes(size)
                );
            }
            let v = c.resize_volume(v.id, size).await?;
            out.done(&format!("resized {}", volume_summary(&v)), serde_json::to_value(&v)?);
        }
        VolumeCmd::Delete { volume, yes } => {
            if !yes {
                bail!("deleting volume {volume:?} destroys its data and snapshots; pass --yes to confirm");
            }
            let c = client()?;
            let v = c.volume(&volume).await?;
            c.delete_volume(v.id).await?;
            out.done(&format!("deleted {} {:?}", v.id, v.name), json!({"deleted": v.id, "name": v.name}));
        }
        VolumeCmd::Write(a) => write(a, &client()?, out).await?,
        VolumeCmd::Read(a) => read(a, &client()?, out).await?,
        VolumeCmd::Events { volume, limit } => {
            let c = client()?;
            let id = match &volume {
                Some(v) => Some(c.volume(v).await?.id),
                None => None,
            };
            let events = c.volume_events(id, limit).await?;
            out.table(&EVENT_HEADER, event_rows(&events), serde_json::to_value(&events)?);
        }
        VolumeCmd::Status { volume } => status(&client()?, &volume, out).await?,
        VolumeCmd::WatchResync(a) => watch_resync(a, &client()?, out).await?,
        VolumeCmd::Preserved { volume, host } => {
            let c = client()?;
            let v = c.volume(&volume).await?;
            let preserved = c.preserved_writes(v.id, host).await?;
            out.headline(&format!("{} writes preserved on {host} for {} {:?}", preserved.len(), v.id, v.name));
            out.table(
                &["id", "host", "base snapshot", "blocks", "block numbers"],
                preserved
                    .iter()
                    .map(|p| {
                        vec![
                            p.id.to_string(),
                            p.host.to_string(),
                            p.base_snapshot.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                            p.blocks.len().to_string(),
                            block_ranges(&p.blocks),
                        ]
                    })
                    .collect(),
                serde_json::to_value(&preserved)?,
            );
        }
        VolumeCmd::Corrupt { volume, host, block, pattern } => {
            let c = client()?;
            let v = c.volume(&volume).await?;
            if block >= v.size_blocks() {
                bail!("block {block} is past the end of {} ({} blocks)", v.id, v.size_blocks());
            }
            if !v.replicas.contains(&host) {
                bail!("{host} holds no replica of {} (replicas: {})", v.id, hosts_list(&v.replicas));
            }
            c.inject_corruption(v.id, host, block, vec![pattern; v.block_size as usize]).await?;
            out.done(
                &format!("FAULT INJECTED: block {block} of {} on {host} overwritten with 0x{pattern:02x}", v.id),
                json!({"volume": v.id, "host": host, "block": block, "pattern": pattern}),
            );
        }
    }
    Ok(())
}

async fn show(c: &HavenClient, name: &str, out: &Output) -> anyhow::Result<()> {
    let v = c.volume(name).await?;
    let snaps = c.snapshots(v.id).await?;
    // The primary may be unreachable (that may be why someone is looking): show the rest anyway.
    let repl = c.replication_status(v.id).await;
    let events = c.volume_events(Some(v.id), 10).await?;
    if out.is_json() {
        let (replication, replication_error) = match &repl {
            Ok(r) => (serde_json::to_value(r)?, Value::Null),
            Err(e) => (Value::Null, json!(e.to_string())),
        };
        out.value(
            "",
            json!({"volume": v, "snapshots": snaps, "replication": replication,
                   "replication_error": replication_error, "events": events}),
        );
        return Ok(());
    }
    out.headline(&volume_summary(&v));
    out.headline("");
    if snaps.is_empty() {
        out.headline("Snapshots: none");
    } else {
        out.headline("Snapshots:");
        out.table(&SNAPSHOT_HEADER, snapshot_rows(&snaps), Value::Null);
    }
    out.headline("");
    match &repl {
        Ok(r) => {
            out.headline(&format!("Replication: primary {}, epoch {}, next seq {}", r.primary, r.epoch, r.next_seq));
            out.table(&REPLICA_HEADER, replica_rows(r), Value::Null);
        }
        Err(e) => out.headline(&format!("Replication: unavailable ({e})")),
    }
    out.headline("");
    if events.is_empty() {
        out.headline("Recent events: none");
    } else {
        out.headline("Recent events:");
        out.table(&EVENT_HEADER, event_rows(&events), Value::Null);
    }
    Ok(())
}

async fn status(c: &HavenClient, name: &str, out: &Output) -> anyhow::Result<()> {
    let v = c.volume(name).await?;
    let st = c.replication_status(v.id).await?;
    out.headline(&format!(
        "{} {:?}: primary {}, epoch {}, next seq {}",
        v.id, v.name, st.primary, st.epoch, st.next_seq
    ));
    let mut machine = serde_json::to_value(&st)?;
    machine["volume"] = json!(v.id);
    machine["name"] = json!(v.name);
    out.table(&REPLICA_HEADER, replica_rows(&st), machine);
    Ok(())
}

async fn write(a: WriteArgs, c: &HavenClient, out: &Output) -> anyhow::Result<()> {
    let data = match (&a.file, a.pattern, a.length) {
        (Some(path), _, _) => std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        (None, Some(p), Some(len)) => {
            let len = usize::try_from(len).map_err(|_| anyhow!("--length {len} is too large"))?;
            vec![p; len]
        }
        _ => bail!("give --file PATH or --pattern BYTE --length N"),
    };
    if data.is_empty() {
        bail!("nothing to write: {} is empty", a.file.as_ref().map(|p| p.display().to_string()).unwrap_or_default());
    }
    let v = c.volume(&a.volume).await?;
    if let Some(path) = &a.file {
        let bs = v.block_size as u64;
        if !(data.len() as u64).is_multiple_of(bs) {
            bail!(
                "{} is {} bytes, not a multiple of {}'s block size {bs}; pad it first (e.g. `truncate -s %{bs} {}`)",
                path.display(),
                data.len(),
                v.id,
                path.display()
            );
        }
    }
    check_io(&v, a.offset, data.len() as u64, "write")?;
    let chunk = io_chunk(&v) as usize;
    let mut seq = 0;
    for (i, part) in data.chunks(chunk).enumerate() {
        seq = c.write_volume(v.id, a.offset + (i * chunk) as u64, part).await?;
    }
    out.done(
        &format!("wrote {} at offset {} of {} (seq {seq})", human_bytes(data.len() as u64), a.offset, v.id),
        json!({"volume": v.id, "offset": a.offset, "length": data.len(), "seq": seq}),
    );
    Ok(())
}

async fn read(a: ReadArgs, c: &HavenClient, out: &Output) -> anyhow::Result<()> {
    let v = c.volume(&a.volume).await?;
    check_io(&v, a.offset, a.length, "read")?;
    let snap = match &a.snapshot {
        Some(s) => Some(c.find_snapshot(v.id, s).await?),
        None => None,
    };
    let chunk = io_chunk(&v);
    let mut data = Vec::with_capacity(usize::try_from(a.length).unwrap_or(0));
    let mut at = a.offset;
    let end = a.offset + a.length;
    while at < end {
        let len = chunk.min(end - at) as u32;
        let part = c.read_volume(v.id, at, len, snap.as_ref().map(|s| s.id)).await?;
        if part.len() != len as usize {
            bail!("short read from {}: asked for {len} bytes at {at}, got {}", v.id, part.len());
        }
        data.extend_from_slice(&part);
        at += len as u64;
    }
    let mut machine = json!({"volume": v.id, "offset": a.offset, "length": data.len(),
                             "snapshot": snap.as_ref().map(|s| s.id)});
    let from = snap.as_ref().map(|s| format!(" (snapshot {:?})", s.name)).unwrap_or_default();
    if let Some(path) = &a.out {
        std::fs::write(path, &data).with_context(|| format!("writing {}", path.display()))?;
        machine["out"] = json!(path.display().to_string());
        out.done(
            &format!(
                "read {} at offset {} of {}{from} into {}",
                human_bytes(data.len() as u64),
                a.offset,
                v.id,
                path.display()
            ),
            machine,
        );
    } else if out.is_json() {
        machine["hex"] = json!(to_hex(&data));
        out.value("", machine);
    } else if !std::io::stdout().is_terminal() {
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(&data).and_then(|_| stdout.flush()).context("writing to stdout")?;
    } else {
        let uniform = data.iter().all(|b| *b == data[0]);
        let shown = 256;
        println!(
            "read {} at offset {} of {}{from}{}",
            human_bytes(data.len() as u64),
            a.offset,
            v.id,
            if uniform { format!(": every byte is 0x{:02x}", data[0]) } else { String::new() }
        );
        print!("{}", hexdump(&data, a.offset, shown));
        if data.len() > shown {
            println!("… {} more bytes (use --out FILE, or pipe stdout, for all of them)", data.len() - shown);
        }
    }
    Ok(())
}

async fn watch_resync(a: WatchArgs, c: &HavenClient, out: &Output) -> anyhow::Result<()> {
    let v = c.volume(&a.volume).await?;
    if let Some(h) = a.host {
        if !v.replicas.contains(&h) {
            bail!("{h} holds no replica of {} (replicas: {})", v.id, hosts_list(&v.replicas));
        }
    }
    let wanted = |r: &ReplicaProgress| a.host.is_none_or(|h| h == r.host);
    let started = Instant::now();
    let multi = if out.is_json() {
        MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden())
    } else {
        MultiProgress::new()
    };
    let style = ProgressStyle::with_template("{prefix:>8} [{bar:40}] {pos}/{len} blocks ({percent}%) {msg}")
        .expect("static template")
        .progress_chars("=> ");
    // Before the block count is known (stale, or comparing Merkle trees).
    let waiting = ProgressStyle::with_template("{prefix:>8} {spinner} {msg} [{elapsed}]").expect("static template");
    let mut bars: BTreeMap<NodeId, ProgressBar> = BTreeMap::new();
    let mut watched: std::collections::BTreeSet<NodeId> = Default::default();
    let mut last_ok = Instant::now();
    let last = loop {
        match c.replication_status(v.id).await {
            Ok(st) => {
                last_ok = Instant::now();
                // A stale replica is waiting for its resync to start (once its host answers).
                let active: Vec<&ReplicaProgress> =
                    st.replicas.iter().filter(|r| wanted(r) && (is_resyncing(r) || r.state == "stale")).collect();
                for r in &active {
                    let bar = bars.entry(r.host).or_insert_with(|| multi.add(ProgressBar::new(0)));
                    if bar.is_finished() {
                        // Out of sync again after finishing: start a fresh bar.
                        *bar = multi.add(ProgressBar::new(0));
                    }
                    bar.set_prefix(r.host.to_string());
                    match &r.resync {
                        Some(p) if is_resyncing(r) && p.blocks_total > 0 => {
                            bar.set_style(style.clone());
                            bar.set_length(p.blocks_total);
                            bar.set_position(p.blocks_sent);
                            bar.set_message(format!(
                                "{} to seq {}, {} sent",
                                p.mode,
                                p.target_seq,
                                human_bytes(p.bytes_sent)
                            ));
                        }
                        Some(p) if is_resyncing(r) => {
                            bar.set_style(waiting.clone());
                            bar.set_message(format!(
                                "{} resync to seq {}: finding the blocks to send",
                                p.mode, p.target_seq
                            ));
                        }
                        _ => {
                            bar.set_style(waiting.clone());
                            bar.set_message(format!("{}: waiting for the resync to start", r.state));
                        }
                    }
                    bar.tick();
                    watched.insert(r.host);
                }
                for (host, bar) in &bars {
                    if !active.iter().any(|r| r.host == *host) && !bar.is_finished() {
                        bar.finish_with_message("done");
                    }
                }
                if active.is_empty() {
                    break st;
                }
            }
            Err(e) => {
                // A failover may be under way: keep polling for a while.
                if last_ok.elapsed() > Duration::from_secs(30) {
                    return Err(anyhow::Error::new(e).context(format!("asking for {}'s replication status", v.id)));
                }
                multi.println(format!("(replication status unavailable: {e}; retrying)")).ok();
            }
        }
        if a.timeout.is_some_and(|t| started.elapsed() > Duration::from_secs(t)) {
            bail!("{} still has replicas out of sync after {} s", v.id, a.timeout.unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(a.interval_ms)).await;
    };
    for bar in bars.values() {
        bar.finish_and_clear();
    }
    let human = if watched.is_empty() {
        match a.host {
            Some(h) => format!("{h} is neither resyncing nor stale for {}", v.id),
            None => format!("no replica of {} is resyncing or stale", v.id),
        }
    } else {
        format!(
            "resync of {} on {} finished after {:.1} s",
            v.id,
            hosts_list(&watched.iter().copied().collect::<Vec<_>>()),
            started.elapsed().as_secs_f64()
        )
    };
    let mut machine = serde_json::to_value(&last)?;
    machine["volume"] = json!(v.id);
    machine["watched"] = json!(watched);
    out.done(&human, machine);
    Ok(())
}

pub async fn snapshot(cmd: SnapshotCmd, client: ClientFn<'_>, out: &Output) -> anyhow::Result<()> {
    let c = client()?;
    match cmd {
        SnapshotCmd::Create { volume, name, label } => {
            let v = c.volume(&volume).await?;
            let s = c.snapshot(v.id, &name, label.as_deref()).await?;
            out.done(&format!("created {}", snapshot_summary(&s)), serde_json::to_value(&s)?);
        }
        SnapshotCmd::List { volume } => {
            let v = c.volume(&volume).await?;
            let snaps = c.snapshots(v.id).await?;
            out.table(&SNAPSHOT_HEADER, snapshot_rows(&snaps), serde_json::to_value(&snaps)?);
        }
        SnapshotCmd::Delete { volume, snapshot } => {
            let v = c.volume(&volume).await?;
            let s = c.find_snapshot(v.id, &snapshot).await?;
            c.delete_snapshot(v.id, s.id).await?;
            out.done(
                &format!("deleted snapshot {} {:?} of {}", s.id, s.name, v.id),
                json!({"volume": v.id, "deleted": s.id, "name": s.name}),
            );
        }
        SnapshotCmd::Rollback { volume, snapshot } => {
            let v = c.volume(&volume).await?;
            let s = c.find_snapshot(v.id, &snapshot).await?;
            c.rollback(v.id, s.id).await?;
            out.done(
                &format!("rolled {} back to snapshot {} {:?} (seq {})", v.id, s.id, s.name, s.seq),
                json!({"volume": v.id, "snapshot": s.id, "name": s.name, "seq": s.seq}),
            );
        }
        SnapshotCmd::Clone { volume, snapshot, new_name } => {
            let v = c.volume(&volume).await?;
            let s = c.find_snapshot(v.id, &snapshot).await?;
            let new = c.clone_snapshot(v.id, s.id, &new_name).await?;
            out.done(
                &format!("cloned snapshot {:?} of {} into {}", s.name, v.id, volume_summary(&new)),
                serde_json::to_value(&new)?,
            );
        }
        SnapshotCmd::Verify { volume, snapshot } => {
            let v = c.volume(&volume).await?;
            let s = c.find_snapshot(v.id, &snapshot).await?;
            let verdict = c.verify_snapshot(v.id, s.id).await?;
            report_verdict(&v, &s, &verdict, out)?;
        }
        SnapshotCmd::Repair { volume, snapshot, from } => {
            let v = c.volume(&volume).await?;
            let s = c.find_snapshot(v.id, &snapshot).await?;
            if !s.hosts.contains(&from) {
                bail!("{from} holds no copy of snapshot {:?} of {} (copies on {})", s.name, v.id, hosts_list(&s.hosts));
            }
            let verdict = c.repair_snapshot(v.id, s.id, from).await?;
            report_verdict(&v, &s, &verdict, out)?;
        }
    }
    Ok(())
}

/// Print a verdict; a mismatch (or no check at all) is an error so the exit status is 1.
fn report_verdict(
    v: &VolumeRecord,
    s: &SnapshotRecord,
    verdict: &IntegrityVerdict,
    out: &Output,
) -> anyhow::Result<()> {
    out.done(
        &format!("snapshot {} {:?} of {}: {}", s.id, s.name, v.id, verdict_long(verdict)),
        json!({"volume": v.id, "snapshot": s.id, "name": s.name, "verdict": verdict}),
    );
    match verdict {
        IntegrityVerdict::Mismatch { blocks, total_differing, .. } => bail!(
            "snapshot {:?} of {} differs across replicas at {} ({}); repair it with \
             `havenctl snapshot repair {} {} --from HOST`",
            s.name,
            v.id,
            plural(*total_differing, "block"),
            block_ranges(blocks),
            v.name,
            s.name
        ),
        IntegrityVerdict::NotChecked => bail!("snapshot {:?} of {} was not checked", s.name, v.id),
        IntegrityVerdict::Match { .. } | IntegrityVerdict::Repaired { .. } => Ok(()),
    }
}

pub async fn policy(cmd: PolicyCmd, client: ClientFn<'_>, out: &Output) -> anyhow::Result<()> {
    let c = client()?;
    match cmd {
        PolicyCmd::Create { name, volume, label, every, keep } => {
            let v = c.volume(&volume).await?;
            let p = c.put_policy(SnapshotPolicy { name, volume: v.id, label, interval_secs: every, keep }).await?;
            out.done(
                &format!(
                    "policy {:?}: snapshots of {} labeled {:?} {}, keeping {}",
                    p.name,
                    v.id,
                    p.label,
                    every_text(p.interval_secs),
                    p.keep
                ),
                serde_json::to_value(&p)?,
            );
        }
        PolicyCmd::List => {
            let policies = c.policies().await?;
            let names: BTreeMap<VolumeId, String> = if policies.is_empty() {
                BTreeMap::new()
            } else {
                c.volumes().await?.into_iter().map(|v| (v.id, v.name)).collect()
            };
            out.table(
                &["name", "volume", "label", "every", "keep"],
                policies
                    .iter()
                    .map(|p| {
                        vec![
                            p.name.clone(),
                            match names.get(&p.volume) {
                                Some(n) => format!("{} ({n})", p.volume),
                                None => p.volume.to_string(),
                            },
                            p.label.clone(),
                            every_text(p.interval_secs),
                            p.keep.to_string(),
                        ]
                    })
                    .collect(),
                serde_json::to_value(&policies)?,
            );
        }
        PolicyCmd::Delete { name } => {
            c.delete_policy(&name).await?;
            out.done(&format!("deleted policy {name:?}"), json!({"deleted": name}));
        }
        PolicyCmd::Run { name } => {
            let s = c.run_policy(&name).await?;
            out.done(&format!("policy {name:?} took {}", snapshot_summary(&s)), serde_json::to_value(&s)?);
            if let IntegrityVerdict::Mismatch { blocks, total_differing, .. } = &s.verdict {
                bail!(
                    "snapshot {:?} differs across replicas at {} ({})",
                    s.name,
                    plural(*total_differing, "block"),
                    block_ranges(blocks)
                );
            }
        }
    }
    Ok(())
}

fn every_text(secs: u64) -> String {
    match secs {
        0 => "on request only".into(),
        s if s % 86_400 == 0 => format!("every {}d", s / 86_400),
        s if s % 3600 == 0 => format!("every {}h", s / 3600),
        s if s % 60 == 0 => format!("every {}m", s / 60),
        s => format!("every {s}s"),
    }
}

pub async fn replication(cmd: ReplicationCmd, client: ClientFn<'_>, out: &Output) -> anyhow::Result<()> {
    let c = client()?;
    let rel_text = |r: &haven_client::proto::volume::Relationship| {
        format!(
            "relationship {}: {} -> {}, {:?}, max lag {}",
            r.id,
            r.volume,
            r.target,
            r.state,
            human_bytes(r.max_lag_bytes)
        )
    };
    match cmd {
        ReplicationCmd::Create { volume, target, max_lag } => {
            let v = c.volume(&volume).await?;
            let r = c.create_relationship(v.id, target, max_lag).await?;
            out.done(&format!("created {}", rel_text(&r)), serde_json::to_value(&r)?);
        }
        ReplicationCmd::List => {
            let rels = c.relationships().await?;
            out.table(
                &["id", "volume", "target", "state", "max lag"],
                rels.iter()
                    .map(|r| {
                        vec![
                            r.id.to_string(),
                            r.volume.to_string(),
                            r.target.to_string(),
                            format!("{:?}", r.state).to_lowercase(),
                            human_bytes(r.max_lag_bytes),
                        ]
                    })
                    .collect(),
                serde_json::to_value(&rels)?,
            );
        }
        ReplicationCmd::Pause { id } => {
            let r = c.set_relationship_state(id, RelationshipState::Paused).await?;
            out.done(&format!("paused {}", rel_text(&r)), serde_json::to_value(&r)?);
        }
        ReplicationCmd::Resume { id } => {
            let r = c.set_relationship_state(id, RelationshipState::Active).await?;
            out.done(&format!("resumed {}", rel_text(&r)), serde_json::to_value(&r)?);
        }
        ReplicationCmd::Reverse { id } => {
            let rel = c
                .relationships()
                .await?
                .into_iter()
                .find(|r| r.id == id)
                .ok_or_else(|| anyhow::anyhow!("no relationship {id}"))?;
            c.reverse_relationship(rel.volume, id).await?;
            let after = c.relationships().await?.into_iter().find(|r| r.id == id);
            out.done(
                &format!("reversed relationship {id}: {} is now primary of {}", rel.target, rel.volume),
                serde_json::to_value(&after)?,
            );
        }
        ReplicationCmd::Delete { id } => {
            c.delete_relationship(id).await?;
            out.done(&format!("deleted relationship {id}"), json!({"deleted": id}));
        }
        ReplicationCmd::Status { volume } => status(&c, &volume, out).await?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64mb"), Ok(64 << 20));
        assert_eq!(parse_size("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999T").unwrap_err().contains("too large"));
        assert!(parse_nonzero_size("0").is_err());
        assert_eq!(parse_block_size("4K"), Ok(4096));
        assert!(parse_block_size("1000").is_err());
    }

    #[test]
    fn ids_bytes_intervals() {
        assert_eq!(parse_host("2"), Ok(NodeId(2)));
        assert_eq!(parse_host("node-3"), Ok(NodeId(3)));
        assert!(parse_host("0").is_err());
        assert!(parse_host("nodeX").is_err());
        assert_eq!(parse_rel_id("rel-4"), Ok(4));
        assert_eq!(parse_byte("0xAB"), Ok(0xab));
        assert_eq!(parse_byte("171"), Ok(171));
        assert!(parse_byte("0x100").is_err());
        assert!(parse_byte("256").is_err());
        assert_eq!(parse_interval("0"), Ok(0));
        assert_eq!(parse_interval("60s"), Ok(60));
        assert_eq!(parse_interval("15m"), Ok(900));
        assert_eq!(parse_interval("24h"), Ok(86_400));
        assert!(parse_interval("soon").is_err());
    }

    #[test]
    fn formatting() {
        assert_eq!(human_bytes(8 << 20), "8 MiB");
        assert_eq!(human_bytes(1000), "1000 B");
        assert_eq!(human_bytes(1536 << 20), "1.5 GiB");
        assert_eq!(block_ranges(&[0, 1, 2, 5, 7, 8]), "0-2, 5, 7-8");
        assert_eq!(block_ranges(&[0]), "0");
        let dump = hexdump(&[0xab; 64], 0, 256);
        assert_eq!(dump.lines().count(), 2, "{dump}");
        assert!(dump.contains('*'));
    }
}
