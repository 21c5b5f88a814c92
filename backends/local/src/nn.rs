//! Small building blocks shared by the model parts.
//!
//! Every block takes its input in the compute dtype and returns the compute dtype. Where the
//! reference (PyTorch) computes in f32 and rounds once, so do these: the norms (statistics and
//! normalisation in f32, one rounding), SiLU, and attention's softmax; elementwise products and
//! sums round after each op, as PyTorch's do. In f32 every cast is a no-op.

use std::sync::Arc;

use burn::tensor::module::{attention, layer_norm as fused_layer_norm, linear};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, FloatDType, Tensor};

use crate::cpu;
use crate::cpu::matmul::PackedWeight;

/// `x` as a tensor of rank `N` when `D == N` (the rank is only a type parameter; the data is
/// untouched), for calling a kernel written for one rank from code generic over it.
fn as_rank<const D: usize, const N: usize>(x: Tensor<D>) -> Option<Tensor<N>> {
    (D == N).then(|| Tensor::from_bridge(x.into_bridge()))
}

/// Run `f` on `x` in f32 and round the result back to `x`'s dtype once.
pub fn in_f32<const D: usize>(x: Tensor<D>, f: impl FnOnce(Tensor<D>) -> Tensor<D>) -> Tensor<D> {
    let dtype = x.dtype();
    if dtype == DType::F32 {
        return f(x);
    }
    f(x.cast(FloatDType::F32)).cast(dtype)
}

/// A linear layer's weight, `[in, out]`. In f32 on an x86 CPU with AVX2 + FMA or AVX-512 it is
/// packed once, here, for [`cpu::matmul`], and the tensor is dropped, so the weight is held once;
/// everywhere else it is burn's tensor, for burn's matmul. (A packed weight is unpacked again
/// only where the packed kernel declines an input: an empty one.)
#[derive(Clone, Debug)]
pub struct LinearWeight(Repr);

// A few hundred per model, read by reference: the tensor's size next to the Arc costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
enum Repr {
    Tensor(Tensor<2>),
    Packed(Arc<PackedWeight>),
}

impl LinearWeight {
    /// `w` in burn's `[in, out]` layout (see `WeightStore::linear`).
    pub fn new(w: Tensor<2>) -> Self {
        let packed = cpu::Dense::of(&w).and_then(|d| {
            let [k, n] = w.dims();
            PackedWeight::new(d.slice(), k, n)
        });
        LinearWeight(match packed {
            Some(p) => Repr::Packed(Arc::new(p)),
            None => Repr::Tensor(w),
        })
    }

    /// burn's tensor, unpacked again where the weight was packed.
    fn tensor(&self) -> Tensor<2> {
        match &self.0 {
            Repr::Tensor(t) => t.clone(),
            Repr::Packed(p) => cpu::tensor(p.unpack(), [p.k(), p.n()]),
        }
    }

    /// Whether the packed CPU kernel runs this layer.
    pub fn is_packed(&self) -> bool {
        matches!(self.0, Repr::Packed(_))
    }

    /// [`cpu::matmul::linear_joined`] where the weight is packed and the inputs suit it.
    fn joined(&self, inputs: &[(&Tensor<3>, bool)]) -> Option<Tensor<3>> {
        match &self.0 {
            Repr::Packed(p) => cpu::matmul::linear_joined(inputs, p),
            _ => None,
        }
    }

    /// `x @ w (+ b)` for `x` `[rows, in]`, in `x`'s dtype.
    fn forward(&self, x: Tensor<2>, b: Option<&Tensor<1>>) -> Tensor<2> {
        if let Repr::Packed(p) = &self.0 {
            if let Some(y) = cpu::matmul::linear(&x, p, b) {
                return y;
            }
        }
        linear(x, self.tensor(), b.cloned())
    }
}

/// `x @ w`.
pub fn lin<const D: usize>(x: Tensor<D>, w: &LinearWeight) -> Tensor<D> {
    // A `[B, S, in]` input goes to the packed kernel as it is laid out (a view needs no copy).
    if let Some(y) = as_rank::<D, 3>(x.clone())
        .and_then(|x3| w.joined(&[(&x3, false)]))
        .and_then(as_rank::<3, D>)
    {
        return y;
    }
    rows_at_once(x, |x| w.forward(x, None))
}

/// `cat([x_0, x_1, ..], -1) @ w` for `[B, S, k_i]` inputs, where a gated one (`true`) is
/// `[B, S, 2 k_i]` and enters as its [`swiglu`]: the single-stream block's output projection
/// over attention and the MLP, and the MLPs' down projections. On the CPU in f32 the join and
/// the SwiGLU happen inside the packed kernel ([`cpu::matmul::linear_joined`]); otherwise burn's
/// ops, one after the other.
pub fn lin_joined(inputs: &[(Tensor<3>, bool)], w: &LinearWeight) -> Tensor<3> {
    let refs: Vec<(&Tensor<3>, bool)> = inputs.iter().map(|(x, g)| (x, *g)).collect();
    if let Some(y) = w.joined(&refs) {
        return y;
    }
    let parts = inputs
        .iter()
        .map(|(x, gated)| if *gated { swiglu(x.clone()) } else { x.clone() })
        .collect::<Vec<_>>();
    let x = if parts.len() == 1 {
        parts.into_iter().next().expect("one part")
    } else {
        Tensor::cat(parts, 2)
    };
    lin(x, w)
}

/// `f` (a linear layer) on `x` `[.., in]` with every leading dimension folded into the rows: one
/// `[rows, in] @ [in, out]` product. burn folds them only when the rows per batch are not a
/// multiple of its tile; otherwise burn-flex runs one gemm per batch entry, each packing the
/// whole weight again and splitting a smaller product over the pool (the CFG step's batch of
/// two). A reshape of a contiguous tensor is free.
fn rows_at_once<const D: usize>(x: Tensor<D>, f: impl FnOnce(Tensor<2>) -> Tensor<2>) -> Tensor<D> {
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    let y = f(x.reshape([rows, dims[D - 1]]));
    let mut out = dims;
    out[D - 1] = y.dims()[1];
    y.reshape(out)
}

/// RMSNorm over the last dimension, with a learned scale: `x / sqrt(mean(x^2) + eps) * w`.
/// (The statistic is one row value: `recip` of it and two multiplies are the full-size passes.)
/// In reduced precision the normalised value is rounded before the scale multiplies it
/// (transformers' Qwen3RMSNorm and diffusers' RMSNorm both do `weight * x.to(dtype)`).
pub fn rms_norm<const D: usize>(x: Tensor<D>, w: &Tensor<1>, eps: f64) -> Tensor<D> {
    if let Some(y) = cpu::norm::rms_norm(&x, w, eps) {
        return y;
    }
    let dtype = x.dtype();
    let x = x.cast(FloatDType::F32);
    let inv = x
        .clone()
        .square()
        .mean_dim(D - 1)
        .add_scalar(eps)
        .sqrt()
        .recip();
    let dims = x.dims();
    let mut wshape = [1usize; D];
    wshape[D - 1] = dims[D - 1];
    x.mul(inv).cast(dtype).mul(w.clone().reshape(wshape))
}

/// LayerNorm over the last dimension without affine parameters: burn's fused kernel (one pass
/// over the data on the CPU backend, statistics in f32) with a unit scale.
pub fn layer_norm<const D: usize>(x: Tensor<D>, eps: f64) -> Tensor<D> {
    in_f32(x, |x| {
        let dims = x.dims();
        let ones = Tensor::<1>::ones([dims[D - 1]], &x.device());
        fused_layer_norm(x, ones, None, eps)
    })
}

/// `layer_norm(x) * (1 + scale) + shift`, the transformer's modulation, with `shift`/`scale` of
/// shape `[B, 1, C]`. For one row of modulation (batch 1) the affine part is the fused kernel's
/// own scale and bias: one pass instead of three. In reduced precision the three ops round one by
/// one, as diffusers' `(1 + scale) * norm(x) + shift` does.
///
/// In f32 on the CPU, for any batch size, one pass per row ([`cpu::norm::modulate`]).
pub fn modulate(x: Tensor<3>, shift: &Tensor<3>, scale: &Tensor<3>, eps: f64) -> Tensor<3> {
    if let Some(y) = cpu::norm::modulate(&x, shift, scale, eps) {
        return y;
    }
    let [b, _, c] = x.dims();
    if b == 1 && x.dtype() == DType::F32 {
        let gamma = scale.clone().reshape([c]).add_scalar(1.0);
        return fused_layer_norm(x, gamma, Some(shift.clone().reshape([c])), eps);
    }
    layer_norm(x, eps)
        .mul(scale.clone().add_scalar(1.0))
        .add(shift.clone())
}

/// SiLU, `x * sigmoid(x)`: in f32 on the CPU backend one pass of [`cpu::elementwise::silu`]
/// (burn-flex's own SiLU calls libm's `exp` per value); otherwise on the CPU `x / (1 + e^-x)`
/// in burn ops, which measured faster than burn-flex's SiLU. GPU backends keep burn's single
/// kernel. In reduced precision it is computed in f32 and rounded once, as PyTorch does.
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    in_f32(x, |x| {
        if let Some(y) = cpu::elementwise::silu(&x) {
            return y;
        }
        if x.device() == burn::tensor::Device::flex() {
            x.clone().div(x.neg().exp().add_scalar(1.0))
        } else {
            burn::tensor::activation::silu(x)
        }
    })
}

/// SwiGLU on a fused projection: SiLU of the first half times the second half.
/// In f32 on the CPU one pass over `[B, S, 2m]` ([`cpu::elementwise::swiglu`]).
pub fn swiglu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if let Some(y) = as_rank::<D, 3>(x.clone())
        .and_then(|x3| cpu::elementwise::swiglu(&x3))
        .and_then(as_rank::<3, D>)
    {
        return y;
    }
    let mut halves = x.chunk(2, D - 1);
    let up = halves.pop().expect("two halves");
    let gate = halves.pop().expect("two halves");
    silu(gate).mul(up)
}

/// Scaled dot-product attention on `[B, heads, seq, head_dim]`; `mask` true = not attended.
/// The CPU backend computes it in f32 whatever the input dtype (as PyTorch's CPU kernels do). On
/// GPU devices bf16 attention runs in f32: burn's bf16 attention kernel crashed an H100's driver
/// ("NVVM compilation failed"), and f32 scores cannot overflow where f16 ones could.
///
/// In f32 on the CPU without a mask: [`cpu::attention::sdpa`] (blocks of query rows, q/k/v read
/// through their strides; the result is a `[B, H, S, D]` view whose `swap_dims(1, 2)` is
/// contiguous).
pub fn sdpa(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: Option<Tensor<4, Bool>>) -> Tensor<4> {
    if mask.is_none() {
        if let Some(o) = cpu::attention::sdpa(&q, &k, &v) {
            return o;
        }
    }
    let dtype = q.dtype();
    if dtype == DType::BF16 && q.device() != burn::tensor::Device::flex() {
        let f = FloatDType::F32;
        return attention(
            q.cast(f),
            k.cast(f),
            v.cast(f),
            mask,
            None,
            AttentionModuleOptions::default(),
        )
        .cast(dtype);
    }
    attention(q, k, v, mask, None, AttentionModuleOptions::default())
}

/// `x @ w + b`, rounded once in reduced precision (PyTorch's `addmm`).
pub fn lin_bias<const D: usize>(x: Tensor<D>, w: &LinearWeight, b: &Tensor<1>) -> Tensor<D> {
    let dtype = x.dtype();
    if dtype == DType::F32 {
        return rows_at_once(x, |x| w.forward(x, Some(b)));
    }
    let f = FloatDType::F32;
    rows_at_once(x.cast(f), |x| {
        linear(x, w.tensor().cast(f), Some(b.clone().cast(f)))
    })
    .cast(dtype)
}

/// GroupNorm over `[B, C, H, W]` with per-channel affine parameters.
pub fn group_norm(
    x: Tensor<4>,
    groups: usize,
    gamma: &Tensor<1>,
    beta: &Tensor<1>,
    eps: f64,
) -> Tensor<4> {
    group_norm_then(x, groups, gamma, beta, eps, false)
}

/// `silu(group_norm(x))`, the VAE's pre-activation: one fused kernel in f32 on the CPU
/// ([`cpu::norm::group_norm`]), the two ops otherwise.
pub fn group_norm_silu(
    x: Tensor<4>,
    groups: usize,
    gamma: &Tensor<1>,
    beta: &Tensor<1>,
    eps: f64,
) -> Tensor<4> {
    group_norm_then(x, groups, gamma, beta, eps, true)
}

/// Group norm, then SiLU when `act`.
fn group_norm_then(
    x: Tensor<4>,
    groups: usize,
    gamma: &Tensor<1>,
    beta: &Tensor<1>,
    eps: f64,
    act: bool,
) -> Tensor<4> {
    if let Some(y) = cpu::norm::group_norm(&x, groups, gamma, beta, eps, act) {
        return y;
    }
    // A group's normalisation is a layer norm over its `(C / groups) * H * W` values. In reduced
    // precision the affine part is in f32 too and the result rounds once (PyTorch's group norm).
    let [b, c, h, w] = x.dims();
    let f = FloatDType::F32;
    let y = in_f32(x, |x| {
        let normed =
            layer_norm(x.reshape([b, groups, (c / groups) * h * w]), eps).reshape([b, c, h, w]);
        normed
            .mul(gamma.clone().cast(f).reshape([1, c, 1, 1]))
            .add(beta.clone().cast(f).reshape([1, c, 1, 1]))
    });
    if act {
        silu(y)
    } else {
        y
    }
}

/// A 2-D convolution with PyTorch-layout weights `[out, in, kh, kw]` and a bias.
pub struct Conv {
    pub weight: Tensor<4>,
    pub bias: Tensor<1>,
    pub stride: usize,
    /// (top/left, bottom/right) padding.
    pub pad: (usize, usize),
}

impl Conv {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.run(x, 1, None)
    }

    /// `residual + conv(x)` (the resnet's skip connection added in the same pass on the CPU).
    pub fn forward_add(&self, x: Tensor<4>, residual: Tensor<4>) -> Tensor<4> {
        self.run(x, 1, Some(residual))
    }

    /// The convolution of `x` upsampled x2 by nearest neighbour (the decoder's upsamplers): on
    /// the CPU in f32 as four 2x2 convolutions of `x` (a 3x3 kernel, see
    /// [`cpu::conv::conv_up2_3x3`]) or read through, elsewhere materialised first.
    pub fn forward_up2(&self, x: Tensor<4>) -> Tensor<4> {
        self.run(x, 2, None)
    }

    fn run(&self, x: Tensor<4>, upsample: usize, mut residual: Option<Tensor<4>>) -> Tensor<4> {
        let geometry = cpu::conv::Geometry::new(self.stride, self.pad, upsample);
        if residual.is_none() {
            if let Some(y) = cpu::conv::conv_up2_3x3(&x, &self.weight, &self.bias, geometry) {
                return y;
            }
        }
        // The kernel takes the residual (and adds to it in place when nothing else holds it)
        // only when it runs; otherwise it is left here for the burn path.
        if let Some(y) = cpu::conv::conv2d(&x, &self.weight, &self.bias, geometry, &mut residual) {
            return y;
        }
        let x = if upsample == 2 { upsample2(x) } else { x };
        let y = self.burn_conv(x);
        match residual {
            Some(r) => r.add(y),
            None => y,
        }
    }

    fn burn_conv(&self, x: Tensor<4>) -> Tensor<4> {
        burn::tensor::module::conv2d(
            x,
            self.weight.clone(),
            Some(self.bias.clone()),
            burn::tensor::ops::ConvOptions::new_with_padding(
                [self.stride; 2],
                [self.pad; 2],
                [1, 1],
                1,
            ),
        )
    }
}

/// Nearest-neighbour x2 upsampling, exact (each value repeated into a 2x2 block).
pub fn upsample2(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h, 1, w, 1])
        .expand([b, c, h, 2, w, 2])
        .reshape([b, c, 2 * h, 2 * w])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    fn close<const D: usize>(got: Tensor<D>, want: Tensor<D>) {
        assert_eq!(got.dims(), want.dims());
        let diff = got.sub(want).abs().max().into_scalar::<f32>();
        assert!(diff < 1e-4, "{diff}");
    }

    /// Folding the leading dimensions into the rows gives burn's batched product: a batch of
    /// two with 32 rows each (which burn itself would run batch by batch), a strided input (a
    /// slice of a wider tensor), a 4-D input, and with a bias. On a CPU with
    /// AVX2 or AVX-512 the weight is packed, and this checks the packed kernel's path end to end.
    #[test]
    fn linear_layers_fold_the_batch_into_rows() {
        let dev = Device::flex();
        let w = Tensor::<2>::random([24, 40], Distribution::Default, &dev);
        let lw = LinearWeight::new(w.clone());
        assert_eq!(lw.is_packed(), cpu::matmul::Isa::best().is_some());
        assert_eq!(lw.tensor().to_data(), w.to_data(), "unpacked as it was");
        let b = Tensor::<1>::random([40], Distribution::Default, &dev);
        let x = Tensor::<3>::random([2, 32, 24], Distribution::Default, &dev);
        let want = x.clone().matmul(w.clone().unsqueeze::<3>());
        close(lin(x.clone(), &lw), want.clone());
        close(lin_bias(x, &lw, &b), want.add(b.clone().unsqueeze::<3>()));
        let part = Tensor::<3>::random([2, 32, 30], Distribution::Default, &dev).narrow(2, 3, 24);
        close(
            lin(part.clone(), &lw),
            part.matmul(w.clone().unsqueeze::<3>()),
        );
        let x4 = Tensor::<4>::random([2, 3, 5, 24], Distribution::Default, &dev);
        close(lin(x4.clone(), &lw), x4.matmul(w.clone().unsqueeze::<4>()));
        // In reduced precision the product runs in f32 on burn's path and rounds once: within
        // one bf16 rounding (2^-8 relative) of the f32 product's.
        let h = FloatDType::BF16;
        let lh = LinearWeight::new(w.clone().cast(h));
        assert!(!lh.is_packed());
        let xh = Tensor::<3>::random([2, 5, 24], Distribution::Default, &dev).cast(h);
        let f = FloatDType::F32;
        let want = xh
            .clone()
            .cast(f)
            .matmul(w.cast(h).cast(f).unsqueeze::<3>())
            .add(b.clone().cast(h).cast(f).unsqueeze::<3>());
        let got = lin_bias(xh, &lh, &b.cast(h));
        assert_eq!(got.dtype(), DType::BF16);
        let rel = got
            .cast(f)
            .sub(want.clone())
            .abs()
            .div(want.abs().add_scalar(1e-3));
        assert!(rel.max().into_scalar::<f32>() <= 1.0 / 256.0);
    }
}
