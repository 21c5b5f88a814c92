//! Which backends may serve a request, in the order they are tried.

use std::sync::Arc;

use kleingate_protocol::GenerateRequest;
use rand::Rng;

use crate::auth::Principal;
use crate::config::{Policy, SafetyPolicy};
use crate::error::{ApiError, ErrorCode};
use crate::state::{AppState, BackendSlot};

/// Candidates for `req`: the forced backend alone when the client named one (no fallback: the
/// client asked for that backend's answer, e.g. to compare backends), otherwise every backend
/// serving the model in policy order; with a key, only the backends it may use (a forced one
/// outside them is refused by the caller before this, without saying whether it exists).
pub fn candidates(
    state: &AppState,
    req: &GenerateRequest,
    forced: Option<&str>,
    principal: Option<&Principal>,
) -> Result<Vec<Arc<BackendSlot>>, ApiError> {
    let model = req.model;
    let need_checker =
        req.enable_safety_checker && state.config.routing.safety == SafetyPolicy::Require;
    if let Some(name) = forced {
        let slot = state.by_name.get(name).ok_or_else(|| {
            // Only the names this key may use: the others are not its business.
            let known: Vec<&str> = state
                .backends
                .iter()
                .map(|s| &*s.name)
                .filter(|n| principal.is_none_or(|p| p.allows_backend(n)))
                .collect();
            ApiError::new(
                ErrorCode::UnknownBackend,
                format!(
                    "X-Kleingate-Backend names `{name}`; configured backends: {}",
                    known.join(", ")
                ),
            )
            .with_field("X-Kleingate-Backend")
        })?;
        if !slot.backend.serves(model) {
            return Err(ApiError::new(
                ErrorCode::BackendCannotServe,
                format!("backend `{name}` does not serve `{model}`"),
            )
            .with_field("X-Kleingate-Backend"));
        }
        if need_checker && !slot.backend.checks_safety() {
            return Err(ApiError::new(ErrorCode::SafetyCheckerUnavailable,
                format!("backend `{name}` cannot run the safety checker; send \"enable_safety_checker\": false or let the gateway choose"),
            )
            .with_field("enable_safety_checker"));
        }
        return Ok(vec![slot.clone()]);
    }
    let mut list: Vec<Arc<BackendSlot>> = state.serving(model).cloned().collect();
    if list.is_empty() {
        return Err(ApiError::new(
            ErrorCode::NoBackend,
            format!("no configured backend serves `{model}`"),
        ));
    }
    if need_checker {
        list.retain(|s| s.backend.checks_safety());
        if list.is_empty() {
            return Err(ApiError::new(ErrorCode::NoBackend,
                format!("no backend serving `{model}` can run the safety checker; send \"enable_safety_checker\": false, or set routing.safety = \"skip\""),
            ));
        }
    }
    match state.config.routing.policy {
        Policy::Priority => {}
        Policy::Weighted => weighted_order(&mut list, &mut rand::rng()),
        Policy::Cost => cost_order(&mut list, req),
    }
    // A key's requests go only to its backends: never routed or fallen back elsewhere.
    if let Some(p) = principal {
        list.retain(|s| p.allows_backend(&s.name));
        if list.is_empty() {
            return Err(ApiError::new(
                ErrorCode::BackendNotAllowed,
                format!(
                    "none of the backends key `{}` may use serves this request",
                    p.name
                ),
            ));
        }
    }
    Ok(list)
}

/// Cheapest first among the backends that can take the request now and keep their latency
/// objective; then those over their objective; then those not ready (loading, down, circuit
/// open, told to back off), each group by estimated cost, ties by load (in-flight share of the
/// concurrency limit). A backend without a price sorts after the priced ones (unknown is not free);
/// one without an objective, or without observations yet, counts as meeting it.
fn cost_order(list: &mut [Arc<BackendSlot>], req: &GenerateRequest) {
    let key = |s: &Arc<BackendSlot>| {
        // `is_ready` counts an open circuit whose cool-down is over as ready: the backend gets
        // its probe request instead of staying behind the others forever.
        // A backend backing off whose probe is due counts as ready, so that it gets the probe
        // instead of waiting behind every other backend for its whole Retry-After.
        let ready = s.is_ready() && (s.busy_for().is_none() || s.busy_probe_due());
        let meets = match (s.latency_objective, s.p95(req.model)) {
            (Some(objective), Some(p95)) => p95 <= objective,
            _ => true,
        };
        let cost = s.backend.cost_estimate(req).unwrap_or(f64::INFINITY);
        let load = s.inflight() as f64 / s.max_concurrency.max(1) as f64;
        (!ready, !meets, cost, load)
    };
    let mut keyed: Vec<_> = list.iter().map(|s| (key(s), s.clone())).collect();
    // Stable: equal keys keep the configured order.
    keyed.sort_by(|(a, _), (b, _)| {
        (a.0, a.1)
            .cmp(&(b.0, b.1))
            .then(a.2.total_cmp(&b.2))
            .then(a.3.total_cmp(&b.3))
    });
    for (slot, (_, s)) in list.iter_mut().zip(keyed) {
        *slot = s;
    }
}

/// First a weighted random pick, then the rest by descending weight (stable, so ties keep the
/// priority order). Backends of weight 0 are only ever fallbacks.
fn weighted_order(list: &mut [Arc<BackendSlot>], rng: &mut impl Rng) {
    let total: u64 = list.iter().map(|s| u64::from(s.weight)).sum();
    list.sort_by_key(|s| std::cmp::Reverse(s.weight));
    if total == 0 {
        return;
    }
    let mut pick = rng.random_range(0..total);
    let idx = list
        .iter()
        .position(|s| {
            let w = u64::from(s.weight);
            if pick < w {
                true
            } else {
                pick -= w;
                false
            }
        })
        .unwrap_or(0);
    list[..=idx].rotate_right(1);
}
