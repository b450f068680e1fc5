//! What a container definition asks for, checked at define, and the steps
//! its first process takes between `clone` and `exec`: the root and the
//! other filesystems mounted inside its own mount namespace, `/proc`, a
//! minimal `/dev`, the hostname, and the switch to the new root.
//!
//! The steps are plain data built before the clone (every string a
//! `CString` already), so the child only walks them through the
//! [`Syscall`] seam; the unit tests walk them through a recorder.

use std::ffi::CString;
use std::io;
use std::path::{Component, Path, PathBuf};

use strata_core::xml::{Domain, Filesystem, FilesystemSource, FilesystemType};
use strata_core::{Error, Result};

use crate::syscall::Syscall;

/// Where a filesystem's contents come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `type='block'`: a host block device holding a filesystem.
    Device(PathBuf),
    /// `type='file'` with a raw loop driver: an image attached to a loop device.
    LoopImage(PathBuf),
    /// `type='file'` with a qcow2 loop driver: the image's chain served by
    /// a storage daemon as a FUSE-exported file, attached to a loop device.
    /// The path is the chain's top image.
    ServedChain(PathBuf),
    /// `type='mount'`: a host directory, bind-mounted.
    HostDir(PathBuf),
    /// `type='ram'`: a tmpfs of this many KiB.
    Ram { kib: u64 },
}

/// One `<filesystem>` of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mountable {
    /// `<target dir>`: `/` for the root.
    pub target: String,
    pub source: Source,
    pub readonly: bool,
}

/// What a definition asks to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub name: String,
    /// `<os><init>`, an absolute path inside the container.
    pub init: String,
    /// `<os><initarg>`s, in order.
    pub init_args: Vec<String>,
    /// The root first, then the others, each after the one it sits in.
    pub filesystems: Vec<Mountable>,
    /// `<idmap>`: the init runs in a user namespace of its own with these maps.
    pub idmap: Option<IdMap>,
}

/// One `<uid>` or `<gid>` of `<idmap>`: ids `start` to `start + count - 1`
/// in the container are `target` to `target + count - 1` on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub start: u32,
    pub target: u32,
    pub count: u32,
}

/// libvirt's `<idmap>`: the container's user and group ids as the host sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMap {
    pub uid: Vec<IdRange>,
    pub gid: Vec<IdRange>,
}

/// The kernel takes at most this many lines in a `uid_map` or `gid_map`.
const MAX_ID_RANGES: usize = 340;

impl IdMap {
    /// Reads and checks `<idmap>`: each `<uid>` and `<gid>` with numeric
    /// `start`, `target` and a non-zero `count` within the 32-bit ids, the
    /// ranges of each kind apart inside and on the host, and the
    /// container's root (id 0) mapped in both. Each refusal names the
    /// element.
    fn from_element(idmap: &strata_core::xml::Element) -> Result<IdMap> {
        let ranges = |kind: &str| -> Result<Vec<IdRange>> {
            let mut out: Vec<IdRange> = Vec::new();
            for el in idmap.children_named(kind) {
                let shown = format!(
                    "<idmap><{kind} start='{}' target='{}' count='{}'/>",
                    el.attr("start").unwrap_or_default(),
                    el.attr("target").unwrap_or_default(),
                    el.attr("count").unwrap_or_default()
                );
                let number = |attr: &str| -> Result<u32> {
                    el.attr(attr)
                        .and_then(|v| v.trim().parse().ok())
                        .ok_or_else(|| Error::xml(format!("{shown}: '{attr}' must be an id from 0 to {}", u32::MAX)))
                };
                let range = IdRange { start: number("start")?, target: number("target")?, count: number("count")? };
                let end = |from: u32| u64::from(from) + u64::from(range.count);
                if range.count == 0 || end(range.start) > 1 << 32 || end(range.target) > 1 << 32 {
                    return Err(Error::xml(format!(
                        "{shown}: 'count' must be at least 1, and the ids it maps must stay below 2^32"
                    )));
                }
                let overlaps = |a: u32, b: u32, n: u32| {
                    u64::from(a) < u64::from(b) + u64::from(n) && u64::from(b) < u64::from(a) + u64::from(range.count)
                };
                if let Some(other) = out
                    .iter()
                    .find(|o| overlaps(range.start, o.start, o.count) || overlaps(range.target, o.target, o.count))
                {
                    return Err(Error::xml(format!(
                        "{shown} overlaps <{kind} start='{}' target='{}' count='{}'/>",
                        other.start, other.target, other.count
                    )));
                }
                out.push(range);
            }
            if !out.iter().any(|r| r.start == 0) {
                return Err(Error::xml(format!(
                    "<idmap> maps no <{kind} start='0'>: the container's root must be mapped"
                )));
            }
            if out.len() > MAX_ID_RANGES {
                return Err(Error::xml(format!("<idmap> has more than {MAX_ID_RANGES} <{kind}> ranges")));
            }
            Ok(out)
        };
        Ok(IdMap { uid: ranges("uid")?, gid: ranges("gid")? })
    }

    /// The text of a `uid_map` or `gid_map` file for `ranges`.
    pub fn map_text(ranges: &[IdRange]) -> String {
        ranges.iter().map(|r| format!("{} {} {}\n", r.start, r.target, r.count)).collect()
    }
}

/// The KiB in `usage` `units` (libvirt's `<source usage units>`; KiB when
/// none is given).
fn ram_kib(target: &str, usage: u64, units: Option<&str>) -> Result<u64> {
    let scale: u64 = match units.unwrap_or("KiB") {
        "b" | "bytes" => return Ok(usage.div_ceil(1024)),
        "k" | "K" | "KiB" => 1,
        "KB" => return Ok((usage * 1000).div_ceil(1024)),
        "M" | "MiB" => 1024,
        "MB" => return Ok((usage * 1_000_000).div_ceil(1024)),
        "G" | "GiB" => 1024 * 1024,
        "GB" => return Ok((usage * 1_000_000_000).div_ceil(1024)),
        other => {
            return Err(Error::xml(format!(
                "filesystem '{target}' has <source units='{other}'>, which is not a unit (b, KiB, MiB, GiB, KB, MB, GB)"
            )))
        }
    };
    usage.checked_mul(scale).ok_or_else(|| Error::xml(format!("filesystem '{target}': <source usage> is too large")))
}

/// A target that names a place inside the container: absolute, with no
/// `.` or `..`.
fn check_target(target: &str) -> Result<()> {
    let path = Path::new(target);
    if !path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
        return Err(Error::xml(format!(
            "<filesystem> has <target dir='{target}'>, which is not an absolute path without '.' or '..'"
        )));
    }
    Ok(())
}

fn mountable(fs: &Filesystem) -> Result<Mountable> {
    let target = fs.target.clone();
    check_target(&target)?;
    let unsupported = |why: String| Err(Error::config_unsupported(format!("filesystem '{target}': {why}")));
    let source = match (&fs.fs_type, &fs.source) {
        (FilesystemType::Block, Some(FilesystemSource::Image(image))) => match image.local_path() {
            Some(dev) => Source::Device(dev.to_path_buf()),
            None => return unsupported(format!("a block filesystem needs a local device, not {image}")),
        },
        (FilesystemType::File, Some(FilesystemSource::Image(image))) => {
            let driver = fs.driver.driver_type.as_deref().unwrap_or("loop");
            let format = fs.driver.format.as_deref().unwrap_or("raw");
            if driver != "loop" {
                return unsupported(format!(
                    "<driver type='{driver}'> is not supported by the lxc driver (a file is attached through type='loop')"
                ));
            }
            match (format, image.local_path()) {
                ("raw", Some(file)) => Source::LoopImage(file.to_path_buf()),
                ("qcow2", Some(file)) => Source::ServedChain(file.to_path_buf()),
                ("raw" | "qcow2", None) => {
                    return unsupported(format!("a file filesystem needs a local image, not {image}"))
                }
                (other, _) => {
                    return unsupported(format!(
                        "<driver format='{other}'> is not supported by the lxc driver (raw images go on a loop \
                         device, qcow2 chains through qemu-storage-daemon)"
                    ))
                }
            }
        }
        (FilesystemType::Mount, Some(FilesystemSource::Dir(dir))) => {
            if !dir.is_absolute() {
                return Err(Error::xml(format!(
                    "filesystem '{target}' has <source dir='{}'>, which is not an absolute path",
                    dir.display()
                )));
            }
            Source::HostDir(dir.clone())
        }
        (FilesystemType::Ram, Some(FilesystemSource::Ram { usage, units })) => {
            Source::Ram { kib: ram_kib(&target, *usage, units.as_deref())? }
        }
        (FilesystemType::Mount, Some(FilesystemSource::Socket(_))) => {
            return unsupported("a virtiofs socket cannot be mounted in a container".into())
        }
        (other, _) => {
            return unsupported(format!(
                "type '{other}' is not supported by the lxc driver (block, file with a loop driver, mount and ram are)"
            ))
        }
    };
    Ok(Mountable { target, source, readonly: fs.readonly })
}

impl Container {
    /// Reads and checks a definition: `<os><type>exe</type>` with an
    /// absolute `<init>`, a root filesystem, sources it can mount. Each
    /// refusal names the element at fault.
    pub fn from_domain(dom: &Domain) -> Result<Container> {
        let os = dom.element().child("os");
        let os_type = os.and_then(|o| o.child_text("type")).unwrap_or_default();
        if os_type.trim() != "exe" {
            return Err(Error::config_unsupported(format!(
                "an lxc domain needs <os><type>exe</type></os>, not '{}'",
                os_type.trim()
            )));
        }
        let init = os.and_then(|o| o.child_text("init")).map(|t| t.trim().to_string()).unwrap_or_default();
        if init.is_empty() {
            return Err(Error::xml("an lxc domain needs <os><init> naming the program to run as the container's init"));
        }
        if !init.starts_with('/') {
            return Err(Error::xml(format!("<os><init>{init}</init> must be an absolute path inside the container")));
        }
        let init_args =
            os.map(|o| o.children_named("initarg").map(|a| a.text()).collect::<Vec<_>>()).unwrap_or_default();
        let mut filesystems = Vec::new();
        for fs in dom.filesystems()? {
            // Two with one target are refused when the document is read.
            filesystems.push(mountable(&fs)?);
        }
        if !filesystems.iter().any(|f| f.target == "/") {
            return Err(Error::xml("no <filesystem> has <target dir='/'>: an lxc domain needs a root filesystem"));
        }
        // The root first, and every filesystem after those it sits in.
        filesystems.sort_by_key(|f| if f.target == "/" { 0 } else { Path::new(&f.target).components().count() });
        let idmap = dom.element().child("idmap").map(IdMap::from_element).transpose()?;
        Ok(Container { name: dom.name(), init, init_args, filesystems, idmap })
    }
}

/// A filesystem ready to mount: its source resolved to what `mount` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// A block device (a `type='block'` device, or the loop device of an
    /// image) with the filesystem type its superblock shows.
    Device {
        device: PathBuf,
        fstype: String,
    },
    HostDir(PathBuf),
    Ram {
        kib: u64,
    },
}

/// One call the container's first process makes, with what it is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Mount {
        source: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    MakeDir(CString),
    MakeNode {
        path: CString,
        mode: libc::mode_t,
        dev: libc::dev_t,
    },
    Symlink {
        target: CString,
        link: CString,
    },
    Chdir(CString),
    /// `pivot_root(".", ".")`: the new root over the old one, which the
    /// next step detaches.
    PivotRoot,
    DetachOldRoot,
    SetHostname(CString),
}

/// A step and the words an error in it is reported with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedStep {
    pub step: Step,
    pub what: String,
}

/// `s` as a C string for the kernel; one holding a NUL byte is refused.
pub(crate) fn cstr(s: impl AsRef<std::ffi::OsStr>) -> Result<CString> {
    let s = s.as_ref();
    CString::new(s.as_encoded_bytes())
        .map_err(|_| Error::invalid_arg(format!("'{}' holds a NUL byte", s.to_string_lossy())))
}

/// `target` (`/data`) under the staging directory `stage`.
fn under(stage: &Path, target: &str) -> PathBuf {
    match target.trim_start_matches('/') {
        "" => stage.to_path_buf(),
        inside => stage.join(inside),
    }
}

/// The device nodes of the container's `/dev`: (name, major, minor).
const DEVICES: &[(&str, u32, u32)] =
    &[("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0)];

/// The steps that build the container's filesystem tree at `stage` (a
/// directory on the host, mounted on only in the container's namespace)
/// and switch to it, with the hostname `hostname`. `filesystems` is in
/// [`Container::filesystems`]' order.
pub fn child_steps(stage: &Path, hostname: &str, filesystems: &[(Mountable, Prepared)]) -> Result<Vec<PlannedStep>> {
    let mut steps = Vec::new();
    let mut push = |step: Step, what: String| steps.push(PlannedStep { step, what });
    push(
        Step::Mount {
            source: None,
            target: cstr("/")?,
            fstype: None,
            flags: libc::MS_REC | libc::MS_PRIVATE,
            data: None,
        },
        "make the container's mounts private".into(),
    );
    for (fs, prepared) in filesystems {
        let at = under(stage, &fs.target);
        if fs.target != "/" {
            // Each missing directory on the way, in the filesystems mounted so far.
            let mut dir = stage.to_path_buf();
            for part in Path::new(&fs.target).components().skip(1) {
                dir.push(part);
                push(
                    Step::MakeDir(cstr(&dir)?),
                    format!("create the mount point {} of filesystem '{}'", fs.target, fs.target),
                );
            }
        }
        let ro = if fs.readonly { libc::MS_RDONLY } else { 0 };
        let target = cstr(&at)?;
        match prepared {
            Prepared::Device { device, fstype } => push(
                Step::Mount { source: Some(cstr(device)?), target, fstype: Some(cstr(fstype)?), flags: ro, data: None },
                format!("mount {} ({fstype}) as filesystem '{}'", device.display(), fs.target),
            ),
            Prepared::HostDir(dir) => {
                push(
                    Step::Mount {
                        source: Some(cstr(dir)?),
                        target: target.clone(),
                        fstype: None,
                        flags: libc::MS_BIND | libc::MS_REC,
                        data: None,
                    },
                    format!("bind-mount {} as filesystem '{}'", dir.display(), fs.target),
                );
                if fs.readonly {
                    push(
                        Step::Mount {
                            source: None,
                            target,
                            fstype: None,
                            flags: libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                            data: None,
                        },
                        format!("make filesystem '{}' read-only", fs.target),
                    );
                }
            }
            Prepared::Ram { kib } => push(
                Step::Mount {
                    source: Some(cstr("tmpfs")?),
                    target,
                    fstype: Some(cstr("tmpfs")?),
                    flags: ro,
                    data: Some(cstr(format!("size={kib}k,mode=755"))?),
                },
                format!("mount a {kib} KiB tmpfs as filesystem '{}'", fs.target),
            ),
        }
    }
    let proc_dir = under(stage, "/proc");
    push(Step::MakeDir(cstr(&proc_dir)?), "create /proc".into());
    push(
        Step::Mount {
            source: Some(cstr("proc")?),
            target: cstr(&proc_dir)?,
            fstype: Some(cstr("proc")?),
            flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data: None,
        },
        "mount /proc".into(),
    );
    let dev = under(stage, "/dev");
    push(Step::MakeDir(cstr(&dev)?), "create /dev".into());
    push(
        Step::Mount {
            source: Some(cstr("tmpfs")?),
            target: cstr(&dev)?,
            fstype: Some(cstr("tmpfs")?),
            flags: libc::MS_NOSUID,
            data: Some(cstr("size=64k,mode=755")?),
        },
        "mount a tmpfs on /dev".into(),
    );
    for (name, major, minor) in DEVICES {
        push(
            Step::MakeNode {
                path: cstr(dev.join(name))?,
                mode: libc::S_IFCHR | 0o666,
                dev: libc::makedev(*major, *minor),
            },
            format!("create /dev/{name}"),
        );
    }
    let pts = dev.join("pts");
    push(Step::MakeDir(cstr(&pts)?), "create /dev/pts".into());
    push(
        Step::Mount {
            source: Some(cstr("devpts")?),
            target: cstr(&pts)?,
            fstype: Some(cstr("devpts")?),
            flags: libc::MS_NOSUID | libc::MS_NOEXEC,
            data: Some(cstr("newinstance,ptmxmode=0666,mode=0620")?),
        },
        "mount devpts on /dev/pts".into(),
    );
    push(Step::Symlink { target: cstr("pts/ptmx")?, link: cstr(dev.join("ptmx"))? }, "link /dev/ptmx".into());
    push(Step::SetHostname(cstr(hostname)?), format!("set the hostname to '{hostname}'"));
    push(Step::Chdir(cstr(stage)?), "enter the new root".into());
    push(Step::PivotRoot, "switch to the new root (pivot_root)".into());
    push(Step::DetachOldRoot, "detach the host's root".into());
    push(Step::Chdir(cstr("/")?), "enter /".into());
    Ok(steps)
}

/// Takes `steps` in order through `sys`; on the first failure, its index
/// and error. Allocates nothing: it runs in the child of a clone.
pub fn run_steps(sys: &dyn Syscall, steps: &[PlannedStep]) -> std::result::Result<(), (usize, io::Error)> {
    let dot = c".";
    for (index, planned) in steps.iter().enumerate() {
        let done = match &planned.step {
            Step::Mount { source, target, fstype, flags, data } => {
                sys.mount(source.as_deref(), target, fstype.as_deref(), *flags, data.as_deref())
            }
            Step::MakeDir(path) => sys.mkdir(path, 0o755),
            Step::MakeNode { path, mode, dev } => sys.mknod(path, *mode, *dev),
            Step::Symlink { target, link } => sys.symlink(target, link),
            Step::Chdir(dir) => sys.chdir(dir),
            Step::PivotRoot => sys.pivot_root(dot, dot),
            Step::DetachOldRoot => sys.umount(dot, libc::MNT_DETACH),
            Step::SetHostname(name) => sys.sethostname(name),
        };
        done.map_err(|e| (index, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::recording::Recorder;

    fn domain(filesystems: &str, os: &str) -> Domain {
        Domain::parse(&format!(
            "<domain type='lxc'><name>ct1</name><memory>65536</memory><os>{os}</os><devices>{filesystems}</devices></domain>"
        ))
        .expect("domain XML")
    }

    const OS: &str = "<type>exe</type><init>/bin/sh</init><initarg>-c</initarg><initarg>sleep 100</initarg>";

    fn refusal(filesystems: &str, os: &str) -> String {
        Container::from_domain(&domain(filesystems, os)).expect_err("refused").to_string()
    }

    #[test]
    fn a_definition_gives_the_init_and_the_filesystems_root_first() {
        let c = Container::from_domain(&domain(
            "<filesystem type='ram'><source usage='2' units='MiB'/><target dir='/tmp/a/b'/></filesystem>\
             <filesystem type='mount'><source dir='/srv/data'/><target dir='/data'/><readonly/></filesystem>\
             <filesystem type='file' accessmode='passthrough'><driver type='loop' format='raw'/>\
             <source file='/img/root.raw'/><target dir='/'/></filesystem>\
             <filesystem type='file'><driver type='loop' format='qcow2'/>\
             <source file='/img/var.qcow2'/><target dir='/var'/></filesystem>",
            OS,
        ))
        .expect("a valid container");
        assert_eq!((c.name.as_str(), c.init.as_str()), ("ct1", "/bin/sh"));
        assert_eq!(c.init_args, ["-c", "sleep 100"]);
        let targets: Vec<&str> = c.filesystems.iter().map(|f| f.target.as_str()).collect();
        assert_eq!(targets, ["/", "/data", "/var", "/tmp/a/b"]);
        let var = c.filesystems.iter().find(|f| f.target == "/var").expect("/var");
        assert_eq!(var.source, Source::ServedChain("/img/var.qcow2".into()));
        assert_eq!(c.filesystems[0].source, Source::LoopImage("/img/root.raw".into()));
        assert_eq!(
            c.filesystems[1],
            Mountable { target: "/data".into(), source: Source::HostDir("/srv/data".into()), readonly: true }
        );
        assert_eq!(c.filesystems[3].source, Source::Ram { kib: 2048 });
    }

    #[test]
    fn each_bad_definition_is_refused_naming_the_element() {
        let root = "<filesystem type='block'><source dev='/dev/sdz'/><target dir='/'/></filesystem>";
        assert!(refusal(root, "<type>hvm</type><init>/bin/sh</init>").contains("<os><type>exe</type></os>, not 'hvm'"));
        assert!(refusal(root, "<type>exe</type>").contains("needs <os><init>"));
        assert!(refusal(root, "<type>exe</type><init>sbin/init</init>")
            .contains("<os><init>sbin/init</init> must be an absolute path"));
        let data = "<filesystem type='mount'><source dir='/srv'/><target dir='/data'/></filesystem>";
        assert!(refusal(data, OS).contains("no <filesystem> has <target dir='/'>"));
        let vmdk = "<filesystem type='file'><driver type='loop' format='vmdk'/><source file='/i.vmdk'/><target dir='/'/></filesystem>";
        assert!(refusal(vmdk, OS).contains("filesystem '/': <driver format='vmdk'> is not supported by the lxc driver"));
        let nbd = "<filesystem type='file'><driver type='nbd'/><source file='/i.raw'/><target dir='/'/></filesystem>";
        assert!(refusal(nbd, OS).contains("<driver type='nbd'> is not supported"));
        let up = "<filesystem type='mount'><source dir='/srv'/><target dir='/a/../b'/></filesystem>";
        assert!(refusal(&format!("{root}{up}"), OS).contains("<target dir='/a/../b'>"));
        let units = "<filesystem type='ram'><source usage='1' units='parsecs'/><target dir='/'/></filesystem>";
        assert!(refusal(units, OS).contains("<source units='parsecs'>"));
        let template = "<filesystem type='template'><source name='t'/><target dir='/'/></filesystem>";
        assert!(refusal(template, OS).contains("type 'template' is not supported by the lxc driver"));
    }

    fn idmapped(idmap: &str) -> Result<Container> {
        let root = "<filesystem type='mount'><source dir='/srv'/><target dir='/'/></filesystem>";
        let xml = format!("<domain type='lxc'><name>ct1</name><os>{OS}</os>{idmap}<devices>{root}</devices></domain>");
        Container::from_domain(&Domain::parse(&xml).expect("domain XML"))
    }

    #[test]
    fn an_idmap_gives_the_maps_the_kernel_takes() {
        let c = idmapped(
            "<idmap><uid start='0' target='100000' count='65536'/><uid start='65536' target='300000' count='1'/>\
             <gid start='0' target='200000' count='65536'/></idmap>",
        )
        .expect("a valid idmap");
        let map = c.idmap.expect("the idmap");
        assert_eq!(IdMap::map_text(&map.uid), "0 100000 65536\n65536 300000 1\n");
        assert_eq!(IdMap::map_text(&map.gid), "0 200000 65536\n");
        assert_eq!(idmapped("").expect("no idmap").idmap, None);
    }

    #[test]
    fn a_malformed_idmap_is_refused_naming_the_element() {
        let gid = "<gid start='0' target='100000' count='65536'/>";
        let cases = [
            (format!("<idmap><uid start='0' target='100000'/>{gid}</idmap>"), "<idmap><uid start='0' target='100000' count=''/>: 'count' must be an id"),
            (format!("<idmap><uid start='0' target='x' count='1'/>{gid}</idmap>"), "'target' must be an id"),
            (format!("<idmap><uid start='0' target='1' count='0'/>{gid}</idmap>"), "'count' must be at least 1"),
            (format!("<idmap><uid start='0' target='4294967295' count='2'/>{gid}</idmap>"), "stay below 2^32"),
            (format!("<idmap><uid start='1' target='100000' count='10'/>{gid}</idmap>"), "<idmap> maps no <uid start='0'>"),
            ("<idmap><uid start='0' target='100000' count='10'/></idmap>".to_string(), "<idmap> maps no <gid start='0'>"),
            (
                format!("<idmap><uid start='0' target='100000' count='10'/><uid start='5' target='200000' count='10'/>{gid}</idmap>"),
                "<idmap><uid start='5' target='200000' count='10'/> overlaps <uid start='0' target='100000' count='10'/>",
            ),
        ];
        for (idmap, expected) in cases {
            let err = idmapped(&idmap).expect_err("refused").to_string();
            assert!(err.contains(expected), "{idmap}: expected {expected:?} in {err}");
        }
    }

    fn planned(fs: &[(Mountable, Prepared)]) -> Vec<PlannedStep> {
        child_steps(Path::new("/run/ct1/root"), "ct1", fs).expect("steps")
    }

    fn mount(target: &str, source: Source, readonly: bool) -> Mountable {
        Mountable { target: target.into(), source, readonly }
    }

    /// The plan mounts the root, then what sits in it (creating its mount
    /// point), then /proc and /dev, and pivots last, all through the seam.
    #[test]
    fn the_mount_plan_builds_the_tree_in_order_and_pivots_last() {
        let fs = [
            (
                mount("/", Source::LoopImage("/img/r.raw".into()), true),
                Prepared::Device { device: "/dev/loop7".into(), fstype: "ext4".into() },
            ),
            (mount("/srv/data", Source::HostDir("/host/data".into()), true), Prepared::HostDir("/host/data".into())),
            (mount("/tmp", Source::Ram { kib: 1024 }, false), Prepared::Ram { kib: 1024 }),
        ];
        let steps = planned(&fs);
        let sys = Recorder::default();
        run_steps(&sys, &steps).expect("every step passes");
        let lines = sys.lines();
        let expected_start = [
            "mount - / - 0x44000 -",
            "mount /dev/loop7 /run/ct1/root ext4 0x1 -",
            "mkdir /run/ct1/root/srv 755",
            "mkdir /run/ct1/root/srv/data 755",
            "mount /host/data /run/ct1/root/srv/data - 0x5000 -",
            "mount - /run/ct1/root/srv/data - 0x1021 -",
            "mkdir /run/ct1/root/tmp 755",
            "mount tmpfs /run/ct1/root/tmp tmpfs 0x0 size=1024k,mode=755",
            "mkdir /run/ct1/root/proc 755",
            "mount proc /run/ct1/root/proc proc 0xe -",
            "mkdir /run/ct1/root/dev 755",
            "mount tmpfs /run/ct1/root/dev tmpfs 0x2 size=64k,mode=755",
            "mknod /run/ct1/root/dev/null 20666 1:3",
        ];
        assert_eq!(lines[..expected_start.len()], expected_start);
        let expected_end = [
            "mount devpts /run/ct1/root/dev/pts devpts 0xa newinstance,ptmxmode=0666,mode=0620",
            "symlink pts/ptmx /run/ct1/root/dev/ptmx",
            "sethostname ct1",
            "chdir /run/ct1/root",
            "pivot_root . .",
            "umount . 2",
            "chdir /",
        ];
        assert_eq!(lines[lines.len() - expected_end.len()..], expected_end);
        for node in ["zero 20666 1:5", "full 20666 1:7", "random 20666 1:8", "urandom 20666 1:9", "tty 20666 5:0"] {
            assert!(lines.contains(&format!("mknod /run/ct1/root/dev/{node}")), "{node} in {lines:#?}");
        }
    }

    /// A failing step stops the plan there, and its index names what failed.
    #[test]
    fn a_failing_step_stops_the_plan_and_is_named() {
        let fs = [(
            mount("/", Source::Device("/dev/sdz".into()), false),
            Prepared::Device { device: "/dev/sdz".into(), fstype: "xfs".into() },
        )];
        let steps = planned(&fs);
        let sys = Recorder::failing("mount /dev/sdz");
        let (index, err) = run_steps(&sys, &steps).expect_err("the root mount fails");
        assert_eq!(steps[index].what, "mount /dev/sdz (xfs) as filesystem '/'");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        assert_eq!(sys.lines().len(), 2, "nothing after the failed mount: {:#?}", sys.lines());
    }
}
