//! The safety checker (a transformers ViTForImageClassification) against the reference: a tiny
//! random ViT saved by transformers 5.24 with non-default sizes (48 px input, 8 px patches, 24
//! wide, 3 heads, 2 layers), made by tests/data/nsfw-tiny/make_fixture.py.

mod fixture;

use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};
use kleingate_local::image_io::Rgb8;
use kleingate_local::safety::SafetyChecker;
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/nsfw-tiny")
}

struct Fixture {
    json: Value,
    bytes: Vec<u8>,
}

impl Fixture {
    fn load() -> Fixture {
        Fixture {
            json: serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap())
                .unwrap(),
            bytes: std::fs::read(dir().join("cases.safetensors")).unwrap(),
        }
    }

    fn tensor(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        fixture::f32_tensor(&self.bytes, name).unwrap_or_else(|| panic!("no tensor {name}"))
    }

    fn images(&self) -> Vec<Rgb8> {
        self.json["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let img = image::open(dir().join(p.as_str().unwrap()))
                    .unwrap()
                    .to_rgb8();
                Rgb8 {
                    width: img.width() as usize,
                    height: img.height() as usize,
                    data: img.into_raw(),
                }
            })
            .collect()
    }
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The model on the reference's own pixel values: f32 against f32, two layers of matmuls and
/// layer norms agree to ~1e-6; 1e-4 leaves margin while a wrong head split, patch order or
/// missing bias moves logits by >1e-1.
#[test]
fn logits_match_the_reference() {
    let device = Device::flex();
    let checker = SafetyChecker::load(&dir(), 0.5, &device).unwrap();
    let f = Fixture::load();
    let (px, s) = f.tensor("pixel_values");
    let logits = checker
        .logits(Tensor::from_data(
            TensorData::new(px, [s[0], s[1], s[2], s[3]]),
            &device,
        ))
        .unwrap();
    assert_eq!(logits.dims(), [4, 2]);
    let got = logits.into_data().try_to_vec::<f32>().unwrap();
    let want = f.tensor("logits").0;
    let err = max_abs(&got, &want);
    assert!(err < 1e-4, "logits differ by {err}: {got:?} vs {want:?}");
}

/// Our preprocessing against `ViTImageProcessor` (PIL): both resize 8-bit images and round to
/// 8 bits, but PIL's fixed-point bilinear filter and the `image` crate's float one can round a
/// sample the other way (measured: at most 1 level, 2/255 on the [-1, 1] scale; 2 allowed). The mean
/// error shows that this is rounding, not a shifted or mirrored grid (which is >0.05 on average).
#[test]
fn preprocessing_matches_the_reference_within_rounding() {
    let device = Device::flex();
    let checker = SafetyChecker::load(&dir(), 0.5, &device).unwrap();
    let f = Fixture::load();
    let (want, s) = f.tensor("pixel_values");
    let per = s[1] * s[2] * s[3];
    for (i, img) in f.images().iter().enumerate() {
        let got = checker
            .preprocess(img)
            .unwrap()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let w = &want[i * per..(i + 1) * per];
        let worst = max_abs(&got, w);
        let mean = got.iter().zip(w).map(|(a, b)| (a - b).abs()).sum::<f32>() / per as f32;
        assert!(
            worst <= 2.0 * 2.0 / 255.0 + 1e-6,
            "image {i}: worst {worst}"
        );
        assert!(mean <= 1.0 / 255.0, "image {i}: mean {mean}");
    }
}

/// End to end: every image gets the reference's verdict, and its probability within 0.02. The
/// fixture places the decision boundary well away from every case (margins >= 0.5 in logits),
/// so rounding in the preprocessing cannot flip a verdict, while a wrong label or class order does.
#[test]
fn verdicts_match_the_reference() {
    let device = Device::flex();
    let checker = SafetyChecker::load(&dir(), 0.5, &device).unwrap();
    let f = Fixture::load();
    let images = f.images();
    let verdicts = checker.check(&images.iter().collect::<Vec<_>>()).unwrap();
    let flags: Vec<bool> = verdicts.iter().map(|v| v.nsfw).collect();
    let want: Vec<bool> = f.json["nsfw"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_bool().unwrap())
        .collect();
    assert_eq!(flags, want);
    for (v, p) in verdicts
        .iter()
        .zip(f.json["probabilities"].as_array().unwrap())
    {
        let p = p.as_f64().unwrap() as f32;
        assert!((v.nsfw_probability - p).abs() < 0.02, "{v:?} vs {p}");
    }
    // The threshold is the probability from which an image is flagged.
    let strict = SafetyChecker::load(&dir(), 0.99, &device).unwrap();
    assert!(strict
        .check(&images.iter().collect::<Vec<_>>())
        .unwrap()
        .iter()
        .all(|v| !v.nsfw));
}

/// A copy of the fixture in a temporary directory (removed when the handle drops).
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix(&format!("kleingate-nsfw-{name}-"))
        .tempdir()
        .unwrap();
    for f in [
        "config.json",
        "preprocessor_config.json",
        "model.safetensors",
    ] {
        std::fs::copy(dir().join(f), d.path().join(f)).unwrap();
    }
    d
}

#[test]
fn broken_checkpoints_are_errors_naming_what_is_wrong() {
    let device = Device::flex();
    let err = |d: &PathBuf| match SafetyChecker::load(d, 0.5, &device) {
        Ok(_) => panic!("{} loaded", d.display()),
        Err(e) => e.to_string(),
    };

    // A config whose sizes do not match the weights names the mis-shaped tensor.
    let tmp = copy_fixture("shape");
    let d = tmp.path().to_path_buf();
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        cfg.replace("\"intermediate_size\": 40", "\"intermediate_size\": 48"),
    )
    .unwrap();
    let e = err(&d);
    assert!(
        e.contains("vit.encoder.layer.0.intermediate.dense.weight"),
        "{e}"
    );

    // No label the checker could call NSFW.
    let tmp = copy_fixture("labels");
    let d = tmp.path().to_path_buf();
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(d.join("config.json"), cfg.replace("\"nsfw\"", "\"cat\"")).unwrap();
    assert!(err(&d).contains("no NSFW label"));

    // A preprocessor size the model cannot take.
    let tmp = copy_fixture("size");
    let d = tmp.path().to_path_buf();
    let pre = std::fs::read_to_string(d.join("preprocessor_config.json")).unwrap();
    std::fs::write(
        d.join("preprocessor_config.json"),
        pre.replace("\"height\": 48", "\"height\": 64"),
    )
    .unwrap();
    assert!(err(&d).contains("image_size"));

    // Missing weights name the file.
    let tmp = copy_fixture("missing");
    let d = tmp.path().to_path_buf();
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    assert!(err(&d).contains("model.safetensors"));
}
