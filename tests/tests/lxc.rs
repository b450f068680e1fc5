//! The LXC driver against the real kernel: containers with a busybox
//! userland started on each root kind (a block device, a raw image on a
//! loop device, a host directory, memory), entered with
//! `lxc-enter-namespace`, and stopped; failed starts and a `strata` killed
//! mid-start, each checked to leave no mount, loop device, cgroup or
//! process behind. Run as root (namespaces, mounts and loop devices).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use std::time::Duration;

use common::{
    busybox_image, busybox_root, killed_at, mounted_at, qemu_chain, qemu_img, Background, TestEnv, JOB_STEPS,
};

const MIB: u64 = 1024 * 1024;

/// A container definition: `init` (with its args) on the `<filesystem>`
/// elements given.
fn container_xml(name: &str, init: &[&str], filesystems: &str) -> String {
    let (program, args) = init.split_first().expect("an init");
    let args: String = args.iter().map(|a| format!("<initarg>{a}</initarg>")).collect();
    format!(
        "<domain type='lxc'><name>{name}</name><memory unit='KiB'>65536</memory>\
         <os><type>exe</type><init>{program}</init>{args}</os><devices>{filesystems}</devices></domain>"
    )
}

fn loop_root(image: &Path) -> String {
    format!(
        "<filesystem type='file' accessmode='passthrough'><driver type='loop' format='raw'/>\
         <source file='{}'/><target dir='/'/></filesystem>",
        image.display()
    )
}

fn qcow2_root(top: &Path) -> String {
    qcow2_fs(top, "/")
}

fn qcow2_fs(top: &Path, target: &str) -> String {
    format!(
        "<filesystem type='file' accessmode='passthrough'><driver type='loop' format='qcow2'/>\
         <source file='{}'/><target dir='{target}'/></filesystem>",
        top.display()
    )
}

/// A 3-deep qcow2 chain holding busybox: the base converted from the ext4
/// image, two empty overlays over it; returns the layers, top first.
fn busybox_chain(env: &TestEnv) -> [PathBuf; 3] {
    let raw = env.path("busybox.raw");
    busybox_image(&env.path("tree"), &raw, 64);
    let [top, mid, base] = [env.path("top.qcow2"), env.path("mid.qcow2"), env.path("base.qcow2")];
    let s = |p: &Path| p.to_str().expect("utf8").to_string();
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", &s(&raw), &s(&base)]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &s(&base), &s(&mid)]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &s(&mid), &s(&top)]);
    [top, mid, base]
}

/// The FUSE export and the storage daemon's pid of the one qcow2
/// filesystem a container's record (`status.xml`) shows served.
fn served_root(status: &str) -> (PathBuf, i32) {
    let dir = PathBuf::from(attr(status, "dir").expect("the daemon's directory is recorded"));
    let export = PathBuf::from(attr(status, "file").expect("the export is recorded"));
    let daemon = std::fs::read_to_string(dir.join("storage-daemon.pid"))
        .expect("the daemon's process record")
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a pid");
    (export, daemon)
}

fn block_root(device: &Path) -> String {
    format!("<filesystem type='block'><source dev='{}'/><target dir='/'/></filesystem>", device.display())
}

fn bind(dir: &Path, target: &str) -> String {
    format!("<filesystem type='mount'><source dir='{}'/><target dir='{target}'/></filesystem>", dir.display())
}

const SLEEPER: &[&str] = &["/bin/sleep", "1000"];

/// Defines `name`, a container sleeping on a raw ext4 image with busybox
/// (attached through a loop device at start); returns the image.
fn sleeper_on_raw_image(env: &TestEnv, name: &str) -> PathBuf {
    let image = env.path("root.raw");
    busybox_image(&env.path("tree"), &image, 64);
    env.define(name, &container_xml(name, SLEEPER, &loop_root(&image)));
    image
}

/// A loop device the test attaches itself, standing in for an LV; detached
/// (by its path) when the test ends.
struct TestLoop(PathBuf);

impl TestLoop {
    fn attach(image: &Path) -> TestLoop {
        let out = Command::new("losetup").args(["--find", "--show"]).arg(image).output().expect("run losetup");
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        TestLoop(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    }
}

impl Drop for TestLoop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// What a running container holds, read from its record: the init's pid,
/// its cgroup and its loop devices.
struct Held {
    init: i32,
    cgroup: PathBuf,
    status: String,
}

fn attr<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let start = xml.find(&format!(" {name}='"))? + name.len() + 3;
    let end = xml[start..].find('\'')? + start;
    Some(&xml[start..end])
}

fn held(env: &TestEnv, name: &str) -> Held {
    let status = std::fs::read_to_string(env.state_root().join("domains").join(name).join("status.xml"))
        .expect("a running container's status.xml");
    Held {
        init: attr(&status, "init").and_then(|p| p.parse().ok()).expect("the init's pid"),
        cgroup: PathBuf::from(attr(&status, "cgroup").expect("the cgroup")),
        status,
    }
}

/// Starts `name` and guards it: what it holds, and the guard that destroys it.
fn start_guarded<'a>(env: &'a TestEnv, name: &str) -> (Held, ContainerGuard<'a>) {
    env.ok(&["start", name]);
    let held = held(env, name);
    let guard = ContainerGuard { env, name: name.into(), init: Some(held.init) };
    (held, guard)
}

/// Destroys the container when the test ends, and kills its init by pid
/// if destroy did not.
struct ContainerGuard<'a> {
    env: &'a TestEnv,
    name: String,
    init: Option<i32>,
}

impl Drop for ContainerGuard<'_> {
    fn drop(&mut self) {
        let _ = self.env.strata(&["destroy", &self.name]);
        if let Some(pid) = self.init.filter(|pid| alive(*pid)) {
            // SAFETY: kill(2) on the init this test's container recorded.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

fn losetup_j(image: &Path) -> String {
    let out = Command::new("losetup").arg("-j").arg(image).output().expect("run losetup -j");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn host_mounts() -> String {
    std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo")
}

/// Nothing of the container is left: no status, no process, no cgroup, no
/// loop device on `image`, no host mount under the state root.
fn assert_nothing_left(env: &TestEnv, name: &str, init: Option<i32>, cgroup: Option<&Path>, image: Option<&Path>) {
    let dir = env.state_root().join("domains").join(name);
    assert!(!dir.join("status.xml").exists(), "{name}: a status record is left");
    assert!(!dir.join("run").exists(), "{name}: its staging directory is left");
    if let Some(pid) = init {
        assert!(!alive(pid), "{name}: its init {pid} still runs");
    }
    if let Some(cgroup) = cgroup {
        assert!(!cgroup.exists(), "{name}: cgroup {} is left", cgroup.display());
    }
    if let Some(image) = image {
        assert_eq!(losetup_j(image), "", "{name}: a loop device still holds {}", image.display());
    }
    let state = env.state_root().display().to_string();
    assert!(!host_mounts().contains(&state), "{name}: a host mount under {state}");
}

/// Starts `name` (defined already), checks it from the inside and the
/// outside, destroys it, and checks nothing is left. `image` is a file a
/// loop device of Strata's holds while it runs; `device` the block device
/// its root is, which no host mount may show.
fn run_and_destroy(env: &TestEnv, name: &str, image: Option<&Path>, device: Option<&Path>) {
    let (held, _guard) = start_guarded(env, name);
    check_running(env, name, &held, image, device);
    env.ok(&["destroy", name]);
    assert!(env.ok(&["domstate", name]).starts_with("shut off"));
    assert_nothing_left(env, name, Some(held.init), Some(&held.cgroup), image);
}

/// The running container `name`, checked from the inside and the outside
/// (see [`run_and_destroy`]).
fn check_running(env: &TestEnv, name: &str, held: &Held, image: Option<&Path>, device: Option<&Path>) {
    assert!(alive(held.init), "the init runs after start");

    let hostname = env.ok(&["lxc-enter-namespace", name, "--noseclabel", "--", "/bin/hostname"]);
    assert_eq!(hostname.trim(), name);
    let listing = env.ok(&["lxc-enter-namespace", name, "--noseclabel", "--", "/bin/ls", "/"]);
    let entries: Vec<&str> = listing.lines().collect();
    for entry in ["bin", "dev", "proc"] {
        assert!(entries.contains(&entry), "ls / in {name}: {entries:?}");
    }
    let pid1 = env.ok(&["lxc-enter-namespace", name, "--noseclabel", "--", "/bin/cat", "/proc/1/cmdline"]);
    assert!(pid1.starts_with("/bin/sleep"), "the init is pid 1 in the container: {pid1:?}");
    let status = env.strata(&["lxc-enter-namespace", name, "--noseclabel", "--", "sh", "-c", "echo out; exit 3"]);
    assert_eq!(status.status.code(), Some(3), "the command's status is strata's");
    assert_eq!(String::from_utf8_lossy(&status.stdout), "out\n", "its output passes through");
    let missing = env.fails(&["lxc-enter-namespace", name, "--noseclabel", "--", "/bin/no-such-command"]);
    assert!(missing.contains("cannot run '/bin/no-such-command' in the container: No such file"), "{missing}");

    let stat = std::fs::read_to_string(format!("/proc/{}/stat", held.init)).expect("the init's stat");
    let session = stat.rsplit_once(") ").and_then(|(_, rest)| rest.split(' ').nth(3)).expect("its session");
    assert_eq!(session, held.init.to_string(), "the init leads a session of its own, away from strata's terminal");

    let info = env.ok(&["dominfo", name]);
    assert!(info.contains("State:          running"), "{info}");
    assert!(info.contains(&format!("Id:             {}\n", held.init)), "dominfo shows the init's pid: {info}");
    assert!(held.cgroup.join("cgroup.procs").is_file(), "the container's cgroup {}", held.cgroup.display());
    let procs = std::fs::read_to_string(held.cgroup.join("cgroup.procs")).expect("cgroup.procs");
    assert!(procs.lines().any(|p| p == held.init.to_string()), "the init is in its cgroup: {procs}");

    // The root is mounted in the container's mount namespace only.
    let inside = std::fs::read_to_string(format!("/proc/{}/mountinfo", held.init)).expect("the init's mountinfo");
    let root_line = inside.lines().find(|l| l.split(' ').nth(4) == Some("/")).expect("a root mount");
    if let Some(image) = image {
        let losetup = losetup_j(image);
        let dev = losetup.split(':').next().expect("a loop device holds the image");
        assert!(root_line.contains(dev), "the root is {dev}: {root_line}");
        assert!(!host_mounts().contains(dev), "{dev} is mounted on the host");
        assert!(held.status.contains(&format!("dev='{dev}'")), "the loop device is recorded: {}", held.status);
    }
    if let Some(device) = device {
        let device = device.display().to_string();
        assert!(root_line.contains(&device), "the root is {device}: {root_line}");
        assert!(!host_mounts().contains(&device), "{device} is mounted on the host");
    }

    let again = env.fails(&["start", name]);
    assert!(again.contains(&format!("domain '{name}' is already active")), "{again}");
    let refused = env.fails(&["undefine", name]);
    assert!(refused.contains(&format!("domain '{name}' is running; destroy it before undefining it")), "{refused}");
    let live = env.ok(&["dumpxml", name]);
    assert!(live.contains(&format!("<domain type='lxc' id='{}'>", held.init)), "{live}");
}

/// Seed 003's case: a block root is really mounted, and the container runs on it.
#[test]
fn a_container_runs_on_a_block_device_root() {
    let env = TestEnv::lxc();
    let image = env.path("lv.raw");
    busybox_image(&env.path("tree"), &image, 64);
    let lv = TestLoop::attach(&image);
    env.define("blk", &container_xml("blk", SLEEPER, &block_root(&lv.0)));
    run_and_destroy(&env, "blk", None, Some(&lv.0));
}

#[test]
fn a_container_runs_on_a_raw_image_through_a_loop_device() {
    let env = TestEnv::lxc();
    let image = sleeper_on_raw_image(&env, "file");
    run_and_destroy(&env, "file", Some(&image), None);
}

/// A qcow2 root: a storage daemon outside the container's cgroup serves
/// the chain over FUSE, a loop device holds the export, the container
/// mounts that; the live XML shows the chain; a write inside lands in the
/// top image only, and destroy stops the daemon and leaves no FUSE mount.
#[test]
fn a_container_runs_on_a_qcow2_chain_served_by_a_storage_daemon() {
    for (what, path) in [("FUSE", "/dev/fuse"), ("loop devices", "/dev/loop-control")] {
        assert!(Path::new(path).exists(), "{what} missing: {path} does not exist");
    }
    let env = TestEnv::lxc();
    let [top, mid, base] = busybox_chain(&env);
    let lower_bytes = [std::fs::read(&mid).expect("mid"), std::fs::read(&base).expect("base")];
    env.define("qcow", &container_xml("qcow", SLEEPER, &qcow2_root(&top)));
    let defined = env.ok(&["dumpxml", "qcow"]);
    assert!(defined.contains(&format!("<source file='{}'/>", mid.display())), "{defined}");

    let (held, _guard) = start_guarded(&env, "qcow");
    let (export, daemon) = served_root(&held.status);
    assert!(alive(daemon), "the storage daemon {daemon} runs");
    let cmdline = std::fs::read_to_string(format!("/proc/{daemon}/cmdline")).expect("its cmdline");
    assert!(cmdline.contains("qemu-storage-daemon"), "{cmdline}");
    let procs = std::fs::read_to_string(held.cgroup.join("cgroup.procs")).expect("cgroup.procs");
    assert!(!procs.lines().any(|p| p == daemon.to_string()), "the daemon is outside the container's cgroup");
    assert!(mounted_at(&export), "the export {} is a FUSE mount on the host", export.display());
    check_running(&env, "qcow", &held, Some(&export), None);
    let live = env.ok(&["dumpxml", "qcow"]);
    for layer in [&top, &mid, &base] {
        assert!(live.contains(&format!("<source file='{}'/>", layer.display())), "{live}");
    }
    env.ok(&["lxc-enter-namespace", "qcow", "--noseclabel", "--", "sh", "-c", "echo inside > /written; sync"]);
    let read = env.ok(&["lxc-enter-namespace", "qcow", "--noseclabel", "--", "cat", "/written"]);
    assert_eq!(read, "inside\n");

    env.ok(&["destroy", "qcow"]);
    assert_nothing_left(&env, "qcow", Some(held.init), Some(&held.cgroup), Some(&export));
    assert!(!alive(daemon), "the storage daemon {daemon} is stopped");
    assert!(!mounted_at(&export), "the FUSE export is unmounted");

    let chain: Vec<String> = qemu_chain(&top).into_iter().map(|(f, _)| f).collect();
    assert_eq!(chain, [&top, &mid, &base].map(|p| p.display().to_string()));
    assert!(
        [std::fs::read(&mid).expect("mid"), std::fs::read(&base).expect("base")] == lower_bytes,
        "the backing images are byte-identical"
    );
    let flat = env.path("flat.raw");
    qemu_img(&["convert", "-O", "raw", top.to_str().expect("utf8"), flat.to_str().expect("utf8")]);
    let fsck = Command::new("e2fsck").arg("-fn").arg(&flat).output().expect("run e2fsck");
    assert!(fsck.status.success(), "e2fsck -fn: {}", String::from_utf8_lossy(&fsck.stdout));
    let cat = Command::new("debugfs").arg("-R").arg("cat /written").arg(&flat).output().expect("run debugfs");
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "inside\n", "the write inside reached the top image");
}

#[test]
fn a_container_runs_on_a_host_directory() {
    let env = TestEnv::lxc();
    let tree = busybox_root(&env.path("tree"));
    env.define("dir", &container_xml("dir", SLEEPER, &bind(&tree, "/")));
    run_and_destroy(&env, "dir", None, None);
}

/// A ram root starts empty: the userland comes from a read-only bind
/// mount on /bin, whose mount point the driver creates in the tmpfs.
#[test]
fn a_container_runs_on_a_ram_root() {
    let env = TestEnv::lxc();
    let tree = busybox_root(&env.path("tree"));
    let filesystems = format!(
        "<filesystem type='ram'><source usage='8' units='MiB'/><target dir='/'/></filesystem>\
         <filesystem type='mount'><source dir='{}'/><target dir='/bin'/><readonly/></filesystem>",
        tree.join("bin").display()
    );
    env.define("ram", &container_xml("ram", SLEEPER, &filesystems));
    let (held, _guard) = start_guarded(&env, "ram");
    let enter = |args: &[&str]| {
        let mut all = vec!["lxc-enter-namespace", "ram", "--noseclabel", "--"];
        all.extend_from_slice(args);
        env.strata(&all)
    };
    let mounts = String::from_utf8_lossy(&enter(&["/bin/cat", "/proc/self/mountinfo"]).stdout).into_owned();
    let root = mounts.lines().find(|l| l.split(' ').nth(4) == Some("/")).expect("a root mount");
    assert!(root.contains(" - tmpfs ") && root.contains("size=8192k"), "{root}");
    let bin = mounts.lines().find(|l| l.split(' ').nth(4) == Some("/bin")).expect("/bin");
    assert!(bin.split(' ').nth(5).is_some_and(|o| o.starts_with("ro")), "read-only /bin: {bin}");
    let write = enter(&["/bin/touch", "/bin/new"]);
    assert_eq!(write.status.code(), Some(1), "a read-only /bin refuses writes; the command's status passes through");
    assert!(!tree.join("bin/new").exists());
    assert!(enter(&["/bin/touch", "/written"]).status.success(), "the ram root is writable");
    assert_eq!(String::from_utf8_lossy(&enter(&["/bin/hostname"]).stdout).trim(), "ram");
    env.ok(&["destroy", "ram"]);
    assert_nothing_left(&env, "ram", Some(held.init), Some(&held.cgroup), None);
}

/// Each start that cannot work fails with the reason and leaves nothing:
/// a missing block device, an unformatted one (seed 003: it must not
/// "appear to start"), an unformatted image on a loop device, an init
/// that exits at once, and one that does not exist.
#[test]
fn a_failed_start_says_why_and_leaves_nothing_behind() {
    let env = TestEnv::lxc();
    let image = env.path("root.raw");
    busybox_image(&env.path("tree"), &image, 64);
    let zeroes = env.path("zeroes.raw");
    std::fs::File::create(&zeroes).and_then(|f| f.set_len(16 * MIB)).expect("a zeroed image");
    let blank = TestLoop::attach(&zeroes);
    let zero_file = env.path("zero-file.raw");
    std::fs::File::create(&zero_file).and_then(|f| f.set_len(16 * MIB)).expect("a zeroed image");

    let cases: Vec<(&str, String, Option<&Path>, String)> = vec![
        (
            "nodev",
            container_xml("nodev", SLEEPER, &block_root(Path::new("/dev/strata-no-such-device"))),
            None,
            "filesystem '/': block device '/dev/strata-no-such-device' does not exist".into(),
        ),
        (
            "blank",
            container_xml("blank", SLEEPER, &block_root(&blank.0)),
            None,
            format!("filesystem '/': '{}' holds no filesystem Strata recognises", blank.0.display()),
        ),
        (
            "blankfile",
            container_xml("blankfile", SLEEPER, &loop_root(&zero_file)),
            Some(&zero_file),
            "holds no filesystem Strata recognises".into(),
        ),
        (
            "quits",
            container_xml("quits", &["/bin/false"], &loop_root(&image)),
            Some(&image),
            "domain 'quits' did not start: its init '/bin/false' exited at once (status 1)".into(),
        ),
        (
            "noinit",
            container_xml("noinit", &["/sbin/no-such-init"], &loop_root(&image)),
            Some(&image),
            "domain 'noinit' did not start: cannot run its init '/sbin/no-such-init': No such file or directory".into(),
        ),
    ];
    for (name, xml, image, reason) in cases {
        env.define(name, &xml);
        let err = env.fails(&["start", name]);
        assert!(err.starts_with(&format!("error: Failed to start domain {name}\n")), "{err}");
        assert!(err.contains(&reason), "{name}: expected {reason:?} in {err}");
        assert!(env.ok(&["domstate", name]).starts_with("shut off"), "{name}");
        let xml = env.ok(&["dumpxml", name]);
        let uuid = xml.split("<uuid>").nth(1).and_then(|rest| rest.split("</uuid>").next()).expect("a uuid");
        let cgroup = strata_lxc::status::cgroup2_root().expect("a cgroup2 hierarchy").join("strata-lxc").join(uuid);
        assert_nothing_left(&env, name, None, Some(&cgroup), image);
    }
}

#[test]
fn an_image_a_loop_device_holds_already_is_refused() {
    let env = TestEnv::lxc();
    let image = env.path("root.raw");
    busybox_image(&env.path("tree"), &image, 64);
    let other = TestLoop::attach(&image);
    env.define("twice", &container_xml("twice", SLEEPER, &loop_root(&image)));
    let err = env.fails(&["start", "twice"]);
    let expected =
        format!("image '{}' is attached to {} already (losetup -j lists it)", image.display(), other.0.display());
    assert!(err.contains(&expected), "{err}");
    assert_eq!(losetup_j(&image).lines().count(), 1, "only the test's own loop device holds it");
    assert!(!env.state_root().join("domains/twice/status.xml").exists());
}

/// An init that ignores SIGTERM (pid 1 of a pid namespace ignores every
/// signal it has no handler for) is killed after the grace period, and
/// the container is then shut off with nothing left.
#[test]
fn shutdown_kills_an_init_that_ignores_sigterm() {
    let env = TestEnv::lxc();
    let image = sleeper_on_raw_image(&env, "stubborn");
    let (held, _guard) = start_guarded(&env, "stubborn");
    env.ok(&["shutdown", "stubborn"]);
    assert!(env.ok(&["domstate", "stubborn"]).starts_with("shut off"));
    assert_nothing_left(&env, "stubborn", Some(held.init), Some(&held.cgroup), Some(&image));
}

/// `strata` killed after the container's init has run but before start
/// confirmed it, and killed after the init was recorded but before it was
/// released: the next `list` finds what it left and tears it down.
#[test]
fn a_strata_killed_during_start_leaves_what_the_next_call_cleans() {
    let env = TestEnv::lxc();
    let image = sleeper_on_raw_image(&env, "killed");
    for step in ["lxc-start:running", "lxc-start:recorded"] {
        killed_at(&env, &["start", "killed"], step);
        let held = held(&env, "killed");
        let _guard = ContainerGuard { env: &env, name: "killed".into(), init: Some(held.init) };
        assert!(held.status.contains("state='starting'"), "{step}: {}", held.status);
        if step == "lxc-start:running" {
            assert!(alive(held.init), "{step}: the init runs after strata died");
            assert_eq!(losetup_j(&image).lines().count(), 1, "{step}: the root's loop device is attached");
        }
        let list = env.ok(&["list", "--all"]);
        assert!(list.lines().any(|l| l.contains("killed") && l.contains("shut off")), "{step}: {list}");
        assert_nothing_left(&env, "killed", Some(held.init), Some(&held.cgroup), Some(&image));
    }
    // And the domain starts again afterwards.
    let (held, _guard) = start_guarded(&env, "killed");
    env.ok(&["destroy", "killed"]);
    assert_nothing_left(&env, "killed", Some(held.init), Some(&held.cgroup), Some(&image));
}

/// A `strata` killed while it starts a container on a qcow2 chain, once
/// the storage daemon serves the chain (no loop device yet) and once the
/// init runs (its root mounted from the export's loop device): the next call stops the
/// daemon and leaves no FUSE mount or loop device; the container starts
/// again afterwards.
#[test]
fn a_strata_killed_while_starting_on_a_qcow2_chain_leaves_no_daemon() {
    let env = TestEnv::lxc();
    let [top, _, _] = busybox_chain(&env);
    env.define("killedq", &container_xml("killedq", SLEEPER, &qcow2_root(&top)));
    let status_file = env.state_root().join("domains/killedq/status.xml");
    for step in ["lxc-start:served", "lxc-start:running"] {
        killed_at(&env, &["start", "killedq"], step);
        let status = std::fs::read_to_string(&status_file).expect("the record of the killed start");
        let (export, daemon) = served_root(&status);
        let init = attr(&status, "init").and_then(|p| p.parse().ok());
        let _guard = ContainerGuard { env: &env, name: "killedq".into(), init };
        assert!(alive(daemon), "{step}: the storage daemon runs after strata died");
        assert!(mounted_at(&export), "{step}: the export is mounted");
        let loops = if step == "lxc-start:served" { 0 } else { 1 };
        assert_eq!(losetup_j(&export).lines().count(), loops, "{step}: loop devices on the export");
        let list = env.ok(&["list", "--all"]);
        assert!(list.lines().any(|l| l.contains("killedq") && l.contains("shut off")), "{step}: {list}");
        let cgroup = attr(&status, "cgroup").map(PathBuf::from);
        assert_nothing_left(&env, "killedq", init, cgroup.as_deref(), Some(&export));
        assert!(!alive(daemon), "{step}: the storage daemon {daemon} is stopped");
        assert!(!mounted_at(&export), "{step}: the FUSE export is unmounted");
    }
    let (held, _guard) = start_guarded(&env, "killedq");
    env.ok(&["destroy", "killedq"]);
    assert_nothing_left(&env, "killedq", Some(held.init), Some(&held.cgroup), None);
}

/// The root's top image as the container's XML names it now.
fn root_image(env: &TestEnv, name: &str) -> PathBuf {
    fs_image(env, name, "/")
}

/// The top image of filesystem `target` as the container's XML names it now.
fn fs_image(env: &TestEnv, name: &str, target: &str) -> PathBuf {
    let xml = env.ok(&["dumpxml", name, "--inactive"]);
    let element = xml
        .split("<filesystem ")
        .find(|f| f.contains(&format!("<target dir='{target}'/>")))
        .unwrap_or_else(|| panic!("no filesystem '{target}' in {xml}"));
    let start = element.find("<source file='").expect("a source") + "<source file='".len();
    PathBuf::from(&element[start..start + element[start..].find('\'').expect("quoted")])
}

/// Starts `name`, writes `text` into `/data` inside and reads it back,
/// and destroys it again.
fn write_inside(env: &TestEnv, name: &str, text: &str) {
    let (_held, _guard) = start_guarded(env, name);
    env.ok(&["lxc-enter-namespace", name, "--noseclabel", "--", "sh", "-c", &format!("echo {text} > /data; sync")]);
    assert_eq!(env.ok(&["lxc-enter-namespace", name, "--noseclabel", "--", "cat", "/data"]), format!("{text}\n"));
    env.ok(&["destroy", name]);
}

/// `/data` of the ext4 filesystem in `image`'s chain (converted to raw,
/// after `e2fsck -fn` passes on it).
fn data_in(env: &TestEnv, image: &Path) -> String {
    file_in(env, image, "/data")
}

/// The file `path` of the ext4 filesystem in `image`'s chain, read with
/// `qemu-img convert -U` to raw (the image may be open in a storage
/// daemon) once `e2fsck -fn` passes on that copy.
fn file_in(env: &TestEnv, image: &Path, path: &str) -> String {
    let flat = env.path("flat.raw");
    let _ = std::fs::remove_file(&flat);
    qemu_img(&["convert", "-U", "-O", "raw", image.to_str().expect("utf8"), flat.to_str().expect("utf8")]);
    let fsck = Command::new("e2fsck").arg("-fn").arg(&flat).output().expect("run e2fsck");
    assert!(fsck.status.success(), "e2fsck -fn of {}: {}", image.display(), String::from_utf8_lossy(&fsck.stdout));
    let cat = Command::new("debugfs").arg("-R").arg(format!("cat {path}")).arg(&flat).output().expect("run debugfs");
    String::from_utf8_lossy(&cat.stdout).into_owned()
}

/// Snapshots of a container's qcow2 root through the engine, while it is
/// shut off: an external snapshot freezes the top image (its filesystem
/// clean, holding what was written before) under a new overlay the
/// container then runs on; a revert brings back what was written before
/// and drops what came after; an internal snapshot lands in the top's
/// snapshot table and its delete removes it; a metadata-only delete
/// keeps the images. A running container's memory snapshot is refused by
/// capability.
#[test]
fn a_shut_off_container_on_qcow2_takes_reverts_to_and_deletes_snapshots() {
    let env = TestEnv::lxc();
    let [top, mid, base] = busybox_chain(&env);
    env.define("snap", &container_xml("snap", SLEEPER, &qcow2_root(&top)));
    write_inside(&env, "snap", "before");
    env.ok(&["snapshot-create-as", "snap", "s1", "--disk-only"]);
    let overlay = root_image(&env, "snap");
    assert_ne!(overlay, top, "the container runs on a new overlay");
    let chain: Vec<String> = qemu_chain(&overlay).into_iter().map(|(f, _)| f).collect();
    assert_eq!(chain, [&overlay, &top, &mid, &base].map(|p| p.display().to_string()));
    assert_eq!(data_in(&env, &top), "before\n", "the frozen image holds the write before the snapshot");

    write_inside(&env, "snap", "after");
    assert_eq!(data_in(&env, &overlay), "after\n");
    assert_eq!(data_in(&env, &top), "before\n", "the frozen image is unchanged");
    let list = env.ok(&["snapshot-list", "snap"]);
    assert!(list.lines().any(|l| l.trim_start().starts_with("s1") && l.contains("disk-snapshot")), "{list}");

    {
        // Without --disk-only, a running domain's snapshot holds its memory.
        let (_held, _guard) = start_guarded(&env, "snap");
        let err = env.fails(&["snapshot-create-as", "snap", "s9"]);
        assert!(err.contains("the lxc driver cannot save memory state"), "{err}");
        env.ok(&["destroy", "snap"]);
    }

    env.ok(&["snapshot-revert", "snap", "s1"]);
    let reverted = root_image(&env, "snap");
    assert_eq!(qemu_chain(&reverted)[1].0, top.display().to_string(), "the revert's overlay reads the frozen image");
    let (_held, _guard) = start_guarded(&env, "snap");
    let read = env.ok(&["lxc-enter-namespace", "snap", "--noseclabel", "--", "cat", "/data"]);
    assert_eq!(read, "before\n", "what was written before the snapshot reads back, what came after is gone");
    env.ok(&["destroy", "snap"]);
    assert_eq!(data_in(&env, &reverted), "before\n");

    env.ok(&["snapshot-create-as", "snap", "s2"]);
    let table = qemu_img(&["snapshot", "-l", reverted.to_str().expect("utf8")]);
    assert!(table.contains("s2"), "the internal snapshot is in the top's table: {table}");
    env.ok(&["snapshot-delete", "snap", "s2"]);
    let table = qemu_img(&["snapshot", "-l", reverted.to_str().expect("utf8")]);
    assert!(!table.contains("s2"), "the internal snapshot is deleted: {table}");

    env.ok(&["snapshot-delete", "snap", "s1", "--metadata"]);
    assert_eq!(env.ok(&["snapshot-list", "snap", "--name"]).trim(), "");
    assert!(overlay.exists() && top.exists(), "a metadata-only delete keeps the images");
}

/// `snapshot-create-as` and `snapshot-revert` of a shut-off container on
/// qcow2 killed (SIGKILL) at each of the engine's steps: the next command
/// rolls the creation back (no chain changed yet) or finishes it, the
/// records and the chain on disk agree, and the container starts on its
/// data afterwards.
#[test]
fn snapshot_commands_killed_at_each_step_are_finished_or_rolled_back() {
    let steps = [
        ("snapshot-create:intent", false),
        // The overlay is made, no chain uses it yet.
        ("snapshot-create:images", false),
        ("snapshot-create:chains", true),
        ("snapshot-create:record", true),
    ];
    for (step, finished) in steps {
        let env = TestEnv::lxc();
        let [top, mid, _] = busybox_chain(&env);
        env.define("ks", &container_xml("ks", SLEEPER, &qcow2_root(&top)));
        write_inside(&env, "ks", "before");
        killed_at(&env, &["snapshot-create-as", "ks", "s1", "--disk-only"], step);
        let listed = env.ok(&["snapshot-list", "ks", "--name"]);
        let root = root_image(&env, "ks");
        if finished {
            assert_eq!(listed.trim(), "s1", "{step}: the snapshot was finished");
            assert_eq!(qemu_chain(&root)[1].0, top.display().to_string(), "{step}: the overlay reads the frozen top");
        } else {
            assert_eq!(listed.trim(), "", "{step}: the snapshot was rolled back");
            assert_eq!(root, top, "{step}: the container still runs on its top image");
            assert!(!env.path("top.s1").exists(), "{step}: the rolled-back overlay is removed");
            assert_eq!(qemu_chain(&top)[1].0, mid.display().to_string(), "{step}");
        }
        assert_eq!(data_in(&env, &root), "before\n", "{step}");
        if !finished {
            continue;
        }
        write_inside(&env, "ks", "after");
        for revert_step in ["snapshot-revert:intent", "snapshot-revert:overlays", "snapshot-revert:adopted"] {
            killed_at(&env, &["snapshot-revert", "ks", "s1"], revert_step);
            env.ok(&["snapshot-list", "ks"]);
            let root = root_image(&env, "ks");
            let data = data_in(&env, &root);
            assert!(data == "before\n" || data == "after\n", "{step}, {revert_step}: {data:?}");
            env.ok(&["snapshot-revert", "ks", "s1"]);
            let (_held, _guard) = start_guarded(&env, "ks");
            let read = env.ok(&["lxc-enter-namespace", "ks", "--noseclabel", "--", "cat", "/data"]);
            assert_eq!(read, "before\n", "{step}, {revert_step}: a revert after the killed one reads back");
            env.ok(&["destroy", "ks"]);
        }
    }
}

/// Snapshots of a raw root are refused saying why, and block jobs on it,
/// shut off or running, before anything runs; define refuses what the driver
/// cannot mount, naming the element.
#[test]
fn snapshots_jobs_and_unsupported_filesystems_are_refused_with_the_reason() {
    let env = TestEnv::lxc();
    sleeper_on_raw_image(&env, "raw");
    let prefix = "error: this function is not supported by the connection driver: ";
    let err = env.fails(&["snapshot-create-as", "raw", "s1", "--disk-only"]);
    assert_eq!(
        err,
        format!(
            "{prefix}the lxc driver cannot take snapshots of filesystem '/': a raw image has no image layer \
             (such as qcow2) to hold one\n"
        )
    );
    assert_eq!(env.ok(&["snapshot-list", "raw", "--name"]).trim(), "", "nothing was recorded");
    let no_qcow2 = format!(
        "{prefix}the lxc driver cannot run block jobs on domain 'raw': none of its filesystems is a qcow2 \
         chain (a raw image, a block device, a bind or ram filesystem has no layers to merge)\n"
    );
    assert_eq!(env.fails(&["blockpull", "raw", "/"]), no_qcow2, "shut off");
    assert!(!env.state_root().join("domains/raw/offline-jobs.xml").exists(), "no daemon was started");
    let (_held, _guard) = start_guarded(&env, "raw");
    assert_eq!(env.fails(&["blockpull", "raw", "/"]), no_qcow2, "running");
    env.ok(&["destroy", "raw"]);
    let caps = env.ok(&["capabilities"]);
    assert!(caps.contains("lxc"), "{caps}");
    assert!(caps.contains("memory state cannot be saved"), "{caps}");

    let vmdk = container_xml(
        "v",
        SLEEPER,
        "<filesystem type='file'><driver type='loop' format='vmdk'/><source file='/x.vmdk'/><target dir='/'/></filesystem>",
    );
    std::fs::write(env.path("v.xml"), vmdk).expect("write");
    let err = env.fails(&["define", env.path("v.xml").to_str().expect("utf8")]);
    assert!(err.contains("filesystem '/': <driver format='vmdk'> is not supported by the lxc driver"), "{err}");
    let session = Command::new(env!("CARGO_BIN_EXE_strata-test-cli"))
        .args(["-c", "lxc:///session", "list"])
        .output()
        .expect("run strata");
    let err = String::from_utf8_lossy(&session.stderr);
    assert_eq!(session.status.code(), Some(1), "{err}");
    assert!(err.contains("unprivileged containers are not supported"), "{err}");
    let kvm = "<domain type='kvm'><name>vm</name><os><type>hvm</type></os></domain>";
    std::fs::write(env.path("vm.xml"), kvm).expect("write");
    let err = env.fails(&["define", env.path("vm.xml").to_str().expect("utf8")]);
    assert!(err.contains("domain type 'kvm' is not supported by the lxc driver (expected 'lxc')"), "{err}");
}

/// An init that handles SIGTERM ends on its own at shutdown: its handler
/// ran (it wrote into the root, a host directory here) before it exited.
#[test]
fn shutdown_lets_an_init_that_handles_sigterm_exit() {
    let env = TestEnv::lxc();
    let tree = busybox_root(&env.path("tree"));
    let init = ["/bin/sh", "-c", "trap 'echo bye > /tmp/bye; exit 0' TERM; while true; do sleep 1; done"];
    env.define("polite", &container_xml("polite", &init, &bind(&tree, "/")));
    let (held, _guard) = start_guarded(&env, "polite");
    env.ok(&["shutdown", "polite"]);
    assert_eq!(std::fs::read_to_string(tree.join("tmp/bye")).expect("the handler's file"), "bye\n");
    assert!(env.ok(&["domstate", "polite"]).starts_with("shut off"));
    assert_nothing_left(&env, "polite", Some(held.init), Some(&held.cgroup), None);
}

/// `event DOM` reports the container's start and its destroy: each
/// watcher has taken its first look (paused there) before the change.
#[test]
fn lifecycle_events_report_start_and_destroy() {
    let env = TestEnv::lxc();
    sleeper_on_raw_image(&env, "watched");
    let watch = ["event", "watched", "--event", "lifecycle", "--timeout", "120"];
    let watcher = Background::spawn_paused_at(&env, &watch, "lxc-event:watching").expect("the watcher's first look");
    let (_held, _guard) = start_guarded(&env, "watched");
    watcher.resume();
    let out = watcher.finish(Duration::from_secs(120));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.starts_with("event 'lifecycle' for domain 'watched': Started Booted\n"), "{text}");

    let watcher = Background::spawn_paused_at(&env, &watch, "lxc-event:watching").expect("the watcher's first look");
    env.ok(&["destroy", "watched"]);
    watcher.resume();
    let out = watcher.finish(Duration::from_secs(120));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("event 'lifecycle' for domain 'watched': Stopped Destroyed\n"), "{text}");
}

/// A read-only image is attached to a read-only loop device and mounted
/// read-only beside a writable root: the container cannot write to it.
#[test]
fn a_readonly_image_is_mounted_on_a_readonly_loop_device() {
    let env = TestEnv::lxc();
    let (root, data) = (env.path("root.raw"), env.path("data.raw"));
    busybox_image(&env.path("tree"), &root, 64);
    busybox_image(&env.path("tree"), &data, 16);
    let filesystems = format!(
        "{}<filesystem type='file'><driver type='loop' format='raw'/><source file='{}'/>\
         <target dir='/data'/><readonly/></filesystem>",
        loop_root(&root),
        data.display()
    );
    env.define("ro", &container_xml("ro", SLEEPER, &filesystems));
    let (held, _guard) = start_guarded(&env, "ro");
    let holder = losetup_j(&data);
    let device = holder.split(':').next().expect("a loop device holds the data image");
    let name = device.trim_start_matches("/dev/");
    let ro = std::fs::read_to_string(format!("/sys/block/{name}/ro")).expect("the device's ro flag");
    assert_eq!(ro.trim(), "1", "{device} is read-only");
    let enter = |args: &[&str]| {
        let mut all = vec!["lxc-enter-namespace", "ro", "--noseclabel", "--"];
        all.extend_from_slice(args);
        env.strata(&all)
    };
    assert!(enter(&["/bin/touch", "/written"]).status.success(), "the root is writable");
    assert_eq!(enter(&["/bin/touch", "/data/written"]).status.code(), Some(1), "/data refuses writes");
    let mounts = String::from_utf8_lossy(&enter(&["/bin/cat", "/proc/self/mountinfo"]).stdout).into_owned();
    let line = mounts.lines().find(|l| l.split(' ').nth(4) == Some("/data")).expect("/data");
    assert!(line.split(' ').nth(5).is_some_and(|o| o.starts_with("ro")) && line.contains(device), "{line}");
    env.ok(&["destroy", "ro"]);
    assert_nothing_left(&env, "ro", Some(held.init), Some(&held.cgroup), Some(&data));
    assert_eq!(losetup_j(&root), "", "the root's loop device is gone too");
}

/// A container whose init dies behind Strata's back (killed from the
/// host) is found shut off by the next call, which tears down what it
/// held: its loop device, its cgroup, its record.
#[test]
fn a_container_whose_init_died_is_cleaned_up_by_the_next_call() {
    let env = TestEnv::lxc();
    let image = sleeper_on_raw_image(&env, "crashed");
    let (held, _guard) = start_guarded(&env, "crashed");
    // SAFETY: kill(2) on the init this test's container recorded.
    assert_eq!(unsafe { libc::kill(held.init, libc::SIGKILL) }, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while alive(held.init) {
        assert!(std::time::Instant::now() < deadline, "the killed init {} is still there", held.init);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(env.state_root().join("domains/crashed/status.xml").exists(), "no strata call has run since");
    assert!(env.ok(&["domstate", "crashed"]).starts_with("shut off"));
    assert_nothing_left(&env, "crashed", Some(held.init), Some(&held.cgroup), Some(&image));
    let err = env.fails(&["destroy", "crashed"]);
    assert!(err.contains("domain is not running"), "{err}");
}

/// Two state roots defining one UUID would share its cgroup, and a destroy
/// in one would kill the other's container: the second start is refused.
#[test]
fn a_uuid_running_from_another_state_root_is_refused() {
    let (first, second) = (TestEnv::lxc(), TestEnv::lxc());
    let tree = busybox_root(&first.path("tree"));
    let xml = container_xml("twin", SLEEPER, &bind(&tree, "/"))
        .replace("<name>twin</name>", "<name>twin</name><uuid>5d6f0c1e-2b7a-4c39-9e8d-0f1a2b3c4d5e</uuid>");
    first.define("twin", &xml);
    second.define("twin", &xml);
    let (held, _guard) = start_guarded(&first, "twin");
    let err = second.fails(&["start", "twin"]);
    assert!(err.contains(&format!("cgroup '{}' holds processes already", held.cgroup.display())), "{err}");
    assert!(!second.state_root().join("domains/twin/status.xml").exists());
    assert!(alive(held.init), "the first container still runs");
}

/// suspend freezes the container's cgroup and resume thaws it, as domstate
/// and the kernel's cgroup.events show; a paused container refuses
/// lxc-enter-namespace (the command would freeze with it), and destroy
/// ends it all the same.
#[test]
fn suspend_and_resume_freeze_and_thaw_the_container() {
    let env = TestEnv::lxc();
    let tree = busybox_root(&env.path("tree"));
    env.define("frozen", &container_xml("frozen", SLEEPER, &bind(&tree, "/")));
    let (held, _guard) = start_guarded(&env, "frozen");
    let events = || std::fs::read_to_string(held.cgroup.join("cgroup.events")).expect("cgroup.events");
    assert!(events().contains("frozen 0"), "{}", events());
    env.ok(&["suspend", "frozen"]);
    assert_eq!(env.ok(&["domstate", "frozen", "--reason"]).trim(), "paused (user)");
    assert!(events().contains("frozen 1"), "{}", events());
    let err = env.fails(&["lxc-enter-namespace", "frozen", "--noseclabel", "--", "/bin/hostname"]);
    assert!(err.contains("domain 'frozen' is paused; resume it first"), "{err}");
    assert!(env.fails(&["suspend", "frozen"]).contains("domain is already paused"));
    env.ok(&["resume", "frozen"]);
    assert_eq!(env.ok(&["domstate", "frozen"]).trim(), "running");
    assert!(events().contains("frozen 0"), "{}", events());
    assert_eq!(env.ok(&["lxc-enter-namespace", "frozen", "--noseclabel", "--", "/bin/hostname"]).trim(), "frozen");
    env.ok(&["suspend", "frozen"]);
    env.ok(&["destroy", "frozen"]);
    assert_nothing_left(&env, "frozen", Some(held.init), Some(&held.cgroup), None);
}

/// A container's init that appends numbered lines to `/log` as fast as it
/// can (`BOOT N`, BOOT counting its starts in `/boots`), without syncing:
/// what a snapshot's filesystem freeze writes out is what reaches the image.
const WRITER: &[&str] = &[
    "/bin/sh",
    "-c",
    "b=$(cat /boots 2>/dev/null || echo 0); b=$((b+1)); echo $b > /boots; \
     i=0; while true; do i=$((i+1)); echo \"$b $i\" >> /log; usleep 10000; done",
];

/// The lines of file `path` of the running container `name`, read from inside.
fn lines_inside(env: &TestEnv, name: &str, path: &str) -> Vec<String> {
    env.ok(&["lxc-enter-namespace", name, "--noseclabel", "--", "cat", path]).lines().map(str::to_string).collect()
}

/// Waits until the running container's `/log` holds more than `after`
/// lines (its writer runs); returns them.
fn log_grows(env: &TestEnv, name: &str, after: usize) -> Vec<String> {
    file_grows(env, name, "/log", after)
}

/// Waits until the running container's file `path` holds more than
/// `after` lines; returns them.
fn file_grows(env: &TestEnv, name: &str, path: &str, after: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let lines = lines_inside(env, name, path);
        if lines.len() > after {
            return lines;
        }
        assert!(std::time::Instant::now() < deadline, "{name}: {path} stays at {} lines", lines.len());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The lines `BOOT 1` to `BOOT n`, as the writer appends them.
fn numbered(boot: u32, lines: &[String]) {
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line, &format!("{boot} {}", i + 1), "line {} of /log: {lines:?}", i + 1);
    }
}

/// Whether the kernel reports the cgroup frozen (`cgroup.events`).
fn cgroup_frozen(cgroup: &Path) -> bool {
    std::fs::read_to_string(cgroup.join("cgroup.events")).expect("cgroup.events").lines().any(|l| l == "frozen 1")
}

/// A live external snapshot of a container on a qcow2 chain while its
/// init appends to a file: the writes are seen progressing before, the
/// container runs on after (not frozen, still writing), the chain on disk
/// is one deeper with the old top frozen holding a clean filesystem with
/// every line written before the snapshot, the live XML shows the new top.
/// A revert of the running container stops it on a new overlay over the
/// frozen image holding exactly that data; a revert with --running starts
/// it again on it, one with --paused leaves it frozen; the snapshot's
/// overlay keeps its chain. A snapshot of
/// the memory (no --disk-only) is refused by capability; a suspended
/// container's snapshot leaves it suspended.
#[test]
fn a_running_container_takes_a_live_snapshot_while_it_writes_and_reverts_to_it() {
    let env = TestEnv::lxc();
    let [top, mid, base] = busybox_chain(&env);
    env.define("live", &container_xml("live", WRITER, &qcow2_root(&top)));
    let (held, _guard) = start_guarded(&env, "live");
    let first = log_grows(&env, "live", 0);
    let before = log_grows(&env, "live", first.len());
    numbered(1, &before);

    env.ok(&["snapshot-create-as", "live", "s1", "--disk-only", "--atomic"]);
    assert!(!cgroup_frozen(&held.cgroup), "the container is thawed after the snapshot");
    assert_eq!(env.ok(&["domstate", "live"]).trim(), "running");
    let overlay = root_image(&env, "live");
    assert_ne!(overlay, top, "the container runs on a new overlay");
    let chain: Vec<String> = qemu_chain(&overlay).into_iter().map(|(f, _)| f).collect();
    assert_eq!(chain, [&overlay, &top, &mid, &base].map(|p| p.display().to_string()), "one layer deeper on disk");
    let live = env.ok(&["dumpxml", "live"]);
    let first_source = live.find("<source file='").expect("a source");
    assert!(live[first_source..].starts_with(&format!("<source file='{}'/>", overlay.display())), "{live}");
    let top_bytes = std::fs::read(&top).expect("the frozen image");
    let frozen: Vec<String> = file_in(&env, &top, "/log").lines().map(str::to_string).collect();
    assert!(frozen.len() >= before.len(), "the frozen image holds every line written before: {frozen:?}");
    numbered(1, &frozen);
    let after = log_grows(&env, "live", frozen.len());
    numbered(1, &after);
    assert!(std::fs::read(&top).expect("the frozen image") == top_bytes, "the writes after it leave it unchanged");
    let (_, daemon) = served_root(&held.status);
    assert!(alive(daemon) && alive(held.init), "the daemon and the init run on");
    let err = env.fails(&["snapshot-create-as", "live", "s9"]);
    assert!(err.contains("the lxc driver cannot save memory state"), "{err}");
    // A container the user suspended is snapshotted as it is, and stays so.
    env.ok(&["suspend", "live"]);
    env.ok(&["snapshot-create-as", "live", "s2", "--disk-only"]);
    assert_eq!(env.ok(&["domstate", "live", "--reason"]).trim(), "paused (user)");
    assert!(cgroup_frozen(&held.cgroup), "the suspended container stays frozen");
    env.ok(&["resume", "live"]);
    let child = root_image(&env, "live");
    log_grows(&env, "live", after.len());

    env.ok(&["snapshot-revert", "live", "s1"]);
    assert!(env.ok(&["domstate", "live"]).starts_with("shut off"), "a revert to a disk snapshot stops the container");
    assert_nothing_left(&env, "live", Some(held.init), Some(&held.cgroup), None);
    let branch = root_image(&env, "live");
    assert_eq!(qemu_chain(&branch)[1].0, top.display().to_string(), "the revert's overlay reads the frozen image");
    assert_eq!(file_in(&env, &branch, "/log"), file_in(&env, &top, "/log"), "exactly the data of the snapshot");
    let written: Vec<String> = file_in(&env, &overlay, "/log").lines().map(str::to_string).collect();
    assert!(written.len() >= after.len(), "the writes after the snapshot went to its overlay: {written:?}");
    numbered(1, &written);

    let (held, _guard) = start_guarded(&env, "live");
    log_grows(&env, "live", frozen.len());
    env.ok(&["snapshot-revert", "live", "s1", "--running"]);
    assert_eq!(env.ok(&["domstate", "live"]).trim(), "running");
    assert!(!alive(held.init), "the container was restarted");
    let held = self::held(&env, "live");
    assert!(!cgroup_frozen(&held.cgroup));
    let again = log_grows(&env, "live", frozen.len());
    assert_eq!(again[..frozen.len()], frozen[..], "the log starts as the snapshot had it");
    numbered(2, &again[frozen.len()..]);
    let chain: Vec<String> = qemu_chain(&overlay).into_iter().map(|(f, _)| f).collect();
    assert_eq!(chain, [&overlay, &top, &mid, &base].map(|p| p.display().to_string()), "the first branch is kept");
    let chain: Vec<String> = qemu_chain(&child).into_iter().map(|(f, _)| f).collect();
    assert_eq!(chain, [&child, &overlay, &top, &mid, &base].map(|p| p.display().to_string()), "s2's too");
    env.ok(&["snapshot-revert", "live", "s1", "--paused"]);
    assert_eq!(env.ok(&["domstate", "live", "--reason"]).trim(), "paused (user)");
    assert!(cgroup_frozen(&self::held(&env, "live").cgroup), "a revert with --paused leaves it frozen");
    env.ok(&["destroy", "live"]);
}

/// `snapshot-create-as --disk-only` of a running container killed at each
/// step, the container paused (cgroup and filesystem frozen) at some of
/// them: the next command thaws it and rolls the snapshot back or
/// finishes it (finished once its storage daemon writes into the overlay),
/// and the container runs on, writing, with its chain on disk as recorded.
#[test]
fn a_live_snapshot_killed_at_each_step_leaves_a_running_thawed_container() {
    let steps = [
        ("snapshot-create:intent", false, false),
        ("lxc-snapshot:frozen", true, false),
        ("snapshot-create:overlays", true, false),
        ("snapshot-create:images", false, true),
        ("snapshot-create:chains", false, true),
        ("snapshot-create:record", false, true),
    ];
    let env = TestEnv::lxc();
    let [top, _, _] = busybox_chain(&env);
    env.define("kl", &container_xml("kl", WRITER, &qcow2_root(&top)));
    let (held, _guard) = start_guarded(&env, "kl");
    let mut expected_top = top.clone();
    let mut taken = Vec::new();
    for (n, (step, left_frozen, finished)) in steps.into_iter().enumerate() {
        let name = format!("s{n}");
        let lines = log_grows(&env, "kl", 0).len();
        killed_at(&env, &["snapshot-create-as", "kl", &name, "--disk-only"], step);
        assert_eq!(cgroup_frozen(&held.cgroup), left_frozen, "{step}: the container as the kill left it");
        let listed = env.ok(&["snapshot-list", "kl", "--name"]);
        assert!(!cgroup_frozen(&held.cgroup), "{step}: the next command thawed the container");
        assert_eq!(env.ok(&["domstate", "kl"]).trim(), "running", "{step}");
        if finished {
            taken.push(name.clone());
            expected_top = env.path(&format!("top.{name}"));
        }
        let names: Vec<&str> = listed.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        assert_eq!(names, taken, "{step}: the snapshots listed");
        assert_eq!(root_image(&env, "kl"), expected_top, "{step}: the recorded top");
        let chain = qemu_chain(&expected_top);
        assert_eq!(chain.len(), 3 + taken.len(), "{step}: the chain on disk: {chain:?}");
        assert!(!env.path(&format!("top.{name}")).exists() || finished, "{step}: a rolled-back overlay goes");
        let now = log_grows(&env, "kl", lines);
        numbered(1, &now);
    }
    env.ok(&["destroy", "kl"]);
    let log: Vec<String> = file_in(&env, &expected_top, "/log").lines().map(str::to_string).collect();
    numbered(1, &log);
    assert!(!log.is_empty());
}

/// A container a snapshot's killed `strata` left frozen (its cgroup and its
/// qcow2 root's filesystem), whose init is then killed: the next command
/// finds it shut off and tears it down. Nothing is left: no cgroup, no
/// frozen filesystem (whose superblock would hold the loop device on the
/// export), no mount, no loop device, no storage daemon; the snapshot is
/// rolled back and the image holds a clean filesystem.
#[test]
fn a_frozen_container_whose_init_died_is_torn_down_by_the_next_command() {
    let env = TestEnv::lxc();
    let [top, mid, base] = busybox_chain(&env);
    env.define("fz", &container_xml("fz", WRITER, &qcow2_root(&top)));
    let (held, _guard) = start_guarded(&env, "fz");
    log_grows(&env, "fz", 0);
    let (export, daemon) = served_root(&held.status);
    assert!(!losetup_j(&export).is_empty(), "a loop device holds the export");
    killed_at(&env, &["snapshot-create-as", "fz", "s1", "--disk-only"], "lxc-snapshot:frozen");
    assert!(cgroup_frozen(&held.cgroup), "the kill left the container frozen");
    // SAFETY: kill(2) on the init this test's container recorded.
    assert_eq!(unsafe { libc::kill(held.init, libc::SIGKILL) }, 0, "the init is killed");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while alive(held.init) {
        assert!(std::time::Instant::now() < deadline, "the frozen init {} survives SIGKILL", held.init);
        std::thread::sleep(Duration::from_millis(20));
    }

    assert_eq!(env.ok(&["domstate", "fz"]).trim(), "shut off");
    assert_nothing_left(&env, "fz", Some(held.init), Some(&held.cgroup), Some(&export));
    assert!(!alive(daemon), "the storage daemon {daemon} is stopped");
    assert_eq!(env.ok(&["snapshot-list", "fz", "--name"]).trim(), "", "the snapshot is rolled back");
    assert_eq!(chain_files(&top), [&top, &mid, &base].map(|p| p.display().to_string()), "the chain on disk as it was");
    numbered(1, &lines(file_in(&env, &top, "/log")));
}

/// The lines of file `path` in the container whose init is `init`, read
/// from the host through `/proc/PID/root` (a frozen container runs no
/// command); none when it does not exist.
fn lines_through_proc(init: i32, path: &str) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{init}/root{path}"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Waits until the container whose init is `init` has `count` lines in `path`.
fn wait_for_lines(init: i32, path: &str, count: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while lines_through_proc(init, path).len() < count {
        assert!(std::time::Instant::now() < deadline, "{path} stays at {:?}", lines_through_proc(init, path));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A container started paused (a revert with --paused, start --paused) is
/// frozen before its init's exec: the line its init appends to `/started`
/// first is not there when the command returns, the container reads as
/// paused, and the line comes once it is resumed.
#[test]
fn a_container_started_paused_runs_nothing_of_its_init_until_resumed() {
    let env = TestEnv::lxc();
    let [top, _, _] = busybox_chain(&env);
    let init = ["/bin/sh", "-c", "echo up >> /started; exec sleep 1000"];
    env.define("held", &container_xml("held", &init, &qcow2_root(&top)));
    let (first, _guard) = start_guarded(&env, "held");
    wait_for_lines(first.init, "/started", 1);
    env.ok(&["snapshot-create-as", "held", "s1", "--disk-only"]);

    env.ok(&["snapshot-revert", "held", "s1", "--paused"]);
    let reverted = held(&env, "held");
    assert_ne!(reverted.init, first.init, "the container was started again");
    assert_eq!(env.ok(&["domstate", "held", "--reason"]).trim(), "paused (user)");
    assert!(cgroup_frozen(&reverted.cgroup), "its cgroup is frozen");
    assert_eq!(lines_through_proc(reverted.init, "/started"), ["up"], "only the snapshot's line: the init ran nothing");
    env.ok(&["resume", "held"]);
    wait_for_lines(reverted.init, "/started", 2);
    env.ok(&["destroy", "held"]);

    env.ok(&["start", "held", "--paused"]);
    let paused = held(&env, "held");
    let _guard = ContainerGuard { env: &env, name: "held".into(), init: Some(paused.init) };
    assert_eq!(env.ok(&["domstate", "held", "--reason"]).trim(), "paused (user)");
    assert_eq!(lines_through_proc(paused.init, "/started").len(), 2, "start --paused: the init ran nothing");
    env.ok(&["resume", "held"]);
    wait_for_lines(paused.init, "/started", 3);
    env.ok(&["destroy", "held"]);
}

/// A container's init that appends the same numbered lines (`1 N`) to
/// `/log` on its root and to `/data/log` on its second filesystem, in that
/// order, as fast as it can.
const TWO_WRITER: &[&str] = &[
    "/bin/sh",
    "-c",
    "i=0; while true; do i=$((i+1)); echo \"1 $i\" >> /log; echo \"1 $i\" >> /data/log; usleep 10000; done",
];

/// An empty ext4 filesystem of 16 MiB in a qcow2 image `STEM.base.qcow2`
/// with an overlay `STEM.qcow2` over it; returns the layers, top first.
fn ext4_chain(env: &TestEnv, stem: &str) -> [PathBuf; 2] {
    let raw = env.path(&format!("{stem}.raw"));
    std::fs::File::create(&raw).and_then(|f| f.set_len(16 * MIB)).expect("an image file");
    let mkfs = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&raw).output().expect("run mkfs.ext4");
    assert!(mkfs.status.success(), "mkfs.ext4: {}", String::from_utf8_lossy(&mkfs.stderr));
    let [top, base] = [env.path(&format!("{stem}.qcow2")), env.path(&format!("{stem}.base.qcow2"))];
    let s = |p: &Path| p.to_str().expect("utf8").to_string();
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", &s(&raw), &s(&base)]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &s(&base), &s(&top)]);
    [top, base]
}

/// The files of `top`'s chain on disk, top first.
fn chain_files(top: &Path) -> Vec<String> {
    qemu_chain(top).into_iter().map(|(f, _)| f).collect()
}

fn lines(text: String) -> Vec<String> {
    text.lines().map(str::to_string).collect()
}

/// Takes the node name the next live snapshot's overlay of the second
/// filesystem the container's record lists would get (its storage
/// daemon then fails to add it), with a null node in that daemon.
fn occupy_second_overlay_node(status: &str) {
    let served = status.split("<served").nth(2).expect("a second served filesystem");
    let (target, dir) = (attr(served, "target").expect("its target"), attr(served, "dir").expect("its directory"));
    let next: u64 = attr(status, "nextnode").map_or(0, |n| n.parse().expect("a node number"));
    let node = format!("{}-o{}-file", strata_qemu_block::nodes::node_prefix(target), next + 1);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async {
        let paths = strata_qemu_block::runtime::RuntimePaths { dir: dir.into() };
        let monitor = strata_qemu_block::monitor::acquire(&paths, "the test").await.expect("a monitor of the daemon");
        let added = serde_json::json!({"driver": "null-co", "node-name": node});
        monitor.client.execute("blockdev-add", Some(added)).await.expect("the node added");
    });
}

/// A live snapshot of a container with two qcow2 filesystems (each served
/// by a storage daemon of its own) while its init appends to both: both
/// chains on disk are one deeper, both frozen images hold clean
/// filesystems of the same instant (the root at most the one line ahead
/// it writes first) and stay unchanged while the container writes on.
/// When the second daemon's switch fails, the first is switched back:
/// the command fails naming the cause, no snapshot is recorded, both
/// chains are as they were (no overlay file left), and the container runs
/// on, thawed, writing into the tops it had.
#[test]
fn a_live_snapshot_of_two_filesystems_switches_both_or_neither() {
    let env = TestEnv::lxc();
    let [top, mid, base] = busybox_chain(&env);
    let [data_top, data_base] = ext4_chain(&env, "data");
    let filesystems = format!("{}{}", qcow2_root(&top), qcow2_fs(&data_top, "/data"));
    env.define("two", &container_xml("two", TWO_WRITER, &filesystems));
    let (held, _guard) = start_guarded(&env, "two");
    let first = file_grows(&env, "two", "/data/log", 0);
    let before = file_grows(&env, "two", "/data/log", first.len());
    numbered(1, &before);

    env.ok(&["snapshot-create-as", "two", "s1", "--disk-only", "--atomic"]);
    assert!(!cgroup_frozen(&held.cgroup), "the container is thawed after the snapshot");
    assert_eq!(env.ok(&["domstate", "two"]).trim(), "running");
    let (root_s1, data_s1) = (root_image(&env, "two"), fs_image(&env, "two", "/data"));
    let path = |p: &PathBuf| p.display().to_string();
    assert_eq!(chain_files(&root_s1), [&root_s1, &top, &mid, &base].map(path), "the root's chain, one deeper");
    assert_eq!(chain_files(&data_s1), [&data_s1, &data_top, &data_base].map(path), "/data's chain, one deeper");
    let frozen_root = lines(file_in(&env, &top, "/log"));
    let frozen_data = lines(file_in(&env, &data_top, "/log"));
    numbered(1, &frozen_root);
    numbered(1, &frozen_data);
    assert!(frozen_data.len() >= before.len(), "the frozen /data holds every line written before: {frozen_data:?}");
    assert!(
        frozen_root.len() == frozen_data.len() || frozen_root.len() == frozen_data.len() + 1,
        "both filesystems are of one instant: {} lines in /log, {} in /data/log",
        frozen_root.len(),
        frozen_data.len()
    );
    let frozen_bytes = [&top, &data_top].map(|p| std::fs::read(p).expect("a frozen image"));
    let after = file_grows(&env, "two", "/data/log", frozen_data.len() + 1);
    numbered(1, &after);
    assert!([&top, &data_top].map(|p| std::fs::read(p).expect("a frozen image")) == frozen_bytes, "left unchanged");

    occupy_second_overlay_node(&self::held(&env, "two").status);
    let err = env.fails(&["snapshot-create-as", "two", "s2", "--disk-only", "--atomic"]);
    assert!(err.starts_with("error: ") && err.contains("Duplicate nodes with node-name"), "{err}");
    assert!(!cgroup_frozen(&held.cgroup), "the container is thawed after the failed snapshot");
    assert_eq!(env.ok(&["domstate", "two"]).trim(), "running");
    assert_eq!(env.ok(&["snapshot-list", "two", "--name"]).trim(), "s1", "no snapshot s2 is recorded");
    assert_eq!((root_image(&env, "two"), fs_image(&env, "two", "/data")), (root_s1.clone(), data_s1.clone()));
    assert_eq!(chain_files(&root_s1), [&root_s1, &top, &mid, &base].map(path), "the root's chain as it was");
    assert_eq!(chain_files(&data_s1), [&data_s1, &data_top, &data_base].map(path), "/data's chain as it was");
    let left: Vec<String> = std::fs::read_dir(env.path(""))
        .expect("the test's directory")
        .map(|e| e.expect("an entry").file_name().to_string_lossy().into_owned())
        .filter(|f| f.contains("s2"))
        .collect();
    assert!(left.is_empty(), "no overlay of s2 is left: {left:?}");
    let later = file_grows(&env, "two", "/data/log", after.len() + 1);
    numbered(1, &later);
    assert!(alive(held.init), "the container runs on");

    env.ok(&["destroy", "two"]);
    // The writes after the failure went to the tops the container had.
    let root_log = lines(file_in(&env, &root_s1, "/log"));
    let data_log = lines(file_in(&env, &data_s1, "/log"));
    numbered(1, &root_log);
    numbered(1, &data_log);
    assert!(data_log.len() >= later.len(), "/data holds every line written: {} of {}", data_log.len(), later.len());
    assert!(root_log.len() >= later.len(), "/ holds every line written: {} of {}", root_log.len(), later.len());
}

/// `<idmap>`: the init runs in a user namespace of its own with the maps
/// the definition gives, as the kernel shows them for the init and for a
/// command `lxc-enter-namespace` runs (root inside, the mapped ids
/// outside); start warns about nothing. A malformed map is refused at
/// define, naming the element.
#[test]
fn an_idmap_runs_the_container_in_a_user_namespace_with_those_maps() {
    let env = TestEnv::lxc();
    let image = env.path("root.raw");
    busybox_image(&env.path("tree"), &image, 64);
    let idmap =
        "<idmap><uid start='0' target='100000' count='65536'/><gid start='0' target='200000' count='65536'/></idmap>";
    let xml = container_xml("mapped", SLEEPER, &loop_root(&image)).replace("</os>", &format!("</os>{idmap}"));
    env.define("mapped", &xml);
    let start = env.strata(&["start", "mapped"]);
    assert!(start.status.success(), "{}", String::from_utf8_lossy(&start.stderr));
    assert!(!String::from_utf8_lossy(&start.stderr).contains("idmap"), "no warning about <idmap>");
    let held = held(&env, "mapped");
    let _guard = ContainerGuard { env: &env, name: "mapped".into(), init: Some(held.init) };
    let map = |file: &str| -> String {
        let text = std::fs::read_to_string(format!("/proc/{}/{file}", held.init)).expect("the init's map");
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    };
    assert_eq!(map("uid_map"), "0 100000 65536");
    assert_eq!(map("gid_map"), "0 200000 65536");
    let status = std::fs::read_to_string(format!("/proc/{}/status", held.init)).expect("the init's status");
    assert!(
        status.lines().any(|l| l.split_whitespace().eq(["Uid:", "100000", "100000", "100000", "100000"])),
        "{status}"
    );
    assert!(
        status.lines().any(|l| l.split_whitespace().eq(["Gid:", "200000", "200000", "200000", "200000"])),
        "{status}"
    );
    let id = env.ok(&["lxc-enter-namespace", "mapped", "--noseclabel", "--", "id"]);
    assert!(id.starts_with("uid=0") && id.contains("gid=0"), "root inside: {id}");
    let inside = env.ok(&["lxc-enter-namespace", "mapped", "--noseclabel", "--", "cat", "/proc/self/uid_map"]);
    assert_eq!(inside.split_whitespace().collect::<Vec<_>>(), ["0", "100000", "65536"]);
    assert_eq!(env.ok(&["lxc-enter-namespace", "mapped", "--noseclabel", "--", "hostname"]).trim(), "mapped");
    env.ok(&["destroy", "mapped"]);
    assert_nothing_left(&env, "mapped", Some(held.init), Some(&held.cgroup), Some(&image));

    let bad = container_xml("badmap", SLEEPER, &loop_root(&image))
        .replace("</os>", "</os><idmap><uid start='0' target='100000'/><gid start='0' target='1' count='1'/></idmap>");
    std::fs::write(env.path("badmap.xml"), bad).expect("write");
    let err = env.fails(&["define", env.path("badmap.xml").to_str().expect("utf8")]);
    assert!(err.contains("<idmap><uid start='0' target='100000' count=''/>: 'count' must be an id"), "{err}");
}

/// A container that appends a numbered line to `/log` ten times a second.
const COUNTER: &[&str] = &["/bin/sh", "-c", "i=0; while true; do i=$((i+1)); echo $i >> /log; sleep 0.1; done"];

/// How many lines the writer has appended to `/log` in container `name`,
/// read inside it.
fn lines_written(env: &TestEnv, name: &str) -> usize {
    let log = env.ok(&["lxc-enter-namespace", name, "--noseclabel", "--", "cat", "/log"]);
    let numbers: Vec<usize> = log.lines().map(|l| l.parse().expect("a numbered line")).collect();
    assert_eq!(numbers, (1..=numbers.len()).collect::<Vec<_>>(), "the log is 1, 2, 3, … without a gap");
    numbers.len()
}

/// Waits (a hang guard of two minutes) until the writer in `name` has
/// appended more than `after` lines; returns how many it has.
fn wait_for_writes(env: &TestEnv, name: &str, after: usize) -> usize {
    for _ in 0..1200 {
        let n = lines_written(env, name);
        if n > after {
            return n;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the writer in '{name}' wrote nothing after line {after} in two minutes");
}

/// The images a domain XML names, in document order (its one storage
/// device's chain, active layer first).
fn xml_chain(xml: &str) -> Vec<String> {
    xml.split("<source file='").skip(1).map(|rest| rest[..rest.find('\'').expect("quoted")].to_string()).collect()
}

/// Block jobs on a running container's 4-deep qcow2 chain (active
/// `upper` over `top` holding a file written earlier, over `mid` and
/// `base`), run by the storage daemon serving it while a shell loop in
/// the container writes: an intermediate commit of `top` into `mid`, then
/// a pull into `mid` of everything below it. The chain on disk and in the
/// live and persistent XML follows each job, `mid` ends holding exactly
/// what the frozen chain below the active layer held (qemu-img compare
/// against a copy made before), the writer never stopped, the file
/// reads back inside, and the filesystem is clean after stop; `event`
/// reports the commit's completion; a pull destroyed right after it
/// started leaves the chain as it was, and runs again after a restart. The jobs that would
/// write the FUSE-exported active layer are refused, saying why.
#[test]
fn pull_and_intermediate_commit_run_on_a_running_container_while_it_writes() {
    let env = TestEnv::lxc();
    let [top, mid, base] = busybox_chain(&env);
    env.define("jobs", &container_xml("jobs", SLEEPER, &qcow2_root(&top)));
    write_inside(&env, "jobs", "before");
    let (upper, reference) = (env.path("upper.qcow2"), env.path("reference.raw"));
    let s = |p: &Path| p.to_str().expect("utf8").to_string();
    qemu_img(&["convert", "-O", "raw", &s(&top), &s(&reference)]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &s(&top), &s(&upper)]);
    env.define("jobs", &container_xml("jobs", COUNTER, &qcow2_root(&upper)));
    let layers = |paths: &[&PathBuf]| paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>();
    let on_disk = || qemu_chain(&upper).into_iter().map(|(f, _)| f).collect::<Vec<_>>();
    assert_eq!(on_disk(), layers(&[&upper, &top, &mid, &base]));

    let (held, _guard) = start_guarded(&env, "jobs");
    let mut written = wait_for_writes(&env, "jobs", 0);

    let watch = ["event", "jobs", "--event", "block-job", "--timeout", "120"];
    let watcher = Background::spawn_paused_at(&env, &watch, "lxc-event:watching").expect("the watcher's first look");
    env.ok(&["blockcommit", "jobs", "/", "--top", "/[1]", "--base", "/[2]", "--wait"]);
    assert_eq!(on_disk(), layers(&[&upper, &mid, &base]), "top was committed into mid");
    watcher.resume();
    let out = watcher.finish(Duration::from_secs(120));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.starts_with("event 'block-job' for domain 'jobs': Block Commit for / completed\n"), "{text}");
    for xml in [env.ok(&["dumpxml", "jobs"]), env.ok(&["dumpxml", "jobs", "--inactive"])] {
        assert_eq!(xml_chain(&xml), on_disk(), "the live and persistent XML follow the commit: {xml}");
    }
    written = wait_for_writes(&env, "jobs", written);
    assert_eq!(env.ok(&["lxc-enter-namespace", "jobs", "--noseclabel", "--", "cat", "/data"]), "before\n");

    let refused = env.fails(&["blockpull", "jobs", "/", "--wait"]);
    assert!(
        refused.contains(
            "error: Requested operation is not valid: cannot pull into the active layer of 'jobs' while its \
             storage is exported writable over FUSE"
        ),
        "{refused}"
    );
    let running_only = "a running container merges only layers below the active one (blockpull --top, \
                        blockcommit --top); shut it off to run this job offline\n";
    let refused = env.fails(&["blockcommit", "jobs", "/", "--active", "--pivot"]);
    assert!(refused.contains("cannot run an active block commit of 'jobs'"), "{refused}");
    assert!(refused.ends_with(running_only), "{refused}");
    let copy = env.path("copy.qcow2");
    let refused = env.fails(&["blockcopy", "jobs", "/", copy.to_str().expect("utf8"), "--pivot"]);
    assert!(refused.contains("cannot run a block copy of 'jobs'"), "{refused}");
    assert!(refused.ends_with(running_only), "{refused}");
    assert!(!copy.exists(), "a refused copy makes no destination");
    assert_eq!(on_disk(), layers(&[&upper, &mid, &base]), "the refusals changed nothing");
    assert_eq!(env.ok(&["blockjob", "jobs", "/", "--info"]).trim(), "No current block job for /");

    let last = wait_for_writes(&env, "jobs", written);

    // A pull destroyed as soon as it started: QEMU changes an image's
    // backing only when Strata finalizes the job, so the chain on disk and
    // in the definition is the one before the pull.
    assert_eq!(env.ok(&["blockpull", "jobs", "/", "--top", "/[1]"]).trim(), "Block Pull started");
    env.ok(&["destroy", "jobs"]);
    assert!(!alive(held.init));
    assert_eq!(on_disk(), layers(&[&upper, &mid, &base]));
    assert_eq!(xml_chain(&env.ok(&["dumpxml", "jobs", "--inactive"])), on_disk(), "the definition follows the disk");
    let compared = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .args([&reference, &mid])
        .output()
        .expect("run qemu-img compare");
    assert!(compared.status.success(), "mid's chain reads what top's read: {compared:?}");
    env.ok(&["start", "jobs"]);
    assert_eq!(env.ok(&["lxc-enter-namespace", "jobs", "--noseclabel", "--", "cat", "/data"]), "before\n");
    env.ok(&["blockpull", "jobs", "/", "--top", "/[1]", "--wait"]);
    assert_eq!(on_disk(), layers(&[&upper, &mid]), "base was pulled into mid");
    assert_eq!(xml_chain(&env.ok(&["dumpxml", "jobs"])), on_disk(), "the live XML follows the pull");
    let compared = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "raw", "-F", "qcow2"])
        .args([&reference, &mid])
        .output()
        .expect("run qemu-img compare");
    assert!(compared.status.success(), "mid holds what the chain below the active layer held: {compared:?}");
    env.ok(&["destroy", "jobs"]);
    let flat = env.path("flat.raw");
    qemu_img(&["convert", "-O", "raw", &s(&upper), &s(&flat)]);
    let fsck = Command::new("e2fsck").arg("-fn").arg(&flat).output().expect("run e2fsck");
    assert!(fsck.status.success(), "e2fsck -fn: {}", String::from_utf8_lossy(&fsck.stdout));
    let cat = |file: &str| {
        let out = Command::new("debugfs").arg("-R").arg(format!("cat {file}")).arg(&flat).output().expect("debugfs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(cat("/data"), "before\n");
    let log = cat("/log");
    assert!(log.lines().count() >= last, "the {last} lines seen inside are on disk: {log}");
}

/// An intermediate commit on a running container, its `strata` killed at
/// each step of the job (recorded and not yet sent, sent, its end being
/// recorded): the next command concludes or drops the record, the chain
/// on disk and in the live and persistent XML agree (committed once QEMU
/// had the job), the container runs on with its data, and its filesystem
/// is clean after stop.
#[test]
fn a_job_command_killed_at_each_step_is_concluded_by_the_next_one() {
    for step in JOB_STEPS {
        let env = TestEnv::lxc();
        let [top, mid, base] = busybox_chain(&env);
        env.define("kj", &container_xml("kj", SLEEPER, &qcow2_root(&top)));
        write_inside(&env, "kj", "before");
        let (_held, _guard) = start_guarded(&env, "kj");
        killed_at(&env, &["blockcommit", "kj", "/", "--top", "/[1]", "--wait"], step);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !env.ok(&["blockjob", "kj", "/", "--info"]).contains("No current block job for /") {
            assert!(std::time::Instant::now() < deadline, "{step}: the commit did not end");
            std::thread::sleep(Duration::from_millis(50));
        }
        let on_disk: Vec<String> = qemu_chain(&top).into_iter().map(|(f, _)| f).collect();
        let expected = if step == "job:starting" { vec![&top, &mid, &base] } else { vec![&top, &base] };
        assert_eq!(on_disk, expected.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(), "{step}");
        assert_eq!(xml_chain(&env.ok(&["dumpxml", "kj"])), on_disk, "{step}: the live XML");
        assert_eq!(xml_chain(&env.ok(&["dumpxml", "kj", "--inactive"])), on_disk, "{step}: the definition");
        let read = env.ok(&["lxc-enter-namespace", "kj", "--noseclabel", "--", "cat", "/data"]);
        assert_eq!(read, "before\n", "{step}");
        env.ok(&["destroy", "kj"]);
        assert_eq!(data_in(&env, &top), "before\n", "{step}");
    }
}

/// The offline daemon a shut-off container's jobs run in: its pid while
/// its record is there (in the domain's directory, apart from a running
/// container's record).
fn offline_daemon(env: &TestEnv, name: &str) -> Option<i32> {
    let record = std::fs::read_to_string(env.state_root().join("domains").join(name).join("offline-jobs.xml")).ok()?;
    Some(attr(&record, "pid").and_then(|p| p.parse().ok()).expect("the daemon's pid is recorded"))
}

/// Block jobs on a shut-off container's 3-deep qcow2 chain (`top`, which
/// holds a file written earlier, over `mid` and `base`) run in a storage
/// daemon started for them, which quits when each has ended: an active
/// commit of `top` into `mid` pivoted to `mid`, a pull into `mid` (the
/// active layer now) of `base`, and a copy pivoted to a new image. After
/// each the chain on disk and in the definition agree, the active layer
/// reads what the chain read before (qemu-img compare against a copy made
/// before), `e2fsck -fn` passes on a raw copy, and no daemon or record is
/// left; the container then starts on the copy and reads its file.
#[test]
fn jobs_on_a_shut_off_container_run_in_a_daemon_started_for_them() {
    let env = TestEnv::lxc();
    let [top, mid, base] = busybox_chain(&env);
    env.define("off", &container_xml("off", SLEEPER, &qcow2_root(&top)));
    write_inside(&env, "off", "before");
    let s = |p: &Path| p.to_str().expect("utf8").to_string();
    let reference = env.path("reference.raw");
    qemu_img(&["convert", "-O", "raw", &s(&top), &s(&reference)]);
    let on_disk = |image: &Path| qemu_chain(image).into_iter().map(|(f, _)| f).collect::<Vec<_>>();
    let layers = |paths: &[&PathBuf]| paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>();
    let same_data = |image: &Path| {
        let compared = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2"])
            .args([&reference, &image.to_path_buf()])
            .output()
            .expect("run qemu-img compare");
        assert!(compared.status.success(), "{} reads what the chain read: {compared:?}", image.display());
    };
    let settled = |image: &Path, step: &str| {
        assert_eq!(offline_daemon(&env, "off"), None, "{step}: the daemon quit and its record went");
        assert!(!env.state_root().join("domains/off/jobs-run").exists(), "{step}: runtime files left");
        assert_eq!(env.ok(&["domstate", "off"]).trim(), "shut off", "{step}");
        assert_eq!(xml_chain(&env.ok(&["dumpxml", "off", "--inactive"])), on_disk(image), "{step}: the definition");
        assert_eq!(env.ok(&["blockjob", "off", "/", "--info"]).trim(), "No current block job for /", "{step}");
        same_data(image);
        assert_eq!(data_in(&env, image), "before\n", "{step}");
    };

    let out = env.ok(&["blockcommit", "off", "/", "--active", "--base", "/[1]", "--pivot", "--verbose"]);
    assert!(out.contains("Successfully pivoted"), "{out}");
    assert_eq!(on_disk(&mid), layers(&[&mid, &base]), "top was committed into mid");
    settled(&mid, "active commit");

    env.ok(&["blockpull", "off", "/", "--wait"]);
    assert_eq!(on_disk(&mid), layers(&[&mid]), "base was pulled into mid");
    settled(&mid, "pull into the active layer");

    let copy = env.path("copy.qcow2");
    let out = env.ok(&["blockcopy", "off", "/", &s(&copy), "--pivot", "--verbose"]);
    assert!(out.contains("Successfully pivoted"), "{out}");
    assert_eq!(on_disk(&copy), layers(&[&copy]), "a full copy stands alone");
    settled(&copy, "copy");

    let (_held, _guard) = start_guarded(&env, "off");
    assert_eq!(env.ok(&["lxc-enter-namespace", "off", "--noseclabel", "--", "cat", "/data"]), "before\n");
    env.ok(&["destroy", "off"]);
}

/// An intermediate commit on a shut-off container, its `strata` killed
/// once QEMU has the job (`job:started`): the next command concludes it,
/// the daemon started for it (found by its recorded pid) is gone with its
/// record, the chain on disk and in the definition agree, and the
/// container starts on it and reads its file; a start while the job's
/// daemon runs is refused, saying why.
#[test]
fn an_offline_commit_killed_once_started_is_concluded_by_the_next_command() {
    let env = TestEnv::lxc();
    let [top, mid, base] = busybox_chain(&env);
    env.define("kj", &container_xml("kj", SLEEPER, &qcow2_root(&top)));
    write_inside(&env, "kj", "before");
    killed_at(&env, &["blockcommit", "kj", "/", "--top", "/[1]", "--wait"], "job:started");
    let daemon = offline_daemon(&env, "kj").expect("the daemon of the killed job is recorded");
    assert!(alive(daemon), "the daemon runs the job its strata left");
    let refused = env.fails(&["start", "kj"]);
    assert!(refused.contains("an offline block job runs on its filesystems"), "{refused}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !env.ok(&["blockjob", "kj", "/", "--info"]).contains("No current block job for /") {
        assert!(std::time::Instant::now() < deadline, "the commit did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive(daemon), "the daemon quit once the job was concluded");
    assert_eq!(offline_daemon(&env, "kj"), None, "its record went with it");
    let on_disk: Vec<String> = qemu_chain(&top).into_iter().map(|(f, _)| f).collect();
    assert_eq!(on_disk, vec![top.display().to_string(), base.display().to_string()], "mid was committed");
    assert!(mid.exists(), "a commit keeps the image it merged");
    assert_eq!(xml_chain(&env.ok(&["dumpxml", "kj", "--inactive"])), on_disk, "the definition follows");
    assert_eq!(data_in(&env, &top), "before\n");
    let (_held, _guard) = start_guarded(&env, "kj");
    assert_eq!(env.ok(&["lxc-enter-namespace", "kj", "--noseclabel", "--", "cat", "/data"]), "before\n");
    env.ok(&["destroy", "kj"]);
}

/// External snapshot deletes of a container (`s1` frozen `top` under
/// `o1`, `s2` froze `o1` under `o2`, each layer holding what was written
/// before the next snapshot): while it runs, deleting `s1` commits `o1`
/// into `top` in its storage daemon (an intermediate commit) and the
/// container reads on; deleting `s2` would need an active commit, which
/// its FUSE export does not allow, so it is refused before anything is
/// recorded, and the next command has nothing to finish. Shut off, `s2`
/// still reverts to its data, and its delete then pulls `top` into the
/// revert's overlay. Each chain is checked on disk and in the definition,
/// the data with e2fsck -fn and debugfs.
#[test]
fn external_snapshots_are_deleted_through_block_jobs_running_or_shut_off() {
    let env = TestEnv::lxc();
    let [top, mid, base] = busybox_chain(&env);
    env.define("del", &container_xml("del", SLEEPER, &qcow2_root(&top)));
    write_inside(&env, "del", "one");
    env.ok(&["snapshot-create-as", "del", "s1", "--disk-only"]);
    let o1 = root_image(&env, "del");
    write_inside(&env, "del", "two");
    env.ok(&["snapshot-create-as", "del", "s2", "--disk-only"]);
    let o2 = root_image(&env, "del");
    write_inside(&env, "del", "three");
    assert_eq!(data_in(&env, &o1), "two\n", "o1 holds what was written before s2");
    let layers = |paths: &[&PathBuf]| paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>();
    let on_disk = |image: &Path| qemu_chain(image).into_iter().map(|(f, _)| f).collect::<Vec<_>>();
    assert_eq!(on_disk(&o2), layers(&[&o2, &o1, &top, &mid, &base]));

    let (_held, _guard) = start_guarded(&env, "del");
    env.ok(&["snapshot-delete", "del", "s1"]);
    assert_eq!(on_disk(&o2), layers(&[&o2, &top, &mid, &base]), "o1 was committed into top");
    assert!(!o1.exists(), "the committed overlay is removed");
    assert_eq!(xml_chain(&env.ok(&["dumpxml", "del"])), on_disk(&o2), "the live XML follows");
    assert_eq!(env.ok(&["snapshot-list", "del", "--name"]).trim(), "s2");
    assert_eq!(env.ok(&["lxc-enter-namespace", "del", "--noseclabel", "--", "cat", "/data"]), "three\n");

    let refused = env.fails(&["snapshot-delete", "del", "s2"]);
    assert!(
        refused.contains(
            "the lxc driver cannot delete this external snapshot of filesystem '/' of domain 'del' while it runs"
        ) && refused.contains("an active commit of its overlay")
            && refused.contains("shut the container off to delete it"),
        "{refused}"
    );
    assert_eq!(on_disk(&o2), layers(&[&o2, &top, &mid, &base]), "the refusal changed nothing");
    assert_eq!(env.ok(&["snapshot-list", "del", "--name"]).trim(), "s2", "nothing is left to finish");
    env.ok(&["destroy", "del"]);
    assert_eq!(data_in(&env, &o2), "three\n", "the chain the live delete left holds the data, its filesystem clean");

    env.ok(&["snapshot-revert", "del", "s2"]);
    let reverted = root_image(&env, "del");
    assert_eq!(data_in(&env, &reverted), "two\n", "s2 reverts to what was written before it");
    env.ok(&["snapshot-delete", "del", "s2"]);
    assert_eq!(env.ok(&["snapshot-list", "del", "--name"]).trim(), "");
    assert_eq!(on_disk(&reverted), layers(&[&reverted, &mid, &base]), "top was pulled into the revert's overlay");
    assert_eq!(xml_chain(&env.ok(&["dumpxml", "del", "--inactive"])), on_disk(&reverted), "the definition follows");
    assert_eq!(data_in(&env, &reverted), "two\n");
    let (_held, _guard) = start_guarded(&env, "del");
    assert_eq!(env.ok(&["lxc-enter-namespace", "del", "--noseclabel", "--", "cat", "/data"]), "two\n");
    env.ok(&["destroy", "del"]);
}

/// A disk set over a container's filesystems: with `/data` alone in the
/// set, `snapshot-create-as --disk-set` of the shut-off container puts an
/// overlay over `/data`'s image only and leaves the root on its image;
/// `diskset-remove` empties the set again.
#[test]
fn a_disk_set_of_filesystems_selects_what_a_snapshot_takes() {
    let env = TestEnv::lxc();
    let [top, ..] = busybox_chain(&env);
    let data = env.path("data.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", data.to_str().expect("utf8"), "16M"]);
    let filesystems = format!(
        "{}<filesystem type='file'><driver type='loop' format='qcow2'/><source file='{}'/>\
         <target dir='/data'/></filesystem>",
        qcow2_root(&top),
        data.display()
    );
    env.define("set", &container_xml("set", SLEEPER, &filesystems));
    assert_eq!(env.ok(&["diskset-add", "set", "/data"]), "Disk '/data' added to the disk set\n");
    assert_eq!(env.ok(&["diskset-list", "set"]).trim(), "/data");

    env.ok(&["snapshot-create-as", "set", "s1", "--disk-only", "--disk-set"]);
    let overlay = env.path("data.s1");
    assert_eq!(
        qemu_chain(&overlay).into_iter().map(|(f, _)| f).collect::<Vec<_>>(),
        [&overlay, &data].map(|p| p.display().to_string()),
        "/data runs on a new overlay over its image"
    );
    let xml = env.ok(&["dumpxml", "set", "--inactive"]);
    assert!(xml.contains(&format!("<source file='{}'/>", overlay.display())), "{xml}");
    assert_eq!(root_image(&env, "set"), top, "the root, outside the set, keeps its image");
    assert!(!env.path("top.s1").exists(), "no overlay was made for the root");

    assert_eq!(env.ok(&["diskset-remove", "set", "/data"]), "Disk '/data' removed from the disk set\n");
    assert_eq!(env.ok(&["diskset-list", "set"]).trim(), "");
}
