//! `kilnd`: the on-device supervisor. Thin: parse arguments, set up logging, call the engine.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use kiln_spec::validate::{Context, load_file};
use kiln_supervisor::engine::{Engine, read_memory};
use kiln_supervisor::generations::Generations;
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
    /// With kilnd running, also its workers and caches (from its /status) and its last
    /// journal events.
    Status {
        #[arg(long)]
        json: bool,
        /// kilnd's address (default: the spec's supervisor.listen).
        #[arg(long)]
        url: Option<String>,
    },
    /// Serve the OpenAI-compatible API with one llama.cpp worker per loaded model; watch
    /// memory pressure, prewarm in the spec's windows, report to systemd and journald.
    Run {
        /// Listen here instead of the spec's supervisor.listen.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// The device's generations (every applied spec), the active one marked; with --json also
    /// the active manifest and the store's model hashes (what `kiln deploy` compares against).
    Generations {
        #[arg(long)]
        json: bool,
    },
    /// Receive a generation as a tar stream on stdin (from `kiln deploy`); prints its number.
    #[command(hide = true)]
    Receive,
    /// Receive a model's bytes on stdin into the store, verified against SHA256 (from `kiln deploy`).
    #[command(hide = true)]
    ReceiveModel {
        sha256: String,
        #[arg(long, default_value = "model")]
        id: String,
    },
    /// Install generation N into the running system (as root): only what differs, then what
    /// the diff needs; roll back when kilnd does not become healthy.
    Activate {
        number: u32,
        /// Install under DIR instead of / and only print the commands (for tests).
        #[arg(long)]
        root: Option<PathBuf>,
        /// Overrides the spec's supervisor.deploy.health-timeout, in seconds.
        #[arg(long)]
        health_timeout: Option<u64>,
    },
    /// Switch back to an earlier generation (default: the newest good one before the current).
    Rollback {
        #[arg(long)]
        to: Option<u32>,
        #[arg(long)]
        root: Option<PathBuf>,
        #[arg(long)]
        health_timeout: Option<u64>,
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
        #[arg(long, default_value_t = 1)]
        parallel: u32,
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

/// kilnd's state directory (`/var/lib/kiln`, re-rooted by --state-dir).
fn state_dir(cli: &Cli) -> PathBuf {
    match &cli.state_dir {
        Some(root) => root.join("var/lib/kiln"),
        None => PathBuf::from("/var/lib/kiln"),
    }
}

fn activate(cli: &Cli, number: u32, root: Option<&PathBuf>, timeout: Option<u64>) -> Result<ExitCode> {
    use kiln_supervisor::activate::{Options, Outcome};
    let opts = Options {
        root: root.cloned().unwrap_or_else(|| PathBuf::from("/")),
        live: root.is_none(),
        health_timeout: timeout.map(std::time::Duration::from_secs),
        state: state_dir(cli),
    };
    let _log = log::init("info");
    let gens = Generations::at(&opts.state);
    let mut say = |line: &str| {
        tracing::info!("{line}");
        println!("{line}");
    };
    match kiln_supervisor::activate::activate(&gens, number, &opts, &mut say)? {
        Outcome::Activated { .. } | Outcome::Unchanged { .. } => Ok(ExitCode::SUCCESS),
        Outcome::RolledBack { number, to, reason } => {
            let back = to.map_or("nothing (there was no earlier generation)".into(), |n| format!("generation {n}"));
            eprintln!("kilnd: generation {number} was rolled back to {back}: {reason}");
            Ok(ExitCode::from(2))
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Generations { json } => {
            let gens = Generations::at(&state_dir(&cli));
            let list = gens.list()?;
            if *json {
                let current = gens.current()?;
                let manifest = match current {
                    Some(n) => Some(gens.manifest(n)?),
                    None => None,
                };
                let store = kiln_supervisor::store::Store::open(&state_dir(&cli).join("models"))?;
                let models: Vec<String> = std::fs::read_dir(store.root())
                    .map(|d| {
                        d.flatten()
                            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".gguf").map(str::to_owned))
                            .filter(|s| store.contains(s))
                            .collect()
                    })
                    .unwrap_or_default();
                let v = serde_json::json!({ "current": current, "generations": list, "manifest": manifest, "store": models });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if list.is_empty() {
                println!("no generations in {}", gens.dir().display());
            } else {
                for g in &list {
                    let when = g
                        .meta
                        .activated_at
                        .or(Some(g.meta.received_at))
                        .and_then(|t| jiff::Timestamp::from_second(t).ok());
                    let state = format!("{:?}", g.meta.state).to_lowercase();
                    println!(
                        "{} {:>4}  {}  {:<8}  {}{}",
                        if g.current { "*" } else { " " },
                        g.number,
                        &g.id[..12.min(g.id.len())],
                        state,
                        when.map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_default(),
                        g.meta
                            .failure
                            .as_ref()
                            .map(|f| format!("  ({})", f.lines().next().unwrap_or("")))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Receive => {
            let gens = Generations::at(&state_dir(&cli));
            let n = gens.receive(std::io::stdin().lock())?;
            println!("{n}");
            Ok(ExitCode::SUCCESS)
        }
        Command::ReceiveModel { sha256, id } => {
            let store = kiln_supervisor::store::Store::open(&state_dir(&cli).join("models"))?;
            let path = store.import(id, std::path::Path::new("/dev/stdin"), sha256, &|_, _| {})?;
            println!("{}", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Activate { number, root, health_timeout } => activate(&cli, *number, root.as_ref(), *health_timeout),
        Command::Rollback { to, root, health_timeout } => {
            let gens = Generations::at(&state_dir(&cli));
            let target = match to {
                Some(n) => *n,
                None => kiln_supervisor::activate::previous_good(&gens)?,
            };
            activate(&cli, target, root.as_ref(), *health_timeout)
        }
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
        Command::Status { json, url } => {
            let loaded = load(&cli)?;
            let live = live_status(&loaded.spec, url.as_deref());
            let engine = Engine::open(loaded.spec, cli.state_dir.as_deref())?;
            let status = engine.status(read_memory().ok());
            if *json {
                let v = match &live {
                    Some(v) => v.clone(),
                    None => serde_json::to_value(&status).context("serializing the status")?,
                };
                println!("{}", serde_json::to_string_pretty(&v).context("serializing the status")?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{}: pressure {}, hot tier {} of {} MiB; kilnd {}",
                status.name,
                status.pressure,
                status.hot_used_bytes >> 20,
                status.hot_budget_bytes >> 20,
                if live.is_some() { "serving" } else { "not answering" }
            );
            for m in &status.models {
                let worker = live.as_ref().and_then(|v| {
                    v["models"].as_array()?.iter().find(|x| x["id"] == m.id.as_str()).map(|x| x["worker"].clone())
                });
                let tier = match &worker {
                    Some(w) if w["state"] == "loaded" => "loaded",
                    _ if m.hot => "hot",
                    _ if m.stored => "stored",
                    _ => "missing",
                };
                let detail = worker
                    .map(|w| {
                        format!(
                            "  worker {} ({} requests, {} restarts)",
                            w["state"].as_str().unwrap_or("?"),
                            w["requests"],
                            w["restarts"]
                        )
                    })
                    .unwrap_or_default();
                println!(
                    "  {:<24} {:<8} {:>6} MiB {}{}{detail}",
                    m.id,
                    tier,
                    m.bytes >> 20,
                    &m.sha256[..12],
                    if m.pinned { " pinned" } else { "" }
                );
            }
            if let Some(v) = &live {
                let c = &v["response_cache"];
                println!(
                    "response cache: {} hits, {} misses, {} KiB in memory, {} KiB on disk",
                    c["hits"],
                    c["misses"],
                    c["memory_bytes"].as_u64().unwrap_or(0) >> 10,
                    c["disk_bytes"].as_u64().unwrap_or(0) >> 10
                );
            }
            let window = if status.prewarm_window_open { "open" } else { "closed" };
            println!(
                "prewarm window {window}; next change {}",
                status.prewarm_next_change.as_deref().unwrap_or("never")
            );
            let events = last_events(10);
            if !events.is_empty() {
                println!("last events (journalctl SYSLOG_IDENTIFIER=kilnd):");
                for e in events {
                    println!("  {e}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { listen } => kiln_supervisor::serve::run(&kiln_supervisor::serve::RunArgs {
            spec: cli.spec.clone(),
            state_dir: cli.state_dir.clone(),
            listen: *listen,
        }),
        Command::Worker { gguf, sha256, threads, context, batch, parallel, prefix_dir } => {
            kiln_supervisor::worker::child::run(&kiln_supervisor::worker::child::WorkerArgs {
                gguf: gguf.clone(),
                sha256: sha256.clone(),
                threads: *threads,
                context: *context,
                batch: *batch,
                parallel: *parallel,
                prefix_dir: prefix_dir.clone(),
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// kilnd's own /status, when it answers (with the spec's token when it is readable).
fn live_status(spec: &kiln_spec::Spec, url: Option<&str>) -> Option<serde_json::Value> {
    let base = match url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => {
            let mut addr = spec.supervisor.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{addr}")
        }
    };
    let agent: ureq::Agent =
        ureq::Agent::config_builder().timeout_global(Some(std::time::Duration::from_secs(3))).build().into();
    let mut req = agent.get(&format!("{base}/status"));
    if let Some(token) = spec.supervisor.api_token_file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()) {
        req = req.header("authorization", &format!("Bearer {}", token.trim()));
    }
    let mut resp = req.call().ok()?;
    serde_json::from_str(&resp.body_mut().read_to_string().ok()?).ok()
}

/// The last `n` journal entries of kilnd, as "time message" lines.
fn last_events(n: u32) -> Vec<String> {
    let Ok(out) = std::process::Command::new("journalctl")
        .args(["--no-pager", "-o", "json", "-n", &n.to_string(), "SYSLOG_IDENTIFIER=kilnd"])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|e| {
            let us: i64 = e["__REALTIME_TIMESTAMP"].as_str().and_then(|t| t.parse().ok()).unwrap_or(0);
            let when = jiff::Timestamp::from_microsecond(us).map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string());
            format!("{} {}", when.unwrap_or_default(), e["MESSAGE"].as_str().unwrap_or(""))
        })
        .collect()
}
