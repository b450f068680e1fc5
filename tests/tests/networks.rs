//! Strata-defined networks on the real kernel: `net-start` makes the
//! network's bridge (up, with its address, checked with `ip -j`) and for
//! `nat` a masquerade rule for the subnet in a table of its own (checked
//! with `nft`), and for a `<dhcp><range>` a dnsmasq (checked by the pid
//! recorded for it); `net-destroy` removes exactly those; a `net-start`
//! killed midway is undone by the next network command; `net-create`
//! makes a transient network. Each test uses its own
//! network, bridge and subnet names, derived from the test's process id
//! and a letter, and removes them by name.

mod common;

use common::{killed_at, link, nft_table, process_runs, NetGuard, TestEnv, TestNet};

#[test]
fn a_nat_network_gets_its_bridge_and_masquerade_and_destroy_removes_exactly_those() {
    let env = TestEnv::new();
    let (nat, isolated) = (TestNet::new('a'), TestNet::new('b'));
    let _guard = NetGuard(&env, &[&nat, &isolated]);
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
    let _guard = NetGuard(&env, &[&net]);
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

/// The DHCP range of `net` the tests serve: .100 to .150.
fn dhcp_range(net: &TestNet) -> String {
    format!("<dhcp><range start='{}' end='{}'/></dhcp>", net.address(100), net.address(150))
}

#[test]
fn a_net_start_killed_after_dnsmasq_started_is_undone_by_the_next_network_command() {
    let env = TestEnv::new();
    let net = TestNet::new('d');
    let _guard = NetGuard(&env, &[&net]);
    net.define_xml(&env, &net.xml_with_dhcp("", &dhcp_range(&net)));
    killed_at(&env, &["net-start", &net.name], "net-start-dnsmasq");
    let pid = net.recorded_dnsmasq(&env).expect("the killed net-start recorded its dnsmasq");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("the recorded dnsmasq runs");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("dnsmasq") && cmdline.contains(&format!("--interface={}", net.bridge)), "{cmdline}");

    let listed = env.ok(&["net-list", "--all"]);
    assert!(listed.contains(&format!(" {}   inactive", net.name)), "{listed}");
    assert!(!process_runs(pid), "the next command stopped the half-started network's dnsmasq {pid}");
    assert_eq!(link(&net.bridge), None, "and deleted its bridge");
    let dir = env.state_root().join("networks").join(&net.name);
    assert!(!dir.join("started.json").exists() && !dir.join("dnsmasq.leases").exists(), "nothing of the start is left");
}

#[test]
fn net_create_starts_a_transient_network_that_is_gone_once_destroyed() {
    let env = TestEnv::new();
    let net = TestNet::new('e');
    let _guard = NetGuard(&env, &[&net]);
    let file = net.write(&env, &net.xml_with_dhcp("<forward mode='nat'/>", &dhcp_range(&net)));
    let out = env.strata(&["net-create", file.to_str().expect("utf8")]);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "dnsmasq serves the range: no warning");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("Network {} created from {}\n\n", net.name, file.display())
    );
    assert!(link(&net.bridge).is_some(), "net-create started the network's bridge");
    let pid = net.recorded_dnsmasq(&env).expect("a recorded dnsmasq");
    assert!(process_runs(pid), "its dnsmasq runs");
    let listed = env.ok(&["net-list", "--all"]);
    assert!(listed.contains(&format!(" {}   active   no          no\n", net.name)), "{listed}");
    assert!(env.ok(&["net-info", &net.name]).contains("Persistent:     no\n"));
    let leases = env.ok(&["net-dhcp-leases", &net.name]);
    assert_eq!(leases.lines().count(), 2, "a table of no lease yet: {leases}");
    assert!(
        leases.starts_with(" Expiry Time   MAC address   Protocol   IP address   Hostname   Client ID or DUID"),
        "{leases}"
    );
    let stderr = env.fails(&["net-create", file.to_str().expect("utf8")]);
    assert!(stderr.contains(&format!("network '{}' already exists", net.name)), "{stderr}");

    env.ok(&["net-destroy", &net.name]);
    assert!(!process_runs(pid), "net-destroy stopped the dnsmasq it recorded");
    assert_eq!(link(&net.bridge), None);
    assert_eq!(nft_table(&net.table()), None);
    assert_eq!(env.ok(&["net-list", "--all", "--name"]), "\n", "a transient network is gone once destroyed");
}
