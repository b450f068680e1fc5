//! Block jobs of this driver's domains: the job server is
//! `strata_qemu_block`'s, over the domain's QEMU or storage daemon; the
//! records are kept in the domain's status XML ([`StatusRecords`]), and a
//! storage daemon left without a job is quit here.

use async_trait::async_trait;
use std::sync::Arc;
use strata_core::store::Store;
use strata_core::Result;
use strata_engine::job::record::JobRecord;
use strata_engine::job::{run, JobTable};
use strata_engine::process::ProcessId;
use strata_qemu_block::jobs::JobRecords;
use strata_qemu_block::monitor::Monitor;
use strata_qemu_block::offline::quit_daemon;
use strata_qmp::QmpClient;

use crate::live::{self, LiveStatus};

/// A domain's job server: its QEMU or storage daemon, its records in the
/// status XML.
pub type QemuJobServer = strata_qemu_block::jobs::QemuJobServer<StatusRecords>;

/// The job server of the process `status` records.
pub fn job_server(store: &Store, name: &str, monitor: Arc<Monitor>, status: &LiveStatus) -> QemuJobServer {
    QemuJobServer::new(store, name, monitor, status.run.process, StatusRecords)
}

/// Job records in the domain's status XML.
pub struct StatusRecords;

#[async_trait]
impl JobRecords for StatusRecords {
    fn recorded_jobs(&self, store: &Store, domain: &str) -> Result<Option<Vec<JobRecord>>> {
        Ok(live::reconcile(store, domain)?.map(|status| status.jobs))
    }

    fn edit_records<T>(
        &self,
        store: &Store,
        domain: &str,
        ended: Option<(&str, Option<&str>)>,
        change: impl FnOnce(JobTable<'_>) -> Result<T>,
    ) -> Result<Option<T>> {
        live::edit_locked_status(store, domain, |status| {
            if let Some((disk, root)) = ended {
                if let Some(root) = root {
                    status.roots.insert(disk.to_string(), root.to_string());
                }
                if !status.is_vm() {
                    // Answerable for a daemon left without a job: it quits it.
                    status.run.owner = Some(ProcessId::this()?);
                }
            }
            change(JobTable { jobs: &mut status.jobs, live: &mut status.domain, next_number: &mut status.next_node })
        })
    }

    async fn quit_if_idle(&self, store: &Store, domain: &str, client: &QmpClient) -> Result<()> {
        quit_if_idle_daemon(store, domain, client).await
    }
}

/// Brings every recorded job forward (see [`run::reconcile_jobs`]).
/// Returns the (possibly updated) status; `None` once a storage daemon
/// whose last job ended has quit.
pub async fn reconcile_jobs(
    store: &Store,
    name: &str,
    monitor: &Arc<Monitor>,
    status: LiveStatus,
) -> Result<Option<LiveStatus>> {
    if status.jobs.is_empty() {
        return Ok(Some(status));
    }
    if !run::reconcile_jobs(&job_server(store, name, monitor.clone(), &status), &status.jobs).await? {
        return Ok(Some(status));
    }
    live::reconcile(store, name)
}

/// Quits a storage daemon that has no job (one started for a job whose
/// request was then refused).
pub async fn quit_if_idle_daemon(store: &Store, name: &str, client: &QmpClient) -> Result<()> {
    if let Some(status) = live::reconcile(store, name)? {
        if !status.is_vm() && status.jobs.is_empty() {
            quit_idle_daemon(store, name, client, &status).await?;
        }
    }
    Ok(())
}

/// Ends a storage daemon and removes its status.
async fn quit_idle_daemon(store: &Store, name: &str, client: &QmpClient, status: &LiveStatus) -> Result<()> {
    let _lock = strata_engine::blocking::lock_domain(store, name).await?;
    quit_daemon(client, &status.run).await?;
    live::cleanup(store, name)
}
