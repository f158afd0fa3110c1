//! Errors of `lora-core`: each names the file, module or key involved and says what to do.

use std::path::{Path, PathBuf};

/// Everything that can go wrong configuring, applying, merging or loading a LoRA adapter.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// An OS-level read or write failure.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A write failed because the file system is full (or a quota or file-size limit was hit).
    /// `kernels::io::write_atomic` has removed its temporary file; `path` was not changed.
    #[error("no space left on device while writing {path}: free space and write it again")]
    NoSpace {
        /// The file being written.
        path: PathBuf,
        /// The OS error (ENOSPC, EDQUOT or EFBIG).
        source: std::io::Error,
    },
    /// `adapter_config.json` is not valid JSON or has a field of the wrong type.
    #[error("{}: invalid adapter config: {reason}", show(.path))]
    ConfigParse {
        /// The file, when known.
        path: Option<PathBuf>,
        /// serde's message.
        reason: String,
    },
    /// The config parses but is impossible.
    #[error("{}: impossible LoRA config: {reason}", show(.path))]
    InvalidConfig {
        /// The file, when known.
        path: Option<PathBuf>,
        /// What is wrong and what to change.
        reason: String,
    },
    /// PEFT features that change the adapter's math and are not implemented here.
    #[error("adapter uses PEFT features this version does not support: {}; retrain without them or merge the adapter in Python first", .features.join(", "))]
    Unsupported {
        /// The features, with their values.
        features: Vec<String>,
    },
    /// `target_modules` matched nothing.
    #[error("target_modules {targets} matches no module of this model; its linear modules are: {available}")]
    NoTarget {
        /// The selector as written.
        targets: String,
        /// The model's adaptable module paths (deduplicated by name where long).
        available: String,
    },
    /// An adapter tensor has the wrong shape for the model (an adapter for another base model).
    #[error("adapter tensor `{key}` in {file} has shape {found:?}, but module `{module}` of this model needs {expected:?}: the adapter was trained on a different base model")]
    ShapeMismatch {
        /// The adapter key.
        key: String,
        /// The module path.
        module: String,
        /// The adapter file.
        file: PathBuf,
        /// Shape this model needs.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// A tensor the config implies is absent from the adapter file.
    #[error("adapter file {file} has no tensor `{key}` (needed by module `{module}`)")]
    MissingTensor {
        /// The key looked for.
        key: String,
        /// The module path.
        module: String,
        /// The adapter file.
        file: PathBuf,
    },
    /// The adapter file has tensors this crate would not load.
    #[error(
        "adapter file {file} has tensors that are not LoRA A/B weights of targeted modules: {keys}"
    )]
    UnexpectedTensors {
        /// The file.
        file: PathBuf,
        /// The offending keys (first few).
        keys: String,
    },
    /// The adapter file is not valid safetensors or has an unsupported dtype.
    #[error("{file}: {reason}")]
    BadFile {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Merging would produce NaN or Inf weights (PEFT's `safe_merge`).
    #[error("merging the adapter into `{module}` produces NaN/Inf weights; the adapter is broken (check training for divergence)")]
    NonFiniteMerge {
        /// The module path.
        module: String,
    },
    /// A merge/unmerge requested in the wrong state.
    #[error("module `{module}`: {reason}")]
    MergeState {
        /// The module path.
        module: String,
        /// What is wrong.
        reason: String,
    },
}

fn show(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "config".into())
}

impl LoraError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        LoraError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A write error: [`LoraError::NoSpace`] when the device is full, else [`LoraError::Io`].
    pub(crate) fn write(path: &Path, source: std::io::Error) -> Self {
        if kernels::io::is_storage_full(&source) {
            LoraError::NoSpace {
                path: path.to_path_buf(),
                source,
            }
        } else {
            LoraError::io(path, source)
        }
    }

    pub(crate) fn with_path(self, file: &Path) -> Self {
        match self {
            LoraError::InvalidConfig { path: None, reason } => LoraError::InvalidConfig {
                path: Some(file.to_path_buf()),
                reason,
            },
            LoraError::ConfigParse { path: None, reason } => LoraError::ConfigParse {
                path: Some(file.to_path_buf()),
                reason,
            },
            e => e,
        }
    }
}
