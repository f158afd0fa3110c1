//! Rotary position embeddings as HF `Qwen2RotaryEmbedding` + `apply_rotary_pos_emb` ("rotate half").
//!
//! Burn's `RotaryEncoding` rotates interleaved pairs `(x0, x1), (x2, x3), ...`; Qwen2 checkpoints were
//! trained with the rotate-half convention, pairing `x[i]` with `x[i + d/2]`, so this module exists.
//! Angles are computed in f32 from the position ids (as HF does), then cast to the compute dtype.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

/// `cos` and `sin` for one batch of positions, each `[batch, 1, seq, head_dim]`.
#[derive(Debug, Clone)]
pub struct RopeCache<B: Backend> {
    /// Cosines, broadcast over heads.
    pub cos: Tensor<B, 4>,
    /// Sines, broadcast over heads.
    pub sin: Tensor<B, 4>,
}

/// HF's `inv_freq = 1 / theta^(2i/d)`, computed in f32 as transformers does.
pub fn inv_freq(theta: f64, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

impl<B: Backend> RopeCache<B> {
    /// Angles for `position_ids` `[batch, seq]`, cast to `dtype`.
    pub fn new(position_ids: Tensor<B, 2, Int>, theta: f64, head_dim: usize, dtype: DType) -> Self {
        let device = position_ids.device();
        let [batch, seq] = position_ids.dims();
        let half = head_dim / 2;
        let inv = Tensor::<B, 1>::from_data(
            TensorData::new(inv_freq(theta, head_dim), [half]),
            (&device, DType::F32),
        )
        .reshape([1, 1, half]);
        // [batch, seq, 1] * [1, 1, half] -> [batch, seq, half], in f32.
        let pos = position_ids
            .float()
            .cast(DType::F32)
            .reshape([batch, seq, 1]);
        let freqs = pos * inv;
        // [batch, seq, head_dim]: the same angles for both halves.
        let emb = Tensor::cat(vec![freqs.clone(), freqs], 2);
        // [batch, 1, seq, head_dim]: broadcast over heads.
        let cos = emb.clone().cos().cast(dtype).unsqueeze_dim::<4>(1);
        let sin = emb.sin().cast(dtype).unsqueeze_dim::<4>(1);
        Self { cos, sin }
    }

    /// `x·cos + rotate_half(x)·sin` for `x` `[batch, heads, seq, head_dim]`.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, h, s, d] = x.dims();
        let cos = self.cos.clone().expand([b, h, s, d]);
        let sin = self.sin.clone().expand([b, h, s, d]);
        x.clone() * cos + rotate_half(x) * sin
    }

    /// [`Self::apply`] for `x` in `[batch, seq, heads, head_dim]` order (the projections' own
    /// layout, before heads are moved forward); on the CPU training path one fused operation.
    pub fn apply_bshd(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match kernels::cpu::rope(&x, &self.cos, &self.sin) {
            Some(y) => y,
            None => self.apply(x.swap_dims(1, 2)).swap_dims(1, 2),
        }
    }
}

/// `cat(-x[..., d/2:], x[..., :d/2])`.
fn rotate_half<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let d = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.narrow(3, d / 2, d / 2);
    Tensor::cat(vec![x2.neg(), x1], 3)
}
