//! The local engine as a gateway backend: weights load in the background (503 "model not loaded"
//! until then, as Verda answers), a bounded queue in front of the device (full -> 503, so the
//! gateway falls back, without tripping its circuit breaker), batching of compatible queued
//! requests, and cancellation when nobody waits for a result any more.
//!
//! This module is the adapter: configuration, loading and checking the models, decoding
//! references, health, cost and the mapping of engine errors to backend errors. The queue, the
//! batching worker, the safety check and image encoding are in `worker.rs`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kleingate_backend::{Backend, BackendError, CostModel, GeneratedImage, Health, SharedFetcher};
use kleingate_protocol::{GenerateRequest, InputImage, Limits, Model};

use crate::error::EngineError;
use crate::hub::IMAGE_CLASSIFIER;
use crate::pipeline::Pipeline;
use crate::reference::{DecodeLimits, RgbImage};
use crate::safety::SafetyChecker;
use crate::worker::{lock, Engine, LoadState, Models};

#[derive(Clone, Debug)]
pub struct LocalConfig {
    /// A diffusers-layout directory or a Hugging Face repo id.
    pub weights: String,
    /// `cpu`, `vulkan` or `wgpu`.
    pub device: String,
    /// The compute dtype (`Precision::default_for(device)` unless configured).
    pub precision: crate::precision::Precision,
    /// Whether the text encoder stays on the device between batches.
    pub text_encoder: crate::pipeline::TextEncoderMode,
    pub models: Vec<Model>,
    /// Requests waiting for the device; one more is refused with 503.
    pub max_queue: usize,
    /// Compatible queued requests (same model, size, steps, guidance; no references) run as one
    /// batch of at most this many.
    pub max_batch: usize,
    pub max_sequence_length: usize,
    /// The safety checker's checkpoint (directory or repo id); `None`: this backend cannot check.
    pub safety_weights: Option<String>,
    /// NSFW probability from which an image is flagged.
    pub safety_threshold: f32,
    /// The gateway's bounds, applied to sizes the engine derives from a reference.
    pub limits: Limits,
    pub cost: CostModel,
    /// Fetches URL `input_images`; without one, such requests are left to other backends.
    pub fetcher: Option<SharedFetcher>,
    /// What a request's references may cost to decode (checked on their headers).
    pub reference_limits: DecodeLimits,
    /// Longest a request's references may take to decode (off the engine's thread); longer is
    /// refused as too costly.
    pub reference_timeout: Duration,
}

/// Where the engine reports what it does (the gateway turns this into Prometheus metrics).
pub trait EngineObserver: Send + Sync + 'static {
    fn queue_depth(&self, _depth: usize) {}
    fn batch(&self, _size: usize) {}
    /// `text_encoder`, `vae_encode`, `step`, `vae_decode`, `safety`.
    fn stage(&self, _stage: &'static str, _time: Duration) {}
    fn images(&self, _model: Model, _count: usize) {}
}

pub struct LocalBackend {
    cfg: LocalConfig,
    /// Reference decodes running at once (on the blocking pool, never the engine's thread):
    /// as many as the machine has cores, so image preparation cannot take them all.
    decode_slots: Arc<tokio::sync::Semaphore>,
    /// The engine thread: its load state, measured throughput and queue.
    engine: Engine,
}

impl LocalBackend {
    /// Start loading the weights on a background thread and return at once.
    pub fn start(cfg: LocalConfig, observer: Arc<dyn EngineObserver>) -> LocalBackend {
        let engine = Engine::start(cfg.clone(), observer, load);
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        LocalBackend {
            cfg,
            decode_slots: Arc::new(tokio::sync::Semaphore::new(cores)),
            engine,
        }
    }

    /// Decode a request's references, bounded in cost (checked on their headers first) and in
    /// time, on the blocking pool: never on the engine's thread, so one client's references
    /// cannot hold up other clients' generations.
    async fn decode_references(
        &self,
        encoded: Vec<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Vec<RgbImage>, BackendError> {
        if encoded.is_empty() {
            return Ok(Vec::new());
        }
        let limits = self.cfg.reference_limits;
        crate::reference::check_cost(&encoded, limits).map_err(client_error)?;
        let started = std::time::Instant::now();
        // Every place taken: this backend is busy (neutral for the circuit breaker), not broken.
        let Ok(Ok(slot)) =
            tokio::time::timeout(timeout, self.decode_slots.clone().acquire_owned()).await
        else {
            return Err(BackendError::Unavailable {
                message: "every input-image decoding place is taken".into(),
                retry_after: None,
            });
        };
        let own = self.cfg.reference_timeout;
        let budget = own.min(timeout.saturating_sub(started.elapsed()));
        let work = tokio::task::spawn_blocking(move || {
            // The place is held until the decode ends, also when nobody waits for it any more
            // (timed out, client gone): decodes running at once stay bounded.
            let _slot = slot;
            encoded
                .iter()
                .enumerate()
                .map(|(i, b)| crate::reference::load(b, i, limits.max_pixels))
                .collect::<Result<Vec<_>, _>>()
        });
        match tokio::time::timeout(budget, work).await {
            Ok(Ok(decoded)) => decoded.map_err(client_error),
            // A decoder that panics on an image was handed a broken one: the client's input.
            Ok(Err(_)) => Err(BackendError::InvalidRequest {
                message: "the input images could not be decoded".into(),
                field: Some("input_images".into()),
            }),
            // Over its own limit: too costly an input. Over what was left of the request's
            // deadline: the request ran out of time.
            Err(_) if budget == own => Err(BackendError::InvalidRequest {
                message: format!(
                    "the input images took longer than {:.0} s to decode; send smaller images",
                    own.as_secs_f64()
                ),
                field: Some("input_images".into()),
            }),
            Err(_) => Err(BackendError::Timeout(timeout)),
        }
    }
}

/// Build the models a backend serves (on the engine thread): the pipeline on the configured
/// device, checked against the models the backend lists, and the safety checker if configured.
fn load(c: &LocalConfig) -> Result<Models, EngineError> {
    let device = crate::device::by_name(&c.device)?;
    let dir = crate::hub::resolve(&c.weights)?;
    let pipe = Pipeline::load_with(
        &dir,
        &device,
        crate::pipeline::LoadOptions {
            precision: c.precision,
            text_encoder: c.text_encoder,
        },
    )?;
    check_models(pipe.transformer.config.inner_dim(), &c.models)?;
    let safety = match &c.safety_weights {
        Some(w) => {
            let dir = crate::hub::resolve_layout(w, &IMAGE_CLASSIFIER)?;
            Some(SafetyChecker::load(&dir, c.safety_threshold, &device)?)
        }
        None => None,
    };
    Ok((pipe, safety))
}

/// An engine error caused by what the client sent becomes a client error naming the field;
/// anything else is this backend's failure (the gateway may try another).
pub(crate) fn client_error(e: EngineError) -> BackendError {
    match e {
        EngineError::Reference { index, message } => BackendError::InvalidRequest {
            message: format!("input image {index}: {message}"),
            field: Some(format!("input_images[{index}]")),
        },
        EngineError::Size { field, message } => BackendError::InvalidRequest {
            message,
            field: Some(field.into()),
        },
        other => BackendError::Failed(other.to_string()),
    }
}

/// Refuse to serve a model with the other size's weights: 4B weights answering `*-9b` requests
/// would be a silent downgrade (and cached as 9B images). Recognised by the transformer width of
/// the published checkpoints; other shapes (test and custom checkpoints) are the operator's call.
fn check_models(inner_dim: usize, models: &[Model]) -> Result<(), EngineError> {
    let size = match inner_dim {
        3072 => "4b",
        4096 => "9b",
        _ => return Ok(()),
    };
    match models.iter().find(|m| !m.id().ends_with(size)) {
        Some(m) => Err(EngineError::Config {
            path: "transformer/config.json".into(),
            message: format!(
                "these are klein-{} weights (hidden size {inner_dim}) but the backend lists `{m}`; set `models` to the variants these weights serve",
                size.to_uppercase()
            ),
        }),
        None => Ok(()),
    }
}

#[async_trait]
impl Backend for LocalBackend {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn models(&self) -> &[Model] {
        &self.cfg.models
    }

    fn checks_safety(&self) -> bool {
        self.cfg.safety_weights.is_some()
    }

    fn health(&self) -> Health {
        match &*lock(&self.engine.state) {
            LoadState::Loading => Health::Loading {
                message: format!("loading {}", self.cfg.weights),
            },
            LoadState::Ready => Health::Ready,
            LoadState::Failed(m) => Health::Down { message: m.clone() },
        }
    }

    /// A configured price list wins; otherwise the device-hour price times the device time this
    /// request should take at the throughput measured so far (none before the first run).
    fn cost_estimate(&self, req: &GenerateRequest) -> Option<f64> {
        self.cfg.cost.estimate(req).or_else(|| {
            let per_mp_step = (*lock(&self.engine.throughput))?;
            let seconds = per_mp_step * req.megapixels() * f64::from(req.num_steps.max(1));
            self.cfg.cost.device_time(Duration::from_secs_f64(seconds))
        })
    }

    async fn generate(
        &self,
        req: &GenerateRequest,
        timeout: Duration,
    ) -> Result<GeneratedImage, BackendError> {
        self.submit(req, timeout, false).await
    }

    /// Background work runs only on an idle engine (nothing queued), never holds a queue place
    /// a client could use, and yields to a client's job at its next step.
    async fn generate_background(
        &self,
        req: &GenerateRequest,
        timeout: Duration,
    ) -> Result<GeneratedImage, BackendError> {
        if self.engine.queue.depth() > 0 {
            return Err(BackendError::Unavailable {
                message: "background work runs only on an idle engine".into(),
                retry_after: None,
            });
        }
        self.submit(req, timeout, true).await
    }
}

impl LocalBackend {
    /// Queue `req` for the engine and wait for its image.
    async fn submit(
        &self,
        req: &GenerateRequest,
        timeout: Duration,
        background: bool,
    ) -> Result<GeneratedImage, BackendError> {
        match &*lock(&self.engine.state) {
            LoadState::Ready => {}
            LoadState::Loading => {
                return Err(BackendError::Unavailable {
                    message: "model not loaded: the local engine is still loading its weights"
                        .into(),
                    retry_after: None,
                })
            }
            // Down, not broken per request: answer like an unloaded model so the gateway moves on.
            LoadState::Failed(m) => {
                return Err(BackendError::Unavailable {
                    message: format!("model not loaded: the local engine failed to load: {m}"),
                    retry_after: None,
                })
            }
        }
        // A full queue refuses at once, before any input image is downloaded for nothing.
        self.engine.queue.check_room()?;
        let mut references = Vec::with_capacity(req.input_images.len());
        for (i, img) in req.input_images.iter().enumerate() {
            match img {
                InputImage::Base64 { .. } => {
                    references.push(img.decoded_bytes().ok_or_else(|| {
                        BackendError::InvalidRequest {
                            message: "not valid base64".into(),
                            field: Some(format!("input_images[{i}]")),
                        }
                    })?)
                }
                InputImage::Url { url, .. } => match &self.cfg.fetcher {
                    Some(f) => references.push(f.0.fetch(i, url).await?),
                    // Nobody to fetch safely for us: another backend (Verda fetches them
                    // itself) takes these requests.
                    None => {
                        return Err(BackendError::Unavailable {
                            message: "the local backend does not fetch input image URLs".into(),
                            retry_after: None,
                        })
                    }
                },
            }
        }
        let started = std::time::Instant::now();
        let references = self.decode_references(references, timeout).await?;
        let timeout = timeout.saturating_sub(started.elapsed());
        let ticket = self.engine.queue.push(req, references, background)?;
        ticket.wait(timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_of_one_size_do_not_serve_the_other() {
        assert!(check_models(3072, &[Model::Klein4b, Model::KleinBase4b]).is_ok());
        let e = check_models(3072, &[Model::Klein4b, Model::Klein9b]).unwrap_err();
        assert!(e.to_string().contains("flux2-klein-9b"), "{e}");
        assert!(check_models(4096, &[Model::KleinBase4b]).is_err());
        assert!(check_models(4096, &[Model::Klein9b, Model::KleinBase9b]).is_ok());
        // Shapes of no published checkpoint: the operator decides.
        assert!(check_models(32, &Model::ALL).is_ok());
    }
}
