//! Spawns a real QEMU with a QMP socket for the integration tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use strata_qmp::{QmpClient, QmpError};
use tempfile::TempDir;
use tokio::time::Instant;

/// How long QEMU gets to create and listen on its socket.
const STARTUP_LIMIT: Duration = Duration::from_secs(30);

/// One `qemu-system-x86_64 -machine none` child. Dropping it kills (SIGKILL,
/// by the child's own pid) and reaps QEMU, so a failing test never leaks one.
pub struct Qemu {
    child: Child,
    dir: TempDir,
    socket: PathBuf,
}

impl Qemu {
    pub fn spawn() -> Qemu {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let child = Command::new("qemu-system-x86_64")
            .args(["-machine", "none", "-accel", "tcg", "-nodefaults", "-display", "none", "-S", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn qemu-system-x86_64");
        Qemu { child, dir, socket }
    }

    /// A scratch directory that lives as long as this QEMU.
    /// The monitor socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Connects, retrying while QEMU is still creating its socket.
    pub async fn connect(&mut self) -> QmpClient {
        let deadline = Instant::now() + STARTUP_LIMIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("QEMU exited during startup: {status}");
            }
            match QmpClient::connect_with_timeout(&self.socket, Duration::from_secs(2)).await {
                Ok(client) => return client,
                // Not created yet (ENOENT) or bound but not listening yet (ECONNREFUSED).
                Err(QmpError::Io { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot connect to QEMU at {}: {e}", self.socket.display()),
            }
        }
    }

    /// Freezes QEMU with SIGSTOP so that it reads nothing and answers nothing.
    pub fn freeze(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) has no memory-safety preconditions. The pid is our
        // own child that has not been reaped yet, so it cannot have been
        // reused by an unrelated process.
        let rc = unsafe { libc::kill(pid, libc::SIGSTOP) };
        assert_eq!(rc, 0, "SIGSTOP: {}", std::io::Error::last_os_error());
    }

    /// SIGKILL and reap now.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        // Errors mean it has already been killed and reaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `qemu-img create` with the given arguments; panics on failure.
pub fn qemu_img_create(args: &[&str]) {
    let out = Command::new("qemu-img").arg("create").args(args).output().expect("run qemu-img");
    assert!(out.status.success(), "qemu-img create {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}
