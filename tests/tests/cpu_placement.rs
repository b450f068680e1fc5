//! CPU placement (issue 16): the host's CPU map and node information as
//! virsh prints them, on this host and on seed 003's host presented
//! through the sysfs seam (CPUs 0-2 present, cpu1 offline).

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{domain_xml, make_chain, DiskSpec, DomainGuard, TestEnv};
use serde_json::Value;
use strata_core::hostcpu::parse_cpulist;

/// A directory laid out as `/sys/devices/system/cpu` for seed 003's host:
/// three CPUs present, cpu1 taken offline.
fn seed_host(env: &TestEnv) -> PathBuf {
    let dir = env.path("seed-host-cpus");
    std::fs::create_dir(&dir).expect("host CPU directory");
    std::fs::write(dir.join("present"), "0-2\n").expect("present");
    std::fs::write(dir.join("online"), "0,2\n").expect("online");
    dir
}

/// Runs strata with the host's CPU lists read from `host`.
fn strata_on(env: &TestEnv, host: &Path, args: &[&str]) -> Output {
    env.command(args).env("STRATA_HOST_CPU_DIR", host).output().expect("run strata")
}

fn stdout_of(out: &Output) -> String {
    assert!(out.status.success(), "strata failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// This host's CPUs, as the kernel lists them.
fn real_cpus(list: &str) -> Vec<u32> {
    let path = format!("/sys/devices/system/cpu/{list}");
    parse_cpulist(&std::fs::read_to_string(&path).expect("sysfs CPU list")).expect("a cpulist")
}

/// The XML of `name`, a guest on one qcow2 disk whose `<vcpu>` element
/// (one vCPU in the common helper) is `vcpu`, which may add `<cputune>`.
fn guest_xml(env: &TestEnv, name: &str, vcpu: &str) -> String {
    let image = make_chain(env.dir.path(), &[&format!("{name}.qcow2")]).remove(0);
    let xml = domain_xml(name, &[DiskSpec { target: "vda", format: "qcow2", path: &image, extra: "" }]);
    let changed = xml.replace("<vcpu placement='static'>1</vcpu>", vcpu);
    assert_ne!(changed, xml, "the helper's XML has one static vCPU");
    changed
}

/// Defines and starts `name`, a guest with two vCPUs on one qcow2 disk.
fn start_two_vcpu_guest<'a>(env: &'a TestEnv, name: &str) -> DomainGuard<'a> {
    env.define(name, &guest_xml(env, name, "<vcpu placement='static'>2</vcpu>"));
    let guard = DomainGuard { env, name: name.into() };
    env.ok(&["start", name]);
    guard
}

/// The running domain's vCPU thread ids, in vCPU order, as QEMU reports them.
fn vcpu_threads(env: &TestEnv, name: &str) -> Vec<i64> {
    let reply = env.ok(&["qemu-monitor-command", name, r#"{"execute":"query-cpus-fast"}"#]);
    let reply: Value = serde_json::from_str(&reply).expect("a QMP reply");
    let cpus = reply["return"].as_array().expect("a vCPU list").clone();
    cpus.iter().map(|cpu| cpu["thread-id"].as_i64().expect("thread-id")).collect()
}

/// The CPUs a thread of QEMU may run on, from `/proc/PID/task/TID/status`.
fn cpus_allowed(env: &TestEnv, name: &str, tid: i64) -> Vec<u32> {
    let pid = common::qemu_pid(env, name).expect("QEMU's pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).expect("thread status");
    let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).expect("Cpus_allowed_list");
    parse_cpulist(list).expect("a cpulist")
}

/// The `CPU Affinity:` rows of `vcpuinfo`, in vCPU order.
fn affinities(vcpuinfo: &str) -> Vec<String> {
    vcpuinfo.lines().filter_map(|l| l.strip_prefix("CPU Affinity:")).map(|m| m.trim().to_string()).collect()
}

#[test]
fn nodecpumap_on_the_seed_host_keeps_the_offline_cpu_in_the_map() {
    let env = TestEnv::new();
    let host = seed_host(&env);
    let out = stdout_of(&strata_on(&env, &host, &["nodecpumap"]));
    assert_eq!(out, "CPUs present:   3\nCPUs online:    2\nCPU map:        y-y\n\n");
    let pretty = stdout_of(&strata_on(&env, &host, &["nodecpumap", "--pretty"]));
    assert_eq!(pretty, "CPUs present:   3\nCPUs online:    2\nCPU map:        0,2\n\n");
    let json: Value = serde_json::from_str(&stdout_of(&strata_on(&env, &host, &["nodecpumap", "--json"])))
        .expect("nodecpumap --json");
    assert_eq!(json["present"], 3, "{json}");
    assert_eq!(json["online"], 2, "{json}");
    assert_eq!(json["map"], "y-y", "{json}");
    assert_eq!(json["online_cpus"], "0,2", "{json}");
}

#[test]
fn nodecpumap_on_this_host_lists_its_sysfs_cpus() {
    let env = TestEnv::new();
    let (present, online) = (real_cpus("present"), real_cpus("online"));
    let out = env.ok(&["nodecpumap"]);
    let size = *present.last().expect("a CPU present") as usize + 1;
    let map: String = (0..size as u32).map(|cpu| if online.contains(&cpu) { 'y' } else { '-' }).collect();
    assert_eq!(out, format!("CPUs present:   {size}\nCPUs online:    {}\nCPU map:        {map}\n\n", online.len()));
}

#[test]
fn nodeinfo_prints_virsh_layout_with_this_hosts_cpus_and_memory() {
    let env = TestEnv::new();
    let out = env.ok(&["nodeinfo"]);
    let rows: Vec<(&str, &str)> =
        out.lines().filter(|l| !l.is_empty()).map(|l| (l[..21].trim_end(), l[21..].trim_end())).collect();
    let labels: Vec<&str> = rows.iter().map(|r| r.0).collect();
    let mut expected = vec!["CPU model:", "CPU(s):", "CPU frequency:"];
    expected.extend(["CPU socket(s):", "Core(s) per socket:", "Thread(s) per core:", "NUMA cell(s):", "Memory size:"]);
    if !std::fs::read_to_string("/proc/cpuinfo").expect("cpuinfo").contains("cpu MHz") {
        expected.retain(|label| *label != "CPU frequency:");
    }
    assert_eq!(labels, expected, "{out}");
    assert!(out.ends_with("KiB\n\n"), "{out:?}");
    let value = |label: &str| rows.iter().find(|r| r.0 == label).map(|r| r.1).expect(label);
    assert_eq!(value("CPU model:"), std::env::consts::ARCH);
    let online = real_cpus("online").len();
    assert_eq!(value("CPU(s):"), online.to_string(), "{out}");
    let number = |label: &str| value(label).parse::<usize>().expect(label);
    let topology = number("NUMA cell(s):") * number("CPU socket(s):");
    assert_eq!(topology * number("Core(s) per socket:") * number("Thread(s) per core:"), online, "{out}");
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
    let total = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:")).expect("MemTotal").trim();
    assert_eq!(value("Memory size:"), total.replace("kB", "KiB"), "{out}");

    let json: Value = serde_json::from_str(&env.ok(&["nodeinfo", "--json"])).expect("nodeinfo --json");
    assert_eq!(json["cpus"], online, "{json}");
    assert_eq!(json["model"], std::env::consts::ARCH, "{json}");
    assert!(json["memory_kib"].as_u64().is_some_and(|kib| kib > 0), "{json}");
}

#[test]
fn nodeinfo_on_the_seed_host_counts_its_online_cpus() {
    let env = TestEnv::new();
    let host = seed_host(&env);
    let json: Value =
        serde_json::from_str(&stdout_of(&strata_on(&env, &host, &["nodeinfo", "--json"]))).expect("nodeinfo --json");
    assert_eq!(json["cpus"], 2, "{json}");
    assert_eq!(
        (json["sockets"].clone(), json["cores"].clone(), json["threads"].clone()),
        (1.into(), 2.into(), 1.into())
    );
}

/// `vcpuinfo` on a 2-vCPU guest: each affinity has one entry per host CPU
/// present and agrees with the kernel's `Cpus_allowed_list` of the vCPU
/// thread; on seed 003's host the offline cpu1 is `-` and the mask keeps
/// CPU 2's place (which this 2-CPU machine does not have, so `-` too).
#[test]
fn vcpuinfo_masks_are_sized_by_present_cpus_with_offline_ones_clear() {
    let env = TestEnv::new();
    let _guard = start_two_vcpu_guest(&env, "vm");
    let threads = vcpu_threads(&env, "vm");
    assert_eq!(threads.len(), 2);
    let (present, online) = (real_cpus("present"), real_cpus("online"));
    let size = *present.last().expect("a CPU") + 1;
    let out = env.ok(&["vcpuinfo", "vm"]);
    let shown = affinities(&out);
    for (tid, mask) in threads.iter().zip(&shown) {
        let allowed = cpus_allowed(&env, "vm", *tid);
        let expected: String =
            (0..size).map(|cpu| if allowed.contains(&cpu) && online.contains(&cpu) { 'y' } else { '-' }).collect();
        assert_eq!(mask, &expected, "{out}");
    }
    assert_eq!(shown.len(), 2, "{out}");

    let host = seed_host(&env);
    let out = stdout_of(&strata_on(&env, &host, &["vcpuinfo", "vm"]));
    let shown = affinities(&out);
    assert_eq!(shown.len(), 2, "{out}");
    for (tid, mask) in threads.iter().zip(&shown) {
        let allowed = cpus_allowed(&env, "vm", *tid);
        let expected: String = (0..3).map(|cpu| if cpu != 1 && allowed.contains(&cpu) { 'y' } else { '-' }).collect();
        assert_eq!(mask, &expected, "{out}");
        assert_eq!(&mask[1..2], "-", "{out}");
    }
    let json: Value = serde_json::from_str(&stdout_of(&strata_on(&env, &host, &["vcpuinfo", "vm", "--json"])))
        .expect("vcpuinfo --json");
    let vcpus = json.as_array().expect("a vCPU list");
    assert_eq!(vcpus.len(), 2, "{json}");
    for vcpu in vcpus {
        assert_eq!(vcpu["affinity"].as_array().map(Vec::len), Some(3), "{json}");
        assert_eq!(vcpu["affinity"][1], false, "{json}");
    }
}

/// The persistent definition, as `dumpxml --inactive` prints it.
fn inactive_xml(env: &TestEnv, name: &str) -> String {
    env.ok(&["dumpxml", name, "--inactive"])
}

/// `vcpupin vm 0 0` on a running 2-vCPU guest: the vCPU 0 thread's
/// `Cpus_allowed_list` becomes 0, vCPU 1 keeps its CPUs, `vcpuinfo` and the
/// `vcpupin` table (virsh's layout) agree, and the persistent definition is
/// not touched (`--current` on a running domain is `--live`).
#[test]
fn vcpupin_pins_the_vcpu_thread_live() {
    let env = TestEnv::new();
    let _guard = start_two_vcpu_guest(&env, "vm");
    let threads = vcpu_threads(&env, "vm");
    let before: Vec<Vec<u32>> = threads.iter().map(|tid| cpus_allowed(&env, "vm", *tid)).collect();
    assert!(before[0].contains(&0), "vCPU 0 may run on CPU 0 before the pin: {before:?}");
    let xml_before = inactive_xml(&env, "vm");

    assert_eq!(env.ok(&["vcpupin", "vm", "0", "0"]), "");
    assert_eq!(cpus_allowed(&env, "vm", threads[0]), vec![0]);
    assert_eq!(cpus_allowed(&env, "vm", threads[1]), before[1]);
    let size = *real_cpus("present").last().expect("a CPU") as usize + 1;
    let pinned: String = (0..size).map(|cpu| if cpu == 0 { 'y' } else { '-' }).collect();
    assert_eq!(affinities(&env.ok(&["vcpuinfo", "vm"]))[0], pinned);

    let list = |cpus: &[u32]| strata_core::hostcpu::format_cpulist(cpus);
    let table = env.ok(&["vcpupin", "vm"]);
    let width = list(&before[1]).len().max("CPU Affinity".len());
    let expected =
        format!(" VCPU   CPU Affinity\n{}\n 0      0\n 1      {}\n\n", "-".repeat(4 + 3 + width + 3), list(&before[1]));
    assert_eq!(table, expected);
    assert_eq!(
        env.ok(&["vcpupin", "--domain", "vm", "--vcpu", "0"]),
        format!(" VCPU   CPU Affinity\n{}\n 0      0\n\n", "-".repeat(22))
    );
    let json: Value = serde_json::from_str(&env.ok(&["vcpupin", "vm", "--json"])).expect("vcpupin --json");
    assert_eq!(json, serde_json::json!([{ "vcpu": 0, "cpus": "0" }, { "vcpu": 1, "cpus": list(&before[1]) }]));
    assert_eq!(inactive_xml(&env, "vm"), xml_before, "a live pin changed the persistent definition");

    let err = env.fails(&["vcpupin", "vm", "2", "0"]);
    assert_eq!(err.trim(), "error: invalid argument: vcpu 2 is out of range of live cpu count 2");
}

/// `vcpupin --config` records `<cputune><vcpupin/>` in the persistent XML
/// (everything else kept) without touching the running thread, and a
/// `--config` query reads it back.
#[test]
fn vcpupin_config_records_cputune_in_the_persistent_xml() {
    let env = TestEnv::new();
    let _guard = start_two_vcpu_guest(&env, "vm");
    let threads = vcpu_threads(&env, "vm");
    let live_before = cpus_allowed(&env, "vm", threads[1]);
    let xml_before = inactive_xml(&env, "vm");
    assert!(!xml_before.contains("<cputune>"), "{xml_before}");

    assert_eq!(env.ok(&["vcpupin", "vm", "1", "1", "--config"]), "");
    let xml = inactive_xml(&env, "vm");
    assert!(xml.contains("<cputune>\n    <vcpupin vcpu='1' cpuset='1'/>\n  </cputune>"), "{xml}");
    assert_eq!(xml.replace("  <cputune>\n    <vcpupin vcpu='1' cpuset='1'/>\n  </cputune>\n", ""), xml_before);
    common::validate_xml(&xml);
    assert_eq!(cpus_allowed(&env, "vm", threads[1]), live_before, "a --config pin changed the running thread");
    let json: Value = serde_json::from_str(&env.ok(&["vcpupin", "vm", "1", "--config", "--json"])).expect("json");
    assert_eq!(json, serde_json::json!([{ "vcpu": 1, "cpus": "1" }]));

    // On a stopped domain, --current is the persistent definition.
    env.ok(&["destroy", "vm"]);
    assert_eq!(env.ok(&["vcpupin", "vm", "0", "0"]), "");
    assert!(inactive_xml(&env, "vm").contains("<vcpupin vcpu='0' cpuset='0'/>"));
    let err = env.fails(&["vcpupin", "vm", "0", "0", "--live"]);
    assert_eq!(err.trim(), "error: Requested operation is not valid: domain is not running");
}

/// `emulatorpin vm 0`: QEMU's main thread (and its other non-vCPU threads)
/// may then run on CPU 0 only, the vCPU threads keep theirs; the query
/// prints virsh's layout; `--config` records `<emulatorpin/>`.
#[test]
fn emulatorpin_pins_the_emulator_threads_and_records_it_with_config() {
    let env = TestEnv::new();
    let _guard = start_two_vcpu_guest(&env, "vm");
    let threads = vcpu_threads(&env, "vm");
    let vcpus_before: Vec<Vec<u32>> = threads.iter().map(|tid| cpus_allowed(&env, "vm", *tid)).collect();
    let pid = common::qemu_pid(&env, "vm").expect("QEMU's pid");
    assert!(cpus_allowed(&env, "vm", pid.into()).contains(&0));

    assert_eq!(env.ok(&["emulatorpin", "vm", "0"]), "");
    assert_eq!(cpus_allowed(&env, "vm", pid.into()), vec![0]);
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("QEMU's threads");
    for tid in tasks.filter_map(|t| t.ok()?.file_name().to_str()?.parse::<i64>().ok()) {
        if !threads.contains(&tid) {
            assert_eq!(cpus_allowed(&env, "vm", tid), vec![0], "emulator thread {tid}");
        }
    }
    let vcpus_after: Vec<Vec<u32>> = threads.iter().map(|tid| cpus_allowed(&env, "vm", *tid)).collect();
    assert_eq!(vcpus_after, vcpus_before);
    let out = env.ok(&["emulatorpin", "vm"]);
    assert_eq!(out, "emulator: CPU Affinity\n----------------------------------\n       *: 0\n\n");
    let json: Value = serde_json::from_str(&env.ok(&["emulatorpin", "vm", "--json"])).expect("json");
    assert_eq!(json, serde_json::json!({ "emulator": "0" }));
    assert!(!inactive_xml(&env, "vm").contains("emulatorpin"));

    env.ok(&["emulatorpin", "vm", "0", "--config"]);
    let xml = inactive_xml(&env, "vm");
    assert!(xml.contains("<cputune>\n    <emulatorpin cpuset='0'/>\n  </cputune>"), "{xml}");
    common::validate_xml(&xml);
    assert_eq!(env.ok(&["emulatorpin", "vm", "--config"]).lines().nth(2), Some("       *: 0"));
}

/// Seed 003's host through the seam: pinning to the offline cpu1 is
/// refused with the reason and changes nothing, live or in the XML;
/// pinning to 0,2 is accepted and recorded (this 2-CPU machine runs the
/// thread on CPU 0, the only one of the two it has).
#[test]
fn pinning_on_the_seed_host_refuses_the_offline_cpu_and_takes_0_2() {
    let env = TestEnv::new();
    let _guard = start_two_vcpu_guest(&env, "vm");
    let host = seed_host(&env);
    let threads = vcpu_threads(&env, "vm");
    let before = cpus_allowed(&env, "vm", threads[0]);
    let xml_before = inactive_xml(&env, "vm");

    for args in [
        &["vcpupin", "vm", "0", "1"][..],
        &["vcpupin", "vm", "0", "0-1", "--live", "--config"],
        &["emulatorpin", "vm", "1", "--config"],
    ] {
        let out = strata_on(&env, &host, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "error: invalid argument: CPU 1 is offline");
    }
    let out = strata_on(&env, &host, &["vcpupin", "vm", "0", "3"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: invalid argument: CPU 3 is not present on this host (present: 0-2)"
    );
    assert_eq!(cpus_allowed(&env, "vm", threads[0]), before);
    assert_eq!(inactive_xml(&env, "vm"), xml_before);

    stdout_of(&strata_on(&env, &host, &["vcpupin", "vm", "0", "0,2", "--live", "--config"]));
    assert_eq!(cpus_allowed(&env, "vm", threads[0]), vec![0]);
    assert!(inactive_xml(&env, "vm").contains("<vcpupin vcpu='0' cpuset='0,2'/>"));
    let table = stdout_of(&strata_on(&env, &host, &["vcpupin", "vm", "0", "--config"]));
    assert!(table.contains("\n 0      0,2\n"), "{table}");
}

/// `<vcpu cpuset>` and `<cputune>`'s vcpupin/emulatorpin are applied at
/// start: vCPU 0 runs on its vcpupin's CPU 0, vCPU 1 on the `<vcpu
/// cpuset>` CPU 1, QEMU's main thread on the emulatorpin's CPU 0; `start`
/// warns about none of them, and the `vcpupin` table shows the pins.
#[test]
fn cputune_and_vcpu_cpuset_are_applied_at_start() {
    let env = TestEnv::new();
    let vcpu = "<vcpu placement='static' cpuset='1'>2</vcpu>\n  <cputune>\n    <vcpupin vcpu='0' cpuset='0'/>\n    \
                <emulatorpin cpuset='0'/>\n  </cputune>";
    let xml = guest_xml(&env, "vm", vcpu);
    common::validate_xml(&xml);
    env.define("vm", &xml);
    let _guard = DomainGuard { env: &env, name: "vm".into() };
    let out = env.strata(&["start", "vm"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let warnings = String::from_utf8_lossy(&out.stderr);
    assert!(!warnings.contains("cputune") && !warnings.contains("vcpu"), "{warnings}");

    let threads = vcpu_threads(&env, "vm");
    assert_eq!(cpus_allowed(&env, "vm", threads[0]), vec![0]);
    assert_eq!(cpus_allowed(&env, "vm", threads[1]), vec![1]);
    let pid = common::qemu_pid(&env, "vm").expect("QEMU's pid");
    assert_eq!(cpus_allowed(&env, "vm", pid.into()), vec![0]);
    let table = env.ok(&["vcpupin", "vm"]);
    assert!(table.ends_with("\n 0      0\n 1      1\n\n"), "{table}");
    assert_eq!(env.ok(&["emulatorpin", "vm"]).lines().nth(2), Some("       *: 0"));
    let caps = env.ok(&["capabilities"]);
    assert!(caps.contains("cputune (vcpupin and emulatorpin)"), "{caps}");
}

/// On seed 003's host a definition pinning a vCPU to the offline cpu1
/// does not start: the reason names the element, and no QEMU is left.
#[test]
fn a_start_pinned_to_an_offline_cpu_is_refused() {
    let env = TestEnv::new();
    let vcpu = "<vcpu placement='static'>2</vcpu>\n  <cputune>\n    <vcpupin vcpu='1' cpuset='1'/>\n  </cputune>";
    env.define("vm", &guest_xml(&env, "vm", vcpu));
    let _guard = DomainGuard { env: &env, name: "vm".into() };
    let host = seed_host(&env);
    let out = strata_on(&env, &host, &["start", "vm"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        "error: Failed to start domain vm\nerror: invalid argument: vcpupin of vCPU 1 of domain 'vm': CPU 1 is offline"
    );
    assert_eq!(env.ok(&["domstate", "vm"]).trim(), "shut off");
    common::assert_no_stray_processes(&env, "after the refused start");
}

/// Puts a real CPU back online when dropped, even if the test panics.
struct OfflineCpu(PathBuf);

impl Drop for OfflineCpu {
    fn drop(&mut self) {
        std::fs::write(&self.0, "1").expect("put the CPU back online");
    }
}

/// Seed 003 on real hardware: the host's highest CPU taken offline (needs
/// root and a hot-pluggable CPU; it disturbs whatever else runs on the
/// machine, so it is not run by default). Run it alone with
/// `cargo test -p strata-tests --test cpu_placement -- --ignored a_real_offline_cpu`.
#[test]
#[ignore = "takes a real host CPU offline"]
fn a_real_offline_cpu_keeps_its_place_and_cannot_be_pinned_to() {
    let env = TestEnv::new();
    let _guard = start_two_vcpu_guest(&env, "vm");
    let last = *real_cpus("present").last().expect("a CPU");
    assert!(last > 0, "this test needs a second CPU to take offline");
    let online = PathBuf::from(format!("/sys/devices/system/cpu/cpu{last}/online"));
    std::fs::write(&online, "0").expect("take the CPU offline");
    let _back = OfflineCpu(online);

    let map = env.ok(&["nodecpumap"]);
    let expected: String = (0..=last).map(|cpu| if cpu == last { '-' } else { 'y' }).collect();
    assert!(map.contains(&format!("CPU map:        {expected}\n")), "{map}");
    for mask in affinities(&env.ok(&["vcpuinfo", "vm"])) {
        assert_eq!(mask.len(), last as usize + 1);
        assert!(mask.ends_with('-'), "{mask}");
    }
    let err = env.fails(&["vcpupin", "vm", "0", &last.to_string()]);
    assert_eq!(err.trim(), format!("error: invalid argument: CPU {last} is offline"));
    assert_eq!(env.ok(&["vcpupin", "vm", "0", "0"]), "");
}

/// The vCPU counts `vcpucount` prints for `name`, a single count when
/// `args` selects one.
fn vcpucount(env: &TestEnv, name: &str, args: &[&str]) -> String {
    env.ok(&[&["vcpucount", name], args].concat())
}

/// `<vcpu current='1'>2</vcpu>` starts one vCPU with room for a second;
/// `setvcpus 2 --live` plugs it (QEMU then runs two, `vcpuinfo` lists both,
/// the new one can be pinned, the live definition counts it), the
/// persistent definition is left as it was; more than the maximum and an
/// unplug are refused.
#[test]
fn setvcpus_live_plugs_vcpus_up_to_the_maximum_of_a_guest_started_with_fewer() {
    let env = TestEnv::new();
    env.define("vm", &guest_xml(&env, "vm", "<vcpu placement='static' current='1'>2</vcpu>"));
    let _guard = DomainGuard { env: &env, name: "vm".into() };
    env.ok(&["start", "vm"]);
    assert_eq!(vcpu_threads(&env, "vm").len(), 1, "QEMU started more vCPUs than <vcpu current>");
    let table = "maximum      config         2\nmaximum      live           2\n\
                 current      config         1\ncurrent      live           1\n";
    assert_eq!(vcpucount(&env, "vm", &[]), table);
    let xml_before = inactive_xml(&env, "vm");

    assert_eq!(env.ok(&["setvcpus", "vm", "2", "--live"]), "");
    let threads = vcpu_threads(&env, "vm");
    assert_eq!(threads.len(), 2, "query-cpus-fast after the plug");
    let vcpuinfo = env.ok(&["vcpuinfo", "vm"]);
    assert_eq!(vcpuinfo.lines().filter(|l| l.starts_with("VCPU:")).count(), 2, "{vcpuinfo}");
    assert_eq!(vcpucount(&env, "vm", &["--live", "--active"]), "2\n");
    assert_eq!(vcpucount(&env, "vm", &["--config"]), "1\n");
    assert_eq!(inactive_xml(&env, "vm"), xml_before, "a live plug changed the persistent definition");
    assert!(env.ok(&["dumpxml", "vm"]).contains("<vcpu placement='static'>2</vcpu>"));
    let json: Value = serde_json::from_str(&vcpucount(&env, "vm", &["--json"])).expect("vcpucount --json");
    assert_eq!(
        json,
        serde_json::json!({ "config": { "maximum": 2, "current": 1 }, "live": { "maximum": 2, "current": 2 } })
    );

    assert_eq!(env.ok(&["vcpupin", "vm", "1", "0"]), "");
    assert_eq!(cpus_allowed(&env, "vm", threads[1]), vec![0]);

    let err = env.fails(&["setvcpus", "vm", "3", "--live"]);
    assert_eq!(
        err.trim(),
        "error: invalid argument: requested vcpus is greater than max allowable vcpus for the live domain: 3 > 2"
    );
    let err = env.fails(&["setvcpus", "vm", "1", "--live"]);
    assert!(err.starts_with("error: Operation not supported: cannot unplug vCPUs of domain 'vm' (2 to 1)"), "{err}");
    assert!(err.contains("guest OS"), "{err}");
    assert_eq!(vcpu_threads(&env, "vm").len(), 2, "a refused change changed the running guest");
}

/// `setvcpus --config` on a stopped guest changes `<vcpu>`'s count only:
/// its other attributes and every other element stay as they were;
/// `--maximum` raises the maximum, and a count above it is refused.
#[test]
fn setvcpus_config_rewrites_only_the_vcpu_element() {
    let env = TestEnv::new();
    env.define("vm", &guest_xml(&env, "vm", "<vcpu placement='static' cpuset='0'>2</vcpu>"));
    let before = inactive_xml(&env, "vm");
    assert!(before.contains("<vcpu placement='static' cpuset='0'>2</vcpu>"), "{before}");

    assert_eq!(env.ok(&["setvcpus", "vm", "1", "--config"]), "");
    let xml = inactive_xml(&env, "vm");
    let expected = before.replace(
        "<vcpu placement='static' cpuset='0'>2</vcpu>",
        "<vcpu placement='static' cpuset='0' current='1'>2</vcpu>",
    );
    assert_eq!(xml, expected);
    common::validate_xml(&xml);
    assert_eq!(vcpucount(&env, "vm", &[]), "maximum      config         2\ncurrent      config         1\n");

    assert_eq!(env.ok(&["setvcpus", "vm", "4", "--maximum", "--config"]), "");
    assert_eq!(vcpucount(&env, "vm", &["--maximum", "--config"]), "4\n");
    let err = env.fails(&["setvcpus", "vm", "5", "--config"]);
    assert_eq!(
        err.trim(),
        "error: invalid argument: requested vcpus is greater than max allowable vcpus for the persistent domain: 5 > 4"
    );
    assert_eq!(env.ok(&["setvcpus", "vm", "2"]), "");
    let xml = inactive_xml(&env, "vm");
    let expected = before.replace(
        "<vcpu placement='static' cpuset='0'>2</vcpu>",
        "<vcpu placement='static' cpuset='0' current='2'>4</vcpu>",
    );
    assert_eq!(xml, expected);

    let err = env.fails(&["vcpucount", "vm", "--live"]);
    assert_eq!(err.trim(), "error: Requested operation is not valid: domain is not running");
    let err = env.fails(&["vcpucount", "vm", "--guest"]);
    assert!(err.starts_with("error: argument unsupported: vcpucount --guest"), "{err}");
}

/// A `current` above the maximum is refused at define, naming both counts.
#[test]
fn define_refuses_more_current_vcpus_than_the_maximum() {
    let env = TestEnv::new();
    let file = env.path("vm.xml");
    std::fs::write(&file, guest_xml(&env, "vm", "<vcpu current='3'>2</vcpu>")).expect("write xml");
    let file = file.to_str().expect("utf8");
    let err = env.fails(&["define", file]);
    assert_eq!(
        err.trim(),
        format!(
            "error: Failed to define domain from {file}\n\
             error: XML error: domain 'vm': maxvcpus must not be less than current vcpus (2 < 3)"
        )
    );
    env.fails(&["dominfo", "vm"]);
}
