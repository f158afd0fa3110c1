//! Errors of reading and writing GGUF files, each naming the file and what is wrong.

use std::path::PathBuf;

/// Everything that can go wrong writing or reading a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The tensors or metadata handed to the writer cannot form a valid file (nothing was written).
    #[error("cannot write {path}: {reason}")]
    Invalid {
        /// The file that was to be written.
        path: PathBuf,
        /// What is wrong, naming the tensor or key.
        reason: String,
    },
    /// Writing failed (the partial file was removed; `path` is unchanged).
    #[error("cannot write {path}: {reason}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error, or the tensor whose data could not be produced.
        reason: String,
    },
    /// An OS-level read failure.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a valid GGUF v3 file.
    #[error("{path}: not a valid GGUF file: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong and at which byte.
        reason: String,
    },
}
