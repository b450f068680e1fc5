//! Network interfaces on real QEMU: a `type='user'` interface runs on
//! QEMU's user-mode stack with its port forwards bound on the host, its
//! MAC is generated once at define and kept, and `domiflist` shows the MAC
//! QEMU reports. `ethernet` and `bridge` interfaces run on taps Strata
//! opens on the host (checked with `ip` and QEMU's `/proc/PID/fdinfo`),
//! gone after destroy and after a crash; a `network` interface's tap goes on
//! its network's bridge, and an inactive network is refused; vhost-net and macvtap, which this
//! kernel lacks, fail clearly and leave nothing. `domifaddr --source arp`
//! reads the host's neighbour table for the guest's MAC.

mod common;

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::Command;

use common::{domain_xml, kill_qemu, make_chain, qemu_pid, DiskSpec, DomainGuard, TestEnv};

/// A host TCP port on 127.0.0.1 that nothing listens on now.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind port 0");
    listener.local_addr().expect("local address").port()
}

/// `domain_xml`'s domain `vm` on one disk, with `interfaces` in its devices.
fn vm_with(env: &TestEnv, interfaces: &str) -> String {
    let image = make_chain(env.dir.path(), &["a.qcow2"]).remove(0);
    let xml = domain_xml("vm", &[DiskSpec { target: "vda", format: "qcow2", path: &image, extra: "" }]);
    xml.replace("  </devices>", &format!("{interfaces}\n  </devices>"))
}

/// The `<mac address>` of the interface in a dumpxml.
fn mac_in(xml: &str) -> String {
    let start = xml.find("<mac address='").expect("a <mac>") + "<mac address='".len();
    xml[start..start + 17].to_string()
}

/// The MAC of `net0` in HMP's `info network`
/// (`net0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:…`).
fn mac_qemu_reports(env: &TestEnv) -> String {
    let network = env.ok(&["qemu-monitor-command", "vm", "--hmp", "info", "network"]);
    let line = network.lines().find(|l| l.trim_start().starts_with("net0:")).expect("QEMU lists net0");
    let start = line.find("macaddr=").unwrap_or_else(|| panic!("no macaddr in {network}")) + "macaddr=".len();
    line[start..start + 17].to_string()
}

/// What `ss` says listens on 127.0.0.1:`port`, with the owning process.
fn listener_on(port: u16) -> String {
    let out = Command::new("ss").args(["-Hltnp", &format!("sport = :{port}")]).output().expect("run ss");
    assert!(out.status.success(), "ss failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_user_interface_forwards_a_host_port_and_keeps_its_generated_mac() {
    let env = TestEnv::new();
    let port = free_port();
    let interface = format!(
        "    <interface type='user'>\n      <model type='virtio'/>\n      \
         <portForward proto='tcp' address='127.0.0.1'><range start='{port}' to='22'/></portForward>\n    \
         </interface>"
    );
    env.define("vm", &vm_with(&env, &interface));
    let defined_mac = mac_in(&env.ok(&["dumpxml", "vm", "--inactive"]));
    assert!(defined_mac.starts_with("52:54:00:"), "{defined_mac}");
    let inactive = env.ok(&["domiflist", "vm"]);
    assert_eq!(
        inactive,
        format!(
            " Interface   Type   Source   Model    MAC\n{}\n -           user   -        virtio   {defined_mac}\n\n",
            "-".repeat(57)
        )
    );

    let _guard = DomainGuard { env: &env, name: "vm".into() };
    let start = env.strata(&["start", "vm"]);
    let stderr = String::from_utf8_lossy(&start.stderr);
    assert!(start.status.success(), "{stderr}");
    assert!(!stderr.contains("interface"), "a user interface is honoured: {stderr}");
    let pid = qemu_pid(&env, "vm").expect("QEMU runs");
    TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("the forwarded host port accepts a connection");
    let listener = listener_on(port);
    assert!(listener.contains(&format!("127.0.0.1:{port}")) && listener.contains(&format!("pid={pid},")), "{listener}");
    let usernet = env.ok(&["qemu-monitor-command", "vm", "--hmp", "info", "usernet"]);
    let forward = usernet.lines().find(|l| l.contains("HOST_FORWARD")).unwrap_or_else(|| panic!("{usernet}"));
    let columns: Vec<&str> = forward.split_whitespace().collect();
    assert_eq!(&columns[2..6], ["127.0.0.1", &port.to_string(), "10.0.2.15", "22"], "{usernet}");

    assert_eq!(mac_qemu_reports(&env), defined_mac, "QEMU runs the NIC with the defined MAC");
    let live: serde_json::Value = serde_json::from_str(&env.ok(&["domiflist", "vm", "--json"])).expect("json");
    assert_eq!(live[0]["mac"], defined_mac.as_str(), "{live}");
    assert_eq!(live[0]["type"], "user", "{live}");
    assert_eq!(live[0]["port_forwards"][0]["ranges"][0]["start"], port, "{live}");

    env.ok(&["destroy", "vm"]);
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("the port is free once the domain is destroyed");
    env.ok(&["start", "vm"]);
    assert_eq!(mac_qemu_reports(&env), defined_mac, "the same MAC at the next start");
    assert!(env.ok(&["domiflist", "vm"]).contains(&defined_mac));
    env.ok(&["destroy", "vm"]);
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("the port is free once the domain is destroyed");
}

#[test]
fn a_malformed_mac_is_refused_at_define_naming_the_interface() {
    let env = TestEnv::new();
    let xml = vm_with(&env, "    <interface type='user'><mac address='52:54:00:12:34'/></interface>");
    let file = env.path("vm.xml");
    std::fs::write(&file, xml).expect("write xml");
    let err = env.fails(&["define", file.to_str().expect("utf8")]);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("interface '52:54:00:12:34' (type 'user') has <mac address='52:54:00:12:34'>"), "{err}");
    assert!(env.fails(&["dominfo", "vm"]).contains("vm"), "nothing was defined");
}

/// A host network device name unique to this test process (`tag` tells a
/// test's devices apart), within the kernel's 15 characters.
fn host_dev(tag: &str) -> String {
    format!("st{tag}{}", std::process::id() % 100_000)
}

/// A host network device a test created or expects Strata to create,
/// deleted (if still there) when the test ends.
struct HostDevice(String);

impl Drop for HostDevice {
    fn drop(&mut self) {
        if device_exists(&self.0) {
            let _ = Command::new("ip").args(["link", "delete", &self.0]).status();
        }
    }
}

fn device_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Runs `ip ARGS…`, which must succeed.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip -j -d link show DEV`'s one entry.
fn link(dev: &str) -> serde_json::Value {
    let links: serde_json::Value = serde_json::from_str(&ip(&["-j", "-d", "link", "show", dev])).expect("ip json");
    links[0].clone()
}

/// A bridge the test owns, up.
fn make_bridge(name: &str) -> HostDevice {
    ip(&["link", "add", name, "type", "bridge"]);
    let bridge = HostDevice(name.to_string());
    ip(&["link", "set", name, "up"]);
    bridge
}

/// The tap names QEMU `pid` holds open (`iff:` in its tun descriptors'
/// fdinfo).
fn taps_held_by(pid: i32) -> Vec<String> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("read QEMU's fdinfo");
    dir.filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .filter_map(|info| info.lines().find_map(|l| l.strip_prefix("iff:").map(|n| n.trim().to_string())))
        .collect()
}

/// What QEMU `pid`'s descriptors point at.
fn files_held_by(pid: i32) -> Vec<String> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("read QEMU's fds");
    dir.filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .map(|target| target.display().to_string())
        .collect()
}

/// A guest interface element of `iface_type` with `inner` children.
fn interface(iface_type: &str, inner: &str) -> String {
    format!("    <interface type='{iface_type}'>\n      {inner}\n      <model type='virtio'/>\n    </interface>")
}

/// The running domain's live XML and the tap its first interface runs on
/// (its `<target dev>`).
fn live_tap(env: &TestEnv) -> (String, String) {
    let live = env.ok(&["dumpxml", "vm"]);
    let nic = &live[live.find("<interface").expect("an interface")..];
    let at = nic.find("<target dev='").expect("the live XML names the tap") + "<target dev='".len();
    let tap = nic[at..].split('\'').next().expect("a name").to_string();
    (live, tap)
}

/// `domiflist vm`'s one row has these columns.
fn assert_listed(env: &TestEnv, columns: [&str; 5]) {
    let listed = env.ok(&["domiflist", "vm"]);
    assert!(listed.lines().nth(2).expect("a row").split_whitespace().eq(columns), "{listed}");
}

#[test]
fn an_ethernet_tap_is_opened_by_strata_held_by_qemu_and_gone_after_destroy_and_a_crash() {
    let env = TestEnv::new();
    let tap = host_dev("e");
    let _tap = HostDevice(tap.clone());
    assert!(!device_exists(&tap), "{tap} exists before the test");
    env.define("vm", &vm_with(&env, &interface("ethernet", &format!("<target dev='{tap}'/><driver name='qemu'/>"))));
    let mac = mac_in(&env.ok(&["dumpxml", "vm", "--inactive"]));
    let _guard = DomainGuard { env: &env, name: "vm".into() };
    let start = env.strata(&["start", "vm"]);
    let stderr = String::from_utf8_lossy(&start.stderr);
    assert!(start.status.success(), "{stderr}");
    assert!(!stderr.contains("interface"), "an ethernet interface is honoured: {stderr}");

    let host = link(&tap);
    assert!(host["flags"].as_array().expect("flags").iter().any(|f| f == "UP"), "the tap is up: {host}");
    assert_eq!(host["linkinfo"]["info_kind"], "tun", "{host}");
    assert_eq!(host["linkinfo"]["info_data"]["type"], "tap", "{host}");
    assert_eq!(host["address"], format!("fe{}", &mac[2..]), "the host side has the guest MAC with fe: {host}");
    let pid = qemu_pid(&env, "vm").expect("QEMU runs");
    assert_eq!(taps_held_by(pid), [tap.as_str()], "QEMU holds the tap Strata opened");
    assert_eq!(mac_qemu_reports(&env), mac);
    let listed = env.ok(&["domiflist", "vm"]);
    let row: Vec<&str> = listed.lines().nth(2).expect("a row").split_whitespace().collect();
    assert_eq!(row, [tap.as_str(), "ethernet", "-", "virtio", mac.as_str()], "{listed}");

    // The guest's neighbour entry on its tap, as its first ARP reply makes it.
    let none = env.ok(&["domifaddr", "vm", "--source", "arp"]);
    assert_eq!(none.lines().count(), 2, "no address before the host has seen one: {none}");
    ip(&["neigh", "add", "192.0.2.77", "lladdr", &mac, "dev", &tap, "nud", "permanent"]);
    assert!(std::fs::read_to_string("/proc/net/arp").expect("arp table").contains("192.0.2.77"));
    let addresses = env.ok(&["domifaddr", "vm", "--source", "arp"]);
    assert_eq!(
        addresses.lines().nth(2),
        Some(format!(" {tap:<10} {mac}    ipv4         192.0.2.77/0").as_str()),
        "{addresses}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["domifaddr", "vm", "--source", "arp", "--json"])).expect("json");
    assert_eq!(json[0]["address"], "192.0.2.77", "{json}");
    assert_eq!(json[0]["mac"], mac.as_str(), "{json}");
    let leases = env.ok(&["domifaddr", "vm"]);
    assert_eq!(leases.lines().count(), 2, "no Strata network leased this guest an address: {leases}");

    env.ok(&["destroy", "vm"]);
    assert!(!device_exists(&tap), "the tap is gone after destroy");

    env.ok(&["start", "vm"]);
    assert!(device_exists(&tap), "the tap is back at the next start");
    kill_qemu(&env, "vm");
    env.ok(&["list", "--all"]);
    assert!(!device_exists(&tap), "the tap is gone once a command has found QEMU dead");
    assert!(env.ok(&["domstate", "vm"]).starts_with("shut off"));
}

#[test]
fn a_tap_that_existed_before_is_used_and_left_in_place() {
    let env = TestEnv::new();
    let tap = host_dev("p");
    ip(&["tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr"]);
    let _tap = HostDevice(tap.clone());
    env.define("vm", &vm_with(&env, &interface("ethernet", &format!("<target dev='{tap}'/><driver name='qemu'/>"))));
    let _guard = DomainGuard { env: &env, name: "vm".into() };
    env.ok(&["start", "vm"]);
    let pid = qemu_pid(&env, "vm").expect("QEMU runs");
    assert_eq!(taps_held_by(pid), [tap.as_str()], "QEMU holds the existing tap");
    env.ok(&["destroy", "vm"]);
    assert!(device_exists(&tap), "a tap Strata did not create stays after destroy");
}

#[test]
fn a_multiqueue_tap_gives_qemu_one_descriptor_per_queue() {
    let env = TestEnv::new();
    let tap = host_dev("q");
    let _tap = HostDevice(tap.clone());
    let inner = format!("<target dev='{tap}'/><driver name='qemu' queues='2'/>");
    env.define("vm", &vm_with(&env, &interface("ethernet", &inner)));
    let _guard = DomainGuard { env: &env, name: "vm".into() };
    env.ok(&["start", "vm"]);
    let pid = qemu_pid(&env, "vm").expect("QEMU runs");
    assert_eq!(taps_held_by(pid), [tap.as_str(), tap.as_str()], "QEMU holds a descriptor per queue");
    let tree = env.ok(&["qemu-monitor-command", "vm", "--hmp", "info", "qtree"]);
    assert!(tree.contains("mq = true"), "the virtio NIC serves both queues: {tree}");
    env.ok(&["destroy", "vm"]);
    assert!(!device_exists(&tap), "the tap is gone after destroy");
}

#[test]
fn a_bridge_interface_puts_its_tap_on_the_bridge_and_a_missing_bridge_is_refused() {
    let env = TestEnv::new();
    let bridge_name = host_dev("b");
    let _bridge = make_bridge(&bridge_name);
    env.define("vm", &vm_with(&env, &interface("bridge", &format!("<source bridge='{bridge_name}'/>"))));
    let _guard = DomainGuard { env: &env, name: "vm".into() };
    env.ok(&["start", "vm"]);
    let (live, tap) = live_tap(&env);
    let _tap = HostDevice(tap.clone());
    assert!(tap.starts_with("vnet"), "{live}");
    let host = link(&tap);
    assert_eq!(host["master"], bridge_name.as_str(), "the tap is on the bridge: {host}");
    assert!(host["flags"].as_array().expect("flags").iter().any(|f| f == "UP"), "{host}");
    let pid = qemu_pid(&env, "vm").expect("QEMU runs");
    assert_eq!(taps_held_by(pid), [tap.as_str()]);
    assert_listed(&env, [tap.as_str(), "bridge", bridge_name.as_str(), "virtio", mac_in(&live).as_str()]);
    env.ok(&["destroy", "vm"]);
    assert!(!device_exists(&tap), "the tap is gone after destroy");

    let missing = host_dev("m");
    env.define("vm", &vm_with(&env, &interface("bridge", &format!("<source bridge='{missing}'/>"))));
    let err = env.fails(&["start", "vm"]);
    assert!(err.starts_with("error: ") && err.contains(&format!("bridge '{missing}' does not exist")), "{err}");
    assert!(qemu_pid(&env, "vm").is_none(), "no QEMU was started");
}

#[test]
fn a_network_interface_puts_its_tap_on_the_networks_bridge_and_an_inactive_network_is_refused() {
    let env = TestEnv::new();
    let (network, bridge_name) = (host_dev("n"), host_dev("nb"));
    let _bridge = HostDevice(bridge_name.clone());
    let file = env.path("net.xml");
    std::fs::write(&file, format!("<network><name>{network}</name><bridge name='{bridge_name}'/></network>"))
        .expect("write network xml");
    env.ok(&["net-define", file.to_str().expect("utf8")]);
    env.define("vm", &vm_with(&env, &interface("network", &format!("<source network='{network}'/>"))));
    let _guard = DomainGuard { env: &env, name: "vm".into() };

    let err = env.fails(&["start", "vm"]);
    assert!(err.starts_with("error: ") && err.contains(&format!("network '{network}' is not active")), "{err}");
    assert!(qemu_pid(&env, "vm").is_none(), "no QEMU was started");

    env.ok(&["net-start", &network]);
    let start = env.strata(&["start", "vm"]);
    let stderr = String::from_utf8_lossy(&start.stderr);
    assert!(start.status.success() && !stderr.contains("interface"), "a network interface is honoured: {stderr}");
    let (live, tap) = live_tap(&env);
    let _tap = HostDevice(tap.clone());
    assert_eq!(link(&tap)["master"], bridge_name.as_str(), "the tap is on the network's bridge");
    let pid = qemu_pid(&env, "vm").expect("QEMU runs");
    assert_eq!(taps_held_by(pid), [tap.as_str()]);
    assert_listed(&env, [tap.as_str(), "network", network.as_str(), "virtio", mac_in(&live).as_str()]);
    env.ok(&["destroy", "vm"]);
    assert!(!device_exists(&tap), "the tap is gone after destroy");
    env.ok(&["net-destroy", &network]);
    assert!(!device_exists(&bridge_name), "net-destroy removed the bridge");
}

/// Starts `vm`, whose interface needs a host feature: where the host has
/// it (`available`), QEMU runs holding a file `held` accepts and is
/// destroyed; elsewhere the start fails naming `feature` and no QEMU runs.
fn start_holding_or_refused(env: &TestEnv, available: bool, held: impl Fn(&str) -> bool, feature: &str) {
    if available {
        env.ok(&["start", "vm"]);
        let pid = qemu_pid(env, "vm").expect("QEMU runs");
        assert!(files_held_by(pid).iter().any(|f| held(f)), "QEMU holds the {feature} Strata opened");
        env.ok(&["destroy", "vm"]);
    } else {
        let err = env.fails(&["start", "vm"]);
        assert!(err.starts_with("error: ") && err.contains(feature), "{err}");
        assert!(qemu_pid(env, "vm").is_none(), "no QEMU was started");
    }
}

#[test]
fn vhost_net_is_used_when_present_and_asked_for_fails_naming_it_when_missing() {
    let env = TestEnv::new();
    let tap = host_dev("v");
    let _tap = HostDevice(tap.clone());
    env.define("vm", &vm_with(&env, &interface("ethernet", &format!("<target dev='{tap}'/><driver name='vhost'/>"))));
    let _guard = DomainGuard { env: &env, name: "vm".into() };
    let available = std::path::Path::new("/dev/vhost-net").exists();
    start_holding_or_refused(&env, available, |f| f == "/dev/vhost-net", "/dev/vhost-net");
    assert!(!device_exists(&tap), "no tap is left");
}

#[test]
fn a_direct_interface_runs_on_a_macvtap_or_fails_naming_the_missing_kernel_support() {
    let env = TestEnv::new();
    let lower = host_dev("l");
    let _lower = make_bridge(&lower);
    let macvtap = host_dev("d");
    let _macvtap = HostDevice(macvtap.clone());
    let inner = format!("<source dev='{lower}' mode='bridge'/><target dev='{macvtap}'/><driver name='qemu'/>");
    env.define("vm", &vm_with(&env, &interface("direct", &inner)));
    let _guard = DomainGuard { env: &env, name: "vm".into() };
    let probe = Command::new("ip")
        .args(["link", "add", "link", &lower, "name", &macvtap, "type", "macvtap"])
        .output()
        .expect("run ip");
    if probe.status.success() {
        ip(&["link", "delete", &macvtap]);
    }
    start_holding_or_refused(&env, probe.status.success(), |f| f.starts_with("/dev/tap"), "macvtap");
    assert!(!device_exists(&macvtap), "no macvtap is left");
}
