//! `LoraConfig`: a serde mirror of PEFT's `adapter_config.json` (`peft.LoraConfig`).
//!
//! Field names, defaults and matching rules are PEFT's. Fields this crate does not interpret are kept
//! in `extra` (and written back), so a config read from PEFT round-trips; features that change the
//! math and are not implemented (`fan_in_fan_out`, `layer_replication`, ...) are refused by
//! [`LoraConfig::validate`] with their names, never silently ignored.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::LoraError;

/// `target_modules` / `exclude_modules`: a list of names (matched exactly or as a `.suffix`), or one
/// string that must match the whole module path as a regex (`"all-linear"` is special).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModuleSelector {
    /// Exact names or dotted suffixes.
    List(Vec<String>),
    /// A regex matched against the full module path, or `"all-linear"`.
    Regex(String),
}

/// `layers_to_transform`: one layer index or several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerSelector {
    /// A single layer.
    One(usize),
    /// Several layers.
    Many(Vec<usize>),
}

/// `init_lora_weights`: `true` (PEFT default), `false`, or a named scheme (`"gaussian"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    /// `true`: A Kaiming-uniform (a = √5), B zero; `false`: both Kaiming-uniform (for tests).
    Bool(bool),
    /// `"gaussian"`: A normal with std 1/r, B zero; `"pissa"`, `"pissa_niter_N"`, `"olora"`: from
    /// the base weight's SVD / QR, the base becoming the residual ([`crate::init`]). Other names
    /// are refused by `validate`.
    Named(String),
}

/// One entry of `trainable_token_indices`: the embedding's module name (`None`: the input
/// embedding) and the token ids whose rows train.
pub type TokenIndices = (Option<String>, Vec<usize>);

/// PEFT's LoRA configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Always `"LORA"`.
    #[serde(default = "d_peft_type")]
    pub peft_type: String,
    /// PEFT task type; `"CAUSAL_LM"` for language models.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Rank of the update (`lora_A` has `r` rows).
    #[serde(default = "d_r")]
    pub r: usize,
    /// Scale numerator: the update is multiplied by `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA).
    #[serde(default = "d_alpha")]
    pub lora_alpha: f64,
    /// Dropout probability on the adapter's input.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Which modules get an adapter.
    #[serde(default)]
    pub target_modules: Option<ModuleSelector>,
    /// Modules never adapted, even when targeted. Omitted from the file when unset: PEFT releases
    /// before 0.14 (the tutorial's 0.11.1 among them) refuse configs with fields they do not know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_modules: Option<ModuleSelector>,
    /// Restrict list-targeted modules to these layer indices.
    #[serde(default)]
    pub layers_to_transform: Option<LayerSelector>,
    /// The name of the layer list in module paths (default: any `name.<index>.` segment).
    #[serde(default)]
    pub layers_pattern: Option<ModuleSelector>,
    /// Per-module rank overrides: regex (matched as a path suffix) → rank.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides: regex (matched as a path suffix) → alpha.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// rsLoRA: scale by `lora_alpha / sqrt(r)`.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA: a trained magnitude per output row (`lora_magnitude_vector`).
    #[serde(default)]
    pub use_dora: bool,
    /// Which biases train: only `"none"` is supported.
    #[serde(default = "d_bias")]
    pub bias: String,
    /// Adapter initialization.
    #[serde(default = "d_init")]
    pub init_lora_weights: InitLoraWeights,
    /// Modules trained and saved in full (e.g. `["lm_head", "embed_tokens"]`), matched as PEFT
    /// matches them: the module path ends with the name.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Base weight stored `[in, out]` (GPT-2 Conv1D); only `false` is supported.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// The base model this adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Base model revision.
    #[serde(default)]
    pub revision: Option<String>,
    /// Whether the adapter was saved for inference.
    #[serde(default)]
    pub inference_mode: bool,
    /// Every other field of the file, kept as read and written back.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn d_peft_type() -> String {
    "LORA".into()
}
fn d_r() -> usize {
    8
}
fn d_alpha() -> f64 {
    8.0
}
fn d_bias() -> String {
    "none".into()
}
fn d_init() -> InitLoraWeights {
    InitLoraWeights::Bool(true)
}

impl InitLoraWeights {
    /// Whether this init takes the adapter out of the base weight, which then becomes the residual:
    /// PiSSA (`"pissa"`, `"pissa_niter_N"`) or OLoRA (`"olora"`).
    pub fn decomposes(&self) -> bool {
        matches!(self, Self::Named(n)
            if n == "pissa" || n == "olora" || n.starts_with("pissa_niter_"))
    }
}

impl Default for LoraConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

/// Keys of `extra` that are harmless at their PEFT default values; anything else non-default in
/// them changes the adapter's math and is refused.
const EXTRA_DEFAULTS: &[(&str, &str)] = &[
    ("layer_replication", "null"),
    ("loftq_config", "{}"),
    ("megatron_config", "null"),
    ("target_parameters", "null"),
    ("use_qalora", "false"),
    ("alora_invocation_tokens", "null"),
    ("arrow_config", "null"),
    ("runtime_config", "{\"ephemeral_gpu_offload\": false}"),
];

impl LoraConfig {
    /// Parses `adapter_config.json` text and validates it.
    pub fn from_json_str(text: &str) -> Result<Self, LoraError> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| LoraError::ConfigParse {
            path: None,
            reason: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and validates an `adapter_config.json`; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self, LoraError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoraError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::from_json_str(&text).map_err(|e| e.with_path(path))
    }

    /// Rejects impossible values and PEFT features this crate does not implement, naming them.
    pub fn validate(&self) -> Result<(), LoraError> {
        let bad = |reason: String| Err(LoraError::InvalidConfig { path: None, reason });
        if self.peft_type != "LORA" {
            return bad(format!(
                "`peft_type` is {:?}; only \"LORA\" adapters are supported",
                self.peft_type
            ));
        }
        if self.r == 0 {
            return bad("`r` is 0; the rank must be at least 1".into());
        }
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, r)| **r == 0) {
            return bad(format!("`rank_pattern.{k}` is 0; ranks must be at least 1"));
        }
        if !self.lora_alpha.is_finite() {
            return bad(format!(
                "`lora_alpha` is {}; it must be finite",
                self.lora_alpha
            ));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(format!(
                "`lora_dropout` is {}; it must be in [0, 1)",
                self.lora_dropout
            ));
        }
        if self.target_modules.is_none() {
            return bad("`target_modules` is missing: name the modules to adapt (e.g. [\"q_proj\", \"v_proj\"] or \"all-linear\")".into());
        }
        if let InitLoraWeights::Named(n) = &self.init_lora_weights {
            let niter = n.strip_prefix("pissa_niter_");
            if niter.is_some_and(|k| k.parse::<usize>().is_err()) {
                return bad(format!(
                    "`init_lora_weights` {n:?}: the iteration count after \"pissa_niter_\" must be a whole number (e.g. \"pissa_niter_4\")"
                ));
            }
            if !matches!(n.as_str(), "gaussian" | "pissa" | "olora") && niter.is_none() {
                return bad(format!(
                    "`init_lora_weights` {n:?} is not supported (use true, false, \"gaussian\", \"pissa\", \"pissa_niter_N\" or \"olora\")"
                ));
            }
        }
        match self.extra.get("lora_bias") {
            None | Some(serde_json::Value::Bool(_)) => {}
            Some(v) => return bad(format!("`lora_bias` is {v}; it must be true or false")),
        }
        if self.lora_bias() {
            if self.use_dora {
                return bad("`lora_bias` = true is not supported with DoRA (PEFT refuses the pair too); set one of them to false".into());
            }
            if matches!(self.init_lora_weights, InitLoraWeights::Named(_)) {
                return bad(format!("`lora_bias` = true works only with `init_lora_weights` true or false (as in PEFT), not {:?}", self.init_lora_weights));
            }
        }
        self.trainable_token_indices()?;
        let mut unsupported = Vec::new();
        if self.bias != "none" {
            unsupported.push(format!("bias = {:?} (only \"none\")", self.bias));
        }
        if self.fan_in_fan_out {
            unsupported.push("fan_in_fan_out = true".into());
        }
        for (key, default) in EXTRA_DEFAULTS {
            if let Some(v) = self.extra.get(*key) {
                let d: serde_json::Value = serde_json::from_str(default).expect("valid default");
                let is_default = *v == d
                    || v.is_null()
                    || (v.is_object() && v.as_object().is_some_and(|o| o.is_empty()));
                if !is_default {
                    unsupported.push(format!("{key} = {v}"));
                }
            }
        }
        if !unsupported.is_empty() {
            return Err(LoraError::Unsupported {
                features: unsupported,
            });
        }
        Ok(())
    }

    /// `lora_bias` (PEFT ≥ 0.14): a trainable bias on every `lora_B`. Kept in `extra`, so a file
    /// without the field is written back without it (older PEFT releases refuse unknown fields).
    pub fn lora_bias(&self) -> bool {
        self.extra
            .get("lora_bias")
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    }

    /// `trainable_token_indices` (PEFT ≥ 0.15): the token ids whose embedding rows train, as
    /// `(embedding name, ids)`: a plain list names the input embedding (`None`), a map names
    /// embeddings by module name. Kept in `extra`, as read.
    pub fn trainable_token_indices(&self) -> Result<Vec<TokenIndices>, LoraError> {
        let bad = |why: String| LoraError::InvalidConfig {
            path: None,
            reason: format!("`trainable_token_indices` {why}"),
        };
        let ids = |v: &serde_json::Value| -> Result<Vec<usize>, LoraError> {
            v.as_array()
                .ok_or_else(|| bad(format!("holds {v}; expected a list of token ids")))?
                .iter()
                .map(|i| {
                    i.as_u64()
                        .map(|i| i as usize)
                        .ok_or_else(|| bad(format!("holds {i}; token ids are whole numbers ≥ 0")))
                })
                .collect()
        };
        match self.extra.get("trainable_token_indices") {
            None | Some(serde_json::Value::Null) => Ok(Vec::new()),
            Some(v @ serde_json::Value::Array(_)) => Ok(vec![(None, ids(v)?)]),
            Some(serde_json::Value::Object(m)) => m
                .iter()
                .map(|(name, v)| Ok((Some(name.clone()), ids(v)?)))
                .collect(),
            Some(v) => Err(bad(format!(
                "is {v}; expected a list of token ids or a map from embedding name to ids"
            ))),
        }
    }

    /// Sets `trainable_token_indices` to a list of ids for the input embedding (`None`: unset).
    pub fn set_trainable_token_indices(&mut self, ids: Option<&[usize]>) {
        let v = match ids {
            Some(ids) => serde_json::json!(ids),
            None => serde_json::Value::Null,
        };
        self.extra.insert("trainable_token_indices".into(), v);
    }

    /// Sets `lora_bias`.
    pub fn set_lora_bias(&mut self, on: bool) {
        self.extra
            .insert("lora_bias".into(), serde_json::Value::Bool(on));
    }

    /// Rank for a module path (`rank_pattern` first, as PEFT).
    pub fn rank_for(&self, path: &str) -> usize {
        pattern_value(&self.rank_pattern, path).unwrap_or(self.r)
    }

    /// Alpha for a module path (`alpha_pattern` first, as PEFT).
    pub fn alpha_for(&self, path: &str) -> f64 {
        pattern_value(&self.alpha_pattern, path).unwrap_or(self.lora_alpha)
    }

    /// The scaling applied to the update of the module at `path`.
    pub fn scaling_for(&self, path: &str) -> f64 {
        let (r, alpha) = (self.rank_for(path) as f64, self.alpha_for(path));
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

/// PEFT `get_pattern_key`: the first pattern `p` with `re.match(rf"(.*\.)?({p})$", path)`.
fn pattern_value<T: Copy>(patterns: &BTreeMap<String, T>, path: &str) -> Option<T> {
    patterns.iter().find_map(|(p, v)| {
        let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{p})$")).ok()?;
        re.is_match(path).then_some(*v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_json_str_parses_validates_and_leaves_the_path_to_from_file() {
        let cfg = LoraConfig::from_json_str(r#"{"r": 4, "target_modules": ["q_proj"]}"#).unwrap();
        assert_eq!((cfg.r, cfg.lora_alpha), (4, 8.0));
        let e = LoraConfig::from_json_str("{").unwrap_err();
        assert!(
            matches!(e, LoraError::ConfigParse { path: None, .. }),
            "{e}"
        );
        let e = LoraConfig::from_json_str(r#"{"r": 0, "target_modules": ["q_proj"]}"#).unwrap_err();
        assert!(
            matches!(e, LoraError::InvalidConfig { path: None, .. }),
            "{e}"
        );
    }
}
