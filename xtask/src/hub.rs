//! `--model` / `--adapter` by name: a Hugging Face id (`Qwen/Qwen2.5-7B-Instruct`) or a ModelScope
//! id (`modelscope:qwen/Qwen2.5-7B-Instruct`) is fetched into the Python caches when missing (see
//! `lora-hub`); a local path is used as it is. And `cargo xtask download`, which only fetches.

use std::path::{Path, PathBuf};

use lora_hub::Kind;

/// The revision flag every command that takes `--model` has.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct RevisionArg {
    /// Branch, tag or commit of a `--model` hub id [default: main on the Hugging Face hub, master
    /// on ModelScope].
    #[arg(long)]
    pub revision: Option<String>,
}

/// The local directory of `--model`, fetched when it is a hub id not yet in the cache.
pub fn model(arg: &Path, revision: &RevisionArg) -> anyhow::Result<PathBuf> {
    Ok(lora_hub::fetch(
        arg,
        Kind::Model,
        revision.revision.as_deref(),
    )?)
}

/// The local directory of `--model` when only its `config.json` is read (a hub id fetches only it).
pub fn model_config(arg: &Path, revision: &RevisionArg) -> anyhow::Result<PathBuf> {
    Ok(lora_hub::fetch(
        arg,
        Kind::Config,
        revision.revision.as_deref(),
    )?)
}

/// The local directory of `--adapter` (always the default branch of a hub id).
pub fn adapter(arg: &Path) -> anyhow::Result<PathBuf> {
    Ok(lora_hub::fetch(arg, Kind::Adapter, None)?)
}

/// Arguments of `download`.
#[derive(clap::Args)]
pub struct DownloadArgs {
    /// `Org/Name` on the Hugging Face hub, or `modelscope:Org/Name`.
    pub id: PathBuf,
    /// The repository is a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: bool,
    #[command(flatten)]
    pub revision: RevisionArg,
}

pub fn download(a: DownloadArgs) -> anyhow::Result<()> {
    if !matches!(
        lora_hub::Source::parse(&a.id),
        lora_hub::Source::HuggingFace(_) | lora_hub::Source::ModelScope(_)
    ) {
        anyhow::bail!(
            "{}: not a hub id; pass Org/Name (Hugging Face hub) or modelscope:Org/Name",
            a.id.display()
        );
    }
    let kind = if a.adapter {
        Kind::Adapter
    } else {
        Kind::Model
    };
    let dir = lora_hub::fetch(&a.id, kind, a.revision.revision.as_deref())?;
    outln!("{}", dir.display());
    Ok(())
}
