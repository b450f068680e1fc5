//! `<pool>`: a storage pool's definition, kept losslessly (what Strata does
//! not model survives), with the typed fields the `dir` and `fs` backends use.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::xml::Element;

/// libvirt's order of `<pool>` children; the sizes go in their places.
const POOL_CHILD_ORDER: &[&str] = &["name", "uuid", "capacity", "allocation", "available", "source", "target"];

/// Filesystem types libvirt's schema allows for an `fs` pool.
const FS_FORMATS: &[&str] =
    &["auto", "ext2", "ext3", "ext4", "ufs", "iso9660", "udf", "gfs", "gfs2", "vfat", "hfs+", "xfs", "ocfs2", "vmfs"];

/// The pool types Strata's backends implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolType {
    /// A directory of image files.
    Dir,
    /// A block device (or image) holding a filesystem mounted at the target.
    Fs,
}

impl PoolType {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolType::Dir => "dir",
            PoolType::Fs => "fs",
        }
    }
}

/// A pool's definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolDef {
    element: Element,
    pub name: String,
    pub uuid: String,
    pub pool_type: PoolType,
    /// The directory the volumes are in (the mount point of an `fs` pool).
    pub target: PathBuf,
    /// An `fs` pool's device.
    pub device: Option<PathBuf>,
    /// An `fs` pool's filesystem type (`auto` when not given).
    pub fs_format: String,
}

impl PoolDef {
    /// Parses and checks a `<pool>` document; a missing UUID is generated,
    /// and the sizes (which describe a running pool) are dropped.
    pub fn parse(xml: &str) -> Result<PoolDef> {
        let mut element = Element::parse(xml)?;
        if element.name != "pool" {
            return Err(Error::xml(format!("expected a <pool> document, found <{}>", element.name)));
        }
        let pool_type = match element.attr("type") {
            Some("dir") => PoolType::Dir,
            Some("fs") => PoolType::Fs,
            Some(other) => {
                return Err(Error::config_unsupported(format!(
                    "storage pool type '{other}' is not supported (expected dir or fs)"
                )))
            }
            None => return Err(Error::xml("the <pool> has no 'type' attribute")),
        };
        let name = element.child_text("name").ok_or_else(|| Error::xml("the <pool> has no <name>"))?;
        crate::store::validate_name("storage pool", &name)?;
        let uuid = match element.child_text("uuid") {
            Some(u) => uuid::Uuid::parse_str(u.trim())
                .map_err(|_| Error::xml(format!("storage pool '{name}' has an invalid UUID '{u}'")))?
                .to_string(),
            None => {
                let u = uuid::Uuid::new_v4().to_string();
                element.insert_ordered(Element::new("uuid").with_text(u.clone()), POOL_CHILD_ORDER);
                u
            }
        };
        for size in ["capacity", "allocation", "available"] {
            element.remove_children(size);
        }
        let target = element
            .child("target")
            .and_then(|t| t.child_text("path"))
            .ok_or_else(|| Error::xml(format!("storage pool '{name}' has no <target><path>")))?;
        let target = PathBuf::from(target.trim());
        if !target.is_absolute() {
            return Err(Error::invalid_arg(format!(
                "storage pool '{name}' has a relative target path '{}'; give an absolute path",
                target.display()
            )));
        }
        let source = element.child("source");
        let device = source.and_then(|s| s.child("device")).and_then(|d| d.attr("path")).map(PathBuf::from);
        let fs_format =
            source.and_then(|s| s.child("format")).and_then(|f| f.attr("type")).unwrap_or("auto").to_string();
        if pool_type == PoolType::Fs {
            match &device {
                None => {
                    return Err(Error::xml(format!(
                        "storage pool '{name}' of type fs needs <source><device path='…'/>"
                    )))
                }
                Some(d) if !d.is_absolute() => {
                    return Err(Error::invalid_arg(format!(
                        "storage pool '{name}' has a relative source device '{}'",
                        d.display()
                    )))
                }
                Some(_) => {}
            }
            if !FS_FORMATS.contains(&fs_format.as_str()) {
                return Err(Error::xml(format!(
                    "storage pool '{name}' has source format '{fs_format}'; expected one of {}",
                    FS_FORMATS.join(", ")
                )));
            }
        }
        Ok(PoolDef { element, name, uuid, pool_type, target, device, fs_format })
    }

    /// The definition as stored.
    pub fn to_xml(&self) -> String {
        self.element.to_xml()
    }

    /// The definition with the sizes of a running pool, as `pool-dumpxml` shows it.
    pub fn with_sizes(&self, sizes: PoolSizes) -> String {
        let mut el = self.element.clone();
        for (name, value) in
            [("capacity", sizes.capacity), ("allocation", sizes.allocation), ("available", sizes.available)]
        {
            el.insert_ordered(
                Element::new(name).with_attr("unit", "bytes").with_text(value.to_string()),
                POOL_CHILD_ORDER,
            );
        }
        el.to_xml()
    }

    pub fn target(&self) -> &Path {
        &self.target
    }
}

/// The space of a running pool's filesystem, in bytes, as libvirt counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolSizes {
    pub capacity: u64,
    pub allocation: u64,
    pub available: u64,
}

/// The XML of `pool-define-as`: a pool from its parts.
pub fn pool_xml_from_parts(
    name: &str,
    pool_type: &str,
    source_device: Option<&str>,
    source_format: Option<&str>,
    target: Option<&str>,
) -> String {
    let mut pool = Element::new("pool").with_attr("type", pool_type).with_child(Element::new("name").with_text(name));
    let mut source = Element::new("source");
    if let Some(dev) = source_device {
        source = source.with_child(Element::new("device").with_attr("path", dev));
    }
    if let Some(fmt) = source_format {
        source = source.with_child(Element::new("format").with_attr("type", fmt));
    }
    pool = pool.with_child(source);
    if let Some(t) = target {
        pool = pool.with_child(Element::new("target").with_child(Element::new("path").with_text(t)));
    }
    pool.to_xml()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_elements_survive_and_sizes_are_not_stored() {
        let xml = "<pool type='dir'><name>p</name><capacity unit='bytes'>5</capacity><source/>\
                   <target><path>/srv/p</path><permissions><mode>0711</mode></permissions></target>\
                   <x-unknown a='1'/></pool>";
        let def = PoolDef::parse(xml).expect("parse");
        assert_eq!(def.pool_type, PoolType::Dir);
        assert_eq!(def.target, Path::new("/srv/p"));
        let stored = def.to_xml();
        assert!(stored.contains("<x-unknown a='1'/>") && stored.contains("<mode>0711</mode>"), "{stored}");
        assert!(!stored.contains("capacity"), "{stored}");
        assert!(stored.contains(&format!("<uuid>{}</uuid>", def.uuid)), "{stored}");
        let dumped = def.with_sizes(PoolSizes { capacity: 10, allocation: 4, available: 6 });
        let uuid_at = dumped.find("<uuid>").expect("uuid");
        let capacity_at = dumped.find("<capacity unit='bytes'>10</capacity>").expect("capacity");
        assert!(uuid_at < capacity_at && capacity_at < dumped.find("<source").expect("source"), "{dumped}");
    }

    #[test]
    fn bad_pools_are_refused_naming_what_is_wrong() {
        let cases = [
            ("<pool type='logical'><name>p</name><target><path>/x</path></target></pool>", "logical"),
            ("<pool type='dir'><name>p</name></pool>", "<target><path>"),
            ("<pool type='dir'><name>p</name><target><path>x</path></target></pool>", "relative target path 'x'"),
            ("<pool type='fs'><name>p</name><target><path>/x</path></target></pool>", "<device path"),
            (
                "<pool type='fs'><name>p</name><source><device path='/dev/loop0'/><format type='zfs'/></source>\
                 <target><path>/x</path></target></pool>",
                "'zfs'",
            ),
            ("<pool type='dir'><name>a/b</name><target><path>/x</path></target></pool>", "'a/b'"),
        ];
        for (xml, words) in cases {
            let err = PoolDef::parse(xml).expect_err(xml);
            assert!(err.to_string().contains(words), "{xml}: {err}");
        }
    }
}
