//! Shadow runs: an experiment with `shadow = true` also runs each request on a second variant, so
//! the two images can be compared side by side. A shadow must never slow the client, so it:
//!
//! * starts only after the client's answer is complete, and only when that answer was generated
//!   by this request (not a cache hit, not a wait on an identical request, not an error);
//! * runs only within the client's scope and budget: not when the client was served past its
//!   daily budget or is past it now, and it is charged to the same budget;
//! * uses idle capacity only: a place under `admission.max_inflight` and a concurrency slot on its
//!   variant's backend, each only when another stays free for clients; it never waits for one
//!   (no place: it is skipped, counted, and recorded as such), never falls back to another
//!   backend (it would measure nothing), takes no circuit or back-off probe, and the local
//!   engine runs it only when idle and stops it at the next step when a client's job arrives;
//! * is not started once the gateway drains, and running ones are part of the drain.

use std::sync::Arc;
use std::time::Instant;

use kleingate_protocol::GenerateRequest;

use super::experiment::{store_record, ExperimentRun};
use crate::budget::Verdict;
use crate::client::Client;
use crate::dispatch::{dispatch, Patience};
use crate::error::ErrorCode;
use crate::experiments::{Record, Variant};
use crate::routing::candidates;
use crate::state::AppState;
use tracing::Instrument as _;

/// Count a shadow run's outcome: ran, failed, or why it was skipped
/// (`kleingate_shadow_runs_total`).
fn count(state: &AppState, experiment: &str, why: &'static str) {
    state
        .metrics
        .shadow_runs
        .with_label_values(&[experiment, why])
        .inc();
}

/// Start the shadow run of `run` (the client's answer is complete) if it may run now.
pub(crate) async fn start(
    state: &Arc<AppState>,
    client: &Client,
    over_budget: bool,
    req: GenerateRequest,
    variant: Variant,
    run: &ExperimentRun,
) {
    let experiment = run.experiment.as_str();
    if state.is_draining() {
        return count(state, experiment, "draining");
    }
    let past_budget = match client.key.as_deref() {
        Some(k) => matches!(state.budgets.check(k).await, Verdict::Exceeded { .. }),
        None => false,
    };
    if over_budget || past_budget {
        return count(state, experiment, "budget");
    }
    if let Some(p) = &client.principal {
        if !(p.allows_model(req.model) && p.allows_variant(&variant)) {
            return count(state, experiment, "scope");
        }
    }
    // A place under max_inflight, held for the whole run: shadows count as requests in flight.
    let Some(place) = state.shedder.try_place() else {
        return count(state, experiment, "no_capacity");
    };
    let state2 = state.clone();
    let budget_key = client.key.clone();
    let principal = client.principal.clone();
    let pair = run.result_id.clone();
    let experiment = run.experiment.clone();
    // In the request's trace, after the answer (without keeping the request's span open).
    let span = crate::telemetry::detached_span();
    crate::telemetry::annotate_span(&span, || {
        vec![
            opentelemetry::KeyValue::new("kleingate.experiment", experiment.to_string()),
            opentelemetry::KeyValue::new("kleingate.variant", variant.name.clone()),
        ]
    });
    state.background.spawn(
        async move {
            let _place = place;
            let state = state2;
            let start = Instant::now();
            let served = match candidates(&state, &req, None, principal.as_deref()) {
                Ok(mut c) => {
                    // The variant's backend or none: a shadow served elsewhere measures nothing.
                    if let Some(b) = &variant.backend {
                        c.retain(|s| &*s.name == b);
                    }
                    dispatch(
                        &state,
                        &req,
                        &c,
                        start + state.request_timeout,
                        Patience::IdleOnly,
                    )
                    .await
                }
                Err(error) => Err(crate::dispatch::DispatchError {
                    error,
                    backend: None,
                }),
            };
            let (status, backend, cost, image) = match &served {
                Ok(s) => (
                    200,
                    s.backend.to_string(),
                    s.cost_usd,
                    Some((
                        s.image.format.content_type().to_owned(),
                        s.image.bytes.to_vec(),
                    )),
                ),
                Err(e) => (e.error.code.status(), "none".to_owned(), 0.0, None),
            };
            let outcome = match &served {
                Ok(_) => "ran",
                Err(e) if e.error.code == ErrorCode::NoBackendAvailable => "no_capacity",
                Err(_) => "failed",
            };
            count(&state, &experiment, outcome);
            let record = Record {
                request_id: format!("{pair}.shadow"),
                experiment: experiment.clone(),
                excluded: variant.backend.as_ref().is_some_and(|p| *p != backend),
                variant: variant.name,
                backend,
                model: req.model.id().to_owned(),
                prompt: req.prompt,
                seed: req.seed,
                status,
                latency_ms: start.elapsed().as_secs_f64() * 1e3,
                cost_usd: cost,
                pair_of: Some(pair),
                image,
            };
            // The shadow is spending done for this client: it counts against its budget.
            if let Some(k) = &budget_key {
                state.budgets.charge(k, cost).await;
            }
            store_record(&state, record).await;
        }
        .instrument(span),
    );
}
