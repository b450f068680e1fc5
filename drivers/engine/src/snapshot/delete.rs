//! Snapshot delete: the snapshots to delete and their order, the plan of
//! each external disk (commit the overlay into the frozen image, or pull
//! the frozen image into its children: a pure choice over the image
//! dependencies), and the steps that carry a plan out, each checking
//! whether it is still to do so that an interrupted delete resumes.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use strata_core::chain::{probe_chain, StorageSource};
use strata_core::options::SnapshotDeleteFlags;
use strata_core::store::DomainLock;
use strata_core::xml::{Domain, SnapshotDef, SnapshotDisk};
use strata_core::{Error, Result};

use super::{Activity, DiskJob, SnapshotBackend, SnapshotEngine};
use crate::image_work::{backing_of, has_internal, image_format, path_str, rebase_unsafe, run};
use crate::intent::{DeleteMethod, DeletePlan, Intent};
use crate::records::{all, current, load, save, set_current};
use crate::storage::chain_of;

/// How an external snapshot's point leaves a disk's chain, given every
/// image backed by the frozen one (`children`). Method 1 (commit) only
/// when the overlay is the frozen image's one child: a block job may have
/// left it on another backing (then nothing is to merge, and method 2
/// with no child keeps both files).
pub fn delete_method(children: &[PathBuf], overlay: &Path, overlay_exists: bool) -> DeleteMethod {
    if children == [overlay.to_path_buf()] && overlay_exists {
        DeleteMethod::Commit
    } else {
        DeleteMethod::Pull
    }
}

/// Before a commit of `overlay` into `frozen`: when the frozen image is in
/// use (`running_line`: the disk's main chain in the current definition,
/// live when the domain runs) but its overlay is not, something committed
/// the overlay into it behind Strata's back and newer data has been
/// written over. Merging the overlay again would overwrite that data;
/// dropping it would lose what still reads through it (`read_through`).
pub fn refuse_merged_behind_back(
    snapshot: &str,
    disk: &str,
    frozen: &Path,
    overlay: &Path,
    running_line: &[PathBuf],
    read_through: bool,
) -> Result<()> {
    let in_use = |p: &Path| running_line.iter().any(|l| l == p);
    if in_use(frozen) && !in_use(overlay) && read_through {
        return Err(Error::operation_invalid(format!(
            "cannot delete snapshot '{snapshot}' on {disk}: {} is in use but {} is not (it was merged behind Strata's back), and other images or snapshots still read through {}; `snapshot-delete --metadata` removes only the record",
            frozen.display(),
            overlay.display(),
            overlay.display()
        )));
    }
    Ok(())
}

impl<B: SnapshotBackend> SnapshotEngine<B> {
    pub(super) async fn delete(
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
            self.backend.refuse_during_block_job(domain).await?;
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
            self.refuse_transient(domain, deleted)?;
        }
        self.run_delete(domain, order, flags.metadata_only, Vec::new(), false, operation).await
    }

    /// Deletes `snapshots` in order, recording the operation and each
    /// disk's plan in the intent before acting, so that a resumed delete
    /// (`resuming`, from recovery) carries on the plans already chosen.
    /// Snapshots whose record is already gone were done before.
    pub(super) async fn run_delete(
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
            if !store.has_snapshot(domain, name)? {
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
        let dom = crate::definitions::load(self.store(), domain)?;
        let mut holder = None;
        let layers = chain_of(&dom, disk)?.map(|c| c.layers).unwrap_or_default();
        for p in layers.iter().filter_map(|l| l.source.local_path()) {
            if has_internal(operation, p, &snap).await {
                holder = Some(p.to_path_buf());
                break;
            }
        }
        let image = match holder {
            Some(image) => image,
            None if resuming => return Ok(None),
            None => {
                return Err(Error::operation_failed(format!(
                    "no image of disk '{disk}' holds internal snapshot '{snap}'"
                )))
            }
        };
        if self.running(domain)? {
            self.backend.delete_internal_live(domain, disk, &image, &snap).await?;
        } else {
            run(operation, &["snapshot", "-d", &snap, path_str(&image)?]).await?;
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
            .find_storage_device(&d.name)?
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
        let method = delete_method(&children, &overlay, overlay.exists());
        self.refuse_planned_jobs(domain, &d.name, method, &overlay, &frozen, &children, below.as_deref()).await?;
        if method == DeleteMethod::Commit {
            let dom = self.current_definition(domain).await?;
            let running_line: Vec<PathBuf> = chain_of(&dom, &d.name)
                .ok()
                .flatten()
                .map(|c| c.main_line().iter().filter_map(|l| l.source.local_path().map(Path::to_path_buf)).collect())
                .unwrap_or_default();
            let snapshot = def.name.as_deref().unwrap_or_default();
            let read_through =
                edges.iter().any(|(_, b)| *b == overlay) || self.saved_elsewhere(domain, snapshot, &overlay)?;
            refuse_merged_behind_back(snapshot, &d.name, &frozen, &overlay, &running_line, read_through)?;
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

    /// Asks the backend about each job the plan will run on the disk's
    /// current chain (as [`Self::apply_delete_plan`] chooses them), so that
    /// one the domain cannot run now is refused before the plan is
    /// recorded.
    #[allow(clippy::too_many_arguments)]
    async fn refuse_planned_jobs(
        &self,
        domain: &str,
        disk: &str,
        method: DeleteMethod,
        overlay: &Path,
        frozen: &Path,
        children: &[PathBuf],
        below: Option<&Path>,
    ) -> Result<()> {
        let dom = self.current_definition(domain).await?;
        let Some(chain) = chain_of(&dom, disk)? else { return Ok(()) };
        let layer_of = |p: &Path| chain.main_line().iter().find(|l| l.source.local_path() == Some(p)).map(|l| l.index);
        let jobs: Vec<DiskJob> = match method {
            DeleteMethod::Commit => match (layer_of(overlay), layer_of(frozen)) {
                (Some(0), Some(base)) => vec![DiskJob::ActiveCommit { base }],
                (Some(top), Some(base)) => vec![DiskJob::Commit { top, base }],
                _ => Vec::new(),
            },
            DeleteMethod::Pull => children
                .iter()
                .filter_map(|c| layer_of(c))
                .map(|into| DiskJob::Pull { into, base: below.and_then(layer_of) })
                .collect(),
        };
        jobs.into_iter().try_for_each(|job| self.backend.refuse_delete_job(domain, disk, job))
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
            self.backend.settle_disk_job(domain, disk).await?;
        }
        let dom = self.current_definition(domain).await?;
        let chain = chain_of(&dom, disk)?.ok_or_else(|| Error::internal("disk without chain"))?;
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
                            self.backend.run_disk_job(domain, disk, DiskJob::ActiveCommit { base }).await?;
                        }
                        (Some(top), Some(base)) => {
                            self.backend.run_disk_job(domain, disk, DiskJob::Commit { top, base }).await?;
                            rebase_unsafe(operation, &outside, frozen).await?;
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
                        (None, Some(_)) => rebase_unsafe(operation, &dependents, frozen).await?,
                        // Neither runs: committed with qemu-img while an image
                        // or another snapshot's saved definition still reads
                        // through the overlay (once nothing does, its data is
                        // no one's).
                        (None, None) if !dependents.is_empty() || self.saved_elsewhere(domain, &plan.snapshot, overlay)? => {
                            run(operation, &["commit", "-d", "-q", path_str(overlay)?]).await?;
                            rebase_unsafe(operation, &dependents, frozen).await?;
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
                            self.backend.run_disk_job(domain, disk, DiskJob::Pull { into, base }).await?;
                        }
                        None => match below {
                            Some(b) => {
                                run(
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
                                )
                                .await?
                            }
                            None => {
                                run(operation, &["rebase", "-q", "-f", "qcow2", "-b", "", path_str(child)?]).await?
                            }
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
        let mut doms = vec![crate::definitions::load(self.store(), domain)?];
        for def in all(self.store(), domain)? {
            if def.name.as_deref() != Some(snapshot) {
                if let Some(el) = def.domain {
                    doms.push(Domain::from_element(el)?);
                }
            }
        }
        for dom in doms {
            for device in dom.storage_devices()? {
                if device.chain().iter().flat_map(|c| &c.layers).any(|l| l.source.local_path() == Some(image)) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// (image, its backing image) for every image any record or the
    /// current state knows of.
    async fn image_edges(&self, domain: &str) -> Result<Vec<(PathBuf, PathBuf)>> {
        let store = self.store();
        let mut tops: Vec<PathBuf> = Vec::new();
        let dom = self.current_definition(domain).await?;
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
            for device in d.storage_devices()? {
                if let Some(p) = device.source().and_then(|s| s.local_path()) {
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
        let _lock = crate::blocking::lock_domain(store, domain).await?;
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
                for device in saved.storage_devices()? {
                    if device.source().and_then(|s| s.local_path()) == Some(gone) {
                        let fmt = image_format(kept)?;
                        let chain = probe_chain(&StorageSource::local(kept.to_path_buf()), &fmt)?;
                        saved.set_storage_chain(&device.address(), &chain)?;
                        changed = true;
                    } else if device.chain().is_some_and(|c| c.by_path(gone).is_some()) {
                        if let Some(p) = device.source().and_then(|s| s.local_path()) {
                            if p.exists() {
                                let chain = probe_chain(
                                    &StorageSource::local(p.to_path_buf()),
                                    device.format().unwrap_or("raw"),
                                )?;
                                saved.set_storage_chain(&device.address(), &chain)?;
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
        let _lock = crate::blocking::lock_domain(store, domain).await?;
        for mut def in all(store, domain)? {
            if let Some(el) = def.domain.clone() {
                let mut saved = Domain::from_element(el)?;
                strata_core::define::refresh_chains(&mut saved)?;
                def.domain = Some(saved.element().clone());
                save(store, domain, &def)?;
            }
        }
        if self.backend.activity(domain)? == Activity::ShutOff {
            let mut persistent = crate::definitions::load(store, domain)?;
            strata_core::define::refresh_chains(&mut persistent)?;
            store.write_domain(domain, &persistent.to_xml())?;
        }
        Ok(())
    }
}

#[cfg(test)]
// A failed unwrap is how these tests report an unexpected result.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn p(path: &str) -> PathBuf {
        PathBuf::from(path)
    }

    #[test]
    fn the_overlay_as_the_frozen_images_one_child_is_committed() {
        assert_eq!(delete_method(&[p("/i/a.s1")], Path::new("/i/a.s1"), true), DeleteMethod::Commit);
    }

    #[test]
    fn a_frozen_image_with_several_children_is_pulled_into_them() {
        // After a revert, the branch overlay also reads the frozen image.
        let children = [p("/i/a.s1"), p("/i/a.s1.branch1")];
        assert_eq!(delete_method(&children, Path::new("/i/a.s1"), true), DeleteMethod::Pull);
    }

    #[test]
    fn an_overlay_moved_elsewhere_or_gone_is_not_committed() {
        // A block job left the overlay on another backing: nothing to merge.
        assert_eq!(delete_method(&[], Path::new("/i/a.s1"), true), DeleteMethod::Pull);
        assert_eq!(delete_method(&[p("/i/other")], Path::new("/i/a.s1"), true), DeleteMethod::Pull);
        assert_eq!(delete_method(&[p("/i/a.s1")], Path::new("/i/a.s1"), false), DeleteMethod::Pull);
    }

    #[test]
    fn an_overlay_merged_behind_strata_s_back_is_refused_only_while_read_through() {
        let (frozen, overlay) = (Path::new("/i/a.qcow2"), Path::new("/i/a.s1"));
        // Running (or offline) on the frozen image alone: the overlay was
        // merged behind Strata's back.
        let merged = [p("/i/a.qcow2")];
        let err = refuse_merged_behind_back("s1", "vda", frozen, overlay, &merged, true).unwrap_err();
        assert_eq!(err.kind(), strata_core::ErrorKind::OperationInvalid);
        assert!(err
            .message()
            .starts_with("cannot delete snapshot 's1' on vda: /i/a.qcow2 is in use but /i/a.s1 is not"));
        // Nothing reads through it (no image, no other snapshot's saved
        // definition): its data is no one's, and the commit may go on.
        refuse_merged_behind_back("s1", "vda", frozen, overlay, &merged, false).unwrap();
        // The usual case: the current chain runs on the overlay.
        let running = [p("/i/a.s1"), p("/i/a.qcow2")];
        refuse_merged_behind_back("s1", "vda", frozen, overlay, &running, true).unwrap();
        // The current state left the frozen image (after a revert elsewhere).
        refuse_merged_behind_back("s1", "vda", frozen, overlay, &[p("/i/b.qcow2")], true).unwrap();
    }
}
