//! Scaled dot-product attention without a mask, in blocks of query rows: for each (batch, head,
//! block) one gemm for the scores, a softmax over each row in place, one gemm for the values, and
//! the rows' normalisation, written straight into a `[B, S, H, D]` buffer (so the transformer's
//! `[B, S, H * D]` needs no transpose). q, k and v are read through their strides: the heads
//! of a fused projection's slices need no copy first. A block's scores are kept within
//! [`SCORES_BYTES`] (in L2), so there is no running (online) softmax; within that, blocks are as
//! tall as the pool's spread allows, since each product packs its right operand (K or V of the
//! head) anew: at 384 tokens a whole head per task took a 6-head attention from 1.80 to 1.52 ms
//! against blocks of 64 rows (best of 50, interleaved in one process).

use burn::tensor::Tensor;
use rayon::prelude::*;

use super::simd::{dispatch, exp};
use super::{flex_f32, gemm_into, tensor_strided, Operand, SendPtr, Strided};

/// The most bytes of scores one task holds: its block of query rows times the keys.
const SCORES_BYTES: usize = 768 << 10;

/// Query rows per task for `bh` (batch, head) pairs of `sq` queries over `sk` keys: as many as
/// [`SCORES_BYTES`] allows, but few enough for two tasks per thread in all; never under 16
/// unless there are fewer rows than that.
pub(crate) fn block_rows(bh: usize, sq: usize, sk: usize, threads: usize) -> usize {
    let by_cache = SCORES_BYTES / (4 * sk.max(1));
    let per_head = (2 * threads).div_ceil(bh.max(1));
    by_cache.min(sq.div_ceil(per_head)).max(16).min(sq).max(1)
}

/// `row <- e^(row - max)`; returns `1 / sum`.
#[inline(always)]
fn softmax_body<const FMA: bool>(row: &mut [f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            m[i] = m[i].max(c[i]);
        }
    }
    let max = rest.iter().fold(
        m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)),
        |a, &b| a.max(b),
    );
    let mut acc = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for i in 0..8 {
            c[i] = exp::<FMA>(c[i] - max);
            acc[i] += c[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp::<FMA>(*v - max);
        sum += *v;
    }
    1.0 / sum
}
dispatch!(fn softmax_row(row: &mut [f32]) -> f32 => softmax_body);

/// Attention of `q` `[B, H, Sq, D]` over `k`, `v` `[B, H, Sk, D]` with scale `1 / sqrt(D)`,
/// returned as `[B, H, Sq, D]` over a `[B, Sq, H, D]` buffer (`swap_dims(1, 2)` of it is
/// contiguous). `None` unless all are f32 CPU tensors with unit last stride.
pub fn sdpa(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>) -> Option<Tensor<4>> {
    let [b, h, sq, d] = q.dims();
    let [kb, kh, sk, kd] = k.dims();
    if [kb, kh, kd] != [b, h, d] || v.dims() != [b, h, sk, d] || sk == 0 {
        return None;
    }
    let (qv, kv, vv) = (
        Strided::new(flex_f32(q)?)?,
        Strided::new(flex_f32(k)?)?,
        Strided::new(flex_f32(v)?)?,
    );
    let (qs, ks, vs) = (qv.strides(), kv.strides(), vv.strides());
    if qs[3] != 1 || ks[3] != 1 || vs[3] != 1 {
        return None;
    }
    let scale = 1.0 / (d as f32).sqrt();
    let block = block_rows(b * h, sq, sk, rayon::current_num_threads().max(1));
    let blocks = sq.div_ceil(block);
    // Written through raw pointers only, every value by the second product of its task (which
    // does not read what it overwrites), so the buffer starts uninitialised.
    let mut out = Vec::<f32>::with_capacity(b * sq * h * d);
    let dst = SendPtr(out.as_mut_ptr());
    let (qd, kd, vd) = (qv.storage(), kv.storage(), vv.storage());
    let (qo, ko, vo) = (qv.offset(), kv.offset(), vv.offset());

    (0..b * h * blocks)
        .into_par_iter()
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, task| {
            let (bh, blk) = (task / blocks, task % blocks);
            let (bi, hi) = (bh / h, bh % h);
            let q0 = blk * block;
            let rows = block.min(sq - q0);
            scores.resize(rows * sk, 0.0);
            let qp = qo + bi * qs[0] + hi * qs[1] + q0 * qs[2];
            let kp = ko + bi * ks[0] + hi * ks[1];
            let vp = vo + bi * vs[0] + hi * vs[1];
            // SAFETY (both products): the operands lie inside their storages (shapes and strides
            // from valid layouts); rows q0..q0 + rows of head hi of batch bi are written by this
            // task only.
            unsafe {
                let (q, kt) = (
                    Operand::rows(qd.as_ptr().add(qp), qs[2]),
                    Operand::columns(kd.as_ptr().add(kp), ks[2]),
                );
                gemm_into((rows, sk, d), scores.as_mut_ptr(), sk, false, q, kt, scale);
            }
            let inv: Vec<f32> = scores.chunks_mut(sk).map(softmax_row).collect();
            let o = dst.at(((bi * sq + q0) * h + hi) * d);
            unsafe {
                let (p, v) = (
                    Operand::rows(scores.as_ptr(), sk),
                    Operand::rows(vd.as_ptr().add(vp), vs[2]),
                );
                gemm_into((rows, d, sk), o, h * d, false, p, v, 1.0);
                for (r, s) in inv.iter().enumerate() {
                    let row = std::slice::from_raw_parts_mut(o.add(r * h * d), d);
                    row.iter_mut().for_each(|x| *x *= s);
                }
            }
        });
    // SAFETY: the tasks cover every (batch, head, row), each row's d values written by gemm.
    unsafe { out.set_len(b * sq * h * d) };
    Some(tensor_strided(
        out,
        [b, h, sq, d],
        [sq * h * d, d, h * d, 1],
    ))
}
