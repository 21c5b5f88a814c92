//! Loops compiled twice: once for the build's baseline (x86-64's SSE2) and once for AVX2 + FMA,
//! chosen at run time, so a release build that does not target one CPU still gets 8-wide vector
//! code (LLVM vectorises the plain loops below; the `FMA` parameter turns `a * b + c` into one
//! fused instruction where it exists and keeps it two otherwise, where `mul_add` would be a
//! library call).

/// Whether this CPU runs the AVX2 + FMA variants.
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Define `fn $name(args)` that runs `$body::<true>` compiled with AVX2 + FMA when the CPU
/// has them and `$body::<false>` otherwise. `$body` must be `#[inline(always)]`.
macro_rules! dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) $(-> $ret)? {
                    $body::<true>($($arg),*)
                }
                if $crate::cpu::simd::has_avx2_fma() {
                    // SAFETY: the CPU has the features `fast` was compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            $body::<false>($($arg),*)
        }
    };
}
pub(crate) use dispatch;

/// `a * b + c`, fused when `FMA`.
#[inline(always)]
pub fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `e^x` for f32, branch-free and without float-to-int casts (which LLVM does one lane at a
/// time) so that loops over it vectorise: Cephes' `expf` (range reduction by ln 2 in two parts,
/// a degree-6 polynomial), with `n = round(x / ln 2)` and `2^n` both taken from the bits of
/// `x / ln 2 + 1.5 * 2^23` (whose low mantissa bits hold `n`). Within 2 ulp of `f32::exp` over
/// [-87, 88]. Below -87.3 it returns e^-87.3 (about 1.2e-38) rather than a denormal or 0, which
/// no caller can tell apart after adding 1 or dividing a sum by it; above 88.3 it returns e^88.3.
#[inline(always)]
pub fn exp<const FMA: bool>(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    let x = x.clamp(-87.3, 88.3);
    let k = fmadd::<FMA>(x, std::f32::consts::LOG2_E, MAGIC);
    let n = k - MAGIC;
    let r = fmadd::<FMA>(n, -0.693_359_4, x);
    let r = fmadd::<FMA>(n, 2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4f32;
    p = fmadd::<FMA>(p, r, 1.398_199_9e-3);
    p = fmadd::<FMA>(p, r, 8.333_452e-3);
    p = fmadd::<FMA>(p, r, 4.166_579_6e-2);
    p = fmadd::<FMA>(p, r, 1.666_666_5e-1);
    p = fmadd::<FMA>(p, r, 0.5); // Cephes: 5.0000001201e-1, which is 0.5 in f32
    let y = fmadd::<FMA>(p, r * r, r) + 1.0;
    let n_bits = k.to_bits().wrapping_sub(MAGIC.to_bits());
    y * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// SiLU, `x / (1 + e^-x)`.
#[inline(always)]
pub fn silu<const FMA: bool>(x: f32) -> f32 {
    x / (1.0 + exp::<FMA>(-x))
}

/// The widest f32 FMA this CPU has, in lanes: 16 with AVX-512F (which gemm's x86-v4 kernels
/// use), 8 with AVX2 + FMA, 0 otherwise (or off x86-64).
pub fn fma_lanes() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() && std::arch::is_x86_feature_detected!("avx512f") {
            return 16;
        }
        if has_avx2_fma() {
            return 8;
        }
    }
    0
}

/// This CPU's peak f32 multiply-add rate with its widest FMA ([`fma_lanes`]) on every thread of
/// rayon's pool, in GFLOP/s: each thread runs 12 independent FMA chains (more than FMA latency x
/// FMA ports on any x86 core, so the ports, not the latency, bound it), for as many rounds as take
/// about 50 ms, best of three. The ceiling the gemm-bound stages are read against. `None` without
/// AVX2 + FMA.
pub fn fma_peak_gflop_per_s() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        let lanes = fma_lanes();
        if lanes == 0 {
            return None;
        }
        let threads = rayon::current_num_threads().max(1);
        let run = |rounds: usize| {
            let start = std::time::Instant::now();
            // SAFETY: the CPU has the instructions of the width chosen (checked by fma_lanes).
            std::hint::black_box(rayon::broadcast(|_| unsafe {
                if lanes == 16 {
                    fma_chains_512(rounds)
                } else {
                    fma_chains(rounds)
                }
            }));
            start.elapsed().as_secs_f64()
        };
        let mut rounds = 1 << 16;
        while run(rounds) < 0.05 && rounds < 1 << 32 {
            rounds *= 2;
        }
        let best = (0..3).map(|_| run(rounds)).fold(f64::INFINITY, f64::min);
        let flops = (threads * rounds * FMA_CHAINS * lanes * 2) as f64;
        Some(flops / best / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Independent accumulators in [`fma_chains`] and [`fma_chains_512`].
#[cfg(target_arch = "x86_64")]
const FMA_CHAINS: usize = 12;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains(rounds: usize) -> f32 {
    use std::arch::x86_64::*;
    let (b, c) = (_mm256_set1_ps(0.999_9), _mm256_set1_ps(1e-6));
    let mut acc = [_mm256_set1_ps(1.0); FMA_CHAINS];
    for _ in 0..rounds {
        for a in acc.iter_mut() {
            *a = _mm256_fmadd_ps(*a, b, c);
        }
    }
    let mut lanes = [0f32; 8];
    let mut sum = 0.0;
    for a in acc {
        // SAFETY: lanes holds 8 values.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), a) };
        sum += lanes[0];
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_chains_512(rounds: usize) -> f32 {
    use std::arch::x86_64::*;
    let (b, c) = (_mm512_set1_ps(0.999_9), _mm512_set1_ps(1e-6));
    let mut acc = [_mm512_set1_ps(1.0); FMA_CHAINS];
    for _ in 0..rounds {
        for a in acc.iter_mut() {
            *a = _mm512_fmadd_ps(*a, b, c);
        }
    }
    acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm_and_saturates() {
        let mut x = -87.0f32;
        while x < 88.0 {
            for v in [exp::<false>(x), exp::<true>(x)] {
                let want = x.exp();
                let ulp = (want.to_bits() as i64 - v.to_bits() as i64).abs();
                assert!(ulp <= 2, "exp({x}) = {v}, libm {want}: {ulp} ulp");
            }
            x += 0.0137;
        }
        assert!(exp::<false>(-1000.0) > 0.0 && exp::<false>(-1000.0) < 1.3e-38);
        assert!(exp::<false>(1000.0).is_finite());
        assert!(silu::<false>(-1000.0).abs() < 1e-30);
        assert!((silu::<false>(3.0) - 3.0 / (1.0 + (-3.0f32).exp())).abs() < 1e-6);
    }
}
