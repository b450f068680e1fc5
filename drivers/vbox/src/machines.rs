//! Machines as domains, on the XPCOM thread: finding them, sessions,
//! their state, the domain XML synthesised from IMachine (disks from the
//! medium attachments, each with its differencing chain from IMedium
//! parents), define, undefine, start and stop.

use std::path::PathBuf;

use strata_core::chain::{Backing, Chain, StorageSource};
use strata_core::driver::{DomainInfo, DomainState, DomainSummary};
use strata_core::xml::{Domain, Element};
use strata_core::{Error, ErrorKind, Result};

use crate::ffi::{
    IMachineVtbl, IMediumVtbl, ACCESS_READ_WRITE, BUS_IDE, BUS_SATA, BUS_SCSI, CLEANUP_DETACH_ALL_RETURN_NONE,
    DEVICE_HARD_DISK, LOCK_SHARED, LOCK_WRITE, MACHINE_ABORTED, MACHINE_PAUSED, MACHINE_POWERED_OFF, MACHINE_RUNNING,
    MACHINE_SAVED, MACHINE_STUCK, MACHINE_TELEPORTED,
};
use crate::xpcom::{
    call, get, get_array, get_obj, get_str, Com, Ctx, Failure, VBOX_E_FILE_ERROR, VBOX_E_INVALID_OBJECT_STATE,
    VBOX_E_OBJECT_NOT_FOUND,
};

pub type Machine = Com<IMachineVtbl>;
pub type Medium = Com<IMediumVtbl>;

/// The extra-data key holding a machine's disk set (seed 004).
pub const DISK_SET_KEY: &str = "strata/disk-set";

/// One layer of a disk's chain, as VirtualBox knows it.
#[derive(Debug, Clone)]
pub struct Layer {
    pub id: String,
    pub location: PathBuf,
    /// `vdi`, `vmdk` or `vhd`.
    pub format: String,
}

/// A hard disk attachment, named as a `<disk>` target.
#[derive(Debug, Clone)]
pub struct DiskAttachment {
    pub target: String,
    pub bus: &'static str,
    pub controller: String,
    pub port: i32,
    pub device: i32,
    /// The attached medium first, then its parents.
    pub chain: Vec<Layer>,
}

fn letter(index: i32) -> String {
    u8::try_from(index).ok().filter(|i| *i < 26).map_or_else(|| index.to_string(), |i| char::from(b'a' + i).to_string())
}

/// VirtualBox's state as virsh's.
pub fn domain_state(state: u32) -> DomainState {
    match state {
        0 => DomainState::NoState,
        MACHINE_POWERED_OFF | MACHINE_SAVED | MACHINE_TELEPORTED | MACHINE_ABORTED => DomainState::Shutoff,
        MACHINE_RUNNING => DomainState::Running,
        MACHINE_PAUSED => DomainState::Paused,
        MACHINE_STUCK => DomainState::Crashed,
        // Teleporting, snapshotting, starting, stopping, saving, restoring…: the VM process runs.
        _ => DomainState::Running,
    }
}

/// The error for a lock VirtualBox refused.
fn lock_refused(f: Failure, name: &str) -> Error {
    if f.code == VBOX_E_INVALID_OBJECT_STATE {
        Error::operation_invalid(format!(
            "domain '{name}' is locked by another session (its VM process or another VirtualBox client): {f}"
        ))
    } else {
        f.into()
    }
}

impl Ctx {
    pub fn find_machine(&self, name: &str) -> Result<Machine> {
        let vbox = &self.vbox;
        let wanted = self.utf16(name)?;
        match get_obj!(vbox.FindMachine(wanted.ptr())) {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(Error::no_domain(format!("no domain with matching name '{name}'"))),
            Err(f) if f.code == VBOX_E_OBJECT_NOT_FOUND => {
                Err(Error::no_domain(format!("no domain with matching name '{name}' ({f})")))
            }
            Err(f) => Err(f.into()),
        }
    }

    pub fn machines(&self) -> Result<Vec<Machine>> {
        let vbox = &self.vbox;
        Ok(get_array!(self, vbox.GetMachines)?)
    }

    pub fn machine_name(&self, machine: &Machine) -> Result<String> {
        Ok(get_str!(self, machine.GetName())?)
    }

    pub fn machine_state(&self, machine: &Machine) -> Result<u32> {
        Ok(get!(machine.GetState)?)
    }

    /// Runs `f` with `machine` locked in this client's session (a shared
    /// lock on a running machine, else a write lock), handing it the
    /// session's machine; the lock is released whatever `f` returns.
    pub fn with_session<T>(
        &mut self,
        machine: &Machine,
        name: &str,
        f: impl FnOnce(&mut Ctx, &Machine) -> Result<T>,
    ) -> Result<T> {
        let running = domain_state(self.machine_state(machine)?).is_active();
        let lock = if running { LOCK_SHARED } else { LOCK_WRITE };
        let session = &self.session;
        call!(machine.LockMachine(session.raw(), lock)).map_err(|f| lock_refused(f, name))?;
        let result = get_obj!(session.GetMachine())
            .map_err(Error::from)
            .and_then(|m| m.ok_or_else(|| Error::internal("the locked session has no machine")))
            .and_then(|locked| f(self, &locked));
        let session = &self.session;
        let unlocked = call!(session.UnlockMachine());
        let value = result?;
        unlocked?;
        Ok(value)
    }

    pub fn summary(&self, machine: &Machine, position: usize) -> Result<DomainSummary> {
        let state = domain_state(self.machine_state(machine)?);
        Ok(DomainSummary {
            id: state.is_active().then(|| u32::try_from(position + 1).unwrap_or(u32::MAX)),
            name: self.machine_name(machine)?,
            uuid: get_str!(self, machine.GetId())?,
            state,
            reason: None,
            persistent: true,
            damaged: None,
        })
    }

    pub fn list(&self) -> Result<Vec<DomainSummary>> {
        self.machines()?.iter().enumerate().map(|(i, m)| self.summary(m, i)).collect()
    }

    pub fn info(&self, name: &str) -> Result<DomainInfo> {
        let machines = self.machines()?;
        for (i, m) in machines.iter().enumerate() {
            if self.machine_name(m)? == name {
                let memory_kib = u64::from(get!(m.GetMemorySize)?) * 1024;
                let raw_state = self.machine_state(m)?;
                return Ok(DomainInfo {
                    summary: self.summary(m, i)?,
                    os_type: "hvm".into(),
                    max_memory_kib: memory_kib,
                    used_memory_kib: memory_kib,
                    vcpus: get!(m.GetCPUCount)?,
                    autostart: false,
                    managed_save: raw_state == MACHINE_SAVED,
                });
            }
        }
        Err(Error::no_domain(format!("no domain with matching name '{name}'")))
    }

    /// A medium and its parents (only the medium unless `full`).
    pub fn medium_chain(&self, medium: Medium, full: bool) -> Result<Vec<Layer>> {
        let mut chain = Vec::new();
        let mut next = Some(medium);
        while let Some(m) = next {
            chain.push(Layer {
                id: get_str!(self, m.GetId())?,
                location: PathBuf::from(get_str!(self, m.GetLocation())?),
                format: get_str!(self, m.GetFormat())?.to_ascii_lowercase(),
            });
            next = if full { get_obj!(m.GetParent())? } else { None };
        }
        Ok(chain)
    }

    /// The machine's hard disks, in attachment order, each with its whole
    /// chain when `full_chains`, else with its attached medium only (which
    /// a merge running meanwhile does not remove).
    pub fn disks(&self, machine: &Machine, full_chains: bool) -> Result<Vec<DiskAttachment>> {
        let mut buses = Vec::new();
        for c in get_array!(self, machine.GetStorageControllers)? {
            buses.push((get_str!(self, c.GetName())?, get!(c.GetBus)?));
        }
        let mut disks = Vec::new();
        for a in get_array!(self, machine.GetMediumAttachments)? {
            let device_type: u32 = get!(a.GetType)?;
            let Some(medium) = get_obj!(a.GetMedium())? else { continue };
            if device_type != DEVICE_HARD_DISK {
                continue;
            }
            let controller = get_str!(self, a.GetController())?;
            let (port, device): (i32, i32) = (get!(a.GetPort)?, get!(a.GetDevice)?);
            let bus = buses.iter().find(|(n, _)| *n == controller).map_or(BUS_SATA, |(_, b)| *b);
            let (target, bus) = match bus {
                BUS_IDE => (format!("hd{}", letter(port * 2 + device)), "ide"),
                BUS_SCSI => (format!("sd{}", letter(port)), "scsi"),
                _ => (format!("sd{}", letter(port)), "sata"),
            };
            disks.push(DiskAttachment {
                target,
                bus,
                controller,
                port,
                device,
                chain: self.medium_chain(medium, full_chains)?,
            });
        }
        Ok(disks)
    }

    /// The domain XML of `machine`: name, uuid, memory, vCPUs and each hard
    /// disk with its differencing chain as `<backingStore>`; disks in the
    /// disk set kept in extra data are marked selected.
    pub fn domain(&self, machine: &Machine) -> Result<Domain> {
        let memory_kib = (u64::from(get!(machine.GetMemorySize)?) * 1024).to_string();
        let cpus: u32 = get!(machine.GetCPUCount)?;
        let disks = self.disks(machine, true)?;
        let mut devices = Element::new("devices");
        for d in &disks {
            devices = devices.with_child(
                Element::new("disk")
                    .with_attr("type", "file")
                    .with_attr("device", "disk")
                    .with_child(Element::new("driver").with_attr("name", "vbox"))
                    .with_child(Element::new("target").with_attr("dev", d.target.clone()).with_attr("bus", d.bus)),
            );
        }
        let root = Element::new("domain")
            .with_attr("type", "vbox")
            .with_child(Element::new("name").with_text(self.machine_name(machine)?))
            .with_child(Element::new("uuid").with_text(get_str!(self, machine.GetId())?))
            .with_child(Element::new("memory").with_attr("unit", "KiB").with_text(memory_kib.clone()))
            .with_child(Element::new("currentMemory").with_attr("unit", "KiB").with_text(memory_kib))
            .with_child(Element::new("vcpu").with_attr("placement", "static").with_text(cpus.to_string()))
            .with_child(
                Element::new("os").with_child(Element::new("type").with_attr("arch", "x86_64").with_text("hvm")),
            )
            .with_child(devices);
        let mut dom = Domain::from_element(root)?;
        for d in &disks {
            dom.set_disk_chain(&d.target, &chain_of(&d.chain))?;
        }
        for target in self.disk_set(machine)? {
            if disks.iter().any(|d| d.target == target) {
                dom.set_disk_selected(&target, true)?;
            }
        }
        Ok(dom)
    }

    /// The disk set's targets from the machine's extra data.
    pub fn disk_set(&self, machine: &Machine) -> Result<Vec<String>> {
        let key = self.utf16(DISK_SET_KEY)?;
        let value = get_str!(self, machine.GetExtraData(key.ptr()))?;
        Ok(value.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect())
    }

    pub fn set_disk_set(&self, machine: &Machine, targets: &[String]) -> Result<()> {
        let (key, value) = (self.utf16(DISK_SET_KEY)?, self.utf16(&targets.join(","))?);
        Ok(call!(machine.SetExtraData(key.ptr(), value.ptr()))?)
    }

    fn open_medium(&self, path: &str) -> Result<Medium> {
        let vbox = &self.vbox;
        let location = self.utf16(path)?;
        match get_obj!(vbox.OpenMedium(location.ptr(), DEVICE_HARD_DISK, ACCESS_READ_WRITE, 0)) {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(Error::internal(format!("OpenMedium gave no medium for '{path}'"))),
            Err(f) => Err(Error::from(f).context(format!("cannot open disk image '{path}'"))),
        }
    }

    /// Defines a machine from domain XML: CreateMachine (4.2's signature),
    /// memory and vCPUs, RegisterMachine, then each disk's image opened
    /// (OpenMedium) and attached through a write-locked session. A
    /// failure after the machine was registered unregisters it again.
    pub fn define(&mut self, xml: &str) -> Result<String> {
        let dom = Domain::parse(xml)?;
        let name = dom.name();
        if name.is_empty() {
            return Err(Error::xml("the domain has no <name>"));
        }
        if self.find_machine(&name).is_ok() {
            return Err(Error::new(ErrorKind::DomainExists, format!("domain '{name}' already exists")));
        }
        let memory_mb = dom
            .memory_kib()
            .map_or(Ok(128), |kib| u32::try_from(kib.div_ceil(1024)))
            .map_err(|_| Error::invalid_arg("memory is too large"))?;
        let mut planned = Vec::new();
        for disk in dom.disks()? {
            if disk.device != "disk" {
                continue;
            }
            let Some(StorageSource::File { path }) =
                disk.chain.as_ref().and_then(|c| c.top()).map(|l| l.source.clone())
            else {
                return Err(Error::config_unsupported(format!(
                    "disk '{}': the vbox driver attaches file images only",
                    disk.target
                )));
            };
            planned.push((slot_of(&disk.target, disk.bus.as_deref())?, path.display().to_string()));
        }
        let media: Vec<(Slot, Medium)> =
            planned.into_iter().map(|(slot, path)| Ok((slot, self.open_medium(&path)?))).collect::<Result<_>>()?;
        let vbox = &self.vbox;
        let wanted = self.utf16(&name)?;
        let flags = self.utf16(&dom.uuid().map(|u| format!("UUID={u}")).unwrap_or_default())?;
        let created = get_obj!(vbox.CreateMachine(
            std::ptr::null(),
            wanted.ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
            flags.ptr()
        ));
        let machine = match created {
            Ok(Some(m)) => m,
            Ok(None) => return Err(Error::internal("CreateMachine gave no machine")),
            Err(f) if f.code == VBOX_E_FILE_ERROR => {
                return Err(Error::new(ErrorKind::DomainExists, format!("cannot define domain '{name}': {f}")))
            }
            Err(f) => return Err(f.into()),
        };
        call!(machine.SetMemorySize(memory_mb))?;
        call!(machine.SetCPUCount(dom.vcpus()))?;
        call!(vbox.RegisterMachine(machine.raw()))?;
        let attached = self.with_session(&machine, &name, |ctx, locked| {
            let mut controllers: Vec<&str> = Vec::new();
            for (slot, medium) in &media {
                let controller = ctx.utf16(slot.controller)?;
                if !controllers.contains(&slot.controller) {
                    get_obj!(locked.AddStorageController(controller.ptr(), slot.bus))?;
                    controllers.push(slot.controller);
                }
                call!(locked.AttachDevice(controller.ptr(), slot.port, slot.device, DEVICE_HARD_DISK, medium.raw()))?;
            }
            Ok(call!(locked.SaveSettings())?)
        });
        if let Err(e) = attached {
            // Best effort: the error reported is the attachment's.
            let _ = self.remove_machine(&machine);
            return Err(e.context(format!("cannot attach the disks of '{name}'")));
        }
        Ok(name)
    }

    /// Unregisters `machine` and deletes its settings (its media stay registered).
    fn remove_machine(&self, machine: &Machine) -> Result<()> {
        let mut size = 0u32;
        let mut media = std::ptr::null_mut();
        call!(machine.Unregister(CLEANUP_DETACH_ALL_RETURN_NONE, &mut size, &mut media))?;
        // SAFETY: on success Unregister stored `size` AddRef'd media (none in this mode).
        drop(unsafe { self.take_array(size, media) });
        let progress = get_obj!(machine.Delete(0, std::ptr::null()))?;
        self.wait(progress, "deleting the machine's settings")
    }

    pub fn undefine(&mut self, name: &str, with_snapshots: bool) -> Result<()> {
        let machine = self.find_machine(name)?;
        if !with_snapshots && get_obj!(machine.GetCurrentSnapshot())?.is_some() {
            return Err(Error::operation_invalid(format!(
                "cannot undefine domain '{name}' with snapshots: VirtualBox would delete them (use --snapshots-metadata)"
            )));
        }
        self.remove_machine(&machine).map_err(|e| {
            if e.message().contains("VBOX_E_INVALID_OBJECT_STATE") {
                Error::operation_invalid(format!(
                    "domain '{name}' is locked by a session (it is running?): {}",
                    e.message()
                ))
            } else {
                e
            }
        })
    }

    pub fn start(&mut self, name: &str) -> Result<()> {
        let machine = self.find_machine(name)?;
        if domain_state(self.machine_state(&machine)?).is_active() {
            return Err(Error::operation_invalid("domain is already running"));
        }
        let session = &self.session;
        let kind = self.utf16("headless")?;
        let environment = self.utf16("")?;
        let progress = get_obj!(machine.LaunchVMProcess(session.raw(), kind.ptr(), environment.ptr()))
            .map_err(|f| lock_refused(f, name))?;
        let waited = self.wait(progress, &format!("starting domain '{name}'"));
        let session = &self.session;
        let unlocked = call!(session.UnlockMachine());
        waited?;
        Ok(unlocked?)
    }

    /// Runs `f` on the console of a running machine.
    fn console(
        &mut self,
        name: &str,
        f: impl FnOnce(&Ctx, &Com<crate::ffi::IConsoleVtbl>) -> Result<()>,
    ) -> Result<()> {
        let machine = self.find_machine(name)?;
        if !domain_state(self.machine_state(&machine)?).is_active() {
            return Err(Error::operation_invalid("domain is not running"));
        }
        self.with_session(&machine, name, |ctx, _| {
            let session = &ctx.session;
            let console =
                get_obj!(session.GetConsole())?.ok_or_else(|| Error::internal("the session has no console"))?;
            f(ctx, &console)
        })
    }

    pub fn destroy(&mut self, name: &str) -> Result<()> {
        self.console(name, |ctx, console| {
            let progress = get_obj!(console.PowerDown())?;
            ctx.wait(progress, &format!("powering domain '{name}' down"))
        })
    }

    pub fn shutdown(&mut self, name: &str) -> Result<()> {
        self.console(name, |_, console| Ok(call!(console.PowerButton())?))
    }
}

/// A disk's place on a storage controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub controller: &'static str,
    pub bus: u32,
    pub port: i32,
    pub device: i32,
}

/// Where a `<target dev bus>` goes: `hdX` on the IDE controller (two
/// ports of two devices), others on the SATA one (or SCSI for
/// `bus='scsi'`) at port X. VirtualBox 4.2 has no virtio disks, so `vdX`
/// lands on SATA too, and reads back as `sdX`.
pub fn slot_of(target: &str, bus: Option<&str>) -> Result<Slot> {
    let bad = || Error::config_unsupported(format!("disk target '{target}': the vbox driver takes hdX, sdX or vdX"));
    let (prefix, last) = target.split_at(target.len().saturating_sub(1));
    let index = last.bytes().next().filter(u8::is_ascii_lowercase).map(|b| i32::from(b - b'a')).ok_or_else(bad)?;
    match (prefix, bus) {
        ("hd", None | Some("ide")) if index < 4 => {
            Ok(Slot { controller: "IDE", bus: BUS_IDE, port: index / 2, device: index % 2 })
        }
        ("sd" | "vd", Some("scsi")) => Ok(Slot { controller: "SCSI", bus: BUS_SCSI, port: index, device: 0 }),
        ("sd" | "vd", None | Some("sata" | "virtio")) => {
            Ok(Slot { controller: "SATA", bus: BUS_SATA, port: index, device: 0 })
        }
        _ => Err(bad()),
    }
}

/// A VirtualBox chain (attached medium first) as core's; `layers` is
/// never empty, as it starts at an attached medium.
pub fn chain_of(layers: &[Layer]) -> Chain {
    let source = |l: &Layer| StorageSource::File { path: l.location.clone() };
    let mut chain = Chain { layers: Vec::new() };
    for (i, layer) in layers.iter().enumerate() {
        if i == 0 {
            chain = Chain::single(source(layer), Some(layer.format.clone()));
        } else {
            chain.push_backing(i - 1, source(layer), Some(layer.format.clone()));
        }
    }
    if let Some(last) = chain.layers.last_mut() {
        last.backing = Backing::End;
    }
    chain
}
