//! `TrainingArguments`: the options of the loop, with transformers' names and defaults.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::TrainError;

/// Learning-rate schedule (`lr_scheduler_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerType {
    /// Linear warmup, then linear decay to 0 at the last step (HF default).
    #[default]
    Linear,
    /// Linear warmup, then half a cosine to 0.
    Cosine,
    /// Linear warmup, then constant.
    Constant,
}

/// Options of the training loop. Field names and defaults are transformers' `TrainingArguments`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainingArguments {
    /// Where checkpoints, metrics and the final adapter go.
    pub output_dir: PathBuf,
    /// Examples per micro-batch.
    pub per_device_train_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Epochs over the training set (ignored when `max_steps` is set).
    pub num_train_epochs: f64,
    /// Total optimizer steps; overrides `num_train_epochs` when set.
    pub max_steps: Option<usize>,
    /// Learning-rate schedule.
    pub lr_scheduler_type: SchedulerType,
    /// Warmup steps (wins over `warmup_ratio` when non-zero).
    pub warmup_steps: usize,
    /// Warmup as a fraction of the total steps.
    pub warmup_ratio: f64,
    /// Decoupled weight decay (AdamW).
    pub weight_decay: f64,
    /// AdamW β1.
    pub adam_beta1: f64,
    /// AdamW β2.
    pub adam_beta2: f64,
    /// AdamW ε.
    pub adam_epsilon: f64,
    /// Global gradient-norm clip (over all adapter gradients together); 0 disables.
    pub max_grad_norm: f64,
    /// LoRA+: every `lora_B` learns at this multiple of the learning rate, the rest at the
    /// learning rate itself (PEFT's `create_loraplus_optimizer` groups; LLaMA-Factory's
    /// `loraplus_lr_ratio`). `None`: one learning rate.
    pub loraplus_lr_ratio: Option<f64>,
    /// Log every this many optimizer steps.
    pub logging_steps: usize,
    /// Save a checkpoint every this many optimizer steps (0: only the final adapter).
    pub save_steps: usize,
    /// Keep at most this many checkpoints (oldest pruned).
    pub save_total_limit: Option<usize>,
    /// Evaluate every this many steps (and always at the end) when eval data is given.
    pub eval_steps: Option<usize>,
    /// Seed of the sampler and of dropout.
    pub seed: u64,
    /// Shuffle the training set each epoch.
    pub shuffle: bool,
    /// Recompute each decoder layer's activations in backward instead of keeping them (less memory,
    /// about one more forward of compute).
    pub gradient_checkpointing: bool,
    /// A checkpoint directory to continue from, or `latest` (the newest complete one in `output_dir`).
    pub resume_from_checkpoint: Option<String>,
    /// Start a new run in an `output_dir` that holds another run's checkpoints or log, removing
    /// them (its `checkpoint-*` directories, `metrics.jsonl` and `loss.svg`); without it such a
    /// directory is refused, so two runs never mix.
    pub overwrite_output_dir: bool,
    /// Data-parallel workers (threads of this process, each with its own copy of the model, the
    /// gradients summed with Burn's collective engine): torch's `WORLD_SIZE` under DDP. A step
    /// consumes `world_size × gradient_accumulation_steps` micro-batches of
    /// `per_device_train_batch_size` examples; see `lora_trainer::train_data_parallel`. 1: one
    /// worker, the plain loop.
    pub world_size: usize,
    /// Seconds a multi-process run waits for a rank (to join, to reach the next collective
    /// operation, to be heard from) before it stops with an error naming the rank: transformers'
    /// `ddp_timeout` (default 1800).
    pub ddp_timeout: u64,
    /// This process's place in a multi-process run (`torchrun`'s environment, see
    /// [`crate::ProcessGroup::from_env`]); `None`: every worker is a thread of this process.
    /// Its `world_size` must equal `world_size` above. Not saved with the arguments.
    #[serde(skip)]
    pub process_group: Option<crate::ProcessGroup>,
}

impl Default for TrainingArguments {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from("output"),
            per_device_train_batch_size: 8,
            gradient_accumulation_steps: 1,
            learning_rate: 5e-5,
            num_train_epochs: 3.0,
            max_steps: None,
            lr_scheduler_type: SchedulerType::Linear,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            loraplus_lr_ratio: None,
            logging_steps: 500,
            save_steps: 500,
            save_total_limit: None,
            eval_steps: None,
            seed: 42,
            shuffle: true,
            gradient_checkpointing: false,
            resume_from_checkpoint: None,
            overwrite_output_dir: false,
            world_size: 1,
            ddp_timeout: 1800,
            process_group: None,
        }
    }
}

impl TrainingArguments {
    /// The tutorial's recipe: batch 4 × accumulation 4, lr 1e-4, 3 epochs, log 10, save 100.
    pub fn tutorial(output_dir: PathBuf) -> Self {
        Self {
            output_dir,
            per_device_train_batch_size: 4,
            gradient_accumulation_steps: 4,
            learning_rate: 1e-4,
            num_train_epochs: 3.0,
            logging_steps: 10,
            save_steps: 100,
            gradient_checkpointing: true,
            ..Self::default()
        }
    }

    /// Rejects impossible values, naming the option.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |option: &str, reason: String| {
            Err(TrainError::BadOption {
                option: option.into(),
                reason,
            })
        };
        if self.per_device_train_batch_size == 0 {
            return bad(
                "per_device_train_batch_size",
                "is 0; it must be at least 1".into(),
            );
        }
        if self.gradient_accumulation_steps == 0 {
            return bad(
                "gradient_accumulation_steps",
                "is 0; it must be at least 1".into(),
            );
        }
        if let Some(g) = &self.process_group {
            if g.world_size != self.world_size {
                return bad(
                    "world_size",
                    format!(
                        "is {} but the process group (WORLD_SIZE) has {} ranks; they must agree",
                        self.world_size, g.world_size
                    ),
                );
            }
        }
        if self.ddp_timeout == 0 {
            return bad(
                "ddp_timeout",
                "is 0; give the seconds to wait for a rank (transformers' default is 1800)".into(),
            );
        }
        if self.world_size == 0 {
            return bad(
                "world_size",
                "is 0; it must be at least 1 (the number of data-parallel workers)".into(),
            );
        }
        // Every float: finite and in its range, named on its own (a NaN fails every comparison,
        // so each range is written as what must hold).
        let floats = [
            (
                "learning_rate",
                self.learning_rate,
                "> 0",
                self.learning_rate > 0.0,
            ),
            (
                "num_train_epochs",
                self.num_train_epochs,
                ">= 0",
                self.num_train_epochs >= 0.0,
            ),
            (
                "warmup_ratio",
                self.warmup_ratio,
                "in [0, 1]",
                (0.0..=1.0).contains(&self.warmup_ratio),
            ),
            (
                "weight_decay",
                self.weight_decay,
                ">= 0",
                self.weight_decay >= 0.0,
            ),
            (
                "adam_beta1",
                self.adam_beta1,
                "in [0, 1)",
                (0.0..1.0).contains(&self.adam_beta1),
            ),
            (
                "adam_beta2",
                self.adam_beta2,
                "in [0, 1)",
                (0.0..1.0).contains(&self.adam_beta2),
            ),
            (
                "adam_epsilon",
                self.adam_epsilon,
                "> 0",
                self.adam_epsilon > 0.0,
            ),
            (
                "max_grad_norm",
                self.max_grad_norm,
                ">= 0 (0 disables clipping)",
                self.max_grad_norm >= 0.0,
            ),
        ];
        if let Some(r) = self.loraplus_lr_ratio {
            if !(r.is_finite() && r > 0.0) {
                return bad(
                    "loraplus_lr_ratio",
                    format!("is {r}; it must be a finite number > 0 (PEFT suggests 16)"),
                );
            }
        }
        for (option, value, range, ok) in floats {
            if !(value.is_finite() && ok) {
                return bad(
                    option,
                    format!("is {value}; it must be a finite number {range}"),
                );
            }
        }
        if self.max_steps == Some(0) || (self.max_steps.is_none() && self.num_train_epochs == 0.0) {
            return bad(
                "num_train_epochs / max_steps",
                "leave no step to train".into(),
            );
        }
        if self.save_total_limit == Some(0) {
            return bad(
                "save_total_limit",
                "is 0; use at least 1, or leave it unset to keep all".into(),
            );
        }
        Ok(())
    }

    /// Optimizer steps for `batches_per_epoch` micro-batches per epoch. The last step of an epoch
    /// takes what is left (fewer micro-batches), as transformers does.
    /// With `world_size` workers a step takes `world_size × gradient_accumulation_steps` of them.
    pub fn total_steps(&self, batches_per_epoch: usize) -> usize {
        if let Some(m) = self.max_steps {
            return m;
        }
        let per_epoch = batches_per_epoch
            .div_ceil(self.micro_batches_per_step())
            .max(1);
        (self.num_train_epochs * per_epoch as f64).ceil() as usize
    }

    /// Micro-batches one optimizer step consumes over all workers.
    pub fn micro_batches_per_step(&self) -> usize {
        self.gradient_accumulation_steps * self.world_size.max(1)
    }

    /// Warmup steps: `warmup_steps` if set, else `ceil(warmup_ratio · total)`.
    pub fn warmup(&self, total: usize) -> usize {
        if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            (self.warmup_ratio * total as f64).ceil() as usize
        }
    }

    /// The learning rate for (0-based) optimizer step `step` of `total`, as transformers' schedulers.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let warmup = self.warmup(total);
        let base = self.learning_rate;
        if step < warmup {
            return base * step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        match self.lr_scheduler_type {
            SchedulerType::Constant => base,
            SchedulerType::Linear => base * (1.0 - progress).max(0.0),
            SchedulerType::Cosine => {
                base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each float option, set to NaN, infinity or a value out of its range, is refused by name.
    #[test]
    fn every_float_is_checked_and_named() {
        type Set = fn(&mut TrainingArguments, f64);
        let options: [(&str, Set, f64); 9] = [
            ("learning_rate", |a, v| a.learning_rate = v, 0.0),
            ("num_train_epochs", |a, v| a.num_train_epochs = v, -1.0),
            ("warmup_ratio", |a, v| a.warmup_ratio = v, 1.5),
            ("weight_decay", |a, v| a.weight_decay = v, -0.1),
            ("adam_beta1", |a, v| a.adam_beta1 = v, 1.0),
            ("adam_beta2", |a, v| a.adam_beta2 = v, -0.5),
            ("adam_epsilon", |a, v| a.adam_epsilon = v, 0.0),
            ("max_grad_norm", |a, v| a.max_grad_norm = v, -1.0),
            (
                "loraplus_lr_ratio",
                |a, v| a.loraplus_lr_ratio = Some(v),
                0.0,
            ),
        ];
        let ok = TrainingArguments::tutorial(PathBuf::from("out"));
        ok.validate().unwrap();
        for (name, set, out_of_range) in options {
            for value in [f64::NAN, f64::INFINITY, out_of_range] {
                let mut a = ok.clone();
                set(&mut a, value);
                match a.validate() {
                    Err(TrainError::BadOption { option, .. }) => assert_eq!(option, name),
                    other => panic!("{name} = {value}: {other:?}"),
                }
            }
        }
    }
}
