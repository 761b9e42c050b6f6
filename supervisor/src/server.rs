//! The HTTP API (axum): OpenAI-compatible chat and text completions with streaming, the
//! response cache in front of the workers, `/v1/models`, `/health`, `/status`, `/metrics`.
//! Errors use OpenAI's error JSON shape.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use kiln_spec::Spec;
use kiln_spec::model::Model;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::chat::Message;
use crate::engine::Engine;
use crate::log::message_id;
use crate::metrics::Metrics;
use crate::respcache::{Cached, ResponseCache};
use crate::worker::child::engine_version;
use crate::worker::host::{Failure, Input, Job, ModelWorker, Reply, now_secs};
use crate::worker::{Finish, Sampling};

/// Shared by every handler.
#[derive(Debug)]
pub struct AppState {
    pub spec: Spec,
    pub workers: HashMap<String, ModelWorker>,
    /// The GGUF's chat template per model (read from its header at start), for cache keys.
    pub templates: HashMap<String, Option<String>>,
    pub cache: ResponseCache,
    pub metrics: Arc<Metrics>,
    pub token: Option<String>,
    pub engine: Arc<Mutex<Engine>>,
    /// Requests being generated now: prewarm copies yield while it is above zero.
    pub inflight: Arc<AtomicUsize>,
    pub started: Instant,
    pub cgroups: Value,
}

type St = State<Arc<AppState>>;

/// An OpenAI-shaped error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: u16, message: impl Into<String>) -> ApiError {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let kind = match status.as_u16() {
            401 => "authentication_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        ApiError { status, message: message.into(), kind, code: None, param: None, retry_after: None }
    }
    fn code(mut self, code: &'static str, param: Option<&'static str>) -> Self {
        self.code = Some(code);
        self.param = param;
        self
    }
    fn from_failure(f: Failure) -> ApiError {
        let mut e = ApiError::new(f.status, f.message);
        e.retry_after = f.retry_after_secs;
        e
    }
    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let limit = usize::try_from(state.spec.supervisor.body_limit_bytes).unwrap_or(usize::MAX);
    let api = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .merge(api)
        .fallback(|| async { ApiError::new(404, "no such endpoint; kilnd serves /v1/chat/completions, /v1/completions, /v1/models, /health, /status, /metrics") })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn auth(State(st): St, req: axum::extract::Request, next: Next) -> Response {
    if let Some(token) = &st.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Constant time in the token's length.
        let same =
            given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0;
        if !same {
            st.metrics.request(req.uri().path(), 401);
            return ApiError::new(401, "missing or wrong API token: send `Authorization: Bearer <token>` (the token is in the spec's supervisor.api-token-file)")
                .code("invalid_api_key", None)
                .into_response();
        }
    }
    next.run(req).await
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
    Null(()),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The parameters both endpoints share.
#[derive(Debug, Deserialize)]
struct Params {
    model: Option<String>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    seed: Option<i64>,
    stop: Option<OneOrMany>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    params: Params,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: OneOrMany,
    #[serde(flatten)]
    params: Params,
}

fn parse<T: for<'de> Deserialize<'de>>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        let status = e.status().as_u16();
        ApiError::new(status, format!("the request body could not be read: {e} (supervisor.body-limit caps its size)"))
    })?;
    serde_json::from_slice(&body).map_err(|e| ApiError::new(400, format!("the request body is not valid: {e}")))
}

/// What one request resolved to: its model, sampling and cache key.
struct Prepared {
    model: Model,
    sampling: Sampling,
    stream: bool,
    include_usage: bool,
    key: Option<String>,
}

fn prepare(st: &AppState, p: Params, what: &str, input_json: &Value) -> Result<Prepared, ApiError> {
    let names = || st.spec.models.iter().map(|m| m.id.as_str()).collect::<Vec<_>>().join(", ");
    let model = match &p.model {
        Some(id) => st.spec.models.iter().find(|m| &m.id == id).cloned().ok_or_else(|| {
            ApiError::new(404, format!("the model `{id}` does not exist; this kilnd serves {}", names()))
                .code("model_not_found", Some("model"))
        })?,
        None if st.spec.models.len() == 1 => st.spec.models[0].clone(),
        None => {
            return Err(ApiError::new(400, format!("`model` is required; one of {}", names()))
                .code("missing_model", Some("model")));
        }
    };
    let limit = st.spec.supervisor.max_tokens_limit;
    let max_tokens = p.max_completion_tokens.or(p.max_tokens).or(model.sampling.max_tokens).unwrap_or(limit.min(512));
    if max_tokens > limit {
        return Err(ApiError::new(
            400,
            format!("max_tokens is {max_tokens}; this kilnd allows at most {limit} (supervisor.max-tokens-limit)"),
        )
        .code("max_tokens_too_large", Some("max_tokens")));
    }
    if max_tokens == 0 {
        return Err(ApiError::new(400, "max_tokens must be at least 1").code("invalid_value", Some("max_tokens")));
    }
    let d = &model.sampling;
    #[allow(clippy::cast_possible_truncation)]
    let f = |x: Option<f64>| x.map(|v| v as f32);
    let temperature = p.temperature.or(f(d.temperature)).unwrap_or(0.8);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::new(400, format!("temperature {temperature} is outside 0..2"))
            .code("invalid_value", Some("temperature")));
    }
    let top_p = p.top_p.or(f(d.top_p)).unwrap_or(0.95);
    if !(0.0..=1.0).contains(&top_p) {
        return Err(ApiError::new(400, format!("top_p {top_p} is outside 0..1")).code("invalid_value", Some("top_p")));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let seed = p.seed.map(|s| s as u64 as u32).or(d.seed.map(|s| s as u32));
    let stop = p.stop.map(OneOrMany::into_vec).unwrap_or_default();
    if stop.len() > 4 {
        return Err(ApiError::new(400, "at most 4 stop sequences").code("invalid_value", Some("stop")));
    }
    let sampling = Sampling {
        max_tokens,
        temperature,
        top_p,
        top_k: p.top_k.or(d.top_k).unwrap_or(40),
        min_p: p.min_p.or(f(d.min_p)).unwrap_or(0.05),
        repeat_penalty: p.repeat_penalty.or(f(d.repeat_penalty)).unwrap_or(1.0),
        seed: if temperature > 0.0 { seed } else { None },
        stop,
    };
    // Deterministic requests only: greedy, or a fixed seed.
    let deterministic = sampling.temperature <= 0.0 || sampling.seed.is_some();
    let key = deterministic.then(|| {
        let template = model.chat_template.clone().or_else(|| st.templates.get(&model.id).cloned().flatten());
        let mut h = Sha256::new();
        for part in [
            engine_version(),
            model.sha256.clone(),
            what.to_owned(),
            template.unwrap_or_default(),
            input_json.to_string(),
            serde_json::to_string(&sampling).unwrap_or_default(),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        hex::encode(h.finalize())
    });
    Ok(Prepared {
        model,
        sampling,
        stream: p.stream,
        include_usage: p.stream_options.is_some_and(|o| o.include_usage),
        key,
    })
}

async fn chat(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let req: ChatRequest = parse(body)?;
        if req.messages.is_empty() {
            return Err(ApiError::new(400, "messages is empty").code("invalid_value", Some("messages")));
        }
        let mut messages = Vec::new();
        for (i, m) in req.messages.into_iter().enumerate() {
            let content = match m.content {
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut t = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(s)) => t.push_str(&s),
                            (kind, _) => return Err(ApiError::new(
                                400,
                                format!(
                                    "messages[{i}]: content part `{kind}` is not supported; kilnd serves text models"
                                ),
                            )
                            .code("invalid_value", Some("messages"))),
                        }
                    }
                    t
                }
                Some(Content::Null(())) | None => String::new(),
            };
            messages.push(Message { role: m.role, content });
        }
        let input_json = serde_json::to_value(&messages).unwrap_or_default();
        let prep = prepare(&st, req.params, "chat", &input_json)?;
        let input = Input::Chat { messages, template_override: prep.model.chat_template.clone() };
        Ok(generate(&st, prep, input, Kind::Chat).await)
    }
    .await;
    finish(&st, "/v1/chat/completions", r)
}

async fn completions(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let req: CompletionRequest = parse(body)?;
        let prompts = req.prompt.into_vec();
        if prompts.len() != 1 {
            return Err(ApiError::new(400, "send one prompt per request").code("invalid_value", Some("prompt")));
        }
        let prompt = prompts.into_iter().next().unwrap_or_default();
        let prep = prepare(&st, req.params, "text", &Value::String(prompt.clone()))?;
        Ok(generate(&st, prep, Input::Text(prompt), Kind::Text).await)
    }
    .await;
    finish(&st, "/v1/completions", r)
}

fn finish(st: &AppState, endpoint: &str, r: Result<Response, ApiError>) -> Response {
    let resp = r.unwrap_or_else(IntoResponse::into_response);
    st.metrics.request(endpoint, resp.status().as_u16());
    resp
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

fn completion_id() -> String {
    let n = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("cmpl-{n:x}")
}

fn usage(prompt: u32, completion: u32) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The final chunk of a stream asked for with `stream_options.include_usage`.
fn usage_chunk(id: &str, model: &str, usage: Value) -> Value {
    json!({"id": id, "object": "chat.completion.chunk", "model": model, "choices": [], "usage": usage})
}

fn full_body(kind: Kind, id: &str, model: &str, text: &str, finish: &str, usage_v: Value) -> Value {
    match kind {
        Kind::Chat => json!({
            "id": id, "object": "chat.completion", "created": now_secs(), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": usage_v,
        }),
        Kind::Text => json!({
            "id": id, "object": "text_completion", "created": now_secs(), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": null}],
            "usage": usage_v,
        }),
    }
}

fn chunk(kind: Kind, id: &str, model: &str, text: Option<&str>, finish: Option<&str>, first: bool) -> Value {
    match kind {
        Kind::Chat => {
            let mut delta = json!({});
            if first {
                delta["role"] = json!("assistant");
            }
            if let Some(t) = text {
                delta["content"] = json!(t);
            }
            json!({"id": id, "object": "chat.completion.chunk", "created": now_secs(), "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        }
        Kind::Text => json!({"id": id, "object": "text_completion", "created": now_secs(), "model": model,
                              "choices": [{"index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": null}]}),
    }
}

fn with_cache_header(mut r: Response, hit: bool) -> Response {
    r.headers_mut().insert("x-kiln-cache", HeaderValue::from_static(if hit { "hit" } else { "miss" }));
    r
}

fn with_headers(mut r: Response, headers: &[(&'static str, String)]) -> Response {
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(value) {
            r.headers_mut().insert(*name, v);
        }
    }
    r
}

fn sse(events: Vec<Value>) -> Vec<Result<SseEvent, Infallible>> {
    let mut out: Vec<Result<SseEvent, Infallible>> =
        events.into_iter().map(|v| Ok(SseEvent::default().data(v.to_string()))).collect();
    out.push(Ok(SseEvent::default().data("[DONE]")));
    out
}

async fn generate(st: &Arc<AppState>, prep: Prepared, input: Input, kind: Kind) -> Response {
    let t0 = Instant::now();
    let id = completion_id();
    let model_id = prep.model.id.clone();
    if let Ok(mut e) = st.engine.lock() {
        e.record_request(&model_id);
    }
    // A hit: no worker involved, replayed as the client asked.
    if let Some(key) = &prep.key {
        let hit = st.cache.get(key);
        st.metrics.cache("response", hit.is_some());
        if let Some((c, tier)) = hit {
            tracing::debug!(message_id = message_id::REQUEST, model = %model_id, cache = ?tier, "served {model_id} from the response cache");
            let u = usage(c.prompt_tokens, c.completion_tokens);
            if prep.stream {
                let mut events = Vec::new();
                for (i, p) in c.pieces.iter().enumerate() {
                    events.push(chunk(kind, &id, &model_id, Some(p), None, i == 0));
                }
                events.push(chunk(kind, &id, &model_id, None, Some(&c.finish_reason), c.pieces.is_empty()));
                if prep.include_usage {
                    events.push(usage_chunk(&id, &model_id, u));
                }
                let stream = futures::stream::iter(sse(events));
                return with_cache_header(Sse::new(stream).into_response(), true);
            }
            return with_cache_header(
                Json(full_body(kind, &id, &model_id, &c.text(), &c.finish_reason, u)).into_response(),
                true,
            );
        }
    }
    let Some(worker) = st.workers.get(&model_id) else {
        return ApiError::new(500, format!("no worker for {model_id}")).into_response();
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let job = Job {
        input,
        sampling: prep.sampling.clone(),
        prompt_tokens_limit: st.spec.supervisor.prompt_tokens_limit,
        reply: tx,
        queued_at: Instant::now(),
    };
    if let Err(f) = worker.submit(job) {
        return ApiError::from_failure(f).into_response();
    }
    let guard = Inflight::new(st.inflight.clone());
    // Wait for the start (or the failure) before choosing the response's status.
    let mut prompt_headers = Vec::new();
    let first = match rx.recv().await {
        Some(Reply::Started { reused_tokens, prefix_restored, .. }) => {
            prompt_headers.push(("x-kiln-reused-tokens", reused_tokens.to_string()));
            prompt_headers.push(("x-kiln-prefix-cache", if prefix_restored { "hit" } else { "miss" }.to_owned()));
            None
        }
        Some(Reply::Failed(f)) => return ApiError::from_failure(f).into_response(),
        Some(other) => Some(other),
        None => return worker_gone(&model_id).into_response(),
    };
    let record = Recorder {
        st: st.clone(),
        model: model_id.clone(),
        key: prep.key.clone(),
        t0,
        first_token: None,
        pieces: Vec::new(),
    };
    if prep.stream {
        let stream = stream_events(rx, first, record, kind, id, prep.include_usage, guard);
        return with_headers(with_cache_header(Sse::new(stream).into_response(), false), &prompt_headers);
    }
    let mut record = record;
    let mut next = first;
    loop {
        let Some(reply) = next_reply(&mut next, &mut rx).await else {
            return worker_gone(&model_id).into_response();
        };
        match reply {
            Reply::Token(t) => record.token(t),
            Reply::Done { finish, prompt_tokens, completion_tokens, generation_ms, .. } => {
                let reason = finish.as_openai();
                record.done(finish, prompt_tokens, completion_tokens, generation_ms);
                drop(guard);
                let text = record.pieces.concat();
                let body =
                    Json(full_body(kind, &id, &model_id, &text, reason, usage(prompt_tokens, completion_tokens)));
                return with_headers(with_cache_header(body.into_response(), false), &prompt_headers);
            }
            Reply::Failed(f) => return ApiError::from_failure(f).into_response(),
            Reply::Started { .. } => {}
        }
    }
}

/// The reply held back while the response was chosen, else the next one from the worker's
/// task; None when the task dropped the job.
async fn next_reply(held: &mut Option<Reply>, rx: &mut mpsc::UnboundedReceiver<Reply>) -> Option<Reply> {
    match held.take() {
        Some(r) => Some(r),
        None => rx.recv().await,
    }
}

fn worker_gone(model: &str) -> ApiError {
    ApiError::new(503, format!("the worker for {model} went away; retry"))
}

/// Counts a request as in flight while it lives.
struct Inflight(Arc<AtomicUsize>);

impl Inflight {
    fn new(c: Arc<AtomicUsize>) -> Self {
        c.fetch_add(1, Ordering::SeqCst);
        Inflight(c)
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Collects what a generation produced: metrics, the debug log line, the cache entry.
struct Recorder {
    st: Arc<AppState>,
    model: String,
    key: Option<String>,
    t0: Instant,
    first_token: Option<Duration>,
    pieces: Vec<String>,
}

impl Recorder {
    fn token(&mut self, t: String) {
        if self.first_token.is_none() {
            let ttft = self.t0.elapsed();
            self.first_token = Some(ttft);
            self.st.metrics.ttft.get_or_create(&Metrics::model(&self.model)).observe(ttft.as_secs_f64());
        }
        self.pieces.push(t);
    }

    fn done(&mut self, finish: Finish, prompt_tokens: u32, completion_tokens: u32, generation_ms: f64) {
        let reason = finish.as_openai();
        let complete = finish != Finish::Cancelled;
        let tps = if generation_ms > 0.0 { f64::from(completion_tokens) / (generation_ms / 1e3) } else { 0.0 };
        if completion_tokens > 1 {
            self.st.metrics.tokens_per_second.get_or_create(&Metrics::model(&self.model)).observe(tps);
        }
        let ttft_ms = self.first_token.map_or(0.0, |d| d.as_secs_f64() * 1e3);
        tracing::debug!(
            message_id = message_id::REQUEST,
            model = %self.model,
            prompt_tokens,
            completion_tokens,
            ttft_ms,
            tokens_per_second = tps,
            "served {}: {prompt_tokens} prompt + {completion_tokens} tokens, first token after {ttft_ms:.0} ms, {tps:.1} tokens/s",
            self.model
        );
        if complete && let Some(key) = &self.key {
            let entry = Cached {
                pieces: self.pieces.clone(),
                finish_reason: reason.to_owned(),
                prompt_tokens,
                completion_tokens,
                created: now_secs(),
            };
            if let Err(e) = self.st.cache.put(key, entry) {
                tracing::warn!("response cache: {e:#}");
            }
        }
    }
}

fn stream_events(
    rx: mpsc::UnboundedReceiver<Reply>,
    first: Option<Reply>,
    record: Recorder,
    kind: Kind,
    id: String,
    include_usage: bool,
    guard: Inflight,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    // The body stream reads the worker's replies itself (no task in between, so a token
    // wakes one task less on its way out); when the client leaves, hyper drops the stream
    // and with it `rx`, which cancels the generation.
    let state =
        Streaming { rx, next: first, record, kind, id, include_usage, sent_first: false, over: false, _guard: guard };
    let batches = futures::stream::unfold(state, |mut st| async move {
        if st.over {
            return None;
        }
        let events = st.events().await;
        Some((futures::stream::iter(events.into_iter().map(Ok)), st))
    });
    futures::StreamExt::flatten(batches)
}

/// What a streaming response carries between the worker's replies.
struct Streaming {
    rx: mpsc::UnboundedReceiver<Reply>,
    next: Option<Reply>,
    record: Recorder,
    kind: Kind,
    id: String,
    include_usage: bool,
    sent_first: bool,
    over: bool,
    _guard: Inflight,
}

impl Streaming {
    /// The server-sent events for the next reply (none for `Started`).
    async fn events(&mut self) -> Vec<SseEvent> {
        let model = self.record.model.clone();
        let Some(reply) = next_reply(&mut self.next, &mut self.rx).await else {
            self.over = true;
            return vec![SseEvent::default().data(worker_gone(&model).body().to_string())];
        };
        match reply {
            Reply::Token(t) => {
                let ev = chunk(self.kind, &self.id, &model, Some(&t), None, !self.sent_first);
                self.sent_first = true;
                self.record.token(t);
                vec![SseEvent::default().data(ev.to_string())]
            }
            Reply::Done { finish, prompt_tokens, completion_tokens, generation_ms, .. } => {
                self.over = true;
                let reason = finish.as_openai();
                let mut out = vec![
                    SseEvent::default()
                        .data(chunk(self.kind, &self.id, &model, None, Some(reason), !self.sent_first).to_string()),
                ];
                if self.include_usage {
                    let u = usage_chunk(&self.id, &model, usage(prompt_tokens, completion_tokens));
                    out.push(SseEvent::default().data(u.to_string()));
                }
                out.push(SseEvent::default().data("[DONE]"));
                self.record.done(finish, prompt_tokens, completion_tokens, generation_ms);
                out
            }
            Reply::Failed(f) => {
                self.over = true;
                vec![SseEvent::default().data(ApiError::from_failure(f).body().to_string())]
            }
            Reply::Started { .. } => Vec::new(),
        }
    }
}

async fn models(State(st): St) -> Response {
    let data: Vec<Value> = st
        .spec
        .models
        .iter()
        .map(|m| json!({"id": m.id, "object": "model", "created": 0, "owned_by": "kiln", "sha256": m.sha256}))
        .collect();
    st.metrics.request("/v1/models", 200);
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn status(State(st): St) -> Response {
    st.metrics.request("/status", 200);
    Json(status_json(&st)).into_response()
}

/// The JSON of `/status` (and of `kilnd status` when kilnd runs).
pub fn status_json(st: &AppState) -> Value {
    let reading = crate::engine::read_memory().ok();
    let engine = st.engine.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let s = engine.status(reading);
    let generation = crate::generations::running(&engine.paths.state);
    drop(engine);
    let models: Vec<Value> = s
        .models
        .iter()
        .map(|m| {
            let rt = st.workers.get(&m.id).map(|w| w.lock().clone()).unwrap_or_default();
            let tier = if rt.state == "loaded" {
                "loaded"
            } else if m.hot {
                "hot"
            } else if m.stored {
                "stored"
            } else {
                "missing"
            };
            json!({
                "id": m.id, "sha256": m.sha256, "bytes": m.bytes, "pinned": m.pinned,
                "tier": tier, "state": rt.state, "stored": m.stored, "hot": m.hot,
                "resident_bytes": m.resident_bytes, "worker": rt,
            })
        })
        .collect();
    let (cache_mem, cache_disk) = st.cache.sizes();
    let lookups = st.metrics.encode();
    let count = |cache: &str, result: &str| -> u64 {
        let prefix = format!("kilnd_cache_lookups_total{{cache=\"{cache}\",result=\"{result}\"}} ");
        lookups.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    };
    json!({
        "name": s.name,
        "generation": generation,
        "uptime_secs": st.started.elapsed().as_secs(),
        "engine": engine_version(),
        "models": models,
        "memory": {
            "pressure": s.pressure,
            "used_percent": s.memory_used_percent,
            "total_bytes": reading.map(|r| r.total_bytes),
            "available_bytes": reading.map(|r| r.available_bytes),
        },
        "cgroups": st.cgroups,
        "hot_tier": {"used_bytes": s.hot_used_bytes, "budget_bytes": s.hot_budget_bytes},
        "response_cache": {
            "memory_bytes": cache_mem, "disk_bytes": cache_disk,
            "hits": count("response", "hit"), "misses": count("response", "miss"),
        },
        "prewarm": {"window_open": s.prewarm_window_open, "next_change": s.prewarm_next_change},
        "inflight": st.inflight.load(Ordering::SeqCst),
    })
}

async fn metrics(State(st): St, _h: HeaderMap) -> Response {
    st.metrics.request("/metrics", 200);
    let mut r = st.metrics.encode().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}
