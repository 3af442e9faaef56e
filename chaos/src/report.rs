//! The run report: `report.json` (everything), `summary.txt` (what a person reads first),
//! `history.jsonl` (one operation per line) and `timeline.svg` (faults, leader changes and
//! operation latency over time, drawn with plotters).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use crate::history::Outcome;
use crate::run::RunReport;

pub fn write(report: &RunReport, dir: &Path) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(dir.join("report.json"), json).context("writing report.json")?;
    std::fs::write(dir.join("summary.txt"), summary(report)).context("writing summary.txt")?;
    let mut h =
        std::io::BufWriter::new(std::fs::File::create(dir.join("history.jsonl")).context("creating history.jsonl")?);
    for op in &report.history {
        serde_json::to_writer(&mut h, op)?;
        h.write_all(b"\n")?;
    }
    h.flush()?;
    timeline(report, &dir.join("timeline.svg")).context("drawing timeline.svg")?;
    Ok(())
}

/// The human summary.
pub fn summary(r: &RunReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "chaos run {:?} (seed {}): {} in {:.1} s",
        r.scenario.name,
        r.seed,
        if r.passed { "PASSED" } else { "FAILED" },
        r.wall_seconds
    );
    let injected = r.faults.iter().filter(|f| f.skipped.is_none()).count();
    let _ = writeln!(s, "faults: {injected} injected, {} skipped", r.faults.len() - injected);
    for f in &r.faults {
        let node = f.node.map(|n| format!("node-{n}")).unwrap_or_else(|| "-".into());
        let node = match f.peer {
            Some(p) => format!("{node}<->node-{p}"),
            None => node,
        };
        let _ = writeln!(
            s,
            "  {:>7} ms  {:<9} {:<14} {:<7}{}{}{}{}",
            f.at_ms,
            f.kind.to_string(),
            f.target,
            node,
            if f.hit_volume_primary { "  (volume primary)" } else { "" },
            if f.hit_ha_primary.is_empty() {
                String::new()
            } else {
                let vms: Vec<String> = f.hit_ha_primary.iter().map(|v| format!("vm-{v}")).collect();
                format!("  (HA primary of {})", vms.join(", "))
            },
            f.failover_ms.map(|m| format!("  failover {m} ms")).unwrap_or_default(),
            f.skipped.as_ref().map(|r| format!("  skipped: {r}")).unwrap_or_default()
        );
    }
    let o = &r.operations;
    let _ = writeln!(s, "operations: {} ok, {} failed, {} indeterminate", o.ok, o.failed, o.indeterminate);
    if let Some(b) = &r.block_writes {
        let _ =
            writeln!(s, "block writes: {} acknowledged, {} failed, {} indeterminate", b.ok, b.failed, b.indeterminate);
    }
    if let Some(b) = &r.blocks {
        let v = b.final_volume.as_ref().unwrap_or(&b.volume);
        let _ = writeln!(
            s,
            "volume {} {:?}: replicas {}, primary {} (was {}), in sync {}, epoch {}; {} events",
            v.id,
            v.name,
            list(&v.replicas),
            v.primary,
            b.volume.primary,
            list(&v.in_sync),
            v.epoch,
            b.events.len()
        );
    }
    if let Some(o) = &r.operations_workload {
        operations_summary(&mut s, o);
    }
    if let Some(m) = &r.migrations {
        let _ = writeln!(
            s,
            "migrations: {} done, {} ended without moving the VM, {} unknown",
            m.ok, m.failed, m.indeterminate
        );
    }
    if let Some(v) = &r.vms {
        let placed: Vec<String> = v.final_vms.iter().map(|r| format!("{} on {}", r.id, r.host)).collect();
        let _ = writeln!(s, "vms after healing: {}; {} sightings during the run", placed.join(", "), v.sightings);
    }
    if let Some(p) = &r.app_puts {
        let _ = writeln!(
            s,
            "application puts: {} acknowledged, {} failed, {} indeterminate",
            p.ok, p.failed, p.indeterminate
        );
    }
    if let Some(h) = &r.ha {
        ha_summary(&mut s, h);
    }
    if let Some(p) = &r.share_puts {
        let _ =
            writeln!(s, "share puts: {} acknowledged, {} failed, {} indeterminate", p.ok, p.failed, p.indeterminate);
    }
    if let Some(sh) = &r.shares {
        let f = sh.final_share.as_ref().unwrap_or(&sh.share);
        let _ = writeln!(
            s,
            "share {} {:?}: members {}, hub {} (was {}), generation {}; copies identical {}",
            f.id,
            f.name,
            list(&f.members),
            f.hub,
            sh.share.hub,
            f.generation,
            sh.converged_ms.map_or("never".to_string(), |m| format!("{m} ms after the final reads began"))
        );
    }
    let fo = &r.failover_ms;
    if fo.samples > 0 {
        let _ = writeln!(
            s,
            "failover: p50 {} ms, p99 {} ms, max {} ms over {} leader faults",
            fo.p50, fo.p99, fo.max, fo.samples
        );
    }
    if let Some(h) = r.heal_ms {
        let _ = writeln!(s, "healthy again {h} ms after healing");
    }
    let _ = writeln!(s, "checkers:");
    for c in &r.checkers {
        let _ = writeln!(s, "  [{}] {:<20} {}", if c.passed { "pass" } else { "FAIL" }, c.name, c.summary);
        if c.name == crate::checker::blocks::NAME {
            let violations = r.blocks.iter().flat_map(|b| b.check.iter()).flat_map(|c| c.violations.iter());
            for v in violations.take(20) {
                let range = |n: Option<u64>| n.map_or("-".to_string(), |n| n.to_string());
                let _ = writeln!(
                    s,
                    "         block {:<5} writer {} expected n {}..={}: {}",
                    v.block,
                    v.writer,
                    v.last_acked_n.map_or("0 (zeroes)".to_string(), |n| n.to_string()),
                    range(v.max_attempted_n),
                    v.found
                );
            }
        }
        if c.name == crate::checker::operations::DATA {
            let violations = r.operations_workload.iter().flat_map(|o| o.check.violations.iter());
            for v in violations.take(20) {
                let _ = writeln!(
                    s,
                    "         read #{:<5} {} block {}: allowed {}, found {}",
                    v.read, v.what, v.block, v.allowed, v.found
                );
            }
        }
        for op in &c.offending {
            let _ = writeln!(
                s,
                "         #{:<5} client {} {} {:?} invoked {} us, done {} us: {:?}",
                op.id, op.client, op.key, op.kind, op.invoke_us, op.complete_us, op.outcome
            );
        }
    }
    let _ = writeln!(s, "replay: {}", r.replay);
    s
}

fn operations_summary(s: &mut String, o: &crate::run::OperationsReport) {
    let w = &o.check.writes;
    let ops: Vec<String> =
        o.check.operations.iter().map(|(k, c)| format!("{k} {}/{}/{}", c.ok, c.failed, c.indeterminate)).collect();
    let _ = writeln!(
        s,
        "volume operations (ok/failed/unknown): {}; writes {}/{}/{}",
        ops.join(", "),
        w.ok,
        w.failed,
        w.indeterminate
    );
    let v = o.final_volume.as_ref().unwrap_or(&o.volume);
    let _ = writeln!(
        s,
        "operations volume {} {:?}: {} bytes, primary {} (was {}), epoch {}; {} events",
        v.id,
        v.name,
        v.size_bytes,
        v.primary,
        o.volume.primary,
        v.epoch,
        o.events.len()
    );
}

fn ha_summary(s: &mut String, h: &crate::run::HaReport) {
    for v in &h.vms {
        let pair = h.final_state.pairs.get(&v.id.0).and_then(|p| p.as_ref().ok());
        let line = match pair {
            Some(p) => format!(
                "primary {} (was {}), standby {} (was {}), {:?}, generation {}, {} failover(s){}",
                p.primary,
                v.pair.primary,
                p.standby.map_or("none".to_string(), |s| s.to_string()),
                v.pair.standby.map_or("none".to_string(), |s| s.to_string()),
                p.state,
                p.generation,
                p.failovers,
                p.last_failover
                    .as_ref()
                    .map(|f| format!("; last {} -> {} ({}), took {} ms", f.from, f.to, f.reason, f.took_ms))
                    .unwrap_or_default()
            ),
            None => "pair unreadable after healing".to_string(),
        };
        let _ = writeln!(s, "HA {} {:?} {:?}: {line}", v.id, v.name, v.mode);
    }
    let _ = writeln!(
        s,
        "HA sampler: {} sightings, {} pair records; longest run on two hosts at once {} ms; settled {}",
        h.observations.sightings.len(),
        h.observations.pairs.len(),
        h.longest_overlap_ms,
        h.final_state.settled_ms.map_or("never".to_string(), |m| format!("{m} ms after the final reads began"))
    );
}

fn list(ids: &[haven_client::proto::NodeId]) -> String {
    format!("[{}]", ids.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))
}

fn timeline(r: &RunReport, path: &Path) -> anyhow::Result<()> {
    let end_s = (r.scenario.duration.as_secs_f64() + 2.0).max(1.0);
    let max_lat = r.history.iter().map(|o| o.latency_ms()).fold(10.0f64, f64::max).min(10_000.0);
    let root = SVGBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(380);
    let mut lat = ChartBuilder::on(&top)
        .caption(format!("{} (seed {}): operation latency and faults", r.scenario.name, r.seed), ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..end_s, (0.1f64..max_lat * 1.2).log_scale())?;
    lat.configure_mesh().x_desc("seconds").y_desc("latency ms (log)").draw()?;
    for f in r.faults.iter().filter(|f| f.skipped.is_none()) {
        let x0 = f.at_ms as f64 / 1000.0;
        let x1 = f.healed_ms.map(|h| h as f64 / 1000.0).unwrap_or(end_s);
        let color = match f.kind {
            crate::scenario::FaultKind::Kill => RED.mix(0.12),
            crate::scenario::FaultKind::Pause => BLUE.mix(0.12),
            _ => MAGENTA.mix(0.12),
        };
        lat.draw_series(std::iter::once(Rectangle::new([(x0, 0.1), (x1, max_lat * 1.2)], color.filled())))?
            .label(format!("{} node-{}", f.kind, f.node.unwrap_or(0)));
    }
    let point = |o: &crate::history::Op, c: RGBColor| {
        Circle::new((o.complete_us as f64 / 1e6, o.latency_ms().max(0.11)), 2, c.filled())
    };
    lat.draw_series(r.history.iter().filter(|o| matches!(o.outcome, Outcome::Ok { .. })).map(|o| point(o, GREEN)))?;
    lat.draw_series(r.history.iter().filter(|o| matches!(o.outcome, Outcome::Fail)).map(|o| point(o, RED)))?;
    lat.draw_series(
        r.history.iter().filter(|o| matches!(o.outcome, Outcome::Info)).map(|o| point(o, RGBColor(230, 140, 0))),
    )?;

    let nodes = r.leader_timeline.iter().flat_map(|s| s.leaders.iter().map(|l| l.0)).max().unwrap_or(3).max(3);
    let mut lead = ChartBuilder::on(&bottom)
        .caption("leader (node id; 0 = none)", ("sans-serif", 14))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..end_s, 0f64..(nodes as f64 + 0.5))?;
    lead.configure_mesh().y_labels(nodes as usize + 1).draw()?;
    let mut steps = Vec::new();
    for s in &r.leader_timeline {
        let t = s.t_ms as f64 / 1000.0;
        let who = s.leaders.iter().max_by_key(|l| l.1).map(|l| l.0 as f64).unwrap_or(0.0);
        if let Some(&(_, prev)) = steps.last() {
            steps.push((t, prev));
        }
        steps.push((t, who));
    }
    if let Some(&(_, last)) = steps.last() {
        steps.push((end_s, last));
    }
    lead.draw_series(LineSeries::new(steps, BLACK.stroke_width(2)))?;
    root.present()?;
    Ok(())
}
