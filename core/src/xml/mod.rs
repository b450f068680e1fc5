//! libvirt's XML formats: a lossless element tree and typed views over it.
mod disk;
mod domain;
mod filesystem;
mod interface;
mod limits;
mod snapshot;
mod storage;
mod tree;
mod volume;

pub use disk::{backing_elements, layer_source_element, parse_source, source_element, Disk, Mirror, DISK_CHILD_ORDER};
pub use domain::{Domain, KernelBoot, SerialFile};
pub use filesystem::{Filesystem, FilesystemDriver, FilesystemSource, FilesystemType, FILESYSTEM_CHILD_ORDER};
pub use interface::{
    check_mac, generated_mac, interface_from_options, Interface, PortForward, PortRange, INTERFACE_CHILD_ORDER,
};
pub use limits::{read_document, read_document_keeping, MAX_DOCUMENT_BYTES, MAX_DOCUMENT_NODES};
pub use snapshot::{SnapshotDef, SnapshotDisk, SnapshotMemory};
pub use storage::{device_identifier, device_of_identifier, StorageAddress, StorageDevice};
pub use tree::{Element, Node};
pub use volume::{chain_from_volume, volume_element};
