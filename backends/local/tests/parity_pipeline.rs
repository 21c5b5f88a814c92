//! The whole text-to-image pipeline against the reference, from the recorded initial noise: every
//! sampler step (velocity and latents), the final latents, the decoder input, the float image and
//! the PNG. Cases: distilled 64x64, distilled batch of 2 at a non-square 48x32 (one prompt
//! truncated), a base model with classifier-free guidance (5 steps, g = 4), editing with one
//! reference (output size taken from the reference, 80x64 after its centre crop) and two references
//! with CFG.

mod fixture;

use std::collections::HashMap;

use burn::tensor::{Device, Tensor};
use fixture::{assert_close, Case};
use kleingate_local::image_io::Rgb8;
use kleingate_local::pipeline::Progress::{self, Begin, End};
use kleingate_local::pipeline::Stage::{self, Denoise, Step, TextEncoder, VaeDecode, VaeEncode};
use kleingate_local::pipeline::{Pipeline, Request};

fn vals<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

/// Tolerances relative to each tensor's scale (f32 here and in the reference). The transformer
/// output agrees to ~1e-5 per call (see parity_transformer) and the steps measured here stay
/// under 2e-5, so the per-step values are held to 1e-4 and the decoded image to 1e-4 absolute on
/// [0, 1]; the 8-bit PNG may differ by rounding at most: 2/255 is the bar the issue sets.
#[test]
fn text_to_image_matches_the_reference() {
    let device = Device::flex();
    let pipe = Pipeline::load(&fixture::pipeline(), &device).unwrap();
    for name in fixture::GENERATION_CASES {
        let case = Case::load(name);
        let j = &case.json;
        let req = case.request(&device);
        let mut steps_seen = 0;
        let mut stages = Vec::new();
        // Every intermediate value the run hands out, by name, as f32.
        let mut values: HashMap<String, Vec<f32>> = HashMap::new();
        let out = pipe
            .generate_traced(
                &req,
                &mut |p| {
                    stages.push(p);
                    if let Progress::End(Stage::Step { index }) = p {
                        steps_seen = index + 1;
                    }
                    true
                },
                &mut |name, value| {
                    values.insert(name.to_owned(), value.to_f32_vec());
                },
            )
            .unwrap();
        let seen = |name: String| -> &Vec<f32> {
            values
                .get(&name)
                .unwrap_or_else(|| panic!("{name}: no such intermediate value"))
        };
        assert_eq!(steps_seen, req.steps);
        // Every stage begins and ends once, in order, each step inside the denoising loop.
        let mut want = vec![Begin(TextEncoder), End(TextEncoder)];
        if !req.references.is_empty() {
            want.extend([Begin(VaeEncode), End(VaeEncode)]);
        }
        let denoise = Denoise { steps: req.steps };
        want.push(Begin(denoise));
        for index in 0..req.steps {
            want.extend([Begin(Step { index }), End(Step { index })]);
        }
        want.extend([End(denoise), Begin(VaeDecode), End(VaeDecode)]);
        assert_eq!(stages, want, "{name}");
        assert_eq!(
            out.truncated
                .iter()
                .map(|t| serde_json::json!(t))
                .collect::<Vec<_>>(),
            j["truncated"].as_array().unwrap().clone()
        );

        // References: prepared pixels, VAE mean, normalised latents; and the default output size.
        for k in 0..req.references.len() {
            assert_close(
                &format!("{name} ref.{k}.pixels"),
                seen(format!("ref.{k}.pixels")),
                &case.tensor(&format!("ref.{k}.pixels")).0,
                1e-6,
            );
            assert_close(
                &format!("{name} ref.{k}.vae_mean"),
                seen(format!("ref.{k}.vae_mean")),
                &case.tensor(&format!("ref.{k}.vae_mean")).0,
                1e-4,
            );
            assert_close(
                &format!("{name} ref.{k}.latents"),
                seen(format!("ref.{k}.latents")),
                &case.tensor(&format!("ref.{k}.latents")).0,
                1e-4,
            );
        }
        if j["width_arg"].is_null() {
            assert_eq!(
                pipe.output_size(None, None, &req.references).unwrap(),
                (req.width, req.height)
            );
        }
        let (np, np_shape) = case.tensor("steps.noise_pred");
        let (lat, _) = case.tensor("steps.latents");
        let per = np.len() / np_shape[0];
        for i in 0..req.steps {
            assert_close(
                &format!("{name} step {i} noise_pred"),
                seen(format!("steps.{i}.noise_pred")),
                &np[i * per..(i + 1) * per],
                1e-4,
            );
            assert_close(
                &format!("{name} step {i} latents"),
                seen(format!("steps.{i}.latents")),
                &lat[i * per..(i + 1) * per],
                1e-4,
            );
        }
        assert_close(
            &format!("{name} final.latents_unpacked"),
            seen("final.latents_unpacked".into()),
            &case.tensor("final.latents_unpacked").0,
            1e-4,
        );
        assert_close(
            &format!("{name} final.vae_input"),
            seen("final.vae_input".into()),
            &case.tensor("final.vae_input").0,
            1e-4,
        );
        let (img_ref, img_shape) = case.tensor("final.image");
        assert_eq!(out.images.dims().to_vec(), img_shape);
        let img = vals(out.images);
        let worst = img
            .iter()
            .zip(&img_ref)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst < 1e-4, "{name}: final image differs by {worst}");

        // The PNGs the reference wrote, one per image of the batch.
        let (h, w) = (img_shape[1], img_shape[2]);
        for (bi, png) in j["output_png"].as_array().unwrap().iter().enumerate() {
            let path = fixture::root().join("cases").join(png.as_str().unwrap());
            let reference = image::open(&path).unwrap().to_rgb8();
            let ours = Rgb8::from_unit_floats(&img[bi * h * w * 3..(bi + 1) * h * w * 3], w, h);
            assert_eq!(
                (reference.width() as usize, reference.height() as usize),
                (w, h)
            );
            let max = fixture::max_level_diff(&ours.data, reference.as_raw());
            assert!(max <= 2, "{name} image {bi}: PNG differs by {max}/255");
            eprintln!("{name} image {bi}: largest PNG difference {max}/255, float {worst:.2e}");
        }
    }
}

#[test]
fn bad_requests_are_errors() {
    let device = Device::flex();
    let pipe = Pipeline::load(&fixture::pipeline(), &device).unwrap();
    let mut req = Request {
        prompts: vec!["x".into()],
        width: 40,
        height: 32,
        steps: 1,
        guidance: 1.0,
        cfg: false,
        max_sequence_length: 16,
        seed: 1,
        init_noise: None,
        references: vec![],
    };
    let err = |r: &Request| {
        pipe.generate(r, &mut |_| true)
            .err()
            .expect("an error")
            .to_string()
    };
    assert!(err(&req).contains("multiples of 16"));
    req.width = 32;
    req.init_noise = Some(Tensor::zeros([1, 128, 3, 3], &device));
    assert!(err(&req).contains("initial noise"));
    req.init_noise = None;
    // Seeded runs are deterministic.
    let a = vals(pipe.generate(&req, &mut |_| true).unwrap().images);
    let b = vals(pipe.generate(&req, &mut |_| true).unwrap().images);
    assert_eq!(a, b);
    req.seed = 2;
    assert_ne!(a, vals(pipe.generate(&req, &mut |_| true).unwrap().images));
}
