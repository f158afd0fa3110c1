#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod args;
pub mod checkpoint;
mod clip;
mod error;
mod eval;
mod launch;
mod lm;
mod loraplus;
mod loss;
mod parallel;
mod plot;
pub mod recipe;
mod recompute;
mod train;

pub use args::{SchedulerType, TrainingArguments};
pub use checkpoint::{EvalEntry, LogEntry, TrainerState};
pub use clip::clip_global_norm;
pub use error::TrainError;
pub use eval::{evaluate, EvalResult};
pub use launch::ProcessGroup;
pub use lm::{plain_loss_and_grads, CausalLm, TrainableLm};
pub use loraplus::take_lora_b;
pub use loss::{
    causal_lm_loss, causal_lm_loss_sum, chunked_head_loss, label_aware_loss_sum, HEAD_CHUNK_ROWS,
    IGNORE_INDEX, TRAIN_HEAD_CHUNK_ROWS,
};
pub use plot::write_loss_svg;
pub use recompute::checkpointed_loss_and_grads;
pub use train::{train, train_data_parallel, TrainEvent, TrainOutcome};
