//! A data file to training examples and the collator that batches them: lora-data's pipeline
//! (`load_dataset` → `prepare` → `Collator`), shared by `finetune`, `eval` and `bench-train` so
//! the three read a file the same way, with the same messages as `cargo xtask prepare`.

use std::path::Path;

use lora_data::{
    ChatTokenizer, Collator, Example, Format, PrepareOptions, SkipReason, Summary, Template,
};

/// How to turn a data file into batches.
pub struct DataSpec<'a> {
    /// Tokenizer directory (with `tokenizer.json`, and `tokenizer_config.json` for the pad token)
    /// or a `tokenizer.json`.
    pub tokenizer: &'a Path,
    /// `seed` or `qwen`.
    pub template: &'a str,
    /// System prompt for records without one (`None`: the template's own).
    pub system: Option<String>,
    /// Tokens kept per record.
    pub max_length: usize,
    /// `alpaca`, `sharegpt` or `messages`; `None` detects it from the first record.
    pub format: Option<&'a str>,
    /// Collate a batch's examples back to back in one row instead of right-padded rows.
    pub padding_free: bool,
}

/// A prepared data file.
pub struct Data {
    /// The used records, tokenized, in file order.
    pub examples: Vec<Example>,
    /// Batches `examples` (padding with the tokenizer's pad token, or padding-free).
    pub collator: Collator,
    /// What preparing the file did (records read, used, skipped and why).
    pub summary: Summary,
}

/// Loads, templates and tokenizes `file`; prints its summary under `label` (stderr).
pub fn load(file: &Path, spec: &DataSpec, label: &str) -> anyhow::Result<Data> {
    // lora-data's own parsers: the same names and messages as `cargo xtask prepare`.
    let template: Template = spec.template.parse()?;
    let format: Option<Format> = spec.format.map(str::parse).transpose()?;
    let ds = lora_data::load_dataset(file, format)?;
    let tok = ChatTokenizer::load(spec.tokenizer)?;
    let opts = PrepareOptions {
        template,
        system: spec.system.clone(),
        max_length: spec.max_length,
    };
    let prepared = lora_data::prepare(&ds.conversations, &tok, &opts)?;
    eprintln!("{label}: {}", prepared.summary);
    Ok(Data {
        examples: prepared.examples,
        collator: Collator::new(tok.pad_token_id).with_padding_free(spec.padding_free),
        summary: prepared.summary,
    })
}

/// The one-line error for a file of which no record is usable (`eval` would score nothing and
/// `prepare` write an empty file): how many records were skipped and why, with the option that
/// changes it.
pub fn none_used(file: &Path, s: &Summary) -> anyhow::Error {
    let why: Vec<String> = s
        .skipped
        .iter()
        .map(|(why, n)| match why {
            SkipReason::TruncatedAway => format!(
                "{n} with every answer token beyond --max-length {}",
                s.max_length
            ),
            SkipReason::NoAssistantTurn => format!("{n} with no assistant turn to supervise"),
        })
        .collect();
    anyhow::anyhow!(
        "{}: no usable record: all {} records were skipped: {}",
        file.display(),
        s.records_read,
        why.join("; ")
    )
}
