//! A/B experiments: named experiments with weighted variants (a backend and/or a model), sticky
//! assignment by a client key, results and feedback stored (SQLite, or PostgreSQL shared by
//! replicas: `storage/`) so they survive restarts.
//!
//! A request joins an experiment by naming it in `X-Kleingate-Experiment`. With the client key
//! header (`key_header`, `X-Kleingate-Client` by default) the variant is a hash of experiment name
//! and key, so a client always sees the same variant; without it the pick is random per request.
//! Each answer is recorded (variant, requested and serving backend, model, seed, latency, cost,
//! whether it came from the cache or a fallback) under its request id; `POST /v1/feedback` adds a
//! score for a request id, and `GET /v1/experiments/{name}` reports per variant. Cache hits and
//! fallbacks are recorded but left out of the comparison: they do not measure the variant.

use std::collections::BTreeMap;

use kleingate_protocol::Model;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub name: String,
    #[serde(default = "one")]
    pub weight: u32,
    /// Serve this variant from this backend (first choice; fallbacks still apply and are marked).
    #[serde(default)]
    pub backend: Option<String>,
    /// Serve this variant with this model instead of the requested one.
    #[serde(default)]
    pub model: Option<Model>,
}

fn one() -> u32 {
    1
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub variants: Vec<Variant>,
    #[serde(default = "default_key_header")]
    pub key_header: String,
    /// Also run every request on a second variant in the background (after the client's
    /// answer, never delaying it) and keep both images, for side-by-side comparison.
    #[serde(default)]
    pub shadow: bool,
}

fn default_key_header() -> String {
    "x-kleingate-client".into()
}

impl ExperimentConfig {
    pub fn validate(&self, name: &str, backends: &[&str]) -> Result<(), String> {
        if self.variants.len() < 2 {
            return Err(format!("experiments.{name}: needs at least two variants"));
        }
        if self.variants.iter().all(|v| v.weight == 0) {
            return Err(format!("experiments.{name}: every variant has weight 0"));
        }
        let mut seen = std::collections::HashSet::new();
        for v in &self.variants {
            if !seen.insert(&v.name) {
                return Err(format!("experiments.{name}: variant `{}` twice", v.name));
            }
            if let Some(b) = &v.backend {
                if !backends.contains(&b.as_str()) {
                    return Err(format!(
                        "experiments.{name}: variant `{}` names backend `{b}`, which is not configured",
                        v.name
                    ));
                }
            }
        }
        if axum::http::HeaderName::from_bytes(self.key_header.as_bytes()).is_err() {
            return Err(format!(
                "experiments.{name}: key_header is not a header name"
            ));
        }
        Ok(())
    }

    /// The variant a shadow run of `assigned` uses: the next one in the list.
    pub fn shadow_of(&self, assigned: &str) -> Option<&Variant> {
        if !self.shadow {
            return None;
        }
        let i = self.variants.iter().position(|v| v.name == assigned)?;
        Some(&self.variants[(i + 1) % self.variants.len()])
    }

    /// The variant for a client key (sticky), or for a random draw without one.
    pub fn assign(&self, experiment: &str, key: Option<&str>) -> &Variant {
        let total: u64 = self.variants.iter().map(|v| u64::from(v.weight)).sum();
        let mut point = match key {
            Some(k) => {
                let mut h = Sha256::new();
                h.update((experiment.len() as u32).to_be_bytes());
                h.update(experiment.as_bytes());
                h.update(k.as_bytes());
                let d = h.finalize();
                u64::from_be_bytes(d[..8].try_into().expect("8 bytes")) % total.max(1)
            }
            None => rand::random_range(0..total.max(1)),
        };
        for v in &self.variants {
            let w = u64::from(v.weight);
            if point < w {
                return v;
            }
            point -= w;
        }
        &self.variants[0]
    }
}

/// A fresh, unguessable id for a stored answer (128 random bits, hex).
pub fn new_result_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

pub use crate::storage::{Pair, Record, VariantResult};

/// The configured experiments and their store.
pub struct Experiments {
    pub configs: BTreeMap<String, ExperimentConfig>,
    pub store: Option<crate::storage::Storage>,
}

/// Apply `storage.image_retention_days` and `result_retention_days` now and then for as long as
/// the server runs: at start, then every tenth of the image retention (at least a second, at
/// most an hour), so what requests leave behind does not grow without bound.
pub async fn prune_periodically(state: std::sync::Arc<crate::AppState>) {
    if state.experiments.store.is_none() {
        return;
    }
    let day = 86_400.0;
    let images =
        std::time::Duration::from_secs_f64(state.config.storage.image_retention_days * day);
    let results =
        std::time::Duration::from_secs_f64(state.config.storage.result_retention_days * day);
    let every = (images / 10).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(3600),
    );
    loop {
        let done = match &state.experiments.store {
            Some(store) => store.prune(images, results).await,
            None => return,
        };
        match done {
            Ok((i, r)) => {
                let m = &state.metrics.storage_pruned;
                m.with_label_values(&["image"]).inc_by(i);
                m.with_label_values(&["result"]).inc_by(r);
                if i + r > 0 {
                    tracing::info!(images = i, results = r, "pruned old experiment records");
                }
            }
            Err(e) => tracing::error!(error = %e, "pruning old experiment records failed"),
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ExperimentConfig {
        ExperimentConfig {
            variants: vec![
                Variant {
                    name: "a".into(),
                    weight: 3,
                    backend: None,
                    model: None,
                },
                Variant {
                    name: "b".into(),
                    weight: 1,
                    backend: None,
                    model: None,
                },
            ],
            key_header: default_key_header(),
            shadow: false,
        }
    }

    #[test]
    fn assignment_is_sticky_per_key_and_follows_the_weights() {
        let c = cfg();
        let mut counts = BTreeMap::new();
        for i in 0..4000 {
            let key = format!("client-{i}");
            let v = &c.assign("exp", Some(&key)).name;
            assert_eq!(v, &c.assign("exp", Some(&key)).name, "not sticky");
            *counts.entry(v.clone()).or_insert(0) += 1;
        }
        let a = f64::from(counts["a"]) / 4000.0;
        assert!((a - 0.75).abs() < 0.03, "share of a: {a}");
        // Another experiment hashes the same keys differently.
        let moved = (0..200)
            .filter(|i| {
                let k = format!("client-{i}");
                c.assign("exp", Some(&k)).name != c.assign("other", Some(&k)).name
            })
            .count();
        assert!(moved > 20);
    }
}
