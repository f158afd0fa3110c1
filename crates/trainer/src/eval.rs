//! Evaluation: the mean causal-LM loss over every supervised token of a dataset (transformers'
//! definition: total token loss / supervised tokens, not a mean of batch means), on the inference path.

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};
use lora_data::{Batch, Collator, Example};
use serde::{Deserialize, Serialize};

/// What `cargo xtask eval` prints.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// Mean token loss.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Examples scored.
    pub records: usize,
    /// Tokens whose (shifted) label is supervised.
    pub supervised_tokens: usize,
}

/// Scores `examples` in batches of `batch_size` with `loss_sum` (summed token loss of a batch).
pub fn evaluate<B: Backend>(
    loss_sum: impl Fn(&Batch<B>) -> Tensor<B, 1>,
    examples: &[Example],
    collator: &Collator,
    batch_size: usize,
    device: &B::Device,
) -> EvalResult {
    let (mut sum, mut n) = (0.0f64, 0usize);
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        sum += loss_sum(&collator.collate::<B>(&refs, device))
            .into_scalar()
            .elem::<f64>();
        n += chunk.iter().map(crate::train::supervised).sum::<usize>();
    }
    let loss = sum / n.max(1) as f64;
    EvalResult {
        loss,
        perplexity: loss.exp(),
        records: examples.len(),
        supervised_tokens: n,
    }
}
