//! Component configs, read from each component's `config.json` in the diffusers layout. Every
//! shape in the engine comes from here, so the same code runs klein 4B, 9B and any tiny config.

use std::path::Path;

use serde::Deserialize;

use crate::error::EngineError;

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, EngineError> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| EngineError::Config {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

#[derive(Clone, Debug, Deserialize)]
struct RopeParameters {
    rope_theta: f64,
}

/// `text_encoder/config.json` (transformers `Qwen3Config`).
#[derive(Clone, Debug, Deserialize)]
pub struct Qwen3Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default)]
    head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    pub vocab_size: usize,
    /// transformers 4.x writes it at the top level, 5.x inside `rope_parameters`.
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_parameters: Option<RopeParameters>,
}

impl Qwen3Config {
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        let c: Qwen3Config = read_json(path)?;
        if c.rope_theta().is_none() {
            return Err(EngineError::Config {
                path: path.display().to_string(),
                message: "no rope_theta (top level or in rope_parameters)".into(),
            });
        }
        if !c
            .num_attention_heads
            .is_multiple_of(c.num_key_value_heads.max(1))
        {
            return Err(EngineError::Config {
                path: path.display().to_string(),
                message: "num_attention_heads is not a multiple of num_key_value_heads".into(),
            });
        }
        Ok(c)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn rope_theta(&self) -> Option<f64> {
        self.rope_theta
            .or(self.rope_parameters.as_ref().map(|r| r.rope_theta))
    }
}

/// `transformer/config.json` (diffusers `Flux2Transformer2DModel`).
#[derive(Clone, Debug, Deserialize)]
pub struct Flux2Config {
    pub attention_head_dim: usize,
    pub axes_dims_rope: Vec<usize>,
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default)]
    pub guidance_embeds: bool,
    pub in_channels: usize,
    pub joint_attention_dim: usize,
    pub mlp_ratio: f64,
    pub num_attention_heads: usize,
    pub num_layers: usize,
    pub num_single_layers: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    pub rope_theta: f64,
    pub timestep_guidance_channels: usize,
}

fn default_eps() -> f64 {
    1e-6
}

impl Flux2Config {
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        let c: Flux2Config = read_json(path)?;
        if c.axes_dims_rope.iter().sum::<usize>() != c.attention_head_dim {
            return Err(EngineError::Config {
                path: path.display().to_string(),
                message: format!(
                    "axes_dims_rope {:?} must add up to attention_head_dim {}",
                    c.axes_dims_rope, c.attention_head_dim
                ),
            });
        }
        if c.guidance_embeds {
            return Err(EngineError::Config {
                path: path.display().to_string(),
                message: "guidance_embeds = true is FLUX.2 [dev], not klein".into(),
            });
        }
        Ok(c)
    }

    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn mlp_hidden(&self) -> usize {
        (self.inner_dim() as f64 * self.mlp_ratio) as usize
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }
}

/// `vae/config.json` (diffusers `AutoencoderKLFlux2`).
#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    pub block_out_channels: Vec<usize>,
    #[serde(default)]
    pub decoder_block_out_channels: Option<Vec<usize>>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    pub batch_norm_eps: f64,
    #[serde(default = "default_patch")]
    pub patch_size: Vec<usize>,
}

fn yes() -> bool {
    true
}
fn default_patch() -> Vec<usize> {
    vec![2, 2]
}

impl VaeConfig {
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        let c: VaeConfig = read_json(path)?;
        if c.patch_size != [2, 2] {
            return Err(EngineError::Config {
                path: path.display().to_string(),
                message: format!(
                    "patch_size {:?} is not supported (klein uses [2, 2])",
                    c.patch_size
                ),
            });
        }
        Ok(c)
    }

    /// Pixels per latent cell: 2^(number of down blocks - 1).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    pub fn decoder_channels(&self) -> &[usize] {
        self.decoder_block_out_channels
            .as_deref()
            .unwrap_or(&self.block_out_channels)
    }
}

/// `config.json` of a transformers `ViTForImageClassification` checkpoint (the safety checker).
#[derive(Clone, Debug, Deserialize)]
pub struct VitConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    #[serde(default = "yes")]
    pub qkv_bias: bool,
    pub layer_norm_eps: f64,
    /// Class index (as a string, as transformers writes it) to label.
    pub id2label: std::collections::BTreeMap<String, String>,
}

impl VitConfig {
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        let c: VitConfig = read_json(path)?;
        let bad = |message: String| EngineError::Config {
            path: path.display().to_string(),
            message,
        };
        if c.hidden_act != "gelu" {
            return Err(bad(format!(
                "hidden_act `{}` is not supported (only the exact erf `gelu`)",
                c.hidden_act
            )));
        }
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(bad(
                "hidden_size is not a multiple of num_attention_heads".into()
            ));
        }
        if c.patch_size == 0 || !c.image_size.is_multiple_of(c.patch_size) {
            return Err(bad("image_size is not a multiple of patch_size".into()));
        }
        if c.num_channels != 3 {
            return Err(bad(format!(
                "num_channels {} (expected RGB, 3)",
                c.num_channels
            )));
        }
        let n = c.num_labels();
        for i in 0..n {
            if !c.id2label.contains_key(&i.to_string()) {
                return Err(bad(format!("id2label has no entry for class {i}")));
            }
        }
        Ok(c)
    }

    pub fn num_labels(&self) -> usize {
        self.id2label.len()
    }

    pub fn label(&self, i: usize) -> &str {
        self.id2label.get(&i.to_string()).map_or("", String::as_str)
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct ImageSize {
    pub height: usize,
    pub width: usize,
}

/// `preprocessor_config.json` of a transformers `ViTImageProcessor`.
#[derive(Clone, Debug, Deserialize)]
pub struct ImageProcessorConfig {
    #[serde(default = "yes")]
    pub do_resize: bool,
    pub size: ImageSize,
    /// PIL's resampling filter code: 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic.
    #[serde(default = "bilinear")]
    pub resample: u8,
    #[serde(default = "yes")]
    pub do_rescale: bool,
    #[serde(default = "one_255th")]
    pub rescale_factor: f64,
    #[serde(default = "yes")]
    pub do_normalize: bool,
    #[serde(default = "half3")]
    pub image_mean: Vec<f64>,
    #[serde(default = "half3")]
    pub image_std: Vec<f64>,
}

fn bilinear() -> u8 {
    2
}
fn one_255th() -> f64 {
    1.0 / 255.0
}
fn half3() -> Vec<f64> {
    vec![0.5; 3]
}

impl ImageProcessorConfig {
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        let c: ImageProcessorConfig = read_json(path)?;
        let bad = |message: &str| EngineError::Config {
            path: path.display().to_string(),
            message: message.into(),
        };
        if c.image_mean.len() != 3 || c.image_std.len() != 3 {
            return Err(bad("image_mean and image_std need 3 values (RGB)"));
        }
        if c.image_std.contains(&0.0) {
            return Err(bad("image_std must not be 0"));
        }
        if c.resample > 3 {
            return Err(bad(
                "resample must be 0 (nearest), 1 (lanczos), 2 (bilinear) or 3 (bicubic)",
            ));
        }
        Ok(c)
    }
}
