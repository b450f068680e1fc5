//! Strata's one error type: a stable, matchable [`ErrorKind`] plus a human message.
//!
//! Kinds mirror libvirt's error numbers where libvirt has one, so that scripts
//! written against virsh's messages and codes keep working, and so that a kind
//! can cross a plugin boundary as a plain integer.

use std::fmt;
use std::path::Path;

/// What went wrong, in a form callers can match on.
///
/// The numeric code ([`ErrorKind::code`]) is libvirt's `virErrorNumber` where
/// one exists; Strata-only kinds use codes from 1000 up.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// VIR_ERR_INTERNAL_ERROR
    Internal,
    /// VIR_ERR_NO_SUPPORT: the driver lacks this capability.
    NoSupport,
    /// VIR_ERR_NO_CONNECT: no driver for the URI.
    NoConnect,
    /// VIR_ERR_INVALID_ARG
    InvalidArg,
    /// VIR_ERR_OPERATION_FAILED
    OperationFailed,
    /// VIR_ERR_XML_ERROR
    XmlError,
    /// VIR_ERR_SYSTEM_ERROR: an I/O or OS call failed.
    System,
    /// VIR_ERR_NO_DOMAIN
    NoDomain,
    /// VIR_ERR_OPERATION_INVALID
    OperationInvalid,
    /// VIR_ERR_CONFIG_UNSUPPORTED
    ConfigUnsupported,
    /// VIR_ERR_OPERATION_TIMEOUT
    OperationTimeout,
    /// VIR_ERR_NO_DOMAIN_SNAPSHOT
    NoDomainSnapshot,
    /// VIR_ERR_ARGUMENT_UNSUPPORTED
    ArgumentUnsupported,
    /// VIR_ERR_STORAGE_PROBE_FAILED: an image header is unusable or unsafe to follow.
    StorageProbeFailed,
    /// VIR_ERR_OPERATION_ABORTED
    OperationAborted,
    /// VIR_ERR_BLOCK_COPY_ACTIVE
    BlockCopyActive,
    /// VIR_ERR_OPERATION_UNSUPPORTED
    OperationUnsupported,
    /// VIR_ERR_XML_INVALID_SCHEMA
    XmlInvalidSchema,
    /// VIR_ERR_DOM_EXIST: a domain with this name or UUID already exists.
    DomainExists,
    /// VIR_ERR_NO_STORAGE_POOL
    NoStoragePool,
    /// VIR_ERR_NO_STORAGE_VOL
    NoStorageVol,
    /// VIR_ERR_STORAGE_VOL_EXIST: a volume of this name is already in the pool.
    StorageVolExists,
    /// A backing chain refers back to one of its own layers.
    BackingChainCycle,
    /// The recorded backing chain and the image files disagree.
    ChainMismatch,
    /// The state store is from a newer Strata or otherwise unreadable.
    StoreFormat,
}

impl ErrorKind {
    /// libvirt's error number where one exists, otherwise a Strata code ≥ 1000.
    pub fn code(self) -> i32 {
        match self {
            ErrorKind::Internal => 1,
            ErrorKind::NoSupport => 3,
            ErrorKind::NoConnect => 5,
            ErrorKind::InvalidArg => 8,
            ErrorKind::OperationFailed => 9,
            ErrorKind::XmlError => 27,
            ErrorKind::System => 38,
            ErrorKind::NoDomain => 42,
            ErrorKind::DomainExists => 28,
            ErrorKind::NoStoragePool => 49,
            ErrorKind::NoStorageVol => 50,
            ErrorKind::StorageVolExists => 90,
            ErrorKind::OperationInvalid => 55,
            ErrorKind::ConfigUnsupported => 67,
            ErrorKind::OperationTimeout => 68,
            ErrorKind::NoDomainSnapshot => 72,
            ErrorKind::ArgumentUnsupported => 74,
            ErrorKind::StorageProbeFailed => 75,
            ErrorKind::OperationAborted => 78,
            ErrorKind::BlockCopyActive => 83,
            ErrorKind::OperationUnsupported => 84,
            ErrorKind::XmlInvalidSchema => 92,
            ErrorKind::BackingChainCycle => 1000,
            ErrorKind::ChainMismatch => 1001,
            ErrorKind::StoreFormat => 1002,
        }
    }

    /// The kind for a code produced by [`ErrorKind::code`] (used at the plugin boundary).
    pub fn from_code(code: i32) -> ErrorKind {
        ALL_KINDS.iter().copied().find(|k| k.code() == code).unwrap_or(ErrorKind::Internal)
    }

    /// A stable identifier for scripts (`--json` error output).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Internal => "internal-error",
            ErrorKind::NoSupport => "no-support",
            ErrorKind::NoConnect => "no-connect",
            ErrorKind::InvalidArg => "invalid-arg",
            ErrorKind::OperationFailed => "operation-failed",
            ErrorKind::XmlError => "xml-error",
            ErrorKind::System => "system-error",
            ErrorKind::NoDomain => "no-domain",
            ErrorKind::DomainExists => "domain-exists",
            ErrorKind::NoStoragePool => "no-storage-pool",
            ErrorKind::NoStorageVol => "no-storage-vol",
            ErrorKind::StorageVolExists => "storage-vol-exists",
            ErrorKind::OperationInvalid => "operation-invalid",
            ErrorKind::ConfigUnsupported => "config-unsupported",
            ErrorKind::OperationTimeout => "operation-timeout",
            ErrorKind::NoDomainSnapshot => "no-domain-snapshot",
            ErrorKind::ArgumentUnsupported => "argument-unsupported",
            ErrorKind::StorageProbeFailed => "storage-probe-failed",
            ErrorKind::OperationAborted => "operation-aborted",
            ErrorKind::BlockCopyActive => "block-copy-active",
            ErrorKind::OperationUnsupported => "operation-unsupported",
            ErrorKind::XmlInvalidSchema => "xml-invalid-schema",
            ErrorKind::BackingChainCycle => "backing-chain-cycle",
            ErrorKind::ChainMismatch => "chain-mismatch",
            ErrorKind::StoreFormat => "store-format",
        }
    }

    /// libvirt's standard prefix text for the kind, as virsh prints it.
    pub fn prefix(self) -> &'static str {
        match self {
            ErrorKind::Internal => "internal error",
            ErrorKind::NoSupport => "this function is not supported by the connection driver",
            ErrorKind::NoConnect => "no connection driver available",
            ErrorKind::InvalidArg => "invalid argument",
            ErrorKind::OperationFailed => "operation failed",
            ErrorKind::XmlError => "XML error",
            ErrorKind::System => "system error",
            ErrorKind::NoDomain => "Domain not found",
            ErrorKind::DomainExists => "operation failed",
            ErrorKind::NoStoragePool => "Storage pool not found",
            ErrorKind::NoStorageVol => "Storage volume not found",
            ErrorKind::StorageVolExists => "storage volume already exists",
            ErrorKind::OperationInvalid => "Requested operation is not valid",
            ErrorKind::ConfigUnsupported => "unsupported configuration",
            ErrorKind::OperationTimeout => "Timed out during operation",
            ErrorKind::NoDomainSnapshot => "Domain snapshot not found",
            ErrorKind::ArgumentUnsupported => "argument unsupported",
            ErrorKind::StorageProbeFailed => "Storage probe failed",
            ErrorKind::OperationAborted => "operation aborted",
            ErrorKind::BlockCopyActive => "block copy still active",
            ErrorKind::OperationUnsupported => "Operation not supported",
            ErrorKind::XmlInvalidSchema => "XML document failed to validate against schema",
            ErrorKind::BackingChainCycle => "backing chain cycle",
            ErrorKind::ChainMismatch => "backing chain mismatch",
            ErrorKind::StoreFormat => "state store error",
        }
    }
}

const ALL_KINDS: &[ErrorKind] = &[
    ErrorKind::Internal,
    ErrorKind::NoSupport,
    ErrorKind::NoConnect,
    ErrorKind::InvalidArg,
    ErrorKind::OperationFailed,
    ErrorKind::XmlError,
    ErrorKind::System,
    ErrorKind::NoDomain,
    ErrorKind::DomainExists,
    ErrorKind::NoStoragePool,
    ErrorKind::NoStorageVol,
    ErrorKind::StorageVolExists,
    ErrorKind::OperationInvalid,
    ErrorKind::ConfigUnsupported,
    ErrorKind::OperationTimeout,
    ErrorKind::NoDomainSnapshot,
    ErrorKind::ArgumentUnsupported,
    ErrorKind::StorageProbeFailed,
    ErrorKind::OperationAborted,
    ErrorKind::BlockCopyActive,
    ErrorKind::OperationUnsupported,
    ErrorKind::XmlInvalidSchema,
    ErrorKind::BackingChainCycle,
    ErrorKind::ChainMismatch,
    ErrorKind::StoreFormat,
];

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Strata's error: a kind, a message (a sentence naming the thing that is
/// wrong), and optionally the underlying cause.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", kind.prefix())]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into(), source: None }
    }

    /// An OS-level failure on `path` while doing `what`. The OS's reason is
    /// the source, not part of the message: [`Error::report`] joins them.
    pub fn io(what: &str, path: &Path, err: std::io::Error) -> Self {
        Error {
            kind: ErrorKind::System,
            message: format!("cannot {what} '{}'", path.display()),
            source: Some(Box::new(err)),
        }
    }

    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without libvirt's kind prefix.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The error and each of its causes on one line, as libvirt prints a
    /// system error: `system error: cannot open '/x': No such file or directory`.
    pub fn report(&self) -> String {
        format!("{}: {}", self.kind.prefix(), self.detail())
    }

    /// The message and each of its causes, without the kind's prefix.
    pub fn detail(&self) -> String {
        let mut line = self.message.clone();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            line.push_str(": ");
            line.push_str(&os_reason(c));
            cause = c.source();
        }
        line
    }

    /// Prepends context ("while defining 'vm1'") to the message, keeping the kind.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

/// An error's text; for an OS error, the reason as libvirt prints it
/// (strerror), without Rust's "(os error N)".
pub fn os_reason(err: &(dyn std::error::Error + 'static)) -> String {
    let text = err.to_string();
    match err.downcast_ref::<std::io::Error>().and_then(std::io::Error::raw_os_error) {
        Some(code) => text.strip_suffix(&format!(" (os error {code})")).unwrap_or(&text).to_string(),
        None => text,
    }
}

/// Shorthand constructors, one per common kind.
macro_rules! kind_ctor {
    ($($fn_name:ident => $kind:ident),* $(,)?) => {
        impl Error {
            $(
                pub fn $fn_name(message: impl Into<String>) -> Self {
                    Error::new(ErrorKind::$kind, message)
                }
            )*
        }
    };
}

kind_ctor! {
    internal => Internal,
    invalid_arg => InvalidArg,
    operation_failed => OperationFailed,
    operation_invalid => OperationInvalid,
    xml => XmlError,
    no_domain => NoDomain,
    config_unsupported => ConfigUnsupported,
    probe_failed => StorageProbeFailed,
    no_support => NoSupport,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        for kind in ALL_KINDS {
            assert_eq!(ErrorKind::from_code(kind.code()), *kind);
        }
        let mut codes: Vec<i32> = ALL_KINDS.iter().map(|k| k.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), ALL_KINDS.len());
    }

    /// The codes of libvirt's `virErrorNumber` (include/libvirt/virterror.h,
    /// where each value is written out), one per kind that claims one.
    #[test]
    fn codes_are_libvirts() {
        let libvirt = [
            (ErrorKind::Internal, 1, "VIR_ERR_INTERNAL_ERROR"),
            (ErrorKind::NoSupport, 3, "VIR_ERR_NO_SUPPORT"),
            (ErrorKind::NoConnect, 5, "VIR_ERR_NO_CONNECT"),
            (ErrorKind::InvalidArg, 8, "VIR_ERR_INVALID_ARG"),
            (ErrorKind::OperationFailed, 9, "VIR_ERR_OPERATION_FAILED"),
            (ErrorKind::XmlError, 27, "VIR_ERR_XML_ERROR"),
            (ErrorKind::DomainExists, 28, "VIR_ERR_DOM_EXIST"),
            (ErrorKind::System, 38, "VIR_ERR_SYSTEM_ERROR"),
            (ErrorKind::NoDomain, 42, "VIR_ERR_NO_DOMAIN"),
            (ErrorKind::NoStoragePool, 49, "VIR_ERR_NO_STORAGE_POOL"),
            (ErrorKind::NoStorageVol, 50, "VIR_ERR_NO_STORAGE_VOL"),
            (ErrorKind::OperationInvalid, 55, "VIR_ERR_OPERATION_INVALID"),
            (ErrorKind::ConfigUnsupported, 67, "VIR_ERR_CONFIG_UNSUPPORTED"),
            (ErrorKind::OperationTimeout, 68, "VIR_ERR_OPERATION_TIMEOUT"),
            (ErrorKind::NoDomainSnapshot, 72, "VIR_ERR_NO_DOMAIN_SNAPSHOT"),
            (ErrorKind::ArgumentUnsupported, 74, "VIR_ERR_ARGUMENT_UNSUPPORTED"),
            (ErrorKind::StorageProbeFailed, 75, "VIR_ERR_STORAGE_PROBE_FAILED"),
            (ErrorKind::OperationAborted, 78, "VIR_ERR_OPERATION_ABORTED"),
            (ErrorKind::BlockCopyActive, 83, "VIR_ERR_BLOCK_COPY_ACTIVE"),
            (ErrorKind::OperationUnsupported, 84, "VIR_ERR_OPERATION_UNSUPPORTED"),
            (ErrorKind::StorageVolExists, 90, "VIR_ERR_STORAGE_VOL_EXIST"),
            (ErrorKind::XmlInvalidSchema, 92, "VIR_ERR_XML_INVALID_SCHEMA"),
        ];
        for (kind, code, name) in libvirt {
            assert_eq!(kind.code(), code, "{kind:?} should carry {name} = {code}");
        }
        let strata_only = ALL_KINDS.iter().filter(|k| k.code() >= 1000).count();
        assert_eq!(libvirt.len() + strata_only, ALL_KINDS.len(), "a kind is neither libvirt's nor Strata's own");
    }

    #[test]
    fn io_errors_name_their_reason_once() {
        let missing = std::io::Error::from_raw_os_error(libc::ENOENT);
        let e = Error::io("open", Path::new("/no/such"), missing);
        assert_eq!(e.to_string(), "system error: cannot open '/no/such'");
        assert_eq!(e.report(), "system error: cannot open '/no/such': No such file or directory");
        let plain = Error::no_domain("no domain with matching name 'vm9'");
        assert_eq!(plain.report(), plain.to_string());
    }

    #[test]
    fn display_uses_libvirt_prefix() {
        let e = Error::no_domain("no domain with matching name 'vm9'");
        assert_eq!(e.to_string(), "Domain not found: no domain with matching name 'vm9'");
        assert_eq!(e.kind().code(), 42);
    }
}
