//! The job record kept in the live status while a block job runs, and the
//! outcome kept beside it once the job has ended.

use std::path::PathBuf;

use strata_core::driver::{BlockJobEnd, BlockJobKind, BlockJobState};
use strata_core::store::Store;
use strata_core::xml::{device_identifier, device_of_identifier, Element};
use strata_core::{Error, Result};

use crate::process::{Liveness, ProcessId};

/// A block job as recorded in the status XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub id: String,
    pub kind: BlockJobKind,
    pub disk: String,
    /// Files to delete once the job has completed (`blockcommit --delete`).
    pub delete: Vec<PathBuf>,
    /// Set once the job reached its synchronised phase.
    pub ready: bool,
    /// Set when `job-complete` (pivot) was sent.
    pub pivoting: bool,
    /// Recorded but not yet confirmed started by QEMU: another process
    /// seeing no such job in QEMU must wait, not call it vanished, while
    /// the `starter` lives.
    pub starting: bool,
    /// The `strata` process that wrote the record and starts the job.
    pub starter: Option<ProcessId>,
}

impl JobRecord {
    pub fn to_element(&self) -> Element {
        let mut el = Element::new("job")
            .with_attr("id", self.id.clone())
            .with_attr("kind", self.kind.as_str())
            .with_attr("disk", self.disk.clone())
            .with_attr("ready", if self.ready { "yes" } else { "no" })
            .with_attr("pivoting", if self.pivoting { "yes" } else { "no" })
            .with_attr("starting", if self.starting { "yes" } else { "no" });
        if let Some(starter) = self.starter {
            starter.set_attrs(&mut el, "starter");
        }
        for p in &self.delete {
            el = el.with_child(Element::new("delete").with_attr("file", p.to_string_lossy()));
        }
        el
    }

    pub fn from_element(el: &Element) -> Result<JobRecord> {
        let need =
            |a: &str| el.attr(a).map(str::to_string).ok_or_else(|| Error::internal(format!("job record lacks '{a}'")));
        let kind = need("kind")?;
        Ok(JobRecord {
            id: need("id")?,
            kind: BlockJobKind::parse(&kind)
                .ok_or_else(|| Error::internal(format!("job record has unknown kind '{kind}'")))?,
            disk: need("disk")?,
            delete: el.children_named("delete").filter_map(|d| d.attr("file").map(PathBuf::from)).collect(),
            ready: el.attr("ready") == Some("yes"),
            pivoting: el.attr("pivoting") == Some("yes"),
            starting: el.attr("starting") == Some("yes"),
            starter: ProcessId::from_attrs(el, "starter"),
        })
    }

    /// A record of a job about to start; [`JobRecord::give_id`] names it
    /// and its starter when it is written.
    pub fn new(kind: BlockJobKind, disk: &str, delete: Vec<PathBuf>) -> JobRecord {
        JobRecord {
            id: String::new(),
            kind,
            disk: disk.to_string(),
            delete,
            ready: false,
            pivoting: false,
            starting: true,
            starter: None,
        }
    }

    /// Names the job after its kind, disk and `number` (never used before
    /// on this server), with this process as its starter.
    pub fn give_id(&mut self, number: u64) -> Result<()> {
        self.id = job_id(self.kind, &self.disk, number);
        self.starter = Some(ProcessId::this()?);
        Ok(())
    }

    /// A record whose starter died before it knew that QEMU had the job.
    pub fn start_abandoned(&self) -> bool {
        self.starting && self.starter.is_none_or(|s| s.liveness() == Liveness::Gone)
    }
}

/// A job id never used before in this QEMU: a process that read an older
/// record must not take a later job on the same disk for the one it read.
/// The disk is named by its identifier (a filesystem `/` as `fs.`): job ids
/// hold only letters, digits, `-`, `.` and `_`.
fn job_id(kind: BlockJobKind, disk: &str, number: u64) -> String {
    format!("strata-{}-{}-{number}", kind.as_str(), device_identifier(disk))
}

/// The kind and disk of a job `job_id` named; None for another id.
pub fn job_of_id(id: &str) -> Option<(BlockJobKind, String)> {
    let rest = id.strip_prefix("strata-")?;
    let kind = [BlockJobKind::ActiveCommit, BlockJobKind::Pull, BlockJobKind::Commit, BlockJobKind::Copy]
        .into_iter()
        .find(|k| rest.starts_with(&format!("{}-", k.as_str())))?;
    let (disk, number) = rest[kind.as_str().len() + 1..].rsplit_once('-')?;
    number.parse::<u64>().ok()?;
    Some((kind, device_of_identifier(disk)))
}

/// How the last job on a disk ended, kept so a waiter that was not the one
/// to record the end can still report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    pub disk: String,
    pub kind: BlockJobKind,
    pub end: BlockJobEnd,
}

impl JobOutcome {
    pub fn to_element(&self) -> Element {
        let (word, error) = match &self.end {
            BlockJobEnd::Completed => ("completed", None),
            BlockJobEnd::Finished => ("finished", None),
            BlockJobEnd::Cancelled => ("cancelled", None),
            BlockJobEnd::Failed(e) => ("failed", Some(e.clone())),
        };
        let mut el = Element::new("outcome")
            .with_attr("disk", self.disk.clone())
            .with_attr("kind", self.kind.as_str())
            .with_attr("end", word);
        if let Some(e) = error {
            el.set_attr("error", e);
        }
        el
    }

    pub fn from_element(el: &Element) -> Option<JobOutcome> {
        let end = match el.attr("end")? {
            "completed" => BlockJobEnd::Completed,
            "finished" => BlockJobEnd::Finished,
            "cancelled" => BlockJobEnd::Cancelled,
            _ => BlockJobEnd::Failed(el.attr("error").unwrap_or("failed").to_string()),
        };
        Some(JobOutcome { disk: el.attr("disk")?.to_string(), kind: BlockJobKind::parse(el.attr("kind")?)?, end })
    }
}

/// Outcomes live beside the status XML, so they outlive the process that
/// ran the job (a storage daemon quits when its last job is recorded).
const OUTCOMES_FILE: &str = "job-outcomes.xml";

fn read_outcomes(store: &Store, name: &str) -> Result<Vec<JobOutcome>> {
    let Some(xml) = store.read_domain_file(name, OUTCOMES_FILE)? else { return Ok(Vec::new()) };
    let root = Element::parse(&xml)?;
    Ok(root.children_named("outcome").filter_map(JobOutcome::from_element).collect())
}

/// Replaces the disk's outcome (`None` clears it). The caller holds the lock.
pub fn set_outcome(store: &Store, name: &str, disk: &str, outcome: Option<JobOutcome>) -> Result<()> {
    let mut all = read_outcomes(store, name)?;
    all.retain(|o| o.disk != disk);
    all.extend(outcome);
    let mut root = Element::new("outcomes");
    for o in &all {
        root = root.with_child(o.to_element());
    }
    store.write_domain_file(name, OUTCOMES_FILE, &root.to_xml())
}

pub fn last_outcome(store: &Store, name: &str, disk: &str) -> Result<Option<JobOutcome>> {
    Ok(read_outcomes(store, name)?.into_iter().find(|o| o.disk == disk))
}

/// Keeps, as the outcome of each recorded job, that the process serving
/// the domain (`server`, pid `pid`) exited while it ran (called when that
/// process is found gone), so a waiter can say so.
pub fn record_server_exit(store: &Store, name: &str, jobs: &[JobRecord], server: &str, pid: i32) -> Result<()> {
    for rec in jobs {
        let why = format!("domain '{name}' ({server} pid {pid}) exited while block job on '{}' was running", rec.disk);
        let outcome = JobOutcome { disk: rec.disk.clone(), kind: rec.kind, end: BlockJobEnd::Failed(why) };
        set_outcome(store, name, &rec.disk, Some(outcome))?;
    }
    Ok(())
}

/// The end of the last job on `disk`, when nothing serves the domain now.
pub fn ended(store: &Store, name: &str, disk: &str) -> Result<BlockJobState> {
    match last_outcome(store, name, disk)? {
        Some(o) => Ok(BlockJobState::Ended { kind: o.kind, end: o.end }),
        None => Err(no_job(disk)),
    }
}

/// The error for a disk without a job to act on.
pub fn no_job(disk: &str) -> Error {
    Error::invalid_arg(format!("disk {disk} does not have an active block job"))
}
