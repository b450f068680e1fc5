//! Test support: a private state root per test, the `strata` command,
//! images made with real qemu-img/qemu-io, schema validation of every XML
//! document, and guest I/O on running domains without a guest OS.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// One test's world: a temporary directory holding images and the state
/// root of an embedded QEMU driver.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub uri: String,
    /// Environment variables every `strata` of the test runs with.
    pub vars: Vec<(String, PathBuf)>,
}

impl TestEnv {
    pub fn new() -> TestEnv {
        // Short paths: QMP socket paths must fit in 108 bytes.
        let dir = tempfile::Builder::new().prefix("st").tempdir_in("/tmp").expect("tempdir");
        let uri = format!("qemu:///embed?root={}/state", dir.path().display());
        TestEnv { dir, uri, vars: Vec::new() }
    }

    /// A world for the LXC driver: `lxc:///embed?root=DIR/state`.
    pub fn lxc() -> TestEnv {
        let mut env = TestEnv::new();
        env.uri = format!("lxc:///embed?root={}/state", env.dir.path().display());
        env
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn state_root(&self) -> PathBuf {
        self.path("state")
    }

    /// `strata -c URI ARGS…`, to be run, with its output piped.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_strata-test-cli"));
        command
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .envs(self.vars.iter().map(|(k, v)| (k, v)))
            .env_remove("STRATA_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    /// Runs `strata -c URI ARGS…`.
    pub fn strata(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run strata")
    }

    /// Runs `command` (from [`TestEnv::command`]) and returns its output
    /// with what it and the processes it waited for used, from wait4(2);
    /// kills it and fails the test if it runs longer than `limit` (a hang
    /// guard).
    #[allow(clippy::zombie_processes, reason = "wait4 reaps the child, which is how its usage is read")]
    pub fn run_with_usage(&self, mut command: Command, limit: Duration) -> (Output, Usage) {
        let mut child = command.spawn().expect("spawn strata");
        let pid = i32::try_from(child.id()).expect("pid");
        let deadline = Instant::now() + limit;
        let mut status = 0;
        // SAFETY: rusage is plain integers, for which all zeroes are valid.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: wait4(2) on our own unreaped child, writing into locals.
            let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
            if rc == pid {
                break;
            }
            assert_eq!(rc, 0, "wait4 on strata failed: {}", std::io::Error::last_os_error());
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{command:?} still running after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let read = |pipe: Option<&mut dyn Read>| {
            let mut bytes = Vec::new();
            pipe.expect("piped").read_to_end(&mut bytes).expect("read strata output");
            bytes
        };
        let stdout = read(child.stdout.as_mut().map(|p| p as &mut dyn Read));
        let stderr = read(child.stderr.as_mut().map(|p| p as &mut dyn Read));
        let timeval = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        let used = Usage {
            cpu: timeval(usage.ru_utime) + timeval(usage.ru_stime),
            peak_rss: u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024,
        };
        (Output { status: ExitStatus::from_raw(status), stdout, stderr }, used)
    }

    /// Starts `strata -c URI ARGS…` with its output piped, without waiting.
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        self.command(args).spawn().expect("spawn strata")
    }

    /// Runs strata and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.strata(args);
        assert!(
            out.status.success(),
            "strata {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs strata and requires failure with exit code 1; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.strata(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "strata {args:?} should fail with 1:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Writes a domain XML file and defines it.
    pub fn define(&self, name: &str, xml: &str) -> String {
        let file = self.path(&format!("{name}.xml"));
        std::fs::write(&file, xml).expect("write xml");
        self.ok(&["define", file.to_str().expect("utf8")])
    }
}

/// What a finished process used (see [`TestEnv::run_with_usage`]).
pub struct Usage {
    /// User plus system CPU time.
    pub cpu: Duration,
    /// The largest resident set, in bytes, of the process or of any
    /// process it waited for.
    pub peak_rss: u64,
}

/// A `strata` running in the background (started half a second before
/// `spawn` returns); killed if the test ends first.
pub struct Background {
    child: Option<Child>,
}

impl Background {
    pub fn spawn(env: &TestEnv, args: &[&str]) -> Background {
        let child = env.spawn(args);
        // Give it time to start its job, so the test looks at a running one.
        std::thread::sleep(Duration::from_millis(500));
        Background { child: Some(child) }
    }

    /// Starts `strata` with `STRATA_PAUSE_AT=step` and returns once it has
    /// stopped itself there; its output when it ended without reaching
    /// `step`.
    pub fn spawn_paused_at(env: &TestEnv, args: &[&str], step: &str) -> Result<Background, Output> {
        Background::spawn_paused_at_with(env, args, step, &[])
    }

    /// [`Background::spawn_paused_at`] with more variables in its
    /// environment (`STRATA_CRASH_AT` for a later step, …).
    pub fn spawn_paused_at_with(
        env: &TestEnv,
        args: &[&str],
        step: &str,
        vars: &[(&str, &str)],
    ) -> Result<Background, Output> {
        let child =
            env.command(args).env("STRATA_PAUSE_AT", step).envs(vars.iter().copied()).spawn().expect("spawn strata");
        let mut bg = Background { child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if !bg.running() {
                return Err(bg.child.take().expect("child").wait_with_output().expect("collect output"));
            }
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", bg.pid())).unwrap_or_default();
            // The state follows the command name's closing parenthesis.
            if stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T')) {
                return Ok(bg);
            }
            assert!(Instant::now() < deadline, "strata {args:?} neither stopped at {step} nor ended");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn resume(&self) {
        // SAFETY: kill(2) on the pid of our own child, which is not yet reaped.
        let rc = unsafe { libc::kill(self.pid(), libc::SIGCONT) };
        assert_eq!(rc, 0, "SIGCONT to strata failed");
    }

    pub fn running(&mut self) -> bool {
        self.child.as_mut().expect("child").try_wait().expect("try_wait").is_none()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("child").id() as i32
    }

    /// Waits for the child to exit, at most `limit`.
    pub fn finish(mut self, limit: Duration) -> Output {
        let deadline = Instant::now() + limit;
        while self.running() {
            assert!(Instant::now() < deadline, "background strata still running after {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child.take().expect("child").wait_with_output().expect("collect output")
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Takes one of a domain's locks (`operation`, `nodes`, …) from this test
/// process through the store's own API, until the returned guard drops: it
/// plays an operation in progress in another process.
pub fn hold_domain_lock(env: &TestEnv, domain: &str, purpose: &str) -> strata_core::store::DomainLock {
    let store = strata_core::store::Store::open(env.state_root()).expect("open the state store");
    store.lock_domain_for(domain, purpose).expect("take the lock")
}

/// Whatever the test started and left running (a QEMU, a storage daemon,
/// a helper, a `strata`) is killed by pid before its directory goes.
impl Drop for TestEnv {
    fn drop(&mut self) {
        for p in processes_naming(self.dir.path()) {
            // SAFETY: kill(2) on a process whose command line names this
            // test's own temporary directory; it has no other preconditions.
            unsafe {
                libc::kill(p.pid, libc::SIGKILL);
            }
        }
    }
}

/// A process found in /proc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestProcess {
    pub pid: i32,
    /// Field 22 of /proc/PID/stat, as Strata records it.
    pub start_time: u64,
    pub cmdline: String,
}

/// Every live process other than this one whose command line names `dir`.
fn processes_naming(dir: &Path) -> Vec<TestProcess> {
    let needle = dir.to_str().expect("utf8");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if pid == std::process::id() as i32 {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        let Some(start_time) = start_time(pid) else { continue };
        if cmdline.contains(needle) {
            found.push(TestProcess { pid, start_time, cmdline: cmdline.trim_end().to_string() });
        }
    }
    found
}

/// A process's start time (field 22 of /proc/PID/stat); `None` once it
/// is gone or a zombie.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// The QEMUs, storage daemons and image helpers running for this test:
/// processes other than `strata` whose command line names its directory.
pub fn test_processes(env: &TestEnv) -> Vec<TestProcess> {
    processes_naming(env.dir.path())
        .into_iter()
        .filter(|p| !p.cmdline.split(' ').next().is_some_and(|exe| exe.ends_with("strata-test-cli")))
        .collect()
}

/// After a killed command and the one that followed it: every process
/// running for this test is the server a domain's status records (pid and
/// start time), started and not starting, and a storage daemon only while
/// a block job the user started is recorded on it.
pub fn assert_no_stray_processes(env: &TestEnv, when: &str) {
    let mut allowed = Vec::new();
    let domains = env.state_root().join("domains");
    for entry in std::fs::read_dir(&domains).into_iter().flatten().flatten() {
        let Ok(xml) = std::fs::read_to_string(entry.path().join("status.xml")) else { continue };
        let status = strata_core::xml::Element::parse(&xml).expect("status XML parses");
        let number = |attr: &str| status.attr(attr).and_then(|v| v.parse::<u64>().ok());
        let (Some(pid), Some(start)) = (number("pid"), number("starttime")) else { continue };
        let job_recorded = status.child("jobs").is_some_and(|j| j.children_named("job").next().is_some());
        let daemon = status.attr("server") == Some("storage-daemon");
        if status.attr("state") != Some("starting") && (!daemon || job_recorded) {
            allowed.push((pid as i32, start));
        }
    }
    let strays: Vec<TestProcess> =
        test_processes(env).into_iter().filter(|p| !allowed.contains(&(p.pid, p.start_time))).collect();
    assert_eq!(strays, Vec::new(), "{when}: processes left that no record accounts for");
}

/// The steps of starting a QEMU or storage daemon: held before exec, then
/// recorded, released, and up with its monitors.
pub const SERVER_STEPS: [&str; 4] = ["server:forked", "server:recorded", "server:spawned", "server:started"];

/// The steps of a block job: recorded but not sent, sent but not yet
/// marked started, its end recorded before its nodes and daemon go.
pub const JOB_STEPS: [&str; 3] = ["job:starting", "job:started", "job:recorded"];

/// The block job commands the kill tests interrupt, on vda of `vm`.
#[derive(Debug, Clone, Copy)]
pub enum JobCommand {
    CommitTop,
    ActiveCommitPivot,
    Pull,
    CopyPivot,
}

impl JobCommand {
    pub const ALL: [JobCommand; 4] =
        [JobCommand::CommitTop, JobCommand::ActiveCommitPivot, JobCommand::Pull, JobCommand::CopyPivot];

    /// The command line; a copy goes to `dest`.
    pub fn args(self, dest: &Path) -> Vec<&str> {
        match self {
            JobCommand::CommitTop => vec!["blockcommit", "vm", "vda", "--top", "vda[1]", "--wait"],
            JobCommand::ActiveCommitPivot => vec!["blockcommit", "vm", "vda", "--active", "--pivot"],
            JobCommand::Pull => vec!["blockpull", "vm", "vda", "--wait"],
            JobCommand::CopyPivot => vec!["blockcopy", "vm", "vda", dest.to_str().expect("utf8"), "--pivot"],
        }
    }
}

/// Ends the job a killed command left on vda (the user's job, still
/// running and recorded): waits for it, pivoting one that reaches its
/// synchronised phase, as the killed command asked.
pub fn end_block_job(env: &TestEnv) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = env.ok(&["blockjob", "vm", "vda", "--info"]);
        if info.contains("No current block job for vda") {
            return;
        }
        let two_phase = info.contains("Active Block Commit") || info.contains("Block Copy");
        if two_phase && env.strata(&["blockjob", "vm", "vda", "--pivot"]).status.success() {
            continue;
        }
        assert!(Instant::now() < deadline, "the job on vda did not end: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a kill test checks once the command after the killed one has run:
/// no process the records do not account for, `domblkcheck` clean, and,
/// while the domain is shut off, every file of the test opening for writing.
pub fn assert_recovered(env: &TestEnv, when: &str) {
    assert_no_stray_processes(env, when);
    let check = env.ok(&["domblkcheck", "vm"]);
    assert!(
        check.lines().filter(|l| !l.is_empty()).all(|l| l.ends_with(": recorded chain matches the images")),
        "{when}: domblkcheck found differences:\n{check}"
    );
    if env.ok(&["domstate", "vm"]).trim() == "shut off" {
        assert_images_writable(env, when);
    }
}

/// Every file in the test's directory (its images among them) opens for
/// writing: no process holds one.
pub fn assert_images_writable(env: &TestEnv, when: &str) {
    for entry in std::fs::read_dir(env.dir.path()).expect("list the test directory").flatten() {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            assert_writable(&entry.path(), when);
        }
    }
}

/// No process holds `image`: qemu-io opens it for writing (taking its
/// write lock) and writes nothing.
pub fn assert_writable(image: &Path, when: &str) {
    let out =
        Command::new("qemu-io").args(["-c", "info", image.to_str().expect("utf8")]).output().expect("run qemu-io");
    assert!(
        out.status.success(),
        "{when}: {} cannot be opened for writing: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `strata ARGS…` with a crash point armed and checks it was killed
/// there (SIGKILL, as a power cut or the OOM killer would end it).
pub fn killed_at(env: &TestEnv, args: &[&str], step: &str) {
    killed_at_with(env, args, step, &[]);
}

/// [`killed_at`] with more environment variables for `strata`.
pub fn killed_at_with(env: &TestEnv, args: &[&str], step: &str, vars: &[(&str, &Path)]) {
    let out = Command::new(env!("CARGO_BIN_EXE_strata-test-cli"))
        .args(["-c", &env.uri])
        .args(args)
        .env("STRATA_CRASH_AT", step)
        .envs(vars.iter().copied())
        .output()
        .expect("run strata");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "{step}: strata {args:?} was not killed there: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `strata ARGS…` and sends it SIGKILL `delay` after it started,
/// unless it has ended by then.
pub fn killed_after(env: &TestEnv, args: &[&str], delay: Duration) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_strata-test-cli"))
        .args(["-c", &env.uri])
        .args(args)
        .env_remove("STRATA_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn strata");
    std::thread::sleep(delay);
    // Ignored when it has already ended: then there is nothing to kill.
    let _ = child.kill();
    child.wait().expect("reap strata");
}

/// Where a kill test ends a command.
#[derive(Debug, Clone, Copy)]
pub enum Kill {
    /// At a crash point (`STRATA_CRASH_AT`).
    At(&'static str),
    /// By SIGKILL this long after it started, wherever it is then.
    After(Duration),
}

impl Kill {
    /// Runs `strata ARGS…` and kills it here.
    pub fn run(self, env: &TestEnv, args: &[&str]) {
        match self {
            Kill::At(step) => killed_at(env, args, step),
            Kill::After(delay) => killed_after(env, args, delay),
        }
    }

    /// `count` kills at random moments in the first `within` of a command
    /// (each failure message names its delay).
    pub fn random(count: usize, within: Duration) -> Vec<Kill> {
        let mut state = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64 | 1)
            .unwrap_or(1);
        let span = within.as_micros().max(1) as u64;
        (0..count)
            .map(|_| {
                // xorshift64: varied, and cheap without a crate.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                Kill::After(Duration::from_micros(state % span))
            })
            .collect()
    }
}

/// `qemu-img ARGS…`, which must succeed; returns stdout.
pub fn qemu_img(args: &[&str]) -> String {
    run_tool("qemu-img", args)
}

/// `qemu-io ARGS…` on an image, which must succeed.
pub fn qemu_io(args: &[&str]) -> String {
    run_tool("qemu-io", args)
}

fn run_tool(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| panic!("run {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The path of `relative` in the workspace's `fixtures/`.
pub fn fixture(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(relative)
}

/// Makes `names[0]` (base) ← `names[1]` ← … in `dir` with
/// `fixtures/images/make-chain`: qcow2 with relative backing names and
/// recorded formats, 64 MiB, layer i holding pattern 0x11*(i+1) in MiB i.
/// Returns the paths, base first.
pub fn make_chain(dir: &Path, names: &[&str]) -> Vec<PathBuf> {
    let script = fixture("images/make-chain");
    let mut args = vec![dir.to_str().expect("utf8")];
    args.extend_from_slice(names);
    run_tool(script.to_str().expect("utf8"), &args);
    names.iter().map(|name| dir.join(name)).collect()
}

/// The domain type these tests run: `kvm` when /dev/kvm opens, else `qemu`.
pub fn domain_type() -> &'static str {
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if kvm {
        "kvm"
    } else {
        "qemu"
    }
}

/// One `<disk>` for [`domain_xml`].
pub struct DiskSpec<'a> {
    pub target: &'a str,
    pub format: &'a str,
    pub path: &'a Path,
    /// Extra XML inside `<disk>` (a `<backingStore>`, `<readonly/>`, …).
    pub extra: &'a str,
}

/// `fixtures/domains/minimal.xml`: a bootable-nothing domain whose disks
/// replace its `@DISKS@` line, with some devices Strata does not model
/// (they must survive every rewrite).
const MINIMAL_DOMAIN: &str = include_str!("../../../fixtures/domains/minimal.xml");

/// `fixtures/domains/file-disk.xml`: one file-backed virtio `<disk>`.
const FILE_DISK: &str = include_str!("../../../fixtures/domains/file-disk.xml");

/// The minimal domain of `fixtures/domains/` named `name`, of
/// [`domain_type`], with the given disks.
pub fn domain_xml(name: &str, disks: &[DiskSpec]) -> String {
    let devices: String = disks
        .iter()
        .map(|d| {
            FILE_DISK
                .replace("@FORMAT@", d.format)
                .replace("@PATH@", &d.path.display().to_string())
                .replace("@TARGET@", d.target)
                .replace("@EXTRA@\n", d.extra)
        })
        .collect();
    MINIMAL_DOMAIN.replace("@TYPE@", domain_type()).replace("@NAME@", name).replace("@DISKS@\n", &devices)
}

/// The tiny guest OS `fixtures/guest/make-test-guest` builds: a kernel and
/// an initramfs whose init reports on the serial console.
pub struct TestGuest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The test guest in `$STRATA_TEST_GUEST_DIR` (else
/// `/var/cache/strata/test-guest`); a missing one fails the test, naming
/// the script that builds it.
pub fn test_guest() -> TestGuest {
    let dir = std::env::var_os("STRATA_TEST_GUEST_DIR")
        .map_or_else(|| PathBuf::from("/var/cache/strata/test-guest"), PathBuf::from);
    let guest = TestGuest { kernel: dir.join("vmlinuz"), initrd: dir.join("initrd.gz") };
    assert!(
        guest.kernel.is_file() && guest.initrd.is_file(),
        "the test guest OS is missing from {}: build it with {} (.ci/install-deps runs it)",
        dir.display(),
        fixture("guest/make-test-guest").display()
    );
    guest
}

/// `fixtures/domains/test-guest.xml`: a TCG domain booting the test guest.
const TEST_GUEST_DOMAIN: &str = include_str!("../../../fixtures/domains/test-guest.xml");

/// A domain `name` booting [`test_guest`] under TCG, its serial console
/// written to `console`, with `interfaces` in its devices.
pub fn guest_domain_xml(name: &str, console: &Path, interfaces: &str) -> String {
    let guest = test_guest();
    TEST_GUEST_DOMAIN
        .replace("@NAME@", name)
        .replace("@KERNEL@", &guest.kernel.display().to_string())
        .replace("@INITRD@", &guest.initrd.display().to_string())
        .replace("@CONSOLE@", &console.display().to_string())
        .replace("@INTERFACES@\n", interfaces)
}

/// Polls the guest's console file until a line holds `marker`, and
/// returns that line; fails the test with the console's text after
/// `limit` (a hang guard: TCG guests boot slowly on a loaded machine).
pub fn wait_for_console(console: &Path, marker: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(marker)) {
            return line.trim().to_string();
        }
        assert!(Instant::now() < deadline, "no '{marker}' on the guest's console after {limit:?}:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A `<disk type='nvme'>` (target vdf) as libvirt's schema has it.
pub const NVME_DISK: &str = include_str!("../../../fixtures/domains/nvme-disk.xml");

/// A `<disk type='vhostuser'>` (target vdg) as libvirt's schema has it.
pub const VHOSTUSER_DISK: &str = include_str!("../../../fixtures/domains/vhostuser-disk.xml");

/// A `<disk type='vhostvdpa'>` (target vdh): libvirt 9.8 added the type to
/// its schema, so the 9.0 `virt-xml-validate` here refuses it.
pub const VHOSTVDPA_DISK: &str = include_str!("../../../fixtures/domains/vhostvdpa-disk.xml");

/// Validates an XML document Strata emitted against libvirt's schemas,
/// after removing Strata's documented extensions (docs/xml.md).
pub fn validate_xml(xml: &str) {
    let stripped = strip_extensions(xml);
    let mut file = tempfile::Builder::new().suffix(".xml").tempfile().expect("temp xml");
    std::io::Write::write_all(&mut file, stripped.as_bytes()).expect("write xml");
    let out = Command::new("virt-xml-validate")
        .arg(file.path())
        .output()
        .expect("run virt-xml-validate (install libvirt-clients and libxml2-utils)");
    assert!(
        out.status.success(),
        "virt-xml-validate rejected:\n{stripped}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Strata's extensions beyond libvirt's schema (docs/xml.md): `selected`
/// on `<disk>`, and `<backingStore>` nested below a volume's first one.
fn strip_extensions(xml: &str) -> String {
    let xml = xml.replace(" selected='yes'", "").replace(" selected='no'", "");
    let mut root = strata_core::xml::Element::parse(&xml).expect("emitted XML parses");
    if root.name == "volume" {
        if let Some(store) = root.child_mut("backingStore") {
            store.remove_children("backingStore");
        }
        return root.to_xml();
    }
    xml
}

/// The names of the internal snapshots an image holds (`qemu-img
/// snapshot -l`).
pub fn internal_snapshots(image: &Path) -> Vec<String> {
    qemu_img(&["snapshot", "-U", "-l", image.to_str().expect("utf8")])
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

/// `qemu-img info --backing-chain -U --output=json` of an image: the
/// (filename, format) of each layer, top first.
pub fn qemu_chain(path: &Path) -> Vec<(String, String)> {
    let out = qemu_img(&["info", "--backing-chain", "-U", "--output=json", path.to_str().expect("utf8")]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img json");
    v.as_array()
        .expect("array")
        .iter()
        .map(|l| {
            (l["filename"].as_str().expect("filename").to_string(), l["format"].as_str().expect("format").to_string())
        })
        .collect()
}

/// A qcow2 chain `depth` overlays deep in `dir` (created), of 8 MiB:
/// `l00000.qcow2` the base (by qemu-img), each overlay naming the image
/// below by its absolute path, as Strata's own overlays do, with its
/// header written by `strata_core::image::create_qcow2_overlay` (which
/// does not open the chain, so thousands of layers take a second).
/// Returns the images, base first.
pub fn absolute_chain(dir: &Path, depth: usize) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).expect("chain directory");
    let layers: Vec<PathBuf> = (0..=depth).map(|i| dir.join(format!("l{i:05}.qcow2"))).collect();
    qemu_img(&["create", "-q", "-f", "qcow2", layers[0].to_str().expect("utf8"), "8M"]);
    for pair in layers.windows(2) {
        let below = pair[0].to_str().expect("utf8");
        strata_core::image::create_qcow2_overlay(&pair[1], below, strata_core::image::ImageFormat::Qcow2, 8 << 20)
            .expect("write an overlay header");
    }
    layers
}

/// Destroys a test's running domain on drop (even when the test panics),
/// and kills its QEMU by pid if destroy did not end it.
pub struct DomainGuard<'a> {
    pub env: &'a TestEnv,
    pub name: String,
}

impl Drop for DomainGuard<'_> {
    fn drop(&mut self) {
        let _ = self.env.strata(&["destroy", &self.name]);
        if let Some(pid) = qemu_pid(self.env, &self.name) {
            // SAFETY: kill(2) on the pid recorded for this test's own QEMU.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// The pid of a running domain's QEMU, from its status XML.
pub fn qemu_pid(env: &TestEnv, name: &str) -> Option<i32> {
    let status = std::fs::read_to_string(env.state_root().join("domains").join(name).join("status.xml")).ok()?;
    let start = status.find("pid='")? + 5;
    let end = status[start..].find('\'')? + start;
    status[start..end].parse().ok()
}

/// Whether process `pid` exists and is not a zombie (a killed process
/// whose parent has not reaped it yet).
pub fn process_runs(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
}

/// Kills a running domain's QEMU with SIGKILL, as a crash would, and waits
/// until the process is gone or a zombie (a 60 s hang guard), without
/// running `strata`: the next command is the first to see the crash.
pub fn kill_qemu(env: &TestEnv, name: &str) {
    let pid = qemu_pid(env, name).expect("a running QEMU in the status XML");
    // SAFETY: kill(2) on the pid recorded for this test's own QEMU.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while process_runs(pid) {
        assert!(std::time::Instant::now() < deadline, "QEMU {pid} outlived SIGKILL for 60 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A tmpfs of `size` mounted at `path` for the length of a test;
/// unmounted by its path on drop.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&path).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .expect("run mount");
        assert!(out.status.success(), "mount tmpfs (the suite runs as root): {}", String::from_utf8_lossy(&out.stderr));
        Tmpfs { path }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).output();
    }
}

/// Guest I/O without a guest OS, through the running QEMU.
pub mod guest {
    use std::path::Path;
    use std::process::Command;

    use strata_qemu::QemuConnection;

    /// qemu-io addresses a virtio-blk device through its backend (see the
    /// recipe book, quirk 1); other buses by the device id.
    fn qemu_io_device(target: &str) -> String {
        if target.starts_with("vd") {
            format!("{target}/virtio-backend")
        } else {
            target.to_string()
        }
    }

    /// Writes `pattern` over `len` bytes at `offset` of the disk as the
    /// guest would. HMP reports qemu-io failures as text, so any reply is
    /// an error here (a successful write prints nothing into the reply).
    pub async fn write(conn: &QemuConnection, domain: &str, target: &str, pattern: u8, offset: u64, len: u64) {
        let (_, monitor) = conn.running(domain).await.expect("running domain");
        let cmd = format!("qemu-io -d {} \"write -P {pattern:#x} {offset} {len}\"", qemu_io_device(target));
        let reply = monitor.client.human_monitor_command(&cmd).await.expect("hmp");
        assert!(reply.trim().is_empty(), "qemu-io write on {target} failed: {reply}");
    }

    /// Compares what the guest sees on `target` with `reference` (an image
    /// given the same writes), by exporting the device's node read-only
    /// over NBD and running `qemu-img compare`.
    pub async fn compare(conn: &QemuConnection, domain: &str, target: &str, reference: &Path) -> bool {
        let (_, monitor) = conn.running(domain).await.expect("running domain");
        let client = &monitor.client;
        let block = client.query_block().await.expect("query-block");
        let node = block
            .iter()
            .find(|b| b.qdev.as_deref().is_some_and(|q| q.starts_with(&format!("/machine/peripheral/{target}"))))
            .and_then(|b| b.inserted.as_ref())
            .and_then(|i| i.node_name.clone())
            .expect("disk node");
        let dir = tempfile::Builder::new().prefix("nbd").tempdir_in("/tmp").expect("tempdir");
        let sock = dir.path().join("nbd.sock");
        let sock_str = sock.to_str().expect("utf8").to_string();
        client
            .execute(
                "nbd-server-start",
                Some(serde_json::json!({"addr": {"type": "unix", "data": {"path": sock_str}}})),
            )
            .await
            .expect("nbd-server-start");
        client
            .execute(
                "block-export-add",
                Some(serde_json::json!({"type": "nbd", "id": "cmp", "node-name": node, "name": "cmp", "writable": false})),
            )
            .await
            .expect("block-export-add");
        let uri = format!("nbd+unix:///cmp?socket={sock_str}");
        let same = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2", &uri])
            .arg(reference)
            .output()
            .expect("qemu-img compare")
            .status
            .code()
            == Some(0);
        let _ = client.execute("block-export-del", Some(serde_json::json!({"id": "cmp", "mode": "hard"}))).await;
        // The export goes away asynchronously; stopping the server waits for it.
        for _ in 0..100 {
            if client.execute("nbd-server-stop", None).await.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        same
    }
}

/// A loop device over a file, detached (and its mount point unmounted) on drop.
pub struct LoopDevice {
    pub device: String,
    pub mount_point: PathBuf,
}

impl LoopDevice {
    /// `losetup --direct-io=off --show -f FILE`, which must succeed (a
    /// FUSE-exported file must never get loop direct I/O: it corrupts).
    pub fn attach(file: &Path, mount_point: PathBuf) -> LoopDevice {
        let device = run_tool("losetup", &["--direct-io=off", "--show", "-f", file.to_str().expect("utf8")]);
        LoopDevice { device: device.trim().to_string(), mount_point }
    }

    /// `losetup -d DEVICE`, which must succeed; the drop then leaves the
    /// device alone (another test may have it by then).
    pub fn detach(mut self) {
        run_tool("losetup", &["-d", &self.device]);
        self.device.clear();
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if mounted_at(&self.mount_point) {
            let _ = Command::new("umount").arg(&self.mount_point).status();
        }
        if !self.device.is_empty() {
            let _ = Command::new("losetup").args(["-d", &self.device]).status();
        }
    }
}

/// Whether something is mounted at `dir` (a directory or a file).
pub fn mounted_at(dir: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .any(|l| l.split(' ').nth(4) == dir.to_str())
}

/// A container's root tree at `dir` (busybox-static with links for its
/// applets, and the directories a container mounts on), made by
/// `fixtures/images/make-busybox-root`.
pub fn busybox_root(dir: &Path) -> PathBuf {
    let script = fixture("images/make-busybox-root");
    run_tool(script.to_str().expect("utf8"), &[dir.to_str().expect("utf8")]);
    dir.to_path_buf()
}

/// [`busybox_root`] at `dir`, and a raw ext4 image of `mib` MiB holding it.
pub fn busybox_image(dir: &Path, image: &Path, mib: u64) {
    let script = fixture("images/make-busybox-root");
    let mib = mib.to_string();
    run_tool(script.to_str().expect("utf8"), &[dir.to_str().expect("utf8"), image.to_str().expect("utf8"), &mib]);
}

/// A Strata network a test owns: its name, bridge and /24 subnet's third
/// octet (10.214.OCTET.0/24), derived from the test's process id and a
/// letter, so that tests running at once do not collide.
pub struct TestNet {
    pub name: String,
    pub bridge: String,
    pub octet: u32,
}

impl TestNet {
    pub fn new(letter: char) -> TestNet {
        let id = std::process::id() % 100_000;
        let octet = 100 + (id + letter as u32) % 150;
        TestNet { name: format!("sn{id}{letter}"), bridge: format!("snbr{id}{letter}"), octet }
    }

    pub fn subnet(&self) -> String {
        format!("10.214.{}.0/24", self.octet)
    }

    /// The address `last` of the subnet: `10.214.OCTET.LAST`.
    pub fn address(&self, last: u32) -> String {
        format!("10.214.{}.{last}", self.octet)
    }

    /// The network's XML with `forward` (`<forward mode='nat'/>` or
    /// nothing) and `dhcp` inside its `<ip>`, and an element Strata does
    /// not model.
    pub fn xml_with_dhcp(&self, forward: &str, dhcp: &str) -> String {
        format!(
            "<network>\n  <name>{}</name>\n  {forward}\n  <bridge name='{}' stp='on' delay='0'/>\n  \
             <ip address='{}' netmask='255.255.255.0'>{dhcp}</ip>\n  <x-unknown keep='yes'/>\n</network>\n",
            self.name,
            self.bridge,
            self.address(1)
        )
    }

    pub fn xml(&self, forward: &str) -> String {
        self.xml_with_dhcp(forward, "")
    }

    /// Writes `xml` to NAME.xml in the test's directory.
    pub fn write(&self, env: &TestEnv, xml: &str) -> PathBuf {
        let file = env.path(&format!("{}.xml", self.name));
        std::fs::write(&file, xml).expect("write network xml");
        file
    }

    /// `net-define` of `xml`, checking virsh's message.
    pub fn define_xml(&self, env: &TestEnv, xml: &str) {
        let file = self.write(env, xml);
        let out = env.ok(&["net-define", file.to_str().expect("utf8")]);
        assert_eq!(out, format!("Network {} defined from {}\n\n", self.name, file.display()));
    }

    pub fn define(&self, env: &TestEnv, forward: &str) {
        self.define_xml(env, &self.xml(forward));
    }

    pub fn table(&self) -> String {
        format!("strata_{}", self.name)
    }

    /// The pid of the network's dnsmasq as `net-start` recorded it.
    pub fn recorded_dnsmasq(&self, env: &TestEnv) -> Option<i32> {
        let record = env.state_root().join("networks").join(&self.name).join("started.json");
        let record: serde_json::Value = serde_json::from_slice(&std::fs::read(record).ok()?).ok()?;
        record["dnsmasq"]["pid"].as_i64().and_then(|p| i32::try_from(p).ok())
    }
}

/// Removes what a test's networks left on the host (a dnsmasq by its
/// recorded pid, the bridge and the nft table by name), whatever the
/// test reached.
pub struct NetGuard<'a>(pub &'a TestEnv, pub &'a [&'a TestNet]);

impl Drop for NetGuard<'_> {
    fn drop(&mut self) {
        for net in self.1 {
            if let Some(pid) = net.recorded_dnsmasq(self.0).filter(|pid| process_runs(*pid)) {
                // SAFETY: kill(2) on the pid this test's network recorded for its dnsmasq.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            let _ = Command::new("ip").args(["link", "del", &net.bridge]).output();
            let _ = Command::new("nft").args(["delete", "table", "ip", &net.table()]).output();
        }
    }
}

/// Runs a host tool a test needs, failing loudly when it is missing.
pub fn host_tool(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is needed by this test (.ci/install-deps installs it): {e}"))
}

/// `ip -j addr show DEV` as JSON, or None when the device does not exist.
pub fn link(dev: &str) -> Option<serde_json::Value> {
    let out = host_tool("ip", &["-j", "addr", "show", "dev", dev]);
    if !out.status.success() {
        return None;
    }
    let mut links: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("ip -j prints JSON");
    links.pop()
}

/// The ruleset of `table ip NAME`, or None when there is no such table.
pub fn nft_table(name: &str) -> Option<String> {
    let out = host_tool("nft", &["list", "table", "ip", name]);
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The calls of an `strace -f -qq -y -o LOG` log that succeeded (`= 0`), in
/// the order they ended, as (call, its first path, its second quoted path):
/// `fsync(5</path>)` gives `/path`, `rename("from", "to")` gives `from`
/// and `to`, `mkdir("path", 0777)` gives `path`. strace splits a call that
/// another thread's call interrupts into `... <unfinished ...>` and
/// `<... fsync resumed>) = 0`; the two are joined again here.
pub fn strace_calls(trace: &str) -> Vec<(String, String, String)> {
    let mut unfinished: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
    let joined: Vec<String> = trace
        .lines()
        .filter_map(|l| {
            let pid = l.split_whitespace().next()?;
            if let Some(start) = l.strip_suffix(" <unfinished ...>") {
                unfinished.insert(pid, start);
                return None;
            }
            match (l.split_once(" resumed>"), unfinished.remove(pid)) {
                (Some((_, rest)), Some(start)) => Some(format!("{start}{rest}")),
                _ => Some(l.to_string()),
            }
        })
        .collect();
    joined
        .iter()
        .filter(|l| l.ends_with("= 0"))
        .filter_map(|l| {
            let call = l.split_whitespace().nth(1)?;
            let name = call.split('(').next()?.to_string();
            let first = call.split(['<', '"']).nth(1)?.trim_end_matches(['>', ')', ',']).to_string();
            Some((name, first, l.split('"').nth(3).unwrap_or("").to_string()))
        })
        .collect()
}
