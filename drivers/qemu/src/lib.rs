//! strata-qemu: Strata's QEMU driver.
//!
//! Domains are defined in a state store and run as real
//! `qemu-system-x86_64` processes driven over QMP. No daemon is needed:
//! QEMU outlives the `strata` process that started it and later calls find
//! it again through the live status XML (see [`live`]).
//!
//! A program can embed the driver without the CLI or the registry:
//! `QemuConnection::open_embedded("/some/dir")` gives a
//! [`strata_core::driver::Connection`] (see `examples/embed.rs`).

mod affinity;
mod honoured;
mod hotplug;
mod jobs;
mod launch;
pub mod live;
mod memory_stream;
mod migrate;
mod monitor_command;
mod placement;
mod save;
mod snapshot_backend;
mod stream_intent;
mod tap;
mod transient;
mod vcpus;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use strata_core::capabilities::{
    BlockJobCapabilities, BlockJobKinds, CopyModes, DeleteMethods, DomainCapabilities, RevertRules, RevertTo,
    RevertedGuest, SnapshotCapabilities, SnapshotCreation, SnapshotKinds, StorageCapabilities,
};
use strata_core::define;
use strata_core::driver::{
    BlockJobOps, Connection, CpuPlacementOps, DefineFlags, DefineOutcome, DiskChainCheck, DiskSetOps, DomainEvent,
    DomainInfo, DomainJobInfo, DomainState, DomainSummary, DriverCapabilities, DumpXmlFlags, IncomingMigration,
    MigrateOptions, MonitorOps, PinScope, PreparedMigration, SaveFlags, SaveMigrateOps, SaveOptions, SnapshotOps,
    StartFlags, StartOutcome, UndefineFlags, VcpuCounts, VcpuInfo,
};
use strata_core::hostcpu::{HostCpuMap, NodeInfo, SysfsCpus};
use strata_core::network::NetworkManager;
use strata_core::pool::PoolManager;
use strata_core::registry::DriverRegistration;
use strata_core::store::Store;
use strata_core::uri::ConnectUri;
use strata_core::xml::{Domain, StorageDevice};
use strata_core::{Error, Result};
use strata_engine::job::engine::{BlockJobEngine, BlockJobHost, Served};

use live::{LiveStatus, MonitorCache};
use strata_qemu_block::graph::live_chains;
use strata_qemu_block::monitor::{acquire_started, qmp_error, start_up_guard, Monitor, QuestionAsked};
use strata_qemu_block::offline::{self, ServerRecord};
pub use strata_qemu_block::runtime::MONITORS;

/// The emulator binary: `$STRATA_QEMU` or `qemu-system-x86_64` on `PATH`.
/// The domain state file naming why the domain was last shut off.
const SHUTOFF_REASON: &str = "shutoff-reason";

fn qemu_binary() -> String {
    std::env::var("STRATA_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_string())
}

/// A connection to one QEMU driver instance (one state root).
pub struct QemuConnection {
    uri: String,
    store: Store,
    monitors: MonitorCache,
    /// Event subscriptions by domain, kept between `next_event` calls.
    events: tokio::sync::Mutex<HashMap<String, tokio::sync::broadcast::Receiver<strata_qmp::QmpEvent>>>,
    /// Where the host's CPU lists are read.
    host_cpus: SysfsCpus,
    /// Live snapshots readied, not yet taken, by domain (see
    /// `ready_snapshot_disks`).
    readied_snapshots: std::sync::Mutex<HashMap<String, strata_qemu_block::snapshot::ReadiedSnapshot>>,
}

impl QemuConnection {
    /// Opens the instance named by a `qemu://` URI.
    pub fn open(uri: &ConnectUri) -> Result<QemuConnection> {
        if uri.driver != "qemu" {
            return Err(Error::invalid_arg(format!("'{uri}' is not a qemu:// URI")));
        }
        if uri.host.is_some() || uri.transport.is_some() {
            return Err(Error::no_support(format!(
                "'{uri}': remote connections are not supported; Strata drives QEMU on this machine"
            )));
        }
        let root = uri.state_root()?;
        Ok(QemuConnection {
            uri: uri.to_string(),
            store: Store::open(root)?,
            monitors: MonitorCache::default(),
            events: Default::default(),
            host_cpus: placement::host_cpus(),
            readied_snapshots: Default::default(),
        })
    }

    /// Opens an embedded instance whose whole state lives under `root`
    /// (the library equivalent of `qemu:///embed?root=DIR`).
    pub fn open_embedded(root: &Path) -> Result<QemuConnection> {
        if !root.is_absolute() {
            return Err(Error::invalid_arg(format!("embed root '{}' must be an absolute path", root.display())));
        }
        Ok(QemuConnection {
            uri: format!("qemu:///embed?root={}", root.display()),
            store: Store::open(root)?,
            monitors: MonitorCache::default(),
            events: Default::default(),
            host_cpus: placement::host_cpus(),
            readied_snapshots: Default::default(),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The running domain's status and a QMP monitor of it, or
    /// operation-invalid when it is not running.
    pub async fn running(&self, name: &str) -> Result<(LiveStatus, Arc<Monitor>)> {
        match self.serving(name).await? {
            Some((status, monitor)) if status.is_vm() => Ok((status, monitor)),
            _ => Err(Error::operation_invalid("domain is not running")),
        }
    }

    /// Whatever serves the domain's disks now — its QEMU, or the storage
    /// daemon of an offline block job — with recorded jobs brought forward.
    async fn serving(&self, name: &str) -> Result<Option<(LiveStatus, Arc<Monitor>)>> {
        strata_engine::definitions::require_known(&self.store, name)?;
        self.recover_stream(name).await?;
        let Some(status) = live::reconcile(&self.store, name)? else { return Ok(None) };
        let Some(monitor) = self.attach(name, &status).await? else { return Ok(None) };
        match jobs::reconcile_jobs(&self.store, name, &monitor, status).await? {
            Some(status) => match hotplug::finish_pending_unplugs(&self.store, name, &status, &monitor).await? {
                true => Ok(live::reconcile(&self.store, name)?.map(|status| (status, monitor))),
                false => Ok(Some((status, monitor))),
            },
            None => {
                self.monitors.forget(name).await;
                Ok(None)
            }
        }
    }

    /// A monitor of the recorded process; `None` when the process turns
    /// out to be dying (killed a moment ago: its sockets already refuse),
    /// in which case the domain is cleaned up as shut off.
    async fn attach(&self, name: &str, status: &LiveStatus) -> Result<Option<Arc<Monitor>>> {
        let attached = self.monitors.get(&self.store, name, status.run.process).await;
        self.attached_or_gone(name, status, attached).await
    }

    /// [`QemuConnection::attach`] with QEMU's run state.
    async fn attach_with_run_state(
        &self,
        name: &str,
        status: &LiveStatus,
        early: Option<QuestionAsked>,
    ) -> Result<Option<(Arc<Monitor>, strata_qmp::types::StatusInfo)>> {
        let attached = self.monitors.get_with_run_state(&self.store, name, status.run.process, early).await;
        self.attached_or_gone(name, status, attached).await
    }

    /// What was attached, or `None` when the failure was the process
    /// exiting (its status is then reconciled away).
    async fn attached_or_gone<T>(&self, name: &str, status: &LiveStatus, attached: Result<T>) -> Result<Option<T>> {
        match attached {
            Ok(m) => Ok(Some(m)),
            Err(e) => {
                if status.run.process.wait_gone(Duration::from_secs(2)).await {
                    self.monitors.forget(name).await;
                    // Reconciling a gone process removes its status.
                    let _lock = strata_engine::blocking::lock_domain(&self.store, name).await?;
                    live::reconcile(&self.store, name)?;
                    return Ok(None);
                }
                Err(e)
            }
        }
    }

    /// Serving a domain that is not started: an error naming what runs.
    fn refuse_if_daemon(status: &LiveStatus, name: &str) -> Result<()> {
        if status.is_vm() {
            return Ok(());
        }
        Err(Error::operation_invalid(format!(
            "domain '{name}' is shut off but an offline block job runs on its disks; \
             wait for it (blockjob --info) or abort it (blockjob --abort)"
        )))
    }

    /// The domain's state for `list` and `dominfo`. `early` is the run
    /// state asked ahead of the records ([`MonitorCache::ask_run_state_early`]),
    /// used only if the records say QEMU serves the domain.
    async fn summary(&self, dom: &Domain, early: Option<QuestionAsked>) -> Result<DomainSummary> {
        let name = dom.name();
        let mut s = DomainSummary {
            id: None,
            name: name.clone(),
            uuid: dom.uuid().unwrap_or_default(),
            state: DomainState::Shutoff,
            reason: Some(self.shutoff_reason(&name)?),
            persistent: true,
            damaged: None,
        };
        self.recover_stream(&name).await?;
        if let Some(status) = live::reconcile(&self.store, &name)?.filter(LiveStatus::is_vm) {
            let Some((monitor, run)) = self.attach_with_run_state(&name, &status, early).await? else { return Ok(s) };
            hotplug::finish_pending_unplugs(&self.store, &name, &status, &monitor).await?;
            let (state, reason) = live::state_of(run.status);
            s.id = Some(status.id);
            s.state = state;
            s.reason = Some(match status.reason {
                Some((recorded, word)) if recorded == state.as_virsh() => word,
                _ => reason.into(),
            });
        }
        Ok(s)
    }

    async fn start_locked(&self, name: &str, flags: StartFlags) -> Result<()> {
        if let Some(status) = live::reconcile(&self.store, name)? {
            Self::refuse_if_daemon(&status, name)?;
            return Err(Error::operation_invalid(format!("domain '{name}' is already active")));
        }
        let mode = if flags.paused { StartMode::Paused } else { StartMode::Run };
        self.spawn_server(name, live::Server::Vm, mode).await
    }

    /// Starts QEMU for the domain, or the storage daemon for its offline
    /// jobs; the caller holds the domain lock.
    pub(crate) async fn spawn_server(&self, name: &str, server: live::Server, mode: StartMode) -> Result<()> {
        let mut dom = strata_engine::definitions::load(&self.store, name)?;
        // A disk whose image did not exist at define time is probed now.
        let before = dom.to_xml();
        define::probe_missing_chains(&mut dom)?;
        if dom.to_xml() != before {
            self.store.write_domain(name, &dom.to_xml())?;
        }
        match server {
            live::Server::Vm => self.launch(name, mode, dom).await,
            live::Server::StorageDaemon => self.start_storage_daemon(name, dom).await,
        }
    }

    /// Starts strata-qemu-block's offline storage daemon on the shut-off
    /// domain's disks, its record in the domain's status.
    async fn start_storage_daemon(&self, name: &str, dom: Domain) -> Result<()> {
        let paths = live::runtime_paths(&self.store, name)?;
        // The daemon opens a volume disk's file; the status keeps the volume.
        let launched = define::resolve_volume_disks(&dom, &PoolManager::new(self.store.clone()))?;
        live::cleanup(&self.store, name)?;
        let disks: Vec<StorageDevice> = launched.disks()?.into_iter().map(StorageDevice::Disk).collect();
        let record = |run: &ServerRecord| {
            let status = LiveStatus::new(*run, 0, dom.clone(), live::Server::StorageDaemon);
            self.store.write_status(name, &status.to_xml())
        };
        if let Err(e) = offline::start_daemon(&disks, &paths, record).await {
            live::cleanup(&self.store, name)?;
            return Err(e);
        }
        Ok(())
    }

    /// Starts QEMU on `dom`, which may differ from the persistent
    /// definition (a restored image's); the caller holds the domain lock.
    pub(crate) async fn launch(&self, name: &str, mode: StartMode, mut dom: Domain) -> Result<()> {
        let paths = live::runtime_paths(&self.store, name)?;
        // QEMU opens a volume disk's file; the status keeps the volume.
        let launched = define::resolve_volume_disks(&dom, &PoolManager::new(self.store.clone()))?;
        // What a previous run left (its status, runtime files, host NICs)
        // goes before this run opens its own.
        live::cleanup(&self.store, name)?;
        let accel = launch::accel_for(&dom)?;
        let nics = tap::HostNics::open(&launched, &NetworkManager::new(self.store.clone()))?;
        // The live definition names the host device each runs on, and the
        // id of each NIC in QEMU.
        for (index, nic) in &nics.by_index {
            dom.set_interface_target(*index, &nic.name)?;
        }
        for index in 0..dom.interfaces()?.len() {
            dom.set_interface_alias(index, &launch::nic_id(index))?;
        }
        // QEMU answers its monitor only once it has opened every layer.
        let layers = launched.disks()?.iter().map(|d| d.chain.as_ref().map_or(1, |c| c.layers.len())).sum();
        let mut args = launch::command_line(&launched, accel, &paths, &nics)?;
        if mode == StartMode::Incoming {
            args.extend(["-incoming".to_string(), "defer".to_string()]);
        }
        let binary = qemu_binary();
        std::fs::create_dir_all(&paths.dir).map_err(|e| Error::io("create", &paths.dir, e))?;
        transient::create_overlays(&dom, &paths)?;
        self.forget_shutoff_reason(name)?;
        let id = live::next_domain_id(&self.store)?;
        let owner = strata_engine::process::ProcessId::this()?;
        tracing::debug!(domain = name, binary, ?args, "starting");
        // Recorded as starting before it runs: whoever finds it while this
        // process is gone stops it (see live::reconcile).
        // The host NICs Strata created are in the record before QEMU runs.
        let created_nics = nics.created();
        let record = |process| {
            let mut status = LiveStatus::new(ServerRecord::starting(process, owner), id, dom.clone(), live::Server::Vm);
            status.host_nics = created_nics.clone();
            self.store.write_status(name, &status.to_xml())
        };
        let spawned = strata_engine::process::spawn(&binary, &args, &nics.descriptors(), &paths.log(), record);
        // QEMU holds its own copies of the descriptors now; the status
        // answers for what was created.
        let mut spawned = match spawned {
            Ok(spawned) => {
                nics.into_recorded();
                spawned
            }
            Err(e) => {
                live::cleanup(&self.store, name)?;
                return Err(e);
            }
        };
        strata_core::crash_point("server:spawned");
        let started = async {
            let monitor =
                acquire_started(&paths, name, &mut spawned.child, &paths.log(), start_up_guard(layers)).await?;
            let run = ServerRecord { starting: false, ..ServerRecord::starting(spawned.id, owner) };
            let mut status = LiveStatus::new(run, id, dom, live::Server::Vm);
            status.host_nics = created_nics;
            if mode == StartMode::Run {
                // Until `cont` below: a start killed in between leaves the
                // guest paused, and domstate --reason says why (libvirt's
                // VIR_DOMAIN_PAUSED_STARTING_UP), not that a user paused it.
                status.reason = Some((DomainState::Paused.as_virsh().to_string(), "starting up".to_string()));
            }
            self.store.write_status(name, &status.to_xml())?;
            strata_core::crash_point("server:started");
            let monitor = self.monitors.hold(name, status.run.process, monitor).await;
            let host = HostCpuMap::read(&self.host_cpus)?;
            let live = status.domain.get()?;
            placement::apply_defined_placement(&monitor.client, name, status.run.process.pid, live, &host).await?;
            if mode == StartMode::Run {
                monitor.client.execute("cont", None).await.map_err(|e| qmp_error(name, e))?;
            }
            Ok::<(), Error>(())
        }
        .await;
        if let Err(e) = started {
            self.monitors.forget(name).await;
            // QEMU exiting on its own (a bad image, an unknown option) is
            // the usual cause; its own words say more than a socket error.
            let exited = spawned.id.wait_gone(Duration::from_millis(500)).await;
            let _ = spawned.id.terminate(Duration::from_secs(2)).await;
            // How it ended: a signal (QEMU 7.2 crashes reading through a
            // chain some thousand layers deep) or an exit code. A crashing
            // QEMU's main thread shows as a zombie while its other threads
            // still write the core dump, so its status may come later.
            let mut how = String::new();
            for _ in 0..if exited { 150 } else { 1 } {
                if let Ok(Some(status)) = spawned.child.try_wait() {
                    how = format!(" ({status})");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let log = strata_engine::process::log_tail(&paths.log(), 5);
            live::cleanup(&self.store, name)?;
            if exited && !log.trim().is_empty() {
                return Err(Error::operation_failed(format!("{binary} exited during start-up{how}: {}", log.trim())));
            }
            return Err(e);
        }
        Ok(())
    }

    /// Why the domain is shut off, as libvirt says it: `saved` once a save
    /// stopped it (until it runs again), else `unknown` (Strata does not
    /// track how a QEMU ended).
    fn shutoff_reason(&self, name: &str) -> Result<String> {
        let recorded = self.store.read_domain_file(name, SHUTOFF_REASON)?;
        Ok(recorded.map(|r| r.trim().to_string()).filter(|r| !r.is_empty()).unwrap_or_else(|| "unknown".into()))
    }

    /// Records why the domain was shut off, for `domstate --reason`.
    pub(crate) fn record_shutoff_reason(&self, name: &str, word: &str) -> Result<()> {
        self.store.write_domain_file(name, SHUTOFF_REASON, word)
    }

    fn forget_shutoff_reason(&self, name: &str) -> Result<()> {
        if self.store.read_domain_file(name, SHUTOFF_REASON)?.is_some_and(|r| !r.is_empty()) {
            self.store.write_domain_file(name, SHUTOFF_REASON, "")?;
        }
        Ok(())
    }

    /// Records why the running domain is in `state` (libvirt's reason word),
    /// for `domstate --reason` until the next change.
    pub(crate) fn record_reason(&self, name: &str, state: DomainState, word: &str) -> Result<()> {
        live::edit_status(&self.store, name, |status| {
            if status.is_vm() {
                status.reason = Some((state.as_virsh().to_string(), word.to_string()));
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Whether the running domain's recorded live definition is what QEMU
    /// has, with no round trip to QEMU: nothing can have changed QEMU's
    /// block graph or devices behind the records while no block job is
    /// recorded (a job's end is recorded only by [`Self::serving`]), no
    /// NIC unplug waits for its guest, no snapshot operation, save or
    /// migration is halfway and no command was passed through to QEMU's
    /// monitor. Otherwise [`Self::live_domain`] asks QEMU.
    fn records_are_current(&self, name: &str, status: &LiveStatus) -> Result<bool> {
        Ok(status.jobs.is_empty()
            && status.pending_unplugs.is_empty()
            && !status.custom_monitor
            && !strata_engine::intent::Intent::is_recorded(&self.store, name)?
            && !self.stream_recorded(name)?)
    }

    /// The live definition: the one QEMU runs with, each disk's chain read
    /// from QEMU's block graph and each NIC's MAC as QEMU reports it.
    pub(crate) async fn live_domain(&self, name: &str) -> Result<Domain> {
        let (status, monitor) = self.running(name).await?;
        let mut dom = status.domain.into_inner()?;
        dom.set_id(Some(status.id));
        // Read-only queries, in flight together.
        let (chains, macs) =
            tokio::try_join!(live_chains(&monitor.client, name), live::nic_macs(&monitor.client, name, &dom))?;
        let pools = PoolManager::new(self.store.clone());
        for disk in dom.disks()? {
            if let Some(live) = chains.get(&disk.target) {
                dom.set_disk_chain(&disk.target, &define::live_chain_as_recorded(&disk, &live.chain, &pools))?;
            }
        }
        for (index, mac) in macs {
            dom.set_interface_mac(index, &mac)?;
        }
        Ok(dom)
    }
}

/// How a started QEMU is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StartMode {
    Run,
    Paused,
    /// Waiting for a saved VM state (`-incoming defer`).
    Incoming,
}

fn open_registered(uri: &ConnectUri) -> Result<Box<dyn Connection>> {
    Ok(Box::new(QemuConnection::open(uri)?))
}

inventory::submit! {
    DriverRegistration {
        scheme: "qemu",
        description: "QEMU/KVM: qemu-system-x86_64 driven over QMP",
        open: open_registered,
    }
}

#[async_trait]
impl Connection for QemuConnection {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn capabilities(&self) -> DriverCapabilities {
        DriverCapabilities {
            driver: "qemu".into(),
            uri: self.uri.clone(),
            hypervisor: "QEMU".into(),
            domains: DomainCapabilities {
                run: true,
                events: true,
                vcpu_info: true,
                monitor: true,
                cpu_placement: true,
                vcpu_hotplug: true,
                save_restore: true,
                migration: true,
            },
            snapshots: SnapshotCapabilities {
                kinds: SnapshotKinds { internal_disk: true, external_disk: true, internal_memory: true, external_memory: true },
                creation: SnapshotCreation { live: true, offline: true },
                revert: RevertRules { to: RevertTo::AnySnapshot, external: true, guest: RevertedGuest::RunningOrPaused },
                delete: DeleteMethods {
                    internal: true,
                    external_by_commit: true,
                    external_by_pull: true,
                    metadata_only: true,
                    children: true,
                },
            },
            block_jobs: BlockJobCapabilities {
                kinds: BlockJobKinds { pull: true, intermediate_commit: true, active_commit: true, copy: true },
                copy: CopyModes { shallow: true, raw: true, reuse_external: true },
                bandwidth: true,
                ready_pivot: true,
            },
            storage: StorageCapabilities { disk_sets: true, storage_pools: true },
            honoured_elements: honoured::honoured_list(),
            unhonoured_elements: honoured::not_yet_list(),
            notes: vec![
                "backing chains are probed natively and never by following an unrecorded format".into(),
                format!("each QEMU has {MONITORS} QMP monitors; no daemon is needed"),
                "elements not honoured (those listed and any unknown one) are kept in the definition; start warns about each".into(),
                "a transient disk's writes go to an overlay removed at stop; snapshots, block jobs and disk sets refuse it".into(),
            ],
        }
    }

    async fn list_domains(&self) -> Result<Vec<DomainSummary>> {
        let names = self.store.list_domains()?;
        // Every running QEMU is asked first: they answer at once, while
        // the records are read.
        let mut early: HashMap<String, QuestionAsked> = names
            .iter()
            .filter_map(|name| Some((name.clone(), self.monitors.ask_run_state_early(&self.store, name)?)))
            .collect();
        let mut out = Vec::new();
        for listed in strata_engine::definitions::list_named(&self.store, names)? {
            out.push(match listed {
                Ok(dom) => {
                    let asked = early.remove(&dom.name());
                    self.summary(&dom, asked).await?
                }
                Err(damaged) => damaged,
            });
        }
        Ok(out)
    }

    async fn define_xml(&self, xml: &str, flags: DefineFlags) -> Result<DefineOutcome> {
        strata_engine::definitions::define(&self.store, xml, flags)
    }

    async fn undefine(&self, name: &str, flags: UndefineFlags) -> Result<()> {
        let _lock = strata_engine::blocking::lock_domain(&self.store, name).await?;
        if let Some(status) = live::reconcile(&self.store, name)? {
            Self::refuse_if_daemon(&status, name)?;
            return Err(Error::operation_invalid(format!(
                "domain '{name}' is running; destroy it before undefining it"
            )));
        }
        strata_engine::definitions::undefine(&self.store, name, flags.snapshots_metadata)
    }

    async fn domain_info(&self, name: &str) -> Result<DomainInfo> {
        let early = self.monitors.ask_run_state_early(&self.store, name);
        let dom = strata_engine::definitions::load(&self.store, name)?;
        let summary = self.summary(&dom, early).await?;
        Ok(DomainInfo { managed_save: self.managed_image(name)?.exists(), ..DomainInfo::of_definition(&dom, summary) })
    }

    async fn start(&self, name: &str, flags: StartFlags) -> Result<StartOutcome> {
        strata_engine::definitions::load(&self.store, name)?;
        self.recover_stream(name).await?;
        if self.managed_image(name)?.exists() {
            self.start_from_managed_save(name, flags.paused).await?;
        } else {
            let _lock = strata_engine::blocking::lock_domain(&self.store, name).await?;
            self.start_locked(name, flags).await?;
        }
        let dom = strata_engine::definitions::load(&self.store, name)?;
        let warnings = honoured::unhonoured(&dom)
            .into_iter()
            .map(|element| {
                format!("domain '{name}': <{element}> is not honoured by the qemu driver (kept in the definition, not acted on)")
            })
            .collect();
        Ok(StartOutcome { warnings })
    }

    async fn destroy(&self, name: &str) -> Result<()> {
        let _lock = strata_engine::blocking::lock_domain(&self.store, name).await?;
        strata_engine::definitions::load(&self.store, name)?;
        let status = live::reconcile(&self.store, name)?
            .filter(LiveStatus::is_vm)
            .ok_or_else(|| Error::operation_invalid("domain is not running"))?;
        self.monitors.forget(name).await;
        status.run.process.terminate(Duration::from_secs(3)).await?;
        live::cleanup(&self.store, name)
    }

    async fn shutdown(&self, name: &str) -> Result<()> {
        let (_, monitor) = self.running(name).await?;
        monitor.client.execute("system_powerdown", None).await.map_err(|e| qmp_error(name, e))?;
        Ok(())
    }

    async fn suspend(&self, name: &str) -> Result<()> {
        let (_, monitor) = self.running(name).await?;
        monitor.client.execute("stop", None).await.map_err(|e| qmp_error(name, e))?;
        self.record_reason(name, DomainState::Paused, "user")
    }

    async fn resume(&self, name: &str) -> Result<()> {
        let (_, monitor) = self.running(name).await?;
        monitor.client.execute("cont", None).await.map_err(|e| qmp_error(name, e))?;
        self.record_reason(name, DomainState::Running, "unpaused")
    }

    async fn dump_xml(&self, name: &str, flags: DumpXmlFlags) -> Result<String> {
        let mut status = live::reconcile(&self.store, name)?;
        // Jobs that ended while no strata ran are recorded first, so the
        // persistent chain shown is the one the images now have.
        if status.as_ref().is_some_and(|s| !s.jobs.is_empty()) {
            self.serving(name).await?;
            status = live::reconcile(&self.store, name)?;
        }
        let Some(status) = status.filter(|s| !flags.inactive && s.is_vm()) else {
            return strata_engine::definitions::dump_xml(&self.store, name, flags);
        };
        if self.records_are_current(name, &status)? {
            // libvirt answers from its own records too: every change to the
            // chains and devices goes through Strata and is recorded.
            let mut dom = status.domain.into_inner()?;
            dom.set_id(Some(status.id));
            return Ok(dom.to_xml());
        }
        Ok(self.live_domain(name).await?.to_xml())
    }

    async fn check_chains(&self, name: &str, disk: Option<&str>, fix: bool) -> Result<Vec<DiskChainCheck>> {
        if let Some(status) = live::reconcile(&self.store, name)? {
            if fix {
                Self::refuse_if_daemon(&status, name)?;
            }
        }
        if live::reconcile(&self.store, name)?.filter(LiveStatus::is_vm).is_none() {
            return strata_engine::definitions::check_chains(&self.store, name, disk, fix);
        }
        // Running: what the status XML records, what QEMU has open and what
        // the image headers say are compared pairwise.
        let (status, monitor) = self.running(name).await?;
        let qemu = live_chains(&monitor.client, name).await?;
        let mut recorded = status.domain.into_inner()?;
        let pools = PoolManager::new(self.store.clone());
        let mut checks = define::check_chains_in_pools(&mut recorded, disk, false, &pools)?;
        let mut rewritten = false;
        for check in &mut checks {
            let xml_disk = recorded.find_disk(&check.disk)?;
            let Some(qemu_chain) =
                qemu.get(&check.disk).map(|l| define::live_chain_as_recorded(&xml_disk, &l.chain, &pools))
            else {
                continue;
            };
            let qemu_chain = &qemu_chain;
            if let Some(xml_chain) = &xml_disk.chain {
                for d in xml_chain.differences(qemu_chain) {
                    check.differences.push(strata_core::chain::ChainDifference {
                        index: d.index,
                        what: format!("XML vs QEMU: {}", d.what),
                    });
                }
            }
            if fix && !check.differences.is_empty() {
                recorded.set_disk_chain(&check.disk, qemu_chain)?;
                check.fixed = true;
                rewritten = true;
            }
        }
        if rewritten {
            live::edit_status_async(&self.store, name, |status| {
                status.domain.set(recorded);
                Ok(())
            })
            .await?;
        }
        Ok(checks)
    }

    async fn next_event(&self, domain: &str, timeout_ms: u64) -> Result<Option<DomainEvent>> {
        let (_, monitor) = self.running(domain).await?;
        let mut events = self.events.lock().await;
        let rx = events.entry(domain.to_string()).or_insert_with(|| monitor.client.subscribe_events());
        let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
        loop {
            let ev = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => return Ok(None),
                Ok(Ok(ev)) => ev,
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => continue,
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                    events.remove(domain);
                    return Err(Error::operation_invalid("domain is not running"));
                }
            };
            if let Some(e) = live::translate_event(domain, &ev) {
                return Ok(Some(e));
            }
        }
    }

    fn state_store(&self) -> Option<&Store> {
        Some(&self.store)
    }

    async fn vcpu_info(&self, name: &str) -> Result<Vec<VcpuInfo>> {
        let (_, monitor) = self.running(name).await?;
        vcpus::vcpu_info(&monitor.client, name, &self.host_cpus).await
    }

    async fn attach_interface(&self, name: &str, xml: &str, scope: PinScope) -> Result<()> {
        let iface = with_mac(xml)?;
        let targets = placement::pin_targets(self.running_vm(name).await?, scope)?;
        if targets.config {
            // Checked before anything changes.
            let mut dom = strata_engine::definitions::load(&self.store, name)?;
            dom.add_interface(iface.clone())?;
        }
        if let Some((status, monitor)) = &targets.live {
            hotplug::attach(&self.store, name, status, monitor, iface.clone()).await?;
        }
        if targets.config {
            strata_engine::definitions::edit(&self.store, name, |dom| dom.add_interface(iface))?;
        }
        Ok(())
    }

    async fn detach_interface(&self, name: &str, iface_type: &str, mac: Option<&str>, scope: PinScope) -> Result<()> {
        let targets = placement::pin_targets(self.running_vm(name).await?, scope)?;
        if targets.config {
            // Refused before anything changes when the definition lacks it.
            hotplug::find_interface(&strata_engine::definitions::load(&self.store, name)?, iface_type, mac)?;
        }
        if let Some((status, monitor)) = &targets.live {
            let index = hotplug::find_interface(status.domain.get()?, iface_type, mac)?;
            hotplug::detach(&self.store, name, status, monitor, index).await?;
        }
        if targets.config {
            strata_engine::definitions::edit(&self.store, name, |dom| {
                let index = hotplug::find_interface(dom, iface_type, mac)?;
                dom.remove_interface(index)
            })?;
        }
        Ok(())
    }

    fn disk_sets(&self) -> Option<&dyn DiskSetOps> {
        Some(strata_engine::definitions::StoredDiskSets::over(&self.store))
    }

    fn block_jobs(&self) -> Option<&dyn BlockJobOps> {
        Some(BlockJobEngine::over(self))
    }

    fn snapshots(&self) -> Option<&dyn SnapshotOps> {
        Some(strata_engine::snapshot::SnapshotEngine::over(self))
    }

    fn monitor(&self) -> Option<&dyn MonitorOps> {
        Some(self)
    }

    fn cpu_placement(&self) -> Option<&dyn CpuPlacementOps> {
        Some(self)
    }

    fn save_migrate(&self) -> Option<&dyn SaveMigrateOps> {
        Some(self)
    }
}

#[async_trait]
impl SaveMigrateOps for QemuConnection {
    async fn save(&self, domain: &str, file: &str, opts: &SaveOptions) -> Result<()> {
        self.save_domain(domain, Path::new(file), opts).await
    }

    async fn restore(&self, file: &str, xml: Option<&str>, flags: SaveFlags) -> Result<String> {
        self.restore_domain(Path::new(file), xml, flags).await
    }

    async fn save_image_xml(&self, file: &str) -> Result<String> {
        self.saved_image_xml(Path::new(file))
    }

    async fn managed_save(&self, domain: &str, opts: &SaveOptions) -> Result<()> {
        let image = self.managed_image(domain)?;
        self.save_domain(domain, &image, opts).await
    }

    async fn managed_save_remove(&self, domain: &str) -> Result<()> {
        strata_engine::definitions::load(&self.store, domain)?;
        match std::fs::remove_file(self.managed_image(domain)?) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io("remove", &self.managed_image(domain)?, e))
            }
            _ => Ok(()),
        }
    }

    async fn job_info(&self, domain: &str) -> Result<Option<DomainJobInfo>> {
        self.domain_job_info(domain).await
    }

    async fn job_abort(&self, domain: &str) -> Result<()> {
        self.domain_job_abort(domain).await
    }

    async fn migrate(&self, domain: &str, dest_uri: &str, opts: &MigrateOptions) -> Result<()> {
        self.migrate_domain(domain, dest_uri, opts).await
    }

    async fn migrate_check(&self, incoming: &IncomingMigration) -> Result<()> {
        self.check_incoming(incoming).await
    }

    async fn migrate_prepare(&self, incoming: &IncomingMigration) -> Result<PreparedMigration> {
        self.prepare_incoming(incoming).await
    }

    async fn migrate_finish(&self, domain: &str, resume: bool) -> Result<()> {
        self.finish_incoming(domain, resume).await
    }

    async fn migrate_cleanup(&self, domain: &str, uuid: Option<&str>, images: &[String]) -> Result<()> {
        self.remove_migrated(domain, uuid, images).await
    }
}

/// CPU placement: the domain's QEMU when it runs, looked up once the
/// request is known to be well formed, else its persistent definition.
impl QemuConnection {
    async fn running_vm(&self, domain: &str) -> Result<Option<(LiveStatus, Arc<Monitor>)>> {
        Ok(self.serving(domain).await?.filter(|(status, _)| status.is_vm()))
    }

    fn placement(&self) -> placement::Placement<'_> {
        placement::Placement { store: &self.store, host_cpus: &self.host_cpus }
    }
}

#[async_trait]
impl CpuPlacementOps for QemuConnection {
    async fn node_info(&self) -> Result<NodeInfo> {
        self.placement().node_info()
    }

    async fn node_cpu_map(&self) -> Result<HostCpuMap> {
        self.placement().node_cpu_map()
    }

    async fn vcpu_pins(&self, domain: &str, scope: PinScope) -> Result<Vec<Vec<u32>>> {
        placement::refuse_query_of_both(scope)?;
        let running = self.running_vm(domain).await?;
        self.placement().vcpu_pins(domain, scope, running).await
    }

    async fn pin_vcpu(&self, domain: &str, vcpu: u32, cpus: &[u32], scope: PinScope) -> Result<()> {
        let running = self.running_vm(domain).await?;
        self.placement().pin_vcpu(domain, vcpu, cpus, scope, running).await
    }

    async fn emulator_pin(&self, domain: &str, scope: PinScope) -> Result<Vec<u32>> {
        placement::refuse_query_of_both(scope)?;
        let running = self.running_vm(domain).await?;
        self.placement().emulator_pin(domain, scope, running)
    }

    async fn pin_emulator(&self, domain: &str, cpus: &[u32], scope: PinScope) -> Result<()> {
        let running = self.running_vm(domain).await?;
        self.placement().pin_emulator(domain, cpus, scope, running).await
    }

    async fn vcpu_counts(&self, domain: &str) -> Result<VcpuCounts> {
        let running = self.running_vm(domain).await?;
        self.placement().vcpu_counts(domain, running)
    }

    async fn set_vcpus(&self, domain: &str, count: u32, scope: PinScope, maximum: bool) -> Result<()> {
        let running = self.running_vm(domain).await?;
        self.placement().set_vcpus(domain, count, scope, maximum, running).await
    }
}

#[async_trait]
impl MonitorOps for QemuConnection {
    async fn monitor_command(&self, domain: &str, command: &str, human: bool) -> Result<String> {
        let (status, monitor) = self.running(domain).await?;
        if !status.custom_monitor {
            // Recorded before QEMU gets the command, so that a strata killed
            // after sending it still leaves the domain tainted.
            live::edit_status_async(&self.store, domain, |s| {
                s.custom_monitor = true;
                Ok(())
            })
            .await?;
        }
        monitor_command::run(&monitor.client, domain, command, human).await
    }
}

/// The `<interface>` of `xml`, given a MAC in libvirt's range for QEMU
/// guests when it has none, so that the running domain and the definition
/// get the same one.
fn with_mac(xml: &str) -> Result<strata_core::xml::Element> {
    let iface = strata_core::xml::Element::parse(xml)?;
    if iface.name != "interface" {
        return Err(Error::xml(format!("expected an <interface> document, found <{}>", iface.name)));
    }
    let mut scratch = Domain::parse("<domain><name>attach</name><devices/></domain>")?;
    scratch.add_interface(iface)?;
    define::assign_macs(&mut scratch)?;
    scratch
        .element()
        .child("devices")
        .and_then(|d| d.child("interface"))
        .cloned()
        .ok_or_else(|| Error::internal("the interface just added is missing"))
}

/// Block jobs run in the domain's QEMU, or for a shut-off domain in a
/// `qemu-storage-daemon` started on its disks (it quits by itself once its
/// last job is recorded); the engine does the rest.
#[async_trait]
impl BlockJobHost for QemuConnection {
    type Server = jobs::QemuJobServer;

    fn store(&self) -> &Store {
        &self.store
    }

    async fn serving(&self, domain: &str) -> Result<Option<Served<jobs::QemuJobServer>>> {
        let Some((status, monitor)) = QemuConnection::serving(self, domain).await? else { return Ok(None) };
        Ok(Some(Served {
            server: jobs::job_server(&self.store, domain, monitor, &status),
            jobs: status.jobs,
            live: Box::new(status.domain),
        }))
    }

    async fn start_offline_server(&self, domain: &str) -> Result<Served<jobs::QemuJobServer>> {
        {
            let _lock = strata_engine::blocking::lock_domain(&self.store, domain).await?;
            if live::reconcile(&self.store, domain)?.is_none() {
                self.spawn_server(domain, live::Server::StorageDaemon, StartMode::Paused).await?;
            }
        }
        BlockJobHost::serving(self, domain)
            .await?
            .ok_or_else(|| Error::operation_failed(format!("the storage daemon for domain '{domain}' exited")))
    }

    async fn after_refused_request(&self, domain: &str, server: &jobs::QemuJobServer) -> Result<()> {
        jobs::quit_if_idle_daemon(&self.store, domain, server.client()).await?;
        self.monitors.forget(domain).await;
        Ok(())
    }

    /// A closed monitor whose process is gone: reconciling the domain
    /// records how its jobs ended.
    async fn server_gone(&self, domain: &str, server: &jobs::QemuJobServer) -> Result<bool> {
        if server.client().is_connected() || !server.process.wait_gone(Duration::from_secs(10)).await {
            return Ok(false);
        }
        self.monitors.forget(domain).await;
        live::reconcile(&self.store, domain)?;
        Ok(true)
    }
}
