//! Snapshots, whatever runs the domain: records in the store (each with
//! the full domain definition of its moment), internal and external disk
//! snapshots, live and offline, revert (external ones by branching a new
//! overlay off the snapshot's images, so nothing another snapshot depends
//! on is written), and delete (commit into the backing file when nothing
//! else depends on it, otherwise pull into the children).
//!
//! Create, revert and delete write an intent record (`intent.rs`) before
//! touching any image; the next snapshot call on the domain finishes or
//! rolls back an operation a crash interrupted: a creation is finished if
//! its overlays entered a chain and undone otherwise, a revert is finished
//! (redone from the start if its new definition was not yet adopted), and
//! a delete resumes the plans it recorded, each step checking whether it
//! is still to do.
//!
//! A driver implements [`SnapshotBackend`] with what only its hypervisor
//! can do; [`SnapshotEngine`] over it is the driver's [`SnapshotOps`].

mod create;
mod delete;
pub mod plan;
mod recover;
mod revert;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use strata_core::chain::Chain;
use strata_core::driver::{DomainState, SnapshotOps, SnapshotSummary};
use strata_core::options::{SnapshotCreateFlags, SnapshotDeleteFlags, SnapshotRevertFlags};
use strata_core::store::{DomainLock, StagedFile, Store};
use strata_core::xml::{Domain, SnapshotDef};
use strata_core::{Error, Result};

use crate::intent::Intent;
use crate::view::TransparentOver;

pub use create::overlaid;
pub use delete::{delete_method, refuse_merged_behind_back};
pub use plan::{default_overlay, plan_disks, DiskPlan};
pub use recover::{creation_recovery, revert_recovery, CreationRecovery, RevertRecovery};

/// What serves a domain's disks now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// Nothing: the domain is shut off.
    ShutOff,
    /// The domain runs; its guest may be running or paused.
    Running,
    /// The domain is shut off but an offline block job's server has its
    /// disks open.
    OfflineJob,
}

/// A disk's chain as the running hypervisor has it open, with the
/// backend's handle of its top layer (QEMU: the root node name).
#[derive(Debug, Clone, PartialEq)]
pub struct LiveChain {
    pub chain: Chain,
    pub top: Option<String>,
}

/// A disk's chain to record in the live state after its overlay changed,
/// with the backend's handle of the new top when it is known.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedChain {
    pub disk: String,
    pub chain: Chain,
    pub top: Option<String>,
}

/// A block job that a snapshot delete runs on one disk, its layers
/// numbered as in the running chain (0 is the active image).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskJob {
    ActiveCommit { base: usize },
    Commit { top: usize, base: usize },
    Pull { into: usize, base: Option<usize> },
}

/// The new top handle of each disk a live snapshot gave an overlay, by
/// disk target.
pub type NewTops = HashMap<String, String>;

/// What a live disk snapshot's switch left: each disk's new top handle,
/// and the live state the backend staged for it while its hypervisor
/// worked, if it did.
#[derive(Debug, Default)]
pub struct Switched {
    pub tops: NewTops,
    pub staged: Option<StagedLiveChains>,
}

impl Switched {
    /// A switch whose live state is written only once it is recorded.
    pub fn unstaged(tops: NewTops) -> Switched {
        Switched { tops, staged: None }
    }
}

/// A backend's live state with a switch's chains recorded, written and
/// synced under a temporary name while its hypervisor switched, so that
/// recording them after the switch is only a rename. It is published only
/// if it records exactly the chains the engine records, over the live
/// state it was made from; otherwise it is dropped (its file removed) and
/// the chains are recorded the usual way.
#[derive(Debug)]
pub struct StagedLiveChains {
    file: StagedFile,
    /// The live state, serialized, that the staged one was made from.
    basis: String,
    chains: Vec<RecordedChain>,
}

impl StagedLiveChains {
    /// `file` holds the live state `basis` with `chains` recorded.
    pub fn new(file: StagedFile, basis: String, chains: Vec<RecordedChain>) -> StagedLiveChains {
        StagedLiveChains { file, basis, chains }
    }

    /// The staged file, if recording `chains` over the live state
    /// `current` (serialized as the basis was) would write what it holds.
    pub fn publishable(self, current: &str, chains: &[RecordedChain]) -> Option<StagedFile> {
        (self.basis == current && self.chains == chains).then_some(self.file)
    }
}

/// An error for what a backend cannot do.
pub fn not_supported(what: &str) -> Error {
    Error::no_support(format!("this driver cannot {what}"))
}

/// What only the hypervisor that runs a domain can do for its snapshots.
/// Everything else (planning, records, intents and recovery, offline image
/// work, the delete plans) is the engine's. The memory and internal
/// snapshot methods have defaults that refuse, for a backend without them.
#[async_trait]
pub trait SnapshotBackend: Send + Sync {
    /// The store the domain's definitions and snapshot records live in.
    fn store(&self) -> &Store;

    /// What serves the domain's disks now; a recorded server found gone is
    /// settled first (like every call does).
    fn activity(&self, domain: &str) -> Result<Activity>;

    /// The definition the live state records (the one the running domain
    /// or an offline job's server was started with, chains as last
    /// recorded); `None` when nothing serves the domain.
    fn recorded_live_definition(&self, domain: &str) -> Result<Option<Domain>>;

    /// Records in the live state each disk's chain (and top handle, when
    /// given) after a switch of overlays; nothing when nothing serves the
    /// domain. `staged`: what [`SnapshotBackend::snapshot_disks`] staged
    /// for the switch, published if it holds this record (see
    /// [`StagedLiveChains`]). The caller holds the domain lock.
    fn record_live_chains(
        &self,
        domain: &str,
        chains: &[RecordedChain],
        staged: Option<StagedLiveChains>,
    ) -> Result<()>;

    /// The running domain's recorded definition, without asking the
    /// hypervisor for its whole block graph (so a snapshot costs the same
    /// at any chain depth); operation-invalid when it does not run.
    async fn running_definition(&self, domain: &str) -> Result<Domain>;

    /// The running domain's definition, each disk's chain as the
    /// hypervisor has it open.
    async fn live_definition(&self, domain: &str) -> Result<Domain>;

    /// The chain the hypervisor has open for each disk, by target.
    async fn live_chains(&self, domain: &str) -> Result<HashMap<String, LiveChain>>;

    /// Whether the running domain's guest runs (rather than being paused).
    async fn guest_running(&self, domain: &str) -> Result<bool>;

    /// Refuses while a block job runs on a disk of the domain.
    async fn refuse_during_block_job(&self, domain: &str) -> Result<()>;

    /// Refuses while another process runs a job of the whole domain (a save
    /// or a migration, which hold the operation lock until they end), where
    /// waiting for the lock would leave the caller hanging for as long.
    fn refuse_during_domain_job(&self, _domain: &str) -> Result<()> {
        Ok(())
    }

    /// Waits for and clears snapshot work that a process which died left
    /// in the running hypervisor.
    async fn settle_snapshot_jobs(&self, _domain: &str) -> Result<()> {
        Ok(())
    }

    /// Called before the intent of a live disk snapshot is written, with
    /// what [`SnapshotBackend::snapshot_disks`] gets next: a backend may
    /// start here what changes nothing yet (such as handing the hypervisor
    /// the commands it will run, to be read meanwhile). Nothing by default.
    async fn ready_snapshot_disks(&self, _domain: &str, _plans: &[DiskPlan], _name: &str) -> Result<()> {
        Ok(())
    }

    /// Takes a live disk snapshot atomically: each external plan's overlay
    /// becomes its disk's top (the files in `created` are made first) and
    /// each internal plan's image gets the snapshot `name`. Returns the
    /// new top handle of each disk that got an overlay, and the live state
    /// recording them if the backend staged it meanwhile.
    async fn snapshot_disks(
        &self,
        domain: &str,
        plans: &[DiskPlan],
        name: &str,
        created: &[PathBuf],
    ) -> Result<Switched>;

    /// [`SnapshotBackend::snapshot_disks`] of external plans with the
    /// guest's memory saved into `file`, of one instant; the guest is left
    /// running when `was_running`, else paused.
    #[allow(clippy::too_many_arguments)]
    async fn snapshot_disks_with_memory(
        &self,
        _domain: &str,
        _plans: &[DiskPlan],
        _name: &str,
        _file: &Path,
        _created: &[PathBuf],
        _was_running: bool,
    ) -> Result<NewTops> {
        Err(not_supported("save memory state"))
    }

    /// Saves the running guest's state and its internal plans' disks as
    /// internal snapshot `name` (a checkpoint).
    async fn save_checkpoint(&self, _domain: &str, _plans: &[DiskPlan], _name: &str) -> Result<()> {
        Err(not_supported("save memory state"))
    }

    /// Loads internal snapshot `name` (guest state and disks) into the
    /// paused guest; `tops` are the disks' top handles, the first holding
    /// the guest state.
    async fn load_checkpoint(&self, _domain: &str, _name: &str, _tops: &[String]) -> Result<()> {
        Err(not_supported("load memory state"))
    }

    /// Removes internal snapshot `name` from `image`, a layer of `disk`'s
    /// running chain.
    async fn delete_internal_live(&self, _domain: &str, _disk: &str, _image: &Path, _name: &str) -> Result<()> {
        Err(not_supported("delete internal snapshots of a running domain"))
    }

    /// Starts the domain from the guest state saved in `file`, paused.
    async fn start_from_memory(&self, _domain: &str, _file: &Path) -> Result<()> {
        Err(not_supported("load memory state"))
    }

    /// Pauses the guest; returns whether it was running.
    async fn pause_guest(&self, domain: &str) -> Result<bool>;

    /// Lets the paused guest run again (no state reason recorded).
    async fn continue_guest(&self, domain: &str) -> Result<()>;

    /// Resumes the guest as a user's resume does.
    async fn resume(&self, domain: &str) -> Result<()>;

    /// Starts the domain paused.
    async fn start_paused(&self, domain: &str) -> Result<()>;

    /// Stops the running domain at once; done too when it has exited by
    /// itself since the caller found it running.
    async fn stop(&self, domain: &str) -> Result<()>;

    /// Records why the running domain is in `state` (libvirt's reason word).
    fn record_reason(&self, domain: &str, state: DomainState, word: &str) -> Result<()>;

    /// Refuses a job a snapshot delete's plan needs on `disk` that the
    /// domain cannot run in its current state, before the plan is
    /// recorded (a refusal after it would leave a delete that every later
    /// command retries).
    fn refuse_delete_job(&self, _domain: &str, _disk: &str, _job: DiskJob) -> Result<()> {
        Ok(())
    }

    /// Runs `job` on `disk` to its end (pivoting an active commit).
    async fn run_disk_job(&self, domain: &str, disk: &str, job: DiskJob) -> Result<()>;

    /// Waits for the end of a pull or commit left running on `disk` by an
    /// interrupted delete, pivoting an active commit once it is ready.
    async fn settle_disk_job(&self, domain: &str, disk: &str) -> Result<()>;
}

/// The snapshot semantics over a backend: a driver's [`SnapshotOps`].
/// It keeps no state of its own (everything is in the store), so a driver
/// may also view itself as one with [`SnapshotEngine::over`].
#[repr(transparent)]
pub struct SnapshotEngine<B> {
    backend: B,
}

// SAFETY: SnapshotEngine<B> is repr(transparent) over its one field, a B.
unsafe impl<B> TransparentOver for SnapshotEngine<B> {
    type Inner = B;
}

impl<B: SnapshotBackend> SnapshotEngine<B> {
    pub fn new(backend: B) -> SnapshotEngine<B> {
        SnapshotEngine { backend }
    }

    /// The engine over a backend borrowed for as long as the view.
    pub fn over(backend: &B) -> &SnapshotEngine<B> {
        crate::view::over(backend)
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn store(&self) -> &Store {
        self.backend.store()
    }

    /// The definition as it is now: live when running, else persistent.
    async fn current_definition(&self, domain: &str) -> Result<Domain> {
        match self.backend.activity(domain)? {
            Activity::Running => self.backend.live_definition(domain).await,
            Activity::OfflineJob => Err(Error::operation_invalid(format!(
                "an offline block job runs on the disks of domain '{domain}'; wait for it to end"
            ))),
            Activity::ShutOff => crate::definitions::load(self.store(), domain),
        }
    }

    fn running(&self, domain: &str) -> Result<bool> {
        Ok(self.backend.activity(domain)? == Activity::Running)
    }

    /// Before a snapshot call that only reads: finishes or undoes a snapshot
    /// operation a crash interrupted, unless that operation is still running
    /// in another process (it holds the operation lock). Like every call, it
    /// first settles the domain's recorded server (one a killed process was
    /// starting is stopped).
    async fn snapshot_recover(&self, domain: &str) -> Result<()> {
        let store = self.store();
        crate::definitions::require_known(store, domain)?;
        self.backend.activity(domain)?;
        if Intent::read(store, domain)?.is_some() {
            let operation = match store.try_lock_domain_operation(domain)? {
                Some(operation) => Some(operation),
                // The lock outlives a killed owner for as long as a helper
                // or held server child it started takes to exit (or another
                // process recovers): worth the wait.
                None if Intent::owner_gone(store, domain)? => {
                    Some(crate::blocking::lock_domain_operation(store, domain).await?)
                }
                None => None,
            };
            match operation {
                // A read still answers when the operation cannot be finished
                // now; the next create, revert or delete tries again and
                // reports why it cannot.
                Some(operation) => self.recover_or_warn(domain, &operation).await,
                None => tracing::debug!(domain, "a snapshot operation is in progress in another process"),
            }
        }
        Ok(())
    }

    /// Before a snapshot call that changes images or records: waits for any
    /// other such operation on the domain, takes the operation lock (held
    /// until the returned guard drops) and finishes or undoes an operation
    /// a crash interrupted.
    async fn snapshot_operation(&self, domain: &str) -> Result<DomainLock> {
        crate::definitions::require_known(self.store(), domain)?;
        self.backend.refuse_during_domain_job(domain)?;
        let operation = crate::blocking::lock_domain_operation(self.store(), domain).await?;
        self.log_recovery(domain, &operation).await?;
        Ok(operation)
    }

    /// A snapshot creation by a caller that already holds the domain's
    /// operation lock (a save taking a disk-set snapshot while its guest
    /// is paused); an interrupted snapshot operation is finished first.
    pub async fn snapshot_create_holding(
        &self,
        domain: &str,
        xml: &str,
        flags: SnapshotCreateFlags,
        operation: &DomainLock,
    ) -> Result<String> {
        self.log_recovery(domain, operation).await?;
        self.create(domain, xml, flags, operation).await
    }

    /// See [`settle_operations`].
    pub async fn settle_operations(&self, domain: &str) -> Result<DomainLock> {
        crate::definitions::require_known(self.store(), domain)?;
        self.backend.refuse_during_domain_job(domain)?;
        let operation = crate::blocking::lock_domain_operation(self.store(), domain).await?;
        self.recover_or_warn(domain, &operation).await;
        Ok(operation)
    }

    /// Tries to finish an interrupted snapshot operation, warning when it
    /// cannot be done now; for callers that go on either way.
    async fn recover_or_warn(&self, domain: &str, operation: &DomainLock) {
        if let Err(e) = self.log_recovery(domain, operation).await {
            tracing::warn!(domain, error = %e.report(), "an interrupted snapshot operation could not be finished");
        }
    }

    async fn log_recovery(&self, domain: &str, operation: &DomainLock) -> Result<()> {
        for note in self.recover_interrupted(domain, operation).await? {
            tracing::info!(domain, "{note}");
        }
        Ok(())
    }

    /// Refuses a revert to, or a delete of, snapshots that cover a disk that
    /// is transient now or was in the snapshot's saved definition: either
    /// would write into images a transient disk reads.
    fn refuse_transient<'a>(&self, domain: &str, snapshots: impl IntoIterator<Item = &'a SnapshotDef>) -> Result<()> {
        let current = in_use_definition(&self.backend, domain)?;
        for def in snapshots {
            let saved = def.domain.clone().map(Domain::from_element).transpose()?;
            for covered in def.disks.iter().filter(|d| d.snapshot.as_deref() != Some("no")) {
                for dom in std::iter::once(&current).chain(saved.as_ref()) {
                    if let Ok(device) = dom.find_storage_device(&covered.name) {
                        device.refuse_if_transient("snapshots")?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The definition the domain's disks are used with now: the live one the
/// backend records while something serves the domain, else the
/// persistent one.
pub fn in_use_definition<B: SnapshotBackend>(backend: &B, domain: &str) -> Result<Domain> {
    match backend.recorded_live_definition(domain)? {
        Some(live) => Ok(live),
        None => crate::definitions::load(backend.store(), domain),
    }
}

/// Before a block job starts or ends: waits for a snapshot operation in
/// progress and tries to finish one a crash interrupted. Unlike a snapshot
/// command it goes on when that cannot be done now, since a job (or its
/// abort) may be what lets the user unblock it. The returned operation
/// lock is held until it drops.
pub async fn settle_operations<B: SnapshotBackend>(backend: &B, domain: &str) -> Result<DomainLock> {
    SnapshotEngine::over(backend).settle_operations(domain).await
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// The run state a revert leaves: paused wins over running, as in virsh.
fn end_state(end_running: bool, end_paused: bool) -> DomainState {
    if end_running && !end_paused {
        DomainState::Running
    } else {
        DomainState::Paused
    }
}

#[async_trait]
impl<B: SnapshotBackend> SnapshotOps for SnapshotEngine<B> {
    async fn snapshot_create(&self, domain: &str, xml: &str, flags: SnapshotCreateFlags) -> Result<String> {
        let operation = self.snapshot_operation(domain).await?;
        self.create(domain, xml, flags, &operation).await
    }

    async fn snapshot_list(&self, domain: &str) -> Result<Vec<SnapshotSummary>> {
        self.snapshot_recover(domain).await?;
        crate::records::summaries(self.store(), domain)
    }

    async fn snapshot_xml(&self, domain: &str, snapshot: &str) -> Result<String> {
        self.snapshot_recover(domain).await?;
        Ok(crate::records::load(self.store(), domain, snapshot)?.to_xml())
    }

    async fn snapshot_set_current(&self, domain: &str, snapshot: &str) -> Result<()> {
        self.snapshot_recover(domain).await?;
        crate::records::load(self.store(), domain, snapshot)?;
        crate::records::set_current(self.store(), domain, Some(snapshot))
    }

    async fn snapshot_revert(&self, domain: &str, snapshot: &str, flags: SnapshotRevertFlags) -> Result<()> {
        let operation = self.snapshot_operation(domain).await?;
        self.revert(domain, snapshot, flags, &operation).await
    }

    async fn snapshot_delete(&self, domain: &str, snapshot: &str, flags: SnapshotDeleteFlags) -> Result<Vec<String>> {
        let operation = self.snapshot_operation(domain).await?;
        self.delete(domain, snapshot, flags, &operation).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_core::chain::StorageSource;

    fn chains(top: &str) -> Vec<RecordedChain> {
        let base = Chain::single(StorageSource::local("/i/base.qcow2".into()), Some("qcow2".into()));
        vec![RecordedChain { disk: "vda".into(), chain: overlaid(&base, top.into()), top: Some("vda-o1-fmt".into()) }]
    }

    #[test]
    fn a_staged_live_state_is_published_only_over_its_basis_with_its_chains() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::internal(e.to_string()))?;
        let store = Store::open(dir.path().to_path_buf())?;
        let stage = || -> Result<StagedLiveChains> {
            let file = store.stage_domain_file("vm", "status.xml", "<status>after</status>")?;
            Ok(StagedLiveChains::new(file, "<status>before</status>".into(), chains("/i/top.s1")))
        };
        let staged_names = || -> Result<usize> {
            let names = strata_core::store::entry_names(&dir.path().join("domains").join("vm"))?;
            Ok(names.iter().filter(|n| n.starts_with(".status.xml.staged.")).count())
        };
        assert!(stage()?.publishable("<status>changed</status>", &chains("/i/top.s1")).is_none());
        assert!(stage()?.publishable("<status>before</status>", &chains("/i/other.s1")).is_none());
        assert_eq!(staged_names()?, 0, "a staged state not published was left behind");

        let file = stage()?.publishable("<status>before</status>", &chains("/i/top.s1"));
        store.publish(file.ok_or_else(|| Error::internal("not publishable over its own basis"))?)?;
        assert_eq!(store.read_status("vm")?.as_deref(), Some("<status>after</status>"));
        assert_eq!(staged_names()?, 0);
        Ok(())
    }
}
