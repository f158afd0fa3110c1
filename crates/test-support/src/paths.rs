//! Where the repository, its fixtures and the project's shared data are.

use std::path::{Path, PathBuf};

/// The workspace root (this crate lives in `crates/test-support` below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(Path::parent)
        .expect("crates/test-support sits two levels below the workspace root")
        .to_path_buf()
}

/// `tests/fixtures` at the workspace root (tiny models, PEFT references, data samples).
pub fn fixtures() -> PathBuf {
    workspace_root().join("tests/fixtures")
}

/// Whether this is a CI run (`CI=true`): there, whatever a test needs must be present, and a test
/// that would skip elsewhere fails instead.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The project's shared data (the real tokenizer, the Qwen2.5 configs, the Huanhuan dataset), or
/// `None` when it is absent. `FERROLORA_SHARED_DATA` wins; otherwise `../shared/data` beside the
/// workspace root, when that is a directory.
pub fn shared_data() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FERROLORA_SHARED_DATA") {
        return Some(p.into());
    }
    let p = workspace_root().join("../shared/data");
    p.is_dir().then_some(p)
}

/// [`shared_data`] for a test that needs it: when it is absent the test (named by `what`) says it
/// skips and gets `None`, or, under `CI=true`, fails.
pub fn shared_data_or_skip(what: &str) -> Option<PathBuf> {
    let dir = shared_data();
    if dir.is_none() {
        if ci() {
            panic!("{what}: CI=true but ../shared/data is missing; set FERROLORA_SHARED_DATA");
        }
        eprintln!(
            "skipping {what}: shared data not found; set FERROLORA_SHARED_DATA to the directory \
             holding qwen2.5-configs/, qwen2.5-tokenizer/ and huanhuan/"
        );
    }
    dir
}
