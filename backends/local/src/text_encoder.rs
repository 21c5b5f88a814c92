//! The Qwen3 text encoder: the residual stream after selected decoder layers, stacked per token.
//!
//! Only the layers up to the deepest one requested are loaded and run (27 of Qwen3-4B's 36 for
//! klein); the final norm and the LM head are never used. Attention uses a causal plus key-padding
//! mask, so the hidden states at pad positions (which the transformer does see) are computed from
//! the real tokens only, as in the reference.

use std::path::Path;

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use crate::config::Qwen3Config;
use crate::error::EngineError;
use crate::nn::{lin, rms_norm, sdpa, silu, LinearWeight};
use crate::precision::Precision;
use crate::weights::{Source, WeightStore};

struct Layer {
    input_norm: Tensor<1>,
    /// q, k and v projections side by side `[hidden, (heads + 2 kv heads) * head_dim]`: one
    /// matmul instead of three.
    qkv: LinearWeight,
    o: LinearWeight,
    q_norm: Tensor<1>,
    k_norm: Tensor<1>,
    post_norm: Tensor<1>,
    /// gate and up projections side by side `[hidden, 2 * intermediate]`.
    gate_up: LinearWeight,
    down: LinearWeight,
}

pub struct TextEncoder {
    pub config: Qwen3Config,
    embed: Tensor<2>,
    layers: Vec<Layer>,
    device: Device,
    precision: Precision,
    /// Bytes of weights held on the device.
    weight_bytes: u64,
}

/// The weight names of the Hugging Face Qwen3 layout, in one place.
fn layer_name(i: usize, part: &str) -> String {
    format!("model.layers.{i}.{part}.weight")
}

impl TextEncoder {
    /// Load `text_encoder/` with as many layers as the deepest of `out_layers` needs.
    pub fn load(dir: &Path, out_layers: &[usize], device: &Device) -> Result<Self, EngineError> {
        Self::load_from(dir, out_layers, Source::Files, device, Precision::F32)
    }

    /// [`load`](Self::load) with the weights from `source` (the config always from `dir`).
    pub fn load_from(
        dir: &Path,
        out_layers: &[usize],
        source: Source,
        device: &Device,
        precision: Precision,
    ) -> Result<Self, EngineError> {
        let config = Qwen3Config::load(&dir.join("config.json"))?;
        let deepest = out_layers.iter().copied().max().unwrap_or(0);
        if deepest == 0 || deepest >= config.num_hidden_layers {
            // hidden_states[num_hidden_layers] is the *normed* final state in the reference, not
            // a residual tap; the klein pipeline never asks for it.
            return Err(EngineError::Config {
                path: dir.join("config.json").display().to_string(),
                message: format!(
                    "text encoder output layers {out_layers:?} must lie in 1..{}",
                    config.num_hidden_layers
                ),
            });
        }
        let w = WeightStore::open_from(dir, "model", source, device, precision)?;
        let h = config.hidden_size;
        let hd = config.head_dim();
        let (nh, nkv, inter) = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.intermediate_size,
        );
        let embed = w.tensor("model.embed_tokens.weight", [config.vocab_size, h])?;
        let mut layers = Vec::with_capacity(deepest);
        for i in 0..deepest {
            let qkv = w.linear_fused(
                &[
                    (layer_name(i, "self_attn.q_proj").as_str(), nh * hd),
                    (layer_name(i, "self_attn.k_proj").as_str(), nkv * hd),
                    (layer_name(i, "self_attn.v_proj").as_str(), nkv * hd),
                ],
                h,
            )?;
            let gate_up = w.linear_fused(
                &[
                    (layer_name(i, "mlp.gate_proj").as_str(), inter),
                    (layer_name(i, "mlp.up_proj").as_str(), inter),
                ],
                h,
            )?;
            layers.push(Layer {
                input_norm: w.tensor(&layer_name(i, "input_layernorm"), [h])?,
                qkv,
                o: w.linear(&layer_name(i, "self_attn.o_proj"), nh * hd, h)?,
                q_norm: w.tensor(&layer_name(i, "self_attn.q_norm"), [hd])?,
                k_norm: w.tensor(&layer_name(i, "self_attn.k_norm"), [hd])?,
                post_norm: w.tensor(&layer_name(i, "post_attention_layernorm"), [h])?,
                gate_up,
                down: w.linear(&layer_name(i, "mlp.down_proj"), inter, h)?,
            });
        }
        Ok(TextEncoder {
            config,
            embed,
            layers,
            device: device.clone(),
            precision,
            weight_bytes: w.bytes_made(),
        })
    }

    /// Rotate-half RoPE tables `[L, head_dim]` for positions 0..L, in f32 as the reference.
    fn rope(&self, len: usize) -> (Tensor<2>, Tensor<2>) {
        let hd = self.config.head_dim();
        let theta = self.config.rope_theta().unwrap_or(1e6) as f32;
        let inv: Vec<f32> = (0..hd / 2)
            .map(|m| 1.0 / theta.powf((2 * m) as f32 / hd as f32))
            .collect();
        let mut cos = Vec::with_capacity(len * hd);
        let mut sin = Vec::with_capacity(len * hd);
        for p in 0..len {
            for _half in 0..2 {
                for f in &inv {
                    let a = (p as f32 * f) as f64;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        (
            Tensor::from_data(TensorData::new(cos, [len, hd]), &self.device),
            Tensor::from_data(TensorData::new(sin, [len, hd]), &self.device),
        )
    }

    /// Encode `ids`/`mask` (`batch` rows of `len`), returning every hidden state up to the deepest
    /// requested layer: `states[0]` = embeddings, `states[k]` = after decoder layer k. (For the
    /// parity tests: serving uses [`encode`](Self::encode), which keeps only its taps.)
    pub fn hidden_states(
        &self,
        ids: &[u32],
        mask: &[u32],
        batch: usize,
        len: usize,
    ) -> Result<Vec<Tensor<3>>, EngineError> {
        let kept = self.run(ids, mask, batch, len, &|_| true)?;
        Ok(kept.into_iter().map(|(_, t)| t).collect())
    }

    /// Run the layers, keeping the hidden states `keep` names, as (index, state).
    fn run(
        &self,
        ids: &[u32],
        mask: &[u32],
        batch: usize,
        len: usize,
        keep: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<(usize, Tensor<3>)>, EngineError> {
        if ids.len() != batch * len || mask.len() != batch * len {
            return Err(EngineError::Input(format!(
                "expected {batch}x{len} token ids and mask values, got {} and {}",
                ids.len(),
                mask.len()
            )));
        }
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(EngineError::Input(format!(
                "token id {bad} is outside the vocabulary"
            )));
        }
        let c = &self.config;
        let (h, hd, nh, nkv) = (
            c.hidden_size,
            c.head_dim(),
            c.num_attention_heads,
            c.num_key_value_heads,
        );
        let idx = Tensor::<1, Int>::from_data(
            TensorData::new(
                ids.iter().map(|&t| t as i64).collect::<Vec<_>>(),
                [batch * len],
            ),
            &self.device,
        );
        let mut x: Tensor<3> = self.embed.clone().select(0, idx).reshape([batch, len, h]);

        // Causal + key padding: query i may see key j iff j <= i and j is a real token.
        let mut m = Vec::with_capacity(batch * len * len);
        for b in 0..batch {
            for i in 0..len {
                for j in 0..len {
                    m.push(j > i || mask[b * len + j] == 0);
                }
            }
        }
        let attn_mask =
            Tensor::<4, Bool>::from_data(TensorData::new(m, [batch, 1, len, len]), &self.device)
                .expand([batch, nh, len, len]);
        let (cos, sin) = self.rope(len);
        // transformers computes the tables in f32 and rotates in the compute dtype with tables
        // rounded to it (`cos.to(x.dtype)`), each product and the sum rounding on their own.
        let dtype = self.precision.float();
        let cos = cos.reshape([1, 1, len, hd]).cast(dtype);
        // Rotate-half, (h0, h1) -> (-h1, h0): the halves swapped (one roll) times the sine with
        // its first half negated.
        let sign = Tensor::<1>::from_data(
            TensorData::new(
                (0..hd)
                    .map(|i| if i < hd / 2 { -1f32 } else { 1.0 })
                    .collect::<Vec<_>>(),
                [hd],
            ),
            &self.device,
        );
        let sin = sin
            .mul(sign.reshape([1, hd]))
            .reshape([1, 1, len, hd])
            .cast(dtype);
        let rotate = |t: Tensor<4>| -> Tensor<4> {
            let rot = t.clone().roll_dim(hd / 2, 3);
            t.mul(cos.clone()).add(rot.mul(sin.clone()))
        };
        let eps = c.rms_norm_eps;
        let rep = nh / nkv;

        let mut states = Vec::new();
        if keep(0) {
            states.push((0, x.clone()));
        }
        for (i, l) in self.layers.iter().enumerate() {
            let hn = rms_norm(x.clone(), &l.input_norm, eps);
            let qkv = lin(hn, &l.qkv).split_with_sizes(vec![nh * hd, nkv * hd, nkv * hd], 2);
            let q = rms_norm(qkv[0].clone().reshape([batch, len, nh, hd]), &l.q_norm, eps)
                .swap_dims(1, 2);
            let k = rms_norm(
                qkv[1].clone().reshape([batch, len, nkv, hd]),
                &l.k_norm,
                eps,
            )
            .swap_dims(1, 2);
            let v = qkv[2]
                .clone()
                .reshape([batch, len, nkv, hd])
                .swap_dims(1, 2);
            let (q, k) = (rotate(q), rotate(k));
            // GQA: query head j reads kv head j / rep.
            let k = k
                .unsqueeze_dim::<5>(2)
                .expand([batch, nkv, rep, len, hd])
                .reshape([batch, nh, len, hd]);
            let v = v
                .unsqueeze_dim::<5>(2)
                .expand([batch, nkv, rep, len, hd])
                .reshape([batch, nh, len, hd]);
            let a = sdpa(q, k, v, Some(attn_mask.clone()))
                .swap_dims(1, 2)
                .reshape([batch, len, nh * hd]);
            x = x.add(lin(a, &l.o));
            let hn = rms_norm(x.clone(), &l.post_norm, eps);
            let gu = lin(hn, &l.gate_up).chunk(2, 2);
            let mlp = lin(silu(gu[0].clone()).mul(gu[1].clone()), &l.down);
            x = x.add(mlp);
            if keep(i + 1) {
                states.push((i + 1, x.clone()));
            }
        }
        Ok(states)
    }

    /// The stacked prompt embeddings `[B, L, layers * hidden]` fed to the transformer.
    pub fn encode(
        &self,
        ids: &[u32],
        mask: &[u32],
        batch: usize,
        len: usize,
        out_layers: &[usize],
    ) -> Result<Tensor<3>, EngineError> {
        // Only the taps stay alive (not every layer's output).
        let states = self.run(ids, mask, batch, len, &|k| out_layers.contains(&k))?;
        let taps = out_layers
            .iter()
            .map(|&l| {
                states
                    .iter()
                    .find(|(k, _)| *k == l)
                    .map(|(_, t)| t.clone())
                    .ok_or_else(|| {
                        EngineError::Input(format!(
                            "layer {l} was not loaded (loaded {})",
                            self.layers.len()
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Tensor::cat(taps, 2))
    }
}

impl TextEncoder {
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Bytes of weights this model holds on its device.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }
}
