//! The QEMU command line for a domain: machine, memory, monitors, devices,
//! NICs, and one `-blockdev` graph per disk built by `strata_qemu_block`
//! with explicit node names and backing links, so that QEMU opens exactly
//! the chain recorded in the XML and never follows image headers on its own.

use strata_core::xml::{Disk, Domain, Interface, StorageDevice};
use strata_core::{Error, Result};
use strata_qemu_block::nodes::device_blockdevs;
use strata_qemu_block::runtime::{RuntimePaths, MONITORS};

use crate::tap::{HostNics, OpenedNic};

/// The accelerator a domain type asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// Checks that the accelerator can be used here.
pub fn accel_for(dom: &Domain) -> Result<Accel> {
    match dom.domain_type() {
        Some("kvm") => {
            std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").map_err(|e| {
                Error::config_unsupported(format!(
                    "domain '{}' has type 'kvm', but /dev/kvm cannot be opened on this machine ({e}); \
                         use <domain type='qemu'> to run it under TCG emulation",
                    dom.name()
                ))
            })?;
            Ok(Accel::Kvm)
        }
        Some("qemu") => Ok(Accel::Tcg),
        other => Err(Error::config_unsupported(format!(
            "domain type '{}' cannot be run by the qemu driver",
            other.unwrap_or("")
        ))),
    }
}

/// Builds QEMU's argument list (without the program name); `nics` holds
/// the host side of the interfaces that have one, opened by Strata.
pub fn command_line(dom: &Domain, accel: Accel, paths: &RuntimePaths, nics: &HostNics) -> Result<Vec<String>> {
    let name = dom.name();
    let mut args: Vec<String> = Vec::new();
    fn push(args: &mut Vec<String>, a: &str, b: String) {
        args.push(a.to_string());
        args.push(b);
    }
    let os = dom.element().child("os");
    let os_type = os.and_then(|o| o.child("type"));
    if let Some(arch) = os_type.and_then(|t| t.attr("arch")) {
        if arch != "x86_64" && arch != "i686" {
            return Err(Error::config_unsupported(format!(
                "domain '{name}' asks for architecture '{arch}'; this driver runs qemu-system-x86_64"
            )));
        }
    }
    let machine = os_type.and_then(|t| t.attr("machine")).unwrap_or("q35").to_string();
    push(&mut args, "-name", format!("guest={},debug-threads=on", name.replace(',', ",,")));
    if let Some(uuid) = dom.uuid() {
        push(&mut args, "-uuid", uuid);
    }
    let accel_name = match accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    };
    push(&mut args, "-machine", format!("{machine},accel={accel_name}"));
    let mem_mib = (dom.memory_kib().unwrap_or(128 * 1024) / 1024).max(16);
    push(&mut args, "-m", mem_mib.to_string());
    // `<vcpu current>` online at start, the rest hotpluggable up to the maximum.
    let maximum = dom.vcpus().max(1);
    push(&mut args, "-smp", format!("{},maxcpus={maximum}", dom.current_vcpus().clamp(1, maximum)));
    if let Some(loader) = os.and_then(|o| o.child_text("loader")) {
        push(&mut args, "-bios", loader);
    }
    if let Some(boot) = dom.kernel_boot() {
        push(&mut args, "-kernel", existing_file(&name, "kernel", &boot.kernel)?);
        if let Some(initrd) = &boot.initrd {
            push(&mut args, "-initrd", existing_file(&name, "initrd", initrd)?);
        }
        if let Some(cmdline) = boot.cmdline {
            push(&mut args, "-append", cmdline);
        }
    }
    for flag in ["-nodefaults", "-no-user-config", "-S"] {
        args.push(flag.to_string());
    }
    push(&mut args, "-display", "none".to_string());
    for n in 0..MONITORS {
        push(&mut args, "-qmp", format!("unix:{},server=on,wait=off", paths.monitor_socket(n).display()));
    }

    let mut scsi_controller = false;
    let mut ide_unit = 0usize;
    for disk in dom.disks()? {
        strata_engine::definitions::check_transient_disk(&disk)?;
        let overlay = disk.transient.then(|| paths.transient_overlay(&disk.target));
        let root = device_blockdevs(&StorageDevice::Disk(disk.clone()), "-blockdev", &mut args, overlay.as_deref())?;
        let (controller, device) = device_for(&disk, root.as_deref(), &mut scsi_controller, &mut ide_unit, &machine)?;
        if let Some(controller) = controller {
            args.push("-device".into());
            args.push(controller);
        }
        args.push("-device".into());
        args.push(device);
    }
    for (index, iface) in dom.interfaces()?.iter().enumerate() {
        if let Some((netdev, device)) = nic_args(iface, index, nics.by_index.get(&index))? {
            push(&mut args, "-netdev", netdev);
            // A PCIe NIC on a root port of its own can be unplugged live;
            // one on the root complex cannot.
            let device = match is_q35(&machine) && is_pcie_nic(iface) {
                true => {
                    let (port, port_id) = nic_root_port(index);
                    push(&mut args, "-device", port);
                    format!("{device},bus={port_id}")
                }
                false => device,
            };
            push(&mut args, "-device", device);
        }
    }
    if is_q35(&machine) {
        for port in root_port_devices() {
            push(&mut args, "-device", port);
        }
    }
    for (index, serial) in dom.serial_files().iter().enumerate() {
        let path = serial.path.to_str().ok_or_else(|| {
            Error::config_unsupported(format!("domain '{name}': serial file '{}' is not UTF-8", serial.path.display()))
        })?;
        let append = if serial.append { ",append=on" } else { "" };
        push(&mut args, "-chardev", format!("file,id=charserial{index},path={}{append}", path.replace(',', ",,")));
        push(&mut args, "-device", format!("isa-serial,chardev=charserial{index},id=serial{index}"));
    }
    Ok(args)
}

/// A file the domain's `<os>` names for QEMU to read at start, as QEMU's
/// argument; a missing one is refused here, naming it, before QEMU runs.
fn existing_file(domain: &str, what: &str, path: &std::path::Path) -> Result<String> {
    if !path.is_file() {
        return Err(Error::config_unsupported(format!(
            "domain '{domain}': the <{what}> file '{}' does not exist or is not a regular file",
            path.display()
        )));
    }
    path.to_str().map(str::to_string).ok_or_else(|| {
        Error::config_unsupported(format!("domain '{domain}': <{what}> '{}' is not UTF-8", path.display()))
    })
}

/// The QEMU id of the NIC of the domain's `index`th interface (libvirt's
/// alias for it); its netdev is `host` followed by it.
pub fn nic_id(index: usize) -> String {
    format!("net{index}")
}

/// Empty PCIe root ports a q35 domain starts with, for NICs attached later.
pub const SPARE_ROOT_PORTS: usize = 4;

/// The ids of the spare root ports: this, then their number from 1.
pub const ROOT_PORT_PREFIX: &str = "strata-port";

/// Whether the machine is q35, whose NICs need root ports to be hot-plugged.
pub fn is_q35(machine: &str) -> bool {
    machine == "q35" || machine.starts_with("pc-q35")
}

/// `-device` arguments of the spare root ports.
fn root_port_devices() -> Vec<String> {
    (1..=SPARE_ROOT_PORTS).map(|n| format!("pcie-root-port,id={ROOT_PORT_PREFIX}{n},chassis={n},bus=pcie.0")).collect()
}

/// The root port the `index`th interface's NIC sits on from start (its
/// `-device` argument and id): its chassis follows the spare ports', so
/// the same definition gets the same ports at every start. Once its NIC
/// is unplugged it is free for an attach like a spare one.
fn nic_root_port(index: usize) -> (String, String) {
    let id = format!("{ROOT_PORT_PREFIX}-{}", nic_id(index));
    let chassis = SPARE_ROOT_PORTS + 1 + index;
    (format!("pcie-root-port,id={id},chassis={chassis},bus=pcie.0"), id)
}

/// Whether the interface's NIC model is a PCI Express device, which goes
/// on a root port of q35 (libvirt's rule: virtio and e1000e); the others
/// are conventional PCI and stay on the root complex.
pub fn is_pcie_nic(iface: &Interface) -> bool {
    matches!(nic_model(iface), "virtio" | "e1000e")
}

/// The interface's NIC model as the XML names it, or the default.
pub fn nic_model(iface: &Interface) -> &str {
    iface.model.as_deref().unwrap_or(DEFAULT_NIC_MODEL)
}

/// The QEMU id of the live definition's `index`th interface: its alias, or
/// the id a start gives it by its place.
pub fn live_nic_id(iface: &Interface, index: usize) -> String {
    iface.alias.clone().unwrap_or_else(|| nic_id(index))
}

/// The model libvirt's QEMU driver gives an x86 guest's NIC when the XML
/// names none.
pub const DEFAULT_NIC_MODEL: &str = "rtl8139";

/// `-netdev` and `-device` for an interface: QEMU's user-mode stack for
/// `type='user'`, the descriptors Strata opened for one with a host
/// device; `None` for the other types, which are not started (`start`
/// warns about them).
pub fn nic_args(iface: &Interface, index: usize, host: Option<&OpenedNic>) -> Result<Option<(String, String)>> {
    let id = nic_id(index);
    let netdev = match (iface.iface_type.as_str(), host) {
        ("user", _) => user_netdev(iface, &id)?,
        (_, Some(host)) => host.netdev_options(&format!("host{id}")),
        _ => return Ok(None),
    };
    let what = format!("interface '{}'", iface.mac.as_deref().unwrap_or(&id));
    let model = nic_model(iface);
    let device = match model {
        "virtio" => "virtio-net-pci",
        "e1000" | "e1000e" | "rtl8139" | "ne2k_pci" | "pcnet" | "vmxnet3" | "i82551" | "i82557b" | "i82559er" => model,
        other => {
            return Err(Error::config_unsupported(format!(
                "{what}: <model type='{other}'> is not a NIC this driver starts (virtio, e1000, e1000e, rtl8139, \
                 ne2k_pci, pcnet, vmxnet3, i82551, i82557b, i82559er)"
            )))
        }
    };
    let mac = iface.mac.as_ref().map(|m| format!(",mac={m}")).unwrap_or_default();
    // A virtio NIC serves every queue of its tap with a vector pair each.
    let queues = host.map_or(1, |h| h.taps.len());
    let multiqueue = if device == "virtio-net-pci" && queues > 1 {
        format!(",mq=on,vectors={}", 2 * queues + 2)
    } else {
        String::new()
    };
    Ok(Some((netdev, format!("{device},id={id},netdev=host{id}{mac}{multiqueue}"))))
}

/// QEMU's user-mode stack for a `type='user'` interface, each port
/// forward a `hostfwd`.
fn user_netdev(iface: &Interface, id: &str) -> Result<String> {
    let what = format!("interface '{}'", iface.mac.as_deref().unwrap_or(id));
    let mut netdev = format!("user,id=host{id}");
    for forward in &iface.port_forwards {
        if let Some(dev) = &forward.dev {
            return Err(Error::config_unsupported(format!(
                "{what}: <portForward dev='{dev}'> cannot be honoured by QEMU's user-mode stack, which listens on \
                 an address, not on a device; give address= instead"
            )));
        }
        let address = match &forward.address {
            None => String::new(),
            Some(a) => {
                a.parse::<std::net::Ipv4Addr>().map_err(|_| {
                    Error::config_unsupported(format!(
                        "{what}: <portForward address='{a}'> is not an IPv4 address, the only kind QEMU's \
                         user-mode stack listens on"
                    ))
                })?;
                a.clone()
            }
        };
        for (host, guest) in forward.port_pairs() {
            netdev.push_str(&format!(",hostfwd={}:{address}:{host}-:{guest}", forward.proto));
        }
    }
    Ok(netdev)
}

/// `(optional controller device, the disk's device)` for `-device`.
fn device_for(
    disk: &Disk,
    root: Option<&str>,
    scsi_controller: &mut bool,
    ide_unit: &mut usize,
    machine: &str,
) -> Result<(Option<String>, String)> {
    let id = &disk.target;
    let cdrom = disk.device == "cdrom";
    let drive = root.map(|r| format!(",drive={r}")).unwrap_or_default();
    let share = if disk.shareable { ",share-rw=on" } else { "" };
    let bus = disk.bus.clone().unwrap_or_else(|| {
        if id.starts_with("vd") {
            "virtio".into()
        } else if id.starts_with("sd") {
            "sata".into()
        } else {
            "ide".into()
        }
    });
    Ok(match bus.as_str() {
        "virtio" if !cdrom => (None, format!("virtio-blk-pci,id={id}{drive}{share}")),
        "scsi" => {
            let controller = if *scsi_controller {
                None
            } else {
                *scsi_controller = true;
                Some("virtio-scsi-pci,id=scsi0".to_string())
            };
            let kind = if cdrom { "scsi-cd" } else { "scsi-hd" };
            (controller, format!("{kind},bus=scsi0.0,id={id}{drive}{share}"))
        }
        "sata" | "ide" => {
            let kind = if cdrom { "ide-cd" } else { "ide-hd" };
            // q35's AHCI has six ports with one unit each; pc's IDE has two
            // buses with two units each.
            let unit = *ide_unit;
            *ide_unit += 1;
            let placement = if machine.starts_with("pc") && !machine.starts_with("pc-q35") {
                format!("bus=ide.{},unit={}", unit / 2, unit % 2)
            } else {
                format!("bus=ide.{unit}")
            };
            (None, format!("{kind},{placement},id={id}{drive}{share}"))
        }
        other => {
            return Err(Error::config_unsupported(format!(
                "disk '{id}': bus '{other}'{} is not supported by this driver",
                if cdrom { " for a cdrom" } else { "" }
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use strata_qemu_block::daemon::storage_daemon_command_line;

    fn paths() -> RuntimePaths {
        RuntimePaths { dir: PathBuf::from("/run/x") }
    }

    const CHAIN_XML: &str = "<domain type='qemu'><name>t</name><memory unit='MiB'>64</memory>\
        <os><type arch='x86_64' machine='q35'>hvm</type></os><devices>\
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/i/top.qcow2'/>\
        <backingStore type='file'><format type='qcow2'/><source file='/i/base.qcow2'/><backingStore/></backingStore>\
        <target dev='vda' bus='virtio'/></disk>\
        <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/i/d.raw'/><backingStore/>\
        <target dev='sda' bus='sata'/><readonly/></disk>\
        </devices></domain>";

    /// The JSON of each `flag` (`-blockdev`, `--blockdev`) argument.
    fn blockdevs_of(args: &[String], flag: &str) -> Vec<serde_json::Value> {
        args.windows(2).filter(|w| w[0] == flag).map(|w| serde_json::from_str(&w[1]).expect("blockdev json")).collect()
    }

    #[test]
    fn every_layer_gets_explicit_nodes_and_backing_links() {
        let dom = Domain::parse(CHAIN_XML).expect("xml");
        let args = command_line(&dom, Accel::Tcg, &paths(), &HostNics::default()).expect("command line");
        let devs = blockdevs_of(&args, "-blockdev");
        // Backing layers come first so references resolve.
        assert_eq!(devs[0]["node-name"], "vda-1-fmt");
        assert_eq!(devs[0]["backing"], serde_json::Value::Null);
        assert_eq!(devs[0]["read-only"], true);
        assert_eq!(devs[0]["file"]["filename"], "/i/base.qcow2");
        assert_eq!(devs[1]["node-name"], "vda-0-fmt");
        assert_eq!(devs[1]["backing"], "vda-1-fmt");
        assert_eq!(devs[1]["read-only"], false);
        // A raw layer takes no backing option; <readonly/> is honoured.
        assert_eq!(devs[2]["driver"], "raw");
        assert!(devs[2].get("backing").is_none());
        assert_eq!(devs[2]["read-only"], true);
        assert!(args.contains(&"virtio-blk-pci,id=vda,drive=vda-0-fmt".to_string()));
        assert!(args.contains(&"ide-hd,bus=ide.0,id=sda,drive=sda-0-fmt".to_string()));
        assert_eq!(args.iter().filter(|a| *a == "-qmp").count(), MONITORS);
        assert!(args.contains(&"q35,accel=tcg".to_string()));
        assert!(args.contains(&"pcie-root-port,id=strata-port4,chassis=4,bus=pcie.0".to_string()), "spare ports");
    }

    #[test]
    fn a_transient_disk_writes_only_into_its_overlay() {
        let transient =
            CHAIN_XML.replace("<target dev='vda' bus='virtio'/>", "<target dev='vda' bus='virtio'/><transient/>");
        let dom = Domain::parse(&transient).expect("xml");
        let args = command_line(&dom, Accel::Tcg, &paths(), &HostNics::default()).expect("command line");
        let devs = blockdevs_of(&args, "-blockdev");
        assert_eq!(devs[1]["node-name"], "vda-0-fmt");
        assert_eq!(devs[1]["read-only"], true, "the image itself is opened read-only");
        assert_eq!(devs[2]["node-name"], "vda-transient-fmt");
        assert_eq!(devs[2]["backing"], "vda-0-fmt");
        assert_eq!(devs[2]["read-only"], false);
        assert_eq!(devs[2]["file"]["filename"], "/run/x/transient-vda.qcow2");
        assert!(args.contains(&"virtio-blk-pci,id=vda,drive=vda-transient-fmt".to_string()));

        // Offline jobs never write it: read-only nodes, a read-only export.
        let disks: Vec<_> = dom.disks().expect("disks").into_iter().map(StorageDevice::Disk).collect();
        let args = storage_daemon_command_line(&disks, &paths()).expect("daemon command line");
        let devs = blockdevs_of(&args, "--blockdev");
        assert!(devs
            .iter()
            .filter(|d| d["node-name"].as_str().is_some_and(|n| n.starts_with("vda")))
            .all(|d| d["read-only"] == true));
        assert!(args.contains(&"type=nbd,id=vda,node-name=vda-0-fmt,writable=off".to_string()), "{args:?}");
    }

    /// `CHAIN_XML` with `interfaces` added to its devices.
    fn with_interfaces(interfaces: &str) -> Domain {
        Domain::parse(&CHAIN_XML.replace("</devices>", &format!("{interfaces}</devices>"))).expect("xml")
    }

    #[test]
    fn a_user_interface_gets_a_netdev_with_its_forwards_and_a_nic() {
        let dom = with_interfaces(
            "<interface type='network'><source network='default'/></interface>\
             <interface type='user'><mac address='52:54:00:00:00:02'/><model type='virtio'/>\
             <portForward proto='tcp' address='127.0.0.1'><range start='2022' to='22'/></portForward>\
             <portForward proto='udp'><range start='5000' end='5001'/></portForward></interface>\
             <interface type='user'/>",
        );
        let args = command_line(&dom, Accel::Tcg, &paths(), &HostNics::default()).expect("command line");
        let values =
            |flag: &str| -> Vec<String> { args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].clone()).collect() };
        assert_eq!(
            values("-netdev"),
            [
                "user,id=hostnet1,hostfwd=tcp:127.0.0.1:2022-:22,hostfwd=udp::5000-:5000,hostfwd=udp::5001-:5001",
                "user,id=hostnet2",
            ]
        );
        let devices = values("-device");
        // The PCIe NIC on a root port of its own, after the spare ones'
        // chassis; the conventional PCI one on the root complex.
        let port = devices.iter().position(|d| d == "pcie-root-port,id=strata-port-net1,chassis=6,bus=pcie.0");
        let nic = devices
            .iter()
            .position(|d| d == "virtio-net-pci,id=net1,netdev=hostnet1,mac=52:54:00:00:00:02,bus=strata-port-net1");
        assert!(port.is_some_and(|port| nic.is_some_and(|nic| port < nic)), "{devices:?}");
        assert!(devices.contains(&"rtl8139,id=net2,netdev=hostnet2".to_string()), "{devices:?}");
        assert_eq!(devices.iter().filter(|d| d.starts_with("pcie-root-port")).count(), SPARE_ROOT_PORTS + 1);
    }

    #[test]
    fn a_forward_or_model_user_mode_cannot_give_is_refused() {
        let refused = |iface: &str| {
            command_line(&with_interfaces(iface), Accel::Tcg, &paths(), &HostNics::default())
                .expect_err("refused")
                .to_string()
        };
        let err = refused(
            "<interface type='user'><portForward proto='tcp' dev='eth0'><range start='80'/></portForward></interface>",
        );
        assert!(err.contains("interface 'net0': <portForward dev='eth0'> cannot be honoured"), "{err}");
        let err = refused("<interface type='user'><portForward proto='tcp' address='::1'><range start='80'/></portForward></interface>");
        assert!(err.contains("address='::1'> is not an IPv4 address"), "{err}");
        let err = refused("<interface type='user'><mac address='52:54:00:00:00:09'/><model type='tulip'/></interface>");
        assert!(err.contains("interface '52:54:00:00:00:09': <model type='tulip'> is not a NIC"), "{err}");
    }

    #[test]
    fn a_kernel_is_booted_directly_and_a_file_serial_port_gets_a_chardev() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"kernel").expect("write kernel");
        let boot = |initrd: &str| {
            let xml = CHAIN_XML
                .replace(
                    "</os>",
                    &format!(
                        "<kernel>{}</kernel><initrd>{initrd}</initrd><cmdline>console=ttyS0</cmdline></os>",
                        kernel.display()
                    ),
                )
                .replace("</devices>", "<serial type='file'><source path='/l/a,b.log'/></serial></devices>");
            command_line(&Domain::parse(&xml).expect("xml"), Accel::Tcg, &paths(), &HostNics::default())
        };
        let args = boot(&kernel.display().to_string()).expect("command line");
        let after = |flag: &str| args.windows(2).find(|w| w[0] == flag).map(|w| w[1].clone());
        assert_eq!(after("-kernel"), Some(kernel.display().to_string()));
        assert_eq!(after("-initrd"), Some(kernel.display().to_string()));
        assert_eq!(after("-append").as_deref(), Some("console=ttyS0"));
        assert_eq!(after("-chardev").as_deref(), Some("file,id=charserial0,path=/l/a,,b.log"));
        assert!(args.contains(&"isa-serial,chardev=charserial0,id=serial0".to_string()), "{args:?}");

        let missing = dir.path().join("no-initrd");
        let err = boot(&missing.display().to_string()).expect_err("a missing initrd");
        assert!(err.to_string().contains(&format!("<initrd> file '{}' does not exist", missing.display())), "{err}");
    }

    #[test]
    fn unknown_chain_and_unsupported_bus_are_refused() {
        let unknown = CHAIN_XML.replace(
            "<backingStore type='file'><format type='qcow2'/><source file='/i/base.qcow2'/><backingStore/></backingStore>",
            "",
        );
        let dom = Domain::parse(&unknown).expect("xml");
        let err = command_line(&dom, Accel::Tcg, &paths(), &HostNics::default()).expect_err("chain not known");
        assert!(err.to_string().contains("no complete backing chain"), "{err}");
        let usb = CHAIN_XML.replace("bus='sata'", "bus='usb'");
        let err = command_line(&Domain::parse(&usb).expect("xml"), Accel::Tcg, &paths(), &HostNics::default())
            .expect_err("usb");
        assert!(err.to_string().contains("bus 'usb'"), "{err}");
    }
}
