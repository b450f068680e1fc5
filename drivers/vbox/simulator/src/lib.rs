//! A stand-in for VirtualBox 4.2's `VBoxXPCOMC.so`, for tests: it exports
//! `VBoxGetXPCOMCFunctions` with the XPCOM C binding's 2.0 function table
//! and serves `IVirtualBox`, `ISession`, `IMachine`, `IConsole`,
//! `ISnapshot`, `IMedium`, `IMediumAttachment`, `IStorageController`,
//! `IProgress` and `IVirtualBoxErrorInfo` through vtables laid out slot for
//! slot as 4.2's (`vtables.rs`; every slot it does not implement answers
//! `E_NOTIMPL`). Machines, media and snapshots live in a JSON file under
//! `$STRATA_VBOX_SIM_STATE`, so separate processes see one VirtualBox.
//!
//! `STRATA_VBOX_SIM_VERSION` (`4.3.12`) makes `pfnGetVersion` report
//! another version; `STRATA_VBOX_SIM_STEP_MS` sets how long each tenth of
//! a long operation takes (10 ms by default).
//!
//! Nothing panics across the C boundary: every export and vtable entry
//! runs its body under `catch_unwind`.

use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

mod objects;
mod state;
pub mod vtables;

pub use vtables::vtable_layouts;

/// An XPCOM result code.
pub type Nsresult = u32;

pub const NS_OK: Nsresult = 0;
pub const E_NOTIMPL: Nsresult = 0x8000_4001;
pub const E_NOINTERFACE: Nsresult = 0x8000_4002;
pub const E_POINTER: Nsresult = 0x8000_4003;
pub const E_UNEXPECTED: Nsresult = 0x8000_FFFF;
pub const E_INVALIDARG: Nsresult = 0x8007_0057;
pub const E_ACCESSDENIED: Nsresult = 0x8007_0005;
pub const VBOX_E_OBJECT_NOT_FOUND: Nsresult = 0x80BB_0001;
pub const VBOX_E_INVALID_VM_STATE: Nsresult = 0x80BB_0002;
pub const VBOX_E_FILE_ERROR: Nsresult = 0x80BB_0004;
pub const VBOX_E_INVALID_OBJECT_STATE: Nsresult = 0x80BB_0007;
pub const VBOX_E_OBJECT_IN_USE: Nsresult = 0x80BB_000C;

/// The 2.0 table's version (`VBOX_XPCOMC_VERSION`).
const XPCOMC_VERSION: u32 = 0x0002_0000;

/// Runs an entry point's body, answering `fallback` if it panics: a panic
/// must not unwind into the C caller.
pub(crate) fn guarded<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

/// `VBOXXPCOMC`, the function table (88 bytes on LP64).
#[repr(C)]
#[allow(non_snake_case)]
pub struct FunctionTable {
    pub cb: u32,
    pub uVersion: u32,
    pub pfnGetVersion: extern "C" fn() -> u32,
    pub pfnComInitialize: extern "C" fn(*const c_char, *mut *mut c_void, *const c_char, *mut *mut c_void),
    pub pfnComUninitialize: extern "C" fn(),
    pub pfnComUnallocMem: extern "C" fn(*mut c_void),
    pub pfnUtf16Free: extern "C" fn(*mut u16),
    pub pfnUtf8Free: extern "C" fn(*mut c_char),
    pub pfnUtf16ToUtf8: extern "C" fn(*const u16, *mut *mut c_char) -> i32,
    pub pfnUtf8ToUtf16: extern "C" fn(*const c_char, *mut *mut u16) -> i32,
    pub pfnGetEventQueue: extern "C" fn(*mut *mut c_void),
    pub uEndVersion: u32,
}

static TABLE: FunctionTable = FunctionTable {
    cb: std::mem::size_of::<FunctionTable>() as u32,
    uVersion: XPCOMC_VERSION,
    pfnGetVersion: get_version,
    pfnComInitialize: com_initialize,
    pfnComUninitialize: com_uninitialize,
    pfnComUnallocMem: free_memory,
    pfnUtf16Free: free_utf16,
    pfnUtf8Free: free_utf8,
    pfnUtf16ToUtf8: utf16_to_utf8,
    pfnUtf8ToUtf16: utf8_to_utf16,
    pfnGetEventQueue: get_event_queue,
    uEndVersion: XPCOMC_VERSION,
};

/// The function table's fields as (name, byte offset), and its size, for the ABI check.
pub fn function_table_layout() -> (Vec<(&'static str, usize)>, usize) {
    use std::mem::offset_of;
    let fields = vec![
        ("cb", offset_of!(FunctionTable, cb)),
        ("uVersion", offset_of!(FunctionTable, uVersion)),
        ("pfnGetVersion", offset_of!(FunctionTable, pfnGetVersion)),
        ("pfnComInitialize", offset_of!(FunctionTable, pfnComInitialize)),
        ("pfnComUninitialize", offset_of!(FunctionTable, pfnComUninitialize)),
        ("pfnComUnallocMem", offset_of!(FunctionTable, pfnComUnallocMem)),
        ("pfnUtf16Free", offset_of!(FunctionTable, pfnUtf16Free)),
        ("pfnUtf8Free", offset_of!(FunctionTable, pfnUtf8Free)),
        ("pfnUtf16ToUtf8", offset_of!(FunctionTable, pfnUtf16ToUtf8)),
        ("pfnUtf8ToUtf16", offset_of!(FunctionTable, pfnUtf8ToUtf16)),
        ("pfnGetEventQueue", offset_of!(FunctionTable, pfnGetEventQueue)),
        ("uEndVersion", offset_of!(FunctionTable, uEndVersion)),
    ];
    (fields, std::mem::size_of::<FunctionTable>())
}

/// The entry point: the 2.0 table for a 2.x request, else NULL (this
/// stand-in has no legacy 1.0 table).
#[no_mangle]
pub extern "C" fn VBoxGetXPCOMCFunctions(requested: u32) -> *const FunctionTable {
    guarded(std::ptr::null(), || if requested & 0xffff_0000 == XPCOMC_VERSION { &TABLE } else { std::ptr::null() })
}

/// The version reported, `major * 1_000_000 + minor * 1000 + build`.
fn reported_version() -> u32 {
    let text = std::env::var("STRATA_VBOX_SIM_VERSION").unwrap_or_else(|_| state::VERSION.to_string());
    let mut parts = text.split('.').map(|p| p.trim().parse::<u32>().unwrap_or(0));
    let (major, minor, build) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    major * 1_000_000 + minor * 1000 + build
}

extern "C" fn get_version() -> u32 {
    guarded(0, reported_version)
}

extern "C" fn com_initialize(
    vbox_iid: *const c_char,
    vbox: *mut *mut c_void,
    session_iid: *const c_char,
    session: *mut *mut c_void,
) {
    guarded((), || {
        if vbox.is_null() || session.is_null() {
            return;
        }
        // SAFETY: both out pointers were checked non-null; the caller owns them.
        unsafe {
            *vbox = std::ptr::null_mut();
            *session = std::ptr::null_mut();
        }
        // As 4.2.6: IID strings that are not the interfaces served leave
        // both outputs NULL, which is how callers see the failure.
        let matches = |iid: *const c_char, want: &str| {
            // SAFETY: the caller passes NUL-terminated IID strings (or NULL, checked).
            !iid.is_null() && unsafe { CStr::from_ptr(iid) }.to_str().is_ok_and(|s| s.eq_ignore_ascii_case(want))
        };
        if !matches(vbox_iid, vtables::IVIRTUALBOX_IID) || !matches(session_iid, vtables::ISESSION_IID) {
            return;
        }
        if state::open_store().is_err() {
            return;
        }
        // SAFETY: as above.
        unsafe {
            *vbox = objects::new_object(objects::Target::VirtualBox).cast();
            *session = objects::new_object(objects::Target::Session(Default::default())).cast();
        }
    })
}

extern "C" fn com_uninitialize() {
    guarded((), state::finish_operations)
}

extern "C" fn free_memory(pv: *mut c_void) {
    guarded((), || {
        // SAFETY: every block this library hands out comes from malloc.
        unsafe { libc::free(pv) }
    })
}

extern "C" fn free_utf16(s: *mut u16) {
    free_memory(s.cast())
}

extern "C" fn free_utf8(s: *mut c_char) {
    free_memory(s.cast())
}

extern "C" fn utf16_to_utf8(s: *const u16, out: *mut *mut c_char) -> i32 {
    guarded(-1, || {
        if out.is_null() {
            return -1;
        }
        // SAFETY: the caller passes a NUL-terminated UTF-16 string or NULL.
        let Some(text) = (unsafe { objects::read_utf16(s) }) else {
            return -1;
        };
        // SAFETY: out was checked non-null.
        unsafe { *out = objects::alloc_utf8(&text) };
        0
    })
}

extern "C" fn utf8_to_utf16(s: *const c_char, out: *mut *mut u16) -> i32 {
    guarded(-1, || {
        if s.is_null() || out.is_null() {
            return -1;
        }
        // SAFETY: the caller passes a NUL-terminated string, checked non-null.
        let Ok(text) = unsafe { CStr::from_ptr(s) }.to_str() else {
            return -1;
        };
        // SAFETY: out was checked non-null.
        unsafe { *out = objects::alloc_utf16(text) };
        0
    })
}

extern "C" fn get_event_queue(queue: *mut *mut c_void) {
    guarded((), || {
        if !queue.is_null() {
            // SAFETY: checked non-null; this stand-in has no event queue.
            unsafe { *queue = std::ptr::null_mut() }
        }
    })
}
