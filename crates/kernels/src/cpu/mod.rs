//! Fused operations for training on the host CPU: Burn's Flex backend under `Autodiff`, in f32.
//!
//! Written with Burn ops, each of these is a chain of passes forward and backward, most of them on
//! one thread, and every Flex output buffer is allocated zeroed and copied once more. Here each is
//! one operation with a backward written out, on all cores, recorded in Burn's autodiff graph
//! ([`record`]) so that it composes with every other op.
//!
//! Every public operation takes generic Burn tensors and returns `None` unless [`applies`] holds
//! for its backend and dtypes (and its shapes are ones it takes); the caller then runs its Burn-ops
//! form. Bitwise agreement with those forms: the LoRA linear, SwiGLU and RoPE compute the same
//! expressions in the same order and agree bit for bit; RMSNorm, attention and the cross-entropy
//! sum in another order and agree to rounding (all tested in the crates that own the forms).

use std::any::{Any, TypeId};
use std::sync::OnceLock;

use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;

mod attention;
mod cross_entropy;
mod dora;
mod dropout;
pub mod gemm;
mod lora_linear;
mod norm;
mod rope;
mod rows;
mod swiglu;

pub use attention::{attention, AttentionMask};
pub use cross_entropy::{fused_linear_cross_entropy, linear_cross_entropy};
pub use dora::dora_row_norms;
pub use dropout::keep_mask;
pub use lora_linear::{lora_linear, lora_linear_4bit, lora_linear_applies, Adapter};
pub use norm::rms_norm;
pub use rope::rope;
pub use swiglu::swiglu;

/// `Autodiff<Flex>`: the backend the fused operations run on.
pub type Ad = Autodiff<Flex>;

/// `Autodiff<Flex>`'s float primitive: the Flex tensor and its autodiff node.
pub type HostTensor = burn::tensor::ops::FloatTensor<Ad>;

/// Whether the fused operations are on: they are unless the environment sets
/// `FERROLORA_FUSED_KERNELS=0`, which runs the Burn-ops forms instead (for measuring against them).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("FERROLORA_FUSED_KERNELS").map_or(true, |v| v != "0"))
}

/// `x·wᵀ (+ bias)` for `x` `[n, k]` and `w` `[out, k]` at inference (plain Flex, no autodiff, f32),
/// with row `j` of the result independent of the other rows ([`rows`]): what batched decoding
/// multiplies by. `None` on another backend or dtype (the caller multiplies with Burn).
pub fn linear_rows<B: Backend>(
    x: &Tensor<B, 2>,
    w: &Tensor<B, 2>,
    bias: Option<&Tensor<B, 1>>,
) -> Option<Tensor<B, 2>> {
    if TypeId::of::<B>() != TypeId::of::<Flex>()
        || !enabled()
        || x.dtype() != DType::F32
        || w.dtype() != DType::F32
        || bias.is_some_and(|b| b.dtype() != DType::F32)
    {
        return None;
    }
    let ([n, k], [out, wk]) = (x.dims(), w.dims());
    if k != wk || k == 0 {
        return None;
    }
    let plain = |t: Tensor<Flex, 2>| contiguous(t.into_primitive().tensor());
    let xf = plain(same_type::<_, Tensor<Flex, 2>>(x.clone())?);
    let wf = plain(same_type::<_, Tensor<Flex, 2>>(w.clone())?);
    let bf = match bias {
        Some(b) => Some(contiguous(
            same_type::<_, Tensor<Flex, 1>>(b.clone())?
                .into_primitive()
                .tensor(),
        )),
        None => None,
    };
    let y = rows::linear_rows(slice(&xf), slice(&wf), bf.as_ref().map(slice), n, k);
    same_type(Tensor::<Flex, 2>::from_primitive(TensorPrimitive::Float(
        flex(y, [n, out]),
    )))
}

/// Whether `B` computes on the host CPU (Flex, also under `Autodiff`), where a kernel written in
/// Rust over the tensor's own memory beats a chain of single-threaded backend ops.
pub fn is_cpu_backend<B: Backend>() -> bool {
    TypeId::of::<B::Device>() == TypeId::of::<burn::backend::flex::FlexDevice>()
}

/// The gate of every fused operation: `B` is `Autodiff<Flex>`, the operations are [`enabled`],
/// and every operand is f32.
pub fn applies<B: Backend>(dtypes: &[DType]) -> bool {
    TypeId::of::<B>() == TypeId::of::<Ad>() && enabled() && dtypes.iter().all(|&d| d == DType::F32)
}

/// Whether `B` is plain Flex (inference: no autodiff) and the fused operations are on: then
/// RMSNorm, SwiGLU, RoPE and attention run their fused forward ([`inference`], [`from_inference`]).
fn infers<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<Flex>() && enabled()
}

/// A plain Flex tensor as an untracked `Autodiff<Flex>` one (no graph, nothing kept for a
/// backward), so that a fused operation runs its forward alone at inference.
fn inference<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<Tensor<Ad, D>> {
    Some(Tensor::<Ad, D>::from_inner(
        same_type::<_, Tensor<Flex, D>>(t.clone())?,
    ))
}

/// The result of a fused operation run through [`inference`], back as plain Flex.
fn from_inference<B: Backend, const D: usize>(t: Tensor<Ad, D>) -> Option<Tensor<B, D>> {
    same_type(t.inner())
}

/// `t`'s `Autodiff<Flex>` primitive, or `None` when `B` is another backend.
pub fn to_host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Option<HostTensor> {
    Some(same_type::<_, Tensor<Ad, D>>(t)?.into_primitive().tensor())
}

/// A host primitive back as a `Tensor<B, D>`, or `None` when `B` is another backend.
pub fn from_host<B: Backend, const D: usize>(t: HostTensor) -> Option<Tensor<B, D>> {
    same_type(Tensor::<Ad, D>::from_primitive(TensorPrimitive::Float(t)))
}

/// `t` as the same value of type `U`, when `T` and `U` are the same type.
fn same_type<T: 'static, U: 'static>(t: T) -> Option<U> {
    if TypeId::of::<T>() != TypeId::of::<U>() {
        return None;
    }
    (Box::new(t) as Box<dyn Any>)
        .downcast::<U>()
        .ok()
        .map(|b| *b)
}

/// The contiguous Flex tensor of `t` (the tensor itself when contiguous, else a copy), for a
/// backend that [`applies`] checked.
fn host<B: Backend, const D: usize>(t: &Tensor<B, D>) -> (HostTensor, FlexTensor) {
    let h = to_host(t.clone()).expect("applies() checked the backend");
    let c = contiguous(h.primitive.clone());
    (h, c)
}

/// `t` itself when its f32 elements are contiguous, else a contiguous copy.
fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The f32 elements of a contiguous tensor (see [`contiguous`]).
fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32 tensor")
}

/// A Flex tensor of `shape` over `v`.
fn flex<S: Into<burn::tensor::Shape>>(v: Vec<f32>, shape: S) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(v, shape))
}

/// Records `out`, computed from `parents` by `op`, in the autodiff graph: `op`'s backward gets
/// `state` when any parent takes a gradient (nothing is kept otherwise).
fn record<Op, const N: usize>(
    op: Op,
    parents: [&HostTensor; N],
    state: Op::State,
    out: FlexTensor,
) -> HostTensor
where
    Op: Backward<Flex, N>,
{
    match op
        .prepare::<NoCheckpointing>(parents.map(|p| p.node.clone()))
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// Which parents of `ops` take a gradient.
fn wanted<S, const N: usize>(ops: &Ops<S, N>) -> [bool; N] {
    std::array::from_fn(|i| ops.parents[i].is_some())
}

/// Registers each parent's gradient (a parent that takes none, or a `None`, is skipped).
fn register<S, const N: usize>(
    ops: &Ops<S, N>,
    grads: &mut Gradients,
    out: [Option<FlexTensor>; N],
) {
    for (parent, g) in ops.parents.iter().zip(out) {
        if let (Some(node), Some(g)) = (parent, g) {
            grads.register::<Flex>(node.id, g);
        }
    }
}
