//! `cargo xtask merge` and `cargo xtask chat` through the command line: the merged directory has
//! the base's keys, shapes and dtype in shards with an index, and reloads to PEFT's merged logits;
//! chat answers a prompt with the real tokenizer, streams and reports speed, reproducibly with a
//! seed; bad input (an adapter for another base, unsupported PEFT features, no tokenizer, a used
//! output directory) fails with a message naming the problem, never a panic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use burn::backend::Flex;
use burn::tensor::{DType, Int, Tensor, TensorData};
use lora_core::LoraModel;
use qwen2::{Qwen2Config, Qwen2ForCausalLM};
use test_support::{
    assert_within_relative, fixtures, max_abs_err, read_json, read_reference, read_safetensors,
    run, run_ok, shared_data_or_skip, Ref,
};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `key -> (dtype, shape)` over every safetensors file of a model directory.
fn tensors(dir: &Path) -> BTreeMap<String, (String, Vec<usize>)> {
    let mut out = BTreeMap::new();
    for f in qwen2::weight_files(dir).unwrap() {
        for (k, (dtype, shape, _)) in read_safetensors(&f) {
            out.insert(k, (format!("{dtype:?}"), shape));
        }
    }
    out
}

/// Logits of the PEFT fixture's padded batch, as f32.
fn logits(model: &Qwen2ForCausalLM<Flex>) -> Vec<f32> {
    let r = read_reference(&fixtures().join("tiny-untied-f32-sharded/reference.safetensors"));
    let int = |r: &Ref| {
        Tensor::<Flex, 2, Int>::from_data(
            TensorData::new(r.i64.clone(), [r.shape[0], r.shape[1]]),
            &Default::default(),
        )
    };
    model
        .forward(int(&r["input_ids"]), Some(int(&r["attention_mask"])), None)
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap()
}

#[test]
fn merge_writes_sharded_hf_model_equal_to_base_plus_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Default::default();
    let adapter = fixtures().join("peft-tiny-untied");
    for (base, dtype, tol) in [
        ("tiny-untied-f32-sharded", "F32", 2e-5f32),
        ("tiny-untied-bf16", "BF16", 2e-5),
    ] {
        let base_dir = fixtures().join(base);
        let out = tmp.path().join(base);
        let shard = if dtype == "F32" { "300KB" } else { "150KB" };
        let (stdout, _) = run_ok(
            XTASK,
            [
                "merge",
                "--model",
                s(&base_dir),
                "--adapter",
                s(&adapter),
                "--output",
                s(&out),
                "--max-shard-size",
                shard,
            ],
        );
        assert!(stdout.contains("merged 14 LoRA modules"), "{stdout}");

        // Two shards named as transformers names them, and an index that maps every key to one.
        let index: serde_json::Value = read_json(&out.join("model.safetensors.index.json"));
        let map = index["weight_map"].as_object().unwrap();
        let mut shards: Vec<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
        shards.sort();
        shards.dedup();
        assert_eq!(
            shards,
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
        // Same keys, shapes and stored dtype as the base checkpoint; no LoRA tensors.
        let (got, want) = (tensors(&out), tensors(&base_dir));
        let want: BTreeMap<_, _> = want
            .into_iter()
            .filter(|(k, _)| !k.ends_with("inv_freq"))
            .collect();
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        for (k, (dt, shape)) in &got {
            assert_eq!(dt, dtype, "{base}: {k}");
            assert_eq!(shape, &want[k].1, "{base}: {k}");
            assert!(map.contains_key(k), "{k} not in the index");
        }
        let total: u64 = got
            .values()
            .map(|(_, sh)| sh.iter().product::<usize>() as u64 * if dtype == "F32" { 4 } else { 2 })
            .sum();
        assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));
        assert_eq!(
            std::fs::read(out.join("config.json")).unwrap(),
            std::fs::read(base_dir.join("config.json")).unwrap(),
            "config.json copied verbatim"
        );

        // Reloaded merged model == base + adapter (PEFT's unmerged side path), f32 compute. The two
        // differ only in rounding order ((W + sBA)x vs Wx + s(xAᵀ)Bᵀ): 1.1e-5 measured on logits of
        // magnitude ~1, hence 2e-5. For f32 the merged logits also equal PEFT's `merge_and_unload`
        // logits from the fixture (same weights bit for bit, see scripts/check_merge.py).
        let merged = qwen2::load_model::<Flex>(&out, DType::F32, &dev)
            .unwrap()
            .model;
        let base_m = qwen2::load_model::<Flex>(&base_dir, DType::F32, &dev)
            .unwrap()
            .model;
        let (with_adapter, _, _) = lora_core::load_adapter(base_m, &adapter).unwrap();
        let (a, b) = (logits(&merged), logits(&with_adapter));
        let err = max_abs_err(&a, &b);
        if dtype == "F32" {
            assert!(
                err <= tol,
                "{base}: merged vs base+adapter max |diff| {err:e}"
            );
            let peft = read_reference(&fixtures().join("peft-tiny-untied/reference.safetensors"));
            let err = max_abs_err(&a, &peft["logits_merged"].f32);
            assert!(
                err <= tol,
                "{base}: merged vs PEFT merge_and_unload max |diff| {err:e}"
            );
        } else {
            // bf16 storage rounds the f32 sum W + sBA once (PEFT on CPU: `W += delta` promotes to
            // f32): every stored weight is within half a bf16 ulp (unit roundoff 2^-8) of the f32 merge.
            let mut exact = with_adapter;
            lora_core::merge_all(&mut exact).unwrap();
            let mut stored = merged;
            let exact_w: Vec<(String, Vec<f32>)> = exact
                .lora_linears()
                .into_iter()
                .map(|(p, l)| (p, l.weight.val().into_data().to_vec::<f32>().unwrap()))
                .collect();
            for ((path, e), (_, l)) in exact_w.iter().zip(stored.lora_linears()) {
                let got = l.weight.val().into_data().to_vec::<f32>().unwrap();
                assert_within_relative(
                    &format!("{path}: stored vs f32 merge"),
                    &got,
                    e,
                    2f32.powi(-8),
                );
            }
        }
    }
}

#[test]
fn merge_and_chat_refuse_bad_input_with_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = fixtures().join("peft-tiny-untied");

    // An adapter trained on another base: hidden 32 instead of 64.
    let other = tmp.path().join("other-base");
    let cfg = Qwen2Config::new(256, 32, 64, 2, 4, 2, false);
    qwen2::save_model(
        &Qwen2ForCausalLM::<Flex>::new(&cfg, &Default::default()),
        &cfg,
        &other,
    )
    .unwrap();
    let out = tmp.path().join("out");
    let (status, _, err) = run(
        XTASK,
        &[
            "merge",
            "--model",
            s(&other),
            "--adapter",
            s(&adapter),
            "--output",
            s(&out),
        ],
    );
    assert!(!status.success());
    assert!(
        err.contains("model.layers.0.self_attn.q_proj")
            && err.contains("[8, 64]")
            && err.contains("[8, 32]"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.join("config.json").exists(), "nothing written");

    // PEFT features that change the math and are not implemented are named; a DoRA config whose
    // file lacks the magnitudes names the missing tensor.
    let base = fixtures().join("tiny-untied-f32-sharded");
    for (name, key, value, needle) in [
        (
            "fan-in-fan-out",
            "fan_in_fan_out",
            serde_json::json!(true),
            "fan_in_fan_out = true",
        ),
        (
            "dora",
            "use_dora",
            serde_json::json!(true),
            "lora_magnitude_vector",
        ),
    ] {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            adapter.join("adapter_model.safetensors"),
            dir.join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut cfg: serde_json::Value = read_json(&adapter.join("adapter_config.json"));
        cfg[key] = value;
        std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
        let (status, _, err) = run(
            XTASK,
            &[
                "merge",
                "--model",
                s(&base),
                "--adapter",
                s(&dir),
                "--output",
                s(&out),
            ],
        );
        assert!(!status.success() && err.contains(needle), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
    }

    // A used output directory is never overwritten.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let (status, _, err) = run(
        XTASK,
        &[
            "merge",
            "--model",
            s(&base),
            "--adapter",
            s(&adapter),
            "--output",
            s(&out),
        ],
    );
    assert!(!status.success() && err.contains("not empty"), "{err}");
    let (status, _, err) = run(
        XTASK,
        &[
            "merge",
            "--model",
            s(&base),
            "--adapter",
            s(&adapter),
            "--output",
            s(&tmp.path().join("new")),
            "--max-shard-size",
            "big",
        ],
    );
    assert!(
        !status.success() && err.contains("--max-shard-size"),
        "{err}"
    );

    // chat: a model directory without a tokenizer.
    let (status, _, err) = run(XTASK, &["chat", "--model", s(&base), "--prompt", "hi"]);
    assert!(
        !status.success() && err.contains("no tokenizer.json") && err.contains("--tokenizer"),
        "{err}"
    );

    // chat: the adapter for another base, through the command; a broken generation_config.json.
    if let Some(shared) =
        shared_data_or_skip("the chat part of merge_and_chat_refuse_bad_input_with_clear_errors")
    {
        let tok = shared.join("qwen2.5-tokenizer");
        std::fs::write(other.join("generation_config.json"), r#"{"top_p": 2.0}"#).unwrap();
        let (status, _, err) = run(
            XTASK,
            &[
                "chat",
                "--model",
                s(&other),
                "--tokenizer",
                s(&tok),
                "--prompt",
                "hi",
            ],
        );
        assert!(
            !status.success()
                && err.contains("generation_config.json")
                && err.contains("top_p 2 must be in (0, 1]"),
            "{err}"
        );
        std::fs::remove_file(other.join("generation_config.json")).unwrap();
        let (status, _, err) = run(
            XTASK,
            &[
                "chat",
                "--model",
                s(&other),
                "--tokenizer",
                s(&tok),
                "--adapter",
                s(&adapter),
                "--prompt",
                "hi",
            ],
        );
        assert!(
            !status.success()
                && err.contains("q_proj")
                && err.contains("[8, 32]")
                && !err.contains("panicked"),
            "{err}"
        );
    }
}

/// A random model with the real vocabulary in `dir`/model, with the `generation_config.json`
/// Qwen2.5-7B-Instruct ships (the sampling defaults); returns it and the real tokenizer's directory.
fn tiny_chat_model(dir: &Path, shared: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    let cfg = Qwen2Config::new(151_936, 16, 32, 1, 2, 1, true);
    qwen2::save_model(
        &Qwen2ForCausalLM::<Flex>::new(&cfg, &Default::default()),
        &cfg,
        &model,
    )
    .unwrap();
    std::fs::copy(
        shared.join("qwen2.5-configs/Qwen2.5-7B-Instruct/generation_config.json"),
        model.join("generation_config.json"),
    )
    .unwrap();
    (model, shared.join("qwen2.5-tokenizer"))
}

/// A random model with the real vocabulary: the answer's tokens stream to stdout, the speed line
/// goes to stderr; greedy and seeded sampling repeat themselves; `--merge` gives the same answer.
#[test]
fn chat_answers_a_prompt_reproducibly() {
    let Some(shared) = shared_data_or_skip("chat_answers_a_prompt_reproducibly") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (model, tok) = tiny_chat_model(tmp.path(), &shared);
    let run = |extra: &[&str]| {
        let mut args = vec![
            "chat",
            "--model",
            s(&model),
            "--tokenizer",
            s(&tok),
            "--prompt",
            "你是谁？",
            "--max-new-tokens",
            "12",
        ];
        args.extend_from_slice(extra);
        run_ok(XTASK, &args)
    };
    let sys = ["--system", "假设你是皇帝身边的女人--甄嬛。", "--seed", "7"];
    let (a, err) = run(&sys);
    assert!(
        err.contains("sampling (temperature 0.7, top_k 20, top_p 0.8, repetition_penalty 1.05"),
        "defaults from generation_config.json: {err}"
    );
    assert!(err.contains("stop at [151645, 151643]"), "{err}");
    assert!(err.contains("tokens/s") && err.contains("prompt "), "{err}");
    assert!(
        err.contains("system: 假设你是皇帝身边的女人--甄嬛。"),
        "{err}"
    );
    assert_eq!(run(&sys).0, a, "same seed, same answer");
    let (_, err) = run(&["--template", "seed", "--greedy"]);
    assert!(
        err.contains("system: 现在你要扮演皇帝身边的女人--甄嬛"),
        "{err}"
    );
    let (g1, err) = run(&["--template", "qwen", "--greedy"]);
    assert!(err.contains("greedy"), "{err}");
    assert!(
        err.contains("system: You are Qwen, created by Alibaba Cloud."),
        "{err}"
    );
    assert_eq!(run(&["--template", "qwen", "--greedy"]).0, g1);
    assert!(!a.trim().is_empty() || !g1.trim().is_empty());

    // Interactive: two turns from stdin, then `exit`.
    let out = Command::new(XTASK)
        .args([
            "chat",
            "--model",
            s(&model),
            "--tokenizer",
            s(&tok),
            "--max-new-tokens",
            "4",
            "--greedy",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .unwrap()
                .write_all("你好\n\n再说一遍\nexit\n".as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.matches("[prompt ").count(), 2, "two answers: {err}");
    // The second turn continues from the cached first one.
    let second = err
        .lines()
        .filter(|l| l.contains("[prompt "))
        .nth(1)
        .unwrap();
    let cached: usize = second
        .split(" cached)")
        .next()
        .and_then(|h| h.rsplit('(').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(cached >= 20, "system block and first turn reused: {second}");
}

/// The `generation:` line on stderr lists the options that shape the answer: greedy decoding has
/// no temperature, top-k, top-p or seed, so it shows none; sampling shows them all.
#[test]
fn chat_header_lists_only_the_options_that_apply() {
    let Some(shared) = shared_data_or_skip("chat_header_lists_only_the_options_that_apply") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (model, tok) = tiny_chat_model(tmp.path(), &shared);
    let header = |extra: &[&str]| {
        let mut args = vec![
            "chat",
            "--model",
            s(&model),
            "--tokenizer",
            s(&tok),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
        ];
        args.extend_from_slice(extra);
        let (_, err) = run_ok(XTASK, &args);
        err.lines()
            .find(|l| l.starts_with("generation: "))
            .unwrap_or_else(|| panic!("no generation: line in\n{err}"))
            .to_string()
    };
    let stop = "stop at [151645, 151643]";
    assert_eq!(
        header(&["--greedy"]),
        format!("generation: greedy, repetition_penalty 1.05, max_new_tokens 2, {stop}")
    );
    // Sampling at temperature 0 is greedy decoding (HF's rule), and says so.
    assert_eq!(
        header(&["--sample", "--temperature", "0", "--seed", "3"]),
        format!("generation: greedy, repetition_penalty 1.05, max_new_tokens 2, {stop}")
    );
    assert_eq!(
        header(&["--sample", "--seed", "3"]),
        format!(
            "generation: sampling (temperature 0.7, top_k 20, top_p 0.8, repetition_penalty 1.05, \
             seed 3), max_new_tokens 2, {stop}"
        )
    );
}
