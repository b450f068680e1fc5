//! The LXC driver's snapshot backend for strata-engine: snapshots of a
//! container's qcow2 filesystems, taken, reverted to and deleted by the
//! engine's offline image work while the container is shut off, and taken
//! live in the filesystems' storage daemons while it runs: each overlay's
//! header written natively first, then, with the container paused
//! (`crate::pause`: cgroup freeze, `FIFREEZE`), every daemon's new nodes
//! added (`strata-qemu-block`'s `prepare_snapshot_live`), and only then
//! each daemon switched in one `transaction`; the FUSE export follows its
//! node to the new overlay, so the loop device and the mount over it
//! write there from then on. A switch has no undo in a daemon (a commit
//! job cannot run under a writable FUSE export, which holds the resize
//! permission), so whatever can fail is done in every daemon first.
//! The commit or pull a delete runs is refused here, and by the driver's
//! capabilities before any request gets this far. A snapshot of a
//! container with a filesystem that has no qcow2 layer (a raw image, a
//! block device) is refused before the engine plans it: an overlay over
//! one would change what kind of filesystem it is.

use std::collections::HashMap;
use std::path::PathBuf;

use async_trait::async_trait;
use strata_core::capabilities::refusal;
use strata_core::driver::{Connection, DomainState, SnapshotOps, SnapshotSummary, StartFlags};
use strata_core::options::{SnapshotCreateFlags, SnapshotDeleteFlags, SnapshotRevertFlags};
use strata_core::store::Store;
use strata_core::xml::Domain;
use strata_core::{Error, ErrorKind, Result};
use strata_engine::blocking::{blocking, lock_domain};
use strata_engine::definitions;
use strata_engine::image_work::create_overlay;
use strata_engine::job::engine::{BlockJobEngine, BlockJobHost};
use strata_engine::process::{Liveness, ProcessId};
use strata_engine::snapshot::{
    Activity, DiskJob, DiskPlan, LiveChain, NewTops, RecordedChain, SnapshotBackend, SnapshotEngine, StagedLiveChains,
    Switched,
};
use strata_qemu_block::graph::live_chains;
use strata_qemu_block::monitor::{acquire, qmp_error, Monitor};
use strata_qemu_block::nodes::node_prefix;
use strata_qemu_block::runtime::RuntimePaths;
use strata_qemu_block::snapshot::prepare_snapshot_live;

use crate::pause::{pause, SnapshotPause};
use crate::plan::{Container, Source};
use crate::status::{self, LiveStatus, ServedFilesystem};
use crate::syscall::{self, Linux, Syscall};
use crate::LxcConnection;

impl LxcConnection {
    /// The running container's record, reconciled with the kernel.
    fn running_status(&self, domain: &str) -> Result<LiveStatus> {
        status::reconcile(&Linux, &self.store, domain)?
            .filter(|s| !s.starting)
            .ok_or_else(|| Error::operation_invalid("domain is not running"))
    }

    /// A monitor of the storage daemon serving `served`.
    async fn daemon_monitor(&self, domain: &str, served: &ServedFilesystem) -> Result<Monitor> {
        acquire(&RuntimePaths { dir: served.dir.clone() }, domain).await
    }

    /// Changes the running container's record under the domain lock.
    async fn edit_status(&self, domain: &str, edit: impl FnOnce(&mut LiveStatus) + Send + 'static) -> Result<()> {
        let _lock = lock_domain(&self.store, domain).await?;
        let mut status = self.running_status(domain)?;
        edit(&mut status);
        self.store.write_status(domain, &status.to_xml())
    }
}

/// A daemon in the container's cgroup would freeze with it, and the
/// filesystem freeze then wait for it forever.
fn refuse_daemon_in_cgroup(status: &LiveStatus, served: &ServedFilesystem) -> Result<()> {
    let daemon = strata_qemu_block::fuse::recorded_server(&served.dir)?
        .filter(|d| d.liveness() == Liveness::Alive)
        .ok_or_else(|| {
            Error::operation_failed(format!("the storage daemon serving filesystem '{}' is not running", served.target))
        })?;
    let procs = status.cgroup.join("cgroup.procs");
    let members = std::fs::read_to_string(&procs).map_err(|e| Error::io("read", &procs, e))?;
    if members.lines().any(|p| p.trim() == daemon.pid.to_string()) {
        return Err(Error::operation_failed(format!(
            "the storage daemon (pid {}) serving filesystem '{}' is in the container's cgroup; freezing the \
             container would freeze it too",
            daemon.pid, served.target
        )));
    }
    Ok(())
}

/// The node the FUSE export of filesystem `target` serves now: the top of
/// its chain (an export follows its node to a new overlay).
async fn export_node(client: &strata_qmp::QmpClient, domain: &str, target: &str) -> Result<String> {
    let id = node_prefix(target);
    let exports = client.execute("query-block-exports", None).await.map_err(|e| qmp_error(domain, e))?;
    exports
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e.get("id").and_then(|v| v.as_str()) == Some(id.as_str()))
        .and_then(|e| e.get("node-name").and_then(|v| v.as_str()))
        .map(str::to_string)
        .ok_or_else(|| Error::internal(format!("the storage daemon of filesystem '{target}' has no export '{id}'")))
}

fn remove_files(files: &[PathBuf]) {
    for f in files {
        let _ = std::fs::remove_file(f);
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
        if status::reconcile(&Linux, &self.store, domain)?.is_some() {
            return Ok(Activity::Running);
        }
        Ok(match crate::offline::reconcile(&self.store, domain)? {
            Some(_) => Activity::OfflineJob,
            None => Activity::ShutOff,
        })
    }

    fn recorded_live_definition(&self, domain: &str) -> Result<Option<Domain>> {
        Ok(status::reconcile(&Linux, &self.store, domain)?.map(|s| s.domain))
    }

    /// Nothing is staged for a container (its snapshot writes its status
    /// before the switch, to record the pause).
    fn record_live_chains(
        &self,
        domain: &str,
        chains: &[RecordedChain],
        _staged: Option<StagedLiveChains>,
    ) -> Result<()> {
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

    /// The record's definition with each served filesystem's chain as its
    /// storage daemon has it open.
    async fn live_definition(&self, domain: &str) -> Result<Domain> {
        let mut dom = self.running_status(domain)?.domain;
        for (target, live) in self.live_chains(domain).await? {
            let address = dom.find_storage_device(&target)?.address();
            dom.set_storage_chain(&address, &live.chain)?;
        }
        Ok(dom)
    }

    async fn live_chains(&self, domain: &str) -> Result<HashMap<String, LiveChain>> {
        let status = self.running_status(domain)?;
        let mut out = HashMap::new();
        for served in &status.served {
            let monitor = self.daemon_monitor(domain, served).await?;
            for (target, disk) in live_chains(&monitor.client, domain).await? {
                out.insert(target, LiveChain { top: disk.root().map(str::to_string), chain: disk.chain });
            }
        }
        Ok(out)
    }

    async fn guest_running(&self, domain: &str) -> Result<bool> {
        Ok(!syscall::cgroup_frozen(&self.running_status(domain)?.cgroup))
    }

    /// Refuses while a block job runs on a filesystem of the container
    /// (jobs that ended meanwhile are recorded first), as for QEMU.
    async fn refuse_during_block_job(&self, domain: &str) -> Result<()> {
        if !crate::offline::jobs_recorded(&self.store, domain)? {
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

    /// Takes the external and internal `plans` of snapshot `name` in the
    /// storage daemons of the running container: the overlays in
    /// `created` written first, then the container paused while each
    /// daemon switches (see the module's documentation). Returns each
    /// filesystem's new root node.
    async fn snapshot_disks(
        &self,
        domain: &str,
        plans: &[DiskPlan],
        name: &str,
        created: &[PathBuf],
    ) -> Result<Switched> {
        let status = self.running_status(domain)?;
        let init = status.running_init().ok_or_else(|| Error::operation_invalid("domain is not running"))?;
        let mut daemons = Vec::new();
        for served in &status.served {
            let own: Vec<DiskPlan> = plans.iter().filter(|p| p.target == served.target).cloned().collect();
            if own.iter().any(|p| p.mode == "external" || p.mode == "internal") {
                refuse_daemon_in_cgroup(&status, served)?;
                daemons.push((served.clone(), own, self.daemon_monitor(domain, served).await?));
            }
        }
        let externals = plans.iter().filter(|p| p.mode == "external").count() as u64;
        // The headers are written while the container still runs: the
        // pause is only the switch.
        let made = plans
            .iter()
            .filter(|p| p.mode == "external")
            .filter_map(|p| Some((p.clone(), p.overlay.clone().filter(|o| created.contains(o))?)))
            .collect::<Vec<_>>();
        let written = blocking(move || {
            let mut written = Vec::new();
            for (plan, overlay) in &made {
                if let Err(e) = create_overlay(&plan.image, &plan.format, overlay) {
                    remove_files(&written);
                    return Err(e);
                }
                written.push(overlay.clone());
            }
            Ok(written)
        })
        .await?;
        let snapshot_pause = SnapshotPause {
            owner: ProcessId::this()?,
            cgroup: !syscall::cgroup_frozen(&status.cgroup),
            filesystems: daemons.iter().map(|(served, _, _)| served.target.clone()).collect(),
        };
        let first_node = status.next_node;
        let recorded = snapshot_pause.clone();
        // The pause is recorded before anything freezes (the next call
        // thaws it if this process dies), with the node numbers it uses.
        if let Err(e) = self
            .edit_status(domain, move |s| {
                s.next_node = first_node.saturating_add(externals);
                s.pause = Some(recorded);
            })
            .await
        {
            remove_files(&written);
            return Err(e);
        }
        let mut switched = 0;
        let outcome = async {
            let paused = pause(&Linux, init, &status.cgroup, &snapshot_pause)?;
            strata_core::crash_point("lxc-snapshot:frozen");
            // Every daemon's nodes are added before any switches: a
            // failure there (a node name taken, an overlay that cannot be
            // opened) leaves every filesystem as it was.
            let mut prepared = Vec::new();
            let mut number = first_node;
            for (served, own, monitor) in &daemons {
                let ready = async {
                    let root = export_node(&monitor.client, domain, &served.target).await?;
                    prepare_snapshot_live(&monitor.client, domain, own, name, number, &[], |_| Ok(root.clone()), None)
                        .await
                }
                .await;
                match ready {
                    Ok(ready) => prepared.push((monitor, ready)),
                    Err(e) => {
                        for (monitor, ready) in prepared {
                            ready.discard(&monitor.client).await;
                        }
                        return Err(e);
                    }
                }
                number += own.iter().filter(|p| p.mode == "external").count() as u64;
            }
            strata_core::crash_point("snapshot-create:overlays");
            // What is left to fail is a daemon itself (gone, its filesystem
            // with it): the next command finishes the snapshot from where
            // the daemons stand.
            let mut tops = NewTops::new();
            for (monitor, ready) in prepared {
                tops.extend(ready.switch(&monitor.client, domain).await?);
                switched += 1;
            }
            let paused_for = paused.thaw()?;
            tracing::debug!(
                domain,
                snapshot = name,
                pause_ms = paused_for.as_secs_f64() * 1000.0,
                "container paused for its live snapshot (cgroup freeze to thaw)"
            );
            Ok::<NewTops, Error>(tops)
        }
        .await;
        if outcome.is_err() && switched == 0 {
            // No daemon writes into an overlay: they go.
            remove_files(&written);
        }
        self.edit_status(domain, |s| s.pause = None).await?;
        outcome.map(Switched::unstaged)
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

    /// Starts the container frozen before its init runs (see
    /// `crate::container::start`): a revert's restart, resumed unless
    /// `--paused`.
    async fn start_paused(&self, domain: &str) -> Result<()> {
        Connection::start(self, domain, StartFlags { paused: true }).await.map(drop)
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

    /// A running container's storage daemon cannot run a job that writes
    /// its FUSE-exported active layer (see [`crate::jobs`]).
    fn refuse_delete_job(&self, domain: &str, disk: &str, job: DiskJob) -> Result<()> {
        let writes_active = matches!(job, DiskJob::ActiveCommit { .. } | DiskJob::Pull { into: 0, .. });
        if !writes_active || status::running(&self.store, domain)?.is_none() {
            return Ok(());
        }
        let how = match job {
            DiskJob::ActiveCommit { .. } => "an active commit of its overlay",
            _ => "a pull into its active layer",
        };
        Err(refusal(
            "lxc",
            &format!(
                "cannot delete this external snapshot of filesystem '{disk}' of domain '{domain}' while it runs: the \
                 delete needs {how}, and a running container's storage daemon exports the active layer over \
                 FUSE; shut the container off to delete it"
            ),
        ))
    }

    async fn run_disk_job(&self, domain: &str, disk: &str, job: DiskJob) -> Result<()> {
        BlockJobEngine::over(self).run_disk_job(domain, disk, job).await
    }

    async fn settle_disk_job(&self, domain: &str, disk: &str) -> Result<()> {
        BlockJobEngine::over(self).settle_disk_job(domain, disk).await
    }
}
