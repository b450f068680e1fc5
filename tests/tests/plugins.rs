//! Third-party driver plugins (issue 14) through the `strata` command: the
//! Rust example (`tests/plugins/example-rust`, built with cargo) and the C
//! example (`tests/plugins/example-c`, built here with `cc` from
//! `sdk/include/strata_driver.h` alone), each put in a temporary
//! `$STRATA_PLUGIN_DIR` (or under the executable's prefix) and opened by
//! URI. Both keep their state in a directory, so each command's `strata`
//! sees what the one before did. Covered: the ordinary commands on both,
//! `capabilities --all`, the refusals (another ABI version, a library
//! others could change, a scheme already served), a panic, a callback
//! used after it was stopped, a cancelled call, and the C driver in
//! docs/plugins.md.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{domain_xml, DiskSpec, TestEnv};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Rust example's library, built once per test run with cargo.
fn rust_plugin() -> &'static Path {
    static LIBRARY: OnceLock<PathBuf> = OnceLock::new();
    LIBRARY.get_or_init(|| {
        let out = Command::new(env!("CARGO"))
            .args([
                "build",
                "--offline",
                "--locked",
                "--message-format=json",
                "-p",
                "strata-example-rust",
                "--manifest-path",
            ])
            .arg(workspace().join("Cargo.toml"))
            .output()
            .expect("run cargo");
        assert!(out.status.success(), "cargo build of example-rust failed:\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "strata_example_rust")
            .flat_map(|m| m["filenames"].as_array().cloned().unwrap_or_default())
            .filter_map(|f| f.as_str().map(PathBuf::from))
            .find(|f| f.extension().is_some_and(|e| e == "so"))
            .expect("cargo names the example's .so")
    })
}

/// Builds the C example into `dir` with `cc`, from the header alone,
/// claiming ABI version `abi` when given.
fn build_c_plugin(dir: &Path, abi: Option<u32>) -> PathBuf {
    let defines: Vec<String> = abi.map(|abi| format!("-DEXAMPLEC_ABI_VERSION={abi}")).into_iter().collect();
    build_c_example_as(&dir.join("libexamplec.so"), &defines)
}

/// The C example built into `library` with the extra `defines`.
fn build_c_example_as(library: &Path, defines: &[String]) -> PathBuf {
    compile_c_plugin(&workspace().join("tests/plugins/example-c/example.c"), library, defines)
}

/// Compiles the C driver `source` into the shared library `library` with
/// `cc` and nothing but the SDK's header.
fn compile_c_plugin(source: &Path, library: &Path, defines: &[String]) -> PathBuf {
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-Wall", "-Wextra", "-I"])
        .arg(workspace().join("sdk/include"))
        .arg("-o")
        .arg(library)
        .arg(source)
        .arg("-lpthread")
        .args(defines)
        .output()
        .expect("cc must be installed to build the C plugins");
    assert!(out.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&out.stderr));
    set_mode(library, 0o755);
    library.to_path_buf()
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A test environment whose `strata` finds plugins in its `plugins` dir,
/// keeps the examples' state in its `example-state` dir and opens `uri`.
fn plugin_env(uri: &str) -> TestEnv {
    let mut env = TestEnv::new();
    let (plugins, state) = (env.path("plugins"), env.path("example-state"));
    std::fs::create_dir_all(&plugins).expect("plugin dir");
    env.vars.push(("STRATA_PLUGIN_DIR".into(), plugins));
    env.vars.push(("STRATA_EXAMPLE_STATE".into(), state));
    env.uri = uri.to_string();
    env
}

/// Copies the Rust example into the environment's plugin dir.
fn install_rust_plugin(env: &TestEnv) -> PathBuf {
    let installed = env.path("plugins/libstrata_example_rust.so");
    std::fs::copy(rust_plugin(), &installed).expect("copy the plugin");
    set_mode(&installed, 0o755);
    installed
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A domain of the fixtures' minimal kind with the disks `targets`.
fn define_vm1(env: &TestEnv, targets: &[&str]) {
    let image = env.path("unused.qcow2");
    let disks: Vec<DiskSpec> =
        targets.iter().map(|target| DiskSpec { target, format: "qcow2", path: &image, extra: "" }).collect();
    env.define("vm1", &domain_xml("vm1", &disks));
}

/// define/list/dumpxml, snapshots created, listed and reverted to, disk
/// sets and events, on the driver `env.uri` names.
fn exercise_driver(env: &TestEnv) {
    define_vm1(env, &["vda"]);
    let listed = env.ok(&["list", "--all"]);
    assert!(
        listed.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["-", "vm1", "shut", "off"]),
        "{listed}"
    );
    let xml = env.ok(&["dumpxml", "vm1"]);
    assert!(xml.contains("<name>vm1</name>") && xml.contains("dev='vda'"), "{xml}");
    assert!(!xml.contains("dev='vdb'"), "{xml}");

    assert_eq!(env.ok(&["snapshot-create-as", "vm1", "s1"]).trim(), "Domain snapshot s1 created");
    define_vm1(env, &["vda", "vdb"]);
    assert!(env.ok(&["dumpxml", "vm1"]).contains("dev='vdb'"), "the redefinition did not happen");
    assert_eq!(env.ok(&["snapshot-create-as", "vm1", "s2"]).trim(), "Domain snapshot s2 created");
    let parents = env.ok(&["snapshot-list", "vm1", "--parent"]);
    let rows: Vec<Vec<&str>> = parents.lines().skip(2).map(|l| l.split_whitespace().collect()).collect();
    // Name, creation date, time and zone, state, and the parent when there is one.
    let names_and_parents: Vec<(&str, Option<&str>)> =
        rows.iter().filter(|r| !r.is_empty()).map(|r| (r[0], r.get(5).copied())).collect();
    assert_eq!(names_and_parents, [("s1", None), ("s2", Some("s1"))], "{parents}");

    assert_eq!(env.ok(&["snapshot-revert", "vm1", "s1"]).trim(), "Domain snapshot s1 reverted");
    let reverted = env.ok(&["dumpxml", "vm1"]);
    assert!(reverted.contains("dev='vda'") && !reverted.contains("dev='vdb'"), "{reverted}");
    assert_eq!(env.ok(&["snapshot-current", "vm1", "--name"]).trim(), "s1");

    assert_eq!(env.ok(&["diskset-add", "vm1", "vda"]).trim(), "Disk 'vda' added to the disk set");
    assert_eq!(env.ok(&["diskset-add", "vm1", "vda"]).trim(), "Disk 'vda' is already in the disk set");
    let refused = env.fails(&["diskset-add", "vm1", "vdz"]);
    assert!(refused.starts_with("error: ") && refused.contains("vdz"), "{refused}");
    assert_eq!(env.ok(&["diskset-list", "vm1"]).trim(), "vda");
    assert_eq!(env.ok(&["diskset-size", "vm1"]).trim(), "1");
    assert_eq!(env.ok(&["diskset-remove", "vm1", "vda"]).trim(), "Disk 'vda' removed from the disk set");
    assert_eq!(env.ok(&["diskset-size", "vm1"]).trim(), "0");

    // The start's event reaches the host's callback and waits there for `event`.
    let events = env.ok(&["start vm1 ; event --domain vm1 --timeout 60"]);
    assert!(events.contains("event 'lifecycle' for domain 'vm1': Started Booted"), "{events}");
    assert!(env.ok(&["list"]).contains("running"));
    env.ok(&["destroy", "vm1"]);
}

#[test]
fn the_rust_example_plugin_runs_the_ordinary_commands() {
    let env = plugin_env("example:///");
    install_rust_plugin(&env);
    exercise_driver(&env);
}

#[test]
fn the_c_example_plugin_built_from_the_header_runs_the_ordinary_commands() {
    let env = plugin_env("examplec:///");
    build_c_plugin(&env.path("plugins"), None);
    exercise_driver(&env);
    // What the C example leaves out is refused with the no-support error.
    let refused = env.fails(&["snapshot-dumpxml", "vm1", "s1"]);
    assert_eq!(
        refused.trim(),
        "error: this function is not supported by the connection driver: the examplec driver does not support snapshot_xml"
    );
}

#[test]
fn capabilities_all_lists_built_in_and_plugin_drivers() {
    let env = plugin_env("example:///");
    let rust = install_rust_plugin(&env);
    let c = build_c_plugin(&env.path("plugins"), None);
    let table = env.ok(&["capabilities", "--all"]);
    let rows: Vec<Vec<&str>> = table.lines().skip(2).map(|l| l.split_whitespace().collect()).collect();
    let (rust, c) = (rust.display().to_string(), c.display().to_string());
    assert!(rows.contains(&vec!["qemu", "qemu", "built-in", "1", "-"]), "{table}");
    assert!(rows.contains(&vec!["example", "example", "plugin", "1", &rust]), "{table}");
    assert!(rows.contains(&vec!["examplec", "examplec", "plugin", "1", &c]), "{table}");

    let json: serde_json::Value = serde_json::from_str(&env.ok(&["capabilities", "--all", "--json"])).expect("JSON");
    let example = json["drivers"].as_array().expect("drivers").iter().find(|d| d["name"] == "example").cloned();
    assert_eq!(
        example,
        Some(serde_json::json!({
            "name": "example", "schemes": ["example"], "origin": "plugin", "abi_version": 1, "library": rust
        }))
    );
    assert_eq!(json["refused"], serde_json::json!([]));
}

#[test]
fn a_plugin_of_another_abi_version_is_refused_naming_both_versions() {
    let env = plugin_env("examplec:///");
    let library = build_c_plugin(&env.path("plugins"), Some(7));
    let expected = format!(
        "driver plugin '{}' is not loaded: it speaks driver ABI version 7, but this strata speaks version 1",
        library.display()
    );
    let refused = env.fails(&["list", "--all"]);
    assert!(refused.starts_with("error: failed to connect to the hypervisor"), "{refused}");
    assert!(refused.contains(&expected), "{refused}");
    assert!(env.ok(&["capabilities", "--all"]).contains(&format!("Refused: {expected}")));
}

#[test]
fn a_plugin_claiming_a_scheme_already_served_is_refused() {
    let env = plugin_env("examplec:///");
    let first = build_c_plugin(&env.path("plugins"), None);
    let second = build_c_example_as(&env.path("plugins/libexamplec2.so"), &[]);
    let as_qemu = build_c_example_as(&env.path("plugins/libqemu.so"), &["-DEXAMPLEC_SCHEME=\"qemu\"".to_string()]);
    let listing = env.ok(&["capabilities", "--all"]);
    for (library, scheme) in [(&second, "examplec"), (&as_qemu, "qemu")] {
        let refused = format!(
            "Refused: driver plugin '{}' is not loaded: its scheme '{scheme}' is served by another driver",
            library.display()
        );
        assert!(listing.contains(&refused), "{listing}");
    }
    assert!(listing.contains(&first.display().to_string()), "{listing}");
    env.ok(&["list", "--all"]);
}

#[test]
fn a_panic_in_a_rust_plugin_is_an_error_and_the_connection_goes_on() {
    let mut env = plugin_env("example:///");
    install_rust_plugin(&env);
    define_vm1(&env, &["vda"]);
    env.vars.push(("STRATA_EXAMPLE_PANIC_IN".into(), PathBuf::from("domain_info")));
    let out = env.strata(&["dominfo vm1 ; list --all"]);
    assert_eq!(out.status.code(), Some(1), "strata must exit 1, not die: {out:?}");
    let stderr = stderr_of(&out);
    assert!(
        stderr.contains(
            "error: internal error: the example driver panicked in domain_info: \
             domain_info was told to panic by STRATA_EXAMPLE_PANIC_IN"
        ),
        "{stderr}"
    );
    // The same process, the same connection: the next command is answered.
    assert!(String::from_utf8_lossy(&out.stdout).contains("vm1"), "{out:?}");
}

/// Opening the plugin's scheme fails, naming `library` and `why` it was
/// not loaded; returns the error.
fn assert_refused(env: &TestEnv, library: &Path, why: &str) -> String {
    let refused = env.fails(&["list", "--all"]);
    let expected = format!("driver plugin '{}' is not loaded: {why}", library.display());
    assert!(refused.contains(&expected), "{refused}");
    refused
}

#[test]
fn a_plugin_other_users_could_change_is_refused_naming_the_file() {
    let env = plugin_env("example:///");
    let library = install_rust_plugin(&env);
    set_mode(&library, 0o666);
    let refused = assert_refused(&env, &library, "it is writable by its group or by others (mode 0666)");
    assert!(refused.contains("no driver for 'example'"), "{refused}");

    set_mode(&library, 0o755);
    // SAFETY: geteuid(2) has no preconditions.
    let me = unsafe { libc::geteuid() };
    let other = if me == 65534 { 65533 } else { 65534 };
    std::os::unix::fs::chown(&library, Some(other), None).expect("chown (the tests run as root)");
    assert_refused(
        &env,
        &library,
        &format!("it is owned by uid {other}, neither root nor the current user (uid {me})"),
    );

    std::os::unix::fs::chown(&library, Some(me), None).expect("chown back");
    env.ok(&["list", "--all"]);
}

#[test]
fn a_plugin_notifying_through_a_stopped_callback_gets_an_error_and_nothing_crashes() {
    let mut env = plugin_env("examplec:///");
    build_c_plugin(&env.path("plugins"), None);
    define_vm1(&env, &["vda"]);
    env.vars.push(("STRATA_EXAMPLEC_NOTIFY_AFTER_STOP".into(), PathBuf::from("1")));
    let out = env.strata(&["start vm1 ; event --domain vm1 --timeout 60"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), stderr_of(&out));
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("event 'lifecycle' for domain 'vm1': Started Booted"), "{stdout}");
    // The plugin was told to stop (when the connection closed), notified
    // anyway, and was answered operation-aborted (78) by the host.
    assert!(stderr.contains("examplec: notified after being told to stop; the host answered 78"), "{stderr}");
    assert!(stderr.contains("a plugin notified through an unregistered callback; refused"), "{stderr}");
    assert!(!stdout.contains("Too late"), "{stdout}");
}

/// The C driver docs/plugins.md shows builds as it stands and lists its domain.
#[test]
fn the_c_driver_in_the_plugin_docs_builds_and_answers() {
    let env = plugin_env("hello:///");
    let docs = std::fs::read_to_string(workspace().join("docs/plugins.md")).expect("docs/plugins.md");
    let source = docs.split("```c\n").nth(1).and_then(|rest| rest.split("```").next()).expect("a C block");
    let file = env.path("hello.c");
    std::fs::write(&file, source).expect("write hello.c");
    compile_c_plugin(&file, &env.path("plugins/libhello.so"), &[]);
    let listed = env.ok(&["list", "--all"]);
    assert!(listed.contains("hello-vm") && listed.contains("shut off"), "{listed}");
    let refused = env.fails(&["dominfo", "hello-vm"]);
    assert_eq!(
        refused.trim(),
        "error: this function is not supported by the connection driver: the hello driver only lists its domain"
    );
}

/// Waits for `path` to exist (a hang guard, not a timing).
async fn wait_for_file(path: &Path, what: &str) {
    let guard = Instant::now() + Duration::from_secs(120);
    while !path.exists() {
        assert!(Instant::now() < guard, "{what}: {} never appeared", path.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A call the host gives up (its future dropped, as when `strata` is
/// interrupted) is cancelled in the plugin, whose driver sees its call end.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_the_host_gives_up_is_cancelled_in_the_plugin() {
    let env = plugin_env("example:///");
    install_rust_plugin(&env);
    let discovery = Box::leak(Box::new(strata_core::plugin::discover(&[env.path("plugins")], &[])));
    let plugin = discovery.find("example").expect("the example plugin loads");
    let state = env.path("example-state");
    let uri = format!("example:///?root={}&hang=list_domains", state.display());
    let conn = plugin.open(&strata_core::uri::ConnectUri::parse(&uri).expect("URI")).expect("open");
    let started = state.join("list_domains.started");
    tokio::select! {
        listed = conn.list_domains() => panic!("the hanging call returned: {listed:?}"),
        () = wait_for_file(&started, "the call") => {}
    }
    wait_for_file(&state.join("list_domains.cancelled"), "the cancellation").await;
}

/// Without `$STRATA_PLUGIN_DIR`, plugins are found in
/// `<prefix>/lib/strata/drivers`, the prefix being the directory above the
/// executable's.
#[test]
fn plugins_are_found_under_the_executables_prefix() {
    let env = plugin_env("example:///");
    let (bin, drivers) = (env.path("prefix/bin"), env.path("prefix/lib/strata/drivers"));
    std::fs::create_dir_all(&bin).expect("bin dir");
    std::fs::create_dir_all(&drivers).expect("drivers dir");
    let strata = bin.join("strata");
    let built = Path::new(env!("CARGO_BIN_EXE_strata-test-cli"));
    if std::fs::hard_link(built, &strata).is_err() {
        std::fs::copy(built, &strata).expect("copy strata");
    }
    let library = drivers.join("libstrata_example_rust.so");
    std::fs::copy(rust_plugin(), &library).expect("copy the plugin");
    set_mode(&library, 0o755);
    let out = Command::new(&strata)
        .args(["capabilities", "--all", "--json"])
        .env_remove("STRATA_PLUGIN_DIR")
        .output()
        .expect("run strata");
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let libraries: Vec<&str> =
        json["drivers"].as_array().expect("drivers").iter().filter_map(|d| d["library"].as_str()).collect();
    assert_eq!(libraries, [library.to_str().expect("utf8")]);
}
