//! The LoRA linear layer as one operation with its own backward on the host CPU (Burn's Flex
//! backend under `Autodiff`, f32), used by [`LoraLinear::forward`](crate::LoraLinear::forward).
//!
//! Written with Burn ops, a LoRA linear is about eight forward and a dozen backward operations,
//! most of them element-wise passes on one thread, and every output buffer of Flex is allocated
//! zeroed and then copied once more to align it. Here the forward is
//! `y = x·Wᵀ (+ b) + (s·(dropout(x)·Aᵀ))·Bᵀ` with the GEMMs called directly on all cores, writing
//! straight into the output, and the backward is written out:
//!
//! * `gu = gy·B` (`[rows, r]`), `gB = gyᵀ·u` with `u = s·(xd·Aᵀ)` saved from the forward;
//! * `ga = s·gu`, `gA = gaᵀ·xd`;
//! * `gx = gy·W + (ga·A) ⊙ mask`, where the dropout mask is drawn again from its saved key.
//!
//! The operations and their order are those of the Burn-ops path ([`LoraLinear::forward_reference`]
//! (crate::LoraLinear::forward_reference)), so the two agree bit for bit (tested). The frozen base
//! weight gets no gradient; a base weight or bias that requires one sends the layer down the
//! Burn-ops path, as does any other backend or dtype.
//!
//! The small helpers at the top ([`to_host`], [`from_host`], [`contiguous`], [`slice()`],
//! [`host_kernels_enabled`]) serve the model crates' own fused operations too.

use std::any::{Any, TypeId};
use std::sync::OnceLock;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::dropout::keep_mask;
use crate::linear::LoraLinear;

type Ad = Autodiff<Flex>;

/// Whether the host kernels (this layer's and the model crates' fused operations) are on: they are
/// unless the environment sets `FERROLORA_HOST_KERNELS=0`, for measuring them against Burn ops.
pub fn host_kernels_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("FERROLORA_HOST_KERNELS").map_or(true, |v| v != "0"))
}

/// `Autodiff<Flex>`'s float primitive: the Flex tensor and its autodiff node.
pub type HostTensor = burn::tensor::ops::FloatTensor<Ad>;

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

/// Whether [`forward`] takes the layer for an input of `dtype`.
pub(crate) fn applies<B: Backend>(layer: &LoraLinear<B>, dtype: DType) -> bool {
    let f32_frozen = |t: &Tensor<B, 2>| t.dtype() == DType::F32 && !t.is_require_grad();
    TypeId::of::<B>() == TypeId::of::<Ad>()
        && host_kernels_enabled()
        && dtype == DType::F32
        && f32_frozen(&layer.weight.val())
        && layer.bias.as_ref().is_none_or(|b| {
            let b = b.val();
            b.dtype() == DType::F32 && !b.is_require_grad()
        })
        && match (&layer.lora_A, &layer.lora_B, layer.merged) {
            (Some(a), Some(b), false) => {
                a.weight.val().dtype() == DType::F32 && b.weight.val().dtype() == DType::F32
            }
            _ => true,
        }
}

/// The layer's output through the host operation, for a layer and input that [`applies`] accepts;
/// `key` is the dropout key drawn by the caller (`None`: no dropout).
pub(crate) fn forward<B: Backend, const D: usize>(
    layer: &LoraLinear<B>,
    x: Tensor<B, D>,
    key: Option<u64>,
) -> Tensor<B, D> {
    const CHECKED: &str = "applies() checked the backend";
    let ad2 = |t: Tensor<B, 2>| to_host(t).expect(CHECKED);
    let bias = (layer.bias.as_ref()).map(|b| to_host(b.val()).expect(CHECKED).primitive);
    let adapter = match (&layer.lora_A, &layer.lora_B, layer.merged) {
        (Some(a), Some(b), false) => Some((ad2(a.weight.val()), ad2(b.weight.val()))),
        _ => None,
    };
    let keep = 1.0 - layer.lora_dropout.as_ref().map_or(0.0, |d| d.prob);
    let mut dims = x.dims();
    let rows = dims[..D - 1].iter().product::<usize>();
    let out = lora_linear(
        ad2(x.reshape([rows, dims[D - 1]])),
        ad2(layer.weight.val()).primitive,
        bias,
        adapter,
        layer.scaling as f32,
        key.map(|k| (k, keep)),
    );
    let y: Tensor<B, 2> = from_host(out).expect(CHECKED);
    dims[D - 1] = y.dims()[1];
    y.reshape(dims)
}

/// What the backward needs.
#[derive(Clone, Debug)]
struct State {
    /// Base weight `[out, in]`.
    w: FlexTensor,
    /// With an adapter: `xd = dropout(x)` `[rows, in]`, `u = s·(xd·Aᵀ)` `[rows, r]`, `A`, `B`.
    adapter: Option<[FlexTensor; 4]>,
    /// Dropout key and keep probability.
    key: Option<(u64, f64)>,
    scaling: f32,
}

#[derive(Debug)]
struct HostLoraLinear;

/// `t` itself when its f32 elements are contiguous, else a contiguous copy.
pub fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The f32 elements of a contiguous tensor (see [`contiguous`]).
pub fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32 tensor")
}

fn flex(v: Vec<f32>, shape: [usize; 2]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(v, shape))
}

/// A row-major `[rows, cols]` matrix or its transpose, as `gemm` strides `(ptr, cs, rs)`.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    cs: isize,
    rs: isize,
}

impl Mat {
    fn n(s: &[f32], cols: usize) -> Self {
        Self {
            ptr: s.as_ptr(),
            cs: 1,
            rs: cols as isize,
        }
    }
    /// The transpose of the row-major `[rows, cols]` matrix `s`.
    fn t(s: &[f32], cols: usize) -> Self {
        Self {
            ptr: s.as_ptr(),
            cs: cols as isize,
            rs: 1,
        }
    }
}

/// `dst` `[m, n]` = `dst` (when `acc`) + `beta · lhs·rhs`, `lhs` `[m, k]`, `rhs` `[k, n]`.
///
/// # Safety
/// `lhs` and `rhs` must describe `[m, k]` and `[k, n]` matrices inside live allocations.
unsafe fn mm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    acc: bool,
    lhs: Mat,
    rhs: Mat,
    beta: f32,
) {
    assert_eq!(dst.len(), m * n);
    // Flex's rule: below 192³ multiply-adds the threads cost more than they save.
    let par = if m * n * k >= 192 * 192 * 192 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `dst` is `[m, n]` row-major (checked); the caller vouches for `lhs` and `rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            acc,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            1.0f32,
            beta,
            false,
            false,
            false,
            par,
        );
    }
}

/// `lhs·rhs` (`[m, k]`·`[k, n]`) in a new `[m, n]` buffer.
///
/// # Safety
/// As for [`mm`].
unsafe fn product(mnk: (usize, usize, usize), lhs: Mat, rhs: Mat) -> Vec<f32> {
    let mut dst = output(mnk.0 * mnk.1);
    // SAFETY: vouched for by the caller.
    unsafe { mm(mnk, &mut dst, false, lhs, rhs, 1.0) };
    dst
}

/// An `[m, n]` output buffer for a GEMM that overwrites it.
fn output(len: usize) -> Vec<f32> {
    // Zeroed lazily by the kernel's pages; the GEMM writes every element before any is read.
    vec![0f32; len]
}

/// `a[i] += b[i]·c[i]`, on all cores.
fn add_mul(a: &mut [f32], b: &[f32], c: &[f32]) {
    const CHUNK: usize = 1 << 14;
    a.par_chunks_mut(CHUNK)
        .zip(b.par_chunks(CHUNK).zip(c.par_chunks(CHUNK)))
        .for_each(|(a, (b, c))| {
            for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                *a += b * c;
            }
        });
}

/// The forward; see the module docs. `x` `[rows, in]`, `w` `[out, in]`, `adapter` `(A [r, in],
/// B [out, r])`, `dropout` `(key, keep probability)`.
fn lora_linear(
    x: HostTensor,
    w: FlexTensor,
    bias: Option<FlexTensor>,
    adapter: Option<(HostTensor, HostTensor)>,
    scaling: f32,
    dropout: Option<(u64, f64)>,
) -> HostTensor {
    let w = contiguous(w);
    let [out_f, in_f] = w.layout().shape().dims::<2>();
    let xp = contiguous(x.primitive.clone());
    let rows = xp.layout().shape().dims::<2>()[0];
    let (xs, ws) = (slice(&xp), slice(&w));

    // y = x·Wᵀ
    // SAFETY: x is [rows, in], w is [out, in] read as its transpose [in, out].
    let mut y = unsafe { product((rows, out_f, in_f), Mat::n(xs, in_f), Mat::t(ws, in_f)) };
    // + b
    if let Some(b) = bias {
        let b = contiguous(b);
        let bs = slice(&b);
        y.par_chunks_mut(out_f).for_each(|row| {
            for (v, b) in row.iter_mut().zip(bs) {
                *v += b;
            }
        });
    }

    let saved = adapter.as_ref().map(|(a, b)| {
        let (a, b) = (
            contiguous(a.primitive.clone()),
            contiguous(b.primitive.clone()),
        );
        let r = a.layout().shape().dims::<2>()[0];
        // xd = dropout(x)
        let xd = match dropout {
            Some((key, keep)) => {
                let mut xd = keep_mask(key, rows * in_f, keep);
                xd.par_chunks_mut(1 << 14)
                    .zip(xs.par_chunks(1 << 14))
                    .for_each(|(m, x)| m.iter_mut().zip(x).for_each(|(m, x)| *m *= x));
                flex(xd, [rows, in_f])
            }
            None => xp.clone(),
        };
        // u = s·(xd·Aᵀ)
        let mut u = output(rows * r);
        // SAFETY: xd is [rows, in], A is [r, in] read as [in, r].
        unsafe {
            mm(
                (rows, r, in_f),
                &mut u,
                false,
                Mat::n(slice(&xd), in_f),
                Mat::t(slice(&a), in_f),
                scaling,
            )
        };
        // y += u·Bᵀ
        // SAFETY: u is [rows, r], B is [out, r] read as [r, out].
        unsafe {
            mm(
                (rows, out_f, r),
                &mut y,
                true,
                Mat::n(&u, r),
                Mat::t(slice(&b), r),
                1.0,
            )
        };
        [xd, flex(u, [rows, r]), a, b]
    });
    let y = flex(y, [rows, out_f]);

    let state = State {
        w,
        adapter: saved,
        key: dropout,
        scaling,
    };
    // The parents: x, and A and B with an adapter (the frozen base takes no gradient).
    macro_rules! finish {
        ($n:literal, $nodes:expr) => {
            match <HostLoraLinear as Backward<Flex, $n>>::prepare::<NoCheckpointing>(
                HostLoraLinear,
                $nodes,
            )
            .compute_bound()
            .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(state, y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            }
        };
    }
    match &adapter {
        None => finish!(1, [x.node.clone()]),
        Some((a, b)) => finish!(3, [x.node.clone(), a.node.clone(), b.node.clone()]),
    }
}

/// Gradients `(gx, gA, gB)`, each computed only when `want` asks for it.
fn backward(state: State, gy: FlexTensor, want: [bool; 3]) -> [Option<FlexTensor>; 3] {
    let gy = contiguous(gy);
    let w = &state.w;
    let [out_f, in_f] = w.layout().shape().dims::<2>();
    let rows = gy.layout().shape().dims::<2>()[0];
    let gys = slice(&gy);
    // SAFETY: gy is [rows, out], W is [out, in].
    let mut gx = want[0].then(|| unsafe {
        product(
            (rows, in_f, out_f),
            Mat::n(gys, out_f),
            Mat::n(slice(w), in_f),
        )
    });
    let (mut ga_out, mut gb_out) = (None, None);
    if let Some([xd, u, a, b]) = &state.adapter {
        let r = a.layout().shape().dims::<2>()[0];
        if want[2] {
            // SAFETY: gyᵀ is [out, rows], u is [rows, r].
            let gb = unsafe { product((out_f, r, rows), Mat::t(gys, out_f), Mat::n(slice(u), r)) };
            gb_out = Some(flex(gb, [out_f, r]));
        }
        if want[0] || want[1] {
            // ga = s·(gy·B)
            // SAFETY: gy is [rows, out], B is [out, r].
            let mut ga =
                unsafe { product((rows, r, out_f), Mat::n(gys, out_f), Mat::n(slice(b), r)) };
            ga.iter_mut().for_each(|v| *v *= state.scaling);
            if want[1] {
                // SAFETY: gaᵀ is [r, rows], xd is [rows, in].
                let g =
                    unsafe { product((r, in_f, rows), Mat::t(&ga, r), Mat::n(slice(xd), in_f)) };
                ga_out = Some(flex(g, [r, in_f]));
            }
            if let Some(gx) = gx.as_mut() {
                // SAFETY: ga is [rows, r], A is [r, in].
                let gxd =
                    unsafe { product((rows, in_f, r), Mat::n(&ga, r), Mat::n(slice(a), in_f)) };
                match state.key {
                    Some((key, keep)) => add_mul(gx, &gxd, &keep_mask(key, rows * in_f, keep)),
                    None => gx.par_iter_mut().zip(&gxd).for_each(|(g, d)| *g += d),
                }
            }
        }
    }
    [gx.map(|g| flex(g, [rows, in_f])), ga_out, gb_out]
}

impl<const N: usize> Backward<Flex, N> for HostLoraLinear {
    type State = State;

    fn backward(self, ops: Ops<State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let gy = grads.consume::<Flex>(&ops.node);
        let mut want = [false; 3];
        for (w, p) in want.iter_mut().zip(&ops.parents) {
            *w = p.is_some();
        }
        let out = backward(ops.state, gy, want);
        for (parent, g) in ops.parents.iter().zip(out) {
            if let (Some(node), Some(g)) = (parent, g) {
                grads.register::<Flex>(node.id, g);
            }
        }
    }
}
