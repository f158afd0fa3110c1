//! RMSNorm over the last dimension with a frozen weight, `(x · 1/√(mean(x²) + eps)) · w` in f32,
//! with its backward `gx = g·r − x·r³·(Σ g·x)/n`, `g = gy·w`. Each row's sum of squares is
//! accumulated in order, so a row's result does not depend on the rows beside it; the Burn-ops
//! form sums in another order, so the two agree to rounding.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::{
    applies, contiguous, flex, from_host, from_inference, host, inference, infers, record,
    register, slice,
};

/// Rows per parallel task.
const ROWS: usize = 8;

/// RMSNorm of `x` with `weight` `[x's last dimension]`, or `None` when the operation does not
/// apply (also when the weight takes a gradient).
pub fn rms_norm<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    weight: &Tensor<B, 1>,
    eps: f64,
) -> Option<Tensor<B, D>> {
    if infers::<B>() {
        return from_inference(rms_norm(&inference(x)?, &inference(weight)?, eps)?);
    }
    if !applies::<B>(&[x.dtype(), weight.dtype()])
        || weight.is_require_grad()
        || x.dims()[D - 1] != weight.dims()[0]
    {
        return None;
    }
    let (_, w) = host(weight);
    let shape = x.shape();
    let (x, xp) = host(x);
    let n = weight.dims()[0];
    let (xs, ws) = (slice(&xp), slice(&w));
    let rows = xs.len() / n;
    let mut y = vec![0f32; xs.len()];
    let mut r = vec![0f32; rows];
    y.par_chunks_mut(ROWS * n)
        .zip(r.par_chunks_mut(ROWS))
        .zip(xs.par_chunks(ROWS * n))
        .for_each(|((y, r), x)| {
            for ((y, r), x) in y
                .chunks_exact_mut(n)
                .zip(r.iter_mut())
                .zip(x.chunks_exact(n))
            {
                let ss: f32 = x.iter().map(|v| v * v).sum();
                *r = 1.0 / ((ss / n as f32) + eps as f32).sqrt();
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(ws) {
                    *y = (x * *r) * w;
                }
            }
        });
    from_host(record(RmsNorm, [&x], (xp, w, r), flex(y, shape)))
}

#[derive(Debug)]
struct RmsNorm;

impl Backward<Flex, 1> for RmsNorm {
    /// `(x, weight, 1/rms per row)`.
    type State = (FlexTensor, FlexTensor, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let gy = contiguous(grads.consume::<Flex>(&ops.node));
        let (x, w, r) = &ops.state;
        let shape = x.layout().shape().clone();
        let (xs, ws, gys) = (slice(x), slice(w), slice(&gy));
        let n = ws.len();
        let mut gx = vec![0f32; xs.len()];
        gx.par_chunks_mut(ROWS * n)
            .zip(r.par_chunks(ROWS))
            .zip(xs.par_chunks(ROWS * n).zip(gys.par_chunks(ROWS * n)))
            .for_each(|((gx, r), (x, gy))| {
                for (((gx, &r), x), gy) in gx
                    .chunks_exact_mut(n)
                    .zip(r)
                    .zip(x.chunks_exact(n))
                    .zip(gy.chunks_exact(n))
                {
                    let dot: f32 = gy.iter().zip(ws).zip(x).map(|((g, w), x)| g * w * x).sum();
                    let c = r * r * r * dot / n as f32;
                    for (((gx, &g), &w), &x) in gx.iter_mut().zip(gy).zip(ws).zip(x) {
                        *gx = g * w * r - x * c;
                    }
                }
            });
        register(&ops, grads, [Some(flex(gx, shape))]);
    }
}
