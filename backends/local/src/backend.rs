//! The local engine as a gateway backend: weights load in the background (503 "model not loaded"
//! until then, as Verda answers), a bounded queue in front of the device (full -> 503, so the
//! gateway falls back, without tripping its circuit breaker), batching of compatible queued
//! requests, and cancellation when nobody waits for a result any more.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use burn::tensor::Tensor;
use bytes::Bytes;
use kleingate_backend::{Backend, BackendError, CostModel, GeneratedImage, Health, SharedFetcher};
use kleingate_protocol::{GenerateRequest, InputImage, Limits, Model, OutputFormat};
use tokio::sync::oneshot;

use crate::error::EngineError;
use crate::hub::IMAGE_CLASSIFIER;
use crate::image_io::{Format, Rgb8};
use crate::pipeline::{Pipeline, Request};
use crate::reference::{DecodeLimits, RgbImage};
use crate::safety::SafetyChecker;
use crate::sampler::seeded_noise;

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

#[derive(Clone, Debug)]
enum LoadState {
    Loading,
    Ready,
    Failed(String),
}

struct Job {
    /// The request without its `input_images` (decoded into `references`).
    req: GenerateRequest,
    seed: u64,
    references: Vec<RgbImage>,
    reply: oneshot::Sender<Result<GeneratedImage, BackendError>>,
    slot: Arc<QueueSlot>,
    /// Nobody waits for it (a shadow run): taken only when no client's job is waiting.
    background: bool,
}

/// One place in the bounded queue. Whoever is first to release it, the worker taking the job or
/// the caller giving up on it (timeout, disconnect), takes it off the depth count, so jobs
/// nobody waits for do not keep the queue full until the worker reaches them.
struct QueueSlot {
    released: AtomicBool,
    depth: Arc<AtomicUsize>,
    observer: Arc<dyn EngineObserver>,
}

impl QueueSlot {
    fn release(&self) {
        if !self.released.swap(true, Ordering::SeqCst) {
            let left = self.depth.fetch_sub(1, Ordering::SeqCst) - 1;
            self.observer.queue_depth(left);
        }
    }
}

/// Releases the caller's slot when `generate` returns or its future is dropped.
struct SlotGuard(Arc<QueueSlot>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.release();
    }
}

impl Job {
    /// Requests that may share one batch: same shapes and sampling, and no references (those
    /// change the token count per request).
    /// Background jobs batch only with each other: they must not add work to a client's batch.
    fn batch_key(&self) -> Option<(Model, u32, u32, u32, u64, bool)> {
        self.references.is_empty().then(|| {
            let r = &self.req;
            (
                r.model,
                r.width,
                r.height,
                r.num_steps,
                r.guidance.to_bits(),
                self.background,
            )
        })
    }
}

pub struct LocalBackend {
    cfg: LocalConfig,
    /// Reference decodes running at once (on the blocking pool, never the engine's thread):
    /// as many as the machine has cores, so image preparation cannot take them all.
    decode_slots: Arc<tokio::sync::Semaphore>,
    /// Measured device seconds per megapixel-step (smoothed), for cost estimates before a run.
    throughput: Arc<Mutex<Option<f64>>>,
    state: Arc<Mutex<LoadState>>,
    queue: mpsc::Sender<Job>,
    depth: Arc<AtomicUsize>,
    observer: Arc<dyn EngineObserver>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LocalBackend {
    /// Start loading the weights on a background thread and return at once.
    pub fn start(cfg: LocalConfig, observer: Arc<dyn EngineObserver>) -> LocalBackend {
        let state = Arc::new(Mutex::new(LoadState::Loading));
        let depth = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel::<Job>();
        let throughput = Arc::new(Mutex::new(None));
        let (st, ob, c, tp, dp) = (
            state.clone(),
            observer.clone(),
            cfg.clone(),
            throughput.clone(),
            depth.clone(),
        );
        std::thread::Builder::new()
            .name("kleingate-engine".into())
            .spawn(move || {
                let loaded = crate::device::by_name(&c.device).and_then(|device| {
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
                });
                match loaded {
                    Ok((pipe, safety)) => {
                        *lock(&st) = LoadState::Ready;
                        let worker = Worker {
                            pipe,
                            safety,
                            rx,
                            observer: ob,
                            cfg: c,
                            throughput: tp,
                            depth: dp,
                        };
                        // A bug that panics must not leave a backend that looks ready but
                        // answers nothing: it goes down with the reason, and the gateway routes
                        // around it. (Waiting callers get "the engine dropped the request".)
                        let run =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run()));
                        if let Err(p) = run {
                            let why = p
                                .downcast_ref::<String>()
                                .map(String::as_str)
                                .or_else(|| p.downcast_ref::<&str>().copied())
                                .unwrap_or("unknown");
                            *lock(&st) =
                                LoadState::Failed(format!("the engine thread panicked: {why}"));
                        }
                    }
                    Err(e) => *lock(&st) = LoadState::Failed(e.to_string()),
                }
            })
            .expect("spawning the engine thread");
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        LocalBackend {
            cfg,
            decode_slots: Arc::new(tokio::sync::Semaphore::new(cores)),
            throughput,
            state,
            queue: tx,
            depth,
            observer,
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

/// An engine error caused by what the client sent becomes a client error naming the field;
/// anything else is this backend's failure (the gateway may try another).
fn client_error(e: EngineError) -> BackendError {
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

fn to_format(f: OutputFormat) -> Format {
    match f {
        OutputFormat::Jpeg => Format::Jpeg,
        OutputFormat::Png => Format::Png,
        OutputFormat::Webp => Format::Webp,
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
        match &*lock(&self.state) {
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
            let per_mp_step = (*lock(&self.throughput))?;
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
        if self.depth.load(Ordering::SeqCst) > 0 {
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
        match &*lock(&self.state) {
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
        let waiting = self.depth.load(Ordering::SeqCst);
        if waiting >= self.cfg.max_queue {
            return Err(BackendError::Unavailable {
                message: format!("queue full ({waiting} requests waiting)"),
                retry_after: None,
            });
        }
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
        let waiting = self.depth.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.cfg.max_queue {
            self.depth.fetch_sub(1, Ordering::SeqCst);
            return Err(BackendError::Unavailable {
                message: format!("queue full ({waiting} requests waiting)"),
                retry_after: None,
            });
        }
        self.observer.queue_depth(waiting + 1);
        let slot = Arc::new(QueueSlot {
            released: AtomicBool::new(false),
            depth: self.depth.clone(),
            observer: self.observer.clone(),
        });
        let _guard = SlotGuard(slot.clone());
        let (tx, rx) = oneshot::channel();
        let job = Job {
            req: GenerateRequest {
                input_images: Vec::new(),
                ..req.clone()
            },
            seed: req.seed.unwrap_or_else(rand::random),
            references,
            reply: tx,
            slot,
            background,
        };
        if self.queue.send(job).is_err() {
            return Err(BackendError::Failed("the engine thread has stopped".into()));
        }
        // Dropping `rx` (timeout, or the client went away and this future with it) is how the
        // worker learns that nobody waits: it skips or stops that work.
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(BackendError::Failed(
                "the engine dropped the request".into(),
            )),
            Err(_) => Err(BackendError::Timeout(timeout)),
        }
    }
}

struct Worker {
    pipe: Pipeline,
    safety: Option<SafetyChecker>,
    rx: mpsc::Receiver<Job>,
    observer: Arc<dyn EngineObserver>,
    cfg: LocalConfig,
    throughput: Arc<Mutex<Option<f64>>>,
    /// Jobs queued and not yet taken: a background batch stops at its next step when a client's
    /// job is waiting.
    depth: Arc<AtomicUsize>,
}

impl Worker {
    /// The next job: the oldest client job waiting, else the oldest background job.
    fn take(&self, pending: &mut VecDeque<Job>) -> Option<Job> {
        if pending.is_empty() {
            pending.push_back(self.rx.recv().ok()?);
        }
        while let Ok(j) = self.rx.try_recv() {
            pending.push_back(j);
        }
        let i = pending.iter().position(|j| !j.background).unwrap_or(0);
        let j = pending.remove(i)?;
        j.slot.release();
        Some(j)
    }

    fn run(self) {
        let mut pending: VecDeque<Job> = VecDeque::new();
        while let Some(first) = self.take(&mut pending) {
            if first.reply.is_closed() {
                continue; // cancelled while queued
            }
            while let Ok(j) = self.rx.try_recv() {
                pending.push_back(j);
            }
            let mut batch = vec![first];
            if let Some(key) = batch[0].batch_key() {
                let mut i = 0;
                while i < pending.len() && batch.len() < self.cfg.max_batch.max(1) {
                    if pending[i].batch_key() == Some(key) && !pending[i].reply.is_closed() {
                        let j = pending.remove(i).expect("index in range");
                        j.slot.release();
                        batch.push(j);
                    } else {
                        i += 1;
                    }
                }
            }
            self.observer.batch(batch.len());
            let results = self.run_batch(&batch);
            for (job, result) in batch.into_iter().zip(results) {
                let _ = job.reply.send(result);
            }
        }
    }

    fn run_batch(&self, batch: &[Job]) -> Vec<Result<GeneratedImage, BackendError>> {
        match self.generate(batch) {
            Ok(images) => images.into_iter().map(Ok).collect(),
            Err(e) => {
                // Only what the client sent is the client's fault; anything else the engine
                // hits is a failure of this backend (the gateway may try another).
                let err = client_error(e);
                batch.iter().map(|_| Err(err.clone())).collect()
            }
        }
    }

    /// The NSFW flag of each image: the classifier's verdict on the 8-bit image the client gets
    /// (before lossy encoding) for requests that ask for the check, `false` for the others.
    /// Without a safety model the gateway only sends requests that ask for it when
    /// `routing.safety = "skip"`, and those are answered `false` unchecked, as documented.
    fn safety_flags(&self, batch: &[Job], rgbs: &[Rgb8]) -> Result<Vec<bool>, EngineError> {
        let mut flags = vec![false; batch.len()];
        let Some(checker) = &self.safety else {
            return Ok(flags);
        };
        let wanted: Vec<usize> = (0..batch.len())
            .filter(|&i| batch[i].req.enable_safety_checker)
            .collect();
        if wanted.is_empty() {
            return Ok(flags);
        }
        let start = std::time::Instant::now();
        let images: Vec<&Rgb8> = wanted.iter().map(|&i| &rgbs[i]).collect();
        for (&i, v) in wanted.iter().zip(checker.check(&images)?) {
            flags[i] = v.nsfw;
        }
        self.observer.stage("safety", start.elapsed());
        Ok(flags)
    }

    /// A size taken from a reference has not been through the gateway's validation: hold it to
    /// the same bounds (an explicit 2048 beside a tall reference can exceed them).
    fn check_derived_size(&self, w: usize, h: usize) -> Result<(), EngineError> {
        let l = &self.cfg.limits;
        for (field, side) in [("width", w), ("height", h)] {
            if side > l.max_side as usize {
                return Err(EngineError::Size {
                    field,
                    message: format!(
                        "`{field}` taken from the first input image is {side}; at most {} is allowed: set `{field}`",
                        l.max_side
                    ),
                });
            }
        }
        if (w * h) as u64 > l.max_pixels {
            return Err(EngineError::Size {
                field: "width",
                message: format!(
                    "{w}x{h} (with the size taken from the first input image) is {} pixels; at most {} are allowed",
                    w * h,
                    l.max_pixels
                ),
            });
        }
        Ok(())
    }

    fn generate(&self, batch: &[Job]) -> Result<Vec<GeneratedImage>, EngineError> {
        let r0 = &batch[0].req;
        let m = self.pipe.size_multiple();
        let c = self.pipe.transformer.config.in_channels;
        let (w, h) = self.pipe.output_size(
            r0.width_given.then_some(r0.width as usize),
            r0.height_given.then_some(r0.height as usize),
            &batch[0].references,
        )?;
        if !r0.width_given || !r0.height_given {
            self.check_derived_size(w, h)?;
        }
        let device = &self.pipe.device;
        let started = std::time::Instant::now();
        // One noise tensor per request from its own seed: batching never changes an image's noise.
        let noise = Tensor::cat(
            batch
                .iter()
                .map(|j| seeded_noise(j.seed, [1, c, h / m, w / m], device))
                .collect(),
            0,
        );
        let req = Request {
            prompts: batch.iter().map(|j| j.req.prompt.clone()).collect(),
            width: w,
            height: h,
            steps: r0.num_steps as usize,
            guidance: r0.guidance as f32,
            cfg: !r0.model.is_distilled() && r0.guidance > 1.0,
            max_sequence_length: self.cfg.max_sequence_length,
            seed: 0,
            init_noise: Some(noise),
            references: batch[0].references.clone(),
            keep_intermediates: false,
        };
        let out = self.pipe.generate(&req, &mut |_, _| {
            let wanted = batch.iter().any(|j| !j.reply.is_closed());
            // Background work yields to any client's job at the next step.
            let preempted = batch[0].background && self.depth.load(Ordering::SeqCst) > 0;
            wanted && !preempted
        })?;
        let t = &out.timings;
        self.observer.stage("text_encoder", t.text_encoder);
        if !req.references.is_empty() {
            self.observer.stage("vae_encode", t.vae_encode);
        }
        for s in &t.steps {
            self.observer.stage("step", *s);
        }
        self.observer.stage("vae_decode", t.vae_decode);
        let values =
            out.images.into_data().try_to_vec::<f32>().map_err(|e| {
                EngineError::Device(format!("reading the image back failed: {e:?}"))
            })?;
        let per = h * w * 3;
        let rgbs: Vec<Rgb8> = (0..batch.len())
            .map(|i| Rgb8::from_unit_floats(&values[i * per..(i + 1) * per], w, h))
            .collect();
        let flags = self.safety_flags(batch, &rgbs)?;
        // Device time is shared equally by the batch; it also updates the measured throughput
        // the estimates use.
        let per_image = started.elapsed() / batch.len() as u32;
        let mp_steps = (w * h) as f64 / 1e6 * req.steps.max(1) as f64;
        {
            let sample = per_image.as_secs_f64() / mp_steps;
            let mut tp = lock(&self.throughput);
            *tp = Some(tp.map_or(sample, |old| 0.8 * old + 0.2 * sample));
        }
        let cost_usd = self.cfg.cost.device_time(per_image);
        let mut images = Vec::with_capacity(batch.len());
        for ((job, rgb), has_nsfw_content) in batch.iter().zip(&rgbs).zip(flags) {
            let bytes = rgb.encode(to_format(job.req.output_format), job.req.output_quality)?;
            images.push(GeneratedImage {
                bytes: Bytes::from(bytes),
                format: job.req.output_format,
                seed: Some(job.seed),
                has_nsfw_content,
                cost_usd,
            });
        }
        self.observer.images(r0.model, images.len());
        Ok(images)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_slot_is_released_once_by_whoever_is_first() {
        let depth = Arc::new(AtomicUsize::new(2));
        let slot = |depth: &Arc<AtomicUsize>| {
            Arc::new(QueueSlot {
                released: AtomicBool::new(false),
                depth: depth.clone(),
                observer: Arc::new(NoMetrics),
            })
        };
        // The caller gives up first (its future is dropped): the job stops counting at once,
        // and the worker reaching it later does not count it again.
        let gave_up = slot(&depth);
        drop(SlotGuard(gave_up.clone()));
        assert_eq!(depth.load(Ordering::SeqCst), 1);
        gave_up.release();
        assert_eq!(depth.load(Ordering::SeqCst), 1);
        // The worker takes it first: the caller's guard, dropped when the answer arrives, does
        // nothing more.
        let taken = slot(&depth);
        taken.release();
        drop(SlotGuard(taken));
        assert_eq!(depth.load(Ordering::SeqCst), 0);
    }

    struct NoMetrics;
    impl EngineObserver for NoMetrics {}

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
