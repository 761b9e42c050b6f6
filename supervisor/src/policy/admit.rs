//! Admission control before a load: does the model fit what is left of the inference cgroup,
//! and is memory calm enough to load at all. When it does not fit, `make_room` picks idle
//! models to unload first.

use std::fmt;

use kiln_spec::raw::EvictionPolicy;
use kiln_spec::units::mib;

use super::evict::{Decision, EvictPlan, Reason, Tier, cache, rank};
use super::gds::GdsState;
use super::pressure::Level;
use super::view::ModelView;

/// Suggested `Retry-After` at `Emergency`: PSI's shortest average spans 10 s, so a reading a
/// little later reflects whatever the emergency round freed.
pub const EMERGENCY_RETRY_AFTER_SECS: u64 = 15;
/// Suggested `Retry-After` when the cgroup is full of models with requests running.
pub const NO_ROOM_RETRY_AFTER_SECS: u64 = 10;

/// What loading a model takes, by part (the spec's `Model::footprint_bytes`, itemized).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Footprint {
    pub weights_bytes: u64,
    pub kv_bytes: u64,
    /// Weights llama.cpp copies into anonymous memory when it repacks them for this CPU.
    pub repacked_bytes: u64,
    pub compute_bytes: u64,
}

impl Footprint {
    pub fn of(model: &kiln_spec::model::Model) -> Self {
        Footprint {
            weights_bytes: model.size_bytes,
            kv_bytes: model.kv_bytes.unwrap_or(0),
            repacked_bytes: model.repacked_bytes.unwrap_or(0),
            compute_bytes: kiln_spec::model::compute_buffer_bytes(model.batch),
        }
    }

    /// The part a loaded worker holds as anonymous memory (all but the mapped weights).
    pub fn anonymous_bytes(&self) -> u64 {
        self.kv_bytes.saturating_add(self.repacked_bytes).saturating_add(self.compute_bytes)
    }

    pub fn total_bytes(&self) -> u64 {
        self.weights_bytes
            .saturating_add(self.kv_bytes)
            .saturating_add(self.repacked_bytes)
            .saturating_add(self.compute_bytes)
    }
}

impl fmt::Display for Footprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} MiB (weights {} + KV {}", mib(self.total_bytes()), mib(self.weights_bytes), mib(self.kv_bytes))?;
        if self.repacked_bytes > 0 {
            write!(f, " + repacked weights {}", mib(self.repacked_bytes))?;
        }
        write!(f, " + compute {})", mib(self.compute_bytes))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("refusing to load {model}: memory use is at the emergency threshold; retry in {retry_after_secs} s")]
    Emergency { model: String, retry_after_secs: u64 },
    #[error(
        "{model} needs {footprint} but the inference cgroup has {} MiB left of {} MiB \
         (retry once running requests finish, or unload an idle model)",
        mib(*left_bytes), mib(*memory_max_bytes)
    )]
    NoRoom { model: String, footprint: Footprint, left_bytes: u64, memory_max_bytes: u64 },
    #[error(
        "{model} needs {footprint} but the inference cgroup's memory.max is {} MiB \
         (raise cgroups.inference.memory-max or lower the model's context)",
        mib(*memory_max_bytes)
    )]
    NeverFits { model: String, footprint: Footprint, memory_max_bytes: u64 },
}

impl Refusal {
    /// The `Retry-After` to suggest, or `None` when retrying cannot help.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Refusal::Emergency { retry_after_secs, .. } => Some(*retry_after_secs),
            Refusal::NoRoom { .. } => Some(NO_ROOM_RETRY_AFTER_SECS),
            Refusal::NeverFits { .. } => None,
        }
    }
}

/// Whether `model` may load now. `memory_max` is the inference cgroup's limit (`None`: no
/// limit, only the level counts); `loaded_footprints` sums the footprints already loaded in it.
pub fn admit(
    model: &str,
    footprint: Footprint,
    memory_max: Option<u64>,
    loaded_footprints: u64,
    level: Level,
) -> Result<(), Refusal> {
    let need = footprint.total_bytes();
    if let Some(max) = memory_max
        && need > max
    {
        return Err(Refusal::NeverFits { model: model.to_owned(), footprint, memory_max_bytes: max });
    }
    if level == Level::Emergency {
        return Err(Refusal::Emergency { model: model.to_owned(), retry_after_secs: EMERGENCY_RETRY_AFTER_SECS });
    }
    if let Some(max) = memory_max {
        let left_bytes = max.saturating_sub(loaded_footprints);
        if need > left_bytes {
            return Err(Refusal::NoRoom { model: model.to_owned(), footprint, left_bytes, memory_max_bytes: max });
        }
    }
    Ok(())
}

/// Unpinned idle loaded models to unload (cheapest to lose first) so that `for_model` fits in
/// the inference cgroup; an empty plan when it fits already, `None` when even unloading every
/// candidate would not make room (models with running requests or pins are never chosen).
pub fn make_room(
    models: &[ModelView],
    for_model: &str,
    need_bytes: u64,
    memory_max: Option<u64>,
    loaded_footprints: u64,
    policy: EvictionPolicy,
    gds: &GdsState,
) -> Option<EvictPlan> {
    let mut plan = EvictPlan { decisions: Vec::new(), gds: gds.clone() };
    let Some(max) = memory_max else { return Some(plan) };
    let short_bytes = need_bytes.saturating_sub(max.saturating_sub(loaded_footprints));
    if short_bytes == 0 {
        return Some(plan);
    }
    let candidates = models.iter().filter(|m| m.loaded && m.idle() && !m.pinned && m.id != for_model);
    let mut freed = 0u64;
    for (m, h) in rank(candidates, Tier::Loaded, policy, gds) {
        if freed >= short_bytes {
            break;
        }
        freed = freed.saturating_add(m.footprint_bytes);
        let lru = policy == EvictionPolicy::Lru;
        let loaded = cache(&mut plan.gds, Tier::Loaded);
        if lru {
            loaded.forget(&m.id)
        } else {
            loaded.evicted(&m.id, h)
        }
        let reason = Reason::MakeRoom { for_model: for_model.to_owned(), short_bytes };
        plan.decisions.push(Decision { id: m.id.clone(), action: super::evict::Action::Unload, reason });
    }
    (freed >= short_bytes).then_some(plan)
}
