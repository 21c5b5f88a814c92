//! The safety checker: an NSFW image classifier, a transformers `ViTForImageClassification`
//! checkpoint (the layout of `Falconsai/nsfw_image_detection`) run in burn.
//!
//! Preprocessing follows `ViTImageProcessor` (its PIL backend): resize to the configured size with
//! the configured filter, rescale to [0, 1], normalise per channel. The model: patch embedding
//! (a strided convolution), a class token, learned position embeddings, pre-norm encoder layers
//! (attention with biases, exact-erf GELU MLP), the final LayerNorm, and a linear classifier on
//! the class token. Every shape comes from `config.json`; every weight name is in [`names`].
//!
//! An image is flagged when the probability of the NSFW classes (labels in [`NSFW_LABELS`]) is at
//! least the threshold.

use std::path::Path;

use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Device, Tensor, TensorData};
use image::imageops::FilterType;

use crate::config::{ImageProcessorConfig, VitConfig};
use crate::error::EngineError;
use crate::image_io::Rgb8;
use crate::nn::{layer_norm, lin_bias, sdpa, Conv, LinearWeight};
use crate::weights::WeightStore;

/// Labels counted as "not safe for work" (case-insensitive). Falconsai's model has `normal` and
/// `nsfw`; the others cover the common five-class NSFW classifiers.
pub const NSFW_LABELS: &[&str] = &["nsfw", "porn", "hentai", "sexy", "unsafe"];

/// The weight names of the transformers ViT layout, in one place.
mod names {
    pub const CLS: &str = "vit.embeddings.cls_token";
    pub const POS: &str = "vit.embeddings.position_embeddings";
    pub const PATCH: &str = "vit.embeddings.patch_embeddings.projection";
    pub const FINAL_NORM: &str = "vit.layernorm";
    pub const CLASSIFIER: &str = "classifier";

    pub fn layer(i: usize, part: &str) -> String {
        format!("vit.encoder.layer.{i}.{part}")
    }
}

/// A linear layer with bias, weight in burn's `[in, out]` layout.
struct Linear {
    w: LinearWeight,
    b: Tensor<1>,
}

impl Linear {
    fn load(w: &WeightStore, name: &str, d_in: usize, d_out: usize) -> Result<Self, EngineError> {
        Ok(Linear {
            w: w.linear(&format!("{name}.weight"), d_in, d_out)?,
            b: w.tensor(&format!("{name}.bias"), [d_out])?,
        })
    }

    fn load_opt_bias(
        w: &WeightStore,
        name: &str,
        d: usize,
        bias: bool,
    ) -> Result<Self, EngineError> {
        if bias {
            Self::load(w, name, d, d)
        } else {
            Ok(Linear {
                w: w.linear(&format!("{name}.weight"), d, d)?,
                b: Tensor::zeros([d], w.device()),
            })
        }
    }

    fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        lin_bias(x, &self.w, &self.b)
    }
}

struct Norm {
    w: Tensor<1>,
    b: Tensor<1>,
    eps: f64,
}

impl Norm {
    fn load(w: &WeightStore, name: &str, d: usize, eps: f64) -> Result<Self, EngineError> {
        Ok(Norm {
            w: w.tensor(&format!("{name}.weight"), [d])?,
            b: w.tensor(&format!("{name}.bias"), [d])?,
            eps,
        })
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let d = self.w.dims()[0];
        layer_norm(x, self.eps)
            .mul(self.w.clone().reshape([1, 1, d]))
            .add(self.b.clone().reshape([1, 1, d]))
    }
}

struct Layer {
    norm_before: Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm_after: Norm,
    up: Linear,
    down: Linear,
}

/// What the classifier says about one image.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// Summed probability of the NSFW labels.
    pub nsfw_probability: f32,
    pub nsfw: bool,
}

pub struct SafetyChecker {
    pub config: VitConfig,
    pub preprocessor: ImageProcessorConfig,
    threshold: f32,
    nsfw_classes: Vec<usize>,
    patch: Conv,
    cls: Tensor<3>,
    pos: Tensor<3>,
    layers: Vec<Layer>,
    final_norm: Norm,
    classifier: Linear,
    device: Device,
}

impl SafetyChecker {
    /// Load a checkpoint directory (`config.json`, `preprocessor_config.json`,
    /// `model.safetensors` or its shards). `threshold` is the NSFW probability from which an
    /// image is flagged.
    pub fn load(dir: &Path, threshold: f32, device: &Device) -> Result<Self, EngineError> {
        let config = VitConfig::load(&dir.join("config.json"))?;
        let pre_path = dir.join("preprocessor_config.json");
        let preprocessor = ImageProcessorConfig::load(&pre_path)?;
        if (preprocessor.size.height, preprocessor.size.width)
            != (config.image_size, config.image_size)
        {
            // Without position-embedding interpolation the model only takes its own size.
            return Err(EngineError::Config {
                path: pre_path.display().to_string(),
                message: format!(
                    "size {}x{} differs from the model's image_size {}",
                    preprocessor.size.width, preprocessor.size.height, config.image_size
                ),
            });
        }
        let nsfw_classes: Vec<usize> = (0..config.num_labels())
            .filter(|&i| {
                let l = config.label(i).to_ascii_lowercase();
                NSFW_LABELS.contains(&l.as_str())
            })
            .collect();
        if nsfw_classes.is_empty() {
            return Err(EngineError::Config {
                path: dir.join("config.json").display().to_string(),
                message: format!(
                    "no NSFW label among id2label {:?} (expected one of {NSFW_LABELS:?})",
                    config.id2label
                ),
            });
        }
        let w = WeightStore::open(dir, "model", device)?;
        let (h, c, p, n) = (
            config.hidden_size,
            config.num_channels,
            config.patch_size,
            config.grid() * config.grid(),
        );
        let eps = config.layer_norm_eps;
        let patch = Conv {
            weight: w.tensor(&format!("{}.weight", names::PATCH), [h, c, p, p])?,
            bias: w.tensor(&format!("{}.bias", names::PATCH), [h])?,
            stride: p,
            pad: (0, 0),
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = |part: &str| names::layer(i, part);
            let qkv = |part: &str| Linear::load_opt_bias(&w, &l(part), h, config.qkv_bias);
            layers.push(Layer {
                norm_before: Norm::load(&w, &l("layernorm_before"), h, eps)?,
                q: qkv("attention.attention.query")?,
                k: qkv("attention.attention.key")?,
                v: qkv("attention.attention.value")?,
                out: Linear::load(&w, &l("attention.output.dense"), h, h)?,
                norm_after: Norm::load(&w, &l("layernorm_after"), h, eps)?,
                up: Linear::load(&w, &l("intermediate.dense"), h, config.intermediate_size)?,
                down: Linear::load(&w, &l("output.dense"), config.intermediate_size, h)?,
            });
        }
        Ok(SafetyChecker {
            cls: w.tensor(names::CLS, [1, 1, h])?,
            pos: w.tensor(names::POS, [1, n + 1, h])?,
            final_norm: Norm::load(&w, names::FINAL_NORM, h, eps)?,
            classifier: Linear::load(&w, names::CLASSIFIER, h, config.num_labels())?,
            patch,
            layers,
            nsfw_classes,
            threshold,
            config,
            preprocessor,
            device: device.clone(),
        })
    }

    /// `pixel_values` `(1, 3, S, S)` of one image, as `ViTImageProcessor` makes them.
    pub fn preprocess(&self, img: &Rgb8) -> Result<Tensor<4>, EngineError> {
        let pre = &self.preprocessor;
        let buf = image::RgbImage::from_raw(img.width as u32, img.height as u32, img.data.clone())
            .ok_or_else(|| EngineError::Input("image buffer does not match its size".into()))?;
        let (w, h) = (pre.size.width, pre.size.height);
        let resized = if pre.do_resize && (img.width, img.height) != (w, h) {
            let filter = match pre.resample {
                0 => FilterType::Nearest,
                1 => FilterType::Lanczos3,
                3 => FilterType::CatmullRom, // PIL's bicubic is Keys' a = -0.5, as Catmull-Rom
                _ => FilterType::Triangle,
            };
            image::imageops::resize(&buf, w as u32, h as u32, filter)
        } else {
            buf
        };
        let (rw, rh) = (resized.width() as usize, resized.height() as usize);
        let scale = if pre.do_rescale {
            pre.rescale_factor
        } else {
            1.0
        };
        let mut chw = vec![0f32; 3 * rw * rh];
        for (i, px) in resized.pixels().enumerate() {
            for ch in 0..3 {
                let mut v = f64::from(px[ch]) * scale;
                if pre.do_normalize {
                    v = (v - pre.image_mean[ch]) / pre.image_std[ch];
                }
                chw[ch * rw * rh + i] = v as f32;
            }
        }
        Ok(Tensor::from_data(
            TensorData::new(chw, [1, 3, rh, rw]),
            &self.device,
        ))
    }

    /// Class logits `(B, num_labels)` from `pixel_values` `(B, 3, S, S)`.
    pub fn logits(&self, pixel_values: Tensor<4>) -> Result<Tensor<2>, EngineError> {
        let c = &self.config;
        let [b, ch, hh, ww] = pixel_values.dims();
        if ch != c.num_channels || hh != c.image_size || ww != c.image_size {
            return Err(EngineError::Input(format!(
                "pixel_values are {ch}x{hh}x{ww}; the classifier takes {}x{s}x{s}",
                c.num_channels,
                s = c.image_size
            )));
        }
        let (h, n, heads) = (c.hidden_size, c.grid() * c.grid(), c.num_attention_heads);
        let hd = h / heads;
        let patches = self
            .patch
            .forward(pixel_values)
            .reshape([b, h, n])
            .swap_dims(1, 2);
        let cls = self.cls.clone().expand([b, 1, h]);
        let mut x = Tensor::cat(vec![cls, patches], 1).add(self.pos.clone());
        let split = |t: Tensor<3>| t.reshape([b, n + 1, heads, hd]).swap_dims(1, 2);
        for l in &self.layers {
            let y = l.norm_before.forward(x.clone());
            let att = sdpa(
                split(l.q.forward(y.clone())),
                split(l.k.forward(y.clone())),
                split(l.v.forward(y)),
                None,
            )
            .swap_dims(1, 2)
            .reshape([b, n + 1, h]);
            x = x.add(l.out.forward(att));
            let y = l.norm_after.forward(x.clone());
            x = x.add(l.down.forward(gelu(l.up.forward(y))));
        }
        let first = self.final_norm.forward(x).slice([0..b, 0..1, 0..h]);
        Ok(self.classifier.forward(first.reshape([b, h])))
    }

    /// Classify images (any size; each is resized to the model's input).
    pub fn check(&self, images: &[&Rgb8]) -> Result<Vec<Verdict>, EngineError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let pixels = images
            .iter()
            .map(|i| self.preprocess(i))
            .collect::<Result<Vec<_>, _>>()?;
        let probs = softmax(self.logits(Tensor::cat(pixels, 0))?, 1);
        let k = self.config.num_labels();
        let values = probs
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| EngineError::Device(format!("reading the classifier output: {e:?}")))?;
        Ok(values
            .chunks(k)
            .map(|row| {
                let p: f32 = self.nsfw_classes.iter().map(|&i| row[i]).sum();
                Verdict {
                    nsfw_probability: p,
                    nsfw: p >= self.threshold,
                }
            })
            .collect())
    }
}
