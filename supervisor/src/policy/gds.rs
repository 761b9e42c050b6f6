//! GreedyDual-Size bookkeeping (Cao & Irani, "Cost-Aware WWW Proxy Caching Algorithms", 1997).
//!
//! Each cached object carries a credit `H = L + cost / size`, set when it enters the cache and
//! reset on every hit; the object with the least `H` is evicted, and the cache's inflation `L`
//! rises to that `H`. Raising `L` instead of lowering every other credit is the classic trick:
//! objects touched since the last eviction start from a higher floor, so recency counts
//! without a clock, while expensive-per-byte objects (slow to reload, small) stay longest.
//!
//! kilnd has two caches, each with its own `L`: loaded models (size = footprint, cost = the
//! reload time from the tier the model falls back to) and the hot tier (size = weights, cost =
//! the reload time from the store). Cost is in milliseconds, size in MiB. Only the floor `L`
//! at the last touch is stored per model: cost and size are read from the snapshot when
//! ranking, so a re-measured load time counts at once.

use std::collections::BTreeMap;

use kiln_spec::units::MIB;
use serde::{Deserialize, Serialize};

/// One cache's inflation and each model's floor at its last touch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GreedyDual {
    inflation: f64,
    floor: BTreeMap<String, f64>,
}

impl GreedyDual {
    /// The current `L`.
    pub fn inflation(&self) -> f64 {
        self.inflation
    }

    /// `id` entered the cache or was used: its credit restarts from the current `L`.
    pub fn touch(&mut self, id: &str) {
        self.floor.insert(id.to_owned(), self.inflation);
    }

    /// `H` for `id`: its floor (0 if never touched, so the least used go first) plus cost per MiB.
    pub fn credit(&self, id: &str, cost_ms: f64, size_bytes: u64) -> f64 {
        let size_mib = (size_bytes as f64 / MIB as f64).max(1.0 / MIB as f64);
        self.floor.get(id).copied().unwrap_or(0.0) + cost_ms.max(0.0) / size_mib
    }

    /// `id` left the cache for a reason other than space (keep-alive, emergency): `L` stays.
    pub fn forget(&mut self, id: &str) {
        self.floor.remove(id);
    }

    /// `id` left the cache with credit `h`: `L` rises to it and `id` forgets its floor.
    pub fn evicted(&mut self, id: &str, h: f64) {
        if h.is_finite() {
            self.inflation = self.inflation.max(h);
        }
        self.floor.remove(id);
    }
}

/// GreedyDual-Size state for both of kilnd's caches; persist it with the demand record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GdsState {
    /// Loaded models (memory).
    pub loaded: GreedyDual,
    /// The tmpfs hot tier.
    pub hot: GreedyDual,
}

impl GdsState {
    /// A request used `id`: it is hit in both caches it may be in.
    pub fn touch(&mut self, id: &str) {
        self.loaded.touch(id);
        self.hot.touch(id);
    }
}
