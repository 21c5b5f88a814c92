//! The HTTP surface: routes, handlers and the tower layers around them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::Engine as _;
use kleingate_protocol::{GenerateRequest, ImageJson, Model};
use serde_json::json;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};

use crate::admission::GateLayer;
use crate::auth::Principal;
use crate::budget::{OnExceed, Verdict};
use crate::cache::{CachedImage, Lookup};
use crate::dispatch::{dispatch, Patience};
use crate::error::ApiError;
use crate::metrics::InflightGuard;
use crate::routing::candidates;
use crate::state::{AppState, BackendSlot};

pub const BACKEND_HEADER: &str = "x-kleingate-backend";
pub const CACHE_HEADER: &str = "x-kleingate-cache";
pub const COST_HEADER: &str = "x-kleingate-cost";
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const EXPERIMENT_HEADER: &str = "x-kleingate-experiment";
pub const VARIANT_HEADER: &str = "x-kleingate-variant";
pub const RESULT_ID_HEADER: &str = "x-kleingate-result-id";

pub fn router(state: Arc<AppState>) -> Router {
    let shed = GateLayer(state.shedder.clone());
    // Everything a client calls is behind the API key. What costs work (generate, feedback
    // writes) is also under the client's rate limit, and generate requests are shed when the
    // gateway is full; cheap reads are not limited (the vote page loads 40 images at once).
    // Experiment data needs a key with `experiments = true`. Health, readiness and metrics stay
    // open for probes and scrapers (keep /metrics off the public network; see k8s/).
    let rate = GateLayer(state.rate_limiter.clone());
    let generate = Router::new()
        .route("/generate", post(generate_default))
        .route("/{model}/generate", post(generate_for_model))
        .route_layer(shed)
        .route_layer(rate.clone());
    let feedback = Router::new()
        .route("/v1/feedback", post(feedback))
        .route_layer(rate);
    let experiments = Router::new()
        .route("/v1/experiments/{name}", get(experiment_results))
        .route("/v1/experiments/{name}/images/{id}", get(experiment_image))
        .route("/ui/experiments/{name}", get(crate::ui::experiment_page))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::require_experiments,
        ));
    let api = Router::new()
        .merge(generate)
        .merge(feedback)
        .merge(experiments)
        .route("/v1/models", get(list_models))
        .route("/v1/backends", get(list_backends))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::authenticate,
        ));
    Router::new()
        .merge(api)
        .route(
            "/ui/login",
            get(crate::ui::login_page).post(crate::ui::login),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_responses,
        ))
        .with_state(state)
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, RequestIds::new()))
}

/// Every response, by route template and status: what came in equals what went out, rejections
/// by the layers included. Also the access log (target `kleingate::access`): request id, method,
/// route, status, the key's *name* when authenticated, and the time taken.
async fn count_responses(
    State(state): State<Arc<AppState>>,
    req: Request<Body>,
    next: axum::middleware::Next,
) -> Response {
    let start = Instant::now();
    // Cheap clones (an Arc, a Bytes): nothing is formatted unless the access log is on.
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .cloned();
    let route = route.as_ref().map_or("unmatched", |p| p.as_str());
    let method = req.method().clone();
    let request_id = req.headers().get(&REQUEST_ID).cloned();
    let mut resp = next.run(req).await;
    if state.is_draining() {
        // Shutting down: keep-alive clients reconnect, and land on another replica.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    state
        .metrics
        .http_responses
        .with_label_values(&[route, resp.status().as_str()])
        .inc();
    let client = resp
        .extensions()
        .get::<Arc<Principal>>()
        .map_or("-", |p| &*p.name);
    tracing::info!(
        target: "kleingate::access",
        request_id = request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or(""),
        %method,
        route,
        status = resp.status().as_u16(),
        client,
        ms = %format_args!("{:.1}", start.elapsed().as_secs_f64() * 1e3),
    );
    resp
}

/// Request ids: a random per-process prefix and a counter. Unique across replicas without the cost
/// of a UUID per request; a client-supplied `X-Request-Id` is kept.
#[derive(Clone)]
struct RequestIds {
    prefix: u32,
    next: Arc<AtomicU64>,
}

impl RequestIds {
    fn new() -> Self {
        RequestIds {
            prefix: rand::random(),
            next: Arc::new(AtomicU64::new(1)),
        }
    }
}

impl MakeRequestId for RequestIds {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{:08x}-{n:x}", self.prefix))
            .ok()
            .map(RequestId::new)
    }
}

/// What a finished request is counted as.
struct Outcome {
    model: &'static str,
    backend: Option<Arc<str>>,
    cache: &'static str,
    /// What this request made a backend spend: 0 for cache hits, coalesced waits and errors.
    cost_usd: f64,
    /// The seed of the image served (for the experiment record).
    served_seed: Option<u64>,
    /// The client was over its daily budget when the request was routed.
    over_budget: bool,
    experiment: Option<ExperimentRun>,
    /// The image served, kept only while an experiment that stores images needs it.
    image: Option<(kleingate_protocol::OutputFormat, bytes::Bytes)>,
    /// The shadow run to start once this answer is out, if the experiment runs shadows and this
    /// request generated its image itself.
    shadow: Option<(GenerateRequest, crate::experiments::Variant)>,
}

impl Outcome {
    fn new(model: &'static str) -> Self {
        Outcome {
            model,
            backend: None,
            cache: "none",
            cost_usd: 0.0,
            served_seed: None,
            over_budget: false,
            experiment: None,
            image: None,
            shadow: None,
        }
    }
}

/// The experiment variant a request was assigned to, for the record written after the answer.
pub(crate) struct ExperimentRun {
    pub(crate) experiment: String,
    pub(crate) variant: String,
    /// The variant's backend, if it names one: any other serving backend was a fallback.
    pub(crate) preferred: Option<String>,
    pub(crate) prompt: String,
    pub(crate) seed: Option<u64>,
    /// The experiment runs shadows: keep this answer's image for the side-by-side page.
    pub(crate) keep_image: bool,
    /// The server-made id of this answer's record (`X-Kleingate-Result-Id`), what feedback names.
    /// Never the client's `X-Request-Id`, which a client chooses and could reuse.
    pub(crate) result_id: String,
    /// The variant a shadow run compares this one with, if the experiment runs shadows.
    pub(crate) shadow: Option<crate::experiments::Variant>,
}

async fn generate_for_model(
    State(state): State<Arc<AppState>>,
    principal: Option<Extension<Arc<Principal>>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match Model::from_id(&model) {
        Some(m) => handle(state, principal.map(|e| e.0), Some(m), headers, body).await,
        None => {
            // Not a model id: count it without the client's string as a label value.
            let err = kleingate_protocol::ValidationError::unknown_model(None, &model);
            finish(
                &state,
                ApiError::from(err).into_response(),
                Outcome::new("unknown"),
                Instant::now(),
            )
        }
    }
}

async fn generate_default(
    State(state): State<Arc<AppState>>,
    principal: Option<Extension<Arc<Principal>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(state, principal.map(|e| e.0), None, headers, body).await
}

async fn handle(
    state: Arc<AppState>,
    principal: Option<Arc<Principal>>,
    path_model: Option<Model>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let start = Instant::now();
    let _inflight = InflightGuard::new(&state.metrics.inflight);
    let mut outcome = Outcome::new(path_model.map_or("unknown", Model::id));
    let client = Client {
        principal,
        key: None,
    }
    .resolve(&state, &headers);
    let resp = match generate(
        &state,
        &client,
        path_model,
        &headers,
        body,
        start,
        &mut outcome,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            if outcome.backend.is_none() {
                outcome.backend = e.backend.clone();
            }
            e.into_response()
        }
    };
    if let Some(key) = &client.key {
        state.budgets.charge(key, outcome.cost_usd);
    }
    if resp.status() == StatusCode::FORBIDDEN {
        state
            .metrics
            .rejected
            .with_label_values(&["forbidden"])
            .inc();
    }
    let resp = record_experiment(&state, resp, &outcome, start).await;
    if resp.status() == StatusCode::OK {
        if let (Some((sreq, variant)), Some(run)) = (outcome.shadow.take(), &outcome.experiment) {
            crate::shadow::start(&state, &client, outcome.over_budget, sreq, variant, run);
        }
    }
    finish(&state, resp, outcome, start)
}

fn finish(state: &AppState, mut resp: Response, outcome: Outcome, start: Instant) -> Response {
    let backend = outcome.backend.as_deref().unwrap_or("none");
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(backend) {
        h.insert(BACKEND_HEADER, v);
    }
    h.insert(CACHE_HEADER, HeaderValue::from_static(outcome.cache));
    if let Ok(v) = HeaderValue::from_str(&format!("{:.6}", outcome.cost_usd)) {
        h.insert(COST_HEADER, v);
    }
    let m = &state.metrics;
    m.requests
        .with_label_values(&[
            outcome.model,
            backend,
            resp.status().as_str(),
            outcome.cache,
        ])
        .inc();
    m.request_duration
        .with_label_values(&[outcome.model, backend, outcome.cache])
        .observe(start.elapsed().as_secs_f64());
    resp
}

/// Who sent a request: the authenticated key, if auth is on, and the name budgets are kept by:
/// the key's name, else (auth off) the client header the request carries.
pub(crate) struct Client {
    pub(crate) principal: Option<Arc<Principal>>,
    pub(crate) key: Option<String>,
}

impl Client {
    fn resolve(mut self, state: &AppState, headers: &HeaderMap) -> Client {
        self.key = match &self.principal {
            Some(p) => Some(p.name.to_string()),
            None => header_text(headers, state.budgets.header()).map(str::to_owned),
        };
        self
    }
}

/// A header's trimmed, non-empty text.
pub(crate) fn header_text<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// Over its daily budget, a client is refused (429 until the next UTC day) or served by the
/// cheapest candidate only. `Ok(true)`: served past the budget.
fn apply_budget(
    state: &AppState,
    client: &Client,
    req: &GenerateRequest,
    candidates: &mut Vec<Arc<BackendSlot>>,
) -> Result<bool, ApiError> {
    let Some(key) = client.key.as_deref() else {
        return Ok(false);
    };
    let Verdict::Exceeded { spent, limit } = state.budgets.check(key) else {
        return Ok(false);
    };
    match state.budgets.on_exceed() {
        OnExceed::Reject => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let reset = Duration::from_secs(86_400 - now % 86_400);
            Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "budget_exceeded",
                format!("client `{key}` has spent {spent:.4} USD of its daily budget of {limit:.4} USD; it resets at 00:00 UTC"),
            )
            .with_retry_after(Some(reset)))
        }
        OnExceed::Cheapest => {
            // The cheapest of those that can take it now, else the cheapest of all.
            let ready: Vec<&Arc<BackendSlot>> =
                candidates.iter().filter(|s| s.is_ready()).collect();
            let pool = if ready.is_empty() {
                candidates.iter().collect()
            } else {
                ready
            };
            let cheapest = pool
                .into_iter()
                .min_by(|a, b| {
                    let cost = |s: &Arc<BackendSlot>| {
                        s.backend.cost_estimate(req).unwrap_or(f64::INFINITY)
                    };
                    cost(a).total_cmp(&cost(b))
                })
                .cloned();
            candidates.retain(|s| cheapest.as_ref().is_some_and(|c| Arc::ptr_eq(c, s)));
            Ok(true)
        }
    }
}

/// `Cache-Control` directives the client sent: (no-cache, no-store). `no-cache` skips the lookup
/// (a fresh image, which then replaces the stored one); `no-store` also keeps the answer out.
fn cache_directives(headers: &HeaderMap) -> (bool, bool) {
    let mut out = (false, false);
    for d in headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        match d.trim().to_ascii_lowercase().as_str() {
            "no-cache" => out.0 = true,
            "no-store" => out = (true, true),
            _ => {}
        }
    }
    out
}

async fn generate(
    state: &Arc<AppState>,
    client: &Client,
    path_model: Option<Model>,
    headers: &HeaderMap,
    body: Body,
    start: Instant,
    outcome: &mut Outcome,
) -> Result<Response, ApiError> {
    require_json(headers)?;
    let max = state.config.max_body_bytes;
    let limit = Duration::from_secs_f64(state.config.body_timeout_secs);
    let bytes = tokio::time::timeout(limit, axum::body::to_bytes(body, max))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {} s (body_timeout_secs)",
                    state.config.body_timeout_secs
                ),
            )
        })?
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the request body is over the limit of {max} bytes"),
            )
        })?;
    let req = GenerateRequest::from_json(
        &bytes,
        path_model,
        state.config.default_model,
        &state.config.limits,
    )?;
    outcome.model = req.model.id();
    if let Some(p) = &client.principal {
        if !p.allows_model(req.model) {
            return Err(forbidden(
                "model_not_allowed",
                format!("key `{}` may not use model {}", p.name, req.model.id()),
            )
            .with_field("model"));
        }
    }

    let forced = match headers.get(BACKEND_HEADER) {
        None => None,
        Some(_) if client.principal.as_ref().is_some_and(|p| !p.backend_header) => {
            return Err(forbidden(
                "backend_header_not_allowed",
                "this API key may not choose a backend (its backend_header is false)".into(),
            )
            .with_field("X-Kleingate-Backend"))
        }
        Some(_) if !state.config.routing.allow_backend_header => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "backend_header_not_allowed",
                "this gateway does not let clients choose a backend (routing.allow_backend_header = false)",
            )
            .with_field("X-Kleingate-Backend"))
        }
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", "X-Kleingate-Backend is not valid text")
                .with_field("X-Kleingate-Backend")
        })?),
    };
    // A backend the key may not use is refused before anything says whether it exists.
    if let (Some(p), Some(b)) = (&client.principal, forced) {
        if !p.allows_backend(b) {
            return Err(forbidden(
                "backend_not_allowed",
                format!("key `{}` may not use backend `{b}`", p.name),
            )
            .with_field("X-Kleingate-Backend"));
        }
    }
    // The client's own request, before a variant changes its model: a shadow of a variant that
    // sets no model runs this one, so the pair compares the variants and nothing else. (Kept only
    // for experiment requests: it can hold megabytes of input images.)
    let client_req = headers.contains_key(EXPERIMENT_HEADER).then(|| req.clone());
    let mut req = req;
    if let Some(run) = assign_experiment(state, client, headers, &bytes, forced, &mut req)? {
        outcome.model = req.model.id();
        outcome.experiment = Some(run);
    }
    let preferred = outcome
        .experiment
        .as_ref()
        .and_then(|r| r.preferred.clone());
    // A variant's answers are cached apart from other backends' (as a forced backend's are),
    // so a variant never receives another variant's image; and a key limited to some backends
    // has a cache of its own, so it never receives an image made by a backend it may not use
    // (nor waits on, or replaces, another scope's entry).
    let partition = cache_partition(forced, preferred.as_deref(), client.principal.as_deref());
    let (no_cache, no_store) = cache_directives(headers);
    let mut store = state.config.cache.enabled && !no_store;
    let bypass = !state.config.cache.enabled || no_cache;

    // A hit is served before routing and budgets: it costs nothing, needs no backend, and is
    // always within the key's scope (its partition, and checked again here).
    let mut cache_key = req
        .seed
        .filter(|_| !bypass)
        .map(|seed| req.cache_key(seed, partition.as_deref()));
    if let Some(key) = cache_key {
        if let Some(hit) = state.cache.get(&key).await {
            let allowed = client
                .principal
                .as_ref()
                .is_none_or(|p| p.allows_backend(&hit.backend));
            if !allowed {
                // Cannot happen with the partitions above; if it ever does, this request goes
                // past the cache both ways rather than receive or replace that entry.
                cache_key = None;
                store = false;
            } else {
                state.metrics.cache_hits.inc();
                outcome.cache = "hit";
                outcome.backend = Some(hit.backend.clone());
                let resp = image_response(&req, &hit);
                outcome.served_seed = hit.image.seed;
                if outcome.experiment.as_ref().is_some_and(|r| r.keep_image) {
                    outcome.image = Some((hit.image.format, hit.image.bytes.clone()));
                }
                state
                    .metrics
                    .overhead
                    .observe(start.elapsed().as_secs_f64());
                return Ok(resp);
            }
        }
    }

    let mut candidates = candidates(state, &req, forced, client.principal.as_deref())?;
    if let Some(b) = &preferred {
        prefer(&mut candidates, b);
    }
    outcome.over_budget = apply_budget(state, client, &req, &mut candidates)?;
    let deadline = start + state.request_timeout;
    // A variant's answer made by a fallback backend is not that variant's: it is not cached in
    // the variant's partition.
    let fell_back = |v: &CachedImage| preferred.as_deref().is_some_and(|p| p != &*v.backend);

    let (served, label) = match cache_key {
        Some(key) => {
            state.metrics.cache_misses.inc();
            let lookup = state
                .cache
                .get_or_generate(
                    key,
                    dispatch(state, &req, &candidates, deadline, Patience::Wait),
                )
                .await
                .map_err(|e| (*e).clone())?;
            match lookup {
                Lookup::Generated(v) => {
                    if fell_back(&v) {
                        state.cache.invalidate(&key).await;
                    }
                    (v, "miss")
                }
                Lookup::Coalesced(v) => {
                    state.metrics.singleflight_coalesced.inc();
                    (v, "coalesced")
                }
            }
        }
        None => {
            let v = dispatch(state, &req, &candidates, deadline, Patience::Wait).await?;
            // Unseeded requests are stored under the seed the backend reports, so a client that
            // repeats the request with that seed gets the same image back from the cache.
            if store && !fell_back(&v) {
                if let Some(seed) = v.image.seed {
                    state
                        .cache
                        .insert(req.cache_key(seed, partition.as_deref()), v.clone())
                        .await;
                }
            }
            (v, "bypass")
        }
    };
    outcome.cache = label;
    outcome.backend = Some(served.backend.clone());
    outcome.served_seed = served.image.seed;
    if outcome.experiment.as_ref().is_some_and(|r| r.keep_image) {
        outcome.image = Some((served.image.format, served.image.bytes.clone()));
    }
    if label != "coalesced" {
        outcome.cost_usd = served.cost_usd;
        // Only an answer this request generated itself gets a shadow: a hit or a coalesced
        // wait did not measure the variant, and its leader already ran one.
        if let (Some(run), Some(client_req)) = (&outcome.experiment, &client_req) {
            outcome.shadow = shadow_request(state, &bytes, client_req, run, served.image.seed);
        }
    }
    let resp = image_response(&req, &served);
    if label != "coalesced" {
        // A coalesced request waited on someone else's backend call; its wait is not ours to time.
        let own = start.elapsed().saturating_sub(served.backend_time);
        state.metrics.overhead.observe(own.as_secs_f64());
    }
    Ok(resp)
}

/// JSON routes take JSON only: `Content-Type: application/json` (parameters such as a charset
/// allowed), else 415. A form or `text/plain` post, which a page on another site can send
/// without asking the browser's permission, never reaches a handler.
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let essence = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim);
    match essence {
        Some(t) if t.eq_ignore_ascii_case("application/json") => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the request body as JSON with `Content-Type: application/json`",
        )),
    }
}

/// What separates cache entries of otherwise equal requests: the backend a request is forced
/// to, or an experiment variant's backend (told apart: a variant may fall back, a forced backend
/// may not), and the backends a key is limited to. `None` when nothing applies: unrestricted
/// clients share one cache.
fn cache_partition(
    forced: Option<&str>,
    variant: Option<&str>,
    principal: Option<&Principal>,
) -> Option<String> {
    let scope = principal.and_then(Principal::backend_scope);
    let pin = match (forced, variant) {
        (Some(b), _) => Some(("forced", b)),
        (None, Some(b)) => Some(("variant", b)),
        (None, None) => None,
    };
    match (pin, scope) {
        (None, None) => None,
        // JSON: names are quoted, so no two different partitions give the same text.
        (pin, scope) => Some(json!([pin, scope]).to_string()),
    }
}

fn image_response(req: &GenerateRequest, c: &CachedImage) -> Response {
    let img = &c.image;
    let mut resp = if req.enable_base64_output {
        Json(ImageJson {
            image: base64::engine::general_purpose::STANDARD.encode(&img.bytes),
            output_format: img.format.as_str().to_owned(),
            seed: img.seed,
            has_nsfw_content: img.has_nsfw_content,
        })
        .into_response()
    } else {
        let mut r = Response::new(Body::from(img.bytes.clone()));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(img.format.content_type()),
        );
        r
    };
    let h = resp.headers_mut();
    if let Some(seed) = img.seed {
        h.insert("x-seed", HeaderValue::from(seed));
    }
    h.insert(
        "x-has-nsfw-content",
        HeaderValue::from_static(if img.has_nsfw_content {
            "true"
        } else {
            "false"
        }),
    );
    resp
}

/// The models and, with auth on, only the backends the key may use.
async fn list_models(
    State(state): State<Arc<AppState>>,
    principal: Option<Extension<Arc<Principal>>>,
) -> Json<serde_json::Value> {
    let visible = |name: &str| principal.as_ref().is_none_or(|p| p.allows_backend(name));
    let models: Vec<_> = Model::ALL
        .iter()
        .map(|m| {
            let backends: Vec<&str> = state
                .serving(*m)
                .map(|s| &*s.name)
                .filter(|n| visible(n))
                .collect();
            json!({
                "id": m.id(),
                "distilled": m.is_distilled(),
                "default_steps": m.default_steps(),
                "default_guidance": m.default_guidance(),
                "steps_configurable": !m.is_distilled(),
                "backends": backends,
                "default": *m == state.config.default_model,
            })
        })
        .collect();
    Json(json!({ "models": models }))
}

/// The backends' state. With auth on: only the backends the key may use, and the operations
/// detail (`last_error`, health messages: they can name upstream addresses and file paths) only
/// for keys with `operations = true`. With auth off every caller is trusted and sees it all.
async fn list_backends(
    State(state): State<Arc<AppState>>,
    principal: Option<Extension<Arc<Principal>>>,
) -> Json<serde_json::Value> {
    let detail = principal.as_ref().is_none_or(|p| p.operations);
    let list: Vec<_> = state
        .backends
        .iter()
        .filter(|s| principal.as_ref().is_none_or(|p| p.allows_backend(&s.name)))
        .map(|s| {
            let mut health = serde_json::to_value(s.backend.health()).unwrap_or_default();
            if !detail {
                if let Some(h) = health.as_object_mut() {
                    h.remove("message");
                }
            }
            json!({
                "name": &*s.name,
                "kind": s.backend.kind(),
                "models": s.backend.models(),
                "health": health,
                "circuit": s.breaker.state(),
                "consecutive_failures": s.breaker.consecutive_failures(),
                "circuit_retry_in_secs": s.breaker.retry_in().map(|d| d.as_secs_f64()),
                "busy_for_secs": s.busy_for().map(|d| d.as_secs_f64()),
                "in_flight": s.inflight(),
                "max_concurrency": s.max_concurrency,
                "weight": s.weight,
                "last_error": if detail { s.last_error() } else { None },
            })
        })
        .collect();
    Json(json!({ "backends": list }))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.is_ready() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        let why = if state.is_draining() {
            "shutting down"
        } else {
            "no backend is available"
        };
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", why).into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state.refresh_gauges().await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see README.md for the API (POST /{model}/generate, POST /generate, GET /v1/models, ...)")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}

/// Join the experiment the client named: pick the variant (sticky by client key), apply its
/// model, and count the assignment. The variant's backend is applied to the candidates later.
fn assign_experiment(
    state: &AppState,
    client: &Client,
    headers: &HeaderMap,
    body: &[u8],
    forced: Option<&str>,
    req: &mut GenerateRequest,
) -> Result<Option<ExperimentRun>, ApiError> {
    let Some(v) = headers.get(EXPERIMENT_HEADER) else {
        return Ok(None);
    };
    let bad = |code: &'static str, msg: String| {
        ApiError::new(StatusCode::BAD_REQUEST, code, msg).with_field("X-Kleingate-Experiment")
    };
    let name = v.to_str().map_err(|_| {
        bad(
            "invalid_request",
            "X-Kleingate-Experiment is not valid text".into(),
        )
    })?;
    if forced.is_some() {
        return Err(bad(
            "invalid_request",
            "X-Kleingate-Experiment and X-Kleingate-Backend cannot be combined: the experiment chooses the backend".into(),
        ));
    }
    let Some(cfg) = state.experiments.configs.get(name) else {
        // Only the experiments this key could join: the others' names are not its business.
        let known: Vec<&str> = state
            .experiments
            .configs
            .iter()
            .filter(|(_, c)| {
                client
                    .principal
                    .as_ref()
                    .is_none_or(|p| c.variants.iter().all(|v| p.allows_variant(v)))
            })
            .map(|(n, _)| n.as_str())
            .collect();
        let listed = if known.is_empty() {
            "none".to_owned()
        } else {
            known.join(", ")
        };
        return Err(bad(
            "unknown_experiment",
            format!("no experiment `{name}`; available: {listed}"),
        ));
    };
    // With auth, the key's name: a client must not pick its variant by choosing a header value.
    let key = match &client.principal {
        Some(p) => Some(&*p.name),
        None => header_text(headers, &cfg.key_header),
    };
    let variant = cfg.assign(name, key);
    if let Some(m) = variant.model.filter(|m| *m != req.model) {
        *req = for_variant(state, body, m, name, &variant.name)?;
    }
    // A variant must not widen a key's scope: its model and backend are the key's to use, or
    // the request is refused (before it counts as an assignment).
    if let Some(p) = &client.principal {
        let refuse = |code, what: String| {
            Err(forbidden(
                code,
                format!(
                    "key `{}` may not use {what}, which experiment variant `{}` runs",
                    p.name, variant.name
                ),
            )
            .with_field("X-Kleingate-Experiment"))
        };
        if !p.allows_model(req.model) {
            return refuse("model_not_allowed", format!("model {}", req.model.id()));
        }
        if let Some(b) = variant.backend.as_ref().filter(|b| !p.allows_backend(b)) {
            return refuse("backend_not_allowed", format!("backend `{b}`"));
        }
    }
    let shadow = cfg.shadow_of(&variant.name).cloned();
    if shadow.is_some() && req.seed.is_none() {
        // Both sides of a pair use the same seed, so they differ only by the variant.
        req.seed = Some(rand::random_range(0..u64::from(u32::MAX)));
    }
    state
        .metrics
        .experiment_assignments
        .with_label_values(&[name, &variant.name])
        .inc();
    Ok(Some(ExperimentRun {
        experiment: name.to_owned(),
        variant: variant.name.clone(),
        preferred: variant.backend.clone(),
        prompt: req.prompt.clone(),
        seed: req.seed,
        keep_image: cfg.shadow,
        result_id: crate::experiments::new_result_id(),
        shadow,
    }))
}

/// The request a shadow runs: the client's own request (its model, not the served variant's,
/// unless the shadow variant sets one), with the seed of the image served. `None` when the
/// shadow variant's model cannot take the request (logged; the client's answer is not refused
/// for it).
fn shadow_request(
    state: &AppState,
    body: &[u8],
    client_req: &GenerateRequest,
    run: &ExperimentRun,
    served_seed: Option<u64>,
) -> Option<(GenerateRequest, crate::experiments::Variant)> {
    let variant = run.shadow.clone()?;
    let mut sreq = match variant.model.filter(|m| *m != client_req.model) {
        Some(m) => match for_variant(state, body, m, &run.experiment, &variant.name) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(experiment = %run.experiment, variant = %variant.name, error = %e.message, "no shadow run: the request does not fit the shadow variant's model");
                return None;
            }
        },
        None => client_req.clone(),
    };
    sreq.seed = served_seed.or(run.seed);
    Some((sreq, variant))
}

/// The client's request with a variant's model, validated again for that model.
fn for_variant(
    state: &AppState,
    body: &[u8],
    m: Model,
    experiment: &str,
    variant: &str,
) -> Result<GenerateRequest, ApiError> {
    let mut obj: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).unwrap_or_default();
    obj.remove("model");
    GenerateRequest::from_object(&obj, Some(m), m, &state.config.limits).map_err(|e| {
        let mut err = ApiError::from(e);
        err.message = format!(
            "{} (experiment `{experiment}` variant `{variant}` uses `{m}`)",
            err.message
        );
        err
    })
}

/// Move backend `name` to the front of the candidates, if it is one.
fn prefer(candidates: &mut [Arc<BackendSlot>], name: &str) {
    if let Some(i) = candidates.iter().position(|s| &*s.name == name) {
        candidates[..=i].rotate_right(1);
    }
}

/// Store the answer of an experiment request and tell the client its variant.
async fn record_experiment(
    state: &Arc<AppState>,
    mut resp: Response,
    outcome: &Outcome,
    start: Instant,
) -> Response {
    let Some(run) = &outcome.experiment else {
        return resp;
    };
    if let Ok(v) = HeaderValue::from_str(&run.variant) {
        resp.headers_mut().insert(VARIANT_HEADER, v);
    }
    if let Ok(v) = HeaderValue::from_str(&run.result_id) {
        resp.headers_mut().insert(RESULT_ID_HEADER, v);
    }
    let Some(store_state) = state.experiments.store.as_ref().map(|_| state.clone()) else {
        return resp;
    };
    let backend = outcome.backend.as_deref().unwrap_or("none").to_owned();
    let fallback = run.preferred.as_ref().is_some_and(|p| *p != backend);
    let seed = outcome.served_seed.or(run.seed);
    let record = crate::experiments::Record {
        request_id: run.result_id.clone(),
        experiment: run.experiment.clone(),
        variant: run.variant.clone(),
        backend,
        model: outcome.model.to_owned(),
        prompt: run.prompt.clone(),
        seed,
        status: resp.status().as_u16(),
        latency_ms: start.elapsed().as_secs_f64() * 1e3,
        cost_usd: outcome.cost_usd,
        excluded: matches!(outcome.cache, "hit" | "coalesced") || fallback,
        pair_of: None,
        image: outcome
            .image
            .as_ref()
            .map(|(f, b)| (f.content_type().to_owned(), b.to_vec())),
    };
    if !record.excluded && record.status == 200 {
        let labels = [record.experiment.as_str(), record.variant.as_str()];
        let m = &state.metrics;
        m.experiment_latency
            .with_label_values(&labels)
            .observe(record.latency_ms / 1e3);
        m.experiment_cost_usd
            .with_label_values(&labels)
            .inc_by(record.cost_usd);
    }
    // Written before the answer goes out, so feedback on this result id can follow at once.
    store_record(&store_state, record).await;
    resp
}

/// Write a record off the async threads (SQLite fsyncs); a failure is logged, never the client's.
pub(crate) async fn store_record(state: &Arc<AppState>, record: crate::experiments::Record) {
    let st = state.clone();
    let experiment = record.experiment.clone();
    let stored = tokio::task::spawn_blocking(move || {
        st.experiments.store.as_ref().map(|s| s.record(&record))
    })
    .await;
    if !matches!(stored, Ok(Some(Ok(())))) {
        tracing::error!(experiment = %experiment, "could not store an experiment result");
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Feedback {
    /// The answer's `X-Kleingate-Result-Id`.
    #[serde(alias = "result_id")]
    request_id: String,
    #[serde(default)]
    score: Option<f64>,
    #[serde(default)]
    thumbs: Option<String>,
}

/// `POST /v1/feedback {"request_id": "...", "score": 1-5}` or `{"request_id", "thumbs": "up"|"down"}`
/// (up = 5, down = 1). One vote per result and voter: a later vote replaces the earlier one. The
/// voter is the key's name, else (auth off) the client header `budget.header`, else one shared
/// anonymous voter.
async fn feedback(
    State(state): State<Arc<AppState>>,
    principal: Option<Extension<Arc<Principal>>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(e) = require_json(&headers) {
        return e.into_response();
    }
    let voter = Client {
        principal: principal.map(|e| e.0),
        key: None,
    }
    .resolve(&state, &headers)
    .key
    .unwrap_or_else(|| "anonymous".to_owned());
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", m);
    let f: Feedback = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return bad(format!("feedback must be {{\"request_id\": \"...\", \"score\": 1-5}} or {{\"request_id\": \"...\", \"thumbs\": \"up\"|\"down\"}}: {e}")).into_response(),
    };
    let score = match (f.score, f.thumbs.as_deref()) {
        (Some(s), None) if (1.0..=5.0).contains(&s) => s,
        (Some(s), None) => {
            return bad(format!("`score` must be between 1 and 5; got {s}"))
                .with_field("score")
                .into_response()
        }
        (None, Some("up")) => 5.0,
        (None, Some("down")) => 1.0,
        (None, Some(t)) => {
            return bad(format!("`thumbs` must be \"up\" or \"down\"; got `{t}`"))
                .with_field("thumbs")
                .into_response()
        }
        _ => return bad("give exactly one of `score` and `thumbs`".into()).into_response(),
    };
    if state.experiments.store.is_none() {
        return ApiError::not_found("no experiments are configured").into_response();
    }
    let st = state.clone();
    let id = f.request_id.clone();
    let stored = tokio::task::spawn_blocking(move || {
        st.experiments
            .store
            .as_ref()
            .map(|s| s.feedback(&id, &voter, score))
    })
    .await;
    match stored {
        Ok(Some(Ok((experiment, variant, previous)))) => {
            // Prometheus counts each voter's first vote on a result (counters cannot take a
            // vote back); `GET /v1/experiments/{name}` reads the current votes from the store.
            if previous.is_none() {
                let m = &state.metrics;
                m.experiment_feedback
                    .with_label_values(&[&experiment, &variant])
                    .inc();
                m.experiment_score_sum
                    .with_label_values(&[&experiment, &variant])
                    .inc_by(score);
            }
            Json(json!({"request_id": f.request_id, "experiment": experiment, "variant": variant, "score": score})).into_response()
        }
        Ok(Some(Err(crate::experiments::StoreError::UnknownRequest(id)))) => {
            ApiError::not_found(format!("no experiment request with id `{id}`")).into_response()
        }
        _ => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "storage_failed",
            "could not store the feedback",
        )
        .into_response(),
    }
}

/// `GET /v1/experiments/{name}`: the variants and, per variant, count, mean score, latency, cost.
async fn experiment_results(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Response {
    let Some(cfg) = state.experiments.configs.get(&name).cloned() else {
        return ApiError::not_found(format!("no experiment `{name}`")).into_response();
    };
    let st = state.clone();
    let n = name.clone();
    let results =
        tokio::task::spawn_blocking(move || st.experiments.store.as_ref().map(|s| s.results(&n)))
            .await;
    match results {
        Ok(Some(Ok(results))) => Json(json!({
            "experiment": name,
            "variants": cfg.variants,
            "results": results,
        }))
        .into_response(),
        _ => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "storage_failed",
            "could not read the results",
        )
        .into_response(),
    }
}

/// `GET /v1/experiments/{name}/images/{request_id}`: a stored image of an experiment with shadows.
async fn experiment_image(
    State(state): State<Arc<AppState>>,
    Path((name, id)): Path<(String, String)>,
) -> Response {
    if !state.experiments.configs.contains_key(&name) {
        return ApiError::not_found(format!("no experiment `{name}`")).into_response();
    }
    let st = state.clone();
    let found = tokio::task::spawn_blocking(move || {
        st.experiments.store.as_ref().map(|s| s.image(&name, &id))
    })
    .await;
    match found {
        Ok(Some(Ok(Some((content_type, bytes))))) => {
            let mut r = Response::new(Body::from(bytes));
            if let Ok(v) = HeaderValue::from_str(&content_type) {
                r.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            r
        }
        Ok(Some(Ok(None))) => ApiError::not_found("no stored image with that id").into_response(),
        _ => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "storage_failed",
            "could not read the image",
        )
        .into_response(),
    }
}

fn forbidden(code: &'static str, message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, code, message)
}
