//! `haven-chaos`: run a chaos scenario (also reachable as `havenctl chaos run`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use haven_chaos::run::{run, RunOptions};
use haven_chaos::scenario::Scenario;

#[derive(Parser)]
#[command(name = "haven-chaos", version, about = "Run Haven chaos scenarios")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run SCENARIO (a TOML file); exit 1 when a checker fails.
    Run {
        scenario: PathBuf,
        /// Override the scenario's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Override the scenario's duration in seconds.
        #[arg(long)]
        duration: Option<f64>,
        /// Where the report goes (default: chaos-runs/NAME-SEED).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print the report as JSON instead of the summary.
        #[arg(long)]
        json: bool,
    },
    /// Check a scenario file and print its fault schedule without running it.
    Plan {
        scenario: PathBuf,
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "haven_chaos=info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
    let result = match cli.command {
        Command::Plan { scenario, seed, json } => plan(&scenario, seed, json),
        Command::Run { scenario, seed, duration, out, json } => {
            let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("haven-chaos: error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            rt.block_on(run_cmd(scenario, seed, duration, out, json))
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("haven-chaos: error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::from(2)
        }
    }
}

fn load(path: &std::path::Path, seed: Option<u64>) -> anyhow::Result<Scenario> {
    let mut s = Scenario::load(path)?;
    if let Some(seed) = seed {
        s.seed = seed;
    }
    Ok(s)
}

fn plan(path: &std::path::Path, seed: Option<u64>, json: bool) -> anyhow::Result<bool> {
    let s = load(path, seed)?;
    let schedule = s.schedule();
    if json {
        println!("{}", serde_json::to_string(&schedule)?);
    } else {
        println!("{} (seed {}), {:?}, {} faults:", s.name, s.seed, s.duration, schedule.len());
        for f in schedule {
            println!(
                "  {:>8.3} s  {:<9} {:<14} heal after {:?}",
                f.at.as_secs_f64(),
                f.kind.to_string(),
                f.target.to_string(),
                f.heal_after
            );
        }
    }
    Ok(true)
}

async fn run_cmd(
    path: PathBuf,
    seed: Option<u64>,
    duration: Option<f64>,
    out: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<bool> {
    let mut s = load(&path, seed)?;
    if let Some(d) = duration {
        anyhow::ensure!(d > 0.0 && d.is_finite(), "--duration must be a positive number of seconds");
        s.duration = std::time::Duration::from_secs_f64(d);
        let before = s.faults.len();
        s.faults.retain(|f| f.at < s.duration);
        if s.faults.len() < before {
            eprintln!("haven-chaos: --duration drops {} fault(s) scheduled after the new end", before - s.faults.len());
        }
    }
    let out = out.unwrap_or_else(|| PathBuf::from("chaos-runs").join(format!("{}-{}", s.name, s.seed)));
    anyhow::ensure!(!out.join("cluster").exists(), "{} already holds a run; choose another --out", out.display());
    let report = run(s, &RunOptions { scenario_path: path, out_dir: out.clone() }).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", haven_chaos::report::summary(&report));
        println!("report: {}/report.json, timeline: {}/timeline.svg", out.display(), out.display());
    }
    Ok(report.passed)
}
