//! What a running network is on the host: a bridge with the network's
//! address, for `nat` a masquerade rule in an nftables table of its own and
//! IPv4 forwarding on. Every step is undone by name, so undoing a step that
//! never happened (a `net-start` killed before it) is harmless.

use std::path::Path;

use crate::error::{Error, Result};
use crate::tool::run_tool;

use super::def::NetworkDef;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

pub fn device_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// The nftables table holding a network's rules: `strata_NAME`, with what
/// nft does not take in a name as `_`.
pub fn nft_table(network: &str) -> String {
    let name: String = network.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("strata_{name}")
}

pub fn create_bridge(def: &NetworkDef) -> Result<()> {
    let stp = if def.stp { "1" } else { "0" };
    // The kernel counts the forward delay in hundredths of a second, and
    // refuses one below 2 s while STP is on.
    let delay = (if def.stp { def.delay.max(2) } else { def.delay } * 100).to_string();
    run_tool("ip", &["link", "add", &def.bridge, "type", "bridge", "stp_state", stp, "forward_delay", &delay])?;
    Ok(())
}

pub fn configure_bridge(def: &NetworkDef) -> Result<()> {
    if let Some(ip) = &def.ip {
        run_tool("ip", &["addr", "add", &format!("{}/{}", ip.address, ip.prefix), "dev", &def.bridge])?;
    }
    run_tool("ip", &["link", "set", &def.bridge, "up"])?;
    Ok(())
}

pub fn delete_bridge(bridge: &str) -> Result<()> {
    if device_exists(bridge) {
        run_tool("ip", &["link", "del", bridge])?;
    }
    Ok(())
}

/// Masquerades what leaves the subnet for elsewhere.
pub fn add_masquerade(table: &str, subnet: &str) -> Result<()> {
    run_tool("nft", &["add", "table", "ip", table])?;
    run_tool("nft", &["add", "chain", "ip", table, "postrouting", "{ type nat hook postrouting priority 100 ; }"])?;
    run_tool(
        "nft",
        &["add", "rule", "ip", table, "postrouting", "ip", "saddr", subnet, "ip", "daddr", "!=", subnet, "masquerade"],
    )?;
    Ok(())
}

/// The `ip` tables of Strata networks on the host, from every store.
pub fn strata_tables() -> Result<Vec<String>> {
    let listed = run_tool("nft", &["list", "tables", "ip"])?;
    Ok(listed
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table ip "))
        .filter(|t| t.starts_with("strata_"))
        .map(str::to_string)
        .collect())
}

pub fn delete_table(table: &str) -> Result<()> {
    if strata_tables()?.iter().any(|t| t == table) {
        run_tool("nft", &["delete", "table", "ip", table])?;
    }
    Ok(())
}

pub fn ip_forwarding() -> Result<bool> {
    let value = std::fs::read_to_string(IP_FORWARD).map_err(|e| Error::io("read", Path::new(IP_FORWARD), e))?;
    Ok(value.trim() == "1")
}

pub fn set_ip_forwarding(on: bool) -> Result<()> {
    run_tool("sysctl", &["-q", "-w", &format!("net.ipv4.ip_forward={}", u8::from(on))])?;
    Ok(())
}
