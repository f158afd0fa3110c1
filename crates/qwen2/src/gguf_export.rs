//! Writing a Qwen2 model, or a LoRA adapter of one, as llama.cpp's GGUF: what its
//! `convert_hf_to_gguf.py` (class `Qwen2Model`) and `convert_lora_to_gguf.py` write.
//!
//! - Tensor names are llama.cpp's (`token_embd.weight`, `blk.N.attn_q.weight`/`.bias`, ...,
//!   `output_norm.weight`, `output.weight`); a tied model has no `output.weight` and llama.cpp
//!   uses the embedding. Data keeps the PyTorch layout: `[out, in]` is ggml's `ne = [in, out]`
//!   with the same bytes. Qwen2's q/k are not permuted (only llama's converter does that).
//! - Types follow the converter: 1-D tensors (norms, biases) stay f32; 2-D weights take the chosen
//!   type; for q8_0 a weight whose rows are not whole blocks of 32 falls back to f16.
//! - Metadata: `general.*`, the `qwen2.*` hyperparameters llama.cpp's loader reads, and the
//!   tokenizer ([`crate::tokenizer_metadata`]).
//!
//! A LoRA adapter GGUF holds `<base tensor>.lora_a` (`[r, in]`) and `.lora_b` (`[out, r]`), as
//! PEFT stores A and B; llama.cpp scales the product by `adapter.lora.alpha / r`. It has no place
//! for DoRA's magnitudes or `lora_bias`'s biases: such adapters are refused there, and exported
//! merged (the merged model folds both, as `merge_all` does).

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use gguf::{GgmlType, TensorInfo, Value};
use lora_core::{LoraLinear, LoraModel};

use crate::error::Qwen2Error;
use crate::stream::CheckpointReader;
use crate::{Qwen2Config, Qwen2ForCausalLM};

/// The tensor type chosen for a GGUF export (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufDtype {
    /// Every tensor f32 (`general.file_type` 0, `ALL_F32`).
    F32,
    /// 2-D weights f16 (`MOSTLY_F16`, 1).
    F16,
    /// 2-D weights bf16 (`MOSTLY_BF16`, 32).
    Bf16,
    /// 2-D weights q8_0 (`MOSTLY_Q8_0`, 7).
    Q8_0,
}

impl GgufDtype {
    /// Parses `f32`, `f16`, `bf16` or `q8_0`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::Bf16,
            "q8_0" => Self::Q8_0,
            _ => return None,
        })
    }

    /// llama.cpp's `llama_ftype` number (`general.file_type`).
    pub fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
            Self::Bf16 => 32,
        }
    }

    /// The type a tensor of `shape` (PyTorch order) is stored in.
    fn tensor_type(self, shape: &[usize]) -> GgmlType {
        if shape.len() < 2 {
            return GgmlType::F32;
        }
        match self {
            Self::F32 => GgmlType::F32,
            Self::F16 => GgmlType::F16,
            Self::Bf16 => GgmlType::Bf16,
            Self::Q8_0 if shape[shape.len() - 1].is_multiple_of(gguf::quant::Q8_0_BLOCK) => {
                GgmlType::Q8_0
            }
            Self::Q8_0 => GgmlType::F16,
        }
    }
}

/// llama.cpp's name for the tensor at checkpoint key `key` (`None` for a key it has no name for).
pub fn gguf_tensor_name(key: &str) -> Option<String> {
    match key {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = key.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    if !matches!(param, "weight" | "bias") {
        return None;
    }
    let name = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{name}.{param}"))
}

/// The `qwen2.*` hyperparameters llama.cpp reads (`LLM_ARCH_QWEN2` in `llama-model.cpp`), as the
/// converter writes them.
pub fn hparams_metadata(cfg: &Qwen2Config) -> Vec<(String, Value)> {
    let u = |k: &str, v: usize| (format!("qwen2.{k}"), Value::U32(v as u32));
    vec![
        u("block_count", cfg.num_hidden_layers),
        u("context_length", cfg.max_position_embeddings),
        u("embedding_length", cfg.hidden_size),
        u("feed_forward_length", cfg.intermediate_size),
        u("attention.head_count", cfg.num_attention_heads),
        u("attention.head_count_kv", cfg.num_key_value_heads()),
        (
            "qwen2.rope.freq_base".into(),
            Value::F32(cfg.rope_theta() as f32),
        ),
        (
            "qwen2.attention.layer_norm_rms_epsilon".into(),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
    ]
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct GgufExport {
    /// The writer's report (tensors, file size, largest tensor).
    pub report: gguf::WriteReport,
    /// Tensors per GGUF type.
    pub types: Vec<(GgmlType, usize)>,
}

/// Writes the checkpoint `ckpt` as a GGUF model file at `path`, with the adapters attached to
/// `adapter` (a model built lazily from the same config, then given the adapter with
/// `lora_core::load_adapter`: its base weights are never read) merged in, by
/// `LoraLinear::merged_weight` (DoRA included) and, for `lora_bias`, `LoraLinear::merged_bias`
/// on the base's `.bias`: the very folds `merge_all` does. Metadata: `general.*`, the
/// hyperparameters, then `extra` (the tokenizer's). Each tensor is read from disk, merged,
/// converted and written before the next is read, so the memory held is one tensor (and the
/// adapter), never the model.
pub fn export_gguf<B: Backend>(
    ckpt: &CheckpointReader,
    adapter: Option<&mut Qwen2ForCausalLM<B>>,
    name: &str,
    dtype: GgufDtype,
    extra: Vec<(String, Value)>,
    path: &Path,
    device: &B::Device,
) -> Result<GgufExport, Qwen2Error> {
    let mut infos = Vec::with_capacity(ckpt.params.len());
    for (key, shape) in &ckpt.params {
        let name = gguf_tensor_name(key).ok_or_else(|| Qwen2Error::Write {
            path: path.to_path_buf(),
            reason: format!("llama.cpp's qwen2 has no tensor for `{key}`"),
        })?;
        infos.push(TensorInfo {
            name,
            shape: shape.clone(),
            ty: dtype.tensor_type(shape),
        });
    }
    // Whole tensors the adapter replaces: the modules it trained in full (`modules_to_save`: the
    // only base parameters a lazy model with an adapter holds), and the embedding with trained
    // token rows written in.
    let mut replaced: HashMap<String, Tensor<B, 1>> = HashMap::new();
    let mut embedding = None;
    if let Some(model) = adapter.as_deref() {
        lora_core::visit_params(model, |p: lora_core::ParamRef<'_, B>| {
            if p.loaded && !p.is_adapter() {
                replaced.insert(p.path.to_string(), p.flat().detach());
            }
        });
        if model.model.embed_tokens.token_adapter.is_some() {
            embedding = Some(model.model.embed_tokens.clone());
        }
    }
    // Weight key (and, with lora_bias, bias key) → its layer with the adapter attached (base
    // weight lazy: never materialized).
    let mut linears: HashMap<String, (String, &LoraLinear<B>)> = HashMap::new();
    if let Some(model) = adapter {
        for (module, linear) in model.lora_linears() {
            let linear: &LoraLinear<B> = linear;
            if !linear.has_adapter() {
                continue;
            }
            if linear.lora_bias().is_some() {
                let bias = format!("{module}.bias");
                if !ckpt.params.iter().any(|(k, _)| *k == bias) {
                    return Err(Qwen2Error::Write {
                        path: path.to_path_buf(),
                        reason: format!(
                            "the adapter has lora_bias = true but `{module}` has no bias in the \
                             base model, so it cannot be merged (PEFT refuses it too); retrain \
                             without lora_bias on that module"
                        ),
                    });
                }
                linears.insert(bias, (module.clone(), linear));
            }
            linears.insert(format!("{module}.weight"), (module, linear));
        }
    }
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            Value::String("qwen2".into()),
        ),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(dtype.file_type())),
        // GGML_QUANT_VERSION, written by the converter for every file.
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    meta.extend(hparams_metadata(&ckpt.config));
    meta.extend(extra);
    let keys: Vec<&str> = ckpt.params.iter().map(|(k, _)| k.as_str()).collect();
    write(path, &meta, infos, |i, info| {
        if let Some(t) = replaced.get(keys[i]) {
            return to_f32(t.clone());
        }
        let values = ckpt.read_f32(keys[i]).map_err(|e| e.to_string())?;
        if let (Some(e), "model.embed_tokens.weight") = (&embedding, keys[i]) {
            let w = Tensor::<B, 2>::from_data(
                TensorData::new(values, [info.shape[0], info.shape[1]]),
                (device, DType::F32),
            );
            return to_f32(e.merged_weight(w).reshape([-1]));
        }
        let Some((module, linear)) = linears.get(keys[i]) else {
            return Ok(values);
        };
        if info.shape.len() == 1 {
            let b = Tensor::<B, 1>::from_data(
                TensorData::new(values, [info.shape[0]]),
                (device, DType::F32),
            );
            return to_f32(linear.merged_bias(b, module).map_err(|e| e.to_string())?);
        }
        let w = Tensor::<B, 2>::from_data(
            TensorData::new(values, [info.shape[0], info.shape[1]]),
            (device, DType::F32),
        );
        let merged = linear.merged_weight(w, module).map_err(|e| e.to_string())?;
        to_f32(merged.reshape([-1]))
    })
}

/// A tensor's values as f32.
fn to_f32<B: Backend>(t: Tensor<B, 1>) -> Result<Vec<f32>, String> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| format!("{e:?}"))
}

/// Writes the LoRA adapters attached to `model` (not merged) as a GGUF LoRA adapter at `path`,
/// which llama.cpp applies on top of the base model's GGUF (`--lora`). `alpha` is written as
/// `adapter.lora.alpha`; llama.cpp scales each product by `alpha / r`, so a module whose scaling
/// differs (rsLoRA, `rank_pattern`/`alpha_pattern`) gets that ratio folded into its B. An adapter
/// with DoRA magnitudes or `lora_B` biases is refused: the format has no tensor for them.
pub fn export_gguf_lora<B: Backend>(
    model: &mut Qwen2ForCausalLM<B>,
    name: &str,
    alpha: f64,
    dtype: GgufDtype,
    path: &Path,
) -> Result<GgufExport, Qwen2Error> {
    if dtype == GgufDtype::Q8_0 {
        return Err(Qwen2Error::Write {
            path: path.to_path_buf(),
            reason: "a LoRA adapter is written as f32, f16 or bf16 (its rank-r rows are not q8_0 \
                     blocks): pass --dtype f32, f16 or bf16"
                .into(),
        });
    }
    let ty = match dtype {
        GgufDtype::F16 => GgmlType::F16,
        GgufDtype::Bf16 => GgmlType::Bf16,
        _ => GgmlType::F32,
    };
    let mut infos = Vec::new();
    let mut factors: Vec<(Tensor<B, 1>, f64)> = Vec::new();
    for (module, linear) in model.lora_linears() {
        let (Some(a), Some(b)) = (linear.lora_A.as_ref(), linear.lora_B.as_ref()) else {
            continue;
        };
        if linear.merged {
            return Err(Qwen2Error::Write {
                path: path.to_path_buf(),
                reason: format!("the adapter of `{module}` is merged; export it unmerged"),
            });
        }
        let extra = match (linear.is_dora(), linear.lora_bias().is_some()) {
            (true, _) => Some("DoRA magnitudes (use_dora)"),
            (_, true) => Some("lora_B biases (lora_bias)"),
            _ => None,
        };
        if let Some(what) = extra {
            return Err(Qwen2Error::Write {
                path: path.to_path_buf(),
                reason: format!(
                    "the adapter has {what}, which llama.cpp's LoRA adapter format cannot hold \
                     (only lora_a and lora_b): export the merged model instead (--format gguf)"
                ),
            });
        }
        let base =
            gguf_tensor_name(&format!("{module}.weight")).ok_or_else(|| Qwen2Error::Write {
                path: path.to_path_buf(),
                reason: format!("llama.cpp has no tensor for the LoRA module `{module}`"),
            })?;
        let (a, b) = (a.weight.val(), b.weight.val());
        let r = a.dims()[0];
        // llama.cpp multiplies B·A by alpha / r; fold any other scaling into B.
        let scale = linear.scaling * r as f64 / alpha;
        for (suffix, t, scale) in [("lora_a", a, 1.0), ("lora_b", b, scale)] {
            infos.push(TensorInfo {
                name: format!("{base}.{suffix}"),
                shape: t.dims().to_vec(),
                ty,
            });
            factors.push((t.reshape([-1]), scale));
        }
    }
    if infos.is_empty() {
        return Err(Qwen2Error::Write {
            path: path.to_path_buf(),
            reason: "the model carries no LoRA adapter to export".into(),
        });
    }
    let meta = vec![
        (
            "general.architecture".to_string(),
            Value::String("qwen2".into()),
        ),
        ("general.type".into(), Value::String("adapter".into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(dtype.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        ("adapter.type".into(), Value::String("lora".into())),
        ("adapter.lora.alpha".into(), Value::F32(alpha as f32)),
    ];
    write(path, &meta, infos, |i, _| {
        let (t, scale) = &factors[i];
        if *scale == 1.0 {
            to_f32(t.clone())
        } else {
            to_f32(t.clone().mul_scalar(*scale))
        }
    })
}

/// Writes the file, counting the tensors of each type; `data(i, info)` gives tensor `i`'s values.
fn write(
    path: &Path,
    meta: &[(String, Value)],
    infos: Vec<TensorInfo>,
    data: impl FnMut(usize, &TensorInfo) -> Result<Vec<f32>, String>,
) -> Result<GgufExport, Qwen2Error> {
    let mut types: Vec<(GgmlType, usize)> = Vec::new();
    for i in &infos {
        match types.iter_mut().find(|(t, _)| *t == i.ty) {
            Some((_, n)) => *n += 1,
            None => types.push((i.ty, 1)),
        }
    }
    let report = gguf::write_gguf(path, meta, &infos, data)?;
    Ok(GgufExport { report, types })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_llama_cpp_s() {
        let cases = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
            (
                "model.layers.0.input_layernorm.weight",
                "blk.0.attn_norm.weight",
            ),
            (
                "model.layers.3.self_attn.q_proj.weight",
                "blk.3.attn_q.weight",
            ),
            ("model.layers.3.self_attn.q_proj.bias", "blk.3.attn_q.bias"),
            ("model.layers.3.self_attn.k_proj.bias", "blk.3.attn_k.bias"),
            (
                "model.layers.3.self_attn.v_proj.weight",
                "blk.3.attn_v.weight",
            ),
            (
                "model.layers.12.self_attn.o_proj.weight",
                "blk.12.attn_output.weight",
            ),
            (
                "model.layers.1.post_attention_layernorm.weight",
                "blk.1.ffn_norm.weight",
            ),
            (
                "model.layers.1.mlp.gate_proj.weight",
                "blk.1.ffn_gate.weight",
            ),
            ("model.layers.1.mlp.up_proj.weight", "blk.1.ffn_up.weight"),
            (
                "model.layers.1.mlp.down_proj.weight",
                "blk.1.ffn_down.weight",
            ),
        ];
        for (hf, want) in cases {
            assert_eq!(gguf_tensor_name(hf).as_deref(), Some(want), "{hf}");
        }
        for bad in [
            "model.layers.x.mlp.up_proj.weight",
            "model.layers.0.mlp.up_proj.lora_A.weight",
            "rotary_emb.inv_freq",
        ] {
            assert_eq!(gguf_tensor_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn types_follow_the_converter() {
        use GgmlType::*;
        assert_eq!(GgufDtype::Bf16.tensor_type(&[64]), F32);
        assert_eq!(GgufDtype::Bf16.tensor_type(&[64, 64]), Bf16);
        assert_eq!(GgufDtype::Q8_0.tensor_type(&[64, 64]), Q8_0);
        assert_eq!(GgufDtype::Q8_0.tensor_type(&[64, 48]), F16);
        assert_eq!(GgufDtype::Q8_0.tensor_type(&[64]), F32);
        assert_eq!(GgufDtype::parse("Q8_0"), Some(GgufDtype::Q8_0));
        assert_eq!(GgufDtype::parse("q4_0"), None);
    }
}
