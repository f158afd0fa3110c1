//! The crate's one error type. Every variant names the file and, where there is one, the record
//! (0-based index into the dataset, plus the 1-based line for JSONL) and the field, and says what to do.

use std::fmt;
use std::path::PathBuf;

/// Where a record sits in its file: its 0-based index, and its 1-based line for JSONL files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// 0-based position among the records (blank JSONL lines are not records).
    pub index: usize,
    /// 1-based line number, for JSONL input.
    pub line: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "record {} (line {line})", self.index),
            None => write!(f, "record {}", self.index),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path} holds no records; give a JSON array or JSONL file with at least one record")]
    Empty { path: PathBuf },

    #[error(
        "{path}: malformed JSON at {at} (line {line}, column {column}): {reason}; fix the file or \
         check that it is one JSON array or one JSON object per line"
    )]
    Malformed {
        path: PathBuf,
        at: Location,
        line: usize,
        column: usize,
        reason: String,
    },

    #[error("{path}: {at} has no field `{field}`; every {format} record needs it")]
    MissingField {
        path: PathBuf,
        at: Location,
        field: String,
        format: &'static str,
    },

    #[error("{path}: {at} field `{field}` should be {expected} but is {got}")]
    WrongType {
        path: PathBuf,
        at: Location,
        field: String,
        expected: &'static str,
        got: &'static str,
    },

    #[error(
        "{path}: {at} field `{field}` has unknown role {role:?}; allowed: {allowed} (tool and \
         function turns are not supported)"
    )]
    UnknownRole {
        path: PathBuf,
        at: Location,
        field: String,
        role: String,
        allowed: &'static str,
    },

    #[error(
        "{path}: cannot tell the format of {at}: it has none of `instruction` (alpaca), \
         `conversations` (sharegpt) or `messages` (messages); pass the format explicitly"
    )]
    UnknownFormat { path: PathBuf, at: Location },

    #[error("{path}: {at} has no messages; remove it or give it at least one turn")]
    NoMessages { path: PathBuf, at: Location },

    #[error("unknown {what} {got:?}; expected one of {expected}")]
    BadOption {
        what: &'static str,
        got: String,
        expected: &'static str,
    },

    #[error(
        "cannot load tokenizer {path}: {reason}; give tokenizer.json or the directory holding it"
    )]
    Tokenizer { path: PathBuf, reason: String },

    #[error(
        "tokenizer {path} has no token {token:?} to pad with; check `pad_token` in \
         tokenizer_config.json"
    )]
    NoPadToken { path: PathBuf, token: String },

    #[error("tokenizing record {index} failed: {reason}")]
    Encode { index: usize, reason: String },

    #[error("tokenizing the system prompt failed: {reason}")]
    EncodeSystem { reason: String },

    #[error(
        "{path}: line {line} is not a prepared example ({reason}); regenerate it with \
         `cargo xtask prepare`"
    )]
    BadExample {
        path: PathBuf,
        line: usize,
        reason: String,
    },

    #[error("max_length must be at least 1")]
    ZeroMaxLength,

    #[error(
        "sampler position {got_epoch}:{got_index} is past the end of an epoch of {len} samples; \
         the checkpoint belongs to another dataset"
    )]
    BadSamplerState {
        got_epoch: u64,
        got_index: usize,
        len: usize,
    },
}

pub type Result<T> = std::result::Result<T, DataError>;
