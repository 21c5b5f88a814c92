//! 2-D convolution for the VAE: im2col by tiles of output pixels straight from the NCHW input,
//! one gemm per tile into the NCHW output, the tiles spread over the pool.
//!
//! burn-flex's own convolution copies its input to NHWC on one thread and re-lays the weight out
//! on every call before its tiled gemm, then scatters each tile's result. Here the weight is used
//! as stored (`[out, in * kh * kw]` is already the im2col order `(in, ky, kx)`), the output starts
//! as the bias (plus a residual to add, which saves the resnet's separate add), the gemm
//! accumulates into it in place, and a nearest-neighbour x2 upsampling before the convolution is
//! read through instead of materialised.

use burn::tensor::Tensor;
use rayon::prelude::*;

use burn::tensor::{Bytes, DType, Shape};
use burn_flex::{Flex, FlexTensor, Layout};

use super::{flex_f32, Dense, SendPtr};

/// A convolution's geometry: `stride`, padding (top/left, bottom/right), and an integer
/// nearest-neighbour upsampling of the input first (1 = none). `pad_x`, when given, pads the
/// width differently (left, right) from the height.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub stride: usize,
    pub pad: (usize, usize),
    pub upsample: usize,
    pub pad_x: Option<(usize, usize)>,
}

impl Geometry {
    pub fn new(stride: usize, pad: (usize, usize), upsample: usize) -> Self {
        Geometry {
            stride,
            pad,
            upsample,
            pad_x: None,
        }
    }

    fn pads(&self) -> ((usize, usize), (usize, usize)) {
        (self.pad, self.pad_x.unwrap_or(self.pad))
    }
}

/// Bytes of im2col columns one task builds before its gemm: about half this CPU's L2.
const TILE_BYTES: usize = 512 * 1024;

/// `conv(x, w) + bias (+ residual)` for `x` `[B, Ci, H, W]`, `w` `[Co, Ci, k, k]`; `None` unless
/// every tensor is an f32 CPU tensor (or the shapes do not fit, which the caller's burn path
/// then reports); `residual` is taken (left `None`) only when the result is `Some`.
pub fn conv2d(
    x: &Tensor<4>,
    w: &Tensor<4>,
    bias: &Tensor<1>,
    g: Geometry,
    residual: &mut Option<Tensor<4>>,
) -> Option<Tensor<4>> {
    let (xd, wd, bd) = (Dense::of(x)?, Dense::of(w)?, Dense::of(bias)?);
    let [b, ci, h, wi] = x.dims();
    let [co, wci, kh, kw] = w.dims();
    if bias.dims() != [co] {
        return None;
    }
    let (s, up) = (g.stride, g.upsample.max(1));
    let ((pt, pb), (pl, pr)) = g.pads();
    let (vh, vw) = (h * up, wi * up);
    if wci != ci || s == 0 || vh + pt + pb < kh || vw + pl + pr < kw {
        return None;
    }
    let oh = (vh + pt + pb - kh) / s + 1;
    let ow = (vw + pl + pr - kw) / s + 1;
    let p = oh * ow;
    let k = ci * kh * kw;

    // The output starts as bias (+ residual); the gemm adds the convolution to it. A residual
    // nothing else holds (the resnet's skip, usually) is added to in place.
    if let Some(r) = residual.as_ref() {
        if r.dims() != [b, co, oh, ow] || flex_f32(r).is_none() {
            return None;
        }
    }
    let mut out_t = match residual.take() {
        Some(r) => {
            let t = r.try_into_primitive::<Flex>().ok()?;
            let whole = t.layout().contiguous_offsets() == Some((0, b * co * p))
                && t.storage::<f32>().len() == b * co * p;
            if t.is_unique() && whole {
                t
            } else {
                FlexTensor::new(
                    Bytes::from_elems(Dense::new(t).slice().to_vec()),
                    Layout::contiguous(Shape::from(vec![b, co, oh, ow])),
                    DType::F32,
                )
            }
        }
        None => FlexTensor::zeros(Shape::from(vec![b, co, oh, ow]), DType::F32),
    };
    let out = out_t.storage_mut::<f32>();
    let bias = bd.slice();
    out.par_chunks_mut(p).enumerate().for_each(|(i, plane)| {
        let bv = bias[i % co];
        plane.iter_mut().for_each(|v| *v += bv);
    });

    let (xs, ws) = (xd.slice(), wd.slice());
    let direct = kh == 1 && kw == 1 && s == 1 && pt + pb + pl + pr == 0 && up == 1;
    let dst = SendPtr::new(out);
    // Columns per tile: a multiple of 16 (gemm's register tiles) near TILE_BYTES, and enough
    // tiles that every thread gets several.
    let threads = rayon::current_num_threads().max(1);
    let by_cache = (TILE_BYTES / 4 / k).max(16);
    let by_spread = (b * p).div_ceil(4 * threads).max(16);
    let tile = by_cache.min(by_spread).div_ceil(16) * 16;
    let tiles = p.div_ceil(tile);

    (0..b * tiles)
        .into_par_iter()
        .for_each_init(Vec::new, |col, task| {
            let (bi, t) = (task / tiles, task % tiles);
            let p0 = t * tile;
            let n = tile.min(p - p0);
            let x_b = &xs[bi * ci * h * wi..(bi + 1) * ci * h * wi];
            let (rhs, rhs_rs) = if direct {
                (x_b[p0..].as_ptr(), p as isize)
            } else {
                col.resize(k * n, 0.0);
                im2col(col, x_b, (ci, h, wi), (kh, kw), (oh, ow), g, p0, n);
                (col.as_ptr(), n as isize)
            };
            // SAFETY: columns p0..p0 + n of image bi's output planes belong to this task alone;
            // the operands are in bounds by the shapes checked above.
            unsafe {
                gemm::gemm(
                    co,
                    n,
                    k,
                    dst.at(bi * co * p + p0),
                    1,
                    p as isize,
                    true,
                    ws.as_ptr(),
                    1,
                    k as isize,
                    rhs,
                    1,
                    rhs_rs,
                    1.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
    Some(Tensor::from_primitive::<Flex>(out_t))
}

/// The decoder's upsampler, nearest-neighbour x2 then a 3x3 convolution (stride 1, padding 1),
/// as four 2x2 convolutions of the low-resolution input, one per output pixel parity (dy, dx):
/// the upsampled image repeats each input pixel in a 2x2 block, so of the 3x3 taps of an output
/// pixel those that land on the same input pixel can be summed into one weight first. 4/9 of the
/// multiply-adds of convolving the upsampled image; the same sums in another order. `None`
/// unless `g` is that geometry (x2, stride 1, padding 1 all round), the kernel 3x3 and the
/// tensors f32 CPU tensors.
pub fn conv_up2_3x3(
    x: &Tensor<4>,
    w: &Tensor<4>,
    bias: &Tensor<1>,
    g: Geometry,
) -> Option<Tensor<4>> {
    if g.upsample != 2 || g.stride != 1 || g.pads() != ((1, 1), (1, 1)) {
        return None;
    }
    let (wd, bd) = (Dense::of(w)?, Dense::of(bias)?);
    let [b, ci, h, wi] = x.dims();
    let [co, wci, kh, kw] = w.dims();
    if wci != ci || kh != 3 || kw != 3 || bias.dims() != [co] || flex_f32(x).is_none() {
        return None;
    }
    let ws = wd.slice();
    // Along one axis, output parity 0 reads input offsets (-1, 0) through taps ({0}, {1, 2});
    // parity 1 reads (0, +1) through ({0, 1}, {2}).
    let taps = |parity: usize, r: usize| -> &'static [usize] {
        match (parity, r) {
            (0, 0) => &[0],
            (0, _) => &[1, 2],
            (_, 0) => &[0, 1],
            _ => &[2],
        }
    };
    let zero = super::tensor(vec![0f32; co], [co]);
    let mut parts = Vec::with_capacity(4);
    for dy in 0..2 {
        for dx in 0..2 {
            let mut wc = vec![0f32; co * ci * 4];
            for oc in 0..co {
                for c in 0..ci {
                    let src = &ws[(oc * ci + c) * 9..(oc * ci + c + 1) * 9];
                    for r in 0..2 {
                        for q in 0..2 {
                            let mut sum = 0f32;
                            for &ky in taps(dy, r) {
                                for &kx in taps(dx, q) {
                                    sum += src[ky * 3 + kx];
                                }
                            }
                            wc[((oc * ci + c) * 2 + r) * 2 + q] = sum;
                        }
                    }
                }
            }
            let wc = super::tensor(wc, [co, ci, 2, 2]);
            let g = Geometry {
                stride: 1,
                pad: (1 - dy, dy),
                upsample: 1,
                pad_x: Some((1 - dx, dx)),
            };
            parts.push(Dense::of(&conv2d(x, &wc, &zero, g, &mut None)?)?);
        }
    }
    let bias = bd.slice();
    let (oh, ow) = (2 * h, 2 * wi);
    let mut out = vec![0f32; b * co * oh * ow];
    out.par_chunks_mut(oh * ow)
        .enumerate()
        .for_each(|(plane, o)| {
            let bv = bias[plane % co];
            for (pi, part) in parts.iter().enumerate() {
                let (dy, dx) = (pi / 2, pi % 2);
                let src = &part.slice()[plane * h * wi..(plane + 1) * h * wi];
                for i in 0..h {
                    let row = &mut o[(2 * i + dy) * ow..(2 * i + dy + 1) * ow];
                    for (j, &v) in src[i * wi..(i + 1) * wi].iter().enumerate() {
                        row[2 * j + dx] = v + bv;
                    }
                }
            }
        });
    Some(super::tensor(out, [b, co, oh, ow]))
}

/// Columns `p0..p0 + n` of the im2col matrix `[ci * kh * kw, n]` (row `(c, ky, kx)` holds the
/// input value each output pixel sees through that tap; zero in the padding).
#[allow(clippy::too_many_arguments)]
fn im2col(
    col: &mut [f32],
    x: &[f32],
    (ci, h, w): (usize, usize, usize),
    (kh, kw): (usize, usize),
    (_oh, ow): (usize, usize),
    g: Geometry,
    p0: usize,
    n: usize,
) {
    let (s, up) = (g.stride, g.upsample.max(1));
    let ((pt, _), (pl, _)) = g.pads();
    let (vh, vw) = ((h * up) as isize, (w * up) as isize);
    let mut row = 0;
    for c in 0..ci {
        let plane = &x[c * h * w..(c + 1) * h * w];
        for ky in 0..kh {
            for kx in 0..kw {
                let dst = &mut col[row * n..(row + 1) * n];
                row += 1;
                // Walk the tile's pixels one output row segment at a time.
                let mut p = p0;
                let mut i = 0;
                while i < n {
                    let (oy, ox0) = (p / ow, p % ow);
                    let len = (ow - ox0).min(n - i);
                    let seg = &mut dst[i..i + len];
                    let iy = (oy * s + ky) as isize - pt as isize;
                    if iy < 0 || iy >= vh {
                        seg.fill(0.0);
                    } else {
                        let src = &plane[(iy as usize / up) * w..(iy as usize / up + 1) * w];
                        tap_row(seg, src, (ox0 * s + kx) as isize - pl as isize, s, up, vw);
                    }
                    p += len;
                    i += len;
                }
            }
        }
    }
}

/// One row segment of taps: `seg[j]` = the (virtual, `up`-times upsampled) input row `src` at
/// `j * s + shift`, zero outside `0..vw`.
fn tap_row(seg: &mut [f32], src: &[f32], shift: isize, s: usize, up: usize, vw: isize) {
    let len = seg.len();
    // ix(j) = j * s + shift; the taps inside the image are j in lo..hi.
    let si = s as isize;
    let lo = (((-shift).max(0) + si - 1) / si).min(len as isize) as usize;
    let hi = ((vw - shift).max(0) + si - 1) / si;
    let hi = hi.clamp(lo as isize, len as isize) as usize;
    if lo == hi {
        // No tap inside the image (a segment within a wide padding): `first` below would be
        // out of the row.
        seg.fill(0.0);
        return;
    }
    seg[..lo].fill(0.0);
    let inside = &mut seg[lo..hi];
    let first = (lo as isize * si + shift) as usize;
    match (s, up) {
        (1, 1) => inside.copy_from_slice(&src[first..first + inside.len()]),
        (1, 2) => dup2(inside, src, first),
        (2, 1) => gather::<2, 1>(inside, src, first),
        _ => {
            for (j, v) in inside.iter_mut().enumerate() {
                *v = src[(first + j * s) / up];
            }
        }
    }
    seg[hi..].fill(0.0);
}

/// `dst[j] = src[(first + j) / 2]`: each value twice, in pairs.
fn dup2(dst: &mut [f32], src: &[f32], first: usize) {
    let (mut j, mut at) = (0, first / 2);
    if first % 2 == 1 && !dst.is_empty() {
        dst[0] = src[at];
        (j, at) = (1, at + 1);
    }
    let body = &mut dst[j..];
    let pairs = body.len() / 2;
    for (pair, &v) in body.chunks_exact_mut(2).zip(&src[at..at + pairs]) {
        pair[0] = v;
        pair[1] = v;
    }
    if body.len() % 2 == 1 {
        let last = body.len() - 1;
        body[last] = src[at + pairs];
    }
}

/// `dst[j] = src[(first + j * S) / UP]`, monomorphised so the index arithmetic is shifts.
#[inline(always)]
fn gather<const S: usize, const UP: usize>(dst: &mut [f32], src: &[f32], first: usize) {
    for (j, v) in dst.iter_mut().enumerate() {
        *v = src[(first + j * S) / UP];
    }
}
