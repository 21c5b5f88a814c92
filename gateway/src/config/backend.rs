//! One `[backends.NAME]` table: what every kind shares ([`Common`]) and its kind's own settings
//! ([`Kind`], tagged by `kind`), each with its defaults. A key of another kind is an error that
//! names the kind it belongs to; an unknown key is an error.

#[cfg(feature = "local")]
use std::time::Duration;

use kleingate_backend::CostModel;
#[cfg(feature = "local")]
use kleingate_local::pipeline::TextEncoderMode;
#[cfg(feature = "local")]
use kleingate_local::precision::Precision;
use kleingate_protocol::Model;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};

use super::fields;

/// A backend's settings.
#[derive(Clone, Debug, Serialize)]
pub struct BackendConfig {
    #[serde(flatten)]
    pub common: Common,
    #[serde(flatten)]
    pub kind: Kind,
}

/// What every kind of backend has.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Common {
    #[serde(default = "all_models")]
    pub models: Vec<Model>,
    /// Per-attempt timeout (the request deadline still applies).
    #[serde(default = "default_backend_timeout")]
    pub timeout_secs: f64,
    /// Requests in flight to it at once; the rest wait or go elsewhere.
    #[serde(default = "default_concurrency")]
    pub max_concurrency: usize,
    /// For `policy = "weighted"`; 0 = used only as a fallback.
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub cost: CostModel,
    /// For `policy = "cost"`: the p95 latency (seconds) this backend must keep to be preferred.
    #[serde(default)]
    pub latency_objective_secs: Option<f64>,
}

/// The kind of backend and its own settings.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Kind {
    /// A Verda-compatible HTTP endpoint: Verda itself, or another kleingate (a GPU worker).
    Verda(VerdaSettings),
    /// The local engine.
    #[cfg(feature = "local")]
    Local(LocalSettings),
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VerdaSettings {
    /// The endpoint root; `/{model}/generate` is appended. With `discovery = "dns"`, its host
    /// is resolved to the pool's endpoints.
    #[serde(default)]
    pub base_url: String,
    /// A fixed pool of endpoint roots, instead of `base_url`.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// `static` (`base_url` or `endpoints`) or `dns`: every address `base_url`'s host resolves
    /// to, re-resolved every `discovery_interval_secs` (a Kubernetes headless Service).
    #[serde(default)]
    pub discovery: DiscoveryKind,
    #[serde(default = "default_discovery_interval")]
    pub discovery_interval_secs: f64,
    /// In a pool of two or more: consecutive failures after which an endpoint is left out for
    /// `eject_secs`.
    #[serde(default = "default_eject_after")]
    pub eject_after_failures: u32,
    #[serde(default = "default_eject_secs")]
    pub eject_secs: f64,
    /// The environment variable holding the bearer token. Unset variable = no token sent (fine
    /// for another kleingate; Verda itself will answer 401 and the gateway falls back).
    #[serde(default = "default_key_env")]
    pub api_key_env: String,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: f64,
    /// Larger answers are refused (502): an upstream must not fill the gateway's memory.
    #[serde(default = "default_max_response")]
    pub max_response_bytes: usize,
}

/// Where a `verda` backend's endpoints come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryKind {
    #[default]
    Static,
    Dns,
}

impl VerdaSettings {
    fn validate(&self) -> Result<(), String> {
        match (self.base_url.is_empty(), self.endpoints.is_empty()) {
            (true, true) => return Err(": base_url (or endpoints) is required".into()),
            (false, false) => {
                return Err(": give base_url or endpoints, not both".into());
            }
            _ => {}
        }
        for u in self
            .endpoints
            .iter()
            .chain(Some(&self.base_url).filter(|u| !u.is_empty()))
        {
            let ok = url::Url::parse(u)
                .is_ok_and(|p| matches!(p.scheme(), "http" | "https") && p.host_str().is_some());
            if !ok {
                return Err(format!(
                    ": `{u}` is not an http:// or https:// URL with a host"
                ));
            }
        }
        if self.discovery == DiscoveryKind::Dns {
            let named = url::Url::parse(&self.base_url)
                .ok()
                .is_some_and(|p| matches!(p.host(), Some(url::Host::Domain(_))));
            if !named {
                return Err(": discovery = \"dns\" needs a base_url whose host is a DNS name (the headless Service), and no endpoints".into());
            }
        }
        if self.discovery_interval_secs < 1.0 {
            return Err(format!(
                ".discovery_interval_secs must be at least 1 (a DNS lookup per interval); got {}",
                self.discovery_interval_secs
            ));
        }
        if self.eject_after_failures == 0 {
            return Err(".eject_after_failures must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(feature = "local")]
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalSettings {
    /// Weights directory or Hugging Face repo id.
    pub weights: String,
    /// `vulkan`, `wgpu` or `cpu`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Bounded queue in front of the device.
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
    /// Most compatible requests run as one batch.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Prompt tokens (512, as the reference pipeline).
    #[serde(default = "default_max_sequence_length")]
    pub max_sequence_length: usize,
    /// The safety checker, a ViT image classifier checkpoint (directory or Hugging Face repo
    /// id, e.g. `Falconsai/nsfw_image_detection`). Without it the backend cannot check.
    #[serde(default)]
    pub safety_weights: Option<String>,
    /// NSFW probability from which an image is flagged.
    #[serde(default = "default_safety_threshold")]
    pub safety_threshold: f32,
    /// Largest `width * height` of one input image (16 MP by default; the model scales
    /// references down to 1 MP, so larger ones only cost decoding).
    #[serde(default)]
    pub max_reference_pixels: Option<u64>,
    /// What one request's input images may take decoded, in MiB (256 by default): the sum of
    /// `width * height * bytes per pixel`, read from their headers before decoding.
    #[serde(default)]
    pub max_reference_decode_mib: Option<u64>,
    /// Longest one request's input images may take to decode.
    #[serde(default = "default_reference_timeout")]
    pub reference_timeout_secs: f64,
    /// Device `cpu`: threads of the CPU backend (default: one per core). One pool per process:
    /// local backends that set it must agree.
    #[serde(default)]
    pub threads: Option<usize>,
    /// The engine's compute dtype, `f32`, `bf16` or `f16` (default: bf16 on GPU devices, f32 on
    /// `cpu`). Weights are held on the device in it.
    #[serde(default)]
    pub dtype: Option<Precision>,
    /// `resident` (default) keeps the text encoder on the device; `offload` uploads it for each
    /// batch's prompts and frees it before the transformer runs (klein 4B in bf16: ~6 GB less
    /// device memory, one weight upload per batch).
    #[serde(default)]
    pub text_encoder: TextEncoderMode,
}

#[cfg(feature = "local")]
impl LocalSettings {
    fn validate(&self) -> Result<(), String> {
        if self.max_queue == 0 || self.max_batch == 0 || self.max_sequence_length == 0 {
            return Err(": max_queue, max_batch and max_sequence_length must be at least 1".into());
        }
        let t = self.safety_threshold;
        if !(t > 0.0 && t <= 1.0) {
            return Err(format!(": safety_threshold must be in (0, 1]; got {t}"));
        }
        if self.threads == Some(0) {
            return Err(".threads must be at least 1".into());
        }
        if self.max_reference_pixels == Some(0) || self.max_reference_decode_mib == Some(0) {
            return Err(
                ": max_reference_pixels and max_reference_decode_mib must be at least 1".into(),
            );
        }
        Ok(())
    }

    /// The compute dtype: the configured one, else the device's default.
    pub fn precision(&self) -> Precision {
        self.dtype
            .unwrap_or_else(|| Precision::default_for(&self.device))
    }

    pub fn reference_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.reference_timeout_secs)
    }
}

impl BackendConfig {
    /// The rules serde cannot state. An error starts with the key it is about (`.threads ...`)
    /// or `: `, so that the caller can put `backends.NAME` in front.
    pub(super) fn validate(&self) -> Result<(), String> {
        let c = &self.common;
        if c.models.is_empty() {
            return Err(".models is empty".into());
        }
        if c.max_concurrency == 0 {
            return Err(".max_concurrency must be at least 1".into());
        }
        c.cost.validate().map_err(|e| format!(".cost: {e}"))?;
        match &self.kind {
            Kind::Verda(_) if c.cost.gpu_hour_usd > 0.0 => Err(
                ".cost: gpu_hour_usd is for kind \"local\" (a verda backend is priced per image)"
                    .into(),
            ),
            Kind::Verda(v) => v.validate(),
            #[cfg(feature = "local")]
            Kind::Local(l) => l.validate(),
        }
    }

    #[cfg(feature = "local")]
    pub fn local(&self) -> Option<&LocalSettings> {
        match &self.kind {
            Kind::Local(l) => Some(l),
            Kind::Verda(_) => None,
        }
    }
}

impl<'de> Deserialize<'de> for BackendConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Through the config crate's own values, which coerce as the rest of the config does
        // (`timeout_secs = "30"`, numbers from environment variables).
        let mut table = config::Map::<String, config::Value>::deserialize(d)?;
        let kind = match table.remove("kind") {
            Some(k) => k.into_string().map_err(D::Error::custom)?,
            None => return Err(D::Error::missing_field("kind")),
        };
        let mut common = config::Map::new();
        for f in fields::of::<Common>() {
            if let Some(v) = table.remove(*f) {
                common.insert((*f).to_owned(), v);
            }
        }
        let value = |m| config::Value::new(None, config::ValueKind::Table(m));
        let common = Common::deserialize(value(common)).map_err(D::Error::custom)?;
        let verda = fields::of::<VerdaSettings>();
        #[cfg(feature = "local")]
        let local = fields::of::<LocalSettings>();
        #[cfg(not(feature = "local"))]
        let local: &[&str] = &[];
        let (own, other, other_name) = match kind.as_str() {
            "verda" => (verda, local, "local"),
            #[cfg(feature = "local")]
            "local" => (local, verda, "verda"),
            #[cfg(not(feature = "local"))]
            "local" => {
                return Err(D::Error::custom(
                    "kind \"local\" needs the local engine, which this build of kleingate leaves out (built without the `local` feature)",
                ))
            }
            k => {
                return Err(D::Error::custom(format!(
                    "unknown backend kind `{k}`; kinds: \"verda\", \"local\""
                )))
            }
        };
        // A key of the other kind: say whose it is (a local setting on a Verda backend is a
        // misunderstanding, not a typo).
        let mut foreign: Vec<&str> = table
            .keys()
            .map(String::as_str)
            .filter(|k| !own.contains(k) && other.contains(k))
            .collect();
        foreign.sort_unstable();
        if !foreign.is_empty() {
            return Err(D::Error::custom(format!(
                "{} {} for kind \"{other_name}\"",
                foreign.join(", "),
                if foreign.len() == 1 { "is" } else { "are" }
            )));
        }
        let rest = value(table);
        let kind = match kind.as_str() {
            #[cfg(feature = "local")]
            "local" => Kind::Local(LocalSettings::deserialize(rest).map_err(D::Error::custom)?),
            _ => Kind::Verda(VerdaSettings::deserialize(rest).map_err(D::Error::custom)?),
        };
        Ok(BackendConfig { common, kind })
    }
}

fn default_discovery_interval() -> f64 {
    10.0
}
fn default_eject_after() -> u32 {
    3
}
fn default_eject_secs() -> f64 {
    10.0
}
fn default_key_env() -> String {
    "VERDA_API_KEY".into()
}
fn all_models() -> Vec<Model> {
    Model::ALL.to_vec()
}
fn default_backend_timeout() -> f64 {
    120.0
}
fn default_connect_timeout() -> f64 {
    5.0
}
fn default_concurrency() -> usize {
    64
}
fn default_weight() -> u32 {
    1
}
fn default_max_response() -> usize {
    32 * 1024 * 1024
}
#[cfg(feature = "local")]
fn default_device() -> String {
    "cpu".into()
}
#[cfg(feature = "local")]
fn default_max_queue() -> usize {
    16
}
#[cfg(feature = "local")]
fn default_max_batch() -> usize {
    4
}
#[cfg(feature = "local")]
fn default_max_sequence_length() -> usize {
    512
}
#[cfg(feature = "local")]
fn default_safety_threshold() -> f32 {
    0.5
}
#[cfg(feature = "local")]
fn default_reference_timeout() -> f64 {
    10.0
}
