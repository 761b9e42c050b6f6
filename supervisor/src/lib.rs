//! kiln-supervisor: kilnd's engine. The model store and hot tier (`store`), cgroup placement
//! (`cgroup`), and the decisions of when to prewarm, evict and admit (`policy`, pure).

pub mod cgroup;
pub mod daemon;
pub mod engine;
pub mod log;
pub mod notify;
pub mod policy;
pub mod store;
