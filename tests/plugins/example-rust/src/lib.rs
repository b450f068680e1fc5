//! An example third-party driver, built as a plugin with
//! strata-plugin-sdk: a hypervisor that runs nothing, whose domains,
//! snapshots and disk sets are files in a state directory (the URI's
//! `root=DIR`, else `$STRATA_EXAMPLE_STATE`), so that separate `strata`
//! runs see the same state. URI: `example:///`.
//!
//! A snapshot is a copy of the domain's definition; reverting puts it
//! back. Lifecycle events go to the host's callbacks as they happen.
//! `STRATA_EXAMPLE_PANIC_IN=domain_info` makes `domain_info` panic, to
//! show what the SDK does with a panicking driver, and the URI's
//! `hang=list_domains` makes `list_domains` wait for an hour, writing
//! `list_domains.started` in the state directory when it starts and
//! `list_domains.cancelled` when the call is given up, to show cancellation.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use strata_core::capabilities::{
    DeleteMethods, DomainCapabilities, DriverCapabilities, RevertRules, RevertTo, RevertedGuest, SnapshotCapabilities,
    SnapshotCreation, SnapshotKinds, StorageCapabilities,
};
use strata_core::diskset;
use strata_core::driver::{
    Connection, DefineFlags, DefineOutcome, DiskChainCheck, DiskSetOps, DiskSetOutcome, DomainEvent, DomainInfo,
    DomainState, DomainSummary, DumpXmlFlags, SnapshotOps, SnapshotSummary, StartFlags, StartOutcome, UndefineFlags,
};
use strata_core::options::{SnapshotCreateFlags, SnapshotDeleteFlags, SnapshotRevertFlags};
use strata_core::uri::ConnectUri;
use strata_core::xml::{Domain, SnapshotDef};
use strata_core::{Error, ErrorKind, Result};
use strata_plugin_sdk::{EventSink, PluginDriver};

strata_plugin_sdk::export_driver!(ExampleDriver);

/// A connection: the state directory and the host's event callbacks.
pub struct ExampleDriver {
    uri: String,
    root: PathBuf,
    events: EventSink,
    /// The method that hangs (the URI's `hang`).
    hang: Option<String>,
}

/// Marks a hanging call given up, when the SDK drops it.
struct CancelMark(PathBuf);

impl Drop for CancelMark {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, "");
    }
}

/// A snapshot as the example keeps it.
#[derive(Serialize, Deserialize)]
struct SnapshotRecord {
    name: String,
    parent: Option<String>,
    creation_time: i64,
    /// Whether the domain ran when it was taken.
    state: String,
    domain_xml: String,
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::new(ErrorKind::System, format!("cannot {what} '{}': {e}", path.display()))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| io_error("read", path, e))
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io_error("create", dir, e))?;
    }
    std::fs::write(path, text).map_err(|e| io_error("write", path, e))
}

fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error("remove", path, e)),
        _ => Ok(()),
    }
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

impl ExampleDriver {
    fn domain_file(&self, name: &str) -> Result<PathBuf> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(Error::invalid_arg(format!("domain name '{name}' is not valid")));
        }
        Ok(self.root.join("domains").join(format!("{name}.xml")))
    }

    fn domain(&self, name: &str) -> Result<Domain> {
        let file = self.domain_file(name)?;
        if !file.exists() {
            return Err(Error::no_domain(format!("no domain with matching name '{name}'")));
        }
        Domain::parse(&read(&file)?)
    }

    fn running_file(&self, name: &str) -> PathBuf {
        self.root.join("running").join(name)
    }

    fn is_running(&self, name: &str) -> bool {
        self.running_file(name).exists()
    }

    fn snapshot_dir(&self, domain: &str) -> PathBuf {
        self.root.join("snapshots").join(domain)
    }

    fn current_file(&self, domain: &str) -> PathBuf {
        self.snapshot_dir(domain).join("current")
    }

    fn snapshots(&self, domain: &str) -> Result<Vec<SnapshotRecord>> {
        self.domain(domain)?;
        let dir = self.snapshot_dir(domain);
        let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(Vec::new()) };
        let mut records = Vec::new();
        for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            if path.extension().is_some_and(|e| e == "json") {
                let record: SnapshotRecord = serde_json::from_str(&read(&path)?)
                    .map_err(|e| Error::internal(format!("snapshot record '{}' is damaged: {e}", path.display())))?;
                records.push(record);
            }
        }
        records.sort_by(|a, b| (a.creation_time, &a.name).cmp(&(b.creation_time, &b.name)));
        Ok(records)
    }

    fn snapshot(&self, domain: &str, snapshot: &str) -> Result<SnapshotRecord> {
        self.snapshots(domain)?.into_iter().find(|s| s.name == snapshot).ok_or_else(|| {
            Error::new(ErrorKind::NoDomainSnapshot, format!("no domain snapshot with matching name '{snapshot}'"))
        })
    }

    fn current_snapshot(&self, domain: &str) -> Option<String> {
        std::fs::read_to_string(self.current_file(domain)).ok().map(|s| s.trim().to_string())
    }

    fn emit(&self, domain: &str, detail: &str) {
        self.events.emit(&DomainEvent {
            domain: domain.to_string(),
            event: "lifecycle".into(),
            detail: detail.into(),
            disk: None,
            timestamp_us: now() * 1_000_000,
        });
    }

    fn summary(&self, name: &str, dom: &Domain) -> DomainSummary {
        let running = self.is_running(name);
        DomainSummary {
            id: running.then_some(1),
            name: name.to_string(),
            uuid: dom.uuid().unwrap_or_default(),
            state: if running { DomainState::Running } else { DomainState::Shutoff },
            reason: Some(if running { "booted" } else { "unknown" }.into()),
            persistent: true,
            damaged: None,
        }
    }

    /// Changes a stopped domain's definition.
    fn edit<T>(&self, name: &str, change: impl FnOnce(&mut Domain) -> Result<T>) -> Result<T> {
        let mut dom = self.domain(name)?;
        let changed = change(&mut dom)?;
        write(&self.domain_file(name)?, &dom.to_xml())?;
        Ok(changed)
    }
}

impl PluginDriver for ExampleDriver {
    const NAME: &'static str = "example";
    const SCHEMES: &'static [&'static str] = &["example"];

    fn driver_capabilities() -> DriverCapabilities {
        DriverCapabilities {
            driver: "example".into(),
            uri: "example:///".into(),
            hypervisor: "none (an example plugin)".into(),
            domains: DomainCapabilities { run: true, events: true, ..Default::default() },
            snapshots: SnapshotCapabilities {
                kinds: SnapshotKinds { internal_disk: true, internal_memory: true, ..Default::default() },
                creation: SnapshotCreation { live: true, offline: true },
                revert: RevertRules { to: RevertTo::AnySnapshot, external: false, guest: RevertedGuest::StoppedOnly },
                delete: DeleteMethods { internal: true, metadata_only: true, ..Default::default() },
            },
            storage: StorageCapabilities { disk_sets: true, storage_pools: false },
            notes: vec!["domains, snapshots and disk sets are files in the state directory; nothing runs".into()],
            ..Default::default()
        }
    }

    fn open(uri: &ConnectUri, events: EventSink) -> Result<Self> {
        let root = uri
            .param("root")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("STRATA_EXAMPLE_STATE").map(PathBuf::from))
            .ok_or_else(|| {
                Error::invalid_arg(format!(
                    "the example driver needs a state directory: root=DIR in '{}' or $STRATA_EXAMPLE_STATE",
                    uri.as_str()
                ))
            })?;
        Ok(ExampleDriver { uri: uri.as_str().to_string(), root, events, hang: uri.param("hang").map(str::to_string) })
    }
}

#[async_trait]
impl Connection for ExampleDriver {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn capabilities(&self) -> DriverCapabilities {
        DriverCapabilities { uri: self.uri.clone(), ..Self::driver_capabilities() }
    }

    async fn list_domains(&self) -> Result<Vec<DomainSummary>> {
        if self.hang.as_deref() == Some("list_domains") {
            write(&self.root.join("list_domains.started"), "")?;
            let _mark = CancelMark(self.root.join("list_domains.cancelled"));
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        }
        let dir = self.root.join("domains");
        let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(Vec::new()) };
        let mut names: Vec<String> =
            entries.filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".xml").map(str::to_string)).collect();
        names.sort();
        names.iter().map(|name| Ok(self.summary(name, &self.domain(name)?))).collect()
    }

    async fn define_xml(&self, xml: &str, _flags: DefineFlags) -> Result<DefineOutcome> {
        let mut dom = Domain::parse(xml)?;
        let name = dom.name();
        dom.ensure_uuid();
        write(&self.domain_file(&name)?, &dom.to_xml())?;
        self.emit(&name, "Defined Added");
        Ok(DefineOutcome { name, warnings: vec![] })
    }

    async fn undefine(&self, name: &str, _flags: UndefineFlags) -> Result<()> {
        self.domain(name)?;
        if self.is_running(name) {
            return Err(Error::operation_invalid(format!("domain '{name}' is running")));
        }
        remove(&self.domain_file(name)?)?;
        self.emit(name, "Undefined Removed");
        Ok(())
    }

    async fn domain_info(&self, name: &str) -> Result<DomainInfo> {
        if std::env::var("STRATA_EXAMPLE_PANIC_IN").is_ok_and(|m| m == "domain_info") {
            panic!("domain_info was told to panic by STRATA_EXAMPLE_PANIC_IN");
        }
        let dom = self.domain(name)?;
        Ok(DomainInfo {
            summary: self.summary(name, &dom),
            os_type: dom.os_type(),
            max_memory_kib: dom.memory_kib().unwrap_or(0),
            used_memory_kib: dom.current_memory_kib().or(dom.memory_kib()).unwrap_or(0),
            vcpus: dom.vcpus(),
            autostart: false,
            managed_save: false,
        })
    }

    async fn start(&self, name: &str, _flags: StartFlags) -> Result<StartOutcome> {
        self.domain(name)?;
        if self.is_running(name) {
            return Err(Error::operation_invalid(format!("domain '{name}' is already active")));
        }
        write(&self.running_file(name), "")?;
        self.emit(name, "Started Booted");
        Ok(StartOutcome::default())
    }

    async fn destroy(&self, name: &str) -> Result<()> {
        self.domain(name)?;
        if !self.is_running(name) {
            return Err(Error::operation_invalid(format!("domain '{name}' is not running")));
        }
        remove(&self.running_file(name))?;
        self.emit(name, "Stopped Destroyed");
        Ok(())
    }

    async fn shutdown(&self, name: &str) -> Result<()> {
        self.destroy(name).await
    }

    async fn suspend(&self, _name: &str) -> Result<()> {
        Err(Error::no_support("the example driver cannot pause a domain"))
    }

    async fn resume(&self, _name: &str) -> Result<()> {
        Err(Error::no_support("the example driver cannot resume a domain"))
    }

    async fn dump_xml(&self, name: &str, _flags: DumpXmlFlags) -> Result<String> {
        Ok(self.domain(name)?.to_xml())
    }

    async fn check_chains(&self, name: &str, _disk: Option<&str>, _fix: bool) -> Result<Vec<DiskChainCheck>> {
        self.domain(name)?;
        Ok(Vec::new())
    }

    fn snapshots(&self) -> Option<&dyn SnapshotOps> {
        Some(self)
    }

    fn disk_sets(&self) -> Option<&dyn DiskSetOps> {
        Some(self)
    }
}

#[async_trait]
impl SnapshotOps for ExampleDriver {
    async fn snapshot_create(&self, domain: &str, xml: &str, _flags: SnapshotCreateFlags) -> Result<String> {
        let dom = self.domain(domain)?;
        let def = SnapshotDef::parse(xml)?;
        let existing = self.snapshots(domain)?;
        let name = def.name.unwrap_or_else(|| now().to_string());
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(Error::invalid_arg(format!("snapshot name '{name}' is not valid")));
        }
        if existing.iter().any(|s| s.name == name) {
            return Err(Error::operation_invalid(format!("snapshot '{name}' already exists")));
        }
        let state = if self.is_running(domain) { "running" } else { "shutoff" };
        let record = SnapshotRecord {
            name: name.clone(),
            parent: self.current_snapshot(domain),
            creation_time: now(),
            state: state.into(),
            domain_xml: dom.to_xml(),
        };
        let text = serde_json::to_string(&record).map_err(|e| Error::internal(e.to_string()))?;
        write(&self.snapshot_dir(domain).join(format!("{name}.json")), &text)?;
        write(&self.current_file(domain), &name)?;
        Ok(name)
    }

    async fn snapshot_list(&self, domain: &str) -> Result<Vec<SnapshotSummary>> {
        let current = self.current_snapshot(domain);
        Ok(self
            .snapshots(domain)?
            .into_iter()
            .map(|s| SnapshotSummary {
                current: current.as_deref() == Some(s.name.as_str()),
                name: s.name,
                parent: s.parent,
                creation_time: s.creation_time,
                state: s.state,
                location: "internal".into(),
            })
            .collect())
    }

    async fn snapshot_xml(&self, domain: &str, snapshot: &str) -> Result<String> {
        let record = self.snapshot(domain, snapshot)?;
        let parent = record.parent.map(|p| format!("<parent><name>{p}</name></parent>")).unwrap_or_default();
        Ok(format!(
            "<domainsnapshot>\n  <name>{}</name>\n  <state>{}</state>\n  {parent}<creationTime>{}</creationTime>\n  {}\n</domainsnapshot>\n",
            record.name, record.state, record.creation_time, record.domain_xml
        ))
    }

    async fn snapshot_set_current(&self, domain: &str, snapshot: &str) -> Result<()> {
        self.snapshot(domain, snapshot)?;
        write(&self.current_file(domain), snapshot)
    }

    async fn snapshot_revert(&self, domain: &str, snapshot: &str, _flags: SnapshotRevertFlags) -> Result<()> {
        let record = self.snapshot(domain, snapshot)?;
        if self.is_running(domain) {
            remove(&self.running_file(domain))?;
            self.emit(domain, "Stopped Destroyed");
        }
        write(&self.domain_file(domain)?, &record.domain_xml)?;
        write(&self.current_file(domain), snapshot)?;
        self.emit(domain, "Snapshot reverted");
        Ok(())
    }

    async fn snapshot_delete(&self, domain: &str, snapshot: &str, _flags: SnapshotDeleteFlags) -> Result<Vec<String>> {
        self.snapshot(domain, snapshot)?;
        remove(&self.snapshot_dir(domain).join(format!("{snapshot}.json")))?;
        if self.current_snapshot(domain).as_deref() == Some(snapshot) {
            remove(&self.current_file(domain))?;
        }
        Ok(Vec::new())
    }
}

#[async_trait]
impl DiskSetOps for ExampleDriver {
    async fn diskset_add(&self, domain: &str, disk: &str) -> Result<DiskSetOutcome> {
        self.edit(domain, |dom| diskset::set_selected(dom, disk, true))
    }

    async fn diskset_remove(&self, domain: &str, disk: &str) -> Result<DiskSetOutcome> {
        self.edit(domain, |dom| diskset::set_selected(dom, disk, false))
    }

    async fn diskset_add_all(&self, domain: &str) -> Result<usize> {
        self.edit(domain, |dom| {
            diskset::set_all(dom, true)?;
            Ok(diskset::selected(dom)?.len())
        })
    }

    async fn diskset_remove_all(&self, domain: &str) -> Result<usize> {
        self.edit(domain, |dom| diskset::set_all(dom, false))
    }

    async fn diskset_list(&self, domain: &str) -> Result<Vec<String>> {
        diskset::selected(&self.domain(domain)?)
    }
}
