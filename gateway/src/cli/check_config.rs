//! `kleingate check-config`: load and validate a config file, print the effective settings.

use std::path::Path;

use anyhow::Context;
use kleingate_gateway::Config;

pub fn run(config: &Path) -> anyhow::Result<()> {
    let cfg =
        Config::load(Some(config)).with_context(|| format!("loading {}", config.display()))?;
    // The config holds no secret values: API keys are digests, upstream tokens are the names of
    // environment variables.
    println!("{}", serde_json::to_string_pretty(&cfg)?);
    Ok(())
}
