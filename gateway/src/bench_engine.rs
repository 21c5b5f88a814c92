//! `kleingate bench-engine`: per-stage times of the local engine, beside the reference figures.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use kleingate_local::bench::{self, BenchReport, BenchSpec};
use kleingate_local::weights::Source;
use kleingate_protocol::Model;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Build the model at its real size from the shipped configs with random weights (no download).
    #[arg(long, conflicts_with = "weights")]
    random_weights: bool,
    /// A checkpoint directory or Hugging Face repo id (its configs decide the shapes).
    #[arg(long)]
    weights: Option<String>,
    /// With --random-weights: take the configs from this checkpoint directory instead of the
    /// shipped real ones (e.g. the tiny test pipeline).
    #[arg(long, requires = "random_weights")]
    configs: Option<std::path::PathBuf>,
    #[arg(long, default_value = "flux2-klein-4b")]
    model: Model,
    #[arg(long, default_value_t = 1024)]
    width: usize,
    #[arg(long, default_value_t = 768)]
    height: usize,
    /// Prompt tokens fed to the text encoder and the transformer (the pipeline's 512).
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Untimed runs per stage first (kernel compilation, autotuning).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed runs per stage; the median is reported.
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// cpu (burn flex), vulkan or wgpu (builds with those features).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// diffusers 0.42.1, bf16, eager, one H100, klein-4B shapes at 1024x768 (random weights): the
/// baseline the issue measured, in milliseconds, by stage name.
const REFERENCE_4B_1024X768: &[(&str, f64)] = &[
    ("text encoder", 59.0),
    ("transformer step", 69.4),
    ("CFG step (batch 2)", 133.9),
    ("VAE decode", 68.6),
    ("VAE encode", 37.0),
    ("distilled image (4 steps)", 405.0),
];

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    let (dir, source) = match (&a.weights, a.random_weights) {
        (Some(w), false) => (kleingate_local::hub::resolve(w)?, Source::Files),
        (None, true) => (
            match &a.configs {
                Some(d) => d.clone(),
                None => bench::preset_dir(a.model.id())?,
            },
            Source::Random(0x006b_6c65_696e), // "klein"
        ),
        _ => bail!("give --weights DIR|REPO or --random-weights"),
    };
    let device = kleingate_local::device::by_name(&a.device)?;
    let spec = BenchSpec {
        width: a.width,
        height: a.height,
        seq_len: a.seq_len,
        warmup: a.warmup,
        iters: a.iters,
    };
    let report = bench::run(&dir, source, &spec, &device, &mut |stage| {
        eprintln!("[bench] {stage}");
    });
    let preset = a.random_weights && a.configs.is_none();
    if preset {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let report = report.context("benchmark")?;
    // The reference figures are for klein-4B shapes at 1024x768 with 512 prompt tokens.
    let with_reference = preset
        && a.model.id().ends_with("4b")
        && (a.width, a.height, a.seq_len) == (1024, 768, 512);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json(&a, &report))?);
    } else {
        print_table(&a, &report, with_reference);
    }
    Ok(())
}

fn json(a: &BenchArgs, r: &BenchReport) -> serde_json::Value {
    serde_json::json!({
        "model": a.model.id(),
        "device": a.device,
        "width": a.width,
        "height": a.height,
        "seq_len": a.seq_len,
        "random_weights": a.random_weights,
        "load_ms": ms(r.load_time),
        "stages": r.stages.iter().map(|s| serde_json::json!({
            "stage": s.name, "median_ms": ms(s.median), "min_ms": ms(s.min),
        })).collect::<Vec<_>>(),
        "peak_reserved_bytes": r.peak_reserved_bytes,
        "step_ops": r.step_ops.iter().map(|o| serde_json::json!({
            "kind": o.kind, "ms": ms(o.time),
        })).collect::<Vec<_>>(),
    })
}

fn print_table(a: &BenchArgs, r: &BenchReport, with_reference: bool) {
    println!(
        "kleingate bench-engine: {} {}x{}, {} prompt tokens, device {}, {} weights, median of {}",
        a.model,
        a.width,
        a.height,
        a.seq_len,
        a.device,
        if a.random_weights { "random" } else { "real" },
        a.iters.max(1)
    );
    println!("load: {:.1} s", r.load_time.as_secs_f64());
    println!(
        "| stage | kleingate ms (median) | min ms | diffusers bf16 H100 ms | kleingate / diffusers |"
    );
    println!("|---|---|---|---|---|");
    for s in &r.stages {
        let reference = REFERENCE_4B_1024X768
            .iter()
            .find(|(n, _)| *n == s.name)
            .map(|(_, v)| *v)
            .filter(|_| with_reference);
        let (rf, ratio) = match reference {
            Some(v) => (format!("{v:.1}"), format!("{:.2}x", ms(s.median) / v)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {} | {:.1} | {:.1} | {rf} | {ratio} |",
            s.name,
            ms(s.median),
            ms(s.min)
        );
    }
    match r.peak_reserved_bytes {
        Some(b) => println!(
            "peak device memory reserved: {:.2} GiB",
            b as f64 / (1u64 << 30) as f64
        ),
        None => println!("peak device memory: not reported by this backend"),
    }
    if let Some(step) = r.stages.iter().find(|s| s.name == "transformer step") {
        let total = ms(step.median);
        let known: f64 = r.step_ops.iter().map(|o| ms(o.time)).sum();
        println!("one transformer step by op kind (each op alone at its real shape):");
        for o in &r.step_ops {
            println!(
                "  {:<18} {:>9.1} ms  {:>5.1}%",
                o.kind,
                ms(o.time),
                100.0 * ms(o.time) / total
            );
        }
        println!(
            "  {:<18} {:>9.1} ms  {:>5.1}%  (norms, RoPE, modulation, residuals, layout)",
            "other",
            (total - known).max(0.0),
            100.0 * (total - known).max(0.0) / total
        );
    }
}
