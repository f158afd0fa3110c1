//! Parity with Hugging Face transformers' `Qwen2ForCausalLM` on the tiny fixtures
//! (written by `scripts/make_fixtures.py`), and parameter names/shapes against the checkpoints.

mod common;

use std::collections::BTreeMap;

use burn::tensor::DType;
use common::{floats, int2};
use ferrolora::Cpu;
use qwen2::{load_model, parameter_shapes, weight_files};
use test_support::{assert_close, fixtures, read_reference, read_safetensors};

const FIXTURES: [&str; 4] = [
    "tiny-tied-f32",
    "tiny-untied-f32-sharded",
    "tiny-tied-bf16-sharded",
    "tiny-untied-bf16",
];

/// f32 compute against transformers' f32 eager forward: max abs logits error allowed.
/// Observed ~1e-6; 1e-4 leaves room for summation-order differences in GEMMs.
const F32_TOL: f32 = 1e-4;
/// bf16 compute against transformers' bf16 eager forward. Both round every op's output to bf16
/// (8 bits of mantissa, ~4e-3 relative), in different orders, over logits of magnitude ~5.
const BF16_TOL: f32 = 0.15;

#[test]
fn logits_match_transformers_f32() {
    for name in FIXTURES {
        let dir = fixtures().join(name);
        let r = read_reference(&dir.join("reference.safetensors"));
        let loaded = load_model::<Cpu>(&dir, DType::F32, &Default::default()).unwrap();
        let m = &loaded.model;
        let (ids, mask, pos) = (
            int2(&r["input_ids"]),
            int2(&r["attention_mask"]),
            int2(&r["position_ids"]),
        );

        let logits = floats(m.forward(ids.clone(), Some(mask.clone()), None));
        let e1 = assert_close(
            &format!("{name} logits"),
            &logits,
            &r["logits"].f32,
            F32_TOL,
        );
        let logits_pos = floats(m.forward(ids.clone(), Some(mask.clone()), Some(pos)));
        let e2 = assert_close(
            &format!("{name} logits_pos"),
            &logits_pos,
            &r["logits_pos"].f32,
            F32_TOL,
        );
        let hidden = floats(m.forward_hidden(ids, Some(mask), None));
        let e3 = assert_close(
            &format!("{name} hidden"),
            &hidden,
            &r["hidden"].f32,
            F32_TOL,
        );
        println!(
            "{name}: max abs error logits {e1:.2e}, with position_ids {e2:.2e}, hidden {e3:.2e}"
        );
    }
}

#[test]
fn logits_match_transformers_bf16_compute() {
    for name in FIXTURES.iter().filter(|n| n.contains("bf16")) {
        let dir = fixtures().join(name);
        let r = read_reference(&dir.join("reference.safetensors"));
        let loaded = load_model::<Cpu>(&dir, DType::BF16, &Default::default()).unwrap();
        let (ids, mask) = (int2(&r["input_ids"]), int2(&r["attention_mask"]));
        let logits = floats(loaded.model.forward(ids, Some(mask), None));
        let e = assert_close(
            &format!("{name} bf16 logits"),
            &logits,
            &r["logits_bf16"].f32,
            BF16_TOL,
        );
        println!("{name}: bf16 compute max abs error {e:.2e}");
    }
}

#[test]
fn parameter_names_and_shapes_equal_checkpoint() {
    for name in FIXTURES {
        let dir = fixtures().join(name);
        let loaded = load_model::<Cpu>(&dir, DType::F32, &Default::default()).unwrap();
        let ours: BTreeMap<String, Vec<usize>> = parameter_shapes::<Cpu, _>(&loaded.model)
            .into_iter()
            .collect();
        let mut file: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for f in weight_files(&dir).unwrap() {
            for (k, (_, shape, _)) in read_safetensors(&f) {
                file.insert(k, shape);
            }
        }
        assert_eq!(
            ours, file,
            "{name}: module paths/shapes differ from checkpoint keys"
        );
        assert_eq!(loaded.report.tensors, file.len());
        assert!(loaded.report.ignored.is_empty());
        let tied = loaded.config.tie_word_embeddings;
        assert_eq!(loaded.model.lm_head.is_none(), tied, "{name}");
        assert_eq!(
            loaded.report.elements,
            loaded.config.num_parameters(),
            "{name}"
        );
    }
}

#[test]
fn loads_in_requested_dtype() {
    let dir = fixtures().join("tiny-untied-bf16");
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let m = load_model::<Cpu>(&dir, dtype, &Default::default())
            .unwrap()
            .model;
        assert_eq!(
            m.model.layers[0].self_attn.q_proj.weight.val().dtype(),
            dtype
        );
        assert_eq!(m.model.embed_tokens.weight.val().dtype(), dtype);
    }
}

#[test]
fn save_model_round_trips_exactly() {
    let dir = fixtures().join("tiny-untied-bf16");
    let r = read_reference(&dir.join("reference.safetensors"));
    let loaded = load_model::<Cpu>(&dir, DType::F32, &Default::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    qwen2::save_model(&loaded.model, &loaded.config, tmp.path()).unwrap();
    let again = load_model::<Cpu>(tmp.path(), DType::F32, &Default::default()).unwrap();
    let (ids, mask) = (int2(&r["input_ids"]), int2(&r["attention_mask"]));
    let a = floats(loaded.model.forward(ids.clone(), Some(mask.clone()), None));
    let b = floats(again.model.forward(ids, Some(mask), None));
    assert_eq!(a, b);
    assert_eq!(
        again.config.num_parameters(),
        loaded.config.num_parameters()
    );
}
