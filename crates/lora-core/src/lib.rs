#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod adapter;
mod config;
mod dropout;
mod error;
#[cfg(feature = "decompositions")]
pub mod init;
mod linear;
mod modules;
mod params;
mod target;
mod tokens;

#[cfg(feature = "decompositions")]
pub use adapter::convert_to_lora;
pub use adapter::{
    adapter_file_key, adapter_key, adapter_tensors, load_adapter, save_adapter, ADAPTER_CONFIG,
    ADAPTER_WEIGHTS, PEFT_PREFIX,
};
pub use config::{InitLoraWeights, LayerSelector, LoraConfig, ModuleSelector, TokenIndices};
pub use dropout::seed_dropout_keys;
pub use error::LoraError;
pub use linear::{param_id, Base4bit, LoraLinear, LoraMagnitude, LoraWeight};
pub use modules::is_module_to_save;
pub use params::{param_count, visit_params, ParamRef};
pub use target::{
    apply_lora, cache_dora_scales, is_targeted, merge_all, unmerge_all, LoraModel, LoraReport,
};
pub use tokens::{LoraEmbedding, TrainableTokens};
