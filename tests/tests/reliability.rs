//! What Strata promises when its state store or the images' filesystem is
//! full or read-only (docs/reliability.md): a change is refused with the
//! path and the system's reason, nothing is half-made (no overlay, no
//! record, no temporary file), reads go on answering, and once space or
//! write access is back the same command works.
//!
//! The filesystems are small tmpfs mounts made by the test (as root, like
//! the rest of the suite) and unmounted by path when it ends.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{domain_xml, qemu_chain, qemu_img, DiskSpec, DomainGuard, TestEnv, Tmpfs};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8")
}

impl Tmpfs {
    fn remount(&self, option: &str) {
        let out =
            Command::new("mount").args(["-o", &format!("remount,{option}"), s(&self.path)]).output().expect("mount");
        assert!(out.status.success(), "remount {option}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Fills what is left with one file; returns it, to be removed later.
    fn fill(&self) -> PathBuf {
        let file = self.path.join("filler");
        let _ = Command::new("dd")
            .args(["if=/dev/zero", &format!("of={}", file.display()), "bs=64k"])
            .output()
            .expect("run dd");
        let probe = std::fs::write(self.path.join("probe"), vec![0u8; 8192]);
        assert!(probe.is_err(), "the tmpfs still had room after filling it");
        file
    }
}

/// Every file below `dir` whose name says it is a temporary one.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains(".tmp")) {
                found.push(path);
            }
        }
    }
    found
}

/// A domain `vm` with one qcow2 disk in `images`, its state root on a
/// separate tmpfs when `state` is given.
fn env_with(state: Option<&str>) -> (TestEnv, Option<Tmpfs>, PathBuf) {
    let mut env = TestEnv::new();
    let mount = state.map(|size| {
        let fs = Tmpfs::mount(env.path("statefs"), size);
        env.uri = format!("qemu:///embed?root={}/state", fs.path.display());
        fs
    });
    let disk = env.path("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&disk), "8M"]);
    env.define("vm", &domain_xml("vm", &[DiskSpec { target: "vda", format: "qcow2", path: &disk, extra: "" }]));
    (env, mount, disk)
}

fn snapshot_names(env: &TestEnv) -> Vec<String> {
    env.ok(&["snapshot-list", "vm", "--name"]).lines().filter(|l| !l.is_empty()).map(String::from).collect()
}

fn chain_files(top: &Path) -> Vec<String> {
    qemu_chain(top).into_iter().map(|(f, _)| f).collect()
}

#[test]
fn a_full_state_store_refuses_changes_and_keeps_what_it_had() {
    let (env, state, disk) = env_with(Some("2m"));
    let state = state.expect("state tmpfs");
    env.ok(&["snapshot-create-as", "vm", "s1", "--disk-only"]);
    let s1 = env.path("disk.s1");
    assert_eq!(chain_files(&s1), [s(&s1), s(&disk)]);

    let filler = state.fill();
    let err = env.fails(&["snapshot-create-as", "vm", "s2", "--disk-only"]);
    assert!(err.contains("No space left on device") && err.contains(s(&state.path)), "{err}");
    let err = env.fails(&["define", s(&env.path("vm.xml"))]);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(!env.path("disk.s2").exists(), "an overlay was made for a snapshot that could not be recorded");
    assert!(temporaries(&state.path).is_empty(), "{:?}", temporaries(&state.path));
    assert_eq!(snapshot_names(&env), ["s1"]);
    assert_eq!(chain_files(&s1), [s(&s1), s(&disk)]);
    assert!(env.ok(&["dumpxml", "vm"]).contains(s(&s1)));

    std::fs::remove_file(filler).expect("free the space");
    env.ok(&["snapshot-create-as", "vm", "s2", "--disk-only"]);
    let s2 = env.path("disk.s2");
    assert_eq!(snapshot_names(&env), ["s1", "s2"]);
    assert_eq!(chain_files(&s2), [s(&s2), s(&s1), s(&disk)]);
}

#[test]
fn a_read_only_state_store_answers_reads_and_refuses_changes() {
    let (env, state, disk) = env_with(Some("16m"));
    let state = state.expect("state tmpfs");
    env.ok(&["snapshot-create-as", "vm", "s1", "--disk-only"]);
    let s1 = env.path("disk.s1");

    state.remount("ro");
    assert!(env.ok(&["list", "--all"]).contains(" vm "));
    assert!(env.ok(&["dumpxml", "vm"]).contains(s(&s1)));
    assert_eq!(snapshot_names(&env), ["s1"]);
    env.ok(&["domblkcheck", "vm"]);
    for args in [
        &["snapshot-create-as", "vm", "s2", "--disk-only"][..],
        &["start", "vm"],
        &["undefine", "vm", "--snapshots-metadata"],
    ] {
        let err = env.fails(args);
        assert!(err.contains("Read-only file system") && err.contains(s(&state.path)), "{args:?}: {err}");
    }
    assert!(!env.path("disk.s2").exists(), "an overlay was made for a snapshot that could not be recorded");
    assert_eq!(chain_files(&s1), [s(&s1), s(&disk)]);

    state.remount("rw");
    env.ok(&["snapshot-create-as", "vm", "s2", "--disk-only"]);
    assert_eq!(snapshot_names(&env), ["s1", "s2"]);
}

#[test]
fn a_full_image_filesystem_leaves_no_half_made_snapshot() {
    let env = TestEnv::new();
    let images = Tmpfs::mount(env.path("images"), "4m");
    let disk = images.path.join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&disk), "64M"]);
    env.define("vm", &domain_xml("vm", &[DiskSpec { target: "vda", format: "qcow2", path: &disk, extra: "" }]));
    let _guard = DomainGuard { env: &env, name: "vm".into() };
    let filler = images.fill();

    for live in [false, true] {
        if live {
            env.ok(&["start", "vm"]);
        }
        let err = env.fails(&["snapshot-create-as", "vm", "s1", "--disk-only", "--atomic"]);
        assert!(err.contains("No space left on device") || err.contains("Could not"), "live {live}: {err}");
        assert!(!images.path.join("disk.s1").exists(), "live {live}: a half-made overlay was left");
        assert!(snapshot_names(&env).is_empty(), "live {live}");
        let xml = env.ok(&["dumpxml", "vm"]);
        assert!(xml.contains(s(&disk)) && !xml.contains("disk.s1"), "live {live}: {xml}");
        // Nothing is left for the next command to finish or undo.
        let out = env.strata(&["snapshot-list", "vm"]);
        assert!(String::from_utf8_lossy(&out.stderr).is_empty(), "live {live}: {out:?}");
    }

    std::fs::remove_file(filler).expect("free the space");
    env.ok(&["snapshot-create-as", "vm", "s1", "--disk-only", "--atomic"]);
    let s1 = images.path.join("disk.s1");
    assert_eq!(chain_files(&s1), [s(&s1), s(&disk)]);
    env.ok(&["destroy", "vm"]);
}
