//! The QEMU driver's snapshot backend: what only QEMU can do for a
//! snapshot of a running domain (the live transaction of blockdev-create,
//! blockdev-add and `transaction`, memory saved and loaded by migration
//! through a passed fd, internal snapshots saved, loaded and deleted by
//! snapshot jobs, the commit or pull a delete runs through the driver's
//! block jobs). What a snapshot means, its records, intents and recovery,
//! and the offline image work are `strata_engine::snapshot`'s.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::PoisonError;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use strata_core::driver::{Connection, DomainState, StartFlags};
use strata_core::store::Store;
use strata_core::xml::Domain;
use strata_core::{Error, ErrorKind, Result};
use strata_engine::blocking::blocking;
use strata_engine::job::engine::BlockJobEngine;
use strata_engine::snapshot::{
    overlaid, Activity, DiskJob, DiskPlan, LiveChain, NewTops, RecordedChain, SnapshotBackend, StagedLiveChains,
    Switched,
};
use strata_qemu_block::graph::live_chains;
use strata_qemu_block::jobs::{lock_unattached_nodes, reopen_node, wait_status};
use strata_qemu_block::monitor::qmp_error;
use strata_qemu_block::snapshot::{hold_overlay_additions, new_roots, snapshot_live, ReadiedSnapshot};

use crate::live::{self, LiveStatus};
use crate::QemuConnection;

#[async_trait]
impl SnapshotBackend for QemuConnection {
    fn store(&self) -> &Store {
        &self.store
    }

    fn activity(&self, domain: &str) -> Result<Activity> {
        Ok(match live::reconcile(&self.store, domain)? {
            None => Activity::ShutOff,
            Some(status) if status.is_vm() => Activity::Running,
            Some(_) => Activity::OfflineJob,
        })
    }

    fn recorded_live_definition(&self, domain: &str) -> Result<Option<Domain>> {
        live::reconcile(&self.store, domain)?.map(|status| status.domain.into_inner()).transpose()
    }

    fn record_live_chains(
        &self,
        domain: &str,
        chains: &[RecordedChain],
        staged: Option<StagedLiveChains>,
    ) -> Result<()> {
        let Some(mut status) = live::reconcile(&self.store, domain)? else { return Ok(()) };
        if let Some(file) = staged.and_then(|s| s.publishable(&status.to_xml(), chains)) {
            return self.store.publish(file);
        }
        record_in(&mut status, chains)?;
        self.store.write_status(domain, &status.to_xml())
    }

    /// The status records the running chains and root nodes.
    async fn running_definition(&self, domain: &str) -> Result<Domain> {
        let (status, _) = self.running(domain).await?;
        status.domain.into_inner()
    }

    async fn live_definition(&self, domain: &str) -> Result<Domain> {
        self.live_domain(domain).await
    }

    async fn live_chains(&self, domain: &str) -> Result<HashMap<String, LiveChain>> {
        let (_, monitor) = self.running(domain).await?;
        let chains = live_chains(&monitor.client, domain).await?;
        Ok(chains
            .into_iter()
            .map(|(target, disk)| (target, LiveChain { top: disk.root().map(str::to_string), chain: disk.chain }))
            .collect())
    }

    async fn guest_running(&self, domain: &str) -> Result<bool> {
        let (_, monitor) = self.running(domain).await?;
        let run = monitor.client.query_status().await.map_err(|e| qmp_error(domain, e))?;
        Ok(live::state_of(run.status).0 == DomainState::Running)
    }

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

    fn refuse_during_domain_job(&self, domain: &str) -> Result<()> {
        self.refuse_during_stream(domain)
    }

    async fn settle_snapshot_jobs(&self, domain: &str) -> Result<()> {
        let (_, monitor) = self.running(domain).await?;
        dismiss_snapshot_jobs(&monitor.client, domain).await
    }

    /// Reserves the overlays' node numbers and holds their `blockdev-add`
    /// commands (see [`hold_overlay_additions`]): QEMU reads them while the
    /// engine writes the intent and `snapshot_disks` makes the overlays,
    /// which runs them.
    async fn ready_snapshot_disks(&self, domain: &str, plans: &[DiskPlan], name: &str) -> Result<()> {
        let externals = plans.iter().filter(|p| p.mode == "external").count() as u64;
        if externals == 0 {
            return Ok(());
        }
        let (status, monitor) = self.running(domain).await?;
        let number = {
            let _nodes = lock_unattached_nodes(self.store(), domain)?;
            live::runtime_paths(self.store(), domain)?.reserve_snapshot_numbers(status.next_node, externals)?
        };
        if let Some(held) = hold_overlay_additions(&monitor.client, domain, plans, number).await? {
            let readied = ReadiedSnapshot::new(name, plans, number, held);
            self.readied_snapshots.lock().unwrap_or_else(PoisonError::into_inner).insert(domain.to_string(), readied);
        }
        Ok(())
    }

    async fn snapshot_disks(
        &self,
        domain: &str,
        plans: &[DiskPlan],
        name: &str,
        created: &[PathBuf],
    ) -> Result<Switched> {
        let (status, monitor) = self.running(domain).await?;
        self.create_live(domain, &status, &monitor.client, plans, name, created, true).await
    }

    /// A checkpoint with external memory: the guest is stopped, its disks
    /// switch to new overlays in one transaction, its state migrates to
    /// the file, and it runs again; disks and memory are of one instant.
    #[allow(clippy::too_many_arguments)]
    async fn snapshot_disks_with_memory(
        &self,
        domain: &str,
        plans: &[DiskPlan],
        name: &str,
        file: &Path,
        created: &[PathBuf],
        was_running: bool,
    ) -> Result<NewTops> {
        let (status, monitor) = self.running(domain).await?;
        let client = &monitor.client;
        client.execute("stop", None).await.map_err(|e| qmp_error(domain, e))?;
        let saved = async {
            let switched = self.create_live(domain, &status, client, plans, name, created, false).await?;
            save_memory(client, domain, file).await?;
            Ok(switched.tops)
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

    /// A system checkpoint: VM state and every selected qcow2 disk in one
    /// snapshot-save job (disks with snapshot='no' are left out).
    async fn save_checkpoint(&self, domain: &str, plans: &[DiskPlan], name: &str) -> Result<()> {
        let (status, monitor) = self.running(domain).await?;
        let devices: Vec<String> = plans
            .iter()
            .filter(|p| p.mode == "internal")
            .map(|p| root_of(&status, &p.target))
            .collect::<Result<_>>()?;
        let vmstate = devices.first().ok_or_else(|| Error::config_unsupported("nothing selected for snapshot"))?;
        run_checkpoint_job(&monitor.client, domain, "snapshot-save", name, vmstate, &devices).await
    }

    async fn load_checkpoint(&self, domain: &str, name: &str, tops: &[String]) -> Result<()> {
        let (_, monitor) = self.running(domain).await?;
        let vmstate = tops.first().ok_or_else(|| Error::internal("checkpoint without disks"))?;
        run_checkpoint_job(&monitor.client, domain, "snapshot-load", name, vmstate, tops).await
    }

    async fn delete_internal_live(&self, domain: &str, disk: &str, image: &Path, snap: &str) -> Result<()> {
        let (_, monitor) = self.running(domain).await?;
        let chains = live_chains(&monitor.client, domain).await?;
        let (node, layer) = chains
            .get(disk)
            .and_then(|l| {
                l.chain
                    .layers
                    .iter()
                    .position(|x| x.source.local_path() == Some(image))
                    .map(|i| (l.nodes[i].clone(), i))
            })
            .ok_or_else(|| Error::internal(format!("QEMU has no node for '{}'", image.display())))?;
        if layer != 0 {
            // blockdev-snapshot-delete-internal-sync wants a root node;
            // the snapshot-delete job takes any node, but only a
            // writable one, so the backing layer is reopened for it.
            reopen_node(&monitor.client, domain, &node, false).await?;
            let deleted = run_job(
                &monitor.client,
                domain,
                "snapshot-delete",
                json!({
                    "job-id": "strata-snapshot-delete", "tag": snap, "devices": [node],
                }),
            )
            .await;
            reopen_node(&monitor.client, domain, &node, true).await?;
            return deleted;
        }
        monitor
            .client
            .execute("blockdev-snapshot-delete-internal-sync", Some(json!({"device": node, "name": snap})))
            .await
            .map_err(|e| qmp_error(domain, e))?;
        Ok(())
    }

    /// Starts QEMU on the adopted definition and loads a saved VM state.
    async fn start_from_memory(&self, domain: &str, file: &Path) -> Result<()> {
        {
            let _lock = strata_engine::blocking::lock_domain(self.store(), domain).await?;
            self.spawn_server(domain, live::Server::Vm, crate::StartMode::Incoming).await?;
        }
        let (_, monitor) = self.running(domain).await?;
        let client = &monitor.client;
        let f = std::fs::File::open(file).map_err(|e| Error::io("open", file, e))?;
        crate::memory_stream::migrate_from_fd(client, domain, std::os::fd::AsFd::as_fd(&f)).await
    }

    async fn pause_guest(&self, domain: &str) -> Result<bool> {
        let (_, monitor) = self.running(domain).await?;
        let run = monitor.client.query_status().await.map_err(|e| qmp_error(domain, e))?;
        monitor.client.execute("stop", None).await.map_err(|e| qmp_error(domain, e))?;
        Ok(run.running)
    }

    async fn continue_guest(&self, domain: &str) -> Result<()> {
        let (_, monitor) = self.running(domain).await?;
        monitor.client.execute("cont", None).await.map_err(|e| qmp_error(domain, e))?;
        Ok(())
    }

    async fn resume(&self, domain: &str) -> Result<()> {
        Connection::resume(self, domain).await
    }

    async fn start_paused(&self, domain: &str) -> Result<()> {
        Connection::start(self, domain, StartFlags { paused: true }).await.map(|_| ())
    }

    async fn stop(&self, domain: &str) -> Result<()> {
        match Connection::destroy(self, domain).await {
            // It exited by itself since the caller found it running (it
            // crashed, or a killed operation had told it to stop): stopped.
            Err(_) if self.activity(domain)? == Activity::ShutOff => Ok(()),
            stopped => stopped,
        }
    }

    fn record_reason(&self, domain: &str, state: DomainState, word: &str) -> Result<()> {
        QemuConnection::record_reason(self, domain, state, word)
    }

    async fn run_disk_job(&self, domain: &str, disk: &str, job: DiskJob) -> Result<()> {
        self.jobs().run_disk_job(domain, disk, job).await
    }

    async fn settle_disk_job(&self, domain: &str, disk: &str) -> Result<()> {
        self.jobs().settle_disk_job(domain, disk).await
    }
}

/// The root node the status records for disk `target`.
fn root_of(status: &LiveStatus, target: &str) -> Result<String> {
    status
        .roots
        .get(target)
        .cloned()
        .ok_or_else(|| Error::internal(format!("no root node recorded for disk '{target}'")))
}

impl QemuConnection {
    /// Takes a disk snapshot in the running QEMU (see [`snapshot_live`]),
    /// its new nodes numbered from those reserved in the runtime directory
    /// (see `RuntimePaths::reserve_snapshot_numbers`); returns each disk's
    /// new root node. With `stage`, the status recording them is staged
    /// while QEMU works (see [`StagedLiveChains`]).
    #[allow(clippy::too_many_arguments)]
    async fn create_live(
        &self,
        domain: &str,
        status: &LiveStatus,
        client: &strata_qmp::QmpClient,
        plans: &[DiskPlan],
        name: &str,
        created: &[PathBuf],
        stage: bool,
    ) -> Result<Switched> {
        let externals = plans.iter().filter(|p| p.mode == "external").count() as u64;
        let _nodes = lock_unattached_nodes(self.store(), domain)?;
        let readied = self.readied_snapshots.lock().unwrap_or_else(PoisonError::into_inner).remove(domain);
        let (number, held) = match readied.and_then(|r| r.take_for(name, plans)) {
            Some((number, held)) => (number, Some(held)),
            // The status's counter is the floor: it numbered the nodes of
            // snapshots taken before the runtime directory kept the count.
            None if externals > 0 => (
                live::runtime_paths(self.store(), domain)?.reserve_snapshot_numbers(status.next_node, externals)?,
                None,
            ),
            None => (0, None),
        };
        let switching = snapshot_live(client, domain, plans, name, number, created, |t| root_of(status, t), held);
        if !stage || externals == 0 {
            return switching.await.map(Switched::unstaged);
        }
        // QEMU's part takes 2–3 ms, the status's write and fsync about
        // 0.5 ms: written meanwhile, only its rename is left for after.
        let staging = {
            let (store, domain, status) = (self.store.clone(), domain.to_string(), status.clone());
            let (plans, roots) = (plans.to_vec(), new_roots(plans, number));
            blocking(move || stage_status(&store, &domain, status, &plans, &roots))
        };
        // The switch is polled first: its command goes to QEMU and its
        // overlays' sync (which the switch waits for) gets a thread before
        // the staging does.
        let (tops, staged) = tokio::join!(switching, staging);
        let staged = staged.inspect_err(|e| tracing::debug!(error = %e, "the status is written after the switch")).ok();
        Ok(Switched { tops: tops?, staged })
    }

    /// The block-job engine over this connection, for the jobs a snapshot
    /// delete runs while it holds the operation lock.
    fn jobs(&self) -> &BlockJobEngine<QemuConnection> {
        BlockJobEngine::over(self)
    }
}

/// Waits for the end of any snapshot job (`strata-snapshot-*`) left in QEMU
/// by a process that died, and dismisses it.
async fn dismiss_snapshot_jobs(client: &strata_qmp::QmpClient, domain: &str) -> Result<()> {
    let jobs = client.query_jobs().await.map_err(|e| qmp_error(domain, e))?;
    for job in jobs.iter().filter(|j| j.id.starts_with("strata-snapshot-")) {
        wait_status(
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
    wait_status(
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

/// Runs `command` (snapshot-save or snapshot-load) of checkpoint `tag` on
/// the nodes `devices`, `vmstate` the one holding the VM state.
async fn run_checkpoint_job(
    client: &strata_qmp::QmpClient,
    domain: &str,
    command: &str,
    tag: &str,
    vmstate: &str,
    devices: &[String],
) -> Result<()> {
    let args = json!({"job-id": format!("strata-{command}"), "tag": tag, "vmstate": vmstate, "devices": devices});
    run_job(client, domain, command, args).await
}

/// Migrates the stopped guest's state into `file` through a passed fd.
async fn save_memory(client: &strata_qmp::QmpClient, domain: &str, file: &Path) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(file)
        .map_err(|e| Error::io("create", file, e))?;
    crate::memory_stream::migrate_to_fd(client, domain, std::os::fd::AsFd::as_fd(&f), crate::memory_stream::UNCAPPED)
        .await?;
    f.sync_all().map_err(|e| Error::io("sync", file, e))
}

/// Records each of `chains` in `status`: the disk's chain and, when known,
/// its root node.
fn record_in(status: &mut LiveStatus, chains: &[RecordedChain]) -> Result<()> {
    for recorded in chains {
        if let Some(root) = &recorded.top {
            status.roots.insert(recorded.disk.clone(), root.clone());
        }
        status.domain.get_mut()?.set_disk_chain(&recorded.disk, &recorded.chain)?;
    }
    Ok(())
}

/// Stages the domain's status as it is once the external `plans` have
/// switched: each disk on its overlay over the chain `status` records,
/// with its new root node from `roots`.
fn stage_status(
    store: &Store,
    domain: &str,
    mut status: LiveStatus,
    plans: &[DiskPlan],
    roots: &NewTops,
) -> Result<StagedLiveChains> {
    let basis = status.to_xml();
    let mut chains = Vec::new();
    for plan in plans.iter().filter(|p| p.mode == "external") {
        let overlay = plan.overlay.clone().ok_or_else(|| Error::internal("external plan without overlay"))?;
        let below = status.domain.get()?.find_storage_device(&plan.target)?.chain().cloned();
        let below = below.ok_or_else(|| Error::internal(format!("disk '{}' has no recorded chain", plan.target)))?;
        chains.push(RecordedChain {
            disk: plan.target.clone(),
            chain: overlaid(&below, overlay),
            top: roots.get(&plan.target).cloned(),
        });
    }
    record_in(&mut status, &chains)?;
    let file = store.stage_domain_file(domain, "status.xml", &status.to_xml())?;
    Ok(StagedLiveChains::new(file, basis, chains))
}
