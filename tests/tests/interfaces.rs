//! Network interfaces on real QEMU: a `type='user'` interface runs on
//! QEMU's user-mode stack with its port forwards bound on the host, its
//! MAC is generated once at define and kept, and `domiflist` shows the MAC
//! QEMU reports.

mod common;

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::Command;

use common::{domain_xml, make_chain, qemu_pid, DiskSpec, DomainGuard, TestEnv};

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
