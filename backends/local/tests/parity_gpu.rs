//! The GPU code path: the tiny pipeline on burn's `wgpu` backend (WGSL through naga) or `vulkan`
//! (CubeCL's SPIR-V), chosen by `KLEINGATE_TEST_DEVICE` (default `wgpu`), against the diffusers
//! reference. Built only with those features; CI runs it on Mesa's lavapipe, a software Vulkan
//! device (`.ci/run`), with the Khronos validation layer writing to a log this test reads: an
//! invalid shader or API misuse fails the test instead of crashing a driver later.
//!
//! Cases: text-to-image distilled, base with classifier-free guidance (batch 2), one-reference
//! edit; in f32 and in f16 (lavapipe has no bf16 arithmetic). CubeCL's autotuner is set to its
//! minimal level unless `CUBECL_AUTOTUNE_LEVEL` says otherwise: on a software device every
//! candidate kernel is compiled by LLVM, and the default level's matmul candidates alone took
//! longer than 15 minutes.

#![cfg(any(feature = "wgpu", feature = "vulkan"))]

mod fixture;

use std::path::PathBuf;
use std::time::Instant;

use fixture::Case;
use kleingate_local::image_io::Rgb8;
use kleingate_local::pipeline::Pipeline;
use kleingate_local::precision::Precision;

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    if mse == 0.0 {
        return f64::INFINITY;
    }
    10.0 * (255.0f64 * 255.0 / mse).log10()
}

/// The validation layer's log, when `KLEINGATE_TEST_VALIDATE=1` (set before the device exists:
/// the Vulkan loader reads these at instance creation).
fn enable_validation() -> Option<PathBuf> {
    if std::env::var("KLEINGATE_TEST_VALIDATE").ok().as_deref() != Some("1") {
        return None;
    }
    let log = std::env::temp_dir().join(format!(
        "kleingate-vk-validation-{}.log",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&log);
    std::env::set_var("VK_INSTANCE_LAYERS", "VK_LAYER_KHRONOS_validation");
    std::env::set_var(
        "VK_KHRONOS_VALIDATION_DEBUG_ACTION",
        "VK_DBG_LAYER_ACTION_LOG_MSG",
    );
    std::env::set_var("VK_KHRONOS_VALIDATION_REPORT_FLAGS", "error");
    std::env::set_var("VK_KHRONOS_VALIDATION_LOG_FILENAME", &log);
    // CubeCL's own switch for its Vulkan runtime.
    std::env::set_var("CUBECL_VULKAN_VALIDATE", "1");
    Some(log)
}

#[test]
fn gpu_pipeline_matches_the_reference() {
    let name = std::env::var("KLEINGATE_TEST_DEVICE").unwrap_or_else(|_| "wgpu".into());
    if std::env::var_os("CUBECL_AUTOTUNE_LEVEL").is_none() {
        std::env::set_var("CUBECL_AUTOTUNE_LEVEL", "minimal");
    }
    let validation = enable_validation();
    let device = kleingate_local::device::by_name(&name).unwrap();
    for precision in [Precision::F32, Precision::F16] {
        let pipe = Pipeline::load_in(&fixture::pipeline(), &device, precision).unwrap();
        for case_name in ["t2i_distilled", "t2i_base_cfg", "edit_1ref"] {
            let case = Case::load(case_name);
            let mut req = case.request(&device);
            req.keep_intermediates = false;
            let t = Instant::now();
            let out = pipe.generate(&req, &mut |_, _| true).unwrap();
            let [_, h, w, _] = out.images.dims();
            let v = out.images.into_data().try_to_vec::<f32>().unwrap();
            let ours = Rgb8::from_unit_floats(&v, w, h);
            let file = case.json["output_png"][0].as_str().unwrap();
            let reference = image::open(fixture::root().join("cases").join(file))
                .unwrap()
                .to_rgb8();
            let max = ours
                .data
                .iter()
                .zip(reference.as_raw())
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            let p = psnr(&ours.data, reference.as_raw());
            eprintln!(
                "{name} {precision} {case_name}: PSNR {p:.2} dB, max {max}/255 against the f32 reference ({:.1} s)",
                t.elapsed().as_secs_f64()
            );
            match precision {
                // The device's f32 arithmetic (other summation orders, fused multiply-adds)
                // against diffusers' on a CPU: the CPU engine's bar.
                Precision::F32 => assert!(max <= 2, "{name} {case_name}: {max}/255 off"),
                // The CPU engine's f16 bar (see parity_precision.rs).
                _ => assert!(p >= 28.0, "{name} f16 {case_name}: {p:.2} dB"),
            }
        }
    }
    if let Some(log) = validation {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let errors: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("Validation Error"))
            .collect();
        assert!(
            errors.is_empty(),
            "{} validation errors, first: {}",
            errors.len(),
            errors[0]
        );
        eprintln!("validation layer: no errors ({} bytes of log)", text.len());
        let _ = std::fs::remove_file(log);
    }
}
