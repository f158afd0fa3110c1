//! Writing a model as a Hugging Face directory: `config.json` + `model.safetensors` (f32), keys =
//! module paths. Used for random test checkpoints and the built-in demo; the weights go through
//! [`crate::export_weights`] (one shard), each file written to a temporary name and renamed.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::DType;

use crate::error::Qwen2Error;
use crate::export::{export_weights, write_atomic};
use crate::{Qwen2Config, Qwen2ForCausalLM};

/// Writes `dir/config.json` and `dir/model.safetensors` (every parameter, f32; adapters excluded).
pub fn save_model<B: Backend>(
    model: &Qwen2ForCausalLM<B>,
    config: &Qwen2Config,
    dir: &Path,
) -> Result<(), Qwen2Error> {
    std::fs::create_dir_all(dir).map_err(|e| Qwen2Error::io(dir, e))?;
    export_weights(model, dir, DType::F32, u64::MAX)?;
    let mut cfg = config.clone();
    cfg.torch_dtype = Some("float32".into());
    cfg.dtype = None;
    let json = serde_json::to_string_pretty(&cfg).expect("config serializes");
    write_atomic(&dir.join("config.json"), json.as_bytes())
}
