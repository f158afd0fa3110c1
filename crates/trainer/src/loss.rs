//! The causal-LM loss as transformers' `ForCausalLMLoss`: logits at position `t` predict the label at
//! `t + 1`; labels equal to -100 are ignored; the mean is over supervised tokens; computed in f32.
//!
//! Burn's `CrossEntropyLoss` with pad tokens divides by all rows, pad rows included, so it cannot
//! give HF's value; this is the masked version.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor};

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

/// [`causal_lm_loss_sum`]'s value computed from final hidden states, evaluating the output head only
/// at positions whose (shifted) label is supervised, `HEAD_CHUNK_ROWS` rows at a time.
///
/// With a 151,936-token vocabulary the full `[batch, seq, vocab]` logits dominate memory, and in
/// instruction data most positions are prompt (label -100): those never reach the head here.
/// `head` maps `[1, rows, hidden]` to `[1, rows, vocab]` (e.g. `Qwen2ForCausalLM::logits`).
pub fn label_aware_loss_sum<B: Backend>(
    hidden: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
    head: impl Fn(Tensor<B, 3>) -> Tensor<B, 3>,
) -> Tensor<B, 1> {
    let [b, s, h] = hidden.dims();
    let device = hidden.device();
    let zero = || Tensor::<B, 1>::zeros([1], (&device, DType::F32));
    if s < 2 {
        return zero();
    }
    // Position t predicts label t+1.
    let hs = hidden.narrow(1, 0, s - 1).reshape([b * (s - 1), h]); // [n_all, hidden]
    let targets = labels.narrow(1, 1, s - 1).reshape([b * (s - 1)]); // [n_all]
    let rows = targets.clone().not_equal_elem(IGNORE_INDEX).argwhere(); // [n, 1]
    let n = rows.dims()[0];
    if n == 0 {
        return zero();
    }
    let rows = rows.reshape([n]);
    let hs = hs.select(0, rows.clone()); // [n, hidden]
    let targets = targets.select(0, rows); // [n]
    let mut total = zero();
    let mut start = 0;
    while start < n {
        let len = HEAD_CHUNK_ROWS.min(n - start);
        let logits = head(hs.clone().narrow(0, start, len).unsqueeze::<3>()); // [1, len, vocab]
        let v = logits.dims()[2];
        let logp = log_softmax(logits.reshape([len, v]).cast(DType::F32), 1);
        let t = targets.clone().narrow(0, start, len).unsqueeze_dim::<2>(1); // [len, 1]
        total = total + logp.gather(1, t).sum().neg();
        start += len;
    }
    total
}
