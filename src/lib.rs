//! `ferrolora`: LoRA fine-tuning of Qwen2 models in Rust on Burn.
//!
//! This umbrella crate re-exports the workspace's libraries and owns the workspace-level integration
//! tests (`tests/`) and benchmarks (`benches/`). Depend on the individual crates to take only a part.
#![forbid(unsafe_code)]

pub use lora_core;
pub use lora_trainer;
pub use qwen2;

/// The CPU backend used by tests, benches and the CPU path of the commands.
pub type Cpu = burn::backend::Flex;

/// Where the project's shared data lives (tokenizer, real configs, the Huanhuan dataset).
///
/// `FERROLORA_SHARED_DATA` wins; otherwise `../shared/data` beside the repository root.
pub fn shared_data_dir() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("FERROLORA_SHARED_DATA") {
        return Some(p.into());
    }
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    p.is_dir().then_some(p)
}
