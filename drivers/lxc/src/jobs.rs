//! Block jobs on a running container's qcow2 filesystem: strata-engine's
//! job handling over `strata-qemu-block`'s job server, run by the storage
//! daemon that serves the filesystem, with the records kept in the
//! container's own record ([`ContainerRecords`]).
//!
//! The daemon exports the chain's active layer writable over FUSE, and
//! QEMU 7.2's FUSE export holds the resize permission on that node, which
//! a job writing it (a pull into the active layer, an active commit, a
//! copy) cannot share: those are refused, saying why, before QEMU is
//! asked. A pull into a layer below the active one and an intermediate
//! commit work while the container writes.

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
use strata_qemu_block::runtime::RuntimePaths;
use strata_qmp::QmpClient;

use crate::status::{self, LiveStatus};
use crate::syscall::Linux;
use crate::LxcConnection;

/// A running container's job server: the storage daemon serving its
/// qcow2 filesystem, the records in the container's record.
pub type ContainerJobServer = QemuJobServer<ContainerRecords>;

/// Job records in the running container's record (`status.xml`).
pub struct ContainerRecords;

#[async_trait]
impl JobRecords for ContainerRecords {
    fn recorded_jobs(&self, store: &Store, domain: &str) -> Result<Option<Vec<JobRecord>>> {
        Ok(status::running(store, domain)?.map(|status| status.jobs))
    }

    fn edit_records<T>(
        &self,
        store: &Store,
        domain: &str,
        _ended: Option<(&str, Option<&str>)>,
        change: impl FnOnce(JobTable<'_>) -> Result<T>,
    ) -> Result<Option<T>> {
        let Some(mut status) = status::reconcile(&Linux, store, domain)? else { return Ok(None) };
        let before = status.to_xml();
        let changed =
            change(JobTable { jobs: &mut status.jobs, live: &mut status.domain, next_number: &mut status.next_job })?;
        let after = status.to_xml();
        if after != before {
            store.write_status(domain, &after)?;
        }
        Ok(Some(changed))
    }

    /// The daemon serves the container's filesystem: it runs on without a job.
    async fn quit_if_idle(&self, _store: &Store, _domain: &str, _client: &QmpClient) -> Result<()> {
        Ok(())
    }
}

impl LxcConnection {
    /// The job server of the running container `status` records: the
    /// storage daemon of its one qcow2 filesystem.
    async fn job_server(&self, domain: &str, status: &LiveStatus) -> Result<ContainerJobServer> {
        let served = match status.served.as_slice() {
            [served] => served,
            [] => {
                return Err(refusal(
                    "lxc",
                    &format!(
                        "cannot run block jobs on domain '{domain}': none of its filesystems is a qcow2 chain \
                         (a raw image, a block device, a bind or ram filesystem has no layers to merge)"
                    ),
                ))
            }
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
        Ok(QemuJobServer::new(&self.store, domain, monitor, process, ContainerRecords).over_writable_fuse_exports())
    }
}

/// Block jobs run in the storage daemon serving a running container's
/// qcow2 filesystem; a shut-off container has none serving it.
#[async_trait]
impl BlockJobHost for LxcConnection {
    type Server = ContainerJobServer;

    fn store(&self) -> &Store {
        &self.store
    }

    async fn serving(&self, domain: &str) -> Result<Option<Served<ContainerJobServer>>> {
        definitions::load(&self.store, domain)?;
        let Some(status) = self.reconciled(domain).await?.filter(|s| !s.starting) else { return Ok(None) };
        let server = self.job_server(domain, &status).await?;
        let status = match status.jobs.is_empty() || !run::reconcile_jobs(&server, &status.jobs).await? {
            true => status,
            false => match self.reconciled(domain).await? {
                Some(status) => status,
                None => return Ok(None),
            },
        };
        Ok(Some(Served { server, jobs: status.jobs, live: status.domain }))
    }

    async fn start_offline_server(&self, domain: &str) -> Result<Served<ContainerJobServer>> {
        Err(refusal(
            "lxc",
            &format!(
                "cannot run block jobs on domain '{domain}' while it is shut off: they run in the storage daemon \
                 that serves a running container's qcow2 filesystem"
            ),
        ))
    }

    async fn after_refused_request(&self, _domain: &str, _server: &ContainerJobServer) -> Result<()> {
        Ok(())
    }

    /// A daemon that exited under a job: its jobs ended with it, which
    /// their outcomes say; the container's filesystem went with it.
    async fn server_gone(&self, domain: &str, server: &ContainerJobServer) -> Result<bool> {
        if server.client().is_connected() || !server.process.wait_gone(Duration::from_secs(10)).await {
            return Ok(false);
        }
        let (store, name, pid) = (self.store.clone(), domain.to_string(), server.process.pid);
        blocking(move || {
            let _lock = store.lock_domain(&name)?;
            if let Some(mut status) = status::reconcile(&Linux, &store, &name)? {
                record_server_exit(&store, &name, &status.jobs, "qemu-storage-daemon", pid)?;
                status.jobs.clear();
                store.write_status(&name, &status.to_xml())?;
            }
            Ok(true)
        })
        .await
    }
}
