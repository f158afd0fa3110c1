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
