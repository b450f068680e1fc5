//! Snapshots of QEMU domains: records in the store (each with the full
//! domain definition of its moment), internal and external disk snapshots,
//! live and offline, revert (external ones by branching a new overlay off
//! the snapshot's images, so nothing another snapshot depends on is
//! written), and delete (commit into the backing file when nothing else
//! depends on it, otherwise pull into the children).
//!
//! Create, revert and delete write an intent record (`intent.rs`) before
//! touching any image; the next snapshot call on the domain finishes or
//! rolls back an operation a crash interrupted: a creation is finished if
//! its overlays entered a chain and undone otherwise, a revert is finished
//! (redone from the start if its new definition was not yet adopted), and
//! a delete resumes the plans it recorded, each step checking whether it
//! is still to do.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use strata_core::chain::{probe_chain, StorageSource};
use strata_core::driver::{BlockJobEnd, BlockJobKind, BlockJobOps, BlockJobState, Connection, StartFlags};
use strata_core::options::{
    BlockCommitOptions, BlockJobAbortFlags, BlockPullOptions, SnapshotCreateFlags, SnapshotDeleteFlags,
    SnapshotRevertFlags,
};
use strata_core::store::{DomainLock, Store};
use strata_core::xml::{Domain, SnapshotDef, SnapshotDisk, SnapshotMemory};
use strata_core::{Error, ErrorKind, Result};

use crate::live::{self, qmp_error, LiveStatus};
use strata_engine::graph::{frozen_by, frozen_images, images_in_use, images_read_by};
use strata_engine::intent::{DeleteMethod, DeletePlan, Intent};
use strata_engine::records::{all, current, load, save, set_current};

use crate::QemuConnection;

/// What `snapshot-create` asked of each disk, resolved against the domain.
struct DiskPlan {
    target: String,
    mode: String,
    /// The image the disk uses now (the one the snapshot freezes).
    image: PathBuf,
    format: String,
    /// For external: the new overlay.
    overlay: Option<PathBuf>,
}

fn default_overlay(image: &Path, snap: &str) -> PathBuf {
    let stem = image.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    image.with_file_name(format!("{stem}.{snap}"))
}

/// `selected`: the disk set, from the persistent definition (it changes
/// while the domain runs; the live definition keeps the start's copy).
fn plan_disks(
    dom: &Domain,
    def: &SnapshotDef,
    flags: &SnapshotCreateFlags,
    name: &str,
    selected: &HashSet<String>,
) -> Result<Vec<DiskPlan>> {
    let disks = dom.disks()?;
    let mut asked: HashMap<String, &SnapshotDisk> = HashMap::new();
    for d in &def.disks {
        let disk =
            dom.find_disk(&d.name).map_err(|_| Error::config_unsupported(format!("no disk named '{}'", d.name)))?;
        if asked.insert(disk.target.clone(), d).is_some() {
            return Err(Error::config_unsupported("too many disk snapshot requests for domain"));
        }
    }
    let default_mode = if flags.disk_only { "external" } else { "internal" };
    let mut plans = Vec::new();
    for disk in &disks {
        let spec = asked.get(&disk.target);
        let mut mode = spec.and_then(|s| s.snapshot.clone()).unwrap_or_else(|| default_mode.to_string());
        if flags.disk_set && !selected.contains(&disk.target) && spec.is_none() {
            mode = "no".into();
        }
        let Some(image) = disk.source().and_then(|s| s.local_path()).map(Path::to_path_buf) else {
            if let Some(StorageSource::Volume { pool, volume }) = disk.source().filter(|_| mode != "no") {
                return Err(Error::config_unsupported(format!(
                    "disk '{}' is volume '{volume}' of storage pool '{pool}', which snapshots do not support yet; \
                     leave it out with --diskspec {},snapshot=no",
                    disk.target, disk.target
                )));
            }
            if mode != "no" && spec.is_some() {
                return Err(Error::config_unsupported(format!(
                    "disk '{}' has no local image to snapshot",
                    disk.target
                )));
            }
            continue;
        };
        if disk.device != "disk" || disk.readonly {
            if spec.is_some_and(|s| s.snapshot.as_deref().is_some_and(|m| m != "no")) {
                return Err(Error::config_unsupported(format!(
                    "disk '{}' is read-only and cannot be snapshotted",
                    disk.target
                )));
            }
            mode = "no".into();
        }
        if mode != "no" && mode != "manual" {
            disk.refuse_if_transient("snapshots").map_err(|e| {
                Error::config_unsupported(format!(
                    "{}; leave it out with --diskspec {},snapshot=no",
                    e.message(),
                    disk.target
                ))
            })?;
        }
        let format = disk.format.clone().unwrap_or_else(|| "raw".into());
        let overlay = if mode == "external" {
            if let Some(t) = spec.and_then(|s| s.driver_type.as_deref()) {
                if t != "qcow2" {
                    return Err(Error::config_unsupported(format!(
                        "external snapshot format for disk {} is unsupported: {t}",
                        disk.target
                    )));
                }
            }
            let path = spec
                .and_then(|s| s.source.as_ref())
                .and_then(|s| s.local_path())
                .map(Path::to_path_buf)
                .unwrap_or_else(|| default_overlay(&image, name));
            if !path.is_absolute() {
                return Err(Error::invalid_arg(format!(
                    "external snapshot file for disk {} must be an absolute path: {}",
                    disk.target,
                    path.display()
                )));
            }
            Some(path)
        } else {
            None
        };
        if mode == "internal" && format != "qcow2" {
            return Err(Error::config_unsupported(format!(
                "internal snapshot for disk {} unsupported for storage type {format}; \
                 use --diskspec {},snapshot=no or an external snapshot",
                disk.target, disk.target
            )));
        }
        if mode == "manual" {
            mode = "no".into();
        }
        plans.push(DiskPlan { target: disk.target.clone(), mode, image, format, overlay });
    }
    if plans.iter().all(|p| p.mode == "no") {
        return Err(Error::config_unsupported("nothing selected for snapshot"));
    }
    Ok(plans)
}

/// Runs `qemu-img ARGS…` as a helper that holds the operation lock until
/// it has exited (see [`strata_core::tool::run_tool_output`]).
fn run(operation: &DomainLock, args: &[&str]) -> Result<()> {
    run_holding(Some(operation), args)
}

/// Points each of `images` at `onto` without copying data (`qemu-img
/// rebase -u`): for images whose backing's data is now in `onto`. An image
/// already on `onto` is left alone, so a resumed delete can run it again.
fn rebase_unsafe(operation: &DomainLock, images: &[&PathBuf], onto: &Path) -> Result<()> {
    for image in images {
        if backing_of(image)?.as_deref() == Some(onto) {
            continue;
        }
        let format = image_format(onto)?;
        run(operation, &["rebase", "-u", "-b", path_str(onto)?, "-F", &format, "-f", "qcow2", path_str(image)?])?;
    }
    Ok(())
}

/// `qemu-img ARGS…` that dies with this process, holding `operation` if given.
fn run_holding(operation: Option<&DomainLock>, args: &[&str]) -> Result<()> {
    let tool = crate::qemu_img_binary();
    let out = strata_core::tool::run_tool_output(&tool, args, operation.map(AsFd::as_fd))?;
    if !out.status.success() {
        return Err(Error::operation_failed(format!(
            "{tool} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().ok_or_else(|| Error::invalid_arg(format!("path '{}' is not UTF-8", p.display())))
}

/// Whether an interrupted (or running) snapshot operation left its intent.
pub fn intent_pending(store: &Store, domain: &str) -> Result<bool> {
    Ok(Intent::read(store, domain)?.is_some())
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

impl QemuConnection {
    /// Refuses, as libvirt does, while a block job runs on a disk of the
    /// domain: a snapshot would change the chain under the job, and a
    /// revert would end the QEMU that runs it. Jobs that ended meanwhile
    /// are recorded first, so only a running one stands in the way.
    async fn refuse_during_block_job(&self, domain: &str) -> Result<()> {
        if let Some((status, _)) = self.serving(domain).await? {
            if let Some(job) = status.jobs.first() {
                return Err(Error::new(
                    ErrorKind::BlockCopyActive,
                    format!("disk '{}' already in active block job", job.disk),
                ));
            }
        }
        Ok(())
    }

    /// The definition as it is now: live when running, else persistent.
    async fn current_definition(&self, domain: &str) -> Result<(Domain, Option<LiveStatus>)> {
        match live::reconcile(self.store(), domain)? {
            Some(s) if s.is_vm() => Ok((self.live_domain(domain).await?, Some(s))),
            Some(_) => Err(Error::operation_invalid(format!(
                "an offline block job runs on the disks of domain '{domain}'; wait for it to end"
            ))),
            None => Ok((strata_engine::definitions::load(self.store(), domain)?, None)),
        }
    }

    pub(crate) async fn snapshot_create_impl(
        &self,
        domain: &str,
        xml: &str,
        flags: SnapshotCreateFlags,
        operation: &DomainLock,
    ) -> Result<String> {
        flags.validate()?;
        let store = self.store();
        strata_engine::definitions::load(store, domain)?;
        let mut def = SnapshotDef::parse(xml)?;
        if flags.redefine {
            return self.redefine(domain, def, flags.current);
        }
        self.refuse_during_block_job(domain).await?;
        let memory_file = match def.memory.as_ref().filter(|m| m.snapshot == "external") {
            Some(m) => {
                let file = m.file.as_ref().map(PathBuf::from).ok_or_else(|| {
                    Error::invalid_arg("an external memory snapshot needs a file (--memspec file=PATH)")
                })?;
                if !file.is_absolute() {
                    return Err(Error::invalid_arg(format!(
                        "memory file '{}' must be an absolute path",
                        file.display()
                    )));
                }
                if file.exists() {
                    return Err(Error::config_unsupported(format!(
                        "memory state file '{}' already exists",
                        file.display()
                    )));
                }
                if flags.disk_only {
                    return Err(Error::invalid_arg("--disk-only and an external memory file are mutually exclusive"));
                }
                if live::reconcile(store, domain)?.filter(LiveStatus::is_vm).is_none() {
                    return Err(Error::operation_invalid("domain is not running"));
                }
                Some(file)
            }
            None => None,
        };
        let name = def.name.clone().unwrap_or_else(|| now_secs().to_string());
        strata_core::store::validate_name("snapshot", &name)?;
        if store.read_snapshot(domain, &name)?.is_some() {
            return Err(Error::operation_failed(format!("domain moment {name} already exists")));
        }
        if flags.branch {
            let parent = def
                .parent
                .clone()
                .ok_or_else(|| Error::invalid_arg("--branch needs a <parent> in the snapshot XML"))?;
            let was_running = live::reconcile(store, domain)?.filter(LiveStatus::is_vm).is_some();
            self.snapshot_revert_impl(
                domain,
                &parent,
                SnapshotRevertFlags { running: was_running, paused: false, force: true },
                operation,
            )
            .await?;
        }
        // The status records the running chains and root nodes, so no
        // query of QEMU's whole block graph is needed: creation costs the
        // same at any chain depth.
        let (mut dom, view) = match live::reconcile(store, domain)? {
            Some(s) if s.is_vm() => {
                let (status, monitor) = self.running(domain).await?;
                (status.domain.clone(), Some((status, monitor)))
            }
            Some(_) => {
                return Err(Error::operation_invalid(format!(
                    "an offline block job runs on the disks of domain '{domain}'; wait for it to end"
                )))
            }
            None => (strata_engine::definitions::load(store, domain)?, None),
        };
        // The record keeps the definition, not this run's domain id.
        dom.set_id(None);
        let selected: HashSet<String> =
            strata_core::diskset::selected(&strata_engine::definitions::load(store, domain)?)?.into_iter().collect();
        let disk_flags = SnapshotCreateFlags { disk_only: flags.disk_only || memory_file.is_some(), ..flags };
        let plans = plan_disks(&dom, &def, &disk_flags, &name, &selected)?;
        if memory_file.is_some() && plans.iter().any(|p| p.mode == "internal") {
            return Err(Error::config_unsupported(
                "a checkpoint with external memory needs external (or no) disk snapshots",
            ));
        }
        // A reused file must be no image the domain or a snapshot reads:
        // the guest would write into a backing or frozen image.
        let taken = if flags.reuse_external { images_read_by(store, domain, &dom)? } else { HashSet::new() };
        let mut overlays = HashSet::new();
        for p in plans.iter().filter(|p| p.mode == "external") {
            if let Some(o) = &p.overlay {
                if !overlays.insert(o) {
                    return Err(Error::config_unsupported(format!(
                        "external snapshot file {} is given for more than one disk",
                        o.display()
                    )));
                }
                if taken.contains(o) {
                    return Err(Error::config_unsupported(format!(
                        "external snapshot file for disk {} is an image the domain or one of its snapshots uses: {}",
                        p.target,
                        o.display()
                    )));
                }
                let exists = o.exists();
                if exists && !flags.reuse_external {
                    return Err(Error::config_unsupported(format!(
                        "external snapshot file for disk {} already exists and is not a block device: {}",
                        p.target,
                        o.display()
                    )));
                }
                if !exists && flags.reuse_external {
                    return Err(Error::operation_failed(format!(
                        "missing external snapshot file for disk {}: {}",
                        p.target,
                        o.display()
                    )));
                }
            }
        }
        let created: Vec<PathBuf> =
            if flags.reuse_external { Vec::new() } else { plans.iter().filter_map(|p| p.overlay.clone()).collect() };
        // The whole record is settled before any image changes, and kept
        // in the intent, so a crash at any later step can be finished.
        let (running, checkpoint) = match &view {
            Some((_, monitor)) => {
                let run = monitor.client.query_status().await.map_err(|e| qmp_error(domain, e))?;
                let running = live::state_of(run.status).0 == strata_core::driver::DomainState::Running;
                (Some(running), !flags.disk_only && def.memory.as_ref().is_none_or(|m| m.snapshot != "no"))
            }
            None => (None, false),
        };
        let state = match (running, checkpoint) {
            (Some(true), true) => "running",
            (Some(false), true) => "paused",
            (None, _) if !flags.disk_only => "shutoff",
            _ => "disk-snapshot",
        };
        def.name = Some(name.clone());
        def.state = Some(state.to_string());
        def.creation_time = Some(now_secs());
        def.parent = current(store, domain)?;
        if memory_file.is_none() {
            def.memory = Some(SnapshotMemory {
                snapshot: if state == "running" || state == "paused" { "internal" } else { "no" }.into(),
                file: None,
            });
        }
        def.disks = plans
            .iter()
            .map(|p| SnapshotDisk {
                name: p.target.clone(),
                snapshot: Some(p.mode.clone()),
                driver_type: p.overlay.as_ref().map(|_| "qcow2".to_string()),
                source: p.overlay.clone().map(|path| StorageSource::File { path }),
            })
            .collect();
        def.domain = Some(dom.element().clone());
        Intent::Create { files: created.clone(), record: Some(Box::new(def.clone())), no_metadata: flags.no_metadata }
            .write(store, domain)?;
        strata_core::crash_point("snapshot-create:intent");
        let roots = match (&view, &memory_file) {
            (Some((status, monitor)), Some(file)) => Some(
                self.create_with_memory(
                    domain,
                    status,
                    &monitor.client,
                    &plans,
                    &name,
                    file,
                    &created,
                    running == Some(true),
                )
                .await?,
            ),
            (Some((status, monitor)), None) => {
                Some(self.create_live(domain, status, &monitor.client, &plans, &name, checkpoint, &created).await?)
            }
            (None, _) => {
                create_offline(operation, &plans, &name, &created)?;
                None
            }
        };
        strata_core::crash_point("snapshot-create:images");
        self.finish_creation(domain, &def, flags.no_metadata, roots).await?;
        Ok(name)
    }

    /// The steps after the images changed: chains recorded, the record
    /// saved and made current, the intent cleared. Also what recovery runs
    /// for a creation whose images had changed when it was interrupted.
    /// `roots`: the new root node of each disk that got an overlay, when
    /// this process made them (recovery passes `None` and asks QEMU).
    async fn finish_creation(
        &self,
        domain: &str,
        def: &SnapshotDef,
        no_metadata: bool,
        roots: Option<HashMap<String, String>>,
    ) -> Result<()> {
        let store = self.store();
        let targets: Vec<String> =
            def.disks.iter().filter(|d| d.snapshot.as_deref() == Some("external")).map(|d| d.name.clone()).collect();
        let overlays: HashMap<String, PathBuf> = def
            .disks
            .iter()
            .filter_map(|d| Some((d.name.clone(), d.source.as_ref()?.local_path()?.to_path_buf())))
            .collect();
        self.record_chains(domain, &targets, &overlays, roots).await?;
        strata_core::crash_point("snapshot-create:chains");
        if !no_metadata {
            let name = def.name.clone().unwrap_or_default();
            save(store, domain, def)?;
            strata_core::crash_point("snapshot-create:record");
            set_current(store, domain, Some(&name))?;
        }
        Intent::clear(store, domain)
    }

    /// Finishes or undoes the snapshot operation a crash interrupted, as
    /// its intent record says; every snapshot call starts with it.
    pub(crate) async fn recover_interrupted(&self, domain: &str, operation: &DomainLock) -> Result<Vec<String>> {
        let store = self.store();
        let Some(pending) = Intent::read(store, domain)? else { return Ok(Vec::new()) };
        if live::reconcile(store, domain)?.filter(LiveStatus::is_vm).is_some() {
            // A snapshot job the dead process started has ended (or ends
            // now) in QEMU; it is dismissed so its id can be used again.
            let (_, monitor) = self.running(domain).await?;
            dismiss_snapshot_jobs(&monitor.client, domain).await?;
        }
        match pending {
            Intent::Create { files, record, no_metadata } => {
                self.recover_creation(domain, files, record, no_metadata).await
            }
            Intent::Revert { snapshot, running, paused, overlays } => {
                self.recover_revert(domain, &snapshot, running, paused, &overlays, operation).await
            }
            Intent::Delete { snapshots, metadata_only, plans } => {
                let mut notes = self.run_delete(domain, snapshots, metadata_only, plans, true, operation).await?;
                notes.insert(0, "finished a snapshot deletion that was interrupted".into());
                Ok(notes)
            }
        }
    }

    /// A revert is past its point of no return once its intent is written
    /// (the state it leaves is being discarded), so recovery finishes it:
    /// if the definition already runs on the new overlays only the last
    /// steps remain; otherwise the unused overlays are removed and the
    /// revert runs again from the start.
    async fn recover_revert(
        &self,
        domain: &str,
        snap: &str,
        running: bool,
        paused: bool,
        overlays: &[PathBuf],
        operation: &DomainLock,
    ) -> Result<Vec<String>> {
        let store = self.store();
        let Ok(def) = load(store, domain, snap) else {
            Intent::clear(store, domain)?;
            return Ok(vec![format!("dropped an interrupted revert to snapshot '{snap}', which no longer exists")]);
        };
        let in_use = images_in_use(&strata_engine::definitions::load(store, domain)?)?;
        if !overlays.is_empty() && overlays.iter().all(|o| in_use.contains(o)) {
            set_current(store, domain, Some(snap))?;
            Intent::clear(store, domain)?;
            if live::reconcile(store, domain)?.is_none() {
                self.revert_run_state(domain, &def, running, paused).await?;
            }
            return Ok(vec![format!("finished the interrupted revert to snapshot '{snap}'")]);
        }
        for o in overlays.iter().filter(|o| !in_use.contains(*o) && o.exists()) {
            std::fs::remove_file(o).map_err(|e| Error::io("remove", o, e))?;
        }
        self.snapshot_revert_impl(domain, snap, SnapshotRevertFlags { running, paused, force: true }, operation)
            .await?;
        Ok(vec![format!("redid the interrupted revert to snapshot '{snap}'")])
    }

    /// Finishes or undoes a creation a crash interrupted: if any image it
    /// made is in a chain QEMU or the definitions use, the snapshot happened
    /// and is finished; otherwise the images it made are removed.
    async fn recover_creation(
        &self,
        domain: &str,
        files: Vec<PathBuf>,
        record: Option<Box<SnapshotDef>>,
        no_metadata: bool,
    ) -> Result<Vec<String>> {
        let store = self.store();
        let mut in_use: HashSet<PathBuf> = HashSet::new();
        let mut doms = Vec::new();
        if let Some(xml) = store.read_domain(domain)? {
            doms.push(Domain::parse(&xml)?);
        }
        if live::reconcile(store, domain)?.filter(LiveStatus::is_vm).is_some() {
            doms.push(self.live_domain(domain).await?);
        }
        for d in &doms {
            in_use.extend(images_in_use(d)?);
        }
        let mut notes = Vec::new();
        if files.iter().any(|f| in_use.contains(f)) {
            if let Some(def) = record {
                self.finish_creation(domain, &def, no_metadata, None).await?;
                notes.push(format!(
                    "finished snapshot '{}', interrupted after its images changed",
                    def.name.unwrap_or_default()
                ));
                return Ok(notes);
            }
        }
        for p in files.iter().filter(|f| !in_use.contains(*f) && f.exists()) {
            std::fs::remove_file(p).map_err(|e| Error::io("remove", p, e))?;
            notes.push(format!("removed '{}' left by an interrupted snapshot creation", p.display()));
        }
        Intent::clear(store, domain)?;
        Ok(notes)
    }

    /// `--redefine`: a record from dumped XML, checked against the domain.
    fn redefine(&self, domain: &str, def: SnapshotDef, make_current: bool) -> Result<String> {
        let store = self.store();
        let name = def.name.clone().ok_or_else(|| Error::invalid_arg("a redefined snapshot needs a <name>"))?;
        let saved = def
            .domain
            .clone()
            .ok_or_else(|| Error::invalid_arg(format!("snapshot '{name}' lacks the <domain> it was taken of")))?;
        let saved = Domain::from_element(saved)?;
        let dom = strata_engine::definitions::load(store, domain)?;
        if saved.uuid().is_some() && saved.uuid() != dom.uuid() {
            return Err(Error::invalid_arg(format!(
                "snapshot '{name}' was taken of a domain with uuid {}, not {}",
                saved.uuid().unwrap_or_default(),
                dom.uuid().unwrap_or_default()
            )));
        }
        if let Some(parent) = &def.parent {
            if parent == &name || store.read_snapshot(domain, parent)?.is_none() {
                return Err(Error::invalid_arg(format!("parent snapshot '{parent}' of '{name}' does not exist")));
            }
        }
        for d in &def.disks {
            saved.find_disk(&d.name).map_err(|_| {
                Error::invalid_arg(format!("snapshot '{name}' names disk '{}' that its domain does not have", d.name))
            })?;
        }
        save(store, domain, &def)?;
        if make_current {
            set_current(store, domain, Some(&name))?;
        }
        Ok(name)
    }

    /// Takes the snapshot in the running QEMU; returns each disk's new
    /// root node.
    #[allow(clippy::too_many_arguments)]
    async fn create_live(
        &self,
        domain: &str,
        status: &LiveStatus,
        client: &strata_qmp::QmpClient,
        plans: &[DiskPlan],
        name: &str,
        checkpoint: bool,
        created: &[PathBuf],
    ) -> Result<HashMap<String, String>> {
        let root = |t: &str| -> Result<String> {
            status.roots.get(t).cloned().ok_or_else(|| Error::internal(format!("no root node recorded for disk '{t}'")))
        };
        let mut new_roots = HashMap::new();
        if checkpoint {
            // A system checkpoint: VM state and every selected qcow2 disk
            // in one snapshot-save job (disks with snapshot='no' are left out).
            if plans.iter().any(|p| p.mode == "external") {
                return Err(Error::config_unsupported(
                    "a checkpoint with external disk snapshots needs external memory: add --memspec file=PATH, or use --disk-only",
                ));
            }
            let devices: Vec<String> =
                plans.iter().filter(|p| p.mode == "internal").map(|p| root(&p.target)).collect::<Result<_>>()?;
            let vmstate =
                devices.first().cloned().ok_or_else(|| Error::config_unsupported("nothing selected for snapshot"))?;
            run_job(
                client,
                domain,
                "snapshot-save",
                json!({
                    "job-id": "strata-snapshot-save", "tag": name, "vmstate": vmstate, "devices": devices,
                }),
            )
            .await?;
            return Ok(new_roots);
        }
        let externals = plans.iter().filter(|p| p.mode == "external").count() as u64;
        let mut number = if externals > 0 { self.reserve_nodes(domain, externals)? } else { 0 };
        let _nodes = crate::jobs::lock_unattached_nodes(self.store(), domain)?;
        let mut added: Vec<String> = Vec::new();
        let mut actions: Vec<Value> = Vec::new();
        let outcome = async {
            for p in plans {
                match p.mode.as_str() {
                    "internal" => actions.push(json!({
                        "type": "blockdev-snapshot-internal-sync",
                        "data": {"device": root(&p.target)?, "name": name},
                    })),
                    "external" => {
                        let overlay = p.overlay.as_ref().ok_or_else(|| Error::internal("external plan without overlay"))?;
                        let fmt_node = format!("{}-s{number}-fmt", p.target);
                        let file_node = format!("{}-s{number}-file", p.target);
                        number += 1;
                        new_roots.insert(p.target.clone(), fmt_node.clone());
                        let ov = path_str(overlay)?;
                        if created.contains(overlay) {
                            crate::jobs::create_blockdev(client, domain, &format!("{file_node}-create"), json!({"driver": "file", "filename": ov, "size": 0})).await?;
                        }
                        client
                            .execute("blockdev-add", Some(json!({"driver": "file", "node-name": file_node, "filename": ov})))
                            .await
                            .map_err(|e| qmp_error(domain, e))?;
                        added.push(file_node.clone());
                        if created.contains(overlay) {
                            let size = image_size(&p.image, &p.format)?;
                            // QMP's blockdev-snapshot never writes the backing name
                            // into the overlay (recipe book quirk 3): the header
                            // gets it here, with its format.
                            crate::jobs::create_blockdev(client, domain, &format!("{fmt_node}-create"), json!({
                                "driver": "qcow2", "file": file_node, "size": size,
                                "backing-file": path_str(&p.image)?, "backing-fmt": p.format,
                            }))
                            .await?;
                        }
                        // Quirk 2: "backing": null, or QEMU opens the header's
                        // backing file a second time and fails on its lock.
                        client
                            .execute("blockdev-add", Some(json!({"driver": "qcow2", "node-name": fmt_node, "file": file_node, "backing": null})))
                            .await
                            .map_err(|e| qmp_error(domain, e))?;
                        added.push(fmt_node.clone());
                        actions.push(json!({
                            "type": "blockdev-snapshot",
                            "data": {"node": root(&p.target)?, "overlay": fmt_node},
                        }));
                    }
                    _ => {}
                }
            }
            strata_core::crash_point("snapshot-create:overlays");
            client
                .execute("transaction", Some(json!({"actions": actions})))
                .await
                .map_err(|e| qmp_error(domain, e))?;
            Ok::<(), Error>(())
        }
        .await;
        if let Err(e) = outcome {
            for node in added.iter().rev() {
                let _ = client.execute("blockdev-del", Some(json!({"node-name": node}))).await;
            }
            for f in created {
                let _ = std::fs::remove_file(f);
            }
            return Err(e);
        }
        Ok(new_roots)
    }

    /// A checkpoint with external memory: the guest is stopped, its disks
    /// switch to new overlays in one transaction, its state migrates to
    /// the file, and it runs again; disks and memory are of one instant.
    #[allow(clippy::too_many_arguments)]
    async fn create_with_memory(
        &self,
        domain: &str,
        status: &LiveStatus,
        client: &strata_qmp::QmpClient,
        plans: &[DiskPlan],
        name: &str,
        file: &Path,
        created: &[PathBuf],
        was_running: bool,
    ) -> Result<HashMap<String, String>> {
        client.execute("stop", None).await.map_err(|e| qmp_error(domain, e))?;
        let saved = async {
            let roots = self.create_live(domain, status, client, plans, name, false, created).await?;
            save_memory(client, domain, file).await?;
            Ok(roots)
        }
        .await;
        // Back to running (or paused: QEMU refuses a later migration of a
        // guest left paused by a migration, so it is resumed and stopped).
        let _ = client.execute("cont", None).await;
        if !was_running {
            let _ = client.execute("stop", None).await;
        }
        if saved.is_err() {
            let _ = std::fs::remove_file(file);
        }
        saved
    }

    /// Starts QEMU on the adopted definition and loads a saved VM state.
    async fn start_from_memory(&self, domain: &str, file: &Path) -> Result<()> {
        {
            let _lock = self.store().lock_domain(domain)?;
            self.spawn_server(domain, live::Server::Vm, crate::StartMode::Incoming).await?;
        }
        let (_, monitor) = self.running(domain).await?;
        let client = &monitor.client;
        let f = std::fs::File::open(file).map_err(|e| Error::io("open", file, e))?;
        client.send_fd("strata-mem-in", std::os::fd::AsFd::as_fd(&f)).await.map_err(|e| qmp_error(domain, e))?;
        client
            .execute("migrate-incoming", Some(json!({"uri": "fd:strata-mem-in"})))
            .await
            .map_err(|e| qmp_error(domain, e))?;
        wait_migration(client, domain).await
    }

    /// Records in the persistent (and live) definition the chains the
    /// images have after a snapshot: each overlay on the chain recorded
    /// before it, with its new root node (`roots`); without `roots`
    /// (recovery), QEMU's chains when running, else the overlays' headers.
    async fn record_chains(
        &self,
        domain: &str,
        targets: &[String],
        overlays: &HashMap<String, PathBuf>,
        roots: Option<HashMap<String, String>>,
    ) -> Result<()> {
        let store = self.store();
        let running = live::reconcile(store, domain)?.filter(LiveStatus::is_vm).is_some();
        let qemu_chains = match (running, &roots) {
            (true, None) => {
                let (_, monitor) = self.running(domain).await?;
                Some(live::live_chains(&monitor.client, domain).await?)
            }
            _ => None,
        };
        let _lock = store.lock_domain(domain)?;
        let mut persistent = strata_engine::definitions::load(store, domain)?;
        let mut status = live::reconcile(store, domain)?;
        for target in targets {
            let overlay = overlays
                .get(target)
                .cloned()
                .ok_or_else(|| Error::internal(format!("no overlay recorded for disk '{target}'")))?;
            let chain = if let Some(l) = qemu_chains.as_ref().and_then(|c| c.get(target)) {
                if let Some(s) = status.as_mut() {
                    if let Some(root) = l.root() {
                        s.roots.insert(target.clone(), root.to_string());
                    }
                }
                l.chain.clone()
            } else if let (Some(s), Some(node)) = (status.as_mut(), roots.as_ref().and_then(|r| r.get(target))) {
                s.roots.insert(target.clone(), node.clone());
                let below = s
                    .domain
                    .find_disk(target)?
                    .chain
                    .ok_or_else(|| Error::internal(format!("disk '{target}' has no recorded chain")))?;
                below.with_overlay(StorageSource::local(overlay), Some("qcow2".into()))
            } else {
                probe_chain(&StorageSource::local(overlay), "qcow2")?
            };
            if persistent.find_disk(target).is_ok() {
                persistent.set_disk_chain(target, &chain)?;
            }
            if let Some(s) = status.as_mut() {
                s.domain.set_disk_chain(target, &chain)?;
            }
        }
        store.write_domain(domain, &persistent.to_xml())?;
        if let Some(s) = status {
            store.write_status(domain, &s.to_xml())?;
        }
        Ok(())
    }

    /// Reserves `count` node numbers in the status for new node names.
    fn reserve_nodes(&self, domain: &str, count: u64) -> Result<u64> {
        let store = self.store();
        let _lock = store.lock_domain(domain)?;
        let mut status =
            live::reconcile(store, domain)?.ok_or_else(|| Error::operation_invalid("domain is not running"))?;
        let first = status.next_node;
        status.next_node = first.saturating_add(count);
        store.write_status(domain, &status.to_xml())?;
        Ok(first)
    }

    pub(crate) async fn snapshot_revert_impl(
        &self,
        domain: &str,
        snap: &str,
        flags: SnapshotRevertFlags,
        operation: &DomainLock,
    ) -> Result<()> {
        flags.validate()?;
        let store = self.store();
        let def = load(store, domain, snap)?;
        crate::transient::refuse_snapshots(store, domain, [&def])?;
        self.refuse_during_block_job(domain).await?;
        let saved = def
            .domain
            .clone()
            .ok_or_else(|| Error::operation_invalid(format!("snapshot '{snap}' has no saved domain definition")))?;
        let mut target = Domain::from_element(saved)?;
        self.refuse_writing_read_images(domain, &def, &target).await?;
        let state = def.state.clone().unwrap_or_else(|| "disk-snapshot".into());
        let external_memory = def.memory.as_ref().is_some_and(|m| m.snapshot == "external");
        let has_vmstate = (state == "running" || state == "paused") && !external_memory;
        let running = live::reconcile(store, domain)?.filter(LiveStatus::is_vm).is_some();
        let end_running =
            flags.running || (!flags.paused && state == "running" && (running || has_vmstate || external_memory));
        let end_paused = flags.paused || (!flags.running && state == "paused");
        let internal_disks: Vec<&SnapshotDisk> =
            def.disks.iter().filter(|d| d.snapshot.as_deref() == Some("internal")).collect();
        let external_disks: Vec<&SnapshotDisk> =
            def.disks.iter().filter(|d| d.snapshot.as_deref() == Some("external")).collect();

        // Live revert of a checkpoint without restarting QEMU, when the
        // disks still run on the images the checkpoint is stored in.
        let same_images = if running {
            let (live_now, _) = self.current_definition(domain).await?;
            internal_disks.iter().all(|d| {
                let now = live_now.find_disk(&d.name).ok().and_then(|x| x.source().cloned());
                let then = target.find_disk(&d.name).ok().and_then(|x| x.source().cloned());
                now.is_some() && now == then
            })
        } else {
            false
        };
        if running && has_vmstate && external_disks.is_empty() && same_images {
            Intent::Revert { snapshot: snap.into(), running: end_running, paused: end_paused, overlays: Vec::new() }
                .write(store, domain)?;
            strata_core::crash_point("snapshot-revert:intent");
            let (_, monitor) = self.running(domain).await?;
            let chains = live::live_chains(&monitor.client, domain).await?;
            let devices: Vec<String> = internal_disks
                .iter()
                .filter_map(|d| chains.get(&d.name).and_then(|l| l.root()).map(str::to_string))
                .collect();
            let vmstate = devices.first().cloned().ok_or_else(|| Error::internal("checkpoint without disks"))?;
            let run = monitor.client.query_status().await.map_err(|e| qmp_error(domain, e))?;
            monitor.client.execute("stop", None).await.map_err(|e| qmp_error(domain, e))?;
            let loaded = run_job(
                &monitor.client,
                domain,
                "snapshot-load",
                json!({
                    "job-id": "strata-snapshot-load", "tag": snap, "vmstate": vmstate, "devices": devices,
                }),
            )
            .await;
            if let Err(e) = loaded {
                // Leave the guest as it was found; nothing was loaded.
                if run.running {
                    let _ = monitor.client.execute("cont", None).await;
                }
                Intent::clear(store, domain)?;
                return Err(e);
            }
            if end_running && !end_paused {
                monitor.client.execute("cont", None).await.map_err(|e| qmp_error(domain, e))?;
            }
            self.adopt_definition(domain, &target)?;
            self.record_reason(domain, end_state(end_running, end_paused), "from snapshot")?;
            set_current(store, domain, Some(snap))?;
            return Intent::clear(store, domain);
        }

        // External: a new overlay on each frozen image, so the images that
        // later snapshots and the abandoned current state depend on are
        // never written; the tree gains a branch. The names are chosen
        // (and recorded in the intent) before anything changes.
        let mut branches: Vec<(String, PathBuf, String, PathBuf)> = Vec::new();
        for d in &external_disks {
            let disk = target.find_disk(&d.name)?;
            let frozen = disk
                .source()
                .and_then(|s| s.local_path())
                .map(Path::to_path_buf)
                .ok_or_else(|| Error::internal(format!("disk '{}' of snapshot '{snap}' has no image", d.name)))?;
            let fmt = disk.format.clone().unwrap_or_else(|| "raw".into());
            let base_name = d
                .source
                .as_ref()
                .and_then(|s| s.local_path())
                .map(Path::to_path_buf)
                .unwrap_or_else(|| default_overlay(&frozen, snap));
            let overlay = (1..)
                .map(|n| PathBuf::from(format!("{}.branch{n}", base_name.display())))
                .find(|p| !p.exists())
                .ok_or_else(|| Error::internal("no free overlay name"))?;
            branches.push((d.name.clone(), frozen, fmt, overlay));
        }
        Intent::Revert {
            snapshot: snap.into(),
            running: end_running,
            paused: end_paused,
            overlays: branches.iter().map(|b| b.3.clone()).collect(),
        }
        .write(store, domain)?;
        strata_core::crash_point("snapshot-revert:intent");
        let changed = async {
            if running {
                self.destroy(domain).await?;
            }
            // Internal disk snapshots: apply them to the images.
            for d in &internal_disks {
                let disk = target.find_disk(&d.name)?;
                if let Some(p) = disk.source().and_then(|s| s.local_path()) {
                    run(operation, &["snapshot", "-a", snap, path_str(p)?])?;
                }
            }
            for (name, frozen, fmt, overlay) in &branches {
                run(
                    operation,
                    &["create", "-q", "-f", "qcow2", "-b", path_str(frozen)?, "-F", fmt, path_str(overlay)?],
                )?;
                let chain = probe_chain(&StorageSource::local(overlay.clone()), "qcow2")?;
                target.set_disk_chain(name, &chain)?;
            }
            strata_core::crash_point("snapshot-revert:overlays");
            self.adopt_definition(domain, &target)
        }
        .await;
        if let Err(e) = changed {
            // The definition was not switched: the new overlays are unused.
            for (_, _, _, overlay) in &branches {
                let _ = std::fs::remove_file(overlay);
            }
            Intent::clear(store, domain)?;
            return Err(e);
        }
        strata_core::crash_point("snapshot-revert:adopted");
        set_current(store, domain, Some(snap))?;
        Intent::clear(store, domain)?;
        self.revert_run_state(domain, &def, end_running, end_paused).await
    }

    /// Refuses a revert that would write into an image a snapshot froze, or
    /// into a backing image of the current state. A revert writes into the
    /// images that hold its internal disk snapshots (it applies them), and
    /// the guest then writes into the top image of every disk the snapshot
    /// gave no new overlay (only external disks get one).
    async fn refuse_writing_read_images(&self, domain: &str, def: &SnapshotDef, target: &Domain) -> Result<()> {
        let snap = def.name.as_deref().unwrap_or_default();
        let mut written = Vec::new();
        for disk in target.disks()? {
            let external = def.disks.iter().any(|d| d.name == disk.target && d.snapshot.as_deref() == Some("external"));
            if let Some(image) = disk.source().and_then(|s| s.local_path()).filter(|_| !external && !disk.readonly) {
                written.push(image.to_path_buf());
            }
        }
        let frozen = frozen_images(self.store(), domain)?;
        for image in &written {
            if let Some(snapshots) = frozen_by(&frozen, image) {
                return Err(Error::operation_invalid(format!(
                    "cannot revert to snapshot '{snap}': it would write into {}, which {snapshots} froze (the data saved there would change); delete {snapshots} first if that data may go",
                    image.display()
                )));
            }
        }
        // The revert discards the current state, but an image it writes
        // must not change under that state's overlays while they exist.
        let (now, _) = self.current_definition(domain).await?;
        for disk in now.disks()? {
            let Some(chain) = &disk.chain else { continue };
            let line = chain.main_line();
            let Some(top) = line.first().and_then(|l| l.source.local_path()) else { continue };
            if let Some(image) = written.iter().find(|w| line.iter().skip(1).any(|l| l.source.local_path() == Some(w)))
            {
                return Err(Error::operation_invalid(format!(
                    "cannot revert to snapshot '{snap}': it would write into {}, which the current state of disk {} reads below {}; the revert discards that state, so commit it into that image first (blockcommit {domain} {} --active --pivot --base {})",
                    image.display(),
                    disk.target,
                    top.display(),
                    disk.target,
                    image.display()
                )));
            }
        }
        Ok(())
    }

    /// The last step of a revert that restarts the guest: starts QEMU on
    /// the adopted definition and loads the snapshot's VM state (from its
    /// memory file, or from the internal checkpoint), as `end_running` and
    /// `end_paused` ask; a shut-off end leaves it off.
    async fn revert_run_state(
        &self,
        domain: &str,
        def: &SnapshotDef,
        end_running: bool,
        end_paused: bool,
    ) -> Result<()> {
        if !end_running && !end_paused {
            return Ok(());
        }
        let snap = def.name.clone().unwrap_or_default();
        let memory_file =
            def.memory.as_ref().filter(|m| m.snapshot == "external").and_then(|m| m.file.as_ref()).map(PathBuf::from);
        if let Some(file) = memory_file {
            self.start_from_memory(domain, &file).await?;
            if end_running && !end_paused {
                self.resume(domain).await?;
            }
            return self.record_reason(domain, end_state(end_running, end_paused), "from snapshot");
        }
        let state = def.state.as_deref().unwrap_or("disk-snapshot");
        let has_vmstate = state == "running" || state == "paused";
        self.start(domain, StartFlags { paused: true }).await?;
        if has_vmstate {
            let (_, monitor) = self.running(domain).await?;
            let chains = live::live_chains(&monitor.client, domain).await?;
            let devices: Vec<String> = def
                .disks
                .iter()
                .filter(|d| d.snapshot.as_deref() == Some("internal"))
                .filter_map(|d| chains.get(&d.name).and_then(|l| l.root()).map(str::to_string))
                .collect();
            if let Some(vmstate) = devices.first().cloned() {
                run_job(
                    &monitor.client,
                    domain,
                    "snapshot-load",
                    json!({
                        "job-id": "strata-snapshot-load", "tag": snap, "vmstate": vmstate, "devices": devices,
                    }),
                )
                .await?;
            }
        }
        if end_running && !end_paused {
            self.resume(domain).await?;
        }
        self.record_reason(domain, end_state(end_running, end_paused), "from snapshot")
    }

    /// Makes a snapshot's definition the domain's persistent one (a disk
    /// added after the snapshot is gone), keeping the domain's name.
    fn adopt_definition(&self, domain: &str, target: &Domain) -> Result<()> {
        let store = self.store();
        let _lock = store.lock_domain(domain)?;
        let mut t = target.clone();
        t.set_id(None);
        if let Some(status) = live::reconcile(store, domain)?.filter(LiveStatus::is_vm) {
            let mut s = status;
            for d in t.disks()? {
                if let Some(c) = &d.chain {
                    if s.domain.find_disk(&d.target).is_ok() {
                        s.domain.set_disk_chain(&d.target, c)?;
                    }
                }
            }
            store.write_status(domain, &s.to_xml())?;
        }
        store.write_domain(domain, &t.to_xml())
    }

    pub(crate) async fn snapshot_delete_impl(
        &self,
        domain: &str,
        snap: &str,
        flags: SnapshotDeleteFlags,
        operation: &DomainLock,
    ) -> Result<Vec<String>> {
        flags.validate()?;
        let store = self.store();
        load(store, domain, snap)?;
        if !flags.metadata_only {
            self.refuse_during_block_job(domain).await?;
        }
        let defs = all(store, domain)?;
        let children_of = |name: &str| -> Vec<String> {
            defs.iter().filter(|d| d.parent.as_deref() == Some(name)).filter_map(|d| d.name.clone()).collect()
        };
        // Descendants, deepest first, for --children / --children-only.
        let mut order = Vec::new();
        if flags.children || flags.children_only {
            let mut stack = children_of(snap);
            while let Some(n) = stack.pop() {
                stack.extend(children_of(&n));
                order.push(n);
            }
            order.reverse();
        }
        if !flags.children_only {
            order.push(snap.to_string());
        }
        if !flags.metadata_only {
            let deleted = defs.iter().filter(|d| d.name.as_ref().is_some_and(|n| order.contains(n)));
            crate::transient::refuse_snapshots(store, domain, deleted)?;
        }
        self.run_delete(domain, order, flags.metadata_only, Vec::new(), false, operation).await
    }

    /// Deletes `snapshots` in order, recording the operation and each
    /// disk's plan in the intent before acting, so that a resumed delete
    /// (`resuming`, from recovery) carries on the plans already chosen.
    /// Snapshots whose record is already gone were done before.
    async fn run_delete(
        &self,
        domain: &str,
        snapshots: Vec<String>,
        metadata_only: bool,
        mut plans: Vec<DeletePlan>,
        resuming: bool,
        operation: &DomainLock,
    ) -> Result<Vec<String>> {
        let store = self.store();
        Intent::Delete { snapshots: snapshots.clone(), metadata_only, plans: plans.clone() }.write(store, domain)?;
        strata_core::crash_point("snapshot-delete:intent");
        let mut notes = Vec::new();
        let mut in_progress = false;
        let outcome = self
            .delete_each(
                domain,
                &snapshots,
                metadata_only,
                &mut plans,
                resuming,
                &mut in_progress,
                &mut notes,
                operation,
            )
            .await;
        if let Err(e) = outcome {
            // A refusal before any step leaves nothing to finish; after
            // one, the intent stays so that the next call finishes the rest.
            if !in_progress {
                Intent::clear(store, domain)?;
            }
            return Err(e);
        }
        Intent::clear(store, domain)?;
        Ok(notes)
    }

    /// The steps of [`Self::run_delete`]. `in_progress` tells the caller,
    /// when a step fails, whether a snapshot's deletion has begun (its
    /// intent must stay to be finished) or none has (a clean refusal).
    #[allow(clippy::too_many_arguments)]
    async fn delete_each(
        &self,
        domain: &str,
        snapshots: &[String],
        metadata_only: bool,
        plans: &mut Vec<DeletePlan>,
        resuming: bool,
        in_progress: &mut bool,
        notes: &mut Vec<String>,
        operation: &DomainLock,
    ) -> Result<()> {
        let store = self.store();
        for name in snapshots {
            // A plan on record means its steps may have begun.
            *in_progress = plans.iter().any(|p| p.snapshot == *name);
            if store.read_snapshot(domain, name)?.is_none() {
                continue;
            }
            let def = load(store, domain, name)?;
            if !metadata_only {
                // Every disk is planned before any is changed, so a disk
                // that cannot be done refuses the whole snapshot cleanly.
                let mut todo = Vec::new();
                for d in def.disks.iter().filter(|d| d.snapshot.as_deref() == Some("external")) {
                    let plan = match plans.iter().find(|p| p.snapshot == *name && p.disk == d.name) {
                        Some(p) => p.clone(),
                        None => {
                            let p = self.plan_external_delete(domain, &def, d).await?;
                            plans.push(p.clone());
                            p
                        }
                    };
                    todo.push(plan);
                }
                Intent::Delete { snapshots: snapshots.to_vec(), metadata_only, plans: plans.clone() }
                    .write(store, domain)?;
                strata_core::crash_point("snapshot-delete:planned");
                *in_progress = true;
                for d in def.disks.iter().filter(|d| d.snapshot.as_deref() == Some("internal")) {
                    notes.extend(self.delete_internal(domain, &def, &d.name, resuming, operation).await?);
                }
                for plan in &todo {
                    notes.push(self.apply_delete_plan(domain, plan, resuming, operation).await?);
                    strata_core::crash_point("snapshot-delete:images");
                }
            }
            *in_progress = true;
            self.remove_record(domain, &def)?;
            *in_progress = false;
        }
        Ok(())
    }

    /// Removes a snapshot's record: children move to its parent, and so
    /// does current. Only the parent links change, so every remaining
    /// record still describes what it described. Safe to repeat.
    fn remove_record(&self, domain: &str, def: &SnapshotDef) -> Result<()> {
        let store = self.store();
        let snap = def.name.as_deref().ok_or_else(|| Error::internal("snapshot without a name"))?;
        let _lock = store.lock_domain(domain)?;
        for mut child in all(store, domain)?.into_iter().filter(|c| c.parent.as_deref() == Some(snap)) {
            child.parent = def.parent.clone();
            save(store, domain, &child)?;
        }
        if current(store, domain)?.as_deref() == Some(snap) {
            set_current(store, domain, def.parent.as_deref())?;
        }
        strata_core::crash_point("snapshot-delete:records");
        let path = store.domain_dir(domain)?.join("snapshots").join(format!("{snap}.xml"));
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("remove", &path, e)),
            _ => Ok(()),
        }
    }

    /// Removes an internal snapshot from the image of `disk` that holds it.
    /// When `resuming` an interrupted delete, an image that no longer holds
    /// it was done before the interruption.
    async fn delete_internal(
        &self,
        domain: &str,
        def: &SnapshotDef,
        disk: &str,
        resuming: bool,
        operation: &DomainLock,
    ) -> Result<Option<String>> {
        let snap = def.name.clone().unwrap_or_default();
        let dom = strata_engine::definitions::load(self.store(), domain)?;
        let holder = dom.find_disk(disk)?.chain.and_then(|c| {
            c.layers
                .iter()
                .filter_map(|l| l.source.local_path().map(Path::to_path_buf))
                .find(|p| has_internal(operation, p, &snap))
        });
        let image = match holder {
            Some(image) => image,
            None if resuming => return Ok(None),
            None => {
                return Err(Error::operation_failed(format!(
                    "no image of disk '{disk}' holds internal snapshot '{snap}'"
                )))
            }
        };
        if live::reconcile(self.store(), domain)?.filter(LiveStatus::is_vm).is_some() {
            let (_, monitor) = self.running(domain).await?;
            let chains = live::live_chains(&monitor.client, domain).await?;
            let (node, layer) = chains
                .get(disk)
                .and_then(|l| {
                    l.chain
                        .layers
                        .iter()
                        .position(|x| x.source.local_path() == Some(image.as_path()))
                        .map(|i| (l.nodes[i].clone(), i))
                })
                .ok_or_else(|| Error::internal(format!("QEMU has no node for '{}'", image.display())))?;
            if layer != 0 {
                // blockdev-snapshot-delete-internal-sync wants a root node;
                // the snapshot-delete job takes any node, but only a
                // writable one, so the backing layer is reopened for it.
                crate::jobs::reopen_node(&monitor.client, domain, &node, false).await?;
                let deleted = run_job(
                    &monitor.client,
                    domain,
                    "snapshot-delete",
                    json!({
                        "job-id": "strata-snapshot-delete", "tag": snap, "devices": [node],
                    }),
                )
                .await;
                crate::jobs::reopen_node(&monitor.client, domain, &node, true).await?;
                deleted?;
                return Ok(Some(format!("{disk}: internal snapshot '{snap}' removed from {}", image.display())));
            }
            monitor
                .client
                .execute("blockdev-snapshot-delete-internal-sync", Some(json!({"device": node, "name": snap})))
                .await
                .map_err(|e| qmp_error(domain, e))?;
        } else {
            run(operation, &["snapshot", "-d", &snap, path_str(&image)?])?;
        }
        Ok(Some(format!("{disk}: internal snapshot '{snap}' removed from {}", image.display())))
    }

    /// Chooses how an external snapshot's point leaves the disk's chain
    /// while every other snapshot and the current state keep reading what
    /// they read: commit the snapshot's overlay into the frozen image when
    /// that image has no other dependent (method 1), else pull the frozen
    /// image into each of its children (method 2).
    async fn plan_external_delete(&self, domain: &str, def: &SnapshotDef, d: &SnapshotDisk) -> Result<DeletePlan> {
        let saved =
            Domain::from_element(def.domain.clone().ok_or_else(|| Error::internal("snapshot without domain"))?)?;
        let frozen = saved
            .find_disk(&d.name)?
            .source()
            .and_then(|s| s.local_path())
            .map(Path::to_path_buf)
            .ok_or_else(|| Error::internal("snapshot disk without image"))?;
        let overlay = d
            .source
            .as_ref()
            .and_then(|s| s.local_path())
            .map(Path::to_path_buf)
            .ok_or_else(|| Error::internal("external snapshot disk without overlay"))?;
        let edges = self.image_edges(domain).await?;
        tracing::debug!(?edges, frozen = %frozen.display(), overlay = %overlay.display(), "image dependencies");
        let children: Vec<PathBuf> = edges.iter().filter(|(_, b)| *b == frozen).map(|(c, _)| c.clone()).collect();
        let below = edges.iter().find(|(c, _)| *c == frozen).map(|(_, b)| b.clone());
        // Method 1 only when the overlay is the frozen image's one child: a
        // block job may have left it on another backing (then nothing is
        // to merge, and method 2 with no child keeps both files).
        let method =
            if children == [overlay.clone()] && overlay.exists() { DeleteMethod::Commit } else { DeleteMethod::Pull };
        if method == DeleteMethod::Commit {
            // The frozen image is in use but its overlay is not: something
            // committed the overlay into it behind Strata's back, and newer
            // data has been written over. Merging the overlay again would
            // overwrite that data; dropping it would lose what still reads
            // through it.
            let (dom, _) = self.current_definition(domain).await?;
            let in_use = |p: &Path| {
                dom.find_disk(&d.name)
                    .ok()
                    .and_then(|disk| disk.chain)
                    .is_some_and(|c| c.main_line().iter().any(|l| l.source.local_path() == Some(p)))
            };
            let snapshot = def.name.as_deref().unwrap_or_default();
            let read_through =
                edges.iter().any(|(_, b)| *b == overlay) || self.saved_elsewhere(domain, snapshot, &overlay)?;
            if in_use(&frozen) && !in_use(&overlay) && read_through {
                return Err(Error::operation_invalid(format!(
                    "cannot delete snapshot '{snapshot}' on {}: {} is in use but {} is not (it was merged behind Strata's back), and other images or snapshots still read through {}; `snapshot-delete --metadata` removes only the record",
                    d.name,
                    frozen.display(),
                    overlay.display(),
                    overlay.display()
                )));
            }
        }
        Ok(DeletePlan {
            snapshot: def.name.clone().unwrap_or_default(),
            disk: d.name.clone(),
            method,
            overlay,
            frozen,
            below,
            children,
        })
    }

    /// Carries out a delete plan. Each step first checks whether it is
    /// still to do (an image still in the chain, still backed by the
    /// frozen image), so a plan interrupted at any point is finished by
    /// running it again; `resuming` also waits for the block job the
    /// interrupted run left on the disk.
    async fn apply_delete_plan(
        &self,
        domain: &str,
        plan: &DeletePlan,
        resuming: bool,
        operation: &DomainLock,
    ) -> Result<String> {
        let DeletePlan { disk, overlay, frozen, below, children, .. } = plan;
        if resuming {
            self.settle_disk_job(domain, disk).await?;
        }
        let (dom, _) = self.current_definition(domain).await?;
        let chain = dom.find_disk(disk)?.chain.ok_or_else(|| Error::internal("disk without chain"))?;
        let layer_of = |p: &Path| chain.main_line().iter().find(|l| l.source.local_path() == Some(p)).map(|l| l.index);
        match plan.method {
            DeleteMethod::Commit => {
                // Whether the overlay's data went into the frozen image (now
                // or before an interruption), or was no one's any more.
                let mut merged = true;
                if overlay.exists() {
                    let edges = self.image_edges(domain).await?;
                    let dependents: Vec<&PathBuf> =
                        edges.iter().filter(|(_, b)| b == overlay).map(|(c, _)| c).collect();
                    // Images that read through the overlay outside the
                    // running chain (another snapshot's overlay above it, a
                    // branch a revert left): QEMU's commit re-points only
                    // the image above it in the chain, so they are rebased
                    // onto the frozen image, which reads what the overlay
                    // read once the overlay is merged into it.
                    let outside: Vec<&PathBuf> = dependents.iter().copied().filter(|c| layer_of(c).is_none()).collect();
                    match (layer_of(overlay), layer_of(frozen)) {
                        (Some(0), Some(_)) if !outside.is_empty() => {
                            return Err(Error::operation_failed(format!(
                                "{} is the running image of {disk} and {} read through it: nothing was merged or removed",
                                overlay.display(),
                                outside.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(", ")
                            )))
                        }
                        (Some(0), Some(base)) => {
                            self.job_to_end(domain, disk, JobRequest::ActiveCommit { base }).await?;
                        }
                        (Some(top), Some(base)) => {
                            self.job_to_end(domain, disk, JobRequest::Commit { top, base }).await?;
                            rebase_unsafe(operation, &outside, frozen)?;
                        }
                        (Some(_), None) => {
                            return Err(Error::operation_failed(format!(
                                "{} is in the running chain of {disk} but {} is no longer below it: nothing was merged or removed",
                                overlay.display(),
                                frozen.display()
                            )))
                        }
                        // The frozen image runs but the overlay does not:
                        // this delete's commit merged it before an
                        // interruption (the plan refuses an overlay merged
                        // behind Strata's back that images read through).
                        (None, Some(_)) => rebase_unsafe(operation, &dependents, frozen)?,
                        // Neither runs: committed with qemu-img while an image
                        // or another snapshot's saved definition still reads
                        // through the overlay (once nothing does, its data is
                        // no one's).
                        (None, None) if !dependents.is_empty() || self.saved_elsewhere(domain, &plan.snapshot, overlay)? => {
                            run(operation, &["commit", "-d", "-q", path_str(overlay)?])?;
                            rebase_unsafe(operation, &dependents, frozen)?;
                        }
                        (None, None) => merged = false,
                    }
                    strata_core::crash_point("snapshot-delete:merged");
                    std::fs::remove_file(overlay).map_err(|e| Error::io("remove", overlay, e))?;
                }
                self.replace_references(domain, overlay, frozen).await?;
                if !merged {
                    return Ok(format!(
                        "{disk}: deleted {}, which nothing reads any more (a revert or a block job left it behind)",
                        overlay.display()
                    ));
                }
                Ok(format!(
                    "{disk}: committed {} into {} (method 1: nothing else depends on it) and deleted {}",
                    overlay.display(),
                    frozen.display(),
                    overlay.display()
                ))
            }
            DeleteMethod::Pull => {
                for child in children {
                    if !child.exists() || backing_of(child)?.as_ref() != Some(frozen) {
                        continue;
                    }
                    match layer_of(child) {
                        Some(into) => {
                            let base = below.as_ref().and_then(|b| layer_of(b));
                            self.job_to_end(domain, disk, JobRequest::Pull { into, base }).await?;
                        }
                        None => match below {
                            Some(b) => run(
                                operation,
                                &[
                                    "rebase",
                                    "-q",
                                    "-f",
                                    "qcow2",
                                    "-b",
                                    path_str(b)?,
                                    "-F",
                                    &image_format(b)?,
                                    path_str(child)?,
                                ],
                            )?,
                            None => run(operation, &["rebase", "-q", "-f", "qcow2", "-b", "", path_str(child)?])?,
                        },
                    }
                    strata_core::crash_point("snapshot-delete:pulled");
                }
                self.refresh_saved_chains(domain).await?;
                if children.is_empty() {
                    return Ok(format!(
                        "{disk}: no image depends on {} any more ({} is now backed by another image); both files are kept",
                        frozen.display(),
                        overlay.display()
                    ));
                }
                Ok(format!(
                    "{disk}: pulled {} into {} (method 2: {} images depend on it); the file is kept",
                    frozen.display(),
                    children.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(", "),
                    children.len()
                ))
            }
        }
    }

    /// Whether a saved definition other than `snapshot`'s (another
    /// snapshot's, or the persistent one) has `image` in a disk's chain.
    fn saved_elsewhere(&self, domain: &str, snapshot: &str, image: &Path) -> Result<bool> {
        let mut doms = vec![strata_engine::definitions::load(self.store(), domain)?];
        for def in all(self.store(), domain)? {
            if def.name.as_deref() != Some(snapshot) {
                if let Some(el) = def.domain {
                    doms.push(Domain::from_element(el)?);
                }
            }
        }
        for dom in doms {
            for disk in dom.disks()? {
                if disk.chain.iter().flat_map(|c| &c.layers).any(|l| l.source.local_path() == Some(image)) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Waits for the end of a pull or commit left running on `disk` by an
    /// interrupted delete, pivoting an active commit once it is ready.
    async fn settle_disk_job(&self, domain: &str, disk: &str) -> Result<()> {
        let Some(info) = self.block_job_info(domain, disk).await? else { return Ok(()) };
        if !matches!(info.kind, BlockJobKind::Pull | BlockJobKind::Commit | BlockJobKind::ActiveCommit) {
            return Err(Error::new(
                ErrorKind::BlockCopyActive,
                format!("disk '{disk}' has a block copy in progress; end it before the snapshot delete can finish"),
            ));
        }
        loop {
            match self.block_job_wait(domain, disk, 60_000).await? {
                BlockJobState::Running(_) => {}
                BlockJobState::Ready(_) => {
                    let end = self.end_job(domain, disk, BlockJobAbortFlags { pivot: true, no_wait: false }).await?;
                    return job_result(end);
                }
                BlockJobState::Ended { end, .. } => return job_result(end),
            }
        }
    }

    /// (image, its backing image) for every image any record or the
    /// current state knows of.
    async fn image_edges(&self, domain: &str) -> Result<Vec<(PathBuf, PathBuf)>> {
        let store = self.store();
        let mut tops: Vec<PathBuf> = Vec::new();
        let (dom, _) = self.current_definition(domain).await?;
        let mut doms = vec![dom];
        for def in all(store, domain)? {
            for d in &def.disks {
                if let Some(p) = d.source.as_ref().and_then(|s| s.local_path()) {
                    tops.push(p.to_path_buf());
                }
            }
            if let Some(el) = def.domain {
                doms.push(Domain::from_element(el)?);
            }
        }
        for d in &doms {
            for disk in d.disks()? {
                if let Some(p) = disk.source().and_then(|s| s.local_path()) {
                    tops.push(p.to_path_buf());
                }
            }
        }
        let mut edges: Vec<(PathBuf, PathBuf)> = Vec::new();
        let mut seen = HashSet::new();
        for top in tops {
            if !seen.insert(top.clone()) || !top.exists() {
                continue;
            }
            let fmt = image_format(&top)?;
            let Ok(chain) = probe_chain(&StorageSource::local(top.clone()), &fmt) else { continue };
            let line = chain.main_line();
            for pair in line.windows(2) {
                if let (Some(a), Some(b)) = (pair[0].source.local_path(), pair[1].source.local_path()) {
                    let e = (a.to_path_buf(), b.to_path_buf());
                    if !edges.contains(&e) {
                        edges.push(e);
                    }
                }
            }
        }
        Ok(edges)
    }

    /// After `gone` was merged into `kept`: records that named `gone`
    /// name `kept`, and every saved chain is re-read from the images.
    async fn replace_references(&self, domain: &str, gone: &Path, kept: &Path) -> Result<()> {
        let store = self.store();
        let _lock = store.lock_domain(domain)?;
        for mut def in all(store, domain)? {
            let mut changed = false;
            for d in &mut def.disks {
                if d.source.as_ref().and_then(|s| s.local_path()) == Some(gone) {
                    d.source = Some(StorageSource::local(kept.to_path_buf()));
                    changed = true;
                }
            }
            if let Some(el) = def.domain.clone() {
                let mut saved = Domain::from_element(el)?;
                for disk in saved.disks()? {
                    if disk.source().and_then(|s| s.local_path()) == Some(gone) {
                        let fmt = image_format(kept)?;
                        let chain = probe_chain(&StorageSource::local(kept.to_path_buf()), &fmt)?;
                        saved.set_disk_chain(&disk.target, &chain)?;
                        changed = true;
                    } else if disk.chain.as_ref().is_some_and(|c| c.by_path(gone).is_some()) {
                        if let Some(p) = disk.source().and_then(|s| s.local_path()) {
                            if p.exists() {
                                let chain = probe_chain(
                                    &StorageSource::local(p.to_path_buf()),
                                    disk.format.as_deref().unwrap_or("raw"),
                                )?;
                                saved.set_disk_chain(&disk.target, &chain)?;
                                changed = true;
                            }
                        }
                    }
                }
                def.domain = Some(saved.element().clone());
            }
            if changed {
                save(store, domain, &def)?;
            }
        }
        Ok(())
    }

    /// Re-reads from the images every chain recorded in snapshot records
    /// and the persistent definition (after images were rebased).
    async fn refresh_saved_chains(&self, domain: &str) -> Result<()> {
        let store = self.store();
        let _lock = store.lock_domain(domain)?;
        for mut def in all(store, domain)? {
            if let Some(el) = def.domain.clone() {
                let mut saved = Domain::from_element(el)?;
                strata_core::define::refresh_chains(&mut saved)?;
                def.domain = Some(saved.element().clone());
                save(store, domain, &def)?;
            }
        }
        if live::reconcile(store, domain)?.is_none() {
            let mut persistent = strata_engine::definitions::load(store, domain)?;
            strata_core::define::refresh_chains(&mut persistent)?;
            store.write_domain(domain, &persistent.to_xml())?;
        }
        Ok(())
    }

    /// Runs a block job through this driver's own job machinery (QEMU when
    /// running, the storage daemon otherwise) and waits for its end.
    async fn job_to_end(&self, domain: &str, disk: &str, req: JobRequest) -> Result<()> {
        let layer = |i: usize| format!("{disk}[{i}]");
        // A delete commits an overlay into the image its snapshot froze
        // only when no other image reads through that image (the plan
        // checked), so the one snapshot the commit changes is the one
        // being deleted.
        let pivot = match req {
            JobRequest::ActiveCommit { base } => {
                let opts = BlockCommitOptions {
                    active: true,
                    pivot: true,
                    base: Some(layer(base)),
                    allow_snapshot_change: true,
                    ..Default::default()
                };
                self.start_commit(domain, disk, &opts).await?;
                true
            }
            JobRequest::Commit { top, base } => {
                let opts = BlockCommitOptions {
                    top: Some(layer(top)),
                    base: Some(layer(base)),
                    allow_snapshot_change: true,
                    ..Default::default()
                };
                self.start_commit(domain, disk, &opts).await?;
                false
            }
            JobRequest::Pull { into, base } => {
                let opts = BlockPullOptions { base: base.map(layer), top: Some(layer(into)), ..Default::default() };
                self.start_pull(domain, disk, &opts).await?;
                false
            }
        };
        strata_core::crash_point("snapshot-delete:job");
        loop {
            match self.block_job_wait(domain, disk, 60_000).await? {
                BlockJobState::Running(_) => {}
                BlockJobState::Ready(_) => {
                    let end = self.end_job(domain, disk, BlockJobAbortFlags { pivot, no_wait: false }).await?;
                    return job_result(end);
                }
                BlockJobState::Ended { end, .. } => return job_result(end),
            }
        }
    }
}

enum JobRequest {
    ActiveCommit { base: usize },
    Commit { top: usize, base: usize },
    Pull { into: usize, base: Option<usize> },
}

fn job_result(end: BlockJobEnd) -> Result<()> {
    match end {
        BlockJobEnd::Completed => Ok(()),
        BlockJobEnd::Failed(e) => Err(Error::operation_failed(format!("block job failed: {e}"))),
        other => Err(Error::operation_failed(format!("block job ended as {other:?}"))),
    }
}

/// The format of an image Strata created or recorded (probe only used for
/// images whose format Strata wrote itself: overlays are qcow2).
fn image_format(p: &Path) -> Result<String> {
    Ok(strata_core::image::detect_format(p)?.as_str().to_string())
}

/// The run state a revert leaves: paused wins over running, as in virsh.
fn end_state(end_running: bool, end_paused: bool) -> strata_core::driver::DomainState {
    if end_running && !end_paused {
        strata_core::driver::DomainState::Running
    } else {
        strata_core::driver::DomainState::Paused
    }
}

/// The backing image named in `image`'s header, as a local path.
fn backing_of(image: &Path) -> Result<Option<PathBuf>> {
    let chain = probe_chain(&StorageSource::local(image.to_path_buf()), &image_format(image)?)?;
    Ok(chain.main_line().get(1).and_then(|l| l.source.local_path()).map(Path::to_path_buf))
}

fn image_size(p: &Path, fmt: &str) -> Result<u64> {
    let f: strata_core::image::ImageFormat = fmt.parse()?;
    Ok(strata_core::image::read_header(p, f)?.virtual_size)
}

fn has_internal(operation: &DomainLock, p: &Path, snap: &str) -> bool {
    let Some(path) = p.to_str() else { return false };
    strata_core::tool::run_tool_output(
        &crate::qemu_img_binary(),
        &["snapshot", "-U", "-l", path],
        Some(operation.as_fd()),
    )
    .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.split_whitespace().nth(1) == Some(snap)))
    .unwrap_or(false)
}

/// Creates a qcow2 overlay on `image` whose header names `image` and its
/// `format`, so that the overlay reads the same without Strata; `operation`
/// is the operation lock the caller holds, if any (see `strata_core::tool::run_tool_output`).
///
/// The size is read from `image`'s own header and given to `qemu-img
/// create -u`, which then writes the header without opening the backing
/// chain: otherwise it opens every layer, and an offline snapshot of a
/// 2,000-deep chain took 28 s instead of milliseconds. The chain was
/// already probed and checked by Strata.
pub(crate) fn create_overlay(operation: Option<&DomainLock>, image: &Path, format: &str, overlay: &Path) -> Result<()> {
    let size = image_size(image, format)?.to_string();
    let args = ["create", "-q", "-f", "qcow2", "-u", "-b", path_str(image)?, "-F", format, path_str(overlay)?, &size];
    run_holding(operation, &args)
}

fn create_offline(operation: &DomainLock, plans: &[DiskPlan], name: &str, created: &[PathBuf]) -> Result<()> {
    let mut made: Vec<PathBuf> = Vec::new();
    let mut tagged: Vec<PathBuf> = Vec::new();
    let result = (|| {
        for p in plans {
            match p.mode.as_str() {
                "internal" => {
                    run(operation, &["snapshot", "-c", name, path_str(&p.image)?])?;
                    tagged.push(p.image.clone());
                }
                "external" => {
                    let overlay = p.overlay.as_ref().ok_or_else(|| Error::internal("external plan without overlay"))?;
                    if created.contains(overlay) {
                        create_overlay(Some(operation), &p.image, &p.format, overlay)?;
                        made.push(overlay.clone());
                    }
                }
                _ => {}
            }
        }
        Ok(())
    })();
    if result.is_err() {
        // All or nothing: undo what this call made.
        for f in &made {
            let _ = std::fs::remove_file(f);
        }
        for img in &tagged {
            let _ = run(operation, &["snapshot", "-d", name, path_str(img).unwrap_or_default()]);
        }
    }
    result
}

/// Waits for the end of any snapshot job (`strata-snapshot-*`) left in QEMU
/// by a process that died, and dismisses it.
async fn dismiss_snapshot_jobs(client: &strata_qmp::QmpClient, domain: &str) -> Result<()> {
    let jobs = client.query_jobs().await.map_err(|e| qmp_error(domain, e))?;
    for job in jobs.iter().filter(|j| j.id.starts_with("strata-snapshot-")) {
        crate::jobs::wait_status(
            client,
            domain,
            &job.id,
            &[strata_qmp::types::JobStatus::Concluded, strata_qmp::types::JobStatus::Null],
            Duration::from_secs(600),
        )
        .await?;
        let _ = client.execute("job-dismiss", Some(json!({"id": job.id}))).await;
    }
    Ok(())
}

/// Runs a job (snapshot-save/-load) to its end and dismisses it.
async fn run_job(client: &strata_qmp::QmpClient, domain: &str, command: &str, args: Value) -> Result<()> {
    let id = args.get("job-id").and_then(|v| v.as_str()).unwrap_or_default().to_string();
    client.execute(command, Some(args)).await.map_err(|e| qmp_error(domain, e))?;
    crate::jobs::wait_status(
        client,
        domain,
        &id,
        &[strata_qmp::types::JobStatus::Concluded, strata_qmp::types::JobStatus::Null],
        Duration::from_secs(600),
    )
    .await?;
    let jobs = client.query_jobs().await.map_err(|e| qmp_error(domain, e))?;
    let error = jobs.iter().find(|j| j.id == id).and_then(|j| j.error.clone());
    let _ = client.execute("job-dismiss", Some(json!({"id": id}))).await;
    match error {
        Some(e) => Err(Error::operation_failed(format!("{command} failed: {e}"))),
        None => Ok(()),
    }
}

/// Migrates the stopped guest's state into `file` through a passed fd.
async fn save_memory(client: &strata_qmp::QmpClient, domain: &str, file: &Path) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(file)
        .map_err(|e| Error::io("create", file, e))?;
    client.send_fd("strata-mem-out", std::os::fd::AsFd::as_fd(&f)).await.map_err(|e| qmp_error(domain, e))?;
    // QEMU throttles migration to 128 MiB/s by default, also into a file.
    client
        .execute("migrate-set-parameters", Some(json!({"max-bandwidth": 10_u64 << 30})))
        .await
        .map_err(|e| qmp_error(domain, e))?;
    client.execute("migrate", Some(json!({"uri": "fd:strata-mem-out"}))).await.map_err(|e| qmp_error(domain, e))?;
    wait_migration(client, domain).await?;
    f.sync_all().map_err(|e| Error::io("sync", file, e))
}

/// Waits for an outgoing or incoming migration to end.
async fn wait_migration(client: &strata_qmp::QmpClient, domain: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        let info = client.execute("query-migrate", None).await.map_err(|e| qmp_error(domain, e))?;
        match info.get("status").and_then(|s| s.as_str()) {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                let why = info.get("error-desc").and_then(|e| e.as_str()).unwrap_or("unknown reason");
                return Err(Error::operation_failed(format!("saving or loading the VM state failed: {why}")));
            }
            _ => {}
        }
        if std::time::Instant::now() >= deadline {
            return Err(Error::new(ErrorKind::OperationTimeout, "the VM state transfer took over 10 minutes"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
