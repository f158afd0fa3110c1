//! Tokenizing a whole dataset in parallel: the Rust side of `datasets.map(process_func)`.
//!
//! Differs from the tutorial on purpose in one place: a record whose labels are all -100 after
//! truncation (its prompt fills `max_length`) is skipped and counted instead of being handed to the
//! loss, where it would contribute nothing but a 0/0.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use crate::error::{DataError, Result};
use crate::format::Conversation;
use crate::template::{Encoder, Template, IGNORE_INDEX};
use crate::Example;

/// The tokenizer of the model, with the id used for padding (and appended by `seed`).
pub struct ChatTokenizer {
    /// The model's `tokenizer.json`.
    pub tokenizer: tokenizers::Tokenizer,
    /// Id of the pad token (Qwen2.5: `<|endoftext|>`, 151643).
    pub pad_token_id: u32,
}

impl ChatTokenizer {
    /// Loads `tokenizer.json` (a file, or a directory holding it). The pad token is
    /// `tokenizer_config.json`'s `pad_token` when that file sits beside it, else `<|endoftext|>`
    /// (Qwen2.5's pad token, id 151643).
    pub fn load(path: &Path) -> Result<Self> {
        let (file, dir) = if path.is_dir() {
            (path.join("tokenizer.json"), path.to_path_buf())
        } else {
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            (path.to_path_buf(), dir)
        };
        let tokenizer =
            tokenizers::Tokenizer::from_file(&file).map_err(|e| DataError::Tokenizer {
                path: file.clone(),
                reason: e.to_string(),
            })?;
        let pad = read_pad_token(&dir.join("tokenizer_config.json"))?
            .unwrap_or_else(|| "<|endoftext|>".to_string());
        let pad_token_id = tokenizer
            .token_to_id(&pad)
            .ok_or_else(|| DataError::NoPadToken {
                path: file.clone(),
                token: pad,
            })?;
        Ok(Self {
            tokenizer,
            pad_token_id,
        })
    }
}

/// `pad_token` from tokenizer_config.json: a string or `{"content": ...}`; `None` if there is no
/// such file or field.
fn read_pad_token(path: &Path) -> Result<Option<String>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(None);
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| DataError::Tokenizer {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(match v.get("pad_token") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    })
}

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// How conversations become ids and labels (`qwen` by default).
    pub template: Template,
    /// System prompt for records that carry none; `None` uses the template's default.
    pub system: Option<String>,
    /// Tokens kept per record; longer ones are cut to the first `max_length` (ids, labels and mask).
    pub max_length: usize,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self {
            template: Template::Qwen,
            system: None,
            max_length: 384,
        }
    }
}

/// Why a record was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// `qwen`: no assistant turn; `seed`: the last turn is not the assistant's.
    NoAssistantTurn,
    /// Every supervised token lay beyond `max_length`.
    TruncatedAway,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SkipReason::NoAssistantTurn => "no assistant turn to supervise",
            SkipReason::TruncatedAway => "all answer tokens beyond max_length",
        })
    }
}

/// What [`prepare`] did, for the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub template: &'static str,
    pub max_length: usize,
    /// Records in the file.
    pub records_read: usize,
    /// Records turned into examples.
    pub used: usize,
    /// Records longer than `max_length` (used after cutting, or skipped as `truncated_away`).
    pub truncated: usize,
    /// Records not used, by reason.
    pub skipped: BTreeMap<SkipReason, usize>,
    /// Tokens over all used examples (after truncation).
    pub tokens: u64,
    /// Of those, tokens whose label is not -100.
    pub supervised_tokens: u64,
    /// Example lengths (after truncation), nearest-rank percentiles over used records.
    pub length_p50: usize,
    pub length_p95: usize,
    pub length_max: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "template {}, max_length {}",
            self.template, self.max_length
        )?;
        writeln!(
            f,
            "records: {} read, {} used, {} truncated, {} skipped",
            self.records_read,
            self.used,
            self.truncated,
            self.skipped.values().sum::<usize>()
        )?;
        for (why, n) in &self.skipped {
            writeln!(f, "  skipped {n}: {why}")?;
        }
        writeln!(
            f,
            "tokens: {} ({} supervised, {:.1}%)",
            self.tokens,
            self.supervised_tokens,
            100.0 * self.supervised_tokens as f64 / self.tokens.max(1) as f64
        )?;
        write!(
            f,
            "length: p50 {}, p95 {}, max {}",
            self.length_p50, self.length_p95, self.length_max
        )
    }
}

/// The tokenized dataset: examples in input order, each with the index of the record it came from.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Used records, in input order.
    pub examples: Vec<Example>,
    /// For each example, the 0-based index of the record it came from.
    pub source_index: Vec<usize>,
    /// The records skipped (0-based index) and why.
    pub skipped_index: Vec<(usize, SkipReason)>,
    pub summary: Summary,
}

impl Prepared {
    /// Example lengths, in order: what [`crate::Sampler::new`] takes.
    pub fn lengths(&self) -> Vec<usize> {
        self.examples.iter().map(|e| e.input_ids.len()).collect()
    }
}

enum Outcome {
    Used { ex: Example, truncated: bool },
    Skipped { why: SkipReason, truncated: bool },
}

/// Tokenizes every conversation in parallel (rayon), truncates, drops and counts records left with
/// nothing to supervise, and summarises.
pub fn prepare(
    conversations: &[Conversation],
    tok: &ChatTokenizer,
    opts: &PrepareOptions,
) -> Result<Prepared> {
    if opts.max_length == 0 {
        return Err(DataError::ZeroMaxLength);
    }
    let system = opts
        .system
        .as_deref()
        .unwrap_or(opts.template.default_system());
    let encoder = Encoder::new(&tok.tokenizer, tok.pad_token_id, opts.template, system)?;
    let outcomes = conversations
        .par_iter()
        .enumerate()
        .map(|(i, conv)| {
            let ex = encoder.encode(conv, i)?;
            let Some(mut ex) = ex else {
                return Ok(Outcome::Skipped {
                    why: SkipReason::NoAssistantTurn,
                    truncated: false,
                });
            };
            let truncated = ex.input_ids.len() > opts.max_length;
            if truncated {
                ex.input_ids.truncate(opts.max_length);
                ex.labels.truncate(opts.max_length);
                ex.attention_mask.truncate(opts.max_length);
            }
            Ok(if ex.labels.iter().all(|&l| l == IGNORE_INDEX) {
                Outcome::Skipped {
                    why: SkipReason::TruncatedAway,
                    truncated,
                }
            } else {
                Outcome::Used { ex, truncated }
            })
        })
        .collect::<Result<Vec<_>>>()?;

    let mut examples = Vec::new();
    let mut source_index = Vec::new();
    let mut skipped = BTreeMap::new();
    let mut skipped_index = Vec::new();
    let mut n_truncated = 0;
    for (i, o) in outcomes.into_iter().enumerate() {
        match o {
            Outcome::Used { ex, truncated } => {
                n_truncated += usize::from(truncated);
                examples.push(ex);
                source_index.push(i);
            }
            Outcome::Skipped { why, truncated } => {
                n_truncated += usize::from(truncated);
                *skipped.entry(why).or_insert(0) += 1;
                skipped_index.push((i, why));
            }
        }
    }
    let mut lengths: Vec<usize> = examples.iter().map(|e| e.input_ids.len()).collect();
    lengths.sort_unstable();
    let summary = Summary {
        template: opts.template.name(),
        max_length: opts.max_length,
        records_read: conversations.len(),
        used: examples.len(),
        truncated: n_truncated,
        skipped,
        tokens: lengths.iter().map(|&l| l as u64).sum(),
        supervised_tokens: examples
            .iter()
            .map(|e| e.labels.iter().filter(|&&l| l != IGNORE_INDEX).count() as u64)
            .sum(),
        length_p50: percentile(&lengths, 50),
        length_p95: percentile(&lengths, 95),
        length_max: lengths.last().copied().unwrap_or(0),
    };
    Ok(Prepared {
        examples,
        source_index,
        skipped_index,
        summary,
    })
}

/// Nearest-rank percentile of sorted values (0 for none).
fn percentile(sorted: &[usize], p: usize) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

/// Reads what [`write_jsonl`] (and `cargo xtask prepare`) wrote, checking that each line's three
/// lists have the same length.
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |line: usize, reason: String| DataError::BadExample {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let ex: Example = serde_json::from_str(l).map_err(|e| bad(i + 1, e.to_string()))?;
        let (n, nl, nm) = (ex.input_ids.len(), ex.labels.len(), ex.attention_mask.len());
        if n == 0 || nl != n || nm != n {
            return Err(bad(
                i + 1,
                format!("input_ids, labels, attention_mask lengths {n}, {nl}, {nm}"),
            ));
        }
        out.push(ex);
    }
    if out.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(out)
}

/// Writes one JSON line per example (`input_ids`, `labels`, `attention_mask`) to a temporary file
/// beside `path`, then renames it over `path`, so a failed run never leaves a half-written file.
pub fn write_jsonl(path: &Path, examples: &[Example]) -> Result<()> {
    let io = |p: &Path| {
        let p: PathBuf = p.to_path_buf();
        move |source| DataError::Io { path: p, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".prepare-").suffix(".jsonl.tmp");
    // tempfile creates 0600; the output should get the usual 0666 & !umask of a new file.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let tmp = builder.tempfile_in(dir).map_err(io(dir))?;
    let mut w = std::io::BufWriter::new(tmp.as_file());
    for ex in examples {
        serde_json::to_writer(&mut w, ex).map_err(|e| DataError::Io {
            path: tmp.path().to_path_buf(),
            source: e.into(),
        })?;
        w.write_all(b"\n").map_err(io(tmp.path()))?;
    }
    w.flush().map_err(io(tmp.path()))?;
    drop(w);
    tmp.persist(path).map_err(|e| DataError::Io {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}
