//! Backend for the hosted Verda FLUX.2 [klein] endpoints, and for anything that speaks the same
//! protocol (notably another kleingate running the local engine on a GPU node).
//!
//! `POST {base_url}/{model}/generate` with `Authorization: Bearer <token>`. The upstream answers
//! either raw image bytes with `X-Seed` / `X-Has-Nsfw-Content` headers or a JSON object carrying
//! the image as base64; both are read, the JSON one tolerantly because Verda's exact field names
//! are not documented to us.

pub mod pool;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use kleingate_backend::{
    Backend, BackendError, CostModel, EndpointStatus, GeneratedImage, Health, TraceHeaders,
};
use kleingate_protocol::{GenerateRequest, Model, OutputFormat};
pub use pool::PoolSettings;
use pool::{Endpoint, Pool};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use serde_json::Value;
use tracing::Instrument as _;

/// A bearer token. Its `Debug` never shows the secret, so it cannot leak through logs.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(token: impl Into<String>) -> Self {
        ApiKey(token.into())
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

#[derive(Clone, Debug)]
pub struct VerdaConfig {
    /// E.g. `https://inference.datacrunch.io`; the model id and `/generate` are appended. With
    /// [`Discovery::Dns`], its host is resolved to the pool's endpoints.
    pub base_url: String,
    /// A fixed pool of endpoint roots instead of `base_url` (which is then empty).
    pub endpoints: Vec<String>,
    pub discovery: Discovery,
    pub pool: PoolSettings,
    pub api_key: Option<ApiKey>,
    pub models: Vec<Model>,
    pub connect_timeout: Duration,
    /// Answers larger than this are refused (502) instead of being buffered.
    pub max_response_bytes: usize,
    pub cost: CostModel,
    /// Idle keep-alive connections kept per host.
    pub pool_max_idle: usize,
    /// The caller's trace context for each request (`kleingate_backend::no_trace_headers`
    /// for none).
    pub trace_headers: TraceHeaders,
}

/// Where a backend's endpoints come from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Discovery {
    /// `base_url`, or the `endpoints` listed.
    Static,
    /// Every address `base_url`'s host resolves to, re-resolved every `interval` (a Kubernetes
    /// headless Service).
    Dns { interval: Duration },
}

#[derive(Debug, thiserror::Error)]
pub enum VerdaConfigError {
    #[error("base_url `{0}` must start with http:// or https://")]
    BadUrl(String),
    #[error("give either base_url or endpoints, not both; and at least one")]
    Endpoints,
    #[error("discovery = \"dns\" needs a base_url with a host name, and no endpoints list")]
    Discovery,
    #[error("the API key contains characters not allowed in an HTTP header")]
    BadKey,
    #[error("could not build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

pub struct VerdaBackend {
    pool: Arc<Pool>,
    auth: Option<HeaderValue>,
    models: Vec<Model>,
    max_response_bytes: usize,
    cost: CostModel,
    trace_headers: TraceHeaders,
}

/// One endpoint's HTTP client: its own connections (so that requests spread over the pool
/// instead of riding a few kept-alive connections), pinned to `pin` when it is a resolved
/// address of a name.
fn http_client(
    cfg: &VerdaConfig,
    pin: Option<(&str, std::net::SocketAddr)>,
) -> Result<reqwest::Client, reqwest::Error> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(cfg.connect_timeout)
        .pool_max_idle_per_host(cfg.pool_max_idle)
        .tcp_nodelay(true)
        .user_agent(concat!("kleingate/", env!("CARGO_PKG_VERSION")));
    if let Some((host, addr)) = pin {
        b = b.resolve(host, addr);
    }
    b.build()
}

/// `host:port` of a URL root: how an endpoint is named (never with credentials).
fn label(url: &reqwest::Url) -> String {
    let host = url.host_str().unwrap_or("?");
    match url.port_or_known_default() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    }
}

fn root(url: &str) -> Result<(String, reqwest::Url), VerdaConfigError> {
    let base = url.trim_end_matches('/').to_owned();
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(VerdaConfigError::BadUrl(url.to_owned()));
    }
    let parsed =
        reqwest::Url::parse(&base).map_err(|_| VerdaConfigError::BadUrl(url.to_owned()))?;
    if parsed.host_str().is_none() {
        return Err(VerdaConfigError::BadUrl(url.to_owned()));
    }
    Ok((base, parsed))
}

impl VerdaBackend {
    pub fn new(cfg: VerdaConfig) -> Result<Self, VerdaConfigError> {
        let auth = match &cfg.api_key {
            Some(ApiKey(token)) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| VerdaConfigError::BadKey)?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let pool = match cfg.discovery {
            Discovery::Static => {
                let roots: Vec<&String> = if cfg.endpoints.is_empty() {
                    vec![&cfg.base_url]
                } else if cfg.base_url.is_empty() {
                    cfg.endpoints.iter().collect()
                } else {
                    return Err(VerdaConfigError::Endpoints);
                };
                let mut members = Vec::with_capacity(roots.len());
                for r in roots {
                    let (base, url) = root(r)?;
                    members.push(Endpoint::new(base, label(&url), http_client(&cfg, None)?));
                }
                Arc::new(Pool::fixed(members, cfg.pool.clone()))
            }
            Discovery::Dns { interval } => {
                if !cfg.endpoints.is_empty() {
                    return Err(VerdaConfigError::Discovery);
                }
                let (base, url) = root(&cfg.base_url)?;
                // A name to resolve (an IP address has nothing to discover), and its port.
                let (Some(host), Some(port)) =
                    (url.domain().map(str::to_owned), url.port_or_known_default())
                else {
                    return Err(VerdaConfigError::Discovery);
                };
                // Checked once here: the per-address clients below differ only by their pin.
                http_client(&cfg, None)?;
                let pool = Arc::new(Pool::resolved(host.clone(), cfg.pool.clone()));
                let make_cfg = cfg.clone();
                let make_host = host.clone();
                pool::spawn_discovery(Arc::downgrade(&pool), host, port, interval, move |addr| {
                    let client = http_client(&make_cfg, Some((&make_host, addr))).ok()?;
                    Some(Endpoint::new(base.clone(), addr.to_string(), client))
                });
                pool
            }
        };
        Ok(VerdaBackend {
            pool,
            auth,
            models: cfg.models,
            max_response_bytes: cfg.max_response_bytes,
            cost: cfg.cost,
            trace_headers: cfg.trace_headers,
        })
    }

    /// One request to one endpoint.
    async fn send(
        &self,
        ep: &Endpoint,
        req: &GenerateRequest,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<GeneratedImage, BackendError> {
        let url = format!("{}/{}/generate", ep.base, req.model.id());
        let mut rb = ep
            .client
            .post(url)
            .timeout(timeout)
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(auth) = &self.auth {
            rb = rb.header(AUTHORIZATION, auth.clone());
        }
        for (name, value) in (self.trace_headers)() {
            rb = rb.header(name, value);
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| Self::map_send_error(e, timeout))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = self.read_limited(resp, timeout).await?;
        if status.is_success() {
            parse_success(req, &headers, body)
        } else {
            Err(map_error_status(status, &headers, &body))
        }
    }

    fn map_send_error(e: reqwest::Error, timeout: Duration) -> BackendError {
        // A connection that could not be made in time is an unreachable upstream (handed to
        // another endpoint of a pool), not a slow answer.
        if e.is_connect() {
            BackendError::Connect(error_chain(&e))
        } else if e.is_timeout() {
            BackendError::Timeout(timeout)
        } else if e.is_body() || e.is_decode() {
            BackendError::BadResponse(format!("reading the body failed: {e}"))
        } else {
            // Connection refused, reset, DNS failure, TLS failure: the backend is not reachable.
            BackendError::Connect(error_chain(&e))
        }
    }

    async fn read_limited(
        &self,
        mut resp: reqwest::Response,
        timeout: Duration,
    ) -> Result<Bytes, BackendError> {
        let max = self.max_response_bytes;
        if let Some(len) = resp.content_length() {
            if len > max as u64 {
                return Err(BackendError::BadResponse(format!(
                    "the answer is {len} bytes, over the limit of {max} bytes"
                )));
            }
        }
        let mut first: Option<Bytes> = None;
        // Sized once from Content-Length (already checked against the limit): no regrowth.
        let mut buf = BytesMut::with_capacity(resp.content_length().unwrap_or(0) as usize);
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| Self::map_send_error(e, timeout))?
        {
            let total = buf.len() + first.as_ref().map_or(0, Bytes::len) + chunk.len();
            if total > max {
                return Err(BackendError::BadResponse(format!(
                    "the answer is over the limit of {max} bytes"
                )));
            }
            // Most answers arrive as one chunk: keep it as is instead of copying.
            match first.take() {
                None if buf.is_empty() => first = Some(chunk),
                Some(f) => {
                    buf.extend_from_slice(&f);
                    buf.extend_from_slice(&chunk);
                }
                None => buf.extend_from_slice(&chunk),
            }
        }
        Ok(first.unwrap_or_else(|| buf.freeze()))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[async_trait]
impl Backend for VerdaBackend {
    fn kind(&self) -> &'static str {
        "verda"
    }

    fn models(&self) -> &[Model] {
        &self.models
    }

    /// To the pool's least loaded endpoint; a busy (503/429) or unreachable one hands the
    /// request to another endpoint of the pool, within the same deadline, before the error
    /// reaches the gateway (which then moves to its next backend).
    async fn generate(
        &self,
        req: &GenerateRequest,
        timeout: Duration,
    ) -> Result<GeneratedImage, BackendError> {
        let body = serde_json::to_vec(&req.to_upstream_json())
            .map_err(|e| BackendError::Failed(format!("could not encode the request: {e}")))?;
        let deadline = Instant::now() + timeout;
        let mut tried: Vec<Arc<Endpoint>> = Vec::new();
        // The first busy answer, and the last error of any other kind that hands over.
        let mut busy: Option<BackendError> = None;
        let mut last: Option<BackendError> = None;
        while let Some(ep) = self.pool.pick(&tried) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BackendError::Timeout(timeout));
            }
            tried.push(ep.clone());
            // Counts the call in flight; a call cancelled by the gateway's own deadline is
            // booked as a timeout of this endpoint when the guard drops.
            let mut call = self.pool.call(&ep, timeout);
            // The HTTP call, in traces: which endpoint of the pool served the attempt.
            let span = tracing::info_span!(
                "endpoint",
                otel.name = %format_args!("POST {}", ep.label),
                otel.kind = "client",
                server.address = %ep.label,
            );
            let result = self
                .send(&ep, req, body.clone(), left)
                .instrument(span)
                .await;
            call.settle(result.as_ref().map(|_| ()));
            match result {
                Ok(image) => return Ok(image),
                Err(e @ (BackendError::Unavailable { .. } | BackendError::Connect(_))) => {
                    if self.pool.members().len() > 1 {
                        tracing::debug!(endpoint = %ep.label, error = %e, "endpoint unavailable; trying another of the pool");
                    }
                    match e {
                        BackendError::Unavailable { .. } if busy.is_none() => busy = Some(e),
                        e => last = Some(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let pool_of_many = self.pool.members().len() > 1;
        Err(match (busy, last) {
            // A worker of the pool is busy (not down): the pool is busy until the first one is
            // back, which trips no circuit. (A pool of one passes its upstream's answer on.)
            (
                Some(BackendError::Unavailable {
                    message,
                    retry_after,
                }),
                _,
            ) if pool_of_many => BackendError::Unavailable {
                message,
                retry_after: self.pool.soonest_eligible().or(retry_after),
            },
            (Some(e), None) | (_, Some(e)) => e,
            (None, None) => BackendError::Connect(match self.pool.health() {
                Health::Loading { message } | Health::Down { message } => message,
                Health::Ready => "no endpoint".to_owned(),
            }),
        })
    }

    fn health(&self) -> Health {
        self.pool.health()
    }

    fn endpoints(&self) -> Vec<EndpointStatus> {
        self.pool.statuses()
    }

    fn cost_estimate(&self, req: &GenerateRequest) -> Option<f64> {
        self.cost.estimate(req)
    }
}

/// The longest `Retry-After` taken from an upstream: a wrong or hostile value must not park a
/// backend (or tell our clients to wait) for days.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Upstream error messages are passed on to clients and logs, cut to this many characters.
const MAX_MESSAGE_CHARS: usize = 300;

/// Turn an upstream error answer into a [`BackendError`], keeping the upstream's own message.
pub fn map_error_status(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> BackendError {
    let (message, field) = error_message(body);
    let message = if message.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        message
    };
    let retry_after = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
    match status.as_u16() {
        400 | 413 | 422 => BackendError::InvalidRequest { message, field },
        401..=403 => BackendError::Unauthorized {
            status: status.as_u16(),
            message,
        },
        429 | 503 => BackendError::Unavailable {
            message,
            retry_after,
        },
        s => BackendError::Upstream { status: s, message },
    }
}

/// Pull a human message (and a field name, if any) out of an error body of unknown shape.
fn error_message(body: &[u8]) -> (String, Option<String>) {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        let err = v.get("error").unwrap_or(&v);
        let field = err.get("field").and_then(Value::as_str).map(clip);
        for key in ["message", "detail", "error", "msg"] {
            if let Some(s) = err.get(key).and_then(Value::as_str) {
                return (clip(s), field);
            }
        }
        if let Some(s) = err.as_str() {
            return (clip(s), field);
        }
    }
    (clip(&String::from_utf8_lossy(body)), None)
}

/// At most [`MAX_MESSAGE_CHARS`] characters of `text`, trimmed, with an ellipsis when cut.
fn clip(text: &str) -> String {
    let text = text.trim();
    let mut t: String = text.chars().take(MAX_MESSAGE_CHARS).collect();
    if text.len() > t.len() {
        t.push('…');
    }
    t
}

fn parse_success(
    req: &GenerateRequest,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<GeneratedImage, BackendError> {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if content_type.starts_with("application/json") || content_type.ends_with("+json") {
        return parse_json_success(req, &body);
    }
    let format = OutputFormat::sniff(&body).ok_or_else(|| {
        BackendError::BadResponse(format!(
            "the answer ({} bytes, Content-Type `{content_type}`) is not a jpeg, png or webp image",
            body.len()
        ))
    })?;
    let seed = match headers.get("x-seed") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| BackendError::BadResponse("X-Seed is not an integer".into()))?,
        ),
        None => req.seed,
    };
    let has_nsfw_content = headers
        .get("x-has-nsfw-content")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|s| matches!(s.trim().to_ascii_lowercase().as_str(), "true" | "1"));
    Ok(GeneratedImage {
        bytes: body,
        format,
        seed,
        has_nsfw_content,
        cost_usd: upstream_cost(headers),
    })
}

fn find_image_text(v: &Value) -> Option<&str> {
    for key in [
        "image",
        "image_base64",
        "b64_json",
        "base64",
        "data",
        "output",
    ] {
        match v.get(key) {
            Some(Value::String(s)) => return Some(s),
            Some(inner @ Value::Object(_)) => {
                if let Some(s) = find_image_text(inner) {
                    return Some(s);
                }
            }
            _ => {}
        }
    }
    for key in ["images", "data", "output"] {
        if let Some(first) = v.get(key).and_then(Value::as_array).and_then(|a| a.first()) {
            if let Some(s) = first.as_str() {
                return Some(s);
            }
            if let Some(s) = find_image_text(first) {
                return Some(s);
            }
        }
    }
    None
}

fn parse_json_success(req: &GenerateRequest, body: &[u8]) -> Result<GeneratedImage, BackendError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| BackendError::BadResponse(format!("the JSON answer is malformed: {e}")))?;
    let text = find_image_text(&v)
        .ok_or_else(|| BackendError::BadResponse("the JSON answer holds no image".into()))?;
    let payload = match text.find(";base64,") {
        Some(i) if text.starts_with("data:") => &text[i + ";base64,".len()..],
        _ => text,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload)
        .map_err(|e| BackendError::BadResponse(format!("the image is not valid base64: {e}")))?;
    let format = OutputFormat::sniff(&bytes).ok_or_else(|| {
        BackendError::BadResponse("the decoded image is not a jpeg, png or webp".into())
    })?;
    let seed = v
        .get("seed")
        .and_then(|s| {
            s.as_u64()
                .or_else(|| s.as_str().and_then(|t| t.parse().ok()))
        })
        .or(req.seed);
    let nsfw = [
        "has_nsfw_content",
        "has_nsfw_concepts",
        "nsfw_content_detected",
        "nsfw",
    ]
    .iter()
    .filter_map(|k| v.get(*k))
    .any(|f| match f {
        Value::Bool(b) => *b,
        Value::Array(a) => a.iter().any(|x| x.as_bool() == Some(true)),
        _ => false,
    });
    Ok(GeneratedImage {
        bytes: Bytes::from(bytes),
        format,
        seed,
        has_nsfw_content: nsfw,
        cost_usd: None,
    })
}

/// Another kleingate upstream (a GPU worker running the local engine) reports what the image
/// cost it in `X-Kleingate-Cost`; that measured figure beats our price-list estimate.
fn upstream_cost(headers: &HeaderMap) -> Option<f64> {
    headers
        .get("x-kleingate-cost")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|c| c.is_finite() && *c >= 0.0)
}

/// The property the `answer` fuzz target checks (also replayed on stable by
/// `tests/fuzz_regressions.rs`): an upstream answer of any shape never panics the parser, a
/// success holds a real image, and what an error carries to clients is bounded. Panics on a
/// violation. Input: one byte choosing the status, header lines up to an empty line, the body.
#[cfg(feature = "fuzzing")]
pub mod fuzz_checks {
    use super::*;
    use reqwest::header::HeaderName;

    pub fn answer(data: &[u8]) {
        const STATUSES: [u16; 12] = [200, 200, 200, 400, 401, 403, 413, 429, 500, 502, 503, 504];
        let Some((&first, rest)) = data.split_first() else {
            return;
        };
        let status = StatusCode::from_u16(STATUSES[usize::from(first) % STATUSES.len()])
            .expect("a valid status");
        let (head, body) = match rest.windows(2).position(|w| w == b"\n\n") {
            Some(i) => (&rest[..i], &rest[i + 2..]),
            None => (&[][..], rest),
        };
        let mut headers = HeaderMap::new();
        for line in head.split(|b| *b == b'\n') {
            if let Some(i) = line.iter().position(|b| *b == b':') {
                let value = line[i + 1..].trim_ascii();
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(&line[..i]),
                    HeaderValue::from_bytes(value),
                ) {
                    headers.append(n, v);
                }
            }
        }
        let req = GenerateRequest::from_json(
            br#"{"prompt":"x"}"#,
            None,
            Model::Klein4b,
            &kleingate_protocol::Limits::default(),
        )
        .expect("a valid request");
        if status == StatusCode::OK {
            if let Ok(img) = parse_success(&req, &headers, Bytes::copy_from_slice(body)) {
                assert_eq!(OutputFormat::sniff(&img.bytes), Some(img.format));
                assert!(img.cost_usd.is_none_or(|c| c.is_finite() && c >= 0.0));
            }
            return;
        }
        let bounded = |m: &str| {
            assert!(
                m.chars().count() <= MAX_MESSAGE_CHARS + 1,
                "{} chars",
                m.len()
            )
        };
        match map_error_status(status, &headers, body) {
            BackendError::InvalidRequest { message, field } => {
                bounded(&message);
                if let Some(f) = field {
                    bounded(&f);
                }
            }
            BackendError::Unavailable {
                message,
                retry_after,
            } => {
                bounded(&message);
                assert!(retry_after.is_none_or(|d| d <= MAX_RETRY_AFTER));
            }
            BackendError::Unauthorized { message, .. } | BackendError::Upstream { message, .. } => {
                bounded(&message)
            }
            other => panic!("an error status became {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kleingate_protocol::Limits;

    fn req() -> GenerateRequest {
        GenerateRequest::from_json(
            br#"{"prompt":"x","seed":9}"#,
            None,
            Model::Klein4b,
            &Limits::default(),
        )
        .unwrap()
    }

    #[test]
    fn maps_statuses_to_what_the_gateway_must_do() {
        let h = HeaderMap::new();
        let e = map_error_status(
            StatusCode::BAD_REQUEST,
            &h,
            br#"{"error":{"message":"width bad","field":"width"}}"#,
        );
        assert_eq!(
            e,
            BackendError::InvalidRequest {
                message: "width bad".into(),
                field: Some("width".into())
            }
        );
        assert!(!e.should_fall_back());
        let mut h503 = HeaderMap::new();
        h503.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        let e = map_error_status(StatusCode::SERVICE_UNAVAILABLE, &h503, b"model not loaded");
        assert_eq!(
            e,
            BackendError::Unavailable {
                message: "model not loaded".into(),
                retry_after: Some(Duration::from_secs(7))
            }
        );
        assert!(e.should_fall_back() && !e.trips_circuit());
        let e = map_error_status(StatusCode::PAYMENT_REQUIRED, &h, b"");
        assert!(matches!(e, BackendError::Unauthorized { status: 402, .. }) && e.trips_circuit());
        let e = map_error_status(
            StatusCode::INTERNAL_SERVER_ERROR,
            &h,
            br#"{"detail":"boom"}"#,
        );
        assert_eq!(
            e,
            BackendError::Upstream {
                status: 500,
                message: "boom".into()
            }
        );
    }

    #[test]
    fn reads_binary_and_tolerant_json() {
        let jpeg = Bytes::from_static(&[0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3]);
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("image/jpeg"));
        h.insert("x-seed", HeaderValue::from_static("1234"));
        h.insert("x-has-nsfw-content", HeaderValue::from_static("True"));
        let img = parse_success(&req(), &h, jpeg.clone()).unwrap();
        assert_eq!(
            (img.seed, img.has_nsfw_content, img.format),
            (Some(1234), true, OutputFormat::Jpeg)
        );
        assert_eq!(img.bytes, jpeg);

        let b64 = base64::engine::general_purpose::STANDARD.encode(&jpeg);
        let mut hj = HeaderMap::new();
        hj.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for body in [
            serde_json::json!({"image": b64, "seed": 5, "has_nsfw_content": false}),
            serde_json::json!({"images": [format!("data:image/jpeg;base64,{b64}")], "seed": "5"}),
            serde_json::json!({"data": [{"b64_json": b64}], "seed": 5, "has_nsfw_concepts": [false]}),
        ] {
            let img = parse_success(&req(), &hj, Bytes::from(body.to_string())).unwrap();
            assert_eq!(
                (img.bytes.clone(), img.seed),
                (jpeg.clone(), Some(5)),
                "{body}"
            );
        }
        let e = parse_success(&req(), &hj, Bytes::from_static(b"{\"image\": 12")).unwrap_err();
        assert!(matches!(e, BackendError::BadResponse(_)));
        let e = parse_success(&req(), &h, Bytes::from_static(b"<html>oops</html>")).unwrap_err();
        assert!(matches!(e, BackendError::BadResponse(_)));
    }

    #[test]
    fn api_key_debug_is_redacted() {
        assert!(!format!("{:?}", ApiKey::new("sk-secret")).contains("secret"));
    }
}
