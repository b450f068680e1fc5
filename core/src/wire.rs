//! The driver traits as plain data, for a driver behind a C ABI or on
//! another host.
//!
//! Every method of [`Connection`] and of its capability traits is one
//! [`Call`] variant (its arguments as owned values, flags as bit sets) and
//! its result one [`Reply`] variant; an error is an [`ErrorPayload`].
//! [`dispatch`] performs a call on a connection, and [`dispatch_json`] does
//! the same for a JSON request in a versioned envelope, which is what a
//! plugin's `call` carries (see [`crate::plugin`]) and a remote `strata`
//! reads, a line each (see [`crate::remote`]). Nothing waits for the
//! other side: events and block-job progress are asked for with a timeout
//! ([`Call::NextEvent`], [`Call::BlockJobWait`]); a plugin driver pushes its
//! events instead, through a callback record the host owns.

use serde::{Deserialize, Serialize};

use crate::capabilities::DriverCapabilities;
use crate::driver::{
    BlockJobEnd, BlockJobInfo, BlockJobKind, BlockJobState, Connection, DefineFlags, DefineOutcome, DiskChainCheck,
    DiskSetOutcome, DomainEvent, DomainInfo, DomainJobInfo, DomainSummary, DumpXmlFlags, IncomingMigration,
    MigrateOptions, NetworkCreated, NetworkInfo, NetworkLease, PinScope, PoolBuildFlags, PoolInfo, PreparedMigration,
    SaveFlags, SaveOptions, SnapshotSummary, StartFlags, StartOutcome, UndefineFlags, VcpuCounts, VcpuInfo, VolumeInfo,
    VolumeResizeFlags,
};
use crate::error::{Error, ErrorKind, ErrorPayload, Result};
use crate::hostcpu::{HostCpuMap, NodeInfo};
use crate::options::{
    BlockCommitOptions, BlockCopyOptions, BlockJobAbortFlags, BlockPullOptions, SnapshotCreateFlags,
    SnapshotDeleteFlags, SnapshotRevertFlags,
};

/// The version of the envelope and of [`Call`] and [`Reply`], which is the
/// plugin C ABI's version (`strata-plugin-abi`). It changes when a change
/// would make an older peer misread a message; a side refuses a message of
/// another version.
pub const ABI_VERSION: u32 = strata_plugin_abi::STRATA_ABI_VERSION;

/// One trait method with its arguments, named as the method is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", content = "args", rename_all = "snake_case")]
pub enum Call {
    // Connection
    Uri,
    Capabilities,
    ListDomains,
    DefineXml { xml: String, flags: DefineFlags },
    Undefine { domain: String, flags: UndefineFlags },
    DomainInfo { domain: String },
    Start { domain: String, flags: StartFlags },
    Destroy { domain: String },
    Shutdown { domain: String },
    Suspend { domain: String },
    Resume { domain: String },
    DumpXml { domain: String, flags: DumpXmlFlags },
    EnterNamespace { domain: String, command: Vec<String> },
    CheckChains { domain: String, disk: Option<String>, fix: bool },
    NextEvent { domain: String, timeout_ms: u64 },
    VcpuInfo { domain: String },
    AttachInterface { domain: String, xml: String, scope: PinScope },
    DetachInterface { domain: String, iface_type: String, mac: Option<String>, scope: PinScope },
    // SnapshotOps
    SnapshotCreate { domain: String, xml: String, flags: SnapshotCreateFlags },
    SnapshotList { domain: String },
    SnapshotXml { domain: String, snapshot: String },
    SnapshotSetCurrent { domain: String, snapshot: String },
    SnapshotProgress { domain: String },
    SnapshotRevert { domain: String, snapshot: String, flags: SnapshotRevertFlags },
    SnapshotDelete { domain: String, snapshot: String, flags: SnapshotDeleteFlags },
    // BlockJobOps
    BlockPull { domain: String, disk: String, options: BlockPullOptions },
    BlockCommit { domain: String, disk: String, options: BlockCommitOptions },
    BlockCopy { domain: String, disk: String, options: BlockCopyOptions },
    BlockJobInfo { domain: String, disk: String },
    BlockJobAbort { domain: String, disk: String, flags: BlockJobAbortFlags },
    BlockJobSetSpeed { domain: String, disk: String, bytes_per_sec: u64 },
    BlockJobWait { domain: String, disk: String, timeout_ms: u64 },
    // DiskSetOps
    DisksetAdd { domain: String, disk: String },
    DisksetRemove { domain: String, disk: String },
    DisksetAddAll { domain: String },
    DisksetRemoveAll { domain: String },
    DisksetList { domain: String },
    DisksetSize { domain: String },
    // MonitorOps
    MonitorCommand { domain: String, command: String, human: bool },
    // CpuPlacementOps
    NodeInfo,
    NodeCpuMap,
    VcpuPins { domain: String, scope: PinScope },
    PinVcpu { domain: String, vcpu: u32, cpus: Vec<u32>, scope: PinScope },
    EmulatorPin { domain: String, scope: PinScope },
    PinEmulator { domain: String, cpus: Vec<u32>, scope: PinScope },
    VcpuCounts { domain: String },
    SetVcpus { domain: String, count: u32, scope: PinScope, maximum: bool },
    // SaveMigrateOps
    Save { domain: String, file: String, options: SaveOptions },
    Restore { file: String, xml: Option<String>, flags: SaveFlags },
    SaveImageXml { file: String },
    ManagedSave { domain: String, options: SaveOptions },
    ManagedSaveRemove { domain: String },
    DomainJobInfo { domain: String },
    DomainJobAbort { domain: String },
    Migrate { domain: String, dest_uri: String, options: MigrateOptions },
    MigrateCheck { incoming: IncomingMigration },
    MigratePrepare { incoming: IncomingMigration },
    MigrateFinish { domain: String, resume: bool },
    MigrateCleanup { domain: String, uuid: Option<String>, images: Vec<String> },
    // StoragePoolOps; a volume without a pool is named by its path.
    PoolDefineXml { xml: String },
    PoolUndefine { pool: String },
    PoolBuild { pool: String, flags: PoolBuildFlags },
    PoolStart { pool: String },
    PoolDestroy { pool: String },
    PoolRefresh { pool: String },
    PoolList,
    PoolInfo { pool: String },
    PoolXml { pool: String, inactive: bool },
    PoolSetAutostart { pool: String, autostart: bool },
    VolList { pool: String },
    VolInfo { pool: Option<String>, volume: String },
    VolXml { pool: Option<String>, volume: String },
    VolCreateXml { pool: String, xml: String },
    VolDelete { pool: Option<String>, volume: String },
    VolResize { pool: Option<String>, volume: String, bytes: u64, flags: VolumeResizeFlags },
    VolClone { pool: Option<String>, volume: String, new_name: String },
    // NetworkOps
    NetDefineXml { xml: String },
    NetCreateXml { xml: String },
    NetDhcpLeases { network: String },
    NetUndefine { network: String },
    NetStart { network: String },
    NetDestroy { network: String },
    NetList,
    NetInfo { network: String },
    NetXml { network: String },
    NetSetAutostart { network: String, autostart: bool },
}

/// A method's result, one variant per result type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", content = "value", rename_all = "snake_case")]
pub enum Reply {
    /// The method returns nothing.
    Done,
    /// A URI, an XML document, a name the driver chose, a monitor's reply.
    Text(String),
    /// Lines to show (a delete's account, a copy's warnings) or disk names.
    Lines(Vec<String>),
    /// A number of disks.
    Count(u64),
    /// A volume's new capacity.
    Bytes(u64),
    /// The exit status of a command run in a domain.
    ExitStatus(i32),
    /// How far an operation has gone, when the driver knows.
    Percent(Option<u32>),
    Capabilities(Box<DriverCapabilities>),
    Domains(Vec<DomainSummary>),
    Defined(DefineOutcome),
    DomainInfo(DomainInfo),
    Started(StartOutcome),
    ChainChecks(Vec<DiskChainCheck>),
    Event(Option<DomainEvent>),
    Vcpus(Vec<VcpuInfo>),
    Snapshots(Vec<SnapshotSummary>),
    BlockJobKind(BlockJobKind),
    BlockJobInfo(Option<BlockJobInfo>),
    BlockJobEnd(BlockJobEnd),
    BlockJobState(BlockJobState),
    DiskSetOutcome(DiskSetOutcome),
    NodeInfo(NodeInfo),
    HostCpuMap(HostCpuMap),
    /// The host CPUs each vCPU may run on, in vCPU order.
    VcpuPins(Vec<Vec<u32>>),
    /// The host CPUs the emulator's threads may run on.
    Cpus(Vec<u32>),
    VcpuCounts(VcpuCounts),
    DomainJobInfo(Option<DomainJobInfo>),
    PreparedMigration(PreparedMigration),
    Pools(Vec<PoolInfo>),
    Pool(PoolInfo),
    Volumes(Vec<VolumeInfo>),
    Volume(VolumeInfo),
    Networks(Vec<NetworkInfo>),
    Network(NetworkInfo),
    NetworkCreated(NetworkCreated),
    NetworkLeases(Vec<NetworkLease>),
}

/// Performs `call` on `conn`. A capability the connection lacks gives the
/// same no-support error the command line shows.
pub async fn dispatch(conn: &dyn Connection, call: Call) -> std::result::Result<Reply, ErrorPayload> {
    perform(conn, call).await.map_err(ErrorPayload::from)
}

async fn perform(conn: &dyn Connection, call: Call) -> Result<Reply> {
    // A method that returns nothing answers Done; a count crosses as a
    // u64, whatever either side's usize is.
    let done = |()| Reply::Done;
    let count = |n: usize| Reply::Count(n as u64);
    Ok(match call {
        Call::Uri => Reply::Text(conn.uri().to_string()),
        Call::Capabilities => Reply::Capabilities(Box::new(conn.capabilities())),
        Call::ListDomains => Reply::Domains(conn.list_domains().await?),
        Call::DefineXml { xml, flags } => Reply::Defined(conn.define_xml(&xml, flags).await?),
        Call::Undefine { domain, flags } => done(conn.undefine(&domain, flags).await?),
        Call::DomainInfo { domain } => Reply::DomainInfo(conn.domain_info(&domain).await?),
        Call::Start { domain, flags } => Reply::Started(conn.start(&domain, flags).await?),
        Call::Destroy { domain } => done(conn.destroy(&domain).await?),
        Call::Shutdown { domain } => done(conn.shutdown(&domain).await?),
        Call::Suspend { domain } => done(conn.suspend(&domain).await?),
        Call::Resume { domain } => done(conn.resume(&domain).await?),
        Call::DumpXml { domain, flags } => Reply::Text(conn.dump_xml(&domain, flags).await?),
        Call::EnterNamespace { domain, command } => Reply::ExitStatus(conn.enter_namespace(&domain, &command).await?),
        Call::CheckChains { domain, disk, fix } => {
            Reply::ChainChecks(conn.check_chains(&domain, disk.as_deref(), fix).await?)
        }
        Call::NextEvent { domain, timeout_ms } => Reply::Event(conn.next_event(&domain, timeout_ms).await?),
        Call::VcpuInfo { domain } => Reply::Vcpus(conn.vcpu_info(&domain).await?),
        Call::AttachInterface { domain, xml, scope } => done(conn.attach_interface(&domain, &xml, scope).await?),
        Call::DetachInterface { domain, iface_type, mac, scope } => {
            done(conn.detach_interface(&domain, &iface_type, mac.as_deref(), scope).await?)
        }

        Call::SnapshotCreate { domain, xml, flags } => {
            Reply::Text(conn.require_snapshots()?.snapshot_create(&domain, &xml, flags).await?)
        }
        Call::SnapshotList { domain } => Reply::Snapshots(conn.require_snapshots()?.snapshot_list(&domain).await?),
        Call::SnapshotXml { domain, snapshot } => {
            Reply::Text(conn.require_snapshots()?.snapshot_xml(&domain, &snapshot).await?)
        }
        Call::SnapshotSetCurrent { domain, snapshot } => {
            done(conn.require_snapshots()?.snapshot_set_current(&domain, &snapshot).await?)
        }
        Call::SnapshotProgress { domain } => {
            Reply::Percent(conn.require_snapshots()?.snapshot_progress(&domain).await?)
        }
        Call::SnapshotRevert { domain, snapshot, flags } => {
            done(conn.require_snapshots()?.snapshot_revert(&domain, &snapshot, flags).await?)
        }
        Call::SnapshotDelete { domain, snapshot, flags } => {
            Reply::Lines(conn.require_snapshots()?.snapshot_delete(&domain, &snapshot, flags).await?)
        }

        Call::BlockPull { domain, disk, options } => {
            done(conn.require_block_jobs()?.block_pull(&domain, &disk, &options).await?)
        }
        Call::BlockCommit { domain, disk, options } => {
            Reply::BlockJobKind(conn.require_block_jobs()?.block_commit(&domain, &disk, &options).await?)
        }
        Call::BlockCopy { domain, disk, options } => {
            Reply::Lines(conn.require_block_jobs()?.block_copy(&domain, &disk, &options).await?)
        }
        Call::BlockJobInfo { domain, disk } => {
            Reply::BlockJobInfo(conn.require_block_jobs()?.block_job_info(&domain, &disk).await?)
        }
        Call::BlockJobAbort { domain, disk, flags } => {
            Reply::BlockJobEnd(conn.require_block_jobs()?.block_job_abort(&domain, &disk, flags).await?)
        }
        Call::BlockJobSetSpeed { domain, disk, bytes_per_sec } => {
            done(conn.require_block_jobs()?.block_job_set_speed(&domain, &disk, bytes_per_sec).await?)
        }
        Call::BlockJobWait { domain, disk, timeout_ms } => {
            Reply::BlockJobState(conn.require_block_jobs()?.block_job_wait(&domain, &disk, timeout_ms).await?)
        }

        Call::DisksetAdd { domain, disk } => {
            Reply::DiskSetOutcome(conn.require_disk_sets()?.diskset_add(&domain, &disk).await?)
        }
        Call::DisksetRemove { domain, disk } => {
            Reply::DiskSetOutcome(conn.require_disk_sets()?.diskset_remove(&domain, &disk).await?)
        }
        Call::DisksetAddAll { domain } => count(conn.require_disk_sets()?.diskset_add_all(&domain).await?),
        Call::DisksetRemoveAll { domain } => count(conn.require_disk_sets()?.diskset_remove_all(&domain).await?),
        Call::DisksetList { domain } => Reply::Lines(conn.require_disk_sets()?.diskset_list(&domain).await?),
        Call::DisksetSize { domain } => count(conn.require_disk_sets()?.diskset_size(&domain).await?),

        Call::MonitorCommand { domain, command, human } => {
            Reply::Text(conn.require_monitor()?.monitor_command(&domain, &command, human).await?)
        }

        Call::NodeInfo => Reply::NodeInfo(conn.require_cpu_placement()?.node_info().await?),
        Call::NodeCpuMap => Reply::HostCpuMap(conn.require_cpu_placement()?.node_cpu_map().await?),
        Call::VcpuPins { domain, scope } => {
            Reply::VcpuPins(conn.require_cpu_placement()?.vcpu_pins(&domain, scope).await?)
        }
        Call::PinVcpu { domain, vcpu, cpus, scope } => {
            done(conn.require_cpu_placement()?.pin_vcpu(&domain, vcpu, &cpus, scope).await?)
        }
        Call::EmulatorPin { domain, scope } => {
            Reply::Cpus(conn.require_cpu_placement()?.emulator_pin(&domain, scope).await?)
        }
        Call::PinEmulator { domain, cpus, scope } => {
            done(conn.require_cpu_placement()?.pin_emulator(&domain, &cpus, scope).await?)
        }
        Call::VcpuCounts { domain } => Reply::VcpuCounts(conn.require_cpu_placement()?.vcpu_counts(&domain).await?),
        Call::SetVcpus { domain, count, scope, maximum } => {
            done(conn.require_cpu_placement()?.set_vcpus(&domain, count, scope, maximum).await?)
        }

        Call::Save { domain, file, options } => {
            done(conn.require_save_migrate()?.save(&domain, &file, &options).await?)
        }
        Call::Restore { file, xml, flags } => {
            Reply::Text(conn.require_save_migrate()?.restore(&file, xml.as_deref(), flags).await?)
        }
        Call::SaveImageXml { file } => Reply::Text(conn.require_save_migrate()?.save_image_xml(&file).await?),
        Call::ManagedSave { domain, options } => {
            done(conn.require_save_migrate()?.managed_save(&domain, &options).await?)
        }
        Call::ManagedSaveRemove { domain } => done(conn.require_save_migrate()?.managed_save_remove(&domain).await?),
        Call::DomainJobInfo { domain } => Reply::DomainJobInfo(conn.require_save_migrate()?.job_info(&domain).await?),
        Call::DomainJobAbort { domain } => done(conn.require_save_migrate()?.job_abort(&domain).await?),
        Call::Migrate { domain, dest_uri, options } => {
            done(conn.require_save_migrate()?.migrate(&domain, &dest_uri, &options).await?)
        }
        Call::MigrateCheck { incoming } => done(conn.require_save_migrate()?.migrate_check(&incoming).await?),
        Call::MigratePrepare { incoming } => {
            Reply::PreparedMigration(conn.require_save_migrate()?.migrate_prepare(&incoming).await?)
        }
        Call::MigrateFinish { domain, resume } => {
            done(conn.require_save_migrate()?.migrate_finish(&domain, resume).await?)
        }
        Call::MigrateCleanup { domain, uuid, images } => {
            done(conn.require_save_migrate()?.migrate_cleanup(&domain, uuid.as_deref(), &images).await?)
        }

        Call::PoolDefineXml { xml } => Reply::Text(conn.require_storage_pools()?.pool_define_xml(&xml).await?),
        Call::PoolUndefine { pool } => done(conn.require_storage_pools()?.pool_undefine(&pool).await?),
        Call::PoolBuild { pool, flags } => done(conn.require_storage_pools()?.pool_build(&pool, flags).await?),
        Call::PoolStart { pool } => done(conn.require_storage_pools()?.pool_start(&pool).await?),
        Call::PoolDestroy { pool } => done(conn.require_storage_pools()?.pool_destroy(&pool).await?),
        Call::PoolRefresh { pool } => done(conn.require_storage_pools()?.pool_refresh(&pool).await?),
        Call::PoolList => Reply::Pools(conn.require_storage_pools()?.pool_list().await?),
        Call::PoolInfo { pool } => Reply::Pool(conn.require_storage_pools()?.pool_info(&pool).await?),
        Call::PoolXml { pool, inactive } => Reply::Text(conn.require_storage_pools()?.pool_xml(&pool, inactive).await?),
        Call::PoolSetAutostart { pool, autostart } => {
            done(conn.require_storage_pools()?.pool_set_autostart(&pool, autostart).await?)
        }
        Call::VolList { pool } => Reply::Volumes(conn.require_storage_pools()?.vol_list(&pool).await?),
        Call::VolInfo { pool, volume } => {
            Reply::Volume(conn.require_storage_pools()?.vol_info(pool.as_deref(), &volume).await?)
        }
        Call::VolXml { pool, volume } => {
            Reply::Text(conn.require_storage_pools()?.vol_xml(pool.as_deref(), &volume).await?)
        }
        Call::VolCreateXml { pool, xml } => {
            Reply::Text(conn.require_storage_pools()?.vol_create_xml(&pool, &xml).await?)
        }
        Call::VolDelete { pool, volume } => {
            done(conn.require_storage_pools()?.vol_delete(pool.as_deref(), &volume).await?)
        }
        Call::VolResize { pool, volume, bytes, flags } => {
            Reply::Bytes(conn.require_storage_pools()?.vol_resize(pool.as_deref(), &volume, bytes, flags).await?)
        }
        Call::VolClone { pool, volume, new_name } => {
            done(conn.require_storage_pools()?.vol_clone(pool.as_deref(), &volume, &new_name).await?)
        }
        Call::NetDefineXml { xml } => Reply::Text(conn.require_networks()?.net_define_xml(&xml).await?),
        Call::NetCreateXml { xml } => Reply::NetworkCreated(conn.require_networks()?.net_create_xml(&xml).await?),
        Call::NetDhcpLeases { network } => {
            Reply::NetworkLeases(conn.require_networks()?.net_dhcp_leases(&network).await?)
        }
        Call::NetUndefine { network } => done(conn.require_networks()?.net_undefine(&network).await?),
        Call::NetStart { network } => Reply::Lines(conn.require_networks()?.net_start(&network).await?),
        Call::NetDestroy { network } => done(conn.require_networks()?.net_destroy(&network).await?),
        Call::NetList => Reply::Networks(conn.require_networks()?.net_list().await?),
        Call::NetInfo { network } => Reply::Network(conn.require_networks()?.net_info(&network).await?),
        Call::NetXml { network } => Reply::Text(conn.require_networks()?.net_xml(&network).await?),
        Call::NetSetAutostart { network, autostart } => {
            done(conn.require_networks()?.net_set_autostart(&network, autostart).await?)
        }
    })
}

/// A call in its envelope: `{"abi": 1, "call": {"method": "domain_info", "args": {"domain": "vm1"}}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub abi: u32,
    pub call: Call,
}

impl Request {
    /// `call` in an envelope of this side's version.
    pub fn new(call: Call) -> Request {
        Request { abi: ABI_VERSION, call }
    }
}

/// A reply in its envelope: `{"abi": 1, "reply": {...}}` or `{"abi": 1, "error": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub abi: u32,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// What a call came to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Reply(Reply),
    Error(ErrorPayload),
}

/// An envelope whose version is read before its contents, so a message of
/// another version is refused as such rather than misread.
#[derive(Deserialize)]
struct Envelope<T> {
    abi: u32,
    #[serde(flatten)]
    body: T,
}

/// Performs the call of a JSON [`Request`] and gives the JSON [`Response`]:
/// what a plugin's C entry point wraps. A request of another ABI version,
/// or one that does not parse, is answered with an error.
pub async fn dispatch_json(conn: &dyn Connection, request: &str) -> String {
    let outcome = match read_envelope::<CallBody>(request, "request") {
        Ok(body) => match dispatch(conn, body.call).await {
            Ok(reply) => Outcome::Reply(reply),
            Err(payload) => Outcome::Error(payload),
        },
        Err(err) => Outcome::Error(err.into()),
    };
    encode_response(&Response { abi: ABI_VERSION, outcome })
}

/// The host's side of [`dispatch_json`]: the reply a JSON [`Response`]
/// carries, or its error; a response of another ABI version is refused.
pub fn read_response(response: &str) -> std::result::Result<Reply, ErrorPayload> {
    match read_envelope::<Outcome>(response, "response").map_err(ErrorPayload::from)? {
        Outcome::Reply(reply) => Ok(reply),
        Outcome::Error(payload) => Err(payload),
    }
}

#[derive(Deserialize)]
struct CallBody {
    call: Call,
}

fn read_envelope<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T> {
    let unreadable = |e: serde_json::Error| Error::invalid_arg(format!("cannot read the plugin {what}: {e}"));
    let envelope: Envelope<serde_json::Value> = serde_json::from_str(text).map_err(unreadable)?;
    if envelope.abi != ABI_VERSION {
        return Err(Error::new(
            ErrorKind::ArgumentUnsupported,
            format!("plugin {what} of ABI version {}, but this side speaks version {ABI_VERSION}", envelope.abi),
        ));
    }
    serde_json::from_value(envelope.body).map_err(unreadable)
}

fn encode_response(response: &Response) -> String {
    serde_json::to_string(response).unwrap_or_else(|e| {
        let payload = ErrorPayload::from(Error::internal(format!("cannot encode the plugin response: {e}")));
        serde_json::json!({ "abi": ABI_VERSION, "error": payload }).to_string()
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::fmt::Debug;
    use std::sync::Mutex;

    use async_trait::async_trait;
    use serde::de::DeserializeOwned;
    use serde_json::json;

    use super::*;
    use crate::chain::ChainDifference;
    use crate::driver::{
        DiskCopyProgress, DomainJobOperation, DomainState, IncomingDisk, MigrateFlags, PoolState, SharedDisk,
        TcpListen, VcpuCount,
    };
    use crate::xml::Domain;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: &T) {
        let json = serde_json::to_string(value).expect("encodes");
        let back: T = serde_json::from_str(&json).expect("decodes");
        assert_eq!(&back, value, "through {json}");
    }

    fn summary(name: &str) -> DomainSummary {
        DomainSummary {
            id: None,
            name: name.to_string(),
            uuid: "7b4f2d0c-8f0e-4c47-9a55-2b1e0d3c9f11".to_string(),
            state: DomainState::Shutoff,
            reason: Some("unknown".to_string()),
            persistent: true,
            damaged: None,
        }
    }

    fn domain_info(summary: DomainSummary) -> DomainInfo {
        DomainInfo {
            summary,
            os_type: "hvm".into(),
            max_memory_kib: 1 << 20,
            used_memory_kib: 1 << 19,
            vcpus: 2,
            autostart: false,
            managed_save: false,
        }
    }

    fn job_info() -> BlockJobInfo {
        BlockJobInfo {
            kind: BlockJobKind::Copy,
            disk: "vda".into(),
            cur: 512,
            end: 1024,
            bandwidth_bytes: 0,
            ready: true,
        }
    }

    fn network_info() -> NetworkInfo {
        NetworkInfo {
            name: "default".into(),
            uuid: "5a2c1e0e-4f0b-4a53-9a3e-0c4f2b7d9e11".into(),
            active: true,
            persistent: true,
            autostart: false,
            bridge: "virbr0".into(),
        }
    }

    fn pool_info() -> PoolInfo {
        PoolInfo {
            name: "images".into(),
            uuid: "0d3c9f11-8f0e-4c47-9a55-2b1e7b4f2d0c".into(),
            pool_type: "dir".into(),
            state: PoolState::Running,
            persistent: true,
            autostart: false,
            target: "/srv/images".into(),
            capacity: Some(1 << 30),
            allocation: Some(1 << 20),
            available: None,
        }
    }

    fn volume_info() -> VolumeInfo {
        VolumeInfo {
            name: "base.qcow2".into(),
            pool: "images".into(),
            path: "/srv/images/base.qcow2".into(),
            volume_type: "file".into(),
            format: "qcow2".into(),
            capacity: 1 << 30,
            allocation: 196_608,
        }
    }

    fn host_cpus() -> HostCpuMap {
        serde_json::from_value(json!({ "present": [0, 1, 2], "online": [0, 2] })).expect("seed 003's host")
    }

    fn node_info() -> NodeInfo {
        NodeInfo {
            model: "x86_64".into(),
            cpus: 2,
            mhz: 0,
            nodes: 1,
            sockets: 1,
            cores: 2,
            threads: 1,
            memory_kib: 4_194_304,
        }
    }

    /// One value of every type a trait method takes or gives.
    #[test]
    fn every_payload_type_round_trips_through_json() {
        for state in [
            DomainState::NoState,
            DomainState::Running,
            DomainState::Blocked,
            DomainState::Paused,
            DomainState::Shutdown,
            DomainState::Shutoff,
            DomainState::Crashed,
            DomainState::PmSuspended,
            DomainState::Damaged,
        ] {
            round_trip(&state);
        }
        round_trip(&summary("vm1"));
        round_trip(&DomainSummary {
            id: Some(3),
            state: DomainState::Damaged,
            damaged: Some("cannot read domains/vm1/domain.xml".into()),
            ..summary("vm1")
        });
        round_trip(&domain_info(summary("vm1")));
        round_trip(&DomainEvent {
            domain: "vm1".into(),
            event: "block-job".into(),
            detail: "Block Pull for vda completed".into(),
            disk: Some("vda".into()),
            timestamp_us: 1_764_800_000_000_000,
        });
        round_trip(&VcpuInfo {
            number: 1,
            cpu: 2,
            state: "running".into(),
            cpu_time_ns: 9,
            affinity: vec![true, false, true],
        });
        round_trip(&DefineOutcome { name: "vm1".into(), warnings: vec!["a warning".into()] });
        round_trip(&StartOutcome { warnings: vec!["interface type='network' is not honoured".into()] });
        round_trip(&DiskChainCheck {
            disk: "vda".into(),
            differences: vec![ChainDifference { index: 1, what: "format qcow2 recorded, raw found".into() }],
            error: Some("cannot open".into()),
            fixed: true,
        });
        round_trip(&SnapshotSummary {
            name: "s1".into(),
            parent: None,
            creation_time: 1_764_800_000,
            state: "disk-snapshot".into(),
            current: true,
            location: "external".into(),
        });
        for kind in [BlockJobKind::Pull, BlockJobKind::Commit, BlockJobKind::ActiveCommit, BlockJobKind::Copy] {
            round_trip(&kind);
        }
        round_trip(&job_info());
        for end in
            [BlockJobEnd::Completed, BlockJobEnd::Finished, BlockJobEnd::Cancelled, BlockJobEnd::Failed("I/O".into())]
        {
            round_trip(&end);
            round_trip(&BlockJobState::Ended { kind: BlockJobKind::Commit, end });
        }
        round_trip(&BlockJobState::Running(job_info()));
        round_trip(&BlockJobState::Ready(job_info()));
        for outcome in [
            DiskSetOutcome::Added,
            DiskSetOutcome::AlreadyPresent,
            DiskSetOutcome::Removed,
            DiskSetOutcome::AlreadyAbsent,
        ] {
            round_trip(&outcome);
        }
        round_trip(&pool_info());
        round_trip(&PoolInfo { state: PoolState::Inactive, capacity: None, allocation: None, ..pool_info() });
        round_trip(&volume_info());
        round_trip(&node_info());
        round_trip(&host_cpus());
        round_trip(&ErrorPayload { kind: "no-domain".into(), code: 42, message: "no domain 'vm9'".into() });
        round_trip(&BlockPullOptions {
            base: Some("vda[2]".into()),
            top: None,
            bandwidth_bytes: Some(1 << 20),
            keep_relative: true,
        });
        round_trip(&BlockCommitOptions {
            top: Some("vda[1]".into()),
            active: true,
            pivot: true,
            delete: true,
            allow_snapshot_change: true,
            ..Default::default()
        });
        round_trip(&BlockCopyOptions {
            dest: "/srv/copy.qcow2".into(),
            format: Some("qcow2".into()),
            raw: false,
            shallow: true,
            reuse_external: true,
            bandwidth_bytes: None,
            granularity: Some(65536),
            buf_size: Some(1 << 20),
        });
    }

    /// The names serde gives an enum's variants, read from its refusal of
    /// an unknown one, so a test can tell that samples cover every variant.
    fn variant_names<T: DeserializeOwned + Debug>(tag: &str) -> BTreeSet<String> {
        let err = serde_json::from_value::<T>(json!({ tag: "no-such-variant" })).expect_err("an unknown variant");
        let text = err.to_string();
        let (_, list) =
            text.split_once("expected one of ").unwrap_or_else(|| panic!("serde's refusal changed: {text}"));
        list.split(", ").map(|name| name.trim_matches('`').to_string()).collect()
    }

    fn incoming_migration() -> IncomingMigration {
        IncomingMigration {
            xml: "<domain/>".into(),
            copied: vec![IncomingDisk {
                target: "vda".into(),
                format: "qcow2".into(),
                size: 16 << 20,
                file_name: "copied.qcow2".into(),
            }],
            shared: vec![SharedDisk { target: "vdb".into(), images: vec!["/srv/shared/vdb.qcow2".into()] }],
            migration_listen: Some(TcpListen { host: "10.0.0.2".into(), port: Some(49152) }),
            disks_listen: Some(TcpListen { host: "10.0.0.2".into(), port: None }),
        }
    }

    fn sample_calls() -> Vec<Call> {
        let d = || "vm1".to_string();
        let disk = || "vda".to_string();
        let snap = || "s1".to_string();
        let pool = || "images".to_string();
        let vol = || "base.qcow2".to_string();
        let scope = PinScope { live: true, config: true };
        vec![
            Call::Uri,
            Call::Capabilities,
            Call::ListDomains,
            Call::DefineXml { xml: "<domain/>".into(), flags: DefineFlags { validate: true } },
            Call::Undefine { domain: d(), flags: UndefineFlags { snapshots_metadata: true } },
            Call::DomainInfo { domain: d() },
            Call::Start { domain: d(), flags: StartFlags { paused: true } },
            Call::Destroy { domain: d() },
            Call::Shutdown { domain: d() },
            Call::Suspend { domain: d() },
            Call::Resume { domain: d() },
            Call::DumpXml { domain: d(), flags: DumpXmlFlags { inactive: true, refresh_chain: true } },
            Call::EnterNamespace { domain: d(), command: vec!["/bin/hostname".into()] },
            Call::CheckChains { domain: d(), disk: Some(disk()), fix: true },
            Call::NextEvent { domain: d(), timeout_ms: 500 },
            Call::VcpuInfo { domain: d() },
            Call::AttachInterface {
                domain: d(),
                xml: "<interface type='user'/>".into(),
                scope: PinScope { live: true, config: false },
            },
            Call::DetachInterface {
                domain: d(),
                iface_type: "network".into(),
                mac: Some("52:54:00:aa:00:01".into()),
                scope: PinScope { live: true, config: true },
            },
            Call::SnapshotCreate {
                domain: d(),
                xml: "<domainsnapshot/>".into(),
                flags: SnapshotCreateFlags { disk_only: true, branch: true, ..Default::default() },
            },
            Call::SnapshotList { domain: d() },
            Call::SnapshotXml { domain: d(), snapshot: snap() },
            Call::SnapshotSetCurrent { domain: d(), snapshot: snap() },
            Call::SnapshotProgress { domain: d() },
            Call::SnapshotRevert {
                domain: d(),
                snapshot: snap(),
                flags: SnapshotRevertFlags { force: true, ..Default::default() },
            },
            Call::SnapshotDelete {
                domain: d(),
                snapshot: snap(),
                flags: SnapshotDeleteFlags { children: true, ..Default::default() },
            },
            Call::BlockPull {
                domain: d(),
                disk: disk(),
                options: BlockPullOptions { base: Some("vda[2]".into()), ..Default::default() },
            },
            Call::BlockCommit {
                domain: d(),
                disk: disk(),
                options: BlockCommitOptions { active: true, pivot: true, ..Default::default() },
            },
            Call::BlockCopy {
                domain: d(),
                disk: disk(),
                options: BlockCopyOptions { dest: "/srv/c".into(), raw: true, ..Default::default() },
            },
            Call::BlockJobInfo { domain: d(), disk: disk() },
            Call::BlockJobAbort {
                domain: d(),
                disk: disk(),
                flags: BlockJobAbortFlags { pivot: true, no_wait: false },
            },
            Call::BlockJobSetSpeed { domain: d(), disk: disk(), bytes_per_sec: 1 << 20 },
            Call::BlockJobWait { domain: d(), disk: disk(), timeout_ms: 1000 },
            Call::DisksetAdd { domain: d(), disk: disk() },
            Call::DisksetRemove { domain: d(), disk: disk() },
            Call::DisksetAddAll { domain: d() },
            Call::DisksetRemoveAll { domain: d() },
            Call::DisksetList { domain: d() },
            Call::DisksetSize { domain: d() },
            Call::MonitorCommand { domain: d(), command: "info block".into(), human: true },
            Call::NodeInfo,
            Call::NodeCpuMap,
            Call::VcpuPins { domain: d(), scope },
            Call::PinVcpu { domain: d(), vcpu: 1, cpus: vec![0, 2], scope },
            Call::EmulatorPin { domain: d(), scope },
            Call::PinEmulator { domain: d(), cpus: vec![2], scope },
            Call::VcpuCounts { domain: d() },
            Call::SetVcpus { domain: d(), count: 2, scope, maximum: false },
            Call::Save {
                domain: d(),
                file: "/srv/vm1.save".into(),
                options: SaveOptions {
                    xml: Some("<domain/>".into()),
                    bandwidth_mib: Some(8),
                    flags: SaveFlags { paused: true, disk_set: true, ..Default::default() },
                },
            },
            Call::Restore {
                file: "/srv/vm1.save".into(),
                xml: Some("<domain><name>vm1</name></domain>".into()),
                flags: SaveFlags { running: true, ..Default::default() },
            },
            Call::SaveImageXml { file: "/dev/loop7".into() },
            Call::ManagedSave { domain: d(), options: SaveOptions::default() },
            Call::ManagedSaveRemove { domain: d() },
            Call::DomainJobInfo { domain: d() },
            Call::DomainJobAbort { domain: d() },
            Call::Migrate {
                domain: d(),
                dest_uri: "qemu:///embed?root=/srv/b".into(),
                options: MigrateOptions {
                    bandwidth_mib: Some(100),
                    timeout_s: Some(30),
                    migrate_uri: Some("tcp:10.0.0.2:49152".into()),
                    disks_uri: None,
                    flags: MigrateFlags { live: true, copy_storage_disk_set: true, ..Default::default() },
                },
            },
            Call::MigrateCheck { incoming: incoming_migration() },
            Call::MigratePrepare { incoming: incoming_migration() },
            Call::MigrateFinish { domain: d(), resume: true },
            Call::MigrateCleanup {
                domain: d(),
                uuid: Some("0c1e39c6-7b8f-4f4e-9a5e-d3c2a1b0f9e8".into()),
                images: vec!["copied.qcow2".into()],
            },
            Call::PoolDefineXml { xml: "<pool/>".into() },
            Call::PoolUndefine { pool: pool() },
            Call::PoolBuild { pool: pool(), flags: PoolBuildFlags { no_overwrite: true, overwrite: false } },
            Call::PoolStart { pool: pool() },
            Call::PoolDestroy { pool: pool() },
            Call::PoolRefresh { pool: pool() },
            Call::PoolList,
            Call::PoolInfo { pool: pool() },
            Call::PoolXml { pool: pool(), inactive: true },
            Call::PoolSetAutostart { pool: pool(), autostart: true },
            Call::VolList { pool: pool() },
            Call::VolInfo { pool: Some(pool()), volume: vol() },
            Call::VolXml { pool: None, volume: "/srv/images/base.qcow2".into() },
            Call::VolCreateXml { pool: pool(), xml: "<volume/>".into() },
            Call::VolDelete { pool: Some(pool()), volume: vol() },
            Call::VolResize {
                pool: Some(pool()),
                volume: vol(),
                bytes: 1 << 30,
                flags: VolumeResizeFlags { delta: true, shrink: false },
            },
            Call::VolClone { pool: None, volume: vol(), new_name: "copy.qcow2".into() },
            Call::NetDefineXml { xml: "<network/>".into() },
            Call::NetCreateXml { xml: "<network/>".into() },
            Call::NetDhcpLeases { network: "default".into() },
            Call::NetUndefine { network: "default".into() },
            Call::NetStart { network: "default".into() },
            Call::NetDestroy { network: "default".into() },
            Call::NetList,
            Call::NetInfo { network: "default".into() },
            Call::NetXml { network: "default".into() },
            Call::NetSetAutostart { network: "default".into(), autostart: true },
        ]
    }

    fn sample_replies() -> Vec<Reply> {
        vec![
            Reply::Done,
            Reply::Text("<domain/>".into()),
            Reply::Lines(vec!["merged s1 into base.qcow2".into()]),
            Reply::Count(2),
            Reply::Bytes(1 << 30),
            Reply::ExitStatus(3),
            Reply::Percent(Some(40)),
            Reply::Capabilities(Box::new(DriverCapabilities { driver: "test".into(), ..Default::default() })),
            Reply::Domains(vec![summary("vm1"), summary("vm2")]),
            Reply::Defined(DefineOutcome { name: "vm1".into(), warnings: vec![] }),
            Reply::DomainInfo(domain_info(summary("vm1"))),
            Reply::Started(StartOutcome::default()),
            Reply::ChainChecks(vec![DiskChainCheck {
                disk: "vda".into(),
                differences: vec![],
                error: None,
                fixed: false,
            }]),
            Reply::Event(None),
            Reply::Vcpus(vec![VcpuInfo {
                number: 0,
                cpu: 0,
                state: "running".into(),
                cpu_time_ns: 1,
                affinity: vec![true],
            }]),
            Reply::Snapshots(vec![]),
            Reply::BlockJobKind(BlockJobKind::ActiveCommit),
            Reply::BlockJobInfo(Some(job_info())),
            Reply::BlockJobEnd(BlockJobEnd::Failed("No space left on device".into())),
            Reply::BlockJobState(BlockJobState::Ready(job_info())),
            Reply::DiskSetOutcome(DiskSetOutcome::AlreadyPresent),
            Reply::NodeInfo(node_info()),
            Reply::HostCpuMap(host_cpus()),
            Reply::VcpuPins(vec![vec![0, 2], vec![2]]),
            Reply::Cpus(vec![0]),
            Reply::VcpuCounts(VcpuCounts {
                config: VcpuCount { maximum: 2, current: 1 },
                live: Some(VcpuCount { maximum: 2, current: 2 }),
            }),
            Reply::DomainJobInfo(Some(DomainJobInfo {
                operation: DomainJobOperation::Save,
                elapsed_ms: 1200,
                data_processed: 1 << 20,
                data_remaining: 1 << 21,
                data_total: 3 << 20,
                memory_bandwidth: 1 << 20,
                disks: Some(DiskCopyProgress { processed: 1 << 20, remaining: 0, total: 1 << 20 }),
            })),
            Reply::PreparedMigration(PreparedMigration {
                migration_uri: "tcp:10.0.0.2:49152".into(),
                disks_uri: Some("tcp:10.0.0.2:49153".into()),
            }),
            Reply::Pools(vec![pool_info()]),
            Reply::Pool(pool_info()),
            Reply::Volumes(vec![volume_info()]),
            Reply::Volume(volume_info()),
            Reply::Networks(vec![network_info()]),
            Reply::Network(network_info()),
            Reply::NetworkCreated(NetworkCreated { name: "default".into(), warnings: vec!["no DHCP".into()] }),
            Reply::NetworkLeases(vec![NetworkLease {
                interface: "virbr0".into(),
                expiry_time: 1_733_400_000,
                mac: "52:54:00:aa:00:01".into(),
                address: "192.168.122.45".into(),
                prefix: 24,
                hostname: Some("guest".into()),
                client_id: None,
            }]),
        ]
    }

    fn sample_names<T: Serialize>(samples: &[T], tag: &str) -> BTreeSet<String> {
        samples
            .iter()
            .map(|s| serde_json::to_value(s).expect("encodes")[tag].as_str().expect("tagged").to_string())
            .collect()
    }

    /// A sample of every variant (a new one without a sample fails), each
    /// through JSON in its envelope.
    #[test]
    fn every_call_and_reply_round_trips_in_its_envelope() {
        let calls = sample_calls();
        assert_eq!(sample_names(&calls, "method"), variant_names::<Call>("method"));
        for call in calls {
            round_trip(&Request::new(call));
        }
        let replies = sample_replies();
        assert_eq!(sample_names(&replies, "result"), variant_names::<Reply>("result"));
        for reply in replies {
            let response = Response { abi: ABI_VERSION, outcome: Outcome::Reply(reply.clone()) };
            round_trip(&response);
            let text = serde_json::to_string(&response).expect("encodes");
            assert_eq!(read_response(&text), Ok(reply));
        }
        let payload = ErrorPayload { kind: "no-support".into(), code: 3, message: "no".into() };
        round_trip(&Response { abi: ABI_VERSION, outcome: Outcome::Error(payload) });
    }

    /// A connection with domains kept in memory and no optional capability.
    struct MemoryConnection {
        domains: Mutex<Vec<DomainSummary>>,
    }

    impl MemoryConnection {
        fn new() -> MemoryConnection {
            MemoryConnection { domains: Mutex::new(Vec::new()) }
        }

        fn refuse(&self, what: &str) -> Error {
            Error::operation_invalid(format!("the memory driver cannot {what}"))
        }
    }

    #[async_trait]
    impl Connection for MemoryConnection {
        fn uri(&self) -> &str {
            "memory:///"
        }

        fn capabilities(&self) -> DriverCapabilities {
            DriverCapabilities {
                driver: "memory".into(),
                uri: self.uri().into(),
                hypervisor: "none".into(),
                ..Default::default()
            }
        }

        async fn list_domains(&self) -> Result<Vec<DomainSummary>> {
            Ok(self.domains.lock().expect("domains").clone())
        }

        async fn define_xml(&self, xml: &str, _flags: DefineFlags) -> Result<DefineOutcome> {
            let domain = Domain::parse(xml)?;
            let mut defined = summary(&domain.name());
            defined.uuid = domain.uuid().unwrap_or_default();
            self.domains.lock().expect("domains").push(defined);
            Ok(DefineOutcome { name: domain.name(), warnings: vec![] })
        }

        async fn undefine(&self, _name: &str, _flags: UndefineFlags) -> Result<()> {
            Err(self.refuse("undefine"))
        }

        async fn domain_info(&self, name: &str) -> Result<DomainInfo> {
            let domains = self.domains.lock().expect("domains");
            let summary = domains.iter().find(|d| d.name == name).cloned();
            let summary = summary.ok_or_else(|| Error::no_domain(format!("no domain with matching name '{name}'")))?;
            Ok(domain_info(summary))
        }

        async fn start(&self, _name: &str, _flags: StartFlags) -> Result<StartOutcome> {
            Err(self.refuse("start"))
        }

        async fn destroy(&self, _name: &str) -> Result<()> {
            Err(self.refuse("destroy"))
        }

        async fn shutdown(&self, _name: &str) -> Result<()> {
            Err(self.refuse("shut down"))
        }

        async fn suspend(&self, _name: &str) -> Result<()> {
            Err(self.refuse("suspend"))
        }

        async fn resume(&self, _name: &str) -> Result<()> {
            Err(self.refuse("resume"))
        }

        async fn dump_xml(&self, _name: &str, _flags: DumpXmlFlags) -> Result<String> {
            Err(self.refuse("dump XML"))
        }

        async fn check_chains(&self, _name: &str, _disk: Option<&str>, _fix: bool) -> Result<Vec<DiskChainCheck>> {
            Err(self.refuse("check chains"))
        }
    }

    const VM1: &str = "<domain type='kvm'><name>vm1</name><uuid>7b4f2d0c-8f0e-4c47-9a55-2b1e0d3c9f11</uuid></domain>";

    #[tokio::test]
    async fn dispatch_defines_lists_and_reports_a_domain() {
        let conn = MemoryConnection::new();
        let defined = dispatch(&conn, Call::DefineXml { xml: VM1.into(), flags: DefineFlags::default() }).await;
        assert_eq!(defined, Ok(Reply::Defined(DefineOutcome { name: "vm1".into(), warnings: vec![] })));

        let Ok(Reply::Domains(listed)) = dispatch(&conn, Call::ListDomains).await else { panic!("no domain list") };
        assert_eq!(listed.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["vm1"]);

        let Ok(Reply::DomainInfo(info)) = dispatch(&conn, Call::DomainInfo { domain: "vm1".into() }).await else {
            panic!("no domain info")
        };
        assert_eq!(
            (info.summary.uuid.as_str(), info.summary.state),
            ("7b4f2d0c-8f0e-4c47-9a55-2b1e0d3c9f11", DomainState::Shutoff)
        );

        let missing = dispatch(&conn, Call::DomainInfo { domain: "vm9".into() }).await;
        let expected =
            ErrorPayload { kind: "no-domain".into(), code: 42, message: "no domain with matching name 'vm9'".into() };
        assert_eq!(missing, Err(expected));
    }

    /// A capability the driver lacks gives the CLI's no-support error,
    /// whichever trait the call belongs to.
    #[tokio::test]
    async fn a_call_to_a_missing_capability_is_the_no_support_error() {
        let conn = MemoryConnection::new();
        let cases = [
            (Call::SnapshotList { domain: "vm1".into() }, "snapshots"),
            (Call::BlockJobInfo { domain: "vm1".into(), disk: "vda".into() }, "block jobs"),
            (Call::DisksetList { domain: "vm1".into() }, "disk sets"),
            (Call::MonitorCommand { domain: "vm1".into(), command: "{}".into(), human: false }, "monitor commands"),
            (Call::NodeInfo, "host CPU information and placement"),
            (Call::DomainJobInfo { domain: "vm1".into() }, "saving and migrating domains"),
            (Call::PoolList, "storage pools"),
            (Call::NetList, "networks"),
        ];
        for (call, what) in cases {
            let payload = dispatch(&conn, call).await.expect_err("no such capability");
            let expected = ErrorPayload {
                kind: "no-support".into(),
                code: 3,
                message: format!("the memory driver does not support {what}"),
            };
            assert_eq!(payload, expected);
            assert_eq!(
                Error::from(payload).report(),
                format!("this function is not supported by the connection driver: the memory driver does not support {what}")
            );
        }
    }

    #[tokio::test]
    async fn dispatch_json_answers_in_an_envelope_and_refuses_another_abi() {
        let conn = MemoryConnection::new();
        let request =
            json!({ "abi": ABI_VERSION, "call": { "method": "define_xml", "args": { "xml": VM1, "flags": 0 } } });
        let response = dispatch_json(&conn, &request.to_string()).await;
        let value: serde_json::Value = serde_json::from_str(&response).expect("JSON");
        assert_eq!(
            value,
            json!({ "abi": ABI_VERSION, "reply": { "result": "defined", "value": { "name": "vm1", "warnings": [] } } })
        );

        let request = json!({ "abi": ABI_VERSION, "call": { "method": "snapshot_list", "args": { "domain": "vm1" } } });
        let response = dispatch_json(&conn, &request.to_string()).await;
        let refused = read_response(&response).expect_err("no snapshots");
        assert_eq!((refused.kind.as_str(), refused.code), ("no-support", 3));

        let newer = json!({ "abi": ABI_VERSION + 1, "call": { "method": "list_domains" } });
        let refused = read_response(&dispatch_json(&conn, &newer.to_string()).await).expect_err("another ABI");
        assert_eq!(refused.kind, "argument-unsupported");
        assert_eq!(
            refused.message,
            format!("plugin request of ABI version {}, but this side speaks version {ABI_VERSION}", ABI_VERSION + 1)
        );

        let flags =
            json!({ "abi": ABI_VERSION, "call": { "method": "start", "args": { "domain": "vm1", "flags": 2 } } });
        let refused = read_response(&dispatch_json(&conn, &flags.to_string()).await).expect_err("unknown start flag");
        assert_eq!(refused.kind, "invalid-arg");
        assert!(refused.message.contains("unsupported flags (0x2) in StartFlags"), "{}", refused.message);

        let garbage = read_response(&dispatch_json(&conn, "{\"abi\": 1, \"call\": {\"method\": \"reboot\"}}").await);
        assert_eq!(garbage.expect_err("no such method").kind, "invalid-arg");

        let old_reply = json!({ "abi": ABI_VERSION + 1, "reply": { "result": "done" } }).to_string();
        assert_eq!(read_response(&old_reply).expect_err("another ABI").kind, "argument-unsupported");
    }
}
