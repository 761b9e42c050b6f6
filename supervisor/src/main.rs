//! `kilnd`: the on-device supervisor. Thin: parse arguments, set up logging, call the engine.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use kiln_spec::validate::{Context, load_file};
use kiln_supervisor::engine::{Engine, read_memory};
use kiln_supervisor::log;

const DEFAULT_SPEC: &str = "/etc/kiln/spec.yaml";

#[derive(Parser, Debug)]
#[command(name = "kilnd", version, about = "kiln's on-device supervisor")]
struct Cli {
    /// The device's normalized spec, as kiln installed it.
    #[arg(long, global = true, default_value = DEFAULT_SPEC)]
    spec: PathBuf,
    /// Re-root every path kilnd writes (store, hot tier, state) under DIR, to run unprivileged anywhere.
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check the spec and summarize it.
    Check,
    /// Bring models into the hot tier now (default: the spec's prewarm list, pins first);
    /// existing hot copies are verified and re-copied when corrupt.
    Prewarm {
        #[arg(long, required = true)]
        now: bool,
        models: Vec<String>,
    },
    /// Where each model is (store, hot tier), memory pressure and the next prewarm window.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Serve the OpenAI-compatible API with one llama.cpp worker per loaded model; watch
    /// memory pressure, prewarm in the spec's windows, report to systemd and journald.
    Run {
        /// Listen here instead of the spec's supervisor.listen.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// One model's inference worker (kilnd starts these itself).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        gguf: PathBuf,
        #[arg(long)]
        sha256: String,
        #[arg(long)]
        threads: u32,
        #[arg(long)]
        context: u32,
        #[arg(long)]
        batch: u32,
        #[arg(long)]
        prefix_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("kilnd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(cli: &Cli) -> Result<kiln_spec::validate::Loaded> {
    load_file(&cli.spec, Context::Device).map_err(|d| anyhow::anyhow!("{d}"))
}

fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Check => {
            let loaded = load(&cli)?;
            let s = &loaded.spec;
            println!(
                "{}: ok: {} on {}, {} model(s), listening on {}",
                cli.spec.display(),
                s.name,
                loaded.raw.hardware.ram.0,
                s.models.len(),
                s.supervisor.listen
            );
            for m in &s.models {
                let pin = if m.pin { ", pinned" } else { "" };
                let mib = kiln_spec::units::mib(m.size_bytes);
                println!(
                    "  {} {} ({mib} MiB, context {}, {} threads{pin})",
                    m.id,
                    m.store_path(),
                    m.context,
                    m.threads
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Prewarm { models, .. } => {
            let loaded = load(&cli)?;
            log::init(loaded.spec.supervisor.log_level.as_str());
            let engine = Engine::open(loaded.spec, cli.state_dir.as_deref())?;
            let ids = if models.is_empty() { engine.spec.cache.prewarm.models.clone() } else { models.clone() };
            for id in &ids {
                engine.model(id)?;
            }
            let done = engine.prewarm(&ids, None)?;
            println!("prewarmed: {}", done.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => {
            let loaded = load(&cli)?;
            let engine = Engine::open(loaded.spec, cli.state_dir.as_deref())?;
            let status = engine.status(read_memory().ok());
            if *json {
                println!("{}", serde_json::to_string_pretty(&status).context("serializing the status")?);
            } else {
                println!(
                    "{}: pressure {}, hot tier {} of {} MiB",
                    status.name,
                    status.pressure,
                    status.hot_used_bytes >> 20,
                    status.hot_budget_bytes >> 20
                );
                for m in &status.models {
                    let tier = if m.hot {
                        "hot"
                    } else if m.stored {
                        "stored"
                    } else {
                        "missing"
                    };
                    println!(
                        "  {:<24} {:<8} {:>6} MiB {}{}",
                        m.id,
                        tier,
                        m.bytes >> 20,
                        &m.sha256[..12],
                        if m.pinned { " pinned" } else { "" }
                    );
                }
                let window = if status.prewarm_window_open { "open" } else { "closed" };
                println!(
                    "prewarm window {window}; next change {}",
                    status.prewarm_next_change.as_deref().unwrap_or("never")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { listen } => kiln_supervisor::serve::run(&kiln_supervisor::serve::RunArgs {
            spec: cli.spec.clone(),
            state_dir: cli.state_dir.clone(),
            listen: *listen,
        }),
        Command::Worker { gguf, sha256, threads, context, batch, prefix_dir } => {
            kiln_supervisor::worker::child::run(&kiln_supervisor::worker::child::WorkerArgs {
                gguf: gguf.clone(),
                sha256: sha256.clone(),
                threads: *threads,
                context: *context,
                batch: *batch,
                prefix_dir: prefix_dir.clone(),
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
