//! Latency recording with hdrhistogram: nanosecond resolution, three significant digits, values
//! clamped to one minute (a benchmark operation slower than that is reported as one minute).

use std::time::Duration;

use hdrhistogram::Histogram;

const MAX_NS: u64 = 60_000_000_000;

/// A latency histogram. Merge per-task histograms with [`Latency::merge`].
#[derive(Clone)]
pub struct Latency {
    hist: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        // Bounds are constants that hdrhistogram accepts (low >= 1, high >= 2 * low, sigfig <= 5).
        let hist = Histogram::new_with_bounds(1, MAX_NS, 3).expect("constant histogram bounds are valid");
        Self { hist }
    }

    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(MAX_NS).clamp(1, MAX_NS);
        self.hist.saturating_record(ns);
    }

    pub fn merge(&mut self, other: &Latency) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.hist.add(&other.hist);
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    pub fn summary(&self) -> LatencySummary {
        let ms = |ns: u64| ns as f64 / 1e6;
        if self.hist.is_empty() {
            return LatencySummary {
                count: 0,
                p50_ms: f64::NAN,
                p99_ms: f64::NAN,
                max_ms: f64::NAN,
                mean_ms: f64::NAN,
            };
        }
        LatencySummary {
            count: self.hist.len(),
            p50_ms: ms(self.hist.value_at_quantile(0.50)),
            p99_ms: ms(self.hist.value_at_quantile(0.99)),
            max_ms: ms(self.hist.max()),
            mean_ms: self.hist.mean() / 1e6,
        }
    }
}

/// Quantiles of a [`Latency`], in milliseconds (NaN when nothing was recorded).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl LatencySummary {
    pub fn p50_us(&self) -> f64 {
        self.p50_ms * 1e3
    }

    pub fn p99_us(&self) -> f64 {
        self.p99_ms * 1e3
    }
}

/// The `q` quantile (0..=1) of a small sample of durations, by nearest rank; NaN when empty.
/// Used where the sample is a handful of rounds, too few for a histogram to add anything.
pub fn quantile_ms(samples: &[Duration], q: f64) -> f64 {
    let ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    quantile(&ms, q)
}

/// The largest of `values`; NaN when empty.
pub fn max_of(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NAN, f64::max)
}

/// The `q` quantile (0..=1) of `values` by nearest rank; NaN when empty.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = (q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_sensible() {
        let mut l = Latency::new();
        for i in 1..=100u64 {
            l.record(Duration::from_micros(i * 10));
        }
        let s = l.summary();
        assert_eq!(s.count, 100);
        assert!((s.p50_ms - 0.5).abs() < 0.01, "{s:?}");
        assert!((s.p99_ms - 0.99).abs() < 0.01, "{s:?}");
        assert!(Latency::new().summary().p50_ms.is_nan());
    }

    #[test]
    fn nearest_rank() {
        let d: Vec<Duration> = (1..=20).map(Duration::from_millis).collect();
        assert_eq!(quantile_ms(&d, 0.5), 10.0);
        assert_eq!(quantile_ms(&d, 0.99), 20.0);
        assert_eq!(quantile_ms(&d, 1.0), 20.0);
        assert!(quantile_ms(&[], 0.5).is_nan());
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 10.0);
        assert_eq!(quantile(&v, 0.99), 20.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
