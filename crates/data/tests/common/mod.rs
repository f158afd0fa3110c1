//! Helpers shared by the lora-data integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use lora_data::{ChatTokenizer, Example};

/// `tests/fixtures/data` at the repository root.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/data")
}

/// The shared data directory (`FERROLORA_SHARED_DATA`, else `../shared/data` beside the repository),
/// or `None` with a message when it is absent outside CI. Under `CI=true` a missing directory fails.
pub fn shared_data() -> Option<PathBuf> {
    let dir = match std::env::var_os("FERROLORA_SHARED_DATA") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
            p.is_dir().then_some(p)
        }
    };
    match dir {
        Some(p) => Some(p),
        None if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true but ../shared/data is missing; set FERROLORA_SHARED_DATA")
        }
        None => {
            eprintln!(
                "skipping: shared data not found; set FERROLORA_SHARED_DATA to the directory holding \
                 qwen2.5-tokenizer/ and huanhuan/"
            );
            None
        }
    }
}

pub fn tokenizer(shared: &Path) -> ChatTokenizer {
    ChatTokenizer::load(&shared.join("qwen2.5-tokenizer")).unwrap()
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
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
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
