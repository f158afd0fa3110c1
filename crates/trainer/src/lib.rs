//! `lora-trainer`: the training loop for LoRA fine-tuning (loss, optimizer step, checkpoints).

mod loss;

pub use loss::{causal_lm_loss, causal_lm_loss_sum, IGNORE_INDEX};
