//! Everything the command prints. A reader that goes away (`strata list |
//! head -1`) ends the command quietly, as it ends other command-line tools,
//! where Rust's `print!` would panic on the broken pipe.

use std::io::Write;

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
