//! A generate request in an experiment (`X-Kleingate-Experiment`): its variant (sticky by client
//! key), the variant's model applied, the record written after the answer, and the request a
//! shadow run makes.

use std::sync::Arc;
use std::time::Instant;

use axum::http::HeaderMap;
use bytes::Bytes;
use kleingate_protocol::{GenerateRequest, Model};

use super::{Answer, CacheOutcome};
use crate::client::Client;
use crate::error::{ApiError, ErrorCode};
use crate::experiments::{new_result_id, Record, Variant};
use crate::headers::{header_text, EXPERIMENT_HEADER};
use crate::state::AppState;

/// The experiment variant a request was assigned to, for the record written after the answer.
pub(crate) struct ExperimentRun {
    pub(crate) experiment: String,
    pub(crate) variant: String,
    /// The variant's backend, if it names one: any other serving backend was a fallback.
    pub(crate) preferred: Option<String>,
    pub(crate) prompt: String,
    pub(crate) seed: Option<u64>,
    /// The experiment runs shadows: keep this answer's image for the side-by-side page.
    pub(crate) keep_image: bool,
    /// The server-made id of this answer's record (`X-Kleingate-Result-Id`), what feedback names.
    /// Never the client's `X-Request-Id`, which a client chooses and could reuse.
    pub(crate) result_id: String,
    /// The variant a shadow run compares this one with, if the experiment runs shadows.
    pub(crate) shadow: Option<Variant>,
}

/// A request that joined an experiment: its run, and what a shadow run is made from.
pub struct Joined {
    pub(crate) run: ExperimentRun,
    /// The client's own request, before a variant changed its model: a shadow of a variant that
    /// sets no model runs this one, so the pair compares the variants and nothing else. Kept
    /// only when the experiment runs shadows (it can hold megabytes of input images).
    client_req: Option<GenerateRequest>,
    /// The body as sent, re-validated for a shadow variant's model.
    body: Bytes,
}

impl Joined {
    pub fn variant(&self) -> &str {
        &self.run.variant
    }

    pub fn result_id(&self) -> &str {
        &self.run.result_id
    }
}

/// Join the experiment the client named: pick the variant (sticky by client key), apply its
/// model, and count the assignment. The variant's backend is applied to the candidates later.
pub(super) fn join(
    state: &AppState,
    client: &Client,
    headers: &HeaderMap,
    body: Bytes,
    forced: Option<&str>,
    req: &mut GenerateRequest,
) -> Result<Option<Joined>, ApiError> {
    let Some(v) = headers.get(EXPERIMENT_HEADER) else {
        return Ok(None);
    };
    let bad = |code, msg: String| ApiError::new(code, msg).with_field("X-Kleingate-Experiment");
    let name = v.to_str().map_err(|_| {
        bad(
            ErrorCode::InvalidRequest,
            "X-Kleingate-Experiment is not valid text".into(),
        )
    })?;
    if forced.is_some() {
        return Err(bad(
            ErrorCode::InvalidRequest,
            "X-Kleingate-Experiment and X-Kleingate-Backend cannot be combined: the experiment chooses the backend".into(),
        ));
    }
    let Some(cfg) = state.experiments.configs.get(name) else {
        // Only the experiments this key could join: the others' names are not its business.
        let known: Vec<&str> = state
            .experiments
            .configs
            .iter()
            .filter(|(_, c)| {
                client
                    .principal
                    .as_ref()
                    .is_none_or(|p| c.variants.iter().all(|v| p.allows_variant(v)))
            })
            .map(|(n, _)| n.as_str())
            .collect();
        let listed = if known.is_empty() {
            "none".to_owned()
        } else {
            known.join(", ")
        };
        return Err(bad(
            ErrorCode::UnknownExperiment,
            format!("no experiment `{name}`; available: {listed}"),
        ));
    };
    let client_req = cfg.shadow.then(|| req.clone());
    // With auth, the key's name: a client must not pick its variant by choosing a header value.
    let key = match &client.principal {
        Some(p) => Some(&*p.name),
        None => header_text(headers, &cfg.key_header),
    };
    let variant = cfg.assign(name, key);
    if let Some(m) = variant.model.filter(|m| *m != req.model) {
        *req = for_variant(state, &body, m, name, &variant.name)?;
    }
    // A variant must not widen a key's scope: its model and backend are the key's to use, or
    // the request is refused (before it counts as an assignment).
    if let Some(p) = &client.principal {
        let refuse = |code, what: String| {
            Err(ApiError::new(
                code,
                format!(
                    "key `{}` may not use {what}, which experiment variant `{}` runs",
                    p.name, variant.name
                ),
            )
            .with_field("X-Kleingate-Experiment"))
        };
        if !p.allows_model(req.model) {
            return refuse(
                ErrorCode::ModelNotAllowed,
                format!("model {}", req.model.id()),
            );
        }
        if let Some(b) = variant.backend.as_ref().filter(|b| !p.allows_backend(b)) {
            return refuse(ErrorCode::BackendNotAllowed, format!("backend `{b}`"));
        }
    }
    let shadow = cfg.shadow_of(&variant.name).cloned();
    if shadow.is_some() && req.seed.is_none() {
        // Both sides of a pair use the same seed, so they differ only by the variant.
        req.seed = Some(rand::random_range(0..u64::from(u32::MAX)));
    }
    state
        .metrics
        .experiment_assignments
        .with_label_values(&[name, &variant.name])
        .inc();
    Ok(Some(Joined {
        run: ExperimentRun {
            experiment: name.to_owned(),
            variant: variant.name.clone(),
            preferred: variant.backend.clone(),
            prompt: req.prompt.clone(),
            seed: req.seed,
            keep_image: cfg.shadow,
            result_id: new_result_id(),
            shadow,
        },
        client_req,
        body,
    }))
}

/// The request a shadow runs: the client's own request (its model, not the served variant's,
/// unless the shadow variant sets one), with the seed of the image served. `None` when the
/// experiment runs no shadows, or the shadow variant's model cannot take the request (logged;
/// the client's answer is not refused for it).
pub(crate) fn shadow_request(
    state: &AppState,
    joined: &Joined,
    served_seed: Option<u64>,
) -> Option<(GenerateRequest, Variant)> {
    let run = &joined.run;
    let variant = run.shadow.clone()?;
    let client_req = joined.client_req.as_ref()?;
    let mut sreq = match variant.model.filter(|m| *m != client_req.model) {
        Some(m) => match for_variant(state, &joined.body, m, &run.experiment, &variant.name) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(experiment = %run.experiment, variant = %variant.name, error = %e.message, "no shadow run: the request does not fit the shadow variant's model");
                return None;
            }
        },
        None => client_req.clone(),
    };
    sreq.seed = served_seed.or(run.seed);
    Some((sreq, variant))
}

/// The client's request with a variant's model, validated again for that model.
fn for_variant(
    state: &AppState,
    body: &[u8],
    m: Model,
    experiment: &str,
    variant: &str,
) -> Result<GenerateRequest, ApiError> {
    let mut obj: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).unwrap_or_default();
    obj.remove("model");
    GenerateRequest::from_object(&obj, Some(m), m, &state.config.limits).map_err(|e| {
        let mut err = ApiError::from(e);
        err.message = format!(
            "{} (experiment `{experiment}` variant `{variant}` uses `{m}`)",
            err.message
        );
        err
    })
}

/// Store the record of an experiment request's answer (written before the answer goes out, so
/// feedback on its result id can follow at once), and count a comparable answer's latency and
/// cost for its variant.
pub(crate) async fn record(state: &Arc<AppState>, answer: &Answer, start: Instant) {
    let Some(joined) = &answer.experiment else {
        return;
    };
    if state.experiments.store.is_none() {
        return;
    }
    let run = &joined.run;
    let backend = answer.backend_label().to_owned();
    let fallback = run.preferred.as_ref().is_some_and(|p| *p != backend);
    let status = match &answer.result {
        Ok(_) => 200,
        Err(f) => f.error.code.status(),
    };
    let image = match &answer.result {
        Ok(s) if run.keep_image => Some((
            s.image.image.format.content_type().to_owned(),
            s.image.image.bytes.to_vec(),
        )),
        _ => None,
    };
    let record = Record {
        request_id: run.result_id.clone(),
        experiment: run.experiment.clone(),
        variant: run.variant.clone(),
        backend,
        model: answer.model_label().to_owned(),
        prompt: run.prompt.clone(),
        seed: answer.seed().or(run.seed),
        status,
        latency_ms: start.elapsed().as_secs_f64() * 1e3,
        cost_usd: answer.cost_usd(),
        // A hit or a coalesced wait did not measure the variant; a fallback measured another.
        excluded: matches!(answer.cache(), CacheOutcome::Hit | CacheOutcome::Coalesced) || fallback,
        pair_of: None,
        image,
    };
    if !record.excluded && record.status == 200 {
        let labels = [record.experiment.as_str(), record.variant.as_str()];
        let m = &state.metrics;
        m.experiment_latency
            .with_label_values(&labels)
            .observe(record.latency_ms / 1e3);
        m.experiment_cost_usd
            .with_label_values(&labels)
            .inc_by(record.cost_usd);
    }
    store_record(state, record).await;
}

/// Store a record: at most `storage.timeout_secs` of the answer's time, then it waits in the
/// retry buffer (see `storage/writer.rs`); never the client's failure.
pub(crate) async fn store_record(state: &Arc<AppState>, record: Record) {
    if let Some(store) = &state.experiments.store {
        store.record(record).await;
    }
}
