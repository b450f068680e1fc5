//! A real guest OS on real QEMU: the tiny guest of
//! `fixtures/guest/make-test-guest` (a Debian cloud kernel and a busybox
//! initramfs) booted directly from `<os><kernel>`/`<initrd>`/`<cmdline>`
//! under TCG, its serial console written to the file a
//! `<serial type='file'>` names. What the guest reports there (ready, each
//! NIC with its MAC, each DHCP lease) is what these tests check, with the
//! leases a Strata network's dnsmasq hands out.

mod common;

use std::time::Duration;

use common::{
    guest_domain_xml, link, process_runs, qemu_pid, wait_for_console, DomainGuard, NetGuard, TestEnv, TestNet,
};

/// How long a TCG guest may take to reach a marker on a loaded machine.
const BOOT_LIMIT: Duration = Duration::from_secs(180);

#[test]
fn a_kernel_booted_directly_writes_its_serial_console_to_the_file_and_gets_a_user_mode_lease() {
    let env = TestEnv::new();
    let console = env.path("console.log");
    let mac = "52:54:00:5e:00:01";
    let interface = format!("    <interface type='user'><mac address='{mac}'/><model type='virtio'/></interface>\n");
    env.define("guest", &guest_domain_xml("guest", &console, &interface));
    let _guard = DomainGuard { env: &env, name: "guest".into() };
    let start = env.strata(&["start", "guest"]);
    let stderr = String::from_utf8_lossy(&start.stderr);
    assert!(start.status.success(), "{stderr}");
    assert!(!stderr.contains("warning"), "the kernel boot and the serial file are honoured: {stderr}");
    let pid = qemu_pid(&env, "guest").expect("QEMU runs");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("QEMU's command line");
    let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    assert!(args.windows(2).any(|w| w[0] == "-append" && w[1] == "console=ttyS0 quiet panic=-1"), "{args:?}");

    assert!(wait_for_console(&console, "strata-guest: ready", BOOT_LIMIT).starts_with("strata-guest: ready"));
    assert_eq!(
        wait_for_console(&console, "strata-guest: nic eth0", BOOT_LIMIT),
        format!("strata-guest: nic eth0 {mac}")
    );
    assert_eq!(wait_for_console(&console, "strata-guest: lease", BOOT_LIMIT), "strata-guest: lease eth0 10.0.2.15");
    env.ok(&["destroy", "guest"]);
    assert!(qemu_pid(&env, "guest").is_none(), "destroy ended QEMU");
}

#[test]
fn a_missing_kernel_is_refused_at_start_naming_it_and_nothing_runs() {
    let env = TestEnv::new();
    let console = env.path("console.log");
    let missing = env.path("no-such-vmlinuz");
    let xml = guest_domain_xml("guest", &console, "");
    let kernel_line = xml.lines().find(|l| l.contains("<kernel>")).expect("a <kernel>").trim().to_string();
    env.define("guest", &xml.replace(&kernel_line, &format!("<kernel>{}</kernel>", missing.display())));
    let _guard = DomainGuard { env: &env, name: "guest".into() };
    let stderr = env.fails(&["start", "guest"]);
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains(&format!("the <kernel> file '{}' does not exist", missing.display())), "{stderr}");
    assert!(qemu_pid(&env, "guest").is_none(), "no QEMU was started");
    assert!(!console.exists(), "no console file was made");
    assert!(env.ok(&["domstate", "guest"]).starts_with("shut off"));
}

/// The interface name the guest's console gave the NIC with `mac`
/// (`strata-guest: nic eth1 52:54:00:…`).
fn guest_nic(console: &std::path::Path, mac: &str) -> String {
    let line = wait_for_console(console, &format!(" {mac}"), BOOT_LIMIT);
    line.split_whitespace().nth(2).expect("strata-guest: nic NAME MAC").to_string()
}

/// The address the guest's console says `nic` leased, once it has; it
/// must lie in the range the tests give `net` (.100 to .150).
fn leased_in_range(net: &TestNet, console: &std::path::Path, nic: &str) -> std::net::Ipv4Addr {
    let line = wait_for_console(console, &format!("strata-guest: lease {nic} "), BOOT_LIMIT);
    let leased: std::net::Ipv4Addr = line.rsplit(' ').next().and_then(|a| a.parse().ok()).expect("an address");
    let [a0, a1, a2, a3] = leased.octets();
    assert!(
        (a0, a1, u32::from(a2)) == (10, 214, net.octet) && (100..=150).contains(&a3),
        "{leased} is in the DHCP range of {}",
        net.subnet()
    );
    leased
}

#[test]
fn a_guest_on_a_strata_network_gets_its_leases_from_the_networks_dnsmasq_and_net_destroy_stops_exactly_it() {
    let env = TestEnv::new();
    let net = TestNet::new('g');
    let _net_guard = NetGuard(&env, &[&net]);
    let (fixed_mac, ranged_mac) = ("52:54:00:5e:01:01", "52:54:00:5e:01:02");
    let dhcp = format!(
        "<dhcp><range start='{}' end='{}'/><host mac='{fixed_mac}' ip='{}'/></dhcp>",
        net.address(100),
        net.address(150),
        net.address(77)
    );
    net.define_xml(&env, &net.xml_with_dhcp("", &dhcp));
    let start = env.strata(&["net-start", &net.name]);
    assert_eq!(String::from_utf8_lossy(&start.stderr), "", "dnsmasq is installed: no warning");
    let dnsmasq = net.recorded_dnsmasq(&env).expect("net-start recorded its dnsmasq");
    let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{dnsmasq}/cmdline")).expect("dnsmasq runs"))
        .replace('\0', " ");
    for wanted in [format!("--interface={}", net.bridge), "--bind-interfaces".into(), "--port=0".into()] {
        assert!(cmdline.contains(&wanted), "{wanted} not in {cmdline}");
    }

    let console = env.path("console.log");
    let interfaces: String = [fixed_mac, ranged_mac]
        .iter()
        .map(|mac| {
            format!(
                "    <interface type='network'><source network='{}'/><mac address='{mac}'/><model type='virtio'/></interface>\n",
                net.name
            )
        })
        .collect();
    env.define("guest", &guest_domain_xml("guest", &console, &interfaces));
    let _guard = DomainGuard { env: &env, name: "guest".into() };
    env.ok(&["start", "guest"]);
    let (fixed_nic, ranged_nic) = (guest_nic(&console, fixed_mac), guest_nic(&console, ranged_mac));
    assert_eq!(
        wait_for_console(&console, &format!("strata-guest: lease {fixed_nic} "), BOOT_LIMIT),
        format!("strata-guest: lease {fixed_nic} {}", net.address(77)),
        "the <host> entry's address"
    );
    let ranged = leased_in_range(&net, &console, &ranged_nic);

    let addresses = env.ok(&["domifaddr", "guest"]);
    let rows: Vec<&str> = addresses.lines().skip(2).collect();
    assert_eq!(rows.len(), 2, "one lease per NIC: {addresses}");
    assert!(
        rows[0].contains(fixed_mac) && rows[0].ends_with(&format!("ipv4         {}/24", net.address(77))),
        "{addresses}"
    );
    assert!(rows[1].contains(ranged_mac) && rows[1].ends_with(&format!("ipv4         {ranged}/24")), "{addresses}");
    let leases: serde_json::Value =
        serde_json::from_str(&env.ok(&["net-dhcp-leases", &net.name, "--json"])).expect("json");
    let leased: Vec<(&str, &str)> = leases
        .as_array()
        .expect("a list")
        .iter()
        .map(|l| (l["mac"].as_str().expect("mac"), l["address"].as_str().expect("address")))
        .collect();
    assert!(leased.contains(&(fixed_mac, net.address(77).as_str())), "{leases}");
    assert!(leased.contains(&(ranged_mac, ranged.to_string().as_str())), "{leases}");

    env.ok(&["destroy", "guest"]);
    env.ok(&["net-destroy", &net.name]);
    assert!(!process_runs(dnsmasq), "net-destroy stopped the network's dnsmasq, pid {dnsmasq}");
    assert_eq!(link(&net.bridge), None, "and deleted its bridge");
}

/// `domiflist`'s rows (below its header), each split into its columns.
fn interface_rows(env: &TestEnv, args: &[&str]) -> Vec<Vec<String>> {
    let listed = env.ok(args);
    listed
        .lines()
        .skip(2)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

#[test]
fn a_nic_attached_live_gets_a_lease_and_a_detached_one_leaves_the_guest_the_live_xml_and_the_host() {
    let env = TestEnv::new();
    let net = TestNet::new('h');
    let _net_guard = NetGuard(&env, &[&net]);
    net.define_xml(
        &env,
        &net.xml_with_dhcp(
            "",
            &format!("<dhcp><range start='{}' end='{}'/></dhcp>", net.address(100), net.address(150)),
        ),
    );
    env.ok(&["net-start", &net.name]);
    let console = env.path("console.log");
    env.define("guest", &guest_domain_xml("guest", &console, ""));
    let _guard = DomainGuard { env: &env, name: "guest".into() };
    env.ok(&["start", "guest"]);
    wait_for_console(&console, "strata-guest: ready", BOOT_LIMIT);

    let mac = "52:54:00:5e:02:01";
    let out = env.ok(&["attach-interface", "guest", "network", &net.name, "--mac", mac, "--model", "virtio", "--live"]);
    assert_eq!(out, "Interface attached successfully\n\n");
    let nic = guest_nic(&console, mac);
    leased_in_range(&net, &console, &nic);
    let rows = interface_rows(&env, &["domiflist", "guest"]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let tap = rows[0][0].clone();
    assert_eq!(rows[0][1..], ["network", net.name.as_str(), "virtio", mac], "{rows:?}");
    let host = link(&tap).expect("the attached NIC's tap exists on the host");
    assert_eq!(host["master"], net.bridge.as_str(), "the tap is on the network's bridge: {host}");
    assert!(interface_rows(&env, &["domiflist", "guest", "--inactive"]).is_empty(), "--live left the definition alone");

    let stderr = env.fails(&["detach-interface", "guest", "network", "--mac", "52:54:00:5e:02:99", "--live"]);
    assert!(
        stderr.starts_with("error: Failed to detach interface\n")
            && stderr.contains("has no interface of type 'network' with MAC address '52:54:00:5e:02:99'"),
        "{stderr}"
    );
    let out = env.ok(&["detach-interface", "guest", "network", "--mac", mac, "--live"]);
    assert_eq!(out, "Interface detached successfully\n\n");
    wait_for_console(&console, &format!("strata-guest: nic-gone {nic}"), BOOT_LIMIT);
    assert!(interface_rows(&env, &["domiflist", "guest"]).is_empty(), "domiflist dropped the NIC");
    assert_eq!(link(&tap), None, "the tap is gone from the host");

    env.ok(&["attach-interface", "guest", "network", &net.name, "--mac", mac, "--config"]);
    assert!(interface_rows(&env, &["domiflist", "guest"]).is_empty(), "--config leaves the running guest alone");
    let defined = interface_rows(&env, &["domiflist", "guest", "--inactive"]);
    assert_eq!(defined.len(), 1, "{defined:?}");
    assert_eq!(defined[0][1..], ["network", net.name.as_str(), "-", mac], "{defined:?}");
    env.ok(&["detach-interface", "guest", "network", "--config"]);
    assert!(interface_rows(&env, &["domiflist", "guest", "--inactive"]).is_empty());
    env.ok(&["destroy", "guest"]);
}

/// Where QEMU placed the device `id`: the bus it is plugged into and its
/// slot there (QOM's `parent_bus` and `addr`), `None` once it is gone.
fn pci_placement(env: &TestEnv, domain: &str, id: &str) -> Option<(String, i64)> {
    let get = |property: &str| -> serde_json::Value {
        let command = format!(
            r#"{{"execute":"qom-get","arguments":{{"path":"/machine/peripheral/{id}","property":"{property}"}}}}"#
        );
        let out = env.strata(&["qemu-monitor-command", domain, &command]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).map(|r| r["return"].clone()).unwrap_or_default()
    };
    Some((get("parent_bus").as_str()?.to_string(), get("addr").as_i64()?))
}

#[test]
fn a_pcie_nic_present_at_start_is_detached_live_and_a_conventional_pci_ones_detach_is_refused_naming_its_model() {
    let env = TestEnv::new();
    let console = env.path("console.log");
    let (virtio_mac, rtl_mac) = ("52:54:00:5e:03:01", "52:54:00:5e:03:02");
    let interfaces = format!(
        "    <interface type='ethernet'><mac address='{virtio_mac}'/><model type='virtio'/></interface>\n    \
         <interface type='user'><mac address='{rtl_mac}'/><model type='rtl8139'/></interface>\n"
    );
    env.define("guest", &guest_domain_xml("guest", &console, &interfaces));
    let _guard = DomainGuard { env: &env, name: "guest".into() };
    env.ok(&["start", "guest"]);
    let placements = || ["net0", "strata-port-net0", "net1"].map(|id| pci_placement(&env, "guest", id));
    let placed = placements();
    let [Some(virtio_at), Some(port_at), Some(rtl_at)] = placed.clone() else { panic!("all placed: {placed:?}") };
    assert_eq!(virtio_at.0, "/machine/peripheral/strata-port-net0/strata-port-net0", "virtio on its own port");
    assert_eq!(port_at.0, "/machine/q35/pcie.0", "the port on the root complex");
    assert_eq!(rtl_at.0, "/machine/q35/pcie.0", "the rtl8139 NIC on the root complex");
    env.ok(&["destroy", "guest"]);
    env.ok(&["start", "guest"]);
    assert_eq!(placements(), placed, "the same definition places its NICs at the same addresses at every start");

    let nic = guest_nic(&console, virtio_mac);
    let rows = interface_rows(&env, &["domiflist", "guest"]);
    assert_eq!(rows.len(), 2, "{rows:?}");
    let tap = rows[0][0].clone();
    assert!(link(&tap).is_some(), "the virtio NIC's tap {tap} exists on the host");

    let stderr = env.fails(&["detach-interface", "guest", "user", "--mac", rtl_mac, "--live"]);
    assert!(
        stderr.starts_with("error: Failed to detach interface\n")
            && stderr.contains("interface 'net1' of domain 'guest' cannot be detached live: its model 'rtl8139' is a conventional PCI device"),
        "{stderr}"
    );
    assert_eq!(interface_rows(&env, &["domiflist", "guest"]), rows, "the refused detach changed nothing");
    assert_eq!(pci_placement(&env, "guest", "net1"), Some(rtl_at), "QEMU still has the rtl8139 NIC");

    let out = env.ok(&["detach-interface", "guest", "ethernet", "--mac", virtio_mac, "--live"]);
    assert_eq!(out, "Interface detached successfully\n\n");
    wait_for_console(&console, &format!("strata-guest: nic-gone {nic}"), BOOT_LIMIT);
    assert_eq!(interface_rows(&env, &["domiflist", "guest"]), rows[1..], "domiflist dropped the virtio NIC only");
    assert_eq!(link(&tap), None, "its tap is gone from the host");
    assert_eq!(pci_placement(&env, "guest", "net0"), None, "QEMU no longer has it");
    env.ok(&["destroy", "guest"]);
}

#[test]
fn an_unplug_left_pending_by_the_detach_is_finished_by_the_next_command_that_reads_the_domain() {
    let env = TestEnv::new();
    let console = env.path("console.log");
    let mac = "52:54:00:5e:04:01";
    let interface =
        format!("    <interface type='ethernet'><mac address='{mac}'/><model type='virtio'/></interface>\n");
    env.define("guest", &guest_domain_xml("guest", &console, &interface));
    let _guard = DomainGuard { env: &env, name: "guest".into() };
    env.ok(&["start", "guest"]);
    let nic = guest_nic(&console, mac);
    let rows = interface_rows(&env, &["domiflist", "guest"]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let tap = rows[0][0].clone();
    assert!(link(&tap).is_some(), "the NIC's tap {tap} exists on the host");

    // A paused guest cannot answer QEMU's unplug request: the detach gives
    // up waiting and leaves it pending.
    env.ok(&["suspend", "guest"]);
    let stderr = env.fails(&["detach-interface", "guest", "ethernet", "--mac", mac, "--live"]);
    assert!(
        stderr.starts_with("error: Failed to detach interface\n")
            && stderr.contains("has not released interface 'net0' after 60s; the unplug request stays pending"),
        "{stderr}"
    );
    let status = env.state_root().join("domains/guest/status.xml");
    let recorded = std::fs::read_to_string(&status).expect("the live status");
    assert!(recorded.contains(&format!("<pendingunplug alias='net0' tap='{tap}'/>")), "{recorded}");

    assert_eq!(interface_rows(&env, &["domiflist", "guest"]), rows, "the paused guest still has the NIC");
    assert!(link(&tap).is_some(), "and its tap stays while QEMU has it");
    // No detach runs again: once the resumed guest has released the NIC,
    // domiflist is what finishes the detach.
    env.ok(&["resume", "guest"]);
    wait_for_console(&console, &format!("strata-guest: nic-gone {nic}"), BOOT_LIMIT);
    let deadline = std::time::Instant::now() + BOOT_LIMIT;
    while !interface_rows(&env, &["domiflist", "guest"]).is_empty() {
        assert!(std::time::Instant::now() < deadline, "domiflist still lists the NIC the guest released");
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(link(&tap), None, "the tap is gone from the host");
    let recorded = std::fs::read_to_string(&status).expect("the live status");
    assert!(!recorded.contains("pendingunplug") && !recorded.contains(mac), "{recorded}");
    assert!(!env.ok(&["dumpxml", "guest"]).contains(mac), "the live XML dropped the interface");
    env.ok(&["destroy", "guest"]);
}
