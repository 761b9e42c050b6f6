//! kiln-supervisor: kilnd's engine. The model store and hot tier (`store`), cgroup placement
//! (`cgroup`), the decisions of when to prewarm, evict and admit (`policy`, pure), the
//! llama.cpp workers (`worker`), the HTTP API (`server`) with its response cache (`respcache`)
//! and metrics, and `kilnd run` tying them together (`serve`).

pub mod activate;
pub mod cgroup;
pub mod chat;
pub mod daemon;
pub mod engine;
pub mod generations;
pub mod log;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod respcache;
pub mod serve;
pub mod server;
pub mod store;
pub mod worker;
