//! Strata-defined networks on the real kernel: `net-start` makes the
//! network's bridge (up, with its address, checked with `ip -j`) and for
//! `nat` a masquerade rule for the subnet in a table of its own (checked
//! with `nft`); `net-destroy` removes exactly those; a `net-start` killed
//! midway is undone by the next network command. Each test uses its own
//! network, bridge and subnet names, derived from the test's process id
//! and a letter, and removes them by name.

mod common;

use std::process::Command;

use common::{killed_at, TestEnv};

/// A network this test owns: its name, bridge and /24 subnet's third octet.
struct TestNet {
    name: String,
    bridge: String,
    octet: u32,
}

impl TestNet {
    fn new(letter: char) -> TestNet {
        let id = std::process::id() % 100_000;
        let octet = 100 + (id + letter as u32) % 150;
        TestNet { name: format!("sn{id}{letter}"), bridge: format!("snbr{id}{letter}"), octet }
    }

    fn subnet(&self) -> String {
        format!("10.214.{}.0/24", self.octet)
    }

    fn xml(&self, forward: &str) -> String {
        format!(
            "<network>\n  <name>{}</name>\n  {forward}\n  <bridge name='{}' stp='on' delay='0'/>\n  \
             <ip address='10.214.{}.1' netmask='255.255.255.0'/>\n  <x-unknown keep='yes'/>\n</network>\n",
            self.name, self.bridge, self.octet
        )
    }

    fn define(&self, env: &TestEnv, forward: &str) {
        let file = env.path(&format!("{}.xml", self.name));
        std::fs::write(&file, self.xml(forward)).expect("write network xml");
        let out = env.ok(&["net-define", file.to_str().expect("utf8")]);
        assert_eq!(out, format!("Network {} defined from {}\n\n", self.name, file.display()));
    }

    fn table(&self) -> String {
        format!("strata_{}", self.name)
    }
}

/// Removes what a test's networks left on the host, by name, whatever
/// the test reached.
struct NetGuard<'a>(&'a [&'a TestNet]);

impl Drop for NetGuard<'_> {
    fn drop(&mut self) {
        for net in self.0 {
            let _ = Command::new("ip").args(["link", "del", &net.bridge]).output();
            let _ = Command::new("nft").args(["delete", "table", "ip", &net.table()]).output();
        }
    }
}

fn tool(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is needed by this test (.ci/install-deps installs it): {e}"))
}

/// `ip -j addr show DEV` as JSON, or None when the device does not exist.
fn link(dev: &str) -> Option<serde_json::Value> {
    let out = tool("ip", &["-j", "addr", "show", "dev", dev]);
    if !out.status.success() {
        return None;
    }
    let mut links: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("ip -j prints JSON");
    links.pop()
}

/// The ruleset of `table ip NAME`, or None when there is no such table.
fn nft_table(name: &str) -> Option<String> {
    let out = tool("nft", &["list", "table", "ip", name]);
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn a_nat_network_gets_its_bridge_and_masquerade_and_destroy_removes_exactly_those() {
    let env = TestEnv::new();
    let (nat, isolated) = (TestNet::new('a'), TestNet::new('b'));
    let _guard = NetGuard(&[&nat, &isolated]);
    nat.define(&env, "<forward mode='nat'/>");
    isolated.define(&env, "");
    let listed = env.ok(&["net-list", "--all"]);
    let lines: Vec<&str> = listed.lines().collect();
    let pad = " ".repeat(nat.name.len() - 4 + 3);
    assert_eq!(lines[0], format!(" Name{pad}State      Autostart   Persistent"), "{listed}");
    assert!(lines[1].len() >= lines[0].len() && lines[1].chars().all(|c| c == '-'), "{listed}");
    assert_eq!(
        lines[2..],
        [
            format!(" {}   inactive   no          yes", nat.name),
            format!(" {}   inactive   no          yes", isolated.name)
        ],
        "{listed}"
    );
    assert_eq!(env.ok(&["net-list", "--name"]), "\n", "no network is active yet");

    assert_eq!(env.ok(&["net-start", &nat.name]), format!("Network {} started\n\n", nat.name));
    env.ok(&["net-start", &isolated.name]);

    let bridge = link(&nat.bridge).expect("net-start created the bridge");
    let flags = bridge["flags"].as_array().expect("flags");
    assert!(flags.iter().any(|f| f == "UP"), "the bridge is up: {bridge}");
    let addr = &bridge["addr_info"][0];
    assert_eq!(
        (addr["local"].as_str(), addr["prefixlen"].as_u64()),
        (Some(format!("10.214.{}.1", nat.octet).as_str()), Some(24))
    );
    assert!(std::path::Path::new("/sys/class/net").join(&nat.bridge).join("bridge").exists(), "a bridge device");
    let rules = nft_table(&nat.table()).expect("net-start added the network's nft table");
    let subnet = nat.subnet();
    assert!(rules.contains(&format!("ip saddr {subnet} ip daddr != {subnet} masquerade")), "{rules}");
    assert!(link(&isolated.bridge).is_some(), "the isolated network's bridge exists");
    assert_eq!(nft_table(&isolated.table()), None, "an isolated network masquerades nothing");
    let forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("read ip_forward");
    assert_eq!(forward.trim(), "1", "a nat network forwards");

    let listed = env.ok(&["net-list"]);
    assert!(listed.contains(&format!(" {}   active   no          yes\n", nat.name)), "{listed}");
    let info = env.ok(&["net-info", &nat.name]);
    assert!(
        info.contains("Active:         yes\n") && info.contains(&format!("Bridge:         {}\n", nat.bridge)),
        "{info}"
    );
    let uuid = env.ok(&["net-uuid", &nat.name]);
    assert_eq!(env.ok(&["net-name", uuid.trim()]), format!("{}\n\n", nat.name));
    let dumped = env.ok(&["net-dumpxml", &nat.name]);
    assert!(
        dumped.contains("<x-unknown keep='yes'/>") && dumped.contains(&format!("<uuid>{}</uuid>", uuid.trim())),
        "{dumped}"
    );

    assert_eq!(env.ok(&["net-destroy", &nat.name]), format!("Network {} destroyed\n\n", nat.name));
    assert_eq!(link(&nat.bridge), None, "net-destroy deleted the bridge");
    assert_eq!(nft_table(&nat.table()), None, "net-destroy deleted the network's table");
    assert!(link(&isolated.bridge).is_some(), "the other network's bridge is untouched");

    let stderr = env.fails(&["net-destroy", &nat.name]);
    assert_eq!(
        stderr,
        format!(
            "error: Failed to destroy network {0}\nerror: Requested operation is not valid: network '{0}' is not active\n",
            nat.name
        )
    );
    env.ok(&["net-destroy", &isolated.name]);
    assert_eq!(link(&isolated.bridge), None);
    env.ok(&["net-undefine", &nat.name]);
    env.ok(&["net-undefine", &isolated.name]);
    assert_eq!(env.ok(&["net-list", "--all", "--name"]), "\n");
}

#[test]
fn unknown_networks_are_refused_in_virshs_words() {
    let env = TestEnv::new();
    for cmd in ["net-start", "net-destroy", "net-info", "net-undefine", "net-dumpxml"] {
        let stderr = env.fails(&[cmd, "no-such-net"]);
        assert_eq!(
            stderr,
            "error: failed to get network 'no-such-net'\n\
             error: Network not found: no network with matching name 'no-such-net'\n",
            "{cmd}"
        );
    }
}

#[test]
fn a_net_start_killed_midway_is_undone_by_the_next_network_command() {
    let env = TestEnv::new();
    let net = TestNet::new('c');
    let _guard = NetGuard(&[&net]);
    net.define(&env, "<forward mode='nat'/>");
    killed_at(&env, &["net-start", &net.name], "net-start-bridge");
    assert!(link(&net.bridge).is_some(), "the killed net-start had created the bridge");

    let listed = env.ok(&["net-list", "--all"]);
    assert!(listed.contains(&format!(" {}   inactive", net.name)), "{listed}");
    assert_eq!(link(&net.bridge), None, "the next command deleted the half-made bridge");
    env.ok(&["net-start", &net.name]);
    assert!(nft_table(&net.table()).is_some());
    env.ok(&["net-destroy", &net.name]);
    assert_eq!(link(&net.bridge), None);
}
