//! What to do about a recorded job, given what the hypervisor reports of
//! it (`None`: it has no such job).

use strata_core::driver::{BlockJobEnd, BlockJobInfo, BlockJobKind};

use super::record::JobRecord;
use super::{JobPhase, ObservedJob};

/// The next step for a recorded job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do now.
    Leave,
    /// Finalize it at once (a pending mirror or active commit holds the
    /// guest's I/O), wait for it to conclude, then record its end.
    Finalize,
    /// Record its end.
    Conclude,
    /// Record that it reached its synchronised phase.
    MarkReady,
}

/// Whether the hypervisor lacks the job only because its starter, still
/// alive, has not sent it yet: the job has not vanished.
pub fn awaits_start(rec: &JobRecord, job: Option<&ObservedJob>) -> bool {
    job.is_none() && rec.starting && !rec.start_abandoned()
}

pub fn next_step(rec: &JobRecord, job: Option<&ObservedJob>) -> Step {
    if awaits_start(rec, job) {
        return Step::Leave;
    }
    match job.map(|j| j.phase) {
        Some(JobPhase::Pending) => Step::Finalize,
        Some(JobPhase::Concluded) | None => Step::Conclude,
        Some(JobPhase::Ready) if !rec.ready => Step::MarkReady,
        _ => Step::Leave,
    }
}

/// How a concluded (or vanished) job ended. `pivoting`: a pivot was asked
/// for (read from the record as it is now, since a caller's copy may
/// predate the pivot).
pub fn end_of(job: Option<&ObservedJob>, pivoting: bool, kind: BlockJobKind) -> BlockJobEnd {
    match job {
        None => BlockJobEnd::Failed("the job disappeared from QEMU".into()),
        Some(j) => match (&j.error, pivoting, kind.has_ready_phase()) {
            (Some(e), _, _) if e.contains("canceled") || e.contains("cancelled") => BlockJobEnd::Cancelled,
            (Some(e), _, _) => BlockJobEnd::Failed(e.clone()),
            (None, false, true) => BlockJobEnd::Finished,
            (None, _, _) => BlockJobEnd::Completed,
        },
    }
}

/// A job whose starter has not sent it to the hypervisor yet: no progress.
pub fn info_starting(rec: &JobRecord) -> BlockJobInfo {
    BlockJobInfo { kind: rec.kind, disk: rec.disk.clone(), cur: 0, end: 0, bandwidth_bytes: 0, ready: false }
}

/// A running job's progress, at `speed` bytes per second.
pub fn info_of(rec: &JobRecord, job: &ObservedJob, speed: u64) -> BlockJobInfo {
    BlockJobInfo {
        kind: rec.kind,
        disk: rec.disk.clone(),
        cur: job.done,
        end: job.total,
        bandwidth_bytes: speed,
        ready: rec.ready || job.phase == JobPhase::Ready,
    }
}
