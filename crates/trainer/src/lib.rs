//! `lora-trainer`: the LoRA fine-tuning loop (transformers `Trainer` semantics for a PEFT model):
//! masked causal-LM loss, gradient accumulation normalized by the step's supervised tokens, global
//! gradient clipping, AdamW with HF defaults, linear/cosine/constant schedules with warmup, logging,
//! atomic checkpoints and exact resume.

mod args;
pub mod checkpoint;
mod checkpointing;
mod clip;
mod error;
mod eval;
mod host_xent;
mod loss;
mod plot;
mod train;

pub use args::{SchedulerType, TrainingArguments};
pub use checkpoint::{EvalEntry, LogEntry, TrainerState};
pub use checkpointing::checkpointed_loss_and_grads;
pub use clip::clip_global_norm;
pub use error::TrainError;
pub use eval::{evaluate, EvalResult};
pub use host_xent::fused_linear_xent;
pub use loss::{
    causal_lm_loss, causal_lm_loss_sum, chunked_head_loss, label_aware_loss_sum, HEAD_CHUNK_ROWS,
    IGNORE_INDEX, TRAIN_HEAD_CHUNK_ROWS,
};
pub use plot::write_loss_svg;
pub use train::{plain_loss_and_grads, train, CausalLm, TrainEvent, TrainOutcome, TrainableLm};
