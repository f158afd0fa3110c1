//! `cargo xtask finetune`: the tutorial's whole run: prepare the data, load the model, apply LoRA
//! (or start from an existing adapter), train, and write a PEFT adapter.
//!
//! Options come from, in increasing priority: the caller's defaults (the tutorial's recipe for a
//! real run), `--config FILE` (TOML or JSON) and command-line flags. [`OptionFlags`] lists every
//! option once: its field `max_length` is both the flag `--max-length` and the config key
//! `max_length`. Each layer is a JSON object of options laid over the one below, and the result is
//! deserialized once into [`FinetuneOptions`], so a key the file leaves out keeps the default.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::DType;
use lora_core::{apply_lora, load_adapter, InitLoraWeights, LoraConfig, ModuleSelector};
use lora_data::Example;
use lora_trainer::{train, SchedulerType, TrainEvent, TrainingArguments};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::data::DataSpec;

/// Everything `finetune` can be told, resolved; `Default` is the tutorial's recipe.
// No `#[serde(default)]`: options are only ever deserialized from a complete object (the defaults'
// layer included), so no value can fall back to a default other than the recipe's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneOptions {
    /// Model directory (see `cargo xtask info`) or hub id.
    pub model: Option<PathBuf>,
    /// Branch, tag or commit of a hub id `model`.
    pub revision: Option<String>,
    /// Training data (alpaca / sharegpt / messages; JSON or JSONL).
    pub data: Option<PathBuf>,
    /// Tokenizer directory or tokenizer.json (default: the model directory).
    pub tokenizer: Option<PathBuf>,
    /// `seed` (the tutorial's process_func) or `qwen` (the chat template).
    pub template: String,
    /// System prompt for records without one (`None`: the template's own, as in every command).
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
    /// DoRA (PEFT's `use_dora`): a trained magnitude per output row.
    pub use_dora: bool,
    /// PEFT's `lora_bias`: a trained bias on every `lora_B`.
    pub lora_bias: bool,
    /// PEFT's `init_lora_weights`: `true`, `false`, `"gaussian"`, `"pissa"`, `"pissa_niter_N"` or
    /// `"olora"`.
    pub init_lora_weights: InitLoraWeights,
    /// PEFT's `modules_to_save`: modules trained in full (e.g. `lm_head`, `embed_tokens`).
    pub modules_to_save: Vec<String>,
    /// PEFT's `trainable_token_indices`: token ids whose embedding rows train.
    pub trainable_token_indices: Vec<usize>,
    /// Start from this PEFT adapter instead of a fresh one.
    pub init_adapter: Option<PathBuf>,
    /// Evaluation data (same formats as `data`).
    pub eval_data: Option<PathBuf>,
    /// Hold out this fraction of `data` for evaluation instead (seeded shuffle).
    pub eval_split: Option<f64>,
    /// `cpu` or `cuda[:N]`.
    pub device: String,
    /// Data parallelism over these devices, one worker thread each (`cuda:0,cuda:1`; a device may
    /// repeat: two workers on one card). Empty: `device` (with `world_size` workers on it).
    pub devices: Vec<String>,
    /// Padding-free batches: each step's examples back to back in one row, attending only within
    /// themselves (the same losses and gradients as padded rows, without computing padding).
    /// Unset: on for the CPU; off for CUDA, where every new sequence length costs Burn a kernel
    /// compilation (measured: the demo ran at 5–21k tokens/s packed against 46–56k padded).
    pub padding_free: Option<bool>,
    /// bf16 base weights and compute (transformers' `bf16`). Unset: on for CUDA, off for the CPU,
    /// whose backend computes in f32 only (`true` there is refused).
    pub bf16: Option<bool>,
    /// The data checks before the run (`docs/checks.md`): `error` stops on a problem, `warn` only
    /// says it.
    pub lint: String,
    /// Warn once if the loss has not fallen 1% below its first logged value after this many steps
    /// (0: never).
    pub not_learning_steps: usize,
    /// Stop after the checks and the memory plan, before loading the model.
    pub dry_run: bool,
    /// The memory the run may use (`12GB`, `500MiB`); default: the available RAM on the CPU.
    pub memory_budget: Option<String>,
    /// QLoRA: the base's projection weights in 4 bits, quantized while loading (`load_in_4bit`).
    pub load_in_4bit: bool,
    /// `nf4` or `fp4`.
    pub bnb_4bit_quant_type: String,
    /// Quantize the 4-bit blocks' scales too.
    pub bnb_4bit_use_double_quant: bool,
    /// The dtype 4-bit weights are dequantized to (`float32`, `bfloat16`, `float16`; `None`: the
    /// run's dtype).
    pub bnb_4bit_compute_dtype: Option<String>,
    /// The loop's options (transformers' names).
    #[serde(flatten)]
    pub training: TrainingArguments,
}

impl Default for FinetuneOptions {
    fn default() -> Self {
        Self {
            model: None,
            revision: None,
            data: None,
            tokenizer: None,
            template: lora_data::Template::default().name().into(),
            system: None,
            max_length: 384,
            format: None,
            lora_r: 8,
            lora_alpha: 32.0,
            lora_dropout: 0.1,
            target_modules: lora_trainer::recipe::TUTORIAL_TARGETS
                .map(String::from)
                .to_vec(),
            use_rslora: false,
            use_dora: false,
            lora_bias: false,
            init_lora_weights: InitLoraWeights::Bool(true),
            modules_to_save: Vec::new(),
            trainable_token_indices: Vec::new(),
            init_adapter: None,
            eval_data: None,
            eval_split: None,
            device: "cpu".into(),
            devices: Vec::new(),
            padding_free: None,
            bf16: None,
            lint: "error".into(),
            not_learning_steps: 50,
            dry_run: false,
            memory_budget: None,
            load_in_4bit: false,
            bnb_4bit_quant_type: "nf4".into(),
            bnb_4bit_use_double_quant: false,
            bnb_4bit_compute_dtype: None,
            training: TrainingArguments::tutorial(PathBuf::from("output")),
        }
    }
}

/// Arguments of `finetune`: a config file, and every option as a flag.
#[derive(clap::Args, Debug)]
pub struct FinetuneArgs {
    /// TOML or JSON file of options, named as the flags in snake_case (`learning_rate = 2e-4`;
    /// `output_dir` for --output, `shuffle = false` for --no-shuffle). Options it leaves out keep
    /// the recipe's defaults; flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: OptionFlags,
}

/// The options of `finetune`, each once: a field is a flag (`--max-length`) and a config key
/// (`max_length`), and names the field of [`FinetuneOptions`] it sets. `None`: not given as a flag.
#[derive(clap::Args, Serialize, Debug)]
struct OptionFlags {
    /// Model directory, hub cache entry or hub id (`Org/Name`, `modelscope:Org/Name`; downloaded
    /// when not cached).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Branch, tag or commit of a hub id --model [default: main on the Hugging Face hub, master on
    /// ModelScope].
    #[arg(long)]
    revision: Option<String>,
    /// Training data file (alpaca / sharegpt / messages; JSON or JSONL).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Tokenizer directory or tokenizer.json [default: the model directory]
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// seed (the tutorial's process_func) | qwen (Qwen2.5's chat template) [default: seed, as in
    /// every command]
    #[arg(long)]
    template: Option<String>,
    /// System prompt for records without one [default: the template's own: seed's is the
    /// tutorial's, qwen's is Qwen2.5's]
    #[arg(long)]
    system: Option<String>,
    /// Tokens kept per record (longer records are cut).
    #[arg(long)]
    max_length: Option<usize>,
    /// alpaca | sharegpt | messages [default: detected from the first record]
    #[arg(long)]
    format: Option<String>,
    /// LoRA rank.
    #[arg(long)]
    lora_r: Option<usize>,
    /// LoRA alpha (the update is scaled by alpha / r).
    #[arg(long, value_parser = finite)]
    lora_alpha: Option<f64>,
    /// Dropout on the LoRA branch's input.
    #[arg(long, value_parser = finite)]
    lora_dropout: Option<f64>,
    /// Comma-separated module names, or `all-linear`.
    #[arg(long, value_delimiter = ',')]
    target_modules: Option<Vec<String>>,
    /// rsLoRA scaling, alpha / sqrt(r) (the bare flag means true).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    use_rslora: Option<bool>,
    /// DoRA (PEFT's use_dora): the update's direction and a trained magnitude per output row
    /// (the bare flag means true).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    use_dora: Option<bool>,
    /// PEFT's lora_bias: a trained bias on every lora_B (needs --weight-decay 0; a merge needs a
    /// base bias on every target) (the bare flag means true).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    lora_bias: Option<bool>,
    /// true | false | gaussian | pissa | pissa_niter_N | olora (PEFT's init_lora_weights; pissa
    /// and olora take the adapter out of the base weight's SVD / QR) [default: true]
    #[arg(long, value_parser = init_lora_weights, value_name = "INIT")]
    init_lora_weights: Option<InitLoraWeights>,
    /// Comma-separated modules trained in full and saved in the adapter (PEFT's modules_to_save,
    /// e.g. lm_head,embed_tokens; a tied model has no separate lm_head)
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    modules_to_save: Option<Vec<String>>,
    /// Comma-separated token ids whose embedding rows train (PEFT's trainable_token_indices: new
    /// special tokens, cheaply)
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    trainable_token_indices: Option<Vec<usize>>,
    /// Start from this PEFT adapter directory instead of a fresh adapter.
    #[arg(long)]
    init_adapter: Option<PathBuf>,
    /// Evaluation data file.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Hold out this fraction of --data for evaluation.
    #[arg(long, value_parser = finite)]
    eval_split: Option<f64>,
    /// cpu | cuda[:N] (under torchrun, `cuda` is cuda:LOCAL_RANK)
    #[arg(long)]
    device: Option<String>,
    /// Comma-separated devices, one data-parallel worker thread each (cuda:0,cuda:1,...); sets
    /// --world-size to their number
    #[arg(long, value_delimiter = ',', value_name = "DEVICES")]
    devices: Option<Vec<String>>,
    /// Examples back to back in one row instead of padded rows [default: true on the CPU, false on
    /// CUDA]
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    padding_free: Option<bool>,
    /// bf16 base weights and compute (transformers' bf16) [default: true on CUDA; the CPU computes
    /// in f32 only and refuses true] (the bare flag means true).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    bf16: Option<bool>,
    /// error | warn: what a data check that fails does (end token cut by --max-length, an end
    /// token generation does not stop on, records with nothing supervised, a training prompt
    /// unlike chat's) [default: error]
    #[arg(long)]
    lint: Option<String>,
    /// Warn once when the loss has not fallen 1% below its first logged value after N steps
    /// (0: never) [default: 50]
    #[arg(long)]
    not_learning_steps: Option<usize>,
    /// Run the data checks and print the memory plan, then stop before loading the model (the bare
    /// flag means true).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    dry_run: Option<bool>,
    /// The memory the run may use, e.g. 12GB or 500MiB; a plan above it stops the run before the
    /// model loads [default: the available RAM on the CPU; not checked on CUDA]
    #[arg(long)]
    memory_budget: Option<String>,
    /// QLoRA: hold the base's projection weights in 4 bits (bitsandbytes' NF4/FP4 layout),
    /// quantized while loading; the adapters train in full precision (the bare flag means true).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    load_in_4bit: Option<bool>,
    /// nf4 or fp4 [default: nf4]
    #[arg(long)]
    bnb_4bit_quant_type: Option<String>,
    /// Quantize the 4-bit blocks' scales too (the bare flag means true) [default: false]
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    bnb_4bit_use_double_quant: Option<bool>,
    /// float32, bfloat16 or float16: what 4-bit weights are dequantized to for each product
    /// [default: the run's dtype]
    #[arg(long)]
    bnb_4bit_compute_dtype: Option<String>,
    #[command(flatten)]
    #[serde(flatten)]
    training: TrainingFlags,
}

/// The flags of [`TrainingArguments`]' fields (transformers' names).
#[derive(clap::Args, Serialize, Debug)]
#[command(next_help_heading = "Training (transformers' TrainingArguments)")]
struct TrainingFlags {
    /// Output directory (checkpoints, metrics.jsonl, final adapter).
    #[arg(long = "output", visible_alias = "output-dir")]
    output_dir: Option<PathBuf>,
    /// Examples per micro-batch.
    #[arg(long)]
    per_device_train_batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    gradient_accumulation_steps: Option<usize>,
    /// Peak learning rate.
    #[arg(long, value_parser = finite)]
    learning_rate: Option<f64>,
    /// Epochs over the training data (ignored when --max-steps is given).
    #[arg(long, value_parser = finite)]
    num_train_epochs: Option<f64>,
    /// Total optimizer steps (overrides --num-train-epochs).
    #[arg(long)]
    max_steps: Option<usize>,
    /// linear | cosine | constant
    #[arg(long, value_parser = serde_name::<SchedulerType>)]
    lr_scheduler_type: Option<SchedulerType>,
    /// Warmup steps (win over --warmup-ratio when non-zero).
    #[arg(long)]
    warmup_steps: Option<usize>,
    /// Warmup as a fraction of the total steps.
    #[arg(long, value_parser = finite)]
    warmup_ratio: Option<f64>,
    /// Decoupled weight decay (AdamW).
    #[arg(long, value_parser = finite)]
    weight_decay: Option<f64>,
    /// AdamW beta1.
    #[arg(long, value_parser = finite)]
    adam_beta1: Option<f64>,
    /// AdamW beta2.
    #[arg(long, value_parser = finite)]
    adam_beta2: Option<f64>,
    /// AdamW epsilon.
    #[arg(long, value_parser = finite)]
    adam_epsilon: Option<f64>,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, value_parser = finite)]
    max_grad_norm: Option<f64>,
    /// LoRA+: every lora_B learns at this multiple of the learning rate (PEFT's
    /// create_loraplus_optimizer; 16 is its paper's suggestion) [default: off]
    #[arg(long, value_parser = finite)]
    loraplus_lr_ratio: Option<f64>,
    /// Log every N optimizer steps.
    #[arg(long)]
    logging_steps: Option<usize>,
    /// Save a checkpoint every N optimizer steps (0: only the final adapter).
    #[arg(long)]
    save_steps: Option<usize>,
    /// Keep at most N checkpoints (the oldest are deleted).
    #[arg(long)]
    save_total_limit: Option<usize>,
    /// Evaluate every N steps (and at the end).
    #[arg(long)]
    eval_steps: Option<usize>,
    /// Seed of the data order, dropout and the adapter's initialization.
    #[arg(long)]
    seed: Option<u64>,
    /// Keep the data order (no per-epoch shuffle).
    #[arg(long = "no-shuffle", num_args = 0, default_missing_value = "false")]
    shuffle: Option<bool>,
    /// Recompute each layer's activations in backward (less memory, one more forward; the bare
    /// flag means true).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    gradient_checkpointing: Option<bool>,
    /// A checkpoint directory, or `latest`.
    #[arg(long)]
    resume_from_checkpoint: Option<String>,
    /// Start a new run in an output directory that holds another run (its checkpoints and
    /// metrics.jsonl are removed); without it such a directory is refused (the bare flag means true).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    overwrite_output_dir: Option<bool>,
    /// Data-parallel workers: threads of this process, each with a copy of the model on the
    /// device, the gradients summed with Burn's collective engine (DDP's WORLD_SIZE; the
    /// per-device batch is per worker, so a step takes world-size × accumulation micro-batches).
    #[arg(long)]
    world_size: Option<usize>,
    /// Seconds a multi-process run (torchrun's WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT in the
    /// environment) waits for a rank before it stops with an error naming it.
    #[arg(long)]
    ddp_timeout: Option<u64>,
}

/// A float flag's value; NaN and the infinities are refused, as JSON (the layers' format) has none.
fn finite(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(v) => Err(format!("{v} is not a finite number")),
        Err(e) => Err(e.to_string()),
    }
}

/// `--init-lora-weights`: `true` / `false` as booleans, any other word as a name (checked by
/// `LoraConfig::validate`, so that a bad one gets lora-core's message).
fn init_lora_weights(s: &str) -> Result<InitLoraWeights, String> {
    Ok(match s {
        "true" => InitLoraWeights::Bool(true),
        "false" => InitLoraWeights::Bool(false),
        name => InitLoraWeights::Named(name.into()),
    })
}

/// A flag's value spelled as in a config file (serde's names: `--lr-scheduler-type cosine`).
fn serde_name<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(Value::String(s.into())).map_err(|e| e.to_string())
}

impl FinetuneArgs {
    /// The options: `defaults`, overlaid by the config file's, overlaid by the flags given.
    pub fn resolve(&self, defaults: FinetuneOptions) -> anyhow::Result<FinetuneOptions> {
        let mut options = object(&defaults)?;
        if let Some(file) = &self.config {
            let given = read_config(file, &options)?;
            options.extend(given);
        }
        // A flag not given serializes as null and leaves the layers below alone.
        let flags = object(&self.flags)?;
        options.extend(flags.into_iter().filter(|(_, v)| !v.is_null()));
        serde_json::from_value(Value::Object(options)).context("invalid options")
    }
}

/// `value` as a JSON object of options.
fn object(value: &impl Serialize) -> anyhow::Result<Map<String, Value>> {
    match serde_json::to_value(value)? {
        Value::Object(m) => Ok(m),
        v => bail!("options serialize to {v}, not an object"),
    }
}

/// Reads a config file (`.toml`, else JSON) as options to lay over `base` (a complete set), refusing
/// a key that names no option or a value of the wrong type, naming the file and the key.
fn read_config(file: &Path, base: &Map<String, Value>) -> anyhow::Result<Map<String, Value>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading config {}", file.display()))?;
    let value: Value = if file.extension().is_some_and(|e| e == "toml") {
        toml::from_str(&text).with_context(|| format!("{}: invalid TOML config", file.display()))?
    } else {
        serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON config", file.display()))?
    };
    let Value::Object(given) = value else {
        bail!(
            "{}: a config file holds options by name (`learning_rate = 2e-4`), not {value}",
            file.display()
        );
    };
    // serde cannot deny unknown fields across a flatten; check the names here so a misspelt option
    // is an error, not silently ignored.
    let unknown: Vec<&String> = given.keys().filter(|k| !base.contains_key(*k)).collect();
    if !unknown.is_empty() {
        bail!(
            "{}: unknown option(s) {unknown:?}; options use the flag names in snake_case \
             (e.g. learning_rate, per_device_train_batch_size, lora_r)",
            file.display()
        );
    }
    // One key at a time, so that the message names it (serde's does not across a flatten).
    for (key, v) in &given {
        let mut one = base.clone();
        one.insert(key.clone(), v.clone());
        serde_json::from_value::<FinetuneOptions>(Value::Object(one))
            .with_context(|| format!("{}: invalid value for `{key}`: {v}", file.display()))?;
    }
    Ok(given)
}

impl FinetuneOptions {
    /// The LoRA config these options describe.
    pub fn lora_config(&self) -> LoraConfig {
        let targets = if self.target_modules.len() == 1 && self.target_modules[0] == "all-linear" {
            ModuleSelector::Regex("all-linear".into())
        } else {
            ModuleSelector::List(self.target_modules.clone())
        };
        // A config file's `init_lora_weights = "true"` is the boolean, as the flag's.
        let init_lora_weights = match &self.init_lora_weights {
            InitLoraWeights::Named(n) => init_lora_weights(n).expect("infallible"),
            b => b.clone(),
        };
        let mut cfg = LoraConfig {
            r: self.lora_r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules: Some(targets),
            use_rslora: self.use_rslora,
            use_dora: self.use_dora,
            init_lora_weights,
            base_model_name_or_path: self.model.as_ref().map(|p| p.display().to_string()),
            ..lora_trainer::recipe::lora_config()
        };
        // Only when on: a config without the field is what PEFT before 0.14 (the tutorial's
        // 0.11.1) can read.
        if self.lora_bias {
            cfg.set_lora_bias(true);
        }
        if !self.modules_to_save.is_empty() {
            cfg.modules_to_save = Some(self.modules_to_save.clone());
        }
        if !self.trainable_token_indices.is_empty() {
            cfg.set_trainable_token_indices(Some(&self.trainable_token_indices));
        }
        cfg
    }

    /// `--init-lora-weights` as given (`true`, `pissa`, ...).
    fn init_name(&self) -> String {
        match &self.init_lora_weights {
            InitLoraWeights::Bool(b) => b.to_string(),
            InitLoraWeights::Named(n) => n.clone(),
        }
    }
}

impl FinetuneOptions {
    /// Refuses impossible or silently useless options before anything is built, naming the
    /// option (the loop's own options: [`TrainingArguments::validate`]).
    pub fn validate(&self) -> anyhow::Result<()> {
        self.training.validate()?;
        lora_data::PromptStyle::resolve(Some(&self.template), self.system.as_deref())
            .context("--template")?;
        if self.lora_r == 0 {
            // lora-core's wording, which this check runs ahead of.
            bail!("--lora-r 0: `r` is 0; the rank must be at least 1");
        }
        // A NaN fails every comparison, so each range is written as what must hold.
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            bail!(
                "--lora-alpha {}: must be > 0 (the update is scaled by alpha / r; 0 trains nothing)",
                self.lora_alpha
            );
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            bail!("--lora-dropout {}: must be in [0, 1)", self.lora_dropout);
        }
        // lora-core's own checks and wording (a bad --init-lora-weights, --use-dora with
        // --lora-bias, ...), ahead of loading anything.
        self.lora_config().validate()?;
        if self.lora_bias && self.training.weight_decay > 0.0 && self.init_adapter.is_none() {
            // The trainer refuses it too, but only after the model has loaded.
            bail!(
                "--weight-decay {} with --lora-bias: transformers exempts the lora_B biases from \
                 weight decay and this trainer does not yet; pass --weight-decay 0 or drop \
                 --lora-bias",
                self.training.weight_decay
            );
        }
        if self.init_lora_weights.decomposes() && self.load_in_4bit && self.init_adapter.is_none() {
            bail!(
                "--init-lora-weights {} with --load-in-4bit: PiSSA and OLoRA take the adapter out \
                 of the full-precision base weight; initialize on the full-precision model (as \
                 PEFT asks for PiSSA), or use --init-lora-weights true",
                self.init_name()
            );
        }
        if let Some(r) = self.eval_split {
            if !(r > 0.0 && r < 1.0) {
                bail!("--eval-split {r}: use a fraction in (0, 1)");
            }
        }
        if self.bf16 == Some(true) && self.device == "cpu" {
            bail!(
                "--bf16 on --device cpu: the CPU backend trains in f32 only; bf16 needs \
                 --device cuda (where it is the default)"
            );
        }
        if let Some(b) = &self.memory_budget {
            if crate::plan::parse_budget(b).is_none() {
                bail!("--memory-budget {b:?}: use a size such as 12GB, 500MiB or 1.5GiB");
            }
        }
        if !matches!(self.lint.as_str(), "error" | "warn") {
            bail!("--lint {:?}: use error or warn", self.lint);
        }
        self.load4bit()?;
        if !self.load_in_4bit
            && (self.bnb_4bit_use_double_quant || self.bnb_4bit_compute_dtype.is_some())
        {
            bail!("--bnb-4bit-use-double-quant and --bnb-4bit-compute-dtype need --load-in-4bit");
        }
        Ok(())
    }

    /// The 4-bit load asked for (`None` without `--load-in-4bit`).
    pub fn load4bit(&self) -> anyhow::Result<Option<qwen2::Load4bit>> {
        crate::quant::load4bit(
            self.load_in_4bit,
            Some(&self.bnb_4bit_quant_type),
            self.bnb_4bit_use_double_quant,
            self.bnb_4bit_compute_dtype.as_deref(),
            self.dtype(),
        )
    }

    /// The base weights' dtype: bf16 on CUDA unless `--bf16 false`; f32 on the CPU.
    fn dtype(&self) -> DType {
        match (self.device.as_str(), self.bf16) {
            ("cpu", _) | (_, Some(false)) => DType::F32,
            _ => DType::BF16,
        }
    }
}

/// What would make the run fail only after tokenizing and loading the model: an output path that
/// is a file or cannot be written, or one holding another run (the trainer refuses it too; here
/// it costs nothing).
fn check_output_dir(t: &TrainingArguments) -> anyhow::Result<()> {
    let out = &t.output_dir;
    if t.resume_from_checkpoint.is_none() && !t.overwrite_output_dir {
        let previous = lora_trainer::checkpoint::previous_run(out);
        if !previous.is_empty() {
            return Err(lora_trainer::TrainError::OutputDirInUse {
                dir: out.clone(),
                found: previous
                    .iter()
                    .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
                    .collect::<Vec<_>>()
                    .join(", "),
            }
            .into());
        }
    }
    crate::data::check_writable_dir(out, "--output-dir")
}

/// Validates `o` and fine-tunes on `o.device` (or `o.devices`; or as one rank of the process group
/// torchrun's variables describe).
pub fn run(o: &FinetuneOptions) -> anyhow::Result<()> {
    let mut o = o.clone();
    let group = lora_trainer::ProcessGroup::from_env()?;
    if group.is_some() {
        crate::out::divert_foreign_stdout().context("keeping stdout for the log lines")?;
    }
    place(&mut o, group)?;
    let o = &o;
    o.validate()?;
    let leads = o
        .training
        .process_group
        .as_ref()
        .is_none_or(|g| g.rank == 0);
    if leads {
        check_output_dir(&o.training)?;
    }
    if !o.devices.is_empty() {
        #[cfg(feature = "cuda")]
        {
            let devs = o
                .devices
                .iter()
                .map(|d| match crate::device::parse(d)? {
                    crate::device::Device::Cuda(i) => Ok(burn::backend::cuda::CudaDevice::new(i)),
                    crate::device::Device::Cpu => unreachable!("place() keeps CUDA lists only"),
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            return run_on::<burn::backend::Autodiff<burn::backend::Cuda>>(o, &devs);
        }
        #[cfg(not(feature = "cuda"))]
        return Err(crate::device::no_cuda(&o.devices.join(",")));
    }
    crate::on_device!(&o.device,
        cpu => run_on::<burn::backend::Autodiff<burn::backend::Flex>>(o, &[Default::default()]),
        cuda(dev) => run_on::<burn::backend::Autodiff<burn::backend::Cuda>>(o, &[dev]),
    )
}

/// Fits the options to the launch: `--devices` sets the world size (a list of `cpu` is that many
/// workers on the CPU); under torchrun (`group`) the world size is WORLD_SIZE and a bare
/// `--device cuda` is this rank's card, `cuda:LOCAL_RANK`.
fn place(o: &mut FinetuneOptions, group: Option<lora_trainer::ProcessGroup>) -> anyhow::Result<()> {
    let world_flag = o.training.world_size;
    if !o.devices.is_empty() {
        let parsed = o
            .devices
            .iter()
            .map(|d| {
                crate::device::parse(d).map_err(|_| {
                    anyhow::anyhow!("--devices {d:?}: use cpu, cuda or cuda:N, comma-separated")
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let cpu = parsed
            .iter()
            .filter(|d| **d == crate::device::Device::Cpu)
            .count();
        if cpu != 0 && cpu != parsed.len() {
            bail!(
                "--devices {}: mixes the CPU and CUDA; give one kind",
                o.devices.join(",")
            );
        }
        if world_flag > 1 && world_flag != parsed.len() {
            bail!(
                "--world-size {world_flag} with --devices {} ({} devices): give one of them",
                o.devices.join(","),
                parsed.len()
            );
        }
        if group.is_some() {
            bail!("--devices under torchrun (WORLD_SIZE is set): each process takes one device; use --device");
        }
        o.training.world_size = parsed.len();
        o.device = o.devices[0].clone();
        if cpu != 0 {
            o.devices.clear();
        }
    }
    if let Some(g) = group {
        if world_flag > 1 && world_flag != g.world_size {
            bail!(
                "--world-size {world_flag} but WORLD_SIZE={} in the environment: under torchrun                  the world size is WORLD_SIZE; drop --world-size",
                g.world_size
            );
        }
        if o.device == "cuda" {
            o.device = format!("cuda:{}", g.local_rank);
        }
        o.training.world_size = g.world_size;
        o.training.process_group = Some(g);
    }
    Ok(())
}

/// Splits off `ratio` of the examples (a seeded shuffle) for evaluation, keeping input order.
fn split(
    examples: Vec<Example>,
    ratio: f64,
    seed: u64,
) -> anyhow::Result<(Vec<Example>, Vec<Example>)> {
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

fn run_on<B: AutodiffBackend>(o: &FinetuneOptions, devices: &[B::Device]) -> anyhow::Result<()> {
    let device = &devices[0];
    // Rank 0 of a multi-process run (or the only process) writes; the others only train.
    let leads = o
        .training
        .process_group
        .as_ref()
        .is_none_or(|g| g.rank == 0);
    let Some(model_arg) = &o.model else {
        bail!("--model DIR is required (a directory with config.json, *.safetensors and tokenizer.json)");
    };
    let Some(data) = &o.data else {
        bail!("--data FILE is required (alpaca / sharegpt / messages, JSON or JSONL)");
    };
    let revision = crate::hub::RevisionArg {
        revision: o.revision.clone(),
    };
    let model_dir = qwen2::resolve_model_dir(&crate::hub::model(model_arg, &revision)?)?;
    // Fail on a bad config.json before spending time on the data.
    let model_config = qwen2::Qwen2Config::from_file(&model_dir.join("config.json"))?;

    // Data.
    let tok_path = o.tokenizer.clone().unwrap_or_else(|| model_dir.clone());
    let spec = DataSpec {
        tokenizer: &tok_path,
        template: &o.template,
        system: o.system.clone(),
        max_length: o.max_length,
        format: o.format.as_deref(),
        padding_free: o.padding_free.unwrap_or(o.device == "cpu"),
        lint_model: Some(&model_dir),
    };
    let train_data = crate::data::load(data, &spec, "train data")?;
    let train_style = train_data.style.clone();
    let spec = DataSpec {
        lint_model: None,
        ..spec
    };
    // With no usable record at all, the error further on says so in fewer words.
    if let (Some(lint), false) = (&train_data.lint, train_data.examples.is_empty()) {
        check_lint(lint, o)?;
    }
    let (train_ex, eval_ex) = match (&o.eval_data, o.eval_split) {
        (Some(_), Some(_)) => bail!("give --eval-data or --eval-split, not both"),
        (Some(f), None) => (
            train_data.examples,
            crate::data::load(f, &spec, "eval data")?.examples,
        ),
        (None, Some(r)) => {
            let (train, eval) = split(train_data.examples, r, o.training.seed)?;
            eprintln!(
                "--eval-split {r}: {} train, {} eval examples",
                train.len(),
                eval.len()
            );
            (train, eval)
        }
        (None, None) => (train_data.examples, Vec::new()),
    };
    check_memory(&model_config, &train_ex, o)?;
    if o.dry_run {
        outln!("dry run: the checks passed; stopping before loading the model");
        return Ok(());
    }
    let started_at = std::time::SystemTime::now();

    // Model and adapter.
    let t = Instant::now();
    // CPU: f32 throughout. GPU: bf16 base weights (unless --bf16 false), f32 adapters and
    // optimizer state.
    let dtype = o.dtype();
    let loaded = crate::quant::load::<B>(o.load4bit()?, &model_dir, dtype, device)?;
    outln!("loaded {} in {:.1?}", model_dir.display(), t.elapsed());
    B::seed(device, o.training.seed);
    let (model, lora_cfg, report) = match &o.init_adapter {
        Some(arg) => {
            let dir = &crate::hub::adapter(arg)?;
            let (m, cfg, r) = load_adapter(loaded.model, dir)
                .with_context(|| format!("--init-adapter {}", dir.display()))?;
            let ignored = init_adapter_overrides(&cfg, o);
            if !ignored.is_empty() {
                eprintln!(
                    "--init-adapter {}: its adapter_config.json wins (r {}, alpha {}, dropout {}); \
                     ignored: {}",
                    dir.display(),
                    cfg.r,
                    cfg.lora_alpha,
                    cfg.lora_dropout,
                    ignored.join(", ")
                );
            }
            (m, cfg, r)
        }
        None => {
            let cfg = o.lora_config();
            let (m, r) = apply_lora(loaded.model, &cfg)?;
            (m, cfg, r)
        }
    };
    outln!("{report}");
    // PiSSA / OLoRA: the adapter applies to the residual base the init left. The init's factors
    // are kept (PEFT's path_initial_model_for_weight_conversion) so that the end of the run can
    // also write the adapter as a plain LoRA for the original model.
    let initial = (o.init_adapter.is_none() && lora_cfg.init_lora_weights.decomposes())
        .then(|| o.training.output_dir.join("initial-adapter"));
    if let (Some(dir), true) = (&initial, leads) {
        lora_core::save_adapter(&model, &lora_cfg, dir)
            .with_context(|| format!("saving the initial adapter to {}", dir.display()))?;
    }

    // Train. Log lines go to stdout (one JSON object each); the progress bar to stderr.
    let started = Instant::now();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    let mut tok_s = 0.0;
    let mut first_step = 0;
    let mut final_loss = None;
    let mut guard = NotLearning::new(o.not_learning_steps);
    let interrupted = on_ctrl_c()?;
    let mut on_event = |e: &TrainEvent| {
        match e {
            TrainEvent::Start { step, total } => {
                first_step = *step;
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
                final_loss = Some(l.loss);
                bar.suspend(|| outln!("{}", crate::out::rounded_json(l)));
                if let Some(warning) = guard.log(l.step - first_step, l.loss) {
                    bar.suspend(|| eprintln!("{warning}"));
                }
            }
            TrainEvent::Eval(x) => bar.suspend(|| outln!("{}", crate::out::rounded_json(x))),
            TrainEvent::Saved(p) => bar.suspend(|| eprintln!("saved {}", p.display())),
            TrainEvent::Resumed { checkpoint, step } => {
                bar.suspend(|| eprintln!("resuming from {} (step {step})", checkpoint.display()))
            }
        }
        // Stops the run after the current step (the trainer's contract).
        !interrupted.load(Ordering::SeqCst)
    };
    if !leads {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let outcome = if devices.len() > 1 {
        lora_trainer::train_data_parallel(
            model,
            &lora_cfg,
            &train_ex,
            &eval_ex,
            train_data.collator,
            &o.training,
            devices,
            &mut on_event,
        )?
        .1
    } else {
        train(
            model,
            &lora_cfg,
            &train_ex,
            &eval_ex,
            train_data.collator,
            &o.training,
            device,
            &mut on_event,
        )?
        .1
    };
    bar.finish_and_clear();
    if !leads {
        return Ok(());
    }
    let last = outcome.state.global_step;
    if outcome.stopped {
        let out = &o.training.output_dir;
        eprintln!(
            "interrupted: stopped after step {last} of {}",
            outcome.state.max_steps
        );
        match lora_trainer::checkpoint::checkpoints(out).pop() {
            Some((step, dir)) => eprintln!(
                "the last complete checkpoint is {} (step {step}); resume with:\n  {}",
                dir.display(),
                resume_command(std::env::args().skip(1))
            ),
            None => eprintln!(
                "no checkpoint was written yet (--save-steps {}); nothing to resume",
                o.training.save_steps
            ),
        }
        std::process::exit(130); // 128 + SIGINT, as a shell reports a process stopped by Ctrl-C
    }
    let adapter_file = outcome.adapter_dir.join("adapter_model.safetensors");
    if lora_b_all_zero(&adapter_file)? {
        eprintln!(
            "WARNING: every lora_B of the adapter is still zero: it changes nothing (a learning \
             rate of 0, or no step that reached the optimizer)"
        );
    }
    let manifest = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>(),
        "options": o,
        "build": crate::manifest::build(),
        "data": {"path": data, "sha256": crate::manifest::sha256_file(data)?},
        "eval_data": match &o.eval_data {
            Some(f) => serde_json::json!({"path": f, "sha256": crate::manifest::sha256_file(f)?}),
            None => Value::Null,
        },
        "model": {
            "arg": model_arg,
            "revision": o.revision,
            "identity": crate::manifest::model_identity(&model_dir, &tok_path)?,
        },
        "template": train_style.template.name(),
        "system": train_style.system,
        "backend": if o.device == "cpu" { "flex" } else { "cuda" },
        "device": o.device,
        "dtype": format!("{:?}", o.dtype()),
        "threads": rayon::current_num_threads(),
        "started": crate::manifest::rfc3339(started_at),
        "finished": crate::manifest::rfc3339(std::time::SystemTime::now()),
        "global_step": last,
        "final_loss": final_loss,
        "adapter_sha256": crate::manifest::sha256_file(&adapter_file)?,
    });
    crate::manifest::write(&outcome.adapter_dir, &manifest)?;
    if let Some(initial) = &initial {
        let plain = outcome.adapter_dir.join("adapter-lora");
        lora_core::convert_to_lora(&outcome.adapter_dir, initial, &plain)
            .context("writing the adapter as a plain LoRA")?;
        outln!(
            "{} adapter: it applies to the residual base the init leaves (PEFT re-runs the init when \
             it loads it); {} holds it as a plain LoRA of rank {} for the original model (vLLM, \
             llama.cpp, merge)",
            o.init_name(),
            plain.display(),
            2 * lora_cfg.r
        );
    }
    outln!(
        "done: {} in {:.1?}; adapter written to {} (adapter_model.safetensors, adapter_config.json; metrics.jsonl, loss.svg)",
        steps_done(first_step, last),
        started.elapsed(),
        outcome.adapter_dir.display()
    );
    Ok(())
}

/// The most tokens one micro-batch of `examples` can hold: the `batch` longest records back to back
/// (padding-free), or `batch` rows of the longest (padded).
fn max_micro_batch_tokens(lengths: &[usize], batch: usize, padding_free: bool) -> u64 {
    if padding_free {
        let mut l = lengths.to_vec();
        l.sort_unstable_by(|a, b| b.cmp(a));
        l.iter().take(batch).sum::<usize>() as u64
    } else {
        (batch * lengths.iter().copied().max().unwrap_or(0)) as u64
    }
}

/// Prints the memory plan; stops before loading anything when it does not fit the budget, with
/// the numbers and the cheapest change that fits.
fn check_memory(
    config: &qwen2::Qwen2Config,
    train: &[Example],
    o: &FinetuneOptions,
) -> anyhow::Result<()> {
    let lengths: Vec<usize> = train.iter().map(|e| e.input_ids.len()).collect();
    let padding_free = o.padding_free.unwrap_or(o.device == "cpu");
    // DoRA's magnitude and lora_bias's bias: one `out_features` vector each per module.
    let vectors = usize::from(o.use_dora) + usize::from(o.lora_bias);
    // Modules to save train in full (a table of vocab × hidden each), token rows hidden each.
    let tables = ["lm_head", "embed_tokens"];
    let saved = o
        .modules_to_save
        .iter()
        .filter(|n| tables.iter().any(|t| t.ends_with(n.as_str())))
        .count();
    let lora = crate::plan::lora_params(config, o.lora_r, &o.target_modules, vectors)
        + (saved * config.vocab_size * config.hidden_size) as u64
        + (o.trainable_token_indices.len() * config.hidden_size) as u64;
    let q4 = o.load4bit()?;
    let plan_for = |batch: usize, lengths: &[usize], checkpointing: bool| {
        let mut plan = crate::plan::Plan::new(&crate::plan::PlanInput {
            config,
            lora_params: lora,
            weight_bytes: if o.dtype() == DType::F32 { 4 } else { 2 },
            tokens: max_micro_batch_tokens(lengths, batch, padding_free),
            checkpointing,
        });
        if let Some(q) = &q4 {
            let fused = o.device == "cpu" && q.compute_dtype == DType::F32;
            plan.weights = crate::quant::training_weights(config, q, checkpointing || fused);
        }
        plan
    };
    let batch = o.training.per_device_train_batch_size;
    let ckpt = o.training.gradient_checkpointing;
    let plan = plan_for(batch, &lengths, ckpt);
    outln!("{}", plan.line());
    let (budget, source) = match &o.memory_budget {
        Some(b) => (crate::plan::parse_budget(b), "--memory-budget"),
        None if o.device == "cpu" => (crate::plan::available_ram(), "available RAM"),
        None => (None, ""),
    };
    let Some(budget) = budget else {
        return Ok(());
    };
    let gib = |b: f64| b / (1u64 << 30) as f64;
    if plan.total() <= budget {
        return Ok(());
    }
    // The cheapest change that fits: on CUDA checkpointing first (it drops most activations
    // there); then fewer examples a micro-batch with more accumulation (same optimizer step);
    // then shorter records.
    let accum = o.training.gradient_accumulation_steps;
    let mut fix = None;
    if o.device != "cpu" && !ckpt && plan_for(batch, &lengths, true).total() <= budget {
        fix = Some("--gradient-checkpointing".to_string());
    }
    let mut b = batch;
    while fix.is_none() && b > 1 {
        b = b.div_ceil(2);
        if plan_for(b, &lengths, ckpt).total() <= budget {
            let steps = batch * accum / b;
            fix = Some(format!(
                "--per-device-train-batch-size {b} --gradient-accumulation-steps {steps} (the same \
                 {} examples an optimizer step)",
                batch * accum
            ));
        }
    }
    if fix.is_none() {
        // A --max-length that cuts most records is no fix: stop at the median length.
        let mut sorted = lengths.clone();
        sorted.sort_unstable();
        let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
        let mut max_len = sorted.last().copied().unwrap_or(0);
        while max_len * 3 / 4 >= median.max(16) {
            max_len = max_len * 3 / 4;
            let cut: Vec<usize> = lengths.iter().map(|&l| l.min(max_len)).collect();
            if plan_for(1, &cut, ckpt).total() <= budget {
                fix = Some(format!(
                    "--per-device-train-batch-size 1 --gradient-accumulation-steps {} --max-length \
                     {max_len} (records get cut: check what --dry-run says of them)",
                    batch * accum
                ));
                break;
            }
        }
    }
    let fix = fix.unwrap_or_else(|| {
        let least: Vec<usize> = lengths.iter().map(|&l| l.min(16)).collect();
        format!(
            "none of the run's options (one 16-token record a micro-batch still needs {:.2} GiB, \
             {:.2} of it weights); use a smaller model or a machine with more memory",
            gib(plan_for(1, &least, ckpt).total()),
            gib(plan.weights)
        )
    });
    bail!(
        "the run needs about {:.2} GiB but the {source} is {:.2} GiB ({}); the cheapest change \
         that fits: {fix}",
        gib(plan.total()),
        gib(budget),
        plan.line()
    )
}

/// Says once, loudly, when the loss has not fallen: after `steps` steps of this run, the latest
/// logged loss is not 1% below the first one.
struct NotLearning {
    steps: usize,
    first: Option<f64>,
    said: bool,
}

impl NotLearning {
    fn new(steps: usize) -> Self {
        Self {
            steps,
            first: None,
            said: false,
        }
    }

    /// A log line of the loss after `ran` steps of this run; the warning, the first time it applies.
    fn log(&mut self, ran: usize, loss: f64) -> Option<String> {
        let first = *self.first.get_or_insert(loss);
        if self.said || self.steps == 0 || ran < self.steps || loss < first * 0.99 {
            return None;
        }
        self.said = true;
        Some(format!(
            "WARNING: not learning: after {ran} steps the loss is {loss:.4}, not below its first \
             logged value {first:.4} by 1%; check the learning rate, the data (`--dry-run` runs its \
             checks) and the labels (`cargo xtask prepare` shows them)"
        ))
    }
}

/// Whether every `lora_B` tensor of an adapter file is zero (an adapter that changes nothing).
fn lora_b_all_zero(file: &Path) -> anyhow::Result<bool> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("reading {}", file.display()))?;
    let mut any = false;
    for (name, t) in st.tensors() {
        if name.contains("lora_B") {
            any = true;
            if t.data().iter().any(|&b| b != 0) {
                return Ok(false);
            }
        }
    }
    Ok(any)
}

/// The data checks' problems: an error (naming every problem, one line each) under `--lint error`,
/// warnings under `--lint warn`.
fn check_lint(lint: &lora_data::Lint, o: &FinetuneOptions) -> anyhow::Result<()> {
    let problems = lint.problems(o.max_length);
    if problems.is_empty() {
        eprintln!(
            "checks: end token {:?} supervised in every record and one generation stops on; \
             training prompts equal chat's ({} compared)",
            lint.end_token.1, lint.prompts_compared
        );
        return Ok(());
    }
    if o.lint == "warn" {
        for p in &problems {
            eprintln!("warning: {p}");
        }
        return Ok(());
    }
    for p in &problems[1..] {
        eprintln!("  also: {p}");
    }
    bail!("{} (--lint warn runs anyway)", problems[0])
}

/// `N steps`, or after a resume `steps A-B (N this run)`: only the steps this call ran.
fn steps_done(first: usize, last: usize) -> String {
    let n = last - first;
    if first == 0 {
        format!("{n} steps")
    } else {
        format!(
            "steps {}-{last} ({n} this run, resumed at step {first})",
            first + 1
        )
    }
}

/// The options `--init-adapter`'s own config overrides: the adapter is trained as saved.
fn init_adapter_overrides(saved: &LoraConfig, o: &FinetuneOptions) -> Vec<String> {
    let mut ignored = Vec::new();
    if saved.r != o.lora_r {
        ignored.push(format!("--lora-r {}", o.lora_r));
    }
    if saved.lora_alpha != o.lora_alpha {
        ignored.push(format!("--lora-alpha {}", o.lora_alpha));
    }
    if saved.lora_dropout != o.lora_dropout {
        ignored.push(format!("--lora-dropout {}", o.lora_dropout));
    }
    if saved.use_rslora != o.use_rslora {
        ignored.push(format!("--use-rslora {}", o.use_rslora));
    }
    if saved.use_dora != o.use_dora {
        ignored.push(format!("--use-dora {}", o.use_dora));
    }
    if saved.lora_bias() != o.lora_bias {
        ignored.push(format!("--lora-bias {}", o.lora_bias));
    }
    let init = o.lora_config().init_lora_weights;
    if init != InitLoraWeights::Bool(true) && saved.init_lora_weights != init {
        ignored.push(format!("--init-lora-weights {}", o.init_name()));
    }
    ignored
}

/// Ctrl-C sets the returned flag (the run stops after the current step and says how to resume);
/// a second Ctrl-C quits at once.
fn on_ctrl_c() -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let set = flag.clone();
    ctrlc::set_handler(move || {
        if set.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: stopping after the current step (again to quit now)");
    })
    .context("installing the Ctrl-C handler")?;
    Ok(flag)
}

/// `cargo xtask <args> --resume-from-checkpoint latest`, for a run started with `args` (the
/// command line after the program name): the same options, shell-quoted, without an earlier
/// resume or overwrite (which would start over).
fn resume_command(args: impl Iterator<Item = String>) -> String {
    let mut kept = Vec::new();
    let mut args = args.peekable();
    while let Some(a) = args.next() {
        if a == "--resume-from-checkpoint" {
            args.next();
            continue;
        }
        if a == "--overwrite-output-dir" {
            if args.peek().is_some_and(|v| v == "true" || v == "false") {
                args.next();
            }
            continue;
        }
        if a.starts_with("--resume-from-checkpoint=") || a.starts_with("--overwrite-output-dir=") {
            continue;
        }
        kept.push(shell_quote(&a));
    }
    format!(
        "cargo xtask {} --resume-from-checkpoint latest",
        kept.join(" ")
    )
}

/// `s` as one shell word.
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: FinetuneArgs,
    }

    /// `cargo xtask finetune ARGV` resolved over the tutorial's recipe.
    fn resolve(argv: &[&str]) -> anyhow::Result<FinetuneOptions> {
        let cli = Cli::try_parse_from(std::iter::once("finetune").chain(argv.iter().copied()))?;
        cli.args.resolve(FinetuneOptions::default())
    }

    /// Writes `text` to `name` in `dir`; returns its path.
    fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    }

    /// The bug this layering fixes: options a config file left out took transformers'
    /// `TrainingArguments` defaults (lr 5e-5, batch 8 × 1, logging and saving every 500, no
    /// checkpointing) instead of the tutorial's recipe.
    #[test]
    fn a_config_file_leaves_what_it_omits_at_the_recipe() {
        let dir = tempfile::tempdir().unwrap();
        let mut want = resolve(&[]).unwrap();
        want.training.max_steps = Some(1);
        for (name, text) in [
            ("run.toml", "max_steps = 1\n"),
            ("run.json", "{\"max_steps\": 1}"),
        ] {
            let got = resolve(&["--config", &file(&dir, name, text)]).unwrap();
            assert_eq!(got, want, "{name}");
            let t = &got.training;
            assert_eq!(
                (
                    t.learning_rate,
                    t.per_device_train_batch_size,
                    t.gradient_accumulation_steps,
                    t.gradient_checkpointing,
                    t.logging_steps,
                    t.save_steps,
                ),
                (1e-4, 4, 4, true, 10, 100),
                "{name}"
            );
        }
    }

    #[test]
    fn a_flag_beats_the_file_and_the_file_beats_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = file(
            &dir,
            "run.toml",
            "learning_rate = 1e-3\nlora_r = 16\ntarget_modules = [\"q_proj\"]\n\
             gradient_checkpointing = false\nshuffle = false\noutput_dir = \"from-file\"\n",
        );
        let o = resolve(&[
            "--learning-rate",
            "2e-3",
            "--config",
            &cfg,
            "--target-modules",
            "q_proj,v_proj",
            "--output",
            "from-flag",
        ])
        .unwrap();
        let mut want = FinetuneOptions::default();
        want.training.learning_rate = 2e-3; // flag over file
        want.target_modules = vec!["q_proj".into(), "v_proj".into()]; // flag over file
        want.training.output_dir = "from-flag".into(); // flag over file
        want.lora_r = 16; // file over default
        want.training.gradient_checkpointing = false; // file over default
        want.training.shuffle = false; // file over default
        assert_eq!(o, want);
    }

    /// Every flag reaches the option of its name (the old spellings included).
    #[test]
    fn every_flag_sets_its_option() {
        let o = resolve(&[
            "--model=m",
            "--data=d",
            "--tokenizer=t",
            "--revision=r",
            "--template=qwen",
            "--system=s",
            "--max-length=7",
            "--format=alpaca",
            "--lora-r=3",
            "--lora-alpha=5",
            "--lora-dropout=0.2",
            "--target-modules=all-linear",
            "--use-rslora",
            "--use-dora",
            "--lora-bias",
            "--init-lora-weights=pissa_niter_4",
            "--modules-to-save=lm_head,embed_tokens",
            "--trainable-token-indices=1,2",
            "--init-adapter=a",
            "--eval-data=e",
            "--eval-split=0.1",
            "--device=cuda:1",
            "--padding-free=false",
            "--bf16",
            "--lint=warn",
            "--not-learning-steps=3",
            "--dry-run",
            "--memory-budget=9GB",
            "--load-in-4bit",
            "--bnb-4bit-quant-type=fp4",
            "--bnb-4bit-use-double-quant",
            "--bnb-4bit-compute-dtype=bfloat16",
            "--output-dir=o",
            "--per-device-train-batch-size=2",
            "--gradient-accumulation-steps=3",
            "--learning-rate=-1",
            "--num-train-epochs=1.5",
            "--max-steps=9",
            "--lr-scheduler-type=cosine",
            "--warmup-steps=4",
            "--warmup-ratio=0.3",
            "--weight-decay=0.01",
            "--adam-beta1=0.8",
            "--adam-beta2=0.99",
            "--adam-epsilon=1e-6",
            "--max-grad-norm=0",
            "--loraplus-lr-ratio=16",
            "--logging-steps=1",
            "--save-steps=2",
            "--save-total-limit=5",
            "--eval-steps=6",
            "--seed=7",
            "--no-shuffle",
            "--gradient-checkpointing",
            "--resume-from-checkpoint=latest",
            "--overwrite-output-dir",
            "--world-size=2",
        ])
        .unwrap();
        let want = FinetuneOptions {
            model: Some("m".into()),
            revision: Some("r".into()),
            data: Some("d".into()),
            tokenizer: Some("t".into()),
            template: "qwen".into(),
            system: Some("s".into()),
            max_length: 7,
            format: Some("alpaca".into()),
            lora_r: 3,
            lora_alpha: 5.0,
            lora_dropout: 0.2,
            target_modules: vec!["all-linear".into()],
            use_rslora: true,
            use_dora: true,
            lora_bias: true,
            init_lora_weights: InitLoraWeights::Named("pissa_niter_4".into()),
            modules_to_save: vec!["lm_head".into(), "embed_tokens".into()],
            trainable_token_indices: vec![1, 2],
            init_adapter: Some("a".into()),
            eval_data: Some("e".into()),
            eval_split: Some(0.1),
            device: "cuda:1".into(),
            devices: Vec::new(),
            padding_free: Some(false),
            bf16: Some(true),
            lint: "warn".into(),
            not_learning_steps: 3,
            dry_run: true,
            memory_budget: Some("9GB".into()),
            load_in_4bit: true,
            bnb_4bit_quant_type: "fp4".into(),
            bnb_4bit_use_double_quant: true,
            bnb_4bit_compute_dtype: Some("bfloat16".into()),
            training: TrainingArguments {
                output_dir: "o".into(),
                per_device_train_batch_size: 2,
                gradient_accumulation_steps: 3,
                learning_rate: -1.0,
                num_train_epochs: 1.5,
                max_steps: Some(9),
                lr_scheduler_type: SchedulerType::Cosine,
                warmup_steps: 4,
                warmup_ratio: 0.3,
                weight_decay: 0.01,
                adam_beta1: 0.8,
                adam_beta2: 0.99,
                adam_epsilon: 1e-6,
                max_grad_norm: 0.0,
                loraplus_lr_ratio: Some(16.0),
                logging_steps: 1,
                save_steps: 2,
                save_total_limit: Some(5),
                eval_steps: Some(6),
                seed: 7,
                shuffle: false,
                gradient_checkpointing: true,
                resume_from_checkpoint: Some("latest".into()),
                overwrite_output_dir: true,
                world_size: 2,
                ddp_timeout: 1800,
                process_group: None,
            },
        };
        assert_eq!(o, want);
        // Booleans also take a value; --output is --output-dir.
        let o = resolve(&[
            "--use-rslora",
            "false",
            "--gradient-checkpointing",
            "false",
            "--padding-free",
            "--output",
            "o",
        ])
        .unwrap();
        assert!(!o.use_rslora && !o.training.gradient_checkpointing);
        assert_eq!(
            (o.padding_free, o.training.output_dir),
            (Some(true), "o".into())
        );
        let o = resolve(&["--use-dora", "false", "--init-lora-weights", "false"]).unwrap();
        assert_eq!(
            (o.use_dora, o.lora_config().init_lora_weights),
            (false, InitLoraWeights::Bool(false))
        );
    }

    /// One list: the flags' names are the config keys, each option has both, and each flag says
    /// what it does in `--help`.
    #[test]
    fn flags_and_config_keys_are_one_list() {
        Cli::command().debug_assert();
        let cmd = Cli::command();
        let mut flags: Vec<&str> = cmd
            .get_arguments()
            .filter(|a| !matches!(a.get_id().as_str(), "config" | "help"))
            .map(|a| a.get_id().as_str())
            .collect();
        let keys = object(&FinetuneOptions::default()).unwrap();
        let mut keys: Vec<&str> = keys.keys().map(String::as_str).collect();
        flags.sort_unstable();
        keys.sort_unstable();
        assert_eq!(flags, keys);
        for a in cmd.get_arguments() {
            assert!(a.get_help().is_some(), "--{} has no help", a.get_id());
        }
    }

    /// The resume command repeats the run's arguments, quoted for a shell, without an earlier
    /// resume or overwrite.
    #[test]
    fn resume_command_repeats_the_run() {
        let args = [
            "finetune",
            "--data",
            "my data.json",
            "--overwrite-output-dir",
            "true",
            "--system",
            "it's",
            "--resume-from-checkpoint=checkpoint-2",
            "--overwrite-output-dir",
            "--max-steps",
            "9",
        ];
        assert_eq!(
            resume_command(args.iter().map(|a| a.to_string())),
            r"cargo xtask finetune --data 'my data.json' --system 'it'\''s' --max-steps 9 --resume-from-checkpoint latest"
        );
        assert_eq!(steps_done(0, 8), "8 steps");
        assert_eq!(
            steps_done(4, 8),
            "steps 5-8 (4 this run, resumed at step 4)"
        );
    }

    /// Options the loop would ignore or that train nothing are refused by name, before any work.
    #[test]
    fn useless_options_are_refused() {
        for (argv, needle) in [
            (&["--lora-alpha", "0"][..], "--lora-alpha 0"),
            (&["--lora-r", "0"], "--lora-r 0"),
            (&["--lora-dropout", "1"], "--lora-dropout 1"),
            (&["--eval-split", "0"], "--eval-split 0"),
            (&["--template", "chatml"], "--template"),
            (&["--bf16"], "--bf16 on --device cpu"),
            (
                &["--init-lora-weights", "pisa"],
                "`init_lora_weights` \"pisa\"",
            ),
            (
                &["--init-lora-weights", "pissa_niter_x"],
                "`init_lora_weights` \"pissa_niter_x\"",
            ),
            (&["--use-dora", "--lora-bias"], "not supported with DoRA"),
            (
                &["--lora-bias", "--weight-decay", "0.01"],
                "--weight-decay 0.01 with --lora-bias",
            ),
            (
                &["--init-lora-weights", "olora", "--load-in-4bit"],
                "--init-lora-weights olora with --load-in-4bit",
            ),
        ] {
            let err = format!("{:#}", resolve(argv).unwrap().validate().unwrap_err());
            assert!(err.contains(needle), "{argv:?}: {err}");
        }
        let o = resolve(&["--device", "cuda", "--bf16", "false"]).unwrap();
        assert_eq!((o.validate().is_ok(), o.dtype()), (true, DType::F32));
        let o = resolve(&["--device", "cuda"]).unwrap();
        assert_eq!(o.dtype(), DType::BF16);
        for argv in [
            &["--use-dora"][..],
            &["--lora-bias"],
            &["--init-lora-weights", "gaussian"],
            &["--init-lora-weights", "pissa_niter_16"],
        ] {
            let o = resolve(argv).unwrap();
            o.validate().unwrap_or_else(|e| panic!("{argv:?}: {e:#}"));
        }
    }

    /// The variants' options reach the adapter's config, from flags and from a config file (whose
    /// `init_lora_weights` may be a boolean or a name, as in `adapter_config.json`); lora_bias is
    /// written only when on, so that PEFT before 0.14 reads a plain adapter's config.
    #[test]
    fn variant_options_reach_the_lora_config() {
        let cfg = resolve(&["--use-dora", "--init-lora-weights", "olora"])
            .unwrap()
            .lora_config();
        assert!(cfg.use_dora && !cfg.lora_bias());
        assert_eq!(
            cfg.init_lora_weights,
            InitLoraWeights::Named("olora".into())
        );
        let cfg = resolve(&[]).unwrap().lora_config();
        assert!(!cfg.use_dora && !cfg.extra.contains_key("lora_bias"));
        assert_eq!(cfg.init_lora_weights, InitLoraWeights::Bool(true));
        let dir = tempfile::tempdir().unwrap();
        for (text, bias, want) in [
            (
                "init_lora_weights = false\nlora_bias = true\n",
                true,
                InitLoraWeights::Bool(false),
            ),
            (
                "init_lora_weights = \"false\"\n",
                false,
                InitLoraWeights::Bool(false),
            ),
            (
                "init_lora_weights = \"pissa\"\n",
                false,
                InitLoraWeights::Named("pissa".into()),
            ),
        ] {
            let o = resolve(&["--config", &file(&dir, "v.toml", text)]).unwrap();
            let cfg = o.lora_config();
            assert_eq!(
                (cfg.lora_bias(), cfg.init_lora_weights),
                (bias, want),
                "{text}"
            );
        }
    }

    #[test]
    fn bad_options_name_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "typo.toml",
                "learning_rat = 1e-3\n",
                "unknown option(s) [\"learning_rat\"]",
            ),
            ("type.toml", "max_length = \"long\"\n", "`max_length`"),
            (
                "enum.json",
                "{\"lr_scheduler_type\": \"step\"}",
                "`lr_scheduler_type`",
            ),
            ("list.json", "[1, 2]", "holds options by name"),
            ("syntax.toml", "max_length = \n", "invalid TOML"),
        ];
        for (name, text, needle) in cases {
            let path = file(&dir, name, text);
            let err = format!("{:#}", resolve(&["--config", &path]).unwrap_err());
            assert!(err.contains(needle) && err.contains(&path), "{name}: {err}");
        }
        let err = resolve(&["--lr-scheduler-type", "step"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `step`"), "{err}");
        let err = resolve(&["--learning-rate", "nan"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a finite number"), "{err}");
    }

    /// `--devices` sets the world size (a list of `cpu` is that many workers on the CPU); under
    /// torchrun the world is WORLD_SIZE and a bare `--device cuda` is `cuda:LOCAL_RANK`.
    #[test]
    fn devices_and_torchrun_place_the_workers() {
        let placed = |argv: &[&str], group: Option<lora_trainer::ProcessGroup>| {
            let mut o = resolve(argv).unwrap();
            place(&mut o, group).map(|()| o)
        };
        let o = placed(&["--devices", "cpu,cpu"], None).unwrap();
        assert_eq!((o.training.world_size, o.device.as_str()), (2, "cpu"));
        assert!(o.devices.is_empty());
        let o = placed(&["--devices", "cuda:0,cuda:1,cuda:1"], None).unwrap();
        assert_eq!((o.training.world_size, o.device.as_str()), (3, "cuda:0"));
        assert_eq!(o.devices.len(), 3);
        for (argv, says) in [
            (&["--devices", "cpu,cuda:0"][..], "mixes the CPU and CUDA"),
            (&["--devices", "cpu,gpu"][..], "--devices \"gpu\""),
            (
                &["--devices", "cpu,cpu", "--world-size", "3"][..],
                "give one of them",
            ),
        ] {
            let err = placed(argv, None).unwrap_err().to_string();
            assert!(err.contains(says), "{argv:?}: {err}");
        }
        let g = lora_trainer::ProcessGroup {
            rank: 3,
            local_rank: 1,
            world_size: 4,
            master_addr: "node-a".into(),
            master_port: 29500,
        };
        let o = placed(&["--device", "cuda"], Some(g.clone())).unwrap();
        assert_eq!((o.training.world_size, o.device.as_str()), (4, "cuda:1"));
        assert_eq!(o.training.process_group, Some(g.clone()));
        let err = placed(&["--world-size", "2"], Some(g.clone()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("WORLD_SIZE=4"), "{err}");
        let err = placed(&["--devices", "cuda:0,cuda:1"], Some(g))
            .unwrap_err()
            .to_string();
        assert!(err.contains("under torchrun"), "{err}");
    }
}
