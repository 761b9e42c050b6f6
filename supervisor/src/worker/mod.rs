//! Inference workers: one process per loaded model (`kilnd worker`, hidden), placed in the
//! model's cgroup before it loads anything, talking to kilnd over two Unix socket pairs, one
//! each way (requests on its stdin, events on its stdout). The protocol is one JSON object per
//! line each way.
//!
//! kilnd → worker: [`Request`]. worker → kilnd: [`Event`]. A worker runs up to the model's
//! `parallel` generations at once, decoded together; kilnd sends that many, queues the rest
//! (bounded), routes events by request id, and sends `Cancel` when a client goes away.

pub mod child;
pub mod host;
mod pick;
pub mod text;

use serde::{Deserialize, Serialize};

/// What a generation may do; every field takes part in the response cache key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub max_tokens: u32,
    /// 0 (or less) samples greedily.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 turns top-k off.
    pub top_k: u32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    /// Fixed seed; `None` draws one.
    pub seed: Option<u32>,
    pub stop: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Sent once kilnd has placed the worker in its cgroup: load the weights now.
    Load,
    Generate {
        id: u64,
        prompt: String,
        /// Bytes of `prompt` that are a reusable prefix (a chat's system turn): its KV state
        /// is saved to, and restored from, the prefix cache.
        prefix_bytes: Option<usize>,
        sampling: Sampling,
        /// Refuse prompts longer than this many tokens (the spec's limit).
        prompt_tokens_limit: Option<u32>,
    },
    Cancel {
        id: u64,
    },
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// End of generation token or a stop string.
    Stop,
    /// max_tokens or the context ran out.
    Length,
    /// kilnd asked (the client went away).
    Cancelled,
}

impl Finish {
    /// OpenAI's `finish_reason`.
    pub fn as_openai(self) -> &'static str {
        match self {
            Finish::Stop | Finish::Cancelled => "stop",
            Finish::Length => "length",
        }
    }
}

/// What a worker knows about its model once loaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// `tokenizer.chat_template` from the GGUF.
    pub chat_template: Option<String>,
    pub bos_token: String,
    pub eos_token: String,
    pub n_ctx: u32,
    pub n_ctx_train: u32,
    pub load_ms: u64,
    /// The worker's memory after loading, from /proc/self/status and smaps_rollup: anonymous
    /// bytes (what llama.cpp allocated, including any repacked copy of the weights) and
    /// file-backed bytes (the mapped GGUF).
    pub rss_anon_bytes: u64,
    pub rss_file_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request cannot succeed as sent (prompt too long ...): HTTP 400.
    BadRequest,
    /// The worker failed: HTTP 500.
    Internal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    Loaded(ModelInfo),
    LoadFailed {
        message: String,
    },
    /// The prompt is in the KV cache; generation starts.
    Started {
        id: u64,
        prompt_tokens: u32,
        /// Prompt tokens whose KV came from the previous request or the prefix cache.
        reused_tokens: u32,
        prefix_restored: bool,
        prefix_saved: bool,
    },
    Token {
        id: u64,
        text: String,
    },
    Done {
        id: u64,
        finish: Finish,
        prompt_tokens: u32,
        completion_tokens: u32,
        prompt_ms: f64,
        generation_ms: f64,
    },
    Error {
        id: u64,
        kind: ErrorKind,
        message: String,
    },
}
