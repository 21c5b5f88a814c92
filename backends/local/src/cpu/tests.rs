//! Each kernel against the burn composition it replaces, on random inputs of awkward sizes
//! (remainders of every vector width and tile), strided views included.

use burn::tensor::module::{attention, conv2d};
use burn::tensor::ops::{AttentionModuleOptions, ConvOptions};
use burn::tensor::{Device, Distribution, Tensor};

use super::*;

fn rand<const D: usize>(shape: [usize; D]) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Device::flex())
}

/// The largest difference relative to the expected value's magnitude (absolute below 1): the
/// kernels round differently from burn's op-by-op results, by a few ulp of the values.
fn max_diff<const D: usize>(got: Tensor<D>, want: Tensor<D>) -> f32 {
    assert_eq!(got.dims(), want.dims());
    let scale = want.clone().abs().add_scalar(1.0);
    got.sub(want).abs().div(scale).max().into_scalar::<f32>()
}

#[test]
fn silu_and_swiglu_match_burn() {
    let x = rand([3, 37, 2 * 77]).mul_scalar(6.0);
    let got = elementwise::silu(&x).expect("f32 cpu");
    let want = burn::tensor::activation::silu(x.clone());
    assert!(max_diff(got, want.clone()) < 1e-5);
    // A slice of a wider projection, as the single block's MLP input is.
    let wide = rand([2, 19, 3 + 2 * 45]).mul_scalar(4.0);
    let part = wide.clone().narrow(2, 3, 90);
    let got = elementwise::swiglu(&part).expect("strided rows");
    let mut halves = part.chunk(2, 2);
    let up = halves.pop().unwrap();
    let gate = halves.pop().unwrap();
    let want = burn::tensor::activation::silu(gate).mul(up);
    assert!(max_diff(got, want) < 1e-5);
}

#[test]
fn gated_add_matches_burn() {
    let (x, g, y) = (rand([2, 33, 70]), rand([2, 1, 70]), rand([2, 33, 70]));
    let got = elementwise::gated_add(&x, &g, &y).expect("f32 cpu");
    assert!(max_diff(got, x.add(g.mul(y))) < 1e-5);
}

#[test]
fn group_norm_with_and_without_silu_matches_burn() {
    let (b, c, h, w, groups) = (2, 12, 9, 11, 4);
    let x = rand([b, c, h, w]).mul_scalar(3.0).add_scalar(1.5);
    let (gamma, beta) = (rand([c]), rand([c]));
    let normed = x.clone().reshape([b, groups, c / groups * h * w]);
    let mean = normed.clone().mean_dim(2);
    let var = normed.clone().sub(mean.clone()).square().mean_dim(2);
    let want = normed
        .sub(mean)
        .div(var.add_scalar(1e-6).sqrt())
        .reshape([b, c, h, w])
        .mul(gamma.clone().reshape([1, c, 1, 1]))
        .add(beta.clone().reshape([1, c, 1, 1]));
    let got = norm::group_norm(&x, groups, &gamma, &beta, 1e-6, false).expect("f32 cpu");
    assert!(max_diff(got, want.clone()) < 1e-4);
    let got = norm::group_norm(&x, groups, &gamma, &beta, 1e-6, true).expect("f32 cpu");
    assert!(max_diff(got, burn::tensor::activation::silu(want)) < 1e-4);
}

#[test]
fn conv_matches_burn_for_every_geometry_the_vae_uses() {
    // (cin, cout, k, stride, pad, upsample, residual)
    // (cin, cout, k, stride, pad, upsample, residual, input width)
    let cases = [
        (5, 7, 3, 1, (1, 1), 1, false, 10),
        (5, 7, 3, 1, (1, 1), 1, true, 10),
        // Winograd's 2x2 blocks over an odd width and height, with many channels, and over a
        // one-pixel-wide image with one channel in and out.
        (40, 12, 3, 1, (1, 1), 1, false, 11),
        (1, 1, 3, 1, (1, 1), 1, true, 1),
        (6, 6, 3, 2, (0, 1), 1, false, 10),
        (4, 9, 1, 1, (0, 0), 1, true, 10),
        (3, 5, 3, 1, (1, 1), 2, false, 10),
        // The upsampler's Winograd blocks over an odd width, with many channels, and over one
        // pixel and one channel.
        (40, 12, 3, 1, (1, 1), 2, false, 11),
        (1, 1, 3, 1, (1, 1), 2, false, 1),
        // A pad wider than one: a tile that ends one pixel into a row leaves a segment with no
        // tap inside the image.
        (2, 3, 5, 1, (2, 2), 1, false, 15),
    ];
    for (ci, co, k, s, pad, up, res, width) in cases {
        let x = rand([2, ci, 13, width]);
        let (w, bias) = (rand([co, ci, k, k]), rand([co]));
        let input = if up == 2 {
            let [b, c, h, wd] = x.dims();
            x.clone()
                .reshape([b, c, h, 1, wd, 1])
                .expand([b, c, h, 2, wd, 2])
                .reshape([b, c, 2 * h, 2 * wd])
        } else {
            x.clone()
        };
        let want = conv2d(
            input,
            w.clone(),
            Some(bias.clone()),
            ConvOptions::new_with_padding([s; 2], [pad; 2], [1, 1], 1),
        );
        let geometry = conv::Geometry::new(s, pad, up);
        let want_plain = want.clone();
        let r = rand(want.dims());
        // The 3x3 case adds to a residual nothing else holds (in place), the 1x1 case to a shared one.
        let mut residual = res.then(|| {
            if k == 3 {
                Tensor::from_data(r.to_data(), &Device::flex())
            } else {
                r.clone()
            }
        });
        let got = conv::conv2d(&x, &w, &bias, geometry, &mut residual).expect("f32 cpu");
        assert!(residual.is_none());
        let want = if res { want.add(r) } else { want };
        let d = max_diff(got, want);
        assert!(d < 1e-4, "conv {ci}->{co} k{k} s{s} {pad:?} up{up}: {d}");
        if up == 2 && k == 3 {
            let got = conv::conv_up2_3x3(&x, &w, &bias, geometry).expect("3x3 on f32 cpu");
            let d = max_diff(got, want_plain.clone());
            assert!(
                d < 1e-4,
                "the four 2x2 convolutions of the x2 upsampler, {ci}->{co}, width {width}: {d}"
            );
        }
    }
}

#[test]
fn attention_matches_burn_on_strided_heads() {
    let (b, h, s, d) = (2, 3, 150, 16);
    // q, k, v as the heads of one fused projection `[B, S, 3 * H * D]`.
    let proj = rand([b, s, 3 * h * d]);
    let head = |i: usize| {
        proj.clone()
            .narrow(2, i * h * d, h * d)
            .reshape([b, s, h, d])
            .swap_dims(1, 2)
    };
    let (q, k, v) = (head(0), head(1), head(2));
    let got = attention::sdpa(&q, &k, &v).expect("f32 cpu");
    let want = attention(q, k, v, None, None, AttentionModuleOptions::default());
    assert!(max_diff(got, want) < 1e-5);
    // Enough keys that a head's scores are split into blocks of query rows, the last one short.
    let (b, h, s, d) = (1, 2, 1200, 8);
    let block = attention::block_rows(b * h, s, s, 2);
    assert!(block < s && s % block != 0, "{block} rows a block");
    let (q, k, v) = (rand([b, h, s, d]), rand([b, h, s, d]), rand([b, h, s, d]));
    let got = attention::sdpa(&q, &k, &v).expect("f32 cpu");
    let want = attention(q, k, v, None, None, AttentionModuleOptions::default());
    assert!(max_diff(got, want) < 1e-5);
    // Fewer query rows than the smallest block (a VAE mid-block over a 2x2 latent).
    let (q, k, v) = (rand([1, 1, 4, 8]), rand([1, 1, 4, 8]), rand([1, 1, 4, 8]));
    let got = attention::sdpa(&q, &k, &v).expect("f32 cpu");
    let want = attention(q, k, v, None, None, AttentionModuleOptions::default());
    assert!(max_diff(got, want) < 1e-5);
    assert_eq!(attention::block_rows(1, 4, 4, 2), 4);
    // Few heads on many threads: at least two tasks a thread.
    assert_eq!(attention::block_rows(1, 384, 384, 16), 16);
    assert_eq!(attention::block_rows(2, 384, 384, 2), 192);
    assert_eq!(attention::block_rows(6, 384, 384, 2), 384);
}

#[test]
fn joined_heads_are_normed_rotated_and_in_sequence_order() {
    let (b, h, d) = (2, 3, 8);
    let (txt, img) = (rand([b, 5, h, d]), rand([b, 7, h, d]));
    let (wt, wi) = (rand([d]), rand([d]));
    let (cos, sin) = (rand([12, d]), rand([12, d]));
    let got = norm::join_heads(
        &[
            norm::Part {
                x: &txt,
                norm: Some(&wt),
            },
            norm::Part {
                x: &img,
                norm: Some(&wi),
            },
        ],
        Some(&norm::RopeTables {
            cos: &cos,
            sin: &sin,
        }),
        1e-6,
    )
    .expect("f32 cpu");
    let rms = |x: Tensor<4>, w: &Tensor<1>| {
        let inv = x
            .clone()
            .square()
            .mean_dim(3)
            .add_scalar(1e-6)
            .sqrt()
            .recip();
        x.mul(inv).mul(w.clone().reshape([1, 1, 1, d]))
    };
    let joint = Tensor::cat(vec![rms(txt, &wt), rms(img, &wi)], 1);
    let swapped = joint
        .clone()
        .reshape([b, 12, h, d / 2, 2])
        .flip([4])
        .reshape([b, 12, h, d]);
    let want = joint
        .mul(cos.reshape([1, 12, 1, d]))
        .add(swapped.mul(sin.reshape([1, 12, 1, d])));
    assert!(max_diff(got, want) < 1e-5);
}

#[test]
fn empty_tensors_and_other_dtypes_are_left_to_burn() {
    assert!(elementwise::silu(&rand([2, 0, 6])).is_none());
    assert!(norm::rms_norm(&rand([3, 0]), &rand([0]), 1e-6).is_none());
    let x = rand([2, 4, 6]).cast(burn::tensor::FloatDType::F16);
    assert!(elementwise::silu(&x).is_none());
    assert!(flex_f32(&x).is_none());
}

#[test]
fn modulate_matches_burn_for_a_batch_of_two() {
    let (x, shift, scale) = (
        rand([2, 21, 40]).mul_scalar(2.0).add_scalar(0.7),
        rand([2, 1, 40]),
        rand([2, 1, 40]),
    );
    let got = norm::modulate(&x, &shift, &scale, 1e-6).expect("f32 cpu");
    let mean = x.clone().mean_dim(2);
    let var = x.clone().sub(mean.clone()).square().mean_dim(2);
    let want = x
        .sub(mean)
        .div(var.add_scalar(1e-6).sqrt())
        .mul(scale.add_scalar(1.0))
        .add(shift);
    assert!(max_diff(got, want) < 1e-5);
}

#[test]
fn rms_norm_matches_burn() {
    let (x, w) = (rand([3, 7, 24]).mul_scalar(3.0), rand([24]));
    let got = norm::rms_norm(&x, &w, 1e-6).expect("f32 cpu");
    let inv = x
        .clone()
        .square()
        .mean_dim(2)
        .add_scalar(1e-6)
        .sqrt()
        .recip();
    assert!(max_diff(got, x.mul(inv).mul(w.reshape([1, 1, 24]))) < 1e-5);
}

#[test]
fn group_norm_statistics_hold_over_a_large_plane() {
    // One group of 2^20 values 10 +- 0.01: mean 10, variance 1e-4 exactly. Lanes that summed a
    // whole plane in f32 lose the 0.01s against totals in the millions.
    let n = 1 << 20;
    let v: Vec<f32> = (0..n)
        .map(|i| if i % 2 == 0 { 10.01 } else { 9.99 })
        .collect();
    let x = Tensor::<4>::from_data(
        burn::tensor::TensorData::new(v, [1, 4, 512, 512]),
        &Device::flex(),
    );
    let ones = Tensor::<1>::ones([4], &Device::flex());
    let zeros = Tensor::<1>::zeros([4], &Device::flex());
    let got = norm::group_norm(&x, 1, &ones, &zeros, 1e-6, false).expect("f32 cpu");
    let want = 0.01 / (1e-4f64 + 1e-6).sqrt();
    let got = got.into_data().try_to_vec::<f32>().expect("f32");
    for (i, g) in got.iter().enumerate().step_by(4099) {
        let w = if i % 2 == 0 { want } else { -want };
        assert!((*g as f64 - w).abs() < 2e-3, "value {i}: {g}, want {w}");
    }
}

/// The packed linear kernels against burn's matmul: row counts below, at and past each register
/// block (and several blocks with a remainder), depths that end mid-pass, output widths that end
/// mid-panel, with and without a bias; every kernel this CPU runs, not only the one it would
/// choose. Without AVX2 nothing packs, and the layer is burn's.
#[test]
fn packed_linear_matches_burn() {
    let shapes = [
        (1, 24, 40),
        (5, 40, 16),
        (13, 300, 33),
        (14, 256, 64),
        (15, 513, 97),
        (37, 768, 130),
        (64, 70, 32),
    ];
    let isas: Vec<_> = [matmul::Isa::Avx512, matmul::Isa::Avx2]
        .into_iter()
        .filter(|i| i.supported())
        .collect();
    for (m, k, n) in shapes {
        let (x, w, b) = (rand([m, k]), rand([k, n]), rand([n]));
        let dense = Dense::of(&w).expect("f32 cpu");
        let Some(packed) = matmul::PackedWeight::new(dense.slice(), k, n) else {
            assert!(isas.is_empty(), "a kernel runs but nothing packed");
            continue;
        };
        assert_eq!((packed.k(), packed.n()), (k, n));
        assert_eq!(
            packed.unpack(),
            dense.slice(),
            "the packing is a permutation"
        );
        let want = x.clone().matmul(w.clone());
        let want_b = want.clone().add(b.clone().unsqueeze::<2>());
        // The choice of kernel, through the tensor entry point.
        let got = matmul::linear(&x, &packed, Some(&b)).expect("f32 cpu");
        assert!(max_diff(got, want_b.clone()) < 1e-4, "{m}x{k}x{n}");
        let (xd, bd) = (Dense::of(&x).expect("f32"), Dense::of(&b).expect("f32"));
        for &isa in &isas {
            for bias in [None, Some(bd.slice())] {
                let mut out = vec![f32::NAN; m * n];
                matmul::matmul_with(isa, xd.slice(), k, m, &packed, bias, &mut out);
                let got = tensor(out, [m, n]);
                let want = if bias.is_some() { &want_b } else { &want };
                let d = max_diff(got, want.clone());
                // Rounding: sums of up to 768 products, in another order than gemm's.
                assert!(d < 1e-4, "{isa:?} {m}x{k}x{n} bias {}: {d}", bias.is_some());
            }
        }
        // Rows further apart than the depth (a slice of a wider tensor).
        let wide = rand([m, k + 3]);
        let want = wide.clone().narrow(1, 2, k).matmul(w.clone());
        let wd = Dense::of(&wide).expect("f32");
        for &isa in &isas {
            let mut out = vec![f32::NAN; m * n];
            matmul::matmul_with(isa, &wd.slice()[2..], k + 3, m, &packed, None, &mut out);
            assert!(
                max_diff(tensor(out, [m, n]), want.clone()) < 1e-4,
                "{isa:?} strided"
            );
        }
        // A bias or an input of the wrong width is refused, not read past its end.
        assert!(matmul::linear(&x, &packed, Some(&rand([n + 1]))).is_none());
        assert!(matmul::linear(&rand([m, k + 1]), &packed, None).is_none());
    }
}

/// The joined product against burn's cat, SwiGLU and matmul: inputs read through their strides
/// (a batch of two narrowed out of wider tensors), a gated one, depths that cross the kernel's
/// depth passes mid-input, and more rows than one group of row blocks holds.
#[test]
fn joined_linear_matches_cat_swiglu_matmul() {
    if matmul::Isa::best().is_none() {
        return;
    }
    let silu_mul = |x: Tensor<3>| {
        let mut halves = x.chunk(2, 2);
        let up = halves.pop().unwrap();
        let gate = halves.pop().unwrap();
        burn::tensor::activation::silu(gate).mul(up)
    };
    for (b, s, ka, kg, n) in [
        (2, 19, 200, 90, 70),
        (1, 1100, 40, 300, 33),
        (2, 3, 0, 129, 32),
    ] {
        let w = rand([ka + kg, n]);
        let packed = matmul::PackedWeight::new(Dense::of(&w).unwrap().slice(), ka + kg, n).unwrap();
        // A wider buffer and a longer sequence, so both inputs are views with row strides of
        // their own and a batch stride that is not s rows.
        let a = (ka > 0).then(|| rand([b, s + 2, ka + 5]).narrow(1, 1, s).narrow(2, 3, ka));
        let g = rand([b, s + 1, 2 * kg + 7])
            .narrow(1, 0, s)
            .narrow(2, 7, 2 * kg);
        let mut inputs: Vec<_> = a.iter().map(|a| (a, false)).collect();
        inputs.push((&g, true));
        let mut parts: Vec<_> = a.iter().cloned().collect();
        parts.push(silu_mul(g.clone()));
        let want = Tensor::cat(parts, 2).matmul(w.clone().unsqueeze::<3>());
        let got = matmul::linear_joined(&inputs, &packed).expect("f32 cpu views");
        let d = max_diff(got, want);
        assert!(d < 1e-4, "{b}x{s} a {ka} gated {kg} -> {n}: {d}");
    }
    // Depths that do not add up to the weight's, and an odd gated width, are refused.
    let packed = matmul::PackedWeight::new(&[0.0; 10 * 4], 10, 4).unwrap();
    assert!(matmul::linear_joined(&[(&rand([1, 2, 9]), false)], &packed).is_none());
    assert!(matmul::linear_joined(&[(&rand([1, 2, 21]), true)], &packed).is_none());
    assert!(matmul::linear_joined(&[(&rand([1, 2, 20]), true)], &packed).is_some());
}
