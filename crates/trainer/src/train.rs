//! The training loop: a plain explicit loop (not Burn's `Learner`) that does what transformers'
//! `Trainer.train` does for a PEFT model, with the 2024 gradient-accumulation fix: every micro-batch's
//! summed token loss is divided by the supervised tokens of the *whole optimizer step*, so k
//! micro-batches of n/k examples give exactly the gradient of one batch of n.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use lora_core::{load_adapter, save_adapter, LoraConfig};
use lora_data::{Collator, Example, Sampler, SamplerState, IGNORE_INDEX};

use crate::launch::{self, ProcessGroup, Progress, Watchdog};
use crate::parallel::{self, Peer};

use crate::args::TrainingArguments;
use crate::checkpoint::{self, save_checkpoint, EvalEntry, LogEntry, TrainerState, OPTIMIZER_FILE};
use crate::clip::clip_global_norm;
use crate::error::TrainError;
use crate::eval::evaluate;
use crate::lm::TrainableLm;
use crate::plot::write_loss_svg;

/// What the loop reports as it goes (for progress bars and printing).
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// Training starts (or resumes) at `step` of `total`.
    Start {
        /// First step to run (0-based).
        step: usize,
        /// Total optimizer steps.
        total: usize,
    },
    /// One optimizer step finished.
    Step {
        /// Steps done (1-based).
        step: usize,
        /// Total.
        total: usize,
        /// The step's mean token loss.
        loss: f64,
        /// Learning rate used.
        lr: f64,
    },
    /// A log line (also appended to `metrics.jsonl`).
    Log(LogEntry),
    /// An evaluation finished (also appended to `metrics.jsonl`).
    Eval(EvalEntry),
    /// A checkpoint was written.
    Saved(PathBuf),
    /// The run continues from `checkpoint`, which is at `step` (sent before [`TrainEvent::Start`]).
    Resumed {
        /// The checkpoint directory.
        checkpoint: PathBuf,
        /// Its optimizer steps.
        step: usize,
    },
}

/// What a finished run leaves.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// Final state (also in `output_dir/trainer_state.json`).
    pub state: TrainerState,
    /// Where the final adapter was written (`output_dir`).
    pub adapter_dir: PathBuf,
    /// Whether `on_event` stopped the run before the last step.
    pub stopped: bool,
}

/// Supervised tokens an example contributes after the shift (labels at positions 1..).
pub(crate) fn supervised(e: &Example) -> usize {
    e.labels
        .iter()
        .skip(1)
        .filter(|&&l| l != IGNORE_INDEX)
        .count()
}

/// A per-step seed for dropout, so a resumed run draws exactly what the uninterrupted one did.
fn step_seed(seed: u64, step: usize) -> u64 {
    let mut z = seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 27)
}

/// Trains the adapters of `model` (already applied with `lora_cfg`) on `examples`.
///
/// `on_event` sees every event; returning `false` stops the run cleanly after the current step
/// (Ctrl-C handling, tests of interruption): the outcome then has `stopped = true` and no final
/// adapter is written (the checkpoints are the record).
///
/// Resumes from `args.resume_from_checkpoint` when set: adapter weights, optimizer state, sampler
/// position and step counter come from the checkpoint, and the per-step losses continue exactly as
/// in an uninterrupted run (bitwise on CPU). Checkpoints and the final adapter are PEFT directories.
///
/// Stops with [`TrainError::NonFinite`] (the step, loss or gradient norm) before a non-finite
/// update reaches the weights, and with [`TrainError::NoSpace`] when the device fills up while
/// writing; either way the complete checkpoints already written stay as they were.
///
/// With `args.world_size > 1`, trains data-parallel with that many workers on `device`
/// ([`train_data_parallel`]) and returns worker 0's model.
#[allow(clippy::too_many_arguments)] // each is a distinct input of a run; a bundle would only rename them
pub fn train<B: AutodiffBackend, M: TrainableLm<B>>(
    model: M,
    lora_cfg: &LoraConfig,
    examples: &[Example],
    eval_examples: &[Example],
    collator: Collator,
    args: &TrainingArguments,
    device: &B::Device,
    on_event: &mut dyn FnMut(&TrainEvent) -> bool,
) -> Result<(M, TrainOutcome), TrainError> {
    // In a multi-process run this process holds one worker (its rank); otherwise all of them.
    let local = match args.process_group {
        Some(_) => 1,
        None => args.world_size.max(1),
    };
    let devices = vec![device.clone(); local];
    let (mut models, outcome) = run(
        model,
        lora_cfg,
        examples,
        eval_examples,
        collator,
        args,
        &devices,
        on_event,
    )
    .map_err(|e| e.on_full_disk(&args.output_dir))?;
    Ok((models.swap_remove(0), outcome))
}

/// [`train`] with `args.world_size` data-parallel workers, worker `w` on `devices[w]` (one device
/// for all, or one each); returns every worker's final model (equal to one another), worker 0's
/// first. `model` is worker 0's, on `devices[0]`; the others start as copies of it (after a
/// resume, too).
///
/// transformers' `Trainer` under DDP: `per_device_train_batch_size` is per worker, and one optimizer
/// step consumes `world_size × gradient_accumulation_steps` micro-batches in the single-device
/// sampler's order, micro-batch `k` of the step going to worker `k mod world_size`. A step thus
/// trains on the examples of a single-device step with `gradient_accumulation_steps × world_size`,
/// and its loss and update are that step's (the loss bit for bit; the gradients up to summation
/// order, each worker summing its own micro-batches first). Each worker divides its token-loss sums
/// by the supervised tokens of the whole step; the gradients are summed over the workers with
/// Burn's collective engine (`burn-collective`, in this process); every worker clips the sum and
/// steps its own AdamW, so the copies stay equal. A worker with no micro-batch in a step (the last
/// step of an epoch can have fewer than `world_size`) contributes zeros. Only worker 0 logs,
/// evaluates and writes checkpoints and the adapter. A checkpoint resumes with any `world_size`
/// that divides its micro-batches per step, with the accumulation that keeps their number.
///
/// Dropout: on the CPU each worker thread draws its masks from its own key stream, seeded per
/// micro-batch and layer, so the masks are those of one device. Device-side masks (CUDA) come from
/// the backend's generator, one per process: with `lora_dropout > 0` and several workers in one
/// process they are random but not reproducible draw for draw (one process per device, as
/// torchrun launches it, is).
#[allow(clippy::too_many_arguments)] // `train`'s arguments
pub fn train_data_parallel<B: AutodiffBackend, M: TrainableLm<B>>(
    model: M,
    lora_cfg: &LoraConfig,
    examples: &[Example],
    eval_examples: &[Example],
    collator: Collator,
    args: &TrainingArguments,
    devices: &[B::Device],
    on_event: &mut dyn FnMut(&TrainEvent) -> bool,
) -> Result<(Vec<M>, TrainOutcome), TrainError> {
    args.validate()?;
    if args.process_group.is_some() {
        return Err(TrainError::BadOption {
            option: "process_group".into(),
            reason: "is set: a multi-process run has one worker per process; call `train`".into(),
        });
    }
    if devices.len() != args.world_size {
        return Err(TrainError::BadOption {
            option: "world_size".into(),
            reason: format!(
                "is {} but {} devices were given (one per worker)",
                args.world_size,
                devices.len()
            ),
        });
    }
    run(
        model,
        lora_cfg,
        examples,
        eval_examples,
        collator,
        args,
        devices,
        on_event,
    )
    .map_err(|e| e.on_full_disk(&args.output_dir))
}

/// Why a checkpoint of `saved_accum` × `saved_world` micro-batches per step cannot be resumed with
/// `accum` × `world`, if it cannot. Any world size resumes it that divides its micro-batches per
/// step, with the accumulation that keeps their number: a step then trains on the same examples.
/// Checkpoints without a world size are of one worker; without an accumulation, nothing to check.
fn per_step_differs(
    saved_accum: Option<usize>,
    saved_world: Option<usize>,
    accum: usize,
    world: usize,
) -> Option<String> {
    let saved_accum = saved_accum?;
    let saved_world = saved_world.unwrap_or(1);
    let per_step = saved_accum * saved_world;
    if per_step == accum * world {
        return None;
    }
    let was = format!(
        "it was trained with {per_step} micro-batches per step (world_size {saved_world} × \
         gradient_accumulation_steps {saved_accum})"
    );
    Some(if per_step.is_multiple_of(world) {
        format!(
            "{was}, this run takes {} ({world} × {accum}); with world_size {world} pass \
             gradient_accumulation_steps {}",
            accum * world,
            per_step / world
        )
    } else {
        format!("{was}; world_size {world} does not divide them, use a world size that does")
    })
}

/// A step's micro-batches (all workers'): `per_step` of them, fewer when the epoch ends first, as
/// transformers does.
fn draw_step(sampler: &mut Sampler, batch_size: usize, per_step: usize) -> Vec<Vec<usize>> {
    let mut micro: Vec<Vec<usize>> = Vec::with_capacity(per_step);
    for _ in 0..per_step {
        let epoch = sampler.state().epoch;
        micro.push(sampler.next_batch(batch_size));
        if sampler.state().epoch != epoch {
            break;
        }
    }
    micro
}

/// The divisor of every micro-batch's token-loss sum: the supervised tokens of the whole step.
fn step_norm(micro: &[Vec<usize>], examples: &[Example]) -> f64 {
    let n_sup: usize = micro
        .iter()
        .flatten()
        .map(|&i| supervised(&examples[i]))
        .sum();
    n_sup.max(1) as f64
}

/// The step's loss, gradient sum and tokens: of all `micro` batches with one worker (`peer` is
/// `None`); with several, of this worker's share (micro-batch `k` is worker `k mod W`'s), summed
/// over the workers.
#[allow(clippy::too_many_arguments)] // the step's inputs
fn step_grads<B: AutodiffBackend, M: TrainableLm<B>>(
    model: &M,
    micro: &[Vec<usize>],
    examples: &[Example],
    collator: &Collator,
    norm: f64,
    seed: u64,
    checkpointing: bool,
    device: &B::Device,
    peer: Option<&Peer<B>>,
) -> Result<(f64, GradientsParams, usize), TrainError> {
    crate::recompute::seed_layer::<B>(device, seed);
    let mut acc = GradientsAccumulator::<M>::new();
    let mut step_loss = 0.0f64;
    let mut tokens = 0usize;
    let mut values = Vec::new();
    for (k, idx) in micro.iter().enumerate() {
        if peer.is_some_and(|p| !p.owns(k)) {
            continue;
        }
        let refs: Vec<&Example> = idx.iter().map(|&i| &examples[i]).collect();
        let batch = collator.collate::<B>(&refs, device);
        tokens += batch.input_ids.dims().iter().product::<usize>();
        let micro_seed = step_seed(seed, k);
        let (value, grads) = model.loss_and_grads(&batch, norm, checkpointing, micro_seed);
        step_loss += value;
        values.push((k, value));
        acc.accumulate(model, grads);
    }
    let grads = acc.grads();
    match peer {
        None => Ok((step_loss, grads, tokens)),
        Some(p) => p.all_reduce_step(model, micro.len(), &values, tokens, grads),
    }
}

/// The optimizer step (LoRA+: the `lora_B` group first, at `ratio` × `lr`).
fn optimizer_step<B: AutodiffBackend, M: TrainableLm<B>, O: Optimizer<M, B>>(
    optim: &mut O,
    mut model: M,
    mut grads: GradientsParams,
    lr: f64,
    loraplus_ratio: Option<f64>,
) -> M {
    if let Some(ratio) = loraplus_ratio {
        let b = crate::loraplus::take_lora_b(&model, &mut grads);
        model = optim.step(lr * ratio, model, b);
    }
    optim.step(lr, model, grads)
}

/// A worker other than 0: the same steps on its share, no output; goes on while worker 0 says so.
/// Returns its model and the step it stopped at.
#[allow(clippy::too_many_arguments)] // the run's inputs
fn follow<B: AutodiffBackend, M: TrainableLm<B>, O: Optimizer<M, B>>(
    id: usize,
    world: usize,
    mut model: M,
    mut optim: O,
    mut sampler: Sampler,
    mut step: usize,
    total: usize,
    examples: &[Example],
    collator: &Collator,
    args: &TrainingArguments,
    device: &B::Device,
    group: Option<(&ProcessGroup, Arc<Progress>)>,
) -> Result<(M, usize), TrainError> {
    // A worker thread that panics would leave the others waiting in the collective forever.
    let _stop = launch::ExitOnPanic(id);
    let peer = Peer::<B>::register(id, world, device, group)?;
    while peer.agree(true)? {
        let micro = draw_step(
            &mut sampler,
            args.per_device_train_batch_size,
            args.micro_batches_per_step(),
        );
        let norm = step_norm(&micro, examples);
        let seed = step_seed(args.seed, step);
        let (_, mut grads, _) = step_grads(
            &model,
            &micro,
            examples,
            collator,
            norm,
            seed,
            args.gradient_checkpointing,
            device,
            Some(&peer),
        )?;
        // Worker 0 checks the loss and norm (the same values) and stops everyone if not finite.
        clip_global_norm(&model, &mut grads, args.max_grad_norm);
        let lr = args.lr_at(step, total);
        model = optimizer_step(&mut optim, model, grads, lr, args.loraplus_lr_ratio);
        step += 1;
    }
    peer.finish()?;
    Ok((model, step))
}

#[allow(clippy::too_many_arguments)] // `train`'s arguments
fn run<B: AutodiffBackend, M: TrainableLm<B>>(
    mut model: M,
    lora_cfg: &LoraConfig,
    examples: &[Example],
    eval_examples: &[Example],
    collator: Collator,
    args: &TrainingArguments,
    devices: &[B::Device],
    on_event: &mut dyn FnMut(&TrainEvent) -> bool,
) -> Result<(Vec<M>, TrainOutcome), TrainError> {
    args.validate()?;
    let device = &devices[0];
    let group = args.process_group.as_ref();
    let world = match group {
        Some(g) => g.world_size,
        None => devices.len(),
    };
    // Only rank 0 of a multi-process run touches the output directory.
    let leads = group.is_none_or(|g| g.rank == 0);
    if args.weight_decay > 0.0 && lora_cfg.lora_bias() {
        // transformers' Trainer leaves every `bias` out of weight decay; one AdamW here decays all.
        return Err(TrainError::BadOption {
            option: "weight_decay".into(),
            reason: format!(
                "is {} with lora_bias = true: transformers exempts the lora_B biases from weight \
                 decay and this trainer does not yet; pass --weight-decay 0 or drop --lora-bias",
                args.weight_decay
            ),
        });
    }
    if examples.is_empty() {
        return Err(TrainError::NoData);
    }
    let out = &args.output_dir;
    if args.resume_from_checkpoint.is_none() && leads {
        let previous = checkpoint::previous_run(out);
        if !previous.is_empty() && !args.overwrite_output_dir {
            return Err(TrainError::OutputDirInUse {
                dir: out.clone(),
                found: previous
                    .iter()
                    .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        for p in previous {
            let removed = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            removed.map_err(|e| TrainError::io(&p, e))?;
        }
    }
    if leads {
        std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    }
    let bs = args.per_device_train_batch_size;
    let batches_per_epoch = examples.len().div_ceil(bs);
    let total = args.total_steps(batches_per_epoch);

    let mut sampler = Sampler::new(
        examples.iter().map(|e| e.input_ids.len()).collect(),
        args.seed,
    );
    if !args.shuffle {
        sampler = sampler.sequential();
    }
    let mut optim = AdamWConfig::new()
        .with_beta_1(args.adam_beta1 as f32)
        .with_beta_2(args.adam_beta2 as f32)
        .with_epsilon(args.adam_epsilon as f32)
        .with_weight_decay(args.weight_decay as f32)
        .with_grad_clipping(None)
        .init::<B, M>();
    let recorder = BinFileRecorder::<FullPrecisionSettings>::new();

    let mut state = TrainerState {
        global_step: 0,
        max_steps: total,
        epoch: 0.0,
        sampler: SamplerState::default(),
        seed: args.seed,
        step_losses: Vec::new(),
        log_history: Vec::new(),
        eval_history: Vec::new(),
        data_fingerprint: Some(checkpoint::data_fingerprint(examples)),
        train_batch_size: Some(bs),
        gradient_accumulation_steps: Some(args.gradient_accumulation_steps),
        world_size: (world > 1).then_some(world),
    };
    if let Some(arg) = &args.resume_from_checkpoint {
        let dir = checkpoint::resolve_resume(arg, out)?;
        let saved = checkpoint::read_state(&dir)?;
        let refuse = |reason: String| {
            Err(TrainError::BadCheckpoint {
                path: dir.clone(),
                reason: format!("{reason}; resume with the run's own settings, or start a new run in another output directory"),
            })
        };
        if saved.seed != args.seed {
            return refuse(format!(
                "it was trained with seed {}, this run has {}",
                saved.seed, args.seed
            ));
        }
        if saved.global_step > total {
            return refuse(format!(
                "it is at step {}, past the {total} steps of this run (--max-steps / --num-train-epochs)",
                saved.global_step
            ));
        }
        // Checkpoints written before these were recorded carry none: nothing to compare.
        let differs = |what: &str, saved: &Option<String>, now: &Option<String>| match (saved, now)
        {
            (Some(a), Some(b)) if a != b => Some(format!("its {what} is {a}, this run's is {b}")),
            _ => None,
        };
        let text = |v: Option<usize>| v.map(|v| v.to_string());
        if let Some(difference) = [
            differs(
                "training data (fingerprint of the tokenized examples)",
                &saved.data_fingerprint,
                &state.data_fingerprint,
            ),
            differs(
                "per_device_train_batch_size",
                &text(saved.train_batch_size),
                &text(state.train_batch_size),
            ),
            per_step_differs(
                saved.gradient_accumulation_steps,
                saved.world_size,
                args.gradient_accumulation_steps,
                world,
            ),
        ]
        .into_iter()
        .flatten()
        .next()
        {
            return refuse(difference);
        }
        on_event(&TrainEvent::Resumed {
            checkpoint: dir.clone(),
            step: saved.global_step,
        });
        let (m, _, _) = load_adapter(model, &dir)?;
        model = m;
        let rec = recorder
            .load(dir.join(OPTIMIZER_FILE), device)
            .map_err(|e| TrainError::Record {
                path: dir.join(OPTIMIZER_FILE),
                reason: e.to_string(),
            })?;
        optim = optim.load_record(rec);
        sampler = sampler.resume(saved.sampler)?;
        let fingerprint = state.data_fingerprint.take();
        state = TrainerState {
            max_steps: total,
            data_fingerprint: fingerprint,
            train_batch_size: Some(bs),
            gradient_accumulation_steps: Some(args.gradient_accumulation_steps),
            world_size: (world > 1).then_some(world),
            ..saved
        };
    }

    // A multi-process run: rank 0 hosts the orchestrator; every rank joins the watchdog.
    let watchdog = match group {
        Some(g) => {
            ProcessGroup::quiet();
            if g.rank == 0 {
                launch::start_orchestrator(g.master_port)?;
            }
            Some(Watchdog::start(g, Duration::from_secs(args.ddp_timeout))?)
        }
        None => None,
    };
    let joined = |w: &Option<Watchdog>| group.zip(w.as_ref().map(|w| w.progress.clone()));
    if let Some(g) = group.filter(|g| g.rank > 0) {
        let _turn = parallel::exclusive::<B>();
        let (model, step) = follow(
            g.rank,
            world,
            model,
            optim,
            sampler,
            state.global_step,
            total,
            examples,
            &collator,
            args,
            device,
            joined(&watchdog),
        )?;
        if let Some(w) = watchdog {
            w.finish();
        }
        state.global_step = step;
        return Ok((
            vec![model],
            TrainOutcome {
                state,
                adapter_dir: out.clone(),
                stopped: step < total,
            },
        ));
    }

    let metrics_path = out.join("metrics.jsonl");
    if args.resume_from_checkpoint.is_some() {
        // Steps logged after the checkpoint are run again: their old lines go.
        truncate_log(&metrics_path, state.global_step)?;
    }
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| TrainError::io(&metrics_path, e))?;

    let mut go_on = on_event(&TrainEvent::Start {
        step: state.global_step,
        total,
    });
    let (mut window_loss, mut window_steps, mut window_tokens) = (0.0f64, 0usize, 0usize);
    // Time spent in the window's training steps only (batches, forward, backward, optimizer):
    // evaluation, checkpoints and logging are not training throughput.
    let mut window_time = Duration::ZERO;
    // Workers 1.. run beside this loop (worker 0's) from copies of its model, optimizer and sampler.
    let _turn = (world > 1).then(parallel::exclusive::<B>);
    let collator = &collator;
    let (looped, model, followers) = std::thread::scope(|s| {
        let followers: Vec<_> = devices
            .iter()
            .enumerate()
            .skip(1)
            .map(|(id, dev)| {
                let (m, o, smp) = (model.clone().fork(dev), optim.clone(), sampler.clone());
                let step = state.global_step;
                s.spawn(move || {
                    follow(
                        id, world, m, o, smp, step, total, examples, collator, args, dev, None,
                    )
                    .map(|(m, _)| m)
                })
            })
            .collect();
        let peer =
            match (world > 1).then(|| Peer::<B>::register(0, world, device, joined(&watchdog))) {
                Some(Err(e)) => return (Err(e), model, Vec::new()),
                Some(Ok(p)) => Some(p),
                None => None,
            };
        // Every error of a step breaks out with it, so that the other workers can be released.
        macro_rules! attempt {
            ($steps:lifetime, $e:expr) => {
                match $e {
                    Ok(v) => v,
                    Err(e) => break $steps Err(e),
                }
            };
        }
        let looped: Result<(), TrainError> = 'steps: {
            loop {
                let more = go_on && state.global_step < total;
                if let Some(p) = &peer {
                    if !attempt!('steps, p.agree(more)) {
                        break 'steps Ok(());
                    }
                }
                if !more {
                    break 'steps Ok(());
                }
                let step_start = Instant::now();
                let micro = draw_step(&mut sampler, bs, args.micro_batches_per_step());
                let norm = step_norm(&micro, examples);
                let seed = step_seed(args.seed, state.global_step);
                let (step_loss, mut grads, tokens) = attempt!('steps, step_grads(
                    &model,
                    &micro,
                    examples,
                    collator,
                    norm,
                    seed,
                    args.gradient_checkpointing,
                    device,
                    peer.as_ref(),
                ));
                window_tokens += tokens;
                let grad_norm = clip_global_norm(&model, &mut grads, args.max_grad_norm);
                let step = state.global_step + 1;
                // Checked before the optimizer step, so no non-finite value reaches the weights
                // (or a checkpoint). The norm is computed whether or not clipping is on
                // (max_grad_norm = 0).
                let last_ckpt = || checkpoint::last_checkpoint(out);
                if !step_loss.is_finite() {
                    break 'steps Err(TrainError::NonFinite {
                        step,
                        what: "loss".into(),
                        value: step_loss,
                        last_checkpoint: last_ckpt(),
                    });
                }
                if !grad_norm.is_finite() {
                    break 'steps Err(TrainError::NonFinite {
                        step,
                        what: "gradient norm".into(),
                        value: grad_norm,
                        last_checkpoint: last_ckpt(),
                    });
                }
                let lr = args.lr_at(state.global_step, total);
                model = optimizer_step(&mut optim, model, grads, lr, args.loraplus_lr_ratio);
                window_time += step_start.elapsed();

                state.global_step = step;
                state.sampler = sampler.state();
                state.epoch =
                    state.sampler.epoch as f64 + state.sampler.index as f64 / examples.len() as f64;
                state.step_losses.push(step_loss);
                window_loss += step_loss;
                window_steps += 1;
                go_on &= on_event(&TrainEvent::Step {
                    step,
                    total,
                    loss: step_loss,
                    lr,
                });

                if step.is_multiple_of(args.logging_steps.max(1)) || step == total {
                    let secs = window_time.as_secs_f64().max(1e-9);
                    let entry = LogEntry {
                        step,
                        epoch: state.epoch,
                        loss: window_loss / window_steps as f64,
                        grad_norm,
                        learning_rate: lr,
                        tokens_per_s: window_tokens as f64 / secs,
                    };
                    let line = serde_json::to_string(&entry).expect("log entry serializes");
                    attempt!('steps, append_line(&mut metrics, &metrics_path, &line));
                    state.log_history.push(entry.clone());
                    go_on &= on_event(&TrainEvent::Log(entry));
                    (window_loss, window_steps, window_tokens) = (0.0, 0, 0);
                    window_time = Duration::ZERO;
                }
                let eval_due = args
                    .eval_steps
                    .is_some_and(|n| n > 0 && step.is_multiple_of(n))
                    || step == total;
                if !eval_examples.is_empty() && eval_due {
                    let inner = model.valid();
                    let r = evaluate(
                        |b| M::inner_loss_sum(&inner, b),
                        eval_examples,
                        collator,
                        bs,
                        device,
                    );
                    let entry = EvalEntry {
                        step,
                        epoch: state.epoch,
                        eval_loss: r.loss,
                        eval_perplexity: r.perplexity,
                    };
                    let line = serde_json::to_string(&entry).expect("eval entry serializes");
                    attempt!('steps, append_line(&mut metrics, &metrics_path, &line));
                    state.eval_history.push(entry.clone());
                    go_on &= on_event(&TrainEvent::Eval(entry));
                }
                if args.save_steps > 0 && step.is_multiple_of(args.save_steps) {
                    let dir =
                        attempt!('steps, save_checkpoint(&model, lora_cfg, &optim, &state, out));
                    attempt!('steps, checkpoint::prune(out, args.save_total_limit));
                    go_on &= on_event(&TrainEvent::Saved(dir));
                }
            }
        };
        if let Some(p) = peer {
            // A failure of worker 0's own (not of the collective) releases the others, which wait
            // for its word on the next step.
            let released = match &looped {
                Err(TrainError::Collective { .. }) => Ok(()),
                Err(_) => p.agree(false).map(drop),
                Ok(()) => Ok(()),
            };
            let finished = released.and_then(|()| p.finish());
            // The other ranks were released: wait for their word before this process may exit.
            // Not after the collective itself failed: a rank may be dead, and the watchdog must
            // go on watching (it names the rank and ends the process).
            let engine_failed = matches!(looped, Err(TrainError::Collective { .. }));
            if let (Ok(()), Some(w), false) = (&finished, watchdog, engine_failed) {
                w.finish();
            }
            if let (Ok(()), Err(e)) = (&looped, finished) {
                return (Err(e), model, Vec::new());
            }
        }
        let followers: Vec<Result<M, TrainError>> = followers
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect();
        (looped, model, followers)
    });
    looped?;
    let followers = followers.into_iter().collect::<Result<Vec<M>, _>>()?;
    let stopped = state.global_step < total;
    if !stopped {
        save_adapter(&model, lora_cfg, out)?;
        checkpoint::write_state(out, &state)?;
    }
    let train_pts: Vec<(usize, f64)> = state.log_history.iter().map(|l| (l.step, l.loss)).collect();
    let eval_pts: Vec<(usize, f64)> = state
        .eval_history
        .iter()
        .map(|e| (e.step, e.eval_loss))
        .collect();
    let plot = out.join("loss.svg");
    write_loss_svg(&plot, &train_pts, &eval_pts).map_err(|e| TrainError::io(&plot, e))?;
    Ok((
        std::iter::once(model).chain(followers).collect(),
        TrainOutcome {
            state,
            adapter_dir: out.clone(),
            stopped,
        },
    ))
}

/// Keeps the lines of the log at `path` (if any) whose `step` is at most `step`, replacing the file
/// atomically: a run resumed from `checkpoint-{step}` then logs every later step once.
fn truncate_log(path: &Path, step: usize) -> Result<(), TrainError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(TrainError::io(path, e)),
    };
    let logged_at = |line: &str| -> Option<u64> {
        serde_json::from_str::<serde_json::Value>(line)
            .ok()?
            .get("step")?
            .as_u64()
    };
    let kept: String = text
        .lines()
        .filter(|l| logged_at(l).is_none_or(|s| s <= step as u64))
        .flat_map(|l| [l, "\n"])
        .collect();
    if kept.len() == text.len() {
        return Ok(());
    }
    kernels::io::write_atomic(path, kept.as_bytes()).map_err(|e| TrainError::io(path, e))
}

/// Appends `line` and a newline to `metrics.jsonl` in one write; on failure (a full disk) cuts the
/// file back, so a reader (or a resumed run appending to it) never meets half a line.
fn append_line(file: &mut std::fs::File, path: &Path, line: &str) -> Result<(), TrainError> {
    let len = file.metadata().map(|m| m.len());
    file.write_all(format!("{line}\n").as_bytes()).map_err(|e| {
        if let Ok(len) = len {
            let _ = file.set_len(len);
        }
        TrainError::io(path, e)
    })
}
