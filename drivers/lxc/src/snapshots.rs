//! The LXC driver's snapshot backend for strata-engine: snapshots of a
//! container's qcow2 filesystems taken, reverted to and deleted by the
//! engine's offline image work while the container is shut off. What only
//! a running container's storage daemons could do (live snapshots, the
//! commit or pull a delete runs) is refused here, and by the driver's
//! capabilities before any request gets this far. A snapshot of a
//! container with a filesystem that has no qcow2 layer (a raw image, a
//! block device) is refused before the engine plans it: an overlay over
//! one would change what kind of filesystem it is.

use std::collections::HashMap;
use std::path::PathBuf;

use async_trait::async_trait;
use strata_core::capabilities::refusal;
use strata_core::driver::{Connection, DomainState, SnapshotOps, SnapshotSummary};
use strata_core::options::{SnapshotCreateFlags, SnapshotDeleteFlags, SnapshotRevertFlags};
use strata_core::store::Store;
use strata_core::xml::Domain;
use strata_core::{Error, ErrorKind, Result};
use strata_engine::definitions;
use strata_engine::job::engine::BlockJobHost;
use strata_engine::snapshot::{
    not_supported, Activity, DiskJob, DiskPlan, LiveChain, NewTops, RecordedChain, SnapshotBackend, SnapshotEngine,
};

use crate::plan::{Container, Source};
use crate::status::{self, LiveStatus};
use crate::syscall::{self, Linux, Syscall};
use crate::LxcConnection;

/// What a running container's snapshot would need, refused.
const LIVE: &str = "take or change snapshots of a running container (its storage daemons do not run snapshot work yet)";

impl LxcConnection {
    /// The running container's record, reconciled with the kernel.
    fn running_status(&self, domain: &str) -> Result<LiveStatus> {
        status::reconcile(&Linux, &self.store, domain)?
            .filter(|s| !s.starting)
            .ok_or_else(|| Error::operation_invalid("domain is not running"))
    }
}

/// The engine's snapshot commands, with the filesystems that have no
/// qcow2 layer refused first.
#[async_trait]
impl SnapshotOps for LxcConnection {
    async fn snapshot_create(&self, domain: &str, xml: &str, flags: SnapshotCreateFlags) -> Result<String> {
        let container = Container::from_domain(&definitions::load(&self.store, domain)?)?;
        for fs in &container.filesystems {
            let what = match fs.source {
                Source::Device(_) => "a block device",
                Source::LoopImage(_) => "a raw image",
                Source::ServedChain(_) | Source::HostDir(_) | Source::Ram { .. } => continue,
            };
            return Err(refusal(
                "lxc",
                &format!(
                    "cannot take snapshots of filesystem '{}': {what} has no image layer (such as qcow2) to hold one",
                    fs.target
                ),
            ));
        }
        SnapshotEngine::over(self).snapshot_create(domain, xml, flags).await
    }

    async fn snapshot_list(&self, domain: &str) -> Result<Vec<SnapshotSummary>> {
        SnapshotEngine::over(self).snapshot_list(domain).await
    }

    async fn snapshot_xml(&self, domain: &str, snapshot: &str) -> Result<String> {
        SnapshotEngine::over(self).snapshot_xml(domain, snapshot).await
    }

    async fn snapshot_set_current(&self, domain: &str, snapshot: &str) -> Result<()> {
        SnapshotEngine::over(self).snapshot_set_current(domain, snapshot).await
    }

    async fn snapshot_revert(&self, domain: &str, snapshot: &str, flags: SnapshotRevertFlags) -> Result<()> {
        SnapshotEngine::over(self).snapshot_revert(domain, snapshot, flags).await
    }

    async fn snapshot_delete(&self, domain: &str, snapshot: &str, flags: SnapshotDeleteFlags) -> Result<Vec<String>> {
        SnapshotEngine::over(self).snapshot_delete(domain, snapshot, flags).await
    }
}

#[async_trait]
impl SnapshotBackend for LxcConnection {
    fn store(&self) -> &Store {
        &self.store
    }

    fn activity(&self, domain: &str) -> Result<Activity> {
        Ok(match status::reconcile(&Linux, &self.store, domain)? {
            Some(_) => Activity::Running,
            None => Activity::ShutOff,
        })
    }

    fn recorded_live_definition(&self, domain: &str) -> Result<Option<Domain>> {
        Ok(status::reconcile(&Linux, &self.store, domain)?.map(|s| s.domain))
    }

    fn record_live_chains(&self, domain: &str, chains: &[RecordedChain]) -> Result<()> {
        let Some(mut status) = status::reconcile(&Linux, &self.store, domain)? else { return Ok(()) };
        for recorded in chains {
            let address = status.domain.find_storage_device(&recorded.disk)?.address();
            status.domain.set_storage_chain(&address, &recorded.chain)?;
        }
        self.store.write_status(domain, &status.to_xml())
    }

    async fn running_definition(&self, domain: &str) -> Result<Domain> {
        Ok(self.running_status(domain)?.domain)
    }

    /// The chains the record shows: each storage daemon opened the chain
    /// recorded at start, and nothing changes it while the container runs.
    async fn live_definition(&self, domain: &str) -> Result<Domain> {
        Ok(self.running_status(domain)?.domain)
    }

    async fn live_chains(&self, _domain: &str) -> Result<HashMap<String, LiveChain>> {
        Err(not_supported(LIVE))
    }

    async fn guest_running(&self, domain: &str) -> Result<bool> {
        Ok(!syscall::cgroup_frozen(&self.running_status(domain)?.cgroup))
    }

    /// Refuses while a block job runs on a filesystem of the container
    /// (jobs that ended meanwhile are recorded first), as for QEMU.
    async fn refuse_during_block_job(&self, domain: &str) -> Result<()> {
        if status::running(&self.store, domain)?.is_none_or(|s| s.jobs.is_empty()) {
            return Ok(());
        }
        if let Some(served) = BlockJobHost::serving(self, domain).await? {
            if let Some(job) = served.jobs.first() {
                return Err(Error::new(
                    ErrorKind::BlockCopyActive,
                    format!("disk '{}' already in active block job", job.disk),
                ));
            }
        }
        Ok(())
    }

    async fn snapshot_disks(&self, _: &str, _: &[DiskPlan], _: &str, _: &[PathBuf]) -> Result<NewTops> {
        Err(not_supported(LIVE))
    }

    async fn pause_guest(&self, domain: &str) -> Result<bool> {
        let status = self.running_status(domain)?;
        let was_running = !syscall::cgroup_frozen(&status.cgroup);
        if was_running {
            Linux.cgroup_freeze(&status.cgroup, true)?;
        }
        Ok(was_running)
    }

    async fn continue_guest(&self, domain: &str) -> Result<()> {
        Linux.cgroup_freeze(&self.running_status(domain)?.cgroup, false)
    }

    async fn resume(&self, domain: &str) -> Result<()> {
        Connection::resume(self, domain).await
    }

    async fn start_paused(&self, _domain: &str) -> Result<()> {
        Err(not_supported("start a container paused"))
    }

    async fn stop(&self, domain: &str) -> Result<()> {
        match Connection::destroy(self, domain).await {
            // Its init exited by itself since the caller found it running.
            Err(_) if self.activity(domain)? == Activity::ShutOff => Ok(()),
            stopped => stopped,
        }
    }

    /// A container's state reasons are not recorded (it reads as running
    /// or paused from its cgroup).
    fn record_reason(&self, _domain: &str, _state: DomainState, _word: &str) -> Result<()> {
        Ok(())
    }

    async fn run_disk_job(&self, _domain: &str, _disk: &str, _job: DiskJob) -> Result<()> {
        Err(not_supported("run block jobs"))
    }

    async fn settle_disk_job(&self, _domain: &str, _disk: &str) -> Result<()> {
        Err(not_supported("run block jobs"))
    }
}
