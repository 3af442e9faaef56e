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
