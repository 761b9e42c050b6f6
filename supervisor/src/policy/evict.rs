//! Which models to unload or drop from the hot tier, decided from a snapshot and `now`.
//!
//! One round, in order (each model moves at most one step per round: loaded -> unloaded but
//! still hot -> store only; nothing ever leaves the store):
//! 1. keep-alive: an unpinned model idle for `keep_alive_secs` since its last request ended
//!    is unloaded;
//! 2. hot budget: while the hot tier (plus any room wanted for a pending copy) exceeds its
//!    budget, unpinned hot models that are not loaded are demoted, cheapest to lose first;
//! 3. pressure: at `Evict`, unpinned idle loaded models are unloaded cheapest to lose first
//!    (then unpinned idle hot copies demoted, since tmpfs pages are never "available") until the
//!    projected usage falls below the evict threshold minus the hysteresis margin; when usage is
//!    already below it (PSI alone raised the level) one model goes per round. At `Emergency`
//!    every unpinned idle model is unloaded and every unpinned idle hot copy demoted.
//!
//! Never touched: a model with requests running or queued (`in_use > 0`), and a pinned model
//! (a pin keeps a model hot and, once loaded, loaded; kilnd may still unload it on request).
//! "Cheapest to lose" is the spec's policy: LRU (oldest `last_used` first) or GreedyDual-Size
//! (least credit first, see `gds`); the spec's `priority` breaks ties, higher staying.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::fmt;

use jiff::{SignedDuration, Timestamp};
use kiln_spec::raw::EvictionPolicy;
use kiln_spec::units::mib;

use super::gds::{GdsState, GreedyDual};
use super::pressure::{Level, MemReading, Thresholds, pct};
use super::view::ModelView;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Stop the model's worker; its bytes stay where they are.
    Unload,
    /// Delete the tmpfs copy; the store copy stays.
    DemoteHot,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    KeepAliveExpired,
    /// The hot tier must hold `needed_bytes` but may hold `budget_bytes`.
    HotBudget {
        needed_bytes: u64,
        budget_bytes: u64,
    },
    MemoryPressure(Level),
    Emergency,
    /// Room in the inference cgroup for loading `for_model`, which is `short_bytes` short.
    MakeRoom {
        for_model: String,
        short_bytes: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub id: String,
    pub action: Action,
    pub reason: Reason,
}

/// Everything one eviction round looks at.
#[derive(Debug, Clone)]
pub struct EvictInput<'a> {
    pub models: &'a [ModelView],
    pub memory: MemReading,
    /// From the `PressureTracker`.
    pub level: Level,
    pub thresholds: Thresholds,
    pub hot_budget_bytes: u64,
    pub hot_used_bytes: u64,
    /// Room a pending promotion needs in the hot tier (0 when none).
    pub hot_wanted_bytes: u64,
    pub keep_alive_secs: u64,
    pub policy: EvictionPolicy,
    pub gds: &'a GdsState,
    pub now: Timestamp,
}

/// The decisions, in the order to carry them out, and the GreedyDual state after them.
#[derive(Debug, Clone, PartialEq)]
pub struct EvictPlan {
    pub decisions: Vec<Decision>,
    pub gds: GdsState,
}

/// Which of kilnd's two caches a model would leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tier {
    Loaded,
    Hot,
}

pub fn plan(input: &EvictInput<'_>) -> EvictPlan {
    let mut round = Round {
        input,
        decided: BTreeSet::new(),
        decisions: Vec::new(),
        gds: input.gds.clone(),
        used_bytes: input.memory.used_bytes(),
        hot_used_bytes: input.hot_used_bytes,
    };
    round.keep_alive();
    round.hot_budget();
    match input.level {
        Level::Emergency => round.emergency(),
        Level::Evict => round.relieve(),
        Level::Normal | Level::Warn => {}
    }
    EvictPlan { decisions: round.decisions, gds: round.gds }
}

/// Orders candidates cheapest to lose first and pairs each with its GreedyDual credit.
pub(crate) fn rank<'m>(
    candidates: impl IntoIterator<Item = &'m ModelView>,
    tier: Tier,
    policy: EvictionPolicy,
    gds: &GdsState,
) -> Vec<(&'m ModelView, f64)> {
    let mut ranked: Vec<(&ModelView, f64)> = candidates
        .into_iter()
        .map(|m| {
            let h = match tier {
                Tier::Loaded => gds.loaded.credit(&m.id, m.reload_cost_ms(), m.footprint_bytes),
                Tier::Hot => gds.hot.credit(&m.id, m.reload_cost_ms_from_store, m.size_bytes),
            };
            (m, h)
        })
        .collect();
    let by_recency = |a: &ModelView, b: &ModelView| a.last_used.cmp(&b.last_used);
    let by_priority = |a: &ModelView, b: &ModelView| a.priority.cmp(&b.priority);
    ranked.sort_by(|(a, ha), (b, hb)| {
        let first = match policy {
            EvictionPolicy::Lru => by_recency(a, b),
            EvictionPolicy::GreedyDualSize => ha.partial_cmp(hb).unwrap_or(Ordering::Equal),
        };
        first.then_with(|| by_priority(a, b)).then_with(|| by_recency(a, b)).then_with(|| a.id.cmp(&b.id))
    });
    ranked
}

pub(crate) fn cache(gds: &mut GdsState, tier: Tier) -> &mut GreedyDual {
    match tier {
        Tier::Loaded => &mut gds.loaded,
        Tier::Hot => &mut gds.hot,
    }
}

struct Round<'i, 'a> {
    input: &'i EvictInput<'a>,
    decided: BTreeSet<String>,
    decisions: Vec<Decision>,
    gds: GdsState,
    /// Projected, after the decisions so far.
    used_bytes: u64,
    hot_used_bytes: u64,
}

impl<'i, 'a> Round<'i, 'a> {
    fn candidates(&self, tier: Tier) -> Vec<&'i ModelView> {
        let models: &'i [ModelView] = self.input.models;
        models
            .iter()
            .filter(|m| m.idle() && !m.pinned && !self.decided.contains(&m.id))
            .filter(|m| match tier {
                Tier::Loaded => m.loaded,
                Tier::Hot => m.hot && !m.loaded,
            })
            .collect()
    }

    fn ranked(&self, tier: Tier) -> Vec<(&'i ModelView, f64)> {
        rank(self.candidates(tier), tier, self.input.policy, &self.gds)
    }

    /// Records a decision; `credit` (for space-driven choices) raises the cache's inflation.
    fn decide(&mut self, m: &ModelView, tier: Tier, reason: Reason, credit: Option<f64>) {
        let freed = match tier {
            Tier::Loaded => m.unload_frees_bytes(),
            Tier::Hot => m.size_bytes,
        };
        self.used_bytes = self.used_bytes.saturating_sub(freed);
        if tier == Tier::Hot {
            self.hot_used_bytes = self.hot_used_bytes.saturating_sub(m.size_bytes);
        }
        let cache = cache(&mut self.gds, tier);
        match credit {
            Some(h) if self.input.policy == EvictionPolicy::GreedyDualSize => cache.evicted(&m.id, h),
            _ => cache.forget(&m.id),
        }
        let action = if tier == Tier::Loaded { Action::Unload } else { Action::DemoteHot };
        self.decided.insert(m.id.clone());
        self.decisions.push(Decision { id: m.id.clone(), action, reason });
    }

    fn keep_alive(&mut self) {
        let keep_alive = SignedDuration::from_secs(i64::try_from(self.input.keep_alive_secs).unwrap_or(i64::MAX));
        let now = self.input.now;
        let expired = |m: &ModelView| match m.last_used {
            None => true,
            Some(t) => t.checked_add(keep_alive).is_ok_and(|until| until <= now),
        };
        for (m, _) in self.ranked(Tier::Loaded) {
            if expired(m) {
                self.decide(m, Tier::Loaded, Reason::KeepAliveExpired, None);
            }
        }
    }

    fn hot_budget(&mut self) {
        let (wanted, budget) = (self.input.hot_wanted_bytes, self.input.hot_budget_bytes);
        let needed_bytes = self.hot_used_bytes.saturating_add(wanted);
        if needed_bytes <= budget {
            return;
        }
        for (m, h) in self.ranked(Tier::Hot) {
            if self.hot_used_bytes.saturating_add(wanted) <= budget {
                break;
            }
            self.decide(m, Tier::Hot, Reason::HotBudget { needed_bytes, budget_bytes: budget }, Some(h));
        }
    }

    fn over_target(&self) -> bool {
        pct(self.used_bytes, self.input.memory.total_bytes) >= self.input.thresholds.evict_target_pct()
    }

    fn relieve(&mut self) {
        let reason = Reason::MemoryPressure(Level::Evict);
        let mut ranked = self.ranked(Tier::Loaded);
        ranked.extend(self.ranked(Tier::Hot));
        if !self.over_target() {
            // Only PSI holds the level up: unless this round already freed something, free the
            // cheapest model and let the next reading judge.
            if self.decisions.is_empty()
                && let Some((m, h)) = ranked.first()
            {
                let tier = if m.loaded { Tier::Loaded } else { Tier::Hot };
                self.decide(m, tier, reason, Some(*h));
            }
            return;
        }
        for (m, h) in ranked {
            if !self.over_target() {
                break;
            }
            let tier = if m.loaded { Tier::Loaded } else { Tier::Hot };
            self.decide(m, tier, reason.clone(), Some(h));
        }
    }

    fn emergency(&mut self) {
        for (m, _) in self.ranked(Tier::Loaded) {
            self.decide(m, Tier::Loaded, Reason::Emergency, None);
        }
        for (m, _) in self.ranked(Tier::Hot) {
            self.decide(m, Tier::Hot, Reason::Emergency, None);
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::KeepAliveExpired => f.write_str("idle past its keep-alive"),
            Reason::HotBudget { needed_bytes, budget_bytes } => {
                write!(f, "the hot tier needs {} MiB but its budget is {} MiB", mib(*needed_bytes), mib(*budget_bytes))
            }
            Reason::MemoryPressure(level) => write!(f, "memory pressure ({level})"),
            Reason::Emergency => f.write_str("memory emergency"),
            Reason::MakeRoom { for_model, short_bytes } => {
                write!(f, "making room to load {for_model} ({} MiB short)", mib(*short_bytes))
            }
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = match self.action {
            Action::Unload => "unload",
            Action::DemoteHot => "drop the hot copy of",
        };
        write!(f, "{verb} {}: {}", self.id, self.reason)
    }
}
