//! Around every request: its id (`X-Request-Id`), its span (the trace, and the `trace_id` on its
//! log lines), and on the way out the response counter and the access log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, Request};
use axum::response::Response;
use opentelemetry::context::FutureExt as _;
use tower_http::request_id::{MakeRequestId, RequestId};
use tracing::Instrument as _;

use crate::auth::Principal;
use crate::headers::REQUEST_ID;
use crate::state::AppState;

/// Every response, by route template and status: what came in equals what went out, rejections
/// by the layers included. Also the access log (target `kleingate::access`): request id, method,
/// route, status, the key's *name* when authenticated, and the time taken; and the request's
/// span, except for probes and scrapes (`/healthz`, `/readyz`, `/metrics`: every few seconds,
/// they would crowd the traces out).
pub(crate) async fn count_responses(
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
    let id = request_id
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (span, client_trace) = if matches!(route, "/healthz" | "/readyz" | "/metrics") {
        (tracing::Span::none(), None)
    } else {
        crate::telemetry::request_span(&method, route, id, req.headers())
    };
    let run = next.run(req);
    let mut resp = match client_trace {
        // Not exporting: the client's trace context rides with the request, for upstream calls.
        Some(cx) => run.with_context(cx).instrument(span.clone()).await,
        None => run.instrument(span.clone()).await,
    };
    let error_code = resp.extensions().get::<crate::error::ErrorCode>().copied();
    crate::telemetry::record_status(
        &span,
        resp.status().as_u16(),
        error_code.map(|c| c.as_str()),
    );
    let _in_span = span.enter();
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
    if let Some(p) = resp.extensions().get::<Arc<Principal>>() {
        crate::telemetry::annotate(|| {
            vec![opentelemetry::KeyValue::new(
                "kleingate.client",
                p.name.to_string(),
            )]
        });
    }
    tracing::info!(
        target: "kleingate::access",
        request_id = id,
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
pub(crate) struct RequestIds {
    prefix: u32,
    next: Arc<AtomicU64>,
}

impl RequestIds {
    pub(crate) fn new() -> Self {
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
