//! `cargo xtask info --model DIR`: resolve, validate and load a model; print what was found.
//! `cargo xtask info --adapter DIR`: the adapter's config and the manifest of the run that made it
//! (`run.json`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use burn::tensor::DType;

/// Arguments of `info`.
#[derive(clap::Args)]
pub struct InfoArgs {
    /// Model directory (config.json + safetensors), hub cache entry, or hub id (`Org/Name`,
    /// `modelscope:Org/Name`; downloaded when not cached).
    #[arg(long, required_unless_present = "adapter")]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub revision: crate::hub::RevisionArg,
    #[command(flatten)]
    pub quant: crate::quant::QuantArgs,
    /// A PEFT adapter directory (or hub id): print its adapter_config.json and the run.json of the
    /// fine-tune that wrote it.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Only read config.json; do not load weights.
    #[arg(long)]
    pub config_only: bool,
}

pub fn run(a: InfoArgs) -> anyhow::Result<()> {
    if let Some(arg) = &a.adapter {
        adapter(arg)?;
    }
    let Some(model) = &a.model else {
        return Ok(());
    };
    let dir = qwen2::resolve_model_dir(&crate::hub::model(model, &a.revision)?)?;
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
    let q = a.quant.load4bit()?;
    if let Some(q) = &q {
        let (four, rest) = crate::quant::footprint(&cfg, q);
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        outln!(
            "4-bit footprint ({}{}, compute {:?}): {:.2} GiB = {:.2} GiB of 4-bit projections + {:.2} GiB \
             of embeddings, norms, biases and head (from config.json)",
            q.quant_type.name(),
            if q.double_quant { ", double quant" } else { "" },
            q.compute_dtype,
            gib(four + rest),
            gib(four),
            gib(rest)
        );
    }
    if a.config_only {
        return Ok(());
    }
    let t = Instant::now();
    let loaded =
        crate::quant::load::<burn::backend::Flex>(q, &dir, DType::F32, &Default::default())?;
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

/// Prints an adapter's config and its run manifest.
fn adapter(arg: &std::path::Path) -> anyhow::Result<()> {
    let dir = crate::hub::adapter(arg)?;
    let cfg_path = dir.join("adapter_config.json");
    let cfg = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("--adapter {}: reading adapter_config.json", arg.display()))?;
    let cfg: serde_json::Value =
        serde_json::from_str(&cfg).with_context(|| format!("{}: not JSON", cfg_path.display()))?;
    outln!("adapter dir: {}", dir.display());
    // The variants, when on (PEFT's names and values): use_rslora true, use_dora true, lora_bias
    // true, init_lora_weights "pissa".
    let variants: String = [
        ("use_rslora", serde_json::json!(true)),
        ("use_dora", serde_json::json!(true)),
        ("lora_bias", serde_json::json!(true)),
    ]
    .into_iter()
    .filter(|(k, on)| cfg[*k] == *on)
    .map(|(k, on)| format!(" {k} {on}"))
    .chain(
        Some(&cfg["init_lora_weights"])
            .filter(|v| !v.is_null() && **v != serde_json::json!(true))
            .map(|v| format!(" init_lora_weights {v}")),
    )
    .collect();
    outln!(
        "r {} alpha {} dropout {} targets {} base {}{variants}",
        cfg["r"],
        cfg["lora_alpha"],
        cfg["lora_dropout"],
        cfg["target_modules"],
        cfg["base_model_name_or_path"]
    );
    match crate::manifest::read(&dir)? {
        Some(m) => outln!("{}", serde_json::to_string_pretty(&m)?),
        None => outln!(
            "no {} (not written by `cargo xtask finetune`, or by a version before it wrote one)",
            crate::manifest::FILE
        ),
    }
    Ok(())
}
