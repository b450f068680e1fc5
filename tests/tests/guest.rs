//! A real guest OS on real QEMU: the tiny guest of
//! `fixtures/guest/make-test-guest` (a Debian cloud kernel and a busybox
//! initramfs) booted directly from `<os><kernel>`/`<initrd>`/`<cmdline>`
//! under TCG, its serial console written to the file a
//! `<serial type='file'>` names. What the guest reports there (ready, each
//! NIC with its MAC, each DHCP lease) is what these tests check.

mod common;

use std::time::Duration;

use common::{guest_domain_xml, qemu_pid, wait_for_console, DomainGuard, TestEnv};

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
