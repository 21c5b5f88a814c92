//! The daily budget's say in routing: over it, a client is refused or served by the cheapest
//! candidate only (`budget.on_exceed`).

use std::sync::Arc;
use std::time::Duration;

use kleingate_protocol::GenerateRequest;

use crate::budget::{OnExceed, Verdict};
use crate::client::Client;
use crate::error::{ApiError, ErrorCode};
use crate::state::{AppState, BackendSlot};

/// Over its daily budget, a client is refused (429 until the next UTC day) or served by the
/// cheapest candidate only. `Ok(true)`: served past the budget.
pub(crate) async fn apply(
    state: &AppState,
    client: &Client,
    req: &GenerateRequest,
    candidates: &mut Vec<Arc<BackendSlot>>,
) -> Result<bool, ApiError> {
    let Some(key) = client.key.as_deref() else {
        return Ok(false);
    };
    let Verdict::Exceeded { spent, limit } = state.budgets.check(key).await else {
        return Ok(false);
    };
    match state.budgets.on_exceed() {
        OnExceed::Reject => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let reset = Duration::from_secs(86_400 - now % 86_400);
            Err(ApiError::new(
                ErrorCode::BudgetExceeded,
                format!("client `{key}` has spent {spent:.4} USD of its daily budget of {limit:.4} USD; it resets at 00:00 UTC"),
            )
            .with_retry_after(Some(reset)))
        }
        OnExceed::Cheapest => {
            // The cheapest of those that can take it now, else the cheapest of all.
            let ready: Vec<&Arc<BackendSlot>> =
                candidates.iter().filter(|s| s.is_ready()).collect();
            let pool = if ready.is_empty() {
                candidates.iter().collect()
            } else {
                ready
            };
            let cheapest = pool
                .into_iter()
                .min_by(|a, b| {
                    let cost = |s: &Arc<BackendSlot>| {
                        s.backend.cost_estimate(req).unwrap_or(f64::INFINITY)
                    };
                    cost(a).total_cmp(&cost(b))
                })
                .cloned();
            candidates.retain(|s| cheapest.as_ref().is_some_and(|c| Arc::ptr_eq(c, s)));
            Ok(true)
        }
    }
}
