//! The read-only routes: `GET /v1/models`, `GET /v1/backends`, the probes (`/healthz`,
//! `/readyz`) and `GET /metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kleingate_backend::{EndpointState, Health};
use kleingate_protocol::Model;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::Principal;
use crate::circuit::CircuitState;
use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;

/// `GET /v1/models`.
#[derive(Serialize, ToSchema)]
pub(crate) struct ModelList {
    models: Vec<ModelInfo>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct ModelInfo {
    id: Model,
    distilled: bool,
    default_steps: u32,
    default_guidance: f64,
    steps_configurable: bool,
    /// The backends serving it (with auth on: those the key may use).
    backends: Vec<String>,
    /// The gateway's `default_model`.
    default: bool,
}

/// The models and, with auth on, only the backends the key may use.
pub(super) async fn models(
    State(state): State<Arc<AppState>>,
    principal: Option<Extension<Arc<Principal>>>,
) -> Json<ModelList> {
    let visible = |name: &str| principal.as_ref().is_none_or(|p| p.allows_backend(name));
    let models = Model::ALL
        .iter()
        .map(|m| ModelInfo {
            id: *m,
            distilled: m.is_distilled(),
            default_steps: m.default_steps(),
            default_guidance: m.default_guidance(),
            steps_configurable: !m.is_distilled(),
            backends: state
                .serving(*m)
                .map(|s| s.name.to_string())
                .filter(|n| visible(n))
                .collect(),
            default: *m == state.config.default_model,
        })
        .collect();
    Json(ModelList { models })
}

/// `GET /v1/backends`.
#[derive(Serialize, ToSchema)]
pub(crate) struct BackendList {
    backends: Vec<BackendInfo>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct BackendInfo {
    name: String,
    /// `verda` or `local`.
    kind: String,
    models: Vec<Model>,
    health: HealthInfo,
    circuit: CircuitState,
    consecutive_failures: u32,
    circuit_retry_in_secs: Option<f64>,
    busy_for_secs: Option<f64>,
    in_flight: usize,
    max_concurrency: usize,
    weight: u32,
    /// The last failure's detail: only for keys with `operations` (or with auth off).
    last_error: Option<String>,
    /// A `verda` backend's endpoints (its pool) and where each stands: only for keys with
    /// `operations` (or with auth off); absent otherwise, and for the local engine.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    endpoints: Vec<EndpointInfo>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct EndpointInfo {
    /// `host:port`, or the resolved address.
    address: String,
    /// `ready`, `busy` (after a 503/429, for its Retry-After) or `ejected` (after consecutive
    /// failures).
    state: String,
    in_flight: usize,
    consecutive_failures: u32,
    retry_in_secs: Option<f64>,
    last_error: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct HealthInfo {
    /// `ready`, `loading` or `down`.
    state: String,
    /// Why (loading, down): only for keys with `operations` (or with auth off).
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

/// The backends' state. With auth on: only the backends the key may use, and the operations
/// detail (`last_error`, health messages: they can name upstream addresses and file paths) only
/// for keys with `operations = true`. With auth off every caller is trusted and sees it all.
pub(super) async fn backends(
    State(state): State<Arc<AppState>>,
    principal: Option<Extension<Arc<Principal>>>,
) -> Json<BackendList> {
    let detail = principal.as_ref().is_none_or(|p| p.operations);
    let backends = state
        .backends
        .iter()
        .filter(|s| principal.as_ref().is_none_or(|p| p.allows_backend(&s.name)))
        .map(|s| {
            let (health_state, message) = match s.backend.health() {
                Health::Ready => ("ready", None),
                Health::Loading { message } => ("loading", Some(message)),
                Health::Down { message } => ("down", Some(message)),
            };
            BackendInfo {
                name: s.name.to_string(),
                kind: s.backend.kind().to_owned(),
                models: s.backend.models().to_vec(),
                health: HealthInfo {
                    state: health_state.to_owned(),
                    message: message.filter(|_| detail),
                },
                circuit: s.breaker.state(),
                consecutive_failures: s.breaker.consecutive_failures(),
                circuit_retry_in_secs: s.breaker.retry_in().map(|d| d.as_secs_f64()),
                busy_for_secs: s.busy_for().map(|d| d.as_secs_f64()),
                in_flight: s.inflight(),
                max_concurrency: s.max_concurrency,
                weight: s.weight,
                last_error: if detail { s.last_error() } else { None },
                endpoints: if detail {
                    s.backend
                        .endpoints()
                        .into_iter()
                        .map(|e| EndpointInfo {
                            address: e.address,
                            state: match e.state {
                                EndpointState::Ready => "ready",
                                EndpointState::Busy => "busy",
                                EndpointState::Ejected => "ejected",
                            }
                            .to_owned(),
                            in_flight: e.in_flight,
                            consecutive_failures: e.consecutive_failures,
                            retry_in_secs: e.retry_in_secs,
                            last_error: e.last_error,
                        })
                        .collect()
                } else {
                    Vec::new()
                },
            }
        })
        .collect();
    Json(BackendList { backends })
}

/// `GET /healthz`, `GET /readyz`.
#[derive(Serialize, ToSchema)]
pub(crate) struct Status {
    /// `ok` (alive) or `ready`.
    status: &'static str,
}

pub(super) async fn healthz() -> Json<Status> {
    Json(Status { status: "ok" })
}

pub(super) async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.is_ready() {
        Json(Status { status: "ready" }).into_response()
    } else {
        let why = if state.is_draining() {
            "shutting down"
        } else {
            "no backend is available"
        };
        ApiError::new(ErrorCode::NotReady, why).into_response()
    }
}

pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
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
