//! `<disk>` and `<backingStore>`: the typed view Strata acts on, and the
//! patches it writes back into the lossless document.

use std::path::PathBuf;

use serde::Serialize;

use super::tree::Element;
use crate::chain::{Backing, Chain, Layer, NetworkHost, NetworkSource, NvmeSource, PciAddress, Slice, StorageSource};
use crate::error::{Error, Result};

/// libvirt's order of `<disk>` children; Strata inserts what it writes at
/// these places and leaves every other child where it was.
pub const DISK_CHILD_ORDER: &[&str] = &[
    "driver",
    "auth",
    "source",
    "backingStore",
    "geometry",
    "blockio",
    "mirror",
    "target",
    "iotune",
    "readonly",
    "shareable",
    "transient",
    "serial",
    "wwn",
    "vendor",
    "product",
    "encryption",
    "boot",
    "alias",
    "address",
];

const BACKING_CHILD_ORDER: &[&str] = &["format", "source", "backingStore"];

/// A block copy in progress (`<mirror>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mirror {
    pub job: Option<String>,
    pub ready: Option<String>,
    pub chain: Chain,
}

/// What Strata reads from a `<disk>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Disk {
    /// `file`, `block`, `network`, `volume` or `dir`.
    pub disk_type: String,
    /// `disk`, `cdrom`, `floppy` or `lun`.
    pub device: String,
    pub driver_name: Option<String>,
    /// `<driver type>`, the format of the active layer.
    pub format: Option<String>,
    pub target: String,
    pub bus: Option<String>,
    /// The active layer and what is known below it; `None` for an empty drive.
    pub chain: Option<Chain>,
    pub mirror: Option<Mirror>,
    pub readonly: bool,
    pub shareable: bool,
    pub transient: bool,
    /// Seed 004's disk-set membership.
    pub selected: bool,
}

impl Disk {
    pub fn from_element(el: &Element) -> Result<Disk> {
        let disk_type = el.attr("type").unwrap_or("file").to_string();
        let device = el.attr("device").unwrap_or("disk").to_string();
        let target_el = el.child("target").ok_or_else(|| Error::xml("a <disk> has no <target>"))?;
        let target =
            target_el.attr("dev").ok_or_else(|| Error::xml("a <disk> <target> has no 'dev' attribute"))?.to_string();
        let driver = el.child("driver");
        let format = driver.and_then(|d| d.attr("type")).map(str::to_string);
        let chain =
            read_device_chain(el, &disk_type, format.clone()).map_err(|e| e.context(format!("disk '{target}'")))?;
        let mirror = match el.child("mirror") {
            None => None,
            Some(m) => Some(parse_mirror(m).map_err(|e| e.context(format!("disk '{target}' <mirror>")))?),
        };
        let selected = read_selected(el, &format!("disk '{target}'"))?;
        // libvirt 7.4's shareBacking: several domains may run on the image
        // at once. A driver that opens the image read-only allows that for
        // every transient disk, so only the value is checked here.
        if let Some(share) = el.child("transient").and_then(|t| t.attr("shareBacking")) {
            if share != "yes" && share != "no" {
                return Err(Error::xml(format!(
                    "disk '{target}' has <transient shareBacking='{share}'>; expected 'yes' or 'no'"
                )));
            }
        }
        Ok(Disk {
            disk_type,
            device,
            driver_name: driver.and_then(|d| d.attr("name")).map(str::to_string),
            format,
            bus: target_el.attr("bus").map(str::to_string),
            target,
            chain,
            mirror,
            readonly: el.child("readonly").is_some(),
            shareable: el.child("shareable").is_some(),
            transient: el.child("transient").is_some(),
            selected,
        })
    }

    /// The active layer's source.
    pub fn source(&self) -> Option<&StorageSource> {
        self.chain.as_ref().and_then(|c| c.top()).map(|l| &l.source)
    }

    /// Refuses `operations` (`snapshots`, `block jobs`, …) on a transient
    /// disk, in libvirt's words: what the guest writes to it lives in a
    /// throwaway overlay, so there is nothing to keep, merge or copy.
    pub fn refuse_if_transient(&self, operations: &str) -> Result<()> {
        if !self.transient {
            return Ok(());
        }
        Err(Error::config_unsupported(format!(
            "transient disk '{}' does not support {operations}: the guest's writes to it go to a throwaway \
             overlay that is removed when the domain stops",
            self.target
        )))
    }
}

fn parse_mirror(m: &Element) -> Result<Mirror> {
    let kind = m.attr("type").unwrap_or("file");
    // Old-style mirrors carry file= and format= attributes directly.
    let source = match m.attr("file") {
        Some(f) => Some(StorageSource::File { path: PathBuf::from(f) }),
        None => parse_source(kind, m.child("source"))?,
    };
    let source = source.ok_or_else(|| Error::xml("a <mirror> has no source"))?;
    let format = m.child("format").and_then(|f| f.attr("type")).or_else(|| m.attr("format")).map(str::to_string);
    let mut chain = Chain::single(source, format);
    read_backing(m, &mut chain, 0)?;
    chain.renumber();
    Ok(Mirror { job: m.attr("job").map(str::to_string), ready: m.attr("ready").map(str::to_string), chain })
}

/// The chain of a device element (`<disk>`, `<filesystem>`) whose
/// `<source>` is of storage type `kind` (`file`, `block`, `volume`, …) and
/// whose active layer has `format`: the active layer and what the
/// `<backingStore>` children say lies below it. `None` when the element
/// names no image (an empty drive).
pub(crate) fn read_device_chain(el: &Element, kind: &str, format: Option<String>) -> Result<Option<Chain>> {
    let Some(source) = parse_source(kind, el.child("source"))? else { return Ok(None) };
    let mut chain = Chain::single(source, format);
    chain.layers[0].slice = parse_slice(el.child("source"))?;
    read_backing(el, &mut chain, 0)?;
    chain.renumber();
    Ok(Some(chain))
}

/// Seed 004's disk-set membership of a device element, `what` naming it
/// (`disk 'vda'`): `selected='yes'`, or `no` and absent for not selected.
pub(crate) fn read_selected(el: &Element, what: &str) -> Result<bool> {
    match el.attr("selected") {
        None | Some("no") => Ok(false),
        Some("yes") => Ok(true),
        Some(other) => Err(Error::xml(format!("{what} has selected='{other}'; expected 'yes' or 'no'"))),
    }
}

/// Records seed 004's disk-set membership on a device element; `false`
/// removes the attribute (the default).
pub(crate) fn write_selected(el: &mut Element, selected: bool) {
    if selected {
        el.set_attr("selected", "yes");
    } else {
        el.remove_attr("selected");
    }
}

/// Reads the `<backingStore>` children of `el` into `chain` below `layer`,
/// iteratively (chains may be very deep).
fn read_backing(el: &Element, chain: &mut Chain, layer: usize) -> Result<()> {
    let mut stack: Vec<(&Element, usize)> = vec![(el, layer)];
    while let Some((parent_el, parent_id)) = stack.pop() {
        let stores: Vec<&Element> = parent_el.children_named("backingStore").collect();
        if stores.is_empty() {
            continue; // no element: chain unknown below here
        }
        for store in stores {
            let Some(kind) = store.attr("type") else {
                if store.elements().next().is_some() {
                    return Err(Error::xml("a <backingStore> with content needs a 'type' attribute"));
                }
                chain.end_at(parent_id);
                continue;
            };
            let source = parse_source(kind, store.child("source"))?
                .ok_or_else(|| Error::xml("a <backingStore> has no <source>"))?;
            let format = store.child("format").and_then(|f| f.attr("type")).map(str::to_string);
            let id = chain.push_backing(parent_id, source, format);
            chain.layers[id].slice = parse_slice(store.child("source"))?;
            stack.push((store, id));
        }
    }
    Ok(())
}

/// Parses a `<source>` for a disk or backing store of type `kind`.
pub fn parse_source(kind: &str, el: Option<&Element>) -> Result<Option<StorageSource>> {
    let Some(el) = el else { return Ok(None) };
    let need = |attr: &str| -> Result<String> {
        el.attr(attr)
            .map(str::to_string)
            .ok_or_else(|| Error::xml(format!("a {kind} <source> needs a '{attr}' attribute")))
    };
    Ok(Some(match kind {
        "file" => match el.attr("file") {
            Some(f) => StorageSource::File { path: PathBuf::from(f) },
            None => return Ok(None), // an empty cdrom
        },
        "block" => match el.attr("dev") {
            Some(d) => StorageSource::Block { dev: PathBuf::from(d) },
            None => return Ok(None),
        },
        "dir" => StorageSource::Dir { dir: PathBuf::from(need("dir")?) },
        "volume" => StorageSource::Volume { pool: need("pool")?, volume: need("volume")? },
        "network" => StorageSource::Network(Box::new(parse_network_source(el, need("protocol")?)?)),
        "nvme" => StorageSource::Nvme(parse_nvme_source(el)?),
        "vhostuser" => StorageSource::VhostUser { socket: PathBuf::from(need("path")?) },
        "vhostvdpa" => StorageSource::VhostVdpa { dev: PathBuf::from(need("dev")?) },
        other => {
            return Err(Error::xml(format!(
                "disk type '{other}' is not one of libvirt's (file, block, dir, network, volume, nvme, vhostuser, \
                 vhostvdpa)"
            )))
        }
    }))
}

fn number_attr<T: std::str::FromStr>(el: &Element, attr: &str) -> Result<Option<T>> {
    el.attr(attr)
        .map(|v| v.parse::<T>().map_err(|_| Error::xml(format!("<{} {attr}='{v}'> is not a valid number", el.name))))
        .transpose()
}

fn parse_network_source(el: &Element, protocol: String) -> Result<NetworkSource> {
    let hosts = el
        .children_named("host")
        .map(|h| {
            Ok(NetworkHost {
                name: h.attr("name").map(str::to_string),
                port: number_attr::<u16>(h, "port")?,
                transport: h.attr("transport").map(str::to_string),
                socket: h.attr("socket").map(str::to_string),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let child_attr = |child: &str, attr: &str| el.child(child).and_then(|c| c.attr(attr)).map(str::to_string);
    let ssl_verify = match child_attr("ssl", "verify").as_deref() {
        None => None,
        Some("yes") => Some(true),
        Some("no") => Some(false),
        Some(other) => return Err(Error::xml(format!("<ssl verify='{other}'> is not 'yes' or 'no'"))),
    };
    let cookies = el
        .child("cookies")
        .map(|c| {
            c.children_named("cookie")
                .map(|k| {
                    let name = k.attr("name").ok_or_else(|| Error::xml("a <cookie> has no 'name' attribute"))?;
                    Ok((name.to_string(), k.text()))
                })
                .collect::<Result<Vec<_>>>()
        })
        .transpose()?
        .unwrap_or_default();
    let identity = el.child("identity").and_then(|i| Some((i.attr("user")?.to_string(), i.attr("group")?.to_string())));
    Ok(NetworkSource {
        protocol,
        name: el.attr("name").map(str::to_string),
        query: el.attr("query").map(str::to_string),
        hosts,
        snapshot: child_attr("snapshot", "name"),
        config_file: child_attr("config", "file"),
        ssl_verify,
        cookies,
        readahead: el.child("readahead").map(|r| number_attr::<u64>(r, "size")).transpose()?.flatten(),
        timeout: el.child("timeout").map(|t| number_attr::<u64>(t, "seconds")).transpose()?.flatten(),
        identity,
    })
}

fn parse_nvme_source(el: &Element) -> Result<NvmeSource> {
    if el.attr("type") != Some("pci") {
        return Err(Error::xml("an nvme <source> needs type='pci'"));
    }
    let namespace = number_attr::<u64>(el, "namespace")?
        .filter(|n| *n > 0)
        .ok_or_else(|| Error::xml("an nvme <source> needs a positive 'namespace'"))?;
    let address = el.child("address").ok_or_else(|| Error::xml("an nvme <source> needs an <address>"))?;
    let part = |attr: &str| -> Result<u32> {
        let v = address.attr(attr).unwrap_or("0");
        let digits = v.strip_prefix("0x").unwrap_or(v);
        u32::from_str_radix(digits, 16)
            .map_err(|_| Error::xml(format!("nvme <address {attr}='{v}'> is not a hexadecimal number")))
    };
    Ok(NvmeSource {
        address: PciAddress {
            domain: part("domain")?,
            bus: part("bus")?,
            slot: part("slot")?,
            function: part("function")?,
        },
        namespace,
        managed: el.attr("managed").map(str::to_string),
    })
}

/// The `<slices>` of a `<source>`: the storage slice, when there is one.
fn parse_slice(source: Option<&Element>) -> Result<Option<Slice>> {
    let Some(slice) = source
        .and_then(|s| s.child("slices"))
        .and_then(|s| s.children_named("slice").find(|c| c.attr("type") == Some("storage")))
    else {
        return Ok(None);
    };
    Ok(Some(Slice {
        offset: number_attr::<u64>(slice, "offset")?.unwrap_or(0),
        size: number_attr::<u64>(slice, "size")?,
    }))
}

/// A `<source>` element for `source`.
pub fn source_element(source: &StorageSource) -> Element {
    let el = Element::new("source");
    match source {
        StorageSource::File { path } => el.with_attr("file", path.to_string_lossy()),
        StorageSource::Block { dev } | StorageSource::VhostVdpa { dev } => el.with_attr("dev", dev.to_string_lossy()),
        StorageSource::Dir { dir } => el.with_attr("dir", dir.to_string_lossy()),
        StorageSource::Volume { pool, volume } => {
            el.with_attr("pool", pool.clone()).with_attr("volume", volume.clone())
        }
        StorageSource::VhostUser { socket } => el.with_attr("type", "unix").with_attr("path", socket.to_string_lossy()),
        StorageSource::Nvme(n) => {
            let mut el = el.with_attr("type", "pci");
            if let Some(managed) = &n.managed {
                el.set_attr("managed", managed.clone());
            }
            let a = n.address;
            el.with_attr("namespace", n.namespace.to_string()).with_child(
                Element::new("address")
                    .with_attr("domain", format!("0x{:04x}", a.domain))
                    .with_attr("bus", format!("0x{:02x}", a.bus))
                    .with_attr("slot", format!("0x{:02x}", a.slot))
                    .with_attr("function", format!("0x{:x}", a.function)),
            )
        }
        StorageSource::Network(n) => network_source_element(el, n),
    }
}

/// libvirt's layout of a network `<source>`: its attributes, the hosts,
/// then the other children in the order libvirt writes them.
fn network_source_element(el: Element, n: &NetworkSource) -> Element {
    let mut el = el.with_attr("protocol", n.protocol.clone());
    if let Some(name) = &n.name {
        el.set_attr("name", name.clone());
    }
    if let Some(query) = &n.query {
        el.set_attr("query", query.clone());
    }
    for h in &n.hosts {
        let mut host = Element::new("host");
        if let Some(t) = &h.transport {
            host.set_attr("transport", t.clone());
        }
        if let Some(name) = &h.name {
            host.set_attr("name", name.clone());
        }
        if let Some(p) = h.port {
            host.set_attr("port", p.to_string());
        }
        if let Some(s) = &h.socket {
            host.set_attr("socket", s.clone());
        }
        el = el.with_child(host);
    }
    if let Some(snapshot) = &n.snapshot {
        el = el.with_child(Element::new("snapshot").with_attr("name", snapshot.clone()));
    }
    if let Some(file) = &n.config_file {
        el = el.with_child(Element::new("config").with_attr("file", file.clone()));
    }
    if let Some(verify) = n.ssl_verify {
        el = el.with_child(Element::new("ssl").with_attr("verify", if verify { "yes" } else { "no" }));
    }
    if !n.cookies.is_empty() {
        let mut cookies = Element::new("cookies");
        for (name, value) in &n.cookies {
            cookies =
                cookies.with_child(Element::new("cookie").with_attr("name", name.clone()).with_text(value.clone()));
        }
        el = el.with_child(cookies);
    }
    if let Some(size) = n.readahead {
        el = el.with_child(Element::new("readahead").with_attr("size", size.to_string()));
    }
    if let Some(seconds) = n.timeout {
        el = el.with_child(Element::new("timeout").with_attr("seconds", seconds.to_string()));
    }
    if let Some((user, group)) = &n.identity {
        el = el.with_child(Element::new("identity").with_attr("user", user.clone()).with_attr("group", group.clone()));
    }
    el
}

/// The `<source>` of a chain layer: its storage and its slice.
pub fn layer_source_element(layer: &Layer) -> Element {
    let mut el = source_element(&layer.source);
    if let Some(slice) = layer.slice {
        let mut storage =
            Element::new("slice").with_attr("type", "storage").with_attr("offset", slice.offset.to_string());
        if let Some(size) = slice.size {
            storage.set_attr("size", size.to_string());
        }
        el = el.with_child(Element::new("slices").with_child(storage));
    }
    el
}

/// The `<backingStore>` element(s) for what lies below `layer`: empty when
/// the chain ends there, none when it is unknown. Built bottom-up so that no
/// step recurses.
pub fn backing_elements(chain: &Chain, layer: usize) -> Vec<Element> {
    let n = chain.layers.len();
    // Pre-order ids: children always come after their parent in `walk`, so
    // building in reverse walk order finds every child already built.
    let order = chain.walk();
    let mut built: Vec<Option<Element>> = (0..n).map(|_| None).collect();
    let below = |id: usize, built: &mut Vec<Option<Element>>| -> Vec<Element> {
        match &chain.layers[id].backing {
            Backing::Unknown => Vec::new(),
            Backing::End => vec![Element::new("backingStore")],
            Backing::Layers(v) => v.iter().filter_map(|c| built.get_mut(*c).and_then(Option::take)).collect(),
        }
    };
    for &(id, _) in order.iter().rev() {
        if id == layer {
            break;
        }
        let l = &chain.layers[id];
        let mut el = Element::new("backingStore").with_attr("type", l.source.type_name());
        if l.index > 0 {
            el.set_attr("index", l.index.to_string());
        }
        if let Some(f) = &l.format {
            el.insert_ordered(Element::new("format").with_attr("type", f.clone()), BACKING_CHILD_ORDER);
        }
        el.insert_ordered(layer_source_element(l), BACKING_CHILD_ORDER);
        for child in below(id, &mut built) {
            el.children.push(super::tree::Node::Element(child));
        }
        built[id] = Some(el);
    }
    below(layer, &mut built)
}

/// Writes `chain` into a `<disk>` element: the active source, the driver
/// format, and the backing stores; everything else in the disk is kept.
pub fn write_disk_chain(disk: &mut Element, chain: &Chain) {
    let Some(top) = chain.top() else { return };
    disk.set_attr("type", top.source.type_name());
    if let Some(fmt) = &top.format {
        match disk.child_mut("driver") {
            Some(d) => d.set_attr("type", fmt.clone()),
            None => disk.insert_ordered(
                Element::new("driver").with_attr("name", "qemu").with_attr("type", fmt.clone()),
                DISK_CHILD_ORDER,
            ),
        }
    }
    write_device_chain(disk, chain, DISK_CHILD_ORDER);
}

/// Writes `chain` into a device element (`<disk>`, `<filesystem>`): the
/// active layer's location into `<source>` and the layers below it as
/// `<backingStore>` children, inserted where `order` (the element's child
/// order) puts them. The element's type and format attributes are the
/// caller's, as disks and filesystems name them differently.
pub(crate) fn write_device_chain(device: &mut Element, chain: &Chain, order: &[&str]) {
    let Some(top) = chain.top() else { return };
    // Keep attributes and children of an existing <source> (startupPolicy,
    // seclabels, …) that Strata does not model; replace only the location.
    let mut new_source = layer_source_element(top);
    if let Some(old) = device.child("source") {
        for (k, v) in &old.attrs {
            if !matches!(
                k.as_ref(),
                "file"
                    | "dev"
                    | "dir"
                    | "pool"
                    | "volume"
                    | "protocol"
                    | "name"
                    | "query"
                    | "type"
                    | "path"
                    | "namespace"
                    | "managed"
                    | "index"
            ) {
                new_source.set_attr(k, v.clone());
            }
        }
        // Children the new source writes itself (hosts, slices, …) replace
        // the old ones; the others (seclabels, auth, …) are kept.
        let written: Vec<&str> = new_source.elements().map(|e| e.name.as_ref()).collect();
        let keep: Vec<super::tree::Node> = old
            .children
            .iter()
            .filter(|n| !matches!(n, super::tree::Node::Element(e) if e.name == "host" || written.contains(&e.name.as_ref())))
            .cloned()
            .collect();
        new_source.children.extend(keep);
    }
    device.replace_or_insert(new_source, order);
    device.remove_children("backingStore");
    for el in backing_elements(chain, 0) {
        device.insert_ordered(el, order);
    }
}

/// Removes the recorded backing chain from a device element (`<disk>`,
/// `<filesystem>`): the chain is unknown.
pub(crate) fn clear_device_chain(device: &mut Element) {
    device.remove_children("backingStore");
}
