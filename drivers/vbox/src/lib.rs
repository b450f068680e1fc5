//! Strata's VirtualBox 4.2 driver (`vbox:///session`), talking to
//! VirtualBox as libvirt's vbox driver does: `VBoxXPCOMC.so` loaded at run
//! time, `VBoxGetXPCOMCFunctions`, XPCOM initialised for `IVirtualBox`
//! and `ISession`, then methods called through vtables (`ffi.rs`) on one
//! dedicated thread (`xpcom.rs`). Machines are domains (`machines.rs`);
//! VirtualBox owns its snapshots, so this driver implements core's
//! `SnapshotOps` itself (`snapshots.rs`); pull and commit are
//! IMedium::MergeTo and copy is IMedium::CloneTo (`jobs.rs`); a domain's
//! disk set lives in the machine's extra data.

use async_trait::async_trait;
use strata_core::capabilities::{
    refusal, BlockJobCapabilities, BlockJobKinds, CopyModes, DeleteMethods, DomainCapabilities, RevertRules, RevertTo,
    RevertedGuest, SnapshotCapabilities, SnapshotCreation, SnapshotKinds, StorageCapabilities,
};
use strata_core::driver::{
    BlockJobEnd, BlockJobInfo, BlockJobKind, BlockJobOps, BlockJobState, Connection, DefineFlags, DefineOutcome,
    DiskChainCheck, DiskSetOps, DiskSetOutcome, DomainInfo, DomainSummary, DriverCapabilities, DumpXmlFlags,
    SnapshotOps, SnapshotSummary, StartFlags, StartOutcome, UndefineFlags,
};
use strata_core::options::{
    BlockCommitOptions, BlockCopyOptions, BlockJobAbortFlags, BlockPullOptions, SnapshotCreateFlags,
    SnapshotDeleteFlags, SnapshotRevertFlags,
};
use strata_core::registry::DriverRegistration;
use strata_core::uri::ConnectUri;
use strata_core::xml::{Domain, SnapshotDef};
use strata_core::{Error, Result};

pub mod abi;
pub mod ffi;
mod jobs;
mod machines;
mod snapshots;
pub mod xpcom;

use xpcom::{Ctx, Xpcom};

const DRIVER: &str = "vbox";

/// A connection to VirtualBox 4.2 through its XPCOM C binding.
pub struct VboxConnection {
    uri: String,
    xpcom: Xpcom,
    /// Running snapshot operations' progress, by domain.
    percents: xpcom::Percents,
}

impl VboxConnection {
    /// Loads VirtualBox 4.2 and initialises XPCOM; only `vbox:///session` is served.
    pub fn open(uri: &ConnectUri) -> Result<VboxConnection> {
        if uri.path != "session" || uri.host.is_some() || uri.transport.is_some() {
            return Err(Error::invalid_arg(format!("'{}': the vbox driver serves vbox:///session only", uri.as_str())));
        }
        let percents = xpcom::Percents::default();
        Ok(VboxConnection { uri: uri.as_str().to_string(), xpcom: Xpcom::start(percents.clone())?, percents })
    }

    async fn run<T: Send + 'static>(&self, f: impl FnOnce(&mut Ctx) -> Result<T> + Send + 'static) -> Result<T> {
        self.xpcom.run(f).await
    }

    /// Changes the disk set of `domain` through its domain XML (so core's
    /// disk-set rules apply) and stores the result in its extra data.
    async fn edit_disk_set<T: Send + 'static>(
        &self,
        domain: &str,
        f: impl FnOnce(&mut Domain) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let domain = domain.to_string();
        self.run(move |ctx| {
            let machine = ctx.find_machine(&domain)?;
            let mut dom = ctx.domain(&machine)?;
            let value = f(&mut dom)?;
            ctx.set_disk_set(&machine, &strata_core::diskset::selected(&dom)?)?;
            Ok(value)
        })
        .await
    }
}

fn open_registered(uri: &ConnectUri) -> Result<Box<dyn Connection>> {
    Ok(Box::new(VboxConnection::open(uri)?))
}

inventory::submit! {
    DriverRegistration {
        scheme: "vbox",
        description: "VirtualBox 4.2 through its XPCOM C binding (VBoxXPCOMC.so)",
        open: open_registered,
    }
}

#[async_trait]
impl Connection for VboxConnection {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn capabilities(&self) -> DriverCapabilities {
        DriverCapabilities {
            driver: DRIVER.into(),
            uri: self.uri.clone(),
            hypervisor: format!("VirtualBox {}", xpcom::version_text(self.xpcom.version)),
            domains: DomainCapabilities { run: true, ..Default::default() },
            snapshots: SnapshotCapabilities {
                kinds: SnapshotKinds {
                    internal_disk: true,
                    external_disk: false,
                    internal_memory: true,
                    external_memory: false,
                },
                creation: SnapshotCreation { live: true, offline: true },
                revert: RevertRules {
                    to: RevertTo::AnySnapshot,
                    external: false,
                    guest: RevertedGuest::RunningOrPaused,
                },
                delete: DeleteMethods {
                    internal: true,
                    external_by_commit: false,
                    external_by_pull: false,
                    metadata_only: false,
                    children: true,
                },
            },
            block_jobs: BlockJobCapabilities {
                kinds: BlockJobKinds { pull: true, intermediate_commit: true, active_commit: false, copy: true },
                copy: CopyModes { shallow: false, raw: false, reuse_external: false },
                bandwidth: false,
                ready_pivot: true,
            },
            storage: StorageCapabilities { disk_sets: true, storage_pools: false },
            honoured_elements: ["name", "uuid", "memory", "vcpu", "disk"].map(String::from).to_vec(),
            unhonoured_elements: Vec::new(),
            notes: vec![
                format!("VirtualBox library: {}", self.xpcom.library.display()),
                "snapshots, their differencing media and disk chains are VirtualBox's own".into(),
                "block jobs run on a machine that is shut off, in the process that started them".into(),
                "a domain's disk set is kept in the machine's extra data (strata/disk-set)".into(),
            ],
        }
    }

    async fn list_domains(&self) -> Result<Vec<DomainSummary>> {
        self.run(|ctx| ctx.list()).await
    }

    async fn define_xml(&self, xml: &str, _flags: DefineFlags) -> Result<DefineOutcome> {
        let xml = xml.to_string();
        let name = self.run(move |ctx| ctx.define(&xml)).await?;
        Ok(DefineOutcome { name, warnings: Vec::new() })
    }

    async fn undefine(&self, name: &str, flags: UndefineFlags) -> Result<()> {
        let name = name.to_string();
        self.run(move |ctx| ctx.undefine(&name, flags.snapshots_metadata)).await
    }

    async fn domain_info(&self, name: &str) -> Result<DomainInfo> {
        let name = name.to_string();
        self.run(move |ctx| ctx.info(&name)).await
    }

    async fn start(&self, name: &str, flags: StartFlags) -> Result<StartOutcome> {
        if flags.paused {
            return Err(refusal(DRIVER, "cannot start a domain paused"));
        }
        let name = name.to_string();
        self.run(move |ctx| ctx.start(&name)).await?;
        Ok(StartOutcome::default())
    }

    async fn destroy(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.run(move |ctx| ctx.destroy(&name)).await
    }

    async fn shutdown(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.run(move |ctx| ctx.shutdown(&name)).await
    }

    async fn suspend(&self, _name: &str) -> Result<()> {
        Err(refusal(DRIVER, "cannot suspend a domain"))
    }

    async fn resume(&self, _name: &str) -> Result<()> {
        Err(refusal(DRIVER, "cannot resume a domain"))
    }

    async fn dump_xml(&self, name: &str, _flags: DumpXmlFlags) -> Result<String> {
        let name = name.to_string();
        self.run(move |ctx| {
            let machine = ctx.find_machine(&name)?;
            Ok(ctx.domain(&machine)?.to_xml())
        })
        .await
    }

    async fn check_chains(&self, _name: &str, _disk: Option<&str>, _fix: bool) -> Result<Vec<DiskChainCheck>> {
        Err(refusal(DRIVER, "records no chains to check: VirtualBox keeps them"))
    }

    fn snapshots(&self) -> Option<&dyn SnapshotOps> {
        Some(self)
    }

    fn block_jobs(&self) -> Option<&dyn BlockJobOps> {
        Some(self)
    }

    fn disk_sets(&self) -> Option<&dyn DiskSetOps> {
        Some(self)
    }
}

#[async_trait]
impl SnapshotOps for VboxConnection {
    async fn snapshot_create(&self, domain: &str, xml: &str, flags: SnapshotCreateFlags) -> Result<String> {
        flags.validate()?;
        for (asked, what) in [
            (flags.redefine, "cannot redefine snapshots: VirtualBox keeps them"),
            (flags.no_metadata, "cannot take a snapshot without metadata"),
            (flags.disk_set, "cannot limit a snapshot to the disk set: VirtualBox snapshots every disk"),
        ] {
            if asked {
                return Err(refusal(DRIVER, what));
            }
        }
        let def = SnapshotDef::parse(xml)?;
        let domain = domain.to_string();
        self.run(move |ctx| ctx.snapshot_create(&domain, &def)).await
    }

    async fn snapshot_list(&self, domain: &str) -> Result<Vec<SnapshotSummary>> {
        let domain = domain.to_string();
        self.run(move |ctx| {
            let machine = ctx.find_machine(&domain)?;
            Ok(ctx.snapshots(&machine)?.iter().map(|s| s.summary()).collect())
        })
        .await
    }

    async fn snapshot_xml(&self, domain: &str, snapshot: &str) -> Result<String> {
        let (domain, snapshot) = (domain.to_string(), snapshot.to_string());
        self.run(move |ctx| ctx.snapshot_xml(&domain, &snapshot)).await
    }

    async fn snapshot_set_current(&self, _domain: &str, _snapshot: &str) -> Result<()> {
        Err(refusal(DRIVER, "cannot make a snapshot current without reverting to it"))
    }

    async fn snapshot_revert(&self, domain: &str, snapshot: &str, flags: SnapshotRevertFlags) -> Result<()> {
        flags.validate()?;
        if flags.paused {
            return Err(refusal(DRIVER, "cannot leave a reverted guest paused"));
        }
        let (domain, snapshot) = (domain.to_string(), snapshot.to_string());
        self.run(move |ctx| ctx.snapshot_revert(&domain, &snapshot, flags.running)).await
    }

    async fn snapshot_progress(&self, domain: &str) -> Result<Option<u32>> {
        let percents = self.percents.lock().map_err(|_| Error::internal("snapshot progress lock poisoned"))?;
        Ok(percents.get(domain).copied())
    }

    async fn snapshot_delete(&self, domain: &str, snapshot: &str, flags: SnapshotDeleteFlags) -> Result<Vec<String>> {
        flags.validate()?;
        let (domain, snapshot) = (domain.to_string(), snapshot.to_string());
        self.run(move |ctx| ctx.snapshot_delete(&domain, &snapshot, flags.children, flags.children_only)).await?;
        Ok(Vec::new())
    }
}

#[async_trait]
impl BlockJobOps for VboxConnection {
    async fn block_pull(&self, domain: &str, disk: &str, opts: &BlockPullOptions) -> Result<()> {
        let (domain, disk, base) = (domain.to_string(), disk.to_string(), opts.base.clone());
        self.run(move |ctx| ctx.block_pull(&domain, &disk, base.as_deref())).await
    }

    async fn block_commit(&self, domain: &str, disk: &str, opts: &BlockCommitOptions) -> Result<BlockJobKind> {
        if opts.active {
            return Err(refusal(DRIVER, "cannot run an active block commit"));
        }
        let (domain, disk) = (domain.to_string(), disk.to_string());
        let (top, base) = (opts.top.clone(), opts.base.clone());
        self.run(move |ctx| ctx.block_commit(&domain, &disk, top.as_deref(), base.as_deref())).await?;
        Ok(BlockJobKind::Commit)
    }

    async fn block_copy(&self, domain: &str, disk: &str, opts: &BlockCopyOptions) -> Result<Vec<String>> {
        let (domain, disk) = (domain.to_string(), disk.to_string());
        let (dest, format) = (opts.dest.clone(), opts.format.clone());
        self.run(move |ctx| ctx.block_copy(&domain, &disk, &dest, format.as_deref())).await?;
        Ok(Vec::new())
    }

    async fn block_job_info(&self, domain: &str, disk: &str) -> Result<Option<BlockJobInfo>> {
        let (domain, disk) = (domain.to_string(), disk.to_string());
        self.run(move |ctx| ctx.block_job_info(&domain, &disk)).await
    }

    async fn block_job_abort(&self, domain: &str, disk: &str, flags: BlockJobAbortFlags) -> Result<BlockJobEnd> {
        let (domain, disk) = (domain.to_string(), disk.to_string());
        self.run(move |ctx| ctx.block_job_abort(&domain, &disk, flags.pivot)).await
    }

    async fn block_job_set_speed(&self, _domain: &str, _disk: &str, _bytes_per_sec: u64) -> Result<()> {
        Err(refusal(DRIVER, "cannot limit a block job's bandwidth"))
    }

    async fn block_job_wait(&self, domain: &str, disk: &str, timeout_ms: u64) -> Result<BlockJobState> {
        let (domain, disk) = (domain.to_string(), disk.to_string());
        self.run(move |ctx| ctx.block_job_wait(&domain, &disk, timeout_ms)).await
    }
}

#[async_trait]
impl DiskSetOps for VboxConnection {
    async fn diskset_add(&self, domain: &str, disk: &str) -> Result<DiskSetOutcome> {
        let disk = disk.to_string();
        self.edit_disk_set(domain, move |dom| strata_core::diskset::set_selected(dom, &disk, true)).await
    }

    async fn diskset_remove(&self, domain: &str, disk: &str) -> Result<DiskSetOutcome> {
        let disk = disk.to_string();
        self.edit_disk_set(domain, move |dom| strata_core::diskset::set_selected(dom, &disk, false)).await
    }

    async fn diskset_add_all(&self, domain: &str) -> Result<usize> {
        self.edit_disk_set(domain, |dom| strata_core::diskset::set_all(dom, true)).await
    }

    async fn diskset_remove_all(&self, domain: &str) -> Result<usize> {
        self.edit_disk_set(domain, |dom| strata_core::diskset::set_all(dom, false)).await
    }

    async fn diskset_list(&self, domain: &str) -> Result<Vec<String>> {
        let domain = domain.to_string();
        self.run(move |ctx| {
            let machine = ctx.find_machine(&domain)?;
            strata_core::diskset::selected(&ctx.domain(&machine)?)
        })
        .await
    }
}
