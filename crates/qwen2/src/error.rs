//! Errors of the Qwen2 crate: each names the file, key and shapes involved and says what to do.

use std::path::{Path, PathBuf};

/// Everything that can go wrong configuring or loading a Qwen2 model.
#[derive(Debug, thiserror::Error)]
pub enum Qwen2Error {
    /// The model location does not exist or holds no model.
    #[error("model not found at {path}: {hint}")]
    ModelNotFound {
        /// What was asked for.
        path: PathBuf,
        /// What was looked for and what to pass instead.
        hint: String,
    },
    /// An OS-level read failure.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON or has a field of the wrong type.
    #[error("{}: invalid config.json: {reason}", display_path(.path))]
    ConfigParse {
        /// The file, when known.
        path: Option<PathBuf>,
        /// serde's message (names the field, line and column).
        reason: String,
    },
    /// The config parses but no model can have it.
    #[error("{}: impossible model config: {reason}", display_path(.path))]
    InvalidConfig {
        /// The file, when known.
        path: Option<PathBuf>,
        /// What is wrong.
        reason: String,
    },
    /// The directory has a config but no weights.
    #[error("no weights in {dir}: expected model.safetensors or model.safetensors.index.json (with its shards)")]
    NoWeights {
        /// The model directory.
        dir: PathBuf,
    },
    /// `model.safetensors.index.json` is malformed.
    #[error("{path}: invalid safetensors index: {reason}")]
    BadIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The index names a shard that is not on disk.
    #[error("{index} names shard {shard}, which does not exist: re-download the checkpoint")]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The missing shard file.
        shard: PathBuf,
    },
    /// A safetensors file's header is corrupt, or the file is shorter than its header says.
    #[error("{file}: not a valid safetensors file ({reason}); the file is corrupt or truncated: re-download it")]
    BadSafetensors {
        /// The file.
        file: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// A parameter the model needs is in no file.
    #[error(
        "tensor `{key}` (shape {expected:?}) is missing from the checkpoint (looked in {files}); \
             the checkpoint does not match config.json"
    )]
    MissingTensor {
        /// The checkpoint key / module path.
        key: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The files searched.
        files: String,
    },
    /// A tensor has a shape other than the config implies.
    #[error("tensor `{key}` in {file} has shape {found:?}, but config.json implies {expected:?}")]
    ShapeMismatch {
        /// The checkpoint key / module path.
        key: String,
        /// The file holding it.
        file: PathBuf,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor in the checkpoint belongs to no parameter of the model.
    #[error(
        "tensor `{key}` in {file} is not a parameter of this model (config.json describes another \
             architecture or size)"
    )]
    UnexpectedTensor {
        /// The checkpoint key.
        key: String,
        /// The file holding it.
        file: PathBuf,
    },
    /// The same key appears in two files.
    #[error("tensor `{key}` appears twice: in {first} and in {second}")]
    DuplicateTensor {
        /// The key.
        key: String,
        /// First file.
        first: PathBuf,
        /// Second file.
        second: PathBuf,
    },
    /// A tensor stored in a dtype that cannot become floating-point weights.
    #[error("tensor `{key}` in {file} has dtype {dtype}; expected F32, BF16 or F16")]
    UnsupportedDtype {
        /// The key.
        key: String,
        /// The file.
        file: PathBuf,
        /// The stored dtype.
        dtype: String,
    },
    /// `generation_config.json` is malformed or holds impossible values.
    #[error("{}: invalid generation config: {reason}", display_path(.path))]
    GenerationConfig {
        /// The file, when known.
        path: Option<PathBuf>,
        /// What is wrong.
        reason: String,
    },
    /// Writing an exported model failed.
    #[error("cannot write {path}: {reason}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The OS or serializer error, and what to do.
        reason: String,
    },
    /// A tokenizer file cannot be written into a GGUF file as llama.cpp's tokenizer.
    #[error("{path}: {reason}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong and what to pass instead.
        reason: String,
    },
    /// Writing a GGUF file failed, or its inputs cannot form one (nothing was left behind).
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    /// A failure while converting tensor data after all checks passed.
    #[error("loading `{key}` from {file} failed: {reason}")]
    Load {
        /// The key.
        key: String,
        /// The file.
        file: PathBuf,
        /// What failed.
        reason: String,
    },
}

fn display_path(p: &Option<PathBuf>) -> String {
    match p {
        Some(p) => p.display().to_string(),
        None => "config".into(),
    }
}

impl Qwen2Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Qwen2Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Attaches the file a config error came from.
    pub(crate) fn with_path(self, file: &Path) -> Self {
        match self {
            Qwen2Error::ConfigParse { path: None, reason } => Qwen2Error::ConfigParse {
                path: Some(file.to_path_buf()),
                reason,
            },
            Qwen2Error::InvalidConfig { path: None, reason } => Qwen2Error::InvalidConfig {
                path: Some(file.to_path_buf()),
                reason,
            },
            e => e,
        }
    }
}
