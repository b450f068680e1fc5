//! Storage devices: what chains, snapshots, block jobs and disk sets act
//! on, whether the domain holds it as a `<disk>` (a VM's `vda`) or as a
//! `<filesystem>` (a container's root `/`).
//!
//! A caller finds a device with [`Domain::find_storage_device`] (a disk
//! target, a filesystem target dir, or an active image's path), reads it
//! through [`StorageDevice`]'s accessors, and writes back through its
//! [`StorageAddress`] with [`Domain::set_storage_chain`],
//! [`Domain::clear_storage_chain`] and [`Domain::set_storage_selected`]:
//!
//! ```
//! # use strata_core::xml::Domain;
//! # let xml = "<domain><name>ct</name><devices><filesystem type='file'>\
//! #   <driver type='nbd' format='qcow2'/><source file='/img/root.qcow2'/><target dir='/'/>\
//! #   </filesystem></devices></domain>";
//! let mut dom = Domain::parse(xml)?;
//! let root = dom.find_storage_device("/")?;
//! assert_eq!(root.to_string(), "filesystem '/'");
//! let mut chain = root.chain().cloned().expect("an image filesystem has a chain");
//! chain.end_at(0);
//! dom.set_storage_chain(&root.address(), &chain)?;
//! # Ok::<(), strata_core::error::Error>(())
//! ```
//!
//! [`Domain::find_storage_device`]: super::Domain::find_storage_device
//! [`Domain::set_storage_chain`]: super::Domain::set_storage_chain
//! [`Domain::clear_storage_chain`]: super::Domain::clear_storage_chain
//! [`Domain::set_storage_selected`]: super::Domain::set_storage_selected

use std::fmt;

use serde::Serialize;

use super::disk::Disk;
use super::filesystem::Filesystem;
use crate::chain::{Chain, StorageSource};
use crate::error::Result;

/// Which device of a domain: a disk by its target, a filesystem by its
/// target dir. Disk targets and filesystem target dirs are separate name
/// spaces (a virtiofs mount tag may be `vda`), so the kind is part of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", content = "name", rename_all = "lowercase")]
pub enum StorageAddress {
    /// `<disk><target dev>`: `vda`.
    Disk(String),
    /// `<filesystem><target dir>`: `/`, `/data`, or a mount tag.
    Filesystem(String),
}

impl StorageAddress {
    /// The device's name on a command line and in a disk set: `vda`, `/data`.
    pub fn name(&self) -> &str {
        match self {
            StorageAddress::Disk(name) | StorageAddress::Filesystem(name) => name,
        }
    }
}

/// `disk 'vda'`, `filesystem '/data'`: how messages name a device.
impl fmt::Display for StorageAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageAddress::Disk(target) => write!(f, "disk '{target}'"),
            StorageAddress::Filesystem(dir) => write!(f, "filesystem '{dir}'"),
        }
    }
}

/// A device's name as an identifier of letters, digits, `-`, `.` and `_`
/// (what QEMU's node names and job ids allow): a disk's target as it is
/// (`vda`); for a filesystem, its target dir after `fs`, each `/` a `.`
/// (`/` is `fs.`, `/data` is `fs.data`).
pub fn device_identifier(device: &str) -> String {
    if device.starts_with('/') {
        format!("fs{}", device.replace('/', "."))
    } else {
        device.to_string()
    }
}

/// The device name whose [`device_identifier`] is `identifier`.
pub fn device_of_identifier(identifier: &str) -> String {
    match identifier.strip_prefix("fs.") {
        Some(dir) => format!("/{}", dir.replace('.', "/")),
        None => identifier.to_string(),
    }
}

/// A disk or a filesystem, read from the domain's XML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "device", rename_all = "lowercase")]
pub enum StorageDevice {
    Disk(Disk),
    Filesystem(Filesystem),
}

impl StorageDevice {
    pub fn address(&self) -> StorageAddress {
        match self {
            StorageDevice::Disk(d) => StorageAddress::Disk(d.target.clone()),
            StorageDevice::Filesystem(f) => StorageAddress::Filesystem(f.target.clone()),
        }
    }

    /// `vda` or `/data`.
    pub fn name(&self) -> &str {
        match self {
            StorageDevice::Disk(d) => &d.target,
            StorageDevice::Filesystem(f) => &f.target,
        }
    }

    /// The active image or device; `None` for an empty drive and for a
    /// filesystem that holds no image (a directory, memory).
    pub fn source(&self) -> Option<&StorageSource> {
        match self {
            StorageDevice::Disk(d) => d.source(),
            StorageDevice::Filesystem(f) => f.image(),
        }
    }

    /// The active layer's format as the XML gives it (`<driver type>` of a
    /// disk, `<driver format>` of a filesystem).
    pub fn format(&self) -> Option<&str> {
        match self {
            StorageDevice::Disk(d) => d.format.as_deref(),
            StorageDevice::Filesystem(f) => f.driver.format.as_deref(),
        }
    }

    /// The active layer and what is known below it; `None` when the device
    /// holds no image.
    pub fn chain(&self) -> Option<&Chain> {
        match self {
            StorageDevice::Disk(d) => d.chain.as_ref(),
            StorageDevice::Filesystem(f) => f.chain.as_ref(),
        }
    }

    /// `<readonly/>`.
    pub fn readonly(&self) -> bool {
        match self {
            StorageDevice::Disk(d) => d.readonly,
            StorageDevice::Filesystem(f) => f.readonly,
        }
    }

    /// In the domain's disk set (`selected='yes'`).
    pub fn selected(&self) -> bool {
        match self {
            StorageDevice::Disk(d) => d.selected,
            StorageDevice::Filesystem(f) => f.selected,
        }
    }

    /// Refuses `operations` on a transient disk (see
    /// [`Disk::refuse_if_transient`]); a filesystem is never transient.
    pub fn refuse_if_transient(&self, operations: &str) -> Result<()> {
        match self {
            StorageDevice::Disk(d) => d.refuse_if_transient(operations),
            StorageDevice::Filesystem(_) => Ok(()),
        }
    }

    pub fn as_disk(&self) -> Option<&Disk> {
        match self {
            StorageDevice::Disk(d) => Some(d),
            StorageDevice::Filesystem(_) => None,
        }
    }

    pub fn as_filesystem(&self) -> Option<&Filesystem> {
        match self {
            StorageDevice::Disk(_) => None,
            StorageDevice::Filesystem(f) => Some(f),
        }
    }
}

/// `disk 'vda'`, `filesystem '/data'`.
impl fmt::Display for StorageDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.address().fmt(f)
    }
}
