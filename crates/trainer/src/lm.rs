//! The model side of training: what the loop needs of a model ([`CausalLm`], [`TrainableLm`]),
//! and Qwen2's implementation: the label-aware output head (the head's gradient written out, so the
//! `[rows, vocab]` logits never sit in the autodiff graph) and per-layer recompute
//! (`crate::recompute`) when gradient checkpointing is on.

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor};
use lora_core::LoraModel;
use lora_data::Batch;
use qwen2::Qwen2ForCausalLM;

use crate::loss::{chunked_head_loss, label_aware_loss_sum};
use crate::recompute::{checkpointed_loss_and_grads, embedded, layer_seed, seed_layer};

/// A causal language model that can score a batch (training and evaluation).
pub trait CausalLm<B: Backend> {
    /// Sum of token losses over the supervised positions of `batch` (labels shifted inside).
    fn loss_sum(&self, batch: &Batch<B>) -> Tensor<B, 1>;
}

/// A causal language model the trainer can fine-tune: scored on the autodiff backend, evaluated on
/// the inner one (`valid()`, no graph), with LoRA layers.
pub trait TrainableLm<B: AutodiffBackend>: CausalLm<B> + LoraModel<B> + AutodiffModule<B> {
    /// [`CausalLm::loss_sum`] of the inference-path copy of the model.
    fn inner_loss_sum(
        inner: &Self::InnerModule,
        batch: &Batch<B::InnerBackend>,
    ) -> Tensor<B::InnerBackend, 1>;

    /// `(value, adapter gradients)` of `loss_sum(batch) / norm`. With `checkpointing`, a model may
    /// recompute activations in backward instead of keeping them (same gradients, less memory);
    /// `seed` then seeds its dropout replay. The default keeps everything (one plain backward).
    fn loss_and_grads(
        &self,
        batch: &Batch<B>,
        norm: f64,
        checkpointing: bool,
        seed: u64,
    ) -> (f64, GradientsParams) {
        let _ = (checkpointing, seed);
        plain_loss_and_grads(self, batch, norm)
    }
}

/// One plain backward of `loss_sum(batch) / norm`: every activation kept.
pub fn plain_loss_and_grads<B: AutodiffBackend, M: TrainableLm<B>>(
    model: &M,
    batch: &Batch<B>,
    norm: f64,
) -> (f64, GradientsParams) {
    let loss = model.loss_sum(batch).div_scalar(norm);
    let value = loss.clone().into_scalar().elem::<f64>();
    (value, GradientsParams::from_grads(loss.backward(), model))
}

impl<B: AutodiffBackend> TrainableLm<B> for Qwen2ForCausalLM<B> {
    fn inner_loss_sum(
        inner: &Self::InnerModule,
        batch: &Batch<B::InnerBackend>,
    ) -> Tensor<B::InnerBackend, 1> {
        inner.loss_sum(batch)
    }

    fn loss_and_grads(
        &self,
        batch: &Batch<B>,
        norm: f64,
        checkpointing: bool,
        seed: u64,
    ) -> (f64, GradientsParams) {
        if checkpointing {
            checkpointed_loss_and_grads(self, batch, norm, seed)
        } else {
            head_chunked_loss_and_grads(self, batch, norm, seed)
        }
    }
}

/// Qwen2's output head as a plain frozen weight `[vocab, hidden]` (the tied embedding, or an
/// `lm_head` without adapter or bias whose weight takes no gradient), for the written-out head
/// gradient of [`chunked_head_loss`]; `None` when the head has anything trainable.
fn frozen_head_weight<B: AutodiffBackend>(
    model: &Qwen2ForCausalLM<B>,
) -> Option<Tensor<B::InnerBackend, 2>> {
    let weight = match &model.lm_head {
        // Trained token rows replace some of the tied head's rows.
        None if model.model.embed_tokens.token_adapter.is_some() => return None,
        None => &model.model.embed_tokens.weight,
        Some(head) if head.bias.is_none() && (!head.has_adapter() || head.merged) => &head.weight,
        Some(_) => return None,
    };
    (!weight.is_require_grad()).then(|| weight.val().inner())
}

/// Qwen2's head part of a step from its final hidden states: [`chunked_head_loss`] with the
/// frozen-weight shortcut where it applies. Gradients of the head's own trainable parameters (an
/// adapter on `lm_head`) go into `acc`; returns the loss value and the surrogate for the body.
pub(crate) fn qwen2_head_loss<B: AutodiffBackend>(
    model: &Qwen2ForCausalLM<B>,
    hidden: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
    norm: f64,
    acc: &mut GradientsAccumulator<Qwen2ForCausalLM<B>>,
) -> (f64, Option<Tensor<B, 1>>) {
    chunked_head_loss(
        hidden,
        labels,
        norm,
        frozen_head_weight(model),
        |h| model.logits(h),
        |g| acc.accumulate(model, GradientsParams::from_grads(g, model)),
    )
}

/// One backward of `loss_sum(batch) / norm` with the output head scored and differentiated chunk by
/// chunk ([`chunked_head_loss`]): the same gradients as [`plain_loss_and_grads`] (up to summation
/// order) without the full-vocabulary logits of every supervised position alive at once. Each
/// layer's dropout is seeded as the checkpointed path seeds it ([`layer_seed`]), so turning
/// gradient checkpointing on or off changes nothing but memory.
fn head_chunked_loss_and_grads<B: AutodiffBackend>(
    model: &Qwen2ForCausalLM<B>,
    batch: &Batch<B>,
    norm: f64,
    seed: u64,
) -> (f64, GradientsParams) {
    let device = batch.input_ids.device();
    let (mut x, rope, bias) = embedded(model, batch);
    for (i, layer) in model.model.layers.iter().enumerate() {
        seed_layer::<B>(&device, layer_seed(seed, i));
        x = layer.forward(x, &rope, &bias, None);
    }
    let hidden = model.model.norm.forward(x);
    let mut acc = GradientsAccumulator::<Qwen2ForCausalLM<B>>::new();
    let (value, surrogate) = qwen2_head_loss(model, hidden, batch.labels.clone(), norm, &mut acc);
    if let Some(surrogate) = surrogate {
        acc.accumulate(
            model,
            GradientsParams::from_grads(surrogate.backward(), model),
        );
    }
    (value, acc.grads())
}

/// Final hidden states of `batch`: padded rows, or the one row of a padding-free batch.
fn batch_hidden<B: Backend>(model: &Qwen2ForCausalLM<B>, batch: &Batch<B>) -> Tensor<B, 3> {
    match &batch.seq_lens {
        Some(lens) => model.forward_hidden_packed(batch.input_ids.clone(), lens),
        None => model.forward_hidden(
            batch.input_ids.clone(),
            Some(batch.attention_mask.clone()),
            None,
        ),
    }
}

impl<B: Backend> CausalLm<B> for Qwen2ForCausalLM<B> {
    fn loss_sum(&self, batch: &Batch<B>) -> Tensor<B, 1> {
        let hidden = batch_hidden(self, batch);
        label_aware_loss_sum(hidden, batch.labels.clone(), |h| self.logits(h))
    }
}
