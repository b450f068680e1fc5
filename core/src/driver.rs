//! The traits every driver implements, and the plain values they exchange.
//!
//! One [`Connection`] trait covers domains; snapshots, block jobs and disk
//! sets are separate capability traits a driver may or may not offer,
//! discovered at run time through [`Connection::snapshots`] and friends.
//! Every input and output is XML text, flags or plain values, so a driver
//! can sit behind a C-ABI plugin boundary.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use crate::capabilities::DriverCapabilities;
use crate::capabilities::{refusal, SnapshotRequest};
use crate::chain::ChainDifference;
use crate::error::{Error, Result};
use crate::hostcpu::{HostCpuMap, NodeInfo};
use crate::network::NetworkManager;
use crate::options::{
    wire_flags, BlockCommitOptions, BlockCopyOptions, BlockJobAbortFlags, BlockPullOptions, SnapshotCreateFlags,
    SnapshotDeleteFlags, SnapshotRevertFlags, STRATA_FLAGS,
};
use crate::pool::PoolManager;
use crate::store::Store;
use crate::xml::{Domain, SnapshotDef};

/// virsh's domain states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomainState {
    NoState,
    Running,
    Blocked,
    Paused,
    Shutdown,
    Shutoff,
    Crashed,
    PmSuspended,
    /// Not one of virsh's: the stored definition cannot be used (see
    /// [`DomainSummary::damaged`]).
    Damaged,
}

impl DomainState {
    /// The words virsh prints.
    pub fn as_virsh(self) -> &'static str {
        match self {
            DomainState::NoState => "no state",
            DomainState::Running => "running",
            DomainState::Blocked => "idle",
            DomainState::Paused => "paused",
            DomainState::Shutdown => "in shutdown",
            DomainState::Shutoff => "shut off",
            DomainState::Crashed => "crashed",
            DomainState::PmSuspended => "pmsuspended",
            DomainState::Damaged => "damaged",
        }
    }

    pub fn is_active(self) -> bool {
        !matches!(self, DomainState::Shutoff | DomainState::Damaged)
    }
}

/// One row of `list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainSummary {
    pub id: Option<u32>,
    pub name: String,
    pub uuid: String,
    pub state: DomainState,
    /// Why the domain is in that state (`booted`, `user`, `destroyed`, …).
    pub reason: Option<String>,
    pub persistent: bool,
    /// Why the stored definition cannot be used, naming its file; the
    /// state is then [`DomainState::Damaged`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub damaged: Option<String>,
}

/// What `dominfo` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainInfo {
    #[serde(flatten)]
    pub summary: DomainSummary,
    pub os_type: String,
    pub max_memory_kib: u64,
    pub used_memory_kib: u64,
    pub vcpus: u32,
    pub autostart: bool,
    pub managed_save: bool,
}

impl DomainInfo {
    /// What `dominfo` shows of the definition `dom`, in the state `summary` gives.
    pub fn of_definition(dom: &Domain, summary: DomainSummary) -> DomainInfo {
        DomainInfo {
            summary,
            os_type: dom.os_type(),
            max_memory_kib: dom.memory_kib().unwrap_or(0),
            used_memory_kib: dom.current_memory_kib().unwrap_or(0),
            vcpus: dom.vcpus(),
            autostart: false,
            managed_save: false,
        }
    }
}

/// An event as `strata event` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainEvent {
    pub domain: String,
    /// `block-job` or `lifecycle`.
    pub event: String,
    /// What happened, in virsh's words (`Block Pull for vda completed`).
    pub detail: String,
    /// The disk (its target, `vda`) a block-job event is about.
    pub disk: Option<String>,
    /// Microseconds since the epoch, from the hypervisor.
    pub timestamp_us: i64,
}

/// One virtual CPU of a running domain, as `vcpuinfo` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuInfo {
    pub number: u32,
    /// The host CPU it last ran on.
    pub cpu: u32,
    /// `running` (libvirt's word for every online vCPU of a QEMU domain).
    pub state: String,
    /// Host CPU time it used, in nanoseconds.
    pub cpu_time_ns: u64,
    /// For each host CPU present, online or not, whether it may run there.
    pub affinity: Vec<bool>,
}

/// Flags for [`Connection::define_xml`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u32", try_from = "u32")]
pub struct DefineFlags {
    /// Probe every disk's chain even when the XML gives one, and refuse a mismatch.
    pub validate: bool,
}

wire_flags!(DefineFlags as u32 {
    validate = 1 << 0, // VIR_DOMAIN_DEFINE_VALIDATE
});

/// The result of a define: the domain's name and anything the user should know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefineOutcome {
    pub name: String,
    pub warnings: Vec<String>,
}

/// Flags for [`Connection::dump_xml`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u32", try_from = "u32")]
pub struct DumpXmlFlags {
    /// The persistent definition even while the domain runs.
    pub inactive: bool,
    /// Re-read the image files and record the chains found (seed 000).
    pub refresh_chain: bool,
}

wire_flags!(DumpXmlFlags as u32 {
    inactive = 1 << 1, // VIR_DOMAIN_XML_INACTIVE
    refresh_chain = STRATA_FLAGS, // --refresh-chain, Strata's own
});

/// Flags for [`Connection::undefine`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u32", try_from = "u32")]
pub struct UndefineFlags {
    /// Also remove the domain's snapshot records (their images stay).
    pub snapshots_metadata: bool,
}

wire_flags!(UndefineFlags as u32 {
    snapshots_metadata = 1 << 1, // VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
});

/// Flags for [`Connection::start`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u32", try_from = "u32")]
pub struct StartFlags {
    pub paused: bool,
}

wire_flags!(StartFlags as u32 {
    paused = 1 << 0, // VIR_DOMAIN_START_PAUSED
});

/// The result of a start: anything the user should know, such as each
/// element of the definition the driver does not act on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartOutcome {
    pub warnings: Vec<String>,
}

/// `domblkcheck`'s findings for one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskChainCheck {
    pub disk: String,
    pub differences: Vec<ChainDifference>,
    /// Set when a probe of the images failed; the message says why.
    pub error: Option<String>,
    /// Whether `--fix` rewrote the recorded chain.
    pub fixed: bool,
}

/// A connection to one driver instance.
#[async_trait]
pub trait Connection: Send + Sync {
    fn uri(&self) -> &str;
    fn capabilities(&self) -> DriverCapabilities;
    async fn list_domains(&self) -> Result<Vec<DomainSummary>>;
    async fn define_xml(&self, xml: &str, flags: DefineFlags) -> Result<DefineOutcome>;
    async fn undefine(&self, name: &str, flags: UndefineFlags) -> Result<()>;
    async fn domain_info(&self, name: &str) -> Result<DomainInfo>;
    async fn start(&self, name: &str, flags: StartFlags) -> Result<StartOutcome>;
    async fn destroy(&self, name: &str) -> Result<()>;
    async fn shutdown(&self, name: &str) -> Result<()>;
    async fn suspend(&self, name: &str) -> Result<()>;
    async fn resume(&self, name: &str) -> Result<()>;
    async fn dump_xml(&self, name: &str, flags: DumpXmlFlags) -> Result<String>;
    /// Compares recorded chains with the images (validation mode) and,
    /// with `fix`, records what the images say (correction mode).
    async fn check_chains(&self, name: &str, disk: Option<&str>, fix: bool) -> Result<Vec<DiskChainCheck>>;

    /// The domain's next event, waiting at most `timeout_ms`; `None` when
    /// none came. Events that arrive between calls are kept.
    async fn next_event(&self, domain: &str, timeout_ms: u64) -> Result<Option<DomainEvent>> {
        let _ = (domain, timeout_ms);
        Err(refusal(&self.capabilities().driver, "does not report events"))
    }

    /// Runs `command` (a program and its arguments) inside the running
    /// container's namespaces, at its root, with this process's standard
    /// input and output, and returns its exit status (`lxc-enter-namespace`).
    async fn enter_namespace(&self, name: &str, command: &[String]) -> Result<i32> {
        let _ = (name, command);
        Err(refusal(&self.capabilities().driver, "cannot enter a domain's namespaces"))
    }

    /// The running domain's virtual CPUs.
    async fn vcpu_info(&self, name: &str) -> Result<Vec<VcpuInfo>> {
        let _ = name;
        Err(not_supported_by(&self.capabilities().driver, "vCPU information"))
    }

    /// Attaches the network interface `xml` (an `<interface>`) to the
    /// running domain (`scope.live`) and to its persistent definition
    /// (`scope.config`); neither is the running domain when it runs, else
    /// the definition (virsh's `--current`).
    async fn attach_interface(&self, name: &str, xml: &str, scope: PinScope) -> Result<()> {
        let _ = (name, xml, scope);
        Err(not_supported_by(&self.capabilities().driver, "attaching network interfaces"))
    }

    /// Detaches the interface of type `iface_type` whose MAC is `mac` (any
    /// MAC when only one interface has that type), as
    /// [`Connection::attach_interface`] reads `scope`.
    async fn detach_interface(&self, name: &str, iface_type: &str, mac: Option<&str>, scope: PinScope) -> Result<()> {
        let _ = (name, iface_type, mac, scope);
        Err(not_supported_by(&self.capabilities().driver, "detaching network interfaces"))
    }

    fn snapshots(&self) -> Option<&dyn SnapshotOps> {
        None
    }
    fn block_jobs(&self) -> Option<&dyn BlockJobOps> {
        None
    }
    fn disk_sets(&self) -> Option<&dyn DiskSetOps> {
        None
    }

    /// The state store the connection keeps its objects in. A driver that
    /// has one gets the hypervisor-neutral storage pools over it.
    fn state_store(&self) -> Option<&Store> {
        None
    }
    /// Storage pools: by default the neutral `dir` and `fs` pools kept in
    /// [`Connection::state_store`].
    fn storage_pools(&self) -> Option<Box<dyn StoragePoolOps>> {
        self.state_store().map(|store| Box::new(PoolManager::new(store.clone())) as Box<dyn StoragePoolOps>)
    }
    /// Virtual networks: by default the neutral bridge networks kept in
    /// [`Connection::state_store`].
    fn networks(&self) -> Option<Box<dyn NetworkOps>> {
        self.state_store().map(|store| Box::new(NetworkManager::new(store.clone())) as Box<dyn NetworkOps>)
    }
    fn monitor(&self) -> Option<&dyn MonitorOps> {
        None
    }
    fn cpu_placement(&self) -> Option<&dyn CpuPlacementOps> {
        None
    }
    fn save_migrate(&self) -> Option<&dyn SaveMigrateOps> {
        None
    }
}

impl<'a> dyn Connection + 'a {
    /// The driver's snapshots; a driver whose storage has no image layer
    /// says so in its refusal.
    pub fn require_snapshots(&self) -> Result<&dyn SnapshotOps> {
        self.snapshots().ok_or_else(|| self.capabilities().refuse_without_layers("take snapshots", "snapshots"))
    }
    /// The driver's block jobs; a driver whose storage has no image layer
    /// says so in its refusal.
    pub fn require_block_jobs(&self) -> Result<&dyn BlockJobOps> {
        self.block_jobs().ok_or_else(|| self.capabilities().refuse_without_layers("run block jobs", "block jobs"))
    }
    pub fn require_disk_sets(&self) -> Result<&dyn DiskSetOps> {
        self.disk_sets().ok_or_else(|| not_supported(self, "disk sets"))
    }
    pub fn require_storage_pools(&self) -> Result<Box<dyn StoragePoolOps>> {
        self.storage_pools().ok_or_else(|| not_supported(self, "storage pools"))
    }
    pub fn require_networks(&self) -> Result<Box<dyn NetworkOps>> {
        self.networks().ok_or_else(|| not_supported(self, "networks"))
    }

    pub fn require_monitor(&self) -> Result<&dyn MonitorOps> {
        self.monitor().ok_or_else(|| not_supported(self, "monitor commands"))
    }

    pub fn require_cpu_placement(&self) -> Result<&dyn CpuPlacementOps> {
        self.cpu_placement().ok_or_else(|| not_supported(self, "host CPU information and placement"))
    }

    pub fn require_save_migrate(&self) -> Result<&dyn SaveMigrateOps> {
        self.save_migrate().ok_or_else(|| not_supported(self, "saving and migrating domains"))
    }

    /// Refuses, before the driver is asked, a snapshot of `domain` that the
    /// driver's capabilities say it cannot take (see
    /// [`DriverCapabilities::check_snapshot_create`]). The domain's state
    /// and disks are read only when the capabilities leave the answer
    /// open; a document that does not parse is left to the driver, which
    /// says what is wrong with it, and so is `--redefine`, which only records.
    pub async fn check_snapshot_create(&self, domain: &str, xml: &str, flags: &SnapshotCreateFlags) -> Result<()> {
        let caps = self.capabilities();
        if caps.snapshots.takes_every_snapshot() || flags.redefine {
            return Ok(());
        }
        let Ok(def) = SnapshotDef::parse(xml) else {
            return Ok(());
        };
        let live = self.domain_info(domain).await?.summary.state.is_active();
        let inactive = DumpXmlFlags { inactive: true, ..Default::default() };
        let dom = Domain::parse(&self.dump_xml(domain, inactive).await?)?;
        caps.check_snapshot_create(&SnapshotRequest::for_domain(&def, flags, live, &dom)?)
    }

    /// The target (`vda`) of the domain's disk that `disk` names, in the
    /// domain's current XML (live when it runs): the one place a disk
    /// given on a command line as a target, a filesystem target dir or an
    /// image path is resolved; see [`Domain::find_storage_device`] for what
    /// is accepted. A name without a
    /// leading `/` is a target as it stands (the command checks that the
    /// disk exists), so only a path costs a look at the domain's XML.
    pub async fn disk_target(&self, domain: &str, disk: &str) -> Result<String> {
        if !disk.starts_with('/') {
            return Ok(disk.to_string());
        }
        let xml = self.dump_xml(domain, DumpXmlFlags::default()).await?;
        Ok(Domain::parse(&xml)?.find_storage_device(disk)?.name().to_string())
    }
}

fn not_supported(conn: &dyn Connection, what: &str) -> Error {
    not_supported_by(&conn.capabilities().driver, what)
}

fn not_supported_by(driver: &str, what: &str) -> Error {
    refusal(driver, &format!("does not support {what}"))
}

/// One snapshot in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSummary {
    pub name: String,
    pub parent: Option<String>,
    pub creation_time: i64,
    pub state: String,
    pub current: bool,
    /// `internal`, `external` or `mixed`.
    pub location: String,
}

/// Snapshots: the QEMU driver keeps the tree in its store; VirtualBox keeps
/// it in the hypervisor; LXC snapshots filesystems only (no memory state).
#[async_trait]
pub trait SnapshotOps: Send + Sync {
    /// Creates a snapshot from `<domainsnapshot>` XML; returns its name.
    async fn snapshot_create(&self, domain: &str, xml: &str, flags: SnapshotCreateFlags) -> Result<String>;
    async fn snapshot_list(&self, domain: &str) -> Result<Vec<SnapshotSummary>>;
    async fn snapshot_xml(&self, domain: &str, snapshot: &str) -> Result<String>;
    /// Makes an existing snapshot the current one.
    async fn snapshot_set_current(&self, domain: &str, snapshot: &str) -> Result<()>;
    async fn snapshot_revert(&self, domain: &str, snapshot: &str, flags: SnapshotRevertFlags) -> Result<()>;
    /// Deletes; the returned lines say what was done to the images.
    async fn snapshot_delete(&self, domain: &str, snapshot: &str, flags: SnapshotDeleteFlags) -> Result<Vec<String>>;
    /// How far the create, revert or delete this connection is running on
    /// `domain` has gone, in percent, where the hypervisor reports it
    /// (VirtualBox's IProgress); `None` otherwise. The caller polls it
    /// while it awaits the operation, to show a progress bar.
    async fn snapshot_progress(&self, domain: &str) -> Result<Option<u32>> {
        let _ = domain;
        Ok(None)
    }
}

/// The four block jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockJobKind {
    Pull,
    Commit,
    ActiveCommit,
    Copy,
}

impl BlockJobKind {
    /// The label virsh prints (`Block Pull: [ 12 %]`).
    pub fn label(self) -> &'static str {
        match self {
            BlockJobKind::Pull => "Block Pull",
            BlockJobKind::Commit => "Block Commit",
            BlockJobKind::ActiveCommit => "Active Block Commit",
            BlockJobKind::Copy => "Block Copy",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BlockJobKind::Pull => "pull",
            BlockJobKind::Commit => "commit",
            BlockJobKind::ActiveCommit => "active-commit",
            BlockJobKind::Copy => "copy",
        }
    }

    pub fn parse(s: &str) -> Option<BlockJobKind> {
        [BlockJobKind::Pull, BlockJobKind::Commit, BlockJobKind::ActiveCommit, BlockJobKind::Copy]
            .into_iter()
            .find(|k| k.as_str() == s)
    }

    /// Jobs with a second, synchronised phase that waits for pivot or abort.
    pub fn has_ready_phase(self) -> bool {
        matches!(self, BlockJobKind::ActiveCommit | BlockJobKind::Copy)
    }
}

/// A block job as `blockjob --info` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockJobInfo {
    pub kind: BlockJobKind,
    pub disk: String,
    pub cur: u64,
    pub end: u64,
    pub bandwidth_bytes: u64,
    /// In the synchronised phase (copy, active commit): ready to pivot.
    pub ready: bool,
}

/// How a block job ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "outcome", content = "error")]
pub enum BlockJobEnd {
    /// Finished: for copy and active commit, after a pivot.
    Completed,
    /// Copy or active commit ended without a pivot; the source stays in use.
    Finished,
    Cancelled,
    Failed(String),
}

/// What [`BlockJobOps::block_job_wait`] saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum BlockJobState {
    Running(BlockJobInfo),
    /// The synchronised phase was reached (or already held).
    Ready(BlockJobInfo),
    Ended {
        kind: BlockJobKind,
        end: BlockJobEnd,
    },
}

/// Block jobs. Progress is observed by [`BlockJobOps::block_job_wait`],
/// which returns as soon as the job changes state (event-driven) or after
/// the caller's timeout, so only plain values cross the trait.
#[async_trait]
pub trait BlockJobOps: Send + Sync {
    async fn block_pull(&self, domain: &str, disk: &str, opts: &BlockPullOptions) -> Result<()>;
    async fn block_commit(&self, domain: &str, disk: &str, opts: &BlockCommitOptions) -> Result<BlockJobKind>;
    /// Starts a copy; returns warnings about the flag combination.
    async fn block_copy(&self, domain: &str, disk: &str, opts: &BlockCopyOptions) -> Result<Vec<String>>;
    async fn block_job_info(&self, domain: &str, disk: &str) -> Result<Option<BlockJobInfo>>;
    /// Ends the job: with `pivot`, switches to the copy or the commit base.
    async fn block_job_abort(&self, domain: &str, disk: &str, flags: BlockJobAbortFlags) -> Result<BlockJobEnd>;
    async fn block_job_set_speed(&self, domain: &str, disk: &str, bytes_per_sec: u64) -> Result<()>;
    /// Waits at most `timeout_ms` for the job on `disk` to change state.
    async fn block_job_wait(&self, domain: &str, disk: &str, timeout_ms: u64) -> Result<BlockJobState>;
}

/// A hypervisor monitor that passes commands through as they are
/// (virsh's `qemu-monitor-command`), for operators. What such a command
/// changes behind the driver is not recorded.
#[async_trait]
pub trait MonitorOps: Send + Sync {
    /// Sends `command` to the running domain's monitor — the monitor's own
    /// protocol (QMP JSON for QEMU), or with `human` its human monitor
    /// command line — and returns the reply as the monitor gave it (a
    /// refused command's error reply included).
    async fn monitor_command(&self, domain: &str, command: &str, human: bool) -> Result<String>;
}

/// The host's CPUs as the driver's guests run on them (`nodeinfo`,
/// `nodecpumap`): masks sized by the CPUs present, offline ones kept in
/// place (seed 003).
#[async_trait]
pub trait CpuPlacementOps: Send + Sync {
    async fn node_info(&self) -> Result<NodeInfo>;
    async fn node_cpu_map(&self) -> Result<HostCpuMap>;
    /// The host CPUs each vCPU may run on, in vCPU order.
    async fn vcpu_pins(&self, domain: &str, scope: PinScope) -> Result<Vec<Vec<u32>>>;
    /// Pins one vCPU to `cpus`, which must all be present and online.
    async fn pin_vcpu(&self, domain: &str, vcpu: u32, cpus: &[u32], scope: PinScope) -> Result<()>;
    /// The host CPUs the emulator's own threads may run on.
    async fn emulator_pin(&self, domain: &str, scope: PinScope) -> Result<Vec<u32>>;
    /// Pins the emulator's threads (every thread but the vCPUs') to `cpus`.
    async fn pin_emulator(&self, domain: &str, cpus: &[u32], scope: PinScope) -> Result<()>;
    /// The domain's vCPU counts (`vcpucount`).
    async fn vcpu_counts(&self, domain: &str) -> Result<VcpuCounts>;
    /// Sets the domain's vCPU count (`setvcpus`): with `maximum`, the most
    /// it can have (persistent definition only); else the vCPUs it runs
    /// with, plugged into the running domain with `scope.live`.
    async fn set_vcpus(&self, domain: &str, count: u32, scope: PinScope, maximum: bool) -> Result<()>;
}

/// A domain's vCPU counts, as `vcpucount` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuCounts {
    /// The persistent definition's.
    pub config: VcpuCount,
    /// The running domain's, while it runs.
    pub live: Option<VcpuCount>,
}

/// The most vCPUs a definition allows and the ones it runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuCount {
    pub maximum: u32,
    pub current: u32,
}

/// Which definition `vcpupin`/`emulatorpin` read or change: virsh's
/// `--live` (the running domain) and `--config` (the persistent
/// definition); neither is `--current`, the running domain when it runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u32", try_from = "u32")]
pub struct PinScope {
    pub live: bool,
    pub config: bool,
}

// virDomainModificationImpact: neither bit is VIR_DOMAIN_AFFECT_CURRENT.
wire_flags!(PinScope as u32 {
    live = 1 << 0,   // VIR_DOMAIN_AFFECT_LIVE
    config = 1 << 1, // VIR_DOMAIN_AFFECT_CONFIG
});

/// Flags for [`SaveMigrateOps::save`] and [`SaveMigrateOps::managed_save`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u32", try_from = "u32")]
pub struct SaveFlags {
    /// Keep the saved state's pages out of the host's page cache.
    pub bypass_cache: bool,
    /// Restore the domain running, whatever it was when saved.
    pub running: bool,
    /// Restore the domain paused.
    pub paused: bool,
    /// Seed 004's save flag: the disks of the domain's disk set get
    /// external overlays at the instant the memory was saved.
    pub disk_set: bool,
}

wire_flags!(SaveFlags as u32 {
    bypass_cache = 1 << 0, // VIR_DOMAIN_SAVE_BYPASS_CACHE
    running = 1 << 1,      // VIR_DOMAIN_SAVE_RUNNING
    paused = 1 << 2,       // VIR_DOMAIN_SAVE_PAUSED
    disk_set = STRATA_FLAGS, // --disk-set, Strata's own
});

impl SaveFlags {
    pub fn validate(&self) -> Result<()> {
        if self.running && self.paused {
            return Err(Error::invalid_arg("Options --running and --paused are mutually exclusive"));
        }
        Ok(())
    }
}

/// What a save is asked for besides the domain and the file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveOptions {
    /// The domain XML to record in the image instead of the running one
    /// (same name and UUID; virsh's `save --xml`).
    pub xml: Option<String>,
    /// A cap on the transfer in MiB/s (Strata's own); none is as fast as
    /// the host allows.
    pub bandwidth_mib: Option<u64>,
    pub flags: SaveFlags,
}

/// What a domain job moves the guest's memory for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomainJobOperation {
    Save,
    Restore,
    MigrationOut,
    MigrationIn,
}

impl DomainJobOperation {
    /// The words `domjobinfo` prints.
    pub fn as_virsh(self) -> &'static str {
        match self {
            DomainJobOperation::Save => "Save",
            DomainJobOperation::Restore => "Restore",
            DomainJobOperation::MigrationOut => "Outgoing migration",
            DomainJobOperation::MigrationIn => "Incoming migration",
        }
    }
}

/// A running save or migration, as `domjobinfo` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainJobInfo {
    pub operation: DomainJobOperation,
    /// Since the job started (a migration's disk copy included).
    pub elapsed_ms: u64,
    /// Memory and copied disks together, as libvirt counts them.
    pub data_processed: u64,
    pub data_remaining: u64,
    pub data_total: u64,
    /// Bytes per second.
    pub memory_bandwidth: u64,
    /// The disks a migration copies, when it copies any (libvirt's
    /// `disk_*` job fields, virsh's `File` lines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<DiskCopyProgress>,
}

/// How far a migration's disk copies are, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCopyProgress {
    pub processed: u64,
    pub remaining: u64,
    pub total: u64,
}

/// Flags for [`SaveMigrateOps::migrate`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u32", try_from = "u32")]
pub struct MigrateFlags {
    pub live: bool,
    /// Define the domain at the destination.
    pub persist_dest: bool,
    /// Undefine the domain at the source once it runs at the destination.
    pub undefine_source: bool,
    /// Copy every disk (virsh's `--copy-storage-all`).
    pub copy_storage_all: bool,
    /// Copy every disk, the destination holding its backing chain
    /// (`--copy-storage-inc`).
    pub copy_storage_inc: bool,
    pub abort_on_error: bool,
    /// Copy the disks of the domain's disk set (seed 004), Strata's own.
    pub copy_storage_disk_set: bool,
}

wire_flags!(MigrateFlags as u32 {
    live = 1 << 0,               // VIR_MIGRATE_LIVE
    persist_dest = 1 << 3,       // VIR_MIGRATE_PERSIST_DEST
    undefine_source = 1 << 4,    // VIR_MIGRATE_UNDEFINE_SOURCE
    copy_storage_all = 1 << 6,   // VIR_MIGRATE_NON_SHARED_DISK
    copy_storage_inc = 1 << 7,   // VIR_MIGRATE_NON_SHARED_INC
    abort_on_error = 1 << 12,    // VIR_MIGRATE_ABORT_ON_ERROR
    copy_storage_disk_set = STRATA_FLAGS,
});

impl MigrateFlags {
    pub fn validate(&self) -> Result<()> {
        let copies = [
            (self.copy_storage_all, "--copy-storage-all"),
            (self.copy_storage_inc, "--copy-storage-inc"),
            (self.copy_storage_disk_set, "--copy-storage-disk-set"),
        ];
        let given: Vec<&str> = copies.iter().filter(|(on, _)| *on).map(|(_, name)| *name).collect();
        if given.len() > 1 {
            return Err(Error::invalid_arg(format!("Options {} are mutually exclusive", given.join(" and "))));
        }
        Ok(())
    }
}

/// A migration's request besides the domain and the destination.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateOptions {
    /// A cap on the transfer in MiB/s.
    pub bandwidth_mib: Option<u64>,
    /// Pause the guest once the memory transfer has run this many
    /// seconds, so that it ends (virsh's `--timeout`).
    pub timeout_s: Option<u64>,
    /// Where the destination receives the memory stream (virsh's
    /// `--migrateuri`, `tcp:HOST[:PORT]`); by default the host of a remote
    /// destination's URI, or Unix sockets on this machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrate_uri: Option<String>,
    /// Where the destination serves the copied disks (virsh's
    /// `--disks-uri`, `tcp:HOST[:PORT]`); by default the memory stream's
    /// host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks_uri: Option<String>,
    pub flags: MigrateFlags,
}

/// A TCP address a migration's destination listens on: virsh's
/// `tcp:HOST[:PORT]` or `tcp://HOST[:PORT]`, an IPv6 host in brackets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpListen {
    pub host: String,
    /// `None`: a port free when the destination starts listening.
    pub port: Option<u16>,
}

impl TcpListen {
    pub fn parse(uri: &str) -> Result<TcpListen> {
        let bad = || Error::invalid_arg(format!("'{uri}' is not a migration URI of the form tcp:HOST[:PORT]"));
        let rest = uri.strip_prefix("tcp://").or_else(|| uri.strip_prefix("tcp:")).ok_or_else(bad)?;
        let (host, port) = match rest.strip_prefix('[') {
            Some(bracketed) => {
                let (host, after) = bracketed.split_once(']').ok_or_else(bad)?;
                (host, after.strip_prefix(':'))
            }
            None => match rest.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            },
        };
        if host.is_empty() {
            return Err(bad());
        }
        let port = port.map(|p| p.parse::<u16>().map_err(|_| bad())).transpose()?;
        Ok(TcpListen { host: host.to_string(), port })
    }
}

/// Memory state leaving a running domain: saved to a file or a block
/// device (and restored), kept as the domain's managed save, or migrated
/// to another connection; and the domain job that carries it, which
/// another process can watch or abort.
#[async_trait]
pub trait SaveMigrateOps: Send + Sync {
    /// Saves the running domain's memory and device state to `file` and
    /// stops it; a failure leaves it running.
    async fn save(&self, domain: &str, file: &str, opts: &SaveOptions) -> Result<()>;
    /// Starts the domain saved in `file`; returns its name. With `xml`,
    /// the domain runs on that definition instead of the image's (same
    /// name and UUID).
    async fn restore(&self, file: &str, xml: Option<&str>, flags: SaveFlags) -> Result<String>;
    /// The domain XML a saved image holds.
    async fn save_image_xml(&self, file: &str) -> Result<String>;
    /// Saves to the domain's own image, which its next start resumes from.
    async fn managed_save(&self, domain: &str, opts: &SaveOptions) -> Result<()>;
    async fn managed_save_remove(&self, domain: &str) -> Result<()>;
    /// The save or migration running on the domain, if any.
    async fn job_info(&self, domain: &str) -> Result<Option<DomainJobInfo>>;
    /// Cancels the save or migration running on the domain; it keeps running.
    async fn job_abort(&self, domain: &str) -> Result<()>;
    /// Moves the running domain to the connection `dest_uri` names.
    async fn migrate(&self, domain: &str, dest_uri: &str, opts: &MigrateOptions) -> Result<()>;

    // The destination's steps of a migration (libvirt's Prepare and
    // Finish), which the source's `migrate` calls on the destination's
    // connection, in this process or across a remote transport.

    /// Refuses a migration this connection cannot receive: a domain of
    /// that name exists, or a disk not copied is not on storage it sees
    /// at the same path. Changes nothing.
    async fn migrate_check(&self, incoming: &IncomingMigration) -> Result<()>;
    /// Makes ready to receive the migration: fresh images for the copied
    /// disks, the domain defined and started waiting for the stream, the
    /// copied disks served for the source to write.
    async fn migrate_prepare(&self, incoming: &IncomingMigration) -> Result<PreparedMigration>;
    /// Waits until the stream has arrived and stops serving the disks,
    /// leaving the guest paused; with `resume`, runs it (if it ran at the
    /// source). Done twice, it does nothing more.
    async fn migrate_finish(&self, domain: &str, resume: bool) -> Result<()>;
    /// Removes what a prepare made for a migration that failed: the
    /// domain's QEMU and definition (only if its UUID is `uuid`) and the
    /// copied images named `images`.
    async fn migrate_cleanup(&self, domain: &str, uuid: Option<&str>, images: &[String]) -> Result<()>;
}

/// What a migration's source asks its destination to receive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingMigration {
    /// The domain's live XML at the source.
    pub xml: String,
    /// The disks the source copies, each onto a fresh image.
    pub copied: Vec<IncomingDisk>,
    /// The disks not copied, with their images, which the destination
    /// must see at the same paths on storage it shares.
    pub shared: Vec<SharedDisk>,
    /// Where the destination listens for the memory stream (TCP);
    /// `None`: a Unix socket, for a destination on the same machine.
    pub migration_listen: Option<TcpListen>,
    /// Where it serves the copied disks (TCP); `None`: a Unix socket.
    pub disks_listen: Option<TcpListen>,
}

/// A disk a migration copies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingDisk {
    pub target: String,
    pub format: String,
    /// Its virtual size in bytes.
    pub size: u64,
    /// The name of the image at the source; the destination's image has it too.
    pub file_name: String,
}

/// A disk a migration does not copy, and the images of its chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedDisk {
    pub target: String,
    pub images: Vec<String>,
}

/// Where a prepared destination waits, as QEMU addresses take them:
/// `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedMigration {
    /// The memory stream's.
    pub migration_uri: String,
    /// The NBD server of the copied disks (each exported under its target
    /// name), when any disk is copied.
    pub disks_uri: Option<String>,
}

/// Seed 004's outcomes for adding or removing one disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskSetOutcome {
    Added,
    AlreadyPresent,
    Removed,
    AlreadyAbsent,
}

/// Seed 004's disk sets: a persistent selection of a domain's disks that
/// later operations (snapshots, copies, migration) can be limited to.
#[async_trait]
pub trait DiskSetOps: Send + Sync {
    async fn diskset_add(&self, domain: &str, disk: &str) -> Result<DiskSetOutcome>;
    async fn diskset_remove(&self, domain: &str, disk: &str) -> Result<DiskSetOutcome>;
    /// Adds every disk; returns the set's new size.
    async fn diskset_add_all(&self, domain: &str) -> Result<usize>;
    /// Empties the set; returns how many disks were removed.
    async fn diskset_remove_all(&self, domain: &str) -> Result<usize>;
    async fn diskset_list(&self, domain: &str) -> Result<Vec<String>>;
    async fn diskset_size(&self, domain: &str) -> Result<usize> {
        Ok(self.diskset_list(domain).await?.len())
    }
}

/// A storage pool's state as virsh names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolState {
    Inactive,
    Running,
}

/// A storage pool as `pool-list` and `pool-info` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    pub name: String,
    pub uuid: String,
    /// `dir` or `fs`.
    #[serde(rename = "type")]
    pub pool_type: String,
    pub state: PoolState,
    pub persistent: bool,
    pub autostart: bool,
    /// The directory holding the volumes.
    pub target: String,
    /// Sizes in bytes of the pool's filesystem, known while it runs.
    pub capacity: Option<u64>,
    pub allocation: Option<u64>,
    pub available: Option<u64>,
}

/// A volume as `vol-list --details` and `vol-info` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub pool: String,
    pub path: String,
    /// libvirt's volume type: `file`.
    #[serde(rename = "type")]
    pub volume_type: String,
    /// The image format found in the file (`raw` when it has no known header).
    pub format: String,
    /// Virtual size in bytes.
    pub capacity: u64,
    /// Bytes the file occupies on the host.
    pub allocation: u64,
}

/// Flags for [`StoragePoolOps::pool_build`] (an `fs` pool's device).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u32", try_from = "u32")]
pub struct PoolBuildFlags {
    /// Make a new filesystem on the device even if it holds one.
    pub overwrite: bool,
    /// Make a filesystem on the device only if it holds none.
    pub no_overwrite: bool,
}

wire_flags!(PoolBuildFlags as u32 {
    no_overwrite = 1 << 2, // VIR_STORAGE_POOL_BUILD_NO_OVERWRITE
    overwrite = 1 << 3,    // VIR_STORAGE_POOL_BUILD_OVERWRITE
});

/// Flags for [`StoragePoolOps::vol_resize`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u32", try_from = "u32")]
pub struct VolumeResizeFlags {
    /// The size is added to the current capacity.
    pub delta: bool,
    /// The volume may become smaller (its data past the new end is lost).
    pub shrink: bool,
}

wire_flags!(VolumeResizeFlags as u32 {
    delta = 1 << 1,  // VIR_STORAGE_VOL_RESIZE_DELTA
    shrink = 1 << 2, // VIR_STORAGE_VOL_RESIZE_SHRINK
});

/// Storage pools and their volumes, as virsh's `pool-*` and `vol-*`
/// commands use them. A volume is named by its pool and name; where the
/// pool is `None`, the volume is given by its path (its key) and looked up
/// in every running pool.
#[async_trait]
pub trait StoragePoolOps: Send + Sync {
    /// Defines (or redefines) a pool from `<pool>` XML; returns its name.
    async fn pool_define_xml(&self, xml: &str) -> Result<String>;
    async fn pool_undefine(&self, pool: &str) -> Result<()>;
    async fn pool_build(&self, pool: &str, flags: PoolBuildFlags) -> Result<()>;
    async fn pool_start(&self, pool: &str) -> Result<()>;
    async fn pool_destroy(&self, pool: &str) -> Result<()>;
    async fn pool_refresh(&self, pool: &str) -> Result<()>;
    async fn pool_list(&self) -> Result<Vec<PoolInfo>>;
    async fn pool_info(&self, pool: &str) -> Result<PoolInfo>;
    /// The definition, with the sizes while the pool runs unless `inactive`.
    async fn pool_xml(&self, pool: &str, inactive: bool) -> Result<String>;
    async fn pool_set_autostart(&self, pool: &str, autostart: bool) -> Result<()>;
    async fn vol_list(&self, pool: &str) -> Result<Vec<VolumeInfo>>;
    async fn vol_info(&self, pool: Option<&str>, volume: &str) -> Result<VolumeInfo>;
    /// `<volume>` with the whole backing chain as nested `<backingStore>`.
    async fn vol_xml(&self, pool: Option<&str>, volume: &str) -> Result<String>;
    /// Creates a volume from `<volume>` XML; returns its name.
    async fn vol_create_xml(&self, pool: &str, xml: &str) -> Result<String>;
    async fn vol_delete(&self, pool: Option<&str>, volume: &str) -> Result<()>;
    /// Sets the capacity to `bytes` (or adds them with `delta`); returns the new capacity.
    async fn vol_resize(&self, pool: Option<&str>, volume: &str, bytes: u64, flags: VolumeResizeFlags) -> Result<u64>;
    /// Copies a volume's data into a new volume `new_name` of its pool.
    async fn vol_clone(&self, pool: Option<&str>, volume: &str, new_name: &str) -> Result<()>;
}

/// A virtual network as `net-list` and `net-info` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInfo {
    pub name: String,
    pub uuid: String,
    pub active: bool,
    pub persistent: bool,
    pub autostart: bool,
    /// The bridge device the network's guests are put on.
    pub bridge: String,
}

/// A DHCP lease a network's server handed out (`net-dhcp-leases`,
/// `domifaddr --source lease`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkLease {
    /// The network's bridge.
    pub interface: String,
    /// Seconds since the epoch.
    pub expiry_time: i64,
    pub mac: String,
    pub address: String,
    pub prefix: u32,
    pub hostname: Option<String>,
    pub client_id: Option<String>,
}

/// A network `net-create` defined and started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkCreated {
    pub name: String,
    /// What the start warns about, as `net_start`'s.
    pub warnings: Vec<String>,
}

/// Virtual networks, as virsh's `net-*` commands use them.
#[async_trait]
pub trait NetworkOps: Send + Sync {
    /// Defines (or redefines) a network from `<network>` XML; returns its name.
    async fn net_define_xml(&self, xml: &str) -> Result<String>;
    /// Defines a transient network from `<network>` XML and starts it: it
    /// is gone once destroyed (or when its start fails).
    async fn net_create_xml(&self, xml: &str) -> Result<NetworkCreated>;
    /// The leases of a running network's DHCP server.
    async fn net_dhcp_leases(&self, network: &str) -> Result<Vec<NetworkLease>>;
    async fn net_undefine(&self, network: &str) -> Result<()>;
    /// Starts a network; returns warnings for the user (no DHCP server, …).
    async fn net_start(&self, network: &str) -> Result<Vec<String>>;
    async fn net_destroy(&self, network: &str) -> Result<()>;
    async fn net_list(&self) -> Result<Vec<NetworkInfo>>;
    async fn net_info(&self, network: &str) -> Result<NetworkInfo>;
    async fn net_xml(&self, network: &str) -> Result<String>;
    async fn net_set_autostart(&self, network: &str, autostart: bool) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_migration_uri_is_virshs_tcp_host_and_port() {
        let parsed = |uri: &str| TcpListen::parse(uri).map(|l| (l.host, l.port));
        assert_eq!(parsed("tcp:10.0.0.2:49152").expect("tcp"), ("10.0.0.2".into(), Some(49152)));
        assert_eq!(parsed("tcp://hostb").expect("tcp://"), ("hostb".into(), None));
        assert_eq!(parsed("tcp:[fd00::2]:49153").expect("IPv6"), ("fd00::2".into(), Some(49153)));
        for bad in ["unix:/run/m.sock", "tcp:", "tcp:host:port", "tcp:[fd00::2"] {
            let err = TcpListen::parse(bad).expect_err(bad);
            assert_eq!(err.message(), format!("'{bad}' is not a migration URI of the form tcp:HOST[:PORT]"));
        }
    }
}
