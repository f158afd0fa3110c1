//! The checks `finetune` runs before it starts (`--dry-run` stops after them), each against a case
//! built to trip it: an end token cut by --max-length, a record with nothing supervised, an end
//! token generation does not stop on, a seed-trained adapter chatted with the qwen template; the
//! run manifest against `sha256sum`; the not-learning warnings; the memory plan's parts and its
//! "does not fit" path.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use test_support::{run, run_ok, xtask_demo};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");
const SYSTEM: &str = "现在你要扮演皇帝身边的女人--甄嬛";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn demo(tmp: &Path) -> (PathBuf, PathBuf) {
    xtask_demo(XTASK, &tmp.join("demo"))
}

fn finetune<'a>(model: &'a Path, data: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "finetune",
        "--model",
        s(model),
        "--data",
        s(data),
        "--output",
        s(out),
        "--template",
        "qwen",
        "--system",
        SYSTEM,
    ];
    v.extend_from_slice(extra);
    v
}

fn sha256sum(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn each_data_check_names_the_records_it_trips_on() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = demo(tmp.path());
    let out = tmp.path().join("out");

    // End tokens cut by --max-length: an error naming the records; `--lint warn` goes on.
    let (status, _, stderr) = run(
        XTASK,
        finetune(&model, &data, &out, &["--max-length", "96", "--dry-run"]),
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("lose their end token \"<|im_end|>\" to --max-length 96 (records 0, 1,"),
        "{stderr}"
    );
    let (stdout, stderr) = run_ok(
        XTASK,
        finetune(
            &model,
            &data,
            &out,
            &["--max-length", "96", "--dry-run", "--lint", "warn"],
        ),
    );
    assert!(
        stderr.contains("warning: ") && stdout.contains("dry run: the checks passed"),
        "{stderr}"
    );
    assert!(!out.join("adapter_model.safetensors").exists());

    // A record whose answer is entirely beyond --max-length: nothing supervised.
    let mut records: Vec<serde_json::Value> = test_support::read_json(&data);
    records.truncate(6);
    records.push(serde_json::json!({"instruction": "长".repeat(400), "input": "", "output": "好"}));
    let long = tmp.path().join("long.json");
    std::fs::write(&long, serde_json::to_string(&records).unwrap()).unwrap();
    let (status, _, stderr) = run(XTASK, finetune(&model, &long, &out, &["--dry-run"]));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("1 records have no supervised token and are skipped (records 6)"),
        "{stderr}"
    );

    // An end token generation does not stop on.
    let other = tmp.path().join("other-eos");
    test_support::copy_dir_files(&model, &other);
    std::fs::write(
        other.join("generation_config.json"),
        r#"{"eos_token_id": [3]}"#,
    )
    .unwrap();
    let (status, _, stderr) = run(XTASK, finetune(&other, &data, &out, &["--dry-run"]));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("but generation stops on ids [3]"),
        "{stderr}"
    );
}

#[test]
fn the_manifest_names_what_made_the_adapter_and_chat_holds_to_its_template() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = demo(tmp.path());
    let out = tmp.path().join("out");
    // Trained with `seed` (the default), its own system prompt.
    run_ok(
        XTASK,
        [
            "finetune",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--output",
            s(&out),
            "--max-steps",
            "2",
            "--lint",
            "warn",
        ],
    );
    let m: serde_json::Value = test_support::read_json(&out.join("run.json"));
    assert_eq!(
        m["data"]["sha256"],
        sha256sum(&std::fs::read(&data).unwrap())
    );
    assert_eq!(
        m["adapter_sha256"],
        sha256sum(&std::fs::read(out.join("adapter_model.safetensors")).unwrap())
    );
    let id = &m["model"]["identity"];
    assert_eq!(
        id["config_sha256"],
        sha256sum(&std::fs::read(model.join("config.json")).unwrap())
    );
    assert_eq!(
        id["tokenizer_sha256"],
        sha256sum(&std::fs::read(model.join("tokenizer.json")).unwrap())
    );
    let weights = std::fs::read(model.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    assert_eq!(
        id["weights"][0]["header_sha256"],
        sha256sum(&weights[..8 + n])
    );
    assert_eq!(m["template"], "seed");
    assert_eq!(m["global_step"], 2);
    assert!(m["final_loss"].as_f64().is_some_and(f64::is_finite), "{m}");
    assert!(m["command"]
        .as_array()
        .is_some_and(|c| c.iter().any(|a| a == "finetune")));
    assert!(m["build"]["git_commit"]
        .as_str()
        .is_some_and(|c| !c.is_empty()));
    assert!(m["started"].as_str().unwrap() <= m["finished"].as_str().unwrap());

    let (stdout, _) = run_ok(XTASK, ["info", "--adapter", s(&out)]);
    assert!(
        stdout.contains(m["adapter_sha256"].as_str().unwrap()),
        "{stdout}"
    );

    // Chatting with another template than the adapter learned: refused, then allowed by --lint warn.
    let chat = |extra: &[&str]| {
        let mut a = vec![
            "chat",
            "--model",
            s(&model),
            "--adapter",
            s(&out),
            "--prompt",
            "你是谁",
            "--greedy",
        ];
        a.extend_from_slice(&["--max-new-tokens", "2"]);
        a.extend_from_slice(extra);
        run(XTASK, a)
    };
    let (status, _, stderr) = chat(&["--template", "qwen"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("was trained with template seed") && stderr.contains("--template seed"),
        "{stderr}"
    );
    let (status, _, stderr) = chat(&["--template", "qwen", "--lint", "warn"]);
    assert!(status.success() && stderr.contains("warning: "), "{stderr}");
    let (status, _, stderr) = chat(&[]);
    assert!(status.success(), "{stderr}");
}

#[test]
fn a_run_that_cannot_learn_is_said_to_be_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = demo(tmp.path());
    // Every batch the same record, no dropout, and a learning rate whose updates round to 0 in f32:
    // the loss cannot move and lora_B stays zero.
    let records: Vec<serde_json::Value> = test_support::read_json(&data);
    let same = tmp.path().join("same.json");
    std::fs::write(
        &same,
        serde_json::to_string(&vec![records[0].clone(); 8]).unwrap(),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let (_, stderr) = run_ok(
        XTASK,
        finetune(
            &model,
            &same,
            &out,
            &[
                "--learning-rate",
                "1e-46",
                "--lora-dropout",
                "0",
                "--max-steps",
                "4",
                "--logging-steps",
                "1",
                "--not-learning-steps",
                "2",
                "--per-device-train-batch-size",
                "2",
                "--gradient-accumulation-steps",
                "1",
            ],
        ),
    );
    for said in [
        "WARNING: not learning: after 2 steps",
        "WARNING: every lora_B",
    ] {
        assert_eq!(stderr.matches(said).count(), 1, "{said:?} once:\n{stderr}");
    }
}

#[test]
fn the_memory_plan_adds_up_and_a_run_that_cannot_fit_stops_first() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = demo(tmp.path());
    let out = tmp.path().join("out");
    let (stdout, _) = run_ok(XTASK, finetune(&model, &data, &out, &["--dry-run"]));
    let line = stdout
        .lines()
        .find(|l| l.starts_with("memory plan: "))
        .expect(&stdout)
        .to_string();
    // `memory plan: T MiB = weights a + adapters and optimizer b + activations c + head … d + slack e`
    let nums: Vec<f64> = line
        .split([' ', '='])
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(nums.len(), 6, "{line}");
    let parts: f64 = nums[1..].iter().sum();
    assert!(
        (parts - nums[0]).abs() <= 0.03,
        "the parts do not add up: {line}"
    );
    assert!(line.contains(" MiB = "), "{line}");
    let (total, activations) = (nums[0], nums[3]);
    assert!(activations > 0.0, "{line}");

    // Too little for the micro-batch but enough for a smaller one: fewer examples a micro-batch,
    // more accumulation.
    let budget = format!("{:.3}MiB", total - activations / 3.0);
    let (status, _, stderr) = run(
        XTASK,
        finetune(
            &model,
            &data,
            &out,
            &["--dry-run", "--memory-budget", &budget],
        ),
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the run needs about")
            && stderr.contains("--per-device-train-batch-size")
            && stderr.contains("--gradient-accumulation-steps"),
        "{stderr}"
    );
    // Too little for anything.
    let (status, _, stderr) = run(
        XTASK,
        finetune(
            &model,
            &data,
            &out,
            &["--dry-run", "--memory-budget", "1MiB"],
        ),
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("none of the run's options"), "{stderr}");
    assert!(!out.exists());
}
