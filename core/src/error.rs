//! Strata's one error type: a stable, matchable [`ErrorKind`] plus a human message.
//!
//! Kinds mirror libvirt's error numbers where libvirt has one, so that scripts
//! written against virsh's messages and codes keep working, and so that a kind
//! can cross a plugin boundary as a plain integer.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Declares [`ErrorKind`] from one table, so that no kind can lack a code,
/// a stable name or a prefix, and [`ALL_KINDS`] lists every kind.
macro_rules! error_kinds {
    ($($(#[$doc:meta])* $kind:ident = $code:literal, $name:literal, $prefix:literal;)+) => {
        /// What went wrong, in a form callers can match on.
        ///
        /// The numeric code ([`ErrorKind::code`]) is libvirt's `virErrorNumber` where
        /// one exists; Strata-only kinds use codes from 1000 up.
        #[non_exhaustive]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorKind {
            $($(#[$doc])* $kind,)+
        }

        impl ErrorKind {
            /// libvirt's error number where one exists, otherwise a Strata code ≥ 1000.
            pub fn code(self) -> i32 {
                match self {
                    $(ErrorKind::$kind => $code,)+
                }
            }

            /// A stable identifier for scripts (`--json` error output) and
            /// for the plugin boundary ([`ErrorPayload::kind`]).
            pub fn name(self) -> &'static str {
                match self {
                    $(ErrorKind::$kind => $name,)+
                }
            }

            /// libvirt's standard prefix text for the kind, as virsh prints it.
            pub fn prefix(self) -> &'static str {
                match self {
                    $(ErrorKind::$kind => $prefix,)+
                }
            }
        }

        /// Every kind, in the order declared.
        pub const ALL_KINDS: &[ErrorKind] = &[$(ErrorKind::$kind),+];
    };
}

error_kinds! {
    /// VIR_ERR_INTERNAL_ERROR
    Internal = 1, "internal-error", "internal error";
    /// VIR_ERR_NO_SUPPORT: the driver lacks this capability.
    NoSupport = 3, "no-support", "this function is not supported by the connection driver";
    /// VIR_ERR_NO_CONNECT: no driver for the URI.
    NoConnect = 5, "no-connect", "no connection driver available";
    /// VIR_ERR_INVALID_ARG
    InvalidArg = 8, "invalid-arg", "invalid argument";
    /// VIR_ERR_OPERATION_FAILED
    OperationFailed = 9, "operation-failed", "operation failed";
    /// VIR_ERR_XML_ERROR
    XmlError = 27, "xml-error", "XML error";
    /// VIR_ERR_SYSTEM_ERROR: an I/O or OS call failed.
    System = 38, "system-error", "system error";
    /// VIR_ERR_NO_DOMAIN
    NoDomain = 42, "no-domain", "Domain not found";
    /// VIR_ERR_OPERATION_INVALID
    OperationInvalid = 55, "operation-invalid", "Requested operation is not valid";
    /// VIR_ERR_CONFIG_UNSUPPORTED
    ConfigUnsupported = 67, "config-unsupported", "unsupported configuration";
    /// VIR_ERR_OPERATION_TIMEOUT
    OperationTimeout = 68, "operation-timeout", "Timed out during operation";
    /// VIR_ERR_NO_DOMAIN_SNAPSHOT
    NoDomainSnapshot = 72, "no-domain-snapshot", "Domain snapshot not found";
    /// VIR_ERR_ARGUMENT_UNSUPPORTED
    ArgumentUnsupported = 74, "argument-unsupported", "argument unsupported";
    /// VIR_ERR_STORAGE_PROBE_FAILED: an image header is unusable or unsafe to follow.
    StorageProbeFailed = 75, "storage-probe-failed", "Storage probe failed";
    /// VIR_ERR_OPERATION_ABORTED
    OperationAborted = 78, "operation-aborted", "operation aborted";
    /// VIR_ERR_BLOCK_COPY_ACTIVE
    BlockCopyActive = 83, "block-copy-active", "block copy still active";
    /// VIR_ERR_OPERATION_UNSUPPORTED
    OperationUnsupported = 84, "operation-unsupported", "Operation not supported";
    /// VIR_ERR_XML_INVALID_SCHEMA
    XmlInvalidSchema = 92, "xml-invalid-schema", "XML document failed to validate against schema";
    /// VIR_ERR_DOM_EXIST: a domain with this name or UUID already exists.
    DomainExists = 28, "domain-exists", "operation failed";
    /// VIR_ERR_NO_NETWORK
    NoNetwork = 43, "no-network", "Network not found";
    /// VIR_ERR_NO_STORAGE_POOL
    NoStoragePool = 49, "no-storage-pool", "Storage pool not found";
    /// VIR_ERR_NO_STORAGE_VOL
    NoStorageVol = 50, "no-storage-vol", "Storage volume not found";
    /// VIR_ERR_STORAGE_VOL_EXIST: a volume of this name is already in the pool.
    StorageVolExists = 90, "storage-vol-exists", "storage volume already exists";
    /// A backing chain refers back to one of its own layers.
    BackingChainCycle = 1000, "backing-chain-cycle", "backing chain cycle";
    /// The recorded backing chain and the image files disagree.
    ChainMismatch = 1001, "chain-mismatch", "backing chain mismatch";
    /// The state store is from a newer Strata or otherwise unreadable.
    StoreFormat = 1002, "store-format", "state store error";
}

impl ErrorKind {
    /// The kind for a code produced by [`ErrorKind::code`] (used at the plugin boundary).
    pub fn from_code(code: i32) -> ErrorKind {
        ErrorKind::with_code(code).unwrap_or(ErrorKind::Internal)
    }

    fn with_code(code: i32) -> Option<ErrorKind> {
        ALL_KINDS.iter().copied().find(|k| k.code() == code)
    }

    /// The kind a [`ErrorKind::name`] stands for.
    pub fn from_name(name: &str) -> Option<ErrorKind> {
        ALL_KINDS.iter().copied().find(|k| k.name() == name)
    }
}

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

/// An error as plain data, for the plugin boundary: the kind's stable name
/// ([`ErrorKind::name`]), its code (libvirt's number where it has one) and
/// the message with its causes ([`Error::detail`]), without the kind's
/// prefix. Converting back gives an error that reports the same line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorPayload {
    pub kind: String,
    pub code: i32,
    pub message: String,
}

impl From<&Error> for ErrorPayload {
    fn from(err: &Error) -> Self {
        ErrorPayload { kind: err.kind.name().to_string(), code: err.kind.code(), message: err.detail() }
    }
}

impl From<Error> for ErrorPayload {
    fn from(err: Error) -> Self {
        ErrorPayload::from(&err)
    }
}

impl From<ErrorPayload> for Error {
    /// The kind is found by name, else by code (a newer peer's kind that
    /// carries a libvirt number); a payload naming neither is an internal
    /// error whose message keeps what the peer sent.
    fn from(payload: ErrorPayload) -> Self {
        match ErrorKind::from_name(&payload.kind).or_else(|| ErrorKind::with_code(payload.code)) {
            Some(kind) => Error::new(kind, payload.message),
            None => {
                Error::internal(format!("{} (error kind '{}', code {})", payload.message, payload.kind, payload.code))
            }
        }
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
            (ErrorKind::NoNetwork, 43, "VIR_ERR_NO_NETWORK"),
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

    /// Every kind (ALL_KINDS is generated from the same table as the
    /// enum, so a new kind is in it and has a name and a code) crosses the
    /// plugin boundary as a payload and comes back as itself.
    #[test]
    fn every_kind_round_trips_through_its_payload() {
        for kind in ALL_KINDS {
            let payload = ErrorPayload::from(Error::new(*kind, "the message"));
            assert_eq!((payload.kind.as_str(), payload.code), (kind.name(), kind.code()));
            let json = serde_json::to_string(&payload).expect("a payload encodes");
            let decoded: ErrorPayload = serde_json::from_str(&json).expect("a payload decodes");
            assert_eq!(decoded, payload);
            let back = Error::from(decoded);
            assert_eq!((back.kind(), back.message()), (*kind, "the message"), "{kind:?} via {json}");
        }
        let mut names: Vec<&str> = ALL_KINDS.iter().map(|k| k.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL_KINDS.len(), "two kinds share a name");
    }

    #[test]
    fn a_payload_keeps_the_cause_and_an_unknown_kind_is_kept_in_the_message() {
        let missing = std::io::Error::from_raw_os_error(libc::ENOENT);
        let original = Error::io("open", Path::new("/no/such"), missing);
        let payload = ErrorPayload::from(&original);
        assert_eq!(payload.message, "cannot open '/no/such': No such file or directory");
        assert_eq!(Error::from(payload).report(), original.report());

        let by_code = ErrorPayload { kind: "a-newer-kind".into(), code: 42, message: "gone".into() };
        assert_eq!(Error::from(by_code).kind(), ErrorKind::NoDomain);
        let unknown = ErrorPayload { kind: "a-newer-kind".into(), code: 4242, message: "odd".into() };
        let err = Error::from(unknown);
        assert_eq!(err.kind(), ErrorKind::Internal);
        assert_eq!(err.message(), "odd (error kind 'a-newer-kind', code 4242)");
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
