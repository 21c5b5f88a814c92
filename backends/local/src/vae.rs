//! The FLUX.2 VAE (diffusers `AutoencoderKLFlux2`): decoder for output images, encoder for
//! reference images, and the latent conventions around them: 2x2 patchify to 4x the channels and
//! the batch-norm (de)normalisation with the checkpoint's running statistics.

use std::path::Path;

use burn::tensor::{Device, Tensor};

use crate::config::VaeConfig;
use crate::error::EngineError;
use crate::nn::{group_norm, group_norm_silu, lin_bias, sdpa, Conv, LinearWeight};
use crate::precision::Precision;
use crate::weights::{Source, WeightStore};

/// GroupNorm epsilon of every norm in the VAE (diffusers' fixed `resnet_eps`).
const GN_EPS: f64 = 1e-6;

struct Norm {
    gamma: Tensor<1>,
    beta: Tensor<1>,
}

struct Resnet {
    norm1: Norm,
    conv1: Conv,
    norm2: Norm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

struct Attn {
    norm: Norm,
    q: (LinearWeight, Tensor<1>),
    k: (LinearWeight, Tensor<1>),
    v: (LinearWeight, Tensor<1>),
    out: (LinearWeight, Tensor<1>),
}

struct Mid {
    res0: Resnet,
    attn: Option<Attn>,
    res1: Resnet,
}

struct Level {
    resnets: Vec<Resnet>,
    /// Down- (encoder) or up-sampling (decoder) convolution after the resnets.
    resample: Option<Conv>,
}

struct Coder {
    conv_in: Conv,
    levels: Vec<Level>,
    mid: Mid,
    norm_out: Norm,
    conv_out: Conv,
}

pub struct Vae {
    pub config: VaeConfig,
    decoder: Coder,
    encoder: Option<Coder>,
    quant: Option<Conv>,
    post_quant: Option<Conv>,
    bn_mean: Tensor<1>,
    bn_std: Tensor<1>,
    precision: Precision,
    /// Bytes of weights held on the device.
    weight_bytes: u64,
}

/// Weight loading with the diffusers names, in one place.
struct Loader<'a> {
    w: &'a WeightStore,
}

impl Loader<'_> {
    fn norm(&self, p: &str, c: usize) -> Result<Norm, EngineError> {
        Ok(Norm {
            gamma: self.w.tensor(&format!("{p}.weight"), [c])?,
            beta: self.w.tensor(&format!("{p}.bias"), [c])?,
        })
    }

    fn conv(
        &self,
        p: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: (usize, usize),
    ) -> Result<Conv, EngineError> {
        Ok(Conv {
            weight: self.w.tensor(&format!("{p}.weight"), [cout, cin, k, k])?,
            bias: self.w.tensor(&format!("{p}.bias"), [cout])?,
            stride,
            pad,
        })
    }

    fn linear(&self, p: &str, c: usize) -> Result<(LinearWeight, Tensor<1>), EngineError> {
        Ok((
            self.w.linear(&format!("{p}.weight"), c, c)?,
            self.w.tensor(&format!("{p}.bias"), [c])?,
        ))
    }

    fn resnet(&self, p: &str, cin: usize, cout: usize) -> Result<Resnet, EngineError> {
        Ok(Resnet {
            norm1: self.norm(&format!("{p}.norm1"), cin)?,
            conv1: self.conv(&format!("{p}.conv1"), cin, cout, 3, 1, (1, 1))?,
            norm2: self.norm(&format!("{p}.norm2"), cout)?,
            conv2: self.conv(&format!("{p}.conv2"), cout, cout, 3, 1, (1, 1))?,
            shortcut: if cin != cout {
                Some(self.conv(&format!("{p}.conv_shortcut"), cin, cout, 1, 1, (0, 0))?)
            } else {
                None
            },
        })
    }

    fn mid(&self, p: &str, c: usize, attention: bool) -> Result<Mid, EngineError> {
        let attn = if attention {
            let a = format!("{p}.attentions.0");
            Some(Attn {
                norm: self.norm(&format!("{a}.group_norm"), c)?,
                q: self.linear(&format!("{a}.to_q"), c)?,
                k: self.linear(&format!("{a}.to_k"), c)?,
                v: self.linear(&format!("{a}.to_v"), c)?,
                out: self.linear(&format!("{a}.to_out.0"), c)?,
            })
        } else {
            None
        };
        Ok(Mid {
            res0: self.resnet(&format!("{p}.resnets.0"), c, c)?,
            attn,
            res1: self.resnet(&format!("{p}.resnets.1"), c, c)?,
        })
    }
}

impl Resnet {
    fn forward(&self, x: Tensor<4>, groups: usize) -> Tensor<4> {
        let pre = |x: Tensor<4>, n: &Norm| group_norm_silu(x, groups, &n.gamma, &n.beta, GN_EPS);
        let h = self.conv1.forward(pre(x.clone(), &self.norm1));
        let skip = match &self.shortcut {
            Some(c) => c.forward(x),
            None => x,
        };
        self.conv2.forward_add(pre(h, &self.norm2), skip)
    }
}

impl Attn {
    /// Single-head self-attention over all positions, with a residual connection.
    fn forward(&self, x: Tensor<4>, groups: usize) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let n = group_norm(x.clone(), groups, &self.norm.gamma, &self.norm.beta, GN_EPS);
        let seq = n.reshape([b, c, h * w]).swap_dims(1, 2);
        let proj =
            |p: &(LinearWeight, Tensor<1>)| lin_bias(seq.clone(), &p.0, &p.1).unsqueeze_dim::<4>(1);
        let a = sdpa(proj(&self.q), proj(&self.k), proj(&self.v), None).squeeze_dim::<3>(1);
        let out = lin_bias(a, &self.out.0, &self.out.1);
        x.add(out.swap_dims(1, 2).reshape([b, c, h, w]))
    }
}

impl Mid {
    fn forward(&self, x: Tensor<4>, groups: usize) -> Tensor<4> {
        let x = self.res0.forward(x, groups);
        let x = match &self.attn {
            Some(a) => a.forward(x, groups),
            None => x,
        };
        self.res1.forward(x, groups)
    }
}

impl Vae {
    /// Load `vae/`. The encoder is only loaded when `with_encoder` (reference images).
    pub fn load(dir: &Path, with_encoder: bool, device: &Device) -> Result<Self, EngineError> {
        Self::load_from(dir, with_encoder, Source::Files, device, Precision::F32)
    }

    /// [`load`](Self::load) with the weights from `source` (the config always from `dir`).
    pub fn load_from(
        dir: &Path,
        with_encoder: bool,
        source: Source,
        device: &Device,
        precision: Precision,
    ) -> Result<Self, EngineError> {
        let config = VaeConfig::load(&dir.join("config.json"))?;
        let w = WeightStore::open_from(dir, "diffusion_pytorch_model", source, device, precision)?;
        let ld = Loader { w: &w };
        let lc = config.latent_channels;
        let lpb = config.layers_per_block;

        // Decoder: channels reversed, layers_per_block + 1 resnets per level, upsampling on all
        // levels but the last.
        let dec_ch: Vec<usize> = config.decoder_channels().iter().rev().copied().collect();
        let top = dec_ch[0];
        let mut levels = Vec::new();
        let mut prev = top;
        for (i, &ch) in dec_ch.iter().enumerate() {
            let mut resnets = Vec::new();
            for j in 0..=lpb {
                let cin = if j == 0 { prev } else { ch };
                resnets.push(ld.resnet(&format!("decoder.up_blocks.{i}.resnets.{j}"), cin, ch)?);
            }
            let resample = if i + 1 < dec_ch.len() {
                Some(ld.conv(
                    &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                    ch,
                    ch,
                    3,
                    1,
                    (1, 1),
                )?)
            } else {
                None
            };
            levels.push(Level { resnets, resample });
            prev = ch;
        }
        let decoder = Coder {
            conv_in: ld.conv("decoder.conv_in", lc, top, 3, 1, (1, 1))?,
            mid: ld.mid("decoder.mid_block", top, config.mid_block_add_attention)?,
            levels,
            norm_out: ld.norm("decoder.conv_norm_out", prev)?,
            conv_out: ld.conv("decoder.conv_out", prev, config.out_channels, 3, 1, (1, 1))?,
        };

        let encoder = if with_encoder {
            let ch = &config.block_out_channels;
            let mut levels = Vec::new();
            let mut prev = ch[0];
            for (i, &c) in ch.iter().enumerate() {
                let mut resnets = Vec::new();
                for j in 0..lpb {
                    let cin = if j == 0 { prev } else { c };
                    resnets.push(ld.resnet(
                        &format!("encoder.down_blocks.{i}.resnets.{j}"),
                        cin,
                        c,
                    )?);
                }
                // Downsampling pads right and bottom by one, then a stride-2 conv.
                let resample = if i + 1 < ch.len() {
                    Some(ld.conv(
                        &format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                        c,
                        c,
                        3,
                        2,
                        (0, 1),
                    )?)
                } else {
                    None
                };
                levels.push(Level { resnets, resample });
                prev = c;
            }
            Some(Coder {
                conv_in: ld.conv("encoder.conv_in", config.in_channels, ch[0], 3, 1, (1, 1))?,
                mid: ld.mid("encoder.mid_block", prev, config.mid_block_add_attention)?,
                levels,
                norm_out: ld.norm("encoder.conv_norm_out", prev)?,
                conv_out: ld.conv("encoder.conv_out", prev, 2 * lc, 3, 1, (1, 1))?,
            })
        } else {
            None
        };

        let quant = if config.use_quant_conv && with_encoder {
            Some(ld.conv("quant_conv", 2 * lc, 2 * lc, 1, 1, (0, 0))?)
        } else {
            None
        };
        let post_quant = if config.use_post_quant_conv {
            Some(ld.conv("post_quant_conv", lc, lc, 1, 1, (0, 0))?)
        } else {
            None
        };
        let bn_c = 4 * lc;
        let bn_mean = w.tensor("bn.running_mean", [bn_c])?;
        let bn_std = w
            .tensor("bn.running_var", [bn_c])?
            .add_scalar(config.batch_norm_eps)
            .sqrt();
        Ok(Vae {
            config,
            decoder,
            encoder,
            quant,
            post_quant,
            bn_mean,
            bn_std,
            precision,
            weight_bytes: w.bytes_made(),
        })
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Bytes of weights this model holds on its device.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    fn groups(&self) -> usize {
        self.config.norm_num_groups
    }

    /// Latent `[B, latent_channels, h, w]` -> raw decoder output `[B, 3, 8h, 8w]` (about [-1, 1]).
    pub fn decode(&self, z: Tensor<4>) -> Tensor<4> {
        let g = self.groups();
        let z = z.cast(self.precision.float());
        let z = match &self.post_quant {
            Some(c) => c.forward(z),
            None => z,
        };
        let d = &self.decoder;
        let mut x = d.mid.forward(d.conv_in.forward(z), g);
        for level in &d.levels {
            for r in &level.resnets {
                x = r.forward(x, g);
            }
            if let Some(up) = &level.resample {
                x = up.forward_up2(x);
            }
        }
        d.conv_out.forward(group_norm_silu(
            x,
            g,
            &d.norm_out.gamma,
            &d.norm_out.beta,
            GN_EPS,
        ))
    }

    /// Pixels `[B, 3, H, W]` in [-1, 1] -> (posterior mean, log-variance clamped to [-30, 20]).
    pub fn encode(&self, pixels: Tensor<4>) -> Result<(Tensor<4>, Tensor<4>), EngineError> {
        let e = self
            .encoder
            .as_ref()
            .ok_or_else(|| EngineError::Input("the VAE was loaded without its encoder".into()))?;
        let g = self.groups();
        let mut x = e.conv_in.forward(pixels.cast(self.precision.float()));
        for level in &e.levels {
            for r in &level.resnets {
                x = r.forward(x, g);
            }
            if let Some(down) = &level.resample {
                x = down.forward(x);
            }
        }
        x = e.mid.forward(x, g);
        let mut moments = e.conv_out.forward(group_norm_silu(
            x,
            g,
            &e.norm_out.gamma,
            &e.norm_out.beta,
            GN_EPS,
        ));
        if let Some(q) = &self.quant {
            moments = q.forward(moments);
        }
        let lc = self.config.latent_channels;
        let mean = moments.clone().narrow(1, 0, lc);
        let logvar = moments.narrow(1, lc, lc).clamp(-30.0, 20.0);
        Ok((mean, logvar))
    }

    /// `[B, C, h, w]` -> `[B, 4C, h/2, w/2]`, channel = c*4 + dy*2 + dx.
    pub fn patchify(z: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = z.dims();
        z.reshape([b, c, h / 2, 2, w / 2, 2])
            .permute([0, 1, 3, 5, 2, 4])
            .reshape([b, c * 4, h / 2, w / 2])
    }

    pub fn unpatchify(z: Tensor<4>) -> Tensor<4> {
        let [b, c4, h, w] = z.dims();
        let c = c4 / 4;
        z.reshape([b, c, 2, 2, h, w])
            .permute([0, 1, 4, 2, 5, 3])
            .reshape([b, c, h * 2, w * 2])
    }

    /// Batch-norm normalisation of patchified latents (what the transformer works in).
    pub fn normalize(&self, z: Tensor<4>) -> Tensor<4> {
        let z = z.cast(self.precision.float());
        let c = z.dims()[1];
        z.sub(self.bn_mean.clone().reshape([1, c, 1, 1]))
            .div(self.bn_std.clone().reshape([1, c, 1, 1]))
    }

    pub fn denormalize(&self, z: Tensor<4>) -> Tensor<4> {
        let z = z.cast(self.precision.float());
        let c = z.dims()[1];
        z.mul(self.bn_std.clone().reshape([1, c, 1, 1]))
            .add(self.bn_mean.clone().reshape([1, c, 1, 1]))
    }
}
