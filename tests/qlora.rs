//! QLoRA's 4-bit base (`qwen2::load_model_4bit`) against transformers + bitsandbytes: the tiny f32
//! fixtures loaded with `BitsAndBytesConfig(load_in_4bit=True, ...)` (bitsandbytes' `Linear4bit` on
//! the CPU) give the logits in `tests/fixtures/qlora/` (`scripts/make_qlora_fixtures.py`); ours must
//! equal them as our f32 forward equals transformers' (the quantized weights themselves are
//! bit-identical: `crates/kernels/tests/quant_bnb.rs`). Plus what the loader holds, and the refusal
//! of checkpoints that are already quantized.

mod common;

use burn::tensor::DType;
use common::{floats, int2};
use ferrolora::Cpu;
use kernels::quant::Kind;
use qwen2::{load_model, load_model_4bit, Load4bit};
use test_support::{assert_close, fixtures, read_reference};

/// As the f32 parity tests: summation order only.
const F32_TOL: f32 = 1e-4;

fn q(kind: Kind, double: bool) -> Load4bit {
    Load4bit {
        quant_type: kind,
        double_quant: double,
        compute_dtype: DType::F32,
    }
}

#[test]
fn logits_match_transformers_with_bitsandbytes() {
    for name in ["tiny-tied-f32", "tiny-untied-f32-sharded"] {
        let dir = fixtures().join(name);
        let r = read_reference(&dir.join("reference.safetensors"));
        let (ids, mask) = (int2(&r["input_ids"]), int2(&r["attention_mask"]));
        for (tag, kind, double) in [("nf4-dq", Kind::Nf4, true), ("fp4", Kind::Fp4, false)] {
            let loaded =
                load_model_4bit::<Cpu>(&dir, q(kind, double), &Default::default()).unwrap();
            let layers = loaded.config.num_hidden_layers;
            assert_eq!(loaded.report.quantized_tensors, 7 * layers);
            let m = &loaded.model;
            assert!(m.model.layers.iter().all(
                |l| l.mlp.up_proj.base_4bit.is_some() && l.self_attn.k_proj.base_4bit.is_some()
            ));
            assert!(
                m.lm_head.as_ref().is_none_or(|h| h.base_4bit.is_none()),
                "lm_head stays"
            );
            let want = read_reference(&fixtures().join(format!("qlora/{name}-{tag}.safetensors")));
            let logits = floats(m.forward(ids.clone(), Some(mask.clone()), None));
            let err = assert_close(
                &format!("{name} {tag} logits"),
                &logits,
                &want["logits"].f32,
                F32_TOL,
            );
            // And far from the full-precision model's: the test sees the quantization.
            let full = floats(
                load_model::<Cpu>(&dir, DType::F32, &Default::default())
                    .unwrap()
                    .model
                    .forward(ids.clone(), Some(mask.clone()), None),
            );
            let gap = full
                .iter()
                .zip(&logits)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                gap > 100.0 * F32_TOL,
                "{name} {tag}: 4-bit logits equal the f32 model's"
            );
            eprintln!(
                "{name} {tag}: max |logits - transformers+bnb| {err:.2e}; vs f32 model {gap:.2}"
            );
        }
    }
}

#[test]
fn a_quantized_checkpoint_is_refused_naming_its_method() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-tied-f32");
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let cfg = tmp.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    for method in ["gptq", "awq", "bitsandbytes"] {
        v["quantization_config"] = serde_json::json!({"quant_method": method, "bits": 4});
        std::fs::write(&cfg, v.to_string()).unwrap();
        for e in [
            load_model::<Cpu>(tmp.path(), DType::F32, &Default::default()).unwrap_err(),
            load_model_4bit::<Cpu>(tmp.path(), q(Kind::Nf4, true), &Default::default())
                .unwrap_err(),
        ] {
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("{method:?}")) && msg.contains("already quantized"),
                "{msg}"
            );
            assert!(msg.contains("config.json"), "{msg}");
        }
    }
}
