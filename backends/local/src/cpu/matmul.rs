//! The linear layers' matrix product on x86 CPUs with AVX2 + FMA or AVX-512: `x @ w (+ bias)`
//! with the weight packed once, at load, into the layout the register kernel reads.
//!
//! A general gemm (the `gemm` crate under burn-flex, or MKL under PyTorch) packs the weight into
//! panels on every call, because it cannot know the weight will come again. Here the weight is a
//! model parameter: [`PackedWeight`] lays it out once as column panels of [`NR`] values, `k`
//! rows deep, starting on a cache line, so the kernel streams each panel from memory in order,
//! and what remains per call is the product itself. The depth is cut into [`KC`] steps so the
//! panel's slice stays in L1 while every block of rows passes over it, and the next slice is
//! prefetched meanwhile, a part per block, a line every few steps of the register kernel; the
//! threads take disjoint ranges of panels.
//!
//! Per call the input rows are packed into blocks of the register tile's rows (`pack_rows`), so
//! the kernel's broadcasts come from consecutive addresses. The inputs are read in place through
//! their strides, and may be several joined along the depth, one of them entering as its SwiGLU
//! ([`linear_joined`]): the transformer's concatenations and SwiGLUs happen in that copy.
//!
//! The register kernel, by [`Isa`]: with AVX-512, a block of 14 rows x 32 columns in 28 of the
//! 32 vector registers, two for the panel's row, and the row's value broadcast from memory into
//! each FMA; with AVX2, 6 rows x 16 columns (half a panel) in 12 of the 16, two for the panel
//! and one broadcast.
//!
//! Measured on the step's shapes against the `gemm` crate (which burn-flex calls) on the same
//! machine: see docs/engine.md ("The CPU backend").

use std::sync::OnceLock;

use burn::tensor::Tensor;
use rayon::prelude::*;

use super::{Dense, Strided};

/// Output columns per panel: two 16-lane vectors, four 8-lane ones.
pub const NR: usize = 32;
/// The most rows any kernel takes at once.
const MR_MAX: usize = Isa::Avx512.rows();
/// Depth per pass: a panel slice of KC x NR floats (32 KiB) stays in a 48 KiB L1 while the
/// row blocks pass over it (and mostly in a 32 KiB one).
pub const KC: usize = 256;

/// The environment variable that narrows the choice of kernel ([`Isa::best`]).
pub const KERNEL_VAR: &str = "KLEINGATE_CPU_MATMUL";

/// The vector instructions a kernel is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
}

impl Isa {
    /// The kernel the linear layers use: the widest this CPU runs,
    /// `None` without AVX2 + FMA (and off x86). `KLEINGATE_CPU_MATMUL` (`avx512`, `avx2`, or
    /// `gemm` for the gemm crate, as burn's matmul calls it, on unpacked operands) narrows the
    /// choice, to measure one against another in the same build (`bench-engine`); a value the
    /// CPU cannot run, or that names no kernel, is ignored with a warning.
    pub fn best() -> Option<Isa> {
        static CHOSEN: OnceLock<Option<Isa>> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let widest = [Isa::Avx512, Isa::Avx2].into_iter().find(|i| i.supported());
            let Ok(asked) = std::env::var(KERNEL_VAR) else {
                return widest;
            };
            let named = match asked.as_str() {
                "gemm" => return None,
                "avx512" => Isa::Avx512,
                "avx2" => Isa::Avx2,
                _ => {
                    tracing::warn!(
                        "{KERNEL_VAR}={asked}: not avx512, avx2 or gemm; using {widest:?}"
                    );
                    return widest;
                }
            };
            if named.supported() {
                return Some(named);
            }
            tracing::warn!("{KERNEL_VAR}={asked}: this CPU lacks it; using {widest:?}");
            widest
        })
    }

    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
                Isa::Avx2 => super::simd::has_avx2_fma(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Output rows per register block.
    const fn rows(self) -> usize {
        match self {
            Isa::Avx512 => 14,
            Isa::Avx2 => 6,
        }
    }
}

/// A weight `[k, n]` (`[in, out]`) as column panels: value `(p, c)` at [`Self::at`]`(k, p, c)`,
/// the last panel's columns past `n` zero.
#[derive(Clone, Debug)]
pub struct PackedWeight {
    k: usize,
    n: usize,
    data: Aligned,
}

impl PackedWeight {
    /// Pack a row-major `[k, n]` weight. `None` where no kernel runs ([`Isa::best`]).
    pub fn new(w: &[f32], k: usize, n: usize) -> Option<Self> {
        if Isa::best().is_none() || w.len() != k * n || k == 0 || n == 0 {
            return None;
        }
        let mut data = Aligned::zeroed(n.div_ceil(NR) * k * NR);
        data.as_mut_slice()
            .par_chunks_mut(k * NR)
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

    /// Where value `(p, c)` of a `[k, n]` matrix is, as panels.
    fn at(k: usize, p: usize, c: usize) -> usize {
        ((c / NR) * k + p) * NR + c % NR
    }

    /// The weight back in its row-major `[k, n]` layout.
    pub fn unpack(&self) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        let mut w = vec![0f32; k * n];
        for (p, row) in w.chunks_exact_mut(n).enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = self.data.as_slice()[Self::at(k, p, c)];
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
    let rows = Rows::dense(xd.slice(), m, k, k);
    let out = run(&[rows], m, w, bd.as_ref().map(Dense::slice))?;
    Some(super::tensor(out, [m, w.n]))
}

/// `[x_0, x_1, ..] @ w` for f32 CPU tensors `x_i` `[B, S, k_i]` joined along their last
/// dimension (`k_0 + k_1 + .. = w.k`), each read in place through its strides; a gated input
/// (`true`) is `[B, S, 2 k_i]` and enters as its SwiGLU `silu(x[.., :k_i]) * x[.., k_i:]`. The
/// join and the SwiGLU happen while the rows are packed for the kernel (which copies them
/// anyway), so neither is a pass over memory of its own, and a view (a narrowed or chunked
/// projection) needs no copy first. `None` unless every input is an f32 CPU tensor with unit
/// last stride and the shapes agree.
pub fn linear_joined(inputs: &[(&Tensor<3>, bool)], w: &PackedWeight) -> Option<Tensor<3>> {
    let [b, s, _] = inputs.first()?.0.dims();
    let views = inputs
        .iter()
        .map(|(x, _)| Strided::new(super::flex_f32(*x)?))
        .collect::<Option<Vec<_>>>()?;
    let mut rows = Vec::with_capacity(inputs.len());
    for ((x, gated), v) in inputs.iter().zip(&views) {
        let [xb, xs, c] = x.dims();
        let st = v.strides();
        if [xb, xs] != [b, s] || st[2] != 1 || (*gated && c % 2 != 0) {
            return None;
        }
        rows.push(Rows {
            data: v.storage(),
            offset: v.offset(),
            per_batch: s,
            strides: (st[0], st[1]),
            k: if *gated { c / 2 } else { c },
            gated: *gated,
        });
    }
    if rows.iter().map(|r| r.k).sum::<usize>() != w.k {
        return None;
    }
    let out = run(&rows, b * s, w, None)?;
    Some(super::tensor(out, [b, s, w.n]))
}

/// The product into a fresh `[m, n]` buffer with the best kernel; `None` where none runs.
fn run(rows: &[Rows<'_>], m: usize, w: &PackedWeight, bias: Option<&[f32]>) -> Option<Vec<f32>> {
    let isa = Isa::best()?;
    // The first pass over the depth writes every output (bias + product), so the buffer starts
    // uninitialised: no zeroing pass, and no read of what the first pass replaces.
    let mut out = Vec::<f32>::with_capacity(m * w.n);
    // SAFETY: out has room for m x n values, which product() writes, every one, before set_len;
    // the CPU runs isa (Isa::best).
    unsafe {
        product(isa, rows, m, w, bias, out.as_mut_ptr());
        out.set_len(m * w.n);
    }
    Some(out)
}

/// One input of a product, read in place: row `r`'s values start at `offset + (r / per_batch) *
/// strides.0 + (r % per_batch) * strides.1` of `data`; `k` of them, or with `gated` the SwiGLU
/// of `2k` (the gate's `k`, then the `k` it multiplies). Reads are bounds-checked slices.
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [f32],
    offset: usize,
    per_batch: usize,
    strides: (usize, usize),
    k: usize,
    gated: bool,
}

impl<'a> Rows<'a> {
    /// `m` rows of `k` values, `lda` apart.
    fn dense(data: &'a [f32], m: usize, k: usize, lda: usize) -> Self {
        Rows {
            data,
            offset: 0,
            per_batch: m.max(1),
            strides: (0, lda),
            k,
            gated: false,
        }
    }

    /// Row `r`'s `k` values (`2k` when gated).
    fn row(&self, r: usize) -> &'a [f32] {
        let start = self.offset
            + (r / self.per_batch) * self.strides.0
            + (r % self.per_batch) * self.strides.1;
        let len = if self.gated { 2 * self.k } else { self.k };
        &self.data[start..start + len]
    }
}

/// `out = x @ w + bias` for `x` `[m, k]` row-major (rows `lda` apart) and `out` `[m, n]` (dense;
/// what it held is replaced), spread over rayon's pool, with the kernel for `isa`, which the CPU
/// must support. (The tests' entry: `linear` picks the kernel and writes a fresh buffer.)
#[cfg(test)]
pub fn matmul_with(
    isa: Isa,
    x: &[f32],
    lda: usize,
    m: usize,
    w: &PackedWeight,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert!(isa.supported(), "{isa:?} on this CPU");
    assert_eq!(out.len(), m * w.n, "out");
    // SAFETY: out holds m x n values; x's rows are read through checked slices.
    unsafe {
        product(
            isa,
            &[Rows::dense(x, m, w.k, lda)],
            m,
            w,
            bias,
            out.as_mut_ptr(),
        )
    };
}

/// `out = [rows..] @ w + bias` into `m` x `n` values at `out` (dense), which it writes without
/// reading.
///
/// # Safety
/// `out` has room for `m * n` values no one else touches meanwhile; the CPU runs `isa`.
unsafe fn product(
    isa: Isa,
    rows: &[Rows<'_>],
    m: usize,
    w: &PackedWeight,
    bias: Option<&[f32]>,
    out: *mut f32,
) {
    let n = w.n;
    assert!(bias.is_none_or(|b| b.len() == n), "bias");
    assert_eq!(rows.iter().map(|r| r.k).sum::<usize>(), w.k, "depth");
    if m == 0 {
        return;
    }
    let packed = pack_rows(rows, m, w.k, isa.rows());
    let panels = n.div_ceil(NR);
    // Ranges of panels per task: at least one per thread, whole panels, about equal.
    let threads = rayon::current_num_threads().max(1);
    let tasks = threads.min(panels);
    let dst = super::SendPtr(out);
    (0..tasks).into_par_iter().for_each(|t| {
        let (p0, p1) = (t * panels / tasks, (t + 1) * panels / tasks);
        // SAFETY: this task alone writes panels p0..p1's columns of out (the caller's promise
        // for the rest); packed holds m rows of k values in blocks of mr.
        unsafe { accumulate(isa, packed.as_slice(), m, w, p0..p1, bias, dst.at(0), n) };
    });
}

/// Row blocks per group of [`accumulate`]: a group's slice of the packed rows for one depth pass
/// (`GROUP_BLOCKS x 14 x KC` floats, ~1 MiB with AVX-512) stays in L2 while every panel of the
/// task passes over it.
const GROUP_BLOCKS: usize = 72;

/// The inputs' `m` rows, joined (`k` values a row in all), in blocks of `mr` rows, each block
/// `k` steps of `mr` values (row `r`'s value `p` at `p * mr + r`; rows past `m` zero): the
/// register kernel then reads its broadcasts from consecutive addresses, one cache line per few
/// steps, where the rows in place were `mr` streams far apart. A gated input's SwiGLU is
/// computed here, a row at a time. Each block is written step by step, its rows side by side,
/// so the writes go in order (written row by row, each store landed on another cache line: the
/// packing of a 384 x 3072 input took 0.63 ms against 0.34 now). Spread over the pool, one task
/// per block.
fn pack_rows(rows: &[Rows<'_>], m: usize, k: usize, mr: usize) -> Aligned {
    let blocks = m.div_ceil(mr);
    let len = blocks * k * mr;
    let mut packed = Aligned::for_tasks(len);
    let dst = super::SendPtr(packed.as_mut_ptr());
    let gated_k = rows.iter().filter(|r| r.gated).map(|r| r.k).max();
    (0..blocks).into_par_iter().for_each_init(
        || vec![0f32; mr * gated_k.unwrap_or(0)],
        |scratch, b| {
            // SAFETY: block b's k x mr values are inside the buffer and this task's alone.
            let block = unsafe { super::zeroed(dst.at(b * k * mr), k * mr) };
            let r0 = b * mr;
            let n = mr.min(m - r0);
            let mut col = 0;
            for input in rows {
                let kk = input.k;
                if kk == 0 {
                    continue;
                }
                // The block's rows of this input (a gated one's SwiGLU made first, a row each).
                let mut src: [&[f32]; MR_MAX] = [&[]; MR_MAX];
                if input.gated {
                    for (r, out) in scratch.chunks_exact_mut(kk).take(n).enumerate() {
                        let (gate, up) = input.row(r0 + r).split_at(kk);
                        super::elementwise::swiglu_slice(gate, up, out);
                    }
                    for (r, s) in scratch.chunks_exact(kk).take(n).enumerate() {
                        src[r] = s;
                    }
                } else {
                    for (r, s) in src.iter_mut().take(n).enumerate() {
                        *s = input.row(r0 + r);
                    }
                }
                // Step by step, the rows side by side: the writes go in order.
                let dst = &mut block[col * mr..(col + kk) * mr];
                for (p, step) in dst.chunks_exact_mut(mr).enumerate() {
                    for (v, s) in step.iter_mut().zip(&src[..n]) {
                        *v = s[p];
                    }
                }
                col += kk;
            }
        },
    );
    // SAFETY: the blocks cover 0..len, all zeroed (and filled) above.
    unsafe { packed.assume_filled() };
    packed
}

/// One cache line of floats, so a buffer of them starts on a line: a vector load of 16 floats
/// that straddles two lines costs two.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// `len` floats starting on a cache line (the system allocator gives large buffers 16 bytes
/// past a page, so every 64-byte load of a plain `Vec<f32>` would straddle two lines).
#[derive(Clone, Debug)]
struct Aligned {
    lines: Vec<Line>,
    len: usize,
}

impl Aligned {
    fn zeroed(len: usize) -> Self {
        Aligned {
            lines: vec![Line([0.0; 16]); len.div_ceil(16)],
            len,
        }
    }

    /// Room for `len` floats, the tail of the last line zeroed, the rest for tasks to fill
    /// through [`Self::as_mut_ptr`]; [`Self::assume_filled`] once they have. (A `vec!` of lines
    /// would be written line by line on the calling thread first.)
    fn for_tasks(len: usize) -> Self {
        let n = len.div_ceil(16);
        let mut lines = Vec::<Line>::with_capacity(n);
        // SAFETY: the capacity holds n x 16 floats; those past len are zeroed here.
        unsafe {
            std::ptr::write_bytes(lines.as_mut_ptr().cast::<f32>().add(len), 0, n * 16 - len)
        };
        Aligned { lines, len }
    }

    fn as_mut_ptr(&mut self) -> *mut f32 {
        self.lines.as_mut_ptr().cast()
    }

    /// # Safety
    /// All `len` floats of a [`Self::for_tasks`] buffer have been written.
    unsafe fn assume_filled(&mut self) {
        // SAFETY: the caller's promise, and for_tasks zeroed the rest of the last line.
        unsafe { self.lines.set_len(self.len.div_ceil(16)) };
    }

    fn as_slice(&self) -> &[f32] {
        // SAFETY: the lines are len.div_ceil(16) x 16 contiguous f32 (repr(C), no padding).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as in as_slice, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

/// `out = x @ w + bias` for output panels `panels` (their columns of `out`), from `x`'s rows
/// packed by [`pack_rows`]: by groups of row blocks, then depth pass by depth pass, each panel's
/// slice (in L1) over every block of the group (in L2). The first pass writes `bias + its
/// product` without reading `out`, the others add to it.
///
/// # Safety
/// `out` has room for `m` rows of `w.n` values `ldo` apart, and no one else touches these
/// panels' columns meanwhile; `packed` holds `m` rows of `w.k` values as [`pack_rows`] lays them
/// out for `isa.rows()`; the CPU runs `isa`.
#[allow(clippy::too_many_arguments)]
unsafe fn accumulate(
    isa: Isa,
    packed: &[f32],
    m: usize,
    w: &PackedWeight,
    panels: std::ops::Range<usize>,
    bias: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
) {
    let (k, n, mr) = (w.k, w.n, isa.rows());
    let blocks = m.div_ceil(mr);
    // Each panel's bias, zero-padded to its full width (zero without a bias).
    let init: Vec<[f32; NR]> = panels
        .clone()
        .map(|j| {
            let mut init = [0f32; NR];
            if let Some(b) = bias {
                let c0 = j * NR;
                let width = NR.min(n - c0);
                init[..width].copy_from_slice(&b[c0..c0 + width]);
            }
            init
        })
        .collect();
    let data = w.data.as_slice();
    for g0 in (0..blocks).step_by(GROUP_BLOCKS) {
        let group = g0..blocks.min(g0 + GROUP_BLOCKS);
        for kc0 in (0..k).step_by(KC) {
            let kc = KC.min(k - kc0);
            for (j, init) in panels.clone().zip(&init) {
                let c0 = j * NR;
                let width = NR.min(n - c0);
                let panel = &data[(j * k + kc0) * NR..(j * k + kc0 + kc) * NR];
                let first = (kc0 == 0).then_some(init);
                // The slice the next round reads (the next panel, or the first one at the next
                // depth), fetched a part per row block, a line every AHEAD_EVERY steps of its
                // kernel, so it is in cache when that round starts.
                let next = if j + 1 < panels.end {
                    Some(((j + 1) * k + kc0, kc))
                } else if kc0 + KC < k {
                    Some((panels.start * k + kc0 + KC, KC.min(k - kc0 - KC)))
                } else {
                    None
                };
                let next = next.map(|(at, len)| &data[at * NR..(at + len) * NR]);
                let (nb, lines) = (group.len(), next.map_or(0, |s| s.len().div_ceil(16)));
                for b in group.clone() {
                    let ahead = next.map_or(&[][..], |next| {
                        let i = b - group.start;
                        &next[(i * lines / nb) * 16..((i + 1) * lines / nb * 16).min(next.len())]
                    });
                    let r0 = b * mr;
                    let rows = mr.min(m - r0);
                    let a = &packed[(b * k + kc0) * mr..(b * k + kc0 + kc) * mr];
                    // SAFETY: the caller's promise; a and panel are in bounds by their slicing.
                    unsafe {
                        block(
                            isa,
                            a,
                            rows,
                            kc,
                            panel,
                            out.add(r0 * ldo + c0),
                            ldo,
                            width,
                            first,
                            ahead,
                        )
                    };
                }
            }
        }
    }
}

/// Steps of the register kernel between two prefetched lines of the next panel slice.
const AHEAD_EVERY: usize = 4;

/// `out[rows, width] += a[rows, kc] @ panel[kc, NR]` (the first `width` columns kept), or with
/// `init`, `out = init + a @ panel` (`init` one row, for every row; `out` not read); `a` is one
/// block of [`pack_rows`] (`kc` steps of `isa.rows()` values).
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    isa: Isa,
    a: &[f32],
    rows: usize,
    kc: usize,
    panel: &[f32],
    out: *mut f32,
    ldo: usize,
    width: usize,
    init: Option<&[f32; NR]>,
    ahead: &[f32],
) {
    let init = init.map(|i| i.as_ptr());
    if width == NR {
        // SAFETY: the caller's promise.
        unsafe { kernel_rows(isa, a, rows, kc, panel, out, ldo, init, ahead) };
        return;
    }
    // A narrow last panel: through a full-width scratch block.
    let mut tmp = [0f32; MR_MAX * NR];
    if init.is_none() {
        for r in 0..rows {
            // SAFETY: rows x width of out are in bounds and written (the caller's promise).
            let src = unsafe { std::slice::from_raw_parts(out.add(r * ldo), width) };
            tmp[r * NR..r * NR + width].copy_from_slice(src);
        }
    }
    // SAFETY: tmp holds rows x NR.
    unsafe { kernel_rows(isa, a, rows, kc, panel, tmp.as_mut_ptr(), NR, init, ahead) };
    for r in 0..rows {
        // SAFETY: rows x width of out are in bounds (the caller's promise); written here by
        // copy, not read.
        unsafe { std::ptr::copy_nonoverlapping(tmp[r * NR..].as_ptr(), out.add(r * ldo), width) };
    }
}

/// The kernel for `rows` (1..=`isa.rows()`) rows: one monomorphised copy per count, so the
/// accumulators are registers in each.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_rows(
    isa: Isa,
    a: &[f32],
    rows: usize,
    kc: usize,
    panel: &[f32],
    out: *mut f32,
    ldo: usize,
    init: Option<*const f32>,
    ahead: &[f32],
) {
    let (a, b) = (a.as_ptr(), panel.as_ptr());
    let ahead_lines = ahead.len().div_ceil(16);
    let ahead = ahead.as_ptr();
    macro_rules! by_rows {
        ($kernel:ident($b:expr, $out:expr, $init:expr, $ahead:expr): $($r:literal)*) => {
            match rows {
                // SAFETY: the caller's promise.
                $($r => unsafe { $kernel::<$r>(a, kc, $b, $out, ldo, $init, $ahead) },)*
                _ => unreachable!("1..=isa.rows() rows"),
            }
        };
    }
    match isa {
        Isa::Avx512 => {
            by_rows!(kernel_avx512(b, out, init, (ahead, ahead_lines)): 1 2 3 4 5 6 7 8 9 10 11 12 13 14)
        }
        // Half a panel at a time: 16 of its 32 columns (in bounds by the caller's promise).
        Isa::Avx2 => {
            by_rows!(kernel_avx2(b, out, init, (ahead, ahead_lines)): 1 2 3 4 5 6);
            let (b, out, init) = (
                b.wrapping_add(16),
                out.wrapping_add(16),
                init.map(|i| i.wrapping_add(16)),
            );
            by_rows!(kernel_avx2(b, out, init, (ahead, 0)): 1 2 3 4 5 6);
        }
    }
}

/// `out[R, 2 x lanes] += a[R, kc] @ panel[kc, 2 x lanes]` in registers (two vectors a row), or
/// with `init`, `out = init + ...` without reading `out`: one template, written out for each
/// instruction set by [`kernel!`] (the intrinsics differ only in name and width). The panel's
/// rows are `NR` apart whatever the width (the AVX2 kernel takes half a panel).
macro_rules! kernel {
    ($name:ident, $feature:literal, $lanes:literal, $mr:expr,
     $zero:ident, $load:ident, $splat:ident, $fma:ident, $add:ident, $store:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $name<const R: usize>(
            a: *const f32,
            kc: usize,
            b: *const f32,
            out: *mut f32,
            ldo: usize,
            init: Option<*const f32>,
            (ahead, lines): (*const f32, usize),
        ) {
            use std::arch::x86_64::*;
            let mut acc = [[$zero(); 2]; R];
            let mut line = 0;
            for p in 0..kc {
                // One line of the next panel slice every few steps: a burst of prefetches fills
                // the line-fill buffers and stalls (the burst's loop was 5% of a step in perf).
                if p % AHEAD_EVERY == 0 && line < lines {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line * 16).cast());
                    line += 1;
                }
                // SAFETY: the panel holds kc rows of NR values, a kc steps of $mr rows' values.
                unsafe {
                    let b0 = $load(b.add(p * NR));
                    let b1 = $load(b.add(p * NR + $lanes));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let ar = $splat(*a.add(p * $mr + r));
                        acc[0] = $fma(ar, b0, acc[0]);
                        acc[1] = $fma(ar, b1, acc[1]);
                    }
                }
            }
            // What did not fit between the steps (a block of few rows gets many lines).
            for l in line..lines {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l * 16).cast());
            }
            for (r, acc) in acc.iter().enumerate() {
                // SAFETY: out holds R rows of 2 x lanes values ldo apart (written unless init is
                // given), init 2 x lanes values.
                unsafe {
                    let o = out.add(r * ldo);
                    let base = match init {
                        Some(i) => [$load(i), $load(i.add($lanes))],
                        None => [$load(o), $load(o.add($lanes))],
                    };
                    $store(o, $add(base[0], acc[0]));
                    $store(o.add($lanes), $add(base[1], acc[1]));
                }
            }
        }

        #[cfg(not(target_arch = "x86_64"))]
        unsafe fn $name<const R: usize>(
            _: *const f32,
            _: usize,
            _: *const f32,
            _: *mut f32,
            _: usize,
            _: Option<*const f32>,
            _: (*const f32, usize),
        ) {
            unreachable!("Isa::supported is false off x86")
        }
    };
}

kernel!(
    kernel_avx512,
    "avx512f",
    16,
    Isa::Avx512.rows(),
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps,
    _mm512_add_ps,
    _mm512_storeu_ps
);
kernel!(
    kernel_avx2,
    "avx2,fma",
    8,
    Isa::Avx2.rows(),
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps,
    _mm256_add_ps,
    _mm256_storeu_ps
);
