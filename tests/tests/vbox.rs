//! The VirtualBox 4.2 driver through `strata -c vbox:///session`, against
//! the simulator built in this repository (`drivers/vbox/simulator`),
//! installed as `$VBOX_APP_HOME/VBoxXPCOMC.so`; its machines, media and
//! snapshots live in a JSON file under `$STRATA_VBOX_SIM_STATE`, so each
//! `strata` run is a new client of the same VirtualBox.

mod common;

use std::path::{Path, PathBuf};

use common::{qemu_img, TestEnv};
use strata_core::chain::StorageSource;
use strata_core::xml::Domain;

/// The simulator's library, built beside the test binaries (as a
/// dependency of these tests in deps/, by a workspace build one level up:
/// the newer of the two).
fn simulator_library() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_strata-test-cli"));
    let dir = bin.parent().expect("target dir");
    [dir.join("libstrata_vbox_simulator.so"), dir.join("deps/libstrata_vbox_simulator.so")]
        .into_iter()
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
        .unwrap_or_else(|| panic!("libstrata_vbox_simulator.so is not built in {}", dir.display()))
}

/// A test's VirtualBox: the simulator as `home/VBoxXPCOMC.so`, its state in `vbox-state/`.
fn vbox_env() -> TestEnv {
    let mut env = TestEnv::new();
    let home = env.path("home");
    std::fs::create_dir(&home).expect("mkdir home");
    std::os::unix::fs::symlink(simulator_library(), home.join("VBoxXPCOMC.so")).expect("install the simulator");
    env.uri = "vbox:///session".into();
    env.vars = vec![("VBOX_APP_HOME".into(), home), ("STRATA_VBOX_SIM_STATE".into(), env.path("vbox-state"))];
    env
}

/// Defines `vm1` (256 MiB, 2 vCPUs) with a 64 MiB VDI made by qemu-img as sda; returns the image.
fn define_vm1(env: &TestEnv) -> PathBuf {
    let image = env.path("base.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", image.to_str().expect("utf8"), "64M"]);
    let xml = format!(
        "<domain type='vbox'><name>vm1</name><memory unit='MiB'>256</memory><vcpu>2</vcpu>\
         <os><type>hvm</type></os><devices><disk type='file' device='disk'>\
         <driver name='vbox' type='vdi'/><source file='{}'/><target dev='sda' bus='sata'/>\
         </disk></devices></domain>",
        image.display()
    );
    assert!(env.define("vm1", &xml).contains("Domain 'vm1' defined"));
    image
}

/// The image paths of vm1's sda as dumpxml gives them, active layer first.
fn sda_chain(env: &TestEnv) -> Vec<PathBuf> {
    let dom = Domain::parse(&env.ok(&["dumpxml", "vm1"])).expect("domain XML");
    let disk = dom.find_disk("sda").expect("sda");
    let chain = disk.chain.expect("a chain");
    let mut paths = Vec::new();
    let mut next = Some(0);
    while let Some(i) = next {
        let layer = &chain.layers[i];
        let StorageSource::File { path } = &layer.source else { panic!("not a file: {layer:?}") };
        assert_eq!(layer.format.as_deref(), Some("vdi"), "{layer:?}");
        paths.push(path.clone());
        next = match &layer.backing {
            strata_core::chain::Backing::Layers(below) => below.first().copied(),
            _ => None,
        };
    }
    paths
}

fn state_of(env: &TestEnv, domain: &str) -> String {
    env.ok(&["domstate", domain]).trim().to_string()
}

fn snapshot_names(env: &TestEnv) -> Vec<String> {
    env.ok(&["snapshot-list", "vm1", "--name"]).lines().filter(|l| !l.is_empty()).map(str::to_string).collect()
}

#[test]
fn list_without_virtualbox_names_every_place_tried() {
    let env = vbox_env();
    let empty = env.path("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let out = env.command(&["list"]).env("VBOX_APP_HOME", &empty).output().expect("run strata");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("VirtualBox 4.2 is not installed: no usable VBoxXPCOMC.so found"), "{stderr}");
    assert!(
        stderr.contains(&format!("{}/VBoxXPCOMC.so ($VBOX_APP_HOME): cannot be loaded", empty.display())),
        "{stderr}"
    );
    for dir in strata_vbox::xpcom::KNOWN_DIRS {
        assert!(stderr.contains(&format!("{dir}/VBoxXPCOMC.so: no such file")), "{dir} missing from {stderr}");
    }
    assert!(stderr.contains("VBoxXPCOMC.so (the dynamic linker's search path): cannot be loaded"), "{stderr}");
}

#[test]
fn another_virtualbox_version_is_refused_naming_it() {
    let env = vbox_env();
    let out = env.command(&["list"]).env("STRATA_VBOX_SIM_VERSION", "4.3.12").output().expect("run strata");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("VirtualBox 4.3.12 found") && stderr.contains("speaks the VirtualBox 4.2 API only"),
        "{stderr}"
    );
    assert!(stderr.contains("VBoxXPCOMC.so ($VBOX_APP_HOME): VirtualBox 4.3.12, not 4.2"), "{stderr}");
    // The same library reporting 4.2.6 is taken.
    assert!(env.ok(&["list", "--all"]).contains("Name"));
}

#[test]
fn define_list_dumpxml_start_destroy_undefine() {
    let env = vbox_env();
    let image = define_vm1(&env);
    let settings = env.path("vbox-state/Machines/vm1/vm1.vbox");
    assert!(settings.exists(), "RegisterMachine wrote no settings file");
    let listed = env.ok(&["list", "--all"]);
    assert!(listed.lines().any(|l| l.contains("vm1") && l.contains("shut off")), "{listed}");
    let dom = Domain::parse(&env.ok(&["dumpxml", "vm1"])).expect("domain XML");
    assert_eq!(dom.name(), "vm1");
    assert_eq!(dom.memory_kib(), Some(256 * 1024));
    assert_eq!(dom.vcpus(), 2);
    assert_eq!(sda_chain(&env), vec![image.clone()]);

    assert!(env.ok(&["start", "vm1"]).contains("Domain 'vm1' started"));
    // Another client (a new process) sees it running.
    assert_eq!(state_of(&env, "vm1"), "running");
    let info = env.ok(&["dominfo", "vm1"]);
    assert!(info.contains("CPU(s):         2") && info.contains("Max memory:     262144 KiB"), "{info}");
    assert!(env.fails(&["start", "vm1"]).contains("domain is already running"));
    assert!(env.ok(&["destroy", "vm1"]).contains("Domain 'vm1' destroyed"));
    assert_eq!(state_of(&env, "vm1"), "shut off");
    env.ok(&["start", "vm1"]);
    env.ok(&["shutdown", "vm1"]);
    assert_eq!(state_of(&env, "vm1"), "shut off");

    env.ok(&["undefine", "vm1"]);
    assert!(!env.ok(&["list", "--all"]).contains("vm1"));
    assert!(!settings.exists(), "Delete left the settings file");
    assert!(image.exists(), "undefine removed the disk image");
}

#[test]
fn dumpxml_shows_a_three_deep_differencing_chain() {
    let env = vbox_env();
    let base = define_vm1(&env);
    for s in ["s1", "s2", "s3"] {
        assert!(env.ok(&["snapshot-create-as", "vm1", s]).contains(&format!("Domain snapshot {s} created")));
    }
    let chain = sda_chain(&env);
    assert_eq!(chain.len(), 4, "{chain:?}");
    assert_eq!(chain[3], base);
    let snapshots_dir = env.path("vbox-state/Machines/vm1/Snapshots");
    for diff in &chain[..3] {
        assert_eq!(diff.parent(), Some(snapshots_dir.as_path()), "{diff:?}");
        assert!(diff.exists(), "differencing image {diff:?} missing");
    }
    let xml = env.ok(&["dumpxml", "vm1"]);
    assert_eq!(xml.matches("<backingStore type='file'").count(), 3, "{xml}");
    assert_eq!(xml.matches("<backingStore/>").count(), 1, "{xml}");
}

#[test]
fn snapshots_create_list_revert_and_delete_with_children() {
    let env = vbox_env();
    let base = define_vm1(&env);
    for s in ["s1", "s2", "s3"] {
        env.ok(&["snapshot-create-as", "vm1", s, "--description", &format!("state {s}")]);
    }
    let parents = env.ok(&["snapshot-list", "vm1", "--parent"]);
    let s3 = parents.lines().find(|l| l.trim_start().starts_with("s3")).unwrap_or_else(|| panic!("{parents}"));
    assert_eq!(s3.split_whitespace().last(), Some("s2"), "{parents}");
    assert_eq!(env.ok(&["snapshot-current", "vm1", "--name"]).trim(), "s3");
    assert_eq!(env.ok(&["snapshot-parent", "vm1", "s2"]).trim(), "s1");
    let s1 = env.ok(&["snapshot-dumpxml", "vm1", "s1"]);
    assert!(s1.contains("<name>s1</name>") && s1.contains("<description>state s1</description>"), "{s1}");
    assert!(s1.contains("<state>shutoff</state>"), "{s1}");

    // Back to s1: a new differencing image on the base s1 froze.
    env.ok(&["snapshot-revert", "vm1", "s1"]);
    assert_eq!(env.ok(&["snapshot-current", "vm1", "--name"]).trim(), "s1");
    let chain = sda_chain(&env);
    assert_eq!(chain.len(), 2, "{chain:?}");
    assert_eq!(chain[1], base);
    // A branch from s1, beside s2.
    env.ok(&["snapshot-create-as", "vm1", "s4"]);
    assert_eq!(env.ok(&["snapshot-parent", "vm1", "s4"]).trim(), "s1");

    // s2 and its child s3 go, leaves first; s1 and s4 stay.
    let deleted = env.ok(&["snapshot-delete", "vm1", "s2", "--children"]);
    assert!(deleted.contains("Domain snapshot s2 and all children deleted"), "{deleted}");
    assert_eq!(snapshot_names(&env), ["s1", "s4"]);
    env.ok(&["snapshot-delete", "vm1", "s1"]);
    assert_eq!(snapshot_names(&env), ["s4"]);
    env.ok(&["snapshot-delete", "vm1", "s4"]);
    assert!(snapshot_names(&env).is_empty());
    assert_eq!(sda_chain(&env), vec![base]);

    // A long operation shows VirtualBox's progress on stderr.
    let out = env
        .command(&["snapshot-create-as", "vm1", "slow"])
        .env("STRATA_VBOX_SIM_STEP_MS", "100")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.lines().filter(|l| l.starts_with("Snapshot create: [")).count() >= 3, "no progress: {stderr}");
    assert!(stderr.contains("Snapshot create: [100 %]"), "{stderr}");
    env.ok(&["snapshot-delete", "vm1", "slow"]);

    // Online: the snapshot holds the running state.
    env.ok(&["start", "vm1"]);
    env.ok(&["snapshot-create-as", "vm1", "live"]);
    let list = env.ok(&["snapshot-list", "vm1"]);
    assert!(list.lines().any(|l| l.trim_start().starts_with("live") && l.contains("running")), "{list}");
    env.ok(&["destroy", "vm1"]);
}

#[test]
fn merge_and_clone_jobs_run_with_progress() {
    let env = vbox_env();
    let base = define_vm1(&env);
    for s in ["s1", "s2", "s3"] {
        env.ok(&["snapshot-create-as", "vm1", s]);
    }
    let chain = sda_chain(&env);
    let (active, d2, d1) = (chain[0].clone(), chain[1].clone(), chain[2].clone());
    let slow = |args: &[&str]| {
        let out = env.command(args).env("STRATA_VBOX_SIM_STEP_MS", "100").output().expect("run strata");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{args:?}: {stdout}{stderr}");
        (stdout.into_owned(), stderr.into_owned())
    };

    // Pull: d2 merged up into the active image (MergeTo), the chain one shorter.
    let (stdout, stderr) =
        slow(&["blockpull", "vm1", "sda", "--base", d1.to_str().expect("utf8"), "--wait", "--verbose"]);
    assert!(stdout.contains("Pull complete"), "{stdout}");
    assert!(stderr.lines().filter(|l| l.starts_with("Block Pull: [")).count() >= 2, "no progress: {stderr}");
    assert!(stderr.contains("Block Pull: [100 %]"), "{stderr}");
    assert_eq!(sda_chain(&env), vec![active.clone(), d1.clone(), base.clone()]);
    assert!(!d2.exists(), "the merged image {d2:?} is still there");

    // Commit: d1 merged down into the base.
    let (stdout, stderr) =
        slow(&["blockcommit", "vm1", "sda", "--top", d1.to_str().expect("utf8"), "--wait", "--verbose"]);
    assert!(stdout.contains("Commit complete"), "{stdout}");
    assert!(stderr.contains("Block commit: [100 %]"), "{stderr}");
    assert_eq!(sda_chain(&env), vec![active.clone(), base.clone()]);
    assert!(!d1.exists());

    // An active commit is VirtualBox's to refuse by capability.
    let refused = env.fails(&["blockcommit", "vm1", "sda", "--active", "--pivot"]);
    assert!(refused.contains("the vbox driver cannot run an active block commit"), "{refused}");

    // Copy: CloneTo a new image; --pivot attaches it in place of the source.
    let copy = env.path("copy.vdi");
    let (stdout, stderr) = slow(&["blockcopy", "vm1", "sda", copy.to_str().expect("utf8"), "--verbose", "--pivot"]);
    assert!(stdout.contains("Successfully pivoted"), "{stdout}");
    assert!(stderr.contains("Block Copy: [100 %]"), "{stderr}");
    assert_eq!(std::fs::read(&copy).expect("the copy"), std::fs::read(&active).expect("the source"));
    assert_eq!(sda_chain(&env), vec![copy.clone()]);

    // A clone that fails at the end carries IVirtualBoxErrorInfo's text.
    let failed = env.fails(&["blockcopy", "vm1", "sda", "/nonexistent-dir/x.vdi", "--wait", "--finish"]);
    assert!(failed.contains("block copy failed") && failed.contains("/nonexistent-dir/x.vdi"), "{failed}");
    assert!(failed.contains("VBOX_E_FILE_ERROR"), "{failed}");

    // Running, the media are the VM's: refused.
    env.ok(&["start", "vm1"]);
    let busy = env.fails(&["blockcopy", "vm1", "sda", env.path("c2.vdi").to_str().expect("utf8"), "--wait"]);
    assert!(busy.contains("domain 'vm1' is running"), "{busy}");
    env.ok(&["destroy", "vm1"]);
}

#[test]
fn the_disk_set_lives_in_the_machines_extra_data() {
    let env = vbox_env();
    define_vm1(&env);
    assert!(env.ok(&["diskset-list", "vm1"]).trim().is_empty());
    env.ok(&["diskset-add", "vm1", "sda"]);
    // A new process reads it back from VirtualBox.
    assert_eq!(env.ok(&["diskset-list", "vm1"]).trim(), "sda");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.path("vbox-state/vbox.json")).expect("simulator state"))
            .expect("JSON");
    assert_eq!(state["machines"][0]["extra_data"]["strata/disk-set"], "sda");
    let unknown = env.fails(&["diskset-add", "vm1", "sdz"]);
    assert!(unknown.starts_with("error: ") && unknown.contains("sdz"), "{unknown}");
    env.ok(&["diskset-remove", "vm1", "sda"]);
    assert!(env.ok(&["diskset-list", "vm1"]).trim().is_empty());
}

#[test]
fn virtualbox_errors_give_clear_messages() {
    let env = vbox_env();
    define_vm1(&env);
    env.ok(&["snapshot-create-as", "vm1", "s1"]);

    // Object not found.
    assert!(env.fails(&["dumpxml", "nosuch"]).contains("error: failed to get domain 'nosuch'"));
    let no_snapshot = env.fails(&["snapshot-revert", "vm1", "nosnap"]);
    assert!(no_snapshot.contains("no domain snapshot with matching name 'nosnap'"), "{no_snapshot}");

    // Machine locked: the running VM holds the machine.
    env.ok(&["start", "vm1"]);
    let locked = env.fails(&["undefine", "vm1", "--snapshots-metadata"]);
    assert!(locked.contains("domain 'vm1' is locked") && locked.contains("VBOX_E_INVALID_OBJECT_STATE"), "{locked}");
    assert!(env.ok(&["list", "--all"]).contains("vm1"), "a refused undefine removed the domain");

    // Invalid machine state: no restore under a running VM.
    let running = env.fails(&["snapshot-revert", "vm1", "s1"]);
    assert!(
        running.contains("IConsole::RestoreSnapshot failed") && running.contains("VBOX_E_INVALID_VM_STATE"),
        "{running}"
    );
    env.ok(&["destroy", "vm1"]);
    assert!(env.fails(&["destroy", "vm1"]).contains("domain is not running"));

    // Invalid object state: a snapshot with two children cannot be deleted alone.
    env.ok(&["snapshot-create-as", "vm1", "s2"]);
    env.ok(&["snapshot-revert", "vm1", "s1"]);
    env.ok(&["snapshot-create-as", "vm1", "s3"]);
    let branches = env.fails(&["snapshot-delete", "vm1", "s1"]);
    assert!(branches.contains("VBOX_E_INVALID_OBJECT_STATE"), "{branches}");
    assert_eq!(snapshot_names(&env), ["s1", "s2", "s3"]);

    // A defined name is taken.
    let again = env.path("again.xml");
    std::fs::write(&again, env.ok(&["dumpxml", "vm1"])).expect("write");
    assert!(env.fails(&["define", again.to_str().expect("utf8")]).contains("domain 'vm1' already exists"));
}
