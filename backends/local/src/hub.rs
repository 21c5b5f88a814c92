//! Finding a checkpoint: a local directory in the diffusers layout, or a Hugging Face repo id
//! downloaded with hf-hub (progress bars; `HF_HOME` and `HF_ENDPOINT` honoured by hf-hub, `HF_TOKEN`
//! read here for gated repos). hf-hub has no offline mode of its own: with `HF_HUB_OFFLINE=1` only
//! the local cache is consulted and a missing file is a clear error.

use std::path::{Path, PathBuf};

use crate::error::EngineError;

/// What to fetch of one kind of checkpoint: `anchor` (its root is the snapshot root), the other
/// small files, optional files, and weights as `(directory, stem)` resolved as a single
/// `stem.safetensors` or the shards of `stem.safetensors.index.json`.
pub struct Layout {
    anchor: &'static str,
    files: &'static [&'static str],
    optional: &'static [&'static str],
    weights: &'static [(&'static str, &'static str)],
}

/// A klein pipeline in the diffusers layout.
pub const KLEIN: Layout = Layout {
    anchor: "model_index.json",
    files: &[
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "text_encoder/config.json",
        "transformer/config.json",
        "vae/config.json",
    ],
    optional: &["tokenizer/chat_template.jinja"],
    weights: &[
        ("text_encoder", "model"),
        ("transformer", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
    ],
};

/// A transformers image classifier (the safety checker), e.g. `Falconsai/nsfw_image_detection`.
pub const IMAGE_CLASSIFIER: Layout = Layout {
    anchor: "config.json",
    files: &["preprocessor_config.json"],
    optional: &[],
    weights: &[("", "model")],
};

fn weight_file(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

/// A local directory is used as is; anything else is taken as a repo id of a klein pipeline.
pub fn resolve(weights: &str) -> Result<PathBuf, EngineError> {
    resolve_layout(weights, &KLEIN)
}

/// Like [`resolve`], for a checkpoint of the given layout.
pub fn resolve_layout(weights: &str, layout: &Layout) -> Result<PathBuf, EngineError> {
    let p = Path::new(weights);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if !weights.contains('/') || weights.starts_with('.') || weights.starts_with('/') {
        return Err(EngineError::Io {
            path: weights.to_owned(),
            message: "not a directory, and not a Hugging Face repo id (owner/name)".into(),
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| EngineError::Input(e.to_string()))?;
    rt.block_on(download(weights, layout))
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

async fn download(repo_id: &str, layout: &Layout) -> Result<PathBuf, EngineError> {
    let hub_err = |file: &str, e: &dyn std::fmt::Display| EngineError::Io {
        path: format!("{repo_id}/{file}"),
        message: if offline() {
            format!("not in the local Hugging Face cache and HF_HUB_OFFLINE is set ({e})")
        } else {
            format!(
                "download failed: {e} (check the repo id, network, and HF_TOKEN for gated repos)"
            )
        },
    };
    if offline() {
        let cache = hf_hub::Cache::from_env().model(repo_id.to_owned());
        let get = |f: &str| cache.get(f).ok_or_else(|| hub_err(f, &"missing"));
        let anchor = get(layout.anchor)?;
        for f in layout.files {
            get(f)?;
        }
        for (dir, stem) in layout.weights {
            let single = weight_file(dir, &format!("{stem}.safetensors"));
            if cache.get(&single).is_none() {
                let idx = get(&format!("{single}.index.json"))?;
                for shard in shard_names(&idx)? {
                    get(&weight_file(dir, &shard))?;
                }
            }
        }
        return root_of(&anchor);
    }
    let api = hf_hub::api::tokio::ApiBuilder::from_env()
        .with_progress(true)
        .with_token(std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()))
        .build()
        .map_err(|e| hub_err("", &e))?;
    let repo = api.model(repo_id.to_owned());
    let anchor = repo
        .get(layout.anchor)
        .await
        .map_err(|e| hub_err(layout.anchor, &e))?;
    for f in layout.files {
        repo.get(f).await.map_err(|e| hub_err(f, &e))?;
    }
    for f in layout.optional {
        let _ = repo.get(f).await;
    }
    for (dir, stem) in layout.weights {
        let single = weight_file(dir, &format!("{stem}.safetensors"));
        if repo.get(&single).await.is_err() {
            let idx_name = format!("{single}.index.json");
            let idx = repo
                .get(&idx_name)
                .await
                .map_err(|e| hub_err(&idx_name, &e))?;
            for shard in shard_names(&idx)? {
                let f = weight_file(dir, &shard);
                repo.get(&f).await.map_err(|e| hub_err(&f, &e))?;
            }
        }
    }
    root_of(&anchor)
}

fn shard_names(index: &Path) -> Result<Vec<String>, EngineError> {
    let text = std::fs::read_to_string(index).map_err(|e| EngineError::io(index, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| EngineError::io(index, e))?;
    let mut names: Vec<String> = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| EngineError::io(index, "no weight_map"))?
        .values()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// hf-hub stores a snapshot as `<cache>/snapshots/<rev>/<path>`: the snapshot root is the
/// directory holding the layout's anchor file (at the repo root).
fn root_of(model_index: &Path) -> Result<PathBuf, EngineError> {
    model_index
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| EngineError::io(model_index, "has no parent directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_directories_are_used_as_is_and_nonsense_is_refused() {
        let here = env!("CARGO_MANIFEST_DIR");
        assert_eq!(resolve(here).unwrap(), PathBuf::from(here));
        assert!(resolve("no-such-dir").is_err());
        assert!(resolve("./relative/missing").is_err());
    }

    #[test]
    fn offline_mode_reports_a_missing_repo_clearly() {
        let tmp = std::env::temp_dir().join(format!("kleingate-hf-{}", std::process::id()));
        std::env::set_var("HF_HOME", &tmp);
        std::env::set_var("HF_HUB_OFFLINE", "1");
        let e = resolve("black-forest-labs/FLUX.2-klein-4B")
            .unwrap_err()
            .to_string();
        assert!(e.contains("HF_HUB_OFFLINE"), "{e}");
        assert!(e.contains("model_index.json"), "{e}");
        let e = resolve_layout("Falconsai/nsfw_image_detection", &IMAGE_CLASSIFIER)
            .unwrap_err()
            .to_string();
        assert!(e.contains("HF_HUB_OFFLINE"), "{e}");
        assert!(e.contains("nsfw_image_detection/config.json"), "{e}");
    }
}
