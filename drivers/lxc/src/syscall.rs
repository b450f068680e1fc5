//! The one seam between the driver and the kernel (youki's `Syscall`
//! trait is the model): mounts, the root switch, namespaces, the hostname,
//! loop devices, cgroups (with their freezer), filesystem freezes and
//! signals. [`Linux`] makes the calls; the unit
//! tests hand the mount plan and the teardown a recorder instead, so the
//! order of the calls is checked without a kernel, while the integration
//! tests run the real thing.
//!
//! The calls a container's first process makes between `clone` and `exec`
//! (mount, mkdir, mknod, symlink, chdir, pivot_root, sethostname) take
//! C strings prepared before the clone and return `std::io::Error`s made
//! from `errno`, so that [`Linux`]'s versions allocate nothing: the child
//! of a multi-threaded process may only make async-signal-safe calls.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use strata_core::{Error, Result};

/// A loop device attached to an image, held open until the container has
/// mounted it (autoclear then detaches it when the last mount goes).
#[derive(Debug)]
pub struct LoopDevice {
    pub device: PathBuf,
    /// The open device; `None` in a recording.
    pub handle: Option<OwnedFd>,
}

/// A filesystem's mount opened for a freeze or a thaw: the open directory
/// keeps the mount reachable even if the container's init (whose
/// `/proc/PID/root` it was opened through) exits meanwhile.
#[derive(Debug)]
pub struct MountHandle {
    pub dir: PathBuf,
    /// The open directory; `None` in a recording.
    pub handle: Option<File>,
}

/// What the driver asks of the kernel.
pub trait Syscall {
    fn mount(
        &self,
        source: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: libc::c_ulong,
        data: Option<&CStr>,
    ) -> io::Result<()>;
    fn umount(&self, target: &CStr, flags: libc::c_int) -> io::Result<()>;
    fn pivot_root(&self, new_root: &CStr, put_old: &CStr) -> io::Result<()>;
    fn chdir(&self, dir: &CStr) -> io::Result<()>;
    /// Creates a directory; one that exists already is no error.
    fn mkdir(&self, path: &CStr, mode: libc::mode_t) -> io::Result<()>;
    fn mknod(&self, path: &CStr, mode: libc::mode_t, dev: libc::dev_t) -> io::Result<()>;
    fn symlink(&self, target: &CStr, link: &CStr) -> io::Result<()>;
    fn sethostname(&self, name: &CStr) -> io::Result<()>;
    /// `clone` into new namespaces (`CLONE_NEW*` flags) like `fork`: the
    /// child's pid in the parent, 0 in the child.
    fn clone_namespaces(&self, flags: libc::c_int) -> io::Result<libc::pid_t>;
    /// Moves this process into new namespaces (`unshare(2)`).
    fn unshare(&self, flags: libc::c_int) -> io::Result<()>;
    /// Makes this process root of its user namespace: no supplementary
    /// groups, group and user id 0 (raw system calls, for this thread
    /// alone: the child of a clone is the process's only thread).
    fn become_root(&self) -> io::Result<()>;
    /// Writes the user and group id maps of process `pid`'s user namespace
    /// (`/proc/PID/uid_map`, `gid_map`: `INSIDE OUTSIDE COUNT` lines).
    fn write_id_maps(&self, pid: libc::pid_t, uid_map: &str, gid_map: &str) -> Result<()>;
    /// Attaches `image` to a free loop device: buffered (no direct I/O),
    /// autoclear, read-only when asked.
    fn loop_attach(&self, image: &Path, readonly: bool) -> Result<LoopDevice>;
    /// Detaches `device` if it still holds `image` (a device another image
    /// reuses since is left alone), waiting until the kernel lets it go.
    fn loop_detach(&self, device: &Path, image: &Path) -> Result<()>;
    fn cgroup_create(&self, dir: &Path) -> Result<()>;
    fn cgroup_attach(&self, dir: &Path, pid: libc::pid_t) -> Result<()>;
    /// Kills every process in the cgroup (cgroup2's `cgroup.kill`).
    fn cgroup_kill(&self, dir: &Path) -> Result<()>;
    /// Freezes (`true`) or thaws the cgroup's processes, returning once the
    /// kernel reports it done (cgroup2's `cgroup.freeze`, `cgroup.events`).
    fn cgroup_freeze(&self, dir: &Path, frozen: bool) -> Result<()>;
    /// Removes the cgroup once its processes are gone; a missing one is
    /// no error.
    fn cgroup_remove(&self, dir: &Path) -> Result<()>;
    fn kill(&self, pid: libc::pid_t, signal: libc::c_int) -> Result<()>;
    /// Opens the directory `dir` (a mount point) for [`Syscall::fs_freeze`]
    /// and [`Syscall::fs_thaw`].
    fn open_mount(&self, dir: &Path) -> Result<MountHandle>;
    /// Freezes the filesystem `mount` is on (`FIFREEZE`): its dirty data
    /// and journal are written out, and its writers wait until the thaw.
    fn fs_freeze(&self, mount: &MountHandle) -> Result<()>;
    /// Thaws the filesystem `mount` is on (`FITHAW`); `false` when it was
    /// not frozen.
    fn fs_thaw(&self, mount: &MountHandle) -> Result<bool>;
}

/// The kernel itself.
pub struct Linux;

/// `-1` with `errno` as an `io::Result`.
fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn opt_ptr(s: Option<&CStr>) -> *const libc::c_char {
    s.map_or(std::ptr::null(), CStr::as_ptr)
}

const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;
/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` of `<linux/fs.h>`.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// `struct loop_info64` of `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; LO_NAME_SIZE],
    crypt_name: [u8; LO_NAME_SIZE],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config` of `<linux/loop.h>` (`LOOP_CONFIGURE`, Linux 5.8).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn loop_info(image: &Path, readonly: bool) -> LoopInfo64 {
    let mut file_name = [0u8; LO_NAME_SIZE];
    let bytes = image.as_os_str().as_encoded_bytes();
    let len = bytes.len().min(LO_NAME_SIZE - 1);
    file_name[..len].copy_from_slice(&bytes[..len]);
    LoopInfo64 {
        device: 0,
        inode: 0,
        rdevice: 0,
        offset: 0,
        sizelimit: 0,
        number: 0,
        encrypt_type: 0,
        encrypt_key_size: 0,
        flags: LO_FLAGS_AUTOCLEAR | if readonly { LO_FLAGS_READ_ONLY } else { 0 },
        file_name,
        crypt_name: [0; LO_NAME_SIZE],
        encrypt_key: [0; 32],
        init: [0; 2],
    }
}

/// The image a loop device holds, from sysfs; `None` when it holds none.
pub fn loop_backing_file(device: &Path) -> Option<PathBuf> {
    let name = device.file_name()?.to_str()?;
    let text = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    let text = text.trim_end_matches('\n');
    Some(PathBuf::from(text.strip_suffix(" (deleted)").unwrap_or(text)))
}

/// Whether the cgroup's processes are frozen (`frozen 1` in `cgroup.events`).
pub fn cgroup_frozen(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events")).is_ok_and(|events| events.lines().any(|l| l == "frozen 1"))
}

/// The loop devices that hold `image` now (what `losetup -j` lists).
pub fn loop_devices_holding(image: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else { return Vec::new() };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .map(|e| Path::new("/dev").join(e.file_name()))
        .filter(|dev| loop_backing_file(dev).as_deref() == Some(image))
        .collect();
    out.sort();
    out
}

impl Linux {
    /// One attach on a free device; `EBUSY` means another process took the
    /// device between `LOOP_CTL_GET_FREE` and the configure.
    fn try_loop_attach(image: &Path, image_file: &File, readonly: bool) -> io::Result<LoopDevice> {
        let control =
            OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open("/dev/loop-control")?;
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
        let number = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if number < 0 {
            return Err(io::Error::last_os_error());
        }
        let device = PathBuf::from(format!("/dev/loop{number}"));
        let handle = OpenOptions::new().read(true).write(!readonly).custom_flags(libc::O_CLOEXEC).open(&device)?;
        let config = LoopConfig {
            fd: image_file.as_raw_fd() as u32,
            block_size: 0,
            info: loop_info(image, readonly),
            reserved: [0; 8],
        };
        // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which
        // `LoopConfig` lays out exactly, from a pointer valid for the call.
        let rc = unsafe { libc::ioctl(handle.as_raw_fd(), LOOP_CONFIGURE, &config as *const LoopConfig) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if !matches!(err.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTTY)) {
                return Err(err);
            }
            // A kernel before 5.8: LOOP_SET_FD, then the flags.
            // SAFETY: LOOP_SET_FD takes the image's descriptor as its argument.
            check(unsafe { libc::ioctl(handle.as_raw_fd(), LOOP_SET_FD, image_file.as_raw_fd()) })?;
            let info = loop_info(image, readonly);
            // SAFETY: LOOP_SET_STATUS64 reads a `struct loop_info64`, laid
            // out by `LoopInfo64`, from a pointer valid for the call.
            let rc = unsafe { libc::ioctl(handle.as_raw_fd(), LOOP_SET_STATUS64, &info as *const LoopInfo64) };
            if rc < 0 {
                let err = io::Error::last_os_error();
                // SAFETY: LOOP_CLR_FD takes no argument.
                unsafe { libc::ioctl(handle.as_raw_fd(), LOOP_CLR_FD) };
                return Err(err);
            }
        }
        Ok(LoopDevice { device, handle: Some(handle.into()) })
    }
}

impl Syscall for Linux {
    fn mount(
        &self,
        source: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: libc::c_ulong,
        data: Option<&CStr>,
    ) -> io::Result<()> {
        // SAFETY: every pointer is a NUL-terminated string or null, valid for the call.
        check(unsafe { libc::mount(opt_ptr(source), target.as_ptr(), opt_ptr(fstype), flags, opt_ptr(data).cast()) })
    }

    fn umount(&self, target: &CStr, flags: libc::c_int) -> io::Result<()> {
        // SAFETY: a NUL-terminated path valid for the call.
        check(unsafe { libc::umount2(target.as_ptr(), flags) })
    }

    fn pivot_root(&self, new_root: &CStr, put_old: &CStr) -> io::Result<()> {
        // SAFETY: pivot_root(2) through syscall(2) with two NUL-terminated paths.
        let rc = unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) };
        check(rc as libc::c_int)
    }

    fn chdir(&self, dir: &CStr) -> io::Result<()> {
        // SAFETY: a NUL-terminated path valid for the call.
        check(unsafe { libc::chdir(dir.as_ptr()) })
    }

    fn mkdir(&self, path: &CStr, mode: libc::mode_t) -> io::Result<()> {
        // SAFETY: a NUL-terminated path valid for the call.
        match check(unsafe { libc::mkdir(path.as_ptr(), mode) }) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    fn mknod(&self, path: &CStr, mode: libc::mode_t, dev: libc::dev_t) -> io::Result<()> {
        // SAFETY: a NUL-terminated path valid for the call.
        check(unsafe { libc::mknod(path.as_ptr(), mode, dev) })
    }

    fn symlink(&self, target: &CStr, link: &CStr) -> io::Result<()> {
        // SAFETY: two NUL-terminated paths valid for the call.
        check(unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) })
    }

    fn sethostname(&self, name: &CStr) -> io::Result<()> {
        let bytes = name.to_bytes();
        // SAFETY: the pointer and length describe the name's bytes.
        check(unsafe { libc::sethostname(bytes.as_ptr().cast(), bytes.len()) })
    }

    fn clone_namespaces(&self, flags: libc::c_int) -> io::Result<libc::pid_t> {
        // SAFETY: clone(2) without a new stack behaves as fork(2): the
        // child runs on a copy of this thread's stack. Its callers make
        // only async-signal-safe calls in the child, then exec or _exit.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_clone,
                (flags | libc::SIGCHLD) as libc::c_ulong,
                std::ptr::null_mut::<libc::c_void>(),
                std::ptr::null_mut::<libc::c_int>(),
                std::ptr::null_mut::<libc::c_int>(),
                0 as libc::c_ulong,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc as libc::pid_t)
        }
    }

    fn unshare(&self, flags: libc::c_int) -> io::Result<()> {
        // SAFETY: unshare(2) takes flags only.
        check(unsafe { libc::unshare(flags) })
    }

    fn become_root(&self) -> io::Result<()> {
        // SAFETY: setgroups(2), setresgid(2) and setresuid(2) as raw system
        // calls (glibc's wrappers would signal threads a cloned child does
        // not have), with an empty group list and plain ids.
        unsafe {
            check(libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) as libc::c_int)?;
            check(libc::syscall(libc::SYS_setresgid, 0, 0, 0) as libc::c_int)?;
            check(libc::syscall(libc::SYS_setresuid, 0, 0, 0) as libc::c_int)
        }
    }

    fn write_id_maps(&self, pid: libc::pid_t, uid_map: &str, gid_map: &str) -> Result<()> {
        for (file, map) in [("uid_map", uid_map), ("gid_map", gid_map)] {
            let path = PathBuf::from(format!("/proc/{pid}/{file}"));
            // One write: the kernel takes a map whole or not at all.
            std::fs::write(&path, map).map_err(|e| Error::io("write the id map", &path, e))?;
        }
        Ok(())
    }

    fn loop_attach(&self, image: &Path, readonly: bool) -> Result<LoopDevice> {
        let image_file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .custom_flags(libc::O_CLOEXEC)
            .open(image)
            .map_err(|e| Error::io("open the image", image, e))?;
        let mut last = None;
        for _ in 0..20 {
            match Linux::try_loop_attach(image, &image_file, readonly) {
                Ok(device) => return Ok(device),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = Some(e),
                Err(e) => return Err(Error::io("attach a loop device to", image, e)),
            }
        }
        let busy = last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EBUSY));
        Err(Error::io("attach a loop device to", image, busy))
    }

    fn loop_detach(&self, device: &Path, image: &Path) -> Result<()> {
        if loop_backing_file(device).as_deref() != Some(image) {
            return Ok(());
        }
        let handle = match OpenOptions::new().read(true).custom_flags(libc::O_CLOEXEC).open(device) {
            Ok(h) => h,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("open the loop device", device, e)),
        };
        // SAFETY: LOOP_CLR_FD takes no argument. A device still in use is
        // only marked autoclear by it, and goes when its last user does.
        let rc = unsafe { libc::ioctl(handle.as_raw_fd(), LOOP_CLR_FD) };
        let err = io::Error::last_os_error();
        drop(handle);
        if rc < 0 && err.raw_os_error() != Some(libc::ENXIO) {
            return Err(Error::io("detach the loop device", device, err));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while loop_backing_file(device).as_deref() == Some(image) {
            if Instant::now() >= deadline {
                return Err(Error::operation_failed(format!(
                    "loop device '{}' still holds '{}' (something has it open or mounted)",
                    device.display(),
                    image.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn cgroup_create(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create the cgroup", dir, e))
    }

    fn cgroup_attach(&self, dir: &Path, pid: libc::pid_t) -> Result<()> {
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string()).map_err(|e| Error::io("move the container into", &procs, e))
    }

    fn cgroup_kill(&self, dir: &Path) -> Result<()> {
        let kill = dir.join("cgroup.kill");
        match std::fs::write(&kill, "1") {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other.map_err(|e| Error::io("kill the processes of", &kill, e)),
        }
    }

    fn cgroup_freeze(&self, dir: &Path, frozen: bool) -> Result<()> {
        let freeze = dir.join("cgroup.freeze");
        std::fs::write(&freeze, if frozen { "1" } else { "0" })
            .map_err(|e| Error::io(if frozen { "freeze" } else { "thaw" }, &freeze, e))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while cgroup_frozen(dir) != frozen {
            if Instant::now() >= deadline {
                return Err(Error::operation_failed(format!(
                    "cgroup '{}' did not {} within 30 s",
                    dir.display(),
                    if frozen { "freeze" } else { "thaw" }
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    fn cgroup_remove(&self, dir: &Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match std::fs::remove_dir(dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                // EBUSY while its last processes exit.
                Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(Error::io("remove the cgroup", dir, e)),
            }
        }
    }

    fn kill(&self, pid: libc::pid_t, signal: libc::c_int) -> Result<()> {
        // SAFETY: kill(2) has no memory-safety preconditions.
        match check(unsafe { libc::kill(pid, signal) }) {
            Err(e) if e.raw_os_error() != Some(libc::ESRCH) => {
                Err(Error::operation_failed(format!("cannot signal pid {pid}: {e}")))
            }
            _ => Ok(()),
        }
    }

    fn open_mount(&self, dir: &Path) -> Result<MountHandle> {
        let handle = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(dir)
            .map_err(|e| Error::io("open the mount point", dir, e))?;
        Ok(MountHandle { dir: dir.to_path_buf(), handle: Some(handle) })
    }

    fn fs_freeze(&self, mount: &MountHandle) -> Result<()> {
        let fd = mount_fd(mount)?;
        // SAFETY: FIFREEZE takes no argument beyond the descriptor of a
        // directory on the filesystem, open for the call.
        check(unsafe { libc::ioctl(fd, FIFREEZE, 0) }).map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => Error::operation_failed(format!(
                "the filesystem at '{}' is frozen already (by fsfreeze?); thaw it first",
                mount.dir.display()
            )),
            _ => Error::io("freeze the filesystem at", &mount.dir, e),
        })
    }

    fn fs_thaw(&self, mount: &MountHandle) -> Result<bool> {
        let fd = mount_fd(mount)?;
        // SAFETY: as for FIFREEZE.
        match check(unsafe { libc::ioctl(fd, FITHAW, 0) }) {
            Ok(()) => Ok(true),
            // Not frozen.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
            Err(e) => Err(Error::io("thaw the filesystem at", &mount.dir, e)),
        }
    }
}

fn mount_fd(mount: &MountHandle) -> Result<libc::c_int> {
    mount
        .handle
        .as_ref()
        .map(AsRawFd::as_raw_fd)
        .ok_or_else(|| Error::internal(format!("the mount at '{}' is not open", mount.dir.display())))
}

#[cfg(test)]
pub(crate) mod recording {
    //! A [`Syscall`] that records each call as a line and fails the calls
    //! a test names, for the unit tests of the mount plan and teardown.

    use std::cell::RefCell;
    use std::ffi::CStr;
    use std::io;
    use std::path::Path;

    use strata_core::{Error, Result};

    use super::{LoopDevice, MountHandle, Syscall};

    #[derive(Default)]
    pub struct Recorder {
        pub calls: RefCell<Vec<String>>,
        /// A call whose line starts with this fails with `EINVAL`.
        pub fail_on: Option<String>,
    }

    impl Recorder {
        pub fn failing(prefix: &str) -> Recorder {
            Recorder { fail_on: Some(prefix.to_string()), ..Default::default() }
        }

        pub fn lines(&self) -> Vec<String> {
            self.calls.borrow().clone()
        }

        fn record(&self, line: String) -> io::Result<()> {
            let fails = self.fail_on.as_deref().is_some_and(|p| line.starts_with(p));
            self.calls.borrow_mut().push(line);
            if fails {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                Ok(())
            }
        }

        fn record_result(&self, line: String) -> Result<()> {
            self.record(line.clone()).map_err(|e| Error::operation_failed(format!("{line}: {e}")))
        }
    }

    fn s(c: Option<&CStr>) -> String {
        c.map_or("-".into(), |c| c.to_string_lossy().into_owned())
    }

    impl Syscall for Recorder {
        fn mount(
            &self,
            source: Option<&CStr>,
            target: &CStr,
            fstype: Option<&CStr>,
            flags: libc::c_ulong,
            data: Option<&CStr>,
        ) -> io::Result<()> {
            self.record(format!("mount {} {} {} {flags:#x} {}", s(source), s(Some(target)), s(fstype), s(data)))
        }
        fn umount(&self, target: &CStr, flags: libc::c_int) -> io::Result<()> {
            self.record(format!("umount {} {flags}", s(Some(target))))
        }
        fn pivot_root(&self, new_root: &CStr, put_old: &CStr) -> io::Result<()> {
            self.record(format!("pivot_root {} {}", s(Some(new_root)), s(Some(put_old))))
        }
        fn chdir(&self, dir: &CStr) -> io::Result<()> {
            self.record(format!("chdir {}", s(Some(dir))))
        }
        fn mkdir(&self, path: &CStr, mode: libc::mode_t) -> io::Result<()> {
            self.record(format!("mkdir {} {mode:o}", s(Some(path))))
        }
        fn mknod(&self, path: &CStr, mode: libc::mode_t, dev: libc::dev_t) -> io::Result<()> {
            self.record(format!("mknod {} {mode:o} {}:{}", s(Some(path)), libc::major(dev), libc::minor(dev)))
        }
        fn symlink(&self, target: &CStr, link: &CStr) -> io::Result<()> {
            self.record(format!("symlink {} {}", s(Some(target)), s(Some(link))))
        }
        fn sethostname(&self, name: &CStr) -> io::Result<()> {
            self.record(format!("sethostname {}", s(Some(name))))
        }
        fn clone_namespaces(&self, flags: libc::c_int) -> io::Result<libc::pid_t> {
            self.record(format!("clone {flags:#x}")).map(|()| 4242)
        }
        fn unshare(&self, flags: libc::c_int) -> io::Result<()> {
            self.record(format!("unshare {flags:#x}"))
        }
        fn become_root(&self) -> io::Result<()> {
            self.record("become_root".into())
        }
        fn write_id_maps(&self, pid: libc::pid_t, uid_map: &str, gid_map: &str) -> Result<()> {
            self.record_result(format!("write_id_maps {pid} {uid_map:?} {gid_map:?}"))
        }
        fn loop_attach(&self, image: &Path, readonly: bool) -> Result<LoopDevice> {
            self.record_result(format!("loop_attach {} {readonly}", image.display()))?;
            Ok(LoopDevice { device: "/dev/loop7".into(), handle: None })
        }
        fn loop_detach(&self, device: &Path, image: &Path) -> Result<()> {
            self.record_result(format!("loop_detach {} {}", device.display(), image.display()))
        }
        fn cgroup_create(&self, dir: &Path) -> Result<()> {
            self.record_result(format!("cgroup_create {}", dir.display()))
        }
        fn cgroup_attach(&self, dir: &Path, pid: libc::pid_t) -> Result<()> {
            self.record_result(format!("cgroup_attach {} {pid}", dir.display()))
        }
        fn cgroup_kill(&self, dir: &Path) -> Result<()> {
            self.record_result(format!("cgroup_kill {}", dir.display()))
        }
        fn cgroup_freeze(&self, dir: &Path, frozen: bool) -> Result<()> {
            self.record_result(format!("cgroup_freeze {} {frozen}", dir.display()))
        }
        fn cgroup_remove(&self, dir: &Path) -> Result<()> {
            self.record_result(format!("cgroup_remove {}", dir.display()))
        }
        fn kill(&self, pid: libc::pid_t, signal: libc::c_int) -> Result<()> {
            self.record_result(format!("kill {pid} {signal}"))
        }
        fn open_mount(&self, dir: &Path) -> Result<MountHandle> {
            self.record_result(format!("open_mount {}", dir.display()))?;
            Ok(MountHandle { dir: dir.to_path_buf(), handle: None })
        }
        fn fs_freeze(&self, mount: &MountHandle) -> Result<()> {
            self.record_result(format!("fs_freeze {}", mount.dir.display()))
        }
        fn fs_thaw(&self, mount: &MountHandle) -> Result<bool> {
            self.record_result(format!("fs_thaw {}", mount.dir.display())).map(|()| true)
        }
    }
}
