//! Typed replies of the QMP commands Strata uses (QEMU 7.2 schema).
//!
//! Every type here is meant to survive a newer QEMU: unknown fields are
//! ignored (serde's default), enums fall back to `Unknown` for values added
//! after 7.2, and members that QEMU has deprecated (such as
//! `StatusInfo.singlestep` or `BlockInfo.type`) are deliberately left out so
//! their removal cannot break decoding.

use serde::{Deserialize, Serialize};

/// QEMU's version as announced in the QMP greeting.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QemuVersion {
    /// Major version, e.g. 7.
    pub major: u32,
    /// Minor version, e.g. 2.
    pub minor: u32,
    /// Micro (patch) version, e.g. 22.
    pub micro: u32,
    /// Distribution package string, e.g. `Debian 1:7.2+dfsg-7+deb12u18+b3`; may be empty.
    pub package: String,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)?;
        if !self.package.is_empty() {
            write!(f, " ({})", self.package)?;
        }
        Ok(())
    }
}

/// QEMU's `RunState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Debug,
    Inmigrate,
    InternalError,
    IoError,
    Paused,
    Postmigrate,
    Prelaunch,
    FinishMigrate,
    RestoreVm,
    Running,
    SaveVm,
    Shutdown,
    Suspended,
    Watchdog,
    GuestPanicked,
    Colo,
    /// A state this client does not know (newer QEMU).
    #[serde(other)]
    Unknown,
}

/// Reply of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// True if all vCPUs are runnable.
    pub running: bool,
    /// The VM run state.
    pub status: RunState,
}

/// Reply of `query-kvm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmInfo {
    /// KVM acceleration is active.
    pub enabled: bool,
    /// KVM support is built into this QEMU binary.
    pub present: bool,
}

/// QEMU's `JobType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobType {
    Commit,
    Stream,
    Mirror,
    Backup,
    Create,
    Amend,
    SnapshotLoad,
    SnapshotSave,
    SnapshotDelete,
    /// A job type this client does not know (newer QEMU).
    #[serde(other)]
    Unknown,
}

/// QEMU's `JobStatus`; see the job state machine in the QEMU 7.2 research report, §3.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobStatus {
    Undefined,
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    /// The job has been dismissed and no longer exists.
    Null,
    /// A status this client does not know (newer QEMU).
    #[serde(other)]
    Unknown,
}

/// QEMU's `ImageInfo`: one image of a chain, with its backing image nested.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// Image file name (can be a `json:{...}` pseudo-filename).
    pub filename: String,
    /// Image format, e.g. `qcow2`, `raw`, `file`.
    pub format: String,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes allocated on the host.
    #[serde(default)]
    pub actual_size: Option<u64>,
    /// True if the image was not closed cleanly.
    #[serde(default)]
    pub dirty_flag: Option<bool>,
    /// Cluster size in bytes, for formats that have one.
    #[serde(default)]
    pub cluster_size: Option<u64>,
    /// Backing file name as written in the image header.
    #[serde(default)]
    pub backing_filename: Option<String>,
    /// Backing file name resolved to a full path.
    #[serde(default)]
    pub full_backing_filename: Option<String>,
    /// Backing file format as written in the image header.
    #[serde(default)]
    pub backing_filename_format: Option<String>,
    /// The backing image, recursively (absent in `query-named-block-nodes` with `flat: true`).
    #[serde(default)]
    pub backing_image: Option<Box<ImageInfo>>,
}

/// QEMU's `BlockDeviceInfo`: the node inserted into a device (`query-block`'s `inserted`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDeviceInfo {
    /// Node name of the root node (QEMU generates `#blockNNN` when none was given).
    #[serde(rename = "node-name", default)]
    pub node_name: Option<String>,
    /// File name of the node.
    pub file: String,
    /// Opened read-only.
    pub ro: bool,
    /// Block driver, e.g. `qcow2`.
    pub drv: String,
    /// Backing file name, if the node has one.
    #[serde(default)]
    pub backing_file: Option<String>,
    /// Number of images below this one in the chain.
    pub backing_file_depth: u64,
    /// Image information, with the backing chain nested.
    pub image: ImageInfo,
}

/// QEMU's `BlockInfo`: one entry of `query-block` (one BlockBackend).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockInfo {
    /// Legacy device name; empty for anonymous BlockBackends (`-device ...,drive=<node>`).
    pub device: String,
    /// qdev id, or the QOM path of the device when it has no id.
    #[serde(default)]
    pub qdev: Option<String>,
    /// The device supports removable media.
    #[serde(default)]
    pub removable: bool,
    /// The guest has locked the media.
    #[serde(default)]
    pub locked: bool,
    /// The inserted medium, if any.
    #[serde(default)]
    pub inserted: Option<BlockDeviceInfo>,
}

/// One entry of `query-named-block-nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedBlockNode {
    /// Node name.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// Block driver, e.g. `qcow2` or `file`.
    pub drv: String,
    /// File name of the node.
    pub file: String,
    /// Opened read-only.
    pub ro: bool,
    /// Backing file name, if the node has one.
    #[serde(default)]
    pub backing_file: Option<String>,
    /// Depth of the backing chain as QEMU reports it (0 for every node in
    /// 7.2's `flat: true` listing, observed).
    pub backing_file_depth: u64,
    /// Image information.
    pub image: ImageInfo,
}

/// QEMU's `BlockJobInfo`: one entry of `query-block-jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockJobInfo {
    /// The job id (historically the device name).
    pub device: String,
    /// Job type.
    #[serde(rename = "type")]
    pub type_: JobType,
    /// Expected final value of `offset`; can change while the job runs.
    pub len: u64,
    /// Progress so far, in the same unit as `len`.
    pub offset: u64,
    /// False if the job is quiescent with no pending I/O.
    pub busy: bool,
    /// The job is paused (or will pause as soon as possible).
    pub paused: bool,
    /// Rate limit in bytes per second; 0 means unlimited.
    pub speed: u64,
    /// The job can be completed (`job-complete`).
    pub ready: bool,
    /// Job status.
    pub status: JobStatus,
    /// The job finalizes itself when it reaches `pending`.
    pub auto_finalize: bool,
    /// The job dismisses itself when it reaches `concluded`.
    pub auto_dismiss: bool,
    /// Set if the job failed.
    #[serde(default)]
    pub error: Option<String>,
}

/// QEMU's `JobInfo`: one entry of `query-jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    /// Job id.
    pub id: String,
    /// Job type.
    #[serde(rename = "type")]
    pub type_: JobType,
    /// Job status.
    pub status: JobStatus,
    /// Progress so far; only meaningful relative to `total_progress`.
    pub current_progress: u64,
    /// Expected final value of `current_progress`; can change in both directions.
    pub total_progress: u64,
    /// Set if the job failed (also `Operation canceled` after `job-cancel`).
    #[serde(default)]
    pub error: Option<String>,
}

#[cfg(test)]
// A failed unwrap is how these tests report a decoding failure.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_info_decodes_and_ignores_deprecated_fields() {
        let v = json!({"status": "prelaunch", "singlestep": false, "running": false});
        let s: StatusInfo = serde_json::from_value(v).unwrap();
        assert_eq!(s, StatusInfo { running: false, status: RunState::Prelaunch });
    }

    #[test]
    fn run_state_unknown_value_falls_back() {
        let v = json!({"status": "hibernating-on-mars", "running": true, "new-field": [1]});
        let s: StatusInfo = serde_json::from_value(v).unwrap();
        assert_eq!(s.status, RunState::Unknown);
        assert!(s.running);
    }

    #[test]
    fn run_state_kebab_values() {
        for (text, state) in [
            ("internal-error", RunState::InternalError),
            ("io-error", RunState::IoError),
            ("finish-migrate", RunState::FinishMigrate),
            ("guest-panicked", RunState::GuestPanicked),
            ("inmigrate", RunState::Inmigrate),
            ("running", RunState::Running),
        ] {
            let got: RunState = serde_json::from_value(json!(text)).unwrap();
            assert_eq!(got, state, "{text}");
        }
    }

    #[test]
    fn kvm_info_decodes() {
        let k: KvmInfo = serde_json::from_value(json!({"enabled": false, "present": true})).unwrap();
        assert!(!k.enabled);
        assert!(k.present);
    }

    // Captured from QEMU 7.2 `query-named-block-nodes {"flat": true}` for a
    // qcow2 overlay over a read-only base.
    const NAMED_NODES: &str = r#"[
      {"iops_rd": 0, "detect_zeroes": "off", "image": {"backing-filename-format": "qcow2",
        "virtual-size": 16777216, "filename": "/tmp/qmpx/top.qcow2", "cluster-size": 65536,
        "format": "qcow2", "actual-size": 200704, "format-specific": {"type": "qcow2",
        "data": {"compat": "1.1", "compression-type": "zlib", "lazy-refcounts": false,
        "refcount-bits": 16, "corrupt": false, "extended-l2": false}},
        "full-backing-filename": "/tmp/qmpx/base.qcow2", "backing-filename": "/tmp/qmpx/base.qcow2",
        "dirty-flag": false}, "iops_wr": 0, "ro": false, "node-name": "top-fmt",
        "backing_file_depth": 0, "drv": "qcow2", "iops": 0, "bps_wr": 0, "write_threshold": 0,
        "backing_file": "/tmp/qmpx/base.qcow2", "encrypted": false, "bps": 0, "bps_rd": 0,
        "cache": {"no-flush": false, "direct": false, "writeback": true}, "file": "/tmp/qmpx/top.qcow2"},
      {"iops_rd": 0, "detect_zeroes": "off", "image": {"virtual-size": 197120,
        "filename": "/tmp/qmpx/top.qcow2", "format": "file", "actual-size": 200704, "dirty-flag": false},
        "iops_wr": 0, "ro": true, "node-name": "top-file", "backing_file_depth": 0, "drv": "file",
        "iops": 0, "bps_wr": 0, "write_threshold": 0, "encrypted": false, "bps": 0, "bps_rd": 0,
        "cache": {"no-flush": false, "direct": false, "writeback": true}, "file": "/tmp/qmpx/top.qcow2",
        "some-future-member": {"x": 1}}
    ]"#;

    #[test]
    fn named_block_nodes_decode() {
        let nodes: Vec<NamedBlockNode> = serde_json::from_str(NAMED_NODES).unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0].node_name, "top-fmt");
        assert_eq!(nodes[0].drv, "qcow2");
        assert!(!nodes[0].ro);
        assert_eq!(nodes[0].backing_file.as_deref(), Some("/tmp/qmpx/base.qcow2"));
        assert_eq!(nodes[0].image.virtual_size, 16 << 20);
        assert_eq!(nodes[0].image.cluster_size, Some(65536));
        assert_eq!(nodes[0].image.backing_filename_format.as_deref(), Some("qcow2"));
        assert!(nodes[0].image.backing_image.is_none());
        assert_eq!(nodes[1].node_name, "top-file");
        assert_eq!(nodes[1].backing_file, None);
        assert!(nodes[1].ro);
    }

    #[test]
    fn query_block_decodes_recursive_backing_image() {
        let v = json!([{
            "device": "", "qdev": "/machine/peripheral/vda/virtio-backend", "type": "unknown",
            "removable": false, "locked": false, "io-status": "ok",
            "inserted": {
                "node-name": "top-fmt", "file": "/d/top.qcow2", "ro": false, "drv": "qcow2",
                "backing_file": "/d/mid.qcow2", "backing_file_depth": 2, "encrypted": false,
                "detect_zeroes": "off", "bps": 0,
                "image": {
                    "filename": "/d/top.qcow2", "format": "qcow2", "virtual-size": 67108864,
                    "backing-filename": "/d/mid.qcow2",
                    "backing-image": {
                        "filename": "/d/mid.qcow2", "format": "qcow2", "virtual-size": 67108864,
                        "backing-filename": "/d/base.qcow2",
                        "backing-image": {
                            "filename": "/d/base.qcow2", "format": "qcow2", "virtual-size": 67108864
                        }
                    }
                }
            }
        }, {
            "device": "cd0", "removable": true, "locked": false, "tray_open": false
        }]);
        let blocks: Vec<BlockInfo> = serde_json::from_value(v).unwrap();
        assert_eq!(blocks.len(), 2);
        let inserted = blocks[0].inserted.as_ref().unwrap();
        assert_eq!(blocks[0].device, "");
        assert_eq!(blocks[0].qdev.as_deref(), Some("/machine/peripheral/vda/virtio-backend"));
        assert_eq!(inserted.node_name.as_deref(), Some("top-fmt"));
        assert_eq!(inserted.backing_file_depth, 2);
        let mut chain = Vec::new();
        let mut image = Some(&inserted.image);
        while let Some(i) = image {
            chain.push(i.filename.as_str());
            image = i.backing_image.as_deref();
        }
        assert_eq!(chain, ["/d/top.qcow2", "/d/mid.qcow2", "/d/base.qcow2"]);
        assert!(blocks[1].removable);
        assert!(blocks[1].inserted.is_none());
    }

    #[test]
    fn block_jobs_decode_including_unknown_values() {
        let v = json!([
            {"auto-finalize": false, "io-status": "ok", "device": "j1", "auto-dismiss": false,
             "busy": false, "len": 16777216, "offset": 16777216, "status": "pending",
             "paused": false, "speed": 0, "ready": false, "type": "stream"},
            {"auto-finalize": true, "io-status": "ok", "device": "j2", "auto-dismiss": true,
             "busy": true, "len": 10, "offset": 1, "status": "teleporting", "paused": false,
             "speed": 8388608, "ready": false, "type": "quantum-copy", "error": "boom",
             "added-in-qemu-42": true}
        ]);
        let jobs: Vec<BlockJobInfo> = serde_json::from_value(v).unwrap();
        assert_eq!(jobs[0].device, "j1");
        assert_eq!(jobs[0].type_, JobType::Stream);
        assert_eq!(jobs[0].status, JobStatus::Pending);
        assert!(!jobs[0].auto_finalize);
        assert_eq!(jobs[0].error, None);
        assert_eq!(jobs[1].type_, JobType::Unknown);
        assert_eq!(jobs[1].status, JobStatus::Unknown);
        assert_eq!(jobs[1].speed, 8 << 20);
        assert_eq!(jobs[1].error.as_deref(), Some("boom"));
    }

    #[test]
    fn jobs_decode() {
        let v = json!([
            {"current-progress": 1, "status": "concluded", "total-progress": 1, "type": "create", "id": "create-file"},
            {"current-progress": 0, "status": "null", "total-progress": 0, "type": "snapshot-delete",
             "id": "s", "error": "Operation canceled"}
        ]);
        let jobs: Vec<JobInfo> = serde_json::from_value(v).unwrap();
        assert_eq!(jobs[0].type_, JobType::Create);
        assert_eq!(jobs[0].status, JobStatus::Concluded);
        assert_eq!(jobs[1].type_, JobType::SnapshotDelete);
        assert_eq!(jobs[1].status, JobStatus::Null);
        assert_eq!(jobs[1].error.as_deref(), Some("Operation canceled"));
    }

    #[test]
    fn version_display() {
        let v = QemuVersion { major: 7, minor: 2, micro: 22, package: "Debian 1:7.2+dfsg-7+deb12u18+b3".into() };
        assert_eq!(v.to_string(), "7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)");
    }
}
