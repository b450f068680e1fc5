//! Block jobs on a shut-off container's qcow2 filesystems: they run in
//! strata-qemu-block's offline storage daemon, which serves the chains
//! over NBD only (no FUSE export, so every job can write the active layer),
//! recorded in the domain's directory ([`OfflineJobs`], written before the
//! daemon runs) apart from a running container's record. The container
//! cannot start while the daemon runs; the daemon quits once its last job
//! has ended.

use std::path::PathBuf;
use std::time::Duration;

use strata_core::store::{atomic_write, Store};
use strata_core::xml::{Domain, Element, StorageDevice};
use strata_core::{Error, Result};
use strata_engine::job::record::{record_server_exit, JobRecord};
use strata_engine::job::JobTable;
use strata_engine::process::ProcessId;
use strata_qemu_block::offline::{start_daemon, ServerRecord, Verdict};
use strata_qemu_block::runtime::{RuntimePaths, MONITORS};

/// The record's file in the domain's directory.
const RECORD: &str = "offline-jobs.xml";

/// The offline storage daemon of a shut-off container and its jobs.
#[derive(Debug, Clone)]
pub struct OfflineJobs {
    /// The daemon and the `strata` answerable for it while it starts or
    /// has no job.
    pub run: ServerRecord,
    /// The definition the daemon serves; its chains follow the jobs.
    pub domain: Domain,
    pub jobs: Vec<JobRecord>,
    /// For job ids: numbers never used before while the daemon runs.
    pub next_job: u64,
}

impl OfflineJobs {
    pub fn to_xml(&self) -> String {
        let mut root = Element::new("lxcofflinejobs");
        self.run.set_attrs(&mut root);
        let jobs = self.jobs.iter().fold(Element::new("jobs"), |jobs, j| jobs.with_child(j.to_element()));
        root.with_child(jobs.with_attr("next", self.next_job.to_string()))
            .with_child(self.domain.element().clone())
            .to_xml()
    }

    pub fn parse(xml: &str) -> Result<OfflineJobs> {
        let root = Element::parse(xml)?;
        let domain = root
            .child("domain")
            .cloned()
            .ok_or_else(|| Error::internal("the container's offline job record lacks the <domain>"))?;
        let jobs_el = root.child("jobs");
        Ok(OfflineJobs {
            run: ServerRecord::from_attrs(&root)?,
            domain: Domain::from_element(domain)?,
            jobs: jobs_el
                .map(|j| j.children_named("job").map(JobRecord::from_element).collect::<Result<Vec<_>>>())
                .transpose()?
                .unwrap_or_default(),
            next_job: jobs_el.and_then(|j| j.attr("next")).and_then(|n| n.parse().ok()).unwrap_or(1),
        })
    }
}

fn record_path(store: &Store, name: &str) -> Result<PathBuf> {
    Ok(store.domain_dir(name)?.join(RECORD))
}

/// The offline daemon's runtime directory (its monitors and log).
pub fn runtime_paths(store: &Store, name: &str) -> Result<RuntimePaths> {
    let dir = store.domain_dir(name)?.join("jobs-run");
    // sun_path holds 108 bytes including the terminator.
    let longest = RuntimePaths { dir: dir.clone() }.monitor_socket(MONITORS - 1);
    if longest.as_os_str().len() > 107 {
        return Err(Error::config_unsupported(format!(
            "monitor socket path '{}' is longer than a Unix socket allows; use a shorter state root",
            longest.display()
        )));
    }
    Ok(RuntimePaths { dir })
}

/// The record as read now, not reconciled (a reader without the lock).
pub fn recorded(store: &Store, name: &str) -> Result<Option<OfflineJobs>> {
    let path = record_path(store, name)?;
    match std::fs::read_to_string(&path) {
        Ok(xml) => OfflineJobs::parse(&xml).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read", &path, e)),
    }
}

/// Whether a job is recorded on the container's filesystems, running or
/// shut off (as read now, not reconciled: a reader without the lock); an
/// offline daemon's record counts while it is there.
pub fn jobs_recorded(store: &Store, name: &str) -> Result<bool> {
    if let Some(status) = crate::status::running(store, name)? {
        return Ok(!status.jobs.is_empty());
    }
    Ok(recorded(store, name)?.is_some())
}

fn write(store: &Store, name: &str, record: &OfflineJobs) -> Result<()> {
    atomic_write(&record_path(store, name)?, record.to_xml().as_bytes())
}

/// The container's offline daemon, reconciled; the caller holds the
/// domain lock. A daemon that is gone has its running jobs recorded as
/// failed; one whose `strata` died while it was starting or had no job is
/// stopped; either way its record goes (`None`), as it does while another
/// `strata` is still starting it.
pub fn reconcile(store: &Store, name: &str) -> Result<Option<OfflineJobs>> {
    let Some(record) = recorded(store, name)? else { return Ok(None) };
    let process = record.run.process;
    match record.run.verdict(record.jobs.is_empty()) {
        Verdict::Gone => {
            tracing::debug!(domain = name, pid = process.pid, "the offline storage daemon is gone; cleaning up");
            record_server_exit(store, name, &record.jobs, "qemu-storage-daemon", process.pid)?;
            forget(store, name)?;
            Ok(None)
        }
        Verdict::Abandoned => {
            tracing::info!(domain = name, pid = process.pid, "stopping an offline storage daemon whose strata died");
            process.stop(Duration::from_secs(3))?;
            forget(store, name)?;
            Ok(None)
        }
        Verdict::Starting => Ok(None),
        Verdict::Serving => Ok(Some(record)),
    }
}

/// Lets `change` edit the reconciled record's jobs, writing it back if it
/// changed; `None` when no daemon serves the container. `ended` is set
/// when a job just ended: this process then answers for the daemon (it
/// quits it once it has no job). The caller holds the domain lock.
pub fn edit_jobs<T>(
    store: &Store,
    name: &str,
    ended: bool,
    change: impl FnOnce(JobTable<'_>) -> Result<T>,
) -> Result<Option<T>> {
    let Some(mut record) = reconcile(store, name)? else { return Ok(None) };
    let before = record.to_xml();
    if ended {
        record.run.owner = Some(ProcessId::this()?);
    }
    let changed =
        change(JobTable { jobs: &mut record.jobs, live: &mut record.domain, next_number: &mut record.next_job })?;
    if record.to_xml() != before {
        write(store, name, &record)?;
    }
    Ok(Some(changed))
}

/// Removes the record and the daemon's runtime directory.
pub fn forget(store: &Store, name: &str) -> Result<()> {
    let dir = runtime_paths(store, name)?.dir;
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("remove", &dir, e)),
    }
    let path = record_path(store, name)?;
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", &path, e)),
    }
}

/// The container's qcow2 filesystems, which the offline daemon serves.
pub fn qcow2_filesystems(dom: &Domain) -> Result<Vec<StorageDevice>> {
    Ok(dom
        .filesystems()?
        .into_iter()
        .filter(|fs| fs.driver.format.as_deref() == Some("qcow2"))
        .map(StorageDevice::Filesystem)
        .collect())
}

/// Starts the offline daemon serving `devices` of the shut-off container
/// `dom`; the caller holds the domain lock.
pub async fn start(store: &Store, name: &str, dom: &Domain, devices: &[StorageDevice]) -> Result<()> {
    let paths = runtime_paths(store, name)?;
    forget(store, name)?;
    let record = |run: &ServerRecord| {
        write(store, name, &OfflineJobs { run: *run, domain: dom.clone(), jobs: Vec::new(), next_job: 1 })
    };
    if let Err(e) = start_daemon(devices, &paths, record).await {
        forget(store, name)?;
        return Err(e);
    }
    Ok(())
}
