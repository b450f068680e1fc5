//! Starting a container and running a command inside one.
//!
//! `start` attaches the loop devices and creates the cgroup in this
//! process, records them, then clones the container's first process into
//! new mount, pid, uts, ipc and net namespaces. That child waits until its
//! pid is recorded and it is in the cgroup, then mounts, pivots and execs
//! the init; a failing step is reported over a close-on-exec pipe, whose
//! end-of-file says the exec succeeded. The init is not supervised by a
//! monitor process: once `strata` exits it is re-parented to the host's
//! init, and every later call finds it by its recorded pid and start time
//! (see [`crate::status`]).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use strata_core::define;
use strata_core::error::os_reason;
use strata_core::store::Store;
use strata_core::xml::Domain;
use strata_core::{Error, Result};
use strata_engine::process::{pipe, ProcessId};
use strata_qemu_block::fuse;

use crate::plan::{self, cstr, Container, IdMap, Mountable, PlannedStep, Prepared, Source};
use crate::probe;
use crate::status::{self, AttachedLoop, LiveStatus, ServedFilesystem};
use crate::syscall::{loop_devices_holding, Linux, LoopDevice, Syscall};

/// How long the init must keep running after its exec for `start` to
/// count it as started.
const INIT_SETTLE: Duration = Duration::from_secs(1);

/// The index a child reports for a failed exec of the init.
const EXEC_STEP: u32 = u32::MAX;

/// The index a child reports for a failure to enter its user namespace.
const USERNS_STEP: u32 = u32::MAX - 1;

const NAMESPACES: libc::c_int =
    libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | libc::CLONE_NEWNET;

/// Everything a child wrote on a report pipe before it exec'd or exited
/// (nothing when the exec succeeded).
fn read_report(report: OwnedFd, whose: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::from(report)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::operation_failed(format!("cannot read {whose} report: {e}")))?;
    Ok(bytes)
}

/// A null-terminated array of pointers into `strings`, for exec.
fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect()
}

/// The host objects a filesystem's source names must exist before
/// anything is attached or mounted; each refusal names the filesystem.
fn check_sources(container: &Container) -> Result<()> {
    for fs in &container.filesystems {
        let t = &fs.target;
        let missing = |what: &str, path: &Path| {
            Err(Error::operation_failed(format!("filesystem '{t}': {what} '{}' does not exist", path.display())))
        };
        match &fs.source {
            Source::Device(dev) => match std::fs::metadata(dev) {
                Ok(m) if m.file_type().is_block_device() => {}
                Ok(_) => {
                    return Err(Error::operation_failed(format!(
                        "filesystem '{t}': '{}' is not a block device",
                        dev.display()
                    )))
                }
                Err(_) => return missing("block device", dev),
            },
            Source::LoopImage(image) | Source::ServedChain(image) if !image.is_file() => {
                return missing("image", image)
            }
            Source::HostDir(dir) if !dir.is_dir() => return missing("directory", dir),
            _ => {}
        }
    }
    Ok(())
}

/// Starts the container `name` defined as `dom`; the caller holds the
/// domain lock and has found it shut off. Returns once its init runs, or
/// fails with the reason and nothing left behind. `paused`: its cgroup is
/// frozen while its first process waits, mounts made, just before the
/// exec, so the init runs its first instruction only once resumed.
pub fn start(store: &Store, name: &str, mut dom: Domain, paused: bool) -> Result<()> {
    let container = Container::from_domain(&dom)?;
    check_sources(&container)?;
    // The live XML shows the chains the storage daemons open.
    define::probe_missing_chains(&mut dom)?;
    let uuid = dom.uuid().ok_or_else(|| Error::internal(format!("domain '{name}' has no uuid")))?;
    let cgroup = status::cgroup2_root()?.join("strata-lxc").join(&uuid);
    // A container of another state root with the same UUID would share
    // it, and be killed with this one.
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    if !procs.trim().is_empty() {
        return Err(Error::operation_invalid(format!(
            "domain '{name}': cgroup '{}' holds processes already (a container with uuid {uuid} runs from another \
             state root?)",
            cgroup.display()
        )));
    }
    let run = status::runtime_dir(store, name)?;
    let stage = run.join("root");
    std::fs::create_dir_all(&stage).map_err(|e| Error::io("create", &stage, e))?;
    let mut record = LiveStatus {
        domain: dom,
        init: None,
        owner: ProcessId::this()?,
        starting: true,
        cgroup,
        loops: Vec::new(),
        served: Vec::new(),
        next_node: 0,
        pause: None,
        jobs: Vec::new(),
        next_job: 1,
    };
    store.write_status(name, &record.to_xml())?;
    let mut handles = Vec::new();
    let started = launch(store, name, &container, &stage, &mut record, &mut handles, paused);
    // The mounts hold the loop devices now (or nothing does): autoclear
    // detaches them when the container's last mount goes.
    drop(handles);
    match started {
        Ok(()) => {
            record.starting = false;
            store.write_status(name, &record.to_xml())
        }
        Err(e) => {
            if let Err(cleanup) = status::teardown(&Linux, &record).and_then(|()| status::forget(store, name)) {
                return Err(e.context(format!("and cleaning up after it failed too: {}", cleanup.report())));
            }
            Err(e)
        }
    }
}

/// The loop devices, the probe, the clone and the handshake; `record` and
/// `handles` keep what was attached, for the caller to release; `paused`
/// as for [`start`].
fn launch(
    store: &Store,
    name: &str,
    container: &Container,
    stage: &Path,
    record: &mut LiveStatus,
    handles: &mut Vec<OwnedFd>,
    paused: bool,
) -> Result<()> {
    let sys = Linux;
    let mut prepared = Vec::new();
    for fs in &container.filesystems {
        let device = |dev: &Path| -> Result<Prepared> {
            let fstype = probe::mount_type(probe::probe_device(dev, &fs.target)?).to_string();
            Ok(Prepared::Device { device: dev.to_path_buf(), fstype })
        };
        let p = match &fs.source {
            Source::Device(dev) => device(dev)?,
            Source::LoopImage(image) => {
                let LoopDevice { device: dev, handle } = attach(store, name, fs, image, &sys, record)?;
                handles.extend(handle);
                device(&dev)?
            }
            Source::ServedChain(_) => {
                let export = serve(store, name, fs, record)?;
                let LoopDevice { device: dev, handle } = attach(store, name, fs, &export, &sys, record)?;
                handles.extend(handle);
                device(&dev)?
            }
            Source::HostDir(dir) => Prepared::HostDir(dir.clone()),
            Source::Ram { kib } => Prepared::Ram { kib: *kib },
        };
        prepared.push((fs.clone(), p));
    }
    let steps = plan::child_steps(stage, &container.name, &prepared)?;
    let init = cstr(&container.init)?;
    let argv: Vec<CString> =
        std::iter::once(Ok(init.clone())).chain(container.init_args.iter().map(cstr)).collect::<Result<_>>()?;
    let envp: Vec<CString> = ["PATH=/bin:/sbin:/usr/bin:/usr/sbin", "container=lxc", "TERM=linux"]
        .into_iter()
        .map(cstr)
        .chain(std::iter::once(cstr(format!("HOSTNAME={name}"))))
        .collect::<Result<_>>()?;
    let (argv_ptrs, envp_ptrs) = (pointers(&argv), pointers(&envp));
    let console = store.domain_dir(name)?.join("console.log");
    let output = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&console)
        .map_err(|e| Error::io("open the container's console log", &console, e))?;
    let null = File::open("/dev/null").map_err(|e| Error::io("open", Path::new("/dev/null"), e))?;
    sys.cgroup_create(&record.cgroup)?;
    let (go_read, go_write) = pipe()?;
    let (report_read, report_write) = pipe()?;
    let (unshared_read, unshared_write) = pipe()?;
    let (held_read, held_write) = pipe()?;
    let child = ChildFds {
        go_read: go_read.as_raw_fd(),
        go_write: go_write.as_raw_fd(),
        report_read: report_read.as_raw_fd(),
        report_write: report_write.as_raw_fd(),
        unshared_read: unshared_read.as_raw_fd(),
        unshared_write: container.idmap.as_ref().map_or(-1, |_| unshared_write.as_raw_fd()),
        held_read: held_read.as_raw_fd(),
        held_write: if paused { held_write.as_raw_fd() } else { -1 },
        stdin: null.as_raw_fd(),
        output: output.as_raw_fd(),
    };
    let pid = sys
        .clone_namespaces(NAMESPACES)
        .map_err(|e| Error::operation_failed(format!("cannot create the container's namespaces: {e}")))?;
    if pid == 0 {
        child_main(&sys, child, &steps, &init, &argv_ptrs, &envp_ptrs);
    }
    drop((go_read, report_write, unshared_write, held_write, null, output));
    let mut reaped = Reaper { pid, reaped: false };
    let id =
        ProcessId::of(pid).ok_or_else(|| Error::operation_failed("the container's first process exited at once"))?;
    record.init = Some(id);
    store.write_status(name, &record.to_xml())?;
    strata_core::crash_point("lxc-start:recorded");
    sys.cgroup_attach(&record.cgroup, pid)?;
    let mut go = File::from(go_write);
    let release = |go: &mut File| {
        go.write_all(&[1])
            .map_err(|e| Error::operation_failed(format!("cannot release the container's first process: {e}")))
    };
    release(&mut go)?;
    if let Some(idmap) = &container.idmap {
        // Its mounts are made; once it is in its user namespace (or gone:
        // then its report says why), the maps are written and it goes on.
        if !read_report(unshared_read, "the container's user namespace")?.is_empty() {
            sys.write_id_maps(pid, &IdMap::map_text(&idmap.uid), &IdMap::map_text(&idmap.gid))?;
            release(&mut go)?;
        }
    }
    if paused && !read_report(held_read, "the container's first process")?.is_empty() {
        // It waits at its exec, its mounts made: frozen there (the freeze
        // returns once the kernel has it frozen), then released, it goes
        // on to the exec only once thawed. Its exec is not watched: an
        // init that cannot run leaves a container that is gone once resumed.
        sys.cgroup_freeze(&record.cgroup, true)?;
        release(&mut go)?;
        std::mem::forget(reaped);
        return Ok(());
    }
    drop(go);
    let report = read_report(report_read, "the container's start-up")?;
    if report.len() >= 8 {
        let index = u32::from_ne_bytes([report[0], report[1], report[2], report[3]]);
        let errno = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
        let err = os_reason(&std::io::Error::from_raw_os_error(errno));
        reaped.wait();
        let what = match steps.get(index as usize) {
            Some(PlannedStep { what, .. }) => format!("cannot {what}"),
            None if index == EXEC_STEP => format!("cannot run its init '{}'", container.init),
            None if index == USERNS_STEP => "cannot enter its user namespace (<idmap>)".into(),
            None => "its first process failed".into(),
        };
        return Err(Error::operation_failed(format!("domain '{name}' did not start: {what}: {err}")));
    }
    strata_core::crash_point("lxc-start:running");
    let deadline = Instant::now() + INIT_SETTLE;
    while Instant::now() < deadline {
        if let Some(status) = reaped.try_wait() {
            return Err(Error::operation_failed(format!(
                "domain '{name}' did not start: its init '{}' exited at once ({status}); see {}",
                container.init,
                console.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::mem::forget(reaped);
    Ok(())
}

/// Starts a storage daemon that serves the filesystem's recorded chain and
/// returns the file it exports it at. The daemon is recorded before it
/// starts and runs on after this process exits, outside the container's
/// cgroup (a frozen daemon would hang the filesystem's freeze); teardown
/// stops it once the loop device over its export is gone.
fn serve(store: &Store, name: &str, fs: &Mountable, record: &mut LiveStatus) -> Result<PathBuf> {
    let device = record.domain.find_storage_device(&fs.target)?;
    let dir = status::runtime_dir(store, name)?.join(format!("fs-{}", record.served.len()));
    let file = dir.join("export.raw");
    record.served.push(ServedFilesystem { target: fs.target.clone(), dir: dir.clone(), file: file.clone() });
    store.write_status(name, &record.to_xml())?;
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|e| Error::internal(format!("serving filesystem '{}' needs the async runtime: {e}", fs.target)))?;
    let served = runtime.block_on(fuse::serve_fuse(name, &device, &dir, &file))?;
    strata_core::crash_point("lxc-start:served");
    Ok(served.file().to_path_buf())
}

/// Attaches a filesystem's image to a loop device, unless a loop device
/// holds it already (two would each mount the filesystem and corrupt it),
/// and records the device before anything mounts it.
fn attach(
    store: &Store,
    name: &str,
    fs: &Mountable,
    image: &Path,
    sys: &dyn Syscall,
    record: &mut LiveStatus,
) -> Result<LoopDevice> {
    let image = std::fs::canonicalize(image).map_err(|e| Error::io("resolve the image", image, e))?;
    // One strata at a time looks for a free image and attaches it.
    let _attaching = store.lock_store_for("loop-attach")?;
    let holders = loop_devices_holding(&image);
    if let Some(holder) = holders.first() {
        return Err(Error::operation_invalid(format!(
            "filesystem '{}': image '{}' is attached to {} already (losetup -j lists it); \
             a second loop device on it would corrupt its filesystem",
            fs.target,
            image.display(),
            holder.display()
        )));
    }
    let attached = sys.loop_attach(&image, fs.readonly)?;
    record.loops.push(AttachedLoop { device: attached.device.clone(), image: image.clone() });
    store.write_status(name, &record.to_xml())?;
    Ok(attached)
}

/// Kills and reaps the container's first process if `start` fails;
/// forgotten once the init runs, which then outlives this process.
struct Reaper {
    pid: libc::pid_t,
    reaped: bool,
}

impl Reaper {
    /// Its exit, when it has exited: `status 1`, `killed by signal 9`.
    fn try_wait(&mut self) -> Option<String> {
        let mut status = 0;
        // SAFETY: waitpid(2) on our own child with a valid status pointer.
        let rc = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
        self.reaped |= rc == self.pid;
        (rc == self.pid).then(|| describe_exit(status))
    }

    fn wait(&mut self) {
        let mut status = 0;
        // SAFETY: as above, blocking until the child exits.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
        self.reaped = true;
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if !self.reaped {
            // SAFETY: kill(2) of our own unreaped child, whose pid cannot
            // be reused before the reap that follows.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            self.wait();
        }
    }
}

fn describe_exit(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("status {}", libc::WEXITSTATUS(status))
    } else {
        format!("killed by signal {}", libc::WTERMSIG(status))
    }
}

/// The descriptors the container's first process uses, as raw numbers.
#[derive(Clone, Copy)]
struct ChildFds {
    go_read: RawFd,
    go_write: RawFd,
    report_read: RawFd,
    report_write: RawFd,
    unshared_read: RawFd,
    /// Where it says it has entered its user namespace (closed after the
    /// byte); -1 without an `<idmap>`.
    unshared_write: RawFd,
    held_read: RawFd,
    /// Where it says it waits at its exec for a paused start (closed after
    /// the byte); -1 otherwise.
    held_write: RawFd,
    stdin: RawFd,
    output: RawFd,
}

/// The container's first process, between the clone and the exec: only
/// async-signal-safe calls (the parent has other threads), no allocation.
fn child_main(
    sys: &Linux,
    fds: ChildFds,
    steps: &[PlannedStep],
    init: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> ! {
    let report = |index: u32, errno: i32| -> ! {
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&index.to_ne_bytes());
        bytes[4..].copy_from_slice(&errno.to_ne_bytes());
        // SAFETY: write(2) of a local buffer to our pipe end, then _exit(2).
        unsafe {
            libc::write(fds.report_write, bytes.as_ptr().cast(), bytes.len());
            libc::_exit(1)
        }
    };
    // SAFETY: read(2) into a local byte from a pipe this process owns, and
    // _exit(2); async-signal-safe.
    let wait_for_parent = || unsafe {
        let mut go = 0u8;
        loop {
            match libc::read(fds.go_read, (&mut go as *mut u8).cast(), 1) {
                1 => break,
                -1 if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) => {}
                // The parent went away (without recording this process, or
                // without writing its id maps).
                _ => libc::_exit(1),
            }
        }
    };
    // SAFETY: close, setsid, dup2, signal and sigprocmask on descriptors and
    // local values this process owns; all async-signal-safe.
    unsafe {
        libc::close(fds.go_write);
        libc::close(fds.report_read);
        libc::close(fds.unshared_read);
        libc::close(fds.held_read);
        wait_for_parent();
        // A session of its own: no terminal strata ran in signals it.
        if libc::setsid() < 0 {
            report(EXEC_STEP, std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO));
        }
        if libc::dup2(fds.stdin, 0) < 0 || libc::dup2(fds.output, 1) < 0 || libc::dup2(fds.output, 2) < 0 {
            report(EXEC_STEP, std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO));
        }
        // Rust ignores SIGPIPE; the init starts with every signal at its default.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
    if let Err((index, err)) = plan::run_steps(sys, steps) {
        report(index as u32, err.raw_os_error().unwrap_or(libc::EIO));
    }
    if fds.unshared_write >= 0 {
        // With its mounts made, into a user namespace of its own, whose id
        // maps the parent writes.
        if let Err(err) = sys.unshare(libc::CLONE_NEWUSER) {
            report(USERNS_STEP, err.raw_os_error().unwrap_or(libc::EIO));
        }
        // SAFETY: write(2) of a local byte to our pipe end, and close(2).
        unsafe {
            libc::write(fds.unshared_write, [1u8].as_ptr().cast(), 1);
            libc::close(fds.unshared_write);
        }
        wait_for_parent();
        if let Err(err) = sys.become_root() {
            report(USERNS_STEP, err.raw_os_error().unwrap_or(libc::EIO));
        }
    }
    if fds.held_write >= 0 {
        // It may wait frozen for long: what the exec would close (every
        // descriptor of strata's, such as its domain lock's, all
        // close-on-exec) is closed now, or the next call would wait for
        // the lock.
        let mut keep = [0, 1, 2, fds.go_read, fds.report_write, fds.held_write];
        keep.sort_unstable();
        let mut from: libc::c_uint = 0;
        for fd in keep {
            let fd = fd as libc::c_uint;
            if fd > from {
                // SAFETY: close_range(2) of descriptors this process owns
                // and no longer uses; async-signal-safe.
                unsafe { libc::close_range(from, fd - 1, 0) };
            }
            from = from.max(fd + 1);
        }
        // SAFETY: close_range(2) as above, of the rest.
        unsafe { libc::close_range(from, libc::c_uint::MAX, 0) };
        // SAFETY: write(2) of a local byte to our pipe end, and close(2).
        unsafe {
            libc::write(fds.held_write, [1u8].as_ptr().cast(), 1);
            libc::close(fds.held_write);
        }
        wait_for_parent();
    }
    // SAFETY: execve(2) with NUL-terminated strings and null-terminated
    // pointer arrays that live until it returns (only on failure).
    unsafe { libc::execve(init.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    report(EXEC_STEP, std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
}

/// The namespaces `lxc-enter-namespace` joins, in the order it joins them
/// (the mount namespace last: it changes what `/proc` paths name).
const ENTERED: &[&str] = &["ipc", "uts", "net", "pid", "mnt"];

/// Directories searched for a command named without a `/`.
const SEARCH: &[&str] = &["/bin", "/sbin", "/usr/bin", "/usr/sbin"];

/// Runs `command` in the namespaces of the container whose init is
/// `init`, at its root, in its cgroup, with this process's standard I/O;
/// returns its exit status (128 + N for signal N, as a shell reports).
pub fn enter(init: ProcessId, cgroup: &Path, command: &[String]) -> Result<i32> {
    let program = command.first().ok_or_else(|| Error::invalid_arg("no command to run in the container"))?;
    let namespaces: Vec<File> = ENTERED
        .iter()
        .map(|ns| {
            let path = PathBuf::from(format!("/proc/{}/ns/{ns}", init.pid));
            File::open(&path).map_err(|e| Error::io("open the container's namespace", &path, e))
        })
        .collect::<Result<_>>()?;
    let root_path = PathBuf::from(format!("/proc/{}/root", init.pid));
    let root = File::open(&root_path).map_err(|e| Error::io("open the container's root", &root_path, e))?;
    let user_ns = own_user_namespace(init)?;
    if init.liveness() != strata_engine::process::Liveness::Alive {
        return Err(Error::operation_invalid("domain is not running"));
    }
    let candidates: Vec<CString> = if program.contains('/') {
        vec![cstr(program)?]
    } else {
        SEARCH.iter().map(|dir| cstr(format!("{dir}/{program}"))).collect::<Result<_>>()?
    };
    let argv: Vec<CString> = command.iter().map(cstr).collect::<Result<_>>()?;
    let envp: Vec<CString> =
        ["PATH=/bin:/sbin:/usr/bin:/usr/sbin", "container=lxc"].into_iter().map(cstr).collect::<Result<_>>()?;
    let (argv_ptrs, envp_ptrs) = (pointers(&argv), pointers(&envp));
    let procs_path = cgroup.join("cgroup.procs");
    let procs = OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .map_err(|e| Error::io("open the container's cgroup", &procs_path, e))?;
    let (report_read, report_write) = pipe()?;
    let ns_fds: Vec<RawFd> = namespaces.iter().map(AsRawFd::as_raw_fd).collect();
    // SAFETY: fork(2); the child makes only async-signal-safe calls
    // (setns, fchdir, chroot, write, fork, waitpid, chdir, execve, _exit) on values
    // prepared above, and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Error::operation_failed(format!("cannot fork: {}", std::io::Error::last_os_error())));
    }
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            enter_child(
                &ns_fds,
                root.as_raw_fd(),
                procs.as_raw_fd(),
                user_ns.as_ref().map_or(-1, AsRawFd::as_raw_fd),
                &candidates,
                &argv_ptrs,
                &envp_ptrs,
                report_write.as_raw_fd(),
            )
        }
    }
    drop(report_write);
    drop((namespaces, root, procs, user_ns));
    let mut status = 0;
    // SAFETY: waitpid(2) on our own child with a valid status pointer.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Err(Error::operation_failed(format!(
                "cannot wait for the command: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    let report = read_report(report_read, "the command's")?;
    if report.len() >= 4 {
        let errno = i32::from_ne_bytes([report[0], report[1], report[2], report[3]]);
        return Err(Error::operation_failed(format!(
            "cannot run '{program}' in the container: {}",
            os_reason(&std::io::Error::from_raw_os_error(errno))
        )));
    }
    Ok(if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) })
}

/// The user namespace of the container whose init is `init`, when it has
/// one of its own (an `<idmap>`): joined last, once the host's privileges
/// have joined the rest.
fn own_user_namespace(init: ProcessId) -> Result<Option<File>> {
    let inode =
        |path: &Path| std::fs::metadata(path).map(|m| (m.dev(), m.ino())).map_err(|e| Error::io("inspect", path, e));
    let theirs = PathBuf::from(format!("/proc/{}/ns/user", init.pid));
    if inode(&theirs)? == inode(Path::new("/proc/self/ns/user"))? {
        return Ok(None);
    }
    File::open(&theirs).map(Some).map_err(|e| Error::io("open the container's namespace", &theirs, e))
}

/// The forked child of [`enter`]: joins the namespaces and the cgroup,
/// takes the container's root (`root`, its init's `/proc/PID/root`, as
/// nsenter does: the mount namespace's own root is the host's, under the
/// pivot), joins the container's user namespace if it has one
/// (`user_ns`, -1 if not) as its root, forks once more (a pid namespace
/// holds only the children of whoever joins it), and passes on the
/// grandchild's exit status.
///
/// # Safety
/// Called only in a freshly forked child; every pointer is valid.
#[allow(clippy::too_many_arguments)]
unsafe fn enter_child(
    namespaces: &[RawFd],
    root: RawFd,
    procs: RawFd,
    user_ns: RawFd,
    candidates: &[CString],
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    report: RawFd,
) -> ! {
    let fail = |errno: i32| -> ! {
        let bytes = errno.to_ne_bytes();
        // SAFETY: write(2) of a local buffer to our pipe end, then _exit(2).
        unsafe {
            libc::write(report, bytes.as_ptr().cast(), bytes.len());
            libc::_exit(127)
        }
    };
    let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
    // SAFETY: the calls below are async-signal-safe and take descriptors
    // and NUL-terminated strings prepared by the parent.
    unsafe {
        for fd in namespaces {
            if libc::setns(*fd, 0) < 0 {
                fail(errno());
            }
        }
        if libc::fchdir(root) < 0 || libc::chroot(c".".as_ptr()) < 0 {
            fail(errno());
        }
        if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
            fail(errno());
        }
        if user_ns >= 0 && libc::setns(user_ns, libc::CLONE_NEWUSER) < 0 {
            fail(errno());
        }
        if user_ns >= 0 {
            if let Err(e) = Linux.become_root() {
                fail(e.raw_os_error().unwrap_or(libc::EIO));
            }
        }
        let pid = libc::fork();
        if pid < 0 {
            fail(errno());
        }
        if pid > 0 {
            let mut status = 0;
            while libc::waitpid(pid, &mut status, 0) < 0 {}
            libc::_exit(if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) });
        }
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        if libc::chdir(c"/".as_ptr()) < 0 {
            fail(errno());
        }
        let mut last = libc::ENOENT;
        for program in candidates {
            libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
            last = errno();
            if last != libc::ENOENT {
                break;
            }
        }
        fail(last)
    }
}
