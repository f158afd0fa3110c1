//! `cargo xtask info --model DIR`: resolve, validate and load a model; print what was found.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use burn::tensor::DType;

/// Arguments of `info`.
#[derive(clap::Args)]
pub struct InfoArgs {
    /// Model directory (config.json + safetensors), hub cache entry, or hub id (`Org/Name`,
    /// `modelscope:Org/Name`; downloaded when not cached).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub revision: crate::hub::RevisionArg,
    /// Only read config.json; do not load weights.
    #[arg(long)]
    pub config_only: bool,
}

pub fn run(a: InfoArgs) -> anyhow::Result<()> {
    let dir = qwen2::resolve_model_dir(&crate::hub::model(&a.model, &a.revision)?)?;
    let cfg = qwen2::Qwen2Config::from_file(&dir.join("config.json"))?;
    outln!("model dir: {}", dir.display());
    outln!(
        "layers {} hidden {} intermediate {} heads {}/{} (kv) head_dim {} vocab {} tied {} rope_theta {}",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads(),
        cfg.head_dim(),
        cfg.vocab_size,
        cfg.tie_word_embeddings,
        cfg.rope_theta()
    );
    outln!("parameters: {}", cfg.num_parameters());
    if a.config_only {
        return Ok(());
    }
    let t = Instant::now();
    let loaded = qwen2::load_model::<burn::backend::Flex>(&dir, DType::F32, &Default::default())
        .with_context(|| format!("loading {}", dir.display()))?;
    let r = &loaded.report;
    outln!(
        "loaded {} tensors ({} elements) from {} file(s) in {:.2?}; file dtypes {:?}; ignored {:?}",
        r.tensors,
        r.elements,
        r.files.len(),
        t.elapsed(),
        r.file_dtypes,
        r.ignored
    );
    Ok(())
}
