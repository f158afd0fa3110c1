//! `cargo xtask bench-train`: time LoRA training steps of a random-weight Qwen2 on this CPU, with the
//! same model table, LoRA config, data and fields as `../shared/bench/peft_baseline.py`, so the two
//! JSON lines compare side by side. Run each configuration in its own process (peak RSS is the
//! process's).

use std::time::Instant;

use anyhow::{bail, Context};
use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Int, Tensor, TensorData};
use lora_core::apply_lora;
use lora_data::Batch;
use lora_trainer::{clip_global_norm, TrainableLm};
use qwen2::{Qwen2Config, Qwen2ForCausalLM};

/// Arguments of `bench-train`.
#[derive(clap::Args, Debug)]
pub struct BenchTrainArgs {
    /// tiny | mini | 0.5b (the table of peft_baseline.py)
    #[arg(long, default_value = "mini")]
    size: String,
    /// Decoder layers instead of the size's own count.
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 384)]
    seq: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Per-layer activation checkpointing.
    #[arg(long)]
    checkpointing: bool,
    /// cpu | cuda[:N]
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Base-weight dtype: f32 | bf16 (adapters and optimizer state stay f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// QLoRA: the projections in NF4 with double-quantized scales, computed in --dtype.
    #[arg(long)]
    load_in_4bit: bool,
    /// DoRA (PEFT's use_dora) on the same targets (`scripts/peft_bench_real.py --use-dora`).
    #[arg(long)]
    use_dora: bool,
    /// Real batches instead of random tokens: this Huanhuan-style file, tokenized with the `seed`
    /// template (the tutorial's process_func, max length 384), `--batch` records a step in file order,
    /// padding-free or right-padded to the longest (`--seq` is then ignored; tokens/s counts
    /// non-padding tokens).
    #[arg(long)]
    real_data: Option<std::path::PathBuf>,
    /// Tokenizer for `--real-data` (a directory holding tokenizer.json).
    #[arg(long)]
    tokenizer: Option<std::path::PathBuf>,
    /// With `--real-data`: true = each step's records back to back in one row (as `finetune`
    /// does by default); false = right-padded rows, as transformers' DataCollatorForSeq2Seq.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    padding_free: bool,
}

fn config(size: &str) -> anyhow::Result<Qwen2Config> {
    Ok(match size {
        "mini" => Qwen2Config::new(151_936, 896, 4864, 4, 14, 2, true),
        "tiny" => Qwen2Config::new(1024, 64, 172, 2, 4, 2, false),
        "0.5b" => Qwen2Config::new(151_936, 896, 4864, 24, 14, 2, true),
        // Qwen2.5-7B-Instruct's config.json.
        "7b" => Qwen2Config::new(152_064, 3584, 18_944, 28, 28, 4, false),
        s => bail!("--size {s:?}: use tiny, mini, 0.5b or 7b"),
    })
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

pub fn run(a: BenchTrainArgs) -> anyhow::Result<()> {
    let dtype = match a.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        d => bail!("--dtype {d:?}: use f32 or bf16"),
    };
    let spec = a.device.clone();
    crate::on_device!(&spec,
        cpu => run_on::<Autodiff<Flex>>(&a, &Default::default(), dtype),
        cuda(dev) => run_on::<Autodiff<burn::backend::Cuda>>(&a, &dev, dtype),
    )
}

/// Casts every base parameter to `dtype` (adapters are attached afterwards, in f32).
struct Cast(DType);

impl<B: Backend> ModuleMapper<B> for Cast {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let dtype = self.0;
        p.map(|t| t.cast(dtype)).set_require_grad(false)
    }
}

fn run_on<Ad: AutodiffBackend>(
    a: &BenchTrainArgs,
    dev: &Ad::Device,
    dtype: DType,
) -> anyhow::Result<()> {
    let mut cfg = config(&a.size)?;
    if let Some(n) = a.layers {
        cfg.num_hidden_layers = n;
    }
    Ad::seed(dev, 0);
    let mut base = Qwen2ForCausalLM::<Ad>::new(&cfg, dev);
    if dtype != DType::F32 {
        base = base.map(&mut Cast(dtype));
    }
    if a.load_in_4bit {
        base.quantize_4bit(qwen2::Load4bit {
            quant_type: kernels::quant::Kind::Nf4,
            double_quant: true,
            compute_dtype: dtype,
        });
    }
    let mut lora = lora_trainer::recipe::lora_config();
    lora.use_dora = a.use_dora;
    let (mut model, _) = apply_lora(base, &lora)?;
    let mut optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.01)
        .init::<Ad, Qwen2ForCausalLM<Ad>>();
    // One (batch, supervised tokens, real tokens) per step: random tokens with the first third of
    // the labels masked, as the baseline script does, or consecutive real records.
    let mut plan_tokens = a.batch * a.seq;
    let batches = match &a.real_data {
        None => {
            let mut s = 1u64;
            let ids: Vec<i64> = (0..a.batch * a.seq)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((s >> 33) % cfg.vocab_size as u64) as i64
                })
                .collect();
            let labels: Vec<i64> = ids
                .iter()
                .enumerate()
                .map(|(i, &t)| if i % a.seq < a.seq / 3 { -100 } else { t })
                .collect();
            let t = |v: Vec<i64>| {
                Tensor::<Ad, 2, Int>::from_data(TensorData::new(v, [a.batch, a.seq]), dev)
            };
            let batch = Batch {
                input_ids: t(ids),
                attention_mask: t(vec![1; a.batch * a.seq]),
                labels: t(labels),
                seq_lens: None,
            };
            let n_sup = a.batch * (a.seq - 1 - (a.seq / 3).saturating_sub(1));
            vec![(batch, n_sup, a.batch * a.seq); a.steps + 1]
        }
        Some(file) => {
            let tok = a
                .tokenizer
                .clone()
                .context("--real-data needs --tokenizer DIR")?;
            let spec = crate::data::DataSpec {
                tokenizer: &tok,
                template: "seed",
                system: Some(lora_data::SEED_DEFAULT_SYSTEM.into()),
                max_length: 384,
                format: None,
                padding_free: a.padding_free,
                lint_model: None,
            };
            let data = crate::data::load(file, &spec, "bench data")?;
            let max_id = data
                .examples
                .iter()
                .flat_map(|e| e.input_ids.iter())
                .max()
                .copied();
            if max_id.is_some_and(|m| m as usize >= cfg.vocab_size) {
                bail!(
                    "--real-data: token ids reach {:?} but --size {} has a vocabulary of {}; use mini or larger",
                    max_id, a.size, cfg.vocab_size
                );
            }
            let need = (a.steps + 1) * a.batch;
            if data.examples.len() < need {
                bail!(
                    "--real-data has {} usable records; {need} needed",
                    data.examples.len()
                );
            }
            // The largest micro-batch, padding included, for the memory plan.
            plan_tokens = data.examples[..need]
                .chunks(a.batch)
                .map(|c| {
                    let lens = c.iter().map(|e| e.input_ids.len());
                    if a.padding_free {
                        lens.sum()
                    } else {
                        c.len() * lens.max().unwrap_or(0)
                    }
                })
                .max()
                .unwrap_or(0);
            data.examples[..need]
                .chunks(a.batch)
                .map(|c| {
                    let refs: Vec<&lora_data::Example> = c.iter().collect();
                    let sup = c
                        .iter()
                        .map(|e| e.labels[1..].iter().filter(|&&l| l != -100).count())
                        .sum();
                    let real = c.iter().map(|e| e.input_ids.len()).sum();
                    (data.collator.collate::<Ad>(&refs, dev), sup, real)
                })
                .collect()
        }
    };
    let mut times = Vec::new();
    let mut real_tokens = 0usize;
    let mut loss = 0.0;
    for (step, (batch, n_sup, real)) in batches.iter().enumerate() {
        let t0 = Instant::now();
        let (v, mut grads): (f64, GradientsParams) =
            model.loss_and_grads(batch, *n_sup as f64, a.checkpointing, step as u64);
        clip_global_norm(&model, &mut grads, 1.0);
        model = optim.step(1e-4, model, grads);
        // Wait for the device to finish the step before stopping the clock.
        crate::device::sync::<Ad>(dev)?;
        if step > 0 {
            times.push(t0.elapsed().as_secs_f64());
            real_tokens += real;
        }
        loss = v;
    }
    let _ = model.valid();
    let total_s: f64 = times.iter().sum();
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    // Random data: batch x seq per median step (as the baseline script); real data: the non-padding
    // tokens of the timed steps over their total time.
    let tokens_per_s = match a.real_data {
        None => (a.batch * a.seq) as f64 / med,
        Some(_) => real_tokens as f64 / total_s,
    };
    // Model FLOPs of a LoRA step with a frozen base: forward (2N per token) and the input gradient
    // in backward (2N), plus attention scores and values (forward and backward, 3 x 4·s·h per
    // token per layer, causal halved); the adapters' own FLOPs are negligible at r = 8.
    let n_matmul = (cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size) as f64
        + if cfg.tie_word_embeddings {
            (cfg.vocab_size * cfg.hidden_size) as f64
        } else {
            0.0
        };
    // Tokens of a step and the (mean) sequence length: real batches vary, random ones do not.
    let tokens = match a.real_data {
        None => (a.batch * a.seq) as f64,
        Some(_) => real_tokens as f64 / times.len() as f64,
    };
    let seq = tokens / a.batch as f64;
    let attn = 3.0 * 2.0 * seq * (cfg.hidden_size as f64) * cfg.num_hidden_layers as f64;
    let flops = tokens * (4.0 * n_matmul + attn);
    let plan = crate::plan::Plan::new(&crate::plan::PlanInput {
        config: &cfg,
        lora_params: crate::plan::lora_params(
            &cfg,
            lora.r,
            &lora_trainer::recipe::TUTORIAL_TARGETS.map(String::from),
            usize::from(a.use_dora),
        ),
        weight_bytes: if dtype == DType::F32 { 4 } else { 2 },
        tokens: plan_tokens as u64,
        checkpointing: a.checkpointing,
    });
    let line = serde_json::json!({
        "impl": format!("ferrolora-burn-{}", Ad::name(dev)), "size": a.size, "batch": a.batch, "seq": a.seq,
        "dtype": a.dtype, "device": a.device, "flops_per_step": flops,
        "tflops_per_s": (flops / med / 1e12 * 1000.0).round() / 1000.0,
        "threads": rayon_threads(), "checkpointing": a.checkpointing, "use_dora": a.use_dora,
        "step_s_median": (med * 1e4).round() / 1e4,
        "tokens_per_s": (tokens_per_s * 10.0).round() / 10.0,
        "real_data": a.real_data.is_some(),
        "padding_free": a.real_data.is_some() && a.padding_free,
        "peak_rss_mib": (peak_rss_mib() * 10.0).round() / 10.0,
        "plan_mib": (plan.total() / (1024.0 * 1024.0) * 10.0).round() / 10.0,
        "loss": (loss * 1e4).round() / 1e4,
    });
    outln!("{line}");
    Ok(())
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
