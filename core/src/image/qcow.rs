//! qcow2 (versions 2 and 3) and the original qcow (version 1).
//!
//! Layout: QEMU's docs/interop/qcow2.txt; all fields big-endian. The checks
//! mirror those QEMU makes before following a backing file, so that what is
//! reported here is what QEMU would open.

use super::source::{has_magic, peek_be32, utf8_name, Fields, ImageFile};
use super::{invalid, not_format, ImageFormat, ImageHeader};
use crate::error::Result;

pub(super) const MAGIC: &[u8] = b"QFI\xfb";

/// Version 2 header length; version 3 records its own (at least 104).
const V2_HEADER_LEN: u32 = 72;
pub(super) const V3_MIN_HEADER_LEN: u32 = 104;

/// QEMU's cluster size limits (512 bytes to 2 MiB).
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;

/// QEMU refuses longer backing names.
pub(super) const MAX_BACKING_NAME: u32 = 1023;
/// QEMU keeps the backing format in a 16-byte C buffer.
const MAX_BACKING_FORMAT: u32 = 15;

const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// dirty, corrupt, external data file, compression type, extended L2.
const INCOMPAT_KNOWN: u64 = 0x1f;

pub(super) const EXT_END: u32 = 0;
pub(super) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// The version field of a file starting with the qcow magic, if present.
fn version(head: &[u8]) -> Option<u32> {
    has_magic(head, 0, MAGIC).then(|| peek_be32(head, 4)).flatten()
}

/// qcow magic with any version but 1. A qcow magic too short to hold a
/// version counts as qcow2 too: it is surely not raw, and reading it as
/// qcow2 reports the truncation.
pub(super) fn is_qcow2(head: &[u8]) -> bool {
    has_magic(head, 0, MAGIC) && version(head) != Some(1)
}

pub(super) fn is_qcow(head: &[u8]) -> bool {
    version(head) == Some(1)
}

pub(super) fn read_qcow2(img: &ImageFile) -> Result<ImageHeader> {
    if !has_magic(img.head(), 0, MAGIC) {
        return Err(not_format(img, ImageFormat::Qcow2));
    }
    let path = img.path();
    let buf = img.bytes(0, V2_HEADER_LEN as usize, "qcow2 header")?;
    let h = Fields::new(&buf, path, "qcow2 header");
    let version = h.be32(4)?;
    match version {
        2 | 3 => {}
        1 => return Err(invalid(img, "is a qcow (version 1) image, not qcow2")),
        v => return Err(invalid(img, format_args!("has unsupported qcow2 version {v}"))),
    }
    let backing_offset = h.be64(8)?;
    let backing_len = h.be32(16)?;
    let cluster_bits = h.be32(20)?;
    let virtual_size = h.be64(24)?;
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(invalid(img, format_args!("has an unsupported qcow2 cluster size of 2^{cluster_bits} bytes")));
    }
    let cluster_size = 1u64 << cluster_bits;

    let (header_len, incompatible) = if version == 3 {
        let buf = img.bytes(0, V3_MIN_HEADER_LEN as usize, "qcow2 version 3 header")?;
        let h = Fields::new(&buf, path, "qcow2 version 3 header");
        (h.be32(100)?, h.be64(72)?)
    } else {
        (V2_HEADER_LEN, 0)
    };
    if header_len < V2_HEADER_LEN || (version == 3 && header_len < V3_MIN_HEADER_LEN) {
        return Err(invalid(img, format_args!("has a qcow2 header length of {header_len}, which is too short")));
    }
    if u64::from(header_len) > cluster_size {
        return Err(invalid(img, "has a qcow2 header larger than its cluster size"));
    }
    check_incompatible_features(img, incompatible)?;

    if backing_offset > cluster_size {
        return Err(invalid(img, format_args!("has an invalid backing file offset {backing_offset}")));
    }
    // Extensions run from the end of the header to the backing name, or to
    // the end of the first cluster when there is none.
    let ext_end = if backing_offset != 0 { backing_offset } else { cluster_size };
    let backing_format = read_extensions(img, u64::from(header_len), ext_end)?;

    let backing_file = if backing_offset != 0 {
        let room = cluster_size - backing_offset;
        if backing_len > MAX_BACKING_NAME || u64::from(backing_len) > room {
            return Err(invalid(
                img,
                format_args!("has a backing file name of {backing_len} bytes, which is too long"),
            ));
        }
        let name = img.bytes(backing_offset, backing_len as usize, "backing file name")?;
        Some(utf8_name(name, path, "backing file name")?).filter(|name| !name.is_empty())
    } else {
        None
    };

    Ok(ImageHeader {
        format: ImageFormat::Qcow2,
        virtual_size,
        differencing: backing_file.is_some(),
        backing_file,
        backing_format,
        parent_uuid: None,
        uuid: None,
    })
}

fn check_incompatible_features(img: &ImageFile, incompatible: u64) -> Result<()> {
    let unknown = incompatible & !INCOMPAT_KNOWN;
    if unknown != 0 {
        return Err(invalid(
            img,
            format_args!(
                "uses unknown incompatible qcow2 features (bits 0x{unknown:x}); \
                 QEMU cannot open it and Strata cannot interpret it"
            ),
        ));
    }
    if incompatible & INCOMPAT_CORRUPT != 0 {
        return Err(invalid(
            img,
            "is marked corrupt (qcow2 corrupt bit set); QEMU refuses to open it read/write \
             until it is repaired with 'qemu-img check -r all'",
        ));
    }
    if incompatible & INCOMPAT_DATA_FILE != 0 {
        return Err(external_data_file(img, None));
    }
    Ok(())
}

fn external_data_file(img: &ImageFile, name: Option<&str>) -> crate::error::Error {
    let named = name.map(|n| format!(" ('{n}')")).unwrap_or_default();
    invalid(img, format_args!("keeps its guest data in an external data file{named}, which Strata does not support"))
}

/// Walks the header extensions in `[start, end)` as QEMU does and returns the
/// backing format, refusing an external data file extension.
fn read_extensions(img: &ImageFile, start: u64, end: u64) -> Result<Option<String>> {
    let path = img.path();
    let mut backing_format = None;
    let mut offset = start;
    while offset < end {
        let buf = img.bytes(offset, 8, "qcow2 header extension")?;
        let h = Fields::new(&buf, path, "qcow2 header extension");
        let kind = h.be32(0)?;
        let len = h.be32(4)?;
        offset += 8;
        if offset > end || u64::from(len) > end - offset {
            return Err(invalid(img, "has a qcow2 header extension that runs past the header area"));
        }
        match kind {
            EXT_END => break,
            EXT_BACKING_FORMAT => {
                if len > MAX_BACKING_FORMAT {
                    return Err(invalid(
                        img,
                        format_args!("has a backing format name of {len} bytes, which is too long"),
                    ));
                }
                let name = img.bytes(offset, len as usize, "backing format name")?;
                backing_format = Some(utf8_name(name, path, "backing format name")?).filter(|f| !f.is_empty());
            }
            EXT_DATA_FILE => {
                let name = img.bytes(offset, len as usize, "external data file name")?;
                let name = String::from_utf8_lossy(&name).into_owned();
                return Err(external_data_file(img, Some(&name)));
            }
            _ => {}
        }
        // Extension data is padded to a multiple of 8 bytes; `len` is at
        // most `end`, itself at most 2 MiB, so this cannot overflow.
        offset += u64::from(len).next_multiple_of(8);
    }
    Ok(backing_format)
}

/// The original qcow format (version 1): a 48-byte header.
pub(super) fn read_qcow(img: &ImageFile) -> Result<ImageHeader> {
    if !has_magic(img.head(), 0, MAGIC) {
        return Err(not_format(img, ImageFormat::Qcow));
    }
    let path = img.path();
    let buf = img.bytes(0, 48, "qcow header")?;
    let h = Fields::new(&buf, path, "qcow header");
    let version = h.be32(4)?;
    if version != 1 {
        return Err(invalid(img, format_args!("is a qcow2 (version {version}) image, not qcow")));
    }
    let backing_offset = h.be64(8)?;
    let backing_len = h.be32(16)?;
    let virtual_size = h.be64(24)?;
    let backing_file = if backing_offset != 0 {
        if backing_len > MAX_BACKING_NAME {
            return Err(invalid(
                img,
                format_args!("has a backing file name of {backing_len} bytes, which is too long"),
            ));
        }
        let name = img.bytes(backing_offset, backing_len as usize, "backing file name")?;
        Some(utf8_name(name, path, "backing file name")?).filter(|name| !name.is_empty())
    } else {
        None
    };
    Ok(ImageHeader {
        format: ImageFormat::Qcow,
        virtual_size,
        differencing: backing_file.is_some(),
        backing_file,
        backing_format: None,
        parent_uuid: None,
        uuid: None,
    })
}
