//! Incremental decoding with a key/value cache, and the generation loop: the Rust side of
//! transformers' `DynamicCache` + `GenerationMixin.generate` (`_sample`) for `Qwen2ForCausalLM`.
//!
//! The decoder layers run as in training, each with its entry of the cache
//! ([`Qwen2DecoderLayer::forward`](crate::Qwen2DecoderLayer::forward)). Differences from HF, on
//! purpose:
//! * the head is computed for the last position only (HF's `logits_to_keep=1` in `generate`);
//! * one sequence (or several of equal length) without padding: `generate` takes one prompt.

use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::attention::{AttentionBias, LayerCache};
use crate::model::Qwen2ForCausalLM;
use crate::rope::RopeCache;
use crate::sampling::{GenerationConfig, TokenSampler};

/// Keys and values of every layer for the positions seen so far (HF `DynamicCache`).
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// Per layer: keys and values `[batch, kv_heads, cached, head_dim]`, RoPE already applied.
    layers: Vec<LayerCache<B>>,
    /// Positions cached (the position id of the next token).
    len: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for a model with `num_layers` decoder layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything (a new conversation).
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }

    /// Keeps the first `len` positions (no-op when `len >= self.len()`): a conversation whose
    /// next prompt shares only a prefix with what is cached continues from that prefix.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        if len == 0 {
            return self.clear();
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            // [batch, kv_heads, cached, head_dim] -> [batch, kv_heads, len, head_dim]
            *k = k.clone().narrow(2, 0, len);
            *v = v.clone().narrow(2, 0, len);
        }
        self.len = len;
    }
}

impl<B: Backend> Qwen2ForCausalLM<B> {
    /// Final hidden states `[batch, new, hidden]` of `input_ids` `[batch, new]` placed after the
    /// `cache.len()` cached positions (position ids `cache.len()..cache.len() + new`), extending the
    /// cache. Rows must be unpadded and of equal length.
    pub fn forward_step(
        &self,
        input_ids: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        let device = input_ids.device();
        let [batch, s] = input_ids.dims();
        let past = cache.len;
        let position_ids = Tensor::<B, 1, Int>::arange(past as i64..(past + s) as i64, &device)
            .reshape([1, s])
            .expand([batch, s]);
        let mut x = self.model.embed_tokens.forward(input_ids);
        let rope = RopeCache::new(position_ids, self.rope_theta, self.head_dim, x.dtype());
        // One new token sees every key; several see the cache and the new ones up to themselves.
        let bias = if s > 1 {
            AttentionBias::Dense(causal_mask::<B>(past, s, &device))
        } else {
            AttentionBias::Full
        };
        for (layer, slot) in self.model.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(x, &rope, &bias, Some(slot));
        }
        cache.len += s;
        self.model.norm.forward(x)
    }

    /// Logits `[batch, vocab]` of the last position of `input_ids`, extending the cache (the head
    /// is applied to that position only).
    pub fn forward_step_last(
        &self,
        input_ids: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 2> {
        let hidden = self.forward_step(input_ids, cache);
        let s = hidden.dims()[1];
        let logits = self.logits(hidden.narrow(1, s - 1, 1));
        let [b, _, vocab] = logits.dims();
        logits.reshape([b, vocab])
    }
}

impl<B: Backend> Qwen2ForCausalLM<B> {
    /// One decoding step for several sequences at once (continuous batching): `tokens[i]` placed
    /// after `caches[i]` (caches of any lengths), logits `[n, vocab]`, each cache extended. Row `i`
    /// equals [`Self::forward_step_last`] of `tokens[i]` alone after `caches[i]`, bit for bit on the
    /// CPU: the projections and the head run for all rows with the row-independent kernel, the
    /// attention per sequence over its own cache.
    pub fn decode_rows(&self, tokens: &[u32], caches: &mut [&mut KvCache<B>]) -> Tensor<B, 2> {
        assert_eq!(tokens.len(), caches.len(), "one token per cache");
        let n = tokens.len();
        let device = self.model.embed_tokens.weight.device();
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(tokens.iter().map(|&t| t as i64).collect::<Vec<_>>(), [n, 1]),
            &device,
        );
        let positions = Tensor::<B, 2, Int>::from_data(
            TensorData::new(
                caches.iter().map(|c| c.len as i64).collect::<Vec<_>>(),
                [n, 1],
            ),
            &device,
        );
        let mut x = self.model.embed_tokens.forward(ids);
        let rope = RopeCache::new(positions, self.rope_theta, self.head_dim, x.dtype());
        for (l, layer) in self.model.layers.iter().enumerate() {
            let mut slots: Vec<&mut LayerCache<B>> =
                caches.iter_mut().map(|c| &mut c.layers[l]).collect();
            x = layer.forward_rows(x, &rope, &mut slots);
        }
        caches.iter_mut().for_each(|c| c.len += 1);
        let hidden = x.dims()[2];
        self.logits_rows(self.model.norm.forward(x).reshape([n, hidden]))
    }
}

/// `[1, 1, s, past + s]`: new query `i` may see keys `0..=past + i`; the rest get `f32::MIN`, as
/// HF's additive mask.
fn causal_mask<B: Backend>(past: usize, s: usize, device: &B::Device) -> Tensor<B, 4> {
    let t = past + s;
    let mut v = vec![0f32; s * t];
    for i in 0..s {
        v[i * t + past + i + 1..(i + 1) * t].fill(f32::MIN);
    }
    Tensor::from_data(TensorData::new(v, [1, 1, s, t]), (device, DType::F32))
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-sequence token was produced (it is the last token of the output).
    Eos(u32),
    /// `max_new_tokens` were produced.
    MaxNewTokens,
    /// The caller's callback asked to stop.
    Callback,
}

/// What [`generate`] produced, with its timings.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The new tokens (a final end-of-sequence token included, as `generate` returns it).
    pub tokens: Vec<u32>,
    /// Why it stopped.
    pub stop: StopReason,
    /// Prompt tokens processed (the whole prompt unless a cache held part of it).
    pub prompt_tokens: usize,
    /// Seconds to process the prompt and pick the first token (time to first token).
    pub prompt_secs: f64,
    /// Seconds for every later token (each one decode step).
    pub decode_secs: f64,
}

impl Generation {
    /// Prompt tokens per second.
    pub fn prompt_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_secs.max(f64::MIN_POSITIVE)
    }

    /// Decode steps per second (tokens after the first).
    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_secs.max(f64::MIN_POSITIVE)
    }
}

/// Generates up to `cfg.max_new_tokens` tokens after `prompt` (non-empty), as HF `generate` does
/// for one sequence: prefill, then one cached step per token; repetition penalty, temperature,
/// top-k and top-p per [`GenerationConfig`]; stops after any `cfg.eos_token_id`.
///
/// `on_token` sees each new token as soon as it is chosen; returning `false` stops generation.
pub fn generate<B: Backend>(
    model: &Qwen2ForCausalLM<B>,
    prompt: &[u32],
    cfg: &GenerationConfig,
    device: &B::Device,
    on_token: impl FnMut(u32) -> bool,
) -> Generation {
    let mut cache = KvCache::new(model.model.layers.len());
    generate_cached(model, &mut cache, prompt, cfg, device, on_token)
}

/// [`generate`] continuing from a cache that already holds `prompt[..cache.len()]` (a chat's
/// earlier turns): only the rest of the prompt is processed (at least its last token; a cache as
/// long as the prompt is cut back by one). Afterwards the cache holds the prompt and every new
/// token but the last, which was never fed back. `prompt_tokens` counts the tokens processed.
pub fn generate_cached<B: Backend>(
    model: &Qwen2ForCausalLM<B>,
    cache: &mut KvCache<B>,
    prompt: &[u32],
    cfg: &GenerationConfig,
    device: &B::Device,
    mut on_token: impl FnMut(u32) -> bool,
) -> Generation {
    cache.truncate(prompt.len().saturating_sub(1));
    let fed = prompt.len() - cache.len().min(prompt.len());
    let mut sampler = TokenSampler::new(cfg.clone());
    let mut context: Vec<u32> = prompt.to_vec();
    let mut tokens = Vec::new();
    let start = Instant::now();
    let mut prompt_secs = 0.0;
    let mut input = prompt[prompt.len() - fed..].to_vec();
    let mut stop = StopReason::MaxNewTokens;
    while tokens.len() < cfg.max_new_tokens && !input.is_empty() {
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(
                input.iter().map(|&t| t as i64).collect::<Vec<_>>(),
                [1, input.len()],
            ),
            device,
        );
        let logits = model.forward_step_last(ids, cache);
        // Reading the logits back synchronizes the device, so the timings below are real.
        let mut row = logits
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32 after convert");
        let next = sampler.next_token(&mut row, &context);
        if tokens.is_empty() {
            prompt_secs = start.elapsed().as_secs_f64();
        }
        tokens.push(next);
        context.push(next);
        if !on_token(next) {
            stop = StopReason::Callback;
            break;
        }
        if cfg.eos_token_id.contains(&next) {
            stop = StopReason::Eos(next);
            break;
        }
        input = vec![next];
    }
    let total = start.elapsed().as_secs_f64();
    Generation {
        tokens,
        stop,
        prompt_tokens: fed,
        prompt_secs,
        decode_secs: total - prompt_secs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Qwen2Config;
    use burn::backend::Flex;
    use lora_core::InitLoraWeights;

    /// A random model with an adapter (random `B`, so the side path counts) on two projections.
    fn model(tied: bool) -> Qwen2ForCausalLM<Flex> {
        let device = Default::default();
        Flex::seed(&device, 3);
        let cfg = Qwen2Config::new(101, 64, 96, 2, 4, 2, tied);
        let mut m = Qwen2ForCausalLM::<Flex>::new(&cfg, &device);
        for layer in &mut m.model.layers {
            let init = InitLoraWeights::Bool(false);
            layer
                .self_attn
                .q_proj
                .attach_adapter("q", 4, 2.0, 0.0, &init);
            layer.mlp.down_proj.attach_adapter("d", 4, 2.0, 0.0, &init);
        }
        m
    }

    fn ids(v: &[u32]) -> Tensor<Flex, 2, Int> {
        let data: Vec<i64> = v.iter().map(|&t| t as i64).collect();
        Tensor::from_data(TensorData::new(data, [1, v.len()]), &Default::default())
    }

    fn row(t: Tensor<Flex, 2>) -> Vec<f32> {
        t.into_data().into_vec::<f32>().unwrap()
    }

    /// A batched decoding step gives each sequence exactly the logits it gets alone, whatever the
    /// other sequences and their cache lengths.
    #[test]
    fn decode_rows_equal_each_sequence_alone() {
        for tied in [false, true] {
            decode_rows_case(model(tied));
        }
    }

    fn decode_rows_case(m: Qwen2ForCausalLM<Flex>) {
        let prompts: [&[u32]; 3] = [&[5, 9, 17, 2], &[40], &[7, 7, 8, 100, 3, 1, 60]];
        let mut alone: Vec<KvCache<Flex>> = Vec::new();
        let mut batched: Vec<KvCache<Flex>> = Vec::new();
        for p in prompts {
            let mut c = KvCache::new(m.model.layers.len());
            m.forward_step_last(ids(p), &mut c);
            alone.push(c.clone());
            batched.push(c);
        }
        let mut tokens = vec![11u32, 12, 13];
        for step in 0..4 {
            let mut refs: Vec<&mut KvCache<Flex>> = batched.iter_mut().collect();
            let all = row(m.decode_rows(&tokens, &mut refs));
            let vocab = all.len() / 3;
            for (i, cache) in alone.iter_mut().enumerate() {
                let one = row(m.forward_step_last(ids(&[tokens[i]]), cache));
                assert_eq!(one, all[i * vocab..(i + 1) * vocab], "step {step}, row {i}");
                assert_eq!(cache.len(), batched[i].len());
            }
            // The last row alone in a batch of one, too.
            let mut solo = batched[2].clone();
            let mut alone2 = alone[2].clone();
            let a = row(m.decode_rows(&[tokens[2] + 1], &mut [&mut solo]));
            let b = row(m.forward_step_last(ids(&[tokens[2] + 1]), &mut alone2));
            assert_eq!(a, b, "step {step}, batch of one");
            tokens.iter_mut().for_each(|t| *t = (*t * 7 + step) % 101);
        }
    }
}
