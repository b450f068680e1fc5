//! VirtualBox 4.2's XPCOM C binding as this driver calls it: the
//! `VBOXXPCOMC` function table and, per interface, a `#[repr(C)]` vtable
//! holding every slot up to the last one the driver calls (those it does
//! not call are runs of [`Slot`]). [`vtable_layouts`] reads each named
//! slot's index from its struct (`offset_of!`), so the ABI check against
//! `fixtures/vbox/vbox42-abi.json` tests the structs themselves.
#![allow(non_snake_case)]

use std::ffi::{c_char, c_void};
use std::mem::{offset_of, size_of};

/// An XPCOM result code; failure when the top bit is set.
pub type Nsresult = u32;

pub const VBOX_XPCOMC_VERSION: u32 = 0x0002_0000;
pub const IVIRTUALBOX_IID: &str = "3b2f08eb-b810-4715-bee0-bb06b9880ad2";
pub const ISESSION_IID: &str = "12F4DCDB-12B2-4EC1-B7CD-DDD9F6C5BF4D";

pub const MACHINE_POWERED_OFF: u32 = 1;
pub const MACHINE_SAVED: u32 = 2;
pub const MACHINE_TELEPORTED: u32 = 3;
pub const MACHINE_ABORTED: u32 = 4;
pub const MACHINE_RUNNING: u32 = 5;
pub const MACHINE_PAUSED: u32 = 6;
pub const MACHINE_STUCK: u32 = 7;
pub const DEVICE_HARD_DISK: u32 = 3;
pub const ACCESS_READ_WRITE: u32 = 2;
pub const LOCK_SHARED: u32 = 1;
pub const LOCK_WRITE: u32 = 2;
pub const BUS_IDE: u32 = 1;
pub const BUS_SATA: u32 = 2;
pub const BUS_SCSI: u32 = 3;
pub const CLEANUP_DETACH_ALL_RETURN_NONE: u32 = 2;
pub const MEDIUM_VARIANT_STANDARD: u32 = 0;

/// `VBOXXPCOMC`, version 2.0 (88 bytes on LP64).
#[repr(C)]
pub struct FunctionTable {
    pub cb: u32,
    pub uVersion: u32,
    pub pfnGetVersion: unsafe extern "C" fn() -> u32,
    pub pfnComInitialize: unsafe extern "C" fn(*const c_char, *mut *mut IVirtualBox, *const c_char, *mut *mut ISession),
    pub pfnComUninitialize: unsafe extern "C" fn(),
    pub pfnComUnallocMem: unsafe extern "C" fn(*mut c_void),
    pub pfnUtf16Free: unsafe extern "C" fn(*mut u16),
    pub pfnUtf8Free: unsafe extern "C" fn(*mut c_char),
    pub pfnUtf16ToUtf8: unsafe extern "C" fn(*const u16, *mut *mut c_char) -> i32,
    pub pfnUtf8ToUtf16: unsafe extern "C" fn(*const c_char, *mut *mut u16) -> i32,
    pub pfnGetEventQueue: unsafe extern "C" fn(*mut *mut c_void),
    pub uEndVersion: u32,
}

/// The function table's fields as (name, byte offset), and its size, for the ABI check.
pub fn function_table_layout() -> (Vec<(&'static str, usize)>, usize) {
    macro_rules! fields {
        ($($field:ident),+) => {
            vec![$((stringify!($field), offset_of!(FunctionTable, $field))),+]
        };
    }
    let fields = fields!(
        cb,
        uVersion,
        pfnGetVersion,
        pfnComInitialize,
        pfnComUninitialize,
        pfnComUnallocMem,
        pfnUtf16Free,
        pfnUtf8Free,
        pfnUtf16ToUtf8,
        pfnUtf8ToUtf16,
        pfnGetEventQueue,
        uEndVersion
    );
    (fields, size_of::<FunctionTable>())
}

/// `VBoxGetXPCOMCFunctions`.
pub type GetFunctions = unsafe extern "C" fn(u32) -> *const FunctionTable;

/// A slot this driver does not call.
pub type Slot = Option<unsafe extern "C" fn()>;

/// An interface object: a pointer to its vtable, first.
#[repr(C)]
pub struct Object<V> {
    pub vtbl: *const V,
}

/// A vtable whose first slots are nsISupports'.
///
/// # Safety
/// Implementors are `#[repr(C)]` with an [`NsISupportsVtbl`] at offset 0.
pub unsafe trait Vtable {
    /// The interface's name (`IMachine`).
    const NAME: &'static str;
}

pub type IVirtualBox = Object<IVirtualBoxVtbl>;
pub type ISession = Object<ISessionVtbl>;
pub type IMachine = Object<IMachineVtbl>;
pub type IConsole = Object<IConsoleVtbl>;
pub type ISnapshot = Object<ISnapshotVtbl>;
pub type IMedium = Object<IMediumVtbl>;
pub type IMediumAttachment = Object<IMediumAttachmentVtbl>;
pub type IStorageController = Object<IStorageControllerVtbl>;
pub type IProgress = Object<IProgressVtbl>;
pub type IVirtualBoxErrorInfo = Object<IVirtualBoxErrorInfoVtbl>;

type Str = *const u16;
type OutStr<T> = unsafe extern "C" fn(*mut T, *mut *mut u16) -> Nsresult;
type OutU32<T> = unsafe extern "C" fn(*mut T, *mut u32) -> Nsresult;
type OutI32<T> = unsafe extern "C" fn(*mut T, *mut i32) -> Nsresult;
type OutI64<T> = unsafe extern "C" fn(*mut T, *mut i64) -> Nsresult;
type InU32<T> = unsafe extern "C" fn(*mut T, u32) -> Nsresult;
type OutObj<T, U> = unsafe extern "C" fn(*mut T, *mut *mut U) -> Nsresult;
type OutArray<T, U> = unsafe extern "C" fn(*mut T, *mut u32, *mut *mut *mut U) -> Nsresult;
type Call0<T> = unsafe extern "C" fn(*mut T) -> Nsresult;

#[repr(C)]
pub struct NsISupportsVtbl {
    pub QueryInterface: unsafe extern "C" fn(*mut c_void, *const c_void, *mut *mut c_void) -> Nsresult,
    pub AddRef: unsafe extern "C" fn(*mut c_void) -> Nsresult,
    pub Release: unsafe extern "C" fn(*mut c_void) -> Nsresult,
}

#[repr(C)]
pub struct IVirtualBoxVtbl {
    pub base: NsISupportsVtbl,
    pub GetVersion: OutStr<IVirtualBox>,
    gap_4: [Slot; 8],
    pub GetMachines: OutArray<IVirtualBox, IMachine>,
    gap_13: [Slot; 14],
    pub CreateMachine:
        unsafe extern "C" fn(*mut IVirtualBox, Str, Str, u32, *const Str, Str, Str, *mut *mut IMachine) -> Nsresult,
    gap_28: [Slot; 1],
    pub RegisterMachine: unsafe extern "C" fn(*mut IVirtualBox, *mut IMachine) -> Nsresult,
    pub FindMachine: unsafe extern "C" fn(*mut IVirtualBox, Str, *mut *mut IMachine) -> Nsresult,
    gap_31: [Slot; 3],
    pub CreateHardDisk: unsafe extern "C" fn(*mut IVirtualBox, Str, Str, *mut *mut IMedium) -> Nsresult,
    pub OpenMedium: unsafe extern "C" fn(*mut IVirtualBox, Str, u32, u32, i32, *mut *mut IMedium) -> Nsresult,
}

#[repr(C)]
pub struct ISessionVtbl {
    pub base: NsISupportsVtbl,
    pub GetState: OutU32<ISession>,
    gap_4: [Slot; 1],
    pub GetMachine: OutObj<ISession, IMachine>,
    pub GetConsole: OutObj<ISession, IConsole>,
    pub UnlockMachine: Call0<ISession>,
}

#[repr(C)]
pub struct IMachineVtbl {
    pub base: NsISupportsVtbl,
    gap_3: [Slot; 3],
    pub GetName: OutStr<IMachine>,
    gap_7: [Slot; 3],
    pub GetId: OutStr<IMachine>,
    gap_11: [Slot; 8],
    pub GetCPUCount: OutU32<IMachine>,
    pub SetCPUCount: InU32<IMachine>,
    gap_21: [Slot; 4],
    pub GetMemorySize: OutU32<IMachine>,
    pub SetMemorySize: InU32<IMachine>,
    gap_27: [Slot; 38],
    pub GetMediumAttachments: OutArray<IMachine, IMediumAttachment>,
    gap_66: [Slot; 2],
    pub GetStorageControllers: OutArray<IMachine, IStorageController>,
    gap_69: [Slot; 5],
    pub GetState: OutU32<IMachine>,
    gap_75: [Slot; 3],
    pub GetCurrentSnapshot: OutObj<IMachine, ISnapshot>,
    gap_79: [Slot; 47],
    pub LockMachine: unsafe extern "C" fn(*mut IMachine, *mut ISession, u32) -> Nsresult,
    pub LaunchVMProcess: unsafe extern "C" fn(*mut IMachine, *mut ISession, Str, Str, *mut *mut IProgress) -> Nsresult,
    gap_128: [Slot; 2],
    pub AttachDevice: unsafe extern "C" fn(*mut IMachine, Str, i32, i32, u32, *mut IMedium) -> Nsresult,
    gap_131: [Slot; 1],
    pub DetachDevice: unsafe extern "C" fn(*mut IMachine, Str, i32, i32) -> Nsresult,
    gap_133: [Slot; 14],
    pub AddStorageController: unsafe extern "C" fn(*mut IMachine, Str, u32, *mut *mut IStorageController) -> Nsresult,
    gap_148: [Slot; 7],
    pub GetExtraData: unsafe extern "C" fn(*mut IMachine, Str, *mut *mut u16) -> Nsresult,
    pub SetExtraData: unsafe extern "C" fn(*mut IMachine, Str, Str) -> Nsresult,
    gap_157: [Slot; 8],
    pub SaveSettings: Call0<IMachine>,
    gap_166: [Slot; 1],
    pub Unregister: unsafe extern "C" fn(*mut IMachine, u32, *mut u32, *mut *mut *mut IMedium) -> Nsresult,
    pub Delete: unsafe extern "C" fn(*mut IMachine, u32, *const *mut IMedium, *mut *mut IProgress) -> Nsresult,
    gap_169: [Slot; 1],
    pub FindSnapshot: unsafe extern "C" fn(*mut IMachine, Str, *mut *mut ISnapshot) -> Nsresult,
}

#[repr(C)]
pub struct IConsoleVtbl {
    pub base: NsISupportsVtbl,
    gap_3: [Slot; 17],
    pub PowerDown: OutObj<IConsole, IProgress>,
    gap_21: [Slot; 3],
    pub PowerButton: Call0<IConsole>,
    gap_25: [Slot; 13],
    pub TakeSnapshot: unsafe extern "C" fn(*mut IConsole, Str, Str, *mut *mut IProgress) -> Nsresult,
    pub DeleteSnapshot: unsafe extern "C" fn(*mut IConsole, Str, *mut *mut IProgress) -> Nsresult,
    gap_40: [Slot; 2],
    pub RestoreSnapshot: unsafe extern "C" fn(*mut IConsole, *mut ISnapshot, *mut *mut IProgress) -> Nsresult,
}

#[repr(C)]
pub struct ISnapshotVtbl {
    pub base: NsISupportsVtbl,
    pub GetId: OutStr<ISnapshot>,
    pub GetName: OutStr<ISnapshot>,
    gap_5: [Slot; 1],
    pub GetDescription: OutStr<ISnapshot>,
    gap_7: [Slot; 1],
    pub GetTimeStamp: OutI64<ISnapshot>,
    pub GetOnline: OutI32<ISnapshot>,
    gap_10: [Slot; 1],
    pub GetParent: OutObj<ISnapshot, ISnapshot>,
    pub GetChildren: OutArray<ISnapshot, ISnapshot>,
}

#[repr(C)]
pub struct IMediumVtbl {
    pub base: NsISupportsVtbl,
    pub GetId: OutStr<IMedium>,
    gap_4: [Slot; 4],
    pub GetLocation: OutStr<IMedium>,
    gap_9: [Slot; 5],
    pub GetFormat: OutStr<IMedium>,
    gap_15: [Slot; 4],
    pub GetParent: OutObj<IMedium, IMedium>,
    gap_20: [Slot; 3],
    pub GetLogicalSize: OutI64<IMedium>,
    gap_24: [Slot; 11],
    pub Close: Call0<IMedium>,
    gap_36: [Slot; 7],
    pub MergeTo: unsafe extern "C" fn(*mut IMedium, *mut IMedium, *mut *mut IProgress) -> Nsresult,
    pub CloneTo: unsafe extern "C" fn(*mut IMedium, *mut IMedium, u32, *mut IMedium, *mut *mut IProgress) -> Nsresult,
}

#[repr(C)]
pub struct IMediumAttachmentVtbl {
    pub base: NsISupportsVtbl,
    pub GetMedium: OutObj<IMediumAttachment, IMedium>,
    pub GetController: OutStr<IMediumAttachment>,
    pub GetPort: OutI32<IMediumAttachment>,
    pub GetDevice: OutI32<IMediumAttachment>,
    pub GetType: OutU32<IMediumAttachment>,
}

#[repr(C)]
pub struct IStorageControllerVtbl {
    pub base: NsISupportsVtbl,
    pub GetName: OutStr<IStorageController>,
    gap_4: [Slot; 7],
    pub GetBus: OutU32<IStorageController>,
}

#[repr(C)]
pub struct IProgressVtbl {
    pub base: NsISupportsVtbl,
    gap_3: [Slot; 4],
    pub GetPercent: OutU32<IProgress>,
    gap_8: [Slot; 1],
    pub GetCompleted: OutI32<IProgress>,
    gap_10: [Slot; 1],
    pub GetResultCode: OutI32<IProgress>,
    pub GetErrorInfo: OutObj<IProgress, IVirtualBoxErrorInfo>,
    gap_13: [Slot; 9],
    pub WaitForCompletion: unsafe extern "C" fn(*mut IProgress, i32) -> Nsresult,
}

#[repr(C)]
pub struct IVirtualBoxErrorInfoVtbl {
    pub base: NsISupportsVtbl,
    gap_3: [Slot; 10],
    pub GetResultCode: OutI32<IVirtualBoxErrorInfo>,
    gap_14: [Slot; 2],
    pub GetText: OutStr<IVirtualBoxErrorInfo>,
}

macro_rules! vtables {
    ($($vtbl:ty = $name:literal),+ $(,)?) => {
        $(
            // SAFETY: each is #[repr(C)] with `base: NsISupportsVtbl` as its first field.
            unsafe impl Vtable for $vtbl {
                const NAME: &'static str = $name;
            }
        )+
    };
}

vtables!(
    IVirtualBoxVtbl = "IVirtualBox",
    ISessionVtbl = "ISession",
    IMachineVtbl = "IMachine",
    IConsoleVtbl = "IConsole",
    ISnapshotVtbl = "ISnapshot",
    IMediumVtbl = "IMedium",
    IMediumAttachmentVtbl = "IMediumAttachment",
    IStorageControllerVtbl = "IStorageController",
    IProgressVtbl = "IProgress",
    IVirtualBoxErrorInfoVtbl = "IVirtualBoxErrorInfo",
);

/// One vtable as this driver declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VtableLayout {
    pub interface: &'static str,
    /// The named slots: (index, C method name).
    pub slots: Vec<(usize, &'static str)>,
    /// How many slots the struct spans.
    pub slot_count: usize,
}

const SLOT: usize = size_of::<Slot>();

/// `base.AddRef` names `AddRef`.
fn method_name(path: &'static str) -> &'static str {
    path.rsplit('.').next().unwrap_or(path).trim()
}

/// The named slots of `$vtbl`, each index read from the struct.
macro_rules! layout {
    ($iface:literal, $vtbl:ty: $($($field:ident).+),+ $(,)?) => {
        VtableLayout {
            interface: $iface,
            slots: vec![$((offset_of!($vtbl, $($field).+) / SLOT, method_name(stringify!($($field).+)))),+],
            slot_count: size_of::<$vtbl>() / SLOT,
        }
    };
}

/// Every vtable this driver declares, for the ABI check.
pub fn vtable_layouts() -> Vec<VtableLayout> {
    vec![
        layout!("nsISupports", NsISupportsVtbl: QueryInterface, AddRef, Release),
        layout!("IVirtualBox", IVirtualBoxVtbl: base.QueryInterface, base.AddRef, base.Release, GetVersion, GetMachines,
            CreateMachine, RegisterMachine, FindMachine, CreateHardDisk, OpenMedium),
        layout!("ISession", ISessionVtbl: base.QueryInterface, base.AddRef, base.Release, GetState, GetMachine, GetConsole,
            UnlockMachine),
        layout!("IMachine", IMachineVtbl: base.QueryInterface, base.AddRef, base.Release, GetName, GetId, GetCPUCount,
            SetCPUCount, GetMemorySize, SetMemorySize, GetMediumAttachments, GetStorageControllers, GetState,
            GetCurrentSnapshot, LockMachine, LaunchVMProcess, AttachDevice, DetachDevice, AddStorageController,
            GetExtraData, SetExtraData, SaveSettings, Unregister, Delete, FindSnapshot),
        layout!("IConsole", IConsoleVtbl: base.QueryInterface, base.AddRef, base.Release, PowerDown, PowerButton,
            TakeSnapshot, DeleteSnapshot, RestoreSnapshot),
        layout!("ISnapshot", ISnapshotVtbl: base.QueryInterface, base.AddRef, base.Release, GetId, GetName, GetDescription,
            GetTimeStamp, GetOnline, GetParent, GetChildren),
        layout!("IMedium", IMediumVtbl: base.QueryInterface, base.AddRef, base.Release, GetId, GetLocation, GetFormat,
            GetParent, GetLogicalSize, Close, MergeTo, CloneTo),
        layout!("IMediumAttachment", IMediumAttachmentVtbl: base.QueryInterface, base.AddRef, base.Release, GetMedium,
            GetController, GetPort, GetDevice, GetType),
        layout!("IStorageController", IStorageControllerVtbl: base.QueryInterface, base.AddRef, base.Release, GetName,
            GetBus),
        layout!("IProgress", IProgressVtbl: base.QueryInterface, base.AddRef, base.Release, GetPercent, GetCompleted,
            GetResultCode, GetErrorInfo, WaitForCompletion),
        layout!("IVirtualBoxErrorInfo", IVirtualBoxErrorInfoVtbl: base.QueryInterface, base.AddRef, base.Release,
            GetResultCode, GetText),
    ]
}
