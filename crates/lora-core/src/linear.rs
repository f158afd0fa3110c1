//! The LoRA-wrappable linear layer, mirroring PEFT's `lora.Linear` around a `torch.nn.Linear`.
//!
//! Differences from Burn's `nn::Linear`: the weight keeps the `[out, in]` layout of PyTorch
//! checkpoints (Burn's stores `[in, out]`); multiplying by its transposed view costs nothing on Flex
//! (strided GEMM), so no conversion happens at load time.
#![allow(non_snake_case)] // `lora_A` / `lora_B`: the field names are PEFT's checkpoint keys.

use burn::module::{Initializer, Module, Param};
use burn::nn::Dropout;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// One LoRA factor; its parameter path ends in `lora_A.weight` / `lora_B.weight`, as in PEFT.
#[derive(Module, Debug)]
pub struct LoraWeight<B: Backend> {
    /// `lora_A`: `[r, in]`; `lora_B`: `[out, r]`.
    pub weight: Param<Tensor<B, 2>>,
}

/// A linear layer `y = x·Wᵀ + b` that can carry a LoRA adapter.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// Base weight, `[out_features, in_features]` (PyTorch layout).
    pub weight: Param<Tensor<B, 2>>,
    /// Optional base bias, `[out_features]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// Down projection `[r, in_features]`, present when an adapter is attached.
    pub lora_A: Option<LoraWeight<B>>,
    /// Up projection `[out_features, r]`, present when an adapter is attached.
    pub lora_B: Option<LoraWeight<B>>,
    /// Dropout applied to the adapter's input only (PEFT `lora_dropout`); active under autodiff.
    pub lora_dropout: Option<Dropout>,
    /// `lora_alpha / r` (or `lora_alpha / sqrt(r)` with rsLoRA); unused without an adapter.
    pub scaling: f64,
}

impl<B: Backend> LoraLinear<B> {
    /// A layer with lazily initialised random weights (normal, std `init_std`), no adapter.
    ///
    /// Parameters are lazy: nothing is allocated until first use, so a model built this way and then
    /// loaded from a checkpoint never holds the random values.
    pub fn new(
        in_features: usize,
        out_features: usize,
        bias: bool,
        init_std: f64,
        device: &B::Device,
    ) -> Self {
        let init = Initializer::Normal {
            mean: 0.0,
            std: init_std,
        };
        Self {
            weight: init.init([out_features, in_features], device),
            bias: bias.then(|| Initializer::Zeros.init([out_features], device)),
            lora_A: None,
            lora_B: None,
            lora_dropout: None,
            scaling: 1.0,
        }
    }

    /// `[out_features, in_features]` without materializing a lazy weight.
    pub fn shape(&self) -> [usize; 2] {
        self.weight.lazy_shape().dims::<2>()
    }

    /// Whether an adapter is attached.
    pub fn has_adapter(&self) -> bool {
        self.lora_A.is_some() && self.lora_B.is_some()
    }

    /// The base map only: `x·Wᵀ + b` over the last dimension.
    pub fn forward_base<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        // [.., in] @ [in, out]: a transposed view, no copy.
        let y = x.matmul(self.weight.val().transpose().unsqueeze::<D>());
        match &self.bias {
            Some(b) => y + b.val().unsqueeze::<D>(),
            None => y,
        }
    }

    /// `x·Wᵀ + b + scaling · (dropout(x)·Aᵀ)·Bᵀ`; the base alone when no adapter is attached.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let (Some(a), Some(b)) = (&self.lora_A, &self.lora_B) else {
            return self.forward_base(x);
        };
        let xd = match &self.lora_dropout {
            Some(d) => d.forward(x.clone()),
            None => x.clone(),
        };
        // Rank-r side path: two thin GEMMs instead of a full-size `W + s·B·A`.
        let low = xd.matmul(a.weight.val().transpose().unsqueeze::<D>()); // [.., r]
        let side = low.matmul(b.weight.val().transpose().unsqueeze::<D>()); // [.., out]
        self.forward_base(x) + side.mul_scalar(self.scaling)
    }
}
