//! A [`Connection`] whose every method is one wire call ([`crate::wire`])
//! through a [`WireTransport`]: a plugin's C table ([`crate::plugin`]), or
//! a `strata` on another host reached through a command
//! ([`crate::remote`]). Capabilities are read once, when it opens.

use std::sync::Arc;

use async_trait::async_trait;

use crate::capabilities::DriverCapabilities;
use crate::driver::{
    BlockJobEnd, BlockJobInfo, BlockJobKind, BlockJobOps, BlockJobState, Connection, CpuPlacementOps, DefineFlags,
    DefineOutcome, DiskChainCheck, DiskSetOps, DiskSetOutcome, DomainEvent, DomainInfo, DomainJobInfo, DomainSummary,
    DumpXmlFlags, IncomingMigration, MigrateOptions, MonitorOps, PinScope, PoolBuildFlags, PoolInfo, PreparedMigration,
    SaveFlags, SaveMigrateOps, SaveOptions, SnapshotOps, SnapshotSummary, StartFlags, StartOutcome, StoragePoolOps,
    UndefineFlags, VcpuCounts, VcpuInfo, VolumeInfo, VolumeResizeFlags,
};
use crate::error::{Error, Result};
use crate::hostcpu::{HostCpuMap, NodeInfo};
use crate::options::{
    BlockCommitOptions, BlockCopyOptions, BlockJobAbortFlags, BlockPullOptions, SnapshotCreateFlags,
    SnapshotDeleteFlags, SnapshotRevertFlags,
};
use crate::wire::{Call, Reply};

/// How wire calls reach the driver that answers them.
#[async_trait]
pub(crate) trait WireTransport: Send + Sync {
    /// The other side as an error names it: `the example driver`.
    fn peer(&self) -> &str;
    async fn call(&self, call: Call) -> Result<Reply>;
    /// The domain's next event, waiting at most `timeout_ms`.
    async fn next_event(&self, domain: &str, timeout_ms: u64) -> Result<Option<DomainEvent>>;
}

/// A connection whose methods are wire calls through its transport.
pub(crate) struct WireConnection {
    pub uri: String,
    pub capabilities: DriverCapabilities,
    pub transport: Arc<dyn WireTransport>,
}

/// `$reply`'s value when it is the `$variant` the call answers with.
macro_rules! expect_reply {
    ($transport:expr, $call:expr, $variant:ident) => {
        match $transport.call($call).await? {
            Reply::$variant(value) => Ok(value),
            other => Err(unexpected(&$transport, &other)),
        }
    };
    ($transport:expr, $call:expr) => {
        match $transport.call($call).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected(&$transport, &other)),
        }
    };
}

fn unexpected(transport: &Arc<dyn WireTransport>, reply: &Reply) -> Error {
    let shown = serde_json::to_string(reply).unwrap_or_default();
    Error::internal(format!("{} answered with an unexpected reply: {shown}", transport.peer()))
}

fn count(transport: &Arc<dyn WireTransport>, n: u64) -> Result<usize> {
    usize::try_from(n).map_err(|_| unexpected(transport, &Reply::Count(n)))
}

fn s(text: &str) -> String {
    text.to_string()
}

#[async_trait]
impl Connection for WireConnection {
    fn uri(&self) -> &str {
        &self.uri
    }
    fn capabilities(&self) -> DriverCapabilities {
        self.capabilities.clone()
    }
    async fn list_domains(&self) -> Result<Vec<DomainSummary>> {
        expect_reply!(self.transport, Call::ListDomains, Domains)
    }
    async fn define_xml(&self, xml: &str, flags: DefineFlags) -> Result<DefineOutcome> {
        expect_reply!(self.transport, Call::DefineXml { xml: s(xml), flags }, Defined)
    }
    async fn undefine(&self, name: &str, flags: UndefineFlags) -> Result<()> {
        expect_reply!(self.transport, Call::Undefine { domain: s(name), flags })
    }
    async fn domain_info(&self, name: &str) -> Result<DomainInfo> {
        expect_reply!(self.transport, Call::DomainInfo { domain: s(name) }, DomainInfo)
    }
    async fn start(&self, name: &str, flags: StartFlags) -> Result<StartOutcome> {
        expect_reply!(self.transport, Call::Start { domain: s(name), flags }, Started)
    }
    async fn destroy(&self, name: &str) -> Result<()> {
        expect_reply!(self.transport, Call::Destroy { domain: s(name) })
    }
    async fn shutdown(&self, name: &str) -> Result<()> {
        expect_reply!(self.transport, Call::Shutdown { domain: s(name) })
    }
    async fn suspend(&self, name: &str) -> Result<()> {
        expect_reply!(self.transport, Call::Suspend { domain: s(name) })
    }
    async fn resume(&self, name: &str) -> Result<()> {
        expect_reply!(self.transport, Call::Resume { domain: s(name) })
    }
    async fn dump_xml(&self, name: &str, flags: DumpXmlFlags) -> Result<String> {
        expect_reply!(self.transport, Call::DumpXml { domain: s(name), flags }, Text)
    }
    async fn check_chains(&self, name: &str, disk: Option<&str>, fix: bool) -> Result<Vec<DiskChainCheck>> {
        expect_reply!(self.transport, Call::CheckChains { domain: s(name), disk: disk.map(s), fix }, ChainChecks)
    }
    async fn next_event(&self, domain: &str, timeout_ms: u64) -> Result<Option<DomainEvent>> {
        self.transport.next_event(domain, timeout_ms).await
    }
    async fn vcpu_info(&self, name: &str) -> Result<Vec<VcpuInfo>> {
        expect_reply!(self.transport, Call::VcpuInfo { domain: s(name) }, Vcpus)
    }
    async fn attach_interface(&self, name: &str, xml: &str, scope: PinScope) -> Result<()> {
        expect_reply!(self.transport, Call::AttachInterface { domain: s(name), xml: s(xml), scope })
    }
    async fn detach_interface(&self, name: &str, iface_type: &str, mac: Option<&str>, scope: PinScope) -> Result<()> {
        let call = Call::DetachInterface { domain: s(name), iface_type: s(iface_type), mac: mac.map(s), scope };
        expect_reply!(self.transport, call)
    }
    fn snapshots(&self) -> Option<&dyn SnapshotOps> {
        let kinds = self.capabilities.snapshots.kinds;
        (kinds.internal_disk || kinds.external_disk || kinds.internal_memory || kinds.external_memory)
            .then_some(self as &dyn SnapshotOps)
    }
    fn block_jobs(&self) -> Option<&dyn BlockJobOps> {
        let kinds = self.capabilities.block_jobs.kinds;
        (kinds.pull || kinds.intermediate_commit || kinds.active_commit || kinds.copy)
            .then_some(self as &dyn BlockJobOps)
    }
    fn disk_sets(&self) -> Option<&dyn DiskSetOps> {
        self.capabilities.storage.disk_sets.then_some(self as &dyn DiskSetOps)
    }
    fn storage_pools(&self) -> Option<Box<dyn StoragePoolOps>> {
        self.capabilities
            .storage
            .storage_pools
            .then(|| Box::new(WirePools(Arc::clone(&self.transport))) as Box<dyn StoragePoolOps>)
    }
    fn monitor(&self) -> Option<&dyn MonitorOps> {
        self.capabilities.domains.monitor.then_some(self as &dyn MonitorOps)
    }
    fn cpu_placement(&self) -> Option<&dyn CpuPlacementOps> {
        self.capabilities.domains.cpu_placement.then_some(self as &dyn CpuPlacementOps)
    }
    fn save_migrate(&self) -> Option<&dyn SaveMigrateOps> {
        let domains = &self.capabilities.domains;
        (domains.save_restore || domains.migration).then_some(self as &dyn SaveMigrateOps)
    }
}

#[async_trait]
impl SaveMigrateOps for WireConnection {
    async fn save(&self, domain: &str, file: &str, opts: &SaveOptions) -> Result<()> {
        expect_reply!(self.transport, Call::Save { domain: s(domain), file: s(file), options: opts.clone() })
    }
    async fn restore(&self, file: &str, xml: Option<&str>, flags: SaveFlags) -> Result<String> {
        expect_reply!(self.transport, Call::Restore { file: s(file), xml: xml.map(s), flags }, Text)
    }
    async fn save_image_xml(&self, file: &str) -> Result<String> {
        expect_reply!(self.transport, Call::SaveImageXml { file: s(file) }, Text)
    }
    async fn managed_save(&self, domain: &str, opts: &SaveOptions) -> Result<()> {
        expect_reply!(self.transport, Call::ManagedSave { domain: s(domain), options: opts.clone() })
    }
    async fn managed_save_remove(&self, domain: &str) -> Result<()> {
        expect_reply!(self.transport, Call::ManagedSaveRemove { domain: s(domain) })
    }
    async fn job_info(&self, domain: &str) -> Result<Option<DomainJobInfo>> {
        expect_reply!(self.transport, Call::DomainJobInfo { domain: s(domain) }, DomainJobInfo)
    }
    async fn job_abort(&self, domain: &str) -> Result<()> {
        expect_reply!(self.transport, Call::DomainJobAbort { domain: s(domain) })
    }
    async fn migrate(&self, domain: &str, dest_uri: &str, opts: &MigrateOptions) -> Result<()> {
        expect_reply!(self.transport, Call::Migrate { domain: s(domain), dest_uri: s(dest_uri), options: opts.clone() })
    }
    async fn migrate_check(&self, incoming: &IncomingMigration) -> Result<()> {
        expect_reply!(self.transport, Call::MigrateCheck { incoming: incoming.clone() })
    }
    async fn migrate_prepare(&self, incoming: &IncomingMigration) -> Result<PreparedMigration> {
        expect_reply!(self.transport, Call::MigratePrepare { incoming: incoming.clone() }, PreparedMigration)
    }
    async fn migrate_finish(&self, domain: &str, resume: bool) -> Result<()> {
        expect_reply!(self.transport, Call::MigrateFinish { domain: s(domain), resume })
    }
    async fn migrate_cleanup(&self, domain: &str, uuid: Option<&str>, images: &[String]) -> Result<()> {
        let call = Call::MigrateCleanup { domain: s(domain), uuid: uuid.map(s), images: images.to_vec() };
        expect_reply!(self.transport, call)
    }
}

#[async_trait]
impl SnapshotOps for WireConnection {
    async fn snapshot_create(&self, domain: &str, xml: &str, flags: SnapshotCreateFlags) -> Result<String> {
        expect_reply!(self.transport, Call::SnapshotCreate { domain: s(domain), xml: s(xml), flags }, Text)
    }
    async fn snapshot_list(&self, domain: &str) -> Result<Vec<SnapshotSummary>> {
        expect_reply!(self.transport, Call::SnapshotList { domain: s(domain) }, Snapshots)
    }
    async fn snapshot_xml(&self, domain: &str, snapshot: &str) -> Result<String> {
        expect_reply!(self.transport, Call::SnapshotXml { domain: s(domain), snapshot: s(snapshot) }, Text)
    }
    async fn snapshot_set_current(&self, domain: &str, snapshot: &str) -> Result<()> {
        expect_reply!(self.transport, Call::SnapshotSetCurrent { domain: s(domain), snapshot: s(snapshot) })
    }
    async fn snapshot_revert(&self, domain: &str, snapshot: &str, flags: SnapshotRevertFlags) -> Result<()> {
        expect_reply!(self.transport, Call::SnapshotRevert { domain: s(domain), snapshot: s(snapshot), flags })
    }
    async fn snapshot_delete(&self, domain: &str, snapshot: &str, flags: SnapshotDeleteFlags) -> Result<Vec<String>> {
        expect_reply!(self.transport, Call::SnapshotDelete { domain: s(domain), snapshot: s(snapshot), flags }, Lines)
    }
}

#[async_trait]
impl BlockJobOps for WireConnection {
    async fn block_pull(&self, domain: &str, disk: &str, opts: &BlockPullOptions) -> Result<()> {
        expect_reply!(self.transport, Call::BlockPull { domain: s(domain), disk: s(disk), options: opts.clone() })
    }
    async fn block_commit(&self, domain: &str, disk: &str, opts: &BlockCommitOptions) -> Result<BlockJobKind> {
        let call = Call::BlockCommit { domain: s(domain), disk: s(disk), options: opts.clone() };
        expect_reply!(self.transport, call, BlockJobKind)
    }
    async fn block_copy(&self, domain: &str, disk: &str, opts: &BlockCopyOptions) -> Result<Vec<String>> {
        expect_reply!(
            self.transport,
            Call::BlockCopy { domain: s(domain), disk: s(disk), options: opts.clone() },
            Lines
        )
    }
    async fn block_job_info(&self, domain: &str, disk: &str) -> Result<Option<BlockJobInfo>> {
        expect_reply!(self.transport, Call::BlockJobInfo { domain: s(domain), disk: s(disk) }, BlockJobInfo)
    }
    async fn block_job_abort(&self, domain: &str, disk: &str, flags: BlockJobAbortFlags) -> Result<BlockJobEnd> {
        expect_reply!(self.transport, Call::BlockJobAbort { domain: s(domain), disk: s(disk), flags }, BlockJobEnd)
    }
    async fn block_job_set_speed(&self, domain: &str, disk: &str, bytes_per_sec: u64) -> Result<()> {
        expect_reply!(self.transport, Call::BlockJobSetSpeed { domain: s(domain), disk: s(disk), bytes_per_sec })
    }
    async fn block_job_wait(&self, domain: &str, disk: &str, timeout_ms: u64) -> Result<BlockJobState> {
        expect_reply!(
            self.transport,
            Call::BlockJobWait { domain: s(domain), disk: s(disk), timeout_ms },
            BlockJobState
        )
    }
}

#[async_trait]
impl DiskSetOps for WireConnection {
    async fn diskset_add(&self, domain: &str, disk: &str) -> Result<DiskSetOutcome> {
        expect_reply!(self.transport, Call::DisksetAdd { domain: s(domain), disk: s(disk) }, DiskSetOutcome)
    }
    async fn diskset_remove(&self, domain: &str, disk: &str) -> Result<DiskSetOutcome> {
        expect_reply!(self.transport, Call::DisksetRemove { domain: s(domain), disk: s(disk) }, DiskSetOutcome)
    }
    async fn diskset_add_all(&self, domain: &str) -> Result<usize> {
        count(&self.transport, expect_reply!(self.transport, Call::DisksetAddAll { domain: s(domain) }, Count)?)
    }
    async fn diskset_remove_all(&self, domain: &str) -> Result<usize> {
        count(&self.transport, expect_reply!(self.transport, Call::DisksetRemoveAll { domain: s(domain) }, Count)?)
    }
    async fn diskset_list(&self, domain: &str) -> Result<Vec<String>> {
        expect_reply!(self.transport, Call::DisksetList { domain: s(domain) }, Lines)
    }
    async fn diskset_size(&self, domain: &str) -> Result<usize> {
        count(&self.transport, expect_reply!(self.transport, Call::DisksetSize { domain: s(domain) }, Count)?)
    }
}

#[async_trait]
impl MonitorOps for WireConnection {
    async fn monitor_command(&self, domain: &str, command: &str, human: bool) -> Result<String> {
        expect_reply!(self.transport, Call::MonitorCommand { domain: s(domain), command: s(command), human }, Text)
    }
}

#[async_trait]
impl CpuPlacementOps for WireConnection {
    async fn node_info(&self) -> Result<NodeInfo> {
        expect_reply!(self.transport, Call::NodeInfo, NodeInfo)
    }
    async fn node_cpu_map(&self) -> Result<HostCpuMap> {
        expect_reply!(self.transport, Call::NodeCpuMap, HostCpuMap)
    }
    async fn vcpu_pins(&self, domain: &str, scope: PinScope) -> Result<Vec<Vec<u32>>> {
        expect_reply!(self.transport, Call::VcpuPins { domain: s(domain), scope }, VcpuPins)
    }
    async fn pin_vcpu(&self, domain: &str, vcpu: u32, cpus: &[u32], scope: PinScope) -> Result<()> {
        expect_reply!(self.transport, Call::PinVcpu { domain: s(domain), vcpu, cpus: cpus.to_vec(), scope })
    }
    async fn emulator_pin(&self, domain: &str, scope: PinScope) -> Result<Vec<u32>> {
        expect_reply!(self.transport, Call::EmulatorPin { domain: s(domain), scope }, Cpus)
    }
    async fn pin_emulator(&self, domain: &str, cpus: &[u32], scope: PinScope) -> Result<()> {
        expect_reply!(self.transport, Call::PinEmulator { domain: s(domain), cpus: cpus.to_vec(), scope })
    }
    async fn vcpu_counts(&self, domain: &str) -> Result<VcpuCounts> {
        expect_reply!(self.transport, Call::VcpuCounts { domain: s(domain) }, VcpuCounts)
    }
    async fn set_vcpus(&self, domain: &str, count: u32, scope: PinScope, maximum: bool) -> Result<()> {
        expect_reply!(self.transport, Call::SetVcpus { domain: s(domain), count, scope, maximum })
    }
}

/// The storage pools of a connection over the wire.
struct WirePools(Arc<dyn WireTransport>);

#[async_trait]
impl StoragePoolOps for WirePools {
    async fn pool_define_xml(&self, xml: &str) -> Result<String> {
        expect_reply!(self.0, Call::PoolDefineXml { xml: s(xml) }, Text)
    }
    async fn pool_undefine(&self, pool: &str) -> Result<()> {
        expect_reply!(self.0, Call::PoolUndefine { pool: s(pool) })
    }
    async fn pool_build(&self, pool: &str, flags: PoolBuildFlags) -> Result<()> {
        expect_reply!(self.0, Call::PoolBuild { pool: s(pool), flags })
    }
    async fn pool_start(&self, pool: &str) -> Result<()> {
        expect_reply!(self.0, Call::PoolStart { pool: s(pool) })
    }
    async fn pool_destroy(&self, pool: &str) -> Result<()> {
        expect_reply!(self.0, Call::PoolDestroy { pool: s(pool) })
    }
    async fn pool_refresh(&self, pool: &str) -> Result<()> {
        expect_reply!(self.0, Call::PoolRefresh { pool: s(pool) })
    }
    async fn pool_list(&self) -> Result<Vec<PoolInfo>> {
        expect_reply!(self.0, Call::PoolList, Pools)
    }
    async fn pool_info(&self, pool: &str) -> Result<PoolInfo> {
        expect_reply!(self.0, Call::PoolInfo { pool: s(pool) }, Pool)
    }
    async fn pool_xml(&self, pool: &str, inactive: bool) -> Result<String> {
        expect_reply!(self.0, Call::PoolXml { pool: s(pool), inactive }, Text)
    }
    async fn pool_set_autostart(&self, pool: &str, autostart: bool) -> Result<()> {
        expect_reply!(self.0, Call::PoolSetAutostart { pool: s(pool), autostart })
    }
    async fn vol_list(&self, pool: &str) -> Result<Vec<VolumeInfo>> {
        expect_reply!(self.0, Call::VolList { pool: s(pool) }, Volumes)
    }
    async fn vol_info(&self, pool: Option<&str>, volume: &str) -> Result<VolumeInfo> {
        expect_reply!(self.0, Call::VolInfo { pool: pool.map(s), volume: s(volume) }, Volume)
    }
    async fn vol_xml(&self, pool: Option<&str>, volume: &str) -> Result<String> {
        expect_reply!(self.0, Call::VolXml { pool: pool.map(s), volume: s(volume) }, Text)
    }
    async fn vol_create_xml(&self, pool: &str, xml: &str) -> Result<String> {
        expect_reply!(self.0, Call::VolCreateXml { pool: s(pool), xml: s(xml) }, Text)
    }
    async fn vol_delete(&self, pool: Option<&str>, volume: &str) -> Result<()> {
        expect_reply!(self.0, Call::VolDelete { pool: pool.map(s), volume: s(volume) })
    }
    async fn vol_resize(&self, pool: Option<&str>, volume: &str, bytes: u64, flags: VolumeResizeFlags) -> Result<u64> {
        expect_reply!(self.0, Call::VolResize { pool: pool.map(s), volume: s(volume), bytes, flags }, Bytes)
    }
    async fn vol_clone(&self, pool: Option<&str>, volume: &str, new_name: &str) -> Result<()> {
        expect_reply!(self.0, Call::VolClone { pool: pool.map(s), volume: s(volume), new_name: s(new_name) })
    }
}
