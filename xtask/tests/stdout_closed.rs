//! A closed stdout (`cargo xtask finetune ... | head -1`) does not kill a command: training
//! finishes and saves its adapter, a short command exits 0, and nothing panics.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use test_support::xtask_demo;

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

/// `finetune | head -1`: the reader takes the first line and goes; the run goes on to the end.
#[test]
fn finetune_outlives_a_reader_that_stops_after_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let mut child = Command::new(XTASK)
        .args(["finetune", "--output", dir.to_str().unwrap()])
        .args(["--max-steps", "20", "--logging-steps", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // The reader is dropped here: every later write to stdout meets a closed pipe.
    assert!(first.starts_with("demo:"), "{first}");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        dir.join("adapter/adapter_model.safetensors").is_file(),
        "no adapter:\n{err}"
    );
}

/// `info | head`: stdout closed before the first line; `info` still ends with status 0 and no
/// panic or backtrace.
#[test]
fn info_exits_quietly_when_stdout_is_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = xtask_demo(XTASK, &tmp.path().join("demo"));
    let mut child = Command::new(XTASK)
        .args(["info", "--model", model.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // closed before `info` prints anything
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}
