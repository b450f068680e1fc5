//! Loading `VBoxXPCOMC.so` and keeping every XPCOM object on one thread.
//!
//! XPCOM objects belong to the thread that created them, so the library
//! is initialised on a dedicated thread that owns `IVirtualBox`,
//! `ISession` and everything obtained from them ([`Com`] is neither `Send`
//! nor `Sync`); the driver's async methods send closures to it
//! ([`Xpcom::run`]). Strings, out-arrays and interface references are
//! released as the 4.2 binding's conventions say: out strings with
//! `pfnUtf16Free`, each interface element of an out-array with `Release`
//! and the array with `pfnComUnallocMem`, every interface with `Release`.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::fmt;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use libloading::Library;
use strata_core::driver::BlockJobKind;
use strata_core::{Error, ErrorKind, Result};

use crate::ffi::{
    FunctionTable, GetFunctions, ISession, IVirtualBox, NsISupportsVtbl, Nsresult, Object, Vtable, ISESSION_IID,
    IVIRTUALBOX_IID, VBOX_XPCOMC_VERSION,
};

/// The library's file name on Linux.
pub const LIBRARY: &str = "VBoxXPCOMC.so";

/// Where VirtualBox installs it, after `$VBOX_APP_HOME` and before the
/// dynamic linker's search (libvirt's list, `vbox42-abi.json` `loading`).
pub const KNOWN_DIRS: &[&str] = &[
    "/usr/lib/virtualbox",
    "/usr/lib/virtualbox-ose",
    "/usr/lib64/virtualbox",
    "/usr/lib64/virtualbox-ose",
    "/usr/lib/VirtualBox",
    "/opt/virtualbox",
    "/opt/VirtualBox",
    "/opt/virtualbox/i386",
    "/opt/VirtualBox/i386",
    "/opt/virtualbox/amd64",
    "/opt/VirtualBox/amd64",
    "/usr/local/lib/virtualbox",
    "/usr/local/lib/VirtualBox",
];

/// A failed XPCOM call: its result code and which method it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: Nsresult,
    pub interface: &'static str,
    pub method: &'static str,
}

pub const E_INVALIDARG: Nsresult = 0x8007_0057;
pub const E_ACCESSDENIED: Nsresult = 0x8007_0005;
pub const VBOX_E_OBJECT_NOT_FOUND: Nsresult = 0x80BB_0001;
pub const VBOX_E_INVALID_VM_STATE: Nsresult = 0x80BB_0002;
pub const VBOX_E_FILE_ERROR: Nsresult = 0x80BB_0004;
pub const VBOX_E_INVALID_OBJECT_STATE: Nsresult = 0x80BB_0007;
pub const VBOX_E_OBJECT_IN_USE: Nsresult = 0x80BB_000C;

/// The result code's name (from the ABI's `nsresult_codes`) and what VirtualBox means by it.
pub fn code_name(code: Nsresult) -> (&'static str, &'static str) {
    match code {
        0x8000_4001 => ("E_NOTIMPL", "not implemented"),
        0x8000_4002 => ("E_NOINTERFACE", "no such interface"),
        0x8000_4003 => ("E_POINTER", "invalid pointer"),
        0x8000_4004 => ("E_ABORT", "aborted"),
        0x8000_4005 => ("E_FAIL", "failed"),
        0x8000_FFFF => ("E_UNEXPECTED", "unexpected failure"),
        0x8007_000E => ("E_OUTOFMEMORY", "out of memory"),
        E_INVALIDARG => ("E_INVALIDARG", "invalid argument"),
        E_ACCESSDENIED => ("E_ACCESSDENIED", "access denied"),
        VBOX_E_OBJECT_NOT_FOUND => ("VBOX_E_OBJECT_NOT_FOUND", "object not found"),
        VBOX_E_INVALID_VM_STATE => ("VBOX_E_INVALID_VM_STATE", "the machine's state does not allow this"),
        0x80BB_0003 => ("VBOX_E_VM_ERROR", "virtual machine error"),
        VBOX_E_FILE_ERROR => ("VBOX_E_FILE_ERROR", "file error"),
        0x80BB_0005 => ("VBOX_E_IPRT_ERROR", "runtime error"),
        0x80BB_0006 => ("VBOX_E_PDM_ERROR", "device manager error"),
        VBOX_E_INVALID_OBJECT_STATE => ("VBOX_E_INVALID_OBJECT_STATE", "the object is locked or in the wrong state"),
        0x80BB_0008 => ("VBOX_E_HOST_ERROR", "host error"),
        0x80BB_0009 => ("VBOX_E_NOT_SUPPORTED", "not supported"),
        0x80BB_000A => ("VBOX_E_XML_ERROR", "settings file error"),
        0x80BB_000B => ("VBOX_E_INVALID_SESSION_STATE", "the session's state does not allow this"),
        VBOX_E_OBJECT_IN_USE => ("VBOX_E_OBJECT_IN_USE", "object in use"),
        _ => ("an unknown result", "unknown failure"),
    }
}

/// The kind of Strata error a result code is, when the caller knows no better.
pub fn kind_of(code: Nsresult) -> ErrorKind {
    match code {
        E_INVALIDARG => ErrorKind::InvalidArg,
        VBOX_E_INVALID_VM_STATE | VBOX_E_INVALID_OBJECT_STATE | VBOX_E_OBJECT_IN_USE | E_ACCESSDENIED => {
            ErrorKind::OperationInvalid
        }
        _ => ErrorKind::OperationFailed,
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, meaning) = code_name(self.code);
        write!(f, "{}::{} failed: {meaning} ({name}, 0x{:08x})", self.interface, self.method, self.code)
    }
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Error {
        Error::new(kind_of(f.code), f.to_string())
    }
}

/// `rc` as a result.
pub fn check(rc: Nsresult, interface: &'static str, method: &'static str) -> Result<(), Failure> {
    if rc & 0x8000_0000 == 0 {
        Ok(())
    } else {
        Err(Failure { code: rc, interface, method })
    }
}

/// A reference to an interface object, released when dropped; it stays on
/// the XPCOM thread (neither `Send` nor `Sync`).
pub struct Com<V: Vtable> {
    ptr: NonNull<Object<V>>,
    _owned_here: PhantomData<*mut V>,
}

impl<V: Vtable> Com<V> {
    /// Takes over a reference the callee handed out (NULL gives None).
    ///
    /// # Safety
    /// `ptr` is NULL or an AddRef'd interface pointer whose vtable is `V`.
    pub unsafe fn from_raw(ptr: *mut Object<V>) -> Option<Com<V>> {
        NonNull::new(ptr).map(|ptr| Com { ptr, _owned_here: PhantomData })
    }

    pub fn interface(&self) -> &'static str {
        V::NAME
    }

    pub fn raw(&self) -> *mut Object<V> {
        self.ptr.as_ptr()
    }

    pub fn vt(&self) -> &V {
        // SAFETY: a live object's first field points at its vtable, a static of the library.
        unsafe { &*(*self.ptr.as_ptr()).vtbl }
    }
}

impl<V: Vtable> Drop for Com<V> {
    fn drop(&mut self) {
        // SAFETY: V: Vtable starts with nsISupports' slots, so Release is at slot 2;
        // this reference was handed to us AddRef'd and is released once.
        unsafe {
            let base = (*self.ptr.as_ptr()).vtbl.cast::<NsISupportsVtbl>();
            ((*base).Release)(self.ptr.as_ptr().cast::<c_void>());
        }
    }
}

/// Calls a method: `call!(obj.Method(args…))`, giving `Result<(), Failure>`
/// that names the interface and method.
macro_rules! call {
    ($obj:ident . $method:ident ( $($arg:expr),* $(,)? )) => {{
        let obj = &$obj;
        // SAFETY: `obj` is a live reference of the vtable's interface; the
        // arguments match the slot's C signature (checked against the ABI).
        let rc = unsafe { (obj.vt().$method)(obj.raw(), $($arg),*) };
        $crate::xpcom::check(rc, obj.interface(), stringify!($method))
    }};
}

/// A scalar attribute: `get!(obj.GetFoo)`.
macro_rules! get {
    ($obj:ident . $method:ident) => {{
        let mut out = Default::default();
        $crate::xpcom::call!($obj.$method(&mut out)).map(|()| out)
    }};
}

/// An interface attribute or out parameter (None for NULL):
/// `get_obj!(obj.GetFoo(args…))`.
macro_rules! get_obj {
    ($obj:ident . $method:ident ( $($arg:expr),* )) => {{
        let mut out = std::ptr::null_mut();
        // SAFETY: on success the callee stored NULL or an AddRef'd pointer of the slot's type.
        $crate::xpcom::call!($obj.$method($($arg,)* &mut out)).map(|()| unsafe { $crate::xpcom::Com::from_raw(out) })
    }};
}

/// A string attribute or out parameter: `get_str!(ctx, obj.GetFoo(args…))`.
macro_rules! get_str {
    ($ctx:expr, $obj:ident . $method:ident ( $($arg:expr),* )) => {{
        let mut out = std::ptr::null_mut();
        // SAFETY: on success the callee stored NULL or a string it allocated for us.
        $crate::xpcom::call!($obj.$method($($arg,)* &mut out)).map(|()| unsafe { $ctx.take_string(out) })
    }};
}

/// An array of interfaces: `get_array!(ctx, obj.GetFoo)`.
macro_rules! get_array {
    ($ctx:expr, $obj:ident . $method:ident) => {{
        let mut size = 0u32;
        let mut out = std::ptr::null_mut();
        // SAFETY: on success the callee stored `size` AddRef'd pointers of the slot's type.
        $crate::xpcom::call!($obj.$method(&mut size, &mut out)).map(|()| unsafe { $ctx.take_array(size, out) })
    }};
}

pub(crate) use {call, get, get_array, get_obj, get_str};

/// A UTF-16 copy of a string for an in-parameter, freed with `pfnUtf16Free`.
pub struct InStr {
    ptr: *mut u16,
    free: unsafe extern "C" fn(*mut u16),
}

impl InStr {
    pub fn ptr(&self) -> *const u16 {
        self.ptr
    }
}

impl Drop for InStr {
    fn drop(&mut self) {
        // SAFETY: ptr came from pfnUtf8ToUtf16 of the same library and is freed once.
        unsafe { (self.free)(self.ptr) }
    }
}

/// A block job this client started: its IProgress and, for a copy, the
/// new medium a pivot attaches.
pub struct HeldJob {
    pub kind: BlockJobKind,
    pub progress: Com<crate::ffi::IProgressVtbl>,
    pub copy: Option<Com<crate::ffi::IMediumVtbl>>,
}

/// What lives on the XPCOM thread: the function table, the two objects
/// pfnComInitialize gave, and the block jobs this process started.
pub struct Ctx {
    funcs: &'static FunctionTable,
    pub vbox: Com<crate::ffi::IVirtualBoxVtbl>,
    pub session: Com<crate::ffi::ISessionVtbl>,
    /// Block jobs this client started, by (domain, disk target).
    pub jobs: HashMap<(String, String), HeldJob>,
    percents: Percents,
}

/// How far each domain's running snapshot operation has gone, shared with
/// the connection so it is read without waiting for the XPCOM thread.
pub type Percents = Arc<Mutex<HashMap<String, u32>>>;

impl Ctx {
    /// Waits for every job still running (the connection is closing), as
    /// VirtualBox would carry them out after its client went.
    fn finish_jobs(&mut self) {
        for (_, job) in self.jobs.drain() {
            let progress = &job.progress;
            let _ = call!(progress.WaitForCompletion(-1));
        }
    }

    /// `s` as UTF-16 for an in-parameter.
    pub fn utf16(&self, s: &str) -> Result<InStr> {
        let c = CString::new(s).map_err(|_| Error::invalid_arg(format!("'{s}' contains a NUL character")))?;
        let mut out = std::ptr::null_mut();
        // SAFETY: c is NUL-terminated; out receives a string the library allocates.
        let rc = unsafe { (self.funcs.pfnUtf8ToUtf16)(c.as_ptr(), &mut out) };
        if rc < 0 || out.is_null() {
            return Err(Error::internal(format!("pfnUtf8ToUtf16 failed ({rc}) for '{s}'")));
        }
        Ok(InStr { ptr: out, free: self.funcs.pfnUtf16Free })
    }

    /// An out string: copied, then freed with `pfnUtf16Free` (NULL reads as empty).
    ///
    /// # Safety
    /// `s` is NULL or a NUL-terminated UTF-16 string the library allocated,
    /// which nothing else frees.
    pub unsafe fn take_string(&self, s: *mut u16) -> String {
        if s.is_null() {
            return String::new();
        }
        let mut len = 0;
        // SAFETY: per the contract, every unit up to the NUL is readable; the
        // string is freed once, after it was copied.
        unsafe {
            while *s.add(len) != 0 {
                len += 1;
            }
            let text = String::from_utf16_lossy(std::slice::from_raw_parts(s, len));
            (self.funcs.pfnUtf16Free)(s);
            text
        }
    }

    /// An out-array of interfaces: each element taken over (released when
    /// dropped), the array freed with `pfnComUnallocMem`.
    ///
    /// # Safety
    /// `array` is NULL or holds `size` NULL or AddRef'd pointers of vtable `V`,
    /// allocated by the library.
    pub unsafe fn take_array<V: Vtable>(&self, size: u32, array: *mut *mut Object<V>) -> Vec<Com<V>> {
        if array.is_null() {
            return Vec::new();
        }
        // SAFETY: per the contract, `size` elements are readable and each is owned by us.
        let items = (0..size as usize).filter_map(|i| unsafe { Com::from_raw(*array.add(i)) }).collect();
        // SAFETY: the array came from the library's allocator and is freed once.
        unsafe { (self.funcs.pfnComUnallocMem)(array.cast()) };
        items
    }

    /// Waits for a long operation; a failure carries IVirtualBoxErrorInfo's text.
    pub fn wait(&self, progress: Option<Com<crate::ffi::IProgressVtbl>>, what: &str) -> Result<()> {
        let Some(progress) = progress else { return Ok(()) };
        call!(progress.WaitForCompletion(-1))?;
        self.outcome(&progress, what)
    }

    /// Waits for a long operation on `domain`, publishing its percentage
    /// in the shared [`Percents`] while it runs.
    pub fn wait_for(&self, domain: &str, progress: Option<Com<crate::ffi::IProgressVtbl>>, what: &str) -> Result<()> {
        let Some(progress) = progress else { return Ok(()) };
        let publish = |percent: Option<u32>| {
            if let Ok(mut percents) = self.percents.lock() {
                match percent {
                    Some(p) => percents.insert(domain.to_string(), p),
                    None => percents.remove(domain),
                };
            }
        };
        let waited = loop {
            if let Err(f) = call!(progress.WaitForCompletion(100)) {
                break Err(Error::from(f));
            }
            let completed: i32 = match get!(progress.GetCompleted) {
                Ok(c) => c,
                Err(f) => break Err(Error::from(f)),
            };
            if completed != 0 {
                break Ok(());
            }
            match get!(progress.GetPercent) {
                Ok(percent) => publish(Some(percent)),
                Err(f) => break Err(Error::from(f)),
            }
        };
        publish(None);
        waited?;
        self.outcome(&progress, what)
    }

    /// A completed operation's outcome.
    pub fn outcome(&self, progress: &Com<crate::ffi::IProgressVtbl>, what: &str) -> Result<()> {
        let rc: i32 = get!(progress.GetResultCode)?;
        let code = rc as u32;
        if check(code, "IProgress", "GetResultCode").is_ok() {
            return Ok(());
        }
        let info = get_obj!(progress.GetErrorInfo())?;
        let text = match info {
            Some(info) => get_str!(self, info.GetText())?,
            None => String::new(),
        };
        let (name, meaning) = code_name(code);
        let text = if text.is_empty() { meaning.to_string() } else { text };
        Err(Error::new(kind_of(code), format!("{what}: {text} ({name}, 0x{code:08x})")))
    }
}

/// A job for the XPCOM thread.
type Job = Box<dyn FnOnce(&mut Ctx) + Send>;

/// The XPCOM thread and the way to it.
pub struct Xpcom {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    /// `pfnGetVersion`'s number (`4002006`).
    pub version: u32,
    /// The library that answered.
    pub library: PathBuf,
}

/// A library found: the table it serves and the version it reports.
struct Loaded {
    funcs: &'static FunctionTable,
    version: u32,
    path: PathBuf,
}

/// `4002006` as `4.2.6`.
pub fn version_text(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, v / 1000 % 1000, v % 1000)
}

/// Tries one place; `Err` says why it did not do.
fn try_library(path: &Path) -> std::result::Result<Loaded, String> {
    // SAFETY: loading runs the library's initialisers; a VBoxXPCOMC.so is
    // VirtualBox's C binding (or a stand-in serving the same ABI).
    let lib = unsafe { Library::new(path) }.map_err(|e| format!("cannot be loaded ({e})"))?;
    // The library stays loaded for the life of the process, as XPCOM
    // cannot be initialised twice in one process.
    let lib: &'static Library = Box::leak(Box::new(lib));
    // SAFETY: the symbol is VBoxGetXPCOMCFunctions, of this type in every 4.x binding.
    let entry = unsafe { lib.get::<GetFunctions>(b"VBoxGetXPCOMCFunctions\0") }
        .map_err(|_| "does not export VBoxGetXPCOMCFunctions".to_string())?;
    // SAFETY: called with the 2.0 version, it returns the table or NULL.
    let table = unsafe { entry(VBOX_XPCOMC_VERSION) };
    // SAFETY: a non-NULL table is a static of the loaded (never unloaded) library.
    let funcs = unsafe { table.as_ref() }.ok_or_else(|| "serves no 2.0 function table".to_string())?;
    if funcs.uVersion & 0xffff_0000 != VBOX_XPCOMC_VERSION || (funcs.cb as usize) < std::mem::size_of::<FunctionTable>()
    {
        return Err(format!("serves a function table of version 0x{:08x} ({} bytes)", funcs.uVersion, funcs.cb));
    }
    // SAFETY: pfnGetVersion takes no arguments and returns the version number.
    let version = unsafe { (funcs.pfnGetVersion)() };
    Ok(Loaded { funcs, version, path: path.to_path_buf() })
}

/// Finds VirtualBox 4.2: `$VBOX_APP_HOME`, the known install directories,
/// then the bare name through the dynamic linker. An error names every
/// place tried and why each did not do.
fn load() -> Result<Loaded> {
    let mut places: Vec<(String, PathBuf, bool)> = Vec::new();
    if let Some(home) = std::env::var_os("VBOX_APP_HOME") {
        places.push(("$VBOX_APP_HOME".into(), Path::new(&home).join(LIBRARY), false));
    }
    places.extend(KNOWN_DIRS.iter().map(|d| (String::new(), Path::new(d).join(LIBRARY), true)));
    places.push(("the dynamic linker's search path".into(), PathBuf::from(LIBRARY), false));
    let mut tried = Vec::new();
    let mut wrong_version = None;
    for (label, path, skip_missing) in places {
        let shown = if label.is_empty() { path.display().to_string() } else { format!("{} ({label})", path.display()) };
        if skip_missing && !path.exists() {
            tried.push(format!("{shown}: no such file"));
            continue;
        }
        match try_library(&path) {
            Ok(loaded) if loaded.version / 1000 == 4002 => return Ok(loaded),
            Ok(loaded) => {
                let found = version_text(loaded.version);
                tried.push(format!("{shown}: VirtualBox {found}, not 4.2"));
                wrong_version.get_or_insert((found, loaded.path));
            }
            Err(why) => tried.push(format!("{shown}: {why}")),
        }
    }
    let head = match wrong_version {
        Some((found, path)) => {
            format!("VirtualBox {found} found ({}), but this driver speaks the VirtualBox 4.2 API only", path.display())
        }
        None => format!("VirtualBox 4.2 is not installed: no usable {LIBRARY} found"),
    };
    Err(Error::new(ErrorKind::NoConnect, format!("{head}; places tried:\n  {}", tried.join("\n  "))))
}

/// Initialises XPCOM on this thread.
fn initialise(funcs: &'static FunctionTable, percents: Percents) -> Result<Ctx> {
    let (vbox_iid, session_iid) = (CString::new(IVIRTUALBOX_IID), CString::new(ISESSION_IID));
    let (Ok(vbox_iid), Ok(session_iid)) = (vbox_iid, session_iid) else {
        return Err(Error::internal("interface IDs hold a NUL character"));
    };
    let mut vbox: *mut IVirtualBox = std::ptr::null_mut();
    let mut session: *mut ISession = std::ptr::null_mut();
    // SAFETY: the IID strings are NUL-terminated; the two out pointers receive
    // AddRef'd objects or NULL (pfnComInitialize reports failure so).
    unsafe { (funcs.pfnComInitialize)(vbox_iid.as_ptr(), &mut vbox, session_iid.as_ptr(), &mut session) };
    // SAFETY: each is NULL or an AddRef'd object of that interface.
    let (vbox, session) = unsafe { (Com::from_raw(vbox), Com::from_raw(session)) };
    match (vbox, session) {
        (Some(vbox), Some(session)) => Ok(Ctx { funcs, vbox, session, jobs: HashMap::new(), percents }),
        _ => {
            // SAFETY: undoes the initialisation that gave no objects.
            unsafe { (funcs.pfnComUninitialize)() };
            Err(Error::new(
                ErrorKind::NoConnect,
                "pfnComInitialize gave no IVirtualBox or ISession: VirtualBox's service cannot be reached",
            ))
        }
    }
}

impl Xpcom {
    /// Loads the library and starts the XPCOM thread, which publishes
    /// snapshot operations' progress in `percents`.
    pub fn start(percents: Percents) -> Result<Xpcom> {
        let loaded = load()?;
        let (version, library) = (loaded.version, loaded.path.clone());
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let funcs = loaded.funcs;
        let thread = std::thread::Builder::new()
            .name("xpcom".into())
            .spawn(move || {
                let mut ctx = match initialise(funcs, percents) {
                    Ok(ctx) => ctx,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                while let Ok(job) = jobs_rx.recv() {
                    job(&mut ctx);
                }
                ctx.finish_jobs();
                drop(ctx);
                // SAFETY: every object of this thread was released just above.
                unsafe { (funcs.pfnComUninitialize)() };
            })
            .map_err(|e| Error::internal(format!("cannot start the XPCOM thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Xpcom { jobs: Some(jobs_tx), thread: Some(thread), version, library }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(Error::internal("the XPCOM thread ended while initialising"))
            }
        }
    }

    /// Runs `f` on the XPCOM thread.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce(&mut Ctx) -> Result<T> + Send + 'static) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |ctx| {
            let result = catch_unwind(AssertUnwindSafe(|| f(ctx)))
                .unwrap_or_else(|_| Err(Error::internal("a VirtualBox call panicked")));
            let _ = tx.send(result);
        });
        let sender = self.jobs.as_ref().ok_or_else(|| Error::internal("the XPCOM thread is gone"))?;
        sender.send(job).map_err(|_| Error::internal("the XPCOM thread is gone"))?;
        rx.await.map_err(|_| Error::internal("the XPCOM thread dropped a call"))?
    }
}

impl Drop for Xpcom {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
