#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod collate;
mod error;
mod format;
mod lint;
mod prepare;
mod sampler;
mod template;

pub use collate::{Batch, Collator, PaddedBatch};
pub use error::{DataError, Location, Result};
pub use format::{load_dataset, parse_dataset, Conversation, Dataset, Format, Message, Role};
pub use lint::Lint;
pub use prepare::{
    prepare, read_jsonl, write_jsonl, ChatTokenizer, PrepareOptions, Prepared, SkipReason, Summary,
};
pub use sampler::{Sampler, SamplerState};
pub use template::{PromptStyle, Template, IGNORE_INDEX, QWEN_DEFAULT_SYSTEM, SEED_DEFAULT_SYSTEM};

/// One tokenized training record, as `process_func` returns it (and as `prepare` writes it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    pub input_ids: Vec<u32>,
    /// `input_ids` where supervised, [`IGNORE_INDEX`] (-100) elsewhere.
    pub labels: Vec<i64>,
    /// 1 for every token (padding is the collator's business).
    pub attention_mask: Vec<u8>,
}
