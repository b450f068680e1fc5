//! Revert to a snapshot: in place when the running guest still runs on
//! the images its checkpoint is stored in, otherwise by branching a new
//! overlay off each frozen image (so nothing a later snapshot or the
//! abandoned state depends on is written) and restarting the guest as the
//! snapshot asks.

use std::path::{Path, PathBuf};

use strata_core::chain::{probe_chain, StorageSource};
use strata_core::options::SnapshotRevertFlags;
use strata_core::store::DomainLock;
use strata_core::xml::{Domain, SnapshotDef, SnapshotDisk};
use strata_core::{Error, Result};

use super::plan::default_overlay;
use super::{end_state, RecordedChain, SnapshotBackend, SnapshotEngine};
use crate::graph::{frozen_by, frozen_images};
use crate::image_work::{create_overlay, path_str, run};
use crate::intent::Intent;
use crate::records::{load, set_current};

impl<B: SnapshotBackend> SnapshotEngine<B> {
    pub(super) async fn revert(
        &self,
        domain: &str,
        snap: &str,
        flags: SnapshotRevertFlags,
        operation: &DomainLock,
    ) -> Result<()> {
        flags.validate()?;
        let store = self.store();
        let def = load(store, domain, snap)?;
        self.refuse_transient(domain, [&def])?;
        self.backend.refuse_during_block_job(domain).await?;
        let saved = def
            .domain
            .clone()
            .ok_or_else(|| Error::operation_invalid(format!("snapshot '{snap}' has no saved domain definition")))?;
        let mut target = Domain::from_element(saved)?;
        self.refuse_writing_read_images(domain, &def, &target).await?;
        let state = def.state.clone().unwrap_or_else(|| "disk-snapshot".into());
        let external_memory = def.memory.as_ref().is_some_and(|m| m.snapshot == "external");
        let has_vmstate = (state == "running" || state == "paused") && !external_memory;
        let running = self.running(domain)?;
        let end_running =
            flags.running || (!flags.paused && state == "running" && (running || has_vmstate || external_memory));
        let end_paused = flags.paused || (!flags.running && state == "paused");
        let internal_disks: Vec<&SnapshotDisk> =
            def.disks.iter().filter(|d| d.snapshot.as_deref() == Some("internal")).collect();
        let external_disks: Vec<&SnapshotDisk> =
            def.disks.iter().filter(|d| d.snapshot.as_deref() == Some("external")).collect();

        // Live revert of a checkpoint without restarting the guest, when
        // the disks still run on the images the checkpoint is stored in.
        let same_images = if running {
            let live_now = self.current_definition(domain).await?;
            internal_disks.iter().all(|d| {
                let now = live_now.find_storage_device(&d.name).ok().and_then(|x| x.source().cloned());
                let then = target.find_storage_device(&d.name).ok().and_then(|x| x.source().cloned());
                now.is_some() && now == then
            })
        } else {
            false
        };
        if running && has_vmstate && external_disks.is_empty() && same_images {
            Intent::Revert { snapshot: snap.into(), running: end_running, paused: end_paused, overlays: Vec::new() }
                .write(store, domain)?;
            strata_core::crash_point("snapshot-revert:intent");
            let chains = self.backend.live_chains(domain).await?;
            let tops: Vec<String> =
                internal_disks.iter().filter_map(|d| chains.get(&d.name).and_then(|l| l.top.clone())).collect();
            if tops.is_empty() {
                return Err(Error::internal("checkpoint without disks"));
            }
            let was_running = self.backend.pause_guest(domain).await?;
            if let Err(e) = self.backend.load_checkpoint(domain, snap, &tops).await {
                // Leave the guest as it was found; nothing was loaded.
                if was_running {
                    let _ = self.backend.continue_guest(domain).await;
                }
                Intent::clear(store, domain)?;
                return Err(e);
            }
            if end_running && !end_paused {
                self.backend.continue_guest(domain).await?;
            }
            self.adopt_definition(domain, &target)?;
            self.backend.record_reason(domain, end_state(end_running, end_paused), "from snapshot")?;
            set_current(store, domain, Some(snap))?;
            return Intent::clear(store, domain);
        }
        // External: a new overlay on each frozen image, so the images that
        // later snapshots and the abandoned current state depend on are
        // never written; the tree gains a branch. The names are chosen
        // (and recorded in the intent) before anything changes.
        let mut branches: Vec<(String, PathBuf, String, PathBuf)> = Vec::new();
        for d in &external_disks {
            let disk = target.find_storage_device(&d.name)?;
            let frozen = disk
                .source()
                .and_then(|s| s.local_path())
                .map(Path::to_path_buf)
                .ok_or_else(|| Error::internal(format!("disk '{}' of snapshot '{snap}' has no image", d.name)))?;
            let fmt = disk.format().unwrap_or("raw").to_string();
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
        strata_core::pause_point("snapshot-revert:intent");
        strata_core::crash_point("snapshot-revert:intent");
        let changed = async {
            if running {
                self.backend.stop(domain).await?;
            }
            // Internal disk snapshots: apply them to the images.
            for d in &internal_disks {
                let disk = target.find_storage_device(&d.name)?;
                if let Some(p) = disk.source().and_then(|s| s.local_path()) {
                    run(operation, &["snapshot", "-a", snap, path_str(p)?]).await?;
                }
            }
            for (name, frozen, fmt, overlay) in &branches {
                let (frozen, fmt, made) = (frozen.clone(), fmt.clone(), overlay.clone());
                crate::blocking::blocking(move || create_overlay(&frozen, &fmt, &made)).await?;
                let chain = probe_chain(&StorageSource::local(overlay.clone()), "qcow2")?;
                crate::storage::set_chain(&mut target, name, &chain)?;
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
        for device in target.storage_devices()? {
            let external =
                def.disks.iter().any(|d| d.name == device.name() && d.snapshot.as_deref() == Some("external"));
            if let Some(image) =
                device.source().and_then(|s| s.local_path()).filter(|_| !external && !device.readonly())
            {
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
        let now = self.current_definition(domain).await?;
        for device in now.storage_devices()? {
            let Some(chain) = device.chain() else { continue };
            let line = chain.main_line();
            let Some(top) = line.first().and_then(|l| l.source.local_path()) else { continue };
            if let Some(image) = written.iter().find(|w| line.iter().skip(1).any(|l| l.source.local_path() == Some(w)))
            {
                return Err(Error::operation_invalid(format!(
                    "cannot revert to snapshot '{snap}': it would write into {}, which the current state of disk {} reads below {}; the revert discards that state, so commit it into that image first (blockcommit {domain} {} --active --pivot --base {})",
                    image.display(),
                    device.name(),
                    top.display(),
                    device.name(),
                    image.display()
                )));
            }
        }
        Ok(())
    }

    /// The last step of a revert that restarts the guest: starts it on the
    /// adopted definition and loads the snapshot's VM state (from its
    /// memory file, or from the internal checkpoint), as `end_running` and
    /// `end_paused` ask; a shut-off end leaves it off.
    pub(super) async fn revert_run_state(
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
            self.backend.start_from_memory(domain, &file).await?;
            if end_running && !end_paused {
                self.backend.resume(domain).await?;
            }
            return self.backend.record_reason(domain, end_state(end_running, end_paused), "from snapshot");
        }
        let state = def.state.as_deref().unwrap_or("disk-snapshot");
        let has_vmstate = state == "running" || state == "paused";
        self.backend.start_paused(domain).await?;
        if has_vmstate {
            let chains = self.backend.live_chains(domain).await?;
            let tops: Vec<String> = def
                .disks
                .iter()
                .filter(|d| d.snapshot.as_deref() == Some("internal"))
                .filter_map(|d| chains.get(&d.name).and_then(|l| l.top.clone()))
                .collect();
            if !tops.is_empty() {
                self.backend.load_checkpoint(domain, &snap, &tops).await?;
            }
        }
        if end_running && !end_paused {
            self.backend.resume(domain).await?;
        }
        self.backend.record_reason(domain, end_state(end_running, end_paused), "from snapshot")
    }

    /// Makes a snapshot's definition the domain's persistent one (a disk
    /// added after the snapshot is gone), keeping the domain's name.
    fn adopt_definition(&self, domain: &str, target: &Domain) -> Result<()> {
        let store = self.store();
        let _lock = store.lock_domain(domain)?;
        let mut t = target.clone();
        t.set_id(None);
        if self.running(domain)? {
            if let Some(live) = self.backend.recorded_live_definition(domain)? {
                let mut chains = Vec::new();
                for d in t.storage_devices()? {
                    if let Some(c) = d.chain() {
                        if live.find_storage_device(d.name()).is_ok() {
                            chains.push(RecordedChain { disk: d.name().to_string(), chain: c.clone(), top: None });
                        }
                    }
                }
                self.backend.record_live_chains(domain, &chains, None)?;
            }
        }
        store.write_domain(domain, &t.to_xml())
    }
}
