//! Short-lived host tools (`qemu-img`, `mount`, `mkfs`) run to their end
//! by hypervisor-neutral code such as the storage pools.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// Runs `tool args…` and returns its standard output; a tool that cannot
/// start or exits unsuccessfully is an operation-failed error quoting its
/// standard error. The tool cannot outlive this process: the kernel kills
/// it when the thread that started it (this one, which waits for it) ends,
/// so a killed `strata` leaves no `qemu-img` writing behind it.
pub fn run_tool(tool: &str, args: &[&str]) -> Result<String> {
    let parent = libc::pid_t::try_from(std::process::id()).map_err(|_| Error::internal("pid out of range"))?;
    let mut cmd = Command::new(tool);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and calls
    // only prctl(2) and getppid(2), which are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died before the death signal was armed.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ECANCELED));
            }
            Ok(())
        });
    }
    let out = cmd.output().map_err(|e| Error::operation_failed(format!("cannot run {tool}: {e}")))?;
    if !out.status.success() {
        return Err(Error::operation_failed(format!(
            "{tool} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_tool_is_an_error_quoting_its_words() {
        let err = run_tool("qemu-img", &["info", "/nonexistent/image"]).expect_err("no such image");
        assert_eq!(err.kind(), crate::ErrorKind::OperationFailed);
        assert!(err.message().contains("/nonexistent/image"), "{err}");
        assert!(run_tool("qemu-img", &["--version"]).expect("version").contains("qemu-img"));
    }
}
