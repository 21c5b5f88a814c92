//! The contract between the gateway and the things that make images.
//!
//! A backend takes a validated [`GenerateRequest`] and either returns the encoded image or a
//! [`BackendError`] whose variant tells the gateway what to do next: pass a client error back
//! unchanged, fall back to another backend, and whether to count it against the circuit breaker.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use kleingate_protocol::{GenerateRequest, Model, OutputFormat};
use serde::{Deserialize, Serialize};

/// An encoded image and what the backend reported about it.
#[derive(Clone, Debug, PartialEq)]
pub struct GeneratedImage {
    pub bytes: Bytes,
    pub format: OutputFormat,
    /// The seed used; `None` only when an upstream did not report one (then it is not cached).
    pub seed: Option<u64>,
    pub has_nsfw_content: bool,
    /// What this image cost, when the backend measured it (the local engine: device time at its
    /// hourly price). Otherwise the gateway uses the backend's estimate.
    pub cost_usd: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// The backend says the request itself is wrong. Passed to the client as 400; never retried
    /// elsewhere, because every backend would refuse it too.
    #[error("invalid request: {message}")]
    InvalidRequest {
        message: String,
        field: Option<String>,
    },
    /// Busy or not ready (503, 429, model still loading, local queue full). Fall back, but do not
    /// count it as a failure: busy is not broken.
    #[error("backend unavailable: {message}")]
    Unavailable {
        message: String,
        retry_after: Option<Duration>,
    },
    /// The upstream refused our credential or quota (401/402/403). Our problem, not the client's:
    /// fall back and open the circuit.
    #[error("backend refused our credentials (HTTP {status}): {message}")]
    Unauthorized { status: u16, message: String },
    #[error("backend did not answer within {0:?}")]
    Timeout(Duration),
    #[error("could not connect to backend: {0}")]
    Connect(String),
    /// Any other error status from an upstream (5xx, 404 for a model it does not serve, ...).
    #[error("backend answered HTTP {status}: {message}")]
    Upstream { status: u16, message: String },
    /// The backend answered something we cannot use (malformed body, oversized, not an image).
    #[error("backend answered nonsense: {0}")]
    BadResponse(String),
    /// The generation itself failed inside the backend.
    #[error("generation failed: {0}")]
    Failed(String),
}

impl BackendError {
    /// A short label from a closed set, for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            BackendError::InvalidRequest { .. } => "invalid_request",
            BackendError::Unavailable { .. } => "unavailable",
            BackendError::Unauthorized { .. } => "unauthorized",
            BackendError::Timeout(_) => "timeout",
            BackendError::Connect(_) => "connect",
            BackendError::Upstream { .. } => "upstream_error",
            BackendError::BadResponse(_) => "bad_response",
            BackendError::Failed(_) => "failed",
        }
    }

    /// Should the gateway try the next backend? Everything except a client error.
    pub fn should_fall_back(&self) -> bool {
        !matches!(self, BackendError::InvalidRequest { .. })
    }

    /// Does this count as a failure for the circuit breaker? Client errors and "busy" do not.
    pub fn trips_circuit(&self) -> bool {
        !matches!(
            self,
            BackendError::InvalidRequest { .. } | BackendError::Unavailable { .. }
        )
    }
}

/// Whether a backend can take work right now, as far as it knows itself. The gateway adds its own
/// passive view (circuit breaker) on top.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Health {
    Ready,
    /// Still starting (weights loading); answers 503 until ready.
    Loading {
        message: String,
    },
    Down {
        message: String,
    },
}

/// One price: USD per image = `per_image + per_megapixel * MP + per_megapixel_step * MP * steps`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Price {
    pub per_image_usd: f64,
    pub per_megapixel_usd: f64,
    pub per_megapixel_step_usd: f64,
}

impl Price {
    pub fn is_zero(&self) -> bool {
        *self == Price::default()
    }

    pub fn of(&self, megapixels: f64, steps: u32) -> f64 {
        self.per_image_usd
            + self.per_megapixel_usd * megapixels
            + self.per_megapixel_step_usd * megapixels * f64::from(steps)
    }
}

/// What a backend's images cost: a price list (a default price plus per-model prices), and for
/// the local engine the price of a device-hour, charged by the device time each image took.
/// Nothing configured means "unknown" and no estimate is given.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CostModel {
    pub per_image_usd: f64,
    pub per_megapixel_usd: f64,
    pub per_megapixel_step_usd: f64,
    /// Prices that replace the default one for a model.
    pub models: std::collections::BTreeMap<Model, Price>,
    /// local: USD per device-hour (GPU rental or amortised hardware + power).
    pub gpu_hour_usd: f64,
}

impl CostModel {
    fn default_price(&self) -> Price {
        Price {
            per_image_usd: self.per_image_usd,
            per_megapixel_usd: self.per_megapixel_usd,
            per_megapixel_step_usd: self.per_megapixel_step_usd,
        }
    }

    /// The price list's figure for `req`, `None` when it has no price for that model.
    pub fn estimate(&self, req: &GenerateRequest) -> Option<f64> {
        let price = self
            .models
            .get(&req.model)
            .copied()
            .unwrap_or_else(|| self.default_price());
        (!price.is_zero()).then(|| price.of(req.megapixels(), req.num_steps))
    }

    /// The cost of `device_time` at `gpu_hour_usd`; `None` when no hourly price is set.
    pub fn device_time(&self, device_time: Duration) -> Option<f64> {
        (self.gpu_hour_usd > 0.0).then(|| self.gpu_hour_usd * device_time.as_secs_f64() / 3600.0)
    }

    pub fn validate(&self) -> Result<(), String> {
        let prices = std::iter::once(self.default_price()).chain(self.models.values().copied());
        for p in prices {
            for v in [
                p.per_image_usd,
                p.per_megapixel_usd,
                p.per_megapixel_step_usd,
            ] {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(format!("prices must be finite and >= 0; got {v}"));
                }
            }
        }
        if !(self.gpu_hour_usd.is_finite() && self.gpu_hour_usd >= 0.0) {
            return Err(format!(
                "gpu_hour_usd must be finite and >= 0; got {}",
                self.gpu_hour_usd
            ));
        }
        Ok(())
    }
}

/// Fetches `input_images` given as URLs, for backends that need the bytes (the local engine).
/// The gateway's implementation refuses unsafe addresses; a refusal is an
/// [`BackendError::InvalidRequest`] naming `input_images[index]`.
#[async_trait]
pub trait InputFetcher: Send + Sync + 'static {
    async fn fetch(&self, index: usize, url: &str) -> Result<Vec<u8>, BackendError>;
}

/// A shared [`InputFetcher`], printable in configs.
#[derive(Clone)]
pub struct SharedFetcher(pub std::sync::Arc<dyn InputFetcher>);

impl std::fmt::Debug for SharedFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedFetcher")
    }
}

/// Where one endpoint of a backend's pool stands (`GET /v1/backends`, the metrics).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointStatus {
    /// `host:port` (or the resolved address).
    pub address: String,
    pub state: EndpointState,
    pub in_flight: usize,
    pub consecutive_failures: u32,
    /// Seconds until a busy or ejected endpoint is tried again.
    pub retry_in_secs: Option<f64>,
    /// The last failure's detail.
    pub last_error: Option<String>,
}

/// An endpoint takes requests (`ready`), is backing off after a 503/429 (`busy`), or is left out
/// after consecutive failures (`ejected`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointState {
    Ready,
    Busy,
    Ejected,
}

/// The trace context to send with a call to another service: W3C `traceparent` (and
/// `tracestate`) as `(header name, value)` pairs, for the caller's current span. The gateway owns
/// tracing and supplies the function; a backend that calls over HTTP copies the pairs onto its
/// request, so a kleingate worker's spans join the gateway's trace.
pub type TraceHeaders = fn() -> Vec<(&'static str, String)>;

/// [`TraceHeaders`] for a caller without tracing: no headers.
pub fn no_trace_headers() -> Vec<(&'static str, String)> {
    Vec::new()
}

#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// `verda`, `local`, ...: the kind named in config.
    fn kind(&self) -> &'static str;

    /// The models this backend serves.
    fn models(&self) -> &[Model];

    fn serves(&self, model: Model) -> bool {
        self.models().contains(&model)
    }

    /// Make one image. `timeout` is what is left of the request's deadline for this attempt; the
    /// backend must give up (and return [`BackendError::Timeout`]) when it runs out.
    async fn generate(
        &self,
        req: &GenerateRequest,
        timeout: Duration,
    ) -> Result<GeneratedImage, BackendError>;

    /// As [`Backend::generate`], for work no client waits for (an experiment's shadow run): a
    /// backend with a queue of its own serves it after every client's request. By default the
    /// same as `generate`.
    async fn generate_background(
        &self,
        req: &GenerateRequest,
        timeout: Duration,
    ) -> Result<GeneratedImage, BackendError> {
        self.generate(req, timeout).await
    }

    /// Can this backend run the safety checker (`enable_safety_checker`)? Backends that cannot
    /// answer `X-Has-Nsfw-Content: false` without having looked; the gateway only routes requests
    /// that ask for the check to backends that can, unless configured to skip it.
    fn checks_safety(&self) -> bool {
        true
    }

    /// Passive health: must be cheap and must not spend money (no real generation).
    fn health(&self) -> Health {
        Health::Ready
    }

    /// Estimated price of this request in USD, when known.
    fn cost_estimate(&self, req: &GenerateRequest) -> Option<f64>;

    /// The endpoints behind this backend and where each stands; none for a backend that is
    /// not a pool of remote endpoints (the local engine).
    fn endpoints(&self) -> Vec<EndpointStatus> {
        Vec::new()
    }
}

#[cfg(test)]
mod cost_tests {
    use super::*;
    use kleingate_protocol::Limits;

    fn req(json: &str) -> GenerateRequest {
        GenerateRequest::from_json(json.as_bytes(), None, Model::Klein4b, &Limits::default())
            .unwrap()
    }

    #[test]
    fn prices_follow_model_megapixels_and_steps() {
        let mut c = CostModel {
            per_image_usd: 0.001,
            per_megapixel_step_usd: 0.01,
            ..CostModel::default()
        };
        c.models.insert(
            Model::KleinBase9b,
            Price {
                per_megapixel_usd: 0.5,
                ..Price::default()
            },
        );
        // 512 x 512 = 0.262144 MP.
        let small = req(r#"{"prompt":"x","width":512,"height":512}"#);
        assert!((c.estimate(&small).unwrap() - (0.001 + 0.01 * 0.262144 * 4.0)).abs() < 1e-12);
        let base = req(
            r#"{"prompt":"x","model":"flux2-klein-base-9b","width":512,"height":512,"num_steps":30}"#,
        );
        assert!((c.estimate(&base).unwrap() - 0.5 * 0.262144).abs() < 1e-12);
        assert_eq!(CostModel::default().estimate(&small), None);
        // Device time at an hourly price.
        let local = CostModel {
            gpu_hour_usd: 7.2,
            ..CostModel::default()
        };
        assert!((local.device_time(Duration::from_millis(500)).unwrap() - 0.001).abs() < 1e-12);
        assert_eq!(
            CostModel::default().device_time(Duration::from_secs(1)),
            None
        );
        assert!(CostModel {
            per_image_usd: f64::NAN,
            ..CostModel::default()
        }
        .validate()
        .is_err());
    }
}
