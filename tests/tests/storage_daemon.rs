//! A container's qcow2 chain served by `qemu-storage-daemon` over FUSE
//! (`strata_qemu_block::fuse`), as the LXC driver will serve a
//! `<filesystem type='file'>` root: the real daemon, a real loop device
//! (without direct I/O) and a real ext4 mount, then the chain on disk,
//! the data in each layer, the process list, the mount table and the loop
//! devices checked after teardown.

mod common;

use std::path::Path;
use std::process::Command;

use common::{mounted_at, qemu_chain, qemu_img, qemu_io, LoopDevice, TestEnv};
use strata_core::xml::{Domain, StorageDevice};
use strata_engine::process::Liveness;
use strata_qemu_block::fuse::{recorded_server, serve_fuse, ServedChain};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8")
}

/// `TOOL ARGS…`, which must succeed; returns stdout.
fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| panic!("run {tool}: {e}"));
    assert!(out.status.success(), "{tool} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The container's root filesystem with its chain recorded, top first.
fn root_filesystem(chain: &[&Path]) -> StorageDevice {
    let mut backing = "<backingStore/>".to_string();
    for layer in chain.iter().skip(1).rev() {
        backing = format!(
            "<backingStore type='file'><format type='qcow2'/><source file='{}'/>{backing}</backingStore>",
            layer.display()
        );
    }
    let xml = format!(
        "<domain type='lxc'><name>ct</name><devices><filesystem type='file' accessmode='passthrough'>\
         <driver type='loop' format='qcow2'/><source file='{}'/>{backing}<target dir='/'/></filesystem>\
         </devices></domain>",
        chain[0].display()
    );
    Domain::parse(&xml).expect("xml").find_storage_device("/").expect("the root filesystem")
}

/// Writes 1 MiB of `byte` at `offset` of a block device, flushed.
fn write_pattern(device: &Path, offset: u64, byte: u8) {
    use std::io::{Seek, SeekFrom, Write};
    let mut dev = std::fs::OpenOptions::new().write(true).open(device).expect("open the loop device");
    dev.seek(SeekFrom::Start(offset)).expect("seek");
    dev.write_all(&vec![byte; 1 << 20]).expect("write the pattern");
    dev.sync_all().expect("flush the loop device");
}

/// Loop devices whose backing file is `file` (`losetup -j FILE`).
fn loops_over(file: &Path) -> String {
    run("losetup", &["-j", s(file)])
}

/// Unmounts a FUSE export left mounted by a test that failed before its
/// teardown (the daemon itself dies with `TestEnv`).
struct ExportMount<'a>(&'a Path);

impl Drop for ExportMount<'_> {
    fn drop(&mut self) {
        if mounted_at(self.0) {
            let _ = Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
}

/// Stops `served` and checks that nothing of it remains: no daemon (by
/// pid), no FUSE mount, no export file, no process record.
fn stop_and_check_gone(rt: &tokio::runtime::Runtime, served: ServedChain, runtime_dir: &Path) {
    let (daemon, file) = (served.server.process, served.file().to_path_buf());
    rt.block_on(served.stop()).expect("stop the export and the daemon");
    assert_eq!(daemon.liveness(), Liveness::Gone, "the storage daemon (pid {}) has exited", daemon.pid);
    assert!(!mounted_at(&file), "the FUSE mount at {} is gone", file.display());
    assert!(!file.exists(), "the export file is removed");
    assert_eq!(recorded_server(runtime_dir).expect("read the record"), None);
}

#[test]
fn a_qcow2_chain_served_over_fuse_mounts_on_a_loop_device_and_takes_writes_in_its_top() {
    for (what, path) in [("FUSE", "/dev/fuse"), ("loop devices", "/dev/loop-control")] {
        assert!(Path::new(path).exists(), "{what} missing: {path} does not exist");
    }
    let env = TestEnv::new();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");

    // base: an ext4 filesystem holding one file, made from a directory.
    let content = env.path("content");
    std::fs::create_dir(&content).expect("content dir");
    std::fs::write(content.join("base.txt"), "written into the base\n").expect("base.txt");
    let raw = env.path("root.raw");
    std::fs::File::create(&raw).and_then(|f| f.set_len(64 << 20)).expect("raw image");
    // The filesystem takes the first 32 MiB; the test writes a pattern
    // behind it through the loop device.
    run("mkfs.ext4", &["-q", "-F", "-d", s(&content), s(&raw), "32M"]);
    let (base, mid, top) = (env.path("base.qcow2"), env.path("mid.qcow2"), env.path("top.qcow2"));
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&base)]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", s(&base), s(&mid)]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", s(&mid), s(&top)]);
    let chain = qemu_chain(&top);
    assert_eq!(chain.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>(), [s(&top), s(&mid), s(&base)]);
    let untouched = |image: &Path| run("sha256sum", &[s(image)]);
    let (base_sum, mid_sum) = (untouched(&base), untouched(&mid));
    let root = root_filesystem(&[&top, &mid, &base]);

    let runtime_dir = env.path("qsd");
    let export = env.path("root.export");
    let _export_mount = ExportMount(&export);
    let served = rt.block_on(serve_fuse("ct", &root, &runtime_dir, &export)).expect("serve the chain over FUSE");
    assert_eq!(served.file(), export);
    assert!(mounted_at(&export), "the export is a FUSE mount");
    assert_eq!(recorded_server(&runtime_dir).expect("read the record"), Some(served.server.process));
    assert_eq!(std::fs::metadata(&export).expect("export").len(), 64 << 20, "the chain's virtual size");

    let mnt = env.path("mnt");
    std::fs::create_dir(&mnt).expect("mount point");
    let device = LoopDevice::attach(&export, mnt.clone());
    assert!(loops_over(&export).contains(&device.device), "{}", loops_over(&export));
    run("mount", &["-t", "ext4", &device.device, s(&mnt)]);
    assert_eq!(std::fs::read_to_string(mnt.join("base.txt")).expect("base.txt"), "written into the base\n");
    std::fs::write(mnt.join("top.txt"), "written through the export\n").expect("write top.txt");
    assert_eq!(std::fs::read_to_string(mnt.join("top.txt")).expect("top.txt"), "written through the export\n");
    run("umount", &[s(&mnt)]);
    write_pattern(Path::new(&device.device), 48 << 20, 0x5a);
    let device_path = device.device.clone();
    device.detach();
    assert!(!loops_over(&export).contains(&device_path), "{}", loops_over(&export));
    stop_and_check_gone(&rt, served, &runtime_dir);

    // The chain is as it was; the writes are in the top layer only.
    assert_eq!(qemu_chain(&top), chain);
    assert_eq!((untouched(&base), untouched(&mid)), (base_sum, mid_sum), "base and mid are unchanged");
    qemu_io(&["-f", "qcow2", "-c", "read -P 0x5a 48M 1M", s(&top)]);
    qemu_io(&["-f", "qcow2", "-c", "read -P 0 48M 1M", s(&mid)]);
    let files_in = |image: &Path| {
        let flat = env.path("flat.raw");
        qemu_img(&["convert", "-O", "raw", s(image), s(&flat)]);
        let listing = run("debugfs", &["-R", "ls -l /", s(&flat)]);
        std::fs::remove_file(&flat).expect("remove flat.raw");
        listing
    };
    assert!(files_in(&top).contains("top.txt"));
    let below = files_in(&mid);
    assert!(below.contains("base.txt") && !below.contains("top.txt"), "{below}");

    // A fresh export of the same chain mounts with both files.
    let served = rt.block_on(serve_fuse("ct", &root, &runtime_dir, &export)).expect("serve the chain again");
    let device = LoopDevice::attach(&export, mnt.clone());
    run("mount", &["-t", "ext4", "-o", "ro", &device.device, s(&mnt)]);
    assert_eq!(std::fs::read_to_string(mnt.join("top.txt")).expect("top.txt"), "written through the export\n");
    assert_eq!(std::fs::read_to_string(mnt.join("base.txt")).expect("base.txt"), "written into the base\n");
    run("umount", &[s(&mnt)]);
    device.detach();
    stop_and_check_gone(&rt, served, &runtime_dir);
    assert_eq!(qemu_chain(&top), chain);
}

#[test]
fn a_mountpoint_with_contents_is_refused_and_nothing_is_left_running() {
    let env = TestEnv::new();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let image = env.path("root.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&image), "16M"]);
    let root = root_filesystem(&[&image]);
    let export = env.path("busy");
    std::fs::write(&export, "keep me").expect("a file with contents");
    let runtime_dir = env.path("qsd");
    let err = rt.block_on(serve_fuse("ct", &root, &runtime_dir, &export)).err().expect("refused");
    assert!(err.to_string().contains("must be an empty regular file or not exist"), "{err}");
    assert_eq!(std::fs::read_to_string(&export).expect("busy"), "keep me");
    assert!(!mounted_at(&export));
    assert_eq!(recorded_server(&runtime_dir).expect("read the record"), None, "the daemon was stopped");
    let daemons = common::test_processes(&env);
    assert!(daemons.is_empty(), "{daemons:?}");
}
