//! The causal-LM loss as transformers' `ForCausalLMLoss`: logits at position `t` predict the label at
//! `t + 1`; labels equal to -100 are ignored; the mean is over supervised tokens; computed in f32.
//!
//! Burn's `CrossEntropyLoss` with pad tokens divides by all rows, pad rows included, so it cannot
//! give HF's value; this is the masked version.

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor};

type Gradients<B> = <B as AutodiffBackend>::Gradients;

/// Label value that takes no part in the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Sum of token losses and the number of supervised tokens, for normalizing by the supervised
/// tokens of a whole optimizer step (gradient accumulation) rather than per micro-batch.
///
/// `logits` `[batch, seq, vocab]`, `labels` `[batch, seq]` (unshifted, as given to transformers).
pub fn causal_lm_loss_sum<B: Backend>(
    logits: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
) -> (Tensor<B, 1>, usize) {
    let [b, s, v] = logits.dims();
    if s < 2 {
        return (Tensor::zeros([1], &logits.device()), 0);
    }
    // Position t predicts label t+1: drop the last logit and the first label.
    let logits = logits.narrow(1, 0, s - 1).reshape([b * (s - 1), v]); // [n, vocab]
    let targets = labels.narrow(1, 1, s - 1).reshape([b * (s - 1)]); // [n]
    let keep = targets.clone().not_equal_elem(IGNORE_INDEX); // [n]
    let count: usize = keep
        .clone()
        .int()
        .sum()
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .map(|v| v[0] as usize)
        .unwrap_or(0);
    // Ignored rows gather class 0 and are then zeroed: never an out-of-range index.
    let safe = targets.mask_fill(keep.clone().bool_not(), 0);
    let logp = log_softmax(logits.cast(DType::F32), 1);
    let picked = logp
        .gather(1, safe.unsqueeze_dim::<2>(1))
        .reshape([b * (s - 1)]); // [n]
    let sum = picked.mask_fill(keep.bool_not(), 0.0).sum().neg();
    (sum, count)
}

/// Mean token loss over supervised tokens (HF's `loss` output); 0 when no token is supervised.
pub fn causal_lm_loss<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let (sum, count) = causal_lm_loss_sum(logits, labels);
    sum.div_scalar(count.max(1) as f64)
}

/// Rows of the output head evaluated per chunk by [`label_aware_loss_sum`]. On the inference path
/// only one chunk's `[rows, vocab]` logits exist at a time.
pub const HEAD_CHUNK_ROWS: usize = 1024;

/// Hidden states at the positions whose shifted label is supervised, and those labels:
/// `([n, hidden], [n])`, or `None` when no position is supervised. Position `t` predicts label `t + 1`.
fn supervised_rows<B: Backend>(
    hidden: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
) -> Option<(Tensor<B, 2>, Tensor<B, 1, Int>)> {
    let [b, s, h] = hidden.dims();
    if s < 2 {
        return None;
    }
    let hs = hidden.narrow(1, 0, s - 1).reshape([b * (s - 1), h]); // [n_all, hidden]
    let targets = labels.narrow(1, 1, s - 1).reshape([b * (s - 1)]); // [n_all]
    let rows = targets.clone().not_equal_elem(IGNORE_INDEX).argwhere(); // [n, 1]
    let n = rows.dims()[0];
    if n == 0 {
        return None;
    }
    let rows = rows.reshape([n]);
    Some((hs.select(0, rows.clone()), targets.select(0, rows)))
}

/// Summed token loss of one chunk: `head` logits of `hs` `[len, hidden]`, log-softmax in f32, the
/// negated log-probabilities of `targets` `[len]`.
fn chunk_loss_sum<B: Backend>(
    hs: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    head: &impl Fn(Tensor<B, 3>) -> Tensor<B, 3>,
) -> Tensor<B, 1> {
    let len = hs.dims()[0];
    let logits = head(hs.unsqueeze::<3>()); // [1, len, vocab]
    let v = logits.dims()[2];
    let logp = log_softmax(logits.reshape([len, v]).cast(DType::F32), 1);
    logp.gather(1, targets.unsqueeze_dim::<2>(1)).sum().neg()
}

/// [`causal_lm_loss_sum`]'s value computed from final hidden states, evaluating the output head only
/// at positions whose (shifted) label is supervised, `HEAD_CHUNK_ROWS` rows at a time.
///
/// With a 151,936-token vocabulary the full `[batch, seq, vocab]` logits dominate memory, and in
/// instruction data most positions are prompt (label -100): those never reach the head here.
/// `head` maps `[1, rows, hidden]` to `[1, rows, vocab]` (e.g. `Qwen2ForCausalLM::logits`).
/// Under autodiff every chunk's logits stay alive until `backward`; training uses
/// [`chunked_head_loss`] instead.
pub fn label_aware_loss_sum<B: Backend>(
    hidden: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
    head: impl Fn(Tensor<B, 3>) -> Tensor<B, 3>,
) -> Tensor<B, 1> {
    let device = hidden.device();
    let zero = || Tensor::<B, 1>::zeros([1], (&device, DType::F32));
    let Some((hs, targets)) = supervised_rows(hidden, labels) else {
        return zero();
    };
    let n = hs.dims()[0];
    let mut total = zero();
    let mut start = 0;
    while start < n {
        let len = HEAD_CHUNK_ROWS.min(n - start);
        let t = targets.clone().narrow(0, start, len);
        total = total + chunk_loss_sum(hs.clone().narrow(0, start, len), t, &head);
        start += len;
    }
    total
}

/// Rows of the output head scored per chunk by [`chunked_head_loss`]: with Qwen2.5's vocabulary one
/// chunk's f32 logits are 256 x 151,936 x 4 B = 156 MB, and only one chunk's exist at a time.
pub const TRAIN_HEAD_CHUNK_ROWS: usize = 256;

/// The head's part of a training step, chunk by chunk, so that full-vocabulary logits never pile up
/// under autodiff (the fused linear + cross-entropy of Liger and Unsloth, done with Burn's own
/// backward). For each chunk of supervised rows it scores the head from a detached copy of the hidden
/// states, runs that chunk's backward at once and keeps only the gradient with respect to its rows
/// (`[rows, hidden]`); `head_grads` receives each chunk's gradients (for a head with trainable
/// parameters of its own). Returns the loss value `sum / norm` and a surrogate `sum(hs · dhs)` whose
/// backward carries the head's gradient into the model body, or `None` when no position is
/// supervised. Gradients equal those of `label_aware_loss_sum(..) / norm` up to summation order.
///
/// `frozen_weight`: the head's weight `[vocab, hidden]` when the head is exactly `x·Wᵀ` with nothing
/// trainable in it (Qwen2's `lm_head` without an adapter, or the tied embedding). Each chunk's
/// gradient is then written down directly, `dhs = (softmax(logits) − onehot(target))·W / norm`, with
/// the loss `max − log(max softmax) − logit[target]` (`= logsumexp − logit[target]`, and the largest
/// probability never underflows), and no autodiff graph is built for the head at all.
pub fn chunked_head_loss<B: AutodiffBackend>(
    hidden: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
    norm: f64,
    frozen_weight: Option<Tensor<B::InnerBackend, 2>>,
    head: impl Fn(Tensor<B, 3>) -> Tensor<B, 3>,
    mut head_grads: impl FnMut(Gradients<B>),
) -> (f64, Option<Tensor<B, 1>>) {
    let Some((hs, targets)) = supervised_rows(hidden, labels) else {
        return (0.0, None);
    };
    let n = hs.dims()[0];
    let detached = hs.clone().detach();
    let chunks = n.div_ceil(TRAIN_HEAD_CHUNK_ROWS);
    // Per-chunk loss values stay on the device and are read once at the end (one sync, not one per
    // chunk): the written-out path keeps raw sums (divided by `norm` on the host), the autodiff path
    // sums already divided.
    let mut losses = Vec::with_capacity(chunks);
    let mut row_grads = Vec::with_capacity(chunks);
    let mut start = 0;
    while start < n {
        let len = TRAIN_HEAD_CHUNK_ROWS.min(n - start);
        if let Some(w) = &frozen_weight {
            let rows = detached.clone().inner().narrow(0, start, len);
            let t = targets.clone().inner().narrow(0, start, len);
            let (loss_sum, dhs) = linear_head_chunk(rows, t, w.clone(), norm);
            losses.push(loss_sum);
            row_grads.push(dhs);
        } else {
            let leaf = detached.clone().narrow(0, start, len).require_grad();
            let t = targets.clone().narrow(0, start, len);
            let loss = chunk_loss_sum(leaf.clone(), t, &head).div_scalar(norm);
            losses.push(loss.clone().inner());
            let mut grads = loss.backward();
            row_grads.push(
                leaf.grad_remove(&mut grads)
                    .expect("the head's logits depend on its input rows"),
            );
            head_grads(grads);
        }
        start += len;
    }
    let per_chunk = Tensor::cat(losses, 0)
        .into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .expect("f64 after convert");
    let value = per_chunk
        .iter()
        .map(|&v| if frozen_weight.is_some() { v / norm } else { v })
        .fold(0.0, |sum, v| sum + v);
    let dhs = Tensor::<B, 2>::from_inner(Tensor::cat(row_grads, 0));
    (value, Some((hs * dhs).sum()))
}

/// Loss sum `[1]` and `d(loss / norm)/d(rows)` of one chunk through the linear head `w`
/// `[vocab, hidden]`: softmax cross-entropy in f32, written out (see [`chunked_head_loss`]).
fn linear_head_chunk<B: Backend>(
    rows: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    w: Tensor<B, 2>,
    norm: f64,
) -> (Tensor<B, 1>, Tensor<B, 2>) {
    let len = rows.dims()[0];
    let dtype = rows.dtype();
    // On the CPU: one fused pass over the vocabulary, without the `[len, vocab]` logits.
    if let Some(result) = kernels::cpu::linear_cross_entropy(&rows, &targets, &w, norm) {
        return result;
    }
    let logits = rows.matmul(w.clone().transpose()).cast(DType::F32); // [len, vocab]
    let t = targets.unsqueeze_dim::<2>(1); // [len, 1]
    let picked = logits.clone().gather(1, t.clone());
    let max = logits.clone().max_dim(1);
    let p = softmax(logits, 1);
    let loss = (max - p.clone().max_dim(1).log() - picked).sum();
    let minus_one = Tensor::<B, 2>::full([len, 1], -1.0, (&p.device(), DType::F32));
    let dlogits = p.scatter(1, t, minus_one, IndexingUpdateOp::Add);
    let dhs = dlogits.cast(dtype).matmul(w).div_scalar(norm);
    (loss, dhs)
}
