//! `<disk>` and `<backingStore>`: the typed view Strata acts on, and the
//! patches it writes back into the lossless document.

use std::path::PathBuf;

use serde::Serialize;

use super::tree::Element;
use crate::chain::{Backing, Chain, NetworkHost, NetworkSource, StorageSource};
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
            match parse_source(&disk_type, el.child("source")).map_err(|e| e.context(format!("disk '{target}'")))? {
                None => None,
                Some(source) => {
                    let mut chain = Chain::single(source, format.clone());
                    read_backing(el, &mut chain, 0).map_err(|e| e.context(format!("disk '{target}'")))?;
                    chain.renumber();
                    Some(chain)
                }
            };
        let mirror = match el.child("mirror") {
            None => None,
            Some(m) => Some(parse_mirror(m).map_err(|e| e.context(format!("disk '{target}' <mirror>")))?),
        };
        let selected = match el.attr("selected") {
            None | Some("no") => false,
            Some("yes") => true,
            Some(other) => {
                return Err(Error::xml(format!("disk '{target}' has selected='{other}'; expected 'yes' or 'no'")))
            }
        };
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
        "network" => {
            let hosts = el
                .children_named("host")
                .map(|h| {
                    let port = match h.attr("port") {
                        None => Ok(None),
                        Some(p) => p
                            .parse::<u16>()
                            .map(Some)
                            .map_err(|_| Error::xml(format!("host port '{p}' is not a port number"))),
                    }?;
                    Ok(NetworkHost {
                        name: h.attr("name").map(str::to_string),
                        port,
                        transport: h.attr("transport").map(str::to_string),
                        socket: h.attr("socket").map(str::to_string),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            StorageSource::Network(NetworkSource {
                protocol: need("protocol")?,
                name: el.attr("name").map(str::to_string),
                hosts,
            })
        }
        other => {
            return Err(Error::xml(format!(
                "disk type '{other}' is not supported (expected file, block, network, volume or dir)"
            )))
        }
    }))
}

/// A `<source>` element for `source`.
pub fn source_element(source: &StorageSource) -> Element {
    let el = Element::new("source");
    match source {
        StorageSource::File { path } => el.with_attr("file", path.to_string_lossy()),
        StorageSource::Block { dev } => el.with_attr("dev", dev.to_string_lossy()),
        StorageSource::Dir { dir } => el.with_attr("dir", dir.to_string_lossy()),
        StorageSource::Volume { pool, volume } => {
            el.with_attr("pool", pool.clone()).with_attr("volume", volume.clone())
        }
        StorageSource::Network(n) => {
            let mut el = el.with_attr("protocol", n.protocol.clone());
            if let Some(name) = &n.name {
                el.set_attr("name", name.clone());
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
                el.children.push(super::tree::Node::Element(host));
            }
            el
        }
    }
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
        el.insert_ordered(source_element(&l.source), BACKING_CHILD_ORDER);
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
    // Keep attributes and children of an existing <source> (startupPolicy,
    // seclabels, …) that Strata does not model; replace only the location.
    let mut new_source = source_element(&top.source);
    if let Some(old) = disk.child("source") {
        for (k, v) in &old.attrs {
            if !matches!(k.as_str(), "file" | "dev" | "dir" | "pool" | "volume" | "protocol" | "name" | "index") {
                new_source.set_attr(k, v.clone());
            }
        }
        let keep: Vec<super::tree::Node> = old
            .children
            .iter()
            .filter(|n| !matches!(n, super::tree::Node::Element(e) if e.name == "host"))
            .cloned()
            .collect();
        new_source.children.extend(keep);
    }
    disk.replace_or_insert(new_source, DISK_CHILD_ORDER);
    disk.remove_children("backingStore");
    for el in backing_elements(chain, 0) {
        disk.insert_ordered(el, DISK_CHILD_ORDER);
    }
}

/// Removes the recorded backing chain from a `<disk>`: the chain is unknown.
pub fn clear_disk_chain(disk: &mut Element) {
    disk.remove_children("backingStore");
}
