//! Faults in the middle of a run, on the tiny fixture model:
//! - a NaN loss or an Inf gradient injected at step k (a wrapper around the real model) stops the
//!   run naming step k, before the bad update reaches the weights: the checkpoints written before k
//!   are finite and complete, `latest` is one of them, and resuming from it reproduces an
//!   uninterrupted run bitwise;
//! - a full device (a real tmpfs with every amount of free space from none up to what the run
//!   needs) stops the run with a "no space left" error naming the file, wherever the write failed
//!   (metrics, adapter weights, adapter config, optimizer state, trainer state, final adapter,
//!   plot); the complete checkpoints stay loadable, no partial file is left, and resuming once
//!   space is freed reproduces an uninterrupted run bitwise.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use burn::backend::Flex;
use burn::module::{AutodiffModule, Devices, Module, ModuleMapper, ModuleVisitor};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, ElementConversion, Tensor};
use lora_core::{param_id, LoraConfig, LoraLinear, LoraModel};
use lora_data::{Batch, Collator};
use lora_trainer::checkpoint::{checkpoints, read_state, resolve_resume};
use lora_trainer::{train, CausalLm, TrainError, TrainEvent, TrainableLm, TrainingArguments};
use qwen2::Qwen2ForCausalLM;

mod common;
use common::{examples, fixture, model, Ad};
use test_support::tmpfs::{assert_no_partial_files, page_size, pages, walk, Tmpfs};
use test_support::{read_reference, rng_lock};

fn lora_cfg() -> LoraConfig {
    LoraConfig {
        lora_dropout: 0.1, // dropout on: a resume must replay the RNG too
        init_lora_weights: lora_core::InitLoraWeights::Bool(false),
        ..lora_trainer::recipe::lora_config()
    }
}

/// A small adapter (r 2 on q, v: each checkpoint file fits in one page), for the disk-full sweep.
fn small_lora_cfg() -> LoraConfig {
    let mut c: LoraConfig = serde_json::from_str(
        r#"{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}"#,
    )
    .unwrap();
    c.lora_dropout = 0.1;
    c.init_lora_weights = lora_core::InitLoraWeights::Bool(false);
    c
}

/// One micro-batch per step, so the wrapper's call count is the step number.
fn args(dir: &Path) -> TrainingArguments {
    TrainingArguments {
        output_dir: dir.to_path_buf(),
        per_device_train_batch_size: 2,
        gradient_accumulation_steps: 1,
        learning_rate: 1e-3,
        max_steps: Some(6),
        logging_steps: 1,
        save_steps: 2,
        seed: 3,
        ..TrainingArguments::default()
    }
}

fn run<M: TrainableLm<Ad>>(
    m: M,
    cfg: &LoraConfig,
    a: &TrainingArguments,
) -> Result<(M, lora_trainer::TrainOutcome), TrainError> {
    let mut cb = |_: &TrainEvent| true;
    train(
        m,
        cfg,
        &examples(12),
        &[],
        Collator::new(0),
        a,
        &Default::default(),
        &mut cb,
    )
}

// ---------------------------------------------------------------------------------------------
// The poisoning wrapper.

/// What to inject, at which call of `loss_and_grads` (1-based; = the step with accumulation 1).
#[derive(Debug, Clone, Copy)]
enum Poison {
    /// The loss tensor times NaN before backward (so its gradients are NaN too).
    Loss(usize),
    /// A finite loss, but one element of one adapter gradient set to +Inf.
    Grad(usize),
    Nothing,
}

/// The real model, transparently: visit/map/records go straight to it (no extra path segment), so
/// parameter paths, ids and saved adapters are exactly the wrapped model's.
#[derive(Debug, Clone)]
struct Poisoned<B: Backend> {
    inner: Qwen2ForCausalLM<B>,
    poison: Poison,
    calls: Arc<AtomicUsize>,
}

impl<B: Backend> Poisoned<B> {
    fn new(inner: Qwen2ForCausalLM<B>, poison: Poison) -> Self {
        Self {
            inner,
            poison,
            calls: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl<B: Backend> Module<B> for Poisoned<B> {
    type Record = <Qwen2ForCausalLM<B> as Module<B>>::Record;

    fn collect_devices(&self, devices: Devices<B>) -> Devices<B> {
        self.inner.collect_devices(devices)
    }
    fn fork(self, device: &B::Device) -> Self {
        Self {
            inner: self.inner.fork(device),
            ..self
        }
    }
    fn to_device(self, device: &B::Device) -> Self {
        Self {
            inner: self.inner.to_device(device),
            ..self
        }
    }
    fn visit<V: ModuleVisitor<B>>(&self, visitor: &mut V) {
        self.inner.visit(visitor)
    }
    fn map<M: ModuleMapper<B>>(self, mapper: &mut M) -> Self {
        Self {
            inner: self.inner.map(mapper),
            ..self
        }
    }
    fn load_record(self, record: Self::Record) -> Self {
        Self {
            inner: self.inner.load_record(record),
            ..self
        }
    }
    fn into_record(self) -> Self::Record {
        self.inner.into_record()
    }
}

impl<B: AutodiffBackend> AutodiffModule<B> for Poisoned<B> {
    type InnerModule = Qwen2ForCausalLM<B::InnerBackend>;

    fn valid(&self) -> Self::InnerModule {
        self.inner.valid()
    }
    fn from_inner(module: Self::InnerModule) -> Self {
        Self::new(Qwen2ForCausalLM::from_inner(module), Poison::Nothing)
    }
}

impl<B: Backend> LoraModel<B> for Poisoned<B> {
    fn lora_linears(&mut self) -> Vec<(String, &mut LoraLinear<B>)> {
        self.inner.lora_linears()
    }
    fn output_head(&self) -> Option<String> {
        self.inner.output_head()
    }
}

impl<B: Backend> CausalLm<B> for Poisoned<B> {
    fn loss_sum(&self, batch: &Batch<B>) -> Tensor<B, 1> {
        self.inner.loss_sum(batch)
    }
}

/// The adapter gradient the `Grad` poison corrupts.
const POISONED_PARAM: &str = "model.layers.1.mlp.down_proj.lora_B.weight";

impl<B: AutodiffBackend> TrainableLm<B> for Poisoned<B> {
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
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        match self.poison {
            Poison::Loss(at) if call == at => {
                let loss = self
                    .inner
                    .loss_sum(batch)
                    .div_scalar(norm)
                    .mul_scalar(f32::NAN);
                let value = loss.clone().into_scalar().elem::<f64>();
                (
                    value,
                    GradientsParams::from_grads(loss.backward(), &self.inner),
                )
            }
            Poison::Grad(at) if call == at => {
                let (value, mut grads) =
                    self.inner.loss_and_grads(batch, norm, checkpointing, seed);
                let id = param_id(POISONED_PARAM);
                let g: Tensor<B::InnerBackend, 2> = grads.remove(id).expect("adapter gradient");
                let inf = Tensor::full([1, 1], f32::INFINITY, &g.device());
                grads.register(id, g.slice_assign([0..1, 0..1], inf));
                (value, grads)
            }
            _ => self.inner.loss_and_grads(batch, norm, checkpointing, seed),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What a stopped run must leave.

/// After a run that failed: exactly the checkpoints `want` exist, complete (state, optimizer,
/// adapter that loads into the model, all finite), `latest` is the newest, nothing partial or
/// temporary is left, and no adapter anywhere holds NaN/Inf.
fn assert_intact(out: &Path, want: &[usize], cfg: &LoraConfig) {
    let have: Vec<usize> = checkpoints(out).into_iter().map(|(s, _)| s).collect();
    assert_eq!(have, want, "complete checkpoints in {}", out.display());
    assert_no_partial_files(out);
    for p in walk(out) {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") {
            // Adapters are f32.
            let tensors = read_reference(&p).into_values();
            let finite = tensors.flat_map(|t| t.f32).all(|x| x.is_finite());
            assert!(finite, "{} holds NaN/Inf", p.display());
        }
    }
    for (step, dir) in checkpoints(out) {
        let state = read_state(&dir).unwrap();
        assert_eq!(state.global_step, step);
        assert_eq!(state.step_losses.len(), step);
        assert!(state.step_losses.iter().all(|l| l.is_finite()));
        assert!(dir.join("optimizer.bin").is_file(), "{}", dir.display());
        let base = qwen2::load_model::<Flex>(&fixture(), DType::F32, &Default::default())
            .unwrap()
            .model;
        let (_, loaded, _) = lora_core::load_adapter(base, &dir)
            .unwrap_or_else(|e| panic!("{} does not load: {e}", dir.display()));
        assert_eq!(loaded.r, cfg.r);
    }
    match want.last() {
        Some(last) => assert_eq!(
            resolve_resume("latest", out).unwrap(),
            out.join(format!("checkpoint-{last}"))
        ),
        None => assert!(resolve_resume("latest", out).is_err()),
    }
}

/// A clean run's per-step losses and final adapter bytes.
fn clean_run(cfg: &LoraConfig, a: &TrainingArguments) -> (Vec<f64>, Vec<u8>) {
    let (_, o) = run(model(cfg), cfg, a).unwrap();
    let bytes = std::fs::read(a.output_dir.join("adapter_model.safetensors")).unwrap();
    (o.state.step_losses, bytes)
}

/// Resumes `a.output_dir` from `latest` (or, when it holds no checkpoint, starts again over what
/// the failed run left) with a clean model and checks the result equals the uninterrupted run
/// bitwise.
fn assert_resumes_to(cfg: &LoraConfig, a: &TrainingArguments, want: &(Vec<f64>, Vec<u8>)) {
    let resume = !checkpoints(&a.output_dir).is_empty();
    let a = TrainingArguments {
        resume_from_checkpoint: resume.then(|| "latest".to_string()),
        overwrite_output_dir: !resume,
        ..a.clone()
    };
    let (_, o) = run(model(cfg), cfg, &a).unwrap();
    assert_eq!(o.state.step_losses, want.0, "per-step losses after resume");
    let bytes = std::fs::read(a.output_dir.join("adapter_model.safetensors")).unwrap();
    assert!(bytes == want.1, "final adapter differs after resume");
}

// ---------------------------------------------------------------------------------------------
// NaN / Inf.

#[test]
fn nan_loss_mid_run_stops_at_that_step_and_keeps_earlier_checkpoints() {
    let _rng = rng_lock();
    let cfg = lora_cfg();
    let clean_dir = tempfile::tempdir().unwrap();
    let clean = clean_run(&cfg, &args(clean_dir.path()));

    let tmp = tempfile::tempdir().unwrap();
    let a = args(tmp.path());
    let e = run(Poisoned::new(model(&cfg), Poison::Loss(5)), &cfg, &a).unwrap_err();
    let msg = e.to_string();
    println!("{msg}");
    assert!(
        matches!(&e, TrainError::NonFinite { step: 5, what, value, .. } if what == "loss" && value.is_nan()),
        "{msg}"
    );
    assert!(
        msg.contains("step 5: the loss is NaN")
            && msg.contains(&tmp.path().join("checkpoint-4").display().to_string()),
        "{msg}"
    );
    assert_intact(tmp.path(), &[2, 4], &cfg);
    assert!(!tmp.path().join("adapter_model.safetensors").exists());
    // Steps 1-4 ran exactly as the clean run's, and resuming completes it bitwise.
    let state = read_state(&tmp.path().join("checkpoint-4")).unwrap();
    assert_eq!(state.step_losses, clean.0[..4]);
    assert_resumes_to(&cfg, &a, &clean);
}

#[test]
fn inf_gradient_mid_run_stops_at_that_step_with_or_without_clipping() {
    let _rng = rng_lock();
    let cfg = lora_cfg();
    let clean_dir = tempfile::tempdir().unwrap();
    let clean = clean_run(&cfg, &args(clean_dir.path()));
    // max_grad_norm 0 turns clipping off; the norm must still be computed and checked.
    for max_grad_norm in [1.0, 0.0] {
        let tmp = tempfile::tempdir().unwrap();
        let a = TrainingArguments {
            max_grad_norm,
            ..args(tmp.path())
        };
        let e = run(Poisoned::new(model(&cfg), Poison::Grad(3)), &cfg, &a).unwrap_err();
        let msg = e.to_string();
        println!("max_grad_norm {max_grad_norm}: {msg}");
        assert!(
            matches!(&e, TrainError::NonFinite { step: 3, what, value, .. } if what == "gradient norm" && value.is_infinite()),
            "max_grad_norm {max_grad_norm}: {msg}"
        );
        assert!(
            msg.contains("step 3: the gradient norm is inf")
                && msg.contains(&tmp.path().join("checkpoint-2").display().to_string()),
            "{msg}"
        );
        assert_intact(tmp.path(), &[2], &cfg);
        assert!(!tmp.path().join("adapter_model.safetensors").exists());
        if max_grad_norm > 0.0 {
            assert_resumes_to(&cfg, &a, &clean);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Disk full, on a real tmpfs.

#[test]
fn disk_full_at_any_write_keeps_the_last_checkpoint_and_resumes() {
    let page = page_size();
    // Skip (or fail under CI) before any work when mounting is impossible here.
    if Tmpfs::mount(page).is_none() {
        return;
    }
    let _rng = rng_lock();
    let cfg = small_lora_cfg();
    let a = |dir: &Path| TrainingArguments {
        max_steps: Some(3),
        save_steps: 1,
        ..args(dir)
    };
    let clean_dir = tempfile::tempdir().unwrap();
    let clean = clean_run(&cfg, &a(clean_dir.path()));
    let need = pages(clean_dir.path(), page);
    let total = need + 4;
    let fs = Tmpfs::mount(total * page).expect("mounted a moment ago");
    let (out, filler) = (fs.path().join("out"), fs.path().join("filler"));

    // Every amount of free space from none up to the whole run (a filler file takes the rest):
    // each run fails at a different write.
    let mut failed_files = BTreeSet::new();
    let mut ok_at = None;
    for n in 0..=need {
        if out.exists() {
            std::fs::remove_dir_all(&out).unwrap();
        }
        std::fs::write(&filler, vec![1u8; ((total - n) * page) as usize]).unwrap();
        let a = a(&out);
        let e = match run(model(&cfg), &cfg, &a) {
            Ok(_) => {
                ok_at = Some(n);
                break;
            }
            Err(e) => e,
        };
        let msg = e.to_string();
        let TrainError::NoSpace {
            path,
            last_checkpoint,
            ..
        } = &e
        else {
            panic!("{n} pages: not a disk-full error: {msg}");
        };
        assert!(
            path.starts_with(&out),
            "{n} pages: {msg} names a file outside the output"
        );
        assert!(
            msg.starts_with(&format!(
                "no space left on device while writing {}: free space and resume with --resume-from-checkpoint latest; the last complete checkpoint is ",
                path.display()
            )),
            "{msg}"
        );
        let have: Vec<usize> = checkpoints(&out).into_iter().map(|(s, _)| s).collect();
        match have.last() {
            Some(s) => assert_eq!(
                *last_checkpoint,
                out.join(format!("checkpoint-{s}")).display().to_string()
            ),
            None => assert!(last_checkpoint.starts_with("none"), "{msg}"),
        }
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let in_checkpoint = path.parent() != Some(out.as_path());
        failed_files.insert(format!(
            "{}{file}",
            if in_checkpoint { "checkpoint/" } else { "" }
        ));
        println!("{n:>3} pages free: {} ({have:?} complete)", path.display());
        assert_eq!(have, (1..=have.len()).collect::<Vec<_>>(), "{n} pages");
        assert_intact(&out, &have, &cfg);
        if in_checkpoint {
            assert!(!out.join("adapter_model.safetensors").exists());
        }
        // metrics.jsonl holds whole lines only.
        if let Ok(m) = std::fs::read_to_string(out.join("metrics.jsonl")) {
            for line in m.lines() {
                serde_json::from_str::<serde_json::Value>(line)
                    .unwrap_or_else(|e| panic!("{n} pages: metrics line {line:?}: {e}"));
            }
            assert!(m.is_empty() || m.ends_with('\n'));
        }
        // Free space, resume: the uninterrupted run's result, bitwise.
        std::fs::remove_file(&filler).unwrap();
        assert_resumes_to(&cfg, &a, &clean);
    }
    println!("failed writes: {failed_files:?}; the run fits in {ok_at:?} pages (measured {need})");
    assert!(ok_at.is_some(), "the run never fitted in {need} pages");
    for f in [
        "metrics.jsonl",
        "checkpoint/adapter_model.safetensors",
        "checkpoint/adapter_config.json",
        "checkpoint/optimizer.bin",
        "checkpoint/trainer_state.json",
        "adapter_model.safetensors",
        "trainer_state.json",
    ] {
        assert!(
            failed_files.contains(f),
            "no size made the write of {f} fail: {failed_files:?}"
        );
    }
}
