//! VHD, QEMU's "vpc" format (layout: Microsoft's Virtual Hard Disk Image
//! Format Specification and QEMU's block/vpc.c; fields big-endian).
//!
//! Dynamic and differencing disks carry a copy of the 512-byte footer at
//! offset 0; fixed disks only at the end of the file. QEMU itself never opens
//! the parent of a differencing disk; the parent is reported here so that a
//! caller can refuse or handle such a disk knowingly.

use super::source::{has_magic, utf16_string, uuid_be, Fields, ImageFile};
use super::{invalid, not_format, sectors_to_bytes, ImageFormat, ImageHeader};
use crate::error::Result;

const COOKIE: &[u8] = b"conectix";
const FOOTER_LEN: usize = 512;
const DYN_COOKIE: &[u8] = b"cxsparse";
const DYN_HEADER_LEN: usize = 1024;

const DISK_FIXED: u32 = 2;
const DISK_DYNAMIC: u32 = 3;
const DISK_DIFFERENCING: u32 = 4;

const OFF_DATA_OFFSET: usize = 16;
const OFF_CREATOR_APP: usize = 28;
const OFF_CURRENT_SIZE: usize = 48;
const OFF_CYLINDERS: usize = 56;
const OFF_HEADS: usize = 58;
const OFF_SECTORS_PER_TRACK: usize = 59;
const OFF_TYPE: usize = 60;
const OFF_CHECKSUM: usize = 64;
const OFF_UUID: usize = 68;

const OFF_PARENT_UUID: usize = 40;
const OFF_PARENT_NAME: usize = 64;
const PARENT_NAME_LEN: usize = 512;

/// The largest CHS geometry; such disks use the footer's size instead.
const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;
/// QEMU refuses disks over 2040 GiB.
const MAX_SECTORS: u64 = 0xff00_0000;
/// Creator applications whose disks are sized by the footer's current size
/// rather than by CHS geometry (QEMU's rule, so sizes agree with qemu-img).
const SIZE_FROM_FOOTER_CREATORS: [&[u8; 4]; 5] = [b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"];

/// A footer copy at offset 0 (dynamic and differencing disks).
pub(super) fn probe(head: &[u8]) -> bool {
    has_magic(head, 0, COOKIE)
}

/// A footer in the last 512 bytes of the file (fixed disks).
pub(super) fn probe_tail(tail: &[u8]) -> bool {
    has_magic(tail, 0, COOKIE)
}

pub(super) fn read(img: &ImageFile) -> Result<ImageHeader> {
    let footer = if probe(img.head()) {
        img.bytes(0, FOOTER_LEN, "VHD footer")?
    } else {
        let tail = img
            .len()
            .checked_sub(FOOTER_LEN as u64)
            .map(|offset| img.bytes(offset, FOOTER_LEN, "VHD footer"))
            .transpose()?;
        match tail {
            Some(tail) if probe_tail(&tail) => tail,
            _ => return Err(not_format(img, ImageFormat::Vpc)),
        }
    };
    let f = Fields::new(&footer, img.path(), "VHD footer");
    check_footer_checksum(img, &f)?;

    let disk_type = f.be32(OFF_TYPE)?;
    if !matches!(disk_type, DISK_FIXED | DISK_DYNAMIC | DISK_DIFFERENCING) {
        return Err(invalid(img, format_args!("has unknown VHD disk type {disk_type}")));
    }
    let virtual_size = virtual_size(img, &f)?;
    let uuid = uuid_be(f.array(OFF_UUID)?);

    let mut header = ImageHeader {
        format: ImageFormat::Vpc,
        virtual_size,
        backing_file: None,
        backing_format: None,
        differencing: disk_type == DISK_DIFFERENCING,
        parent_uuid: None,
        uuid,
    };
    if header.differencing {
        let offset = f.be64(OFF_DATA_OFFSET)?;
        let dyn_header = img.bytes(offset, DYN_HEADER_LEN, "VHD dynamic disk header")?;
        let d = Fields::new(&dyn_header, img.path(), "VHD dynamic disk header");
        if d.slice(0, DYN_COOKIE.len())? != DYN_COOKIE {
            return Err(invalid(img, "has a VHD dynamic disk header without its 'cxsparse' cookie"));
        }
        header.parent_uuid = uuid_be(d.array(OFF_PARENT_UUID)?);
        header.backing_file =
            utf16_string(d.slice(OFF_PARENT_NAME, PARENT_NAME_LEN)?, true).filter(|name| !name.is_empty());
    }
    Ok(header)
}

/// The footer checksum is the one's complement of the byte sum with the
/// checksum field taken as zero; QEMU refuses a mismatch.
fn check_footer_checksum(img: &ImageFile, f: &Fields) -> Result<()> {
    let stored = f.be32(OFF_CHECKSUM)?;
    let field: u32 = f.slice(OFF_CHECKSUM, 4)?.iter().map(|&b| u32::from(b)).sum();
    let all: u32 = f.slice(0, FOOTER_LEN)?.iter().map(|&b| u32::from(b)).sum();
    if !(all - field) != stored {
        return Err(invalid(img, "has a VHD footer with an incorrect checksum"));
    }
    Ok(())
}

/// Virtual PC sizes a disk by its CHS geometry, Hyper-V and others by the
/// footer's current size; QEMU tells them apart by the creator application.
fn virtual_size(img: &ImageFile, f: &Fields) -> Result<u64> {
    let geometry_sectors =
        u64::from(f.be16(OFF_CYLINDERS)?) * u64::from(f.u8(OFF_HEADS)?) * u64::from(f.u8(OFF_SECTORS_PER_TRACK)?);
    let creator: [u8; 4] = f.array(OFF_CREATOR_APP)?;
    let sized_by_footer = SIZE_FROM_FOOTER_CREATORS.contains(&&creator);
    let sectors = if sized_by_footer || geometry_sectors == MAX_GEOMETRY_SECTORS {
        f.be64(OFF_CURRENT_SIZE)? / 512
    } else {
        geometry_sectors
    };
    if sectors > MAX_SECTORS {
        return Err(invalid(img, "is larger than the 2040 GiB QEMU supports for VHD images"));
    }
    sectors_to_bytes(img, sectors)
}
