//! lora-data's dataset readers on arbitrary bytes: `parse_dataset` (JSON array or JSONL; alpaca
//! with `input`/`system`/`history`, sharegpt, messages; the format detected or forced) and
//! `read_jsonl` (prepared examples). Every input must give `Ok` or a `DataError`, never a panic.
//!
//! Input: byte 0 picks the reader (`% 5`: detect, alpaca, sharegpt, messages, prepared examples);
//! the rest is the file's text (invalid UTF-8 is replaced, as `read_to_string` would refuse it).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lora_data::{parse_dataset, read_jsonl, Format, Role, Template};

/// One scratch directory per fuzzing process for the path-based reader.
fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"))
        .path()
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let format = match pick % 5 {
        0 => None,
        1 => Some(Format::Alpaca),
        2 => Some(Format::ShareGpt),
        3 => Some(Format::Messages),
        _ => {
            let path: PathBuf = scratch().join("prepared.jsonl");
            std::fs::write(&path, text.as_bytes()).expect("write scratch file");
            match read_jsonl(&path) {
                Ok(examples) => {
                    assert!(!examples.is_empty());
                    for ex in &examples {
                        assert!(!ex.input_ids.is_empty());
                        assert_eq!(ex.labels.len(), ex.input_ids.len());
                        assert_eq!(ex.attention_mask.len(), ex.input_ids.len());
                    }
                }
                Err(e) => drop(e.to_string()),
            }
            return;
        }
    };
    match parse_dataset(&text, Path::new("fuzz.jsonl"), format) {
        Ok(ds) => {
            assert!(!ds.conversations.is_empty());
            if let Some(f) = format {
                assert_eq!(ds.format, f);
            }
            for conv in &ds.conversations {
                // A system prompt, if any, is the first message only.
                assert!(conv
                    .messages
                    .iter()
                    .skip(1)
                    .all(|m| m.role != Role::System || ds.format != Format::Alpaca));
                // Rendering must accept whatever the parser accepted.
                for t in [Template::Seed, Template::Qwen] {
                    let prompt = t.render_prompt(&conv.messages, t.default_system());
                    assert!(prompt.ends_with("<|im_start|>assistant\n"));
                }
            }
        }
        Err(e) => drop(e.to_string()),
    }
});
