//! Driver plugins: shared libraries found on disk that speak the C ABI of
//! `strata-plugin-abi`, and the transport that carries wire calls
//! ([`crate::wire`]) through one's table for `wire_client`'s
//! [`Connection`], so every command works on a plugin's driver as on a
//! built-in one.
//!
//! Plugins are looked for in `$STRATA_PLUGIN_DIR`, then in
//! `<prefix>/lib/strata/drivers`, `<prefix>` being the directory above the
//! one holding the running executable (`/usr/local` for
//! `/usr/local/bin/strata`). A library is loaded only when it is owned by
//! root or the current user and writable by neither its group nor others,
//! and is never unloaded.

use std::collections::VecDeque;
use std::ffi::{c_void, CStr};
use std::os::unix::fs::MetadataExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use strata_plugin_abi::{
    StrataBytes, StrataCallback, StrataDriverEntry, StrataDriverV1, STRATA_ABI_VERSION, STRATA_DRIVER_ENTRY_SYMBOL,
    STRATA_ERR_INTERNAL, STRATA_ERR_INVALID_ARG, STRATA_ERR_OPERATION_ABORTED, STRATA_NOTIFY_EVENT, STRATA_OK,
};

use crate::capabilities::DriverCapabilities;
use crate::driver::{Connection, DomainEvent};
use crate::error::{Error, ErrorKind, Result};
use crate::uri::ConnectUri;
use crate::wire::{read_response, Call, Reply, Request};
use crate::wire_client::{WireConnection, WireTransport};

/// The variable naming the first directory searched for plugins.
pub const PLUGIN_DIR_VARIABLE: &str = "STRATA_PLUGIN_DIR";

/// A loaded plugin: what its table says, and its functions.
pub struct Plugin {
    pub path: PathBuf,
    /// The driver's name, as its table gives it.
    pub name: String,
    pub schemes: Vec<String>,
    pub abi_version: u32,
    pub capabilities: DriverCapabilities,
    functions: Functions,
}

/// The table's functions, each checked present when the plugin was loaded.
#[derive(Clone, Copy)]
struct Functions {
    open: unsafe extern "C" fn(*const std::ffi::c_char, *mut *mut c_void, *mut StrataBytes) -> i32,
    call: unsafe extern "C" fn(*mut c_void, u64, *const u8, usize, *mut StrataBytes) -> i32,
    free_bytes: unsafe extern "C" fn(StrataBytes),
    cancel: unsafe extern "C" fn(*mut c_void, u64) -> i32,
    register_callback: unsafe extern "C" fn(*mut c_void, *const StrataCallback, u32) -> i32,
    unregister_callback: unsafe extern "C" fn(*mut c_void, *const StrataCallback) -> i32,
    close: unsafe extern "C" fn(*mut c_void),
}

/// What discovery found: the plugins loaded, and the libraries refused,
/// each as an error naming the file and why.
pub struct Discovery {
    pub plugins: Vec<Plugin>,
    pub refused: Vec<Error>,
}

impl Discovery {
    /// The plugin serving `scheme`, if one was loaded.
    pub fn find(&self, scheme: &str) -> Option<&Plugin> {
        self.plugins.iter().find(|p| p.schemes.iter().any(|s| s == scheme))
    }
}

/// The plugins of this process, looked for and loaded at the first call;
/// `builtin` are the schemes of the drivers linked in, which no plugin
/// may take (the registry passes them).
pub fn discovered(builtin: &[&str]) -> &'static Discovery {
    static DISCOVERY: OnceLock<Discovery> = OnceLock::new();
    DISCOVERY.get_or_init(|| discover(&plugin_dirs(), builtin))
}

/// `$STRATA_PLUGIN_DIR`, then `<prefix>/lib/strata/drivers`.
pub fn plugin_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os(PLUGIN_DIR_VARIABLE).filter(|d| !d.is_empty()).map(PathBuf::from).into_iter().collect();
    let prefix = std::env::current_exe().ok().and_then(|exe| exe.parent()?.parent().map(Path::to_path_buf));
    dirs.extend(prefix.map(|p| p.join("lib/strata/drivers")));
    dirs
}

/// Loads every `*.so` in `dirs` (a directory that does not exist holds
/// none); the first plugin to claim a scheme serves it, and one claiming a
/// `builtin` scheme or one an earlier plugin serves is refused.
pub fn discover(dirs: &[PathBuf], builtin: &[&str]) -> Discovery {
    let mut found = Discovery { plugins: Vec::new(), refused: Vec::new() };
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        // Another user who can write the directory can swap a trusted
        // library for their own between the check and the load.
        if let Err(why) = check_owner_and_mode(dir) {
            found.refused.push(Error::new(
                ErrorKind::OperationInvalid,
                format!("driver plugin directory '{}' is not used: {why}", dir.display()),
            ));
            continue;
        }
        let mut libraries: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "so"))
            .collect();
        libraries.sort();
        for path in libraries {
            match load(&path) {
                Ok(plugin) => {
                    let taken = |s: &&String| builtin.contains(&s.as_str()) || found.find(s).is_some();
                    match plugin.schemes.iter().find(taken) {
                        Some(scheme) => found.refused.push(refusal(
                            &path,
                            &format!("its scheme '{scheme}' is served by another driver"),
                            ErrorKind::OperationInvalid,
                        )),
                        None => found.plugins.push(plugin),
                    }
                }
                Err(err) => found.refused.push(err),
            }
        }
    }
    found
}

fn refusal(path: &Path, why: &str, kind: ErrorKind) -> Error {
    Error::new(kind, format!("driver plugin '{}' is not loaded: {why}", path.display()))
}

/// Refuses a library another user could have put there or changed.
fn check_trusted(path: &Path) -> Result<()> {
    check_owner_and_mode(path).map_err(|why| refusal(path, &why, ErrorKind::OperationInvalid))
}

/// Why another user could change `path` (a library or the directory that
/// holds it), if they could: it is owned by neither root nor the current
/// user, or its group or others may write it.
fn check_owner_and_mode(path: &Path) -> std::result::Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read its status: {e}"))?;
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != me {
        return Err(format!("it is owned by uid {}, neither root nor the current user (uid {me})", meta.uid()));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!("it is writable by its group or by others (mode {mode:04o})"));
    }
    Ok(())
}

fn load(path: &Path) -> Result<Plugin> {
    check_trusted(path)?;
    let broken = |why: String| refusal(path, &why, ErrorKind::OperationInvalid);
    // SAFETY: opening the library runs its initialisers; the file passed
    // the ownership check, which is the trust the host gives a plugin.
    let library = unsafe { libloading::Library::new(path) }.map_err(|e| broken(format!("it cannot be opened: {e}")))?;
    // SAFETY: the ABI gives the entry symbol the type StrataDriverEntry.
    let entry: StrataDriverEntry = unsafe { library.get::<StrataDriverEntry>(STRATA_DRIVER_ENTRY_SYMBOL.as_bytes()) }
        .map(|symbol| *symbol)
        .map_err(|e| broken(format!("it has no {STRATA_DRIVER_ENTRY_SYMBOL} function: {e}")))?;
    // Plugins are never unloaded: their tables, strings and the callbacks
    // they keep stay valid for the life of the process.
    std::mem::forget(library);
    // SAFETY: the entry takes no arguments; the ABI makes calling it at any time valid.
    let table = unsafe { entry() };
    if table.is_null() {
        return Err(broken(format!("its {STRATA_DRIVER_ENTRY_SYMBOL} returned no table")));
    }
    // SAFETY: every version of the table starts with its u32 version, so
    // that field can be read before the rest is known.
    let abi_version = unsafe { table.cast::<u32>().read() };
    if abi_version != STRATA_ABI_VERSION {
        return Err(refusal(
            path,
            &format!("it speaks driver ABI version {abi_version}, but this strata speaks version {STRATA_ABI_VERSION}"),
            ErrorKind::ArgumentUnsupported,
        ));
    }
    // SAFETY: a table of this version is a StrataDriverV1, valid and
    // unchanged for the life of the process (the library stays loaded).
    let table: &'static StrataDriverV1 = unsafe { &*table };
    let text = |ptr: *const std::ffi::c_char, what: &str| -> Result<String> {
        if ptr.is_null() {
            return Err(broken(format!("its table has no {what}")));
        }
        // SAFETY: the ABI makes the table's strings NUL-terminated and
        // valid for the life of the process; the pointer is not null.
        let s = unsafe { CStr::from_ptr(ptr) };
        s.to_str().map(str::to_string).map_err(|_| broken(format!("its {what} is not UTF-8")))
    };
    let name = text(table.name, "driver name")?;
    let mut schemes = Vec::new();
    if !table.schemes.is_null() {
        for i in 0.. {
            // SAFETY: the schemes array is NULL-terminated and static; i
            // stops at the terminator.
            let scheme = unsafe { *table.schemes.add(i) };
            if scheme.is_null() {
                break;
            }
            schemes.push(text(scheme, "URI scheme")?);
        }
    }
    if schemes.is_empty() {
        return Err(broken("its table names no URI scheme".into()));
    }
    let capabilities: DriverCapabilities = serde_json::from_str(&text(table.capabilities_json, "capabilities")?)
        .map_err(|e| broken(format!("its capabilities cannot be read: {e}")))?;
    let missing = |what: &str| broken(format!("its table lacks the {what} function"));
    let functions = Functions {
        open: table.open.ok_or_else(|| missing("open"))?,
        call: table.call.ok_or_else(|| missing("call"))?,
        free_bytes: table.free_bytes.ok_or_else(|| missing("free_bytes"))?,
        cancel: table.cancel.ok_or_else(|| missing("cancel"))?,
        register_callback: table.register_callback.ok_or_else(|| missing("register_callback"))?,
        unregister_callback: table.unregister_callback.ok_or_else(|| missing("unregister_callback"))?,
        close: table.close.ok_or_else(|| missing("close"))?,
    };
    Ok(Plugin { path: path.to_path_buf(), name, schemes, abi_version, capabilities, functions })
}

impl Plugin {
    /// Copies bytes the plugin returned and hands them back to it to free.
    fn take_text(&self, bytes: StrataBytes) -> String {
        if bytes.ptr.is_null() {
            return String::new();
        }
        // SAFETY: the plugin returned ptr/len as one allocation of len
        // bytes, which stays valid until it is given to free_bytes below.
        let text = String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(bytes.ptr, bytes.len) }).into_owned();
        // SAFETY: these bytes came from this plugin and are freed once.
        unsafe { (self.functions.free_bytes)(bytes) };
        text
    }

    /// Opens a connection to `uri` through the plugin.
    pub fn open(&'static self, uri: &ConnectUri) -> Result<Box<dyn Connection>> {
        let c_uri = std::ffi::CString::new(uri.as_str())
            .map_err(|_| Error::invalid_arg(format!("connection URI '{}' holds a NUL byte", uri.as_str())))?;
        let mut raw = std::ptr::null_mut();
        let mut message = StrataBytes::EMPTY;
        // SAFETY: the URI is NUL-terminated and outlives the call; raw and
        // message are out-parameters the plugin may set.
        let status = unsafe { (self.functions.open)(c_uri.as_ptr(), &mut raw, &mut message) };
        let message = self.take_text(message);
        if status != STRATA_OK || raw.is_null() {
            let kind = if status == STRATA_OK { ErrorKind::Internal } else { ErrorKind::from_code(status) };
            return Err(Error::new(
                kind,
                format!("the {} driver cannot open '{}': {message}", self.name, uri.as_str()),
            ));
        }
        let mut capabilities = self.capabilities.clone();
        capabilities.uri = uri.as_str().to_string();
        let channel = Arc::new(Channel { plugin: self, raw, next_call: AtomicU64::new(1) });
        let events = capabilities.domains.events.then(|| EventListener::register(&channel)).transpose()?;
        let peer = format!("the {} driver", self.name);
        let transport = Arc::new(PluginTransport { channel, peer, events });
        Ok(Box::new(WireConnection { uri: uri.as_str().to_string(), capabilities, transport }))
    }
}

/// An open handle of a plugin. It is closed when the last of its users
/// (the connection, or a call still running on a blocking thread) goes.
struct Channel {
    plugin: &'static Plugin,
    raw: *mut c_void,
    next_call: AtomicU64,
}

// SAFETY: the ABI requires a plugin's functions to accept a handle from any
// thread, several calls at once; the host never touches what it points to.
unsafe impl Send for Channel {}
// SAFETY: as for Send: the handle is only passed back to the plugin.
unsafe impl Sync for Channel {}

impl Drop for Channel {
    fn drop(&mut self) {
        // SAFETY: the handle is open and, this being its last user, no call runs on it.
        unsafe { (self.plugin.functions.close)(self.raw) };
    }
}

impl Channel {
    /// Sends `call` on a blocking thread (the plugin completes it before
    /// returning); a call given up by the host (its future dropped, as at
    /// an interrupt) is cancelled in the plugin.
    async fn call(self: &Arc<Self>, call: Call) -> Result<Reply> {
        let request = serde_json::to_vec(&Request::new(call))
            .map_err(|e| Error::internal(format!("cannot encode a call for the {} driver: {e}", self.plugin.name)))?;
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        let mut pending = PendingCall { channel: self, id, done: false };
        let channel = Arc::clone(self);
        let outcome = tokio::task::spawn_blocking(move || channel.call_blocking(id, &request)).await;
        pending.done = true;
        outcome.map_err(|e| Error::internal(format!("the {} driver's call did not complete: {e}", self.plugin.name)))?
    }

    fn call_blocking(&self, id: u64, request: &[u8]) -> Result<Reply> {
        let mut response = StrataBytes::EMPTY;
        // SAFETY: the handle is open while self lives; the request outlives
        // the call; response is an out-parameter.
        let status =
            unsafe { (self.plugin.functions.call)(self.raw, id, request.as_ptr(), request.len(), &mut response) };
        let text = self.plugin.take_text(response);
        if status != STRATA_OK {
            return Err(Error::new(
                ErrorKind::from_code(status),
                format!("the {} driver failed a call: {text}", self.plugin.name),
            ));
        }
        read_response(&text).map_err(Error::from)
    }
}

/// Cancels its call in the plugin if dropped before the call returned.
struct PendingCall<'a> {
    channel: &'a Arc<Channel>,
    id: u64,
    done: bool,
}

impl Drop for PendingCall<'_> {
    fn drop(&mut self) {
        if !self.done {
            // SAFETY: the handle is open (the channel is alive); cancelling
            // a call that already ended is allowed and answers an error.
            let status = unsafe { (self.channel.plugin.functions.cancel)(self.channel.raw, self.id) };
            tracing::debug!(call = self.id, status, "cancelled a plugin call");
        }
    }
}

/// The host's callback record for a connection's events, with the queue
/// they wait in. It is leaked: a plugin may call through it at any time
/// for the life of the process, and once stopped the call is refused.
#[repr(C)]
struct EventListener {
    /// First, so a pointer to the record is a pointer to the listener.
    record: StrataCallback,
    stopped: AtomicBool,
    driver: &'static str,
    queue: Mutex<VecDeque<DomainEvent>>,
    arrived: Condvar,
}

// SAFETY: the record's context pointer is always null and, like its
// function pointer, never changes; the other fields are Sync themselves.
unsafe impl Sync for EventListener {}
// SAFETY: as for Sync: nothing in the record is tied to a thread.
unsafe impl Send for EventListener {}

impl EventListener {
    fn register(channel: &Channel) -> Result<&'static EventListener> {
        let listener: &'static EventListener = Box::leak(Box::new(EventListener {
            record: StrataCallback { notify: Some(deliver_event), context: std::ptr::null_mut() },
            stopped: AtomicBool::new(false),
            driver: &channel.plugin.name,
            queue: Mutex::new(VecDeque::new()),
            arrived: Condvar::new(),
        }));
        // SAFETY: the handle is open; the record lives for the process.
        let status =
            unsafe { (channel.plugin.functions.register_callback)(channel.raw, &listener.record, STRATA_NOTIFY_EVENT) };
        if status != STRATA_OK {
            listener.stopped.store(true, Ordering::SeqCst);
            return Err(Error::new(
                ErrorKind::from_code(status),
                format!("the {} driver refused to report events (error code {status})", channel.plugin.name),
            ));
        }
        Ok(listener)
    }

    /// Takes `domain`'s next event, waiting at most `timeout`.
    fn next(&self, domain: &str, timeout: Duration) -> Option<DomainEvent> {
        let deadline = Instant::now() + timeout;
        let mut queue = self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        loop {
            if let Some(i) = queue.iter().position(|e| e.domain == domain) {
                return queue.remove(i);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            queue = self.arrived.wait_timeout(queue, left).unwrap_or_else(|poisoned| poisoned.into_inner()).0;
        }
    }
}

/// The `notify` of every host callback record.
unsafe extern "C" fn deliver_event(callback: *const StrataCallback, kind: u32, data: *const u8, len: usize) -> i32 {
    if callback.is_null() {
        return STRATA_ERR_INVALID_ARG;
    }
    // SAFETY: the host gives plugins no record but an EventListener's
    // (leaked, so valid now), whose first field the record is.
    let listener = unsafe { &*callback.cast::<EventListener>() };
    if listener.stopped.load(Ordering::SeqCst) {
        tracing::warn!(driver = listener.driver, "a plugin notified through an unregistered callback; refused");
        return STRATA_ERR_OPERATION_ABORTED;
    }
    if kind != STRATA_NOTIFY_EVENT {
        return STRATA_ERR_INVALID_ARG;
    }
    let bytes = if data.is_null() {
        &[][..]
    } else {
        // SAFETY: the plugin passes len readable bytes at data for the
        // length of this call.
        unsafe { std::slice::from_raw_parts(data, len) }
    };
    catch_unwind(AssertUnwindSafe(|| match serde_json::from_slice::<DomainEvent>(bytes) {
        Ok(event) => {
            listener.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push_back(event);
            listener.arrived.notify_all();
            STRATA_OK
        }
        Err(e) => {
            tracing::warn!(driver = listener.driver, "a plugin sent an event that cannot be read: {e}");
            STRATA_ERR_INVALID_ARG
        }
    }))
    .unwrap_or(STRATA_ERR_INTERNAL)
}

/// A plugin's handle as a [`WireTransport`], with the connection's event
/// record, unregistered when the last user of the handle goes.
struct PluginTransport {
    channel: Arc<Channel>,
    peer: String,
    events: Option<&'static EventListener>,
}

impl Drop for PluginTransport {
    fn drop(&mut self) {
        if let Some(listener) = self.events {
            // Stopped first: whatever the plugin does from here on, through
            // this record, is refused by the host.
            listener.stopped.store(true, Ordering::SeqCst);
            // SAFETY: the handle is still open (this transport holds it).
            let status =
                unsafe { (self.channel.plugin.functions.unregister_callback)(self.channel.raw, &listener.record) };
            if status != STRATA_OK {
                tracing::warn!(driver = %self.channel.plugin.name, status, "the plugin failed to unregister a callback");
            }
        }
    }
}

#[async_trait]
impl WireTransport for PluginTransport {
    fn peer(&self) -> &str {
        &self.peer
    }
    async fn call(&self, call: Call) -> Result<Reply> {
        self.channel.call(call).await
    }
    /// Events come through the host's callback record, not as a call: the
    /// wait is for the plugin to notify.
    async fn next_event(&self, domain: &str, timeout_ms: u64) -> Result<Option<DomainEvent>> {
        let Some(listener) = self.events else {
            return Err(crate::capabilities::refusal(&self.channel.plugin.name, "does not report events"));
        };
        let domain = domain.to_string();
        tokio::task::spawn_blocking(move || listener.next(&domain, Duration::from_millis(timeout_ms)))
            .await
            .map_err(|e| Error::internal(format!("waiting for an event failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// The ABI's status codes are Strata's error codes, so a status read
    /// back with `ErrorKind::from_code` is the kind the plugin meant.
    #[test]
    fn the_abi_status_codes_are_the_error_kinds_codes() {
        use strata_plugin_abi as abi;
        let pairs = [
            (abi::STRATA_ERR_INTERNAL, ErrorKind::Internal),
            (abi::STRATA_ERR_NO_SUPPORT, ErrorKind::NoSupport),
            (abi::STRATA_ERR_INVALID_ARG, ErrorKind::InvalidArg),
            (abi::STRATA_ERR_OPERATION_FAILED, ErrorKind::OperationFailed),
            (abi::STRATA_ERR_NO_DOMAIN, ErrorKind::NoDomain),
            (abi::STRATA_ERR_OPERATION_INVALID, ErrorKind::OperationInvalid),
            (abi::STRATA_ERR_NO_DOMAIN_SNAPSHOT, ErrorKind::NoDomainSnapshot),
            (abi::STRATA_ERR_ARGUMENT_UNSUPPORTED, ErrorKind::ArgumentUnsupported),
            (abi::STRATA_ERR_OPERATION_ABORTED, ErrorKind::OperationAborted),
        ];
        for (code, kind) in pairs {
            assert_eq!(code, kind.code(), "{kind:?}");
            assert_eq!(ErrorKind::from_code(code), kind);
        }
        assert_eq!(crate::wire::ABI_VERSION, abi::STRATA_ABI_VERSION);
    }

    /// A library writable by others is refused before it is opened, and a
    /// file that is no library is refused when it cannot be; both name the
    /// file, and the directory's other libraries are still looked at.
    #[test]
    fn discovery_refuses_a_writable_library_and_a_broken_one_naming_each() {
        let dir = tempfile::tempdir().expect("tempdir");
        let writable = dir.path().join("libwritable.so");
        std::fs::write(&writable, b"not loaded").expect("write");
        std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let broken = dir.path().join("libbroken.so");
        std::fs::write(&broken, b"not an ELF file").expect("write");
        std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::fs::write(dir.path().join("README"), b"not a library").expect("write");

        let found = discover(&[dir.path().to_path_buf(), dir.path().join("missing")], &["qemu"]);
        assert!(found.plugins.is_empty());
        let messages: Vec<String> = found.refused.iter().map(|e| e.message().to_string()).collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(
            messages[0]
                .starts_with(&format!("driver plugin '{}' is not loaded: it cannot be opened:", broken.display())),
            "{messages:?}"
        );
        assert_eq!(
            messages[1],
            format!(
                "driver plugin '{}' is not loaded: it is writable by its group or by others (mode 0666)",
                writable.display()
            )
        );
    }

    /// A directory others may write is not looked into: its libraries are
    /// neither loaded nor listed, and the refusal names the directory.
    #[test]
    fn discovery_refuses_a_directory_others_can_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let library = dir.path().join("libbroken.so");
        std::fs::write(&library, b"not an ELF file").expect("write");
        std::fs::set_permissions(&library, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");

        let found = discover(&[dir.path().to_path_buf()], &["qemu"]);
        assert!(found.plugins.is_empty());
        let messages: Vec<String> = found.refused.iter().map(|e| e.message().to_string()).collect();
        assert_eq!(
            messages,
            [format!(
                "driver plugin directory '{}' is not used: it is writable by its group or by others (mode 0777)",
                dir.path().display()
            )]
        );
    }
}
