//! kilnd's decisions, as pure functions over a snapshot and a clock: when prewarm windows open
//! (`windows`), which models to copy to the hot tier (`prewarm`, fed by `demand`), how much
//! memory pressure there is (`pressure`), what to unload or demote (`evict`, `gds`), whether a
//! load may start (`admit`), and each model's life (`state`). Nothing here reads a file, a
//! clock or a cgroup by itself: kilnd gathers a snapshot, asks, and carries out the answer.

pub mod admit;
pub mod clock;
pub mod demand;
pub mod evict;
pub mod gds;
pub mod pressure;
pub mod prewarm;
pub mod state;
pub mod view;
pub mod windows;

pub use admit::{EMERGENCY_RETRY_AFTER_SECS, Footprint, NO_ROOM_RETRY_AFTER_SECS, Refusal, admit, make_room};
pub use clock::{Clock, ManualClock, SystemClock};
pub use demand::Demand;
pub use evict::{Action, Decision, EvictInput, EvictPlan, Reason, plan as plan_evictions};
pub use gds::{GdsState, GreedyDual};
pub use pressure::{
    Level, MemReading, ParseError, PressureTracker, Psi, PsiLine, Thresholds, parse_meminfo, parse_psi,
};
pub use prewarm::prewarm_order;
pub use state::{Event, Mapped, ModelState, Place, TransitionError};
pub use view::ModelView;
pub use windows::{local_minute_of_week, next_change, window_open};

/// The eviction policies, as the spec names them.
pub use kiln_spec::raw::EvictionPolicy;
