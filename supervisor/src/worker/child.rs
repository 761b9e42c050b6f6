//! The worker process: loads one GGUF with llama.cpp (memory-mapped), then serves
//! generations one at a time over the socket on its stdin. It reuses the KV cache of the
//! previous request for a shared token prefix (as llama-server does), and saves/restores the
//! KV state of a declared prompt prefix (a chat's system turn) in the prefix cache on disk.

use std::io::{BufRead, BufReader, Write};
use std::num::NonZeroU32;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use sha2::{Digest, Sha256};

use super::text::TextStream;
use super::{ErrorKind, Event, Finish, ModelInfo, Request, Sampling};

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
    pub prefix_dir: Option<PathBuf>,
}

struct Out(UnixStream);

impl Out {
    fn send(&mut self, ev: &Event) -> Result<()> {
        let mut line = serde_json::to_vec(ev).context("encoding an event")?;
        line.push(b'\n');
        self.0.write_all(&line).context("writing to kilnd")
    }
}

/// Runs the worker until kilnd closes the socket. It dies with kilnd (PR_SET_PDEATHSIG).
pub fn run(args: &WorkerArgs) -> Result<()> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).context("PR_SET_PDEATHSIG")?;
    let fd = std::io::stdin().as_fd().try_clone_to_owned().context("taking the socket on stdin")?;
    let sock = UnixStream::from(fd);
    let mut out = Out(sock.try_clone().context("cloning the socket")?);
    // A reader thread, so that a Cancel arrives while a generation runs.
    let cancel = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel::<Request>();
    {
        let cancel = cancel.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(sock).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Request>(&line) {
                    Ok(Request::Cancel { id }) => cancel.store(id, Ordering::SeqCst),
                    Ok(req) => {
                        if tx.send(req).is_err() {
                            break;
                        }
                    }
                    Err(e) => eprintln!("kilnd worker: bad request line: {e}"),
                }
            }
        });
    }
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
            out.send(&Event::LoadFailed { message: message.clone() })?;
            return Err(anyhow!(message));
        }
    };
    let threads = i32::try_from(args.threads.max(1)).unwrap_or(1);
    let ctx_params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(args.context))
        .with_n_batch(args.batch)
        .with_n_ubatch(args.batch)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let ctx = match model.new_context(&backend, ctx_params) {
        Ok(c) => c,
        Err(e) => {
            let message = format!("llama.cpp could not create a context of {} tokens: {e}", args.context);
            out.send(&Event::LoadFailed { message: message.clone() })?;
            return Err(anyhow!(message));
        }
    };
    let vocab = model.vocab();
    let piece = |t: LlamaToken| String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned();
    let (anon, file) = rss();
    let info = ModelInfo {
        chat_template: model.meta_val_str("tokenizer.chat_template").ok(),
        bos_token: piece(vocab.bos()),
        eos_token: piece(vocab.eos()),
        n_ctx: ctx.n_ctx(),
        n_ctx_train: model.n_ctx_train(),
        load_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        rss_anon_bytes: anon,
        rss_file_bytes: file,
    };
    let bos_text = info.bos_token.clone();
    let pool = Threadpool::attach(&ctx, threads);
    out.send(&Event::Loaded(info))?;
    let mut w = Worker { model: &model, pool, ctx, cached: Vec::new(), args, bos_text };
    while let Ok(req) = rx.recv() {
        if let Request::Generate { id, prompt, prefix_bytes, sampling, prompt_tokens_limit } = req {
            let generated = w.generate(&mut out, &cancel, id, &prompt, prefix_bytes, &sampling, prompt_tokens_limit);
            if let Some(pool) = &w.pool {
                pool.pause();
            }
            if let Err(e) = generated {
                let (kind, message) = match e.downcast::<BadRequest>() {
                    Ok(b) => (ErrorKind::BadRequest, b.0),
                    Err(e) => (ErrorKind::Internal, format!("{e:#}")),
                };
                out.send(&Event::Error { id, kind, message })?;
            }
        }
    }
    Ok(())
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
    /// Tokens whose KV is in sequence 0 now.
    cached: Vec<LlamaToken>,
    args: &'m WorkerArgs,
    bos_text: String,
}

impl Worker<'_> {
    fn tokenize(&self, text: &str) -> Vec<LlamaToken> {
        // A template that writes the BOS itself must not get a second one.
        let add_bos = self.bos_text.is_empty() || !text.starts_with(&self.bos_text);
        self.model.vocab().tokenize(text.as_bytes(), add_bos, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn generate(
        &mut self,
        out: &mut Out,
        cancel: &AtomicU64,
        id: u64,
        prompt: &str,
        prefix_bytes: Option<usize>,
        s: &Sampling,
        prompt_tokens_limit: Option<u32>,
    ) -> Result<()> {
        let t0 = Instant::now();
        let tokens = self.tokenize(prompt);
        let n_ctx = self.ctx.n_ctx() as usize;
        if let Some(limit) = prompt_tokens_limit
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
        let mut common = self.cached.iter().zip(&tokens).take_while(|(a, b)| a == b).count();
        if common == tokens.len() {
            common -= 1; // one token must be decoded to get logits
        }
        // The prefix cache: a declared prefix (the system turn) restored from disk, or saved.
        let mut prefix_restored = false;
        let mut save_prefix: Option<(usize, PathBuf)> = None;
        if let (Some(pb), Some(dir)) = (prefix_bytes, &self.args.prefix_dir)
            && let Some(ptext) = prompt.get(..pb)
        {
            let ptoks = self.tokenize(ptext);
            if ptoks.len() >= MIN_PREFIX_TOKENS && ptoks.len() < tokens.len() && tokens.starts_with(&ptoks) {
                let path = dir.join(format!("{}.kv", self.prefix_key(&ptoks)));
                if common < ptoks.len() && path.is_file() {
                    self.ctx.clear_kv_cache();
                    self.cached.clear();
                    // llama.cpp aborts on a truncated state file: only a file whose sha256
                    // matches the one recorded when it was saved is handed to it.
                    let verified = verify_saved(&path);
                    let loaded =
                        if verified { self.ctx.state_seq_load_file(&path, 0, ptoks.len() + 1).ok() } else { None };
                    match loaded {
                        Some((restored, _)) if restored == ptoks => {
                            common = ptoks.len();
                            self.cached = ptoks.clone();
                            prefix_restored = true;
                            touch(&path);
                        }
                        _ => {
                            // A stale or damaged file: never used, dropped.
                            let _ = std::fs::remove_file(&path);
                            let _ = std::fs::remove_file(sum_path(&path));
                            self.ctx.clear_kv_cache();
                            common = 0;
                        }
                    }
                }
                if !path.is_file() {
                    save_prefix = Some((ptoks.len(), path));
                }
            }
        }
        if self.ctx.kv_cache_seq_rm(0, u32::try_from(common).ok(), None).is_err() {
            self.ctx.clear_kv_cache();
            common = 0;
        }
        self.cached.truncate(common);
        let reused = common;
        let mut prefix_saved = false;
        let batch_cap = (self.args.batch as usize).max(1);
        let mut batch = LlamaBatch::new(batch_cap, 1);
        let mut pos = common;
        // Decode up to the prefix end first when it is to be saved, then the rest.
        let mut stops = Vec::new();
        if let Some((plen, _)) = &save_prefix
            && *plen > pos
        {
            stops.push(*plen);
        }
        stops.push(tokens.len());
        for end in stops {
            while pos < end {
                let chunk_end = (pos + batch_cap).min(end);
                batch.clear();
                for (i, tok) in tokens[pos..chunk_end].iter().enumerate() {
                    let p = pos + i;
                    batch.add(*tok, i32::try_from(p)?, &[0], p + 1 == tokens.len())?;
                }
                self.ctx.decode(&mut batch).context("decoding the prompt")?;
                self.cached.extend_from_slice(&tokens[pos..chunk_end]);
                pos = chunk_end;
                if cancel.load(Ordering::SeqCst) == id {
                    return self.finish(out, id, Finish::Cancelled, tokens.len(), 0, t0, t0);
                }
            }
            if let Some((plen, path)) = &save_prefix
                && pos == *plen
            {
                prefix_saved = self.save_prefix(path, &tokens[..*plen]);
            }
        }
        out.send(&Event::Started {
            id,
            prompt_tokens: u32::try_from(tokens.len())?,
            reused_tokens: u32::try_from(reused)?,
            prefix_restored,
            prefix_saved,
        })?;
        let t_prompt = Instant::now();
        let mut sampler = sampler(s, self.model.vocab().n_tokens());
        let mut text = TextStream::new(&s.stop);
        let mut idx = batch.n_tokens() - 1;
        let mut n_out = 0usize;
        let vocab = self.model.vocab();
        let finish = loop {
            if cancel.load(Ordering::SeqCst) == id {
                break Finish::Cancelled;
            }
            let tok = sampler.sample(&self.ctx, idx);
            if vocab.is_eog(tok) {
                break Finish::Stop;
            }
            n_out += 1;
            let piece = text.push(&vocab.token_to_piece(tok, false, None));
            if !piece.is_empty() {
                out.send(&Event::Token { id, text: piece })?;
            }
            if text.stopped() {
                break Finish::Stop;
            }
            if n_out >= s.max_tokens as usize || pos + 1 >= self.ctx.n_ctx() as usize {
                break Finish::Length;
            }
            batch.clear();
            batch.add(tok, i32::try_from(pos)?, &[0], true)?;
            self.ctx.decode(&mut batch).context("decoding")?;
            self.cached.push(tok);
            pos += 1;
            idx = 0;
        };
        let rest = text.finish();
        if !rest.is_empty() && finish != Finish::Cancelled {
            out.send(&Event::Token { id, text: rest })?;
        }
        self.finish(out, id, finish, tokens.len(), n_out, t0, t_prompt)
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        out: &mut Out,
        id: u64,
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
        t0: Instant,
        t_prompt: Instant,
    ) -> Result<()> {
        out.send(&Event::Done {
            id,
            finish,
            prompt_tokens: u32::try_from(prompt_tokens)?,
            completion_tokens: u32::try_from(completion_tokens)?,
            prompt_ms: t_prompt.duration_since(t0).as_secs_f64() * 1e3,
            generation_ms: t_prompt.elapsed().as_secs_f64() * 1e3,
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
    fn save_prefix(&self, path: &Path, ptoks: &[LlamaToken]) -> bool {
        let tmp = path.with_extension(format!("kv.{}.part", std::process::id()));
        let _ = std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")));
        match self.ctx.state_seq_save_file(&tmp, 0, ptoks) {
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

fn sampler(s: &Sampling, n_vocab: i32) -> LlamaSampler {
    let mut chain = Vec::new();
    if s.repeat_penalty > 0.0 && (s.repeat_penalty - 1.0).abs() > f32::EPSILON {
        chain.push(LlamaSampler::penalties(n_vocab, 64, s.repeat_penalty, 0.0, 0.0));
    }
    if s.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if s.top_k > 0 {
            chain.push(LlamaSampler::top_k(i32::try_from(s.top_k).unwrap_or(i32::MAX)));
        }
        if s.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(s.top_p, 1));
        }
        if s.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(s.min_p, 1));
        }
        chain.push(LlamaSampler::temp(s.temperature));
        chain.push(LlamaSampler::dist(s.seed.unwrap_or_else(rand_seed)));
    }
    LlamaSampler::chain_simple(chain)
}

fn rand_seed() -> u32 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos());
    nanos.unwrap_or(0) ^ std::process::id()
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
