//! `kilnd run`: the cgroups, one worker task per model, the HTTP API, and a supervision
//! thread (memory pressure, prewarm in the spec's windows that yields to traffic, pruning of
//! the prefix cache, systemd status and watchdog).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, bail};
use kiln_spec::validate::{Context, load_file};
use serde_json::json;

use crate::daemon::Placement;
use crate::engine::{Engine, read_memory};
use crate::log::{self, message_id};
use crate::metrics::{Metrics, TierLabel};
use crate::notify;
use crate::policy::{Footprint, GdsState, Level, ModelView, Refusal, admit, make_room};
use crate::respcache::ResponseCache;
use crate::server::{AppState, router};
use crate::worker::host::{Admission, Failure, ModelWorker, WorkerConfig};

#[derive(Debug, Clone)]
pub struct RunArgs {
    pub spec: PathBuf,
    pub state_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
}

/// Reads the API token file; `None` when the spec names none.
fn read_token(path: Option<&Path>) -> Result<Option<String>> {
    let Some(p) = path else { return Ok(None) };
    let t = std::fs::read_to_string(p)
        .with_context(|| format!("reading the API token file {} (supervisor.api-token-file)", p.display()))?;
    let t = t.trim().to_owned();
    if t.is_empty() {
        bail!("the API token file {} is empty", p.display());
    }
    Ok(Some(t))
}

/// Every model with its worker, for admission control.
type Loadable = (kiln_spec::model::Model, ModelWorker);

/// Whether `id` may load: within the inference cgroup's memory.max with the models loaded
/// now, or after unloading idle unpinned ones (chosen by the spec's eviction policy), and not
/// at the emergency threshold.
fn admission(
    id: &str,
    all: &[Loadable],
    memory_max: Option<u64>,
    level: Level,
    policy: kiln_spec::raw::EvictionPolicy,
) -> Admission {
    let Some((model, _)) = all.iter().find(|(m, _)| m.id == id) else {
        return Admission::Refused(Failure { status: 500, message: format!("no model {id}"), retry_after_secs: None });
    };
    let views: Vec<ModelView> = all
        .iter()
        .map(|(m, w)| {
            let rt = w.lock();
            ModelView {
                loaded: rt.state == "loaded",
                in_use: u32::from(rt.busy) + u32::try_from(rt.queued).unwrap_or(u32::MAX),
                last_used: rt.last_used.and_then(|s| jiff::Timestamp::from_second(i64::try_from(s).ok()?).ok()),
                ..ModelView::from_spec(m)
            }
        })
        .collect();
    let loaded: u64 = views.iter().filter(|v| v.loaded && v.id != id).map(|v| v.footprint_bytes).sum();
    let refusal = match admit(id, Footprint::of(model), memory_max, loaded, level) {
        Ok(()) => return Admission::Go,
        Err(r) => r,
    };
    if let Refusal::NoRoom { .. } = refusal
        && let Some(plan) =
            make_room(&views, id, Footprint::of(model).total_bytes(), memory_max, loaded, policy, &GdsState::default())
        && !plan.decisions.is_empty()
    {
        let mut leaving = Vec::new();
        for d in &plan.decisions {
            if let Some((_, w)) = all.iter().find(|(m, _)| m.id == d.id) {
                w.unload(&format!("making room for {id}"));
                leaving.push(w.runtime.clone());
            }
        }
        return Admission::MakingRoom(leaving);
    }
    Admission::Refused(Failure {
        status: 503,
        retry_after_secs: refusal.retry_after_secs(),
        message: refusal.to_string(),
    })
}

pub fn run(args: &RunArgs) -> Result<ExitCode> {
    let loaded = load_file(&args.spec, Context::Device).map_err(|d| anyhow::anyhow!("{d}"))?;
    let spec = loaded.spec;
    let sink = log::init(spec.supervisor.log_level.as_str());
    let listen = args.listen.unwrap_or(spec.supervisor.listen);
    let token = read_token(spec.supervisor.api_token_file.as_deref())?;
    if !listen.ip().is_loopback() && token.is_none() {
        bail!(
            "refusing to listen on {listen} without an API token: set supervisor.api-token-file, or listen on 127.0.0.1"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    // Bind first: a second kilnd on the same port fails here, before touching cgroups.
    let listener = rt.block_on(tokio::net::TcpListener::bind(listen)).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            " (another kilnd or server is listening there; stop it or pass --listen)"
        } else {
            ""
        };
        anyhow::anyhow!("cannot listen on {listen}: {e}{hint}")
    })?;
    let placement = Arc::new(Placement::create(&spec)?);
    let engine = Engine::open(spec.clone(), args.state_dir.as_deref())?;
    let paths = engine.paths.clone();
    tracing::info!(message_id = message_id::STARTED, sink = ?sink, spec = %args.spec.display(), "kilnd started for {}", spec.name);
    let metrics = Arc::new(Metrics::new());
    let exe = std::env::current_exe().context("finding kilnd's own executable")?;
    let prefix_dir = (spec.cache.prefix.size_bytes > 0).then(|| paths.prefix.clone());
    if let Some(d) = &prefix_dir {
        std::fs::create_dir_all(d).with_context(|| format!("creating the prefix cache {}", d.display()))?;
    }
    let engine = Arc::new(Mutex::new(engine));

    // Admission control sees every model's runtime state.
    let runtimes: Arc<OnceLock<Vec<Loadable>>> = Arc::new(OnceLock::new());
    let memory_max = match (&placement.inference, spec.cgroups.inference.memory_max_bytes) {
        (Some(cg), _) => placement.backend.memory_max(cg).ok().flatten(),
        (None, m) => m,
    };
    let _guard = rt.enter();
    let mut workers = HashMap::new();
    let mut templates = HashMap::new();
    // The device's spec names models by hash: what a load takes beyond the weights (KV cache,
    // weights llama.cpp repacks for this CPU) comes from the store copy's GGUF header.
    let mut models = spec.models.clone();
    for m in &mut models {
        let (store_path, hot_path) = engine.lock().map_err(|_| anyhow::anyhow!("engine lock"))?.weights(m);
        let header = kiln_spec::gguf::read_header(&store_path).ok();
        if let Some(h) = &header {
            m.complete_from(h, kiln_spec::gguf::Repack::of_this_build());
        }
        templates.insert(m.id.clone(), header.and_then(|h| h.chat_template));
        let admit_fn = {
            let runtimes = runtimes.clone();
            let engine = engine.clone();
            let policy = spec.cache.eviction;
            Arc::new(move |id: &str| -> Admission {
                let level = engine.lock().map_or(Level::Normal, |e| e.level());
                admission(id, runtimes.get().map_or(&[][..], Vec::as_slice), memory_max, level, policy)
            })
        };
        let cfg = WorkerConfig {
            model_id: m.id.clone(),
            sha256: m.sha256.clone(),
            store_path,
            hot_path,
            threads: m.threads,
            context: m.context,
            batch: m.batch,
            parallel: m.parallel,
            prefix_dir: prefix_dir.clone(),
            keep_alive: Duration::from_secs(spec.cache.keep_alive_secs.max(1)),
            load_timeout: Duration::from_secs(600),
            backend: placement.models.get(&m.id).map(|cg| (placement.backend.clone(), cg.clone())),
            admit: admit_fn,
            exe: exe.clone(),
            metrics: metrics.clone(),
            footprint: Footprint::of(m),
        };
        workers.insert(m.id.clone(), ModelWorker::spawn(cfg, spec.supervisor.queue_depth as usize));
    }
    let _ = runtimes
        .set(models.iter().filter_map(|m| workers.get(&m.id).map(|w: &ModelWorker| (m.clone(), w.clone()))).collect());
    let cache = ResponseCache::open(
        Some(&paths.responses),
        spec.cache.responses.memory_bytes,
        spec.cache.responses.disk_bytes,
        spec.cache.responses.ttl_secs,
    )?;
    let cgroups = json!({
        "version": placement.backend.version().to_string(),
        "inference": placement.inference.as_ref().map(|cg| json!({
            "path": cg.path(),
            "memory_max_bytes": placement.backend.memory_max(cg).ok().flatten(),
        })),
    });
    let inflight = Arc::new(AtomicUsize::new(0));
    let state = Arc::new(AppState {
        spec: spec.clone(),
        workers,
        templates,
        cache,
        metrics: metrics.clone(),
        token,
        engine: engine.clone(),
        inflight: inflight.clone(),
        started: Instant::now(),
        cgroups,
    });
    let addr = listener.local_addr().unwrap_or(listen);
    let generation = {
        let state = engine.lock().unwrap_or_else(std::sync::PoisonError::into_inner).paths.state.clone();
        crate::generations::running(&state).map_or_else(|| "none".to_string(), |g| g["number"].to_string())
    };
    tracing::info!(message_id = message_id::LISTENING, address = %addr, generation = %generation,
        "listening on http://{addr} (generation {generation})");
    eprintln!("kilnd: listening on http://{addr}");
    let _ = notify::ready(&format!("serving {} model(s) on {addr}", spec.models.len()));

    let stop = Arc::new(AtomicBool::new(false));
    let supervisor = {
        let stop = stop.clone();
        let placement = placement.clone();
        let args = args.clone();
        let state = state.clone();
        std::thread::Builder::new()
            .name("supervise".into())
            .spawn(move || supervise(&args, &engine, &placement, &state, &stop, addr))
            .context("starting the supervision thread")?
    };
    let app = router(state.clone());
    let served = rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("watching SIGINT")?;
        let signalled = Arc::new(tokio::sync::Notify::new());
        // Each streamed token is a small write: without TCP_NODELAY, Nagle's algorithm holds a
        // chunk back while the one before is unacknowledged.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::warn!("setting TCP_NODELAY on a connection: {e}");
            }
        });
        let server = axum::serve(listener, app).with_graceful_shutdown({
            let signalled = signalled.clone();
            async move { signalled.notified().await }
        });
        let mut server = std::pin::pin!(server.into_future());
        tokio::select! {
            r = &mut server => return r.context("serving HTTP"),
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("kilnd stopping");
        signalled.notify_one();
        // Requests in flight get a few seconds to finish; streams that go on are cut.
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        Ok(())
    });
    stop.store(true, Ordering::SeqCst);
    let _ = notify::stopping();
    let _ = supervisor.join();
    drop(state);
    drop(_guard);
    rt.shutdown_timeout(Duration::from_secs(5));
    placement.cleanup();
    served.map(|()| ExitCode::SUCCESS)
}

/// Every few seconds: memory pressure, prewarm (yielding to requests), prefix cache pruning,
/// systemd status.
fn supervise(
    args: &RunArgs,
    engine: &Arc<Mutex<Engine>>,
    placement: &Placement,
    state: &AppState,
    stop: &AtomicBool,
    addr: std::net::SocketAddr,
) {
    let mut last_stats = Instant::now();
    // How often the cache statistics are logged (KILND_STATS_INTERVAL_SECS: tests use seconds).
    let stats_every = Duration::from_secs(
        std::env::var("KILND_STATS_INTERVAL_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(300).max(1),
    );
    let mut prewarm_done_for_window = false;
    let mut at_boot = state.spec.cache.prewarm.at_boot;
    while !stop.load(Ordering::SeqCst) {
        let reading = read_memory();
        let mapped_hot: Vec<String> =
            state.workers.values().filter(|w| w.lock().maps_hot_copy()).map(|w| w.id.clone()).collect();
        let (level, status) = {
            let mut e = engine.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            e.set_mapped_hot(mapped_hot);
            let level = match reading {
                Ok(r) => e.react_to_pressure(r).unwrap_or_else(|err| {
                    tracing::warn!("reacting to memory pressure: {err:#}");
                    e.level()
                }),
                Err(_) => e.level(),
            };
            if let Err(err) = e.save_demand() {
                tracing::warn!("saving demand: {err:#}");
            }
            (level, e.status(reading.ok()))
        };
        // Each model's state machine follows the tiers the engine changed (prewarm, eviction).
        for m in &status.models {
            if let Some(w) = state.workers.get(&m.id) {
                w.lock().follow_tiers(&m.id, m.stored, m.hot);
            }
        }
        // Under pressure, idle loaded models go first (the weights stay in the hot tier or the
        // page cache; KV and compute buffers are freed): unpinned ones from Evict, every idle
        // one at Emergency. Busy workers are never touched.
        if level >= Level::Evict {
            let pinned: std::collections::HashSet<&str> =
                state.spec.models.iter().filter(|m| m.pin).map(|m| m.id.as_str()).collect();
            for w in state.workers.values() {
                let (loaded, busy) = {
                    let rt = w.lock();
                    (rt.state == "loaded", rt.busy || rt.queued > 0)
                };
                if loaded && !busy && (level == Level::Emergency || !pinned.contains(w.id.as_str())) {
                    w.unload(&format!("memory pressure {level:?}"));
                }
            }
        }
        state
            .metrics
            .tier_bytes
            .get_or_create(&TierLabel { tier: "hot".into() })
            .set(i64::try_from(status.hot_used_bytes).unwrap_or(i64::MAX));
        let stored: u64 = status.models.iter().filter(|m| m.stored).map(|m| m.bytes).sum();
        state
            .metrics
            .tier_bytes
            .get_or_create(&TierLabel { tier: "store".into() })
            .set(i64::try_from(stored).unwrap_or(i64::MAX));
        let loaded: u64 = state
            .workers
            .values()
            .filter_map(|w| {
                let rt = w.lock();
                rt.info.clone().filter(|_| rt.state == "loaded")
            })
            .map(|i| i.rss_anon_bytes + i.rss_file_bytes)
            .sum();
        state
            .metrics
            .tier_bytes
            .get_or_create(&TierLabel { tier: "loaded".into() })
            .set(i64::try_from(loaded).unwrap_or(i64::MAX));
        if !status.prewarm_window_open {
            prewarm_done_for_window = false;
        }
        if (at_boot || (status.prewarm_window_open && !prewarm_done_for_window))
            && state.inflight.load(Ordering::SeqCst) == 0
        {
            let list = engine.lock().map(|e| e.prewarm_list()).unwrap_or_default();
            if list.is_empty() {
                prewarm_done_for_window = true;
                at_boot = false;
            } else {
                match prewarm(args, placement, &list, &state.inflight, stop) {
                    Ok(true) => {
                        prewarm_done_for_window = true;
                        at_boot = false;
                    }
                    Ok(false) => tracing::info!("prewarm yielded to inference traffic; it resumes when idle"),
                    Err(e) => {
                        tracing::warn!("prewarm: {e:#}");
                        prewarm_done_for_window = true;
                        at_boot = false;
                    }
                }
            }
        }
        if let Some(dir) = state
            .spec
            .cache
            .prefix
            .size_bytes
            .gt(&0)
            .then(|| engine.lock().map(|e| e.paths.prefix.clone()).ok())
            .flatten()
        {
            prune_prefix_cache(&dir, state.spec.cache.prefix.size_bytes, state.spec.cache.prefix.ttl_secs);
        }
        if last_stats.elapsed() >= stats_every {
            last_stats = Instant::now();
            let s = crate::server::status_json(state);
            let rc = &s["response_cache"];
            tracing::info!(
                message_id = message_id::CACHE_STATS,
                address = %addr,
                hits = %rc["hits"],
                misses = %rc["misses"],
                memory_bytes = %rc["memory_bytes"],
                disk_bytes = %rc["disk_bytes"],
                hot_bytes = %s["hot_tier"]["used_bytes"],
                "response cache: {} hits, {} misses ({} B in memory, {} B on disk); hot tier {} B",
                rc["hits"], rc["misses"], rc["memory_bytes"], rc["disk_bytes"], s["hot_tier"]["used_bytes"]
            );
        }
        let loaded_ids: Vec<String> =
            state.workers.values().filter(|w| w.lock().state == "loaded").map(|w| w.id.clone()).collect();
        let _ = notify::status(&format!(
            "pressure {level:?}; {} MiB hot; loaded: {}",
            status.hot_used_bytes >> 20,
            if loaded_ids.is_empty() { "none".into() } else { loaded_ids.join(", ") }
        ));
        let _ = notify::watchdog();
        for _ in 0..20 {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// Runs a prewarm copy in the prewarm cgroup; stops it as soon as a request is in flight
/// (the copy resumes later: finished models are verified, not copied again). `Ok(true)` when
/// it finished.
fn prewarm(
    args: &RunArgs,
    placement: &Placement,
    list: &[String],
    inflight: &AtomicUsize,
    stop: &AtomicBool,
) -> Result<bool> {
    let mut child = placement.spawn_prewarm(&args.spec, args.state_dir.as_deref(), list)?;
    loop {
        if let Some(status) = child.try_wait().context("waiting for the prewarm copy")? {
            if !status.success() {
                bail!("the prewarm copy ended with {status}");
            }
            return Ok(true);
        }
        if inflight.load(Ordering::SeqCst) > 0 || stop.load(Ordering::SeqCst) {
            // SIGTERM: the copy removes its partial file and exits.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(0)),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
            return Ok(false);
        }
        // A copy of gigabytes takes longer than WatchdogSec: kilnd is alive meanwhile.
        let _ = notify::watchdog();
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Keeps the prefix cache under its size and TTL: expired files first, then least recently
/// used (restores touch their file).
pub fn prune_prefix_cache(dir: &Path, cap: u64, ttl_secs: u64) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let now = SystemTime::now();
    let mut files: Vec<(SystemTime, u64, PathBuf)> = rd
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "kv"))
        .filter_map(|e| {
            let md = e.metadata().ok()?;
            Some((md.modified().ok()?, md.len(), e.path()))
        })
        .collect();
    files.sort();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    for (mtime, len, path) in files {
        let expired = now.duration_since(mtime).is_ok_and(|age| age.as_secs() > ttl_secs);
        if (expired || total > cap) && std::fs::remove_file(&path).is_ok() {
            let _ = std::fs::remove_file(crate::worker::child::sum_path(&path));
            total -= len;
        }
    }
}
