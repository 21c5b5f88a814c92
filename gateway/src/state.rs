//! Shared state of a running gateway: the configured backends with their breakers and
//! concurrency limits, the cache and the metrics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kleingate_backend::Backend;
use kleingate_protocol::Model;
use kleingate_verda::{ApiKey, Discovery, PoolSettings, VerdaBackend, VerdaConfig};
use tokio::sync::Semaphore;

use crate::cache::ImageCache;
use crate::circuit::{CircuitBreaker, CircuitState};
use crate::config::{Config, DiscoveryKind, Kind};
#[cfg(feature = "local")]
use crate::metrics::EngineMetrics;
use crate::metrics::Metrics;
#[cfg(feature = "local")]
use kleingate_local::backend::{LocalBackend, LocalConfig};

/// One configured backend and the gateway's bookkeeping around it.
pub struct BackendSlot {
    pub name: Arc<str>,
    pub backend: Arc<dyn Backend>,
    pub breaker: CircuitBreaker,
    pub permits: Arc<Semaphore>,
    pub max_concurrency: usize,
    pub timeout: Duration,
    pub weight: u32,
    /// For `policy = "cost"`: the p95 latency this backend must keep to be preferred.
    pub latency_objective: Option<Duration>,
    latencies: Mutex<LatencyWindows>,
    /// Set from an upstream's `Retry-After`: do not send it work before then, except one probe
    /// every `busy_probe` (the time of the last one is kept beside it).
    busy_until: Mutex<Busy>,
    max_retry_after: Duration,
    busy_probe: Duration,
    last_error: Mutex<Option<String>>,
}

/// A sliding window of the last `size` successful latencies per model, each forgotten after
/// [`LATENCY_MAX_AGE`]: a backend routed around for being slow gets traffic again once its old
/// samples expire, so it can show that it recovered.
struct LatencyWindows {
    size: usize,
    by_model: HashMap<Model, std::collections::VecDeque<(Instant, Duration)>>,
}

const LATENCY_MAX_AGE: Duration = Duration::from_secs(300);

#[derive(Default)]
struct Busy {
    until: Option<Instant>,
    /// When the current back-off began, or its last probe was let through.
    last_probe: Option<Instant>,
}

impl BackendSlot {
    pub fn new(
        name: &str,
        backend: Arc<dyn Backend>,
        cfg: &Config,
        max_concurrency: usize,
        timeout: Duration,
        weight: u32,
        latency_objective: Option<Duration>,
    ) -> Self {
        BackendSlot {
            latency_objective,
            latencies: Mutex::new(LatencyWindows {
                size: cfg.routing.latency_window.max(1),
                by_model: HashMap::new(),
            }),
            name: Arc::from(name),
            backend,
            breaker: CircuitBreaker::new(
                cfg.circuit.failure_threshold,
                Duration::from_secs_f64(cfg.circuit.cooldown_secs),
            ),
            permits: Arc::new(Semaphore::new(max_concurrency)),
            max_concurrency,
            timeout,
            weight,
            busy_until: Mutex::new(Busy::default()),
            max_retry_after: Duration::from_secs_f64(cfg.routing.max_retry_after_secs),
            busy_probe: Duration::from_secs_f64(cfg.routing.busy_probe_secs),
            last_error: Mutex::new(None),
        }
    }

    /// Record a successful generation's latency (for the cost policy's objective check).
    pub fn record_latency(&self, model: Model, took: Duration) {
        let mut w = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        let size = w.size;
        let q = w.by_model.entry(model).or_default();
        if q.len() == size {
            q.pop_front();
        }
        q.push_back((Instant::now(), took));
    }

    /// The 95th percentile of the recent successful latencies for `model` (nearest rank), `None`
    /// before the first.
    pub fn p95(&self, model: Model) -> Option<Duration> {
        let w = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<Duration> = w
            .by_model
            .get(&model)?
            .iter()
            .filter(|(at, _)| at.elapsed() < LATENCY_MAX_AGE)
            .map(|(_, d)| *d)
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let rank = (0.95 * v.len() as f64).ceil() as usize;
        Some(v[rank.clamp(1, v.len()) - 1])
    }

    /// Loaded and not circuit-open: what `/readyz` and the `kleingate_backend_ready` gauge report.
    pub fn is_ready(&self) -> bool {
        self.available() && matches!(self.backend.health(), kleingate_backend::Health::Ready)
    }

    pub fn inflight(&self) -> usize {
        self.max_concurrency - self.permits.available_permits()
    }

    fn busy(&self) -> std::sync::MutexGuard<'_, Busy> {
        self.busy_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn busy_for(&self) -> Option<Duration> {
        let until = self.busy().until?;
        until.checked_duration_since(Instant::now())
    }

    /// Back off for `d` (an upstream's `Retry-After`), at most `routing.max_retry_after_secs`;
    /// returns the time actually taken.
    pub fn set_busy_for(&self, d: Duration) -> Duration {
        let d = d.min(self.max_retry_after);
        let now = Instant::now();
        // Saturating: however long a backend asks for, this must not overflow.
        let until = now
            .checked_add(d)
            .unwrap_or_else(|| now + Duration::from_secs(86_400));
        let mut b = self.busy();
        b.until = Some(until);
        b.last_probe = Some(now);
        d
    }

    /// While backing off: is a probe due (without taking it)?
    pub fn busy_probe_due(&self) -> bool {
        self.probe_due(&self.busy(), Instant::now())
    }

    /// While backing off: may one request go through now as a probe? At most one every
    /// `routing.busy_probe_secs`.
    pub fn take_busy_probe(&self) -> bool {
        let mut b = self.busy();
        let now = Instant::now();
        let due = self.probe_due(&b, now);
        if due {
            b.last_probe = Some(now);
        }
        due
    }

    fn probe_due(&self, b: &Busy, now: Instant) -> bool {
        b.last_probe
            .is_none_or(|t| now.saturating_duration_since(t) >= self.busy_probe)
    }

    /// A success ends any back-off.
    pub fn clear_busy(&self) {
        let mut b = self.busy();
        if b.until.is_some() {
            *b = Busy::default();
        }
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_last_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }

    /// Could this backend take a request now, by the gateway's passive view?
    pub fn available(&self) -> bool {
        self.breaker.state() != CircuitState::Open
            || self.breaker.retry_in() == Some(Duration::ZERO)
    }
}

pub struct AppState {
    pub config: Config,
    /// In priority order (see [`Config::backend_order`]).
    pub backends: Vec<Arc<BackendSlot>>,
    pub by_name: HashMap<Arc<str>, Arc<BackendSlot>>,
    pub cache: ImageCache,
    pub metrics: Metrics,
    pub request_timeout: Duration,
    pub budgets: crate::budget::Budgets,
    /// What replicas share (Redis), or nothing (memory state).
    pub shared: crate::shared::SharedState,
    pub experiments: crate::experiments::Experiments,
    pub auth: crate::auth::Auth,
    pub rate_limiter: Arc<crate::admission::RateLimiter>,
    /// Requests in flight, bounded by `admission.max_inflight` (clients' and shadow runs).
    pub shedder: Arc<crate::admission::Shedder>,
    /// Work that outlives its request (shadow runs): part of the graceful drain.
    pub background: tokio_util::task::TaskTracker,
    draining: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("backend `{name}`: {message}")]
    Backend { name: String, message: String },
    #[error("{0}")]
    Storage(String),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error("fetch: {0}")]
    Fetch(String),
    #[error("{0}")]
    State(String),
}

impl AppState {
    /// Build every backend the config names (local engines start loading in the background).
    pub fn from_config(config: Config) -> Result<Arc<AppState>, BuildError> {
        let metrics = Metrics::new();
        let fetcher = kleingate_backend::SharedFetcher(Arc::new(
            crate::fetch::SafeFetcher::new(config.fetch.clone()).map_err(BuildError::Fetch)?,
        ));
        // Built (its settings checked) in every build; only the local engine fetches input
        // images by URL.
        #[cfg(not(feature = "local"))]
        drop(fetcher);
        let mut built: HashMap<String, Arc<dyn Backend>> = HashMap::new();
        // One CPU thread pool per process, sized before any engine starts (validated to agree).
        #[cfg(feature = "local")]
        let threads = config
            .backends
            .values()
            .find_map(|b| b.local().and_then(|l| l.threads));
        #[cfg(feature = "local")]
        kleingate_local::device::set_cpu_threads(threads).map_err(|e| BuildError::Backend {
            name: "threads".into(),
            message: e.to_string(),
        })?;
        for (name, b) in &config.backends {
            let c = &b.common;
            let backend: Arc<dyn Backend> = match &b.kind {
                Kind::Verda(v) => {
                    let api_key = std::env::var(&v.api_key_env).ok().filter(|k| !k.is_empty());
                    if api_key.is_none() {
                        tracing::warn!(backend = %name, env = %v.api_key_env, "no API key in the environment; requests go out without Authorization");
                    }
                    Arc::new(
                        VerdaBackend::new(VerdaConfig {
                            base_url: v.base_url.clone(),
                            endpoints: v.endpoints.clone(),
                            discovery: match v.discovery {
                                DiscoveryKind::Static => Discovery::Static,
                                DiscoveryKind::Dns => Discovery::Dns {
                                    interval: Duration::from_secs_f64(v.discovery_interval_secs),
                                },
                            },
                            pool: PoolSettings {
                                eject_after_failures: v.eject_after_failures,
                                eject_for: Duration::from_secs_f64(v.eject_secs),
                                max_retry_after: Duration::from_secs_f64(
                                    config.routing.max_retry_after_secs,
                                ),
                                ..PoolSettings::default()
                            },
                            api_key: api_key.map(ApiKey::new),
                            models: c.models.clone(),
                            connect_timeout: Duration::from_secs_f64(v.connect_timeout_secs),
                            max_response_bytes: v.max_response_bytes,
                            cost: c.cost.clone(),
                            pool_max_idle: c.max_concurrency,
                            trace_headers: crate::telemetry::trace_headers,
                        })
                        .map_err(|e| BuildError::Backend {
                            name: name.clone(),
                            message: e.to_string(),
                        })?,
                    )
                }
                #[cfg(feature = "local")]
                Kind::Local(l) => Arc::new(LocalBackend::start(
                    LocalConfig {
                        weights: l.weights.clone(),
                        device: l.device.clone(),
                        precision: l.precision(),
                        text_encoder: l.text_encoder,
                        models: c.models.clone(),
                        max_queue: l.max_queue,
                        max_batch: l.max_batch,
                        max_sequence_length: l.max_sequence_length,
                        safety_weights: l.safety_weights.clone(),
                        safety_threshold: l.safety_threshold,
                        limits: config.limits.clone(),
                        cost: c.cost.clone(),
                        fetcher: Some(fetcher.clone()),
                        reference_limits: {
                            let d = kleingate_local::reference::DecodeLimits::default();
                            kleingate_local::reference::DecodeLimits {
                                max_pixels: l.max_reference_pixels.unwrap_or(d.max_pixels),
                                max_decoded_bytes: l
                                    .max_reference_decode_mib
                                    .map_or(d.max_decoded_bytes, |m| m.saturating_mul(1 << 20)),
                            }
                        },
                        reference_timeout: l.reference_timeout(),
                    },
                    Arc::new(EngineMetrics::new(name, &metrics)),
                )),
            };
            built.insert(name.clone(), backend);
        }
        Self::assemble(config, built, metrics)
    }

    fn assemble(
        config: Config,
        mut built: HashMap<String, Arc<dyn Backend>>,
        metrics: Metrics,
    ) -> Result<Arc<AppState>, BuildError> {
        let store = if config.experiments.is_empty() {
            None
        } else {
            Some(
                crate::storage::Storage::open(&config.storage, &metrics)
                    .map_err(BuildError::Storage)?,
            )
        };
        let cache = ImageCache::new(
            config.cache.max_bytes,
            Duration::from_secs(config.cache.ttl_secs),
            metrics.cache_evictions.clone(),
        );
        let mut backends = Vec::new();
        for name in config.backend_order() {
            let (Some(b), Some(bc)) = (built.remove(&name), config.backends.get(&name)) else {
                continue;
            };
            backends.push(Arc::new(BackendSlot::new(
                &name,
                b,
                &config,
                bc.common.max_concurrency,
                Duration::from_secs_f64(bc.common.timeout_secs),
                bc.common.weight,
                bc.common
                    .latency_objective_secs
                    .map(Duration::from_secs_f64),
            )));
        }
        let by_name = backends
            .iter()
            .map(|s| (s.name.clone(), s.clone()))
            .collect();
        let names: Vec<&str> = config.backends.keys().map(String::as_str).collect();
        let auth = crate::auth::Auth::from_config(&config.auth, &names)?;
        let shared = crate::shared::SharedState::new(
            &config.state,
            Duration::from_secs(config.cache.ttl_secs),
            &metrics,
        )
        .map_err(BuildError::State)?;
        let rate_limiter = Arc::new(crate::admission::RateLimiter::new(
            &config.admission,
            &config.budget.header,
            metrics.rejected.clone(),
            shared.clone(),
        ));
        let shedder = Arc::new(crate::admission::Shedder::new(
            config.admission.max_inflight,
            metrics.rejected.clone(),
        ));
        Ok(Arc::new(AppState {
            auth,
            rate_limiter,
            shedder,
            background: tokio_util::task::TaskTracker::new(),
            request_timeout: Duration::from_secs_f64(config.request_timeout_secs),
            budgets: crate::budget::Budgets::new(config.budget.clone(), shared.clone()),
            shared,
            experiments: crate::experiments::Experiments {
                configs: config.experiments.clone(),
                store,
            },
            config,
            backends,
            by_name,
            cache,
            metrics,
            draining: AtomicBool::new(false),
        }))
    }

    pub fn serving(&self, model: Model) -> impl Iterator<Item = &Arc<BackendSlot>> {
        self.backends
            .iter()
            .filter(move |s| s.backend.serves(model))
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Ready = not shutting down and at least one backend is not known to be broken.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.backends.iter().any(|s| s.is_ready())
    }

    /// Refresh the gauges that are read off state rather than updated on the hot path.
    pub async fn refresh_gauges(&self) {
        // Endpoints come and go (DNS discovery): the gone ones are removed (not a reset, which
        // would leave a concurrent scrape without any).
        let mut current: std::collections::HashSet<(String, String)> = Default::default();
        for s in &self.backends {
            for e in s.backend.endpoints() {
                current.insert((s.name.to_string(), e.address.clone()));
                let labels = [&*s.name, e.address.as_str()];
                self.metrics
                    .endpoint_inflight
                    .with_label_values(&labels)
                    .set(e.in_flight as i64);
                self.metrics
                    .endpoint_ready
                    .with_label_values(&labels)
                    .set(i64::from(
                        e.state == kleingate_backend::EndpointState::Ready,
                    ));
            }
            self.metrics
                .circuit_state
                .with_label_values(&[&*s.name])
                .set(s.breaker.state().gauge_value());
            self.metrics
                .backend_inflight
                .with_label_values(&[&*s.name])
                .set(s.inflight() as i64);
            self.metrics
                .backend_ready
                .with_label_values(&[&*s.name])
                .set(i64::from(s.is_ready()));
        }
        // The series the gauge has are the endpoints reported before: drop those gone.
        use prometheus::core::Collector;
        for family in self.metrics.endpoint_ready.collect() {
            for m in family.get_metric() {
                let label = |name: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map_or(String::new(), |l| l.value().to_owned())
                };
                let (backend, endpoint) = (label("backend"), label("endpoint"));
                if !current.contains(&(backend.clone(), endpoint.clone())) {
                    let labels = [backend.as_str(), endpoint.as_str()];
                    let _ = self.metrics.endpoint_inflight.remove_label_values(&labels);
                    let _ = self.metrics.endpoint_ready.remove_label_values(&labels);
                }
            }
        }
        let (entries, bytes) = self.cache.usage().await;
        self.metrics.cache_entries.set(entries as i64);
        self.metrics.cache_bytes.set(bytes as i64);
    }
}
