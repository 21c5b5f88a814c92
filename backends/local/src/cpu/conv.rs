//! 2-D convolution for the VAE: im2col by tiles of output pixels straight from the NCHW input,
//! one gemm per tile into the NCHW output, the tiles spread over the pool; the 3x3 convolutions
//! with stride 1 and padding 1 (most of the VAE's work) by Winograd's F(2x2, 3x3) instead.
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

use super::simd::dispatch;
use super::{flex_f32, gemm_into, par_chunks, Dense, Operand, SendPtr};

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
    // Made or copied by the tasks that fill each plane, with the bias (not zeroed or copied on
    // this thread first, then added to).
    let bias = bd.slice();
    let fresh = |data: Vec<f32>| {
        FlexTensor::new(
            Bytes::from_elems(data),
            Layout::contiguous(Shape::from(vec![b, co, oh, ow])),
            DType::F32,
        )
    };
    let mut out_t = match residual.take() {
        Some(r) => {
            let mut t = r.try_into_primitive::<Flex>().ok()?;
            let whole = t.layout().contiguous_offsets() == Some((0, b * co * p))
                && t.storage::<f32>().len() == b * co * p;
            if t.is_unique() && whole {
                t.storage_mut::<f32>()
                    .par_chunks_mut(p)
                    .enumerate()
                    .for_each(|(i, plane)| {
                        let bv = bias[i % co];
                        plane.iter_mut().for_each(|v| *v += bv);
                    });
                t
            } else {
                let src = Dense::new(t);
                let src = src.slice();
                fresh(par_chunks(b * co * p, p, |i, plane| {
                    let bv = bias[i % co];
                    for (o, &r) in plane.iter_mut().zip(&src[i * p..(i + 1) * p]) {
                        *o = r + bv;
                    }
                }))
            }
        }
        None => fresh(par_chunks(b * co * p, p, |i, plane| {
            plane.fill(bias[i % co])
        })),
    };
    let out = out_t.storage_mut::<f32>();

    let (xs, ws) = (xd.slice(), wd.slice());
    if kh == 3 && kw == 3 && s == 1 && up == 1 && (pt, pb, pl, pr) == (1, 1, 1, 1) {
        winograd_3x3(out, xs, ws, (b, ci, h, wi), co);
        return Some(Tensor::from_primitive::<Flex>(out_t));
    }
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
            let rhs = if direct {
                Operand::rows(x_b[p0..].as_ptr(), p)
            } else {
                col.resize(k * n, 0.0);
                im2col(col, x_b, (ci, h, wi), (kh, kw), (oh, ow), g, p0, n);
                Operand::rows(col.as_ptr(), n)
            };
            let lhs = Operand::rows(ws.as_ptr(), k);
            let out = dst.at(bi * co * p + p0);
            // SAFETY: columns p0..p0 + n of image bi's output planes belong to this task alone;
            // the operands are in bounds by the shapes checked above.
            unsafe { gemm_into((co, n, k), out, p, true, lhs, rhs, 1.0) };
        });
    Some(Tensor::from_primitive::<Flex>(out_t))
}

/// 2x2 output blocks one Winograd task transforms and multiplies at once (the columns of its 16
/// products), rounded up to whole rows of blocks: the fastest of 32, 64, 128, 256 and 1024 for
/// the VAE (best of 18 runs: 256 was ~8% slower than 128, 1024 ~20%, where the task's
/// transformed input and products no longer stay in cache between transforms and products).
const WINOGRAD_TILES: usize = 128;

/// Winograd F(2x2, 3x3)'s weight transform `G` along one axis: three taps to four.
#[inline(always)]
fn wino_g([g0, g1, g2]: [f32; 3]) -> [f32; 4] {
    [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2]
}

/// Its input transform `B^T` along one axis: four values of a patch to four.
#[inline(always)]
fn wino_bt([d0, d1, d2, d3]: [f32; 4]) -> [f32; 4] {
    [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
}

/// Its output transform `A^T` along one axis: four products to two outputs.
#[inline(always)]
fn wino_at([m0, m1, m2, m3]: [f32; 4]) -> [f32; 2] {
    [m0 + m1 + m2, m1 - m2 - m3]
}

/// `A^T` along an output row, added to it: pixels `2t` and `2t + 1` from `s_0..3[t]`. The
/// slices cut to their exact lengths first and the odd last pixel apart, so the loop has no
/// bounds checks and vectorises (compiled for AVX2 too); it had run one pixel at a time.
#[inline(always)]
fn at_row_body<const FMA: bool>(s: [&[f32]; 4], out: &mut [f32]) {
    let pairs = out.len() / 2;
    let (s0, s1, s2, s3) = (
        &s[0][..pairs],
        &s[1][..pairs],
        &s[2][..pairs],
        &s[3][..pairs],
    );
    let (even, odd) = out.split_at_mut(2 * pairs);
    for t in 0..pairs {
        let [a, b] = wino_at([s0[t], s1[t], s2[t], s3[t]]);
        even[2 * t] += a;
        even[2 * t + 1] += b;
    }
    if let Some(px) = odd.first_mut() {
        *px += wino_at([s[0][pairs], s[1][pairs], s[2][pairs], s[3][pairs]])[0];
    }
}
dispatch!(fn at_row(s: [&[f32]; 4], out: &mut [f32]) => at_row_body);

/// `out += conv3x3(x, w)` (stride 1, padding 1) by Winograd's F(2x2, 3x3): each 2x2 block of
/// output pixels from the 4x4 input patch around it, as 16 products of transformed weights
/// `U = G g G^T` (`[co, ci]` each) with transformed patches `V = B^T d B` (`[ci, tiles]`), then
/// `A^T m A` back to 2x2: 16 multiply-adds per block where the direct convolution takes 36, so
/// 4/9 of the gemm's work (the transforms are additions and halvings). `out` is `[b, co, h, w]`
/// holding the bias (and residual) already.
fn winograd_3x3(
    out: &mut [f32],
    xs: &[f32],
    ws: &[f32],
    (b, ci, h, w): (usize, usize, usize, usize),
    co: usize,
) {
    // U, laid out [co][16][ci]: U_xi is the [co, ci] left operand at xi * ci with row stride
    // 16 * ci; each output channel's rows transformed by one task.
    let mut u = vec![0f32; co * 16 * ci];
    u.par_chunks_mut(16 * ci).enumerate().for_each(|(o, uo)| {
        for c in 0..ci {
            let g = &ws[(o * ci + c) * 9..(o * ci + c + 1) * 9];
            // G down the columns of g (3x3 -> 4x3), then along the rows (-> 4x4).
            let cols: [[f32; 4]; 3] = std::array::from_fn(|j| wino_g([g[j], g[3 + j], g[6 + j]]));
            for i in 0..4 {
                for (j, v) in wino_g([cols[0][i], cols[1][i], cols[2][i]])
                    .into_iter()
                    .enumerate()
                {
                    uo[(i * 4 + j) * ci + c] = v;
                }
            }
        }
    });
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    // Tasks take whole rows of blocks, so that both transforms run along image rows: about
    // WINOGRAD_TILES blocks each, and at least two tasks per thread.
    let threads = rayon::current_num_threads().max(1);
    let rows_per = WINOGRAD_TILES
        .div_ceil(tw)
        .min(th.div_ceil(2 * threads))
        .max(1);
    let chunks = th.div_ceil(rows_per);
    // A row padded by one zero on the left and enough on the right for the last block's patch.
    let pw = 2 * tw + 2;
    let dst = SendPtr::new(out);
    let u = &u[..];
    (0..b * chunks).into_par_iter().for_each_init(
        || {
            let pad = vec![0f32; 4 * pw];
            (Vec::new(), Vec::new(), pad.clone(), pad, vec![0f32; 8 * tw])
        },
        |(v, m, rows, bt, sums), task| {
            let (bi, r0) = (task / chunks, (task % chunks) * rows_per);
            let nr = rows_per.min(th - r0);
            let nt = nr * tw;
            v.resize(16 * ci * nt, 0.0);
            m.resize(16 * co * nt, 0.0);
            let x_b = &xs[bi * ci * h * w..(bi + 1) * ci * h * w];
            // V = B^T d B, laid out [16][ci][nt]: B^T along the columns as whole padded rows,
            // then B along each row, block by block.
            for c in 0..ci {
                let plane = &x_b[c * h * w..(c + 1) * h * w];
                for r in 0..nr {
                    let ty = r0 + r;
                    for i in 0..4 {
                        let row = &mut rows[i * pw..(i + 1) * pw];
                        let y = (2 * ty + i) as isize - 1;
                        if y < 0 || y >= h as isize {
                            row.fill(0.0);
                        } else {
                            let y = y as usize;
                            row[0] = 0.0;
                            row[1..w + 1].copy_from_slice(&plane[y * w..(y + 1) * w]);
                            row[w + 1..].fill(0.0);
                        }
                    }
                    let (d0, rest) = rows.split_at(pw);
                    let (d1, rest) = rest.split_at(pw);
                    let (d2, d3) = rest.split_at(pw);
                    let (b0, rest) = bt.split_at_mut(pw);
                    let (b1, rest) = rest.split_at_mut(pw);
                    let (b2, b3) = rest.split_at_mut(pw);
                    for x in 0..pw {
                        [b0[x], b1[x], b2[x], b3[x]] = wino_bt([d0[x], d1[x], d2[x], d3[x]]);
                    }
                    for (i, bi_row) in [&*b0, &*b1, &*b2, &*b3].into_iter().enumerate() {
                        let at = |j: usize| ((i * 4 + j) * ci + c) * nt + r * tw;
                        let (o0, o1, o2, o3) = (at(0), at(1), at(2), at(3));
                        for tx in 0..tw {
                            let p = &bi_row[2 * tx..2 * tx + 4];
                            [v[o0 + tx], v[o1 + tx], v[o2 + tx], v[o3 + tx]] =
                                wino_bt([p[0], p[1], p[2], p[3]]);
                        }
                    }
                }
            }
            for xi in 0..16 {
                let lhs = Operand::rows(u[xi * ci..].as_ptr(), 16 * ci);
                let rhs = Operand::rows(v[xi * ci * nt..].as_ptr(), nt);
                let prod = m[xi * co * nt..].as_mut_ptr();
                // SAFETY: m, u and v hold these [co, nt], [co, ci] and [ci, nt] matrices.
                unsafe { gemm_into((co, nt, ci), prod, nt, false, lhs, rhs, 1.0) };
            }
            // Y = A^T m A, added to the output: A^T down the 16 products (both output rows of
            // every block of a row at once), then A along each output row.
            for o in 0..co {
                let plane = dst.at((bi * co + o) * h * w);
                for r in 0..nr {
                    let mrow = |xi: usize| {
                        let s = (xi * co + o) * nt + r * tw;
                        &m[s..s + tw]
                    };
                    // sums[(i * 4 + j) * tw + t]: output row i of block t, before A along j.
                    let (top, bottom) = sums.split_at_mut(4 * tw);
                    for j in 0..4 {
                        let (m0, m1, m2, m3) = (mrow(j), mrow(4 + j), mrow(8 + j), mrow(12 + j));
                        for t in 0..tw {
                            [top[j * tw + t], bottom[j * tw + t]] =
                                wino_at([m0[t], m1[t], m2[t], m3[t]]);
                        }
                    }
                    for (i, part) in [&*top, &*bottom].into_iter().enumerate() {
                        let y = 2 * (r0 + r) + i;
                        if y >= h {
                            continue;
                        }
                        // SAFETY: rows of blocks r0..r0 + nr of image bi belong to this task.
                        let out_row =
                            unsafe { std::slice::from_raw_parts_mut(plane.add(y * w), w) };
                        let s = |j: usize| &part[j * tw..(j + 1) * tw];
                        at_row([s(0), s(1), s(2), s(3)], out_row);
                    }
                }
            }
        },
    );
}

/// Winograd F(2, 2)'s weight transform along one axis: two taps to three.
#[inline(always)]
fn wino2_g([g0, g1]: [f32; 2]) -> [f32; 3] {
    [g0, g0 + g1, g1]
}

/// Its input transform `B^T` along one axis: three values of a patch to three.
#[inline(always)]
fn wino2_bt([d0, d1, d2]: [f32; 3]) -> [f32; 3] {
    [d0 - d1, d1, d2 - d1]
}

/// Its output transform `A^T` along one axis: three products to two outputs.
#[inline(always)]
fn wino2_at([m0, m1, m2]: [f32; 3]) -> [f32; 2] {
    [m0 + m1, m1 + m2]
}

/// The decoder's upsampler, nearest-neighbour x2 then a 3x3 convolution (stride 1, padding 1),
/// as four 2x2 convolutions of the low-resolution input, one per output pixel parity (dy, dx):
/// the upsampled image repeats each input pixel in a 2x2 block, so of the 3x3 taps of an output
/// pixel those that land on the same input pixel can be summed into one weight first. Each 2x2
/// convolution then runs as Winograd's F(2x2, 2x2) ([`winograd_up2`]): 9 products per 2x2 block
/// where the direct 2x2 convolution takes 16, so 9/16 of its multiply-adds, and a quarter of
/// those of convolving the upsampled image. The same sums in another order. `None` unless `g` is
/// that geometry (x2, stride 1, padding 1 all round), the kernel 3x3 and the tensors f32 CPU
/// tensors.
pub fn conv_up2_3x3(
    x: &Tensor<4>,
    w: &Tensor<4>,
    bias: &Tensor<1>,
    g: Geometry,
) -> Option<Tensor<4>> {
    if g.upsample != 2 || g.stride != 1 || g.pads() != ((1, 1), (1, 1)) {
        return None;
    }
    let (xd, wd, bd) = (Dense::of(x)?, Dense::of(w)?, Dense::of(bias)?);
    let [b, ci, h, wi] = x.dims();
    let [co, wci, kh, kw] = w.dims();
    if wci != ci || kh != 3 || kw != 3 || bias.dims() != [co] {
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
    // The four phases' 2x2 kernels, Winograd-transformed (G g G^T, 3x3), laid out [co][36][ci]:
    // phase p's transformed tap (k, l) is the [co, ci] operand at (p * 9 + k * 3 + l) * ci.
    let mut u = vec![0f32; co * 36 * ci];
    u.par_chunks_mut(36 * ci).enumerate().for_each(|(oc, uo)| {
        for c in 0..ci {
            let src = &ws[(oc * ci + c) * 9..(oc * ci + c + 1) * 9];
            for (p, (dy, dx)) in [(0, 0), (0, 1), (1, 0), (1, 1)].into_iter().enumerate() {
                let tap = |r: usize, q: usize| -> f32 {
                    let mut sum = 0f32;
                    for &ky in taps(dy, r) {
                        for &kx in taps(dx, q) {
                            sum += src[ky * 3 + kx];
                        }
                    }
                    sum
                };
                let cols: [[f32; 3]; 2] = std::array::from_fn(|q| wino2_g([tap(0, q), tap(1, q)]));
                for k in 0..3 {
                    for (l, v) in wino2_g([cols[0][k], cols[1][k]]).into_iter().enumerate() {
                        uo[(p * 9 + k * 3 + l) * ci + c] = v;
                    }
                }
            }
        }
    });
    let len = b * co * 4 * h * wi;
    let mut out = Vec::<f32>::with_capacity(len);
    // SAFETY: out has room for the len values, which winograd_up2's tasks zero and fill.
    unsafe {
        winograd_up2(
            SendPtr(out.as_mut_ptr()),
            xd.slice(),
            &u,
            bd.slice(),
            (b, ci, h, wi),
            co,
        );
        out.set_len(len);
    }
    Some(super::tensor(out, [b, co, 2 * h, 2 * wi]))
}

/// `out = bias + conv(upsample2(x), w)` from the phase kernels' transforms `u` (see
/// [`conv_up2_3x3`]): for each phase (dy, dx) and each 2x2 block of low-resolution outputs, the
/// 3x3 input patch at offset (dy - 1, dx - 1) transformed as `V = B^T d B`, 9 products `U V`,
/// and `A^T m A` back to the block's four pixels, which land on the high-resolution pixels of
/// that parity. Tasks take whole rows of blocks, as in [`winograd_3x3`], and the phases one
/// after another, so a task's products are those of one phase.
///
/// # Safety
/// `dst` has room for the `b x co x 2h x 2w` output, which nothing else touches meanwhile; each
/// task zeroes its rows of it before it writes them, so it may start uninitialised.
unsafe fn winograd_up2(
    dst: SendPtr,
    xs: &[f32],
    u: &[f32],
    bias: &[f32],
    (b, ci, h, w): (usize, usize, usize, usize),
    co: usize,
) {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let threads = rayon::current_num_threads().max(1);
    let rows_per = WINOGRAD_TILES
        .div_ceil(tw)
        .min(th.div_ceil(2 * threads))
        .max(1);
    let chunks = th.div_ceil(rows_per);
    // Input rows padded by one zero on the left and enough on the right for the last block's
    // patch at offset +1.
    let pw = 2 * tw + 2;
    let (oh, ow) = (2 * h, 2 * w);
    (0..b * chunks).into_par_iter().for_each_init(
        || {
            (
                Vec::new(),
                Vec::new(),
                vec![0f32; 4 * pw],
                vec![0f32; 3 * pw],
                vec![0f32; 6 * tw],
            )
        },
        |(v, m, rows, bt, sums), task| {
            let (bi, r0) = (task / chunks, (task % chunks) * rows_per);
            let nr = rows_per.min(th - r0);
            let nt = nr * tw;
            // This task's high-resolution rows of every plane (the chunks' rows cover them all).
            let (y0, y1) = (4 * r0, (4 * (r0 + nr)).min(oh));
            for o in 0..co {
                // SAFETY: rows y0..y1 of plane (bi, o) are this task's (the caller's promise).
                unsafe {
                    std::ptr::write_bytes(dst.at(((bi * co + o) * oh + y0) * ow), 0, (y1 - y0) * ow)
                };
            }
            v.resize(9 * ci * nt, 0.0);
            m.resize(9 * co * nt, 0.0);
            let x_b = &xs[bi * ci * h * w..(bi + 1) * ci * h * w];
            for (p, (dy, dx)) in [(0, 0), (0, 1), (1, 0), (1, 1)].into_iter().enumerate() {
                // V = B^T d B, laid out [9][ci][nt].
                for c in 0..ci {
                    let plane = &x_b[c * h * w..(c + 1) * h * w];
                    for r in 0..nr {
                        // Input rows 2 * ty + dy - 1 + i, i < 3, padded.
                        for i in 0..3 {
                            let row = &mut rows[i * pw..(i + 1) * pw];
                            let y = (2 * (r0 + r) + dy + i) as isize - 1;
                            if y < 0 || y >= h as isize {
                                row.fill(0.0);
                            } else {
                                let y = y as usize;
                                row[0] = 0.0;
                                row[1..w + 1].copy_from_slice(&plane[y * w..(y + 1) * w]);
                                row[w + 1..].fill(0.0);
                            }
                        }
                        let (d0, rest) = rows.split_at(pw);
                        let (d1, d2) = rest.split_at(pw);
                        let (b0, rest) = bt.split_at_mut(pw);
                        let (b1, b2) = rest.split_at_mut(pw);
                        for x in 0..pw {
                            [b0[x], b1[x], b2[x]] = wino2_bt([d0[x], d1[x], d2[x]]);
                        }
                        for (k, bk) in [&*b0, &*b1, &*b2].into_iter().enumerate() {
                            let at = |l: usize| ((k * 3 + l) * ci + c) * nt + r * tw;
                            let (o0, o1, o2) = (at(0), at(1), at(2));
                            for tx in 0..tw {
                                let q = &bk[2 * tx + dx..2 * tx + dx + 3];
                                [v[o0 + tx], v[o1 + tx], v[o2 + tx]] = wino2_bt([q[0], q[1], q[2]]);
                            }
                        }
                    }
                }
                for xi in 0..9 {
                    let lhs = Operand::rows(u[(p * 9 + xi) * ci..].as_ptr(), 36 * ci);
                    let rhs = Operand::rows(v[xi * ci * nt..].as_ptr(), nt);
                    let prod = m[xi * co * nt..].as_mut_ptr();
                    // SAFETY: m, u and v hold these [co, nt], [co, ci] and [ci, nt] matrices.
                    unsafe { gemm_into((co, nt, ci), prod, nt, false, lhs, rhs, 1.0) };
                }
                // Y = A^T m A plus the bias, written to this parity's pixels.
                for (o, &b) in bias.iter().enumerate().take(co) {
                    let plane = dst.at((bi * co + o) * oh * ow);
                    for r in 0..nr {
                        let mrow = |xi: usize| {
                            let s = (xi * co + o) * nt + r * tw;
                            &m[s..s + tw]
                        };
                        let (top, bottom) = sums.split_at_mut(3 * tw);
                        for l in 0..3 {
                            let (m0, m1, m2) = (mrow(l), mrow(3 + l), mrow(6 + l));
                            for t in 0..tw {
                                [top[l * tw + t], bottom[l * tw + t]] =
                                    wino2_at([m0[t], m1[t], m2[t]]);
                            }
                        }
                        for (i, part) in [&*top, &*bottom].into_iter().enumerate() {
                            let y = 2 * (r0 + r) + i;
                            if y >= h {
                                continue;
                            }
                            // SAFETY: the high-resolution rows of blocks r0..r0 + nr of image bi
                            // belong to this task.
                            let out_row = unsafe {
                                std::slice::from_raw_parts_mut(plane.add((2 * y + dy) * ow), ow)
                            };
                            let s = |l: usize, t: usize| part[l * tw + t];
                            for t in 0..tw {
                                let pair = wino2_at([s(0, t), s(1, t), s(2, t)]);
                                for (j, v) in pair.into_iter().enumerate() {
                                    let x = 2 * t + j;
                                    if x < w {
                                        out_row[2 * x + dx] = v + b;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    );
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
