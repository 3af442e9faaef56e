//! The block workload: writers overwrite 4 KiB blocks of one replicated volume while faults fire,
//! recording every attempt in the [`History`](crate::history) as a `block_write`. Each writer owns
//! a disjoint range of blocks and numbers the writes to each block 1, 2, 3, ... (every attempt,
//! acknowledged or not), so the content of a block says exactly which write put it there.
//!
//! Block content (4096 bytes, integers little-endian):
//!
//! | bytes     | field                                                        |
//! |-----------|--------------------------------------------------------------|
//! | 0..8      | magic `HVNBLK01`                                             |
//! | 8..16     | writer                                                       |
//! | 16..24    | block number                                                 |
//! | 24..32    | n, the per-block write sequence                              |
//! | 32..40    | checksum over bytes 0..32                                    |
//! | 40..4096  | filler: a pseudo-random stream seeded from the checksum      |
//!
//! A torn or mixed write breaks the checksum or the filler; a stale one shows a smaller n.
//! This module also does the block checker's I/O (read-back and replica progress); the judging
//! itself is [`crate::checker::blocks`], which only looks at history and bytes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use haven_client::proto::volume::{VolumeEvent, VolumeRecord};
use haven_client::proto::VolumeId;
use haven_client::volumes::{ReplicationStatus, VolumeSpec};
use haven_client::HavenClient;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tracing::{info, warn};

use crate::history::{Op, OpKind, Outcome};
use crate::scenario::{BlockSpec, BLOCK_BYTES};

const BLOCK: usize = BLOCK_BYTES as usize;
const MAGIC: [u8; 8] = *b"HVNBLK01";
const HEADER: usize = 40;

/// The history key of a block.
pub fn block_key(block: u64) -> String {
    format!("blk/{block}")
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a over `bytes`, finished with a splitmix round.
fn checksum(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix(&mut h)
}

fn filler(sum: u64, out: &mut [u8]) {
    let mut state = sum;
    for chunk in out.chunks_mut(8) {
        let w = splitmix(&mut state).to_le_bytes();
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
}

/// The content of the `n`th write of `writer` to `block`.
pub fn encode(writer: u64, block: u64, n: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..16].copy_from_slice(&writer.to_le_bytes());
    b[16..24].copy_from_slice(&block.to_le_bytes());
    b[24..32].copy_from_slice(&n.to_le_bytes());
    let sum = checksum(&b[0..32]);
    b[32..40].copy_from_slice(&sum.to_le_bytes());
    filler(sum, &mut b[HEADER..]);
    b
}

/// What a block read back as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// Never written (all zeroes).
    Zero,
    /// A whole, intact block written by the workload.
    Valid { writer: u64, block: u64, n: u64 },
    /// Anything else: wrong length, magic, checksum or filler.
    Corrupt(String),
}

pub fn decode(b: &[u8]) -> Decoded {
    if b.len() != BLOCK {
        return Decoded::Corrupt(format!("{} bytes instead of {BLOCK}", b.len()));
    }
    if b.iter().all(|&x| x == 0) {
        return Decoded::Zero;
    }
    if b[0..8] != MAGIC {
        return Decoded::Corrupt(format!("bad magic {:02x?}", &b[0..8]));
    }
    let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let sum = checksum(&b[0..32]);
    if word(32) != sum {
        return Decoded::Corrupt("header checksum mismatch".into());
    }
    let mut expected = vec![0u8; BLOCK - HEADER];
    filler(sum, &mut expected);
    if let Some(i) = expected.iter().zip(&b[HEADER..]).position(|(a, b)| a != b) {
        return Decoded::Corrupt(format!(
            "filler differs from byte {} (torn or mixed write of writer {} block {} n={})",
            HEADER + i,
            word(8),
            word(16),
            word(24)
        ));
    }
    Decoded::Valid { writer: word(8), block: word(16), n: word(24) }
}

/// Create the volume (or find it, when an earlier attempt whose answer was lost created it), then
/// wait until its primary serves reads. Retries until `within` has passed.
pub async fn setup_volume(client: &HavenClient, spec: &BlockSpec, within: Duration) -> anyhow::Result<VolumeRecord> {
    let want = VolumeSpec::new(spec.volume.clone(), spec.volume_size, spec.replicas);
    create_and_serve(client, &want, within).await
}

/// Create the volume `want` (or find it), check its block size, and wait until its primary
/// serves reads (and, briefly, until its replicas are in sync). Retries until `within` has passed.
pub async fn create_and_serve(
    client: &HavenClient,
    want: &VolumeSpec,
    within: Duration,
) -> anyhow::Result<VolumeRecord> {
    let start = Instant::now();
    let client = client.clone().with_deadline(Duration::from_secs(3));
    let spec = want;
    let volume = loop {
        let last = match client.create_volume(want).await {
            Ok(v) => break v,
            Err(e) => e,
        };
        if let Ok(v) = client.volume(&spec.name).await {
            break v;
        }
        if start.elapsed() >= within {
            bail!("volume {:?} could not be created within {within:?}; last error: create: {last}", spec.name);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    if volume.block_size as u64 != BLOCK_BYTES || volume.size_bytes < spec.size_bytes {
        bail!(
            "volume {:?} has block size {} and {} bytes; the workload needs {BLOCK_BYTES}-byte blocks and {} bytes",
            spec.name,
            volume.block_size,
            volume.size_bytes,
            spec.size_bytes
        );
    }
    info!(volume = %volume.id, primary = %volume.primary, replicas = ?volume.replicas, "volume created");
    loop {
        match client.read_volume(volume.id, 0, BLOCK_BYTES as u32, None).await {
            Ok(_) => break,
            Err(e) if start.elapsed() >= within => {
                bail!("volume {} was created but not served within {within:?}: {e}", volume.id)
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    // Start from replicas in sync when that is quick; the run does not depend on it.
    if let Err(e) = wait_in_sync(&client, volume.id, Duration::from_secs(10)).await {
        warn!(status = %e.describe(), "replicas not all in sync before the run");
    }
    Ok(volume)
}

/// Run one writer per client until `stop`, appending `block_write`s to `history`. After every
/// third write a writer reads one of its blocks back through one of `readers` (one client per
/// node, chosen at random: a read served by whichever node it lands on, as a client with a
/// cached route would send it) and records a `block_read`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    spec: &BlockSpec,
    seed: u64,
    volume: VolumeId,
    clients: Vec<HavenClient>,
    readers: Vec<HavenClient>,
    epoch: Instant,
    stop: tokio::sync::watch::Receiver<bool>,
    history: Arc<Mutex<Vec<Op>>>,
) {
    let gap = Duration::from_secs_f64(spec.writers as f64 / spec.rate as f64);
    let mut tasks = Vec::new();
    for (w, client) in clients.into_iter().enumerate() {
        let blocks = spec.ownership().blocks_of(w);
        let client = client.with_deadline(spec.op_timeout);
        let readers: Vec<HavenClient> = readers.iter().map(|r| r.clone().with_deadline(spec.op_timeout)).collect();
        let (history, stop) = (history.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng =
                rand::rngs::StdRng::seed_from_u64((seed ^ 0xb10c_b10c).wrapping_mul(1_000_003).wrapping_add(w as u64));
            let mut next_n: BTreeMap<u64, u64> = BTreeMap::new();
            while !*stop.borrow() {
                let block = rng.random_range(blocks.clone());
                let n = {
                    let n = next_n.entry(block).or_insert(0);
                    *n += 1;
                    *n
                };
                let data = encode(w as u64, block, n);
                let invoke = epoch.elapsed();
                let result = client.write_volume(volume, block * BLOCK_BYTES, &data).await;
                let complete = epoch.elapsed();
                let (outcome, error) = match result {
                    Ok(_) => (Outcome::Ok { read: None, cas_matched: None }, None),
                    Err(e) => (Outcome::of_error(&e), Some(e.to_string())),
                };
                Op {
                    id: 0,
                    client: w,
                    key: block_key(block),
                    kind: OpKind::BlockWrite { block, n },
                    invoke_us: invoke.as_micros() as u64,
                    complete_us: complete.as_micros() as u64,
                    outcome,
                    error,
                }
                .record(&history);
                if n % 3 == 0 && !readers.is_empty() {
                    let reader = &readers[rng.random_range(0..readers.len())];
                    let read = rng.random_range(blocks.clone());
                    read_one(reader, volume, w, read, epoch, &history).await;
                }
                tokio::time::sleep(gap.saturating_sub(complete - invoke)).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Writer `w` reads its block `block` once and records what it found (only a read that decodes
/// as this block's own write, or as zeroes; the end-of-run check judges damaged blocks).
async fn read_one(
    client: &HavenClient,
    volume: VolumeId,
    w: usize,
    block: u64,
    epoch: Instant,
    history: &Mutex<Vec<Op>>,
) {
    let invoke = epoch.elapsed();
    let result = client.read_volume(volume, block * BLOCK_BYTES, BLOCK_BYTES as u32, None).await;
    let complete = epoch.elapsed();
    let n = match result.as_deref().map(decode) {
        Ok(Decoded::Zero) => 0,
        Ok(Decoded::Valid { writer, block: b, n }) if writer == w as u64 && b == block => n,
        _ => return,
    };
    Op {
        id: 0,
        client: w,
        key: block_key(block),
        kind: OpKind::BlockRead { block, n },
        invoke_us: invoke.as_micros() as u64,
        complete_us: complete.as_micros() as u64,
        outcome: Outcome::Ok { read: None, cas_matched: None },
        error: None,
    }
    .record(history);
}

/// Read every owned block through the SDK (reads go to the primary), retrying each range until
/// `within` has passed. Blocks that stayed unreadable map to the last error.
pub async fn read_back(
    client: &HavenClient,
    spec: &BlockSpec,
    volume: VolumeId,
    within: Duration,
) -> BTreeMap<u64, Result<Vec<u8>, String>> {
    const CHUNK: u64 = 256;
    let start = Instant::now();
    let client = client.clone().with_deadline(Duration::from_secs(3));
    let mut out = BTreeMap::new();
    let owned = spec.ownership().owned_blocks();
    let mut first = owned.start;
    while first < owned.end {
        let count = CHUNK.min(owned.end - first);
        let result = loop {
            match client.read_volume(volume, first * BLOCK_BYTES, (count * BLOCK_BYTES) as u32, None).await {
                Ok(data) if data.len() as u64 == count * BLOCK_BYTES => break Ok(data),
                Ok(data) => {
                    break Err(format!("read of {count} blocks at block {first} returned {} bytes", data.len()))
                }
                Err(e) if start.elapsed() >= within => break Err(format!("unreadable for {within:?}: {e}")),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        for i in 0..count {
            let r = result.as_ref().map(|d| d[(i * BLOCK_BYTES) as usize..((i + 1) * BLOCK_BYTES) as usize].to_vec());
            out.insert(first + i, r.map_err(Clone::clone));
        }
        first += count;
    }
    out
}

/// How replication stood after healing.
#[derive(Debug, Clone, Serialize)]
pub struct InSync {
    /// Time from asking until every replica reported `in_sync`; None if that did not happen.
    pub after_ms: Option<u64>,
    /// The last replication status seen.
    pub status: Option<ReplicationStatus>,
    /// The last error, when no status could be fetched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl InSync {
    pub fn describe(&self) -> String {
        let replicas = |s: &ReplicationStatus| {
            s.replicas
                .iter()
                .map(|r| {
                    let resync = r
                        .resync
                        .as_ref()
                        .map(|p| format!(" resync {}/{} blocks", p.blocks_sent, p.blocks_total))
                        .unwrap_or_default();
                    format!("{} {}{resync}", r.host, r.state)
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        match (&self.after_ms, &self.status) {
            (Some(ms), Some(s)) => {
                format!(
                    "every replica in sync {ms} ms after healing (primary {}, epoch {}): {}",
                    s.primary,
                    s.epoch,
                    replicas(s)
                )
            }
            (None, Some(s)) => {
                format!("NOT all in sync yet (primary {}, epoch {}): {}", s.primary, s.epoch, replicas(s))
            }
            (_, None) => format!("no replication status: {}", self.error.as_deref().unwrap_or("unknown")),
        }
    }
}

/// Wait until the primary reports every replica `in_sync`.
pub async fn wait_in_sync(client: &HavenClient, volume: VolumeId, within: Duration) -> Result<InSync, InSync> {
    let start = Instant::now();
    let client = client.clone().with_deadline(Duration::from_secs(2));
    let mut seen = InSync { after_ms: None, status: None, error: None };
    loop {
        match client.replication_status(volume).await {
            Ok(s) => {
                let done = !s.replicas.is_empty() && s.replicas.iter().all(|r| r.state == "in_sync");
                seen.status = Some(s);
                if done {
                    seen.after_ms = Some(start.elapsed().as_millis() as u64);
                    return Ok(seen);
                }
            }
            Err(e) => seen.error = Some(e.to_string()),
        }
        if start.elapsed() >= within {
            return Err(seen);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The catalog's record and the recent events of the volume, for the report.
pub async fn describe_volume(client: &HavenClient, volume: VolumeId) -> (Option<VolumeRecord>, Vec<VolumeEvent>) {
    let client = client.clone().with_deadline(Duration::from_secs(3));
    let record = client.volume(&volume.0.to_string()).await.ok();
    let events = client.volume_events(Some(volume), 100).await.unwrap_or_default();
    (record, events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_and_damage_is_seen() {
        let b = encode(2, 130, 7);
        assert_eq!(b.len(), BLOCK);
        assert_eq!(decode(&b), Decoded::Valid { writer: 2, block: 130, n: 7 });
        assert_ne!(encode(2, 130, 8)[HEADER..], b[HEADER..], "filler depends on n");
        assert_eq!(decode(&vec![0; BLOCK]), Decoded::Zero);
        let mut torn = b.clone();
        torn[2048..].copy_from_slice(&encode(2, 130, 8)[2048..]);
        assert!(matches!(decode(&torn), Decoded::Corrupt(m) if m.contains("filler")));
        let mut header = b.clone();
        header[24] ^= 1;
        assert!(matches!(decode(&header), Decoded::Corrupt(m) if m.contains("checksum")));
        assert!(matches!(decode(&b[..100]), Decoded::Corrupt(_)));
    }
}
