//! Running domains without a daemon.
//!
//! `start` spawns QEMU in its own session and records it in the live status
//! XML (pid, start time, domain id, the definition it was started from, the
//! `strata` process that started it) before QEMU runs, as starting until its
//! monitors are up. Every later call reconciles first: a QEMU that is gone
//! (or whose pid now belongs to another process) turns the domain shut off
//! and its status and sockets are removed; one whose starter died before it
//! was of any use (still starting, or a storage daemon without a job) is
//! stopped the same way; a live one is reattached through one of its QMP
//! monitors. Each QEMU has [`MONITORS`] monitors, each guarded by a lock
//! file, so one `strata` can hold a monitor for a long call while others
//! use the rest.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use strata_core::driver::DomainState;
use strata_core::store::Store;
use strata_core::xml::{Domain, Element};
use strata_core::{Error, Result};

use crate::tap::CreatedNic;
use strata_engine::job::record::{self, JobRecord};
use strata_engine::process::ProcessId;
use strata_qemu_block::jobs::{block_job_event, event_time_us};
use strata_qemu_block::monitor::{acquire, acquire_asking, ask_free, qmp_error, Monitor, QuestionAsked};
use strata_qemu_block::nodes::root_node;
use strata_qemu_block::offline::{ServerRecord, Verdict};
use strata_qemu_block::runtime::{RuntimePaths, MONITORS};
use strata_qmp::types::{RunState, StatusInfo};
use strata_qmp::{QmpClient, QmpError};

/// The live status of a running domain, as kept in `status.xml`.
#[derive(Debug, Clone)]
pub struct LiveStatus {
    /// The process and the `strata` answerable for it while it is
    /// starting or, for a storage daemon, while it has no job: the one that
    /// started it, or the one that recorded the end of its last job (and
    /// quits it).
    pub run: ServerRecord,
    pub id: u32,
    /// The definition the domain runs with; disk chains are updated as
    /// they change.
    pub domain: StatusDomain,
    /// Block jobs in progress.
    pub jobs: Vec<JobRecord>,
    pub server: Server,
    /// Each disk's root (active) format node, kept up to date so that
    /// operations need not read QEMU's whole block graph to find it.
    pub roots: std::collections::BTreeMap<String, String>,
    /// For unique names of nodes Strata adds later, and unique job ids.
    pub next_node: u64,
    /// The reason word of the last run-state change Strata made, with the
    /// state (virsh's word) it led to: libvirt reports `(unpaused)` or
    /// `(from snapshot)`, which QEMU's run state alone cannot tell.
    pub reason: Option<(String, String)>,
    /// Host network devices Strata created for the guest (taps,
    /// macvtaps), deleted at [`cleanup`]; recorded before QEMU runs.
    pub host_nics: Vec<CreatedNic>,
    /// NICs QEMU was asked to unplug whose guest had not released them
    /// when the detach gave up waiting; the next command that reads the
    /// domain finishes each one QEMU no longer has.
    pub pending_unplugs: Vec<PendingUnplug>,
    /// libvirt's `custom-monitor` taint: a command was passed through to
    /// QEMU's monitor (`qemu-monitor-command`), which may have changed
    /// QEMU's block graph or devices behind Strata's records, so that the
    /// live XML is read from QEMU from then on.
    pub custom_monitor: bool,
}

/// The definition a status holds, parsed when first asked for. Most
/// commands read the status for its process, jobs or nodes only, and a
/// disk's backing chain can make the definition most of the file (370 KB
/// for 1,000 layers): read, it is kept as text; written back untouched, it
/// is that text again.
#[derive(Debug, Clone)]
pub struct StatusDomain {
    /// status.xml as read, and where in it the `<domain>` element is;
    /// dropped once the definition is changed.
    text: String,
    raw: std::ops::Range<usize>,
    parsed: std::sync::OnceLock<Domain>,
}

impl StatusDomain {
    fn parsed(domain: Domain) -> StatusDomain {
        StatusDomain { text: String::new(), raw: 0..0, parsed: std::sync::OnceLock::from(domain) }
    }

    fn raw(&self) -> &str {
        self.text.get(self.raw.clone()).unwrap_or_default()
    }

    /// The definition, parsed on first use.
    pub fn get(&self) -> Result<&Domain> {
        if let Some(domain) = self.parsed.get() {
            return Ok(domain);
        }
        let domain = Domain::parse(self.raw()).map_err(|e| Error::internal(format!("status XML: {e}")))?;
        Ok(self.parsed.get_or_init(|| domain))
    }

    /// The definition to change in place.
    pub fn get_mut(&mut self) -> Result<&mut Domain> {
        self.get()?;
        self.text = String::new();
        self.parsed.get_mut().ok_or_else(|| Error::internal("status XML: the definition was not kept"))
    }

    pub fn into_inner(mut self) -> Result<Domain> {
        self.get()?;
        self.parsed.take().ok_or_else(|| Error::internal("status XML: the definition was not kept"))
    }

    /// Replaces the definition.
    pub fn set(&mut self, domain: Domain) {
        *self = StatusDomain::parsed(domain);
    }

    /// `root` written with the definition as its last child: the text it
    /// was read as unless it has been parsed since.
    fn write_under(&self, root: &Element) -> String {
        match self.parsed.get() {
            Some(domain) => root.to_xml_with_child(domain.element()),
            None => root.to_xml_with_raw_child(self.raw()),
        }
    }
}

impl strata_engine::job::LiveDefinition for StatusDomain {
    fn definition(&self) -> Result<&Domain> {
        self.get()
    }

    fn definition_mut(&mut self) -> Result<&mut Domain> {
        self.get_mut()
    }
}

/// An unplug QEMU was asked for and the guest has not yet completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUnplug {
    /// The NIC's QEMU id (its alias in the live XML).
    pub alias: String,
    /// The host device it runs on, if any.
    pub tap: Option<String>,
}

impl PendingUnplug {
    fn to_element(&self) -> Element {
        let element = Element::new("pendingunplug").with_attr("alias", &*self.alias);
        match &self.tap {
            Some(tap) => element.with_attr("tap", &**tap),
            None => element,
        }
    }

    fn from_element(element: &Element) -> Option<PendingUnplug> {
        Some(PendingUnplug { alias: element.attr("alias")?.to_string(), tap: element.attr("tap").map(str::to_string) })
    }
}

/// What serves the domain's disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// The domain runs in `qemu-system-x86_64`.
    Vm,
    /// The domain is shut off; `qemu-storage-daemon` runs its block jobs.
    StorageDaemon,
}

impl LiveStatus {
    /// The status of the server `run` records.
    pub fn new(run: ServerRecord, id: u32, domain: Domain, server: Server) -> LiveStatus {
        let roots = domain
            .disks()
            .unwrap_or_default()
            .into_iter()
            .filter(|d| d.chain.is_some())
            .map(|d| (d.target.clone(), root_node(&d.target)))
            .collect();
        LiveStatus {
            run,
            id,
            domain: StatusDomain::parsed(domain),
            jobs: Vec::new(),
            server,
            roots,
            next_node: 1,
            reason: None,
            host_nics: Vec::new(),
            pending_unplugs: Vec::new(),
            custom_monitor: false,
        }
    }

    /// Whether a started server exists only for its owner: a storage
    /// daemon without a job.
    fn idle(&self) -> bool {
        !self.is_vm() && self.jobs.is_empty()
    }

    pub fn is_vm(&self) -> bool {
        self.server == Server::Vm
    }

    pub fn to_xml(&self) -> String {
        let mut jobs = Element::new("jobs");
        for j in &self.jobs {
            jobs = jobs.with_child(j.to_element());
        }
        let mut roots = Element::new("roots").with_attr("next", self.next_node.to_string());
        for (disk, node) in &self.roots {
            roots =
                roots.with_child(Element::new("root").with_attr("disk", disk.clone()).with_attr("node", node.clone()));
        }
        let mut root = Element::new("domstatus").with_attr(
            "server",
            match self.server {
                Server::Vm => "vm",
                Server::StorageDaemon => "storage-daemon",
            },
        );
        self.run.set_attrs(&mut root);
        root.set_attr("id", self.id.to_string());
        root = root.with_child(jobs).with_child(roots);
        if !self.host_nics.is_empty() {
            let nics = self.host_nics.iter().fold(Element::new("hostnics"), |nics, n| nics.with_child(n.to_element()));
            root = root.with_child(nics);
        }
        if !self.pending_unplugs.is_empty() {
            let pending =
                self.pending_unplugs.iter().fold(Element::new("pendingunplugs"), |p, u| p.with_child(u.to_element()));
            root = root.with_child(pending);
        }
        if let Some((state, word)) = &self.reason {
            root = root.with_child(Element::new("reason").with_attr("state", &**state).with_text(&**word));
        }
        if self.custom_monitor {
            root = root.with_child(Element::new("taint").with_attr("flag", "custom-monitor"));
        }
        self.domain.write_under(&root)
    }

    pub fn parse(xml: String) -> Result<LiveStatus> {
        let (root, raw) = Element::parse_keeping_raw(&xml, "domain")?;
        let raw = raw.ok_or_else(|| Error::internal("status XML lacks the <domain>"))?;
        let num = |attr: &str| -> Result<u64> {
            root.attr(attr)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| Error::internal(format!("status XML lacks a numeric '{attr}'")))
        };
        let custom_monitor = root.elements().any(|t| t.name == "taint" && t.attr("flag") == Some("custom-monitor"));
        let jobs_el = root.child("jobs");
        let jobs = jobs_el
            .map(|j| j.children_named("job").map(JobRecord::from_element).collect::<Result<Vec<_>>>())
            .transpose()?
            .unwrap_or_default();
        Ok(LiveStatus {
            run: ServerRecord::from_attrs(&root)?,
            id: u32::try_from(num("id")?).map_err(|_| Error::internal("status XML id out of range"))?,
            domain: StatusDomain { text: xml, raw, parsed: std::sync::OnceLock::new() },
            jobs,
            roots: root
                .child("roots")
                .map(|r| {
                    r.children_named("root")
                        .filter_map(|e| Some((e.attr("disk")?.to_string(), e.attr("node")?.to_string())))
                        .collect()
                })
                .unwrap_or_default(),
            next_node: root.child("roots").and_then(|r| r.attr("next")).and_then(|n| n.parse().ok()).unwrap_or(1),
            server: match root.attr("server") {
                Some("storage-daemon") => Server::StorageDaemon,
                _ => Server::Vm,
            },
            reason: root.child("reason").and_then(|r| Some((r.attr("state")?.to_string(), r.text()))),
            host_nics: root
                .child("hostnics")
                .map(|n| n.children_named("hostnic").filter_map(CreatedNic::from_element).collect())
                .unwrap_or_default(),
            pending_unplugs: root
                .child("pendingunplugs")
                .map(|p| p.children_named("pendingunplug").filter_map(PendingUnplug::from_element).collect())
                .unwrap_or_default(),
            custom_monitor,
        })
    }
}

pub fn runtime_paths(store: &Store, name: &str) -> Result<RuntimePaths> {
    let dir = store.domain_dir(name)?.join("run");
    // sun_path holds 108 bytes including the terminator.
    let longest = dir.join(format!("qmp-{}.sock", MONITORS - 1));
    if longest.as_os_str().len() > 107 {
        return Err(Error::config_unsupported(format!(
            "monitor socket path '{}' is longer than a Unix socket allows; use a shorter state root",
            longest.display()
        )));
    }
    Ok(RuntimePaths { dir })
}

/// Reads the status of `name` and checks that its QEMU still runs. A dead
/// QEMU's status and runtime files are removed (the caller must hold the
/// domain lock or accept that another process may do the same), and so
/// are those of a server whose owner died while it was of use to no one
/// else (still starting, or a storage daemon without a job), once it is
/// stopped. A server another process is starting is not there yet.
pub fn reconcile(store: &Store, name: &str) -> Result<Option<LiveStatus>> {
    let Some(xml) = store.read_status(name)? else { return Ok(None) };
    let status = match LiveStatus::parse(xml) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(domain = name, error = %e, "unreadable status XML; treating the domain as shut off");
            cleanup(store, name)?;
            return Ok(None);
        }
    };
    let process = status.run.process;
    match status.run.verdict(status.idle()) {
        Verdict::Gone => {
            tracing::debug!(domain = name, pid = process.pid, "QEMU is gone; cleaning up");
            let server = if status.is_vm() { "QEMU" } else { "qemu-storage-daemon" };
            record::record_server_exit(store, name, &status.jobs, server, process.pid)?;
            forget(store, name, process)?;
            Ok(None)
        }
        Verdict::Abandoned => {
            tracing::info!(domain = name, pid = process.pid, "stopping a server whose starter died");
            process.stop(Duration::from_secs(3))?;
            forget(store, name, process)?;
            Ok(None)
        }
        Verdict::Starting => Ok(None),
        Verdict::Serving => Ok(Some(status)),
    }
}

/// Changes the running domain's status under the domain lock: reads it
/// afresh ([`reconcile`]), lets `change` edit it and writes it back if it
/// changed; `None` (nothing written) when nothing serves the domain. An
/// error from `change` leaves the status as it was. Async code calls
/// [`edit_status_async`], which waits for the lock off the runtime.
pub fn edit_status<T>(
    store: &Store,
    name: &str,
    change: impl FnOnce(&mut LiveStatus) -> Result<T>,
) -> Result<Option<T>> {
    let _lock = store.lock_domain(name)?;
    edit_locked_status(store, name, change)
}

/// [`edit_status`] from async code.
pub async fn edit_status_async<T>(
    store: &Store,
    name: &str,
    change: impl FnOnce(&mut LiveStatus) -> Result<T>,
) -> Result<Option<T>> {
    let _lock = strata_engine::blocking::lock_domain(store, name).await?;
    edit_locked_status(store, name, change)
}

/// [`edit_status`] for a caller that already holds the domain lock.
pub fn edit_locked_status<T>(
    store: &Store,
    name: &str,
    change: impl FnOnce(&mut LiveStatus) -> Result<T>,
) -> Result<Option<T>> {
    let Some(mut status) = reconcile(store, name)? else { return Ok(None) };
    let before = status.to_xml();
    let changed = change(&mut status)?;
    let after = status.to_xml();
    if after != before {
        store.write_status(name, &after)?;
    }
    Ok(Some(changed))
}

/// [`cleanup`] unless the status has meanwhile come to name another
/// process (another caller cleaned up and started a new one).
fn forget(store: &Store, name: &str, process: ProcessId) -> Result<()> {
    let still = store.read_status(name)?.and_then(|xml| LiveStatus::parse(xml).ok()).map(|s| s.run.process);
    if still.is_none_or(|p| p == process) {
        cleanup(store, name)?;
    }
    Ok(())
}

/// Removes a stopped domain's host network devices, status and runtime
/// directory.
pub fn cleanup(store: &Store, name: &str) -> Result<()> {
    if let Some(status) = store.read_status(name)?.and_then(|xml| LiveStatus::parse(xml).ok()) {
        for nic in &status.host_nics {
            nic.remove()?;
        }
    }
    store.remove_status(name)?;
    let dir = runtime_paths(store, name)?.dir;
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", &dir, e)),
    }
}

/// Monitors this process holds, by domain name.
#[derive(Default)]
pub struct MonitorCache {
    held: tokio::sync::Mutex<HashMap<String, (ProcessId, Arc<Monitor>)>>,
}

impl MonitorCache {
    /// A monitor of the running domain, reusing one this process holds.
    pub async fn get(&self, store: &Store, name: &str, process: ProcessId) -> Result<Arc<Monitor>> {
        let mut held = self.held.lock().await;
        if let Some((pid, m)) = held.get(name) {
            if *pid == process && m.client.is_connected() {
                return Ok(Arc::clone(m));
            }
        }
        let monitor = Arc::new(acquire(&runtime_paths(store, name)?, name).await?);
        held.insert(name.to_string(), (process, Arc::clone(&monitor)));
        Ok(monitor)
    }

    /// Asks the QEMU serving `name` for its run state now, on a new
    /// connection, if this process holds no monitor of it: QEMU reads and
    /// answers while the caller reads the domain's records, and
    /// [`MonitorCache::get_with_run_state`] takes the answer. `None` when
    /// nothing can be asked (no runtime directory: the domain is shut off;
    /// nothing listening; every monitor held); the records say then what
    /// runs, and the question is asked after them, if at all.
    pub fn ask_run_state_early(&self, store: &Store, name: &str) -> Option<QuestionAsked> {
        let holds_one = match self.held.try_lock() {
            Ok(held) => held.get(name).is_some_and(|(_, m)| m.client.is_connected()),
            Err(_) => true,
        };
        if holds_one {
            return None;
        }
        let asked = runtime_paths(store, name).and_then(|paths| ask_free(&paths, name, "query-status"));
        asked.unwrap_or_else(|e| {
            tracing::debug!(domain = name, error = %e, "run state not asked ahead of the records");
            None
        })
    }

    /// Like [`MonitorCache::get`], with QEMU's run state: a new connection
    /// asks `query-status` with its opening, which spares `list` and
    /// `dominfo` a round trip (or takes the answer to `early`, asked by
    /// [`MonitorCache::ask_run_state_early`]); a held one asks after.
    pub async fn get_with_run_state(
        &self,
        store: &Store,
        name: &str,
        process: ProcessId,
        early: Option<QuestionAsked>,
    ) -> Result<(Arc<Monitor>, StatusInfo)> {
        let mut held = self.held.lock().await;
        let reusable = held.get(name).filter(|(pid, m)| *pid == process && m.client.is_connected());
        if let Some(m) = reusable.map(|(_, m)| Arc::clone(m)) {
            drop(held);
            let run = m.client.query_status().await.map_err(|e| qmp_error(name, e))?;
            return Ok((m, run));
        }
        let (monitor, reply) = match early {
            Some(asked) => asked.answer(name).await?,
            None => acquire_asking(&runtime_paths(store, name)?, name, "query-status").await?,
        };
        let monitor = Arc::new(monitor);
        held.insert(name.to_string(), (process, Arc::clone(&monitor)));
        let run = reply
            .and_then(|value| {
                serde_json::from_value(value)
                    .map_err(|e| QmpError::Protocol(format!("reply to 'query-status' did not decode: {e}")))
            })
            .map_err(|e| qmp_error(name, e))?;
        Ok((monitor, run))
    }

    /// Keeps `monitor`, just taken of the QEMU `process` started for
    /// `name`, for the calls that follow.
    pub async fn hold(&self, name: &str, process: ProcessId, monitor: Monitor) -> Arc<Monitor> {
        let monitor = Arc::new(monitor);
        self.held.lock().await.insert(name.to_string(), (process, Arc::clone(&monitor)));
        monitor
    }

    pub async fn forget(&self, name: &str) {
        self.held.lock().await.remove(name);
    }
}

/// virsh's state for a QEMU run state, with libvirt's reason words.
pub fn state_of(run: RunState) -> (DomainState, &'static str) {
    match run {
        RunState::Running => (DomainState::Running, "booted"),
        RunState::Prelaunch | RunState::Paused => (DomainState::Paused, "user"),
        RunState::Debug => (DomainState::Paused, "debugger"),
        RunState::Inmigrate | RunState::Postmigrate | RunState::FinishMigrate => (DomainState::Paused, "migration"),
        RunState::IoError => (DomainState::Paused, "I/O error"),
        RunState::InternalError => (DomainState::Paused, "unknown"),
        RunState::SaveVm => (DomainState::Paused, "snapshot"),
        RunState::RestoreVm => (DomainState::Paused, "from snapshot"),
        RunState::Watchdog => (DomainState::Paused, "watchdog"),
        RunState::GuestPanicked => (DomainState::Crashed, "panicked"),
        RunState::Shutdown => (DomainState::Shutdown, "user"),
        RunState::Suspended => (DomainState::PmSuspended, "unknown"),
        RunState::Colo | RunState::Unknown => (DomainState::NoState, "unknown"),
    }
}

/// The MAC QEMU reports for the NIC of each of the domain's interfaces
/// (the NIC's `mac` property, which every model has), as
/// `(interface index, MAC)`; an interface QEMU runs no NIC for (a type the
/// driver does not start) has none.
pub async fn nic_macs(client: &QmpClient, domain: &str, dom: &Domain) -> Result<Vec<(usize, String)>> {
    let mut out = Vec::new();
    for (index, iface) in dom.interfaces()?.iter().enumerate() {
        let path = format!("/machine/peripheral/{}", crate::launch::live_nic_id(iface, index));
        let args = serde_json::json!({ "path": path, "property": "mac" });
        match client.execute("qom-get", Some(args)).await {
            Ok(mac) => {
                let mac = mac.as_str().ok_or_else(|| Error::internal(format!("qom-get {path} mac gave {mac}")))?;
                out.push((index, mac.to_string()));
            }
            Err(QmpError::Command { class, .. }) if class == "DeviceNotFound" => {}
            Err(e) => return Err(qmp_error(domain, e)),
        }
    }
    Ok(out)
}

/// Where the next domain id is counted (ids grow across restarts of
/// domains, as libvirt's do, until the store is reset).
pub fn next_domain_id(store: &Store) -> Result<u32> {
    let path = store.root().join("next-id");
    let _lock = store.lock_store_for("next-id")?;
    let current: u32 = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(1);
    strata_core::store::atomic_write(&path, format!("{}\n", current.saturating_add(1)).as_bytes())?;
    Ok(current)
}

/// virsh's words for a QEMU event, if it is one `strata event` reports:
/// a block job's (see [`block_job_event`]) or a lifecycle change.
pub fn translate_event(domain: &str, ev: &strata_qmp::QmpEvent) -> Option<strata_core::driver::DomainEvent> {
    use strata_qmp::KnownEvent;
    if let Some(event) = block_job_event(domain, ev) {
        return Some(event);
    }
    let detail = match ev.known() {
        KnownEvent::Stop => "Suspended Paused",
        KnownEvent::Resume => "Resumed Unpaused",
        KnownEvent::Shutdown(_) => "Stopped Shutdown",
        _ => return None,
    };
    Some(strata_core::driver::DomainEvent {
        domain: domain.to_string(),
        event: "lifecycle".to_string(),
        detail: detail.to_string(),
        disk: None,
        timestamp_us: event_time_us(ev),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> LiveStatus {
        let this = ProcessId::this().expect("this process");
        let domain = Domain::parse(
            "<domain type='kvm'><name>vm</name><devices><disk type='file' device='disk'>\
             <driver name='qemu' type='qcow2'/><source file='/i/top'/>\
             <backingStore type='file'><format type='raw'/><source file='/i/base'/></backingStore>\
             <target dev='vda' bus='virtio'/></disk></devices></domain>",
        )
        .expect("a definition");
        LiveStatus::new(ServerRecord::starting(this, this), 7, domain, Server::Vm)
    }

    #[test]
    fn a_status_read_and_written_without_its_definition_parsed_is_unchanged() {
        let xml = status().to_xml();
        let mut read = LiveStatus::parse(xml.clone()).expect("parse");
        assert!(read.domain.parsed.get().is_none(), "the definition is not parsed to read the status");
        assert_eq!(read.to_xml(), xml);
        read.next_node = 42;
        let written = read.to_xml();
        assert!(written.contains("next='42'"), "{written}");
        assert_eq!(written.replace("next='42'", "next='1'"), xml);
        assert_eq!(read.domain.get().expect("parse on use").name(), "vm");
    }

    #[test]
    fn a_changed_definition_is_written_and_a_damaged_one_is_an_error_when_used() {
        let mut read = LiveStatus::parse(status().to_xml()).expect("parse");
        read.domain.get_mut().expect("parse").set_id(Some(7));
        let written = LiveStatus::parse(read.to_xml()).expect("parse again");
        assert_eq!(written.domain.get().expect("parse").element().attr("id"), Some("7"));

        let damaged = status().to_xml().replace("<name>vm</name>", "<title>vm</title>");
        let read = LiveStatus::parse(damaged).expect("the status itself reads");
        let err = read.domain.get().expect_err("the definition does not parse");
        assert!(err.to_string().contains("status XML"), "{err}");
    }
}
