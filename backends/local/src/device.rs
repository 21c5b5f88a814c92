//! Choosing the burn device by name: `cpu` (burn's flex backend, always built), `vulkan` and
//! `wgpu` (when built with those cargo features).

use burn::tensor::Device;

use crate::error::EngineError;

#[allow(dead_code)] // unused when every GPU feature is on
fn not_built(name: &str) -> EngineError {
    EngineError::Input(format!(
        "this build has no `{name}` device: rebuild with `--features {name}` (cargo build --release -p kleingate-gateway --features {name})"
    ))
}

pub fn by_name(name: &str) -> Result<Device, EngineError> {
    match name {
        "cpu" | "flex" => Ok(Device::flex()),
        #[cfg(feature = "vulkan")]
        "vulkan" => Ok(Device::vulkan(burn::tensor::DeviceKind::DefaultDevice)),
        #[cfg(feature = "wgpu")]
        "wgpu" => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
        #[cfg(not(feature = "vulkan"))]
        "vulkan" => Err(not_built(name)),
        #[cfg(not(feature = "wgpu"))]
        "wgpu" => Err(not_built(name)),
        other => Err(EngineError::Input(format!(
            "unknown device `{other}`; use cpu, vulkan or wgpu"
        ))),
    }
}
