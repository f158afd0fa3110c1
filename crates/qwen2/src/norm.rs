//! RMSNorm as HF `Qwen2RMSNorm`: statistics in f32, result cast back, then scaled by `weight`.
//!
//! Burn's `RmsNorm` names its parameter `gamma`; this one is `weight`, so the module path equals the
//! checkpoint key (`model.layers.{i}.input_layernorm.weight`).

use burn::module::{Initializer, Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

/// Root-mean-square normalization over the last dimension.
#[derive(Module, Debug)]
pub struct Qwen2RmsNorm<B: Backend> {
    /// Per-channel scale, `[hidden]`.
    pub weight: Param<Tensor<B, 1>>,
    /// Added to the mean square before the square root.
    pub eps: f64,
}

impl<B: Backend> Qwen2RmsNorm<B> {
    /// A norm of width `dim` with unit weight (lazy).
    pub fn new(dim: usize, eps: f64, device: &B::Device) -> Self {
        Self {
            weight: Initializer::Ones.init([dim], device),
            eps,
        }
    }

    /// `weight * (x / sqrt(mean(x², -1) + eps))`, the statistics accumulated in f32.
    ///
    /// Training on the CPU (`Autodiff<Flex>`, f32, frozen weight) runs it as one operation with its
    /// own backward, on all cores (`kernels::cpu::rms_norm`).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let weight = self.weight.val();
        if let Some(y) = kernels::cpu::rms_norm(&x, &weight, self.eps) {
            return y;
        }
        self.forward_reference(x)
    }

    /// [`Self::forward`] with Burn ops: the definition the host operation is tested against.
    pub fn forward_reference<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let xf = x.cast(DType::F32);
        let var = xf.clone().powi_scalar(2).mean_dim(D - 1);
        let normed = xf * var.add_scalar(self.eps).sqrt().recip();
        normed.cast(dtype) * self.weight.val().unsqueeze::<D>()
    }
}
