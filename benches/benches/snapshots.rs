//! `cargo bench -p strata-benches --bench snapshots`
//!
//! 1. `snapshot-create-as vm NAME --disk-only --atomic` on a RUNNING domain
//!    with two qcow2 disks, snapshotting vda only (`--diskspec
//!    vdb,snapshot=no`) or vda and vdb, with both disks on chains of depth 1
//!    and of depth 50 (depth D = D backing files below the active image, as
//!    in `chain_probe`). Every run gets a fresh domain; the lower layers are
//!    made once with `qemu-img` (absolute backing names, as strata writes
//!    them; one extra case with relative names) and shared read-only.
//! 2. 50 consecutive snapshots of vda on one running domain (vda goes from
//!    1 to 51 backing files), as in the libvirt research.
//! 3. `snapshot-list vm --tree`, `--name` and `--leaves` with 10,000 snapshot records:
//!    one real snapshot is taken and dumped, then 10,000 variants of it are
//!    written straight into the store (`domains/vm/snapshots/NAME.xml`),
//!    once as one chain s00001 ← … ← s10000 and once as 100 roots with 99
//!    children each. If the 10,000-deep `--tree` takes over 60 s, a 2,000
//!    deep chain is measured instead.
//!
//! Uses the `strata` binary already built in this target directory
//! (`cargo build --release -p strata-cli`), or `$STRATA_BENCH_BIN`.
//! `STRATA_BENCH_QUICK=1` runs fewer repetitions.

use std::fs;
use std::io::{BufRead, BufReader};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use strata_benches::{
    between, create_qcow2, domain_xml, measure_ok, mib, ms, path_str, qcow2_chain, quick_suffix, time,
    BackingNames as Names, DomainBench, DomainGuard, Leftover, Stats, Strata, RUNNING_DOMAIN_TOOLS,
};

const DOMAIN: &str = "vm";
/// The deep chain of part 1 (backing files below the active image).
const DEEP: usize = 50;
/// Part 1's cases: (disks snapshotted, depth, backing names in the lower
/// layers). Relative names make QEMU 7.2 give every node a `json:` filename
/// nesting the whole chain below it (query replies grow with depth²).
const CASES: [(usize, usize, Names); 5] = [
    (1, 1, Names::Absolute),
    (2, 1, Names::Absolute),
    (1, DEEP, Names::Absolute),
    (2, DEEP, Names::Absolute),
    (2, DEEP, Names::Relative),
];
/// Snapshot records for part 3.
const RECORDS: usize = 10_000;
/// Part 3's bushy shape: ROOTS roots, each with RECORDS / ROOTS - 1 children.
const ROOTS: usize = 100;
/// A 10,000-deep `--tree` slower than this is replaced by FALLBACK_DEPTH.
const TREE_LIMIT: Duration = Duration::from_secs(60);
const FALLBACK_DEPTH: usize = 2_000;
/// The name the one real snapshot of part 3 gets (record 1).
const FIRST: &str = "s00001";

/// libvirt 9.0 / virsh figures from /work/shared/research/libvirt-9.0/REPORT.md
/// section 7 (hyperfine medians, ms); printed as a note, not measured here.
const VIRSH_CREATE_1_DISK_MS: f64 = 50.4;
const VIRSH_CREATE_2_DISKS_MS: f64 = 51.1;
const VIRSH_TREE_50_MS: f64 = 28.9;
const VIRSH_NAME_50_MS: f64 = 22.1;

fn main() -> ExitCode {
    let Some(env) = DomainBench::setup("snapshots", &RUNNING_DOMAIN_TOOLS) else {
        return ExitCode::FAILURE;
    };
    let runs = if env.quick { 3 } else { 9 };
    let series = if env.quick { 20 } else { 50 };
    let list_runs = if env.quick { 1 } else { 3 };

    let root = env.dir.path();
    let bench = Bench { bin: &env.strata, kind: env.kind };

    println!("strata snapshots{}", quick_suffix(env.quick));
    println!("binary: {}", env.strata.display());
    println!(
        "domain: '{DOMAIN}', type {}, 128 MiB, q35, two virtio qcow2 disks (vda, vdb, 64 MiB), \
         embedded state root (qemu:///embed?root=…) per domain\n",
        env.kind
    );

    // Lower layers, made once per (depth, names) and disk.
    let mut keys: Vec<(usize, Names)> = Vec::new();
    for &(_, depth, names) in &CASES {
        if !keys.contains(&(depth, names)) {
            keys.push((depth, names));
        }
    }
    // One thread per chain: qemu-img runs are mostly waiting on the disk.
    let (tpl_time, layers) = time(|| {
        std::thread::scope(|s| {
            let handles: Vec<_> = keys
                .iter()
                .flat_map(|&(depth, names)| {
                    ["a", "b"].map(|d| {
                        let dir = root.join(format!("t{depth}{}{d}", tag(names)));
                        s.spawn(move || make_layers(&dir, depth, names))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("make a template chain")).collect::<Vec<PathBuf>>()
        })
    });
    let templates: Vec<((usize, Names), [PathBuf; 2])> =
        keys.iter().zip(layers.chunks(2)).map(|(k, l)| (*k, [l[0].clone(), l[1].clone()])).collect();
    let backing_of = |depth: usize, names: Names| -> [&Path; 2] {
        let (_, l) = templates.iter().find(|(k, _)| *k == (depth, names)).expect("a template for every case");
        [l[0].as_path(), l[1].as_path()]
    };
    println!("images: {:.2} s to make the lower layers with qemu-img (once)\n", tpl_time.as_secs_f64());

    // ---- 1. snapshot-create-as on fresh running domains -------------------
    // Interleaved so drift on a shared machine hits every case alike.
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); CASES.len()];
    let mut n = 0;
    // One discarded warm-up run.
    bench.create_sample(&root.join("w"), backing_of(1, Names::Absolute), 1, 2, true);
    for run in 0..runs {
        for (i, &(disks, depth, names)) in CASES.iter().enumerate() {
            n += 1;
            let t = bench.create_sample(&root.join(format!("c{n}")), backing_of(depth, names), depth, disks, run == 0);
            samples[i].push(t);
        }
    }
    println!(
        "1. snapshot-create-as vm snap --disk-only --atomic on a RUNNING domain: wall time per call \
         (process start to exit), fresh domain each run (started on a chain made with qemu-img);\n   \
         depth D = D backing files below the active image on BOTH disks (checked in dumpxml)"
    );
    println!(
        "{:<24} {:>6} {:<22} {:>5} {:>10} {:>8} {:>8} {:>8}",
        "disks snapshotted", "depth", "lower layers' backing", "runs", "median ms", "min ms", "p90 ms", "max ms"
    );
    let mut create_rows = Vec::new();
    let mut medians = Vec::new();
    for (&(disks, depth, names), s) in CASES.iter().zip(&samples) {
        let st = Stats::of(s);
        println!(
            "{:<24} {:>6} {:<22} {:>5} {:>10.1} {:>8.1} {:>8.1} {:>8.1}",
            disk_label(disks),
            depth,
            if depth == 1 { "-" } else { names.label() },
            st.runs,
            ms(st.median),
            ms(st.min),
            ms(st.p90),
            ms(st.max)
        );
        medians.push(((disks, depth, names), ms(st.median)));
        create_rows.push(json!({
            "disks": disks, "depth": depth, "backing_names": names.label(), "runs": st.runs,
            "median_ms": ms(st.median), "min_ms": ms(st.min), "p90_ms": ms(st.p90), "max_ms": ms(st.max),
            "samples_ms": s.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        }));
    }
    let median_of = |disks: usize, depth: usize, names: Names| -> f64 {
        medians.iter().find(|(k, _)| *k == (disks, depth, names)).map(|(_, m)| *m).expect("a measured case")
    };
    let ratio = |disks: usize, names: Names| median_of(disks, DEEP, names) / median_of(disks, 1, Names::Absolute);
    println!(
        "ratio depth {DEEP} / depth 1 (medians): 1 disk {:.2}, 2 disks {:.2} (absolute names); \
         2 disks {:.2} (relative names)\n",
        ratio(1, Names::Absolute),
        ratio(2, Names::Absolute),
        ratio(2, Names::Relative)
    );

    // ---- 2. consecutive snapshots on one domain ----------------------------
    let run = bench.series(&root.join("s"), backing_of(1, Names::Absolute), series);
    let (series_ms, series_depth) = (&run.times, run.depth);
    let k = (series / 5).clamp(1, 10);
    let first = Stats::of(&series_ms[..k]);
    let last = Stats::of(&series_ms[series - k..]);
    let all = Stats::of(series_ms);
    println!(
        "2. {series} consecutive snapshot-create-as vm nNN --disk-only --atomic --diskspec vdb,snapshot=no \
         on one running domain (vda from 1 to {series_depth} backing files, checked)"
    );
    println!(
        "   first {k}: median {:.1} ms (min {:.1}, max {:.1})   last {k}: median {:.1} ms (min {:.1}, max {:.1})   \
         ratio last/first {:.2}   all {series}: median {:.1} ms, max {:.1} ms",
        ms(first.median),
        ms(first.min),
        ms(first.max),
        ms(last.median),
        ms(last.min),
        ms(last.max),
        ms(last.median) / ms(first.median),
        ms(all.median),
        ms(all.max)
    );
    println!(
        "   snapshot records (each embeds the domain with its live backing chain): n01 {} bytes, n{series:02} {} bytes",
        run.record_bytes.0, run.record_bytes.1
    );
    println!(
        "   note (libvirt 9.0 virsh, REPORT.md section 7, NOT measured now): snapshot-create-as --disk-only \
         --atomic {VIRSH_CREATE_1_DISK_MS} ms (1 disk) / {VIRSH_CREATE_2_DISKS_MS} ms (2 disks) median on a fresh 3-layer chain;\n   \
         50 consecutive snapshots: first 10 took 51-60 ms, last 10 took 111-158 ms (median 70 ms, max 188 ms)\n"
    );

    // ---- 3. snapshot-list with 10,000 records ------------------------------
    let list = bench.list_part(&root.join("l"), backing_of(1, Names::Absolute), list_runs);

    let result = json!({
        "bench": "snapshots",
        "quick": env.quick,
        "domain_type": env.kind,
        "create": create_rows,
        "create_ratio_depth50_over_depth1": {
            "disks_1_absolute": ratio(1, Names::Absolute),
            "disks_2_absolute": ratio(2, Names::Absolute),
            "disks_2_relative": ratio(2, Names::Relative),
        },
        "series": {
            "count": series,
            "final_depth": series_depth,
            "samples_ms": series_ms.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            "first_median_ms": ms(first.median), "last_median_ms": ms(last.median), "window": k,
            "first_record_bytes": run.record_bytes.0, "last_record_bytes": run.record_bytes.1,
        },
        "list": list,
        "reference_virsh_not_measured": {
            "create_1_disk_ms": VIRSH_CREATE_1_DISK_MS, "create_2_disks_ms": VIRSH_CREATE_2_DISKS_MS,
            "consecutive_first10_ms": [51, 60], "consecutive_last10_ms": [111, 158],
            "list_tree_50_ms": VIRSH_TREE_50_MS, "list_name_50_ms": VIRSH_NAME_50_MS,
        },
    });
    println!("RESULT {result}");
    ExitCode::SUCCESS
}

fn disk_label(disks: usize) -> &'static str {
    if disks == 1 {
        "vda (vdb snapshot=no)"
    } else {
        "vda + vdb"
    }
}

/// `snapshot-create-as` arguments for snapshot `name` of 1 or 2 disks.
fn create_args(name: &str, disks: usize) -> Vec<&str> {
    let mut args = vec!["snapshot-create-as", DOMAIN, name, "--disk-only", "--atomic"];
    if disks == 1 {
        args.extend(["--diskspec", "vdb,snapshot=no"]);
    }
    args
}

struct Bench<'a> {
    bin: &'a Path,
    kind: &'static str,
}

impl Bench<'_> {
    /// A fresh running domain in `dir`, takes one timed snapshot, checks the
    /// chains before (when `check`) and the overlays after, destroys it.
    fn create_sample(&self, dir: &Path, backings: [&Path; 2], depth: usize, disks: usize, check: bool) -> Duration {
        let dom = RunningDomain::start(self.bin, dir, self.kind, backings);
        if check {
            assert_eq!(
                dom.depths(),
                [("vda".to_string(), depth), ("vdb".to_string(), depth)],
                "the domain does not run on {depth}-deep chains"
            );
        }
        let (t, out) = time(|| dom.cli.ok(&create_args("snap", disks)));
        assert!(out.contains("Domain snapshot snap created"), "unexpected output: {out}");
        assert!(dir.join("vda.snap").is_file(), "no overlay vda.snap");
        assert_eq!(dir.join("vdb.snap").is_file(), disks == 2, "vdb.snap present/absent wrongly");
        if check {
            let vdb = if disks == 2 { depth + 1 } else { depth };
            assert_eq!(
                dom.depths(),
                [("vda".to_string(), depth + 1), ("vdb".to_string(), vdb)],
                "the chains after the snapshot are not as expected"
            );
        }
        drop(dom);
        let _ = fs::remove_dir_all(dir);
        t
    }

    /// `count` consecutive vda snapshots n01, n02, … on one domain; returns
    /// each call's time, vda's final depth and the sizes in bytes of the
    /// first and last snapshot records.
    fn series(&self, dir: &Path, backings: [&Path; 2], count: usize) -> Series {
        let dom = RunningDomain::start(self.bin, dir, self.kind, backings);
        let times: Vec<Duration> = (1..=count)
            .map(|i| {
                let name = format!("n{i:02}");
                time(|| dom.cli.ok(&create_args(&name, 1))).0
            })
            .collect();
        let depths = dom.depths();
        assert_eq!(
            depths,
            [("vda".to_string(), 1 + count), ("vdb".to_string(), 1)],
            "unexpected chains after {count} snapshots"
        );
        let list = dom.cli.ok(&["snapshot-list", DOMAIN, "--name"]);
        assert_eq!(list.lines().filter(|l| !l.is_empty()).count(), count);
        let snapdir = dom.domain_dir().join("snapshots");
        let size = |i: usize| {
            fs::metadata(snapdir.join(format!("n{i:02}.xml"))).map(|m| m.len()).expect("a snapshot record in the store")
        };
        Series { times, depth: 1 + count, record_bytes: (size(1), size(count)) }
    }

    /// Part 3; returns the JSON rows.
    fn list_part(&self, dir: &Path, backings: [&Path; 2], runs: usize) -> Vec<serde_json::Value> {
        let dom = RunningDomain::start(self.bin, dir, self.kind, backings);
        dom.cli.ok(&create_args(FIRST, 2));
        let dump = dom.cli.ok(&["snapshot-dumpxml", DOMAIN, FIRST]);
        let snapdir = dom.domain_dir().join("snapshots");
        let stored = fs::read_to_string(snapdir.join(format!("{FIRST}.xml")))
            .expect("the real snapshot's record is in domains/vm/snapshots/");
        assert_eq!(stored.trim_end(), dump.trim_end(), "snapshot-dumpxml differs from the stored record");
        let records = Records::new(&dump);

        println!(
            "3. snapshot-list with {RECORDS} records written into the store (variants of a real snapshot's \
             dump, {} bytes each); stdout to /dev/null, {runs} run(s) each, warm page cache",
            dump.len()
        );
        let mut rows = Vec::new();
        let mut table = Vec::new();

        // The deep chain, or FALLBACK_DEPTH if its tree takes too long.
        let (wrote, ()) = time(|| records.write(&snapdir, &Shape::Chain(RECORDS)));
        println!("   wrote {RECORDS} records in {:.2} s", wrote.as_secs_f64());
        dom.check_shape(&Shape::Chain(RECORDS));
        let mut chain = Shape::Chain(RECORDS);
        let mut note = None;
        let tree_size = match dom.tree_size(TREE_LIMIT) {
            Some(s) => s,
            None => {
                note = Some(format!(
                    "a {RECORDS}-deep --tree took over {} s; measured a {FALLBACK_DEPTH}-deep chain instead",
                    TREE_LIMIT.as_secs()
                ));
                println!("   NOTE: {}", note.as_deref().unwrap_or_default());
                chain = Shape::Chain(FALLBACK_DEPTH);
                records.write(&snapdir, &chain);
                dom.check_shape(&chain);
                dom.tree_size(TREE_LIMIT * 10).expect("the fallback tree finishes")
            }
        };
        let bushy = Shape::Bushy(ROOTS, RECORDS / ROOTS);
        for shape in [chain, bushy] {
            if matches!(shape, Shape::Bushy(..)) {
                records.write(&snapdir, &shape);
                dom.check_shape(&shape);
            }
            let tree = if matches!(shape, Shape::Chain(_)) {
                tree_size
            } else {
                dom.tree_size(TREE_LIMIT).expect("the bushy tree finishes in time")
            };
            assert_eq!(tree.nodes, shape.records(), "--tree did not print every snapshot");
            let name_out = dom.cli.ok(&["snapshot-list", DOMAIN, "--name"]);
            assert_eq!(name_out.lines().filter(|l| !l.is_empty()).count(), shape.records());
            let leaves_out = dom.cli.ok(&["snapshot-list", DOMAIN, "--leaves"]);
            // The table's two header lines and its closing blank line.
            assert_eq!(leaves_out.lines().count() - 3, shape.leaves(), "--leaves:\n{leaves_out}");
            for (cmd, out_bytes, lines) in [
                ("--tree", tree.bytes, tree.lines),
                ("--name", name_out.len() as u64, name_out.lines().count() as u64),
                ("--leaves", leaves_out.len() as u64, leaves_out.lines().count() as u64),
            ] {
                let measured: Vec<(Duration, u64)> =
                    (0..runs).map(|_| dom.time_to_null(&["snapshot-list", DOMAIN, cmd])).collect();
                let st = Stats::of(&measured.iter().map(|(d, _)| *d).collect::<Vec<_>>());
                let rss = measured.iter().map(|(_, r)| *r).max().unwrap_or(0);
                table.push((
                    shape.label(),
                    shape.records(),
                    shape.depth(),
                    cmd,
                    st,
                    rss,
                    out_bytes,
                    lines,
                    tree.widest,
                ));
                rows.push(json!({
                    "shape": shape.label(), "records": shape.records(), "depth": shape.depth(),
                    "command": format!("snapshot-list vm {cmd}"), "runs": st.runs,
                    "median_ms": ms(st.median), "min_ms": ms(st.min), "max_ms": ms(st.max), "peak_rss_mib": mib(rss),
                    "output_bytes": out_bytes, "output_lines": lines,
                    "widest_line": if cmd == "--tree" { Some(tree.widest) } else { None },
                    "note": note,
                }));
            }
        }
        println!(
            "{:<30} {:>7} {:>6} {:>8} {:>5} {:>10} {:>9} {:>9} {:>9} {:>11} {:>8}",
            "shape",
            "records",
            "depth",
            "option",
            "runs",
            "median ms",
            "min ms",
            "max ms",
            "peak MiB",
            "output",
            "lines"
        );
        for (label, recs, depth, cmd, st, rss, bytes, lines, widest) in table {
            println!(
                "{label:<30} {recs:>7} {depth:>6} {cmd:>8} {:>5} {:>10.1} {:>9.1} {:>9.1} {:>9.1} {:>11} {lines:>8}{}",
                st.runs,
                ms(st.median),
                ms(st.min),
                ms(st.max),
                mib(rss),
                human_bytes(bytes),
                if cmd == "--tree" { format!("  (widest line {widest} columns)") } else { String::new() }
            );
        }
        println!(
            "   note (libvirt 9.0 virsh, REPORT.md section 7, NOT measured now): with 50 snapshots, \
             snapshot-list --tree {VIRSH_TREE_50_MS} ms, --name {VIRSH_NAME_50_MS} ms (median);\n   \
             virsh's tree indents 4 columns per level, like strata's, so a chain's --tree output grows with depth squared;\n   \
             the generated records embed the depth-1 domain of the real snapshot; records of real snapshots on deep chains are larger (see 2.)\n"
        );
        rows
    }
}

/// Part 2's outcome.
struct Series {
    times: Vec<Duration>,
    /// vda's backing files at the end.
    depth: usize,
    /// Sizes of the first and the last snapshot record.
    record_bytes: (u64, u64),
}

/// A shape of generated snapshot records.
#[derive(Clone, Copy)]
enum Shape {
    /// s00001 ← s00002 ← … (each the parent of the next).
    Chain(usize),
    /// Roots, each followed by (per - 1) children: root i is record
    /// i·per + 1, its children the next per - 1 records.
    Bushy(usize, usize),
}

impl Shape {
    fn records(&self) -> usize {
        match *self {
            Shape::Chain(n) => n,
            Shape::Bushy(roots, per) => roots * per,
        }
    }

    /// Records without children.
    fn leaves(&self) -> usize {
        match *self {
            Shape::Chain(_) => 1,
            Shape::Bushy(roots, per) => roots * (per - 1),
        }
    }

    /// Levels from a root to the deepest record.
    fn depth(&self) -> usize {
        match *self {
            Shape::Chain(n) => n,
            Shape::Bushy(..) => 2,
        }
    }

    fn label(&self) -> String {
        match *self {
            Shape::Chain(n) => format!("chain of {n}"),
            Shape::Bushy(roots, per) => format!("{roots} roots x {} children", per - 1),
        }
    }

    /// The parent of record `i` (1-based).
    fn parent(&self, i: usize) -> Option<usize> {
        match *self {
            Shape::Chain(_) => (i > 1).then(|| i - 1),
            Shape::Bushy(_, per) => {
                let root = (i - 1) / per * per + 1;
                (i != root).then_some(root)
            }
        }
    }
}

fn record_name(i: usize) -> String {
    format!("s{i:05}")
}

/// Generates records from the dump of the real snapshot FIRST.
struct Records {
    dump: String,
    creation_time: i64,
}

impl Records {
    fn new(dump: &str) -> Records {
        let dump = dump.trim_end().to_string();
        assert!(
            dump.contains(&format!("<name>{FIRST}</name>")) && !dump.contains("<parent>"),
            "unexpected snapshot dump:\n{dump}"
        );
        // The name, and the two overlays vda.s00001 and vdb.s00001.
        assert_eq!(dump.matches(FIRST).count(), 3, "the dump names {FIRST} in unexpected places:\n{dump}");
        let creation_time = between(&dump, "<creationTime>", "</creationTime>")
            .and_then(|t| t.parse().ok())
            .expect("a <creationTime> in the dump");
        Records { dump, creation_time }
    }

    /// Record `i` of `shape`, in the format `snapshot-dumpxml` prints.
    fn xml(&self, shape: &Shape, i: usize) -> String {
        let name = record_name(i);
        let mut xml = self.dump.replace(FIRST, &name).replace(
            &format!("<creationTime>{}</creationTime>", self.creation_time),
            &format!("<creationTime>{}</creationTime>", self.creation_time + i as i64 - 1),
        );
        if let Some(p) = shape.parent(i) {
            let at = xml.find("</state>\n").expect("a <state> in the dump") + "</state>\n".len();
            xml.insert_str(at, &format!("  <parent>\n    <name>{}</name>\n  </parent>\n", record_name(p)));
        }
        xml.push('\n');
        xml
    }

    /// Replaces every record in `snapdir` by `shape`'s.
    fn write(&self, snapdir: &Path, shape: &Shape) {
        for entry in fs::read_dir(snapdir).expect("list the snapshot records").flatten() {
            if entry.path().extension().is_some_and(|e| e == "xml") {
                fs::remove_file(entry.path()).expect("remove a snapshot record");
            }
        }
        for i in 1..=shape.records() {
            fs::write(snapdir.join(format!("{}.xml", record_name(i))), self.xml(shape, i))
                .expect("write a snapshot record");
        }
    }
}

/// What `snapshot-list --tree` printed.
#[derive(Clone, Copy)]
struct TreeSize {
    bytes: u64,
    lines: u64,
    widest: usize,
    /// Lines naming a snapshot (roots and `+- NAME`).
    nodes: usize,
}

fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.1} kB", b / 1e3)
    }
}

/// A defined and started domain with its own state root; destroyed (and its
/// QEMU killed if destroy failed) when dropped, also when the bench panics.
struct RunningDomain(DomainGuard);

impl Deref for RunningDomain {
    type Target = DomainGuard;

    fn deref(&self) -> &DomainGuard {
        &self.0
    }
}

impl RunningDomain {
    /// Makes `dir`/vda.qcow2 and vdb.qcow2 on top of `backings`, defines
    /// and starts the domain.
    fn start(bin: &Path, dir: &Path, kind: &str, backings: [&Path; 2]) -> RunningDomain {
        fs::create_dir_all(dir).expect("create a run directory");
        let tops = ["vda", "vdb"].map(|d| dir.join(format!("{d}.qcow2")));
        for (top, backing) in tops.iter().zip(backings) {
            create_qcow2(top, Some(path_str(backing)), None);
        }
        let xml = dir.join("vm.xml");
        fs::write(&xml, domain_xml(DOMAIN, kind, &tops)).expect("write the domain XML");
        let cli = Strata::embedded(bin, &dir.join("state"));
        cli.ok(&["define", path_str(&xml)]);
        // From here on the domain is destroyed however the bench ends.
        let dom = RunningDomain(DomainGuard::new(cli, DOMAIN, "snapshots", Leftover::Qemu));
        dom.cli.ok(&["start", DOMAIN]);
        dom
    }

    /// (target, backing files below the active image) of each disk, from
    /// the live XML.
    fn depths(&self) -> Vec<(String, usize)> {
        let xml = self.cli.ok(&["dumpxml", DOMAIN]);
        xml.split("<disk ")
            .skip(1)
            .map(|d| {
                let d = &d[..d.find("</disk>").unwrap_or(d.len())];
                let target = between(d, "<target dev='", "'").unwrap_or("?").to_string();
                (target, d.matches("<backingStore type=").count())
            })
            .collect()
    }

    /// Checks that strata reads the generated records as `shape`.
    fn check_shape(&self, shape: &Shape) {
        let last = shape.records();
        let out = self.cli.ok(&["snapshot-info", DOMAIN, &record_name(last)]);
        let want = shape.parent(last).map_or("-".to_string(), record_name);
        assert!(
            out.lines().any(|l| l.starts_with("Parent:") && l.trim_end().ends_with(&want)),
            "snapshot-info {} does not show parent {want}:\n{out}",
            record_name(last)
        );
    }

    /// One `snapshot-list vm --tree` piped into this process, counted; None
    /// if it ran longer than `limit` (then it is killed).
    fn tree_size(&self, limit: Duration) -> Option<TreeSize> {
        let mut child = self
            .cli
            .command(&["snapshot-list", DOMAIN, "--tree"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run strata snapshot-list --tree");
        let stdout = child.stdout.take().expect("piped stdout");
        let reader = std::thread::spawn(move || {
            let mut r = BufReader::with_capacity(1 << 20, stdout);
            let mut line = Vec::new();
            let mut size = TreeSize { bytes: 0, lines: 0, widest: 0, nodes: 0 };
            while r.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                size.bytes += line.len() as u64;
                size.lines += 1;
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches('\n');
                size.widest = size.widest.max(text.chars().count());
                let t = text.trim_start();
                if t.starts_with("+- ") || (t.starts_with('s') && text.len() == t.len()) {
                    size.nodes += 1;
                }
                line.clear();
            }
            size
        });
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait for strata") {
                break Some(s);
            }
            if Instant::now() > deadline {
                // Our own child, not yet reaped: its pid is still ours.
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let size = reader.join().expect("the reader thread");
        let status = status?;
        assert!(status.success(), "snapshot-list --tree failed ({status})");
        Some(size)
    }

    /// Wall time and peak RSS (bytes) of one call with stdout to /dev/null.
    fn time_to_null(&self, args: &[&str]) -> (Duration, u64) {
        let mut cmd = self.cli.command(args);
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let run = measure_ok(cmd);
        (run.wall, run.peak_rss)
    }
}

/// The template directories' letter for `names`.
fn tag(names: Names) -> &'static str {
    match names {
        Names::Absolute => "p",
        Names::Relative => "r",
    }
}

/// `count` layers l000 ← l001 ← … in `dir` (64 MiB, formats recorded);
/// returns the top one (absolute). A top made on it has `count` backing files.
fn make_layers(dir: &Path, count: usize, names: Names) -> PathBuf {
    let layers: Vec<String> = (0..count).map(|i| format!("l{i:03}.qcow2")).collect();
    let mut chain = qcow2_chain(dir, &layers, "64M", names);
    chain.pop().expect("at least one layer")
}
