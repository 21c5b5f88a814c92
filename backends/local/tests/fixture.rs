//! Reading the reference fixtures (tensors recorded from diffusers 0.42.1, see
//! tests/data/klein-tiny/README.md) and comparing against them.

#![allow(dead_code)]

use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};
use kleingate_local::pipeline::Request;
use kleingate_local::reference;
use safetensors::SafeTensors;
use serde_json::Value;

/// The fixture directory: `tests/data/klein-tiny`, or `KLEIN_FIXTURE_DIR` to run the same
/// parity tests against a pipeline of other shapes made by the same generator
/// (`make_klein_fixtures.py --preset-file`, then `make_klein_bf16_refs.py`).
pub fn root() -> PathBuf {
    match std::env::var_os("KLEIN_FIXTURE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/klein-tiny"),
    }
}

pub fn pipeline() -> PathBuf {
    root().join("pipeline")
}

/// Every fixture set the reduced-precision tests run on: the shipped klein-tiny and klein-other
/// (a second pipeline of other shapes, `klein-other/preset.json`), or `KLEIN_FIXTURE_DIR` alone.
pub fn roots() -> Vec<PathBuf> {
    if std::env::var_os("KLEIN_FIXTURE_DIR").is_some() {
        return vec![root()];
    }
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    vec![data.join("klein-tiny"), data.join("klein-other")]
}

pub const CASES: [&str; 6] = [
    "t2i_distilled",
    "t2i_distilled_batch2",
    "t2i_base_cfg",
    "edit_1ref",
    "edit_2ref_cfg",
    "vae_roundtrip",
];

/// The cases that run the whole pipeline (all but the VAE round trip).
pub const GENERATION_CASES: [&str; 5] = [
    "t2i_distilled",
    "t2i_distilled_batch2",
    "t2i_base_cfg",
    "edit_1ref",
    "edit_2ref_cfg",
];

/// (values, shape) of the float32 tensor `name` in a safetensors file's bytes.
pub fn f32_tensor(bytes: &[u8], name: &str) -> Option<(Vec<f32>, Vec<usize>)> {
    let st = SafeTensors::deserialize(bytes).ok()?;
    let t = st.tensor(name).ok()?;
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Some((v, t.shape().to_vec()))
}

pub struct Case {
    pub name: String,
    pub root: PathBuf,
    pub json: Value,
    bytes: Vec<u8>,
}

impl Case {
    pub fn load(name: &str) -> Case {
        Self::load_in(&root(), name)
    }

    pub fn load_in(root: &std::path::Path, name: &str) -> Case {
        let dir = root.join("cases");
        let json = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap(),
        )
        .unwrap();
        let bytes = std::fs::read(dir.join(format!("{name}.safetensors"))).unwrap();
        Case {
            name: name.to_owned(),
            root: root.to_path_buf(),
            json,
            bytes,
        }
    }

    pub fn has(&self, tensor: &str) -> bool {
        SafeTensors::deserialize(&self.bytes)
            .unwrap()
            .tensor(tensor)
            .is_ok()
    }

    /// (values, shape) of a recorded float32 tensor.
    pub fn tensor(&self, tensor: &str) -> (Vec<f32>, Vec<usize>) {
        f32_tensor(&self.bytes, tensor)
            .unwrap_or_else(|| panic!("{}: no tensor {tensor}", self.name))
    }

    /// The pipeline request the case recorded: prompts, size, steps, guidance, its reference
    /// images and its initial noise (the intermediate values to compare come through
    /// `Pipeline::generate_traced`).
    pub fn request(&self, device: &Device) -> Request {
        let j = &self.json;
        let prompts: Vec<String> = match &j["prompt"] {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a.iter().map(|p| p.as_str().unwrap().to_owned()).collect(),
            other => panic!("{other}"),
        };
        let (noise, s) = self.tensor("latents.noise");
        Request {
            prompts,
            width: j["width"].as_u64().unwrap() as usize,
            height: j["height"].as_u64().unwrap() as usize,
            steps: j["num_inference_steps"].as_u64().unwrap() as usize,
            guidance: j["guidance_scale"].as_f64().unwrap() as f32,
            cfg: j["do_classifier_free_guidance"].as_bool().unwrap(),
            max_sequence_length: j["max_sequence_length"].as_u64().unwrap() as usize,
            seed: 0,
            references: j["reference_images"]
                .as_array()
                .unwrap()
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let bytes =
                        std::fs::read(self.root.join("cases").join(r["file"].as_str().unwrap()))
                            .unwrap();
                    reference::load(&bytes, i, reference::MAX_DECODE_PIXELS).unwrap()
                })
                .collect(),
            init_noise: Some(Tensor::from_data(
                TensorData::new(noise, [s[0], s[1], s[2], s[3]]),
                device,
            )),
        }
    }

    pub fn int_tensor(&self, tensor: &str) -> Vec<u32> {
        self.tensor(tensor)
            .0
            .into_iter()
            .map(|x| x as u32)
            .collect()
    }
}

/// Largest |a - b| divided by the largest |b| (so the tolerance is relative to the tensor's scale).
pub fn rel_err(actual: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(actual.len(), expected.len(), "element counts differ");
    let scale = expected.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    let diff = actual
        .iter()
        .zip(expected)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff.is_finite(), "non-finite values");
    diff / scale
}

pub fn assert_close(what: &str, actual: &[f32], expected: &[f32], tol: f32) {
    let e = rel_err(actual, expected);
    assert!(
        e <= tol,
        "{what}: relative error {e:.3e} over tolerance {tol:.1e}"
    );
    eprintln!("{what}: relative error {e:.3e} (tolerance {tol:.1e})");
}

/// PSNR in dB of two 8-bit images (infinite when equal).
pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len(), "image sizes differ");
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

/// Largest difference between two 8-bit images, in levels.
pub fn max_level_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len(), "image sizes differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}
