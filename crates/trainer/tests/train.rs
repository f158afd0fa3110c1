//! The loop's contracts on the tiny fixture model: accumulation equivalence, bitwise resume,
//! NaN stop, checkpoint pruning and layout.

use std::path::Path;

use burn::tensor::DType;
use lora_core::{apply_lora, LoraConfig};
use lora_data::{Collator, Example};
use lora_trainer::{train, TrainError, TrainEvent, TrainingArguments};
use qwen2::Qwen2ForCausalLM;

mod common;
use common::{compare_adapter_grads, examples, fixture, model, toy_example, Ad};
use test_support::{
    assert_close_elementwise, fixtures, max_rel_err, read_json, read_reference, rng_lock,
};

fn lora_cfg(dropout: f64) -> LoraConfig {
    LoraConfig {
        lora_dropout: dropout,
        init_lora_weights: lora_core::InitLoraWeights::Bool(false),
        ..lora_trainer::recipe::lora_config()
    }
}

fn args(dir: &Path) -> TrainingArguments {
    TrainingArguments {
        output_dir: dir.to_path_buf(),
        per_device_train_batch_size: 2,
        gradient_accumulation_steps: 2,
        learning_rate: 1e-3,
        max_steps: Some(6),
        logging_steps: 2,
        save_steps: 2,
        seed: 3,
        ..TrainingArguments::default()
    }
}

/// Every adapter parameter (factors, `lora_B` biases, DoRA magnitudes) as `(path, values)`.
fn values(m: &Qwen2ForCausalLM<Ad>) -> Vec<(String, Vec<f32>)> {
    values_for(m, &LoraConfig::default())
}

/// [`values`] and the parameters of `cfg`'s modules to save.
fn values_for(m: &Qwen2ForCausalLM<Ad>, cfg: &LoraConfig) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    lora_core::visit_params(m, |p: lora_core::ParamRef<'_, Ad>| {
        let module = p.path.rsplit_once('.').map_or("", |(m, _)| m);
        if p.is_adapter() || lora_core::is_module_to_save(cfg, module) {
            let v = p.flat().into_data().convert::<f32>().to_vec::<f32>();
            out.push((p.path.to_string(), v.unwrap()));
        }
    });
    out
}

fn run(
    cfg: &LoraConfig,
    ex: &[Example],
    a: &TrainingArguments,
    stop_after: Option<usize>,
) -> Result<(Qwen2ForCausalLM<Ad>, lora_trainer::TrainOutcome), TrainError> {
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

#[test]
fn accumulating_k_micro_batches_equals_one_batch() {
    let _rng = rng_lock();
    let cfg = lora_cfg(0.0);
    let ex = examples(8);
    let tmp = tempfile::tempdir().unwrap();
    let base = TrainingArguments {
        shuffle: false,
        max_steps: Some(1),
        save_steps: 0,
        ..args(tmp.path())
    };
    let one = TrainingArguments {
        per_device_train_batch_size: 8,
        gradient_accumulation_steps: 1,
        ..base.clone()
    };
    let four = TrainingArguments {
        per_device_train_batch_size: 2,
        gradient_accumulation_steps: 4,
        overwrite_output_dir: true, // the same directory as `one`'s run
        ..base.clone()
    };
    let (m1, o1) = run(&cfg, &ex, &one, None).unwrap();
    let (m4, o4) = run(&cfg, &ex, &four, None).unwrap();
    let (l1, l4) = (o1.state.step_losses[0], o4.state.step_losses[0]);
    assert!((l1 - l4).abs() <= 1e-6 * l1.abs(), "step loss {l1} vs {l4}");
    let mut worst = 0f32;
    for ((k, a), (_, b)) in values(&m1).iter().zip(values(&m4).iter()) {
        worst = worst.max(assert_close_elementwise(k, b, a, 1e-4, 1e-3));
    }
    println!("1x8 vs 4x2: loss {l1} vs {l4}, worst adapter relative difference {worst:e}");
}

#[test]
fn resumed_run_is_bitwise_identical() {
    resumed_run_case(None);
}

/// With LoRA+ too: the optimizer state of both parameter groups survives the checkpoint.
#[test]
fn resumed_loraplus_run_is_bitwise_identical() {
    resumed_run_case(Some(16.0));
}

/// Resuming a run whose adapter has every variant that adds parameters: DoRA magnitudes, the
/// trained embedding rows and a trained output head (LoRA+ on, so 1-D parameters take lora_B's
/// group): bitwise the uninterrupted run.
#[test]
fn resumed_variant_run_is_bitwise_identical() {
    let mut cfg = lora_cfg(0.1);
    cfg.use_dora = true;
    cfg.modules_to_save = Some(vec!["lm_head".into()]);
    cfg.set_trainable_token_indices(Some(&[3, 7]));
    resumed_run_with(cfg, Some(4.0));
}

fn resumed_run_case(loraplus_lr_ratio: Option<f64>) {
    resumed_run_with(lora_cfg(0.1), loraplus_lr_ratio) // dropout on: the RNG must resume too
}

fn resumed_run_with(cfg: LoraConfig, loraplus_lr_ratio: Option<f64>) {
    let _rng = rng_lock();
    let ex = examples(10);
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let args = |d: &Path| TrainingArguments {
        loraplus_lr_ratio,
        ..args(d)
    };
    let (ma, oa) = run(&cfg, &ex, &args(a_dir.path()), None).unwrap();
    assert_eq!(oa.state.step_losses.len(), 6);

    // Interrupted after step 3: the newest checkpoint is step 2.
    let (_, ob) = run(&cfg, &ex, &args(b_dir.path()), Some(3)).unwrap();
    assert!(ob.stopped);
    assert_eq!(ob.state.global_step, 3);
    let resumed = TrainingArguments {
        resume_from_checkpoint: Some("latest".into()),
        ..args(b_dir.path())
    };
    let (mb, oc) = run(&cfg, &ex, &resumed, None).unwrap();
    assert_eq!(
        oc.state.step_losses, oa.state.step_losses,
        "per-step losses differ after resume"
    );
    assert!(
        values_for(&ma, &cfg) == values_for(&mb, &cfg),
        "final adapters differ after resume"
    );
    let bytes = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert_eq!(bytes(a_dir.path()), bytes(b_dir.path()));
}

/// Steps logged after the last checkpoint of an interrupted run are logged again when it resumes;
/// `metrics.jsonl` keeps one line per step, as the uninterrupted run writes it.
#[test]
fn resumed_run_keeps_one_metrics_line_per_step() {
    let _rng = rng_lock();
    let cfg = lora_cfg(0.0);
    let ex = examples(10);
    let every_step = |dir: &Path| TrainingArguments {
        logging_steps: 1,
        ..args(dir)
    };
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run(&cfg, &ex, &every_step(a_dir.path()), None).unwrap();
    // Interrupted after step 3, logged; the newest checkpoint is step 2.
    let (_, ob) = run(&cfg, &ex, &every_step(b_dir.path()), Some(3)).unwrap();
    assert!(ob.stopped);
    let resumed = TrainingArguments {
        resume_from_checkpoint: Some("latest".into()),
        ..every_step(b_dir.path())
    };
    run(&cfg, &ex, &resumed, None).unwrap();
    // (step, loss) of every training log line, in file order.
    let logged = |dir: &Path| -> Vec<(u64, f64)> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get("loss").is_some())
            .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
            .collect()
    };
    let (a, b) = (logged(a_dir.path()), logged(b_dir.path()));
    assert_eq!(
        a.iter().map(|e| e.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    assert_eq!(b, a, "metrics.jsonl after resume");
}

#[test]
fn checkpoints_are_complete_and_pruned() {
    let _rng = rng_lock();
    let cfg = lora_cfg(0.0);
    let tmp = tempfile::tempdir().unwrap();
    let a = TrainingArguments {
        save_steps: 1,
        save_total_limit: Some(2),
        max_steps: Some(5),
        ..args(tmp.path())
    };
    run(&cfg, &examples(6), &a, None).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "checkpoint-4",
            "checkpoint-5",
            "loss.svg",
            "metrics.jsonl",
            "trainer_state.json"
        ]
    );
    let mut inside: Vec<String> = std::fs::read_dir(tmp.path().join("checkpoint-5"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    inside.sort();
    assert_eq!(
        inside,
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "optimizer.bin",
            "trainer_state.json"
        ]
    );
    let lines = std::fs::read_to_string(tmp.path().join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    for k in [
        "step",
        "epoch",
        "loss",
        "grad_norm",
        "learning_rate",
        "tokens_per_s",
    ] {
        assert!(first.get(k).is_some(), "metrics line lacks {k}: {first}");
    }
}

#[test]
fn non_finite_loss_stops_with_step_and_keeps_checkpoint() {
    let _rng = rng_lock();
    let cfg = lora_cfg(0.0);
    let tmp = tempfile::tempdir().unwrap();
    // A poisoned adapter: every forward gives NaN.
    let mut m = model(&cfg);
    let b = m.model.layers[0].mlp.up_proj.lora_B.as_mut().unwrap();
    b.weight = b.weight.clone().map(|t| t.mul_scalar(f32::NAN));
    let a = args(tmp.path());
    let mut cb = |_: &TrainEvent| true;
    let e = train(
        m,
        &cfg,
        &examples(6),
        &[],
        Collator::new(0),
        &a,
        &Default::default(),
        &mut cb,
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, TrainError::NonFinite { step: 1, .. }), "{msg}");
    assert!(msg.contains("step 1") && msg.contains("loss"), "{msg}");
    assert!(
        !tmp.path().join("adapter_model.safetensors").exists(),
        "no final adapter from a diverged run"
    );
}

#[test]
fn impossible_options_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for (a, name) in [
        (
            TrainingArguments {
                per_device_train_batch_size: 0,
                ..args(tmp.path())
            },
            "per_device_train_batch_size",
        ),
        (
            TrainingArguments {
                learning_rate: -1.0,
                ..args(tmp.path())
            },
            "learning_rate",
        ),
        (
            TrainingArguments {
                gradient_accumulation_steps: 0,
                ..args(tmp.path())
            },
            "gradient_accumulation_steps",
        ),
    ] {
        let msg = a.validate().unwrap_err().to_string();
        assert!(msg.contains(name), "{msg}");
    }
    // Weight decay on lora_B biases, which transformers exempts: refused before any step.
    let mut cfg = lora_cfg(0.0);
    cfg.set_lora_bias(true);
    let a = TrainingArguments {
        weight_decay: 0.01,
        ..args(tmp.path())
    };
    let msg = run(&cfg, &examples(4), &a, None).unwrap_err().to_string();
    assert!(
        msg.contains("weight_decay") && msg.contains("lora_bias"),
        "{msg}"
    );
    assert!(!tmp.path().join("checkpoint-1").exists());
}

#[test]
fn schedules_match_transformers() {
    let a = TrainingArguments {
        learning_rate: 1.0,
        warmup_steps: 2,
        ..TrainingArguments::default()
    };
    // get_linear_schedule_with_warmup(warmup=2, total=6): 0, .5, 1, .75, .5, .25
    let lrs: Vec<f64> = (0..6).map(|s| a.lr_at(s, 6)).collect();
    assert_eq!(lrs, [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]);
    let c = TrainingArguments {
        lr_scheduler_type: lora_trainer::SchedulerType::Cosine,
        ..a.clone()
    };
    assert!((c.lr_at(4, 6) - 0.5).abs() < 1e-12);
    // The tutorial: 3,729 records, batch 4 -> 933 micro-batches, accumulation 4 -> 234 steps an epoch.
    assert_eq!(
        TrainingArguments::tutorial("o".into()).total_steps(933),
        702
    );
}

/// Per-step loss vs the PyTorch reference loop: relative error.
const STEP_LOSS_REL_TOL: f64 = 1e-4;
/// Final adapter weights vs the reference: max abs error relative to each tensor's max magnitude.
const FINAL_WEIGHT_REL_TOL: f32 = 1e-4;

#[test]
fn ten_steps_match_pytorch_reference_loop() {
    let base = qwen2::load_model::<Ad>(&fixture(), DType::F32, &Default::default())
        .unwrap()
        .model;
    ten_steps(base, "", None);
}

/// The same 10 steps with LoRA+ (every lora_B at 16× the learning rate), against PEFT's
/// `create_loraplus_optimizer`.
#[test]
fn ten_loraplus_steps_match_peft() {
    let base = qwen2::load_model::<Ad>(&fixture(), DType::F32, &Default::default())
        .unwrap()
        .model;
    ten_steps(base, "loraplus-", Some(16.0));
}

/// The same 10 steps from PEFT's DoRA adapter (`tests/fixtures/peft-dora`): every magnitude too.
#[test]
fn ten_dora_steps_match_peft() {
    let base = qwen2::load_model::<Ad>(&fixture(), DType::F32, &Default::default())
        .unwrap()
        .model;
    ten_steps(base, "dora-", None);
}

/// The same 10 steps from PEFT's adapter with `modules_to_save = ["lm_head", "embed_tokens"]`:
/// the head and the embedding train in full.
#[test]
fn ten_modules_to_save_steps_match_peft() {
    let base = qwen2::load_model::<Ad>(&fixture(), DType::F32, &Default::default())
        .unwrap()
        .model;
    ten_steps(base, "modules-to-save-", None);
}

/// The same 10 steps from PEFT's adapter with `trainable_token_indices = [1, 5, 7, 200]`.
#[test]
fn ten_trainable_tokens_steps_match_peft() {
    let base = qwen2::load_model::<Ad>(&fixture(), DType::F32, &Default::default())
        .unwrap()
        .model;
    ten_steps(base, "trainable-tokens-", None);
}

/// The same 10 steps from PEFT's PiSSA and OLoRA adapters: loading re-runs the init on the base
/// (the residual), on both sides.
#[test]
fn ten_pissa_and_olora_steps_match_peft() {
    for prefix in ["pissa-", "olora-"] {
        let base = qwen2::load_model::<Ad>(&fixture(), DType::F32, &Default::default())
            .unwrap()
            .model;
        ten_steps(base, prefix, None);
    }
}

/// The same 10 steps from PEFT's `lora_bias` adapter (`tests/fixtures/peft-lora-bias`).
#[test]
fn ten_lora_bias_steps_match_peft() {
    let base = qwen2::load_model::<Ad>(&fixture(), DType::F32, &Default::default())
        .unwrap()
        .model;
    ten_steps(base, "lora-bias-", None);
}

/// The same 10 steps as QLoRA: the base's projections in NF4 with double quantization, against
/// PEFT on transformers' bitsandbytes 4-bit load (`scripts/make_train_fixtures.py`).
#[test]
fn ten_qlora_steps_match_peft_with_bitsandbytes() {
    let q = qwen2::Load4bit {
        quant_type: kernels::quant::Kind::Nf4,
        double_quant: true,
        compute_dtype: DType::F32,
    };
    let base = qwen2::load_model_4bit::<Ad>(&fixture(), q, &Default::default())
        .unwrap()
        .model;
    ten_steps(base, "qlora-", None);
}

fn ten_steps(base: Qwen2ForCausalLM<Ad>, prefix: &str, loraplus_lr_ratio: Option<f64>) {
    let _rng = rng_lock();
    let dir = fixtures().join("train-tiny");
    let ex: Vec<Example> = read_json(&dir.join("examples.json"));
    let want: serde_json::Value = read_json(&dir.join(format!("{prefix}losses.json")));
    // The DoRA and lora_bias runs start from their own PEFT adapters; the others from the plain one.
    let adapter = match prefix {
        "dora-" | "lora-bias-" | "modules-to-save-" | "trainable-tokens-" | "pissa-" | "olora-" => {
            format!("peft-{}", prefix.trim_end_matches('-'))
        }
        _ => "peft-tiny-untied".to_string(),
    };
    let (m, cfg, _) = lora_core::load_adapter(base, &fixtures().join(adapter)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let a = TrainingArguments {
        output_dir: tmp.path().to_path_buf(),
        per_device_train_batch_size: 2,
        gradient_accumulation_steps: 2,
        learning_rate: 1e-3,
        warmup_steps: 2,
        max_steps: Some(10),
        max_grad_norm: 1.0,
        loraplus_lr_ratio,
        shuffle: false,
        save_steps: 0,
        logging_steps: 1,
        ..TrainingArguments::default()
    };
    let mut norms = Vec::new();
    let mut cb = |e: &TrainEvent| {
        if let TrainEvent::Log(l) = e {
            norms.push(l.grad_norm);
        }
        true
    };
    let (m, out) = train(
        m,
        &cfg,
        &ex,
        &[],
        Collator::new(0),
        &a,
        &Default::default(),
        &mut cb,
    )
    .unwrap();
    let mut worst_loss = 0f64;
    for (i, (got, want)) in out
        .state
        .step_losses
        .iter()
        .zip(want["loss"].as_array().unwrap())
        .enumerate()
    {
        let want = want.as_f64().unwrap();
        let rel = (got - want).abs() / want.abs();
        assert!(
            rel <= STEP_LOSS_REL_TOL,
            "step {}: loss {got} vs PyTorch {want} (rel {rel:e})",
            i + 1
        );
        worst_loss = worst_loss.max(rel);
    }
    for (i, (got, want)) in norms
        .iter()
        .zip(want["grad_norm"].as_array().unwrap())
        .enumerate()
    {
        let want = want.as_f64().unwrap();
        assert!(
            (got - want).abs() / want <= 1e-4,
            "step {}: grad norm {got} vs {want}",
            i + 1
        );
    }
    let reference = read_reference(&dir.join(format!("{prefix}reference.safetensors")));
    let mut worst_w = 0f32;
    let finals = reference.keys().filter(|k| k.starts_with("final.")).count();
    assert_eq!(
        values_for(&m, &cfg).len(),
        finals,
        "every trained parameter is compared"
    );
    for (path, v) in values_for(&m, &cfg) {
        let err = max_rel_err(&v, &reference[&format!("final.{path}")].f32);
        // The k_proj biases of lora_bias: RoPE nearly cancels a bias added to every key (a
        // constant shift of a query's scores), so some of their gradient elements are ~1e-6 of the
        // largest, float noise on both sides, and Adam's normalization turns that noise into
        // updates of ordinary size (observed up to 3.2e-4; every other parameter of the run within 1e-5).
        let tol = if path.ends_with("k_proj.lora_B.bias") {
            5e-4
        } else {
            FINAL_WEIGHT_REL_TOL
        };
        assert!(
            err <= tol,
            "{path}: final weights differ by {err:e} (relative)"
        );
        if err > 1e-5 {
            println!("{prefix}{path}: {err:.2e}");
        }
        worst_w = worst_w.max(err);
    }
    println!("{prefix}10 steps vs PyTorch: worst step-loss rel error {worst_loss:.2e}, worst final-weight rel error {worst_w:.2e}");
}

#[test]
fn eval_runs_every_eval_steps_and_at_the_end() {
    let _rng = rng_lock();
    let cfg = lora_cfg(0.0);
    let tmp = tempfile::tempdir().unwrap();
    let (train_ex, eval_ex) = (examples(8), examples(11)[8..].to_vec());
    let a = TrainingArguments {
        eval_steps: Some(2),
        max_steps: Some(5),
        save_steps: 0,
        ..args(tmp.path())
    };
    let mut evals = Vec::new();
    let mut cb = |e: &TrainEvent| {
        if let TrainEvent::Eval(x) = e {
            evals.push(x.clone());
        }
        true
    };
    let m0 = model(&cfg);
    // An evaluation recomputed by hand: total token loss / supervised tokens of the eval set.
    let inner = burn::module::AutodiffModule::valid(&m0);
    let direct = lora_trainer::evaluate(
        |b| lora_trainer::CausalLm::loss_sum(&inner, b),
        &eval_ex,
        &Collator::new(0),
        1,
        &Default::default(),
    );
    let batched = lora_trainer::evaluate(
        |b| lora_trainer::CausalLm::loss_sum(&inner, b),
        &eval_ex,
        &Collator::new(0),
        3,
        &Default::default(),
    );
    let n: usize = eval_ex
        .iter()
        .map(|e| e.labels[1..].iter().filter(|&&l| l != -100).count())
        .sum();
    assert_eq!(direct.supervised_tokens, n);
    assert!(
        (direct.loss - batched.loss).abs() <= 1e-6 * direct.loss,
        "batching changed the eval loss"
    );
    assert!((direct.perplexity - direct.loss.exp()).abs() < 1e-9);
    train(
        m0,
        &cfg,
        &train_ex,
        &eval_ex,
        Collator::new(0),
        &a,
        &Default::default(),
        &mut cb,
    )
    .unwrap();
    assert_eq!(evals.iter().map(|e| e.step).collect::<Vec<_>>(), [2, 4, 5]);
    let metrics = std::fs::read_to_string(tmp.path().join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.matches("eval_loss").count(), 3);
    let svg = std::fs::read_to_string(tmp.path().join("loss.svg")).unwrap();
    assert!(svg.contains("train loss") && svg.contains("eval loss") && svg.contains("<polyline"));
}

/// Gradient checkpointing changes memory, not numbers: the same loss, gradients and run, bit for
/// bit, with dropout off and with the tutorial's dropout 0.1 (the recompute replays each layer's
/// masks, and the plain path seeds each layer as the recompute does).
#[test]
fn gradient_checkpointing_gives_the_same_gradients_and_run() {
    use lora_trainer::TrainableLm;
    let _rng = rng_lock();
    for dropout in [0.0, 0.1] {
        let cfg = lora_cfg(dropout);
        let m = model(&cfg);
        let ex = examples(4);
        let refs: Vec<&Example> = ex.iter().collect();
        let batch = Collator::new(0).collate::<Ad>(&refs, &Default::default());
        let (v0, mut g0) = m.loss_and_grads(&batch, 10.0, false, 7);
        let (v1, mut g1) = m.loss_and_grads(&batch, 10.0, true, 7);
        assert_eq!(
            v0.to_bits(),
            v1.to_bits(),
            "dropout {dropout}: loss {v0} vs {v1}"
        );
        let (n, worst) = compare_adapter_grads(&m, &mut g0, &mut g1, 0.0, "checkpointed");
        assert_eq!(n, 28);
        println!("dropout {dropout}: checkpointed vs plain: {n} gradients, worst {worst:e}");

        let tmp = tempfile::tempdir().unwrap();
        let plain = TrainingArguments {
            max_steps: Some(3),
            save_steps: 0,
            logging_steps: 1,
            ..args(tmp.path())
        };
        let ckpt = TrainingArguments {
            gradient_checkpointing: true,
            overwrite_output_dir: true, // the same directory as the plain run
            ..plain.clone()
        };
        let (_, a) = run(&cfg, &examples(8), &plain, None).unwrap();
        let (_, b) = run(&cfg, &examples(8), &ckpt, None).unwrap();
        assert_eq!(
            a.state.step_losses, b.state.step_losses,
            "dropout {dropout}: step losses"
        );
        let norms = |o: &lora_trainer::TrainOutcome| -> Vec<f64> {
            o.state.log_history.iter().map(|l| l.grad_norm).collect()
        };
        assert_eq!(norms(&a), norms(&b), "dropout {dropout}: gradient norms");
    }
}

/// The training step scores the head in chunks of `TRAIN_HEAD_CHUNK_ROWS` supervised rows and
/// back-propagates each chunk at once; with 560 supervised rows (3 chunks) its loss and adapter
/// gradients equal one plain backward through the whole head. Two heads: a frozen `lm_head` (the
/// gradient written out) and one with an adapter of its own (each chunk through autodiff).
#[test]
fn chunked_head_gives_the_gradients_of_one_backward() {
    use lora_core::ModuleSelector;
    let _rng = rng_lock();
    let frozen = lora_cfg(0.0);
    let mut adapted = lora_cfg(0.0);
    let mut targets = lora_trainer::recipe::TUTORIAL_TARGETS
        .map(String::from)
        .to_vec();
    targets.push("lm_head".into());
    adapted.target_modules = Some(ModuleSelector::List(targets));
    assert_eq!(check_chunked_head(&frozen), 28);
    assert_eq!(check_chunked_head(&adapted), 30);
}

fn check_chunked_head(cfg: &LoraConfig) -> usize {
    use lora_trainer::{plain_loss_and_grads, TrainableLm, TRAIN_HEAD_CHUNK_ROWS};
    let m = model(cfg);
    let mut s = 99u64;
    let ex: Vec<Example> = (0..2).map(|_| toy_example(&mut s, 300, 20)).collect();
    let supervised = 2 * (300 - 20);
    assert!(
        supervised > 2 * TRAIN_HEAD_CHUNK_ROWS,
        "the batch must span 3 chunks"
    );
    let refs: Vec<&Example> = ex.iter().collect();
    let batch = Collator::new(0).collate::<Ad>(&refs, &Default::default());
    let norm = supervised as f64;
    let (v0, mut g0) = plain_loss_and_grads(&m, &batch, norm);
    let (v1, mut g1) = m.loss_and_grads(&batch, norm, false, 0);
    assert!((v0 - v1).abs() <= 1e-6 * v0.abs(), "loss {v0} vs {v1}");
    let (n, worst) = compare_adapter_grads(&m, &mut g0, &mut g1, 1e-5, "chunked-head");
    assert!(
        g1.is_empty(),
        "gradients for parameters other than the adapters"
    );
    println!("chunked head vs one backward: loss {v0} / {v1}, {n} gradients, worst {worst:e}");
    n
}

#[test]
fn bf16_base_trains_with_f32_adapters() {
    let _rng = rng_lock();
    let cfg = lora_cfg(0.0);
    let ex = examples(8);
    let tmp = tempfile::tempdir().unwrap();
    let a = TrainingArguments {
        max_steps: Some(2),
        save_steps: 0,
        shuffle: false,
        ..args(tmp.path())
    };
    let build = |dtype: DType| {
        use burn::tensor::backend::Backend;
        Ad::seed(&Default::default(), 1);
        let base = qwen2::load_model::<Ad>(&fixture(), dtype, &Default::default())
            .unwrap()
            .model;
        apply_lora(base, &cfg).unwrap().0
    };
    let mut cb = |_: &TrainEvent| true;
    let (m16, o16) = train(
        build(DType::BF16),
        &cfg,
        &ex,
        &[],
        Collator::new(0),
        &a,
        &Default::default(),
        &mut cb,
    )
    .unwrap();
    let (_, o32) = train(
        build(DType::F32),
        &cfg,
        &ex,
        &[],
        Collator::new(0),
        &TrainingArguments {
            overwrite_output_dir: true, // the bf16 run's directory
            ..a.clone()
        },
        &Default::default(),
        &mut cb,
    )
    .unwrap();
    let q = &m16.model.layers[0].self_attn.q_proj;
    assert_eq!(q.weight.val().dtype(), DType::BF16, "base stays bf16");
    assert_eq!(
        q.lora_A.as_ref().unwrap().weight.val().dtype(),
        DType::F32,
        "adapters stay f32"
    );
    for (x, y) in o16.state.step_losses.iter().zip(&o32.state.step_losses) {
        assert!(
            x.is_finite() && (x - y).abs() <= 0.02 * y.abs(),
            "bf16 loss {x} vs f32 {y}"
        );
    }
}

/// A padding-free batch (examples back to back in one row) gives the padded batch's hidden
/// states, loss and adapter gradients, with and without gradient checkpointing.
#[test]
fn padding_free_batches_equal_padded_ones() {
    use lora_trainer::TrainableLm;
    let _rng = rng_lock();
    let m = model(&lora_cfg(0.0));
    let mut s = 7u64;
    let ex: Vec<Example> = [9usize, 23, 4, 16]
        .iter()
        .map(|&n| toy_example(&mut s, n, 2))
        .collect();
    let refs: Vec<&Example> = ex.iter().collect();
    let dev = Default::default();
    let padded = Collator::new(0).collate::<Ad>(&refs, &dev);
    let packed = Collator::new(0)
        .with_padding_free(true)
        .collate::<Ad>(&refs, &dev);
    assert_eq!(packed.input_ids.dims(), [1, 52]);

    // Hidden states: each example's rows of the packed row equal its padded row's real positions.
    let hp = m.forward_hidden(
        padded.input_ids.clone(),
        Some(padded.attention_mask.clone()),
        None,
    );
    let hq = m.forward_hidden_packed(packed.input_ids.clone(), packed.seq_lens.as_ref().unwrap());
    let mut start = 0;
    let mut worst = 0f32;
    for (i, e) in ex.iter().enumerate() {
        let n = e.input_ids.len();
        let a = hp.clone().narrow(0, i, 1).narrow(1, 0, n);
        let b = hq.clone().narrow(1, start, n);
        let d = (a - b).abs().max().into_scalar();
        worst = worst.max(d);
        start += n;
    }
    assert!(worst < 5e-5, "hidden states differ by {worst}");

    let norm = ex.iter().map(|e| e.labels.len() - 2).sum::<usize>() as f64;
    for checkpointing in [false, true] {
        let (v0, mut g0) = m.loss_and_grads(&padded, norm, checkpointing, 0);
        let (v1, mut g1) = m.loss_and_grads(&packed, norm, checkpointing, 0);
        assert!((v0 - v1).abs() <= 1e-6 * v0.abs(), "loss {v0} vs {v1}");
        let (n, g) = compare_adapter_grads(&m, &mut g0, &mut g1, 1e-5, "padding-free");
        println!(
            "padding-free vs padded (checkpointing {checkpointing}): hidden {worst:e}, loss {v0} / {v1}, {n} gradients, worst {g:e}"
        );
    }
}

/// A new run into a directory that holds another run's checkpoints is refused, naming what is
/// there; `overwrite_output_dir` replaces that run (its later checkpoints cannot be resumed by
/// mistake); a resume says where it continues from, and refuses a checkpoint past the run's
/// steps, other data or another batch geometry.
#[test]
fn output_directory_runs_do_not_mix() {
    let _rng = rng_lock();
    let cfg = lora_cfg(0.0);
    let ex = examples(10);
    let tmp = tempfile::tempdir().unwrap();
    let first = args(tmp.path()); // 6 steps, checkpoints at 2, 4, 6
    run(&cfg, &ex, &first, None).unwrap();

    let short = TrainingArguments {
        max_steps: Some(2),
        ..args(tmp.path())
    };
    let err = run(&cfg, &ex, &short, None).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, TrainError::OutputDirInUse { .. })
            && msg.contains("checkpoint-6")
            && msg.contains("--overwrite-output-dir"),
        "{msg}"
    );
    assert!(tmp.path().join("checkpoint-6").is_dir(), "nothing removed");

    // Resuming the 6-step run's latest checkpoint into a 2-step run: past its steps.
    let resume = |a: TrainingArguments| TrainingArguments {
        resume_from_checkpoint: Some("latest".into()),
        ..a
    };
    let err = run(&cfg, &ex, &resume(short.clone()), None).unwrap_err();
    assert!(err.to_string().contains("past the 2 steps"), "{err}");

    // Other data, another batch geometry.
    let err = run(&cfg, &examples(9), &resume(first.clone()), None).unwrap_err();
    assert!(err.to_string().contains("training data"), "{err}");
    let wider = TrainingArguments {
        gradient_accumulation_steps: 1,
        ..first.clone()
    };
    let err = run(&cfg, &ex, &resume(wider), None).unwrap_err();
    assert!(
        err.to_string().contains("gradient_accumulation_steps"),
        "{err}"
    );

    // The same settings resume, and say from where.
    let mut resumed_from = None;
    train(
        model(&cfg),
        &cfg,
        &ex,
        &[],
        Collator::new(0),
        &TrainingArguments {
            resume_from_checkpoint: Some(
                tmp.path()
                    .join("checkpoint-4")
                    .to_string_lossy()
                    .into_owned(),
            ),
            ..first.clone()
        },
        &Default::default(),
        &mut |e: &TrainEvent| {
            if let TrainEvent::Resumed { checkpoint, step } = e {
                resumed_from = Some((checkpoint.clone(), *step));
            }
            true
        },
    )
    .unwrap();
    assert_eq!(resumed_from, Some((tmp.path().join("checkpoint-4"), 4)));

    // Overwriting: the old run's checkpoints and log are gone, the new run's are there.
    let over = TrainingArguments {
        overwrite_output_dir: true,
        ..short
    };
    let (_, o) = run(&cfg, &ex, &over, None).unwrap();
    assert_eq!(o.state.global_step, 2);
    assert!(!tmp.path().join("checkpoint-6").exists());
    assert!(tmp.path().join("checkpoint-2").is_dir());
    let log = std::fs::read_to_string(tmp.path().join("metrics.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 1, "{log}");
}

/// With `modules_to_save` the head and the embedding train, and with `trainable_token_indices`
/// rows of the embedding: gradient checkpointing (which carries the first layer's input gradient
/// back into the embedding by hand) gives the run of the plain backward.
#[test]
fn trained_embeddings_train_the_same_with_and_without_checkpointing() {
    let _rng = rng_lock();
    for tokens in [false, true] {
        let mut cfg = lora_cfg(0.1);
        // Ids the examples use (an absent token's row gets no gradient).
        let mut ids: Vec<usize> = examples(8)[0]
            .input_ids
            .iter()
            .map(|&i| i as usize)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.truncate(3);
        if tokens {
            cfg.set_trainable_token_indices(Some(&ids));
        } else {
            cfg.modules_to_save = Some(vec!["lm_head".into(), "embed_tokens".into()]);
        }
        let tmp = tempfile::tempdir().unwrap();
        let plain = TrainingArguments {
            max_steps: Some(3),
            save_steps: 0,
            logging_steps: 1,
            ..args(tmp.path())
        };
        let ckpt = TrainingArguments {
            gradient_checkpointing: true,
            overwrite_output_dir: true,
            ..plain.clone()
        };
        let (ma, a) = run(&cfg, &examples(8), &plain, None).unwrap();
        let (mb, b) = run(&cfg, &examples(8), &ckpt, None).unwrap();
        assert_eq!(a.state.step_losses, b.state.step_losses);
        let (va, vb) = (values_for(&ma, &cfg), values_for(&mb, &cfg));
        assert_eq!(va.len(), 28 + if tokens { 1 } else { 2 });
        for ((path, x), (_, y)) in va.iter().zip(&vb) {
            let err = max_rel_err(x, y);
            assert!(err <= 1e-6, "{path}: checkpointed run differs by {err:e}");
        }
        // The trained modules moved from the base's values.
        let base = model(&lora_cfg(0.0));
        let e0 = base.model.embed_tokens.weight.val();
        let moved = |p: &str| va.iter().find(|(k, _)| k == p).unwrap().1.clone();
        if tokens {
            let idx: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
            let idx = burn::tensor::Tensor::<Ad, 1, burn::tensor::Int>::from_data(
                burn::tensor::TensorData::new(idx, [3]),
                &Default::default(),
            );
            let rows = e0.select(0, idx).into_data().to_vec::<f32>().unwrap();
            let path = "model.embed_tokens.token_adapter.trainable_tokens_delta";
            assert!(max_rel_err(&moved(path), &rows) > 1e-6);
        } else {
            let h0 = base.lm_head.as_ref().unwrap().weight.val();
            let h0 = h0.into_data().to_vec::<f32>().unwrap();
            assert!(max_rel_err(&moved("lm_head.weight"), &h0) > 1e-6);
            let e0 = e0.into_data().to_vec::<f32>().unwrap();
            assert!(max_rel_err(&moved("model.embed_tokens.weight"), &e0) > 1e-6);
        }
    }
}
