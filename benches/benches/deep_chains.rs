//! `cargo bench -p strata-benches --bench deep_chains`
//!
//! Wall time and peak memory (wait4's `ru_maxrss`) of whole `strata`
//! commands on a shut-off domain whose one disk is a qcow2 chain 5,000 and
//! 10,000 deep: `define`, `domblklist`, `dumpxml`, the offline
//! `snapshot-create-as --disk-only` (which writes one overlay on top of
//! the chain), then `snapshot-list` and `snapshot-list --tree`. The goals:
//! the snapshot under 1 s, every command under 100 MB.
//!
//! `STRATA_BENCH_BEFORE=/path/to/strata` runs the same commands with a
//! second binary (an older build) in the same run, for a before/after
//! table. The chain is built once (see `patched_chain`); every binary
//! and depth gets a fresh state root, and each snapshot's overlay is
//! removed before the next run.

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use serde_json::json;
use strata_benches::{
    domain_type, domain_xml, human, measure_ok, mib, ms, patched_chain, path_str, quick, quick_suffix,
    strata_for_bench, temp_dir, time, BackingNames, Stats, Strata, Tools,
};

const DEPTHS: [usize; 2] = [5_000, 10_000];
const LIMIT_MIB: f64 = 100.0;
const DOMAIN: &str = "vm";

/// The commands measured, in order, after `define`.
const COMMANDS: [&[&str]; 4] =
    [&["domblklist", DOMAIN], &["dumpxml", DOMAIN], &["snapshot-list", DOMAIN], &["snapshot-list", DOMAIN, "--tree"]];

fn main() -> ExitCode {
    let tools = Tools { programs: &["qemu-img"], packages: "qemu-utils" };
    let Some(after) = strata_for_bench("deep_chains", &tools) else {
        return ExitCode::FAILURE;
    };
    let mut binaries = vec![("strata", after)];
    if let Some(before) = std::env::var_os("STRATA_BENCH_BEFORE") {
        binaries.insert(0, ("before", PathBuf::from(before)));
    }
    let quick = quick();
    let runs = if quick { 1 } else { 3 };
    let dir = temp_dir("strata-bench-deep-");
    let chain_dir = dir.path().join("chain");
    std::fs::create_dir_all(&chain_dir).expect("create the chain directory");
    let (build, chain) = time(|| patched_chain(&chain_dir, DEPTHS[DEPTHS.len() - 1], BackingNames::Relative));
    println!("Strata commands on a shut-off domain on a deep qcow2 chain{}", quick_suffix(quick));
    println!(
        "fixture: {} qcow2 images built in {}; median wall time of {runs} runs, largest peak RSS\n",
        chain.len(),
        human(build)
    );
    println!("{:<8} {:>6} {:<44} {:>12} {:>12} {:>6}", "binary", "depth", "command", "wall", "peak RSS", "<100MB");

    let mut rows = Vec::new();
    let mut over = false;
    for (label, bin) in &binaries {
        for depth in DEPTHS {
            let top = &chain[depth];
            let state = dir.path().join(format!("state-{label}-{depth}"));
            let cli = Strata::embedded(bin, &state);
            let xml = dir.path().join(format!("{DOMAIN}-{depth}.xml"));
            std::fs::write(&xml, domain_xml(DOMAIN, domain_type(), &[top])).expect("write the domain XML");
            let mut report = |command: &[&str], samples: Vec<(Duration, u64)>| {
                let wall = Stats::of(&samples.iter().map(|(d, _)| *d).collect::<Vec<_>>()).median;
                let rss = samples.iter().map(|(_, r)| *r).max().unwrap_or(0);
                let fits = mib(rss) < LIMIT_MIB;
                over |= !fits;
                println!(
                    "{label:<8} {depth:>6} {:<44} {:>12} {:>9.1} MiB {:>6}",
                    command.join(" "),
                    human(wall),
                    mib(rss),
                    if fits { "yes" } else { "NO" }
                );
                rows.push(json!({
                    "binary": label, "depth": depth, "command": command.join(" "),
                    "median_ms": ms(wall), "peak_rss_mib": mib(rss), "runs": samples.len(),
                }));
            };

            let define = ["define", path_str(&xml)];
            report(&define, vec![run(&cli, &define)]);
            let snapshot = ["snapshot-create-as", DOMAIN, "s1", "--disk-only"];
            let overlay = top.with_extension("s1");
            let samples = (0..runs)
                .map(|_| {
                    let sample = run(&cli, &snapshot);
                    assert!(overlay.exists(), "no overlay {} after the snapshot", overlay.display());
                    cli.ok(&["undefine", DOMAIN, "--snapshots-metadata"]);
                    cli.ok(&["define", path_str(&xml)]);
                    std::fs::remove_file(&overlay).expect("remove the snapshot's overlay");
                    sample
                })
                .collect();
            report(&snapshot, samples);
            // One snapshot stays, for the lists.
            run(&cli, &snapshot);
            for command in COMMANDS {
                report(command, (0..runs).map(|_| run(&cli, command)).collect());
            }
            std::fs::remove_file(&overlay).expect("remove the snapshot's overlay");
            let _ = std::fs::remove_dir_all(&state);
        }
    }
    println!("\ngoals: offline snapshot-create-as --disk-only on 5,000 layers under 1 s; every command under 100 MB");
    let result = json!({ "bench": "deep_chains", "quick": quick, "fixture_build_ms": ms(build), "rows": rows });
    println!("RESULT {result}");
    if over {
        eprintln!("deep_chains: a command's peak RSS reached {LIMIT_MIB} MiB");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// One successful run of `strata ARGS…` with stdout to /dev/null: (wall
/// time, peak RSS in bytes).
fn run(cli: &Strata, args: &[&str]) -> (Duration, u64) {
    let mut command = cli.command(args);
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    let measured = measure_ok(command);
    (measured.wall, measured.peak_rss)
}
