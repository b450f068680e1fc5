//! strata-lxc: Strata's LXC driver.
//!
//! Containers (`<domain type='lxc'>`) run on the kernel directly: new
//! mount, pid, uts, ipc and net namespaces, a root filesystem mounted in
//! the container's mount namespace only (a block device, a raw image on a
//! loop device, a qcow2 chain served by `qemu-storage-daemon` over FUSE
//! on a loop device, a host directory, or memory), `/proc`, a minimal `/dev`,
//! `pivot_root`, and the init the definition names, in a cgroup of its
//! own. Every kernel call goes through one seam ([`syscall::Syscall`]).
//! No daemon: the init outlives `strata`, and later calls find it again by
//! its recorded pid and start time ([`status`]).
//!
//! Snapshots of qcow2 filesystems go through strata-engine, offline or
//! while the container runs (paused for the switch: `pause`) ([`snapshots`]);
//! other roots have no layer to hold one, and are refused saying so.
//! Block jobs on a running container's qcow2 filesystem run in the storage
//! daemon serving it, on a shut-off container's in an offline daemon
//! started for them ([`jobs`], `offline`).

mod container;
mod events;
pub mod jobs;
mod offline;
mod pause;
mod plan;
mod probe;
pub mod snapshots;
pub mod status;
pub mod syscall;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use strata_core::capabilities::{
    BlockJobCapabilities, BlockJobKinds, DeleteMethods, DomainCapabilities, RevertRules, RevertTo, RevertedGuest,
    SnapshotCapabilities, SnapshotCreation, SnapshotKinds, StorageCapabilities,
};
use strata_core::driver::{
    BlockJobOps, Connection, DefineFlags, DefineOutcome, DiskChainCheck, DiskSetOps, DomainEvent, DomainInfo,
    DomainState, DomainSummary, DriverCapabilities, DumpXmlFlags, SnapshotOps, StartFlags, StartOutcome, UndefineFlags,
};
use strata_core::registry::DriverRegistration;
use strata_core::store::Store;
use strata_core::uri::ConnectUri;
use strata_core::xml::Domain;
use strata_core::{Error, Result};
use strata_engine::blocking::blocking;
use strata_engine::definitions;
use strata_engine::job::engine::{BlockJobEngine, BlockJobHost};
use strata_engine::process::ProcessId;

use crate::status::LiveStatus;
use crate::syscall::{Linux, Syscall};

/// How long `shutdown` waits after SIGTERM before it kills the container.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The `<devices>` children a container acts on; start warns about others.
const HONOURED_DEVICES: &[&str] = &["filesystem", "emulator", "console"];

/// How often `next_event` looks at a watched container's record.
const EVENT_POLL: Duration = Duration::from_millis(50);

/// A connection to one LXC driver instance (one state root).
pub struct LxcConnection {
    uri: String,
    store: Store,
    /// Per watched domain, the init `next_event` saw last (`None`: shut off).
    watched: std::sync::Mutex<HashMap<String, Option<ProcessId>>>,
    /// Per watched domain, the events of the storage daemon serving its
    /// qcow2 filesystem, for block-job events.
    job_events: events::JobEvents,
}

impl LxcConnection {
    /// Opens the instance named by an `lxc://` URI: `lxc:///system` or
    /// `lxc:///embed?root=DIR`.
    pub fn open(uri: &ConnectUri) -> Result<LxcConnection> {
        uri.require_local("lxc", "containers")?;
        if uri.path == "session" {
            return Err(Error::no_support(format!(
                "'{uri}': unprivileged containers are not supported (the lxc driver attaches loop devices, \
                 mounts and makes cgroups as root; an <idmap> gives a container a user namespace of its own); \
                 use lxc:///system (as root) or lxc:///embed?root=DIR"
            )));
        }
        Ok(LxcConnection {
            uri: uri.to_string(),
            store: Store::open(uri.state_root()?)?,
            watched: Default::default(),
            job_events: Default::default(),
        })
    }

    /// The domain's record after reconciling it, under the domain lock:
    /// `None` when it is shut off.
    async fn reconciled(&self, name: &str) -> Result<Option<LiveStatus>> {
        let (store, name) = (self.store.clone(), name.to_string());
        blocking(move || {
            let _lock = store.lock_domain(&name)?;
            status::reconcile(&Linux, &store, &name)
        })
        .await
    }

    /// The container's running init as its record shows it, without
    /// waiting for the domain lock (a start in progress is not running
    /// yet), and whether a record is there at all.
    fn observe(&self, name: &str) -> Result<(Option<ProcessId>, bool)> {
        let Some(xml) = self.store.read_status(name)? else { return Ok((None, false)) };
        let status = LiveStatus::parse(&xml)?;
        Ok((status.running_init().filter(|_| !status.starting), true))
    }

    async fn summary(&self, dom: &Domain) -> Result<DomainSummary> {
        let name = dom.name();
        let live = self.reconciled(&name).await?.filter(|s| !s.starting);
        let running = live.as_ref().and_then(|s| s.init);
        let (state, reason) = match &live {
            None => (DomainState::Shutoff, "unknown"),
            Some(s) if syscall::cgroup_frozen(&s.cgroup) => (DomainState::Paused, "user"),
            Some(_) => (DomainState::Running, "booted"),
        };
        Ok(DomainSummary {
            id: running.and_then(|init| u32::try_from(init.pid).ok()),
            name,
            uuid: dom.uuid().unwrap_or_default(),
            state,
            reason: Some(reason.into()),
            persistent: true,
            damaged: None,
        })
    }

    /// Runs `stop` on the running container's record under the domain
    /// lock, then tears it down; refuses a container that is not running.
    async fn stop(&self, name: &str, stop: impl FnOnce(&LiveStatus) -> Result<()> + Send + 'static) -> Result<()> {
        let (store, name) = (self.store.clone(), name.to_string());
        blocking(move || {
            let _lock = store.lock_domain(&name)?;
            definitions::load(&store, &name)?;
            let status = status::reconcile(&Linux, &store, &name)?
                .ok_or_else(|| Error::operation_invalid("domain is not running"))?;
            stop(&status)?;
            status::teardown(&Linux, &status)?;
            status::forget(&store, &name)
        })
        .await
    }
}

impl LxcConnection {
    /// Freezes or thaws the running container's cgroup (`suspend`, `resume`).
    async fn freeze(&self, name: &str, frozen: bool) -> Result<()> {
        let (store, name) = (self.store.clone(), name.to_string());
        blocking(move || {
            let _lock = store.lock_domain(&name)?;
            definitions::load(&store, &name)?;
            let status = status::reconcile(&Linux, &store, &name)?
                .filter(|s| !s.starting)
                .ok_or_else(|| Error::operation_invalid("domain is not running"))?;
            if syscall::cgroup_frozen(&status.cgroup) == frozen {
                return Err(Error::operation_invalid(if frozen {
                    "domain is already paused"
                } else {
                    "domain is not paused"
                }));
            }
            Linux.cgroup_freeze(&status.cgroup, frozen)
        })
        .await
    }
}

fn open_registered(uri: &ConnectUri) -> Result<Box<dyn Connection>> {
    Ok(Box::new(LxcConnection::open(uri)?))
}

inventory::submit! {
    DriverRegistration {
        scheme: "lxc",
        description: "Linux containers on block, raw or qcow2 image, bind and ram root filesystems",
        open: open_registered,
    }
}

/// The elements of a definition the driver does not act on, for start's
/// warnings.
fn unhonoured(dom: &Domain) -> Vec<String> {
    let root = dom.element();
    let devices = root.child("devices").into_iter().flat_map(|d| d.elements());
    let mut out: Vec<String> =
        devices.map(|e| e.name.to_string()).filter(|n| !HONOURED_DEVICES.contains(&n.as_str())).collect();
    out.extend(["resource", "cputune", "memtune"].iter().filter(|n| root.child(n).is_some()).map(|n| n.to_string()));
    out.sort();
    out.dedup();
    out
}

#[async_trait]
impl Connection for LxcConnection {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn capabilities(&self) -> DriverCapabilities {
        DriverCapabilities {
            driver: "lxc".into(),
            uri: self.uri.clone(),
            hypervisor: "Linux namespaces".into(),
            domains: DomainCapabilities { run: true, events: true, ..Default::default() },
            snapshots: SnapshotCapabilities {
                kinds: SnapshotKinds { internal_disk: true, external_disk: true, ..Default::default() },
                creation: SnapshotCreation { live: true, offline: true },
                revert: RevertRules {
                    to: RevertTo::AnySnapshot,
                    external: true,
                    guest: RevertedGuest::RunningOrPaused,
                },
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
                bandwidth: true,
                ready_pivot: true,
                ..Default::default()
            },
            storage: StorageCapabilities { disk_sets: true, storage_pools: true },
            honoured_elements: vec![
                "os/type exe, os/init, os/initarg".into(),
                "filesystem type='block' (ext2/3/4, xfs, btrfs, vfat probed), type='file' with a raw or qcow2 \
                 loop driver, type='mount', type='ram'; readonly"
                    .into(),
                "name (the container's hostname)".into(),
                "idmap (uid and gid ranges: the init runs in a user namespace of its own)".into(),
            ],
            unhonoured_elements: vec![
                "interface".into(),
                "disk".into(),
                "resource".into(),
                "cputune".into(),
                "memtune".into(),
            ],
            notes: vec![
                "a container gets new mount, pid, uts, ipc and net namespaces and a cgroup2 group of its own".into(),
                "with an <idmap>, its init enters a user namespace of its own with those id maps once its \
                 filesystems are mounted (by the host's root); the other namespaces stay the host's root's"
                    .into(),
                "its root is mounted in its own mount namespace only; image files go through loop devices \
                 (autoclear, no direct I/O), each image on one device at most"
                    .into(),
                "a qcow2 chain is served by a qemu-storage-daemon of its own, outside the container's cgroup, \
                 as a FUSE-exported file that a loop device holds"
                    .into(),
                "snapshots (internal or external, of the disk state only) are of qcow2 filesystems; raw, block, \
                 bind and ram filesystems have no layer to hold one"
                    .into(),
                "a running container's snapshot is taken in its storage daemons while the container is paused: \
                 its cgroup frozen, then each filesystem (FIFREEZE), thawed right after the overlays switch"
                    .into(),
                "a revert stops a running container and starts it again only with --running or --paused".into(),
                "start --paused freezes the container's cgroup before its init's exec: the init runs nothing \
                 until resume"
                    .into(),
                "block jobs on a shut-off container's qcow2 filesystems run in a storage daemon started for them \
                 (every job; the container cannot start until they end); on a running container's qcow2 \
                 filesystem in the storage daemon serving it, whose FUSE export holds the active layer: only a \
                 pull into a layer below the active one (blockpull --top) and an intermediate commit (blockcommit \
                 --top) run, the others are refused saying so"
                    .into(),
                "memory state cannot be saved (no checkpoint/restore)".into(),
                "suspend and resume freeze and thaw the container's cgroup".into(),
                format!(
                    "shutdown sends SIGTERM to the init and kills the container after {} s",
                    SHUTDOWN_GRACE.as_secs()
                ),
            ],
        }
    }

    async fn list_domains(&self) -> Result<Vec<DomainSummary>> {
        let mut out = Vec::new();
        for listed in definitions::list(&self.store)? {
            out.push(match listed {
                Ok(dom) => self.summary(&dom).await?,
                Err(damaged) => damaged,
            });
        }
        Ok(out)
    }

    async fn define_xml(&self, xml: &str, flags: DefineFlags) -> Result<DefineOutcome> {
        definitions::define_for(&self.store, xml, flags, "lxc", &["lxc"], |dom| {
            plan::Container::from_domain(dom).map(drop)
        })
    }

    async fn undefine(&self, name: &str, flags: UndefineFlags) -> Result<()> {
        let (store, name) = (self.store.clone(), name.to_string());
        blocking(move || {
            let _lock = store.lock_domain(&name)?;
            if status::reconcile(&Linux, &store, &name)?.is_some() {
                return Err(Error::operation_invalid(format!(
                    "domain '{name}' is running; destroy it before undefining it"
                )));
            }
            definitions::undefine(&store, &name, flags.snapshots_metadata)
        })
        .await
    }

    async fn domain_info(&self, name: &str) -> Result<DomainInfo> {
        let dom = definitions::load(&self.store, name)?;
        Ok(DomainInfo::of_definition(&dom, self.summary(&dom).await?))
    }

    async fn start(&self, name: &str, flags: StartFlags) -> Result<StartOutcome> {
        let (store, name) = (self.store.clone(), name.to_string());
        blocking(move || {
            let _lock = store.lock_domain(&name)?;
            let dom = definitions::load(&store, &name)?;
            if status::reconcile(&Linux, &store, &name)?.is_some() {
                return Err(Error::operation_invalid(format!("domain '{name}' is already active")));
            }
            if offline::reconcile(&store, &name)?.is_some() {
                return Err(Error::operation_invalid(format!(
                    "domain '{name}' is shut off but an offline block job runs on its filesystems; \
                     wait for it (blockjob --info) or abort it (blockjob --abort)"
                )));
            }
            let warnings = unhonoured(&dom)
                .into_iter()
                .map(|e| format!("domain '{name}': <{e}> is not honoured by the lxc driver (kept in the definition, not acted on)"))
                .collect();
            container::start(&store, &name, dom, flags.paused)?;
            Ok(StartOutcome { warnings })
        })
        .await
    }

    async fn destroy(&self, name: &str) -> Result<()> {
        self.stop(name, |_| Ok(())).await
    }

    async fn shutdown(&self, name: &str) -> Result<()> {
        self.stop(name, |status| {
            if let Some(init) = status.running_init() {
                // A frozen init would handle SIGTERM only once thawed.
                if syscall::cgroup_frozen(&status.cgroup) {
                    Linux.cgroup_freeze(&status.cgroup, false)?;
                }
                init.signal(libc::SIGTERM)?;
                // Still running after the grace: the teardown kills it.
                let _ = status::wait_gone(init, SHUTDOWN_GRACE);
            }
            Ok(())
        })
        .await
    }

    async fn suspend(&self, name: &str) -> Result<()> {
        self.freeze(name, true).await
    }

    async fn resume(&self, name: &str) -> Result<()> {
        self.freeze(name, false).await
    }

    async fn dump_xml(&self, name: &str, flags: DumpXmlFlags) -> Result<String> {
        definitions::load(&self.store, name)?;
        // Jobs that ended while no strata ran are recorded first, so the
        // chains shown are the ones the images now have.
        if offline::jobs_recorded(&self.store, name)? {
            BlockJobHost::serving(self, name).await?;
        }
        match self.reconciled(name).await?.filter(|s| !flags.inactive && !s.starting) {
            Some(status) => {
                let mut dom = status.domain;
                dom.set_id(status.init.and_then(|init| u32::try_from(init.pid).ok()));
                Ok(dom.to_xml())
            }
            None => definitions::dump_xml(&self.store, name, flags),
        }
    }

    async fn check_chains(&self, name: &str, disk: Option<&str>, fix: bool) -> Result<Vec<DiskChainCheck>> {
        definitions::check_chains(&self.store, name, disk, fix)
    }

    /// Lifecycle events, seen by watching the container's record: its init
    /// appearing (`Started Booted`), exiting by itself (`Stopped
    /// Shutdown`), or its record going with a destroy or shutdown
    /// (`Stopped Destroyed`). An init started after this process began
    /// counts as started even when the first look already finds it.
    /// Block-job events come from the storage daemon serving the running
    /// container's qcow2 filesystem, as a QEMU domain's come from QEMU.
    async fn next_event(&self, domain: &str, timeout_ms: u64) -> Result<Option<DomainEvent>> {
        definitions::load(&self.store, domain)?;
        self.job_events.watch(&self.store, domain).await;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
        let first =
            self.watched.lock().map_err(|_| Error::internal("the event watch lock is poisoned"))?.get(domain).copied();
        let mut last = match first {
            Some(last) => last,
            None => {
                let this = ProcessId::this()?;
                let (init, _) = self.observe(domain)?;
                strata_core::pause_point("lxc-event:watching");
                // Started before this watcher: not an event.
                init.filter(|i| i.start_time < this.start_time)
            }
        };
        let event = loop {
            if let Some(event) = self.job_events.next(domain).await {
                break Some(event);
            }
            let (init, recorded) = self.observe(domain)?;
            let detail = match (last, init) {
                (None, Some(_)) => Some("Started Booted"),
                (Some(_), None) if recorded => Some("Stopped Shutdown"),
                (Some(_), None) => Some("Stopped Destroyed"),
                // Another init since: the stop first, the start next time.
                (Some(a), Some(b)) if a != b => Some("Stopped Destroyed"),
                _ => None,
            };
            if let Some(detail) = detail {
                last = if detail.starts_with("Started") { init } else { None };
                let timestamp_us = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
                break Some(DomainEvent {
                    domain: domain.to_string(),
                    event: "lifecycle".into(),
                    detail: detail.into(),
                    disk: None,
                    timestamp_us,
                });
            }
            if tokio::time::Instant::now() + EVENT_POLL > deadline {
                break None;
            }
            tokio::time::sleep(EVENT_POLL).await;
        };
        self.watched
            .lock()
            .map_err(|_| Error::internal("the event watch lock is poisoned"))?
            .insert(domain.to_string(), last);
        Ok(event)
    }

    async fn enter_namespace(&self, name: &str, command: &[String]) -> Result<i32> {
        definitions::load(&self.store, name)?;
        let status = self
            .reconciled(name)
            .await?
            .filter(|s| !s.starting)
            .ok_or_else(|| Error::operation_invalid("domain is not running"))?;
        let init = status.init.ok_or_else(|| Error::operation_invalid("domain is not running"))?;
        if syscall::cgroup_frozen(&status.cgroup) {
            // The command would join the frozen cgroup and wait with it.
            return Err(Error::operation_invalid(format!("domain '{name}' is paused; resume it first")));
        }
        let command = command.to_vec();
        blocking(move || container::enter(init, &status.cgroup, &command)).await
    }

    fn state_store(&self) -> Option<&Store> {
        Some(&self.store)
    }

    fn snapshots(&self) -> Option<&dyn SnapshotOps> {
        Some(self)
    }

    fn block_jobs(&self) -> Option<&dyn BlockJobOps> {
        Some(BlockJobEngine::over(self))
    }

    fn disk_sets(&self) -> Option<&dyn DiskSetOps> {
        Some(definitions::StoredDiskSets::over(&self.store))
    }
}
