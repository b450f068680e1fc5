//! Write a Strata driver plugin in Rust: implement strata-core's
//! [`Connection`] (and the capability traits its capabilities promise:
//! `SnapshotOps`, `DiskSetOps`, …) and [`PluginDriver`], then export the
//! driver with one macro:
//!
//! ```ignore
//! strata_plugin_sdk::export_driver!(MyDriver);
//! ```
//!
//! in a crate built as a `cdylib`. The SDK fills in the C ABI of
//! `strata-plugin-abi` (`sdk/include/strata_driver.h`): it answers each
//! call with `strata_core::wire::dispatch_json` on a runtime of the
//! connection's own, turns a panic in the driver into an `internal-error`
//! reply, cancels a call when the host asks, and hands events to the
//! host's callback records through an [`EventSink`]. One driver per library.

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

pub use strata_core;
use strata_core::capabilities::DriverCapabilities;
use strata_core::driver::{Connection, DomainEvent};
use strata_core::error::{Error, ErrorKind, ErrorPayload, Result};
use strata_core::uri::ConnectUri;
use strata_core::wire::{dispatch_json, Outcome, Response, ABI_VERSION};
pub use strata_plugin_abi as abi;
use strata_plugin_abi::{
    StrataBytes, StrataCallback, StrataDriverV1, STRATA_ABI_VERSION, STRATA_ERR_INTERNAL, STRATA_ERR_INVALID_ARG,
    STRATA_ERR_OPERATION_ABORTED, STRATA_ERR_OPERATION_INVALID, STRATA_NOTIFY_EVENT, STRATA_OK,
};
use tokio::sync::Notify;

/// What a plugin's driver adds to [`Connection`]: its name, schemes and
/// capabilities, known before any connection, and how to open one.
pub trait PluginDriver: Connection + Sized + 'static {
    /// The driver's name (`example`).
    const NAME: &'static str;
    /// The URI schemes it serves (`example`).
    const SCHEMES: &'static [&'static str];
    /// What it can do; a connection's own may only differ in its URI.
    fn driver_capabilities() -> DriverCapabilities;
    /// Opens a connection; `events` reaches the host's event callbacks.
    /// Runs inside the connection's tokio runtime.
    fn open(uri: &ConnectUri, events: EventSink) -> Result<Self>;
}

/// Exports `$driver` (a [`PluginDriver`]) as the library's plugin entry.
#[macro_export]
macro_rules! export_driver {
    ($driver:ty) => {
        /// The plugin's entry: its ABI table.
        #[no_mangle]
        pub extern "C" fn strata_driver_entry() -> *const $crate::abi::StrataDriverV1 {
            $crate::driver_table::<$driver>()
        }
    };
}

/// The host's callback records a connection notifies, as the host
/// registered them. A record the host has stopped answers so when
/// notified, and is dropped then.
#[derive(Clone, Default)]
pub struct EventSink {
    callbacks: Arc<Mutex<Vec<HostCallback>>>,
}

/// A host record; the host keeps it valid for the life of the process.
#[derive(Clone, Copy, PartialEq, Eq)]
struct HostCallback(*const StrataCallback);

// SAFETY: the ABI lets a plugin call a host record from any thread.
unsafe impl Send for HostCallback {}

impl EventSink {
    /// Sends `event` to every registered host callback.
    pub fn emit(&self, event: &DomainEvent) {
        let Ok(data) = serde_json::to_vec(event) else { return };
        self.records().retain(|record| {
            // SAFETY: the record came from the host, which keeps it valid
            // for the life of the process; data outlives the call.
            let status = unsafe {
                match (*record.0).notify {
                    Some(notify) => notify(record.0, STRATA_NOTIFY_EVENT, data.as_ptr(), data.len()),
                    None => STRATA_ERR_INVALID_ARG,
                }
            };
            status != STRATA_ERR_OPERATION_ABORTED
        });
    }

    fn records(&self) -> MutexGuard<'_, Vec<HostCallback>> {
        self.callbacks.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One open connection: the driver, the runtime its calls run on, the
/// calls running (to cancel them) and its event sink.
struct Session<T> {
    driver: T,
    runtime: Option<tokio::runtime::Runtime>,
    events: EventSink,
    running: Mutex<HashMap<u64, Arc<Notify>>>,
}

impl<T> Session<T> {
    fn running(&self) -> MutexGuard<'_, HashMap<u64, Arc<Notify>>> {
        self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The table [`export_driver!`] returns, made once for the library.
pub fn driver_table<T: PluginDriver>() -> *const StrataDriverV1 {
    struct Table(&'static StrataDriverV1);
    // SAFETY: the table and its strings are leaked and never written after
    // they are made, so they can be read from any thread.
    unsafe impl Sync for Table {}
    // SAFETY: as for Sync.
    unsafe impl Send for Table {}
    static TABLE: OnceLock<Table> = OnceLock::new();
    let leaked = |text: String| -> *const c_char {
        let text = CString::new(text.replace('\0', "")).unwrap_or_default();
        Box::leak(text.into_boxed_c_str()).as_ptr()
    };
    let table = TABLE.get_or_init(|| {
        let capabilities = serde_json::to_string(&T::driver_capabilities()).unwrap_or_default();
        let mut schemes: Vec<*const c_char> = T::SCHEMES.iter().map(|s| leaked(s.to_string())).collect();
        schemes.push(std::ptr::null());
        Table(Box::leak(Box::new(StrataDriverV1 {
            abi_version: STRATA_ABI_VERSION,
            name: leaked(T::NAME.to_string()),
            schemes: Box::leak(schemes.into_boxed_slice()).as_ptr(),
            capabilities_json: leaked(capabilities),
            open: Some(open::<T>),
            call: Some(call::<T>),
            free_bytes: Some(free_bytes),
            cancel: Some(cancel::<T>),
            register_callback: Some(register_callback::<T>),
            unregister_callback: Some(unregister_callback::<T>),
            close: Some(close::<T>),
        })))
    });
    table.0
}

/// Bytes the host gets and gives back to [`free_bytes`].
fn into_bytes(text: String) -> StrataBytes {
    let boxed = text.into_bytes().into_boxed_slice();
    let len = boxed.len();
    StrataBytes { ptr: Box::into_raw(boxed).cast::<u8>(), len }
}

unsafe extern "C" fn free_bytes(bytes: StrataBytes) {
    if !bytes.ptr.is_null() {
        // SAFETY: the host returns bytes made by into_bytes, once: a boxed
        // slice of exactly len bytes.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(bytes.ptr, bytes.len)) });
    }
}

/// Writes `text` to an out-parameter for bytes, when the host gave one.
///
/// # Safety
/// `out` is null or valid for a write.
unsafe fn set_bytes(out: *mut StrataBytes, text: String) {
    if !out.is_null() {
        // SAFETY: the caller promises out is valid for a write.
        unsafe { out.write(into_bytes(text)) };
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(text), _) => text.to_string(),
        (_, Some(text)) => text.clone(),
        _ => "no message".to_string(),
    }
}

fn error_response(err: Error) -> String {
    let response = Response { abi: ABI_VERSION, outcome: Outcome::Error(ErrorPayload::from(err)) };
    serde_json::to_string(&response).unwrap_or_default()
}

/// The method a JSON request names, for a message about it.
fn method_of(request: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(request).unwrap_or_default();
    value["call"]["method"].as_str().unwrap_or("an unreadable call").to_string()
}

unsafe extern "C" fn open<T: PluginDriver>(
    uri: *const c_char,
    handle: *mut *mut c_void,
    error: *mut StrataBytes,
) -> i32 {
    if uri.is_null() || handle.is_null() {
        return STRATA_ERR_INVALID_ARG;
    }
    // SAFETY: the host passes a NUL-terminated URI valid for this call.
    let uri = unsafe { CStr::from_ptr(uri) }.to_string_lossy().into_owned();
    let opened = catch_unwind(|| -> Result<Box<Session<T>>> {
        let parsed = ConnectUri::parse(&uri)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::internal(format!("cannot start the {} driver's runtime: {e}", T::NAME)))?;
        let events = EventSink::default();
        let driver = {
            let _inside = runtime.enter();
            T::open(&parsed, events.clone())?
        };
        Ok(Box::new(Session { driver, runtime: Some(runtime), events, running: Mutex::new(HashMap::new()) }))
    });
    let failure = match opened {
        Ok(Ok(session)) => {
            // SAFETY: the host passes a handle out-parameter valid for a write.
            unsafe { handle.write(Box::into_raw(session).cast::<c_void>()) };
            return STRATA_OK;
        }
        Ok(Err(err)) => err,
        Err(panic) => Error::internal(format!("the {} driver panicked in open: {}", T::NAME, panic_text(&*panic))),
    };
    // SAFETY: error is null or an out-parameter valid for a write.
    unsafe { set_bytes(error, failure.message().to_string()) };
    failure.kind().code()
}

/// # Safety
/// `handle` is one [`open`] returned and [`close`] has not ended.
unsafe fn session<'a, T>(handle: *mut c_void) -> &'a Session<T> {
    // SAFETY: the caller promises a live handle made by open::<T>.
    unsafe { &*handle.cast::<Session<T>>() }
}

unsafe extern "C" fn call<T: PluginDriver>(
    handle: *mut c_void,
    call_id: u64,
    request: *const u8,
    request_len: usize,
    response: *mut StrataBytes,
) -> i32 {
    if handle.is_null() || request.is_null() || response.is_null() {
        return STRATA_ERR_INVALID_ARG;
    }
    // SAFETY: the host passes a live handle of this driver.
    let session = unsafe { session::<T>(handle) };
    // SAFETY: the host passes request_len readable bytes for this call.
    let request = String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(request, request_len) }).into_owned();
    let Some(runtime) = session.runtime.as_ref() else { return STRATA_ERR_INTERNAL };
    let cancelled = Arc::new(Notify::new());
    session.running().insert(call_id, Arc::clone(&cancelled));
    let answered = catch_unwind(AssertUnwindSafe(|| {
        runtime.block_on(async {
            tokio::select! {
                answer = dispatch_json(&session.driver, &request) => answer,
                () = cancelled.notified() => error_response(Error::new(
                    ErrorKind::OperationAborted,
                    format!("the {} driver's {} call was cancelled", T::NAME, method_of(&request)),
                )),
            }
        })
    }));
    session.running().remove(&call_id);
    let answer = answered.unwrap_or_else(|panic| {
        error_response(Error::internal(format!(
            "the {} driver panicked in {}: {}",
            T::NAME,
            method_of(&request),
            panic_text(&*panic)
        )))
    });
    // SAFETY: response was checked not null; the host passes it for a write.
    unsafe { set_bytes(response, answer) };
    STRATA_OK
}

unsafe extern "C" fn cancel<T: PluginDriver>(handle: *mut c_void, call_id: u64) -> i32 {
    if handle.is_null() {
        return STRATA_ERR_INVALID_ARG;
    }
    // SAFETY: the host passes a live handle of this driver.
    let session = unsafe { session::<T>(handle) };
    match session.running().get(&call_id) {
        Some(cancelled) => {
            cancelled.notify_one();
            STRATA_OK
        }
        None => STRATA_ERR_OPERATION_INVALID,
    }
}

unsafe extern "C" fn register_callback<T: PluginDriver>(
    handle: *mut c_void,
    callback: *const StrataCallback,
    kinds: u32,
) -> i32 {
    if handle.is_null() || callback.is_null() || kinds & !STRATA_NOTIFY_EVENT != 0 {
        return STRATA_ERR_INVALID_ARG;
    }
    // SAFETY: the host passes a live handle of this driver.
    let session = unsafe { session::<T>(handle) };
    if kinds & STRATA_NOTIFY_EVENT != 0 {
        session.events.records().push(HostCallback(callback));
    }
    STRATA_OK
}

unsafe extern "C" fn unregister_callback<T: PluginDriver>(handle: *mut c_void, callback: *const StrataCallback) -> i32 {
    if handle.is_null() {
        return STRATA_ERR_INVALID_ARG;
    }
    // SAFETY: the host passes a live handle of this driver.
    let session = unsafe { session::<T>(handle) };
    let mut records = session.events.records();
    let before = records.len();
    records.retain(|r| *r != HostCallback(callback));
    if records.len() == before {
        STRATA_ERR_INVALID_ARG
    } else {
        STRATA_OK
    }
}

unsafe extern "C" fn close<T: PluginDriver>(handle: *mut c_void) {
    if handle.is_null() {
        return;
    }
    // SAFETY: the host closes a handle open made, once, with no call running.
    let mut session = unsafe { Box::from_raw(handle.cast::<Session<T>>()) };
    // The host may close from inside its own async runtime, where dropping
    // a runtime would panic; this one is shut down without waiting.
    let runtime = session.runtime.take();
    // A panic while the driver is dropped must not unwind into the host;
    // the connection is gone either way, so there is nothing to report.
    let _ = catch_unwind(AssertUnwindSafe(move || {
        drop(session);
        if let Some(runtime) = runtime {
            runtime.shutdown_background();
        }
    }));
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use async_trait::async_trait;
    use strata_core::driver::{
        DefineFlags, DefineOutcome, DiskChainCheck, DomainInfo, DomainSummary, DumpXmlFlags, StartFlags, StartOutcome,
        UndefineFlags,
    };
    use strata_core::wire::{read_response, Reply};

    use super::*;

    /// A driver whose domain list never comes and whose domain_info panics.
    struct Stuck;

    fn refused() -> Error {
        Error::no_support("the stuck driver does only two things")
    }

    #[async_trait]
    impl Connection for Stuck {
        fn uri(&self) -> &str {
            "stuck:///"
        }
        fn capabilities(&self) -> DriverCapabilities {
            Self::driver_capabilities()
        }
        async fn list_domains(&self) -> Result<Vec<DomainSummary>> {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(Vec::new())
        }
        async fn define_xml(&self, _xml: &str, _flags: DefineFlags) -> Result<DefineOutcome> {
            Err(refused())
        }
        async fn undefine(&self, _name: &str, _flags: UndefineFlags) -> Result<()> {
            Err(refused())
        }
        async fn domain_info(&self, name: &str) -> Result<DomainInfo> {
            panic!("no info on {name}");
        }
        async fn start(&self, _name: &str, _flags: StartFlags) -> Result<StartOutcome> {
            Err(refused())
        }
        async fn destroy(&self, _name: &str) -> Result<()> {
            Err(refused())
        }
        async fn shutdown(&self, _name: &str) -> Result<()> {
            Err(refused())
        }
        async fn suspend(&self, _name: &str) -> Result<()> {
            Err(refused())
        }
        async fn resume(&self, _name: &str) -> Result<()> {
            Err(refused())
        }
        async fn dump_xml(&self, _name: &str, _flags: DumpXmlFlags) -> Result<String> {
            Err(refused())
        }
        async fn check_chains(&self, _name: &str, _disk: Option<&str>, _fix: bool) -> Result<Vec<DiskChainCheck>> {
            Err(refused())
        }
    }

    impl PluginDriver for Stuck {
        const NAME: &'static str = "stuck";
        const SCHEMES: &'static [&'static str] = &["stuck"];
        fn driver_capabilities() -> DriverCapabilities {
            DriverCapabilities { driver: "stuck".into(), ..Default::default() }
        }
        fn open(_uri: &ConnectUri, _events: EventSink) -> Result<Self> {
            Ok(Stuck)
        }
    }

    /// A handle of the table's open, as the host would get it.
    struct Handle(*mut c_void);
    // SAFETY: the SDK's handles may be used from any thread (the ABI's rule).
    unsafe impl Send for Handle {}

    fn table() -> &'static StrataDriverV1 {
        // SAFETY: driver_table returns a leaked table, valid for the process.
        unsafe { &*driver_table::<Stuck>() }
    }

    fn open_stuck() -> Handle {
        let uri = CString::new("stuck:///").expect("no NUL");
        let mut handle = std::ptr::null_mut();
        let mut error = StrataBytes::EMPTY;
        // SAFETY: a NUL-terminated URI and out-parameters, as the ABI asks.
        let status = unsafe { table().open.expect("open")(uri.as_ptr(), &mut handle, &mut error) };
        assert_eq!(status, STRATA_OK);
        Handle(handle)
    }

    /// Performs a call as the host does and reads its JSON response.
    fn perform(handle: &Handle, id: u64, request: &str) -> std::result::Result<Reply, ErrorPayload> {
        let mut response = StrataBytes::EMPTY;
        // SAFETY: a live handle, the request's bytes for the call, an out-parameter.
        let status =
            unsafe { table().call.expect("call")(handle.0, id, request.as_ptr(), request.len(), &mut response) };
        assert_eq!(status, STRATA_OK);
        // SAFETY: the SDK returned len bytes at ptr, freed once below.
        let text =
            String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(response.ptr, response.len) }).into_owned();
        // SAFETY: bytes this table returned, freed once.
        unsafe { table().free_bytes.expect("free_bytes")(response) };
        read_response(&text)
    }

    #[test]
    fn a_running_call_is_cancelled_when_the_host_asks() {
        let handle = open_stuck();
        let (sent, received) = mpsc::channel();
        let caller = Handle(handle.0);
        std::thread::spawn(move || {
            let _ = sent.send(perform(&caller, 7, r#"{"abi":1,"call":{"method":"list_domains"}}"#));
        });
        // SAFETY: the handle is live; open made it for Stuck.
        let session = unsafe { session::<Stuck>(handle.0) };
        let guard = Instant::now() + Duration::from_secs(120);
        while !session.running().contains_key(&7) {
            assert!(Instant::now() < guard, "the call never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: a live handle.
        assert_eq!(unsafe { table().cancel.expect("cancel")(handle.0, 7) }, STRATA_OK);
        let answer = received.recv_timeout(Duration::from_secs(120)).expect("the cancelled call returns");
        let payload = answer.expect_err("a cancelled call is an error");
        assert_eq!(
            (payload.kind.as_str(), payload.message.as_str()),
            ("operation-aborted", "the stuck driver's list_domains call was cancelled")
        );
        // SAFETY: a live handle; no call 8 runs.
        assert_eq!(unsafe { table().cancel.expect("cancel")(handle.0, 8) }, STRATA_ERR_OPERATION_INVALID);
        // SAFETY: the handle is closed once, with no call running.
        unsafe { table().close.expect("close")(handle.0) };
    }

    #[test]
    fn a_panic_in_the_driver_is_an_internal_error_and_the_handle_still_works() {
        let handle = open_stuck();
        let panicked = perform(&handle, 1, r#"{"abi":1,"call":{"method":"domain_info","args":{"domain":"vm1"}}}"#);
        let payload = panicked.expect_err("a panic is an error");
        assert_eq!(
            (payload.kind.as_str(), payload.message.as_str()),
            ("internal-error", "the stuck driver panicked in domain_info: no info on vm1")
        );
        let uri = perform(&handle, 2, r#"{"abi":1,"call":{"method":"uri"}}"#);
        assert_eq!(uri, Ok(Reply::Text("stuck:///".into())));
        // SAFETY: the handle is closed once, with no call running.
        unsafe { table().close.expect("close")(handle.0) };
    }
}
