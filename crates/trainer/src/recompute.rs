//! Per-layer activation checkpointing for Qwen2, as transformers' `gradient_checkpointing_enable()`:
//! the forward keeps only each decoder layer's *input*; backward recomputes one layer at a time and
//! back-propagates through it alone. Peak activation memory drops from all layers' intermediates to
//! one layer's plus the layer inputs, at the cost of a second forward of every layer.
//!
//! Burn's own `BalancedCheckpointing` recomputes only cheap element-wise ops, so this is done by
//! hand: the forward runs each layer under autodiff and immediately detaches its output (the graph of
//! that layer is freed); the backward re-runs layer `i` from its saved input with a fresh leaf,
//! seeds it with the gradient arriving from layer `i + 1` through the surrogate `sum(out · g)`, and
//! collects the adapter gradients of that layer. Dropout masks are replayed exactly by reseeding the
//! RNG with the same per-layer seed in both passes.

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;
use lora_data::Batch;
use qwen2::{AttentionBias, Qwen2ForCausalLM, RopeCache};

use crate::lm::qwen2_head_loss;

/// Seed of layer `layer`'s dropout within a micro-batch. Both training paths reseed the backend
/// with it before each layer (this one twice, in its forward and its recompute), so their dropout
/// masks, and with them their losses and gradients, are the same bit for bit.
pub(crate) fn layer_seed(base: u64, layer: usize) -> u64 {
    let mut z = base ^ ((layer as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F));
    z = (z ^ (z >> 32)).wrapping_mul(0xE703_7ED1_A0B4_28DB);
    z ^ (z >> 29)
}

/// Seeds layer dropout with `seed`: the backend's generator (device-side masks) and this thread's
/// dropout keys (host-CPU masks, [`lora_core::seed_dropout_keys`]), so that worker threads sharing
/// one backend draw the masks of their own micro-batches.
pub(crate) fn seed_layer<B: burn::tensor::backend::Backend>(device: &B::Device, seed: u64) {
    B::seed(device, seed);
    lora_core::seed_dropout_keys(seed);
}

/// `(loss value, adapter gradients)` of `loss_sum(batch) / norm`, with per-layer recomputation.
/// Equal to a plain `backward` of the same loss (tested), with less memory.
pub fn checkpointed_loss_and_grads<B: AutodiffBackend>(
    model: &Qwen2ForCausalLM<B>,
    batch: &Batch<B>,
    norm: f64,
    seed: u64,
) -> (f64, GradientsParams) {
    let device = batch.input_ids.device();
    let (embeddings, rope, mask) = embedded(model, batch);
    // A trainable embedding (`modules_to_save`): its graph waits for the first layer's gradient.
    let mut x = embeddings.clone().detach();

    // Forward: keep only the layer inputs.
    let mut inputs = Vec::with_capacity(model.model.layers.len());
    for (i, layer) in model.model.layers.iter().enumerate() {
        inputs.push(x.clone());
        seed_layer::<B>(&device, layer_seed(seed, i));
        x = layer.forward(x, &rope, &mask, None).detach();
    }

    // Head: norm, logits, loss, with a graph from the last layer's output.
    let last = x.require_grad();
    let hidden = model.model.norm.forward(last.clone());
    let mut acc = GradientsAccumulator::<Qwen2ForCausalLM<B>>::new();
    let (value, surrogate) = qwen2_head_loss(model, hidden, batch.labels.clone(), norm, &mut acc);
    let Some(surrogate) = surrogate else {
        return (value, GradientsParams::new()); // no supervised position: no gradient
    };
    let mut head_grads = surrogate.backward();
    let mut g = last
        .grad_remove(&mut head_grads)
        .expect("the head depends on the last layer");
    acc.accumulate(model, GradientsParams::from_grads(head_grads, model));

    // Backward, one layer at a time, last to first.
    for (i, layer) in model.model.layers.iter().enumerate().rev() {
        let input = inputs.pop().expect("one input per layer").require_grad();
        seed_layer::<B>(&device, layer_seed(seed, i));
        let out = layer.forward(input.clone(), &rope, &mask, None);
        let surrogate = (out * Tensor::<B, 3>::from_inner(g)).sum();
        let mut grads = surrogate.backward();
        g = input
            .grad_remove(&mut grads)
            .expect("a layer's output depends on its input");
        acc.accumulate(model, GradientsParams::from_grads(grads, model));
    }
    if embedding_trains(model) {
        let surrogate = (embeddings * Tensor::<B, 3>::from_inner(g)).sum();
        acc.accumulate(
            model,
            GradientsParams::from_grads(surrogate.backward(), model),
        );
    }
    (value, acc.grads())
}

/// Whether the embedding takes a gradient: the table (`modules_to_save = ["embed_tokens"]`) or
/// trained rows of it (`trainable_token_indices`).
pub(crate) fn embedding_trains<B: AutodiffBackend>(model: &Qwen2ForCausalLM<B>) -> bool {
    let e = &model.model.embed_tokens;
    e.weight.is_require_grad() || e.token_adapter.is_some()
}

/// What both training paths start from: the batch's embeddings (no graph unless the table trains),
/// with the rotary tables and attention bias of its padded rows or packed sequences.
pub(crate) fn embedded<B: AutodiffBackend>(
    model: &Qwen2ForCausalLM<B>,
    batch: &Batch<B>,
) -> (Tensor<B, 3>, RopeCache<B>, AttentionBias<B>) {
    let device = batch.input_ids.device();
    let [b, s] = batch.input_ids.dims();
    let x = model.model.embed_tokens.forward(batch.input_ids.clone());
    let x = if embedding_trains(model) {
        x
    } else {
        x.detach()
    };
    let (rope, bias) = match &batch.seq_lens {
        Some(lens) => model.packed_inputs(lens, x.dtype(), &device),
        None => model.padded_inputs(
            [b, s],
            Some(batch.attention_mask.clone()),
            None,
            x.dtype(),
            &device,
        ),
    };
    (x, rope, bias)
}
