//! What every seeded model test (`volume::model`, `controllers::plan_model`, `share::model`,
//! `ha::model`) shares: which seeds to run and how numbers come from the environment.
//! `HAVEN_MODEL_SEED=S` replays one seed, `HAVEN_MODEL_SEEDS=N` hunts seeds `0..N`, and without
//! either a test runs its default count (what CI runs). Tests only.

/// A number from the environment variable `name`, if it is set and parses.
pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The seeds to run: the one `HAVEN_MODEL_SEED` names, else `0..HAVEN_MODEL_SEEDS`, else
/// `0..default`.
pub fn seeds(default: u64) -> Vec<u64> {
    match env_u64("HAVEN_MODEL_SEED") {
        Some(s) => vec![s],
        None => (0..env_u64("HAVEN_MODEL_SEEDS").unwrap_or(default)).collect(),
    }
}

/// Run `run` on every seed of [`seeds`]`(default)`, print one summary line (`name`, the seeds
/// per minute, the failed seeds, the totals `fold` adds up), and fail with the first three
/// failures (each names its seed and how to replay it).
pub fn run_seeds<S: Default + std::fmt::Debug>(
    name: &str,
    default: u64,
    run: impl Fn(u64) -> Result<S, String>,
    fold: impl Fn(&mut S, &S),
) {
    let seeds = seeds(default);
    let started = std::time::Instant::now();
    let mut total = S::default();
    let (mut failures, mut failed) = (Vec::new(), Vec::new());
    for seed in &seeds {
        match run(*seed) {
            Ok(s) => fold(&mut total, &s),
            Err(e) => {
                failed.push(*seed);
                if failures.len() < 3 {
                    failures.push(e);
                }
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{name} model: {} seeds in {secs:.1} s ({:.0} seeds/min), {} failed {:?}; {total:?}",
        seeds.len(),
        seeds.len() as f64 * 60.0 / secs,
        failed.len(),
        &failed[..failed.len().min(20)]
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
