//! Grouped-query self-attention as HF `Qwen2Attention` (eager path), for training, evaluation and
//! cached decoding alike.
//!
//! q/k/v projections carry biases, o_proj does not. Scores are computed, masked and soft-maxed in f32
//! whatever the compute dtype, as HF's eager attention does (`softmax(..., dtype=float32)`). The mask
//! is additive, `0` or `f32::MIN`, exactly as HF's: a row with every key masked (a left-padding query)
//! then attends uniformly instead of producing NaN, and gradients flow through masked scores as they
//! do in PyTorch (zero wherever a key has any unmasked competitor), so even the loss terms of such rows
//! get transformers' gradients.
//!
//! Differences from HF, on purpose: no `repeat_kv`: the queries of the `n_rep` heads sharing a
//! key/value head are stacked into one matrix, so keys and values (cached ones included) are never
//! copied per head; and training on the CPU runs `kernels::cpu::attention`, one fused operation
//! with its own backward.

use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use kernels::cpu::AttentionMask;
use lora_core::LoraLinear;

use crate::rope::RopeCache;
use crate::Qwen2Config;

/// Self-attention block of a decoder layer.
#[derive(Module, Debug)]
pub struct Qwen2Attention<B: Backend> {
    /// `[heads * head_dim, hidden]`, with bias.
    pub q_proj: LoraLinear<B>,
    /// `[kv_heads * head_dim, hidden]`, with bias.
    pub k_proj: LoraLinear<B>,
    /// `[kv_heads * head_dim, hidden]`, with bias.
    pub v_proj: LoraLinear<B>,
    /// `[hidden, heads * head_dim]`, no bias.
    pub o_proj: LoraLinear<B>,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// Which keys each query may see, as additive f32 masks (`0` where visible, `f32::MIN` where hidden).
#[derive(Clone, Debug)]
pub enum AttentionBias<B: Backend> {
    /// `[batch or 1, 1, seq, keys]` for a batch of rows (causal and padding); `keys` counts the
    /// cached positions too.
    Dense(Tensor<B, 4>),
    /// One row holding several sequences back to back (a padding-free batch): per sequence, in
    /// order, its causal mask `[1, 1, len, len]`; the lengths add up to the row's length.
    Packed(Vec<Tensor<B, 4>>),
    /// Every query sees every key (one new token after a cache).
    Full,
}

/// A layer's keys and values for the positions seen so far: `[batch, kv_heads, cached, head_dim]`
/// each, RoPE already applied (HF `DynamicCache`'s entry for one layer).
pub type LayerCache<B> = Option<(Tensor<B, 4>, Tensor<B, 4>)>;

impl<B: Backend> Qwen2Attention<B> {
    /// Lazily initialised random attention.
    pub fn new(cfg: &Qwen2Config, device: &B::Device) -> Self {
        let (h, d, std) = (cfg.hidden_size, cfg.head_dim(), cfg.initializer_range);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads());
        Self {
            q_proj: LoraLinear::new(h, nh * d, true, std, device),
            k_proj: LoraLinear::new(h, nkv * d, true, std, device),
            v_proj: LoraLinear::new(h, nkv * d, true, std, device),
            o_proj: LoraLinear::new(nh * d, h, false, std, device),
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
        }
    }

    /// `x` `[batch, seq, hidden]`; `bias` says which keys each query sees ([`AttentionBias`]).
    /// With a `cache`, `x` follows the cached positions: its keys and values are appended to the
    /// cache and its queries attend over all of them.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeCache<B>,
        bias: &AttentionBias<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);

        // [batch, seq, heads * head_dim] -> [batch, seq, heads, head_dim], rotated
        let q = rope.apply_bshd(self.q_proj.forward(x.clone()).reshape([b, s, nh, d]));
        let k = rope.apply_bshd(self.k_proj.forward(x.clone()).reshape([b, s, nkv, d]));
        let v = self.v_proj.forward(x).reshape([b, s, nkv, d]);
        // An empty cache (a prompt) attends like a forward without one; its keys and values are
        // then cached.
        let fresh = cache.as_ref().is_none_or(|c| c.is_none());
        let fused = match bias {
            AttentionBias::Dense(m) if fresh && m.dims()[3] == s => {
                kernels::cpu::attention(&q, &k, &v, AttentionMask::Dense(m))
            }
            AttentionBias::Packed(m) if cache.is_none() => {
                kernels::cpu::attention(&q, &k, &v, AttentionMask::Packed(m))
            }
            _ => None,
        };
        let out = match fused {
            Some(out) => {
                if let Some(slot) = cache {
                    // [batch, seq, kv_heads, head_dim] -> [batch, kv_heads, seq, head_dim]
                    *slot = Some((k.swap_dims(1, 2), v.swap_dims(1, 2)));
                }
                out
            }
            None => {
                // [batch, seq, heads, head_dim] -> [batch, heads, seq, head_dim]
                let (q, k, v) = (q.swap_dims(1, 2), k.swap_dims(1, 2), v.swap_dims(1, 2));
                let (k, v) = match cache {
                    Some(cache) => append(cache, k, v),
                    None => (k, v),
                };
                attention_reference(q, k, v, bias).swap_dims(1, 2)
            }
        };
        self.o_proj.forward(out.reshape([b, s, nh * d]))
    }
}

impl<B: Backend> Qwen2Attention<B> {
    /// One new token per sequence, `x` `[n, 1, hidden]`, sequence `i` after its own cache
    /// `caches[i]` (of any length; `rope` holds each row's position), extending each cache: the
    /// projections run for all rows at once ([`LoraLinear::forward_rows`]), the attention per
    /// sequence over its own keys. Row `i` equals [`Self::forward`] of that token alone after that
    /// cache (bit for bit on the CPU).
    pub fn forward_rows(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeCache<B>,
        caches: &mut [&mut LayerCache<B>],
    ) -> Tensor<B, 3> {
        let [n, s, _] = x.dims();
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = rope.apply_bshd(self.q_proj.forward_rows(x.clone()).reshape([n, s, nh, d]));
        let k = rope.apply_bshd(self.k_proj.forward_rows(x.clone()).reshape([n, s, nkv, d]));
        let v = self.v_proj.forward_rows(x).reshape([n, s, nkv, d]);
        // [n, seq, heads, head_dim] -> [n, heads, seq, head_dim]
        let (q, k, v) = (q.swap_dims(1, 2), k.swap_dims(1, 2), v.swap_dims(1, 2));
        let outs = caches
            .iter_mut()
            .enumerate()
            .map(|(i, cache)| {
                let row = |t: &Tensor<B, 4>| t.clone().narrow(0, i, 1);
                let (k, v) = append(cache, row(&k), row(&v));
                attention_reference(row(&q), k, v, &AttentionBias::Full)
            })
            .collect();
        let out = Tensor::cat(outs, 0).swap_dims(1, 2);
        self.o_proj.forward_rows(out.reshape([n, s, nh * d]))
    }
}

/// `k`, `v` `[batch, kv_heads, seq, head_dim]` appended to `cache` along the positions; returns
/// every key and value cached, the new ones included.
fn append<B: Backend>(
    cache: &mut LayerCache<B>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let (k, v) = match cache.take() {
        Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
        None => (k, v),
    };
    *cache = Some((k.clone(), v.clone()));
    (k, v)
}

/// Grouped-query attention with Burn ops, `[batch, heads, seq, head_dim]` queries over
/// `[batch, kv_heads, keys, head_dim]` keys and values, out `[batch, heads, seq, head_dim]`, per row
/// or per packed sequence: the definition the CPU's fused operation is tested against.
pub fn attention_reference<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: &AttentionBias<B>,
) -> Tensor<B, 4> {
    match bias {
        AttentionBias::Dense(mask) => attend(q, k, v, Some(mask)),
        AttentionBias::Full => attend(q, k, v, None),
        AttentionBias::Packed(masks) => {
            // Each sequence of the packed row attends within itself: no score is computed
            // between two sequences.
            let mut start = 0;
            let mut parts = Vec::with_capacity(masks.len());
            for mask in masks {
                let len = mask.dims()[3];
                let part = |t: &Tensor<B, 4>| t.clone().narrow(2, start, len);
                parts.push(attend(part(&q), part(&k), part(&v), Some(mask)));
                start += len;
            }
            Tensor::cat(parts, 2)
        }
    }
}

/// `softmax(q·kᵀ/√d + mask)·v` with scores and softmax in f32, grouped: query head
/// `h = g·n_rep + r` uses key/value head `g` (HF `repeat_kv`'s pairing, without the copies).
fn attend<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<&Tensor<B, 4>>,
) -> Tensor<B, 4> {
    let [b, nh, s, d] = q.dims();
    let [_, nkv, t, _] = k.dims();
    let n_rep = nh / nkv;
    let dtype = q.dtype();
    // [batch, heads, seq, head_dim] -> [batch, kv_heads, n_rep * seq, head_dim]
    let q = q.reshape([b, nkv, n_rep * s, d]);
    // [batch, kv_heads, n_rep * seq, keys], in f32 as HF's eager attention.
    let scores = q
        .matmul(k.swap_dims(2, 3))
        .cast(DType::F32)
        .mul_scalar(1.0 / (d as f64).sqrt());
    let scores = match mask {
        Some(m) => {
            // [batch or 1, 1, seq, keys] -> [batch, kv_heads, n_rep, seq, keys]
            let m = m
                .clone()
                .unsqueeze_dim::<5>(1)
                .expand([b, nkv, n_rep, s, t]);
            (scores.reshape([b, nkv, n_rep, s, t]) + m).reshape([b, nkv, n_rep * s, t])
        }
        None => scores,
    };
    // [batch, kv_heads, n_rep * seq, head_dim] -> [batch, heads, seq, head_dim]
    softmax(scores, 3)
        .cast(dtype)
        .matmul(v)
        .reshape([b, nh, s, d])
}
