//! Shared helpers for Strata's benchmark programs (`benches/*.rs`): timing
//! statistics, the quick-mode switch, running external tools and temporary
//! directories here; the `strata` command and the domains it runs in
//! [`strata`]; qcow2 images in [`images`]; virsh, where a libvirtd
//! answers, in [`virsh`].
//!
//! The benchmarks are plain programs (`harness = false`); each prints a
//! human-readable table and one final `RESULT {json}` line.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub mod images;
pub mod strata;
pub mod virsh;

pub use images::{copy_images, create_qcow2, layer_name, patched_chain, qcow2_chain, qemu_io, BackingNames};
pub use strata::{domain_type, domain_xml, pid_attr, strata_for_bench, DomainBench, DomainGuard, Leftover, Strata};
pub use virsh::{libvirt_xml, Virsh, VirshDomain};

/// `STRATA_BENCH_QUICK=1`: fewer repetitions, for CI smoke runs.
pub fn quick() -> bool {
    std::env::var("STRATA_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// The note a bench's title line gets in quick mode (empty otherwise).
pub fn quick_suffix(quick: bool) -> &'static str {
    if quick {
        " (quick mode: STRATA_BENCH_QUICK=1)"
    } else {
        ""
    }
}

/// A new temporary directory under /tmp named `PREFIX…`, removed when
/// dropped. Benches that start QEMU use a short prefix: QMP socket paths
/// must fit in 108 bytes.
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir_in("/tmp").expect("create a temporary directory under /tmp")
}

/// A path as `&str`; the benches only make UTF-8 paths (under /tmp).
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary path is UTF-8")
}

/// The text between `start` and the next `end`.
pub fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let a = s.find(start)? + start.len();
    let b = s[a..].find(end)? + a;
    Some(&s[a..b])
}

/// Times `f` once.
pub fn time<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let start = Instant::now();
    let out = f();
    (start.elapsed(), out)
}

/// One finished process: its output, wall time, CPU time and peak memory.
pub struct Measured {
    pub output: Output,
    pub wall: Duration,
    /// User and system CPU time of the process and of any process it
    /// waited for (not of a server it started, such as QEMU).
    pub cpu: Duration,
    /// The largest resident set, in bytes, of the process or of any
    /// process it waited for (wait4's `ru_maxrss`).
    pub peak_rss: u64,
}

/// Runs `command` to its end and measures it (see [`Measured`]); its
/// stdout and stderr go where the caller set them (piped ones are read
/// into the output).
#[allow(clippy::zombie_processes, reason = "wait4 reaps the child, which is how its usage is read")]
pub fn measure(mut command: Command) -> Measured {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{ExitStatus, Stdio};

    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                pipe.read_to_end(&mut bytes).expect("read the output of a measured process");
            }
            bytes
        })
    }
    let start = Instant::now();
    let mut child = command.stdin(Stdio::null()).spawn().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let (stdout, stderr) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let pid = i32::try_from(child.id()).expect("a pid fits in i32");
    let mut status = 0;
    // SAFETY: rusage is plain integers, for which all zeroes are valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4(2) on our own unreaped child, writing into locals.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid, "wait4 on {command:?}: {}", std::io::Error::last_os_error());
    let wall = start.elapsed();
    let output = Output {
        status: ExitStatus::from_raw(status),
        stdout: stdout.join().expect("the stdout reader"),
        stderr: stderr.join().expect("the stderr reader"),
    };
    let seconds = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    let cpu = seconds(usage.ru_utime) + seconds(usage.ru_stime);
    Measured { output, wall, cpu, peak_rss: u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024 }
}

/// [`measure`] of a run that must succeed (else panics with its stderr).
pub fn measure_ok(command: Command) -> Measured {
    let what = format!("{command:?}");
    let run = measure(command);
    assert!(
        run.output.status.success(),
        "{what} failed ({}): {}",
        run.output.status,
        String::from_utf8_lossy(&run.output.stderr)
    );
    run
}

/// `bytes` in MiB, for tables.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Summary of repeated wall-clock measurements.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub runs: usize,
    pub min: Duration,
    pub median: Duration,
    /// Nearest-rank 90th percentile.
    pub p90: Duration,
    pub max: Duration,
}

impl Stats {
    /// Summarises `samples`, which must not be empty.
    pub fn of(samples: &[Duration]) -> Stats {
        assert!(!samples.is_empty(), "no samples to summarise");
        let mut s = samples.to_vec();
        s.sort_unstable();
        let n = s.len();
        let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2 };
        // Nearest rank: the smallest sample with at least 90% at or below it.
        let p90 = s[(n * 9).div_ceil(10).max(1) - 1];
        Stats { runs: n, min: s[0], median, p90, max: s[n - 1] }
    }
}

/// Milliseconds as a float.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Microseconds as a float.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A duration in the most readable unit (µs, ms or s).
pub fn human(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1e-3 {
        format!("{:.1} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.3} s")
    }
}

/// Runs `tool ARGS…`, which must succeed; returns stdout.
pub fn run_tool(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e} (is it installed and on PATH?)"));
    success_stdout(tool, args, &out)
}

/// The stdout of `tool ARGS…`'s finished run `out`, which must have
/// succeeded (else panics showing its status, stdout and stderr).
pub fn success_stdout(tool: &str, args: &[&str], out: &Output) -> String {
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until process `pid` (a domain's QEMU) stops using the CPU: a
/// guest without an OS keeps one core busy for about 3 s after its start
/// while its firmware looks for something to boot, which on a 2-core
/// machine would slow whatever a bench times next. Gives up after 15 s.
pub fn wait_for_idle(pid: u32) {
    // utime + stime, in clock ticks (fields 14 and 15; the name in field 2
    // may hold spaces, so count from its closing parenthesis).
    let cpu_ticks = || -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split_whitespace().collect();
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let Some(mut last) = cpu_ticks() else { return };
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        let Some(now) = cpu_ticks() else { return };
        // At most 2 ticks (20 ms) of 250: idle.
        if now.saturating_sub(last) <= 2 {
            return;
        }
        last = now;
    }
    eprintln!("pid {pid} still busy after 15 s; measuring anyway");
}

/// Whether `tool` can be run at all (`tool --version` starts).
pub fn have_tool(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

/// External programs a bench needs, and the Debian/Ubuntu packages that
/// provide them (for the message when one is missing).
#[derive(Debug, Clone, Copy)]
pub struct Tools {
    pub programs: &'static [&'static str],
    pub packages: &'static str,
}

/// What a bench on a running domain needs: qemu-img and QEMU itself.
pub const RUNNING_DOMAIN_TOOLS: Tools =
    Tools { programs: &["qemu-img", "qemu-system-x86_64"], packages: "qemu-utils qemu-system-x86" };

/// What a bench on busybox containers needs: their root images made by
/// `fixtures/images/make-busybox-root`, loop devices, and the storage
/// daemon serving a qcow2 root.
pub const CONTAINER_TOOLS: Tools = Tools {
    programs: &["mkfs.ext4", "losetup", "busybox", "qemu-img", "qemu-storage-daemon"],
    packages: "e2fsprogs mount busybox-static qemu-utils qemu-system-x86",
};

/// Whether every one of `tools` can be run; if not, tells which one is
/// missing and which packages provide them, prefixed with the bench's name.
pub fn require_tools(bench: &str, tools: &Tools) -> bool {
    for tool in tools.programs {
        if !have_tool(tool) {
            eprintln!("{bench}: {tool} is not installed (Debian/Ubuntu: apt-get install {})", tools.packages);
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_median_and_p90() {
        let d: Vec<Duration> = (1..=10).rev().map(Duration::from_millis).collect();
        let s = Stats::of(&d);
        assert_eq!(s.min, Duration::from_millis(1));
        assert_eq!(s.median, Duration::from_micros(5500));
        assert_eq!(s.p90, Duration::from_millis(9));
        assert_eq!(s.max, Duration::from_millis(10));
        let one = Stats::of(&[Duration::from_millis(3)]);
        assert_eq!((one.median, one.p90), (Duration::from_millis(3), Duration::from_millis(3)));
    }

    #[test]
    fn between_and_pid_attr() {
        let xml = "<domstatus state='running' pid='4242'>";
        assert_eq!(between(xml, "state='", "'"), Some("running"));
        assert_eq!(between(xml, "nope='", "'"), None);
        assert_eq!(pid_attr(xml), Some(4242));
        assert_eq!(pid_attr("<domstatus state='shutoff'>"), None);
    }
}
