//! The flux2 transformer of FLUX.2 [klein] (diffusers `Flux2Transformer2DModel` layout):
//! double-stream blocks over separate text and image streams with joint attention, then
//! single-stream blocks over the concatenation; modulation computed once from the timestep and
//! shared by every block of a kind; 4-axis interleaved RoPE; RMS q/k norms; SwiGLU MLPs; no biases.

use std::path::Path;

use burn::tensor::{Device, FloatDType, Tensor, TensorData};

use crate::config::Flux2Config;
use crate::error::EngineError;
use crate::nn::{lin, rms_norm, sdpa, silu, swiglu};
use crate::precision::Precision;
use crate::weights::{Source, WeightStore};

struct DoubleBlock {
    /// The image stream's q, k and v projections side by side `[d, 3d]` (one matmul).
    to_qkv: Tensor<2>,
    norm_q: Tensor<1>,
    norm_k: Tensor<1>,
    /// The text stream's, likewise.
    add_qkv: Tensor<2>,
    norm_added_q: Tensor<1>,
    norm_added_k: Tensor<1>,
    to_out: Tensor<2>,
    to_add_out: Tensor<2>,
    ff_in: Tensor<2>,
    ff_out: Tensor<2>,
    ff_ctx_in: Tensor<2>,
    ff_ctx_out: Tensor<2>,
}

struct SingleBlock {
    qkv_mlp: Tensor<2>,
    norm_q: Tensor<1>,
    norm_k: Tensor<1>,
    to_out: Tensor<2>,
}

pub struct Transformer {
    pub config: Flux2Config,
    x_embedder: Tensor<2>,
    context_embedder: Tensor<2>,
    time_1: Tensor<2>,
    time_2: Tensor<2>,
    mod_img: Tensor<2>,
    mod_txt: Tensor<2>,
    mod_single: Tensor<2>,
    double: Vec<DoubleBlock>,
    single: Vec<SingleBlock>,
    norm_out: Tensor<2>,
    proj_out: Tensor<2>,
    device: Device,
    precision: Precision,
    /// Bytes of weights held on the device.
    weight_bytes: u64,
}

/// Intermediate values recorded for parity tests (`None` in normal runs).
pub type Trace = Vec<(String, Vec<f32>, Vec<usize>)>;

fn record<const D: usize>(trace: &mut Option<&mut Trace>, name: impl Into<String>, t: &Tensor<D>) {
    if let Some(tr) = trace.as_deref_mut() {
        let dims = t.dims().to_vec();
        let v = t
            .clone()
            .cast(FloatDType::F32)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap_or_default();
        tr.push((name.into(), v, dims));
    }
}

impl Transformer {
    pub fn load(dir: &Path, device: &Device) -> Result<Self, EngineError> {
        Self::load_from(dir, Source::Files, device, Precision::F32)
    }

    /// [`load`](Self::load) with the weights from `source` (the config always from `dir`), held
    /// and computed in `precision`.
    pub fn load_from(
        dir: &Path,
        source: Source,
        device: &Device,
        precision: Precision,
    ) -> Result<Self, EngineError> {
        let config = Flux2Config::load(&dir.join("config.json"))?;
        let w = WeightStore::open_from(dir, "diffusion_pytorch_model", source, device, precision)?;
        let d = config.inner_dim();
        let hd = config.attention_head_dim;
        let m = config.mlp_hidden();
        let t_ch = config.timestep_guidance_channels;
        let mut double = Vec::new();
        for i in 0..config.num_layers {
            let n = |part: &str| format!("transformer_blocks.{i}.{part}.weight");
            let fused = |names: [&str; 3]| -> Result<Tensor<2>, EngineError> {
                let parts = names
                    .iter()
                    .map(|p| w.linear(&n(p), d, d))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Tensor::cat(parts, 1))
            };
            double.push(DoubleBlock {
                to_qkv: fused(["attn.to_q", "attn.to_k", "attn.to_v"])?,
                norm_q: w.tensor(&n("attn.norm_q"), [hd])?,
                norm_k: w.tensor(&n("attn.norm_k"), [hd])?,
                add_qkv: fused(["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"])?,
                norm_added_q: w.tensor(&n("attn.norm_added_q"), [hd])?,
                norm_added_k: w.tensor(&n("attn.norm_added_k"), [hd])?,
                to_out: w.linear(&n("attn.to_out.0"), d, d)?,
                to_add_out: w.linear(&n("attn.to_add_out"), d, d)?,
                ff_in: w.linear(&n("ff.linear_in"), d, 2 * m)?,
                ff_out: w.linear(&n("ff.linear_out"), m, d)?,
                ff_ctx_in: w.linear(&n("ff_context.linear_in"), d, 2 * m)?,
                ff_ctx_out: w.linear(&n("ff_context.linear_out"), m, d)?,
            });
        }
        let mut single = Vec::new();
        for i in 0..config.num_single_layers {
            let n = |part: &str| format!("single_transformer_blocks.{i}.{part}.weight");
            single.push(SingleBlock {
                qkv_mlp: w.linear(&n("attn.to_qkv_mlp_proj"), d, 3 * d + 2 * m)?,
                norm_q: w.tensor(&n("attn.norm_q"), [hd])?,
                norm_k: w.tensor(&n("attn.norm_k"), [hd])?,
                to_out: w.linear(&n("attn.to_out"), d + m, d)?,
            });
        }
        Ok(Transformer {
            x_embedder: w.linear("x_embedder.weight", config.in_channels, d)?,
            context_embedder: w.linear("context_embedder.weight", config.joint_attention_dim, d)?,
            time_1: w.linear(
                "time_guidance_embed.timestep_embedder.linear_1.weight",
                t_ch,
                d,
            )?,
            time_2: w.linear(
                "time_guidance_embed.timestep_embedder.linear_2.weight",
                d,
                d,
            )?,
            mod_img: w.linear("double_stream_modulation_img.linear.weight", d, 6 * d)?,
            mod_txt: w.linear("double_stream_modulation_txt.linear.weight", d, 6 * d)?,
            mod_single: w.linear("single_stream_modulation.linear.weight", d, 3 * d)?,
            norm_out: w.linear("norm_out.linear.weight", d, 2 * d)?,
            proj_out: w.linear("proj_out.weight", d, config.out_channels())?,
            double,
            single,
            config,
            device: device.clone(),
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

    /// Sinusoidal embedding of `t` (already x1000), cos half first, in f32 as the reference.
    fn timestep_embedding(&self, t: f32, batch: usize) -> Tensor<2> {
        let ch = self.config.timestep_guidance_channels;
        let half = ch / 2;
        let ln = -(10000f32.ln());
        let mut v = Vec::with_capacity(ch);
        let args: Vec<f32> = (0..half)
            .map(|j| t * ((ln * j as f32) / half as f32).exp())
            .collect();
        v.extend(args.iter().map(|a| (*a as f64).cos() as f32));
        v.extend(args.iter().map(|a| (*a as f64).sin() as f32));
        let row = Tensor::<2>::from_data(TensorData::new(v, [1, ch]), &self.device);
        row.expand([batch, ch])
    }

    /// Interleaved 4-axis RoPE tables `[S, head_dim]` for position ids `[S, n_axes]`.
    pub fn rope(&self, ids: &[[i64; 4]]) -> (Tensor<2>, Tensor<2>) {
        let hd = self.config.attention_head_dim;
        let theta = self.config.rope_theta;
        let mut cos = Vec::with_capacity(ids.len() * hd);
        let mut sin = Vec::with_capacity(ids.len() * hd);
        for id in ids {
            for (axis, &dim) in self.config.axes_dims_rope.iter().enumerate() {
                let pos = id.get(axis).copied().unwrap_or(0) as f64;
                for j in 0..dim / 2 {
                    let freq = 1.0 / theta.powf((2 * j) as f64 / dim as f64);
                    let a = pos * freq;
                    let (c, s) = (a.cos() as f32, a.sin() as f32);
                    cos.extend([c, c]);
                    sin.extend([s, s]);
                }
            }
        }
        let s = ids.len();
        (
            Tensor::from_data(TensorData::new(cos, [s, hd]), &self.device),
            Tensor::from_data(TensorData::new(sin, [s, hd]), &self.device),
        )
    }

    /// Run the transformer. `x`: image (+ reference) tokens `[B, N, in_channels]`; `ctx`: prompt
    /// embeddings `[B, L, joint_attention_dim]`; `t`: the timestep fed to the sinusoid (sigma x
    /// 1000, rounded as the compute dtype demands, see `schedule::model_timestep`); ids: text
    /// ids then image ids. Returns `[B, N, out_channels]` for all N tokens.
    pub fn forward(
        &self,
        x: Tensor<3>,
        ctx: Tensor<3>,
        t: f32,
        txt_ids: &[[i64; 4]],
        img_ids: &[[i64; 4]],
        mut trace: Option<&mut Trace>,
    ) -> Result<Tensor<3>, EngineError> {
        let c = &self.config;
        let [b, n, cin] = x.dims();
        let [bc, l, cj] = ctx.dims();
        if cin != c.in_channels
            || cj != c.joint_attention_dim
            || bc != b
            || l != txt_ids.len()
            || n != img_ids.len()
        {
            return Err(EngineError::Input(format!(
                "transformer inputs do not fit its config: x {:?} (in_channels {}), context {:?} (joint_attention_dim {}), {} text ids, {} image ids",
                x.dims(), c.in_channels, ctx.dims(), c.joint_attention_dim, txt_ids.len(), img_ids.len()
            )));
        }
        let d = c.inner_dim();
        let (nh, hd, eps) = (c.num_attention_heads, c.attention_head_dim, c.eps);
        let m = c.mlp_hidden();
        let dtype = self.precision.float();
        let (x, ctx) = (x.cast(dtype), ctx.cast(dtype));
        // f16 tops out at 65504: the reference clips the text stream after each double block and
        // the joint stream after each single block.
        let clip = |t: Tensor<3>| -> Tensor<3> {
            if self.precision == Precision::F16 {
                t.clamp(-65504.0, 65504.0)
            } else {
                t
            }
        };

        // The sinusoid is computed in f32 and rounded to the compute dtype before the MLP.
        let temb = lin(
            silu(lin(self.timestep_embedding(t, b).cast(dtype), &self.time_1)),
            &self.time_2,
        );
        record(&mut trace, "temb", &temb);
        let act = silu(temb.clone());
        let mod_img = lin(act.clone(), &self.mod_img);
        let mod_txt = lin(act.clone(), &self.mod_txt);
        let mod_single = lin(act.clone(), &self.mod_single);
        record(&mut trace, "mod_double_img", &mod_img);
        record(&mut trace, "mod_double_txt", &mod_txt);
        record(&mut trace, "mod_single", &mod_single);
        let chunks = |t: Tensor<2>, k: usize| -> Vec<Tensor<3>> {
            t.chunk(k, 1)
                .into_iter()
                .map(|c| c.unsqueeze_dim::<3>(1))
                .collect()
        };
        let mi = chunks(mod_img, 6);
        let mt = chunks(mod_txt, 6);
        let ms = chunks(mod_single, 3);

        let mut img = lin(x, &self.x_embedder);
        let mut txt = lin(ctx, &self.context_embedder);
        record(&mut trace, "x_embedded", &img);
        record(&mut trace, "context_embedded", &txt);

        let all_ids: Vec<[i64; 4]> = txt_ids.iter().chain(img_ids).copied().collect();
        let (cos, sin) = self.rope(&all_ids);
        record(&mut trace, "rope_cos", &cos);
        record(&mut trace, "rope_sin", &sin);
        let s = l + n;
        let cos = cos.reshape([1, 1, s, hd]);
        // Interleaved pairs (x0, x1) rotate to (x0 c - x1 s, x1 c + x0 s): the pair swapped
        // (one flip) times the sine with the even entries negated.
        let sign = Tensor::<1>::from_data(
            TensorData::new(
                (0..hd)
                    .map(|i| if i % 2 == 0 { -1f32 } else { 1.0 })
                    .collect::<Vec<_>>(),
                [hd],
            ),
            &self.device,
        );
        let sin = sin.mul(sign.reshape([1, hd])).reshape([1, 1, s, hd]);
        // Applied in f32 with f32 tables and rounded once, as the reference does.
        let rope = |t: Tensor<4>| -> Tensor<4> {
            crate::nn::in_f32(t, |t| {
                let [bb, hh, ss, dd] = t.dims();
                let swapped = t
                    .clone()
                    .reshape([bb, hh, ss, dd / 2, 2])
                    .flip([4])
                    .reshape([bb, hh, ss, dd]);
                t.mul(cos.clone()).add(swapped.mul(sin.clone()))
            })
        };
        let heads = |t: Tensor<3>, len: usize| t.reshape([b, len, nh, hd]);
        let modulate = |t: Tensor<3>, shift: &Tensor<3>, scale: &Tensor<3>| {
            crate::nn::modulate(t, shift, scale, eps)
        };
        let attend = |q: Tensor<4>, k: Tensor<4>, v: Tensor<4>| -> Tensor<3> {
            sdpa(rope(q), rope(k), v, None)
                .swap_dims(1, 2)
                .reshape([b, s, d])
        };

        for (i, blk) in self.double.iter().enumerate() {
            let ni = modulate(img.clone(), &mi[0], &mi[1]);
            let nt = modulate(txt.clone(), &mt[0], &mt[1]);
            let ti = lin(ni, &blk.to_qkv).chunk(3, 2);
            let tt = lin(nt, &blk.add_qkv).chunk(3, 2);
            let q = Tensor::cat(
                vec![
                    rms_norm(heads(tt[0].clone(), l), &blk.norm_added_q, eps),
                    rms_norm(heads(ti[0].clone(), n), &blk.norm_q, eps),
                ],
                1,
            );
            let k = Tensor::cat(
                vec![
                    rms_norm(heads(tt[1].clone(), l), &blk.norm_added_k, eps),
                    rms_norm(heads(ti[1].clone(), n), &blk.norm_k, eps),
                ],
                1,
            );
            let v = Tensor::cat(vec![heads(tt[2].clone(), l), heads(ti[2].clone(), n)], 1);
            let a = attend(q.swap_dims(1, 2), k.swap_dims(1, 2), v.swap_dims(1, 2));
            let a_txt = a.clone().narrow(1, 0, l);
            let a_img = a.narrow(1, l, n);
            img = img.add(mi[2].clone().mul(lin(a_img, &blk.to_out)));
            txt = txt.add(mt[2].clone().mul(lin(a_txt, &blk.to_add_out)));
            let ff = lin(
                swiglu(lin(modulate(img.clone(), &mi[3], &mi[4]), &blk.ff_in)),
                &blk.ff_out,
            );
            img = img.add(mi[5].clone().mul(ff));
            let ff = lin(
                swiglu(lin(modulate(txt.clone(), &mt[3], &mt[4]), &blk.ff_ctx_in)),
                &blk.ff_ctx_out,
            );
            txt = clip(txt.add(mt[5].clone().mul(ff)));
            record(&mut trace, format!("double_block.{i}.txt"), &txt);
            record(&mut trace, format!("double_block.{i}.img"), &img);
        }

        let mut h = Tensor::cat(vec![txt, img], 1);
        for (i, blk) in self.single.iter().enumerate() {
            let proj = lin(modulate(h.clone(), &ms[0], &ms[1]), &blk.qkv_mlp);
            let parts = proj.split_with_sizes(vec![d, d, d, 2 * m], 2);
            let q = rms_norm(heads(parts[0].clone(), s), &blk.norm_q, eps).swap_dims(1, 2);
            let k = rms_norm(heads(parts[1].clone(), s), &blk.norm_k, eps).swap_dims(1, 2);
            let v = heads(parts[2].clone(), s).swap_dims(1, 2);
            let a = attend(q, k, v);
            let out = lin(
                Tensor::cat(vec![a, swiglu(parts[3].clone())], 2),
                &blk.to_out,
            );
            h = clip(h.add(ms[2].clone().mul(out)));
            record(&mut trace, format!("single_block.{i}"), &h);
        }

        let img = h.narrow(1, l, n);
        let mut so = lin(act, &self.norm_out)
            .chunk(2, 1)
            .into_iter()
            .map(|c| c.unsqueeze_dim::<3>(1));
        let (scale, shift) = match (so.next(), so.next()) {
            (Some(a), Some(b)) => (a, b),
            _ => unreachable!("chunk(2) yields two parts"),
        };
        let img = modulate(img, &shift, &scale);
        record(&mut trace, "norm_out", &img);
        Ok(lin(img, &self.proj_out))
    }
}
