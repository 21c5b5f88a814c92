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
    /// A reference image the engine refuses (undecodable, too small, too elongated): the
    /// client's fault, reported per image.
    #[error("input image {index}: {message}")]
    Reference { index: usize, message: String },
    /// An output size (derived by the engine) outside the allowed bounds.
    #[error("{message}")]
    Size {
        field: &'static str,
        message: String,
    },
    /// The device or a read-back from it failed.
    #[error("device: {0}")]
    Device(String),
    #[error("cancelled: nobody is waiting for the result any more")]
    Cancelled,
    /// The engine a benchmark compares against failed (see [`crate::bench::Partner`]).
    #[error("compared engine: {0}")]
    Compared(String),
}

impl EngineError {
    pub fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        EngineError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}
