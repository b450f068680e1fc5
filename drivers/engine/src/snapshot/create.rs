//! Snapshot creation: validation, the plan of each disk, the record
//! settled before any image changes, the intent, the images (by the
//! backend while the domain runs; while it is shut off, overlays written
//! natively and internal snapshots by `qemu-img`),
//! then the chains recorded and the record saved.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use strata_core::chain::{probe_chain, Chain, StorageSource};
use strata_core::image::ImageFormat;
use strata_core::options::{SnapshotCreateFlags, SnapshotRevertFlags};
use strata_core::store::{DomainLock, ReadMark, StagedFile, Store};
use strata_core::xml::{Domain, SnapshotDef, SnapshotDisk, SnapshotMemory};
use strata_core::{Error, Result};

use super::plan::{plan_disks, DiskPlan};
use super::{now_secs, Activity, NewTops, RecordedChain, SnapshotBackend, SnapshotEngine, StagedLiveChains, Switched};
use crate::blocking::blocking;
use crate::graph::images_read_by;
use crate::image_work::{create_overlay, held, path_str, run_holding};
use crate::intent::Intent;
use crate::records::{current, save, set_current, stage, stage_current};

impl<B: SnapshotBackend> SnapshotEngine<B> {
    pub(super) async fn create(
        &self,
        domain: &str,
        xml: &str,
        flags: SnapshotCreateFlags,
        operation: &DomainLock,
    ) -> Result<String> {
        flags.validate()?;
        let store = self.store();
        // Read once: a definition thousands of layers deep takes a while to
        // parse.
        let (mut persistent, mut mark) = crate::definitions::load_marked(store, domain)?;
        let mut def = SnapshotDef::parse(xml)?;
        if flags.redefine {
            return self.redefine(domain, def, flags.current);
        }
        self.backend.refuse_during_block_job(domain).await?;
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
                if !self.running(domain)? {
                    return Err(Error::operation_invalid("domain is not running"));
                }
                Some(file)
            }
            None => None,
        };
        let name = def.name.clone().unwrap_or_else(|| now_secs().to_string());
        strata_core::store::validate_name("snapshot", &name)?;
        if store.has_snapshot(domain, &name)? {
            return Err(Error::operation_failed(format!("domain moment {name} already exists")));
        }
        if flags.branch {
            let parent = def
                .parent
                .clone()
                .ok_or_else(|| Error::invalid_arg("--branch needs a <parent> in the snapshot XML"))?;
            let was_running = self.running(domain)?;
            self.revert(
                domain,
                &parent,
                SnapshotRevertFlags { running: was_running, paused: false, force: true },
                operation,
            )
            .await?;
            (persistent, mark) = crate::definitions::load_marked(store, domain)?;
        }
        // The live state records the running chains and root nodes, so no
        // query of the hypervisor's whole block graph is needed: creation
        // costs the same at any chain depth.
        let (mut dom, live) = match self.backend.activity(domain)? {
            Activity::Running => (self.backend.running_definition(domain).await?, true),
            Activity::OfflineJob => {
                return Err(Error::operation_invalid(format!(
                    "an offline block job runs on the disks of domain '{domain}'; wait for it to end"
                )))
            }
            Activity::ShutOff => (persistent.clone(), false),
        };
        // The record keeps the definition, not this run's domain id.
        dom.set_id(None);
        let selected: HashSet<String> = strata_core::diskset::selected(&persistent)?.into_iter().collect();
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
        let checkpoint = live && !flags.disk_only && def.memory.as_ref().is_none_or(|m| m.snapshot != "no");
        // Only a checkpoint's state and a memory save depend on whether the
        // guest runs: a disk-only snapshot does not ask the hypervisor.
        let running = (checkpoint || memory_file.is_some()) && self.backend.guest_running(domain).await?;
        let state = match (live, checkpoint, running) {
            (true, true, true) => "running",
            (true, true, false) => "paused",
            (false, _, _) if !flags.disk_only => "shutoff",
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
        // Each overlay goes over the chain the live state records now: the
        // operation lock keeps every other chain change out until the end.
        let external = plans.iter().filter(|p| p.mode == "external").map(|p| &p.target);
        let mut below = live.then(|| recorded_chains(&dom, external)).transpose()?;
        def.domain = Some(dom.into_element());
        if live && !checkpoint && memory_file.is_none() {
            self.backend.ready_snapshot_disks(domain, &plans, &name).await?;
        }
        Intent::write_create(store, domain, &created, &def, flags.no_metadata)?;
        strata_core::crash_point("snapshot-create:intent");
        let (roots, staged, staged_live) = match (live, &memory_file) {
            (true, Some(file)) => {
                let roots =
                    self.backend.snapshot_disks_with_memory(domain, &plans, &name, file, &created, running).await?;
                (Some(roots), Staged::default(), None)
            }
            (true, None) => {
                // The records published once the hypervisor has switched
                // are written and synced while it works (see `Staged`);
                // what they are made of goes to the thread and comes back.
                let staging = {
                    let (store, domain, no_metadata) = (store.clone(), domain.to_string(), flags.no_metadata);
                    blocking(move || {
                        let staged = Staged::write(&store, &domain, &mut persistent, &def, below.as_ref(), no_metadata);
                        Ok((persistent, def, below, staged))
                    })
                };
                // Staging is polled first, so that its thread starts before
                // the backend's own blocking work.
                let (staging, taken) =
                    tokio::join!(staging, self.create_live(domain, &plans, &name, checkpoint, &created));
                let (staged_def, staged);
                (persistent, staged_def, below, staged) = staging?;
                def = staged_def;
                let staged = staged.unwrap_or_else(|e| {
                    tracing::debug!(error = %e, "the snapshot's records are written after the switch");
                    Staged::default()
                });
                let switched = taken?;
                (Some(switched.tops), staged, switched.staged)
            }
            (false, _) => {
                create_offline(operation, &plans, &name, &created).await?;
                (None, Staged::default(), None)
            }
        };
        strata_core::crash_point("snapshot-create:images");
        strata_core::pause_point("snapshot-create:images");
        let made = Made { persistent, mark, roots, below, staged, staged_live };
        self.finish_creation(domain, &def, flags.no_metadata, Some(made)).await?;
        Ok(name)
    }

    /// Takes the snapshot in the running domain; returns each disk's new
    /// top handle.
    async fn create_live(
        &self,
        domain: &str,
        plans: &[DiskPlan],
        name: &str,
        checkpoint: bool,
        created: &[PathBuf],
    ) -> Result<Switched> {
        if checkpoint {
            // A system checkpoint: VM state and every selected qcow2 disk
            // in one internal snapshot (disks with snapshot='no' are left out).
            if plans.iter().any(|p| p.mode == "external") {
                return Err(Error::config_unsupported(
                    "a checkpoint with external disk snapshots needs external memory: add --memspec file=PATH, or use --disk-only",
                ));
            }
            self.backend.save_checkpoint(domain, plans, name).await?;
            return Ok(Switched::default());
        }
        self.backend.snapshot_disks(domain, plans, name, created).await
    }

    /// The steps after the images changed: chains recorded, the record
    /// saved and made current, the intent cleared. Also what recovery runs
    /// for a creation whose images had changed when it was interrupted.
    /// `made`: what the creation read and made, when this process made it
    /// (recovery passes `None`: the definitions are read and the backend asked).
    pub(super) async fn finish_creation(
        &self,
        domain: &str,
        def: &SnapshotDef,
        no_metadata: bool,
        mut made: Option<Made>,
    ) -> Result<()> {
        let store = self.store();
        // The staged definition goes on to the recording of the chains.
        let (staged_record, staged_current) =
            made.as_mut().map(|m| (m.staged.record.take(), m.staged.current.take())).unwrap_or_default();
        let targets: Vec<String> =
            def.disks.iter().filter(|d| d.snapshot.as_deref() == Some("external")).map(|d| d.name.clone()).collect();
        let overlays: HashMap<String, PathBuf> = def
            .disks
            .iter()
            .filter_map(|d| Some((d.name.clone(), d.source.as_ref()?.local_path()?.to_path_buf())))
            .collect();
        // A rename below lost in a crash is redone from the intent, which
        // is cleared only once their directories are synced: one fsync per
        // directory instead of one per file.
        let batch = store.defer_dir_syncs();
        self.record_chains(domain, &targets, &overlays, made).await?;
        strata_core::crash_point("snapshot-create:chains");
        if !no_metadata {
            let name = def.name.clone().unwrap_or_default();
            match staged_record {
                Some(record) => store.publish(record)?,
                None => save(store, domain, def)?,
            }
            strata_core::crash_point("snapshot-create:record");
            match staged_current {
                Some(current) => store.publish(current)?,
                None => set_current(store, domain, Some(&name))?,
            }
        }
        strata_core::crash_point("snapshot-create:published");
        batch.sync()?;
        Intent::clear(store, domain)
    }

    /// Records in the persistent (and live) definition the chains the
    /// images have after a snapshot: each overlay on the chain recorded
    /// before it (`below`, else the live state's), with its new top handle
    /// (`roots`); without `roots` (recovery), the hypervisor's chains when
    /// running, else the overlays' headers.
    async fn record_chains(
        &self,
        domain: &str,
        targets: &[String],
        overlays: &HashMap<String, PathBuf>,
        made: Option<Made>,
    ) -> Result<()> {
        let store = self.store();
        let (read, roots, below, staged_domain, staged_live) = match made {
            Some(Made { persistent, mark, roots, below, staged, staged_live }) => {
                (Some((persistent, mark)), roots, below, staged.domain, staged_live)
            }
            None => (None, None, None, None, None),
        };
        let live_chains = match (self.running(domain)?, &roots) {
            (true, None) => Some(self.backend.live_chains(domain).await?),
            _ => None,
        };
        let _lock = crate::blocking::lock_domain(store, domain).await?;
        // The staged definition is published only if the one it was made
        // from is still the stored one.
        let (mut persistent, staged_domain) = match (read, staged_domain) {
            (Some((dom, mark)), Some(staged)) if mark.unchanged()? => (dom, Some(staged)),
            (Some((dom, mark)), _) => (crate::definitions::reload_if_replaced(store, domain, dom, &mark)?, None),
            (None, _) => (crate::definitions::load(store, domain)?, None),
        };
        // Parsing the live state again is needed only when no caller read it.
        let mut recorded = match below {
            Some(below) => Some(below),
            None => {
                self.backend.recorded_live_definition(domain)?.map(|rec| recorded_chains(&rec, targets)).transpose()?
            }
        };
        let mut live_updates = Vec::new();
        for target in targets {
            let overlay = overlays
                .get(target)
                .cloned()
                .ok_or_else(|| Error::internal(format!("no overlay recorded for disk '{target}'")))?;
            let (chain, top) = if let Some(l) = live_chains.as_ref().and_then(|c| c.get(target)) {
                (l.chain.clone(), l.top.clone())
            } else if let (Some(rec), Some(node)) = (recorded.as_mut(), roots.as_ref().and_then(|r| r.get(target))) {
                let below = rec
                    .remove(target)
                    .ok_or_else(|| Error::internal(format!("disk '{target}' has no recorded chain")))?;
                (overlaid(&below, overlay), Some(node.clone()))
            } else {
                (offline_chain(&persistent, target, overlay)?, None)
            };
            if staged_domain.is_none() {
                if let Ok(device) = persistent.find_storage_device(target) {
                    persistent.set_storage_chain(&device.address(), &chain)?;
                }
            }
            if recorded.is_some() {
                live_updates.push(RecordedChain { disk: target.clone(), chain, top });
            }
        }
        match staged_domain {
            Some(staged) => store.publish(staged)?,
            None => store.write_domain(domain, &persistent.to_xml())?,
        }
        self.backend.record_live_chains(domain, &live_updates, staged_live)
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
        let dom = crate::definitions::load(store, domain)?;
        if saved.uuid().is_some() && saved.uuid() != dom.uuid() {
            return Err(Error::invalid_arg(format!(
                "snapshot '{name}' was taken of a domain with uuid {}, not {}",
                saved.uuid().unwrap_or_default(),
                dom.uuid().unwrap_or_default()
            )));
        }
        if let Some(parent) = &def.parent {
            if parent == &name || !store.has_snapshot(domain, parent)? {
                return Err(Error::invalid_arg(format!("parent snapshot '{parent}' of '{name}' does not exist")));
            }
        }
        for d in &def.disks {
            saved.find_storage_device(&d.name).map_err(|_| {
                Error::invalid_arg(format!("snapshot '{name}' names disk '{}' that its domain does not have", d.name))
            })?;
        }
        save(store, domain, &def)?;
        if make_current {
            set_current(store, domain, Some(&name))?;
        }
        Ok(name)
    }
}

/// What a creation read and made, handed to the steps that record it.
pub(super) struct Made {
    /// The persistent definition, as read before the domain lock was taken.
    persistent: Domain,
    mark: ReadMark,
    /// The new top handle of each disk that got an overlay while running.
    roots: Option<NewTops>,
    /// The live chain each of those overlays went on.
    below: Option<HashMap<String, Chain>>,
    /// The records written while the hypervisor worked.
    staged: Staged,
    /// The live state the backend staged meanwhile.
    staged_live: Option<StagedLiveChains>,
}

/// A live snapshot's records, written and synced while the hypervisor
/// adds and switches to the new overlays (each fsync about 0.2 ms here,
/// the hypervisor's part 2–3 ms), so that only their renames are left for
/// after it: the persistent definition with the new chains, the record,
/// and the current-snapshot mark. Nothing names them until they are
/// published, and the intent written before redoes whatever a crash stops;
/// one not staged (a failure) is written the usual way after the switch.
#[derive(Debug, Default)]
pub(super) struct Staged {
    domain: Option<StagedFile>,
    record: Option<StagedFile>,
    current: Option<StagedFile>,
}

impl Staged {
    /// Stages `persistent` with each external disk of `def` on its
    /// overlay over the chain in `below` (changed in place: the same
    /// change the recording makes), and, unless `no_metadata`, the record
    /// of `def` made current.
    fn write(
        store: &Store,
        domain: &str,
        persistent: &mut Domain,
        def: &SnapshotDef,
        below: Option<&HashMap<String, Chain>>,
        no_metadata: bool,
    ) -> Result<Staged> {
        let mut staged = Staged::default();
        let Some(below) = below else { return Ok(staged) };
        for disk in def.disks.iter().filter(|d| d.snapshot.as_deref() == Some("external")) {
            let overlay = disk.source.as_ref().and_then(StorageSource::local_path).map(Path::to_path_buf);
            let (Some(overlay), Some(chain)) = (overlay, below.get(&disk.name)) else { return Ok(staged) };
            if let Ok(device) = persistent.find_storage_device(&disk.name) {
                persistent.set_storage_chain(&device.address(), &overlaid(chain, overlay))?;
            }
        }
        staged.domain = Some(store.stage_domain(domain, &persistent.to_xml())?);
        if !no_metadata {
            let name = def.name.as_deref().ok_or_else(|| Error::internal("snapshot without a name"))?;
            staged.record = Some(stage(store, domain, def)?);
            staged.current = Some(stage_current(store, domain, name)?);
        }
        Ok(staged)
    }
}

/// `below` with a new qcow2 `overlay` on top: a disk's chain once a
/// snapshot switched it to its overlay.
pub fn overlaid(below: &Chain, overlay: PathBuf) -> Chain {
    below.with_overlay(StorageSource::local(overlay), Some("qcow2".into()))
}

/// The chain `dom` records for each of `targets` that has one.
fn recorded_chains<'a>(dom: &Domain, targets: impl IntoIterator<Item = &'a String>) -> Result<HashMap<String, Chain>> {
    let mut chains = HashMap::new();
    for target in targets {
        if let Some(chain) = dom.find_storage_device(target)?.chain() {
            chains.insert(target.clone(), chain.clone());
        }
    }
    Ok(chains)
}

/// The chain of disk `target` of a shut-off domain under its new
/// `overlay`: the recorded chain with the overlay on top when the overlay's
/// header names the recorded top and its format (as it does when this
/// process wrote it), so that the layers below are not read again; else
/// (recovery finding the overlay already recorded, or another chain) the
/// overlay's chain as probed.
fn offline_chain(persistent: &Domain, target: &str, overlay: PathBuf) -> Result<Chain> {
    let recorded = persistent.find_storage_device(target).ok().and_then(|d| d.chain().cloned());
    if let Some(recorded) = recorded {
        let header = strata_core::image::read_header(&overlay, ImageFormat::Qcow2)?;
        let top = recorded.top();
        let named = top.and_then(|l| l.source.local_path()).and_then(Path::to_str);
        if named.is_some()
            && header.backing_file.as_deref() == named
            && header.backing_format == top.and_then(|l| l.format.clone())
        {
            return Ok(recorded.with_overlay(StorageSource::local(overlay), Some("qcow2".into())));
        }
    }
    probe_chain(&StorageSource::local(overlay), "qcow2")
}

/// Takes the snapshot `plans` describe in the images of a shut-off domain:
/// internal ones with `qemu-img snapshot -c`, external ones as new
/// overlays (those in `created`; the others are reused files).
pub async fn create_offline(operation: &DomainLock, plans: &[DiskPlan], name: &str, created: &[PathBuf]) -> Result<()> {
    let lock = held(operation)?;
    let (plans, name, created) = (plans.to_vec(), name.to_string(), created.to_vec());
    blocking(move || create_offline_holding(lock.as_fd(), &plans, &name, &created)).await
}

fn create_offline_holding(
    operation: BorrowedFd<'_>,
    plans: &[DiskPlan],
    name: &str,
    created: &[PathBuf],
) -> Result<()> {
    let mut made: Vec<PathBuf> = Vec::new();
    let mut tagged: Vec<PathBuf> = Vec::new();
    let result = (|| {
        for p in plans {
            match p.mode.as_str() {
                "internal" => {
                    run_holding(Some(operation), &["snapshot", "-c", name, path_str(&p.image)?])?;
                    tagged.push(p.image.clone());
                }
                "external" => {
                    let overlay = p.overlay.as_ref().ok_or_else(|| Error::internal("external plan without overlay"))?;
                    if created.contains(overlay) {
                        create_overlay(&p.image, &p.format, overlay)?;
                        made.push(overlay.clone());
                    }
                }
                _ => {}
            }
        }
        // The overlays are made and named nowhere yet, as when QEMU has
        // made them live.
        strata_core::crash_point("snapshot-create:overlays");
        Ok(())
    })();
    if result.is_err() {
        // All or nothing: undo what this call made.
        for f in &made {
            let _ = std::fs::remove_file(f);
        }
        for img in &tagged {
            let _ = run_holding(Some(operation), &["snapshot", "-d", name, path_str(img).unwrap_or_default()]);
        }
    }
    result
}
