//! Typed requests with their validation, shared by every driver, so that a
//! combination is accepted or refused the same way whoever implements it.

use serde::Serialize;

use crate::error::{Error, Result};

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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
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

/// `blockcommit`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
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

/// `blockcopy`, with seed 002's flag rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
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

/// `blockjob --abort` / `--pivot`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BlockJobAbortFlags {
    pub pivot: bool,
    /// Return before QEMU confirms the end of the job.
    pub no_wait: bool,
}

/// `snapshot-create` / `snapshot-create-as` flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
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

/// `snapshot-revert` flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
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

/// `snapshot-delete` flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
