//! The response cache, for deterministic requests only (temperature 0, or an explicit seed):
//! an LRU in memory bounded in bytes, over a persistent tier in redb bounded in bytes, both
//! with the spec's TTL. Keys are sha256 over everything that decides the output: engine
//! build, model sha256, chat template, the request's messages or prompt, every sampling
//! parameter, max_tokens and stop.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const RESPONSES: TableDefinition<&str, &[u8]> = TableDefinition::new("responses");
/// (created, key) → bytes: the oldest first, for the size cap and the TTL.
const AGES: TableDefinition<(u64, &str), u64> = TableDefinition::new("ages");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// A finished generation as it is replayed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cached {
    /// The text in the pieces it was streamed in, so a streaming hit replays as a stream.
    pub pieces: Vec<String>,
    pub finish_reason: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Seconds since the epoch.
    pub created: u64,
}

impl Cached {
    pub fn text(&self) -> String {
        self.pieces.concat()
    }
    fn weight(&self) -> u64 {
        self.pieces.iter().map(|p| p.len() as u64 + 24).sum::<u64>() + 128
    }
}

/// Where a lookup was answered from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Memory,
    Disk,
}

#[derive(Debug, Default)]
struct Lru {
    map: HashMap<String, (Arc<Cached>, u64, u64)>,
    order: BTreeMap<u64, String>,
    tick: u64,
    bytes: u64,
}

impl Lru {
    fn get(&mut self, key: &str) -> Option<Arc<Cached>> {
        self.tick += 1;
        let tick = self.tick;
        let (v, _, t) = self.map.get_mut(key)?;
        self.order.remove(t);
        *t = tick;
        self.order.insert(tick, key.to_owned());
        Some(v.clone())
    }
    fn remove(&mut self, key: &str) {
        if let Some((_, w, t)) = self.map.remove(key) {
            self.order.remove(&t);
            self.bytes -= w;
        }
    }
    fn put(&mut self, key: &str, v: Arc<Cached>, cap: u64) {
        self.remove(key);
        let w = v.weight();
        if w > cap {
            return;
        }
        self.tick += 1;
        self.map.insert(key.to_owned(), (v, w, self.tick));
        self.order.insert(self.tick, key.to_owned());
        self.bytes += w;
        while self.bytes > cap {
            let Some((_, k)) = self.order.pop_first() else { break };
            if let Some((_, w, _)) = self.map.remove(&k) {
                self.bytes -= w;
            }
        }
    }
}

#[derive(Debug)]
pub struct ResponseCache {
    mem: Mutex<Lru>,
    mem_cap: u64,
    db: Option<Database>,
    disk_cap: u64,
    ttl_secs: u64,
}

use crate::worker::host::now_secs as now;

impl ResponseCache {
    /// Opens (or creates) the disk tier at `path`; `disk_cap` 0 keeps memory only.
    pub fn open(path: Option<&Path>, mem_cap: u64, disk_cap: u64, ttl_secs: u64) -> Result<ResponseCache> {
        let db = match path {
            Some(p) if disk_cap > 0 => {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                }
                let db = Database::create(p).with_context(|| format!("opening the response cache {}", p.display()))?;
                let w = db.begin_write()?;
                w.open_table(RESPONSES)?;
                w.open_table(AGES)?;
                w.open_table(META)?;
                w.commit()?;
                Some(db)
            }
            _ => None,
        };
        Ok(ResponseCache { mem: Mutex::new(Lru::default()), mem_cap, db, disk_cap, ttl_secs })
    }

    fn lru(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.mem.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn fresh(&self, c: &Cached) -> bool {
        now().saturating_sub(c.created) < self.ttl_secs
    }

    pub fn get(&self, key: &str) -> Option<(Arc<Cached>, Tier)> {
        let in_memory = self.lru().get(key);
        if let Some(c) = in_memory {
            if self.fresh(&c) {
                return Some((c, Tier::Memory));
            }
            self.lru().remove(key);
        }
        let db = self.db.as_ref()?;
        let found: Option<Cached> = (|| -> Result<Option<Cached>> {
            let r = db.begin_read()?;
            let t = r.open_table(RESPONSES)?;
            Ok(match t.get(key)? {
                Some(v) => serde_json::from_slice(v.value()).ok(),
                None => None,
            })
        })()
        .ok()
        .flatten();
        let c = Arc::new(found?);
        if !self.fresh(&c) {
            return None;
        }
        self.lru().put(key, c.clone(), self.mem_cap);
        Some((c, Tier::Disk))
    }

    pub fn put(&self, key: &str, c: Cached) -> Result<()> {
        let c = Arc::new(c);
        self.lru().put(key, c.clone(), self.mem_cap);
        let Some(db) = &self.db else { return Ok(()) };
        let bytes = serde_json::to_vec(&*c)?;
        let len = bytes.len() as u64;
        if len > self.disk_cap {
            return Ok(());
        }
        let w = db.begin_write()?;
        {
            let mut resp = w.open_table(RESPONSES)?;
            let mut ages = w.open_table(AGES)?;
            let mut meta = w.open_table(META)?;
            let mut total = meta.get("bytes")?.map_or(0, |v| v.value());
            let replaced = resp.insert(key, bytes.as_slice())?.map(|old| old.value().to_vec());
            if let Some(old) = replaced {
                total = total.saturating_sub(old.len() as u64);
                if let Ok(prev) = serde_json::from_slice::<Cached>(&old) {
                    ages.remove((prev.created, key))?;
                }
            }
            ages.insert((c.created, key), len)?;
            total += len;
            // Oldest out first, past the cap or the TTL.
            let cutoff = now().saturating_sub(self.ttl_secs);
            while total > self.disk_cap || ages.first()?.is_some_and(|(k, _)| k.value().0 < cutoff) {
                let Some((k, v)) = ages.pop_first()? else { break };
                let (_, old_key) = k.value();
                let n = v.value();
                resp.remove(old_key)?;
                total = total.saturating_sub(n);
            }
            meta.insert("bytes", total)?;
        }
        w.commit()?;
        Ok(())
    }

    /// (memory bytes, disk bytes).
    pub fn sizes(&self) -> (u64, u64) {
        let disk = self
            .db
            .as_ref()
            .and_then(|db| {
                let r = db.begin_read().ok()?;
                let t = r.open_table(META).ok()?;
                t.get("bytes").ok()?.map(|v| v.value())
            })
            .unwrap_or(0);
        (self.lru().bytes, disk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(text: &str) -> Cached {
        Cached {
            pieces: vec![text.to_owned()],
            finish_reason: "stop".into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            created: now(),
        }
    }

    #[test]
    fn memory_lru_stays_under_its_bytes() {
        let c = ResponseCache::open(None, 1000, 0, 3600).unwrap();
        for i in 0..20 {
            c.put(&format!("k{i}"), entry(&"x".repeat(100))).unwrap();
        }
        assert!(c.sizes().0 <= 1000);
        assert!(c.get("k19").is_some());
        assert!(c.get("k0").is_none());
    }

    #[test]
    fn disk_tier_survives_a_restart_and_honours_cap_and_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("responses.redb");
        {
            let c = ResponseCache::open(Some(&db), 1 << 20, 4096, 3600).unwrap();
            for i in 0..30 {
                c.put(&format!("k{i}"), entry(&format!("answer {i} {}", "y".repeat(200)))).unwrap();
            }
            assert!(c.sizes().1 <= 4096, "{:?}", c.sizes());
        }
        let c = ResponseCache::open(Some(&db), 1 << 20, 4096, 3600).unwrap();
        let (hit, tier) = c.get("k29").unwrap();
        assert_eq!(tier, Tier::Disk);
        assert!(hit.text().starts_with("answer 29"));
        assert!(c.get("k0").is_none(), "the oldest entry outlived the cap");
        assert_eq!(c.get("k29").unwrap().1, Tier::Memory);
        // An expired entry is not served.
        let mut old = entry("stale");
        old.created = now() - 7200;
        c.put("old", old).unwrap();
        assert!(c.get("old").is_none());
    }
}
