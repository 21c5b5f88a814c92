use std::path::PathBuf;

/// mimalloc rather than glibc's malloc: the engine's CPU backend allocates a fresh output for
/// every tensor op, megabytes each, which glibc serves with new `mmap`s whose pages fault in (and
/// are zeroed by the kernel) on first touch, from every thread at once. mimalloc reuses freed
/// pages. Measured on a 384x768x2304 linear layer on 2 threads: ~17 ms with glibc, ~12 ms with
/// mimalloc, as fast as the same gemm into a reused buffer (docs/engine.md has the stage table).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `mi_option_t` (the same index in its v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The environment variables by which mimalloc takes its purge delay (the second is its older
/// name); when either is set, the user's value stands.
const PURGE_DELAY_VARS: [&str; 2] = ["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"];

/// mimalloc gives freed memory back to the OS a while after it was freed (its "purge delay", 1 s
/// in the v3 that libmimalloc-sys builds), and the engine's buffers then fault in again, zeroed
/// by the kernel, on their next use: the VAE's and the text encoder's buffers sit unused for
/// longer than that between the stages of one image. Never purging keeps the process at its
/// peak RSS (which the engine reaches anyway) and took a distilled cpu-mid image from 1176-1229
/// to 1063-1072 ms (same build, the setting alternating, docs/engine.md), unless
/// [`PURGE_DELAY_VARS`] say otherwise.
fn keep_freed_pages() {
    if PURGE_DELAY_VARS
        .iter()
        .all(|v| std::env::var_os(v).is_none())
    {
        // SAFETY: sets one of mimalloc's options, which it reads on each purge decision.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

use anyhow::Context;
use clap::{Parser, Subcommand};
use kleingate_gateway::{server, telemetry, AppState, Config};

mod cli;

/// kleingate: one Verda-compatible API for the FLUX.2 [klein] image models.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// TOML config file (see gateway/kleingate.example.toml); KLEINGATE_* variables override it.
        #[arg(long, short)]
        config: PathBuf,
        /// Listen address; overrides `listen` from the config.
        #[arg(long)]
        listen: Option<String>,
    },
    #[cfg(feature = "local")]
    /// Generate one image with the local engine (no gateway, no network unless weights are a repo id).
    Generate(cli::generate::GenerateArgs),
    #[cfg(feature = "local")]
    /// Time the local engine's stages (text encoder, transformer step, CFG step, VAE decode and
    /// encode, a whole distilled image) and print them beside the diffusers reference figures.
    BenchEngine(cli::bench_engine::BenchArgs),
    /// Make client API keys: `keys new --name team-a` prints a new key (give it to the client) and
    /// the `[[auth.keys]]` entry with its digest (put that in the config); `keys hash` prints the
    /// digest of a key read from stdin.
    Keys {
        #[command(subcommand)]
        action: cli::keys::KeysAction,
    },
    /// Print the API's OpenAPI 3.1 document (default limits); `-o FILE` writes it, `--check FILE`
    /// fails when FILE is not current.
    Openapi(cli::openapi::OpenApiArgs),
    /// Load and validate a config file, print the effective settings (no secrets) and exit.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    keep_freed_pages();
    let cli = Cli::parse();
    // `serve` sets up its logs with its config (trace export); the other commands log only.
    if !matches!(cli.command, Command::Serve { .. }) {
        telemetry::install_logs();
    }
    match cli.command {
        Command::Serve { config, listen } => {
            let mut cfg = Config::load(Some(&config))
                .with_context(|| format!("loading {}", config.display()))?;
            if let Some(l) = listen {
                cfg.listen = l;
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            // Logs, and trace export when configured: the exporter sends on this runtime.
            let telemetry = telemetry::install(&cfg.telemetry, rt.handle())?;
            let served = rt.block_on(async move {
                // Signal handlers first: a SIGTERM right after start-up drains, it does not kill.
                let shutdown = server::shutdown_signal();
                let addr = cfg.listen.clone();
                let state = AppState::from_config(cfg)?;
                let listener = tokio::net::TcpListener::bind(&addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                let bound = listener.local_addr()?;
                tracing::info!(addr = %bound, backends = state.backends.len(), "kleingate listening");
                // On stdout too, plainly, for scripts that start it on port 0.
                println!("kleingate listening on http://{bound}");
                server::serve(listener, state, shutdown).await?;
                anyhow::Ok(())
            });
            // The spans of the last requests, sent while the runtime still runs.
            telemetry.shutdown();
            served
        }
        #[cfg(feature = "local")]
        Command::Generate(args) => cli::generate::run(args),
        #[cfg(feature = "local")]
        Command::BenchEngine(args) => cli::bench_engine::run(args),
        Command::Keys { action } => cli::keys::run(action),
        Command::Openapi(args) => cli::openapi::run(args),
        Command::CheckConfig { config } => cli::check_config::run(&config),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option index is mimalloc's purge delay (v3's default, 1000 ms), and the binary's setting
    /// takes: a wrong index would silently set some other option.
    #[test]
    fn freed_pages_are_kept() {
        if PURGE_DELAY_VARS
            .iter()
            .any(|v| std::env::var_os(v).is_some())
        {
            return;
        }
        // SAFETY: reads and sets mimalloc's options.
        unsafe {
            assert_eq!(libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY), 1000);
            keep_freed_pages();
            assert_eq!(libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY), -1);
        }
    }
}
