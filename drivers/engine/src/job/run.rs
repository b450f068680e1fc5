//! Block jobs carried out through a [`BlockJobBackend`]: pulls, commits and
//! copies are resolved, checked, recorded and started; recorded jobs are
//! brought forward (a pending job is finalized at once, since a pending
//! mirror holds the guest's I/O; a concluded or vanished one has its end
//! recorded; a ready one is marked), waited for, read, slowed and ended.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use strata_core::chain::{Chain, StorageSource};
use strata_core::define;
use strata_core::driver::{BlockJobEnd, BlockJobInfo, BlockJobKind, BlockJobState};
use strata_core::image;
use strata_core::options::{BlockCommitOptions, BlockCopyOptions, BlockPullOptions};
use strata_core::pool::PoolManager;
use strata_core::xml::{Domain, Element};
use strata_core::{Error, ErrorKind, Result};

use crate::blocking::blocking;

use super::conclude::{delete_committed, record_in_live, record_in_store};
use super::reconcile::{awaits_start, end_of, info_of, info_starting, next_step, Step};
use super::record::{ended, last_outcome, no_job, set_outcome, JobRecord};
use super::refusals::{self, ensure_idle};
use super::{layers, BlockJobBackend, CopyTarget, JobPhase, JobTable, ObservedJob};

fn find<'a>(observed: &'a [(String, ObservedJob)], id: &str) -> Option<&'a ObservedJob> {
    observed.iter().find(|(job, _)| job == id).map(|(_, job)| job)
}

/// Takes each recorded job one step forward; true when any record changed.
pub async fn reconcile_jobs<B: BlockJobBackend>(backend: &B, jobs: &[JobRecord]) -> Result<bool> {
    let observed = backend.observe().await?;
    reconcile_observed(backend, jobs, &observed).await
}

/// [`reconcile_jobs`] from the jobs the hypervisor was just seen to have.
async fn reconcile_observed<B: BlockJobBackend>(
    backend: &B,
    jobs: &[JobRecord],
    observed: &[(String, ObservedJob)],
) -> Result<bool> {
    let mut changed = false;
    for rec in jobs {
        match next_step(rec, find(observed, &rec.id)) {
            Step::Finalize => {
                strata_core::pause_point("job:seen-ended");
                backend.finalize(&rec.id).await?;
                conclude(backend, rec).await?;
                changed = true;
            }
            Step::Conclude => {
                strata_core::pause_point("job:seen-ended");
                conclude(backend, rec).await?;
                changed = true;
            }
            Step::MarkReady => {
                mark_ready(backend, &rec.id).await?;
                changed = true;
            }
            Step::Leave => {}
        }
    }
    Ok(changed)
}

/// Changes the records under the domain lock; `None` when nothing serves
/// the domain.
async fn edit<B: BlockJobBackend, T>(backend: &B, change: impl FnOnce(JobTable<'_>) -> Result<T>) -> Result<Option<T>> {
    let _lock = backend.lock().await?;
    backend.edit_records(None, change)
}

/// Refuses early (before anything is made) when the disk already has a job.
pub fn check_idle<B: BlockJobBackend>(backend: &B, disk: &str) -> Result<()> {
    match backend.recorded_jobs()? {
        Some(jobs) => ensure_idle(&jobs, disk),
        None => Ok(()),
    }
}

/// Starts a job: records it (with a copy's `mirror`), refusing a busy
/// disk, then has `send` start it under the id the record got. The record
/// is forgotten if that fails, and marked started once the hypervisor has
/// the job; until then whoever finds it waits for its starter (this
/// process) or, once that is gone, takes the job for vanished.
pub async fn start_recorded<B: BlockJobBackend, F: Future<Output = Result<()>>>(
    backend: &B,
    rec: JobRecord,
    mirror: Option<Element>,
    send: impl FnOnce(String) -> F,
) -> Result<()> {
    let id = record_job(backend, rec, mirror).await?;
    strata_core::pause_point("job:starting");
    strata_core::crash_point("job:starting");
    if let Err(e) = send(id.clone()).await {
        drop_record(backend, &id).await?;
        return Err(e);
    }
    strata_core::crash_point("job:started");
    edit_record(backend, &id, |r| r.starting = false).await
}

/// The backing string for the image above layer `base` (reading an image
/// header, so off the runtime).
async fn backing_string(chain: &Chain, base: usize, keep_relative: bool) -> Result<Option<String>> {
    let chain = chain.clone();
    blocking(move || layers::backing_string(&chain, base, keep_relative)).await
}

/// Starts a pull on `disk` (`blockpull`).
pub async fn pull<B: BlockJobBackend>(backend: &B, disk: &str, opts: &BlockPullOptions) -> Result<()> {
    opts.validate()?;
    check_idle(backend, disk)?;
    let open = backend.open_disk(disk).await?;
    let layers = layers::pull_layers(disk, B::chain(&open), opts)?;
    let backing = match layers.base {
        Some(base) => backing_string(B::chain(&open), base, opts.keep_relative).await?,
        None => None,
    };
    let rec = JobRecord::new(BlockJobKind::Pull, disk, Vec::new());
    let (open, layers) = (&open, &layers);
    start_recorded(backend, rec, None, |id| async move {
        backend.start_pull(&id, open, layers, backing, opts.bandwidth_bytes).await
    })
    .await
}

/// Starts a commit on `disk` (`blockcommit`); returns whether it is an
/// active commit. A commit into an image a snapshot froze is refused
/// unless asked for, and a `--delete` of an image a snapshot reads always.
pub async fn commit<B: BlockJobBackend>(backend: &B, disk: &str, opts: &BlockCommitOptions) -> Result<BlockJobKind> {
    opts.validate()?;
    check_idle(backend, disk)?;
    let open = backend.open_disk(disk).await?;
    let chain = B::chain(&open);
    let layers = layers::commit_layers(disk, chain, opts)?;
    let kind = layers.kind;
    let active = kind == BlockJobKind::ActiveCommit;
    let backing = if active { None } else { backing_string(chain, layers.base, opts.keep_relative).await? };
    let (store, name) = (backend.store(), backend.domain());
    if !opts.allow_snapshot_change {
        refusals::refuse_changing_snapshots(store, name, chain, layers.top, layers.base, active)?;
    }
    let delete: Vec<PathBuf> = if opts.delete { layers.removed_files(chain) } else { Vec::new() };
    refusals::refuse_deleting_snapshot_images(store, name, &delete)?;
    let rec = JobRecord::new(kind, disk, delete);
    let (open, layers) = (&open, &layers);
    start_recorded(backend, rec, None, |id| async move {
        backend.start_commit(&id, open, layers, backing, opts.bandwidth_bytes).await
    })
    .await?;
    Ok(kind)
}

/// Starts a copy of `disk` (`blockcopy`); returns warnings about the flag
/// combination. The destination is checked (see
/// [`refusals::check_copy_destination`]); its format is the one asked
/// for, else a reused file's (a raw destination is never probed: `--raw`
/// fixes it), else the source's.
pub async fn copy<B: BlockJobBackend>(backend: &B, disk: &str, opts: &BlockCopyOptions) -> Result<Vec<String>> {
    let warnings = opts.validate()?;
    check_idle(backend, disk)?;
    let open = backend.open_disk(disk).await?;
    let chain = B::chain(&open);
    let top = chain.top().ok_or_else(|| Error::internal("empty chain"))?;
    let source_format = top.format.clone().unwrap_or_else(|| "raw".into());
    let source_backing = chain.backing_of(0).first().copied();
    opts.validate_for_source(disk, &source_format, source_backing.is_some())?;
    let dest = PathBuf::from(&opts.dest);
    let refusals::CopyDestination { is_block, .. } =
        refusals::check_copy_destination(backend.store(), backend.domain(), disk, &dest, opts.reuse_external, chain)?;
    let format = match (opts.requested_format(), opts.reuse_external && !is_block) {
        (Some(f), _) => f.to_string(),
        (None, true) => {
            let probed = dest.clone();
            blocking(move || image::detect_format(&probed)).await?.as_str().to_string()
        }
        (None, false) => source_format,
    };
    let target = CopyTarget {
        path: dest,
        format,
        is_block,
        reuse: opts.reuse_external,
        backing: if opts.shallow { source_backing } else { None },
    };
    let opened = backend.open_copy_target(disk, &open, &target).await?;
    let mirror = Element::new("mirror")
        .with_attr("type", if is_block { "block" } else { "file" })
        .with_attr("job", "copy")
        .with_child(Element::new("format").with_attr("type", target.format.clone()))
        .with_child(strata_core::xml::source_element(&StorageSource::local(target.path.clone())));
    let rec = JobRecord::new(BlockJobKind::Copy, disk, Vec::new());
    let (open_ref, opened_ref) = (&open, &opened);
    let started = start_recorded(backend, rec, Some(mirror), |id| async move {
        backend.start_copy(&id, open_ref, opened_ref, opts).await
    })
    .await;
    if let Err(e) = started {
        backend.close_copy_target(opened).await;
        return Err(e);
    }
    Ok(warnings)
}

/// Changes the record of job `id`, if it is still recorded, under the
/// domain lock.
async fn edit_record<B: BlockJobBackend>(backend: &B, id: &str, change: impl FnOnce(&mut JobRecord)) -> Result<()> {
    edit(backend, |table| {
        if let Some(rec) = table.jobs.iter_mut().find(|j| j.id == id) {
            change(rec);
        }
        Ok(())
    })
    .await?;
    Ok(())
}

/// Adds a job record under the domain lock, refusing a busy disk; returns
/// the job id it gave the record.
async fn record_job<B: BlockJobBackend>(backend: &B, mut rec: JobRecord, mirror: Option<Element>) -> Result<String> {
    edit(backend, |table| {
        ensure_idle(table.jobs, &rec.disk)?;
        rec.give_id(*table.next_number)?;
        *table.next_number = table.next_number.saturating_add(1);
        let id = rec.id.clone();
        if let Some(m) = mirror {
            table.live.definition_mut()?.set_storage_mirror(&rec.disk, Some(m))?;
        }
        // The disk's last outcome stays until this job's replaces it: every
        // path that forgets a record writes its outcome, but for a start
        // QEMU refused ([`drop_record`]), which clears it.
        table.jobs.push(rec);
        Ok(id)
    })
    .await?
    .ok_or_else(|| Error::operation_invalid("domain is not running"))
}

/// Forgets the record of a job the hypervisor refused to start, and the
/// outcome of the disk's job before it, which is not this job's.
async fn drop_record<B: BlockJobBackend>(backend: &B, id: &str) -> Result<()> {
    edit(backend, |table| {
        if let Some(rec) = table.jobs.iter().find(|j| j.id == id).cloned() {
            table.jobs.retain(|j| j.id != id);
            set_outcome(backend.store(), backend.domain(), &rec.disk, None)?;
            if rec.kind == BlockJobKind::Copy {
                table.live.definition_mut()?.set_storage_mirror(&rec.disk, None)?;
            }
        }
        Ok(())
    })
    .await?;
    Ok(())
}

/// Records that job `id` reached its synchronised phase (a copy's
/// `<mirror>` says ready too).
pub async fn mark_ready<B: BlockJobBackend>(backend: &B, id: &str) -> Result<()> {
    edit(backend, |table| {
        let Some(rec) = table.jobs.iter_mut().find(|j| j.id == id) else { return Ok(()) };
        rec.ready = true;
        if rec.kind == BlockJobKind::Copy {
            table.live.definition_mut()?.set_mirror_ready(&rec.disk)?;
        }
        Ok(())
    })
    .await?;
    Ok(())
}

/// Records a concluded (or vanished) job: the chain the hypervisor now has
/// goes into the live and persistent definitions, the job is dismissed and
/// its outcome kept, then what it left in the hypervisor is cleaned up and
/// `--delete` files go.
pub async fn conclude<B: BlockJobBackend>(backend: &B, rec: &JobRecord) -> Result<()> {
    let (store, name) = (backend.store(), backend.domain());
    let (end, open) = {
        // Held throughout, so only one process records the job.
        let _lock = backend.lock().await?;
        let Some(jobs) = backend.recorded_jobs()? else { return Ok(()) };
        let Some(fresh) = jobs.into_iter().find(|j| j.id == rec.id) else {
            return Ok(()); // another process recorded it first
        };
        let observed = backend.observe().await?;
        let job = find(&observed, &rec.id);
        if awaits_start(&fresh, job) {
            return Ok(()); // its starter has not sent the command yet
        }
        // The record as it is now: the caller's copy may predate a pivot.
        let end = end_of(job, fresh.pivoting || rec.pivoting, rec.kind);
        let open = backend.dismiss_then_open(job.map(|_| rec.id.as_str()), &rec.disk).await?;
        backend.edit_records(Some((&rec.disk, &open)), |table| {
            let live = table.live.definition_mut()?;
            let device_before = live.find_storage_device(&rec.disk)?;
            // A volume disk still on its volume keeps naming it.
            let chain = match device_before.as_disk() {
                Some(disk) => define::live_chain_as_recorded(disk, B::chain(&open), &PoolManager::new(store.clone())),
                None => B::chain(&open).clone(),
            };
            record_in_live(live, table.jobs, rec, &chain)?;
            record_in_store(store, name, rec, &end, device_before.source(), &chain)
        })?;
        (end, open)
    };
    strata_core::pause_point("job:recorded");
    strata_core::crash_point("job:recorded");
    backend.tidy_after(rec, &end, &open).await?;
    delete_committed(rec, &end);
    backend.quit_if_idle().await
}

/// The job on `disk` and its progress, for `blockjob --info`; `None` when
/// the disk has no job the hypervisor runs. `live` is the live definition
/// and `jobs` the records, as the caller found them.
pub async fn info<B: BlockJobBackend>(
    backend: &B,
    live: &Domain,
    jobs: &[JobRecord],
    disk: &str,
) -> Result<Option<BlockJobInfo>> {
    live.find_storage_device(disk).map_err(|_| Error::invalid_arg(format!("disk '{disk}' not found in domain")))?;
    let Some(rec) = jobs.iter().find(|j| j.disk == disk) else { return Ok(None) };
    let observed = backend.observe().await?;
    let Some(job) = find(&observed, &rec.id) else { return Ok(None) };
    let speed = backend.speed(&rec.id).await?;
    Ok(Some(info_of(rec, job, speed)))
}

pub async fn set_speed<B: BlockJobBackend>(backend: &B, jobs: &[JobRecord], disk: &str, speed: u64) -> Result<()> {
    let rec = jobs.iter().find(|j| j.disk == disk).ok_or_else(|| no_job(disk))?;
    backend.set_speed(&rec.id, speed).await
}

/// Ends the job on `disk`: `pivot` switches to the copy or commit base;
/// otherwise a copy or active commit in its synchronised phase finishes
/// consistently without switching, and anything else is cancelled. With
/// `wait`, the end is recorded before this returns.
pub async fn abort<B: BlockJobBackend>(
    backend: &B,
    jobs: &[JobRecord],
    disk: &str,
    pivot: bool,
    wait: bool,
) -> Result<BlockJobEnd> {
    let rec = jobs.iter().find(|j| j.disk == disk).cloned().ok_or_else(|| no_job(disk))?;
    let observed = backend.observe().await?;
    let job = find(&observed, &rec.id).ok_or_else(|| no_job(disk))?;
    let ready = job.phase == JobPhase::Ready;
    if pivot {
        if !rec.kind.has_ready_phase() || !ready {
            return Err(Error::new(
                ErrorKind::BlockCopyActive,
                format!("block job '{}' not ready for pivot yet", rec.id),
            ));
        }
        edit_record(backend, &rec.id, |r| r.pivoting = true).await?;
        backend.complete(&rec.id).await?;
    } else {
        backend.cancel(&rec.id, ready).await?;
    }
    if !wait {
        return Ok(if pivot { BlockJobEnd::Completed } else { BlockJobEnd::Cancelled });
    }
    backend.settle(&rec.id).await?;
    let mut rec = rec;
    rec.pivoting = pivot;
    conclude(backend, &rec).await?;
    Ok(last_outcome(backend.store(), backend.domain(), disk)?.map(|o| o.end).unwrap_or(BlockJobEnd::Completed))
}

/// The job records with every job brought forward (`None` once nothing
/// serves the domain: a job server whose last job ended has quit), and
/// the jobs the hypervisor was seen to have when that changed no record,
/// which a caller need not ask for again.
async fn brought_forward<B: BlockJobBackend>(backend: &B) -> Result<(Option<Vec<JobRecord>>, Option<Observed>)> {
    let Some(jobs) = backend.recorded_jobs()? else { return Ok((None, None)) };
    if jobs.is_empty() {
        return Ok((Some(jobs), None));
    }
    let observed = backend.observe().await?;
    if reconcile_observed(backend, &jobs, &observed).await? {
        return Ok((backend.recorded_jobs()?, None));
    }
    Ok((Some(jobs), Some(observed)))
}

/// The jobs a hypervisor has, by id.
type Observed = Vec<(String, ObservedJob)>;

/// Waits up to `timeout` for the job on `disk` to change state; finalizes
/// and records it when it ends. Driven by the hypervisor's state changes:
/// a job's end is seen the moment it is reported.
pub async fn wait<B: BlockJobBackend>(backend: &B, disk: &str, timeout: Duration) -> Result<BlockJobState> {
    let mut changes = backend.subscribe();
    let deadline = Instant::now() + timeout;
    loop {
        // Subscribed before looking, so no change between the two is lost.
        let (jobs, observed) = brought_forward(backend).await?;
        let Some(rec) = jobs.and_then(|jobs| jobs.into_iter().find(|j| j.disk == disk)) else {
            return ended(backend.store(), backend.domain(), disk);
        };
        let observed = match observed {
            Some(observed) => observed,
            None => backend.observe().await?,
        };
        let Some(job) = find(&observed, &rec.id) else {
            // Recorded, not yet started: its starter sends it next, or
            // drops the record if the hypervisor refuses (which no change
            // announces), so the wait wakes on the job's first change or
            // looks again shortly.
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(BlockJobState::Running(info_starting(&rec)));
            }
            backend.changed(&mut changes, &rec.id, left.min(STARTING_RECHECK)).await;
            continue;
        };
        if matches!(job.phase, JobPhase::Pending | JobPhase::Concluded) {
            continue; // brought forward on the next turn
        }
        let speed = backend.speed(&rec.id).await?;
        let info = info_of(&rec, job, speed);
        if job.phase == JobPhase::Ready {
            if !rec.ready {
                mark_ready(backend, &rec.id).await?;
            }
            return Ok(BlockJobState::Ready(info));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(BlockJobState::Running(info));
        }
        if !backend.changed(&mut changes, &rec.id, left).await {
            return Ok(BlockJobState::Running(info));
        }
    }
}

/// How often a wait looks again at a job that is recorded but not yet
/// started.
const STARTING_RECHECK: Duration = Duration::from_millis(200);
