//! The smallest kernels that show CubeCL 0.11's invalid SPIR-V (the `vulkan` build), one per run:
//!
//! ```sh
//! CUBECL_AUTOTUNE_LEVEL=minimal cargo run -p kleingate-local --features vulkan --example spirv_repro -- vulkan matmul 64
//! ```
//!
//! `matmul N`: one N x N f32 matmul; `rmsnorm N`: the RMS-norm chain of `nn.rs` on N x N;
//! `mean N`: the row mean alone; `add N`: an elementwise add (the control: runs everywhere). Prints the result's sum; on a
//! driver that rejects the shader it crashes instead, and the Khronos validation layer (Debian
//! `vulkan-validationlayers`; a debug build of wgpu turns it on) names the reason first.

use burn::tensor::{Distribution, Tensor};

/// Collects what wgpu reports through `log` at error level: in debug builds wgpu turns the
/// Khronos validation layer on (when installed) and forwards its messages there.
struct Errors(std::sync::Mutex<Vec<String>>);

impl log::Log for Errors {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Error
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let line = format!("{}: {}", r.target(), r.args());
            eprintln!("{line}");
            if let Ok(mut v) = self.0.lock() {
                v.push(line);
            }
        }
    }
    fn flush(&self) {}
}

static ERRORS: Errors = Errors(std::sync::Mutex::new(Vec::new()));

fn main() {
    let _ = log::set_logger(&ERRORS);
    log::set_max_level(log::LevelFilter::Error);
    let args: Vec<String> = std::env::args().collect();
    let device_name = args.get(1).map_or("vulkan", String::as_str);
    let kernel = args.get(2).map_or("matmul", String::as_str);
    let n: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(64);
    let device = kleingate_local::device::by_name(device_name).expect("device");
    let a = Tensor::<2>::random([n, n], Distribution::Uniform(-1.0, 1.0), &device);
    let b = Tensor::<2>::random([n, n], Distribution::Uniform(-1.0, 1.0), &device);
    let out = match kernel {
        "matmul" => a.matmul(b),
        "rmsnorm" => {
            let inv = a
                .clone()
                .square()
                .mean_dim(1)
                .add_scalar(1e-6)
                .sqrt()
                .recip();
            a.mul(inv).mul(b)
        }
        "mean" => a.mean_dim(1).expand([n, n]).add(b),
        "add" => a.add(b),
        other => panic!("unknown kernel {other}: matmul, rmsnorm, mean or add"),
    };
    let sum: f32 = out.sum().into_scalar();
    println!("{kernel} {n}x{n} on {device_name}: sum {sum}");
}
