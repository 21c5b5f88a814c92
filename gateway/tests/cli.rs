//! The `kleingate` binary itself: start-up from a config file, `--listen`, readiness, SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The tiny reference pipeline and its recorded cases.
#[cfg(feature = "local")]
const KLEIN_TINY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../backends/local/tests/data/klein-tiny"
);

fn get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn serves_from_a_config_file_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("k.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:1\"\n[backends.verda]\nkind = \"verda\"\nbase_url = \"http://127.0.0.1:9\"\napi_key_env = \"KLEINGATE_CLI_TEST_KEY\"\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kleingate"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0"])
        .env("KLEINGATE_CLI_TEST_KEY", "sk-very-secret-token")
        .env("RUST_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("kleingate listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_owned();
    assert!(get(&addr, "/healthz").starts_with("HTTP/1.1 200"));
    let models = get(&addr, "/v1/models");
    assert!(models.contains("flux2-klein-base-9b"), "{models}");
    // The backend is unreachable, but passive health does not know that until a request fails.
    assert!(get(&addr, "/readyz").starts_with("HTTP/1.1 200"));

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "exit status {:?}", out.status);
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(logs.contains("draining"), "{logs}");
    assert!(
        !logs.contains("sk-very-secret-token"),
        "the token leaked into the logs"
    );
}

#[test]
fn a_bad_config_fails_at_start_up_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("k.toml");
    std::fs::write(
        &cfg,
        "[backends.verda]\nkind = \"verda\"\nbase_ur = \"http://x\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kleingate"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("base_ur"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_kleingate"))
        .args([
            "check-config",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/kleingate.example.toml"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"policy\": \"priority\""));
}

/// `kleingate generate` end to end on the tiny reference pipeline: the PNG it writes from the
/// recorded initial noise equals the reference's PNG within 2/255.
#[cfg(feature = "local")]
#[test]
fn generate_reproduces_the_reference_image() {
    let fixtures = KLEIN_TINY;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fox.png");
    let run = Command::new(env!("CARGO_BIN_EXE_kleingate"))
        .args([
            "generate",
            "--weights",
            &format!("{fixtures}/pipeline"),
            "--model",
            "flux2-klein-4b",
        ])
        .args([
            "--prompt",
            "A small cactus with a happy face in the Sahara desert.",
        ])
        .args([
            "--width",
            "64",
            "--height",
            "64",
            "--max-sequence-length",
            "64",
        ])
        .args([
            "--init-noise",
            &format!("{fixtures}/cases/t2i_distilled.safetensors"),
        ])
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let ours = image::open(&out).unwrap().to_rgb8();
    let reference = image::open(format!("{fixtures}/cases/t2i_distilled.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(ours.dimensions(), reference.dimensions());
    let worst = ours
        .as_raw()
        .iter()
        .zip(reference.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(worst <= 2, "differs by {worst}/255");

    // The distilled model's rules hold on the command line too.
    let bad = Command::new(env!("CARGO_BIN_EXE_kleingate"))
        .args([
            "generate",
            "--weights",
            &format!("{fixtures}/pipeline"),
            "--prompt",
            "x",
            "--steps",
            "8",
            "-o",
        ])
        .arg(dir.path().join("x.png"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("exactly 4 steps"));
    // A missing weights directory is a clear error, not a panic.
    let bad = Command::new(env!("CARGO_BIN_EXE_kleingate"))
        .args([
            "generate",
            "--weights",
            "/nonexistent/klein",
            "--prompt",
            "x",
            "-o",
            "/tmp/never.png",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("/nonexistent/klein") && !err.contains("panicked"),
        "{err}"
    );
}

/// Broken checkpoints fail with the file and tensor named.
#[cfg(feature = "local")]
#[test]
fn generate_names_the_broken_weight() {
    let fixtures = &format!("{KLEIN_TINY}/pipeline");
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("pipeline");
    let status = Command::new("cp")
        .args(["-r", fixtures])
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    // A config that no longer matches the weights.
    let cfg = copy.join("transformer/config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"mlp_ratio\": 3.0", "\"mlp_ratio\": 4.0");
    std::fs::write(&cfg, text).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_kleingate"))
        .args(["generate", "--weights"])
        .arg(&copy)
        .args([
            "--prompt",
            "x",
            "--width",
            "64",
            "--height",
            "64",
            "-o",
            "/tmp/never.png",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        err.contains("transformer_blocks.0.ff.linear_in.weight") && err.contains("shape"),
        "{err}"
    );
    // A truncated weight file.
    let vae = copy.join("vae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&vae).unwrap();
    std::fs::write(&vae, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(
        &cfg,
        std::fs::read_to_string(format!("{fixtures}/transformer/config.json")).unwrap(),
    )
    .unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_kleingate"))
        .args(["generate", "--weights"])
        .arg(&copy)
        .args([
            "--prompt",
            "x",
            "--width",
            "64",
            "--height",
            "64",
            "-o",
            "/tmp/never.png",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        err.contains("diffusion_pytorch_model.safetensors") && !err.contains("panicked"),
        "{err}"
    );
}

/// Editing from the command line: the size comes from the reference, and the image equals the
/// reference pipeline's within 2/255.
#[cfg(feature = "local")]
#[test]
fn generate_edits_with_a_reference_image() {
    let fixtures = KLEIN_TINY;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("edit.png");
    let run = Command::new(env!("CARGO_BIN_EXE_kleingate"))
        .args([
            "generate",
            "--weights",
            &format!("{fixtures}/pipeline"),
            "--model",
            "flux2-klein-4b",
        ])
        .args([
            "--prompt",
            "Turn the image into an oil painting with thick brush strokes.",
        ])
        .args([
            "--input-image",
            &format!("{fixtures}/cases/edit_1ref.ref0.png"),
            "--max-sequence-length",
            "64",
        ])
        .args([
            "--init-noise",
            &format!("{fixtures}/cases/edit_1ref.safetensors"),
        ])
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let ours = image::open(&out).unwrap().to_rgb8();
    let reference = image::open(format!("{fixtures}/cases/edit_1ref.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(ours.dimensions(), (80, 64));
    let worst = ours
        .as_raw()
        .iter()
        .zip(reference.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(worst <= 2, "differs by {worst}/255");
}

#[cfg(feature = "local")]
#[test]
fn bench_engine_times_every_stage_on_random_weights() {
    let configs = &format!("{KLEIN_TINY}/pipeline");
    let bench = |extra: &[&str]| -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_kleingate"))
            .args(["bench-engine", "--random-weights", "--configs", configs])
            .args(["--width", "64", "--height", "48", "--seq-len", "32"])
            .args(["--warmup", "0", "--iters", "1", "--json"])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // bf16 with the text encoder offloaded: half the weight bytes of f32, model by model.
    let f32 = bench(&[]);
    let v = bench(&["--dtype", "bf16", "--text-encoder", "offload"]);
    assert_eq!(
        (f32["dtype"].as_str(), v["dtype"].as_str()),
        (Some("f32"), Some("bf16"))
    );
    for part in ["text encoder", "transformer", "VAE"] {
        let (a, b) = (
            f32["weight_bytes"][part].as_u64().unwrap(),
            v["weight_bytes"][part].as_u64().unwrap(),
        );
        assert!(b > 0 && a == 2 * b, "{part}: f32 {a} bytes, bf16 {b}");
    }
    let stages: Vec<&str> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            assert!(s["median_ms"].as_f64().unwrap() > 0.0, "{s}");
            // On the CPU: the stage's peak resident set.
            assert!(s["peak_bytes"].as_u64().unwrap() > 1 << 20, "{s}");
            s["stage"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        stages,
        [
            "text encoder",
            "transformer step",
            "CFG step (batch 2)",
            "VAE decode",
            "VAE encode",
            "distilled image (4 steps)"
        ]
    );
    assert_eq!(v["step_ops"].as_array().unwrap().len(), 2);
    for op in v["step_ops"].as_array().unwrap() {
        // The operation count comes from the config, the rate from the measured time.
        assert!(op["gflop"].as_f64().unwrap() > 0.0, "{op}");
        assert!(op["gflop_per_s"].as_f64().unwrap() > 0.0, "{op}");
    }
    // The CPU's FMA peak is measured in the same run wherever AVX2 + FMA exist.
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        assert!(v["cpu_peak_gflop_per_s"].as_f64().unwrap() > 0.0, "{v}");
    }
    // A size the VAE cannot take is refused with the reason.
    let bad = Command::new(env!("CARGO_BIN_EXE_kleingate"))
        .args(["bench-engine", "--random-weights", "--configs", configs])
        .args(["--width", "60", "--iters", "1", "--warmup", "0"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("multiples of 16"));
}

/// `--compare-diffusers PYTHON` hands the diffusers script the same configs, shapes, threads and
/// dtype, then times every stage on both sides in pairs, back to back, warm-up included, and
/// prints kleingate's time per stage as a ratio to theirs. PyTorch is a 4 GB install, too much for
/// CI: an interpreter stand-in checks what it was given and speaks the script's `--serve`
/// protocol (the real script is run by hand; docs/engine.md).
#[cfg(feature = "local")]
#[test]
fn bench_engine_compares_with_diffusers_stage_by_stage() {
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("args.txt");
    let runs = dir.path().join("runs.txt");
    let python = dir.path().join("python");
    std::fs::write(
        &python,
        format!(
            "#!/bin/sh\necho \"$@\" > {seen}\nconfigs=$(echo \"$@\" | sed 's/.*--configs \\([^ ]*\\).*/\\1/')\n\
             test -f \"$configs/transformer/config.json\" || exit 3\n\
             echo '{{\"ready\": true}}'\n\
             while read -r cmd stage; do case \"$cmd\" in\n\
             run) echo \"$stage\" >> {runs}; echo '{{\"ms\": 1000}}';;\n\
             end) echo '{{\"peak_memory_bytes\": 1073741824, \"threads\": 1, \"versions\": {{\"torch\": \"t\", \"diffusers\": \"0.42.1\", \"transformers\": \"x\"}}}}'; exit 0;;\n\
             esac; done\n",
            seen = seen.display(),
            runs = runs.display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&python, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let configs = &format!("{KLEIN_TINY}/pipeline");
    let run = |json: bool, python: &std::path::Path| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kleingate"));
        c.args(["bench-engine", "--random-weights", "--configs", configs])
            .args(["--width", "64", "--height", "48", "--seq-len", "32"])
            .args(["--warmup", "1", "--iters", "2", "--threads", "1"])
            .arg("--compare-diffusers")
            .arg(python);
        if json {
            c.arg("--json");
        }
        c.output().unwrap()
    };
    let out = run(true, &python);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let args = std::fs::read_to_string(&seen).unwrap();
    for want in [
        "--width 64",
        "--height 48",
        "--seq-len 32",
        "--threads 1",
        "--device cpu",
        "--dtype f32",
        "--serve",
    ] {
        assert!(args.contains(want), "{want} not in: {args}");
    }
    // Every stage, in the order ours ran: one warm-up and two timed runs each, one per pair.
    let asked = std::fs::read_to_string(&runs).unwrap();
    let stages = [
        "text encoder",
        "transformer step",
        "CFG step (batch 2)",
        "VAE decode",
        "VAE encode",
        "distilled image (4 steps)",
    ];
    let want: Vec<&str> = stages.iter().flat_map(|s| [*s; 3]).collect();
    assert_eq!(asked.lines().collect::<Vec<_>>(), want);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["diffusers"]["stages"]["VAE decode"], 1000.0);
    assert_eq!(v["threads"], 1);
    // Against a constant 1000 ms the pair ratios are our runs over 1000.
    let ours = v["stages"].as_array().unwrap();
    let decode = ours.iter().find(|s| s["stage"] == "VAE decode").unwrap();
    let ratio = &v["diffusers"]["ratios"]["VAE decode"];
    let close = |a: &serde_json::Value, b: f64| (a.as_f64().unwrap() - b).abs() < 1e-9;
    assert!(
        close(
            &ratio["median"],
            decode["median_ms"].as_f64().unwrap() / 1000.0
        ),
        "{ratio} {decode}"
    );
    assert!(
        close(&ratio["min"], decode["min_ms"].as_f64().unwrap() / 1000.0),
        "{ratio} {decode}"
    );
    assert!(ratio["max"].as_f64() >= ratio["median"].as_f64());
    // The table: one row per stage with the ratio and its range, and both peaks.
    std::fs::remove_file(&runs).unwrap();
    let out = run(false, &python);
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text
        .lines()
        .find(|l| l.starts_with("| VAE decode |"))
        .unwrap_or_else(|| panic!("{text}"));
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    let ours: f64 = cells[2].parse().unwrap();
    assert_eq!(cells[3], "1000.0");
    assert_eq!(cells[4], format!("{:.2}x", ours / 1000.0));
    assert!(cells[5].ends_with('x') && cells[5].contains('-'), "{row}");
    assert!(text.contains("diffusers 1.00 GiB"), "{text}");
    // The step's operations at both sides' rates.
    let whole = text
        .lines()
        .find(|l| l.trim_start().starts_with("whole step:"))
        .unwrap_or_else(|| panic!("{text}"));
    // "... GFLOP/s [= N% of peak]; diffusers M GFLOP/s": the stand-in's 1000 ms step.
    assert!(
        whole.contains("; diffusers ") && whole.ends_with(" GFLOP/s"),
        "{whole}"
    );

    // A diffusers side that dies mid-run, or answers an error, ends the benchmark with a clear
    // error, not a hang or a table with holes.
    for (name, body) in [
        ("dies", "echo '{\"ready\": true}'; read -r line; exit 7"),
        (
            "refuses",
            "echo '{\"ready\": true}'; read -r line; echo '{\"error\": \"no such stage\"}'",
        ),
        (
            "never starts",
            "echo 'Traceback: no module named torch' >&2; exit 1",
        ),
    ] {
        let bad = dir.path().join(name.replace(' ', "-"));
        std::fs::write(&bad, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let out = run(false, &bad);
        assert!(!out.status.success(), "{name}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("diffusers benchmark"), "{name}: {err}");
    }
}

/// `kleingate generate` checks its request by the API's own rules before loading anything, and
/// names the flag to blame.
#[cfg(feature = "local")]
#[test]
fn generate_checks_the_request_by_the_protocols_rules() {
    let png = format!("{KLEIN_TINY}/cases/edit_1ref.ref0.png");
    let cases: [(&[&str], &str); 3] = [
        (&["--width", "65"], "multiple of 16"),
        (
            &["--model", "flux2-klein-9b", "--guidance", "3.5"],
            "guidance 1.0",
        ),
        (
            &[
                "--input-image",
                &png,
                "--input-image",
                &png,
                "--input-image",
                &png,
                "--input-image",
                &png,
                "--input-image",
                &png,
            ],
            "at most 4",
        ),
    ];
    for (args, needle) in cases {
        let run = Command::new(env!("CARGO_BIN_EXE_kleingate"))
            .args([
                "generate",
                "--weights",
                "/nonexistent/klein",
                "--prompt",
                "x",
            ])
            .args(args)
            .args(["-o", "/tmp/never.png"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{args:?}");
        assert!(err.contains(needle), "{args:?}: {err}");
        // Refused before the weights are looked at.
        assert!(!err.contains("/nonexistent/klein"), "{args:?}: {err}");
        let flag = if args[0] == "--model" {
            "--guidance"
        } else {
            args[0]
        };
        assert!(err.contains(flag), "{args:?} names no flag: {err}");
    }
}

/// The `kleingate.toml` held by a Kubernetes ConfigMap manifest (its `kleingate.toml: |` block).
#[cfg(feature = "local")]
fn configmap_toml(manifest: &str) -> String {
    let text = std::fs::read_to_string(manifest).unwrap();
    let mut lines = text.lines().skip_while(|l| l.trim() != "kleingate.toml: |");
    lines.next().expect("a kleingate.toml block");
    lines
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.get(4..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What k8s/ ships is a config this gateway accepts (kustomize and the schemas check the rest).
#[cfg(feature = "local")]
#[test]
fn the_shipped_kubernetes_configs_load() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["gateway-configmap.yaml", "gpu-worker-configmap.yaml"] {
        let manifest = format!("{}/../k8s/base/{name}", env!("CARGO_MANIFEST_DIR"));
        let toml = configmap_toml(&manifest);
        assert!(toml.contains("[backends."), "{name}: {toml}");
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, toml).unwrap();
        // The gateway Deployment sets the Redis URL from the Secret kleingate-state.
        let out = Command::new(env!("CARGO_BIN_EXE_kleingate"))
            .args(["check-config", "--config"])
            .arg(&path)
            .env(
                "KLEINGATE_STATE__REDIS_URL",
                "redis://:secret@kleingate-redis:6379/0",
            )
            .env(
                "KLEINGATE_STORAGE__URL",
                "postgres://kleingate:secret@kleingate-postgres:5432/kleingate",
            )
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The effective settings it prints never include the Redis or PostgreSQL password.
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(!shown.contains(":secret@"), "{shown}");
        if name == "gateway-configmap.yaml" {
            assert!(shown.contains("kleingate-redis:6379"), "{shown}");
        }
    }
}
