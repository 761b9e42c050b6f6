//! `/metrics` in Prometheus text format (prometheus-client, OpenMetrics text).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub cache: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabel {
    pub tier: String,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub ttft: Family<ModelLabel, Histogram>,
    pub tokens_per_second: Family<ModelLabel, Histogram>,
    pub cache: Family<CacheLabels, Counter>,
    pub loads: Family<ModelLabel, Counter>,
    pub evictions: Family<ModelLabel, Counter>,
    pub restarts: Family<ModelLabel, Counter>,
    pub tier_bytes: Family<TierLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kilnd");
        let requests = Family::<RequestLabels, Counter>::default();
        let ttft = Family::<ModelLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        let tokens_per_second =
            Family::<ModelLabel, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(1.0, 1.5, 16)));
        let cache = Family::<CacheLabels, Counter>::default();
        let loads = Family::<ModelLabel, Counter>::default();
        let evictions = Family::<ModelLabel, Counter>::default();
        let restarts = Family::<ModelLabel, Counter>::default();
        let tier_bytes = Family::<TierLabel, Gauge>::default();
        registry.register("requests", "HTTP requests by endpoint and status", requests.clone());
        registry.register("time_to_first_token_seconds", "Time to the first generated token", ttft.clone());
        registry.register("decode_tokens_per_second", "Generation speed per request", tokens_per_second.clone());
        registry.register("cache_lookups", "Response and prefix cache lookups by result", cache.clone());
        registry.register("model_loads", "Worker loads per model", loads.clone());
        registry.register("evictions", "Models unloaded or demoted to make room", evictions.clone());
        registry.register("worker_restarts", "Workers that died and were restarted", restarts.clone());
        registry.register("tier_bytes", "Bytes of model weights per tier", tier_bytes.clone());
        Metrics { registry, requests, ttft, tokens_per_second, cache, loads, evictions, restarts, tier_bytes }
    }

    pub fn request(&self, endpoint: &str, status: u16) {
        self.requests.get_or_create(&RequestLabels { endpoint: endpoint.to_owned(), status }).inc();
    }

    pub fn cache(&self, cache: &str, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.cache.get_or_create(&CacheLabels { cache: cache.to_owned(), result: result.to_owned() }).inc();
    }

    pub fn model(model: &str) -> ModelLabel {
        ModelLabel { model: model.to_owned() }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
