//! A running container's record (`status.xml` in the store) and what every
//! call does with it first: reconcile it with the kernel, and tear down
//! what a container that is gone left (its processes, loop devices and
//! cgroup), so that a `strata` killed at any moment leaves nothing the
//! next call does not find.

use std::path::{Path, PathBuf};
use std::time::Duration;

use strata_core::store::Store;
use strata_core::xml::{Domain, Element};
use strata_core::{Error, Result};
use strata_engine::job::record::JobRecord;
use strata_engine::process::{Liveness, ProcessId};
use strata_qemu_block::fuse::recorded_server;

use crate::pause::{self, SnapshotPause};
use crate::plan::cstr;
use crate::syscall::{loop_backing_file, Syscall};

/// How long a storage daemon gets to quit after SIGTERM.
const DAEMON_GRACE: Duration = Duration::from_secs(10);

/// A loop device a container's filesystem was attached to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedLoop {
    pub device: PathBuf,
    pub image: PathBuf,
}

/// A filesystem's chain served by a storage daemon of its own: the
/// daemon's runtime directory (which records its process before it runs)
/// and the FUSE-exported file a loop device holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedFilesystem {
    pub target: String,
    pub dir: PathBuf,
    pub file: PathBuf,
}

/// What `status.xml` records of a container.
#[derive(Debug, Clone)]
pub struct LiveStatus {
    /// The definition it runs with.
    pub domain: Domain,
    /// Its init, once cloned.
    pub init: Option<ProcessId>,
    /// The `strata` that starts it; answerable for it while `starting`.
    pub owner: ProcessId,
    /// Set until `start` has seen the init run.
    pub starting: bool,
    pub cgroup: PathBuf,
    pub loops: Vec<AttachedLoop>,
    /// Recorded before each daemon starts.
    pub served: Vec<ServedFilesystem>,
    /// The number the next node a live snapshot adds to a storage daemon
    /// takes (reserved here before the node is added, so no name is used twice).
    pub next_node: u64,
    /// A live snapshot's pause in progress.
    pub pause: Option<SnapshotPause>,
    /// Block jobs the storage daemons run on the served filesystems.
    pub jobs: Vec<JobRecord>,
    /// For job ids: numbers never used before while the container runs.
    pub next_job: u64,
}

impl LiveStatus {
    pub fn to_xml(&self) -> String {
        let mut root = Element::new("lxcstatus").with_attr("cgroup", self.cgroup.to_string_lossy());
        if self.starting {
            root.set_attr("state", "starting");
        }
        if self.next_node > 0 {
            root.set_attr("nextnode", self.next_node.to_string());
        }
        self.owner.set_attrs(&mut root, "owner");
        if let Some(init) = self.init {
            init.set_attrs(&mut root, "init");
        }
        for l in &self.loops {
            root = root.with_child(
                Element::new("loop")
                    .with_attr("dev", l.device.to_string_lossy())
                    .with_attr("image", l.image.to_string_lossy()),
            );
        }
        for d in &self.served {
            root = root.with_child(
                Element::new("served")
                    .with_attr("target", &d.target)
                    .with_attr("dir", d.dir.to_string_lossy())
                    .with_attr("file", d.file.to_string_lossy()),
            );
        }
        if let Some(pause) = &self.pause {
            let mut el = Element::new("snapshotpause").with_attr("cgroup", if pause.cgroup { "yes" } else { "no" });
            pause.owner.set_attrs(&mut el, "owner");
            for target in &pause.filesystems {
                el = el.with_child(Element::new("filesystem").with_attr("target", target));
            }
            root = root.with_child(el);
        }
        let jobs = self.jobs.iter().fold(Element::new("jobs"), |jobs, j| jobs.with_child(j.to_element()));
        root.with_child(jobs.with_attr("next", self.next_job.to_string()))
            .with_child(self.domain.element().clone())
            .to_xml()
    }

    pub fn parse(xml: &str) -> Result<LiveStatus> {
        let mut root = Element::parse(xml)?;
        let bad = |what: &str| Error::internal(format!("the container's status XML lacks {what}"));
        let domain = root.take_child("domain").ok_or_else(|| bad("the <domain>"))?;
        Ok(LiveStatus {
            domain: Domain::from_element(domain)?,
            init: ProcessId::from_attrs(&root, "init"),
            owner: ProcessId::from_attrs(&root, "owner").ok_or_else(|| bad("its owner"))?,
            starting: root.attr("state") == Some("starting"),
            cgroup: root.attr("cgroup").map(PathBuf::from).ok_or_else(|| bad("its cgroup"))?,
            loops: root
                .children_named("loop")
                .filter_map(|l| Some(AttachedLoop { device: l.attr("dev")?.into(), image: l.attr("image")?.into() }))
                .collect(),
            served: root
                .children_named("served")
                .filter_map(|d| {
                    Some(ServedFilesystem {
                        target: d.attr("target")?.into(),
                        dir: d.attr("dir")?.into(),
                        file: d.attr("file")?.into(),
                    })
                })
                .collect(),
            next_node: root.attr("nextnode").and_then(|n| n.parse().ok()).unwrap_or(0),
            pause: match root.child("snapshotpause") {
                Some(p) => Some(SnapshotPause {
                    owner: ProcessId::from_attrs(p, "owner").ok_or_else(|| bad("the owner of its snapshot pause"))?,
                    cgroup: p.attr("cgroup") == Some("yes"),
                    filesystems: p
                        .children_named("filesystem")
                        .filter_map(|f| f.attr("target"))
                        .map(Into::into)
                        .collect(),
                }),
                None => None,
            },
            jobs: root
                .child("jobs")
                .map(|j| j.children_named("job").map(JobRecord::from_element).collect::<Result<Vec<_>>>())
                .transpose()?
                .unwrap_or_default(),
            next_job: root.child("jobs").and_then(|j| j.attr("next")).and_then(|n| n.parse().ok()).unwrap_or(1),
        })
    }

    /// The init, when it still runs.
    pub fn running_init(&self) -> Option<ProcessId> {
        self.init.filter(|p| p.liveness() == Liveness::Alive)
    }
}

/// Where the container's tree is put together before the pivot: a
/// directory on the host that only the container's namespace mounts on.
pub fn runtime_dir(store: &Store, name: &str) -> Result<PathBuf> {
    Ok(store.domain_dir(name)?.join("run"))
}

/// The container's record, reconciled with the kernel; the caller holds
/// the domain lock. A container whose init is gone, or whose start was
/// abandoned (its `strata` died before it saw the init run), is torn down
/// and reads as shut off (`None`).
pub fn reconcile(sys: &dyn Syscall, store: &Store, name: &str) -> Result<Option<LiveStatus>> {
    let Some(xml) = store.read_status(name)? else { return Ok(None) };
    let status = LiveStatus::parse(&xml)?;
    let init_runs = status.running_init().is_some();
    if status.starting && status.owner.liveness() == Liveness::Alive {
        return Ok(Some(status));
    }
    if init_runs && !status.starting {
        return match &status.pause {
            Some(pause) if pause.owner.liveness() == Liveness::Gone => {
                tracing::debug!(domain = name, "thawing a container a snapshot's strata left frozen");
                let init = status.running_init().ok_or_else(|| Error::operation_invalid("domain is not running"))?;
                pause::thaw_abandoned(sys, init, &status.cgroup, pause)?;
                let status = LiveStatus { pause: None, ..status };
                store.write_status(name, &status.to_xml())?;
                Ok(Some(status))
            }
            _ => Ok(Some(status)),
        };
    }
    tracing::debug!(domain = name, init_runs, starting = status.starting, "tearing down a container that is gone");
    teardown(sys, &status)?;
    forget(store, name)?;
    Ok(None)
}

/// The record of a container whose init runs and whose start is over, as
/// read now, without reconciling (a reader that does not hold the domain
/// lock); `None` otherwise.
pub fn running(store: &Store, name: &str) -> Result<Option<LiveStatus>> {
    let Some(xml) = store.read_status(name)? else { return Ok(None) };
    let status = LiveStatus::parse(&xml)?;
    Ok((!status.starting && status.running_init().is_some()).then_some(status))
}

/// Removes the record and the staging directory of a container torn down.
pub fn forget(store: &Store, name: &str) -> Result<()> {
    let dir = runtime_dir(store, name)?;
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("remove", &dir, e)),
    }
    store.remove_status(name)
}

/// Everything a container holds, released: its processes killed (the
/// cgroup's, and the init by its recorded identity, so a reused pid is
/// never signalled), its loop devices detached once its mounts are gone,
/// then the storage daemons serving their chains stopped, and its cgroup
/// removed.
pub fn teardown(sys: &dyn Syscall, status: &LiveStatus) -> Result<()> {
    sys.cgroup_kill(&status.cgroup)?;
    if let Some(init) = status.running_init() {
        sys.kill(init.pid, libc::SIGKILL)?;
        wait_gone(init, Duration::from_secs(30))?;
    }
    if let Some(pause) = &status.pause {
        thaw_gone_pause(sys, status, pause)?;
    }
    for l in &status.loops {
        sys.loop_detach(&l.device, &l.image)?;
    }
    for served in &status.served {
        stop_daemon(sys, served)?;
    }
    sys.cgroup_remove(&status.cgroup)
}

/// Thaws the filesystems the snapshot pause `pause` froze in a container
/// that is gone now (its init killed while it was frozen), last frozen
/// first, each through a mount of its own ([`pause::thaw_unmounted`]):
/// a frozen one would keep its loop device. A loop device that no longer
/// holds the filesystem's export is another's now, and left alone. The
/// cgroup needs no thaw: it is killed and removed frozen.
fn thaw_gone_pause(sys: &dyn Syscall, status: &LiveStatus, pause: &SnapshotPause) -> Result<()> {
    for target in pause.filesystems.iter().rev() {
        let Some(served) = status.served.iter().find(|s| &s.target == target) else { continue };
        let held = status
            .loops
            .iter()
            .find(|l| l.image == served.file && loop_backing_file(&l.device).as_deref() == Some(served.file.as_path()));
        if let Some(l) = held {
            pause::thaw_unmounted(sys, &l.device, target, &served.dir.join("thaw"))?;
        }
    }
    Ok(())
}

/// Stops the storage daemon serving `served` (SIGTERM: it removes its
/// FUSE export and closes the chain; SIGKILL after [`DAEMON_GRACE`]),
/// and unmounts the export a killed daemon left.
fn stop_daemon(sys: &dyn Syscall, served: &ServedFilesystem) -> Result<()> {
    if let Some(daemon) = recorded_server(&served.dir)?.filter(|d| d.liveness() == Liveness::Alive) {
        sys.kill(daemon.pid, libc::SIGTERM)?;
        if !daemon.wait_gone_blocking(DAEMON_GRACE) && daemon.liveness() == Liveness::Alive {
            sys.kill(daemon.pid, libc::SIGKILL)?;
            if !daemon.wait_gone_blocking(Duration::from_secs(30)) {
                return Err(Error::operation_failed(format!(
                    "the storage daemon (pid {}) serving filesystem '{}' did not exit",
                    daemon.pid, served.target
                )));
            }
        }
    }
    let file = cstr(&served.file)?;
    match sys.umount(&file, libc::MNT_DETACH) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => Ok(()),
        Err(e) => Err(Error::io("unmount the FUSE export", &served.file, e)),
    }
}

/// Waits until `process` is gone, at most `timeout`.
pub fn wait_gone(process: ProcessId, timeout: Duration) -> Result<()> {
    if process.wait_gone_blocking(timeout) {
        Ok(())
    } else {
        Err(Error::operation_failed(format!("the container's init (pid {}) did not exit", process.pid)))
    }
}

/// The cgroup2 hierarchy: `/sys/fs/cgroup/unified` on a hybrid host,
/// `/sys/fs/cgroup` on a unified one.
pub fn cgroup2_root() -> Result<PathBuf> {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(Path::new)
        .find(|dir| dir.join("cgroup.controllers").is_file())
        .map(Path::to_path_buf)
        .ok_or_else(|| {
            Error::operation_failed(
                "no cgroup2 hierarchy is mounted (neither /sys/fs/cgroup/unified nor /sys/fs/cgroup has \
                 cgroup.controllers); the lxc driver holds and kills a container's processes through one",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::recording::Recorder;

    fn status(init: Option<ProcessId>) -> LiveStatus {
        LiveStatus {
            domain: Domain::parse("<domain type='lxc'><name>ct1</name></domain>").expect("domain"),
            init,
            owner: ProcessId { pid: 1, start_time: 1 },
            starting: false,
            cgroup: "/sys/fs/cgroup/unified/strata-lxc/u1".into(),
            loops: vec![
                AttachedLoop { device: "/dev/loop7".into(), image: "/img/root.raw".into() },
                AttachedLoop { device: "/dev/loop8".into(), image: "/run/ct1/fs-1/export.raw".into() },
            ],
            served: vec![ServedFilesystem {
                target: "/data".into(),
                dir: "/run/ct1/fs-1".into(),
                file: "/run/ct1/fs-1/export.raw".into(),
            }],
            next_node: 3,
            pause: Some(SnapshotPause {
                owner: ProcessId { pid: 9, start_time: 10 },
                cgroup: true,
                filesystems: vec!["/".into(), "/data".into()],
            }),
            jobs: Vec::new(),
            next_job: 1,
        }
    }

    /// The cgroup's processes are killed before the loop devices are
    /// detached (their mounts go with the processes), the FUSE exports
    /// under them are unmounted after that, and the cgroup is removed
    /// last; an init already gone is not signalled.
    #[test]
    fn teardown_kills_then_detaches_then_removes_the_cgroup() {
        let sys = Recorder::default();
        let gone = ProcessId { pid: i32::MAX, start_time: 1 };
        teardown(&sys, &status(Some(gone))).expect("teardown");
        assert_eq!(
            sys.lines(),
            [
                "cgroup_kill /sys/fs/cgroup/unified/strata-lxc/u1",
                "loop_detach /dev/loop7 /img/root.raw",
                "loop_detach /dev/loop8 /run/ct1/fs-1/export.raw",
                "umount /run/ct1/fs-1/export.raw 2",
                "cgroup_remove /sys/fs/cgroup/unified/strata-lxc/u1",
            ]
        );
    }

    #[test]
    fn a_failed_detach_keeps_the_cgroup_for_the_next_call() {
        let sys = Recorder::failing("loop_detach /dev/loop8");
        assert!(teardown(&sys, &status(None)).is_err());
        assert!(!sys.lines().iter().any(|l| l.starts_with("cgroup_remove")), "{:#?}", sys.lines());
    }

    #[test]
    fn the_record_round_trips() {
        let mut s = status(Some(ProcessId { pid: 42, start_time: 7 }));
        s.starting = true;
        let mut job = JobRecord::new(strata_core::driver::BlockJobKind::Pull, "/data", Vec::new());
        job.give_id(3).expect("id");
        s.jobs.push(job);
        s.next_job = 4;
        let back = LiveStatus::parse(&s.to_xml()).expect("parse");
        assert_eq!((back.init, back.owner, back.starting), (s.init, s.owner, true));
        assert_eq!((&back.jobs, back.next_job), (&s.jobs, 4));
        assert_eq!((back.cgroup, back.loops, back.served), (s.cgroup, s.loops, s.served));
        assert_eq!((back.next_node, back.pause), (3, s.pause));
        assert_eq!(back.domain.name(), "ct1");
    }
}
