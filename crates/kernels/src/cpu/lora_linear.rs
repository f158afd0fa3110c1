//! The LoRA linear layer `y = x·Wᵀ (+ b) + (s·(dropout(x)·Aᵀ))·Bᵀ` as one operation, the GEMMs
//! called directly on all cores and writing straight into the output. The backward is written out:
//!
//! * `gu = gy·B` (`[rows, r]`), `gB = gyᵀ·u` with `u = s·(xd·Aᵀ)` saved from the forward;
//! * `ga = s·gu`, `gA = gaᵀ·xd`;
//! * `gx = gy·W + (ga·A) ⊙ mask`, where the dropout mask is drawn again from its saved key.
//!
//! The operations and their order are those of `lora_core::LoraLinear::forward_reference`, so the
//! two agree bit for bit. The frozen base weight and bias get no gradient: a base that takes one
//! is not taken (`None`).
//!
//! A base in bitsandbytes' 4-bit form ([`lora_linear_4bit`]) is dequantized for the forward and
//! again for the backward: the operation keeps only the packed weight between the two, as
//! bitsandbytes' `MatMul4Bit` does, so a training step never holds a layer's full-precision weight
//! longer than one product.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::dropout::keep_mask;
use super::gemm::{matmul, product, Mat, MatMut, Threads};
use super::{applies, flex, from_host, host, record, register, slice, wanted, HostTensor};
use crate::quant::Quantized;

/// The adapter of a LoRA linear: `A` `[r, in]`, `B` `[out, r]`, the scaling `s`, and the dropout
/// of its input as `(key, keep probability)` (`None`: no dropout).
#[derive(Clone, Debug)]
pub struct Adapter<B: Backend> {
    /// `lora_A` `[r, in]`.
    pub a: Tensor<B, 2>,
    /// `lora_B` `[out, r]`.
    pub b: Tensor<B, 2>,
    /// `lora_alpha / r` (or its rsLoRA form).
    pub scaling: f64,
    /// The dropout mask's key ([`keep_mask`]) and keep probability.
    pub dropout: Option<(u64, f64)>,
}

/// Whether [`lora_linear`] takes an input of `dtype` through these operands: all f32 on
/// `Autodiff<Flex>` (see [`super::applies`]), with a frozen base weight and bias.
pub fn lora_linear_applies<B: Backend>(
    dtype: DType,
    weight: &Tensor<B, 2>,
    bias: Option<&Tensor<B, 1>>,
    adapter: Option<(&Tensor<B, 2>, &Tensor<B, 2>)>,
) -> bool {
    let mut dtypes = vec![dtype, weight.dtype()];
    dtypes.extend(bias.map(|b| b.dtype()));
    if let Some((a, b)) = adapter {
        dtypes.extend([a.dtype(), b.dtype()]);
    }
    applies::<B>(&dtypes) && !weight.is_require_grad() && !bias.is_some_and(|b| b.is_require_grad())
}

/// `x` `[rows, in]` through the layer with frozen `weight` `[out, in]` and `bias` `[out]`, or
/// `None` when the operation does not apply ([`lora_linear_applies`]).
pub fn lora_linear<B: Backend>(
    x: &Tensor<B, 2>,
    weight: &Tensor<B, 2>,
    bias: Option<&Tensor<B, 1>>,
    adapter: Option<&Adapter<B>>,
) -> Option<Tensor<B, 2>> {
    if !lora_linear_applies(x.dtype(), weight, bias, adapter.map(|ad| (&ad.a, &ad.b))) {
        return None;
    }
    let (_, w) = host(weight);
    let shape = w.layout().shape().dims::<2>();
    run(x, shape, Weight::Dense(w), bias, adapter)
}

/// [`lora_linear`] with the base weight `[out, in]` = `shape` in bitsandbytes' 4-bit form, computed
/// in f32: `None` unless `B` is `Autodiff<Flex>` with every other operand f32 and a frozen bias.
pub fn lora_linear_4bit<B: Backend>(
    x: &Tensor<B, 2>,
    weight: &Arc<Quantized>,
    shape: [usize; 2],
    bias: Option<&Tensor<B, 1>>,
    adapter: Option<&Adapter<B>>,
) -> Option<Tensor<B, 2>> {
    let mut dtypes = vec![x.dtype()];
    dtypes.extend(bias.map(|b| b.dtype()));
    if let Some(ad) = adapter {
        dtypes.extend([ad.a.dtype(), ad.b.dtype()]);
    }
    if !applies::<B>(&dtypes)
        || bias.is_some_and(|b| b.is_require_grad())
        || weight.len != shape[0] * shape[1]
    {
        return None;
    }
    run(x, shape, Weight::Packed(Arc::clone(weight)), bias, adapter)
}

/// The forward of both forms, the base weight `w` being `[out, in]` = `shape`.
fn run<B: Backend>(
    x: &Tensor<B, 2>,
    [out_f, in_f]: [usize; 2],
    w: Weight,
    bias: Option<&Tensor<B, 1>>,
    adapter: Option<&Adapter<B>>,
) -> Option<Tensor<B, 2>> {
    let (x, xs): (HostTensor, FlexTensor) = host(x);
    let rows = xs.layout().shape().dims::<2>()[0];

    // y = x·Wᵀ (a 4-bit weight dequantized for this product only)
    let mut y = w.with_values(|values| {
        product(
            Mat::new(slice(&xs), rows, in_f),
            Mat::new(values, out_f, in_f).t(),
            Threads::Auto,
        )
    });
    // + b
    if let Some(b) = bias {
        let (_, b) = host(b);
        let bs = slice(&b);
        y.par_chunks_mut(out_f).for_each(|row| {
            for (v, b) in row.iter_mut().zip(bs) {
                *v += b;
            }
        });
    }

    let Some(ad) = adapter else {
        let state = State {
            w,
            shape: [out_f, in_f],
            adapter: None,
            dropout: None,
            scaling: 0.0,
        };
        let out = record(LoraLinear, [&x], state, flex(y, [rows, out_f]));
        return from_host(out);
    };
    let ((a, ap), (b, bp)) = (host(&ad.a), host(&ad.b));
    let r = ap.layout().shape().dims::<2>()[0];
    let scaling = ad.scaling as f32;
    // xd = dropout(x)
    let xd = match ad.dropout {
        Some((key, keep)) => {
            let mut xd = keep_mask(key, rows * in_f, keep);
            xd.par_chunks_mut(1 << 14)
                .zip(slice(&xs).par_chunks(1 << 14))
                .for_each(|(m, x)| m.iter_mut().zip(x).for_each(|(m, x)| *m *= x));
            flex(xd, [rows, in_f])
        }
        None => xs.clone(),
    };
    // u = s·(xd·Aᵀ)
    let mut u = vec![0f32; rows * r];
    matmul(
        MatMut::new(&mut u, rows, r),
        false,
        Mat::new(slice(&xd), rows, in_f),
        Mat::new(slice(&ap), r, in_f).t(),
        scaling,
        Threads::Auto,
    );
    // y += u·Bᵀ
    matmul(
        MatMut::new(&mut y, rows, out_f),
        true,
        Mat::new(&u, rows, r),
        Mat::new(slice(&bp), out_f, r).t(),
        1.0,
        Threads::Auto,
    );
    let state = State {
        w,
        shape: [out_f, in_f],
        adapter: Some([xd, flex(u, [rows, r]), ap, bp]),
        dropout: ad.dropout,
        scaling,
    };
    // The parents: x, A and B (the frozen base takes no gradient).
    let out = record(LoraLinear, [&x, &a, &b], state, flex(y, [rows, out_f]));
    from_host::<B, 2>(out)
}

/// The base weight as the backward gets it.
#[derive(Clone, Debug)]
enum Weight {
    Dense(FlexTensor),
    /// Dequantized again in the backward.
    Packed(Arc<Quantized>),
}

impl Weight {
    /// `f` of the weight's f32 values (dequantized for the call when packed).
    fn with_values<T>(&self, f: impl FnOnce(&[f32]) -> T) -> T {
        match self {
            Weight::Dense(w) => f(slice(w)),
            Weight::Packed(q) => f(&q.dequantize()),
        }
    }
}

/// What the backward needs.
#[derive(Clone, Debug)]
struct State {
    /// Base weight `[out, in]`.
    w: Weight,
    /// `[out, in]`.
    shape: [usize; 2],
    /// With an adapter: `xd = dropout(x)` `[rows, in]`, `u = s·(xd·Aᵀ)` `[rows, r]`, `A`, `B`.
    adapter: Option<[FlexTensor; 4]>,
    /// Dropout key and keep probability.
    dropout: Option<(u64, f64)>,
    scaling: f32,
}

#[derive(Debug)]
struct LoraLinear;

impl<const N: usize> Backward<Flex, N> for LoraLinear {
    type State = State;

    fn backward(self, ops: Ops<State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let gy = super::contiguous(grads.consume::<Flex>(&ops.node));
        let want = wanted(&ops);
        let mut out = backward(
            &ops.state,
            &gy,
            [0, 1, 2].map(|i| want.get(i) == Some(&true)),
        )
        .into_iter();
        register(&ops, grads, std::array::from_fn(|_| out.next().flatten()));
    }
}

/// Gradients `(gx, gA, gB)`, each computed only when `want` asks for it.
fn backward(state: &State, gy: &FlexTensor, want: [bool; 3]) -> [Option<FlexTensor>; 3] {
    let [out_f, in_f] = state.shape;
    let rows = gy.layout().shape().dims::<2>()[0];
    let gy = Mat::new(slice(gy), rows, out_f);
    let mut gx = want[0].then(|| {
        state
            .w
            .with_values(|w| product(gy, Mat::new(w, out_f, in_f), Threads::Auto))
    });
    let (mut ga_out, mut gb_out) = (None, None);
    if let Some([xd, u, a, b]) = &state.adapter {
        let r = a.layout().shape().dims::<2>()[0];
        if want[2] {
            let gb = product(gy.t(), Mat::new(slice(u), rows, r), Threads::Auto);
            gb_out = Some(flex(gb, [out_f, r]));
        }
        if want[0] || want[1] {
            // ga = s·(gy·B)
            let mut ga = product(gy, Mat::new(slice(b), out_f, r), Threads::Auto);
            ga.iter_mut().for_each(|v| *v *= state.scaling);
            let ga_m = Mat::new(&ga, rows, r);
            if want[1] {
                let g = product(ga_m.t(), Mat::new(slice(xd), rows, in_f), Threads::Auto);
                ga_out = Some(flex(g, [r, in_f]));
            }
            if let Some(gx) = gx.as_mut() {
                let gxd = product(ga_m, Mat::new(slice(a), r, in_f), Threads::Auto);
                match state.dropout {
                    Some((key, keep)) => add_mul(gx, &gxd, &keep_mask(key, rows * in_f, keep)),
                    None => gx.par_iter_mut().zip(&gxd).for_each(|(g, d)| *g += d),
                }
            }
        }
    }
    [gx.map(|g| flex(g, [rows, in_f])), ga_out, gb_out]
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
