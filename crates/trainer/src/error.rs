//! Errors of the trainer: each names the option, step, file or checkpoint involved.

use std::path::{Path, PathBuf};

use kernels::io::is_storage_full;
use lora_core::LoraError;

use crate::checkpoint::last_checkpoint;

/// Everything that can stop training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// An impossible option value.
    #[error("option `{option}` {reason}")]
    BadOption {
        /// The option's name.
        option: String,
        /// What is wrong.
        reason: String,
    },
    /// The training set is empty.
    #[error("no training examples: every record was skipped or the file is empty")]
    NoData,
    /// A non-finite loss or gradient norm.
    #[error("training stopped at step {step}: the {what} is {value} (diverged); the last good checkpoint is {last_checkpoint}; lower the learning rate or check the data")]
    NonFinite {
        /// The optimizer step (1-based).
        step: usize,
        /// `loss` or `gradient norm`.
        what: String,
        /// The value.
        value: f64,
        /// The newest complete checkpoint, or a note that there is none.
        last_checkpoint: String,
    },
    /// The device filled up (or a quota or file-size limit was hit) while writing `path`. The
    /// partial file was removed; complete checkpoints are untouched.
    #[error("no space left on device while writing {path}: free space and resume with --resume-from-checkpoint latest; the last complete checkpoint is {last_checkpoint}")]
    NoSpace {
        /// The file being written.
        path: PathBuf,
        /// The OS error (ENOSPC, EDQUOT or EFBIG).
        source: std::io::Error,
        /// The newest complete checkpoint, or a note that there is none.
        last_checkpoint: String,
    },
    /// The output directory holds another run and neither a resume nor an overwrite was asked for.
    #[error("{dir} holds another run ({found}): pass --resume-from-checkpoint latest to continue it, --overwrite-output-dir to replace it, or choose another --output-dir")]
    OutputDirInUse {
        /// The output directory.
        dir: PathBuf,
        /// What of the other run it holds.
        found: String,
    },
    /// A checkpoint cannot be used to resume.
    #[error("cannot resume from {path}: {reason}")]
    BadCheckpoint {
        /// The checkpoint directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// An adapter error (saving, loading, applying).
    #[error(transparent)]
    Lora(#[from] lora_core::LoraError),
    /// A data error (sampler state).
    #[error(transparent)]
    Data(#[from] lora_data::DataError),
    /// Burn's collective engine failed (data-parallel training).
    #[error("data-parallel training: {reason}")]
    Collective {
        /// What failed.
        reason: String,
    },
    /// A Burn recorder error (optimizer state).
    #[error("{path}: optimizer state: {reason}")]
    Record {
        /// The file.
        path: PathBuf,
        /// The recorder's message.
        reason: String,
    },
}

impl TrainError {
    /// Turns a write that failed for lack of space, however it was wrapped, into
    /// [`TrainError::NoSpace`] naming the last complete checkpoint in `output_dir`.
    pub(crate) fn on_full_disk(self, output_dir: &Path) -> Self {
        let (path, source) = match self {
            TrainError::Io { path, source } | TrainError::Lora(LoraError::Io { path, source })
                if is_storage_full(&source) =>
            {
                (path, source)
            }
            TrainError::Lora(LoraError::NoSpace { path, source }) => (path, source),
            e => return e,
        };
        TrainError::NoSpace {
            path,
            source,
            last_checkpoint: last_checkpoint(output_dir),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }
}
