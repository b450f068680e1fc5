//! Driver plugins: shared libraries found on disk that speak the C ABI of
//! `strata-plugin-abi`, and the [`Connection`] that sends wire calls
//! ([`crate::wire`]) through one's table, so every command works on a
//! plugin's driver as on a built-in one.
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
use crate::driver::{
    BlockJobEnd, BlockJobInfo, BlockJobKind, BlockJobOps, BlockJobState, Connection, CpuPlacementOps, DefineFlags,
    DefineOutcome, DiskChainCheck, DiskSetOps, DiskSetOutcome, DomainEvent, DomainInfo, DomainSummary, DumpXmlFlags,
    MonitorOps, PinScope, PoolBuildFlags, PoolInfo, SnapshotOps, SnapshotSummary, StartFlags, StartOutcome,
    StoragePoolOps, UndefineFlags, VcpuCounts, VcpuInfo, VolumeInfo, VolumeResizeFlags,
};
use crate::error::{Error, ErrorKind, Result};
use crate::hostcpu::{HostCpuMap, NodeInfo};
use crate::options::{
    BlockCommitOptions, BlockCopyOptions, BlockJobAbortFlags, BlockPullOptions, SnapshotCreateFlags,
    SnapshotDeleteFlags, SnapshotRevertFlags,
};
use crate::uri::ConnectUri;
use crate::wire::{read_response, Call, Reply, Request};

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
        Ok(Box::new(PluginConnection { uri: uri.as_str().to_string(), capabilities, channel, events }))
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

/// A connection to a plugin's driver: each trait method is one wire call.
struct PluginConnection {
    uri: String,
    capabilities: DriverCapabilities,
    channel: Arc<Channel>,
    events: Option<&'static EventListener>,
}

impl Drop for PluginConnection {
    fn drop(&mut self) {
        if let Some(listener) = self.events {
            // Stopped first: whatever the plugin does from here on, through
            // this record, is refused by the host.
            listener.stopped.store(true, Ordering::SeqCst);
            // SAFETY: the handle is still open (this connection holds it).
            let status =
                unsafe { (self.channel.plugin.functions.unregister_callback)(self.channel.raw, &listener.record) };
            if status != STRATA_OK {
                tracing::warn!(driver = %self.capabilities.driver, status, "the plugin failed to unregister a callback");
            }
        }
    }
}

/// `$reply`'s value when it is the `$variant` the call answers with.
macro_rules! expect_reply {
    ($channel:expr, $call:expr, $variant:ident) => {
        match $channel.call($call).await? {
            Reply::$variant(value) => Ok(value),
            other => Err(unexpected(&$channel, &other)),
        }
    };
    ($channel:expr, $call:expr) => {
        match $channel.call($call).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected(&$channel, &other)),
        }
    };
}

fn unexpected(channel: &Channel, reply: &Reply) -> Error {
    let shown = serde_json::to_string(reply).unwrap_or_default();
    Error::internal(format!("the {} driver answered with an unexpected reply: {shown}", channel.plugin.name))
}

fn count(channel: &Channel, n: u64) -> Result<usize> {
    usize::try_from(n).map_err(|_| unexpected(channel, &Reply::Count(n)))
}

fn s(text: &str) -> String {
    text.to_string()
}

#[async_trait]
impl Connection for PluginConnection {
    fn uri(&self) -> &str {
        &self.uri
    }
    fn capabilities(&self) -> DriverCapabilities {
        self.capabilities.clone()
    }
    async fn list_domains(&self) -> Result<Vec<DomainSummary>> {
        expect_reply!(self.channel, Call::ListDomains, Domains)
    }
    async fn define_xml(&self, xml: &str, flags: DefineFlags) -> Result<DefineOutcome> {
        expect_reply!(self.channel, Call::DefineXml { xml: s(xml), flags }, Defined)
    }
    async fn undefine(&self, name: &str, flags: UndefineFlags) -> Result<()> {
        expect_reply!(self.channel, Call::Undefine { domain: s(name), flags })
    }
    async fn domain_info(&self, name: &str) -> Result<DomainInfo> {
        expect_reply!(self.channel, Call::DomainInfo { domain: s(name) }, DomainInfo)
    }
    async fn start(&self, name: &str, flags: StartFlags) -> Result<StartOutcome> {
        expect_reply!(self.channel, Call::Start { domain: s(name), flags }, Started)
    }
    async fn destroy(&self, name: &str) -> Result<()> {
        expect_reply!(self.channel, Call::Destroy { domain: s(name) })
    }
    async fn shutdown(&self, name: &str) -> Result<()> {
        expect_reply!(self.channel, Call::Shutdown { domain: s(name) })
    }
    async fn suspend(&self, name: &str) -> Result<()> {
        expect_reply!(self.channel, Call::Suspend { domain: s(name) })
    }
    async fn resume(&self, name: &str) -> Result<()> {
        expect_reply!(self.channel, Call::Resume { domain: s(name) })
    }
    async fn dump_xml(&self, name: &str, flags: DumpXmlFlags) -> Result<String> {
        expect_reply!(self.channel, Call::DumpXml { domain: s(name), flags }, Text)
    }
    async fn check_chains(&self, name: &str, disk: Option<&str>, fix: bool) -> Result<Vec<DiskChainCheck>> {
        expect_reply!(self.channel, Call::CheckChains { domain: s(name), disk: disk.map(s), fix }, ChainChecks)
    }
    /// Events come through the host's callback record, not as a call: the
    /// wait is for the plugin to notify.
    async fn next_event(&self, domain: &str, timeout_ms: u64) -> Result<Option<DomainEvent>> {
        let Some(listener) = self.events else {
            return Err(crate::capabilities::refusal(&self.capabilities.driver, "does not report events"));
        };
        let domain = s(domain);
        tokio::task::spawn_blocking(move || listener.next(&domain, Duration::from_millis(timeout_ms)))
            .await
            .map_err(|e| Error::internal(format!("waiting for an event failed: {e}")))
    }
    async fn vcpu_info(&self, name: &str) -> Result<Vec<VcpuInfo>> {
        expect_reply!(self.channel, Call::VcpuInfo { domain: s(name) }, Vcpus)
    }
    async fn attach_interface(&self, name: &str, xml: &str, scope: PinScope) -> Result<()> {
        expect_reply!(self.channel, Call::AttachInterface { domain: s(name), xml: s(xml), scope })
    }
    async fn detach_interface(&self, name: &str, iface_type: &str, mac: Option<&str>, scope: PinScope) -> Result<()> {
        let call = Call::DetachInterface { domain: s(name), iface_type: s(iface_type), mac: mac.map(s), scope };
        expect_reply!(self.channel, call)
    }
    fn snapshots(&self) -> Option<&dyn SnapshotOps> {
        let kinds = self.capabilities.snapshots.kinds;
        (kinds.internal_disk || kinds.external_disk || kinds.internal_memory || kinds.external_memory)
            .then_some(self as &dyn SnapshotOps)
    }
    fn block_jobs(&self) -> Option<&dyn BlockJobOps> {
        let kinds = self.capabilities.block_jobs.kinds;
        (kinds.pull || kinds.intermediate_commit || kinds.active_commit || kinds.copy)
            .then_some(self as &dyn BlockJobOps)
    }
    fn disk_sets(&self) -> Option<&dyn DiskSetOps> {
        self.capabilities.storage.disk_sets.then_some(self as &dyn DiskSetOps)
    }
    fn storage_pools(&self) -> Option<Box<dyn StoragePoolOps>> {
        self.capabilities
            .storage
            .storage_pools
            .then(|| Box::new(PluginPools(Arc::clone(&self.channel))) as Box<dyn StoragePoolOps>)
    }
    fn monitor(&self) -> Option<&dyn MonitorOps> {
        self.capabilities.domains.monitor.then_some(self as &dyn MonitorOps)
    }
    fn cpu_placement(&self) -> Option<&dyn CpuPlacementOps> {
        self.capabilities.domains.cpu_placement.then_some(self as &dyn CpuPlacementOps)
    }
}

#[async_trait]
impl SnapshotOps for PluginConnection {
    async fn snapshot_create(&self, domain: &str, xml: &str, flags: SnapshotCreateFlags) -> Result<String> {
        expect_reply!(self.channel, Call::SnapshotCreate { domain: s(domain), xml: s(xml), flags }, Text)
    }
    async fn snapshot_list(&self, domain: &str) -> Result<Vec<SnapshotSummary>> {
        expect_reply!(self.channel, Call::SnapshotList { domain: s(domain) }, Snapshots)
    }
    async fn snapshot_xml(&self, domain: &str, snapshot: &str) -> Result<String> {
        expect_reply!(self.channel, Call::SnapshotXml { domain: s(domain), snapshot: s(snapshot) }, Text)
    }
    async fn snapshot_set_current(&self, domain: &str, snapshot: &str) -> Result<()> {
        expect_reply!(self.channel, Call::SnapshotSetCurrent { domain: s(domain), snapshot: s(snapshot) })
    }
    async fn snapshot_revert(&self, domain: &str, snapshot: &str, flags: SnapshotRevertFlags) -> Result<()> {
        expect_reply!(self.channel, Call::SnapshotRevert { domain: s(domain), snapshot: s(snapshot), flags })
    }
    async fn snapshot_delete(&self, domain: &str, snapshot: &str, flags: SnapshotDeleteFlags) -> Result<Vec<String>> {
        expect_reply!(self.channel, Call::SnapshotDelete { domain: s(domain), snapshot: s(snapshot), flags }, Lines)
    }
}

#[async_trait]
impl BlockJobOps for PluginConnection {
    async fn block_pull(&self, domain: &str, disk: &str, opts: &BlockPullOptions) -> Result<()> {
        expect_reply!(self.channel, Call::BlockPull { domain: s(domain), disk: s(disk), options: opts.clone() })
    }
    async fn block_commit(&self, domain: &str, disk: &str, opts: &BlockCommitOptions) -> Result<BlockJobKind> {
        let call = Call::BlockCommit { domain: s(domain), disk: s(disk), options: opts.clone() };
        expect_reply!(self.channel, call, BlockJobKind)
    }
    async fn block_copy(&self, domain: &str, disk: &str, opts: &BlockCopyOptions) -> Result<Vec<String>> {
        expect_reply!(self.channel, Call::BlockCopy { domain: s(domain), disk: s(disk), options: opts.clone() }, Lines)
    }
    async fn block_job_info(&self, domain: &str, disk: &str) -> Result<Option<BlockJobInfo>> {
        expect_reply!(self.channel, Call::BlockJobInfo { domain: s(domain), disk: s(disk) }, BlockJobInfo)
    }
    async fn block_job_abort(&self, domain: &str, disk: &str, flags: BlockJobAbortFlags) -> Result<BlockJobEnd> {
        expect_reply!(self.channel, Call::BlockJobAbort { domain: s(domain), disk: s(disk), flags }, BlockJobEnd)
    }
    async fn block_job_set_speed(&self, domain: &str, disk: &str, bytes_per_sec: u64) -> Result<()> {
        expect_reply!(self.channel, Call::BlockJobSetSpeed { domain: s(domain), disk: s(disk), bytes_per_sec })
    }
    async fn block_job_wait(&self, domain: &str, disk: &str, timeout_ms: u64) -> Result<BlockJobState> {
        expect_reply!(self.channel, Call::BlockJobWait { domain: s(domain), disk: s(disk), timeout_ms }, BlockJobState)
    }
}

#[async_trait]
impl DiskSetOps for PluginConnection {
    async fn diskset_add(&self, domain: &str, disk: &str) -> Result<DiskSetOutcome> {
        expect_reply!(self.channel, Call::DisksetAdd { domain: s(domain), disk: s(disk) }, DiskSetOutcome)
    }
    async fn diskset_remove(&self, domain: &str, disk: &str) -> Result<DiskSetOutcome> {
        expect_reply!(self.channel, Call::DisksetRemove { domain: s(domain), disk: s(disk) }, DiskSetOutcome)
    }
    async fn diskset_add_all(&self, domain: &str) -> Result<usize> {
        count(&self.channel, expect_reply!(self.channel, Call::DisksetAddAll { domain: s(domain) }, Count)?)
    }
    async fn diskset_remove_all(&self, domain: &str) -> Result<usize> {
        count(&self.channel, expect_reply!(self.channel, Call::DisksetRemoveAll { domain: s(domain) }, Count)?)
    }
    async fn diskset_list(&self, domain: &str) -> Result<Vec<String>> {
        expect_reply!(self.channel, Call::DisksetList { domain: s(domain) }, Lines)
    }
    async fn diskset_size(&self, domain: &str) -> Result<usize> {
        count(&self.channel, expect_reply!(self.channel, Call::DisksetSize { domain: s(domain) }, Count)?)
    }
}

#[async_trait]
impl MonitorOps for PluginConnection {
    async fn monitor_command(&self, domain: &str, command: &str, human: bool) -> Result<String> {
        expect_reply!(self.channel, Call::MonitorCommand { domain: s(domain), command: s(command), human }, Text)
    }
}

#[async_trait]
impl CpuPlacementOps for PluginConnection {
    async fn node_info(&self) -> Result<NodeInfo> {
        expect_reply!(self.channel, Call::NodeInfo, NodeInfo)
    }
    async fn node_cpu_map(&self) -> Result<HostCpuMap> {
        expect_reply!(self.channel, Call::NodeCpuMap, HostCpuMap)
    }
    async fn vcpu_pins(&self, domain: &str, scope: PinScope) -> Result<Vec<Vec<u32>>> {
        expect_reply!(self.channel, Call::VcpuPins { domain: s(domain), scope }, VcpuPins)
    }
    async fn pin_vcpu(&self, domain: &str, vcpu: u32, cpus: &[u32], scope: PinScope) -> Result<()> {
        expect_reply!(self.channel, Call::PinVcpu { domain: s(domain), vcpu, cpus: cpus.to_vec(), scope })
    }
    async fn emulator_pin(&self, domain: &str, scope: PinScope) -> Result<Vec<u32>> {
        expect_reply!(self.channel, Call::EmulatorPin { domain: s(domain), scope }, Cpus)
    }
    async fn pin_emulator(&self, domain: &str, cpus: &[u32], scope: PinScope) -> Result<()> {
        expect_reply!(self.channel, Call::PinEmulator { domain: s(domain), cpus: cpus.to_vec(), scope })
    }
    async fn vcpu_counts(&self, domain: &str) -> Result<VcpuCounts> {
        expect_reply!(self.channel, Call::VcpuCounts { domain: s(domain) }, VcpuCounts)
    }
    async fn set_vcpus(&self, domain: &str, count: u32, scope: PinScope, maximum: bool) -> Result<()> {
        expect_reply!(self.channel, Call::SetVcpus { domain: s(domain), count, scope, maximum })
    }
}

/// A plugin's storage pools, over the connection's handle.
struct PluginPools(Arc<Channel>);

#[async_trait]
impl StoragePoolOps for PluginPools {
    async fn pool_define_xml(&self, xml: &str) -> Result<String> {
        expect_reply!(self.0, Call::PoolDefineXml { xml: s(xml) }, Text)
    }
    async fn pool_undefine(&self, pool: &str) -> Result<()> {
        expect_reply!(self.0, Call::PoolUndefine { pool: s(pool) })
    }
    async fn pool_build(&self, pool: &str, flags: PoolBuildFlags) -> Result<()> {
        expect_reply!(self.0, Call::PoolBuild { pool: s(pool), flags })
    }
    async fn pool_start(&self, pool: &str) -> Result<()> {
        expect_reply!(self.0, Call::PoolStart { pool: s(pool) })
    }
    async fn pool_destroy(&self, pool: &str) -> Result<()> {
        expect_reply!(self.0, Call::PoolDestroy { pool: s(pool) })
    }
    async fn pool_refresh(&self, pool: &str) -> Result<()> {
        expect_reply!(self.0, Call::PoolRefresh { pool: s(pool) })
    }
    async fn pool_list(&self) -> Result<Vec<PoolInfo>> {
        expect_reply!(self.0, Call::PoolList, Pools)
    }
    async fn pool_info(&self, pool: &str) -> Result<PoolInfo> {
        expect_reply!(self.0, Call::PoolInfo { pool: s(pool) }, Pool)
    }
    async fn pool_xml(&self, pool: &str, inactive: bool) -> Result<String> {
        expect_reply!(self.0, Call::PoolXml { pool: s(pool), inactive }, Text)
    }
    async fn pool_set_autostart(&self, pool: &str, autostart: bool) -> Result<()> {
        expect_reply!(self.0, Call::PoolSetAutostart { pool: s(pool), autostart })
    }
    async fn vol_list(&self, pool: &str) -> Result<Vec<VolumeInfo>> {
        expect_reply!(self.0, Call::VolList { pool: s(pool) }, Volumes)
    }
    async fn vol_info(&self, pool: Option<&str>, volume: &str) -> Result<VolumeInfo> {
        expect_reply!(self.0, Call::VolInfo { pool: pool.map(s), volume: s(volume) }, Volume)
    }
    async fn vol_xml(&self, pool: Option<&str>, volume: &str) -> Result<String> {
        expect_reply!(self.0, Call::VolXml { pool: pool.map(s), volume: s(volume) }, Text)
    }
    async fn vol_create_xml(&self, pool: &str, xml: &str) -> Result<String> {
        expect_reply!(self.0, Call::VolCreateXml { pool: s(pool), xml: s(xml) }, Text)
    }
    async fn vol_delete(&self, pool: Option<&str>, volume: &str) -> Result<()> {
        expect_reply!(self.0, Call::VolDelete { pool: pool.map(s), volume: s(volume) })
    }
    async fn vol_resize(&self, pool: Option<&str>, volume: &str, bytes: u64, flags: VolumeResizeFlags) -> Result<u64> {
        expect_reply!(self.0, Call::VolResize { pool: pool.map(s), volume: s(volume), bytes, flags }, Bytes)
    }
    async fn vol_clone(&self, pool: Option<&str>, volume: &str, new_name: &str) -> Result<()> {
        expect_reply!(self.0, Call::VolClone { pool: pool.map(s), volume: s(volume), new_name: s(new_name) })
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
