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
