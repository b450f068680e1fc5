//! `qemu-img` runs leave the async runtime free while they wait. The tool
//! here is a shell script standing in for `qemu-img` (named by
//! `$STRATA_QEMU_IMG`, which is why this test has a process of its own):
//! it waits until the test, on the same single-threaded runtime, has
//! written a file, which it can only do while the run waits elsewhere.

use std::os::unix::fs::PermissionsExt;

use strata_core::store::Store;

#[tokio::test]
async fn a_qemu_img_run_leaves_the_runtime_free() {
    let dir = tempfile::tempdir().expect("temp dir");
    let go = dir.path().join("go");
    let tool = dir.path().join("fake-qemu-img");
    // Gives up after about a minute (a hang guard, not a timing), so that
    // a run that holds the runtime fails instead of hanging.
    let script = format!(
        "#!/bin/sh\nn=0\nwhile [ ! -e '{}' ]; do\n  n=$((n+1)); [ $n -gt 6000 ] && exit 1\n  /bin/sleep 0.01\ndone\n",
        go.display()
    );
    std::fs::write(&tool, script).expect("write the stand-in tool");
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).expect("make it executable");
    std::env::set_var("STRATA_QEMU_IMG", &tool);

    let store = Store::open(dir.path().join("state")).expect("store");
    store.write_domain("vm", "<domain><name>vm</name></domain>").expect("define");
    let operation = store.lock_domain_operation("vm").expect("operation lock");
    let run = tokio::spawn(async move { strata_engine::image_work::run(&operation, &["info"]).await });
    // The current-thread runtime runs this task only while the run waits
    // off it.
    tokio::task::yield_now().await;
    std::fs::write(&go, "").expect("write the file the tool waits for");
    run.await.expect("join").expect("the stand-in tool saw the file and exited successfully");
}
