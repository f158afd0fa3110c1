//! Data-parallel training (`world_size` worker threads, gradients all-reduced with Burn's
//! collective engine) against one worker on the same micro-batches: a step of W workers × k
//! accumulation is a single-device step of k·W accumulation (micro-batch j of the step on worker
//! j mod W).
//!
//! Where they differ: the step loss travels exactly and is summed in micro-batch order, so it is
//! the single-device loss bit for bit; the gradient is summed per worker first ((g0 + g2) + (g1 + g3)
//! for two workers × 2 instead of ((g0 + g1) + g2) + g3), so the updates, and from step 2 on the
//! losses, differ by f32 rounding.

use std::path::Path;

use lora_core::LoraConfig;
use lora_data::{Collator, Example};
use lora_trainer::{
    train, train_data_parallel, TrainError, TrainEvent, TrainOutcome, TrainingArguments,
};
use qwen2::Qwen2ForCausalLM;

mod common;
use common::{examples, model, Ad};
use test_support::{max_rel_err, rng_lock};

fn lora_cfg() -> LoraConfig {
    LoraConfig {
        lora_dropout: 0.0,
        init_lora_weights: lora_core::InitLoraWeights::Bool(false),
        ..lora_trainer::recipe::lora_config()
    }
}

fn args(dir: &Path, world_size: usize, accumulation: usize) -> TrainingArguments {
    TrainingArguments {
        output_dir: dir.to_path_buf(),
        per_device_train_batch_size: 1,
        gradient_accumulation_steps: accumulation,
        world_size,
        learning_rate: 1e-3,
        logging_steps: 1,
        save_steps: 0,
        shuffle: false,
        seed: 3,
        ..TrainingArguments::default()
    }
}

/// Every adapter parameter as `(path, values)`.
fn values(m: &Qwen2ForCausalLM<Ad>) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    lora_core::visit_params(m, |p: lora_core::ParamRef<'_, Ad>| {
        if p.is_adapter() {
            let v = p.flat().into_data().convert::<f32>().to_vec::<f32>();
            out.push((p.path.to_string(), v.unwrap()));
        }
    });
    out
}

fn single(ex: &[Example], a: &TrainingArguments) -> (Qwen2ForCausalLM<Ad>, TrainOutcome) {
    run(ex, a, None).unwrap()
}

/// [`train`] (`a.world_size` workers on the CPU device), stopped by worker 0's callback after
/// `stop_after` steps when given.
fn run(
    ex: &[Example],
    a: &TrainingArguments,
    stop_after: Option<usize>,
) -> Result<(Qwen2ForCausalLM<Ad>, TrainOutcome), TrainError> {
    run_with(&lora_cfg(), ex, a, stop_after)
}

/// [`run`] with the LoRA config `cfg`.
fn run_with(
    cfg: &LoraConfig,
    ex: &[Example],
    a: &TrainingArguments,
    stop_after: Option<usize>,
) -> Result<(Qwen2ForCausalLM<Ad>, TrainOutcome), TrainError> {
    let mut cb = |e: &TrainEvent| !matches!((e, stop_after), (TrainEvent::Step { step, .. }, Some(s)) if *step >= s);
    train(
        model(cfg),
        cfg,
        ex,
        &[],
        Collator::new(0),
        a,
        &Default::default(),
        &mut cb,
    )
}

/// Per-step losses and final adapters of a data-parallel run against a single-worker run: returns
/// the worst relative differences (loss, adapter values).
fn compare(
    dp: (&Qwen2ForCausalLM<Ad>, &TrainOutcome),
    one: (&Qwen2ForCausalLM<Ad>, &TrainOutcome),
    tol: f64,
) -> (f64, f32) {
    let (dl, ol) = (&dp.1.state.step_losses, &one.1.state.step_losses);
    assert_eq!(dl.len(), ol.len(), "steps: {dl:?} vs {ol:?}");
    let mut loss_err = 0f64;
    for (i, (d, o)) in dl.iter().zip(ol).enumerate() {
        let e = (d - o).abs() / o.abs();
        assert!(e <= tol, "step {}: loss {d} vs {o} ({e:e})", i + 1);
        loss_err = loss_err.max(e);
    }
    let mut value_err = 0f32;
    let (dv, ov) = (values(dp.0), values(one.0));
    assert_eq!(dv.len(), ov.len());
    for ((path, d), (_, o)) in dv.iter().zip(&ov) {
        let e = max_rel_err(d, o);
        assert!(f64::from(e) <= tol, "{path}: adapter differs by {e:e}");
        value_err = value_err.max(e);
    }
    (loss_err, value_err)
}

#[test]
fn two_workers_equal_one_worker_with_twice_the_accumulation() {
    let _rng = rng_lock();
    let cfg = lora_cfg();
    let ex = examples(12);
    let (t1, t2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let steps = Some(3);
    let one = single(
        &ex,
        &TrainingArguments {
            max_steps: steps,
            ..args(t1.path(), 1, 4)
        },
    );
    let devices = [Default::default(), Default::default()];
    let (models, outcome) = train_data_parallel(
        model(&cfg),
        &cfg,
        &ex,
        &[],
        Collator::new(0),
        &TrainingArguments {
            max_steps: steps,
            ..args(t2.path(), 2, 2)
        },
        &devices,
        &mut |_: &TrainEvent| true,
    )
    .unwrap();
    assert_eq!(models.len(), 2);
    assert_eq!(outcome.state.global_step, 3);
    // The copies stay equal: the same reduced gradient, the same AdamW.
    assert_eq!(values(&models[0]), values(&models[1]), "workers diverged");
    // The first step's loss is computed on identical weights: bit for bit.
    assert_eq!(
        outcome.state.step_losses[0], one.1.state.step_losses[0],
        "step 1 loss"
    );
    let (loss_err, value_err) = compare((&models[0], &outcome), (&one.0, &one.1), 1e-6);
    println!(
        "2 workers x 2 vs 1 x 4, 3 steps: losses {:?} vs {:?}; max relative error: loss {loss_err:e}, adapter {value_err:e}",
        outcome.state.step_losses, one.1.state.step_losses
    );
    // Only worker 0 wrote the adapter and the log.
    assert!(t2.path().join("adapter_model.safetensors").is_file());
    assert!(t2.path().join("metrics.jsonl").is_file());
}

/// 5 examples, batch 1, accumulation 2, two workers: a step takes 4 micro-batches, so each epoch
/// ends with a step of one micro-batch, and worker 1 has nothing to compute (it adds zeros).
#[test]
fn an_uneven_last_step_equals_one_worker() {
    let _rng = rng_lock();
    let ex = examples(5);
    let (t1, t2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let epochs = |a: TrainingArguments| TrainingArguments {
        num_train_epochs: 2.0,
        ..a
    };
    let one = single(&ex, &epochs(args(t1.path(), 1, 4)));
    // Through `train`: world_size 2 on the one CPU device.
    let dp = single(&ex, &epochs(args(t2.path(), 2, 2)));
    assert_eq!(dp.1.state.global_step, 4, "2 epochs of 4 + 1 micro-batches");
    let (loss_err, value_err) = compare((&dp.0, &dp.1), (&one.0, &one.1), 1e-6);
    println!(
        "uneven (5 examples, 2 workers x 2 vs 1 x 4, 4 steps): max relative error: loss {loss_err:e}, adapter {value_err:e}"
    );
}

#[test]
fn world_size_zero_is_refused_by_name() {
    let _rng = rng_lock();
    let cfg = lora_cfg();
    let tmp = tempfile::tempdir().unwrap();
    let err = train(
        model(&cfg),
        &cfg,
        &examples(2),
        &[],
        Collator::new(0),
        &args(tmp.path(), 0, 1),
        &Default::default(),
        &mut |_: &TrainEvent| true,
    )
    .expect_err("world_size 0 must be refused");
    let msg = err.to_string();
    assert!(
        matches!(&err, TrainError::BadOption { option, .. } if option == "world_size"),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "one line: {msg}");
    println!("{msg}");
}

/// Worker 0 stops the run (its callback) after step 2 of 4, which also saved a checkpoint: the
/// other worker is released, and resuming with the same world size finishes exactly as the
/// uninterrupted run (bit for bit); resuming with another world size is refused.
#[test]
fn a_stopped_data_parallel_run_resumes_bitwise() {
    let _rng = rng_lock();
    let ex = examples(12);
    let (t1, t2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = |dir: &Path| TrainingArguments {
        max_steps: Some(4),
        save_steps: 2,
        ..args(dir, 2, 1)
    };
    let whole = run(&ex, &a(t1.path()), None).unwrap();
    let (_, stopped) = run(&ex, &a(t2.path()), Some(2)).unwrap();
    assert!(stopped.stopped);
    assert_eq!(stopped.state.global_step, 2);
    let other_world = TrainingArguments {
        resume_from_checkpoint: Some("latest".into()),
        world_size: 1,
        ..a(t2.path())
    };
    let err = run(&ex, &other_world, None).expect_err("another world size must be refused");
    assert!(err.to_string().contains("world_size"), "{err}");
    let resumed = run(
        &ex,
        &TrainingArguments {
            resume_from_checkpoint: Some("latest".into()),
            ..a(t2.path())
        },
        None,
    )
    .unwrap();
    assert_eq!(resumed.1.state.step_losses, whole.1.state.step_losses);
    assert_eq!(values(&resumed.0), values(&whole.0), "resumed adapter");
}

/// A checkpoint of 2 workers × accumulation 1 resumes with 1 worker × accumulation 2 (the same
/// micro-batches per step, so the same examples per step) and ends where the uninterrupted
/// 2-worker run ends, up to summation order; a world size that does not divide the checkpoint's
/// micro-batches per step is refused with the reason, and so is a count that differs.
#[test]
fn a_checkpoint_resumes_with_another_world_size() {
    let _rng = rng_lock();
    let ex = examples(12);
    let (t1, t2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = |dir: &Path, world: usize, accumulation: usize| TrainingArguments {
        max_steps: Some(4),
        save_steps: 2,
        ..args(dir, world, accumulation)
    };
    let whole = run(&ex, &a(t1.path(), 2, 1), None).unwrap();
    let (_, stopped) = run(&ex, &a(t2.path(), 2, 1), Some(2)).unwrap();
    assert_eq!(stopped.state.global_step, 2);
    let resume = |world: usize, accumulation: usize| TrainingArguments {
        resume_from_checkpoint: Some("latest".into()),
        ..a(t2.path(), world, accumulation)
    };
    let err = run(&ex, &resume(3, 1), None).expect_err("3 does not divide 2 micro-batches");
    let msg = err.to_string();
    assert!(
        msg.contains("world_size 3 does not divide"),
        "the refusal says why: {msg}"
    );
    let err = run(&ex, &resume(1, 1), None).expect_err("1 × 1 is not 2 micro-batches per step");
    let msg = err.to_string();
    assert!(
        msg.contains("pass gradient_accumulation_steps 2"),
        "the refusal says what to pass: {msg}"
    );
    let resumed = run(&ex, &resume(1, 2), None).unwrap();
    assert_eq!(resumed.1.state.global_step, 4);
    let (loss_err, value_err) = compare((&resumed.0, &resumed.1), (&whole.0, &whole.1), 1e-6);
    println!("resumed with 1 worker: loss {loss_err:e}, adapter {value_err:e}");
}

/// With dropout on, two worker threads on the one CPU backend equal one worker: each draws the
/// masks of its own micro-batches (a per-thread key stream seeded per layer and micro-batch), not
/// whatever the process-wide generator holds when its turn comes.
#[test]
fn two_workers_with_dropout_equal_one_worker() {
    let _rng = rng_lock();
    let cfg = LoraConfig {
        lora_dropout: 0.1,
        ..lora_cfg()
    };
    let ex = examples(12);
    let (t1, t2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let go = |a: &TrainingArguments| run_with(&cfg, &ex, a, None).unwrap();
    let steps = Some(3);
    let one = go(&TrainingArguments {
        max_steps: steps,
        ..args(t1.path(), 1, 4)
    });
    let two = go(&TrainingArguments {
        max_steps: steps,
        ..args(t2.path(), 2, 2)
    });
    assert_eq!(
        two.1.state.step_losses[0], one.1.state.step_losses[0],
        "step 1 loss"
    );
    let (loss_err, value_err) = compare((&two.0, &two.1), (&one.0, &one.1), 1e-6);
    println!("with dropout 0.1: loss {loss_err:e}, adapter {value_err:e}");
}
