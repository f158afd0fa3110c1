//! `lora-core`: a LoRA layer for Burn with Hugging Face PEFT semantics and adapter files.
//!
//! This crate knows no model. A model declares its linear projections as [`LoraLinear`]; with no
//! adapter attached the layer is an ordinary linear map `x·Wᵀ + b` over a weight stored in the
//! PyTorch/Hugging Face layout `[out, in]`, so a checkpoint tensor loads into it untouched and the
//! module path equals the checkpoint key. The model then implements [`LoraModel`] (list its linear
//! layers with their paths), and [`apply_lora`] / [`load_adapter`] / [`save_adapter`] work on it.
//!
//! When an adapter is attached the forward pass is PEFT's side path
//! `base(x) + scaling · B(A(dropout(x)))`; the product `B·A` is never materialized during training.

mod adapter;
mod config;
mod dropout;
mod error;
pub mod host;
mod linear;
mod target;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

pub use adapter::{
    adapter_tensors, load_adapter, save_adapter, sync_dir, write_atomic, ADAPTER_CONFIG,
    ADAPTER_WEIGHTS, PEFT_PREFIX,
};
pub use config::{InitLoraWeights, LayerSelector, LoraConfig, ModuleSelector, TUTORIAL_TARGETS};
pub use dropout::{dropout, is_host_backend};
pub use error::{is_storage_full, LoraError};
pub use host::host_kernels_enabled;
pub use linear::{matmul_t, param_id, LoraLinear, LoraWeight};
pub use target::{apply_lora, is_targeted, merge_all, unmerge_all, LoraModel, LoraReport};

/// `(adapter elements, all elements)` of a module, without materializing lazy parameters.
/// Adapter parameters are those whose path ends in `lora_A.weight` / `lora_B.weight`.
pub fn param_count<B: Backend, M: Module<B>>(model: &M) -> (usize, usize) {
    struct Count {
        stack: Vec<String>,
        lora: usize,
        all: usize,
    }
    impl<B: Backend> ModuleVisitor<B> for Count {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let n = p.lazy_shape().num_elements();
            self.all += n;
            if self.stack.iter().any(|s| s == "lora_A" || s == "lora_B") {
                self.lora += n;
            }
        }
    }
    let mut c = Count {
        stack: Vec::new(),
        lora: 0,
        all: 0,
    };
    model.visit(&mut c);
    (c.lora, c.all)
}
