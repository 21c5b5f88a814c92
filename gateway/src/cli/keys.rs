//! `kleingate keys`: make client API keys and their digests.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum KeysAction {
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
    /// Print the digest of a key read from stdin.
    Hash,
}

pub fn run(action: KeysAction) -> anyhow::Result<()> {
    match action {
        KeysAction::New {
            name,
            key_file,
            entry_file,
        } => {
            if name.trim().is_empty() {
                anyhow::bail!("--name must not be empty");
            }
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
        KeysAction::Hash => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            if line.trim().is_empty() {
                anyhow::bail!("no key on stdin");
            }
            println!("{}", kleingate_gateway::auth::hash_key(line.trim()));
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
