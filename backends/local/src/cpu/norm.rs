//! Norms in one read for the statistics and one for the output: group norm (with the SiLU that
//! follows it in the VAE folded in), RMS norm, and the transformer's q/k preparation (RMS norm,
//! RoPE and the joint text + image layout in one pass).

use burn::tensor::Tensor;

use super::simd::{dispatch, fmadd, silu};
use super::{flex_f32, par_chunks, par_rows, tensor, Dense, Strided};

/// Values summed in f32 lanes before the lanes' totals go into the f64 total: short enough that
/// a lane's f32 total stays precise (a group of a 1024x1024 decode is millions of values).
const F32_BLOCK: usize = 4096;

/// `x` folded by `step` in eight f32 lanes (so that it vectorises) per block of [`F32_BLOCK`]
/// values, the blocks' lane totals added up in f64.
#[inline(always)]
fn lane_sum(x: &[f32], step: impl Fn(f32, f32) -> f32) -> f64 {
    let mut total = 0f64;
    for block in x.chunks(F32_BLOCK) {
        let mut acc = [0f32; 8];
        let chunks = block.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..8 {
                acc[i] = step(acc[i], c[i]);
            }
        }
        total += acc.iter().map(|&a| a as f64).sum::<f64>()
            + rest.iter().fold(0.0, |a, &v| step(a, v)) as f64;
    }
    total
}

/// The sum of `x`.
#[inline(always)]
fn sum_body<const FMA: bool>(x: &[f32]) -> f64 {
    lane_sum(x, |a, v| a + v)
}
dispatch!(fn sum(x: &[f32]) -> f64 => sum_body);

/// The sum of `(x - mean)^2`.
#[inline(always)]
fn sq_dev_body<const FMA: bool>(x: &[f32], mean: f32) -> f64 {
    lane_sum(x, |a, v| {
        let d = v - mean;
        fmadd::<FMA>(d, d, a)
    })
}
dispatch!(fn sq_dev(x: &[f32], mean: f32) -> f64 => sq_dev_body);

#[inline(always)]
fn affine_body<const FMA: bool>(x: &[f32], a: f32, b: f32, act: bool, out: &mut [f32]) {
    if act {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = silu::<FMA>(fmadd::<FMA>(v, a, b));
        }
    } else {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = fmadd::<FMA>(v, a, b);
        }
    }
}
dispatch!(fn affine(x: &[f32], a: f32, b: f32, act: bool, out: &mut [f32]) => affine_body);

/// GroupNorm over `[B, C, H, W]` with per-channel `gamma`/`beta`, then SiLU when `act`: mean
/// and variance of each group (two reads, f64 totals), then one pass that normalises, scales
/// and activates. `None` unless the tensors are f32 CPU tensors.
pub fn group_norm(
    x: &Tensor<4>,
    groups: usize,
    gamma: &Tensor<1>,
    beta: &Tensor<1>,
    eps: f64,
    act: bool,
) -> Option<Tensor<4>> {
    let (xd, gd, bd) = (Dense::of(x)?, Dense::of(gamma)?, Dense::of(beta)?);
    let [b, c, h, w] = x.dims();
    if groups == 0 || c % groups != 0 {
        return None;
    }
    if gamma.dims() != [c] || beta.dims() != [c] {
        return None;
    }
    let (cg, hw) = (c / groups, h * w);
    let (xs, gs, bs) = (xd.slice(), gd.slice(), bd.slice());
    let out = par_chunks(xs.len(), cg * hw, |bg, o| {
        let src = &xs[bg * cg * hw..(bg + 1) * cg * hw];
        let n = src.len() as f64;
        let mean = (sum(src) / n) as f32;
        let var = sq_dev(src, mean) / n;
        let rstd = (1.0 / (var + eps).sqrt()) as f32;
        let g0 = (bg % groups) * cg;
        for (j, (oc, sc)) in o.chunks_mut(hw).zip(src.chunks(hw)).enumerate() {
            let a = gs[g0 + j] * rstd;
            let shift = bs[g0 + j] - mean * a;
            affine(sc, a, shift, act, oc);
        }
    });
    Some(tensor(out, [b, c, h, w]))
}

/// One row of the q/k preparation: RMS norm with `w` (when given), then the interleaved RoPE
/// rotation with `cos` and the sign-folded `sin` of the row's position (when given):
/// `y[j] * cos[j] + y[j ^ 1] * sin[j]`.
#[inline(always)]
fn prep_row_body<const FMA: bool>(
    x: &[f32],
    w: Option<&[f32]>,
    eps: f32,
    rope: Option<(&[f32], &[f32])>,
    out: &mut [f32],
) {
    match w {
        Some(w) => {
            let mut acc = [0f32; 8];
            for c in x.chunks_exact(8) {
                for i in 0..8 {
                    acc[i] = fmadd::<FMA>(c[i], c[i], acc[i]);
                }
            }
            let mut ss: f32 = acc.iter().sum();
            for &v in x.chunks_exact(8).remainder() {
                ss = fmadd::<FMA>(v, v, ss);
            }
            let inv = 1.0 / (ss / x.len() as f32 + eps).sqrt();
            for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
                *o = (v * inv) * w;
            }
        }
        None => out.copy_from_slice(x),
    }
    if let Some((cos, sin)) = rope {
        for ((pair, c), s) in out
            .chunks_exact_mut(2)
            .zip(cos.chunks_exact(2))
            .zip(sin.chunks_exact(2))
        {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = fmadd::<FMA>(b, s[0], a * c[0]);
            pair[1] = fmadd::<FMA>(a, s[1], b * c[1]);
        }
    }
}
dispatch!(fn prep_row(x: &[f32], w: Option<&[f32]>, eps: f32, rope: Option<(&[f32], &[f32])>, out: &mut [f32]) => prep_row_body);

/// One stream's part of a joint q, k or v: `[B, S, H, D]` (any strides, unit last stride),
/// RMS-normed with `norm` when given and rotated by the RoPE tables' rows from `pos0` on when
/// given.
pub struct Part<'a> {
    pub x: &'a Tensor<4>,
    pub norm: Option<&'a Tensor<1>>,
}

/// RoPE tables `[S, D]`: the cosine and the sine with its even entries negated.
pub struct RopeTables<'a> {
    pub cos: &'a Tensor<2>,
    pub sin: &'a Tensor<2>,
}

/// The parts one after the other along the sequence, as one `[B, S_total, H, D]` tensor, each
/// normed and rotated as asked (`rope` rows follow the joint sequence). The transformer's q and
/// k (RMS norm, RoPE, text then image) and v (text then image) in one pass each. `None` unless
/// every tensor is an f32 CPU tensor with unit last stride.
pub fn join_heads(
    parts: &[Part<'_>],
    rope: Option<&RopeTables<'_>>,
    eps: f64,
) -> Option<Tensor<4>> {
    let [b, _, h, d] = parts.first()?.x.dims();
    let views = parts
        .iter()
        .map(|p| Strided::new(flex_f32(p.x)?))
        .collect::<Option<Vec<_>>>()?;
    // `None` (no norm) is fine, a norm that is not an f32 CPU tensor is not.
    let norms = parts
        .iter()
        .map(|p| p.norm.map_or(Some(None), |w| Dense::of(w).map(Some)))
        .collect::<Option<Vec<_>>>()?;
    let tables = match rope {
        Some(r) => Some((Dense::of(r.cos)?, Dense::of(r.sin)?)),
        None => None,
    };
    // Each part's first row in the joint sequence and its length.
    let mut spans = Vec::with_capacity(parts.len());
    let mut total = 0;
    for (p, v) in parts.iter().zip(&views) {
        let [pb, s, ph, pd] = p.x.dims();
        if pb != b || ph != h || pd != d || v.strides()[3] != 1 {
            return None;
        }
        spans.push((total, s));
        total += s;
    }
    if let Some((c, sn)) = &tables {
        if c.shape() != [total, d] || sn.shape() != [total, d] || d % 2 != 0 {
            return None;
        }
    }
    if norms.iter().flatten().any(|n| n.slice().len() != d) {
        return None;
    }
    // One task per (batch, position) of the joint sequence: its h rows, from the part whose
    // span holds the position.
    let out = par_chunks(b * total * h * d, h * d, |i, rows| {
        let (bi, pos) = (i / total, i % total);
        let p = spans
            .iter()
            .position(|&(s0, s)| pos < s0 + s)
            .expect("spans cover total");
        let (v, si) = (&views[p], pos - spans[p].0);
        let (st, data, off) = (v.strides(), v.storage(), v.offset());
        let w = norms[p].as_ref().map(|n| n.slice());
        let rope = tables.as_ref().map(|(c, sn)| {
            (
                &c.slice()[pos * d..(pos + 1) * d],
                &sn.slice()[pos * d..(pos + 1) * d],
            )
        });
        for (hi, dst) in rows.chunks_exact_mut(d).enumerate() {
            let src = off + bi * st[0] + si * st[1] + hi * st[2];
            prep_row(&data[src..src + d], w, eps as f32, rope, dst);
        }
    });
    Some(tensor(out, [b, total, h, d]))
}

/// RMS norm over the last dimension of `[.., D]` with scale `w`; `None` unless f32 CPU tensors.
pub fn rms_norm<const N: usize>(x: &Tensor<N>, w: &Tensor<1>, eps: f64) -> Option<Tensor<N>> {
    let (xd, wd) = (Dense::of(x)?, Dense::of(w)?);
    let dims = x.dims();
    let d = dims[N - 1];
    let ws = wd.slice();
    if ws.len() != d {
        return None;
    }
    let xs = xd.slice();
    let out = par_rows(xs.len() / d, d, |r, row| {
        prep_row(&xs[r * d..(r + 1) * d], Some(ws), eps as f32, None, row)
    });
    Some(tensor(out, dims))
}

#[inline(always)]
fn modulate_row_body<const FMA: bool>(
    x: &[f32],
    shift: &[f32],
    scale: &[f32],
    eps: f32,
    out: &mut [f32],
) {
    let n = x.len() as f64;
    let mean = (sum_body::<FMA>(x) / n) as f32;
    let rstd = 1.0 / ((sq_dev_body::<FMA>(x, mean) / n) as f32 + eps).sqrt();
    for (((o, &v), &sh), &sc) in out.iter_mut().zip(x).zip(shift).zip(scale) {
        *o = fmadd::<FMA>((v - mean) * rstd, 1.0 + sc, sh);
    }
}
dispatch!(fn modulate_row(x: &[f32], shift: &[f32], scale: &[f32], eps: f32, out: &mut [f32]) => modulate_row_body);

/// The transformer's modulation `layer_norm(x) * (1 + scale) + shift` (no affine parameters in
/// the norm; `shift`/`scale` `[B, 1, C]`, one row per batch entry) in one pass per row, for
/// any batch size. `None` unless f32 CPU tensors.
pub fn modulate(
    x: &Tensor<3>,
    shift: &Tensor<3>,
    scale: &Tensor<3>,
    eps: f64,
) -> Option<Tensor<3>> {
    let (xd, shd, scd) = (Dense::of(x)?, Dense::of(shift)?, Dense::of(scale)?);
    let [b, s, c] = x.dims();
    if shift.dims() != [b, 1, c] || scale.dims() != [b, 1, c] {
        return None;
    }
    let (xs, sh, sc) = (xd.slice(), shd.slice(), scd.slice());
    let out = par_rows(b * s, c, |r, row| {
        let m = (r / s) * c..(r / s + 1) * c;
        let src = &xs[r * c..(r + 1) * c];
        modulate_row(src, &sh[m.clone()], &sc[m], eps as f32, row);
    });
    Some(tensor(out, [b, s, c]))
}
