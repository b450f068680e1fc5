//! Storage pools with real qemu-img, QEMU and (for `fs`) a loop device:
//! each pool and volume command as virsh spells it, the chain on disk
//! behind what the volumes show, pool and volume XML validated with
//! libvirt's schemas, and a domain whose disk is a pool's volume.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    domain_xml, guest, mounted_at, qemu_chain, qemu_img, qemu_io, validate_xml, DiskSpec, DomainGuard, LoopDevice,
    TestEnv,
};
use strata_qemu::QemuConnection;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8")
}

/// Defines, builds and starts a `dir` pool `name` at `dir` (virsh's
/// positional form, with `-` for the source options).
fn start_dir_pool(env: &TestEnv, name: &str, dir: &Path) {
    assert_eq!(
        env.ok(&["pool-define-as", name, "dir", "-", "-", "-", "-", s(dir)]),
        format!("Pool {name} defined\n\n")
    );
    assert_eq!(env.ok(&["pool-build", name]), format!("Pool {name} built\n\n"));
    assert!(dir.is_dir(), "pool-build makes the target directory");
    assert_eq!(env.ok(&["pool-start", name]), format!("Pool {name} started\n\n"));
}

/// `base.qcow2` ← `mid.qcow2` ← `top.qcow2` made in pool `pool` with
/// vol-create-as, the backing named by volume name once and by path once;
/// base holds 0x11 in its first MiB (checked). Returns the paths, base first.
fn volume_chain(env: &TestEnv, pool: &str, dir: &Path) -> Vec<PathBuf> {
    let paths: Vec<PathBuf> = ["base.qcow2", "mid.qcow2", "top.qcow2"].iter().map(|n| dir.join(n)).collect();
    assert_eq!(
        env.ok(&["vol-create-as", pool, "base.qcow2", "64M", "--format", "qcow2"]),
        "Vol base.qcow2 created\n\n"
    );
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x11 0 1M", s(&paths[0])]);
    qemu_io(&["-f", "qcow2", "-c", "read -P 0x11 0 1M", s(&paths[0])]);
    env.ok(&[
        "vol-create-as",
        "--pool",
        pool,
        "mid.qcow2",
        "64M",
        "--format",
        "qcow2",
        "--backing-vol",
        "base.qcow2",
        "--backing-vol-format",
        "qcow2",
    ]);
    env.ok(&["vol-create-as", pool, "top.qcow2", "64M", "--format", "qcow2", "--backing-vol", s(&paths[1])]);
    paths
}

/// A running `dir` pool `p` in `images/` holding [`volume_chain`].
fn pool_with_chain() -> (TestEnv, PathBuf, Vec<PathBuf>) {
    let env = TestEnv::new();
    let dir = env.path("images");
    start_dir_pool(&env, "p", &dir);
    let paths = volume_chain(&env, "p", &dir);
    (env, dir, paths)
}

#[test]
fn dir_pool_lifecycle_listing_and_xml() {
    let env = TestEnv::new();
    let dir = env.path("images");
    assert_eq!(env.ok(&["pool-define-as", "--name", "p", "--type", "dir", "--target", s(&dir)]), "Pool p defined\n\n");
    assert_eq!(env.ok(&["pool-list"]), " Name   State   Autostart\n---------------------------\n\n");
    assert_eq!(
        env.ok(&["pool-list", "--all"]),
        " Name   State      Autostart\n------------------------------\n p      inactive   no\n\n"
    );
    assert_eq!(
        env.fails(&["vol-list", "p"]),
        "error: Requested operation is not valid: storage pool 'p' is not active\n"
    );
    let err = env.fails(&["pool-start", "p"]);
    assert!(err.contains("error: Failed to start pool p") && err.contains(s(&dir)), "{err}");
    env.ok(&["pool-build", "--pool", "p"]);
    env.ok(&["pool-start", "p"]);
    assert_eq!(
        env.ok(&["pool-list"]),
        " Name   State    Autostart\n----------------------------\n p      active   no\n\n"
    );
    let info = env.ok(&["pool-info", "p"]);
    assert!(info.starts_with("Name:           p\nUUID:           "), "{info}");
    assert!(
        info.contains("\nState:          running\nPersistent:     yes\nAutostart:      no\nCapacity:       "),
        "{info}"
    );
    let json: serde_json::Value = serde_json::from_str(&env.ok(&["pool-info", "p", "--json"])).expect("json");
    assert_eq!((json["state"].as_str(), json["type"].as_str()), (Some("running"), Some("dir")));
    assert!(json["capacity"].as_u64().is_some_and(|c| c > 0), "{json}");

    let xml = env.ok(&["pool-dumpxml", "p"]);
    validate_xml(&xml);
    assert!(
        xml.contains(&format!("<path>{}</path>", dir.display())) && xml.contains("<capacity unit='bytes'>"),
        "{xml}"
    );
    assert!(!env.ok(&["pool-dumpxml", "--inactive", "p"]).contains("<capacity"));

    assert_eq!(env.ok(&["pool-autostart", "p"]), "Pool p marked as autostarted\n\n");
    let listed: serde_json::Value = serde_json::from_str(&env.ok(&["pool-list", "--json"])).expect("json");
    assert_eq!(listed[0]["autostart"], serde_json::Value::Bool(true), "{listed}");
    // A reboot of the host (the pools' records carry an earlier boot id):
    // the pool is no longer running, and the first pool command starts it
    // again because it is marked autostart, as libvirtd does at its start.
    let reboot = || {
        let pools = env.state_root().join("pools");
        std::fs::write(pools.join(".autostarted"), "an-earlier-boot\n").expect("write");
        std::fs::write(pools.join("p").join("running"), "an-earlier-boot\n").expect("write");
    };
    reboot();
    assert!(env.ok(&["pool-list"]).contains(" p      active   yes\n"));
    assert_eq!(env.ok(&["pool-list", "--autostart", "--type", "fs,dir", "--name"]), "p\n\n");
    assert_eq!(env.ok(&["pool-list", "--no-autostart", "--name"]), "\n");
    assert_eq!(env.ok(&["pool-list", "--type", "fs", "--name"]), "\n");
    assert_eq!(env.ok(&["pool-autostart", "p", "--disable"]), "Pool p unmarked as autostarted\n\n");
    reboot();
    assert!(env.ok(&["pool-list", "--all"]).contains(" p      inactive   no\n"));
    env.ok(&["pool-start", "p"]);
    assert_eq!(env.ok(&["pool-refresh", "p"]), "Pool p refreshed\n\n");

    let err = env.fails(&["pool-undefine", "p"]);
    assert!(err.contains("storage pool 'p' is still active"), "{err}");
    assert_eq!(env.ok(&["pool-destroy", "p"]), "Pool p destroyed\n\n");
    assert!(dir.is_dir(), "destroy leaves the data");
    assert_eq!(env.ok(&["pool-undefine", "p"]), "Pool p has been undefined\n\n");
    assert_eq!(env.ok(&["pool-list", "--all", "--name"]), "\n");

    let err = env.fails(&["pool-info", "p"]);
    assert_eq!(
        err,
        "error: failed to get pool 'p'\nerror: Storage pool not found: no storage pool with matching name 'p'\n"
    );

    // pool-define from a file keeps what Strata does not model.
    let file = env.path("pool.xml");
    std::fs::write(
        &file,
        format!(
            "<pool type='dir'><name>q</name><source/><target><path>{}</path><permissions><mode>0711</mode>\
             </permissions></target></pool>",
            dir.display()
        ),
    )
    .expect("write");
    assert_eq!(env.ok(&["pool-define", s(&file)]), format!("Pool q defined from {}\n\n", file.display()));
    let xml = env.ok(&["pool-dumpxml", "q"]);
    validate_xml(&xml);
    assert!(xml.contains("<mode>0711</mode>"), "{xml}");
}

#[test]
fn volumes_of_a_dir_pool_show_their_whole_chain() {
    let (env, _, paths) = pool_with_chain();
    let on_disk: Vec<(String, String)> =
        paths.iter().rev().map(|p| (p.display().to_string(), "qcow2".to_string())).collect();
    assert_eq!(qemu_chain(&paths[2]), on_disk);

    let xml = env.ok(&["vol-dumpxml", "--pool", "p", "top.qcow2"]);
    validate_xml(&xml);
    let layers: Vec<&str> = xml.lines().filter(|l| l.trim_start().starts_with("<path>")).map(str::trim).collect();
    let expected: Vec<String> = paths.iter().rev().map(|p| format!("<path>{}</path>", p.display())).collect();
    assert_eq!(layers, expected, "{xml}");
    assert_eq!(xml.matches("<backingStore>").count(), 2, "{xml}");
    assert_eq!(xml.matches("<format type='qcow2'/>").count(), 3, "{xml}");
    assert_eq!(env.ok(&["vol-dumpxml", s(&paths[2])]), xml, "by path without --pool");

    let list = env.ok(&["vol-list", "p"]);
    let rows: Vec<String> = paths
        .iter()
        .map(|p| format!(" {:<10}   {}", p.file_name().and_then(|n| n.to_str()).expect("name"), p.display()))
        .collect();
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.first(), Some(&" Name         Path"), "{list}");
    assert_eq!(lines[2..5], rows, "{list}");
    let details = env.ok(&["vol-list", "--pool", "p", "--details"]);
    assert!(details.starts_with(" Name         Path"), "{details}");
    assert!(details.contains("   file   64.00 MiB   "), "{details}");
    let json: serde_json::Value = serde_json::from_str(&env.ok(&["vol-list", "p", "--json"])).expect("json");
    assert_eq!(json.as_array().map(Vec::len), Some(3), "{json}");
    assert_eq!(json[2]["format"].as_str(), Some("qcow2"));

    let info = env.ok(&["vol-info", "top.qcow2", "--pool", "p"]);
    assert!(info.starts_with("Name:           top.qcow2\nType:           file\nCapacity:       64.00 MiB\n"), "{info}");
    let info: serde_json::Value =
        serde_json::from_str(&env.ok(&["vol-info", "--pool", "p", "top.qcow2", "--json"])).expect("json");
    assert_eq!((info["capacity"].as_u64(), info["path"].as_str()), (Some(64 << 20), Some(s(&paths[2]))));
    assert_eq!(env.ok(&["vol-path", "--pool", "p", "mid.qcow2"]), format!("{}\n\n", paths[1].display()));

    let err = env.fails(&["vol-create-as", "p", "top.qcow2", "1M"]);
    assert!(err.contains("volume 'top.qcow2' already exists in storage pool 'p'"), "{err}");
    let err = env.fails(&["vol-info", "--pool", "p", "nosuch"]);
    assert!(err.contains("error: failed to get vol 'nosuch'"), "{err}");
}

#[test]
fn volumes_are_created_resized_cloned_and_deleted() {
    let (env, dir, paths) = pool_with_chain();

    let err = env.fails(&["vol-resize", "top.qcow2", "32M", "--pool", "p"]);
    assert!(err.contains("can't shrink capacity of volume 'top.qcow2'") && err.contains("--shrink"), "{err}");
    assert_eq!(
        env.ok(&["vol-resize", "top.qcow2", "128M", "--pool", "p"]),
        "Size of volume 'top.qcow2' successfully changed to 128M\n\n"
    );
    env.ok(&["vol-resize", "--pool", "p", "top.qcow2", "64M", "--delta"]);
    let size = |p: &Path| -> u64 {
        let v: serde_json::Value =
            serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", s(p)])).expect("json");
        v["virtual-size"].as_u64().expect("size")
    };
    assert_eq!(size(&paths[2]), 192 << 20);

    assert_eq!(
        env.ok(&["vol-clone", "--pool", "p", "top.qcow2", "copy.qcow2"]),
        "Vol copy.qcow2 cloned from top.qcow2\n\n"
    );
    let copy = dir.join("copy.qcow2");
    qemu_io(&["-f", "qcow2", "-c", "read -P 0x11 0 1M", s(&copy)]);
    qemu_img(&["compare", "-f", "qcow2", "-F", "qcow2", s(&paths[2]), s(&copy)]);
    assert_eq!(qemu_chain(&copy), [(copy.display().to_string(), "qcow2".to_string())], "the clone stands alone");

    let file = env.path("vol.xml");
    std::fs::write(
        &file,
        format!(
            "<volume><name>over.qcow2</name><capacity unit='M'>64</capacity><target><format type='qcow2'/></target>\
             <backingStore><path>{}</path><format type='qcow2'/></backingStore></volume>",
            paths[0].display()
        ),
    )
    .expect("write");
    assert_eq!(env.ok(&["vol-create", "p", s(&file)]), format!("Vol over.qcow2 created from {}\n\n", file.display()));
    let over = dir.join("over.qcow2");
    assert_eq!(qemu_chain(&over)[1], (paths[0].display().to_string(), "qcow2".to_string()));
    qemu_io(&["-f", "qcow2", "-c", "read -P 0x11 0 1M", s(&over)]);

    assert_eq!(env.ok(&["vol-delete", "--pool", "p", "copy.qcow2"]), "Vol copy.qcow2 deleted\n\n");
    assert!(!copy.exists());
    assert_eq!(env.ok(&["vol-delete", s(&over)]), format!("Vol {} deleted\n\n", over.display()));
    assert!(!over.exists());
    let err = env.fails(&["vol-delete", "--pool", "p", "copy.qcow2"]);
    assert!(err.contains("no storage vol with matching name 'copy.qcow2'"), "{err}");
}

/// As in virsh, a pool or volume command takes its options by name or by
/// position in any mix, each bare word filling the first of them (in
/// virsh's order) not named yet; a missing one or a word too many is
/// refused before anything runs. `help pool-list` prints its synopsis.
#[test]
fn pool_commands_take_options_by_name_and_by_position_in_any_mix() {
    let env = TestEnv::new();
    let dir = env.path("images");
    // The name by position, the target by name, the type by position.
    assert_eq!(env.ok(&["pool-define-as", "p", "--target", s(&dir), "dir"]), "Pool p defined\n\n");
    env.ok(&["pool-build", "--pool", "p"]);
    env.ok(&["pool-start", "p"]);
    assert_eq!(env.ok(&["vol-create-as", "--pool", "p", "v1", "1M"]), "Vol v1 created\n\n");
    assert_eq!(env.ok(&["vol-create-as", "p", "--capacity", "1M", "v2", "--format", "qcow2"]), "Vol v2 created\n\n");
    let info = env.ok(&["vol-info", "--pool", "p", "v1"]);
    assert!(info.starts_with("Name:           v1\nType:           file\nCapacity:       1.00 MiB\n"), "{info}");
    assert_eq!(env.ok(&["vol-info", "v1", "p"]), info, "--pool by position after the volume");
    assert_eq!(env.ok(&["vol-info", "--vol", "v1", "p"]), info);
    assert_eq!(env.ok(&["vol-path", "--pool", "p", "v2"]), format!("{}\n\n", dir.join("v2").display()));
    assert_eq!(
        env.ok(&["vol-resize", "--capacity", "2M", "v1", "p"]),
        "Size of volume 'v1' successfully changed to 2M\n\n"
    );
    assert_eq!(env.ok(&["vol-clone", "v1", "--pool", "p", "v3"]), "Vol v3 cloned from v1\n\n");

    assert_eq!(
        env.fails(&["vol-create-as", "--pool", "p", "v4"]),
        "error: command 'vol-create-as' requires <capacity> option\n"
    );
    assert_eq!(env.fails(&["vol-info", "v1", "p", "extra"]), "error: unexpected data 'extra'\n");
    assert_eq!(env.fails(&["pool-info"]), "error: command 'pool-info' requires <pool> option\n");

    let help = env.ok(&["help", "pool-list"]);
    assert!(help.contains("  SYNOPSIS\n    pool-list [--all] [--inactive] "), "{help}");
    assert_eq!(env.ok(&["pool-list", "--help"]), help);
    let help = env.ok(&["help", "vol-create-as"]);
    assert!(help.contains("\n    vol-create-as <pool> <name> <capacity> [--allocation <string>]"), "{help}");
    assert!(env.ok(&["help", "pool"]).starts_with(" Storage Pool (help keyword 'pool'):\n"));
}

/// The domain XML for `vm` whose `vda` is volume `volume` of pool `pool`.
fn volume_domain(env: &TestEnv, pool: &str, volume: &str) -> String {
    let placeholder = env.path("placeholder");
    domain_xml("vm", &[DiskSpec { target: "vda", format: "qcow2", path: &placeholder, extra: "" }])
        .replace("<disk type='file'", "<disk type='volume'")
        .replace(
            &format!("<source file='{}'/>", placeholder.display()),
            &format!("<source pool='{pool}' volume='{volume}'/>"),
        )
}

#[test]
fn a_domain_on_a_volume_is_defined_and_started_through_its_pool() {
    let (env, _, paths) = pool_with_chain();

    // As in libvirt, a volume that cannot be found does not refuse the
    // definition (a warning says why); start refuses until it is found.
    let file = env.path("missing.xml");
    for (pool, volume, why) in [
        ("nopool", "top.qcow2", "no storage pool with matching name 'nopool'"),
        ("p", "novol", "no storage vol with matching name 'novol'"),
    ] {
        std::fs::write(&file, volume_domain(&env, pool, volume)).expect("write");
        let out = env.strata(&["define", s(&file)]);
        let warning = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{warning}");
        assert!(warning.contains("disk 'vda'") && warning.contains(why), "{warning}");
        let err = env.fails(&["start", "vm"]);
        assert!(err.contains("disk 'vda'") && err.contains(why), "{err}");
        assert_eq!(env.ok(&["domstate", "vm"]), "shut off\n\n");
        let err = env.fails(&["define", "--validate", s(&file)]);
        assert!(err.contains(why), "{err}");
    }
    env.ok(&["undefine", "vm"]);

    env.define("vm", &volume_domain(&env, "p", "top.qcow2"));
    let xml = env.ok(&["dumpxml", "vm"]);
    validate_xml(&xml);
    assert!(
        xml.contains("<disk type='volume' device='disk'>") && xml.contains("<source pool='p' volume='top.qcow2'/>"),
        "{xml}"
    );
    for p in &paths[..2] {
        assert!(xml.contains(&format!("<source file='{}'/>", p.display())), "{} missing:\n{xml}", p.display());
    }

    let _guard = DomainGuard { env: &env, name: "vm".into() };
    env.ok(&["start", "vm"]);
    assert_eq!(env.ok(&["domstate", "vm"]), "running\n\n");
    let live = env.ok(&["dumpxml", "vm"]);
    assert!(
        live.contains("<disk type='volume' device='disk'>") && live.contains("<source pool='p' volume='top.qcow2'/>"),
        "{live}"
    );
    assert_eq!(env.ok(&["domblkcheck", "vm"]), "vda: recorded chain matches the images\n\n");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let conn = QemuConnection::open_embedded(&env.state_root()).expect("open");
        guest::write(&conn, "vm", "vda", 0x5a, 2 << 20, 1 << 20).await;
    });
    let err = env.fails(&["snapshot-create-as", "vm", "s1", "--disk-only"]);
    assert!(err.contains("disk 'vda' is volume 'top.qcow2' of storage pool 'p'"), "{err}");
    env.ok(&["destroy", "vm"]);
    qemu_io(&["-f", "qcow2", "-c", "read -P 0x5a 2M 1M", s(&paths[2])]);
    qemu_io(&["-f", "qcow2", "-c", "read -P 0x11 0 1M", s(&paths[2])]);

    // The chain is checked below the volume's file; a fix keeps the volume.
    assert_eq!(env.ok(&["domblkcheck", "vm"]), "vda: recorded chain matches the images\n\n");
    qemu_img(&["rebase", "-u", "-F", "qcow2", "-b", s(&paths[0]), s(&paths[2])]);
    let out = env.strata(&["domblkcheck", "vm"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("but the image chain has {}", paths[0].display())));
    env.ok(&["domblkcheck", "vm", "--fix"]);
    let fixed = env.ok(&["dumpxml", "vm"]);
    assert!(fixed.contains("<source pool='p' volume='top.qcow2'/>") && !fixed.contains(s(&paths[1])), "{fixed}");

    // A block job leaves the disk on its volume.
    env.ok(&["start", "vm"]);
    env.ok(&["blockpull", "vm", "vda", "--wait"]);
    env.ok(&["destroy", "vm"]);
    assert_eq!(qemu_chain(&paths[2]), [(paths[2].display().to_string(), "qcow2".to_string())]);
    qemu_io(&["-f", "qcow2", "-c", "read -P 0x11 0 1M", s(&paths[2])]);
    let pulled = env.ok(&["dumpxml", "vm"]);
    assert!(pulled.contains("<source pool='p' volume='top.qcow2'/>\n      <backingStore/>"), "{pulled}");

    // A pool that stopped is a clear refusal at the next start.
    env.ok(&["pool-destroy", "p"]);
    let err = env.fails(&["start", "vm"]);
    assert!(err.contains("disk 'vda'") && err.contains("storage pool 'p' is not active"), "{err}");
}

#[test]
fn fs_pool_on_a_loop_device_is_built_mounted_and_unmounted() {
    let env = TestEnv::new();
    if !Command::new("losetup").arg("-f").output().is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: this kernel gives no free loop device (losetup -f failed)");
        return;
    }
    let backing = env.path("fs.img");
    std::fs::File::create(&backing).and_then(|f| f.set_len(64 << 20)).expect("fs image");
    let out = Command::new("losetup").args(["-f", "--show", s(&backing)]).output().expect("losetup");
    if !out.status.success() {
        eprintln!("skipped: the kernel refused a loop device: {}", String::from_utf8_lossy(&out.stderr));
        return;
    }
    let mount_point = env.path("mnt");
    let device = LoopDevice {
        device: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        mount_point: mount_point.clone(),
    };
    env.ok(&[
        "pool-define-as",
        "fsp",
        "fs",
        "--source-dev",
        &device.device,
        "--source-format",
        "ext4",
        "--target",
        s(&mount_point),
    ]);
    let xml = env.ok(&["pool-dumpxml", "fsp"]);
    validate_xml(&xml);
    assert!(
        xml.contains(&format!("<device path='{}'/>", device.device)) && xml.contains("<format type='ext4'/>"),
        "{xml}"
    );

    assert_eq!(env.ok(&["pool-build", "fsp", "--no-overwrite"]), "Pool fsp built\n\n");
    let blkid =
        Command::new("blkid").args(["-p", "-o", "value", "-s", "TYPE", &device.device]).output().expect("blkid");
    assert_eq!(String::from_utf8_lossy(&blkid.stdout).trim(), "ext4");
    let err = env.fails(&["pool-build", "fsp", "--no-overwrite"]);
    assert!(err.contains("already holds a ext4 filesystem"), "{err}");

    env.ok(&["pool-start", "fsp"]);
    assert!(mounted_at(&mount_point), "pool-start mounts the device");
    env.ok(&["vol-create-as", "fsp", "disk.qcow2", "16M", "--format", "qcow2"]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x33 0 1M", s(&mount_point.join("disk.qcow2"))]);
    assert!(env
        .ok(&["vol-list", "fsp"])
        .contains(&format!(" disk.qcow2   {}\n", mount_point.join("disk.qcow2").display())));
    let info: serde_json::Value = serde_json::from_str(&env.ok(&["pool-info", "fsp", "--json"])).expect("json");
    assert!(info["capacity"].as_u64().is_some_and(|c| c < 64 << 20), "the filesystem's size, not the host's: {info}");

    env.ok(&["pool-destroy", "fsp"]);
    assert!(!mounted_at(&mount_point), "pool-destroy unmounts");
    assert!(!mount_point.join("disk.qcow2").exists(), "the volume lives on the device");
    env.ok(&["pool-start", "fsp"]);
    qemu_io(&["-f", "qcow2", "-c", "read -P 0x33 0 1M", s(&mount_point.join("disk.qcow2"))]);
    env.ok(&["pool-destroy", "fsp"]);
    assert!(!mounted_at(&mount_point));
}
