//! `<filesystem>`: the typed view of a filesystem device (an LXC root, a
//! virtiofs share, …) and the patches Strata writes back into it.
//!
//! Like [`Disk`](super::Disk), the view reads what Strata acts on and
//! leaves the document as written: `model`, `multidevs`, `fmode`, `<binary>`,
//! `<address>`, … are kept, unread. An image-backed filesystem (`file`,
//! `block`, `volume`) has a chain, recorded as nested `<backingStore>`
//! elements exactly as a disk's is (a Strata extension: libvirt's schema has
//! no `<backingStore>` under `<filesystem>`).

use std::fmt;
use std::path::PathBuf;

use serde::{Serialize, Serializer};

use super::disk::{read_device_chain, read_selected, write_device_chain};
use super::tree::Element;
use crate::chain::{Chain, StorageSource};
use crate::error::{Error, Result};

/// libvirt's order of `<filesystem>` children; Strata inserts what it
/// writes at these places and leaves every other child where it was.
pub const FILESYSTEM_CHILD_ORDER: &[&str] = &[
    "driver",
    "binary",
    "source",
    "backingStore",
    "target",
    "readonly",
    "boot",
    "alias",
    "acpi",
    "address",
    "space_hard_limit",
    "space_soft_limit",
];

/// The `type` of a `<filesystem>` (libvirt's default is `mount`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilesystemType {
    /// A host directory (9p, virtiofs, or an LXC bind mount of it).
    Mount,
    /// A host block device holding a filesystem.
    Block,
    /// A host file holding a filesystem image (LXC mounts it through a loop
    /// or nbd device).
    File,
    /// A storage pool's volume.
    Volume,
    /// A filesystem in host memory.
    Ram,
    /// A guest directory bound to another guest path.
    Bind,
    /// An OpenVZ template.
    Template,
    /// A type libvirt does not have (yet): kept as written; operations that
    /// need to understand it refuse it.
    Other(String),
}

impl FilesystemType {
    fn parse(name: &str) -> FilesystemType {
        match name {
            "mount" => FilesystemType::Mount,
            "block" => FilesystemType::Block,
            "file" => FilesystemType::File,
            "volume" => FilesystemType::Volume,
            "ram" => FilesystemType::Ram,
            "bind" => FilesystemType::Bind,
            "template" => FilesystemType::Template,
            other => FilesystemType::Other(other.to_string()),
        }
    }

    /// The name libvirt writes in `type`.
    pub fn as_str(&self) -> &str {
        match self {
            FilesystemType::Mount => "mount",
            FilesystemType::Block => "block",
            FilesystemType::File => "file",
            FilesystemType::Volume => "volume",
            FilesystemType::Ram => "ram",
            FilesystemType::Bind => "bind",
            FilesystemType::Template => "template",
            FilesystemType::Other(name) => name,
        }
    }

    /// Whether a filesystem of this type holds an image, and so a chain.
    pub fn holds_image(&self) -> bool {
        matches!(self, FilesystemType::File | FilesystemType::Block | FilesystemType::Volume)
    }

    /// The filesystem type whose `<source>` names `source`, for the types
    /// that hold an image (and so a chain).
    fn of_image(source: &StorageSource) -> Option<FilesystemType> {
        match source {
            StorageSource::File { .. } => Some(FilesystemType::File),
            StorageSource::Block { .. } => Some(FilesystemType::Block),
            StorageSource::Volume { .. } => Some(FilesystemType::Volume),
            _ => None,
        }
    }
}

impl fmt::Display for FilesystemType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for FilesystemType {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// `<driver type=… format=… wrpolicy=…/>`; every field is `None` when the
/// element or the attribute is absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FilesystemDriver {
    /// `loop`, `nbd`, `ploop` (image filesystems), `path`, `handle`
    /// (9p), `virtiofs`.
    pub driver_type: Option<String>,
    /// The image format of an image filesystem: `raw`, `qcow2`, …
    pub format: Option<String>,
    /// `immediate`: host writeback on every guest write.
    pub wrpolicy: Option<String>,
}

/// What a `<filesystem>`'s `<source>` names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum FilesystemSource {
    /// `file`, `block`, `volume`: an image or device, the active layer of
    /// the filesystem's chain.
    Image(StorageSource),
    /// `mount`, `bind`: a directory (on the host for `mount`).
    Dir(PathBuf),
    /// `mount` served by a virtiofsd that is already running.
    Socket(PathBuf),
    /// `ram`: `usage` in `units` (libvirt's default is KiB).
    Ram { usage: u64, units: Option<String> },
    /// `template`: the OpenVZ template's name.
    Template(String),
}

/// What Strata reads from a `<filesystem>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Filesystem {
    pub fs_type: FilesystemType,
    /// `passthrough`, `mapped`, `squash`.
    pub accessmode: Option<String>,
    pub driver: FilesystemDriver,
    /// `None` only for a type Strata does not know.
    pub source: Option<FilesystemSource>,
    /// `<target dir>`: where the guest sees it (`/`, `/data`), or a
    /// virtiofs/9p mount tag. The filesystem's address.
    pub target: String,
    pub readonly: bool,
    /// The active layer and what is known below it, for a filesystem that
    /// holds an image (`file`, `block`, `volume`); `None` for the others.
    pub chain: Option<Chain>,
    /// Seed 004's disk-set membership (`selected='yes'`).
    pub selected: bool,
}

impl Filesystem {
    pub fn from_element(el: &Element) -> Result<Filesystem> {
        let target = el
            .child("target")
            .and_then(|t| t.attr("dir"))
            .ok_or_else(|| Error::xml("a <filesystem> has no <target dir>"))?
            .to_string();
        let what = format!("filesystem '{target}'");
        let fs_type = FilesystemType::parse(el.attr("type").unwrap_or("mount"));
        let driver = el
            .child("driver")
            .map(|d| FilesystemDriver {
                driver_type: d.attr("type").map(str::to_string),
                format: d.attr("format").map(str::to_string),
                wrpolicy: d.attr("wrpolicy").map(str::to_string),
            })
            .unwrap_or_default();
        let source_el = el.child("source");
        let source_attr = |attr: &str| -> Result<String> {
            source_el
                .and_then(|s| s.attr(attr))
                .map(str::to_string)
                .ok_or_else(|| Error::xml(format!("{what} of type '{fs_type}' needs a <source {attr}='…'>")))
        };
        let (source, chain) = match &fs_type {
            FilesystemType::File | FilesystemType::Block | FilesystemType::Volume => {
                let chain = read_device_chain(el, fs_type.as_str(), driver.format.clone())
                    .map_err(|e| e.context(what.clone()))?;
                let needs = match fs_type {
                    FilesystemType::Block => "dev='…'",
                    FilesystemType::Volume => "pool='…' volume='…'",
                    _ => "file='…'",
                };
                let chain =
                    chain.ok_or_else(|| Error::xml(format!("{what} of type '{fs_type}' needs a <source {needs}>")))?;
                (Some(FilesystemSource::Image(chain.layers[0].source.clone())), Some(chain))
            }
            FilesystemType::Mount => {
                let source = match source_el.and_then(|s| s.attr("socket")) {
                    Some(socket) => FilesystemSource::Socket(PathBuf::from(socket)),
                    None => FilesystemSource::Dir(PathBuf::from(source_attr("dir")?)),
                };
                (Some(source), None)
            }
            FilesystemType::Bind => (Some(FilesystemSource::Dir(PathBuf::from(source_attr("dir")?))), None),
            FilesystemType::Ram => {
                let usage = source_attr("usage")?;
                let usage = usage
                    .parse::<u64>()
                    .map_err(|_| Error::xml(format!("{what} has <source usage='{usage}'>, which is not a number")))?;
                let units = source_el.and_then(|s| s.attr("units")).map(str::to_string);
                (Some(FilesystemSource::Ram { usage, units }), None)
            }
            FilesystemType::Template => (Some(FilesystemSource::Template(source_attr("name")?)), None),
            FilesystemType::Other(_) => (None, None),
        };
        Ok(Filesystem {
            accessmode: el.attr("accessmode").map(str::to_string),
            selected: read_selected(el, &what)?,
            readonly: el.child("readonly").is_some(),
            fs_type,
            driver,
            source,
            target,
            chain,
        })
    }

    /// The active layer's source, for a filesystem that holds an image.
    pub fn image(&self) -> Option<&StorageSource> {
        match &self.source {
            Some(FilesystemSource::Image(source)) => Some(source),
            _ => None,
        }
    }
}

/// Writes `chain` into a `<filesystem>` that holds an image: the type
/// (`file`, `block` or `volume`, from the active layer), `<driver
/// format>`, the `<source>` location and the `<backingStore>` elements;
/// everything else is kept. A filesystem of another type, or a chain
/// whose active layer no filesystem can hold (a network image), is refused
/// with nothing changed.
pub(crate) fn write_filesystem_chain(fs: &mut Element, chain: &Chain) -> Result<()> {
    let target = fs.child("target").and_then(|t| t.attr("dir")).unwrap_or_default().to_string();
    let current = FilesystemType::parse(fs.attr("type").unwrap_or("mount"));
    if !current.holds_image() {
        return Err(Error::config_unsupported(format!(
            "filesystem '{target}' of type '{current}' holds no image, so it has no backing chain"
        )));
    }
    let Some(top) = chain.top() else {
        return Err(Error::invalid_arg(format!("the chain given for filesystem '{target}' has no layers")));
    };
    let fs_type = FilesystemType::of_image(&top.source).ok_or_else(|| {
        Error::config_unsupported(format!(
            "filesystem '{target}' cannot hold a {} image ({}): only a file, block device or volume",
            top.source.type_name(),
            top.source
        ))
    })?;
    fs.set_attr("type", fs_type.as_str());
    if let Some(format) = &top.format {
        match fs.child_mut("driver") {
            Some(d) => d.set_attr("format", format.clone()),
            None => {
                fs.insert_ordered(Element::new("driver").with_attr("format", format.clone()), FILESYSTEM_CHILD_ORDER)
            }
        }
    }
    write_device_chain(fs, chain, FILESYSTEM_CHILD_ORDER);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::{Filesystem, FilesystemDriver, FilesystemSource, FilesystemType};
    use crate::chain::{Backing, Chain, NetworkSource, StorageSource};
    use crate::error::ErrorKind;
    use crate::xml::{Domain, Element, Node};

    /// Every document of `fixtures/xml/filesystems/`, with its file name.
    fn fixtures() -> Vec<(String, String)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/xml/filesystems");
        let mut docs: Vec<(String, String)> = std::fs::read_dir(&dir)
            .expect("the fixtures folder is there")
            .map(|entry| entry.expect("a readable entry").path())
            .filter(|path| path.extension().is_some_and(|e| e == "xml"))
            .map(|path| {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                (name, std::fs::read_to_string(&path).expect("a readable fixture"))
            })
            .collect();
        docs.sort();
        assert_eq!(docs.len(), 4, "fixtures: {:?}", docs.iter().map(|(n, _)| n).collect::<Vec<_>>());
        docs
    }

    fn fixture(name: &str) -> Domain {
        let (_, xml) = fixtures().into_iter().find(|(n, _)| n == name).expect("a fixture of that name");
        Domain::parse(&xml).expect("the fixture parses")
    }

    fn filesystem(dom: &Domain, dir: &str) -> Filesystem {
        dom.filesystems().expect("filesystems parse").into_iter().find(|f| f.target == dir).expect("mounted there")
    }

    /// The tree without its `<backingStore>` elements, wherever they are.
    fn without_backing_stores(el: &Element) -> Element {
        let mut out = Element { name: el.name.clone(), attrs: el.attrs.clone(), children: Vec::new() };
        for node in &el.children {
            match node {
                Node::Element(child) if child.name == "backingStore" => {}
                Node::Element(child) => out.children.push(Node::Element(without_backing_stores(child))),
                other => out.children.push(other.clone()),
            }
        }
        out
    }

    #[test]
    fn every_fixture_round_trips_with_every_element_and_attribute() {
        for (name, xml) in fixtures() {
            let dom = Domain::parse(&xml).unwrap_or_else(|e| panic!("{name}: {e}"));
            let written = Element::parse(&dom.to_xml()).expect("Strata's output parses");
            assert_eq!(written, Element::parse(&xml).expect("the fixture parses"), "{name}");
            let count = xml.matches("<filesystem").count();
            assert_eq!(dom.filesystems().expect("filesystems parse").len(), count, "{name}");
        }
    }

    #[test]
    fn every_type_is_read_into_the_typed_view() {
        let dom = fixture("lxc-image-roots.xml");
        let root = filesystem(&dom, "/");
        assert_eq!(root.fs_type, FilesystemType::File);
        assert_eq!(root.accessmode.as_deref(), Some("passthrough"));
        let nbd_qcow2 = FilesystemDriver {
            driver_type: Some("nbd".to_string()),
            format: Some("qcow2".to_string()),
            wrpolicy: None,
        };
        assert_eq!(root.driver, nbd_qcow2);
        let image = StorageSource::File { path: PathBuf::from("/var/lib/containers/ct-images/root.qcow2") };
        assert_eq!(root.source, Some(FilesystemSource::Image(image.clone())));
        let chain = root.chain.as_ref().expect("an image filesystem has a chain");
        assert_eq!(chain.layers.len(), 1);
        assert_eq!(chain.layers[0].source, image);
        assert_eq!(chain.layers[0].format.as_deref(), Some("qcow2"));
        assert_eq!(chain.layers[0].backing, Backing::Unknown, "no <backingStore>: not known yet");
        assert!(!root.readonly && !root.selected);
        let home = filesystem(&dom, "/home");
        assert_eq!((home.driver.driver_type.as_deref(), home.driver.format.as_deref()), (Some("loop"), Some("raw")));
        let data = filesystem(&dom, "/srv/data");
        assert_eq!(data.fs_type, FilesystemType::Block);
        assert_eq!(data.image(), Some(&StorageSource::Block { dev: PathBuf::from("/dev/mapper/ct-data") }));
        assert_eq!(data.driver, FilesystemDriver::default());
        assert!(data.readonly);

        let dom = fixture("lxc-host-and-memory.xml");
        let source = |dir: &str| filesystem(&dom, dir).source.expect("a known type has a source");
        assert_eq!(source("/"), FilesystemSource::Dir(PathBuf::from("/var/lib/containers/ct-shared/rootfs")));
        let media = filesystem(&dom, "/media");
        assert_eq!(
            (media.fs_type, media.accessmode.as_deref(), media.readonly),
            (FilesystemType::Mount, Some("squash"), true)
        );
        assert_eq!(filesystem(&dom, "/mnt/media-again").fs_type, FilesystemType::Bind);
        assert_eq!(source("/mnt/media-again"), FilesystemSource::Dir(PathBuf::from("/media")));
        assert_eq!(filesystem(&dom, "/tmp").fs_type, FilesystemType::Ram);
        assert_eq!(source("/tmp"), FilesystemSource::Ram { usage: 65536, units: None });
        assert_eq!(source("/run"), FilesystemSource::Ram { usage: 33_554_432, units: Some("bytes".to_string()) });
        assert_eq!(source("/var/cache"), FilesystemSource::Ram { usage: 16, units: Some("MiB".to_string()) });
        assert_eq!(filesystem(&dom, "/opt/template").fs_type, FilesystemType::Template);
        assert_eq!(source("/opt/template"), FilesystemSource::Template("debian-12-minimal".to_string()));
        assert!(dom.filesystems().expect("parses").iter().all(|f| f.chain.is_none()), "no image, no chain");

        let dom = fixture("qemu-9p-and-virtiofs.xml");
        let mapped = filesystem(&dom, "mapped");
        assert_eq!(mapped.fs_type, FilesystemType::Mount, "no type: libvirt's default, mount");
        assert_eq!(mapped.accessmode.as_deref(), Some("mapped"));
        assert_eq!(mapped.driver.driver_type.as_deref(), Some("path"));
        assert_eq!(mapped.driver.wrpolicy.as_deref(), Some("immediate"));
        assert_eq!(filesystem(&dom, "handle").driver.driver_type.as_deref(), Some("handle"));
        let fast = filesystem(&dom, "fast");
        assert_eq!(fast.driver.driver_type.as_deref(), Some("virtiofs"));
        assert_eq!(fast.source, Some(FilesystemSource::Dir(PathBuf::from("/srv/share/fast"))));
        let external = filesystem(&dom, "external").source;
        assert_eq!(external, Some(FilesystemSource::Socket(PathBuf::from("/run/virtiofsd/external.sock"))));

        let dom = fixture("strata-qcow2-chain-and-volume.xml");
        let root = filesystem(&dom, "/");
        assert!(root.selected);
        let chain = root.chain.expect("a chain");
        let layers: Vec<(String, Option<&str>, usize)> =
            chain.layers.iter().map(|l| (l.source.to_string(), l.format.as_deref(), l.index)).collect();
        assert_eq!(
            layers,
            [
                ("/var/lib/containers/ct-chain/root.qcow2".to_string(), Some("qcow2"), 0),
                ("/var/lib/containers/ct-chain/root-base.qcow2".to_string(), Some("qcow2"), 1),
                ("/var/lib/containers/images/debian-12.raw".to_string(), Some("raw"), 2),
            ]
        );
        assert!(chain.is_complete());
        let data = filesystem(&dom, "/data");
        assert_eq!(data.fs_type, FilesystemType::Volume);
        let volume =
            StorageSource::Volume { pool: "containers".to_string(), volume: "ct-chain-data.qcow2".to_string() };
        assert_eq!(data.image(), Some(&volume));
        let overlay = filesystem(&dom, "/overlay");
        assert_eq!(overlay.fs_type, FilesystemType::Other("overlay".to_string()));
        assert_eq!((overlay.source, overlay.chain), (None, None), "an unknown type is kept, not read");
    }

    #[test]
    fn setting_a_chain_changes_only_the_backing_stores() {
        let mut set = 0;
        for (name, xml) in fixtures() {
            let original = Domain::parse(&xml).expect("parses");
            for fs in original.filesystems().expect("parses") {
                let Some(chain) = &fs.chain else { continue };
                let mut longer = Chain::single(chain.layers[0].source.clone(), chain.layers[0].format.clone());
                let base = StorageSource::File { path: PathBuf::from("/images/new-base.qcow2") };
                let below = longer.push_backing(0, base, Some("qcow2".to_string()));
                longer.end_at(below);
                longer.renumber();
                let mut dom = original.clone();
                dom.set_filesystem_chain(&fs.target, &longer).unwrap_or_else(|e| panic!("{name} {}: {e}", fs.target));
                assert_ne!(dom, original, "{name} {}: the chain is written", fs.target);
                assert_eq!(filesystem(&dom, &fs.target).chain.as_ref(), Some(&longer), "{name} {}", fs.target);
                assert_eq!(
                    without_backing_stores(dom.element()),
                    without_backing_stores(original.element()),
                    "{name} {}: only <backingStore> changed",
                    fs.target
                );
                set += 1;
            }
        }
        assert_eq!(set, 5, "every image filesystem of the fixtures had its chain set");
    }

    #[test]
    fn a_new_active_layer_goes_into_source_type_and_driver_format() {
        let mut dom = fixture("lxc-image-roots.xml");
        let old = filesystem(&dom, "/home").chain.expect("a chain");
        let overlay = StorageSource::Block { dev: PathBuf::from("/dev/mapper/home-overlay") };
        let chain = old.with_overlay(overlay.clone(), Some("qcow2".to_string()));
        dom.set_filesystem_chain("/home", &chain).expect("set");
        let home = filesystem(&dom, "/home");
        assert_eq!((&home.fs_type, home.image()), (&FilesystemType::Block, Some(&overlay)));
        assert_eq!(home.driver.driver_type.as_deref(), Some("loop"), "the driver type is kept");
        assert_eq!(home.driver.format.as_deref(), Some("qcow2"));
        assert_eq!(home.accessmode.as_deref(), Some("passthrough"));
        assert_eq!(home.chain.expect("a chain").layers[1].source, old.layers[0].source);
        let xml = dom.to_xml();
        assert!(xml.contains("<source dev='/dev/mapper/home-overlay'/>"), "{xml}");
        assert!(!xml.contains("home.img'/>\n      <target"), "the old image is a backing store now: {xml}");
    }

    #[test]
    fn a_chain_is_refused_where_no_image_can_hold_it() {
        let mut dom = fixture("strata-qcow2-chain-and-volume.xml");
        let before = dom.clone();
        let file = Chain::single(StorageSource::File { path: PathBuf::from("/images/x.qcow2") }, None);
        let err = dom.set_filesystem_chain("/overlay", &file).expect_err("an unknown type holds no image");
        assert_eq!(err.kind(), ErrorKind::ConfigUnsupported);
        assert!(err.to_string().contains("filesystem '/overlay' of type 'overlay' holds no image"), "{err}");
        let network = StorageSource::Network(Box::new(NetworkSource {
            protocol: "nbd".to_string(),
            name: Some("export".to_string()),
            query: None,
            hosts: Vec::new(),
            snapshot: None,
            config_file: None,
            ssl_verify: None,
            cookies: Vec::new(),
            readahead: None,
            timeout: None,
            identity: None,
        }));
        let err = dom.set_filesystem_chain("/", &Chain::single(network, None)).expect_err("no network image");
        assert!(err.to_string().contains("filesystem '/' cannot hold a network image"), "{err}");
        let err = dom.set_filesystem_chain("/nowhere", &file).expect_err("no such filesystem");
        assert!(err.to_string().contains("no filesystem '/nowhere' in domain 'ct-chain'"), "{err}");
        assert_eq!(dom, before, "nothing changed");

        let mut dom = fixture("lxc-host-and-memory.xml");
        let err = dom.set_filesystem_chain("/tmp", &file).expect_err("ram holds no image");
        assert!(err.to_string().contains("filesystem '/tmp' of type 'ram' holds no image"), "{err}");
    }

    #[test]
    fn a_filesystem_missing_what_its_type_needs_is_refused_by_name() {
        let parse = |fs: &str| {
            let xml = format!("<domain type='lxc'><name>ct</name><devices>{fs}</devices></domain>");
            Domain::parse(&xml).expect_err("refused").to_string()
        };
        let cases = [
            (
                "<filesystem type='file'><target dir='/'/></filesystem>",
                "filesystem '/' of type 'file' needs a <source file='…'>",
            ),
            (
                "<filesystem type='block'><source/><target dir='/b'/></filesystem>",
                "filesystem '/b' of type 'block' needs a <source dev='…'>",
            ),
            (
                "<filesystem type='volume'><source pool='p'/><target dir='/v'/></filesystem>",
                "filesystem '/v': a volume <source> needs a 'volume' attribute",
            ),
            (
                "<filesystem><source socketx='/s'/><target dir='tag'/></filesystem>",
                "filesystem 'tag' of type 'mount' needs a <source dir='…'>",
            ),
            (
                "<filesystem type='ram'><source usage='lots'/><target dir='/r'/></filesystem>",
                "filesystem '/r' has <source usage='lots'>, which is not a number",
            ),
            ("<filesystem type='bind'><source dir='/x'/></filesystem>", "a <filesystem> has no <target dir>"),
            (
                "<filesystem type='file' selected='maybe'><source file='/i'/><target dir='/'/></filesystem>",
                "filesystem '/' has selected='maybe'; expected 'yes' or 'no'",
            ),
            (
                "<filesystem type='bind'><source dir='/a'/><target dir='/m'/></filesystem>\
                 <filesystem type='bind'><source dir='/b'/><target dir='/m'/></filesystem>",
                "domain 'ct' has two filesystems with target dir '/m'",
            ),
        ];
        for (fs, expected) in cases {
            let err = parse(fs);
            assert!(err.contains(expected), "{fs}: {err}");
        }
    }
}
