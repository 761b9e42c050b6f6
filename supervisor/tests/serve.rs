//! `kilnd run` for real: the SmolLM2-135M GGUF served by llama.cpp workers behind the
//! OpenAI-compatible API. Caches, streaming, limits, a worker killed mid-request, a second
//! kilnd on the same port, tokens, the prefix cache across restarts, client disconnects,
//! queue overflow, /metrics as Prometheus text, and journald entries.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;

const SMOL_SHA: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A state dir with the model in its store and a spec; `supervisor` is extra YAML for the
/// spec's supervisor section.
fn device(state: &Path, supervisor: &str) -> PathBuf {
    let model = repo().join("examples/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "run scripts/fetch-model first");
    let store = state.join("var/lib/kiln/models");
    std::fs::create_dir_all(&store).unwrap();
    let dest = store.join(format!("{SMOL_SHA}.gguf"));
    if !dest.exists() {
        // A hard link when the file system allows: 98 MB per test otherwise.
        if std::fs::hard_link(&model, &dest).is_err() {
            std::fs::copy(&model, &dest).unwrap();
        }
    }
    let spec = format!(
        r#"api-version: kiln/v1
name: serve-test
hardware: {{ board: generic-x86_64, ram: 4GiB }}
system: {{ timezone: UTC }}
memory:
  tmpfs: {{ path: /var/cache/kiln/hot, size: 256MiB }}
models:
  - {{ id: smollm2-135m, sha256: {SMOL_SHA}, size: 98362432, context: 2048, threads: 2, pin: true }}
cache:
  responses: {{ memory: 1MiB, disk: 8MiB, ttl: 1h }}
  prefix: {{ size: 64MiB, ttl: 1d }}
supervisor:
  log-level: debug
{supervisor}
"#
    );
    let path = state.join("spec.yaml");
    std::fs::write(&path, spec).unwrap();
    path
}

/// A running kilnd; stopped (SIGTERM, then SIGKILL) when dropped.
struct Kilnd {
    child: Child,
    url: String,
    parent: String,
}

impl Kilnd {
    fn start(spec: &Path, state: &Path) -> Kilnd {
        Self::try_start(spec, state, "127.0.0.1:0").unwrap_or_else(|log| panic!("kilnd did not start:\n{log}"))
    }

    fn try_start(spec: &Path, state: &Path, listen: &str) -> Result<Kilnd, String> {
        Self::try_start_with(spec, state, listen, &[])
    }

    fn try_start_with(spec: &Path, state: &Path, listen: &str, env: &[(&str, &Path)]) -> Result<Kilnd, String> {
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let parent = format!("kiln-test-serve-{}-{n}", std::process::id());
        let mut child = Command::new(env!("CARGO_BIN_EXE_kilnd"))
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .arg("--spec")
            .arg(spec)
            .arg("--state-dir")
            .arg(state)
            .args(["run", "--listen", listen])
            // A cgroup parent per kilnd: one kilnd's clean-up must not remove the cgroups
            // another one is about to place a worker in.
            .env("KILND_CGROUP_PARENT", &parent)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(url) = line.strip_prefix("kilnd: listening on ") {
                        let _ = tx.send(url.to_owned());
                    }
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(url) => Ok(Kilnd { child, url, parent }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                Err(log.lock().unwrap().clone())
            }
        }
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into()
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value, ureq::http::HeaderMap) {
        let mut r = Self::agent().post(&format!("{}{path}", self.url)).send_json(body).unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.body_mut().read_to_string().unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)), headers)
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut r = Self::agent().get(&format!("{}{path}", self.url)).call().unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    }

    fn status(&self) -> Value {
        serde_json::from_str(&self.get("/status").1).unwrap()
    }

    fn worker(&self) -> Value {
        self.status()["models"][0]["worker"].clone()
    }
}

impl Drop for Kilnd {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !matches!(self.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.remove_parent();
    }
}

impl Kilnd {
    /// Removes the (by now empty) cgroup parent kilnd's clean-up leaves in each hierarchy.
    fn remove_parent(&self) {
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for e in rd.filter_map(Result::ok) {
                let _ = std::fs::remove_dir(e.path().join(&self.parent));
            }
        }
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(&self.parent));
    }
}

fn chat(content: &str, extra: Value) -> Value {
    let mut body =
        json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": content}], "max_tokens": 24});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The `data:` payloads of a server-sent event stream.
fn sse_events(text: &str) -> Vec<String> {
    text.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_owned).collect()
}

fn content_of(events: &[String]) -> String {
    events
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn chat_is_answered_cached_streamed_and_measured() {
    let journal = common::journald("chat_is_answered_cached_streamed_and_measured");
    let since = common::since();
    let tmp = tempfile::tempdir().unwrap();
    let spec = device(tmp.path(), "");
    let k = Kilnd::start(&spec, tmp.path());
    assert_eq!(k.get("/health"), (200, r#"{"status":"ok"}"#.to_owned()));

    let (_, models) = k.get("/v1/models");
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "smollm2-135m");

    // Temperature 0: the same text twice, the second from the response cache.
    let req = chat("Name three colours.", json!({"temperature": 0}));
    let (s1, a, h1) = k.post("/v1/chat/completions", &req);
    assert_eq!(s1, 200, "{a}");
    let text = a["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    assert!(!text.trim().is_empty());
    assert_eq!(a["object"], "chat.completion");
    assert_eq!(a["choices"][0]["message"]["role"], "assistant");
    assert!(a["usage"]["prompt_tokens"].as_u64().unwrap() > 5);
    assert!(a["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
    assert_eq!(h1["x-kiln-cache"], "miss");
    let (s2, b, h2) = k.post("/v1/chat/completions", &req);
    assert_eq!(s2, 200);
    assert_eq!(h2["x-kiln-cache"], "hit");
    assert_eq!(b["choices"][0]["message"]["content"], text.as_str());
    assert_eq!(b["usage"], a["usage"]);

    // Streaming: several chunks, then [DONE]; the text equals the non-streamed one at
    // temperature 0 (a different key: the stream flag is not part of it, so this is a hit
    // replayed as a stream).
    let mut stream_req = req.clone();
    stream_req["stream"] = json!(true);
    let (s3, body, h3) = k.post("/v1/chat/completions", &stream_req);
    assert_eq!(s3, 200);
    assert_eq!(h3["x-kiln-cache"], "hit");
    let events = sse_events(body.as_str().unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(events.len() > 3, "{events:?}");
    assert_eq!(content_of(&events), text);

    // A fresh streamed generation (sampling, not cached) also streams token by token.
    let fresh =
        chat("Write a short sentence about the sea.", json!({"stream": true, "temperature": 0.7, "max_tokens": 16}));
    let (s4, body, h4) = k.post("/v1/chat/completions", &fresh);
    assert_eq!(s4, 200);
    assert_eq!(h4["x-kiln-cache"], "miss");
    assert_eq!(h4["content-type"], "text/event-stream");
    let events = sse_events(body.as_str().unwrap());
    assert!(events.len() > 3 && events.last().unwrap() == "[DONE]", "{events:?}");
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(last["choices"][0]["finish_reason"].is_string());

    // Text completions.
    let (s5, c, _) =
        k.post("/v1/completions", &json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}));
    assert_eq!(s5, 200, "{c}");
    assert_eq!(c["object"], "text_completion");
    assert!(!c["choices"][0]["text"].as_str().unwrap().is_empty());

    // /metrics is Prometheus text with the counters of what just happened.
    let (sm, metrics) = k.get("/metrics");
    assert_eq!(sm, 200);
    let lines = metrics.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    assert_eq!(value("kilnd_cache_lookups_total", &[("cache", "response"), ("result", "hit")]), 2.0);
    assert_eq!(value("kilnd_requests_total", &[("endpoint", "/v1/chat/completions"), ("status", "200")]), 4.0);
    assert_eq!(value("kilnd_model_loads_total", &[("model", "smollm2-135m")]), 1.0);
    assert!(scrape.samples.iter().any(|s| s.metric == "kilnd_time_to_first_token_seconds_count"));
    assert!(scrape.samples.iter().any(|s| s.metric == "kilnd_decode_tokens_per_second_count"));

    // /status: the model is loaded by a worker, with its memory measured.
    let st = k.status();
    let m = &st["models"][0];
    assert_eq!(m["tier"], "loaded");
    assert_eq!(m["sha256"], SMOL_SHA);
    assert_eq!(m["worker"]["requests"], 3);
    assert!(m["worker"]["info"]["rss_file_bytes"].as_u64().unwrap() > 0);
    assert_eq!(st["response_cache"]["hits"], 2);

    // `kilnd status` joins the running kilnd's view and its journal.
    let out = Command::new(env!("CARGO_BIN_EXE_kilnd"))
        .arg("--spec")
        .arg(&spec)
        .arg("--state-dir")
        .arg(tmp.path())
        .args(["status", "--url", &k.url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("kilnd serving"), "{text}");
    assert!(
        text.contains("smollm2-135m")
            && text.contains("loaded")
            && text.contains("worker loaded (3 requests, 0 restarts)"),
        "{text}"
    );
    assert!(text.contains("response cache: 2 hits"), "{text}");
    if journal {
        assert!(text.contains("last events (journalctl SYSLOG_IDENTIFIER=kilnd):"), "{text}");
        let loaded = common::journal(kiln_supervisor::log::message_id::MODEL_LOADED, "smollm2-135m", &since);
        let e = loaded.last().expect("no MODEL_LOADED entry in the journal");
        assert_eq!(e["SYSLOG_IDENTIFIER"], "kilnd");
        assert_eq!(e["TIER"], "store");
        let served = common::journal(kiln_supervisor::log::message_id::REQUEST, "smollm2-135m", &since);
        assert!(served.iter().any(|e| e["TOKENS_PER_SECOND"].is_string()), "no REQUEST entry with tokens/s");
    }
}

#[test]
fn bad_requests_get_clear_openai_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = device(tmp.path(), "  limits: { body: 64KiB, prompt-tokens: 200, max-tokens: 256 }");
    let k = Kilnd::start(&spec, tmp.path());
    let error = |(status, body, _): (u16, Value, ureq::http::HeaderMap)| -> (u16, String, String) {
        (
            status,
            body["error"]["message"].as_str().unwrap_or_default().to_owned(),
            body["error"]["type"].as_str().unwrap_or_default().to_owned(),
        )
    };
    let (s, msg, kind) = error(k.post("/v1/chat/completions", &chat("hi", json!({"max_tokens": 5000}))));
    assert_eq!((s, kind.as_str()), (400, "invalid_request_error"));
    assert!(msg.contains("max_tokens is 5000; this kilnd allows at most 256"), "{msg}");

    let long = "word ".repeat(400);
    let (s, msg, _) = error(k.post("/v1/chat/completions", &chat(&long, json!({}))));
    assert_eq!(s, 400);
    assert!(msg.contains("supervisor.prompt-tokens-limit allows 200"), "{msg}");

    let huge = "x".repeat(100 * 1024);
    let (s, msg, _) = error(k.post("/v1/chat/completions", &chat(&huge, json!({}))));
    assert_eq!(s, 413);
    assert!(msg.contains("body-limit"), "{msg}");

    let (s, body, _) = k.post("/v1/chat/completions", &chat("hi", json!({"model": "gpt-4"})));
    assert_eq!(s, 404);
    assert_eq!(body["error"]["code"], "model_not_found");
    assert!(body["error"]["message"].as_str().unwrap().contains("this kilnd serves smollm2-135m"));

    let (s, msg, _) = error(k.post("/v1/chat/completions", &json!({"model": "smollm2-135m"})));
    assert_eq!(s, 400);
    assert!(msg.contains("missing field `messages`"), "{msg}");

    // The worker is fine after all that.
    let (s, _, _) = k.post("/v1/chat/completions", &chat("hi", json!({"max_tokens": 4})));
    assert_eq!(s, 200);
}

#[test]
fn a_killed_worker_fails_its_request_with_503_and_is_restarted() {
    let journal = common::journald("a_killed_worker_fails_its_request_with_503_and_is_restarted");
    let since = common::since();
    let tmp = tempfile::tempdir().unwrap();
    let spec = device(tmp.path(), "");
    let k = Kilnd::start(&spec, tmp.path());
    let (s, _, _) = k.post("/v1/completions", &json!({"prompt": "Hello", "max_tokens": 2}));
    assert_eq!(s, 200);
    let pid = k.worker()["pid"].as_u64().unwrap();
    let url = k.url.clone();
    let long = std::thread::spawn(move || {
        let mut r = Kilnd::agent()
            .post(&format!("{url}/v1/completions"))
            .send_json(json!({"prompt": "Once upon a time", "max_tokens": 1000, "temperature": 1.0, "seed": 7}))
            .unwrap();
        (r.status().as_u16(), r.headers().get("retry-after").is_some(), r.body_mut().read_to_string().unwrap())
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while k.worker()["busy"] != true {
        assert!(Instant::now() < deadline, "the request never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let (status, retry_after, body) = long.join().unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(retry_after);
    assert!(body.contains("exited during the request") && body.contains("signal: 9"), "{body}");
    let w = k.worker();
    assert_eq!(w["state"], "failed", "{w}");
    assert!(w["phase"].as_str().unwrap().starts_with("failed ("), "{w}");
    // The next request loads a new worker (the state machine's Retry, then a load).
    let (s, body, _) = k.post("/v1/completions", &json!({"prompt": "Hello", "max_tokens": 2}));
    assert_eq!(s, 200, "{body}");
    let w = k.worker();
    assert_eq!(w["restarts"], 1);
    assert_eq!(w["loads"], 2);
    assert_ne!(w["pid"].as_u64().unwrap(), pid);
    if journal {
        let e = common::journal(kiln_supervisor::log::message_id::WORKER_EXITED, "smollm2-135m", &since);
        assert!(!e.is_empty(), "no WORKER_EXITED entry");
    }
}

#[test]
fn a_second_kilnd_on_the_same_port_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = device(tmp.path(), "");
    let k = Kilnd::start(&spec, tmp.path());
    let addr = k.url.trim_start_matches("http://").to_owned();
    let second = Kilnd::try_start(&spec, tmp.path(), &addr);
    let log = second.err().expect("a second kilnd started on a taken port");
    assert!(log.contains(&format!("cannot listen on {addr}")) && log.contains("another kilnd"), "{log}");
    // The first one still serves.
    assert_eq!(k.get("/health").0, 200);
}

#[test]
fn a_token_is_required_when_configured_and_for_other_than_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    let no_token = device(tmp.path(), "");
    let log = Kilnd::try_start(&no_token, tmp.path(), "0.0.0.0:0").err().expect("served on 0.0.0.0 without a token");
    assert!(log.contains("refusing to listen on 0.0.0.0:0 without an API token"), "{log}");

    let token = tmp.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let spec = device(tmp.path(), &format!("  api-token-file: {}", token.display()));
    let k = Kilnd::start(&spec, tmp.path());
    let (s, body, _) = k.post("/v1/chat/completions", &chat("hi", json!({"max_tokens": 2})));
    assert_eq!(s, 401);
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let mut r = Kilnd::agent()
        .post(&format!("{}/v1/chat/completions", k.url))
        .header("authorization", "Bearer s3cret")
        .send_json(chat("hi", json!({"max_tokens": 2})))
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.body_mut().read_to_string().unwrap());
    assert_eq!(k.get("/health").0, 200, "health stays open for probes");
    assert_eq!(k.get("/metrics").0, 401);
}

/// ~1,000 tokens of system prompt.
fn long_system_prompt() -> String {
    let mut s = String::from("You are the assistant of a small bakery. Follow these house rules.\n");
    for i in 1..=60 {
        s.push_str(&format!(
            "Rule {i}: greet customers warmly, list today's bread number {i}, and never promise delivery.\n"
        ));
    }
    s
}

fn with_system(user: &str) -> Value {
    json!({"model": "smollm2-135m", "max_tokens": 4, "temperature": 0,
           "messages": [{"role": "system", "content": long_system_prompt()}, {"role": "user", "content": user}]})
}

#[test]
fn the_prefix_cache_restores_a_long_system_prompt_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = device(tmp.path(), "");
    let prefix_dir = tmp.path().join("var/cache/kiln/prefix");
    let kv_files = || -> Vec<PathBuf> {
        std::fs::read_dir(&prefix_dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "kv"))
                    .collect()
            })
            .unwrap_or_default()
    };
    {
        let k = Kilnd::start(&spec, tmp.path());
        let (s, body, h) = k.post("/v1/chat/completions", &with_system("Do you deliver?"));
        assert_eq!(s, 200, "{body}");
        assert_eq!(h["x-kiln-prefix-cache"], "miss");
        assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 900, "{body}");
        assert_eq!(kv_files().len(), 1, "the system prompt's state was not saved");
        // In the same worker the KV of the previous request is reused directly.
        let (_, _, h) = k.post("/v1/chat/completions", &with_system("Which bread today?"));
        assert!(h["x-kiln-reused-tokens"].to_str().unwrap().parse::<u32>().unwrap() > 900);
    }
    // A new kilnd (a new worker, empty KV): the prefix comes back from disk.
    let k = Kilnd::start(&spec, tmp.path());
    let (s, body, h) = k.post("/v1/chat/completions", &with_system("Are you open on Sunday?"));
    assert_eq!(s, 200, "{body}");
    assert_eq!(h["x-kiln-prefix-cache"], "hit");
    drop(k);
    // A damaged state file is never restored: dropped and saved again.
    let kv = kv_files().pop().unwrap();
    let len = std::fs::metadata(&kv).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&kv).unwrap().set_len(len / 2).unwrap();
    let k = Kilnd::start(&spec, tmp.path());
    let (s, body, h) = k.post("/v1/chat/completions", &with_system("Bye."));
    assert_eq!(s, 200, "{body}");
    assert_eq!(h["x-kiln-prefix-cache"], "miss");
    assert_eq!(std::fs::metadata(&kv).unwrap().len(), len);
}

#[test]
fn with_parallel_a_prefix_saved_from_one_sequence_is_restored_into_another() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = device_parallel(tmp.path(), 2);
    let prefix_dir = tmp.path().join("var/cache/kiln/prefix");
    let kv_files = || {
        std::fs::read_dir(&prefix_dir).map_or(0, |rd| {
            rd.filter_map(Result::ok).filter(|e| e.path().extension().is_some_and(|x| x == "kv")).count()
        })
    };
    {
        let k = Kilnd::start(&spec, tmp.path());
        // A long generation holds the first sequence: the system prompt goes to the second.
        let long = json!({"prompt": "1, 2, 3,", "max_tokens": 400, "temperature": 0, "stream": true});
        let mut a = Kilnd::agent().post(&format!("{}/v1/completions", k.url)).send_json(&long).unwrap();
        let mut a_reader = BufReader::new(a.body_mut().as_reader());
        first_text(&mut a_reader);
        let (s, body, h) = k.post("/v1/chat/completions", &with_system("Do you deliver?"));
        assert_eq!(s, 200, "{body}");
        assert_eq!(h["x-kiln-prefix-cache"], "miss");
        assert_eq!(kv_files(), 1, "the system prompt's state was not saved");
        // The next request with that system prompt goes to the sequence that holds it.
        let (s, body, h) = k.post("/v1/chat/completions", &with_system("Which bread today?"));
        assert_eq!(s, 200, "{body}");
        assert!(h["x-kiln-reused-tokens"].to_str().unwrap().parse::<u32>().unwrap() > 900, "{h:?}");
        assert_eq!(k.worker()["busy"], true, "the long generation still runs");
    }
    // A new worker: the state saved from the second sequence is restored into the first.
    let k = Kilnd::start(&spec, tmp.path());
    let (s, body, h) = k.post("/v1/chat/completions", &with_system("Are you open on Sunday?"));
    assert_eq!(s, 200, "{body}");
    assert_eq!(h["x-kiln-prefix-cache"], "hit");
    assert!(!body["choices"][0]["message"]["content"].as_str().unwrap().is_empty(), "{body}");
}

#[test]
fn a_client_that_disconnects_cancels_its_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = device(tmp.path(), "");
    let k = Kilnd::start(&spec, tmp.path());
    let mut r = Kilnd::agent()
        .post(&format!("{}/v1/completions", k.url))
        .send_json(
            json!({"prompt": "Once upon a time", "max_tokens": 1000, "temperature": 1.0, "seed": 3, "stream": true}),
        )
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut reader = r.body_mut().as_reader();
    let mut buf = [0u8; 512];
    let n = reader.read(&mut buf).unwrap();
    assert!(n > 0);
    drop(reader);
    drop(r);
    let deadline = Instant::now() + Duration::from_secs(10);
    while k.worker()["cancelled"] != 1 {
        assert!(Instant::now() < deadline, "the generation went on: {}", k.worker());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(k.worker()["busy"], false);
}

/// The spec of `device` with `parallel: n` on the model.
fn device_parallel(state: &Path, n: u32) -> PathBuf {
    let spec = device(state, "");
    let text = std::fs::read_to_string(&spec).unwrap().replace("pin: true }", &format!("pin: true, parallel: {n} }}"));
    std::fs::write(&spec, text).unwrap();
    spec
}

/// Reads SSE lines from `reader` until the first completion text arrives.
fn first_text(reader: &mut impl BufRead) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended before any text");
        if let Some(data) = line.trim().strip_prefix("data: ")
            && let Ok(v) = serde_json::from_str::<Value>(data)
            && let Some(t) = v["choices"][0]["text"].as_str()
            && !t.is_empty()
        {
            return t.to_owned();
        }
    }
}

#[test]
fn with_parallel_a_request_is_answered_while_another_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = device_parallel(tmp.path(), 2);
    let k = Kilnd::start(&spec, tmp.path());
    // Greedy counting goes on to max_tokens (no end of text): a long generation.
    let long = json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 400, "temperature": 0, "stream": true,
                      "stream_options": {"include_usage": true}});
    let mut a = Kilnd::agent().post(&format!("{}/v1/completions", k.url)).send_json(&long).unwrap();
    assert_eq!(a.status().as_u16(), 200);
    let mut a_reader = BufReader::new(a.body_mut().as_reader());
    assert!(!first_text(&mut a_reader).is_empty());
    // A second request while the first generates: with one sequence it would wait for all
    // 400 tokens of the first.
    let (status, b, _) =
        k.post("/v1/completions", &json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}));
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["usage"]["completion_tokens"], 8, "{b}");
    let w = k.worker();
    assert_eq!(w["busy"], true, "the first generation should still run: {w}");
    assert_eq!(w["inflight"], 1, "{w}");
    let mut rest = String::new();
    a_reader.read_to_string(&mut rest).unwrap();
    let usage = rest
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| v["usage"].is_object())
        .unwrap_or_else(|| panic!("no usage chunk in {rest}"));
    assert_eq!(usage["usage"]["completion_tokens"], 400, "{usage}");
    // Both sequences were decoded together; each got its own, whole answer.
    let (status, again, _) =
        k.post("/v1/completions", &json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}));
    assert_eq!(status, 200);
    assert_eq!(again["choices"][0]["text"], b["choices"][0]["text"], "a response-cache hit returns the same text");
    let w = k.worker();
    assert_eq!(
        (w["busy"].clone(), w["inflight"].clone(), w["requests"].clone()),
        (json!(false), json!(0), json!(2)),
        "{w}"
    );
}

#[test]
fn parallel_generations_each_get_their_own_text_and_cancels() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = device_parallel(tmp.path(), 3);
    let k = Kilnd::start(&spec, tmp.path());
    // The same greedy prompts one at a time, then three at once: every answer is its own
    // prompt's (events routed by request id), whichever sequence ran it.
    let prompts = ["1, 2, 3, 4, 5,", "Monday, Tuesday, Wednesday,", "a, b, c, d, e,"];
    // (12 and 13 tokens: different response-cache keys, so the second round is generated.)
    let body = |p: &str, n: u32| json!({"prompt": p, "max_tokens": n, "temperature": 0});
    let alone: Vec<Value> = prompts.iter().map(|p| k.post("/v1/completions", &body(p, 12)).1).collect();
    let together: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = prompts.iter().map(|p| s.spawn(|| k.post("/v1/completions", &body(p, 13)).1)).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(k.worker()["requests"], 6);
    for (a, t) in alone.iter().zip(&together) {
        assert_eq!(t["usage"]["completion_tokens"], 13, "{t}");
        // Batched and single decodes may differ in the last float bits; the first tokens of
        // a counting sequence do not.
        let (a, t) = (a["choices"][0]["text"].as_str().unwrap(), t["choices"][0]["text"].as_str().unwrap());
        assert_eq!(a.get(..6), t.get(..6), "{a:?} vs {t:?}");
    }
    // A client that leaves cancels its own generation only.
    let long = json!({"prompt": "1, 2, 3,", "max_tokens": 400, "temperature": 0, "stream": true});
    let mut keep = Kilnd::agent().post(&format!("{}/v1/completions", k.url)).send_json(&long).unwrap();
    let mut keep_reader = BufReader::new(keep.body_mut().as_reader());
    first_text(&mut keep_reader);
    let mut gone = Kilnd::agent().post(&format!("{}/v1/completions", k.url)).send_json(&long).unwrap();
    let mut gone_reader = BufReader::new(gone.body_mut().as_reader());
    first_text(&mut gone_reader);
    drop(gone_reader);
    drop(gone);
    let deadline = Instant::now() + Duration::from_secs(10);
    while k.worker()["cancelled"] != 1 {
        assert!(Instant::now() < deadline, "the generation went on: {}", k.worker());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(k.worker()["busy"], true, "the other generation goes on");
    let mut rest = String::new();
    keep_reader.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
    assert_eq!(k.worker()["cancelled"], 1);
}

#[test]
fn a_killed_worker_fails_every_request_in_flight_with_503() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = device_parallel(tmp.path(), 2);
    let k = Kilnd::start(&spec, tmp.path());
    let (s, _, _) = k.post("/v1/completions", &json!({"prompt": "Hello", "max_tokens": 2}));
    assert_eq!(s, 200);
    let pid = k.worker()["pid"].as_u64().unwrap();
    let long = |prompt: &'static str| {
        let url = k.url.clone();
        std::thread::spawn(move || {
            let mut r = Kilnd::agent()
                .post(&format!("{url}/v1/completions"))
                .send_json(json!({"prompt": prompt, "max_tokens": 400, "temperature": 0}))
                .unwrap();
            (r.status().as_u16(), r.headers().get("retry-after").is_some(), r.body_mut().read_to_string().unwrap())
        })
    };
    let (a, b) = (long("1, 2, 3, 4,"), long("10, 20, 30, 40,"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while k.worker()["inflight"] != 2 {
        assert!(Instant::now() < deadline, "the requests never both started: {}", k.worker());
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    for h in [a, b] {
        let (status, retry_after, body) = h.join().unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(retry_after && body.contains("exited during the request"), "{body}");
    }
    let w = k.worker();
    assert_eq!(
        (w["inflight"].clone(), w["busy"].clone(), w["restarts"].clone()),
        (json!(0), json!(false), json!(1)),
        "{w}"
    );
    let (s, body, _) = k.post("/v1/completions", &json!({"prompt": "Hello", "max_tokens": 2}));
    assert_eq!(s, 200, "{body}");
    assert_ne!(k.worker()["pid"].as_u64().unwrap(), pid);
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = device(tmp.path(), "  queue-depth: 1");
    let k = Kilnd::start(&spec, tmp.path());
    let handles: Vec<_> = (0..5)
        .map(|i| {
            let url = k.url.clone();
            std::thread::spawn(move || {
                let r = Kilnd::agent()
                    .post(&format!("{url}/v1/completions"))
                    .send_json(json!({"prompt": format!("Story {i}:"), "max_tokens": 48, "temperature": 0.9}))
                    .unwrap();
                (r.status().as_u16(), r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned()))
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let full: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert!(ok >= 1 && !full.is_empty() && ok + full.len() == 5, "{results:?}");
    assert!(full.iter().all(|r| r.1.as_deref() == Some("1")), "{results:?}");
}

fn meminfo(path: &Path, total_kib: u64, available_kib: u64) {
    let text = format!("MemTotal: {total_kib} kB\nMemFree: {available_kib} kB\nMemAvailable: {available_kib} kB\n");
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn memory_pressure_unloads_idle_workers_and_an_emergency_refuses_loads() {
    let journal = common::journald("memory_pressure_unloads_idle_workers_and_an_emergency_refuses_loads");
    let since = common::since();
    let tmp = tempfile::tempdir().unwrap();
    let spec = device(tmp.path(), "");
    let text = std::fs::read_to_string(&spec).unwrap().replace("pin: true", "pin: false");
    std::fs::write(&spec, text).unwrap();
    let mem = tmp.path().join("meminfo");
    let gib_kib = 1 << 20;
    meminfo(&mem, 4 * gib_kib, 3 * gib_kib);
    let k = Kilnd::try_start_with(&spec, tmp.path(), "127.0.0.1:0", &[("KILND_MEMINFO", &mem)]).unwrap();
    let ask = || k.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(ask().0, 200);
    assert_eq!(k.worker()["state"], "loaded");
    let wait_for = |what: &str, f: &dyn Fn(&Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let st = k.status();
            if f(&st) {
                return st;
            }
            assert!(Instant::now() < deadline, "{what}: {st}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    // 80% used: past the evict threshold (70%). The idle, unpinned worker goes.
    meminfo(&mem, 4 * gib_kib, 4 * gib_kib / 5);
    let st = wait_for("the idle worker was not unloaded", &|s| s["models"][0]["worker"]["state"] == "unloaded");
    assert_eq!(st["memory"]["pressure"], "Evict");
    assert_eq!(st["models"][0]["worker"]["unloads"], 1);
    // Loading is still allowed under Evict ...
    assert_eq!(ask().0, 200);
    // ... but not at the emergency threshold (95%): 503 with Retry-After, nothing loaded.
    meminfo(&mem, 4 * gib_kib, gib_kib / 50);
    wait_for("no emergency", &|s| {
        s["memory"]["pressure"] == "Emergency" && s["models"][0]["worker"]["state"] == "unloaded"
    });
    let mut r = Kilnd::agent()
        .post(&format!("{}/v1/completions", k.url))
        .send_json(json!({"prompt": "Hi again", "max_tokens": 2}))
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().get("retry-after").is_some());
    let body = r.body_mut().read_to_string().unwrap();
    assert!(body.contains("emergency threshold"), "{body}");
    if journal {
        let e = common::journal(kiln_supervisor::log::message_id::EVICTION, "smollm2-135m", &since);
        assert!(e.iter().any(|e| e["TIER"] == "loaded"), "no EVICTION entry for the loaded tier");
        let refused = common::journal(kiln_supervisor::log::message_id::LOAD_REFUSED, "smollm2-135m", &since);
        assert!(!refused.is_empty(), "no LOAD_REFUSED entry");
    }
}

#[test]
fn loading_a_model_unloads_an_idle_one_when_the_inference_cgroup_is_full() {
    let journal = common::journald("loading_a_model_unloads_an_idle_one_when_the_inference_cgroup_is_full");
    let since = common::since();
    let tmp = tempfile::tempdir().unwrap();
    let spec = device(tmp.path(), "");
    // Two models (the same weights under two names) and room for one: weights 94 MiB + KV
    // 45 MiB (from the store copy's header) + compute 64 MiB each, inference memory.max 300 MiB.
    let one =
        format!("{{ id: smollm2-135m, sha256: {SMOL_SHA}, size: 98362432, context: 2048, threads: 2, pin: true }}");
    let text = std::fs::read_to_string(&spec).unwrap().replace(
        &format!("  - {one}\n"),
        &format!(
            "  - {}\n  - {}\ncgroups:\n  inference: {{ memory-max: 300MiB }}\n",
            one.replace("smollm2-135m", "first").replace("pin: true", "pin: false"),
            one.replace("smollm2-135m", "second").replace("pin: true", "pin: false")
        ),
    );
    std::fs::write(&spec, text).unwrap();
    // Every kilnd has a cgroup parent of its own: the 300 MiB limit reaches no other test.
    let k = Kilnd::start(&spec, tmp.path());
    let ask = |model: &str| k.post("/v1/completions", &json!({"model": model, "prompt": "Hi", "max_tokens": 2}));
    let (s, body, _) = ask("first");
    assert_eq!(s, 200, "{body}");
    let (s, body, _) = ask("second");
    assert_eq!(s, 200, "{body}");
    let st = k.status();
    let worker = |id: &str| st["models"].as_array().unwrap().iter().find(|m| m["id"] == id).unwrap()["worker"].clone();
    assert_eq!(worker("first")["state"], "unloaded", "{st}");
    assert_eq!(worker("first")["unloads"], 1);
    assert_eq!(worker("second")["state"], "loaded", "{st}");
    assert_eq!(st["cgroups"]["inference"]["memory_max_bytes"], 300u64 << 20);
    if journal {
        let e = common::journal(kiln_supervisor::log::message_id::EVICTION, "first", &since);
        assert!(e.iter().any(|e| e["REASON"] == "making room for second"), "{e:?}");
    }
}

#[test]
fn an_idle_worker_is_unloaded_when_its_keep_alive_expires_and_reloaded_on_demand() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = device(tmp.path(), "");
    let text = std::fs::read_to_string(&spec).unwrap().replace("cache:\n", "cache:\n  keep-alive: 3s\n");
    std::fs::write(&spec, text).unwrap();
    let k = Kilnd::start(&spec, tmp.path());
    let ask = |p: &str| k.post("/v1/completions", &json!({"prompt": p, "max_tokens": 2, "temperature": 0.7}));
    assert_eq!(ask("Hi").0, 200);
    let w = k.worker();
    assert_eq!((w["state"].as_str(), w["loads"].as_u64()), (Some("loaded"), Some(1)), "{w}");
    assert!(w["phase"].as_str().unwrap().starts_with("loaded from the "), "{w}");
    // Requests keep it alive: the keep-alive counts from the end of the last one.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(ask("Hello").0, 200);
    }
    let w = k.worker();
    assert_eq!(
        (w["state"].as_str(), w["loads"].as_u64(), w["unloads"].as_u64()),
        (Some("loaded"), Some(1), Some(0)),
        "{w}"
    );
    let started = Instant::now();
    let w = loop {
        let w = k.worker();
        if w["state"] == "unloaded" {
            break w;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "still loaded 20s after a 3s keep-alive: {w}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(started.elapsed() >= Duration::from_secs(2), "unloaded before its keep-alive: {w}");
    assert_eq!(w["unloads"], 1, "{w}");
    assert!(matches!(w["phase"].as_str(), Some("stored" | "hot")), "the state machine's idle state: {w}");
    assert_eq!(ask("Hi").0, 200);
    let w = k.worker();
    assert_eq!((w["state"].as_str(), w["loads"].as_u64()), (Some("loaded"), Some(2)), "{w}");
}

#[test]
fn cache_statistics_are_logged_periodically() {
    let journal = common::journald("cache_statistics_are_logged_periodically");
    if !journal {
        return;
    }
    let since = common::since();
    let tmp = tempfile::tempdir().unwrap();
    let spec = device(tmp.path(), "");
    // KILND_STATS_INTERVAL_SECS=1 instead of every 5 minutes (kilnd checks every ~5 s).
    let k = Kilnd::try_start_with(&spec, tmp.path(), "127.0.0.1:0", &[("KILND_STATS_INTERVAL_SECS", Path::new("1"))])
        .unwrap();
    let body = json!({"prompt": "Hi", "max_tokens": 2, "temperature": 0});
    assert_eq!(k.post("/v1/completions", &body).0, 200);
    assert_eq!(k.post("/v1/completions", &body).0, 200);
    let address = k.url.trim_start_matches("http://").to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let entries = common::journal_matching(
            kiln_supervisor::log::message_id::CACHE_STATS,
            &format!("ADDRESS={address}"),
            &since,
        );
        if entries.iter().any(|e| e["HITS"] == "1" && e["MISSES"] == "1") {
            break;
        }
        assert!(Instant::now() < deadline, "no CACHE_STATS entry with 1 hit and 1 miss for {address}: {entries:?}");
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Writes `out`: `src` requantized to `ftype` by llama.cpp's own quantizer (the demo model
/// in the other quants a user may bring).
#[allow(unsafe_code)]
fn quantize(src: &Path, out: &Path, ftype: llama_cpp_sys_2::llama_ftype) {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let (inp, outp) = (c(src), c(out));
    // SAFETY: both paths are NUL-terminated strings that outlive the call; the parameters are
    // llama.cpp's defaults with plain value fields changed, their pointers left null.
    let rc = unsafe {
        let mut p = llama_cpp_sys_2::llama_model_quantize_default_params();
        p.ftype = ftype;
        p.allow_requantize = true;
        p.nthread = 2;
        llama_cpp_sys_2::llama_model_quantize(inp.as_ptr(), outp.as_ptr(), &p)
    };
    assert_eq!(rc, 0, "llama_model_quantize to ftype {ftype} failed");
}

/// A state dir whose store holds the demo model requantized to `ftype` (None: as it is),
/// with a spec serving it as `m`, plus `extra` spec YAML. Returns the spec and the file's size.
fn device_with_quant(state: &Path, ftype: Option<llama_cpp_sys_2::llama_ftype>, extra: &str) -> (PathBuf, u64) {
    use sha2::Digest;
    let src = repo().join("examples/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let store = state.join("var/lib/kiln/models");
    std::fs::create_dir_all(&store).unwrap();
    let file = state.join("model.gguf");
    match ftype {
        Some(f) => quantize(&src, &file, f),
        None => {
            std::fs::copy(&src, &file).unwrap();
        }
    }
    let bytes = std::fs::read(&file).unwrap();
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    std::fs::rename(&file, store.join(format!("{sha}.gguf"))).unwrap();
    let spec = state.join("spec.yaml");
    let size = bytes.len() as u64;
    std::fs::write(
        &spec,
        format!(
            "api-version: kiln/v1\nname: repack-test\nhardware: {{ board: generic-x86_64, ram: 4GiB }}\n\
             system: {{ timezone: UTC }}\nmodels:\n  - {{ id: m, sha256: {sha}, size: {size}, context: 2048, threads: 2 }}\n{extra}"
        ),
    )
    .unwrap();
    (spec, size)
}

/// llama.cpp's CPU backend repacks some quants (Q4_0, IQ4_NL on AVX2; more on the Pi 5's
/// A76) into anonymous memory at load, so their weights sit in RAM twice: once mapped, once
/// repacked. Measured here for four quants of the demo model, and admission counts it.
#[test]
fn repacked_weights_are_measured_and_counted_by_admission() {
    use llama_cpp_sys_2::{LLAMA_FTYPE_MOSTLY_IQ4_NL, LLAMA_FTYPE_MOSTLY_Q4_0, LLAMA_FTYPE_MOSTLY_Q8_0};
    let repack = kiln_spec::gguf::Repack::of_this_build();
    assert_eq!(repack, kiln_spec::gguf::Repack::X86Avx2, "kilnd is built for x86-64-v3 here (.cargo/config.toml)");
    let tmp = tempfile::tempdir().unwrap();
    let mut measured = Vec::new();
    for (name, ftype) in [
        ("Q4_1", None),
        ("Q4_0", Some(LLAMA_FTYPE_MOSTLY_Q4_0)),
        ("Q8_0", Some(LLAMA_FTYPE_MOSTLY_Q8_0)),
        ("IQ4_NL", Some(LLAMA_FTYPE_MOSTLY_IQ4_NL)),
    ] {
        let state = tmp.path().join(name);
        let (spec, size) = device_with_quant(&state, ftype, "");
        let k = Kilnd::start(&spec, &state);
        let (s, body, _) = k.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
        assert_eq!(s, 200, "{name}: {body}");
        let w = k.worker();
        let anon = w["info"]["rss_anon_bytes"].as_u64().unwrap();
        let f = &w["footprint"];
        let counted =
            ["kv_bytes", "repacked_bytes", "compute_bytes"].iter().map(|k| f[k].as_u64().unwrap()).sum::<u64>();
        println!("{name}: file {} MiB, anon {} MiB, counted {} MiB ({f})", size >> 20, anon >> 20, counted >> 20);
        assert_eq!(f["weights_bytes"], size);
        assert!(
            f["kv_bytes"].as_u64().unwrap() > 40 << 20,
            "{name}: the KV cache is read from the store's header: {f}"
        );
        assert!(anon <= counted, "{name}: anon {anon} is more than admission counts ({f})");
        measured.push((name, anon, f["repacked_bytes"].as_u64().unwrap()));
    }
    let base = measured[0].1;
    for (name, anon, repacked) in &measured {
        match *name {
            // Repacked: the extra anonymous memory is the repacked copy, and the estimate
            // from the header matches it within 10%.
            "Q4_0" | "IQ4_NL" => {
                assert!(*repacked > 40 << 20, "{name}: {repacked}");
                let extra = anon.saturating_sub(base);
                assert!(extra.abs_diff(*repacked) < repacked / 10, "{name}: extra anon {extra}, estimate {repacked}");
            }
            _ => {
                assert_eq!(*repacked, 0, "{name}");
                assert!(anon.abs_diff(base) < base / 10, "{name}: anon {anon} vs Q4_1's {base}");
            }
        }
    }

    // The repacked copy decides whether a model fits: Q4_0 needs ~196 MiB without it and
    // ~253 MiB with it; under a 230 MiB inference cgroup the load is refused, naming it.
    let state = tmp.path().join("tight");
    let (spec, _) =
        device_with_quant(&state, Some(LLAMA_FTYPE_MOSTLY_Q4_0), "cgroups:\n  inference: { memory-max: 230MiB }\n");
    let k = Kilnd::start(&spec, &state);
    let (s, body, _) = k.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(s, 503, "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("repacked weights") && msg.contains("memory.max is 230 MiB"), "{msg}");
    assert_eq!(k.worker()["loads"], 0);
}

/// The memory limit file of a model's worker cgroup (`memory.max` on v2,
/// `memory.limit_in_bytes` on v1), from the inference cgroup /status reports.
fn model_memory_limit(k: &Kilnd, model: &str) -> PathBuf {
    let st = k.status();
    let cg = &st["cgroups"];
    let dir = Path::new(cg["inference"]["path"].as_str().unwrap_or_else(|| panic!("no inference cgroup: {cg}")));
    let dir =
        if dir.is_absolute() { dir.join(model) } else { Path::new("/sys/fs/cgroup/memory").join(dir).join(model) };
    let file = if cg["version"] == "v2" { "memory.max" } else { "memory.limit_in_bytes" };
    let dir = if dir.join(file).exists() {
        dir
    } else {
        Path::new("/sys/fs/cgroup").join(dir.strip_prefix("/").unwrap_or(&dir))
    };
    dir.join(file)
}

/// A worker the kernel OOM-kills: its cgroup's limit is set below what loading takes, so
/// the load dies in the kernel's OOM killer. The request gets a 503 saying so (with the
/// cgroup's memory events), kilnd logs OOM_KILL, and once the limit is lifted the model
/// loads and serves. kilnd itself never goes down.
#[test]
fn a_worker_the_kernel_oom_kills_is_reported_and_loaded_again() {
    let journal = common::journald("a_worker_the_kernel_oom_kills_is_reported_and_loaded_again");
    let since = common::since();
    let tmp = tempfile::tempdir().unwrap();
    let spec = device(tmp.path(), "");
    let k = Kilnd::start(&spec, tmp.path());
    let limit = model_memory_limit(&k, "smollm2-135m");
    // The worker's anonymous memory alone reaches ~64 MiB (KV cache + compute buffers).
    std::fs::write(&limit, (32u64 << 20).to_string()).unwrap();
    let (s, body, headers) = k.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(s, 503, "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default().to_owned();
    assert!(msg.contains("OOM-killed") && msg.contains("oom_kill +1"), "{msg}");
    assert!(headers.get("retry-after").is_some());
    let w = k.worker();
    assert!(w["phase"].as_str().unwrap_or_default().contains("OOM-killed"), "{w}");
    // Lift the limit: after the backoff the model loads and answers.
    std::fs::write(&limit, if limit.ends_with("memory.max") { "max".to_string() } else { "-1".to_string() }).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let (s, body, _) = k.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(s, 200, "{body}");
    assert_eq!(k.worker()["state"], "loaded");
    if journal {
        let e = common::journal(kiln_supervisor::log::message_id::OOM_KILL, "smollm2-135m", &since);
        assert!(!e.is_empty(), "no OOM_KILL entry");
    }
}

/// A worker that dies while idle is noticed at once (not by the next request, which is
/// served by a fresh worker instead of failing).
#[test]
fn a_worker_that_dies_while_idle_is_noticed_and_the_next_request_is_served() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = device(tmp.path(), "");
    let k = Kilnd::start(&spec, tmp.path());
    let ask = || k.post("/v1/completions", &json!({"prompt": "Hello", "max_tokens": 2}));
    assert_eq!(ask().0, 200);
    let pid = k.worker()["pid"].as_i64().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let w = loop {
        let w = k.worker();
        if w["restarts"] == 1 {
            break w;
        }
        assert!(Instant::now() < deadline, "the idle worker's death went unnoticed: {w}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(w["phase"].as_str().unwrap_or_default().starts_with("failed"), "{w}");
    assert!(w["pid"].is_null(), "{w}");
    let (s, body, _) = ask();
    assert_eq!(s, 200, "{body}");
    let w = k.worker();
    assert_eq!((w["state"].as_str(), w["loads"].as_u64(), w["failures"].as_u64()), (Some("loaded"), Some(2), Some(0)));
}

/// The worker decodes with one persistent threadpool (no thread created per token, as ggml
/// does without one) and puts it to sleep when a request ends (no core kept polling).
#[test]
fn the_worker_keeps_one_threadpool_and_sleeps_it_between_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = device(tmp.path(), "");
    let k = Kilnd::start(&spec, tmp.path());
    let ask = |n: u32| k.post("/v1/completions", &json!({"prompt": "Once upon a time", "max_tokens": n}));
    assert_eq!(ask(4).0, 200);
    let pid = k.worker()["pid"].as_i64().unwrap();
    let tids = || -> std::collections::BTreeSet<String> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let cpu_seconds = || -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // After the command's ')': state, ppid, ... ; utime and stime (fields 14 and 15 of
        // proc_pid_stat(5)) are the 12th and 13th, in clock ticks (USER_HZ, 100 on Linux).
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        let ticks = |i: usize| fields[i].parse::<u64>().unwrap();
        (ticks(11) + ticks(12)) as f64 / 100.0
    };
    let before = tids();
    // Threads seen while 96 tokens are generated (~1 s): a per-decode pool would show new ones.
    let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
                    seen.lock().unwrap().extend(rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let (status, body, _) = ask(96);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(status, 200, "{body}");
    });
    let seen = seen.into_inner().unwrap();
    assert!(seen.is_subset(&before), "threads came and went during decoding: {:?}", seen.difference(&before));
    assert_eq!(tids(), before);
    // Asleep after the request: the worker uses (next to) no CPU while idle.
    std::thread::sleep(Duration::from_millis(20));
    let t0 = cpu_seconds();
    std::thread::sleep(Duration::from_millis(500));
    let used = cpu_seconds() - t0;
    assert!(used <= 0.02, "the idle worker used {used} s of CPU in 0.5 s");
    // And the next request wakes it.
    assert_eq!(ask(8).0, 200);
}

/// Streaming tokens wakes no worker thread but the decoding ones: the thread that reads
/// requests sleeps through the generation. (With one socket for requests and events, each
/// event kilnd read woke it: ~1 context switch per token, on a core the decode threads use.)
#[test]
fn streaming_tokens_does_not_wake_the_workers_request_thread() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = device(tmp.path(), "");
    let k = Kilnd::start(&spec, tmp.path());
    // Greedy counting runs to max_tokens (and is never answered from the response cache: each
    // prompt differs).
    let ask = |prompt: &str, n: u32| {
        k.post("/v1/completions", &json!({"prompt": prompt, "max_tokens": n, "stream": true, "temperature": 0}))
    };
    assert_eq!(ask("1, 2,", 4).0, 200);
    let pid = k.worker()["pid"].as_i64().unwrap();
    let reader = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|t| {
            std::fs::read_to_string(t.join("comm")).unwrap().trim() == kiln_supervisor::worker::child::REQUEST_THREAD
        })
        .expect("the worker names its request thread");
    let switches = || -> u64 {
        let status = std::fs::read_to_string(reader.join("status")).unwrap();
        status.lines().find_map(|l| l.strip_prefix("voluntary_ctxt_switches:")).unwrap().trim().parse().unwrap()
    };
    let before = switches();
    let (status, body, _) = ask("1, 2, 3,", 96);
    assert_eq!(status, 200, "{body}");
    let tokens = sse_events(body.as_str().unwrap()).len();
    assert!(tokens > 48, "only {tokens} events streamed");
    // One wake-up for the request itself (and one spare); not one per token.
    let woken = switches() - before;
    assert!(woken <= 3, "the request thread woke {woken} times while {tokens} events streamed");
}

/// A process holding `bytes` of anonymous memory, in a cgroup of its own beside kilnd's:
/// `tail` keeps the whole newline-free "last line" of `head -c N /dev/zero` in memory.
struct Hog {
    child: Child,
    cgroup: PathBuf,
}

impl Hog {
    fn start(bytes: u64) -> Hog {
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let root = if v1.is_dir() { v1 } else { Path::new("/sys/fs/cgroup") };
        let cgroup = root.join(format!("kiln-test-hog-{}", std::process::id()));
        std::fs::create_dir_all(&cgroup).unwrap();
        let child = Command::new("sh")
            .arg("-c")
            // The sleep keeps the pipe open: tail never sees its end, so it holds on.
            .arg(format!(
                "echo $$ > '{}/cgroup.procs' && (head -c {bytes} /dev/zero; exec sleep 3600) | tail",
                cgroup.display()
            ))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Hog { child, cgroup }
    }

    /// Bytes the hog's cgroup holds now.
    fn usage(&self) -> u64 {
        ["memory.usage_in_bytes", "memory.current"]
            .iter()
            .find_map(|f| std::fs::read_to_string(self.cgroup.join(f)).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // `tail` outlives the shell it was piped from: kill what is left in the cgroup.
        for _ in 0..50 {
            let procs = std::fs::read_to_string(self.cgroup.join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() {
                break;
            }
            for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// A real memory hog in a sibling cgroup pushes the machine past the evict threshold:
/// kilnd (reading the live /proc/meminfo) demotes the unpinned model from the hot tier and
/// unloads its idle worker, keeps the pinned one hot and loaded, and logs each eviction.
/// The thresholds are set a few points above this machine's use at the start of the test.
#[test]
fn a_memory_hog_in_a_sibling_cgroup_evicts_unpinned_models_and_keeps_pinned() {
    let journal = common::journald("a_memory_hog_in_a_sibling_cgroup_evicts_unpinned_models_and_keeps_pinned");
    let since = common::since();
    let reading = kiln_supervisor::engine::read_memory().unwrap();
    let used = reading.used_pct().ceil() as u64;
    let (warn, evict) = (used + 5, used + 10);
    let emergency = (used + 45).min(99);
    assert!(emergency > evict + 15, "the machine is too full for this test: {used}% used");
    let tmp = tempfile::tempdir().unwrap();
    let spec = device(tmp.path(), "");
    // The unpinned model: the demo model as Q8_0 (other bytes, another hash).
    let spare = tmp.path().join("spare.gguf");
    quantize(
        &repo().join("examples/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        &spare,
        llama_cpp_sys_2::LLAMA_FTYPE_MOSTLY_Q8_0,
    );
    let bytes = std::fs::read(&spare).unwrap();
    let spare_sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    std::fs::rename(&spare, tmp.path().join(format!("var/lib/kiln/models/{spare_sha}.gguf"))).unwrap();
    let text = std::fs::read_to_string(&spec).unwrap().replace("size: 256MiB", "size: 512MiB").replace(
        "cache:\n",
        &format!(
            "  - {{ id: spare, sha256: {spare_sha}, size: {}, context: 2048, threads: 2 }}\ncache:\n  \
                 thresholds: {{ warn: {warn}%, evict: {evict}%, emergency: {emergency}% }}\n  \
                 prewarm: {{ at-boot: true, models: [smollm2-135m, spare] }}\n",
            bytes.len()
        ),
    );
    std::fs::write(&spec, text).unwrap();
    let k = Kilnd::start(&spec, tmp.path());
    let model = |st: &Value, id: &str| st["models"].as_array().unwrap().iter().find(|m| m["id"] == id).unwrap().clone();
    let wait_for = |what: &str, secs: u64, f: &dyn Fn(&Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let st = k.status();
            if f(&st) {
                return st;
            }
            assert!(Instant::now() < deadline, "{what}: {st}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    // The prewarm's copies reach each model's state machine too (Promoted).
    wait_for("the at-boot prewarm", 60, &|st| {
        ["smollm2-135m", "spare"]
            .iter()
            .all(|id| model(st, id)["hot"] == true && model(st, id)["worker"]["phase"] == "hot")
    });
    for id in ["smollm2-135m", "spare"] {
        let (s, body, _) = k.post("/v1/completions", &json!({"model": id, "prompt": "Hi", "max_tokens": 2}));
        assert_eq!(s, 200, "{id}: {body}");
    }
    let st = k.status();
    assert_eq!(st["memory"]["pressure"], "Normal", "{st}");
    assert_eq!(
        (model(&st, "smollm2-135m")["state"].as_str(), model(&st, "spare")["state"].as_str()),
        (Some("loaded"), Some("loaded"))
    );

    // Past evict by 8 points of RAM, below emergency.
    let total = reading.total_bytes;
    let hog = Hog::start((evict + 8 - used) * total / 100);
    let st = wait_for("the hog did not bring the evict level", 60, &|st| st["memory"]["pressure"] == "Evict");
    let st = if model(&st, "spare")["state"] == "loaded" || model(&st, "spare")["hot"] == true {
        wait_for("the unpinned model was not evicted", 20, &|st| {
            let spare = model(st, "spare");
            spare["state"] == "unloaded" && spare["hot"] == false && spare["worker"]["phase"] == "stored"
        })
    } else {
        st
    };
    println!("hog holds {} MiB; used {}%", hog.usage() >> 20, st["memory"]["used_percent"]);
    let pinned = model(&st, "smollm2-135m");
    assert_eq!((pinned["hot"].as_bool(), pinned["state"].as_str()), (Some(true), Some("loaded")), "{st}");
    assert_eq!(pinned["worker"]["phase"], "loaded from the hot tier");
    assert_eq!(model(&st, "spare")["worker"]["unloads"], 1);
    drop(hog);
    // Back under evict (less its hysteresis margin) once the hog is gone.
    wait_for("the pressure did not ease once the hog left", 60, &|st| st["memory"]["pressure"] != "Evict");
    if journal {
        // This kilnd's entries only: other tests' kilnds evict their own models meanwhile.
        let pid = format!("_PID={}", k.child.id());
        let e = common::journal_matching(kiln_supervisor::log::message_id::EVICTION, &pid, &since);
        let of = |id: &str| e.iter().filter(|e| e["MODEL"] == id).collect::<Vec<_>>();
        assert!(
            of("spare").iter().any(|e| e["TIER"] == "hot" && e["REASON"] == "Evict"),
            "no hot-tier EVICTION: {e:?}"
        );
        assert!(of("spare").iter().any(|e| e["TIER"] == "loaded"), "no loaded-tier EVICTION: {e:?}");
        assert!(of("smollm2-135m").is_empty(), "the pinned model was evicted: {e:?}");
        // And each step of the spare model's state machine.
        let t = common::journal_matching(kiln_supervisor::log::message_id::TRANSITION, &pid, &since);
        let spare: Vec<&str> =
            t.iter().filter(|e| e["MODEL"] == "spare").filter_map(|e| e["REASON"].as_str()).collect();
        for step in ["`promoted`", "`load-started`", "`load-finished`", "`unload-started`", "`unloaded`", "`demoted`"] {
            assert!(spare.contains(&step), "no {step} TRANSITION for spare: {spare:?}");
        }
    }
}
