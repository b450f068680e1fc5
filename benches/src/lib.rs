//! Shared helpers for Strata's benchmark programs (`benches/*.rs`): timing
//! statistics, the quick-mode switch and running external tools.
//!
//! The benchmarks are plain programs (`harness = false`); each prints a
//! human-readable table and one final `RESULT {json}` line.

use std::process::Command;
use std::time::{Duration, Instant};

/// `STRATA_BENCH_QUICK=1`: fewer repetitions, for CI smoke runs.
pub fn quick() -> bool {
    std::env::var("STRATA_BENCH_QUICK").is_ok_and(|v| v == "1")
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
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2
        };
        // Nearest rank: the smallest sample with at least 90% at or below it.
        let p90 = s[(n * 9).div_ceil(10).max(1) - 1];
        Stats {
            runs: n,
            min: s[0],
            median,
            p90,
            max: s[n - 1],
        }
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
        assert_eq!(
            (one.median, one.p90),
            (Duration::from_millis(3), Duration::from_millis(3))
        );
    }
}
