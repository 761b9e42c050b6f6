//! Observed demand: requests per model per local hour of day, decaying exponentially with age so
//! that old habits fade. Serializable so kilnd can persist it across restarts.
//!
//! All buckets are kept as of one instant (`as_of`, the newest request seen or the last
//! `decay_to`): a request `age` days older than that counts `0.5^(age / half_life_days)`. Keeping
//! one reference instant for every model makes scores comparable across models without a clock.

use std::collections::BTreeMap;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

/// Default half-life: a habit from a week ago weighs half as much as today's.
pub const DEFAULT_HALF_LIFE_DAYS: f64 = 7.0;

const SECS_PER_DAY: f64 = 86_400.0;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Demand {
    half_life_days: f64,
    #[serde(with = "timestamp_text")]
    as_of: Timestamp,
    /// Model id -> decayed request counts per local hour (0..24).
    models: BTreeMap<String, [f64; 24]>,
}

impl Default for Demand {
    fn default() -> Self {
        Demand::new(DEFAULT_HALF_LIFE_DAYS)
    }
}

impl Demand {
    /// An empty record; a half-life that is not a positive number falls back to the default.
    pub fn new(half_life_days: f64) -> Self {
        let half_life_days =
            if half_life_days.is_finite() && half_life_days > 0.0 { half_life_days } else { DEFAULT_HALF_LIFE_DAYS };
        Demand { half_life_days, as_of: Timestamp::UNIX_EPOCH, models: BTreeMap::new() }
    }

    pub fn half_life_days(&self) -> f64 {
        self.half_life_days
    }

    /// The instant all scores are valued at.
    pub fn as_of(&self) -> Timestamp {
        self.as_of
    }

    /// Counts one request for `model` at `ts`, in the hour of day `tz` shows then. A request
    /// older than `as_of` (out of order) counts at its decayed weight.
    pub fn record(&mut self, model: &str, ts: Timestamp, tz: &TimeZone) {
        self.decay_to(ts);
        let weight = self.factor(ts, self.as_of);
        let hour = usize::try_from(ts.to_zoned(tz.clone()).hour()).unwrap_or(0) % 24;
        match self.models.get_mut(model) {
            Some(buckets) => buckets[hour] += weight,
            None => {
                let mut buckets = [0.0; 24];
                buckets[hour] = weight;
                self.models.insert(model.to_owned(), buckets);
            }
        }
    }

    /// Ages every score to `now` (a no-op when `now` is not later than `as_of`).
    pub fn decay_to(&mut self, now: Timestamp) {
        if now <= self.as_of {
            return;
        }
        let factor = self.factor(self.as_of, now);
        for buckets in self.models.values_mut() {
            for b in buckets.iter_mut() {
                *b *= factor;
            }
        }
        self.as_of = now;
    }

    /// Decayed requests for `model` in local hour `hour` (0..24), as of `as_of`; 0 when unknown.
    pub fn score(&self, model: &str, hour: u8) -> f64 {
        self.models.get(model).map_or(0.0, |b| b[usize::from(hour) % 24])
    }

    /// Decayed requests for `model` over the whole day.
    pub fn total(&self, model: &str) -> f64 {
        self.models.get(model).map_or(0.0, |b| b.iter().sum())
    }

    /// Forgets models no longer in the spec.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.models.retain(|id, _| keep(id));
    }

    /// The weight at `later` of one request at `earlier`.
    fn factor(&self, earlier: Timestamp, later: Timestamp) -> f64 {
        let age_days = later.duration_since(earlier).as_secs_f64().max(0.0) / SECS_PER_DAY;
        // A hand-edited state file may hold a bad half-life; never divide by zero or NaN.
        let half_life = if self.half_life_days > 0.0 { self.half_life_days } else { DEFAULT_HALF_LIFE_DAYS };
        0.5_f64.powf(age_days / half_life)
    }
}

/// Timestamps persist as RFC 3339 text, readable in the state file (jiff's serde feature is off).
mod timestamp_text {
    use jiff::Timestamp;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ts: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(ts)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_half_a_life_ago_weighs_half() {
        let mut d = Demand::new(2.0);
        let t0: Timestamp = "2025-06-02T09:15:00Z".parse().unwrap();
        d.record("m", t0, &TimeZone::UTC);
        d.decay_to("2025-06-04T09:15:00Z".parse().unwrap());
        assert!((d.score("m", 9) - 0.5).abs() < 1e-9);
        assert_eq!(d.score("m", 10), 0.0);
        assert_eq!(d.score("other", 9), 0.0);
    }

    #[test]
    fn out_of_order_request_counts_decayed() {
        let mut d = Demand::new(1.0);
        d.record("m", "2025-06-03T09:00:00Z".parse().unwrap(), &TimeZone::UTC);
        d.record("m", "2025-06-02T09:00:00Z".parse().unwrap(), &TimeZone::UTC);
        assert!((d.score("m", 9) - 1.5).abs() < 1e-9);
    }
}
