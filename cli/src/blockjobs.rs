//! `blockpull`, `blockcommit`, `blockcopy`, `blockjob`: virsh's syntax and
//! messages, with event-driven `--wait`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use clap::Args;
use strata_core::capabilities::BlockJobRequest;
use strata_core::driver::{BlockJobEnd, BlockJobInfo, BlockJobKind, BlockJobOps, BlockJobState, Connection};
use strata_core::options::{BlockCommitOptions, BlockCopyOptions, BlockJobAbortFlags, BlockPullOptions};

use crate::output::{self, Progress};
use crate::shared::{read_document, CommandFailure};
use crate::virsh_args::BY_POSITION;

/// Options every job command shares.
#[derive(Args, Debug, Clone)]
pub struct WaitArgs {
    /// Wait for the job to end (or reach its synchronised phase).
    #[arg(long)]
    wait: bool,
    /// Show progress while waiting.
    #[arg(long)]
    verbose: bool,
    /// Abort the job after this many seconds (implies --wait).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<u64>,
    /// With --timeout: return once the abort is requested.
    #[arg(long = "async")]
    async_abort: bool,
    /// Bandwidth limit in MiB/s (bytes/s with --bytes).
    #[arg(long, value_name = "NUMBER")]
    bandwidth: Option<u64>,
    /// --bandwidth is in bytes/s.
    #[arg(long)]
    bytes: bool,
}

impl WaitArgs {
    fn bandwidth_bytes(&self) -> Option<u64> {
        self.bandwidth.map(|b| if self.bytes { b } else { b.saturating_mul(1024 * 1024) })
    }
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// Domain name.
    #[arg(long, value_name = "DOMAIN", help_heading = BY_POSITION)]
    pub domain: String,
    /// The disk: its target (vda) or the path of its active image.
    #[arg(long = "path", visible_alias = "disk", value_name = "DISK", help_heading = BY_POSITION)]
    pub disk: String,
    /// Pull down to this image (path or DISK[N]) instead of flattening.
    #[arg(long)]
    base: Option<String>,
    /// Keep the backing name relative.
    #[arg(long = "keep-relative")]
    keep_relative: bool,
    /// Pull into this layer (path or DISK[N]) instead of the active one.
    #[arg(long)]
    top: Option<String>,
    #[command(flatten)]
    wait: WaitArgs,
}

#[derive(Args, Debug)]
pub struct CommitArgs {
    /// Domain name.
    #[arg(long, value_name = "DOMAIN", help_heading = BY_POSITION)]
    pub domain: String,
    /// The disk: its target (vda) or the path of its active image.
    #[arg(long = "path", visible_alias = "disk", value_name = "DISK", help_heading = BY_POSITION)]
    pub disk: String,
    /// Commit into this image (path or DISK[N]) instead of the bottom of the chain.
    #[arg(long)]
    base: Option<String>,
    /// Commit from this image (path or DISK[N]) instead of the active layer.
    #[arg(long)]
    top: Option<String>,
    /// Commit into the image just below the top.
    #[arg(long)]
    shallow: bool,
    /// Commit the active layer (a two-phase job).
    #[arg(long)]
    active: bool,
    /// With --active: switch to the base when synchronised.
    #[arg(long)]
    pivot: bool,
    /// With --active: end the job keeping the overlay in use.
    #[arg(long = "keep-overlay")]
    keep_overlay: bool,
    /// Delete the committed files once the job succeeds.
    #[arg(long)]
    delete: bool,
    /// Keep the backing name relative.
    #[arg(long = "keep-relative")]
    keep_relative: bool,
    /// Commit even into an image a snapshot froze (that snapshot then
    /// reverts to other data).
    #[arg(long = "allow-snapshot-change")]
    allow_snapshot_change: bool,
    #[command(flatten)]
    wait: WaitArgs,
}

#[derive(Args, Debug)]
pub struct CopyArgs {
    /// Domain name.
    #[arg(long, value_name = "DOMAIN", help_heading = BY_POSITION)]
    pub domain: String,
    /// The disk: its target (vda) or the path of its active image.
    #[arg(long = "path", visible_alias = "disk", value_name = "DISK", help_heading = BY_POSITION)]
    pub disk: String,
    /// The copy's path.
    #[arg(long, value_name = "DEST", help_heading = BY_POSITION)]
    dest: Option<String>,
    /// Destination as a <disk> XML file.
    #[arg(long, value_name = "FILE")]
    xml: Option<String>,
    /// Copy only the active layer; the copy keeps its backing chain.
    #[arg(long)]
    shallow: bool,
    /// Copy into an existing image instead of creating it.
    #[arg(long = "reuse-external")]
    reuse_external: bool,
    /// The destination is raw (same as --format raw).
    #[arg(long)]
    raw: bool,
    /// The destination's format.
    #[arg(long)]
    format: Option<String>,
    /// Switch to the copy once it is synchronised.
    #[arg(long)]
    pivot: bool,
    /// End the copy once synchronised, keeping the source in use.
    #[arg(long)]
    finish: bool,
    /// Dirty-bitmap granularity in bytes (a power of two).
    #[arg(long)]
    granularity: Option<u64>,
    /// Copy buffer size in bytes.
    #[arg(long = "buf-size")]
    buf_size: Option<u64>,
    /// Accepted for virsh compatibility: Strata copies persistent domains too.
    #[arg(long = "transient-job")]
    transient_job: bool,
    #[command(flatten)]
    wait: WaitArgs,
}

#[derive(Args, Debug)]
pub struct JobArgs {
    /// Domain name.
    #[arg(long, value_name = "DOMAIN", help_heading = BY_POSITION)]
    pub domain: String,
    /// The disk: its target (vda) or the path of its active image.
    #[arg(long = "path", visible_alias = "disk", value_name = "DISK", help_heading = BY_POSITION)]
    pub disk: String,
    /// Abort the job.
    #[arg(long)]
    abort: bool,
    /// With --abort: return once the abort is requested.
    #[arg(long = "async")]
    async_abort: bool,
    /// Switch to the copy or the commit base, ending the job.
    #[arg(long)]
    pivot: bool,
    /// Show the job's progress (the default).
    #[arg(long)]
    info: bool,
    /// With --info: key=value lines.
    #[arg(long)]
    raw: bool,
    /// --bandwidth is in bytes/s, and --raw shows it so.
    #[arg(long)]
    bytes: bool,
    /// Set the job's bandwidth limit in MiB/s (bytes/s with --bytes).
    #[arg(long, value_name = "NUMBER")]
    bandwidth: Option<u64>,
    /// With --info (the default): the job as JSON, `null` when there is none.
    #[arg(long)]
    json: bool,
}

fn percent(info: &BlockJobInfo) -> u64 {
    match (info.cur.min(info.end) * 100).checked_div(info.end) {
        Some(p) => p,
        None if info.ready => 100,
        None => 0,
    }
}

/// What a wait ended with.
enum Waited {
    Ready,
    Ended(BlockJobEnd),
    TimedOut,
}

/// Waits for the job, showing progress; aborts it at `--timeout`.
async fn wait_job(
    jobs: &dyn BlockJobOps,
    domain: &str,
    disk: &str,
    label: &'static str,
    args: &WaitArgs,
) -> Result<Waited> {
    let mut progress = Progress::new(label, args.verbose);
    let deadline = args.timeout.map(|t| Instant::now() + Duration::from_secs(t));
    // Progress is refreshed a few times a second; the job's end wakes the
    // wait at once, whatever the tick.
    let tick = if args.verbose { 200 } else { 60_000 };
    loop {
        let mut slice = tick;
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now()).as_millis() as u64;
            if left == 0 {
                jobs.block_job_abort(domain, disk, BlockJobAbortFlags { pivot: false, no_wait: args.async_abort })
                    .await?;
                progress.finish();
                return Ok(Waited::TimedOut);
            }
            slice = slice.min(left);
        }
        match jobs.block_job_wait(domain, disk, slice).await? {
            BlockJobState::Running(info) => progress.show(percent(&info)),
            BlockJobState::Ready(info) => {
                progress.show(percent(&info).max(100));
                progress.finish();
                return Ok(Waited::Ready);
            }
            BlockJobState::Ended { end, .. } => {
                if end == BlockJobEnd::Completed || end == BlockJobEnd::Finished {
                    progress.show(100);
                }
                progress.finish();
                return Ok(Waited::Ended(end));
            }
        }
    }
}

fn failure(message: String) -> anyhow::Error {
    anyhow!(CommandFailure { message, output: String::new() })
}

fn ended_badly(end: &BlockJobEnd, what: &str) -> anyhow::Error {
    match end {
        BlockJobEnd::Failed(e) => failure(format!("{what} failed: {e}")),
        _ => failure(format!("{what} was cancelled")),
    }
}

/// Ends a copy or active commit in its synchronised phase: `pivot`
/// switches to the new image, otherwise the job finishes leaving the
/// source in use (`kept` is what virsh prints then).
async fn end_synchronised(
    jobs: &dyn BlockJobOps,
    domain: &str,
    disk: &str,
    pivot: bool,
    what: &str,
    kept: &str,
) -> Result<String> {
    let end = jobs.block_job_abort(domain, disk, BlockJobAbortFlags { pivot, no_wait: false }).await?;
    match (end, pivot) {
        (BlockJobEnd::Completed, true) => Ok("\nSuccessfully pivoted\n".into()),
        (BlockJobEnd::Finished, false) => Ok(format!("\n{kept}\n")),
        (end, _) => Err(ended_badly(&end, what)),
    }
}

pub async fn blockpull(conn: &dyn Connection, a: PullArgs) -> Result<String> {
    let jobs = conn.require_block_jobs()?;
    let opts = BlockPullOptions {
        base: a.base,
        top: a.top,
        bandwidth_bytes: a.wait.bandwidth_bytes(),
        keep_relative: a.keep_relative,
    };
    conn.capabilities().check_block_job(&BlockJobRequest::pull(&opts))?;
    jobs.block_pull(&a.domain, &a.disk, &opts).await?;
    if !(a.wait.wait || a.wait.verbose || a.wait.timeout.is_some()) {
        return Ok("Block Pull started\n".into());
    }
    match wait_job(jobs, &a.domain, &a.disk, "Block Pull", &a.wait).await? {
        Waited::Ready | Waited::Ended(BlockJobEnd::Completed) => Ok("\nPull complete\n".into()),
        Waited::TimedOut => {
            output::out("\nPull aborted\n");
            Err(failure("block pull timed out and was aborted".into()))
        }
        Waited::Ended(end) => Err(ended_badly(&end, "block pull")),
    }
}

pub async fn blockcommit(conn: &dyn Connection, a: CommitArgs) -> Result<String> {
    let jobs = conn.require_block_jobs()?;
    let opts = BlockCommitOptions {
        base: a.base,
        top: a.top,
        shallow: a.shallow,
        active: a.active,
        pivot: a.pivot,
        keep_overlay: a.keep_overlay,
        delete: a.delete,
        bandwidth_bytes: a.wait.bandwidth_bytes(),
        keep_relative: a.keep_relative,
        allow_snapshot_change: a.allow_snapshot_change,
    };
    conn.capabilities().check_block_job(&BlockJobRequest::commit(&opts))?;
    let kind = jobs.block_commit(&a.domain, &a.disk, &opts).await?;
    let wait = a.wait.wait || a.wait.verbose || a.wait.timeout.is_some() || a.pivot || a.keep_overlay;
    if !wait {
        return Ok(format!("{} started\n", kind.label()));
    }
    match wait_job(jobs, &a.domain, &a.disk, "Block commit", &a.wait).await? {
        Waited::Ready if kind == BlockJobKind::ActiveCommit => {
            if a.pivot || a.keep_overlay {
                end_synchronised(
                    jobs,
                    &a.domain,
                    &a.disk,
                    a.pivot,
                    "block commit",
                    "Commit complete, overlay image kept",
                )
                .await
            } else {
                Ok("\nNow in synchronized phase\n".into())
            }
        }
        Waited::Ready | Waited::Ended(BlockJobEnd::Completed) => Ok("\nCommit complete\n".into()),
        Waited::TimedOut => {
            output::out("\nCommit aborted\n");
            Err(failure("block commit timed out and was aborted".into()))
        }
        Waited::Ended(end) => Err(ended_badly(&end, "block commit")),
    }
}

pub async fn blockcopy(conn: &dyn Connection, a: CopyArgs) -> Result<String> {
    let jobs = conn.require_block_jobs()?;
    if a.pivot && a.finish {
        return Err(failure("Options --pivot and --finish are mutually exclusive".into()));
    }
    let mut xml_format = None;
    let dest = match (&a.dest, &a.xml) {
        (Some(d), None) => d.clone(),
        (None, Some(file)) => {
            let (path, format) = dest_from_xml(file)?;
            xml_format = format;
            path
        }
        (None, None) => return Err(failure("one of --dest or --xml is required".into())),
        _ => return Err(failure("Options --dest and --xml are mutually exclusive".into())),
    };
    // Strata copies persistent domains as they are; the flag changes nothing.
    let _ = a.transient_job;
    let opts = BlockCopyOptions {
        dest,
        format: a.format.or(xml_format),
        raw: a.raw,
        shallow: a.shallow,
        reuse_external: a.reuse_external,
        bandwidth_bytes: a.wait.bandwidth_bytes(),
        granularity: a.granularity,
        buf_size: a.buf_size,
    };
    conn.capabilities().check_block_job(&BlockJobRequest::copy(&opts, a.pivot || a.finish))?;
    let warnings = jobs.block_copy(&a.domain, &a.disk, &opts).await?;
    for w in warnings {
        output::err(&format!("warning: {w}\n"));
    }
    let wait = a.wait.wait || a.wait.verbose || a.wait.timeout.is_some() || a.pivot || a.finish;
    if !wait {
        return Ok("Block Copy started\n".into());
    }
    match wait_job(jobs, &a.domain, &a.disk, "Block Copy", &a.wait).await? {
        Waited::Ready => {
            if a.pivot || a.finish {
                end_synchronised(jobs, &a.domain, &a.disk, a.pivot, "block copy", "Successfully copied").await
            } else {
                Ok("\nNow in mirroring phase\n".into())
            }
        }
        Waited::TimedOut => {
            output::out("\nCopy aborted\n");
            Err(failure("block copy timed out and was aborted".into()))
        }
        Waited::Ended(end) => Err(ended_badly(&end, "block copy")),
    }
}

/// `--xml FILE`: the destination `<disk>`'s source and its `<driver type>`.
fn dest_from_xml(file: &str) -> Result<(String, Option<String>)> {
    let text = read_document(file)?;
    let el = strata_core::xml::Element::parse(&text)?;
    let kind = el.attr("type").unwrap_or("file");
    let source = strata_core::xml::parse_source(kind, el.child("source"))?
        .ok_or_else(|| anyhow!("the <disk> in '{file}' has no <source>"))?;
    let path = source
        .local_path()
        .map(|p| p.to_string_lossy().into_owned())
        .ok_or_else(|| anyhow!("the <disk> in '{file}' is not a local file or block device"))?;
    let format = el.child("driver").and_then(|d| d.attr("type")).map(str::to_string);
    Ok((path, format))
}

pub async fn blockjob(conn: &dyn Connection, a: JobArgs, json: bool) -> Result<String> {
    let jobs = conn.require_block_jobs()?;
    conn.capabilities().check_block_job_control(a.bandwidth.is_some(), a.pivot)?;
    let mut out = String::new();
    if a.abort || a.pivot {
        if a.info || a.bandwidth.is_some() {
            return Err(failure("Options --abort/--pivot and --info/--bandwidth are mutually exclusive".into()));
        }
        let end = jobs
            .block_job_abort(&a.domain, &a.disk, BlockJobAbortFlags { pivot: a.pivot, no_wait: a.async_abort })
            .await?;
        if let BlockJobEnd::Failed(e) = end {
            return Err(failure(format!("block job failed: {e}")));
        }
        out.push('\n');
        return Ok(out);
    }
    if let Some(bw) = a.bandwidth {
        let bytes = if a.bytes { bw } else { bw.saturating_mul(1024 * 1024) };
        jobs.block_job_set_speed(&a.domain, &a.disk, bytes).await?;
        if !a.info {
            return Ok(out);
        }
    }
    let info = jobs.block_job_info(&a.domain, &a.disk).await?;
    if json || a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&info)?)?;
        return Ok(out);
    }
    match info {
        None => writeln!(out, "No current block job for {}", a.disk)?,
        Some(info) if a.raw => {
            writeln!(out, " type={}", info.kind.label())?;
            let bw = if a.bytes { info.bandwidth_bytes } else { info.bandwidth_bytes / (1024 * 1024) };
            writeln!(out, " bandwidth={bw}")?;
            writeln!(out, " cur={}", info.cur)?;
            writeln!(out, " end={}", info.end)?;
        }
        Some(info) => {
            write!(out, "\n{}: [{:3} %]", info.kind.label(), percent(&info))?;
            if info.bandwidth_bytes > 0 {
                write!(
                    out,
                    "    Bandwidth limit: {} bytes/s ({:.3} MiB/s)",
                    info.bandwidth_bytes,
                    info.bandwidth_bytes as f64 / (1024.0 * 1024.0)
                )?;
            }
            out.push_str("\n\n");
        }
    }
    Ok(out)
}
