//! QMP monitors of a QEMU process: each of its [`MONITORS`] sockets is
//! guarded by a lock file, so that one `strata` can hold a monitor for a
//! long call while others use the rest; and QMP failures as Strata errors.

use std::fs::{File, OpenOptions};
use std::time::{Duration, Instant};

use strata_core::{Error, ErrorKind, Result};
use strata_qmp::{QmpClient, QmpError};

use crate::runtime::{RuntimePaths, MONITORS};

/// A connected monitor and the lock that reserves it for this process.
pub struct Monitor {
    pub client: QmpClient,
    _lock: File,
}

/// Takes the first free monitor of the process whose runtime directory is
/// `paths` (serving `name`, for messages), waiting up to 30 s for one.
pub async fn acquire(paths: &RuntimePaths, name: &str) -> Result<Monitor> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for n in 0..MONITORS {
            let lock_path = paths.monitor_lock(n);
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(|e| Error::io("open the monitor lock", &lock_path, e))?;
            if file.try_lock().is_err() {
                continue;
            }
            let socket = paths.monitor_socket(n);
            let client = QmpClient::connect_with_timeout(&socket, Duration::from_secs(10))
                .await
                .map_err(|e| qmp_error(name, e))?;
            tracing::debug!(domain = name, monitor = n, "QMP monitor attached");
            return Ok(Monitor { client, _lock: file });
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
