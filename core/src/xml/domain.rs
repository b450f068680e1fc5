//! `<domain>`: a lossless document with typed accessors for what Strata uses.

use std::path::{Path, PathBuf};

use super::disk::{self, Disk, DISK_CHILD_ORDER};
use super::filesystem::{self, Filesystem};
use super::interface::{self, Interface};
use super::storage::{StorageAddress, StorageDevice};
use super::tree::Element;
use crate::chain::Chain;
use crate::error::{Error, Result};

/// libvirt's order of the `<domain>` children up to `<cputune>`; the rest
/// (`<os>`, `<devices>`, …) come after it.
const DOMAIN_CHILD_ORDER: &[&str] = &[
    "name",
    "uuid",
    "genid",
    "title",
    "description",
    "metadata",
    "maxMemory",
    "memory",
    "currentMemory",
    "blkiotune",
    "memtune",
    "memoryBacking",
    "vcpu",
    "vcpus",
    "iothreads",
    "iothreadids",
    "cputune",
];

/// libvirt's order of the `<cputune>` children.
const CPUTUNE_CHILD_ORDER: &[&str] = &[
    "shares",
    "period",
    "quota",
    "global_period",
    "global_quota",
    "emulator_period",
    "emulator_quota",
    "iothread_period",
    "iothread_quota",
    "vcpupin",
    "emulatorpin",
    "iothreadpin",
    "vcpusched",
    "iothreadsched",
    "emulatorsched",
    "cachetune",
    "memorytune",
];

/// libvirt's direct kernel boot: `<os><kernel>`, `<initrd>`, `<cmdline>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
}

/// A guest serial port whose output goes to a host file:
/// `<serial type='file'>`, or a `<console type='file'>` when the domain
/// has no `<serial>` (libvirt then gives the console a serial port of its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialFile {
    pub path: PathBuf,
    /// `<source append='on'>`: keep what the file holds.
    pub append: bool,
}

/// A domain definition. Everything Strata does not model is kept as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    root: Element,
}

impl Domain {
    /// Parses and checks the parts Strata depends on (root, name, UUID,
    /// disks, filesystems); nothing else is interpreted.
    pub fn parse(xml: &str) -> Result<Domain> {
        let root = Element::parse(xml)?;
        Domain::from_element(root)
    }

    pub fn from_element(root: Element) -> Result<Domain> {
        if root.name != "domain" {
            return Err(Error::xml(format!("expected a <domain> document, found <{}>", root.name)));
        }
        let dom = Domain { root };
        let name = dom.root.child_text("name").ok_or_else(|| Error::xml("the domain has no <name>"))?;
        crate::store::validate_name("domain", &name)?;
        if let Some(uuid) = dom.uuid() {
            uuid::Uuid::parse_str(&uuid)
                .map_err(|_| Error::xml(format!("domain '{name}' has an invalid UUID '{uuid}'")))?;
        }
        let disks = dom.disks()?;
        for (i, d) in disks.iter().enumerate() {
            if disks[..i].iter().any(|o| o.target == d.target) {
                return Err(Error::xml(format!("domain '{name}' has two disks with target '{}'", d.target)));
            }
        }
        if dom.current_vcpus() > dom.vcpus() {
            return Err(Error::xml(format!(
                "domain '{name}': maxvcpus must not be less than current vcpus ({} < {})",
                dom.vcpus(),
                dom.current_vcpus()
            )));
        }
        let filesystems = dom.filesystems()?;
        for (i, f) in filesystems.iter().enumerate() {
            if filesystems[..i].iter().any(|o| o.target == f.target) {
                return Err(Error::xml(format!("domain '{name}' has two filesystems with target dir '{}'", f.target)));
            }
        }
        dom.interfaces()?;
        Ok(dom)
    }

    pub fn element(&self) -> &Element {
        &self.root
    }

    /// The document, taken out without copying it.
    pub fn into_element(self) -> Element {
        self.root
    }

    pub fn name(&self) -> String {
        self.root.child_text("name").unwrap_or_default()
    }

    pub fn uuid(&self) -> Option<String> {
        self.root.child_text("uuid")
    }

    /// Gives the domain a UUID when it has none, as libvirt does on define.
    pub fn ensure_uuid(&mut self) -> String {
        if let Some(u) = self.uuid() {
            return u;
        }
        let u = uuid::Uuid::new_v4().to_string();
        self.set_uuid(&u);
        u
    }

    pub fn set_uuid(&mut self, uuid: &str) {
        self.root.replace_or_insert(Element::new("uuid").with_text(uuid), &["name", "uuid"]);
    }

    /// The `type` attribute: `kvm`, `qemu`, `lxc`, `vbox`, …
    pub fn domain_type(&self) -> Option<&str> {
        self.root.attr("type")
    }

    pub fn set_id(&mut self, id: Option<u32>) {
        match id {
            Some(id) => self.root.set_attr("id", id.to_string()),
            None => {
                self.root.remove_attr("id");
            }
        }
    }

    /// Maximum memory in KiB (`<memory unit=…>`).
    pub fn memory_kib(&self) -> Option<u64> {
        memory_in_kib(self.root.child("memory")?)
    }

    /// Current memory in KiB, defaulting to the maximum.
    pub fn current_memory_kib(&self) -> Option<u64> {
        self.root.child("currentMemory").and_then(memory_in_kib).or_else(|| self.memory_kib())
    }

    /// `<vcpu>N</vcpu>`: the most vCPUs the domain can have.
    pub fn vcpus(&self) -> u32 {
        self.root.child_text("vcpu").and_then(|v| v.parse().ok()).unwrap_or(1)
    }

    /// `<vcpu current='M'>`: the vCPUs the domain starts with, all of them
    /// when absent.
    pub fn current_vcpus(&self) -> u32 {
        let current = self.root.child("vcpu").and_then(|v| v.attr("current")?.parse().ok());
        current.unwrap_or_else(|| self.vcpus())
    }

    /// Sets `<vcpu>`'s maximum and current counts (made when missing), its
    /// other attributes kept; `current` is written only when it differs
    /// from the maximum, as libvirt writes it.
    pub fn set_vcpus(&mut self, maximum: u32, current: u32) {
        let mut vcpu = self.root.child("vcpu").cloned().unwrap_or_else(|| Element::new("vcpu"));
        vcpu.set_text(maximum.to_string());
        if current == maximum {
            vcpu.remove_attr("current");
        } else {
            vcpu.set_attr("current", current.to_string());
        }
        self.root.replace_or_insert(vcpu, DOMAIN_CHILD_ORDER);
    }

    /// `<vcpu cpuset='…'>`: the host CPUs every vCPU and the emulator may
    /// run on unless `<cputune>` pins them.
    pub fn vcpu_cpuset(&self) -> Option<String> {
        self.root.child("vcpu")?.attr("cpuset").map(str::to_string)
    }

    /// `<cputune><vcpupin vcpu='N' cpuset='…'/>`.
    pub fn vcpu_pin(&self, vcpu: u32) -> Option<String> {
        let cputune = self.root.child("cputune")?;
        let mut pins = cputune.children_named("vcpupin");
        let pin = pins.find(|pin| pin.attr("vcpu").and_then(|v| v.parse::<u32>().ok()) == Some(vcpu))?;
        pin.attr("cpuset").map(str::to_string)
    }

    /// `<cputune><emulatorpin cpuset='…'/>`.
    pub fn emulator_pin(&self) -> Option<String> {
        self.root.child("cputune")?.child("emulatorpin")?.attr("cpuset").map(str::to_string)
    }

    /// Records `<vcpupin vcpu='N' cpuset='…'/>` in `<cputune>` (made when
    /// missing), replacing the vCPU's earlier pin.
    pub fn set_vcpu_pin(&mut self, vcpu: u32, cpuset: &str) {
        let number = vcpu.to_string();
        self.edit_cputune(|cputune| {
            let earlier =
                cputune.elements_mut().find(|e| e.name == "vcpupin" && e.attr("vcpu") == Some(number.as_str()));
            match earlier {
                Some(pin) => pin.set_attr("cpuset", cpuset),
                None => cputune.insert_ordered(
                    Element::new("vcpupin").with_attr("vcpu", number.as_str()).with_attr("cpuset", cpuset),
                    CPUTUNE_CHILD_ORDER,
                ),
            }
        });
    }

    /// Records `<emulatorpin cpuset='…'/>` in `<cputune>` (made when missing).
    pub fn set_emulator_pin(&mut self, cpuset: &str) {
        let pin = Element::new("emulatorpin").with_attr("cpuset", cpuset);
        self.edit_cputune(|cputune| cputune.replace_or_insert(pin, CPUTUNE_CHILD_ORDER));
    }

    /// Changes `<cputune>`, made in libvirt's place when missing; its other
    /// children stay as written.
    fn edit_cputune(&mut self, change: impl FnOnce(&mut Element)) {
        let mut cputune = self.root.child("cputune").cloned().unwrap_or_else(|| Element::new("cputune"));
        change(&mut cputune);
        self.root.replace_or_insert(cputune, DOMAIN_CHILD_ORDER);
    }

    /// `<os><type>`: `hvm`, `exe`, …
    pub fn os_type(&self) -> String {
        self.root.child("os").and_then(|os| os.child_text("type")).unwrap_or_else(|| "hvm".to_string())
    }

    /// `<os><kernel>` with its `<initrd>` and `<cmdline>`, when the domain
    /// boots a kernel directly instead of through its firmware.
    pub fn kernel_boot(&self) -> Option<KernelBoot> {
        let os = self.root.child("os")?;
        let path = |name: &str| os.child_text(name).map(|t| PathBuf::from(t.trim()));
        Some(KernelBoot { kernel: path("kernel")?, initrd: path("initrd"), cmdline: os.child_text("cmdline") })
    }

    /// The serial ports written to host files, in the order `<devices>`
    /// lists them; a port of another type is not one of them.
    pub fn serial_files(&self) -> Vec<SerialFile> {
        let serials: Vec<&Element> = self.device_elements("serial").collect();
        let ports = if serials.is_empty() { self.device_elements("console").take(1).collect() } else { serials };
        ports
            .into_iter()
            .filter(|el| el.attr("type") == Some("file"))
            .filter_map(|el| {
                let source = el.child("source")?;
                Some(SerialFile {
                    path: PathBuf::from(source.attr("path")?),
                    append: source.attr("append") == Some("on"),
                })
            })
            .collect()
    }

    pub fn disks(&self) -> Result<Vec<Disk>> {
        self.device_elements("disk").map(Disk::from_element).collect()
    }

    /// Finds a disk as libvirt's `virDomainDiskByName` does, and exactly as
    /// permissively: a name without a leading `/` is a target (`vda`); one
    /// with it is the path of a disk's active image (not of a backing
    /// image, which libvirt does not match either), and names nothing when
    /// several disks have that image.
    pub fn find_disk(&self, name: &str) -> Result<Disk> {
        let disks = self.disks()?;
        let found: Vec<&Disk> = if name.starts_with('/') {
            let path = std::path::Path::new(name);
            disks.iter().filter(|d| d.source().and_then(|s| s.local_path()).is_some_and(|p| p == path)).collect()
        } else {
            disks.iter().filter(|d| d.target == name).take(1).collect()
        };
        match found.as_slice() {
            [disk] => Ok((*disk).clone()),
            _ => Err(Error::invalid_arg(format!(
                "no disk '{name}' in domain '{}'{} (its disks: {})",
                self.name(),
                if found.is_empty() { "" } else { ": several disks have that image" },
                disks.iter().map(|d| d.target.as_str()).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    pub fn filesystems(&self) -> Result<Vec<Filesystem>> {
        self.device_elements("filesystem").map(Filesystem::from_element).collect()
    }

    /// The network interfaces, in the order `<devices>` lists them.
    pub fn interfaces(&self) -> Result<Vec<Interface>> {
        self.device_elements("interface").enumerate().map(|(i, el)| Interface::from_element(el, i)).collect()
    }

    /// Records `mac` as the `<mac address>` of the `index`th interface.
    pub fn set_interface_mac(&mut self, index: usize, mac: &str) -> Result<()> {
        interface::write_mac(self.interface_mut(index)?, mac);
        Ok(())
    }

    /// Records `dev` as the `<target dev>` of the `index`th interface: the
    /// host device it runs on, as a live definition shows it.
    pub fn set_interface_target(&mut self, index: usize, dev: &str) -> Result<()> {
        interface::write_target(self.interface_mut(index)?, dev);
        Ok(())
    }

    /// Records `alias` as the `<alias name>` of the `index`th interface:
    /// the id of its device in the hypervisor, as a live definition shows it.
    pub fn set_interface_alias(&mut self, index: usize, alias: &str) -> Result<()> {
        interface::write_alias(self.interface_mut(index)?, alias);
        Ok(())
    }

    /// Adds an `<interface>` after the domain's last one (at the end of
    /// `<devices>` when it has none), as libvirt places an attached one.
    pub fn add_interface(&mut self, iface: Element) -> Result<()> {
        Interface::from_element(&iface, self.interfaces()?.len())?;
        if self.root.child("devices").is_none() {
            self.root.children.push(super::tree::Node::Element(Element::new("devices")));
        }
        let devices = self.root.child_mut("devices").ok_or_else(|| Error::internal("<devices> just added"))?;
        devices.insert_ordered(iface, &["interface"]);
        Ok(())
    }

    /// Removes the `index`th interface.
    pub fn remove_interface(&mut self, index: usize) -> Result<()> {
        let domain = self.name();
        let devices = self.root.child_mut("devices");
        let position = devices.as_ref().and_then(|d| {
            d.children
                .iter()
                .enumerate()
                .filter(|(_, n)| matches!(n, super::tree::Node::Element(e) if e.name == "interface"))
                .nth(index)
                .map(|(i, _)| i)
        });
        match (devices, position) {
            (Some(devices), Some(position)) => {
                devices.children.remove(position);
                Ok(())
            }
            _ => Err(Error::invalid_arg(format!("domain '{domain}' has no interface {}", index + 1))),
        }
    }

    fn interface_mut(&mut self, index: usize) -> Result<&mut Element> {
        let domain = self.name();
        self.root
            .child_mut("devices")
            .and_then(|devs| devs.elements_mut().filter(|e| e.name == "interface").nth(index))
            .ok_or_else(|| Error::invalid_arg(format!("domain '{domain}' has no interface {}", index + 1)))
    }

    fn device_elements<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.root.child("devices").into_iter().flat_map(move |d| d.children_named(kind))
    }

    /// The disks and filesystems, in the order `<devices>` lists them.
    pub fn storage_devices(&self) -> Result<Vec<StorageDevice>> {
        let devices = self.root.child("devices").into_iter().flat_map(|d| d.elements());
        devices
            .filter_map(|el| match el.name.as_ref() {
                "disk" => Some(Disk::from_element(el).map(StorageDevice::Disk)),
                "filesystem" => Some(Filesystem::from_element(el).map(StorageDevice::Filesystem)),
                _ => None,
            })
            .collect()
    }

    /// Finds the disk or filesystem `spec` names, as chains, snapshots,
    /// block jobs and disk sets address them:
    ///
    /// - `spec` is the target dir of a filesystem (`/`, `/data`, or a
    ///   mount tag such as `share`);
    /// - a `spec` without a leading `/` is the target of a disk (`vda`);
    /// - a `spec` with a leading `/` is the path of the active image of a
    ///   disk or a filesystem (not of a backing image).
    ///
    /// A `spec` starting with `/` is thus looked up first as a filesystem
    /// target dir, then as an image path. When these name more than one
    /// device (a filesystem mounted at `/data` and a disk whose image is
    /// `/data`), the spec is refused, naming every match; a device found
    /// both ways is one match. In a domain without filesystems this is
    /// [`Domain::find_disk`], errors included.
    pub fn find_storage_device(&self, spec: &str) -> Result<StorageDevice> {
        let filesystems = self.filesystems()?;
        if filesystems.is_empty() {
            return self.find_disk(spec).map(StorageDevice::Disk);
        }
        let disks = self.disks()?;
        let is_image =
            |source: Option<&crate::chain::StorageSource>| source.and_then(|s| s.local_path()) == Some(Path::new(spec));
        let mut found: Vec<(StorageDevice, &str)> = Vec::new();
        let mut add = |device: StorageDevice, how: &'static str| {
            if !found.iter().any(|(d, _)| d.address() == device.address()) {
                found.push((device, how));
            }
        };
        for f in filesystems.iter().filter(|f| f.target == spec) {
            add(StorageDevice::Filesystem(f.clone()), "the target dir");
        }
        if spec.starts_with('/') {
            for f in filesystems.iter().filter(|f| is_image(f.image())) {
                add(StorageDevice::Filesystem(f.clone()), "the active image");
            }
            for d in disks.iter().filter(|d| is_image(d.source())) {
                add(StorageDevice::Disk(d.clone()), "the active image");
            }
        } else {
            for d in disks.iter().filter(|d| d.target == spec) {
                add(StorageDevice::Disk(d.clone()), "the target");
            }
        }
        if found.len() == 1 {
            if let Some((device, _)) = found.pop() {
                return Ok(device);
            }
        }
        if found.is_empty() {
            let names = |names: Vec<&str>| names.join(", ");
            return Err(Error::invalid_arg(format!(
                "no disk or filesystem '{spec}' in domain '{}' (its disks: {}; its filesystems: {})",
                self.name(),
                names(disks.iter().map(|d| d.target.as_str()).collect()),
                names(filesystems.iter().map(|f| f.target.as_str()).collect()),
            )));
        }
        let matches: Vec<String> = found.iter().map(|(device, how)| format!("{how} of {device}")).collect();
        Err(Error::invalid_arg(format!(
            "'{spec}' names more than one storage device of domain '{}': it is {}",
            self.name(),
            matches.join(" and ")
        )))
    }

    /// The `<kind>` device whose `<target ATTR>` is `name` (a disk's `dev`,
    /// a filesystem's `dir`).
    fn device_element_mut(&mut self, kind: &str, attr: &str, name: &str) -> Result<&mut Element> {
        let domain = self.name();
        self.root
            .child_mut("devices")
            .and_then(|devs| {
                devs.elements_mut()
                    .find(|e| e.name == kind && e.child("target").and_then(|t| t.attr(attr)) == Some(name))
            })
            .ok_or_else(|| Error::invalid_arg(format!("no {kind} '{name}' in domain '{domain}'")))
    }

    fn disk_element_mut(&mut self, target: &str) -> Result<&mut Element> {
        self.device_element_mut("disk", "dev", target)
    }

    /// Records `chain` as the disk's active layer and backing stores.
    pub fn set_disk_chain(&mut self, target: &str, chain: &Chain) -> Result<()> {
        let el = self.disk_element_mut(target)?;
        disk::write_disk_chain(el, chain);
        Ok(())
    }

    /// Forgets the disk's recorded backing chain (it will be probed again).
    pub fn clear_disk_chain(&mut self, target: &str) -> Result<()> {
        let el = self.disk_element_mut(target)?;
        disk::clear_device_chain(el);
        Ok(())
    }

    /// Sets seed 004's `selected` attribute; `false` removes it (the default).
    pub fn set_disk_selected(&mut self, target: &str, selected: bool) -> Result<()> {
        let el = self.disk_element_mut(target)?;
        disk::write_selected(el, selected);
        Ok(())
    }

    fn filesystem_element_mut(&mut self, dir: &str) -> Result<&mut Element> {
        self.device_element_mut("filesystem", "dir", dir)
    }

    /// Records `chain` as the active layer and backing stores of the
    /// filesystem mounted at `dir`, which must hold an image (`file`,
    /// `block`, `volume`); its other children and attributes are kept.
    pub fn set_filesystem_chain(&mut self, dir: &str, chain: &Chain) -> Result<()> {
        filesystem::write_filesystem_chain(self.filesystem_element_mut(dir)?, chain)
    }

    /// Records `chain` for the device at `address` (a disk's or a
    /// filesystem's, see [`Domain::set_disk_chain`] and
    /// [`Domain::set_filesystem_chain`]).
    pub fn set_storage_chain(&mut self, address: &StorageAddress, chain: &Chain) -> Result<()> {
        match address {
            StorageAddress::Disk(target) => self.set_disk_chain(target, chain),
            StorageAddress::Filesystem(dir) => self.set_filesystem_chain(dir, chain),
        }
    }

    /// Forgets the recorded backing chain of the device at `address`.
    pub fn clear_storage_chain(&mut self, address: &StorageAddress) -> Result<()> {
        match address {
            StorageAddress::Disk(target) => self.clear_disk_chain(target),
            StorageAddress::Filesystem(dir) => {
                disk::clear_device_chain(self.filesystem_element_mut(dir)?);
                Ok(())
            }
        }
    }

    /// Puts the device at `address` in the disk set, or takes it out.
    pub fn set_storage_selected(&mut self, address: &StorageAddress, selected: bool) -> Result<()> {
        match address {
            StorageAddress::Disk(target) => self.set_disk_selected(target, selected),
            StorageAddress::Filesystem(dir) => {
                disk::write_selected(self.filesystem_element_mut(dir)?, selected);
                Ok(())
            }
        }
    }

    /// The element of the filesystem whose target dir is `name`, else of
    /// the disk whose target is `name` (a block job's device).
    fn storage_element_mut(&mut self, name: &str) -> Result<&mut Element> {
        if self.filesystems()?.iter().any(|f| f.target == name) {
            return self.filesystem_element_mut(name);
        }
        self.disk_element_mut(name)
    }

    /// Replaces or removes the `<mirror>` element of a block copy's device
    /// (a disk, or a filesystem by its target dir).
    pub fn set_storage_mirror(&mut self, name: &str, mirror: Option<Element>) -> Result<()> {
        let el = self.storage_element_mut(name)?;
        el.remove_children("mirror");
        if let Some(m) = mirror {
            el.insert_ordered(m, DISK_CHILD_ORDER);
        }
        Ok(())
    }

    /// Marks a device's block copy as in its mirroring phase (`ready='yes'`).
    pub fn set_mirror_ready(&mut self, name: &str) -> Result<()> {
        if let Some(m) = self.storage_element_mut(name)?.child_mut("mirror") {
            m.set_attr("ready", "yes");
        }
        Ok(())
    }

    pub fn to_xml(&self) -> String {
        self.root.to_xml()
    }

    /// Refuses the definition if `written`, its [`Domain::to_xml`], would be
    /// refused when read back (see [`Element::check_readable`]).
    pub fn check_readable(&self, written: &str) -> Result<()> {
        self.root.check_readable(written)
    }
}

fn memory_in_kib(el: &Element) -> Option<u64> {
    let value: u64 = el.text().trim().parse().ok()?;
    let factor: u64 = match el.attr("unit").unwrap_or("KiB") {
        "b" | "bytes" => return Some(value / 1024),
        "KB" => return Some(value * 1000 / 1024),
        "k" | "KiB" => 1,
        "MB" => return Some(value * 1_000_000 / 1024),
        "M" | "MiB" => 1024,
        "GB" => return Some(value * 1_000_000_000 / 1024),
        "G" | "GiB" => 1024 * 1024,
        "T" | "TiB" => 1024 * 1024 * 1024,
        _ => return None,
    };
    value.checked_mul(factor)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::Domain;
    use crate::chain::StorageSource;
    use crate::error::ErrorKind;
    use crate::xml::StorageAddress;

    fn domain(disks: &[(&str, &str)]) -> Domain {
        let disks: String = disks
            .iter()
            .map(|(target, file)| {
                format!(
                    "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{file}'/>\
                     <backingStore type='file'><format type='qcow2'/><source file='/img/base.qcow2'/><backingStore/></backingStore>\
                     <target dev='{target}'/></disk>"
                )
            })
            .collect();
        Domain::parse(&format!("<domain type='kvm'><name>vm</name><devices>{disks}</devices></domain>"))
            .expect("parses")
    }

    #[test]
    fn a_disk_is_found_as_libvirt_finds_it() {
        let dom = domain(&[("vda", "/img/a.qcow2"), ("vdb", "/img/b.qcow2")]);
        assert_eq!(dom.find_disk("vdb").expect("by target").target, "vdb");
        assert_eq!(dom.find_disk("/img/b.qcow2").expect("by active image").target, "vdb");
        // A name without a leading '/' is a target only; a backing image
        // is not the disk's source.
        assert!(dom.find_disk("img/b.qcow2").is_err());
        let err = dom.find_disk("/img/base.qcow2").expect_err("backing image");
        assert!(err.to_string().contains("no disk '/img/base.qcow2' in domain 'vm' (its disks: vda, vdb)"), "{err}");
    }

    #[test]
    fn an_image_two_disks_have_names_neither() {
        let dom = domain(&[("vda", "/img/shared.qcow2"), ("vdb", "/img/shared.qcow2")]);
        let err = dom.find_disk("/img/shared.qcow2").expect_err("ambiguous");
        assert!(err.to_string().contains("several disks have that image"), "{err}");
        assert_eq!(dom.find_disk("vdb").expect("by target").target, "vdb");
    }

    /// Disks `vda` (image `/img/a.qcow2`) and `vdb` (image `/data`), and
    /// filesystems `/` (image `/img/root.qcow2`), `/data` (a directory) and
    /// `share` (a virtiofs mount tag).
    fn mixed_domain() -> Domain {
        let xml = "<domain type='kvm'><name>mixed</name><devices>\
                   <disk type='file'><driver name='qemu' type='qcow2'/><source file='/img/a.qcow2'/><target dev='vda'/></disk>\
                   <filesystem type='file'><driver type='nbd' format='qcow2'/><source file='/img/root.qcow2'/>\
                   <target dir='/'/></filesystem>\
                   <disk type='file'><driver name='qemu' type='raw'/><source file='/data'/><target dev='vdb'/></disk>\
                   <filesystem type='mount'><source dir='/srv/data'/><target dir='/data'/></filesystem>\
                   <filesystem type='mount'><driver type='virtiofs'/><source dir='/srv/share'/><target dir='share'/></filesystem>\
                   </devices></domain>";
        Domain::parse(xml).expect("parses")
    }

    #[test]
    fn storage_devices_are_listed_in_device_order() {
        let names: Vec<String> =
            mixed_domain().storage_devices().expect("parse").iter().map(|d| d.to_string()).collect();
        assert_eq!(names, ["disk 'vda'", "filesystem '/'", "disk 'vdb'", "filesystem '/data'", "filesystem 'share'"]);
    }

    #[test]
    fn a_storage_device_is_found_by_target_target_dir_or_active_image() {
        let dom = mixed_domain();
        let found = |spec: &str| dom.find_storage_device(spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
        let vda = found("vda");
        assert_eq!(vda.address(), StorageAddress::Disk("vda".to_string()));
        assert_eq!(vda.as_disk().map(|d| d.target.as_str()), Some("vda"));
        assert_eq!(found("/img/a.qcow2").address(), StorageAddress::Disk("vda".to_string()), "by active image");
        let root = found("/");
        assert_eq!(root.address(), StorageAddress::Filesystem("/".to_string()));
        assert_eq!((root.format(), root.readonly(), root.selected()), (Some("qcow2"), false, false));
        assert_eq!(root.source().and_then(|s| s.local_path()), Some(Path::new("/img/root.qcow2")));
        assert_eq!(root.chain().map(|c| c.layers.len()), Some(1));
        assert_eq!(found("/img/root.qcow2").address(), root.address(), "a filesystem by its active image");
        let share = found("share");
        assert_eq!(share.as_filesystem().map(|f| f.target.as_str()), Some("share"), "a mount tag");
        assert_eq!((share.source(), share.chain()), (None, None), "a directory is no image");
    }

    #[test]
    fn a_spec_naming_two_storage_devices_is_refused_naming_both() {
        let dom = mixed_domain();
        let err = dom.find_storage_device("/data").expect_err("a filesystem's target dir and a disk's image");
        assert_eq!(err.kind(), ErrorKind::InvalidArg);
        assert!(
            err.to_string().contains(
                "'/data' names more than one storage device of domain 'mixed': it is the target dir of \
                 filesystem '/data' and the active image of disk 'vdb'"
            ),
            "{err}"
        );
        let xml = "<domain><name>tags</name><devices>\
                   <disk type='file'><source file='/img/a.raw'/><target dev='vda'/></disk>\
                   <filesystem><source dir='/srv'/><target dir='vda'/></filesystem></devices></domain>";
        let err = Domain::parse(xml).expect("parses").find_storage_device("vda").expect_err("a target and a tag");
        assert!(
            err.to_string().contains("it is the target dir of filesystem 'vda' and the target of disk 'vda'"),
            "{err}"
        );
        let err = dom.find_storage_device("/nowhere").expect_err("nothing there");
        assert!(
            err.to_string().contains(
                "no disk or filesystem '/nowhere' in domain 'mixed' (its disks: vda, vdb; its filesystems: /, /data, share)"
            ),
            "{err}"
        );
    }

    #[test]
    fn without_filesystems_a_storage_device_is_found_as_a_disk_is() {
        let dom = domain(&[("vda", "/img/shared.qcow2"), ("vdb", "/img/shared.qcow2"), ("vdc", "/img/c.qcow2")]);
        for spec in ["vdb", "/img/c.qcow2", "/img/shared.qcow2", "vdz", "/img/base.qcow2", "img/c.qcow2"] {
            let as_disk = dom.find_disk(spec).map(|d| d.target).map_err(|e| e.to_string());
            let as_device = dom.find_storage_device(spec).map(|d| d.name().to_string()).map_err(|e| e.to_string());
            assert_eq!(as_device, as_disk, "{spec}");
        }
    }

    #[test]
    fn a_filesystem_is_written_through_its_storage_address() {
        let mut dom = mixed_domain();
        let root = dom.find_storage_device("/").expect("found");
        let mut chain = root.chain().cloned().expect("a chain");
        let base = chain.push_backing(0, StorageSource::File { path: "/img/base.qcow2".into() }, Some("qcow2".into()));
        chain.end_at(base);
        chain.renumber();
        dom.set_storage_chain(&root.address(), &chain).expect("set");
        dom.set_storage_selected(&root.address(), true).expect("select");
        let root = dom.find_storage_device("/").expect("found");
        assert_eq!(root.chain(), Some(&chain));
        assert!(root.selected());
        let xml = dom.to_xml();
        assert!(xml.contains("<filesystem type='file' selected='yes'>"), "{xml}");
        assert!(xml.contains("<source file='/img/base.qcow2'/>"), "{xml}");
        dom.clear_storage_chain(&root.address()).expect("clear");
        dom.set_storage_selected(&root.address(), false).expect("deselect");
        assert_eq!(dom, mixed_domain(), "back to the document as written");
        let vda = dom.find_storage_device("vda").expect("found");
        dom.set_storage_selected(&vda.address(), true).expect("select a disk");
        assert!(dom.find_disk("vda").expect("found").selected);
    }

    #[test]
    fn pins_go_into_cputune_in_libvirt_order_keeping_what_was_there() {
        let xml = "<domain type='kvm'><name>vm</name><memory>1024</memory><vcpu cpuset='0-1'>2</vcpu>\
                   <os><type>hvm</type></os><devices><mystery a='1'/></devices></domain>";
        let mut dom = Domain::parse(xml).expect("parses");
        assert_eq!(dom.vcpu_cpuset().as_deref(), Some("0-1"));
        assert_eq!(dom.vcpu_pin(1), None);
        dom.set_vcpu_pin(1, "0");
        dom.set_emulator_pin("1");
        dom.set_vcpu_pin(0, "0,2");
        dom.set_vcpu_pin(1, "2");
        assert_eq!(dom.vcpu_pin(0).as_deref(), Some("0,2"));
        assert_eq!(dom.vcpu_pin(1).as_deref(), Some("2"));
        assert_eq!(dom.emulator_pin().as_deref(), Some("1"));
        let out = dom.to_xml();
        let at = |needle: &str| out.find(needle).unwrap_or_else(|| panic!("{needle} missing from {out}"));
        assert!(at("<vcpu cpuset") < at("<cputune>") && at("<cputune>") < at("<os>"), "{out}");
        assert!(at("<vcpupin vcpu='1' cpuset='2'/>") < at("<vcpupin vcpu='0'"), "{out}");
        assert!(at("<vcpupin vcpu='0' cpuset='0,2'/>") < at("<emulatorpin cpuset='1'/>"), "{out}");
        assert_eq!(out.matches("<vcpupin").count(), 2, "{out}");
        assert!(out.contains("<mystery a='1'/>"), "{out}");

        let tuned = "<domain type='kvm'><name>vm</name><vcpu>2</vcpu><cputune><shares>2048</shares>\
                     <emulatorpin cpuset='0'/></cputune></domain>";
        let mut dom = Domain::parse(tuned).expect("parses");
        dom.set_emulator_pin("1");
        dom.set_vcpu_pin(0, "1");
        let out = dom.to_xml();
        let at = |needle: &str| out.find(needle).unwrap_or_else(|| panic!("{needle} missing from {out}"));
        assert!(at("<shares>2048</shares>") < at("<vcpupin vcpu='0' cpuset='1'/>"), "{out}");
        assert!(at("<vcpupin vcpu='0'") < at("<emulatorpin cpuset='1'/>"), "{out}");
        assert_eq!(out.matches("<emulatorpin").count(), 1, "{out}");
    }

    #[test]
    fn vcpu_counts_keep_the_elements_attributes_and_current_above_maximum_is_refused() {
        let xml = "<domain type='kvm'><name>vm</name><vcpu placement='static' cpuset='0' current='1'>2</vcpu>\
                   <os><type>hvm</type></os></domain>";
        let mut dom = Domain::parse(xml).expect("parses");
        assert_eq!((dom.vcpus(), dom.current_vcpus()), (2, 1));
        dom.set_vcpus(2, 2);
        assert!(dom.to_xml().contains("<vcpu placement='static' cpuset='0'>2</vcpu>"), "{}", dom.to_xml());
        dom.set_vcpus(4, 3);
        assert!(dom.to_xml().contains("<vcpu placement='static' cpuset='0' current='3'>4</vcpu>"), "{}", dom.to_xml());

        let over = "<domain type='kvm'><name>vm</name><vcpu current='3'>2</vcpu></domain>";
        let err = Domain::parse(over).expect_err("current above the maximum");
        assert_eq!(err.kind(), crate::error::ErrorKind::XmlError);
        assert!(err.message().contains("maxvcpus must not be less than current vcpus (2 < 3)"), "{err}");
    }

    #[test]
    fn a_kernel_boot_and_file_serial_ports_are_read_and_a_console_counts_only_without_a_serial() {
        use super::SerialFile;
        use std::path::PathBuf;
        let xml = "<domain type='qemu'><name>vm</name><os><type>hvm</type><kernel> /g/vmlinuz </kernel>\
                   <initrd>/g/initrd.gz</initrd><cmdline>console=ttyS0 quiet</cmdline></os><devices>\
                   <serial type='file'><source path='/g/serial0.log' append='on'/><target port='0'/></serial>\
                   <serial type='pty'/><console type='file'><source path='/g/console.log'/></console>\
                   </devices></domain>";
        let dom = Domain::parse(xml).expect("parses");
        let boot = dom.kernel_boot().expect("a kernel boot");
        assert_eq!(boot.kernel, PathBuf::from("/g/vmlinuz"));
        assert_eq!(boot.initrd, Some(PathBuf::from("/g/initrd.gz")));
        assert_eq!(boot.cmdline.as_deref(), Some("console=ttyS0 quiet"));
        assert_eq!(dom.serial_files(), [SerialFile { path: PathBuf::from("/g/serial0.log"), append: true }]);

        let console_only = "<domain type='qemu'><name>vm</name><devices>\
                            <console type='file'><source path='/g/console.log'/></console></devices></domain>";
        let dom = Domain::parse(console_only).expect("parses");
        assert_eq!(dom.kernel_boot(), None);
        assert_eq!(dom.serial_files(), [SerialFile { path: PathBuf::from("/g/console.log"), append: false }]);
    }

    #[test]
    fn an_interface_is_added_after_the_last_one_and_removed_by_its_place_keeping_other_devices() {
        use super::Element;
        let xml = "<domain><name>vm</name><devices><disk type='file' device='disk'><source file='/i/a.qcow2'/>\
                   <target dev='vda'/></disk><interface type='user'/><video/></devices></domain>";
        let mut dom = Domain::parse(xml).expect("parses");
        let added = Element::parse("<interface type='network'><source network='n'/></interface>").expect("xml");
        dom.add_interface(added).expect("add");
        dom.set_interface_alias(1, "net1").expect("alias");
        let out = dom.to_xml();
        let at = |needle: &str| out.find(needle).unwrap_or_else(|| panic!("{needle} missing from {out}"));
        assert!(
            at("<interface type='user'/>") < at("<interface type='network'>")
                && at("<alias name='net1'/>") < at("<video/>"),
            "{out}"
        );
        dom.remove_interface(0).expect("remove");
        let types: Vec<String> = dom.interfaces().expect("interfaces").into_iter().map(|i| i.iface_type).collect();
        assert_eq!(types, ["network"]);
        assert!(dom.to_xml().contains("<video/>"));
        assert!(dom.remove_interface(3).expect_err("no fourth interface").to_string().contains("has no interface 4"));
        let bad = Element::parse("<interface type='user'><mac address='01:00:00:00:00:01'/></interface>").expect("xml");
        assert!(dom.add_interface(bad).is_err(), "a multicast MAC is refused before it is added");
    }
}
