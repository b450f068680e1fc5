//! Formats that never have a backing file and are only detected and sized:
//! LUKS, ISO 9660, DMG, Bochs, cloop and Parallels. Sizes are best effort,
//! following QEMU where it reads the format, the file size otherwise.

use super::source::{c_str, has_magic, Fields, ImageFile};
use super::{invalid, not_format, sectors_to_bytes, ImageFormat, ImageHeader};
use crate::error::Result;

const LUKS_MAGIC: &[u8] = b"LUKS\xba\xbe";
/// The LUKS1 payload offset (in sectors) field.
const LUKS1_PAYLOAD_OFFSET: usize = 104;

const ISO_MAGIC_OFFSET: u64 = 0x8001;
const ISO_MAGIC: &[u8] = b"CD001";

/// DMG (UDIF) images end with a 512-byte "koly" trailer.
const DMG_MAGIC: &[u8] = b"koly";
const TRAILER_LEN: usize = super::TAIL_LEN;
const DMG_SECTOR_COUNT: usize = 492;

const BOCHS_MAGIC: &[u8] = b"Bochs Virtual HD Image";
const BOCHS_TYPE: &[u8] = b"Redolog";
const BOCHS_SUBTYPE: &[u8] = b"Growing";
const BOCHS_VERSION_1: u32 = 0x0001_0000;
const BOCHS_VERSION_2: u32 = 0x0002_0000;

const CLOOP_MAGIC: &[u8] = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";

const PARALLELS_MAGIC: &[u8] = b"WithoutFreeSpace";
const PARALLELS_MAGIC_EXT: &[u8] = b"WithouFreSpacExt";
const PARALLELS_VERSION: u32 = 2;

pub(super) fn probe_luks(head: &[u8]) -> bool {
    has_magic(head, 0, LUKS_MAGIC)
}

/// LUKS1: the payload follows the header at the recorded offset. QEMU only
/// opens LUKS1; a LUKS2 image is sized as its whole file.
pub(super) fn read_luks(img: &ImageFile) -> Result<ImageHeader> {
    if !probe_luks(img.head()) {
        return Err(not_format(img, ImageFormat::Luks));
    }
    let buf = img.bytes(0, LUKS1_PAYLOAD_OFFSET + 4, "LUKS header")?;
    let h = Fields::new(&buf, img.path(), "LUKS header");
    let virtual_size = if h.be16(6)? == 1 {
        let payload = sectors_to_bytes(img, u64::from(h.be32(LUKS1_PAYLOAD_OFFSET)?))?;
        img.len()
            .checked_sub(payload)
            .ok_or_else(|| invalid(img, "is shorter than the LUKS payload offset its header records"))?
    } else {
        img.len()
    };
    Ok(ImageHeader::standalone(ImageFormat::Luks, virtual_size))
}

pub(super) fn probe_iso(img: &ImageFile) -> Result<bool> {
    let end = ISO_MAGIC_OFFSET + ISO_MAGIC.len() as u64;
    if img.len() < end {
        return Ok(false);
    }
    Ok(img.bytes(ISO_MAGIC_OFFSET, ISO_MAGIC.len(), "ISO 9660 volume descriptor")? == ISO_MAGIC)
}

pub(super) fn read_iso(img: &ImageFile) -> Result<ImageHeader> {
    if !probe_iso(img)? {
        return Err(not_format(img, ImageFormat::Iso));
    }
    Ok(ImageHeader::standalone(ImageFormat::Iso, img.len()))
}

pub(super) fn probe_dmg_tail(tail: &[u8]) -> bool {
    has_magic(tail, 0, DMG_MAGIC)
}

/// The trailer's sector count; the image's own size when it records none.
pub(super) fn read_dmg(img: &ImageFile) -> Result<ImageHeader> {
    let tail = match img.len().checked_sub(TRAILER_LEN as u64) {
        Some(offset) => img.bytes(offset, TRAILER_LEN, "DMG trailer")?,
        None => Vec::new(),
    };
    if !probe_dmg_tail(&tail) {
        return Err(not_format(img, ImageFormat::Dmg));
    }
    let sectors = Fields::new(&tail, img.path(), "DMG trailer").be64(DMG_SECTOR_COUNT)?;
    let virtual_size = if sectors == 0 { img.len() } else { sectors_to_bytes(img, sectors)? };
    Ok(ImageHeader::standalone(ImageFormat::Dmg, virtual_size))
}

/// QEMU's test: the three NUL-terminated identification strings and a
/// known version.
pub(super) fn probe_bochs(head: &[u8]) -> bool {
    let field = |offset: usize, len: usize| head.get(offset..offset + len).map(c_str);
    let version = head.get(64..68).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes);
    field(0, 32) == Some(BOCHS_MAGIC)
        && field(32, 16) == Some(BOCHS_TYPE)
        && field(48, 16) == Some(BOCHS_SUBTYPE)
        && matches!(version, Some(BOCHS_VERSION_1 | BOCHS_VERSION_2))
}

pub(super) fn read_bochs(img: &ImageFile) -> Result<ImageHeader> {
    if !probe_bochs(img.head()) {
        return Err(not_format(img, ImageFormat::Bochs));
    }
    let buf = img.bytes(0, 96, "Bochs header")?;
    let h = Fields::new(&buf, img.path(), "Bochs header");
    // Version 2 added a reserved word before the disk size.
    let size_offset = if h.le32(64)? == BOCHS_VERSION_1 { 84 } else { 88 };
    Ok(ImageHeader::standalone(ImageFormat::Bochs, h.le64(size_offset)?))
}

pub(super) fn probe_cloop(head: &[u8]) -> bool {
    has_magic(head, 0, CLOOP_MAGIC)
}

/// Block size and block count (big-endian) follow the 128-byte preamble.
pub(super) fn read_cloop(img: &ImageFile) -> Result<ImageHeader> {
    if !probe_cloop(img.head()) {
        return Err(not_format(img, ImageFormat::Cloop));
    }
    let buf = img.bytes(0, 136, "cloop header")?;
    let h = Fields::new(&buf, img.path(), "cloop header");
    let block_size = u64::from(h.be32(128)?);
    let blocks = u64::from(h.be32(132)?);
    // Two u32 values: the product always fits in a u64.
    Ok(ImageHeader::standalone(ImageFormat::Cloop, block_size * blocks))
}

pub(super) fn probe_parallels(head: &[u8]) -> bool {
    let version = head.get(16..20).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes);
    (has_magic(head, 0, PARALLELS_MAGIC) || has_magic(head, 0, PARALLELS_MAGIC_EXT))
        && version == Some(PARALLELS_VERSION)
        && head.len() >= 64
}

pub(super) fn read_parallels(img: &ImageFile) -> Result<ImageHeader> {
    if !probe_parallels(img.head()) {
        return Err(not_format(img, ImageFormat::Parallels));
    }
    let buf = img.bytes(0, 64, "Parallels header")?;
    let h = Fields::new(&buf, img.path(), "Parallels header");
    let mut sectors = h.le64(36)?;
    // The original format only has a 32-bit sector count (QEMU masks it too).
    if has_magic(&buf, 0, PARALLELS_MAGIC) {
        sectors &= 0xffff_ffff;
    }
    Ok(ImageHeader::standalone(ImageFormat::Parallels, sectors_to_bytes(img, sectors)?))
}
