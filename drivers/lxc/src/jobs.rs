//! Block jobs on a container's qcow2 filesystem: strata-engine's job
//! handling over `strata-qemu-block`'s job server, with the records kept
//! by the driver ([`ContainerRecords`]). A running container's jobs run in
//! the storage daemon that serves the filesystem, recorded in the
//! container's record; a shut-off container's in the offline daemon
//! (`crate::offline`) started for them, recorded in its own record.
//!
//! A running container's daemon exports the chain's active layer writable
//! over FUSE, and QEMU 7.2's FUSE export holds the resize permission on
//! that node, which a job writing it (a pull into the active layer, an
//! active commit, a copy) cannot share: those are refused, saying why,
//! before QEMU is asked. A pull into a layer below the active one and an
//! intermediate commit work while the container writes; every job works
//! on a shut-off container.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use strata_core::capabilities::refusal;
use strata_core::store::Store;
use strata_core::{Error, Result};
use strata_engine::blocking::blocking;
use strata_engine::definitions;
use strata_engine::job::engine::{BlockJobHost, Served};
use strata_engine::job::record::{record_server_exit, JobRecord};
use strata_engine::job::{run, JobTable};
use strata_qemu_block::fuse::recorded_server;
use strata_qemu_block::jobs::{JobRecords, QemuJobServer};
use strata_qemu_block::monitor::acquire;
use strata_qemu_block::offline::quit_daemon;
use strata_qemu_block::runtime::RuntimePaths;
use strata_qmp::QmpClient;

use crate::offline;
use crate::status::{self, LiveStatus};
use crate::syscall::Linux;
use crate::LxcConnection;

/// A running container's job server: the storage daemon serving its
/// qcow2 filesystem, the records in the container's record.
pub type ContainerJobServer = QemuJobServer<ContainerRecords>;

/// Job records in the running container's record (`status.xml`), or
/// while it is shut off in its offline daemon's.
pub struct ContainerRecords;

#[async_trait]
impl JobRecords for ContainerRecords {
    fn recorded_jobs(&self, store: &Store, domain: &str) -> Result<Option<Vec<JobRecord>>> {
        if let Some(status) = status::running(store, domain)? {
            return Ok(Some(status.jobs));
        }
        Ok(offline::reconcile(store, domain)?.map(|record| record.jobs))
    }

    fn edit_records<T>(
        &self,
        store: &Store,
        domain: &str,
        ended: Option<(&str, Option<&str>)>,
        change: impl FnOnce(JobTable<'_>) -> Result<T>,
    ) -> Result<Option<T>> {
        let Some(mut status) = status::reconcile(&Linux, store, domain)? else {
            return offline::edit_jobs(store, domain, ended.is_some(), change);
        };
        let before = status.to_xml();
        let changed =
            change(JobTable { jobs: &mut status.jobs, live: &mut status.domain, next_number: &mut status.next_job })?;
        let after = status.to_xml();
        if after != before {
            store.write_status(domain, &after)?;
        }
        Ok(Some(changed))
    }

    /// A running container's daemon serves its filesystem and runs on
    /// without a job; the offline daemon quits.
    async fn quit_if_idle(&self, store: &Store, domain: &str, client: &QmpClient) -> Result<()> {
        let _lock = strata_engine::blocking::lock_domain(store, domain).await?;
        if let Some(record) = offline::reconcile(store, domain)?.filter(|r| r.jobs.is_empty()) {
            quit_daemon(client, &record.run).await?;
            offline::forget(store, domain)?;
        }
        Ok(())
    }
}

impl LxcConnection {
    /// The job server of the running container `status` records: the
    /// storage daemon of its one qcow2 filesystem.
    async fn job_server(&self, domain: &str, status: &LiveStatus) -> Result<ContainerJobServer> {
        let served = match status.served.as_slice() {
            [served] => served,
            [] => return Err(no_qcow2_filesystem(domain)),
            several => {
                return Err(refusal(
                    "lxc",
                    &format!(
                        "cannot run block jobs on domain '{domain}', whose {} qcow2 filesystems are each served \
                         by a storage daemon of their own",
                        several.len()
                    ),
                ))
            }
        };
        let process = recorded_server(&served.dir)?.ok_or_else(|| {
            Error::operation_failed(format!("no storage daemon is recorded for filesystem '{}'", served.target))
        })?;
        let monitor = Arc::new(acquire(&RuntimePaths { dir: served.dir.clone() }, domain).await?);
        Ok(QemuJobServer::new(&self.store, domain, monitor, process, ContainerRecords)
            .over_writable_fuse_exports(RUNNING_CONTAINER_JOBS))
    }
}

/// What a running container's jobs are, for the refusal of the others.
const RUNNING_CONTAINER_JOBS: &str = "a running container merges only layers below the active one (blockpull \
     --top, blockcommit --top); shut it off to run this job offline";

/// The refusal of jobs on a container without a qcow2 filesystem.
fn no_qcow2_filesystem(domain: &str) -> Error {
    refusal(
        "lxc",
        &format!(
            "cannot run block jobs on domain '{domain}': none of its filesystems is a qcow2 chain \
             (a raw image, a block device, a bind or ram filesystem has no layers to merge)"
        ),
    )
}

/// Block jobs run in the storage daemon serving a running container's
/// qcow2 filesystem, or for a shut-off container in the offline daemon
/// started for them (it quits once its last job has ended).
#[async_trait]
impl BlockJobHost for LxcConnection {
    type Server = ContainerJobServer;

    fn store(&self) -> &Store {
        &self.store
    }

    async fn serving(&self, domain: &str) -> Result<Option<Served<ContainerJobServer>>> {
        definitions::load(&self.store, domain)?;
        if let Some(status) = self.reconciled(domain).await? {
            if status.starting {
                return Ok(None);
            }
            let server = self.job_server(domain, &status).await?;
            let status = match status.jobs.is_empty() || !run::reconcile_jobs(&server, &status.jobs).await? {
                true => status,
                false => match self.reconciled(domain).await? {
                    Some(status) => status,
                    None => return Ok(None),
                },
            };
            return Ok(Some(Served { server, jobs: status.jobs, live: Box::new(status.domain) }));
        }
        let Some(record) = self.offline_record(domain).await? else { return Ok(None) };
        let monitor = Arc::new(acquire(&offline::runtime_paths(&self.store, domain)?, domain).await?);
        let server = QemuJobServer::new(&self.store, domain, monitor, record.run.process, ContainerRecords);
        let record = match record.jobs.is_empty() || !run::reconcile_jobs(&server, &record.jobs).await? {
            true => record,
            false => match self.offline_record(domain).await? {
                Some(record) => record,
                None => return Ok(None),
            },
        };
        Ok(Some(Served { server, jobs: record.jobs, live: Box::new(record.domain) }))
    }

    async fn start_offline_server(&self, domain: &str) -> Result<Served<ContainerJobServer>> {
        {
            let _lock = strata_engine::blocking::lock_domain(&self.store, domain).await?;
            if status::reconcile(&Linux, &self.store, domain)?.is_some() {
                return Err(Error::operation_invalid(format!("domain '{domain}' is starting")));
            }
            if offline::reconcile(&self.store, domain)?.is_none() {
                let dom = definitions::load(&self.store, domain)?;
                let devices = offline::qcow2_filesystems(&dom)?;
                if devices.is_empty() {
                    return Err(no_qcow2_filesystem(domain));
                }
                offline::start(&self.store, domain, &dom, &devices).await?;
            }
        }
        BlockJobHost::serving(self, domain)
            .await?
            .ok_or_else(|| Error::operation_failed(format!("the storage daemon for domain '{domain}' exited")))
    }

    async fn after_refused_request(&self, domain: &str, server: &ContainerJobServer) -> Result<()> {
        ContainerRecords.quit_if_idle(&self.store, domain, server.client()).await
    }

    /// A daemon that exited under a job: its jobs ended with it, which
    /// their outcomes say; a running container's filesystem went with it.
    async fn server_gone(&self, domain: &str, server: &ContainerJobServer) -> Result<bool> {
        if server.client().is_connected() || !server.process.wait_gone(Duration::from_secs(10)).await {
            return Ok(false);
        }
        let (store, name, pid) = (self.store.clone(), domain.to_string(), server.process.pid);
        blocking(move || {
            let _lock = store.lock_domain(&name)?;
            match status::reconcile(&Linux, &store, &name)? {
                Some(mut status) => {
                    record_server_exit(&store, &name, &status.jobs, "qemu-storage-daemon", pid)?;
                    status.jobs.clear();
                    store.write_status(&name, &status.to_xml())?;
                }
                // Reconciling a gone offline daemon records its jobs' ends.
                None => drop(offline::reconcile(&store, &name)?),
            }
            Ok(true)
        })
        .await
    }
}

impl LxcConnection {
    /// The shut-off container's offline daemon, reconciled under the
    /// domain lock.
    async fn offline_record(&self, domain: &str) -> Result<Option<offline::OfflineJobs>> {
        let (store, name) = (self.store.clone(), domain.to_string());
        blocking(move || {
            let _lock = store.lock_domain(&name)?;
            offline::reconcile(&store, &name)
        })
        .await
    }
}
