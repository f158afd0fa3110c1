//! End to end through the command line: prepare -> finetune (a few steps, a tiny random model with
//! the real Qwen2.5 vocabulary) -> PEFT adapter and checkpoint written -> adapter reloads; and bad
//! input fails with a message and exit code 1, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::backend::Flex;
use burn::tensor::DType;
use qwen2::{Qwen2Config, Qwen2ForCausalLM};

/// `FERROLORA_SHARED_DATA`, else `../shared/data`; skip outside CI when absent, fail under CI.
fn shared_data() -> Option<PathBuf> {
    let p = std::env::var_os("FERROLORA_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"));
    if p.is_dir() {
        return Some(p);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but the shared data directory is missing; set FERROLORA_SHARED_DATA");
    }
    eprintln!("skipping: shared data not found; set FERROLORA_SHARED_DATA to the directory holding qwen2.5-tokenizer/ and huanhuan/");
    None
}

/// A random Qwen2 with the real vocabulary and a tiny body, written as a model directory.
fn tiny_model(dir: &Path) -> Qwen2Config {
    let cfg = Qwen2Config::new(151_936, 16, 32, 1, 2, 1, true);
    let m = Qwen2ForCausalLM::<Flex>::new(&cfg, &Default::default());
    qwen2::save_model(&m, &cfg, dir).unwrap();
    cfg
}

fn xtask(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn finetune_writes_a_reloadable_peft_adapter() {
    let Some(shared) = shared_data() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (model, out, data) = (
        tmp.path().join("model"),
        tmp.path().join("out"),
        tmp.path().join("data.json"),
    );
    tiny_model(&model);
    let all: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(shared.join("huanhuan/huanhuan.json")).unwrap(),
    )
    .unwrap();
    std::fs::write(&data, serde_json::to_string(&all[..12]).unwrap()).unwrap();
    let tok = shared.join("qwen2.5-tokenizer");
    let (ok, stdout, stderr) = xtask(&[
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
        "--gradient-checkpointing",
        "false",
        "--learning-rate",
        "1e-2",
        "--eval-split",
        "0.25",
        "--eval-steps",
        "2",
    ]);
    assert!(ok, "finetune failed:\n{stdout}\n{stderr}");
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
        let (ok, stdout, stderr) = xtask(&args);
        assert!(ok, "eval failed:\n{stderr}");
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
         padding_free = false\n",
    )
    .unwrap();
    let out2 = tmp.path().join("out2");
    let (ok, stdout2, stderr2) = xtask(&[
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
    ]);
    assert!(ok, "finetune with --config failed:\n{stdout2}\n{stderr2}");
    assert_eq!(
        stdout2.matches("\"loss\"").count(),
        2,
        "the flag (2 steps) overrides the file (1):\n{stdout2}"
    );
    assert!(out2.join("adapter_model.safetensors").is_file());
    std::fs::write(&cfg_file, "learning_rat = 1e-3\n").unwrap();
    let (ok, _, stderr3) = xtask(&[
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--config",
        cfg_file.to_str().unwrap(),
    ]);
    assert!(
        !ok && stderr3.contains("learning_rat"),
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
        let (ok, stdout, stderr) = xtask(args);
        assert!(!ok, "{args:?} succeeded:\n{stdout}");
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
    let (ok, stdout, stderr) = xtask(&[
        "finetune",
        "--output",
        out.to_str().unwrap(),
        "--max-steps",
        "40",
    ]);
    assert!(ok, "demo failed:\n{stdout}\n{stderr}");
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
