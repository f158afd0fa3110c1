//! A data file to training examples and the collator that batches them: lora-data's pipeline
//! (`load_dataset` → `prepare` → `Collator`), shared by `finetune`, `eval` and `bench-train` so
//! the three read a file the same way, with the same messages as `cargo xtask prepare`.

use std::path::Path;

use anyhow::{bail, Context};

use lora_data::{
    ChatTokenizer, Collator, Example, Format, Lint, PrepareOptions, PromptStyle, SkipReason,
    Summary,
};

/// How to turn a data file into batches.
pub struct DataSpec<'a> {
    /// Tokenizer directory (with `tokenizer.json`, and `tokenizer_config.json` for the pad token)
    /// or a `tokenizer.json`.
    pub tokenizer: &'a Path,
    /// `seed` or `qwen` (see [`PromptStyle`]: the one rule of every command).
    pub template: &'a str,
    /// System prompt for records without one (`None`: the template's own).
    pub system: Option<String>,
    /// Tokens kept per record.
    pub max_length: usize,
    /// `alpaca`, `sharegpt` or `messages`; `None` detects it from the first record.
    pub format: Option<&'a str>,
    /// Collate a batch's examples back to back in one row instead of right-padded rows.
    pub padding_free: bool,
    /// Run the data checks ([`Lint`]) against the stop tokens of this model directory.
    pub lint_model: Option<&'a Path>,
}

/// A prepared data file.
pub struct Data {
    /// The used records, tokenized, in file order.
    pub examples: Vec<Example>,
    /// Batches `examples` (padding with the tokenizer's pad token, or padding-free).
    pub collator: Collator,
    /// What preparing the file did (records read, used, skipped and why).
    pub summary: Summary,
    /// The data checks, when [`DataSpec::lint_model`] asked for them.
    pub lint: Option<Lint>,
    /// The template and system prompt the records were rendered with.
    pub style: PromptStyle,
}

/// Loads, templates and tokenizes `file`; prints the template, system prompt and summary under
/// `label` (stderr).
pub fn load(file: &Path, spec: &DataSpec, label: &str) -> anyhow::Result<Data> {
    // lora-data's own parsers: the same names and messages as `cargo xtask prepare`.
    let style = PromptStyle::resolve(Some(spec.template), spec.system.as_deref())?;
    eprintln!("{label}: {style}");
    let format: Option<Format> = spec.format.map(str::parse).transpose()?;
    let ds = lora_data::load_dataset(file, format)?;
    let tok = ChatTokenizer::load(spec.tokenizer)?;
    let opts = PrepareOptions {
        template: style.template,
        system: Some(style.system.clone()),
        max_length: spec.max_length,
    };
    let prepared = lora_data::prepare(&ds.conversations, &tok, &opts)?;
    eprintln!("{label}: {}", prepared.summary);
    let lint = match spec.lint_model {
        Some(dir) => Some(Lint::run(
            &ds.conversations,
            &prepared,
            &tok,
            &style,
            &crate::chat::stop_ids(dir, &tok)?,
        )),
        None => None,
    };
    Ok(Data {
        examples: prepared.examples,
        collator: Collator::new(tok.pad_token_id).with_padding_free(spec.padding_free),
        summary: prepared.summary,
        lint,
        style,
    })
}

/// Checks, before any work, that `dir` (given as `flag`) is or can be made a directory this
/// process can write in, naming the path as the user gave it. A directory created for the check
/// is removed again (the run creates it when it writes).
pub fn check_writable_dir(dir: &Path, flag: &str) -> anyhow::Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("{flag} {}: is a file, not a directory", dir.display());
    }
    let created = !dir.exists();
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{flag} {}: cannot create the directory", dir.display()))?;
    let probe = dir.join(format!(".xtask-write-test-{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe);
    let _ = std::fs::remove_file(&probe);
    if created {
        let _ = std::fs::remove_dir(dir);
    }
    written.with_context(|| format!("{flag} {}: cannot write in the directory", dir.display()))?;
    Ok(())
}

/// Checks, before any work, that the file `path` (given as `flag`) can be written: not a
/// directory, in an existing directory this process can write in.
pub fn check_writable_file(path: &Path, flag: &str) -> anyhow::Result<()> {
    if path.is_dir() {
        bail!(
            "{flag} {}: is a directory; pass a file name",
            path.display()
        );
    }
    let parent = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        bail!(
            "{flag} {}: the directory {} does not exist (create it first)",
            path.display(),
            parent.display()
        );
    }
    check_writable_dir(parent, flag)
        .with_context(|| format!("{flag} {}: cannot write there", path.display()))
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
