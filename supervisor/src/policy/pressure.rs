//! Memory-pressure levels with hysteresis, from `/proc/meminfo` and `/proc/pressure/memory`.
//!
//! Used memory is `100 * (MemTotal - MemAvailable) / MemTotal`. A level is entered as soon as
//! usage reaches its threshold, and left only when usage falls below the threshold minus the
//! hysteresis margin, so a reading hovering at a threshold does not flap. PSI `some avg10` above
//! its threshold counts as at least `Evict` (tasks are stalling on memory even if usage looks
//! fine: reclaim is thrashing the page cache the mapped weights live in); it holds `Evict` until
//! it, too, falls below its threshold minus the margin.
//! See <https://docs.kernel.org/accounting/psi.html> and `MemAvailable` in
//! <https://docs.kernel.org/filesystems/proc.html>.

use std::fmt;

pub const MEMINFO_PATH: &str = "/proc/meminfo";
pub const PSI_MEMORY_PATH: &str = "/proc/pressure/memory";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Normal,
    /// Log it; nothing else changes.
    Warn,
    /// Unload unpinned idle models until usage is back under the evict threshold.
    Evict,
    /// Unload every unpinned idle model and refuse loads.
    Emergency,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Normal => "normal",
            Level::Warn => "warn",
            Level::Evict => "evict",
            Level::Emergency => "emergency",
        })
    }
}

/// Percent thresholds (0-100) from the spec's `cache.thresholds`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub warn_pct: f64,
    pub evict_pct: f64,
    pub emergency_pct: f64,
    pub psi_some_avg10_pct: f64,
    /// How far below a threshold usage must fall to leave its level.
    pub hysteresis_pct: f64,
}

pub const DEFAULT_HYSTERESIS_PCT: f64 = 5.0;

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            warn_pct: 60.0,
            evict_pct: 70.0,
            emergency_pct: 95.0,
            psi_some_avg10_pct: 10.0,
            hysteresis_pct: DEFAULT_HYSTERESIS_PCT,
        }
    }
}

impl Thresholds {
    pub fn from_spec(cache: &kiln_spec::model::Cache) -> Self {
        Thresholds {
            warn_pct: cache.warn_percent,
            evict_pct: cache.evict_percent,
            emergency_pct: cache.emergency_percent,
            psi_some_avg10_pct: cache.psi_percent,
            hysteresis_pct: DEFAULT_HYSTERESIS_PCT,
        }
    }

    /// Usage that enters `level` (`None` for `Normal`).
    pub fn entry_pct(&self, level: Level) -> Option<f64> {
        match level {
            Level::Normal => None,
            Level::Warn => Some(self.warn_pct),
            Level::Evict => Some(self.evict_pct),
            Level::Emergency => Some(self.emergency_pct),
        }
    }

    /// What eviction aims for: usage below this leaves `Evict`.
    pub fn evict_target_pct(&self) -> f64 {
        self.evict_pct - self.hysteresis_pct
    }
}

/// One sample of the device's memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemReading {
    pub total_bytes: u64,
    pub available_bytes: u64,
    /// PSI memory `some avg10` in percent; `None` when the kernel has no PSI.
    pub psi_some_avg10: Option<f64>,
}

impl MemReading {
    pub fn used_bytes(&self) -> u64 {
        self.total_bytes.saturating_sub(self.available_bytes)
    }

    /// Percent of RAM in use (0 for a reading without a total).
    pub fn used_pct(&self) -> f64 {
        pct(self.used_bytes(), self.total_bytes)
    }
}

/// `100 * part / total`, 0 when there is no total.
pub fn pct(part: u64, total: u64) -> f64 {
    if total == 0 { 0.0 } else { 100.0 * part as f64 / total as f64 }
}

/// Tracks the pressure level across readings.
#[derive(Debug, Clone)]
pub struct PressureTracker {
    thresholds: Thresholds,
    level: Level,
}

impl PressureTracker {
    pub fn new(thresholds: Thresholds) -> Self {
        PressureTracker { thresholds, level: Level::Normal }
    }

    pub fn level(&self) -> Level {
        self.level
    }

    pub fn thresholds(&self) -> &Thresholds {
        &self.thresholds
    }

    /// Folds in one reading and returns the new level. A reading without a total (a broken
    /// read) keeps the current level rather than pretend memory is free.
    pub fn update(&mut self, reading: MemReading) -> Level {
        if reading.total_bytes == 0 {
            return self.level;
        }
        let (t, current) = (&self.thresholds, self.level);
        let used = reading.used_pct();
        let margin = t.hysteresis_pct.max(0.0);
        let levels = [Level::Emergency, Level::Evict, Level::Warn];
        let entered = levels.into_iter().find(|l| t.entry_pct(*l).is_some_and(|p| used >= p));
        let held =
            levels.into_iter().filter(|l| *l <= current).find(|l| t.entry_pct(*l).is_some_and(|p| used >= p - margin));
        let mut next = entered.max(held).unwrap_or(Level::Normal);
        if let Some(psi) = reading.psi_some_avg10 {
            let psi_entered = psi > t.psi_some_avg10_pct;
            let psi_held = current >= Level::Evict && psi >= t.psi_some_avg10_pct - margin;
            if psi_entered || psi_held {
                next = next.max(Level::Evict);
            }
        }
        self.level = next;
        next
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{file}: no `{field}` line")]
    Missing { file: &'static str, field: &'static str },
    #[error("{file}: cannot read `{line}`: {why}")]
    BadLine { file: &'static str, line: String, why: &'static str },
}

/// `MemTotal` and `MemAvailable` (kB) from `/proc/meminfo`, as bytes; no PSI.
pub fn parse_meminfo(text: &str) -> Result<MemReading, ParseError> {
    let field = |name: &'static str| -> Result<u64, ParseError> {
        let line = text
            .lines()
            .find(|l| l.split(':').next() == Some(name))
            .ok_or(ParseError::Missing { file: MEMINFO_PATH, field: name })?;
        let bad = |why| ParseError::BadLine { file: MEMINFO_PATH, line: line.to_owned(), why };
        let mut words = line.split_once(':').map_or("", |(_, v)| v).split_whitespace();
        let kb: u64 = words.next().and_then(|n| n.parse().ok()).ok_or_else(|| bad("not a number"))?;
        match words.next() {
            Some("kB") => kb.checked_mul(1024).ok_or_else(|| bad("too large")),
            _ => Err(bad("expected a value in kB")),
        }
    };
    let total_bytes = field("MemTotal")?;
    let available_bytes = field("MemAvailable")?.min(total_bytes);
    Ok(MemReading { total_bytes, available_bytes, psi_some_avg10: None })
}

/// One line of a PSI file.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PsiLine {
    pub avg10: f64,
    pub avg60: f64,
    pub avg300: f64,
    pub total_us: u64,
}

/// `/proc/pressure/memory` (or a cgroup's `memory.pressure`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Psi {
    pub some: PsiLine,
    /// Absent on kernels that report only `some`.
    pub full: Option<PsiLine>,
}

pub fn parse_psi(text: &str) -> Result<Psi, ParseError> {
    let mut some = None;
    let mut full = None;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let bad = |why| ParseError::BadLine { file: PSI_MEMORY_PATH, line: line.to_owned(), why };
        let mut words = line.split_whitespace();
        let slot = match words.next() {
            Some("some") => &mut some,
            Some("full") => &mut full,
            _ => return Err(bad("expected `some` or `full`")),
        };
        let mut psi = PsiLine::default();
        let mut seen = 0;
        for word in words {
            let (key, value) = word.split_once('=').ok_or_else(|| bad("expected key=value"))?;
            let num = || value.parse::<f64>().map_err(|_| bad("not a number"));
            match key {
                "avg10" => psi.avg10 = num()?,
                "avg60" => psi.avg60 = num()?,
                "avg300" => psi.avg300 = num()?,
                "total" => psi.total_us = value.parse().map_err(|_| bad("not a number"))?,
                _ => continue,
            }
            seen += 1;
        }
        if seen < 4 {
            return Err(bad("expected avg10, avg60, avg300 and total"));
        }
        *slot = Some(psi);
    }
    let some = some.ok_or(ParseError::Missing { file: PSI_MEMORY_PATH, field: "some" })?;
    Ok(Psi { some, full })
}
