//! Block jobs, whatever runs them: the job record and the outcome kept
//! once a job has ended ([`record`]), which layers a job works on
//! ([`layers`]), what a job refuses before it starts ([`refusals`]), what
//! to do about a recorded job given what the hypervisor reports
//! ([`reconcile`]) and what its end changes in the definitions and on disk
//! ([`conclude`]).
//!
//! A driver observes its hypervisor's jobs as [`ObservedJob`]s and acts
//! through a [`BlockJobBackend`]; [`run`] starts jobs and brings recorded
//! ones forward with it. A driver that says where a domain's jobs run
//! ([`engine::BlockJobHost`]) gets its `BlockJobOps` from
//! [`engine::BlockJobEngine`]. Nothing here talks to a hypervisor.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use strata_core::chain::Chain;
use strata_core::driver::BlockJobEnd;
use strata_core::options::BlockCopyOptions;
use strata_core::store::{DomainLock, Store};
use strata_core::xml::Domain;
use strata_core::Result;

pub mod conclude;
pub mod engine;
pub mod layers;
pub mod reconcile;
pub mod record;
pub mod refusals;
pub mod run;

/// A job as the hypervisor reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedJob {
    pub phase: JobPhase,
    /// Why the job failed or was cancelled, once the hypervisor says.
    pub error: Option<String>,
    /// Progress: work done of `total` (units the hypervisor chooses).
    pub done: u64,
    pub total: u64,
}

/// Where a job is in its life, as far as its record cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobPhase {
    /// Working (or about to, or pausing, or aborting): nothing to record.
    Running,
    /// In its synchronised phase: a copy or active commit waiting to be
    /// pivoted or ended.
    Ready,
    /// Done, waiting to be finalized (a pending mirror holds the guest's I/O).
    Pending,
    /// Finalized; its outcome is to be recorded.
    Concluded,
}

/// What the records of a running domain hold about its jobs: the job
/// records, the live definition (a copy's `<mirror>`, the chains) and a
/// counter of numbers never used before on the server (for job ids).
pub struct JobTable<'a> {
    pub jobs: &'a mut Vec<JobRecord>,
    pub live: &'a mut dyn LiveDefinition,
    pub next_number: &'a mut u64,
}

/// A live definition as a host's records keep it. A host may keep it
/// unparsed until a job step reads or changes it: most steps touch only
/// the job records, and a deep chain makes the definition large.
pub trait LiveDefinition: Send + Sync {
    fn definition(&self) -> Result<&Domain>;
    fn definition_mut(&mut self) -> Result<&mut Domain>;
}

impl LiveDefinition for Domain {
    fn definition(&self) -> Result<&Domain> {
        Ok(self)
    }

    fn definition_mut(&mut self) -> Result<&mut Domain> {
        Ok(self)
    }
}

use layers::{CommitLayers, PullLayers};
use record::JobRecord;

/// A copy's destination, as the engine resolved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyTarget {
    pub path: PathBuf,
    /// The image format to write.
    pub format: String,
    /// A block device rather than a file.
    pub is_block: bool,
    /// An existing image to copy into (`--reuse-external`) rather than a
    /// new one.
    pub reuse: bool,
    /// For a shallow copy, the layer of the source that the copy's new
    /// image is to be backed by.
    pub backing: Option<usize>,
}

/// What only the hypervisor can do for the jobs of one domain, through
/// the process serving its disks now; the engine ([`run`]) decides what
/// is done. Where the driver keeps the records is its own business too
/// (beside the process it tracks), reached through [`JobTable`].
#[async_trait]
pub trait BlockJobBackend: Send + Sync {
    /// A disk as the hypervisor has it open: its chain, and whatever the
    /// backend needs to act on its layers.
    type OpenDisk: Send + Sync;

    /// The store of the domain's definitions and job outcomes.
    fn store(&self) -> &Store;
    fn domain(&self) -> &str;

    /// A subscription to the hypervisor's job state changes, taken before
    /// a look so that no change between the two is missed.
    type Changes: Send;

    /// Every job the hypervisor has now, by id.
    async fn observe(&self) -> Result<Vec<(String, ObservedJob)>>;
    fn subscribe(&self) -> Self::Changes;
    /// Waits up to `limit` for a state change of job `id`; false when none
    /// came in time. A subscription that lost changes or its source ends
    /// the wait too: the caller looks again.
    async fn changed(&self, changes: &mut Self::Changes, id: &str, limit: Duration) -> bool;
    /// The job's bandwidth limit in bytes per second (0: none).
    async fn speed(&self, id: &str) -> Result<u64>;
    async fn set_speed(&self, id: &str, bytes_per_sec: u64) -> Result<()>;
    /// Pivots a ready job: the disk switches to the copy or commit base.
    async fn complete(&self, id: &str) -> Result<()>;
    /// Ends a job without a pivot: one in its synchronised phase (`ready`)
    /// finishes consistently, any other is cancelled.
    async fn cancel(&self, id: &str, ready: bool) -> Result<()>;
    /// Waits for a job told to end to get there, finalizing it the moment
    /// it is pending.
    async fn settle(&self, id: &str) -> Result<()>;
    /// Finalizes a pending job and waits until it has concluded.
    async fn finalize(&self, id: &str) -> Result<()>;
    /// Lets go of the concluded job `dismiss` (which the hypervisor keeps
    /// until told), if given, then reads `disk` as the hypervisor has it
    /// open: in that order, since a backend may not be able to show its
    /// graph while a finished job is still around.
    async fn dismiss_then_open(&self, dismiss: Option<&str>, disk: &str) -> Result<Self::OpenDisk>;
    /// The disk as the hypervisor has it open now.
    async fn open_disk(&self, disk: &str) -> Result<Self::OpenDisk>;
    fn chain(disk: &Self::OpenDisk) -> &Chain;

    /// Starts job `id`, a pull into layer `layers.into` of `disk` (numbered
    /// as in its chain, 0 the active image) of what lies above
    /// `layers.base` (everything below, without one); `backing` is the name
    /// to record for the base in the image above it.
    async fn start_pull(
        &self,
        id: &str,
        disk: &Self::OpenDisk,
        layers: &PullLayers,
        backing: Option<String>,
        bandwidth: Option<u64>,
    ) -> Result<()>;
    /// Starts job `id`, a commit of `layers.top` down into `layers.base`
    /// (an active commit when `layers.kind` says so, with no `backing`).
    async fn start_commit(
        &self,
        id: &str,
        disk: &Self::OpenDisk,
        layers: &CommitLayers,
        backing: Option<String>,
        bandwidth: Option<u64>,
    ) -> Result<()>;

    /// A copy's destination as the hypervisor has it open, ready to be
    /// copied into.
    type CopyTarget: Send + Sync;
    /// Opens the destination of a copy of disk `disk_name` (creating the image first unless it is
    /// reused or a block device); nothing else may start on the disk's nodes until the target
    /// is started into or closed.
    async fn open_copy_target(
        &self,
        disk_name: &str,
        disk: &Self::OpenDisk,
        target: &CopyTarget,
    ) -> Result<Self::CopyTarget>;
    /// Starts job `id`, a copy of `disk` into `target` (`--shallow`: its
    /// top layer only), with `opts`' bandwidth, granularity and buffer size.
    async fn start_copy(
        &self,
        id: &str,
        disk: &Self::OpenDisk,
        target: &Self::CopyTarget,
        opts: &BlockCopyOptions,
    ) -> Result<()>;
    /// Closes a target no copy started into.
    async fn close_copy_target(&self, target: Self::CopyTarget);
    /// Cleans up what a job that ended with `end` left in the hypervisor;
    /// `open` is the disk as the job's conclusion read it.
    async fn tidy_after(&self, rec: &JobRecord, end: &BlockJobEnd, open: &Self::OpenDisk) -> Result<()>;
    /// Ends the process that serves the disks if it runs only for jobs
    /// and has none left.
    async fn quit_if_idle(&self) -> Result<()>;

    /// The domain lock, waited for off the async runtime.
    async fn lock(&self) -> Result<DomainLock>;
    /// The job records, read afresh; `None` when nothing serves the
    /// domain. A caller about to change them holds the lock.
    fn recorded_jobs(&self) -> Result<Option<Vec<JobRecord>>>;
    /// Changes the records (the caller holds the lock) and keeps them if
    /// `change` succeeds; `None` when nothing serves the domain. `ended`
    /// names the disk, as now open, whose job's end `change` records.
    fn edit_records<T>(
        &self,
        ended: Option<(&str, &Self::OpenDisk)>,
        change: impl FnOnce(JobTable<'_>) -> Result<T>,
    ) -> Result<Option<T>>;
}

#[cfg(test)]
mod tests;
