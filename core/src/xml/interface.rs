//! `<interface>`: the typed view of a network interface and the one patch
//! Strata writes back into it (a generated `<mac>`).
//!
//! Like [`Disk`](super::Disk), the view reads what Strata acts on and
//! leaves the document as written: `<ip>`, `<backend>`, `<boot>`,
//! `<address>`, `<virtualport>`, … are kept, unread.

use serde::Serialize;

use super::tree::Element;
use crate::error::{Error, Result};

/// libvirt's order of `<interface>` children; Strata inserts what it
/// writes at these places and leaves every other child where it was.
pub const INTERFACE_CHILD_ORDER: &[&str] = &[
    "mac",
    "source",
    "virtualport",
    "ip",
    "route",
    "script",
    "downscript",
    "backenddomain",
    "target",
    "guest",
    "model",
    "driver",
    "backend",
    "filterref",
    "tune",
    "teaming",
    "link",
    "mtu",
    "coalesce",
    "portForward",
    "boot",
    "rom",
    "alias",
    "address",
];

/// One `<range>` of a `<portForward>`: host ports `start..=end` (just
/// `start` without `end`) go to guest ports from `to` (the same ports
/// without it); `exclude` takes the ports out of the forward instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PortRange {
    pub start: u16,
    pub end: Option<u16>,
    pub to: Option<u16>,
    pub exclude: bool,
}

/// `<portForward proto address dev>`: host ports forwarded to the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortForward {
    /// `tcp` or `udp`.
    pub proto: String,
    /// The host address to listen on; every address when absent.
    pub address: Option<String>,
    /// The host interface to listen on.
    pub dev: Option<String>,
    pub ranges: Vec<PortRange>,
}

impl PortForward {
    /// Each forwarded `(host port, guest port)`, in the order the ranges
    /// give them, without the excluded ports.
    pub fn port_pairs(&self) -> Vec<(u16, u16)> {
        let excluded =
            |port: u16| self.ranges.iter().any(|r| r.exclude && (r.start..=r.end.unwrap_or(r.start)).contains(&port));
        let mut pairs = Vec::new();
        for range in self.ranges.iter().filter(|r| !r.exclude) {
            for host in range.start..=range.end.unwrap_or(range.start) {
                if !excluded(host) {
                    let guest = range.to.map_or(host, |to| to.saturating_add(host - range.start));
                    pairs.push((host, guest));
                }
            }
        }
        pairs
    }
}

/// What Strata reads from an `<interface>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Interface {
    /// `user`, `network`, `bridge`, `ethernet`, `direct`, …
    #[serde(rename = "type")]
    pub iface_type: String,
    /// `<mac address>`, as written (checked to be a unicast MAC).
    pub mac: Option<String>,
    /// `<model type>`: `virtio`, `e1000`, `rtl8139`, …
    pub model: Option<String>,
    /// What `<source>` names, as virsh's `domiflist` shows it: its
    /// `bridge`, `dev`, `network`, `name` or `path`.
    pub source: Option<String>,
    /// `<source mode>`: a `direct` interface's macvtap mode.
    pub source_mode: Option<String>,
    /// `<target dev>`: the host side's device name.
    pub target_dev: Option<String>,
    /// `<driver name>`: `vhost` or `qemu`.
    pub driver_name: Option<String>,
    /// `<driver queues>`.
    pub driver_queues: Option<u32>,
    pub port_forwards: Vec<PortForward>,
    /// `<alias name>`.
    pub alias: Option<String>,
}

impl Interface {
    /// Reads the interface that is `index`th (from 0) in `<devices>`; the
    /// index names it in errors when nothing else does.
    pub fn from_element(el: &Element, index: usize) -> Result<Interface> {
        let iface_type = el.attr("type").unwrap_or("user").to_string();
        let attr = |child: &str, attr: &str| el.child(child).and_then(|c| c.attr(attr)).map(str::to_string);
        let mac = attr("mac", "address");
        let what = describe(&iface_type, mac.as_deref(), index);
        if let Some(mac) = &mac {
            check_mac(mac).map_err(|why| Error::xml(format!("{what} has <mac address='{mac}'>: {why}")))?;
        }
        let source = el.child("source").and_then(|s| {
            ["bridge", "dev", "network", "name", "path"].iter().find_map(|a| s.attr(a)).map(str::to_string)
        });
        let driver_queues =
            match attr("driver", "queues") {
                None => None,
                Some(q) => Some(q.parse::<u32>().ok().filter(|q| *q > 0).ok_or_else(|| {
                    Error::xml(format!("{what} has <driver queues='{q}'>; expected a positive number"))
                })?),
            };
        let port_forwards = el
            .children_named("portForward")
            .map(|p| parse_port_forward(p).map_err(|e| e.context(what.clone())))
            .collect::<Result<Vec<_>>>()?;
        Ok(Interface {
            mac,
            model: attr("model", "type"),
            source,
            source_mode: attr("source", "mode"),
            target_dev: attr("target", "dev"),
            driver_name: attr("driver", "name"),
            driver_queues,
            port_forwards,
            alias: attr("alias", "name"),
            iface_type,
        })
    }
}

impl Interface {
    /// How an error names the interface that is `index`th in `<devices>`.
    pub fn description(&self, index: usize) -> String {
        describe(&self.iface_type, self.mac.as_deref(), index)
    }
}

/// How an error names an interface: by its MAC, else by its place.
fn describe(iface_type: &str, mac: Option<&str>, index: usize) -> String {
    match mac {
        Some(mac) => format!("interface '{mac}' (type '{iface_type}')"),
        None => format!("interface {} (type '{iface_type}')", index + 1),
    }
}

/// Why `mac` is not a MAC address a guest NIC can have, if it is not: six
/// hexadecimal octets separated by `:`, not a multicast address.
pub fn check_mac(mac: &str) -> std::result::Result<(), String> {
    let octets: Vec<&str> = mac.split(':').collect();
    let well_formed =
        octets.len() == 6 && octets.iter().all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()));
    let first = octets.first().and_then(|o| u8::from_str_radix(o, 16).ok());
    let (true, Some(first)) = (well_formed, first) else {
        return Err("expected six hexadecimal octets separated by ':' (52:54:00:12:34:56)".to_string());
    };
    if first & 1 == 1 {
        return Err("it is a multicast address, which no NIC can have".to_string());
    }
    Ok(())
}

fn port_attr(el: &Element, attr: &str) -> Result<Option<u16>> {
    el.attr(attr)
        .map(|v| {
            v.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| Error::xml(format!("<range {attr}='{v}'> is not a port number (1-65535)")))
        })
        .transpose()
}

fn parse_port_forward(el: &Element) -> Result<PortForward> {
    let proto = el.attr("proto").ok_or_else(|| Error::xml("a <portForward> has no 'proto' attribute"))?;
    if proto != "tcp" && proto != "udp" {
        return Err(Error::xml(format!("<portForward proto='{proto}'>; expected 'tcp' or 'udp'")));
    }
    let ranges = el
        .children_named("range")
        .map(|r| {
            let start = port_attr(r, "start")?.ok_or_else(|| Error::xml("a <portForward> <range> has no 'start'"))?;
            let end = port_attr(r, "end")?;
            if end.is_some_and(|end| end < start) {
                return Err(Error::xml(format!("<range start='{start}'> ends before it starts")));
            }
            let to = port_attr(r, "to")?;
            let span = end.map_or(0, |end| end - start);
            if to.is_some_and(|to| u32::from(to) + u32::from(span) > u32::from(u16::MAX)) {
                return Err(Error::xml(format!("<range start='{start}'> forwards past guest port 65535")));
            }
            let exclude = match r.attr("exclude") {
                None | Some("no") => false,
                Some("yes") => true,
                Some(other) => return Err(Error::xml(format!("<range exclude='{other}'>; expected 'yes' or 'no'"))),
            };
            Ok(PortRange { start, end, to, exclude })
        })
        .collect::<Result<Vec<_>>>()?;
    if ranges.is_empty() {
        return Err(Error::xml(format!("<portForward proto='{proto}'> has no <range>")));
    }
    Ok(PortForward {
        proto: proto.to_string(),
        address: el.attr("address").map(str::to_string),
        dev: el.attr("dev").map(str::to_string),
        ranges,
    })
}

/// A MAC in the range libvirt gives QEMU guests (`52:54:00:xx:xx:xx`),
/// its last three octets from `random`.
pub fn generated_mac(random: [u8; 3]) -> String {
    format!("52:54:00:{:02x}:{:02x}:{:02x}", random[0], random[1], random[2])
}

/// Writes `<mac address>` into an `<interface>`, in libvirt's place.
pub(crate) fn write_mac(el: &mut Element, mac: &str) {
    el.replace_or_insert(Element::new("mac").with_attr("address", mac), INTERFACE_CHILD_ORDER);
}

/// The `<interface>` virsh's `attach-interface TYPE SOURCE [--target]
/// [--mac] [--model]` describes: the source as the type names it
/// (`network`, `bridge`, a `direct` interface's `dev`; an `ethernet`
/// interface's is its target device), none for `user`.
pub fn interface_from_options(
    iface_type: &str,
    source: &str,
    target: Option<&str>,
    mac: Option<&str>,
    model: Option<&str>,
) -> Result<Element> {
    let mut el = Element::new("interface").with_attr("type", iface_type);
    let source_attr = match iface_type {
        "network" => Some("network"),
        "bridge" => Some("bridge"),
        "direct" => Some("dev"),
        "ethernet" | "user" => None,
        other => {
            return Err(Error::invalid_arg(format!(
                "interface type '{other}' cannot be attached (network, bridge, direct, ethernet or user)"
            )))
        }
    };
    if let Some(attr) = source_attr {
        el = el.with_child(Element::new("source").with_attr(attr, source));
    }
    if let Some(mac) = mac {
        check_mac(mac).map_err(|why| Error::invalid_arg(format!("--mac '{mac}': {why}")))?;
        el = el.with_child(Element::new("mac").with_attr("address", mac.to_lowercase()));
    }
    let target = target.or((iface_type == "ethernet").then_some(source));
    if let Some(dev) = target {
        el = el.with_child(Element::new("target").with_attr("dev", dev));
    }
    if let Some(model) = model {
        el = el.with_child(Element::new("model").with_attr("type", model));
    }
    Ok(el)
}

/// Writes `<alias name>` into an `<interface>`, in libvirt's place.
pub(crate) fn write_alias(el: &mut Element, alias: &str) {
    el.replace_or_insert(Element::new("alias").with_attr("name", alias), INTERFACE_CHILD_ORDER);
}

/// Writes `<target dev>` into an `<interface>`, in libvirt's place.
pub(crate) fn write_target(el: &mut Element, dev: &str) {
    el.replace_or_insert(Element::new("target").with_attr("dev", dev), INTERFACE_CHILD_ORDER);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xml::Domain;

    #[test]
    fn an_interface_is_read_with_its_port_forwards() {
        let xml = "<interface type='user'><mac address='52:54:00:ab:cd:ef'/><model type='virtio'/>\
                   <portForward proto='tcp' address='127.0.0.1'><range start='2022' to='22'/></portForward>\
                   <portForward proto='udp'><range start='5000' end='5004' to='6000'/>\
                   <range start='5002' end='5003' exclude='yes'/></portForward><alias name='ua-net'/></interface>";
        let iface = Interface::from_element(&Element::parse(xml).expect("xml"), 0).expect("interface");
        assert_eq!(iface.iface_type, "user");
        assert_eq!(iface.mac.as_deref(), Some("52:54:00:ab:cd:ef"));
        assert_eq!(iface.model.as_deref(), Some("virtio"));
        assert_eq!(iface.alias.as_deref(), Some("ua-net"));
        assert_eq!(iface.port_forwards[0].address.as_deref(), Some("127.0.0.1"));
        assert_eq!(iface.port_forwards[0].port_pairs(), [(2022, 22)]);
        assert_eq!(iface.port_forwards[1].port_pairs(), [(5000, 6000), (5001, 6001), (5004, 6004)]);
    }

    #[test]
    fn a_malformed_mac_or_port_is_refused_naming_the_interface() {
        let read = |xml: &str| Interface::from_element(&Element::parse(xml).expect("xml"), 1).map(|_| ());
        let err = read("<interface type='user'><mac address='52:54:00:zz:00:01'/></interface>").expect_err("bad mac");
        assert!(err.to_string().contains("interface '52:54:00:zz:00:01' (type 'user') has <mac"), "{err}");
        let err = read("<interface type='user'><mac address='01:00:5e:00:00:01'/></interface>").expect_err("multicast");
        assert!(err.to_string().contains("multicast"), "{err}");
        let err =
            read("<interface type='user'><portForward proto='tcp'><range start='70000'/></portForward></interface>")
                .expect_err("bad port");
        assert!(err.to_string().contains("interface 2 (type 'user')"), "{err}");
        assert!(err.to_string().contains("<range start='70000'> is not a port number"), "{err}");
        let err = read("<interface type='user'><portForward proto='sctp'><range start='1'/></portForward></interface>")
            .expect_err("bad proto");
        assert!(err.to_string().contains("proto='sctp'"), "{err}");
    }

    #[test]
    fn a_generated_mac_goes_where_libvirt_puts_it_and_the_rest_stays() {
        let xml = "<domain type='qemu'><name>vm</name><devices>\
                   <interface type='user'><!-- kept --><ip family='ipv4' address='10.0.3.0' prefix='24'/>\
                   <model type='e1000'/></interface></devices></domain>";
        let mut dom = Domain::parse(xml).expect("parses");
        assert_eq!(dom.interfaces().expect("read")[0].mac, None);
        dom.set_interface_mac(0, &generated_mac([1, 0xab, 0xff])).expect("set");
        let out = dom.to_xml();
        assert!(out.contains("<!-- kept -->\n      <mac address='52:54:00:01:ab:ff'/>\n      <ip"), "{out}");
        assert!(out.contains("<ip family='ipv4' address='10.0.3.0' prefix='24'/>"), "{out}");
        assert_eq!(dom.interfaces().expect("read")[0].mac.as_deref(), Some("52:54:00:01:ab:ff"));
    }
}
