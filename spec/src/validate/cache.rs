//! cache (hot tier, eviction, thresholds, prewarm windows, response and prefix caches) and the
//! RAM budget check across the whole spec.

use super::Validator;
use crate::budget::Budget;
use crate::model::{Cache, Memory, Model, PrefixCache, Prewarm, ResponseCache, Spec};
use crate::raw::{self, EvictionPolicy};
use crate::units::{
    Window, format_bytes, mib, parse_bytes, parse_duration_secs, parse_percent, parse_rate, parse_window,
};

impl Validator<'_> {
    /// `mem` and `models` are `None` when those sections have errors: their checks are skipped.
    pub(super) fn cache(
        &mut self,
        c: &raw::Cache,
        mem: Option<&Memory>,
        models: Option<&[Model]>,
        ids: &[&str],
    ) -> Option<Cache> {
        let tmpfs = mem.and_then(|m| m.tmpfs.as_ref());
        let tmpfs_bytes = tmpfs.map_or(0, |t| t.size_bytes);
        let hot_budget_bytes = match &c.hot_budget {
            Some(q) => self.qty("cache.hot-budget", Some(q), parse_bytes).inspect(|&b| {
                if tmpfs.is_some() && b > tmpfs_bytes {
                    self.err(
                        "cache.hot-budget",
                        format!(
                            "{} is more than the tmpfs holds ({}); raise memory.tmpfs.size or lower hot-budget",
                            format_bytes(b),
                            format_bytes(tmpfs_bytes)
                        ),
                    );
                }
            }),
            None => Some(tmpfs_bytes),
        };
        let models = models.unwrap_or_default();
        let pinned: Vec<&Model> = models.iter().filter(|m| m.pin).collect();
        let pinned_bytes: u64 = pinned.iter().map(|m| m.size_bytes).sum();
        let hot = hot_budget_bytes.filter(|_| mem.is_some()).unwrap_or(u64::MAX);
        if !pinned.is_empty() && hot == 0 {
            self.err_key(
                "models",
                "pinned models need a hot tier: add memory.tmpfs (or cache.hot-budget for page-cache warming)",
            );
        } else if pinned_bytes > hot {
            let list =
                pinned.iter().map(|m| format!("{} {} MiB", m.id, mib(m.size_bytes))).collect::<Vec<_>>().join(", ");
            self.err_key("models", format!("pinned models take {} MiB ({list}) but the hot tier holds {} MiB; unpin one or grow memory.tmpfs.size", mib(pinned_bytes), mib(hot)));
        }
        let keep_alive_secs = self.opt_secs("cache.keep-alive", &c.keep_alive, 30 * 60);
        let t = c.thresholds.clone().unwrap_or_default();
        let pct = |v: &mut Self, key: &str, q: &Option<raw::Quantity>, default: f64| match q {
            Some(q) => v.qty(&format!("cache.thresholds.{key}"), Some(q), parse_percent),
            None => Some(default),
        };
        let warn = pct(self, "warn", &t.warn, 60.0);
        let evict = pct(self, "evict", &t.evict, 70.0);
        let emergency = pct(self, "emergency", &t.emergency, 95.0);
        let psi = pct(self, "psi", &t.psi, 10.0);
        if let (Some(w), Some(e), Some(x)) = (warn, evict, emergency)
            && !(w < e && e < x)
        {
            let at = if w >= e { "cache.thresholds.evict" } else { "cache.thresholds.emergency" };
            self.err(at, format!("thresholds must rise: warn {w}% < evict {e}% < emergency {x}%"));
        }
        let prewarm = self.prewarm(c.prewarm.as_ref(), models, ids);
        let r = c.responses.clone().unwrap_or_default();
        let responses = (
            self.opt_bytes("cache.responses.memory", &r.memory, 64 << 20),
            self.opt_bytes("cache.responses.disk", &r.disk, 256 << 20),
            self.opt_secs("cache.responses.ttl", &r.ttl, 24 * 3600),
        );
        let pfx = c.prefix.clone().unwrap_or_default();
        let dir = pfx.dir.clone().unwrap_or_else(|| "/var/cache/kiln/prefix".into());
        self.device_dir("cache.prefix.dir", &dir);
        let prefix = (
            self.opt_bytes("cache.prefix.size", &pfx.size, 512 << 20),
            self.opt_secs("cache.prefix.ttl", &pfx.ttl, 7 * 24 * 3600),
        );
        let (_, prewarm) = (mem?, prewarm?);
        let responses = ResponseCache { memory_bytes: responses.0?, disk_bytes: responses.1?, ttl_secs: responses.2? };
        let prefix = PrefixCache { dir, size_bytes: prefix.0?, ttl_secs: prefix.1? };
        Some(Cache {
            hot_budget_bytes: hot_budget_bytes?,
            eviction: c.eviction.unwrap_or(EvictionPolicy::GreedyDualSize),
            keep_alive_secs: keep_alive_secs?,
            warn_percent: warn?,
            evict_percent: evict?,
            emergency_percent: emergency?,
            psi_percent: psi?,
            prewarm,
            responses,
            prefix,
        })
    }

    fn opt_bytes(&mut self, path: &str, q: &Option<raw::Quantity>, default: u64) -> Option<u64> {
        match q {
            Some(q) => self.qty(path, Some(q), parse_bytes),
            None => Some(default),
        }
    }

    pub(super) fn opt_secs(&mut self, path: &str, q: &Option<raw::Quantity>, default: u64) -> Option<u64> {
        match q {
            Some(q) => self.qty(path, Some(q), parse_duration_secs),
            None => Some(default),
        }
    }

    fn prewarm(&mut self, p: Option<&raw::Prewarm>, models: &[Model], ids: &[&str]) -> Option<Prewarm> {
        let Some(p) = p else {
            return Some(Prewarm {
                windows: vec![],
                models: pinned_ids(models),
                rate_bytes_per_sec: None,
                at_boot: false,
            });
        };
        let mut windows: Vec<(usize, Window)> = Vec::new();
        let mut ok = true;
        for (i, text) in p.windows.iter().enumerate() {
            let path = format!("cache.prewarm.windows[{i}]");
            match parse_window(text) {
                Ok(w) => {
                    if let Some((j, at)) = windows.iter().find_map(|(j, other)| overlap(other, &w).map(|at| (*j, at))) {
                        self.err(
                            &path,
                            format!(
                                "`{text}` overlaps windows[{j}] (`{}`) at {at}; merge them into one window",
                                p.windows[j]
                            ),
                        );
                    }
                    windows.push((i, w));
                }
                Err(e) => {
                    self.err(&path, e);
                    ok = false;
                }
            }
        }
        for (i, id) in p.models.iter().enumerate() {
            if !ids.contains(&id.as_str()) {
                let hint = crate::diag::did_you_mean(id, ids.iter().copied())
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                self.err(&format!("cache.prewarm.models[{i}]"), format!("no model has id `{id}`{hint}"));
            }
        }
        let rate_bytes_per_sec = self.qty("cache.prewarm.rate", p.rate.as_ref(), parse_rate);
        ok &= p.rate.is_none() || rate_bytes_per_sec.is_some();
        if rate_bytes_per_sec == Some(0) {
            self.err("cache.prewarm.rate", "0 bytes per second would never finish; remove rate for no cap");
        }
        let ids = if p.models.is_empty() { pinned_ids(models) } else { p.models.clone() };
        let windows = windows.into_iter().map(|(_, w)| w).collect();
        ok.then_some(Prewarm { windows, models: ids, rate_bytes_per_sec, at_boot: p.at_boot.unwrap_or(false) })
    }

    pub(super) fn check_budget(&mut self, spec: &Spec, budget: &Budget) {
        if budget.total_bytes() > spec.hardware.ram_bytes {
            let parts =
                budget.rows.iter().map(|r| format!("{} {} MiB", r.name, mib(r.bytes))).collect::<Vec<_>>().join(" + ");
            self.err(
                "hardware.ram",
                format!(
                    "the RAM budget needs {} MiB but the board has {} MiB: {parts}. Shrink zram, the tmpfs or cgroups.inference.memory-max",
                    mib(budget.total_bytes()),
                    mib(spec.hardware.ram_bytes)
                ),
            );
        }
        if let Some(max) = spec.cgroups.kilnd.memory_max_bytes {
            let need = spec.cache.responses.memory_bytes + crate::budget::KILND_BASE_BYTES;
            if need > max {
                self.err("cache.responses.memory", format!("kilnd holds the response cache: {} MiB + {} MiB for itself is more than cgroups.kilnd.memory-max ({} MiB)", mib(spec.cache.responses.memory_bytes), mib(crate::budget::KILND_BASE_BYTES), mib(max)));
            }
        }
        if spec.cgroups.inference.memory_max_bytes.is_none() {
            let room = budget.inference_bytes;
            for (i, m) in spec.models.iter().enumerate() {
                if m.footprint_bytes() > room {
                    self.err(&format!("models[{i}]"), format!("needs {} MiB but only {} MiB of RAM is left for inference after the OS, kilnd, zram and the tmpfs", mib(m.footprint_bytes()), mib(room)));
                }
            }
        }
    }
}

fn pinned_ids(models: &[Model]) -> Vec<String> {
    models.iter().filter(|m| m.pin).map(|m| m.id.clone()).collect()
}

/// The first minute two windows share, as `mon 02:00`.
fn overlap(a: &Window, b: &Window) -> Option<String> {
    for (s1, e1) in a.week_spans() {
        for (s2, e2) in b.week_spans() {
            let start = s1.max(s2);
            if start < e1.min(e2) {
                let day = crate::units::WEEKDAYS[(start / 1440) as usize % 7];
                return Some(format!("{day} {:02}:{:02}", (start % 1440) / 60, start % 60));
            }
        }
    }
    None
}
