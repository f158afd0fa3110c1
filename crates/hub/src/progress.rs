//! A progress bar per file on stderr (bytes, rate, ETA); where stderr is not a terminal, one line
//! per file when it is done instead.

use std::time::Instant;

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub(crate) struct Bar {
    bar: ProgressBar,
    label: String,
    start: Instant,
    fetched: u64,
}

impl Bar {
    pub(crate) fn new(repo: &str, file: &str, size: Option<u64>, have: u64) -> Bar {
        let bar = ProgressBar::with_draw_target(size, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{msg} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(file.to_string());
        bar.set_position(have);
        Bar {
            bar,
            label: format!("{repo}: {file}"),
            start: Instant::now(),
            fetched: 0,
        }
    }

    pub(crate) fn advance(&mut self, n: u64) {
        self.fetched += n;
        self.bar.inc(n);
    }

    pub(crate) fn finish(self) {
        self.bar.finish_and_clear();
        let secs = self.start.elapsed().as_secs_f64();
        let resumed = self.bar.position() - self.fetched;
        let line = format!(
            "fetched {} ({}{} in {secs:.1} s)",
            self.label,
            HumanBytes(self.fetched),
            if resumed > 0 {
                format!(", resumed after {}", HumanBytes(resumed))
            } else {
                String::new()
            },
        );
        eprintln!("{line}");
    }

    pub(crate) fn abandon(self) {
        self.bar.abandon();
    }
}
