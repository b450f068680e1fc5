//! `attach-interface` and `detach-interface` on a running domain.
//!
//! On q35 a NIC can only be plugged into (and unplugged from) a PCIe root
//! port, so `launch` gives every q35 domain `SPARE_ROOT_PORTS` empty
//! ones, as libvirt adds spare ports; an attached NIC goes on a free one.
//! A PCIe NIC (virtio, e1000e) present at start sits on a root port of
//! its own and is unplugged the same way; a conventional PCI one
//! (rtl8139, e1000, …) sits on the root complex, which cannot unplug it:
//! its detach is refused before anything changes, and it is detached with
//! `--config` and a restart.
//!
//! An attach opens the host side as a start does (`tap::open_interface`:
//! Strata opens the tap and vhost-net, records a tap it created in the
//! status, and passes the descriptors with `getfd`), then `netdev_add`
//! and `device_add`. A detach sends `device_del` and waits for QEMU's
//! `DEVICE_DELETED`, which comes once the guest has released the device;
//! only then are the netdev, the tap and the live XML's `<interface>`
//! removed. The request is recorded in the status ([`PendingUnplug`])
//! once QEMU has it. A guest that does not answer within [`UNPLUG_WAIT`]
//! leaves it pending in QEMU and the interface in the live XML: the
//! command fails saying so, and the next command that reads the running
//! domain ([`finish_pending_unplugs`], from the connection's
//! reconciliation) finishes the detach once QEMU no longer has the device;
//! a tap still there is removed with the domain at destroy.

use std::os::fd::AsFd;
use std::time::Duration;

use serde_json::{json, Map, Value};
use strata_core::network::NetworkManager;
use strata_core::store::Store;
use strata_core::xml::{Domain, Element, Interface};
use strata_core::{Error, ErrorKind, Result};
use strata_qemu_block::monitor::{qmp_error, Monitor};
use strata_qmp::QmpError;

use crate::launch::{is_q35, live_nic_id, nic_args, nic_id, nic_model, ROOT_PORT_PREFIX, SPARE_ROOT_PORTS};
use crate::live::{edit_status_async, LiveStatus, PendingUnplug};
use crate::tap;

/// How long a detach waits for the guest to release the device: a guest
/// answering through native PCIe hotplug waits 5 s before it acts (QEMU
/// 7.2's q35 root ports use ACPI hotplug, which a guest answers at once),
/// and a TCG guest on a loaded host takes longer still.
const UNPLUG_WAIT: Duration = Duration::from_secs(60);

/// A NIC id no interface of `dom` uses.
fn free_nic_id(dom: &Domain) -> Result<String> {
    let used: Vec<String> =
        dom.interfaces()?.iter().enumerate().map(|(index, iface)| live_nic_id(iface, index)).collect();
    Ok((0..).map(nic_id).find(|id| !used.contains(id)).unwrap_or_default())
}

/// The devices on the root bus, from `query-pci` (a bridge's own
/// devices are under its `pci_bridge`).
async fn root_bus_devices(monitor: &Monitor, domain: &str) -> Result<Vec<Value>> {
    let buses = monitor.client.execute("query-pci", None).await.map_err(|e| qmp_error(domain, e))?;
    Ok(buses
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|bus| bus["devices"].as_array().into_iter().flatten())
        .cloned()
        .collect())
}

/// A root port of Strata's with nothing plugged into it: the ports from
/// `query-pci`, each one's bus read through QOM (a device on it is a
/// `child[N]` link there). `query-pci` alone cannot say: it lists what is
/// behind a port only once the guest has numbered the port's bus.
async fn free_root_port(monitor: &Monitor, domain: &str) -> Result<String> {
    let devices = root_bus_devices(monitor, domain).await?;
    let ports = devices.iter().filter_map(|d| d["qdev_id"].as_str()).filter(|id| id.starts_with(ROOT_PORT_PREFIX));
    for port in ports {
        let path = format!("/machine/peripheral/{port}/{port}");
        let properties = monitor
            .client
            .execute("qom-list", Some(json!({ "path": path })))
            .await
            .map_err(|e| qmp_error(domain, e))?;
        let occupied = properties
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["name"].as_str().is_some_and(|name| name.starts_with("child[")));
        if !occupied {
            return Ok(port.to_string());
        }
    }
    Err(Error::new(
        ErrorKind::OperationFailed,
        format!(
            "domain '{domain}' has no free PCIe root port for another NIC (it started with {SPARE_ROOT_PORTS} \
             spare ones); detach one, or add the interface with --config and restart the domain"
        ),
    ))
}

/// The machine type the domain's `<os><type machine>` names.
fn machine_of(dom: &Domain) -> Option<&str> {
    dom.element().child("os").and_then(|o| o.child("type")).and_then(|t| t.attr("machine"))
}

/// `device_add`'s arguments from a `-device` option string.
fn device_arguments(device: &str, bus: Option<&str>) -> Value {
    let mut parts = device.split(',');
    let mut args = Map::new();
    args.insert("driver".into(), parts.next().unwrap_or_default().into());
    for part in parts {
        if let Some((key, value)) = part.split_once('=') {
            args.insert(key.into(), value.into());
        }
    }
    if let Some(bus) = bus {
        args.insert("bus".into(), bus.into());
    }
    Value::Object(args)
}

/// Plugs the interface `iface_el` (with its MAC) into the running domain
/// and records it in the live definition.
pub async fn attach(
    store: &Store,
    domain: &str,
    status: &LiveStatus,
    monitor: &Monitor,
    iface_el: Element,
) -> Result<()> {
    let client = &monitor.client;
    let live = status.domain.get()?;
    // A port first: a refusal leaves nothing opened or passed to QEMU.
    let bus = match is_q35(machine_of(live).unwrap_or("q35")) {
        true => Some(free_root_port(monitor, domain).await?),
        false => None,
    };
    let id = free_nic_id(live)?;
    let index = live.interfaces()?.len();
    let iface = Interface::from_element(&iface_el, index)?;
    let networks = NetworkManager::new(store.clone());
    let nic = tap::open_interface(&iface, index, &networks)?;
    let netdev_id = format!("host{id}");
    let mut passed = Vec::new();
    let netdev = match (&nic, iface.iface_type.as_str()) {
        (Some(nic), _) => {
            // The tap Strata created is in the status before QEMU holds it.
            if let Some(created) = &nic.created {
                let created = created.clone();
                edit_status_async(store, domain, |s| {
                    s.host_nics.push(created);
                    Ok(())
                })
                .await?;
            }
            let names = |kind: &str, fds: &[std::os::fd::OwnedFd]| {
                (0..fds.len()).map(|i| format!("{netdev_id}-{kind}{i}")).collect::<Vec<_>>()
            };
            let (tap_names, vhost_names) = (names("tap", &nic.taps), names("vhost", &nic.vhosts));
            for (name, fd) in tap_names.iter().zip(&nic.taps).chain(vhost_names.iter().zip(&nic.vhosts)) {
                client.send_fd(name, fd.as_fd()).await.map_err(|e| qmp_error(domain, e))?;
                passed.push(name.clone());
            }
            let mut netdev = json!({ "type": "tap", "id": netdev_id, "fds": tap_names.join(":") });
            if !vhost_names.is_empty() {
                netdev["vhost"] = true.into();
                netdev["vhostfds"] = vhost_names.join(":").into();
            }
            netdev
        }
        (None, "user") if iface.port_forwards.is_empty() => json!({ "type": "user", "id": netdev_id }),
        (None, other) => {
            return Err(Error::config_unsupported(format!(
                "{}: an interface of type '{other}'{} cannot be attached to a running domain",
                iface.description(index),
                if other == "user" { " with port forwards" } else { "" }
            )))
        }
    };
    let (_, device) = nic_args(&iface, index, nic.as_ref())?
        .ok_or_else(|| Error::internal("a started interface type has no NIC arguments"))?;
    let placed = nic_id(index);
    let device =
        device.replacen(&format!("id={placed},netdev=host{placed}"), &format!("id={id},netdev={netdev_id}"), 1);
    if let Err(e) = client.execute("netdev_add", Some(netdev)).await {
        // QEMU lets go of the descriptors it was passed, and so of the tap.
        for name in passed {
            let _ = client.execute("closefd", Some(json!({ "fdname": name }))).await;
        }
        return Err(qmp_error(domain, e));
    }
    if let Err(e) = client.execute("device_add", Some(device_arguments(&device, bus.as_deref()))).await {
        let _ = client.execute("netdev_del", Some(json!({ "id": netdev_id }))).await;
        return Err(qmp_error(domain, e));
    }
    // QEMU holds its own copies of the descriptors now, and the status
    // answers for what was created: dropping ours deletes nothing.
    let host_dev = nic.map(|mut nic| {
        nic.created = None;
        nic.name.clone()
    });
    edit_status_async(store, domain, |s| {
        let live = s.domain.get_mut()?;
        live.add_interface(iface_el)?;
        let added = live.interfaces()?.len() - 1;
        if let Some(dev) = &host_dev {
            live.set_interface_target(added, dev)?;
        }
        live.set_interface_alias(added, &id)
    })
    .await?;
    Ok(())
}

/// The index of the one interface of `dom` of type `iface_type` with `mac`
/// (any MAC when only one has the type).
pub fn find_interface(dom: &Domain, iface_type: &str, mac: Option<&str>) -> Result<usize> {
    let interfaces = dom.interfaces()?;
    let matching: Vec<usize> = interfaces
        .iter()
        .enumerate()
        .filter(|(_, i)| i.iface_type == iface_type)
        .filter(|(_, i)| mac.is_none_or(|m| i.mac.as_deref().is_some_and(|own| own.eq_ignore_ascii_case(m))))
        .map(|(index, _)| index)
        .collect();
    match (matching.as_slice(), mac) {
        ([index], _) => Ok(*index),
        ([], Some(mac)) => Err(Error::operation_failed(format!(
            "domain '{}' has no interface of type '{iface_type}' with MAC address '{mac}'",
            dom.name()
        ))),
        ([], None) => {
            Err(Error::operation_failed(format!("domain '{}' has no interface of type '{iface_type}'", dom.name())))
        }
        (_, _) => Err(Error::operation_failed(format!(
            "domain '{}' has several interfaces of type '{iface_type}'; name one with --mac",
            dom.name()
        ))),
    }
}

/// Unplugs the live definition's `index`th interface: `device_del`, then
/// once QEMU reports `DEVICE_DELETED` (or the device is already gone) its
/// netdev, its tap and its `<interface>` go.
pub async fn detach(store: &Store, domain: &str, status: &LiveStatus, monitor: &Monitor, index: usize) -> Result<()> {
    let client = &monitor.client;
    let live = status.domain.get()?;
    let iface = live.interfaces()?.remove(index);
    let id = live_nic_id(&iface, index);
    if is_q35(machine_of(live).unwrap_or("q35")) {
        let on_root_complex = root_bus_devices(monitor, domain).await?.iter().any(|d| d["qdev_id"] == id.as_str());
        if on_root_complex {
            return Err(Error::operation_failed(format!(
                "interface '{id}' of domain '{domain}' cannot be detached live: its model '{}' is a conventional \
                 PCI device, on q35's root complex, which cannot unplug it (a virtio or e1000e NIC goes on a root \
                 port of its own); detach it with --config and restart the domain",
                nic_model(&iface)
            )));
        }
    }
    let mut events = client.subscribe_events();
    let deleted = |e: &strata_qmp::QmpEvent| e.event == "DEVICE_DELETED" && e.data["device"] == id.as_str();
    match client.execute("device_del", Some(json!({ "id": id }))).await {
        Ok(_) => {}
        // Already gone: a request an earlier detach left pending ended.
        Err(QmpError::Command { class, .. }) if class == "DeviceNotFound" => {}
        // Already asked for by an earlier detach: wait for it again.
        Err(QmpError::Command { desc, .. }) if desc.contains("already in the process of unplug") => {}
        Err(e) => return Err(qmp_error(domain, e)),
    }
    // Recorded as soon as QEMU has the request, so that whichever command
    // next finds the device gone finishes the detach.
    let pending = PendingUnplug { alias: id.clone(), tap: iface.target_dev.clone() };
    edit_status_async(store, domain, |s| {
        if !s.pending_unplugs.contains(&pending) {
            s.pending_unplugs.push(pending.clone());
        }
        Ok(())
    })
    .await?;
    if device_exists(monitor, &id).await? {
        if let Err(e) = client.wait_event(&mut events, deleted, UNPLUG_WAIT).await {
            if device_exists(monitor, &id).await? {
                tracing::debug!(domain, device = id, error = %e, "no DEVICE_DELETED");
                return Err(Error::operation_failed(format!(
                    "the guest of domain '{domain}' has not released interface '{id}' after {}s; the unplug request \
                     stays pending and the next command that reads the domain (domiflist, dumpxml, list, …) \
                     finishes it once the guest has released the device",
                    UNPLUG_WAIT.as_secs()
                )));
            }
        }
    }
    finish_unplug(store, domain, monitor, &pending).await
}

/// Finishes the pending unplugs of `status` whose device QEMU no longer
/// has (the guest released it after the detach stopped waiting): their
/// netdevs, taps and `<interface>`s go. Returns whether any was finished.
pub async fn finish_pending_unplugs(
    store: &Store,
    domain: &str,
    status: &LiveStatus,
    monitor: &Monitor,
) -> Result<bool> {
    let mut finished = false;
    for pending in &status.pending_unplugs {
        if !device_exists(monitor, &pending.alias).await? {
            finish_unplug(store, domain, monitor, pending).await?;
            finished = true;
        }
    }
    Ok(finished)
}

/// What follows the device's removal: its netdev, its tap, its
/// `<interface>` in the live XML and the pending record go. Another
/// command may have finished it first: what is already gone is skipped.
async fn finish_unplug(store: &Store, domain: &str, monitor: &Monitor, pending: &PendingUnplug) -> Result<()> {
    let netdev = json!({ "id": format!("host{}", pending.alias) });
    match monitor.client.execute("netdev_del", Some(netdev)).await {
        Ok(_) => {}
        Err(QmpError::Command { class, .. }) if class == "DeviceNotFound" => {}
        Err(e) => return Err(qmp_error(domain, e)),
    }
    edit_status_async(store, domain, |s| {
        let live = s.domain.get_mut()?;
        if let Some(now) = find_by_id(live, &pending.alias)? {
            live.remove_interface(now)?;
        }
        if let Some(tap) = &pending.tap {
            if let Some(position) = s.host_nics.iter().position(|n| &n.name == tap) {
                s.host_nics.remove(position).remove()?;
            }
        }
        s.pending_unplugs.retain(|p| p != pending);
        Ok(())
    })
    .await?;
    Ok(())
}

fn find_by_id(dom: &Domain, id: &str) -> Result<Option<usize>> {
    Ok(dom.interfaces()?.iter().enumerate().position(|(index, iface)| live_nic_id(iface, index) == id))
}

/// Whether QEMU still has the device `id`.
async fn device_exists(monitor: &Monitor, id: &str) -> Result<bool> {
    let path = format!("/machine/peripheral/{id}");
    match monitor.client.execute("qom-list", Some(json!({ "path": path }))).await {
        Ok(_) => Ok(true),
        Err(QmpError::Command { class, .. }) if class == "DeviceNotFound" => Ok(false),
        Err(e) => Err(qmp_error(&path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nic_is_found_by_type_and_mac_and_an_absent_or_ambiguous_one_is_refused_naming_it() {
        let dom = Domain::parse(
            "<domain><name>vm</name><devices><interface type='user'><mac address='52:54:00:00:00:01'/></interface>\
             <interface type='network'><source network='n'/><mac address='52:54:00:00:00:02'/><alias name='net5'/>\
             </interface><interface type='network'><source network='n'/><mac address='52:54:00:00:00:03'/>\
             </interface></devices></domain>",
        )
        .expect("xml");
        assert_eq!(find_interface(&dom, "user", None).expect("the one user NIC"), 0);
        assert_eq!(find_interface(&dom, "network", Some("52:54:00:00:00:03")).expect("by MAC"), 2);
        let several = find_interface(&dom, "network", None).expect_err("two network NICs");
        assert!(several.to_string().contains("several interfaces of type 'network'; name one with --mac"), "{several}");
        let absent = find_interface(&dom, "network", Some("52:54:00:00:00:09")).expect_err("no such MAC");
        assert!(absent.to_string().contains("no interface of type 'network' with MAC address '52:54:00:00:00:09'"));
        let ids: Vec<String> =
            dom.interfaces().expect("interfaces").iter().enumerate().map(|(i, f)| live_nic_id(f, i)).collect();
        assert_eq!(ids, ["net0", "net5", "net2"]);
        assert_eq!(free_nic_id(&dom).expect("free id"), "net1");
    }

    #[test]
    fn a_device_option_string_becomes_device_add_arguments_on_the_free_port() {
        let args =
            device_arguments("virtio-net-pci,id=net1,netdev=hostnet1,mac=52:54:00:00:00:02", Some("strata-port2"));
        assert_eq!(
            args,
            json!({ "driver": "virtio-net-pci", "id": "net1", "netdev": "hostnet1", "mac": "52:54:00:00:00:02",
                    "bus": "strata-port2" })
        );
        assert!(is_q35("pc-q35-7.2") && is_q35("q35") && !is_q35("pc-i440fx-7.2"));
    }
}
