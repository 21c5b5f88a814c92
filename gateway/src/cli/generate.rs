//! `kleingate generate`: one image from the local engine, on the command line.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use base64::Engine as _;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kleingate_local::image_io::{Format, Rgb8};
use kleingate_local::pipeline::{Pipeline, Progress, Request, Stage};
use kleingate_protocol::{GenerateRequest, Limits, Model};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A diffusers-layout checkpoint directory, or a Hugging Face repo id to download.
    #[arg(long)]
    weights: String,
    /// The klein variant: decides distilled (4 steps, guidance 1.0) or base (CFG) behaviour.
    /// Shapes always come from the weights' own configs.
    #[arg(long, default_value = "flux2-klein-4b")]
    model: Model,
    #[arg(long)]
    prompt: String,
    /// Random when absent (and printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Default 1024, or the first reference's size (after its centre crop) when editing.
    #[arg(long)]
    width: Option<usize>,
    /// Default 768, or the first reference's size when editing.
    #[arg(long)]
    height: Option<usize>,
    /// A reference image (jpeg, png or webp) for editing / multi-reference generation; repeat for
    /// several (at most 4).
    #[arg(long = "input-image")]
    input_images: Vec<PathBuf>,
    /// Base models only (default 50); distilled models run exactly 4.
    #[arg(long)]
    steps: Option<usize>,
    /// Base models only (default 4.0); distilled models use 1.0.
    #[arg(long)]
    guidance: Option<f32>,
    #[arg(long, default_value_t = 512)]
    max_sequence_length: usize,
    /// Safetensors file holding `latents.noise` (B, C, H/16, W/16) to use instead of the seed.
    #[arg(long)]
    init_noise: Option<PathBuf>,
    /// cpu (burn flex), vulkan or wgpu (builds with those features).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU threads for the cpu device (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Compute dtype: f32, bf16 or f16 (default: bf16 on GPU devices, f32 on cpu).
    #[arg(long)]
    dtype: Option<kleingate_local::precision::Precision>,
    /// Text encoder between requests: resident (default) or offload (uploaded per run).
    #[arg(long, default_value = "resident")]
    text_encoder: kleingate_local::pipeline::TextEncoderMode,
    /// png, jpeg or webp; default from the output file's extension, else png.
    #[arg(long)]
    format: Option<Format>,
    /// jpeg and webp quality, 1-100.
    #[arg(long, default_value_t = 95, value_parser = clap::value_parser!(u8).range(1..=100))]
    quality: u8,
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    // The same request the API takes, checked by the same rules (distilled models' fixed steps
    // and guidance, sizes, at most 4 references, their byte limit), so the command line and the
    // gateway cannot disagree on what a model runs.
    let gen = protocol_request(&a)?;
    let format = match a.format {
        Some(f) => f,
        None => a
            .output
            .extension()
            .and_then(|e| e.to_str())
            .and_then(|e| e.to_ascii_lowercase().parse().ok())
            .unwrap_or(Format::Png),
    };
    kleingate_local::device::set_cpu_threads(a.threads)?;
    let device = kleingate_local::device::by_name(&a.device)?;
    let dir = kleingate_local::hub::resolve(&a.weights)?;
    let t0 = Instant::now();
    let precision = a
        .dtype
        .unwrap_or_else(|| kleingate_local::precision::Precision::default_for(&a.device));
    let opts = kleingate_local::pipeline::LoadOptions {
        precision,
        text_encoder: a.text_encoder,
    };
    let pipe = Pipeline::load_with(&dir, &device, opts)
        .with_context(|| format!("loading {}", dir.display()))?;
    eprintln!(
        "loaded {} in {:.1} s",
        dir.display(),
        t0.elapsed().as_secs_f64()
    );

    let init_noise = match &a.init_noise {
        Some(p) => Some(kleingate_local::sampler::load_noise(p, &device)?),
        None => None,
    };
    let seed = gen.seed.unwrap_or_else(rand::random);
    let tokens = pipe.tokenizer.encode(&a.prompt, a.max_sequence_length)?;
    if tokens.truncated {
        eprintln!(
            "note: the templated prompt is {} tokens; it is truncated to {} (--max-sequence-length), as the reference pipeline does",
            tokens.n_tokens, a.max_sequence_length
        );
    }
    let references = gen
        .input_images
        .iter()
        .enumerate()
        .map(|(i, img)| {
            let bytes = img
                .decoded_bytes()
                .ok_or_else(|| anyhow::anyhow!("--input-image {i} could not be read back"))?;
            Ok(kleingate_local::reference::load(
                &bytes,
                i,
                kleingate_local::reference::MAX_DECODE_PIXELS,
            )?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let size = pipe.output_size(
        gen.width_given.then_some(gen.width as usize),
        gen.height_given.then_some(gen.height as usize),
        &references,
    )?;
    let req = Request {
        init_noise,
        seed,
        ..Request::for_protocol(
            &gen,
            vec![a.prompt.clone()],
            size,
            a.max_sequence_length,
            references,
        )
    };
    let steps = req.steps;
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} denoising {bar:30} {pos}/{len} steps  {elapsed_precise}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t1 = Instant::now();
    let out = pipe.generate(&req, &mut |p| {
        if let Progress::End(Stage::Step { index }) = p {
            bar.set_position(index as u64 + 1);
        }
        true
    })?;
    bar.finish();
    let [_, h, w, _] = out.images.dims();
    let values = out
        .images
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("reading the image back: {e:?}"))?;
    let bytes = Rgb8::from_unit_floats(&values[..h * w * 3], w, h).encode(format, a.quality)?;
    std::fs::write(&a.output, bytes).with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!(
        "wrote {} ({w}x{h}, {} steps, seed {}) in {:.2} s",
        a.output.display(),
        steps,
        if a.init_noise.is_some() {
            "from --init-noise".to_string()
        } else {
            seed.to_string()
        },
        t1.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The command line as an API request, validated by the protocol's rules.
fn protocol_request(a: &GenerateArgs) -> anyhow::Result<GenerateRequest> {
    let mut obj = serde_json::Map::new();
    obj.insert("prompt".into(), a.prompt.clone().into());
    let optional = [
        ("width", a.width.map(|v| v as u64)),
        ("height", a.height.map(|v| v as u64)),
        ("num_steps", a.steps.map(|v| v as u64)),
        ("seed", a.seed),
    ];
    for (k, v) in optional {
        if let Some(v) = v {
            obj.insert(k.into(), v.into());
        }
    }
    if let Some(g) = a.guidance {
        // NaN and infinities have no JSON form: refused here, not dropped (an absent
        // guidance would mean the model's default).
        let n = serde_json::Number::from_f64(f64::from(g))
            .ok_or_else(|| anyhow::anyhow!("--guidance: must be a finite number; got {g}"))?;
        obj.insert("guidance".into(), n.into());
    }
    if !a.input_images.is_empty() {
        let images = a
            .input_images
            .iter()
            .map(|p| {
                let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                Ok(base64::engine::general_purpose::STANDARD
                    .encode(bytes)
                    .into())
            })
            .collect::<anyhow::Result<Vec<serde_json::Value>>>()?;
        obj.insert("input_images".into(), images.into());
    }
    GenerateRequest::from_object(&obj, Some(a.model), a.model, &Limits::default()).map_err(|e| {
        // Name the flag, not the JSON field.
        let flag = match e.field.as_deref() {
            Some("num_steps") => "--steps".to_owned(),
            Some(f) if f.starts_with("input_images") => "--input-image".to_owned(),
            Some(f) => format!("--{}", f.replace('_', "-")),
            None => "the request".to_owned(),
        };
        anyhow::anyhow!("{flag}: {}", e.message)
    })
}
