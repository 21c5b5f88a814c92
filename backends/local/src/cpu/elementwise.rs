//! One-pass elementwise kernels: SiLU, SwiGLU and the transformer's gated residual.

use burn::tensor::Tensor;
use rayon::prelude::*;

use super::simd::{dispatch, fmadd, silu as silu1};
use super::{flex_f32, par_rows, tensor, Dense, Strided};

#[inline(always)]
fn silu_rows<const FMA: bool>(src: &[f32], dst: &mut [f32]) {
    for (o, &x) in dst.iter_mut().zip(src) {
        *o = silu1::<FMA>(x);
    }
}
dispatch!(fn silu_slice(src: &[f32], dst: &mut [f32]) => silu_rows);

/// SiLU of an f32 CPU tensor; `None` for other tensors.
pub fn silu<const D: usize>(x: &Tensor<D>) -> Option<Tensor<D>> {
    let src = Dense::of(x)?;
    let dims = x.dims();
    let mut out = vec![0f32; src.slice().len()];
    out.par_chunks_mut(1 << 14)
        .zip(src.slice().par_chunks(1 << 14))
        .for_each(|(o, s)| silu_slice(s, o));
    Some(tensor(out, dims))
}

#[inline(always)]
fn swiglu_row<const FMA: bool>(gate: &[f32], up: &[f32], dst: &mut [f32]) {
    for ((o, &g), &u) in dst.iter_mut().zip(gate).zip(up) {
        *o = silu1::<FMA>(g) * u;
    }
}
dispatch!(pub(crate) fn swiglu_slice(gate: &[f32], up: &[f32], dst: &mut [f32]) => swiglu_row);

/// `silu(x[.., :m]) * x[.., m:]` for `x` `[B, S, 2m]` (any row strides, as the fused projections'
/// slices have); `None` unless `x` is an f32 CPU tensor with unit last stride.
pub fn swiglu(x: &Tensor<3>) -> Option<Tensor<3>> {
    let v = Strided::new(flex_f32(x)?)?;
    let [b, s, c2] = x.dims();
    let st = v.strides();
    if st[2] != 1 || c2 % 2 != 0 {
        return None;
    }
    let m = c2 / 2;
    let (data, off) = (v.storage(), v.offset());
    let out = par_rows(b * s, m, |r, row| {
        let base = off + (r / s) * st[0] + (r % s) * st[1];
        swiglu_slice(&data[base..base + m], &data[base + m..base + 2 * m], row);
    });
    Some(tensor(out, [b, s, m]))
}

#[inline(always)]
fn gated_row<const FMA: bool>(x: &[f32], gate: &[f32], y: &[f32], dst: &mut [f32]) {
    for (((o, &x), &g), &y) in dst.iter_mut().zip(x).zip(gate).zip(y) {
        *o = fmadd::<FMA>(g, y, x);
    }
}
dispatch!(fn gated_slice(x: &[f32], gate: &[f32], y: &[f32], dst: &mut [f32]) => gated_row);

/// The gated residual `x + gate * y`, `x` and `y` `[B, S, C]`, `gate` `[B, 1, C]`, in one pass;
/// `None` unless all are f32 CPU tensors.
pub fn gated_add(x: &Tensor<3>, gate: &Tensor<3>, y: &Tensor<3>) -> Option<Tensor<3>> {
    let (xd, gd, yd) = (Dense::of(x)?, Dense::of(gate)?, Dense::of(y)?);
    let [b, s, c] = x.dims();
    if y.dims() != [b, s, c] || gate.dims() != [b, 1, c] {
        return None;
    }
    let (xs, gs, ys) = (xd.slice(), gd.slice(), yd.slice());
    let out = par_rows(b * s, c, |r, row| {
        let g = &gs[(r / s) * c..(r / s + 1) * c];
        gated_slice(&xs[r * c..(r + 1) * c], g, &ys[r * c..(r + 1) * c], row);
    });
    Some(tensor(out, [b, s, c]))
}
