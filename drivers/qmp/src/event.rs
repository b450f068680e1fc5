//! Asynchronous QMP events and typed decoding of the ones Strata acts on.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::types::{JobStatus, JobType};

/// One asynchronous event as QEMU sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name, e.g. `JOB_STATUS_CHANGE`.
    pub event: String,
    /// Event payload; `Value::Null` for events without data (`STOP`, `RESUME`).
    pub data: Value,
    /// QEMU's host wall-clock timestamp: (seconds, microseconds).
    pub timestamp: (i64, i64),
}

/// `JOB_STATUS_CHANGE` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatusChange {
    /// Job id.
    pub id: String,
    /// The status the job just entered.
    pub status: JobStatus,
}

/// Payload of `BLOCK_JOB_COMPLETED`, `BLOCK_JOB_CANCELLED` and `BLOCK_JOB_READY`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockJobEvent {
    /// Job type.
    #[serde(rename = "type")]
    pub type_: JobType,
    /// The job id (historically the device name).
    pub device: String,
    /// Final progress value.
    pub len: u64,
    /// Progress reached; equals `len` on success.
    pub offset: u64,
    /// Rate limit in bytes per second.
    pub speed: u64,
    /// Only on a failed `BLOCK_JOB_COMPLETED`.
    #[serde(default)]
    pub error: Option<String>,
}

/// `BLOCK_JOB_PENDING` payload. Unlike the other block-job events it carries
/// the job `id`, not `device`/progress. Emitted only with `auto-finalize: false`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockJobPending {
    /// Job type.
    #[serde(rename = "type")]
    pub type_: JobType,
    /// Job id.
    pub id: String,
}

/// QEMU's `IoOperationType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoOperation {
    Read,
    Write,
    /// A value this client does not know (newer QEMU).
    #[serde(other)]
    Unknown,
}

/// QEMU's `BlockErrorAction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockErrorAction {
    Ignore,
    Report,
    Stop,
    /// A value this client does not know (newer QEMU).
    #[serde(other)]
    Unknown,
}

/// `BLOCK_JOB_ERROR` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockJobError {
    /// The job id (historically the device name).
    pub device: String,
    /// The I/O operation that failed.
    pub operation: IoOperation,
    /// What QEMU did about it.
    pub action: BlockErrorAction,
}

/// QEMU's `ShutdownCause`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownCause {
    None,
    HostError,
    HostQmpQuit,
    HostQmpSystemReset,
    HostSignal,
    HostUi,
    GuestShutdown,
    GuestReset,
    GuestPanic,
    SubsystemReset,
    SnapshotLoad,
    /// A value this client does not know (newer QEMU).
    #[serde(other)]
    Unknown,
}

/// `SHUTDOWN` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shutdown {
    /// The guest asked for it (as opposed to the host or the monitor).
    pub guest: bool,
    /// Why QEMU shuts down.
    pub reason: ShutdownCause,
}

/// The events Strata acts on, decoded; see [`QmpEvent::known`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KnownEvent {
    /// `JOB_STATUS_CHANGE`: the authoritative job state machine feed.
    JobStatusChange(JobStatusChange),
    /// `BLOCK_JOB_COMPLETED`.
    BlockJobCompleted(BlockJobEvent),
    /// `BLOCK_JOB_CANCELLED`.
    BlockJobCancelled(BlockJobEvent),
    /// `BLOCK_JOB_READY`; can repeat (READY/STANDBY flapping), so act on it once.
    BlockJobReady(BlockJobEvent),
    /// `BLOCK_JOB_PENDING`.
    BlockJobPending(BlockJobPending),
    /// `BLOCK_JOB_ERROR`.
    BlockJobError(BlockJobError),
    /// `SHUTDOWN`; after `quit` it arrives before the command's reply.
    Shutdown(Shutdown),
    /// `STOP`: the VM paused.
    Stop,
    /// `RESUME`: the VM runs.
    Resume,
    /// Any other event, or a known event whose payload did not decode.
    Other,
}

impl QmpEvent {
    /// Decodes the event if it is one of the [`KnownEvent`]s.
    ///
    /// A known event name whose payload does not decode (an incompatible
    /// newer QEMU) is logged and reported as [`KnownEvent::Other`]; the raw
    /// event is still available in `self`.
    pub fn known(&self) -> KnownEvent {
        match self.event.as_str() {
            "JOB_STATUS_CHANGE" => self.decode(KnownEvent::JobStatusChange),
            "BLOCK_JOB_COMPLETED" => self.decode(KnownEvent::BlockJobCompleted),
            "BLOCK_JOB_CANCELLED" => self.decode(KnownEvent::BlockJobCancelled),
            "BLOCK_JOB_READY" => self.decode(KnownEvent::BlockJobReady),
            "BLOCK_JOB_PENDING" => self.decode(KnownEvent::BlockJobPending),
            "BLOCK_JOB_ERROR" => self.decode(KnownEvent::BlockJobError),
            "SHUTDOWN" => self.decode(KnownEvent::Shutdown),
            "STOP" => KnownEvent::Stop,
            "RESUME" => KnownEvent::Resume,
            _ => KnownEvent::Other,
        }
    }

    fn decode<T: DeserializeOwned>(&self, wrap: fn(T) -> KnownEvent) -> KnownEvent {
        match T::deserialize(&self.data) {
            Ok(payload) => wrap(payload),
            Err(e) => {
                tracing::warn!(event = %self.event, data = %self.data, error = %e,
                    "QMP event payload did not decode");
                KnownEvent::Other
            }
        }
    }
}

#[cfg(test)]
// A failed unwrap is how these tests report a decoding failure.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(name: &str, data: Value) -> QmpEvent {
        QmpEvent { event: name.into(), data, timestamp: (1, 2) }
    }

    #[test]
    fn job_status_change() {
        let e = ev("JOB_STATUS_CHANGE", json!({"status": "pending", "id": "j1"}));
        assert_eq!(
            e.known(),
            KnownEvent::JobStatusChange(JobStatusChange { id: "j1".into(), status: JobStatus::Pending })
        );
        let e = ev("JOB_STATUS_CHANGE", json!({"status": "levitating", "id": "j1", "extra": 1}));
        assert_eq!(
            e.known(),
            KnownEvent::JobStatusChange(JobStatusChange { id: "j1".into(), status: JobStatus::Unknown })
        );
    }

    #[test]
    fn block_job_events() {
        let data = json!({"device": "stream0", "len": 67108864, "offset": 67108864, "speed": 0, "type": "stream"});
        let expect = BlockJobEvent {
            type_: JobType::Stream,
            device: "stream0".into(),
            len: 64 << 20,
            offset: 64 << 20,
            speed: 0,
            error: None,
        };
        assert_eq!(ev("BLOCK_JOB_COMPLETED", data.clone()).known(), KnownEvent::BlockJobCompleted(expect.clone()));
        assert_eq!(ev("BLOCK_JOB_CANCELLED", data.clone()).known(), KnownEvent::BlockJobCancelled(expect.clone()));
        assert_eq!(ev("BLOCK_JOB_READY", data).known(), KnownEvent::BlockJobReady(expect));
        let failed = ev(
            "BLOCK_JOB_COMPLETED",
            json!({"device": "c", "len": 10, "offset": 3, "speed": 0, "type": "commit", "error": "Input/output error"}),
        );
        match failed.known() {
            KnownEvent::BlockJobCompleted(p) => {
                assert_eq!(p.error.as_deref(), Some("Input/output error"));
                assert_eq!(p.type_, JobType::Commit);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn block_job_pending_and_error() {
        assert_eq!(
            ev("BLOCK_JOB_PENDING", json!({"type": "mirror", "id": "m"})).known(),
            KnownEvent::BlockJobPending(BlockJobPending { type_: JobType::Mirror, id: "m".into() })
        );
        assert_eq!(
            ev("BLOCK_JOB_ERROR", json!({"device": "ide0-hd1", "operation": "write", "action": "stop"})).known(),
            KnownEvent::BlockJobError(BlockJobError {
                device: "ide0-hd1".into(),
                operation: IoOperation::Write,
                action: BlockErrorAction::Stop
            })
        );
    }

    #[test]
    fn vm_lifecycle_events() {
        assert_eq!(
            ev("SHUTDOWN", json!({"guest": false, "reason": "host-qmp-quit"})).known(),
            KnownEvent::Shutdown(Shutdown { guest: false, reason: ShutdownCause::HostQmpQuit })
        );
        assert_eq!(ev("STOP", Value::Null).known(), KnownEvent::Stop);
        assert_eq!(ev("RESUME", Value::Null).known(), KnownEvent::Resume);
    }

    #[test]
    fn unknown_and_malformed_events_are_other() {
        assert_eq!(ev("BLOCK_WRITE_THRESHOLD", json!({"node-name": "x"})).known(), KnownEvent::Other);
        assert_eq!(ev("JOB_STATUS_CHANGE", json!({"status": "running"})).known(), KnownEvent::Other);
    }
}
