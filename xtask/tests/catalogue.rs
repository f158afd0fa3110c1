//! The bad-input catalogue through the command line: every case exits with code 1 and one clear
//! message naming the file, key, record or option (no panic, no backtrace), and writes no adapter.

use std::path::{Path, PathBuf};

use test_support::{copy_dir_files, edit_safetensors, fixtures, xtask_demo};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

#[test]
fn every_bad_input_gets_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| -> PathBuf { tmp.path().join(p) };
    // A tiny model, tokenizer and dataset of our own (the built-in demo writes them).
    let (model, data) = xtask_demo(XTASK, &t("demo"));
    let m = model.to_str().unwrap();
    let d = data.to_str().unwrap();

    // Broken copies of the model directory.
    let variant = |name: &str, f: &dyn Fn(&Path)| -> String {
        let dir = t(name);
        copy_dir_files(&model, &dir);
        f(&dir);
        dir.to_str().unwrap().to_string()
    };
    let no_config = variant("no_config", &|p| {
        std::fs::remove_file(p.join("config.json")).unwrap()
    });
    let bad_json = variant("bad_json", &|p| {
        std::fs::write(p.join("config.json"), "{\"hidden_size\": ").unwrap()
    });
    let impossible = variant("impossible", &|p| {
        let c = std::fs::read_to_string(p.join("config.json")).unwrap();
        std::fs::write(
            p.join("config.json"),
            c.replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 5"),
        )
        .unwrap()
    });
    let st = |p: &Path| p.join("model.safetensors");
    let truncated = variant("truncated", &|p| {
        let b = std::fs::read(st(p)).unwrap();
        std::fs::write(st(p), &b[..b.len() / 2]).unwrap()
    });
    let corrupt = variant("corrupt", &|p| {
        let mut b = std::fs::read(st(p)).unwrap();
        b[8..20].copy_from_slice(b"not a header");
        std::fs::write(st(p), b).unwrap()
    });
    let wrong_dtype = variant("wrong_dtype", &|p| {
        edit_safetensors(&st(p), |t| {
            t.get_mut("model.norm.weight").unwrap().0 = safetensors::Dtype::I32;
        })
    });
    let missing = variant("missing", &|p| {
        edit_safetensors(&st(p), |t| {
            t.remove("model.layers.1.mlp.up_proj.weight");
        })
    });
    let extra = variant("extra", &|p| {
        edit_safetensors(&st(p), |t| {
            t.insert(
                "model.layers.9.mlp.up_proj.weight".into(),
                (safetensors::Dtype::F32, vec![1], vec![0; 4]),
            );
        })
    });
    let wrong_shape = variant("wrong_shape", &|p| {
        edit_safetensors(&st(p), |t| {
            let e = t.get_mut("model.layers.0.self_attn.o_proj.weight").unwrap();
            e.1 = vec![e.1[1] / 2, e.1[0] * 2];
        })
    });
    let missing_shard = variant("missing_shard", &|p| {
        std::fs::rename(st(p), p.join("model-00001-of-00002.safetensors")).unwrap();
        std::fs::write(
            p.join("model.safetensors.index.json"),
            r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap()
    });
    let no_tokenizer = variant("no_tokenizer", &|p| {
        std::fs::remove_file(p.join("tokenizer.json")).unwrap()
    });
    let bad_tokenizer = variant("bad_tokenizer", &|p| {
        std::fs::write(p.join("tokenizer.json"), "{oops").unwrap()
    });

    // Broken datasets.
    let write = |name: &str, text: &str| -> String {
        std::fs::write(t(name), text).unwrap();
        t(name).to_str().unwrap().to_string()
    };
    let bad_line = write(
        "bad.jsonl",
        "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \n",
    );
    let bad_type = write("type.json", r#"[{"instruction": 5, "output": "b"}]"#);
    let bad_role = write(
        "role.jsonl",
        "{\"messages\": [{\"role\": \"tool\", \"content\": \"x\"}]}\n",
    );
    let empty = write("empty.json", "[]");

    // Adapters: one for another base (the PEFT fixture: hidden 64, ours 128), one using a PEFT
    // feature this project does not implement (GPT-2's Conv1D layout).
    let peft = fixtures().join("peft-tiny-untied");
    let other_base = peft.to_str().unwrap().to_string();
    let unsupported = t("fan-in-fan-out");
    copy_dir_files(&peft, &unsupported);
    let c = std::fs::read_to_string(unsupported.join("adapter_config.json")).unwrap();
    std::fs::write(
        unsupported.join("adapter_config.json"),
        c.replace("\"fan_in_fan_out\": false", "\"fan_in_fan_out\": true"),
    )
    .unwrap();
    let unsupported = unsupported.to_str().unwrap().to_string();
    std::fs::write(t("a_file"), "x").unwrap();
    let not_writable = t("a_file/out").to_str().unwrap().to_string();

    let run = |extra: &[&str], model: &str, data: &str| -> Vec<String> {
        let out = t("out");
        let mut v: Vec<String> = [
            "finetune",
            "--model",
            model,
            "--data",
            data,
            "--output",
            out.to_str().unwrap(),
            "--max-steps",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "missing model dir",
            run(&[], "no/such/model", d),
            "no/such/model",
        ),
        (
            "config.json missing",
            run(&[], &no_config, d),
            "config.json",
        ),
        (
            "config.json invalid",
            run(&[], &bad_json, d),
            "invalid config.json",
        ),
        (
            "config impossible",
            run(&[], &impossible, d),
            "num_attention_heads",
        ),
        (
            "safetensors truncated",
            run(&[], &truncated, d),
            "truncated",
        ),
        (
            "safetensors corrupt header",
            run(&[], &corrupt, d),
            "not a valid safetensors",
        ),
        (
            "wrong dtype",
            run(&[], &wrong_dtype, d),
            "model.norm.weight",
        ),
        (
            "missing tensor",
            run(&[], &missing, d),
            "model.layers.1.mlp.up_proj.weight",
        ),
        (
            "extra tensor",
            run(&[], &extra, d),
            "model.layers.9.mlp.up_proj.weight",
        ),
        ("wrong shape", run(&[], &wrong_shape, d), "o_proj.weight"),
        (
            "index names a missing shard",
            run(&[], &missing_shard, d),
            "model-00002-of-00002.safetensors",
        ),
        (
            "tokenizer missing",
            run(&[], &no_tokenizer, d),
            "tokenizer.json",
        ),
        (
            "tokenizer corrupt",
            run(&[], &bad_tokenizer, d),
            "tokenizer.json",
        ),
        (
            "dataset not found",
            run(&[], m, "no/such/data.json"),
            "no/such/data.json",
        ),
        ("invalid JSON at line N", run(&[], m, &bad_line), "line 2"),
        ("wrong field type", run(&[], m, &bad_type), "instruction"),
        ("unknown role", run(&[], m, &bad_role), "tool"),
        ("empty dataset", run(&[], m, &empty), "empty"),
        (
            "every record truncated away",
            run(&["--max-length", "8"], m, d),
            "no training examples",
        ),
        (
            "adapter for another base",
            run(&["--init-adapter", &other_base], m, d),
            "shape",
        ),
        (
            "unsupported PEFT feature",
            run(&["--init-adapter", &unsupported], m, d),
            "fan_in_fan_out = true",
        ),
        (
            "output dir not writable",
            run(&[], m, d)
                .into_iter()
                .map(|a| {
                    if a.ends_with("/out") {
                        not_writable.clone()
                    } else {
                        a
                    }
                })
                .collect(),
            "a_file",
        ),
        (
            "--device cuda without CUDA",
            run(&["--device", "cuda"], m, d),
            "CUDA",
        ),
        ("r = 0", run(&["--lora-r", "0"], m, d), "`r` is 0"),
        (
            "learning rate < 0",
            run(&["--learning-rate=-1"], m, d),
            "learning_rate",
        ),
        (
            "batch size 0",
            run(&["--per-device-train-batch-size", "0"], m, d),
            "per_device_train_batch_size",
        ),
    ];
    let mut report = Vec::new();
    for (name, args, needle) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, _, err) = test_support::run(XTASK, &args);
        let code = status.code();
        assert_eq!(code, Some(1), "{name}: exit code {code:?}\n{err}");
        assert!(
            err.contains(needle),
            "{name}: message lacks {needle:?}:\n{err}"
        );
        assert!(
            !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
            "{name}: panicked:\n{err}"
        );
        assert!(
            !t("out/adapter_model.safetensors").exists(),
            "{name}: wrote an adapter"
        );
        assert_causes_once(name, &err);
        report.push(format!("{name}: {}", err.lines().next().unwrap_or("")));
    }
    println!("{} cases:\n{}", cases.len(), report.join("\n"));
}

/// Each cause is said once: a `caused by:` line does not repeat what a line above it already says
/// (an I/O error's message ends with its source's text).
fn assert_causes_once(name: &str, err: &str) {
    assert!(!said_twice(err), "{name}: cause said twice:\n{err}");
}

fn said_twice(err: &str) -> bool {
    let lines: Vec<&str> = err.lines().collect();
    lines.iter().enumerate().any(|(i, l)| {
        l.trim_start()
            .strip_prefix("caused by: ")
            .is_some_and(|cause| lines[..i].iter().any(|above| above.contains(cause)))
    })
}

/// The other commands' bad inputs: a file of which every record is skipped (or that is empty), a
/// negative or non-finite number for a float option, a missing file. Exit code 1, one message
/// naming the file or the option (not clap's "unexpected argument" for a negative number), each
/// cause once, and nothing written.
#[test]
fn other_commands_refuse_bad_input_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| -> PathBuf { tmp.path().join(p) };
    let (model, data) = xtask_demo(XTASK, &t("demo"));
    let m = model.to_str().unwrap();
    let d = data.to_str().unwrap();
    std::fs::write(t("empty.json"), "[]").unwrap();
    let empty = t("empty.json");
    let empty = empty.to_str().unwrap();
    let prepared = t("prepared.jsonl");
    let prepared = prepared.to_str().unwrap();
    let merged = t("merged");
    let merged = merged.to_str().unwrap();
    let adapter = t("demo/adapter");
    let adapter = adapter.to_str().unwrap();

    let eval = |extra: &[&'static str], data: &str| -> Vec<String> {
        let mut v: Vec<String> = ["eval", "--model", m, "--data", data]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let args = |a: &[&str]| -> Vec<String> { a.iter().map(|s| s.to_string()).collect() };
    // The chat cases name a model that does not exist: the flags are checked before loading.
    let chat = |flag: &str, value: &str| args(&["chat", "--model", "no/such/model", flag, value]);
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "eval: every record longer than --max-length",
            eval(&["--max-length", "8"], d),
            "--max-length 8",
        ),
        ("eval: empty data file", eval(&[], empty), "no records"),
        (
            "eval: data file not found (cause said once)",
            eval(&[], "no/such/data.json"),
            "no/such/data.json",
        ),
        (
            "prepare: every record longer than --max-length",
            args(&[
                "prepare",
                "--tokenizer",
                m,
                "--data",
                d,
                "--max-length",
                "8",
                "--output",
                prepared,
            ]),
            "--max-length 8",
        ),
        (
            "chat: negative temperature",
            chat("--temperature", "-1"),
            "--temperature -1",
        ),
        (
            "chat: NaN temperature",
            chat("--temperature", "NaN"),
            "--temperature NaN",
        ),
        ("chat: top-p 0", chat("--top-p", "0"), "--top-p 0"),
        ("chat: top-p > 1", chat("--top-p", "1.5"), "--top-p 1.5"),
        (
            "chat: negative repetition penalty",
            chat("--repetition-penalty", "-2"),
            "--repetition-penalty -2",
        ),
        (
            "chat: infinite repetition penalty",
            chat("--repetition-penalty", "inf"),
            "--repetition-penalty inf",
        ),
        (
            "merge: negative shard size",
            args(&[
                "merge",
                "--model",
                m,
                "--adapter",
                adapter,
                "--output",
                merged,
                "--max-shard-size",
                "-5GB",
            ]),
            "--max-shard-size \"-5GB\"",
        ),
        (
            "merge: NaN shard size",
            args(&[
                "merge",
                "--model",
                m,
                "--adapter",
                adapter,
                "--output",
                merged,
                "--max-shard-size",
                "NaN",
            ]),
            "--max-shard-size \"NaN\"",
        ),
    ];
    // Every case is run and every failure listed (not only the first).
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (name, args, needle) in &cases {
        let (status, _, err) = test_support::run(XTASK, args);
        let problem = if status.code() != Some(1) {
            Some(status.to_string())
        } else if !err.contains(needle) {
            Some(format!("message lacks {needle:?}"))
        } else if err.contains("panicked") || err.contains("unexpected argument") {
            Some("panic or clap's unexpected argument".into())
        } else if err.lines().filter(|l| l.starts_with("error:")).count() != 1 {
            Some("not one error line".into())
        } else if said_twice(&err) {
            Some("a cause said twice".into())
        } else {
            None
        };
        match problem {
            Some(p) => failures.push(format!("{name}: {p}:\n{err}")),
            None => report.push(format!("{name}: {}", err.lines().last().unwrap_or(""))),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // prepare left no (empty) file behind; merge wrote nothing.
    assert!(!Path::new(prepared).exists(), "prepare wrote {prepared}");
    assert!(!Path::new(merged).exists(), "merge wrote {merged}");
    println!("{} cases:\n{}", cases.len(), report.join("\n"));

    // A negative count reaches clap's own check, which names the option (usage error, code 2),
    // instead of being taken for an unknown flag.
    for (cmd, flag) in [
        (chat("--top-k", "-1"), "--top-k"),
        (chat("--max-new-tokens", "-5"), "--max-new-tokens"),
        (eval(&["--batch-size", "-1"], d), "--batch-size"),
    ] {
        let (status, _, err) = test_support::run(XTASK, &cmd);
        assert!(!status.success(), "{cmd:?} succeeded");
        assert!(
            err.contains(flag) && err.contains("invalid value '-"),
            "{cmd:?}:\n{err}"
        );
    }
}

/// `parity` run outside the repository (no `tests/fixtures` below the current directory) says to
/// pass `--fixtures`.
#[test]
fn parity_outside_the_repository_names_fixtures() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(XTASK)
        .arg("parity")
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--fixtures"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
