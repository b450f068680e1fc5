//! Block jobs on running domains: pull (`block-stream`), commit and active
//! commit (`block-commit`), copy (`blockdev-mirror`).
//!
//! Every job runs with auto-finalize and auto-dismiss off, so QEMU keeps
//! its outcome until Strata has recorded it. The job record (and, for a
//! copy, the `<mirror>` element) is written to the status XML before the
//! job starts. Whoever next looks at the domain — the `--wait`ing process,
//! or any later `strata` call — finalizes a pending job at once (a pending
//! mirror holds the guest's I/O), then, once it has concluded, records the
//! chain QEMU now has in both the live and the persistent definition,
//! deletes files a `--delete` asked for, removes the dead nodes and
//! dismisses the job. A `strata` killed at any point loses nothing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use strata_core::chain::StorageSource;
use strata_core::define;
use strata_core::driver::{BlockJobEnd, BlockJobInfo, BlockJobKind, BlockJobState};
use strata_core::image;
use strata_core::options::{BlockCommitOptions, BlockCopyOptions, BlockPullOptions};
use strata_core::pool::PoolManager;
use strata_core::store::{DomainLock, Store};
use strata_core::xml::Element;
use strata_core::{Error, ErrorKind, Result};
use strata_engine::blocking::blocking;
use strata_engine::job::reconcile::{self, Step};
use strata_engine::job::record::{self, no_job, JobRecord};
use strata_engine::job::{conclude, layers, refusals, JobPhase, ObservedJob};
use strata_engine::process::ProcessId;
use strata_qmp::types::{JobInfo, JobStatus};
use strata_qmp::{KnownEvent, QmpClient, QmpEvent};
use tokio::sync::broadcast;

use crate::live::{self, qmp_error, BlockGraph, LiveDisk, LiveStatus};

/// Refuses early (before any file is made) when the disk already has a job.
fn check_idle(store: &Store, name: &str, disk: &str) -> Result<()> {
    match live::reconcile(store, name)? {
        Some(status) => refusals::ensure_idle(&status.jobs, disk),
        None => Ok(()),
    }
}

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
    live::live_chains(client, domain)
        .await?
        .remove(disk)
        .ok_or_else(|| Error::invalid_arg(format!("disk '{disk}' not found in domain")))
}

/// Adds a job record under the domain lock, refusing a busy disk; returns
/// the job id it gave the record.
async fn record_job(store: &Store, name: &str, mut rec: JobRecord, mirror: Option<Element>) -> Result<String> {
    live::edit_status_async(store, name, |status| {
        refusals::ensure_idle(&status.jobs, &rec.disk)?;
        rec.give_id(status.next_node)?;
        status.next_node = status.next_node.saturating_add(1);
        let id = rec.id.clone();
        if let Some(m) = mirror {
            status.domain.set_disk_mirror(&rec.disk, Some(m))?;
        }
        record::set_outcome(store, name, &rec.disk, None)?;
        status.jobs.push(rec);
        Ok(id)
    })
    .await?
    .ok_or_else(|| Error::operation_invalid("domain is not running"))
}

async fn drop_record(store: &Store, name: &str, id: &str) -> Result<()> {
    live::edit_status_async(store, name, |status| {
        if let Some(rec) = status.jobs.iter().find(|j| j.id == id).cloned() {
            status.jobs.retain(|j| j.id != id);
            if rec.kind == BlockJobKind::Copy {
                status.domain.set_disk_mirror(&rec.disk, None)?;
            }
        }
        Ok(())
    })
    .await?;
    Ok(())
}

/// Runs a job-starting command (its arguments without the `job-id`) after
/// recording the job; forgets the record if QEMU refuses.
async fn start_recorded(
    store: &Store,
    name: &str,
    client: &QmpClient,
    rec: JobRecord,
    mirror: Option<Element>,
    command: &str,
    mut args: Value,
) -> Result<()> {
    let id = record_job(store, name, rec, mirror).await?;
    strata_core::pause_point("job:starting");
    strata_core::crash_point("job:starting");
    args["job-id"] = Value::String(id.clone());
    if let Err(e) = client.execute(command, Some(args)).await {
        drop_record(store, name, &id).await?;
        return Err(qmp_error(name, e));
    }
    strata_core::crash_point("job:started");
    live::edit_status_async(store, name, |status| {
        if let Some(r) = status.jobs.iter_mut().find(|j| j.id == id) {
            r.starting = false;
        }
        Ok(())
    })
    .await?;
    Ok(())
}

/// The backing string for the image above layer `base` of `live`'s chain
/// (reading an image header, so off the runtime).
async fn backing_string(live: &LiveDisk, base: usize, keep_relative: bool) -> Result<Option<String>> {
    let chain = live.chain.clone();
    blocking(move || layers::backing_string(&chain, base, keep_relative)).await
}

pub async fn pull(store: &Store, name: &str, client: &QmpClient, disk: &str, opts: &BlockPullOptions) -> Result<()> {
    opts.validate()?;
    check_idle(store, name, disk)?;
    let live = live_disk(client, name, disk).await?;
    let layers = layers::pull_layers(disk, &live.chain, opts)?;
    let mut args = json!({
        "device": live.nodes[layers.into],
        "auto-finalize": false,
        "auto-dismiss": false,
    });
    if let Some(b) = layers.base {
        args["base-node"] = Value::String(live.nodes[b].clone());
        if let Some(s) = backing_string(&live, b, opts.keep_relative).await? {
            args["backing-file"] = Value::String(s);
        }
    }
    if let Some(bw) = opts.bandwidth_bytes {
        args["speed"] = json!(bw);
    }
    let rec = JobRecord::new(BlockJobKind::Pull, disk, Vec::new());
    start_recorded(store, name, client, rec, None, "block-stream", args).await
}

pub async fn commit(
    store: &Store,
    name: &str,
    client: &QmpClient,
    disk: &str,
    opts: &BlockCommitOptions,
) -> Result<BlockJobKind> {
    opts.validate()?;
    check_idle(store, name, disk)?;
    let live = live_disk(client, name, disk).await?;
    let chain = &live.chain;
    let layers = layers::commit_layers(disk, chain, opts)?;
    let (top, base, kind) = (layers.top, layers.base, layers.kind);
    let active = kind == BlockJobKind::ActiveCommit;
    let mut args = json!({
        "device": live.nodes[0],
        "base-node": live.nodes[base],
        "auto-finalize": false,
        "auto-dismiss": false,
    });
    if !active {
        args["top-node"] = Value::String(live.nodes[top].clone());
        if let Some(s) = backing_string(&live, base, opts.keep_relative).await? {
            args["backing-file"] = Value::String(s);
        }
    }
    if let Some(bw) = opts.bandwidth_bytes {
        args["speed"] = json!(bw);
    }
    if !opts.allow_snapshot_change {
        refusals::refuse_changing_snapshots(store, name, chain, top, base, active)?;
    }
    let delete: Vec<PathBuf> = if opts.delete { layers.removed_files(chain) } else { Vec::new() };
    refusals::refuse_deleting_snapshot_images(store, name, &delete)?;
    let rec = JobRecord::new(kind, disk, delete);
    start_recorded(store, name, client, rec, None, "block-commit", args).await?;
    Ok(kind)
}

/// Runs a `blockdev-create` job to its end and dismisses it.
pub(crate) async fn create_blockdev(client: &QmpClient, name: &str, job: &str, options: Value) -> Result<()> {
    let mut rx = client.subscribe_events();
    client
        .execute("blockdev-create", Some(json!({"job-id": job, "options": options})))
        .await
        .map_err(|e| qmp_error(name, e))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = client.query_jobs().await.map_err(|e| qmp_error(name, e))?;
        match jobs.iter().find(|j| j.id == job) {
            Some(j) if j.status == JobStatus::Concluded => {
                let error = j.error.clone();
                client.execute("job-dismiss", Some(json!({"id": job}))).await.map_err(|e| qmp_error(name, e))?;
                return match error {
                    Some(e) => Err(Error::operation_failed(format!("cannot create the image: {e}"))),
                    None => Ok(()),
                };
            }
            None => return Err(Error::internal(format!("creation job '{job}' vanished"))),
            _ => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::new(ErrorKind::OperationTimeout, "creating the image took over 60 s"));
        }
        let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), rx.recv()).await;
    }
}

fn unused_node_name(graph: &BlockGraph, base: &str) -> String {
    let taken: std::collections::HashSet<&str> = graph.node_names().collect();
    (1..).map(|n| format!("{base}{n}")).find(|c| !taken.contains(c.as_str())).unwrap_or_else(|| base.to_string())
}

pub async fn copy(
    store: &Store,
    name: &str,
    client: &QmpClient,
    disk: &str,
    opts: &BlockCopyOptions,
) -> Result<Vec<String>> {
    let warnings = opts.validate()?;
    check_idle(store, name, disk)?;
    let live = live_disk(client, name, disk).await?;
    let top = live.chain.top().ok_or_else(|| Error::internal("empty chain"))?;
    let source_format = top.format.clone().unwrap_or_else(|| "raw".into());
    let source_backing = live.chain.backing_of(0).first().copied();
    opts.validate_for_source(disk, &source_format, source_backing.is_some())?;
    let dest = PathBuf::from(&opts.dest);
    let refusals::CopyDestination { is_block, .. } =
        refusals::check_copy_destination(store, name, disk, &dest, opts.reuse_external, &live.chain)?;
    // The destination format: as asked, else probed from a reused file
    // (a raw destination is never probed: --raw fixes it), else the source's.
    let format = match (opts.requested_format(), opts.reuse_external && !is_block) {
        (Some(f), _) => f.to_string(),
        (None, true) => {
            let probed = dest.clone();
            blocking(move || image::detect_format(&probed)).await?.as_str().to_string()
        }
        (None, false) => source_format.clone(),
    };
    let _nodes = strata_engine::blocking::lock_domain_for(store, name, UNATTACHED_NODES).await?;
    let graph = BlockGraph::query(client, name).await?;
    let fmt_node = unused_node_name(&graph, &format!("{disk}-copy-fmt"));
    let file_node = unused_node_name(&graph, &format!("{disk}-copy-file"));
    let dest_str = dest.to_str().ok_or_else(|| Error::invalid_arg("destination path is not UTF-8"))?;
    let protocol = if is_block { "host_device" } else { "file" };
    let shallow_backing = if opts.shallow { source_backing } else { None };
    if !opts.reuse_external && !is_block {
        // By node, not device: a storage daemon has no devices.
        let size = client
            .query_named_block_nodes()
            .await
            .map_err(|e| qmp_error(name, e))?
            .into_iter()
            .find(|n| Some(n.node_name.as_str()) == live.root())
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
            if let Some(b) = shallow_backing {
                if let Some(p) = live.chain.layers[b].source.local_path() {
                    options["backing-file"] = Value::String(p.to_string_lossy().into_owned());
                    options["backing-fmt"] =
                        Value::String(live.chain.layers[b].format.clone().unwrap_or_else(|| "raw".into()));
                }
            }
            create_blockdev(client, name, &format!("{fmt_node}-create"), options).await?;
        }
    } else {
        client
            .execute("blockdev-add", Some(json!({"driver": protocol, "node-name": file_node, "filename": dest_str})))
            .await
            .map_err(|e| qmp_error(name, e))?;
    }
    let mut target = json!({"driver": format, "node-name": fmt_node, "file": file_node});
    if format != "raw" {
        // Quirk 4: a shallow copy's target must be given the source's backing
        // node, or the guest misses data after the pivot.
        target["backing"] = match shallow_backing {
            Some(b) => Value::String(live.nodes[b].clone()),
            None => Value::Null,
        };
    }
    if let Err(e) = client.execute("blockdev-add", Some(target)).await {
        let _ = client.execute("blockdev-del", Some(json!({"node-name": file_node}))).await;
        return Err(qmp_error(name, e));
    }
    strata_core::pause_point("blockcopy:nodes-added");
    let mut args = json!({
        "device": live.nodes[0],
        "target": fmt_node,
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
    let mirror = Element::new("mirror")
        .with_attr("type", if is_block { "block" } else { "file" })
        .with_attr("job", "copy")
        .with_child(Element::new("format").with_attr("type", format.clone()))
        .with_child(strata_core::xml::source_element(&StorageSource::local(dest.clone())));
    let rec = JobRecord::new(BlockJobKind::Copy, disk, Vec::new());
    if let Err(e) = start_recorded(store, name, client, rec, Some(mirror), "blockdev-mirror", args).await {
        for n in [&fmt_node, &file_node] {
            let _ = client.execute("blockdev-del", Some(json!({"node-name": n}))).await;
        }
        return Err(e);
    }
    Ok(warnings)
}

fn find_job<'a>(jobs: &'a [JobInfo], id: &str) -> Option<&'a JobInfo> {
    jobs.iter().find(|j| j.id == id)
}

/// Job `id` as QEMU reports it in `jobs`, in the engine's terms.
fn observed(jobs: &[JobInfo], id: &str) -> Option<ObservedJob> {
    find_job(jobs, id).map(|j| ObservedJob {
        phase: match j.status {
            JobStatus::Ready => JobPhase::Ready,
            JobStatus::Pending => JobPhase::Pending,
            JobStatus::Concluded => JobPhase::Concluded,
            _ => JobPhase::Running,
        },
        error: j.error.clone(),
        done: j.current_progress,
        total: j.total_progress,
    })
}

/// Brings every recorded job forward: finalizes pending ones, records
/// concluded ones. Returns the (possibly updated) status; `None` once a
/// storage daemon whose last job ended has quit.
pub async fn reconcile_jobs(
    store: &Store,
    name: &str,
    client: &QmpClient,
    status: LiveStatus,
) -> Result<Option<LiveStatus>> {
    if status.jobs.is_empty() {
        return Ok(Some(status));
    }
    let jobs = client.query_jobs().await.map_err(|e| qmp_error(name, e))?;
    let mut changed = false;
    for rec in &status.jobs {
        match reconcile::next_step(rec, observed(&jobs, &rec.id).as_ref()) {
            Step::Finalize => {
                strata_core::pause_point("job:seen-ended");
                // A pending mirror or active commit holds the guest's I/O.
                finalize(client, name, &rec.id).await?;
                wait_status(client, name, &rec.id, &[JobStatus::Concluded, JobStatus::Null], Duration::from_secs(30))
                    .await?;
                conclude(store, name, client, rec).await?;
                changed = true;
            }
            Step::Conclude => {
                strata_core::pause_point("job:seen-ended");
                conclude(store, name, client, rec).await?;
                changed = true;
            }
            Step::MarkReady => {
                mark_ready(store, name, &rec.id).await?;
                changed = true;
            }
            Step::Leave => {}
        }
    }
    if !changed {
        return Ok(Some(status));
    }
    live::reconcile(store, name)
}

/// Quits a storage daemon that has no job (one started for a job whose
/// request was then refused).
pub async fn quit_if_idle_daemon(store: &Store, name: &str, client: &QmpClient) -> Result<()> {
    if let Some(status) = live::reconcile(store, name)? {
        if !status.is_vm() && status.jobs.is_empty() {
            quit_daemon(store, name, client, &status).await?;
        }
    }
    Ok(())
}

/// Ends a storage daemon and removes its status. The offline job server
/// stays in this driver until a second driver needs one (the LXC driver's
/// issue moves it).
async fn quit_daemon(store: &Store, name: &str, client: &QmpClient, status: &LiveStatus) -> Result<()> {
    let _lock = strata_engine::blocking::lock_domain(store, name).await?;
    let _ = client.execute("quit", None).await;
    status.process.terminate(Duration::from_secs(3)).await?;
    live::cleanup(store, name)
}

async fn mark_ready(store: &Store, name: &str, id: &str) -> Result<()> {
    live::edit_status_async(store, name, |status| {
        let Some(rec) = status.jobs.iter_mut().find(|j| j.id == id) else { return Ok(()) };
        rec.ready = true;
        if rec.kind == BlockJobKind::Copy {
            let disk = rec.disk.clone();
            status.domain.set_mirror_ready(&disk)?;
        }
        Ok(())
    })
    .await?;
    Ok(())
}

pub(crate) async fn wait_status(
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

/// Records a concluded (or vanished) job: the chain QEMU now has goes into
/// the live and persistent definitions, `--delete` files go, dead nodes
/// are removed, the job is dismissed and its outcome kept.
async fn conclude(store: &Store, name: &str, client: &QmpClient, rec: &JobRecord) -> Result<()> {
    let end = {
        // Held throughout, so only one process records the job.
        let _lock = strata_engine::blocking::lock_domain(store, name).await?;
        let Some(status) = live::reconcile(store, name)? else { return Ok(()) };
        let Some(fresh) = status.jobs.iter().find(|j| j.id == rec.id).cloned() else {
            return Ok(()); // another process recorded it first
        };
        let jobs = client.query_jobs().await.map_err(|e| qmp_error(name, e))?;
        let job = observed(&jobs, &rec.id);
        if reconcile::awaits_start(&fresh, job.as_ref()) {
            return Ok(()); // its starter has not sent the command yet
        }
        // The record as it is now: the caller's copy may predate a pivot.
        let end = reconcile::end_of(job.as_ref(), fresh.pivoting || rec.pivoting, rec.kind);
        // Dismiss before reading the graph: on QEMU 7.2 (seen with
        // qemu-storage-daemon), query-named-block-nodes between a stream's
        // finalize and its dismiss crashes the process.
        if job.is_some() {
            client.execute("job-dismiss", Some(json!({"id": rec.id}))).await.map_err(|e| qmp_error(name, e))?;
        }
        let live_disk = live_disk(client, name, &rec.disk).await?;
        live::edit_locked_status(store, name, |status| {
            let disk_before = status.domain.find_disk(&rec.disk)?;
            // A volume disk still on its volume keeps naming it.
            let chain =
                define::live_chain_as_recorded(&disk_before, &live_disk.chain, &PoolManager::new(store.clone()));
            conclude::record_in_live(&mut status.domain, &mut status.jobs, rec, &chain)?;
            if let Some(root) = live_disk.root() {
                status.roots.insert(rec.disk.clone(), root.to_string());
            }
            if !status.is_vm() {
                // Answerable for a daemon left without a job: it quits it below.
                status.owner = Some(ProcessId::this()?);
            }
            conclude::record_in_store(store, name, rec, &end, disk_before.source(), &chain)
        })?;
        end
    };
    strata_core::pause_point("job:recorded");
    strata_core::crash_point("job:recorded");
    remove_dead_nodes(store, client, name, &rec.disk).await?;
    if rec.kind == BlockJobKind::ActiveCommit && end != BlockJobEnd::Completed {
        reopen_backing_read_only(client, name, &rec.disk).await?;
    }
    conclude::delete_committed(rec, &end);
    if let Some(status) = live::reconcile(store, name)? {
        if !status.is_vm() && status.jobs.is_empty() {
            quit_daemon(store, name, client, &status).await?;
        }
    }
    Ok(())
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
pub(crate) async fn reopen_node(client: &QmpClient, name: &str, node: &str, read_only: bool) -> Result<()> {
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

/// Takes the [`UNATTACHED_NODES`] lock.
pub(crate) fn lock_unattached_nodes(store: &Store, name: &str) -> Result<DomainLock> {
    store.lock_domain_for(name, UNATTACHED_NODES)
}

/// Removes the disk's nodes nothing uses any more (left by a finished job;
/// QEMU keeps monitor-added nodes until told), format nodes before their
/// files. Only this disk's nodes: another disk's job may be adding some.
async fn remove_dead_nodes(store: &Store, client: &QmpClient, name: &str, disk: &str) -> Result<()> {
    let _nodes = strata_engine::blocking::lock_domain_for(store, name, UNATTACHED_NODES).await?;
    let prefix = format!("{disk}-");
    for _ in 0..64 {
        let graph = BlockGraph::query(client, name).await?;
        let dead: Vec<String> =
            graph.node_names().filter(|n| n.starts_with(&prefix) && !graph.has_parent(n)).map(str::to_string).collect();
        if dead.is_empty() {
            return Ok(());
        }
        for node in dead {
            if let Err(e) = client.execute("blockdev-del", Some(json!({"node-name": node}))).await {
                tracing::debug!(node, error = %e, "node not removed");
            }
        }
    }
    Ok(())
}

async fn speed_of(client: &QmpClient, name: &str, id: &str) -> Result<u64> {
    let jobs = client.query_block_jobs().await.map_err(|e| qmp_error(name, e))?;
    Ok(jobs.iter().find(|j| j.device == id).map(|j| j.speed).unwrap_or(0))
}

pub async fn info(name: &str, client: &QmpClient, status: &LiveStatus, disk: &str) -> Result<Option<BlockJobInfo>> {
    status.domain.find_disk(disk).map_err(|_| Error::invalid_arg(format!("disk '{disk}' not found in domain")))?;
    let Some(rec) = status.jobs.iter().find(|j| j.disk == disk) else { return Ok(None) };
    let jobs = client.query_jobs().await.map_err(|e| qmp_error(name, e))?;
    let Some(job) = observed(&jobs, &rec.id) else { return Ok(None) };
    let speed = speed_of(client, name, &rec.id).await?;
    Ok(Some(reconcile::info_of(rec, &job, speed)))
}

pub async fn set_speed(name: &str, client: &QmpClient, status: &LiveStatus, disk: &str, speed: u64) -> Result<()> {
    let rec = status.jobs.iter().find(|j| j.disk == disk).ok_or_else(|| no_job(disk))?;
    client
        .execute("block-job-set-speed", Some(json!({"device": rec.id, "speed": speed})))
        .await
        .map_err(|e| qmp_error(name, e))?;
    Ok(())
}

/// Ends a job: `pivot` switches to the copy or commit base (job-complete);
/// otherwise a copy or active commit in its synchronised phase finishes
/// consistently without switching (block-job-cancel), and anything else is
/// cancelled (job-cancel).
pub async fn abort(
    store: &Store,
    name: &str,
    client: &QmpClient,
    status: &LiveStatus,
    disk: &str,
    pivot: bool,
    wait: bool,
) -> Result<BlockJobEnd> {
    let rec = status.jobs.iter().find(|j| j.disk == disk).cloned().ok_or_else(|| no_job(disk))?;
    let jobs = client.query_jobs().await.map_err(|e| qmp_error(name, e))?;
    let job = observed(&jobs, &rec.id).ok_or_else(|| no_job(disk))?;
    let ready = job.phase == JobPhase::Ready;
    if pivot {
        if !rec.kind.has_ready_phase() || !ready {
            return Err(Error::new(
                ErrorKind::BlockCopyActive,
                format!("block job '{}' not ready for pivot yet", rec.id),
            ));
        }
        set_pivoting(store, name, &rec.id).await?;
        client.execute("job-complete", Some(json!({"id": rec.id}))).await.map_err(|e| qmp_error(name, e))?;
    } else if ready {
        client
            .execute("block-job-cancel", Some(json!({"device": rec.id, "force": false})))
            .await
            .map_err(|e| qmp_error(name, e))?;
    } else {
        client.execute("job-cancel", Some(json!({"id": rec.id}))).await.map_err(|e| qmp_error(name, e))?;
    }
    if !wait {
        return Ok(if pivot { BlockJobEnd::Completed } else { BlockJobEnd::Cancelled });
    }
    // Finalize the moment the job is pending: a pending mirror holds I/O.
    let reached = wait_status(
        client,
        name,
        &rec.id,
        &[JobStatus::Pending, JobStatus::Concluded, JobStatus::Null],
        Duration::from_secs(300),
    )
    .await?;
    if reached == JobStatus::Pending {
        finalize(client, name, &rec.id).await?;
        wait_status(client, name, &rec.id, &[JobStatus::Concluded, JobStatus::Null], Duration::from_secs(60)).await?;
    }
    let mut rec = rec;
    rec.pivoting = pivot;
    conclude(store, name, client, &rec).await?;
    Ok(record::last_outcome(store, name, disk)?.map(|o| o.end).unwrap_or(BlockJobEnd::Completed))
}

async fn set_pivoting(store: &Store, name: &str, id: &str) -> Result<()> {
    live::edit_status_async(store, name, |status| {
        if let Some(rec) = status.jobs.iter_mut().find(|j| j.id == id) {
            rec.pivoting = true;
        }
        Ok(())
    })
    .await?;
    Ok(())
}

/// Waits up to `timeout` for the job on `disk` to change state; finalizes
/// and records it when it ends. Driven by QEMU's events: a job's end is
/// seen the moment QEMU reports it.
pub async fn wait(
    store: &Store,
    name: &str,
    client: &QmpClient,
    disk: &str,
    timeout: Duration,
) -> Result<BlockJobState> {
    let mut rx = client.subscribe_events();
    let deadline = Instant::now() + timeout;
    loop {
        // Subscribed before looking, so no event between the two is lost.
        let status = match live::reconcile(store, name)? {
            Some(s) => reconcile_jobs(store, name, client, s).await?,
            None => None,
        };
        let Some(rec) = status.as_ref().and_then(|s| s.jobs.iter().find(|j| j.disk == disk).cloned()) else {
            return record::ended(store, name, disk);
        };
        let jobs = client.query_jobs().await.map_err(|e| qmp_error(name, e))?;
        let Some(job) = observed(&jobs, &rec.id) else {
            // Recorded, not yet started in QEMU: its starter sends the
            // command next, or drops the record if QEMU refuses (which no
            // event announces), so the wait wakes on the job's first event
            // or looks again shortly.
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(BlockJobState::Running(reconcile::info_starting(&rec)));
            }
            job_status_changed(&mut rx, &rec.id, left.min(STARTING_RECHECK)).await;
            continue;
        };
        if matches!(job.phase, JobPhase::Pending | JobPhase::Concluded) {
            continue; // reconcile_jobs records it on the next turn
        }
        let speed = speed_of(client, name, &rec.id).await?;
        let info = reconcile::info_of(&rec, &job, speed);
        if job.phase == JobPhase::Ready {
            if !rec.ready {
                mark_ready(store, name, &rec.id).await?;
            }
            return Ok(BlockJobState::Ready(info));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(BlockJobState::Running(info));
        }
        if !job_status_changed(&mut rx, &rec.id, left).await {
            return Ok(BlockJobState::Running(info));
        }
    }
}

/// How often a wait looks again at a job that is recorded but not yet
/// started in QEMU.
const STARTING_RECHECK: Duration = Duration::from_millis(200);
