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

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use strata_core::chain::{Chain, StorageSource};
use strata_core::define;
use strata_core::driver::{BlockJobEnd, BlockJobInfo, BlockJobKind, BlockJobState};
use strata_core::image::{self, ImageFormat};
use strata_core::options::{BlockCommitOptions, BlockCopyOptions, BlockPullOptions};
use strata_core::pool::PoolManager;
use strata_core::store::{DomainLock, Store};
use strata_core::xml::Element;
use strata_core::{Error, ErrorKind, Result};
use strata_qmp::types::{JobInfo, JobStatus};
use strata_qmp::{KnownEvent, QmpClient, QmpEvent};
use tokio::sync::broadcast;

use crate::live::{self, qmp_error, BlockGraph, LiveDisk, LiveStatus};
use strata_engine::process::{Liveness, ProcessId};

/// A block job as recorded in the status XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub id: String,
    pub kind: BlockJobKind,
    pub disk: String,
    /// Files to delete once the job has completed (`blockcommit --delete`).
    pub delete: Vec<PathBuf>,
    /// Set once the job reached its synchronised phase.
    pub ready: bool,
    /// Set when `job-complete` (pivot) was sent.
    pub pivoting: bool,
    /// Recorded but not yet confirmed started by QEMU: another process
    /// seeing no such job in QEMU must wait, not call it vanished, while
    /// the `starter` lives.
    pub starting: bool,
    /// The `strata` process that wrote the record and starts the job.
    pub starter: Option<ProcessId>,
}

impl JobRecord {
    pub fn to_element(&self) -> Element {
        let mut el = Element::new("job")
            .with_attr("id", self.id.clone())
            .with_attr("kind", self.kind.as_str())
            .with_attr("disk", self.disk.clone())
            .with_attr("ready", if self.ready { "yes" } else { "no" })
            .with_attr("pivoting", if self.pivoting { "yes" } else { "no" })
            .with_attr("starting", if self.starting { "yes" } else { "no" });
        if let Some(starter) = self.starter {
            starter.set_attrs(&mut el, "starter");
        }
        for p in &self.delete {
            el = el.with_child(Element::new("delete").with_attr("file", p.to_string_lossy()));
        }
        el
    }

    pub fn from_element(el: &Element) -> Result<JobRecord> {
        let need =
            |a: &str| el.attr(a).map(str::to_string).ok_or_else(|| Error::internal(format!("job record lacks '{a}'")));
        let kind = need("kind")?;
        Ok(JobRecord {
            id: need("id")?,
            kind: BlockJobKind::parse(&kind)
                .ok_or_else(|| Error::internal(format!("job record has unknown kind '{kind}'")))?,
            disk: need("disk")?,
            delete: el.children_named("delete").filter_map(|d| d.attr("file").map(PathBuf::from)).collect(),
            ready: el.attr("ready") == Some("yes"),
            pivoting: el.attr("pivoting") == Some("yes"),
            starting: el.attr("starting") == Some("yes"),
            starter: ProcessId::from_attrs(el, "starter"),
        })
    }
}

/// How the last job on a disk ended, kept so a waiter that was not the one
/// to record the end can still report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    pub disk: String,
    pub kind: BlockJobKind,
    pub end: BlockJobEnd,
}

impl JobOutcome {
    pub fn to_element(&self) -> Element {
        let (word, error) = match &self.end {
            BlockJobEnd::Completed => ("completed", None),
            BlockJobEnd::Finished => ("finished", None),
            BlockJobEnd::Cancelled => ("cancelled", None),
            BlockJobEnd::Failed(e) => ("failed", Some(e.clone())),
        };
        let mut el = Element::new("outcome")
            .with_attr("disk", self.disk.clone())
            .with_attr("kind", self.kind.as_str())
            .with_attr("end", word);
        if let Some(e) = error {
            el.set_attr("error", e);
        }
        el
    }

    pub fn from_element(el: &Element) -> Option<JobOutcome> {
        let end = match el.attr("end")? {
            "completed" => BlockJobEnd::Completed,
            "finished" => BlockJobEnd::Finished,
            "cancelled" => BlockJobEnd::Cancelled,
            _ => BlockJobEnd::Failed(el.attr("error").unwrap_or("failed").to_string()),
        };
        Some(JobOutcome { disk: el.attr("disk")?.to_string(), kind: BlockJobKind::parse(el.attr("kind")?)?, end })
    }
}

/// Outcomes live beside the status XML, so they outlive the process that
/// ran the job (a storage daemon quits when its last job is recorded).
const OUTCOMES_FILE: &str = "job-outcomes.xml";

fn read_outcomes(store: &Store, name: &str) -> Result<Vec<JobOutcome>> {
    let Some(xml) = store.read_domain_file(name, OUTCOMES_FILE)? else { return Ok(Vec::new()) };
    let root = Element::parse(&xml)?;
    Ok(root.children_named("outcome").filter_map(JobOutcome::from_element).collect())
}

/// Replaces the disk's outcome (`None` clears it). The caller holds the lock.
fn set_outcome(store: &Store, name: &str, disk: &str, outcome: Option<JobOutcome>) -> Result<()> {
    let mut all = read_outcomes(store, name)?;
    all.retain(|o| o.disk != disk);
    all.extend(outcome);
    let mut root = Element::new("outcomes");
    for o in &all {
        root = root.with_child(o.to_element());
    }
    store.write_domain_file(name, OUTCOMES_FILE, &root.to_xml())
}

impl JobRecord {
    fn new(kind: BlockJobKind, disk: &str, delete: Vec<PathBuf>) -> JobRecord {
        JobRecord {
            id: String::new(), // given by record_job
            kind,
            disk: disk.to_string(),
            delete,
            ready: false,
            pivoting: false,
            starting: true,
            starter: None, // given by record_job
        }
    }

    /// A record whose starter died before it knew that QEMU had the job.
    fn start_abandoned(&self) -> bool {
        self.starting && self.starter.is_none_or(|s| s.liveness() == Liveness::Gone)
    }
}

/// Refuses early (before any file is made) when the disk already has a job.
fn check_idle(store: &Store, name: &str, disk: &str) -> Result<()> {
    match live::reconcile(store, name)? {
        Some(status) => ensure_idle(&status, disk),
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

/// A job id never used before in this QEMU: a process that read an older
/// record must not take a later job on the same disk for the one it read.
fn job_id(kind: BlockJobKind, disk: &str, number: u64) -> String {
    format!("strata-{}-{disk}-{number}", kind.as_str())
}

/// The kind and disk of a job [`job_id`] named; None for another id.
pub fn job_of_id(id: &str) -> Option<(BlockJobKind, &str)> {
    let rest = id.strip_prefix("strata-")?;
    let kind = [BlockJobKind::ActiveCommit, BlockJobKind::Pull, BlockJobKind::Commit, BlockJobKind::Copy]
        .into_iter()
        .find(|k| rest.starts_with(&format!("{}-", k.as_str())))?;
    let (disk, number) = rest[kind.as_str().len() + 1..].rsplit_once('-')?;
    number.parse::<u64>().ok()?;
    Some((kind, disk))
}

/// Refuses a second job on a disk.
fn ensure_idle(status: &LiveStatus, disk: &str) -> Result<()> {
    if status.jobs.iter().any(|j| j.disk == disk) {
        return Err(Error::new(ErrorKind::BlockCopyActive, format!("disk '{disk}' already in active block job")));
    }
    Ok(())
}

/// Resolves `--base`/`--top`: `disk[N]` (layer N) or a path in the chain.
pub fn resolve_layer(disk: &str, chain: &Chain, spec: &str) -> Result<usize> {
    if let Some(rest) = spec.strip_suffix(']') {
        if let Some((name, n)) = rest.split_once('[') {
            if name != disk {
                return Err(Error::invalid_arg(format!("requested target '{name}' does not match target '{disk}'")));
            }
            let n: usize =
                n.parse().map_err(|_| Error::invalid_arg(format!("'{spec}' is not DISK[N] with a number N")))?;
            return chain.layers.iter().position(|l| l.index == n).ok_or_else(|| {
                Error::invalid_arg(format!(
                    "could not find backing store index '{n}' in chain for '{disk}' (it has layers 0 to {})",
                    chain.layers.len().saturating_sub(1)
                ))
            });
        }
    }
    let top_dir = chain
        .top()
        .and_then(|l| l.source.local_path())
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let wanted = strata_core::chain::clean_path(&top_dir.join(spec));
    chain
        .layers
        .iter()
        .position(|l| l.source.local_path() == Some(wanted.as_path()))
        .ok_or_else(|| Error::invalid_arg(format!("could not find image '{spec}' in chain for '{disk}'")))
}

/// Whether layer `lower` is somewhere below layer `upper` on its line.
fn below(chain: &Chain, upper: usize, lower: usize) -> bool {
    let mut cursor = chain.backing_of(upper).first().copied();
    let mut steps = 0;
    while let Some(c) = cursor {
        if c == lower {
            return true;
        }
        steps += 1;
        if steps > chain.layers.len() {
            return false;
        }
        cursor = chain.backing_of(c).first().copied();
    }
    false
}

/// The backing string to write into the image above `base`: its absolute
/// path, or with `keep_relative` the name the image above it recorded.
fn backing_string(chain: &Chain, base: usize, keep_relative: bool) -> Result<Option<String>> {
    let Some(base_layer) = chain.layers.get(base) else { return Ok(None) };
    let Some(base_path) = base_layer.source.local_path() else { return Ok(None) };
    if keep_relative {
        let above = chain
            .layers
            .iter()
            .position(|l| matches!(&l.backing, strata_core::chain::Backing::Layers(v) if v.contains(&base)));
        if let Some(above) = above {
            if let Some(p) = chain.layers[above].source.local_path() {
                let fmt: ImageFormat = chain.layers[above].format.as_deref().unwrap_or("raw").parse()?;
                if let Some(written) = image::read_header(p, fmt)?.backing_file {
                    return Ok(Some(written));
                }
            }
        }
    }
    Ok(Some(base_path.to_string_lossy().into_owned()))
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
fn record_job(store: &Store, name: &str, mut rec: JobRecord, mirror: Option<Element>) -> Result<String> {
    let _lock = store.lock_domain(name)?;
    let mut status = live::reconcile(store, name)?.ok_or_else(|| Error::operation_invalid("domain is not running"))?;
    ensure_idle(&status, &rec.disk)?;
    rec.id = job_id(rec.kind, &rec.disk, status.next_node);
    rec.starter = Some(ProcessId::this()?);
    status.next_node = status.next_node.saturating_add(1);
    let id = rec.id.clone();
    if let Some(m) = mirror {
        status.domain.set_disk_mirror(&rec.disk, Some(m))?;
    }
    set_outcome(store, name, &rec.disk, None)?;
    status.jobs.push(rec);
    store.write_status(name, &status.to_xml())?;
    Ok(id)
}

fn drop_record(store: &Store, name: &str, id: &str) -> Result<()> {
    let _lock = store.lock_domain(name)?;
    if let Some(mut status) = live::reconcile(store, name)? {
        if let Some(rec) = status.jobs.iter().find(|j| j.id == id).cloned() {
            status.jobs.retain(|j| j.id != id);
            if rec.kind == BlockJobKind::Copy {
                status.domain.set_disk_mirror(&rec.disk, None)?;
            }
            store.write_status(name, &status.to_xml())?;
        }
    }
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
    let id = record_job(store, name, rec, mirror)?;
    strata_core::pause_point("job:starting");
    strata_core::crash_point("job:starting");
    args["job-id"] = Value::String(id.clone());
    if let Err(e) = client.execute(command, Some(args)).await {
        drop_record(store, name, &id)?;
        return Err(qmp_error(name, e));
    }
    strata_core::crash_point("job:started");
    let _lock = store.lock_domain(name)?;
    if let Some(mut status) = live::reconcile(store, name)? {
        if let Some(r) = status.jobs.iter_mut().find(|j| j.id == id) {
            r.starting = false;
            store.write_status(name, &status.to_xml())?;
        }
    }
    Ok(())
}

pub async fn pull(store: &Store, name: &str, client: &QmpClient, disk: &str, opts: &BlockPullOptions) -> Result<()> {
    opts.validate()?;
    check_idle(store, name, disk)?;
    let live = live_disk(client, name, disk).await?;
    let into = match &opts.top {
        Some(t) => resolve_layer(disk, &live.chain, t)?,
        None => 0,
    };
    let mut args = json!({
        "device": live.nodes[into],
        "auto-finalize": false,
        "auto-dismiss": false,
    });
    if let Some(base) = &opts.base {
        let b = resolve_layer(disk, &live.chain, base)?;
        if !below(&live.chain, into, b) {
            return Err(Error::invalid_arg(format!("could not find base image in chain for '{disk}'")));
        }
        args["base-node"] = Value::String(live.nodes[b].clone());
        if let Some(s) = backing_string(&live.chain, b, opts.keep_relative)? {
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
    let top = match &opts.top {
        Some(t) => resolve_layer(disk, chain, t)?,
        None => 0,
    };
    let below_top = chain.backing_of(top).first().copied();
    let base = match (&opts.base, opts.shallow) {
        (Some(b), _) => resolve_layer(disk, chain, b)?,
        (None, true) => {
            below_top.ok_or_else(|| Error::invalid_arg(format!("could not find base image in chain for '{disk}'")))?
        }
        (None, false) => {
            let line = chain.main_line();
            let last = line.last().map(|l| l.index).unwrap_or(0);
            chain.layers.iter().position(|l| l.index == last).unwrap_or(0)
        }
    };
    if below_top.is_none() {
        return Err(Error::invalid_arg(format!("could not find base image in chain for '{disk}'")));
    }
    // The base must be below the top on the top's own line.
    let mut cursor = below_top;
    let mut removed = vec![top];
    let mut found = false;
    while let Some(c) = cursor {
        if c == base {
            found = true;
            break;
        }
        removed.push(c);
        cursor = chain.backing_of(c).first().copied();
    }
    if !found {
        return Err(Error::invalid_arg(format!(
            "base '{}' is not below top '{}' in the chain of '{disk}'",
            opts.base.as_deref().unwrap_or("?"),
            opts.top.as_deref().unwrap_or(disk)
        )));
    }
    let active = top == 0;
    if active && !opts.active {
        return Err(Error::invalid_arg(format!("commit of '{disk}' active layer requires active flag")));
    }
    let kind = if active { BlockJobKind::ActiveCommit } else { BlockJobKind::Commit };
    let mut args = json!({
        "device": live.nodes[0],
        "base-node": live.nodes[base],
        "auto-finalize": false,
        "auto-dismiss": false,
    });
    if !active {
        args["top-node"] = Value::String(live.nodes[top].clone());
        if let Some(s) = backing_string(chain, base, opts.keep_relative)? {
            args["backing-file"] = Value::String(s);
        }
    }
    if let Some(bw) = opts.bandwidth_bytes {
        args["speed"] = json!(bw);
    }
    if !opts.allow_snapshot_change {
        refuse_changing_snapshots(store, name, chain, top, base, active)?;
    }
    let delete: Vec<PathBuf> = if opts.delete {
        removed.iter().filter_map(|i| chain.layers[*i].source.local_path().map(Path::to_path_buf)).collect()
    } else {
        Vec::new()
    };
    if !delete.is_empty() {
        // A snapshot's saved definition reads its images: deleting one
        // would make the snapshot unusable.
        let snapshot_images = strata_engine::graph::snapshot_images(store, name)?;
        if let Some((path, snap)) = delete.iter().find_map(|p| snapshot_images.get(p).map(|s| (p, s))) {
            return Err(Error::operation_invalid(format!(
                "--delete would remove {}, which snapshot '{snap}' uses; commit without --delete, or delete the snapshot first",
                path.display()
            )));
        }
    }
    let rec = JobRecord::new(kind, disk, delete);
    start_recorded(store, name, client, rec, None, "block-commit", args).await?;
    Ok(kind)
}

/// Refuses a commit into an image a snapshot froze, unless asked. The
/// commit writes into `base` what reads through `top`: a snapshot that
/// reads through `top` too reads the same afterwards, any other one that
/// froze `base` does not. After an active commit the guest writes into
/// `base`, which changes every snapshot that froze it.
fn refuse_changing_snapshots(
    store: &Store,
    name: &str,
    chain: &Chain,
    top: usize,
    base: usize,
    active: bool,
) -> Result<()> {
    let Some(base_image) = chain.layers[base].source.local_path() else { return Ok(()) };
    let top_image = chain.layers[top].source.local_path();
    let changed: Vec<_> = strata_engine::graph::frozen_images(store, name)?
        .into_iter()
        .filter(|(_, images)| active || top_image.is_none_or(|t| !images.contains(t)))
        .collect();
    match strata_engine::graph::frozen_by(&changed, base_image) {
        Some(snapshots) => Err(Error::operation_invalid(format!(
            "cannot commit into {}: {snapshots} froze it (the data saved there would change); commit with --allow-snapshot-change to change it anyway, or delete {snapshots} first",
            base_image.display()
        ))),
        None => Ok(()),
    }
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
    let exists = dest.exists();
    let is_block = std::fs::metadata(&dest).map(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_block_device()
    });
    let is_block = is_block.unwrap_or(false);
    if exists && !opts.reuse_external && !is_block {
        return Err(Error::config_unsupported(format!(
            "external destination file for disk {disk} already exists and is not a block device: {}",
            dest.display()
        )));
    }
    if !exists && opts.reuse_external {
        return Err(Error::operation_failed(format!(
            "missing destination file for disk {disk}: {}: No such file or directory",
            dest.display()
        )));
    }
    if exists {
        // The copy would write into an image the guest or a snapshot reads.
        let mut taken =
            strata_engine::graph::images_read_by(store, name, &strata_engine::definitions::load(store, name)?)?;
        taken.extend(live.chain.layers.iter().filter_map(|l| l.source.local_path().map(Path::to_path_buf)));
        if taken.contains(&dest) {
            return Err(Error::config_unsupported(format!(
                "destination for disk {disk} is an image the domain or one of its snapshots uses: {}",
                dest.display()
            )));
        }
    }
    // The destination format: as asked, else probed from a reused file
    // (a raw destination is never probed: --raw fixes it), else the source's.
    let format = match (opts.requested_format(), opts.reuse_external && !is_block) {
        (Some(f), _) => f.to_string(),
        (None, true) => image::detect_format(&dest)?.as_str().to_string(),
        (None, false) => source_format.clone(),
    };
    let _nodes = lock_unattached_nodes(store, name)?;
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
        match find_job(&jobs, &rec.id).map(|j| j.status) {
            Some(JobStatus::Pending) => {
                strata_core::pause_point("job:seen-ended");
                // A pending mirror or active commit holds the guest's I/O.
                finalize(client, name, &rec.id).await?;
                wait_status(client, name, &rec.id, &[JobStatus::Concluded, JobStatus::Null], Duration::from_secs(30))
                    .await?;
                conclude(store, name, client, rec).await?;
                changed = true;
            }
            None if rec.starting && !rec.start_abandoned() => {}
            Some(JobStatus::Concluded) | None => {
                strata_core::pause_point("job:seen-ended");
                conclude(store, name, client, rec).await?;
                changed = true;
            }
            Some(JobStatus::Ready) if !rec.ready => {
                mark_ready(store, name, &rec.id)?;
                changed = true;
            }
            _ => {}
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

/// Ends a storage daemon and removes its status.
async fn quit_daemon(store: &Store, name: &str, client: &QmpClient, status: &LiveStatus) -> Result<()> {
    let _lock = store.lock_domain(name)?;
    let _ = client.execute("quit", None).await;
    status.process.terminate(Duration::from_secs(3)).await?;
    live::cleanup(store, name)
}

fn mark_ready(store: &Store, name: &str, id: &str) -> Result<()> {
    let _lock = store.lock_domain(name)?;
    let Some(mut status) = live::reconcile(store, name)? else { return Ok(()) };
    let Some(rec) = status.jobs.iter_mut().find(|j| j.id == id) else { return Ok(()) };
    rec.ready = true;
    if rec.kind == BlockJobKind::Copy {
        let disk = rec.disk.clone();
        status.domain.set_mirror_ready(&disk)?;
    }
    store.write_status(name, &status.to_xml())
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
        let _lock = store.lock_domain(name)?;
        let Some(mut status) = live::reconcile(store, name)? else { return Ok(()) };
        let Some(fresh) = status.jobs.iter().find(|j| j.id == rec.id).cloned() else {
            return Ok(()); // another process recorded it first
        };
        let jobs = client.query_jobs().await.map_err(|e| qmp_error(name, e))?;
        let info = find_job(&jobs, &rec.id).cloned();
        if info.is_none() && fresh.starting && !fresh.start_abandoned() {
            return Ok(()); // its starter has not sent the command yet
        }
        let end = match &info {
            None => BlockJobEnd::Failed("the job disappeared from QEMU".into()),
            // The record as it is now: the caller's copy may predate a pivot.
            Some(j) => match (&j.error, fresh.pivoting || rec.pivoting, rec.kind.has_ready_phase()) {
                (Some(e), _, _) if e.contains("canceled") || e.contains("cancelled") => BlockJobEnd::Cancelled,
                (Some(e), _, _) => BlockJobEnd::Failed(e.clone()),
                (None, false, true) => BlockJobEnd::Finished,
                (None, _, _) => BlockJobEnd::Completed,
            },
        };
        // Dismiss before reading the graph: on QEMU 7.2 (seen with
        // qemu-storage-daemon), query-named-block-nodes between a stream's
        // finalize and its dismiss crashes the process.
        if info.is_some() {
            client.execute("job-dismiss", Some(json!({"id": rec.id}))).await.map_err(|e| qmp_error(name, e))?;
        }
        let live_disk = live_disk(client, name, &rec.disk).await?;
        let disk_before = status.domain.find_disk(&rec.disk)?;
        let source_before = disk_before.source().cloned();
        // A volume disk still on its volume keeps naming it.
        let chain = define::live_chain_as_recorded(&disk_before, &live_disk.chain, &PoolManager::new(store.clone()));
        status.domain.set_disk_chain(&rec.disk, &chain)?;
        if let Some(root) = live_disk.root() {
            status.roots.insert(rec.disk.clone(), root.to_string());
        }
        if rec.kind == BlockJobKind::Copy {
            status.domain.set_disk_mirror(&rec.disk, None)?;
        }
        status.jobs.retain(|j| j.id != rec.id);
        if !status.is_vm() {
            // Answerable for a daemon left without a job: it quits it below.
            status.owner = Some(ProcessId::this()?);
        }
        let outcome = JobOutcome { disk: rec.disk.clone(), kind: rec.kind, end: end.clone() };
        set_outcome(store, name, &rec.disk, Some(outcome))?;
        if let Some(xml) = store.read_domain(name)? {
            let mut persistent = strata_core::xml::Domain::parse(&xml)?;
            // As libvirt does: only a persistent disk still on the image the
            // job ran on takes its new chain; one redefined meanwhile to
            // another image keeps it.
            let same_image = persistent.find_disk(&rec.disk).is_ok_and(|d| d.source() == source_before.as_ref());
            if same_image {
                persistent.set_disk_chain(&rec.disk, &chain)?;
                store.write_domain(name, &persistent.to_xml())?;
            }
        }
        store.write_status(name, &status.to_xml())?;
        end
    };
    strata_core::pause_point("job:recorded");
    strata_core::crash_point("job:recorded");
    remove_dead_nodes(store, client, name, &rec.disk).await?;
    if rec.kind == BlockJobKind::ActiveCommit && end != BlockJobEnd::Completed {
        reopen_backing_read_only(client, name, &rec.disk).await?;
    }
    if end == BlockJobEnd::Completed {
        for path in &rec.delete {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "could not delete a committed image");
            }
        }
    }
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
pub(crate) fn lock_unattached_nodes(store: &Store, name: &str) -> Result<DomainLock> {
    store.lock_domain_for(name, "nodes")
}

/// Removes the disk's nodes nothing uses any more (left by a finished job;
/// QEMU keeps monitor-added nodes until told), format nodes before their
/// files. Only this disk's nodes: another disk's job may be adding some.
async fn remove_dead_nodes(store: &Store, client: &QmpClient, name: &str, disk: &str) -> Result<()> {
    let _nodes = lock_unattached_nodes(store, name)?;
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

/// A job whose starter has not sent it to QEMU yet: no progress.
fn info_starting(rec: &JobRecord) -> BlockJobInfo {
    BlockJobInfo { kind: rec.kind, disk: rec.disk.clone(), cur: 0, end: 0, bandwidth_bytes: 0, ready: false }
}

fn info_of(rec: &JobRecord, job: &JobInfo, speed: u64) -> BlockJobInfo {
    BlockJobInfo {
        kind: rec.kind,
        disk: rec.disk.clone(),
        cur: job.current_progress,
        end: job.total_progress,
        bandwidth_bytes: speed,
        ready: rec.ready || job.status == JobStatus::Ready,
    }
}

async fn speed_of(client: &QmpClient, name: &str, id: &str) -> Result<u64> {
    let jobs = client.query_block_jobs().await.map_err(|e| qmp_error(name, e))?;
    Ok(jobs.iter().find(|j| j.device == id).map(|j| j.speed).unwrap_or(0))
}

pub async fn info(name: &str, client: &QmpClient, status: &LiveStatus, disk: &str) -> Result<Option<BlockJobInfo>> {
    status.domain.find_disk(disk).map_err(|_| Error::invalid_arg(format!("disk '{disk}' not found in domain")))?;
    let Some(rec) = status.jobs.iter().find(|j| j.disk == disk) else { return Ok(None) };
    let jobs = client.query_jobs().await.map_err(|e| qmp_error(name, e))?;
    let Some(job) = find_job(&jobs, &rec.id) else { return Ok(None) };
    let speed = speed_of(client, name, &rec.id).await?;
    Ok(Some(info_of(rec, job, speed)))
}

fn no_job(disk: &str) -> Error {
    Error::invalid_arg(format!("disk {disk} does not have an active block job"))
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
    let job = find_job(&jobs, &rec.id).ok_or_else(|| no_job(disk))?;
    let ready = job.status == JobStatus::Ready;
    if pivot {
        if !rec.kind.has_ready_phase() || !ready {
            return Err(Error::new(
                ErrorKind::BlockCopyActive,
                format!("block job '{}' not ready for pivot yet", rec.id),
            ));
        }
        set_pivoting(store, name, &rec.id)?;
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
    Ok(last_outcome(store, name, disk)?.map(|o| o.end).unwrap_or(BlockJobEnd::Completed))
}

fn set_pivoting(store: &Store, name: &str, id: &str) -> Result<()> {
    let _lock = store.lock_domain(name)?;
    let Some(mut status) = live::reconcile(store, name)? else { return Ok(()) };
    if let Some(rec) = status.jobs.iter_mut().find(|j| j.id == id) {
        rec.pivoting = true;
    }
    store.write_status(name, &status.to_xml())
}

/// Keeps, as the outcome of each job the status records, that the process
/// serving the domain exited while it ran (called when that process is
/// found gone), so a waiter can say so.
pub(crate) fn record_server_exit(store: &Store, name: &str, status: &LiveStatus) -> Result<()> {
    let server = if status.is_vm() { "QEMU" } else { "qemu-storage-daemon" };
    for rec in &status.jobs {
        let why = format!(
            "domain '{name}' ({server} pid {}) exited while block job on '{}' was running",
            status.process.pid, rec.disk
        );
        let outcome = JobOutcome { disk: rec.disk.clone(), kind: rec.kind, end: BlockJobEnd::Failed(why) };
        set_outcome(store, name, &rec.disk, Some(outcome))?;
    }
    Ok(())
}

/// The end of the last job on `disk`, when nothing serves the domain now.
pub fn ended(store: &Store, name: &str, disk: &str) -> Result<BlockJobState> {
    match last_outcome(store, name, disk)? {
        Some(o) => Ok(BlockJobState::Ended { kind: o.kind, end: o.end }),
        None => Err(no_job(disk)),
    }
}

fn last_outcome(store: &Store, name: &str, disk: &str) -> Result<Option<JobOutcome>> {
    Ok(read_outcomes(store, name)?.into_iter().find(|o| o.disk == disk))
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
            return ended(store, name, disk);
        };
        let jobs = client.query_jobs().await.map_err(|e| qmp_error(name, e))?;
        let Some(job) = find_job(&jobs, &rec.id) else {
            // Recorded, not yet started in QEMU: its starter sends the
            // command next, or drops the record if QEMU refuses (which no
            // event announces), so the wait wakes on the job's first event
            // or looks again shortly.
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(BlockJobState::Running(info_starting(&rec)));
            }
            job_status_changed(&mut rx, &rec.id, left.min(STARTING_RECHECK)).await;
            continue;
        };
        if matches!(job.status, JobStatus::Pending | JobStatus::Concluded) {
            continue; // reconcile_jobs records it on the next turn
        }
        let speed = speed_of(client, name, &rec.id).await?;
        let info = info_of(&rec, job, speed);
        if job.status == JobStatus::Ready {
            if !rec.ready {
                mark_ready(store, name, &rec.id)?;
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
