//! The linear layers' matrix product on CPUs with AVX-512: `x @ w (+ bias)` with the weight packed
//! once, at load, into the layout the register kernel reads.
//!
//! A general gemm (the `gemm` crate under burn-flex, or MKL under PyTorch) packs the weight into
//! panels on every call, because it cannot know the weight will come again. Here the weight is a
//! model parameter: [`PackedWeight`] lays it out once as column panels of [`NR`] values, `k`
//! rows deep, so the kernel streams each panel from memory in order, and what remains per call
//! is the product itself. The kernel keeps a block of [`MR`] x [`NR`] outputs in 28 of the 32
//! vector registers and reads `x` in place (a broadcast per row and step, folded into the FMA's
//! memory operand, from [`MR`] rows that the prefetchers follow). The depth is cut into [`KC`] steps so the panel's slice stays in L1
//! while every block of rows passes over it; the threads take disjoint ranges of panels.
//!
//! Measured on the step's shapes against the `gemm` crate (which burn-flex calls) on the same
//! machine: see docs/engine.md ("The CPU backend").

use burn::tensor::Tensor;
use rayon::prelude::*;

use super::Dense;

/// Output columns per panel: two 16-lane vectors.
pub const NR: usize = 32;
/// Output rows per register block: 14 x 2 accumulators and the two weight vectors fill 30 of the
/// 32 registers (the row's broadcast is the FMA's memory operand).
pub const MR: usize = 14;
/// Depth per pass: a panel slice of KC x NR floats (32 KiB) stays in the 48 KiB L1 while the
/// row blocks pass over it.
pub const KC: usize = 256;

/// A weight `[k, n]` (`[in, out]`) as column panels: value `(p, j)` at
/// `((j / NR) * k + p) * NR + j % NR`, the last panel padded with zeros.
#[derive(Clone, Debug)]
pub struct PackedWeight {
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl PackedWeight {
    /// Pack a row-major `[k, n]` weight. `None` where the kernel cannot run (no AVX-512F).
    pub fn new(w: &[f32], k: usize, n: usize) -> Option<Self> {
        if !available() || w.len() != k * n || k == 0 || n == 0 {
            return None;
        }
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * k * NR];
        data.par_chunks_mut(k * NR)
            .enumerate()
            .for_each(|(j, panel)| {
                let c0 = j * NR;
                let width = NR.min(n - c0);
                for (p, dst) in panel.chunks_exact_mut(NR).enumerate() {
                    dst[..width].copy_from_slice(&w[p * n + c0..p * n + c0 + width]);
                }
            });
        Some(PackedWeight { k, n, data })
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// The weight back in its row-major `[k, n]` layout.
    pub fn unpack(&self) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        let mut w = vec![0f32; k * n];
        for (p, row) in w.chunks_exact_mut(n).enumerate() {
            for (j, dst) in row.chunks_mut(NR).enumerate() {
                let src = (j * k + p) * NR;
                dst.copy_from_slice(&self.data[src..src + dst.len()]);
            }
        }
        w
    }
}

/// `x @ w (+ bias)` for f32 CPU tensors `x` `[m, k]` and `bias` `[n]`; `None` when either is not
/// one (the caller takes burn's path) or the shapes disagree.
pub fn linear(x: &Tensor<2>, w: &PackedWeight, bias: Option<&Tensor<1>>) -> Option<Tensor<2>> {
    let xd = Dense::of(x)?;
    let [m, k] = x.dims();
    if k != w.k {
        return None;
    }
    let bd = match bias {
        Some(b) if b.dims() == [w.n] => Some(Dense::of(b)?),
        Some(_) => return None,
        None => None,
    };
    let mut out = vec![0f32; m * w.n];
    matmul(xd.slice(), k, m, w, bd.as_ref().map(Dense::slice), &mut out);
    Some(super::tensor(out, [m, w.n]))
}

/// Whether this CPU runs the kernel (AVX-512F).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out = x @ w + bias` for `x` `[m, k]` row-major (rows `lda` apart) and `out` `[m, n]` (dense),
/// spread over rayon's pool. The caller checks the shapes against `w`.
pub fn matmul(
    x: &[f32],
    lda: usize,
    m: usize,
    w: &PackedWeight,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let (k, n) = (w.k, w.n);
    assert!(m == 0 || x.len() >= (m - 1) * lda + k, "x too short");
    assert_eq!(out.len(), m * n, "out");
    assert!(bias.is_none_or(|b| b.len() == n), "bias");
    if m == 0 {
        return;
    }
    // The output starts as the bias (or zero); every pass over the depth adds to it.
    match bias {
        Some(b) => out.par_chunks_mut(n).for_each(|row| row.copy_from_slice(b)),
        None => out.par_iter_mut().for_each(|v| *v = 0.0),
    }
    let panels = n.div_ceil(NR);
    // Ranges of panels per task: at least one per thread, whole panels, about equal.
    let threads = rayon::current_num_threads().max(1);
    let tasks = threads.min(panels);
    let dst = super::SendPtr::new(out);
    (0..tasks).into_par_iter().for_each(|t| {
        let (p0, p1) = (t * panels / tasks, (t + 1) * panels / tasks);
        for j in p0..p1 {
            let c0 = j * NR;
            let width = NR.min(n - c0);
            for kc0 in (0..k).step_by(KC) {
                let kc = KC.min(k - kc0);
                let panel = &w.data[(j * k + kc0) * NR..(j * k + kc0 + kc) * NR];
                for r0 in (0..m).step_by(MR) {
                    let rows = MR.min(m - r0);
                    let a = &x[r0 * lda + kc0..];
                    // SAFETY: this task alone writes panels p0..p1's columns of out; a, panel and
                    // the output block are in bounds by the checks above; the CPU has AVX-512F
                    // (PackedWeight::new checked).
                    unsafe {
                        block(a, lda, rows, kc, panel, dst.at(r0 * n + c0), n, width);
                    }
                }
            }
        }
    });
}

/// `out[rows, width] += a[rows, kc] @ panel[kc, NR]` (the first `width` columns kept).
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    a: &[f32],
    lda: usize,
    rows: usize,
    kc: usize,
    panel: &[f32],
    out: *mut f32,
    ldo: usize,
    width: usize,
) {
    if width == NR {
        // SAFETY: the caller's promise.
        unsafe { kernel_rows(a, lda, rows, kc, panel, out, ldo) };
        return;
    }
    // A narrow last panel: through a full-width scratch block.
    let mut tmp = [0f32; MR * NR];
    for r in 0..rows {
        // SAFETY: rows x width of out are in bounds (the caller's promise).
        let src = unsafe { std::slice::from_raw_parts(out.add(r * ldo), width) };
        tmp[r * NR..r * NR + width].copy_from_slice(src);
    }
    // SAFETY: tmp holds rows x NR.
    unsafe { kernel_rows(a, lda, rows, kc, panel, tmp.as_mut_ptr(), NR) };
    for r in 0..rows {
        // SAFETY: as above.
        let dst = unsafe { std::slice::from_raw_parts_mut(out.add(r * ldo), width) };
        dst.copy_from_slice(&tmp[r * NR..r * NR + width]);
    }
}

/// The kernel for `rows` (1..=MR) rows: one monomorphised copy per count, so the accumulators are
/// registers in each.
unsafe fn kernel_rows(
    a: &[f32],
    lda: usize,
    rows: usize,
    kc: usize,
    panel: &[f32],
    out: *mut f32,
    ldo: usize,
) {
    macro_rules! by_rows {
        ($($r:literal)*) => {
            match rows {
                // SAFETY: the caller's promise.
                $($r => unsafe { kernel::<$r>(a.as_ptr(), lda, kc, panel.as_ptr(), out, ldo) },)*
                _ => unreachable!("1..=MR rows"),
            }
        };
    }
    by_rows!(1 2 3 4 5 6 7 8 9 10 11 12 13 14);
}

/// `out[R, NR] += a[R, kc] @ panel[kc, NR]` in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel<const R: usize>(
    a: *const f32,
    lda: usize,
    kc: usize,
    b: *const f32,
    out: *mut f32,
    ldo: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for p in 0..kc {
        // SAFETY: the panel holds kc x NR values, a R rows of kc values lda apart.
        unsafe {
            let b0 = _mm512_loadu_ps(b.add(p * NR));
            let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
            for (r, acc) in acc.iter_mut().enumerate() {
                let ar = _mm512_set1_ps(*a.add(r * lda + p));
                acc[0] = _mm512_fmadd_ps(ar, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(ar, b1, acc[1]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: out holds R rows of NR values ldo apart.
        unsafe {
            let o = out.add(r * ldo);
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[0]));
            _mm512_storeu_ps(o.add(16), _mm512_add_ps(_mm512_loadu_ps(o.add(16)), acc[1]));
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel<const R: usize>(
    _: *const f32,
    _: usize,
    _: usize,
    _: *const f32,
    _: *mut f32,
    _: usize,
) {
    unreachable!("PackedWeight::new refuses without AVX-512F")
}
