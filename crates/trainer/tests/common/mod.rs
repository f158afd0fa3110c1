//! Helpers shared by the trainer's integration tests: the tiny fixture model, toy examples, and
//! comparing adapter gradients (the RNG lock and the comparisons are in `test-support`).
#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use lora_core::{adapter_tensors, apply_lora, LoraConfig};
use lora_data::Example;
use qwen2::Qwen2ForCausalLM;
use test_support::max_rel_err;

pub type Ad = Autodiff<Flex>;

/// The tiny fixture model the tests train.
pub fn fixture() -> PathBuf {
    test_support::fixtures().join("tiny-untied-f32-sharded")
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
        let err = max_rel_err(&take(got), &take(want));
        assert!(
            err <= tol,
            "{path}: {what} gradient differs by {err:e} (relative)"
        );
        worst = worst.max(err);
        n += 1;
    }
    (n, worst)
}
