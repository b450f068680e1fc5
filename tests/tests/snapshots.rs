//! Snapshots through the real `strata` command and real QEMU: external
//! disk-only snapshots (seed 003), internal checkpoints, revert to external
//! snapshots that have children (branches), `--branch`, delete by merge
//! (method 1 and 2), `--metadata`, atomic failure, configuration rollback,
//! disk sets, error messages, `--redefine` and crash recovery.
//!
//! Data checks: every guest write is replayed with qemu-io on a reference
//! image; at each snapshot the reference is copied, so each snapshot's frozen
//! image (and the overlay that followed it) can later be compared with what
//! it read at the time.

mod common;

use std::path::{Path, PathBuf};

use common::{
    assert_recovered, domain_xml, hold_domain_lock, internal_snapshots, kill_qemu, killed_at, make_chain, qemu_chain,
    qemu_img, qemu_io, validate_xml, Background, DiskSpec, DomainGuard, Kill, TestEnv, JOB_STEPS, SERVER_STEPS,
};
use strata_core::image::ImageFormat;
use strata_core::xml::{Domain, Element, SnapshotDef};
use strata_qemu::QemuConnection;

const MIB: u64 = 1024 * 1024;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8")
}

/// What the second disk is.
#[derive(Clone, Copy, PartialEq)]
enum Vdb {
    None,
    Raw,
    Qcow2,
}

/// A test domain `vm`: vda on base.qcow2 ← top.qcow2 (make_chain), vdb as
/// asked, plus the reference image that mirrors what vda reads.
struct Vm<'a> {
    env: &'a TestEnv,
    live: bool,
    top: PathBuf,
    base: PathBuf,
    vdb: Option<PathBuf>,
    /// Receives every write vda gets, so it always reads what vda reads.
    reference: PathBuf,
    refs: usize,
}

impl<'a> Vm<'a> {
    fn new(env: &'a TestEnv, vdb: Vdb, live: bool) -> Vm<'a> {
        let chain = make_chain(env.dir.path(), &["base.qcow2", "top.qcow2"]);
        let mut disks = vec![DiskSpec { target: "vda", format: "qcow2", path: &chain[1], extra: "" }];
        let vdb_path = match vdb {
            Vdb::None => None,
            Vdb::Raw => {
                let p = env.path("data.raw");
                qemu_img(&["create", "-q", "-f", "raw", s(&p), "16M"]);
                Some(p)
            }
            Vdb::Qcow2 => {
                let p = env.path("data.qcow2");
                qemu_img(&["create", "-q", "-f", "qcow2", s(&p), "16M"]);
                qemu_io(&["-f", "qcow2", "-c", "write -P 0x66 0 1M", s(&p)]);
                Some(p)
            }
        };
        if let Some(p) = &vdb_path {
            let format = if vdb == Vdb::Raw { "raw" } else { "qcow2" };
            disks.push(DiskSpec { target: "vdb", format, path: p, extra: "" });
        }
        env.define("vm", &domain_xml("vm", &disks));
        let reference = env.path("ref.qcow2");
        qemu_img(&["convert", "-O", "qcow2", s(&chain[1]), s(&reference)]);
        if live {
            env.ok(&["start", "vm"]);
        }
        Vm { env, live, top: chain[1].clone(), base: chain[0].clone(), vdb: vdb_path, reference, refs: 0 }
    }

    fn guard(&self) -> DomainGuard<'a> {
        DomainGuard { env: self.env, name: "vm".into() }
    }

    /// Writes to vda as the guest would (through QEMU when running, into the
    /// active image otherwise) and replays the write on the reference.
    fn write(&self, pattern: u8, offset: u64, len: u64) {
        if self.live {
            let conn = QemuConnection::open_embedded(&self.env.state_root()).expect("open");
            runtime().block_on(common::guest::write(&conn, "vm", "vda", pattern, offset, len));
        } else {
            let active = active(self.env, "vda");
            qemu_io(&["-f", "qcow2", "-c", &format!("write -P {pattern:#x} {offset} {len}"), s(&active)]);
        }
        qemu_io(&["-f", "qcow2", "-c", &format!("write -P {pattern:#x} {offset} {len}"), s(&self.reference)]);
    }

    /// A frozen copy of the reference: what vda reads now.
    fn snap_ref(&mut self) -> PathBuf {
        self.refs += 1;
        let copy = self.env.path(&format!("ref{}.qcow2", self.refs));
        std::fs::copy(&self.reference, &copy).expect("copy reference");
        copy
    }

    /// Replaces the reference by an earlier copy (after a revert).
    fn reset_ref(&self, to: &Path) {
        std::fs::copy(to, &self.reference).expect("reset reference");
    }

    /// Whether vda, as the guest (or an offline reader) sees it, reads
    /// exactly `reference`.
    fn reads(&self, reference: &Path) -> bool {
        if self.live {
            let conn = QemuConnection::open_embedded(&self.env.state_root()).expect("open");
            runtime().block_on(common::guest::compare(&conn, "vm", "vda", reference))
        } else {
            same(&active(self.env, "vda"), reference)
        }
    }

    /// Disk-only external snapshot of vda with the default overlay name
    /// (vdb excluded when present).
    fn ext_snapshot(&self, name: &str) {
        let mut args = vec!["snapshot-create-as", "vm", name, "--disk-only", "--atomic"];
        if self.vdb.is_some() {
            args.extend(["--diskspec", "vdb,snapshot=no"]);
        }
        let out = self.env.ok(&args);
        assert_eq!(out.trim(), format!("Domain snapshot {name} created"));
    }

    fn start(&mut self) {
        self.env.ok(&["start", "vm"]);
        self.live = true;
    }

    fn destroy(&mut self) {
        if self.live {
            self.env.ok(&["destroy", "vm"]);
            self.live = false;
        }
    }
}

/// `qemu-img compare -U a b` (each with its backing chain) says identical.
fn same(a: &Path, b: &Path) -> bool {
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-U", s(a), s(b)])
        .output()
        .expect("run qemu-img compare");
    assert!(
        matches!(out.status.code(), Some(0) | Some(1)),
        "qemu-img compare {} {} failed: {}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.code() == Some(0)
}

/// domblklist's source for `target`.
fn active(env: &TestEnv, target: &str) -> PathBuf {
    let list = env.ok(&["domblklist", "vm"]);
    let source = list
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.len() == 2 && cols[0] == target).then(|| cols[1].to_string())
        })
        .next()
        .unwrap_or_else(|| panic!("no {target} in domblklist:\n{list}"));
    PathBuf::from(source)
}

/// The layers of `target`'s chain in a domain XML, top first.
fn xml_chain(xml: &str, target: &str) -> Vec<String> {
    let dom = Domain::parse(xml).expect("domain xml");
    let disk = dom.find_disk(target).expect("disk");
    disk.chain
        .expect("chain")
        .main_line()
        .iter()
        .map(|l| l.source.local_path().expect("local").display().to_string())
        .collect()
}

/// The file names of qemu_chain.
fn chain_files(top: &Path) -> Vec<String> {
    qemu_chain(top).into_iter().map(|(f, _)| f).collect()
}

fn strs(paths: &[&Path]) -> Vec<String> {
    paths.iter().map(|p| p.display().to_string()).collect()
}

fn snapshot_xml(env: &TestEnv, snap: &str) -> String {
    let xml = env.ok(&["snapshot-dumpxml", "vm", snap]);
    validate_xml(&xml);
    xml
}

fn snapshot_def(env: &TestEnv, snap: &str) -> SnapshotDef {
    SnapshotDef::parse(&snapshot_xml(env, snap)).expect("snapshot xml")
}

/// The image a snapshot froze for `disk`: the disk's source in the
/// snapshot's saved `<domain>`.
fn frozen(env: &TestEnv, snap: &str, disk: &str) -> PathBuf {
    let def = snapshot_def(env, snap);
    let dom = Domain::from_element(def.domain.expect("saved <domain>")).expect("saved domain");
    dom.find_disk(disk)
        .expect("disk in saved domain")
        .source()
        .and_then(|s| s.local_path())
        .expect("local source")
        .to_path_buf()
}

/// The overlay an external snapshot created for `disk`.
fn overlay(env: &TestEnv, snap: &str, disk: &str) -> PathBuf {
    let def = snapshot_def(env, snap);
    let d = def.disks.iter().find(|d| d.name == disk).expect("disk in <disks>");
    assert_eq!(d.snapshot.as_deref(), Some("external"), "{snap}/{disk} is not external");
    d.source.as_ref().and_then(|s| s.local_path()).expect("overlay path").to_path_buf()
}

/// `snapshot-list --name` (plus filters), sorted: snapshots made within the
/// same second have no defined order.
fn names(env: &TestEnv, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["snapshot-list", "vm", "--name"];
    args.extend_from_slice(extra);
    let mut out: Vec<String> = env.ok(&args).lines().filter(|l| !l.is_empty()).map(str::to_string).collect();
    out.sort();
    out
}

fn current_name(env: &TestEnv) -> String {
    env.ok(&["snapshot-current", "vm", "--name"]).trim().to_string()
}

fn parent_of(env: &TestEnv, snap: &str) -> String {
    env.ok(&["snapshot-parent", "vm", snap]).trim().to_string()
}

fn domstate(env: &TestEnv) -> String {
    env.ok(&["domstate", "vm"]).trim().to_string()
}

// ---------------------------------------------------------------------------
// Creation

/// Seed 003: the external disk-only snapshot of a running domain with an
/// explicit overlay, the raw disk excluded, --atomic.
#[test]
fn external_disk_only_live_seed003_flow() {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::Raw, true);
    let _guard = vm.guard();
    let raw = vm.vdb.clone().expect("vdb");
    let s1 = env.path("sn1-of-top.qcow2");
    vm.write(0x31, 2 * MIB, 64 * 1024);
    let at_s1 = vm.snap_ref();

    let out = env.ok(&[
        "snapshot-create-as",
        "vm",
        "s1",
        "first external",
        "--disk-only",
        "--diskspec",
        &format!("vda,snapshot=external,file={}", s(&s1)),
        "--diskspec",
        "vdb,snapshot=no",
        "--atomic",
    ]);
    assert_eq!(out, "Domain snapshot s1 created\n");

    let blk = env.ok(&["domblklist", "vm"]);
    assert_eq!(active(&env, "vda"), s1, "{blk}");
    assert_eq!(active(&env, "vdb"), raw, "{blk}");

    // The overlay's header names the image it replaced, with its format.
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", s(&s1)])).expect("json");
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["backing-filename"].as_str(), Some(s(&vm.top)), "{info}");
    assert_eq!(info["backing-filename-format"].as_str(), Some("qcow2"), "{info}");
    assert_eq!(chain_files(&s1), strs(&[&s1, &vm.top, &vm.base]));
    assert_eq!(qemu_chain(&raw), vec![(s(&raw).to_string(), "raw".to_string())], "vdb untouched");

    // Both definitions carry the new chain.
    let live = env.ok(&["dumpxml", "vm"]);
    let inactive = env.ok(&["dumpxml", "vm", "--inactive"]);
    validate_xml(&live);
    validate_xml(&inactive);
    assert_eq!(xml_chain(&live, "vda"), strs(&[&s1, &vm.top, &vm.base]));
    assert_eq!(xml_chain(&inactive, "vda"), strs(&[&s1, &vm.top, &vm.base]));
    assert_eq!(xml_chain(&inactive, "vdb"), strs(&[&raw]));

    // The record.
    let xml = snapshot_xml(&env, "s1");
    let def = SnapshotDef::parse(&xml).expect("parse");
    assert_eq!(def.name.as_deref(), Some("s1"));
    assert_eq!(def.description.as_deref(), Some("first external"));
    assert_eq!(def.state.as_deref(), Some("disk-snapshot"));
    assert_eq!(def.parent, None);
    assert_eq!(overlay(&env, "s1", "vda"), s1);
    let vdb = def.disks.iter().find(|d| d.name == "vdb").expect("vdb in <disks>");
    assert_eq!(vdb.snapshot.as_deref(), Some("no"));
    assert_eq!(frozen(&env, "s1", "vda"), vm.top);
    assert_eq!(names(&env, &[]), ["s1"]);
    let info = env.ok(&["snapshot-info", "vm", "s1"]);
    for line in
        ["Name:           s1", "State:          disk-snapshot", "Location:       external", "Current:        yes"]
    {
        assert!(info.contains(line), "missing {line:?} in:\n{info}");
    }
    assert_eq!(current_name(&env), "s1");

    // The guest keeps running on the overlay; the frozen image keeps its data.
    assert_eq!(domstate(&env), "running");
    assert!(vm.reads(&at_s1));
    vm.write(0x32, 3 * MIB, 64 * 1024);
    assert!(vm.reads(&vm.reference));

    // Second snapshot with the default overlay name next to the image.
    vm.ext_snapshot("s2");
    let s2 = env.path("sn1-of-top.s2");
    assert_eq!(active(&env, "vda"), s2);
    assert_eq!(overlay(&env, "s2", "vda"), s2);
    assert_eq!(chain_files(&s2), strs(&[&s2, &s1, &vm.top, &vm.base]));
    assert_eq!(parent_of(&env, "s2"), "s1");
    vm.destroy();
    assert!(same(&vm.top, &at_s1), "the frozen image changed");
}

/// A checkpoint of a running qcow2-only domain: a guest write made after
/// it is undone by the revert; then delete.
#[test]
fn internal_checkpoint_live_create_revert_delete() {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::Qcow2, true);
    let _guard = vm.guard();
    let data = vm.vdb.clone().expect("vdb");
    vm.write(0x41, 2 * MIB, 64 * 1024);
    let at_c1 = vm.snap_ref();
    let data_ref = env.path("data-ref.qcow2");
    qemu_img(&["convert", "-U", "-O", "qcow2", s(&data), s(&data_ref)]);

    assert_eq!(env.ok(&["snapshot-create-as", "vm", "c1", "a checkpoint"]), "Domain snapshot c1 created\n");
    let info = env.ok(&["snapshot-info", "vm", "c1"]);
    assert!(info.contains("State:          running"), "{info}");
    assert!(info.contains("Location:       internal"), "{info}");
    let def = snapshot_def(&env, "c1");
    assert!(def.disks.iter().all(|d| d.snapshot.as_deref() == Some("internal")), "{:?}", def.disks);
    assert_eq!(names(&env, &["--internal"]), ["c1"]);
    assert!(names(&env, &["--external"]).is_empty());
    // No new files: the chain is the same.
    assert_eq!(active(&env, "vda"), vm.top);
    assert_eq!(chain_files(&vm.top), strs(&[&vm.top, &vm.base]));

    vm.write(0x42, 2 * MIB, 64 * 1024);
    vm.write(0x43, 5 * MIB, 64 * 1024);
    let conn = QemuConnection::open_embedded(&env.state_root()).expect("open");
    let rt = runtime();
    rt.block_on(common::guest::write(&conn, "vm", "vdb", 0x44, 0, 64 * 1024));
    assert!(!vm.reads(&at_c1));
    assert!(!rt.block_on(common::guest::compare(&conn, "vm", "vdb", &data_ref)));

    assert_eq!(env.ok(&["snapshot-revert", "vm", "c1"]), "Domain snapshot c1 reverted\n");
    assert_eq!(domstate(&env), "running");
    // virsh's reason words follow each change Strata makes.
    assert_eq!(env.ok(&["domstate", "vm", "--reason"]), "running (from snapshot)\n\n");
    env.ok(&["suspend", "vm"]);
    assert_eq!(env.ok(&["domstate", "vm", "--reason"]), "paused (user)\n\n");
    env.ok(&["resume", "vm"]);
    assert_eq!(env.ok(&["domstate", "vm", "--reason"]), "running (unpaused)\n\n");
    assert!(vm.reads(&at_c1), "the write after the checkpoint is still visible on vda");
    let conn = QemuConnection::open_embedded(&env.state_root()).expect("open");
    assert!(rt.block_on(common::guest::compare(&conn, "vm", "vdb", &data_ref)), "vdb not reverted");
    assert_eq!(current_name(&env), "c1");

    let out = env.ok(&["snapshot-delete", "vm", "c1"]);
    assert!(out.ends_with("Domain snapshot c1 deleted\n"), "{out}");
    assert!(names(&env, &[]).is_empty());
    assert!(vm.reads(&at_c1), "delete changed the disk");
    vm.destroy();
    assert!(!internal_snapshots(&vm.top).contains(&"c1".to_string()));
    assert!(!internal_snapshots(&data).contains(&"c1".to_string()));
}

/// Offline: internal disk snapshots (state shutoff), revert, delete.
#[test]
fn internal_offline_create_revert_delete() {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::Qcow2, false);
    let data = vm.vdb.clone().expect("vdb");
    vm.write(0x51, 2 * MIB, 64 * 1024);
    let at_o1 = vm.snap_ref();
    let data_ref = env.path("data-ref.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&data), s(&data_ref)]);

    assert_eq!(env.ok(&["snapshot-create-as", "vm", "o1"]), "Domain snapshot o1 created\n");
    let info = env.ok(&["snapshot-info", "vm", "o1"]);
    assert!(info.contains("State:          shutoff"), "{info}");
    assert!(info.contains("Location:       internal"), "{info}");
    assert!(internal_snapshots(&vm.top).contains(&"o1".to_string()));
    assert!(internal_snapshots(&data).contains(&"o1".to_string()));
    assert_eq!(domstate(&env), "shut off");

    vm.write(0x52, 2 * MIB, 64 * 1024);
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x53 0 64k", s(&data)]);
    assert!(!vm.reads(&at_o1));

    assert_eq!(env.ok(&["snapshot-revert", "vm", "o1"]), "Domain snapshot o1 reverted\n");
    assert_eq!(domstate(&env), "shut off");
    assert!(vm.reads(&at_o1));
    assert!(same(&data, &data_ref));
    vm.reset_ref(&at_o1);

    // A second one on top, then delete the first: the second stays usable.
    vm.write(0x54, 4 * MIB, 64 * 1024);
    let at_o2 = vm.snap_ref();
    env.ok(&["snapshot-create-as", "vm", "o2"]);
    assert_eq!(parent_of(&env, "o2"), "o1");
    let out = env.ok(&["snapshot-delete", "vm", "o1"]);
    assert!(out.ends_with("Domain snapshot o1 deleted\n"), "{out}");
    assert!(!internal_snapshots(&vm.top).contains(&"o1".to_string()));
    assert!(!internal_snapshots(&data).contains(&"o1".to_string()));
    assert_eq!(names(&env, &[]), ["o2"]);
    assert!(env.fails(&["snapshot-parent", "vm", "o2"]).contains("has no parent"));
    vm.write(0x55, 4 * MIB, 64 * 1024);
    env.ok(&["snapshot-revert", "vm", "o2"]);
    assert!(vm.reads(&at_o2));
}

/// A raw disk excluded with snapshot=no does not stop an internal snapshot.
#[test]
fn internal_with_raw_disk_excluded() {
    let env = TestEnv::new();
    let vm = Vm::new(&env, Vdb::Raw, false);
    let err = env.fails(&["snapshot-create-as", "vm", "i1"]);
    assert!(err.contains("internal snapshot for disk vdb unsupported for storage type raw"), "{err}");
    assert!(names(&env, &[]).is_empty());
    env.ok(&["snapshot-create-as", "vm", "i1", "--diskspec", "vdb,snapshot=no"]);
    assert!(internal_snapshots(&vm.top).contains(&"i1".to_string()));
    let def = snapshot_def(&env, "i1");
    let vdb = def.disks.iter().find(|d| d.name == "vdb").expect("vdb");
    assert_eq!(vdb.snapshot.as_deref(), Some("no"));
}

/// A checkpoint taken live and reverted to while the domain is shut off:
/// the domain comes back running with the checkpoint's disks.
#[test]
fn internal_checkpoint_revert_from_shut_off() {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::Qcow2, true);
    let _guard = vm.guard();
    vm.write(0x45, 2 * MIB, 64 * 1024);
    let at_c1 = vm.snap_ref();
    env.ok(&["snapshot-create-as", "vm", "c1"]);
    vm.write(0x46, 2 * MIB, 64 * 1024);
    vm.destroy();
    assert_eq!(env.ok(&["snapshot-revert", "vm", "c1"]), "Domain snapshot c1 reverted\n");
    assert_eq!(domstate(&env), "running");
    vm.live = true;
    assert!(vm.reads(&at_c1));
}

/// An internal snapshot i1 (a checkpoint when live), then an external
/// disk-only snapshot e1 that froze i1's image. Reverting to i1 would
/// rewrite that image under e1 (before, it did, and e1 then reverted to
/// other data): it is refused, naming e1, and changes nothing. Once e1 is
/// deleted, i1 reverts to its own disks and reads what it read then.
fn revert_to_internal_keeps_what_a_later_snapshot_froze(live: bool) {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::Qcow2, live);
    let _guard = vm.guard();
    vm.write(0x3a, 2 * MIB, 64 * 1024);
    let at_i1 = vm.snap_ref();
    env.ok(&["snapshot-create-as", "vm", "i1"]);
    assert!(internal_snapshots(&vm.top).contains(&"i1".to_string()));
    vm.write(0x3b, 3 * MIB, 64 * 1024);
    let at_e1 = vm.snap_ref();
    vm.ext_snapshot("e1");
    let e1_overlay = overlay(&env, "e1", "vda");
    assert_eq!(frozen(&env, "e1", "vda"), vm.top);
    vm.write(0x3c, 4 * MIB, 64 * 1024);
    let now = vm.snap_ref();
    assert!(vm.reads(&now), "the write after e1 did not happen");
    assert!(same(&vm.top, &at_e1), "e1's frozen image does not hold the write before e1");

    let err = env.fails(&["snapshot-revert", "vm", "i1"]);
    assert!(
        err.contains(&format!(
            "cannot revert to snapshot 'i1': it would write into {}, which snapshot 'e1' froze",
            s(&vm.top)
        )) && err.contains("delete snapshot 'e1' first"),
        "{err}"
    );
    assert_eq!(domstate(&env), if live { "running" } else { "shut off" });
    assert_eq!(chain_files(&active(&env, "vda")), strs(&[&e1_overlay, &vm.top, &vm.base]));
    assert!(same(&vm.top, &at_e1), "the refusal changed e1's frozen image");
    assert!(vm.reads(&now), "the refusal changed the current state");
    assert_eq!(current_name(&env), "e1");
    assert_eq!(Intent::pending(&env), None, "the refusal left an intent");

    env.ok(&["snapshot-delete", "vm", "e1"]);
    assert_eq!(env.ok(&["snapshot-revert", "vm", "i1"]), "Domain snapshot i1 reverted\n");
    assert_eq!(domstate(&env), if live { "running" } else { "shut off" });
    assert_eq!(active(&env, "vda"), vm.top, "the snapshot's own disk source");
    assert_eq!(current_name(&env), "i1");
    assert!(vm.reads(&at_i1));
}

#[test]
fn revert_to_internal_keeps_what_a_later_snapshot_froze_live() {
    revert_to_internal_keeps_what_a_later_snapshot_froze(true);
}

#[test]
fn revert_to_internal_keeps_what_a_later_snapshot_froze_offline() {
    revert_to_internal_keeps_what_a_later_snapshot_froze(false);
}

/// s1 left vdb out, and s2 later froze vdb's image. Reverting to s1 puts
/// vdb back on that image, where the guest would write into what s2 froze:
/// refused, naming s2, and nothing changes.
#[test]
fn revert_refuses_a_left_out_disk_a_later_snapshot_froze() {
    let env = TestEnv::new();
    let vm = Vm::new(&env, Vdb::Qcow2, false);
    let data = vm.vdb.clone().expect("vdb");
    vm.ext_snapshot("s1");
    env.ok(&["snapshot-create-as", "vm", "s2", "--disk-only"]);
    let vdb_overlay = overlay(&env, "s2", "vdb");
    assert_eq!(frozen(&env, "s2", "vdb"), data);
    let data_before = env.path("data-before.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&data), s(&data_before)]);

    let err = env.fails(&["snapshot-revert", "vm", "s1"]);
    assert!(
        err.contains(&format!(
            "cannot revert to snapshot 's1': it would write into {}, which snapshot 's2' froze",
            s(&data)
        )) && err.contains("delete snapshot 's2' first"),
        "{err}"
    );
    assert_eq!(active(&env, "vdb"), vdb_overlay);
    assert_eq!(current_name(&env), "s2");
    assert!(same(&data, &data_before), "the refusal changed s2's image");
}

/// The image holding internal snapshot i1 is now the backing image of an
/// overlay no snapshot records (`--no-metadata`). Reverting to i1 would
/// rewrite it under that overlay: refused, naming the blockcommit that
/// merges the overlay first; after that commit the revert works.
#[test]
fn revert_to_internal_refuses_a_backing_image_of_the_current_state() {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::None, false);
    vm.write(0x3d, 2 * MIB, 64 * 1024);
    let at_i1 = vm.snap_ref();
    env.ok(&["snapshot-create-as", "vm", "i1"]);
    env.ok(&["snapshot-create-as", "vm", "n1", "--disk-only", "--no-metadata"]);
    let n1 = env.path("top.n1");
    assert_eq!(chain_files(&active(&env, "vda")), strs(&[&n1, &vm.top, &vm.base]));
    vm.write(0x3e, 2 * MIB, 64 * 1024);
    let now = vm.snap_ref();
    assert!(vm.reads(&now), "the write on the overlay did not happen");
    let top_before = env.path("top-before.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&vm.top), s(&top_before)]);

    let err = env.fails(&["snapshot-revert", "vm", "i1"]);
    let commit = format!("blockcommit vm vda --active --pivot --base {}", s(&vm.top));
    assert!(
        err.contains(&format!(
            "it would write into {}, which the current state of disk vda reads below {}",
            s(&vm.top),
            s(&n1)
        )) && err.contains(&commit),
        "{err}"
    );
    assert_eq!(chain_files(&active(&env, "vda")), strs(&[&n1, &vm.top, &vm.base]));
    assert!(same(&vm.top, &top_before), "the refusal changed the backing image");
    assert!(vm.reads(&now), "the refusal changed the current state");

    let mut args: Vec<&str> = commit.split(' ').collect();
    args.push("--wait");
    env.ok(&args);
    assert_eq!(active(&env, "vda"), vm.top);
    env.ok(&["snapshot-revert", "vm", "i1"]);
    assert!(vm.reads(&at_i1));
}

/// Deleting a checkpoint whose image has since become a backing file of an
/// external overlay, while the domain runs.
#[test]
fn delete_internal_checkpoint_below_external_overlay_live() {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::Qcow2, true);
    let _guard = vm.guard();
    let data = vm.vdb.clone().expect("vdb");
    vm.write(0x3c, 2 * MIB, 64 * 1024);
    env.ok(&["snapshot-create-as", "vm", "c1"]);
    vm.ext_snapshot("e1");
    vm.write(0x3d, 3 * MIB, 64 * 1024);
    let now = vm.snap_ref();

    let out = env.ok(&["snapshot-delete", "vm", "c1"]);
    assert!(out.ends_with("Domain snapshot c1 deleted\n"), "{out}");
    assert_eq!(names(&env, &[]), ["e1"]);
    assert!(env.fails(&["snapshot-parent", "vm", "e1"]).contains("has no parent"));
    assert!(vm.reads(&now));
    vm.destroy();
    assert!(!internal_snapshots(&vm.top).contains(&"c1".to_string()));
    assert!(!internal_snapshots(&data).contains(&"c1".to_string()));
}

// ---------------------------------------------------------------------------
// Revert to external snapshots with children

/// s1, s2 (child of s1), revert to s1, s3: every snapshot's images read
/// what they read when taken, the abandoned state is kept, the tree branches.
fn revert_with_children(live: bool) {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::Raw, live);
    let _guard = vm.guard();
    vm.write(0x61, 2 * MIB, 64 * 1024);
    let at_s1 = vm.snap_ref();
    vm.ext_snapshot("s1");
    vm.write(0x62, 3 * MIB, 64 * 1024);
    let at_s2 = vm.snap_ref();
    vm.ext_snapshot("s2");
    vm.write(0x63, 4 * MIB, 64 * 1024);
    vm.write(0x64, 2 * MIB, 32 * 1024);
    let abandoned = vm.snap_ref();
    let (o1, o2) = (overlay(&env, "s1", "vda"), overlay(&env, "s2", "vda"));
    assert_eq!(o1, env.path("top.s1"));
    assert_eq!(o2, env.path("top.s2"));

    assert!(!vm.reads(&at_s1), "the checks below would not tell the states apart");
    assert!(!same(&o2, &at_s1));
    let mut args = vec!["snapshot-revert", "vm", "s1"];
    if live {
        args.push("--running");
    }
    assert_eq!(env.ok(&args), "Domain snapshot s1 reverted\n");
    assert_eq!(domstate(&env), if live { "running" } else { "shut off" });
    let branch = PathBuf::from(format!("{}.branch1", o1.display()));
    assert_eq!(active(&env, "vda"), branch, "revert must branch a new overlay off the frozen image");
    assert_eq!(chain_files(&branch), strs(&[&branch, &vm.top, &vm.base]));
    let inactive = env.ok(&["dumpxml", "vm", "--inactive"]);
    assert_eq!(xml_chain(&inactive, "vda"), strs(&[&branch, &vm.top, &vm.base]));
    assert_eq!(current_name(&env), "s1");
    assert!(vm.reads(&at_s1), "the disk does not read what it read at s1");

    // Nothing another snapshot depends on was touched.
    assert_eq!(chain_files(&o2), strs(&[&o2, &o1, &vm.top, &vm.base]));
    assert!(same(&o1, &at_s2), "s1's overlay (s2's frozen image) changed");
    assert!(same(&o2, &abandoned), "the abandoned current state changed");

    // Work on the new branch, then a snapshot there.
    vm.reset_ref(&at_s1);
    vm.write(0x65, 2 * MIB, 64 * 1024);
    vm.write(0x66, 6 * MIB, 64 * 1024);
    let at_s3 = vm.snap_ref();
    vm.ext_snapshot("s3");
    vm.write(0x67, 3 * MIB, 64 * 1024);
    let now = vm.snap_ref();
    assert_eq!(parent_of(&env, "s3"), "s1");
    assert_eq!(env.ok(&["snapshot-list", "vm", "--tree"]), "s1\n  |\n  +- s2\n  +- s3\n    \n\n");
    assert_eq!(names(&env, &["--leaves"]), ["s2", "s3"]);
    assert_eq!(names(&env, &["--from", "s1"]), ["s2", "s3"]);
    assert!(vm.reads(&now));

    vm.destroy();
    assert!(same(&frozen(&env, "s1", "vda"), &at_s1), "s1's frozen image");
    assert!(same(&o1, &at_s2), "s1's overlay");
    assert!(same(&frozen(&env, "s2", "vda"), &at_s2), "s2's frozen image");
    assert!(same(&o2, &abandoned), "s2's overlay");
    assert_eq!(frozen(&env, "s3", "vda"), branch);
    assert!(same(&branch, &at_s3), "s3's frozen image");
    assert!(same(&overlay(&env, "s3", "vda"), &now), "s3's overlay");
    assert!(same(&active(&env, "vda"), &now));
}

#[test]
fn revert_external_with_children_live() {
    revert_with_children(true);
}

#[test]
fn revert_external_with_children_offline() {
    revert_with_children(false);
}

/// Reverting twice to the same snapshot makes a second branch; the first
/// branch's data stays.
#[test]
fn revert_twice_makes_distinct_branches() {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::None, false);
    let at_s1 = vm.snap_ref();
    vm.ext_snapshot("s1");
    vm.write(0x71, 2 * MIB, 64 * 1024);
    env.ok(&["snapshot-revert", "vm", "s1"]);
    let b1 = active(&env, "vda");
    vm.reset_ref(&at_s1);
    vm.write(0x72, 3 * MIB, 64 * 1024);
    let on_b1 = vm.snap_ref();
    env.ok(&["snapshot-revert", "vm", "s1"]);
    let b2 = active(&env, "vda");
    assert_ne!(b1, b2);
    assert_eq!(b2, PathBuf::from(format!("{}.branch2", overlay(&env, "s1", "vda").display())));
    assert!(same(&b2, &at_s1));
    assert!(same(&b1, &on_b1), "the first branch was overwritten");
}

/// `snapshot-create --branch` with a <parent>: revert to the parent, then
/// snapshot on the new branch, in one call.
#[test]
fn branch_creation_from_parent_live() {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::Raw, true);
    let _guard = vm.guard();
    let (at_s1, at_s2, abandoned) = two_snapshots(&mut vm);

    let b3 = env.path("s3.qcow2");
    let xml = format!(
        "<domainsnapshot>\n  <name>s3</name>\n  <parent>\n    <name>s1</name>\n  </parent>\n  <disks>\n    <disk name='vda' snapshot='external'>\n      <source file='{}'/>\n    </disk>\n    <disk name='vdb' snapshot='no'/>\n  </disks>\n</domainsnapshot>\n",
        b3.display()
    );
    let file = env.path("s3.xml");
    std::fs::write(&file, xml).expect("write");
    let out = env.ok(&["snapshot-create", "vm", s(&file), "--branch", "--disk-only"]);
    assert_eq!(out, format!("Domain snapshot s3 created from '{}'\n", s(&file)));

    assert_eq!(domstate(&env), "running");
    assert_eq!(parent_of(&env, "s3"), "s1");
    assert_eq!(current_name(&env), "s3");
    assert_eq!(env.ok(&["snapshot-list", "vm", "--tree"]), "s1\n  |\n  +- s2\n  +- s3\n    \n\n");
    assert_eq!(active(&env, "vda"), b3);
    let chain = chain_files(&b3);
    assert_eq!(chain.len(), 4, "{chain:?}");
    assert_eq!(chain[2..], strs(&[&vm.top, &vm.base]), "s3 must sit on s1's frozen image");
    let o1 = overlay(&env, "s1", "vda");
    assert_ne!(chain[1], s(&o1), "the branch must not write s1's overlay (s2 depends on it)");
    assert_eq!(frozen(&env, "s3", "vda").display().to_string(), chain[1]);
    vm.reset_ref(&at_s1);
    assert!(vm.reads(&at_s1));
    vm.write(0x84, 2 * MIB, 64 * 1024);
    let now = vm.snap_ref();

    vm.destroy();
    assert!(same(&o1, &at_s2));
    assert!(same(&overlay(&env, "s2", "vda"), &abandoned));
    assert!(same(&vm.top, &at_s1));
    assert!(same(&b3, &now));
}

/// `--branch` without a <parent> is refused.
#[test]
fn branch_needs_a_parent() {
    let env = TestEnv::new();
    let vm = Vm::new(&env, Vdb::None, false);
    vm.ext_snapshot("s1");
    let file = env.path("b.xml");
    std::fs::write(&file, "<domainsnapshot><name>b</name></domainsnapshot>").expect("write");
    let err = env.fails(&["snapshot-create", "vm", s(&file), "--branch", "--disk-only"]);
    assert!(err.contains("<parent>"), "{err}");
    assert_eq!(names(&env, &[]), ["s1"]);
}

// ---------------------------------------------------------------------------
// Delete

/// s1 ← s2 ← s3 ← current; delete the middle (s2), then the root (s1).
/// External snapshots s1 and s2 of vda with guest writes before each and
/// after s2; returns what vda read at s1, at s2, and after s2.
fn two_snapshots(vm: &mut Vm) -> (PathBuf, PathBuf, PathBuf) {
    vm.write(0xd1, 2 * MIB, 64 * 1024);
    let at_s1 = vm.snap_ref();
    vm.ext_snapshot("s1");
    vm.write(0xd2, 3 * MIB, 64 * 1024);
    let at_s2 = vm.snap_ref();
    vm.ext_snapshot("s2");
    vm.write(0xd3, 4 * MIB, 64 * 1024);
    (at_s1, at_s2, vm.snap_ref())
}

/// What vda read at each point of [`three_snapshots`].
struct ThreeSnapshots {
    at_s1: PathBuf,
    at_s2: PathBuf,
    /// The state s2's overlay holds (abandoned when `branch`).
    after_s2: PathBuf,
    at_s3: PathBuf,
    now: PathBuf,
}

/// External snapshots s1, s2 and s3 of vda with guest writes between them;
/// with `branch`, s3 is taken after a revert to s1, so s1 has two children.
fn three_snapshots(env: &TestEnv, vm: &mut Vm, branch: bool) -> ThreeSnapshots {
    let (at_s1, at_s2, after_s2) = two_snapshots(vm);
    if branch {
        let mut args = vec!["snapshot-revert", "vm", "s1"];
        if vm.live {
            args.push("--running");
        }
        env.ok(&args);
        vm.reset_ref(&at_s1);
    }
    vm.write(0xd4, 2 * MIB, 32 * 1024);
    let at_s3 = vm.snap_ref();
    vm.ext_snapshot("s3");
    vm.write(0xd5, 6 * MIB, 64 * 1024);
    let now = vm.snap_ref();
    ThreeSnapshots { at_s1, at_s2, after_s2, at_s3, now }
}

fn delete_middle_then_root(live: bool) {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::Raw, live);
    let _guard = vm.guard();
    let ThreeSnapshots { at_s1, at_s3, now, .. } = three_snapshots(&env, &mut vm, false);
    let (o2, o3) = (overlay(&env, "s2", "vda"), overlay(&env, "s3", "vda"));

    let out = env.ok(&["snapshot-delete", "vm", "s2"]);
    assert!(out.contains("method 1"), "{out}");
    assert!(out.ends_with("Domain snapshot s2 deleted\n"), "{out}");
    assert!(!o2.exists(), "the merged overlay {} is left", o2.display());
    assert_eq!(names(&env, &[]), ["s1", "s3"]);
    assert_eq!(parent_of(&env, "s3"), "s1");
    assert_eq!(current_name(&env), "s3");
    assert!(same(&frozen(&env, "s1", "vda"), &at_s1), "s1's frozen image changed");
    assert!(vm.reads(&now), "the current state changed");
    let cur = active(&env, "vda");
    assert_eq!(cur, o3);
    let f3 = frozen(&env, "s3", "vda");
    assert!(f3.exists());
    assert_eq!(chain_files(&o3), strs(&[&o3, &f3, &vm.top, &vm.base]));
    let inactive = env.ok(&["dumpxml", "vm", "--inactive"]);
    validate_xml(&inactive);
    assert_eq!(xml_chain(&inactive, "vda"), chain_files(&o3));
    if live {
        assert_eq!(xml_chain(&env.ok(&["dumpxml", "vm"]), "vda"), chain_files(&o3));
    }

    let out = env.ok(&["snapshot-delete", "vm", "s1"]);
    assert!(out.contains("method 1") || out.contains("method 2"), "{out}");
    assert!(out.ends_with("Domain snapshot s1 deleted\n"), "{out}");
    assert_eq!(names(&env, &[]), ["s3"]);
    assert!(env.fails(&["snapshot-parent", "vm", "s3"]).contains("has no parent"));
    assert!(vm.reads(&now), "the current state changed");
    let inactive = env.ok(&["dumpxml", "vm", "--inactive"]);
    assert_eq!(xml_chain(&inactive, "vda"), chain_files(&active(&env, "vda")));

    vm.destroy();
    assert!(same(&frozen(&env, "s3", "vda"), &at_s3), "s3's frozen image changed");
    assert!(same(&overlay(&env, "s3", "vda"), &now), "s3's overlay");
    assert!(same(&active(&env, "vda"), &now));
    // s3 still reverts to what it froze.
    env.ok(&["snapshot-revert", "vm", "s3"]);
    assert!(same(&active(&env, "vda"), &at_s3));
}

#[test]
fn delete_middle_and_root_external_live() {
    delete_middle_then_root(true);
}

#[test]
fn delete_middle_and_root_external_offline() {
    delete_middle_then_root(false);
}

/// s1 with two children (s2 on the old branch, s3 after a revert): delete
/// s1 (method 2), then the abandoned leaf s2.
fn delete_multi_child(live: bool) {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::Raw, live);
    let _guard = vm.guard();
    let ThreeSnapshots { at_s2, after_s2: abandoned, at_s3, now, .. } = three_snapshots(&env, &mut vm, true);
    assert_eq!(env.ok(&["snapshot-list", "vm", "--tree"]), "s1\n  |\n  +- s2\n  +- s3\n    \n\n");

    let out = env.ok(&["snapshot-delete", "vm", "s1"]);
    assert!(out.contains("method 2"), "two images depend on s1's frozen image:\n{out}");
    assert!(out.ends_with("Domain snapshot s1 deleted\n"), "{out}");
    assert_eq!(names(&env, &["--roots"]), ["s2", "s3"]);
    assert!(vm.reads(&now), "the current state changed");
    assert!(same(&frozen(&env, "s2", "vda"), &at_s2), "s2's frozen image changed");
    assert!(same(&overlay(&env, "s2", "vda"), &abandoned), "s2's overlay changed");
    assert!(same(&frozen(&env, "s3", "vda"), &at_s3), "s3's frozen image changed");
    let inactive = env.ok(&["dumpxml", "vm", "--inactive"]);
    validate_xml(&inactive);
    assert_eq!(xml_chain(&inactive, "vda"), chain_files(&active(&env, "vda")));

    // s2's overlay holds only the state the revert to s1 left behind:
    // nothing reads it, so it goes unmerged, and the message says so.
    let o2 = overlay(&env, "s2", "vda");
    let out = env.ok(&["snapshot-delete", "vm", "s2"]);
    assert!(out.contains(&format!("vda: deleted {}, which nothing reads any more", s(&o2))), "{out}");
    assert!(out.ends_with("Domain snapshot s2 deleted\n"), "{out}");
    assert!(!o2.exists(), "the abandoned overlay is left");
    assert_eq!(names(&env, &[]), ["s3"]);
    assert!(vm.reads(&now), "the current state changed");
    assert_eq!(current_name(&env), "s3");

    vm.destroy();
    assert!(same(&frozen(&env, "s3", "vda"), &at_s3), "s3's frozen image changed");
    assert!(same(&overlay(&env, "s3", "vda"), &now));
    assert!(same(&active(&env, "vda"), &now));
}

#[test]
fn delete_multi_child_external_live() {
    delete_multi_child(true);
}

#[test]
fn delete_multi_child_external_offline() {
    delete_multi_child(false);
}

/// Deleting the current leaf snapshot commits it away; the domain keeps
/// reading the same.
#[test]
fn delete_current_leaf_external_live() {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::Raw, true);
    let _guard = vm.guard();
    vm.ext_snapshot("s1");
    vm.write(0xb1, 2 * MIB, 64 * 1024);
    vm.ext_snapshot("s2");
    vm.write(0xb2, 3 * MIB, 64 * 1024);
    let now = vm.snap_ref();
    let o2 = overlay(&env, "s2", "vda");
    let out = env.ok(&["snapshot-delete", "vm", "s2"]);
    assert!(out.contains("method 1"), "{out}");
    assert_eq!(names(&env, &[]), ["s1"]);
    assert_eq!(current_name(&env), "s1");
    assert!(vm.reads(&now));
    assert!(!o2.exists());
    let o1 = overlay(&env, "s1", "vda");
    assert_eq!(active(&env, "vda"), o1);
    assert_eq!(xml_chain(&env.ok(&["dumpxml", "vm", "--inactive"]), "vda"), strs(&[&o1, &vm.top, &vm.base]));
    // The overlay's nodes went from QEMU with it, its protocol node too
    // (added on its own, unlike those of the images the domain started on).
    let nodes =
        env.ok(&["qemu-monitor-command", "vm", r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#]);
    assert!(nodes.contains(&o1.display().to_string()), "no node for the active overlay: {nodes}");
    assert!(!nodes.contains(&o2.display().to_string()), "QEMU keeps the deleted overlay open: {nodes}");
    vm.destroy();
    assert!(same(&o1, &now));
}

/// A raw disk gets a qcow2 overlay whose backing format is raw; deleting
/// the snapshot commits the guest's writes back into the raw image.
#[test]
fn external_snapshot_of_raw_disk_and_delete_live() {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::Raw, true);
    let _guard = vm.guard();
    let raw = vm.vdb.clone().expect("vdb");
    let raw_ref = env.path("raw-ref.qcow2");
    qemu_img(&["convert", "-U", "-f", "raw", "-O", "qcow2", s(&raw), s(&raw_ref)]);
    assert_eq!(env.ok(&["snapshot-create-as", "vm", "s1", "--disk-only"]), "Domain snapshot s1 created\n");
    let ob = env.path("data.s1");
    assert_eq!(active(&env, "vdb"), ob);
    assert_eq!(overlay(&env, "s1", "vdb"), ob);
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", s(&ob)])).expect("json");
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["backing-filename"].as_str(), Some(s(&raw)), "{info}");
    assert_eq!(info["backing-filename-format"].as_str(), Some("raw"), "{info}");

    let conn = QemuConnection::open_embedded(&env.state_root()).expect("open");
    let rt = runtime();
    rt.block_on(common::guest::write(&conn, "vm", "vdb", 0x7e, MIB, 64 * 1024));
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x7e 1M 64k", s(&raw_ref)]);
    vm.write(0x7f, 2 * MIB, 64 * 1024);
    assert!(rt.block_on(common::guest::compare(&conn, "vm", "vdb", &raw_ref)));

    let out = env.ok(&["snapshot-delete", "vm", "s1"]);
    assert!(out.contains("method 1"), "{out}");
    assert!(names(&env, &[]).is_empty());
    assert_eq!(active(&env, "vdb"), raw);
    assert_eq!(active(&env, "vda"), vm.top);
    let conn = QemuConnection::open_embedded(&env.state_root()).expect("open");
    assert!(rt.block_on(common::guest::compare(&conn, "vm", "vdb", &raw_ref)));
    assert!(vm.reads(&vm.reference));
    let inactive = env.ok(&["dumpxml", "vm", "--inactive"]);
    assert_eq!(xml_chain(&inactive, "vdb"), strs(&[&raw]));
    vm.destroy();
    assert!(same(&raw, &raw_ref), "the guest's writes did not reach the raw image");
}

/// `--children-only`, then `--children`, on a running domain's external
/// chain: the current state reads the same throughout.
#[test]
fn delete_children_external_live() {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::Raw, true);
    let _guard = vm.guard();
    vm.ext_snapshot("s1");
    vm.write(0xf1, 2 * MIB, 64 * 1024);
    let at_s2 = vm.snap_ref();
    vm.ext_snapshot("s2");
    vm.write(0xf2, 3 * MIB, 64 * 1024);
    vm.ext_snapshot("s3");
    vm.write(0xf3, 4 * MIB, 64 * 1024);
    let now = vm.snap_ref();

    let out = env.ok(&["snapshot-delete", "vm", "s2", "--children-only"]);
    assert!(out.ends_with("Domain snapshot s2 children deleted\n"), "{out}");
    assert_eq!(names(&env, &[]), ["s1", "s2"]);
    assert_eq!(current_name(&env), "s2");
    assert!(vm.reads(&now));
    assert!(same(&frozen(&env, "s2", "vda"), &at_s2));

    let out = env.ok(&["snapshot-delete", "vm", "s1", "--children"]);
    assert!(out.ends_with("Domain snapshot s1 and all children deleted\n"), "{out}");
    assert!(names(&env, &[]).is_empty());
    assert!(vm.reads(&now));
    let cur = active(&env, "vda");
    let inactive = env.ok(&["dumpxml", "vm", "--inactive"]);
    assert_eq!(xml_chain(&inactive, "vda"), chain_files(&cur));
    vm.destroy();
    assert!(same(&cur, &now));
}

/// `--no-metadata`: the overlay is made and used, no record is kept.
#[test]
fn no_metadata_creates_overlay_without_record() {
    let env = TestEnv::new();
    let vm = Vm::new(&env, Vdb::None, false);
    assert_eq!(
        env.ok(&["snapshot-create-as", "vm", "n1", "--disk-only", "--no-metadata"]),
        "Domain snapshot n1 created\n"
    );
    let o = env.path("top.n1");
    assert_eq!(active(&env, "vda"), o);
    assert_eq!(chain_files(&o), strs(&[&o, &vm.top, &vm.base]));
    assert!(names(&env, &[]).is_empty());
    assert!(env.fails(&["snapshot-info", "vm", "n1"]).contains("Domain snapshot not found"));
}

/// Revert to an external snapshot with --paused leaves the domain paused
/// on the new branch.
#[test]
fn revert_external_paused_live() {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::Raw, true);
    let _guard = vm.guard();
    vm.write(0x4e, 2 * MIB, 64 * 1024);
    let at_s1 = vm.snap_ref();
    vm.ext_snapshot("s1");
    vm.write(0x4f, 2 * MIB, 64 * 1024);
    env.ok(&["snapshot-revert", "vm", "s1", "--paused"]);
    assert_eq!(domstate(&env), "paused");
    assert_eq!(env.ok(&["domstate", "vm", "--reason"]), "paused (from snapshot)\n\n");
    assert_eq!(active(&env, "vda"), PathBuf::from(format!("{}.branch1", overlay(&env, "s1", "vda").display())));
    assert!(vm.reads(&at_s1));
}

/// `--metadata` only forgets the record: files and chains stay, the child's
/// saved <domain> is not rewritten (libvirt 9.0 corrupts it), the child's
/// parent becomes the grandparent, and the child can still be deleted.
#[test]
fn metadata_delete_keeps_records_consistent() {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::Raw, false);
    vm.write(0xc1, 2 * MIB, 64 * 1024);
    let at_s1 = vm.snap_ref();
    vm.ext_snapshot("s1");
    vm.write(0xc2, 3 * MIB, 64 * 1024);
    vm.ext_snapshot("s2");
    vm.write(0xc3, 4 * MIB, 64 * 1024);
    let at_s3 = vm.snap_ref();
    vm.ext_snapshot("s3");
    vm.write(0xc4, 5 * MIB, 64 * 1024);
    let now = vm.snap_ref();
    let before_s3 = SnapshotDef::parse(&snapshot_xml(&env, "s3")).expect("parse");
    let frozen_s3 = frozen(&env, "s3", "vda");
    let o2 = overlay(&env, "s2", "vda");
    assert_eq!(frozen_s3, o2);
    let cur = active(&env, "vda");
    let chain_before = chain_files(&cur);

    let out = env.ok(&["snapshot-delete", "vm", "s2", "--metadata"]);
    assert_eq!(out, "Domain snapshot s2 deleted\n");
    assert_eq!(names(&env, &[]), ["s1", "s3"]);
    assert!(o2.exists(), "--metadata must not touch files");
    assert_eq!(chain_files(&cur), chain_before);
    assert_eq!(frozen(&env, "s3", "vda"), frozen_s3, "s3's saved <domain> disk source was rewritten");
    let after_s3 = SnapshotDef::parse(&snapshot_xml(&env, "s3")).expect("parse");
    assert_eq!(after_s3.domain, before_s3.domain, "s3's saved <domain> changed");
    assert_eq!(after_s3.disks, before_s3.disks);
    assert_eq!(parent_of(&env, "s3"), "s1");
    assert_eq!(current_name(&env), "s3");
    assert!(vm.reads(&now));
    assert!(same(&frozen(&env, "s3", "vda"), &at_s3));

    let out = env.ok(&["snapshot-delete", "vm", "s3"]);
    assert!(out.contains("method 1") || out.contains("method 2"), "{out}");
    assert!(out.ends_with("Domain snapshot s3 deleted\n"), "{out}");
    assert_eq!(names(&env, &[]), ["s1"]);
    assert_eq!(current_name(&env), "s1");
    assert!(vm.reads(&now), "the current state changed");
    assert!(same(&frozen(&env, "s1", "vda"), &at_s1));
    // Metadata delete of the root too, then s1 is gone without file changes.
    let cur = active(&env, "vda");
    let chain_before = chain_files(&cur);
    env.ok(&["snapshot-delete", "vm", "s1", "--metadata"]);
    assert!(names(&env, &[]).is_empty());
    assert_eq!(chain_files(&cur), chain_before);
    assert!(vm.reads(&now));
}

/// `--metadata` of a parent whose child is then reverted to: the child's
/// record still describes its own images.
#[test]
fn metadata_delete_then_revert_child() {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::None, false);
    vm.ext_snapshot("s1");
    vm.write(0xc5, 2 * MIB, 64 * 1024);
    let at_s2 = vm.snap_ref();
    vm.ext_snapshot("s2");
    vm.write(0xc6, 2 * MIB, 64 * 1024);
    env.ok(&["snapshot-delete", "vm", "s1", "--metadata"]);
    assert!(env.fails(&["snapshot-parent", "vm", "s2"]).contains("has no parent"));
    env.ok(&["snapshot-revert", "vm", "s2"]);
    assert!(vm.reads(&at_s2));
}

// ---------------------------------------------------------------------------
// Atomicity, configuration, disk sets

fn atomic_failure(live: bool) {
    let env = TestEnv::new();
    let vm = Vm::new(&env, Vdb::Qcow2, live);
    let _guard = vm.guard();
    let data = vm.vdb.clone().expect("vdb");
    vm.write(0xd1, 2 * MIB, 64 * 1024);
    let a = env.path("a.qcow2");
    let inactive_before = env.ok(&["dumpxml", "vm", "--inactive"]);
    let err = env.fails(&[
        "snapshot-create-as",
        "vm",
        "bad",
        "--disk-only",
        "--atomic",
        "--diskspec",
        &format!("vda,snapshot=external,file={}", s(&a)),
        "--diskspec",
        "vdb,snapshot=external,file=/nonexistent-dir/x.qcow2",
    ]);
    assert!(err.contains("error:"), "{err}");
    assert!(!a.exists(), "the first disk's overlay was left behind");
    assert!(!Path::new("/nonexistent-dir/x.qcow2").exists());
    assert!(names(&env, &[]).is_empty(), "a record was left");
    assert_eq!(env.ok(&["snapshot-list", "vm", "--name"]), "\n");
    assert_eq!(active(&env, "vda"), vm.top);
    assert_eq!(active(&env, "vdb"), data);
    assert_eq!(chain_files(&vm.top), strs(&[&vm.top, &vm.base]));
    assert_eq!(chain_files(&data), strs(&[&data]));
    let inactive = env.ok(&["dumpxml", "vm", "--inactive"]);
    assert_eq!(xml_chain(&inactive, "vda"), xml_chain(&inactive_before, "vda"));
    assert_eq!(xml_chain(&inactive, "vdb"), xml_chain(&inactive_before, "vdb"));
    if live {
        assert_eq!(domstate(&env), "running");
        assert_eq!(xml_chain(&env.ok(&["dumpxml", "vm"]), "vda"), strs(&[&vm.top, &vm.base]));
    }
    assert!(vm.reads(&vm.reference));
    // The domain is still usable for a good snapshot afterwards.
    env.ok(&[
        "snapshot-create-as",
        "vm",
        "good",
        "--disk-only",
        "--atomic",
        "--diskspec",
        &format!("vda,snapshot=external,file={}", s(&a)),
        "--diskspec",
        "vdb,snapshot=no",
    ]);
    assert_eq!(active(&env, "vda"), a);
    assert!(vm.reads(&vm.reference));
}

#[test]
fn atomic_failure_leaves_nothing_live() {
    atomic_failure(true);
}

#[test]
fn atomic_failure_leaves_nothing_offline() {
    atomic_failure(false);
}

/// Reverting rolls back the configuration: a disk added after the snapshot
/// is gone (internal and external snapshots).
#[test]
fn revert_rolls_back_configuration() {
    let env = TestEnv::new();
    let vm = Vm::new(&env, Vdb::None, false);
    let extra = env.path("extra.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&extra), "8M"]);
    let with_extra = |vda: &Path| {
        domain_xml(
            "vm",
            &[
                DiskSpec { target: "vda", format: "qcow2", path: vda, extra: "" },
                DiskSpec { target: "vdc", format: "qcow2", path: &extra, extra: "" },
            ],
        )
    };

    env.ok(&["snapshot-create-as", "vm", "c1"]);
    env.define("vm", &with_extra(&vm.top));
    let inactive = env.ok(&["dumpxml", "vm", "--inactive"]);
    assert!(inactive.contains("extra.qcow2"), "{inactive}");
    env.ok(&["snapshot-revert", "vm", "c1"]);
    let inactive = env.ok(&["dumpxml", "vm", "--inactive"]);
    validate_xml(&inactive);
    assert!(
        !inactive.contains("extra.qcow2") && !inactive.contains("vdc"),
        "the added disk survived revert:\n{inactive}"
    );

    vm.ext_snapshot("e1");
    let o1 = overlay(&env, "e1", "vda");
    env.define("vm", &with_extra(&o1));
    assert!(env.ok(&["dumpxml", "vm", "--inactive"]).contains("vdc"));
    env.ok(&["snapshot-revert", "vm", "e1"]);
    let inactive = env.ok(&["dumpxml", "vm", "--inactive"]);
    validate_xml(&inactive);
    assert!(!inactive.contains("vdc"), "the added disk survived revert:\n{inactive}");
    let branch = PathBuf::from(format!("{}.branch1", o1.display()));
    assert_eq!(xml_chain(&inactive, "vda"), strs(&[&branch, &vm.top, &vm.base]));
    // The domain starts on the reverted configuration.
    env.ok(&["start", "vm"]);
    let _guard = vm.guard();
    let blk = env.ok(&["domblklist", "vm"]);
    assert!(!blk.contains("vdc"), "{blk}");
}

/// When the disk set is chosen relative to the domain's start.
#[derive(Clone, Copy, PartialEq)]
enum DiskSetWhen {
    Offline,
    BeforeStart,
    WhileRunning,
}

fn disk_set_only_selected(when: DiskSetWhen) {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::Qcow2, when == DiskSetWhen::WhileRunning);
    let _guard = vm.guard();
    let data = vm.vdb.clone().expect("vdb");
    assert_eq!(env.ok(&["diskset-add", "vm", "vda"]), "Disk 'vda' added to the disk set\n");
    if when == DiskSetWhen::BeforeStart {
        vm.start();
    }
    assert_eq!(env.ok(&["diskset-list", "vm"]).trim(), "vda");
    vm.write(0x5d, 2 * MIB, 64 * 1024);
    let at_ds1 = vm.snap_ref();
    let out = env.ok(&["snapshot-create-as", "vm", "ds1", "--disk-only", "--disk-set"]);
    assert_eq!(out, "Domain snapshot ds1 created\n");
    let o = env.path("top.ds1");
    assert_eq!(active(&env, "vda"), o, "vda (in the disk set) got no overlay");
    assert_eq!(chain_files(&o), strs(&[&o, &vm.top, &vm.base]));
    assert_eq!(active(&env, "vdb"), data, "vdb (not in the set) was snapshotted");
    assert_eq!(chain_files(&data), strs(&[&data]));
    assert!(!env.path("data.ds1").exists());
    let def = snapshot_def(&env, "ds1");
    let vdb = def.disks.iter().find(|d| d.name == "vdb").expect("vdb");
    assert_eq!(vdb.snapshot.as_deref(), Some("no"));
    let inactive = env.ok(&["dumpxml", "vm", "--inactive"]);
    assert_eq!(xml_chain(&inactive, "vdb"), strs(&[&data]));
    assert_eq!(xml_chain(&inactive, "vda"), strs(&[&o, &vm.top, &vm.base]));
    assert!(vm.reads(&at_ds1));
    vm.destroy();
    assert!(same(&vm.top, &at_ds1));
}

#[test]
fn disk_set_snapshots_only_selected_disks_offline() {
    disk_set_only_selected(DiskSetWhen::Offline);
}

#[test]
fn disk_set_snapshots_only_selected_disks_live_set_before_start() {
    disk_set_only_selected(DiskSetWhen::BeforeStart);
}

/// The disk set edited while the domain runs (diskset-list shows it) is
/// the one `--disk-set` snapshots.
#[test]
fn disk_set_snapshots_only_selected_disks_live_set_while_running() {
    disk_set_only_selected(DiskSetWhen::WhileRunning);
}

// ---------------------------------------------------------------------------
// Errors, listing, redefine

#[test]
fn error_messages() {
    let env = TestEnv::new();
    let vm = Vm::new(&env, Vdb::Raw, false);
    vm.ext_snapshot("s1");
    let o1 = overlay(&env, "s1", "vda");
    let chain = chain_files(&o1);

    let err = env.fails(&["snapshot-create-as", "vm", "s1", "--disk-only", "--diskspec", "vdb,snapshot=no"]);
    assert!(err.contains("error: operation failed: domain moment s1 already exists"), "{err}");
    let err = env.fails(&["snapshot-create-as", "vm", "x", "--disk-only", "--diskspec", "vdx,snapshot=external"]);
    assert!(err.contains("error: unsupported configuration: no disk named 'vdx'"), "{err}");
    let err = env.fails(&[
        "snapshot-create-as",
        "vm",
        "x",
        "--disk-only",
        "--diskspec",
        "vda,snapshot=no",
        "--diskspec",
        "vdb,snapshot=no",
    ]);
    assert!(err.contains("error: unsupported configuration: nothing selected for snapshot"), "{err}");
    let err = env.fails(&["snapshot-create-as", "vm", "x", "--diskspec", "vda,snapshot=internal"]);
    assert!(err.contains("unsupported for storage type raw"), "{err}");
    let err = env.fails(&[
        "snapshot-create-as",
        "vm",
        "x",
        "--disk-only",
        "--diskspec",
        "vda,snapshot=external",
        "--diskspec",
        "vdb,snapshot=external",
        "--diskspec",
        "vdb,snapshot=no",
    ]);
    assert!(err.contains("too many disk snapshot requests for domain"), "{err}");
    let err = env.fails(&[
        "snapshot-create-as",
        "vm",
        "x",
        "--disk-only",
        "--diskspec",
        &format!("vda,snapshot=external,file={},driver=raw", s(&env.path("x.raw"))),
        "--diskspec",
        "vdb,snapshot=no",
    ]);
    assert!(err.contains("external snapshot format for disk vda is unsupported: raw"), "{err}");

    // An existing overlay file needs --reuse-external.
    let pre = env.path("pre.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", s(&o1), "-F", "qcow2", s(&pre)]);
    let spec = format!("vda,snapshot=external,file={}", s(&pre));
    let err = env.fails(&[
        "snapshot-create-as",
        "vm",
        "x",
        "--disk-only",
        "--diskspec",
        &spec,
        "--diskspec",
        "vdb,snapshot=no",
    ]);
    assert!(err.contains("external snapshot file for disk vda already exists and is not a block device"), "{err}");
    assert_eq!(names(&env, &[]), ["s1"], "failed creations left records");
    assert_eq!(active(&env, "vda"), o1);
    assert_eq!(chain_files(&o1), chain);
    assert!(pre.exists(), "the user's file was removed");

    let out = env.ok(&[
        "snapshot-create-as",
        "vm",
        "r1",
        "--disk-only",
        "--reuse-external",
        "--diskspec",
        &spec,
        "--diskspec",
        "vdb,snapshot=no",
    ]);
    assert_eq!(out, "Domain snapshot r1 created\n");
    assert_eq!(active(&env, "vda"), pre);
    let mut expect = vec![s(&pre).to_string()];
    expect.extend(chain);
    assert_eq!(chain_files(&pre), expect);

    for cmd in [
        vec!["snapshot-info", "vm", "nosuch"],
        vec!["snapshot-dumpxml", "vm", "nosuch"],
        vec!["snapshot-revert", "vm", "nosuch"],
        vec!["snapshot-delete", "vm", "nosuch"],
        vec!["snapshot-parent", "vm", "nosuch"],
        vec!["snapshot-current", "vm", "nosuch"],
        vec!["snapshot-list", "vm", "--from", "nosuch"],
    ] {
        let err = env.fails(&cmd);
        assert!(
            err.contains("error: Domain snapshot not found: no domain snapshot with matching name 'nosuch'"),
            "{cmd:?}: {err}"
        );
    }
    let err = env.fails(&["snapshot-parent", "vm", "s1"]);
    assert!(err.contains("error: snapshot 's1' has no parent"), "{err}");
    assert_eq!(names(&env, &[]), ["r1", "s1"]);
}

#[test]
fn listing_and_navigation() {
    let env = TestEnv::new();
    let vm = Vm::new(&env, Vdb::None, false);
    env.ok(&["snapshot-create-as", "vm", "i1"]);
    vm.ext_snapshot("e1");
    vm.ext_snapshot("e2");
    env.ok(&["snapshot-revert", "vm", "e1"]);
    vm.ext_snapshot("e3");

    assert_eq!(names(&env, &[]), ["e1", "e2", "e3", "i1"]);
    assert_eq!(names(&env, &["--roots"]), ["i1"]);
    assert_eq!(names(&env, &["--leaves"]), ["e2", "e3"]);
    assert_eq!(names(&env, &["--no-leaves"]), ["e1", "i1"]);
    assert_eq!(names(&env, &["--from", "i1"]), ["e1"]);
    assert_eq!(names(&env, &["--from", "i1", "--descendants"]), ["e1", "e2", "e3"]);
    assert_eq!(names(&env, &["--internal"]), ["i1"]);
    assert_eq!(names(&env, &["--external"]), ["e1", "e2", "e3"]);
    assert_eq!(names(&env, &["--disk-only"]), ["e1", "e2", "e3"]);
    assert_eq!(
        env.ok(&["snapshot-list", "vm", "--tree"]),
        "i1\n  |\n  +- e1\n      |\n      +- e2\n      +- e3\n        \n\n"
    );
    assert_eq!(current_name(&env), "e3");
    let json: serde_json::Value = serde_json::from_str(&env.ok(&["snapshot-list", "vm", "--json"])).expect("json list");
    let arr = json.as_array().expect("array");
    assert_eq!(arr.len(), 4);
    let e3 = arr.iter().find(|v| v["name"] == "e3").expect("e3");
    assert_eq!(e3["parent"], "e1");
    assert_eq!(e3["current"], true);
    let table = env.ok(&["snapshot-list", "vm", "--parent"]);
    assert!(table.lines().any(|l| l.starts_with(" e2 ") && l.trim_end().ends_with("e1")), "{table}");

    let info = env.ok(&["snapshot-info", "vm", "--current"]);
    assert!(info.contains("Name:           e3"), "{info}");
    let info: serde_json::Value =
        serde_json::from_str(&env.ok(&["snapshot-info", "vm", "e1", "--json"])).expect("json info");
    assert_eq!(info["children"], 2);
    assert_eq!(info["descendants"], 2);
    assert_eq!(info["parent"], "i1");

    assert_eq!(env.ok(&["snapshot-current", "vm", "i1"]), "Snapshot i1 set as current\n");
    assert_eq!(current_name(&env), "i1");
    assert_eq!(names(&env, &["--current"]), ["e1"]);
    let xml = env.ok(&["snapshot-current", "vm"]);
    validate_xml(&xml);
    assert!(xml.contains("<name>i1</name>"), "{xml}");

    // --print-xml only prints.
    let printed = env.ok(&[
        "snapshot-create-as",
        "vm",
        "p1",
        "--disk-only",
        "--print-xml",
        "--diskspec",
        "vda,snapshot=external,file=/x/p1.qcow2",
    ]);
    let def = SnapshotDef::parse(&printed).expect("printed xml");
    assert_eq!(def.name.as_deref(), Some("p1"));
    assert_eq!(names(&env, &[]).len(), 4);
}

/// `--redefine` from dumped XML recreates a record whose metadata was
/// deleted; `--current` makes it current; the record works afterwards.
#[test]
fn redefine_after_metadata_delete() {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::None, false);
    vm.ext_snapshot("s1");
    vm.write(0xe1, 2 * MIB, 64 * 1024);
    let at_s2 = vm.snap_ref();
    vm.ext_snapshot("s2");
    vm.write(0xe2, 3 * MIB, 64 * 1024);
    let now = vm.snap_ref();
    let dumped = snapshot_xml(&env, "s2");
    let file = env.path("s2.xml");
    std::fs::write(&file, &dumped).expect("write");

    env.ok(&["snapshot-delete", "vm", "s2", "--metadata"]);
    assert_eq!(names(&env, &[]), ["s1"]);
    assert_eq!(current_name(&env), "s1");

    let out = env.ok(&["snapshot-create", "vm", s(&file), "--redefine"]);
    assert_eq!(out, format!("Domain snapshot s2 created from '{}'\n", s(&file)));
    assert_eq!(names(&env, &[]), ["s1", "s2"]);
    assert_eq!(parent_of(&env, "s2"), "s1");
    assert_eq!(current_name(&env), "s1", "--redefine without --current changed the current snapshot");
    assert_eq!(
        SnapshotDef::parse(&snapshot_xml(&env, "s2")).expect("parse"),
        SnapshotDef::parse(&dumped).expect("parse")
    );

    env.ok(&["snapshot-delete", "vm", "s2", "--metadata"]);
    env.ok(&["snapshot-create", "vm", s(&file), "--redefine", "--current"]);
    assert_eq!(current_name(&env), "s2");
    assert!(vm.reads(&now));

    // The redefined record is a full one: revert and delete work.
    env.ok(&["snapshot-revert", "vm", "s2"]);
    assert!(vm.reads(&at_s2));
    let out = env.ok(&["snapshot-delete", "vm", "s2"]);
    assert!(out.ends_with("Domain snapshot s2 deleted\n"), "{out}");
    assert!(vm.reads(&at_s2));
    assert_eq!(names(&env, &[]), ["s1"]);
}

/// A redefine naming a missing parent is refused.
#[test]
fn redefine_refuses_missing_parent() {
    let env = TestEnv::new();
    let vm = Vm::new(&env, Vdb::None, false);
    vm.ext_snapshot("s1");
    vm.ext_snapshot("s2");
    let file = env.path("s2.xml");
    std::fs::write(&file, snapshot_xml(&env, "s2")).expect("write");
    env.ok(&["snapshot-delete", "vm", "s2", "--metadata"]);
    env.ok(&["snapshot-delete", "vm", "s1", "--metadata"]);
    let err = env.fails(&["snapshot-create", "vm", s(&file), "--redefine"]);
    assert!(err.contains("parent snapshot 's1' of 's2' does not exist"), "{err}");
    assert!(names(&env, &[]).is_empty());
}

// ---------------------------------------------------------------------------
// Crash safety

/// Writes the intent record as the driver's write_intent does.
fn write_intent(env: &TestEnv, files: &[&Path]) {
    let mut root = Element::new("intent").with_attr("op", "snapshot-create");
    for f in files {
        root = root.with_child(Element::new("file").with_attr("path", f.to_string_lossy()));
    }
    let dir = env.state_root().join("domains").join("vm");
    std::fs::write(dir.join("snapshot-intent.xml"), root.to_xml()).expect("write intent");
}

/// An interrupted creation: the overlay in the chain is kept, the stray one
/// is removed, by the next snapshot command of any kind.
fn crash_recovery(live: bool, command: &[&str]) {
    let env = TestEnv::new();
    let vm = Vm::new(&env, Vdb::None, live);
    let _guard = vm.guard();
    vm.ext_snapshot("s1");
    let o1 = overlay(&env, "s1", "vda");
    let stray = env.path("top.s2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", s(&o1), "-F", "qcow2", s(&stray)]);
    write_intent(&env, &[&o1, &stray]);

    // Whatever the command's own outcome, recovery runs first.
    let out = env.strata(command);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stray.exists(), "{command:?} left the stray overlay of an interrupted creation ({err})");
    assert!(o1.exists(), "{command:?} removed an overlay that is in the chain");
    assert_eq!(active(&env, "vda"), o1);
    assert_eq!(chain_files(&o1), strs(&[&o1, &vm.top, &vm.base]));
    assert!(vm.reads(&vm.reference));
    // The domain's snapshots keep working.
    vm.ext_snapshot("s2");
    assert_eq!(active(&env, "vda"), stray);
}

#[test]
fn crash_recovery_by_snapshot_list_offline() {
    crash_recovery(false, &["snapshot-list", "vm"]);
}

#[test]
fn crash_recovery_by_snapshot_list_live() {
    crash_recovery(true, &["snapshot-list", "vm"]);
}

/// A creation that then fails (the name exists) still rolls back first.
#[test]
fn crash_recovery_by_snapshot_create_live() {
    crash_recovery(true, &["snapshot-create-as", "vm", "s1", "--disk-only"]);
}

/// An intent whose operation still runs in another process (it holds the
/// domain's operation lock) is left alone by readers, and a second
/// operation waits for the lock; once the holder is gone, the next call
/// recovers it.
#[test]
fn intent_of_a_running_operation_is_not_recovered() {
    let env = TestEnv::new();
    let vm = Vm::new(&env, Vdb::None, false);
    vm.ext_snapshot("s1");
    let o1 = overlay(&env, "s1", "vda");
    let stray = env.path("top.s2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", s(&o1), "-F", "qcow2", s(&stray)]);
    write_intent(&env, &[&stray]);

    let holder = hold_domain_lock(&env, "vm", "operation");
    assert_eq!(names(&env, &[]), ["s1"]);
    assert!(stray.exists(), "a reader recovered an operation that is still running");
    let mut waiting = std::process::Command::new(env!("CARGO_BIN_EXE_strata-test-cli"))
        .args(["-c", &env.uri, "snapshot-create-as", "vm", "s3", "--disk-only"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn strata");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(waiting.try_wait().expect("try_wait").is_none(), "a second operation did not wait for the first");
    assert!(stray.exists());

    drop(holder);
    assert!(waiting.wait().expect("wait").success());
    assert!(!stray.exists(), "the interrupted creation was not rolled back once its process was gone");
    assert_eq!(names(&env, &[]), ["s1", "s3"]);
    assert_eq!(active(&env, "vda"), env.path("top.s3"));
    assert!(vm.reads(&vm.reference));
}

/// A checkpoint with external memory (`--memspec`): disks and RAM of one
/// instant; reverting restarts QEMU from the saved state on a new overlay,
/// and the guest reads the disk as it was (virsh 9.0 cannot revert it).
#[test]
fn external_memory_checkpoint_create_and_revert() {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::None, true);
    let _guard = vm.guard();
    vm.write(0x51, 3 * MIB, 64 * 1024);
    let at_m1 = vm.snap_ref();
    let state = env.path("m1.state");
    let spec = format!("file={},snapshot=external", s(&state));
    assert_eq!(env.ok(&["snapshot-create-as", "vm", "m1", "--memspec", &spec]), "Domain snapshot m1 created\n");
    assert!(std::fs::metadata(&state).expect("memory file").len() > 0);
    assert_eq!(domstate(&env), "running", "the guest runs on after the checkpoint");
    let def = snapshot_def(&env, "m1");
    let mem = def.memory.clone().expect("memory element");
    assert_eq!((mem.snapshot.as_str(), mem.file.as_deref()), ("external", Some(s(&state))));
    assert_eq!(def.state.as_deref(), Some("running"));
    validate_xml(&snapshot_xml(&env, "m1"));
    let m1_overlay = overlay(&env, "m1", "vda");
    assert_eq!(active(&env, "vda"), m1_overlay);

    vm.write(0x52, 3 * MIB, 64 * 1024);
    assert!(!vm.reads(&at_m1));
    assert_eq!(env.ok(&["snapshot-revert", "vm", "m1"]), "Domain snapshot m1 reverted\n");
    assert_eq!(domstate(&env), "running");
    let branch = active(&env, "vda");
    assert_ne!(branch, m1_overlay, "revert made a new overlay");
    assert_eq!(chain_files(&branch)[1], s(&vm.top), "the overlay is on the frozen image");
    assert!(vm.reads(&at_m1), "after revert the guest reads the disk of the checkpoint");

    // Shut off, a memory checkpoint is refused clearly.
    vm.destroy();
    let spec2 = format!("file={},snapshot=external", s(&env.path("m2.state")));
    let err = env.fails(&["snapshot-create-as", "vm", "m2", "--memspec", &spec2]);
    assert!(err.contains("domain is not running"), "{err}");
    assert!(!env.path("m2.state").exists());
}

/// `snapshot-create-as` killed (SIGKILL) at each of its steps: the next
/// command either rolls the creation back (nothing changed yet in a chain)
/// or finishes it (the disks already use the overlay), and in both cases
/// images, chain records and snapshot records agree, the data is intact
/// and no process is left.
fn killed_at_each_step(live: bool) {
    // Offline, an overlay made but not yet recorded in any chain is not
    // in use, so the creation is rolled back at the images step too.
    let steps: &[(&str, bool)] = &[
        ("snapshot-create:intent", false),
        ("snapshot-create:overlays", false),
        ("snapshot-create:images", live),
        ("snapshot-create:chains", true),
        ("snapshot-create:record", true),
    ];
    for (step, finished) in steps {
        let env = TestEnv::new();
        let vm = Vm::new(&env, Vdb::None, live);
        let _guard = vm.guard();
        killed_at(&env, &["snapshot-create-as", "vm", "s1", "--disk-only", "--atomic"], step);
        assert_creation_settled(&env, &vm, *finished, step);
    }
}

/// What an interrupted `snapshot-create-as vm s1 --disk-only` leaves once
/// the next command recovered it: finished (the record, current, vda on
/// top.s1 in the definition and on disk) or rolled back (no record, no
/// overlay, vda on its old top); either way the images agree with the
/// records, the disk reads its data, and snapshots go on working.
fn assert_creation_settled(env: &TestEnv, vm: &Vm, finished: bool, when: &str) {
    let listed = env.ok(&["snapshot-list", "vm", "--name"]);
    assert_recovered(env, when);
    let overlay_path = env.path("top.s1");
    let inactive = env.ok(&["dumpxml", "vm", "--inactive"]);
    if finished {
        assert_eq!(listed.trim(), "s1", "{when}: the snapshot was not finished");
        assert_eq!(current_name(env), "s1", "{when}");
        assert_eq!(active(env, "vda"), overlay_path, "{when}");
        assert_eq!(xml_chain(&inactive, "vda"), strs(&[&overlay_path, &vm.top, &vm.base]), "{when}");
        assert_eq!(chain_files(&overlay_path), strs(&[&overlay_path, &vm.top, &vm.base]), "{when}");
    } else {
        assert!(listed.trim().is_empty(), "{when}: a record survived a rolled-back creation");
        assert!(!overlay_path.exists(), "{when}: the overlay was left behind");
        assert_eq!(active(env, "vda"), vm.top, "{when}");
        assert_eq!(xml_chain(&inactive, "vda"), strs(&[&vm.top, &vm.base]), "{when}");
    }
    assert!(vm.reads(&vm.reference), "{when}: the disk no longer reads its data");
    // A live creation stages its records while QEMU works; killed before
    // publishing them, it leaves their temporary files to the next command.
    let dir = env.state_root().join("domains").join("vm");
    for d in [dir.join("snapshots"), dir] {
        let left: Vec<String> = std::fs::read_dir(&d)
            .map(|entries| entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        assert!(!left.iter().any(|n| n.contains(".staged.")), "{when}: staged files left in {}: {left:?}", d.display());
    }
    vm.ext_snapshot("s2");
    assert_eq!(active(env, "vda"), env.path("top.s2"), "{when}");
}

#[test]
fn killed_at_each_step_live() {
    killed_at_each_step(true);
}

#[test]
fn killed_at_each_step_offline() {
    killed_at_each_step(false);
}

/// After the images changed, the chains (domain.xml, status.xml), the
/// record and the current mark are renamed into place with one directory
/// fsync per directory after the last rename, and only then is the intent
/// cleared. A crash of the machine before those fsyncs may lose any of the
/// renames; the intent redoes what was lost. Played here: strata killed
/// after the renames and before the directory fsyncs, then the renames in
/// `lost` undone (the file as it was when the images changed; the record
/// removed). Whatever is lost, the next command leaves a consistent
/// domain: the snapshot finished (when QEMU runs the overlay, or the
/// record survived), or rolled back (offline, nothing of it survived).
fn renames_lost_before_the_directory_fsyncs(live: bool, lost: &[&str]) {
    let env = TestEnv::new();
    let vm = Vm::new(&env, Vdb::None, live);
    let _guard = vm.guard();
    let dir = env.state_root().join("domains").join("vm");
    let record = dir.join("snapshots").join("s1.xml");
    let args = ["snapshot-create-as", "vm", "s1", "--disk-only", "--atomic"];
    let crash = [("STRATA_CRASH_AT", "snapshot-create:published")];
    let paused = Background::spawn_paused_at_with(&env, &args, "snapshot-create:images", &crash)
        .unwrap_or_else(|out| panic!("ended before the images changed: {}", String::from_utf8_lossy(&out.stderr)));
    let before: Vec<(PathBuf, Option<Vec<u8>>)> =
        lost.iter().filter(|f| **f != "record").map(|f| (dir.join(f), std::fs::read(dir.join(f)).ok())).collect();
    paused.resume();
    let out = paused.finish(std::time::Duration::from_secs(120));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(record.exists(), "strata was killed before it saved the record");
    for (path, content) in &before {
        match content {
            Some(content) => std::fs::write(path, content).expect("undo a rename"),
            None => std::fs::remove_file(path).expect("undo a rename"),
        }
    }
    if lost.contains(&"record") {
        std::fs::remove_file(&record).expect("undo the record's rename");
    }

    // Finished when QEMU runs the overlay or the record survived.
    let finished = live || !lost.contains(&"record");
    assert_creation_settled(&env, &vm, finished, &format!("lost {lost:?}"));
}

/// What a live snapshot syncs, as strace sees it: every file is fsynced
/// before the rename that publishes it; after the images changed, the
/// chains, the record and the current mark are renamed first and their
/// two directories (the domain's and its snapshots') fsynced once each,
/// after the last of those renames and before the intent is removed; the
/// removal is synced too.
#[test]
fn a_live_snapshot_syncs_each_directory_once_before_the_intent_goes() {
    let env = TestEnv::new();
    let vm = Vm::new(&env, Vdb::None, true);
    let _guard = vm.guard();
    let log = env.path("sync.strace");
    let cli = env.command(&["snapshot-create-as", "vm", "s1", "--disk-only", "--atomic"]);
    let mut traced = std::process::Command::new("strace");
    traced.args(["-f", "-qq", "-y", "-e", "trace=fsync,rename,unlink", "-o", s(&log)]).arg(cli.get_program());
    traced.args(cli.get_args()).env_remove("STRATA_LOG");
    let out = traced.output().expect("run strata under strace (install strace: .ci/install-deps)");
    assert!(out.status.success(), "snapshot failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(active(&env, "vda"), env.path("top.s1"));

    let trace = std::fs::read_to_string(&log).expect("strace log");
    // The records are staged on another thread: its calls' lines are
    // joined again (see `strace_calls`).
    let calls = common::strace_calls(&trace);
    let synced = |file: &str, before: usize| calls[..before].iter().any(|(c, p, _)| *c == "fsync" && *p == file);
    for (i, (call, from, to)) in calls.iter().enumerate() {
        if *call == "rename" {
            assert!(synced(from, i), "{to} was renamed into place before its file was fsynced:\n{trace}");
        }
    }
    let dir = env.state_root().join("domains").join("vm");
    let snapshots = dir.join("snapshots");
    let renamed_to = |file: &Path| calls.iter().rposition(|(c, _, to)| *c == "rename" && *to == s(file));
    let published: Vec<usize> = ["domain.xml", "status.xml", "snapshot-current"]
        .iter()
        .map(|f| renamed_to(&dir.join(f)).unwrap_or_else(|| panic!("{f} was not written:\n{trace}")))
        .chain(renamed_to(&snapshots.join("s1.xml")))
        .collect();
    let first = published.iter().min().copied().unwrap_or_default();
    let last = published.iter().max().copied().unwrap_or_default();
    assert_eq!(published.len(), 4, "the record was not written:\n{trace}");
    let intent = dir.join("snapshot-intent.xml");
    let removed = calls
        .iter()
        .position(|(c, p, _)| *c == "unlink" && *p == s(&intent))
        .unwrap_or_else(|| panic!("the intent was not removed:\n{trace}"));
    assert!(removed > last, "the intent was removed before the chains and the record were renamed:\n{trace}");
    for d in [&dir, &snapshots] {
        let syncs: Vec<usize> = (first..removed).filter(|i| calls[*i].0 == "fsync" && calls[*i].1 == s(d)).collect();
        assert_eq!(
            syncs.len(),
            1,
            "{} was fsynced {} times between the first rename and the intent's removal:\n{trace}",
            d.display(),
            syncs.len()
        );
        assert!(syncs[0] > last, "{} was fsynced before the last rename:\n{trace}", d.display());
    }
    assert!(
        calls[removed..].iter().any(|(c, p, _)| *c == "fsync" && *p == s(&dir)),
        "the intent's removal was not synced:\n{trace}"
    );
}

/// A live snapshot's new status is written and synced under a temporary
/// name while QEMU switches, and renamed into place afterwards only if
/// the status is still the one it was made from. Here another command
/// changes the status in between (`qemu-monitor-command` records its
/// taint without the snapshot's operation lock): the staged status is
/// dropped, and the chain is recorded over the changed status, so neither
/// the taint nor the new overlay is lost.
#[test]
fn a_status_changed_during_a_live_snapshot_keeps_the_change_and_gets_the_chain() {
    let env = TestEnv::new();
    let vm = Vm::new(&env, Vdb::None, true);
    let _guard = vm.guard();
    let dir = env.state_root().join("domains").join("vm");
    let staged = || {
        std::fs::read_dir(&dir)
            .expect("list the domain's directory")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(".status.xml.staged."))
            .count()
    };
    let args = ["snapshot-create-as", "vm", "s1", "--disk-only", "--atomic"];
    let paused = Background::spawn_paused_at(&env, &args, "snapshot-create:images")
        .unwrap_or_else(|out| panic!("ended before the images changed: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(staged(), 1, "the new status was not staged while QEMU switched");
    let status = || std::fs::read_to_string(dir.join("status.xml")).expect("read status.xml");
    assert!(!status().contains(s(&env.path("top.s1"))), "the status named the overlay before the switch was recorded");
    env.ok(&["qemu-monitor-command", "vm", r#"{"execute":"query-status"}"#]);
    assert!(status().contains("custom-monitor"), "qemu-monitor-command did not taint the status");

    paused.resume();
    let out = paused.finish(std::time::Duration::from_secs(120));
    assert!(out.status.success(), "snapshot failed: {}", String::from_utf8_lossy(&out.stderr));
    let after = status();
    assert!(after.contains("custom-monitor"), "the snapshot dropped the taint recorded meanwhile:\n{after}");
    assert!(after.contains(s(&env.path("top.s1"))), "the new overlay is not in the status:\n{after}");
    assert_eq!(active(&env, "vda"), env.path("top.s1"));
    assert_eq!(staged(), 0, "a staged status was left behind");
}

#[test]
fn a_live_snapshot_switches_only_once_its_overlays_are_in() {
    let env = TestEnv::new();
    let vm = Vm::new(&env, Vdb::None, true);
    let _guard = vm.guard();
    let overlay = env.path("top.s1");
    let args = ["snapshot-create-as", "vm", "s1", "--disk-only", "--atomic"];
    // Paused with the overlay's nodes added and the switch held on the
    // monitor (QEMU has read all of it but its last bytes).
    let paused = Background::spawn_paused_at(&env, &args, "snapshot-create:overlays")
        .unwrap_or_else(|out| panic!("ended before the switch: {}", String::from_utf8_lossy(&out.stderr)));
    let nodes =
        env.ok(&["qemu-monitor-command", "vm", r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#]);
    assert!(nodes.contains(s(&overlay)), "the overlay's nodes were not added before the switch:\n{nodes}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let devices = env.ok(&["qemu-monitor-command", "vm", r#"{"execute":"query-block"}"#]);
    assert!(devices.contains(s(&vm.top)), "the disk is not on its old top:\n{devices}");
    assert!(!devices.contains(s(&overlay)), "the disk switched before the snapshot let it:\n{devices}");

    paused.resume();
    let out = paused.finish(std::time::Duration::from_secs(120));
    assert!(out.status.success(), "snapshot failed: {}", String::from_utf8_lossy(&out.stderr));
    let devices = env.ok(&["qemu-monitor-command", "vm", r#"{"execute":"query-block"}"#]);
    assert!(devices.contains(s(&overlay)), "the disk did not switch:\n{devices}");
    assert_eq!(active(&env, "vda"), overlay);
    assert_eq!(chain_files(&overlay), strs(&[&overlay, &vm.top, &vm.base]));
}

#[test]
fn renames_lost_before_the_directory_fsyncs_live() {
    renames_lost_before_the_directory_fsyncs(true, &["domain.xml", "status.xml", "snapshot-current", "record"]);
}

#[test]
fn renames_lost_before_the_directory_fsyncs_offline() {
    // The chains lost, the record kept: finished from the record.
    renames_lost_before_the_directory_fsyncs(false, &["domain.xml"]);
    // Everything lost: rolled back.
    renames_lost_before_the_directory_fsyncs(false, &["domain.xml", "snapshot-current", "record"]);
}

/// A `qemu-img` that takes its time: it waits 2 s on a FIFO nobody writes
/// (bash's `read`, so no child process of its own) before it runs.
fn slow_qemu_img(env: &TestEnv) -> PathBuf {
    let fifo = env.path("hold.fifo");
    let c_path = std::ffi::CString::new(s(&fifo)).expect("no NUL in the path");
    // SAFETY: mkfifo(3) with a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
    let script = env.path("slow-qemu-img");
    std::fs::write(&script, format!("#!/bin/bash\nread -t 2 _ <> {}\nexec qemu-img \"$@\"\n", s(&fifo)))
        .expect("write the script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    script
}

/// Internal snapshot c1 of the shut-off domain.
fn internal_checkpoint(vm: &mut Vm) {
    vm.env.ok(&["snapshot-create-as", "vm", "c1"]);
}

/// An offline snapshot command killed while its `qemu-img` runs (slowed
/// down so that it is still running): the helper dies with the command,
/// so nothing writes after the next command has finished or undone the
/// operation. Creating, reverting to and deleting an internal snapshot
/// (external overlays are written without a helper).
#[test]
fn helpers_die_with_a_killed_command() {
    type Setup = fn(&mut Vm);
    let cases: [(&str, Setup, &[&str]); 3] = [
        ("internal create", |_| {}, &["snapshot-create-as", "vm", "c1"]),
        ("internal revert", internal_checkpoint, &["snapshot-revert", "vm", "c1"]),
        ("internal delete", internal_checkpoint, &["snapshot-delete", "vm", "c1"]),
    ];
    for (case, setup, command) in cases {
        let env = TestEnv::new();
        let mut vm = Vm::new(&env, Vdb::None, false);
        setup(&mut vm);
        let slow = slow_qemu_img(&env);
        common::killed_at_with(&env, command, "helper:spawned", &[("STRATA_QEMU_IMG", &slow)]);
        env.ok(&["snapshot-list", "vm"]);
        assert_recovered(&env, case);
        assert_eq!(Intent::pending(&env), None, "{case}");
    }
}

/// Create, revert and delete killed at random moments in their first
/// 150 ms (a few times each): the next command settles them (no intent is
/// left), no process is left that no record names, `domblkcheck` is clean,
/// the images are free once the domain is off, and vda reads what it read
/// before or, after a revert, what s1 froze.
fn snapshot_commands_killed_at_random_moments(live: bool) {
    let mut revert = vec!["snapshot-revert", "vm", "s1"];
    if live {
        revert.push("--running");
    }
    let commands: [(&str, &[&str]); 3] = [
        ("create", &["snapshot-create-as", "vm", "s3", "--disk-only", "--atomic"]),
        ("revert", &revert),
        ("delete", &["snapshot-delete", "vm", "s1"]),
    ];
    for (what, args) in commands {
        for kill in Kill::random(2, std::time::Duration::from_millis(150)) {
            let when = format!("{what} killed {kill:?}");
            let env = TestEnv::new();
            let mut vm = Vm::new(&env, Vdb::None, live);
            let _guard = vm.guard();
            let (at_s1, _, now) = two_snapshots(&mut vm);
            kill.run(&env, args);
            let listed = env.strata(&["snapshot-list", "vm"]);
            assert!(listed.status.success(), "{when}: {listed:?}");
            assert_recovered(&env, &when);
            assert_eq!(Intent::pending(&env), None, "{when}: {}", String::from_utf8_lossy(&listed.stderr));
            if live && domstate(&env) == "shut off" {
                vm.start(); // a revert killed while it started QEMU again
            }
            assert!(vm.reads(&now) || (what == "revert" && vm.reads(&at_s1)), "{when}: vda reads other data");
        }
    }
}

#[test]
fn snapshot_commands_killed_at_random_moments_live() {
    snapshot_commands_killed_at_random_moments(true);
}

#[test]
fn snapshot_commands_killed_at_random_moments_offline() {
    snapshot_commands_killed_at_random_moments(false);
}

/// A live domain with two snapshots; `before` runs on it, then `strata
/// ARGS…` paused at `step` while its QEMU is killed, as a crash or a
/// killed revert that had told it to stop would end it: the command goes
/// on and leaves the revert to s1 done, with QEMU running again on s1's
/// branch and no intent left.
fn revert_done_though_qemu_exits_at(args: &[&str], step: &str, before: impl FnOnce(&TestEnv)) {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::None, true);
    let _guard = vm.guard();
    let (at_s1, _, _) = two_snapshots(&mut vm);
    before(&env);
    let paused = Background::spawn_paused_at(&env, args, step)
        .unwrap_or_else(|out| panic!("strata {args:?} ended before {step}: {out:?}"));
    kill_qemu(&env, "vm");
    paused.resume();
    let out = paused.finish(std::time::Duration::from_secs(120));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(Intent::pending(&env), None, "{}", String::from_utf8_lossy(&out.stderr));
    assert_recovered(&env, step);
    let branch = PathBuf::from(format!("{}.branch1", overlay(&env, "s1", "vda").display()));
    assert_eq!(current_name(&env), "s1");
    assert_eq!(active(&env, "vda"), branch);
    assert_eq!(domstate(&env), "running");
    assert!(vm.reads(&at_s1), "vda does not read what s1 froze");
}

/// A `snapshot-revert --running` killed once its intent is written, whose
/// QEMU exits after the next reader found it running and before that
/// reader cleared its snapshot jobs: the reader finishes the revert anyway
/// instead of only warning that the domain is not running and leaving the
/// intent.
#[test]
fn a_reader_finishes_a_revert_whose_qemu_exits_under_it() {
    revert_done_though_qemu_exits_at(&["snapshot-list", "vm"], "snapshot-recover:settle-jobs", |env| {
        killed_at(env, &["snapshot-revert", "vm", "s1", "--running"], "snapshot-revert:intent");
        assert!(Intent::pending(env).is_some(), "the killed revert left no intent");
    });
}

/// A `snapshot-revert --running` whose QEMU exits after the revert found it
/// running and before the revert stopped it: the revert goes on, as it
/// would have on a domain it found shut off.
#[test]
fn a_revert_whose_qemu_exits_before_it_stops_it_goes_on() {
    revert_done_though_qemu_exits_at(&["snapshot-revert", "vm", "s1", "--running"], "snapshot-revert:intent", |_| {});
}

/// `snapshot-revert` to an external snapshot with a child, killed at each
/// step: the next command finishes the revert (redoing it when the new
/// definition was not adopted yet) with exactly one branch overlay, the
/// state asked for, every other image untouched and no process left. A
/// kill while QEMU was started again on the adopted definition leaves the
/// revert done, and the QEMU stopped when it was not up yet (shut off) or
/// kept when it was (paused: it was not yet resumed).
fn revert_killed_at_each_step(live: bool) {
    let mut steps = vec!["snapshot-revert:intent", "snapshot-revert:overlays", "snapshot-revert:adopted"];
    if live {
        steps.extend(SERVER_STEPS);
    }
    for step in steps {
        let state = match step {
            "server:started" => "paused",
            _ if SERVER_STEPS.contains(&step) || !live => "shut off",
            _ => "running",
        };
        let env = TestEnv::new();
        let mut vm = Vm::new(&env, Vdb::None, live);
        let _guard = vm.guard();
        let (at_s1, at_s2, abandoned) = two_snapshots(&mut vm);
        let (o1, o2) = (overlay(&env, "s1", "vda"), overlay(&env, "s2", "vda"));

        let mut args = vec!["snapshot-revert", "vm", "s1"];
        if live {
            args.push("--running");
        }
        killed_at(&env, &args, step);
        env.ok(&["snapshot-list", "vm"]);
        assert_recovered(&env, step);

        let branch = PathBuf::from(format!("{}.branch1", o1.display()));
        assert_eq!(current_name(&env), "s1", "{step}");
        assert_eq!(active(&env, "vda"), branch, "{step}");
        assert!(!PathBuf::from(format!("{}.branch2", o1.display())).exists(), "{step}: a second branch overlay");
        assert_eq!(chain_files(&branch), strs(&[&branch, &vm.top, &vm.base]), "{step}");
        let inactive = env.ok(&["dumpxml", "vm", "--inactive"]);
        assert_eq!(xml_chain(&inactive, "vda"), strs(&[&branch, &vm.top, &vm.base]), "{step}");
        assert_eq!(domstate(&env), state, "{step}");
        if live && state == "shut off" {
            vm.start();
        }
        assert!(vm.reads(&at_s1), "{step}: the disk does not read what it read at s1");
        vm.destroy();
        common::assert_images_writable(&env, step);
        assert!(same(&o1, &at_s2), "{step}: s2's frozen image changed");
        assert!(same(&o2, &abandoned), "{step}: the abandoned state changed");
        assert_eq!(Intent::pending(&env), None, "{step}");
    }
}

#[test]
fn revert_killed_at_each_step_live() {
    revert_killed_at_each_step(true);
}

#[test]
fn revert_killed_at_each_step_offline() {
    revert_killed_at_each_step(false);
}

/// A live revert of an internal checkpoint (snapshot-load in the running
/// QEMU) killed after its intent: the next command loads the checkpoint.
#[test]
fn internal_revert_killed_live() {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::None, true);
    let _guard = vm.guard();
    vm.write(0xc1, 2 * MIB, 64 * 1024);
    let at_c1 = vm.snap_ref();
    env.ok(&["snapshot-create-as", "vm", "c1"]);
    vm.write(0xc2, 2 * MIB, 64 * 1024);
    assert!(!vm.reads(&at_c1));
    killed_at(&env, &["snapshot-revert", "vm", "c1"], "snapshot-revert:intent");
    env.ok(&["snapshot-list", "vm"]);
    assert_eq!(domstate(&env), "running");
    assert!(vm.reads(&at_c1), "the checkpoint was not loaded");
    assert_eq!(current_name(&env), "c1");
    // QEMU's job list is clean: another checkpoint and revert work.
    env.ok(&["snapshot-create-as", "vm", "c2"]);
    env.ok(&["snapshot-revert", "vm", "c1"]);
    assert!(vm.reads(&at_c1));
}

/// What the test checks of the intent file: whether one is pending.
struct Intent;

impl Intent {
    fn pending(env: &TestEnv) -> Option<String> {
        let path = env.state_root().join("domains").join("vm").join("snapshot-intent.xml");
        std::fs::read_to_string(path).ok().filter(|t| !t.trim().is_empty())
    }
}

/// Which delete the kill test runs.
#[derive(Clone, Copy, Debug)]
enum DeleteCase {
    /// s2 between s1 and s3: its overlay is committed (method 1).
    Middle,
    /// s1 with two children (s2, and s3 after a revert): pulled into both
    /// (method 2).
    MultiChild,
}

/// `snapshot-delete` killed at each step, for method 1 and method 2, live
/// and offline, including the steps of its block jobs (and offline, of the
/// storage daemon that runs them): the next command resumes the recorded
/// plan (a block job the dead process left is waited for), and afterwards
/// every remaining snapshot and the current state read what they read
/// before, and no process is left.
fn delete_killed_at_each_step(live: bool, case: DeleteCase) {
    let plan_steps: &[&str] = match case {
        DeleteCase::Middle => &[
            "snapshot-delete:intent",
            "snapshot-delete:planned",
            "snapshot-delete:job",
            "snapshot-delete:merged",
            "snapshot-delete:images",
            "snapshot-delete:records",
        ],
        DeleteCase::MultiChild => &[
            "snapshot-delete:intent",
            "snapshot-delete:planned",
            "snapshot-delete:job",
            "snapshot-delete:pulled",
            "snapshot-delete:images",
            "snapshot-delete:records",
        ],
    };
    let mut steps = plan_steps.to_vec();
    steps.extend(JOB_STEPS);
    if !live {
        steps.extend(SERVER_STEPS);
    }
    for step in steps {
        let env = TestEnv::new();
        let mut vm = Vm::new(&env, Vdb::None, live);
        let _guard = vm.guard();
        let ThreeSnapshots { at_s1, at_s2, after_s2, at_s3, now } =
            three_snapshots(&env, &mut vm, matches!(case, DeleteCase::MultiChild));
        let o2 = overlay(&env, "s2", "vda");
        let victim = match case {
            DeleteCase::Middle => "s2",
            DeleteCase::MultiChild => "s1",
        };

        killed_at(&env, &["snapshot-delete", "vm", victim], step);
        env.ok(&["snapshot-list", "vm"]);
        assert_recovered(&env, &format!("{case:?} {step}"));
        assert_eq!(Intent::pending(&env), None, "{case:?} {step}: the intent was not settled");
        assert!(env.fails(&["snapshot-info", "vm", victim]).contains("no domain snapshot"), "{case:?} {step}");
        assert!(vm.reads(&now), "{case:?} {step}: the current state changed");
        let inactive = env.ok(&["dumpxml", "vm", "--inactive"]);
        assert_eq!(xml_chain(&inactive, "vda"), chain_files(&active(&env, "vda")), "{case:?} {step}");
        assert_eq!(current_name(&env), "s3", "{case:?} {step}");
        match case {
            DeleteCase::Middle => {
                assert_eq!(names(&env, &[]), ["s1", "s3"], "{step}");
                assert_eq!(parent_of(&env, "s3"), "s1", "{step}");
                assert!(!o2.exists(), "{step}: the merged overlay is left");
            }
            DeleteCase::MultiChild => {
                assert_eq!(names(&env, &["--roots"]), ["s2", "s3"], "{step}");
            }
        }
        vm.destroy();
        common::assert_images_writable(&env, step);
        if let DeleteCase::Middle = case {
            assert!(same(&frozen(&env, "s1", "vda"), &at_s1), "{step}: s1's frozen image changed");
        } else {
            assert!(same(&frozen(&env, "s2", "vda"), &at_s2), "{step}: s2's frozen image changed");
            assert!(same(&overlay(&env, "s2", "vda"), &after_s2), "{step}: s2's overlay changed");
        }
        assert!(same(&frozen(&env, "s3", "vda"), &at_s3), "{case:?} {step}: s3's frozen image changed");
        assert!(same(&overlay(&env, "s3", "vda"), &now), "{case:?} {step}: s3's overlay changed");
    }
}

#[test]
fn delete_method1_killed_at_each_step_live() {
    delete_killed_at_each_step(true, DeleteCase::Middle);
}

#[test]
fn delete_method1_killed_at_each_step_offline() {
    delete_killed_at_each_step(false, DeleteCase::Middle);
}

#[test]
fn delete_method2_killed_at_each_step_live() {
    delete_killed_at_each_step(true, DeleteCase::MultiChild);
}

#[test]
fn delete_method2_killed_at_each_step_offline() {
    delete_killed_at_each_step(false, DeleteCase::MultiChild);
}

/// A user's `blockpull` flattens vda onto s2's overlay, so s1's overlay
/// leaves the running chain while s2's record still froze it. Deleting s1
/// must merge that overlay into s1's frozen image before s2's record is
/// pointed there (before, the overlay was removed unmerged, and reverting
/// to s2 gave other data).
#[test]
fn delete_after_a_user_pull_keeps_what_later_snapshots_froze() {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::None, true);
    let _guard = vm.guard();
    let (_, at_s2, after_s2) = two_snapshots(&mut vm);
    let (o1, o2) = (overlay(&env, "s1", "vda"), overlay(&env, "s2", "vda"));
    env.ok(&["blockpull", "vm", "vda", "--wait"]);
    assert_eq!(chain_files(&active(&env, "vda")), strs(&[&o2]));
    let out = env.ok(&["snapshot-delete", "vm", "s1"]);
    assert!(out.ends_with("Domain snapshot s1 deleted\n"), "{out}");
    assert!(!o1.exists(), "s1's overlay is left");
    assert_eq!(frozen(&env, "s2", "vda"), vm.top);
    assert!(vm.reads(&after_s2), "the current state changed");
    vm.destroy();
    env.ok(&["snapshot-revert", "vm", "s2"]);
    assert!(same(&active(&env, "vda"), &at_s2), "s2 no longer reverts to what it froze");
}

/// A user's active commit with pivot (told that it may change snapshots)
/// merges both overlays into the image s1 froze, and the guest writes on. s1's overlay can then be neither merged
/// again (that would overwrite newer data) nor dropped (s2's overlay still
/// reads through it): the delete is refused, changes nothing, and leaves
/// no pending operation; `--metadata` still removes the record.
#[test]
fn delete_refuses_an_overlay_merged_behind_its_back() {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::None, true);
    let _guard = vm.guard();
    two_snapshots(&mut vm);
    let (o1, o2) = (overlay(&env, "s1", "vda"), overlay(&env, "s2", "vda"));
    let out = env.ok(&[
        "blockcommit",
        "vm",
        "vda",
        "--active",
        "--pivot",
        "--base",
        "vda[2]",
        "--wait",
        "--allow-snapshot-change",
    ]);
    assert_eq!(out.trim(), "Successfully pivoted");
    assert_eq!(active(&env, "vda"), vm.top);
    vm.write(0xe1, 5 * MIB, 64 * 1024);
    let now = vm.snap_ref();
    let err = env.fails(&["snapshot-delete", "vm", "s1"]);
    assert!(err.contains("cannot delete snapshot 's1' on vda") && err.contains("--metadata"), "{err}");
    assert!(o1.exists() && o2.exists(), "a refused delete removed a file");
    assert_eq!(names(&env, &[]), ["s1", "s2"]);
    assert_eq!(Intent::pending(&env), None, "the refusal left an intent");
    assert!(vm.reads(&now), "the refusal changed the guest's data");
    env.ok(&["snapshot-delete", "vm", "s1", "--metadata"]);
    assert_eq!(names(&env, &[]), ["s2"]);
    assert!(vm.reads(&now));
}

/// `--reuse-external` with an image the domain or a snapshot reads (its
/// own backing file, its active image, a snapshot's frozen image), or one
/// file for two disks, is refused before anything changes: the guest would
/// otherwise write into an image others read.
fn reused_overlay_in_use_is_refused(live: bool) {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::Qcow2, live);
    let _guard = vm.guard();
    vm.write(0xc1, MIB, 64 * 1024);
    vm.ext_snapshot("s1");
    let frozen_s1 = frozen(&env, "s1", "vda");
    let before = chain_files(&active(&env, "vda"));
    let now = vm.snap_ref();
    for (image, what) in [(&vm.base, "backing"), (&active(&env, "vda"), "active"), (&frozen_s1, "frozen")] {
        let spec = format!("vda,file={}", s(image));
        let err = env.fails(&[
            "snapshot-create-as",
            "vm",
            "r",
            "--disk-only",
            "--reuse-external",
            "--diskspec",
            &spec,
            "--diskspec",
            "vdb,snapshot=no",
        ]);
        assert!(err.contains("is an image the domain or one of its snapshots uses"), "{what}: {err}");
    }
    let shared = env.path("shared.qcow2");
    let err = env.fails(&[
        "snapshot-create-as",
        "vm",
        "r",
        "--disk-only",
        "--diskspec",
        &format!("vda,file={}", s(&shared)),
        "--diskspec",
        &format!("vdb,file={}", s(&shared)),
    ]);
    assert!(err.contains("is given for more than one disk"), "{err}");
    assert!(!shared.exists(), "a refused snapshot created its file");
    assert_eq!(names(&env, &[]), ["s1"]);
    assert_eq!(chain_files(&active(&env, "vda")), before, "a refusal changed the chain");
    assert!(vm.reads(&now), "a refusal changed the guest's data");
    vm.destroy();
}

#[test]
fn reused_overlay_in_use_is_refused_live() {
    reused_overlay_in_use_is_refused(true);
}

#[test]
fn reused_overlay_in_use_is_refused_offline() {
    reused_overlay_in_use_is_refused(false);
}

/// Starting a block job changes a chain, so it first settles snapshot
/// operations: it waits for one that runs in another process (the test
/// holds the operation lock), and rolls back a creation a crash interrupted
/// before it pulls (before, the interrupted creation stayed pending until
/// the next snapshot command, under a chain the pull had changed).
#[test]
fn a_block_job_settles_snapshot_operations_first() {
    let env = TestEnv::new();
    let vm = Vm::new(&env, Vdb::None, true);
    let _guard = vm.guard();
    killed_at(&env, &["snapshot-create-as", "vm", "s1", "--disk-only", "--atomic"], "snapshot-create:overlays");
    let overlay_path = env.path("top.s1");
    assert!(overlay_path.exists() && Intent::pending(&env).is_some(), "the killed creation left no trace to settle");

    let holder = hold_domain_lock(&env, "vm", "operation");
    let mut pull = std::process::Command::new(env!("CARGO_BIN_EXE_strata-test-cli"))
        .args(["-c", &env.uri, "blockpull", "vm", "vda", "--wait"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn strata");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(pull.try_wait().expect("try_wait").is_none(), "the pull did not wait for the snapshot operation");
    assert!(overlay_path.exists(), "the pull recovered an operation that was still running");

    drop(holder);
    let out = pull.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "Pull complete");
    assert_eq!(Intent::pending(&env), None, "the interrupted creation is still pending");
    assert!(!overlay_path.exists(), "the interrupted creation's overlay is left");
    assert_eq!(names(&env, &[]), Vec::<String>::new());
    assert_eq!(chain_files(&active(&env, "vda")), strs(&[&vm.top]));
    assert!(vm.reads(&vm.reference));
}

/// `undefine` refuses a domain with snapshots, as virsh does, and names the
/// way out; `undefine --snapshots-metadata` removes the definition and the
/// records, and leaves every image.
#[test]
fn undefine_with_snapshots_needs_snapshots_metadata() {
    let env = TestEnv::new();
    let vm = Vm::new(&env, Vdb::None, false);
    vm.ext_snapshot("s1");
    let o1 = overlay(&env, "s1", "vda");
    let err = env.fails(&["undefine", "vm"]);
    assert!(
        err.contains("cannot undefine domain 'vm' with 1 snapshots") && err.contains("--snapshots-metadata"),
        "{err}"
    );
    assert_eq!(names(&env, &[]), ["s1"]);
    let out = env.ok(&["undefine", "vm", "--snapshots-metadata"]);
    assert_eq!(out.trim(), "Domain 'vm' has been undefined");
    assert!(env.fails(&["snapshot-list", "vm"]).contains("vm"));
    assert!(!env.ok(&["list", "--all"]).contains("vm"));
    assert!(o1.exists() && vm.top.exists() && vm.base.exists(), "undefine removed an image");
    assert_eq!(chain_files(&o1), strs(&[&o1, &vm.top, &vm.base]));
}

/// `blockcommit --delete` refuses to remove an image a snapshot froze
/// (the snapshot could no longer be reverted to) and changes nothing; the
/// same commit without `--delete` works, and the snapshot still reverts
/// to what it froze.
#[test]
fn commit_delete_keeps_images_snapshots_use() {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::None, true);
    let _guard = vm.guard();
    vm.write(0xa1, 2 * MIB, 64 * 1024);
    let at_s1 = vm.snap_ref();
    vm.ext_snapshot("s1");
    vm.write(0xa2, 3 * MIB, 64 * 1024);
    let o1 = overlay(&env, "s1", "vda");
    let commit = ["blockcommit", "vm", "vda", "--top", "vda[1]", "--base", "vda[2]", "--wait"];
    let err = env.fails(&[&commit[..], &["--delete"]].concat());
    assert!(err.contains(&format!("--delete would remove {}, which snapshot 's1' uses", s(&vm.top))), "{err}");
    assert!(vm.top.exists());
    assert_eq!(chain_files(&active(&env, "vda")), strs(&[&o1, &vm.top, &vm.base]));
    assert_eq!(env.ok(&commit).trim(), "Commit complete");
    assert_eq!(chain_files(&active(&env, "vda")), strs(&[&o1, &vm.base]));
    vm.destroy();
    env.ok(&["snapshot-revert", "vm", "s1"]);
    assert!(same(&active(&env, "vda"), &at_s1), "s1 no longer reverts to what it froze");
}

/// s1 froze top.qcow2 and s2 froze s1's overlay. Committing s1's overlay
/// into top.qcow2 (`--top vda[1]`) would change what s1 reverts to, and an
/// active commit into s1's overlay what s2 reverts to: both are refused,
/// naming only the snapshot that would change and the flag, and change
/// nothing (before, the commit silently changed s1). With
/// `--allow-snapshot-change` the commit runs: the guest's data stays, s1's
/// image changes, and s2, which read through the committed overlay, still
/// reverts to what it froze.
fn commit_into_a_frozen_image_needs_allow_snapshot_change(live: bool) {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::None, live);
    let _guard = vm.guard();
    let (at_s1, at_s2, after_s2) = two_snapshots(&mut vm);
    let (o1, o2) = (overlay(&env, "s1", "vda"), overlay(&env, "s2", "vda"));
    let chain = strs(&[&o2, &o1, &vm.top, &vm.base]);
    assert_eq!(chain_files(&o2), chain);
    assert!(vm.reads(&after_s2), "the writes did not happen");
    assert!(same(&vm.top, &at_s1) && same(&o1, &at_s2), "the frozen images do not hold the writes before them");

    let commit = ["blockcommit", "vm", "vda", "--top", "vda[1]", "--base", "vda[2]", "--wait"];
    let err = env.fails(&commit);
    assert!(
        err.contains(&format!("cannot commit into {}: snapshot 's1' froze it", s(&vm.top)))
            && err.contains("--allow-snapshot-change")
            && !err.contains("'s2'"),
        "{err}"
    );
    let err = env.fails(&["blockcommit", "vm", "vda", "--active", "--pivot", "--base", "vda[1]", "--wait"]);
    assert!(
        err.contains(&format!("cannot commit into {}: snapshot 's2' froze it", s(&o1)))
            && err.contains("--allow-snapshot-change")
            && !err.contains("'s1'"),
        "{err}"
    );
    assert_eq!(chain_files(&active(&env, "vda")), chain, "a refusal changed the chain");
    assert!(same(&vm.top, &at_s1) && same(&o1, &at_s2), "a refusal changed a frozen image");
    assert!(vm.reads(&after_s2), "a refusal changed the guest's data");

    let out = env.ok(&[&commit[..], &["--allow-snapshot-change"]].concat());
    assert_eq!(out.trim(), "Commit complete");
    assert_eq!(chain_files(&active(&env, "vda")), strs(&[&o2, &vm.top, &vm.base]));
    assert!(vm.reads(&after_s2), "the commit changed the guest's data");
    assert!(!same(&vm.top, &at_s1), "the commit did not go into s1's image");
    vm.destroy();
    env.ok(&["snapshot-revert", "vm", "s2"]);
    assert!(same(&active(&env, "vda"), &at_s2), "s2 no longer reverts to what it froze");
}

#[test]
fn commit_into_a_frozen_image_needs_allow_snapshot_change_live() {
    commit_into_a_frozen_image_needs_allow_snapshot_change(true);
}

#[test]
fn commit_into_a_frozen_image_needs_allow_snapshot_change_offline() {
    commit_into_a_frozen_image_needs_allow_snapshot_change(false);
}

/// s1 ← s2 ← s3 ← s4, then a revert to s3 (a branch on s2's overlay), then
/// s2 deleted: s2's overlay is merged into s1's and removed, and every
/// image that read through it — the branch in the running chain and s3's
/// overlay, which s4 froze — is re-pointed at the merged image (before,
/// only the running one was, and s4 could no longer be reverted to).
fn delete_after_a_revert_repoints_every_reader(live: bool) {
    let env = TestEnv::new();
    let mut vm = Vm::new(&env, Vdb::None, live);
    let _guard = vm.guard();
    let mut at = Vec::new();
    for (i, name) in ["s1", "s2", "s3", "s4"].iter().enumerate() {
        vm.write(0xa1 + i as u8, (4 + i as u64) * MIB, 64 * 1024);
        at.push(vm.snap_ref());
        vm.ext_snapshot(name);
    }
    assert!(vm.reads(&at[3]), "the writes did not land");
    let mut revert = vec!["snapshot-revert", "vm", "s3"];
    if live {
        revert.push("--running");
    }
    env.ok(&revert);
    vm.reset_ref(&at[2]);
    assert!(vm.reads(&at[2]), "the revert to s3 does not read s3's data");
    let (o2, o3) = (overlay(&env, "s2", "vda"), overlay(&env, "s3", "vda"));

    let out = env.ok(&["snapshot-delete", "vm", "s2"]);
    assert!(out.ends_with("Domain snapshot s2 deleted\n"), "{out}");
    assert!(!o2.exists(), "s2's overlay is left");
    assert_eq!(chain_files(&o3)[1], overlay(&env, "s1", "vda").display().to_string(), "s3's overlay");
    assert!(vm.reads(&at[2]), "the current state changed");
    env.ok(&["domblkcheck", "vm"]);
    vm.destroy();
    for (name, data) in [("s4", &at[3]), ("s3", &at[2]), ("s1", &at[0])] {
        env.ok(&["snapshot-revert", "vm", name]);
        assert!(same(&active(&env, "vda"), data), "{name} no longer reverts to what it froze");
    }
}

#[test]
fn delete_after_a_revert_repoints_every_reader_live() {
    delete_after_a_revert_repoints_every_reader(true);
}

#[test]
fn delete_after_a_revert_repoints_every_reader_offline() {
    delete_after_a_revert_repoints_every_reader(false);
}

/// An offline external snapshot of a disk on a 5,000-deep chain writes one
/// overlay header without opening the chain (before, `qemu-img create`
/// opened all 5,000 layers, which took minutes). The bound is generous: it
/// catches the cost growing with the chain, not a slow machine.
/// A live snapshot reads the frozen top's header (for the overlay's size)
/// and nothing below it: the chain QEMU runs on comes from the recorded
/// state, so the cost does not grow with depth by opening files. strace
/// records every file the `strata` process (and any child) opens.
#[test]
fn live_snapshot_of_a_deep_chain_opens_only_the_top() {
    let env = TestEnv::new();
    let dir = env.path("deep");
    std::fs::create_dir(&dir).expect("chain directory");
    let layer = |i: usize| dir.join(format!("l{i}.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", s(&layer(0)), "8M"]);
    for i in 1..=DEEP_LIVE {
        let below = layer(i - 1);
        qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", s(&below), "-F", "qcow2", s(&layer(i)), "8M"]);
    }
    let top = layer(DEEP_LIVE);
    env.define("vm", &domain_xml("vm", &[DiskSpec { target: "vda", format: "qcow2", path: &top, extra: "" }]));
    let _guard = DomainGuard { env: &env, name: "vm".into() };
    env.ok(&["start", "vm"]);

    let log = env.path("opened.strace");
    let cli = env.command(&["snapshot-create-as", "vm", "s1", "--disk-only", "--atomic"]);
    let mut traced = std::process::Command::new("strace");
    traced.args(["-f", "-qq", "-e", "trace=open,openat,openat2", "-o", s(&log)]).arg(cli.get_program());
    traced.args(cli.get_args()).env_remove("STRATA_LOG");
    let out = traced.output().expect("run strata under strace (install strace: .ci/install-deps)");
    assert!(out.status.success(), "snapshot failed: {}", String::from_utf8_lossy(&out.stderr));
    let overlay = dir.join(format!("l{DEEP_LIVE}.s1"));
    assert_eq!(active(&env, "vda"), overlay);
    let info = qemu_img(&["info", "-U", "--output=json", s(&overlay)]);
    let info: serde_json::Value = serde_json::from_str(&info).expect("qemu-img json");
    assert_eq!(info["backing-filename"], s(&top));

    let trace = std::fs::read_to_string(&log).expect("strace log");
    let opened: Vec<&str> = trace.lines().filter_map(|l| l.split('"').nth(1)).collect();
    assert!(opened.contains(&s(&overlay)), "strace did not see the overlay created:\n{trace}");
    // The directory itself is opened to sync the new overlay's entry.
    let in_dir = format!("{}/", s(&dir));
    let below: Vec<&&str> =
        opened.iter().filter(|p| p.starts_with(&in_dir) && **p != s(&top) && **p != s(&overlay)).collect();
    assert!(below.is_empty(), "the live snapshot opened images below the top: {below:?}");
}

/// Depth of the chain of the live snapshot test: deep enough that a walk
/// would show, shallow enough for QEMU to open it within strata's start
/// timeout on a loaded machine.
const DEEP_LIVE: usize = 60;

#[test]
fn offline_snapshot_of_a_5000_deep_chain_does_not_open_the_chain() {
    let env = TestEnv::new();
    let dir = env.path("deep");
    std::fs::create_dir(&dir).expect("chain directory");
    let layer = |i: usize| dir.join(format!("l{i}.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", s(&layer(0)), "8M"]);
    for i in 1..=5000 {
        // The test's own chain is built without opening it either, with
        // the header writer `native_overlay_on_a_3_deep_chain_…` checks.
        let below = format!("l{}.qcow2", i - 1);
        strata_core::image::create_qcow2_overlay(&layer(i), &below, ImageFormat::Qcow2, 8 * MIB).expect("overlay");
    }
    let top = layer(5000);
    env.define("vm", &domain_xml("vm", &[DiskSpec { target: "vda", format: "qcow2", path: &top, extra: "" }]));

    // Any qemu-img run by the snapshot would record its arguments here.
    let (shim, calls) = recording_qemu_img(&env);
    let mut snapshot = env.command(&["snapshot-create-as", "vm", "s1", "--disk-only"]);
    snapshot.env("PATH", shim);
    let (out, used) = env.run_with_usage(snapshot, std::time::Duration::from_secs(600));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&calls).unwrap_or_default(), "", "the snapshot ran qemu-img");
    assert!(used.peak_rss < 100 * MIB, "the snapshot's peak RSS was {} MiB", used.peak_rss / MIB);

    let overlay = dir.join("l5000.s1");
    let info = qemu_img(&["info", "-U", "--output=json", s(&overlay)]);
    let info: serde_json::Value = serde_json::from_str(&info).expect("qemu-img json");
    assert_eq!(info["backing-filename"], s(&top));
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_eq!(info["virtual-size"], 8 * MIB);
    // qemu-img check and qemu-io would open all 5,001 layers (for
    // minutes): the 3-deep test checks the same header that way.
    assert_eq!(info["format-specific"]["data"]["corrupt"], false);
    assert_eq!(active(&env, "vda"), overlay);
    env.ok(&["domblkcheck", "vm"]);
}

/// A directory to put first on `PATH` holding a `qemu-img` that appends
/// its arguments to the returned log, one run a line, and runs the real one.
fn recording_qemu_img(env: &TestEnv) -> (std::ffi::OsString, PathBuf) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let real = std::env::split_paths(&path)
        .map(|dir| dir.join("qemu-img"))
        .find(|tool| tool.is_file())
        .expect("qemu-img must be installed for this test");
    let bin = env.path("shim-bin");
    let calls = env.path("qemu-img.calls");
    std::fs::create_dir(&bin).expect("shim directory");
    let script = format!("#!/bin/sh\necho \"$*\" >> '{}'\nexec '{}' \"$@\"\n", s(&calls), s(&real));
    let shim = bin.join("qemu-img");
    std::fs::write(&shim, script).expect("write shim");
    std::fs::set_permissions(&shim, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod shim");
    let mut dirs = vec![bin];
    dirs.extend(std::env::split_paths(&path));
    (std::env::join_paths(dirs).expect("PATH"), calls)
}

/// An offline snapshot's overlay on a 3-deep chain, written natively, is
/// what `qemu-img create -b TOP -F qcow2` makes: the same `qemu-img info`
/// (format, size, cluster size, backing name and format, compat, lazy
/// refcounts, refcount bits, corrupt bit, extended L2, compression), a
/// clean `qemu-img check`, and the same data: every layer's pattern reads
/// through both overlays, and `qemu-img compare` finds them equal.
#[test]
fn native_overlay_on_a_3_deep_chain_matches_qemu_img_create() {
    let env = TestEnv::new();
    let chain = make_chain(env.dir.path(), &["base.qcow2", "mid.qcow2", "top.qcow2"]);
    let top = &chain[2];
    env.define("vm", &domain_xml("vm", &[DiskSpec { target: "vda", format: "qcow2", path: top, extra: "" }]));
    env.ok(&["snapshot-create-as", "vm", "s1", "--disk-only"]);
    let native = env.path("top.s1");
    assert_eq!(active(&env, "vda"), native);
    let tool = env.path("tool.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", s(top), "-F", "qcow2", s(&tool)]);

    let info = |image: &Path| -> serde_json::Value {
        let json = qemu_img(&["info", "-U", "--output=json", s(image)]);
        serde_json::from_str(&json).expect("qemu-img json")
    };
    let (native_info, tool_info) = (info(&native), info(&tool));
    for field in ["format", "virtual-size", "cluster-size", "backing-filename", "backing-filename-format", "dirty-flag"]
    {
        assert_eq!(native_info[field], tool_info[field], "{field}");
    }
    assert_eq!(native_info["backing-filename"], s(top));
    assert_eq!(native_info["virtual-size"], 64 * MIB);
    let (native_spec, tool_spec) = (&native_info["format-specific"]["data"], &tool_info["format-specific"]["data"]);
    for field in ["compat", "lazy-refcounts", "refcount-bits", "corrupt", "extended-l2", "compression-type"] {
        assert_eq!(native_spec[field], tool_spec[field], "{field}");
    }
    assert_eq!(native_spec["compat"], "1.1");
    assert_eq!(native_spec["lazy-refcounts"], false);
    let chain_of =
        |image: &Path| -> Vec<String> { qemu_chain(image).into_iter().skip(1).map(|(file, _)| file).collect() };
    assert_eq!(chain_of(&native), chain_of(&tool));
    qemu_img(&["check", "-q", s(&native)]);
    for (layer, pattern) in ["0x11", "0x22", "0x33"].iter().enumerate() {
        let read = format!("read -P {pattern} {layer}M 1M");
        for image in [&native, &tool] {
            qemu_io(&["-r", "-f", "qcow2", "-c", &read, s(image)]);
        }
    }
    qemu_img(&["compare", "-q", s(&native), s(&tool)]);
}
