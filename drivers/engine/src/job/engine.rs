//! A driver's [`BlockJobOps`] from the engine: the driver says where a
//! domain's jobs run ([`BlockJobHost`]), the engine does the rest (the
//! refusals, waiting for snapshot operations, the [`run`] functions).

use std::time::Duration;

use async_trait::async_trait;
use strata_core::driver::{BlockJobEnd, BlockJobInfo, BlockJobKind, BlockJobOps, BlockJobState};
use strata_core::options::{BlockCommitOptions, BlockCopyOptions, BlockJobAbortFlags, BlockPullOptions};
use strata_core::store::Store;
use strata_core::{Error, ErrorKind, Result};

use super::record::{ended, JobRecord};
use super::{run, BlockJobBackend, LiveDefinition};
use crate::snapshot::{in_use_definition, settle_operations, DiskJob, SnapshotBackend};
use crate::view::TransparentOver;

/// The job server that serves a domain's disks now, with what its records
/// hold: the jobs (brought forward) and the live definition.
pub struct Served<S> {
    pub server: S,
    pub jobs: Vec<JobRecord>,
    pub live: Box<dyn LiveDefinition>,
}

/// Where a driver's block jobs run: the process serving a domain (its
/// hypervisor, or one started for a job on a domain that is shut off).
/// What a job server does is its [`BlockJobBackend`].
#[async_trait]
pub trait BlockJobHost: Send + Sync {
    type Server: BlockJobBackend;

    /// The store of the domains' definitions and job outcomes.
    fn store(&self) -> &Store;
    /// The job server serving the domain now, its recorded jobs brought
    /// forward; `None` when nothing serves it.
    async fn serving(&self, domain: &str) -> Result<Option<Served<Self::Server>>>;
    /// Starts a job server on the disks of a domain nothing serves, for an
    /// offline job; it quits once its last job has ended.
    async fn start_offline_server(&self, domain: &str) -> Result<Served<Self::Server>>;
    /// After `server` refused a job request: quits it if it runs only for
    /// jobs and has none.
    async fn after_refused_request(&self, domain: &str, server: &Self::Server) -> Result<()>;
    /// Whether `server` went away (its connection closed and its process
    /// exited); if so the domain is settled as no longer served, which
    /// records how its jobs ended.
    async fn server_gone(&self, domain: &str, server: &Self::Server) -> Result<bool>;
}

/// The block-job semantics over a host: a driver's [`BlockJobOps`]. Like
/// the snapshot engine it keeps no state of its own, so a driver may view
/// itself as one with [`BlockJobEngine::over`].
#[repr(transparent)]
pub struct BlockJobEngine<B> {
    host: B,
}

// SAFETY: BlockJobEngine<B> is repr(transparent) over its one field, a B.
unsafe impl<B> TransparentOver for BlockJobEngine<B> {
    type Inner = B;
}

impl<B: BlockJobHost> BlockJobEngine<B> {
    pub fn new(host: B) -> BlockJobEngine<B> {
        BlockJobEngine { host }
    }

    /// The engine over a host borrowed for as long as the view.
    pub fn over(host: &B) -> &BlockJobEngine<B> {
        crate::view::over(host)
    }

    pub fn host(&self) -> &B {
        &self.host
    }

    /// For a new job: the server serving the domain, or one started for an
    /// offline job.
    async fn job_server(&self, domain: &str) -> Result<Served<B::Server>> {
        match self.host.serving(domain).await? {
            Some(served) => Ok(served),
            None => self.host.start_offline_server(domain).await,
        }
    }

    /// The server serving the domain, for a request about its job on `disk`.
    async fn serving_job(&self, domain: &str, disk: &str) -> Result<Served<B::Server>> {
        self.host
            .serving(domain)
            .await?
            .ok_or_else(|| Error::invalid_arg(format!("disk {disk} does not have an active block job")))
    }

    /// A refused request leaves no server that runs for jobs alone.
    async fn after_request<T>(&self, domain: &str, server: &B::Server, started: Result<T>) -> Result<T> {
        if started.is_err() {
            self.host.after_refused_request(domain, server).await?;
        }
        started
    }

    /// Starts a pull without waiting for snapshot operations (for one that
    /// holds the operation lock).
    pub async fn start_pull(&self, domain: &str, disk: &str, opts: &BlockPullOptions) -> Result<()> {
        let served = self.job_server(domain).await?;
        let started = run::pull(&served.server, disk, opts).await;
        self.after_request(domain, &served.server, started).await
    }

    /// Starts a commit without waiting for snapshot operations.
    pub async fn start_commit(&self, domain: &str, disk: &str, opts: &BlockCommitOptions) -> Result<BlockJobKind> {
        let served = self.job_server(domain).await?;
        let started = run::commit(&served.server, disk, opts).await;
        self.after_request(domain, &served.server, started).await
    }

    /// Starts a copy without waiting for snapshot operations.
    pub async fn start_copy(&self, domain: &str, disk: &str, opts: &BlockCopyOptions) -> Result<Vec<String>> {
        let served = self.job_server(domain).await?;
        let started = run::copy(&served.server, disk, opts).await;
        self.after_request(domain, &served.server, started).await
    }

    /// The job on `disk`; `None` when it has none (a domain nothing serves
    /// has none, once the disk is found in its definition).
    pub async fn info(&self, domain: &str, disk: &str) -> Result<Option<BlockJobInfo>> {
        match self.host.serving(domain).await? {
            Some(served) => run::info(&served.server, served.live.definition()?, &served.jobs, disk).await,
            None => {
                crate::definitions::load(self.host.store(), domain)?.find_storage_device(disk)?;
                Ok(None)
            }
        }
    }

    /// Ends the job on `disk` without waiting for snapshot operations.
    pub async fn end_job(&self, domain: &str, disk: &str, flags: BlockJobAbortFlags) -> Result<BlockJobEnd> {
        let served = self.serving_job(domain, disk).await?;
        run::abort(&served.server, &served.jobs, disk, flags.pivot, !flags.no_wait).await
    }

    pub async fn set_speed(&self, domain: &str, disk: &str, bytes_per_sec: u64) -> Result<()> {
        let served = self.serving_job(domain, disk).await?;
        run::set_speed(&served.server, &served.jobs, disk, bytes_per_sec).await
    }

    /// Waits up to `timeout` for the job on `disk` to change state; on a
    /// domain nothing serves (any more), answers how its last job ended.
    pub async fn wait(&self, domain: &str, disk: &str, timeout: Duration) -> Result<BlockJobState> {
        let Some(served) = self.host.serving(domain).await? else {
            return ended(self.host.store(), domain, disk);
        };
        match run::wait(&served.server, disk, timeout).await {
            // The server went away under the wait: the job ended with it.
            Err(e) => match self.host.server_gone(domain, &served.server).await? {
                true => ended(self.host.store(), domain, disk),
                false => Err(e),
            },
            waited => waited,
        }
    }
}

impl<B: BlockJobHost + SnapshotBackend> BlockJobEngine<B> {
    /// Refuses a job on a transient disk; a disk the domain does not have
    /// is left to the job's own lookup to report.
    fn refuse_transient(&self, domain: &str, disk: &str) -> Result<()> {
        match in_use_definition(&self.host, domain)?.find_storage_device(disk) {
            Ok(d) => d.refuse_if_transient("block jobs"),
            Err(_) => Ok(()),
        }
    }

    /// A snapshot delete's job on `disk` ([`SnapshotBackend::run_disk_job`]),
    /// run through the driver's own jobs (in the process serving the
    /// domain, or one started for it while it is shut off) to its end.
    pub async fn run_disk_job(&self, domain: &str, disk: &str, job: DiskJob) -> Result<()> {
        let layer = |i: usize| format!("{disk}[{i}]");
        // A delete commits an overlay into the image its snapshot froze
        // only when no other image reads through that image (the plan
        // checked), so the one snapshot the commit changes is the one
        // being deleted.
        let pivot = match job {
            DiskJob::ActiveCommit { base } => {
                let opts = BlockCommitOptions {
                    active: true,
                    pivot: true,
                    base: Some(layer(base)),
                    allow_snapshot_change: true,
                    ..Default::default()
                };
                self.start_commit(domain, disk, &opts).await?;
                true
            }
            DiskJob::Commit { top, base } => {
                let opts = BlockCommitOptions {
                    top: Some(layer(top)),
                    base: Some(layer(base)),
                    allow_snapshot_change: true,
                    ..Default::default()
                };
                self.start_commit(domain, disk, &opts).await?;
                false
            }
            DiskJob::Pull { into, base } => {
                let opts = BlockPullOptions { base: base.map(layer), top: Some(layer(into)), ..Default::default() };
                self.start_pull(domain, disk, &opts).await?;
                false
            }
        };
        strata_core::crash_point("snapshot-delete:job");
        self.job_to_end(domain, disk, pivot).await
    }

    /// Waits for the end of a pull or commit left running on `disk` by an
    /// interrupted delete, pivoting an active commit once it is ready
    /// ([`SnapshotBackend::settle_disk_job`]).
    pub async fn settle_disk_job(&self, domain: &str, disk: &str) -> Result<()> {
        let Some(info) = self.info(domain, disk).await? else { return Ok(()) };
        if !matches!(info.kind, BlockJobKind::Pull | BlockJobKind::Commit | BlockJobKind::ActiveCommit) {
            return Err(Error::new(
                ErrorKind::BlockCopyActive,
                format!("disk '{disk}' has a block copy in progress; end it before the snapshot delete can finish"),
            ));
        }
        self.job_to_end(domain, disk, true).await
    }

    /// Waits for the end of the job on `disk`, ending it once it is ready
    /// (pivoting when `pivot`).
    async fn job_to_end(&self, domain: &str, disk: &str, pivot: bool) -> Result<()> {
        loop {
            match self.wait(domain, disk, Duration::from_secs(60)).await? {
                BlockJobState::Running(_) => {}
                BlockJobState::Ready(_) => {
                    let end = self.end_job(domain, disk, BlockJobAbortFlags { pivot, no_wait: false }).await?;
                    return job_result(end);
                }
                BlockJobState::Ended { end, .. } => return job_result(end),
            }
        }
    }
}

fn job_result(end: BlockJobEnd) -> Result<()> {
    match end {
        BlockJobEnd::Completed => Ok(()),
        BlockJobEnd::Failed(e) => Err(Error::operation_failed(format!("block job failed: {e}"))),
        other => Err(Error::operation_failed(format!("block job ended as {other:?}"))),
    }
}

/// Starting or ending a job changes a chain, so it waits for a snapshot
/// operation in progress and finishes one a crash interrupted; waiting for
/// a job and reading it do not.
#[async_trait]
impl<B: BlockJobHost + SnapshotBackend> BlockJobOps for BlockJobEngine<B> {
    async fn block_pull(&self, domain: &str, disk: &str, opts: &BlockPullOptions) -> Result<()> {
        self.refuse_transient(domain, disk)?;
        let _operation = settle_operations(&self.host, domain).await?;
        self.start_pull(domain, disk, opts).await
    }

    async fn block_commit(&self, domain: &str, disk: &str, opts: &BlockCommitOptions) -> Result<BlockJobKind> {
        self.refuse_transient(domain, disk)?;
        let _operation = settle_operations(&self.host, domain).await?;
        self.start_commit(domain, disk, opts).await
    }

    async fn block_copy(&self, domain: &str, disk: &str, opts: &BlockCopyOptions) -> Result<Vec<String>> {
        self.refuse_transient(domain, disk)?;
        let _operation = settle_operations(&self.host, domain).await?;
        self.start_copy(domain, disk, opts).await
    }

    async fn block_job_info(&self, domain: &str, disk: &str) -> Result<Option<BlockJobInfo>> {
        self.info(domain, disk).await
    }

    async fn block_job_abort(&self, domain: &str, disk: &str, flags: BlockJobAbortFlags) -> Result<BlockJobEnd> {
        let _operation = settle_operations(&self.host, domain).await?;
        self.end_job(domain, disk, flags).await
    }

    async fn block_job_set_speed(&self, domain: &str, disk: &str, bytes_per_sec: u64) -> Result<()> {
        self.set_speed(domain, disk, bytes_per_sec).await
    }

    async fn block_job_wait(&self, domain: &str, disk: &str, timeout_ms: u64) -> Result<BlockJobState> {
        self.wait(domain, disk, Duration::from_millis(timeout_ms)).await
    }
}
