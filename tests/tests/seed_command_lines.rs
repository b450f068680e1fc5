//! Every virsh command line the seeds quote (`/work/shared/seeds/*.txt`),
//! run verbatim through `strata -c URI`, with the seeds' image paths
//! replaced by this test's own, and checked for its effect: the chain on
//! disk (`qemu-img info --backing-chain`), the snapshots an image holds,
//! the output's layout and the exit status. Also `help`, the options virsh
//! accepts in each form, and `qemu-monitor-command`.

mod common;

use std::path::Path;

use common::{domain_xml, internal_snapshots, make_chain, qemu_chain, qemu_io, DiskSpec, DomainGuard, TestEnv};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// A seed's command line, `virsh` dropped, split as a shell would (the
/// seeds quote nothing).
fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().skip_while(|w| *w == "virsh").collect()
}

/// Defines `name` on the image at `path` (qcow2, as vda).
fn define_on(env: &TestEnv, name: &str, path: &Path) {
    env.define(name, &domain_xml(name, &[DiskSpec { target: "vda", format: "qcow2", path, extra: "" }]));
}

/// The (path, format) chain qemu-img reports, top first, expected to be
/// exactly these images, all qcow2.
fn assert_chain(top: &Path, expected: &[&Path]) {
    let want: Vec<(String, String)> = expected.iter().map(|p| (s(p).to_string(), "qcow2".to_string())).collect();
    assert_eq!(qemu_chain(top), want, "backing chain of {}", top.display());
}

/// `snapshot-list`'s table rows: the names, header and rule dropped.
fn listed_snapshots(env: &TestEnv, domain: &str) -> Vec<String> {
    let out = env.ok(&["snapshot-list", domain]);
    let mut lines = out.lines();
    assert!(lines
        .next()
        .is_some_and(|h| h.split_whitespace().collect::<Vec<_>>() == ["Name", "Creation", "Time", "State"]));
    assert!(lines.next().is_some_and(|rule| !rule.is_empty() && rule.chars().all(|c| c == '-')));
    lines.filter_map(|l| l.split_whitespace().next().map(str::to_string)).collect()
}

/// `domblklist`'s (target, source) rows.
fn blklist(env: &TestEnv, line: &str) -> Vec<(String, String)> {
    let out = env.ok(&words(line));
    let mut lines = out.lines();
    assert_eq!(lines.next().map(|h| h.split_whitespace().collect::<Vec<_>>()), Some(vec!["Target", "Source"]));
    lines
        .skip(1)
        .filter_map(|l| {
            let mut cols = l.split_whitespace();
            Some((cols.next()?.to_string(), cols.next()?.to_string()))
        })
        .collect()
}

/// Seed 003, "Create a disk-only internal snapshot", "Reverting to
/// snapshots" and "Deleting snapshots": snapshot-create-as with a name and
/// a description by position, snapshot-list, snapshot-revert --domain, and
/// both forms of snapshot-delete, on a shut-off domain.
#[test]
fn seed_internal_snapshot_lines() {
    let env = TestEnv::new();
    let image = make_chain(env.dir.path(), &["f17vm1.qcow2"]).remove(0);
    define_on(&env, "f17vm1", &image);

    let out = env.ok(&words("virsh snapshot-create-as f17vm1 snap1 snap1-desc"));
    assert_eq!(out.trim(), "Domain snapshot snap1 created");
    assert_eq!(internal_snapshots(&image), ["snap1"]);
    let xml = env.ok(&["snapshot-dumpxml", "f17vm1", "snap1"]);
    assert!(xml.contains("<description>snap1-desc</description>"), "{xml}");
    assert_eq!(listed_snapshots(&env, "f17vm1"), ["snap1"]);

    // The revert brings back the data snap1 holds.
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x77 0 1M", s(&image)]);
    let out = env.ok(&words("virsh snapshot-revert --domain f17vm1 snap1"));
    assert_eq!(out.trim(), "Domain snapshot snap1 reverted");
    qemu_io(&["-f", "qcow2", "-c", "read -P 0x11 0 1M", s(&image)]);

    // "Deleting (live/offline) Internal Snapshots": both forms, on a
    // domain named as the seed names it.
    let image = make_chain(env.dir.path(), &["f17vm.qcow2"]).remove(0);
    define_on(&env, "f17vm", &image);
    for line in ["virsh snapshot-delete --domain f17vm --snapshotname snap6", "virsh snapshot-delete f17vm snap6"] {
        env.ok(&["snapshot-create-as", "f17vm", "snap6"]);
        assert_eq!(internal_snapshots(&image), ["snap6"]);
        let out = env.ok(&words(line));
        assert!(out.contains("Domain snapshot snap6 deleted"), "{line}: {out}");
        assert!(internal_snapshots(&image).is_empty(), "{line} left the snapshot in the image");
        assert!(listed_snapshots(&env, "f17vm").is_empty());
    }
}

/// Seed 003, "Create a disk-only external snapshot", on a running domain:
/// domblklist before and after, and snapshot-create-as --domain with
/// --diskspec and --atomic; the overlay is on disk over the old image.
#[test]
fn seed_external_snapshot_lines() {
    let env = TestEnv::new();
    let base = make_chain(env.dir.path(), &["f17-base.qcow2"]).remove(0);
    let overlay = env.path("sn1-of-f17-base.qcow2");
    define_on(&env, "f17-base", &base);
    let _guard = DomainGuard { env: &env, name: "f17-base".into() };
    assert_eq!(env.ok(&words("virsh start f17-base")).trim(), "Domain 'f17-base' started");

    assert_eq!(blklist(&env, "virsh domblklist f17-base"), [("vda".to_string(), s(&base).to_string())]);
    let line = format!(
        "virsh snapshot-create-as --domain f17-base snap1 snap1-desc --disk-only --diskspec vda,snapshot=external,file={} --atomic",
        s(&overlay)
    );
    assert_eq!(env.ok(&words(&line)).trim(), "Domain snapshot snap1 created");
    assert_chain(&overlay, &[&overlay, &base]);
    assert_eq!(blklist(&env, "virsh domblklist f17-base"), [("vda".to_string(), s(&overlay).to_string())]);
}

/// Seed 003's blockcommit lines (method-a, then method-b's two commits on
/// a chain of its own), --domain with the disk by position and
/// --base/--top as paths, on a running domain.
#[test]
fn seed_blockcommit_lines() {
    let env = TestEnv::new();
    for (domain, lines, kept) in [
        ("f17", vec!["--base {sn1} --top {sn3}"], vec![4, 1, 0]),
        ("f17b", vec!["--base {sn2} --top {sn3}", "--base {sn1} --top {sn2}"], vec![4, 1, 0]),
    ] {
        let dir = env.path(domain);
        std::fs::create_dir(&dir).expect("mkdir");
        let chain = make_chain(&dir, &["base.qcow2", "sn1.qcow2", "sn2.qcow2", "sn3.qcow2", "sn4.qcow2"]);
        define_on(&env, domain, &chain[4]);
        let _guard = DomainGuard { env: &env, name: domain.into() };
        env.ok(&["start", domain]);
        for options in lines {
            let options =
                options.replace("{sn1}", s(&chain[1])).replace("{sn2}", s(&chain[2])).replace("{sn3}", s(&chain[3]));
            let line = format!("virsh blockcommit --domain {domain} vda {options} --wait --verbose");
            let out = env.strata(&words(&line));
            assert!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "Commit complete");
            assert!(String::from_utf8_lossy(&out.stderr).contains("Block commit: [100 %]"));
        }
        let expected: Vec<&Path> = kept.iter().map(|i| chain[*i].as_path()).collect();
        assert_chain(&chain[4], &expected);
        // The committed data is in sn1: MiB 2 and 3 hold sn2's and sn3's
        // patterns (read once QEMU has closed the image).
        env.ok(&["destroy", domain]);
        qemu_io(&["-f", "qcow2", "-c", "read -P 0x33 2M 1M", "-c", "read -P 0x44 3M 1M", s(&chain[1])]);
    }
}

/// Seed 003's Figure 5: external snapshots Snap-1…3 (and the active
/// overlay), then `blockpull --domain RootBase --path … --base …`, then
/// `snapshot-delete --domain RootBase Snap-N --metadata` for each: the
/// active image backs onto RootBase, and the records go while every image
/// stays. The seed's `--path var/lib/…/active.qcow2` lacks its leading
/// '/': libvirt reads a name without one as a target and refuses it, and
/// so does Strata; the line runs with the path absolute.
#[test]
fn seed_blockpull_to_base_and_snapshot_metadata_lines() {
    let env = TestEnv::new();
    let root = make_chain(env.dir.path(), &["RootBase.qcow2"]).remove(0);
    define_on(&env, "RootBase", &root);
    let _guard = DomainGuard { env: &env, name: "RootBase".into() };
    env.ok(&["start", "RootBase"]);
    let mut images = vec![root.clone()];
    for name in ["Snap-1", "Snap-2", "Snap-3", "active"] {
        let file = env.path(&format!("{name}.qcow2"));
        let spec = format!("vda,snapshot=external,file={}", s(&file));
        env.ok(&["snapshot-create-as", "RootBase", name, "--disk-only", "--diskspec", &spec]);
        images.push(file);
    }
    let active = env.path("active.qcow2");
    assert_chain(&active, &images.iter().rev().map(|p| p.as_path()).collect::<Vec<_>>());

    let relative = s(&active).trim_start_matches('/').to_string();
    let verbatim = format!("virsh blockpull --domain RootBase --path {relative} --base {} --wait --verbose", s(&root));
    let err = env.fails(&words(&verbatim));
    assert!(err.contains(&format!("disk '{relative}' not found in domain")), "{err}");

    let line = format!("virsh blockpull --domain RootBase --path {} --base {} --wait --verbose", s(&active), s(&root));
    assert_eq!(env.ok(&words(&line)).trim(), "Pull complete");
    assert_chain(&active, &[&active, &root]);

    for n in [3, 2, 1] {
        let out = env.ok(&words(&format!("virsh snapshot-delete --domain RootBase Snap-{n} --metadata")));
        assert!(out.contains(&format!("Domain snapshot Snap-{n} deleted")), "{out}");
    }
    assert_eq!(listed_snapshots(&env, "RootBase"), ["active"]);
    for image in &images {
        assert!(image.exists(), "{} was removed", image.display());
    }
}

/// Seed 003's Figure 6: `blockpull --domain ptest2-base --path ACTIVE
/// --wait --verbose` flattens the chain into the active image.
#[test]
fn seed_blockpull_flatten_line() {
    let env = TestEnv::new();
    let chain = make_chain(env.dir.path(), &["RootBase.img", "Snap-1.qcow2", "Snap-2.qcow2", "Active.qcow2"]);
    define_on(&env, "ptest2-base", &chain[3]);
    let _guard = DomainGuard { env: &env, name: "ptest2-base".into() };
    env.ok(&["start", "ptest2-base"]);
    let line = format!("virsh blockpull --domain ptest2-base --path {} --wait --verbose", s(&chain[3]));
    let out = env.strata(&words(&line));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "Pull complete");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Block Pull: [100 %]"));
    assert_chain(&chain[3], &[&chain[3]]);
    // Read once QEMU has closed the image (it may still cache metadata).
    env.ok(&["destroy", "ptest2-base"]);
    qemu_io(&["-f", "qcow2", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x33 2M 1M", s(&chain[3])]);
}

/// Seed 003's `virsh start foobar` and seed 000's `virsh dumpxml
/// --update-cpu` (with the domain it needs): the flag changes nothing.
#[test]
fn seed_start_and_dumpxml_update_cpu_lines() {
    let env = TestEnv::new();
    let image = make_chain(env.dir.path(), &["foobar.qcow2"]).remove(0);
    define_on(&env, "foobar", &image);
    let _guard = DomainGuard { env: &env, name: "foobar".into() };
    assert_eq!(env.ok(&words("virsh start foobar")).trim(), "Domain 'foobar' started");
    assert_eq!(env.ok(&["domstate", "foobar"]).trim(), "running");
    let plain = env.ok(&["dumpxml", "foobar"]);
    assert_eq!(env.ok(&words("virsh dumpxml --update-cpu foobar")), plain);
    assert_eq!(env.ok(&["dumpxml", "--domain", "foobar", "--security-info", "--migratable"]), plain);
}

/// `help` lists every command under virsh's group headings in two
/// columns; `help blockcommit` and `blockcommit --help` print virsh's four
/// sections with every option described; `--json help` is the list.
#[test]
fn help_lists_commands_by_group_and_describes_each_option() {
    let env = TestEnv::new();
    let out = env.ok(&["help"]);
    assert!(out.starts_with("Grouped commands:\n\n Domain Management (help keyword 'domain'):\n"), "{out}");
    assert!(out.contains("\n Snapshot (help keyword 'snapshot'):\n"), "{out}");
    let row = out.lines().find(|l| l.trim_start().starts_with("blockcommit ")).expect("a blockcommit row");
    assert_eq!(row, format!("    {:<30} {}", "blockcommit", "Commit layers of a disk's chain into a lower one"));
    let json: serde_json::Value = serde_json::from_str(&env.ok(&["--json", "help"])).expect("help --json is JSON");
    let commands = json.as_array().expect("a list");
    for command in commands {
        let name = command["name"].as_str().expect("name");
        assert!(out.contains(&format!("\n    {name:<30} {}\n", command["description"].as_str().expect("description"))));
        assert!(command["group"].as_str().is_some_and(|g| out.contains(&format!(" {g} ("))), "{command}");
    }
    for name in ["blockcommit", "blockpull", "snapshot-create-as", "qemu-monitor-command", "dumpxml", "help"] {
        assert!(commands.iter().any(|c| c["name"] == name), "{name} missing from help --json");
    }

    let help = env.ok(&["help", "blockcommit"]);
    assert_eq!(env.ok(&["blockcommit", "--help"]), help);
    let sections: Vec<&str> = help.lines().filter(|l| l.starts_with("  ") && !l.starts_with("   ")).collect();
    assert_eq!(sections, ["  NAME", "  SYNOPSIS", "  DESCRIPTION", "  OPTIONS"], "{help}");
    assert!(
        help.contains("\n    blockcommit <domain> <path> [--base <string>] [--top <string>] [--shallow]"),
        "{help}"
    );
    let options: Vec<&str> =
        help.split("  OPTIONS\n").nth(1).expect("options").lines().filter(|l| !l.is_empty()).collect();
    for flag in [
        "[--domain] <string>",
        "[--path] (or --disk) <string>",
        "--base <string>",
        "--active",
        "--pivot",
        "--wait",
        "--bandwidth <number>",
    ] {
        let row =
            options.iter().find(|l| l.trim_start().starts_with(flag)).unwrap_or_else(|| panic!("{flag} not in {help}"));
        assert!(row.len() > flag.len() + 8, "{flag} has no description: {row:?}");
    }
    assert!(env.ok(&["--help"]).contains("'strata help COMMAND'"));
    assert_eq!(env.fails(&["help", "nosuch"]).trim(), "error: command or command group 'nosuch' doesn't exist");
}

/// Every form virsh accepts for a domain and a disk names the same disk:
/// `--domain`/position, `--path`/`--disk`/position, target or the active
/// image's path, live and offline; a backing image's path is refused, as
/// libvirt refuses it.
#[test]
fn domain_and_disk_are_accepted_in_every_virsh_form() {
    let env = TestEnv::new();
    let chain = make_chain(env.dir.path(), &["base.qcow2", "top.qcow2"]);
    define_on(&env, "vm", &chain[1]);
    let top = s(&chain[1]);
    let offline =
        ["blockjob vm vda --info", "blockjob --domain vm --path vda --info", "blockjob vm --disk {top} --info"];
    for line in offline {
        assert_eq!(env.ok(&words(&line.replace("{top}", top))).trim(), "No current block job for vda", "{line}");
    }
    let err = env.fails(&["blockjob", "vm", s(&chain[0]), "--info"]);
    assert!(err.contains(&format!("no disk '{}' in domain 'vm'", s(&chain[0]))), "{err}");
    assert!(env.ok(&["domblkcheck", "--domain", "vm", top]).contains("vda: recorded chain matches the images"));
    assert_eq!(env.ok(&["diskset-add", "vm", "--disk", top]).trim(), "Disk 'vda' added to the disk set");
    assert_eq!(env.fails(&["dominfo"]).trim(), "error: command 'dominfo' requires <domain> option");
    assert_eq!(env.fails(&["dominfo", "vm", "extra"]).trim(), "error: unexpected data 'extra'");

    // Live: a pull slowed to 1 MiB/s is found by the active image's path,
    // and --json shows it on the disk's target.
    let _guard = DomainGuard { env: &env, name: "vm".into() };
    env.ok(&["start", "--domain", "vm"]);
    assert_eq!(env.ok(&["blockpull", "--domain", "vm", top, "--bandwidth", "1"]).trim(), "Block Pull started");
    let info: serde_json::Value =
        serde_json::from_str(&env.ok(&["blockjob", "vm", "--path", top, "--info", "--json"])).expect("json");
    assert_eq!(info["disk"], "vda", "{info}");
    assert_eq!(info["kind"], "pull", "{info}");
    assert_eq!(info["bandwidth_bytes"], 1024 * 1024, "{info}");
    // As in virsh, a bare word fills the first option not given so far.
    let err = env.fails(&["blockjob", top, "--domain", "vm", "--abort"]);
    assert_eq!(err.trim(), "error: option --domain already seen");
    env.ok(&["blockjob", "--path", top, "vm", "--abort"]);
    assert_eq!(env.ok(&["blockjob", "vm", "vda", "--info"]).trim(), "No current block job for vda");
    assert_eq!(env.ok(&["blockjob", "vm", "vda", "--info", "--json"]).trim(), "null");
    assert_chain(&chain[1], &[&chain[1], &chain[0]]);
}

/// `qemu-monitor-command`: QMP JSON passed through with its reply printed
/// (--pretty indented), a refused command's error reply, and `--hmp` with
/// a write as the guest would make it, found in the image afterwards.
#[test]
fn qemu_monitor_command_passes_qmp_and_hmp_through() {
    let env = TestEnv::new();
    let image = make_chain(env.dir.path(), &["vm.qcow2"]).remove(0);
    define_on(&env, "vm", &image);
    assert!(env.fails(&["qemu-monitor-command", "vm", r#"{"execute":"query-status"}"#]).contains("not running"));
    let _guard = DomainGuard { env: &env, name: "vm".into() };
    env.ok(&["start", "vm"]);

    let reply: serde_json::Value =
        serde_json::from_str(&env.ok(&["qemu-monitor-command", "vm", r#"{"execute":"query-status"}"#])).expect("json");
    assert_eq!(reply["return"]["status"], "running", "{reply}");
    let pretty = env.ok(&["qemu-monitor-command", "--domain", "vm", "--pretty", r#"{"execute":"query-status"}"#]);
    assert!(pretty.starts_with("{\n  \"return\": {\n"), "{pretty}");
    let refused: serde_json::Value =
        serde_json::from_str(&env.ok(&["qemu-monitor-command", "vm", r#"{"execute":"no-such-command"}"#]))
            .expect("json");
    assert_eq!(refused["error"]["class"], "CommandNotFound", "{refused}");
    let value = env.ok(&["qemu-monitor-command", "vm", "--return-value", r#"{"execute":"query-status"}"#]);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&value).expect("json")["status"], "running", "{value}");
    let err = env.fails(&["qemu-monitor-command", "vm", "--return-value", r#"{"execute":"no-such-command"}"#]);
    assert!(err.contains("the monitor's reply has no return value"), "{err}");

    let block = env.ok(&["qemu-monitor-command", "vm", "--hmp", "info", "block"]);
    assert!(block.contains(s(&image)), "{block}");
    let write =
        env.ok(&["qemu-monitor-command", "vm", "--hmp", "qemu-io -d vda/virtio-backend \"write -P 0x5a 4M 1M\""]);
    assert!(write.trim().is_empty(), "{write}");
    env.ok(&["destroy", "vm"]);
    qemu_io(&["-f", "qcow2", "-c", "read -P 0x5a 4M 1M", s(&image)]);
}

/// `event` names the disk a block-job event is about by its target, in
/// its text and in --json.
#[test]
fn block_job_events_name_the_disk() {
    let env = TestEnv::new();
    let chain = make_chain(env.dir.path(), &["base.qcow2", "top.qcow2"]);
    define_on(&env, "vm", &chain[1]);
    let _guard = DomainGuard { env: &env, name: "vm".into() };
    env.ok(&["start", "vm"]);
    let mut watcher = env.spawn(&["event", "vm", "--event", "block-job", "--timeout", "120", "--json"]);
    // Copies to the mirroring phase and aborts until the watcher has seen
    // one of their events (it may start watching after the first ones).
    let dest = env.path("copy.qcow2");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while watcher.try_wait().expect("poll strata event").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = watcher.kill();
            panic!("strata event saw no block-job event");
        }
        assert!(env.ok(&["blockcopy", "vm", "vda", s(&dest), "--wait"]).contains("Now in mirroring phase"));
        env.ok(&["blockjob", "vm", "vda", "--abort"]);
        std::fs::remove_file(&dest).expect("remove the copy");
    }
    let out = watcher.wait_with_output().expect("strata event output");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{printed} {}", String::from_utf8_lossy(&out.stderr));
    let event: serde_json::Value = serde_json::from_str(printed.trim()).expect("one JSON event");
    assert_eq!(event["event"], "block-job", "{event}");
    assert_eq!(event["disk"], "vda", "{event}");
    let detail = event["detail"].as_str().expect("detail");
    assert!(detail.starts_with("Block Copy for vda "), "{detail}");
}

/// `--json` gives JSON on every listing and info command.
#[test]
fn every_listing_and_info_command_prints_json() {
    let env = TestEnv::new();
    let image = make_chain(env.dir.path(), &["vm.qcow2"]).remove(0);
    define_on(&env, "vm", &image);
    env.ok(&["snapshot-create-as", "vm", "s1"]);
    env.ok(&["snapshot-create-as", "vm", "s2"]);
    env.ok(&["diskset-add", "vm", "vda"]);
    let json = |line: &str| -> serde_json::Value {
        let mut args = vec!["--json"];
        args.extend(words(line));
        let out = env.ok(&args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{line} printed no JSON ({e}): {out}"))
    };
    assert_eq!(json("list --all")[0]["name"], "vm");
    assert_eq!(json("dominfo vm")["name"], "vm");
    assert_eq!(json("domstate vm")["state"], "shutoff");
    assert_eq!(json("domblklist vm")[0]["target"], "vda");
    assert_eq!(json("domblkcheck vm")[0]["disk"], "vda");
    assert_eq!(json("diskset-list vm")[0], "vda");
    assert_eq!(json("diskset-size vm")["size"], 1);
    assert_eq!(json("capabilities")["driver"], "qemu");
    assert!(json("version")["strata"].is_string());
    assert_eq!(json("uri")["uri"], env.uri.as_str());
    assert_eq!(json("snapshot-list vm").as_array().map(Vec::len), Some(2));
    assert_eq!(json("snapshot-info vm s2")["name"], "s2");
    assert_eq!(json("snapshot-current vm")["name"], "s2");
    assert_eq!(json("snapshot-parent vm s2")["parent"], "s1");
    assert!(json("blockjob vm vda --info").is_null());
    assert!(json("help").as_array().is_some_and(|c| !c.is_empty()));
    assert!(env.fails(&["snapshot-dumpxml", "vm", "s1", "--json"]).contains("doesn't support option --json"));
}

/// virsh's flags that change nothing in Strata are accepted and change
/// nothing: `list --table`, `start --force-boot --bypass-cache`,
/// `snapshot-dumpxml` and `snapshot-current --security-info`, `undefine
/// --managed-save --checkpoints-metadata`.
#[test]
fn virsh_flags_without_effect_are_accepted() {
    let env = TestEnv::new();
    let image = make_chain(env.dir.path(), &["vm.qcow2"]).remove(0);
    let file = env.path("vm.xml");
    std::fs::write(&file, domain_xml("vm", &[DiskSpec { target: "vda", format: "qcow2", path: &image, extra: "" }]))
        .expect("write the definition");
    assert!(env.ok(&["define", "--file", s(&file)]).contains("Domain 'vm' defined"));
    assert_eq!(env.ok(&["list", "--all", "--table"]), env.ok(&["list", "--all"]));
    let _guard = DomainGuard { env: &env, name: "vm".into() };
    assert_eq!(env.ok(&["start", "vm", "--force-boot", "--bypass-cache"]).trim(), "Domain 'vm' started");
    assert_eq!(env.ok(&["domstate", "vm"]).trim(), "running");
    env.ok(&["destroy", "vm"]);
    env.ok(&["snapshot-create-as", "vm", "s1"]);
    let xml = env.ok(&["snapshot-dumpxml", "vm", "s1"]);
    assert!(xml.contains("<name>s1</name>"), "{xml}");
    assert_eq!(env.ok(&["snapshot-dumpxml", "--domain", "vm", "--snapshotname", "s1", "--security-info"]), xml);
    assert_eq!(env.ok(&["snapshot-current", "vm", "--security-info"]), xml);
    assert_eq!(
        env.ok(&["undefine", "vm", "--managed-save", "--checkpoints-metadata", "--snapshots-metadata"]).trim(),
        "Domain 'vm' has been undefined"
    );
    assert_eq!(env.ok(&["list", "--all", "--name"]).trim(), "");
    assert!(image.exists());
}

/// Seed 003's `virsh vcpuinfo guest`: virsh's layout, with an affinity
/// over every host CPU present (the seed's bug: an offline CPU shortened
/// it), in which the CPU the vCPU last ran on is allowed.
#[test]
fn seed_vcpuinfo_line() {
    let env = TestEnv::new();
    let image = make_chain(env.dir.path(), &["guest.qcow2"]).remove(0);
    define_on(&env, "guest", &image);
    assert!(env.fails(&words("virsh vcpuinfo guest")).contains("not running"));
    let _guard = DomainGuard { env: &env, name: "guest".into() };
    env.ok(&["start", "guest"]);
    let out = env.ok(&words("virsh vcpuinfo guest"));
    let rows: Vec<(&str, &str)> =
        out.lines().filter(|l| !l.is_empty()).map(|l| (l[..16].trim_end(), &l[16..])).collect();
    let labels: Vec<&str> = rows.iter().map(|r| r.0).collect();
    assert_eq!(labels, ["VCPU:", "CPU:", "State:", "CPU time:", "CPU Affinity:"], "{out}");
    assert!(out.ends_with("\n\n"), "{out:?}");
    assert_eq!(rows[0].1, "0");
    assert_eq!(rows[2].1, "running");
    assert!(rows[3].1.strip_suffix('s').is_some_and(|t| t.parse::<f64>().is_ok()), "{out}");
    let present = std::fs::read_to_string("/sys/devices/system/cpu/present").expect("present CPUs");
    let count =
        present.trim().split(',').filter_map(|r| r.rsplit('-').next()?.parse::<usize>().ok()).max().expect("a CPU") + 1;
    let affinity = rows[4].1;
    assert_eq!(affinity.len(), count, "{out}");
    assert!(affinity.chars().all(|c| c == 'y' || c == '-'), "{out}");
    let cpu: usize = rows[1].1.parse().expect("a CPU number");
    assert_eq!(affinity.as_bytes()[cpu], b'y', "{out}");
}

/// Seed 000: `virsh vol-dumpxml --pool gluster img3`, here on a `dir` pool
/// named `gluster` holding img1 ← img2 ← img3: the whole backing chain is
/// shown (libvirt shows one level), each layer with its path and format.
#[test]
fn seed_vol_dumpxml_line() {
    let env = TestEnv::new();
    let dir = env.path("gluster");
    std::fs::create_dir(&dir).expect("pool directory");
    let chain = make_chain(&dir, &["img1", "img2", "img3"]);
    env.ok(&["pool-define-as", "gluster", "dir", "--target", s(&dir)]);
    env.ok(&["pool-start", "gluster"]);

    let xml = env.ok(&words("virsh vol-dumpxml --pool gluster img3"));
    common::validate_xml(&xml);
    let paths: Vec<&str> = xml.lines().map(str::trim).filter(|l| l.starts_with("<path>")).collect();
    let expected: Vec<String> = chain.iter().rev().map(|p| format!("<path>{}</path>", p.display())).collect();
    assert_eq!(paths, expected, "{xml}");
    assert_eq!(xml.matches("<backingStore>").count(), 2, "{xml}");
    assert_eq!(xml.matches("<format type='qcow2'/>").count(), 3, "{xml}");
    assert!(xml.starts_with("<volume type='file'>") && xml.contains("<name>img3</name>"), "{xml}");
}
