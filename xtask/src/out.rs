//! Standard output for every command: `outln!` in place of `println!`, and the rounding of the
//! log lines printed there.
//!
//! `println!` panics when stdout is closed (`finetune ... | head -1` lost the run to "failed
//! printing to stdout: Broken pipe"). Rust ignores SIGPIPE, so a write to a closed pipe returns
//! `BrokenPipe`; `outln!` then stops printing to stdout for the rest of the process and the command
//! carries on: training finishes and saves its adapter, a short command such as `info` ends with
//! status 0, as it would have if the reader had kept reading. Diagnostics stay on stderr.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a write to stdout found the pipe closed.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// `println!` that survives a closed stdout (see the module doc).
macro_rules! outln {
    () => {
        $crate::out::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::out::line(format_args!($($arg)*))
    };
}

/// Writes `args` and a newline to stdout, unless the reader has gone: then nothing, from now on.
/// Another write error (a full disk behind a redirect) is reported once on stderr and also ends
/// the printing, since the command's real output (adapter, merged model) does not go there.
pub fn line(args: fmt::Arguments) {
    let _ = Stdout.write_fmt(format_args!("{args}\n"));
}

/// Where the command's output goes once [`divert_foreign_stdout`] moved file descriptor 1 away.
static OUTPUT: std::sync::OnceLock<std::sync::Mutex<std::fs::File>> = std::sync::OnceLock::new();

/// Keeps stdout for this command's own output and points file descriptor 1 at stderr, so that a
/// dependency printing with `println!` (burn-collective's "Connecting to ws://..." at every
/// cross-process operation) lands among the diagnostics and stdout stays the command's JSON
/// lines. Elsewhere than on Unix it does nothing.
pub fn divert_foreign_stdout() -> io::Result<()> {
    #[cfg(unix)]
    {
        io::stdout().flush()?;
        let saved = rustix::io::dup(io::stdout())?;
        rustix::stdio::dup2_stdout(io::stderr())?;
        let _ = OUTPUT.set(std::sync::Mutex::new(std::fs::File::from(saved)));
    }
    Ok(())
}

/// Whether stdout has been found closed.
pub fn closed() -> bool {
    CLOSED.load(Ordering::Relaxed)
}

/// Stdout as an [`io::Write`] with `outln!`'s rule: once the pipe is closed, writes succeed and
/// print nothing; for commands that stream (chat's tokens).
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf).map(|()| buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        if closed() {
            return Ok(());
        }
        if let Some(out) = OUTPUT.get() {
            let mut f = out.lock().unwrap_or_else(|e| e.into_inner());
            return swallow(f.write_all(buf));
        }
        let mut s = io::stdout().lock();
        let r = s.write_all(buf).and_then(|()| s.flush());
        swallow(r)
    }

    fn flush(&mut self) -> io::Result<()> {
        if closed() {
            return Ok(());
        }
        swallow(io::stdout().lock().flush())
    }
}

/// A write error ends the printing to stdout; only one other than a closed pipe is worth a word.
fn swallow(r: io::Result<()>) -> io::Result<()> {
    if let Err(e) = r {
        if !CLOSED.swap(true, Ordering::Relaxed) && e.kind() != io::ErrorKind::BrokenPipe {
            eprintln!("warning: cannot write to stdout ({e}); continuing without it");
        }
    }
    Ok(())
}

/// `value` as one JSON line with every float rounded to 6 significant digits, as transformers
/// rounds the numbers of its log lines: `1.98289` instead of `1.9828923940658569`. For what is
/// printed; `metrics.jsonl` keeps full precision.
pub fn rounded_json(value: &impl serde::Serialize) -> String {
    let mut buf = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, Round6);
    value.serialize(&mut ser).expect("log entries serialize");
    String::from_utf8(buf).expect("JSON is UTF-8")
}

/// serde_json's compact format, floats rounded by [`round6`] (fields keep their order).
struct Round6;

impl serde_json::ser::Formatter for Round6 {
    fn write_f64<W: ?Sized + Write>(&mut self, w: &mut W, v: f64) -> io::Result<()> {
        serde_json::ser::CompactFormatter.write_f64(w, round6(v))
    }

    fn write_f32<W: ?Sized + Write>(&mut self, w: &mut W, v: f32) -> io::Result<()> {
        serde_json::ser::CompactFormatter.write_f64(w, round6(v.into()))
    }
}

/// `x` rounded to 6 significant digits (decimal), through its `{:.5e}` text: exact, since the
/// shortest text of the result is those digits.
pub fn round6(x: f64) -> f64 {
    if !x.is_finite() || x == 0.0 {
        return x;
    }
    format!("{x:.5e}").parse().unwrap_or(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_print_six_significant_digits() {
        #[derive(serde::Serialize)]
        struct Entry {
            step: usize,
            loss: f64,
            learning_rate: f64,
            tokens_per_s: f64,
            epoch: f64,
        }
        let line = rounded_json(&Entry {
            step: 12,
            loss: 1.982_892_394_065_857,
            learning_rate: 9.876543210987654e-5,
            tokens_per_s: 123456.78901234,
            epoch: 0.5,
        });
        assert_eq!(
            line,
            r#"{"step":12,"loss":1.98289,"learning_rate":0.0000987654,"tokens_per_s":123457.0,"epoch":0.5}"#
        );
        assert_eq!(round6(-0.000123456789), -0.000123457);
        assert!(round6(f64::NAN).is_nan());
    }
}
