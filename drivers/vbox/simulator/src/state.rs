//! The simulated VirtualBox: registered machines, the media registry and
//! each machine's snapshot tree, kept in `$STRATA_VBOX_SIM_STATE/vbox.json`
//! and read and written under an exclusive lock by every call, so that
//! separate processes (one `strata` each) see one VirtualBox, as clients of
//! VBoxSVC do. Long operations run on a thread of their own behind an
//! `IProgress` and change the state when they complete.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{
    Nsresult, E_ACCESSDENIED, E_INVALIDARG, E_UNEXPECTED, VBOX_E_FILE_ERROR, VBOX_E_INVALID_OBJECT_STATE,
    VBOX_E_INVALID_VM_STATE, VBOX_E_OBJECT_IN_USE, VBOX_E_OBJECT_NOT_FOUND,
};

/// The VirtualBox version simulated.
pub const VERSION: &str = "4.2.6";

pub const STATE_POWERED_OFF: u32 = 1;
pub const STATE_SAVED: u32 = 2;
pub const STATE_RUNNING: u32 = 5;
pub const STATE_PAUSED: u32 = 6;
pub const STATE_STUCK: u32 = 7;
pub const DEVICE_HARD_DISK: u32 = 3;
pub const LOCK_WRITE: u32 = 2;
pub const BUS_IDE: u32 = 1;
pub const BUS_SAS: u32 = 5;
pub const CLEANUP_UNREGISTER_ONLY: u32 = 1;

/// A failed call: its result code and the text `IVirtualBoxErrorInfo` gives.
#[derive(Debug, Clone)]
pub struct Fault {
    pub code: Nsresult,
    pub text: String,
}

pub fn fault(code: Nsresult, text: impl Into<String>) -> Fault {
    Fault { code, text: text.into() }
}

pub type Outcome<T> = Result<T, Fault>;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct World {
    pub machines: Vec<Machine>,
    pub media: Vec<Medium>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub id: String,
    pub name: String,
    pub os_type: String,
    pub registered: bool,
    pub folder: PathBuf,
    pub state: u32,
    pub memory_mb: u32,
    pub cpus: u32,
    pub controllers: Vec<Controller>,
    pub attachments: Vec<Attachment>,
    pub snapshots: Vec<Snapshot>,
    pub current_snapshot: Option<String>,
    pub extra_data: BTreeMap<String, String>,
    /// The process holding a write lock (a session of another client).
    pub write_locked_by: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Controller {
    pub name: String,
    pub bus: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub controller: String,
    pub port: i32,
    pub device: i32,
    pub device_type: u32,
    pub medium: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    pub description: String,
    pub time_ms: i64,
    pub online: bool,
    pub parent: Option<String>,
    pub attachments: Vec<Attachment>,
    pub memory_mb: u32,
    pub cpus: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Medium {
    pub id: String,
    pub location: PathBuf,
    pub format: String,
    pub parent: Option<String>,
    pub logical_size: i64,
    /// False for a medium made by CreateHardDisk whose storage is not created yet.
    pub created: bool,
}

fn state_dir() -> Outcome<PathBuf> {
    std::env::var_os("STRATA_VBOX_SIM_STATE")
        .map(PathBuf::from)
        .ok_or_else(|| fault(E_UNEXPECTED, "STRATA_VBOX_SIM_STATE is not set"))
}

/// Makes sure the state directory can be used (at ComInitialize).
pub fn open_store() -> Outcome<()> {
    let dir = state_dir()?;
    std::fs::create_dir_all(&dir).map_err(|e| fault(VBOX_E_FILE_ERROR, format!("{}: {e}", dir.display())))
}

/// Runs `f` on the world under the store's lock, writing back what it left.
pub fn with_world<T>(f: impl FnOnce(&mut World) -> Outcome<T>) -> Outcome<T> {
    let dir = state_dir()?;
    let io = |what: &str, e: std::io::Error| fault(VBOX_E_FILE_ERROR, format!("{what}: {e}"));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("vbox.lock"))
        .map_err(|e| io("lock file", e))?;
    lock.lock().map_err(|e| io("lock", e))?;
    let path = dir.join("vbox.json");
    let mut world: World = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| fault(VBOX_E_FILE_ERROR, format!("vbox.json: {e}")))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => World::default(),
        Err(e) => return Err(io("vbox.json", e)),
    };
    let result = f(&mut world);
    if result.is_ok() {
        let text = serde_json::to_vec_pretty(&world).map_err(|e| fault(E_UNEXPECTED, e.to_string()))?;
        let temp = dir.join("vbox.json.new");
        std::fs::write(&temp, text).map_err(|e| io("vbox.json", e))?;
        std::fs::rename(&temp, &path).map_err(|e| io("vbox.json", e))?;
    }
    drop(lock);
    result
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

impl World {
    pub fn machine(&self, id: &str) -> Outcome<&Machine> {
        self.machines.iter().find(|m| m.id == id).ok_or_else(|| {
            fault(VBOX_E_OBJECT_NOT_FOUND, format!("Could not find a registered machine with UUID {{{id}}}"))
        })
    }

    pub fn machine_mut(&mut self, id: &str) -> Outcome<&mut Machine> {
        self.machines.iter_mut().find(|m| m.id == id).ok_or_else(|| {
            fault(VBOX_E_OBJECT_NOT_FOUND, format!("Could not find a registered machine with UUID {{{id}}}"))
        })
    }

    pub fn medium(&self, id: &str) -> Outcome<&Medium> {
        self.media
            .iter()
            .find(|m| m.id == id)
            .ok_or_else(|| fault(VBOX_E_OBJECT_NOT_FOUND, format!("Could not find a medium with UUID {{{id}}}")))
    }

    fn medium_mut(&mut self, id: &str) -> Outcome<&mut Medium> {
        self.media
            .iter_mut()
            .find(|m| m.id == id)
            .ok_or_else(|| fault(VBOX_E_OBJECT_NOT_FOUND, format!("Could not find a medium with UUID {{{id}}}")))
    }

    pub fn find_machine(&self, name_or_id: &str) -> Outcome<String> {
        let wanted = name_or_id.trim_matches(|c| c == '{' || c == '}');
        self.machines
            .iter()
            .find(|m| m.registered && (m.name == name_or_id || m.id.eq_ignore_ascii_case(wanted)))
            .map(|m| m.id.clone())
            .ok_or_else(|| {
                fault(VBOX_E_OBJECT_NOT_FOUND, format!("Could not find a registered machine named '{name_or_id}'"))
            })
    }

    pub fn create_machine(&mut self, settings_file: &str, name: &str, os_type: &str, flags: &str) -> Outcome<String> {
        if name.is_empty() {
            return Err(fault(E_INVALIDARG, "Machine name must not be empty"));
        }
        if self.machines.iter().any(|m| m.registered && m.name == name) {
            return Err(fault(
                VBOX_E_FILE_ERROR,
                format!("Machine settings file for '{name}' already exists: a machine of that name is registered"),
            ));
        }
        let folder = if settings_file.is_empty() {
            state_dir()?.join("Machines").join(name)
        } else {
            Path::new(settings_file).parent().map(Path::to_path_buf).unwrap_or_default()
        };
        let id = flags
            .split(',')
            .find_map(|f| f.trim().strip_prefix("UUID="))
            .map(|u| u.trim_matches(|c| c == '{' || c == '}').to_string())
            .unwrap_or_else(new_id);
        if self.machines.iter().any(|m| m.registered && m.id == id) {
            return Err(fault(VBOX_E_FILE_ERROR, format!("A machine with UUID {{{id}}} is already registered")));
        }
        self.machines.retain(|m| m.registered || m.id != id);
        self.machines.push(Machine {
            id: id.clone(),
            name: name.to_string(),
            os_type: if os_type.is_empty() { "Other".to_string() } else { os_type.to_string() },
            registered: false,
            folder,
            state: STATE_POWERED_OFF,
            memory_mb: 128,
            cpus: 1,
            controllers: Vec::new(),
            attachments: Vec::new(),
            snapshots: Vec::new(),
            current_snapshot: None,
            extra_data: BTreeMap::new(),
            write_locked_by: None,
        });
        Ok(id)
    }

    pub fn register_machine(&mut self, id: &str) -> Outcome<()> {
        let m = self.machine_mut(id)?;
        if m.registered {
            return Err(fault(VBOX_E_INVALID_OBJECT_STATE, format!("The machine '{}' is already registered", m.name)));
        }
        m.registered = true;
        std::fs::create_dir_all(&m.folder)
            .and_then(|_| {
                std::fs::write(
                    m.folder.join(format!("{}.vbox", m.name)),
                    format!("<VirtualBox><Machine uuid='{{{}}}' name='{}'/></VirtualBox>\n", m.id, m.name),
                )
            })
            .map_err(|e| fault(VBOX_E_FILE_ERROR, format!("{}: {e}", m.folder.display())))
    }

    /// Whether another live process holds `id`'s write lock.
    pub fn locked_elsewhere(&self, id: &str) -> Outcome<bool> {
        let m = self.machine(id)?;
        Ok(m.write_locked_by.is_some_and(|pid| pid != std::process::id() && process_alive(pid)))
    }

    /// Takes `id`'s lock for a session of this process; returns whether
    /// the machine was running (a shared lock on its VM process).
    pub fn lock_machine(&mut self, id: &str, lock_type: u32) -> Outcome<bool> {
        let locked_elsewhere = self.locked_elsewhere(id)?;
        let m = self.machine_mut(id)?;
        if !m.registered {
            return Err(fault(E_UNEXPECTED, format!("The machine '{}' is not registered", m.name)));
        }
        let running = is_online(m.state);
        if locked_elsewhere || (running && lock_type == LOCK_WRITE) {
            return Err(fault(
                VBOX_E_INVALID_OBJECT_STATE,
                format!("The machine '{}' is already locked by a session (or being locked or unlocked)", m.name),
            ));
        }
        if !running {
            m.write_locked_by = Some(std::process::id());
        }
        Ok(running)
    }

    pub fn unlock_machine(&mut self, id: &str) -> Outcome<()> {
        let m = self.machine_mut(id)?;
        if m.write_locked_by == Some(std::process::id()) {
            m.write_locked_by = None;
        }
        Ok(())
    }

    pub fn add_controller(&mut self, id: &str, name: &str, bus: u32) -> Outcome<()> {
        let m = self.machine_mut(id)?;
        if !(BUS_IDE..=BUS_SAS).contains(&bus) {
            return Err(fault(E_INVALIDARG, format!("Invalid storage bus {bus}")));
        }
        if m.controllers.iter().any(|c| c.name == name) {
            return Err(fault(VBOX_E_OBJECT_IN_USE, format!("Storage controller named '{name}' already exists")));
        }
        m.controllers.push(Controller { name: name.to_string(), bus });
        Ok(())
    }

    pub fn attach_device(
        &mut self,
        id: &str,
        controller: &str,
        port: i32,
        device: i32,
        device_type: u32,
        medium: Option<&str>,
    ) -> Outcome<()> {
        if let Some(medium_id) = medium {
            self.medium(medium_id)?;
            if let Some(other) =
                self.machines.iter().find(|m| m.attachments.iter().any(|a| a.medium.as_deref() == Some(medium_id)))
            {
                return Err(fault(
                    VBOX_E_OBJECT_IN_USE,
                    format!("Medium {{{medium_id}}} is already attached to the machine '{}'", other.name),
                ));
            }
        }
        let m = self.machine_mut(id)?;
        if !m.registered {
            return Err(fault(VBOX_E_INVALID_OBJECT_STATE, "Machine must be registered before media can be attached"));
        }
        if is_online(m.state) {
            return Err(fault(VBOX_E_INVALID_VM_STATE, format!("Invalid machine state: '{}' is running", m.name)));
        }
        let bus = m.controllers.iter().find(|c| c.name == controller).map(|c| c.bus).ok_or_else(|| {
            fault(VBOX_E_OBJECT_NOT_FOUND, format!("Could not find a storage controller named '{controller}'"))
        })?;
        let (ports, devices) = if bus == BUS_IDE { (2, 2) } else { (30, 1) };
        if !(0..ports).contains(&port) || !(0..devices).contains(&device) {
            return Err(fault(
                E_INVALIDARG,
                format!("Invalid port {port} or device {device} for the controller '{controller}'"),
            ));
        }
        if m.attachments.iter().any(|a| a.controller == controller && a.port == port && a.device == device) {
            return Err(fault(
                VBOX_E_OBJECT_IN_USE,
                format!("Medium already attached to port {port}, device {device} of controller '{controller}'"),
            ));
        }
        m.attachments.push(Attachment {
            controller: controller.to_string(),
            port,
            device,
            device_type,
            medium: medium.map(str::to_string),
        });
        Ok(())
    }

    pub fn detach_device(&mut self, id: &str, controller: &str, port: i32, device: i32) -> Outcome<()> {
        let m = self.machine_mut(id)?;
        if is_online(m.state) {
            return Err(fault(VBOX_E_INVALID_VM_STATE, "Attempt to detach medium from a running virtual machine"));
        }
        let before = m.attachments.len();
        m.attachments.retain(|a| !(a.controller == controller && a.port == port && a.device == device));
        if m.attachments.len() == before {
            return Err(fault(
                VBOX_E_OBJECT_NOT_FOUND,
                format!("No medium attached to port {port}, device {device} of controller '{controller}'"),
            ));
        }
        Ok(())
    }

    pub fn unregister(&mut self, id: &str, cleanup: u32) -> Outcome<()> {
        let locked_elsewhere = self.locked_elsewhere(id)?;
        let m = self.machine_mut(id)?;
        if locked_elsewhere || is_online(m.state) {
            return Err(fault(
                VBOX_E_INVALID_OBJECT_STATE,
                format!("Cannot unregister the machine '{}' while it is locked", m.name),
            ));
        }
        if cleanup == CLEANUP_UNREGISTER_ONLY && !m.snapshots.is_empty() {
            return Err(fault(
                VBOX_E_INVALID_OBJECT_STATE,
                format!("Cannot unregister the machine '{}' because it has {} snapshots", m.name, m.snapshots.len()),
            ));
        }
        m.registered = false;
        m.attachments.clear();
        m.snapshots.clear();
        m.current_snapshot = None;
        Ok(())
    }

    /// IMachine::Delete's work: the machine's settings go; its media stay registered.
    pub fn delete_machine(&mut self, id: &str) -> Outcome<()> {
        let m = self.machine(id)?;
        if m.registered {
            return Err(fault(VBOX_E_INVALID_VM_STATE, format!("The machine '{}' is registered", m.name)));
        }
        let settings = m.folder.join(format!("{}.vbox", m.name));
        if settings.exists() {
            std::fs::remove_file(&settings)
                .map_err(|e| fault(VBOX_E_FILE_ERROR, format!("{}: {e}", settings.display())))?;
        }
        self.machines.retain(|m| m.id != id);
        Ok(())
    }

    pub fn find_snapshot(&self, machine: &str, name_or_id: &str) -> Outcome<String> {
        let m = self.machine(machine)?;
        let found = if name_or_id.is_empty() {
            m.snapshots.iter().find(|s| s.parent.is_none())
        } else {
            m.snapshots.iter().find(|s| s.id == name_or_id || s.name == name_or_id)
        };
        found.map(|s| s.id.clone()).ok_or_else(|| {
            let what = if m.snapshots.is_empty() {
                format!("This machine '{}' does not have any snapshots", m.name)
            } else {
                format!("Could not find a snapshot named '{name_or_id}'")
            };
            fault(VBOX_E_OBJECT_NOT_FOUND, what)
        })
    }

    pub fn snapshot(&self, machine: &str, id: &str) -> Outcome<&Snapshot> {
        self.machine(machine)?
            .snapshots
            .iter()
            .find(|s| s.id == id)
            .ok_or_else(|| fault(VBOX_E_OBJECT_NOT_FOUND, format!("Could not find a snapshot with UUID {{{id}}}")))
    }

    pub fn open_medium(&mut self, location: &str, device_type: u32) -> Outcome<String> {
        if device_type != DEVICE_HARD_DISK {
            return Err(fault(E_INVALIDARG, format!("Device type {device_type} is not served: only hard disks")));
        }
        let path = Path::new(location);
        if let Some(known) = self.media.iter().find(|m| m.location == path) {
            return Ok(known.id.clone());
        }
        let meta = std::fs::metadata(path)
            .map_err(|e| fault(VBOX_E_FILE_ERROR, format!("Could not find file for the medium '{location}' ({e})")))?;
        let format = format_of(location)?;
        let id = new_id();
        self.media.push(Medium {
            id: id.clone(),
            location: path.to_path_buf(),
            format,
            parent: None,
            logical_size: meta.len() as i64,
            created: true,
        });
        Ok(id)
    }

    pub fn create_hard_disk(&mut self, format: &str, location: &str) -> Outcome<String> {
        let format = match format.to_ascii_uppercase().as_str() {
            f @ ("VDI" | "VMDK" | "VHD") => f.to_string(),
            _ => return Err(fault(VBOX_E_OBJECT_NOT_FOUND, format!("Invalid medium storage format '{format}'"))),
        };
        if location.is_empty() || !location.starts_with('/') {
            return Err(fault(VBOX_E_FILE_ERROR, format!("Invalid medium storage file location '{location}'")));
        }
        if self.media.iter().any(|m| m.location == Path::new(location)) || Path::new(location).exists() {
            return Err(fault(VBOX_E_FILE_ERROR, format!("Medium storage file '{location}' already exists")));
        }
        let id = new_id();
        self.media.push(Medium {
            id: id.clone(),
            location: PathBuf::from(location),
            format,
            parent: None,
            logical_size: 0,
            created: false,
        });
        Ok(id)
    }

    pub fn close_medium(&mut self, id: &str) -> Outcome<()> {
        self.medium(id)?;
        if self.media.iter().any(|m| m.parent.as_deref() == Some(id)) {
            return Err(fault(VBOX_E_OBJECT_IN_USE, "Medium has child media"));
        }
        if self.references(id) {
            return Err(fault(VBOX_E_OBJECT_IN_USE, "Medium is attached to a machine or a snapshot"));
        }
        self.media.retain(|m| m.id != id);
        Ok(())
    }

    fn references(&self, medium: &str) -> bool {
        self.machines.iter().any(|m| {
            m.attachments
                .iter()
                .chain(m.snapshots.iter().flat_map(|s| s.attachments.iter()))
                .any(|a| a.medium.as_deref() == Some(medium))
        })
    }

    /// Points every attachment (current state and snapshots) and every
    /// child of `from` at `to`.
    fn redirect(&mut self, from: &str, to: &str) {
        for m in &mut self.machines {
            for a in m.attachments.iter_mut().chain(m.snapshots.iter_mut().flat_map(|s| s.attachments.iter_mut())) {
                if a.medium.as_deref() == Some(from) {
                    a.medium = Some(to.to_string());
                }
            }
        }
        for medium in &mut self.media {
            if medium.parent.as_deref() == Some(from) {
                medium.parent = Some(to.to_string());
            }
        }
    }

    fn remove_medium(&mut self, id: &str) {
        if let Some(m) = self.media.iter().find(|m| m.id == id) {
            let _ = std::fs::remove_file(&m.location);
        }
        self.media.retain(|m| m.id != id);
    }

    fn children(&self, id: &str) -> Vec<String> {
        self.media.iter().filter(|m| m.parent.as_deref() == Some(id)).map(|m| m.id.clone()).collect()
    }

    /// A new differencing medium on `parent`, its file written in `folder`.
    fn create_diff(&mut self, parent: &str, folder: &Path) -> Outcome<String> {
        let base = self.medium(parent)?.clone();
        let id = new_id();
        let dir = folder.join("Snapshots");
        let location = dir.join(format!("{{{id}}}.vdi"));
        std::fs::create_dir_all(&dir)
            .and_then(|_| std::fs::write(&location, format!("differencing image of {{{}}}\n", base.id)))
            .map_err(|e| fault(VBOX_E_FILE_ERROR, format!("{}: {e}", location.display())))?;
        self.media.push(Medium {
            id: id.clone(),
            location,
            format: "VDI".to_string(),
            parent: Some(base.id),
            logical_size: base.logical_size,
            created: true,
        });
        Ok(id)
    }

    /// The media a running machine holds (its current attachments and their ancestors).
    fn in_use_by_running(&self, medium: &str) -> Option<String> {
        self.machines.iter().filter(|m| is_online(m.state)).find_map(|m| {
            m.attachments
                .iter()
                .filter_map(|a| a.medium.as_deref())
                .find_map(|top| self.ancestry(top).iter().any(|id| id == medium).then(|| m.name.clone()))
        })
    }

    /// `id` and its ancestors, nearest first.
    pub fn ancestry(&self, id: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut next = Some(id.to_string());
        while let Some(current) = next {
            next = self.media.iter().find(|m| m.id == current).and_then(|m| m.parent.clone());
            out.push(current);
        }
        out
    }

    /// IMedium::MergeTo's checks, made when it is called.
    pub fn check_merge(&self, source: &str, target: &str) -> Outcome<()> {
        self.medium(source)?;
        self.medium(target)?;
        for id in [source, target] {
            if let Some(machine) = self.in_use_by_running(id) {
                return Err(fault(
                    VBOX_E_INVALID_OBJECT_STATE,
                    format!("Medium {{{id}}} is locked for writing by the running machine '{machine}'"),
                ));
            }
        }
        if source == target
            || !(self.ancestry(source).contains(&target.to_string())
                || self.ancestry(target).contains(&source.to_string()))
        {
            return Err(fault(
                E_INVALIDARG,
                format!("Media {{{source}}} and {{{target}}} are not parent and descendant"),
            ));
        }
        Ok(())
    }

    /// IMedium::MergeTo: `source` and every medium between it and
    /// `target` are merged into `target` and deleted; what referred to a
    /// merged medium (attachments, snapshots, children) refers to `target`,
    /// as after VirtualBox's merges of a deleted snapshot. A merged medium
    /// with a child off the merged line (a branch) is refused.
    pub fn merge(&mut self, source: &str, target: &str) -> Outcome<()> {
        self.check_merge(source, target)?;
        let down = self.ancestry(source);
        let merging_down = down.iter().any(|id| id == target);
        let (merged, line): (Vec<String>, Vec<String>) = match down.iter().position(|id| id == target) {
            // Source is a descendant: merged down into its ancestor target.
            Some(pos) => (down[..pos].to_vec(), down[..=pos].to_vec()),
            // Source is an ancestor: merged up into its descendant target.
            None => {
                let up = self.ancestry(target);
                let pos = up.iter().position(|id| id == source).unwrap_or(0);
                (up[1..=pos].to_vec(), up[..=pos].to_vec())
            }
        };
        for m in &merged {
            // Merging down, the source's own children move onto the target.
            if self.children(m).iter().any(|c| !line.contains(c)) && !(merging_down && m == source) {
                return Err(fault(
                    VBOX_E_INVALID_OBJECT_STATE,
                    format!("Medium {{{m}}} has children off the merged chain and cannot be merged"),
                ));
            }
        }
        let new_parent = self.medium(line.last().map_or(target, String::as_str))?.parent.clone();
        for m in &merged {
            self.redirect(m, target);
            self.remove_medium(m);
        }
        if !merging_down {
            self.medium_mut(target)?.parent = new_parent;
        }
        Ok(())
    }

    /// IMedium::CloneTo's checks, made when it is called.
    pub fn check_clone(&self, source: &str, target: &str) -> Outcome<()> {
        self.medium(source)?;
        let t = self.medium(target)?;
        if t.created {
            return Err(fault(
                VBOX_E_INVALID_OBJECT_STATE,
                format!("Storage for the medium '{}' is already created", t.location.display()),
            ));
        }
        Ok(())
    }

    /// IMedium::CloneTo: the target's storage is created holding the source's data.
    pub fn clone_medium(&mut self, source: &str, target: &str, parent: Option<&str>) -> Outcome<()> {
        self.check_clone(source, target)?;
        let s = self.medium(source)?.clone();
        let t = self.medium(target)?.location.clone();
        std::fs::copy(&s.location, &t).map_err(|e| fault(VBOX_E_FILE_ERROR, format!("{}: {e}", t.display())))?;
        let medium = self.medium_mut(target)?;
        medium.created = true;
        medium.logical_size = s.logical_size;
        medium.parent = parent.map(str::to_string);
        Ok(())
    }

    pub fn check_take_snapshot(&self, machine: &str, name: &str) -> Outcome<()> {
        let m = self.machine(machine)?;
        if name.is_empty() {
            return Err(fault(E_INVALIDARG, "Snapshot name must not be empty"));
        }
        if !matches!(m.state, STATE_POWERED_OFF | STATE_SAVED | STATE_RUNNING | STATE_PAUSED | 4) {
            return Err(fault(VBOX_E_INVALID_VM_STATE, format!("The machine '{}' is changing state", m.name)));
        }
        Ok(())
    }

    /// IConsole::TakeSnapshot: the attached media are frozen in the snapshot
    /// and each attachment gets a new differencing medium on top.
    pub fn take_snapshot(&mut self, machine: &str, name: &str, description: &str) -> Outcome<()> {
        self.check_take_snapshot(machine, name)?;
        let m = self.machine(machine)?.clone();
        let snapshot = Snapshot {
            id: new_id(),
            name: name.to_string(),
            description: description.to_string(),
            time_ms: now_ms(),
            online: is_online(m.state),
            parent: m.current_snapshot.clone(),
            attachments: m.attachments.clone(),
            memory_mb: m.memory_mb,
            cpus: m.cpus,
        };
        let mut attachments = m.attachments.clone();
        for a in &mut attachments {
            if let (Some(medium), DEVICE_HARD_DISK) = (a.medium.clone(), a.device_type) {
                a.medium = Some(self.create_diff(&medium, &m.folder)?);
            }
        }
        let m = self.machine_mut(machine)?;
        m.current_snapshot = Some(snapshot.id.clone());
        m.snapshots.push(snapshot);
        m.attachments = attachments;
        Ok(())
    }

    pub fn check_restore(&self, machine: &str, snapshot: &str) -> Outcome<()> {
        let m = self.machine(machine)?;
        self.snapshot(machine, snapshot)?;
        if is_online(m.state) {
            return Err(fault(
                VBOX_E_INVALID_VM_STATE,
                format!("Cannot delete the current state of the running machine '{}' (machine state: Running)", m.name),
            ));
        }
        Ok(())
    }

    /// IConsole::RestoreSnapshot: the current state's differencing media
    /// are discarded and new ones made on the snapshot's.
    pub fn restore_snapshot(&mut self, machine: &str, snapshot: &str) -> Outcome<()> {
        self.check_restore(machine, snapshot)?;
        let m = self.machine(machine)?.clone();
        let s = self.snapshot(machine, snapshot)?.clone();
        let mut attachments = s.attachments.clone();
        for a in &mut attachments {
            if let (Some(medium), DEVICE_HARD_DISK) = (a.medium.clone(), a.device_type) {
                a.medium = Some(self.create_diff(&medium, &m.folder)?);
            }
        }
        let machine_mut = self.machine_mut(machine)?;
        machine_mut.attachments = attachments;
        machine_mut.memory_mb = s.memory_mb;
        machine_mut.cpus = s.cpus;
        machine_mut.current_snapshot = Some(s.id.clone());
        machine_mut.state = if s.online { STATE_SAVED } else { STATE_POWERED_OFF };
        for old in m.attachments.iter().filter_map(|a| a.medium.clone()) {
            let is_diff = self.medium(&old).is_ok_and(|x| x.parent.is_some());
            if is_diff && !self.references(&old) && self.children(&old).is_empty() {
                self.remove_medium(&old);
            }
        }
        Ok(())
    }

    pub fn check_delete_snapshot(&self, machine: &str, snapshot: &str) -> Outcome<()> {
        let m = self.machine(machine)?;
        let s = self.snapshot(machine, snapshot)?;
        let children = m.snapshots.iter().filter(|c| c.parent.as_deref() == Some(snapshot)).count();
        if children > 1 {
            return Err(fault(
                VBOX_E_INVALID_OBJECT_STATE,
                format!(
                    "Snapshot '{}' of the machine '{}' cannot be deleted, because it has {children} child snapshots, which is more than the one snapshot allowed for deletion",
                    s.name, m.name
                ),
            ));
        }
        Ok(())
    }

    /// IConsole::DeleteSnapshot: the snapshot's children move to its
    /// parent, then each medium it froze takes in its one differencing
    /// child, or goes when it is a differencing medium nothing uses any more
    /// (the state that followed the snapshot was discarded by a restore).
    pub fn delete_snapshot(&mut self, machine: &str, snapshot: &str) -> Outcome<()> {
        self.check_delete_snapshot(machine, snapshot)?;
        let s = self.snapshot(machine, snapshot)?.clone();
        let m = self.machine_mut(machine)?;
        for child in m.snapshots.iter_mut().filter(|c| c.parent.as_deref() == Some(snapshot)) {
            child.parent = s.parent.clone();
        }
        if m.current_snapshot.as_deref() == Some(snapshot) {
            m.current_snapshot = s.parent.clone();
        }
        m.snapshots.retain(|x| x.id != snapshot);
        for frozen in
            s.attachments.iter().filter(|a| a.device_type == DEVICE_HARD_DISK).filter_map(|a| a.medium.clone())
        {
            match self.children(&frozen).as_slice() {
                [child] => {
                    let child = child.clone();
                    self.redirect(&child, &frozen);
                    self.remove_medium(&child);
                }
                [] if self.medium(&frozen)?.parent.is_some() && !self.references(&frozen) => {
                    self.remove_medium(&frozen)
                }
                _ => {}
            }
        }
        Ok(())
    }
}

pub fn is_online(state: u32) -> bool {
    matches!(state, STATE_RUNNING | STATE_PAUSED | STATE_STUCK)
}

fn format_of(location: &str) -> Outcome<String> {
    let ext = Path::new(location).extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "vdi" => Ok("VDI".into()),
        "vmdk" => Ok("VMDK".into()),
        "vhd" => Ok("VHD".into()),
        _ => Err(fault(E_INVALIDARG, format!("Could not get the storage format of the medium '{location}'"))),
    }
}

/// Whether a setter may change the machine: only through a session's machine.
pub fn require_mutable(mutable: bool) -> Outcome<()> {
    if mutable {
        Ok(())
    } else {
        Err(fault(E_ACCESSDENIED, "The machine is not mutable: lock it in a session first"))
    }
}

/// An operation's progress, as IProgress shows it.
pub struct Progress {
    pub state: Mutex<ProgressState>,
    pub done: Condvar,
}

#[derive(Debug, Clone, Default)]
pub struct ProgressState {
    pub percent: u32,
    pub completed: bool,
    pub failure: Option<Fault>,
}

static RUNNING: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());

fn step() -> Duration {
    let ms = std::env::var("STRATA_VBOX_SIM_STEP_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    Duration::from_millis(ms)
}

/// Starts a long operation: it advances a tenth at a time, then `work`
/// changes the world and the progress completes with its outcome.
pub fn start_operation(work: impl FnOnce(&mut World) -> Outcome<()> + Send + 'static) -> Arc<Progress> {
    let progress = Arc::new(Progress { state: Mutex::new(ProgressState::default()), done: Condvar::new() });
    let theirs = Arc::clone(&progress);
    let handle = std::thread::spawn(move || {
        let set = |f: &dyn Fn(&mut ProgressState)| {
            if let Ok(mut s) = theirs.state.lock() {
                f(&mut s);
            }
            theirs.done.notify_all();
        };
        for tenth in 1..10 {
            std::thread::sleep(step());
            set(&|s| s.percent = tenth * 10);
        }
        let outcome = with_world(work);
        set(&|s| {
            s.percent = 100;
            s.completed = true;
            s.failure = outcome.clone().err();
        });
    });
    if let Ok(mut running) = RUNNING.lock() {
        running.push(handle);
    }
    progress
}

/// ComUninitialize: operations this process started run to their end,
/// as VBoxSVC would carry them out after its client went.
pub fn finish_operations() {
    let handles = match RUNNING.lock() {
        Ok(mut running) => std::mem::take(&mut *running),
        Err(_) => return,
    };
    for handle in handles {
        let _ = handle.join();
    }
}
