//! The vtables served, laid out slot for slot as VirtualBox 4.2's
//! (`vbox_CAPI_v4_2.h`): every interface's table has all of its slots,
//! those this stand-in implements named after the C method, the others
//! runs of [`Slot`] answering `E_NOTIMPL`. [`vtable_layouts`] reads each
//! named slot's index from the struct itself (`offset_of!`), for the ABI
//! check against `fixtures/vbox/vbox42-abi.json`.
#![allow(non_snake_case)]

use std::mem::{offset_of, size_of};

use crate::objects::{self as o, Obj};
use crate::Nsresult;

pub const IVIRTUALBOX_IID: &str = "3b2f08eb-b810-4715-bee0-bb06b9880ad2";
pub const ISESSION_IID: &str = "12F4DCDB-12B2-4EC1-B7CD-DDD9F6C5BF4D";

/// A slot this stand-in does not implement.
pub type Slot = extern "C" fn() -> Nsresult;
const NO: Slot = o::not_implemented;

type This = *mut Obj;
type GetStr = extern "C" fn(This, *mut *mut u16) -> Nsresult;
type GetU32 = extern "C" fn(This, *mut u32) -> Nsresult;
type GetI32 = extern "C" fn(This, *mut i32) -> Nsresult;
type GetI64 = extern "C" fn(This, *mut i64) -> Nsresult;
type SetU32 = extern "C" fn(This, u32) -> Nsresult;
type GetObj = extern "C" fn(This, *mut *mut Obj) -> Nsresult;
type GetArray = extern "C" fn(This, *mut u32, *mut *mut *mut Obj) -> Nsresult;
type Method0 = extern "C" fn(This) -> Nsresult;

#[repr(C)]
pub struct NsISupportsVtbl {
    pub QueryInterface: extern "C" fn(This, *const std::ffi::c_void, *mut *mut std::ffi::c_void) -> Nsresult,
    pub AddRef: Method0,
    pub Release: Method0,
}

const BASE: NsISupportsVtbl =
    NsISupportsVtbl { QueryInterface: o::query_interface, AddRef: o::add_ref, Release: o::release };

#[repr(C)]
pub struct IVirtualBoxVtbl {
    pub base: NsISupportsVtbl,
    pub GetVersion: GetStr,
    gap_4: [Slot; 8],
    pub GetMachines: GetArray,
    gap_13: [Slot; 14],
    pub CreateMachine: extern "C" fn(
        This,
        *const u16,
        *const u16,
        u32,
        *const *const u16,
        *const u16,
        *const u16,
        *mut *mut Obj,
    ) -> Nsresult,
    gap_28: [Slot; 1],
    pub RegisterMachine: extern "C" fn(This, *mut Obj) -> Nsresult,
    pub FindMachine: extern "C" fn(This, *const u16, *mut *mut Obj) -> Nsresult,
    gap_31: [Slot; 3],
    pub CreateHardDisk: extern "C" fn(This, *const u16, *const u16, *mut *mut Obj) -> Nsresult,
    pub OpenMedium: extern "C" fn(This, *const u16, u32, u32, i32, *mut *mut Obj) -> Nsresult,
    gap_36: [Slot; 11],
}

pub static VIRTUALBOX: IVirtualBoxVtbl = IVirtualBoxVtbl {
    base: BASE,
    GetVersion: o::vbox_get_version,
    gap_4: [NO; 8],
    GetMachines: o::vbox_get_machines,
    gap_13: [NO; 14],
    CreateMachine: o::vbox_create_machine,
    gap_28: [NO; 1],
    RegisterMachine: o::vbox_register_machine,
    FindMachine: o::vbox_find_machine,
    gap_31: [NO; 3],
    CreateHardDisk: o::vbox_create_hard_disk,
    OpenMedium: o::vbox_open_medium,
    gap_36: [NO; 11],
};

#[repr(C)]
pub struct ISessionVtbl {
    pub base: NsISupportsVtbl,
    pub GetState: GetU32,
    gap_4: [Slot; 1],
    pub GetMachine: GetObj,
    pub GetConsole: GetObj,
    pub UnlockMachine: Method0,
}

pub static SESSION: ISessionVtbl = ISessionVtbl {
    base: BASE,
    GetState: o::session_get_state,
    gap_4: [NO; 1],
    GetMachine: o::session_get_machine,
    GetConsole: o::session_get_console,
    UnlockMachine: o::session_unlock_machine,
};

#[repr(C)]
pub struct IMachineVtbl {
    pub base: NsISupportsVtbl,
    gap_3: [Slot; 3],
    pub GetName: GetStr,
    gap_7: [Slot; 3],
    pub GetId: GetStr,
    gap_11: [Slot; 8],
    pub GetCPUCount: GetU32,
    pub SetCPUCount: SetU32,
    gap_21: [Slot; 4],
    pub GetMemorySize: GetU32,
    pub SetMemorySize: SetU32,
    gap_27: [Slot; 38],
    pub GetMediumAttachments: GetArray,
    gap_66: [Slot; 2],
    pub GetStorageControllers: GetArray,
    gap_69: [Slot; 5],
    pub GetState: GetU32,
    gap_75: [Slot; 3],
    pub GetCurrentSnapshot: GetObj,
    gap_79: [Slot; 47],
    pub LockMachine: extern "C" fn(This, *mut Obj, u32) -> Nsresult,
    pub LaunchVMProcess: extern "C" fn(This, *mut Obj, *const u16, *const u16, *mut *mut Obj) -> Nsresult,
    gap_128: [Slot; 2],
    pub AttachDevice: extern "C" fn(This, *const u16, i32, i32, u32, *mut Obj) -> Nsresult,
    gap_131: [Slot; 1],
    pub DetachDevice: extern "C" fn(This, *const u16, i32, i32) -> Nsresult,
    gap_133: [Slot; 14],
    pub AddStorageController: extern "C" fn(This, *const u16, u32, *mut *mut Obj) -> Nsresult,
    gap_148: [Slot; 7],
    pub GetExtraData: extern "C" fn(This, *const u16, *mut *mut u16) -> Nsresult,
    pub SetExtraData: extern "C" fn(This, *const u16, *const u16) -> Nsresult,
    gap_157: [Slot; 8],
    pub SaveSettings: Method0,
    gap_166: [Slot; 1],
    pub Unregister: extern "C" fn(This, u32, *mut u32, *mut *mut *mut Obj) -> Nsresult,
    pub Delete: extern "C" fn(This, u32, *const *mut Obj, *mut *mut Obj) -> Nsresult,
    gap_169: [Slot; 1],
    pub FindSnapshot: extern "C" fn(This, *const u16, *mut *mut Obj) -> Nsresult,
    gap_171: [Slot; 23],
}

pub static MACHINE: IMachineVtbl = IMachineVtbl {
    base: BASE,
    gap_3: [NO; 3],
    GetName: o::machine_get_name,
    gap_7: [NO; 3],
    GetId: o::machine_get_id,
    gap_11: [NO; 8],
    GetCPUCount: o::machine_get_cpu_count,
    SetCPUCount: o::machine_set_cpu_count,
    gap_21: [NO; 4],
    GetMemorySize: o::machine_get_memory_size,
    SetMemorySize: o::machine_set_memory_size,
    gap_27: [NO; 38],
    GetMediumAttachments: o::machine_get_medium_attachments,
    gap_66: [NO; 2],
    GetStorageControllers: o::machine_get_storage_controllers,
    gap_69: [NO; 5],
    GetState: o::machine_get_state,
    gap_75: [NO; 3],
    GetCurrentSnapshot: o::machine_get_current_snapshot,
    gap_79: [NO; 47],
    LockMachine: o::machine_lock_machine,
    LaunchVMProcess: o::machine_launch_vm_process,
    gap_128: [NO; 2],
    AttachDevice: o::machine_attach_device,
    gap_131: [NO; 1],
    DetachDevice: o::machine_detach_device,
    gap_133: [NO; 14],
    AddStorageController: o::machine_add_storage_controller,
    gap_148: [NO; 7],
    GetExtraData: o::machine_get_extra_data,
    SetExtraData: o::machine_set_extra_data,
    gap_157: [NO; 8],
    SaveSettings: o::machine_save_settings,
    gap_166: [NO; 1],
    Unregister: o::machine_unregister,
    Delete: o::machine_delete,
    gap_169: [NO; 1],
    FindSnapshot: o::machine_find_snapshot,
    gap_171: [NO; 23],
};

#[repr(C)]
pub struct IConsoleVtbl {
    pub base: NsISupportsVtbl,
    gap_3: [Slot; 17],
    pub PowerDown: GetObj,
    gap_21: [Slot; 3],
    pub PowerButton: Method0,
    gap_25: [Slot; 13],
    pub TakeSnapshot: extern "C" fn(This, *const u16, *const u16, *mut *mut Obj) -> Nsresult,
    pub DeleteSnapshot: extern "C" fn(This, *const u16, *mut *mut Obj) -> Nsresult,
    gap_40: [Slot; 2],
    pub RestoreSnapshot: extern "C" fn(This, *mut Obj, *mut *mut Obj) -> Nsresult,
    gap_43: [Slot; 1],
}

pub static CONSOLE: IConsoleVtbl = IConsoleVtbl {
    base: BASE,
    gap_3: [NO; 17],
    PowerDown: o::console_power_down,
    gap_21: [NO; 3],
    PowerButton: o::console_power_button,
    gap_25: [NO; 13],
    TakeSnapshot: o::console_take_snapshot,
    DeleteSnapshot: o::console_delete_snapshot,
    gap_40: [NO; 2],
    RestoreSnapshot: o::console_restore_snapshot,
    gap_43: [NO; 1],
};

#[repr(C)]
pub struct ISnapshotVtbl {
    pub base: NsISupportsVtbl,
    pub GetId: GetStr,
    pub GetName: GetStr,
    gap_5: [Slot; 1],
    pub GetDescription: GetStr,
    gap_7: [Slot; 1],
    pub GetTimeStamp: GetI64,
    pub GetOnline: GetI32,
    gap_10: [Slot; 1],
    pub GetParent: GetObj,
    pub GetChildren: GetArray,
    gap_13: [Slot; 1],
}

pub static SNAPSHOT: ISnapshotVtbl = ISnapshotVtbl {
    base: BASE,
    GetId: o::snapshot_get_id,
    GetName: o::snapshot_get_name,
    gap_5: [NO; 1],
    GetDescription: o::snapshot_get_description,
    gap_7: [NO; 1],
    GetTimeStamp: o::snapshot_get_time_stamp,
    GetOnline: o::snapshot_get_online,
    gap_10: [NO; 1],
    GetParent: o::snapshot_get_parent,
    GetChildren: o::snapshot_get_children,
    gap_13: [NO; 1],
};

#[repr(C)]
pub struct IMediumVtbl {
    pub base: NsISupportsVtbl,
    pub GetId: GetStr,
    gap_4: [Slot; 4],
    pub GetLocation: GetStr,
    gap_9: [Slot; 5],
    pub GetFormat: GetStr,
    gap_15: [Slot; 4],
    pub GetParent: GetObj,
    gap_20: [Slot; 3],
    pub GetLogicalSize: GetI64,
    gap_24: [Slot; 11],
    pub Close: Method0,
    gap_36: [Slot; 7],
    pub MergeTo: extern "C" fn(This, *mut Obj, *mut *mut Obj) -> Nsresult,
    pub CloneTo: extern "C" fn(This, *mut Obj, u32, *mut Obj, *mut *mut Obj) -> Nsresult,
    gap_45: [Slot; 4],
}

pub static MEDIUM: IMediumVtbl = IMediumVtbl {
    base: BASE,
    GetId: o::medium_get_id,
    gap_4: [NO; 4],
    GetLocation: o::medium_get_location,
    gap_9: [NO; 5],
    GetFormat: o::medium_get_format,
    gap_15: [NO; 4],
    GetParent: o::medium_get_parent,
    gap_20: [NO; 3],
    GetLogicalSize: o::medium_get_logical_size,
    gap_24: [NO; 11],
    Close: o::medium_close,
    gap_36: [NO; 7],
    MergeTo: o::medium_merge_to,
    CloneTo: o::medium_clone_to,
    gap_45: [NO; 4],
};

#[repr(C)]
pub struct IMediumAttachmentVtbl {
    pub base: NsISupportsVtbl,
    pub GetMedium: GetObj,
    pub GetController: GetStr,
    pub GetPort: GetI32,
    pub GetDevice: GetI32,
    pub GetType: GetU32,
    gap_8: [Slot; 6],
}

pub static ATTACHMENT: IMediumAttachmentVtbl = IMediumAttachmentVtbl {
    base: BASE,
    GetMedium: o::attachment_get_medium,
    GetController: o::attachment_get_controller,
    GetPort: o::attachment_get_port,
    GetDevice: o::attachment_get_device,
    GetType: o::attachment_get_type,
    gap_8: [NO; 6],
};

#[repr(C)]
pub struct IStorageControllerVtbl {
    pub base: NsISupportsVtbl,
    pub GetName: GetStr,
    gap_4: [Slot; 7],
    pub GetBus: GetU32,
    gap_12: [Slot; 5],
}

pub static CONTROLLER: IStorageControllerVtbl = IStorageControllerVtbl {
    base: BASE,
    GetName: o::controller_get_name,
    gap_4: [NO; 7],
    GetBus: o::controller_get_bus,
    gap_12: [NO; 5],
};

#[repr(C)]
pub struct IProgressVtbl {
    pub base: NsISupportsVtbl,
    gap_3: [Slot; 4],
    pub GetPercent: GetU32,
    gap_8: [Slot; 1],
    pub GetCompleted: GetI32,
    gap_10: [Slot; 1],
    pub GetResultCode: GetI32,
    pub GetErrorInfo: GetObj,
    gap_13: [Slot; 9],
    pub WaitForCompletion: extern "C" fn(This, i32) -> Nsresult,
    gap_23: [Slot; 3],
}

pub static PROGRESS: IProgressVtbl = IProgressVtbl {
    base: BASE,
    gap_3: [NO; 4],
    GetPercent: o::progress_get_percent,
    gap_8: [NO; 1],
    GetCompleted: o::progress_get_completed,
    gap_10: [NO; 1],
    GetResultCode: o::progress_get_result_code,
    GetErrorInfo: o::progress_get_error_info,
    gap_13: [NO; 9],
    WaitForCompletion: o::progress_wait_for_completion,
    gap_23: [NO; 3],
};

#[repr(C)]
pub struct IVirtualBoxErrorInfoVtbl {
    pub base: NsISupportsVtbl,
    gap_3: [Slot; 10],
    pub GetResultCode: GetI32,
    gap_14: [Slot; 2],
    pub GetText: GetStr,
    gap_17: [Slot; 1],
}

pub static ERROR_INFO: IVirtualBoxErrorInfoVtbl = IVirtualBoxErrorInfoVtbl {
    base: BASE,
    gap_3: [NO; 10],
    GetResultCode: o::error_info_get_result_code,
    gap_14: [NO; 2],
    GetText: o::error_info_get_text,
    gap_17: [NO; 1],
};

/// One interface's table as declared here: (interface, its named slots
/// as (index, method), how many slots the struct has).
pub type Layout = (&'static str, Vec<(usize, &'static str)>, usize);

const SLOT: usize = size_of::<Slot>();

/// The named slots of `$vtbl`, each index read from the struct.
macro_rules! layout {
    ($iface:literal, $vtbl:ty: $($($field:ident).+),+ $(,)?) => {
        (
            $iface,
            vec![$((offset_of!($vtbl, $($field).+) / SLOT, method_name(stringify!($($field).+)))),+],
            size_of::<$vtbl>() / SLOT,
        )
    };
}

/// `base.AddRef` names `AddRef`.
fn method_name(path: &'static str) -> &'static str {
    path.rsplit('.').next().unwrap_or(path).trim()
}

/// Every vtable this stand-in serves, for the ABI check.
pub fn vtable_layouts() -> Vec<Layout> {
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
