//! Which parts of a domain definition the QEMU driver acts on.
//!
//! `launch::command_line` builds QEMU's command line from the elements
//! marked honoured here (some only in the form QEMU gives by default).
//! Every other element is kept in the definition but not acted on; `start`
//! warns about each one that changes what the guest sees, so nothing a
//! user asked for is dropped silently. An element this table does not
//! know is taken to change what the guest sees.

use strata_core::xml::{Domain, Element};

/// How the driver treats one element.
enum Treatment {
    /// Acted on when `when` holds for it; `form` says which form that is.
    Honoured { when: fn(&Element, &Domain) -> bool, form: &'static str },
    /// Changes nothing the guest sees (never warned about).
    NoGuestEffect,
    /// Changes what the guest sees, and is not acted on yet.
    NotYet,
}

use Treatment::{Honoured, NoGuestEffect, NotYet};

/// Elements whose children are looked up here one by one (`devices/disk`).
const CONTAINERS: &[&str] = &["devices", "os", "features"];

/// Elements by path below `<domain>`.
const ELEMENTS: &[(&str, Treatment)] = &[
    ("name", Honoured { when: always, form: "" }),
    ("uuid", Honoured { when: always, form: "" }),
    ("memory", Honoured { when: always, form: "" }),
    ("currentMemory", Honoured { when: current_memory_is_all, form: "equal to <memory>" }),
    ("vcpu", Honoured { when: always, form: "" }),
    ("os/type", Honoured { when: always, form: "" }),
    ("os/loader", Honoured { when: always, form: "" }),
    ("os/kernel", Honoured { when: always, form: "" }),
    ("os/initrd", Honoured { when: always, form: "" }),
    ("os/cmdline", Honoured { when: always, form: "" }),
    ("os/boot", Honoured { when: boot_from_disk, form: "dev='hd', SeaBIOS's own order" }),
    ("features/acpi", Honoured { when: always, form: "QEMU's default" }),
    ("features/apic", Honoured { when: always, form: "QEMU's default" }),
    ("features/pae", Honoured { when: always, form: "QEMU's default" }),
    ("cpu", Honoured { when: cpu_is_qemu64, form: "absent, or model qemu64: QEMU's default" }),
    ("clock", Honoured { when: clock_is_utc, form: "offset='utc' without timers" }),
    ("cputune", Honoured { when: cputune_pins_only, form: "vcpupin and emulatorpin" }),
    ("on_poweroff", Honoured { when: |e, _| e.text().trim() == "destroy", form: "destroy" }),
    ("on_reboot", Honoured { when: |e, _| e.text().trim() == "restart", form: "restart" }),
    ("devices/disk", Honoured { when: always, form: "" }),
    ("devices/controller", Honoured { when: controller_is_built_in, form: "pci root, sata, ide, virtio-scsi" }),
    ("devices/input", Honoured { when: input_is_ps2, form: "ps2 mouse or keyboard, built into the machine" }),
    ("devices/interface", Honoured { when: interface_is_started, form: INTERFACE_FORM }),
    ("devices/memballoon", Honoured { when: |e, _| e.attr("model") == Some("none"), form: "model='none'" }),
    ("title", NoGuestEffect),
    ("description", NoGuestEffect),
    ("metadata", NoGuestEffect),
    ("on_crash", NoGuestEffect),
    ("on_lockfailure", NoGuestEffect),
    ("seclabel", NoGuestEffect),
    ("resource", NoGuestEffect),
    ("perf", NoGuestEffect),
    ("devices/emulator", NoGuestEffect),
    ("numatune", NotYet),
    ("memtune", NotYet),
    ("blkiotune", NotYet),
    ("memoryBacking", NotYet),
    ("iothreads", NotYet),
    ("sysinfo", NotYet),
    ("pm", NotYet),
    ("devices/graphics", NotYet),
    ("devices/video", NotYet),
    ("devices/sound", NotYet),
    ("devices/serial", Honoured { when: serial_is_file, form: "type='file', an isa-serial port" }),
    ("devices/console", Honoured { when: console_is_file, form: "type='file', the first serial port" }),
    ("devices/channel", NotYet),
    ("devices/hostdev", NotYet),
    ("devices/filesystem", NotYet),
    ("devices/rng", NotYet),
    ("devices/watchdog", NotYet),
    ("devices/tpm", NotYet),
    ("devices/panic", NotYet),
    ("devices/memory", NotYet),
];

fn always(_: &Element, _: &Domain) -> bool {
    true
}

fn current_memory_is_all(_: &Element, dom: &Domain) -> bool {
    dom.current_memory_kib() == dom.memory_kib()
}

/// Pins are applied at start (`placement::apply_defined_placement`);
/// scheduler shares, quotas and the like are not.
fn cputune_pins_only(el: &Element, _: &Domain) -> bool {
    el.elements().all(|c| matches!(c.name.as_ref(), "vcpupin" | "emulatorpin"))
}

fn boot_from_disk(el: &Element, _: &Domain) -> bool {
    el.attr("dev") == Some("hd")
}

fn cpu_is_qemu64(el: &Element, _: &Domain) -> bool {
    let model_only = el.elements().all(|c| c.name == "model");
    let model = el.child_text("model");
    matches!(el.attr("mode"), None | Some("custom")) && model_only && model.is_none_or(|m| m.trim() == "qemu64")
}

fn clock_is_utc(el: &Element, _: &Domain) -> bool {
    matches!(el.attr("offset"), None | Some("utc")) && el.elements().next().is_none()
}

fn controller_is_built_in(el: &Element, _: &Domain) -> bool {
    match (el.attr("type"), el.attr("model")) {
        (Some("pci"), Some("pcie-root" | "pci-root")) => true,
        (Some("sata" | "ide"), _) => true,
        // launch adds one virtio-scsi controller for SCSI disks.
        (Some("scsi"), None | Some("virtio-scsi")) => el.attr("index").is_none_or(|i| i == "0"),
        (Some("usb"), Some("none")) => true,
        _ => false,
    }
}

/// What `interface_is_started` accepts, as `capabilities` describes it.
const INTERFACE_FORM: &str =
    "type='user' with mac/model/portForward; type='ethernet'|'bridge'|'network'|'direct' with \
                              mac/model/source/target/driver";

/// `launch` starts a `type='user'` interface with its MAC, model and port
/// forwards (QEMU's user-mode stack), and an `ethernet`, `bridge`,
/// `network` or `direct` one on the tap or macvtap `tap` opens, with its MAC, model,
/// source, target dev and driver; their other settings, and the other
/// types, are not acted on.
fn interface_is_started(el: &Element, _: &Domain) -> bool {
    let common = |c: &Element| matches!(c.name.as_ref(), "mac" | "model" | "alias" | "address");
    match el.attr("type") {
        Some("user") => el.elements().all(|c| common(c) || c.name == "portForward"),
        Some("ethernet" | "bridge" | "network" | "direct") => {
            el.elements().all(|c| common(c) || matches!(c.name.as_ref(), "source" | "target" | "driver"))
        }
        _ => false,
    }
}

/// `launch` writes a `type='file'` serial port to its `<source path>`.
fn serial_is_file(el: &Element, _: &Domain) -> bool {
    el.attr("type") == Some("file") && el.child("source").and_then(|s| s.attr("path")).is_some()
}

/// A console is the first serial port (libvirt's alias of it), or a port
/// of its own in a domain without `<serial>`.
fn console_is_file(el: &Element, dom: &Domain) -> bool {
    let first_serial = dom.element().child("devices").and_then(|d| d.children_named("serial").next());
    serial_is_file(first_serial.unwrap_or(el), dom)
}

fn input_is_ps2(el: &Element, _: &Domain) -> bool {
    matches!(el.attr("type"), Some("mouse" | "keyboard")) && matches!(el.attr("bus"), None | Some("ps2"))
}

/// Each element of `dom` that changes what the guest sees but that the
/// driver does not act on, named with its identifying attribute where it
/// has one (`interface type='mcast'`, `features/hyperv`).
pub fn unhonoured(dom: &Domain) -> Vec<String> {
    let mut out = Vec::new();
    for el in dom.element().elements() {
        if CONTAINERS.contains(&el.name.as_ref()) {
            for child in el.elements() {
                check(&format!("{}/{}", el.name, child.name), child, dom, &mut out);
            }
        } else {
            check(&el.name, el, dom, &mut out);
        }
    }
    out
}

fn check(path: &str, el: &Element, dom: &Domain, out: &mut Vec<String>) {
    let acted_on = match ELEMENTS.iter().find(|(p, _)| *p == path).map(|(_, t)| t) {
        Some(Honoured { when, .. }) => when(el, dom),
        Some(NoGuestEffect) => true,
        Some(NotYet) | None => false,
    };
    if !acted_on {
        out.push(describe(path, el));
    }
}

/// A device by its name alone (`interface`), anything else by its path.
fn shown(path: &str) -> &str {
    path.strip_prefix("devices/").unwrap_or(path)
}

fn describe(path: &str, el: &Element) -> String {
    let id = ["type", "model", "mode", "offset", "dev", "name"]
        .iter()
        .find_map(|a| el.attr(a).map(|v| format!(" {a}='{v}'")))
        .unwrap_or_default();
    format!("{}{id}", shown(path))
}

/// What `capabilities` lists as honoured, with the form where it matters.
pub fn honoured_list() -> Vec<String> {
    ELEMENTS
        .iter()
        .filter_map(|(path, t)| match t {
            Honoured { form: "", .. } => Some(shown(path).to_string()),
            Honoured { form, .. } => Some(format!("{} ({form})", shown(path))),
            _ => None,
        })
        .collect()
}

/// What `capabilities` lists as known but not acted on yet.
pub fn not_yet_list() -> Vec<String> {
    ELEMENTS.iter().filter(|(_, t)| matches!(t, NotYet)).map(|(path, _)| shown(path).to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(extra: &str, devices: &str) -> Domain {
        Domain::parse(&format!(
            "<domain type='qemu'><name>t</name><title>T</title><description>d</description>\
             <metadata><app:x xmlns:app='urn:x'/></metadata><memory unit='MiB'>64</memory>\
             <currentMemory unit='MiB'>64</currentMemory><vcpu placement='static'>1</vcpu>\
             <os><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>\
             <features><acpi/><apic/></features>\
             <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>\
             <clock offset='utc'/><on_poweroff>destroy</on_poweroff><on_crash>restart</on_crash>{extra}\
             <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
             <controller type='pci' index='0' model='pcie-root'/><controller type='sata' index='0'/>\
             <input type='mouse' bus='ps2'/><memballoon model='none'/>{devices}</devices></domain>"
        ))
        .expect("xml")
    }

    #[test]
    fn a_domain_of_honoured_and_invisible_elements_has_nothing_to_report() {
        assert_eq!(unhonoured(&domain("", "")), Vec::<String>::new());
    }

    #[test]
    fn each_unhonoured_element_is_named_with_its_identifying_attribute() {
        let dom = domain(
            "<cputune><shares>2048</shares></cputune><features><hyperv mode='custom'/></features>\
             <qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'/>",
            "<interface type='mcast'><source address='230.0.0.1' port='5558'/></interface>\
             <controller type='usb' model='qemu-xhci'/><memballoon model='virtio'/><video/>",
        );
        assert_eq!(
            unhonoured(&dom),
            [
                "cputune",
                "features/hyperv mode='custom'",
                "qemu:commandline",
                "interface type='mcast'",
                "controller type='usb'",
                "memballoon model='virtio'",
                "video",
            ]
        );
    }

    #[test]
    fn interfaces_on_a_host_device_or_user_mode_are_honoured_and_other_types_or_settings_are_not() {
        let user = domain(
            "",
            "<interface type='user'><mac address='52:54:00:00:00:01'/><model type='virtio'/>\
             <portForward proto='tcp'><range start='2022' to='22'/></portForward></interface>",
        );
        assert_eq!(unhonoured(&user), Vec::<String>::new());
        let host_devices = domain(
            "",
            "<interface type='ethernet'><target dev='tap7'/><driver name='vhost' queues='2'/></interface>\
             <interface type='bridge'><source bridge='br0'/><model type='virtio'/></interface>\
             <interface type='direct'><source dev='eth0' mode='bridge'/></interface>",
        );
        assert_eq!(unhonoured(&host_devices), Vec::<String>::new());
        let others = domain(
            "",
            "<interface type='user'><driver name='vhost' queues='2'/></interface>\
             <interface type='bridge'><source bridge='br0'/><bandwidth/></interface>\
             <interface type='vhostuser'/>",
        );
        assert_eq!(
            unhonoured(&others),
            ["interface type='user'", "interface type='bridge'", "interface type='vhostuser'"]
        );
    }

    #[test]
    fn a_direct_kernel_boot_and_file_serial_ports_are_honoured_and_other_serial_types_are_not() {
        let dom = |serials: &str| {
            Domain::parse(&format!(
                "<domain type='qemu'><name>t</name><os><type>hvm</type><kernel>/k</kernel><initrd>/i</initrd>\
                 <cmdline>console=ttyS0</cmdline></os><devices>{serials}</devices></domain>"
            ))
            .expect("xml")
        };
        let file = "<serial type='file'><source path='/l/s.log'/></serial><console type='file'>\
                    <source path='/l/s.log'/><target type='serial'/></console>";
        assert_eq!(unhonoured(&dom(file)), Vec::<String>::new());
        assert_eq!(unhonoured(&dom("<console type='file'><source path='/l/c.log'/></console>")), Vec::<String>::new());
        assert_eq!(
            unhonoured(&dom("<serial type='pty'/><console type='pty'/>")),
            ["serial type='pty'", "console type='pty'"]
        );
    }

    #[test]
    fn cpu_pins_are_honoured_and_other_cputune_children_are_not() {
        let pinned = domain("<cputune><vcpupin vcpu='0' cpuset='0'/><emulatorpin cpuset='0'/></cputune>", "");
        assert_eq!(unhonoured(&pinned), Vec::<String>::new());
        let shares = domain("<cputune><vcpupin vcpu='0' cpuset='0'/><shares>2048</shares></cputune>", "");
        assert_eq!(unhonoured(&shares), ["cputune"]);
        let cpuset =
            Domain::parse("<domain type='qemu'><name>t</name><vcpu cpuset='0-1'>2</vcpu></domain>").expect("xml");
        assert_eq!(unhonoured(&cpuset), Vec::<String>::new());
    }

    #[test]
    fn forms_other_than_qemus_defaults_are_reported() {
        let dom = Domain::parse(
            "<domain type='qemu'><name>t</name><memory unit='MiB'>64</memory>\
             <currentMemory unit='MiB'>32</currentMemory><vcpu current='1'>2</vcpu>\
             <cpu mode='host-passthrough'/><clock offset='localtime'/><on_reboot>destroy</on_reboot></domain>",
        )
        .expect("xml");
        assert_eq!(
            unhonoured(&dom),
            ["currentMemory", "cpu mode='host-passthrough'", "clock offset='localtime'", "on_reboot"]
        );
    }
}
