//! LoRA's variants on Qwen2 against PEFT (fixtures from `scripts/make_variant_fixtures.py`): DoRA
//! (`use_dora`), `lora_bias`, and the PiSSA and OLoRA initializations (loading one re-runs the
//! init on the base, as PEFT does, then reads the trained factors). For each, an adapter PEFT wrote gives PEFT's logits, loss and the
//! gradient of every trainable parameter; merging gives `merge_and_unload`'s logits and unmerging
//! restores the base; saving writes PEFT's file layout back bit for bit; the trainable-parameter
//! line equals PEFT's on the real 7B config.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::backend::Autodiff;
use burn::tensor::DType;
use common::{floats, int2};
use ferrolora::Cpu;
use lora_core::{
    apply_lora, is_module_to_save, load_adapter, merge_all, save_adapter, unmerge_all,
    visit_params, LoraConfig, LoraModel, ParamRef,
};
use lora_trainer::causal_lm_loss;
use qwen2::{load_model, Qwen2Config, Qwen2ForCausalLM};
use test_support::{
    assert_close, assert_close_scaled, fixtures, read_json, read_reference, read_safetensors,
    shared_data_or_skip,
};

type Ad = Autodiff<Cpu>;

/// Logits vs PEFT (f32): max abs error.
const LOGITS_TOL: f32 = 1e-4;
/// Loss vs PEFT: relative error.
const LOSS_REL_TOL: f64 = 1e-5;
/// Each gradient vs PEFT: max abs error relative to the reference gradient's max magnitude.
const GRAD_REL_TOL: f32 = 1e-4;

const VARIANTS: [&str; 7] = [
    "dora",
    "lora-bias",
    "pissa",
    "olora",
    "modules-to-save",
    "trainable-tokens",
    "trainable-tokens-tied",
];

/// The base model of a variant's fixture: the tied tiny model for `*-tied`, else the untied one.
fn base_for<B: burn::tensor::backend::Backend>(variant: &str) -> Qwen2ForCausalLM<B> {
    let dir = if variant.ends_with("-tied") {
        "tiny-tied-f32"
    } else {
        "tiny-untied-f32-sharded"
    };
    load_model::<B>(&fixtures().join(dir), DType::F32, &Default::default())
        .unwrap()
        .model
}

/// Whether a parameter trains: an adapter's, or one of a module to save.
fn trains(p: &ParamRef<'_, impl burn::tensor::backend::Backend>, cfg: &LoraConfig) -> bool {
    let module = p.path.rsplit_once('.').map_or("", |(m, _)| m);
    p.is_adapter() || is_module_to_save(cfg, module)
}

fn dir(variant: &str) -> PathBuf {
    fixtures().join(format!("peft-{variant}"))
}

fn base<B: burn::tensor::backend::Backend>() -> Qwen2ForCausalLM<B> {
    load_model::<B>(
        &fixtures().join("tiny-untied-f32-sharded"),
        DType::F32,
        &Default::default(),
    )
    .unwrap()
    .model
}

/// Every trained parameter (factors, biases, magnitudes, modules to save) as `(path, values)`.
fn adapter_values<B: burn::tensor::backend::Backend>(
    model: &Qwen2ForCausalLM<B>,
    cfg: &LoraConfig,
) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    visit_params(model, |p: ParamRef<'_, B>| {
        if trains(&p, cfg) {
            out.push((p.path.to_string(), floats(p.flat())));
        }
    });
    out
}

#[test]
fn peft_variant_adapters_give_peft_logits_loss_and_gradients() {
    for variant in VARIANTS {
        let r = read_reference(&dir(variant).join("reference.safetensors"));
        let (model, cfg, _) = load_adapter(base_for::<Ad>(variant), &dir(variant)).unwrap();
        assert_eq!(cfg.use_dora, variant == "dora");
        assert_eq!(cfg.lora_bias(), variant == "lora-bias");
        let (ids, mask, labels) = (
            int2::<Ad>(&r["input_ids"]),
            int2::<Ad>(&r["attention_mask"]),
            int2::<Ad>(&r["labels"]),
        );
        let logits = model.forward(ids, Some(mask), None);
        let e_logits = assert_close(
            &format!("{variant} logits"),
            &floats(logits.clone()),
            &r["logits"].f32,
            LOGITS_TOL,
        );
        let loss = causal_lm_loss(logits, labels);
        let (got, want) = (floats(loss.clone())[0] as f64, r["loss"].f32[0] as f64);
        let rel = (got - want).abs() / want.abs();
        assert!(
            rel <= LOSS_REL_TOL,
            "{variant}: loss {got} vs PEFT {want}: relative error {rel:e}"
        );
        let grads = loss.backward();
        let mut n = 0;
        let mut worst = (0f32, String::new());
        visit_params(&model, |p: ParamRef<'_, Ad>| {
            if !trains(&p, &cfg) {
                return;
            }
            let g = match p.shape.len() {
                1 => p.value::<1>().unwrap().grad(&grads).map(floats),
                _ => p.value::<2>().unwrap().grad(&grads).map(floats),
            }
            .unwrap_or_else(|| panic!("{variant}: no gradient for {}", p.path));
            let want = &r[&format!("grad.{}", p.path)].f32;
            let what = format!("{variant} grad {}", p.path);
            let e = assert_close_scaled(&what, &g, want, GRAD_REL_TOL);
            if e > worst.0 {
                worst = (e, p.path.to_string());
            }
            n += 1;
        });
        assert_eq!(n, r.keys().filter(|k| k.starts_with("grad.")).count());
        println!(
            "{variant} vs PEFT: logits {e_logits:.2e} abs, loss {rel:.2e} rel, {n} gradients, \
             worst {:.2e} rel ({})",
            worst.0, worst.1
        );
    }
}

#[test]
fn variant_merge_equals_peft_merge_and_unmerge_restores() {
    for variant in VARIANTS {
        let r = read_reference(&dir(variant).join("reference.safetensors"));
        let (mut model, _, _) = load_adapter(base_for::<Cpu>(variant), &dir(variant)).unwrap();
        let (ids, mask) = (int2(&r["input_ids"]), int2(&r["attention_mask"]));
        let before: Vec<(Vec<f32>, Vec<f32>)> = model
            .lora_linears()
            .into_iter()
            .map(|(_, l)| {
                let bias = l.bias.as_ref().map(|b| floats(b.val())).unwrap_or_default();
                (floats(l.weight.val()), bias)
            })
            .collect();
        let unmerged = floats(model.forward(ids.clone(), Some(mask.clone()), None));
        assert_close(
            &format!("{variant} inference logits"),
            &unmerged,
            &r["logits"].f32,
            LOGITS_TOL,
        );
        let n = merge_all(&mut model).unwrap();
        assert!(n > 0);
        let merged = floats(model.forward(ids, Some(mask), None));
        let e = assert_close(
            &format!("{variant} merged vs PEFT merge_and_unload"),
            &merged,
            &r["logits_merged"].f32,
            LOGITS_TOL,
        );
        // The merged weights themselves against merge_and_unload's (a few per variant). PiSSA's
        // residual comes from another SVD (faer's vs LAPACK's), 2.7e-6 of max|W| apart at most
        // (`crates/lora-core/tests/inits.rs`); every other variant is f32 rounding.
        let mut worst_w = 0f32;
        visit_params(&model, |p: ParamRef<'_, Cpu>| {
            if let Some(want) = r.get(&format!("merged.{}", p.path)) {
                let tol = if variant == "pissa" { 1e-5 } else { 1e-6 };
                let what = format!("{variant} merged {}", p.path);
                let e = assert_close_scaled(&what, &floats(p.flat()), &want.f32, tol);
                worst_w = worst_w.max(e);
            }
        });
        // Trained token rows are written into the table for good (PEFT `merge_and_unload`).
        let tokens = usize::from(variant.starts_with("trainable-tokens"));
        assert_eq!(unmerge_all(&mut model).unwrap(), n - tokens);
        assert!(model.model.embed_tokens.token_adapter.is_none() || tokens == 0);
        let mut back = 0f32;
        for ((_, l), (w, b)) in model.lora_linears().into_iter().zip(&before) {
            back = back.max(assert_close(
                "unmerge(merge(W))",
                &floats(l.weight.val()),
                w,
                1e-5,
            ));
            if let Some(bias) = &l.bias {
                assert_close("unmerge(merge(b))", &floats(bias.val()), b, 1e-6);
            }
        }
        println!(
            "{variant}: merged logits vs PEFT {e:.2e} abs, merged weights {worst_w:.2e} rel; \
             unmerge(merge(W)) vs W {back:.2e}"
        );
    }
}

#[test]
fn variant_adapters_save_as_peft_does_and_reload_bitwise() {
    for variant in VARIANTS {
        let (model, cfg, _) = load_adapter(base_for::<Cpu>(variant), &dir(variant)).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        save_adapter(&model, &cfg, tmp.path()).unwrap();
        // Every key, shape and value of PEFT's file, and nothing else.
        let ours = read_safetensors(&tmp.path().join("adapter_model.safetensors"));
        let peft = read_safetensors(&dir(variant).join("adapter_model.safetensors"));
        let keys = |t: &BTreeMap<String, _>| t.keys().cloned().collect::<Vec<String>>();
        assert_eq!(keys(&ours), keys(&peft), "{variant}: keys");
        for (k, v) in &peft {
            assert!(ours[k] == *v, "{variant}: `{k}` differs from PEFT's file");
        }
        let saved: serde_json::Value = read_json(&tmp.path().join("adapter_config.json"));
        assert_eq!(saved["use_dora"], variant == "dora");
        assert_eq!(saved["lora_bias"], variant == "lora-bias");
        let (again, _, _) = load_adapter(base_for::<Cpu>(variant), tmp.path()).unwrap();
        assert!(adapter_values(&model, &cfg) == adapter_values(&again, &cfg));
    }
}

#[test]
fn fresh_variants_start_as_the_base_model_or_as_plain_lora() {
    // DoRA's magnitude starts at the row norms of W + s·B·A, so a fresh DoRA adapter computes what
    // the plain adapter with the same factors computes; a fresh lora_B bias is zero.
    let r = read_reference(&fixtures().join("tiny-untied-f32-sharded/reference.safetensors"));
    let ids = int2::<Cpu>(&r["input_ids"]);
    for dora in [false, true] {
        let mut cfg: LoraConfig = lora_trainer::recipe::lora_config();
        cfg.init_lora_weights = lora_core::InitLoraWeights::Bool(false);
        cfg.lora_dropout = 0.0;
        let (plain, _) = apply_lora(base::<Cpu>(), &cfg).unwrap();
        if dora {
            cfg.use_dora = true;
        } else {
            cfg.set_lora_bias(true);
        }
        // The same factors: the backend's generator is not seeded here, so copy them over.
        let (mut variant, _) = apply_lora(base::<Cpu>(), &cfg).unwrap();
        let mut plain = plain;
        for ((_, p), (_, v)) in plain.lora_linears().into_iter().zip(variant.lora_linears()) {
            if !p.has_adapter() {
                continue;
            }
            for suffix in ["lora_A.weight", "lora_B.weight"] {
                let w = if suffix.starts_with("lora_A") {
                    p.lora_A.as_ref()
                } else {
                    p.lora_B.as_ref()
                };
                v.set_adapter_tensor(suffix, floats(w.unwrap().weight.val()));
            }
            if dora {
                v.add_dora("fresh");
            }
        }
        let want = floats(plain.forward(ids.clone(), None, None));
        let got = floats(variant.forward(ids.clone(), None, None));
        let e = assert_close_scaled(
            if dora {
                "fresh DoRA"
            } else {
                "fresh lora_bias"
            },
            &got,
            &want,
            1e-5,
        );
        println!("dora {dora}: fresh variant vs plain LoRA {e:.2e} rel");
    }
}

#[test]
fn trainable_parameter_reports_equal_peft_for_qwen25_7b() {
    let Some(shared) = shared_data_or_skip("trainable_parameter_reports_equal_peft_for_qwen25_7b")
    else {
        return;
    };
    let cfg7 =
        Qwen2Config::from_file(&shared.join("qwen2.5-configs/Qwen2.5-7B-Instruct/config.json"))
            .unwrap();
    for variant in VARIANTS {
        let peft: serde_json::Value = read_json(&dir(variant).join("peft_reference.json"));
        let mut cfg = lora_trainer::recipe::lora_config();
        match variant {
            "dora" => cfg.use_dora = true,
            "lora-bias" => cfg.set_lora_bias(true),
            "modules-to-save" => {
                cfg.modules_to_save = Some(vec!["lm_head".into(), "embed_tokens".into()])
            }
            "trainable-tokens" => cfg.set_trainable_token_indices(Some(&[1, 5, 7, 200])),
            "trainable-tokens-tied" => cfg.set_trainable_token_indices(Some(&[3, 9, 250])),
            init => cfg.init_lora_weights = lora_core::InitLoraWeights::Named(init.into()),
        }
        // Lazy parameters: no base weight is allocated, nor any norm (DoRA) or decomposition
        // (PiSSA, OLoRA) of one computed.
        let model = Qwen2ForCausalLM::<Cpu>::new(&cfg7, &Default::default());
        let (_, report) = apply_lora(model, &cfg).unwrap();
        assert_eq!(
            report.to_string(),
            peft["qwen2.5-7b-tutorial"]["line"].as_str().unwrap(),
            "{variant}"
        );
        let (_, _, tiny) = load_adapter(base_for::<Cpu>(variant), &dir(variant)).unwrap();
        assert_eq!(
            (tiny.trainable as u64, tiny.all as u64),
            (
                peft["tiny"]["trainable"].as_u64().unwrap(),
                peft["tiny"]["all"].as_u64().unwrap()
            ),
            "{variant} tiny"
        );
        println!("{variant}: {report}");
    }
}

#[test]
fn invalid_variant_configs_are_refused_with_their_names() {
    let mut cfg = lora_trainer::recipe::lora_config();
    cfg.use_dora = true;
    cfg.set_lora_bias(true);
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("lora_bias") && e.contains("DoRA"), "{e}");
    let e = LoraConfig::from_json_str(r#"{"target_modules": ["q_proj"], "lora_bias": "yes"}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lora_bias"), "{e}");
    // A lora_bias adapter on a projection without a base bias trains, but cannot be merged.
    let mut cfg = lora_trainer::recipe::lora_config();
    cfg.set_lora_bias(true);
    let (mut model, _) = apply_lora(base::<Cpu>(), &cfg).unwrap();
    let e = merge_all(&mut model).unwrap_err().to_string();
    assert!(e.contains("o_proj") && e.contains("no bias"), "{e}");

    // modules_to_save: a name that matches nothing (here the head of a tied model), and a module
    // that is also a LoRA target, are named.
    let tied = load_model::<Cpu>(
        &fixtures().join("tiny-tied-f32"),
        DType::F32,
        &Default::default(),
    )
    .unwrap()
    .model;
    let mut cfg = lora_trainer::recipe::lora_config();
    cfg.modules_to_save = Some(vec!["lm_head".into()]);
    let e = apply_lora(tied, &cfg).unwrap_err().to_string();
    assert!(e.contains("lm_head") && e.contains("ties"), "{e}");
    cfg.modules_to_save = Some(vec!["up_proj".into()]);
    let e = apply_lora(base::<Cpu>(), &cfg).unwrap_err().to_string();
    assert!(e.contains("up_proj") && e.contains("both"), "{e}");
}

#[test]
fn pissa_and_olora_leave_the_model_output_unchanged() {
    // The base becomes W − s·B·A and the adapter adds s·B·A back: the logits of a fresh adapter
    // are the base model's, up to the rounding of the residual.
    let r = read_reference(&fixtures().join("tiny-untied-f32-sharded/reference.safetensors"));
    let ids = int2::<Cpu>(&r["input_ids"]);
    let want = floats(base::<Cpu>().forward(ids.clone(), None, None));
    for init in ["pissa", "pissa_niter_4", "olora"] {
        let mut cfg = lora_trainer::recipe::lora_config();
        cfg.init_lora_weights = lora_core::InitLoraWeights::Named(init.into());
        let (mut model, _) = apply_lora(base::<Cpu>(), &cfg).unwrap();
        let w0 = floats(base::<Cpu>().model.layers[0].mlp.up_proj.weight.val());
        let up = &model.model.layers[0].mlp.up_proj;
        let moved = floats(up.weight.val())
            .iter()
            .zip(&w0)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            moved > 1e-3,
            "{init}: the base weight was not replaced by the residual"
        );
        let got = floats(model.forward(ids.clone(), None, None));
        let e = assert_close_scaled(init, &got, &want, 1e-5);
        assert_eq!(merge_all(&mut model).unwrap(), 14);
        let merged = floats(model.forward(ids.clone(), None, None));
        let m = assert_close_scaled(&format!("{init} merged"), &merged, &want, 1e-5);
        println!("{init}: fresh adapter vs base logits {e:.2e} rel, merged {m:.2e} rel");
    }
    let mut cfg = lora_trainer::recipe::lora_config();
    cfg.init_lora_weights = lora_core::InitLoraWeights::Named("pissa_niter_x".into());
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("pissa_niter_"), "{e}");
    cfg.init_lora_weights = lora_core::InitLoraWeights::Named("loftq".into());
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("loftq") && e.contains("olora"), "{e}");
}

#[test]
fn pissa_and_olora_adapters_convert_to_plain_lora_on_the_original_base() {
    // PEFT's path_initial_model_for_weight_conversion: the initial adapter is saved right after
    // the init; the trained adapter (here PEFT's fixture) becomes a rank-2r LoRA that gives the
    // trained model's logits on the ORIGINAL base, with init_lora_weights = true.
    for variant in ["pissa", "olora"] {
        let r = read_reference(&dir(variant).join("reference.safetensors"));
        let peft_cfg = LoraConfig::from_file(&dir(variant).join("adapter_config.json")).unwrap();
        let (initial, _) = apply_lora(base::<Cpu>(), &peft_cfg).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let init_dir = tmp.path().join("initial");
        save_adapter(&initial, &peft_cfg, &init_dir).unwrap();
        let out = tmp.path().join("converted");
        lora_core::convert_to_lora(&dir(variant), &init_dir, &out).unwrap();
        let (model, cfg, _) = load_adapter(base::<Cpu>(), &out).unwrap();
        assert_eq!((cfg.r, cfg.lora_alpha), (16, 64.0));
        assert_eq!(
            cfg.init_lora_weights,
            lora_core::InitLoraWeights::Bool(true)
        );
        let ids = int2(&r["input_ids"]);
        let got = floats(model.forward(ids, Some(int2(&r["attention_mask"])), None));
        let e = assert_close(
            &format!("{variant} converted, on the original base"),
            &got,
            &r["logits"].f32,
            LOGITS_TOL,
        );
        println!("{variant}: converted adapter on the original base vs PEFT {e:.2e} abs");
    }
    // DoRA is not a low-rank difference: refused with the file named.
    let tmp = tempfile::tempdir().unwrap();
    let e = lora_core::convert_to_lora(&dir("dora"), &dir("dora"), tmp.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("DoRA") && e.contains("adapter_config.json"),
        "{e}"
    );
}

#[test]
fn dora_on_a_4bit_base_equals_dora_on_its_dequantized_weights() {
    // QLoRA + DoRA: the base's projections in NF4 with double quantization (float32 compute); the
    // norms and the side path read the dequantized weight. Checked against the same adapter on an
    // f32 model holding those dequantized values (logits and every gradient). PEFT 0.21.2 with
    // bitsandbytes 0.50.2 on the CPU is no reference here: its DoRA output on a Linear4bit differs
    // from its own DoRA formula on the dequantized weight by up to 1.2 at one layer of this
    // fixture (scripts/make_variant_fixtures.py stores it as `logits_4bit`; not asserted).
    let r = read_reference(&dir("dora").join("reference.safetensors"));
    let q = qwen2::Load4bit {
        quant_type: kernels::quant::Kind::Nf4,
        double_quant: true,
        compute_dtype: DType::F32,
    };
    let path = fixtures().join("tiny-untied-f32-sharded");
    let mut base4 = qwen2::load_model_4bit::<Ad>(&path, q, &Default::default())
        .unwrap()
        .model;
    let mut dense = base::<Ad>();
    for ((_, l4), (_, l)) in base4.lora_linears().into_iter().zip(dense.lora_linears()) {
        let Some(q) = &l4.base_4bit else {
            continue;
        };
        let t = burn::tensor::Tensor::<Ad, 2>::from_data(
            burn::tensor::TensorData::new(q.quantized.dequantize(), l.shape()),
            &Default::default(),
        );
        l.weight = l.weight.clone().map(|_| t);
    }
    let mut results = Vec::new();
    for model in [base4, dense] {
        let (model, _, _) = load_adapter(model, &dir("dora")).unwrap();
        let logits = model.forward(
            int2(&r["input_ids"]),
            Some(int2(&r["attention_mask"])),
            None,
        );
        let grads = causal_lm_loss(logits.clone(), int2(&r["labels"])).backward();
        let mut g = Vec::new();
        visit_params(&model, |p: ParamRef<'_, Ad>| {
            if p.is_adapter() {
                let v = match p.shape.len() {
                    1 => p.value::<1>().unwrap().grad(&grads).map(floats),
                    _ => p.value::<2>().unwrap().grad(&grads).map(floats),
                };
                g.push((p.path.to_string(), v.expect("a gradient")));
            }
        });
        results.push((floats(logits), g));
    }
    let (q4, f32_) = (&results[0], &results[1]);
    let e = assert_close_scaled(
        "DoRA on NF4 vs on its dequantized weights",
        &q4.0,
        &f32_.0,
        1e-6,
    );
    assert_eq!(q4.1.len(), 42);
    for ((path, a), (_, b)) in q4.1.iter().zip(&f32_.1) {
        assert_close_scaled(&format!("grad {path}"), a, b, 1e-5);
    }
    println!("DoRA on NF4 vs on its dequantized weights: logits {e:.2e} rel, 42 gradients");
}

#[test]
fn cached_dora_scales_give_the_same_logits_and_drop_on_change() {
    let r = read_reference(&dir("dora").join("reference.safetensors"));
    let (mut model, _, _) = load_adapter(base::<Cpu>(), &dir("dora")).unwrap();
    let ids = int2::<Cpu>(&r["input_ids"]);
    let before = floats(model.forward(ids.clone(), None, None));
    assert_eq!(lora_core::cache_dora_scales(&mut model), 14);
    let cached = floats(model.forward(ids.clone(), None, None));
    assert!(before == cached, "cached DoRA scales changed the logits");
    // A changed magnitude drops the layer's cache: the forward follows the new value.
    let l = &mut model.model.layers[0].mlp.up_proj;
    let m = floats(l.lora_magnitude_vector.as_ref().unwrap().weight.val());
    l.set_adapter_tensor("lora_magnitude_vector", m.iter().map(|v| v * 2.0).collect());
    assert!(l.dora_scale_cache.is_none());
    let changed = floats(model.forward(ids, None, None));
    assert!(changed != cached);
}
