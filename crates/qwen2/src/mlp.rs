//! SwiGLU MLP as HF `Qwen2MLP`: `down_proj(silu(gate_proj(x)) * up_proj(x))`, no biases.

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use lora_core::LoraLinear;

use crate::Qwen2Config;

/// The feed-forward block of a decoder layer.
#[derive(Module, Debug)]
pub struct Qwen2Mlp<B: Backend> {
    /// `[intermediate, hidden]`.
    pub gate_proj: LoraLinear<B>,
    /// `[intermediate, hidden]`.
    pub up_proj: LoraLinear<B>,
    /// `[hidden, intermediate]`.
    pub down_proj: LoraLinear<B>,
}

impl<B: Backend> Qwen2Mlp<B> {
    /// Lazily initialised random MLP.
    pub fn new(cfg: &Qwen2Config, device: &B::Device) -> Self {
        let (h, i, std) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.initializer_range,
        );
        Self {
            gate_proj: LoraLinear::new(h, i, false, std, device),
            up_proj: LoraLinear::new(h, i, false, std, device),
            down_proj: LoraLinear::new(i, h, false, std, device),
        }
    }

    /// `[batch, seq, hidden] -> [batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gate = self.gate_proj.forward(x.clone());
        let up = self.up_proj.forward(x);
        // Training on the CPU: one fused operation with its own backward, equal bit for bit.
        let h = kernels::cpu::swiglu(&gate, &up).unwrap_or_else(|| silu(gate) * up);
        self.down_proj.forward(h)
    }

    /// [`Self::forward`] for a step of batched decoding: the projections through
    /// [`LoraLinear::forward_rows`], so each row is independent of the others.
    pub fn forward_rows(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gate = self.gate_proj.forward_rows(x.clone());
        let up = self.up_proj.forward_rows(x);
        let h = kernels::cpu::swiglu(&gate, &up).unwrap_or_else(|| silu(gate) * up);
        self.down_proj.forward_rows(h)
    }
}
