//! kilnd's cache engine: the spec's models across the store and the hot tier, prewarmed on
//! demand or in the spec's off-peak windows, demoted under memory pressure, each decision
//! logged with a fixed MESSAGE_ID. Paths re-root under `--state-dir` so it runs anywhere.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use jiff::tz::TimeZone;
use kiln_spec::Spec;
use kiln_spec::model::{Model, ModelSource};
use serde::Serialize;

use crate::log::message_id;
use crate::policy::{self, Level, PressureTracker, Thresholds};
use crate::store::{CopyOptions, CopyReport, FetchOptions, HotTier, Store, StoreError};

/// Where the engine keeps things on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub store: PathBuf,
    pub hot: Option<PathBuf>,
    pub state: PathBuf,
    /// The prefix (KV state) cache directory.
    pub prefix: PathBuf,
    /// The response cache's persistent tier.
    pub responses: PathBuf,
}

impl Paths {
    /// The spec's device paths, re-rooted under `state_dir` when given (tests, benchmarks).
    pub fn for_spec(spec: &Spec, state_dir: Option<&Path>) -> Paths {
        let at = |p: &str| match state_dir {
            Some(root) => root.join(p.trim_start_matches('/')),
            None => PathBuf::from(p),
        };
        Paths {
            store: at(kiln_spec::model::STORE_DIR),
            hot: spec.memory.tmpfs.as_ref().map(|t| at(&t.path)),
            state: at("/var/lib/kiln"),
            prefix: at(&spec.cache.prefix.dir),
            responses: at("/var/cache/kiln/responses.redb"),
        }
    }
}

/// Where one model is, as `kilnd status` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ModelStatus {
    pub id: String,
    pub sha256: String,
    pub bytes: u64,
    pub pinned: bool,
    pub stored: bool,
    pub hot: bool,
    /// Page-cache residency (bytes) when there is no hot tier.
    pub resident_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub name: String,
    pub models: Vec<ModelStatus>,
    pub hot_used_bytes: u64,
    pub hot_budget_bytes: u64,
    pub pressure: String,
    pub memory_used_percent: Option<f64>,
    pub prewarm_window_open: bool,
    /// RFC 3339 time of the next window change, if any.
    pub prewarm_next_change: Option<String>,
}

#[derive(Debug)]
pub struct Engine {
    pub spec: Spec,
    pub paths: Paths,
    store: Store,
    hot: Option<HotTier>,
    tz: TimeZone,
    pressure: PressureTracker,
    level: Level,
    /// Requests per model and hour of day (decayed), for the prewarm order; kept in
    /// `state/demand.json` across restarts.
    demand: policy::Demand,
    demand_dirty: bool,
    /// Models whose tmpfs copy a worker maps right now: deleting it would free nothing until
    /// the worker unloads, so pressure demotes them only after that.
    mapped_hot: std::collections::HashSet<String>,
}

impl Engine {
    pub fn open(spec: Spec, state_dir: Option<&Path>) -> Result<Engine> {
        let paths = Paths::for_spec(&spec, state_dir);
        let store =
            Store::open(&paths.store).with_context(|| format!("opening the model store {}", paths.store.display()))?;
        let hot = match &paths.hot {
            Some(dir) => Some(
                HotTier::open(dir, spec.cache.hot_budget_bytes)
                    .with_context(|| format!("opening the hot tier {}", dir.display()))?,
            ),
            None => None,
        };
        let tz = time_zone(&spec.system.timezone)?;
        let pressure = PressureTracker::new(Thresholds::from_spec(&spec.cache));
        let demand = load_demand(&paths.state.join("demand.json"));
        Ok(Engine {
            spec,
            paths,
            store,
            hot,
            tz,
            pressure,
            level: Level::Normal,
            demand,
            demand_dirty: false,
            mapped_hot: Default::default(),
        })
    }

    /// Counts a request for `model` now (its hour of day orders the prewarm).
    pub fn record_request(&mut self, model: &str) {
        self.demand.record(model, jiff::Timestamp::now(), &self.tz);
        self.demand_dirty = true;
    }

    pub fn demand(&self) -> &policy::Demand {
        &self.demand
    }

    /// Writes the demand record when it changed (temporary file, then rename).
    pub fn save_demand(&mut self) -> Result<()> {
        if !self.demand_dirty {
            return Ok(());
        }
        let path = self.paths.state.join("demand.json");
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec(&self.demand).context("serializing demand")?;
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming {}", tmp.display()))?;
        self.demand_dirty = false;
        Ok(())
    }

    /// The memory pressure level of the last reading.
    pub fn level(&self) -> Level {
        self.level
    }

    /// Where a model's weights are in the store, and in the hot tier (when there is one).
    pub fn weights(&self, m: &Model) -> (PathBuf, Option<PathBuf>) {
        (self.store.path_of(&m.sha256), self.paths.hot.as_ref().map(|h| h.join(format!("{}.gguf", m.sha256))))
    }

    pub fn model(&self, id: &str) -> Result<&Model> {
        match self.spec.models.iter().find(|m| m.id == id) {
            Some(m) => Ok(m),
            None => {
                let ids: Vec<&str> = self.spec.models.iter().map(|m| m.id.as_str()).collect();
                bail!("no model `{id}` in the spec; it has {}", ids.join(", "))
            }
        }
    }

    /// The model's file in the store, fetching a `url` model first.
    pub fn ensure_stored(&self, m: &Model) -> Result<PathBuf> {
        if self.store.contains(&m.sha256) {
            return Ok(self.store.path_of(&m.sha256));
        }
        match &m.source {
            ModelSource::Url(url) => {
                tracing::info!(model = %m.id, url = %url, "fetching model into the store");
                Ok(self.store.fetch(&m.id, url, &m.sha256, Some(m.size_bytes), &FetchOptions::default(), &|_, _| {})?)
            }
            ModelSource::Path(src) => Ok(self.store.import(&m.id, src, &m.sha256, &|_, _| {})?),
            ModelSource::Store => bail!(
                "model `{}` ({}) is not in the store {} and has no url to fetch it from; rebuild the image or re-deploy the spec",
                m.id,
                m.sha256,
                self.paths.store.display()
            ),
        }
    }

    /// Brings models into the hot tier (or the page cache without one): existing hot copies
    /// are verified first and re-copied when corrupt. Each finished copy logs PREWARM_DONE.
    pub fn prewarm(&self, ids: &[String], cancel: Option<Arc<AtomicBool>>) -> Result<Vec<String>> {
        let mut done = Vec::new();
        for id in ids {
            let m = self.model(id)?;
            let src = self.ensure_stored(m)?;
            let started = Instant::now();
            let Some(hot) = &self.hot else {
                let r = crate::store::warm_page_cache(&src)?;
                let ms = started.elapsed().as_millis() as u64;
                tracing::info!(message_id = message_id::PREWARM_DONE, model = %m.id, sha256 = %m.sha256, tier = "page-cache", bytes = r.resident_bytes, duration_ms = ms, "prewarm done: {} MiB resident in the page cache", r.resident_bytes >> 20);
                done.push(id.clone());
                continue;
            };
            let check = self.store.check_digest(&m.sha256);
            if hot.contains(&m.sha256) {
                let intact = match &check {
                    Some(blake3) => hot.verify_checked(&m.sha256, blake3)?,
                    None => hot.verify(&m.sha256)?,
                };
                if intact {
                    done.push(id.clone());
                    continue;
                }
                tracing::warn!(model = %m.id, sha256 = %m.sha256, tier = "hot", reason = "corrupt", "hot copy does not match its sha256; copying it again");
                hot.demote(&m.sha256)?;
            }
            let opts = CopyOptions {
                rate_limit_bytes_per_sec: self.spec.cache.prewarm.rate_bytes_per_sec,
                cancel: cancel.clone(),
            };
            match self.promote(hot, m, &src, check.as_deref(), &opts) {
                Ok(r) => {
                    tracing::info!(
                        message_id = message_id::PREWARM_DONE,
                        model = %m.id,
                        sha256 = %m.sha256,
                        tier = "hot",
                        bytes = r.bytes,
                        duration_ms = r.duration.as_millis() as u64,
                        bytes_per_sec = r.bytes_per_sec,
                        "prewarm done: {} MiB in {} ms ({} MiB/s)",
                        r.bytes >> 20,
                        r.duration.as_millis(),
                        r.bytes_per_sec >> 20
                    );
                    done.push(id.clone());
                }
                Err(StoreError::Cancelled) => {
                    tracing::info!(model = %m.id, reason = "traffic", "prewarm yielded to inference traffic");
                    break;
                }
                Err(e) => return Err(e).with_context(|| format!("prewarming {}", m.id)),
            }
        }
        Ok(done)
    }

    /// Copies `m` from the store into the hot tier, checked against the store's check digest
    /// when it has one (BLAKE3, fast) and else against the spec's SHA-256, recording the
    /// check digest from that copy. A copy that misses the check digest drops it and is
    /// made again against the SHA-256, which decides.
    fn promote(
        &self,
        hot: &HotTier,
        m: &Model,
        src: &Path,
        check: Option<&str>,
        opts: &CopyOptions,
    ) -> Result<CopyReport, StoreError> {
        if let Some(blake3) = check {
            match hot.promote_checked(src, &m.sha256, blake3, opts, &|_, _| {}) {
                Err(StoreError::CheckMismatch { .. }) => {
                    tracing::warn!(model = %m.id, sha256 = %m.sha256, "copy missed the store's check digest: dropping it and copying again against the sha256");
                    self.store.forget_check(&m.sha256)?;
                }
                done => return done,
            }
        }
        let report = hot.promote(src, &m.sha256, opts, &|_, _| {})?;
        if let Some(blake3) = &report.blake3 {
            self.store.record_check_or_warn(&m.sha256, blake3);
        }
        Ok(report)
    }

    /// The models prewarm brings in: the spec's prewarm list, pins first.
    pub fn prewarm_list(&self) -> Vec<String> {
        let views: Vec<policy::ModelView> = self
            .spec
            .models
            .iter()
            .map(|m| policy::ModelView {
                hot: self.hot.as_ref().is_some_and(|h| h.contains(&m.sha256)),
                ..policy::ModelView::from_spec(m)
            })
            .collect();
        let budget = self.hot.as_ref().map_or(u64::MAX, |h| h.budget_bytes());
        let used = self.hot.as_ref().map_or(0, |h| h.used_bytes());
        let hour = jiff::Timestamp::now().to_zoned(self.tz.clone()).hour() as u8;
        policy::prewarm_order(&views, &self.spec.cache.prewarm.models, &self.demand, hour, budget, used)
    }

    /// Which models' tmpfs copies workers map now (the server tells before each reaction).
    pub fn set_mapped_hot(&mut self, ids: impl IntoIterator<Item = String>) {
        self.mapped_hot = ids.into_iter().collect();
    }

    /// Reads memory pressure and acts: demotes unpinned hot copies under Evict and Emergency,
    /// except those a worker maps (`set_mapped_hot`). Level changes and demotions are logged.
    pub fn react_to_pressure(&mut self, reading: policy::MemReading) -> Result<Level> {
        let level = self.pressure.update(reading);
        if level != self.level {
            tracing::info!(message_id = message_id::PRESSURE, level = ?level, used_percent = reading.used_pct(), "memory pressure is now {level:?}");
            self.level = level;
        }
        if level >= Level::Evict
            && let Some(hot) = &self.hot
        {
            let demotable =
                |m: &&kiln_spec::model::Model| !m.pin && hot.contains(&m.sha256) && !self.mapped_hot.contains(&m.id);
            for m in self.spec.models.iter().filter(demotable) {
                hot.demote(&m.sha256)?;
                tracing::warn!(message_id = message_id::EVICTION, model = %m.id, sha256 = %m.sha256, tier = "hot", bytes = m.size_bytes, reason = ?level, "evicted from the hot tier under memory pressure");
            }
        }
        Ok(level)
    }

    pub fn status(&self, reading: Option<policy::MemReading>) -> Status {
        let now = jiff::Timestamp::now();
        let (open, next) = policy::next_change(&self.spec.cache.prewarm.windows, now, &self.tz);
        let models = self
            .spec
            .models
            .iter()
            .map(|m| {
                let stored = self.store.contains(&m.sha256);
                let resident = match (&self.hot, stored) {
                    (None, true) => {
                        crate::store::residency(&self.store.path_of(&m.sha256)).ok().map(|r| r.resident_bytes)
                    }
                    _ => None,
                };
                ModelStatus {
                    id: m.id.clone(),
                    sha256: m.sha256.clone(),
                    bytes: m.size_bytes,
                    pinned: m.pin,
                    stored,
                    hot: self.hot.as_ref().is_some_and(|h| h.contains(&m.sha256)),
                    resident_bytes: resident,
                }
            })
            .collect();
        Status {
            name: self.spec.name.clone(),
            models,
            hot_used_bytes: self.hot.as_ref().map_or(0, |h| h.used_bytes()),
            hot_budget_bytes: self.spec.cache.hot_budget_bytes,
            pressure: format!("{:?}", self.level),
            memory_used_percent: reading.map(|r| r.used_pct()),
            prewarm_window_open: open,
            prewarm_next_change: next.map(|t| t.to_string()),
        }
    }
}

/// /proc/meminfo and /proc/pressure/memory now.
///
/// `KILND_MEMINFO` names another file in /proc/meminfo's format to read instead: how the
/// tests put a kilnd under memory pressure on a machine with plenty.
pub fn read_memory() -> Result<policy::MemReading> {
    let path = std::env::var_os("KILND_MEMINFO").map_or_else(|| PathBuf::from("/proc/meminfo"), PathBuf::from);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut reading = policy::parse_meminfo(&text).context("parsing /proc/meminfo")?;
    if let Ok(psi) = std::fs::read_to_string("/proc/pressure/memory")
        && let Ok(p) = policy::parse_psi(&psi)
    {
        reading.psi_some_avg10 = Some(p.some.avg10);
    }
    Ok(reading)
}

/// The saved demand record; a missing or unreadable one starts afresh (said in the log).
fn load_demand(path: &Path) -> policy::Demand {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!("ignoring {}: {e}; demand starts afresh", path.display());
            policy::Demand::default()
        }),
        Err(_) => policy::Demand::default(),
    }
}

/// The spec's time zone, read straight from its TZif file when the name is a plain relative
/// path under the zoneinfo directory (`$TZDIR`, else /usr/share/zoneinfo). jiff's own lookup
/// first walks the whole zoneinfo tree to index every name (~600 files, several ms of each
/// `kilnd` start, measured with strace); it stays the fallback for anything else.
pub fn time_zone(name: &str) -> Result<TimeZone> {
    let dir = std::env::var_os("TZDIR").map_or_else(|| PathBuf::from("/usr/share/zoneinfo"), PathBuf::from);
    let plain = !name.is_empty() && Path::new(name).components().all(|c| matches!(c, std::path::Component::Normal(_)));
    if plain
        && let Ok(data) = std::fs::read(dir.join(name))
        && let Ok(tz) = TimeZone::tzif(name, &data)
    {
        return Ok(tz);
    }
    TimeZone::get(name).with_context(|| format!("loading time zone {name}"))
}
