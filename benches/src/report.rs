//! A benchmark report: parameters, one or more tables whose measured rows sit beside their
//! baselines, and target checks. Rendered as a plain-text table or, with `--json`, as one JSON
//! object holding the same figures.

use serde_json::{json, Map, Value};

/// One table cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Text(String),
    /// A number printed with `decimals` digits after the point (JSON keeps full precision).
    Num {
        value: f64,
        decimals: usize,
    },
    /// Nothing to show (JSON `null`).
    Empty,
}

impl Cell {
    pub fn text(s: impl Into<String>) -> Self {
        Self::Text(s.into())
    }

    pub fn num(value: f64, decimals: usize) -> Self {
        Self::Num { value, decimals }
    }

    pub fn int(value: u64) -> Self {
        Self::Num { value: value as f64, decimals: 0 }
    }

    /// A ratio, with more decimals the smaller it is so small ratios do not print as 0.00.
    pub fn ratio(value: f64) -> Self {
        let decimals = if value.abs() >= 10.0 {
            1
        } else if value.abs() >= 0.1 || value == 0.0 {
            2
        } else if value.abs() >= 0.001 {
            4
        } else {
            6
        };
        Self::Num { value, decimals }
    }

    /// A number, or empty when there is none.
    pub fn opt(value: Option<f64>, decimals: usize) -> Self {
        value.map_or(Self::Empty, |v| Self::num(v, decimals))
    }

    fn render(&self) -> String {
        match self {
            Self::Text(s) => s.clone(),
            Self::Num { value, .. } if !value.is_finite() => "-".into(),
            Self::Num { value, decimals } => group_thousands(&format!("{value:.decimals$}")),
            Self::Empty => "-".into(),
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Self::Text(s) => Value::String(s.clone()),
            Self::Num { value, decimals: 0 } if value.is_finite() && value.fract() == 0.0 && value.abs() < 9e15 => {
                json!(*value as i64)
            }
            Self::Num { value, .. } => serde_json::Number::from_f64(*value).map_or(Value::Null, Value::Number),
            Self::Empty => Value::Null,
        }
    }

    fn is_text(&self) -> bool {
        matches!(self, Self::Text(_))
    }
}

/// `1234567.8` -> `1,234,567.8`, leaving short numbers alone.
fn group_thousands(s: &str) -> String {
    let (sign, rest) = s.strip_prefix('-').map_or(("", s), |r| ("-", r));
    let (int, frac) = rest.split_once('.').map_or((rest, None), |(i, f)| (i, Some(f)));
    if int.len() <= 4 || !int.bytes().all(|b| b.is_ascii_digit()) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + int.len() / 3);
    out.push_str(sign);
    for (i, ch) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    if let Some(f) = frac {
        out.push('.');
        out.push_str(f);
    }
    out
}

/// A table: named columns and rows of cells. Each row should have one cell per column.
#[derive(Debug, Clone)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
}

impl Table {
    pub fn new(title: impl Into<String>, columns: &[&str]) -> Self {
        Self { title: title.into(), columns: columns.iter().map(|c| c.to_string()).collect(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<Cell>) {
        self.rows.push(cells);
    }

    fn render(&self, out: &mut String) {
        let ncols = self.columns.len();
        let rendered: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| (0..ncols).map(|i| r.get(i).map_or(String::new(), Cell::render)).collect())
            .collect();
        let mut widths: Vec<usize> = self.columns.iter().map(|c| c.chars().count()).collect();
        for row in &rendered {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        // A column is left-aligned when it holds text in any row.
        let left: Vec<bool> =
            (0..ncols).map(|i| i == 0 || self.rows.iter().any(|r| r.get(i).is_some_and(Cell::is_text))).collect();
        let line = |cells: &[String], out: &mut String| {
            let mut s = String::new();
            for (i, cell) in cells.iter().enumerate() {
                if i > 0 {
                    s.push_str("  ");
                }
                let pad = widths[i].saturating_sub(cell.chars().count());
                if left[i] {
                    s.push_str(cell);
                    s.push_str(&" ".repeat(pad));
                } else {
                    s.push_str(&" ".repeat(pad));
                    s.push_str(cell);
                }
            }
            out.push_str(s.trim_end());
            out.push('\n');
        };
        out.push_str(&self.title);
        out.push('\n');
        line(&self.columns, out);
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        line(&rule, out);
        for row in &rendered {
            line(row, out);
        }
    }

    fn to_json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                let mut obj = Map::new();
                for (i, col) in self.columns.iter().enumerate() {
                    obj.insert(col.clone(), r.get(i).map_or(Value::Null, Cell::to_json));
                }
                Value::Object(obj)
            })
            .collect();
        json!({ "title": self.title, "columns": self.columns, "rows": rows })
    }
}

/// A target from the design, checked against a measured figure.
#[derive(Debug, Clone)]
pub struct TargetCheck {
    /// What is measured, e.g. "commit p50, 3 nodes, 1 client".
    pub what: String,
    /// The target, e.g. "<= 2 ms".
    pub target: String,
    /// The measured figure, formatted with its unit.
    pub measured: String,
    pub met: bool,
}

impl TargetCheck {
    /// A check that `value` is at most `limit`.
    pub fn at_most(what: impl Into<String>, value: f64, limit: f64, unit: &str, decimals: usize) -> Self {
        Self {
            what: what.into(),
            target: format!("<= {} {unit}", Cell::num(limit, decimals).render()),
            measured: format!("{} {unit}", Cell::num(value, decimals).render()),
            met: value.is_finite() && value <= limit,
        }
    }

    /// A check that `value` is strictly below `limit`.
    pub fn below(what: impl Into<String>, value: f64, limit: f64, unit: &str, decimals: usize) -> Self {
        Self {
            what: what.into(),
            target: format!("< {} {unit}", Cell::num(limit, decimals).render()),
            measured: format!("{} {unit}", Cell::num(value, decimals).render()),
            met: value.is_finite() && value < limit,
        }
    }

    /// A check that `value` is at least `limit`.
    pub fn at_least(what: impl Into<String>, value: f64, limit: f64, unit: &str, decimals: usize) -> Self {
        Self {
            what: what.into(),
            target: format!(">= {} {unit}", Cell::num(limit, decimals).render()),
            measured: format!("{} {unit}", Cell::num(value, decimals).render()),
            met: value.is_finite() && value >= limit,
        }
    }
}

/// Everything one benchmark run reports.
#[derive(Debug, Clone)]
pub struct Report {
    pub bench: String,
    /// One line on what is measured and against what.
    pub summary: String,
    /// The knobs in effect (name, value), echoed so a result can be reproduced.
    pub params: Vec<(String, Value)>,
    pub tables: Vec<Table>,
    pub targets: Vec<TargetCheck>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(bench: &str, summary: impl Into<String>) -> Self {
        Self {
            bench: bench.into(),
            summary: summary.into(),
            params: Vec::new(),
            tables: Vec::new(),
            targets: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn param(&mut self, name: &str, value: impl Into<Value>) {
        self.params.push((name.into(), value.into()));
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// Whether every target was met.
    pub fn all_targets_met(&self) -> bool {
        self.targets.iter().all(|t| t.met)
    }

    /// The plain-text rendering.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("== {} ==\n{}\n", self.bench, self.summary));
        out.push_str(&format!("build: {}; cpus: {}\n", crate::build_profile(), crate::cpus()));
        if !self.params.is_empty() {
            let params: Vec<String> = self
                .params
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => format!("{k}={s}"),
                    other => format!("{k}={other}"),
                })
                .collect();
            out.push_str(&format!("params: {}\n", params.join(" ")));
        }
        for table in &self.tables {
            out.push('\n');
            table.render(&mut out);
        }
        if !self.targets.is_empty() {
            out.push('\n');
            let mut t = Table::new("Targets", &["status", "what", "target", "measured"]);
            for check in &self.targets {
                t.row(vec![
                    Cell::text(if check.met { "MET" } else { "MISSED" }),
                    Cell::text(&check.what),
                    Cell::text(&check.target),
                    Cell::text(&check.measured),
                ]);
            }
            t.render(&mut out);
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for n in &self.notes {
                out.push_str(&format!("note: {n}\n"));
            }
        }
        out
    }

    /// The JSON rendering: the same figures as the text, machine-readable.
    pub fn to_json(&self) -> Value {
        let params: Map<String, Value> = self.params.iter().cloned().collect();
        let targets: Vec<Value> = self
            .targets
            .iter()
            .map(|t| json!({ "what": t.what, "target": t.target, "measured": t.measured, "met": t.met }))
            .collect();
        json!({
            "bench": self.bench,
            "summary": self.summary,
            "build": crate::build_profile(),
            "cpus": crate::cpus(),
            "params": params,
            "tables": self.tables.iter().map(Table::to_json).collect::<Vec<_>>(),
            "targets": targets,
            "all_targets_met": self.all_targets_met(),
            "notes": self.notes,
        })
    }

    /// Print as text or JSON on stdout. Returns the process exit code: 0, or 3 when `enforce` is
    /// set and a target was missed.
    pub fn print(&self, as_json: bool, enforce: bool) -> i32 {
        if as_json {
            match serde_json::to_string_pretty(&self.to_json()) {
                Ok(s) => println!("{s}"),
                Err(e) => {
                    eprintln!("cannot render the report as JSON: {e}");
                    return 1;
                }
            }
        } else {
            print!("{}", self.to_text());
        }
        if enforce && !self.all_targets_met() {
            eprintln!("{}: at least one target was missed", self.bench);
            return 3;
        }
        0
    }
}

/// A ratio `a / b`, or NaN when `b` is zero.
/// End a benchmark binary: exit with `run`'s status, or print its error as `bench: ...` and exit 1.
pub fn exit_with(bench: &str, run: anyhow::Result<i32>) -> ! {
    let code = run.unwrap_or_else(|e| {
        eprintln!("{bench}: {e:#}");
        1
    });
    std::process::exit(code)
}

pub fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        f64::NAN
    } else {
        a / b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(group_thousands("1234567.89"), "1,234,567.89");
        assert_eq!(group_thousands("1234"), "1234");
        assert_eq!(group_thousands("12345"), "12,345");
        assert_eq!(group_thousands("-123456"), "-123,456");
        assert_eq!(group_thousands("abcdef"), "abcdef");
    }

    #[test]
    fn text_and_json_hold_the_same_figures() {
        let mut r = Report::new("demo", "a demo");
        let mut t = Table::new("T", &["name", "value"]);
        t.row(vec![Cell::text("a"), Cell::num(1.5, 2)]);
        t.row(vec![Cell::text("b"), Cell::Empty]);
        r.tables.push(t);
        r.targets.push(TargetCheck::at_most("x", 1.5, 2.0, "ms", 1));
        let text = r.to_text();
        assert!(text.contains("1.50"));
        assert!(text.contains("MET"));
        let j = r.to_json();
        assert_eq!(j["tables"][0]["rows"][0]["value"], json!(1.5));
        assert_eq!(j["tables"][0]["rows"][1]["value"], Value::Null);
        assert_eq!(j["all_targets_met"], json!(true));
    }
}

/// Flags every benchmark binary takes (`#[command(flatten)]`).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct RunFlags {
    /// Short run for CI (well under a minute).
    #[arg(long)]
    pub quick: bool,
    /// Print the figures as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Exit with status 3 when a target is missed.
    #[arg(long)]
    pub enforce_targets: bool,
}
