//! Block jobs where VirtualBox has them, on a machine that is shut off:
//! pull and commit are IMedium::MergeTo (layers merged up into the active
//! image, or down into a base), copy is IMedium::CloneTo into a new
//! medium, which a pivot attaches in place of the source. Each runs
//! behind an IProgress this client holds (`xpcom::HeldJob`), so a job is
//! seen by the process that started it; one still running when the
//! connection closes is waited for.

use strata_core::driver::{BlockJobEnd, BlockJobInfo, BlockJobKind, BlockJobState};
use strata_core::{Error, Result};

use crate::ffi::{IProgressVtbl, DEVICE_HARD_DISK, MEDIUM_VARIANT_STANDARD};
use crate::machines::{domain_state, DiskAttachment, Machine, Medium};
use crate::xpcom::{call, get, get_obj, Com, Ctx, HeldJob};

fn no_job(domain: &str, disk: &str) -> Error {
    Error::operation_invalid(format!("no active block job on disk '{disk}' of domain '{domain}'"))
}

/// The index in `disk.chain` of a layer named by its path or as `TARGET[N]`.
fn layer_index(disk: &DiskAttachment, spec: &str) -> Result<usize> {
    if let Some(n) = spec.strip_prefix(&format!("{}[", disk.target)).and_then(|r| r.strip_suffix(']')) {
        if let Some(i) = n.parse::<usize>().ok().filter(|i| *i < disk.chain.len()) {
            return Ok(i);
        }
    }
    disk.chain
        .iter()
        .position(|l| l.location.as_os_str() == spec)
        .ok_or_else(|| Error::invalid_arg(format!("'{spec}' is not in the backing chain of disk '{}'", disk.target)))
}

impl Ctx {
    /// A machine's disk named by target or active image path, with its
    /// whole chain when `full_chain` (to start a job; a running job's
    /// merge may remove layers under a later look).
    fn job_disk(&self, domain: &str, disk: &str, full_chain: bool) -> Result<(Machine, DiskAttachment)> {
        let machine = self.find_machine(domain)?;
        let found = self
            .disks(&machine, full_chain)?
            .into_iter()
            .find(|d| d.target == disk || d.chain.first().is_some_and(|l| l.location.as_os_str() == disk))
            .ok_or_else(|| Error::invalid_arg(format!("domain '{domain}' has no disk '{disk}'")))?;
        Ok((machine, found))
    }

    fn require_shut_off(&self, machine: &Machine, domain: &str) -> Result<()> {
        if domain_state(self.machine_state(machine)?).is_active() {
            return Err(Error::operation_invalid(format!(
                "domain '{domain}' is running: VirtualBox merges and clones the media of a machine that is shut off"
            )));
        }
        Ok(())
    }

    fn medium_by_location(&self, disk: &DiskAttachment, index: usize) -> Result<Medium> {
        let layer = &disk.chain[index];
        let vbox = &self.vbox;
        let location = self.utf16(&layer.location.display().to_string())?;
        get_obj!(vbox.OpenMedium(location.ptr(), DEVICE_HARD_DISK, crate::ffi::ACCESS_READ_WRITE, 0))?
            .ok_or_else(|| Error::internal(format!("no medium at '{}'", layer.location.display())))
    }

    fn start_job(
        &mut self,
        domain: &str,
        disk: &DiskAttachment,
        kind: BlockJobKind,
        progress: Option<Com<IProgressVtbl>>,
        copy: Option<Medium>,
    ) -> Result<()> {
        let progress = progress.ok_or_else(|| Error::internal("VirtualBox gave no progress for the job"))?;
        self.jobs.insert((domain.to_string(), disk.target.clone()), HeldJob { kind, progress, copy });
        Ok(())
    }

    fn refuse_second_job(&self, domain: &str, disk: &DiskAttachment) -> Result<()> {
        if self.jobs.contains_key(&(domain.to_string(), disk.target.clone())) {
            return Err(Error::new(
                strata_core::ErrorKind::BlockCopyActive,
                format!("disk '{}' of domain '{domain}' already has a block job", disk.target),
            ));
        }
        Ok(())
    }

    /// Pull: the layers above `base` (all of them without one) merged up into the active image.
    pub fn block_pull(&mut self, domain: &str, disk: &str, base: Option<&str>) -> Result<()> {
        let (machine, disk) = self.job_disk(domain, disk, true)?;
        self.require_shut_off(&machine, domain)?;
        self.refuse_second_job(domain, &disk)?;
        let top_of_pulled = match base {
            Some(b) => layer_index(&disk, b)?.checked_sub(1),
            None => Some(disk.chain.len() - 1),
        };
        let Some(source) = top_of_pulled.filter(|i| *i > 0) else {
            return Err(Error::invalid_arg(format!("nothing to pull into the active image of disk '{}'", disk.target)));
        };
        let (source, target) = (self.medium_by_location(&disk, source)?, self.medium_by_location(&disk, 0)?);
        let progress = get_obj!(source.MergeTo(target.raw()))?;
        self.start_job(domain, &disk, BlockJobKind::Pull, progress, None)
    }

    /// Commit: `top` (and the layers between) merged down into `base`
    /// (the chain's last image without one).
    pub fn block_commit(&mut self, domain: &str, disk: &str, top: Option<&str>, base: Option<&str>) -> Result<()> {
        let (machine, disk) = self.job_disk(domain, disk, true)?;
        self.require_shut_off(&machine, domain)?;
        self.refuse_second_job(domain, &disk)?;
        let top = top.map(|t| layer_index(&disk, t)).transpose()?.unwrap_or(0);
        if top == 0 {
            return Err(strata_core::capabilities::refusal("vbox", "cannot run an active block commit"));
        }
        let base = base.map(|b| layer_index(&disk, b)).transpose()?.unwrap_or(disk.chain.len() - 1);
        if base <= top {
            return Err(Error::invalid_arg(format!(
                "base '{}' is not below top '{}'",
                disk.chain[base].location.display(),
                disk.chain[top].location.display()
            )));
        }
        let (source, target) = (self.medium_by_location(&disk, top)?, self.medium_by_location(&disk, base)?);
        let progress = get_obj!(source.MergeTo(target.raw()))?;
        self.start_job(domain, &disk, BlockJobKind::Commit, progress, None)
    }

    /// Copy: the disk's data cloned into a new medium at `dest`.
    pub fn block_copy(&mut self, domain: &str, disk: &str, dest: &str, format: Option<&str>) -> Result<()> {
        let (machine, disk) = self.job_disk(domain, disk, true)?;
        self.require_shut_off(&machine, domain)?;
        self.refuse_second_job(domain, &disk)?;
        let format = match format {
            Some(f) => f.to_string(),
            None => std::path::Path::new(dest)
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_string)
                .unwrap_or_else(|| disk.chain[0].format.clone()),
        };
        let vbox = &self.vbox;
        let (f, location) = (self.utf16(&format.to_ascii_uppercase())?, self.utf16(dest)?);
        let target = get_obj!(vbox.CreateHardDisk(f.ptr(), location.ptr()))
            .map_err(|e| Error::from(e).context(format!("cannot create '{dest}'")))?
            .ok_or_else(|| Error::internal("CreateHardDisk gave no medium"))?;
        let source = self.medium_by_location(&disk, 0)?;
        let progress = get_obj!(source.CloneTo(target.raw(), MEDIUM_VARIANT_STANDARD, std::ptr::null_mut()))?;
        self.start_job(domain, &disk, BlockJobKind::Copy, progress, Some(target))
    }

    fn job_info(&self, disk: &str, job: &HeldJob) -> Result<BlockJobInfo> {
        let progress = &job.progress;
        let percent: u32 = get!(progress.GetPercent)?;
        let completed: i32 = get!(progress.GetCompleted)?;
        Ok(BlockJobInfo {
            kind: job.kind,
            disk: disk.to_string(),
            cur: u64::from(percent),
            end: 100,
            bandwidth_bytes: 0,
            ready: completed != 0 && job.copy.is_some(),
        })
    }

    pub fn block_job_info(&self, domain: &str, disk: &str) -> Result<Option<BlockJobInfo>> {
        let (_, disk) = self.job_disk(domain, disk, false)?;
        match self.jobs.get(&(domain.to_string(), disk.target.clone())) {
            Some(job) => Ok(Some(self.job_info(&disk.target, job)?)),
            None => Ok(None),
        }
    }

    pub fn block_job_wait(&mut self, domain: &str, disk: &str, timeout_ms: u64) -> Result<BlockJobState> {
        let (_, disk) = self.job_disk(domain, disk, false)?;
        let key = (domain.to_string(), disk.target.clone());
        let job = self.jobs.get(&key).ok_or_else(|| no_job(domain, &disk.target))?;
        let progress = &job.progress;
        call!(progress.WaitForCompletion(i32::try_from(timeout_ms).unwrap_or(i32::MAX)))?;
        let info = self.job_info(&disk.target, job)?;
        let completed: i32 = get!(progress.GetCompleted)?;
        if completed == 0 {
            return Ok(BlockJobState::Running(info));
        }
        let outcome = self.outcome(progress, &format!("the {} job of disk '{}'", info.kind.as_str(), disk.target));
        let kind = job.kind;
        match outcome {
            Ok(()) if job.copy.is_some() => Ok(BlockJobState::Ready(info)),
            Ok(()) => {
                self.jobs.remove(&key);
                Ok(BlockJobState::Ended { kind, end: BlockJobEnd::Completed })
            }
            Err(e) => {
                self.jobs.remove(&key);
                Ok(BlockJobState::Ended { kind, end: BlockJobEnd::Failed(e.message().to_string()) })
            }
        }
    }

    /// Ends a copy that completed: a pivot attaches the copy in place of
    /// the source. A merge or a clone still running cannot be stopped.
    pub fn block_job_abort(&mut self, domain: &str, disk: &str, pivot: bool) -> Result<BlockJobEnd> {
        let (machine, disk) = self.job_disk(domain, disk, false)?;
        let key = (domain.to_string(), disk.target.clone());
        let job = self.jobs.get(&key).ok_or_else(|| no_job(domain, &disk.target))?;
        let progress = &job.progress;
        let completed: i32 = get!(progress.GetCompleted)?;
        if completed == 0 || job.copy.is_none() {
            return Err(Error::operation_invalid(format!(
                "the {} job of disk '{}' runs to its end: VirtualBox's merges and clones cannot be cancelled",
                job.kind.as_str(),
                disk.target
            )));
        }
        let Some(job) = self.jobs.remove(&key) else { return Err(no_job(domain, &disk.target)) };
        if !pivot {
            return Ok(BlockJobEnd::Finished);
        }
        let copy = job.copy.ok_or_else(|| no_job(domain, &disk.target))?;
        self.with_session(&machine, domain, |ctx, locked| {
            let controller = ctx.utf16(&disk.controller)?;
            call!(locked.DetachDevice(controller.ptr(), disk.port, disk.device))?;
            call!(locked.AttachDevice(controller.ptr(), disk.port, disk.device, DEVICE_HARD_DISK, copy.raw()))?;
            Ok(call!(locked.SaveSettings())?)
        })?;
        Ok(BlockJobEnd::Completed)
    }
}
