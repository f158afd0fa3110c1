//! `cargo xtask merge --model DIR --adapter DIR --output DIR`: PEFT's `merge_and_unload()` +
//! `save_pretrained(max_shard_size=...)`: fold a LoRA adapter into the base weights and write a plain
//! Hugging Face model directory that transformers (and `cargo xtask chat`) load without PEFT.
//!
//! The weights are merged in f32 and stored in the base checkpoint's dtype (bf16 stays bf16), which
//! is what PEFT computes on CPU: `W += scaling·B·A` with W promoted to the f32 delta, rounded once.
//! `config.json` and `generation_config.json` are copied verbatim, with the tokenizer files.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use burn::backend::Flex;
use burn::tensor::DType;

/// Arguments of `merge`.
#[derive(clap::Args)]
pub struct MergeArgs {
    /// Base model directory (config.json + safetensors), hub cache entry, or hub id (`Org/Name`,
    /// `modelscope:Org/Name`; downloaded when not cached).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub revision: crate::hub::RevisionArg,
    /// PEFT LoRA adapter: a directory (adapter_config.json + adapter_model.safetensors) or a hub id.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where to write the merged model; must not exist or be empty.
    #[arg(long)]
    pub output: PathBuf,
    /// Largest shard: bytes, or with a unit (KB/MB/GB = powers of 1000, KiB/MiB/GiB), as
    /// transformers' `max_shard_size`. One shard is written as model.safetensors without an index.
    // A leading `-` reaches the size check (which names the flag), not clap's "unexpected argument".
    #[arg(long, default_value = "5GB", allow_hyphen_values = true)]
    pub max_shard_size: String,
    /// Directory whose tokenizer files are copied (default: the model directory).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

/// Files copied next to the weights when the source has them.
const COPIED: [&str; 9] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
];

pub fn run(a: MergeArgs) -> anyhow::Result<()> {
    let max_shard = qwen2::parse_size(&a.max_shard_size).with_context(|| {
        format!(
            "--max-shard-size {:?}: expected bytes or a size such as 5GB, 500MB, 20KB",
            a.max_shard_size
        )
    })?;
    check_output(&a.output)?;
    let t = Instant::now();
    let dev = Default::default();
    let model_arg = crate::hub::model(&a.model, &a.revision)?;
    let adapter = crate::hub::adapter(&a.adapter)?;
    let loaded = qwen2::load_model::<Flex>(&model_arg, DType::F32, &dev)
        .with_context(|| format!("loading base model {}", a.model.display()))?;
    let dir = loaded.dir.clone();
    let dtype = storage_dtype(&loaded.report.file_dtypes, &loaded.config)?;
    let (mut model, lora, _) =
        lora_core::load_adapter(loaded.model, &adapter).with_context(|| {
            format!(
                "loading adapter {} onto {}",
                adapter.display(),
                dir.display()
            )
        })?;
    let merged = lora_core::merge_all(&mut model).context("merging the adapter")?;
    outln!(
        "merged {merged} LoRA modules (r {}, alpha {}) of {} into {} weights",
        lora.r,
        lora.lora_alpha,
        adapter.display(),
        dir.display()
    );
    let out = qwen2::export_weights(&model, &a.output, dtype, max_shard)
        .with_context(|| format!("writing {}", a.output.display()))?;
    std::fs::copy(dir.join("config.json"), a.output.join("config.json"))
        .with_context(|| format!("copying config.json to {}", a.output.display()))?;
    let tok_dir = a.tokenizer.clone().unwrap_or_else(|| dir.clone());
    let mut copied = Vec::new();
    for name in COPIED {
        let src = if name == "generation_config.json" {
            dir.join(name)
        } else {
            tok_dir.join(name)
        };
        if src.is_file() {
            std::fs::copy(&src, a.output.join(name))
                .with_context(|| format!("copying {} to {}", src.display(), a.output.display()))?;
            copied.push(name);
        }
    }
    outln!(
        "wrote {} tensors ({:.1} MB, {dtype:?}) in {} file(s){} to {} in {:.1?}",
        out.tensors,
        out.total_size as f64 / 1e6,
        out.files.len(),
        if out.index.is_some() {
            " + model.safetensors.index.json"
        } else {
            ""
        },
        a.output.display(),
        t.elapsed()
    );
    if copied.contains(&"tokenizer.json") {
        outln!("copied: config.json, {}", copied.join(", "));
    } else {
        outln!(
            "copied: config.json{}{}; note: {} has no tokenizer.json (pass --tokenizer DIR to copy one)",
            if copied.is_empty() { "" } else { ", " },
            copied.join(", "),
            tok_dir.display()
        );
    }
    Ok(())
}

/// The output must be new (or an empty directory): merging never overwrites a model.
fn check_output(out: &Path) -> anyhow::Result<()> {
    if out.is_file() {
        bail!("--output {} is a file; pass a new directory", out.display());
    }
    if out.is_dir() {
        let mut entries = std::fs::read_dir(out)
            .with_context(|| format!("reading --output {}", out.display()))?;
        if entries.next().is_some() {
            bail!(
                "--output {} exists and is not empty; pass a new directory (merge never overwrites)",
                out.display()
            );
        }
    }
    // Writability too, before the model is loaded and merged.
    crate::data::check_writable_dir(out, "--output")
}

/// The dtype the base checkpoint is stored in: the files' one float dtype, else config.json's.
fn storage_dtype(file_dtypes: &[String], cfg: &qwen2::Qwen2Config) -> anyhow::Result<DType> {
    let from_name = |s: &str| match s {
        "F32" | "float32" => Some(DType::F32),
        "BF16" | "bfloat16" => Some(DType::BF16),
        "F16" | "float16" => Some(DType::F16),
        _ => None,
    };
    if let [one] = file_dtypes {
        if let Some(d) = from_name(one) {
            return Ok(d);
        }
    }
    let named = cfg.dtype.as_deref().or(cfg.torch_dtype.as_deref());
    match named.and_then(from_name) {
        Some(d) => Ok(d),
        None => bail!(
            "the checkpoint mixes dtypes {file_dtypes:?} and config.json names none of float32, \
             bfloat16, float16; cannot tell which dtype to write"
        ),
    }
}
