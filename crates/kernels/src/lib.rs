//! `kernels`: the workspace's low-level code, and the only crate in it with `unsafe`.
//!
//! * [`cpu`] (feature `cpu`, on by default): fused operations for training on the host CPU
//!   (Burn's Flex backend under `Autodiff`, f32), each one operation with its own backward on all
//!   cores instead of a chain of Burn ops: the LoRA linear, SwiGLU, rotary embedding, RMSNorm,
//!   grouped-query attention and the softmax cross-entropy through a frozen output head. Every
//!   operation returns `None` when it does not apply (another backend or dtype, a shape it does not
//!   take, `FERROLORA_FUSED_KERNELS=0`), and the caller then runs its Burn-ops form, which stays the
//!   definition the fused form is tested against. A `cuda` module will sit beside it.
//! * [`cpu::gemm`]: the one checked entry point to the `gemm` crate: matrix views that assert
//!   their extent when built.
//! * [`io`]: atomic, durable file replacement and read-only memory maps of checkpoints.
//! * [`rng`]: SplitMix64, the one small seeded generator of the workspace.
#![deny(clippy::undocumented_unsafe_blocks)]

#[cfg(feature = "cpu")]
pub mod cpu;
pub mod io;
pub mod rng;
