#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod attention;
mod config;
mod error;
mod export;
mod generate;
mod gguf_export;
mod gguf_vocab;
mod load;
mod mlp;
mod model;
mod norm;
mod resolve;
mod rope;
mod sampling;
mod save;
mod stream;
#[cfg(test)]
mod tests_fused;

pub use attention::{attention_reference, AttentionBias, LayerCache, Qwen2Attention};
pub use config::{Qwen2Config, RopeParameters, TokenIds};
pub use error::Qwen2Error;
pub use export::{export_weights, parse_size, ExportReport};
pub use generate::{generate, generate_cached, Generation, KvCache, StopReason};
pub use gguf_export::{
    export_gguf, export_gguf_lora, gguf_tensor_name, hparams_metadata, GgufDtype, GgufExport,
};
pub use gguf_vocab::tokenizer_metadata;
/// The seeded generator of sampling (`kernels::rng::SplitMix64`).
pub use kernels::rng::SplitMix64;
pub use load::{
    load_model, load_model_4bit, load_safetensors_into, parameter_shapes, quantized_key,
    weight_files, Load4bit, LoadReport, LoadedModel,
};
pub use mlp::Qwen2Mlp;
pub use model::{
    additive_mask, attention_mask_4d, Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model,
};
pub use norm::Qwen2RmsNorm;
pub use resolve::resolve_model_dir;
pub use rope::{inv_freq, RopeCache};
pub use sampling::{
    argmax, repetition_penalty, softmax, top_k, top_p, GenerationConfig, TokenSampler,
    GENERATION_CONFIG,
};
pub use save::save_model;
pub use stream::CheckpointReader;
