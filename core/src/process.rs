//! Processes Strata starts. Servers (QEMU, qemu-storage-daemon, a
//! network's dnsmasq) are children in their own session so that they
//! outlive `strata`, recorded before they run, and recognised later by pid
//! plus start time so that a reused pid is never mistaken for (or
//! signalled as) one of them. Helpers (`qemu-img`) die with the `strata`
//! that runs them (`crate::tool`).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::xml::Element;

/// A server process as its record names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    use std::io::Read;
    // Read into a fixed buffer: `read_to_string` stats the file for a size
    // (procfs says 0) and then grows from 32 bytes, five reads where one
    // does; a command checks its QEMU's identity several times.
    let mut file = std::fs::File::open(format!("/proc/{pid}/stat")).ok()?;
    let mut buf = [0u8; 4096];
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    // The command name is in parentheses and may contain spaces (and any
    // byte): only what follows its closing parenthesis is read.
    let close = buf[..len].iter().rposition(|b| *b == b')')?;
    let after = std::str::from_utf8(&buf[close + 1..len]).ok()?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

impl ProcessId {
    pub fn of(pid: i32) -> Option<ProcessId> {
        stat(pid).map(|(_, start_time)| ProcessId { pid, start_time })
    }

    /// This process.
    pub fn this() -> Result<ProcessId> {
        let pid = i32::try_from(std::process::id()).map_err(|_| Error::internal("pid out of range"))?;
        ProcessId::of(pid).ok_or_else(|| Error::internal("cannot read this process's start time from /proc"))
    }

    /// Records the process in `el` as attributes `ROLE` (the pid) and
    /// `ROLEstart` (the start time).
    pub fn set_attrs(&self, el: &mut Element, role: &str) {
        el.set_attr(role, self.pid.to_string());
        el.set_attr(&format!("{role}start"), self.start_time.to_string());
    }

    /// The process [`ProcessId::set_attrs`] recorded in `el` as `role`.
    pub fn from_attrs(el: &Element, role: &str) -> Option<ProcessId> {
        Some(ProcessId {
            pid: el.attr(role)?.parse().ok()?,
            start_time: el.attr(&format!("{role}start"))?.parse().ok()?,
        })
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
        // SAFETY: kill(2) with a pid we just checked belongs to our server;
        // it has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.pid, signal) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ESRCH) {
                return Err(Error::operation_failed(format!("cannot signal pid {}: {err}", self.pid)));
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

    /// SIGTERM, then SIGKILL if the process has not exited after `grace`
    /// (QEMU can ignore SIGTERM while a drained job holds it; see the
    /// recipe book).
    pub async fn terminate(&self, grace: Duration) -> Result<()> {
        let id = *self;
        tokio::task::spawn_blocking(move || id.stop(grace))
            .await
            .map_err(|e| Error::internal(format!("stopping pid {}: {e}", id.pid)))?
    }

    /// [`ProcessId::terminate`] for callers that are not async: blocks this
    /// thread until the process is gone.
    pub fn stop(&self, grace: Duration) -> Result<()> {
        self.signal(libc::SIGTERM)?;
        if self.wait_gone_blocking(grace) {
            return Ok(());
        }
        self.signal(libc::SIGKILL)?;
        if self.wait_gone_blocking(Duration::from_secs(10)) {
            Ok(())
        } else {
            Err(Error::operation_failed(format!("pid {} did not exit after SIGKILL", self.pid)))
        }
    }

    /// [`ProcessId::wait_gone`] for callers that are not async.
    pub fn wait_gone_blocking(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.liveness() == Liveness::Alive {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

/// A server just started: its identity and the handle that reaps it if it
/// exits while this process still runs.
pub struct Spawned {
    pub id: ProcessId,
    pub child: std::process::Child,
}

/// Starts `binary args…` in a new session with its output appended to
/// `log`, recorded before it runs: the child is held between fork and exec
/// until `record` has written down its identity, so no server that a
/// record does not name ever opens an image. When `record` fails, or this
/// process dies before it is done, the child exits without running. The
/// `inherited` descriptors stay open in it across exec.
pub fn spawn(
    binary: &str,
    args: &[String],
    inherited: &[RawFd],
    log: &Path,
    record: impl FnOnce(ProcessId) -> Result<()>,
) -> Result<Spawned> {
    let log_file =
        OpenOptions::new().create(true).append(true).open(log).map_err(|e| Error::io("open the log", log, e))?;
    let log_err = log_file.try_clone().map_err(|e| Error::io("open the log", log, e))?;
    let mut cmd = Command::new(binary);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::from(log_file)).stderr(Stdio::from(log_err));
    let (ready_read, ready_write) = pipe()?;
    let (go_read, go_write) = pipe()?;
    let fds = HoldFds { ready: ready_write.as_raw_fd(), go_read: go_read.as_raw_fd(), go_write: go_write.as_raw_fd() };
    let inherited = inherited.to_vec();
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (see `wait_to_be_recorded` and
    // `keep_across_exec`).
    unsafe {
        cmd.pre_exec(move || {
            keep_across_exec(&inherited)?;
            wait_to_be_recorded(fds)
        });
    }
    // `spawn` returns only once the child has exec'd (or failed), which it
    // does only after the record: so it runs on a thread of its own. The
    // child's ends of the pipes stay open there until then.
    let forking = std::thread::spawn(move || {
        let spawned = cmd.spawn();
        drop((ready_write, go_read));
        spawned
    });
    let mut go = File::from(go_write);
    let released = held_child(ready_read).map(|id| {
        crate::crash_point("server:forked");
        record(id)?;
        crate::crash_point("server:recorded");
        go.write_all(&[1]).map_err(|e| Error::operation_failed(format!("cannot release {binary}: {e}")))?;
        Ok(id)
    });
    // Without the go byte, the closed pipe ends the held child.
    drop(go);
    let child = forking.join().map_err(|_| Error::internal(format!("the thread starting {binary} panicked")))?;
    match (released, child) {
        (Some(Ok(id)), Ok(child)) => Ok(Spawned { id, child }),
        (Some(Err(e)), _) => Err(e),
        (_, Err(e)) => Err(Error::operation_failed(format!("cannot run {binary}: {e}"))),
        // Cannot happen: the child execs only on the go byte.
        (None, Ok(_)) => Err(Error::internal(format!("{binary} ran without reporting its pid"))),
    }
}

/// The pipe ends a held child uses, as raw numbers (all the pre-exec code
/// can touch).
#[derive(Clone, Copy)]
struct HoldFds {
    ready: RawFd,
    go_read: RawFd,
    go_write: RawFd,
}

/// In the forked child, before exec: a session of its own, its pid to the
/// parent, then a wait for the parent's go byte. A go pipe closed without
/// it (the parent refused, or died) ends the child before exec. Only
/// async-signal-safe calls: the parent has other threads.
fn wait_to_be_recorded(fds: HoldFds) -> std::io::Result<()> {
    // SAFETY: setsid, close, getpid, write and read are async-signal-safe
    // system calls on descriptors this child inherited; the buffers are
    // local and sized as passed.
    unsafe {
        if libc::setsid() < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Only the parent may hold the go pipe open.
        libc::close(fds.go_write);
        let pid = libc::getpid().to_ne_bytes();
        if libc::write(fds.ready, pid.as_ptr().cast(), pid.len()) != pid.len() as isize {
            return Err(std::io::Error::last_os_error());
        }
        let mut go = 0u8;
        loop {
            match libc::read(fds.go_read, (&mut go as *mut u8).cast(), 1) {
                1 => return Ok(()),
                0 => return Err(std::io::Error::from_raw_os_error(libc::ECANCELED)),
                _ if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) => {}
                _ => return Err(std::io::Error::last_os_error()),
            }
        }
    }
}

/// In the forked child, before exec: the descriptors the server is given
/// by number on its command line (a tap QEMU must not open itself) lose
/// their close-on-exec flag. Only fcntl(2), which is async-signal-safe.
fn keep_across_exec(inherited: &[RawFd]) -> std::io::Result<()> {
    for &fd in inherited {
        // SAFETY: fcntl on a descriptor number changes only its flags; one
        // that is not open fails with EBADF, returned as the error.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The identity of the child held before exec, from the pid it wrote;
/// `None` when it never got there (the spawn's own error says why).
fn held_child(ready: OwnedFd) -> Option<ProcessId> {
    let mut pid = [0u8; 4];
    File::from(ready).read_exact(&mut pid).ok()?;
    ProcessId::of(i32::from_ne_bytes(pid))
}

/// A pipe whose ends close on exec: (read, write).
pub fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2(2) fills the two-element array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::operation_failed(format!("cannot create a pipe: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: both descriptors were just created and nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The last lines of a log, for error messages.
pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command name with a parenthesis and spaces (the kernel copies it
    /// from the executable's file name) does not shift the fields read
    /// after it; a process that was reaped is gone.
    #[test]
    fn a_process_is_known_by_its_start_time_whatever_its_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let odd = dir.path().join("a) b (c");
        std::fs::copy("/bin/sleep", &odd).expect("copy sleep");
        let mut child = std::process::Command::new(&odd).arg("30").spawn().expect("spawn");
        let pid = i32::try_from(child.id()).expect("pid");
        let id = ProcessId::of(pid).expect("its stat reads");
        let this = ProcessId::this().expect("this process");
        assert!(id.start_time >= this.start_time, "{id:?} started after {this:?}");
        assert_eq!(id.liveness(), Liveness::Alive);
        assert_eq!(ProcessId { pid, start_time: id.start_time + 1 }.liveness(), Liveness::Gone);
        child.kill().expect("kill");
        child.wait().expect("reap");
        assert_eq!(id.liveness(), Liveness::Gone);
    }
}
