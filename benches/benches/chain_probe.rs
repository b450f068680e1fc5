//! `cargo bench -p strata-benches --bench chain_probe`
//!
//! Times `strata_core::chain::probe_chain` on linear qcow2 chains of depth
//! 1 … 10,000 (warm page cache) and compares depth 500 with
//! `qemu-img info --backing-chain`, and with a whole `strata define`
//! process on that chain (the `strata` binary of the other benches; left
//! out if there is none).
//!
//! The fixture is one base and one overlay made by qemu-img; the other
//! 9,999 overlays are copies of the first with the backing-file name in the
//! qcow2 header patched (same length, so nothing else moves). Layer `lNNNNN`
//! is backed by `lNNNNN-1`; the chain of depth D has its top at `lD` and
//! holds D+1 images. `STRATA_BENCH_QUICK=1` runs fewer repetitions.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;
use strata_benches::strata::locate_strata;
use strata_benches::{
    domain_type, domain_xml, human, layer_name, ms, patched_chain, path_str, quick, quick_suffix, require_tools,
    run_tool, temp_dir, time, us, BackingNames, Stats, Strata, Tools,
};
use strata_core::chain::{probe_chain, Backing, StorageSource};

const MAX_DEPTH: usize = 10_000;
const DEPTHS: [usize; 6] = [1, 10, 100, 500, 1000, 10_000];
/// Depth of the comparison with qemu-img.
const QEMU_DEPTH: usize = 500;

/// Repetitions per depth (after one untimed warm-up run that also checks
/// the result).
fn runs_for(depth: usize, quick: bool) -> usize {
    match (depth, quick) {
        (d, false) if d <= 10 => 501,
        (d, false) if d <= 100 => 201,
        (d, false) if d <= 1000 => 51,
        (_, false) => 11,
        (d, true) if d <= 100 => 21,
        (d, true) if d <= 1000 => 5,
        (_, true) => 3,
    }
}

fn main() -> ExitCode {
    let tools = Tools { programs: &["qemu-img"], packages: "qemu-utils" };
    if !require_tools("chain_probe", &tools) {
        return ExitCode::FAILURE;
    }
    let quick = quick();
    let dir = temp_dir("strata-bench-chain-");

    let (build_time, ()) = time(|| {
        patched_chain(dir.path(), MAX_DEPTH, BackingNames::Relative);
    });
    verify_fixture(dir.path());
    println!("Strata backing-chain probe: strata_core::chain::probe_chain on qcow2 chains{}", quick_suffix(quick));
    println!(
        "fixture: {} qcow2 images in {} built in {}; top layer verified with qemu-img info",
        MAX_DEPTH + 1,
        dir.path().display(),
        human(build_time)
    );
    println!("times are wall clock with a warm page cache; a chain of depth D holds D+1 images\n");

    println!(
        "{:>7} {:>7} {:>6} {:>14} {:>14} {:>12}",
        "depth", "images", "runs", "median total", "min total", "µs/layer"
    );
    let mut rows = Vec::new();
    let mut probe_500 = None;
    for depth in DEPTHS {
        let top = dir.path().join(layer_name(depth));
        check_probe(&top, depth);
        let runs = runs_for(depth, quick);
        let samples: Vec<Duration> = (0..runs)
            .map(|_| {
                let (d, chain) = time(|| probe(&top));
                std::hint::black_box(chain);
                d
            })
            .collect();
        let stats = Stats::of(&samples);
        let images = depth + 1;
        let per_layer = us(stats.median) / images as f64;
        println!(
            "{depth:>7} {images:>7} {runs:>6} {:>14} {:>14} {per_layer:>12.2}",
            human(stats.median),
            human(stats.min)
        );
        if depth == QEMU_DEPTH {
            probe_500 = Some(stats);
        }
        rows.push(json!({
            "depth": depth,
            "images": images,
            "runs": runs,
            "median_us": us(stats.median),
            "min_us": us(stats.min),
            "per_layer_us": per_layer,
        }));
    }
    let per: Vec<f64> = rows.iter().map(|r| r["per_layer_us"].as_f64().expect("per_layer_us is a number")).collect();
    let at = |depth: usize| per[DEPTHS.iter().position(|d| *d == depth).expect("a measured depth")];
    let linear_ratio = at(10_000) / at(100);
    println!(
        "\nper-layer cost at depth 10000 vs depth 100: {:.2} µs vs {:.2} µs ({linear_ratio:.2}x; ~1x means linear)",
        at(10_000),
        at(100)
    );

    // qemu-img on the same depth-500 chain.
    let top500 = dir.path().join(layer_name(QEMU_DEPTH));
    let top500_s = path_str(&top500);
    let base = dir.path().join(layer_name(0));
    let base_s = path_str(&base);
    let qemu_runs = 5;
    let qemu_samples: Vec<Duration> = (0..qemu_runs)
        .map(|_| {
            let (d, out) = time(|| run_tool("qemu-img", &["info", "--backing-chain", "-U", "--output=json", top500_s]));
            let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img info prints JSON");
            let n = v.as_array().expect("qemu-img info --backing-chain prints an array").len();
            assert_eq!(n, QEMU_DEPTH + 1, "qemu-img saw {n} images in the depth-{QEMU_DEPTH} chain");
            d
        })
        .collect();
    let qemu = Stats::of(&qemu_samples);
    let startup = Stats::of(
        &(0..qemu_runs)
            .map(|_| time(|| run_tool("qemu-img", &["info", "-U", "--output=json", base_s])).0)
            .collect::<Vec<_>>(),
    );
    let strata = probe_500.expect("depth 500 is measured");
    let ratio = qemu.median.as_secs_f64() / strata.median.as_secs_f64();
    println!("\ndepth {QEMU_DEPTH} ({} images): qemu-img vs Strata", QEMU_DEPTH + 1);
    println!(
        "  {:<58} {:>12}",
        format!("qemu-img info --backing-chain -U --output=json (median of {qemu_runs})"),
        human(qemu.median)
    );
    println!(
        "  {:<58} {:>12}",
        format!("  of which process start-up (1-image info, median of {qemu_runs})"),
        human(startup.median)
    );
    println!(
        "  {:<58} {:>12}",
        format!("strata probe_chain, in process (median of {})", strata.runs),
        human(strata.median)
    );
    println!("  {:<58} {:>11.1}x", "ratio qemu-img / strata", ratio);
    let define = time_define(dir.path(), &top500, if quick { 5 } else { 21 });
    if let Some(define) = &define {
        println!(
            "  {:<58} {:>12}",
            format!("strata define of a domain on it, whole process (median of {})", define.runs),
            human(define.median)
        );
        println!(
            "  {:<58} {:>11.1}x",
            "ratio qemu-img / strata define",
            qemu.median.as_secs_f64() / define.median.as_secs_f64()
        );
    }

    let result = json!({
        "bench": "chain_probe",
        "quick": quick,
        "fixture_build_ms": ms(build_time),
        "depths": rows,
        "per_layer_ratio_10000_vs_100": linear_ratio,
        "qemu_img_compare": {
            "depth": QEMU_DEPTH,
            "qemu_img_median_ms": ms(qemu.median),
            "qemu_img_startup_median_ms": ms(startup.median),
            "strata_median_ms": ms(strata.median),
            "ratio": ratio,
            "define_median_ms": define.as_ref().map(|d| ms(d.median)),
            "define_ratio": define.as_ref().map(|d| qemu.median.as_secs_f64() / d.median.as_secs_f64()),
        },
    });
    println!("RESULT {result}");
    ExitCode::SUCCESS
}

/// `strata define` (process start to exit) of a domain whose disk is
/// `top`, `runs` times into a fresh embedded state (undefined between
/// runs); `None` without a `strata` binary. Each definition must record
/// the chain down to its base.
fn time_define(dir: &Path, top: &Path, runs: usize) -> Option<Stats> {
    let Some(bin) = locate_strata() else {
        println!("  (no strata binary: build it with cargo build --release -p strata-cli to time define)");
        return None;
    };
    let cli = Strata::embedded(&bin, &dir.join("define-state"));
    let xml = dir.join("define.xml");
    std::fs::write(&xml, domain_xml("vm", domain_type(), &[top])).expect("write the domain XML");
    let define = ["define", path_str(&xml)];
    let samples: Vec<Duration> = (0..runs + 1)
        .map(|_| {
            let (d, _) = time(|| cli.ok(&define));
            let recorded = cli.ok(&["dumpxml", "vm", "--inactive"]);
            assert!(recorded.contains(&layer_name(0)), "define did not record the chain down to its base");
            cli.ok(&["undefine", "vm"]);
            d
        })
        .skip(1)
        .collect();
    Some(Stats::of(&samples))
}

fn probe(top: &Path) -> strata_core::chain::Chain {
    probe_chain(&StorageSource::File { path: top.to_path_buf() }, "qcow2")
        .unwrap_or_else(|e| panic!("probe_chain({}) failed: {e}", top.display()))
}

/// The probe of the depth-`depth` chain finds every layer down to the base.
fn check_probe(top: &Path, depth: usize) {
    let chain = probe(top);
    let line = chain.main_line();
    assert_eq!(line.len(), depth + 1, "probe of {} found {} layers", top.display(), line.len());
    let base = line.last().expect("a chain has a top");
    assert_eq!(base.backing, Backing::End, "the base layer has no backing file");
    assert_eq!(base.format.as_deref(), Some("qcow2"));
    assert_eq!(base.source.local_path().and_then(Path::file_name), Some(layer_name(0).as_ref()));
}

/// `l00000` (base) and `l00001` with qemu-img; `l00002` … `l10000` as
/// patched copies of `l00001`.
/// qemu-img agrees that a generated layer is a qcow2 overlay of the one
/// below it, with the backing format recorded.
fn verify_fixture(dir: &Path) {
    let top = dir.join(layer_name(MAX_DEPTH));
    let out = run_tool("qemu-img", &["info", "--output=json", path_str(&top)]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img info prints JSON");
    assert_eq!(v["format"], "qcow2", "generated layer: {out}");
    assert_eq!(v["backing-filename"], layer_name(MAX_DEPTH - 1).as_str(), "generated layer: {out}");
    assert_eq!(v["backing-filename-format"], "qcow2", "generated layer: {out}");
}
