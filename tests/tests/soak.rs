//! Soak: random snapshot, block-job and lifecycle commands on one domain,
//! a third of them SIGKILLed at a random moment, with guest writes in
//! between. After every command the test settles the domain (the next
//! command finishes or undoes what a killed one left) and checks what an
//! operator would: the snapshots listed are exactly the ones that were
//! created and not deleted, the disk reads exactly what was written, and no
//! helper process that no record names is left. At the end every snapshot
//! must revert to exactly its data.
//!
//! CI runs a short round; the full soak is
//! `STRATA_SOAK_OPS=200 cargo test -p strata-tests --test soak -- --nocapture`
//! (`STRATA_SOAK_SEED=N` replays one run; the seed is printed).

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{domain_xml, qemu_img, qemu_io, DiskSpec, DomainGuard, TestEnv};
use strata_qemu::QemuConnection;

const SLOTS: u64 = 8;
const SLOT: u64 = 1024 * 1024;
const WRITE_LEN: u64 = 64 * 1024;
/// Operations in the CI round.
const DEFAULT_OPS: usize = 40;

/// xorshift64*: reproducible from the printed seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What the disk holds: the pattern byte of each 1 MiB slot's first
/// 64 KiB (0: never written).
type Content = [u8; SLOTS as usize];

/// The test's model of the domain, against which Strata is checked.
struct Model {
    current: Content,
    snapshots: BTreeMap<String, Content>,
    running: bool,
    next_pattern: u8,
    next_snapshot: usize,
}

struct Soak<'a> {
    env: &'a TestEnv,
    rng: Rng,
    model: Model,
    references: BTreeMap<Content, PathBuf>,
    runtime: tokio::runtime::Runtime,
    log: Vec<String>,
}

/// What a command did to the model, to be read back after settling.
enum Effect {
    None,
    Create(String),
    Revert(String),
    Delete(String),
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8")
}

impl<'a> Soak<'a> {
    fn new(env: &'a TestEnv, seed: u64) -> Soak<'a> {
        let base = env.path("disk.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", s(&base), &format!("{}", SLOTS * SLOT)]);
        env.define("vm", &domain_xml("vm", &[DiskSpec { target: "vda", format: "qcow2", path: &base, extra: "" }]));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        Soak {
            env,
            rng: Rng(seed | 1),
            model: Model {
                current: [0; SLOTS as usize],
                snapshots: BTreeMap::new(),
                running: false,
                next_pattern: 1,
                next_snapshot: 1,
            },
            references: BTreeMap::new(),
            runtime,
            log: Vec::new(),
        }
    }

    /// Fails the test with the operations so far, so a run can be read back.
    fn fail(&self, what: String) -> ! {
        let state = self.env.strata(&["domstate", "vm"]);
        let xml = self.env.strata(&["dumpxml", "vm"]);
        let files: Vec<String> = std::fs::read_dir(self.env.dir.path())
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        panic!(
            "{what}\noperations so far:\n{}\ndomstate: {}\nfiles: {files:?}\ndumpxml:\n{}",
            self.log.join("\n"),
            String::from_utf8_lossy(&state.stdout).trim(),
            String::from_utf8_lossy(&xml.stdout)
        );
    }

    /// Runs `strata ARGS…`, which must succeed without a warning (a warning
    /// here means an interrupted operation was left unfinished); returns
    /// its standard output.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.env.strata(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || !stderr.trim().is_empty() {
            self.fail(format!("strata {args:?} ({}): {stderr}", out.status));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A qcow2 image holding `content`, made once per distinct content.
    fn reference(&mut self, content: Content) -> PathBuf {
        if let Some(p) = self.references.get(&content) {
            return p.clone();
        }
        let path = self.env.path(&format!("ref{}.qcow2", self.references.len()));
        qemu_img(&["create", "-q", "-f", "qcow2", s(&path), &format!("{}", SLOTS * SLOT)]);
        for (slot, pattern) in content.iter().enumerate().filter(|(_, p)| **p != 0) {
            let write = format!("write -P {pattern:#x} {} {WRITE_LEN}", slot as u64 * SLOT);
            qemu_io(&["-f", "qcow2", "-c", &write, s(&path)]);
        }
        self.references.insert(content, path.clone());
        path
    }

    fn active_image(&self) -> PathBuf {
        let list = self.ok(&["domblklist", "vm"]);
        list.lines()
            .filter_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                (cols.len() == 2 && cols[0] == "vda").then(|| PathBuf::from(cols[1]))
            })
            .next()
            .unwrap_or_else(|| self.fail(format!("no vda in domblklist:\n{list}")))
    }

    fn connection(&self) -> QemuConnection {
        QemuConnection::open_embedded(&self.env.state_root()).expect("open the embedded driver")
    }

    /// Whether vda reads exactly `content` (through QEMU when running).
    fn reads(&mut self, content: Content) -> bool {
        let reference = self.reference(content);
        if self.model.running {
            let conn = self.connection();
            self.runtime.block_on(common::guest::compare(&conn, "vm", "vda", &reference))
        } else {
            let out = Command::new("qemu-img")
                .args(["compare", "-U", s(&self.active_image()), s(&reference)])
                .output()
                .expect("run qemu-img compare");
            if !matches!(out.status.code(), Some(0) | Some(1)) {
                self.fail(format!("qemu-img compare failed: {}", String::from_utf8_lossy(&out.stderr)));
            }
            out.status.code() == Some(0)
        }
    }

    /// A guest write of a new pattern into a random slot, checked at once.
    fn write(&mut self) {
        let slot = self.rng.below(SLOTS);
        let pattern = self.model.next_pattern;
        self.model.next_pattern = if pattern == 0xfe { 1 } else { pattern + 1 };
        self.log.push(format!("write {pattern:#x} to slot {slot} (running: {})", self.model.running));
        if self.model.running {
            let conn = self.connection();
            self.runtime.block_on(common::guest::write(&conn, "vm", "vda", pattern, slot * SLOT, WRITE_LEN));
        } else {
            let write = format!("write -P {pattern:#x} {} {WRITE_LEN}", slot * SLOT);
            let out = Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", &write, s(&self.active_image())])
                .output()
                .expect("run qemu-io");
            if !out.status.success() {
                self.fail(format!("qemu-io {write} failed: {}", String::from_utf8_lossy(&out.stderr)));
            }
        }
        self.model.current[slot as usize] = pattern;
        if !self.reads(self.model.current) {
            self.fail(format!("the write of {pattern:#x} to slot {slot} did not land"));
        }
    }

    /// Runs `strata ARGS…`, SIGKILLed after a random delay when `kill`.
    fn strata(&mut self, args: &[&str], kill: bool) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_strata-test-cli"))
            .args(["-c", &self.env.uri])
            .args(args)
            .env_remove("STRATA_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run strata");
        let mut delay = None;
        if kill {
            let after = Duration::from_millis(self.rng.below(150));
            std::thread::sleep(after);
            let _ = child.kill();
            delay = Some(after);
        }
        let out = child.wait_with_output().expect("wait for strata");
        let how = match (out.status.code(), out.status.signal()) {
            (_, Some(libc::SIGKILL)) => format!("killed after {delay:?}"),
            (Some(code), _) => format!("exit {code}"),
            (None, sig) => format!("signal {sig:?}"),
        };
        self.log.push(format!("strata {} -> {how} {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
        if out.status.code() == Some(101) || String::from_utf8_lossy(&out.stderr).contains("panicked") {
            self.fail(format!("strata {args:?} panicked"));
        }
        out
    }

    /// One random command; returns what it may have changed.
    fn command(&mut self) -> Effect {
        let kill = self.rng.chance(33);
        let names: Vec<String> = self.model.snapshots.keys().cloned().collect();
        let pick = |rng: &mut Rng| names.get(rng.below(names.len().max(1) as u64) as usize).cloned();
        match self.rng.below(100) {
            0..=29 => {
                let name = format!("s{}", self.model.next_snapshot);
                self.model.next_snapshot += 1;
                self.strata(&["snapshot-create-as", "vm", &name, "--disk-only", "--atomic"], kill);
                Effect::Create(name)
            }
            30..=44 => match pick(&mut self.rng) {
                Some(name) => {
                    let mut args = vec!["snapshot-revert", "vm", name.as_str()];
                    if self.model.running {
                        args.push("--running");
                    }
                    self.strata(&args, kill);
                    Effect::Revert(name)
                }
                None => Effect::None,
            },
            45..=59 => match pick(&mut self.rng) {
                Some(name) => {
                    self.strata(&["snapshot-delete", "vm", &name], kill);
                    Effect::Delete(name)
                }
                None => Effect::None,
            },
            60..=69 => {
                self.strata(&["blockpull", "vm", "vda", "--wait"], kill);
                Effect::None
            }
            70..=79 => {
                self.strata(&["blockcommit", "vm", "vda", "--active", "--pivot", "--wait"], kill);
                Effect::None
            }
            80..=84 => {
                self.strata(&["blockcopy", "vm", "vda", s(&self.env.path("copy.qcow2")), "--pivot", "--wait"], kill);
                Effect::None
            }
            _ => {
                let cmd = if self.model.running { "destroy" } else { "start" };
                self.strata(&[cmd, "vm"], kill);
                Effect::None
            }
        }
    }

    /// Lets the next commands finish what a killed one left: recovery of a
    /// snapshot operation, and any block job still running or waiting for
    /// its pivot. Returns the snapshots Strata lists.
    fn settle(&mut self) -> Vec<String> {
        let listed = self.ok(&["snapshot-list", "vm", "--name"]);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let info = self.ok(&["blockjob", "vm", "vda", "--info"]);
            if info.contains("No current block job") {
                break;
            }
            if Instant::now() > deadline {
                self.fail(format!("a block job never ended: {info}"));
            }
            // A copy or active commit whose --pivot was killed waits for one.
            if self.env.strata(&["blockjob", "vm", "vda", "--pivot"]).status.success() {
                continue;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.model.running = self.is_active();
        listed.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()
    }

    /// Reads the command's outcome back into the model and checks it.
    fn check(&mut self, effect: Effect, listed: Vec<String>) {
        match effect {
            Effect::Create(name) if listed.contains(&name) => {
                self.model.snapshots.insert(name, self.model.current);
            }
            Effect::Delete(name) if !listed.contains(&name) => {
                self.model.snapshots.remove(&name);
            }
            Effect::Revert(name) => {
                let before = self.model.current;
                let frozen = self.model.snapshots[&name];
                if before != frozen && self.reads(frozen) {
                    self.model.current = frozen;
                }
            }
            _ => {}
        }
        let expected: Vec<String> = self.model.snapshots.keys().cloned().collect();
        let mut listed = listed;
        listed.sort();
        if listed != expected {
            self.fail(format!("snapshot-list shows {listed:?}, expected {expected:?}"));
        }
        if !self.reads(self.model.current) {
            self.fail(format!("vda does not read {:?}", self.model.current));
        }
        self.no_untracked_helpers();
    }

    /// Every process running for this test is a server a record accounts
    /// for (QEMU, or the storage daemon of a job still running).
    fn no_untracked_helpers(&self) {
        common::assert_no_stray_processes(self.env, &format!("operations so far:\n{}", self.log.join("\n")));
    }

    /// Whether QEMU runs the domain (a killed `start` may leave it paused).
    fn is_active(&self) -> bool {
        matches!(self.ok(&["domstate", "vm"]).trim(), "running" | "paused")
    }

    /// Destroys the domain and reverts to every snapshot in turn: each must
    /// read exactly what it froze.
    fn revert_to_each(&mut self) {
        if self.model.running {
            self.ok(&["destroy", "vm"]);
            self.model.running = false;
        }
        let snapshots: Vec<(String, Content)> = self.model.snapshots.iter().map(|(n, c)| (n.clone(), *c)).collect();
        for (name, content) in snapshots {
            self.ok(&["snapshot-revert", "vm", &name]);
            self.model.running = self.is_active();
            if !self.reads(content) {
                self.fail(format!("reverting to {name} does not give its data {content:?}"));
            }
        }
        let check = self.env.strata(&["domblkcheck", "vm"]);
        if !check.status.success() {
            self.fail(format!("domblkcheck: {}", String::from_utf8_lossy(&check.stderr)));
        }
    }
}

#[test]
fn random_operations_with_random_kills() {
    let ops: usize = std::env::var("STRATA_SOAK_OPS").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_OPS);
    let seed: u64 = std::env::var("STRATA_SOAK_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    println!("soak: {ops} operations, STRATA_SOAK_SEED={seed}");
    let env = TestEnv::new();
    let _guard = DomainGuard { env: &env, name: "vm".into() };
    let mut soak = Soak::new(&env, seed);
    for _ in 0..ops {
        if soak.rng.chance(40) {
            soak.write();
            continue;
        }
        let effect = soak.command();
        let listed = soak.settle();
        soak.check(effect, listed);
    }
    soak.revert_to_each();
    println!("soak: {} snapshots checked", soak.model.snapshots.len());
}
