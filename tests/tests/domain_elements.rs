//! Elements of a definition the QEMU driver does not act on are not
//! dropped silently: `start` warns about each one that changes what the
//! guest sees, and `capabilities` lists what is and is not honoured, with
//! what the driver can do.

mod common;

use common::{domain_xml, make_chain, DiskSpec, DomainGuard, TestEnv};

/// `domain_xml`'s domain on one disk, without its `<graphics>` (not
/// honoured: Strata runs QEMU without a display) and with `extra_top`
/// and `extra_devices` added.
fn vm_xml(env: &TestEnv, extra_top: &str, extra_devices: &str) -> String {
    let image = make_chain(env.dir.path(), &["a.qcow2"]).remove(0);
    let xml = domain_xml("vm", &[DiskSpec { target: "vda", format: "qcow2", path: &image, extra: "" }]);
    let graphics = "    <graphics type='vnc' port='-1' autoport='yes'/>\n";
    assert!(xml.contains(graphics), "domain_xml changed: {xml}");
    xml.replace(graphics, extra_devices).replace("  <devices>\n", &format!("{extra_top}  <devices>\n"))
}

fn start_stderr(env: &TestEnv) -> String {
    let out = env.strata(&["start", "vm"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "start failed: {stderr}");
    stderr
}

#[test]
fn start_warns_about_each_element_not_honoured() {
    let env = TestEnv::new();
    let xml = vm_xml(
        &env,
        "  <title>A title</title>\n  <description>not seen by the guest</description>\n  \
         <metadata><app:note xmlns:app='urn:example'/></metadata>\n  \
         <cputune><shares>2048</shares></cputune>\n",
        "    <interface type='mcast'><source address='230.0.0.1' port='5558'/><model type='virtio'/></interface>\n    \
         <sound model='ich9'/>\n",
    );
    env.define("vm", &xml);
    let stderr = start_stderr(&env);
    let _guard = DomainGuard { env: &env, name: "vm".into() };
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.starts_with("warning: ")).collect();
    for element in ["<interface type='mcast'>", "<cputune>", "<sound model='ich9'>"] {
        assert!(
            warnings.iter().any(|w| w.contains(element) && w.contains("domain 'vm'") && w.contains("not honoured")),
            "no warning names {element}:\n{stderr}"
        );
    }
    assert_eq!(warnings.len(), 3, "only the three unhonoured elements are warned about:\n{stderr}");
    assert_eq!(env.ok(&["domstate", "vm"]).trim(), "running");
    // The definition keeps them.
    let inactive = env.ok(&["dumpxml", "vm", "--inactive"]);
    assert!(inactive.contains("<interface type='mcast'>") && inactive.contains("<cputune>"), "{inactive}");
}

#[test]
fn a_plain_domain_starts_without_warnings() {
    let env = TestEnv::new();
    env.define("vm", &vm_xml(&env, "", ""));
    let stderr = start_stderr(&env);
    let _guard = DomainGuard { env: &env, name: "vm".into() };
    assert_eq!(stderr, "", "a domain of honoured elements warns");
}

#[test]
fn capabilities_list_what_is_and_is_not_honoured() {
    let env = TestEnv::new();
    let text = env.ok(&["capabilities"]);
    let line = |label: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(label))
            .unwrap_or_else(|| panic!("no {label} line:\n{text}"))
            .to_string()
    };
    // Entries are an element's name, then the form honoured in brackets.
    let names = |list: String| -> Vec<String> {
        list.split(", ").map(|e| e.split_whitespace().next().unwrap_or_default().to_string()).collect()
    };
    let honoured = names(line("Honoured:"));
    let unhonoured = names(line("Unhonoured:"));
    for element in ["disk", "memory", "vcpu", "interface"] {
        assert!(honoured.iter().any(|e| e == element), "{element} not listed as honoured:\n{text}");
    }
    for element in ["numatune", "graphics"] {
        assert!(unhonoured.iter().any(|e| e == element), "{element} not listed as unhonoured:\n{text}");
        assert!(!honoured.iter().any(|e| e == element), "{element} listed as honoured:\n{text}");
    }

    let json: serde_json::Value = serde_json::from_str(&env.ok(&["capabilities", "--json"])).expect("json");
    let list = |key: &str| -> Vec<String> {
        json[key]
            .as_array()
            .unwrap_or_else(|| panic!("no {key} in {json}"))
            .iter()
            .map(|v| v.as_str().expect("string").to_string())
            .collect()
    };
    assert!(list("unhonoured_elements").iter().any(|e| e == "numatune"), "{json}");
    assert!(
        list("honoured_elements").iter().any(|e| e
            == "interface (type='user' with mac/model/portForward; type='ethernet'|'bridge'|'network'|'direct' with \
                   mac/model/source/target/driver)"),
        "{json}"
    );
    assert!(list("honoured_elements").iter().any(|e| e == "disk"), "{json}");
}

/// `capabilities --json` is the whole typed model, and the text has one
/// line per capability family: QEMU takes every kind of snapshot (external
/// memory included) and runs every block job (active commit included).
#[test]
fn capabilities_report_what_the_driver_can_do() {
    let env = TestEnv::new();
    let json: serde_json::Value = serde_json::from_str(&env.ok(&["capabilities", "--json"])).expect("json");
    assert_eq!(json["driver"], "qemu", "{json}");
    assert_eq!(json["uri"], env.uri.as_str(), "{json}");
    let snapshots = &json["snapshots"];
    assert_eq!(snapshots["kinds"]["external_memory"], true, "{json}");
    assert_eq!(snapshots["creation"]["live"], true, "{json}");
    assert_eq!(snapshots["revert"]["to"], "any-snapshot", "{json}");
    assert_eq!(snapshots["delete"]["external_by_pull"], true, "{json}");
    assert_eq!(json["block_jobs"]["kinds"]["active_commit"], true, "{json}");
    assert_eq!(json["block_jobs"]["copy"]["reuse_external"], true, "{json}");
    assert_eq!(json["storage"]["disk_sets"], true, "{json}");

    let text = env.ok(&["capabilities"]);
    let lines: Vec<&str> = text.lines().collect();
    for line in [
        "Snapshots:   internal disk, external disk, internal memory, external memory; live, offline",
        "Revert:      any snapshot; external snapshots too; to a running, paused or stopped guest",
        "Delete:      internal, external by commit, external by pull, metadata only, children",
        "Block jobs:  pull, intermediate commit, active commit, copy; \
         shallow copy, raw copy, copy into an existing destination; bandwidth, ready and pivot",
        "Storage:     disk sets, storage pools",
    ] {
        assert!(lines.contains(&line), "no line '{line}' in:\n{text}");
    }
}
