//! The klein sampling schedule: sigmas from `linspace(1, 1/N, N)`, shifted by the empirical `mu`
//! that depends on the number of image tokens (with its jump at 4300 tokens), in the exact float
//! widths the reference uses.

use crate::precision::Precision;

/// `compute_empirical_mu` of the reference pipeline, in f64. `image_seq_len` counts the generated
/// image tokens only (reference tokens excluded).
pub fn empirical_mu(image_seq_len: usize, num_steps: usize) -> f64 {
    let (a1, b1) = (8.738_095_24e-5, 1.898_333_33);
    let (a2, b2) = (0.000_169_27, 0.456_666_66);
    let n = image_seq_len as f64;
    if image_seq_len > 4300 {
        return a2 * n + b2;
    }
    let m200 = a2 * n + b2;
    let m10 = a1 * n + b1;
    let a = (m200 - m10) / 190.0;
    let b = m200 - 200.0 * a;
    a * num_steps as f64 + b
}

#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub mu: f64,
    /// N + 1 values, the last one 0.
    pub sigmas: Vec<f32>,
    /// `sigmas[..N] * 1000`.
    pub timesteps: Vec<f32>,
}

impl Schedule {
    pub fn new(num_steps: usize, image_seq_len: usize) -> Schedule {
        let n = num_steps.max(1);
        let mu = empirical_mu(image_seq_len, n);
        // linspace in f64, then stored as f32 (numpy float64 -> float32).
        let base: Vec<f32> = (0..n)
            .map(|i| {
                let end = 1.0 / n as f64;
                let t = if n == 1 {
                    1.0
                } else {
                    1.0 + (end - 1.0) * i as f64 / (n - 1) as f64
                };
                t as f32
            })
            .collect();
        // The time shift runs in f32 (a float32 array combined with Python scalars).
        let e_mu = mu.exp() as f32;
        let mut sigmas: Vec<f32> = base
            .iter()
            .map(|&s| e_mu / (e_mu + (1.0 / s - 1.0)))
            .collect();
        let timesteps = sigmas.iter().map(|s| s * 1000.0).collect();
        sigmas.push(0.0);
        Schedule {
            mu,
            sigmas,
            timesteps,
        }
    }
}

/// The timestep value the transformer's sinusoid sees for step `t` (a scheduler timestep in
/// 0..1000). The reference pipeline casts `t` to the latents' dtype, divides by 1000 in that
/// dtype, and the transformer multiplies by 1000 in it again: in bf16, 954.515 arrives as 956
/// (bf16 spacing is 4 between 512 and 1024). In f32 it is `t / 1000 * 1000`.
pub fn model_timestep(timestep: f32, precision: Precision) -> f32 {
    let r = |x: f32| precision.round(x);
    r(r(r(timestep) / 1000.0) * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mu_has_its_jump_at_4300_tokens() {
        let below = empirical_mu(4300, 4);
        let above = empirical_mu(4301, 4);
        assert!((above - (0.000_169_27 * 4301.0 + 0.456_666_66)).abs() < 1e-12);
        assert!((below - above).abs() > 0.05, "{below} vs {above}");
    }

    #[test]
    fn bf16_rounding_of_the_timestep() {
        // sigma 0.9545153 is 0.953125 in bf16 (8 bits of precision: steps of 2^-8 in [0.5, 1));
        // x1000 = 953.125, which bf16 (steps of 4 in [512, 1024)) rounds to 952.
        // What diffusers' bf16 pipeline fed its time embedding (fixture bf16.json).
        let bf16: Vec<f32> = [1000.0, 954.5153, 876.3, 700.2]
            .iter()
            .map(|&t| model_timestep(t, Precision::Bf16))
            .collect();
        assert_eq!(bf16, vec![1000.0, 956.0, 876.0, 700.0]);
        assert_eq!(model_timestep(954.5153, Precision::F32), 954.5153);
    }
}
