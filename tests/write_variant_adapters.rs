//! Writes, for each LoRA variant (DoRA, `lora_bias`, PiSSA, OLoRA, `modules_to_save`,
//! `trainable_token_indices`), an adapter trained by this
//! project's trainer on the tiny fixture base, and the logits our model gives with it, for
//! `scripts/check_peft_loads_variants.py` to load in PEFT and compare. Ignored: it needs a
//! directory to write to, given by `FERROLORA_VARIANT_ADAPTERS`:
//!
//! ```sh
//! FERROLORA_VARIANT_ADAPTERS=target/variants cargo test --release --test write_variant_adapters \
//!     -- --ignored
//! ```
//!
//! Each `<dir>/<variant>/` holds the trainer's final adapter (`adapter_model.safetensors`,
//! `adapter_config.json`) and `reference.safetensors` with `logits` `[3, 10, 256]` for the inputs
//! of `tests/fixtures/tiny-untied-f32-sharded/reference.safetensors`.

mod common;

use std::path::PathBuf;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::DType;
use common::{floats, int2};
use ferrolora::Cpu;
use lora_core::{apply_lora, InitLoraWeights, LoraConfig, ModuleSelector};
use lora_data::{Collator, Example};
use lora_trainer::{train, TrainEvent, TrainingArguments};
use test_support::{fixtures, read_reference};

type Ad = Autodiff<Cpu>;

const ALL: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The variant's config: r 8, alpha 32 (rsLoRA for DoRA, so that a scaling other than alpha / r
/// is exercised too), dropout 0 (the logits are compared in one forward), the seven projections.
fn config(variant: &str) -> LoraConfig {
    let mut cfg = LoraConfig {
        task_type: Some("CAUSAL_LM".into()),
        r: 8,
        lora_alpha: 32.0,
        lora_dropout: 0.0,
        target_modules: Some(ModuleSelector::List(ALL.map(String::from).to_vec())),
        base_model_name_or_path: Some("tests/fixtures/tiny-untied-f32-sharded".into()),
        ..LoraConfig::default()
    };
    match variant {
        "dora" => {
            cfg.use_dora = true;
            cfg.use_rslora = true;
        }
        "lora-bias" => cfg.set_lora_bias(true),
        "pissa" | "olora" => cfg.init_lora_weights = InitLoraWeights::Named(variant.into()),
        "modules-to-save" => {
            cfg.modules_to_save = Some(vec!["lm_head".into(), "embed_tokens".into()])
        }
        "trainable-tokens" => cfg.set_trainable_token_indices(Some(&[1, 5, 7, 200])),
        v => panic!("unknown variant {v}"),
    }
    cfg
}

/// Toy records over the fixture's 256-token vocabulary: 6-14 tokens, the first 3 unsupervised.
fn examples(n: usize) -> Vec<Example> {
    let mut s = 2026u64;
    (0..n)
        .map(|i| {
            let len = 6 + (i * 5) % 9;
            let ids: Vec<u32> = (0..len)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    1 + ((s >> 33) % 255) as u32
                })
                .collect();
            let labels = ids
                .iter()
                .enumerate()
                .map(|(j, &t)| if j < 3 { -100 } else { i64::from(t) })
                .collect();
            Example {
                attention_mask: vec![1; len],
                input_ids: ids,
                labels,
            }
        })
        .collect()
}

#[test]
#[ignore]
fn write_variant_adapters() {
    let Some(root) = std::env::var_os("FERROLORA_VARIANT_ADAPTERS").map(PathBuf::from) else {
        panic!("set FERROLORA_VARIANT_ADAPTERS to the directory to write into");
    };
    let base_dir = fixtures().join("tiny-untied-f32-sharded");
    let r = read_reference(&base_dir.join("reference.safetensors"));
    for variant in [
        "dora",
        "lora-bias",
        "pissa",
        "olora",
        "modules-to-save",
        "trainable-tokens",
    ] {
        let cfg = config(variant);
        Ad::seed(&Default::default(), 7);
        let base = qwen2::load_model::<Ad>(&base_dir, DType::F32, &Default::default())
            .unwrap()
            .model;
        let (model, _) = apply_lora(base, &cfg).unwrap();
        let dir = root.join(variant);
        // A learning rate high enough that every adapter tensor (magnitudes, biases, PiSSA's and
        // OLoRA's factors) ends far from its initial value in a few steps.
        let args = TrainingArguments {
            output_dir: dir.clone(),
            per_device_train_batch_size: 4,
            learning_rate: 1e-2,
            max_steps: Some(6),
            logging_steps: 6,
            save_steps: 0,
            overwrite_output_dir: true,
            ..TrainingArguments::default()
        };
        let (model, outcome) = train(
            model,
            &cfg,
            &examples(24),
            &[],
            Collator::new(0),
            &args,
            &Default::default(),
            &mut |_: &TrainEvent| true,
        )
        .unwrap();
        assert_eq!(outcome.adapter_dir, dir);
        let logits = floats(model.forward(
            int2::<Ad>(&r["input_ids"]),
            Some(int2::<Ad>(&r["attention_mask"])),
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
        println!("wrote {}", dir.display());
    }
}
