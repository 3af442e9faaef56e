//! Whole-system and micro benchmarks for Haven; each prints a table with a baseline measured in
//! the same run. See the binaries in `src/bin/` and `README.md` beside `Cargo.toml`.
//!
//! This library holds what the binaries share: the report (a plain-text table or the same figures
//! as JSON, plus target checks), latency histograms, and starting a local cluster of real
//! `haven-node` processes for the whole-system benchmarks. It measures nothing by itself.

pub mod cluster;
pub mod fio;
pub mod latency;
pub mod report;
pub mod volume;

pub use latency::{Latency, LatencySummary};
pub use report::{Cell, Report, Table, TargetCheck};

/// A short description of the build the benchmark runs in, printed with every report so numbers
/// from different profiles are not compared by mistake.
pub fn build_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "dev profile (debug assertions on; opt-level 1 for Haven crates, 2 for dependencies)"
    } else {
        "optimised profile (debug assertions off)"
    }
}

/// Number of CPUs this process may use.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
