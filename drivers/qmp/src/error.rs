//! The crate's error type.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong talking QMP.
///
/// QEMU's own refusals are [`QmpError::Command`]; everything else is about the
/// transport or the client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be connected, read or written.
    #[error("QMP socket {}: {source}", path.display())]
    Io {
        /// The monitor socket the client was talking to.
        path: PathBuf,
        /// The underlying failure.
        #[source]
        source: io::Error,
    },

    /// The peer sent something that is not QMP: a line that is not JSON, an
    /// unexpected greeting, or a reply that does not have the expected shape.
    #[error("QMP protocol error: {0}")]
    Protocol(String),

    /// QEMU answered the command with `{"error": {"class", "desc"}}`.
    #[error("QMP command '{command}' failed: {class}: {desc}")]
    Command {
        /// The command that was refused.
        command: String,
        /// QEMU's error class, e.g. `GenericError`, `CommandNotFound`, `DeviceNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },

    /// No reply (or no matching event) arrived in time.
    ///
    /// The command may still take effect inside QEMU: a timeout only means the
    /// client stopped waiting. A reply arriving later is discarded.
    #[error("QMP command '{command}' timed out after {after:?}")]
    Timeout {
        /// The command (or `connect`, or `wait_event`) that ran out of time.
        command: String,
        /// The time limit that expired.
        after: Duration,
    },

    /// The monitor connection is closed (QEMU exited or closed the socket).
    #[error("QMP connection closed")]
    Disconnected,

    /// An event receiver fell behind and the broadcast channel dropped events
    /// before they were seen. The receiver continues with the oldest retained
    /// event; the caller must assume it missed state changes.
    #[error("QMP event receiver lagged behind; {missed} events were dropped")]
    EventsLagged {
        /// How many events were dropped for this receiver.
        missed: u64,
    },
}
