//! The C ABI between the `strata` host and a driver plugin, a shared
//! library found on disk (see `docs/plugins.md`).
//!
//! A plugin exports one symbol, [`STRATA_DRIVER_ENTRY_SYMBOL`], of type
//! [`StrataDriverEntry`]: it returns a pointer to a [`StrataDriverV1`]
//! table that stays valid, unchanged, for the life of the process (a
//! plugin is never unloaded). The table's first field is always its ABI
//! version; the host reads that first and refuses any version but
//! [`STRATA_ABI_VERSION`], naming both, before it reads another field.
//!
//! Everything else crosses as plain bytes: a call is a JSON request of
//! `strata_core::wire` (`{"abi": 1, "call": {...}}`) and its answer a JSON
//! response (`{"abi": 1, "reply": {...}}` or `{"abi": 1, "error": {...}}`).
//! Bytes are freed by the side that allocated them: the host hands the
//! plugin's answers back to the plugin's `free_bytes`, and the plugin
//! never frees what the host passes in. A function's `int32_t` result is
//! [`STRATA_OK`] or one of Strata's error codes (libvirt's error numbers),
//! whose message, where the function has an out-parameter for bytes, is
//! UTF-8 text there.
//!
//! Callbacks belong to the host: a [`StrataCallback`] is allocated by the
//! host and stays valid for the life of the process, so a plugin can never
//! call through a freed record (seed 003). When the host stops listening it
//! first marks the record stopped, then tells the plugin synchronously
//! (`unregister_callback`); from then on the record's `notify` answers
//! [`STRATA_ERR_OPERATION_ABORTED`] and does nothing else.

use std::ffi::{c_char, c_void};

/// The version of this table and of the wire messages that cross it.
pub const STRATA_ABI_VERSION: u32 = 1;

/// The name of the symbol every plugin exports.
pub const STRATA_DRIVER_ENTRY_SYMBOL: &str = "strata_driver_entry";

/// Success.
pub const STRATA_OK: i32 = 0;
/// Strata's `internal-error` (VIR_ERR_INTERNAL_ERROR): a plugin's bug, such as a panic.
pub const STRATA_ERR_INTERNAL: i32 = 1;
/// Strata's `no-support` (VIR_ERR_NO_SUPPORT): the driver does not do this.
pub const STRATA_ERR_NO_SUPPORT: i32 = 3;
/// Strata's `invalid-arg` (VIR_ERR_INVALID_ARG): a bad URI, request or flag.
pub const STRATA_ERR_INVALID_ARG: i32 = 8;
/// Strata's `operation-failed` (VIR_ERR_OPERATION_FAILED).
pub const STRATA_ERR_OPERATION_FAILED: i32 = 9;
/// Strata's `no-domain` (VIR_ERR_NO_DOMAIN).
pub const STRATA_ERR_NO_DOMAIN: i32 = 42;
/// Strata's `operation-invalid` (VIR_ERR_OPERATION_INVALID).
pub const STRATA_ERR_OPERATION_INVALID: i32 = 55;
/// Strata's `no-domain-snapshot` (VIR_ERR_NO_DOMAIN_SNAPSHOT).
pub const STRATA_ERR_NO_DOMAIN_SNAPSHOT: i32 = 72;
/// Strata's `argument-unsupported` (VIR_ERR_ARGUMENT_UNSUPPORTED): another ABI version.
pub const STRATA_ERR_ARGUMENT_UNSUPPORTED: i32 = 74;
/// Strata's `operation-aborted` (VIR_ERR_OPERATION_ABORTED): a cancelled
/// call, or a notification through a callback the host has stopped.
pub const STRATA_ERR_OPERATION_ABORTED: i32 = 78;

/// A notification kind bit: a domain event, its data a JSON
/// `strata_core::driver::DomainEvent`. (Block-job progress is not pushed:
/// the host asks for it with the `block_job_wait` call.)
pub const STRATA_NOTIFY_EVENT: u32 = 1 << 0;

/// Bytes one side allocated: a request, a response, an error message.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct StrataBytes {
    pub ptr: *mut u8,
    pub len: usize,
}

impl StrataBytes {
    /// No bytes: what an out-parameter holds before a call fills it.
    pub const EMPTY: StrataBytes = StrataBytes { ptr: std::ptr::null_mut(), len: 0 };
}

/// A callback record, allocated by the host and valid for the life of the
/// process. The plugin calls `notify(callback, kind, data, len)` from any
/// thread; `data` is the plugin's and is not kept by the host. `notify`
/// returns [`STRATA_OK`], or [`STRATA_ERR_OPERATION_ABORTED`] once the host
/// has stopped the record (the plugin should forget it), or
/// [`STRATA_ERR_INVALID_ARG`] for data it cannot read.
#[repr(C)]
pub struct StrataCallback {
    pub notify:
        Option<unsafe extern "C" fn(callback: *const StrataCallback, kind: u32, data: *const u8, len: usize) -> i32>,
    /// The host's; the plugin passes the record back unchanged.
    pub context: *mut c_void,
}

/// What [`STRATA_DRIVER_ENTRY_SYMBOL`] returns, version 1. Strings are NUL-terminated
/// UTF-8 and, like the table, valid for the life of the process. Every
/// function may be called from any thread, several at once.
#[repr(C)]
pub struct StrataDriverV1 {
    /// [`STRATA_ABI_VERSION`] as the plugin was built with it; always the first field.
    pub abi_version: u32,
    /// The driver's name (`example`), as `capabilities` shows it.
    pub name: *const c_char,
    /// The URI schemes it serves, a NULL-terminated array (`example`).
    pub schemes: *const *const c_char,
    /// Its `strata_core::capabilities::DriverCapabilities` as JSON.
    pub capabilities_json: *const c_char,
    /// Opens a connection to `uri`; on success sets `*handle`. On failure
    /// returns an error code and may set `*error` to a message.
    pub open:
        Option<unsafe extern "C" fn(uri: *const c_char, handle: *mut *mut c_void, error: *mut StrataBytes) -> i32>,
    /// Performs one JSON request and sets `*response` to the JSON response
    /// (which may carry the call's error); returns [`STRATA_OK`]. Another
    /// result means no response was made, with a message in `*response`.
    /// `call_id` is the host's number for the call, unique per handle.
    pub call: Option<
        unsafe extern "C" fn(
            handle: *mut c_void,
            call_id: u64,
            request: *const u8,
            request_len: usize,
            response: *mut StrataBytes,
        ) -> i32,
    >,
    /// Frees bytes this plugin returned.
    pub free_bytes: Option<unsafe extern "C" fn(bytes: StrataBytes)>,
    /// Asks the call `call_id`, running on another thread, to end early
    /// (its response is then an `operation-aborted` error). Returns
    /// [`STRATA_OK`], or an error code when no such call runs.
    pub cancel: Option<unsafe extern "C" fn(handle: *mut c_void, call_id: u64) -> i32>,
    /// Starts notifications of the `kinds` bits ([`STRATA_NOTIFY_EVENT`])
    /// through `callback`, a host record the plugin may keep.
    pub register_callback:
        Option<unsafe extern "C" fn(handle: *mut c_void, callback: *const StrataCallback, kinds: u32) -> i32>,
    /// Tells the plugin, synchronously, to stop notifying through
    /// `callback`; the host has already marked it stopped.
    pub unregister_callback: Option<unsafe extern "C" fn(handle: *mut c_void, callback: *const StrataCallback) -> i32>,
    /// Ends the connection; no call runs on it any more.
    pub close: Option<unsafe extern "C" fn(handle: *mut c_void)>,
}

/// The type of [`STRATA_DRIVER_ENTRY_SYMBOL`].
pub type StrataDriverEntry = unsafe extern "C" fn() -> *const StrataDriverV1;
