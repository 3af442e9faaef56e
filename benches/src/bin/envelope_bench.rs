//! `envelope_bench`: nanoseconds per message to encode an [`Envelope`] (rkyv), to validate and
//! access it in place (`Envelope::access`: bytecheck + version check, zero copy), and to decode
//! it fully (`Envelope::decode`), for a `Body::Raft { rpc, payload }` envelope with a 64 B and a
//! 64 KiB payload (`--sizes`).
//!
//! Baselines, measured in the same run on the same sizes: a memcpy of the archive's bytes into a
//! preallocated buffer, the node's bincode codec (`haven_node::raft::encode`/`decode`, what Raft
//! payloads use) on an equivalent tuple, and a plain length-prefix copy (4-byte length + payload
//! into a new buffer, and back with a bounds check).
//!
//! Timing is a plain `Instant` loop: iterations are calibrated so each sample lasts about
//! `--sample-ms`, and the median of `--samples` samples is reported.

use std::hint::black_box;
use std::time::{Duration, Instant};

use clap::Parser;
use haven_benches::report::ratio;
use haven_benches::{Cell, Report, Table};
use haven_proto::{ActorAddr, Body, Envelope, NodeId, RaftRpc};

#[derive(Parser, Debug)]
#[command(about = "Envelope encode / validate / decode cost against memcpy, bincode and length-prefix baselines")]
struct Args {
    /// Payload sizes in bytes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "64,65536")]
    sizes: Vec<usize>,
    /// Target duration of one timing sample, in ms (default 200; 40 with --quick).
    #[arg(long)]
    sample_ms: Option<u64>,
    /// Timing samples per operation; the median is reported (default 7; 3 with --quick).
    #[arg(long)]
    samples: Option<usize>,
    /// Short run for CI (a few seconds).
    #[arg(long)]
    quick: bool,
    /// Print the figures as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// The result of timing one operation.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// Median over samples.
    ns_per_op: f64,
    /// Fastest sample.
    min_ns_per_op: f64,
}

/// Time `op`: calibrate an iteration count that lasts about `sample`, then take `samples`
/// samples of that many iterations.
fn time_op(sample: Duration, samples: usize, mut op: impl FnMut()) -> Timing {
    // Calibrate: double the batch until it takes at least a millisecond.
    let mut iters: u64 = 1;
    let per_op = loop {
        let start = Instant::now();
        for _ in 0..iters {
            op();
        }
        let took = start.elapsed();
        if took >= Duration::from_millis(1) || iters >= 1 << 30 {
            break took.as_secs_f64() / iters as f64;
        }
        iters *= 2;
    };
    let iters = ((sample.as_secs_f64() / per_op.max(1e-10)) as u64).max(1);
    let mut per_sample: Vec<f64> = (0..samples.max(1))
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iters {
                op();
            }
            start.elapsed().as_nanos() as f64 / iters as f64
        })
        .collect();
    per_sample.sort_by(f64::total_cmp);
    Timing { ns_per_op: per_sample[per_sample.len() / 2], min_ns_per_op: per_sample[0] }
}

/// The fields of the envelope as a serde tuple, for the bincode baseline:
/// (version, msg_id, sender, (dest node, dest kind, dest id), flags, rpc, payload).
type BincodeEquivalent = (u16, u64, u64, (u64, u8, u64), u32, u8, Vec<u8>);

struct SizeResult {
    payload: usize,
    archive_len: usize,
    bincode_len: usize,
    encode: Timing,
    access: Timing,
    decode: Timing,
    memcpy: Timing,
    bincode_ser: Timing,
    bincode_de: Timing,
    lp_encode: Timing,
    lp_decode: Timing,
}

fn bench_size(payload_len: usize, sample: Duration, samples: usize) -> anyhow::Result<SizeResult> {
    let payload: Vec<u8> = (0..payload_len).map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8).collect();
    let env = Envelope::new(
        42,
        NodeId(1),
        ActorAddr::node(NodeId(2)),
        Body::Raft { rpc: RaftRpc::AppendEntries, payload: payload.clone() },
    );
    let archive = env.encode()?;
    // Sanity: what we time must round-trip.
    anyhow::ensure!(Envelope::decode(&archive)? == env, "envelope did not round-trip");

    let encode = time_op(sample, samples, || {
        black_box(black_box(&env).encode().ok());
    });
    let access = time_op(sample, samples, || {
        black_box(Envelope::access(black_box(&archive[..])).ok());
    });
    let decode = time_op(sample, samples, || {
        black_box(Envelope::decode(black_box(&archive[..])).ok());
    });

    let mut dst = vec![0u8; archive.len()];
    let memcpy = time_op(sample, samples, || {
        dst.copy_from_slice(black_box(&archive[..]));
        black_box(&mut dst);
    });

    let tuple: BincodeEquivalent = (1, 42, 1, (2, 0, 0), 0, 0, payload.clone());
    let bincode_bytes = haven_node::raft::encode(&tuple).map_err(anyhow::Error::msg)?;
    let back: BincodeEquivalent = haven_node::raft::decode(&bincode_bytes).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(back == tuple, "bincode baseline did not round-trip");
    let bincode_ser = time_op(sample, samples, || {
        black_box(haven_node::raft::encode(black_box(&tuple)).ok());
    });
    let bincode_de = time_op(sample, samples, || {
        black_box(haven_node::raft::decode::<BincodeEquivalent>(black_box(&bincode_bytes)).ok());
    });

    let lp_encode = time_op(sample, samples, || {
        black_box(length_prefix_encode(black_box(&payload)));
    });
    let framed = length_prefix_encode(&payload);
    anyhow::ensure!(length_prefix_decode(&framed).as_deref() == Some(&payload[..]), "length-prefix round trip");
    let lp_decode = time_op(sample, samples, || {
        black_box(length_prefix_decode(black_box(&framed)));
    });

    Ok(SizeResult {
        payload: payload_len,
        archive_len: archive.len(),
        bincode_len: bincode_bytes.len(),
        encode,
        access,
        decode,
        memcpy,
        bincode_ser,
        bincode_de,
        lp_encode,
        lp_decode,
    })
}

/// The simplest framing there is: a 4-byte big-endian length, then the bytes.
fn length_prefix_encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Parse a length-prefixed buffer into an owned payload, refusing a length that overruns it.
fn length_prefix_decode(buf: &[u8]) -> Option<Vec<u8>> {
    let (head, rest) = buf.split_first_chunk::<4>()?;
    let len = u32::from_be_bytes(*head) as usize;
    rest.get(..len).map(<[u8]>::to_vec)
}

fn human_size(n: usize) -> String {
    if n >= 1024 && n.trailing_zeros() >= 10 {
        format!("{} KiB", n / 1024)
    } else {
        format!("{n} B")
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sample = Duration::from_millis(args.sample_ms.unwrap_or(if args.quick { 40 } else { 200 }));
    let samples = args.samples.unwrap_or(if args.quick { 3 } else { 7 });
    anyhow::ensure!(!args.sizes.is_empty(), "--sizes must name at least one size");

    let mut report = Report::new(
        "envelope_bench",
        "ns per message for Envelope encode / validate+access / full decode (Body::Raft with a Vec<u8> payload), \
         beside memcpy, the node's bincode codec and a length-prefix copy of the same bytes",
    );
    report.param("sizes", args.sizes.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(","));
    report.param("sample_ms", sample.as_millis() as u64);
    report.param("samples", samples as u64);

    let mut table = Table::new(
        "Envelope codec cost (median ns per message; 'x memcpy' and 'x bincode' = ns / baseline ns)",
        &["payload", "operation", "bytes", "ns/msg", "min ns", "payload MiB/s", "x memcpy", "x bincode"],
    );
    for &size in &args.sizes {
        eprintln!("envelope_bench: timing {size}-byte payloads ...");
        let r = bench_size(size, sample, samples)?;
        let p = human_size(r.payload);
        let mibs = |t: Timing| r.payload as f64 / (t.ns_per_op * 1e-9) / (1024.0 * 1024.0);
        let mut row = |op: &str, bytes: usize, t: Timing, vs_bincode: Option<Timing>| {
            table.row(vec![
                Cell::text(&p),
                Cell::text(op),
                Cell::int(bytes as u64),
                Cell::num(t.ns_per_op, 1),
                Cell::num(t.min_ns_per_op, 1),
                Cell::num(mibs(t), 0),
                Cell::ratio(ratio(t.ns_per_op, r.memcpy.ns_per_op)),
                vs_bincode.map_or(Cell::Empty, |b| Cell::ratio(ratio(t.ns_per_op, b.ns_per_op))),
            ]);
        };
        row("rkyv encode (Envelope::encode)", r.archive_len, r.encode, Some(r.bincode_ser));
        row("rkyv validate+access (Envelope::access)", r.archive_len, r.access, Some(r.bincode_de));
        row("rkyv full decode (Envelope::decode)", r.archive_len, r.decode, Some(r.bincode_de));
        row("baseline: memcpy of the archive bytes", r.archive_len, r.memcpy, None);
        row("baseline: bincode serialize (node codec)", r.bincode_len, r.bincode_ser, None);
        row("baseline: bincode deserialize (node codec)", r.bincode_len, r.bincode_de, None);
        row("baseline: length-prefix encode (alloc+copy)", r.payload + 4, r.lp_encode, None);
        row("baseline: length-prefix decode (check+alloc+copy)", r.payload + 4, r.lp_decode, None);
    }
    report.tables.push(table);
    report.note(
        "encode and decode allocate their output, as in the transport; memcpy copies into a preallocated buffer. \
         'x bincode' compares encode with bincode serialize, and access/decode with bincode deserialize.",
    );
    std::process::exit(report.print(args.json, false));
}
