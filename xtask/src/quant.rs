//! `--load-in-4bit` and its options (transformers' `BitsAndBytesConfig` names), shared by every
//! command that loads a model: the decoder layers' projection weights in bitsandbytes' 4-bit layout
//! (`qwen2::load_model_4bit`), the rest in the compute dtype.

use std::path::Path;

use anyhow::{bail, Context};
use burn::tensor::backend::Backend;
use burn::tensor::DType;
use kernels::quant::Kind;
use qwen2::{Load4bit, LoadedModel};

/// The 4-bit flags.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "QLoRA (transformers' BitsAndBytesConfig)")]
pub struct QuantArgs {
    /// Hold the decoder layers' projection weights in 4 bits, quantized while loading (QLoRA);
    /// embeddings, norms and lm_head stay in the compute dtype.
    #[arg(long)]
    pub load_in_4bit: bool,
    /// nf4 or fp4 [default: nf4].
    #[arg(long, requires = "load_in_4bit", value_parser = ["nf4", "fp4"])]
    pub bnb_4bit_quant_type: Option<String>,
    /// Quantize the block scales too (8 bits, blocks of 256): ~0.37 fewer bits per weight.
    #[arg(long, requires = "load_in_4bit")]
    pub bnb_4bit_use_double_quant: bool,
    /// float32, bfloat16 or float16: the dtype weights are dequantized to for each product
    /// [default: float32].
    #[arg(
        long,
        requires = "load_in_4bit",
        value_parser = ["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"]
    )]
    pub bnb_4bit_compute_dtype: Option<String>,
}

impl QuantArgs {
    /// The 4-bit load these flags ask for, or `None` without `--load-in-4bit`.
    pub fn load4bit(&self) -> anyhow::Result<Option<Load4bit>> {
        load4bit(
            self.load_in_4bit,
            self.bnb_4bit_quant_type.as_deref(),
            self.bnb_4bit_use_double_quant,
            self.bnb_4bit_compute_dtype.as_deref(),
            DType::F32,
        )
    }

    /// Loads `dir` in `dtype`, or in 4 bits with `--load-in-4bit`, saying so.
    pub fn load<B: Backend>(
        &self,
        dir: &Path,
        dtype: DType,
        device: &B::Device,
    ) -> anyhow::Result<LoadedModel<B>> {
        load(self.load4bit()?, dir, dtype, device)
    }
}

/// The checked 4-bit options (shared with `finetune`'s options).
pub fn load4bit(
    on: bool,
    quant_type: Option<&str>,
    double: bool,
    compute_dtype: Option<&str>,
    default_dtype: DType,
) -> anyhow::Result<Option<Load4bit>> {
    if !on {
        return Ok(None);
    }
    let quant_type = match quant_type.unwrap_or("nf4") {
        "nf4" => Kind::Nf4,
        "fp4" => Kind::Fp4,
        other => bail!("--bnb-4bit-quant-type {other:?}: use nf4 or fp4"),
    };
    let compute_dtype = match compute_dtype {
        None => default_dtype,
        Some("float32" | "fp32") => DType::F32,
        Some("bfloat16" | "bf16") => DType::BF16,
        Some("float16" | "fp16") => DType::F16,
        Some(other) => {
            bail!("--bnb-4bit-compute-dtype {other:?}: use float32, bfloat16 or float16")
        }
    };
    Ok(Some(Load4bit {
        quant_type,
        double_quant: double,
        compute_dtype,
    }))
}

/// Loads `dir` in `dtype`, or with its projections in 4 bits.
pub fn load<B: Backend>(
    q: Option<Load4bit>,
    dir: &Path,
    dtype: DType,
    device: &B::Device,
) -> anyhow::Result<LoadedModel<B>> {
    let Some(q) = q else {
        return qwen2::load_model::<B>(dir, dtype, device)
            .with_context(|| format!("loading {}", dir.display()));
    };
    let loaded = qwen2::load_model_4bit::<B>(dir, q, device)
        .with_context(|| format!("loading {} in 4 bits", dir.display()))?;
    let r = &loaded.report;
    eprintln!(
        "4-bit: {} projection weights in {} (blocks of 64{}), {:.1} MiB; the rest in {:?}",
        r.quantized_tensors,
        q.quant_type.name(),
        if q.double_quant {
            ", double-quantized scales"
        } else {
            ""
        },
        r.quantized_bytes as f64 / (1 << 20) as f64,
        q.compute_dtype
    );
    Ok(loaded)
}

/// Bytes of a model held as `load_model_4bit` holds it, from its config alone: the decoder
/// layers' projection weights in 4 bits with their scales, everything else in the compute dtype.
/// Returns `(4-bit part, the rest)`.
pub fn footprint(cfg: &qwen2::Qwen2Config, q: &Load4bit) -> (u64, u64) {
    let layers = cfg.num_hidden_layers as u64;
    // Each projection is quantized as one tensor.
    let per_layer =
        crate::plan::projections(cfg).map(|(_, fan_in, fan_out)| (fan_in * fan_out) as u64);
    let mut quantized = 0u64;
    for n in per_layer {
        let blocks = n.div_ceil(kernels::quant::BLOCK as u64);
        let scales = if q.double_quant {
            blocks + 4 * blocks.div_ceil(kernels::quant::BLOCK2 as u64) + 4
        } else {
            4 * blocks
        };
        quantized += n.div_ceil(2) + scales;
    }
    quantized *= layers;
    let projections = per_layer.iter().sum::<u64>() * layers;
    let rest = cfg.num_parameters() as u64 - projections;
    (quantized, rest * q.compute_dtype.size() as u64)
}

/// Parameters of one decoder layer's seven projections.
pub fn layer_projection_params(cfg: &qwen2::Qwen2Config) -> u64 {
    crate::plan::projections(cfg)
        .iter()
        .map(|&(_, fan_in, fan_out)| (fan_in * fan_out) as u64)
        .sum()
}

/// The weights' share of a QLoRA training step's peak: the 4-bit model, plus the dequantized
/// projections alive at once: one layer's when the step keeps only packed weights for its backward
/// (`one_layer`: the CPU's fused operation, which dequantizes again in the backward, or gradient
/// checkpointing, which recomputes each layer in its own backward), else every layer's.
pub fn training_weights(cfg: &qwen2::Qwen2Config, q: &Load4bit, one_layer: bool) -> f64 {
    let (four, rest) = footprint(cfg, q);
    let bytes = q.compute_dtype.size() as u64;
    let layers = if one_layer {
        1
    } else {
        cfg.num_hidden_layers as u64
    };
    (four + rest + layers * layer_projection_params(cfg) * bytes) as f64
}
