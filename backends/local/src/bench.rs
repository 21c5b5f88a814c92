//! The engine benchmark behind `kleingate bench-engine`: per-stage times of the real pipeline
//! stages at a given size, from a checkpoint or from random weights of the real shapes (the
//! configs in `backends/local/configs/`, so no download is needed), plus the device memory the
//! allocator reserved and a breakdown of one transformer step by op kind.
//!
//! Every timed region ends with a device sync, so queued GPU work lands on the stage that issued
//! it. Each stage runs `warmup` times untimed (kernel compilation and autotuning happen there),
//! then `iters` times; the median is reported.
//!
//! With a [`Partner`] (another engine, e.g. diffusers in a child process), every run of every
//! pipeline stage is followed or preceded by the partner's run of the same stage, alternating who
//! goes first. On a shared machine whose speed drifts by tens of percent over minutes, two sides
//! timed minutes apart can differ by that much for nothing; timed back to back, both see the
//! same machine, and the median of the per-pair ratios keeps only what differs between them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::tensor::{Device, Distribution, Tensor};

use crate::config::{Flux2Config, VaeConfig};
use crate::error::EngineError;
use crate::nn::{lin, sdpa, LinearWeight};
use crate::pipeline::{TextEncoderMode, TEXT_OUT_LAYERS};
use crate::precision::Precision;
use crate::sampler::{euler_step, grid_ids, pack, seeded_noise, text_ids, unpack};
use crate::schedule::{model_timestep, Schedule};
use crate::text_encoder::TextEncoder;
use crate::transformer::Transformer;
use crate::vae::Vae;
use crate::weights::Source;

/// The shipped configs: the real checkpoints' by size class (`4b`, `9b`), and `cpu-mid`, klein's
/// architecture scaled down for CPU benchmarks (transformer 6 heads x 128 with 2 double and 4
/// single blocks, a 28-layer Qwen3 of width 256, VAE 32-64-128-128).
const PRESETS: &[(&str, &[(&str, &str)])] = &[
    (
        "cpu-mid",
        &[
            (
                "text_encoder",
                include_str!("../configs/cpu-mid/text_encoder/config.json"),
            ),
            (
                "transformer",
                include_str!("../configs/cpu-mid/transformer/config.json"),
            ),
            ("vae", include_str!("../configs/cpu-mid/vae/config.json")),
        ],
    ),
    (
        "4b",
        &[
            (
                "text_encoder",
                include_str!("../configs/flux2-klein-4b/text_encoder/config.json"),
            ),
            (
                "transformer",
                include_str!("../configs/flux2-klein-4b/transformer/config.json"),
            ),
            (
                "vae",
                include_str!("../configs/flux2-klein-4b/vae/config.json"),
            ),
        ],
    ),
    (
        "9b",
        &[
            (
                "text_encoder",
                include_str!("../configs/flux2-klein-9b/text_encoder/config.json"),
            ),
            (
                "transformer",
                include_str!("../configs/flux2-klein-9b/transformer/config.json"),
            ),
            (
                "vae",
                include_str!("../configs/flux2-klein-9b/vae/config.json"),
            ),
        ],
    ),
];

/// Write the shipped configs for `preset` (`cpu-mid`, or any klein model name: those ending in
/// `4b` or `9b` get the real configs) into a fresh directory laid out like a checkpoint, and
/// return it.
pub fn preset_dir(preset: &str) -> Result<PathBuf, EngineError> {
    let model = preset;
    let (_, files) = PRESETS
        .iter()
        .find(|(name, _)| *name == preset)
        .or_else(|| PRESETS.iter().find(|(size, _)| model.ends_with(size)))
        .ok_or_else(|| EngineError::Input(format!("no shipped configs for `{model}`")))?;
    // One directory per call: callers remove it when done, and tests call this concurrently.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let root = std::env::temp_dir().join(format!(
        "kleingate-bench-{model}-{}-{call}",
        std::process::id()
    ));
    for (part, text) in *files {
        let dir = root.join(part);
        std::fs::create_dir_all(&dir).map_err(|e| EngineError::io(&dir, e))?;
        let path = dir.join("config.json");
        std::fs::write(&path, text).map_err(|e| EngineError::io(&path, e))?;
    }
    Ok(root)
}

#[derive(Clone, Debug)]
pub struct BenchSpec {
    pub width: usize,
    pub height: usize,
    /// Prompt tokens (512 in the pipeline).
    pub seq_len: usize,
    pub warmup: usize,
    pub iters: usize,
    /// The compute dtype the models are built in.
    pub precision: Precision,
    /// Offload: the text encoder stage includes uploading its weights, and they are off the
    /// device for the other stages.
    pub text_encoder: TextEncoderMode,
}

/// Another engine timed beside this one, stage by stage, by the stage's name (see the module
/// doc). It owns its models and inputs, built from the same configs and shapes.
pub trait Partner {
    /// Run `stage` once, synced, and return how long it took.
    fn run(&mut self, stage: &str) -> Result<Duration, EngineError>;
}

/// Idle time before each timed run when a partner shares the machine: a pool that has just
/// finished spins its threads for a few milliseconds (rayon, OpenMP) before sleeping, which would
/// steal cores from the side that runs next.
const PAIR_GAP: Duration = Duration::from_millis(30);

#[derive(Clone, Debug)]
pub struct Stage {
    pub name: &'static str,
    pub median: Duration,
    pub min: Duration,
    /// The highest memory reading of this stage's runs: device memory the allocator held on GPU
    /// devices, the process's peak resident set on the CPU (reset before the stage).
    pub peak_bytes: Option<u64>,
    /// The partner's runs of the same stage, each timed beside one of ours.
    pub partner: Option<Paired>,
}

#[derive(Clone, Debug)]
pub struct Paired {
    /// The partner's median run.
    pub median: Duration,
    /// Ours over the partner's, run by run: the median, and the lowest and highest.
    pub ratio: f64,
    pub ratio_range: (f64, f64),
}

impl Paired {
    /// From the two sides' runs, pair by pair (same length, at least one).
    fn of(ours: &[Duration], theirs: &[Duration]) -> Paired {
        let mut ratios: Vec<f64> = ours
            .iter()
            .zip(theirs)
            .map(|(o, t)| o.as_secs_f64() / t.as_secs_f64().max(1e-9))
            .collect();
        ratios.sort_by(f64::total_cmp);
        let mut sorted = theirs.to_vec();
        sorted.sort();
        Paired {
            median: median(&sorted),
            ratio: median(&ratios),
            ratio_range: (ratios[0], ratios[ratios.len() - 1]),
        }
    }
}

/// The middle value of a sorted, non-empty list (the upper one of an even count, as the stages'
/// medians have always been taken).
fn median<T: Copy>(sorted: &[T]) -> T {
    sorted[sorted.len() / 2]
}

#[derive(Clone, Debug)]
pub struct OpShare {
    pub kind: &'static str,
    pub time: Duration,
    /// Floating-point operations this kind does in one step (a multiply-add counts two), so
    /// `flops / time` is the rate it runs at, to hold against the device's peak.
    pub flops: f64,
}

impl OpShare {
    /// The rate this op kind ran at, in GFLOP/s; 0 for a zero time (only a broken clock gives
    /// one), never infinite, which JSON cannot hold.
    pub fn gflop_per_s(&self) -> f64 {
        let secs = self.time.as_secs_f64();
        if secs > 0.0 {
            self.flops / secs / 1e9
        } else {
            0.0
        }
    }
}

/// Every linear layer of one transformer step as `(rows, in, out, times per step)`, for one
/// batch entry (the modulation and timestep layers, one row each, left out).
fn step_linears(
    c: &Flux2Config,
    text_tokens: usize,
    image_tokens: usize,
) -> [(usize, usize, usize, usize); 9] {
    let (d, m) = (c.inner_dim(), c.mlp_hidden());
    let tokens = text_tokens + image_tokens;
    let (nd, ns) = (c.num_layers, c.num_single_layers);
    [
        (text_tokens, c.joint_attention_dim, d, 1), // txt_in
        (image_tokens, c.in_channels, d, 1),        // img_in
        (tokens, d, 3 * d, nd),                     // double: qkv
        (tokens, d, d, nd),                         // double: attention out
        (tokens, d, 2 * m, nd),                     // double: SwiGLU in
        (tokens, m, d, nd),                         // double: SwiGLU out
        (tokens, d, 3 * d + 2 * m, ns),             // single: fused qkv + MLP in
        (tokens, d + m, d, ns),                     // single: fused out
        (image_tokens, d, c.out_channels(), 1),     // proj_out
    ]
}

/// Floating-point operations of one step's linear layers and of its attention (`q k^T` and
/// `p v` over every token, in every block), for `batch` images.
fn step_flops(
    c: &Flux2Config,
    batch: usize,
    text_tokens: usize,
    image_tokens: usize,
) -> (f64, f64) {
    // In f64: the counts pass 2^32 at the real sizes.
    let f = |n: usize| n as f64;
    let linear: f64 = step_linears(c, text_tokens, image_tokens)
        .iter()
        .map(|&(rows, din, dout, count)| 2.0 * f(rows) * f(din) * f(dout) * f(count))
        .sum();
    let t = f(text_tokens + image_tokens);
    let blocks = f(c.num_layers + c.num_single_layers);
    let attention = blocks * 4.0 * f(c.num_attention_heads) * t * t * f(c.attention_head_dim);
    (f(batch) * linear, f(batch) * attention)
}

#[derive(Clone, Debug)]
pub struct BenchReport {
    pub stages: Vec<Stage>,
    /// Bytes of weights each model holds on the device, in load order (text encoder,
    /// transformer, VAE).
    pub weight_bytes: Vec<(&'static str, u64)>,
    /// Whether the text encoder was offloaded (its weights on the device during its stage only).
    pub text_encoder: TextEncoderMode,
    /// Device memory the allocator held at its highest reading (sampled after each stage);
    /// `None` where the backend does not report it (the CPU backend).
    pub peak_reserved_bytes: Option<u64>,
    /// One distilled transformer step split by op kind (see [`profile_step`]).
    pub step_ops: Vec<OpShare>,
    /// Building the models (reading or generating the weights, uploading them).
    pub load_time: Duration,
    /// On the CPU: the pool's peak FMA rate measured in this run (GFLOP/s), the ceiling for the
    /// step's op rates (`None` on GPU devices and CPUs without AVX2 + FMA), at the widest FMA
    /// the CPU has: `cpu_fma_lanes` f32 lanes (16 with AVX-512, 8 with AVX2).
    pub cpu_peak_gflop_per_s: Option<f64>,
    pub cpu_fma_lanes: usize,
}

fn sync(device: &Device) -> Result<(), EngineError> {
    device
        .sync()
        .map_err(|e| EngineError::Device(format!("{e:?}")))
}

struct Timer<'a, 'p> {
    device: &'a Device,
    spec: &'a BenchSpec,
    peak: Option<u64>,
    progress: &'a mut dyn FnMut(&str),
    partner: Option<&'a mut (dyn Partner + 'p)>,
}

impl Timer<'_, '_> {
    /// The current memory reading (see [`Stage::peak_bytes`]), folded into the overall peak.
    /// The overall peak follows the device allocator only (what `peak_reserved_bytes` means).
    fn sample_memory(&mut self) -> Option<u64> {
        match self.device.memory_pool_usage() {
            Some(u) => {
                self.peak = Some(self.peak.unwrap_or(0).max(u.bytes_reserved));
                Some(u.bytes_reserved)
            }
            None => peak_rss_bytes(),
        }
    }

    /// Time a pipeline stage: beside the partner's, when there is one.
    fn time(
        &mut self,
        name: &'static str,
        f: impl FnMut() -> Result<(), EngineError>,
    ) -> Result<Stage, EngineError> {
        self.time_runs(name, true, f)
    }

    /// Time our side alone (the step's op-kind breakdown, which the partner has no match for).
    fn time_alone(
        &mut self,
        name: &'static str,
        f: impl FnMut() -> Result<(), EngineError>,
    ) -> Result<Stage, EngineError> {
        self.time_runs(name, false, f)
    }

    fn time_runs(
        &mut self,
        name: &'static str,
        paired: bool,
        mut f: impl FnMut() -> Result<(), EngineError>,
    ) -> Result<Stage, EngineError> {
        (self.progress)(name);
        reset_peak_rss();
        let device = self.device;
        let mut ours = || -> Result<Duration, EngineError> {
            sync(device)?;
            let start = Instant::now();
            f()?;
            sync(device)?;
            Ok(start.elapsed())
        };
        let mut partner = self.partner.as_deref_mut().filter(|_| paired);
        let (mut runs, mut theirs) = (Vec::new(), Vec::new());
        for i in 0..self.spec.warmup + self.spec.iters.max(1) {
            let timed = i >= self.spec.warmup;
            let (o, t) = match partner.as_deref_mut() {
                None => (ours()?, None),
                // Alternate who goes first, so neither side always inherits the other's caches
                // or a machine that has just got busier.
                Some(p) if i % 2 == 0 => {
                    std::thread::sleep(PAIR_GAP);
                    let o = ours()?;
                    std::thread::sleep(PAIR_GAP);
                    (o, Some(p.run(name)?))
                }
                Some(p) => {
                    std::thread::sleep(PAIR_GAP);
                    let t = p.run(name)?;
                    std::thread::sleep(PAIR_GAP);
                    (ours()?, Some(t))
                }
            };
            if timed {
                runs.push(o);
                theirs.extend(t);
            }
        }
        let peak_bytes = self.sample_memory();
        let partner = (!theirs.is_empty()).then(|| Paired::of(&runs, &theirs));
        runs.sort();
        Ok(Stage {
            name,
            median: median(&runs),
            min: runs[0],
            peak_bytes,
            partner,
        })
    }
}

/// Load the three models from `dir`'s configs (weights from `source`) and time every stage, each
/// beside `partner`'s run of it when given.
pub fn run(
    dir: &Path,
    source: Source,
    spec: &BenchSpec,
    device: &Device,
    progress: &mut dyn FnMut(&str),
    partner: Option<&mut dyn Partner>,
) -> Result<BenchReport, EngineError> {
    // Check the size before building a model that can take minutes and tens of GB.
    let m = 2 * VaeConfig::load(&dir.join("vae/config.json"))?.scale_factor();
    if spec.width == 0
        || spec.height == 0
        || !spec.width.is_multiple_of(m)
        || !spec.height.is_multiple_of(m)
    {
        return Err(EngineError::Input(format!(
            "width and height must be positive multiples of {m}"
        )));
    }
    let loading = Instant::now();
    progress("loading");
    let p = spec.precision;
    let load_te = || {
        TextEncoder::load_from(
            &dir.join("text_encoder"),
            &TEXT_OUT_LAYERS,
            source,
            device,
            p,
        )
    };
    let te = load_te()?;
    let tr = Transformer::load_from(&dir.join("transformer"), source, device, p)?;
    let vae = Vae::load_from(&dir.join("vae"), true, source, device, p)?;
    sync(device)?;
    let weight_bytes = vec![
        ("text encoder", te.weight_bytes()),
        ("transformer", tr.weight_bytes()),
        ("VAE", vae.weight_bytes()),
    ];
    let load_time = loading.elapsed();
    let (h, w) = (spec.height / m, spec.width / m);
    let (l, c) = (spec.seq_len, tr.config.in_channels);
    let ids: Vec<u32> = (0..l)
        .map(|i| (i * 7919 % te.config.vocab_size) as u32)
        .collect();
    let mask = vec![1u32; l];
    let txt_ids = text_ids(l);
    let img_ids = grid_ids(0, h, w);
    let ctx = te.encode(&ids, &mask, 1, l, &TEXT_OUT_LAYERS)?;
    let offload = spec.text_encoder == TextEncoderMode::Offload;
    // Offloaded: off the device for every other stage, uploaded inside the text encoder's.
    let te = if offload { None } else { Some(te) };
    let encode = || -> Result<Tensor<3>, EngineError> {
        match &te {
            Some(t) => t.encode(&ids, &mask, 1, l, &TEXT_OUT_LAYERS),
            None => load_te()?.encode(&ids, &mask, 1, l, &TEXT_OUT_LAYERS),
        }
    };
    let ctx2 = Tensor::cat(vec![ctx.clone(), ctx.clone()], 0);
    let x = pack(seeded_noise(1, [1, c, h, w], device));
    let x2 = Tensor::cat(vec![x.clone(), x.clone()], 0);
    let t = model_timestep(1000.0, p);
    let latents = seeded_noise(2, [1, vae.config.latent_channels, 2 * h, 2 * w], device);
    let pixels: Tensor<4> = Tensor::random(
        [1, 3, spec.height, spec.width],
        Distribution::Uniform(-1.0, 1.0),
        device,
    );

    let mut timer = Timer {
        device,
        spec,
        peak: None,
        progress,
        partner,
    };
    timer.sample_memory();
    let mut stages = vec![
        timer.time("text encoder", || encode().map(drop))?,
        timer.time("transformer step", || {
            tr.forward(x.clone(), ctx.clone(), t, &txt_ids, &img_ids)
                .map(drop)
        })?,
        timer.time("CFG step (batch 2)", || {
            tr.forward(x2.clone(), ctx2.clone(), t, &txt_ids, &img_ids)
                .map(drop)
        })?,
        timer.time("VAE decode", || {
            let _ = vae.decode(latents.clone());
            Ok(())
        })?,
        timer.time("VAE encode", || vae.encode(pixels.clone()).map(drop))?,
    ];
    // The whole distilled image as the pipeline runs it, minus tokenisation (host-side, well
    // under a millisecond).
    let sched = Schedule::new(4, h * w);
    stages.push(timer.time("distilled image (4 steps)", || {
        let ctx = encode()?;
        let mut z = pack(seeded_noise(3, [1, c, h, w], device)).cast(p.float());
        for i in 0..4 {
            let v = tr.forward(
                z.clone(),
                ctx.clone(),
                model_timestep(sched.timesteps[i], p),
                &txt_ids,
                &img_ids,
            )?;
            z = euler_step(z, v, sched.sigmas[i], sched.sigmas[i + 1], p);
        }
        let img = vae.decode(Vae::unpatchify(vae.denormalize(unpack(z, h, w))));
        let _ = img.mul_scalar(0.5).add_scalar(0.5).clamp(0.0, 1.0);
        Ok(())
    })?);
    let step_ops = profile_step(&tr, &mut timer, 1, l, h * w)?;
    let cpu_peak_gflop_per_s = if *device == Device::flex() {
        crate::cpu::simd::fma_peak_gflop_per_s()
    } else {
        None
    };
    Ok(BenchReport {
        stages,
        weight_bytes,
        text_encoder: spec.text_encoder,
        peak_reserved_bytes: timer.peak,
        step_ops,
        load_time,
        cpu_peak_gflop_per_s,
        cpu_fma_lanes: crate::cpu::simd::fma_lanes(),
    })
}

/// Where a transformer step's time goes, by op kind: every linear layer of one forward run alone
/// at its real shape, as many times as the model has it, and attention alone at its real shape
/// (`[B, heads, L + N, head_dim]`, once per block). A double block's text and image projections
/// (L and N rows) are timed as one matmul of L + N rows: the same work. Modulation and the
/// timestep MLP (one row each) are left in "other", which the caller derives as the measured step
/// minus these two.
fn profile_step(
    tr: &Transformer,
    timer: &mut Timer<'_, '_>,
    batch: usize,
    text_tokens: usize,
    image_tokens: usize,
) -> Result<Vec<OpShare>, EngineError> {
    let c = &tr.config;
    let (heads, hd) = (c.num_attention_heads, c.attention_head_dim);
    let device = timer.device.clone();
    let f = tr.precision().float();
    let tokens = text_tokens + image_tokens;
    let blocks = c.num_layers + c.num_single_layers;
    let shapes = step_linears(c, text_tokens, image_tokens);
    let (linear_flops, attention_flops) = step_flops(c, batch, text_tokens, image_tokens);
    let mut linear_time = Duration::ZERO;
    for (rows, din, dout, count) in shapes {
        let x = Tensor::<3>::random([batch, rows, din], Distribution::Default, &device).cast(f);
        let wt = LinearWeight::new(
            Tensor::<2>::random([din, dout], Distribution::Default, &device).cast(f),
        );
        let s = timer.time_alone("profile: linear", || {
            let _ = lin(x.clone(), &wt);
            Ok(())
        })?;
        linear_time += s.median * count as u32;
    }
    let q = Tensor::<4>::random([batch, heads, tokens, hd], Distribution::Default, &device).cast(f);
    let att = timer.time_alone("profile: attention", || {
        let _ = sdpa(q.clone(), q.clone(), q.clone(), None);
        Ok(())
    })?;
    Ok(vec![
        OpShare {
            kind: "linear (matmul)",
            time: linear_time,
            flops: linear_flops,
        },
        OpShare {
            kind: "attention",
            time: att.median * blocks as u32,
            flops: attention_flops,
        },
    ])
}

/// This process's peak resident set size (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Start a new peak-RSS window (Linux: writing 5 to `/proc/self/clear_refs` resets `VmHWM` to
/// the current RSS); elsewhere the peak stays the process's.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The diffusers/PyTorch side of the side-by-side benchmark (`bench-engine --compare-diffusers`).
pub const DIFFUSERS_SCRIPT: &str = include_str!("../bench/diffusers_bench.py");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Flux2Config, Qwen3Config};

    /// `cpu-mid`: klein's architecture at the sizes the CPU comparison uses, consistent with
    /// itself (the transformer reads the text encoder's three stacked layers; 4 x the VAE's latent
    /// channels in, 6 heads x 128).
    #[test]
    fn the_cpu_mid_preset_is_klein_scaled_down() {
        let dir = preset_dir("cpu-mid").unwrap();
        let t = Flux2Config::load(&dir.join("transformer/config.json")).unwrap();
        let q = Qwen3Config::load(&dir.join("text_encoder/config.json")).unwrap();
        let v = VaeConfig::load(&dir.join("vae/config.json")).unwrap();
        assert_eq!(
            (t.inner_dim(), t.num_layers, t.num_single_layers),
            (768, 2, 4)
        );
        assert_eq!((q.hidden_size, q.num_hidden_layers), (256, 28));
        assert!(TEXT_OUT_LAYERS.iter().all(|&l| l < q.num_hidden_layers));
        assert_eq!(t.joint_attention_dim, 3 * q.hidden_size);
        assert_eq!(4 * v.latent_channels, t.in_channels);
        assert_eq!(v.scale_factor(), 8);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Transformer parameters implied by a config, weight by weight as `transformer.rs` loads
    /// them (no biases anywhere).
    fn transformer_params(c: &Flux2Config) -> usize {
        let (d, m, hd) = (c.inner_dim(), c.mlp_hidden(), c.attention_head_dim);
        let embed = c.in_channels * d + c.joint_attention_dim * d;
        let time = c.timestep_guidance_channels * d + d * d;
        let modulation = 2 * d * 6 * d + d * 3 * d;
        let double = 2 * (d * 3 * d + d * d + 2 * hd + d * 2 * m + m * d);
        let single = d * (3 * d + 2 * m) + (d + m) * d + 2 * hd;
        let out = d * 2 * d + d * c.out_channels();
        embed + time + modulation + c.num_layers * double + c.num_single_layers * single + out
    }

    /// The shipped configs are the published checkpoints': their transformers have exactly the
    /// parameter counts of BFL's single-file releases (flux-2-klein-4b/9b.safetensors).
    #[test]
    fn shipped_configs_match_the_published_parameter_counts() {
        for (model, params, hidden) in [
            ("flux2-klein-4b", 3_875_544_576usize, 2560),
            ("flux2-klein-base-9b", 9_078_581_248, 4096),
        ] {
            let dir = preset_dir(model).unwrap();
            let t = Flux2Config::load(&dir.join("transformer/config.json")).unwrap();
            assert_eq!(transformer_params(&t), params, "{model}");
            let q = Qwen3Config::load(&dir.join("text_encoder/config.json")).unwrap();
            assert_eq!(q.hidden_size, hidden);
            assert_eq!(t.joint_attention_dim, 3 * q.hidden_size);
            let v = VaeConfig::load(&dir.join("vae/config.json")).unwrap();
            assert_eq!(4 * v.latent_channels, t.in_channels);
            assert_eq!(v.scale_factor(), 8);
            let _ = std::fs::remove_dir_all(dir);
        }
        assert!(preset_dir("flux2-klein-7b").is_err());
    }

    /// The step's operation count for `cpu-mid` at 256x256 (256 image tokens) and 128 prompt
    /// tokens, worked out by hand from its config (d = 768, MLP 2304, 6 heads x 128, 2 double and
    /// 4 single blocks, 384 tokens): the per-token weights of a double block (qkv, out, SwiGLU
    /// in and out: 768 x 2304 + 768 x 768 + 768 x 4608 + 2304 x 768) and of a single block
    /// (768 x 6912 + 3072 x 768) are both 7,667,712.
    #[test]
    fn a_steps_operation_count_follows_the_config() {
        let dir = preset_dir("cpu-mid").unwrap();
        let t = Flux2Config::load(&dir.join("transformer/config.json")).unwrap();
        let per_token = 7_667_712.0;
        let linear = 2.0 * 384.0 * per_token * 6.0
            + 2.0 * 128.0 * 768.0 * 768.0 // txt_in
            + 2.0 * 256.0 * 128.0 * 768.0 // img_in
            + 2.0 * 256.0 * 768.0 * 128.0; // proj_out
        let attention = 6.0 * 4.0 * 6.0 * 384.0 * 384.0 * 128.0;
        assert_eq!(step_flops(&t, 1, 128, 256), (linear, attention));
        // A CFG batch of two does twice the work.
        assert_eq!(step_flops(&t, 2, 128, 256), (2.0 * linear, 2.0 * attention));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn random_weights_are_deterministic_and_scaled_by_fan_in() {
        let device = Device::flex();
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/klein-tiny/pipeline/transformer");
        let store = || {
            crate::weights::WeightStore::open_from(
                &dir,
                "x",
                Source::Random(1),
                &device,
                Precision::F32,
            )
            .unwrap()
        };
        let (a, b) = (store(), store());
        let w = a.values("l.weight", &[256, 400]).unwrap();
        assert_eq!(w, b.values("l.weight", &[256, 400]).unwrap());
        assert_ne!(w, a.values("m.weight", &[256, 400]).unwrap());
        let var = w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32;
        assert!(
            (var * 400.0 - 1.0).abs() < 0.05,
            "variance x fan_in = {}",
            var * 400.0
        );
        assert!(a.values("n.bias", &[8]).unwrap().iter().all(|&x| x == 0.0));
        assert!(a
            .values("norm.weight", &[8])
            .unwrap()
            .iter()
            .all(|&x| x == 1.0));
    }
}
