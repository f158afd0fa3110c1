//! Incremental decoding with a key/value cache, and the generation loop: the Rust side of
//! transformers' `DynamicCache` + `GenerationMixin.generate` (`_sample`) for `Qwen2ForCausalLM`.
//!
//! The training forward ([`Qwen2ForCausalLM::forward`]) is untouched; this file adds a separate
//! cached path over the same modules (projections, norms, RoPE, LoRA side paths included), meant for
//! the plain inference backend. Differences from HF, on purpose:
//! * grouped-query attention without `repeat_kv`: the queries of the `n_rep` heads sharing a
//!   key/value head are stacked into one matrix, so cached keys/values are never copied per head;
//! * the head is computed for the last position only (HF's `logits_to_keep=1` in `generate`);
//! * a single-row projection (every decode step) is computed as `W·xᵀ` on the stored weight,
//!   not `x·Wᵀ` (see [`linear`]): same values, ~20× faster on Flex;
//! * one sequence (or several of equal length) without padding: `generate` takes one prompt.

use std::time::Instant;

use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

use lora_core::LoraLinear;

use crate::attention::Qwen2Attention;
use crate::model::{Qwen2DecoderLayer, Qwen2ForCausalLM};
use crate::rope::RopeCache;
use crate::sampling::{GenerationConfig, TokenSampler};

/// Keys and values of every layer for the positions seen so far (HF `DynamicCache`).
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// Per layer: keys and values `[batch, kv_heads, cached, head_dim]`, RoPE already applied.
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
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

impl<B: Backend> Qwen2Attention<B> {
    /// Attention of `x` `[batch, new, hidden]` over the cached positions plus its own, appending its
    /// keys/values to `cache`. `mask` `[1, 1, n_rep * new, cached + new]` is additive (0 or
    /// `f32::MIN`), rows ordered (head within the group, query); `None` when every key is visible
    /// (one new token).
    pub fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeCache<B>,
        mask: Option<&Tensor<B, 4>>,
        cache: &mut Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let n_rep = nh / nkv;
        let dtype = x.dtype();

        // [batch, new, heads * head_dim] -> [batch, heads, new, head_dim]
        let q = linear(&self.q_proj, x.clone())
            .reshape([b, s, nh, d])
            .swap_dims(1, 2);
        let k = linear(&self.k_proj, x.clone())
            .reshape([b, s, nkv, d])
            .swap_dims(1, 2);
        let v = linear(&self.v_proj, x)
            .reshape([b, s, nkv, d])
            .swap_dims(1, 2);
        let q = rope.apply(q);
        let k = rope.apply(k);
        // [batch, kv_heads, cached + new, head_dim]
        let (k, v) = match cache.take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        *cache = Some((k.clone(), v.clone()));
        let t = k.dims()[2];

        // Query head h = g * n_rep + r uses key/value head g (HF `repeat_kv`), so
        // [batch, heads, new, head_dim] -> [batch, kv_heads, n_rep * new, head_dim].
        let q = q.reshape([b, nkv, n_rep * s, d]);
        // [batch, kv_heads, n_rep * new, cached + new], in f32 as HF's eager attention.
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .cast(DType::F32)
            .mul_scalar(1.0 / (d as f64).sqrt());
        let scores = match mask {
            Some(m) => scores + m.clone().expand([b, nkv, n_rep * s, t]),
            None => scores,
        };
        let probs = softmax(scores, 3).cast(dtype);
        // [batch, kv_heads, n_rep * new, head_dim] -> [batch, heads, new, head_dim]
        //   -> [batch, new, heads * head_dim]
        let out = probs
            .matmul(v)
            .reshape([b, nh, s, d])
            .swap_dims(1, 2)
            .reshape([b, s, nh * d]);
        linear(&self.o_proj, out)
    }
}

impl<B: Backend> Qwen2DecoderLayer<B> {
    /// [`Qwen2DecoderLayer::forward`] over a cache: `[batch, new, hidden] -> [batch, new, hidden]`.
    pub fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeCache<B>,
        mask: Option<&Tensor<B, 4>>,
        cache: &mut Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    ) -> Tensor<B, 3> {
        let h = x.clone()
            + self
                .self_attn
                .forward_cached(self.input_layernorm.forward(x), rope, mask, cache);
        let x = self.post_attention_layernorm.forward(h.clone());
        let mlp = &self.mlp;
        let gate = silu(linear(&mlp.gate_proj, x.clone()));
        h + linear(&mlp.down_proj, gate * linear(&mlp.up_proj, x))
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
        let mask = (s > 1).then(|| {
            let layer0 = &self.model.layers[0].self_attn;
            causal_mask::<B>(layer0.num_heads / layer0.num_kv_heads, past, s, &device)
        });
        for (layer, slot) in self.model.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward_cached(x, &rope, mask.as_ref(), slot);
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
        let [b, s, h] = hidden.dims();
        let last = hidden.narrow(1, s - 1, 1);
        let logits = match (&self.lm_head, b) {
            (Some(head), _) => linear(head, last),
            // Tied, one row: `E·h` with the embedding matrix as stored (see `linear`).
            (None, 1) => {
                let e = self.model.embed_tokens.weight.val();
                let vocab = e.dims()[0];
                e.matmul(last.reshape([h, 1])).reshape([1, 1, vocab])
            }
            (None, _) => self.logits(last),
        };
        let [b, _, vocab] = logits.dims();
        logits.reshape([b, vocab])
    }
}

/// [`LoraLinear::forward`] for inference (no dropout). One row (`batch · seq = 1`, every decode
/// step) is computed as `W·xᵀ` with `W` `[out, in]` as stored: on Flex a matrix-vector product with
/// the transposed view `x·Wᵀ` is ~20× slower than with the contiguous weight (measured: 22 ms vs
/// 1 ms for 4864×896), and decoding is nothing but such products.
fn linear<B: Backend>(l: &LoraLinear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, s, d_in] = x.dims();
    if b * s != 1 {
        return l.forward(x);
    }
    let out = l.shape()[0];
    // [1, 1, in] -> [in, 1] (free), [out, in] @ [in, 1] -> [out, 1]
    let xc = x.reshape([d_in, 1]);
    let mut y = l.weight.val().matmul(xc.clone());
    if let Some(bias) = &l.bias {
        y = y + bias.val().reshape([out, 1]);
    }
    if let (Some(a), Some(bw), false) = (&l.lora_A, &l.lora_B, l.merged) {
        // A bf16 base with f32 adapters: the side path runs in the adapters' dtype and is added
        // back in the base's, as `LoraLinear::forward` (and PEFT) do.
        let (a, bw) = (a.weight.val(), bw.weight.val());
        let (dtype, adapter_dtype) = (y.dtype(), a.dtype());
        let xc = if dtype == adapter_dtype {
            xc
        } else {
            xc.cast(adapter_dtype)
        };
        // [r, in] @ [in, 1] -> [r, 1]; [out, r] @ [r, 1] -> [out, 1]
        let side = bw.matmul(a.matmul(xc)).mul_scalar(l.scaling);
        y = y + if dtype == adapter_dtype {
            side
        } else {
            side.cast(dtype)
        };
    }
    y.reshape([1, 1, out])
}

/// `[1, 1, n_rep * s, past + s]`: query `i` (repeated for each head of a group) may see keys
/// `0..=past + i`; the rest get `f32::MIN`, as HF's additive mask.
fn causal_mask<B: Backend>(
    n_rep: usize,
    past: usize,
    s: usize,
    device: &B::Device,
) -> Tensor<B, 4> {
    let t = past + s;
    let mut v = vec![0f32; n_rep * s * t];
    for r in 0..n_rep {
        for i in 0..s {
            let row = (r * s + i) * t;
            v[row + past + i + 1..row + t].fill(f32::MIN);
        }
    }
    Tensor::from_data(
        TensorData::new(v, [1, 1, n_rep * s, t]),
        (device, DType::F32),
    )
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
