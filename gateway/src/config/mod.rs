//! The gateway's configuration: one TOML file plus `KLEINGATE_*` environment overrides
//! (`KLEINGATE_CACHE__TTL_SECS=60`, `KLEINGATE_BACKENDS__VERDA__BASE_URL=...`). Every key is
//! documented in `gateway/kleingate.example.toml`. Unknown keys are errors, so a typo in a config
//! file fails at start-up instead of silently running defaults.

use std::collections::BTreeMap;
use std::path::Path;

use kleingate_protocol::{Limits, Model};
use serde::{Deserialize, Serialize};

mod backend;
mod fields;

pub use crate::secret_url::SecretUrl;
#[cfg(feature = "local")]
pub use backend::LocalSettings;
pub use backend::{BackendConfig, Common, DiscoveryKind, Kind, VerdaSettings};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default = "default_model")]
    pub default_model: Model,
    /// One deadline per request, spent across all backend attempts; 504 when it runs out.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: f64,
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Time a client gets to send its whole request body; a client that trickles it (holding an
    /// `admission.max_inflight` place) gets 408.
    #[serde(default = "default_body_timeout")]
    pub body_timeout_secs: f64,
    /// Time a client gets to send a request's headers, and an idle keep-alive connection to
    /// start its next request; then the connection is closed. Keep it above the idle timeout of
    /// the proxy in front.
    #[serde(default = "default_header_timeout")]
    pub header_timeout_secs: f64,
    /// How long shutdown waits for in-flight requests before giving up on them.
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: f64,
    /// On SIGTERM, how long the gateway keeps serving with `/readyz` answering 503 (and every
    /// answer saying `Connection: close`) before it stops accepting and drains: the time load
    /// balancers and Kubernetes need to stop sending it new requests.
    #[serde(default = "default_shutdown_delay")]
    pub shutdown_delay_secs: f64,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub circuit: CircuitConfig,
    #[serde(default)]
    pub backends: BTreeMap<String, BackendConfig>,
    #[serde(default)]
    pub budget: crate::budget::BudgetConfig,
    /// A/B experiments by name (see `experiments.rs`).
    #[serde(default)]
    pub experiments: BTreeMap<String, crate::experiments::ExperimentConfig>,
    #[serde(default)]
    pub storage: crate::storage::StorageConfig,
    /// Client API keys and what each may do (see `auth.rs`).
    #[serde(default)]
    pub auth: crate::auth::AuthConfig,
    /// Rate limits per client and load shedding (see `admission.rs`).
    #[serde(default)]
    pub admission: crate::admission::AdmissionConfig,
    /// Fetching `input_images` URLs for the local engine (see `fetch.rs`).
    #[serde(default)]
    pub fetch: crate::fetch::FetchConfig,
    /// OpenTelemetry trace export (see `telemetry.rs`); off unless `endpoint` is set.
    #[serde(default)]
    pub telemetry: crate::telemetry::TelemetryConfig,
    /// Where replicas keep what they share (see `shared/`): `memory` (each its own) or `redis`.
    #[serde(default)]
    pub state: crate::shared::StateConfig,
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}

fn default_model() -> Model {
    Model::Klein4b
}
fn default_request_timeout() -> f64 {
    120.0
}
fn default_max_body() -> usize {
    64 * 1024 * 1024
}
fn default_body_timeout() -> f64 {
    30.0
}
fn default_header_timeout() -> f64 {
    // Also the keep-alive idle timeout (see server.rs): above the 60 s of common proxies.
    75.0
}
fn default_grace() -> f64 {
    130.0
}
fn default_shutdown_delay() -> f64 {
    // Long enough for Kubernetes to take the pod out of its Services' endpoints (readiness
    // probe period x failure threshold in k8s/, plus propagation).
    5.0
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    pub enabled: bool,
    /// Bound on the encoded image bytes held.
    pub max_bytes: u64,
    pub ttl_secs: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            max_bytes: 512 * 1024 * 1024,
            ttl_secs: 3600,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// The first backend in `order` (then the rest by name) that serves the model.
    Priority,
    /// A weighted random first choice; the others follow by descending weight as fallbacks.
    Weighted,
    /// The cheapest healthy backend whose observed p95 latency meets its objective; ties broken
    /// by load. The others follow in the same order as fallbacks.
    Cost,
}

/// What to do with a request that asks for the safety checker (the default).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SafetyPolicy {
    /// Only backends that can run the checker serve it.
    Require,
    /// Any backend serves it; those that cannot check answer `X-Has-Nsfw-Content: false`.
    Skip,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    pub policy: Policy,
    pub order: Vec<String>,
    pub allow_backend_header: bool,
    pub safety: SafetyPolicy,
    /// For `policy = "cost"`: recent successful latencies kept per backend and model, from which
    /// the p95 is taken.
    pub latency_window: usize,
    /// The longest back-off taken from an upstream's `Retry-After` (a wrong or hostile value must
    /// not park a backend for long).
    pub max_retry_after_secs: f64,
    /// While a backend backs off, one request is still let through this often, to see whether
    /// it recovered (its success ends the back-off).
    pub busy_probe_secs: f64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            policy: Policy::Priority,
            order: Vec::new(),
            allow_backend_header: true,
            safety: SafetyPolicy::Require,
            latency_window: 100,
            max_retry_after_secs: 120.0,
            busy_probe_secs: 10.0,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitConfig {
    /// Consecutive failures (5xx, connect errors, timeouts, bad answers, refused credentials) that
    /// open a backend's circuit. Busy answers (503, 429) and client errors do not count.
    pub failure_threshold: u32,
    /// How long an open circuit rejects requests before one probe request is let through.
    pub cooldown_secs: f64,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        CircuitConfig {
            failure_threshold: 5,
            cooldown_secs: 30.0,
        }
    }
}

/// The longest span of time any setting may hold.
const MAX_SPAN_SECS: f64 = 86_400.0;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the configuration failed: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Load `path` (TOML) with `KLEINGATE_*` overrides from the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, None)
    }

    /// As [`Config::load`], with an explicit environment (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Config, ConfigError> {
        let file_only = Self::builder(path, None, &[])?;
        // List-valued keys must be named for the environment source to split them on commas; the
        // per-backend ones depend on which backends the file defines.
        let mut list_keys = vec!["routing.order".to_owned()];
        if let Ok(names) = file_only.get_table("backends") {
            for n in names.keys() {
                list_keys.push(format!("backends.{n}.models"));
                list_keys.push(format!("backends.{n}.endpoints"));
            }
        }
        let cfg: Config = Self::builder(path, Some(env), &list_keys)?.try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn builder(
        path: Option<&Path>,
        env: Option<Option<std::collections::HashMap<String, String>>>,
        list_keys: &[String],
    ) -> Result<config::Config, config::ConfigError> {
        let mut b = config::Config::builder();
        if let Some(p) = path {
            b = b.add_source(config::File::from(p).format(config::FileFormat::Toml));
        }
        if let Some(env) = env {
            let vars = relevant_env(env.unwrap_or_else(|| std::env::vars().collect()));
            let mut e = config::Environment::with_prefix("KLEINGATE")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .list_separator(",");
            for k in list_keys {
                e = e.with_list_parse_key(k);
            }
            b = b.add_source(e.source(Some(vars)));
        }
        b.build()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.backends.is_empty() {
            return bad("no backends configured: add at least one [backends.NAME] table".into());
        }
        if let Err(e) = self.budget.validate() {
            return bad(e);
        }
        if let Err(e) = self.limits.validate() {
            return bad(e);
        }
        // Every span of time: a number of seconds a Duration and `Instant + Duration` can hold
        // (a huge value would panic per request, not just look odd).
        let mut spans: Vec<(String, f64, bool)> = vec![
            (
                "request_timeout_secs".into(),
                self.request_timeout_secs,
                false,
            ),
            ("body_timeout_secs".into(), self.body_timeout_secs, false),
            (
                "header_timeout_secs".into(),
                self.header_timeout_secs,
                false,
            ),
            ("shutdown_grace_secs".into(), self.shutdown_grace_secs, true),
            ("shutdown_delay_secs".into(), self.shutdown_delay_secs, true),
            (
                "routing.max_retry_after_secs".into(),
                self.routing.max_retry_after_secs,
                true,
            ),
            (
                "routing.busy_probe_secs".into(),
                self.routing.busy_probe_secs,
                false,
            ),
            (
                "circuit.cooldown_secs".into(),
                self.circuit.cooldown_secs,
                true,
            ),
            ("fetch.timeout_secs".into(), self.fetch.timeout_secs, false),
            ("auth.reload_secs".into(), self.auth.reload_secs, false),
        ];
        for (name, days) in [
            (
                "storage.image_retention_days",
                self.storage.image_retention_days,
            ),
            (
                "storage.result_retention_days",
                self.storage.result_retention_days,
            ),
        ] {
            if !(days > 0.0 && days <= 36_500.0) {
                return bad(format!(
                    "{name} must be positive and at most 100 years; got {days}"
                ));
            }
        }
        if self.cache.ttl_secs > 365 * 86_400 {
            return bad("cache.ttl_secs must be at most a year".into());
        }
        for (name, b) in &self.backends {
            let c = &b.common;
            spans.push((
                format!("backends.{name}.timeout_secs"),
                c.timeout_secs,
                false,
            ));
            if let Some(o) = c.latency_objective_secs {
                spans.push((format!("backends.{name}.latency_objective_secs"), o, false));
            }
            match &b.kind {
                Kind::Verda(v) => {
                    for (key, value) in [
                        ("connect_timeout_secs", v.connect_timeout_secs),
                        ("discovery_interval_secs", v.discovery_interval_secs),
                        ("eject_secs", v.eject_secs),
                    ] {
                        spans.push((format!("backends.{name}.{key}"), value, false));
                    }
                }
                #[cfg(feature = "local")]
                Kind::Local(l) => spans.push((
                    format!("backends.{name}.reference_timeout_secs"),
                    l.reference_timeout_secs,
                    false,
                )),
            }
        }
        for (name, v, zero_ok) in spans {
            let low_ok = v > 0.0 || (zero_ok && v == 0.0);
            if !(low_ok && v <= MAX_SPAN_SECS) {
                let low = if zero_ok { "0 or more" } else { "positive" };
                return bad(format!(
                    "{name} must be {low} and at most a day ({MAX_SPAN_SECS} s); got {v}"
                ));
            }
        }
        if let Err(e) = self.admission.validate() {
            return bad(e);
        }
        if let Err(e) = self.auth.validate() {
            return bad(e);
        }
        if let Err(e) = self.fetch.validate() {
            return bad(e);
        }
        if let Err(e) = self.telemetry.validate() {
            return bad(e);
        }
        if let Err(e) = self.state.validate() {
            return bad(e);
        }
        if let Err(e) = self.storage.validate() {
            return bad(e);
        }
        let names: Vec<&str> = self.backends.keys().map(String::as_str).collect();
        for (name, x) in &self.experiments {
            if let Err(e) = x.validate(name, &names) {
                return bad(e);
            }
        }
        for name in &self.routing.order {
            if !self.backends.contains_key(name) {
                return bad(format!(
                    "routing.order names `{name}`, which is not a configured backend"
                ));
            }
        }
        if self.circuit.failure_threshold == 0 {
            return bad("circuit.failure_threshold must be at least 1".into());
        }
        for (name, b) in &self.backends {
            b.validate()
                .map_err(|e| ConfigError::Invalid(format!("backends.{name}{e}")))?;
        }
        // One CPU thread pool per process: local backends that size it must agree.
        #[cfg(feature = "local")]
        {
            let mut sized = self
                .backends
                .iter()
                .filter_map(|(n, b)| b.local().and_then(|l| l.threads).map(|t| (n, t)));
            if let Some((name, t)) = sized.next() {
                if let Some((other, t2)) = sized.find(|(_, t2)| *t2 != t) {
                    return bad(format!("backends.{name}.threads = {t} but backends.{other}.threads = {t2}: the CPU thread pool is one per process"));
                }
            }
        }
        if self.routing.policy == Policy::Weighted
            && self.backends.values().all(|b| b.common.weight == 0)
        {
            return bad("policy \"weighted\" needs at least one backend with weight > 0".into());
        }
        Ok(())
    }

    /// Backend names in priority order: `routing.order` first, then the rest by name.
    pub fn backend_order(&self) -> Vec<String> {
        let mut names = self.routing.order.clone();
        for n in self.backends.keys() {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        names
    }
}

/// Keep the `KLEINGATE_*` variables that address a config key (their first segment is one of
/// `Config`'s fields, read from the type). Others that merely share the
/// prefix (a deployment's `KLEINGATE_VERDA_TOKEN` secret, say) are not config and must not fail
/// start-up; a typo *inside* a section (`KLEINGATE_CACHE__TTL_SEC`) still does.
fn relevant_env(
    vars: std::collections::HashMap<String, String>,
) -> std::collections::HashMap<String, String> {
    vars.into_iter()
        .filter(|(k, _)| {
            let Some(rest) = k.strip_prefix("KLEINGATE_") else {
                return false;
            };
            let first = rest.split("__").next().unwrap_or("").to_ascii_lowercase();
            fields::of::<Config>().contains(&first.as_str())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::Write;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    const BASIC: &str = r#"
        [backends.verda]
        kind = "verda"
        base_url = "https://example.invalid"
        [backends.other]
        kind = "verda"
        base_url = "http://127.0.0.1:9"
        models = ["flux2-klein-4b"]
    "#;

    #[test]
    fn the_shipped_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("kleingate.example.toml");
        let cfg = Config::load_with_env(Some(&path), Some(HashMap::new())).unwrap();
        assert!(cfg.backends.contains_key("verda"));
        assert_eq!(cfg.cache.max_bytes, 536_870_912);
    }

    /// The configs inside the Kubernetes ConfigMaps are real kleingate configs.
    #[test]
    fn the_kubernetes_configmaps_hold_valid_configs() {
        // The GPU worker's config has a local backend: a build without the engine refuses it.
        let files: &[&str] = if cfg!(feature = "local") {
            &["gateway-configmap.yaml", "gpu-worker-configmap.yaml"]
        } else {
            &["gateway-configmap.yaml"]
        };
        for f in files {
            let path = format!("{}/../k8s/base/{f}", env!("CARGO_MANIFEST_DIR"));
            let yaml = std::fs::read_to_string(&path).unwrap();
            let toml: String = yaml
                .lines()
                .skip_while(|l| !l.trim_end().ends_with("kleingate.toml: |"))
                .skip(1)
                .take_while(|l| l.is_empty() || l.starts_with("    "))
                .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
                .collect();
            assert!(toml.contains("[backends."), "{f}: no config found");
            // The gateway's Redis URL comes from the Secret kleingate-state, as the Deployment
            // sets it.
            let env = HashMap::from([
                (
                    "KLEINGATE_STATE__REDIS_URL".to_owned(),
                    "redis://:secret@kleingate-redis:6379/0".to_owned(),
                ),
                (
                    "KLEINGATE_STORAGE__URL".to_owned(),
                    "postgres://kleingate:secret@kleingate-postgres:5432/kleingate".to_owned(),
                ),
            ]);
            let cfg = Config::load_with_env(Some(file(&toml).path()), Some(env))
                .unwrap_or_else(|e| panic!("{f}: {e}"));
            assert!(!cfg.backends.is_empty());
            if *f == "gateway-configmap.yaml" {
                assert_eq!(cfg.state.backend, crate::shared::StateBackend::Redis);
                assert!(matches!(
                    cfg.storage.target(),
                    Ok(crate::storage::Target::Postgres(_))
                ));
            }
        }
    }

    /// A backend's values are coerced as every other section's (quoted numbers, environment
    /// variables' text).
    #[test]
    fn backend_values_coerce_like_the_rest_of_the_config() {
        let f = file(
            "[backends.v]\nkind = \"verda\"\nbase_url = \"http://x\"\ntimeout_secs = \"30\"\n",
        );
        let env = HashMap::from([(
            "KLEINGATE_BACKENDS__V__MAX_CONCURRENCY".to_owned(),
            "8".to_owned(),
        )]);
        let cfg = Config::load_with_env(Some(f.path()), Some(env)).unwrap();
        assert_eq!(cfg.backends["v"].common.timeout_secs, 30.0);
        assert_eq!(cfg.backends["v"].common.max_concurrency, 8);
    }

    #[test]
    fn environment_overrides_file_values_and_lists() {
        let f = file(BASIC);
        let env = HashMap::from([
            ("KLEINGATE_CACHE__TTL_SECS".to_owned(), "60".to_owned()),
            (
                "KLEINGATE_ROUTING__ORDER".to_owned(),
                "other,verda".to_owned(),
            ),
            (
                "KLEINGATE_BACKENDS__OTHER__MODELS".to_owned(),
                "flux2-klein-9b,flux2-klein-base-9b".to_owned(),
            ),
            (
                "KLEINGATE_DEFAULT_MODEL".to_owned(),
                "flux2-klein-9b".to_owned(),
            ),
            // Shares the prefix but is no config key (e.g. a secret): ignored.
            ("KLEINGATE_VERDA_TOKEN".to_owned(), "sk-x".to_owned()),
        ]);
        let cfg = Config::load_with_env(Some(f.path()), Some(env)).unwrap();
        assert_eq!(cfg.cache.ttl_secs, 60);
        assert_eq!(cfg.routing.order, ["other", "verda"]);
        assert_eq!(
            cfg.backends["other"].common.models,
            [Model::Klein9b, Model::KleinBase9b]
        );
        assert_eq!(cfg.default_model, Model::Klein9b);
        assert_eq!(cfg.backend_order(), ["other", "verda"]);
    }

    /// Overrides reach every section and each backend kind's own keys: the variables kept are
    /// decided by `Config`'s fields, not by a list kept by hand.
    #[cfg(feature = "local")]
    #[test]
    fn every_section_and_kind_key_can_be_overridden() {
        let f = file("[backends.l]\nkind = \"local\"\nweights = \"/w\"\n");
        let mut env = HashMap::from([
            ("KLEINGATE_FETCH__TIMEOUT_SECS".to_owned(), "3".to_owned()),
            ("KLEINGATE_BACKENDS__L__DTYPE".to_owned(), "bf16".to_owned()),
            (
                "KLEINGATE_BACKENDS__L__MAX_BATCH".to_owned(),
                "2".to_owned(),
            ),
        ]);
        for field in fields::of::<Config>() {
            // Each top-level key is addressable: an unknown key under it is an error naming it.
            env.insert(
                format!("KLEINGATE_{}__NO_SUCH_KEY", field.to_ascii_uppercase()),
                "1".to_owned(),
            );
            let e = Config::load_with_env(Some(f.path()), Some(env.clone()));
            env.retain(|k, _| !k.ends_with("__NO_SUCH_KEY"));
            // A scalar key cannot hold a table, a map of backends/experiments takes any name:
            // either way the variable was read, which is what this checks.
            let read = match &e {
                Err(e) => e.to_string().contains("no_such_key") || e.to_string().contains(*field),
                Ok(_) => false,
            };
            assert!(
                read,
                "KLEINGATE_{}__... was not read: {e:?}",
                field.to_ascii_uppercase()
            );
        }
        let cfg = Config::load_with_env(Some(f.path()), Some(env)).unwrap();
        assert_eq!(cfg.fetch.timeout_secs, 3.0);
        let l = cfg.backends["l"].local().unwrap();
        assert_eq!(l.dtype, Some(kleingate_local::precision::Precision::Bf16));
        assert_eq!(l.max_batch, 2);
    }

    /// A gateway built without the engine refuses a local backend by name, at start-up.
    #[cfg(not(feature = "local"))]
    #[test]
    fn a_build_without_the_engine_refuses_local_backends() {
        let f = file("[backends.l]\nkind = \"local\"\nweights = \"/w\"\n");
        let e = Config::load_with_env(Some(f.path()), Some(HashMap::new())).unwrap_err();
        assert!(e.to_string().contains("`local` feature"), "{e}");
        let f = file("[backends.v]\nkind = \"verda\"\nbase_url = \"http://x\"\nthreads = 2\n");
        let e = Config::load_with_env(Some(f.path()), Some(HashMap::new())).unwrap_err();
        assert!(e.to_string().contains("threads"), "{e}");
    }

    #[cfg(feature = "local")]
    #[test]
    fn a_local_backend_takes_its_dtype_and_text_encoder_mode() {
        let f = file(
            "[backends.l]\nkind = \"local\"\nweights = \"/w\"\ndtype = \"f16\"\ntext_encoder = \"offload\"\n",
        );
        let cfg = Config::load_with_env(Some(f.path()), Some(HashMap::new())).unwrap();
        let b = cfg.backends["l"].local().unwrap();
        assert_eq!(b.dtype, Some(kleingate_local::precision::Precision::F16));
        assert_eq!(
            b.text_encoder,
            kleingate_local::pipeline::TextEncoderMode::Offload
        );
    }

    #[cfg(feature = "local")]
    #[test]
    fn typos_and_inconsistencies_are_errors() {
        let f = file(&format!("{BASIC}\n[cache]\nmax_byte = 5\n"));
        let e = Config::load_with_env(Some(f.path()), Some(HashMap::new())).unwrap_err();
        assert!(e.to_string().contains("max_byte"), "{e}");
        for top in [
            "request_timeout_secs = 1e20",
            "shutdown_grace_secs = -1",
            "header_timeout_secs = 0",
        ] {
            let name = top.split(' ').next().unwrap_or_default();
            let f = file(&format!("{top}\n{BASIC}"));
            let e = Config::load_with_env(Some(f.path()), Some(HashMap::new())).unwrap_err();
            assert!(e.to_string().contains(name), "{top}: {e}");
        }
        let f = file(&format!("[routing]\norder = [\"nope\"]\n{BASIC}"));
        let e = Config::load_with_env(Some(f.path()), Some(HashMap::new())).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let env = HashMap::from([("KLEINGATE_CACHE__TTL_SEC".to_owned(), "5".to_owned())]);
        let e = Config::load_with_env(Some(file(BASIC).path()), Some(env)).unwrap_err();
        assert!(e.to_string().contains("ttl_sec"), "{e}");
        let f = file("[backends.v]\nkind = \"verda\"\n");
        let e = Config::load_with_env(Some(f.path()), Some(HashMap::new())).unwrap_err();
        assert!(e.to_string().contains("base_url"), "{e}");
        let f = file("[backends.v]\nkind = \"verda\"\nbase_url = \"http://x\"\nmodels = [\"flux2-klein-3b\"]\n");
        assert!(Config::load_with_env(Some(f.path()), Some(HashMap::new())).is_err());
        for (extra, needle) in [
            ("safety_threshold = 1.5", "safety_threshold"),
            ("safety_threshold = 0.0", "safety_threshold"),
            ("max_batch = 0", "max_batch"),
            ("latency_objective_secs = -1.0", "latency_objective_secs"),
            ("timeout_secs = 1e300", "timeout_secs"),
            ("connect_timeout_secs = nan", "connect_timeout_secs"),
            ("threads = 0", "threads"),
            ("max_reference_pixels = 0", "max_reference_pixels"),
            ("reference_timeout_secs = 0", "reference_timeout_secs"),
            ("dtype = \"f64\"", "f64"),
            ("text_encoder = \"cpu\"", "cpu"),
        ] {
            let f = file(&format!(
                "[backends.l]\nkind = \"local\"\nweights = \"/w\"\n{extra}\n"
            ));
            let e = Config::load_with_env(Some(f.path()), Some(HashMap::new())).unwrap_err();
            assert!(e.to_string().contains(needle), "{e}");
        }
        let f = file(
            "[backends.v]\nkind = \"verda\"\nbase_url = \"http://x\"\nsafety_weights = \"/s\"\n",
        );
        let e = Config::load_with_env(Some(f.path()), Some(HashMap::new())).unwrap_err();
        assert!(e.to_string().contains("kind \"local\""), "{e}");
        for extra in [
            "threads = 2",
            "max_reference_decode_mib = 8",
            "dtype = \"bf16\"",
            "text_encoder = \"offload\"",
        ] {
            let f = file(&format!(
                "[backends.v]\nkind = \"verda\"\nbase_url = \"http://x\"\n{extra}\n"
            ));
            let e = Config::load_with_env(Some(f.path()), Some(HashMap::new())).unwrap_err();
            assert!(e.to_string().contains("kind \"local\""), "{extra}: {e}");
        }
        // One CPU thread pool per process: two local backends must agree on its size.
        let f = file(
            "[backends.a]\nkind = \"local\"\nweights = \"/w\"\nthreads = 2\n[backends.b]\nkind = \"local\"\nweights = \"/w\"\nthreads = 3\n",
        );
        let e = Config::load_with_env(Some(f.path()), Some(HashMap::new())).unwrap_err();
        assert!(e.to_string().contains("one per process"), "{e}");
        for (exp, needle) in [
            ("variants = [{ name = \"a\" }]", "at least two"),
            (
                "variants = [{ name = \"a\" }, { name = \"b\", backend = \"nope\" }]",
                "nope",
            ),
            ("variants = [{ name = \"a\" }, { name = \"a\" }]", "twice"),
        ] {
            let f = file(&format!("{BASIC}\n[experiments.x]\n{exp}\n"));
            let e = Config::load_with_env(Some(f.path()), Some(HashMap::new())).unwrap_err();
            assert!(e.to_string().contains(needle), "{e}");
        }
    }
}
