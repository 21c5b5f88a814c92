use std::path::Path;

/// Everything that can go wrong loading or running the engine. Messages name the file and, for
/// weights, the tensor, so a broken checkpoint is diagnosable without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("config {path}: {message}")]
    Config { path: String, message: String },
    #[error("weights {file}: tensor `{tensor}`: {message}")]
    Weight {
        file: String,
        tensor: String,
        message: String,
    },
    #[error("weights {file}: {message}")]
    WeightFile { file: String, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("cancelled: nobody is waiting for the result any more")]
    Cancelled,
}

impl EngineError {
    pub fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        EngineError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}
