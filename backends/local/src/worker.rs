//! The engine thread behind a [`LocalBackend`](crate::backend::LocalBackend): the bounded queue
//! in front of the device, batching of compatible queued requests, the pipeline run (stopped
//! when nobody waits for its result any more), the safety check and the encoding of the images.
//! The backend adapter ([`crate::backend`]) loads the models through [`Engine::start`], queues
//! jobs through [`Queue::push`] and waits on their [`Ticket`]s.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use burn::tensor::Tensor;
use bytes::Bytes;
use kleingate_backend::{BackendError, GeneratedImage};
use kleingate_protocol::{GenerateRequest, Model, OutputFormat};
use tokio::sync::oneshot;

use crate::backend::{client_error, EngineObserver, LocalConfig};
use crate::error::EngineError;
use crate::image_io::{Format, Rgb8};
use crate::pipeline::{Pipeline, Progress, Request, Stage};
use crate::reference::RgbImage;
use crate::safety::SafetyChecker;
use crate::sampler::seeded_noise;

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where the engine stands: the backend's health.
#[derive(Clone, Debug)]
pub(crate) enum LoadState {
    Loading,
    Ready,
    Failed(String),
}

/// What the engine thread loads before it serves: the pipeline and the safety checker, if any.
pub(crate) type Models = (Pipeline, Option<SafetyChecker>);

/// The engine thread as the backend sees it.
pub(crate) struct Engine {
    pub state: Arc<Mutex<LoadState>>,
    /// Measured device seconds per megapixel-step (smoothed), for cost estimates before a run.
    pub throughput: Arc<Mutex<Option<f64>>>,
    pub queue: Queue,
}

impl Engine {
    /// Start the engine thread and return at once: `load` builds the models there (the state
    /// says `Loading` until it returns), then the worker serves the queue.
    pub fn start<F>(cfg: LocalConfig, observer: Arc<dyn EngineObserver>, load: F) -> Engine
    where
        F: FnOnce(&LocalConfig) -> Result<Models, EngineError> + Send + 'static,
    {
        let state = Arc::new(Mutex::new(LoadState::Loading));
        let depth = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel::<Job>();
        let throughput = Arc::new(Mutex::new(None));
        let max = cfg.max_queue;
        let (st, ob, tp, dp) = (
            state.clone(),
            observer.clone(),
            throughput.clone(),
            depth.clone(),
        );
        std::thread::Builder::new()
            .name("kleingate-engine".into())
            .spawn(move || match load(&cfg) {
                Ok((pipe, safety)) => {
                    *lock(&st) = LoadState::Ready;
                    let worker = Worker {
                        pipe,
                        safety,
                        rx,
                        observer: ob,
                        cfg,
                        throughput: tp,
                        depth: dp,
                    };
                    // A bug that panics must not leave a backend that looks ready but answers
                    // nothing: it goes down with the reason, and the gateway routes around it.
                    // (Waiting callers get "the engine dropped the request".)
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
            })
            .expect("spawning the engine thread");
        Engine {
            state,
            throughput,
            queue: Queue {
                tx,
                depth,
                observer,
                max,
            },
        }
    }
}

/// The sending side of the bounded queue in front of the device.
pub(crate) struct Queue {
    tx: mpsc::Sender<Job>,
    /// Jobs queued and not yet taken (nor given up on).
    depth: Arc<AtomicUsize>,
    observer: Arc<dyn EngineObserver>,
    /// Requests that may wait; one more is refused with 503.
    max: usize,
}

fn queue_full(waiting: usize) -> BackendError {
    BackendError::Unavailable {
        message: format!("queue full ({waiting} requests waiting)"),
        retry_after: None,
    }
}

impl Queue {
    /// Jobs waiting for the device.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }

    /// Refuse at once when the queue is full (before any input image is downloaded for
    /// nothing); [`push`](Self::push) checks again.
    pub fn check_room(&self) -> Result<(), BackendError> {
        let waiting = self.depth();
        if waiting >= self.max {
            return Err(queue_full(waiting));
        }
        Ok(())
    }

    /// Queue `req` (its `input_images` already decoded into `references`) for the worker.
    pub fn push(
        &self,
        req: &GenerateRequest,
        references: Vec<RgbImage>,
        background: bool,
    ) -> Result<Ticket, BackendError> {
        let waiting = self.depth.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max {
            self.depth.fetch_sub(1, Ordering::SeqCst);
            return Err(queue_full(waiting));
        }
        self.observer.queue_depth(waiting + 1);
        let slot = Arc::new(QueueSlot {
            released: AtomicBool::new(false),
            depth: self.depth.clone(),
            observer: self.observer.clone(),
        });
        let guard = SlotGuard(slot.clone());
        let (tx, rx) = oneshot::channel();
        // The caller's span (the gateway's backend attempt) is the parent of the job's stages.
        let span = tracing::Span::current();
        let queued = tracing::info_span!(parent: &span, "queue_wait", queue.depth = waiting);
        let job = Job {
            span,
            queued,
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
        if self.tx.send(job).is_err() {
            return Err(BackendError::Failed("the engine thread has stopped".into()));
        }
        Ok(Ticket { rx, _slot: guard })
    }
}

/// A queued job as its caller holds it. Dropping it (timeout, or the client went away and the
/// caller's future with it) is how the worker learns that nobody waits: it skips or stops that
/// work; and the job's queue place is released at once.
pub(crate) struct Ticket {
    rx: oneshot::Receiver<Result<GeneratedImage, BackendError>>,
    _slot: SlotGuard,
}

impl Ticket {
    /// Wait at most `timeout` for the job's image.
    pub async fn wait(self, timeout: Duration) -> Result<GeneratedImage, BackendError> {
        match tokio::time::timeout(timeout, self.rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(BackendError::Failed(
                "the engine dropped the request".into(),
            )),
            Err(_) => Err(BackendError::Timeout(timeout)),
        }
    }
}

struct Job {
    /// The caller's span: the job's stages are its children.
    span: tracing::Span,
    /// Open while the job waits in the queue; closed when the worker takes it.
    queued: tracing::Span,
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
    /// The worker took it: its queue place is free and its wait is over.
    fn taken(&mut self) {
        self.slot.release();
        self.queued = tracing::Span::none();
    }

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
        let mut j = pending.remove(i)?;
        j.taken();
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
                        let mut j = pending.remove(i).expect("index in range");
                        j.taken();
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
        let _spans: Vec<tracing::Span> = wanted
            .iter()
            .map(|&i| tracing::info_span!(parent: &batch[i].span, "safety", batch = wanted.len()))
            .collect();
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
            // One noise tensor per request (above): the batch's seed is not used.
            init_noise: Some(noise),
            ..Request::for_protocol(
                r0,
                batch.iter().map(|j| j.req.prompt.clone()).collect(),
                (w, h),
                self.cfg.max_sequence_length,
                batch[0].references.clone(),
            )
        };
        let mut stages = StageSpans::new(batch);
        let out = self.pipe.generate(&req, &mut |p| {
            stages.progress(p);
            // Stop points: before a stage, and after each step. Finished work (a decoded image)
            // is never thrown away.
            if !matches!(p, Progress::Begin(_) | Progress::End(Stage::Step { .. })) {
                return true;
            }
            let wanted = batch.iter().any(|j| !j.reply.is_closed());
            // Background work yields to any client's job at the next step.
            let preempted = batch[0].background && self.depth.load(Ordering::SeqCst) > 0;
            wanted && !preempted
        })?;
        drop(stages);
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
            let format = job.req.output_format;
            let _span =
                tracing::info_span!(parent: &job.span, "encode_image", format = format.as_str())
                    .entered();
            let bytes = rgb.encode(to_format(format), job.req.output_quality)?;
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

/// The open stage spans of each job in a batch: a stage that begins opens a span under the job's
/// innermost open one (a step under the denoising loop), its end closes it. Every job of a batch
/// gets its own spans, with the batch's timing.
struct StageSpans<'a> {
    batch: &'a [Job],
    open: Vec<Vec<tracing::Span>>,
}

impl<'a> StageSpans<'a> {
    fn new(batch: &'a [Job]) -> Self {
        StageSpans {
            batch,
            open: batch.iter().map(|_| Vec::new()).collect(),
        }
    }

    fn progress(&mut self, p: Progress) {
        let n = self.batch.len();
        for (job, open) in self.batch.iter().zip(&mut self.open) {
            match p {
                Progress::Begin(stage) => {
                    let parent = open.last().unwrap_or(&job.span);
                    let span = match stage {
                        Stage::TextEncoder => {
                            tracing::info_span!(parent: parent, "text_encoder", batch = n)
                        }
                        Stage::VaeEncode => tracing::info_span!(parent: parent, "vae_encode"),
                        Stage::Denoise { steps } => {
                            tracing::info_span!(parent: parent, "denoise", steps, batch = n)
                        }
                        Stage::Step { index } => tracing::info_span!(parent: parent, "step", index),
                        Stage::VaeDecode => {
                            tracing::info_span!(parent: parent, "vae_decode", batch = n)
                        }
                    };
                    open.push(span);
                }
                Progress::End(_) => {
                    open.pop();
                }
            }
        }
    }
}

fn to_format(f: OutputFormat) -> Format {
    match f {
        OutputFormat::Jpeg => Format::Jpeg,
        OutputFormat::Png => Format::Png,
        OutputFormat::Webp => Format::Webp,
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
}
