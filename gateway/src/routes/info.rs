//! The read-only routes: `GET /v1/models`, `GET /v1/backends`, the probes (`/healthz`,
//! `/readyz`) and `GET /metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kleingate_protocol::Model;
use serde_json::json;

use crate::auth::Principal;
use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;

/// The models and, with auth on, only the backends the key may use.
pub(super) async fn models(
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
pub(super) async fn backends(
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

pub(super) async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

pub(super) async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.is_ready() {
        Json(json!({"status": "ready"})).into_response()
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
