//! Sending a request to its candidate backends in turn: circuit breaker, concurrency limit, one
//! deadline spent across attempts, and fallback on anything that is not the client's fault.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kleingate_backend::BackendError;
use kleingate_protocol::GenerateRequest;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument as _;

use crate::cache::CachedImage;
use crate::circuit::CircuitState;
use crate::error::{ApiError, ErrorCode};
use crate::state::{AppState, BackendSlot};
use crate::telemetry;

/// No candidate produced an image: the client's error, and the backend whose answer it is (for
/// the request's metrics and record), if one answered.
#[derive(Clone, Debug, PartialEq)]
pub struct DispatchError {
    pub error: ApiError,
    pub backend: Option<Arc<str>>,
}

/// Why a candidate was left behind without an answer (closed set, for the fallback metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Skip {
    CircuitOpen,
    Busy,
    Saturated,
}

impl Skip {
    fn reason(self) -> &'static str {
        match self {
            Skip::CircuitOpen => "circuit_open",
            Skip::Busy => "busy",
            Skip::Saturated => "concurrency_limit",
        }
    }
}

/// Whether a request may wait for a backend's concurrency slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Patience {
    /// A client's request: when every candidate is saturated, wait for the last one.
    Wait,
    /// Background work (shadow runs): only a slot that is free now, and not a backend's last
    /// free one; never waits, takes no probe, and goes through `Backend::generate_background`.
    IdleOnly,
}

pub async fn dispatch(
    state: &AppState,
    req: &GenerateRequest,
    candidates: &[Arc<BackendSlot>],
    deadline: Instant,
    patience: Patience,
) -> Result<CachedImage, DispatchError> {
    let model = req.model.id();
    let mut backend_time = Duration::ZERO;
    // Candidates we moved on from, waiting to be counted against the next one actually tried.
    let mut left: Vec<(Arc<str>, &'static str)> = Vec::new();
    let mut last_error: Option<(Arc<str>, BackendError)> = None;
    let mut soonest_retry: Option<Duration> = None;
    // Candidates passed over without an attempt, for the request's span.
    let mut skipped: Vec<(Arc<str>, &'static str)> = Vec::new();
    let mut attempts = 0;
    let n = candidates.len();

    for (i, slot) in candidates.iter().enumerate() {
        let is_last = i + 1 == n;
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            break;
        }
        // Background work takes no probe (of a circuit or a back-off) and no busy backend: a
        // client's request is the one that finds out whether a backend recovered.
        if patience == Patience::IdleOnly
            && (slot.breaker.state() != CircuitState::Closed || slot.busy_for().is_some())
        {
            pass_over(&mut left, &mut skipped, &slot.name, Skip::Busy);
            continue;
        }
        let ticket = match slot.breaker.admit() {
            Ok(t) => t,
            Err(wait) => {
                soonest_retry = min_opt(soonest_retry, wait);
                pass_over(&mut left, &mut skipped, &slot.name, Skip::CircuitOpen);
                continue;
            }
        };
        // Told to back off: skip it, except for one probe every `busy_probe_secs`, so a backend
        // that recovered before its Retry-After ran out is used again. The probe is only taken
        // (and spent) once this request holds a concurrency slot below.
        let busy = slot.busy_for();
        if let Some(wait) = busy {
            if !slot.busy_probe_due() {
                soonest_retry = min_opt(soonest_retry, wait);
                pass_over(&mut left, &mut skipped, &slot.name, Skip::Busy);
                continue;
            }
        }
        // Background work leaves the last free slot to clients.
        if patience == Patience::IdleOnly && slot.permits.available_permits() < 2 {
            pass_over(&mut left, &mut skipped, &slot.name, Skip::Saturated);
            continue;
        }
        let _permit: OwnedSemaphorePermit = match slot.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            // Saturated: move on while there is somewhere to go, else wait our turn.
            Err(_) if !is_last || patience == Patience::IdleOnly => {
                pass_over(&mut left, &mut skipped, &slot.name, Skip::Saturated);
                continue;
            }
            Err(_) => {
                match tokio::time::timeout(remaining, slot.permits.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => break,
                }
            }
        };
        if busy.is_some() && !slot.take_busy_probe() {
            // Another request took the probe meanwhile.
            pass_over(&mut left, &mut skipped, &slot.name, Skip::Busy);
            continue;
        }
        for (from, reason) in left.drain(..) {
            state
                .metrics
                .fallbacks
                .with_label_values(&[&*from, &*slot.name, reason])
                .inc();
        }

        let attempt_timeout = slot
            .timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        let started = Instant::now();
        // The outer timeout guarantees the deadline even for a backend that ignores its own.
        let attempt = async {
            match patience {
                Patience::Wait => slot.backend.generate(req, attempt_timeout).await,
                Patience::IdleOnly => slot.backend.generate_background(req, attempt_timeout).await,
            }
        };
        attempts += 1;
        let span = telemetry::attempt_span(&slot.name, slot.backend.kind(), attempts);
        let result = match tokio::time::timeout(attempt_timeout, attempt)
            .instrument(span.clone())
            .await
        {
            Ok(r) => r,
            Err(_) => Err(BackendError::Timeout(attempt_timeout)),
        };
        let took = started.elapsed();
        backend_time += took;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.reason(),
        };
        telemetry::attempt_outcome(&span, outcome);
        state
            .metrics
            .backend_duration
            .with_label_values(&[&*slot.name, model, outcome])
            .observe(took.as_secs_f64());

        match result {
            Ok(image) => {
                note_skipped(&skipped);
                ticket.success();
                slot.clear_busy();
                slot.record_latency(req.model, took);
                let cost_usd = image
                    .cost_usd
                    .or_else(|| slot.backend.cost_estimate(req))
                    .unwrap_or(0.0);
                state
                    .metrics
                    .cost_usd
                    .with_label_values(&[&*slot.name, model])
                    .inc_by(cost_usd);
                return Ok(CachedImage {
                    image,
                    backend: slot.name.clone(),
                    backend_time,
                    cost_usd,
                });
            }
            Err(e) if !e.should_fall_back() => {
                note_skipped(&skipped);
                ticket.neutral();
                // We validated the request already, so this means we and the backend disagree on
                // the rules: worth a warning, but the client still gets the backend's words.
                tracing::warn!(backend = %slot.name, error = %e, "backend refused a request the gateway accepted");
                // Only a refusal of the request itself reaches here (`should_fall_back`): its
                // words are about what the client sent.
                let (message, field) = match e {
                    BackendError::InvalidRequest { message, field } => (message, field),
                    _ => ("the backend refused the request".to_owned(), None),
                };
                let mut error = ApiError::new(ErrorCode::InvalidRequest, message);
                error.field = field;
                return Err(DispatchError {
                    error,
                    backend: Some(slot.name.clone()),
                });
            }
            Err(e) => {
                if e.trips_circuit() {
                    ticket.failure();
                } else {
                    ticket.neutral();
                }
                if let BackendError::Unavailable {
                    retry_after: Some(d),
                    ..
                } = &e
                {
                    // However long an upstream asks for, at most `routing.max_retry_after_secs`.
                    let d = slot.set_busy_for(*d);
                    soonest_retry = min_opt(soonest_retry, d);
                }
                tracing::warn!(backend = %slot.name, error = %e, "backend attempt failed");
                slot.set_last_error(e.to_string());
                left.push((slot.name.clone(), e.reason()));
                last_error = Some((slot.name.clone(), e));
            }
        }
    }

    note_skipped(&skipped);
    Err(exhausted(last_error, soonest_retry, deadline, n))
}

/// The candidates passed over without an attempt (`name:reason`, in order) on the request's
/// span: the attempts are spans of their own, a skip is not. Formatted only when exporting.
fn note_skipped(skipped: &[(Arc<str>, &'static str)]) {
    if !skipped.is_empty() {
        telemetry::annotate(|| {
            let all: Vec<String> = skipped.iter().map(|(b, r)| format!("{b}:{r}")).collect();
            vec![opentelemetry::KeyValue::new(
                "kleingate.skipped",
                all.join(","),
            )]
        });
    }
}

/// A candidate left behind without an attempt: counted as a fallback from it (when the next one
/// is tried) and named on the request's span.
fn pass_over(
    left: &mut Vec<(Arc<str>, &'static str)>,
    skipped: &mut Vec<(Arc<str>, &'static str)>,
    name: &Arc<str>,
    why: Skip,
) {
    skipped.push((name.clone(), why.reason()));
    left.push((name.clone(), why.reason()));
}

fn min_opt(a: Option<Duration>, b: Duration) -> Option<Duration> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// The answer when no candidate produced an image.
fn exhausted(
    last: Option<(Arc<str>, BackendError)>,
    retry: Option<Duration>,
    deadline: Instant,
    tried: usize,
) -> DispatchError {
    if Instant::now() >= deadline {
        let error = ApiError::new(
            ErrorCode::Timeout,
            "the request deadline passed before any backend produced an image",
        );
        return DispatchError {
            error,
            backend: last.map(|(b, _)| b),
        };
    }
    let Some((backend, e)) = last else {
        let error = ApiError::new(ErrorCode::NoBackendAvailable,
            format!("all {tried} backends serving this model are unavailable (circuit open, busy or at their concurrency limit); try again later"),
        )
        .with_retry_after(retry);
        return DispatchError {
            error,
            backend: None,
        };
    };
    let code = match &e {
        BackendError::Timeout(_) => ErrorCode::Timeout,
        BackendError::Unavailable { .. }
        | BackendError::Connect(_)
        | BackendError::Unauthorized { .. } => ErrorCode::NoBackendAvailable,
        BackendError::Upstream { .. } | BackendError::BadResponse(_) => ErrorCode::BadGateway,
        BackendError::Failed(_) | BackendError::InvalidRequest { .. } => {
            ErrorCode::GenerationFailed
        }
    };
    // The detail (an upstream's address, a resolver's or a loader's words, a path) stays in the
    // log and in `/v1/backends` for keys with `operations`; the client gets a fixed phrase.
    let what = client_phrase(&e);
    let message = if tried > 1 {
        format!("no backend could serve the request; the last one tried, `{backend}`, {what}")
    } else {
        format!("backend `{backend}` {what}")
    };
    let error =
        ApiError::new(code, message).with_retry_after(if code == ErrorCode::NoBackendAvailable {
            retry
        } else {
            None
        });
    DispatchError {
        error,
        backend: Some(backend),
    }
}

/// What a client is told about a backend's failure: one fixed phrase per kind of error.
fn client_phrase(e: &BackendError) -> &'static str {
    match e {
        BackendError::Timeout(_) => "did not answer in time",
        BackendError::Unavailable { .. } => "is unavailable (busy or not ready)",
        BackendError::Connect(_) => "could not be reached",
        BackendError::Unauthorized { .. } => {
            "is unavailable (it refused the gateway's credentials)"
        }
        BackendError::Upstream { .. } => "answered with an error",
        BackendError::BadResponse(_) => "gave an answer that is not a usable image",
        BackendError::Failed(_) | BackendError::InvalidRequest { .. } => {
            "failed to generate the image"
        }
    }
}
