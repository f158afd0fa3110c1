//! Token selection as transformers' `generate` does it: `GenerationConfig` (read from
//! `generation_config.json`), then the logits processors in HF's order — repetition penalty, then
//! (sampling only) temperature, top-k, top-p — then argmax (greedy) or a draw from the softmax.
//!
//! Mirrors `RepetitionPenaltyLogitsProcessor`, `TemperatureLogitsWarper`, `TopKLogitsWarper` and
//! `TopPLogitsWarper` (`transformers/generation/logits_process.py`, `min_tokens_to_keep = 1`).
//! Deliberately different: the random draw uses SplitMix64 (`kernels::rng`), not torch's generator, so
//! a seed reproduces a run of this crate (on any platform, under any dependency upgrade) but not a
//! run of PyTorch. Greedy decoding has no randomness and matches transformers token for token.

use kernels::rng::SplitMix64;
use std::path::Path;

use serde::Deserialize;

use crate::config::TokenIds;
use crate::error::Qwen2Error;

/// How to pick the next token; the subset of HF `GenerationConfig` this crate implements.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Sample from the processed distribution (`true`) or take its argmax (`false`, greedy).
    pub do_sample: bool,
    /// Divides the logits before top-k/top-p (sampling only); `1.0` leaves them unchanged.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (sampling only); `0` disables the filter.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability mass exceeds `top_p` (sampling only);
    /// `1.0` disables the filter.
    pub top_p: f32,
    /// CTRL's penalty on every token already in the sequence (prompt included, as HF does):
    /// positive logits are divided by it, negative ones multiplied. `1.0` disables it. Applies to
    /// greedy decoding too.
    pub repetition_penalty: f32,
    /// Generation stops after this many new tokens.
    pub max_new_tokens: usize,
    /// Generation stops after producing any of these (the stop token is kept in the output).
    pub eos_token_id: Vec<u32>,
    /// Seed of the sampling RNG.
    pub seed: u64,
}

/// transformers' `GenerationConfig()` defaults, except `max_new_tokens` (HF's default is a total
/// `max_length` of 20, useless for chat): greedy, temperature 1, top-k 50, top-p 1, no penalty.
impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            repetition_penalty: 1.0,
            max_new_tokens: 512,
            eos_token_id: Vec::new(),
            seed: 42,
        }
    }
}

/// `generation_config.json` as shipped; absent fields keep HF's defaults.
#[derive(Debug, Deserialize)]
struct GenerationFile {
    do_sample: Option<bool>,
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    repetition_penalty: Option<f32>,
    max_new_tokens: Option<usize>,
    eos_token_id: Option<TokenIds>,
}

/// HF's file name.
pub const GENERATION_CONFIG: &str = "generation_config.json";

impl GenerationConfig {
    /// Parses `generation_config.json` text over HF's defaults, then validates.
    pub fn from_json_str(text: &str) -> Result<Self, Qwen2Error> {
        let bad = |reason: String| Qwen2Error::GenerationConfig { path: None, reason };
        let f: GenerationFile = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let d = Self::default();
        let cfg = Self {
            do_sample: f.do_sample.unwrap_or(d.do_sample),
            temperature: f.temperature.unwrap_or(d.temperature),
            top_k: f.top_k.unwrap_or(d.top_k),
            top_p: f.top_p.unwrap_or(d.top_p),
            repetition_penalty: f.repetition_penalty.unwrap_or(d.repetition_penalty),
            max_new_tokens: f.max_new_tokens.unwrap_or(d.max_new_tokens),
            eos_token_id: f.eos_token_id.map(|t| t.to_vec()).unwrap_or_default(),
            seed: d.seed,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a `generation_config.json`; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self, Qwen2Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Qwen2Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            Qwen2Error::GenerationConfig { path: None, reason } => Qwen2Error::GenerationConfig {
                path: Some(path.to_path_buf()),
                reason,
            },
            e => e,
        })
    }

    /// The model directory's `generation_config.json` when present; otherwise HF's defaults
    /// (greedy) with `eos_token_id` from `config.json`, which is what transformers falls back to.
    pub fn for_model(dir: &Path, config: &crate::Qwen2Config) -> Result<Self, Qwen2Error> {
        let file = dir.join(GENERATION_CONFIG);
        let mut cfg = if file.is_file() {
            Self::from_file(&file)?
        } else {
            Self::default()
        };
        if cfg.eos_token_id.is_empty() {
            if let Some(e) = &config.eos_token_id {
                cfg.eos_token_id = e.to_vec();
            }
        }
        Ok(cfg)
    }

    /// Rejects values HF would also reject (they would make the distribution meaningless).
    pub fn validate(&self) -> Result<(), Qwen2Error> {
        let bad = |reason: String| Err(Qwen2Error::GenerationConfig { path: None, reason });
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!(
                "temperature {} must be >= 0 (0 means greedy)",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition_penalty {} must be > 0 (1 disables it)",
                self.repetition_penalty
            ));
        }
        Ok(())
    }

    /// Whether the next token is drawn at random (sampling with a non-zero temperature).
    pub fn samples(&self) -> bool {
        self.do_sample && self.temperature > 0.0
    }
}

/// Applies the configured processors to one row of logits and picks a token.
#[derive(Debug, Clone)]
pub struct TokenSampler {
    cfg: GenerationConfig,
    rng: SplitMix64,
}

impl TokenSampler {
    /// A sampler seeded with `cfg.seed`.
    pub fn new(cfg: GenerationConfig) -> Self {
        let rng = SplitMix64::new(cfg.seed);
        Self { cfg, rng }
    }

    /// The configuration in use.
    pub fn config(&self) -> &GenerationConfig {
        &self.cfg
    }

    /// The next token for `logits` (one row, `[vocab]`, modified in place), given every token of
    /// the sequence so far (`context`: prompt and generated).
    pub fn next_token(&mut self, logits: &mut [f32], context: &[u32]) -> u32 {
        self.process(logits, context);
        if !self.cfg.samples() {
            return argmax(logits);
        }
        let probs = softmax(logits);
        draw(&probs, self.rng.next_f64())
    }

    /// The logits processors alone, in place: what HF `generate` reports as `scores`. Greedy
    /// decoding applies only the repetition penalty, as HF does.
    pub fn process(&self, logits: &mut [f32], context: &[u32]) {
        repetition_penalty(logits, context, self.cfg.repetition_penalty);
        if !self.cfg.samples() {
            return;
        }
        if self.cfg.temperature != 1.0 {
            let t = self.cfg.temperature;
            logits.iter_mut().for_each(|l| *l /= t);
        }
        if self.cfg.top_k != 0 {
            top_k(logits, self.cfg.top_k);
        }
        if self.cfg.top_p < 1.0 {
            top_p(logits, self.cfg.top_p);
        }
    }
}

/// HF `RepetitionPenaltyLogitsProcessor`: each distinct token of `context` once.
pub fn repetition_penalty(logits: &mut [f32], context: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &t in context {
        let i = t as usize;
        if i < logits.len() && !seen[i] {
            seen[i] = true;
            let l = logits[i];
            logits[i] = if l < 0.0 { l * penalty } else { l / penalty };
        }
    }
}

/// The first index of the maximum (torch's `argmax` on CPU); NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// HF `TopKLogitsWarper`: everything below the k-th largest value becomes -inf (ties with the
/// k-th value are kept, as `scores < topk(...)[-1]` keeps them).
pub fn top_k(logits: &mut [f32], k: usize) {
    let k = k.max(1).min(logits.len());
    if k == logits.len() {
        return;
    }
    let mut sorted: Vec<f32> = logits.to_vec();
    // k-th largest = element k-1 of a descending partial sort.
    let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = *kth;
    logits
        .iter_mut()
        .filter(|l| **l < kth)
        .for_each(|l| *l = f32::NEG_INFINITY);
}

/// HF `TopPLogitsWarper`: sort ascending, drop the tokens whose cumulative probability is
/// `<= 1 - top_p`, always keeping the most likely one.
pub fn top_p(logits: &mut [f32], p: f32) {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Ascending; ties by index for a fixed result (torch's sort is not stable either way).
    order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(a.cmp(&b)));
    let sorted: Vec<f32> = order.iter().map(|&i| logits[i]).collect();
    let probs = softmax(&sorted);
    let mut cum = 0f32;
    let last = order.len() - 1;
    for (rank, (&i, pr)) in order.iter().zip(&probs).enumerate() {
        cum += pr;
        if rank < last && cum <= 1.0 - p {
            logits[i] = f32::NEG_INFINITY;
        }
    }
}

/// Softmax in f32 with the max subtracted (what `torch.softmax` computes).
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Inverse-CDF draw: the first index whose cumulative probability exceeds `u · total`.
fn draw(probs: &[f32], u: f64) -> u32 {
    let total: f64 = probs.iter().map(|&p| p as f64).sum();
    let target = u * total;
    let mut cum = 0f64;
    let mut last_nonzero = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            last_nonzero = i;
            cum += p as f64;
            if cum > target {
                return i as u32;
            }
        }
    }
    last_nonzero as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-computed from the definitions in transformers' `logits_process.py`.
    #[test]
    fn processors_follow_hf_semantics() {
        let mut l = vec![2.0, -1.0, 0.5, 3.0];
        repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, vec![1.0, -2.0, 0.5, 3.0]);

        let mut l = vec![1.0, 3.0, 2.0, 3.0, 0.0];
        top_k(&mut l, 2);
        assert_eq!(
            l,
            vec![
                f32::NEG_INFINITY,
                3.0,
                f32::NEG_INFINITY,
                3.0,
                f32::NEG_INFINITY
            ]
        );
        let mut l = vec![1.0, 3.0, 2.0, 3.0, 0.0];
        top_k(&mut l, 3);
        assert_eq!(l[0], f32::NEG_INFINITY);
        assert_eq!(l[2], 2.0);

        // probs of [ln 0.1, ln 0.2, ln 0.3, ln 0.4] are 0.1..0.4; top_p 0.5 keeps {0.4, 0.3}
        // (ascending cumsum 0.1, 0.3 <= 0.5 dropped; 0.6 kept).
        let mut l: Vec<f32> = [0.1f32, 0.2, 0.3, 0.4].iter().map(|p| p.ln()).collect();
        top_p(&mut l, 0.5);
        assert!(l[0].is_infinite() && l[1].is_infinite());
        assert!(l[2].is_finite() && l[3].is_finite());
        // A tiny top_p still keeps the most likely token.
        let mut l: Vec<f32> = [0.1f32, 0.2, 0.3, 0.4].iter().map(|p| p.ln()).collect();
        top_p(&mut l, 1e-6);
        assert_eq!(l.iter().filter(|x| x.is_finite()).count(), 1);
        assert!(l[3].is_finite());

        assert_eq!(argmax(&[0.0, 5.0, 5.0, 1.0]), 1);
    }

    #[test]
    fn sampling_is_reproducible_and_respects_filters() {
        let cfg = GenerationConfig {
            do_sample: true,
            temperature: 0.7,
            top_k: 2,
            top_p: 1.0,
            seed: 7,
            ..Default::default()
        };
        let row = [0.0f32, 1.0, 2.0, 1.5, -1.0];
        let run = |cfg: &GenerationConfig| {
            let mut s = TokenSampler::new(cfg.clone());
            (0..200)
                .map(|_| s.next_token(&mut row.to_vec(), &[]))
                .collect::<Vec<_>>()
        };
        let a = run(&cfg);
        assert_eq!(a, run(&cfg), "same seed, same tokens");
        assert!(a.iter().all(|&t| t == 2 || t == 3), "top-k 2 keeps 2 and 3");
        assert!(a.contains(&2) && a.contains(&3));
        let other = run(&GenerationConfig { seed: 8, ..cfg });
        assert_ne!(a, other, "another seed, another draw");
    }

    #[test]
    fn generation_config_reads_qwen_file_and_defaults() {
        let text = r#"{"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": true,
            "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.7,
            "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0"}"#;
        let c = GenerationConfig::from_json_str(text).unwrap();
        assert!(c.do_sample && c.samples());
        assert_eq!(
            (c.temperature, c.top_p, c.top_k, c.repetition_penalty),
            (0.7, 0.8, 20, 1.05)
        );
        assert_eq!(c.eos_token_id, vec![151645, 151643]);
        let d = GenerationConfig::from_json_str("{}").unwrap();
        assert_eq!(d, GenerationConfig::default());
        let e = GenerationConfig::from_json_str(r#"{"top_p": 1.5}"#).unwrap_err();
        assert!(e.to_string().contains("top_p 1.5"), "{e}");
    }
}
