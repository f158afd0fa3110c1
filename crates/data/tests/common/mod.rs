//! Helpers shared by the lora-data integration tests that need its types (the rest is in
//! `test-support`).
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};

use lora_data::{ChatTokenizer, Example};

/// `tests/fixtures/data` at the repository root.
pub fn fixtures() -> PathBuf {
    test_support::fixtures().join("data")
}

pub fn tokenizer(shared: &Path) -> ChatTokenizer {
    ChatTokenizer::load(&shared.join("qwen2.5-tokenizer")).unwrap()
}

pub fn example_from(v: &serde_json::Value) -> Example {
    serde_json::from_value(v.clone()).unwrap()
}

/// Panics naming the first position where `got` and `want` differ, with a window of values.
pub fn assert_example_eq(what: &str, got: &Example, want: &Example) {
    fn first_diff<T: PartialEq + std::fmt::Debug>(what: &str, field: &str, g: &[T], w: &[T]) {
        if g == w {
            return;
        }
        let i = g
            .iter()
            .zip(w)
            .position(|(a, b)| a != b)
            .unwrap_or(g.len().min(w.len()));
        let lo = i.saturating_sub(3);
        panic!(
            "{what}: {field} differ at position {i} (lengths got {}, want {}):\n  got  {:?}\n  want {:?}",
            g.len(),
            w.len(),
            &g[lo..(i + 4).min(g.len())],
            &w[lo..(i + 4).min(w.len())]
        );
    }
    first_diff(what, "input_ids", &got.input_ids, &want.input_ids);
    first_diff(what, "labels", &got.labels, &want.labels);
    first_diff(
        what,
        "attention_mask",
        &got.attention_mask,
        &want.attention_mask,
    );
}

/// The canonical line the Python script hashes: compact JSON with keys in this order, then "\n".
pub fn canonical_line(ex: &Example) -> String {
    serde_json::to_string(ex).unwrap() + "\n"
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

/// Lower-case hex of a digest.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
