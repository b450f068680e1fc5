//! The commands that check a request against the driver's capabilities
//! refuse, before the driver is called, what a driver's capabilities lack,
//! and pass the rest on. The QEMU driver has every capability, so these
//! run against a driver that exists only here: it declares what the LXC
//! driver will (no memory state, no internal disk snapshots, reverts to the
//! current snapshot of a stopped guest only, pulls only) and fails every
//! request that reaches it, naming it.

use async_trait::async_trait;
use strata_core::capabilities::{
    BlockJobCapabilities, BlockJobKinds, DeleteMethods, DomainCapabilities, DriverCapabilities, RevertRules, RevertTo,
    RevertedGuest, SnapshotCapabilities, SnapshotCreation, SnapshotKinds,
};
use strata_core::driver::{
    BlockJobEnd, BlockJobInfo, BlockJobKind, BlockJobOps, BlockJobState, Connection, DefineFlags, DefineOutcome,
    DiskChainCheck, DomainInfo, DomainState, DomainSummary, DumpXmlFlags, SnapshotOps, SnapshotSummary, StartFlags,
    StartOutcome, UndefineFlags,
};
use strata_core::options::{
    BlockCommitOptions, BlockCopyOptions, BlockJobAbortFlags, BlockPullOptions, SnapshotCreateFlags,
    SnapshotDeleteFlags, SnapshotRevertFlags,
};
use strata_core::registry::DriverRegistration;
use strata_core::uri::ConnectUri;
use strata_core::{Error, Result};

use crate::commands::{self, Session};
use crate::{error_lines, parse_words, Parsed};

const SCHEME: &str = "capstest";

struct LimitedDriver;

fn open(_: &ConnectUri) -> Result<Box<dyn Connection>> {
    Ok(Box::new(LimitedDriver))
}

strata_core::inventory::submit! {
    DriverRegistration { scheme: SCHEME, description: "a driver with few capabilities, for tests", open }
}

/// What a request that passed the checks gets from the driver.
fn reached(what: &str) -> Error {
    Error::internal(format!("the driver was asked to {what}"))
}

#[async_trait]
impl Connection for LimitedDriver {
    fn uri(&self) -> &str {
        "capstest:///"
    }

    fn capabilities(&self) -> DriverCapabilities {
        DriverCapabilities {
            driver: "test".into(),
            uri: self.uri().into(),
            hypervisor: "none".into(),
            domains: DomainCapabilities { run: true, ..Default::default() },
            snapshots: SnapshotCapabilities {
                kinds: SnapshotKinds { external_disk: true, ..Default::default() },
                creation: SnapshotCreation { live: true, offline: true },
                revert: RevertRules { to: RevertTo::LatestOnly, external: true, guest: RevertedGuest::StoppedOnly },
                delete: DeleteMethods { external_by_commit: true, ..Default::default() },
            },
            block_jobs: BlockJobCapabilities {
                kinds: BlockJobKinds { pull: true, ..Default::default() },
                ..Default::default()
            },
            ..Default::default()
        }
    }

    async fn list_domains(&self) -> Result<Vec<DomainSummary>> {
        Err(reached("list domains"))
    }
    async fn define_xml(&self, _: &str, _: DefineFlags) -> Result<DefineOutcome> {
        Err(reached("define"))
    }
    async fn undefine(&self, _: &str, _: UndefineFlags) -> Result<()> {
        Err(reached("undefine"))
    }
    async fn domain_info(&self, name: &str) -> Result<DomainInfo> {
        Ok(DomainInfo {
            summary: DomainSummary {
                id: Some(1),
                name: name.into(),
                uuid: String::new(),
                state: DomainState::Running,
                reason: None,
                persistent: true,
                damaged: None,
            },
            os_type: "hvm".into(),
            max_memory_kib: 0,
            used_memory_kib: 0,
            vcpus: 1,
            autostart: false,
            managed_save: false,
        })
    }
    async fn start(&self, _: &str, _: StartFlags) -> Result<StartOutcome> {
        Err(reached("start"))
    }
    async fn destroy(&self, _: &str) -> Result<()> {
        Err(reached("destroy"))
    }
    async fn shutdown(&self, _: &str) -> Result<()> {
        Err(reached("shut down"))
    }
    async fn suspend(&self, _: &str) -> Result<()> {
        Err(reached("suspend"))
    }
    async fn resume(&self, _: &str) -> Result<()> {
        Err(reached("resume"))
    }
    async fn dump_xml(&self, name: &str, _: DumpXmlFlags) -> Result<String> {
        Ok(format!(
            "<domain type='kvm'><name>{name}</name><devices><disk type='file' device='disk'>\
             <driver name='qemu' type='qcow2'/><source file='/img/vda.qcow2'/><target dev='vda'/></disk>\
             </devices></domain>"
        ))
    }
    async fn check_chains(&self, _: &str, _: Option<&str>, _: bool) -> Result<Vec<DiskChainCheck>> {
        Err(reached("check chains"))
    }
    fn snapshots(&self) -> Option<&dyn SnapshotOps> {
        Some(self)
    }
    fn block_jobs(&self) -> Option<&dyn BlockJobOps> {
        Some(self)
    }
}

fn snapshot(name: &str, parent: Option<&str>, current: bool) -> SnapshotSummary {
    SnapshotSummary {
        name: name.into(),
        parent: parent.map(str::to_string),
        creation_time: 0,
        state: "disk-snapshot".into(),
        current,
        location: "external".into(),
    }
}

#[async_trait]
impl SnapshotOps for LimitedDriver {
    async fn snapshot_create(&self, _: &str, _: &str, _: SnapshotCreateFlags) -> Result<String> {
        Err(reached("create a snapshot"))
    }
    /// s1 <- s2 (current), both external disk snapshots.
    async fn snapshot_list(&self, _: &str) -> Result<Vec<SnapshotSummary>> {
        Ok(vec![snapshot("s1", None, false), snapshot("s2", Some("s1"), true)])
    }
    async fn snapshot_xml(&self, _: &str, _: &str) -> Result<String> {
        Err(reached("dump a snapshot"))
    }
    async fn snapshot_set_current(&self, _: &str, _: &str) -> Result<()> {
        Err(reached("set the current snapshot"))
    }
    async fn snapshot_revert(&self, _: &str, _: &str, _: SnapshotRevertFlags) -> Result<()> {
        Err(reached("revert"))
    }
    async fn snapshot_delete(&self, _: &str, _: &str, _: SnapshotDeleteFlags) -> Result<Vec<String>> {
        Err(reached("delete a snapshot"))
    }
}

#[async_trait]
impl BlockJobOps for LimitedDriver {
    async fn block_pull(&self, _: &str, _: &str, _: &BlockPullOptions) -> Result<()> {
        Err(reached("pull"))
    }
    async fn block_commit(&self, _: &str, _: &str, _: &BlockCommitOptions) -> Result<BlockJobKind> {
        Err(reached("commit"))
    }
    async fn block_copy(&self, _: &str, _: &str, _: &BlockCopyOptions) -> Result<Vec<String>> {
        Err(reached("copy"))
    }
    async fn block_job_info(&self, _: &str, _: &str) -> Result<Option<BlockJobInfo>> {
        Err(reached("report a job"))
    }
    async fn block_job_abort(&self, _: &str, _: &str, _: BlockJobAbortFlags) -> Result<BlockJobEnd> {
        Err(reached("abort a job"))
    }
    async fn block_job_set_speed(&self, _: &str, _: &str, _: u64) -> Result<()> {
        Err(reached("set a job's speed"))
    }
    async fn block_job_wait(&self, _: &str, _: &str, _: u64) -> Result<BlockJobState> {
        Err(reached("wait for a job"))
    }
}

/// The `error:` lines `strata -c capstest:/// LINE` prints.
async fn errors_of(line: &str) -> Vec<String> {
    let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    let Ok(Parsed::Run(command)) = parse_words(&words) else {
        panic!("'{line}' does not parse");
    };
    let mut session = Session::new(format!("{SCHEME}:///"), false, false);
    match commands::run(&mut session, command).await {
        Ok(out) => panic!("'{line}' succeeded: {out}"),
        Err(err) => error_lines(&err),
    }
}

const NO_SUPPORT: &str = "this function is not supported by the connection driver: the test driver";

#[tokio::test]
async fn what_the_capabilities_lack_is_refused_before_the_driver_is_called() {
    let cases = [
        ("snapshot-create-as vm --memspec file=/m", "cannot save memory state"),
        ("snapshot-create-as vm", "cannot save memory state"),
        ("snapshot-create-as vm --diskspec vda,snapshot=internal --disk-only", "cannot take internal disk snapshots"),
        ("snapshot-revert vm s1", "can only revert to the current snapshot"),
        ("snapshot-revert vm s2 --running", "cannot leave a reverted guest running or paused"),
        ("snapshot-delete vm s1 --children", "cannot delete a snapshot's children"),
        ("snapshot-delete vm s2 --metadata", "cannot delete a snapshot's metadata alone"),
        ("blockpull vm vda --bandwidth 1", "cannot limit a block job's bandwidth"),
        ("blockcommit vm vda --active --pivot", "cannot run an active block commit"),
        ("blockcopy vm vda /copy", "cannot run a block copy"),
        ("blockjob vm vda --bandwidth 1", "cannot limit a block job's bandwidth"),
        ("blockjob vm vda --pivot", "cannot pivot or finish a block job in a ready phase"),
        ("setvcpus vm 2 --live", "cannot plug vCPUs into a running domain"),
    ];
    for (line, cannot) in cases {
        assert_eq!(errors_of(line).await, [format!("{NO_SUPPORT} {cannot}")], "{line}");
    }
}

#[tokio::test]
async fn what_the_capabilities_have_reaches_the_driver() {
    let cases = [
        ("snapshot-create-as vm --disk-only", "create a snapshot"),
        ("snapshot-create-as vm --memspec snapshot=no --diskspec vda,snapshot=external", "create a snapshot"),
        ("snapshot-revert vm s2", "revert"),
        ("snapshot-delete vm s2", "delete a snapshot"),
        ("blockpull vm vda", "pull"),
        ("blockjob vm vda --abort", "abort a job"),
    ];
    for (line, what) in cases {
        assert_eq!(errors_of(line).await, [format!("internal error: the driver was asked to {what}")], "{line}");
    }
}
