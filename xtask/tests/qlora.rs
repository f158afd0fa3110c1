//! QLoRA from the command line (issue 22): `finetune --load-in-4bit` on the built-in demo, then
//! `chat` and `eval` on the 4-bit base with the adapter it wrote; `info` reports the 4-bit footprint
//! of the real Qwen2.5-7B-Instruct config (at most 5.5 GiB with NF4, double quantization and bf16
//! compute); the 4-bit options name their problems.

use std::path::Path;

use test_support::{run, run_ok, shared_data_or_skip, xtask_demo};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn finetune_chat_and_eval_on_a_4bit_base() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = xtask_demo(XTASK, &tmp.path().join("demo"));
    let out = tmp.path().join("qlora");
    let (stdout, stderr) = run_ok(
        XTASK,
        [
            "finetune",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--output-dir",
            s(&out),
            "--max-steps",
            "4",
            "--per-device-train-batch-size",
            "4",
            "--gradient-accumulation-steps",
            "1",
            "--logging-steps",
            "1",
            "--save-steps",
            "100",
            "--max-length",
            "160",
            "--lint",
            "warn",
            "--template",
            "qwen",
            "--load-in-4bit",
            "--bnb-4bit-use-double-quant",
        ],
    );
    let all = format!("{stdout}{stderr}");
    // 2 layers × 7 projections quantized.
    assert!(all.contains("4-bit: 14 projection weights in nf4"), "{all}");
    let losses: Vec<f64> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 4, "{stdout}");
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(out.join("adapter_model.safetensors").is_file());
    // A plain PEFT adapter: it loads onto the full-precision base too.
    let (answer, _) = run_ok(
        XTASK,
        [
            "chat",
            "--model",
            s(&model),
            "--adapter",
            s(&out),
            "--template",
            "qwen",
            "--prompt",
            "Who are you?",
            "--greedy",
            "--max-new-tokens",
            "8",
            "--load-in-4bit",
            "--bnb-4bit-use-double-quant",
        ],
    );
    assert!(!answer.trim().is_empty() || answer.ends_with('\n'));
    run_ok(
        XTASK,
        [
            "chat",
            "--model",
            s(&model),
            "--adapter",
            s(&out),
            "--template",
            "qwen",
            "--prompt",
            "Who are you?",
            "--greedy",
            "--max-new-tokens",
            "8",
        ],
    );
    let (ev, _) = run_ok(
        XTASK,
        [
            "eval",
            "--model",
            s(&model),
            "--adapter",
            s(&out),
            "--data",
            s(&data),
            "--template",
            "qwen",
            "--max-length",
            "160",
            "--load-in-4bit",
        ],
    );
    assert!(ev.contains("loss"), "{ev}");
}

#[test]
fn info_reports_the_4bit_footprint_of_the_7b_config() {
    let Some(data) = shared_data_or_skip("the Qwen2.5-7B-Instruct config") else {
        return;
    };
    let cfg = data.join("qwen2.5-configs/Qwen2.5-7B-Instruct");
    let (stdout, _) = run_ok(
        XTASK,
        [
            "info",
            "--model",
            s(&cfg),
            "--config-only",
            "--load-in-4bit",
            "--bnb-4bit-use-double-quant",
            "--bnb-4bit-compute-dtype",
            "bfloat16",
        ],
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("4-bit footprint"))
        .unwrap();
    let gib: f64 = line
        .split("): ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(gib <= 5.5, "{line}");
    // The same model in bf16 is 14.2 GiB: the 4-bit figure is not the full-precision one.
    assert!(gib > 4.0, "{line}");
}

#[test]
fn bad_4bit_options_name_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().to_str().unwrap();
    for (args, want) in [
        (
            vec!["info", "--model", m, "--bnb-4bit-quant-type", "nf4"],
            "--load-in-4bit",
        ),
        (
            vec![
                "info",
                "--model",
                m,
                "--load-in-4bit",
                "--bnb-4bit-quant-type",
                "int8",
            ],
            "'int8' for '--bnb-4bit-quant-type",
        ),
        (
            vec![
                "info",
                "--model",
                m,
                "--load-in-4bit",
                "--bnb-4bit-compute-dtype",
                "f8",
            ],
            "'f8' for '--bnb-4bit-compute-dtype",
        ),
        (
            vec!["finetune", "--bnb-4bit-use-double-quant", "--dry-run"],
            "need --load-in-4bit",
        ),
    ] {
        let (status, stdout, stderr) = run(XTASK, &args);
        assert!(!status.success(), "{args:?} succeeded");
        let all = format!("{stdout}{stderr}");
        assert!(all.contains(want), "{args:?}: {all}");
    }
}
