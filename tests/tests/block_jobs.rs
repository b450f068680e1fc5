//! Block jobs on running domains with real QEMU: `blockcommit` (seed 003's
//! figure 3, method-a/method-b, active commit), `blockpull` (figures 5 and
//! 6), `blockcopy` (seed 002's flag combinations) and `blockjob`, checked
//! on disk (`qemu-img info --backing-chain`), in the live and persistent
//! XML, and by the data the guest reads compared with a reference image
//! that received the same writes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    assert_images_writable, assert_no_stray_processes, assert_recovered, domain_xml, end_block_job, guest, make_chain,
    qemu_chain, qemu_img, qemu_io, qemu_pid, test_processes, validate_xml, Background, DiskSpec, DomainGuard,
    JobCommand, Kill, TestEnv, JOB_STEPS,
};
use strata_core::chain::Backing;
use strata_core::xml::Domain;
use strata_qemu::QemuConnection;

const MIB: u64 = 1024 * 1024;

/// RootBase ← snap1 ← snap2 ← snap3 ← snap4 (active); layer i holds its
/// own pattern 0x11*(i+1) in MiB i.
const NAMES: [&str; 5] = ["RootBase.qcow2", "snap1.qcow2", "snap2.qcow2", "snap3.qcow2", "snap4.qcow2"];
const ROOT: usize = 0;
const SNAP1: usize = 1;
const SNAP2: usize = 2;
const SNAP3: usize = 3;
const SNAP4: usize = 4;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

/// The five-layer chain of a started domain `vm`, and the reference image
/// (the guest's view before any job, flattened).
struct Chain5 {
    layers: Vec<PathBuf>,
    reference: PathBuf,
}

impl Chain5 {
    fn path(&self, layer: usize) -> &Path {
        &self.layers[layer]
    }

    fn arg(&self, layer: usize) -> &str {
        s(&self.layers[layer])
    }

    /// The expected chain, top first, of the given layers (all qcow2).
    fn expect(&self, layers: &[usize]) -> Vec<(String, String)> {
        layers.iter().map(|l| (self.arg(*l).to_string(), "qcow2".to_string())).collect()
    }
}

/// Makes the five-layer chain and its reference, defines `vm` on snap4 and
/// starts it. The guard destroys the domain when the test ends.
fn start_chain(env: &TestEnv) -> (Chain5, DomainGuard<'_>) {
    let layers = make_chain(env.dir.path(), &NAMES);
    let reference = env.path("ref.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&layers[SNAP4]), s(&reference)]);
    env.define(
        "vm",
        &domain_xml("vm", &[DiskSpec { target: "vda", format: "qcow2", path: &layers[SNAP4], extra: "" }]),
    );
    let guard = DomainGuard { env, name: "vm".into() };
    let out = env.ok(&["start", "vm"]);
    assert!(out.contains("Domain 'vm' started"), "start printed: {out}");
    (Chain5 { layers, reference }, guard)
}

/// vda's main line in a Strata XML document (validated first), top first:
/// (path, format). Also checks that the layers carry indices 0, 1, 2… by
/// depth, that the chain ends, and that it has no other branch.
fn xml_chain(xml: &str) -> Vec<(String, String)> {
    validate_xml(xml);
    let dom = Domain::parse(xml).expect("Strata's XML parses");
    let disk = dom.find_disk("vda").expect("vda in the XML");
    let chain = disk.chain.expect("vda has a recorded chain");
    let line = chain.main_line();
    assert_eq!(line.len(), chain.layers.len(), "vda's chain has branches:\n{xml}");
    for (depth, layer) in line.iter().enumerate() {
        assert_eq!(layer.index, depth, "layer at depth {depth} has index {}:\n{xml}", layer.index);
    }
    assert_eq!(line.last().expect("a layer").backing, Backing::End, "vda's chain does not end:\n{xml}");
    line.iter()
        .map(|l| {
            (
                l.source.local_path().expect("local file").display().to_string(),
                l.format.clone().expect("recorded format"),
            )
        })
        .collect()
}

fn live_xml(env: &TestEnv) -> String {
    env.ok(&["dumpxml", "vm"])
}

fn live_chain(env: &TestEnv) -> Vec<(String, String)> {
    xml_chain(&live_xml(env))
}

fn inactive_chain(env: &TestEnv) -> Vec<(String, String)> {
    xml_chain(&env.ok(&["dumpxml", "vm", "--inactive"]))
}

/// The chain is `expected` in the live XML, the persistent XML and on disk
/// (qemu-img following the image headers from the top).
fn assert_chain(env: &TestEnv, expected: &[(String, String)], when: &str) {
    assert_eq!(live_chain(env), expected, "live XML chain {when}");
    assert_eq!(inactive_chain(env), expected, "persistent XML chain {when}");
    let top = Path::new(&expected[0].0);
    assert_eq!(qemu_chain(top), expected, "chain on disk (qemu-img info --backing-chain) {when}");
}

/// The backing name written in an image's header.
fn header_backing(path: &Path) -> Option<String> {
    let out = qemu_img(&["info", "-U", "--output=json", s(path)]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img json");
    v["backing-filename"].as_str().map(str::to_string)
}

fn image_format(path: &Path) -> String {
    let out = qemu_img(&["info", "-U", "--output=json", s(path)]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img json");
    v["format"].as_str().expect("format").to_string()
}

/// Writes `pattern` over [offset, offset+len) as the guest would, and the
/// same into the reference.
fn guest_write(env: &TestEnv, reference: &Path, pattern: u8, offset: u64, len: u64) {
    let rt = runtime();
    let conn = QemuConnection::open_embedded(&env.state_root()).expect("open the embedded driver");
    rt.block_on(guest::write(&conn, "vm", "vda", pattern, offset, len));
    qemu_io(&["-f", "qcow2", "-c", &format!("write -P {pattern:#x} {offset} {len}"), s(reference)]);
}

/// What the guest reads on vda equals the reference.
fn assert_guest_sees(env: &TestEnv, reference: &Path, when: &str) {
    let rt = runtime();
    let conn = QemuConnection::open_embedded(&env.state_root()).expect("open the embedded driver");
    assert!(
        rt.block_on(guest::compare(&conn, "vm", "vda", reference)),
        "the guest's data differs from the reference {when}"
    );
}

/// QEMU holds no write lock on `image`: `qemu-img info` without `-U`
/// opens it (it fails on an image QEMU has open for writing).
fn assert_released(image: &Path, when: &str) {
    let out = Command::new("qemu-img").args(["info", s(image)]).output().expect("run qemu-img info");
    assert!(
        out.status.success(),
        "QEMU still has {} open for writing {when}: {}",
        image.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// QEMU has nodes for the images of vda's live chain and for nothing
/// else: a format and a protocol node per layer, the dropped layers' all
/// removed (a node left behind keeps its image open). Asks QEMU directly,
/// so call it last: the domain is tainted as custom-monitor from then on.
fn assert_only_live_nodes(env: &TestEnv, when: &str) {
    let chain: Vec<String> = live_chain(env).into_iter().map(|(path, _)| path).collect();
    let reply =
        env.ok(&["qemu-monitor-command", "vm", r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#]);
    let reply: serde_json::Value = serde_json::from_str(&reply).expect("QMP reply");
    let nodes = reply["return"].as_array().expect("a node list");
    let names: Vec<&str> = nodes.iter().map(|n| n["node-name"].as_str().unwrap_or_default()).collect();
    // A format node's `file` may be a json: description; a protocol
    // node's is the image's path.
    let opened: Vec<&str> =
        nodes.iter().filter(|n| n["drv"] == "file").map(|n| n["file"].as_str().unwrap_or_default()).collect();
    assert!(opened.iter().all(|f| chain.iter().any(|c| c == f)), "{when}: QEMU keeps dropped layers open: {opened:?}");
    assert_eq!(names.len(), 2 * chain.len(), "{when}: not one format and one protocol node per layer: {names:?}");
}

/// `qemu-img compare` of an image file (opened without locking) with the
/// reference.
fn image_equals(image: &Path, format: &str, reference: &Path) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-f", format, "-F", "qcow2", s(image), s(reference)])
        .output()
        .expect("run qemu-img compare");
    out.status.code() == Some(0)
}

fn job_info(env: &TestEnv) -> String {
    env.ok(&["blockjob", "vm", "vda", "--info"])
}

/// Polls `blockjob --info` (each call reconciling) until vda has no job.
fn wait_no_job(env: &TestEnv) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = job_info(env);
        if info.contains("No current block job for vda") {
            return;
        }
        assert!(Instant::now() < deadline, "the job on vda did not end within 60 s: {info}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `blockjob --info` until it shows a job labelled `label`.
fn wait_job_visible(env: &TestEnv, label: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = job_info(env);
        if info.contains(&format!("{label}: [")) {
            return info;
        }
        assert!(Instant::now() < deadline, "no '{label}' job appeared on vda: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ---------------------------------------------------------------------
// blockcommit: seed 003, figure 3's six cases
// ---------------------------------------------------------------------

/// How a case names --top and --base.
#[derive(Clone, Copy)]
enum Spec {
    /// Absolute path of the layer (RootBase = 0 … snap4 = 4).
    Path(usize),
    /// `vda[N]`, N the depth below the active layer.
    Index(usize),
    /// The layer's file name, relative to the active layer's directory.
    Relative(usize),
}

impl Spec {
    fn arg(self, c: &Chain5) -> String {
        match self {
            Spec::Path(l) => c.arg(l).to_string(),
            Spec::Index(n) => format!("vda[{n}]"),
            Spec::Relative(l) => NAMES[l].to_string(),
        }
    }
}

/// One of figure 3's cases on a fresh domain: commits `top` into `base`,
/// then checks the chain `remaining` (top first) everywhere, that the image
/// now above the base names it by absolute path, that the committed files
/// are kept, and the guest's data. With `write_during`, the job runs at
/// 16 KiB/s (minutes for its data, however slow the machine) and the guest
/// writes while it runs; the `--bandwidth 0` after the writes must find it.
fn commit_case(top: Spec, base: Spec, remaining: &[usize], write_during: bool) {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let (top_arg, base_arg) = (top.arg(&c), base.arg(&c));
    let args = ["blockcommit", "vm", "vda", "--top", &top_arg, "--base", &base_arg];
    if write_during {
        let out = env.ok(&[&args[..], &["--bandwidth", "16384", "--bytes"]].concat());
        assert_eq!(out.trim(), "Block Commit started");
        let info = wait_job_visible(&env, "Block Commit");
        assert!(info.contains("Bandwidth limit: 16384 bytes/s"), "{info}");
        // Over the boundary of snap1's and snap2's data, and into nothing.
        guest_write(&env, &c.reference, 0x5a, MIB + MIB / 2, MIB);
        guest_write(&env, &c.reference, 0xa5, 10 * MIB, 64 * 1024);
        env.ok(&["blockjob", "vm", "vda", "--bandwidth", "0"]);
        wait_no_job(&env);
    } else {
        let out = env.strata(&[&args[..], &["--wait", "--verbose"]].concat());
        assert!(out.status.success(), "blockcommit failed: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), "Commit complete");
        assert!(text(&out.stderr).contains("Block commit: [100 %]"), "progress: {}", text(&out.stderr));
        assert_eq!(job_info(&env).trim(), "No current block job for vda");
    }
    assert_chain(&env, &c.expect(remaining), "after the commit");
    // The image above the base now names it, by absolute path (no --keep-relative).
    let base_layer = match base {
        Spec::Path(l) | Spec::Relative(l) => l,
        Spec::Index(n) => SNAP4 - n,
    };
    let at = remaining.iter().position(|l| *l == base_layer).expect("base stays in the chain");
    assert!(at > 0, "the base must be below something");
    assert_eq!(
        header_backing(c.path(remaining[at - 1])).as_deref(),
        Some(c.arg(base_layer)),
        "header of the image above the base"
    );
    for (layer, name) in c.layers.iter().zip(NAMES) {
        assert!(layer.exists(), "{name} was deleted without --delete");
    }
    assert_released(c.path(base_layer), "after committing into it");
    assert_guest_sees(&env, &c.reference, "after the commit");
}

/// (1) snap1, snap2, snap3 into RootBase: RootBase ← snap4.
#[test]
fn commit_case1_snap1_to_snap3_into_rootbase() {
    commit_case(Spec::Path(SNAP3), Spec::Path(ROOT), &[SNAP4, ROOT], true);
}

/// (2) snap1, snap2 into RootBase: RootBase ← snap3 ← snap4.
#[test]
fn commit_case2_snap1_snap2_into_rootbase() {
    commit_case(Spec::Index(2), Spec::Index(4), &[SNAP4, SNAP3, ROOT], false);
}

/// (3) snap1 into RootBase: RootBase ← snap2 ← snap3 ← snap4.
#[test]
fn commit_case3_snap1_into_rootbase() {
    commit_case(Spec::Index(3), Spec::Relative(ROOT), &[SNAP4, SNAP3, SNAP2, ROOT], true);
}

/// (4) snap2 into snap1: RootBase ← snap1 ← snap3 ← snap4.
#[test]
fn commit_case4_snap2_into_snap1() {
    commit_case(Spec::Path(SNAP2), Spec::Index(3), &[SNAP4, SNAP3, SNAP1, ROOT], false);
}

/// (5) snap3 into snap2: RootBase ← snap1 ← snap2 ← snap4.
#[test]
fn commit_case5_snap3_into_snap2() {
    commit_case(Spec::Index(1), Spec::Path(SNAP2), &[SNAP4, SNAP2, SNAP1, ROOT], true);
}

/// (6) snap2, snap3 into snap1: RootBase ← snap1 ← snap4 (figure 3).
#[test]
fn commit_case6_snap2_snap3_into_snap1() {
    commit_case(Spec::Relative(SNAP3), Spec::Index(3), &[SNAP4, SNAP1, ROOT], false);
}

/// Method-a (one commit) and method-b (two commits) reach the same chain
/// base ← sn1 ← sn4 with the same data; method-b's second commit names its
/// layers by their new depths.
#[test]
fn method_a_and_method_b_reach_the_same_chain() {
    let env_a = TestEnv::new();
    let (a, _guard_a) = start_chain(&env_a);
    let out =
        env_a.ok(&["blockcommit", "vm", "vda", "--base", a.arg(SNAP1), "--top", a.arg(SNAP3), "--wait", "--verbose"]);
    assert_eq!(out.trim(), "Commit complete");
    assert_chain(&env_a, &a.expect(&[SNAP4, SNAP1, ROOT]), "after method-a");
    assert_guest_sees(&env_a, &a.reference, "after method-a");

    let env_b = TestEnv::new();
    let (b, _guard_b) = start_chain(&env_b);
    let out =
        env_b.ok(&["blockcommit", "vm", "vda", "--base", b.arg(SNAP2), "--top", b.arg(SNAP3), "--wait", "--verbose"]);
    assert_eq!(out.trim(), "Commit complete");
    assert_chain(&env_b, &b.expect(&[SNAP4, SNAP2, SNAP1, ROOT]), "after method-b's first commit");
    // snap2 is now vda[1] and snap1 vda[2].
    let out = env_b.ok(&["blockcommit", "vm", "vda", "--base", "vda[2]", "--top", "vda[1]", "--wait"]);
    assert_eq!(out.trim(), "Commit complete");
    assert_chain(&env_b, &b.expect(&[SNAP4, SNAP1, ROOT]), "after method-b");
    assert_guest_sees(&env_b, &b.reference, "after method-b");

    // Both snap1s now hold snap2's and snap3's data over the same RootBase.
    for (env, c) in [(&env_a, &a), (&env_b, &b)] {
        let flat = env.path("snap1-flat.qcow2");
        qemu_img(&["convert", "-U", "-O", "qcow2", c.arg(SNAP1), s(&flat)]);
        qemu_io(&["-f", "qcow2", "-c", "write -P 0x55 4M 1M", s(&flat)]);
        assert!(image_equals(&flat, "qcow2", &c.reference), "snap1 plus snap4's data is the guest's view");
    }
}

// ---------------------------------------------------------------------
// Active commit
// ---------------------------------------------------------------------

/// `--active --pivot` commits everything into RootBase while the guest
/// writes, then the domain runs on RootBase alone (live and persistent).
#[test]
fn active_commit_pivot_runs_on_the_base() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    // An active commit (a mirror) copies one contiguous dirty run per
    // iteration and only then waits for the rate limit: data far from
    // MiB 1-4 makes a second iteration, which keeps the job running.
    guest_write(&env, &c.reference, 0x66, 40 * MIB, MIB);
    let job = Background::spawn(
        &env,
        &["blockcommit", "vm", "vda", "--active", "--pivot", "--bandwidth", "16384", "--bytes", "--verbose"],
    );
    wait_job_visible(&env, "Active Block Commit");
    guest_write(&env, &c.reference, 0x5a, 4 * MIB - 4096, 8192);
    guest_write(&env, &c.reference, 0x3c, 20 * MIB, MIB);
    env.ok(&["blockjob", "vm", "vda", "--bandwidth", "0"]);
    let out = job.finish(Duration::from_secs(60));
    assert!(out.status.success(), "blockcommit --active --pivot failed: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "Successfully pivoted");

    let list = env.ok(&["domblklist", "vm"]);
    let row = list.lines().find(|l| l.trim_start().starts_with("vda")).expect("vda row");
    assert_eq!(row.split_whitespace().collect::<Vec<_>>(), ["vda", c.arg(ROOT)], "domblklist:\n{list}");
    assert_chain(&env, &c.expect(&[ROOT]), "after the pivot");
    assert_released(c.path(SNAP4), "after pivoting away from it");
    assert_eq!(job_info(&env).trim(), "No current block job for vda");
    assert_guest_sees(&env, &c.reference, "after the pivot");
    // A write after the pivot lands in RootBase.
    guest_write(&env, &c.reference, 0x77, 30 * MIB, MIB);
    assert_guest_sees(&env, &c.reference, "after a write on the base");
    assert_only_live_nodes(&env, "after the pivot");
}

/// `--active --pivot --base vda[3] --delete`: runs on snap1, and the files
/// committed into it (snap4, snap3, snap2) are gone.
#[test]
fn active_commit_pivot_to_a_middle_base_with_delete() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    guest_write(&env, &c.reference, 0x5a, 2 * MIB, 2 * MIB);
    let out = env.ok(&["blockcommit", "vm", "vda", "--active", "--pivot", "--base", "vda[3]", "--delete"]);
    assert_eq!(out.trim(), "Successfully pivoted");
    assert_chain(&env, &c.expect(&[SNAP1, ROOT]), "after the pivot");
    for l in [SNAP2, SNAP3, SNAP4] {
        assert!(!c.path(l).exists(), "{} should have been deleted", NAMES[l]);
    }
    assert!(c.path(SNAP1).exists() && c.path(ROOT).exists());
    assert_guest_sees(&env, &c.reference, "after the pivot");
}

/// `--active --keep-overlay`: the base receives everything, the domain
/// keeps running on the unchanged chain.
#[test]
fn active_commit_keep_overlay_keeps_the_chain() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    guest_write(&env, &c.reference, 0x5a, 3 * MIB + 512, 4096);
    let out = env.strata(&["blockcommit", "vm", "vda", "--active", "--keep-overlay", "--wait", "--verbose"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "Commit complete, overlay image kept");
    assert_chain(&env, &c.expect(&[SNAP4, SNAP3, SNAP2, SNAP1, ROOT]), "after --keep-overlay");
    assert_eq!(job_info(&env).trim(), "No current block job for vda");
    assert_released(c.path(ROOT), "after the commit into it ended");
    assert!(image_equals(c.path(ROOT), "qcow2", &c.reference), "RootBase holds the whole guest view");
    assert_guest_sees(&env, &c.reference, "after --keep-overlay");
}

/// `--active --wait` stops in the synchronised phase (chain unchanged,
/// writes mirrored); `blockjob --pivot` then switches to the base.
#[test]
fn active_commit_wait_then_blockjob_pivot() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let out = env.strata(&["blockcommit", "vm", "vda", "--active", "--base", c.arg(SNAP2), "--wait"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "Now in synchronized phase");
    let info = job_info(&env);
    assert!(info.contains("Active Block Commit: [100 %]"), "{info}");
    assert_eq!(live_chain(&env), c.expect(&[SNAP4, SNAP3, SNAP2, SNAP1, ROOT]), "no pivot yet");
    assert_eq!(inactive_chain(&env), c.expect(&[SNAP4, SNAP3, SNAP2, SNAP1, ROOT]), "no pivot yet");
    guest_write(&env, &c.reference, 0x5a, 5 * MIB, MIB);
    let err = env.fails(&["blockcommit", "vm", "vda", "--top", "vda[1]", "--base", "vda[2]"]);
    assert!(err.contains("already in active block job"), "{err}");

    env.ok(&["blockjob", "vm", "vda", "--pivot"]);
    assert_chain(&env, &c.expect(&[SNAP2, SNAP1, ROOT]), "after blockjob --pivot");
    assert_released(c.path(SNAP4), "after pivoting away from it");
    assert_eq!(job_info(&env).trim(), "No current block job for vda");
    assert_guest_sees(&env, &c.reference, "after blockjob --pivot");
}

/// `--shallow --delete`: snap3 goes into snap2 and its file is removed.
#[test]
fn shallow_commit_with_delete_removes_the_committed_file() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let out = env.ok(&["blockcommit", "vm", "vda", "--top", c.arg(SNAP3), "--shallow", "--delete", "--wait"]);
    assert_eq!(out.trim(), "Commit complete");
    assert!(!c.path(SNAP3).exists(), "snap3.qcow2 should have been deleted");
    assert_chain(&env, &c.expect(&[SNAP4, SNAP2, SNAP1, ROOT]), "after the shallow commit");
    assert_eq!(header_backing(c.path(SNAP4)).as_deref(), Some(c.arg(SNAP2)));
    assert_guest_sees(&env, &c.reference, "after the shallow commit");
}

/// `--keep-relative` on a commit writes the relative name the image above
/// the base had recorded.
#[test]
fn commit_keep_relative_keeps_the_relative_backing_name() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let out = env.ok(&["blockcommit", "vm", "vda", "--top", "vda[2]", "--base", "vda[4]", "--keep-relative", "--wait"]);
    assert_eq!(out.trim(), "Commit complete");
    assert_chain(&env, &c.expect(&[SNAP4, SNAP3, ROOT]), "after the commit");
    assert_eq!(header_backing(c.path(SNAP3)).as_deref(), Some("RootBase.qcow2"));
    assert_guest_sees(&env, &c.reference, "after the commit");
}

// ---------------------------------------------------------------------
// blockpull: figures 5 and 6
// ---------------------------------------------------------------------

/// Flattened copies of snap1..snap3 as they are now, to show later that a
/// pull left the intermediate images valid.
fn snapshot_views(env: &TestEnv, c: &Chain5) -> Vec<(usize, PathBuf)> {
    [SNAP1, SNAP2, SNAP3]
        .into_iter()
        .map(|l| {
            let flat = env.path(&format!("view{l}.qcow2"));
            qemu_img(&["convert", "-O", "qcow2", c.arg(l), s(&flat)]);
            (l, flat)
        })
        .collect()
}

fn assert_views_unchanged(c: &Chain5, views: &[(usize, PathBuf)]) {
    for (l, flat) in views {
        assert!(image_equals(c.path(*l), "qcow2", flat), "{} changed", NAMES[*l]);
    }
}

/// Figure 5: `--base RootBase` → RootBase ← snap4, while the guest writes;
/// the header names RootBase by absolute path; snap1..3 stay valid. The
/// pull runs at 16 KiB/s (its 3 MiB take minutes), so it still runs when
/// the guest has written however slow the machine is, which the
/// `--bandwidth 0` that then speeds it up checks.
#[test]
fn pull_to_rootbase_figure5() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let views = snapshot_views(&env, &c);
    let out = env.ok(&["blockpull", "vm", "vda", "--base", c.arg(ROOT), "--bandwidth", "16384", "--bytes"]);
    assert_eq!(out.trim(), "Block Pull started");
    wait_job_visible(&env, "Block Pull");
    guest_write(&env, &c.reference, 0x5a, 2 * MIB - 4096, 2 * MIB);
    guest_write(&env, &c.reference, 0xa5, 0, 4096);
    env.ok(&["blockjob", "vm", "vda", "--bandwidth", "0"]);
    wait_no_job(&env);
    assert_chain(&env, &c.expect(&[SNAP4, ROOT]), "after the pull");
    assert_eq!(header_backing(c.path(SNAP4)).as_deref(), Some(c.arg(ROOT)), "absolute by default");
    assert_views_unchanged(&c, &views);
    assert_guest_sees(&env, &c.reference, "after the pull");
    assert_only_live_nodes(&env, "after the pull");
}

/// Figure 6: no base → snap4 standalone.
#[test]
fn pull_everything_figure6() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let views = snapshot_views(&env, &c);
    guest_write(&env, &c.reference, 0x5a, 8 * MIB, MIB);
    let out = env.strata(&["blockpull", "vm", "vda", "--wait", "--verbose"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "\nPull complete\n");
    assert!(text(&out.stderr).contains("Block Pull: [100 %]"), "{}", text(&out.stderr));
    assert_chain(&env, &c.expect(&[SNAP4]), "after the pull");
    assert_eq!(header_backing(c.path(SNAP4)), None);
    assert_views_unchanged(&c, &views);
    assert_guest_sees(&env, &c.reference, "after the pull");
    assert_only_live_nodes(&env, "after the pull");
}

/// `--keep-relative` keeps the header's backing name relative; it needs
/// `--base`.
#[test]
fn pull_keep_relative_writes_a_relative_name() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let err = env.fails(&["blockpull", "vm", "vda", "--keep-relative"]);
    assert!(err.starts_with("error: ") && err.contains("--keep-relative") && err.contains("--base"), "{err}");
    assert_eq!(job_info(&env).trim(), "No current block job for vda");

    let out = env.ok(&["blockpull", "vm", "vda", "--base", "vda[3]", "--keep-relative", "--wait"]);
    assert_eq!(out.trim(), "Pull complete");
    assert_chain(&env, &c.expect(&[SNAP4, SNAP1, ROOT]), "after the pull");
    assert_eq!(header_backing(c.path(SNAP4)).as_deref(), Some("snap1.qcow2"), "relative name kept");
    assert_guest_sees(&env, &c.reference, "after the pull");
}

// ---------------------------------------------------------------------
// blockcopy: seed 002's combinations of --shallow / --reuse-external / --raw
// ---------------------------------------------------------------------

/// Data blocks stored in `image` itself (not its backing): (start, length).
fn own_data(image: &Path) -> Vec<(u64, u64)> {
    let out = qemu_img(&["map", "-U", "--output=json", s(image)]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("map json");
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().expect("array") {
        if e["depth"].as_u64() == Some(0) && e["data"].as_bool() == Some(true) {
            let (start, len) = (e["start"].as_u64().expect("start"), e["length"].as_u64().expect("length"));
            match runs.last_mut() {
                Some((s0, l0)) if *s0 + *l0 == start => *l0 += len,
                _ => runs.push((start, len)),
            }
        }
    }
    runs
}

/// Full copy, same format, `--finish`: a standalone qcow2 holding the
/// guest's view; the domain stays on its chain.
#[test]
fn copy_full_same_format_finish() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    guest_write(&env, &c.reference, 0x5a, 6 * MIB, MIB);
    let dest = env.path("copy.qcow2");
    let out = env.strata(&["blockcopy", "vm", "vda", "--dest", s(&dest), "--wait", "--finish", "--verbose"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "Successfully copied");
    assert!(text(&out.stderr).contains("Block Copy: [100 %]"), "{}", text(&out.stderr));
    assert_eq!(qemu_chain(&dest), vec![(s(&dest).to_string(), "qcow2".to_string())], "flattened qcow2");
    assert!(image_equals(&dest, "qcow2", &c.reference), "the copy holds the guest's view");
    assert_chain(&env, &c.expect(&[SNAP4, SNAP3, SNAP2, SNAP1, ROOT]), "after --finish");
    assert!(!live_xml(&env).contains("<mirror"), "no mirror left after --finish");
    assert_released(&dest, "after --finish");
    assert_guest_sees(&env, &c.reference, "after --finish");
}

/// Full copy with `--raw` and `--pivot` (DEST given positionally): the
/// domain runs on one raw file, live and persistent.
#[test]
fn copy_full_raw_pivot() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let dest = env.path("copy.raw");
    let out = env.ok(&["blockcopy", "vm", "vda", s(&dest), "--raw", "--pivot"]);
    assert_eq!(out.trim(), "Successfully pivoted");
    assert_eq!(image_format(&dest), "raw");
    let expected = vec![(s(&dest).to_string(), "raw".to_string())];
    assert_chain(&env, &expected, "after the pivot");
    assert_released(c.path(SNAP4), "after pivoting away from it");
    guest_write(&env, &c.reference, 0x5a, 12 * MIB, MIB);
    assert_guest_sees(&env, &c.reference, "after the pivot");
}

/// `--shallow`: a new qcow2 backed by snap3 holding only snap4's data; after
/// `--pivot` the domain runs on it over the old backing chain.
#[test]
fn copy_shallow_pivot() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let dest = env.path("copy.qcow2");
    let out = env.ok(&["blockcopy", "vm", "vda", "--dest", s(&dest), "--shallow", "--pivot"]);
    assert_eq!(out.trim(), "Successfully pivoted");
    assert_eq!(image_format(&dest), "qcow2");
    assert_eq!(header_backing(&dest).as_deref(), Some(c.arg(SNAP3)), "backed by the source's backing");
    assert_eq!(own_data(&dest), vec![(4 * MIB, MIB)], "only the top layer's data was copied");
    let mut expected = vec![(s(&dest).to_string(), "qcow2".to_string())];
    expected.extend(c.expect(&[SNAP3, SNAP2, SNAP1, ROOT]));
    assert_chain(&env, &expected, "after the pivot");
    guest_write(&env, &c.reference, 0x5a, 3 * MIB, 2 * MIB);
    assert_guest_sees(&env, &c.reference, "after the pivot");
}

/// `--reuse-external` (full): an empty qcow2 the caller made receives the
/// whole chain; its format is probed.
#[test]
fn copy_reuse_full_finish() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let dest = env.path("made.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&dest), "64M"]);
    guest_write(&env, &c.reference, 0x5a, 9 * MIB, MIB);
    let out = env.ok(&["blockcopy", "vm", "vda", "--dest", s(&dest), "--reuse-external", "--wait", "--finish"]);
    assert_eq!(out.trim(), "Successfully copied");
    assert_eq!(qemu_chain(&dest), vec![(s(&dest).to_string(), "qcow2".to_string())]);
    assert!(image_equals(&dest, "qcow2", &c.reference), "the reused file holds the guest's view");
    assert_released(&dest, "after --finish");
    assert_chain(&env, &c.expect(&[SNAP4, SNAP3, SNAP2, SNAP1, ROOT]), "after --finish");
}

/// `--reuse-external --shallow`: a qcow2 the caller made over snap3 gets
/// snap4's data; after the pivot the domain runs on it.
#[test]
fn copy_reuse_shallow_pivot() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let dest = env.path("made.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", c.arg(SNAP3), "-F", "qcow2", s(&dest)]);
    let out = env.ok(&["blockcopy", "vm", "vda", "--dest", s(&dest), "--reuse-external", "--shallow", "--pivot"]);
    assert_eq!(out.trim(), "Successfully pivoted");
    assert_eq!(own_data(&dest), vec![(4 * MIB, MIB)], "only the top layer's data was copied");
    let mut expected = vec![(s(&dest).to_string(), "qcow2".to_string())];
    expected.extend(c.expect(&[SNAP3, SNAP2, SNAP1, ROOT]));
    assert_chain(&env, &expected, "after the pivot");
    guest_write(&env, &c.reference, 0x5a, 0, MIB);
    assert_guest_sees(&env, &c.reference, "after the pivot");
}

/// `--reuse-external --shallow --raw`: a raw file holding snap3's view
/// receives snap4's data; the domain then runs on that raw file.
#[test]
fn copy_reuse_shallow_raw_pivot() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let dest = env.path("made.raw");
    qemu_img(&["convert", "-O", "raw", c.arg(SNAP3), s(&dest)]);
    let out = env.strata(&[
        "blockcopy",
        "vm",
        "vda",
        "--dest",
        s(&dest),
        "--reuse-external",
        "--shallow",
        "--raw",
        "--pivot",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "Successfully pivoted");
    assert!(!text(&out.stderr).contains("warning"), "no warning expected: {}", text(&out.stderr));
    assert_eq!(image_format(&dest), "raw");
    assert_chain(&env, &[(s(&dest).to_string(), "raw".to_string())], "after the pivot");
    assert!(image_equals(&dest, "raw", &c.reference), "the raw file holds the guest's view");
    guest_write(&env, &c.reference, 0x5a, MIB, 3 * MIB);
    assert_guest_sees(&env, &c.reference, "after the pivot");
}

/// `--reuse-external --raw` without `--shallow`: allowed with a warning (the
/// destination must be empty); a full copy lands in it.
#[test]
fn copy_reuse_raw_full_warns() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let dest = env.path("empty.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&dest), "64M"]);
    let out =
        env.strata(&["blockcopy", "vm", "vda", "--dest", s(&dest), "--reuse-external", "--raw", "--wait", "--finish"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "Successfully copied");
    let err = text(&out.stderr);
    assert!(err.starts_with("warning: ") && err.contains("empty"), "expected a warning: {err}");
    assert!(image_equals(&dest, "raw", &c.reference), "the raw file holds the guest's view");
    assert_released(&dest, "after --finish");
    assert_chain(&env, &c.expect(&[SNAP4, SNAP3, SNAP2, SNAP1, ROOT]), "after --finish");
}

/// `--shallow --raw` into a new file on a qcow2 chain is refused, saying
/// why, and leaves nothing behind.
#[test]
fn copy_shallow_raw_new_file_is_refused() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let dest = env.path("copy.raw");
    let err = env.fails(&["blockcopy", "vm", "vda", "--dest", s(&dest), "--shallow", "--raw", "--wait"]);
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.contains("shallow") && err.contains("raw") && err.contains("lose the data of its backing chain"),
        "{err}"
    );
    assert!(!dest.exists(), "a refused copy created its destination");
    assert_eq!(job_info(&env).trim(), "No current block job for vda");
    assert_chain(&env, &c.expect(&[SNAP4, SNAP3, SNAP2, SNAP1, ROOT]), "after the refusal");
}

/// On a lone raw disk, `--shallow --raw` is a whole copy and is accepted.
#[test]
fn copy_shallow_raw_of_a_lone_raw_disk_is_accepted() {
    let env = TestEnv::new();
    let disk = env.path("disk.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&disk), "32M"]);
    qemu_io(&["-f", "raw", "-c", "write -P 0x42 1M 2M", s(&disk)]);
    let reference = env.path("ref.qcow2");
    qemu_img(&["convert", "-O", "qcow2", "-f", "raw", s(&disk), s(&reference)]);
    env.define("vm", &domain_xml("vm", &[DiskSpec { target: "vda", format: "raw", path: &disk, extra: "" }]));
    let _guard = DomainGuard { env: &env, name: "vm".into() };
    env.ok(&["start", "vm"]);
    let dest = env.path("copy.raw");
    let out = env.ok(&["blockcopy", "vm", "vda", "--dest", s(&dest), "--shallow", "--raw", "--pivot"]);
    assert_eq!(out.trim(), "Successfully pivoted");
    assert_chain(&env, &[(s(&dest).to_string(), "raw".to_string())], "after the pivot");
    assert!(image_equals(&dest, "raw", &reference));
    guest_write(&env, &reference, 0x5a, 0, 4096);
    assert_guest_sees(&env, &reference, "after the pivot");
}

/// `--xml FILE`: the destination is the `<disk>`'s source, in the format its
/// `<driver type>` names (here raw under a qcow2 source).
#[test]
fn copy_destination_from_xml_uses_its_format() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let dest = env.path("fromxml.img");
    let xml = env.path("dest.xml");
    std::fs::write(
        &xml,
        format!(
            "<disk type='file' device='disk'>\n  <driver name='qemu' type='raw'/>\n  <source file='{}'/>\n  <target dev='vda' bus='virtio'/>\n</disk>\n",
            dest.display()
        ),
    )
    .expect("write disk xml");
    let out = env.ok(&["blockcopy", "vm", "vda", "--xml", s(&xml), "--pivot"]);
    assert_eq!(out.trim(), "Successfully pivoted");
    assert_eq!(image_format(&dest), "raw", "the <driver type> of the destination XML");
    assert_chain(&env, &[(s(&dest).to_string(), "raw".to_string())], "after the pivot");
    assert_guest_sees(&env, &c.reference, "after the pivot");
}

/// An existing destination needs `--reuse-external`; `--reuse-external`
/// needs an existing destination that no chain or snapshot reads. No
/// refusal touches anything.
#[test]
fn copy_destination_existence_and_use_are_checked() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let existing = env.path("existing.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&existing), "64M"]);
    let before = std::fs::read(&existing).expect("read");
    let err = env.fails(&["blockcopy", "vm", "vda", "--dest", s(&existing), "--wait"]);
    assert!(err.starts_with("error: ") && err.contains("already exists") && err.contains(s(&existing)), "{err}");
    assert_eq!(std::fs::read(&existing).expect("read"), before, "the existing file was modified");
    assert_eq!(job_info(&env).trim(), "No current block job for vda");

    let missing = env.path("missing.qcow2");
    let err = env.fails(&["blockcopy", "vm", "vda", "--dest", s(&missing), "--reuse-external", "--wait"]);
    assert!(
        err.starts_with("error: ") && err.contains("missing destination file") && err.contains(s(&missing)),
        "{err}"
    );
    assert!(!missing.exists());
    assert_eq!(job_info(&env).trim(), "No current block job for vda");
    // A reused destination the guest reads (its active or a backing image).
    for layer in [SNAP4, SNAP2] {
        let err = env.fails(&["blockcopy", "vm", "vda", "--dest", c.arg(layer), "--reuse-external", "--wait"]);
        assert!(
            err.contains("is an image the domain or one of its snapshots uses") && err.contains(c.arg(layer)),
            "{err}"
        );
    }
    assert_eq!(job_info(&env).trim(), "No current block job for vda");
    assert_chain(&env, &c.expect(&[SNAP4, SNAP3, SNAP2, SNAP1, ROOT]), "after the refusals");
    assert_guest_sees(&env, &c.reference, "after the refusals");
}

/// `--wait` alone stops in the mirroring phase (a `<mirror ready='yes'>` in
/// the live XML); `blockjob --abort` then keeps the original.
#[test]
fn copy_wait_then_abort_keeps_the_original() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let dest = env.path("copy.qcow2");
    let out = env.strata(&["blockcopy", "vm", "vda", "--dest", s(&dest), "--wait", "--verbose"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "Now in mirroring phase");
    let xml = live_xml(&env);
    validate_xml(&xml);
    let dom = Domain::parse(&xml).expect("live xml");
    let mirror = dom.find_disk("vda").expect("vda").mirror.expect("a <mirror> during the copy");
    assert_eq!(mirror.ready.as_deref(), Some("yes"), "{xml}");
    assert_eq!(mirror.chain.top().and_then(|l| l.source.local_path()), Some(dest.as_path()), "{xml}");
    assert!(job_info(&env).contains("Block Copy: [100 %]"));
    guest_write(&env, &c.reference, 0x5a, 4 * MIB, 4096);

    env.ok(&["blockjob", "vm", "vda", "--abort"]);
    assert_eq!(job_info(&env).trim(), "No current block job for vda");
    assert!(!live_xml(&env).contains("<mirror"), "mirror left after the abort");
    assert_released(&dest, "after the abort");
    assert_chain(&env, &c.expect(&[SNAP4, SNAP3, SNAP2, SNAP1, ROOT]), "after the abort");
    assert_guest_sees(&env, &c.reference, "after the abort");
}

/// `--wait`, guest writes while mirroring, then `blockjob --pivot`: the
/// domain runs on the copy, live and persistent, and again after a restart.
#[test]
fn copy_pivot_switches_live_and_persistent_definitions() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let dest = env.path("copy.qcow2");
    let out = env.ok(&["blockcopy", "vm", "vda", "--dest", s(&dest), "--wait"]);
    assert_eq!(out.trim(), "Now in mirroring phase");
    guest_write(&env, &c.reference, 0x5a, 7 * MIB, MIB);
    env.ok(&["blockjob", "vm", "vda", "--pivot"]);
    let expected = vec![(s(&dest).to_string(), "qcow2".to_string())];
    assert_chain(&env, &expected, "after the pivot");
    assert_released(c.path(SNAP4), "after pivoting away from it");
    assert_guest_sees(&env, &c.reference, "after the pivot");

    env.ok(&["destroy", "vm"]);
    env.ok(&["start", "vm"]);
    assert_chain(&env, &expected, "after a restart");
    assert_guest_sees(&env, &c.reference, "after a restart");
}

// ---------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------

/// A second job on a busy disk is refused; `blockjob --pivot` on a pull is
/// refused; `--abort --async` ends the pull and the chain is as before.
#[test]
fn busy_disk_refuses_a_second_job() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    env.ok(&["blockpull", "vm", "vda", "--bandwidth", "16384", "--bytes"]);
    wait_job_visible(&env, "Block Pull");

    let err = env.fails(&["blockcommit", "vm", "vda", "--top", "vda[1]", "--base", "vda[4]"]);
    assert!(err.starts_with("error: ") && err.contains("disk 'vda' already in active block job"), "{err}");
    let err = env.fails(&["blockpull", "vm", "vda"]);
    assert!(err.contains("already in active block job"), "{err}");
    let err = env.fails(&["blockjob", "vm", "vda", "--pivot"]);
    assert!(err.starts_with("error: ") && err.contains("not ready for pivot"), "{err}");
    assert!(job_info(&env).contains("Block Pull: ["), "the pull still runs");

    env.ok(&["blockjob", "vm", "vda", "--abort", "--async"]);
    wait_no_job(&env);
    assert_chain(&env, &c.expect(&[SNAP4, SNAP3, SNAP2, SNAP1, ROOT]), "after the aborted pull");
    assert_guest_sees(&env, &c.reference, "after the aborted pull");
}

/// A copy on a busy disk is refused before anything is made: no
/// destination file is left behind, and once the disk is idle the same
/// command works.
#[test]
fn copy_on_a_busy_disk_is_refused_without_leaving_a_file() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    env.ok(&["blockcommit", "vm", "vda", "--top", "vda[1]", "--base", "vda[4]", "--bandwidth", "16384", "--bytes"]);
    wait_job_visible(&env, "Block Commit");
    let dest = env.path("copy.qcow2");
    let err = env.fails(&["blockcopy", "vm", "vda", "--dest", s(&dest), "--wait", "--finish"]);
    assert!(err.starts_with("error: ") && err.contains("already in active block job"), "{err}");
    assert!(!live_xml(&env).contains("<mirror"), "a refused copy left a <mirror>");
    assert!(!dest.exists(), "a copy refused on a busy disk left its destination file behind");
    env.ok(&["blockjob", "vm", "vda", "--abort"]);
    assert_eq!(job_info(&env).trim(), "No current block job for vda");
    let out = env.ok(&["blockcopy", "vm", "vda", "--dest", s(&dest), "--wait", "--finish"]);
    assert_eq!(out.trim(), "Successfully copied");
    assert!(image_equals(&dest, "qcow2", &c.reference));
}

/// Bad disks, bases and tops fail with exit code 1 and leave no job.
#[test]
fn bad_arguments_are_refused() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let refuse = |args: &[&str], wanted: &str| {
        let err = env.fails(args);
        assert!(err.starts_with("error: ") && err.contains(wanted), "{args:?}: expected '{wanted}' in: {err}");
        assert_eq!(job_info(&env).trim(), "No current block job for vda", "{args:?} left a job");
    };
    assert_eq!(job_info(&env).trim(), "No current block job for vda");
    refuse(&["blockjob", "vm", "vda", "--abort"], "does not have an active block job");
    refuse(&["blockjob", "vm", "vda", "--pivot"], "does not have an active block job");
    // Unknown disk.
    refuse(&["blockpull", "vm", "vdz"], "vdz");
    refuse(&["blockcommit", "vm", "vdz", "--top", "vdz[1]", "--base", "vdz[2]"], "vdz");
    refuse(&["blockcopy", "vm", "vdz", "--dest", s(&env.path("c.qcow2"))], "vdz");
    refuse(&["blockjob", "vm", "vdz", "--info"], "vdz");
    // Unknown base.
    let stranger = env.path("stranger.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&stranger), "64M"]);
    refuse(&["blockcommit", "vm", "vda", "--top", "vda[1]", "--base", s(&stranger)], "could not find image");
    refuse(&["blockpull", "vm", "vda", "--base", "/nonexistent/base.qcow2"], "could not find image");
    // Base above top.
    refuse(&["blockcommit", "vm", "vda", "--top", "vda[3]", "--base", "vda[1]"], "is not below top");
    refuse(&["blockcommit", "vm", "vda", "--top", c.arg(SNAP1), "--base", c.arg(SNAP3)], "is not below top");
    refuse(&["blockcommit", "vm", "vda", "--top", "vda[2]", "--base", "vda[2]"], "is not below top");
    // The active layer needs --active.
    refuse(&["blockcommit", "vm", "vda", "--base", "vda[2]"], "requires active flag");
    refuse(&["blockcommit", "vm", "vda", "--top", "vda[0]", "--base", "vda[4]"], "requires active flag");
    refuse(&["blockcommit", "vm", "vda", "--top", c.arg(SNAP4)], "requires active flag");
    // Out of range and malformed layer numbers.
    refuse(
        &["blockcommit", "vm", "vda", "--top", "vda[9]", "--base", "vda[4]"],
        "could not find backing store index '9'",
    );
    refuse(
        &["blockcommit", "vm", "vda", "--top", "vda[1]", "--base", "vda[9]"],
        "could not find backing store index '9'",
    );
    refuse(&["blockpull", "vm", "vda", "--base", "vda[9]"], "could not find backing store index '9'");
    refuse(&["blockpull", "vm", "vda", "--base", "vdb[1]"], "does not match");
    refuse(&["blockpull", "vm", "vda", "--base", "vda[x]"], "vda[x]");
    // Nothing to commit into below RootBase, nothing to pull into itself.
    refuse(&["blockcommit", "vm", "vda", "--top", "vda[4]"], "could not find base image");
    refuse(&["blockpull", "vm", "vda", "--base", "vda[0]"], "could not find base image");
    // Flag combinations.
    refuse(&["blockcommit", "vm", "vda", "--pivot"], "Option --pivot requires option --active");
    refuse(&["blockcommit", "vm", "vda", "--active", "--pivot", "--keep-overlay"], "mutually exclusive");
    refuse(&["blockcommit", "vm", "vda", "--top", "vda[1]", "--shallow", "--base", "vda[3]"], "mutually exclusive");
    let copy = env.path("c.qcow2");
    refuse(&["blockcopy", "vm", "vda", "--dest", s(&copy), "--pivot", "--finish"], "mutually exclusive");
    refuse(&["blockcopy", "vm", "vda", "--dest", s(&copy), "--granularity", "1000"], "granularity");
    refuse(&["blockcopy", "vm", "vda", "--dest", "relative.qcow2"], "absolute");
    assert!(!copy.exists(), "a refused copy created its destination");
    // Unknown domain.
    let err = env.fails(&["blockpull", "nosuchvm", "vda"]);
    assert!(err.contains("nosuchvm"), "{err}");

    assert_chain(&env, &c.expect(&[SNAP4, SNAP3, SNAP2, SNAP1, ROOT]), "after the refusals");
    assert_guest_sees(&env, &c.reference, "after the refusals");
}

// ---------------------------------------------------------------------
// Waiting, timeouts, concurrency, crashes
// ---------------------------------------------------------------------

/// While one process `--wait`s, `blockjob --info` (plain and `--raw`) from
/// another answers at once; the waiter then reports the end.
#[test]
fn blockjob_info_answers_while_another_process_waits() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let waiter = Background::spawn(&env, &["blockpull", "vm", "vda", "--wait", "--bandwidth", "1048576", "--bytes"]);
    wait_job_visible(&env, "Block Pull");
    for _ in 0..3 {
        let started = Instant::now();
        let info = job_info(&env);
        // A loose bound against a hang; that --info does not wait for the
        // pull shows below, where the waiter must still be running.
        assert!(started.elapsed() < Duration::from_secs(15), "blockjob --info took {:?}", started.elapsed());
        assert!(
            info.contains("Block Pull: [") && info.contains("Bandwidth limit: 1048576 bytes/s (1.000 MiB/s)"),
            "{info}"
        );
    }
    let started = Instant::now();
    let raw = env.ok(&["blockjob", "vm", "vda", "--info", "--raw"]);
    assert!(started.elapsed() < Duration::from_secs(15), "blockjob --info --raw took {:?}", started.elapsed());
    assert!(raw.contains(" type=Block Pull\n") && raw.contains(" bandwidth=1\n") && raw.contains(" end="), "{raw}");
    let mut waiter = waiter;
    assert!(waiter.running(), "the pull ended before --bandwidth 0");
    env.ok(&["blockjob", "vm", "vda", "--bandwidth", "0"]);
    let out = waiter.finish(Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "Pull complete");
    assert_chain(&env, &c.expect(&[SNAP4]), "after the pull");
    assert_guest_sees(&env, &c.reference, "after the pull");
}

/// Other `strata` processes may look at the domain at any moment, also while
/// a job starts and ends: with two `blockjob --info` pollers running, each of
/// 25 `blockcopy --wait --finish` runs must succeed, and no job may be left
/// in QEMU that Strata no longer knows about.
#[test]
fn concurrent_callers_while_jobs_start_and_end() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let poll_errors = std::sync::Mutex::new(Vec::<String>::new());
    let mut failure = None;
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let out = env.strata(&["blockjob", "vm", "vda", "--info"]);
                    if !out.status.success() {
                        poll_errors.lock().expect("lock").push(text(&out.stderr));
                    }
                }
            });
        }
        for round in 0..25 {
            let dest = env.path(&format!("copy{round}.qcow2"));
            let out = env.strata(&["blockcopy", "vm", "vda", "--dest", s(&dest), "--wait", "--finish"]);
            if !out.status.success() || text(&out.stdout).trim() != "Successfully copied" {
                failure = Some(format!("round {round}: stdout {:?} stderr {:?}", text(&out.stdout), text(&out.stderr)));
                break;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(failure, None, "a blockcopy failed while other processes looked at the domain");
    assert_eq!(poll_errors.into_inner().expect("lock"), Vec::<String>::new(), "blockjob --info failed");
    assert_eq!(job_info(&env).trim(), "No current block job for vda");
    // QEMU has no job left either: a new one starts and ends normally.
    let out = env.ok(&["blockcommit", "vm", "vda", "--top", "vda[1]", "--base", "vda[2]", "--wait"]);
    assert_eq!(out.trim(), "Commit complete");
    assert_chain(&env, &c.expect(&[SNAP4, SNAP2, SNAP1, ROOT]), "after the rounds");
    assert_guest_sees(&env, &c.reference, "after the rounds");
}

/// `blockjob --info`, stopped at `step` of recording the pull on vda that
/// has ended in QEMU (retried while the pull still runs).
fn info_paused_at(env: &TestEnv, step: &str) -> Background {
    loop {
        match Background::spawn_paused_at(env, &["blockjob", "vm", "vda", "--info"], step) {
            Ok(bg) => return bg,
            Err(out) => {
                let printed = text(&out.stdout);
                assert!(printed.contains("Block Pull: ["), "the pull was recorded elsewhere: {printed:?} {out:?}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// The window behind an earlier CI failure of the test above, opened on
/// purpose: one process has recorded a finished job and is about to remove
/// the disk's dead nodes while another has added the nodes of a new copy on
/// the same disk but not yet started the copy. The removal must spare them.
#[test]
fn dead_node_removal_spares_the_nodes_of_a_starting_copy() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let out = env.ok(&["blockpull", "vm", "vda", "--base", "vda[4]"]);
    assert_eq!(out.trim(), "Block Pull started");
    // The next call finds the pull ended in QEMU, records it and stops
    // before removing dead nodes.
    let recorder = info_paused_at(&env, "job:recorded");
    let dest = env.path("copy.qcow2");
    let copier = Background::spawn_paused_at(
        &env,
        &["blockcopy", "vm", "vda", "--dest", s(&dest), "--wait", "--finish"],
        "blockcopy:nodes-added",
    )
    .unwrap_or_else(|out| panic!("the copy ended before adding its nodes: {out:?}"));
    recorder.resume();
    // Without the lock the recorder removes the copy's nodes now and ends.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut recorder = recorder;
    while recorder.running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    copier.resume();
    let out = copier.finish(Duration::from_secs(60));
    assert!(out.status.success(), "the copy failed: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "Successfully copied");
    let out = recorder.finish(Duration::from_secs(30));
    assert!(out.status.success(), "blockjob --info failed: {}", text(&out.stderr));
    assert_eq!(job_info(&env).trim(), "No current block job for vda");
    assert_chain(&env, &c.expect(&[SNAP4, ROOT]), "after the pull and the copy");
    assert_guest_sees(&env, &c.reference, "after the pull and the copy");
    qemu_img(&["compare", s(&dest), s(&c.reference)]);
}

/// A process that saw a job end gets to record it only after another one
/// has recorded that end and started the next job of the same kind on the
/// disk: it must leave the new job alone (an earlier CI failure: it tried
/// to dismiss the new job, and would have recorded its end).
#[test]
fn a_late_recorder_leaves_the_next_job_alone() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    env.ok(&["blockpull", "vm", "vda", "--base", "vda[4]"]);
    let late = info_paused_at(&env, "job:seen-ended");
    assert_eq!(job_info(&env).trim(), "No current block job for vda");
    env.ok(&["blockpull", "vm", "vda", "--bandwidth", "16384", "--bytes"]);
    late.resume();
    let out = late.finish(Duration::from_secs(30));
    assert!(out.status.success(), "the late blockjob --info failed: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Block Pull: ["), "the late call lost the second pull: {out:?}");
    assert!(job_info(&env).contains("Block Pull: ["), "the second pull is no longer running");
    env.ok(&["blockjob", "vm", "vda", "--abort"]);
    assert_eq!(job_info(&env).trim(), "No current block job for vda");
    assert_chain(&env, &c.expect(&[SNAP4, ROOT]), "after the first pull and the aborted second");
    assert_guest_sees(&env, &c.reference, "after the two pulls");
}

/// `--timeout 1` on a slow pull aborts it: "Pull aborted", exit 1, chain
/// unchanged.
#[test]
fn timeout_aborts_a_slow_pull() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let started = Instant::now();
    let out = env.strata(&["blockpull", "vm", "vda", "--bandwidth", "1", "--timeout", "1"]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "stdout {} stderr {}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("Pull aborted"), "{}", text(&out.stdout));
    assert!(text(&out.stderr).starts_with("error: "), "{}", text(&out.stderr));
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(job_info(&env).trim(), "No current block job for vda");
    assert_chain(&env, &c.expect(&[SNAP4, SNAP3, SNAP2, SNAP1, ROOT]), "after the timeout");
    assert_guest_sees(&env, &c.reference, "after the timeout");
}

/// `--timeout 1` on a slow commit: "Commit aborted", exit 1, chain unchanged.
#[test]
fn timeout_aborts_a_slow_commit() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let out = env.strata(&[
        "blockcommit",
        "vm",
        "vda",
        "--top",
        "vda[1]",
        "--base",
        "vda[4]",
        "--bandwidth",
        "1",
        "--timeout",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1), "stdout {} stderr {}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("Commit aborted"), "{}", text(&out.stdout));
    assert!(text(&out.stderr).starts_with("error: "), "{}", text(&out.stderr));
    assert_eq!(job_info(&env).trim(), "No current block job for vda");
    assert_chain(&env, &c.expect(&[SNAP4, SNAP3, SNAP2, SNAP1, ROOT]), "after the timeout");
    assert_guest_sees(&env, &c.reference, "after the timeout");
    assert_released(c.path(ROOT), "after the commit into it was aborted");
}

/// `--timeout 1` on a slow active commit: "Commit aborted", exit 1, the
/// domain stays on its chain and QEMU no longer writes to the base.
#[test]
fn timeout_aborts_a_slow_active_commit() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    // A second dirty run, so that the rate limit holds the job (see
    // active_commit_pivot_runs_on_the_base).
    guest_write(&env, &c.reference, 0x66, 40 * MIB, MIB);
    let out = env.strata(&["blockcommit", "vm", "vda", "--active", "--pivot", "--bandwidth", "1", "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(1), "stdout {} stderr {}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("Commit aborted"), "{}", text(&out.stdout));
    assert!(text(&out.stderr).starts_with("error: "), "{}", text(&out.stderr));
    assert_eq!(job_info(&env).trim(), "No current block job for vda");
    assert_chain(&env, &c.expect(&[SNAP4, SNAP3, SNAP2, SNAP1, ROOT]), "after the timeout");
    assert_guest_sees(&env, &c.reference, "after the timeout");
    assert_released(c.path(ROOT), "after the commit into it was aborted");
}

/// A pull started without `--wait` ends while no strata runs; the next call
/// (`domblklist --chain`) records it, and every view agrees.
#[test]
fn job_finished_unattended_is_reconciled_by_the_next_call() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let out = env.ok(&["blockpull", "vm", "vda", "--base", "vda[4]"]);
    assert_eq!(out.trim(), "Block Pull started");
    std::thread::sleep(Duration::from_secs(2));
    let list = env.ok(&["domblklist", "vm", "--chain"]);
    let rows: Vec<Vec<&str>> =
        list.lines().skip(2).map(|l| l.split_whitespace().collect()).filter(|r: &Vec<&str>| !r.is_empty()).collect();
    assert_eq!(
        rows,
        vec![vec!["vda", c.arg(SNAP4), "(qcow2)"], vec!["└─", "[1]", c.arg(ROOT), "(qcow2)"]],
        "domblklist --chain:\n{list}"
    );
    assert_chain(&env, &c.expect(&[SNAP4, ROOT]), "after the unattended pull");
    assert_eq!(job_info(&env).trim(), "No current block job for vda");
    assert_guest_sees(&env, &c.reference, "after the unattended pull");
}

/// The same, when the first call after the unattended end reads the
/// persistent definition: jobs.rs promises that any later call records a
/// concluded job, so `dumpxml --inactive` must not show the old chain of a
/// commit QEMU has finished.
#[test]
fn job_finished_unattended_shows_in_the_persistent_xml_first() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    env.ok(&["blockcommit", "vm", "vda", "--top", "vda[1]", "--base", "vda[4]"]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(inactive_chain(&env), c.expect(&[SNAP4, ROOT]), "dumpxml --inactive as the first call");
    assert_chain(&env, &c.expect(&[SNAP4, ROOT]), "after the unattended commit");
}

/// SIGKILL to the `strata` waiting for a commit: the job goes on in QEMU and
/// the next calls finish and record it.
#[test]
fn sigkill_to_the_waiting_strata_loses_nothing() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let mut waiter = Background::spawn(
        &env,
        &[
            "blockcommit",
            "vm",
            "vda",
            "--top",
            "vda[1]",
            "--base",
            "vda[4]",
            "--bandwidth",
            "16384",
            "--bytes",
            "--wait",
        ],
    );
    wait_job_visible(&env, "Block Commit");
    assert!(waiter.running());
    // SAFETY: kill(2) on the strata child this test spawned.
    assert_eq!(unsafe { libc::kill(waiter.pid(), libc::SIGKILL) }, 0);
    let out = waiter.finish(Duration::from_secs(10));
    assert_eq!(out.status.code(), None, "killed by a signal");

    let info = job_info(&env);
    assert!(info.contains("Block Commit: ["), "the job survives its waiter: {info}");
    env.ok(&["blockjob", "vm", "vda", "--bandwidth", "0"]);
    wait_no_job(&env);
    assert_chain(&env, &c.expect(&[SNAP4, ROOT]), "after the orphaned commit");
    assert_guest_sees(&env, &c.reference, "after the orphaned commit");
}

/// SIGKILL to QEMU mid-commit: the domain is shut off and the persistent
/// definition lists a chain the image headers confirm; it starts again on it
/// with the guest's data intact.
#[test]
fn sigkill_to_qemu_mid_job_leaves_a_consistent_record() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    env.ok(&["blockcommit", "vm", "vda", "--top", "vda[1]", "--base", "vda[4]", "--bandwidth", "1"]);
    wait_job_visible(&env, "Block Commit");
    let pid = qemu_pid(&env, "vm").expect("QEMU pid");
    // SAFETY: kill(2) on the QEMU this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    // Wait for the process to be gone (reaped or a zombie).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(')').map(|(_, r)| r.trim_start().chars().next()).unwrap_or(None);
        if matches!(state, None | Some('Z') | Some('X')) {
            break;
        }
        assert!(Instant::now() < deadline, "QEMU survived SIGKILL");
        std::thread::sleep(Duration::from_millis(20));
    }

    assert_eq!(env.ok(&["domstate", "vm"]).trim(), "shut off");
    let recorded = inactive_chain(&env);
    assert_eq!(recorded, xml_chain(&env.ok(&["dumpxml", "vm"])), "shut off: dumpxml is the persistent XML");
    assert_eq!(qemu_chain(Path::new(&recorded[0].0)), recorded, "the record matches the images on disk");
    assert!(
        recorded == c.expect(&[SNAP4, SNAP3, SNAP2, SNAP1, ROOT]) || recorded == c.expect(&[SNAP4, ROOT]),
        "the chain is the one before or after the commit: {recorded:?}"
    );

    env.ok(&["start", "vm"]);
    assert_chain(&env, &recorded, "after a restart");
    assert_eq!(job_info(&env).trim(), "No current block job for vda");
    assert_guest_sees(&env, &c.reference, "after a restart");
}

/// A `--wait`ing blockpull whose QEMU is SIGKILLed mid-job says that
/// QEMU exited while the job ran (before: that the disk had no job).
#[test]
fn a_waiter_whose_qemu_is_killed_says_so() {
    let env = TestEnv::new();
    let (_c, _guard) = start_chain(&env);
    let waiter = Background::spawn(&env, &["blockpull", "vm", "vda", "--wait", "--bandwidth", "16384", "--bytes"]);
    wait_job_visible(&env, "Block Pull");
    let pid = qemu_pid(&env, "vm").expect("QEMU pid");
    // SAFETY: kill(2) on the QEMU this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let out = waiter.finish(Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("domain 'vm' (QEMU pid {pid}) exited while block job on 'vda' was running")),
        "{err}"
    );
    assert!(!err.contains("does not have an active block job"), "{err}");
    assert_eq!(env.ok(&["domstate", "vm"]).trim(), "shut off");
}

/// CPU time this thread has used.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime(2) writing into a live local.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A wait on a job its starter has recorded but not yet sent to QEMU
/// sleeps (on QEMU's events and a timer) instead of spinning, returns at
/// its deadline with the job still to come, and the job then starts.
#[test]
fn a_wait_on_a_starting_job_sleeps_until_its_deadline() {
    use strata_core::driver::{BlockJobState, Connection};
    let env = TestEnv::new();
    let (_c, _guard) = start_chain(&env);
    let starter = Background::spawn_paused_at(
        &env,
        &["blockpull", "vm", "vda", "--bandwidth", "16384", "--bytes"],
        "job:starting",
    )
    .unwrap_or_else(|out| panic!("the pull ended before it was recorded: {out:?}"));
    let conn = QemuConnection::open_embedded(&env.state_root()).expect("open the driver");
    let jobs = conn.block_jobs().expect("the QEMU driver runs block jobs");
    // The wait runs on this thread alone (a current-thread runtime).
    let before = thread_cpu_time();
    let state = runtime().block_on(jobs.block_job_wait("vm", "vda", 2000)).expect("wait");
    let cpu = thread_cpu_time() - before;
    assert!(matches!(state, BlockJobState::Running(_)), "{state:?}");
    assert!(cpu < Duration::from_millis(500), "used {cpu:?} of CPU to wait 2 s");
    starter.resume();
    let out = starter.finish(Duration::from_secs(60));
    assert_eq!(text(&out.stdout).trim(), "Block Pull started", "{out:?}");
    wait_job_visible(&env, "Block Pull");
    env.ok(&["blockjob", "vm", "vda", "--abort"]);
}

/// A block job command killed (`kill`) on a running domain, then the next
/// command (`blockjob --info`): no process is left but the domain's QEMU,
/// the guest reads what it read, the recorded chain matches the images,
/// no record of a job that never started stands in the way of the next
/// one, and once the domain is destroyed every image opens for writing.
fn killed_job_leaves_no_helper(command: JobCommand, kill: Kill) {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    let when = format!("{command:?} killed {kill:?}");
    kill.run(&env, &command.args(&env.path("copy.qcow2")));
    job_info(&env);
    assert_no_stray_processes(&env, &when);
    end_block_job(&env);
    assert_recovered(&env, &when);
    assert_guest_sees(&env, &c.reference, &when);
    assert_eq!(env.ok(&["blockpull", "vm", "vda", "--wait"]).trim(), "Pull complete", "{when}");
    env.ok(&["destroy", "vm"]);
    assert_eq!(test_processes(&env), Vec::new(), "{when}: processes left after destroy");
    assert_images_writable(&env, &when);
}

/// Each command killed at every step of starting its job and recording
/// its end.
#[test]
fn live_jobs_killed_at_each_step_leave_no_helper() {
    for command in JobCommand::ALL {
        for step in JOB_STEPS {
            killed_job_leaves_no_helper(command, Kill::At(step));
        }
    }
}

/// The same, killed anywhere in the first 150 ms (a few times per command).
#[test]
fn live_jobs_killed_at_random_moments_leave_no_helper() {
    for command in JobCommand::ALL {
        for kill in Kill::random(3, Duration::from_millis(150)) {
            killed_job_leaves_no_helper(command, kill);
        }
    }
}

/// Snapshot create (disk-only and checkpoint), revert and delete are refused
/// with virsh's words while a block job runs on the domain, and change
/// nothing; the job goes on. Once it has ended, deleting the snapshot whose
/// frozen image the pull took out of the chain keeps both files.
#[test]
fn snapshot_commands_wait_for_the_end_of_a_block_job() {
    let env = TestEnv::new();
    let (c, _guard) = start_chain(&env);
    env.ok(&["snapshot-create-as", "vm", "s0", "--disk-only", "--atomic"]);
    let s0_overlay = env.path("snap4.s0");
    env.ok(&["blockpull", "vm", "vda", "--base", "vda[2]", "--bandwidth", "16384", "--bytes"]);
    wait_job_visible(&env, "Block Pull");
    for args in [
        &["snapshot-create-as", "vm", "s1", "--disk-only", "--atomic"][..],
        &["snapshot-create-as", "vm", "s2"],
        &["snapshot-revert", "vm", "s0"],
        &["snapshot-delete", "vm", "s0"],
    ] {
        let out = env.strata(args);
        assert_eq!(out.status.code(), Some(1), "{args:?} was not refused: {}", text(&out.stdout));
        assert_eq!(
            text(&out.stderr).trim(),
            "error: block copy still active: disk 'vda' already in active block job",
            "{args:?}"
        );
    }
    assert!(!env.path("snap4.s1").exists(), "a refused snapshot left its overlay");
    assert_eq!(env.ok(&["snapshot-list", "vm", "--name"]).trim(), "s0");
    assert!(job_info(&env).contains("Block Pull: ["), "the pull did not survive the refusals");
    env.ok(&["blockjob", "vm", "vda", "--bandwidth", "0"]);
    wait_no_job(&env);
    let mut expected = vec![(s(&s0_overlay).to_string(), "qcow2".to_string())];
    expected.extend(c.expect(&[SNAP3, SNAP2, SNAP1, ROOT]));
    assert_chain(&env, &expected, "after the pull");
    // The pull left the overlay on snap3: nothing depends on snap4, the
    // image s0 froze, so nothing is merged and no file goes (before, the
    // delete removed the overlay QEMU was running on).
    let out = env.ok(&["snapshot-delete", "vm", "s0"]);
    assert!(out.contains(&format!("vda: no image depends on {} any more", c.arg(SNAP4))), "{out}");
    assert!(s0_overlay.exists() && c.path(SNAP4).exists(), "the delete removed a file");
    assert_chain(&env, &expected, "after the delete");
    assert_eq!(env.ok(&["snapshot-list", "vm", "--name"]).trim(), "");
    assert_guest_sees(&env, &c.reference, "after the pull and the delete");
    assert_only_live_nodes(&env, "after the pull and the delete");
}
