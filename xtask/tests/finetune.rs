//! End to end through the command line: prepare -> finetune (a few steps, a tiny random model with
//! the real Qwen2.5 vocabulary) -> PEFT adapter and checkpoint written -> adapter reloads; and bad
//! input fails with a message and exit code 1, never a panic.

use std::path::Path;

use burn::backend::Flex;
use burn::tensor::DType;
use qwen2::{Qwen2Config, Qwen2ForCausalLM};
use test_support::{read_json, run, run_ok, shared_data_or_skip};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

/// A random Qwen2 with the real vocabulary and a tiny body, written as a model directory.
fn tiny_model(dir: &Path) -> Qwen2Config {
    let cfg = Qwen2Config::new(151_936, 16, 32, 1, 2, 1, true);
    let m = Qwen2ForCausalLM::<Flex>::new(&cfg, &Default::default());
    qwen2::save_model(&m, &cfg, dir).unwrap();
    cfg
}

#[test]
fn finetune_writes_a_reloadable_peft_adapter() {
    let Some(shared) = shared_data_or_skip("finetune_writes_a_reloadable_peft_adapter") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (model, out, data) = (
        tmp.path().join("model"),
        tmp.path().join("out"),
        tmp.path().join("data.json"),
    );
    tiny_model(&model);
    let all: Vec<serde_json::Value> = read_json(&shared.join("huanhuan/huanhuan.json"));
    std::fs::write(&data, serde_json::to_string(&all[..12]).unwrap()).unwrap();
    let tok = shared.join("qwen2.5-tokenizer");
    let (stdout, _) = run_ok(
        XTASK,
        [
            "finetune",
            "--model",
            model.to_str().unwrap(),
            "--tokenizer",
            tok.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--max-steps",
            "3",
            "--per-device-train-batch-size",
            "2",
            "--gradient-accumulation-steps",
            "2",
            "--save-steps",
            "2",
            "--logging-steps",
            "1",
            "--max-length",
            "64",
            // Records cut at 64 tokens lose their end token; this run tests other things.
            "--lint",
            "warn",
            "--gradient-checkpointing",
            "false",
            "--learning-rate",
            "1e-2",
            "--eval-split",
            "0.25",
            "--eval-steps",
            "2",
        ],
    );
    assert!(stdout.contains("trainable params: "), "{stdout}");
    assert_eq!(
        stdout.matches("\"loss\"").count(),
        3,
        "one log line per step:\n{stdout}"
    );
    assert_eq!(
        stdout.matches("\"eval_loss\"").count(),
        2,
        "eval at step 2 and at the end:\n{stdout}"
    );
    assert!(out.join("loss.svg").is_file());

    // `eval` with and without the adapter: one JSON line each, over all 12 records.
    let eval = |adapter: Option<&Path>| -> serde_json::Value {
        let mut args = vec![
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--tokenizer",
            tok.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--max-length",
            "64",
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", a.to_str().unwrap()]);
        }
        let (stdout, _) = run_ok(XTASK, &args);
        serde_json::from_str(stdout.trim()).unwrap()
    };
    let (base_eval, tuned_eval) = (eval(None), eval(Some(&out)));

    // A config file (padded batches; the run above was padding-free, the CPU default), a flag
    // overriding it, and --init-adapter continuing from the trained adapter.
    let cfg_file = tmp.path().join("run.toml");
    std::fs::write(
        &cfg_file,
        "max_steps = 1\nlearning_rate = 1e-3\nper_device_train_batch_size = 2\n\
         gradient_checkpointing = true\nmax_length = 64\nsave_steps = 0\nlogging_steps = 1\n\
         padding_free = false\nlint = \"warn\"\n",
    )
    .unwrap();
    let out2 = tmp.path().join("out2");
    let (stdout2, _) = run_ok(
        XTASK,
        [
            "finetune",
            "--model",
            model.to_str().unwrap(),
            "--tokenizer",
            tok.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output",
            out2.to_str().unwrap(),
            "--config",
            cfg_file.to_str().unwrap(),
            "--max-steps",
            "2",
            "--init-adapter",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(
        stdout2.matches("\"loss\"").count(),
        2,
        "the flag (2 steps) overrides the file (1):\n{stdout2}"
    );
    assert!(out2.join("adapter_model.safetensors").is_file());
    std::fs::write(&cfg_file, "learning_rat = 1e-3\n").unwrap();
    let (status, _, stderr3) = run(
        XTASK,
        [
            "finetune",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--config",
            cfg_file.to_str().unwrap(),
        ],
    );
    assert!(
        !status.success() && stderr3.contains("learning_rat"),
        "a misspelt option must be refused:\n{stderr3}"
    );
    assert_eq!(base_eval["records"], 12);
    assert!(base_eval["supervised_tokens"].as_u64().unwrap() > 0);
    let (lb, lt) = (
        base_eval["loss"].as_f64().unwrap(),
        tuned_eval["loss"].as_f64().unwrap(),
    );
    assert!((base_eval["perplexity"].as_f64().unwrap() - lb.exp()).abs() < 1e-6 * lb.exp());
    assert!(
        lt < lb,
        "fine-tuning on these records should lower their loss: {lb} -> {lt}"
    );
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "metrics.jsonl",
        "checkpoint-2/optimizer.bin",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let base = qwen2::load_model::<Flex>(&model, DType::F32, &Default::default())
        .unwrap()
        .model;
    let (m, cfg, report) = lora_core::load_adapter(base, &out).unwrap();
    assert_eq!((cfg.r, cfg.lora_alpha, report.targeted.len()), (8, 32.0, 7));
    let b = m.model.layers[0]
        .mlp
        .up_proj
        .lora_B
        .as_ref()
        .unwrap()
        .weight
        .val();
    let b = b.into_data().to_vec::<f32>().unwrap();
    assert!(
        b.iter().any(|v| *v != 0.0),
        "training moved lora_B away from zero"
    );
}

#[test]
fn bad_input_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    tiny_model(&model);
    let m = model.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &["finetune", "--model", m, "--data", "no/such/data.json"],
            "no/such/data.json",
        ),
        (
            &["finetune", "--model", "no/such/model", "--data", "x.json"],
            "no/such/model",
        ),
        (
            &[
                "finetune", "--model", m, "--data", "x.json", "--device", "cuda",
            ],
            "CUDA",
        ),
        (
            &[
                "finetune",
                "--model",
                m,
                "--data",
                "x.json",
                "--per-device-train-batch-size",
                "0",
            ],
            "per_device_train_batch_size",
        ),
    ];
    for (args, needle) in cases {
        let (status, stdout, stderr) = run(XTASK, args);
        assert!(!status.success(), "{args:?} succeeded:\n{stdout}");
        assert!(
            stderr.contains(needle),
            "{args:?}: stderr lacks {needle:?}:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    }
}

#[test]
fn built_in_demo_learns_through_the_same_path() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let (stdout, _) = run_ok(
        XTASK,
        [
            "finetune",
            "--output",
            out.to_str().unwrap(),
            "--max-steps",
            "40",
        ],
    );
    let losses: Vec<f64> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 4, "{stdout}");
    assert!(
        losses[3] < 0.6 * losses[0],
        "loss did not fall clearly: {losses:?}"
    );
    for f in [
        "model/tokenizer.json",
        "model/model.safetensors",
        "data.json",
        "adapter/adapter_model.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(
        stdout.contains("before:") && stdout.contains("after:"),
        "{stdout}"
    );
}
