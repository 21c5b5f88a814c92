//! Prometheus metrics. Every label value comes from a closed set (catalogue models, configured
//! backend names, status codes we emit, fixed reason strings), never from raw client input, so a
//! scanner or a typo cannot mint new series.

use prometheus::{
    CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Seconds-long image work: 50 ms to 2 minutes.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0,
];
/// The gateway's own time: 0.1 ms to 100 ms.
pub const OVERHEAD_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
];

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub backend_duration: HistogramVec,
    pub overhead: Histogram,
    pub fallbacks: IntCounterVec,
    pub circuit_state: IntGaugeVec,
    pub backend_inflight: IntGaugeVec,
    pub backend_ready: IntGaugeVec,
    /// Per endpoint of a backend's pool (`verda` kind): requests in flight, and 1 when it takes
    /// requests (0 busy or ejected).
    pub endpoint_inflight: IntGaugeVec,
    pub endpoint_ready: IntGaugeVec,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub cache_evictions: IntCounter,
    pub cache_bytes: IntGauge,
    pub cache_entries: IntGauge,
    pub singleflight_coalesced: IntCounter,
    /// Shared state (`[state] backend = "redis"`): 1 while the store answers. Only a gateway
    /// with a shared store has the series (`store="redis"`), so a memory-state one never alerts.
    pub state_store_up: IntGaugeVec,
    /// Redis calls that failed or timed out, by operation (each fell back to the replica's own
    /// state).
    pub state_store_errors: IntCounterVec,
    /// Experiment records waiting in the retry buffer for the database.
    pub storage_pending_records: IntGauge,
    /// Experiment record writes that failed or timed out (first tries and retries).
    pub storage_write_failures: IntCounter,
    /// Experiment records dropped from a full retry buffer.
    pub storage_dropped_records: IntCounter,
    /// Cache hits served from the shared level (an image another replica made).
    pub cache_shared_hits: IntCounter,
    /// Requests that waited for an identical request on another replica.
    pub singleflight_remote: IntCounter,
    pub inflight: IntGauge,
    pub local_queue_depth: IntGaugeVec,
    pub local_batch_size: HistogramVec,
    pub local_stage_seconds: HistogramVec,
    pub local_images: IntCounterVec,
    pub cost_usd: CounterVec,
    pub experiment_assignments: IntCounterVec,
    pub experiment_feedback: IntCounterVec,
    pub experiment_score_sum: CounterVec,
    pub experiment_latency: HistogramVec,
    pub experiment_cost_usd: CounterVec,
    pub rejected: IntCounterVec,
    pub http_responses: IntCounterVec,
    pub shadow_runs: IntCounterVec,
    pub storage_pruned: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "kleingate_requests_total",
                "Generate requests answered, by model, serving backend, HTTP status and cache result",
            ),
            &["model", "backend", "status", "cache"],
        )
        .expect("metric");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "kleingate_request_duration_seconds",
                "End-to-end generate latency as seen by the gateway",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["model", "backend", "cache"],
        )
        .expect("metric");
        let backend_duration = HistogramVec::new(
            HistogramOpts::new(
                "kleingate_backend_request_duration_seconds",
                "Time of each backend attempt, by outcome (ok or the error reason)",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["backend", "model", "outcome"],
        )
        .expect("metric");
        let overhead = Histogram::with_opts(
            HistogramOpts::new(
                "kleingate_gateway_overhead_seconds",
                "Time a request spent in the gateway itself, not waiting on a backend",
            )
            .buckets(OVERHEAD_BUCKETS.to_vec()),
        )
        .expect("metric");
        let fallbacks = IntCounterVec::new(
            Opts::new(
                "kleingate_fallbacks_total",
                "Requests moved from one backend to the next, by reason",
            ),
            &["from", "to", "reason"],
        )
        .expect("metric");
        let circuit_state = IntGaugeVec::new(
            Opts::new(
                "kleingate_backend_circuit_state",
                "Circuit breaker state per backend: 0 closed, 1 half-open, 2 open",
            ),
            &["backend"],
        )
        .expect("metric");
        let backend_ready = IntGaugeVec::new(
            Opts::new(
                "kleingate_backend_ready",
                "1 when the backend can take requests (loaded, circuit not open), else 0",
            ),
            &["backend"],
        )
        .expect("metric");
        let backend_inflight = IntGaugeVec::new(
            Opts::new(
                "kleingate_backend_inflight_requests",
                "Requests currently being served by each backend",
            ),
            &["backend"],
        )
        .expect("metric");
        let endpoint_inflight = IntGaugeVec::new(
            Opts::new(
                "kleingate_backend_endpoint_inflight_requests",
                "Requests in flight to each endpoint of a backend's pool",
            ),
            &["backend", "endpoint"],
        )
        .expect("metric");
        let endpoint_ready = IntGaugeVec::new(
            Opts::new(
                "kleingate_backend_endpoint_ready",
                "1 when an endpoint of a backend's pool takes requests, 0 when busy (Retry-After) or ejected",
            ),
            &["backend", "endpoint"],
        )
        .expect("metric");
        let cache_hits = IntCounter::new("kleingate_cache_hits_total", "Cache lookups that hit")
            .expect("metric");
        let cache_misses =
            IntCounter::new("kleingate_cache_misses_total", "Cache lookups that missed")
                .expect("metric");
        let cache_evictions = IntCounter::new(
            "kleingate_cache_evictions_total",
            "Cache entries evicted for size or expired by TTL",
        )
        .expect("metric");
        let cache_bytes = IntGauge::new(
            "kleingate_cache_bytes",
            "Encoded image bytes held in the cache",
        )
        .expect("metric");
        let cache_entries =
            IntGauge::new("kleingate_cache_entries", "Images held in the cache").expect("metric");
        let singleflight_coalesced = IntCounter::new(
            "kleingate_singleflight_coalesced_total",
            "Requests that waited for an identical in-flight request instead of calling a backend",
        )
        .expect("metric");
        let state_store_up = IntGaugeVec::new(
            Opts::new(
                "kleingate_state_store_up",
                "1 while the shared state store answers; 0 while this replica falls back to its own state",
            ),
            &["store"],
        )
        .expect("metric");
        let state_store_errors = IntCounterVec::new(
            Opts::new(
                "kleingate_state_store_errors_total",
                "Shared state store calls that failed or timed out, by operation",
            ),
            &["op"],
        )
        .expect("metric");
        let storage_pending_records = IntGauge::new(
            "kleingate_storage_pending_records",
            "Experiment records waiting in the retry buffer for the database",
        )
        .expect("metric");
        let storage_write_failures = IntCounter::new(
            "kleingate_storage_write_failures_total",
            "Experiment record writes that failed or timed out (first tries and retries)",
        )
        .expect("metric");
        let storage_dropped_records = IntCounter::new(
            "kleingate_storage_dropped_records_total",
            "Experiment records dropped because the retry buffer was full",
        )
        .expect("metric");
        let cache_shared_hits = IntCounter::new(
            "kleingate_cache_shared_hits_total",
            "Cache hits served from the shared (Redis) level: images made on another replica",
        )
        .expect("metric");
        let singleflight_remote = IntCounter::new(
            "kleingate_singleflight_remote_total",
            "Requests answered by an identical request's generation on another replica",
        )
        .expect("metric");
        let inflight = IntGauge::new(
            "kleingate_inflight_requests",
            "Generate requests currently being handled",
        )
        .expect("metric");

        let local_queue_depth = IntGaugeVec::new(
            Opts::new(
                "kleingate_local_queue_depth",
                "Requests waiting for the local engine's device",
            ),
            &["backend"],
        )
        .expect("metric");
        let local_batch_size = HistogramVec::new(
            HistogramOpts::new(
                "kleingate_local_batch_size",
                "Requests run together in one local engine batch",
            )
            .buckets(vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0, 32.0]),
            &["backend"],
        )
        .expect("metric");
        let local_stage_seconds = HistogramVec::new(
            HistogramOpts::new(
                "kleingate_local_stage_seconds",
                "Time of each local engine stage per batch: text_encoder, vae_encode, step (each denoising step), vae_decode, safety",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["backend", "stage"],
        )
        .expect("metric");
        let local_images = IntCounterVec::new(
            Opts::new(
                "kleingate_local_images_total",
                "Images generated by the local engine",
            ),
            &["backend", "model"],
        )
        .expect("metric");
        let cost_usd = CounterVec::new(
            Opts::new(
                "kleingate_cost_usd_total",
                "Estimated or measured USD spent on backend generations (cache hits and coalesced requests cost nothing)",
            ),
            &["backend", "model"],
        )
        .expect("metric");
        let experiment_assignments = IntCounterVec::new(
            Opts::new(
                "kleingate_experiment_assignments_total",
                "Requests assigned to each experiment variant",
            ),
            &["experiment", "variant"],
        )
        .expect("metric");
        let experiment_feedback = IntCounterVec::new(
            Opts::new(
                "kleingate_experiment_feedback_total",
                "Feedback scores received per experiment variant",
            ),
            &["experiment", "variant"],
        )
        .expect("metric");
        let experiment_score_sum = CounterVec::new(
            Opts::new(
                "kleingate_experiment_score_sum",
                "Sum of the feedback scores (1-5) per variant; divide by kleingate_experiment_feedback_total",
            ),
            &["experiment", "variant"],
        )
        .expect("metric");
        let experiment_latency = HistogramVec::new(
            HistogramOpts::new(
                "kleingate_experiment_latency_seconds",
                "Latency of the answers that measure a variant (not cached, no fallback)",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["experiment", "variant"],
        )
        .expect("metric");
        let experiment_cost_usd = CounterVec::new(
            Opts::new(
                "kleingate_experiment_cost_usd_total",
                "Cost of the answers that measure a variant (not cached, no fallback)",
            ),
            &["experiment", "variant"],
        )
        .expect("metric");
        let rejected = IntCounterVec::new(
            Opts::new(
                "kleingate_rejected_total",
                "Requests refused before any work: unauthorized, forbidden, rate_limited, overloaded",
            ),
            &["reason"],
        )
        .expect("metric");
        let http_responses = IntCounterVec::new(
            Opts::new(
                "kleingate_http_responses_total",
                "Every HTTP response, by route template and status (requests in = responses out)",
            ),
            &["route", "status"],
        )
        .expect("metric");
        let shadow_runs = IntCounterVec::new(
            Opts::new(
                "kleingate_shadow_runs_total",
                "Shadow runs by outcome: ran, failed, or skipped (no_capacity, budget, scope, draining)",
            ),
            &["experiment", "outcome"],
        )
        .expect("metric");
        let storage_pruned = IntCounterVec::new(
            Opts::new(
                "kleingate_storage_pruned_total",
                "Stored experiment rows deleted by the retention settings, by kind (image, result)",
            ),
            &["kind"],
        )
        .expect("metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(shadow_runs.clone()),
            Box::new(storage_pruned.clone()),
            Box::new(rejected.clone()),
            Box::new(http_responses.clone()),
            Box::new(experiment_latency.clone()),
            Box::new(experiment_cost_usd.clone()),
            Box::new(experiment_assignments.clone()),
            Box::new(experiment_feedback.clone()),
            Box::new(experiment_score_sum.clone()),
            Box::new(cost_usd.clone()),
            Box::new(request_duration.clone()),
            Box::new(backend_duration.clone()),
            Box::new(overhead.clone()),
            Box::new(fallbacks.clone()),
            Box::new(circuit_state.clone()),
            Box::new(backend_inflight.clone()),
            Box::new(backend_ready.clone()),
            Box::new(endpoint_inflight.clone()),
            Box::new(endpoint_ready.clone()),
            Box::new(cache_hits.clone()),
            Box::new(cache_misses.clone()),
            Box::new(cache_evictions.clone()),
            Box::new(cache_bytes.clone()),
            Box::new(cache_entries.clone()),
            Box::new(singleflight_coalesced.clone()),
            Box::new(state_store_up.clone()),
            Box::new(state_store_errors.clone()),
            Box::new(cache_shared_hits.clone()),
            Box::new(storage_pending_records.clone()),
            Box::new(storage_write_failures.clone()),
            Box::new(storage_dropped_records.clone()),
            Box::new(singleflight_remote.clone()),
            Box::new(inflight.clone()),
            Box::new(local_queue_depth.clone()),
            Box::new(local_batch_size.clone()),
            Box::new(local_stage_seconds.clone()),
            Box::new(local_images.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            requests,
            request_duration,
            backend_duration,
            overhead,
            fallbacks,
            circuit_state,
            backend_inflight,
            backend_ready,
            endpoint_inflight,
            endpoint_ready,
            cache_hits,
            cache_misses,
            cache_evictions,
            cache_bytes,
            cache_entries,
            singleflight_coalesced,
            state_store_up,
            state_store_errors,
            cache_shared_hits,
            storage_pending_records,
            storage_write_failures,
            storage_dropped_records,
            singleflight_remote,
            inflight,
            local_queue_depth,
            local_batch_size,
            local_stage_seconds,
            local_images,
            cost_usd,
            experiment_assignments,
            experiment_feedback,
            experiment_score_sum,
            experiment_latency,
            experiment_cost_usd,
            rejected,
            http_responses,
            shadow_runs,
            storage_pruned,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("prometheus text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Keeps `kleingate_inflight_requests` right even when a client disconnects mid-request and the
/// handler future is dropped.
pub struct InflightGuard(IntGauge);

impl InflightGuard {
    pub fn new(g: &IntGauge) -> Self {
        g.inc();
        InflightGuard(g.clone())
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(feature = "local")]
/// The local engine's reports, as Prometheus metrics labelled with the backend's name.
pub struct EngineMetrics {
    pub backend: String,
    pub queue_depth: IntGaugeVec,
    pub batch_size: HistogramVec,
    pub stage_seconds: HistogramVec,
    pub images: IntCounterVec,
}

#[cfg(feature = "local")]
impl EngineMetrics {
    pub fn new(backend: &str, m: &Metrics) -> Self {
        EngineMetrics {
            backend: backend.to_owned(),
            queue_depth: m.local_queue_depth.clone(),
            batch_size: m.local_batch_size.clone(),
            stage_seconds: m.local_stage_seconds.clone(),
            images: m.local_images.clone(),
        }
    }
}

#[cfg(feature = "local")]
impl kleingate_local::backend::EngineObserver for EngineMetrics {
    fn queue_depth(&self, depth: usize) {
        self.queue_depth
            .with_label_values(&[&self.backend])
            .set(depth as i64);
    }
    fn batch(&self, size: usize) {
        self.batch_size
            .with_label_values(&[&self.backend])
            .observe(size as f64);
    }
    fn stage(&self, stage: &'static str, time: std::time::Duration) {
        self.stage_seconds
            .with_label_values(&[&self.backend, stage])
            .observe(time.as_secs_f64());
    }
    fn images(&self, model: kleingate_protocol::Model, count: usize) {
        self.images
            .with_label_values(&[&self.backend, model.id()])
            .inc_by(count as u64);
    }
}
