//! The node's Prometheus metrics (`GET /metrics`), through the `prometheus-client` crate.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Outcome label of finished jobs.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `ok` or `failed`.
    pub outcome: &'static str,
}

/// Route and status labels of HTTP requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabel {
    /// The matched route.
    pub route: String,
    /// The status code.
    pub status: u16,
}

/// Event label of the transport's counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NetLabel {
    /// What happened (`connections_opened`, `state_queries_answered`, …).
    pub event: &'static str,
}

/// Every metric the node exports.
pub struct Metrics {
    registry: Registry,
    /// Jobs finished, by outcome.
    pub jobs: Family<OutcomeLabel, Counter>,
    /// Seconds from acceptance to result.
    pub job_seconds: Histogram,
    /// Seconds spent choosing host and method.
    pub routing_seconds: Histogram,
    /// Attempts that failed and were retried elsewhere.
    pub retries: Counter,
    /// Jobs sent to another host.
    pub forwarded: Counter,
    /// Peers' job calls refused by admission (allowlist, fair share, size).
    pub peer_jobs_refused: Counter,
    /// Performance records made of finished jobs.
    pub records_made: Counter,
    /// Hosts asked for their state at decision time (theirs was stale).
    pub state_queries: Counter,
    /// Prompt tokens of the jobs this host's engines ran.
    pub prompt_tokens: Counter,
    /// Those whose KV came from the prefix cache.
    pub cached_prompt_tokens: Counter,
    /// Records in the store.
    pub records: Gauge,
    /// Predictor generation in use (0 = the prior).
    pub predictor_generation: Gauge,
    /// |ln(measured / predicted runtime)| of finished jobs.
    pub abs_log_error: Histogram,
    /// Sequences waiting in this host's engines.
    pub queue_depth: Gauge,
    /// Sequences running in this host's engines.
    pub running_jobs: Gauge,
    /// KV blocks held by running sequences (first engine).
    pub kv_blocks_used: Gauge,
    /// KV blocks holding reclaimable cached prefixes (first engine).
    pub kv_blocks_cached: Gauge,
    /// KV blocks in all (first engine).
    pub kv_blocks_total: Gauge,
    /// Live peers.
    pub peers_alive: Gauge,
    /// The transport's counters (connections, heartbeats, queries), by event.
    pub net: Family<NetLabel, Counter>,
    /// HTTP requests, by route and status.
    pub http_requests: Family<HttpLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `metainf` prefix.
    pub fn new() -> Self {
        let mut m = Self {
            jobs: Family::default(),
            job_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 16)),
            routing_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 18)),
            retries: Counter::default(),
            forwarded: Counter::default(),
            peer_jobs_refused: Counter::default(),
            records_made: Counter::default(),
            state_queries: Counter::default(),
            prompt_tokens: Counter::default(),
            cached_prompt_tokens: Counter::default(),
            records: Gauge::default(),
            predictor_generation: Gauge::default(),
            abs_log_error: Histogram::new([0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0]),
            queue_depth: Gauge::default(),
            running_jobs: Gauge::default(),
            kv_blocks_used: Gauge::default(),
            kv_blocks_cached: Gauge::default(),
            kv_blocks_total: Gauge::default(),
            peers_alive: Gauge::default(),
            net: Family::default(),
            http_requests: Family::default(),
            registry: Registry::with_prefix("metainf"),
        };
        let registry = &mut m.registry;
        registry.register("jobs", "Jobs finished, by outcome", m.jobs.clone());
        registry.register(
            "job_seconds",
            "Seconds from a job's acceptance to its result",
            m.job_seconds.clone(),
        );
        registry.register(
            "routing_seconds",
            "Seconds spent choosing a job's host and method",
            m.routing_seconds.clone(),
        );
        registry.register(
            "job_retries",
            "Job attempts that failed and were retried on another host",
            m.retries.clone(),
        );
        registry.register(
            "jobs_forwarded",
            "Job attempts sent to another host",
            m.forwarded.clone(),
        );
        registry.register(
            "peer_jobs_refused",
            "Job calls from peers refused by admission (allowlist, fair share, size)",
            m.peer_jobs_refused.clone(),
        );
        registry.register(
            "job_records",
            "Performance records made of finished jobs",
            m.records_made.clone(),
        );
        registry.register(
            "routing_state_queries",
            "Hosts asked for their state at decision time because theirs was stale",
            m.state_queries.clone(),
        );
        registry.register(
            "served_prompt_tokens",
            "Prompt tokens of the jobs this host's engines ran",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "served_cached_prompt_tokens",
            "Prompt tokens of those jobs whose KV came from the prefix cache",
            m.cached_prompt_tokens.clone(),
        );
        registry.register("store_records", "Records in the store", m.records.clone());
        registry.register(
            "predictor_generation",
            "Predictor generation in use (0 = the prior)",
            m.predictor_generation.clone(),
        );
        registry.register(
            "predictor_abs_log_error",
            "|ln(measured / predicted runtime)| of finished jobs",
            m.abs_log_error.clone(),
        );
        registry.register(
            "queue_depth",
            "Sequences waiting for a place in this host's engines",
            m.queue_depth.clone(),
        );
        registry.register(
            "running_jobs",
            "Sequences running in this host's engines",
            m.running_jobs.clone(),
        );
        registry.register(
            "kv_blocks_used",
            "KV blocks held by running sequences",
            m.kv_blocks_used.clone(),
        );
        registry.register(
            "kv_blocks_cached",
            "KV blocks holding cached prefixes no sequence uses",
            m.kv_blocks_cached.clone(),
        );
        registry.register(
            "kv_blocks_total",
            "KV blocks of the engine's pool",
            m.kv_blocks_total.clone(),
        );
        registry.register("peers_alive", "Live peers", m.peers_alive.clone());
        registry.register(
            "net_events",
            "What the transport did since the start: heartbeats received, connections opened \
             (dialled), closed and trimmed, state queries sent and answered, sync requests sent, \
             Kademlia bootstraps",
            m.net.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests, by route and status",
            m.http_requests.clone(),
        );
        m
    }

    /// Counts a finished job.
    pub fn job_finished(&self, ok: bool, seconds: f64) {
        let outcome = if ok { "ok" } else { "failed" };
        self.jobs.get_or_create(&OutcomeLabel { outcome }).inc();
        if ok {
            self.job_seconds.observe(seconds);
        }
    }

    /// Brings the transport's counters up to `c` (the transport keeps the totals; a counter
    /// only ever moves forward, so two scrapes at once cannot count anything twice).
    pub fn net_counters(&self, c: &crate::net::NetCounters) {
        for (event, value) in c.named() {
            self.net
                .get_or_create(&NetLabel { event })
                .inner()
                .fetch_max(value, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_exported_in_the_text_format() {
        let m = Metrics::new();
        m.job_finished(true, 1.5);
        m.job_finished(false, 0.0);
        m.queue_depth.set(3);
        let counters = crate::net::NetCounters {
            connections_opened: 7,
            ..Default::default()
        };
        m.net_counters(&counters);
        // A scrape that read older totals does not move a counter back.
        m.net_counters(&crate::net::NetCounters::default());
        let text = m.encode();
        assert!(
            text.contains("metainf_net_events_total{event=\"connections_opened\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("metainf_jobs_total{outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("metainf_jobs_total{outcome=\"failed\"} 1"),
            "{text}"
        );
        assert!(text.contains("metainf_queue_depth 3"), "{text}");
        assert!(text.contains("metainf_job_seconds_count 1"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
