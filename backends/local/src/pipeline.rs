//! Prompt -> image: the whole FLUX.2 [klein] text-to-image pipeline.

use std::path::Path;
use std::time::{Duration, Instant};

use burn::tensor::{Device, Tensor};

use crate::error::EngineError;
use crate::reference;
use crate::sampler::{euler_step, grid_ids, guide, pack, seeded_noise, text_ids, unpack};
use crate::schedule::{model_timestep, Schedule};
use crate::text_encoder::TextEncoder;
use crate::tokenizer::PromptTokenizer;
use crate::transformer::Transformer;
use crate::vae::Vae;

/// Residual-stream taps of the text encoder that klein stacks (hidden_states[9], [18], [27]).
pub const TEXT_OUT_LAYERS: [usize; 3] = [9, 18, 27];

pub struct Pipeline {
    pub tokenizer: PromptTokenizer,
    pub text_encoder: TextEncoder,
    pub transformer: Transformer,
    pub vae: Vae,
    pub device: Device,
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
    /// Keep every step's noise prediction and latents in [`Generated`] (the parity tests compare
    /// them step by step); serving leaves it off, so no per-step tensor outlives its step.
    pub keep_intermediates: bool,
}

/// Wall time of each stage (the device is synchronised before each reading).
#[derive(Clone, Debug, Default)]
pub struct Timings {
    pub text_encoder: Duration,
    pub vae_encode: Duration,
    pub steps: Vec<Duration>,
    pub vae_decode: Duration,
}

/// Everything a run produced; the intermediate values are kept for parity checks and metrics.
pub struct Generated {
    pub timings: Timings,
    /// `(B, H, W, 3)` in [0, 1].
    pub images: Tensor<4>,
    pub truncated: Vec<bool>,
    /// Per step, with `keep_intermediates` (else empty).
    pub noise_preds: Vec<Tensor<3>>,
    pub latents: Vec<Tensor<3>>,
    pub final_unpacked: Tensor<4>,
    pub vae_input: Tensor<4>,
    /// Per reference: the prepared pixels, the VAE posterior mean and the normalised latents.
    pub references: Vec<(Tensor<4>, Tensor<4>, Tensor<4>)>,
}

impl Pipeline {
    /// Load a diffusers-layout klein checkpoint directory.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, EngineError> {
        Ok(Pipeline {
            tokenizer: PromptTokenizer::load(&dir.join("tokenizer"))?,
            text_encoder: TextEncoder::load(&dir.join("text_encoder"), &TEXT_OUT_LAYERS, device)?,
            transformer: Transformer::load(&dir.join("transformer"), device)?,
            vae: Vae::load(&dir.join("vae"), true, device)?,
            device: device.clone(),
        })
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
    #[allow(clippy::type_complexity)]
    fn encode_references(
        &self,
        refs: &[reference::RgbImage],
    ) -> Result<
        (
            Option<Tensor<3>>,
            Vec<[i64; 4]>,
            Vec<(Tensor<4>, Tensor<4>, Tensor<4>)>,
        ),
        EngineError,
    > {
        let mut tokens = Vec::new();
        let mut ids = Vec::new();
        let mut stages = Vec::new();
        for (k, rgb) in refs.iter().enumerate() {
            let p = reference::prepare(rgb, self.size_multiple(), &self.device);
            let (mean, _) = self.vae.encode(p.pixels.clone())?;
            let latents = self.vae.normalize(Vae::patchify(mean.clone()));
            let [_, _, h, w] = latents.dims();
            tokens.push(pack(latents.clone()));
            ids.extend(grid_ids(10 + 10 * k as i64, h, w));
            stages.push((p.pixels, mean, latents));
        }
        let tokens = if tokens.is_empty() {
            None
        } else {
            Some(Tensor::cat(tokens, 1))
        };
        Ok((tokens, ids, stages))
    }

    fn embed(
        &self,
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
        let emb =
            self.text_encoder
                .encode(&ids, &mask, prompts.len(), max_len, &TEXT_OUT_LAYERS)?;
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

    /// Run the pipeline; `on_step(i, n)` is called after each denoising step and stops the run
    /// (with [`EngineError::Cancelled`]) by returning false.
    pub fn generate(
        &self,
        req: &Request,
        on_step: &mut dyn FnMut(usize, usize) -> bool,
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
        let (cond, truncated) = self.embed(&req.prompts, l)?;
        let ctx = if req.cfg {
            let (neg, _) = self.embed(&vec![String::new(); b], l)?;
            Tensor::cat(vec![cond, neg], 0)
        } else {
            cond
        };
        timings.text_encoder = self.lap(&mut clock);

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
        let mut x = pack(noise);
        let mut img_ids = grid_ids(0, h, w);
        let n_img = img_ids.len();
        let (ref_tokens, ref_ids, ref_stages) = self.encode_references(&req.references)?;
        timings.vae_encode = self.lap(&mut clock);
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
        let mut noise_preds = Vec::with_capacity(req.steps);
        let mut latents = Vec::with_capacity(req.steps);
        for i in 0..req.steps {
            let t = model_timestep(sched.timesteps[i], false);
            let v = if req.cfg {
                let both = self
                    .transformer
                    .forward(
                        with_refs(Tensor::cat(vec![x.clone(), x.clone()], 0)),
                        ctx.clone(),
                        t,
                        &txt_ids,
                        &img_ids,
                        None,
                    )?
                    .narrow(1, 0, n_img);
                let mut halves = both.chunk(2, 0);
                let uncond = halves.pop().expect("two halves");
                let cond = halves.pop().expect("two halves");
                guide(cond, uncond, req.guidance)
            } else {
                self.transformer
                    .forward(
                        with_refs(x.clone()),
                        ctx.clone(),
                        t,
                        &txt_ids,
                        &img_ids,
                        None,
                    )?
                    .narrow(1, 0, n_img)
            };
            if req.keep_intermediates {
                noise_preds.push(v.clone());
            }
            x = euler_step(x, v, sched.sigmas[i], sched.sigmas[i + 1]);
            if req.keep_intermediates {
                latents.push(x.clone());
            }
            timings.steps.push(self.lap(&mut clock));
            if !on_step(i + 1, req.steps) {
                return Err(EngineError::Cancelled);
            }
        }

        let final_unpacked = unpack(x, h, w);
        let vae_input = Vae::unpatchify(self.vae.denormalize(final_unpacked.clone()));
        let decoded = self.vae.decode(vae_input.clone());
        let images = decoded
            .mul_scalar(0.5)
            .add_scalar(0.5)
            .clamp(0.0, 1.0)
            .permute([0, 2, 3, 1]);
        timings.vae_decode = self.lap(&mut clock);
        Ok(Generated {
            timings,
            images,
            truncated,
            noise_preds,
            latents,
            final_unpacked,
            vae_input,
            references: ref_stages,
        })
    }
}
