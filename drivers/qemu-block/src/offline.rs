//! A `qemu-storage-daemon` started for block jobs on storage nothing else
//! serves (a shut-off VM's disks): started recorded before it runs, found
//! again by its [`ServerRecord`] (which the driver embeds in its own
//! status), stopped when the `strata` answerable for it died while it was
//! of use to no one else, and quit once idle.
//!
//! The daemon serves its devices over NBD only (no FUSE export holds a
//! permission a job needs).

use std::time::Duration;

use strata_core::xml::{Element, StorageDevice};
use strata_core::{Error, Result};
use strata_engine::process::{Liveness, ProcessId};
use strata_qmp::QmpClient;

use crate::daemon::{storage_daemon_binary, storage_daemon_command_line};
use crate::monitor::{acquire_started, start_up_guard};
use crate::runtime::RuntimePaths;

/// A QEMU process Strata started and who answers for it, as its driver's
/// status records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerRecord {
    pub process: ProcessId,
    /// Recorded before the process runs, until its monitors are up.
    pub starting: bool,
    /// The `strata` process answerable for the server while it is starting
    /// or idle: the one that started it, or the one that recorded the end
    /// of its last job (and quits it).
    pub owner: Option<ProcessId>,
}

/// What a found [`ServerRecord`] means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The process is gone (or its pid names another process now).
    Gone,
    /// Its owner died while it was starting or idle: stop it.
    Abandoned,
    /// Another live `strata` is starting it: not there yet.
    Starting,
    /// It serves.
    Serving,
}

impl ServerRecord {
    /// The record of a process about to run, started by `owner`.
    pub fn starting(process: ProcessId, owner: ProcessId) -> ServerRecord {
        ServerRecord { process, starting: true, owner: Some(owner) }
    }

    /// Records the process as attributes of the driver's status element.
    pub fn set_attrs(&self, el: &mut Element) {
        el.set_attr("pid", self.process.pid.to_string());
        el.set_attr("starttime", self.process.start_time.to_string());
        if self.starting {
            el.set_attr("state", "starting");
        }
        if let Some(owner) = self.owner {
            owner.set_attrs(el, "owner");
        }
    }

    /// The record [`ServerRecord::set_attrs`] wrote in `el`.
    pub fn from_attrs(el: &Element) -> Result<ServerRecord> {
        let num = |attr: &str| -> Result<u64> {
            el.attr(attr)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| Error::internal(format!("status XML lacks a numeric '{attr}'")))
        };
        let pid = i32::try_from(num("pid")?).map_err(|_| Error::internal("status XML pid out of range"))?;
        Ok(ServerRecord {
            process: ProcessId { pid, start_time: num("starttime")? },
            starting: el.attr("state") == Some("starting"),
            owner: ProcessId::from_attrs(el, "owner"),
        })
    }

    /// What the record means now; `idle` is whether the server exists
    /// only for its owner once started (a storage daemon without a job).
    pub fn verdict(&self, idle: bool) -> Verdict {
        if self.process.liveness() == Liveness::Gone {
            return Verdict::Gone;
        }
        if !self.starting && !idle {
            return Verdict::Serving;
        }
        match self.owner.is_some_and(|o| o.liveness() == Liveness::Alive) {
            false => Verdict::Abandoned,
            true if self.starting => Verdict::Starting,
            true => Verdict::Serving,
        }
    }
}

/// Starts a storage daemon serving `devices` (see
/// [`storage_daemon_command_line`]) in `paths`, owned by this process.
/// `record` writes the record into the driver's status: as starting before
/// the daemon runs, then as started once its monitors are up. A daemon
/// that fails to start is stopped; the caller removes its status.
pub async fn start_daemon(
    devices: &[StorageDevice],
    paths: &RuntimePaths,
    record: impl Fn(&ServerRecord) -> Result<()>,
) -> Result<ServerRecord> {
    let args = storage_daemon_command_line(devices, paths)?;
    let layers = devices.iter().map(|d| d.chain().map_or(1, |c| c.layers.len())).sum();
    std::fs::create_dir_all(&paths.dir).map_err(|e| Error::io("create", &paths.dir, e))?;
    let owner = ProcessId::this()?;
    let binary = storage_daemon_binary();
    tracing::debug!(binary, ?args, "starting a storage daemon for offline jobs");
    let mut spawned = strata_engine::process::spawn(&binary, &args, &[], &paths.log(), |process| {
        record(&ServerRecord::starting(process, owner))
    })?;
    strata_core::crash_point("server:spawned");
    let started = async {
        // The daemon answers only once it has opened every layer; the
        // monitor taken to see it answer is let go at once.
        acquire_started(paths, "storage daemon", &mut spawned.child, &paths.log(), start_up_guard(layers)).await?;
        let started = ServerRecord { starting: false, ..ServerRecord::starting(spawned.id, owner) };
        record(&started)?;
        strata_core::crash_point("server:started");
        Ok::<ServerRecord, Error>(started)
    }
    .await;
    match started {
        Ok(started) => Ok(started),
        Err(e) => {
            let exited = spawned.id.wait_gone(Duration::from_millis(500)).await;
            let _ = spawned.id.terminate(Duration::from_secs(2)).await;
            let _ = spawned.child.try_wait();
            let log = strata_engine::process::log_tail(&paths.log(), 5);
            if exited && !log.trim().is_empty() {
                return Err(Error::operation_failed(format!("{binary} exited during start-up: {}", log.trim())));
            }
            Err(e)
        }
    }
}

/// Quits the daemon `record` names, over `client` (SIGTERM, then SIGKILL,
/// if it does not); the caller holds the domain's lock and removes its
/// status.
pub async fn quit_daemon(client: &QmpClient, record: &ServerRecord) -> Result<()> {
    let _ = client.execute("quit", None).await;
    record.process.terminate(Duration::from_secs(3)).await
}
