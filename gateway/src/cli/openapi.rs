//! `kleingate openapi`: the API's OpenAPI document with the default limits, printed, written to
//! a file, or checked against one (CI keeps `docs/openapi.json` current with `--check`).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use kleingate_protocol::Limits;

#[derive(Args, Debug)]
pub struct OpenApiArgs {
    /// Write the document here instead of printing it.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Compare with this file instead; fail when it differs.
    #[arg(long, conflicts_with = "output")]
    check: Option<PathBuf>,
}

pub fn run(a: OpenApiArgs) -> anyhow::Result<()> {
    let doc = kleingate_gateway::routes::openapi::document(&Limits::default());
    let text = serde_json::to_string_pretty(&doc)? + "\n";
    match (a.output, a.check) {
        (Some(p), _) => {
            std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
        }
        (None, Some(p)) => {
            let on_disk =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            if on_disk != text {
                bail!(
                    "{} is not the current document; run `kleingate openapi -o {}`",
                    p.display(),
                    p.display()
                );
            }
            Ok(())
        }
        (None, None) => {
            print!("{text}");
            Ok(())
        }
    }
}
