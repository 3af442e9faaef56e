//! How havenctl prints: human text and tables (comfy-table) by default, JSON with `--json`.
//! Errors always go to stderr as one line (JSON object with `--json`).

use comfy_table::Table;
use serde_json::{json, Value};

pub struct Output {
    json: bool,
}

impl Output {
    pub fn new(json: bool) -> Self {
        Self { json }
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    /// A finished action: a sentence for humans, an object for machines.
    pub fn done(&self, human: &str, machine: Value) {
        if self.json {
            println!("{machine}");
        } else {
            println!("{human}");
        }
    }

    /// A bare value (e.g. `kv get`).
    pub fn value(&self, human: &str, machine: Value) {
        self.done(human, machine)
    }

    /// A line printed before a table in human mode only.
    pub fn headline(&self, line: &str) {
        if !self.json {
            println!("{line}");
        }
    }

    pub fn table(&self, header: &[&str], rows: Vec<Vec<String>>, machine: Value) {
        if self.json {
            println!("{machine}");
            return;
        }
        let mut t = Table::new();
        t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
        t.set_header(header.to_vec());
        for r in rows {
            t.add_row(r);
        }
        println!("{t}");
    }

    pub fn error(&self, e: &anyhow::Error) {
        let msg = format!("{e:#}").replace('\n', " ");
        if self.json {
            eprintln!("{}", json!({"error": msg}));
        } else {
            eprintln!("havenctl: error: {msg}");
        }
    }
}
