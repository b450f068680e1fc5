//! Block jobs on a shut-off domain: the same commands run in
//! qemu-storage-daemon, update the persistent XML, and leave no daemon.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    assert_no_stray_processes, assert_recovered, domain_xml, end_block_job, make_chain, qemu_chain, qemu_img,
    test_processes, validate_xml, DiskSpec, JobCommand, Kill, TestEnv, JOB_STEPS, SERVER_STEPS,
};
use strata_core::xml::Domain;

const NAMES: [&str; 3] = ["base.qcow2", "mid.qcow2", "top.qcow2"];

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// A shut-off `vm` on base ← mid ← top, and a flattened reference copy.
fn setup(env: &TestEnv) -> (Vec<std::path::PathBuf>, std::path::PathBuf) {
    let chain = make_chain(env.dir.path(), &NAMES);
    let reference = env.path("ref.raw");
    qemu_img(&["convert", "-O", "raw", s(&chain[2]), s(&reference)]);
    env.define("vm", &domain_xml("vm", &[DiskSpec { target: "vda", format: "qcow2", path: &chain[2], extra: "" }]));
    (chain, reference)
}

/// The persistent chain of vda, top first, from `dumpxml --inactive`.
fn recorded(env: &TestEnv) -> Vec<String> {
    let xml = env.ok(&["dumpxml", "vm", "--inactive"]);
    validate_xml(&xml);
    let dom = Domain::parse(&xml).expect("domain xml");
    let chain = dom.find_disk("vda").expect("vda").chain.expect("chain");
    chain.main_line().iter().map(|l| l.source.to_string()).collect()
}

fn same_data(image: &Path, reference: &Path) {
    qemu_img(&["compare", "-F", "raw", s(image), s(reference)]);
}

/// No storage daemon or status is left once the job is recorded.
fn nothing_left(env: &TestEnv) {
    let dir = env.state_root().join("domains/vm");
    assert!(!dir.join("status.xml").exists(), "status left behind");
    assert!(!dir.join("run").exists(), "runtime files left behind");
    assert_eq!(env.ok(&["domstate", "vm"]).trim(), "shut off");
}

#[test]
fn offline_pull_flattens_and_records() {
    let env = TestEnv::new();
    let (chain, reference) = setup(&env);
    let out = env.ok(&["blockpull", "vm", "vda", "--wait", "--verbose"]);
    assert!(out.contains("Pull complete"), "{out}");
    assert_eq!(qemu_chain(&chain[2]), vec![(s(&chain[2]).to_string(), "qcow2".to_string())]);
    assert_eq!(recorded(&env), vec![s(&chain[2]).to_string()]);
    same_data(&chain[2], &reference);
    nothing_left(&env);
}

#[test]
fn offline_pull_with_base_keeps_the_base() {
    let env = TestEnv::new();
    let (chain, reference) = setup(&env);
    env.ok(&["blockpull", "vm", "vda", "--base", "vda[2]", "--wait"]);
    let on_disk: Vec<String> = qemu_chain(&chain[2]).into_iter().map(|(f, _)| f).collect();
    assert_eq!(on_disk, vec![s(&chain[2]).to_string(), s(&chain[0]).to_string()]);
    assert_eq!(recorded(&env), on_disk);
    same_data(&chain[2], &reference);
    nothing_left(&env);
}

#[test]
fn offline_commit_intermediate_and_active() {
    let env = TestEnv::new();
    let (chain, reference) = setup(&env);
    let out = env.ok(&["blockcommit", "vm", "vda", "--top", "vda[1]", "--base", "vda[2]", "--wait"]);
    assert!(out.contains("Commit complete"), "{out}");
    let on_disk: Vec<String> = qemu_chain(&chain[2]).into_iter().map(|(f, _)| f).collect();
    assert_eq!(on_disk, vec![s(&chain[2]).to_string(), s(&chain[0]).to_string()]);
    assert_eq!(recorded(&env), on_disk);
    same_data(&chain[2], &reference);
    nothing_left(&env);

    let out = env.ok(&["blockcommit", "vm", "vda", "--active", "--pivot"]);
    assert!(out.contains("Successfully pivoted"), "{out}");
    assert_eq!(recorded(&env), vec![s(&chain[0]).to_string()]);
    same_data(&chain[0], &reference);
    nothing_left(&env);
    // The domain starts on the committed base.
    env.ok(&["start", "vm"]);
    let _guard = common::DomainGuard { env: &env, name: "vm".into() };
    let live = env.ok(&["domblklist", "vm"]);
    assert!(live.contains(s(&chain[0])), "{live}");
}

#[test]
fn offline_copy_pivot_and_finish() {
    let env = TestEnv::new();
    let (chain, reference) = setup(&env);
    let finished = env.path("finished.qcow2");
    let out = env.ok(&["blockcopy", "vm", "vda", s(&finished), "--finish"]);
    assert!(out.contains("Successfully copied"), "{out}");
    assert_eq!(recorded(&env)[0], s(&chain[2]), "--finish keeps the source");
    same_data(&finished, &reference);
    assert_eq!(qemu_chain(&finished).len(), 1, "a full copy stands alone");
    nothing_left(&env);

    let shallow = env.path("shallow.qcow2");
    let out = env.ok(&["blockcopy", "vm", "vda", "--dest", s(&shallow), "--shallow", "--pivot", "--verbose"]);
    assert!(out.contains("Successfully pivoted"), "{out}");
    let on_disk: Vec<String> = qemu_chain(&shallow).into_iter().map(|(f, _)| f).collect();
    assert_eq!(
        on_disk,
        vec![s(&shallow).to_string(), s(&chain[1]).to_string(), s(&chain[0]).to_string()],
        "a shallow copy is backed by the source's backing chain"
    );
    assert_eq!(recorded(&env), on_disk);
    same_data(&shallow, &reference);
    nothing_left(&env);
}

#[test]
fn offline_errors_leave_nothing_running() {
    let env = TestEnv::new();
    setup(&env);
    let err = env.fails(&["blockcommit", "vm", "vda", "--base", "vda[2]"]);
    assert!(err.contains("requires active flag"), "{err}");
    let err = env.fails(&["blockpull", "vm", "vdz"]);
    assert!(err.contains("vdz"), "{err}");
    assert!(env.ok(&["blockjob", "vm", "vda", "--info"]).contains("No current block job for vda"));
    let err = env.fails(&["blockjob", "vm", "vda", "--abort"]);
    assert!(err.contains("does not have an active block job"), "{err}");
    nothing_left(&env);
}

/// A domain redefined onto another image while an offline pull runs keeps
/// that image when the pull ends: as in libvirt, a job's new chain goes only
/// to a persistent disk still on the image the job ran on.
#[test]
fn a_disk_redefined_during_a_job_keeps_its_new_image() {
    let env = TestEnv::new();
    let (chain, reference) = setup(&env);
    env.ok(&["blockpull", "vm", "vda", "--bandwidth", "16384", "--bytes"]);
    let other = env.path("other.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&other), "16M"]);
    env.define("vm", &domain_xml("vm", &[DiskSpec { target: "vda", format: "qcow2", path: &other, extra: "" }]));
    env.ok(&["blockjob", "vm", "vda", "--bandwidth", "0"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !env.ok(&["blockjob", "vm", "vda", "--info"]).contains("No current block job for vda") {
        assert!(std::time::Instant::now() < deadline, "the pull did not end");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(recorded(&env), vec![s(&other).to_string()], "the redefined disk lost its image");
    // The pull itself was done, on the image it ran on.
    assert_eq!(qemu_chain(&chain[2]), vec![(s(&chain[2]).to_string(), "qcow2".to_string())]);
    same_data(&chain[2], &reference);
    nothing_left(&env);
}

/// An offline job command killed (`kill`), then the next command
/// (`blockjob --info`): no process is left that no record names, and a
/// storage daemon only while the user's job is recorded on it. Once that
/// job has ended nothing runs, the recorded chain matches the images, the
/// data is intact, every image opens for writing and a new job runs.
fn killed_job_leaves_no_helper(command: JobCommand, kill: Kill) {
    let env = TestEnv::new();
    let (_, reference) = setup(&env);
    let when = format!("{command:?} killed {kill:?}");
    kill.run(&env, &command.args(&env.path("copy.qcow2")));
    env.ok(&["blockjob", "vm", "vda", "--info"]);
    assert_no_stray_processes(&env, &when);
    end_block_job(&env);
    assert_eq!(test_processes(&env), Vec::new(), "{when}: processes left once the job ended");
    // A kill before the record may leave the runtime directory (the next
    // start clears it), never a status.
    assert!(!env.state_root().join("domains/vm/status.xml").exists(), "{when}: status left behind");
    assert_eq!(env.ok(&["domstate", "vm"]).trim(), "shut off", "{when}");
    same_data(Path::new(&recorded(&env)[0]), &reference);
    assert_recovered(&env, &when);
    assert_eq!(env.ok(&["blockpull", "vm", "vda", "--wait"]).trim(), "Pull complete", "{when}");
}

/// Each command killed at every step of starting its storage daemon and
/// its job, and of recording the job's end.
#[test]
fn offline_jobs_killed_at_each_step_leave_no_helper() {
    for command in JobCommand::ALL {
        for step in SERVER_STEPS.into_iter().chain(JOB_STEPS) {
            killed_job_leaves_no_helper(command, Kill::At(step));
        }
    }
}

/// The same, killed anywhere in the first 150 ms (a few times per command).
#[test]
fn offline_jobs_killed_at_random_moments_leave_no_helper() {
    for command in JobCommand::ALL {
        for kill in Kill::random(4, Duration::from_millis(150)) {
            killed_job_leaves_no_helper(command, kill);
        }
    }
}

/// A block job's disk may be a filesystem, named by its target dir or its
/// image, as every command names it: `blockjob vm / --info` finds the
/// root filesystem of a shut-off domain.
#[test]
fn a_filesystem_is_named_by_its_target_dir_or_its_image() {
    let env = TestEnv::new();
    let chain = make_chain(env.dir.path(), &NAMES);
    let root = env.path("root.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&root), "1M"]);
    let root_fs = format!(
        "<filesystem type='file' accessmode='passthrough'><driver type='loop' format='qcow2'/>\
         <source file='{}'/><target dir='/'/></filesystem>\n</devices>",
        s(&root)
    );
    let xml = domain_xml("vm", &[DiskSpec { target: "vda", format: "qcow2", path: &chain[2], extra: "" }]);
    env.define("vm", &xml.replace("</devices>", &root_fs));
    assert_eq!(env.ok(&["blockjob", "vm", "/", "--info"]).trim(), "No current block job for /");
    assert_eq!(env.ok(&["blockjob", "vm", s(&root), "--info"]).trim(), "No current block job for /");
    assert_eq!(env.ok(&["blockjob", "vm", s(&chain[2]), "--info"]).trim(), "No current block job for vda");
    let err = env.fails(&["blockjob", "vm", "/srv", "--info"]);
    assert!(err.contains("no disk or filesystem '/srv' in domain 'vm' (its disks: vda; its filesystems: /)"), "{err}");
    nothing_left(&env);
}
