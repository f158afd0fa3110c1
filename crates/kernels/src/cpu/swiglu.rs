//! SwiGLU, `silu(gate) · up`, as `burn::tensor::activation::silu(gate) * up` computes it (the same
//! expressions in the same order, so bit for bit), with its backward.

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

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// Flex's sigmoid, so that the fused form equals Burn's `sigmoid` bit for bit.
#[inline]
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `silu(gate) · up`, or `None` when the operation does not apply.
pub fn swiglu<B: Backend, const D: usize>(
    gate: &Tensor<B, D>,
    up: &Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    if infers::<B>() {
        return from_inference(swiglu(&inference(gate)?, &inference(up)?)?);
    }
    if !applies::<B>(&[gate.dtype(), up.dtype()]) || gate.dims() != up.dims() {
        return None;
    }
    let shape = gate.shape();
    let ((g, gp), (u, up)) = (host(gate), host(up));
    let mut h = vec![0f32; gp.layout().num_elements()];
    h.par_chunks_mut(CHUNK)
        .zip(
            slice(&gp)
                .par_chunks(CHUNK)
                .zip(slice(&up).par_chunks(CHUNK)),
        )
        .for_each(|(h, (g, u))| {
            for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
                *h = g * sigmoid(g) * u;
            }
        });
    from_host(record(SwiGlu, [&g, &u], (gp, up), flex(h, shape)))
}

#[derive(Debug)]
struct SwiGlu;

impl Backward<Flex, 2> for SwiGlu {
    /// `(gate, up)`, contiguous.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let gh = contiguous(grads.consume::<Flex>(&ops.node));
        let (gate, up) = &ops.state;
        let shape = gate.layout().shape().clone();
        let n = shape.num_elements();
        let mut gg = vec![0f32; n];
        let mut gu = vec![0f32; n];
        // The chain of the Burn ops: h = a·u, a = g·s, s = sigmoid(g).
        gg.par_chunks_mut(CHUNK)
            .zip(gu.par_chunks_mut(CHUNK))
            .zip(slice(&gh).par_chunks(CHUNK))
            .zip(
                slice(gate)
                    .par_chunks(CHUNK)
                    .zip(slice(up).par_chunks(CHUNK)),
            )
            .for_each(|(((gg, gu), gh), (g, u))| {
                for i in 0..gg.len() {
                    let (d, g, u) = (gh[i], g[i], u[i]);
                    let s = sigmoid(g);
                    let da = d * u;
                    gg[i] = da * s + da * g * s * (1.0 - s);
                    gu[i] = d * (g * s);
                }
            });
        let out = [Some(flex(gg, shape.clone())), Some(flex(gu, shape))];
        register(&ops, grads, out);
    }
}
