//! A running container held still for a live snapshot: its cgroup frozen
//! first (a task blocked in a frozen filesystem would hold up the cgroup's
//! freeze), then each snapshotted filesystem with `FIFREEZE`, opened
//! through the init's `/proc/PID/root` since it is mounted in the
//! container's mount namespace only; thawed in the reverse order, always:
//! [`Paused`] thaws on drop, on every error path. The storage daemons
//! serving the filesystems run outside the container's cgroup, or the
//! filesystem freeze would wait for a frozen daemon.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use strata_core::{Error, Result};
use strata_engine::process::ProcessId;

use crate::plan::cstr;
use crate::probe;
use crate::syscall::{MountHandle, Syscall};

/// A live snapshot's pause of a container, recorded in the container's
/// record before anything is frozen and removed once everything is
/// thawed, so that the next call thaws a container whose snapshot's
/// `strata` died in between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPause {
    /// The `strata` taking the snapshot; answerable for the pause while it runs.
    pub owner: ProcessId,
    /// Whether it froze the cgroup (a container the user had suspended
    /// stays suspended).
    pub cgroup: bool,
    /// The targets of the filesystems it freezes.
    pub filesystems: Vec<String>,
}

/// Where the container whose init is `init` has filesystem `target`
/// mounted, as the host reaches it.
pub fn mount_dir(init: ProcessId, target: &str) -> PathBuf {
    Path::new(&format!("/proc/{}/root", init.pid)).join(target.trim_start_matches('/'))
}

/// The container, frozen until [`Paused::thaw`] (or the drop).
pub struct Paused<'a, S: Syscall + ?Sized> {
    sys: &'a S,
    /// The cgroup this pause froze, to thaw.
    cgroup: Option<PathBuf>,
    /// The filesystems frozen so far, in order.
    frozen: Vec<MountHandle>,
    since: Instant,
}

/// Freezes the container whose init is `init` as `pause` says: its cgroup
/// `cgroup` unless the pause leaves it (the user has it suspended), then
/// the filesystems it names. A failure thaws what was frozen before it
/// returns.
pub fn pause<'a, S: Syscall + ?Sized>(
    sys: &'a S,
    init: ProcessId,
    cgroup: &Path,
    pause: &SnapshotPause,
) -> Result<Paused<'a, S>> {
    // Opened before anything is frozen: nothing then waits in the window.
    let mounts: Vec<MountHandle> =
        pause.filesystems.iter().map(|t| sys.open_mount(&mount_dir(init, t))).collect::<Result<_>>()?;
    let since = Instant::now();
    let mut paused = Paused { sys, cgroup: None, frozen: Vec::new(), since };
    if pause.cgroup {
        sys.cgroup_freeze(cgroup, true)?;
        paused.cgroup = Some(cgroup.to_path_buf());
    }
    for mount in mounts {
        sys.fs_freeze(&mount)?;
        paused.frozen.push(mount);
    }
    Ok(paused)
}

impl<S: Syscall + ?Sized> Paused<'_, S> {
    /// Thaws the filesystems (last frozen first), then the cgroup; returns
    /// how long the container was paused. Every thaw is tried; the first
    /// failure is returned.
    pub fn thaw(mut self) -> Result<Duration> {
        self.release()?;
        Ok(self.since.elapsed())
    }

    fn release(&mut self) -> Result<()> {
        let mut first_error = None;
        while let Some(mount) = self.frozen.pop() {
            if let Err(e) = self.sys.fs_thaw(&mount) {
                first_error.get_or_insert(e);
            }
        }
        if let Some(cgroup) = self.cgroup.take() {
            if let Err(e) = self.sys.cgroup_freeze(&cgroup, false) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl<S: Syscall + ?Sized> Drop for Paused<'_, S> {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::warn!(error = %e.report(), "the container could not be thawed after its snapshot");
        }
    }
}

/// Thaws what the snapshot pause `pause` of the container whose init is
/// `init` froze, its `strata` having died before it did: each of its
/// filesystems (one not frozen is left as it is), then the cgroup
/// `cgroup` if it froze it.
pub fn thaw_abandoned(sys: &dyn Syscall, init: ProcessId, cgroup: &Path, pause: &SnapshotPause) -> Result<()> {
    for target in pause.filesystems.iter().rev() {
        let mount = sys.open_mount(&mount_dir(init, target))?;
        sys.fs_thaw(&mount)?;
    }
    if pause.cgroup {
        sys.cgroup_freeze(cgroup, false)?;
    }
    Ok(())
}

/// Thaws the filesystem on loop device `device` (holding the filesystem
/// of `target`) that a snapshot's pause froze and whose container is gone
/// since: its mounts went with the container's mount namespace, but the
/// freeze keeps its superblock, and with it the loop device, until a thaw
/// reaches it. Mounting the device again gives back that superblock: it
/// is mounted at `dir` (made for it), thawed there and unmounted.
pub fn thaw_unmounted(sys: &dyn Syscall, device: &Path, target: &str, dir: &Path) -> Result<()> {
    let fstype = cstr(probe::mount_type(probe::probe_device(device, target)?))?;
    let (source, at) = (cstr(device)?, cstr(dir)?);
    sys.mkdir(&at, 0o700).map_err(|e| Error::io("create", dir, e))?;
    sys.mount(Some(&source), &at, Some(&fstype), 0, None).map_err(|e| Error::io("mount again", device, e))?;
    let thawed = sys.open_mount(dir).and_then(|mount| sys.fs_thaw(&mount));
    sys.umount(&at, libc::MNT_DETACH).map_err(|e| Error::io("unmount", dir, e))?;
    let _ = std::fs::remove_dir(dir);
    thawed.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::recording::Recorder;

    const CGROUP: &str = "/cg/ct1";

    fn snapshot_pause(cgroup: bool) -> SnapshotPause {
        SnapshotPause {
            owner: ProcessId { pid: 2, start_time: 2 },
            cgroup,
            filesystems: vec!["/".into(), "/data".into()],
        }
    }

    const INIT: ProcessId = ProcessId { pid: 42, start_time: 7 };

    /// The cgroup freezes before the filesystems, which thaw first.
    #[test]
    fn the_cgroup_freezes_first_and_thaws_last() {
        let sys = Recorder::default();
        let paused = pause(&sys, INIT, Path::new(CGROUP), &snapshot_pause(true)).expect("paused");
        paused.thaw().expect("thawed");
        assert_eq!(
            sys.lines(),
            [
                "open_mount /proc/42/root/",
                "open_mount /proc/42/root/data",
                "cgroup_freeze /cg/ct1 true",
                "fs_freeze /proc/42/root/",
                "fs_freeze /proc/42/root/data",
                "fs_thaw /proc/42/root/data",
                "fs_thaw /proc/42/root/",
                "cgroup_freeze /cg/ct1 false",
            ]
        );
    }

    /// A freeze that fails thaws what was frozen before it; a cgroup the
    /// user had suspended is neither frozen nor thawed.
    #[test]
    fn a_failed_freeze_thaws_what_was_frozen() {
        let sys = Recorder::failing("fs_freeze /proc/42/root/data");
        assert!(pause(&sys, INIT, Path::new(CGROUP), &snapshot_pause(false)).is_err());
        assert_eq!(
            sys.lines()[2..],
            ["fs_freeze /proc/42/root/", "fs_freeze /proc/42/root/data", "fs_thaw /proc/42/root/"]
        );
    }

    /// A pause whose strata died is thawed filesystem by filesystem, the
    /// cgroup last and only when the pause froze it.
    #[test]
    fn an_abandoned_pause_is_thawed_as_it_was_recorded() {
        let sys = Recorder::default();
        thaw_abandoned(&sys, INIT, Path::new(CGROUP), &snapshot_pause(true)).expect("thawed");
        assert_eq!(
            sys.lines(),
            [
                "open_mount /proc/42/root/data",
                "fs_thaw /proc/42/root/data",
                "open_mount /proc/42/root/",
                "fs_thaw /proc/42/root/",
                "cgroup_freeze /cg/ct1 false",
            ]
        );
        let sys = Recorder::default();
        thaw_abandoned(&sys, INIT, Path::new(CGROUP), &snapshot_pause(false)).expect("thawed");
        assert!(!sys.lines().iter().any(|l| l.starts_with("cgroup_freeze")), "{:#?}", sys.lines());
    }

    /// A pause dropped on an error path thaws everything it froze.
    #[test]
    fn a_pause_dropped_on_an_error_path_thaws() {
        let sys = Recorder::default();
        drop(pause(&sys, INIT, Path::new(CGROUP), &snapshot_pause(true)).expect("paused"));
        let lines = sys.lines();
        assert_eq!(
            lines[lines.len() - 3..],
            ["fs_thaw /proc/42/root/data", "fs_thaw /proc/42/root/", "cgroup_freeze /cg/ct1 false"]
        );
    }
}
