//! `cargo xtask export --model DIR [--adapter DIR] --format gguf|gguf-lora --dtype ... --output
//! FILE.gguf`: a model for llama.cpp, Ollama and LM Studio.
//!
//! - `gguf`: the base with the adapter folded in by the same merge as `cargo xtask merge` (in f32,
//!   `LoraLinear::merged_weight`, the fold of `lora_core::merge_all`), written as llama.cpp's
//!   `qwen2` GGUF with the tokenizer embedded (what its `convert_hf_to_gguf.py` writes for the
//!   merged directory). The checkpoint is streamed: one weight is read, merged and written at a
//!   time.
//! - `gguf-lora`: the adapter alone as a GGUF LoRA adapter (`llama-cli -m base.gguf --lora
//!   adapter.gguf`), what `convert_lora_to_gguf.py` writes. Only the base's config.json is read
//!   (to check every adapter shape against it); its weights are not loaded.
//!
//! The file is written one tensor at a time under a temporary name and renamed: the memory held is
//! about one tensor (plus the adapter), and a failed export leaves nothing behind.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use burn::backend::Flex;
use qwen2::{GgufDtype, GgufExport};

/// Arguments of `export`.
#[derive(clap::Args)]
pub struct ExportArgs {
    /// Base model directory (config.json + safetensors), hub cache entry, or hub id (`Org/Name`,
    /// `modelscope:Org/Name`; downloaded when not cached).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub revision: crate::hub::RevisionArg,
    /// PEFT LoRA adapter (a directory or a hub id): merged into the model (`gguf`) or exported
    /// alone (`gguf-lora`).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// `gguf` (the merged model, for `llama-cli -m`) or `gguf-lora` (the adapter, for `--lora`).
    #[arg(long, default_value = "gguf")]
    pub format: String,
    /// Tensor type of the 2-D weights: f32, f16, bf16 or q8_0 (norms and biases stay f32).
    #[arg(long, default_value = "f16")]
    pub dtype: String,
    /// The GGUF file to write; must not exist.
    #[arg(long)]
    pub output: PathBuf,
    /// Directory with tokenizer.json and tokenizer_config.json (default: the model directory).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

enum Format {
    Model,
    Lora,
}

pub fn run(a: ExportArgs) -> anyhow::Result<()> {
    let format = match a.format.as_str() {
        "gguf" => Format::Model,
        "gguf-lora" => Format::Lora,
        other => bail!(
            "--format {other:?}: use gguf (the merged model) or gguf-lora (the adapter alone)"
        ),
    };
    let dtype = GgufDtype::parse(&a.dtype)
        .with_context(|| format!("--dtype {:?}: use f32, f16, bf16 or q8_0", a.dtype))?;
    if matches!(format, Format::Lora) && a.adapter.is_none() {
        bail!("--format gguf-lora needs --adapter DIR (the PEFT adapter to export)");
    }
    if matches!(format, Format::Lora) && dtype == GgufDtype::Q8_0 {
        bail!("--dtype q8_0 with --format gguf-lora: an adapter is written as f32, f16 or bf16");
    }
    if a.output.exists() {
        bail!(
            "--output {} exists; remove it or pass another file (export never overwrites)",
            a.output.display()
        );
    }
    crate::data::check_writable_file(&a.output, "--output")?;
    let t = Instant::now();
    // An adapter alone reads only the base's config.json: fetch only that of a hub id.
    let model_arg = match format {
        Format::Lora => crate::hub::model_config(&a.model, &a.revision)?,
        Format::Model => crate::hub::model(&a.model, &a.revision)?,
    };
    let adapter = a.adapter.as_deref().map(crate::hub::adapter).transpose()?;
    let dir = qwen2::resolve_model_dir(&model_arg)
        .with_context(|| format!("--model {}", a.model.display()))?;
    // `general.name`: the last part of --model as given (`Qwen2.5-7B-Instruct` for a hub id, not
    // the cache's snapshot hash), else the directory's name.
    let name = a
        .model
        .file_name()
        .or_else(|| dir.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let out = match format {
        Format::Model => export_model(&a, adapter.as_deref(), &dir, &name, dtype)?,
        Format::Lora => export_lora(adapter.as_deref(), &dir, &name, dtype, &a.output)?,
    };
    let types: Vec<String> = out
        .types
        .iter()
        .map(|(t, n)| format!("{n} {t:?}"))
        .collect();
    outln!(
        "wrote {} ({:.1} MB, {} tensors: {}) in {:.1?}; peak memory {}",
        a.output.display(),
        out.report.file_bytes as f64 / 1e6,
        out.report.tensors,
        types.join(", "),
        t.elapsed(),
        crate::mem::peak_rss_kib()
            .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
            .unwrap_or_else(|_| "unknown".into())
    );
    Ok(())
}

/// The merged model, streamed: the checkpoint is read one tensor at a time and each adapted weight
/// is merged as it passes (`LoraLinear::merged_weight`, the fold `merge_all` does), so neither the
/// base nor the merged model is ever whole in memory.
fn export_model(
    a: &ExportArgs,
    adapter: Option<&Path>,
    dir: &Path,
    name: &str,
    dtype: GgufDtype,
) -> anyhow::Result<GgufExport> {
    let dev = Default::default();
    let ckpt = qwen2::CheckpointReader::open::<Flex>(dir, &dev)
        .with_context(|| format!("reading base model {}", dir.display()))?;
    // The tokenizer is checked before any weight is read: a wrong one fails in a second.
    let tok_dir = a.tokenizer.clone().unwrap_or_else(|| dir.to_path_buf());
    let tok_meta =
        qwen2::tokenizer_metadata(&tok_dir, &dir.join("config.json"), ckpt.config.vocab_size)
            .with_context(|| {
                format!(
                    "reading the tokenizer in {} for the GGUF file",
                    tok_dir.display()
                )
            })?;
    let mut with_adapter = match adapter {
        None => None,
        Some(adapter) => {
            let (m, lora) = lazy_with_adapter(&ckpt.config, dir, adapter)?;
            outln!(
                "merging the LoRA adapter {} (r {}, alpha {}) into {} as it is written",
                adapter.display(),
                lora.r,
                lora.lora_alpha,
                dir.display()
            );
            Some(m)
        }
    };
    qwen2::export_gguf(
        &ckpt,
        with_adapter.as_mut(),
        name,
        dtype,
        tok_meta,
        &a.output,
        &dev,
    )
    .map_err(|e| naming_output(e, &a.output))
}

/// The library's error, naming `--output` unless it already names the file (a `Write` error
/// reads `cannot write FILE: ...`), so that a refusal is one line.
fn naming_output(e: qwen2::Qwen2Error, output: &Path) -> anyhow::Error {
    match e {
        e @ qwen2::Qwen2Error::Write { .. } => e.into(),
        e => anyhow::Error::from(e).context(format!("writing --output {}", output.display())),
    }
}

/// A model built lazily from `cfg` (no base weight is read or allocated) with the adapter in
/// `adapter` attached; every adapter shape is checked against `cfg`.
fn lazy_with_adapter(
    cfg: &qwen2::Qwen2Config,
    dir: &Path,
    adapter: &Path,
) -> anyhow::Result<(qwen2::Qwen2ForCausalLM<Flex>, lora_core::LoraConfig)> {
    let model = qwen2::Qwen2ForCausalLM::<Flex>::new(cfg, &Default::default());
    let (model, lora, _) = lora_core::load_adapter(model, adapter).with_context(|| {
        format!(
            "loading adapter {} onto {}",
            adapter.display(),
            dir.display()
        )
    })?;
    // PiSSA/OLoRA factors apply to the base minus its initial principal part, which loading
    // recomputes from the base weights; this model has none (it is lazy), so both exports would
    // put the factors on the unchanged base.
    if let lora_core::InitLoraWeights::Named(init) = &lora.init_lora_weights {
        if lora.init_lora_weights.decomposes() {
            bail!(
                "--adapter {}: init_lora_weights {init:?} adapters apply to the residual of the \
                 base weights, which export does not compute; write the merged model with `cargo \
                 xtask merge` and export that directory (without --adapter)",
                adapter.display()
            );
        }
    }
    Ok((model, lora))
}

/// The adapter alone, checked against the base's config (a lazy model: no weights are read).
fn export_lora(
    adapter: Option<&Path>,
    dir: &Path,
    name: &str,
    dtype: GgufDtype,
    output: &Path,
) -> anyhow::Result<GgufExport> {
    let Some(adapter) = adapter else {
        bail!("--format gguf-lora needs --adapter DIR (the PEFT adapter to export)");
    };
    let cfg = qwen2::Qwen2Config::from_file(&dir.join("config.json"))?;
    let (mut model, lora) = lazy_with_adapter(&cfg, dir, adapter)?;
    // Modules trained in full and trained token rows replace base tensors outright: the merged
    // export writes them, but llama.cpp's adapter format has no place for them.
    let saved = lora.modules_to_save.as_ref().filter(|m| !m.is_empty());
    let tokens = lora
        .extra
        .get("trainable_token_indices")
        .filter(|v| !v.is_null());
    if saved.is_some() || tokens.is_some() {
        bail!(
            "--adapter {}: modules_to_save / trainable_token_indices replace whole base tensors, \
             which a GGUF LoRA adapter cannot carry; export the merged model instead (--format \
             gguf, the default)",
            adapter.display()
        );
    }
    let adapter_name = adapter
        .file_name()
        .map(|n| format!("{name}-{}", n.to_string_lossy()))
        .unwrap_or_else(|| name.to_string());
    qwen2::export_gguf_lora(&mut model, &adapter_name, lora.lora_alpha, dtype, output)
        .map_err(|e| naming_output(e, output))
}
