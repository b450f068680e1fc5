//! QMP monitors of a QEMU process: each of its [`MONITORS`] sockets is
//! guarded by a lock file, so that one `strata` can hold a monitor for a
//! long call while others use the rest; and QMP failures as Strata errors.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use strata_core::{Error, ErrorKind, Result};
use strata_qmp::{AskedOnOpening, QmpClient, QmpError};

use crate::runtime::{RuntimePaths, MONITORS};

/// A connected monitor and the lock that reserves it for this process.
pub struct Monitor {
    pub client: QmpClient,
    _lock: File,
}

/// Takes the first free monitor of the process whose runtime directory is
/// `paths` (serving `name`, for messages), waiting up to 30 s for one. The
/// process runs already: the monitor is handed out before QEMU's greeting
/// is read (see [`QmpClient::connect_to_running`]).
pub async fn acquire(paths: &RuntimePaths, name: &str) -> Result<Monitor> {
    acquire_opening(paths, name, Opening::Running).await
}

/// Like [`acquire`], and runs `command` (without arguments) on the new
/// connection, sent with its opening (see [`ask_free`]): its outcome comes
/// back with the monitor.
pub async fn acquire_asking(
    paths: &RuntimePaths,
    name: &str,
    command: &str,
) -> Result<(Monitor, std::result::Result<Value, QmpError>)> {
    let asked = until_free(name, || std::future::ready(ask_free(paths, name, command))).await?;
    asked.answer(name).await
}

/// A monitor taken, and one question written on its new connection with
/// the opening: [`ask_free`].
pub struct QuestionAsked {
    asked: AskedOnOpening,
    lock: File,
}

impl QuestionAsked {
    /// The monitor, and QEMU's answer (within the client's default
    /// timeout, after a greeting within 10 s).
    pub async fn answer(self, name: &str) -> Result<(Monitor, std::result::Result<Value, QmpError>)> {
        let (client, reply) = self.asked.answer(ANSWER_WITHIN).await.map_err(|e| qmp_error(name, e))?;
        Ok((Monitor { client, _lock: self.lock }, reply))
    }
}

/// Takes the first free monitor of the running process whose runtime
/// directory is `paths` (serving `name`, for messages) and writes
/// `command` (without arguments) with the connection's opening, without
/// waiting for anything: QEMU reads and answers while the caller goes on,
/// and [`QuestionAsked::answer`] reads the answer. `None` when every
/// monitor is held or busy.
pub fn ask_free(paths: &RuntimePaths, name: &str, command: &str) -> Result<Option<QuestionAsked>> {
    for free in free_monitors(paths) {
        let (n, lock) = free?;
        match QmpClient::ask_on_opening(&paths.monitor_socket(n), command) {
            Ok(asked) => {
                tracing::debug!(domain = name, monitor = n, command, "QMP monitor asked on its opening");
                return Ok(Some(QuestionAsked { asked, lock }));
            }
            Err(e) if backlog_full(&e) => tracing::debug!(domain = name, monitor = n, "QMP monitor's backlog is full"),
            Err(e) => return Err(qmp_error(name, e)),
        }
    }
    Ok(None)
}

/// How long a running QEMU may take to greet a connection that waits for it.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// How a monitor is connected.
#[derive(Debug, Clone, Copy)]
enum Opening {
    /// QEMU is starting: its greeting is waited for, this long.
    Starting(Duration),
    /// QEMU runs: its greeting is read behind the caller's next work.
    Running,
}

async fn acquire_opening(paths: &RuntimePaths, name: &str, opening: Opening) -> Result<Monitor> {
    until_free(name, || take_free(paths, name, opening)).await
}

/// What `take` takes once it takes something, trying again every 20 ms
/// while every monitor is held or busy, for up to 30 s.
async fn until_free<T, F: Future<Output = Result<Option<T>>>>(name: &str, mut take: impl FnMut() -> F) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(taken) = take().await? {
            return Ok(taken);
        }
        if Instant::now() >= deadline {
            return Err(Error::new(
                ErrorKind::OperationTimeout,
                format!("all {MONITORS} QMP monitors of domain '{name}' stayed busy for 30 s"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long a QEMU just started on `layers` images in all may take to
/// answer its monitor. QEMU creates its monitor sockets early but reads
/// them only once it has opened every image, and the time grows faster
/// than the layers (each new node is checked against the chain below it):
/// QEMU 7.2 took 6 s for a 1,000-deep chain and 11–21 s for a 1,500-deep
/// one on this project's loaded 2-vCPU machine. So the guard is generous
/// and grows with the layers.
pub fn start_up_guard(layers: usize) -> Duration {
    let per_layer = Duration::from_millis(20).saturating_mul(u32::try_from(layers).unwrap_or(u32::MAX));
    Duration::from_secs(30).saturating_add(per_layer)
}

/// Takes a monitor of the QEMU just started as `child` (logging to `log`)
/// once it answers. The wait is on progress, not a fixed clock: it lasts
/// while the process is alive and has not answered yet (it is opening its
/// images), ends with QEMU's own words when the process exits, and with an
/// error naming the wait after `guard` (see [`start_up_guard`]), which
/// only a QEMU that hangs reaches.
pub async fn acquire_started(
    paths: &RuntimePaths,
    name: &str,
    child: &mut std::process::Child,
    log: &Path,
    guard: Duration,
) -> Result<Monitor> {
    let answered = async {
        let last = paths.monitor_socket(MONITORS - 1);
        while !last.exists() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // No other process takes a monitor of a server that is starting.
        let taken = take_free(paths, name, Opening::Starting(guard)).await?;
        taken.ok_or_else(|| {
            Error::operation_failed(format!("every QMP monitor of the starting QEMU of '{name}' is locked"))
        })
    };
    let exited = async {
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        monitor = tokio::time::timeout(guard, answered) => monitor.map_err(|_| {
            Error::new(
                ErrorKind::OperationTimeout,
                format!(
                    "QEMU of '{name}' was still running but had not answered on its monitor {guard:?} after its start \
                     (the wait for it to open its images)"
                ),
            )
        })?,
        status = exited => Err(Error::operation_failed(format!(
            "QEMU exited during start-up ({status}): {}",
            strata_engine::process::log_tail(log, 5)
        ))),
    }
}

/// The first monitor of `paths` whose lock is free, connected as
/// `opening` says; `None` when every one is held or busy.
async fn take_free(paths: &RuntimePaths, name: &str, opening: Opening) -> Result<Option<Monitor>> {
    for free in free_monitors(paths) {
        let (n, lock) = free?;
        let socket = paths.monitor_socket(n);
        let connected = match opening {
            Opening::Starting(within) => QmpClient::connect_with_timeout(&socket, within).await,
            Opening::Running => QmpClient::connect_to_running(&socket).await,
        };
        match connected {
            Ok(client) => {
                tracing::debug!(domain = name, monitor = n, "QMP monitor attached");
                return Ok(Some(Monitor { client, _lock: lock }));
            }
            Err(e) if backlog_full(&e) => tracing::debug!(domain = name, monitor = n, "QMP monitor's backlog is full"),
            Err(e) => return Err(qmp_error(name, e)),
        }
    }
    Ok(None)
}

/// Each monitor of `paths` whose lock this process could take, in order,
/// with the lock held.
fn free_monitors(paths: &RuntimePaths) -> impl Iterator<Item = Result<(usize, File)>> + '_ {
    (0..MONITORS).filter_map(|n| {
        let lock_path = paths.monitor_lock(n);
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path);
        match file {
            Ok(file) => file.try_lock().is_ok().then_some(Ok((n, file))),
            Err(e) => Some(Err(Error::io("open the monitor lock", &lock_path, e))),
        }
    })
}

/// The socket's backlog is full: QEMU has not yet taken in the connection
/// of the monitor's last holder (one that did not wait for the greeting,
/// and exited without a command). The monitor is busy for now.
fn backlog_full(e: &QmpError) -> bool {
    matches!(e, QmpError::Io { source, .. } if source.kind() == std::io::ErrorKind::WouldBlock)
}

/// Maps a QMP failure into Strata's error, keeping QEMU's class and text;
/// `domain` names what the process serves.
pub fn qmp_error(domain: &str, e: QmpError) -> Error {
    match e {
        QmpError::Command { command, class, desc } => {
            Error::internal(format!("unable to execute QEMU command '{command}': {desc} ({class})"))
        }
        QmpError::Timeout { command, after } => Error::new(
            ErrorKind::OperationTimeout,
            format!("QEMU of domain '{domain}' did not answer '{command}' within {after:?}"),
        ),
        QmpError::Disconnected => {
            Error::operation_failed(format!("the QEMU of domain '{domain}' closed its monitor (did it exit?)"))
        }
        other => Error::operation_failed(format!("QMP with domain '{domain}': {other}")),
    }
}
