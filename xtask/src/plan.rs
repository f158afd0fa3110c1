//! The memory plan printed before a fine-tune: the predicted peak split into weights, adapters with
//! their optimizer state, activations kept for the backward, the head, and slack; checked against
//! the memory the device has, so a run that cannot fit stops before loading anything.
//!
//! The activation and head terms are a model of this implementation fitted to measured peaks
//! (`docs/checks.md`, `cargo xtask bench-train` prints the plan next to the measured peak): per
//! token, each decoder layer keeps about `ACT_PER_TOKEN × (hidden + intermediate)` f32 values for
//! its backward, and the backward of one layer needs about one more layer's worth at its peak.
//! Checkpointing should keep only each layer's input, but on the CPU the peak grows by a constant
//! instead (measured), so the plan adds that and never proposes checkpointing there.

use qwen2::Qwen2Config;

const MIB: f64 = 1024.0 * 1024.0;

/// f32 values kept per token per layer, in units of `hidden + intermediate` (fitted by least
/// squares to six measured peaks of the 0.5B shape at 1–8 layers and 512–1536 tokens, with the base
/// below fixed).
pub const ACT_PER_TOKEN: f64 = 4.8;
/// The process without a model: the runtime, the tokenizer, the data (MiB; the tiny model's peak).
pub const BASE_MIB: f64 = 35.0;
/// What checkpointing adds on the CPU, in layers' worth of activations (measured: 131–158 MiB
/// more at 2, 4 and 8 layers of the 0.5B shape, whatever the layer count).
pub const CHECKPOINT_EXTRA_LAYERS: f64 = 0.85;

/// What a run is, for the plan.
pub struct PlanInput<'a> {
    pub config: &'a Qwen2Config,
    /// Trainable adapter parameters.
    pub lora_params: u64,
    /// Bytes per base weight (4 for f32, 2 for bf16).
    pub weight_bytes: u64,
    /// The most tokens one micro-batch holds (padding included).
    pub tokens: u64,
    pub checkpointing: bool,
}

/// Predicted peak memory, in bytes, by part.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    pub weights: f64,
    pub adapters_optimizer: f64,
    pub activations: f64,
    pub head: f64,
    pub slack: f64,
}

impl Plan {
    pub fn new(p: &PlanInput) -> Plan {
        let c = p.config;
        let weights = (c.num_parameters() as u64 * p.weight_bytes) as f64;
        // Parameter, gradient, and AdamW's two moments, all f32.
        let adapters_optimizer = (p.lora_params * 16) as f64;
        let per_layer =
            ACT_PER_TOKEN * (c.hidden_size + c.intermediate_size) as f64 * 4.0 * p.tokens as f64;
        let layers = c.num_hidden_layers as f64;
        let activations = if p.checkpointing {
            (layers + CHECKPOINT_EXTRA_LAYERS) * per_layer
        } else {
            layers * per_layer
        };
        // The head runs in chunks; at the peak, the backward of a layer holds about one more
        // layer's activations (the measured term that does not grow with the layer count).
        let head = per_layer;
        Plan {
            weights,
            adapters_optimizer,
            activations,
            head,
            slack: BASE_MIB * MIB,
        }
    }

    pub fn total(&self) -> f64 {
        self.weights + self.adapters_optimizer + self.activations + self.head + self.slack
    }

    /// `plan: 2.41 GiB = weights 0.95 + adapters and optimizer 0.02 + activations 1.32 + head and
    /// backward peak 0.16 + slack 0.03`.
    pub fn line(&self) -> String {
        // GiB, or MiB for a model that small.
        let (unit, scale) = if self.total() < MIB * 1024.0 {
            ("MiB", MIB)
        } else {
            ("GiB", MIB * 1024.0)
        };
        let g = |b: f64| b / scale;
        format!(
            "memory plan: {:.2} {unit} = weights {:.2} + adapters and optimizer {:.2} + activations \
             {:.2} + head and backward peak {:.2} + slack {:.2}",
            g(self.total()),
            g(self.weights),
            g(self.adapters_optimizer),
            g(self.activations),
            g(self.head),
            g(self.slack)
        )
    }
}

/// A decoder layer's seven projections: `(name, fan_in, fan_out)`.
pub fn projections(c: &Qwen2Config) -> [(&'static str, usize, usize); 7] {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let q = c.num_attention_heads * c.head_dim();
    let kv = c.num_key_value_heads() * c.head_dim();
    [
        ("q_proj", h, q),
        ("k_proj", h, kv),
        ("v_proj", h, kv),
        ("o_proj", q, h),
        ("gate_proj", h, i),
        ("up_proj", h, i),
        ("down_proj", i, h),
    ]
}

/// Trainable parameters of rank-`r` LoRA on the named projections of every layer, with `vectors`
/// more of length `out_features` on each targeted module: 1 for DoRA's `lora_magnitude_vector`,
/// 1 for `lora_bias`'s `lora_B.bias` (what `apply_lora` reports, and PEFT).
pub fn lora_params(c: &Qwen2Config, r: usize, targets: &[String], vectors: usize) -> u64 {
    let all_linear = targets.iter().any(|t| t == "all-linear");
    let per_layer: usize = projections(c)
        .iter()
        .filter(|(name, _, _)| all_linear || targets.iter().any(|t| t == name))
        .map(|&(_, fan_in, fan_out)| r * (fan_in + fan_out) + vectors * fan_out)
        .sum();
    (per_layer * c.num_hidden_layers) as u64
}

/// Memory this process can still use: `MemAvailable` (Linux), in bytes.
pub fn available_ram() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024.0)
}

/// `12GB`, `500MiB`, `1.5GiB` → bytes.
pub fn parse_budget(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.trim().parse().ok()?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => MIB,
        "gib" => MIB * 1024.0,
        _ => return None,
    };
    (n.is_finite() && n > 0.0).then_some(n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mini() -> Qwen2Config {
        Qwen2Config::new(151_936, 896, 4864, 4, 14, 2, true)
    }

    #[test]
    fn the_parts_add_up_and_grow_with_what_they_should() {
        let c = mini();
        let input = |tokens, checkpointing| PlanInput {
            config: &c,
            lora_params: lora_params(
                &c,
                8,
                &lora_trainer::recipe::TUTORIAL_TARGETS.map(String::from),
                0,
            ),
            weight_bytes: 4,
            tokens,
            checkpointing,
        };
        let p = Plan::new(&input(1536, false));
        let sum = p.weights + p.adapters_optimizer + p.activations + p.head + p.slack;
        assert_eq!(p.total(), sum);
        assert_eq!(p.weights, c.num_parameters() as f64 * 4.0);
        // r=8 on the seven projections of 4 layers: 183,296 a layer, 16 bytes each.
        assert_eq!(p.adapters_optimizer, (4 * 183_296 * 16) as f64);
        let half = Plan::new(&input(768, false));
        assert!((p.activations - 2.0 * half.activations).abs() < 1.0);
        assert_eq!(p.weights, half.weights);
        assert!(Plan::new(&input(1536, true)).activations > p.activations);
    }

    /// The trainable parameters of the tutorial's adapter on Qwen2.5-7B-Instruct's config: what
    /// `apply_lora` reports and PEFT prints (`tests/lora_variants.rs` checks those two), plain and
    /// with DoRA or lora_bias (one `out_features` vector per module).
    #[test]
    fn lora_params_equal_peft_s_count_on_the_7b_config() {
        let c = Qwen2Config::new(152_064, 3584, 18_944, 28, 28, 4, false);
        let targets = lora_trainer::recipe::TUTORIAL_TARGETS.map(String::from);
        for (fixture, vectors) in [
            ("peft-tiny-untied", 0),
            ("peft-dora", 1),
            ("peft-lora-bias", 1),
        ] {
            let peft: serde_json::Value = test_support::read_json(
                &test_support::fixtures()
                    .join(fixture)
                    .join("peft_reference.json"),
            );
            let want = peft["qwen2.5-7b-tutorial"]["trainable"].as_u64().unwrap();
            assert_eq!(lora_params(&c, 8, &targets, vectors), want, "{fixture}");
            let all = ["all-linear".to_string()];
            assert_eq!(lora_params(&c, 8, &all, vectors), want, "{fixture}");
        }
        assert_eq!(lora_params(&c, 8, &targets, 0), 20_185_088);
        assert_eq!(lora_params(&c, 8, &targets, 1), 21_575_680);
    }

    #[test]
    fn budgets_parse_with_units() {
        assert_eq!(parse_budget("12GB"), Some(12e9));
        assert_eq!(parse_budget("512 MiB"), Some(512.0 * MIB));
        assert_eq!(parse_budget("1000"), Some(1000.0));
        assert_eq!(parse_budget("-1GB"), None);
        assert_eq!(parse_budget("12 parsecs"), None);
    }
}
