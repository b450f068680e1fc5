//! What a job's end changes: the disk's chain in the live and persistent
//! definitions, the outcome kept for waiters, the files `--delete` named.

use strata_core::chain::{Chain, StorageSource};
use strata_core::driver::{BlockJobEnd, BlockJobKind};
use strata_core::store::Store;
use strata_core::xml::Domain;
use strata_core::Result;

use super::record::{set_outcome, JobOutcome, JobRecord};

/// Records the end in the live definition and the job list: the disk has
/// `chain` now, a copy's `<mirror>` goes, and so does the record.
pub fn record_in_live(live: &mut Domain, jobs: &mut Vec<JobRecord>, rec: &JobRecord, chain: &Chain) -> Result<()> {
    crate::storage::set_chain(live, &rec.disk, chain)?;
    if rec.kind == BlockJobKind::Copy {
        live.set_storage_mirror(&rec.disk, None)?;
    }
    jobs.retain(|j| j.id != rec.id);
    Ok(())
}

/// As libvirt does: only a persistent disk still on the image the job ran
/// on (`source_before`) takes its new chain; one redefined meanwhile to
/// another image keeps it.
pub fn persistent_takes_chain(persistent: &Domain, disk: &str, source_before: Option<&StorageSource>) -> bool {
    persistent.find_storage_device(disk).is_ok_and(|d| d.source() == source_before)
}

/// Keeps the job's outcome for waiters, then records the disk's new chain
/// in the persistent definition when [`persistent_takes_chain`]. The
/// caller holds the domain lock.
pub fn record_in_store(
    store: &Store,
    name: &str,
    rec: &JobRecord,
    end: &BlockJobEnd,
    source_before: Option<&StorageSource>,
    chain: &Chain,
) -> Result<()> {
    let outcome = JobOutcome { disk: rec.disk.clone(), kind: rec.kind, end: end.clone() };
    set_outcome(store, name, &rec.disk, Some(outcome))?;
    if let Some(xml) = store.read_domain(name)? {
        let mut persistent = Domain::parse(&xml)?;
        if persistent_takes_chain(&persistent, &rec.disk, source_before) {
            crate::storage::set_chain(&mut persistent, &rec.disk, chain)?;
            store.write_domain(name, &persistent.to_xml())?;
        }
    }
    Ok(())
}

/// Deletes the files `blockcommit --delete` named, once the commit has
/// completed; a file that cannot go is only warned about.
pub fn delete_committed(rec: &JobRecord, end: &BlockJobEnd) {
    if *end == BlockJobEnd::Completed {
        for path in &rec.delete {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "could not delete a committed image");
            }
        }
    }
}
