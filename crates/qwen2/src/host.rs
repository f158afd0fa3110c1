//! The model's fused operations with their own backward for training on the host CPU
//! (`Autodiff<Flex>`, f32), on all cores: SwiGLU, rotary embedding, RMSNorm and grouped-query
//! attention. Written with Burn ops each is several passes forward and backward, most of them on one
//! thread. The Burn-ops form stays the definition (and the path of every other backend and dtype).
//! SwiGLU and RoPE compute its expressions in the same order and agree with it bit for bit; RMSNorm
//! and attention sum in another order and agree to rounding (all tested).

use std::any::TypeId;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use burn_flex::FlexTensor;
use lora_core::host::{contiguous, from_host, slice, to_host};
use rayon::prelude::*;

type Ad = Autodiff<Flex>;

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

/// `silu(gate) · up` (SwiGLU), as `burn::tensor::activation::silu(gate) * up`.
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    if TypeId::of::<B>() != TypeId::of::<Ad>()
        || !lora_core::host_kernels_enabled()
        || gate.dtype() != DType::F32
        || up.dtype() != DType::F32
        || gate.dims() != up.dims()
    {
        return silu(gate) * up;
    }
    let shape = gate.shape();
    let prim = |t: Tensor<B, D>| to_host(t).expect("checked above");
    let (g, u) = (prim(gate), prim(up));
    let (gp, up_) = (
        contiguous(g.primitive.clone()),
        contiguous(u.primitive.clone()),
    );
    let mut h = vec![0f32; gp.layout().num_elements()];
    h.par_chunks_mut(CHUNK)
        .zip(
            slice(&gp)
                .par_chunks(CHUNK)
                .zip(slice(&up_).par_chunks(CHUNK)),
        )
        .for_each(|(h, (g, u))| {
            for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
                *h = g * sigmoid(g) * u;
            }
        });
    let h = FlexTensor::from_data(TensorData::new(h, shape));
    let out = match <SwiGlu as Backward<Flex, 2>>::prepare::<NoCheckpointing>(
        SwiGlu,
        [g.node.clone(), u.node.clone()],
    )
    .compute_bound()
    .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((gp, up_), h),
        OpsKind::UnTracked(prep) => prep.finish(h),
    };
    from_host(out).expect("checked above")
}

#[derive(Debug)]
struct SwiGlu;

impl Backward<Flex, 2> for SwiGlu {
    /// `(gate, up)`, contiguous.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let gh = contiguous(grads.consume::<Flex>(&ops.node));
        let (gate, up) = ops.state;
        let shape = gate.layout().shape().clone();
        let n = shape.num_elements();
        let mut gg = vec![0f32; n];
        let mut gu = vec![0f32; n];
        // The chain of the Burn ops: h = a·u, a = g·s, s = sigmoid(g).
        gg.par_chunks_mut(CHUNK)
            .zip(gu.par_chunks_mut(CHUNK))
            .zip(slice(&gh).par_chunks(CHUNK))
            .zip(
                slice(&gate)
                    .par_chunks(CHUNK)
                    .zip(slice(&up).par_chunks(CHUNK)),
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
        let mut out = [gg, gu].into_iter();
        for parent in &ops.parents {
            let g = out.next().expect("two gradients");
            if let Some(node) = parent {
                grads.register::<Flex>(
                    node.id,
                    FlexTensor::from_data(TensorData::new(g, shape.clone())),
                );
            }
        }
    }
}

/// Rotary embedding of `x` `[batch, seq, heads, head_dim]` with tables `cos`, `sin`
/// `[1 or batch, 1, seq, head_dim]`: `x·cos + rotate_half(x)·sin` per head, as
/// [`RopeCache::apply`](crate::RopeCache::apply) computes it in `[batch, heads, seq, head_dim]`
/// order; `None` off the host path. The backward needs only the tables.
pub(crate) fn rope_bshd<B: Backend>(
    x: &Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Option<Tensor<B, 4>> {
    if TypeId::of::<B>() != TypeId::of::<Ad>()
        || !lora_core::host_kernels_enabled()
        || [x.dtype(), cos.dtype(), sin.dtype()] != [DType::F32; 3]
    {
        return None;
    }
    let [b, s, _, d] = x.dims();
    let [tb, _, ts, td] = cos.dims();
    if d % 2 != 0 || ts != s || td != d || !(tb == 1 || tb == b) || sin.dims() != cos.dims() {
        return None;
    }
    let table = |t: &Tensor<B, 4>| contiguous(to_host(t.clone()).expect("checked above").primitive);
    let (cos, sin) = (table(cos), table(sin));
    let shape = x.shape();
    let x = to_host(x.clone()).expect("checked above");
    let xp = contiguous(x.primitive.clone());
    let y = rotate(
        slice(&xp),
        slice(&cos),
        slice(&sin),
        [b, s, d],
        tb > 1,
        false,
    );
    let y = FlexTensor::from_data(TensorData::new(y, shape));
    let out = match <Rope as Backward<Flex, 1>>::prepare::<NoCheckpointing>(Rope, [x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((cos, sin, tb > 1), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    from_host(out)
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
        let Some(node) = &ops.parents[0] else {
            return;
        };
        let (cos, sin, per_batch) = ops.state;
        let shape = gy.layout().shape().clone();
        let [b, s, _, d] = shape.dims::<4>();
        let gx = rotate(
            slice(&gy),
            slice(&cos),
            slice(&sin),
            [b, s, d],
            per_batch,
            true,
        );
        grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(gx, shape)));
    }
}

/// RMSNorm over the last dimension with a frozen weight, as [`Qwen2RmsNorm::forward`]
/// (crate::Qwen2RmsNorm::forward) computes it in f32: `(x · 1/√(mean(x²) + eps)) · w`. Each row's
/// sum of squares is accumulated in order, in f32, so a row's result does not depend on the rows
/// beside it; the backward is `gx = g·r − x·r³·(Σ g·x)/n` with `g = gy·w`. `None` off the host path
/// or when the weight takes a gradient.
pub(crate) fn rms_norm<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    weight: &Tensor<B, 1>,
    eps: f64,
) -> Option<Tensor<B, D>> {
    if TypeId::of::<B>() != TypeId::of::<Ad>()
        || !lora_core::host_kernels_enabled()
        || x.dtype() != DType::F32
        || weight.dtype() != DType::F32
        || weight.is_require_grad()
        || x.dims()[D - 1] != weight.dims()[0]
    {
        return None;
    }
    let w = contiguous(to_host(weight.clone())?.primitive);
    let shape = x.shape();
    let x = to_host(x.clone())?;
    let xp = contiguous(x.primitive.clone());
    let n = weight.dims()[0];
    let (xs, ws) = (slice(&xp), slice(&w));
    let rows = xs.len() / n;
    let mut y = vec![0f32; xs.len()];
    let mut r = vec![0f32; rows];
    const ROWS: usize = 8;
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
    let y = FlexTensor::from_data(TensorData::new(y, shape));
    let out =
        match <RmsNorm as Backward<Flex, 1>>::prepare::<NoCheckpointing>(RmsNorm, [x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((xp, w, r), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
    from_host(out)
}

#[derive(Debug)]
struct RmsNorm;

impl Backward<Flex, 1> for RmsNorm {
    /// `(x, weight, 1/rms per row)`.
    type State = (FlexTensor, FlexTensor, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let gy = contiguous(grads.consume::<Flex>(&ops.node));
        let Some(node) = &ops.parents[0] else {
            return;
        };
        let (x, w, r) = ops.state;
        let shape = x.layout().shape().clone();
        let (xs, ws, gys) = (slice(&x), slice(&w), slice(&gy));
        let n = ws.len();
        let mut gx = vec![0f32; xs.len()];
        const ROWS: usize = 8;
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
        grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(gx, shape)));
    }
}

/// One sequence of a batch for [`attention_bshd`]: its batch row, first position, length, and its
/// additive mask `[len, len]` (tensor `mask` of the list, from element `offset`).
#[derive(Clone, Debug)]
struct Segment {
    row: usize,
    start: usize,
    len: usize,
    mask: usize,
    offset: usize,
}

/// Grouped-query attention `softmax(q·kᵀ/√d + mask)·v` for `q` `[batch, seq, heads, head_dim]`,
/// `k`, `v` `[batch, seq, kv_heads, head_dim]`, out `[batch, seq, heads, head_dim]`, as
/// `Qwen2Attention` computes it with Burn ops after moving heads forward and repeating `k`, `v`.
/// Here no head is repeated or moved: each (sequence, key/value head) is one parallel task that
/// multiplies its query heads with `gemm` and keeps the probabilities for the backward, which
/// accumulates the key/value gradients of its query heads in place. `None` off the host path.
pub(crate) fn attention_bshd<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    bias: &crate::AttentionBias<B>,
) -> Option<Tensor<B, 4>> {
    use crate::AttentionBias;
    if TypeId::of::<B>() != TypeId::of::<Ad>()
        || !lora_core::host_kernels_enabled()
        || [q.dtype(), k.dtype(), v.dtype()] != [DType::F32; 3]
    {
        return None;
    }
    let [b, s, nh, d] = q.dims();
    let [_, _, nkv, _] = k.dims();
    if k.dims() != [b, s, nkv, d] || v.dims() != [b, s, nkv, d] || nkv == 0 || nh % nkv != 0 {
        return None;
    }
    let flex = |t: &Tensor<B, 4>| -> Option<FlexTensor> {
        Some(contiguous(to_host(t.clone())?.primitive))
    };
    let (masks, segments) = match bias {
        AttentionBias::Dense(mask) => {
            if mask.dims() != [b, 1, s, s] || mask.dtype() != DType::F32 {
                return None;
            }
            let segs = (0..b)
                .map(|row| Segment {
                    row,
                    start: 0,
                    len: s,
                    mask: 0,
                    offset: row * s * s,
                })
                .collect();
            (vec![flex(mask)?], segs)
        }
        AttentionBias::Packed(list) => {
            if b != 1 || list.iter().map(|m| m.dims()[3]).sum::<usize>() != s {
                return None;
            }
            let mut start = 0;
            let mut masks = Vec::with_capacity(list.len());
            let mut segs = Vec::with_capacity(list.len());
            for (i, m) in list.iter().enumerate() {
                let len = m.dims()[3];
                if m.dims() != [1, 1, len, len] || m.dtype() != DType::F32 {
                    return None;
                }
                masks.push(flex(m)?);
                segs.push(Segment {
                    row: 0,
                    start,
                    len,
                    mask: i,
                    offset: 0,
                });
                start += len;
            }
            (masks, segs)
        }
    };
    let prim = |t: &Tensor<B, 4>| to_host(t.clone()).expect("checked above");
    let (qa, ka, va) = (prim(q), prim(k), prim(v));
    let st = AttnState {
        q: contiguous(qa.primitive.clone()),
        k: contiguous(ka.primitive.clone()),
        v: contiguous(va.primitive.clone()),
        dims: [b, s, nh, nkv, d],
        segments,
        probs: Vec::new(),
    };
    let n_rep = nh / nkv;
    let scale = (1.0 / (d as f64).sqrt()) as f32; // as Burn's `mul_scalar` rounds it
    let tasks: Vec<(usize, usize)> = (0..st.segments.len())
        .flat_map(|seg| (0..nkv).map(move |g| (seg, g)))
        .collect();
    // Per task: the output of its query heads `[n_rep, len, d]` and their probabilities.
    let results: Vec<(Vec<f32>, Vec<f32>)> = tasks
        .par_iter()
        .map(|&(si, g)| {
            let seg = &st.segments[si];
            let len = seg.len;
            let mask = &slice(&masks[seg.mask])[seg.offset..seg.offset + len * len];
            let mut out = vec![0f32; n_rep * len * d];
            let mut probs = vec![0f32; n_rep * len * len];
            for r in 0..n_rep {
                let h = g * n_rep + r;
                let p = &mut probs[r * len * len..(r + 1) * len * len];
                // S = (Q_h · K_gᵀ)·scale
                // SAFETY: the operands are the segment's rows of one head, inside q and k.
                unsafe {
                    mm(
                        len,
                        len,
                        d,
                        p.as_mut_ptr(),
                        len,
                        false,
                        st.q_at(seg, h),
                        st.kv_at(&st.k, seg, g),
                        true,
                        scale,
                    );
                }
                for (row, m) in p.chunks_exact_mut(len).zip(mask.chunks_exact(len)) {
                    for (x, m) in row.iter_mut().zip(m) {
                        *x += m;
                    }
                    softmax_row(row);
                }
                // O_h = P · V_g
                // SAFETY: P is [len, len], V_g the segment's rows of one head.
                unsafe {
                    mm(
                        len,
                        d,
                        len,
                        out[r * len * d..].as_mut_ptr(),
                        d,
                        false,
                        (p.as_ptr(), len, 1),
                        st.kv_at(&st.v, seg, g),
                        false,
                        1.0,
                    );
                }
            }
            (out, probs)
        })
        .collect();
    let mut y = vec![0f32; b * s * nh * d];
    let mut st = st;
    for (&(si, g), (out, probs)) in tasks.iter().zip(results) {
        let seg = &st.segments[si];
        for r in 0..n_rep {
            let h = g * n_rep + r;
            for i in 0..seg.len {
                let dst = ((seg.row * s + seg.start + i) * nh + h) * d;
                y[dst..dst + d]
                    .copy_from_slice(&out[(r * seg.len + i) * d..(r * seg.len + i + 1) * d]);
            }
        }
        st.probs.push(probs);
    }
    let y = FlexTensor::from_data(TensorData::new(y, [b, s, nh, d]));
    let out = match <Attention as Backward<Flex, 3>>::prepare::<NoCheckpointing>(
        Attention,
        [qa.node.clone(), ka.node.clone(), va.node.clone()],
    )
    .compute_bound()
    .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(st, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    from_host(out)
}

/// A row-major operand for [`mm`]: `(pointer, row stride, column stride)`.
type Operand = (*const f32, usize, usize);

/// `dst` `[m, n]` (row stride `dst_rs`) `= (acc ? dst : 0) + beta · lhs·rhs`, on this thread.
///
/// # Safety
/// `dst`, `lhs` `[m, k]` and `rhs` `[k, n]` must lie inside live allocations with the strides given;
/// `transpose_rhs` reads `rhs` as the transpose of a `[n, k]` operand.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    acc: bool,
    lhs: Operand,
    rhs: Operand,
    transpose_rhs: bool,
    beta: f32,
) {
    let (rhs_rs, rhs_cs) = if transpose_rhs {
        (rhs.2, rhs.1)
    } else {
        (rhs.1, rhs.2)
    };
    // SAFETY: vouched for by the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            acc,
            lhs.0,
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0,
            rhs_cs as isize,
            rhs_rs as isize,
            1.0f32,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// In place: `exp(x − max) / Σ exp(x − max)`, as Burn's `softmax` (masked entries are `f32::MIN`
/// added to a score, so a fully masked row comes out uniform, as in transformers).
fn softmax_row(row: &mut [f32]) {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0f32;
    for x in row.iter_mut() {
        *x = (*x - m).exp();
        sum += *x;
    }
    for x in row.iter_mut() {
        *x /= sum;
    }
}

/// What the backward of [`attention_bshd`] keeps.
#[derive(Clone, Debug)]
struct AttnState {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    /// `[batch, seq, heads, kv_heads, head_dim]`.
    dims: [usize; 5],
    segments: Vec<Segment>,
    /// Per (segment, kv head) task, in order: `[n_rep, len, len]` probabilities.
    probs: Vec<Vec<f32>>,
}

impl AttnState {
    /// Query head `h` of the segment's rows: `[len, d]` with row stride `heads · d`.
    fn q_at(&self, seg: &Segment, h: usize) -> Operand {
        let [_, s, nh, _, d] = self.dims;
        let base = ((seg.row * s + seg.start) * nh + h) * d;
        (slice(&self.q)[base..].as_ptr(), nh * d, 1)
    }

    /// Key/value head `g` of the segment's rows in `t`: `[len, d]` with row stride `kv_heads · d`.
    fn kv_at(&self, t: &FlexTensor, seg: &Segment, g: usize) -> Operand {
        let [_, s, _, nkv, d] = self.dims;
        let base = ((seg.row * s + seg.start) * nkv + g) * d;
        (slice(t)[base..].as_ptr(), nkv * d, 1)
    }
}

#[derive(Debug)]
struct Attention;

impl Backward<Flex, 3> for Attention {
    type State = AttnState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let gy = contiguous(grads.consume::<Flex>(&ops.node));
        let st = ops.state;
        let [b, s, nh, nkv, d] = st.dims;
        let n_rep = nh / nkv;
        let scale = (1.0 / (d as f64).sqrt()) as f32; // as Burn's `mul_scalar` rounds it
        let tasks: Vec<(usize, usize)> = (0..st.segments.len())
            .flat_map(|seg| (0..nkv).map(move |g| (seg, g)))
            .collect();
        let gys = slice(&gy);
        // Per task: dQ of its query heads `[n_rep, len, d]`, dK and dV of its head `[len, d]`.
        let results: Vec<[Vec<f32>; 3]> = tasks
            .par_iter()
            .enumerate()
            .map(|(t, &(si, g))| {
                let seg = &st.segments[si];
                let len = seg.len;
                let probs = &st.probs[t];
                let mut dq = vec![0f32; n_rep * len * d];
                let mut dk = vec![0f32; len * d];
                let mut dv = vec![0f32; len * d];
                let mut ds = vec![0f32; len * len];
                for r in 0..n_rep {
                    let h = g * n_rep + r;
                    let p = &probs[r * len * len..(r + 1) * len * len];
                    let go: Operand = (
                        gys[((seg.row * s + seg.start) * nh + h) * d..].as_ptr(),
                        nh * d,
                        1,
                    );
                    // SAFETY (all products below): the operands are the segment's rows of one
                    // head inside q, k, v and the output gradient, and local [len, len] / [len, d]
                    // buffers.
                    unsafe {
                        // dP = dO_h · V_gᵀ
                        mm(
                            len,
                            len,
                            d,
                            ds.as_mut_ptr(),
                            len,
                            false,
                            go,
                            st.kv_at(&st.v, seg, g),
                            true,
                            1.0,
                        );
                        // dV_g += P_hᵀ · dO_h
                        mm(
                            len,
                            d,
                            len,
                            dv.as_mut_ptr(),
                            d,
                            true,
                            (p.as_ptr(), 1, len),
                            go,
                            false,
                            1.0,
                        );
                    }
                    // dS = P ⊙ (dP − Σ P⊙dP), scaled
                    for (dsr, pr) in ds.chunks_exact_mut(len).zip(p.chunks_exact(len)) {
                        let dot: f32 = dsr.iter().zip(pr).map(|(a, b)| a * b).sum();
                        for (x, &pv) in dsr.iter_mut().zip(pr) {
                            *x = pv * (*x - dot) * scale;
                        }
                    }
                    unsafe {
                        // dQ_h = dS · K_g
                        mm(
                            len,
                            d,
                            len,
                            dq[r * len * d..].as_mut_ptr(),
                            d,
                            false,
                            (ds.as_ptr(), len, 1),
                            st.kv_at(&st.k, seg, g),
                            false,
                            1.0,
                        );
                        // dK_g += dSᵀ · Q_h
                        mm(
                            len,
                            d,
                            len,
                            dk.as_mut_ptr(),
                            d,
                            true,
                            (ds.as_ptr(), 1, len),
                            st.q_at(seg, h),
                            false,
                            1.0,
                        );
                    }
                }
                [dq, dk, dv]
            })
            .collect();
        let mut gq = vec![0f32; b * s * nh * d];
        let mut gk = vec![0f32; b * s * nkv * d];
        let mut gv = vec![0f32; b * s * nkv * d];
        for (&(si, g), [dq, dk, dv]) in tasks.iter().zip(results) {
            let seg = &st.segments[si];
            for i in 0..seg.len {
                let pos = seg.row * s + seg.start + i;
                for r in 0..n_rep {
                    let dst = (pos * nh + g * n_rep + r) * d;
                    let src = (r * seg.len + i) * d;
                    gq[dst..dst + d].copy_from_slice(&dq[src..src + d]);
                }
                let dst = (pos * nkv + g) * d;
                gk[dst..dst + d].copy_from_slice(&dk[i * d..(i + 1) * d]);
                gv[dst..dst + d].copy_from_slice(&dv[i * d..(i + 1) * d]);
            }
        }
        for (parent, (g, heads)) in ops.parents.iter().zip([(gq, nh), (gk, nkv), (gv, nkv)]) {
            if let Some(node) = parent {
                grads.register::<Flex>(
                    node.id,
                    FlexTensor::from_data(TensorData::new(g, [b, s, heads, d])),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    fn bits(t: Tensor<Flex, 2>) -> Vec<u32> {
        t.into_data()
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    #[test]
    fn fused_swiglu_equals_burn_ops_bit_for_bit() {
        let device = Default::default();
        // More elements than one parallel task, and values of both signs and large magnitude.
        let dims = [3, 2 * CHUNK / 3 + 5];
        let dist = Distribution::Normal(0.0, 6.0);
        let g0 = Tensor::<Flex, 2>::random(dims, dist, &device);
        let u0 = Tensor::<Flex, 2>::random(dims, dist, &device);
        let up = Tensor::<Flex, 2>::random(dims, dist, &device);
        let run = |fused: bool| {
            let g = Tensor::<Ad, 2>::from_inner(g0.clone()).require_grad();
            let u = Tensor::<Ad, 2>::from_inner(u0.clone()).require_grad();
            let h = if fused {
                swiglu(g.clone(), u.clone())
            } else {
                silu(g.clone()) * u.clone()
            };
            let grads = (h.clone() * Tensor::from_inner(up.clone()))
                .sum()
                .backward();
            [h.inner(), g.grad(&grads).unwrap(), u.grad(&grads).unwrap()]
        };
        let (fused, reference) = (run(true), run(false));
        for (name, (f, r)) in ["h", "grad gate", "grad up"]
            .iter()
            .zip(fused.into_iter().zip(reference))
        {
            assert_eq!(bits(f), bits(r), "{name}");
        }
    }

    fn values(t: Tensor<Flex, 4>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    #[test]
    fn fused_rope_equals_burn_ops() {
        use crate::RopeCache;
        use burn::tensor::{Int, TensorData};
        let device = Default::default();
        let (b, s, h, d) = (2, 7, 3, 8);
        // Per-row positions (left padding in the first row), and one shared row of positions.
        let rows = TensorData::new(vec![0i64, 0, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [b, s]);
        let shared = TensorData::new((0..s as i64).collect::<Vec<_>>(), [1, s]);
        for pos in [rows, shared] {
            let pos = Tensor::<Ad, 2, Int>::from_data(pos, &device);
            let rope = RopeCache::new(pos, 10_000.0, d, DType::F32);
            let x0 =
                Tensor::<Flex, 4>::random([b, s, h, d], Distribution::Normal(0.0, 2.0), &device);
            let up =
                Tensor::<Flex, 4>::random([b, h, s, d], Distribution::Normal(0.0, 1.0), &device);
            let run = |fused: bool| {
                let x = Tensor::<Ad, 4>::from_inner(x0.clone()).require_grad();
                let y = if fused {
                    rope_bshd(&x, &rope.cos, &rope.sin)
                        .expect("the host path")
                        .swap_dims(1, 2)
                } else {
                    rope.apply(x.clone().swap_dims(1, 2))
                };
                let grads = (y.clone() * Tensor::from_inner(up.clone()))
                    .sum()
                    .backward();
                (values(y.inner()), values(x.grad(&grads).unwrap()))
            };
            let ((y, gx), (y_ref, gx_ref)) = (run(true), run(false));
            assert_eq!(y, y_ref, "rotated values");
            assert_eq!(gx, gx_ref, "gradient");
            assert!(y.iter().any(|v| v.abs() > 1.0));
        }
    }

    #[test]
    fn fused_rms_norm_matches_burn_ops() {
        use crate::Qwen2RmsNorm;
        use burn::module::Module;
        let device = Default::default();
        let (rows, n) = (19, 40);
        let norm = Qwen2RmsNorm::<Ad>::new(n, 1e-6, &device).no_grad();
        let w = Tensor::<Ad, 1>::random([n], Distribution::Normal(1.0, 0.5), &device);
        let norm = Qwen2RmsNorm {
            weight: norm.weight.map(|_| w.set_require_grad(false)),
            eps: norm.eps,
        };
        let x0 = Tensor::<Flex, 3>::random([1, rows, n], Distribution::Normal(0.0, 3.0), &device);
        let up = Tensor::<Flex, 3>::random([1, rows, n], Distribution::Normal(0.0, 1.0), &device);
        let run = |fused: bool| {
            let x = Tensor::<Ad, 3>::from_inner(x0.clone()).require_grad();
            let y = if fused {
                rms_norm(&x, &norm.weight.val(), norm.eps).expect("the host path")
            } else {
                norm.forward_reference(x.clone())
            };
            let grads = (y.clone() * Tensor::from_inner(up.clone()))
                .sum()
                .backward();
            let flat = |t: Tensor<Flex, 3>| t.into_data().to_vec::<f32>().unwrap();
            (flat(y.inner()), flat(x.grad(&grads).unwrap()))
        };
        let ((y, gx), (y_ref, gx_ref)) = (run(true), run(false));
        for (name, a, b) in [("y", &y, &y_ref), ("grad x", &gx, &gx_ref)] {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                scale > 0.1 && err <= 2e-6 * scale,
                "{name}: {err} of {scale}"
            );
        }
    }

    #[test]
    fn fused_attention_matches_burn_ops() {
        use crate::attention::attention_reference;
        use crate::{additive_mask, attention_mask_4d, AttentionBias};
        use burn::tensor::{Int, TensorData};
        let device = Default::default();
        let (nh, nkv, d) = (6, 2, 8);
        // Left padding (row 0's first two queries see no key at all: uniform attention, as in
        // transformers), and a packed row of three sequences.
        let pad = Tensor::<Ad, 2, Int>::from_data(
            TensorData::new(vec![0i64, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [2, 7]),
            &device,
        );
        let dense =
            AttentionBias::Dense(additive_mask(attention_mask_4d(Some(pad), 2, 7, &device)));
        let packed = AttentionBias::Packed(
            [3usize, 5, 6]
                .iter()
                .map(|&n| additive_mask(attention_mask_4d::<Ad>(None, 1, n, &device)))
                .collect(),
        );
        for (bias, b, s) in [(dense, 2, 7), (packed, 1, 14)] {
            let dist = Distribution::Normal(0.0, 1.5);
            let q0 = Tensor::<Flex, 4>::random([b, s, nh, d], dist, &device);
            let k0 = Tensor::<Flex, 4>::random([b, s, nkv, d], dist, &device);
            let v0 = Tensor::<Flex, 4>::random([b, s, nkv, d], dist, &device);
            let up = Tensor::<Flex, 4>::random([b, s, nh, d], dist, &device);
            let run = |fused: bool| {
                let leaf =
                    |t: &Tensor<Flex, 4>| Tensor::<Ad, 4>::from_inner(t.clone()).require_grad();
                let (q, k, v) = (leaf(&q0), leaf(&k0), leaf(&v0));
                let y = if fused {
                    attention_bshd(&q, &k, &v, &bias).expect("the host path")
                } else {
                    attention_reference(q.clone(), k.clone(), v.clone(), &bias)
                };
                let grads = (y.clone() * Tensor::from_inner(up.clone()))
                    .sum()
                    .backward();
                [
                    y.inner(),
                    q.grad(&grads).unwrap(),
                    k.grad(&grads).unwrap(),
                    v.grad(&grads).unwrap(),
                ]
                .map(values)
            };
            let (fused, reference) = (run(true), run(false));
            for (name, (a, r)) in ["out", "grad q", "grad k", "grad v"]
                .iter()
                .zip(fused.iter().zip(&reference))
            {
                let scale = r.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = a.iter().zip(r).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(
                    scale > 0.1 && err <= 2e-6 * scale,
                    "{name} (batch {b}): {err} of {scale}"
                );
            }
        }
    }
}
