//! Everything the command prints. A reader that goes away (`strata list |
//! head -1`) ends the command quietly, as it ends other command-line tools,
//! where Rust's `print!` would panic on the broken pipe.

use std::io::{IsTerminal, Write};

/// The status after a broken pipe: 128 + SIGPIPE, what a shell reports for
/// a tool that SIGPIPE ended. (Strata keeps SIGPIPE ignored, so that a QMP
/// socket closed by a dying QEMU is an error it handles, not its death.)
const BROKEN_PIPE_STATUS: i32 = 141;

/// Writes `text` to stdout at once (a waiting command's lines must appear
/// as they happen); exits quietly when nobody reads any more.
pub fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(BROKEN_PIPE_STATUS);
        }
        err(&format!("error: cannot write the output: {}\n", strata_core::error::os_reason(&e)));
        std::process::exit(1);
    }
}

/// Writes `text` to stderr. A closed stderr is ignored: there is nowhere
/// left to say anything.
pub fn err(text: &str) {
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// Progress on stderr when `verbose` (a block job's `--verbose`, always
/// for a snapshot operation whose driver reports it): a bar on a terminal,
/// plain percentage lines otherwise; printed only when the percentage changes.
pub struct Progress {
    label: &'static str,
    verbose: bool,
    /// Made at the first percentage shown, on a terminal only.
    bar: Option<indicatif::ProgressBar>,
    last: Option<u64>,
}

impl Progress {
    pub fn new(label: &'static str, verbose: bool) -> Progress {
        Progress { label, verbose, bar: None, last: None }
    }

    pub fn show(&mut self, pct: u64) {
        if !self.verbose || self.last == Some(pct) {
            return;
        }
        if self.last.is_none() && std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(100);
            if let Ok(style) = indicatif::ProgressStyle::with_template("{prefix}: [{bar:40}] {pos:>3} %") {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(self.label);
            self.bar = Some(bar);
        }
        self.last = Some(pct);
        match &self.bar {
            Some(bar) => bar.set_position(pct),
            None => err(&format!("{}: [{pct:3} %]\n", self.label)),
        }
    }

    /// Ends an operation that succeeded: 100 % if any percentage was shown.
    pub fn complete(&mut self) {
        if self.last.is_some() {
            self.show(100);
        }
        self.finish();
    }

    pub fn finish(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
