//! Grouped-query attention `softmax(q·kᵀ/√d + mask)·v` as one operation with its own backward.
//! No head is repeated or moved: each (sequence, key/value head) is one parallel task that
//! multiplies its query heads with `gemm` on strided views of `[batch, seq, heads, head_dim]`, and
//! keeps the probabilities for the backward, which accumulates the key/value gradients of its
//! query heads in place. The Burn-ops form sums in another order: the two agree to rounding.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::gemm::{matmul, Mat, MatMut, Threads};
use super::{
    applies, contiguous, flex, from_host, from_inference, host, inference, infers, record,
    register, slice,
};

/// Which keys each query sees, as additive f32 masks (`0` where visible, `f32::MIN` where hidden).
#[derive(Clone, Copy, Debug)]
pub enum AttentionMask<'a, B: Backend> {
    /// `[batch, 1, seq, seq]` for a batch of rows.
    Dense(&'a Tensor<B, 4>),
    /// One row holding several sequences back to back: per sequence, in order, its mask
    /// `[1, 1, len, len]`; the lengths add up to the row's length.
    Packed(&'a [Tensor<B, 4>]),
}

/// One sequence of a batch: its batch row, first position, length, and its mask `[len, len]`
/// (tensor `mask` of the list, from element `offset`).
#[derive(Clone, Debug)]
struct Segment {
    row: usize,
    start: usize,
    len: usize,
    mask: usize,
    offset: usize,
}

/// Attention of `q` `[batch, seq, heads, head_dim]` over `k`, `v` `[batch, seq, kv_heads,
/// head_dim]` (each key/value head serving `heads / kv_heads` consecutive query heads), out
/// `[batch, seq, heads, head_dim]`; `None` when the operation does not apply.
pub fn attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    mask: AttentionMask<'_, B>,
) -> Option<Tensor<B, 4>> {
    if infers::<B>() {
        let (dense, packed);
        let mask = match mask {
            AttentionMask::Dense(m) => {
                dense = inference(m)?;
                AttentionMask::Dense(&dense)
            }
            AttentionMask::Packed(list) => {
                packed = list.iter().map(inference).collect::<Option<Vec<_>>>()?;
                AttentionMask::Packed(&packed)
            }
        };
        return from_inference(attention(
            &inference(q)?,
            &inference(k)?,
            &inference(v)?,
            mask,
        )?);
    }
    if !applies::<B>(&[q.dtype(), k.dtype(), v.dtype()]) {
        return None;
    }
    let [b, s, nh, d] = q.dims();
    let [_, _, nkv, _] = k.dims();
    if k.dims() != [b, s, nkv, d] || v.dims() != [b, s, nkv, d] || nkv == 0 || nh % nkv != 0 {
        return None;
    }
    let (masks, segments) = match mask {
        AttentionMask::Dense(mask) => {
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
            (vec![host(mask).1], segs)
        }
        AttentionMask::Packed(list) => {
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
                masks.push(host(m).1);
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
    let ((qa, qc), (ka, kc), (va, vc)) = (host(q), host(k), host(v));
    let mut st = State {
        q: qc,
        k: kc,
        v: vc,
        dims: [b, s, nh, nkv, d],
        segments,
        probs: Vec::new(),
    };
    let n_rep = nh / nkv;
    let scale = scale(d);
    let tasks = st.tasks();
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
                let (qh, kg) = (st.q_at(seg, h), st.kv_at(&st.k, seg, g));
                matmul(
                    MatMut::new(p, len, len),
                    false,
                    qh,
                    kg.t(),
                    scale,
                    Threads::One,
                );
                for (row, m) in p.chunks_exact_mut(len).zip(mask.chunks_exact(len)) {
                    for (x, m) in row.iter_mut().zip(m) {
                        *x += m;
                    }
                    softmax_row(row);
                }
                // O_h = P · V_g
                let o = MatMut::new(&mut out[r * len * d..(r + 1) * len * d], len, d);
                let p = Mat::new(p, len, len);
                matmul(o, false, p, st.kv_at(&st.v, seg, g), 1.0, Threads::One);
            }
            (out, probs)
        })
        .collect();
    let mut y = vec![0f32; b * s * nh * d];
    for (&(si, g), (out, probs)) in tasks.iter().zip(results) {
        let seg = &st.segments[si];
        for r in 0..n_rep {
            let h = g * n_rep + r;
            for i in 0..seg.len {
                let dst = ((seg.row * s + seg.start + i) * nh + h) * d;
                let src = (r * seg.len + i) * d;
                y[dst..dst + d].copy_from_slice(&out[src..src + d]);
            }
        }
        st.probs.push(probs);
    }
    let out = record(Attention, [&qa, &ka, &va], st, flex(y, [b, s, nh, d]));
    from_host(out)
}

/// `1/√d`, rounded from f64 as Burn's `mul_scalar` rounds it.
fn scale(d: usize) -> f32 {
    (1.0 / (d as f64).sqrt()) as f32
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

/// What the forward computes from and the backward keeps.
#[derive(Clone, Debug)]
struct State {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    /// `[batch, seq, heads, kv_heads, head_dim]`.
    dims: [usize; 5],
    segments: Vec<Segment>,
    /// Per (segment, kv head) task, in order: `[n_rep, len, len]` probabilities.
    probs: Vec<Vec<f32>>,
}

impl State {
    /// The parallel tasks: (segment, key/value head), in order.
    fn tasks(&self) -> Vec<(usize, usize)> {
        let nkv = self.dims[3];
        (0..self.segments.len())
            .flat_map(|seg| (0..nkv).map(move |g| (seg, g)))
            .collect()
    }

    /// Rows of head `h` of the segment in `t` `[batch, seq, heads, d]`: `[len, d]`.
    fn head<'a>(&self, t: &'a [f32], heads: usize, seg: &Segment, h: usize) -> Mat<'a> {
        let [_, s, _, _, d] = self.dims;
        let base = ((seg.row * s + seg.start) * heads + h) * d;
        Mat::strided(&t[base..], seg.len, d, heads * d, 1)
    }

    /// Query head `h` of the segment's rows.
    fn q_at(&self, seg: &Segment, h: usize) -> Mat<'_> {
        self.head(slice(&self.q), self.dims[2], seg, h)
    }

    /// Key/value head `g` of the segment's rows in `t` (`self.k` or `self.v`).
    fn kv_at<'a>(&self, t: &'a FlexTensor, seg: &Segment, g: usize) -> Mat<'a> {
        self.head(slice(t), self.dims[3], seg, g)
    }
}

#[derive(Debug)]
struct Attention;

impl Backward<Flex, 3> for Attention {
    type State = State;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let gy = contiguous(grads.consume::<Flex>(&ops.node));
        let st = &ops.state;
        let [b, s, nh, nkv, d] = st.dims;
        let n_rep = nh / nkv;
        let scale = scale(d);
        let tasks = st.tasks();
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
                let (kg, vg) = (st.kv_at(&st.k, seg, g), st.kv_at(&st.v, seg, g));
                for r in 0..n_rep {
                    let h = g * n_rep + r;
                    let p = Mat::new(&probs[r * len * len..(r + 1) * len * len], len, len);
                    let go = st.head(gys, nh, seg, h);
                    // dP = dO_h · V_gᵀ
                    matmul(
                        MatMut::new(&mut ds, len, len),
                        false,
                        go,
                        vg.t(),
                        1.0,
                        Threads::One,
                    );
                    // dV_g += P_hᵀ · dO_h
                    matmul(
                        MatMut::new(&mut dv, len, d),
                        true,
                        p.t(),
                        go,
                        1.0,
                        Threads::One,
                    );
                    // dS = P ⊙ (dP − Σ P⊙dP), scaled
                    let pr = &probs[r * len * len..(r + 1) * len * len];
                    for (dsr, pr) in ds.chunks_exact_mut(len).zip(pr.chunks_exact(len)) {
                        let dot: f32 = dsr.iter().zip(pr).map(|(a, b)| a * b).sum();
                        for (x, &pv) in dsr.iter_mut().zip(pr) {
                            *x = pv * (*x - dot) * scale;
                        }
                    }
                    let dsm = Mat::new(&ds, len, len);
                    // dQ_h = dS · K_g
                    let dqh = MatMut::new(&mut dq[r * len * d..(r + 1) * len * d], len, d);
                    matmul(dqh, false, dsm, kg, 1.0, Threads::One);
                    // dK_g += dSᵀ · Q_h
                    let qh = st.q_at(seg, h);
                    matmul(
                        MatMut::new(&mut dk, len, d),
                        true,
                        dsm.t(),
                        qh,
                        1.0,
                        Threads::One,
                    );
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
        let out = [
            Some(flex(gq, [b, s, nh, d])),
            Some(flex(gk, [b, s, nkv, d])),
            Some(flex(gv, [b, s, nkv, d])),
        ];
        register(&ops, grads, out);
    }
}
