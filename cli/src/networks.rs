//! The virtual network commands (`net-*`), with virsh's syntax, tables and
//! messages. The network (or file) a command names may be given by name or
//! by position, as in virsh (see [`crate::virsh_args`]).

use std::fmt::Write as _;

use anyhow::{anyhow, Result};
use clap::{Args, Subcommand};
use strata_core::driver::{NetworkInfo, NetworkLease, NetworkOps};
use strata_core::ErrorKind;

use crate::output;
use crate::pools::yes_no;
use crate::shared::{format_timestamp, read_document};
use crate::table::{format_fields, format_table};
use crate::virsh_args::BY_POSITION;

#[derive(Subcommand, Debug)]
// Options added when the command is parsed: see `commands::Command`.
#[command(defer = true)]
pub enum NetworkCommand {
    /// Define (but do not start) a network from an XML file.
    #[command(name = "net-define")]
    Define(FileArgs),
    /// Create and start a transient network from an XML file: it is gone
    /// once destroyed.
    #[command(name = "net-create")]
    Create(FileArgs),
    /// The leases of a running network's DHCP server.
    #[command(name = "net-dhcp-leases")]
    DhcpLeases(LeasesArgs),
    /// Undefine an inactive network.
    #[command(name = "net-undefine")]
    Undefine(NetworkArgs),
    /// Start a (previously defined) inactive network.
    #[command(name = "net-start")]
    Start(NetworkArgs),
    /// Destroy (stop) a network.
    #[command(name = "net-destroy")]
    Destroy(NetworkArgs),
    /// List networks.
    #[command(name = "net-list")]
    List(ListArgs),
    /// Network information.
    #[command(name = "net-info")]
    Info(InfoArgs),
    /// Network information in XML.
    #[command(name = "net-dumpxml")]
    Dumpxml(NetworkArgs),
    /// Autostart a network.
    #[command(name = "net-autostart")]
    Autostart(AutostartArgs),
    /// Convert a network name to its UUID.
    #[command(name = "net-uuid")]
    Uuid(NetworkArgs),
    /// Convert a network UUID to its name.
    #[command(name = "net-name")]
    Name(UuidArgs),
}

/// `net-dhcp-leases NETWORK [--mac MAC]`.
#[derive(Args, Debug)]
pub struct LeasesArgs {
    #[command(flatten)]
    network: NetworkArgs,
    /// Only the leases of this MAC address.
    #[arg(long)]
    mac: Option<String>,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

/// `net-define FILE`, `net-create FILE`.
#[derive(Args, Debug)]
pub struct FileArgs {
    /// A <network> XML file.
    #[arg(long, value_name = "FILE", help_heading = BY_POSITION)]
    file: String,
}

/// The network a command acts on.
#[derive(Args, Debug)]
pub struct NetworkArgs {
    /// Network name.
    #[arg(long, value_name = "NETWORK", help_heading = BY_POSITION)]
    network: String,
}

#[derive(Args, Debug)]
pub struct UuidArgs {
    /// Network UUID.
    #[arg(long, value_name = "UUID", help_heading = BY_POSITION)]
    network: String,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// List inactive and active networks.
    #[arg(long)]
    all: bool,
    /// List inactive networks only.
    #[arg(long)]
    inactive: bool,
    /// List network names only.
    #[arg(long)]
    name: bool,
    /// List network UUIDs only.
    #[arg(long)]
    uuid: bool,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    network: NetworkArgs,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct AutostartArgs {
    #[command(flatten)]
    network: NetworkArgs,
    /// Unmark the network: it no longer starts at boot.
    #[arg(long)]
    disable: bool,
}

/// An unknown network as virsh reports it (`failed to get network 'n'`,
/// then libvirt's error); other failures under `context`.
fn lookup_error(e: strata_core::Error, network: &str, context: Option<String>) -> anyhow::Error {
    let line =
        if e.kind() == ErrorKind::NoNetwork { Some(format!("failed to get network '{network}'")) } else { context };
    match line {
        Some(line) => anyhow!(e).context(line),
        None => anyhow!(e),
    }
}

/// Runs one network command; returns what it prints.
pub async fn run(nets: &dyn NetworkOps, cmd: NetworkCommand, global_json: bool, quiet: bool) -> Result<String> {
    let mut out = String::new();
    match cmd {
        NetworkCommand::Define(a) => {
            let file = a.file;
            let xml = read_document(&file)?;
            let name = nets
                .net_define_xml(&xml)
                .await
                .map_err(|e| anyhow!(e).context(format!("Failed to define network from {file}")))?;
            writeln!(out, "Network {name} defined from {file}\n")?;
        }
        NetworkCommand::Create(a) => {
            let file = a.file;
            let xml = read_document(&file)?;
            let created = nets
                .net_create_xml(&xml)
                .await
                .map_err(|e| anyhow!(e).context(format!("Failed to create network from {file}")))?;
            for w in created.warnings {
                output::err(&format!("warning: {w}\n"));
            }
            writeln!(out, "Network {} created from {file}\n", created.name)?;
        }
        NetworkCommand::DhcpLeases(a) => {
            let name = a.network.network;
            let leases: Vec<NetworkLease> = nets
                .net_dhcp_leases(&name)
                .await
                .map_err(|e| lookup_error(e, &name, Some(format!("Failed to get leases info for {name}"))))?
                .into_iter()
                .filter(|l| a.mac.as_ref().is_none_or(|m| l.mac.eq_ignore_ascii_case(m)))
                .collect();
            if a.json || global_json {
                writeln!(out, "{}", serde_json::to_string_pretty(&leases)?)?;
            } else {
                let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
                let rows: Vec<Vec<String>> = leases
                    .iter()
                    .map(|l| {
                        // virsh's "%Y-%m-%d %H:%M:%S".
                        let mut expiry = format_timestamp(l.expiry_time.saturating_mul(1_000_000));
                        expiry.truncate(19);
                        vec![
                            expiry,
                            l.mac.clone(),
                            "ipv4".into(),
                            format!("{}/{}", l.address, l.prefix),
                            dash(&l.hostname),
                            dash(&l.client_id),
                        ]
                    })
                    .collect();
                let header = ["Expiry Time", "MAC address", "Protocol", "IP address", "Hostname", "Client ID or DUID"];
                out.push_str(&format_table(&header, &rows, quiet));
            }
        }
        NetworkCommand::Undefine(a) => {
            let name = a.network;
            nets.net_undefine(&name)
                .await
                .map_err(|e| lookup_error(e, &name, Some(format!("Failed to undefine network {name}"))))?;
            writeln!(out, "Network {name} has been undefined\n")?;
        }
        NetworkCommand::Start(a) => {
            let name = a.network;
            let warnings = nets
                .net_start(&name)
                .await
                .map_err(|e| lookup_error(e, &name, Some(format!("Failed to start network {name}"))))?;
            for w in warnings {
                output::err(&format!("warning: {w}\n"));
            }
            writeln!(out, "Network {name} started\n")?;
        }
        NetworkCommand::Destroy(a) => {
            let name = a.network;
            nets.net_destroy(&name)
                .await
                .map_err(|e| lookup_error(e, &name, Some(format!("Failed to destroy network {name}"))))?;
            writeln!(out, "Network {name} destroyed\n")?;
        }
        NetworkCommand::List(a) => {
            let shown: Vec<NetworkInfo> = nets
                .net_list()
                .await?
                .into_iter()
                .filter(|n| if a.inactive { !n.active } else { a.all || n.active })
                .collect();
            if a.json || global_json {
                writeln!(out, "{}", serde_json::to_string_pretty(&shown)?)?;
            } else if a.name || a.uuid {
                for n in &shown {
                    writeln!(out, "{}", if a.uuid { &n.uuid } else { &n.name })?;
                }
                out.push('\n');
            } else {
                let rows: Vec<Vec<String>> = shown
                    .iter()
                    .map(|n| {
                        let state = if n.active { "active" } else { "inactive" };
                        vec![n.name.clone(), state.to_string(), yes_no(n.autostart), yes_no(n.persistent)]
                    })
                    .collect();
                out.push_str(&format_table(&["Name", "State", "Autostart", "Persistent"], &rows, quiet));
            }
        }
        NetworkCommand::Info(a) => {
            let name = a.network.network;
            let info = nets.net_info(&name).await.map_err(|e| lookup_error(e, &name, None))?;
            if a.json || global_json {
                writeln!(out, "{}", serde_json::to_string_pretty(&info)?)?;
            } else {
                out.push_str(&format_fields(&[
                    ("Name", info.name.clone()),
                    ("UUID", info.uuid.clone()),
                    ("Active", yes_no(info.active)),
                    ("Persistent", yes_no(info.persistent)),
                    ("Autostart", yes_no(info.autostart)),
                    ("Bridge", info.bridge.clone()),
                ]));
            }
        }
        NetworkCommand::Dumpxml(a) => {
            let name = a.network;
            let xml = nets.net_xml(&name).await.map_err(|e| lookup_error(e, &name, None))?;
            writeln!(out, "{}", xml.trim_end())?;
        }
        NetworkCommand::Autostart(a) => {
            let name = a.network.network;
            let word = if a.disable { "unmark" } else { "mark" };
            nets.net_set_autostart(&name, !a.disable)
                .await
                .map_err(|e| lookup_error(e, &name, Some(format!("failed to {word} network {name} as autostarted"))))?;
            writeln!(out, "Network {name} {word}ed as autostarted\n")?;
        }
        NetworkCommand::Uuid(a) => {
            let name = a.network;
            let info = nets.net_info(&name).await.map_err(|e| lookup_error(e, &name, None))?;
            writeln!(out, "{}\n", info.uuid)?;
        }
        NetworkCommand::Name(a) => {
            let uuid = a.network;
            let found = nets.net_list().await?.into_iter().find(|n| n.uuid.eq_ignore_ascii_case(&uuid));
            let Some(info) = found else {
                return Err(anyhow!(strata_core::Error::new(
                    ErrorKind::NoNetwork,
                    format!("no network with matching uuid '{uuid}'")
                ))
                .context(format!("failed to get network '{uuid}'")));
            };
            writeln!(out, "{}\n", info.name)?;
        }
    }
    Ok(out)
}
