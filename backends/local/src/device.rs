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

/// Size the CPU backend's thread pool (rayon's global pool, which burn-flex and gemm use): once
/// per process, before the first CPU work. `None` leaves rayon's default (one thread per core, or
/// `RAYON_NUM_THREADS`). Asking again for the size already set is fine; another size is an error.
pub fn set_cpu_threads(threads: Option<usize>) -> Result<(), EngineError> {
    let Some(n) = threads else { return Ok(()) };
    if n == 0 {
        return Err(EngineError::Input("threads must be at least 1".into()));
    }
    match rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
    {
        Ok(()) => Ok(()),
        Err(_) if rayon::current_num_threads() == n => Ok(()),
        Err(_) => Err(EngineError::Input(format!(
            "the CPU thread pool already has {} threads; one process has one pool",
            rayon::current_num_threads()
        ))),
    }
}

/// Threads the CPU backend uses.
pub fn cpu_threads() -> usize {
    rayon::current_num_threads()
}
