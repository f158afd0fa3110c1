//! `Qwen2Config`: Hugging Face `config.json` for `Qwen2ForCausalLM`, deserialized as shipped.
//!
//! Accepts both layouts seen in the wild: transformers 4.x (`rope_theta`, `torch_dtype`,
//! `sliding_window: 32768`) and transformers 5 (`rope_parameters.rope_theta`, `dtype`,
//! `sliding_window: null`). Unknown keys are ignored; defaults equal transformers' `Qwen2Config`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Qwen2Error;

/// The architecture hyper-parameters of a Qwen2 / Qwen2.5 model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen2Config {
    /// Vocabulary size: rows of `embed_tokens` and `lm_head`.
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// Width of the residual stream.
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP (`gate_proj`/`up_proj` output).
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    /// Number of decoder layers.
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    /// Query heads.
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); `None` means equal to `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// MLP activation; only `silu` exists in Qwen2.
    #[serde(default = "d_act")]
    pub hidden_act: String,
    /// Longest position the model was trained for (informational; RoPE has no table limit here).
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    /// Std of the normal init of random weights.
    #[serde(default = "d_init_range")]
    pub initializer_range: f64,
    /// Epsilon of every RMSNorm.
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (transformers 4.x layout). Use [`Qwen2Config::rope_theta`] to read it.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE parameters (transformers 5 layout: `{"rope_theta": .., "rope_type": "default"}`).
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// RoPE scaling (transformers 4.x); only absent/`null` or type `default` is supported.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Whether `lm_head` shares `embed_tokens.weight` (Qwen2.5 0.5B–3B: true; 7B: false).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Sliding-window attention switch; Qwen2.5 ships `false`, which is all this crate implements.
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Window size when `use_sliding_window` (may be `null`).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Attention-probability dropout; Qwen2.5 ships 0.0.
    #[serde(default)]
    pub attention_dropout: f64,
    /// Beginning-of-sequence token id, when the file names one.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End token id(s): a number or a list in the file.
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Storage dtype of the checkpoint (`torch_dtype` in 4.x files).
    #[serde(default)]
    pub torch_dtype: Option<String>,
    /// Storage dtype of the checkpoint (`dtype` in transformers-5 files).
    #[serde(default)]
    pub dtype: Option<String>,
    /// `model_type` as written (expected `qwen2`).
    #[serde(default)]
    pub model_type: Option<String>,
}

/// RoPE parameters in the transformers-5 layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    /// RoPE base frequency.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// `default` is the only type supported.
    #[serde(default)]
    pub rope_type: Option<String>,
}

/// One token id or several, as `eos_token_id` may be either.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// A list of ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

fn d_vocab() -> usize {
    151_936
}
fn d_hidden() -> usize {
    4096
}
fn d_intermediate() -> usize {
    22_016
}
fn d_layers() -> usize {
    32
}
fn d_heads() -> usize {
    32
}
fn d_act() -> String {
    "silu".into()
}
fn d_max_pos() -> usize {
    32_768
}
fn d_init_range() -> f64 {
    0.02
}
fn d_eps() -> f64 {
    1e-6
}

/// transformers' default RoPE base for Qwen2 when the file names none.
const DEFAULT_ROPE_THETA: f64 = 10_000.0;

impl Qwen2Config {
    /// A config with the given shape and Qwen2.5's other settings (theta 1e6, eps 1e-6).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        tie_word_embeddings: bool,
    ) -> Self {
        Self {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: Some(num_key_value_heads),
            hidden_act: d_act(),
            max_position_embeddings: d_max_pos(),
            initializer_range: d_init_range(),
            rms_norm_eps: d_eps(),
            rope_theta: Some(1_000_000.0),
            rope_parameters: None,
            rope_scaling: None,
            tie_word_embeddings,
            use_sliding_window: false,
            sliding_window: None,
            attention_dropout: 0.0,
            bos_token_id: None,
            eos_token_id: None,
            torch_dtype: None,
            dtype: None,
            model_type: Some("qwen2".into()),
        }
    }

    /// Parses `config.json` text and validates it.
    pub fn from_json_str(text: &str) -> Result<Self, Qwen2Error> {
        let raw: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Qwen2Error::ConfigParse {
                path: None,
                reason: e.to_string(),
            })?;
        // A checkpoint quantized by bitsandbytes, GPTQ, AWQ, ...: its weights are not floats.
        if let Some(q) = raw.get("quantization_config").filter(|q| !q.is_null()) {
            let method = q
                .get("quant_method")
                .and_then(|m| m.as_str())
                .unwrap_or("unknown");
            return Err(Qwen2Error::InvalidConfig {
                path: None,
                reason: format!(
                    "the checkpoint is already quantized (quantization_config.quant_method \
                     {method:?}), which this loader does not read: use the full-precision original \
                     (f32/bf16/f16 weights); `--load-in-4bit` quantizes it while loading"
                ),
            });
        }
        let cfg: Self = serde_json::from_value(raw).map_err(|e| Qwen2Error::ConfigParse {
            path: None,
            reason: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and validates a `config.json` file; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self, Qwen2Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Qwen2Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| e.with_path(path))
    }

    /// Key/value heads, resolving the `None` default.
    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Query heads served by each key/value head.
    pub fn num_key_value_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads().max(1)
    }

    /// RoPE base from whichever layout the file used (transformers-5 `rope_parameters` first).
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(DEFAULT_ROPE_THETA)
    }

    /// The checkpoint's storage dtype name (`dtype` or `torch_dtype`), if the file says.
    pub fn storage_dtype(&self) -> Option<&str> {
        self.dtype.as_deref().or(self.torch_dtype.as_deref())
    }

    /// Number of parameters of the full model (embeddings, layers, final norm, untied head).
    /// Saturates at `usize::MAX` for sizes whose count overflows, which `validate` refuses.
    pub fn num_parameters(&self) -> usize {
        self.checked_num_parameters().unwrap_or(usize::MAX)
    }

    /// [`Self::num_parameters`], or `None` when the count does not fit in `usize`.
    fn checked_num_parameters(&self) -> Option<usize> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let mul = usize::checked_mul;
        let sum = |xs: &[usize]| xs.iter().try_fold(0usize, |a, &x| a.checked_add(x));
        let kv = mul(self.num_key_value_heads(), self.head_dim())?;
        let hh = mul(h, h)?;
        // q (with bias), k and v (with bias), o.
        let attn = sum(&[hh, h, mul(2, sum(&[mul(h, kv)?, kv])?)?, hh])?;
        let layer = sum(&[attn, mul(3, mul(h, i)?)?, mul(2, h)?])?;
        let head = if self.tie_word_embeddings {
            0
        } else {
            mul(v, h)?
        };
        sum(&[mul(v, h)?, mul(self.num_hidden_layers, layer)?, h, head])
    }

    /// Rejects configs no Qwen2 model can have, with the reason and what to change.
    pub fn validate(&self) -> Result<(), Qwen2Error> {
        let bad = |reason: String| Err(Qwen2Error::InvalidConfig { path: None, reason });
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads()),
        ] {
            if v == 0 {
                return bad(format!("`{name}` is 0; it must be at least 1"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "`hidden_size` {} is not divisible by `num_attention_heads` {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads())
        {
            return bad(format!(
                "`num_attention_heads` {} is not divisible by `num_key_value_heads` {}",
                self.num_attention_heads,
                self.num_key_value_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim (hidden_size / num_attention_heads) is {}, but rotary embeddings need it even",
                self.head_dim()
            ));
        }
        if self.hidden_act != "silu" {
            return bad(format!(
                "`hidden_act` is {:?}; Qwen2 uses \"silu\" and no other activation is implemented",
                self.hidden_act
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!(
                "`rms_norm_eps` is {}; it must be > 0",
                self.rms_norm_eps
            ));
        }
        let theta = self.rope_theta();
        if !(theta.is_finite() && theta > 0.0) {
            return bad(format!("`rope_theta` is {theta}; it must be > 0"));
        }
        if let Some(t) = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_type.as_deref())
        {
            if t != "default" {
                return bad(format!(
                    "`rope_parameters.rope_type` is {t:?}; only \"default\" RoPE is implemented"
                ));
            }
        }
        if let Some(s) = &self.rope_scaling {
            let kind = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(|v| v.as_str());
            if !s.is_null() && kind != Some("default") {
                return bad(format!(
                    "`rope_scaling` {s} is not supported (only unscaled RoPE); remove it to run at the base context length"
                ));
            }
        }
        if self.checked_num_parameters().is_none() {
            return bad(format!(
                "the sizes (vocab_size {}, hidden_size {}, intermediate_size {}, \
                 num_hidden_layers {}) give more parameters than this machine can count; check \
                 them against the model's card",
                self.vocab_size, self.hidden_size, self.intermediate_size, self.num_hidden_layers
            ));
        }
        if self.use_sliding_window {
            return bad(
                "`use_sliding_window` is true; sliding-window attention is not implemented \
                 (Qwen2.5 ships false)"
                    .into(),
            );
        }
        if let Some(mt) = &self.model_type {
            if mt != "qwen2" {
                return bad(format!(
                    "`model_type` is {mt:?}; this crate loads \"qwen2\" models"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `model_config` fuzz target (`[18446744073709551615]`: serde reads a JSON array
    /// as the fields in order, so `vocab_size` = 2^64 - 1 and the rest default): sizes whose
    /// parameter count overflows `usize` passed `validate`, and `num_parameters` then panicked
    /// (debug) or wrapped (release).
    #[test]
    fn sizes_whose_parameter_count_overflows_are_refused() {
        for text in ["[18446744073709551615]", r#"{"hidden_size": 10000000000}"#] {
            let e = Qwen2Config::from_json_str(text).unwrap_err();
            assert!(
                matches!(e, Qwen2Error::InvalidConfig { .. })
                    && e.to_string().contains("vocab_size"),
                "{text}: {e}"
            );
        }
        let mut cfg = Qwen2Config::new(8, 4, 8, 1, 2, 1, false);
        assert_eq!(
            cfg.num_parameters(),
            2 * 8 * 4 + 4 * 4 + 4 + 2 * (4 * 2 + 2) + 4 * 4 + 3 * 4 * 8 + 2 * 4 + 4
        );
        cfg.vocab_size = usize::MAX / 2;
        assert_eq!(cfg.num_parameters(), usize::MAX);
        assert!(cfg.validate().is_err());
    }
}
