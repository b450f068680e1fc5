//! The `strata` binary under test, the command wrapper that runs it against
//! an embedded state root, and the domains the benches start with it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

use crate::{between, require_tools, success_stdout, Tools};

/// The `strata` binary for the bench `bench`, or None after saying how to
/// build it. Also requires `tools` (see [`require_tools`]) and warns when the binary is older than the sources or a
/// debug build. Messages are prefixed with `bench`.
pub fn strata_for_bench(bench: &str, tools: &Tools) -> Option<PathBuf> {
    let Some(strata) = locate_strata() else {
        eprintln!(
            "{bench}: no strata binary found next to this benchmark (target/release/strata or \
             target/debug/strata).\nBuild it first:  cargo build --release -p strata-cli\n\
             (or point STRATA_BENCH_BIN at a strata binary)"
        );
        return None;
    };
    if !require_tools(bench, tools) {
        return None;
    }
    warn_if_stale(&strata);
    if strata.parent().and_then(Path::file_name).is_some_and(|d| d == "debug") {
        eprintln!(
            "note: {} is a debug build; for representative numbers build the release one: \
             cargo build --release -p strata-cli",
            strata.display()
        );
    }
    Some(strata)
}

/// What every bench on a domain starts from.
pub struct DomainBench {
    /// The `strata` binary (see [`strata_for_bench`]).
    pub strata: PathBuf,
    /// `STRATA_BENCH_QUICK=1` (see [`quick`](crate::quick)).
    pub quick: bool,
    /// A temporary directory with a short path (`/tmp/sb…`): QMP socket
    /// paths must fit in 108 bytes.
    pub dir: tempfile::TempDir,
    /// The domain type (see [`domain_type`]).
    pub kind: &'static str,
}

impl DomainBench {
    /// Finds the `strata` binary and `tools` as [`strata_for_bench`] does
    /// (None if one is missing) and makes the temporary directory.
    pub fn setup(bench: &str, tools: &Tools) -> Option<DomainBench> {
        let strata = strata_for_bench(bench, tools)?;
        Some(DomainBench { strata, quick: crate::quick(), dir: crate::temp_dir("sb"), kind: domain_type() })
    }
}

/// `$STRATA_BENCH_BIN`, else `strata` in this bench's own profile directory
/// (`target/<profile>/deps/<bench>` → `target/<profile>/strata`), else in
/// target/release or target/debug.
pub fn locate_strata() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("STRATA_BENCH_BIN") {
        return Some(PathBuf::from(bin));
    }
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let target = profile_dir.parent()?;
    [profile_dir.join("strata"), target.join("release/strata"), target.join("debug/strata")]
        .into_iter()
        .find(|p| p.is_file())
}

/// Warns when the binary is older than the newest source of the crates it
/// is built from (it would not measure the current code).
pub fn warn_if_stale(bin: &Path) {
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let newest = ["core/src", "drivers", "cli/src"].iter().filter_map(|d| newest_rs(&root.join(d))).max();
    if newest.is_some_and(|n| n > built) {
        eprintln!(
            "note: {} is older than the Strata sources; rebuild it to measure the current code: \
             cargo build --release -p strata-cli",
            bin.display()
        );
    }
}

/// The newest modification time of a `.rs` file under `dir`.
pub fn newest_rs(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                newest = newest.max(meta.modified().ok());
            }
        }
    }
    newest
}

/// The `strata` command with one connection URI: the embedded QEMU driver
/// on a private state root (`qemu:///embed?root=STATE`).
#[derive(Clone)]
pub struct Strata {
    pub bin: PathBuf,
    pub uri: String,
    /// The state root the URI names.
    pub state: PathBuf,
    /// Whether [`Strata::run`] sets `NO_COLOR=1` (for parsing its log).
    no_color: bool,
}

impl Strata {
    /// `bin -c qemu:///embed?root=STATE`; `STRATA_LOG` is never passed on.
    pub fn embedded(bin: &Path, state: &Path) -> Strata {
        Strata {
            bin: bin.to_path_buf(),
            uri: format!("qemu:///embed?root={}", state.display()),
            state: state.to_path_buf(),
            no_color: false,
        }
    }

    /// `bin -c lxc:///embed?root=STATE`: the LXC driver on a private state root.
    pub fn embedded_lxc(bin: &Path, state: &Path) -> Strata {
        Strata { uri: format!("lxc:///embed?root={}", state.display()), ..Strata::embedded(bin, state) }
    }

    /// The same state root through another binary (an older build).
    pub fn with_bin(&self, bin: &Path) -> Strata {
        Strata { bin: bin.to_path_buf(), ..self.clone() }
    }

    /// The same, with `NO_COLOR=1` for every [`Strata::run`] and
    /// [`Strata::ok`] (a log without colour sequences).
    pub fn without_color(self) -> Strata {
        Strata { no_color: true, ..self }
    }

    /// `strata -c URI ARGS…`, not started yet (without `NO_COLOR`).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c").arg(&self.uri).args(args).env_remove("STRATA_LOG");
        cmd
    }

    /// Runs to the end, capturing stdout and stderr.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut cmd = self.command(args);
        if self.no_color {
            cmd.env("NO_COLOR", "1");
        }
        cmd.output().unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()))
    }

    /// Runs and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        success_stdout("strata", args, &self.run(args))
    }
}

/// The process a domain's status file may still name after `destroy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leftover {
    /// The domain's QEMU.
    Qemu,
    /// QEMU, or the storage daemon of an interrupted offline block job.
    Process,
}

impl Leftover {
    /// (in "destroy did not end … pid", in "not this bench's …").
    fn words(self) -> (&'static str, &'static str) {
        match self {
            Leftover::Qemu => ("QEMU ", "QEMU"),
            Leftover::Process => ("", "process"),
        }
    }
}

/// A defined domain that is destroyed when this is dropped (also when the
/// bench panics). If its status file still names a pid afterwards, that
/// process is killed, but only if `/proc/PID/cmdline` names this run's
/// state directory (a recycled pid would not).
pub struct DomainGuard {
    /// The command the domain is managed with.
    pub cli: Strata,
    name: String,
    /// Prefix of the messages (the bench's name).
    bench: &'static str,
    leftover: Leftover,
}

impl DomainGuard {
    /// Guards the domain `name` defined with `cli`.
    pub fn new(cli: Strata, name: &str, bench: &'static str, leftover: Leftover) -> DomainGuard {
        DomainGuard { cli, name: name.to_string(), bench, leftover }
    }

    /// The domain's directory in the state root (`STATE/domains/NAME`):
    /// its status file and snapshot records.
    pub fn domain_dir(&self) -> PathBuf {
        self.cli.state.join("domains").join(&self.name)
    }

    /// Waits until the running domain's QEMU is idle ([`crate::wait_for_idle`]).
    pub fn wait_for_idle(&self) {
        let status = std::fs::read_to_string(self.domain_dir().join("status.xml")).ok();
        if let Some(pid) = status.as_deref().and_then(pid_attr) {
            crate::wait_for_idle(pid);
        }
    }
}

impl Drop for DomainGuard {
    fn drop(&mut self) {
        let (bench, state) = (self.bench, &self.cli.state);
        let out = self.cli.run(&["destroy", &self.name]);
        let status = self.domain_dir().join("status.xml");
        let Some(pid) = std::fs::read_to_string(&status).ok().as_deref().and_then(pid_attr) else {
            return;
        };
        let (which, what) = self.leftover.words();
        eprintln!(
            "{bench}: destroy did not end {which}pid {pid} ({}); killing it\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // Only a process started for this state root: its command line
        // names the state directory (a recycled pid would not).
        let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*state.to_string_lossy()));
        if ours {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        } else {
            eprintln!("{bench}: pid {pid} is gone or is not this bench's {what}; not killing it");
        }
    }
}

/// `pid='N'` in a status XML document.
pub fn pid_attr(xml: &str) -> Option<u32> {
    between(xml, "pid='", "'")?.parse().ok()
}

/// `kvm` when /dev/kvm opens read-write, else `qemu` (TCG).
pub fn domain_type() -> &'static str {
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if kvm {
        "kvm"
    } else {
        "qemu"
    }
}

/// A domain of type `kind` (see [`domain_type`]) with no guest OS and one
/// virtio qcow2 disk per entry of `disks`: vda, vdb, … (the template of
/// tests/tests/common/mod.rs).
pub fn domain_xml<P: AsRef<Path>>(name: &str, kind: &str, disks: &[P]) -> String {
    assert!(disks.len() <= 26, "at most 26 virtio disks (vda … vdz)");
    let devices: String = disks
        .iter()
        .zip('a'..='z')
        .map(|(path, letter)| {
            format!(
                "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      \
                 <source file='{}'/>\n      <target dev='vd{letter}' bus='virtio'/>\n    </disk>\n",
                path.as_ref().display()
            )
        })
        .collect();
    format!(
        "<domain type='{kind}'>\n  <name>{name}</name>\n  <memory unit='MiB'>128</memory>\n  \
         <vcpu placement='static'>1</vcpu>\n  <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n  </os>\n  \
         <cpu mode='custom' match='exact'>\n    <model fallback='allow'>qemu64</model>\n  </cpu>\n  \
         <on_poweroff>destroy</on_poweroff>\n  <devices>\n{devices}    <memballoon model='none'/>\n  </devices>\n</domain>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_xml_names_disks_in_order() {
        let xml = domain_xml("vm", "qemu", &["/a.qcow2", "/b.qcow2"]);
        let a = xml.find("<source file='/a.qcow2'/>\n      <target dev='vda'");
        let b = xml.find("<source file='/b.qcow2'/>\n      <target dev='vdb'");
        assert!(a.is_some() && b.is_some() && a < b, "{xml}");
        assert!(xml.starts_with("<domain type='qemu'>\n  <name>vm</name>\n"));
        assert!(xml.ends_with("    </disk>\n    <memballoon model='none'/>\n  </devices>\n</domain>\n"));
    }
}
