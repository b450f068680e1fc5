//! `cargo bench -p strata-benches --bench cli_running`
//!
//! Times whole `strata` invocations (process start to exit) against a
//! running QEMU domain in an embedded state root: `list --all`,
//! `dominfo vm` and `dumpxml vm`, plus `strata --version` as the bare
//! process start-up cost.
//!
//! Uses the `strata` binary already built in this target directory
//! (`cargo build --release -p strata-cli`), or `$STRATA_BENCH_BIN`.
//! `STRATA_BENCH_QUICK=1` runs fewer repetitions.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output};
use std::time::Duration;

use serde_json::json;
use strata_benches::{have_tool, ms, quick, run_tool, time, Stats};

const DOMAIN: &str = "vm";
const WARMUP: usize = 2;

fn main() -> ExitCode {
    let Some(strata) = locate_strata() else {
        eprintln!(
            "cli_running: no strata binary found next to this benchmark (target/release/strata or \
             target/debug/strata).\nBuild it first:  cargo build --release -p strata-cli\n\
             (or point STRATA_BENCH_BIN at a strata binary)"
        );
        return ExitCode::FAILURE;
    };
    for tool in ["qemu-img", "qemu-system-x86_64"] {
        if !have_tool(tool) {
            eprintln!("cli_running: {tool} is not installed (Debian/Ubuntu: apt-get install qemu-utils qemu-system-x86)");
            return ExitCode::FAILURE;
        }
    }
    warn_if_stale(&strata);
    if strata
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|d| d == "debug")
    {
        eprintln!(
            "note: {} is a debug build; for representative numbers build the release one: \
             cargo build --release -p strata-cli",
            strata.display()
        );
    }
    let quick = quick();
    let runs = if quick { 10 } else { 30 };

    // Short path: QMP socket paths must fit in 108 bytes.
    let dir = tempfile::Builder::new()
        .prefix("sb")
        .tempdir_in("/tmp")
        .expect("create a temporary directory under /tmp");
    let state = dir.path().join("state");
    let uri = format!("qemu:///embed?root={}", state.display());
    let top = make_chain(dir.path());
    let kind = domain_type();
    let xml_path = dir.path().join("vm.xml");
    std::fs::write(&xml_path, domain_xml(DOMAIN, kind, &top)).expect("write the domain XML");

    let cli = Strata {
        bin: &strata,
        uri: &uri,
    };
    cli.ok(&[
        "define",
        xml_path.to_str().expect("temporary path is UTF-8"),
    ]);
    // From here on the domain is destroyed however this function ends.
    let _guard = DomainGuard {
        cli: &cli,
        state: &state,
        name: DOMAIN,
    };
    let (start_time, _) = time(|| cli.ok(&["start", DOMAIN]));

    println!(
        "strata on a running domain{}: wall time per invocation (process start to exit)",
        if quick {
            " (quick mode: STRATA_BENCH_QUICK=1)"
        } else {
            ""
        }
    );
    println!("binary: {}", strata.display());
    println!(
        "domain: '{DOMAIN}', type {kind}, 128 MiB, q35, one virtio disk on a 3-layer qcow2 chain"
    );
    println!("uri:    {uri}");
    println!("start:  {:.1} ms (once)\n", ms(start_time));

    let cases: [Case; 4] = [
        ("--version (start-up only)", &["--version"], |_| true),
        ("list --all", &["list", "--all"], |out| {
            out.contains(DOMAIN) && out.contains("running")
        }),
        ("dominfo vm", &["dominfo", DOMAIN], |out| {
            out.contains("running")
        }),
        ("dumpxml vm", &["dumpxml", DOMAIN], |out| {
            out.contains("<domain") && out.contains("id='")
        }),
    ];
    println!(
        "{:<28} {:>5} {:>10} {:>10} {:>10}",
        "command", "runs", "min ms", "median ms", "p90 ms"
    );
    let mut rows = Vec::new();
    for (label, args, check) in cases {
        let out = cli.ok(args);
        assert!(
            check(&out),
            "strata {args:?} printed something unexpected:\n{out}"
        );
        for _ in 1..WARMUP {
            cli.ok(args);
        }
        let samples: Vec<Duration> = (0..runs).map(|_| time(|| cli.ok(args)).0).collect();
        let s = Stats::of(&samples);
        println!(
            "{label:<28} {:>5} {:>10.2} {:>10.2} {:>10.2}",
            s.runs,
            ms(s.min),
            ms(s.median),
            ms(s.p90)
        );
        rows.push(json!({
            "command": args.join(" "),
            "runs": s.runs,
            "min_ms": ms(s.min),
            "median_ms": ms(s.median),
            "p90_ms": ms(s.p90),
        }));
    }

    println!(
        "\nSame measurement against libvirt (optional; needs libvirtd and images libvirt's qemu user can read):\n  \
         virsh -c qemu:///system define vm.xml && virsh -c qemu:///system start vm\n  \
         for c in 'list --all' 'dominfo vm' 'dumpxml vm'; do echo \"$c\"; \
         time (for i in $(seq {runs}); do virsh -c qemu:///system $c >/dev/null; done); done\n  \
         (or: hyperfine -N --runs {runs} 'virsh -c qemu:///system list --all')\n  \
         virsh -c qemu:///system destroy vm; virsh -c qemu:///system undefine vm"
    );
    let result = json!({
        "bench": "cli_running",
        "quick": quick,
        "domain_type": kind,
        "start_ms": ms(start_time),
        "commands": rows,
    });
    println!("RESULT {result}");
    ExitCode::SUCCESS
}

/// A timed command: label, arguments, and a check of its first output.
type Case = (&'static str, &'static [&'static str], fn(&str) -> bool);

/// The `strata` command with one connection URI.
struct Strata<'a> {
    bin: &'a Path,
    uri: &'a str,
}

impl Strata<'_> {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(self.bin)
            .arg("-c")
            .arg(self.uri)
            .args(args)
            .env_remove("STRATA_LOG")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()))
    }

    /// Runs and requires success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "strata {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Destroys the domain when dropped (also when the bench panics); if its
/// status file still names a QEMU pid afterwards, kills that pid.
struct DomainGuard<'a> {
    cli: &'a Strata<'a>,
    state: &'a Path,
    name: &'a str,
}

impl Drop for DomainGuard<'_> {
    fn drop(&mut self) {
        let out = self.cli.run(&["destroy", self.name]);
        let status = self
            .state
            .join("domains")
            .join(self.name)
            .join("status.xml");
        let Some(pid) = std::fs::read_to_string(&status)
            .ok()
            .as_deref()
            .and_then(pid_attr)
        else {
            return;
        };
        eprintln!(
            "cli_running: destroy did not end QEMU pid {pid} ({}); killing it\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // Only a process started for this state root: its command line
        // names the state directory (a recycled pid would not).
        let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*self.state.to_string_lossy()));
        if ours {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        } else {
            eprintln!("cli_running: pid {pid} is gone or is not this bench's QEMU; not killing it");
        }
    }
}

/// `pid='N'` in a status XML document.
fn pid_attr(xml: &str) -> Option<u32> {
    let start = xml.find("pid='")? + 5;
    let end = xml[start..].find('\'')? + start;
    xml[start..end].parse().ok()
}

/// `$STRATA_BENCH_BIN`, else `strata` in this bench's own profile directory
/// (target/<profile>/deps/<bench> → target/<profile>/strata), else in
/// target/release or target/debug.
fn locate_strata() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("STRATA_BENCH_BIN") {
        return Some(PathBuf::from(bin));
    }
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let target = profile_dir.parent()?;
    [
        profile_dir.join("strata"),
        target.join("release/strata"),
        target.join("debug/strata"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// Warns when the binary is older than the newest source of the crates it
/// is built from (it would not measure the current code).
fn warn_if_stale(bin: &Path) {
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let newest = ["core/src", "drivers", "cli/src"]
        .iter()
        .filter_map(|d| newest_rs(&root.join(d)))
        .max();
    if newest.is_some_and(|n| n > built) {
        eprintln!(
            "note: {} is older than the Strata sources; rebuild it to measure the current code: \
             cargo build --release -p strata-cli",
            bin.display()
        );
    }
}

/// The newest modification time of a `.rs` file under `dir`.
fn newest_rs(dir: &Path) -> Option<std::time::SystemTime> {
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

/// base.qcow2 ← mid.qcow2 ← top.qcow2 (64 MiB, relative backing names,
/// formats recorded); returns the top.
fn make_chain(dir: &Path) -> PathBuf {
    let names = ["base.qcow2", "mid.qcow2", "top.qcow2"];
    for (i, name) in names.iter().enumerate() {
        let path = dir.join(name);
        let p = path.to_str().expect("temporary path is UTF-8");
        if i == 0 {
            run_tool("qemu-img", &["create", "-q", "-f", "qcow2", p, "64M"]);
        } else {
            run_tool(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    names[i - 1],
                    "-F",
                    "qcow2",
                    p,
                ],
            );
        }
    }
    dir.join(names[2])
}

/// `kvm` when /dev/kvm opens read-write, else `qemu` (TCG).
fn domain_type() -> &'static str {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if kvm {
        "kvm"
    } else {
        "qemu"
    }
}

/// A domain with no guest OS and one virtio disk (the template of
/// tests/tests/common/mod.rs).
fn domain_xml(name: &str, kind: &str, disk: &Path) -> String {
    format!(
        "<domain type='{kind}'>\n  <name>{name}</name>\n  <memory unit='MiB'>128</memory>\n  \
         <vcpu placement='static'>1</vcpu>\n  <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n  </os>\n  \
         <cpu mode='custom' match='exact'>\n    <model fallback='allow'>qemu64</model>\n  </cpu>\n  \
         <on_poweroff>destroy</on_poweroff>\n  <devices>\n    <disk type='file' device='disk'>\n      \
         <driver name='qemu' type='qcow2'/>\n      <source file='{}'/>\n      <target dev='vda' bus='virtio'/>\n    \
         </disk>\n    <memballoon model='none'/>\n  </devices>\n</domain>\n",
        disk.display()
    )
}
