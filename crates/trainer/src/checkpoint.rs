//! Checkpoints as transformers' Trainer lays them out: `output_dir/checkpoint-{step}/` with the PEFT
//! adapter files, the optimizer state and `trainer_state.json` (step, sampler position, log).
//!
//! A checkpoint is written under a temporary name (every file fsynced) and renamed when complete, so
//! a crash or a full disk never leaves a directory that `latest` would pick but cannot resume from;
//! a failed write removes the temporary directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use burn::optim::Optimizer;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use lora_core::{save_adapter, LoraConfig};
use lora_data::SamplerState;

use crate::error::TrainError;
use crate::lm::TrainableLm;

/// One logged line (also a line of `metrics.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Optimizer step (1-based).
    pub step: usize,
    /// Fractional epoch at this step.
    pub epoch: f64,
    /// Mean token loss over the steps since the previous log line.
    pub loss: f64,
    /// Global gradient norm before clipping, at this step.
    pub grad_norm: f64,
    /// Learning rate used at this step.
    pub learning_rate: f64,
    /// Tokens (padding included) per second of the training steps since the previous log line
    /// (evaluation and checkpoint time excluded).
    pub tokens_per_s: f64,
}

/// One evaluation (also a line of `metrics.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalEntry {
    /// Optimizer step (1-based).
    pub step: usize,
    /// Fractional epoch.
    pub epoch: f64,
    /// Mean token loss over the eval set.
    pub eval_loss: f64,
    /// `exp(eval_loss)`.
    pub eval_perplexity: f64,
}

/// `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub global_step: usize,
    /// Steps the run was planned for.
    pub max_steps: usize,
    /// Fractional epoch.
    pub epoch: f64,
    /// Where the sampler stands (resume continues mid-epoch from here).
    pub sampler: SamplerState,
    /// The run's seed (dropout is reseeded from it at every step).
    pub seed: u64,
    /// Every step's mean token loss, in order.
    pub step_losses: Vec<f64>,
    /// The logged lines.
    pub log_history: Vec<LogEntry>,
    /// The evaluations.
    #[serde(default)]
    pub eval_history: Vec<EvalEntry>,
    /// What the run trained on ([`data_fingerprint`]); absent in checkpoints of older versions.
    #[serde(default)]
    pub data_fingerprint: Option<String>,
    /// Examples per micro-batch (transformers' `train_batch_size`); absent in older checkpoints.
    #[serde(default)]
    pub train_batch_size: Option<usize>,
    /// Micro-batches per optimizer step; absent in older checkpoints.
    #[serde(default)]
    pub gradient_accumulation_steps: Option<usize>,
    /// Data-parallel workers; absent for one worker (and in older checkpoints, all of one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<usize>,
}

/// A fingerprint of the training examples (their token ids and labels, in order): a resumed run
/// must train on the same data as the run that wrote the checkpoint.
pub fn data_fingerprint(examples: &[lora_data::Example]) -> String {
    // FNV-1a over the little-endian bytes of every id and label, each example closed by its length.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |v: i64| {
        for b in v.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for e in examples {
        e.input_ids.iter().for_each(|&t| eat(i64::from(t)));
        e.labels.iter().for_each(|&l| eat(l));
        eat(e.input_ids.len() as i64);
    }
    format!("{:016x}-{}", h, examples.len())
}

/// The files and directories of a previous run in `dir`: `checkpoint-*`, `metrics.jsonl`,
/// `loss.svg`, in name order.
pub fn previous_run(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("checkpoint-") || name == "metrics.jsonl" || name == "loss.svg"
        })
        .collect();
    found.sort();
    found
}

/// File names inside a checkpoint.
pub const STATE_FILE: &str = "trainer_state.json";
/// Optimizer state (Burn binary recorder; the `.bin` extension is the recorder's).
pub const OPTIMIZER_FILE: &str = "optimizer";

/// `checkpoint-{step}` directories of `output_dir` that are complete, oldest first.
pub fn checkpoints(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(output_dir) else {
        return Vec::new();
    };
    let mut v: Vec<(usize, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            let p = e.path();
            p.join(STATE_FILE).is_file().then_some((step, p))
        })
        .collect();
    v.sort();
    v
}

/// The newest complete checkpoint of `output_dir` for a message, or a note that there is none.
pub fn last_checkpoint(output_dir: &Path) -> String {
    checkpoints(output_dir)
        .pop()
        .map(|(_, p)| p.display().to_string())
        .unwrap_or_else(|| "none (no checkpoint was written yet)".into())
}

/// Resolves `--resume-from-checkpoint`: `latest` or a directory.
pub fn resolve_resume(arg: &str, output_dir: &Path) -> Result<PathBuf, TrainError> {
    if arg == "latest" {
        return checkpoints(output_dir)
            .pop()
            .map(|(_, p)| p)
            .ok_or_else(|| TrainError::BadCheckpoint {
                path: output_dir.to_path_buf(),
                reason: "no complete checkpoint-* directory in it".into(),
            });
    }
    let p = PathBuf::from(arg);
    if !p.join(STATE_FILE).is_file() {
        return Err(TrainError::BadCheckpoint {
            path: p,
            reason: format!("no {STATE_FILE}: not a complete checkpoint directory"),
        });
    }
    Ok(p)
}

/// Reads `trainer_state.json`.
pub fn read_state(dir: &Path) -> Result<TrainerState, TrainError> {
    let p = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&p).map_err(|e| TrainError::io(&p, e))?;
    serde_json::from_str(&text).map_err(|e| TrainError::BadCheckpoint {
        path: dir.to_path_buf(),
        reason: format!("{STATE_FILE}: {e}"),
    })
}

/// Writes `trainer_state.json` into `dir` (atomically and durably: a temporary file, fsync, rename).
pub fn write_state(dir: &Path, state: &TrainerState) -> Result<(), TrainError> {
    let json = serde_json::to_string_pretty(state).expect("state serializes");
    let path = dir.join(STATE_FILE);
    kernels::io::write_atomic(&path, json.as_bytes()).map_err(|e| TrainError::io(&path, e))
}

/// Removes the oldest complete checkpoints beyond `limit`.
pub fn prune(output_dir: &Path, limit: Option<usize>) -> Result<Vec<PathBuf>, TrainError> {
    let Some(limit) = limit else {
        return Ok(Vec::new());
    };
    let all = checkpoints(output_dir);
    let mut removed = Vec::new();
    if all.len() > limit {
        for (_, p) in &all[..all.len() - limit] {
            std::fs::remove_dir_all(p).map_err(|e| TrainError::io(p, e))?;
            removed.push(p.clone());
        }
    }
    Ok(removed)
}

/// Writes `checkpoint-{step}` atomically: every file into a temporary directory (each fsynced),
/// then one rename, then an fsync of `out`. On any failure the temporary directory is removed
/// (on a full disk that frees the space it took) and the complete checkpoints are untouched.
pub(crate) fn save_checkpoint<B: AutodiffBackend, M: TrainableLm<B>, O: Optimizer<M, B>>(
    model: &M,
    lora_cfg: &LoraConfig,
    optim: &O,
    state: &TrainerState,
    out: &Path,
) -> Result<PathBuf, TrainError> {
    let final_dir = out.join(format!("checkpoint-{}", state.global_step));
    let tmp = out.join(format!(".checkpoint-{}.partial", state.global_step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    let write_all = || -> Result<(), TrainError> {
        save_adapter(model, lora_cfg, &tmp)?;
        // Encoded in memory and written by `write_atomic` (same bincode layout as
        // `BinFileRecorder`, which loads it) so that a write error keeps its OS error kind and the
        // file is fsynced.
        let path = tmp.join(OPTIMIZER_FILE).with_extension("bin");
        let bytes = BinBytesRecorder::<FullPrecisionSettings>::new()
            .record(optim.to_record(), ())
            .map_err(|e| TrainError::Record {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        kernels::io::write_atomic(&path, &bytes).map_err(|e| TrainError::io(&path, e))?;
        // The state file last: a directory without it is never picked for resuming.
        write_state(&tmp, state)?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(|e| TrainError::io(&final_dir, e))
    };
    if let Err(e) = write_all() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    kernels::io::sync_dir(out);
    Ok(final_dir)
}
