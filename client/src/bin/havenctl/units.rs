//! The quantities havenctl reads and prints: a whole number followed by a unit (`64MiB`, `90s`),
//! and durations in words. Each parser keeps its own units, bounds and messages; this module owns
//! only the split they share and the printing of durations. No I/O.

/// Split `s` (trimmed) into its leading whole number and the rest, as written; `None` when it
/// does not start with a number that fits in a u64.
pub fn number_and_unit(s: &str) -> Option<(u64, &str)> {
    let t = s.trim();
    let end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(end);
    Some((num.parse().ok()?, unit))
}

/// A duration for people: `850 ms`, `2.5 s`, `42 s`, `3 min`.
pub fn duration_text(ms: u64) -> String {
    if ms >= 120_000 {
        format!("{} min", ms / 60_000)
    } else if ms >= 10_000 {
        format!("{} s", ms / 1000)
    } else if ms >= 1000 {
        format!("{:.1} s", ms as f64 / 1e3)
    } else {
        format!("{ms} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_units_split() {
        assert_eq!(number_and_unit(" 64MiB "), Some((64, "MiB")));
        assert_eq!(number_and_unit("90 s"), Some((90, " s")));
        assert_eq!(number_and_unit("5000"), Some((5000, "")));
        assert_eq!(number_and_unit("MiB"), None);
        assert_eq!(number_and_unit("99999999999999999999s"), None);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(duration_text(850), "850 ms");
        assert_eq!(duration_text(2500), "2.5 s");
        assert_eq!(duration_text(42_000), "42 s");
        assert_eq!(duration_text(180_000), "3 min");
    }
}
