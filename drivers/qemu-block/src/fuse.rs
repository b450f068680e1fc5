//! A storage device's chain served as a plain file: a `qemu-storage-daemon`
//! opens the recorded chain with the same nodes a VM's start builds
//! ([`crate::nodes`]) and exports its top node with `block-export-add`
//! type `fuse` (writable unless the device is read-only, never growable).
//! Reads of the file go through the whole chain; writes land in the top
//! layer only.
//!
//! This is how a container's qcow2 root becomes a block device: the
//! caller (the LXC driver, through its own syscall seam) attaches the file
//! to a loop device and mounts that. Loop devices are left to the caller
//! on purpose, with two rules from the research report
//! (`research/lxc/REPORT.md`, section 2): never enable loop direct I/O on
//! a FUSE-exported file (it corrupts ext4 with QEMU 7.2), and never attach
//! one image to two loop devices. The daemon must run outside the
//! container's freezable cgroup: a frozen daemon hangs `FIFREEZE` on the
//! filesystem it serves. Detach the loop device before the export is
//! removed.
//!
//! ```no_run
//! # async fn serve(device: &strata_core::xml::StorageDevice) -> strata_core::Result<()> {
//! use std::path::Path;
//! let served = strata_qemu_block::fuse::serve_fuse("ct1", device, Path::new("/run/ct1/qsd"), Path::new("/run/ct1/root.raw")).await?;
//! // losetup --direct-io=off --show -f /run/ct1/root.raw; mount; …; umount; losetup -d
//! served.stop().await?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use strata_core::xml::StorageDevice;
use strata_core::{Error, ErrorKind, Result};
use strata_engine::process::ProcessId;
use strata_qmp::{QmpClient, QmpEvent};
use tokio::sync::broadcast;

use crate::daemon::{monitor_args, storage_daemon_binary};
use crate::monitor::{acquire_started, qmp_error, start_up_guard, Monitor};
use crate::nodes::{device_nodes, node_prefix, read_only};
use crate::runtime::RuntimePaths;

/// The file in a FUSE server's runtime directory that records its process
/// (`PID STARTTIME`), written before the daemon runs.
const PROCESS_RECORD: &str = "storage-daemon.pid";

/// A `qemu-storage-daemon` started to serve FUSE exports, with one of its
/// monitors held.
pub struct FuseServer {
    pub paths: RuntimePaths,
    pub process: ProcessId,
    child: std::process::Child,
    monitor: Monitor,
    /// What the daemon serves, for messages.
    name: String,
}

impl FuseServer {
    /// Starts a storage daemon with [`MONITORS`](crate::runtime::MONITORS)
    /// monitors and no node in `runtime_dir` (created if missing), for
    /// `name`'s storage. Its process is recorded in the directory before it
    /// runs (see [`recorded_server`]).
    pub async fn start(name: &str, runtime_dir: &Path) -> Result<FuseServer> {
        let paths = RuntimePaths { dir: runtime_dir.to_path_buf() };
        std::fs::create_dir_all(&paths.dir).map_err(|e| Error::io("create", &paths.dir, e))?;
        let record_file = paths.dir.join(PROCESS_RECORD);
        let record = |id: ProcessId| {
            strata_core::store::atomic_write(&record_file, format!("{} {}\n", id.pid, id.start_time).as_bytes())
        };
        let binary = storage_daemon_binary();
        let mut spawned = strata_engine::process::spawn(&binary, &monitor_args(&paths), &[], &paths.log(), record)?;
        // The daemon starts with no node: exports are added once it runs.
        let started = acquire_started(&paths, name, &mut spawned.child, &paths.log(), start_up_guard(0)).await;
        match started {
            Ok(monitor) => {
                Ok(FuseServer { paths, process: spawned.id, child: spawned.child, monitor, name: name.to_string() })
            }
            Err(e) => {
                let _ = spawned.id.terminate(Duration::from_secs(3)).await;
                let _ = spawned.child.wait();
                let _ = std::fs::remove_file(&record_file);
                Err(e)
            }
        }
    }

    pub fn client(&self) -> &QmpClient {
        &self.monitor.client
    }

    /// Quits the daemon (SIGTERM, then SIGKILL, if it does not), reaps it
    /// and removes its process record.
    pub async fn stop(mut self) -> Result<()> {
        let _ = self.client().execute("quit", None).await;
        self.process.terminate(Duration::from_secs(3)).await?;
        let _ = self.child.wait();
        let record = self.paths.dir.join(PROCESS_RECORD);
        match std::fs::remove_file(&record) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &record, e)),
        }
    }
}

/// The storage daemon a [`FuseServer`] recorded in `runtime_dir`, if one
/// did (it may have exited since: see [`ProcessId::liveness`]).
pub fn recorded_server(runtime_dir: &Path) -> Result<Option<ProcessId>> {
    let path = runtime_dir.join(PROCESS_RECORD);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", &path, e)),
    };
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    match (fields.next(), fields.next()) {
        (Some(Ok(pid)), Some(Ok(start_time))) => {
            let pid =
                i32::try_from(pid).map_err(|_| Error::internal(format!("{}: pid out of range", path.display())))?;
            Ok(Some(ProcessId { pid, start_time }))
        }
        _ => Err(Error::internal(format!("{} does not hold 'PID STARTTIME'", path.display()))),
    }
}

/// A device's chain exported over FUSE by a storage daemon.
#[derive(Debug)]
pub struct FuseExport {
    /// The export's id (the device's node prefix).
    pub id: String,
    /// The exported file.
    pub file: PathBuf,
    /// The format nodes added for the chain, backing layers first.
    pub nodes: Vec<String>,
}

/// Adds `device`'s chain to the storage daemon `client` talks to (serving
/// `name`) and exports its top node over FUSE at `file`, which must not
/// exist or be an empty regular file (it is created, and the export is
/// mounted over it). Nothing is left added when it fails.
pub async fn export_fuse(client: &QmpClient, name: &str, device: &StorageDevice, file: &Path) -> Result<FuseExport> {
    let nodes =
        device_nodes(device, None)?.ok_or_else(|| Error::invalid_arg(format!("{device} holds no image to export")))?;
    let file_str =
        file.to_str().ok_or_else(|| Error::invalid_arg(format!("path '{}' is not valid UTF-8", file.display())))?;
    prepare_mountpoint(file)?;
    let id = node_prefix(device.name());
    let mut added: Vec<String> = Vec::new();
    let exported = async {
        for node in &nodes.nodes {
            client.execute("blockdev-add", Some(node.clone())).await.map_err(|e| qmp_error(name, e))?;
            added.push(node_name_of(node)?);
        }
        let export = json!({
            "type": "fuse", "id": id, "node-name": nodes.root, "mountpoint": file_str,
            "writable": !read_only(device), "growable": false,
        });
        client.execute("block-export-add", Some(export)).await.map_err(|e| qmp_error(name, e))?;
        Ok::<(), Error>(())
    }
    .await;
    if let Err(e) = exported {
        delete_nodes(client, name, &added).await;
        let _ = std::fs::remove_file(file);
        return Err(e);
    }
    Ok(FuseExport { id, file: file.to_path_buf(), nodes: added })
}

impl FuseExport {
    /// Removes the export (`block-export-del`, then the wait for QEMU's
    /// `BLOCK_EXPORT_DELETED`, which comes once the FUSE file is
    /// unmounted), its nodes and the file.
    pub async fn remove(self, client: &QmpClient, name: &str) -> Result<()> {
        let mut events = client.subscribe_events();
        client.execute("block-export-del", Some(json!({"id": self.id}))).await.map_err(|e| qmp_error(name, e))?;
        wait_export_deleted(client, name, &mut events, &self.id, Duration::from_secs(60)).await?;
        delete_nodes(client, name, &self.nodes).await;
        match std::fs::remove_file(&self.file) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &self.file, e)),
        }
    }
}

/// A storage device's chain served by a storage daemon of its own as the
/// file [`ServedChain::file`].
pub struct ServedChain {
    pub server: FuseServer,
    pub export: FuseExport,
}

/// Starts a storage daemon in `runtime_dir` (its monitors, log and process
/// record there) that serves `device`'s recorded chain, and exports it
/// over FUSE at `file` (see [`export_fuse`]); `name` names the domain or
/// container in messages. The daemon is stopped again if the export fails.
pub async fn serve_fuse(name: &str, device: &StorageDevice, runtime_dir: &Path, file: &Path) -> Result<ServedChain> {
    let server = FuseServer::start(name, runtime_dir).await?;
    match export_fuse(server.client(), name, device, file).await {
        Ok(export) => Ok(ServedChain { server, export }),
        Err(e) => {
            if let Err(stop) = server.stop().await {
                tracing::warn!(error = %stop, "could not stop the storage daemon of a failed export");
            }
            Err(e)
        }
    }
}

impl ServedChain {
    /// The exported file, for a loop device.
    pub fn file(&self) -> &Path {
        &self.export.file
    }

    /// Removes the export (the caller has detached its loop device) and
    /// stops the daemon; the daemon is stopped even when the export's
    /// removal fails.
    pub async fn stop(self) -> Result<()> {
        let removed = self.export.remove(self.server.client(), &self.server.name).await;
        self.server.stop().await?;
        removed
    }
}

/// FUSE mounts over a regular file; one with contents would be hidden.
fn prepare_mountpoint(file: &Path) -> Result<()> {
    match std::fs::symlink_metadata(file) {
        Ok(meta) if meta.is_file() && meta.len() == 0 => Ok(()),
        Ok(_) => Err(Error::invalid_arg(format!(
            "'{}' cannot be a FUSE export's mountpoint: it must be an empty regular file or not exist",
            file.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::File::create(file).map(drop).map_err(|e| Error::io("create", file, e))
        }
        Err(e) => Err(Error::io("inspect", file, e)),
    }
}

fn node_name_of(node: &Value) -> Result<String> {
    node.get("node-name")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| Error::internal(format!("a blockdev without a node name: {node}")))
}

/// `blockdev-del` of `nodes` (format nodes, backing layers first): the top
/// first, each format node taking its inline protocol node with it.
async fn delete_nodes(client: &QmpClient, name: &str, nodes: &[String]) {
    for node in nodes.iter().rev() {
        if let Err(e) = client.execute("blockdev-del", Some(json!({"node-name": node}))).await {
            tracing::warn!(domain = name, node, error = %qmp_error(name, e), "node not removed");
        }
    }
}

/// Waits up to `limit` for export `id` to be gone: its
/// `BLOCK_EXPORT_DELETED`, or (after a missed event) its absence from
/// `query-block-exports`.
async fn wait_export_deleted(
    client: &QmpClient,
    name: &str,
    events: &mut broadcast::Receiver<QmpEvent>,
    id: &str,
    limit: Duration,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left.min(Duration::from_secs(1)), events.recv()).await {
            Ok(Ok(ev))
                if ev.event == "BLOCK_EXPORT_DELETED" && ev.data.get("id").and_then(Value::as_str) == Some(id) =>
            {
                return Ok(())
            }
            Ok(Ok(_)) => continue,
            // Lagged, closed or quiet: ask.
            _ => {}
        }
        let exports = client.execute("query-block-exports", None).await.map_err(|e| qmp_error(name, e))?;
        let listed = exports.as_array().into_iter().flatten().any(|e| e.get("id").and_then(Value::as_str) == Some(id));
        if !listed {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::new(
                ErrorKind::OperationTimeout,
                format!(
                    "the FUSE export '{id}' of '{name}' was not deleted within {limit:?}; is its file still in use?"
                ),
            ));
        }
    }
}
