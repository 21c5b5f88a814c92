//! `kleingate bench-engine`: per-stage times of the local engine, beside the reference figures.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use kleingate_local::bench::{self, BenchReport, BenchSpec};
use kleingate_local::precision::Precision;
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
    #[arg(long, requires = "random_weights", conflicts_with = "preset")]
    configs: Option<std::path::PathBuf>,
    /// With --random-weights: shipped configs by name instead of --model's real ones: `cpu-mid`
    /// (klein scaled down for CPUs), `4b`, `9b`.
    #[arg(long, requires = "random_weights")]
    preset: Option<String>,
    /// CPU threads for the cpu device (default: one per core); also given to PyTorch with
    /// --compare-diffusers.
    #[arg(long)]
    threads: Option<usize>,
    /// Also run the same stages in diffusers/PyTorch with this Python (which needs torch,
    /// diffusers==0.42.1 and transformers) on the same configs, shapes, dtype, threads, warm-up
    /// and iterations, and print kleingate's time per stage as a ratio to theirs.
    #[arg(long, value_name = "PYTHON", requires = "random_weights")]
    compare_diffusers: Option<String>,
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
    /// Compute dtype: f32, bf16 or f16 (default: bf16 on GPU devices, f32 on cpu).
    #[arg(long)]
    dtype: Option<kleingate_local::precision::Precision>,
    /// Text encoder between requests: resident (default) or offload (uploaded per run).
    #[arg(long, default_value = "resident")]
    text_encoder: kleingate_local::pipeline::TextEncoderMode,
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

impl BenchArgs {
    fn precision(&self) -> Precision {
        self.dtype
            .unwrap_or_else(|| Precision::default_for(&self.device))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    let (dir, source) = match (&a.weights, a.random_weights) {
        (Some(w), false) => (kleingate_local::hub::resolve(w)?, Source::Files),
        (None, true) => (
            match &a.configs {
                Some(d) => d.clone(),
                None => bench::preset_dir(a.preset.as_deref().unwrap_or(a.model.id()))?,
            },
            Source::Random(0x006b_6c65_696e), // "klein"
        ),
        _ => bail!("give --weights DIR|REPO or --random-weights"),
    };
    kleingate_local::device::set_cpu_threads(a.threads)?;
    let device = kleingate_local::device::by_name(&a.device)?;
    let spec = BenchSpec {
        width: a.width,
        height: a.height,
        seq_len: a.seq_len,
        warmup: a.warmup,
        iters: a.iters,
        precision: a.precision(),
        text_encoder: a.text_encoder,
    };
    // The partner builds its models first, then each stage runs on both sides back to back.
    let mut partner = match &a.compare_diffusers {
        Some(python) => match Diffusers::start(python, &dir, &a) {
            Ok(p) => Some(p),
            Err(e) => {
                remove_preset(&a, &dir);
                return Err(e);
            }
        },
        None => None,
    };
    let report = bench::run(
        &dir,
        source,
        &spec,
        &device,
        &mut |stage| eprintln!("[bench] {stage}"),
        partner.as_mut().map(|p| p as &mut dyn bench::Partner),
    );
    remove_preset(&a, &dir);
    let report = report.context("benchmark")?;
    if let Some(partner) = partner {
        let theirs = partner.finish(&report)?;
        if a.json {
            let mut j = json(&a, &report);
            j["diffusers"] = theirs;
            println!("{}", serde_json::to_string_pretty(&j)?);
        } else {
            print_comparison(&a, &report, &theirs);
        }
        return Ok(());
    }
    let preset = a.random_weights && a.configs.is_none();
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

/// The shipped configs written out for this run (`--random-weights` without `--configs`) are
/// removed when it is done.
fn remove_preset(a: &BenchArgs, dir: &std::path::Path) {
    if a.random_weights && a.configs.is_none() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The diffusers side (`backends/local/bench/diffusers_bench.py`, built into this binary) in a
/// child process in `--serve` mode: built once on the same configs, then asked for one run of a
/// stage at a time (a line on its stdin, a JSON line back).
struct Diffusers {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    script: std::path::PathBuf,
}

impl Diffusers {
    fn start(python: &str, configs: &std::path::Path, a: &BenchArgs) -> anyhow::Result<Self> {
        eprintln!("[bench] building the same models in diffusers/PyTorch ({python})");
        let script = std::env::temp_dir().join(format!(
            "kleingate-diffusers-bench-{}.py",
            std::process::id()
        ));
        std::fs::write(&script, bench::DIFFUSERS_SCRIPT).context("writing the diffusers script")?;
        let device = if a.device == "cpu" { "cpu" } else { "cuda" };
        let threads = a
            .threads
            .unwrap_or_else(kleingate_local::device::cpu_threads);
        let child = std::process::Command::new(python)
            .arg(&script)
            .args(["--configs".as_ref(), configs.as_os_str()])
            .args(["--width", &a.width.to_string()])
            .args(["--height", &a.height.to_string()])
            .args(["--seq-len", &a.seq_len.to_string()])
            .args(["--threads", &threads.to_string()])
            .args(["--device", device])
            .args(["--dtype", a.precision().name()])
            .arg("--serve")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&script);
                return Err(e).with_context(|| format!("running {python}"));
            }
        };
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("no pipes to the diffusers benchmark");
        };
        let mut d = Diffusers {
            child,
            stdin,
            stdout: std::io::BufReader::new(stdout),
            script,
        };
        let ready = d.answer()?;
        if ready["ready"] != true {
            bail!("the diffusers benchmark did not start: {ready}");
        }
        Ok(d)
    }

    /// Its next line, as JSON; an error if it exited (its stderr is ours, so the reason is above).
    fn answer(&mut self) -> anyhow::Result<serde_json::Value> {
        use std::io::BufRead;
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .context("reading from the diffusers benchmark")?;
        if line.is_empty() {
            let status = self
                .child
                .wait()
                .context("waiting for the diffusers benchmark")?;
            bail!("the diffusers benchmark stopped ({status}); see its output above");
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("the diffusers benchmark said {:?}", line.trim()))?;
        if let Some(e) = v.get("error") {
            bail!("the diffusers benchmark: {e}");
        }
        Ok(v)
    }

    fn ask(&mut self, request: &str) -> anyhow::Result<serde_json::Value> {
        use std::io::Write;
        writeln!(self.stdin, "{request}")
            .and_then(|()| self.stdin.flush())
            .context("writing to the diffusers benchmark")?;
        self.answer()
    }

    /// Ends the child and returns its report with the stages' medians (as the standalone script
    /// prints it) and the paired ratios.
    fn finish(mut self, ours: &BenchReport) -> anyhow::Result<serde_json::Value> {
        let mut theirs = self.ask("end")?;
        let _ = self.child.wait();
        let stages: serde_json::Map<String, serde_json::Value> = ours
            .stages
            .iter()
            .filter_map(|s| Some((s.name.to_string(), ms(s.partner.as_ref()?.median).into())))
            .collect();
        let ratios: serde_json::Map<String, serde_json::Value> = ours
            .stages
            .iter()
            .filter_map(|s| {
                let p = s.partner.as_ref()?;
                Some((
                    s.name.to_string(),
                    serde_json::json!({
                        "median": p.ratio, "min": p.ratio_range.0, "max": p.ratio_range.1,
                    }),
                ))
            })
            .collect();
        theirs["stages"] = stages.into();
        theirs["ratios"] = ratios.into();
        Ok(theirs)
    }
}

impl bench::Partner for Diffusers {
    fn run(&mut self, stage: &str) -> Result<Duration, kleingate_local::EngineError> {
        let v = self
            .ask(&format!("run {stage}"))
            .map_err(|e| kleingate_local::EngineError::Compared(format!("{e:#}")))?;
        match v["ms"].as_f64() {
            Some(t) if t.is_finite() && t >= 0.0 => Ok(Duration::from_secs_f64(t / 1e3)),
            _ => Err(kleingate_local::EngineError::Compared(format!(
                "the diffusers benchmark answered {v} for {stage}"
            ))),
        }
    }
}

impl Drop for Diffusers {
    /// Never leave the child behind, whatever ended the run early.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.script);
    }
}

fn print_comparison(a: &BenchArgs, r: &BenchReport, theirs: &serde_json::Value) {
    println!(
        "kleingate bench-engine vs diffusers {} / torch {}: {}x{}, {} prompt tokens, device {}, {}, {} threads, random weights, median of {} runs each side, timed in pairs back to back",
        theirs["versions"]["diffusers"].as_str().unwrap_or("?"),
        theirs["versions"]["torch"].as_str().unwrap_or("?"),
        a.width,
        a.height,
        a.seq_len,
        a.device,
        a.precision(),
        theirs["threads"],
        a.iters.max(1)
    );
    println!(
        "| stage | kleingate ms | diffusers ms | kleingate / diffusers (median of pairs) | lowest-highest pair |"
    );
    println!("|---|---|---|---|---|");
    for s in &r.stages {
        let (o, ratio, range) = match &s.partner {
            Some(p) => (
                format!("{:.1}", ms(p.median)),
                format!("{:.2}x", p.ratio),
                format!("{:.2}-{:.2}x", p.ratio_range.0, p.ratio_range.1),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "| {} | {:.1} | {o} | {ratio} | {range} |",
            s.name,
            ms(s.median)
        );
    }
    let gib = |b: f64| b / (1u64 << 30) as f64;
    let ours = r
        .peak_reserved_bytes
        .or_else(bench::peak_rss_bytes)
        .map(|b| b as f64);
    println!(
        "peak memory ({}): kleingate {}, diffusers {:.2} GiB",
        if a.device == "cpu" { "RSS" } else { "device" },
        ours.map_or("-".into(), |b| format!("{:.2} GiB", gib(b))),
        gib(theirs["peak_memory_bytes"].as_f64().unwrap_or(0.0))
    );
    print_memory(r);
    print_step_ops(r, theirs["stages"]["transformer step"].as_f64());
}

/// Weights held per model, and each stage's peak memory.
fn print_memory(r: &BenchReport) {
    let size = |b: u64| {
        if b >= 1 << 30 {
            format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
        } else {
            format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
        }
    };
    let total: u64 = r.weight_bytes.iter().map(|(_, b)| b).sum();
    let offload = r.text_encoder == kleingate_local::pipeline::TextEncoderMode::Offload;
    let parts: Vec<String> = r
        .weight_bytes
        .iter()
        .map(|(n, b)| {
            let note = if offload && *n == "text encoder" {
                " (offloaded: only during its stage)"
            } else {
                ""
            };
            format!("{n} {}{note}", size(*b))
        })
        .collect();
    println!(
        "weights on the device: {} (total {})",
        parts.join(", "),
        size(total)
    );
    let peaks: Vec<String> = r
        .stages
        .iter()
        .filter_map(|s| s.peak_bytes.map(|b| format!("{} {}", s.name, size(b))))
        .collect();
    if !peaks.is_empty() {
        let what = if r.peak_reserved_bytes.is_some() {
            "device memory reserved"
        } else {
            "peak RSS"
        };
        println!("{what} by stage: {}", peaks.join(", "));
    }
}

fn json(a: &BenchArgs, r: &BenchReport) -> serde_json::Value {
    serde_json::json!({
        "model": a.model.id(),
        "device": a.device,
        "dtype": a.precision().name(),
        "threads": kleingate_local::device::cpu_threads(),
        "width": a.width,
        "height": a.height,
        "seq_len": a.seq_len,
        "random_weights": a.random_weights,
        "load_ms": ms(r.load_time),
        "stages": r.stages.iter().map(|s| serde_json::json!({
            "stage": s.name, "median_ms": ms(s.median), "min_ms": ms(s.min),
            "peak_bytes": s.peak_bytes,
        })).collect::<Vec<_>>(),
        "weight_bytes": r.weight_bytes.iter().map(|(n, b)| (n.to_string(), serde_json::Value::from(*b))).collect::<serde_json::Map<String, serde_json::Value>>(),
        "peak_reserved_bytes": r.peak_reserved_bytes,
        "cpu_peak_gflop_per_s": r.cpu_peak_gflop_per_s,
        "cpu_fma_lanes": r.cpu_peak_gflop_per_s.map(|_| r.cpu_fma_lanes),
        "step_ops": r.step_ops.iter().map(|o| serde_json::json!({
            "kind": o.kind, "ms": ms(o.time), "gflop": o.flops / 1e9, "gflop_per_s": o.gflop_per_s(),
        })).collect::<Vec<_>>(),
    })
}

fn print_table(a: &BenchArgs, r: &BenchReport, with_reference: bool) {
    println!(
        "kleingate bench-engine: {} {}x{}, {} prompt tokens, device {}, {}, {} weights, median of {}",
        a.model,
        a.width,
        a.height,
        a.seq_len,
        a.device,
        a.precision(),
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
        None => println!("peak device memory: not reported by this backend (peak RSS below)"),
    }
    print_memory(r);
    print_step_ops(r, None);
}

/// One transformer step by op kind: time, share, operation count and rate, against the CPU's
/// peak where measured; with `diffusers_step_ms`, diffusers' rate on the same operations.
fn print_step_ops(r: &BenchReport, diffusers_step_ms: Option<f64>) {
    let Some(step) = r.stages.iter().find(|s| s.name == "transformer step") else {
        return;
    };
    let total = ms(step.median);
    if total <= 0.0 {
        return;
    }
    let of_peak = |rate: f64| {
        r.cpu_peak_gflop_per_s
            .map(|p| format!(" = {:.0}% of peak", 100.0 * rate / p))
            .unwrap_or_default()
    };
    let known: f64 = r.step_ops.iter().map(|o| ms(o.time)).sum();
    println!("one transformer step by op kind (each op alone at its real shape):");
    for o in &r.step_ops {
        println!(
            "  {:<18} {:>9.1} ms  {:>5.1}%  {:.1} GFLOP at {:.0} GFLOP/s{}",
            o.kind,
            ms(o.time),
            100.0 * ms(o.time) / total,
            o.flops / 1e9,
            o.gflop_per_s(),
            of_peak(o.gflop_per_s())
        );
    }
    println!(
        "  {:<18} {:>9.1} ms  {:>5.1}%  (norms, RoPE, modulation, residuals, layout)",
        "other",
        (total - known).max(0.0),
        100.0 * (total - known).max(0.0) / total
    );
    let flops: f64 = r.step_ops.iter().map(|o| o.flops).sum();
    let rate = flops / (total / 1e3) / 1e9;
    let theirs = diffusers_step_ms
        .filter(|d| *d > 0.0)
        .map(|d| format!("; diffusers {:.0} GFLOP/s", flops / (d / 1e3) / 1e9))
        .unwrap_or_default();
    println!(
        "  whole step: {:.1} GFLOP at {rate:.0} GFLOP/s{}{theirs}",
        flops / 1e9,
        of_peak(rate)
    );
    if let Some(p) = r.cpu_peak_gflop_per_s {
        println!(
            "  peak: {p:.0} GFLOP/s ({}-lane FMA on every thread of the pool, measured in this run)",
            r.cpu_fma_lanes
        );
    }
}
