//! QEMU processes: spawned as children in their own session so that they
//! outlive `strata`, and recognised later by pid plus start time so that a
//! reused pid is never mistaken for (or signalled as) our QEMU.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata_core::{Error, Result};

/// A QEMU process as recorded in the status XML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: i32,
    /// Field 22 of `/proc/PID/stat`: clock ticks after boot.
    pub start_time: u64,
}

/// What `/proc` says about a pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    /// Gone, a zombie waiting to be reaped, or a different process now.
    Gone,
}

/// `(state, start time)` from `/proc/PID/stat`.
fn stat(pid: i32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

impl ProcessId {
    pub fn of(pid: i32) -> Option<ProcessId> {
        stat(pid).map(|(_, start_time)| ProcessId { pid, start_time })
    }

    pub fn liveness(&self) -> Liveness {
        match stat(self.pid) {
            Some((state, start)) if start == self.start_time && state != 'Z' && state != 'X' => Liveness::Alive,
            _ => Liveness::Gone,
        }
    }

    /// Sends `signal` if the process is still ours.
    pub fn signal(&self, signal: i32) -> Result<()> {
        if self.liveness() == Liveness::Gone {
            return Ok(());
        }
        // SAFETY: kill(2) with a pid we just checked belongs to our QEMU;
        // it has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.pid, signal) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ESRCH) {
                return Err(Error::operation_failed(format!("cannot signal QEMU pid {}: {err}", self.pid)));
            }
        }
        Ok(())
    }

    /// Waits until the process is gone, at most `timeout`.
    pub async fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.liveness() == Liveness::Gone {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM, then SIGKILL if QEMU has not exited after `grace` (QEMU can
    /// ignore SIGTERM while a drained job holds it; see the recipe book).
    pub async fn terminate(&self, grace: Duration) -> Result<()> {
        self.signal(libc::SIGTERM)?;
        if self.wait_gone(grace).await {
            return Ok(());
        }
        self.signal(libc::SIGKILL)?;
        if self.wait_gone(Duration::from_secs(10)).await {
            Ok(())
        } else {
            Err(Error::operation_failed(format!("QEMU pid {} did not exit after SIGKILL", self.pid)))
        }
    }
}

/// A QEMU just started: its identity and the handle that reaps it if it
/// exits while this process still runs.
pub struct Spawned {
    pub id: ProcessId,
    pub child: std::process::Child,
}

/// Starts `binary args…` in a new session with its output appended to `log`.
pub fn spawn(binary: &str, args: &[String], log: &Path) -> Result<Spawned> {
    let log_file =
        OpenOptions::new().create(true).append(true).open(log).map_err(|e| Error::io("open the QEMU log", log, e))?;
    let log_err = log_file.try_clone().map_err(|e| Error::io("open the QEMU log", log, e))?;
    let mut cmd = Command::new(binary);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::from(log_file)).stderr(Stdio::from(log_err));
    // SAFETY: the closure runs in the forked child before exec and calls
    // only setsid(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| Error::operation_failed(format!("cannot run {binary}: {e}")))?;
    let pid = i32::try_from(child.id()).map_err(|_| Error::internal("QEMU pid out of range"))?;
    let id = ProcessId::of(pid).ok_or_else(|| {
        Error::operation_failed(format!("{binary} (pid {pid}) exited immediately; see {}", log.display()))
    })?;
    Ok(Spawned { id, child })
}

/// The last lines of a log, for error messages.
pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
