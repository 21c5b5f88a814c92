//! The flux2 transformer of FLUX.2 [klein] (diffusers `Flux2Transformer2DModel` layout):
//! double-stream blocks over separate text and image streams with joint attention, then
//! single-stream blocks over the concatenation; modulation computed once from the timestep and
//! shared by every block of a kind; 4-axis interleaved RoPE; RMS q/k norms; SwiGLU MLPs; no biases.
//!
//! Each part is its own struct that loads its weights by their checkpoint names in `new` and runs
//! in `forward`: `TimestepEmbedder`, `Modulation`, `DoubleBlock`, `SingleBlock`, `FinalLayer`;
//! [`Transformer::forward`] embeds, computes the shared modulation and RoPE tables, then loops
//! over the blocks. [`Transformer::forward_traced`] is the same computation with its intermediate
//! values handed to a hook, for parity tests ([`crate::trace`]).

use std::path::Path;

use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};

use crate::config::Flux2Config;
use crate::error::EngineError;
use crate::nn::{lin, lin_joined, rms_norm, sdpa, silu, LinearWeight};
use crate::precision::Precision;
use crate::trace::{Hook, Taps};
use crate::weights::{Source, WeightStore};

/// One (shift, scale, gate) triple of a modulation, each `[B, 1, d]`.
struct ModParams {
    shift: Tensor<3>,
    scale: Tensor<3>,
    gate: Tensor<3>,
}

impl ModParams {
    /// `layer_norm(x) * (1 + scale) + shift`.
    fn modulate(&self, x: Tensor<3>, eps: f64) -> Tensor<3> {
        crate::nn::modulate(x, &self.shift, &self.scale, eps)
    }

    /// The gated residual `x + gate * y` (one pass in f32 on the CPU).
    fn gated_add(&self, x: Tensor<3>, y: Tensor<3>) -> Tensor<3> {
        if let Some(r) = crate::cpu::elementwise::gated_add(&x, &self.gate, &y) {
            return r;
        }
        x.add(self.gate.clone().mul(y))
    }
}

/// A modulation projection (`double_stream_modulation_img`, `..._txt`,
/// `single_stream_modulation`): SiLU(temb) to `sets` (shift, scale, gate) triples, computed once
/// per forward and shared by every block of its kind.
struct Modulation {
    linear: LinearWeight,
    sets: usize,
}

impl Modulation {
    fn new(w: &WeightStore, name: &str, d: usize, sets: usize) -> Result<Self, EngineError> {
        Ok(Modulation {
            linear: w.linear(&format!("{name}.linear.weight"), d, 3 * sets * d)?,
            sets,
        })
    }

    /// `[B, 3 * sets * d]`, as the reference names it (see [`Self::split`]).
    fn forward(&self, act: Tensor<2>) -> Tensor<2> {
        lin(act, &self.linear)
    }

    /// The triples of [`Self::forward`]'s output, in order.
    fn split(&self, m: Tensor<2>) -> Vec<ModParams> {
        let mut chunks = m
            .chunk(3 * self.sets, 1)
            .into_iter()
            .map(|c| c.unsqueeze_dim::<3>(1))
            .collect::<Vec<_>>()
            .into_iter();
        let mut next = || chunks.next().expect("three chunks per set");
        (0..self.sets)
            .map(|_| ModParams {
                shift: next(),
                scale: next(),
                gate: next(),
            })
            .collect()
    }
}

/// `time_guidance_embed.timestep_embedder`: the timestep's sinusoid through a SiLU MLP.
struct TimestepEmbedder {
    linear_1: LinearWeight,
    linear_2: LinearWeight,
    channels: usize,
}

impl TimestepEmbedder {
    fn new(w: &WeightStore, channels: usize, d: usize) -> Result<Self, EngineError> {
        let n = |part: &str| format!("time_guidance_embed.timestep_embedder.{part}.weight");
        Ok(TimestepEmbedder {
            linear_1: w.linear(&n("linear_1"), channels, d)?,
            linear_2: w.linear(&n("linear_2"), d, d)?,
            channels,
        })
    }

    /// Sinusoidal embedding of `t` (already x1000), cos half first, in f32 as the reference.
    fn sinusoid(&self, t: f32, batch: usize, device: &Device) -> Tensor<2> {
        let ch = self.channels;
        let half = ch / 2;
        let ln = -(10000f32.ln());
        let mut v = Vec::with_capacity(ch);
        let args: Vec<f32> = (0..half)
            .map(|j| t * ((ln * j as f32) / half as f32).exp())
            .collect();
        v.extend(args.iter().map(|a| (*a as f64).cos() as f32));
        v.extend(args.iter().map(|a| (*a as f64).sin() as f32));
        let row = Tensor::<2>::from_data(TensorData::new(v, [1, ch]), device);
        row.expand([batch, ch])
    }

    /// `temb` `[B, d]` in `dtype`: the sinusoid is computed in f32 and rounded to the compute
    /// dtype before the MLP.
    fn forward(&self, t: f32, batch: usize, dtype: FloatDType, device: &Device) -> Tensor<2> {
        lin(
            silu(lin(
                self.sinusoid(t, batch, device).cast(dtype),
                &self.linear_1,
            )),
            &self.linear_2,
        )
    }
}

/// One forward's RoPE tables, shaped for `[B, heads, S, head_dim]`.
struct Rope {
    cos: Tensor<4>,
    /// The sine with the even entries negated (see [`Self::apply`]).
    sin: Tensor<4>,
    /// The same two as `[S, head_dim]` rows, for the CPU kernel that rotates while it norms.
    rows: (Tensor<2>, Tensor<2>),
}

impl Rope {
    /// From the `[S, head_dim]` tables of [`Transformer::rope`].
    fn new(cos: Tensor<2>, sin: Tensor<2>) -> Self {
        let [s, hd] = cos.dims();
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
            &sin.device(),
        );
        let sin = sin.mul(sign.reshape([1, hd]));
        Rope {
            rows: (cos.clone().reshape([s, hd]), sin.clone()),
            cos,
            sin: sin.reshape([1, 1, s, hd]),
        }
    }

    /// Rotate `t` `[B, heads, S, head_dim]`: in f32 with f32 tables and rounded once, as the
    /// reference does.
    fn apply(&self, t: Tensor<4>) -> Tensor<4> {
        crate::nn::in_f32(t, |t| {
            let [bb, hh, ss, dd] = t.dims();
            let swapped = t
                .clone()
                .reshape([bb, hh, ss, dd / 2, 2])
                .flip([4])
                .reshape([bb, hh, ss, dd]);
            t.mul(self.cos.clone()).add(swapped.mul(self.sin.clone()))
        })
    }
}

/// `[B, len, heads * head_dim]` split into heads: `[B, len, heads, head_dim]`.
fn heads(t: Tensor<3>, heads: usize, head_dim: usize) -> Tensor<4> {
    // On the CPU a view of the same storage: the projections' chunks are not contiguous, and
    // burn-flex's reshape would copy them first.
    if let Some(v) = crate::cpu::split_last::<3, 4>(&t, heads) {
        if v.dims()[3] == head_dim {
            return v;
        }
    }
    let [b, len, _] = t.dims();
    t.reshape([b, len, heads, head_dim])
}

/// Attention over `[B, heads, S, head_dim]` with RoPE on q and k; `[B, S, heads * head_dim]`.
fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, rope: &Rope) -> Tensor<3> {
    let [b, nh, s, hd] = q.dims();
    sdpa(rope.apply(q), rope.apply(k), v, None)
        .swap_dims(1, 2)
        .reshape([b, s, nh * hd])
}

/// One stream's share of a joint attention: its q, k and v projections split into heads
/// `[B, len, heads, head_dim]`, and its q and k RMS-norm scales.
struct Stream<'a> {
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    norm_q: &'a Tensor<1>,
    norm_k: &'a Tensor<1>,
}

impl<'a> Stream<'a> {
    /// The next three projections of `parts` (`[B, len, heads * head_dim]` each) as q, k, v.
    fn new(
        parts: &mut impl Iterator<Item = Tensor<3>>,
        (nh, hd): (usize, usize),
        norm_q: &'a Tensor<1>,
        norm_k: &'a Tensor<1>,
    ) -> Self {
        let mut next = || heads(parts.next().expect("q, k and v projections"), nh, hd);
        Stream {
            q: next(),
            k: next(),
            v: next(),
            norm_q,
            norm_k,
        }
    }
}

/// Attention over the streams one after the other along the sequence (text, then image): q and
/// k RMS-normed per stream and rotated, `[B, S_total, heads * head_dim]` out. In f32 on the CPU
/// q, k and v are each normed, rotated and laid out in one pass from the projections' slices
/// ([`crate::cpu::norm::join_heads`]) and attention writes its rows in this output's layout;
/// otherwise burn's ops (norm, cat, RoPE, attention, transpose).
fn joint_attention(streams: &[Stream<'_>], rope: &Rope, eps: f64) -> Tensor<3> {
    use crate::cpu::norm::{join_heads, Part, RopeTables};
    type Pick = for<'s, 'a> fn(&'s Stream<'a>) -> (&'s Tensor<4>, Option<&'s Tensor<1>>);
    let (q, k, v): (Pick, Pick, Pick) = (
        |s| (&s.q, Some(s.norm_q)),
        |s| (&s.k, Some(s.norm_k)),
        |s| (&s.v, None),
    );
    let tables = RopeTables {
        cos: &rope.rows.0,
        sin: &rope.rows.1,
    };
    let join = |pick: Pick, rotate: bool| {
        let parts: Vec<Part<'_>> = streams
            .iter()
            .map(|s| {
                let (x, norm) = pick(s);
                Part { x, norm }
            })
            .collect();
        join_heads(&parts, rotate.then_some(&tables), eps).map(|t| t.swap_dims(1, 2))
    };
    let fused = || crate::cpu::attention::sdpa(&join(q, true)?, &join(k, true)?, &join(v, false)?);
    let a = match fused() {
        Some(a) => a,
        None => {
            // Normed per stream, joined, rotated by `attention`.
            let joined = |pick: Pick| {
                let parts = streams.iter().map(|s| match pick(s) {
                    (x, Some(w)) => rms_norm(x.clone(), w, eps),
                    (x, None) => x.clone(),
                });
                Tensor::cat(parts.collect(), 1).swap_dims(1, 2)
            };
            return attention(joined(q), joined(k), joined(v), rope);
        }
    };
    let [b, nh, s, hd] = a.dims();
    a.swap_dims(1, 2).reshape([b, s, nh * hd])
}

/// f16 tops out at 65504: the reference clips the text stream after each double block and the
/// joint stream after each single block.
fn clip_f16(t: Tensor<3>) -> Tensor<3> {
    if t.dtype() == DType::F16 {
        t.clamp(-65504.0, 65504.0)
    } else {
        t
    }
}

/// A double-stream block (`transformer_blocks.{i}`): the text and image streams, each
/// modulated, attend jointly (text tokens first), then each goes through its own SwiGLU MLP.
struct DoubleBlock {
    /// The image stream's q, k and v projections side by side `[d, 3d]` (one matmul).
    to_qkv: LinearWeight,
    norm_q: Tensor<1>,
    norm_k: Tensor<1>,
    /// The text stream's, likewise.
    add_qkv: LinearWeight,
    norm_added_q: Tensor<1>,
    norm_added_k: Tensor<1>,
    to_out: LinearWeight,
    to_add_out: LinearWeight,
    ff_in: LinearWeight,
    ff_out: LinearWeight,
    ff_ctx_in: LinearWeight,
    ff_ctx_out: LinearWeight,
    heads: usize,
    head_dim: usize,
    eps: f64,
}

impl DoubleBlock {
    /// The block's weights, named `{prefix}.{part}.weight`.
    fn new(w: &WeightStore, c: &Flux2Config, prefix: &str) -> Result<Self, EngineError> {
        let (d, hd, m) = (c.inner_dim(), c.attention_head_dim, c.mlp_hidden());
        let n = |part: &str| format!("{prefix}.{part}.weight");
        let fused = |names: [&str; 3]| {
            let names = names.map(n);
            w.linear_fused(&names.each_ref().map(|p| (p.as_str(), d)), d)
        };
        Ok(DoubleBlock {
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
            heads: c.num_attention_heads,
            head_dim: hd,
            eps: c.eps,
        })
    }

    /// `img` `[B, N, d]` and `txt` `[B, L, d]` through the block, with the image stream's
    /// modulation `mi` and the text stream's `mt` (attention's triple, then the MLP's).
    fn forward(
        &self,
        img: Tensor<3>,
        txt: Tensor<3>,
        mi: &[ModParams],
        mt: &[ModParams],
        rope: &Rope,
    ) -> (Tensor<3>, Tensor<3>) {
        let (nh, hd, eps) = (self.heads, self.head_dim, self.eps);
        let l = txt.dims()[1];
        let n = img.dims()[1];
        let ni = mi[0].modulate(img.clone(), eps);
        let nt = mt[0].modulate(txt.clone(), eps);
        let ti = &mut lin(ni, &self.to_qkv).chunk(3, 2).into_iter();
        let tt = &mut lin(nt, &self.add_qkv).chunk(3, 2).into_iter();
        let txt_stream = Stream::new(tt, (nh, hd), &self.norm_added_q, &self.norm_added_k);
        let img_stream = Stream::new(ti, (nh, hd), &self.norm_q, &self.norm_k);
        let a = joint_attention(&[txt_stream, img_stream], rope, eps);
        let a_txt = a.clone().narrow(1, 0, l);
        let a_img = a.narrow(1, l, n);
        let img = mi[0].gated_add(img, lin(a_img, &self.to_out));
        let txt = mt[0].gated_add(txt, lin(a_txt, &self.to_add_out));
        let ff = lin_joined(
            &[(lin(mi[1].modulate(img.clone(), eps), &self.ff_in), true)],
            &self.ff_out,
        );
        let img = mi[1].gated_add(img, ff);
        let ff = lin_joined(
            &[(lin(mt[1].modulate(txt.clone(), eps), &self.ff_ctx_in), true)],
            &self.ff_ctx_out,
        );
        let txt = clip_f16(mt[1].gated_add(txt, ff));
        (img, txt)
    }
}

/// A single-stream block (`single_transformer_blocks.{i}`) over the joint text + image sequence:
/// one fused projection to q, k, v and the MLP's input, attention and the SwiGLU MLP side by side,
/// one fused output projection.
struct SingleBlock {
    qkv_mlp: LinearWeight,
    norm_q: Tensor<1>,
    norm_k: Tensor<1>,
    to_out: LinearWeight,
    heads: usize,
    head_dim: usize,
    eps: f64,
    dim: usize,
    mlp_hidden: usize,
}

impl SingleBlock {
    /// The block's weights, named `{prefix}.{part}.weight`.
    fn new(w: &WeightStore, c: &Flux2Config, prefix: &str) -> Result<Self, EngineError> {
        let (d, hd, m) = (c.inner_dim(), c.attention_head_dim, c.mlp_hidden());
        let n = |part: &str| format!("{prefix}.{part}.weight");
        Ok(SingleBlock {
            qkv_mlp: w.linear(&n("attn.to_qkv_mlp_proj"), d, 3 * d + 2 * m)?,
            norm_q: w.tensor(&n("attn.norm_q"), [hd])?,
            norm_k: w.tensor(&n("attn.norm_k"), [hd])?,
            to_out: w.linear(&n("attn.to_out"), d + m, d)?,
            heads: c.num_attention_heads,
            head_dim: hd,
            eps: c.eps,
            dim: d,
            mlp_hidden: m,
        })
    }

    /// `h` `[B, L + N, d]` through the block, modulated by `ms`.
    fn forward(&self, h: Tensor<3>, ms: &ModParams, rope: &Rope) -> Tensor<3> {
        let (nh, hd, eps, d, m) = (
            self.heads,
            self.head_dim,
            self.eps,
            self.dim,
            self.mlp_hidden,
        );
        let proj = lin(ms.modulate(h.clone(), eps), &self.qkv_mlp);
        let parts = &mut proj.split_with_sizes(vec![d, d, d, 2 * m], 2).into_iter();
        let stream = Stream::new(parts, (nh, hd), &self.norm_q, &self.norm_k);
        let mlp = parts.next().expect("the MLP's input after q, k, v");
        let a = joint_attention(&[stream], rope, eps);
        // cat([attention, swiglu(mlp)]) @ to_out, the join and the SwiGLU inside the product.
        let out = lin_joined(&[(a, false), (mlp, true)], &self.to_out);
        clip_f16(ms.gated_add(h, out))
    }
}

/// `norm_out` (scale and shift from SiLU(temb), scale first) and `proj_out`.
struct FinalLayer {
    norm_out: LinearWeight,
    proj_out: LinearWeight,
    eps: f64,
}

impl FinalLayer {
    fn new(w: &WeightStore, c: &Flux2Config) -> Result<Self, EngineError> {
        let d = c.inner_dim();
        Ok(FinalLayer {
            norm_out: w.linear("norm_out.linear.weight", d, 2 * d)?,
            proj_out: w.linear("proj_out.weight", d, c.out_channels())?,
            eps: c.eps,
        })
    }

    /// The image tokens `[B, N, d]` to `[B, N, out_channels]`.
    fn forward(&self, img: Tensor<3>, act: Tensor<2>, taps: &mut Taps<'_>) -> Tensor<3> {
        let mut so = lin(act, &self.norm_out)
            .chunk(2, 1)
            .into_iter()
            .map(|c| c.unsqueeze_dim::<3>(1));
        let (scale, shift) = match (so.next(), so.next()) {
            (Some(a), Some(b)) => (a, b),
            _ => unreachable!("chunk(2) yields two parts"),
        };
        let img = crate::nn::modulate(img, &shift, &scale, self.eps);
        taps.tap("norm_out", &img);
        lin(img, &self.proj_out)
    }
}

pub struct Transformer {
    pub config: Flux2Config,
    x_embedder: LinearWeight,
    context_embedder: LinearWeight,
    time_embedder: TimestepEmbedder,
    mod_img: Modulation,
    mod_txt: Modulation,
    mod_single: Modulation,
    double: Vec<DoubleBlock>,
    single: Vec<SingleBlock>,
    final_layer: FinalLayer,
    device: Device,
    precision: Precision,
    /// Bytes of weights held on the device.
    weight_bytes: u64,
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
        let double = (0..config.num_layers)
            .map(|i| DoubleBlock::new(&w, &config, &format!("transformer_blocks.{i}")))
            .collect::<Result<Vec<_>, _>>()?;
        let single = (0..config.num_single_layers)
            .map(|i| SingleBlock::new(&w, &config, &format!("single_transformer_blocks.{i}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Transformer {
            x_embedder: w.linear("x_embedder.weight", config.in_channels, d)?,
            context_embedder: w.linear("context_embedder.weight", config.joint_attention_dim, d)?,
            time_embedder: TimestepEmbedder::new(&w, config.timestep_guidance_channels, d)?,
            mod_img: Modulation::new(&w, "double_stream_modulation_img", d, 2)?,
            mod_txt: Modulation::new(&w, "double_stream_modulation_txt", d, 2)?,
            mod_single: Modulation::new(&w, "single_stream_modulation", d, 1)?,
            final_layer: FinalLayer::new(&w, &config)?,
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
    ) -> Result<Tensor<3>, EngineError> {
        self.run(x, ctx, t, txt_ids, img_ids, &mut Taps::off())
    }

    /// [`forward`](Self::forward), handing the intermediate values to `hook` as they are
    /// computed, under the reference's names: `temb`, `mod_double_img`, `mod_double_txt`,
    /// `mod_single`, `x_embedded`, `context_embedded`, `rope_cos`, `rope_sin`,
    /// `double_block.{i}.txt` and `.img`, `single_block.{i}`, `norm_out`. For parity tests (see
    /// [`crate::trace`]); the serving path never calls it.
    pub fn forward_traced(
        &self,
        x: Tensor<3>,
        ctx: Tensor<3>,
        t: f32,
        txt_ids: &[[i64; 4]],
        img_ids: &[[i64; 4]],
        hook: &mut Hook<'_>,
    ) -> Result<Tensor<3>, EngineError> {
        self.run(x, ctx, t, txt_ids, img_ids, &mut Taps::to(hook))
    }

    fn run(
        &self,
        x: Tensor<3>,
        ctx: Tensor<3>,
        t: f32,
        txt_ids: &[[i64; 4]],
        img_ids: &[[i64; 4]],
        taps: &mut Taps<'_>,
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
        let dtype = self.precision.float();
        let (x, ctx) = (x.cast(dtype), ctx.cast(dtype));

        let temb = self.time_embedder.forward(t, b, dtype, &self.device);
        taps.tap("temb", &temb);
        let act = silu(temb);
        let mod_img = self.mod_img.forward(act.clone());
        let mod_txt = self.mod_txt.forward(act.clone());
        let mod_single = self.mod_single.forward(act.clone());
        taps.tap("mod_double_img", &mod_img);
        taps.tap("mod_double_txt", &mod_txt);
        taps.tap("mod_single", &mod_single);
        let mi = self.mod_img.split(mod_img);
        let mt = self.mod_txt.split(mod_txt);
        let ms = self.mod_single.split(mod_single);

        let mut img = lin(x, &self.x_embedder);
        let mut txt = lin(ctx, &self.context_embedder);
        taps.tap("x_embedded", &img);
        taps.tap("context_embedded", &txt);

        let all_ids: Vec<[i64; 4]> = txt_ids.iter().chain(img_ids).copied().collect();
        let (cos, sin) = self.rope(&all_ids);
        taps.tap("rope_cos", &cos);
        taps.tap("rope_sin", &sin);
        let rope = Rope::new(cos, sin);

        for (i, block) in self.double.iter().enumerate() {
            (img, txt) = block.forward(img, txt, &mi, &mt, &rope);
            taps.tap(format_args!("double_block.{i}.txt"), &txt);
            taps.tap(format_args!("double_block.{i}.img"), &img);
        }
        let mut h = Tensor::cat(vec![txt, img], 1);
        for (i, block) in self.single.iter().enumerate() {
            h = block.forward(h, &ms[0], &rope);
            taps.tap(format_args!("single_block.{i}"), &h);
        }
        Ok(self.final_layer.forward(h.narrow(1, l, n), act, taps))
    }
}
