//! The snapshot engine's create and delete flows on a running domain,
//! against a backend that exists only here: it records the calls that
//! change something, with the intent on record at each, and keeps the
//! live definition as a hypervisor would. No `qemu-*` binary runs: the
//! images are raw files and qcow2 headers written here, read by core's
//! native probe.

// A failed unwrap or expect is how these tests report an unexpected error.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use strata_core::chain::{probe_chain, StorageSource};
use strata_core::driver::{DomainState, SnapshotOps};
use strata_core::options::{SnapshotCreateFlags, SnapshotDeleteFlags};
use strata_core::store::Store;
use strata_core::xml::Domain;
use strata_core::Result;
use strata_engine::intent::Intent;
use strata_engine::snapshot::{
    Activity, DiskJob, DiskPlan, LiveChain, NewTops, RecordedChain, SnapshotBackend, SnapshotEngine, StagedLiveChains,
    Switched,
};

/// A 1 MiB qcow2 overlay of `backing` in format `format`, written by core's
/// native writer (what a hypervisor's overlay creation leaves on disk).
fn write_qcow2_overlay(path: &Path, backing: &Path, format: &str) {
    let format = format.parse().expect("a known image format");
    strata_core::image::create_qcow2_overlay(path, backing.to_str().unwrap(), format, 1 << 20).unwrap();
}

/// A running domain as the test backend keeps it: its live definition,
/// the top handle of each disk or filesystem (this hypervisor runs both),
/// and the calls that changed something.
struct TestBackend {
    store: Store,
    live: Mutex<Domain>,
    tops: Mutex<HashMap<String, String>>,
    calls: Mutex<Vec<String>>,
    /// A `<description>` another command gives the persistent definition
    /// while the overlays are made.
    described_meanwhile: Mutex<Option<String>>,
}

impl TestBackend {
    /// Records `call` with the intent on record when it was made.
    fn record(&self, call: String) {
        let intent = match Intent::read(&self.store, "vm").unwrap() {
            None => "no intent".to_string(),
            Some(Intent::Create { files, .. }) => format!("create intent of {} file(s)", files.len()),
            Some(Intent::Revert { .. }) => "revert intent".to_string(),
            Some(Intent::Delete { plans, .. }) => format!(
                "delete intent with plans {:?}",
                plans.iter().map(|p| (p.disk.as_str(), p.method)).collect::<Vec<_>>()
            ),
        };
        self.calls.lock().unwrap().push(format!("{call} [{intent}]"));
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl SnapshotBackend for TestBackend {
    fn store(&self) -> &Store {
        &self.store
    }

    fn activity(&self, _domain: &str) -> Result<Activity> {
        Ok(Activity::Running)
    }

    fn recorded_live_definition(&self, _domain: &str) -> Result<Option<Domain>> {
        Ok(Some(self.live.lock().unwrap().clone()))
    }

    fn record_live_chains(
        &self,
        _domain: &str,
        chains: &[RecordedChain],
        _staged: Option<StagedLiveChains>,
    ) -> Result<()> {
        let mut live = self.live.lock().unwrap();
        for c in chains {
            strata_engine::storage::set_chain(&mut live, &c.disk, &c.chain)?;
            if let Some(top) = &c.top {
                self.tops.lock().unwrap().insert(c.disk.clone(), top.clone());
            }
        }
        drop(live);
        let recorded: Vec<String> =
            chains.iter().map(|c| format!("{}@{}", c.disk, c.top.as_deref().unwrap_or("-"))).collect();
        self.record(format!("record_live_chains {}", recorded.join(",")));
        Ok(())
    }

    async fn running_definition(&self, _domain: &str) -> Result<Domain> {
        Ok(self.live.lock().unwrap().clone())
    }

    async fn live_definition(&self, _domain: &str) -> Result<Domain> {
        Ok(self.live.lock().unwrap().clone())
    }

    async fn live_chains(&self, _domain: &str) -> Result<HashMap<String, LiveChain>> {
        let live = self.live.lock().unwrap().clone();
        let tops = self.tops.lock().unwrap().clone();
        Ok(live
            .storage_devices()?
            .into_iter()
            .filter_map(|d| {
                let live = LiveChain { chain: d.chain()?.clone(), top: tops.get(d.name()).cloned() };
                Some((d.name().to_string(), live))
            })
            .collect())
    }

    async fn guest_running(&self, _domain: &str) -> Result<bool> {
        Ok(true)
    }

    async fn refuse_during_block_job(&self, _domain: &str) -> Result<()> {
        self.record("refuse_during_block_job".into());
        Ok(())
    }

    /// Makes each new overlay as the hypervisor would, on the image the
    /// plan froze.
    async fn ready_snapshot_disks(&self, _domain: &str, plans: &[DiskPlan], name: &str) -> Result<()> {
        let planned: Vec<String> = plans.iter().map(|p| format!("{}:{}", p.target, p.mode)).collect();
        self.record(format!("ready_snapshot_disks {name} {}", planned.join(",")));
        Ok(())
    }

    async fn snapshot_disks(
        &self,
        _domain: &str,
        plans: &[DiskPlan],
        _name: &str,
        created: &[PathBuf],
    ) -> Result<Switched> {
        let mut tops = NewTops::new();
        for p in plans.iter().filter(|p| p.mode == "external") {
            let overlay = p.overlay.as_ref().unwrap();
            assert!(created.contains(overlay));
            write_qcow2_overlay(overlay, &p.image, &p.format);
            tops.insert(p.target.clone(), format!("{}-top", p.target));
        }
        if let Some(text) = self.described_meanwhile.lock().unwrap().take() {
            let xml = self.store.read_domain("vm")?.unwrap();
            let described =
                xml.replacen("<name>vm</name>", &format!("<name>vm</name><description>{text}</description>"), 1);
            assert_ne!(described, xml);
            self.store.write_domain("vm", &described)?;
        }
        let planned: Vec<String> = plans.iter().map(|p| format!("{}:{}", p.target, p.mode)).collect();
        self.record(format!("snapshot_disks {}", planned.join(",")));
        Ok(Switched::unstaged(tops))
    }

    async fn pause_guest(&self, _domain: &str) -> Result<bool> {
        self.record("pause_guest".into());
        Ok(true)
    }

    async fn continue_guest(&self, _domain: &str) -> Result<()> {
        self.record("continue_guest".into());
        Ok(())
    }

    async fn resume(&self, _domain: &str) -> Result<()> {
        self.record("resume".into());
        Ok(())
    }

    async fn start_paused(&self, _domain: &str) -> Result<()> {
        self.record("start_paused".into());
        Ok(())
    }

    async fn stop(&self, _domain: &str) -> Result<()> {
        self.record("stop".into());
        Ok(())
    }

    fn record_reason(&self, _domain: &str, state: DomainState, word: &str) -> Result<()> {
        self.record(format!("record_reason {state:?} {word}"));
        Ok(())
    }

    async fn run_disk_job(&self, _domain: &str, disk: &str, job: DiskJob) -> Result<()> {
        self.record(format!("run_disk_job {disk} {job:?}"));
        Ok(())
    }

    async fn settle_disk_job(&self, _domain: &str, disk: &str) -> Result<()> {
        self.record(format!("settle_disk_job {disk}"));
        Ok(())
    }
}

/// A store with domain `vm` on a raw image, running as the backend has it.
fn running_domain(dir: &Path) -> SnapshotEngine<TestBackend> {
    running_domain_with(dir, "")
}

/// As [`running_domain`], with `devices` (XML) after its disk.
fn running_domain_with(dir: &Path, devices: &str) -> SnapshotEngine<TestBackend> {
    let base = dir.join("base.img");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let xml = format!(
        "<domain type='kvm'><name>vm</name><devices>
           <disk type='file' device='disk'><driver name='qemu' type='raw'/>
             <source file='{}'/><target dev='vda'/></disk>
           {devices}
         </devices></domain>",
        base.display()
    );
    let mut dom = Domain::parse(&xml).unwrap();
    strata_core::define::refresh_chains(&mut dom).unwrap();
    let store = Store::open(dir.join("state")).unwrap();
    store.write_domain("vm", &dom.to_xml()).unwrap();
    SnapshotEngine::new(TestBackend {
        store,
        live: Mutex::new(dom),
        tops: Mutex::new(HashMap::new()),
        calls: Mutex::new(Vec::new()),
        described_meanwhile: Mutex::new(None),
    })
}

fn chain_of(dom: &Domain) -> Vec<PathBuf> {
    device_chain(dom, "vda")
}

/// The main line of the chain of the disk or filesystem `name` names.
fn device_chain(dom: &Domain, name: &str) -> Vec<PathBuf> {
    let chain = strata_engine::storage::chain_of(dom, name).unwrap().unwrap();
    chain.main_line().iter().filter_map(|l| l.source.local_path().map(Path::to_path_buf)).collect()
}

/// `snapshot-create-as vm s1 --disk-only`, which must succeed.
async fn create_disk_only_s1(engine: &SnapshotEngine<TestBackend>) {
    let disk_only = SnapshotCreateFlags { disk_only: true, ..Default::default() };
    let name = engine.snapshot_create("vm", "<domainsnapshot><name>s1</name></domainsnapshot>", disk_only).await;
    assert_eq!(name.unwrap(), "s1");
}

#[tokio::test]
async fn a_live_external_snapshot_is_recorded_after_the_switch_and_deleted_by_an_active_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (base, overlay) = (dir.path().join("base.img"), dir.path().join("base.s1"));
    let engine = running_domain(dir.path());
    let backend = engine.backend();
    let store = &backend.store;

    create_disk_only_s1(&engine).await;
    assert_eq!(
        backend.calls(),
        [
            "refuse_during_block_job [no intent]",
            // Readied with the plans it is then taken with, before the
            // intent is written.
            "ready_snapshot_disks s1 vda:external [no intent]",
            // The intent names the overlay before the hypervisor makes it.
            "snapshot_disks vda:external [create intent of 1 file(s)]",
            "record_live_chains vda@vda-top [create intent of 1 file(s)]",
        ]
    );
    assert_eq!(chain_of(&backend.live.lock().unwrap()), [overlay.clone(), base.clone()]);
    let persistent = strata_engine::definitions::load(store, "vm").unwrap();
    assert_eq!(chain_of(&persistent), [overlay.clone(), base.clone()]);
    let record = strata_engine::records::load(store, "vm", "s1").unwrap();
    assert_eq!(record.state.as_deref(), Some("disk-snapshot"));
    assert_eq!(record.disks[0].source.as_ref().and_then(|s| s.local_path()), Some(overlay.as_path()));
    assert_eq!(strata_engine::records::current(store, "vm").unwrap().as_deref(), Some("s1"));
    assert_eq!(Intent::read(store, "vm").unwrap(), None);

    backend.calls.lock().unwrap().clear();
    let notes = engine.snapshot_delete("vm", "s1", SnapshotDeleteFlags::default()).await.unwrap();
    // The overlay is the frozen image's one child and the active layer:
    // it is committed by an active commit down to layer 1, the plan on
    // record before the job starts.
    assert_eq!(
        backend.calls(),
        [
            "refuse_during_block_job [no intent]",
            "run_disk_job vda ActiveCommit { base: 1 } [delete intent with plans [(\"vda\", Commit)]]",
        ]
    );
    assert_eq!(
        notes,
        [format!(
            "vda: committed {} into {} (method 1: nothing else depends on it) and deleted {}",
            overlay.display(),
            base.display(),
            overlay.display()
        )]
    );
    assert!(!overlay.exists(), "the merged overlay is removed");
    assert!(base.exists());
    assert_eq!(store.list_snapshots("vm").unwrap(), Vec::<String>::new());
    assert_eq!(strata_engine::records::current(store, "vm").unwrap(), None);
    assert_eq!(Intent::read(store, "vm").unwrap(), None);
}

#[tokio::test]
async fn a_definition_changed_while_a_snapshot_is_taken_keeps_the_change_and_gets_the_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let (base, overlay) = (dir.path().join("base.img"), dir.path().join("base.s1"));
    let engine = running_domain(dir.path());
    let backend = engine.backend();
    *backend.described_meanwhile.lock().unwrap() = Some("changed meanwhile".into());

    create_disk_only_s1(&engine).await;
    assert!(backend.described_meanwhile.lock().unwrap().is_none(), "the definition was changed during the snapshot");
    let persistent = strata_engine::definitions::load(&backend.store, "vm").unwrap();
    assert_eq!(persistent.element().child_text("description").as_deref(), Some("changed meanwhile"));
    assert_eq!(chain_of(&persistent), [overlay, base]);
}

#[tokio::test]
async fn a_delete_refused_while_planning_leaves_no_intent_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (base, overlay, later) = (dir.path().join("base.img"), dir.path().join("base.s1"), dir.path().join("base.s2"));
    let engine = running_domain(dir.path());
    let backend = engine.backend();
    let store = &backend.store;
    create_disk_only_s1(&engine).await;
    // Snapshot s2's overlay reads through s1's, and the guest runs on the
    // frozen image alone: s1's overlay was merged behind Strata's back.
    write_qcow2_overlay(&later, &overlay, "qcow2");
    let mut s2 = strata_engine::records::load(store, "vm", "s1").unwrap();
    s2.name = Some("s2".into());
    s2.parent = Some("s1".into());
    s2.disks[0].source = Some(StorageSource::local(later.clone()));
    strata_engine::records::save(store, "vm", &s2).unwrap();
    let base_only = probe_chain(&StorageSource::local(base.clone()), "raw").unwrap();
    backend.live.lock().unwrap().set_disk_chain("vda", &base_only).unwrap();
    backend.calls.lock().unwrap().clear();

    let err = engine.snapshot_delete("vm", "s1", SnapshotDeleteFlags::default()).await.unwrap_err();
    assert!(err.message().contains("is in use but"), "{err}");
    assert!(err.message().contains("was merged behind Strata's back"), "{err}");
    assert_eq!(backend.calls(), ["refuse_during_block_job [no intent]"]);
    assert_eq!(Intent::read(store, "vm").unwrap(), None, "a refusal before any step leaves no intent");
    assert!(overlay.exists() && later.exists());
    assert_eq!(store.list_snapshots("vm").unwrap(), ["s1", "s2"]);
}

/// A creation of snapshot s1 (overlay base.s1) interrupted after its
/// intent was written; `switched`: whether the hypervisor already runs on
/// the overlay.
fn interrupted_creation(dir: &Path, switched: bool) -> SnapshotEngine<TestBackend> {
    let (base, overlay) = (dir.join("base.img"), dir.join("base.s1"));
    let engine = running_domain(dir);
    let backend = engine.backend();
    let mut record = strata_core::xml::SnapshotDef::parse(
        "<domainsnapshot><name>s1</name><state>disk-snapshot</state><disks><disk name='vda' snapshot='external'/></disks></domainsnapshot>",
    )
    .unwrap();
    record.disks[0].source = Some(StorageSource::local(overlay.clone()));
    record.domain = Some(backend.live.lock().unwrap().element().clone());
    write_qcow2_overlay(&overlay, &base, "raw");
    if switched {
        let chain = probe_chain(&StorageSource::local(overlay.clone()), "qcow2").unwrap();
        backend.live.lock().unwrap().set_disk_chain("vda", &chain).unwrap();
        backend.tops.lock().unwrap().insert("vda".into(), "vda-top".into());
    }
    Intent::Create { files: vec![overlay], record: Some(Box::new(record)), no_metadata: false }
        .write(&backend.store, "vm")
        .unwrap();
    engine
}

#[tokio::test]
async fn a_creation_interrupted_after_the_switch_is_finished_by_the_next_call() {
    let dir = tempfile::tempdir().unwrap();
    let engine = interrupted_creation(dir.path(), true);
    let store = &engine.backend().store;
    let listed = engine.snapshot_list("vm").await.unwrap();
    assert_eq!(listed.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["s1"]);
    assert!(listed[0].current);
    // The chain comes from the hypervisor, with its top handle.
    assert_eq!(engine.backend().calls(), ["record_live_chains vda@vda-top [create intent of 1 file(s)]"]);
    let persistent = strata_engine::definitions::load(store, "vm").unwrap();
    assert_eq!(chain_of(&persistent), [dir.path().join("base.s1"), dir.path().join("base.img")]);
    assert_eq!(Intent::read(store, "vm").unwrap(), None);
}

#[tokio::test]
async fn a_creation_interrupted_before_the_switch_is_undone_by_the_next_call() {
    let dir = tempfile::tempdir().unwrap();
    let engine = interrupted_creation(dir.path(), false);
    let store = &engine.backend().store;
    let listed = engine.snapshot_list("vm").await.unwrap();
    assert!(listed.is_empty(), "{listed:?}");
    assert!(!dir.path().join("base.s1").exists(), "the unused overlay is removed");
    assert_eq!(engine.backend().calls(), Vec::<String>::new());
    assert_eq!(chain_of(&strata_engine::definitions::load(store, "vm").unwrap()), [dir.path().join("base.img")]);
    assert_eq!(Intent::read(store, "vm").unwrap(), None);
}

/// A root filesystem on an image is snapshotted, recorded, counted as in
/// use and frozen, and deleted like a disk, named by its target dir.
#[tokio::test]
async fn a_root_filesystem_image_is_snapshotted_and_deleted_with_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.img");
    std::fs::write(&root, vec![0u8; 1 << 20]).unwrap();
    let root_overlay = dir.path().join("root.s1");
    let (base, overlay) = (dir.path().join("base.img"), dir.path().join("base.s1"));
    let root_fs = format!(
        "<filesystem type='file' accessmode='passthrough'><driver type='loop' format='raw'/>
           <source file='{}'/><target dir='/'/></filesystem>
         <filesystem type='mount'><source dir='/srv/data'/><target dir='/data'/></filesystem>",
        root.display()
    );
    let engine = running_domain_with(dir.path(), &root_fs);
    let backend = engine.backend();
    let store = &backend.store;

    create_disk_only_s1(&engine).await;
    assert_eq!(
        backend.calls(),
        [
            "refuse_during_block_job [no intent]",
            "ready_snapshot_disks s1 vda:external,/:external [no intent]",
            "snapshot_disks vda:external,/:external [create intent of 2 file(s)]",
            "record_live_chains vda@vda-top,/@/-top [create intent of 2 file(s)]",
        ]
    );
    let persistent = strata_engine::definitions::load(store, "vm").unwrap();
    assert_eq!(device_chain(&persistent, "/"), [root_overlay.clone(), root.clone()]);
    assert_eq!(device_chain(&persistent, "vda"), [overlay.clone(), base.clone()]);
    let record = strata_engine::records::load(store, "vm", "s1").unwrap();
    let recorded: Vec<&str> = record.disks.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(recorded, ["vda", "/"]);

    let in_use = strata_engine::graph::images_in_use(&persistent).unwrap();
    assert!(in_use.contains(&root) && in_use.contains(&root_overlay), "{in_use:?}");
    let frozen = strata_engine::graph::frozen_images(store, "vm").unwrap();
    assert_eq!(frozen.len(), 1);
    assert!(frozen[0].1.contains(&root), "the snapshot froze the root image: {frozen:?}");

    backend.calls.lock().unwrap().clear();
    engine.snapshot_delete("vm", "s1", SnapshotDeleteFlags::default()).await.unwrap();
    assert_eq!(
        backend.calls(),
        [
            "refuse_during_block_job [no intent]",
            "run_disk_job vda ActiveCommit { base: 1 } [delete intent with plans [(\"vda\", Commit), (\"/\", Commit)]]",
            "run_disk_job / ActiveCommit { base: 1 } [delete intent with plans [(\"vda\", Commit), (\"/\", Commit)]]",
        ]
    );
    assert!(!root_overlay.exists() && !overlay.exists(), "the merged overlays are removed");
    assert_eq!(store.list_snapshots("vm").unwrap(), Vec::<String>::new());
}
