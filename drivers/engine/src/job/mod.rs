//! Block jobs, whatever runs them: the job record and the outcome kept
//! once a job has ended ([`record`]), which layers a job works on
//! ([`layers`]), what a job refuses before it starts ([`refusals`]), what
//! to do about a recorded job given what the hypervisor reports
//! ([`reconcile`]) and what its end changes in the definitions and on disk
//! ([`conclude`]).
//!
//! A driver observes its hypervisor's jobs as [`ObservedJob`]s and runs
//! what these decide; nothing here talks to a hypervisor.

pub mod conclude;
pub mod layers;
pub mod reconcile;
pub mod record;
pub mod refusals;

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

#[cfg(test)]
mod tests;
