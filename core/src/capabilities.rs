//! What a driver can do, as plain data every driver fills in, and the
//! wording of a refusal for want of it.
//!
//! One small struct per capability family (snapshots, reverts, deletes,
//! block jobs, storage, domains), so a new driver states what its
//! hypervisor can do; whatever a driver cannot do is refused with
//! libvirt's VIR_ERR_NO_SUPPORT, worded the same for every driver
//! (`the lxc driver cannot save memory state`).

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Everything a driver can do, and what it honours of a definition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// Snapshots: what they can hold, when they can be taken, how they are
/// reverted to and deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCapabilities {
    pub kinds: SnapshotKinds,
    pub creation: SnapshotCreation,
    pub revert: RevertRules,
    pub delete: DeleteMethods,
}

/// What a snapshot can hold. As a request, what one snapshot needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
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
pub struct SnapshotCreation {
    pub live: bool,
    pub offline: bool,
}

/// Which snapshots can be reverted to, and what the guest can be afterwards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn refusals_carry_virshs_no_support_prefix_from_the_kind() {
        let err = refusal("lxc", "cannot save memory state");
        assert_eq!(err.message(), "the lxc driver cannot save memory state");
        assert_eq!(err.to_string(), format!("{NO_SUPPORT}the lxc driver cannot save memory state"));
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
}
