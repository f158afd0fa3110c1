//! `lora-core`: a LoRA layer for Burn with Hugging Face PEFT semantics.
//!
//! This crate knows no model. A model declares its linear projections as [`LoraLinear`]; with no
//! adapter attached the layer is an ordinary linear map `x·Wᵀ + b` over a weight stored in the
//! PyTorch/Hugging Face layout `[out, in]`, so a checkpoint tensor loads into it untouched and the
//! module path equals the checkpoint key.
//!
//! When an adapter is attached the forward pass is PEFT's side path
//! `base(x) + scaling · B(A(dropout(x)))`; the product `B·A` is never materialized during training.

mod linear;

pub use linear::{LoraLinear, LoraWeight};
