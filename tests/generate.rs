//! Generation against transformers: greedy `generate` token ids on the tiny fixtures
//! (`tests/fixtures/generate/reference.json`, written by `scripts/make_generate_fixtures.py`), with
//! and without the PEFT adapter (unmerged and merged); the KV-cache path against the full forward;
//! seeded sampling.

mod common;

use burn::tensor::{DType, Int, Tensor, TensorData};
use common::floats;
use ferrolora::Cpu;
use qwen2::{generate, load_model, GenerationConfig, KvCache, Qwen2ForCausalLM, StopReason};
use test_support::{assert_close, fixtures, read_json, shared_data_or_skip};

fn load(name: &str, adapter: Option<&str>, merge: bool) -> Qwen2ForCausalLM<Cpu> {
    let dev = Default::default();
    let model = load_model::<Cpu>(&fixtures().join(name), DType::F32, &dev)
        .unwrap()
        .model;
    match adapter {
        None => model,
        Some(a) => {
            let (mut m, _, _) = lora_core::load_adapter(model, &fixtures().join(a)).unwrap();
            if merge {
                lora_core::merge_all(&mut m).unwrap();
            }
            m
        }
    }
}

fn greedy(max_new_tokens: usize, repetition_penalty: f32) -> GenerationConfig {
    GenerationConfig {
        do_sample: false,
        max_new_tokens,
        repetition_penalty,
        eos_token_id: vec![],
        ..Default::default()
    }
}

fn ids_u32(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Every case of the reference, 32 new tokens per prompt, two prompts per case; adapter cases both
/// as PEFT's side path (unmerged) and merged into the base weights.
#[test]
fn greedy_generate_equals_transformers_token_for_token() {
    let reference: serde_json::Value = read_json(&fixtures().join("generate/reference.json"));
    let dev = Default::default();
    let mut compared = 0;
    for case in reference["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let adapter = case["adapter"].as_str();
        let cfg = greedy(
            case["max_new_tokens"].as_u64().unwrap() as usize,
            case["repetition_penalty"].as_f64().unwrap() as f32,
        );
        let merges: &[bool] = if adapter.is_some() {
            &[false, true]
        } else {
            &[false]
        };
        for &merge in merges {
            let model = load(case["model"].as_str().unwrap(), adapter, merge);
            for run in case["runs"].as_array().unwrap() {
                let prompt = ids_u32(&run["prompt"]);
                let want = ids_u32(&run["tokens"]);
                let got = generate(&model, &prompt, &cfg, &dev, |_| true);
                let first = got.tokens.iter().zip(&want).position(|(a, b)| a != b);
                assert_eq!(
                    got.tokens, want,
                    "{name} (merged: {merge}), prompt {prompt:?}: first difference at step {first:?}"
                );
                assert_eq!(got.stop, StopReason::MaxNewTokens);
                compared += want.len();
            }
        }
    }
    // 4 cases x 2 prompts x 32 tokens, the 2 adapter cases twice (unmerged, merged).
    assert_eq!(compared, (4 + 2) * 2 * 32);
}

/// Prefill of 5 tokens, then 1 token at a time, then 3 at once: every step's logits equal the
/// full (uncached) forward over the whole sequence at those positions.
#[test]
fn cached_steps_equal_the_full_forward() {
    let dev = Default::default();
    for (name, adapter) in [
        ("tiny-tied-f32", None),
        ("tiny-untied-f32-sharded", Some("peft-tiny-untied")),
    ] {
        let model = load(name, adapter, false);
        let seq: Vec<i64> = (0..12).map(|i| (i * 37 + 11) % 256).collect();
        let full = model.forward(
            Tensor::<Cpu, 2, Int>::from_data(TensorData::new(seq.clone(), [1, 12]), &dev),
            None,
            None,
        );
        let mut cache = KvCache::new(model.model.layers.len());
        let mut at = 0;
        for n in [5usize, 1, 1, 1, 1, 3] {
            let ids = Tensor::<Cpu, 2, Int>::from_data(
                TensorData::new(seq[at..at + n].to_vec(), [1, n]),
                &dev,
            );
            let step = model.logits(model.forward_step(ids, &mut cache));
            let want = full.clone().narrow(1, at, n);
            assert_close(
                &format!("{name}: positions {at}..{}", at + n),
                &floats(step),
                &floats(want),
                1e-5,
            );
            at += n;
            assert_eq!(cache.len(), at);
        }
    }
}

/// A seed fixes the sampled tokens; top-k 1 sampling is greedy; an eos id stops generation
/// right after it is produced.
#[test]
fn sampling_is_seeded_and_eos_stops() {
    let dev = Default::default();
    let model = load("tiny-untied-f32-sharded", Some("peft-tiny-untied"), false);
    let prompt = [3u32, 141, 59, 26];
    let sample = GenerationConfig {
        do_sample: true,
        temperature: 0.7,
        top_k: 20,
        top_p: 0.8,
        repetition_penalty: 1.05,
        max_new_tokens: 24,
        eos_token_id: vec![],
        seed: 1234,
    };
    let a = generate(&model, &prompt, &sample, &dev, |_| true).tokens;
    let b = generate(&model, &prompt, &sample, &dev, |_| true).tokens;
    assert_eq!(a, b, "same seed");
    let top1 = GenerationConfig {
        top_k: 1,
        ..sample.clone()
    };
    let greedy_cfg = GenerationConfig {
        do_sample: false,
        ..sample.clone()
    };
    assert_eq!(
        generate(&model, &prompt, &top1, &dev, |_| true).tokens,
        generate(&model, &prompt, &greedy_cfg, &dev, |_| true).tokens,
        "top-k 1 sampling is greedy"
    );

    let stop_at = a[5];
    let first = a.iter().position(|&t| t == stop_at).unwrap();
    let cfg = GenerationConfig {
        eos_token_id: vec![9999, stop_at],
        ..sample
    };
    let g = generate(&model, &prompt, &cfg, &dev, |_| true);
    assert_eq!(g.tokens, a[..=first].to_vec());
    assert_eq!(g.stop, StopReason::Eos(stop_at));
}

/// The logits processors equal what transformers' `generate` applied (its `output_scores`) to the
/// same raw logits (`output_logits`) and context: repetition penalty, temperature, top-k, top-p in
/// HF's order, for Qwen2.5-7B-Instruct's settings and two others, 4 sampled steps each.
#[test]
fn logits_processors_equal_transformers_scores() {
    let reference: serde_json::Value = read_json(&fixtures().join("generate/reference.json"));
    let f32s = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let mut steps = 0;
    for p in reference["processors"].as_array().unwrap() {
        let c = &p["config"];
        let d = GenerationConfig::default();
        let cfg = GenerationConfig {
            do_sample: c["do_sample"].as_bool().unwrap(),
            temperature: c["temperature"]
                .as_f64()
                .map_or(d.temperature, |v| v as f32),
            top_k: c["top_k"].as_u64().map_or(d.top_k, |v| v as usize),
            top_p: c["top_p"].as_f64().map_or(d.top_p, |v| v as f32),
            repetition_penalty: c["repetition_penalty"].as_f64().unwrap() as f32,
            ..d
        };
        let sampler = qwen2::TokenSampler::new(cfg);
        for (i, step) in p["steps"].as_array().unwrap().iter().enumerate() {
            let mut row = f32s(&step["logits"]);
            sampler.process(&mut row, &ids_u32(&step["context"]));
            let kept: Vec<u32> = (0..row.len() as u32)
                .filter(|&t| row[t as usize].is_finite())
                .collect();
            assert_eq!(kept, ids_u32(&step["kept"]), "{c}: step {i}: kept tokens");
            let got: Vec<f32> = kept.iter().map(|&t| row[t as usize]).collect();
            assert_close(
                &format!("{c}: step {i}"),
                &got,
                &f32s(&step["scores_kept"]),
                1e-5,
            );
            steps += 1;
        }
    }
    assert_eq!(steps, 12);
}

/// The real Qwen2.5 `generation_config.json` files give the documented defaults; a model directory
/// without one falls back to HF's defaults (greedy) with config.json's eos ids.
#[test]
fn generation_config_of_real_qwen_models() {
    let Some(shared) = shared_data_or_skip("generation_config_of_real_qwen_models") else {
        return;
    };
    let configs = shared.join("qwen2.5-configs");
    let c7 =
        GenerationConfig::from_file(&configs.join("Qwen2.5-7B-Instruct/generation_config.json"))
            .unwrap();
    assert!(c7.do_sample);
    assert_eq!(
        (c7.temperature, c7.top_p, c7.top_k, c7.repetition_penalty),
        (0.7, 0.8, 20, 1.05)
    );
    assert_eq!(c7.eos_token_id, vec![151645, 151643]);
    let c05 =
        GenerationConfig::from_file(&configs.join("Qwen2.5-0.5B-Instruct/generation_config.json"))
            .unwrap();
    assert_eq!(c05.repetition_penalty, 1.1);

    let dir = fixtures().join("tiny-tied-f32");
    let mut cfg = qwen2::Qwen2Config::from_file(&dir.join("config.json")).unwrap();
    cfg.eos_token_id = Some(qwen2::TokenIds::Many(vec![7, 9]));
    let d = GenerationConfig::for_model(&dir, &cfg).unwrap();
    assert!(
        !d.do_sample,
        "no generation_config.json: greedy, as transformers"
    );
    assert_eq!(d.eos_token_id, vec![7, 9]);
}

/// A conversation continued from its cache (the chat's later turns) generates what a fresh run on
/// the whole prompt generates, processing only the new tokens; after truncating the cache to a
/// shared prefix, a different prompt continues from that prefix.
#[test]
fn continuing_from_a_cache_equals_a_fresh_run() {
    let dev = Default::default();
    let model = load("tiny-untied-f32-sharded", Some("peft-tiny-untied"), false);
    let cfg = greedy(8, 1.0);
    let p1: Vec<u32> = vec![17, 200, 3, 45, 99, 12];
    let mut cache = KvCache::new(model.model.layers.len());
    let g1 = qwen2::generate_cached(&model, &mut cache, &p1, &cfg, &dev, |_| true);
    assert_eq!(
        g1.tokens,
        generate(&model, &p1, &cfg, &dev, |_| true).tokens
    );
    assert_eq!(cache.len(), p1.len() + g1.tokens.len() - 1);

    // Turn 2: the first turn, its answer, and a new message.
    let p2: Vec<u32> = [p1.clone(), g1.tokens.clone(), vec![5, 6, 7]].concat();
    let g2 = qwen2::generate_cached(&model, &mut cache, &p2, &cfg, &dev, |_| true);
    assert_eq!(
        g2.prompt_tokens, 4,
        "the last answer token and the 3 new ones"
    );
    assert_eq!(
        g2.tokens,
        generate(&model, &p2, &cfg, &dev, |_| true).tokens
    );

    // A prompt that departs from the cache after 3 tokens: the caller cuts the cache back.
    let p3: Vec<u32> = [&p1[..3], &[250, 251][..]].concat();
    cache.truncate(3);
    assert_eq!(cache.len(), 3);
    let g3 = qwen2::generate_cached(&model, &mut cache, &p3, &cfg, &dev, |_| true);
    assert_eq!(
        g3.tokens,
        generate(&model, &p3, &cfg, &dev, |_| true).tokens
    );
}
