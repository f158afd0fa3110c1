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

    /// `x` `[batch, seq, hidden]`; `mask` `[batch, 1, seq, seq]` f32, `f32::MIN` where a key is
    /// hidden and 0 elsewhere.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeCache<B>,
        mask: &Tensor<B, 4>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let dtype = x.dtype();

        // [batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim]
        let q = self
            .q_proj
            .forward(x.clone())
            .reshape([b, s, nh, d])
            .swap_dims(1, 2);
        let k = self
            .k_proj
            .forward(x.clone())
            .reshape([b, s, nkv, d])
            .swap_dims(1, 2);
        let v = self
            .v_proj
            .forward(x)
            .reshape([b, s, nkv, d])
            .swap_dims(1, 2);
        let q = rope.apply(q);
        let k = rope.apply(k);
        // [batch, kv_heads, seq, head_dim] -> [batch, heads, seq, head_dim]
        let k = repeat_kv(k, nh / nkv);
        let v = repeat_kv(v, nh / nkv);

        // [batch, heads, seq, seq], in f32.
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .cast(DType::F32)
            .mul_scalar(1.0 / (d as f64).sqrt());
        let scores = scores + mask.clone().expand([b, nh, s, s]);
        let probs = softmax(scores, 3).cast(dtype);
        // [batch, heads, seq, head_dim] -> [batch, seq, heads * head_dim]
        let out = probs.matmul(v).swap_dims(1, 2).reshape([b, s, nh * d]);
        self.o_proj.forward(out)
    }
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
