//! Experiment data: `GET /v1/experiments/{name}` (results per variant) and
//! `GET /v1/experiments/{name}/images/{id}` (a stored image, for the vote page).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::experiments::{Variant, VariantResult};
use crate::state::AppState;

/// An experiment's variants and, per variant, its results.
#[derive(Serialize, ToSchema)]
pub(crate) struct Results {
    experiment: String,
    variants: Vec<Variant>,
    results: Vec<VariantResult>,
}

/// `GET /v1/experiments/{name}`: the variants and, per variant, count, mean score, latency, cost.
pub(super) async fn results(
    State(state): State<Arc<AppState>>,
    name: Result<Path<String>, PathRejection>,
) -> Response {
    let Ok(Path(name)) = name else {
        return ApiError::not_found("no such experiment").into_response();
    };
    let Some(cfg) = state.experiments.configs.get(&name).cloned() else {
        return ApiError::not_found(format!("no experiment `{name}`")).into_response();
    };
    let Some(store) = &state.experiments.store else {
        return ApiError::not_found("no experiments are configured").into_response();
    };
    match store.results(&name).await {
        Ok(results) => Json(Results {
            experiment: name,
            variants: cfg.variants,
            results,
        })
        .into_response(),
        Err(e) => ApiError::storage_failed("could not read the results", e).into_response(),
    }
}

/// `GET /v1/experiments/{name}/images/{request_id}`: a stored image of an experiment with shadows.
pub(super) async fn image(
    State(state): State<Arc<AppState>>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    let Ok(Path((name, id))) = path else {
        return ApiError::not_found("no stored image with that id").into_response();
    };
    if !state.experiments.configs.contains_key(&name) {
        return ApiError::not_found(format!("no experiment `{name}`")).into_response();
    }
    let Some(store) = &state.experiments.store else {
        return ApiError::not_found("no experiments are configured").into_response();
    };
    match store.image(&name, &id).await {
        Ok(Some((content_type, bytes))) => {
            let mut r = Response::new(Body::from(bytes));
            if let Ok(v) = HeaderValue::from_str(&content_type) {
                r.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            r
        }
        Ok(None) => ApiError::not_found("no stored image with that id").into_response(),
        Err(e) => ApiError::storage_failed("could not read the image", e).into_response(),
    }
}
