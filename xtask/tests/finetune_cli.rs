//! The `finetune` command line as a user meets it (issue 18, items 3, 4, 8, 10, 11, 12): one
//! template rule for every command, reused output directories, Ctrl-C, output problems reported
//! before the work, options that used to be ignored. Each test runs the binary on the built-in
//! demo's tiny model and dataset (a few seconds, no shared data).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use test_support::{run, run_ok, xtask_demo};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The demo's model directory (with its tokenizer), dataset and trained adapter, under `dir`.
fn demo(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (model, data) = xtask_demo(XTASK, &dir.join("demo"));
    (model, data, dir.join("demo/adapter"))
}

/// `finetune` on the demo's model and data into `out`: a few quick steps, then `extra`.
fn finetune_args<'a>(
    model: &'a Path,
    data: &'a Path,
    out: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "finetune",
        "--model",
        s(model),
        "--data",
        s(data),
        "--output-dir",
        s(out),
        "--per-device-train-batch-size",
        "4",
        "--gradient-accumulation-steps",
        "1",
        "--logging-steps",
        "1",
        "--save-steps",
        "2",
        "--max-length",
        "160",
        // With the qwen template's longer system prompt some demo records lose their end token at
        // 160; these runs test other things (the checks have their own tests).
        "--lint",
        "warn",
    ];
    args.extend_from_slice(extra);
    args
}

/// The `tokens: N (...)` line of a data summary.
fn tokens_line(text: &str) -> &str {
    text.lines()
        .find(|l| l.starts_with("tokens: "))
        .unwrap_or_else(|| panic!("no tokens line in:\n{text}"))
}

/// Item 3: the same data file gives the same tokens in finetune, prepare and eval, by default and
/// with `--template qwen`; every command prints the template and the system prompt it uses.
#[test]
fn one_template_rule_for_every_command() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data, _) = demo(tmp.path());
    for (i, template) in [&[][..], &["--template", "qwen"][..]]
        .into_iter()
        .enumerate()
    {
        let (want_template, want_system) = if template.is_empty() {
            ("seed", lora_data::SEED_DEFAULT_SYSTEM)
        } else {
            ("qwen", lora_data::QWEN_DEFAULT_SYSTEM)
        };
        let style = format!("template {want_template}, system prompt {want_system:?}");

        let out = tmp.path().join(format!("ft{i}"));
        let mut args = finetune_args(&model, &data, &out, &["--max-steps", "1"]);
        args.extend_from_slice(template);
        let (_, ft) = run_ok(XTASK, &args);

        let prepared = tmp.path().join(format!("prepared{i}.jsonl"));
        let mut args = vec![
            "prepare",
            "--data",
            s(&data),
            "--tokenizer",
            s(&model),
            "--output",
            s(&prepared),
            "--max-length",
            "160",
        ];
        args.extend_from_slice(template);
        let (prep, _) = run_ok(XTASK, &args);

        let mut args = vec![
            "eval",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--max-length",
            "160",
        ];
        args.extend_from_slice(template);
        let (_, ev) = run_ok(XTASK, &args);

        let mut args = vec![
            "chat",
            "--model",
            s(&model),
            "--prompt",
            "Who are you?",
            "--max-new-tokens",
            "2",
        ];
        args.extend_from_slice(template);
        let (_, chat) = run_ok(XTASK, &args);

        for (cmd, text) in [("finetune", &ft), ("prepare", &prep), ("eval", &ev)] {
            assert!(
                text.contains(&style),
                "{cmd} {template:?} must print {style}:\n{text}"
            );
        }
        assert!(
            chat.contains(&format!(
                "template: {want_template}\nsystem: {want_system}\n"
            )),
            "chat {template:?}:\n{chat}"
        );
        assert_eq!(
            tokens_line(&ft),
            tokens_line(&prep),
            "finetune vs prepare {template:?}"
        );
        assert_eq!(
            tokens_line(&ev),
            tokens_line(&prep),
            "eval vs prepare {template:?}"
        );
    }
}

/// Item 4 through the command line: a fresh run into a directory holding another run is refused
/// with one line before any work and leaves it alone; `--overwrite-output-dir` replaces it; a
/// resume says where it continues from and counts only its own steps; a resume past
/// `--max-steps` is refused naming both.
#[test]
fn a_used_output_dir_is_refused_replaced_or_resumed() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data, _) = demo(tmp.path());
    let out = tmp.path().join("run");
    run_ok(
        XTASK,
        finetune_args(&model, &data, &out, &["--max-steps", "4"]),
    );
    let metrics = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let adapter = std::fs::read(out.join("adapter_model.safetensors")).unwrap();

    let (status, stdout, stderr) = run(
        XTASK,
        finetune_args(&model, &data, &out, &["--max-steps", "2", "--seed", "5"]),
    );
    assert_eq!(status.code(), Some(1), "{stdout}\n{stderr}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "one line, before any work:\n{stderr}"
    );
    assert!(
        stderr.starts_with("error: ") && stderr.contains("--overwrite-output-dir"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), metrics);
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        adapter
    );
    assert!(out.join("checkpoint-4").is_dir());

    let (stdout, _) = run_ok(
        XTASK,
        finetune_args(
            &model,
            &data,
            &out,
            &["--max-steps", "2", "--overwrite-output-dir"],
        ),
    );
    assert!(stdout.contains("done: 2 steps"), "{stdout}");
    assert!(
        !out.join("checkpoint-4").exists(),
        "the old run's checkpoints are gone"
    );
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2, "only the new run's log:\n{lines}");

    let resume = ["--resume-from-checkpoint", "latest"];
    let (stdout, stderr) = run_ok(
        XTASK,
        finetune_args(
            &model,
            &data,
            &out,
            &[&["--max-steps", "4"][..], &resume[..]].concat(),
        ),
    );
    assert!(
        stderr.contains(&format!(
            "resuming from {} (step 2)",
            s(&out.join("checkpoint-2"))
        )),
        "{stderr}"
    );
    assert!(stdout.contains("done: steps 3-4 (2 this run"), "{stdout}");

    let (status, _, stderr) = run(
        XTASK,
        finetune_args(
            &model,
            &data,
            &out,
            &[&["--max-steps", "3"][..], &resume[..]].concat(),
        ),
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("step 4")
            && stderr.contains("the 3 steps")
            && stderr.contains("--max-steps"),
        "{stderr}"
    );
}

/// Item 8: Ctrl-C stops after the current step, names the last complete checkpoint and prints the
/// command that resumes; that command (with fewer steps) continues from it.
#[cfg(unix)]
#[test]
fn ctrl_c_names_the_checkpoint_and_the_resume_command() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let args = [
        "finetune",
        "--output",
        s(&out),
        "--max-steps",
        "5000",
        "--save-steps",
        "3",
        "--logging-steps",
        "1000",
    ];
    let mut child = Command::new(XTASK)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "no checkpoint saved:\n{seen}"
        );
        seen.push_str(&line);
        if line.starts_with("saved ") {
            break;
        }
    }
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    stderr.read_to_string(&mut seen).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{seen}");
    assert!(seen.contains("interrupted: stopped after step"), "{seen}");
    let (_, after) = seen
        .split_once("the last complete checkpoint is ")
        .expect(&seen);
    let step: usize = after
        .split_once("(step ")
        .and_then(|(_, r)| r.split_once(')'))
        .and_then(|(n, _)| n.parse().ok())
        .expect(&seen);
    assert!(step > 0 && step.is_multiple_of(3), "{seen}");
    let command = format!(
        "cargo xtask {} --resume-from-checkpoint latest",
        args.join(" ")
    );
    assert!(seen.contains(&command), "must print `{command}`:\n{seen}");

    // The printed command, with a shorter run so that the test stays quick.
    let resume: Vec<String> = command
        .split(' ')
        .skip(2)
        .map(|a| {
            if a == "5000" {
                (step + 2).to_string()
            } else {
                a.to_string()
            }
        })
        .collect();
    let (stdout, stderr) = run_ok(XTASK, &resume);
    assert!(stderr.contains(&format!("(step {step})")), "{stderr}");
    assert!(
        stdout.contains(&format!(
            "done: steps {}-{} (2 this run",
            step + 1,
            step + 2
        )),
        "{stdout}"
    );
}

/// Item 10: an output that is a file or cannot be created is reported before the data is
/// tokenized or the model loaded (finetune), before merging (merge), and with the path the user
/// gave (prepare).
#[test]
fn output_problems_are_reported_before_the_work() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data, adapter) = demo(tmp.path());
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let under_file = file.join("out");

    for (out, needle) in [(&file, "is a file"), (&under_file, "cannot create")] {
        let (status, stdout, stderr) = run(
            XTASK,
            finetune_args(&model, &data, out, &["--max-steps", "1"]),
        );
        assert_eq!(status.code(), Some(1), "{stdout}\n{stderr}");
        assert!(
            stderr.contains(needle) && stderr.contains(s(out)),
            "{stderr}"
        );
        assert!(
            !stderr.contains("train data") && !stdout.contains("loaded"),
            "reported only after the work:\n{stdout}\n{stderr}"
        );
    }

    let (status, stdout, stderr) = run(
        XTASK,
        [
            "merge",
            "--model",
            s(&model),
            "--adapter",
            s(&adapter),
            "--output",
            s(&under_file),
        ],
    );
    assert_eq!(status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains(s(&under_file)), "{stderr}");
    assert!(
        !stdout.contains("merged"),
        "checked only after merging:\n{stdout}"
    );

    let missing = tmp.path().join("no/such/dir/out.jsonl");
    let (status, stdout, stderr) = run(
        XTASK,
        [
            "prepare",
            "--data",
            s(&data),
            "--tokenizer",
            s(&model),
            "--output",
            s(&missing),
        ],
    );
    assert_eq!(status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(s(&missing)) && stderr.contains("does not exist"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(".prepare-"),
        "names a temporary file:\n{stderr}"
    );
}

/// Items 11 and 12: options that did nothing or failed late are refused up front, naming the
/// option; `--eval-split` prints the sizes; `--init-adapter` says that its own rank wins.
#[test]
fn useless_options_are_refused_or_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data, adapter) = demo(tmp.path());
    let out = tmp.path().join("run");
    for (extra, needle) in [
        (&["--lora-alpha", "0"][..], "--lora-alpha 0"),
        (&["--lora-r", "0"][..], "--lora-r 0"),
        (&["--lora-dropout", "1"][..], "--lora-dropout 1"),
        (&["--eval-split", "1.5"][..], "--eval-split 1.5"),
        (&["--bf16"][..], "--bf16 on --device cpu"),
    ] {
        let args = finetune_args(
            &model,
            &data,
            &out,
            &[&["--max-steps", "1"][..], extra].concat(),
        );
        let (status, stdout, stderr) = run(XTASK, &args);
        assert_eq!(status.code(), Some(1), "{extra:?}:\n{stdout}\n{stderr}");
        assert!(
            stderr.contains(needle),
            "{extra:?}: lacks {needle:?}:\n{stderr}"
        );
        assert!(
            !stderr.contains("train data"),
            "{extra:?} checked late:\n{stderr}"
        );
    }

    let (_, stderr) = run_ok(
        XTASK,
        finetune_args(
            &model,
            &data,
            &out,
            &["--max-steps", "1", "--eval-split", "0.25"],
        ),
    );
    assert!(
        stderr.contains("--eval-split 0.25: 54 train, 18 eval examples"),
        "{stderr}"
    );

    let (_, stderr) = run_ok(
        XTASK,
        finetune_args(
            &model,
            &data,
            &tmp.path().join("run2"),
            &[
                "--max-steps",
                "1",
                "--init-adapter",
                s(&adapter),
                "--lora-r",
                "16",
            ],
        ),
    );
    assert!(
        stderr.contains("its adapter_config.json wins (r 8")
            && stderr.contains("ignored: --lora-r 16"),
        "{stderr}"
    );
}

/// PEFT's LoRA variants by their PEFT names: `--use-dora`, `--lora-bias` and
/// `--init-lora-weights olora` train and write PEFT's config fields and tensor keys; impossible
/// combinations and a misspelt init are refused in one line before any work, never by a panic.
#[test]
fn lora_variants_train_and_write_peft_s_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data, _) = demo(tmp.path());
    for (name, flags, field, want, key) in [
        (
            "dora",
            &["--use-dora"][..],
            "use_dora",
            serde_json::json!(true),
            "lora_magnitude_vector",
        ),
        (
            "bias",
            &["--lora-bias"][..],
            "lora_bias",
            serde_json::json!(true),
            "lora_B.bias",
        ),
        (
            "olora",
            &["--init-lora-weights", "olora"][..],
            "init_lora_weights",
            serde_json::json!("olora"),
            "lora_A.weight",
        ),
    ] {
        let out = tmp.path().join(name);
        let args = finetune_args(
            &model,
            &data,
            &out,
            &[&["--max-steps", "2"][..], flags].concat(),
        );
        let (stdout, _) = run_ok(XTASK, &args);
        assert!(stdout.contains("done: 2 steps"), "{name}: {stdout}");
        let cfg: serde_json::Value = test_support::read_json(&out.join("adapter_config.json"));
        assert_eq!(cfg[field], want, "{name}: {cfg}");
        let st = test_support::read_safetensors(&out.join("adapter_model.safetensors"));
        // Two layers, seven projections each.
        let n = st.keys().filter(|k| k.ends_with(key)).count();
        assert_eq!(n, 14, "{name}: {key}: {:?}", st.keys().collect::<Vec<_>>());
        let (info, _) = run_ok(XTASK, ["info", "--adapter", s(&out)]);
        assert!(info.contains(&format!(" {field} {want}")), "{name}: {info}");
    }

    let out = tmp.path().join("refused");
    for (extra, needle) in [
        (
            &["--init-lora-weights", "pisa"][..],
            "`init_lora_weights` \"pisa\" is not supported",
        ),
        (
            &["--use-dora", "--lora-bias"][..],
            "`lora_bias` = true is not supported with DoRA",
        ),
        (
            &["--lora-bias", "--weight-decay", "0.01"][..],
            "--weight-decay 0.01 with --lora-bias",
        ),
    ] {
        let args = finetune_args(
            &model,
            &data,
            &out,
            &[&["--max-steps", "1"][..], extra].concat(),
        );
        let (status, stdout, stderr) = run(XTASK, &args);
        assert_eq!(status.code(), Some(1), "{extra:?}:\n{stdout}\n{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{extra:?}: {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(needle),
            "{extra:?}: lacks {needle:?}:\n{stderr}"
        );
        assert!(!out.exists(), "{extra:?}: wrote {}", out.display());
    }
}

#[test]
fn embeddings_train_and_pissa_olora_runs_also_write_a_plain_lora() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data, _) = demo(tmp.path());
    for (name, flags, key) in [
        (
            "saved",
            &["--modules-to-save", "embed_tokens"][..],
            "base_model.model.model.embed_tokens.weight",
        ),
        (
            "tokens",
            &["--trainable-token-indices", "5,9"][..],
            "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
        ),
    ] {
        let out = tmp.path().join(name);
        let args = finetune_args(
            &model,
            &data,
            &out,
            &[&["--max-steps", "2"][..], flags].concat(),
        );
        let (stdout, _) = run_ok(XTASK, &args);
        assert!(stdout.contains("done: 2 steps"), "{name}: {stdout}");
        let st = test_support::read_safetensors(&out.join("adapter_model.safetensors"));
        let (_, shape, _) = st
            .get(key)
            .unwrap_or_else(|| panic!("{name}: no {key}: {:?}", st.keys().collect::<Vec<_>>()));
        if name == "tokens" {
            assert_eq!(shape[0], 2, "{name}: {shape:?}");
        }
    }

    // OLoRA: the adapter for the residual base, the init's factors, and the plain LoRA of rank 2r.
    let out = tmp.path().join("olora");
    let args = finetune_args(
        &model,
        &data,
        &out,
        &[
            "--max-steps",
            "2",
            "--init-lora-weights",
            "olora",
            "--lora-r",
            "4",
        ],
    );
    let (stdout, _) = run_ok(XTASK, &args);
    assert!(stdout.contains("adapter-lora"), "{stdout}");
    let plain: serde_json::Value =
        test_support::read_json(&out.join("adapter-lora/adapter_config.json"));
    assert_eq!(
        (plain["r"].clone(), plain["init_lora_weights"].clone()),
        (serde_json::json!(8), serde_json::json!(true))
    );
    assert!(out
        .join("initial-adapter/adapter_model.safetensors")
        .is_file());
    let st = test_support::read_safetensors(&out.join("adapter-lora/adapter_model.safetensors"));
    let (_, shape, _) = &st["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"];
    assert_eq!(shape[0], 8);
}
