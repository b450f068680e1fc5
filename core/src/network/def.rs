//! `<network>`: a virtual network's definition, kept losslessly (what
//! Strata does not model survives), with the typed fields `net-start` uses.

use std::net::Ipv4Addr;

use crate::error::{Error, Result};
use crate::xml::Element;

/// libvirt's order of `<network>` children.
const NETWORK_CHILD_ORDER: &[&str] = &["name", "uuid", "forward", "bridge", "mac", "domain", "dns", "ip"];

/// The longest network device name the kernel accepts (IFNAMSIZ - 1).
const MAX_DEVICE_NAME: usize = 15;

/// An IPv4 address of the host on the network's bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkIp {
    pub address: Ipv4Addr,
    pub prefix: u8,
    /// `<dhcp><range start end/>`.
    pub dhcp_range: Option<(Ipv4Addr, Ipv4Addr)>,
    /// `<dhcp><host mac ip name/>`: fixed addresses.
    pub dhcp_hosts: Vec<DhcpHost>,
}

/// A fixed DHCP address: `<host mac='…' ip='…' name='…'/>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpHost {
    pub mac: String,
    pub ip: Ipv4Addr,
    pub name: Option<String>,
}

impl NetworkIp {
    /// The netmask in dotted form: `255.255.255.0`.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(if self.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(self.prefix)) })
    }

    /// The subnet in CIDR form: `192.168.100.0/24`.
    pub fn subnet(&self) -> String {
        let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(self.prefix)) };
        format!("{}/{}", Ipv4Addr::from(u32::from(self.address) & mask), self.prefix)
    }
}

/// A network's definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkDef {
    element: Element,
    pub name: String,
    pub uuid: String,
    /// The bridge device the network's guests are put on.
    pub bridge: String,
    pub stp: bool,
    /// Forward delay in seconds.
    pub delay: u32,
    /// `nat`, or none for an isolated network.
    pub nat: bool,
    pub ip: Option<NetworkIp>,
}

fn bad(name: &str, what: String) -> Error {
    Error::xml(format!("network '{name}' {what}"))
}

impl NetworkDef {
    /// Parses and checks a `<network>` document; a missing UUID is generated,
    /// and a missing bridge name is `bridge_for_unnamed`.
    pub fn parse(xml: &str, bridge_for_unnamed: impl FnOnce() -> String) -> Result<NetworkDef> {
        let mut element = Element::parse(xml)?;
        if element.name != "network" {
            return Err(Error::xml(format!("expected a <network> document, found <{}>", element.name)));
        }
        let name = element.child_text("name").ok_or_else(|| Error::xml("the <network> has no <name>"))?;
        crate::store::validate_name("network", &name)?;
        let uuid = match element.child_text("uuid") {
            Some(u) => uuid::Uuid::parse_str(u.trim())
                .map_err(|_| bad(&name, format!("has an invalid UUID '{u}'")))?
                .to_string(),
            None => {
                let u = uuid::Uuid::new_v4().to_string();
                element.insert_ordered(Element::new("uuid").with_text(u.clone()), NETWORK_CHILD_ORDER);
                u
            }
        };
        let nat = match element.child("forward").map(|f| f.attr("mode").unwrap_or("nat")) {
            None => false,
            Some("nat") => true,
            Some(other) => {
                return Err(Error::config_unsupported(format!(
                    "network '{name}' has <forward mode='{other}'>; Strata networks are nat or isolated (no <forward>)"
                )))
            }
        };
        let bridge_el = element.child("bridge");
        let stp = bridge_el.and_then(|b| b.attr("stp")) != Some("off");
        let delay = match bridge_el.and_then(|b| b.attr("delay")) {
            Some(d) => d.parse().map_err(|_| bad(&name, format!("has a bridge delay '{d}' that is not a number")))?,
            None => 0,
        };
        let bridge = match bridge_el.and_then(|b| b.attr("name")) {
            Some(b) => b.to_string(),
            None => {
                let b = bridge_for_unnamed();
                let mut el = bridge_el.cloned().unwrap_or_else(|| Element::new("bridge"));
                el.set_attr("name", &b);
                element.remove_children("bridge");
                element.insert_ordered(el, NETWORK_CHILD_ORDER);
                b
            }
        };
        if bridge.is_empty()
            || bridge.len() > MAX_DEVICE_NAME
            || !bridge.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(bad(&name, format!("has a bridge name '{bridge}' the kernel cannot use")));
        }
        let ip = Self::parse_ip(&element, &name)?;
        if nat && ip.is_none() {
            return Err(bad(&name, "forwards with nat but has no <ip address='…'>".into()));
        }
        Ok(NetworkDef { element, name, uuid, bridge, stp, delay, nat, ip })
    }

    fn parse_ip(element: &Element, name: &str) -> Result<Option<NetworkIp>> {
        let mut ips = element.children_named("ip").filter(|ip| ip.attr("family").unwrap_or("ipv4") == "ipv4");
        let Some(ip) = ips.next() else { return Ok(None) };
        if ips.next().is_some() {
            return Err(Error::config_unsupported(format!("network '{name}' has more than one IPv4 <ip>")));
        }
        let addr = |text: &str, what: &str| -> Result<Ipv4Addr> {
            text.parse().map_err(|_| bad(name, format!("has an invalid {what} '{text}'")))
        };
        let address =
            addr(ip.attr("address").ok_or_else(|| bad(name, "has an <ip> without 'address'".into()))?, "address")?;
        let prefix = match (ip.attr("prefix"), ip.attr("netmask")) {
            (Some(p), _) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= 32)
                .ok_or_else(|| bad(name, format!("has an invalid prefix '{p}'")))?,
            (None, Some(m)) => {
                let mask = u32::from(addr(m, "netmask")?);
                if mask.leading_ones() + mask.trailing_zeros() != 32 {
                    return Err(bad(name, format!("has a netmask '{m}' that is not contiguous")));
                }
                mask.leading_ones() as u8
            }
            (None, None) => 24,
        };
        let dhcp_range = match ip.child("dhcp").and_then(|d| d.child("range")) {
            Some(range) => {
                let end =
                    |a: &str| range.attr(a).ok_or_else(|| bad(name, format!("has a <dhcp><range> without '{a}'")));
                Some((addr(end("start")?, "DHCP range start")?, addr(end("end")?, "DHCP range end")?))
            }
            None => None,
        };
        let mut dhcp_hosts = Vec::new();
        for host in ip.child("dhcp").into_iter().flat_map(|d| d.children_named("host")) {
            let (Some(mac), Some(host_ip)) = (host.attr("mac"), host.attr("ip")) else {
                return Err(bad(name, "has a <dhcp><host> without both 'mac' and 'ip'".into()));
            };
            crate::xml::check_mac(mac)
                .map_err(|_| bad(name, format!("has a <dhcp><host> with an invalid mac '{mac}'")))?;
            let name_attr = host.attr("name").map(str::to_string);
            if name_attr
                .as_deref()
                .is_some_and(|n| n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || "-.".contains(c)))
            {
                return Err(bad(
                    name,
                    format!("has a <dhcp><host> with an invalid name '{}'", name_attr.unwrap_or_default()),
                ));
            }
            dhcp_hosts.push(DhcpHost {
                mac: mac.to_lowercase(),
                ip: addr(host_ip, "DHCP host address")?,
                name: name_attr,
            });
        }
        Ok(Some(NetworkIp { address, prefix, dhcp_range, dhcp_hosts }))
    }

    /// The definition as stored and dumped.
    pub fn to_xml(&self) -> String {
        self.element.to_xml()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_elements_survive_and_the_missing_parts_are_filled_in() {
        let xml = "<network><name>n</name><forward mode='nat'/><ip address='192.168.77.1' netmask='255.255.255.0'>\
                   <dhcp><range start='192.168.77.10' end='192.168.77.20'/></dhcp></ip><x-unknown a='1'/></network>";
        let def = NetworkDef::parse(xml, || "virbr9".into()).expect("parse");
        assert!(def.nat);
        assert_eq!(def.bridge, "virbr9");
        let ip = def.ip.clone().expect("ip");
        assert_eq!((ip.subnet().as_str(), ip.prefix), ("192.168.77.0/24", 24));
        assert_eq!(ip.dhcp_range.map(|r| r.1.to_string()), Some("192.168.77.20".to_string()));
        assert_eq!(ip.netmask().to_string(), "255.255.255.0");
        let stored = def.to_xml();
        assert!(stored.contains("<x-unknown a='1'/>") && stored.contains("<bridge name='virbr9'/>"), "{stored}");
        assert!(stored.contains(&format!("<uuid>{}</uuid>", def.uuid)), "{stored}");
    }

    #[test]
    fn bad_networks_are_refused_naming_what_is_wrong() {
        let cases = [
            ("<network><name>n</name><forward mode='bridge'/></network>", "mode='bridge'"),
            ("<network><name>n</name><forward/></network>", "no <ip"),
            ("<network><name>n</name><bridge name='a-very-long-bridge-name'/></network>", "'a-very-long-bridge-name'"),
            ("<network><name>n</name><ip address='10.0.0.1' netmask='255.0.255.0'/></network>", "'255.0.255.0'"),
            ("<network><name>n</name><ip address='10.0.0.x'/></network>", "'10.0.0.x'"),
            ("<network><name>a/b</name></network>", "'a/b'"),
            ("<network><name>n</name><ip address='10.0.0.1'><dhcp><host mac='52:54:00:00:00:01'/></dhcp></ip></network>", "both 'mac' and 'ip'"),
            ("<network><name>n</name><ip address='10.0.0.1'><dhcp><host mac='52:54' ip='10.0.0.5'/></dhcp></ip></network>", "mac '52:54'"),
            ("<pool/>", "<network>"),
        ];
        for (xml, words) in cases {
            let err = NetworkDef::parse(xml, || "virbr0".into()).expect_err(xml);
            assert!(err.to_string().contains(words), "{xml}: {err}");
        }
    }
}
