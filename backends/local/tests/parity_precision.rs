//! The pipeline in reduced precision. bf16: against what diffusers itself produces when the same
//! pipeline runs in bf16 (`cases/<case>.bf16.png`, `bf16.json`): the rounding points of the
//! reference (the timestep's three roundings, latents kept in bf16, the Euler step in f32 then
//! rounded, norms and RoPE in f32) are reproduced, so our bf16 images land near theirs while both
//! are far from the f32 images on these tiny random models (PSNR 17-32 dB, see bf16.json). f16:
//! no diffusers reference, so against the f32 reference, at a tolerance measured and justified
//! below.

mod fixture;

use burn::tensor::Device;
use fixture::{psnr, Case};
use kleingate_local::image_io::Rgb8;
use kleingate_local::pipeline::{LoadOptions, Pipeline, TextEncoderMode};
use kleingate_local::precision::Precision;
use kleingate_local::schedule::{model_timestep, Schedule};
use serde_json::Value;

/// Run `case` through `pipe` and return its images as 8-bit RGB, one per prompt.
fn run(pipe: &Pipeline, case: &Case) -> Vec<Rgb8> {
    let req = case.request(&pipe.device);
    let out = pipe.generate(&req, &mut |_| true).unwrap();
    let [b, h, w, _] = out.images.dims();
    let v = out.images.into_data().try_to_vec::<f32>().unwrap();
    (0..b)
        .map(|i| Rgb8::from_unit_floats(&v[i * h * w * 3..(i + 1) * h * w * 3], w, h))
        .collect()
}

fn png(root: &std::path::Path, path: &str) -> Vec<u8> {
    image::open(root.join(path)).unwrap().to_rgb8().into_raw()
}

#[test]
fn bf16_images_match_diffusers_in_bf16() {
    for root in fixture::roots() {
        bf16_matches_diffusers(&root);
    }
}

fn bf16_matches_diffusers(root: &std::path::Path) {
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("bf16.json")).unwrap()).unwrap();
    let device = Device::flex();
    let pipe = Pipeline::load_in(&root.join("pipeline"), &device, Precision::Bf16).unwrap();
    assert_eq!(pipe.precision, Precision::Bf16);
    let cases = meta["cases"].as_object().unwrap();
    assert!(!cases.is_empty());
    for (name, c) in cases {
        let case = Case::load_in(root, name);
        let req = case.request(&device);

        // The timestep each step's sinusoid receives, rounded as diffusers' bf16 pipeline does.
        let m = pipe.size_multiple();
        let sched = Schedule::new(req.steps, (req.width / m) * (req.height / m));
        let ours: Vec<f32> = sched
            .timesteps
            .iter()
            .map(|&t| model_timestep(t, Precision::Bf16))
            .collect();
        let theirs: Vec<f32> = c["timesteps"]["time_embedding_input"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(ours, theirs, "{name}: time embedding inputs");

        let images = run(&pipe, &case);
        let pngs: Vec<&str> = c["files"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|f| f.as_str().filter(|f| f.ends_with(".png")))
            .collect();
        assert_eq!(pngs.len(), images.len(), "{name}");
        // The bar: 35 dB without guidance, 30 dB with it (guidance amplifies every
        // difference; diffusers' own bf16 images on other CPU kernel paths are >= 43.8 dB apart).
        let bar = if req.cfg { 30.0 } else { 35.0 };
        for (img, file) in images.iter().zip(pngs) {
            let p = psnr(&img.data, &png(root, file));
            let f32_gap = c["png_psnr_db"].as_f64().unwrap();
            eprintln!(
                "{name}: bf16 vs diffusers bf16 PSNR {p:.2} dB (bar {bar}); diffusers bf16 vs f32 {f32_gap:.2} dB"
            );
            assert!(
                p >= bar,
                "{name}: PSNR {p:.2} dB against diffusers' bf16 image, below {bar} dB"
            );
        }
    }
}

/// f16 has 11 significant bits to bf16's 8, and the reference never ran the pipeline in f16, so
/// the f32 reference image is the yardstick. Measured: 35.7-42.8 dB on the shipped fixtures and
/// 32.3-55.2 dB on a second fixture set of other shapes (RMS error up to 6.2 levels of 255): f16
/// rounds 8x finer than bf16, and diffusers' own bf16 run is 17-32 dB from its f32 run on these
/// chaotic random models (bf16.json). The bar, 28 dB (RMS 10 levels), leaves 1.6x the largest
/// measured error for other shapes and kernel orders; a broken f16 path (overflow, a lost
/// scale) lands far below it.
#[test]
fn f16_images_stay_near_the_f32_reference() {
    for root in fixture::roots() {
        f16_near_f32(&root);
    }
}

fn f16_near_f32(root: &std::path::Path) {
    let device = Device::flex();
    let pipe = Pipeline::load_in(&root.join("pipeline"), &device, Precision::F16).unwrap();
    for name in fixture::GENERATION_CASES {
        let case = Case::load_in(root, name);
        let images = run(&pipe, &case);
        let files = case.json["output_png"].as_array().unwrap();
        assert_eq!(files.len(), images.len());
        for (img, file) in images.iter().zip(files) {
            let p = psnr(
                &img.data,
                &png(root, &format!("cases/{}", file.as_str().unwrap())),
            );
            eprintln!("{name}: f16 vs f32 reference PSNR {p:.2} dB");
            assert!(p >= 28.0, "{name}: f16 image at {p:.2} dB from f32");
        }
    }
}

/// Weights are held in the compute dtype: half the bytes of f32 in bf16, and a bf16 model's
/// weights are the stored values (the tiny checkpoint is f32, so they are rounded once).
#[test]
fn weights_are_held_in_the_compute_dtype() {
    let device = Device::flex();
    let f32p = Pipeline::load(&fixture::pipeline(), &device).unwrap();
    let bf16p = Pipeline::load_in(&fixture::pipeline(), &device, Precision::Bf16).unwrap();
    for (a, b) in [
        (
            f32p.transformer.weight_bytes(),
            bf16p.transformer.weight_bytes(),
        ),
        (
            f32p.text_encoder.as_ref().unwrap().weight_bytes(),
            bf16p.text_encoder.as_ref().unwrap().weight_bytes(),
        ),
        (f32p.vae.weight_bytes(), bf16p.vae.weight_bytes()),
    ] {
        assert!(a > 0);
        assert_eq!(a, 2 * b);
    }
}

/// An offloaded text encoder is off the device between requests and gives the same images.
#[test]
fn an_offloaded_text_encoder_gives_the_same_images() {
    let device = Device::flex();
    let dir = fixture::pipeline();
    let resident = Pipeline::load_in(&dir, &device, Precision::Bf16).unwrap();
    let offload = Pipeline::load_with(
        &dir,
        &device,
        LoadOptions {
            precision: Precision::Bf16,
            text_encoder: TextEncoderMode::Offload,
        },
    )
    .unwrap();
    assert_eq!(offload.text_encoder_mode(), TextEncoderMode::Offload);
    assert!(offload.text_encoder.is_none());
    let te_bytes = resident.text_encoder.as_ref().unwrap().weight_bytes();
    assert_eq!(
        resident.resident_weight_bytes() - offload.resident_weight_bytes(),
        te_bytes
    );
    for name in ["t2i_base_cfg", "edit_1ref"] {
        let case = Case::load(name);
        let a = run(&resident, &case);
        let b = run(&offload, &case);
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(
                x.data, y.data,
                "{name}: offloaded text encoder changed the image"
            );
        }
    }
}
