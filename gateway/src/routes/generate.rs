//! `POST /{model}/generate` and `POST /generate`: the request path's [`Answer`] written as HTTP,
//! with its headers and metrics, in one place.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine as _;
use kleingate_protocol::{ImageJson, Model, ValidationError};

use crate::auth::Principal;
use crate::client::Client;
use crate::generate::{self, Answer, Served};
use crate::headers::{BACKEND_HEADER, CACHE_HEADER, COST_HEADER, RESULT_ID_HEADER, VARIANT_HEADER};
use crate::metrics::InflightGuard;
use crate::state::AppState;

pub(super) async fn for_model(
    State(state): State<Arc<AppState>>,
    principal: Option<Extension<Arc<Principal>>>,
    model: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // A path that is not valid UTF-8 once decoded names no model either (axum's own answer
    // would be plain text).
    let model = model.map_or_else(|_| "(not valid UTF-8)".to_owned(), |Path(m)| m);
    match Model::from_id(&model) {
        Some(m) => handle(state, principal.map(|e| e.0), Some(m), headers, body).await,
        None => {
            // Not a model id: counted as "unknown", never with the client's string as a label.
            let err = ValidationError::unknown_model(None, &model);
            respond(&state, Answer::refused(None, err.into()), Instant::now())
        }
    }
}

pub(super) async fn default_model(
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
    let client = Client::identify(&state, principal, &headers);
    let answer = generate::run(&state, &client, path_model, &headers, body, start).await;
    // The gateway's own time: the request path, before the record is written.
    let own = answer
        .result
        .as_ref()
        .ok()
        .and_then(|s| s.own_time(start.elapsed()));
    if let Some(own) = own {
        state.metrics.overhead.observe(own.as_secs_f64());
    }
    generate::settle(&state, &client, &answer, start).await;
    respond(&state, answer, start)
}

/// The answer as HTTP: the image (bytes, or JSON with base64) or the error, the kleingate
/// headers, and the request's metrics.
fn respond(state: &AppState, answer: Answer, start: Instant) -> Response {
    let backend = answer.backend_label().to_owned();
    let cache = answer.cache().as_str();
    let cost = answer.cost_usd();
    let model = answer.model_label();
    crate::telemetry::annotate(|| {
        use opentelemetry::KeyValue;
        let mut a = vec![
            KeyValue::new("kleingate.model", model.to_owned()),
            KeyValue::new("kleingate.backend", backend.clone()),
            KeyValue::new("kleingate.cache", cache),
            KeyValue::new("kleingate.cost_usd", cost),
        ];
        if let Some(joined) = &answer.experiment {
            a.push(KeyValue::new(
                "kleingate.variant",
                joined.variant().to_owned(),
            ));
        }
        a
    });
    let m = &state.metrics;
    let mut resp = match &answer.result {
        Ok(served) => image_response(served),
        Err(failed) => {
            if failed.error.code.status() == 403 {
                m.rejected.with_label_values(&["forbidden"]).inc();
            }
            failed.error.clone().into_response()
        }
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&backend) {
        h.insert(BACKEND_HEADER, v);
    }
    h.insert(CACHE_HEADER, HeaderValue::from_static(cache));
    if let Ok(v) = HeaderValue::from_str(&format!("{cost:.6}")) {
        h.insert(COST_HEADER, v);
    }
    if let Some(joined) = &answer.experiment {
        if let Ok(v) = HeaderValue::from_str(joined.variant()) {
            h.insert(VARIANT_HEADER, v);
        }
        if let Ok(v) = HeaderValue::from_str(joined.result_id()) {
            h.insert(RESULT_ID_HEADER, v);
        }
    }
    m.requests
        .with_label_values(&[model, &backend, resp.status().as_str(), cache])
        .inc();
    m.request_duration
        .with_label_values(&[model, &backend, cache])
        .observe(start.elapsed().as_secs_f64());
    resp
}

fn image_response(served: &Served) -> Response {
    let img = &served.image.image;
    let mut resp = if served.base64 {
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
