//! Recovery of a snapshot operation a crash interrupted, from its intent
//! record: the decisions are pure functions of the intent and the images
//! in use; the engine carries them out.

use std::collections::HashSet;
use std::path::PathBuf;

use strata_core::options::SnapshotRevertFlags;
use strata_core::store::DomainLock;
use strata_core::xml::{Domain, SnapshotDef};
use strata_core::{Error, Result};

use super::{Activity, SnapshotBackend, SnapshotEngine};
use crate::graph::images_in_use;
use crate::intent::Intent;
use crate::records::{load, set_current};

/// What becomes of an interrupted creation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreationRecovery<R> {
    /// An image it made is in a chain in use: the snapshot happened, and
    /// its last steps are run to save `R`, its record.
    Finish(R),
    /// It did not happen: these files it made, which nothing uses, go.
    Remove(Vec<PathBuf>),
}

/// Finish a creation when any image it made is in use and its record is
/// known; otherwise remove what it made that nothing uses.
pub fn creation_recovery<R>(files: &[PathBuf], record: Option<R>, in_use: &HashSet<PathBuf>) -> CreationRecovery<R> {
    if let Some(record) = record.filter(|_| files.iter().any(|f| in_use.contains(f))) {
        return CreationRecovery::Finish(record);
    }
    CreationRecovery::Remove(files.iter().filter(|f| !in_use.contains(*f)).cloned().collect())
}

/// What becomes of an interrupted revert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevertRecovery {
    /// The definition runs on every new overlay: only the last steps remain.
    Finish,
    /// These overlays, which nothing uses, go and the revert runs again.
    Redo(Vec<PathBuf>),
}

/// A revert is finished when it made overlays and all of them are in use,
/// else redone.
pub fn revert_recovery(overlays: &[PathBuf], in_use: &HashSet<PathBuf>) -> RevertRecovery {
    if !overlays.is_empty() && overlays.iter().all(|o| in_use.contains(o)) {
        return RevertRecovery::Finish;
    }
    RevertRecovery::Redo(overlays.iter().filter(|o| !in_use.contains(*o)).cloned().collect())
}

impl<B: SnapshotBackend> SnapshotEngine<B> {
    /// Finishes or undoes the snapshot operation a crash interrupted, as
    /// its intent record says; every snapshot call starts with it.
    pub(super) async fn recover_interrupted(&self, domain: &str, operation: &DomainLock) -> Result<Vec<String>> {
        let store = self.store();
        let Some(pending) = Intent::read(store, domain)? else { return Ok(Vec::new()) };
        if self.running(domain)? {
            strata_core::pause_point("snapshot-recover:settle-jobs");
            // A snapshot job the dead process started has ended (or ends
            // now) in the hypervisor; it is cleared so its id can be used
            // again. A hypervisor gone since (the dead process was stopping
            // it) has no job left, and the operation is recovered offline.
            if let Err(e) = self.backend.settle_snapshot_jobs(domain).await {
                if self.running(domain)? {
                    return Err(e);
                }
            }
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
        let in_use = images_in_use(&crate::definitions::load(store, domain)?)?;
        match revert_recovery(overlays, &in_use) {
            RevertRecovery::Finish => {
                set_current(store, domain, Some(snap))?;
                Intent::clear(store, domain)?;
                if self.backend.activity(domain)? == Activity::ShutOff {
                    self.revert_run_state(domain, &def, running, paused).await?;
                }
                Ok(vec![format!("finished the interrupted revert to snapshot '{snap}'")])
            }
            RevertRecovery::Redo(unused) => {
                for o in unused.iter().filter(|o| o.exists()) {
                    std::fs::remove_file(o).map_err(|e| Error::io("remove", o, e))?;
                }
                self.revert(domain, snap, SnapshotRevertFlags { running, paused, force: true }, operation).await?;
                Ok(vec![format!("redid the interrupted revert to snapshot '{snap}'")])
            }
        }
    }

    /// Finishes or undoes a creation a crash interrupted: if any image it
    /// made is in a chain the hypervisor or the definitions use, the
    /// snapshot happened and is finished; otherwise the images it made are
    /// removed.
    async fn recover_creation(
        &self,
        domain: &str,
        files: Vec<PathBuf>,
        record: Option<Box<SnapshotDef>>,
        no_metadata: bool,
    ) -> Result<Vec<String>> {
        let store = self.store();
        // Records a killed creation staged were never published: whatever
        // it finished is redone below from the intent.
        store.remove_staged(domain)?;
        let mut in_use: HashSet<PathBuf> = HashSet::new();
        let mut doms = Vec::new();
        if let Some(xml) = store.read_domain(domain)? {
            doms.push(Domain::parse(&xml)?);
        }
        if self.running(domain)? {
            doms.push(self.backend.live_definition(domain).await?);
        }
        for d in &doms {
            in_use.extend(images_in_use(d)?);
        }
        // The record is saved only after the chains are recorded, and the
        // name was free when the creation began: a saved record means the
        // images had changed, even if a crash lost the rename of the chains
        // (published with one directory fsync each, see finish_creation).
        if let Some(name) = record.as_ref().and_then(|r| r.name.as_deref()) {
            if store.has_snapshot(domain, name)? {
                in_use.extend(files.iter().cloned());
            }
        }
        let mut notes = Vec::new();
        match creation_recovery(&files, record, &in_use) {
            CreationRecovery::Finish(def) => {
                self.finish_creation(domain, &def, no_metadata, None).await?;
                notes.push(format!(
                    "finished snapshot '{}', interrupted after its images changed",
                    def.name.unwrap_or_default()
                ));
                return Ok(notes);
            }
            CreationRecovery::Remove(unused) => {
                for p in unused.iter().filter(|f| f.exists()) {
                    std::fs::remove_file(p).map_err(|e| Error::io("remove", p, e))?;
                    notes.push(format!("removed '{}' left by an interrupted snapshot creation", p.display()));
                }
            }
        }
        Intent::clear(store, domain)?;
        Ok(notes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(names: &[&str]) -> Vec<PathBuf> {
        names.iter().map(PathBuf::from).collect()
    }

    fn set(names: &[&str]) -> HashSet<PathBuf> {
        paths(names).into_iter().collect()
    }

    #[test]
    fn a_creation_whose_overlay_is_in_use_is_finished() {
        let files = paths(&["/i/a.s1", "/i/b.s1"]);
        assert_eq!(
            creation_recovery(&files, Some("s1"), &set(&["/i/a.s1", "/i/base"])),
            CreationRecovery::Finish("s1")
        );
    }

    #[test]
    fn a_creation_with_no_image_in_use_removes_its_files() {
        let files = paths(&["/i/a.s1", "/i/b.s1"]);
        assert_eq!(creation_recovery(&files, Some("s1"), &set(&["/i/base"])), CreationRecovery::Remove(files.clone()));
    }

    #[test]
    fn a_creation_without_its_record_only_removes_unused_files() {
        // An intent written by hand or an older Strata names no record:
        // nothing can be finished, so only the unused files go.
        let files = paths(&["/i/a.s1", "/i/b.s1"]);
        assert_eq!(
            creation_recovery(&files, None::<&str>, &set(&["/i/a.s1"])),
            CreationRecovery::Remove(paths(&["/i/b.s1"]))
        );
    }

    #[test]
    fn a_revert_whose_overlays_are_all_in_use_is_finished() {
        let overlays = paths(&["/i/a.s1.branch1", "/i/b.s1.branch1"]);
        assert_eq!(
            revert_recovery(&overlays, &set(&["/i/a.s1.branch1", "/i/b.s1.branch1", "/i/a"])),
            RevertRecovery::Finish
        );
    }

    #[test]
    fn a_revert_with_an_overlay_not_in_use_is_redone_without_its_unused_overlays() {
        let overlays = paths(&["/i/a.s1.branch1", "/i/b.s1.branch1"]);
        assert_eq!(
            revert_recovery(&overlays, &set(&["/i/a.s1.branch1"])),
            RevertRecovery::Redo(paths(&["/i/b.s1.branch1"]))
        );
    }

    #[test]
    fn a_revert_that_made_no_overlay_is_redone() {
        // An internal-only revert records no overlay: whether it finished
        // cannot be seen from the images, so it runs again.
        assert_eq!(revert_recovery(&[], &set(&["/i/a"])), RevertRecovery::Redo(Vec::new()));
    }
}
