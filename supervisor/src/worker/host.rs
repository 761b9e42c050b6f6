//! kilnd's side of the workers: one task per model owns its worker process, takes jobs from
//! a bounded queue (up to the model's `parallel` in flight), loads the worker on demand (after
//! admission control), forwards each job's events to its HTTP handler, cancels when the client
//! goes away, unloads after the keep-alive, and
//! restarts a crashed worker with backoff. kilnd never goes down because of a worker.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, anyhow};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use super::{ErrorKind, Event, Finish, ModelInfo, Request, Sampling};
use crate::cgroup::{CgroupBackend, CgroupHandle, MemoryEvents};
use crate::log::message_id;
use crate::policy::state::{Event as StateEvent, Mapped, ModelState};

/// What the HTTP handler receives for a job.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Started { prompt_tokens: u32, reused_tokens: u32, prefix_restored: bool, queued_ms: f64 },
    Token(String),
    Done { finish: Finish, prompt_tokens: u32, completion_tokens: u32, prompt_ms: f64, generation_ms: f64 },
    Failed(Failure),
}

/// Why a job failed, with the HTTP status it maps to.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub status: u16,
    pub message: String,
    pub retry_after_secs: Option<u64>,
}

impl Failure {
    fn new(status: u16, message: impl Into<String>, retry_after_secs: Option<u64>) -> Self {
        Failure { status, message: message.into(), retry_after_secs }
    }
}

/// What to generate from: a chat (rendered with the template once the model's tokens are
/// known) or a plain prompt.
#[derive(Debug, Clone)]
pub enum Input {
    Chat { messages: Vec<crate::chat::Message>, template_override: Option<String> },
    Text(String),
}

#[derive(Debug)]
pub struct Job {
    pub input: Input,
    pub sampling: Sampling,
    pub prompt_tokens_limit: Option<u32>,
    pub reply: mpsc::UnboundedSender<Reply>,
    pub queued_at: Instant,
}

/// What /status shows about a model's worker.
#[derive(Debug, Clone, Serialize)]
pub struct Runtime {
    /// `unloaded`, `loading`, `loaded`, `unloading` or `failed`: the phase of [`Runtime::phase`].
    pub state: &'static str,
    /// The model's state machine (policy::state): every change of `state` is one of its
    /// transitions, so a sequence it does not allow is reported instead of shown.
    #[serde(serialize_with = "display")]
    pub phase: ModelState,
    pub pid: Option<u32>,
    pub info: Option<ModelInfo>,
    pub gguf: Option<PathBuf>,
    pub loaded_from: Option<&'static str>,
    pub requests: u64,
    pub failures: u64,
    pub restarts: u64,
    /// Generations stopped because the client went away.
    pub cancelled: u64,
    pub loads: u64,
    pub unloads: u64,
    pub busy: bool,
    /// Generations the worker is running now (up to the model's `parallel`).
    pub inflight: usize,
    pub queued: usize,
    /// Seconds since the epoch.
    pub last_used: Option<u64>,
    pub last_error: Option<String>,
    /// What admission control counts for a load of this model (compare with `info`'s
    /// measured resident bytes).
    pub footprint: Option<crate::policy::admit::Footprint>,
}

impl Default for Runtime {
    fn default() -> Runtime {
        Runtime {
            state: "unloaded",
            phase: ModelState::Stored,
            pid: None,
            info: None,
            gguf: None,
            loaded_from: None,
            requests: 0,
            failures: 0,
            restarts: 0,
            cancelled: 0,
            loads: 0,
            unloads: 0,
            busy: false,
            inflight: 0,
            queued: 0,
            last_used: None,
            last_error: None,
            footprint: None,
        }
    }
}

fn display<S: serde::Serializer>(v: &ModelState, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl Runtime {
    /// Applies `event` to the model's state machine; `state` follows its phase. A transition
    /// the machine refuses leaves both as they were and is logged (a kilnd bug, not a panic).
    pub fn transition(&mut self, model: &str, event: StateEvent) {
        if let Err(e) = self.apply(model, event) {
            tracing::warn!(model = %model, "state machine: {e}");
        }
    }

    /// One transition of the model's state machine, logged (TRANSITION) when it is allowed.
    fn apply(&mut self, model: &str, event: StateEvent) -> Result<(), crate::policy::state::TransitionError> {
        let label = event.to_string();
        let next = self.phase.apply(event)?;
        tracing::info!(
            message_id = message_id::TRANSITION,
            model = %model,
            reason = %label,
            "{model}: {} -> {next} on {label}",
            self.phase
        );
        self.state = match &next {
            ModelState::Loading(_) => "loading",
            ModelState::Loaded(_) => "loaded",
            ModelState::Unloading(_) => "unloading",
            ModelState::Failed { .. } => "failed",
            _ => "unloaded",
        };
        self.phase = next;
        Ok(())
    }

    /// Follows where the engine says the bytes are: a tmpfs copy made by prewarm or removed
    /// by eviction (Promoted/Demoted, in any phase the machine allows), a model fetched into
    /// the store. A change the machine does not allow now (a mapped tmpfs copy cannot be
    /// demoted) is taken on a later call, once the phase allows it.
    pub fn follow_tiers(&mut self, model: &str, stored: bool, hot: bool) {
        if matches!(self.phase, ModelState::Missing) && stored {
            for event in [StateEvent::FetchStarted, StateEvent::Fetched] {
                let _ = self.apply(model, event);
            }
        }
        if self.phase.in_store() && self.phase.is_hot() != hot {
            let _ = self.apply(model, if hot { StateEvent::Promoted } else { StateEvent::Demoted });
        }
    }

    /// Whether a worker maps the tmpfs copy (loading, loaded or unloading from the hot tier).
    pub fn maps_hot_copy(&self) -> bool {
        matches!(
            self.phase,
            ModelState::Loading(Mapped::Hot) | ModelState::Loaded(Mapped::Hot) | ModelState::Unloading(Mapped::Hot)
        )
    }

    /// Before a load: a failed model is retried, and the tier the weights will be mapped from
    /// (the hot tier when a copy is there) is what the engine found, which prewarm and
    /// eviction may have changed since the last load.
    fn prepare_load(&mut self, model: &str, hot: bool) {
        if matches!(self.phase, ModelState::Failed { .. }) {
            self.transition(model, StateEvent::Retry);
        }
        match (&self.phase, hot) {
            (ModelState::Stored, true) => self.transition(model, StateEvent::Promoted),
            (ModelState::Hot, false) => self.transition(model, StateEvent::Demoted),
            _ => {}
        }
        self.transition(model, StateEvent::LoadStarted);
    }
}

/// Admission control's answer for a model that wants to load.
#[derive(Debug)]
pub enum Admission {
    Go,
    Refused(Failure),
    /// Other idle models are being unloaded to make room: wait for these to be unloaded,
    /// then ask again.
    MakingRoom(Vec<Arc<Mutex<Runtime>>>),
}

/// Decides whether a model may load now (admission control), given by the server.
pub type Admit = Arc<dyn Fn(&str) -> Admission + Send + Sync>;

/// Everything a model's task needs to start its worker.
#[derive(Clone)]
pub struct WorkerConfig {
    pub model_id: String,
    pub sha256: String,
    pub store_path: PathBuf,
    pub hot_path: Option<PathBuf>,
    pub threads: u32,
    pub context: u32,
    pub batch: u32,
    /// Generations the worker decodes together: jobs in flight at once.
    pub parallel: u32,
    pub prefix_dir: Option<PathBuf>,
    pub keep_alive: Duration,
    pub load_timeout: Duration,
    pub backend: Option<(Arc<dyn CgroupBackend>, CgroupHandle)>,
    pub admit: Admit,
    /// The executable to run as `worker` (kilnd itself).
    pub exe: PathBuf,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// What admission control counts for loading this model.
    pub footprint: crate::policy::admit::Footprint,
}

impl std::fmt::Debug for WorkerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerConfig").field("model_id", &self.model_id).finish_non_exhaustive()
    }
}

/// The handle the server keeps per model.
#[derive(Debug, Clone)]
pub struct ModelWorker {
    pub id: String,
    tx: mpsc::Sender<Job>,
    control: mpsc::UnboundedSender<String>,
    pub runtime: Arc<Mutex<Runtime>>,
}

impl ModelWorker {
    /// Starts the model's task (no process yet: the first job loads it).
    pub fn spawn(cfg: WorkerConfig, queue_depth: usize) -> ModelWorker {
        let (tx, rx) = mpsc::channel(queue_depth.max(1));
        let (control, control_rx) = mpsc::unbounded_channel();
        let runtime = Arc::new(Mutex::new(Runtime {
            state: "unloaded",
            // Until the engine has it (a url model not fetched yet).
            phase: if cfg.store_path.is_file() { ModelState::Stored } else { ModelState::Missing },
            footprint: Some(cfg.footprint),
            ..Default::default()
        }));
        let id = cfg.model_id.clone();
        let task = Task {
            cfg,
            rt: runtime.clone(),
            proc: None,
            backoff: Duration::ZERO,
            next_id: 1,
            inflight: HashMap::new(),
        };
        tokio::spawn(task.run(rx, control_rx));
        ModelWorker { id, tx, control, runtime }
    }

    /// Asks the task to unload its worker (memory pressure); it does so between requests.
    pub fn unload(&self, reason: &str) {
        let _ = self.control.send(reason.to_owned());
    }

    /// Queues a job; `Err` is the 429 to send when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), Failure> {
        match self.tx.try_send(job) {
            Ok(()) => {
                self.lock().queued += 1;
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                Err(Failure::new(429, format!("the queue for {} is full; retry shortly", self.id), Some(1)))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(Failure::new(503, format!("the worker task for {} has stopped", self.id), Some(5)))
            }
        }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Runtime> {
        self.runtime.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

struct Proc {
    child: tokio::process::Child,
    /// The worker's events (its stdout).
    lines: Lines<BufReader<UnixStream>>,
    /// Requests to the worker (its stdin).
    write: UnixStream,
    events_before: MemoryEvents,
}

struct Task {
    cfg: WorkerConfig,
    rt: Arc<Mutex<Runtime>>,
    proc: Option<Proc>,
    backoff: Duration,
    next_id: u64,
    /// Jobs sent to the worker and not done yet, by request id (at most `cfg.parallel`).
    inflight: HashMap<u64, Inflight>,
}

/// A job the worker is running.
struct Inflight {
    job: Job,
    queued_ms: f64,
    /// Cancel was sent: the client went away.
    cancelled: bool,
}

/// What the worker process did: a line (an event) or its exit.
enum ProcEvent {
    Line(std::io::Result<Option<String>>),
    Exited,
}

/// Seconds since the epoch (0 before it).
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// How often jobs in flight are checked for clients that went away (without tokens flowing,
/// during a long prompt, a closed client is noticed no other way).
const CLOSED_CHECK: Duration = Duration::from_millis(50);

impl Task {
    fn rt(&self) -> std::sync::MutexGuard<'_, Runtime> {
        self.rt.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Job>, mut control: mpsc::UnboundedReceiver<String>) {
        let parallel = self.cfg.parallel.max(1) as usize;
        let mut closed_check = tokio::time::interval(CLOSED_CHECK);
        closed_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let idle = self.inflight.is_empty();
            let keep_alive = tokio::time::sleep(self.cfg.keep_alive);
            tokio::select! {
                j = rx.recv(), if self.inflight.len() < parallel => {
                    let Some(job) = j else { break };
                    {
                        let mut rt = self.rt();
                        rt.queued = rt.queued.saturating_sub(1);
                    }
                    if job.reply.is_closed() {
                        continue; // the client left while queued
                    }
                    self.begin(job).await;
                }
                ev = proc_event(&mut self.proc, !idle) => match ev {
                    ProcEvent::Line(line) => {
                        if let Err(e) = self.on_line(line).await {
                            self.lost(&e).await;
                        }
                    }
                    // A worker that dies between requests (OOM-killed when its cgroup's limit
                    // shrank, killed by hand) is noticed now, not by the next request.
                    ProcEvent::Exited => {
                        let how = self.reap().await;
                        tracing::error!(message_id = how.message_id(), model = %self.cfg.model_id, "the idle worker for {} exited ({how}); it is loaded again on the next request", self.cfg.model_id);
                        self.cfg.metrics.restarts.get_or_create(&crate::metrics::Metrics::model(&self.cfg.model_id)).inc();
                        let mut rt = self.rt();
                        rt.restarts += 1;
                        rt.last_error = Some(format!("the idle worker exited ({how})"));
                    }
                },
                _ = closed_check.tick(), if !idle => {
                    if let Err(e) = self.cancel_closed().await {
                        self.lost(&e).await;
                    }
                }
                () = keep_alive, if idle && self.proc.is_some() => {
                    self.unload("keep-alive expired").await;
                }
                Some(reason) = control.recv(), if idle => {
                    if self.proc.is_some() {
                        tracing::warn!(message_id = message_id::EVICTION, model = %self.cfg.model_id, tier = "loaded", reason = %reason, "unloading {} ({reason})", self.cfg.model_id);
                        self.unload(&reason).await;
                    }
                }
            }
        }
        self.unload("kilnd stopping").await;
    }

    /// Stops the worker; its memory goes back (the weights stay in the hot tier/page cache).
    pub async fn unload(&mut self, why: &str) {
        if let Some(mut p) = self.proc.take() {
            self.rt().transition(&self.cfg.model_id, StateEvent::UnloadStarted);
            drop(p.write);
            let _ = p.child.start_kill();
            let _ = p.child.wait().await;
            let mut rt = self.rt();
            rt.transition(&self.cfg.model_id, StateEvent::Unloaded);
            rt.pid = None;
            rt.unloads += 1;
            self.cfg.metrics.evictions.get_or_create(&crate::metrics::Metrics::model(&self.cfg.model_id)).inc();
            tracing::info!(message_id = message_id::MODEL_UNLOADED, model = %self.cfg.model_id, reason = why, "unloaded {} ({why})", self.cfg.model_id);
        }
    }

    /// Loads the worker if it is not running (admission control first; an answer for the
    /// job when it cannot be), then sends the job to it.
    async fn begin(&mut self, job: Job) {
        if self.proc.is_none() {
            if !self.backoff.is_zero() {
                tokio::time::sleep(self.backoff).await;
            }
            let mut rounds = 0;
            loop {
                match (self.cfg.admit)(&self.cfg.model_id) {
                    Admission::Go => break,
                    Admission::MakingRoom(leaving) if rounds < 3 => {
                        rounds += 1;
                        let deadline = Instant::now() + Duration::from_secs(10);
                        while Instant::now() < deadline
                            && leaving.iter().any(|rt| rt.lock().is_ok_and(|r| r.state == "loaded"))
                        {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    Admission::MakingRoom(_) => {
                        let f = Failure::new(503, format!("no room to load {} yet; retry", self.cfg.model_id), Some(5));
                        let _ = job.reply.send(Reply::Failed(f));
                        return;
                    }
                    Admission::Refused(f) => {
                        tracing::warn!(message_id = message_id::LOAD_REFUSED, model = %self.cfg.model_id, "{}", f.message);
                        let _ = job.reply.send(Reply::Failed(f));
                        return;
                    }
                }
            }
            match self.load().await {
                Ok(p) => self.proc = Some(p),
                Err(e) => {
                    let message = format!("loading {}: {e:#}", self.cfg.model_id);
                    tracing::error!(model = %self.cfg.model_id, "{message}");
                    self.bump_backoff();
                    {
                        let mut rt = self.rt();
                        rt.transition(&self.cfg.model_id, StateEvent::LoadFailed(message.clone()));
                        rt.last_error = Some(message.clone());
                        rt.failures += 1;
                    }
                    let _ =
                        job.reply.send(Reply::Failed(Failure::new(503, message, Some(self.backoff.as_secs().max(1)))));
                    return;
                }
            }
        }
        let (prompt, prefix_bytes) = match &job.input {
            Input::Text(t) => (t.clone(), None),
            Input::Chat { messages, template_override } => {
                let info = self.rt().info.clone().unwrap_or_else(|| ModelInfo {
                    chat_template: None,
                    bos_token: String::new(),
                    eos_token: String::new(),
                    n_ctx: 0,
                    n_ctx_train: 0,
                    load_ms: 0,
                    rss_anon_bytes: 0,
                    rss_file_bytes: 0,
                });
                let template = template_override.as_deref().or(info.chat_template.as_deref());
                match crate::chat::render(template, messages, &info.bos_token, &info.eos_token) {
                    Ok(r) => (r.prompt, r.prefix_bytes),
                    Err(message) => {
                        let _ = job.reply.send(Reply::Failed(Failure::new(400, message, None)));
                        return;
                    }
                }
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let req = Request::Generate {
            id,
            prompt,
            prefix_bytes,
            sampling: job.sampling.clone(),
            prompt_tokens_limit: job.prompt_tokens_limit,
        };
        let queued_ms = job.queued_at.elapsed().as_secs_f64() * 1e3;
        self.inflight.insert(id, Inflight { job, queued_ms, cancelled: false });
        {
            let mut rt = self.show_inflight();
            rt.requests += 1;
            rt.last_used = Some(now_secs());
        }
        if let Err(e) = self.send(&req).await {
            self.lost(&e).await;
        }
    }

    async fn send(&mut self, req: &Request) -> Result<()> {
        let Some(p) = self.proc.as_mut() else { return Err(anyhow!("no worker")) };
        send(&mut p.write, req).await
    }

    /// Sends Cancel for the jobs whose clients went away.
    async fn cancel_closed(&mut self) -> Result<()> {
        let gone: Vec<u64> =
            self.inflight.iter().filter(|(_, f)| !f.cancelled && f.job.reply.is_closed()).map(|(id, _)| *id).collect();
        for id in gone {
            if let Some(f) = self.inflight.get_mut(&id) {
                f.cancelled = true;
            }
            self.send(&Request::Cancel { id }).await?;
        }
        Ok(())
    }

    /// Forwards one event of the worker to its job. `Err` when the worker is gone.
    async fn on_line(&mut self, line: std::io::Result<Option<String>>) -> Result<()> {
        let Some(line) = line.context("reading from the worker")? else {
            return Err(anyhow!("the worker closed its socket"));
        };
        let ev: Event = serde_json::from_str(&line).with_context(|| format!("a bad line from the worker: {line}"))?;
        let (id, reply, last) = match ev {
            Event::Started { id, prompt_tokens, reused_tokens, prefix_restored, .. } => {
                let queued_ms = self.inflight.get(&id).map_or(0.0, |f| f.queued_ms);
                (id, Reply::Started { prompt_tokens, reused_tokens, prefix_restored, queued_ms }, false)
            }
            Event::Token { id, text } => (id, Reply::Token(text), false),
            Event::Done { id, finish, prompt_tokens, completion_tokens, prompt_ms, generation_ms } => {
                if finish == Finish::Cancelled {
                    self.rt().cancelled += 1;
                }
                (id, Reply::Done { finish, prompt_tokens, completion_tokens, prompt_ms, generation_ms }, true)
            }
            Event::Error { id, kind, message } => {
                let status = if kind == ErrorKind::BadRequest { 400 } else { 500 };
                (id, Reply::Failed(Failure::new(status, message, None)), true)
            }
            Event::Loaded(_) | Event::LoadFailed { .. } => return Ok(()),
        };
        if last {
            // Done or Error: the job ends; the worker is healthy.
            if let Some(f) = self.inflight.remove(&id) {
                let _ = f.job.reply.send(reply);
            }
            self.backoff = Duration::ZERO;
            let mut rt = self.show_inflight();
            if !rt.busy {
                rt.last_used = Some(now_secs());
            }
            return Ok(());
        }
        let Some(f) = self.inflight.get_mut(&id) else { return Ok(()) }; // a job already answered
        if f.job.reply.send(reply).is_err() && !f.cancelled {
            f.cancelled = true;
            self.send(&Request::Cancel { id }).await?;
        }
        Ok(())
    }

    /// The worker died or its socket broke during requests: find out how, answer every job
    /// in flight 503, restart it later (with backoff).
    async fn lost(&mut self, e: &anyhow::Error) {
        let how = self.reap().await;
        let message = format!("the worker for {} exited during the request ({how}); retry", self.cfg.model_id);
        tracing::error!(message_id = how.message_id(), model = %self.cfg.model_id, error = %e, "{message}");
        self.cfg.metrics.restarts.get_or_create(&crate::metrics::Metrics::model(&self.cfg.model_id)).inc();
        self.bump_backoff();
        let jobs = std::mem::take(&mut self.inflight);
        {
            let mut rt = self.show_inflight();
            rt.restarts += 1;
            rt.failures += 1;
            rt.last_error = Some(message.clone());
            rt.last_used = Some(now_secs());
        }
        let retry = Some(self.backoff.as_secs().max(1));
        for f in jobs.into_values() {
            let _ = f.job.reply.send(Reply::Failed(Failure::new(503, message.clone(), retry)));
        }
    }

    /// Shows the jobs in flight in /status (`inflight`, and `busy` while there are any); the
    /// lock is handed back for more.
    fn show_inflight(&self) -> std::sync::MutexGuard<'_, Runtime> {
        let mut rt = self.rt();
        rt.inflight = self.inflight.len();
        rt.busy = rt.inflight > 0;
        rt
    }

    fn bump_backoff(&mut self) {
        self.backoff = (self.backoff * 2).clamp(Duration::from_millis(500), Duration::from_secs(30));
    }

    /// Waits for a dead worker and says how it ended (with its cgroup's memory events).
    async fn reap(&mut self) -> Exit {
        let Some(mut p) = self.proc.take() else { return Exit { how: "not running".into(), oom: false } };
        let status = match tokio::time::timeout(Duration::from_secs(5), p.child.wait()).await {
            Ok(Ok(s)) => s.to_string(),
            _ => {
                let _ = p.child.kill().await;
                "killed after its socket broke".into()
            }
        };
        let how = self.with_memory_events(status, &p.events_before);
        let mut rt = self.rt();
        rt.transition(&self.cfg.model_id, StateEvent::Crashed(how.to_string()));
        rt.pid = None;
        how
    }

    /// `status`, plus the OOM kills the model's cgroup counted since `before`.
    fn with_memory_events(&self, status: String, before: &MemoryEvents) -> Exit {
        if let Some((backend, cg)) = &self.cfg.backend
            && let Ok(ev) = backend.memory_events(cg)
        {
            let oom = ev.oom_kill.saturating_sub(before.oom_kill);
            if oom > 0 {
                let how = format!(
                    "{status}; OOM-killed: memory.events oom_kill +{oom}, max +{}",
                    ev.max - before.max.min(ev.max)
                );
                return Exit { how, oom: true };
            }
        }
        Exit { how: status, oom: false }
    }

    async fn load(&mut self) -> Result<Proc> {
        let c = &self.cfg;
        let (gguf, from) = match &c.hot_path {
            Some(h) if h.is_file() => (h.clone(), "hot"),
            _ if c.store_path.is_file() => (c.store_path.clone(), "store"),
            _ => {
                return Err(anyhow!(
                    "{} is not in the store yet ({}); kilnd fetches it or `kiln deploy` copies it",
                    c.model_id,
                    c.store_path.display()
                ));
            }
        };
        self.rt().prepare_load(&c.model_id, from == "hot");
        // One socket pair each way: requests on the worker's stdin, events on its stdout. With
        // one socket for both, every event kilnd read woke the worker's request-reading thread
        // (reading frees the writer's send buffer, and that wakes every thread waiting on the
        // writer's socket): a context switch on a core the decode threads use, once per token.
        let (req_ours, req_theirs) = std::os::unix::net::UnixStream::pair().context("creating the worker socket")?;
        let (ev_ours, ev_theirs) = std::os::unix::net::UnixStream::pair().context("creating the worker socket")?;
        let mut cmd = tokio::process::Command::new(&c.exe);
        cmd.arg("worker")
            .arg("--gguf")
            .arg(&gguf)
            .args(["--sha256", &c.sha256])
            .args(["--threads", &c.threads.to_string()])
            .args(["--context", &c.context.to_string()])
            .args(["--batch", &c.batch.to_string()])
            .args(["--parallel", &c.parallel.max(1).to_string()]);
        if let Some(dir) = &c.prefix_dir {
            cmd.arg("--prefix-dir").arg(dir);
        }
        cmd.stdin(Stdio::from(std::os::fd::OwnedFd::from(req_theirs)))
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(ev_theirs)))
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("starting {} worker", c.exe.display()))?;
        // The command holds our copy of the worker's ends of the sockets: without dropping it,
        // a worker that dies while loading would never close the socket for us.
        drop(cmd);
        let pid = child.id().unwrap_or(0);
        let mut events_before = MemoryEvents::default();
        // Into the model's cgroup before it allocates anything: it waits for Load.
        if let Some((backend, cg)) = &c.backend {
            backend
                .attach(cg, nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0)))
                .with_context(|| format!("placing the worker in cgroup {}", cg.name()))?;
            events_before = backend.memory_events(cg).unwrap_or_default();
        }
        req_ours.set_nonblocking(true).context("socket")?;
        ev_ours.set_nonblocking(true).context("socket")?;
        let mut write = UnixStream::from_std(req_ours).context("socket")?;
        let mut lines = BufReader::new(UnixStream::from_std(ev_ours).context("socket")?).lines();
        send(&mut write, &Request::Load).await?;
        let first = tokio::time::timeout(c.load_timeout, lines.next_line())
            .await
            .map_err(|_| anyhow!("no answer within {} s", c.load_timeout.as_secs()))?
            .context("reading from the worker")?;
        let Some(first) = first else {
            let status = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                Ok(Ok(s)) => s.to_string(),
                _ => "its socket closed".to_string(),
            };
            let how = self.with_memory_events(status, &events_before);
            tracing::error!(message_id = how.message_id(), model = %self.cfg.model_id, "the worker for {} exited while loading ({how})", self.cfg.model_id);
            return Err(anyhow!("the worker exited while loading ({how})"));
        };
        match serde_json::from_str::<Event>(&first).context("the worker's first line")? {
            Event::Loaded(info) => {
                tracing::info!(
                    message_id = message_id::MODEL_LOADED,
                    model = %c.model_id,
                    tier = from,
                    pid = pid,
                    load_ms = info.load_ms,
                    rss_anon_bytes = info.rss_anon_bytes,
                    rss_file_bytes = info.rss_file_bytes,
                    "loaded {} from the {from} tier in {} ms (anon {} MiB, file-backed {} MiB)",
                    c.model_id, info.load_ms, info.rss_anon_bytes >> 20, info.rss_file_bytes >> 20
                );
                let counted = c.footprint.anonymous_bytes();
                if info.rss_anon_bytes > counted.saturating_add(counted / 10) {
                    tracing::warn!(
                        message_id = message_id::MODEL_LOADED,
                        model = %c.model_id,
                        rss_anon_bytes = info.rss_anon_bytes,
                        bytes = counted,
                        "{} uses {} MiB of anonymous memory, more than the {} MiB admission control counts \
                         (KV + repacked weights + compute): loads may pass the inference cgroup's memory.max",
                        c.model_id, info.rss_anon_bytes >> 20, counted >> 20
                    );
                }
                let mut rt = self.rt();
                rt.transition(&c.model_id, StateEvent::LoadFinished);
                rt.pid = Some(pid);
                rt.info = Some(info);
                rt.gguf = Some(gguf);
                rt.loaded_from = Some(from);
                rt.loads += 1;
                rt.last_error = None;
                c.metrics.loads.get_or_create(&crate::metrics::Metrics::model(&c.model_id)).inc();
                Ok(Proc { child, lines, write, events_before })
            }
            Event::LoadFailed { message } => Err(anyhow!(message)),
            other => Err(anyhow!("unexpected first event {other:?}")),
        }
    }
}

/// How a worker ended: its exit status (and the cgroup's OOM kills), and whether the
/// kernel's OOM killer was the cause.
struct Exit {
    how: String,
    oom: bool,
}

impl Exit {
    /// The journal event it is logged as.
    fn message_id(&self) -> &'static str {
        if self.oom { message_id::OOM_KILL } else { message_id::WORKER_EXITED }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.how)
    }
}

/// The worker's next line when `lines` (jobs are in flight), else its exit; never when there
/// is no worker.
async fn proc_event(proc: &mut Option<Proc>, lines: bool) -> ProcEvent {
    match proc {
        Some(p) if lines => ProcEvent::Line(p.lines.next_line().await),
        Some(p) => {
            let _ = p.child.wait().await;
            ProcEvent::Exited
        }
        None => std::future::pending().await,
    }
}

async fn send(w: &mut UnixStream, req: &Request) -> Result<()> {
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line).await.context("writing to the worker")
}
