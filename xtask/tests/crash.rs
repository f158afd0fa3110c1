//! Crash safety: a training run killed with SIGKILL at arbitrary moments (mid-step, mid-checkpoint,
//! mid-final-save) and resumed from `latest` each time ends with exactly the adapter and per-step
//! losses of a run that was never interrupted.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use test_support::{run_ok, trainer_step_losses, xtask_demo};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

fn train_args<'a>(model: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "finetune",
        "--model",
        model,
        "--data",
        data,
        "--template",
        "qwen",
        // The system prompt these runs had before `qwen` got its own by default: short enough in
        // the demo's character tokenizer for --max-length 96.
        "--system",
        "现在你要扮演皇帝身边的女人--甄嬛",
        "--output",
        out,
        "--max-steps",
        // Long enough that a run never finishes inside the kill window below, however fast a step is.
        "60",
        "--save-steps",
        "1",
        "--logging-steps",
        "1",
        "--per-device-train-batch-size",
        "4",
        "--gradient-accumulation-steps",
        "1",
        "--learning-rate",
        "1e-3",
        "--max-length",
        "96",
        // Most demo records lose their end token at 96 tokens; these runs test other things.
        "--lint",
        "warn",
        "--gradient-checkpointing",
        "false",
        "--save-total-limit",
        "3",
    ]
}

#[test]
fn killed_runs_resume_to_the_uninterrupted_result() {
    let tmp = tempfile::tempdir().unwrap();
    // The demo writes a tiny model, tokenizer and dataset; reuse them as a "real" model and data.
    let (model, data) = xtask_demo(XTASK, &tmp.path().join("demo"));
    let (model, data) = (model.to_str().unwrap(), data.to_str().unwrap());

    let full = tmp.path().join("full");
    run_ok(XTASK, train_args(model, data, full.to_str().unwrap()));

    let int = tmp.path().join("interrupted");
    let int_s = int.to_str().unwrap().to_string();
    let (mut kills, mut runs) = (0, 0);
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    loop {
        runs += 1;
        assert!(runs < 60, "no run completed after {runs} attempts");
        let mut args = train_args(model, data, &int_s);
        let has_ckpt = std::fs::read_dir(&int).is_ok_and(|rd| {
            rd.filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
        });
        if has_ckpt {
            args.extend(["--resume-from-checkpoint", "latest"]);
        } else {
            // Killed before its first checkpoint: start again over what that run left.
            args.push("--overwrite-output-dir");
        }
        let mut child = Command::new(XTASK)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Kill at a pseudo-random moment 40-240 ms after the start (a run of a few steps here), so
        // kills land during loading, inside steps, inside checkpoint writes and inside the final save.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let deadline = Instant::now() + Duration::from_millis(40 + seed % 200);
        let finished = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if kills < 10 && Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        match finished {
            Some(status) => {
                assert!(status.success(), "run {runs} failed");
                break;
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
            }
        }
    }
    assert!(kills >= 6, "only {kills} kills happened");
    let bytes = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        trainer_step_losses(&int),
        trainer_step_losses(&full),
        "per-step losses differ after {kills} kills"
    );
    assert!(
        bytes(&int) == bytes(&full),
        "final adapter differs after {kills} kills"
    );
    println!(
        "{kills} kills, {} resumed runs, {} steps compared bitwise",
        runs - 1,
        trainer_step_losses(&full).len()
    );
}
