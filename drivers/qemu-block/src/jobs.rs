//! Block jobs on QEMU and qemu-storage-daemon: the QMP side of
//! strata-engine's job handling ([`QemuJobServer`]): pull
//! (`block-stream`), commit and active commit (`block-commit`), copy
//! (`blockdev-mirror` into nodes added for its destination). What a job
//! means — its record, layers, refusals, the steps that start it and bring
//! it forward and what its end changes — is the engine's; where its record
//! is kept (a VM's or a container's live status) is the driver's, behind
//! [`JobRecords`].
//!
//! Every job runs with auto-finalize and auto-dismiss off, so QEMU keeps
//! its outcome until Strata has recorded it. The job record (and, for a
//! copy, the `<mirror>` element) is written to the live status before the
//! job starts. Whoever next looks at the domain — the `--wait`ing process,
//! or any later `strata` call — finalizes a pending job at once (a pending
//! mirror holds the guest's I/O), then, once it has concluded, records the
//! chain QEMU now has in both the live and the persistent definition,
//! deletes files a `--delete` asked for, removes the dead nodes and
//! dismisses the job. A `strata` killed at any point loses nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};
use strata_core::chain::Chain;
use strata_core::driver::{BlockJobEnd, BlockJobKind, DomainEvent};
use strata_core::options::BlockCopyOptions;
use strata_core::store::{DomainLock, Store};
use strata_core::{Error, ErrorKind, Result};
use strata_engine::job::layers::{CommitLayers, PullLayers};
use strata_engine::job::record::{job_of_id, JobRecord};
use strata_engine::job::{BlockJobBackend, CopyTarget, JobPhase, JobTable, ObservedJob};
use strata_engine::process::ProcessId;
use strata_qmp::types::{JobInfo, JobStatus};
use strata_qmp::{KnownEvent, QmpClient, QmpError, QmpEvent};
use tokio::sync::broadcast;

use crate::graph::{chains_in, BlockGraph, LiveDisk};
use crate::monitor::{qmp_error, Monitor};
use crate::nodes::{inline_parent, node_prefix};

/// `job-finalize`, tolerating another process having finalized it first.
async fn finalize(client: &QmpClient, name: &str, id: &str) -> Result<()> {
    if let Err(e) = client.execute("job-finalize", Some(json!({"id": id}))).await {
        let jobs = client.query_jobs().await.map_err(|e| qmp_error(name, e))?;
        let done = find_job(&jobs, id).is_none_or(|j| matches!(j.status, JobStatus::Concluded | JobStatus::Aborting));
        if !done {
            return Err(qmp_error(name, e));
        }
    }
    Ok(())
}

/// The disk as QEMU has it open.
pub async fn live_disk(client: &QmpClient, domain: &str, disk: &str) -> Result<LiveDisk> {
    Ok(OpenDisk::read(client, domain, disk).await?.live)
}

/// A disk as QEMU has it open for a block job, with the block graph it
/// was read from: the clean-up after a job starts from the graph its
/// conclusion read instead of asking QEMU again.
pub struct OpenDisk {
    pub live: LiveDisk,
    graph: BlockGraph,
}

impl OpenDisk {
    async fn read(client: &QmpClient, domain: &str, disk: &str) -> Result<OpenDisk> {
        OpenDisk::from_graph(BlockGraph::query(client, domain).await?, client, domain, disk).await
    }

    async fn from_graph(graph: BlockGraph, client: &QmpClient, domain: &str, disk: &str) -> Result<OpenDisk> {
        let live = chains_in(&graph, client, domain)
            .await?
            .remove(disk)
            .ok_or_else(|| Error::invalid_arg(format!("disk '{disk}' not found in domain")))?;
        Ok(OpenDisk { live, graph })
    }
}

/// Runs a `blockdev-create` job to its end and dismisses it.
pub async fn create_blockdev(client: &QmpClient, name: &str, job: &str, options: Value) -> Result<()> {
    let mut rx = client.subscribe_events();
    client
        .execute("blockdev-create", Some(json!({"job-id": job, "options": options})))
        .await
        .map_err(|e| qmp_error(name, e))?;
    // Only a job that failed needs a query: its error is in query-jobs,
    // not in the events.
    let error = if creation_failed(client, name, &mut rx, job).await? {
        find_job(&client.query_jobs().await.map_err(|e| qmp_error(name, e))?, job)
            .ok_or_else(|| Error::internal(format!("creation job '{job}' vanished")))?
            .error
            .clone()
    } else {
        None
    };
    client.execute("job-dismiss", Some(json!({"id": job}))).await.map_err(|e| qmp_error(name, e))?;
    match error {
        Some(e) => Err(Error::operation_failed(format!("cannot create the image: {e}"))),
        None => Ok(()),
    }
}

/// Waits, on the JOB_STATUS_CHANGE events of `rx` (subscribed before the
/// job started), until creation job `job` concluded; whether it failed
/// (passed through `aborting`). Asks QEMU only when events were lost.
async fn creation_failed(
    client: &QmpClient,
    name: &str,
    rx: &mut broadcast::Receiver<QmpEvent>,
    job: &str,
) -> Result<bool> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut aborting = false;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => return Err(Error::new(ErrorKind::OperationTimeout, "creating the image took over 60 s")),
            Ok(Ok(event)) => {
                if let KnownEvent::JobStatusChange(change) = event.known() {
                    match change.status {
                        _ if change.id != job => {}
                        JobStatus::Aborting => aborting = true,
                        JobStatus::Concluded => return Ok(aborting),
                        _ => {}
                    }
                }
            }
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                let jobs = client.query_jobs().await.map_err(|e| qmp_error(name, e))?;
                match find_job(&jobs, job) {
                    Some(j) if j.status == JobStatus::Concluded => return Ok(j.error.is_some()),
                    Some(_) => {}
                    None => return Err(Error::internal(format!("creation job '{job}' vanished"))),
                }
            }
            Ok(Err(broadcast::error::RecvError::Closed)) => {
                return Err(qmp_error(name, strata_qmp::QmpError::Disconnected))
            }
        }
    }
}

fn unused_node_name(graph: &BlockGraph, base: &str) -> String {
    let taken: std::collections::HashSet<&str> = graph.node_names().collect();
    (1..).map(|n| format!("{base}{n}")).find(|c| !taken.contains(c.as_str())).unwrap_or_else(|| base.to_string())
}

fn find_job<'a>(jobs: &'a [JobInfo], id: &str) -> Option<&'a JobInfo> {
    jobs.iter().find(|j| j.id == id)
}

/// A job as QEMU reports it, in the engine's terms.
fn observed_job(job: &JobInfo) -> ObservedJob {
    ObservedJob {
        phase: match job.status {
            JobStatus::Ready => JobPhase::Ready,
            JobStatus::Pending => JobPhase::Pending,
            JobStatus::Concluded => JobPhase::Concluded,
            _ => JobPhase::Running,
        },
        error: job.error.clone(),
        done: job.current_progress,
        total: job.total_progress,
    }
}

/// Waits up to `limit` for job `id` to reach one of the `wanted` states
/// (`Null` once it is gone), and returns the state it reached.
pub async fn wait_status(
    client: &QmpClient,
    name: &str,
    id: &str,
    wanted: &[JobStatus],
    limit: Duration,
) -> Result<JobStatus> {
    let mut rx = client.subscribe_events();
    let deadline = Instant::now() + limit;
    loop {
        let jobs = client.query_jobs().await.map_err(|e| qmp_error(name, e))?;
        let now = find_job(&jobs, id).map(|j| j.status).unwrap_or(JobStatus::Null);
        if wanted.contains(&now) {
            return Ok(now);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::new(
                ErrorKind::OperationTimeout,
                format!("block job '{id}' stayed {now:?} for {limit:?}"),
            ));
        }
        job_status_changed(&mut rx, id, left).await;
    }
}

/// Finalizes pending job `id` and waits up to `limit` until it has
/// concluded. QEMU concludes a job inside `job-finalize` and sends the
/// status change before the reply, so it is usually here already and no
/// query is needed.
async fn finalize_to_conclusion(client: &QmpClient, name: &str, id: &str, limit: Duration) -> Result<()> {
    let mut changes = client.subscribe_events();
    finalize(client, name, id).await?;
    let done = [JobStatus::Concluded, JobStatus::Null];
    if !reported(&mut changes, id, &done) {
        wait_status(client, name, id, &done, limit).await?;
    }
    Ok(())
}

/// Whether QEMU has already reported job `id` entering one of `wanted`,
/// among the events `changes` holds (none is waited for). A lagging
/// receiver answers no: the caller asks QEMU instead.
fn reported(changes: &mut broadcast::Receiver<QmpEvent>, id: &str, wanted: &[JobStatus]) -> bool {
    while let Ok(ev) = changes.try_recv() {
        if let KnownEvent::JobStatusChange(c) = ev.known() {
            if c.id == id && wanted.contains(&c.status) {
                return true;
            }
        }
    }
    false
}

/// Waits up to `limit` for QEMU to report a status change of job `id`;
/// false when none came in time. Missed events (a lagging receiver) or a
/// closed monitor end the wait too: the caller looks again.
async fn job_status_changed(rx: &mut broadcast::Receiver<QmpEvent>, id: &str, limit: Duration) -> bool {
    tokio::time::timeout(limit, async {
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    if let KnownEvent::JobStatusChange(c) = ev.known() {
                        if c.id == id {
                            return;
                        }
                    }
                }
                Err(_) => return,
            }
        }
    })
    .await
    .is_ok()
}

/// Where a driver keeps the block-job records of a domain its QEMU or
/// storage daemon serves (the QEMU driver: the status XML), and how it
/// quits a storage daemon left without a job.
#[async_trait]
pub trait JobRecords: Send + Sync {
    /// The jobs recorded for `domain`; `None` once nothing serves it.
    fn recorded_jobs(&self, store: &Store, domain: &str) -> Result<Option<Vec<JobRecord>>>;

    /// Changes the records under the domain lock, which the caller holds
    /// (see [`BlockJobBackend::edit_records`]); `ended` names the device
    /// whose job just ended and its root node now, to be recorded with
    /// them. `None` (nothing written) once nothing serves the domain.
    fn edit_records<T>(
        &self,
        store: &Store,
        domain: &str,
        ended: Option<(&str, Option<&str>)>,
        change: impl FnOnce(JobTable<'_>) -> Result<T>,
    ) -> Result<Option<T>>;

    /// Quits the server if it is a storage daemon with no job recorded.
    async fn quit_if_idle(&self, store: &Store, domain: &str, client: &QmpClient) -> Result<()>;
}

/// A domain's jobs as its QEMU or storage daemon runs them: the QMP side
/// of the engine's job handling, the records kept where `R` keeps them.
pub struct QemuJobServer<R> {
    store: Store,
    name: String,
    monitor: Arc<Monitor>,
    records: R,
    /// The QEMU or storage daemon process.
    pub process: ProcessId,
    /// The devices' roots are exported writable over FUSE (a running
    /// container's filesystems): QEMU 7.2's export holds the resize
    /// permission on the root that a job writing the root (a pull into
    /// it, an active commit, a copy) must not share.
    /// Over writable FUSE exports: the remedy a refusal names.
    fuse_exported: Option<&'static str>,
}

impl<R: JobRecords> QemuJobServer<R> {
    /// The job server of `process`, serving `name` through `monitor`.
    pub fn new(store: &Store, name: &str, monitor: Arc<Monitor>, process: ProcessId, records: R) -> QemuJobServer<R> {
        QemuJobServer { store: store.clone(), name: name.to_string(), monitor, records, process, fuse_exported: None }
    }

    /// The same server, its devices' roots exported writable over FUSE:
    /// the jobs that write a root are refused, saying why, before QEMU
    /// is asked (it would refuse them with a permission conflict).
    /// `remedy` says which jobs the caller's storage can run now and how
    /// to run the others.
    pub fn over_writable_fuse_exports(self, remedy: &'static str) -> QemuJobServer<R> {
        QemuJobServer { fuse_exported: Some(remedy), ..self }
    }

    /// Refuses `what`, a job that writes the device's exported root, on a
    /// server whose roots are exported over FUSE.
    fn refuse_writing_exported_root(&self, what: &str) -> Result<()> {
        let Some(remedy) = self.fuse_exported else { return Ok(()) };
        Err(Error::operation_invalid(format!(
            "cannot {what} of '{}' while its storage is exported writable over FUSE: QEMU's FUSE export holds \
             the resize permission on the active layer that this job needs to itself; {remedy}",
            self.name
        )))
    }

    pub fn client(&self) -> &QmpClient {
        &self.monitor.client
    }

    /// Runs a job-starting command with its `job-id`.
    async fn start(&self, command: &str, id: &str, mut args: Value) -> Result<()> {
        args["job-id"] = Value::String(id.to_string());
        self.client().execute(command, Some(args)).await.map_err(|e| qmp_error(&self.name, e))?;
        Ok(())
    }
}

/// The nodes a copy's destination was added as, and the lock over nodes
/// without a parent, held until the copy has started (or the nodes are
/// removed).
pub struct QemuCopyTarget {
    format_node: String,
    file_node: String,
    _unattached: DomainLock,
}

#[async_trait]
impl<R: JobRecords> BlockJobBackend for QemuJobServer<R> {
    type OpenDisk = OpenDisk;
    type Changes = broadcast::Receiver<QmpEvent>;
    type CopyTarget = QemuCopyTarget;

    fn store(&self) -> &Store {
        &self.store
    }

    fn domain(&self) -> &str {
        &self.name
    }

    async fn observe(&self) -> Result<Vec<(String, ObservedJob)>> {
        let jobs = self.client().query_jobs().await.map_err(|e| qmp_error(&self.name, e))?;
        Ok(jobs.iter().map(|j| (j.id.clone(), observed_job(j))).collect())
    }

    fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.client().subscribe_events()
    }

    async fn changed(&self, changes: &mut broadcast::Receiver<QmpEvent>, id: &str, limit: Duration) -> bool {
        job_status_changed(changes, id, limit).await
    }

    async fn speed(&self, id: &str) -> Result<u64> {
        speed_of(self.client(), &self.name, id).await
    }

    async fn set_speed(&self, id: &str, bytes_per_sec: u64) -> Result<()> {
        self.client()
            .execute("block-job-set-speed", Some(json!({"device": id, "speed": bytes_per_sec})))
            .await
            .map_err(|e| qmp_error(&self.name, e))?;
        Ok(())
    }

    async fn complete(&self, id: &str) -> Result<()> {
        self.client().execute("job-complete", Some(json!({"id": id}))).await.map_err(|e| qmp_error(&self.name, e))?;
        Ok(())
    }

    /// `block-job-cancel` of a ready job finishes it consistently without
    /// a pivot; `job-cancel` cancels any other.
    async fn cancel(&self, id: &str, ready: bool) -> Result<()> {
        let (command, args) = if ready {
            ("block-job-cancel", json!({"device": id, "force": false}))
        } else {
            ("job-cancel", json!({"id": id}))
        };
        self.client().execute(command, Some(args)).await.map_err(|e| qmp_error(&self.name, e))?;
        Ok(())
    }

    async fn settle(&self, id: &str) -> Result<()> {
        // Finalize the moment the job is pending: a pending mirror holds I/O.
        let (client, name) = (self.client(), &self.name);
        let ended = [JobStatus::Pending, JobStatus::Concluded, JobStatus::Null];
        if wait_status(client, name, id, &ended, Duration::from_secs(300)).await? == JobStatus::Pending {
            finalize_to_conclusion(client, name, id, Duration::from_secs(60)).await?;
        }
        Ok(())
    }

    async fn finalize(&self, id: &str) -> Result<()> {
        finalize_to_conclusion(self.client(), &self.name, id, Duration::from_secs(30)).await
    }

    /// Dismissed before the graph is read: on QEMU 7.2 (seen with
    /// qemu-storage-daemon), query-named-block-nodes between a stream's
    /// finalize and its dismiss crashes the process. The dismissal and the
    /// graph's queries go out together, in that order, which QEMU keeps.
    async fn dismiss_then_open(&self, dismiss: Option<&str>, disk: &str) -> Result<OpenDisk> {
        let Some(id) = dismiss else { return OpenDisk::read(self.client(), &self.name, disk).await };
        let (client, name) = (self.client(), self.name.as_str());
        let mut replies = client
            .execute_in_order(vec![
                ("job-dismiss", Some(json!({"id": id}))),
                ("query-named-block-nodes", Some(json!({"flat": true}))),
                ("x-debug-query-block-graph", None),
            ])
            .await
            .into_iter();
        let mut next = || replies.next().unwrap_or(Err(QmpError::Disconnected)).map_err(|e| qmp_error(name, e));
        next()?;
        let (nodes, edges) = (next()?, next()?);
        OpenDisk::from_graph(BlockGraph::from_replies(nodes, &edges)?, client, name, disk).await
    }

    async fn open_disk(&self, disk: &str) -> Result<OpenDisk> {
        OpenDisk::read(self.client(), &self.name, disk).await
    }

    fn chain(disk: &OpenDisk) -> &Chain {
        &disk.live.chain
    }

    async fn start_pull(
        &self,
        id: &str,
        open: &OpenDisk,
        layers: &PullLayers,
        backing: Option<String>,
        bandwidth: Option<u64>,
    ) -> Result<()> {
        let disk = &open.live;
        if layers.into == 0 {
            self.refuse_writing_exported_root("pull into the active layer")?;
        }
        let mut args = json!({
            "device": disk.nodes[layers.into],
            "auto-finalize": false,
            "auto-dismiss": false,
        });
        if let Some(b) = layers.base {
            args["base-node"] = Value::String(disk.nodes[b].clone());
            if let Some(s) = backing {
                args["backing-file"] = Value::String(s);
            }
        }
        if let Some(bw) = bandwidth {
            args["speed"] = json!(bw);
        }
        self.start("block-stream", id, args).await
    }

    async fn start_commit(
        &self,
        id: &str,
        open: &OpenDisk,
        layers: &CommitLayers,
        backing: Option<String>,
        bandwidth: Option<u64>,
    ) -> Result<()> {
        let disk = &open.live;
        if layers.kind == BlockJobKind::ActiveCommit {
            self.refuse_writing_exported_root("run an active block commit")?;
        }
        let mut args = json!({
            "device": disk.nodes[0],
            "base-node": disk.nodes[layers.base],
            "auto-finalize": false,
            "auto-dismiss": false,
        });
        if layers.kind != BlockJobKind::ActiveCommit {
            args["top-node"] = Value::String(disk.nodes[layers.top].clone());
            if let Some(s) = backing {
                args["backing-file"] = Value::String(s);
            }
        }
        if let Some(bw) = bandwidth {
            args["speed"] = json!(bw);
        }
        self.start("block-commit", id, args).await
    }

    /// The destination's format node over its file (or host device) node,
    /// named after the disk; a new image is made by `blockdev-create`.
    async fn open_copy_target(&self, disk_name: &str, open: &OpenDisk, target: &CopyTarget) -> Result<QemuCopyTarget> {
        let disk = &open.live;
        self.refuse_writing_exported_root("run a block copy")?;
        let (client, name) = (self.client(), self.name.as_str());
        let unattached = strata_engine::blocking::lock_domain_for(&self.store, name, UNATTACHED_NODES).await?;
        let graph = BlockGraph::query(client, name).await?;
        let prefix = node_prefix(disk_name);
        let fmt_node = unused_node_name(&graph, &format!("{prefix}-copy-fmt"));
        let file_node = unused_node_name(&graph, &format!("{prefix}-copy-file"));
        let dest_str = target.path.to_str().ok_or_else(|| Error::invalid_arg("destination path is not UTF-8"))?;
        let protocol = if target.is_block { "host_device" } else { "file" };
        let format = target.format.as_str();
        if !target.reuse && !target.is_block {
            // By node, not device: a storage daemon has no devices.
            let size = client
                .query_named_block_nodes()
                .await
                .map_err(|e| qmp_error(name, e))?
                .into_iter()
                .find(|n| Some(n.node_name.as_str()) == disk.root())
                .map(|n| n.image.virtual_size)
                .ok_or_else(|| Error::internal("cannot read the disk's size"))?;
            let size_now = if format == "raw" { size } else { 0 };
            create_blockdev(
                client,
                name,
                &format!("{file_node}-create"),
                json!({"driver": "file", "filename": dest_str, "size": size_now}),
            )
            .await?;
            client
                .execute("blockdev-add", Some(json!({"driver": "file", "node-name": file_node, "filename": dest_str})))
                .await
                .map_err(|e| qmp_error(name, e))?;
            if format != "raw" {
                let mut options = json!({"driver": format, "file": file_node, "size": size});
                if let Some(b) = target.backing {
                    if let Some(p) = disk.chain.layers[b].source.local_path() {
                        options["backing-file"] = Value::String(p.to_string_lossy().into_owned());
                        options["backing-fmt"] =
                            Value::String(disk.chain.layers[b].format.clone().unwrap_or_else(|| "raw".into()));
                    }
                }
                create_blockdev(client, name, &format!("{fmt_node}-create"), options).await?;
            }
        } else {
            client
                .execute(
                    "blockdev-add",
                    Some(json!({"driver": protocol, "node-name": file_node, "filename": dest_str})),
                )
                .await
                .map_err(|e| qmp_error(name, e))?;
        }
        let mut format_node = json!({"driver": format, "node-name": fmt_node, "file": file_node});
        if format != "raw" {
            // Quirk 4: a shallow copy's target must be given the source's
            // backing node, or the guest misses data after the pivot.
            format_node["backing"] = match target.backing {
                Some(b) => Value::String(disk.nodes[b].clone()),
                None => Value::Null,
            };
        }
        if let Err(e) = client.execute("blockdev-add", Some(format_node)).await {
            let _ = client.execute("blockdev-del", Some(json!({"node-name": file_node}))).await;
            return Err(qmp_error(name, e));
        }
        strata_core::pause_point("blockcopy:nodes-added");
        Ok(QemuCopyTarget { format_node: fmt_node, file_node, _unattached: unattached })
    }

    async fn start_copy(
        &self,
        id: &str,
        open: &OpenDisk,
        target: &QemuCopyTarget,
        opts: &BlockCopyOptions,
    ) -> Result<()> {
        let disk = &open.live;
        let mut args = json!({
            "device": disk.nodes[0],
            "target": target.format_node,
            "sync": if opts.shallow { "top" } else { "full" },
            "auto-finalize": false,
            "auto-dismiss": false,
        });
        if let Some(bw) = opts.bandwidth_bytes {
            args["speed"] = json!(bw);
        }
        if let Some(g) = opts.granularity {
            args["granularity"] = json!(g);
        }
        if let Some(b) = opts.buf_size {
            args["buf-size"] = json!(b);
        }
        self.start("blockdev-mirror", id, args).await
    }

    async fn close_copy_target(&self, target: QemuCopyTarget) {
        for n in [&target.format_node, &target.file_node] {
            let _ = self.client().execute("blockdev-del", Some(json!({"node-name": n}))).await;
        }
    }

    async fn tidy_after(&self, rec: &JobRecord, end: &BlockJobEnd, open: &OpenDisk) -> Result<()> {
        remove_dead_nodes(&self.store, self.client(), &self.name, &rec.disk, &open.graph).await?;
        if rec.kind == BlockJobKind::ActiveCommit && *end != BlockJobEnd::Completed {
            reopen_backing_read_only(self.client(), &self.name, &rec.disk).await?;
        }
        Ok(())
    }

    async fn quit_if_idle(&self) -> Result<()> {
        self.records.quit_if_idle(&self.store, &self.name, self.client()).await
    }

    async fn lock(&self) -> Result<DomainLock> {
        strata_engine::blocking::lock_domain(&self.store, &self.name).await
    }

    fn recorded_jobs(&self) -> Result<Option<Vec<JobRecord>>> {
        self.records.recorded_jobs(&self.store, &self.name)
    }

    fn edit_records<T>(
        &self,
        ended: Option<(&str, &OpenDisk)>,
        change: impl FnOnce(JobTable<'_>) -> Result<T>,
    ) -> Result<Option<T>> {
        let ended = ended.map(|(disk, open)| (disk, open.live.root()));
        self.records.edit_records(&self.store, &self.name, ended, change)
    }
}

/// An active commit that ended without a pivot leaves its base open
/// read-write (QEMU 7.2 does not reopen it), holding the image's write
/// lock; backing layers go back to read-only here.
async fn reopen_backing_read_only(client: &QmpClient, name: &str, disk: &str) -> Result<()> {
    let live = live_disk(client, name, disk).await?;
    let nodes = client.query_named_block_nodes().await.map_err(|e| qmp_error(name, e))?;
    for node in live.nodes.iter().skip(1) {
        if nodes.iter().any(|n| &n.node_name == node && !n.ro) {
            if let Err(e) = reopen_node(client, name, node, true).await {
                tracing::warn!(node, error = %e, "could not reopen a backing layer read-only");
            }
        }
    }
    Ok(())
}

/// `blockdev-reopen` of a format node with its current children, changing
/// only whether it is read-only.
pub async fn reopen_node(client: &QmpClient, name: &str, node: &str, read_only: bool) -> Result<()> {
    let nodes = client.query_named_block_nodes().await.map_err(|e| qmp_error(name, e))?;
    let info = nodes
        .iter()
        .find(|n| n.node_name == node)
        .ok_or_else(|| Error::internal(format!("QEMU has no node '{node}'")))?;
    let graph = BlockGraph::query(client, name).await?;
    let mut options = json!({"driver": info.drv, "node-name": node, "read-only": read_only});
    if let Some(file) = graph.child(node, "file") {
        options["file"] = Value::String(file);
    }
    if info.drv != "raw" {
        options["backing"] = graph.child(node, "backing").map(Value::String).unwrap_or(Value::Null);
    }
    client.execute("blockdev-reopen", Some(json!({"options": [options]}))).await.map_err(|e| qmp_error(name, e))?;
    Ok(())
}

/// The lock over nodes QEMU has without a parent yet: held from adding
/// such nodes until the command that attaches them (a job, a snapshot
/// transaction) has returned, and by [`remove_dead_nodes`], which would
/// otherwise take another process's fresh nodes for dead ones.
const UNATTACHED_NODES: &str = "nodes";

/// Takes the domain's lock over nodes QEMU has without a parent yet
/// (`UNATTACHED_NODES`), for a caller about to add some.
pub fn lock_unattached_nodes(store: &Store, name: &str) -> Result<DomainLock> {
    store.lock_domain_for(name, UNATTACHED_NODES)
}

/// Removes the disk's nodes nothing uses any more (left by a finished job;
/// QEMU keeps monitor-added nodes until told), each before the nodes it
/// uses, all sent at once. Only this disk's nodes: another disk's job may
/// be adding some. The first round works from `read`, the graph the job's
/// conclusion read (a node it shows unused that another process has
/// attached since is refused by QEMU as in use); when QEMU refuses one,
/// the graph is read again.
async fn remove_dead_nodes(store: &Store, client: &QmpClient, name: &str, disk: &str, read: &BlockGraph) -> Result<()> {
    let _nodes = strata_engine::blocking::lock_domain_for(store, name, UNATTACHED_NODES).await?;
    let prefix = format!("{}-", node_prefix(disk));
    let mut dead = read.unused_nodes(&prefix);
    for _ in 0..64 {
        if dead.is_empty() {
            return Ok(());
        }
        // A protocol node given inline goes with its format node: asking
        // for it as well would only be refused (about 0.5 ms a command).
        let all: std::collections::HashSet<String> = dead.iter().cloned().collect();
        dead.retain(|node| inline_parent(node).is_none_or(|parent| !all.contains(&parent)));
        let removals = dead.iter().map(|node| ("blockdev-del", Some(json!({"node-name": node})))).collect();
        let mut all_removed = true;
        for (node, removed) in dead.iter().zip(client.execute_in_order(removals).await) {
            match removed {
                Ok(_) => {}
                // A node given inline at start (a layer's file node) goes
                // with its parent: already gone is what was asked for.
                Err(QmpError::Command { desc, .. }) if desc.starts_with("Failed to find node with node-name") => {}
                Err(e) => {
                    tracing::debug!(node, error = %e, "node not removed");
                    all_removed = false;
                }
            }
        }
        if all_removed {
            return Ok(());
        }
        dead = BlockGraph::query(client, name).await?.unused_nodes(&prefix);
    }
    Ok(())
}

/// virsh's `block-job` event for QEMU's event about a job Strata started
/// (its id names the kind and the device: `Block Commit for / completed`).
pub fn block_job_event(domain: &str, ev: &QmpEvent) -> Option<DomainEvent> {
    let (id, what) = match ev.known() {
        KnownEvent::BlockJobCompleted(e) => (e.device, if e.error.is_some() { "failed" } else { "completed" }),
        KnownEvent::BlockJobCancelled(e) => (e.device, "canceled"),
        KnownEvent::BlockJobReady(e) => (e.device, "ready"),
        KnownEvent::BlockJobError(e) => (e.device, "failed"),
        _ => return None,
    };
    let (kind, disk) = job_of_id(&id)?;
    Some(DomainEvent {
        domain: domain.to_string(),
        event: "block-job".to_string(),
        detail: format!("{} for {disk} {what}", kind.label()),
        disk: Some(disk),
        timestamp_us: event_time_us(ev),
    })
}

/// When QEMU says the event happened, in microseconds since the epoch.
pub fn event_time_us(ev: &QmpEvent) -> i64 {
    ev.timestamp.0.saturating_mul(1_000_000).saturating_add(ev.timestamp.1)
}

async fn speed_of(client: &QmpClient, name: &str, id: &str) -> Result<u64> {
    let jobs = client.query_block_jobs().await.map_err(|e| qmp_error(name, e))?;
    Ok(jobs.iter().find(|j| j.device == id).map(|j| j.speed).unwrap_or(0))
}
