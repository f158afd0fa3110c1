//! `cargo xtask prepare`: tokenize a dataset with a ChatML template and write one JSON line per
//! used record (`input_ids`, `labels`, `attention_mask`), in input order; the tutorial's
//! `datasets.map(process_func)` as a command. See docs/data.md.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use lora_data::{ChatTokenizer, Format, PrepareOptions, PromptStyle, Template};

/// Arguments of `prepare`.
#[derive(clap::Args)]
pub struct PrepareArgs {
    /// Dataset: a JSON array or JSONL of alpaca, sharegpt or messages records.
    #[arg(long)]
    pub data: PathBuf,
    /// `tokenizer.json`, or the directory holding it (and tokenizer_config.json for the pad token).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// `seed` (the tutorial's process_func, answers end with <|endoftext|>) or `qwen` (Qwen2.5's
    /// chat template, answers end with <|im_end|>); the same default in every command.
    #[arg(long, default_value = "seed")]
    pub template: Template,
    /// System prompt for records without one (default: the template's own).
    #[arg(long)]
    pub system: Option<String>,
    /// Tokens kept per record; longer records are cut to the first N.
    #[arg(long, default_value_t = 384, allow_negative_numbers = true)]
    pub max_length: usize,
    /// Record format, when detection from the first record's keys is not wanted:
    /// alpaca, sharegpt or messages.
    #[arg(long)]
    pub format: Option<Format>,
    /// Output JSONL (written to a temporary file beside it, then renamed).
    #[arg(long)]
    pub output: PathBuf,
}

pub fn run(a: PrepareArgs) -> anyhow::Result<()> {
    // Before the work, naming the path given (not the temporary file written beside it).
    crate::data::check_writable_file(&a.output, "--output")?;
    let t0 = Instant::now();
    let ds = lora_data::load_dataset(&a.data, a.format)?;
    let tok = ChatTokenizer::load(&a.tokenizer)?;
    let t_load = t0.elapsed();
    let style = PromptStyle::new(a.template, a.system.as_deref());
    outln!("{style}");
    let opts = PrepareOptions {
        template: style.template,
        system: Some(style.system),
        max_length: a.max_length,
    };
    let t1 = Instant::now();
    let prepared = lora_data::prepare(&ds.conversations, &tok, &opts)?;
    let t_tok = t1.elapsed();
    // An empty output is no dataset: refuse, and leave no file behind (nor touch an old one).
    if prepared.examples.is_empty() {
        return Err(crate::data::none_used(&a.data, &prepared.summary));
    }
    lora_data::write_jsonl(&a.output, &prepared.examples)
        .with_context(|| format!("writing {}", a.output.display()))?;
    outln!(
        "{}: {} format, {} records",
        a.data.display(),
        ds.format.name(),
        ds.conversations.len()
    );
    outln!("{}", prepared.summary);
    outln!(
        "wrote {} ({} lines); load {:.2?}, tokenize {:.2?}",
        a.output.display(),
        prepared.examples.len(),
        t_load,
        t_tok
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_support::{read_json, shared_data_or_skip};

    fn args(data: PathBuf, tokenizer: PathBuf, output: PathBuf) -> PrepareArgs {
        PrepareArgs {
            data,
            tokenizer,
            template: Template::Qwen,
            system: None,
            max_length: 384,
            format: None,
            output,
        }
    }

    /// The command writes exactly the reference examples, one line each, in input order; a bad
    /// dataset fails and writes nothing.
    #[test]
    fn prepare_writes_the_reference_lines() {
        let Some(shared) = shared_data_or_skip("prepare_writes_the_reference_lines") else {
            return;
        };
        let fixtures = test_support::fixtures().join("data");
        let dir = std::env::temp_dir().join(format!("xtask-prepare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out.jsonl");
        let tokenizer = shared.join("qwen2.5-tokenizer");
        run(args(
            fixtures.join("chat_sharegpt.json"),
            tokenizer.clone(),
            out.clone(),
        ))
        .unwrap();
        let reference: serde_json::Value = read_json(&fixtures.join("chat_reference.json"));
        let want = reference["chat_sharegpt.json"]["qwen"].as_array().unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        let got: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            for key in ["input_ids", "labels", "attention_mask"] {
                assert_eq!(g[key], w[key], "record {i} {key}");
            }
        }

        let bad = dir.join("bad.jsonl");
        std::fs::write(
            &bad,
            "{\"messages\": [{\"role\": \"tool\", \"content\": \"x\"}]}\n",
        )
        .unwrap();
        let out2 = dir.join("never.jsonl");
        let err = run(args(bad, tokenizer, out2.clone())).unwrap_err();
        assert!(err.to_string().contains("unknown role \"tool\""), "{err}");
        assert!(!out2.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
