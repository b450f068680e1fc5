//! A running guest's IP addresses as the host sees them (`domifaddr`):
//! the host's neighbour table (`/proc/net/arp`) read for the guest's MACs,
//! libvirt's `--source arp`, or the DHCP leases of the networks its
//! interfaces are on, `--source lease`.

use serde::{Deserialize, Serialize};

use crate::driver::NetworkLease;
use crate::error::{Error, Result};
use crate::xml::Interface;

/// The host's IPv4 neighbour table.
pub const ARP_TABLE: &str = "/proc/net/arp";

/// One address of one guest interface, as `domifaddr` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceAddress {
    /// The host device the interface runs on (`<target dev>`), `-` if none.
    pub name: String,
    pub mac: String,
    /// `ipv4` or `ipv6`.
    pub protocol: String,
    pub address: String,
    /// The prefix length; a neighbour table knows none (0, as libvirt's).
    pub prefix: u32,
}

/// Where `domifaddr` looks for addresses (`--source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressSource {
    /// A DHCP server's leases (virsh's default).
    Lease,
    /// The host's neighbour table.
    Arp,
    /// A guest agent.
    Agent,
}

impl AddressSource {
    pub fn parse(source: &str) -> Result<AddressSource> {
        match source {
            "lease" => Ok(AddressSource::Lease),
            "arp" => Ok(AddressSource::Arp),
            "agent" => Ok(AddressSource::Agent),
            other => {
                Err(Error::invalid_arg(format!("unknown address source '{other}'; expected 'lease', 'arp' or 'agent'")))
            }
        }
    }
}

/// The `(IP address, MAC)` pairs of a `/proc/net/arp` text, complete
/// entries only (flags with ATF_COM, 0x2).
pub fn parse_arp_table(text: &str) -> Vec<(String, String)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let &[ip, _hw_type, flags, mac, ..] = fields.as_slice() else { return None };
            let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).ok()?;
            (flags & 0x2 != 0).then(|| (ip.to_string(), mac.to_lowercase()))
        })
        .collect()
}

/// Each address the neighbour table `arp` gives for the MAC of one of
/// `interfaces`, in interface order.
pub fn arp_addresses(interfaces: &[Interface], arp: &str) -> Vec<InterfaceAddress> {
    let table = parse_arp_table(arp);
    let mut out = Vec::new();
    for iface in interfaces {
        let Some(mac) = iface.mac.as_deref().map(str::to_lowercase) else { continue };
        for (ip, _) in table.iter().filter(|(_, m)| *m == mac) {
            out.push(InterfaceAddress {
                name: iface.target_dev.clone().unwrap_or_else(|| "-".into()),
                mac: mac.clone(),
                protocol: "ipv4".into(),
                address: ip.clone(),
                prefix: 0,
            });
        }
    }
    out
}

/// The addresses `leases` (a network's DHCP leases) give the MAC of
/// `iface`, with the network's prefix, as libvirt's `--source lease`.
pub fn lease_addresses(iface: &Interface, leases: &[NetworkLease]) -> Vec<InterfaceAddress> {
    let Some(mac) = iface.mac.as_deref().map(str::to_lowercase) else { return Vec::new() };
    leases
        .iter()
        .filter(|l| l.mac == mac)
        .map(|l| InterfaceAddress {
            name: iface.target_dev.clone().unwrap_or_else(|| "-".into()),
            mac: mac.clone(),
            protocol: "ipv4".into(),
            address: l.address.clone(),
            prefix: l.prefix,
        })
        .collect()
}

/// The host's neighbour table, read.
pub fn read_arp_table() -> Result<String> {
    std::fs::read_to_string(ARP_TABLE).map_err(|e| Error::io("read", std::path::Path::new(ARP_TABLE), e))
}

/// virsh's `domifaddr` layout: a row per address, the interface's name
/// and MAC only on its first.
pub fn format_addresses(addresses: &[InterfaceAddress]) -> String {
    let mut out =
        format!(" {:<10} {:<20} {:<8}     {}\n{}\n", "Name", "MAC address", "Protocol", "Address", "-".repeat(79));
    let mut previous: Option<(&str, &str)> = None;
    for a in addresses {
        let first = previous != Some((&a.name, &a.mac));
        let (name, mac) = if first { (a.name.as_str(), a.mac.as_str()) } else { ("-", "-") };
        out.push_str(&format!(" {name:<10} {mac:<17}    {:<12} {}/{}\n", a.protocol, a.address, a.prefix));
        previous = Some((&a.name, &a.mac));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xml::Domain;

    const ARP: &str = "IP address       HW type     Flags       HW address            Mask     Device\n\
                       192.168.77.10    0x1         0x2         52:54:00:aa:bb:cc     *        vnet3\n\
                       192.168.77.11    0x1         0x6         52:54:00:AA:BB:CC     *        vnet3\n\
                       192.168.77.12    0x1         0x0         52:54:00:aa:bb:cc     *        vnet3\n\
                       10.0.0.1         0x1         0x2         52:54:00:00:00:01     *        eth0\n";

    #[test]
    fn the_neighbour_table_gives_each_complete_entry_of_a_guest_mac() {
        let dom = Domain::parse(
            "<domain><name>t</name><devices><interface type='ethernet'><mac address='52:54:00:aa:bb:cc'/>\
             <target dev='vnet3'/></interface><interface type='user'><mac address='52:54:00:11:11:11'/>\
             </interface></devices></domain>",
        )
        .expect("xml");
        let addresses = arp_addresses(&dom.interfaces().expect("interfaces"), ARP);
        let ips: Vec<&str> = addresses.iter().map(|a| a.address.as_str()).collect();
        assert_eq!(ips, ["192.168.77.10", "192.168.77.11"], "the incomplete entry is not an address");
        assert_eq!(
            format_addresses(&addresses),
            format!(
                " Name       MAC address          Protocol     Address\n{}\n \
                 vnet3      52:54:00:aa:bb:cc    ipv4         192.168.77.10/0\n \
                 -          -                    ipv4         192.168.77.11/0\n",
                "-".repeat(79)
            )
        );
    }

    #[test]
    fn an_unknown_source_is_refused_naming_it() {
        assert_eq!(AddressSource::parse("arp").expect("arp"), AddressSource::Arp);
        assert!(AddressSource::parse("dhcp").expect_err("refused").to_string().contains("'dhcp'"));
    }
}
