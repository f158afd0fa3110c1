//! Helpers shared by the trainer's integration tests: the tiny fixture model, toy examples, the RNG
//! lock, and comparing adapter gradients.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use lora_core::{adapter_tensors, apply_lora, LoraConfig};
use lora_data::Example;
use qwen2::Qwen2ForCausalLM;

pub type Ad = Autodiff<Flex>;

/// Burn's CPU RNG is one global stream: tests that seed it and draw from it (adapter init, dropout)
/// must not interleave, so each takes this lock (one per test binary, which is one process).
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-untied-f32-sharded")
}

/// The tiny fixture with adapters from `cfg`, the RNG seeded first.
pub fn model(cfg: &LoraConfig) -> Qwen2ForCausalLM<Ad> {
    Ad::seed(&Default::default(), 1);
    let base = qwen2::load_model::<Ad>(&fixture(), DType::F32, &Default::default())
        .unwrap()
        .model;
    apply_lora(base, cfg).unwrap().0
}

/// One toy record of `len` tokens from the 256-token fixture vocabulary (drawn from the LCG state
/// `s`); the first `prompt` labels are -100.
pub fn toy_example(s: &mut u64, len: usize, prompt: usize) -> Example {
    let ids: Vec<u32> = (0..len)
        .map(|_| {
            *s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            1 + ((*s >> 33) % 255) as u32
        })
        .collect();
    let labels = ids
        .iter()
        .enumerate()
        .map(|(j, &t)| if j < prompt { -100 } else { t as i64 })
        .collect();
    Example {
        attention_mask: vec![1; len],
        input_ids: ids,
        labels,
    }
}

/// Deterministic toy examples of 6-14 tokens: the first 3 tokens are prompt.
pub fn examples(n: usize) -> Vec<Example> {
    let mut s = 12345u64;
    (0..n)
        .map(|i| toy_example(&mut s, 6 + (i * 5) % 9, 3))
        .collect()
}

/// Largest `|want − got|` relative to the largest `|want|`.
pub fn max_rel_err(want: &[f32], got: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |s, x| s.max(x.abs())).max(1e-12);
    want.iter()
        .zip(got)
        .fold(0f32, |s, (x, y)| s.max((x - y).abs()))
        / scale
}

/// Removes every adapter gradient of `m` from `want` and `got` and asserts each pair agrees within
/// `tol` relative to the largest `want` entry (`what` names the comparison in failures). Returns
/// the number compared and the worst relative difference.
pub fn compare_adapter_grads(
    m: &Qwen2ForCausalLM<Ad>,
    want: &mut GradientsParams,
    got: &mut GradientsParams,
    tol: f32,
    what: &str,
) -> (usize, f32) {
    let mut worst = 0f32;
    let mut n = 0;
    for (path, _) in adapter_tensors(m) {
        let take = |g: &mut GradientsParams| -> Vec<f32> {
            let t: Tensor<Flex, 2> = g
                .remove(lora_core::param_id(&path))
                .unwrap_or_else(|| panic!("no gradient for {path}"));
            t.into_data().to_vec::<f32>().unwrap()
        };
        let err = max_rel_err(&take(want), &take(got));
        assert!(
            err <= tol,
            "{path}: {what} gradient differs by {err:e} (relative)"
        );
        worst = worst.max(err);
        n += 1;
    }
    (n, worst)
}
