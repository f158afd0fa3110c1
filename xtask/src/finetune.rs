//! `cargo xtask finetune`: the tutorial's whole run: prepare the data, load the model, apply LoRA
//! (or start from an existing adapter), train, and write a PEFT adapter.
//!
//! Options come from, in increasing priority: the tutorial's recipe (defaults), `--config FILE`
//! (TOML or JSON, snake_case names), and command-line flags.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::DType;
use lora_core::{apply_lora, load_adapter, LoraConfig, ModuleSelector};
use lora_data::{ChatTokenizer, Collator, Format, PrepareOptions, Template};
use lora_trainer::{train, SchedulerType, TrainEvent, TrainingArguments};
use serde::{Deserialize, Serialize};

/// Everything `finetune` can be told, with the tutorial's values as defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinetuneOptions {
    /// Model directory (see `cargo xtask info`).
    pub model: Option<PathBuf>,
    /// Training data (alpaca / sharegpt / messages; JSON or JSONL).
    pub data: Option<PathBuf>,
    /// Tokenizer directory or tokenizer.json (default: the model directory).
    pub tokenizer: Option<PathBuf>,
    /// `seed` (the tutorial's process_func) or `qwen` (the chat template).
    pub template: String,
    /// System prompt for records without one.
    pub system: Option<String>,
    /// Tokens kept per record.
    pub max_length: usize,
    /// Force the input format.
    pub format: Option<String>,
    /// LoRA rank.
    pub lora_r: usize,
    /// LoRA alpha.
    pub lora_alpha: f64,
    /// LoRA dropout.
    pub lora_dropout: f64,
    /// Target modules: names, or `all-linear`.
    pub target_modules: Vec<String>,
    /// rsLoRA scaling.
    pub use_rslora: bool,
    /// Start from this PEFT adapter instead of a fresh one.
    pub init_adapter: Option<PathBuf>,
    /// `cpu` or `cuda[:N]`.
    pub device: String,
    /// The loop's options (transformers' names).
    #[serde(flatten)]
    pub training: TrainingArguments,
}

impl Default for FinetuneOptions {
    fn default() -> Self {
        Self {
            model: None,
            data: None,
            tokenizer: None,
            template: "seed".into(),
            system: Some(lora_data::SEED_DEFAULT_SYSTEM.into()),
            max_length: 384,
            format: None,
            lora_r: 8,
            lora_alpha: 32.0,
            lora_dropout: 0.1,
            target_modules: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec(),
            use_rslora: false,
            init_adapter: None,
            device: "cpu".into(),
            training: TrainingArguments::tutorial(PathBuf::from("output")),
        }
    }
}

/// Arguments of `finetune`: every option as a flag (unset flags leave the config file's value).
#[derive(clap::Args, Debug)]
pub struct FinetuneArgs {
    /// Model directory, hub cache entry or `Org/Name`.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training data file.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Output directory (checkpoints, metrics.jsonl, final adapter).
    #[arg(long)]
    output: Option<PathBuf>,
    /// TOML or JSON file with options in snake_case (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// seed | qwen
    #[arg(long)]
    template: Option<String>,
    #[arg(long)]
    system: Option<String>,
    #[arg(long)]
    max_length: Option<usize>,
    /// alpaca | sharegpt | messages
    #[arg(long)]
    format: Option<String>,
    #[arg(long)]
    lora_r: Option<usize>,
    #[arg(long)]
    lora_alpha: Option<f64>,
    #[arg(long)]
    lora_dropout: Option<f64>,
    /// Comma-separated module names, or `all-linear`.
    #[arg(long, value_delimiter = ',')]
    target_modules: Option<Vec<String>>,
    #[arg(long)]
    use_rslora: bool,
    #[arg(long)]
    init_adapter: Option<PathBuf>,
    /// cpu | cuda[:N]
    #[arg(long)]
    device: Option<String>,
    #[arg(long)]
    per_device_train_batch_size: Option<usize>,
    #[arg(long)]
    gradient_accumulation_steps: Option<usize>,
    #[arg(long)]
    learning_rate: Option<f64>,
    #[arg(long)]
    num_train_epochs: Option<f64>,
    #[arg(long)]
    max_steps: Option<usize>,
    /// linear | cosine | constant
    #[arg(long)]
    lr_scheduler_type: Option<String>,
    #[arg(long)]
    warmup_steps: Option<usize>,
    #[arg(long)]
    warmup_ratio: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    max_grad_norm: Option<f64>,
    #[arg(long)]
    logging_steps: Option<usize>,
    #[arg(long)]
    save_steps: Option<usize>,
    #[arg(long)]
    save_total_limit: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Keep the data order (no per-epoch shuffle).
    #[arg(long)]
    no_shuffle: bool,
    /// true | false
    #[arg(long)]
    gradient_checkpointing: Option<bool>,
    /// A checkpoint directory, or `latest`.
    #[arg(long)]
    resume_from_checkpoint: Option<String>,
}

impl FinetuneArgs {
    /// Defaults, then the config file, then flags.
    pub fn resolve(self) -> anyhow::Result<FinetuneOptions> {
        let mut o = match &self.config {
            None => FinetuneOptions::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading config {}", p.display()))?;
                let is_toml = p.extension().is_some_and(|e| e == "toml");
                if is_toml {
                    toml::from_str(&text)
                        .with_context(|| format!("{}: invalid TOML config", p.display()))?
                } else {
                    serde_json::from_str(&text)
                        .with_context(|| format!("{}: invalid JSON config", p.display()))?
                }
            }
        };
        macro_rules! set {
            ($($src:ident => $dst:expr),* $(,)?) => { $( if let Some(v) = self.$src { $dst = v; } )* };
        }
        macro_rules! set_opt {
            ($($src:ident => $dst:expr),* $(,)?) => { $( if let Some(v) = self.$src { $dst = Some(v); } )* };
        }
        set_opt!(model => o.model, data => o.data, tokenizer => o.tokenizer, system => o.system,
            format => o.format, init_adapter => o.init_adapter, max_steps => o.training.max_steps,
            save_total_limit => o.training.save_total_limit,
            resume_from_checkpoint => o.training.resume_from_checkpoint);
        set!(output => o.training.output_dir, template => o.template, max_length => o.max_length,
            lora_r => o.lora_r, lora_alpha => o.lora_alpha, lora_dropout => o.lora_dropout,
            target_modules => o.target_modules, device => o.device,
            per_device_train_batch_size => o.training.per_device_train_batch_size,
            gradient_accumulation_steps => o.training.gradient_accumulation_steps,
            learning_rate => o.training.learning_rate, num_train_epochs => o.training.num_train_epochs,
            warmup_steps => o.training.warmup_steps, warmup_ratio => o.training.warmup_ratio,
            weight_decay => o.training.weight_decay, max_grad_norm => o.training.max_grad_norm,
            logging_steps => o.training.logging_steps, save_steps => o.training.save_steps,
            seed => o.training.seed, gradient_checkpointing => o.training.gradient_checkpointing);
        if let Some(s) = self.lr_scheduler_type {
            o.training.lr_scheduler_type = match s.as_str() {
                "linear" => SchedulerType::Linear,
                "cosine" => SchedulerType::Cosine,
                "constant" => SchedulerType::Constant,
                _ => bail!("--lr-scheduler-type {s:?}: use linear, cosine or constant"),
            };
        }
        if self.use_rslora {
            o.use_rslora = true;
        }
        if self.no_shuffle {
            o.training.shuffle = false;
        }
        Ok(o)
    }
}

impl FinetuneOptions {
    /// The LoRA config these options describe.
    pub fn lora_config(&self) -> LoraConfig {
        let targets = if self.target_modules.len() == 1 && self.target_modules[0] == "all-linear" {
            ModuleSelector::Regex("all-linear".into())
        } else {
            ModuleSelector::List(self.target_modules.clone())
        };
        LoraConfig {
            r: self.lora_r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules: Some(targets),
            use_rslora: self.use_rslora,
            base_model_name_or_path: self.model.as_ref().map(|p| p.display().to_string()),
            ..LoraConfig::tutorial()
        }
    }
}

pub fn run(a: FinetuneArgs) -> anyhow::Result<()> {
    let o = a.resolve()?;
    o.training.validate()?;
    match o.device.as_str() {
        "cpu" => run_on::<burn::backend::Autodiff<burn::backend::Flex>>(&o, &Default::default()),
        d if d == "cuda" || d.starts_with("cuda:") => run_cuda(&o, d),
        d => bail!("--device {d:?}: use cpu or cuda[:N]"),
    }
}

#[cfg(feature = "cuda")]
fn run_cuda(o: &FinetuneOptions, d: &str) -> anyhow::Result<()> {
    let index: usize = d
        .strip_prefix("cuda:")
        .map(str::parse)
        .transpose()
        .context("--device cuda:N")?
        .unwrap_or(0);
    let device = burn::backend::cuda::CudaDevice::new(index);
    run_on::<burn::backend::Autodiff<burn::backend::Cuda>>(o, &device)
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: &FinetuneOptions, d: &str) -> anyhow::Result<()> {
    bail!("--device {d}: this build has no CUDA support; rebuild with `--features cuda` (needs the CUDA toolkit)")
}

fn tokenizer_path(o: &FinetuneOptions, model_dir: &Path) -> PathBuf {
    o.tokenizer
        .clone()
        .unwrap_or_else(|| model_dir.to_path_buf())
}

fn run_on<B: AutodiffBackend>(o: &FinetuneOptions, device: &B::Device) -> anyhow::Result<()> {
    o.training.validate()?;
    let Some(model_arg) = &o.model else {
        bail!("--model DIR is required (a directory with config.json, *.safetensors and tokenizer.json)");
    };
    let Some(data) = &o.data else {
        bail!("--data FILE is required (alpaca / sharegpt / messages, JSON or JSONL)");
    };
    let model_dir = qwen2::resolve_model_dir(model_arg)?;
    let template = match o.template.as_str() {
        "seed" => Template::Seed,
        "qwen" => Template::Qwen,
        t => bail!("--template {t:?}: use seed or qwen"),
    };
    let format = match o.format.as_deref() {
        None => None,
        Some("alpaca") => Some(Format::Alpaca),
        Some("sharegpt") => Some(Format::ShareGpt),
        Some("messages") => Some(Format::Messages),
        Some(f) => bail!("--format {f:?}: use alpaca, sharegpt or messages"),
    };
    if o.training.gradient_checkpointing {
        eprintln!(
            "note: gradient_checkpointing is not implemented yet; training keeps all activations \
             (pass --gradient-checkpointing false to silence this)"
        );
    }

    // Data.
    let ds = lora_data::load_dataset(data, format)?;
    let tok = ChatTokenizer::load(&tokenizer_path(o, &model_dir))?;
    let opts = PrepareOptions {
        template,
        system: o.system.clone(),
        max_length: o.max_length,
    };
    let prepared = lora_data::prepare(&ds.conversations, &tok, &opts)?;
    println!("{}", prepared.summary);

    // Model and adapter.
    let t = Instant::now();
    let loaded = qwen2::load_model::<B>(&model_dir, DType::F32, device)?;
    println!("loaded {} in {:.1?}", model_dir.display(), t.elapsed());
    B::seed(device, o.training.seed);
    let (model, lora_cfg, report) = match &o.init_adapter {
        Some(dir) => load_adapter(loaded.model, dir)
            .with_context(|| format!("--init-adapter {}", dir.display()))?,
        None => {
            let cfg = o.lora_config();
            let (m, r) = apply_lora(loaded.model, &cfg)?;
            (m, cfg, r)
        }
    };
    println!("{report}");

    // Train.
    let started = Instant::now();
    let collator = Collator::new(tok.pad_token_id);
    let mut on_event = |e: &TrainEvent| {
        match e {
            TrainEvent::Start { step, total } => println!("training: step {step} of {total}"),
            TrainEvent::Log(l) => println!(
                "{{\"step\": {}, \"epoch\": {:.3}, \"loss\": {:.4}, \"grad_norm\": {:.4}, \"learning_rate\": {:.3e}, \"tokens_per_s\": {:.1}}}",
                l.step, l.epoch, l.loss, l.grad_norm, l.learning_rate, l.tokens_per_s
            ),
            TrainEvent::Saved(p) => println!("saved {}", p.display()),
            TrainEvent::Step { .. } => {}
        }
        true
    };
    let (_, outcome) = train(
        model,
        &lora_cfg,
        &prepared.examples,
        collator,
        &o.training,
        device,
        &mut on_event,
    )?;
    println!(
        "done: {} steps in {:.1?}; adapter written to {} (adapter_model.safetensors, adapter_config.json)",
        outcome.state.global_step,
        started.elapsed(),
        outcome.adapter_dir.display()
    );
    Ok(())
}
