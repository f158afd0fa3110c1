//! `cargo xtask eval`: the mean causal-LM loss (and perplexity) of a model, with or without an
//! adapter, over every supervised token of a data file, on the inference path. Prints one JSON line.

use std::path::PathBuf;

use anyhow::{bail, Context};
use burn::tensor::DType;
use lora_trainer::{evaluate, CausalLm};

use crate::data::DataSpec;

/// Arguments of `eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Model directory, hub cache entry or hub id (`Org/Name`, `modelscope:Org/Name`; downloaded
    /// when not cached).
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    revision: crate::hub::RevisionArg,
    #[command(flatten)]
    quant: crate::quant::QuantArgs,
    /// A PEFT adapter to apply: a directory or a hub id.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Data file (alpaca / sharegpt / messages; JSON or JSONL).
    #[arg(long)]
    data: PathBuf,
    /// Tokenizer directory or tokenizer.json (default: the model directory).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// seed | qwen
    #[arg(long, default_value = "seed")]
    template: String,
    /// System prompt for records without one (default: the template's).
    #[arg(long)]
    system: Option<String>,
    /// Tokens kept per record; longer records are cut to the first N.
    #[arg(long, default_value_t = 384, allow_negative_numbers = true)]
    max_length: usize,
    /// alpaca | sharegpt | messages
    #[arg(long)]
    format: Option<String>,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 4, allow_negative_numbers = true)]
    batch_size: usize,
    /// cpu (cuda: not yet for eval)
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    if a.device != "cpu" {
        bail!("--device {}: eval runs on cpu in this version", a.device);
    }
    if a.batch_size == 0 {
        bail!("--batch-size 0: use at least 1");
    }
    type B = burn::backend::Flex;
    let dev = Default::default();
    let model_dir = qwen2::resolve_model_dir(&crate::hub::model(&a.model, &a.revision)?)?;
    let tok = a.tokenizer.clone().unwrap_or_else(|| model_dir.clone());
    let spec = DataSpec {
        tokenizer: &tok,
        template: &a.template,
        system: a.system.clone(),
        max_length: a.max_length,
        format: a.format.as_deref(),
        padding_free: false,
        lint_model: None,
    };
    let data = crate::data::load(&a.data, &spec, "eval data")?;
    // Scoring nothing is not a loss of 0 (perplexity 1): refuse, as finetune does.
    if data.examples.is_empty() {
        return Err(crate::data::none_used(&a.data, &data.summary));
    }
    let mut model = a.quant.load::<B>(&model_dir, DType::F32, &dev)?.model;
    if let Some(arg) = &a.adapter {
        let dir = crate::hub::adapter(arg)?;
        model = lora_core::load_adapter(model, &dir)
            .with_context(|| format!("--adapter {}", dir.display()))?
            .0;
    }
    let r = evaluate(
        |b| model.loss_sum(b),
        &data.examples,
        &data.collator,
        a.batch_size,
        &dev,
    );
    outln!("{}", serde_json::to_string(&r)?);
    Ok(())
}
