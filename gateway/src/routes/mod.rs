//! The routes: which path goes to which handler, behind which layers. One module per endpoint
//! group; the handlers are thin and the work is below them (`generate`, `experiments`, ...).

mod experiments;
mod feedback;
mod generate;
mod info;
pub mod openapi;
pub mod ui;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};

use crate::admission::GateLayer;
use crate::error::{ApiError, ErrorCode};
use crate::headers::REQUEST_ID;
use crate::state::AppState;

pub fn router(state: Arc<AppState>) -> Router {
    let shed = GateLayer(state.shedder.clone());
    // Everything a client calls is behind the API key. What costs work (generate, feedback
    // writes) is also under the client's rate limit, and generate requests are shed when the
    // gateway is full; cheap reads are not limited (the vote page loads 40 images at once).
    // Experiment data needs a key with `experiments = true`. Health, readiness and metrics stay
    // open for probes and scrapers (keep /metrics off the public network; see k8s/).
    let rate = GateLayer(state.rate_limiter.clone());
    let generate = Router::new()
        .route("/generate", post(generate::default_model))
        .route("/{model}/generate", post(generate::for_model))
        .route_layer(shed)
        .route_layer(rate.clone());
    let feedback = Router::new()
        .route("/v1/feedback", post(feedback::feedback))
        .route_layer(rate);
    let experiments = Router::new()
        .route("/v1/experiments/{name}", get(experiments::results))
        .route(
            "/v1/experiments/{name}/images/{id}",
            get(experiments::image),
        )
        .route("/ui/experiments/{name}", get(ui::experiment_page))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::require_experiments,
        ));
    let api = Router::new()
        .merge(generate)
        .merge(feedback)
        .merge(experiments)
        .route("/v1/models", get(info::models))
        .route("/v1/backends", get(info::backends))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::authenticate,
        ));
    Router::new()
        .merge(api)
        .route("/ui/login", get(ui::login_page).post(ui::login))
        .route("/healthz", get(info::healthz))
        .route("/readyz", get(info::readyz))
        .route("/metrics", get(info::metrics))
        .route("/openapi.json", get(openapi::serve))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::access::count_responses,
        ))
        .with_state(state)
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(
            REQUEST_ID,
            crate::access::RequestIds::new(),
        ))
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see docs/api.md for the API (POST /{model}/generate, POST /generate, GET /v1/models, ...)")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "this route does not accept that method",
    )
}
