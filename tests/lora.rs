//! LoRA on Qwen2 against PEFT (fixtures from `scripts/make_lora_fixtures.py`): logits, loss and every
//! adapter gradient; PEFT's parameter counts; merge/unmerge and the identity adapter; adapter files
//! in both directions.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::backend::Autodiff;
use burn::module::Module;
use burn::tensor::{DType, Tensor};
use common::{floats, int2};
use ferrolora::Cpu;
use lora_core::{
    adapter_tensors, apply_lora, load_adapter, merge_all, save_adapter, unmerge_all,
    InitLoraWeights, LoraConfig, LoraError, LoraModel, ModuleSelector,
};
use lora_trainer::causal_lm_loss;
use qwen2::{load_model, Qwen2Config, Qwen2ForCausalLM};
use test_support::{
    assert_close, assert_close_scaled, fixtures, max_abs, read_json, read_reference,
    read_safetensors, shared_data_or_skip,
};

type Ad = Autodiff<Cpu>;

/// Logits with the adapter vs PEFT (f32): max abs error.
const LOGITS_TOL: f32 = 1e-4;
/// Loss vs PEFT: relative error.
const LOSS_REL_TOL: f64 = 1e-5;
/// Each gradient vs PEFT: max abs error relative to the reference gradient's max magnitude.
const GRAD_REL_TOL: f32 = 1e-4;
/// Merged vs unmerged logits, relative to the largest logit: `W + s·B·A` and `x·Wᵀ + s·(x·Aᵀ)·Bᵀ`
/// round differently in f32 (observed ~3e-6 relative with this random, large adapter).
const MERGE_REL_TOL: f32 = 1e-5;

fn peft_dir() -> PathBuf {
    fixtures().join("peft-tiny-untied")
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

#[test]
fn peft_adapter_logits_loss_and_gradients_match() {
    let r = read_reference(&peft_dir().join("reference.safetensors"));
    let (model, cfg, report) = load_adapter(base::<Ad>(), &peft_dir()).unwrap();
    assert_eq!((cfg.r, cfg.lora_alpha), (8, 32.0));
    assert_eq!(report.targeted.len(), 2 * 7);
    let (ids, mask, labels) = (
        int2::<Ad>(&r["input_ids"]),
        int2::<Ad>(&r["attention_mask"]),
        int2::<Ad>(&r["labels"]),
    );

    let logits = model.forward(ids, Some(mask), None);
    let e_logits = assert_close(
        "logits",
        &floats(logits.clone()),
        &r["logits"].f32,
        LOGITS_TOL,
    );

    let loss = causal_lm_loss(logits, labels);
    let got = floats(loss.clone())[0] as f64;
    let want = r["loss"].f32[0] as f64;
    let rel = (got - want).abs() / want.abs();
    assert!(
        rel <= LOSS_REL_TOL,
        "loss {got} vs PEFT {want}: relative error {rel:e}"
    );

    let grads = loss.backward();
    let mut worst = (0f32, String::new());
    let mut n = 0;
    for (path, p) in adapter_tensors(&model) {
        let g: Tensor<Cpu, 2> = p
            .grad(&grads)
            .unwrap_or_else(|| panic!("no gradient for {path}"));
        let want = &r[&format!("grad.{path}")].f32;
        let err = assert_close_scaled(&format!("grad {path}"), &floats(g), want, GRAD_REL_TOL);
        if err > worst.0 {
            worst = (err, path);
        }
        n += 1;
    }
    assert_eq!(n, r.keys().filter(|k| k.starts_with("grad.")).count());
    println!(
        "PEFT parity: logits {e_logits:.2e} abs, loss {rel:.2e} rel, {n} gradients, worst {:.2e} rel ({})",
        worst.0, worst.1
    );
}

#[test]
fn base_weights_get_no_gradient() {
    let r = read_reference(&peft_dir().join("reference.safetensors"));
    let (model, _, _) = load_adapter(base::<Ad>(), &peft_dir()).unwrap();
    let logits = model.forward(int2::<Ad>(&r["input_ids"]), None, None);
    let grads = causal_lm_loss(logits, int2::<Ad>(&r["labels"])).backward();
    let l0 = &model.model.layers[0];
    assert!(l0.self_attn.q_proj.weight.grad(&grads).is_none());
    assert!(l0
        .self_attn
        .q_proj
        .bias
        .as_ref()
        .unwrap()
        .grad(&grads)
        .is_none());
    assert!(model.model.embed_tokens.weight.grad(&grads).is_none());
    assert!(model.model.norm.weight.grad(&grads).is_none());
    assert!(l0
        .mlp
        .up_proj
        .lora_B
        .as_ref()
        .unwrap()
        .weight
        .grad(&grads)
        .is_some());
}

#[test]
fn merged_equals_unmerged_and_unmerge_restores() {
    let r = read_reference(&peft_dir().join("reference.safetensors"));
    let (mut model, _, _) = load_adapter(base::<Cpu>(), &peft_dir()).unwrap();
    let (ids, mask) = (int2(&r["input_ids"]), int2(&r["attention_mask"]));
    let w0 = floats(model.model.layers[1].mlp.down_proj.weight.val());
    let unmerged = floats(model.forward(ids.clone(), Some(mask.clone()), None));
    assert_eq!(merge_all(&mut model).unwrap(), 14);
    let merged = floats(model.forward(ids.clone(), Some(mask.clone()), None));
    let e = assert_close_scaled("merged vs unmerged", &merged, &unmerged, MERGE_REL_TOL);
    assert_close(
        "merged vs PEFT merge_and_unload",
        &merged,
        &r["logits_merged"].f32,
        LOGITS_TOL,
    );
    assert!(
        model.model.layers[0].self_attn.q_proj.merge("q").is_err(),
        "double merge refused"
    );
    assert_eq!(unmerge_all(&mut model).unwrap(), 14);
    let w1 = floats(model.model.layers[1].mlp.down_proj.weight.val());
    let back = assert_close("unmerge(merge(W))", &w1, &w0, 1e-6);
    println!("merged vs unmerged {e:.2e} rel; unmerge(merge(W)) vs W {back:.2e}");
}

#[test]
fn merge_refuses_non_finite_result() {
    let (mut model, _, _) = load_adapter(base::<Cpu>(), &peft_dir()).unwrap();
    let l = &mut model.model.layers[0].self_attn.v_proj;
    let b = l.lora_B.as_mut().unwrap();
    b.weight = b.weight.clone().map(|t| t.mul_scalar(f32::INFINITY));
    let before = floats(l.weight.val());
    let e = l.merge("model.layers.0.self_attn.v_proj").unwrap_err();
    assert!(matches!(e, LoraError::NonFiniteMerge { .. }), "{e}");
    assert!(
        e.to_string().contains("model.layers.0.self_attn.v_proj"),
        "{e}"
    );
    assert_eq!(floats(l.weight.val()), before, "weight untouched");
    assert!(!l.merged);
}

#[test]
fn identity_adapter_reproduces_base_logits_exactly() {
    let r = read_reference(&fixtures().join("tiny-untied-f32-sharded/reference.safetensors"));
    let (ids, mask) = (int2(&r["input_ids"]), int2(&r["attention_mask"]));
    let plain = floats(base::<Cpu>().forward(ids.clone(), Some(mask.clone()), None));
    let cfg = lora_trainer::recipe::lora_config(); // init_lora_weights = true: B = 0
    let (model, _) = apply_lora(base::<Cpu>(), &cfg).unwrap();
    let adapted = floats(model.forward(ids, Some(mask), None));
    assert_eq!(plain, adapted, "B = 0 must leave logits bit-identical");
}

#[test]
fn save_then_load_is_bitwise_and_matches_peft_layout() {
    let (model, cfg, _) = load_adapter(base::<Cpu>(), &peft_dir()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    save_adapter(&model, &cfg, tmp.path()).unwrap();

    // Same keys, shapes and dtypes as the PEFT-written file.
    let layout = |p: PathBuf| -> BTreeMap<String, (Vec<usize>, String)> {
        read_safetensors(&p)
            .into_iter()
            .map(|(k, (dtype, shape, _))| (k, (shape, format!("{dtype:?}"))))
            .collect()
    };
    let ours = layout(tmp.path().join("adapter_model.safetensors"));
    let peft = layout(peft_dir().join("adapter_model.safetensors"));
    assert_eq!(ours, peft);
    assert!(ours
        .keys()
        .all(|k| k.starts_with("base_model.model.model.layers.")));

    // Config keeps PEFT's field names and values.
    let saved: serde_json::Value = read_json(&tmp.path().join("adapter_config.json"));
    for key in [
        "peft_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "task_type",
        "bias",
        "use_rslora",
        "use_dora",
    ] {
        assert!(saved.get(key).is_some(), "adapter_config.json lacks {key}");
    }
    assert_eq!(saved["peft_type"], "LORA");

    // Load back: every adapter tensor bit-identical.
    let (again, cfg2, _) = load_adapter(base::<Cpu>(), tmp.path()).unwrap();
    assert_eq!(cfg2.r, cfg.r);
    let a: Vec<(String, Vec<f32>)> = adapter_tensors(&model)
        .into_iter()
        .map(|(k, t)| (k, floats(t)))
        .collect();
    let b: Vec<(String, Vec<f32>)> = adapter_tensors(&again)
        .into_iter()
        .map(|(k, t)| (k, floats(t)))
        .collect();
    assert_eq!(a.len(), 14 * 2);
    assert!(a == b, "save -> load changed adapter values");
}

#[test]
fn trainable_parameter_report_equals_peft_for_qwen25_7b() {
    let Some(shared) = shared_data_or_skip("trainable_parameter_report_equals_peft_for_qwen25_7b")
    else {
        return;
    };
    let peft: serde_json::Value = read_json(&peft_dir().join("peft_reference.json"));
    let want = &peft["qwen2.5-7b-tutorial"];
    let cfg =
        Qwen2Config::from_file(&shared.join("qwen2.5-configs/Qwen2.5-7B-Instruct/config.json"))
            .unwrap();
    // Lazy parameters: the 7.6B base weights are never allocated; only the 20M adapter values are.
    let model = Qwen2ForCausalLM::<Cpu>::new(&cfg, &Default::default());
    let (_, report) = apply_lora(model, &lora_trainer::recipe::lora_config()).unwrap();
    println!("{report}");
    assert_eq!(report.trainable as u64, want["trainable"].as_u64().unwrap());
    assert_eq!(report.all as u64, want["all"].as_u64().unwrap());
    assert_eq!(report.to_string(), want["line"].as_str().unwrap());

    let tiny = &peft["tiny"];
    let (_, report) = apply_lora(base::<Cpu>(), &lora_trainer::recipe::lora_config()).unwrap();
    assert_eq!(report.trainable as u64, tiny["trainable"].as_u64().unwrap());
    assert_eq!(report.all as u64, tiny["all"].as_u64().unwrap());
}

#[test]
fn targeting_rules_follow_peft() {
    let targeted = |cfg: LoraConfig| -> Vec<String> {
        let (_, rep) = apply_lora(base::<Cpu>(), &cfg).unwrap();
        rep.targeted
    };
    let list = |v: &[&str]| {
        Some(ModuleSelector::List(
            v.iter().map(|s| s.to_string()).collect(),
        ))
    };
    // A list entry matches a name or a dotted suffix.
    let t = targeted(LoraConfig {
        target_modules: list(&["q_proj", "mlp.down_proj"]),
        ..LoraConfig::default()
    });
    assert_eq!(
        t,
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.mlp.down_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.mlp.down_proj"
        ]
    );
    // A string is a full-path regex.
    let t = targeted(LoraConfig {
        target_modules: Some(ModuleSelector::Regex(
            r".*\.1\.self_attn\.(k|v)_proj".into(),
        )),
        ..LoraConfig::default()
    });
    assert_eq!(
        t,
        [
            "model.layers.1.self_attn.k_proj",
            "model.layers.1.self_attn.v_proj"
        ]
    );
    // all-linear: everything but the output head.
    let t = targeted(LoraConfig {
        target_modules: Some(ModuleSelector::Regex("all-linear".into())),
        ..LoraConfig::default()
    });
    assert_eq!(t.len(), 14);
    assert!(!t.contains(&"lm_head".to_string()));
    // layers_to_transform and exclude_modules.
    let t = targeted(LoraConfig {
        target_modules: list(&["q_proj", "v_proj"]),
        layers_to_transform: Some(lora_core::LayerSelector::Many(vec![1])),
        exclude_modules: list(&["v_proj"]),
        ..LoraConfig::default()
    });
    assert_eq!(t, ["model.layers.1.self_attn.q_proj"]);
    // rank_pattern / alpha_pattern / rslora.
    let cfg = LoraConfig {
        target_modules: list(&["q_proj", "down_proj"]),
        rank_pattern: [("down_proj".to_string(), 2)].into(),
        alpha_pattern: [("q_proj".to_string(), 4.0)].into(),
        use_rslora: true,
        r: 4,
        lora_alpha: 16.0,
        ..LoraConfig::default()
    };
    let (mut m, _) = apply_lora(base::<Cpu>(), &cfg).unwrap();
    let l = &m.model.layers[0];
    assert_eq!(
        l.mlp.down_proj.lora_A.as_ref().unwrap().weight.dims(),
        [2, 128]
    );
    assert_eq!(
        l.self_attn.q_proj.lora_A.as_ref().unwrap().weight.dims(),
        [4, 64]
    );
    assert_eq!(l.self_attn.q_proj.scaling, 4.0 / 2.0);
    assert_eq!(l.mlp.down_proj.scaling, 16.0 / 2f64.sqrt());
    assert_eq!(m.lora_linears().len(), 15, "14 projections + lm_head");
}

#[test]
fn bad_configs_and_adapters_are_refused_with_names() {
    let list = |v: &[&str]| {
        Some(ModuleSelector::List(
            v.iter().map(|s| s.to_string()).collect(),
        ))
    };
    let e = apply_lora(
        base::<Cpu>(),
        &LoraConfig {
            target_modules: list(&["query"]),
            ..LoraConfig::default()
        },
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, LoraError::NoTarget { .. }) && msg.contains("q_proj") && msg.contains("query"),
        "{msg}"
    );

    let e = apply_lora(
        base::<Cpu>(),
        &LoraConfig {
            r: 0,
            ..lora_trainer::recipe::lora_config()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("`r` is 0"), "{e}");

    // An adapter whose config claims another rank than its tensors: shape mismatch naming module.
    let tmp = tempfile::tempdir().unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(peft_dir().join(f), tmp.path().join(f)).unwrap();
    }
    let cfgp = tmp.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&cfgp)
        .unwrap()
        .replace("\"r\": 8", "\"r\": 4");
    std::fs::write(&cfgp, text).unwrap();
    let e = load_adapter(base::<Cpu>(), tmp.path()).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, LoraError::ShapeMismatch { .. })
            && msg.contains("[4, 64]")
            && msg.contains("[8, 64]"),
        "{msg}"
    );

    // A DoRA config over a plain adapter's tensors: the missing magnitude is named.
    let text = std::fs::read_to_string(peft_dir().join("adapter_config.json"))
        .unwrap()
        .replace("\"use_dora\": false", "\"use_dora\": true");
    std::fs::write(&cfgp, text).unwrap();
    let e = load_adapter(base::<Cpu>(), tmp.path()).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, LoraError::MissingTensor { .. }) && msg.contains("lora_magnitude_vector"),
        "{msg}"
    );

    // Unsupported PEFT features in a file are named.
    let text = std::fs::read_to_string(peft_dir().join("adapter_config.json"))
        .unwrap()
        .replace("\"fan_in_fan_out\": false", "\"fan_in_fan_out\": true")
        .replace(
            "\"layer_replication\": null",
            "\"layer_replication\": [[0, 2]]",
        );
    std::fs::write(&cfgp, text).unwrap();
    let msg = load_adapter(base::<Cpu>(), tmp.path())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("fan_in_fan_out") && msg.contains("layer_replication"),
        "{msg}"
    );
    assert!(
        msg.contains("adapter_config.json") || msg.contains("PEFT features"),
        "{msg}"
    );
}

#[test]
fn gaussian_and_false_inits_have_peft_statistics() {
    let mut cfg = lora_trainer::recipe::lora_config();
    cfg.init_lora_weights = InitLoraWeights::Named("gaussian".into());
    let (m, _) = apply_lora(base::<Cpu>(), &cfg).unwrap();
    let b = floats(
        m.model.layers[0]
            .mlp
            .up_proj
            .lora_B
            .as_ref()
            .unwrap()
            .weight
            .val(),
    );
    assert!(b.iter().all(|v| *v == 0.0));
    cfg.init_lora_weights = InitLoraWeights::Bool(false);
    let (m, _) = apply_lora(base::<Cpu>(), &cfg).unwrap();
    let a = floats(
        m.model.layers[0]
            .mlp
            .down_proj
            .lora_A
            .as_ref()
            .unwrap()
            .weight
            .val(),
    );
    let b = floats(
        m.model.layers[0]
            .mlp
            .down_proj
            .lora_B
            .as_ref()
            .unwrap()
            .weight
            .val(),
    );
    // A: U(±1/sqrt(in = 128)); B: U(±1/sqrt(r = 8)).
    let (amax, bmax) = (max_abs(&a), max_abs(&b));
    assert!(
        amax <= 1.0 / 128f32.sqrt() && amax > 0.8 / 128f32.sqrt(),
        "{amax}"
    );
    assert!(
        bmax <= 1.0 / 8f32.sqrt() && bmax > 0.8 / 8f32.sqrt(),
        "{bmax}"
    );
    let _ = m.num_params();
}

#[test]
fn peft_adapter_config_round_trips() {
    let text = std::fs::read_to_string(peft_dir().join("adapter_config.json")).unwrap();
    let original: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cfg: LoraConfig = serde_json::from_str(&text).unwrap();
    cfg.validate().unwrap();
    let back = serde_json::to_value(&cfg).unwrap();
    for (k, v) in original.as_object().unwrap() {
        // Numbers may change form (32 -> 32.0); compare as f64 where numeric.
        // `null` fields may be omitted (exclude_modules is, for older PEFT releases).
        let same = back.get(k) == Some(v)
            || (v.is_number() && back.get(k).and_then(|b| b.as_f64()) == v.as_f64())
            || (v.is_null() && back.get(k).is_none());
        assert!(
            same,
            "field {k}: PEFT wrote {v}, we write {:?}",
            back.get(k)
        );
    }
}

/// A Rust-initialized adapter (ours, not PEFT's) with our logits, for the reverse check: PEFT (current
/// and the tutorial's 0.11.1) loads it and reproduces these logits (`scripts/check_peft_loads_ours.py`).
const RUST_ADAPTER: &str = "rust-adapter-tiny-tied";

fn rust_adapter_cfg() -> LoraConfig {
    LoraConfig {
        task_type: Some("CAUSAL_LM".into()),
        r: 4,
        lora_alpha: 16.0,
        target_modules: Some(ModuleSelector::Regex("all-linear".into())),
        init_lora_weights: InitLoraWeights::Bool(false),
        base_model_name_or_path: Some("tests/fixtures/tiny-tied-f32".into()),
        ..LoraConfig::default()
    }
}

/// Regenerates the fixture: `cargo test --release --test lora -- --ignored write_rust_adapter_fixture`.
#[test]
#[ignore]
fn write_rust_adapter_fixture() {
    use burn::tensor::backend::Backend;
    Cpu::seed(&Default::default(), 2026);
    let base = load_model::<Cpu>(
        &fixtures().join("tiny-tied-f32"),
        DType::F32,
        &Default::default(),
    )
    .unwrap()
    .model;
    let (model, _) = apply_lora(base, &rust_adapter_cfg()).unwrap();
    let dir = fixtures().join(RUST_ADAPTER);
    save_adapter(&model, &rust_adapter_cfg(), &dir).unwrap();
    let r = read_reference(&fixtures().join("tiny-tied-f32/reference.safetensors"));
    let logits = floats(model.forward(
        int2(&r["input_ids"]),
        Some(int2(&r["attention_mask"])),
        None,
    ));
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        r["logits"].shape.clone(),
        &bytes,
    )
    .unwrap();
    std::fs::write(
        dir.join("reference.safetensors"),
        safetensors::serialize([("logits", view)], None).unwrap(),
    )
    .unwrap();
}

#[test]
fn rust_adapter_fixture_reloads_to_its_logits() {
    let dir = fixtures().join(RUST_ADAPTER);
    let base = load_model::<Cpu>(
        &fixtures().join("tiny-tied-f32"),
        DType::F32,
        &Default::default(),
    )
    .unwrap()
    .model;
    let (model, cfg, report) = load_adapter(base, &dir).unwrap();
    assert_eq!(cfg.target_modules, rust_adapter_cfg().target_modules);
    assert_eq!(report.targeted.len(), 14);
    let inputs = read_reference(&fixtures().join("tiny-tied-f32/reference.safetensors"));
    let want = read_reference(&dir.join("reference.safetensors"));
    let got = floats(model.forward(
        int2(&inputs["input_ids"]),
        Some(int2(&inputs["attention_mask"])),
        None,
    ));
    // Not bitwise: the stored logits come from the GEMM kernel of the CPU that wrote them, and the
    // kernel (AVX2 or AVX-512, picked at run time) changes the summation order at the 1e-6 level.
    // The adapter file's own round trip is bitwise (`save_then_load_is_bitwise_and_matches_peft_layout`).
    assert_close("rust adapter logits", &got, &want["logits"].f32, 2e-5);
}

#[test]
fn label_aware_head_gives_peft_loss_and_gradients() {
    use lora_trainer::label_aware_loss_sum;
    let r = read_reference(&peft_dir().join("reference.safetensors"));
    let (model, _, _) = load_adapter(base::<Ad>(), &peft_dir()).unwrap();
    let (ids, mask, labels) = (
        int2::<Ad>(&r["input_ids"]),
        int2::<Ad>(&r["attention_mask"]),
        int2::<Ad>(&r["labels"]),
    );
    let hidden = model.forward_hidden(ids, Some(mask), None);
    let n_sup = r["labels"]
        .i64
        .chunks(10)
        .map(|row| row[1..].iter().filter(|&&l| l != -100).count())
        .sum::<usize>();
    let loss = label_aware_loss_sum(hidden, labels, |h| model.logits(h)).div_scalar(n_sup as f64);
    let got = floats(loss.clone())[0] as f64;
    let want = r["loss"].f32[0] as f64;
    assert!(
        (got - want).abs() / want <= LOSS_REL_TOL,
        "label-aware loss {got} vs PEFT {want}"
    );
    let grads = loss.backward();
    for (path, p) in adapter_tensors(&model) {
        let g: Tensor<Cpu, 2> = p.grad(&grads).unwrap();
        let want = &r[&format!("grad.{path}")].f32;
        assert_close_scaled(
            &format!("label-aware grad {path}"),
            &floats(g),
            want,
            GRAD_REL_TOL,
        );
    }
}
