//! Short-lived host tools (`qemu-img`, `mount`, `mkfs`) run to their end
//! by hypervisor-neutral code such as the storage pools.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};

use crate::error::{Error, Result};

/// Runs `tool args…` and returns its standard output; a tool that cannot
/// start or exits unsuccessfully is an operation-failed error quoting its
/// standard error. See [`run_tool_output`] for why it cannot outlive this
/// process.
pub fn run_tool(tool: &str, args: &[&str]) -> Result<String> {
    let out = run_tool_output(tool, args, None)?;
    if !out.status.success() {
        return Err(Error::operation_failed(format!(
            "{tool} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `tool args…` to its end and returns its output, whatever its exit
/// status. The tool cannot outlive this process: the kernel kills it when
/// the thread that started it (this one, which waits for it) ends, so a
/// killed `strata` leaves no `qemu-img` writing behind it. With `hold` (a
/// lock file's descriptor, such as a domain's operation lock), the tool
/// also keeps that descriptor, and so the lock, until it has exited: the
/// next command, which takes the lock before it finishes or undoes an
/// interrupted operation, never runs beside a tool that is still dying.
pub fn run_tool_output(tool: &str, args: &[&str], hold: Option<BorrowedFd<'_>>) -> Result<Output> {
    let parent = libc::pid_t::try_from(std::process::id()).map_err(|_| Error::internal("pid out of range"))?;
    let held = hold.map(|fd| fd.as_raw_fd());
    let mut cmd = Command::new(tool);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (see `die_with_parent`).
    unsafe {
        cmd.pre_exec(move || die_with_parent(parent, held));
    }
    let child = cmd.spawn().map_err(|e| Error::operation_failed(format!("cannot run {tool}: {e}")))?;
    crate::crash_point("helper:spawned");
    child.wait_with_output().map_err(|e| Error::operation_failed(format!("cannot run {tool}: {e}")))
}

/// In the forked child, before exec: SIGKILL when the parent's thread dies
/// (and no start at all if the parent died before that was set up), and
/// the held descriptor kept across exec. Only async-signal-safe calls.
pub(crate) fn die_with_parent(parent: libc::pid_t, held: Option<RawFd>) -> std::io::Result<()> {
    // SAFETY: prctl, getppid and fcntl are async-signal-safe system calls;
    // `held` is a descriptor this child inherited.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::getppid() != parent {
            return Err(std::io::Error::from_raw_os_error(libc::ECANCELED));
        }
        if let Some(fd) = held {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Runs blocking `work` (host tools, files) off the async runtime;
/// `what` names the kind of task in the error if it ends abnormally.
pub async fn offload<T: Send + 'static>(what: &str, work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::internal(format!("a {what} task ended abnormally: {e}")))?
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

    /// A tool keeps the lock it was given past the caller's release, until
    /// it and what it left running have exited: the next operation cannot
    /// begin beside it.
    #[test]
    fn a_tool_holds_the_lock_it_is_given_until_it_exits() {
        use crate::store::Store;
        use std::os::fd::AsFd;
        use std::time::{Duration, Instant};

        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open the store");
        store.write_domain("vm", "<domain/>").expect("define vm");
        let fifo = dir.path().join("release");
        let c_path = std::ffi::CString::new(fifo.to_str().expect("utf8")).expect("no NUL in the path");
        // SAFETY: mkfifo(3) with a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
        let operation = store.lock_domain_operation("vm").expect("take the operation lock");
        // The shell leaves a reader of the FIFO behind, holding what it held
        // (but the output pipes, whose end the tool's caller waits for).
        let script = format!("{{ read _ < '{}'; }} > /dev/null 2>&1 &", fifo.display());
        let out = run_tool_output("sh", &["-c", &script], Some(operation.as_fd())).expect("run sh");
        assert!(out.status.success(), "{out:?}");
        drop(operation);
        let held = store.try_lock_domain_operation("vm").expect("try the lock").is_none();
        std::fs::write(&fifo, "go\n").expect("release the reader");
        assert!(held, "the lock went with the caller while the tool's process still ran");
        let deadline = Instant::now() + Duration::from_secs(30);
        while store.try_lock_domain_operation("vm").expect("try the lock").is_none() {
            assert!(Instant::now() < deadline, "the lock stayed held after the tool's process ended");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
