//! Shared helpers for Strata's benchmark programs (`benches/*.rs`): timing
//! statistics, the quick-mode switch, running external tools and temporary
//! directories here; the `strata` command and the domains it runs in
//! [`strata`]; qcow2 images in [`images`].
//!
//! The benchmarks are plain programs (`harness = false`); each prints a
//! human-readable table and one final `RESULT {json}` line.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub mod images;
pub mod strata;

pub use images::{copy_images, create_qcow2, layer_name, patched_chain, qcow2_chain, qemu_io, BackingNames};
pub use strata::{domain_type, domain_xml, pid_attr, strata_for_bench, DomainBench, DomainGuard, Leftover, Strata};

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
