//! The snapshot of one model that the eviction and prewarm policies decide over.

use jiff::Timestamp;

/// What kilnd knows about a model at one instant. Costs are measured (or estimated) load times.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelView {
    pub id: String,
    /// Bytes of the weights file (what it takes in the hot tier).
    pub size_bytes: u64,
    /// Weights + KV cache + compute buffers (what loading it takes).
    pub footprint_bytes: u64,
    pub pinned: bool,
    /// The spec's priority: higher stays longer.
    pub priority: i32,
    /// A verified copy is on the tmpfs hot tier.
    pub hot: bool,
    /// A worker has it loaded.
    pub loaded: bool,
    /// Requests running or queued on it.
    pub in_use: u32,
    /// When its last request ended (kilnd also sets it when a load finishes).
    pub last_used: Option<Timestamp>,
    pub reload_cost_ms_from_store: f64,
    pub reload_cost_ms_from_hot: f64,
}

impl ModelView {
    /// A stored, idle, never-used model: the other fields are meant to be set with `..`.
    pub fn new(id: impl Into<String>, size_bytes: u64, footprint_bytes: u64) -> Self {
        ModelView {
            id: id.into(),
            size_bytes,
            footprint_bytes,
            pinned: false,
            priority: 0,
            hot: false,
            loaded: false,
            in_use: 0,
            last_used: None,
            reload_cost_ms_from_store: 0.0,
            reload_cost_ms_from_hot: 0.0,
        }
    }

    /// The spec's view of a model: sizes, pin and priority; runtime fields at their defaults.
    pub fn from_spec(model: &kiln_spec::model::Model) -> Self {
        ModelView {
            pinned: model.pin,
            priority: model.priority,
            ..ModelView::new(model.id.clone(), model.size_bytes, model.footprint_bytes())
        }
    }

    /// Neither a request nor a worker start is using it.
    pub fn idle(&self) -> bool {
        self.in_use == 0
    }

    /// What unloading it gives back to the memory the kernel counts as used. A hot model's
    /// weights stay on the tmpfs (shmem, never "available") until it is demoted, so only its
    /// KV and compute buffers come back; this undercounts for a store-mapped model that also has
    /// a hot copy, which errs towards unloading one more model, the safe side.
    pub fn unload_frees_bytes(&self) -> u64 {
        if self.hot { self.footprint_bytes.saturating_sub(self.size_bytes) } else { self.footprint_bytes }
    }

    /// The load time a model falls back to once unloaded: from the hot tier if it is there.
    pub fn reload_cost_ms(&self) -> f64 {
        if self.hot { self.reload_cost_ms_from_hot } else { self.reload_cost_ms_from_store }
    }
}
