//! Running a binary (in this workspace: the `xtask` command line) and capturing what it printed.
//!
//! Cargo tells only the binary's own package where the binary is (`env!("CARGO_BIN_EXE_xtask")`
//! in `xtask/tests`), so the path is an argument here.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

/// Runs `bin` with `args` to completion (stdin closed) and returns its exit status, stdout and
/// stderr (lossily decoded).
pub fn run<I>(bin: impl AsRef<OsStr>, args: I) -> (ExitStatus, String, String)
where
    I: IntoIterator,
    I::Item: AsRef<OsStr>,
{
    let out = Command::new(bin.as_ref())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.as_ref().to_string_lossy()));
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`run`], asserting that the command succeeded (the panic shows the command line and both
/// outputs); returns stdout and stderr.
pub fn run_ok<I>(bin: impl AsRef<OsStr>, args: I) -> (String, String)
where
    I: IntoIterator,
    I::Item: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let (status, stdout, stderr) = run(bin.as_ref(), &args);
    assert!(
        status.success(),
        "{} {} failed ({status}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        bin.as_ref().to_string_lossy(),
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    (stdout, stderr)
}

/// Runs `xtask finetune --output <dir> --max-steps 1` (the built-in demo, which writes a tiny model
/// with its tokenizer and a dataset), asserting success; returns the model directory and the
/// dataset file, to use as a "real" model and data.
pub fn xtask_demo(xtask: impl AsRef<OsStr>, dir: &Path) -> (PathBuf, PathBuf) {
    let s = OsStr::new;
    run_ok(
        xtask,
        [
            s("finetune"),
            s("--output"),
            dir.as_os_str(),
            s("--max-steps"),
            s("1"),
        ],
    );
    (dir.join("model"), dir.join("data.json"))
}
