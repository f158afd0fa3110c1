//! Models and adapters by hub id through the command line, against the mock hub on a loopback
//! port: `finetune --model Org/Name` with no other step, `eval`/`chat` with a hub adapter, a second
//! run that makes no request, two processes fetching the same repository at once, ModelScope ids,
//! and the errors.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use test_support::mock_hub::{MockHub, MockRepo};

#[path = "common/small_model.rs"]
mod small_model;
use test_support::xtask_demo;

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");
// The demo's character tokenizer needs a short system prompt for --max-length 96.
const SYSTEM: &str = "现在你要扮演皇帝身边的女人--甄嬛";

/// `xtask` with the hub's environment pointing at `hub` and the caches under `home` only.
fn xtask(hub: &MockHub, home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(XTASK);
    c.args(args)
        .env("HF_ENDPOINT", hub.url())
        .env("HF_HOME", home.join("hf"))
        .env("MODELSCOPE_ENDPOINT", hub.url())
        .env("MODELSCOPE_CACHE", home.join("ms"))
        .env("HOME", home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env_remove("HF_TOKEN_PATH")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("XDG_CACHE_HOME");
    c
}

fn ok(out: Output, what: &str) -> String {
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{what} failed:\n{stdout}\n{stderr}");
    stdout
}

/// A failure: exit 1 and one `error:` line.
fn err(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let errors: Vec<_> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    errors[0].to_string()
}

#[test]
fn finetune_eval_and_chat_take_hub_ids_and_a_second_run_asks_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = tmp.path().join("demo");
    let (model, data) = xtask_demo(XTASK, &demo);
    let hub = MockHub::start(
        vec![
            MockRepo::from_dir("Qwen/Tiny-Instruct", &model),
            MockRepo::from_dir("me/tiny-lora", &demo.join("adapter")),
        ],
        0,
    );
    let home = tmp.path().join("home");
    let data = data.to_str().unwrap();
    let out = tmp.path().join("out");
    let common = [
        "--data",
        data,
        "--template",
        "qwen",
        "--system",
        SYSTEM,
        "--max-length",
        "96",
    ];

    let mut args = vec![
        "finetune",
        "--model",
        "Qwen/Tiny-Instruct",
        "--max-steps",
        "1",
        // Most demo records lose their end token at 96 tokens; this run tests other things.
        "--lint",
        "warn",
    ];
    args.extend(common);
    args.extend(["--output", out.to_str().unwrap()]);
    let stdout = ok(
        xtask(&hub, &home, &args).output().unwrap(),
        "finetune --model Qwen/Tiny-Instruct",
    );
    assert!(stdout.contains("models--Qwen--Tiny-Instruct"), "{stdout}");
    assert!(out.join("adapter_model.safetensors").is_file());
    assert!(hub
        .requests()
        .iter()
        .any(|r| r.uri.ends_with("/model.safetensors")));

    // The model is cached: only the adapter is fetched; then nothing at all.
    hub.clear_log();
    let mut eval = vec![
        "eval",
        "--model",
        "Qwen/Tiny-Instruct",
        "--adapter",
        "me/tiny-lora",
    ];
    eval.extend(common);
    let by_id = ok(
        xtask(&hub, &home, &eval).output().unwrap(),
        "eval with hub ids",
    );
    assert!(
        hub.requests()
            .iter()
            .all(|r| r.uri.contains("me/tiny-lora")),
        "{:?}",
        hub.requests()
    );
    hub.clear_log();
    ok(xtask(&hub, &home, &eval).output().unwrap(), "eval again");
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());

    // The same numbers as from the local directories.
    let adapter = demo.join("adapter");
    let mut local = vec![
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
    ];
    local.extend(common);
    let from_dirs = ok(
        xtask(&hub, &home, &local).output().unwrap(),
        "eval with directories",
    );
    let loss = |s: &str| s.lines().find(|l| l.contains("loss")).map(str::to_string);
    assert_eq!(loss(&by_id), loss(&from_dirs), "{by_id}\n{from_dirs}");
    assert!(loss(&by_id).is_some(), "{by_id}");

    // Chat as the demo's adapter was trained (its run.json says how).
    let trained: serde_json::Value = test_support::read_json(&adapter.join("run.json"));
    let (template, system) = (
        trained["template"].as_str().unwrap(),
        trained["system"].as_str().unwrap(),
    );
    let chat = |m: &str, a: &str| {
        let args = [
            "chat",
            "--model",
            m,
            "--adapter",
            a,
            "--template",
            template,
            "--system",
            system,
        ];
        let mut c = xtask(&hub, &home, &args);
        c.args(["--prompt", "你是谁", "--greedy", "--max-new-tokens", "8"]);
        ok(c.output().unwrap(), "chat")
    };
    assert_eq!(
        chat("Qwen/Tiny-Instruct", "me/tiny-lora"),
        chat(model.to_str().unwrap(), adapter.to_str().unwrap())
    );
}

#[test]
fn two_processes_fetching_one_repository_share_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = xtask_demo(XTASK, &tmp.path().join("demo"));
    let repo = MockRepo::from_dir("Qwen/Tiny-Instruct", &model);
    let hub = MockHub::start(vec![repo.clone()], 0);
    hub.slow(Duration::from_millis(30));
    let home = tmp.path().join("home");
    let spawn = || {
        xtask(&hub, &home, &["download", "Qwen/Tiny-Instruct"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let (dir_a, dir_b) = (ok(a, "first download"), ok(b, "second download"));
    assert_eq!(dir_a, dir_b);
    let dir = Path::new(dir_a.trim());
    for name in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert_eq!(
            std::fs::read(dir.join(name)).unwrap(),
            repo.files[name],
            "{name}"
        );
    }
    // Each body crossed the network once: the second process waited for the first's lock.
    let mut bodies: Vec<_> = hub
        .requests()
        .into_iter()
        .filter(|r| r.uri.contains("/resolve/") && r.range.as_deref() != Some("bytes=0-0"))
        .map(|r| r.uri)
        .collect();
    let n = bodies.len();
    bodies.sort();
    bodies.dedup();
    assert_eq!(
        n,
        bodies.len(),
        "a file was fetched twice: {:?}",
        hub.requests()
    );
}

#[test]
fn modelscope_ids_and_hub_errors_through_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = xtask_demo(XTASK, &tmp.path().join("demo"));
    let hub = MockHub::start(
        vec![
            MockRepo::from_dir("qwen/Tiny-Instruct", &model),
            MockRepo::from_dir("Org/Gated", &model),
        ],
        0,
    );
    let home = tmp.path().join("home");

    // A gated repository: refused without a token, fetched with the token file `hf auth login`
    // writes, or with HF_TOKEN.
    hub.gate("Org/Gated", "hf_secret");
    let e = err(xtask(&hub, &home, &["download", "Org/Gated"])
        .output()
        .unwrap());
    assert!(e.contains("HTTP 401") && e.contains("set HF_TOKEN"), "{e}");
    let e = err(xtask(&hub, &home, &["download", "Org/Gated"])
        .env("HF_TOKEN", "hf_wrong")
        .output()
        .unwrap());
    assert!(e.contains("HTTP 403"), "{e}");
    ok(
        xtask(
            &hub,
            &tmp.path().join("home-env"),
            &["download", "Org/Gated"],
        )
        .env("HF_TOKEN", "hf_secret")
        .output()
        .unwrap(),
        "download with HF_TOKEN",
    );
    std::fs::create_dir_all(home.join("hf")).unwrap();
    std::fs::write(home.join("hf/token"), "hf_secret\n").unwrap();
    ok(
        xtask(&hub, &home, &["download", "Org/Gated"])
            .output()
            .unwrap(),
        "download with the token file",
    );

    let stdout = ok(
        xtask(
            &hub,
            &home,
            &[
                "info",
                "--model",
                "modelscope:qwen/Tiny-Instruct",
                "--config-only",
            ],
        )
        .output()
        .unwrap(),
        "info of a ModelScope id",
    );
    let want = home.join("ms/models/qwen--Tiny-Instruct/snapshots/master");
    assert!(stdout.contains(want.to_str().unwrap()), "{stdout}");

    let e = err(xtask(&hub, &home, &["download", "Org/Missing"])
        .output()
        .unwrap());
    assert!(
        e.contains("the Hugging Face hub has no repository Org/Missing"),
        "{e}"
    );
    // A bare id that only the ModelScope cache holds is used from there, with no request.
    hub.clear_log();
    let offline = |id: &str| {
        let mut c = xtask(&hub, &home, &["download", id]);
        c.env("HF_HUB_OFFLINE", "1");
        c.output().unwrap()
    };
    let stdout = ok(
        offline("qwen/Tiny-Instruct"),
        "a bare id from the ModelScope cache",
    );
    assert_eq!(stdout.trim(), want.to_str().unwrap());
    let e = err(offline("Qwen/Other"));
    assert!(
        e.contains("HF_HUB_OFFLINE is set") && e.contains("Qwen/Other"),
        "{e}"
    );
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());
    let e = err(xtask(&hub, &home, &["download", "not an id"])
        .output()
        .unwrap());
    assert!(e.contains("not a hub id"), "{e}");
    let e = err(xtask(&hub, &home, &["download", "modelscope:nothing"])
        .output()
        .unwrap());
    assert!(e.contains("owner/name"), "{e}");
    // A missing local path that looks like an id is tried on the hub, and said so.
    let e = err(xtask(
        &hub,
        &home,
        &["info", "--model", "runs/missing", "--config-only"],
    )
    .output()
    .unwrap());
    assert!(e.contains("has no repository runs/missing"), "{e}");
}

/// `export` takes a hub id like every command: the GGUF written from `Org/Small` equals, byte for
/// byte, the one written from the same files in a local directory.
#[test]
fn export_takes_a_hub_id() {
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("Small");
    small_model::small_model(&local);
    let hub = MockHub::start(vec![MockRepo::from_dir("Org/Small", &local)], 0);
    let home = tmp.path().join("home");
    let (by_id, by_dir) = (tmp.path().join("id.gguf"), tmp.path().join("dir.gguf"));
    for (model, out) in [("Org/Small", &by_id), (local.to_str().unwrap(), &by_dir)] {
        let args = ["export", "--model", model, "--dtype", "q8_0", "--output"];
        let mut c = xtask(&hub, &home, &args);
        c.arg(out);
        ok(c.output().unwrap(), "export");
    }
    assert!(std::fs::read(&by_id).unwrap() == std::fs::read(&by_dir).unwrap());
}

/// An adapter exported alone reads only its base's config.json: of a hub id, only that is fetched,
/// and the file equals the one exported from the local directory.
#[test]
fn exporting_an_adapter_alone_fetches_only_the_base_config() {
    let tmp = tempfile::tempdir().unwrap();
    // Named as the id's last part, as the exported `general.name` is.
    let base = tmp.path().join("Base");
    test_support::copy_dir_files(
        &test_support::fixtures().join("tiny-untied-f32-sharded"),
        &base,
    );
    let adapter = test_support::fixtures().join("peft-tiny-untied");
    let hub = MockHub::start(vec![MockRepo::from_dir("Org/Base", &base)], 0);
    let home = tmp.path().join("home");
    let (by_id, by_dir) = (tmp.path().join("id.gguf"), tmp.path().join("dir.gguf"));
    for (model, out) in [("Org/Base", &by_id), (base.to_str().unwrap(), &by_dir)] {
        let args = [
            "export",
            "--model",
            model,
            "--adapter",
            adapter.to_str().unwrap(),
        ];
        let mut c = xtask(&hub, &home, &args);
        c.args(["--format", "gguf-lora", "--dtype", "f32", "--output"])
            .arg(out);
        ok(c.output().unwrap(), "export --format gguf-lora");
    }
    let fetched: Vec<String> = hub
        .requests()
        .into_iter()
        .filter(|r| r.uri.contains("/resolve/") && r.range.as_deref() != Some("bytes=0-0"))
        .map(|r| r.uri)
        .collect();
    assert!(
        fetched.len() == 1 && fetched[0].ends_with("/config.json"),
        "{fetched:?}"
    );
    assert!(std::fs::read(&by_id).unwrap() == std::fs::read(&by_dir).unwrap());
}
