use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kleingate_gateway::{server, AppState, Config};

mod bench_engine;
mod generate;

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
    /// Generate one image with the local engine (no gateway, no network unless weights are a repo id).
    Generate(generate::GenerateArgs),
    /// Time the local engine's stages (text encoder, transformer step, CFG step, VAE decode and
    /// encode, a whole distilled image) and print them beside the diffusers reference figures.
    BenchEngine(bench_engine::BenchArgs),
    /// Make client API keys: `keys new --name team-a` prints a new key (give it to the client) and
    /// the `[[auth.keys]]` entry with its digest (put that in the config); `keys hash` prints the
    /// digest of a key read from stdin.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Load and validate a config file, print the effective settings (no secrets) and exit.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    New {
        /// Who the key is for: budgets, rate limits and the access log use this name.
        #[arg(long)]
        name: String,
        /// Write the key to this file (created with mode 0600) instead of printing it.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Append the `[[keys]]` entry to this keys file (`auth.keys_file`) instead of printing it.
        #[arg(long)]
        entry_file: Option<PathBuf>,
    },
    Hash,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        // Logs on stderr, colour only on a terminal; stdout carries the one "listening" line.
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
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
            rt.block_on(async move {
                let addr = cfg.listen.clone();
                let state = AppState::from_config(cfg)?;
                let listener = tokio::net::TcpListener::bind(&addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                let bound = listener.local_addr()?;
                tracing::info!(addr = %bound, backends = state.backends.len(), "kleingate listening");
                // On stdout too, plainly, for scripts that start it on port 0.
                println!("kleingate listening on http://{bound}");
                server::serve(listener, state, server::shutdown_signal()).await?;
                Ok(())
            })
        }
        Command::Generate(args) => generate::run(args),
        Command::BenchEngine(args) => bench_engine::run(args),
        Command::Keys {
            action:
                KeysAction::New {
                    name,
                    key_file,
                    entry_file,
                },
        } => {
            let key = kleingate_gateway::auth::new_key();
            let entry = format!(
                "[[keys]]\nname = {}\nsha256 = \"{}\"\n",
                serde_json::to_string(&name)?,
                kleingate_gateway::auth::hash_key(&key)
            );
            match key_file {
                Some(p) => {
                    write_private(&p, &key).with_context(|| format!("writing {}", p.display()))?
                }
                None => println!("key (give it to the client; only its digest is kept): {key}\n"),
            }
            match entry_file {
                Some(p) => {
                    use std::io::Write;
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&p)
                        .and_then(|mut f| writeln!(f, "{entry}"))
                        .with_context(|| format!("appending to {}", p.display()))?;
                }
                None => print!(
                    "# in auth.keys_file; in the config file itself, as [[auth.keys]]\n{entry}"
                ),
            }
            Ok(())
        }
        Command::Keys {
            action: KeysAction::Hash,
        } => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            println!("{}", kleingate_gateway::auth::hash_key(line.trim()));
            Ok(())
        }
        Command::CheckConfig { config } => {
            let cfg = Config::load(Some(&config))
                .with_context(|| format!("loading {}", config.display()))?;
            println!("{}", serde_json::to_string_pretty(&cfg)?);
            Ok(())
        }
    }
}

/// A new file only its owner can read, holding `text`.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o.open(path)?.write_all(text.as_bytes())
}
