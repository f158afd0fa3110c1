//! Grouped-query self-attention as HF `Qwen2Attention` (eager path).
//!
//! q/k/v projections carry biases, o_proj does not. Scores are computed, masked and soft-maxed in f32
//! whatever the compute dtype, as HF's eager attention does (`softmax(..., dtype=float32)`). The mask
//! is additive, `0` or `f32::MIN`, exactly as HF's: a row with every key masked (a left-padding query)
//! then attends uniformly instead of producing NaN, and gradients flow through masked scores as they
//! do in PyTorch (zero wherever a key has any unmasked competitor), so even the loss terms of such rows
//! get transformers' gradients.

use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
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
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeCache<B>,
        bias: &AttentionBias<B>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);

        // [batch, seq, heads * head_dim] -> [batch, seq, heads, head_dim], rotated
        let q = rope.apply_bshd(self.q_proj.forward(x.clone()).reshape([b, s, nh, d]));
        let k = rope.apply_bshd(self.k_proj.forward(x.clone()).reshape([b, s, nkv, d]));
        let v = self.v_proj.forward(x).reshape([b, s, nkv, d]);
        let out = match crate::host::attention_bshd(&q, &k, &v, bias) {
            Some(out) => out,
            None => attention_reference(q, k, v, bias),
        };
        self.o_proj.forward(out.reshape([b, s, nh * d]))
    }
}

/// Grouped-query attention with Burn ops, `[batch, seq, heads, head_dim]` in and out (`k`, `v` with
/// `kv_heads`): heads moved forward, `k` and `v` repeated per query head, [`attend`] per row or per
/// packed sequence. The definition the CPU's fused operation is tested against.
pub(crate) fn attention_reference<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: &AttentionBias<B>,
) -> Tensor<B, 4> {
    let (nh, nkv) = (q.dims()[2], k.dims()[2]);
    // [batch, seq, heads, head_dim] -> [batch, heads, seq, head_dim]
    let (q, k, v) = (q.swap_dims(1, 2), k.swap_dims(1, 2), v.swap_dims(1, 2));
    // [batch, kv_heads, seq, head_dim] -> [batch, heads, seq, head_dim]
    let k = repeat_kv(k, nh / nkv);
    let v = repeat_kv(v, nh / nkv);

    let out = match bias {
        AttentionBias::Dense(mask) => attend(q, k, v, mask),
        AttentionBias::Packed(masks) => {
            // Each sequence of the packed row attends within itself: no score is computed
            // between two sequences.
            let mut start = 0;
            let mut parts = Vec::with_capacity(masks.len());
            for mask in masks {
                let len = mask.dims()[3];
                let part = |t: &Tensor<B, 4>| t.clone().narrow(2, start, len);
                parts.push(attend(part(&q), part(&k), part(&v), mask));
                start += len;
            }
            Tensor::cat(parts, 2)
        }
    };
    // [batch, heads, seq, head_dim] -> [batch, seq, heads, head_dim]
    out.swap_dims(1, 2)
}

/// Which keys each query may see, as additive f32 masks (`0` where visible, `f32::MIN` where hidden).
#[derive(Clone, Debug)]
pub enum AttentionBias<B: Backend> {
    /// `[batch, 1, seq, seq]` for a batch of rows (causal and padding).
    Dense(Tensor<B, 4>),
    /// One row holding several sequences back to back (a padding-free batch): per sequence, in
    /// order, its causal mask `[1, 1, len, len]`; the lengths add up to the row's length.
    Packed(Vec<Tensor<B, 4>>),
}

/// `softmax(q·kᵀ/√d + mask)·v` with scores and softmax in f32: `[b, heads, s, d]` in and out.
fn attend<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: &Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [b, nh, s, d] = q.dims();
    let dtype = q.dtype();
    let scores = q
        .matmul(k.swap_dims(2, 3))
        .cast(DType::F32)
        .mul_scalar(1.0 / (d as f64).sqrt());
    let scores = scores + mask.clone().expand([b, nh, s, s]);
    softmax(scores, 3).cast(dtype).matmul(v)
}

/// HF `repeat_kv`: each key/value head serves `n_rep` consecutive query heads.
fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n_rep: usize) -> Tensor<B, 4> {
    if n_rep == 1 {
        return x;
    }
    let [b, kv, s, d] = x.dims();
    // [b, kv, 1, s, d] -> [b, kv, n_rep, s, d] -> [b, kv * n_rep, s, d]
    x.unsqueeze_dim::<5>(2)
        .expand([b, kv, n_rep, s, d])
        .reshape([b, kv * n_rep, s, d])
}
