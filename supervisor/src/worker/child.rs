//! The worker process: loads one GGUF with llama.cpp (memory-mapped), then serves
//! generations, requests read from the socket on its stdin and events written to the one on
//! its stdout, up to `parallel` at once, each in its own
//! sequence of the context, decoded together (continuous batching). A sequence reuses the KV
//! cache of its previous request for a shared token prefix (as llama-server does), and saves/restores the
//! KV state of a declared prompt prefix (a chat's system turn) in the prefix cache on disk.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::num::NonZeroU32;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::token::LlamaToken;
use sha2::{Digest, Sha256};

use super::pick::Picker;
use super::text::TextStream;
use super::{ErrorKind, Event, Finish, ModelInfo, Request, Sampling};

/// The name of the worker's thread that reads requests (seen in /proc/PID/task/TID/comm).
pub const REQUEST_THREAD: &str = "kiln-requests";

/// Prefixes shorter than this are cheaper to recompute than to read back.
pub const MIN_PREFIX_TOKENS: usize = 64;

/// The engine build: kiln's version and llama.cpp's, part of every cache key.
pub fn engine_version() -> String {
    format!("kilnd {} llama-cpp-2 0.1.160", env!("CARGO_PKG_VERSION"))
}

/// How `kilnd worker` was asked to run.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    pub gguf: PathBuf,
    pub sha256: String,
    pub threads: u32,
    pub context: u32,
    pub batch: u32,
    /// Generations decoded together, each in its own sequence of `context` tokens.
    pub parallel: u32,
    pub prefix_dir: Option<PathBuf>,
}

/// The worker's side of the socket: events are queued and written together once per decode
/// step (one write, one wake-up of kilnd, for every sequence's token of that step).
struct Out {
    sock: UnixStream,
    buf: Vec<u8>,
}

impl Out {
    fn send(&mut self, ev: &Event) -> Result<()> {
        serde_json::to_writer(&mut self.buf, ev).context("encoding an event")?;
        self.buf.push(b'\n');
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let written = self.sock.write_all(&self.buf).context("writing to kilnd");
        self.buf.clear();
        written
    }

    fn send_now(&mut self, ev: &Event) -> Result<()> {
        self.send(ev)?;
        self.flush()
    }
}

/// Runs the worker until kilnd closes the socket. It dies with kilnd (PR_SET_PDEATHSIG).
pub fn run(args: &WorkerArgs) -> Result<()> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).context("PR_SET_PDEATHSIG")?;
    let sock = UnixStream::from(std::io::stdin().as_fd().try_clone_to_owned().context("taking the socket on stdin")?);
    let events = std::io::stdout().as_fd().try_clone_to_owned().context("taking the socket on stdout")?;
    // Whatever else writes to stdout (a library's printf) goes to stderr, not into the events.
    nix::unistd::dup2_stdout(std::io::stderr()).context("pointing stdout at stderr")?;
    let mut out = Out { sock: UnixStream::from(events), buf: Vec::new() };
    // A reader thread, so that requests and cancels arrive while generations run. It sleeps
    // on the request socket alone: nothing wakes it but a request.
    let (tx, rx) = mpsc::channel::<Request>();
    let reader = std::thread::Builder::new().name(REQUEST_THREAD.into()).spawn(move || {
        for line in BufReader::new(sock).lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<Request>(&line) {
                Ok(req) => {
                    if tx.send(req).is_err() {
                        break;
                    }
                }
                Err(e) => eprintln!("kilnd worker: bad request line: {e}"),
            }
        }
    });
    reader.context("starting the request thread")?;
    // kilnd sends Load once the worker is in its cgroup: nothing is allocated before.
    match rx.recv() {
        Ok(Request::Load) => {}
        Ok(other) => return Err(anyhow!("expected Load first, got {other:?}")),
        Err(_) => return Ok(()),
    }
    let started = Instant::now();
    let backend = LlamaBackend::init().context("initializing llama.cpp")?;
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default().with_logs_enabled(false));
    let model_params = LlamaModelParams::default().with_use_mmap(true);
    let model = match LlamaModel::load_from_file(&backend, &args.gguf, &model_params) {
        Ok(m) => m,
        Err(e) => {
            let message = format!("llama.cpp could not load {}: {e}", args.gguf.display());
            out.send_now(&Event::LoadFailed { message: message.clone() })?;
            return Err(anyhow!(message));
        }
    };
    let threads = i32::try_from(args.threads.max(1)).unwrap_or(1);
    let parallel = args.parallel.max(1);
    // A step decodes one token of every generating sequence plus prompt tokens: the batch
    // holds at least one token per sequence.
    let n_batch = args.batch.max(parallel);
    // One KV stream of `context` tokens per sequence (llama.cpp splits n_ctx among them).
    let ctx_params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(args.context.saturating_mul(parallel)))
        .with_n_seq_max(parallel)
        .with_n_batch(n_batch)
        .with_n_ubatch(n_batch)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let ctx = match model.new_context(&backend, ctx_params) {
        Ok(c) => c,
        Err(e) => {
            let message = format!("llama.cpp could not create a context of {} tokens x {parallel}: {e}", args.context);
            out.send_now(&Event::LoadFailed { message: message.clone() })?;
            return Err(anyhow!(message));
        }
    };
    let n_ctx_seq = (ctx.n_ctx() / parallel) as usize;
    let vocab = model.vocab();
    let piece = |t: LlamaToken| String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned();
    let (anon, file) = rss();
    let info = ModelInfo {
        chat_template: model.meta_val_str("tokenizer.chat_template").ok(),
        bos_token: piece(vocab.bos()),
        eos_token: piece(vocab.eos()),
        n_ctx: u32::try_from(n_ctx_seq).unwrap_or(u32::MAX),
        n_ctx_train: model.n_ctx_train(),
        load_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        rss_anon_bytes: anon,
        rss_file_bytes: file,
    };
    let bos_text = info.bos_token.clone();
    let pool = Threadpool::attach(&ctx, threads);
    out.send_now(&Event::Loaded(info))?;
    let slots = (0..parallel).map(|s| Slot { seq: s as i32, cached: Vec::new(), run: None }).collect();
    let mut w = Worker { model: &model, pool, ctx, args, bos_text, n_ctx_seq, n_batch: n_batch as usize, slots, out };
    w.serve(&rx)
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadRequest(String);

/// A persistent CPU threadpool attached to the context, as llama-server and llama-bench attach
/// one. Without it ggml creates and joins a pool inside every `llama_decode`: a thread created
/// per generated token (128 `clone3` calls for 128 tokens, counted with strace). The pool's
/// threads poll briefly between decodes (ggml's default hybrid polling, as llama-server's),
/// and are paused when a request ends: polling on after the last token kept a core busy for
/// ~0.1 s after every request (measured from the worker's CPU time), taken from whatever runs
/// next. The next decode resumes the pool.
struct Threadpool {
    pool: *mut llama_cpp_sys_2::ggml_threadpool,
    ctx: *mut llama_cpp_sys_2::llama_context,
}

impl Threadpool {
    /// Creates a pool of `threads` and attaches it to `ctx` (for single tokens and batches);
    /// `None` (ggml's per-decode pools then) if ggml could not create it.
    #[allow(unsafe_code)]
    fn attach(ctx: &LlamaContext<'_>, threads: i32) -> Option<Threadpool> {
        let raw = ctx.as_raw();
        // SAFETY: the params are plain data filled by ggml; ggml_threadpool_new returns a pool
        // we own (or null); attaching stores it in the live context `raw`, and `Drop` detaches
        // it before freeing it, while the context still lives (field order in `Worker`).
        unsafe {
            let mut params = llama_cpp_sys_2::ggml_threadpool_params_default(threads);
            params.paused = true;
            let pool = llama_cpp_sys_2::ggml_threadpool_new(&raw mut params);
            if pool.is_null() {
                eprintln!("kilnd worker: ggml could not create a threadpool of {threads}; decoding without one");
                return None;
            }
            llama_cpp_sys_2::llama_attach_threadpool(raw, pool, std::ptr::null_mut());
            Some(Threadpool { pool, ctx: raw })
        }
    }
}

impl Threadpool {
    /// Puts the pool's threads to sleep until the next decode (which resumes them).
    #[allow(unsafe_code)]
    fn pause(&self) {
        // SAFETY: `pool` is alive (freed only in Drop); ggml locks the pool's mutex itself.
        unsafe { llama_cpp_sys_2::ggml_threadpool_pause(self.pool) }
    }
}

impl Drop for Threadpool {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: see `attach`: the context is alive and holds this pool until detached here.
        unsafe {
            llama_cpp_sys_2::llama_detach_threadpool(self.ctx);
            llama_cpp_sys_2::ggml_threadpool_free(self.pool);
        }
    }
}

struct Worker<'m> {
    model: &'m LlamaModel,
    /// Declared before `ctx`, so it is detached and freed while the context still lives.
    pool: Option<Threadpool>,
    ctx: LlamaContext<'m>,
    args: &'m WorkerArgs,
    bos_text: String,
    /// Tokens one sequence may hold (the spec's context).
    n_ctx_seq: usize,
    /// Tokens one decode takes (prompt chunks and generated tokens together).
    n_batch: usize,
    slots: Vec<Slot>,
    out: Out,
}

/// One sequence of the context (llama.cpp's seq_id) and the generation running in it.
struct Slot {
    seq: i32,
    /// Tokens whose KV is in this sequence now: the next prompt sharing a prefix with them
    /// decodes only the rest (as llama-server does).
    cached: Vec<LlamaToken>,
    run: Option<Gen>,
}

/// A generation: its prompt decoded in chunks, then one token per step.
struct Gen {
    id: u64,
    tokens: Vec<LlamaToken>,
    /// The next position to decode: in the prompt until it is all in, then past it.
    pos: usize,
    /// The prompt is in the KV cache (`Started` was sent); tokens are being sampled.
    started: bool,
    /// Where the declared prefix ends, and the file its state is saved to once decoded.
    save_prefix: Option<(usize, PathBuf)>,
    reused: usize,
    prefix_restored: bool,
    prefix_saved: bool,
    picker: Picker,
    text: TextStream,
    max_tokens: usize,
    n_out: usize,
    /// The token sampled last, decoded in the next step.
    next: Option<LlamaToken>,
    /// Tokens of this generation in the batch being decoded.
    in_batch: usize,
    /// Where this generation's logits are in the batch just decoded.
    logits: Option<i32>,
    t0: Instant,
    t_prompt: Instant,
}

/// A Generate request not yet in a slot.
struct Pending {
    id: u64,
    prompt: String,
    prefix_bytes: Option<usize>,
    sampling: Sampling,
    prompt_tokens_limit: Option<u32>,
    t0: Instant,
}

impl Worker<'_> {
    fn tokenize(&self, text: &str) -> Vec<LlamaToken> {
        // A template that writes the BOS itself must not get a second one.
        let add_bos = self.bos_text.is_empty() || !text.starts_with(&self.bos_text);
        self.model.vocab().tokenize(text.as_bytes(), add_bos, true)
    }

    /// Serves requests until kilnd closes the socket: every step admits waiting requests
    /// into free sequences, applies cancels, and decodes one batch holding the next token of
    /// every generating sequence and as much of the waiting prompts as fits (continuous
    /// batching, as llama-server's slots).
    fn serve(&mut self, rx: &mpsc::Receiver<Request>) -> Result<()> {
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut batch = LlamaBatch::new(self.n_batch, i32::try_from(self.slots.len())?);
        let mut open = true;
        loop {
            if self.slots.iter().all(|s| s.run.is_none()) && pending.is_empty() {
                self.out.flush()?;
                if let Some(pool) = &self.pool {
                    pool.pause();
                }
                if !open {
                    return Ok(());
                }
                match rx.recv() {
                    Ok(req) => self.take(req, &mut pending)?,
                    Err(_) => return Ok(()),
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(req) => self.take(req, &mut pending)?,
                    Err(mpsc::TryRecvError::Empty) => break,
                    // kilnd is gone: what runs finishes (nobody reads it), then the worker exits.
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            while self.slots.iter().any(|s| s.run.is_none())
                && let Some(p) = pending.pop_front()
            {
                let id = p.id;
                if let Err(e) = self.start(p) {
                    self.fail(id, e)?;
                }
            }
            if self.slots.iter().any(|s| s.run.is_some()) {
                self.step(&mut batch)?;
            }
            self.out.flush()?;
        }
    }

    /// A request from kilnd: a generation waits for a slot; a cancel ends its generation.
    fn take(&mut self, req: Request, pending: &mut VecDeque<Pending>) -> Result<()> {
        match req {
            Request::Generate { id, prompt, prefix_bytes, sampling, prompt_tokens_limit } => {
                pending.push_back(Pending {
                    id,
                    prompt,
                    prefix_bytes,
                    sampling,
                    prompt_tokens_limit,
                    t0: Instant::now(),
                });
            }
            Request::Cancel { id } => {
                if let Some(si) = self.slots.iter().position(|s| s.run.as_ref().is_some_and(|g| g.id == id)) {
                    self.end(si, Finish::Cancelled)?;
                } else if let Some(at) = pending.iter().position(|p| p.id == id) {
                    pending.remove(at);
                    self.out.send(&Event::Done {
                        id,
                        finish: Finish::Cancelled,
                        prompt_tokens: 0,
                        completion_tokens: 0,
                        prompt_ms: 0.0,
                        generation_ms: 0.0,
                    })?;
                }
            }
            Request::Load => {}
        }
        Ok(())
    }

    /// Reports a generation that failed before or while it ran.
    fn fail(&mut self, id: u64, e: anyhow::Error) -> Result<()> {
        let (kind, message) = match e.downcast::<BadRequest>() {
            Ok(b) => (ErrorKind::BadRequest, b.0),
            Err(e) => (ErrorKind::Internal, format!("{e:#}")),
        };
        self.out.send(&Event::Error { id, kind, message })
    }

    /// Checks a request and puts it in the free slot that already holds most of its prompt:
    /// the KV shared with the slot's previous prompt, or the declared prefix restored from the
    /// prefix cache, is kept; the rest of the prompt is decoded by the steps.
    fn start(&mut self, p: Pending) -> Result<()> {
        let tokens = self.tokenize(&p.prompt);
        let n_ctx = self.n_ctx_seq;
        if let Some(limit) = p.prompt_tokens_limit
            && tokens.len() > limit as usize
        {
            return Err(BadRequest(format!(
                "the prompt is {} tokens; supervisor.prompt-tokens-limit allows {limit}",
                tokens.len()
            ))
            .into());
        }
        if tokens.len() >= n_ctx {
            return Err(BadRequest(format!(
                "the prompt is {} tokens; the model's context is {n_ctx} (lower the prompt or raise models[].context)",
                tokens.len()
            ))
            .into());
        }
        if tokens.is_empty() {
            return Err(BadRequest("the prompt is empty".into()).into());
        }
        let shared = |s: &Slot| s.cached.iter().zip(&tokens).take_while(|(a, b)| a == b).count();
        // The free slot holding most of the prompt; the first free one when none holds any.
        let si = (0..self.slots.len())
            .filter(|&i| self.slots[i].run.is_none())
            .max_by_key(|&i| (shared(&self.slots[i]), std::cmp::Reverse(i)))
            .context("no free slot")?;
        let seq = self.slots[si].seq;
        let mut common = shared(&self.slots[si]);
        if common == tokens.len() {
            common -= 1; // one token must be decoded to get logits
        }
        // The prefix cache: a declared prefix (the system turn) restored from disk, or saved.
        let mut prefix_restored = false;
        let mut save_prefix: Option<(usize, PathBuf)> = None;
        if let (Some(pb), Some(dir)) = (p.prefix_bytes, &self.args.prefix_dir)
            && let Some(ptext) = p.prompt.get(..pb)
        {
            let ptoks = self.tokenize(ptext);
            if ptoks.len() >= MIN_PREFIX_TOKENS && ptoks.len() < tokens.len() && tokens.starts_with(&ptoks) {
                let path = dir.join(format!("{}.kv", self.prefix_key(&ptoks)));
                if common < ptoks.len() && path.is_file() {
                    self.clear_seq(si);
                    // llama.cpp aborts on a truncated state file: only a file whose sha256
                    // matches the one recorded when it was saved is handed to it.
                    let verified = verify_saved(&path);
                    let loaded =
                        if verified { self.ctx.state_seq_load_file(&path, seq, ptoks.len() + 1).ok() } else { None };
                    match loaded {
                        Some((restored, _)) if restored == ptoks => {
                            common = ptoks.len();
                            self.slots[si].cached = ptoks.clone();
                            prefix_restored = true;
                            touch(&path);
                        }
                        _ => {
                            // A stale or damaged file: never used, dropped.
                            let _ = std::fs::remove_file(&path);
                            let _ = std::fs::remove_file(sum_path(&path));
                            self.clear_seq(si);
                            common = 0;
                        }
                    }
                }
                if !path.is_file() && ptoks.len() > common {
                    save_prefix = Some((ptoks.len(), path));
                }
            }
        }
        if self.ctx.kv_cache_seq_rm(seq, u32::try_from(common).ok(), None).is_err() {
            self.clear_seq(si);
            common = 0;
        }
        self.slots[si].cached.truncate(common);
        let s = &p.sampling;
        self.slots[si].run = Some(Gen {
            id: p.id,
            tokens,
            pos: common,
            started: false,
            save_prefix,
            reused: common,
            prefix_restored,
            prefix_saved: false,
            picker: Picker::new(s, self.model.vocab().n_tokens()),
            text: TextStream::new(&s.stop),
            max_tokens: s.max_tokens as usize,
            n_out: 0,
            next: None,
            in_batch: 0,
            logits: None,
            t0: p.t0,
            t_prompt: p.t0,
        });
        Ok(())
    }

    /// Empties slot `si`'s sequence in the KV cache.
    fn clear_seq(&mut self, si: usize) {
        let seq = u32::try_from(self.slots[si].seq).ok();
        if self.ctx.clear_kv_cache_seq(seq, None, None).is_err() {
            self.ctx.clear_kv_cache();
            for s in &mut self.slots {
                s.cached.clear();
            }
        }
        self.slots[si].cached.clear();
    }

    /// One decode: the last sampled token of every generating sequence, then prompt tokens
    /// (a prompt stops at its declared prefix, whose state is saved before the rest goes in);
    /// then each sequence whose logits came out samples its next token.
    fn step(&mut self, batch: &mut LlamaBatch) -> Result<()> {
        batch.clear();
        for slot in &mut self.slots {
            if let Some(g) = slot.run.as_mut()
                && let Some(tok) = g.next
            {
                g.logits = Some(batch.n_tokens());
                g.in_batch = 1;
                batch.add(tok, i32::try_from(g.pos)?, &[slot.seq], true)?;
            }
        }
        for slot in &mut self.slots {
            let room = self.n_batch.saturating_sub(batch.n_tokens() as usize);
            let Some(g) = slot.run.as_mut().filter(|g| !g.started) else { continue };
            if room == 0 {
                break;
            }
            let stop = match &g.save_prefix {
                Some((plen, _)) if *plen > g.pos => *plen,
                _ => g.tokens.len(),
            };
            let end = (g.pos + room).min(stop);
            for p in g.pos..end {
                batch.add(g.tokens[p], i32::try_from(p)?, &[slot.seq], p + 1 == g.tokens.len())?;
            }
            g.in_batch = end - g.pos;
            if end == g.tokens.len() {
                g.logits = Some(batch.n_tokens() - 1);
            }
        }
        if let Err(e) = self.ctx.decode(batch) {
            // Every sequence in this batch is in an unknown state: each gets the error and
            // its KV is dropped; the others go on.
            for si in 0..self.slots.len() {
                if let Some(g) = self.slots[si].run.as_ref().filter(|g| g.in_batch > 0) {
                    let id = g.id;
                    self.slots[si].run = None;
                    self.clear_seq(si);
                    self.fail(id, anyhow!("decoding: {e}"))?;
                }
            }
            return Ok(());
        }
        for si in 0..self.slots.len() {
            let slot = &mut self.slots[si];
            let Some(g) = slot.run.as_mut() else { continue };
            let n = std::mem::take(&mut g.in_batch);
            if n == 0 {
                continue;
            }
            if g.started {
                if let Some(tok) = g.next.take() {
                    slot.cached.push(tok);
                }
                g.pos += 1;
            } else {
                slot.cached.extend_from_slice(&g.tokens[g.pos..g.pos + n]);
                g.pos += n;
                let pos = g.pos;
                if let Some((plen, path)) = g.save_prefix.take_if(|(plen, _)| *plen == pos) {
                    let (seq, ptoks) = (slot.seq, slot.cached[..plen].to_vec());
                    let saved = self.save_prefix(&path, seq, &ptoks);
                    if let Some(g) = self.slots[si].run.as_mut() {
                        g.prefix_saved = saved;
                    }
                }
                let Some(g) = self.slots[si].run.as_mut() else { continue };
                if g.pos == g.tokens.len() {
                    g.started = true;
                    g.t_prompt = Instant::now();
                    let ev = Event::Started {
                        id: g.id,
                        prompt_tokens: u32::try_from(g.tokens.len())?,
                        reused_tokens: u32::try_from(g.reused)?,
                        prefix_restored: g.prefix_restored,
                        prefix_saved: g.prefix_saved,
                    };
                    self.out.send(&ev)?;
                }
            }
        }
        let model = self.model;
        let vocab = model.vocab();
        for si in 0..self.slots.len() {
            let Some(g) = self.slots[si].run.as_mut() else { continue };
            let Some(idx) = g.logits.take() else { continue };
            let tok = g.picker.pick(self.ctx.get_logits_ith(idx));
            if vocab.is_eog(tok) {
                self.end(si, Finish::Stop)?;
                continue;
            }
            g.n_out += 1;
            let piece = g.text.push(&vocab.token_to_piece(tok, false, None));
            if !piece.is_empty() {
                self.out.send(&Event::Token { id: g.id, text: piece })?;
            }
            let finish = if g.text.stopped() {
                Some(Finish::Stop)
            } else if g.n_out >= g.max_tokens || g.pos + 1 >= self.n_ctx_seq {
                Some(Finish::Length)
            } else {
                g.next = Some(tok);
                None
            };
            if let Some(f) = finish {
                self.end(si, f)?;
            }
        }
        Ok(())
    }

    /// Ends slot `si`'s generation: the text held back for a stop string, then `Done`.
    fn end(&mut self, si: usize, finish: Finish) -> Result<()> {
        let Some(mut g) = self.slots[si].run.take() else { return Ok(()) };
        let rest = g.text.finish();
        if !rest.is_empty() && finish != Finish::Cancelled {
            self.out.send(&Event::Token { id: g.id, text: rest })?;
        }
        self.out.send(&Event::Done {
            id: g.id,
            finish,
            prompt_tokens: u32::try_from(g.tokens.len())?,
            completion_tokens: u32::try_from(g.n_out)?,
            prompt_ms: g.t_prompt.duration_since(g.t0).as_secs_f64() * 1e3,
            generation_ms: if g.started { g.t_prompt.elapsed().as_secs_f64() * 1e3 } else { 0.0 },
        })
    }

    /// sha256 over everything that makes a saved state valid: model, engine build, context
    /// settings and the prefix tokens.
    fn prefix_key(&self, ptoks: &[LlamaToken]) -> String {
        let mut h = Sha256::new();
        h.update(self.args.sha256.as_bytes());
        h.update(engine_version().as_bytes());
        h.update(self.ctx.n_ctx().to_le_bytes());
        h.update(self.args.batch.to_le_bytes());
        for t in ptoks {
            h.update(t.0.to_le_bytes());
        }
        hex::encode(h.finalize())
    }

    /// Writes the sequence state under a temporary name and renames it: a reader never sees
    /// half a file.
    fn save_prefix(&self, path: &Path, seq: i32, ptoks: &[LlamaToken]) -> bool {
        let tmp = path.with_extension(format!("kv.{}.part", std::process::id()));
        let _ = std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")));
        match self.ctx.state_seq_save_file(&tmp, seq, ptoks) {
            // The checksum lands first: a .kv file without its .sum is never loaded.
            Ok(_) => match sha256_file(&tmp) {
                Ok(sum) => {
                    let sum_tmp = tmp.with_extension("sum.part");
                    let ok = std::fs::write(&sum_tmp, &sum).is_ok()
                        && std::fs::rename(&sum_tmp, sum_path(path)).is_ok()
                        && std::fs::rename(&tmp, path).is_ok();
                    if !ok {
                        let _ = std::fs::remove_file(&tmp);
                        let _ = std::fs::remove_file(&sum_tmp);
                    }
                    ok
                }
                Err(_) => {
                    let _ = std::fs::remove_file(&tmp);
                    false
                }
            },
            Err(e) => {
                eprintln!("kilnd worker: saving the prefix state: {e}");
                let _ = std::fs::remove_file(&tmp);
                false
            }
        }
    }
}

/// Where the sha256 of a saved prefix state is kept.
pub fn sum_path(kv: &Path) -> PathBuf {
    kv.with_extension("sum")
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Whether the state file matches the checksum recorded when it was saved.
fn verify_saved(kv: &Path) -> bool {
    match (std::fs::read_to_string(sum_path(kv)), sha256_file(kv)) {
        (Ok(want), Ok(got)) => want.trim() == got,
        _ => false,
    }
}

fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(path) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

/// (anonymous, file-backed) resident bytes of this process.
pub fn rss() -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else { return (0, 0) };
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("RssAnon:"), field("RssFile:"))
}
