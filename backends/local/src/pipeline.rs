//! Prompt -> image: the whole FLUX.2 [klein] text-to-image pipeline.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::tensor::{Device, FloatDType, Tensor};

use crate::error::EngineError;
use crate::precision::Precision;
use crate::reference;
use crate::sampler::{euler_step, grid_ids, guide, pack, seeded_noise, text_ids, unpack};
use crate::schedule::{model_timestep, Schedule};
use crate::text_encoder::TextEncoder;
use crate::tokenizer::PromptTokenizer;
use crate::trace::{Hook, Taps};
use crate::transformer::Transformer;
use crate::vae::Vae;

/// Residual-stream taps of the text encoder that klein stacks (hidden_states[9], [18], [27]).
pub const TEXT_OUT_LAYERS: [usize; 3] = [9, 18, 27];

/// Where the text encoder's weights live between requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextEncoderMode {
    /// On the device for the pipeline's lifetime: fastest, most memory.
    #[default]
    Resident,
    /// Uploaded from the memory-mapped checkpoint for each batch's prompts and freed as soon as
    /// they are encoded: the device holds it only during the text encoder stage (klein 4B: ~6 GB
    /// of bf16 weights off the device while the transformer and VAE run), at the cost of reading
    /// and uploading those weights once per batch.
    Offload,
}

impl std::str::FromStr for TextEncoderMode {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "resident" => Ok(TextEncoderMode::Resident),
            "offload" => Ok(TextEncoderMode::Offload),
            other => Err(EngineError::Input(format!(
                "unknown text encoder mode `{other}`; use resident or offload"
            ))),
        }
    }
}

/// How to build a pipeline: its compute dtype and where the text encoder lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    pub precision: Precision,
    pub text_encoder: TextEncoderMode,
}

impl LoadOptions {
    pub fn new(precision: Precision) -> Self {
        LoadOptions {
            precision,
            text_encoder: TextEncoderMode::Resident,
        }
    }
}

pub struct Pipeline {
    pub tokenizer: PromptTokenizer,
    /// The resident text encoder (`None` when offloaded: see [`TextEncoderMode`]).
    pub text_encoder: Option<TextEncoder>,
    text_encoder_dir: PathBuf,
    pub transformer: Transformer,
    pub vae: Vae,
    pub device: Device,
    /// The compute dtype of all three models.
    pub precision: Precision,
}

#[derive(Clone, Debug)]
pub struct Request {
    pub prompts: Vec<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Classifier-free guidance scale; only used when `cfg`.
    pub guidance: f32,
    /// Base models run CFG against the empty prompt; distilled ones do not.
    pub cfg: bool,
    pub max_sequence_length: usize,
    pub seed: u64,
    /// Explicit initial noise `(B, C, H/(2*vsf), W/(2*vsf))` instead of the seeded generator.
    pub init_noise: Option<Tensor<4>>,
    /// Reference images for editing / multi-reference generation, decoded ([`reference::load`]).
    pub references: Vec<reference::RgbImage>,
}

impl Request {
    /// The run of a protocol request: its steps and guidance, and the protocol's rule for
    /// classifier-free guidance (base models, with a scale above 1, as the reference pipeline).
    /// `prompts` share the request's settings (a batch); the size is the one the pipeline
    /// decided ([`Pipeline::output_size`]).
    pub fn for_protocol(
        req: &kleingate_protocol::GenerateRequest,
        prompts: Vec<String>,
        (width, height): (usize, usize),
        max_sequence_length: usize,
        references: Vec<reference::RgbImage>,
    ) -> Request {
        Request {
            prompts,
            width,
            height,
            steps: req.num_steps as usize,
            guidance: req.guidance as f32,
            cfg: !req.model.is_distilled() && req.guidance > 1.0,
            max_sequence_length,
            seed: req.seed.unwrap_or(0),
            init_noise: None,
            references,
        }
    }
}

/// A stage of a run, in the order they run: the text encoder, the references through the VAE
/// encoder (only with references), the denoising loop and each of its steps, the VAE decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    TextEncoder,
    VaeEncode,
    Denoise { steps: usize },
    Step { index: usize },
    VaeDecode,
}

/// What a run tells its caller as it goes (for progress, cancellation and tracing): a stage
/// begins, or it ends (the device synchronised, so the time between the two is the stage's).
/// The caller's answer `false` stops the run there with [`EngineError::Cancelled`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    Begin(Stage),
    End(Stage),
}

/// The caller's progress callback (see [`Progress`]).
pub type OnProgress<'a> = dyn FnMut(Progress) -> bool + 'a;

fn report(on: &mut OnProgress<'_>, p: Progress) -> Result<(), EngineError> {
    if on(p) {
        Ok(())
    } else {
        Err(EngineError::Cancelled)
    }
}

/// Wall time of each stage (the device is synchronised before each reading).
#[derive(Clone, Debug, Default)]
pub struct Timings {
    pub text_encoder: Duration,
    pub vae_encode: Duration,
    pub steps: Vec<Duration>,
    pub vae_decode: Duration,
}

/// What a run produced: the images, whether each prompt was truncated, and the stage timings
/// (for metrics). Intermediate values are not kept: see [`Pipeline::generate_traced`].
pub struct Generated {
    pub timings: Timings,
    /// `(B, H, W, 3)` in [0, 1].
    pub images: Tensor<4>,
    pub truncated: Vec<bool>,
}

enum TextEncoderRef<'a> {
    Resident(&'a TextEncoder),
    Uploaded(Box<TextEncoder>),
}

impl std::ops::Deref for TextEncoderRef<'_> {
    type Target = TextEncoder;

    fn deref(&self) -> &TextEncoder {
        match self {
            TextEncoderRef::Resident(t) => t,
            TextEncoderRef::Uploaded(t) => t,
        }
    }
}

impl Pipeline {
    /// Load a diffusers-layout klein checkpoint directory, in f32.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, EngineError> {
        Self::load_in(dir, device, Precision::F32)
    }

    /// Load a diffusers-layout klein checkpoint directory with its weights held and computed
    /// in `precision`, the text encoder resident.
    pub fn load_in(dir: &Path, device: &Device, precision: Precision) -> Result<Self, EngineError> {
        Self::load_with(dir, device, LoadOptions::new(precision))
    }

    pub fn load_with(dir: &Path, device: &Device, opts: LoadOptions) -> Result<Self, EngineError> {
        let files = crate::weights::Source::Files;
        let precision = opts.precision;
        let te_dir = dir.join("text_encoder");
        // Offloaded, it is still built once here: a broken checkpoint fails at start-up, not
        // on the first request.
        let te = TextEncoder::load_from(&te_dir, &TEXT_OUT_LAYERS, files, device, precision)?;
        Ok(Pipeline {
            tokenizer: PromptTokenizer::load(&dir.join("tokenizer"))?,
            text_encoder: match opts.text_encoder {
                TextEncoderMode::Resident => Some(te),
                TextEncoderMode::Offload => None,
            },
            text_encoder_dir: te_dir,
            transformer: Transformer::load_from(
                &dir.join("transformer"),
                files,
                device,
                precision,
            )?,
            vae: Vae::load_from(&dir.join("vae"), true, files, device, precision)?,
            device: device.clone(),
            precision,
        })
    }

    pub fn text_encoder_mode(&self) -> TextEncoderMode {
        match self.text_encoder {
            Some(_) => TextEncoderMode::Resident,
            None => TextEncoderMode::Offload,
        }
    }

    /// The text encoder for one run: the resident one, or one uploaded now and freed when the
    /// caller drops it.
    fn text_encoder(&self) -> Result<TextEncoderRef<'_>, EngineError> {
        match &self.text_encoder {
            Some(te) => Ok(TextEncoderRef::Resident(te)),
            None => Ok(TextEncoderRef::Uploaded(Box::new(TextEncoder::load_from(
                &self.text_encoder_dir,
                &TEXT_OUT_LAYERS,
                crate::weights::Source::Files,
                &self.device,
                self.precision,
            )?))),
        }
    }

    /// Bytes of weights the pipeline keeps on its device between requests.
    pub fn resident_weight_bytes(&self) -> u64 {
        self.text_encoder.as_ref().map_or(0, |t| t.weight_bytes())
            + self.transformer.weight_bytes()
            + self.vae.weight_bytes()
    }

    /// Image side granularity: 2 x the VAE's scale factor (16 for klein).
    pub fn size_multiple(&self) -> usize {
        2 * self.vae.config.scale_factor()
    }

    /// The output size of a request: a side left open is the first reference's (after its
    /// preparation), as in the reference pipeline, or 1024 x 768 without references.
    pub fn output_size(
        &self,
        width: Option<usize>,
        height: Option<usize>,
        references: &[reference::RgbImage],
    ) -> Result<(usize, usize), EngineError> {
        match (width, height, references.first()) {
            (Some(w), Some(h), _) => Ok((w, h)),
            (w, h, Some(first)) => {
                let m = self.size_multiple();
                let (fw, fh) = (first.width() as usize, first.height() as usize);
                Ok((w.unwrap_or(fw - fw % m), h.unwrap_or(fh - fh % m)))
            }
            (w, h, None) => Ok((w.unwrap_or(1024), h.unwrap_or(768))),
        }
    }

    /// Prepare and encode the references: their tokens `(1, sum h_k w_k, C)` and position ids.
    fn encode_references(
        &self,
        refs: &[reference::RgbImage],
        taps: &mut Taps<'_>,
    ) -> Result<(Option<Tensor<3>>, Vec<[i64; 4]>), EngineError> {
        let mut tokens = Vec::new();
        let mut ids = Vec::new();
        for (k, rgb) in refs.iter().enumerate() {
            let p = reference::prepare(rgb, self.size_multiple(), &self.device);
            taps.tap(format_args!("ref.{k}.pixels"), &p.pixels);
            let (mean, _) = self.vae.encode(p.pixels)?;
            taps.tap(format_args!("ref.{k}.vae_mean"), &mean);
            let latents = self.vae.normalize(Vae::patchify(mean));
            taps.tap(format_args!("ref.{k}.latents"), &latents);
            let [_, _, h, w] = latents.dims();
            tokens.push(pack(latents));
            ids.extend(grid_ids(10 + 10 * k as i64, h, w));
        }
        let tokens = if tokens.is_empty() {
            None
        } else {
            Some(Tensor::cat(tokens, 1))
        };
        Ok((tokens, ids))
    }

    fn embed(
        &self,
        te: &TextEncoder,
        prompts: &[String],
        max_len: usize,
    ) -> Result<(Tensor<3>, Vec<bool>), EngineError> {
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        let mut truncated = Vec::new();
        for p in prompts {
            let e = self.tokenizer.encode(p, max_len)?;
            ids.extend(e.ids);
            mask.extend(e.mask);
            truncated.push(e.truncated);
        }
        let emb = te.encode(&ids, &mask, prompts.len(), max_len, &TEXT_OUT_LAYERS)?;
        Ok((emb, truncated))
    }

    fn lap(&self, since: &mut Instant) -> Duration {
        // Device work is queued asynchronously: wait for it so the time lands on its stage.
        let _ = self.device.sync();
        let now = Instant::now();
        let d = now - *since;
        *since = now;
        d
    }

    /// Run the pipeline; `on_progress` hears each stage begin and end, and stops the run (with
    /// [`EngineError::Cancelled`]) by returning false.
    pub fn generate(
        &self,
        req: &Request,
        on_progress: &mut OnProgress<'_>,
    ) -> Result<Generated, EngineError> {
        self.run(req, on_progress, &mut Taps::off())
    }

    /// [`generate`](Self::generate), handing the intermediate values to `hook` as they are
    /// computed, under the reference's names: per reference `k`, `ref.{k}.pixels` (prepared),
    /// `ref.{k}.vae_mean` and `ref.{k}.latents` (normalised); per step `i`,
    /// `steps.{i}.noise_pred` (after guidance) and `steps.{i}.latents` (after the Euler step);
    /// then `final.latents_unpacked` and `final.vae_input`. For parity tests (see
    /// [`crate::trace`]); the serving path never calls it.
    pub fn generate_traced(
        &self,
        req: &Request,
        on_progress: &mut OnProgress<'_>,
        hook: &mut Hook<'_>,
    ) -> Result<Generated, EngineError> {
        self.run(req, on_progress, &mut Taps::to(hook))
    }

    fn run(
        &self,
        req: &Request,
        on_progress: &mut OnProgress<'_>,
        taps: &mut Taps<'_>,
    ) -> Result<Generated, EngineError> {
        let m = self.size_multiple();
        if req.prompts.is_empty() {
            return Err(EngineError::Input("no prompt".into()));
        }
        if req.width == 0
            || req.height == 0
            || !req.width.is_multiple_of(m)
            || !req.height.is_multiple_of(m)
        {
            return Err(EngineError::Input(format!(
                "width and height must be positive multiples of {m}; got {}x{}",
                req.width, req.height
            )));
        }
        if req.steps == 0 || req.max_sequence_length == 0 {
            return Err(EngineError::Input(
                "steps and max_sequence_length must be at least 1".into(),
            ));
        }
        let b = req.prompts.len();
        let (h, w) = (req.height / m, req.width / m);
        let c = self.transformer.config.in_channels;
        if c != 4 * self.vae.config.latent_channels {
            return Err(EngineError::Input(format!(
                "transformer in_channels {c} does not match 4 x VAE latent_channels {}",
                self.vae.config.latent_channels
            )));
        }
        let l = req.max_sequence_length;
        let mut timings = Timings::default();
        let mut clock = Instant::now();
        report(on_progress, Progress::Begin(Stage::TextEncoder))?;
        let te = self.text_encoder()?;
        let (cond, truncated) = self.embed(&te, &req.prompts, l)?;
        let ctx = if req.cfg {
            let (neg, _) = self.embed(&te, &vec![String::new(); b], l)?;
            Tensor::cat(vec![cond, neg], 0)
        } else {
            cond
        };
        // Offloaded: its weights leave the device here, before the transformer runs.
        drop(te);
        timings.text_encoder = self.lap(&mut clock);
        report(on_progress, Progress::End(Stage::TextEncoder))?;

        let noise = match &req.init_noise {
            Some(n) => {
                if n.dims() != [b, c, h, w] {
                    return Err(EngineError::Input(format!(
                        "initial noise has shape {:?}; this request needs {:?}",
                        n.dims(),
                        [b, c, h, w]
                    )));
                }
                n.clone()
            }
            None => seeded_noise(req.seed, [b, c, h, w], &self.device),
        };
        // The noise is drawn in f32 and rounded to the compute dtype (diffusers' prepare_latents);
        // the latents stay in it between steps.
        let mut x = pack(noise).cast(self.precision.float());
        let mut img_ids = grid_ids(0, h, w);
        let n_img = img_ids.len();
        let with_references = !req.references.is_empty();
        if with_references {
            report(on_progress, Progress::Begin(Stage::VaeEncode))?;
        }
        let (ref_tokens, ref_ids) = self.encode_references(&req.references, taps)?;
        timings.vae_encode = self.lap(&mut clock);
        if with_references {
            report(on_progress, Progress::End(Stage::VaeEncode))?;
        }
        img_ids.extend(ref_ids);
        // The transformer input at every step: the noisy tokens, then the clean reference tokens.
        let with_refs = |x: Tensor<3>| -> Tensor<3> {
            match &ref_tokens {
                Some(r) => {
                    let [bb, _, cc] = x.dims();
                    let [_, nr, _] = r.dims();
                    Tensor::cat(vec![x, r.clone().expand([bb, nr, cc])], 1)
                }
                None => x,
            }
        };
        let txt_ids = text_ids(l);
        let sched = Schedule::new(req.steps, h * w);
        let denoise = Stage::Denoise { steps: req.steps };
        report(on_progress, Progress::Begin(denoise))?;
        for i in 0..req.steps {
            report(on_progress, Progress::Begin(Stage::Step { index: i }))?;
            let t = model_timestep(sched.timesteps[i], self.precision);
            let v = if req.cfg {
                let both = self
                    .transformer
                    .forward(
                        with_refs(Tensor::cat(vec![x.clone(), x.clone()], 0)),
                        ctx.clone(),
                        t,
                        &txt_ids,
                        &img_ids,
                    )?
                    .narrow(1, 0, n_img);
                let mut halves = both.chunk(2, 0);
                let uncond = halves.pop().expect("two halves");
                let cond = halves.pop().expect("two halves");
                guide(cond, uncond, req.guidance)
            } else {
                self.transformer
                    .forward(with_refs(x.clone()), ctx.clone(), t, &txt_ids, &img_ids)?
                    .narrow(1, 0, n_img)
            };
            taps.tap(format_args!("steps.{i}.noise_pred"), &v);
            x = euler_step(x, v, sched.sigmas[i], sched.sigmas[i + 1], self.precision);
            taps.tap(format_args!("steps.{i}.latents"), &x);
            timings.steps.push(self.lap(&mut clock));
            report(on_progress, Progress::End(Stage::Step { index: i }))?;
        }
        report(on_progress, Progress::End(denoise))?;
        report(on_progress, Progress::Begin(Stage::VaeDecode))?;

        let final_unpacked = unpack(x, h, w);
        taps.tap("final.latents_unpacked", &final_unpacked);
        let vae_input = Vae::unpatchify(self.vae.denormalize(final_unpacked));
        taps.tap("final.vae_input", &vae_input);
        let decoded = self.vae.decode(vae_input);
        // In the compute dtype, as diffusers' postprocess, then widened for the caller.
        let images = decoded
            .mul_scalar(0.5)
            .add_scalar(0.5)
            .clamp(0.0, 1.0)
            .permute([0, 2, 3, 1])
            .cast(FloatDType::F32);
        timings.vae_decode = self.lap(&mut clock);
        report(on_progress, Progress::End(Stage::VaeDecode))?;
        Ok(Generated {
            timings,
            images,
            truncated,
        })
    }
}
