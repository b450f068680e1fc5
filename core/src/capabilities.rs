//! What a driver can do, as plain data every driver fills in, and the
//! refusals derived from it.
//!
//! One small struct per capability family (snapshots, reverts, deletes,
//! block jobs, storage, domains), so a new driver states what its
//! hypervisor can do instead of writing its own refusals: a request is
//! checked against the capabilities before the driver is called, and
//! whatever it needs that they lack is refused with libvirt's
//! VIR_ERR_NO_SUPPORT, worded the same for every driver
//! (`the lxc driver cannot save memory state`).

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::driver::{BlockJobKind, SnapshotSummary};
use crate::error::{Error, Result};
use crate::options::{
    BlockCommitOptions, BlockCopyOptions, BlockPullOptions, SnapshotCreateFlags, SnapshotDeleteFlags,
    SnapshotRevertFlags,
};
use crate::xml::{Domain, SnapshotDef};

/// Everything a driver can do, and what it honours of a definition.
///
/// Every struct here reads a field its JSON lacks as absent
/// (`serde(default)`): a plugin built before a capability was added says
/// nothing of it, and must keep loading as a driver without it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DriverCapabilities {
    /// The URI scheme's driver name (`qemu`).
    pub driver: String,
    pub uri: String,
    pub hypervisor: String,
    pub domains: DomainCapabilities,
    pub snapshots: SnapshotCapabilities,
    pub block_jobs: BlockJobCapabilities,
    pub storage: StorageCapabilities,
    /// Domain elements the driver acts on (some only in the form given).
    pub honoured_elements: Vec<String>,
    /// Elements that change what the guest sees which the driver keeps in
    /// the definition but does not act on yet; `start` warns about each of
    /// these, and about any other element it does not know.
    pub unhonoured_elements: Vec<String>,
    pub notes: Vec<String>,
}

/// Running domains, and what can be watched or controlled while they run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DomainCapabilities {
    /// Domains can run, not only be defined.
    pub run: bool,
    /// Block-job and lifecycle events (`event`).
    pub events: bool,
    /// Each vCPU's host CPU, time and affinity (`vcpuinfo`).
    pub vcpu_info: bool,
    /// Commands passed to the hypervisor's monitor (`qemu-monitor-command`).
    pub monitor: bool,
    /// The host's CPUs and the pinning of guests to them (`nodeinfo`, `vcpupin`, …).
    pub cpu_placement: bool,
    /// vCPUs plugged into a running domain (`setvcpus --live`).
    pub vcpu_hotplug: bool,
    /// Memory state saved to a file or block device and restored, managed save.
    pub save_restore: bool,
    /// Running domains moved to another connection, disks copied or shared.
    pub migration: bool,
}

/// Snapshots: what they can hold, when they can be taken, how they are
/// reverted to and deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SnapshotCapabilities {
    pub kinds: SnapshotKinds,
    pub creation: SnapshotCreation,
    pub revert: RevertRules,
    pub delete: DeleteMethods,
}

impl SnapshotCapabilities {
    /// Every kind of snapshot, of a running domain and of one shut off:
    /// no snapshot creation is refused for want of a capability.
    pub fn takes_every_snapshot(&self) -> bool {
        let (kinds, creation) = (self.kinds, self.creation);
        creation.live
            && creation.offline
            && kinds.internal_disk
            && kinds.external_disk
            && kinds.internal_memory
            && kinds.external_memory
    }
}

/// What a snapshot can hold. As a request, what one snapshot needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SnapshotKinds {
    /// A disk's state kept inside its own image (qcow2's snapshot table).
    pub internal_disk: bool,
    /// A disk's state frozen in its image, with writes going to a new overlay.
    pub external_disk: bool,
    /// The guest's memory kept inside a disk image (a checkpoint).
    pub internal_memory: bool,
    /// The guest's memory saved to a file of its own.
    pub external_memory: bool,
}

/// Whether a snapshot can be taken of a running or paused domain, and of
/// one that is shut off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SnapshotCreation {
    pub live: bool,
    pub offline: bool,
}

/// Which snapshots can be reverted to, and what the guest can be afterwards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RevertRules {
    pub to: RevertTo,
    /// A snapshot holding external disk snapshots (virsh 9.0 refuses these).
    pub external: bool,
    pub guest: RevertedGuest,
}

/// Which snapshots a revert can go back to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RevertTo {
    /// Any snapshot of the tree.
    AnySnapshot,
    /// Only the current snapshot, the one the guest's state last came from.
    #[default]
    LatestOnly,
}

/// What the guest can be after a revert.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RevertedGuest {
    /// Running or paused (`--running`, `--paused`, or as the snapshot was).
    RunningOrPaused,
    /// Shut off.
    #[default]
    StoppedOnly,
}

/// How snapshots can be deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeleteMethods {
    /// An internal snapshot, from its images' snapshot tables.
    pub internal: bool,
    /// An external snapshot, by committing its overlay into the frozen image.
    pub external_by_commit: bool,
    /// An external snapshot, by pulling the frozen image into its children.
    pub external_by_pull: bool,
    /// The record alone, no image changed (`--metadata`).
    pub metadata_only: bool,
    /// A snapshot's descendants with it, or alone (`--children`, `--children-only`).
    pub children: bool,
}

/// Block jobs: which kinds run, a copy's options, and their controls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BlockJobCapabilities {
    pub kinds: BlockJobKinds,
    pub copy: CopyModes,
    /// A job's speed can be limited (`--bandwidth`).
    pub bandwidth: bool,
    /// A copy or active commit waits, synchronised, in a ready phase until
    /// it is pivoted to the new image or finished without it.
    pub ready_pivot: bool,
}

/// The four block jobs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BlockJobKinds {
    pub pull: bool,
    /// A commit of images below the active layer.
    pub intermediate_commit: bool,
    /// A commit of the active layer (`--active`).
    pub active_commit: bool,
    pub copy: bool,
}

/// A block copy's options. As a request, those one copy asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CopyModes {
    /// Only the top layer, the copy keeping the source's backing (`--shallow`).
    pub shallow: bool,
    /// Into a raw destination (`--raw`, `--format raw`).
    pub raw: bool,
    /// Into a destination the caller made (`--reuse-external`).
    pub reuse_external: bool,
}

/// Storage beyond a domain's own disks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StorageCapabilities {
    /// Seed 004's persistent selections of a domain's disks.
    pub disk_sets: bool,
    /// `dir` and `fs` pools and their volumes.
    pub storage_pools: bool,
}

/// The refusal of something a driver cannot do: libvirt's
/// VIR_ERR_NO_SUPPORT, whose kind supplies virsh's prefix (`this function
/// is not supported by the connection driver: `), and a sentence naming
/// the driver, `the lxc driver cannot save memory state`. Every refusal
/// for want of a capability is worded here.
pub fn refusal(driver: &str, cannot: &str) -> Error {
    Error::no_support(format!("the {driver} driver {cannot}"))
}

/// What one snapshot creation needs of the driver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotRequest {
    pub kinds: SnapshotKinds,
    /// The domain runs (or is paused) while the snapshot is taken.
    pub live: bool,
}

impl SnapshotRequest {
    /// The needs of creating `def` with `flags` (not `--redefine`, which
    /// only records) of a domain that runs when `live`; `unnamed_disks`
    /// says whether the domain has a writable disk that `def` does not
    /// name, which gets the default kind: external with `--disk-only` or
    /// external memory, internal otherwise. Without a `<memory>` element, a
    /// full snapshot of a running domain is an internal checkpoint.
    fn new(def: &SnapshotDef, flags: &SnapshotCreateFlags, live: bool, unnamed_disks: bool) -> SnapshotRequest {
        let mut kinds = SnapshotKinds::default();
        match def.memory.as_ref().map(|m| m.snapshot.as_str()) {
            Some("external") => kinds.external_memory = true,
            Some("internal") => kinds.internal_memory = true,
            Some(_) => {}
            None => kinds.internal_memory = live && !flags.disk_only,
        }
        let default_mode = if flags.disk_only || kinds.external_memory { "external" } else { "internal" };
        let named = def.disks.iter().map(|d| d.snapshot.as_deref().unwrap_or(default_mode));
        for mode in named.chain(unnamed_disks.then_some(default_mode)) {
            match mode {
                "internal" => kinds.internal_disk = true,
                "external" => kinds.external_disk = true,
                _ => {}
            }
        }
        SnapshotRequest { kinds, live }
    }

    /// The needs of creating `def` with `flags` for `domain` (its
    /// persistent definition, which holds the disk set), running when
    /// `live`: a writable disk `def` does not name, and that `--disk-set`
    /// does not leave out, gets the default kind.
    pub fn for_domain(
        def: &SnapshotDef,
        flags: &SnapshotCreateFlags,
        live: bool,
        domain: &Domain,
    ) -> Result<SnapshotRequest> {
        let named: Vec<String> =
            def.disks.iter().filter_map(|d| domain.find_disk(&d.name).ok()).map(|d| d.target).collect();
        let unnamed_disks = domain.disks()?.iter().any(|d| {
            d.device == "disk" && !d.readonly && !named.contains(&d.target) && (d.selected || !flags.disk_set)
        });
        Ok(SnapshotRequest::new(def, flags, live, unnamed_disks))
    }
}

/// What one block job needs of the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockJobRequest {
    pub kind: BlockJobKind,
    pub copy: CopyModes,
    pub bandwidth: bool,
    /// The job is to end its ready phase, by a pivot or by finishing.
    pub ends_ready_phase: bool,
}

impl BlockJobRequest {
    pub fn pull(opts: &BlockPullOptions) -> BlockJobRequest {
        BlockJobRequest::plain(BlockJobKind::Pull, opts.bandwidth_bytes.is_some(), false)
    }

    /// `--active` asks for an active commit (libvirt lets it name an
    /// intermediate top too, but the flag is what the user asked for).
    pub fn commit(opts: &BlockCommitOptions) -> BlockJobRequest {
        let kind = if opts.active { BlockJobKind::ActiveCommit } else { BlockJobKind::Commit };
        BlockJobRequest::plain(kind, opts.bandwidth_bytes.is_some(), opts.pivot || opts.keep_overlay)
    }

    /// `ends_ready_phase`: `--pivot` or `--finish`.
    pub fn copy(opts: &BlockCopyOptions, ends_ready_phase: bool) -> BlockJobRequest {
        BlockJobRequest {
            kind: BlockJobKind::Copy,
            copy: CopyModes {
                shallow: opts.shallow,
                raw: opts.requested_format() == Some("raw"),
                reuse_external: opts.reuse_external,
            },
            bandwidth: opts.bandwidth_bytes.is_some(),
            ends_ready_phase,
        }
    }

    fn plain(kind: BlockJobKind, bandwidth: bool, ends_ready_phase: bool) -> BlockJobRequest {
        BlockJobRequest { kind, copy: CopyModes::default(), bandwidth, ends_ready_phase }
    }
}

/// One capability a request needs: whether the driver has it, and what
/// the refusal says it cannot do.
type Need = (bool, bool, &'static str);

const NO_BANDWIDTH: &str = "cannot limit a block job's bandwidth";
const NO_READY_PHASE: &str = "cannot pivot or finish a block job in a ready phase";

/// Why a driver on storage without image layers has no snapshots or block jobs.
const NO_IMAGE_LAYER: &str = "its storage has no image layer (such as qcow2) to hold one";

impl DriverCapabilities {
    /// Whether the domains this driver runs have image layers at all: one
    /// that runs domains but declares no snapshot kind and no block job
    /// runs them on storage with no layer to add or merge (raw images,
    /// devices, directories, memory).
    pub fn has_image_layers(&self) -> bool {
        !self.domains.run
            || self.snapshots.kinds != SnapshotKinds::default()
            || self.block_jobs.kinds != BlockJobKinds::default()
    }

    /// The refusal of a whole capability family (`snapshots`, `block
    /// jobs`) the driver lacks; for storage without image layers it says
    /// that is why (`the lxc driver cannot take snapshots: its storage has
    /// no image layer …`).
    pub fn refuse_without_layers(&self, cannot: &str, family: &str) -> Error {
        if self.has_image_layers() {
            refusal(&self.driver, &format!("does not support {family}"))
        } else {
            refusal(&self.driver, &format!("cannot {cannot}: {NO_IMAGE_LAYER}"))
        }
    }

    /// Refuses a vCPU count change of a running domain (`live`) that the
    /// driver cannot plug.
    pub fn check_vcpu_change(&self, live: bool) -> Result<()> {
        self.refuse_missing(&[(live, self.domains.vcpu_hotplug, "cannot plug vCPUs into a running domain")])
    }

    /// The first need the capabilities lack, refused.
    fn refuse_missing(&self, needs: &[Need]) -> Result<()> {
        match needs.iter().find(|(needed, has, _)| *needed && !*has) {
            Some((_, _, cannot)) => Err(refusal(&self.driver, cannot)),
            None => Ok(()),
        }
    }

    /// Refuses a snapshot whose kinds, or whose moment (running or shut
    /// off), the driver cannot take.
    pub fn check_snapshot_create(&self, request: &SnapshotRequest) -> Result<()> {
        let (has, needs) = (self.snapshots.kinds, request.kinds);
        let no_memory = !has.internal_memory && !has.external_memory;
        let creation = self.snapshots.creation;
        self.refuse_missing(&[
            (request.live, creation.live, "cannot take a snapshot of a running domain"),
            (!request.live, creation.offline, "cannot take a snapshot of a domain that is shut off"),
            (needs.internal_memory || needs.external_memory, !no_memory, "cannot save memory state"),
            (needs.internal_memory, has.internal_memory, "cannot save memory state inside a disk image"),
            (needs.external_memory, has.external_memory, "cannot save memory state to a file"),
            (needs.internal_disk, has.internal_disk, "cannot take internal disk snapshots"),
            (needs.external_disk, has.external_disk, "cannot take external disk snapshots"),
        ])
    }

    /// Refuses a revert to `snapshot` (in `snapshots`, the domain's list)
    /// that the revert rules forbid. The guest is left running or paused
    /// when the flags ask it, and by a snapshot of a running or paused
    /// guest anyway. A snapshot not in the list is left to the driver,
    /// which names it.
    pub fn check_revert(
        &self,
        snapshots: &[SnapshotSummary],
        snapshot: &str,
        flags: &SnapshotRevertFlags,
    ) -> Result<()> {
        let Some(target) = snapshots.iter().find(|s| s.name == snapshot) else {
            return Ok(());
        };
        let rules = self.snapshots.revert;
        let live_afterwards = flags.running || flags.paused || matches!(target.state.as_str(), "running" | "paused");
        self.refuse_missing(&[
            (!target.current, rules.to == RevertTo::AnySnapshot, "can only revert to the current snapshot"),
            (target.location != "internal", rules.external, "cannot revert to an external snapshot"),
            (
                live_afterwards,
                rules.guest == RevertedGuest::RunningOrPaused,
                "cannot leave a reverted guest running or paused",
            ),
        ])
    }

    /// Refuses a delete of `snapshot` (in `snapshots`, the domain's list)
    /// whose method the driver lacks, for the snapshot and, with
    /// `--children` or `--children-only`, its descendants. A snapshot not
    /// in the list is left to the driver, which names it.
    pub fn check_delete(
        &self,
        snapshots: &[SnapshotSummary],
        snapshot: &str,
        flags: &SnapshotDeleteFlags,
    ) -> Result<()> {
        let Some(target) = snapshots.iter().find(|s| s.name == snapshot) else {
            return Ok(());
        };
        let with_children = flags.children || flags.children_only;
        let mut deleted: Vec<&SnapshotSummary> = if flags.children_only { Vec::new() } else { vec![target] };
        if with_children {
            let mut children: HashMap<&str, Vec<&SnapshotSummary>> = HashMap::new();
            for s in snapshots {
                if let Some(parent) = &s.parent {
                    children.entry(parent).or_default().push(s);
                }
            }
            // Each snapshot once, even were the parents to form a loop.
            let mut seen: HashSet<&str> = HashSet::from([snapshot]);
            let mut parents = vec![snapshot];
            while let Some(parent) = parents.pop() {
                for child in children.get(parent).into_iter().flatten() {
                    if seen.insert(&child.name) {
                        deleted.push(child);
                        parents.push(&child.name);
                    }
                }
            }
        }
        let methods = self.snapshots.delete;
        let merges = !flags.metadata_only;
        self.refuse_missing(&[
            (flags.metadata_only, methods.metadata_only, "cannot delete a snapshot's metadata alone"),
            (with_children, methods.children, "cannot delete a snapshot's children"),
            (
                merges && deleted.iter().any(|s| s.location != "external"),
                methods.internal,
                "cannot delete internal snapshots",
            ),
            (
                merges && deleted.iter().any(|s| s.location != "internal"),
                methods.external_by_commit || methods.external_by_pull,
                "cannot delete external snapshots",
            ),
        ])
    }

    /// Refuses a block job of a kind, or with an option, the driver lacks.
    pub fn check_block_job(&self, request: &BlockJobRequest) -> Result<()> {
        let (jobs, kind) = (self.block_jobs, request.kind);
        let copy = request.copy;
        self.refuse_missing(&[
            (kind == BlockJobKind::Pull, jobs.kinds.pull, "cannot run a block pull"),
            (kind == BlockJobKind::Commit, jobs.kinds.intermediate_commit, "cannot run an intermediate block commit"),
            (kind == BlockJobKind::ActiveCommit, jobs.kinds.active_commit, "cannot run an active block commit"),
            (kind == BlockJobKind::Copy, jobs.kinds.copy, "cannot run a block copy"),
            (copy.shallow, jobs.copy.shallow, "cannot make a shallow block copy"),
            (copy.raw, jobs.copy.raw, "cannot copy into a raw destination"),
            (copy.reuse_external, jobs.copy.reuse_external, "cannot copy into an existing destination"),
            (request.bandwidth, jobs.bandwidth, NO_BANDWIDTH),
            (request.ends_ready_phase, jobs.ready_pivot, NO_READY_PHASE),
        ])
    }

    /// Refuses a change to a running job the driver lacks: a new
    /// bandwidth limit, or a pivot (`blockjob --bandwidth`, `--pivot`).
    pub fn check_block_job_control(&self, set_bandwidth: bool, pivot: bool) -> Result<()> {
        let jobs = self.block_jobs;
        self.refuse_missing(&[(set_bandwidth, jobs.bandwidth, NO_BANDWIDTH), (pivot, jobs.ready_pivot, NO_READY_PHASE)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::BlockCopyOptions;

    const NO_SUPPORT: &str = "this function is not supported by the connection driver: ";

    /// A driver that can do everything the model names, as QEMU can.
    fn everything(driver: &str) -> DriverCapabilities {
        let yes =
            SnapshotKinds { internal_disk: true, external_disk: true, internal_memory: true, external_memory: true };
        DriverCapabilities {
            driver: driver.into(),
            snapshots: SnapshotCapabilities {
                kinds: yes,
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
                copy: CopyModes { shallow: true, raw: true, reuse_external: true },
                bandwidth: true,
                ready_pivot: true,
            },
            ..Default::default()
        }
    }

    /// Asserts a refusal: libvirt's VIR_ERR_NO_SUPPORT, naming the driver
    /// and what it cannot do.
    fn assert_refused(result: Result<()>, message: &str) {
        let err = result.expect_err(message);
        assert_eq!(err.kind(), crate::ErrorKind::NoSupport);
        assert_eq!(err.kind().code(), 3);
        assert_eq!(err.to_string(), format!("{NO_SUPPORT}{message}"));
    }

    fn kinds(internal_disk: bool, external_disk: bool, internal_memory: bool, external_memory: bool) -> SnapshotKinds {
        SnapshotKinds { internal_disk, external_disk, internal_memory, external_memory }
    }

    fn request(kinds: SnapshotKinds, live: bool) -> SnapshotRequest {
        SnapshotRequest { kinds, live }
    }

    #[test]
    fn refusals_carry_virshs_no_support_prefix_from_the_kind() {
        let err = refusal("lxc", "cannot save memory state");
        assert_eq!(err.message(), "the lxc driver cannot save memory state");
        assert_eq!(err.to_string(), format!("{NO_SUPPORT}the lxc driver cannot save memory state"));
    }

    /// The LXC driver will declare no memory state at all: every request
    /// that saves memory is refused with one sentence, disk-only ones pass.
    #[test]
    fn a_driver_without_memory_state_refuses_every_memory_snapshot() {
        let mut lxc = everything("lxc");
        lxc.snapshots.kinds = kinds(false, true, false, false);
        for memory in [kinds(false, true, false, true), kinds(false, false, true, false)] {
            assert_refused(
                lxc.check_snapshot_create(&request(memory, true)),
                "the lxc driver cannot save memory state",
            );
        }
        lxc.check_snapshot_create(&request(kinds(false, true, false, false), true)).expect("a disk-only snapshot");
        assert_refused(
            lxc.check_snapshot_create(&request(kinds(true, false, false, false), false)),
            "the lxc driver cannot take internal disk snapshots",
        );
    }

    /// A driver on plain filesystems says why it has no snapshots or block
    /// jobs; one on image chains that lacks them only says it lacks them.
    #[test]
    fn a_driver_without_image_layers_says_so_when_refusing_snapshots_and_jobs() {
        let mut lxc = DriverCapabilities { driver: "lxc".into(), ..Default::default() };
        lxc.domains.run = true;
        assert!(!lxc.has_image_layers());
        let err = lxc.refuse_without_layers("take snapshots", "snapshots");
        assert_eq!(err.kind(), crate::ErrorKind::NoSupport);
        assert_eq!(
            err.message(),
            "the lxc driver cannot take snapshots: its storage has no image layer (such as qcow2) to hold one"
        );
        let mut pulls = lxc.clone();
        pulls.block_jobs.kinds.pull = true;
        assert_eq!(
            pulls.refuse_without_layers("take snapshots", "snapshots").message(),
            "the lxc driver does not support snapshots"
        );
        let nothing_runs = DriverCapabilities { driver: "test".into(), ..Default::default() };
        assert_eq!(
            nothing_runs.refuse_without_layers("run block jobs", "block jobs").message(),
            "the test driver does not support block jobs"
        );
    }

    #[test]
    fn each_missing_snapshot_kind_is_refused_by_name_and_the_others_pass() {
        let cases = [
            (kinds(true, false, false, false), "cannot take internal disk snapshots"),
            (kinds(false, true, false, false), "cannot take external disk snapshots"),
            (kinds(false, false, true, false), "cannot save memory state inside a disk image"),
            (kinds(false, false, false, true), "cannot save memory state to a file"),
        ];
        for (lacking, cannot) in cases {
            let mut caps = everything("test");
            let has = &mut caps.snapshots.kinds;
            has.internal_disk &= !lacking.internal_disk;
            has.external_disk &= !lacking.external_disk;
            has.internal_memory &= !lacking.internal_memory;
            has.external_memory &= !lacking.external_memory;
            assert!(!caps.snapshots.takes_every_snapshot(), "{cannot}");
            assert_refused(caps.check_snapshot_create(&request(lacking, true)), &format!("the test driver {cannot}"));
            for (other, _) in cases.iter().filter(|(k, _)| *k != lacking) {
                caps.check_snapshot_create(&request(*other, true)).expect(cannot);
            }
        }
    }

    #[test]
    fn live_and_offline_creation_are_checked_against_the_domains_state() {
        let disk = kinds(false, true, false, false);
        assert!(everything("test").snapshots.takes_every_snapshot());
        let mut caps = everything("test");
        caps.snapshots.creation.live = false;
        assert!(!caps.snapshots.takes_every_snapshot());
        assert_refused(
            caps.check_snapshot_create(&request(disk, true)),
            "the test driver cannot take a snapshot of a running domain",
        );
        caps.check_snapshot_create(&request(disk, false)).expect("offline");
        let mut caps = everything("test");
        caps.snapshots.creation.offline = false;
        assert_refused(
            caps.check_snapshot_create(&request(disk, false)),
            "the test driver cannot take a snapshot of a domain that is shut off",
        );
        caps.check_snapshot_create(&request(disk, true)).expect("live");
    }

    fn def(xml: &str) -> SnapshotDef {
        SnapshotDef::parse(xml).expect("snapshot XML")
    }

    /// The kinds a request needs follow libvirt's defaults: a full
    /// snapshot of a running domain is an internal checkpoint, `--disk-only`
    /// and external memory make unnamed disks external.
    #[test]
    fn a_request_needs_the_kinds_its_definition_and_flags_ask() {
        let plain = SnapshotCreateFlags::default();
        let disk_only = SnapshotCreateFlags { disk_only: true, ..plain };
        let empty = def("<domainsnapshot/>");
        assert_eq!(SnapshotRequest::new(&empty, &plain, true, true).kinds, kinds(true, false, true, false));
        assert_eq!(SnapshotRequest::new(&empty, &plain, false, true).kinds, kinds(true, false, false, false));
        assert_eq!(SnapshotRequest::new(&empty, &disk_only, true, true).kinds, kinds(false, true, false, false));
        let memspec = def("<domainsnapshot><memory snapshot='external' file='/m'/></domainsnapshot>");
        assert_eq!(SnapshotRequest::new(&memspec, &plain, true, true).kinds, kinds(false, true, false, true));
        let named = def("<domainsnapshot><memory snapshot='no'/><disks><disk name='vda' snapshot='external'/>\
             <disk name='vdb' snapshot='no'/></disks></domainsnapshot>");
        assert_eq!(SnapshotRequest::new(&named, &plain, true, false).kinds, kinds(false, true, false, false));
        assert_eq!(SnapshotRequest::new(&named, &plain, true, true).kinds, kinds(true, true, false, false));
        assert!(SnapshotRequest::new(&named, &plain, true, false).live);
    }

    /// Disks a request does not name get the default kind, except
    /// read-only ones and, with `--disk-set`, those outside the set.
    #[test]
    fn a_domains_unnamed_writable_disks_get_the_default_kind() {
        let disk = |target: &str, extra: &str| {
            format!(
                "<disk type='file' device='disk'{extra}><driver name='qemu' type='qcow2'/>\
                 <source file='/img/{target}.qcow2'/><target dev='{target}'/></disk>"
            )
        };
        let cdrom =
            "<disk type='file' device='cdrom'><source file='/img/cd.iso'/><target dev='sda'/><readonly/></disk>";
        let xml = format!(
            "<domain type='kvm'><name>vm</name><devices>{}{}{cdrom}</devices></domain>",
            disk("vda", " selected='yes'"),
            disk("vdb", "")
        );
        let dom = Domain::parse(&xml).expect("domain XML");
        let plain = SnapshotCreateFlags::default();
        let in_set = SnapshotCreateFlags { disk_set: true, ..plain };
        let vda_external =
            def("<domainsnapshot><disks><disk name='vda' snapshot='external'/></disks></domainsnapshot>");
        let by_path =
            def("<domainsnapshot><disks><disk name='/img/vdb.qcow2' snapshot='external'/></disks></domainsnapshot>");
        let both = def(
            "<domainsnapshot><disks><disk name='vda' snapshot='external'/><disk name='vdb' snapshot='no'/></disks></domainsnapshot>",
        );
        let needs = |d: &SnapshotDef, flags: &SnapshotCreateFlags| {
            SnapshotRequest::for_domain(d, flags, false, &dom).expect("request").kinds
        };
        assert_eq!(needs(&vda_external, &plain), kinds(true, true, false, false), "vdb gets the default");
        assert_eq!(needs(&by_path, &plain), kinds(true, true, false, false), "vda gets the default");
        assert_eq!(needs(&both, &plain), kinds(false, true, false, false), "the cdrom is left out");
        assert_eq!(needs(&vda_external, &in_set), kinds(false, true, false, false), "vdb is outside the set");
        assert_eq!(needs(&by_path, &in_set), kinds(true, true, false, false), "vda is in the set");
    }

    fn summary(name: &str, parent: Option<&str>, location: &str, state: &str, current: bool) -> SnapshotSummary {
        SnapshotSummary {
            name: name.into(),
            parent: parent.map(str::to_string),
            creation_time: 0,
            state: state.into(),
            current,
            location: location.into(),
        }
    }

    /// s1 (internal, of a running guest) <- s2 (external) <- s3 (internal, current).
    fn tree() -> Vec<SnapshotSummary> {
        vec![
            summary("s1", None, "internal", "running", false),
            summary("s2", Some("s1"), "external", "disk-snapshot", false),
            summary("s3", Some("s2"), "internal", "shutoff", true),
        ]
    }

    #[test]
    fn revert_rules_refuse_what_the_driver_cannot_and_pass_the_rest() {
        let stopped = SnapshotRevertFlags::default();
        let running = SnapshotRevertFlags { running: true, ..stopped };
        let paused = SnapshotRevertFlags { paused: true, ..stopped };
        let all = tree();

        let mut latest = everything("test");
        latest.snapshots.revert.to = RevertTo::LatestOnly;
        assert_refused(
            latest.check_revert(&all, "s2", &stopped),
            "the test driver can only revert to the current snapshot",
        );
        latest.check_revert(&all, "s3", &stopped).expect("the current snapshot");

        let mut internal_only = everything("test");
        internal_only.snapshots.revert.external = false;
        assert_refused(
            internal_only.check_revert(&all, "s2", &stopped),
            "the test driver cannot revert to an external snapshot",
        );
        internal_only.check_revert(&all, "s3", &stopped).expect("an internal snapshot");

        let mut stopped_only = everything("test");
        stopped_only.snapshots.revert.guest = RevertedGuest::StoppedOnly;
        let cannot = "the test driver cannot leave a reverted guest running or paused";
        assert_refused(stopped_only.check_revert(&all, "s3", &running), cannot);
        assert_refused(stopped_only.check_revert(&all, "s3", &paused), cannot);
        assert_refused(stopped_only.check_revert(&all, "s1", &stopped), cannot);
        stopped_only.check_revert(&all, "s3", &stopped).expect("a stopped guest");

        let nothing = DriverCapabilities { driver: "test".into(), ..Default::default() };
        nothing.check_revert(&all, "s9", &running).expect("an unknown snapshot is the driver's to name");
        everything("test").check_revert(&all, "s1", &running).expect("everything");
    }

    #[test]
    fn delete_methods_are_checked_for_the_snapshot_and_the_children_deleted_with_it() {
        let all = tree();
        let plain = SnapshotDeleteFlags::default();
        let children = SnapshotDeleteFlags { children: true, ..plain };
        let children_only = SnapshotDeleteFlags { children_only: true, ..plain };
        let metadata = SnapshotDeleteFlags { metadata_only: true, ..plain };

        let mut no_internal = everything("test");
        no_internal.snapshots.delete.internal = false;
        let cannot = "the test driver cannot delete internal snapshots";
        assert_refused(no_internal.check_delete(&all, "s3", &plain), cannot);
        assert_refused(no_internal.check_delete(&all, "s2", &children), cannot);
        assert_refused(no_internal.check_delete(&all, "s2", &children_only), cannot);
        no_internal.check_delete(&all, "s2", &plain).expect("an external snapshot alone");
        no_internal.check_delete(&all, "s3", &metadata).expect("metadata changes no image");

        let mut no_external = everything("test");
        no_external.snapshots.delete.external_by_commit = false;
        no_external.check_delete(&all, "s2", &plain).expect("by pull");
        no_external.snapshots.delete.external_by_pull = false;
        let cannot = "the test driver cannot delete external snapshots";
        assert_refused(no_external.check_delete(&all, "s2", &plain), cannot);
        assert_refused(no_external.check_delete(&all, "s1", &children_only), cannot);
        no_external.check_delete(&all, "s1", &plain).expect("an internal snapshot alone");

        let mut no_metadata = everything("test");
        no_metadata.snapshots.delete.metadata_only = false;
        assert_refused(
            no_metadata.check_delete(&all, "s3", &metadata),
            "the test driver cannot delete a snapshot's metadata alone",
        );
        no_metadata.check_delete(&all, "s3", &plain).expect("a delete that merges");

        let mut no_children = everything("test");
        no_children.snapshots.delete.children = false;
        let cannot = "the test driver cannot delete a snapshot's children";
        assert_refused(no_children.check_delete(&all, "s1", &children), cannot);
        assert_refused(no_children.check_delete(&all, "s1", &children_only), cannot);
        no_children.check_delete(&all, "s1", &plain).expect("the snapshot alone");

        let nothing = DriverCapabilities { driver: "test".into(), ..Default::default() };
        nothing.check_delete(&all, "s9", &children).expect("an unknown snapshot is the driver's to name");

        // Records whose parents form a loop are each checked once.
        let looped = [
            summary("a", Some("b"), "external", "disk-snapshot", true),
            summary("b", Some("a"), "internal", "shutoff", false),
        ];
        assert_refused(
            no_internal.check_delete(&looped, "a", &children_only),
            "the test driver cannot delete internal snapshots",
        );
        everything("test").check_delete(&looped, "a", &children).expect("everything");
    }

    #[test]
    fn each_missing_block_job_capability_is_refused_by_name() {
        let pull = BlockPullOptions::default();
        let commit = BlockCommitOptions::default();
        let active = BlockCommitOptions { active: true, ..commit.clone() };
        let pivot = BlockCommitOptions { pivot: true, ..active.clone() };
        let keep = BlockCommitOptions { keep_overlay: true, ..active.clone() };
        let copy = BlockCopyOptions { dest: "/copy".into(), ..Default::default() };
        let shallow = BlockCopyOptions { shallow: true, ..copy.clone() };
        let raw = BlockCopyOptions { raw: true, ..copy.clone() };
        let raw_format = BlockCopyOptions { format: Some("raw".into()), ..copy.clone() };
        let reuse = BlockCopyOptions { reuse_external: true, ..copy.clone() };
        let limited = BlockPullOptions { bandwidth_bytes: Some(1), ..pull.clone() };
        let (plain_pull, plain_copy) = (BlockJobRequest::pull(&pull), BlockJobRequest::copy(&copy, false));
        let plain_commit = BlockJobRequest::commit(&active);
        // What each case needs, the capability taken away, the refusal,
        // and a request that does without that capability and still passes.
        type Take = fn(&mut BlockJobCapabilities);
        let cases: [(BlockJobRequest, Take, &str, BlockJobRequest); 11] = [
            (plain_pull, |j| j.kinds.pull = false, "cannot run a block pull", plain_copy),
            (
                BlockJobRequest::commit(&commit),
                |j| j.kinds.intermediate_commit = false,
                "cannot run an intermediate block commit",
                plain_commit,
            ),
            (plain_commit, |j| j.kinds.active_commit = false, "cannot run an active block commit", plain_pull),
            (plain_copy, |j| j.kinds.copy = false, "cannot run a block copy", plain_commit),
            (
                BlockJobRequest::copy(&shallow, false),
                |j| j.copy.shallow = false,
                "cannot make a shallow block copy",
                plain_copy,
            ),
            (
                BlockJobRequest::copy(&raw, false),
                |j| j.copy.raw = false,
                "cannot copy into a raw destination",
                plain_copy,
            ),
            (
                BlockJobRequest::copy(&raw_format, false),
                |j| j.copy.raw = false,
                "cannot copy into a raw destination",
                plain_copy,
            ),
            (
                BlockJobRequest::copy(&reuse, false),
                |j| j.copy.reuse_external = false,
                "cannot copy into an existing destination",
                plain_copy,
            ),
            (
                BlockJobRequest::pull(&limited),
                |j| j.bandwidth = false,
                "cannot limit a block job's bandwidth",
                plain_pull,
            ),
            (
                BlockJobRequest::commit(&pivot),
                |j| j.ready_pivot = false,
                "cannot pivot or finish a block job in a ready phase",
                plain_commit,
            ),
            (
                BlockJobRequest::copy(&copy, true),
                |j| j.ready_pivot = false,
                "cannot pivot or finish a block job in a ready phase",
                plain_copy,
            ),
        ];
        for (request, take, cannot, still_accepted) in &cases {
            let mut caps = everything("test");
            caps.check_block_job(request).expect("a driver with everything");
            take(&mut caps.block_jobs);
            assert_refused(caps.check_block_job(request), &format!("the test driver {cannot}"));
            caps.check_block_job(still_accepted).unwrap_or_else(|e| panic!("refused without {cannot}: {e}"));
        }
        let mut no_ready = everything("test");
        no_ready.block_jobs.ready_pivot = false;
        assert!(
            no_ready.check_block_job(&BlockJobRequest::commit(&keep)).is_err(),
            "--keep-overlay ends a ready phase"
        );
    }

    #[test]
    fn a_running_jobs_bandwidth_and_pivot_are_checked() {
        let everything = everything("test");
        everything.check_block_job_control(true, true).expect("a driver with everything");
        let mut no_bandwidth = everything.clone();
        no_bandwidth.block_jobs.bandwidth = false;
        assert_refused(
            no_bandwidth.check_block_job_control(true, false),
            "the test driver cannot limit a block job's bandwidth",
        );
        no_bandwidth.check_block_job_control(false, true).expect("a pivot");
        let mut no_ready = everything;
        no_ready.block_jobs.ready_pivot = false;
        assert_refused(
            no_ready.check_block_job_control(false, true),
            "the test driver cannot pivot or finish a block job in a ready phase",
        );
        no_ready.check_block_job_control(true, false).expect("a bandwidth");
        no_ready.check_block_job_control(false, false).expect("an abort or --info");
    }

    #[test]
    fn capabilities_serialise_both_ways() {
        let mut caps = everything("qemu");
        caps.notes.push("a note".into());
        caps.honoured_elements.push("disk".into());
        let json = serde_json::to_string(&caps).expect("serialise");
        let back: DriverCapabilities = serde_json::from_str(&json).expect("deserialise");
        assert_eq!(back, caps);
        let value: serde_json::Value = serde_json::from_str(&json).expect("JSON");
        assert_eq!(value["snapshots"]["revert"]["to"], "any-snapshot");
        assert_eq!(value["block_jobs"]["kinds"]["active_commit"], true);
    }

    /// Capabilities from a plugin that predates some of them: what its JSON
    /// does not name is absent, and the rest is read as it says.
    #[test]
    fn capabilities_missing_newer_fields_read_as_absent() {
        let json =
            r#"{"driver":"old","uri":"old:///","domains":{"run":true},"snapshots":{"kinds":{"internal_disk":true}}}"#;
        let caps: DriverCapabilities = serde_json::from_str(json).expect("an older plugin's capabilities");
        assert_eq!(caps.driver, "old");
        assert!(caps.snapshots.kinds.internal_disk);
        assert!(!caps.snapshots.kinds.external_disk);
        assert!(caps.domains.run);
        assert!(!caps.domains.save_restore && !caps.domains.migration);
    }
}
