//! `<transient/>` disks with real QEMU: the guest's writes go to a
//! throwaway overlay in the runtime directory and never reach the image;
//! the overlay is gone after a stop and after a crash; snapshots, block
//! jobs and disk sets refuse the disk; the XML shows it as defined.

mod common;

use std::path::{Path, PathBuf};

use common::{domain_xml, make_chain, qemu_chain, qemu_img, qemu_io, validate_xml, DiskSpec, DomainGuard, TestEnv};
use strata_core::xml::Domain;
use strata_qemu::QemuConnection;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// A domain `vm`: `vda` an ordinary one-layer disk, `vdb` a transient disk
/// on a two-layer chain (`tbase` ← `tdisk`). Returns vda's image and vdb's
/// top image.
fn define_vm(env: &TestEnv, transient: &str) -> (PathBuf, PathBuf) {
    let vda = make_chain(env.dir.path(), &["a.qcow2"]).remove(0);
    let vdb = make_chain(env.dir.path(), &["tbase.qcow2", "tdisk.qcow2"]).remove(1);
    env.define(
        "vm",
        &domain_xml(
            "vm",
            &[
                DiskSpec { target: "vda", format: "qcow2", path: &vda, extra: "" },
                DiskSpec { target: "vdb", format: "qcow2", path: &vdb, extra: transient },
            ],
        ),
    );
    (vda, vdb)
}

/// A flattened copy of what `image` reads now (a disk's pristine data).
fn snapshot_of(env: &TestEnv, image: &Path, name: &str) -> PathBuf {
    let copy = env.path(name);
    qemu_img(&["convert", "-U", "-O", "qcow2", s(image), s(&copy)]);
    copy
}

/// `qemu-img compare` of two images: whether they read the same.
fn same_data(a: &Path, b: &Path) -> bool {
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-U", s(a), s(b)])
        .output()
        .expect("run qemu-img compare");
    out.status.code() == Some(0)
}

fn overlay(env: &TestEnv) -> PathBuf {
    env.state_root().join("domains/vm/run/transient-vdb.qcow2")
}

fn vdb_of(xml: &str) -> strata_core::xml::Disk {
    Domain::parse(xml).expect("xml").find_disk("vdb").expect("vdb")
}

#[test]
fn guest_writes_go_to_an_overlay_that_stop_removes() {
    let env = TestEnv::new();
    let (_, vdb) = define_vm(&env, "      <transient/>\n");
    let pristine = snapshot_of(&env, &vdb, "pristine.qcow2");
    let defined = env.ok(&["dumpxml", "vm", "--inactive"]);
    env.ok(&["start", "vm"]);
    let guard = DomainGuard { env: &env, name: "vm".into() };

    // The overlay names the image and its format in its header.
    let tbase = env.path("tbase.qcow2");
    assert_eq!(
        qemu_chain(&overlay(&env)),
        [
            (overlay(&env).display().to_string(), "qcow2".to_string()),
            (vdb.display().to_string(), "qcow2".to_string()),
            (tbase.display().to_string(), "qcow2".to_string()),
        ]
    );
    // QEMU opens the image's own chain read-only; only the overlay is written.
    let conn = QemuConnection::open_embedded(&env.state_root()).expect("open");
    let rt = runtime();
    let nodes = rt.block_on(async {
        let (_, monitor) = conn.running("vm").await.expect("running");
        monitor.client.query_named_block_nodes().await.expect("query-named-block-nodes")
    });
    let read_only =
        |file: &Path| nodes.iter().filter(|n| n.drv == "qcow2" && n.file == file.display().to_string()).all(|n| n.ro);
    assert!(read_only(&vdb) && read_only(&tbase), "the transient disk's image is writable in QEMU: {nodes:#?}");

    // The live XML shows the disk as defined, its chain the image's.
    let live = env.ok(&["dumpxml", "vm"]);
    validate_xml(&live);
    let (live_vdb, defined_vdb) = (vdb_of(&live), vdb_of(&defined));
    assert!(live_vdb.transient && live.contains("<transient/>"), "{live}");
    assert_eq!(live_vdb.chain, defined_vdb.chain, "the live chain must not show the overlay:\n{live}");
    assert!(!live.contains("transient-vdb"), "{live}");
    let check = env.ok(&["domblkcheck", "vm", "vdb"]);
    assert_eq!(check.lines().next(), Some("vdb: recorded chain matches the images"), "{check}");

    // A guest write is read back through the guest, and is not in the image.
    let written = snapshot_of(&env, &vdb, "written.qcow2");
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x5a 0 64k", s(&written)]);
    rt.block_on(common::guest::write(&conn, "vm", "vdb", 0x5a, 0, 65536));
    assert!(rt.block_on(common::guest::compare(&conn, "vm", "vdb", &written)), "the guest must read its write back");
    assert!(same_data(&vdb, &pristine), "the guest's write reached the image while running");
    drop(conn);

    env.ok(&["destroy", "vm"]);
    assert!(!overlay(&env).exists(), "the overlay outlived the domain");
    assert!(same_data(&vdb, &pristine), "the guest's write reached the image");
    assert_eq!(qemu_chain(&vdb).len(), 2, "the image's chain changed");
    assert_eq!(env.ok(&["dumpxml", "vm", "--inactive"]), defined, "the persistent definition changed");

    // Started again, the guest sees the image as it was.
    env.ok(&["start", "vm"]);
    let conn = QemuConnection::open_embedded(&env.state_root()).expect("open");
    assert!(rt.block_on(common::guest::compare(&conn, "vm", "vdb", &pristine)), "the write survived a restart");
    drop(guard);
}

#[test]
fn the_call_after_a_crash_removes_the_overlay() {
    let env = TestEnv::new();
    let (_, vdb) = define_vm(&env, "      <transient/>\n");
    let pristine = snapshot_of(&env, &vdb, "pristine.qcow2");
    env.ok(&["start", "vm"]);
    let _guard = DomainGuard { env: &env, name: "vm".into() };
    let conn = QemuConnection::open_embedded(&env.state_root()).expect("open");
    let rt = runtime();
    rt.block_on(common::guest::write(&conn, "vm", "vdb", 0x5a, 0, 65536));
    assert!(!rt.block_on(common::guest::compare(&conn, "vm", "vdb", &pristine)), "the guest write did not happen");
    drop(conn);
    assert!(overlay(&env).exists());

    common::kill_qemu(&env, "vm");
    assert!(overlay(&env).exists(), "nothing has run since the crash");
    assert_eq!(env.ok(&["domstate", "vm"]).trim(), "shut off");
    assert!(!overlay(&env).exists(), "the dead domain's overlay was left behind");
    assert!(same_data(&vdb, &pristine), "the guest's write reached the image");
}

#[test]
fn snapshots_block_jobs_and_disk_sets_refuse_a_transient_disk() {
    let env = TestEnv::new();
    define_vm(&env, "");
    // A snapshot taken before vdb became transient covers it.
    env.ok(&["snapshot-create-as", "vm", "before", "--disk-only"]);
    let xml = env.ok(&["dumpxml", "vm", "--inactive"]);
    let transient =
        xml.replacen("<target dev='vdb' bus='virtio'/>", "<target dev='vdb' bus='virtio'/>\n      <transient/>", 1);
    assert_ne!(transient, xml);
    std::fs::write(env.path("vm.xml"), transient).expect("write xml");
    env.ok(&["define", s(&env.path("vm.xml"))]);
    let vdb_chain = qemu_chain(&env.path("tdisk.before"));
    env.ok(&["start", "vm"]);
    let _guard = DomainGuard { env: &env, name: "vm".into() };
    let refused = |args: &[&str], what: &str| {
        let err = env.fails(args);
        assert!(
            err.starts_with("error: ")
                && err.contains(&format!("unsupported configuration: transient disk 'vdb' does not support {what}")),
            "strata {args:?}: {err}"
        );
        err
    };

    // A default snapshot covers every disk: refused, as libvirt does.
    let err = refused(&["snapshot-create-as", "vm", "full"], "snapshots");
    assert!(err.contains("--diskspec vdb,snapshot=no"), "{err}");
    refused(&["snapshot-create-as", "vm", "disks", "--disk-only"], "snapshots");
    refused(&["snapshot-create-as", "vm", "named", "--disk-only", "--diskspec", "vdb,snapshot=external"], "snapshots");
    refused(&["snapshot-revert", "vm", "before"], "snapshots");
    refused(&["snapshot-delete", "vm", "before"], "snapshots");
    assert_eq!(env.ok(&["snapshot-list", "vm", "--name"]).trim(), "before");

    refused(&["diskset-add", "vm", "vdb"], "disk sets");
    refused(&["diskset-add", "vm", "--all"], "disk sets");
    assert_eq!(env.ok(&["diskset-list", "vm"]).trim(), "", "a refusal changed the disk set");

    let dest = env.path("copy.qcow2");
    refused(&["blockpull", "vm", "vdb"], "block jobs");
    refused(&["blockcommit", "vm", "vdb", "--active", "--pivot"], "block jobs");
    refused(&["blockcopy", "vm", "vdb", "--dest", s(&dest)], "block jobs");
    assert!(!dest.exists(), "a refused copy created its destination");
    assert_eq!(qemu_chain(&env.path("tdisk.before")), vdb_chain, "a refusal changed vdb's chain");

    // Leaving the transient disk out, a snapshot of the others is taken,
    // also through a disk set that holds only them.
    env.ok(&["snapshot-create-as", "vm", "others", "--disk-only", "--diskspec", "vdb,snapshot=no"]);
    env.ok(&["diskset-add", "vm", "vda"]);
    env.ok(&["snapshot-create-as", "vm", "set", "--disk-only", "--disk-set"]);
    let overlay = |snap: &str| env.path(&format!("a.{snap}"));
    assert_eq!(qemu_chain(&overlay("set")).len(), 4, "vda's chain after two snapshots");
    let live_vdb = vdb_of(&env.ok(&["dumpxml", "vm"]));
    assert_eq!(live_vdb.source().and_then(|s| s.local_path()), Some(env.path("tdisk.before").as_path()));
    assert_eq!(qemu_chain(&env.path("tdisk.before")), vdb_chain, "a snapshot without vdb changed its chain");
    env.ok(&["snapshot-delete", "vm", "set"]);
    assert!(!overlay("set").exists());

    // Shut off, a job is refused before any storage daemon starts.
    env.ok(&["destroy", "vm"]);
    refused(&["blockpull", "vm", "vdb"], "block jobs");
    assert!(!env.state_root().join("domains/vm/status.xml").exists(), "a refused job left a storage daemon");
}

#[test]
fn transient_xml_round_trips_and_bad_forms_are_refused_at_define() {
    let env = TestEnv::new();
    let (_, vdb) = define_vm(&env, "      <transient shareBacking='yes'/>\n");
    let inactive = env.ok(&["dumpxml", "vm", "--inactive"]);
    validate_xml(&inactive);
    assert!(inactive.contains("<transient shareBacking='yes'/>"), "{inactive}");
    env.ok(&["start", "vm"]);
    let _guard = DomainGuard { env: &env, name: "vm".into() };
    let live = env.ok(&["dumpxml", "vm"]);
    validate_xml(&live);
    assert!(live.contains("<transient shareBacking='yes'/>"), "{live}");

    // shareBacking: a second domain runs on the same image at once.
    let xml = domain_xml(
        "vm2",
        &[DiskSpec { target: "vda", format: "qcow2", path: &vdb, extra: "      <transient shareBacking='yes'/>\n" }],
    );
    env.define("vm2", &xml);
    env.ok(&["start", "vm2"]);
    let _guard2 = DomainGuard { env: &env, name: "vm2".into() };
    assert_eq!(env.ok(&["domstate", "vm2"]).trim(), "running");

    let bad = [
        ("<transient shareBacking='maybe'/>", "shareBacking='maybe'"),
        ("<transient/><readonly/>", "transient disk 'vda' must not be read-only"),
        ("<transient/><shareable/>", "transient disk 'vda' must not be shareable"),
    ];
    for (extra, message) in bad {
        let xml = domain_xml(
            "bad",
            &[DiskSpec { target: "vda", format: "qcow2", path: &vdb, extra: &format!("      {extra}\n") }],
        );
        std::fs::write(env.path("bad.xml"), xml).expect("write xml");
        let err = env.fails(&["define", s(&env.path("bad.xml"))]);
        assert!(err.starts_with("error: ") && err.contains(message), "{extra}: {err}");
    }
    assert!(env.fails(&["dominfo", "bad"]).contains("failed to get domain 'bad'"));
}
