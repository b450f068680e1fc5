//! Virtual networks, hypervisor-neutral: every driver with a state store
//! gets them (see [`crate::driver::Connection::networks`]), as it gets
//! storage pools.
//!
//! A running network is a bridge on the host with the network's address;
//! a `nat` network also has IPv4 forwarding on and a masquerade rule for its
//! subnet in an nftables table of its own (`table ip strata_NAME`), so that
//! stopping it deletes exactly that table; one with a `<dhcp><range>` has a
//! dnsmasq serving DHCP on its bridge (`dhcp`).
//!
//! Layout in the state store:
//! ```text
//! ROOT/networks/NAME/network.xml   the definition
//! ROOT/networks/NAME/autostart     present when the network is marked autostart
//! ROOT/networks/NAME/transient     present for a network net-create made (removed once inactive)
//! ROOT/networks/NAME/started.json  what net-start did (see StartRecord)
//! ROOT/networks/NAME/dnsmasq.*     the DHCP server's leases, hosts, pid file and log
//! ROOT/networks/.ip_forward        present while Strata turned IPv4 forwarding on
//! ```
//! `net-start` writes its record before each step, marked incomplete until
//! the last; the next network command that finds an incomplete record (its
//! writer died, since the store lock is held throughout) undoes what it
//! names. A record from an earlier boot of the host reads as inactive.

mod def;
mod dhcp;
mod host;

use std::fs;
use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use def::{DhcpHost, NetworkDef, NetworkIp};
pub use host::nft_table;

use crate::driver::{NetworkCreated, NetworkInfo, NetworkLease, NetworkOps};
use crate::error::{Error, ErrorKind, Result};
use crate::pool::boot_id;
use crate::process::ProcessId;
use crate::store::{atomic_write, entry_names, set_marker, validate_name, DomainLock, Store};
use crate::tool::offload;

/// The networks of one state store.
#[derive(Debug, Clone)]
pub struct NetworkManager {
    store: Store,
}

/// What `net-start` did, so that `net-destroy` undoes exactly that.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct StartRecord {
    boot: String,
    /// Every step was done.
    complete: bool,
    /// The bridge, when Strata created it (deleted at destroy).
    created_bridge: Option<String>,
    /// The nftables table Strata added.
    nft_table: Option<String>,
    /// The network's DHCP server, recorded before it ran.
    dnsmasq: Option<ProcessId>,
}

/// How long a network's dnsmasq has to exit on SIGTERM before SIGKILL.
const DNSMASQ_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The no-network error, in libvirt's words.
pub fn no_such_network(name: &str) -> Error {
    Error::new(ErrorKind::NoNetwork, format!("no network with matching name '{name}'"))
}

fn not_active(name: &str) -> Error {
    Error::operation_invalid(format!("network '{name}' is not active"))
}

impl NetworkManager {
    pub fn new(store: Store) -> NetworkManager {
        NetworkManager { store }
    }

    fn networks_dir(&self) -> PathBuf {
        self.store.root().join("networks")
    }

    fn network_dir(&self, name: &str) -> Result<PathBuf> {
        validate_name("network", name)?;
        Ok(self.networks_dir().join(name))
    }

    fn lock(&self) -> Result<DomainLock> {
        self.store.lock_store_for("networks")
    }

    fn names(&self) -> Result<Vec<String>> {
        let dir = self.networks_dir();
        Ok(entry_names(&dir)?
            .into_iter()
            .filter(|name| validate_name("network", name).is_ok() && dir.join(name).join("network.xml").exists())
            .collect())
    }

    /// A network's definition; one that is not defined is a no-network error.
    pub fn load(&self, name: &str) -> Result<NetworkDef> {
        let file = self.network_dir(name)?.join("network.xml");
        match crate::xml::read_document(&file) {
            Ok(xml) => NetworkDef::parse(&xml, String::new)
                .map_err(|e| e.context(format!("network definition '{}'", file.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(no_such_network(name)),
            Err(e) => Err(Error::io("read", &file, e)),
        }
    }

    fn dhcp_files(&self, name: &str) -> Result<dhcp::DhcpFiles> {
        Ok(dhcp::DhcpFiles::new(self.network_dir(name)?))
    }

    fn is_transient(&self, name: &str) -> Result<bool> {
        Ok(self.network_dir(name)?.join("transient").exists())
    }

    fn remove_network_dir(&self, name: &str) -> Result<()> {
        let dir = self.network_dir(name)?;
        fs::remove_dir_all(&dir).map_err(|e| Error::io("remove", &dir, e))
    }

    fn record_file(&self, name: &str) -> Result<PathBuf> {
        Ok(self.network_dir(name)?.join("started.json"))
    }

    fn record(&self, name: &str) -> Result<Option<StartRecord>> {
        let file = self.record_file(name)?;
        match fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::new(ErrorKind::StoreFormat, format!("{}: {e}", file.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read", &file, e)),
        }
    }

    fn write_record(&self, name: &str, record: &StartRecord) -> Result<()> {
        let json = serde_json::to_vec(record).map_err(|e| Error::internal(e.to_string()))?;
        atomic_write(&self.record_file(name)?, &json)
    }

    fn remove_record(&self, name: &str) -> Result<()> {
        let file = self.record_file(name)?;
        match fs::remove_file(&file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("remove", &file, e)),
            _ => Ok(()),
        }
    }

    /// Whether the network runs: started completely in this boot, its bridge there.
    fn is_running(&self, def: &NetworkDef) -> Result<bool> {
        let boot = boot_id()?;
        Ok(self.record(&def.name)?.is_some_and(|r| r.complete && r.boot == boot) && host::device_exists(&def.bridge))
    }

    /// Undoes the `net-start`s that died midway, forgets records of an
    /// earlier boot, and removes transient networks that no longer run.
    /// Called with the lock held.
    fn recover_locked(&self) -> Result<()> {
        let boot = boot_id()?;
        for name in self.names()? {
            match self.record(&name)? {
                Some(r) if !r.complete => self.undo_locked(&name, &r)?,
                Some(r) if r.boot != boot => self.remove_record(&name)?,
                _ => {}
            }
            if self.is_transient(&name)? && !self.is_running(&self.load(&name)?)? {
                self.remove_network_dir(&name)?;
            }
        }
        Ok(())
    }

    fn locked(&self) -> Result<DomainLock> {
        let lock = self.lock()?;
        self.recover_locked()?;
        Ok(lock)
    }

    /// Deletes what the record names, turns forwarding back off when Strata
    /// turned it on and no other Strata network on the host forwards (one of
    /// another store keeps it on), and drops the record.
    fn undo_locked(&self, name: &str, record: &StartRecord) -> Result<()> {
        if let Some(dnsmasq) = &record.dnsmasq {
            dnsmasq.stop(DNSMASQ_GRACE)?;
            self.dhcp_files(name)?.remove()?;
        }
        if let Some(table) = &record.nft_table {
            host::delete_table(table)?;
        }
        if let Some(bridge) = &record.created_bridge {
            host::delete_bridge(bridge)?;
        }
        self.remove_record(name)?;
        let saved = self.networks_dir().join(".ip_forward");
        if saved.exists() && !self.any_forwarding(name)? {
            host::set_ip_forwarding(false)?;
            fs::remove_file(&saved).map_err(|e| Error::io("remove", &saved, e))?;
        }
        Ok(())
    }

    /// Whether a running network other than `except` forwards: one of this
    /// store, or any Strata network on the host (another store's table).
    fn any_forwarding(&self, except: &str) -> Result<bool> {
        for other in self.names()? {
            if other != except && self.record(&other)?.is_some_and(|r| r.nft_table.is_some()) {
                return Ok(true);
            }
        }
        Ok(!host::strata_tables()?.is_empty())
    }

    fn start_locked(&self, def: &NetworkDef) -> Result<Vec<String>> {
        if host::device_exists(&def.bridge) {
            return Err(Error::operation_failed(format!(
                "network '{}': bridge '{}' already exists on this host",
                def.name, def.bridge
            )));
        }
        let mut record =
            StartRecord { boot: boot_id()?, created_bridge: Some(def.bridge.clone()), ..Default::default() };
        self.write_record(&def.name, &record)?;
        let mut steps = || -> Result<()> {
            host::create_bridge(def)?;
            crate::crash_point("net-start-bridge");
            host::configure_bridge(def)?;
            if let (true, Some(ip)) = (def.nat, &def.ip) {
                let table = host::nft_table(&def.name);
                record.nft_table = Some(table.clone());
                self.write_record(&def.name, &record)?;
                host::add_masquerade(&table, &ip.subnet())?;
                if !host::ip_forwarding()? {
                    let saved = self.networks_dir().join(".ip_forward");
                    atomic_write(&saved, b"0\n")?;
                    host::set_ip_forwarding(true)?;
                }
            }
            if dhcp::dnsmasq_binary().is_some() {
                let files = self.dhcp_files(&def.name)?;
                let recorded = record.clone();
                record.dnsmasq = dhcp::start(def, &files, |id| {
                    self.write_record(&def.name, &StartRecord { dnsmasq: Some(id), ..recorded })
                })?;
            }
            record.complete = true;
            self.write_record(&def.name, &record)
        };
        if let Err(e) = steps() {
            let record = self.record(&def.name)?.unwrap_or_default();
            if let Err(undo) = self.undo_locked(&def.name, &record) {
                tracing::warn!(network = def.name, "undoing a failed start: {}", undo.report());
            }
            return Err(e);
        }
        let mut warnings = Vec::new();
        if def.ip.as_ref().is_some_and(|ip| ip.dhcp_range.is_some()) && dhcp::dnsmasq_binary().is_none() {
            warnings.push(format!(
                "network '{}' has a DHCP range but no DHCP server runs on it: dnsmasq is not installed",
                def.name
            ));
        }
        Ok(warnings)
    }

    fn autostart(&self, name: &str) -> Result<bool> {
        Ok(self.network_dir(name)?.join("autostart").exists())
    }

    fn info(&self, def: &NetworkDef) -> Result<NetworkInfo> {
        Ok(NetworkInfo {
            name: def.name.clone(),
            uuid: def.uuid.clone(),
            active: self.is_running(def)?,
            persistent: !self.is_transient(&def.name)?,
            autostart: self.autostart(&def.name)?,
            bridge: def.bridge.clone(),
        })
    }

    /// A bridge name no defined network and no host device has: `virbrN`.
    fn free_bridge(&self) -> Result<String> {
        let mut taken = Vec::new();
        for name in self.names()? {
            taken.push(self.load(&name)?.bridge);
        }
        Ok((0..)
            .map(|n| format!("virbr{n}"))
            .find(|b| !taken.contains(b) && !host::device_exists(b))
            .unwrap_or_default())
    }

    fn define_blocking(&self, xml: &str) -> Result<String> {
        let _lock = self.locked()?;
        let free = self.free_bridge()?;
        let def = NetworkDef::parse(xml, || free)?;
        for other in self.names()? {
            let existing = self.load(&other)?;
            if other != def.name && existing.uuid == def.uuid {
                return Err(Error::operation_failed(format!(
                    "network '{other}' is already defined with uuid {}",
                    def.uuid
                )));
            }
            if other == def.name && existing.uuid != def.uuid {
                return Err(Error::operation_failed(format!(
                    "network '{other}' is already defined with uuid {}",
                    existing.uuid
                )));
            }
            if other != def.name && existing.bridge == def.bridge {
                return Err(Error::operation_failed(format!(
                    "bridge name '{}' already in use by network '{other}'",
                    def.bridge
                )));
            }
        }
        let dir = self.network_dir(&def.name)?;
        fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
        atomic_write(&dir.join("network.xml"), def.to_xml().as_bytes())?;
        // A transient network defined becomes persistent, as in libvirt.
        set_marker(&dir.join("transient"), false)?;
        Ok(def.name)
    }

    fn create_blocking(&self, xml: &str) -> Result<NetworkCreated> {
        let _lock = self.locked()?;
        let free = self.free_bridge()?;
        let def = NetworkDef::parse(xml, || free)?;
        if self.network_dir(&def.name)?.join("network.xml").exists() {
            return Err(Error::operation_failed(format!("network '{}' already exists", def.name)));
        }
        for other in self.names()? {
            let existing = self.load(&other)?;
            if existing.uuid == def.uuid || existing.bridge == def.bridge {
                return Err(Error::operation_failed(format!(
                    "network '{other}' already has uuid {} or bridge '{}'",
                    def.uuid, def.bridge
                )));
            }
        }
        let dir = self.network_dir(&def.name)?;
        fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
        set_marker(&dir.join("transient"), true)?;
        atomic_write(&dir.join("network.xml"), def.to_xml().as_bytes())?;
        match self.start_locked(&def) {
            Ok(warnings) => Ok(NetworkCreated { name: def.name, warnings }),
            Err(e) => {
                self.remove_network_dir(&def.name)?;
                Err(e)
            }
        }
    }

    fn dhcp_leases_blocking(&self, name: &str) -> Result<Vec<NetworkLease>> {
        let _lock = self.locked()?;
        let def = self.load(name)?;
        if !self.is_running(&def)? {
            return Err(not_active(name));
        }
        dhcp::read_leases(&def, &self.dhcp_files(name)?)
    }

    fn undefine_blocking(&self, name: &str) -> Result<()> {
        let _lock = self.locked()?;
        let def = self.load(name)?;
        if self.is_running(&def)? {
            return Err(Error::operation_invalid(format!("network '{name}' is still active")));
        }
        self.remove_network_dir(name)
    }

    fn start_blocking(&self, name: &str) -> Result<Vec<String>> {
        let _lock = self.locked()?;
        let def = self.load(name)?;
        if self.is_running(&def)? {
            return Err(Error::operation_invalid(format!("network '{name}' is already active")));
        }
        // A record of a network whose bridge vanished is stale: clear it.
        if let Some(record) = self.record(name)? {
            self.undo_locked(name, &record)?;
        }
        self.start_locked(&def)
    }

    fn destroy_blocking(&self, name: &str) -> Result<()> {
        let _lock = self.locked()?;
        let def = self.load(name)?;
        if !self.is_running(&def)? {
            return Err(not_active(name));
        }
        let record = self.record(name)?.unwrap_or_default();
        self.undo_locked(name, &record)?;
        if self.is_transient(name)? {
            self.remove_network_dir(name)?;
        }
        Ok(())
    }

    fn list_blocking(&self) -> Result<Vec<NetworkInfo>> {
        let _lock = self.locked()?;
        self.names()?.iter().map(|n| self.info(&self.load(n)?)).collect()
    }

    fn info_blocking(&self, name: &str) -> Result<NetworkInfo> {
        let _lock = self.locked()?;
        self.info(&self.load(name)?)
    }

    fn set_autostart_blocking(&self, name: &str, autostart: bool) -> Result<()> {
        let _lock = self.locked()?;
        self.load(name)?;
        let marker = self.network_dir(name)?.join("autostart");
        set_marker(&marker, autostart)
    }

    /// The bridge of a running network, for a guest's `<interface type='network'>`.
    pub fn active_bridge(&self, name: &str) -> Result<String> {
        let _lock = self.locked()?;
        let def = self.load(name)?;
        if !self.is_running(&def)? {
            return Err(not_active(name));
        }
        Ok(def.bridge)
    }
}

#[async_trait]
impl NetworkOps for NetworkManager {
    async fn net_define_xml(&self, xml: &str) -> Result<String> {
        let (manager, xml) = (self.clone(), xml.to_string());
        offload("network", move || manager.define_blocking(&xml)).await
    }

    async fn net_create_xml(&self, xml: &str) -> Result<NetworkCreated> {
        let (manager, xml) = (self.clone(), xml.to_string());
        offload("network", move || manager.create_blocking(&xml)).await
    }

    async fn net_dhcp_leases(&self, network: &str) -> Result<Vec<NetworkLease>> {
        let (manager, network) = (self.clone(), network.to_string());
        offload("network", move || manager.dhcp_leases_blocking(&network)).await
    }

    async fn net_undefine(&self, network: &str) -> Result<()> {
        let (manager, network) = (self.clone(), network.to_string());
        offload("network", move || manager.undefine_blocking(&network)).await
    }

    async fn net_start(&self, network: &str) -> Result<Vec<String>> {
        let (manager, network) = (self.clone(), network.to_string());
        offload("network", move || manager.start_blocking(&network)).await
    }

    async fn net_destroy(&self, network: &str) -> Result<()> {
        let (manager, network) = (self.clone(), network.to_string());
        offload("network", move || manager.destroy_blocking(&network)).await
    }

    async fn net_list(&self) -> Result<Vec<NetworkInfo>> {
        let manager = self.clone();
        offload("network", move || manager.list_blocking()).await
    }

    async fn net_info(&self, network: &str) -> Result<NetworkInfo> {
        let (manager, network) = (self.clone(), network.to_string());
        offload("network", move || manager.info_blocking(&network)).await
    }

    async fn net_xml(&self, network: &str) -> Result<String> {
        let (manager, network) = (self.clone(), network.to_string());
        offload("network", move || manager.load(&network).map(|d| d.to_xml())).await
    }

    async fn net_set_autostart(&self, network: &str, autostart: bool) -> Result<()> {
        let (manager, network) = (self.clone(), network.to_string());
        offload("network", move || manager.set_autostart_blocking(&network, autostart)).await
    }
}
