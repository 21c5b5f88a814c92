//! The engine's compute dtype. Weights live on the device in this dtype and activations flow in
//! it; what the reference keeps in f32 stays f32 (see `nn.rs`: norm statistics, softmax, RoPE, the
//! timestep sinusoid, the Euler update), and every rounding the reference makes in the compute
//! dtype is made here at the same place, so a bf16 run can be compared with diffusers' bf16 run.

use std::fmt;
use std::str::FromStr;

use burn::tensor::{DType, FloatDType};
use serde::{Deserialize, Serialize};

use crate::error::EngineError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    Bf16,
    F16,
}

impl Precision {
    /// bf16 on GPU devices (what the checkpoints store and what Black Forest Labs serves in),
    /// f32 on the CPU, where burn's flex backend computes bf16 through f32 anyway and f32 is
    /// both faster and exact.
    pub fn default_for(device: &str) -> Precision {
        match device {
            "cpu" | "flex" => Precision::F32,
            _ => Precision::Bf16,
        }
    }

    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }

    pub fn float(self) -> FloatDType {
        match self {
            Precision::F32 => FloatDType::F32,
            Precision::Bf16 => FloatDType::BF16,
            Precision::F16 => FloatDType::F16,
        }
    }

    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::Bf16 | Precision::F16 => 2,
        }
    }

    /// `x` rounded to this dtype (round-to-nearest-even, as PyTorch's `.to(dtype)`), as f32.
    pub fn round(self, x: f32) -> f32 {
        match self {
            Precision::F32 => x,
            Precision::Bf16 => half::bf16::from_f32(x).to_f32(),
            Precision::F16 => half::f16::from_f32(x).to_f32(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            "f16" | "float16" => Ok(Precision::F16),
            other => Err(EngineError::Input(format!(
                "unknown dtype `{other}`; use f32, bf16 or f16"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_like_torch_and_parses_its_names() {
        // bf16 has 8 significant bits: spacing 4 between 512 and 1024 (ties to even).
        assert_eq!(Precision::Bf16.round(954.515), 956.0);
        assert_eq!(Precision::Bf16.round(954.0), 952.0);
        assert_eq!(Precision::F16.round(954.515), 954.5);
        assert_eq!(Precision::F32.round(954.515), 954.515);
        for p in [Precision::F32, Precision::Bf16, Precision::F16] {
            assert_eq!(p.name().parse::<Precision>().unwrap(), p);
        }
        assert!("f64"
            .parse::<Precision>()
            .unwrap_err()
            .to_string()
            .contains("f64"));
        assert_eq!(Precision::default_for("cpu"), Precision::F32);
        assert_eq!(Precision::default_for("vulkan"), Precision::Bf16);
    }
}
