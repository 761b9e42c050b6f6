//! The life of one model on the device, as a plain enum whose transitions return `Result`.
//!
//! Where the bytes are (store, hot tier) is kept apart from whether a worker has them mapped,
//! because a loaded model may be mapped from either tier, and a model loaded from the store
//! may gain (or lose) a tmpfs copy while it runs:
//!
//! ```text
//! Missing ─FetchStarted─▶ Fetching ─Fetched─▶ Stored ◀─Promoted / Demoted─▶ Hot
//!                            │                  │                            │
//!              FetchFailed,  │                  │ LoadStarted                │ LoadStarted
//!              Corrupt       ▼                  ▼                            ▼
//!                   Failed { place }     Loading(Store{hot})           Loading(Hot)
//!                     │        ▲                │ LoadFinished               │
//!               Retry │        │ LoadFailed,    ▼                            ▼
//!                     ▼        │ Crashed  Loaded(Store{hot})            Loaded(Hot)
//!           Missing / Stored / Hot              │ UnloadStarted              │
//!           (where the bytes are)               ▼                            ▼
//!                                        Unloading(Store{hot})        Unloading(Hot)
//!                                               │ Unloaded                   │ Unloaded
//!                                               ▼                            ▼
//!                                        Stored, or Hot if hot              Hot
//! ```
//!
//! `Promoted`/`Demoted` flip `hot` on a store-mapped model in any phase; a model mapped from
//! the hot tier cannot be demoted (deleting a mapped tmpfs file frees nothing) until it is
//! unloaded. `Corrupt` means the store copy failed verification: the bytes are discarded
//! (`Failed { place: Nowhere }`); kilnd unloads a model before it reports that. `Retry` returns a
//! failed model to where its bytes still are; a failed model's tmpfs copy may be demoted first.

use std::fmt;

/// The tier a loaded model's weights are mapped from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mapped {
    /// Mapped from the persistent store; `hot` says whether a tmpfs copy exists as well.
    Store { hot: bool },
    /// Mapped from the tmpfs copy (so the model is necessarily hot).
    Hot,
}

impl Mapped {
    pub fn is_hot(self) -> bool {
        matches!(self, Mapped::Hot | Mapped::Store { hot: true })
    }
    /// Where the bytes are once nothing maps them.
    pub fn place(self) -> Place {
        if self.is_hot() { Place::Hot } else { Place::Store }
    }
}

/// Where a model's bytes are when no worker holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Place {
    /// Not on the device (never fetched, or discarded as corrupt).
    Nowhere,
    /// In the persistent store only.
    Store,
    /// In the store and copied to the tmpfs hot tier.
    Hot,
}

impl Place {
    /// The idle state for bytes in this place.
    pub fn idle_state(self) -> ModelState {
        match self {
            Place::Nowhere => ModelState::Missing,
            Place::Store => ModelState::Stored,
            Place::Hot => ModelState::Hot,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelState {
    /// Not in the store yet (a url model before its first download) or discarded.
    Missing,
    /// Downloading into the store.
    Fetching,
    /// In the store only.
    Stored,
    /// In the store and on the tmpfs, not loaded.
    Hot,
    Loading(Mapped),
    Loaded(Mapped),
    Unloading(Mapped),
    /// Something went wrong; `place` is where the bytes still are (what `Retry` returns to).
    Failed {
        reason: String,
        place: Place,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    FetchStarted,
    Fetched,
    FetchFailed(String),
    /// A verified tmpfs copy now exists.
    Promoted,
    /// The tmpfs copy was removed (the store copy stays).
    Demoted,
    /// A worker starts mapping the model: from the hot tier when there is a copy there.
    LoadStarted,
    LoadFinished,
    LoadFailed(String),
    /// The worker holding a loaded model died.
    Crashed(String),
    UnloadStarted,
    Unloaded,
    /// The store copy failed verification.
    Corrupt,
    Retry,
}

/// A transition that the state machine does not allow: `from` is left unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("model {from} cannot take event {event}")]
pub struct TransitionError {
    pub from: ModelState,
    pub event: Event,
}

impl ModelState {
    /// The state after `event`, or an error naming both when the event makes no sense here.
    pub fn apply(&self, event: Event) -> Result<ModelState, TransitionError> {
        use ModelState as S;
        let next = match (self, &event) {
            (S::Missing, Event::FetchStarted) => Some(S::Fetching),
            (S::Fetching, Event::Fetched) => Some(S::Stored),
            (S::Fetching, Event::FetchFailed(reason)) => Some(failed(reason, Place::Nowhere)),
            (S::Fetching | S::Stored | S::Hot, Event::Corrupt) => {
                Some(failed("the store copy failed verification", Place::Nowhere))
            }
            (S::Stored, Event::Promoted) => Some(S::Hot),
            (S::Hot, Event::Demoted) => Some(S::Stored),
            (S::Stored, Event::LoadStarted) => Some(S::Loading(Mapped::Store { hot: false })),
            (S::Hot, Event::LoadStarted) => Some(S::Loading(Mapped::Hot)),
            (S::Loading(m), Event::LoadFinished) => Some(S::Loaded(*m)),
            (S::Loading(m), Event::LoadFailed(reason)) => Some(failed(reason, m.place())),
            (S::Loaded(m), Event::Crashed(reason)) => Some(failed(reason, m.place())),
            (S::Loaded(m), Event::UnloadStarted) => Some(S::Unloading(*m)),
            (S::Unloading(m), Event::Unloaded) => Some(m.place().idle_state()),
            (S::Loading(m), Event::Promoted | Event::Demoted) => retier(*m, &event).map(S::Loading),
            (S::Loaded(m), Event::Promoted | Event::Demoted) => retier(*m, &event).map(S::Loaded),
            (S::Unloading(m), Event::Promoted | Event::Demoted) => retier(*m, &event).map(S::Unloading),
            (S::Failed { reason, place: Place::Hot }, Event::Demoted) => {
                Some(S::Failed { reason: reason.clone(), place: Place::Store })
            }
            (S::Failed { place, .. }, Event::Retry) => Some(place.idle_state()),
            _ => None,
        };
        next.ok_or_else(|| TransitionError { from: self.clone(), event })
    }

    /// Whether a tmpfs copy exists.
    pub fn is_hot(&self) -> bool {
        match self {
            ModelState::Hot => true,
            ModelState::Loading(m) | ModelState::Loaded(m) | ModelState::Unloading(m) => m.is_hot(),
            ModelState::Failed { place, .. } => *place == Place::Hot,
            _ => false,
        }
    }

    /// Whether a worker has the model mapped and serving.
    pub fn is_loaded(&self) -> bool {
        matches!(self, ModelState::Loaded(_))
    }

    /// Whether the verified bytes are in the store.
    pub fn in_store(&self) -> bool {
        match self {
            ModelState::Missing | ModelState::Fetching => false,
            ModelState::Failed { place, .. } => *place != Place::Nowhere,
            _ => true,
        }
    }
}

fn failed(reason: &str, place: Place) -> ModelState {
    ModelState::Failed { reason: reason.to_owned(), place }
}

/// A store-mapped model gains or loses its tmpfs copy; a hot-mapped one cannot change tier.
fn retier(m: Mapped, event: &Event) -> Option<Mapped> {
    match (m, event) {
        (Mapped::Store { hot: false }, Event::Promoted) => Some(Mapped::Store { hot: true }),
        (Mapped::Store { hot: true }, Event::Demoted) => Some(Mapped::Store { hot: false }),
        _ => None,
    }
}

impl fmt::Display for Mapped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mapped::Store { hot: false } => f.write_str("from the store"),
            Mapped::Store { hot: true } => f.write_str("from the store (also hot)"),
            Mapped::Hot => f.write_str("from the hot tier"),
        }
    }
}

impl fmt::Display for ModelState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelState::Missing => f.write_str("missing"),
            ModelState::Fetching => f.write_str("fetching"),
            ModelState::Stored => f.write_str("stored"),
            ModelState::Hot => f.write_str("hot"),
            ModelState::Loading(m) => write!(f, "loading {m}"),
            ModelState::Loaded(m) => write!(f, "loaded {m}"),
            ModelState::Unloading(m) => write!(f, "unloading {m}"),
            ModelState::Failed { reason, .. } => write!(f, "failed ({reason})"),
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, reason) = match self {
            Event::FetchStarted => ("fetch-started", None),
            Event::Fetched => ("fetched", None),
            Event::FetchFailed(r) => ("fetch-failed", Some(r)),
            Event::Promoted => ("promoted", None),
            Event::Demoted => ("demoted", None),
            Event::LoadStarted => ("load-started", None),
            Event::LoadFinished => ("load-finished", None),
            Event::LoadFailed(r) => ("load-failed", Some(r)),
            Event::Crashed(r) => ("crashed", Some(r)),
            Event::UnloadStarted => ("unload-started", None),
            Event::Unloaded => ("unloaded", None),
            Event::Corrupt => ("corrupt", None),
            Event::Retry => ("retry", None),
        };
        match reason {
            Some(r) => write!(f, "`{name}` ({r})"),
            None => write!(f, "`{name}`"),
        }
    }
}
