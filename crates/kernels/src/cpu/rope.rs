//! Rotary position embedding (rotate-half, as Qwen2) in the projections' layout
//! `[batch, seq, heads, head_dim]`, before the heads are moved forward, with its backward, which
//! needs only the tables. The same expressions in the same order as the Burn-ops form, so bit for
//! bit.

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

/// `x·cos + rotate_half(x)·sin` per head for `x` `[batch, seq, heads, head_dim]` and tables `cos`,
/// `sin` `[1 or batch, 1, seq, head_dim]`, or `None` when the operation does not apply.
pub fn rope<B: Backend>(
    x: &Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Option<Tensor<B, 4>> {
    if infers::<B>() {
        return from_inference(rope(&inference(x)?, &inference(cos)?, &inference(sin)?)?);
    }
    if !applies::<B>(&[x.dtype(), cos.dtype(), sin.dtype()]) {
        return None;
    }
    let [b, s, _, d] = x.dims();
    let [tb, _, ts, td] = cos.dims();
    if d % 2 != 0 || ts != s || td != d || !(tb == 1 || tb == b) || sin.dims() != cos.dims() {
        return None;
    }
    let ((_, cos), (_, sin)) = (host(cos), host(sin));
    let shape = x.shape();
    let (x, xp) = host(x);
    let y = rotate(
        slice(&xp),
        slice(&cos),
        slice(&sin),
        [b, s, d],
        tb > 1,
        false,
    );
    from_host(record(Rope, [&x], (cos, sin, tb > 1), flex(y, shape)))
}

/// Rows of `d` values at `[batch, seq, heads]`, rotated: forward `x·c + rotate_half(x)·s`, or
/// (`transpose`) its adjoint `g·c + rotate_halfᵀ(g·s)`, with `rotate_half(x) = (−x₂, x₁)` and
/// `rotate_halfᵀ(z) = (z₂, −z₁)`.
fn rotate(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    [b, s, d]: [usize; 3],
    per_batch: bool,
    transpose: bool,
) -> Vec<f32> {
    let half = d / 2;
    let mut y = vec![0f32; x.len()];
    let per_pos = x.len() / (b * s); // heads · d
    y.par_chunks_mut(per_pos)
        .zip(x.par_chunks(per_pos))
        .enumerate()
        .for_each(|(pos, (y, x))| {
            let (bi, si) = (pos / s, pos % s);
            let t = (if per_batch { bi * s } else { 0 } + si) * d;
            let (c, sn) = (&cos[t..t + d], &sin[t..t + d]);
            for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                for j in 0..half {
                    if transpose {
                        y[j] = x[j] * c[j] + x[j + half] * sn[j + half];
                        y[j + half] = x[j + half] * c[j + half] + -(x[j] * sn[j]);
                    } else {
                        y[j] = x[j] * c[j] + -x[j + half] * sn[j];
                        y[j + half] = x[j + half] * c[j + half] + x[j] * sn[j + half];
                    }
                }
            }
        });
    y
}

#[derive(Debug)]
struct Rope;

impl Backward<Flex, 1> for Rope {
    /// `(cos, sin, one table per batch row)`.
    type State = (FlexTensor, FlexTensor, bool);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let gy = contiguous(grads.consume::<Flex>(&ops.node));
        let (cos, sin, per_batch) = &ops.state;
        let shape = gy.layout().shape().clone();
        let [b, s, _, d] = shape.dims::<4>();
        let gx = rotate(
            slice(&gy),
            slice(cos),
            slice(sin),
            [b, s, d],
            *per_batch,
            true,
        );
        register(&ops, grads, [Some(flex(gx, shape))]);
    }
}
