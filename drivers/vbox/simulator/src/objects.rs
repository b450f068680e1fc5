//! The COM objects handed out and the methods behind their vtable slots.
//! An object is a vtable pointer (first, as XPCOM lays it out), a
//! reference count and what it stands for; machines, media and snapshots
//! are named by id and looked up in the world at each call.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::state::{self, fault, with_world, Attachment, Controller, Fault, Outcome, Progress};
use crate::vtables;
use crate::{
    guarded, Nsresult, E_INVALIDARG, E_NOINTERFACE, E_POINTER, E_UNEXPECTED, NS_OK, VBOX_E_INVALID_OBJECT_STATE,
    VBOX_E_INVALID_VM_STATE,
};

/// What a session holds: the machine it locked and whether that machine
/// ran (a shared lock on its VM process) when it did.
#[derive(Debug, Default)]
pub struct SessionLock {
    pub machine: Option<(String, bool)>,
}

pub enum Target {
    VirtualBox,
    Session(Mutex<SessionLock>),
    Machine { id: String, mutable: bool },
    Console { machine: String },
    Snapshot { machine: String, id: String },
    Medium(String),
    Attachment(Attachment),
    Controller(Controller),
    Progress(Arc<Progress>),
    ErrorInfo(Fault),
}

#[repr(C)]
pub struct Obj {
    vtbl: *const c_void,
    refs: AtomicU32,
    pub target: Target,
}

/// A new object with one reference, for the caller.
pub fn new_object(target: Target) -> *mut Obj {
    let vtbl: *const c_void = match &target {
        Target::VirtualBox => (&vtables::VIRTUALBOX as *const vtables::IVirtualBoxVtbl).cast(),
        Target::Session(_) => (&vtables::SESSION as *const vtables::ISessionVtbl).cast(),
        Target::Machine { .. } => (&vtables::MACHINE as *const vtables::IMachineVtbl).cast(),
        Target::Console { .. } => (&vtables::CONSOLE as *const vtables::IConsoleVtbl).cast(),
        Target::Snapshot { .. } => (&vtables::SNAPSHOT as *const vtables::ISnapshotVtbl).cast(),
        Target::Medium(_) => (&vtables::MEDIUM as *const vtables::IMediumVtbl).cast(),
        Target::Attachment(_) => (&vtables::ATTACHMENT as *const vtables::IMediumAttachmentVtbl).cast(),
        Target::Controller(_) => (&vtables::CONTROLLER as *const vtables::IStorageControllerVtbl).cast(),
        Target::Progress(_) => (&vtables::PROGRESS as *const vtables::IProgressVtbl).cast(),
        Target::ErrorInfo(_) => (&vtables::ERROR_INFO as *const vtables::IVirtualBoxErrorInfoVtbl).cast(),
    };
    Box::into_raw(Box::new(Obj { vtbl, refs: AtomicU32::new(1), target }))
}

/// The object behind `this`.
///
/// # Safety
/// `this` is NULL or an object from [`new_object`] the caller holds a reference to.
unsafe fn target<'a>(this: *mut Obj) -> Outcome<&'a Target> {
    // SAFETY: per this function's contract the pointer is NULL or a live object.
    unsafe { this.as_ref() }.map(|o| &o.target).ok_or_else(|| fault(E_POINTER, "NULL object"))
}

/// Runs a method body: the result code of its outcome; no panic escapes.
fn method(body: impl FnOnce() -> Outcome<()>) -> Nsresult {
    guarded(E_UNEXPECTED, || match body() {
        Ok(()) => NS_OK,
        Err(f) => f.code,
    })
}

/// Stores `value` through an out pointer.
fn put<T>(out: *mut T, value: T) -> Outcome<()> {
    if out.is_null() {
        return Err(fault(E_POINTER, "NULL out pointer"));
    }
    // SAFETY: checked non-null; the caller passes a writable out parameter.
    unsafe { out.write(value) };
    Ok(())
}

/// Reads a caller's NUL-terminated UTF-16 string (None for NULL or bad UTF-16).
///
/// # Safety
/// `s` is NULL or points to a NUL-terminated UTF-16 string.
pub unsafe fn read_utf16(s: *const u16) -> Option<String> {
    if s.is_null() {
        return None;
    }
    let mut len = 0;
    // SAFETY: the string is NUL-terminated, so every unit up to the NUL is readable.
    while unsafe { *s.add(len) } != 0 {
        len += 1;
    }
    // SAFETY: the `len` units before the NUL were just read.
    String::from_utf16(unsafe { std::slice::from_raw_parts(s, len) }).ok()
}

/// An in-string argument; NULL reads as empty, as XPCOM's wrappers do.
fn arg(s: *const u16) -> Outcome<String> {
    if s.is_null() {
        return Ok(String::new());
    }
    // SAFETY: a non-NULL in-string is NUL-terminated UTF-16, per the binding's conventions.
    unsafe { read_utf16(s) }.ok_or_else(|| fault(E_INVALIDARG, "string argument is not valid UTF-16"))
}

/// Copies `units` into malloc'd memory, which either free function of the table releases.
fn alloc_units<T: Copy>(units: &[T]) -> *mut T {
    let bytes = std::mem::size_of_val(units).max(1);
    // SAFETY: malloc of a non-zero size; NULL is checked before writing.
    let p = unsafe { libc::malloc(bytes) }.cast::<T>();
    if !p.is_null() {
        // SAFETY: p has room for units.len() elements and does not overlap units.
        unsafe { std::ptr::copy_nonoverlapping(units.as_ptr(), p, units.len()) };
    }
    p
}

pub fn alloc_utf16(s: &str) -> *mut u16 {
    let units: Vec<u16> = s.encode_utf16().chain(std::iter::once(0)).collect();
    alloc_units(&units)
}

pub fn alloc_utf8(s: &str) -> *mut std::ffi::c_char {
    let bytes: Vec<std::ffi::c_char> = s.bytes().chain(std::iter::once(0)).map(|b| b as std::ffi::c_char).collect();
    alloc_units(&bytes)
}

fn put_str(out: *mut *mut u16, s: &str) -> Outcome<()> {
    put(out, alloc_utf16(s))
}

fn put_obj(out: *mut *mut Obj, target: Option<Target>) -> Outcome<()> {
    put(out, target.map_or(std::ptr::null_mut(), new_object))
}

fn put_array(size: *mut u32, out: *mut *mut *mut Obj, targets: Vec<Target>) -> Outcome<()> {
    let objects: Vec<*mut Obj> = targets.into_iter().map(new_object).collect();
    put(size, objects.len() as u32)?;
    put(out, alloc_units(&objects))
}

fn put_progress(out: *mut *mut Obj, progress: Arc<Progress>) -> Outcome<()> {
    put_obj(out, Some(Target::Progress(progress)))
}

/// The id of a medium object passed in (NULL gives None).
fn medium_arg(medium: *mut Obj) -> Outcome<Option<String>> {
    if medium.is_null() {
        return Ok(None);
    }
    // SAFETY: a non-NULL interface argument is an object of this library the caller holds.
    match unsafe { target(medium) }? {
        Target::Medium(id) => Ok(Some(id.clone())),
        _ => Err(fault(E_INVALIDARG, "argument is not an IMedium")),
    }
}

macro_rules! this {
    ($this:expr, $pattern:pat => $value:expr) => {{
        // SAFETY: `this` is the object whose vtable the caller went through.
        match unsafe { target($this) }? {
            $pattern => $value,
            _ => return Err(fault(E_UNEXPECTED, "method called on an object of another interface")),
        }
    }};
}

// nsISupports

pub extern "C" fn query_interface(_this: *mut Obj, _iid: *const c_void, out: *mut *mut c_void) -> Nsresult {
    // Callers hold the interface they need already; no other is served.
    method(|| {
        put(out, std::ptr::null_mut())?;
        Err(fault(E_NOINTERFACE, "no other interface is served"))
    })
}

pub extern "C" fn add_ref(this: *mut Obj) -> Nsresult {
    guarded(0, || {
        // SAFETY: the caller holds a reference to `this`.
        match unsafe { this.as_ref() } {
            Some(o) => o.refs.fetch_add(1, Ordering::AcqRel) + 1,
            None => 0,
        }
    })
}

pub extern "C" fn release(this: *mut Obj) -> Nsresult {
    guarded(0, || {
        // SAFETY: the caller holds a reference to `this`.
        let Some(o) = (unsafe { this.as_ref() }) else { return 0 };
        let left = o.refs.fetch_sub(1, Ordering::AcqRel) - 1;
        if left == 0 {
            // SAFETY: the last reference went: nobody else can reach the object.
            drop(unsafe { Box::from_raw(this) });
        }
        left
    })
}

/// The slot every method this stand-in does not implement points at.
pub extern "C" fn not_implemented() -> Nsresult {
    crate::E_NOTIMPL
}

// IVirtualBox

pub extern "C" fn vbox_get_version(this: *mut Obj, out: *mut *mut u16) -> Nsresult {
    method(|| {
        this!(this, Target::VirtualBox => ());
        put_str(out, state::VERSION)
    })
}

pub extern "C" fn vbox_get_machines(this: *mut Obj, size: *mut u32, out: *mut *mut *mut Obj) -> Nsresult {
    method(|| {
        this!(this, Target::VirtualBox => ());
        let ids =
            with_world(|w| Ok(w.machines.iter().filter(|m| m.registered).map(|m| m.id.clone()).collect::<Vec<_>>()))?;
        put_array(size, out, ids.into_iter().map(|id| Target::Machine { id, mutable: false }).collect())
    })
}

pub extern "C" fn vbox_create_machine(
    this: *mut Obj,
    settings_file: *const u16,
    name: *const u16,
    _groups_size: u32,
    _groups: *const *const u16,
    os_type: *const u16,
    flags: *const u16,
    out: *mut *mut Obj,
) -> Nsresult {
    method(|| {
        this!(this, Target::VirtualBox => ());
        let (settings_file, name, os_type, flags) = (arg(settings_file)?, arg(name)?, arg(os_type)?, arg(flags)?);
        let id = with_world(|w| w.create_machine(&settings_file, &name, &os_type, &flags))?;
        // A new machine is mutable until it is registered, as in VirtualBox.
        put_obj(out, Some(Target::Machine { id, mutable: true }))
    })
}

pub extern "C" fn vbox_register_machine(this: *mut Obj, machine: *mut Obj) -> Nsresult {
    method(|| {
        this!(this, Target::VirtualBox => ());
        if machine.is_null() {
            return Err(fault(E_INVALIDARG, "machine is NULL"));
        }
        let id = this!(machine, Target::Machine { id, .. } => id.clone());
        with_world(|w| w.register_machine(&id))
    })
}

pub extern "C" fn vbox_find_machine(this: *mut Obj, name_or_id: *const u16, out: *mut *mut Obj) -> Nsresult {
    method(|| {
        this!(this, Target::VirtualBox => ());
        let wanted = arg(name_or_id)?;
        let id = with_world(|w| w.find_machine(&wanted))?;
        put_obj(out, Some(Target::Machine { id, mutable: false }))
    })
}

pub extern "C" fn vbox_create_hard_disk(
    this: *mut Obj,
    format: *const u16,
    location: *const u16,
    out: *mut *mut Obj,
) -> Nsresult {
    method(|| {
        this!(this, Target::VirtualBox => ());
        let (format, location) = (arg(format)?, arg(location)?);
        let id = with_world(|w| w.create_hard_disk(&format, &location))?;
        put_obj(out, Some(Target::Medium(id)))
    })
}

pub extern "C" fn vbox_open_medium(
    this: *mut Obj,
    location: *const u16,
    device_type: u32,
    _access_mode: u32,
    _force_new_uuid: i32,
    out: *mut *mut Obj,
) -> Nsresult {
    method(|| {
        this!(this, Target::VirtualBox => ());
        let location = arg(location)?;
        let id = with_world(|w| w.open_medium(&location, device_type))?;
        put_obj(out, Some(Target::Medium(id)))
    })
}

// ISession

fn session_lock<'a>(this: *mut Obj) -> Outcome<&'a Mutex<SessionLock>> {
    Ok(this!(this, Target::Session(lock) => lock))
}

fn locked_machine(this: *mut Obj) -> Outcome<Option<(String, bool)>> {
    let lock = session_lock(this)?.lock().map_err(|_| fault(E_UNEXPECTED, "session poisoned"))?;
    Ok(lock.machine.clone())
}

pub extern "C" fn session_get_state(this: *mut Obj, out: *mut u32) -> Nsresult {
    method(|| put(out, if locked_machine(this)?.is_some() { 2 } else { 1 }))
}

pub extern "C" fn session_get_machine(this: *mut Obj, out: *mut *mut Obj) -> Nsresult {
    method(|| {
        let (id, running) = locked_machine(this)?
            .ok_or_else(|| fault(VBOX_E_INVALID_OBJECT_STATE, "The session is not locked (session state: Unlocked)"))?;
        put_obj(out, Some(Target::Machine { id, mutable: !running }))
    })
}

pub extern "C" fn session_get_console(this: *mut Obj, out: *mut *mut Obj) -> Nsresult {
    method(|| {
        let (machine, _) = locked_machine(this)?
            .ok_or_else(|| fault(VBOX_E_INVALID_OBJECT_STATE, "The session is not locked (session state: Unlocked)"))?;
        put_obj(out, Some(Target::Console { machine }))
    })
}

pub extern "C" fn session_unlock_machine(this: *mut Obj) -> Nsresult {
    method(|| {
        let mut lock = session_lock(this)?.lock().map_err(|_| fault(E_UNEXPECTED, "session poisoned"))?;
        let (id, _) = lock
            .machine
            .take()
            .ok_or_else(|| fault(VBOX_E_INVALID_OBJECT_STATE, "The session is not locked (session state: Unlocked)"))?;
        with_world(|w| w.unlock_machine(&id))
    })
}

// IMachine

fn machine_id(this: *mut Obj) -> Outcome<(String, bool)> {
    Ok(this!(this, Target::Machine { id, mutable } => (id.clone(), *mutable)))
}

fn read_machine<T>(this: *mut Obj, f: impl FnOnce(&state::Machine) -> T) -> Outcome<T> {
    let (id, _) = machine_id(this)?;
    with_world(|w| w.machine(&id).map(f))
}

fn edit_machine(this: *mut Obj, f: impl FnOnce(&mut state::Machine)) -> Outcome<()> {
    let (id, mutable) = machine_id(this)?;
    state::require_mutable(mutable)?;
    with_world(|w| w.machine_mut(&id).map(f))
}

pub extern "C" fn machine_get_name(this: *mut Obj, out: *mut *mut u16) -> Nsresult {
    method(|| put_str(out, &read_machine(this, |m| m.name.clone())?))
}

pub extern "C" fn machine_get_id(this: *mut Obj, out: *mut *mut u16) -> Nsresult {
    method(|| put_str(out, &read_machine(this, |m| m.id.clone())?))
}

pub extern "C" fn machine_get_cpu_count(this: *mut Obj, out: *mut u32) -> Nsresult {
    method(|| put(out, read_machine(this, |m| m.cpus)?))
}

pub extern "C" fn machine_set_cpu_count(this: *mut Obj, count: u32) -> Nsresult {
    method(|| {
        if !(1..=32).contains(&count) {
            return Err(fault(E_INVALIDARG, format!("Invalid virtual CPU count: {count} (must be in range [1, 32])")));
        }
        edit_machine(this, |m| m.cpus = count)
    })
}

pub extern "C" fn machine_get_memory_size(this: *mut Obj, out: *mut u32) -> Nsresult {
    method(|| put(out, read_machine(this, |m| m.memory_mb)?))
}

pub extern "C" fn machine_set_memory_size(this: *mut Obj, size: u32) -> Nsresult {
    method(|| {
        if !(4..=1_048_576).contains(&size) {
            return Err(fault(E_INVALIDARG, format!("Invalid RAM size: {size} MB (must be in range [4, 1048576] MB)")));
        }
        edit_machine(this, |m| m.memory_mb = size)
    })
}

pub extern "C" fn machine_get_medium_attachments(this: *mut Obj, size: *mut u32, out: *mut *mut *mut Obj) -> Nsresult {
    method(|| {
        let attachments = read_machine(this, |m| m.attachments.clone())?;
        put_array(size, out, attachments.into_iter().map(Target::Attachment).collect())
    })
}

pub extern "C" fn machine_get_storage_controllers(this: *mut Obj, size: *mut u32, out: *mut *mut *mut Obj) -> Nsresult {
    method(|| {
        let controllers = read_machine(this, |m| m.controllers.clone())?;
        put_array(size, out, controllers.into_iter().map(Target::Controller).collect())
    })
}

pub extern "C" fn machine_get_state(this: *mut Obj, out: *mut u32) -> Nsresult {
    method(|| put(out, read_machine(this, |m| m.state)?))
}

pub extern "C" fn machine_get_current_snapshot(this: *mut Obj, out: *mut *mut Obj) -> Nsresult {
    method(|| {
        let (machine, current) = read_machine(this, |m| (m.id.clone(), m.current_snapshot.clone()))?;
        put_obj(out, current.map(|id| Target::Snapshot { machine, id }))
    })
}

pub extern "C" fn machine_lock_machine(this: *mut Obj, session: *mut Obj, lock_type: u32) -> Nsresult {
    method(|| {
        let (id, _) = machine_id(this)?;
        let mut lock = session_lock(session)?.lock().map_err(|_| fault(E_UNEXPECTED, "session poisoned"))?;
        if lock.machine.is_some() {
            return Err(fault(VBOX_E_INVALID_OBJECT_STATE, "The session is already locked (session state: Locked)"));
        }
        let running = with_world(|w| w.lock_machine(&id, lock_type))?;
        lock.machine = Some((id, running));
        Ok(())
    })
}

pub extern "C" fn machine_launch_vm_process(
    this: *mut Obj,
    session: *mut Obj,
    kind: *const u16,
    _environment: *const u16,
    out: *mut *mut Obj,
) -> Nsresult {
    method(|| {
        let (id, _) = machine_id(this)?;
        let kind = arg(kind)?;
        if !matches!(kind.as_str(), "headless" | "gui" | "sdl" | "") {
            return Err(fault(E_INVALIDARG, format!("Invalid session type: '{kind}'")));
        }
        let mut lock = session_lock(session)?.lock().map_err(|_| fault(E_UNEXPECTED, "session poisoned"))?;
        if lock.machine.is_some() {
            return Err(fault(VBOX_E_INVALID_OBJECT_STATE, "The given session is busy"));
        }
        with_world(|w| {
            let elsewhere = w.locked_elsewhere(&id)?;
            let m = w.machine(&id)?;
            if elsewhere || state::is_online(m.state) {
                return Err(fault(
                    VBOX_E_INVALID_OBJECT_STATE,
                    format!("The machine '{}' is already locked by a session (or being locked or unlocked)", m.name),
                ));
            }
            Ok(())
        })?;
        lock.machine = Some((id.clone(), true));
        put_progress(
            out,
            state::start_operation(move |w| {
                w.machine_mut(&id)?.state = state::STATE_RUNNING;
                Ok(())
            }),
        )
    })
}

pub extern "C" fn machine_attach_device(
    this: *mut Obj,
    name: *const u16,
    port: i32,
    device: i32,
    device_type: u32,
    medium: *mut Obj,
) -> Nsresult {
    method(|| {
        let (id, mutable) = machine_id(this)?;
        state::require_mutable(mutable)?;
        let (name, medium) = (arg(name)?, medium_arg(medium)?);
        with_world(|w| w.attach_device(&id, &name, port, device, device_type, medium.as_deref()))
    })
}

pub extern "C" fn machine_detach_device(this: *mut Obj, name: *const u16, port: i32, device: i32) -> Nsresult {
    method(|| {
        let (id, mutable) = machine_id(this)?;
        state::require_mutable(mutable)?;
        let name = arg(name)?;
        with_world(|w| w.detach_device(&id, &name, port, device))
    })
}

pub extern "C" fn machine_add_storage_controller(
    this: *mut Obj,
    name: *const u16,
    bus: u32,
    out: *mut *mut Obj,
) -> Nsresult {
    method(|| {
        let (id, mutable) = machine_id(this)?;
        state::require_mutable(mutable)?;
        let name = arg(name)?;
        with_world(|w| w.add_controller(&id, &name, bus))?;
        put_obj(out, Some(Target::Controller(Controller { name, bus })))
    })
}

pub extern "C" fn machine_get_extra_data(this: *mut Obj, key: *const u16, out: *mut *mut u16) -> Nsresult {
    method(|| {
        let key = arg(key)?;
        put_str(out, &read_machine(this, |m| m.extra_data.get(&key).cloned().unwrap_or_default())?)
    })
}

pub extern "C" fn machine_set_extra_data(this: *mut Obj, key: *const u16, value: *const u16) -> Nsresult {
    method(|| {
        let (id, _) = machine_id(this)?;
        let (key, value) = (arg(key)?, arg(value)?);
        with_world(|w| {
            let m = w.machine_mut(&id)?;
            if value.is_empty() {
                m.extra_data.remove(&key);
            } else {
                m.extra_data.insert(key, value);
            }
            Ok(())
        })
    })
}

pub extern "C" fn machine_save_settings(this: *mut Obj) -> Nsresult {
    method(|| {
        let (id, mutable) = machine_id(this)?;
        state::require_mutable(mutable)?;
        with_world(|w| w.machine(&id).map(|_| ()))
    })
}

pub extern "C" fn machine_unregister(
    this: *mut Obj,
    cleanup: u32,
    size: *mut u32,
    out: *mut *mut *mut Obj,
) -> Nsresult {
    method(|| {
        let (id, _) = machine_id(this)?;
        with_world(|w| w.unregister(&id, cleanup))?;
        put_array(size, out, Vec::new())
    })
}

pub extern "C" fn machine_delete(
    this: *mut Obj,
    _media_size: u32,
    _media: *const *mut Obj,
    out: *mut *mut Obj,
) -> Nsresult {
    method(|| {
        let (id, _) = machine_id(this)?;
        with_world(|w| w.machine(&id).map(|_| ()))?;
        put_progress(out, state::start_operation(move |w| w.delete_machine(&id)))
    })
}

pub extern "C" fn machine_find_snapshot(this: *mut Obj, name_or_id: *const u16, out: *mut *mut Obj) -> Nsresult {
    method(|| {
        let (machine, _) = machine_id(this)?;
        let wanted = arg(name_or_id)?;
        let id = with_world(|w| w.find_snapshot(&machine, &wanted))?;
        put_obj(out, Some(Target::Snapshot { machine, id }))
    })
}

// IConsole

fn console_machine(this: *mut Obj) -> Outcome<String> {
    Ok(this!(this, Target::Console { machine } => machine.clone()))
}

fn require_state(machine: &str, allowed: &[u32], what: &str) -> Outcome<()> {
    with_world(|w| {
        let m = w.machine(machine)?;
        if allowed.contains(&m.state) {
            Ok(())
        } else {
            Err(fault(VBOX_E_INVALID_VM_STATE, format!("Virtual machine '{}' must be {what}", m.name)))
        }
    })
}

pub extern "C" fn console_power_down(this: *mut Obj, out: *mut *mut Obj) -> Nsresult {
    method(|| {
        let machine = console_machine(this)?;
        require_state(
            &machine,
            &[state::STATE_RUNNING, state::STATE_PAUSED, state::STATE_STUCK],
            "Running, Paused or Stuck to be powered down",
        )?;
        put_progress(
            out,
            state::start_operation(move |w| {
                w.machine_mut(&machine)?.state = state::STATE_POWERED_OFF;
                Ok(())
            }),
        )
    })
}

pub extern "C" fn console_power_button(this: *mut Obj) -> Nsresult {
    method(|| {
        let machine = console_machine(this)?;
        require_state(&machine, &[state::STATE_RUNNING], "Running to get the power button event")?;
        // The simulated guest honours ACPI at once.
        with_world(|w| {
            w.machine_mut(&machine)?.state = state::STATE_POWERED_OFF;
            Ok(())
        })
    })
}

pub extern "C" fn console_take_snapshot(
    this: *mut Obj,
    name: *const u16,
    description: *const u16,
    out: *mut *mut Obj,
) -> Nsresult {
    method(|| {
        let machine = console_machine(this)?;
        let (name, description) = (arg(name)?, arg(description)?);
        with_world(|w| w.check_take_snapshot(&machine, &name))?;
        put_progress(out, state::start_operation(move |w| w.take_snapshot(&machine, &name, &description)))
    })
}

pub extern "C" fn console_delete_snapshot(this: *mut Obj, id: *const u16, out: *mut *mut Obj) -> Nsresult {
    method(|| {
        let machine = console_machine(this)?;
        let id = arg(id)?;
        with_world(|w| w.check_delete_snapshot(&machine, &id))?;
        put_progress(out, state::start_operation(move |w| w.delete_snapshot(&machine, &id)))
    })
}

pub extern "C" fn console_restore_snapshot(this: *mut Obj, snapshot: *mut Obj, out: *mut *mut Obj) -> Nsresult {
    method(|| {
        let machine = console_machine(this)?;
        if snapshot.is_null() {
            return Err(fault(E_INVALIDARG, "snapshot is NULL"));
        }
        let id = this!(snapshot, Target::Snapshot { id, .. } => id.clone());
        with_world(|w| w.check_restore(&machine, &id))?;
        put_progress(out, state::start_operation(move |w| w.restore_snapshot(&machine, &id)))
    })
}

// ISnapshot

fn read_snapshot<T>(this: *mut Obj, f: impl FnOnce(&state::Snapshot) -> T) -> Outcome<T> {
    let (machine, id) = this!(this, Target::Snapshot { machine, id } => (machine.clone(), id.clone()));
    with_world(|w| w.snapshot(&machine, &id).map(f))
}

pub extern "C" fn snapshot_get_id(this: *mut Obj, out: *mut *mut u16) -> Nsresult {
    method(|| put_str(out, &read_snapshot(this, |s| s.id.clone())?))
}

pub extern "C" fn snapshot_get_name(this: *mut Obj, out: *mut *mut u16) -> Nsresult {
    method(|| put_str(out, &read_snapshot(this, |s| s.name.clone())?))
}

pub extern "C" fn snapshot_get_description(this: *mut Obj, out: *mut *mut u16) -> Nsresult {
    method(|| put_str(out, &read_snapshot(this, |s| s.description.clone())?))
}

pub extern "C" fn snapshot_get_time_stamp(this: *mut Obj, out: *mut i64) -> Nsresult {
    method(|| put(out, read_snapshot(this, |s| s.time_ms)?))
}

pub extern "C" fn snapshot_get_online(this: *mut Obj, out: *mut i32) -> Nsresult {
    method(|| put(out, i32::from(read_snapshot(this, |s| s.online)?)))
}

pub extern "C" fn snapshot_get_parent(this: *mut Obj, out: *mut *mut Obj) -> Nsresult {
    method(|| {
        let machine = this!(this, Target::Snapshot { machine, .. } => machine.clone());
        let parent = read_snapshot(this, |s| s.parent.clone())?;
        put_obj(out, parent.map(|id| Target::Snapshot { machine, id }))
    })
}

pub extern "C" fn snapshot_get_children(this: *mut Obj, size: *mut u32, out: *mut *mut *mut Obj) -> Nsresult {
    method(|| {
        let (machine, id) = this!(this, Target::Snapshot { machine, id } => (machine.clone(), id.clone()));
        let children = with_world(|w| {
            Ok(w.machine(&machine)?
                .snapshots
                .iter()
                .filter(|s| s.parent.as_deref() == Some(id.as_str()))
                .map(|s| s.id.clone())
                .collect::<Vec<_>>())
        })?;
        put_array(size, out, children.into_iter().map(|id| Target::Snapshot { machine: machine.clone(), id }).collect())
    })
}

// IMedium

fn read_medium<T>(this: *mut Obj, f: impl FnOnce(&state::Medium) -> T) -> Outcome<T> {
    let id = this!(this, Target::Medium(id) => id.clone());
    with_world(|w| w.medium(&id).map(f))
}

pub extern "C" fn medium_get_id(this: *mut Obj, out: *mut *mut u16) -> Nsresult {
    method(|| put_str(out, &read_medium(this, |m| m.id.clone())?))
}

pub extern "C" fn medium_get_location(this: *mut Obj, out: *mut *mut u16) -> Nsresult {
    method(|| put_str(out, &read_medium(this, |m| m.location.display().to_string())?))
}

pub extern "C" fn medium_get_format(this: *mut Obj, out: *mut *mut u16) -> Nsresult {
    method(|| put_str(out, &read_medium(this, |m| m.format.clone())?))
}

pub extern "C" fn medium_get_parent(this: *mut Obj, out: *mut *mut Obj) -> Nsresult {
    method(|| put_obj(out, read_medium(this, |m| m.parent.clone())?.map(Target::Medium)))
}

pub extern "C" fn medium_get_logical_size(this: *mut Obj, out: *mut i64) -> Nsresult {
    method(|| put(out, read_medium(this, |m| m.logical_size)?))
}

pub extern "C" fn medium_close(this: *mut Obj) -> Nsresult {
    method(|| {
        let id = this!(this, Target::Medium(id) => id.clone());
        with_world(|w| w.close_medium(&id))
    })
}

pub extern "C" fn medium_merge_to(this: *mut Obj, target_medium: *mut Obj, out: *mut *mut Obj) -> Nsresult {
    method(|| {
        let source = this!(this, Target::Medium(id) => id.clone());
        let target = medium_arg(target_medium)?.ok_or_else(|| fault(E_INVALIDARG, "target is NULL"))?;
        with_world(|w| w.check_merge(&source, &target))?;
        put_progress(out, state::start_operation(move |w| w.merge(&source, &target)))
    })
}

pub extern "C" fn medium_clone_to(
    this: *mut Obj,
    target_medium: *mut Obj,
    _variant: u32,
    parent: *mut Obj,
    out: *mut *mut Obj,
) -> Nsresult {
    method(|| {
        let source = this!(this, Target::Medium(id) => id.clone());
        let target = medium_arg(target_medium)?.ok_or_else(|| fault(E_INVALIDARG, "target is NULL"))?;
        let parent = medium_arg(parent)?;
        with_world(|w| w.check_clone(&source, &target))?;
        put_progress(out, state::start_operation(move |w| w.clone_medium(&source, &target, parent.as_deref())))
    })
}

// IMediumAttachment

fn attachment<'a>(this: *mut Obj) -> Outcome<&'a Attachment> {
    Ok(this!(this, Target::Attachment(a) => a))
}

pub extern "C" fn attachment_get_medium(this: *mut Obj, out: *mut *mut Obj) -> Nsresult {
    method(|| put_obj(out, attachment(this)?.medium.clone().map(Target::Medium)))
}

pub extern "C" fn attachment_get_controller(this: *mut Obj, out: *mut *mut u16) -> Nsresult {
    method(|| put_str(out, &attachment(this)?.controller))
}

pub extern "C" fn attachment_get_port(this: *mut Obj, out: *mut i32) -> Nsresult {
    method(|| put(out, attachment(this)?.port))
}

pub extern "C" fn attachment_get_device(this: *mut Obj, out: *mut i32) -> Nsresult {
    method(|| put(out, attachment(this)?.device))
}

pub extern "C" fn attachment_get_type(this: *mut Obj, out: *mut u32) -> Nsresult {
    method(|| put(out, attachment(this)?.device_type))
}

// IStorageController

pub extern "C" fn controller_get_name(this: *mut Obj, out: *mut *mut u16) -> Nsresult {
    method(|| put_str(out, &this!(this, Target::Controller(c) => c.name.clone())))
}

pub extern "C" fn controller_get_bus(this: *mut Obj, out: *mut u32) -> Nsresult {
    method(|| put(out, this!(this, Target::Controller(c) => c.bus)))
}

// IProgress

fn progress_state(this: *mut Obj) -> Outcome<state::ProgressState> {
    let progress = this!(this, Target::Progress(p) => p);
    progress.state.lock().map(|s| s.clone()).map_err(|_| fault(E_UNEXPECTED, "progress poisoned"))
}

pub extern "C" fn progress_get_percent(this: *mut Obj, out: *mut u32) -> Nsresult {
    method(|| put(out, progress_state(this)?.percent))
}

pub extern "C" fn progress_get_completed(this: *mut Obj, out: *mut i32) -> Nsresult {
    method(|| put(out, i32::from(progress_state(this)?.completed)))
}

pub extern "C" fn progress_get_result_code(this: *mut Obj, out: *mut i32) -> Nsresult {
    method(|| {
        let s = progress_state(this)?;
        if !s.completed {
            return Err(fault(
                VBOX_E_INVALID_OBJECT_STATE,
                "Result code is not available, operation is still in progress",
            ));
        }
        put(out, s.failure.map_or(0, |f| f.code as i32))
    })
}

pub extern "C" fn progress_get_error_info(this: *mut Obj, out: *mut *mut Obj) -> Nsresult {
    method(|| {
        let s = progress_state(this)?;
        if !s.completed {
            return Err(fault(
                VBOX_E_INVALID_OBJECT_STATE,
                "Error info is not available, operation is still in progress",
            ));
        }
        put_obj(out, s.failure.map(Target::ErrorInfo))
    })
}

pub extern "C" fn progress_wait_for_completion(this: *mut Obj, timeout_ms: i32) -> Nsresult {
    method(|| {
        let progress = this!(this, Target::Progress(p) => p);
        let mut s = progress.state.lock().map_err(|_| fault(E_UNEXPECTED, "progress poisoned"))?;
        let deadline =
            (timeout_ms >= 0).then(|| std::time::Instant::now() + std::time::Duration::from_millis(timeout_ms as u64));
        while !s.completed {
            s = match deadline {
                None => progress.done.wait(s).map_err(|_| fault(E_UNEXPECTED, "progress poisoned"))?,
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    progress.done.wait_timeout(s, left).map_err(|_| fault(E_UNEXPECTED, "progress poisoned"))?.0
                }
            };
        }
        Ok(())
    })
}

// IVirtualBoxErrorInfo

pub extern "C" fn error_info_get_result_code(this: *mut Obj, out: *mut i32) -> Nsresult {
    method(|| put(out, this!(this, Target::ErrorInfo(f) => f.code as i32)))
}

pub extern "C" fn error_info_get_text(this: *mut Obj, out: *mut *mut u16) -> Nsresult {
    method(|| put_str(out, &this!(this, Target::ErrorInfo(f) => f.text.clone())))
}
