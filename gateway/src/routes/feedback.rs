//! `POST /v1/feedback`: a vote on an experiment answer.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::Principal;
use crate::client::Client;
use crate::error::{ApiError, ErrorCode};
use crate::headers::require_json;
use crate::state::AppState;

/// A vote: exactly one of `score` and `thumbs`.
#[derive(serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Feedback {
    /// The answer's `X-Kleingate-Result-Id` (also accepted as `result_id`).
    #[serde(alias = "result_id")]
    request_id: String,
    /// 1 to 5.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 5)]
    score: Option<f64>,
    /// `up` (= 5) or `down` (= 1).
    #[serde(default)]
    #[schema(pattern = "^(up|down)$")]
    thumbs: Option<String>,
}

/// The vote as recorded.
#[derive(Serialize, ToSchema)]
pub(crate) struct Recorded {
    request_id: String,
    experiment: String,
    variant: String,
    score: f64,
}

/// `POST /v1/feedback {"request_id": "...", "score": 1-5}` or `{"request_id", "thumbs": "up"|"down"}`
/// (up = 5, down = 1). One vote per result and voter: a later vote replaces the earlier one. The
/// voter is the key's name, else (auth off) the client header `budget.header`, else one shared
/// anonymous voter.
pub(super) async fn feedback(
    State(state): State<Arc<AppState>>,
    principal: Option<Extension<Arc<Principal>>>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    if let Err(e) = require_json(&headers) {
        return e.into_response();
    }
    let body = match crate::headers::read_body(body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let voter = Client::identify(&state, principal.map(|e| e.0), &headers)
        .key
        .unwrap_or_else(|| "anonymous".to_owned());
    let bad = |m: String| ApiError::new(ErrorCode::InvalidRequest, m);
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
    let Some(store) = &state.experiments.store else {
        return ApiError::not_found("no experiments are configured").into_response();
    };
    match store.feedback(&f.request_id, &voter, score).await {
        Ok((experiment, variant, previous)) => {
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
            Json(Recorded {
                request_id: f.request_id,
                experiment,
                variant,
                score,
            })
            .into_response()
        }
        Err(crate::storage::StoreError::UnknownRequest(id)) => {
            ApiError::not_found(format!("no experiment request with id `{id}`")).into_response()
        }
        Err(e) => ApiError::storage_failed("could not store the feedback", e).into_response(),
    }
}
