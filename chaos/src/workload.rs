//! The register workload: clients issue reads, writes and compare-and-sets on a few shared keys
//! (for linearizability) and appends to keys of their own (for the acknowledged-writes check),
//! recording every operation in the [`History`](crate::history). Each client's sequence of
//! operations comes from the scenario seed, so a replay issues the same operations.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use haven_client::{ClientError, HavenClient};
use rand::{Rng, SeedableRng};

use crate::history::{Op, OpKind, Outcome};
use crate::scenario::WorkloadSpec;

/// The shared registers' key names.
pub fn register_key(i: usize) -> String {
    format!("reg/{i}")
}

/// The append keys' prefix.
pub const APPEND_PREFIX: &str = "ack/";

fn decode(v: Option<Vec<u8>>) -> Result<Option<u64>, String> {
    match v {
        None => Ok(None),
        Some(b) => {
            let s = String::from_utf8(b).map_err(|_| "value is not UTF-8".to_string())?;
            s.parse().map(Some).map_err(|_| format!("value {s:?} is not a number"))
        }
    }
}

/// Run `spec.clients` clients until `stop`, appending to `history`.
pub async fn run(
    spec: &WorkloadSpec,
    seed: u64,
    clients: Vec<HavenClient>,
    epoch: Instant,
    stop: tokio::sync::watch::Receiver<bool>,
    history: Arc<Mutex<Vec<Op>>>,
) {
    let mut tasks = Vec::new();
    for (c, client) in clients.into_iter().enumerate() {
        let spec = spec.clone();
        let history = history.clone();
        let stop = stop.clone();
        let client = client.with_deadline(spec.op_timeout);
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(c as u64));
            let gap = Duration::from_secs_f64(1.0 / spec.rate as f64);
            let mut seq = 0u64;
            let mut last_seen: Vec<Option<u64>> = vec![None; spec.keys];
            loop {
                if *stop.borrow() {
                    break;
                }
                seq += 1;
                let value = ((c as u64 + 1) << 32) | seq;
                let k = rng.random_range(0..spec.keys);
                let roll = rng.random_range(0..100);
                let (key, kind) = match roll {
                    0..=29 => (register_key(k), OpKind::Read),
                    30..=54 => (register_key(k), OpKind::Write { value }),
                    55..=69 => (register_key(k), OpKind::Cas { expected: last_seen[k], new: value }),
                    _ => (format!("{APPEND_PREFIX}{c}/{seq}"), OpKind::Append { value }),
                };
                let invoke = epoch.elapsed();
                let result = execute(&client, &key, kind).await;
                let complete = epoch.elapsed();
                let (outcome, error) = match result {
                    Ok((read, cas_matched)) => {
                        if let Some(r) = read {
                            last_seen[k] = r;
                        }
                        if let OpKind::Write { value } = kind {
                            last_seen[k] = Some(value);
                        }
                        (Outcome::Ok { read: read.flatten(), cas_matched }, None)
                    }
                    Err(e) => (Outcome::of_error(&e), Some(e.to_string())),
                };
                Op {
                    id: 0,
                    client: c,
                    key,
                    kind,
                    invoke_us: invoke.as_micros() as u64,
                    complete_us: complete.as_micros() as u64,
                    outcome,
                    error,
                }
                .record(&history);
                tokio::time::sleep(gap.saturating_sub(complete - invoke)).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Returns (value read — `Some` only for reads, whether a CAS matched).
async fn execute(
    client: &HavenClient,
    key: &str,
    kind: OpKind,
) -> Result<(Option<Option<u64>>, Option<bool>), ClientError> {
    match kind {
        OpKind::Read => {
            let v = client.kv_get(key).await?;
            let v = decode(v).map_err(ClientError::Protocol)?;
            Ok((Some(v), None))
        }
        OpKind::Write { value } | OpKind::Append { value } => {
            client.kv_put(key, value.to_string().as_bytes()).await?;
            Ok((None, None))
        }
        OpKind::Cas { expected, new } => {
            let exp = expected.map(|e| e.to_string());
            let (matched, _) =
                client.kv_cas(key, exp.as_deref().map(str::as_bytes), Some(new.to_string().as_bytes())).await?;
            Ok((None, Some(matched)))
        }
        OpKind::BlockWrite { .. }
        | OpKind::BlockRead { .. }
        | OpKind::Migrate { .. }
        | OpKind::OpsWrite { .. }
        | OpKind::VolumeOp { .. }
        | OpKind::AppPut { .. }
        | OpKind::SharePut { .. } => Err(ClientError::Protocol(
            "block writes, migrations, volume operations, application and share puts belong to their own workloads"
                .into(),
        )),
    }
}
