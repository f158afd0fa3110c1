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
use lora_data::{ChatTokenizer, Collator, Example, Format, PrepareOptions, Template};
use lora_trainer::{train, SchedulerType, TrainEvent, TrainingArguments};
use serde::{Deserialize, Serialize};

/// Everything `finetune` can be told, with the tutorial's values as defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
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
    /// Evaluation data (same formats as `data`).
    pub eval_data: Option<PathBuf>,
    /// Hold out this fraction of `data` for evaluation instead (seeded shuffle).
    pub eval_split: Option<f64>,
    /// `cpu` or `cuda[:N]`.
    pub device: String,
    /// Padding-free batches: each step's examples back to back in one row, attending only within
    /// themselves (the same losses and gradients as padded rows, without computing padding).
    /// Unset: on for the CPU; off for CUDA, where every new sequence length costs Burn a kernel
    /// compilation (measured: the demo ran at 5–21k tokens/s packed against 46–56k padded).
    pub padding_free: Option<bool>,
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
            target_modules: lora_trainer::recipe::TUTORIAL_TARGETS
                .map(String::from)
                .to_vec(),
            use_rslora: false,
            init_adapter: None,
            eval_data: None,
            eval_split: None,
            device: "cpu".into(),
            padding_free: None,
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
    /// Evaluation data file.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Hold out this fraction of --data for evaluation.
    #[arg(long)]
    eval_split: Option<f64>,
    /// Evaluate every N steps (and at the end).
    #[arg(long)]
    eval_steps: Option<usize>,
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
    /// true | false: examples back to back in one row instead of padded rows (default: true on
    /// the CPU, false on CUDA)
    #[arg(long)]
    padding_free: Option<bool>,
    /// A checkpoint directory, or `latest`.
    #[arg(long)]
    resume_from_checkpoint: Option<String>,
}

impl FinetuneArgs {
    /// Defaults, then the config file, then flags.
    pub fn resolve(self) -> anyhow::Result<FinetuneOptions> {
        let demo = self.model.is_none() && self.data.is_none() && self.config.is_none();
        let mut o = match &self.config {
            None if demo => crate::demo::defaults(),
            None => FinetuneOptions::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading config {}", p.display()))?;
                let is_toml = p.extension().is_some_and(|e| e == "toml");
                let value: serde_json::Value = if is_toml {
                    toml::from_str(&text)
                        .with_context(|| format!("{}: invalid TOML config", p.display()))?
                } else {
                    serde_json::from_str(&text)
                        .with_context(|| format!("{}: invalid JSON config", p.display()))?
                };
                // serde cannot deny unknown fields across a flatten; check the names here so a
                // misspelt option is an error, not silently ignored.
                let known = serde_json::to_value(FinetuneOptions::default())?;
                if let (Some(given), Some(known)) = (value.as_object(), known.as_object()) {
                    let unknown: Vec<&String> =
                        given.keys().filter(|k| !known.contains_key(*k)).collect();
                    if !unknown.is_empty() {
                        bail!(
                            "{}: unknown option(s) {unknown:?}; options use the flag names in snake_case \
                             (e.g. learning_rate, per_device_train_batch_size, lora_r)",
                            p.display()
                        );
                    }
                }
                serde_json::from_value(value)
                    .with_context(|| format!("{}: invalid option value", p.display()))?
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
            eval_data => o.eval_data, eval_split => o.eval_split, eval_steps => o.training.eval_steps,
            save_total_limit => o.training.save_total_limit,
            resume_from_checkpoint => o.training.resume_from_checkpoint,
            padding_free => o.padding_free);
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
            ..lora_trainer::recipe::lora_config()
        }
    }
}

pub fn run(a: FinetuneArgs) -> anyhow::Result<()> {
    let o = a.resolve()?;
    o.training.validate()?;
    if o.model.is_none() && o.data.is_none() {
        return crate::demo::run(o);
    }
    let spec = o.device.clone();
    crate::on_device!(&spec,
        cpu => run_on::<burn::backend::Autodiff<burn::backend::Flex>>(&o, &Default::default()),
        cuda(dev) => run_on::<burn::backend::Autodiff<burn::backend::Cuda>>(&o, &dev),
    )
}

/// How to turn a data file into examples (shared by `finetune` and `eval`).
pub struct DataSpec<'a> {
    pub tokenizer: &'a Path,
    pub template: &'a str,
    pub system: Option<String>,
    pub max_length: usize,
    pub format: Option<&'a str>,
}

/// Loads, templates and tokenizes a data file; prints its summary under `label` (stderr).
pub fn prepare_file(
    file: &Path,
    spec: &DataSpec,
    label: &str,
) -> anyhow::Result<(lora_data::Prepared, ChatTokenizer)> {
    // lora-data's own parsers: the same names and messages as `cargo xtask prepare`.
    let template: Template = spec.template.parse()?;
    let format: Option<Format> = spec.format.map(str::parse).transpose()?;
    let ds = lora_data::load_dataset(file, format)?;
    let tok = ChatTokenizer::load(spec.tokenizer)?;
    let opts = PrepareOptions {
        template,
        system: spec.system.clone(),
        max_length: spec.max_length,
    };
    let prepared = lora_data::prepare(&ds.conversations, &tok, &opts)?;
    eprintln!("{label}: {}", prepared.summary);
    Ok((prepared, tok))
}

/// Splits off `ratio` of the examples (a seeded shuffle) for evaluation, keeping input order.
fn split(
    examples: Vec<Example>,
    ratio: f64,
    seed: u64,
) -> anyhow::Result<(Vec<Example>, Vec<Example>)> {
    if !(ratio > 0.0 && ratio < 1.0) {
        bail!("--eval-split {ratio}: use a fraction in (0, 1)");
    }
    let n = examples.len();
    let n_eval = ((n as f64) * ratio).ceil() as usize;
    if n_eval == 0 || n_eval >= n {
        bail!("--eval-split {ratio} leaves no training or no eval example of {n}");
    }
    let mut order: Vec<usize> = (0..n).collect();
    let mut s = seed ^ 0x5DEE_CE66_D1CE_4E5B;
    for i in (1..n).rev() {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        order.swap(i, ((s >> 33) % (i as u64 + 1)) as usize);
    }
    let eval_idx: std::collections::HashSet<usize> = order[n - n_eval..].iter().copied().collect();
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (i, e) in examples.into_iter().enumerate() {
        if eval_idx.contains(&i) {
            eval.push(e);
        } else {
            train.push(e);
        }
    }
    Ok((train, eval))
}

pub fn run_on<B: AutodiffBackend>(o: &FinetuneOptions, device: &B::Device) -> anyhow::Result<()> {
    o.training.validate()?;
    let Some(model_arg) = &o.model else {
        bail!("--model DIR is required (a directory with config.json, *.safetensors and tokenizer.json)");
    };
    let Some(data) = &o.data else {
        bail!("--data FILE is required (alpaca / sharegpt / messages, JSON or JSONL)");
    };
    let model_dir = qwen2::resolve_model_dir(model_arg)?;
    // Fail on a bad config.json before spending time on the data.
    qwen2::Qwen2Config::from_file(&model_dir.join("config.json"))?;

    // Data.
    let tok_path = o.tokenizer.clone().unwrap_or_else(|| model_dir.clone());
    let spec = DataSpec {
        tokenizer: &tok_path,
        template: &o.template,
        system: o.system.clone(),
        max_length: o.max_length,
        format: o.format.as_deref(),
    };
    let (prepared, tok) = prepare_file(data, &spec, "train data")?;
    let (train_ex, eval_ex) = match (&o.eval_data, o.eval_split) {
        (Some(_), Some(_)) => bail!("give --eval-data or --eval-split, not both"),
        (Some(f), None) => (
            prepared.examples,
            prepare_file(f, &spec, "eval data")?.0.examples,
        ),
        (None, Some(r)) => split(prepared.examples, r, o.training.seed)?,
        (None, None) => (prepared.examples, Vec::new()),
    };

    // Model and adapter.
    let t = Instant::now();
    // CPU: f32 throughout. GPU: bf16 base weights, f32 adapters and optimizer state.
    let dtype = if o.device == "cpu" {
        DType::F32
    } else {
        DType::BF16
    };
    let loaded = qwen2::load_model::<B>(&model_dir, dtype, device)?;
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

    // Train. Log lines go to stdout (one JSON object each); the progress bar to stderr.
    let started = Instant::now();
    let padding_free = o.padding_free.unwrap_or(o.device == "cpu");
    let collator = Collator::new(tok.pad_token_id).with_padding_free(padding_free);
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    let mut tok_s = 0.0;
    let mut on_event = |e: &TrainEvent| {
        match e {
            TrainEvent::Start { step, total } => {
                bar.set_length(*total as u64);
                bar.set_position(*step as u64);
                bar.reset_eta();
            }
            TrainEvent::Step { loss, lr, .. } => {
                bar.inc(1);
                bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {tok_s:.0} tok/s"));
            }
            TrainEvent::Log(l) => {
                tok_s = l.tokens_per_s;
                bar.suspend(|| println!("{}", serde_json::to_string(l).expect("serializes")));
            }
            TrainEvent::Eval(x) => {
                bar.suspend(|| println!("{}", serde_json::to_string(x).expect("serializes")))
            }
            TrainEvent::Saved(p) => bar.suspend(|| eprintln!("saved {}", p.display())),
            TrainEvent::Resumed { checkpoint, step } => {
                bar.suspend(|| eprintln!("resuming from {} (step {step})", checkpoint.display()))
            }
        }
        true
    };
    let (_, outcome) = train(
        model,
        &lora_cfg,
        &train_ex,
        &eval_ex,
        collator,
        &o.training,
        device,
        &mut on_event,
    )?;
    bar.finish_and_clear();
    println!(
        "done: {} steps in {:.1?}; adapter written to {} (adapter_model.safetensors, adapter_config.json; metrics.jsonl, loss.svg)",
        outcome.state.global_step,
        started.elapsed(),
        outcome.adapter_dir.display()
    );
    Ok(())
}
