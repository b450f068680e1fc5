//! Typed requests with their validation, shared by every driver, so that a
//! combination is accepted or refused the same way whoever implements it.
//!
//! On the wire (see [`crate::wire`]) a request's flags are one bit set,
//! with libvirt's values where libvirt has the flag; a flag only Strata has
//! takes a bit from [`STRATA_FLAGS`] up.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The lowest bit of Strata's own flags in every flag set. libvirt's flag
/// sets used here end far below it (the widest, snapshot create's, at bit
/// 9), so it leaves them room to grow.
pub const STRATA_FLAGS: u32 = 1 << 24;

/// Gives a struct of boolean flags its bit set: `bits()`, `from_bits()`
/// (refusing bits the set does not know, as libvirt's `virCheckFlags`
/// does) and `KNOWN_BITS`. With `as u32`, also the conversions that make
/// the bit set the struct's serde form.
macro_rules! wire_flags {
    ($ty:ident as u32 { $($field:ident = $bit:expr),+ $(,)? }) => {
        $crate::options::wire_flags!($ty { $($field = $bit),+ });

        impl From<$ty> for u32 {
            fn from(flags: $ty) -> u32 {
                flags.bits()
            }
        }

        impl TryFrom<u32> for $ty {
            type Error = $crate::error::Error;
            fn try_from(bits: u32) -> $crate::error::Result<$ty> {
                $ty::from_bits(bits)
            }
        }
    };
    ($ty:ident { $($field:ident = $bit:expr),+ $(,)? }) => {
        impl $ty {
            /// Every bit of this flag set.
            pub const KNOWN_BITS: u32 = $($bit)|+;

            /// The flags set, as one bit set.
            pub fn bits(&self) -> u32 {
                let mut bits = 0;
                $(if self.$field {
                    bits |= $bit;
                })+
                bits
            }

            /// The flags `bits` sets, every other field at its default; a
            /// bit the set does not know is refused.
            #[allow(clippy::needless_update)]
            pub fn from_bits(bits: u32) -> $crate::error::Result<$ty> {
                let unknown = bits & !Self::KNOWN_BITS;
                if unknown != 0 {
                    return Err($crate::error::Error::invalid_arg(format!(
                        "unsupported flags (0x{unknown:x}) in {}",
                        stringify!($ty)
                    )));
                }
                Ok($ty { $($field: bits & $bit != 0,)+ ..Default::default() })
            }
        }
    };
}
pub(crate) use wire_flags;

fn exclusive(a: bool, a_name: &str, b: bool, b_name: &str) -> Result<()> {
    if a && b {
        return Err(Error::invalid_arg(format!("Options {a_name} and {b_name} are mutually exclusive")));
    }
    Ok(())
}

fn requires(a: bool, a_name: &str, b: bool, b_name: &str) -> Result<()> {
    if a && !b {
        return Err(Error::invalid_arg(format!("Option {a_name} requires option {b_name}")));
    }
    Ok(())
}

/// `blockpull`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "ChainJobWire", try_from = "ChainJobWire")]
pub struct BlockPullOptions {
    /// Path or `disk[N]`; `None` pulls everything below the target layer.
    pub base: Option<String>,
    /// The layer that receives the data (Strata extension, `--top`);
    /// `None` is the active layer, as in virsh.
    pub top: Option<String>,
    pub bandwidth_bytes: Option<u64>,
    pub keep_relative: bool,
}

impl BlockPullOptions {
    pub fn validate(&self) -> Result<()> {
        requires(self.keep_relative, "--keep-relative", self.base.is_some(), "--base")
    }
}

// virsh pulls with a base through virDomainBlockRebase, so its flag values.
wire_flags!(BlockPullOptions {
    keep_relative = 1 << 4, // VIR_DOMAIN_BLOCK_REBASE_RELATIVE
});

/// A pull's or a commit's options on the wire: the layers and bandwidth,
/// and the flags as one bit set.
#[derive(Serialize, Deserialize)]
struct ChainJobWire {
    base: Option<String>,
    top: Option<String>,
    bandwidth_bytes: Option<u64>,
    flags: u32,
}

/// Converts an options struct with a pull's or a commit's values to and
/// from [`ChainJobWire`].
macro_rules! chain_job_wire {
    ($ty:ident) => {
        impl From<$ty> for ChainJobWire {
            fn from(o: $ty) -> Self {
                let flags = o.bits();
                ChainJobWire { base: o.base, top: o.top, bandwidth_bytes: o.bandwidth_bytes, flags }
            }
        }

        impl TryFrom<ChainJobWire> for $ty {
            type Error = Error;
            fn try_from(w: ChainJobWire) -> Result<Self> {
                Ok($ty { base: w.base, top: w.top, bandwidth_bytes: w.bandwidth_bytes, ..$ty::from_bits(w.flags)? })
            }
        }
    };
}

chain_job_wire!(BlockPullOptions);

/// `blockcommit`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "ChainJobWire", try_from = "ChainJobWire")]
pub struct BlockCommitOptions {
    pub base: Option<String>,
    pub top: Option<String>,
    pub shallow: bool,
    pub active: bool,
    pub pivot: bool,
    pub keep_overlay: bool,
    pub delete: bool,
    pub bandwidth_bytes: Option<u64>,
    pub keep_relative: bool,
    /// Commit even into an image a snapshot froze, changing what reverting
    /// to that snapshot gives (`--allow-snapshot-change`, a Strata flag).
    pub allow_snapshot_change: bool,
}

impl BlockCommitOptions {
    pub fn validate(&self) -> Result<()> {
        exclusive(self.shallow, "--shallow", self.base.is_some(), "--base")?;
        exclusive(self.pivot, "--pivot", self.keep_overlay, "--keep-overlay")?;
        requires(self.pivot, "--pivot", self.active, "--active")?;
        requires(self.keep_overlay, "--keep-overlay", self.active, "--active")
    }
}

wire_flags!(BlockCommitOptions {
    shallow = 1 << 0,      // VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
    delete = 1 << 1,       // VIR_DOMAIN_BLOCK_COMMIT_DELETE
    active = 1 << 2,       // VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
    keep_relative = 1 << 3, // VIR_DOMAIN_BLOCK_COMMIT_RELATIVE
    // virsh's --pivot and --keep-overlay (it pivots or aborts itself) and
    // Strata's --allow-snapshot-change: Strata's own.
    pivot = STRATA_FLAGS,
    keep_overlay = STRATA_FLAGS << 1,
    allow_snapshot_change = STRATA_FLAGS << 2,
});

chain_job_wire!(BlockCommitOptions);

/// `blockcopy`, with seed 002's flag rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "BlockCopyWire", try_from = "BlockCopyWire")]
pub struct BlockCopyOptions {
    /// Absolute path of the destination.
    pub dest: String,
    /// `--format FMT`; `raw` is the same as `--raw`.
    pub format: Option<String>,
    /// `--raw` (seed 002's COPY_RAW).
    pub raw: bool,
    /// Copy only the top layer; the destination gets the source's backing.
    pub shallow: bool,
    /// Use a destination the caller created.
    pub reuse_external: bool,
    pub bandwidth_bytes: Option<u64>,
    pub granularity: Option<u64>,
    pub buf_size: Option<u64>,
}

impl BlockCopyOptions {
    /// The destination format the flags ask for, if they fix one.
    pub fn requested_format(&self) -> Option<&str> {
        if self.raw {
            Some("raw")
        } else {
            self.format.as_deref()
        }
    }

    /// Checks the flags alone. Returns warnings for combinations seed 002
    /// calls legal but of little use.
    pub fn validate(&self) -> Result<Vec<String>> {
        if !self.dest.starts_with('/') {
            return Err(Error::invalid_arg(format!("copy destination '{}' must be an absolute path", self.dest)));
        }
        if self.raw && self.format.as_deref().is_some_and(|f| f != "raw") {
            return Err(Error::invalid_arg("Options --raw and --format are mutually exclusive"));
        }
        if let Some(g) = self.granularity {
            if !g.is_power_of_two() || !(512..=64 * 1024 * 1024).contains(&g) {
                return Err(Error::invalid_arg(format!(
                    "granularity {g} must be a power of two between 512 and 67108864"
                )));
            }
        }
        if self.buf_size == Some(0) {
            return Err(Error::invalid_arg("buf-size must be greater than 0"));
        }
        let mut warnings = Vec::new();
        if self.reuse_external && self.requested_format() == Some("raw") && !self.shallow {
            warnings.push(
                "a full copy into a reused raw destination needs that destination to be empty; nothing in it is reused"
                    .to_string(),
            );
        }
        Ok(warnings)
    }

    /// Checks the flags against the disk being copied: `source_format` of
    /// its active layer and whether that layer has a backing image.
    pub fn validate_for_source(&self, disk: &str, source_format: &str, has_backing: bool) -> Result<()> {
        if self.shallow && self.requested_format() == Some("raw") && !self.reuse_external {
            // A new raw file cannot have a backing file, so a shallow raw
            // copy is only whole when the source is one raw layer.
            if source_format != "raw" || has_backing {
                return Err(Error::invalid_arg(format!(
                    "a shallow copy of disk '{disk}' into a new raw file would lose the data of its backing chain: \
                     the source is {source_format}{}; use --shallow without --raw, or --raw without --shallow",
                    if has_backing { " with a backing file" } else { "" }
                )));
            }
        }
        Ok(())
    }
}

// virDomainBlockRebase's copy flags, whose shallow and reuse bits
// virDomainBlockCopy shares; raw is VIR_DOMAIN_BLOCK_REBASE_COPY_RAW.
wire_flags!(BlockCopyOptions {
    shallow = 1 << 0,        // VIR_DOMAIN_BLOCK_COPY_SHALLOW
    reuse_external = 1 << 1, // VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
    raw = 1 << 2,            // VIR_DOMAIN_BLOCK_REBASE_COPY_RAW
});

/// [`BlockCopyOptions`] on the wire: its values, and its flags as one bit set.
#[derive(Serialize, Deserialize)]
struct BlockCopyWire {
    dest: String,
    format: Option<String>,
    bandwidth_bytes: Option<u64>,
    granularity: Option<u64>,
    buf_size: Option<u64>,
    flags: u32,
}

impl From<BlockCopyOptions> for BlockCopyWire {
    fn from(o: BlockCopyOptions) -> Self {
        let flags = o.bits();
        BlockCopyWire {
            dest: o.dest,
            format: o.format,
            bandwidth_bytes: o.bandwidth_bytes,
            granularity: o.granularity,
            buf_size: o.buf_size,
            flags,
        }
    }
}

impl TryFrom<BlockCopyWire> for BlockCopyOptions {
    type Error = Error;
    fn try_from(w: BlockCopyWire) -> Result<Self> {
        Ok(BlockCopyOptions {
            dest: w.dest,
            format: w.format,
            bandwidth_bytes: w.bandwidth_bytes,
            granularity: w.granularity,
            buf_size: w.buf_size,
            ..Self::from_bits(w.flags)?
        })
    }
}

/// `blockjob --abort` / `--pivot`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u32", try_from = "u32")]
pub struct BlockJobAbortFlags {
    pub pivot: bool,
    /// Return before QEMU confirms the end of the job.
    pub no_wait: bool,
}

wire_flags!(BlockJobAbortFlags as u32 {
    no_wait = 1 << 0, // VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC
    pivot = 1 << 1,   // VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
});

/// `snapshot-create` / `snapshot-create-as` flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u32", try_from = "u32")]
pub struct SnapshotCreateFlags {
    pub redefine: bool,
    pub current: bool,
    pub no_metadata: bool,
    pub disk_only: bool,
    pub reuse_external: bool,
    pub atomic: bool,
    pub live: bool,
    pub branch: bool,
    pub disk_set: bool,
}

impl SnapshotCreateFlags {
    pub fn validate(&self) -> Result<()> {
        requires(self.current, "--current", self.redefine, "--redefine")?;
        exclusive(self.redefine, "--redefine", self.no_metadata, "--no-metadata")?;
        exclusive(self.redefine, "--redefine", self.branch, "--branch")?;
        exclusive(self.redefine, "--redefine", self.disk_set, "--disk-set")?;
        exclusive(self.live, "--live", self.disk_only, "--disk-only")
    }
}

wire_flags!(SnapshotCreateFlags as u32 {
    redefine = 1 << 0,       // VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
    current = 1 << 1,        // VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
    no_metadata = 1 << 2,    // VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
    disk_only = 1 << 4,      // VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
    reuse_external = 1 << 5, // VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
    atomic = 1 << 7,         // VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
    live = 1 << 8,           // VIR_DOMAIN_SNAPSHOT_CREATE_LIVE
    // --branch and --disk-set are Strata's own.
    branch = STRATA_FLAGS,
    disk_set = STRATA_FLAGS << 1,
});

/// `snapshot-revert` flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u32", try_from = "u32")]
pub struct SnapshotRevertFlags {
    pub running: bool,
    pub paused: bool,
    pub force: bool,
}

impl SnapshotRevertFlags {
    pub fn validate(&self) -> Result<()> {
        exclusive(self.running, "--running", self.paused, "--paused")
    }
}

wire_flags!(SnapshotRevertFlags as u32 {
    running = 1 << 0, // VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING
    paused = 1 << 1,  // VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED
    force = 1 << 2,   // VIR_DOMAIN_SNAPSHOT_REVERT_FORCE
});

/// `snapshot-delete` flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u32", try_from = "u32")]
pub struct SnapshotDeleteFlags {
    pub children: bool,
    pub children_only: bool,
    pub metadata_only: bool,
}

impl SnapshotDeleteFlags {
    pub fn validate(&self) -> Result<()> {
        exclusive(self.children, "--children", self.children_only, "--children-only")
    }
}

wire_flags!(SnapshotDeleteFlags as u32 {
    children = 1 << 0,      // VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN
    metadata_only = 1 << 1, // VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY
    children_only = 1 << 2, // VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN_ONLY
});

#[cfg(test)]
mod tests {
    use std::fmt::Debug;

    use serde_json::json;

    use super::*;
    use crate::driver::{
        DefineFlags, DumpXmlFlags, PinScope, PoolBuildFlags, StartFlags, UndefineFlags, VolumeResizeFlags,
    };

    fn copy(shallow: bool, reuse: bool, raw: bool) -> BlockCopyOptions {
        BlockCopyOptions { dest: "/images/copy.img".into(), shallow, reuse_external: reuse, raw, ..Default::default() }
    }

    /// Seed 002's eight combinations of shallow / reuse-external / raw, each
    /// against a qcow2 source with a backing chain and a lone raw source.
    #[test]
    fn block_copy_flag_combinations_follow_seed_002() {
        let accepted_for_chain = [
            (false, false, false), // full copy, same format
            (false, false, true),  // full copy, flattened to raw
            (true, false, false),  // shallow, new file backed by the source's backing
            (false, true, false),  // reuse, full copy
            (true, true, false),   // reuse, shallow
            (true, true, true),    // reuse raw, shallow
            (false, true, true),   // reuse raw, full: legal but warned
        ];
        for (s, r, raw) in accepted_for_chain {
            let o = copy(s, r, raw);
            o.validate().expect("flags alone are valid");
            o.validate_for_source("vda", "qcow2", true).unwrap_or_else(|e| panic!("{s} {r} {raw} refused: {e}"));
        }
        let warned = copy(false, true, true).validate().expect("valid");
        assert_eq!(warned.len(), 1, "reuse-external + raw without shallow warns");

        let refused = copy(true, false, true);
        let err = refused.validate_for_source("vda", "qcow2", true).expect_err("shallow raw of a chain");
        assert!(err.to_string().contains("would lose the data"), "{err}");
        refused.validate_for_source("vdb", "raw", false).expect("a lone raw source may be copied shallow raw");
    }

    #[test]
    fn block_copy_rejects_conflicting_or_bad_values() {
        let mut o = copy(false, false, true);
        o.format = Some("qcow2".into());
        assert!(o.validate().is_err());
        let mut o = copy(false, false, false);
        o.dest = "relative.img".into();
        assert!(o.validate().is_err());
        let mut o = copy(false, false, false);
        o.granularity = Some(1000);
        assert!(o.validate().is_err());
    }

    #[test]
    fn commit_and_pull_flag_rules() {
        let bad = BlockCommitOptions { pivot: true, ..Default::default() };
        assert!(bad.validate().is_err(), "--pivot needs --active");
        let bad = BlockCommitOptions { shallow: true, base: Some("vda[2]".into()), ..Default::default() };
        assert!(bad.validate().is_err());
        let ok = BlockCommitOptions { active: true, pivot: true, ..Default::default() };
        ok.validate().expect("active pivot");
        assert!(BlockPullOptions { keep_relative: true, ..Default::default() }.validate().is_err());
        assert!(SnapshotCreateFlags { current: true, ..Default::default() }.validate().is_err());
        assert!(SnapshotRevertFlags { running: true, paused: true, force: false }.validate().is_err());
    }

    /// Checks one flag set: every combination of its bits comes back from
    /// `from_bits`, and a bit it does not know is refused, named in hex.
    fn check_flag_set<T: Debug>(name: &str, known: u32, from_bits: fn(u32) -> Result<T>, bits: fn(&T) -> u32) {
        let mut subset = known;
        loop {
            let flags = from_bits(subset).unwrap_or_else(|e| panic!("{name} refused its own bits {subset:#x}: {e}"));
            assert_eq!(bits(&flags), subset, "{name}: {flags:?}");
            if subset == 0 {
                break;
            }
            subset = (subset - 1) & known;
        }
        let unknown = !known & (known << 1 | 1 << 31);
        let lowest_unknown = unknown & unknown.wrapping_neg();
        for stray in [lowest_unknown, 1 << 31] {
            let err = from_bits(known | stray).expect_err("an unknown bit is refused");
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArg);
            assert_eq!(err.message(), format!("unsupported flags ({stray:#x}) in {name}"));
        }
    }

    macro_rules! check_flag_sets {
        ($($ty:ident),+) => {
            $(check_flag_set(stringify!($ty), $ty::KNOWN_BITS, $ty::from_bits, $ty::bits);)+
        };
    }

    #[test]
    fn every_flag_set_round_trips_through_its_bits_and_refuses_unknown_ones() {
        check_flag_sets!(
            DefineFlags,
            DumpXmlFlags,
            UndefineFlags,
            StartFlags,
            PinScope,
            PoolBuildFlags,
            VolumeResizeFlags,
            BlockJobAbortFlags,
            SnapshotCreateFlags,
            SnapshotRevertFlags,
            SnapshotDeleteFlags,
            BlockPullOptions,
            BlockCommitOptions,
            BlockCopyOptions
        );
    }

    /// Asserts the bits of each flag set alone: `Type.field = value, "name";`.
    macro_rules! assert_flag_bits {
        ($($ty:ident . $field:ident = $value:expr, $name:literal;)+) => {
            $(assert_eq!($ty { $field: true, ..Default::default() }.bits(), $value, "{} is {:#x}", $name, $value);)+
        };
    }

    /// The values of libvirt's headers (libvirt-domain.h,
    /// libvirt-domain-snapshot.h, libvirt-storage.h) for each flag libvirt
    /// has, and Strata's own flags from `STRATA_FLAGS` up.
    #[test]
    #[allow(clippy::needless_update)]
    fn flag_bits_are_libvirts() {
        assert_flag_bits! {
            DefineFlags.validate = 1 << 0, "VIR_DOMAIN_DEFINE_VALIDATE";
            DumpXmlFlags.inactive = 1 << 1, "VIR_DOMAIN_XML_INACTIVE";
            UndefineFlags.snapshots_metadata = 1 << 1, "VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA";
            StartFlags.paused = 1 << 0, "VIR_DOMAIN_START_PAUSED";
            PinScope.live = 1 << 0, "VIR_DOMAIN_AFFECT_LIVE";
            PinScope.config = 1 << 1, "VIR_DOMAIN_AFFECT_CONFIG";
            PoolBuildFlags.no_overwrite = 1 << 2, "VIR_STORAGE_POOL_BUILD_NO_OVERWRITE";
            PoolBuildFlags.overwrite = 1 << 3, "VIR_STORAGE_POOL_BUILD_OVERWRITE";
            VolumeResizeFlags.delta = 1 << 1, "VIR_STORAGE_VOL_RESIZE_DELTA";
            VolumeResizeFlags.shrink = 1 << 2, "VIR_STORAGE_VOL_RESIZE_SHRINK";
            BlockJobAbortFlags.no_wait = 1 << 0, "VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC";
            BlockJobAbortFlags.pivot = 1 << 1, "VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT";
            SnapshotCreateFlags.redefine = 1 << 0, "VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE";
            SnapshotCreateFlags.current = 1 << 1, "VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT";
            SnapshotCreateFlags.no_metadata = 1 << 2, "VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA";
            SnapshotCreateFlags.disk_only = 1 << 4, "VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY";
            SnapshotCreateFlags.reuse_external = 1 << 5, "VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT";
            SnapshotCreateFlags.atomic = 1 << 7, "VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC";
            SnapshotCreateFlags.live = 1 << 8, "VIR_DOMAIN_SNAPSHOT_CREATE_LIVE";
            SnapshotRevertFlags.running = 1 << 0, "VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING";
            SnapshotRevertFlags.paused = 1 << 1, "VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED";
            SnapshotRevertFlags.force = 1 << 2, "VIR_DOMAIN_SNAPSHOT_REVERT_FORCE";
            SnapshotDeleteFlags.children = 1 << 0, "VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN";
            SnapshotDeleteFlags.metadata_only = 1 << 1, "VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY";
            SnapshotDeleteFlags.children_only = 1 << 2, "VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN_ONLY";
            BlockPullOptions.keep_relative = 1 << 4, "VIR_DOMAIN_BLOCK_REBASE_RELATIVE";
            BlockCommitOptions.shallow = 1 << 0, "VIR_DOMAIN_BLOCK_COMMIT_SHALLOW";
            BlockCommitOptions.delete = 1 << 1, "VIR_DOMAIN_BLOCK_COMMIT_DELETE";
            BlockCommitOptions.active = 1 << 2, "VIR_DOMAIN_BLOCK_COMMIT_ACTIVE";
            BlockCommitOptions.keep_relative = 1 << 3, "VIR_DOMAIN_BLOCK_COMMIT_RELATIVE";
            BlockCopyOptions.shallow = 1 << 0, "VIR_DOMAIN_BLOCK_COPY_SHALLOW";
            BlockCopyOptions.reuse_external = 1 << 1, "VIR_DOMAIN_BLOCK_COPY_REUSE_EXT";
            BlockCopyOptions.raw = 1 << 2, "VIR_DOMAIN_BLOCK_REBASE_COPY_RAW";
        }
        let strata = STRATA_FLAGS;
        assert_flag_bits! {
            DumpXmlFlags.refresh_chain = strata, "--refresh-chain";
            SnapshotCreateFlags.branch = strata, "--branch";
            SnapshotCreateFlags.disk_set = strata << 1, "--disk-set";
            BlockCommitOptions.pivot = strata, "virsh's blockcommit --pivot";
            BlockCommitOptions.keep_overlay = strata << 1, "virsh's blockcommit --keep-overlay";
            BlockCommitOptions.allow_snapshot_change = strata << 2, "--allow-snapshot-change";
        }
    }

    #[test]
    fn flags_are_bit_sets_on_the_wire() {
        let flags = SnapshotCreateFlags { disk_only: true, atomic: true, ..Default::default() };
        assert_eq!(serde_json::to_string(&flags).expect("encodes"), "144");
        let commit = BlockCommitOptions { active: true, shallow: true, ..Default::default() };
        assert_eq!(
            serde_json::to_value(&commit).expect("encodes"),
            json!({ "base": null, "top": null, "bandwidth_bytes": null, "flags": 5 })
        );
        let err = serde_json::from_str::<SnapshotDeleteFlags>("9").expect_err("bit 3 is unknown");
        assert!(err.to_string().contains("unsupported flags (0x8) in SnapshotDeleteFlags"), "{err}");
        let err = serde_json::from_value::<BlockCopyOptions>(json!({ "dest": "/x", "format": null,
            "bandwidth_bytes": null, "granularity": null, "buf_size": null, "flags": 8 }))
        .expect_err("bit 3 is unknown");
        assert!(err.to_string().contains("unsupported flags (0x8) in BlockCopyOptions"), "{err}");
    }
}
