//! VirtualBox VDI, header version 1.1 (layout: QEMU's block/vdi.c, VirtualBox's
//! VDIHEADER1; fields little-endian, UUIDs in Microsoft GUID layout).
//!
//! A VDI child names its parent by UUID only (uuidLinkage), so a differencing
//! VDI has `parent_uuid` but never a `backing_file`.

use super::source::{peek_le32, uuid_le, Fields, ImageFile};
use super::{invalid, not_format, ImageFormat, ImageHeader};
use crate::error::Result;

const SIGNATURE_OFFSET: usize = 0x40;
const SIGNATURE: u32 = 0xbeda_107f;
const VERSION_1_1: u32 = 0x0001_0001;
const HEADER_LEN: usize = 0x200;
const TYPE_DIFF: u32 = 4;

const OFF_VERSION: usize = 0x44;
const OFF_TYPE: usize = 0x4c;
const OFF_DISK_SIZE: usize = 0x170;
const OFF_UUID_CREATE: usize = 0x188;
const OFF_UUID_LINKAGE: usize = 0x1a8;
const OFF_UUID_PARENT_MODIFY: usize = 0x1b8;

pub(super) fn probe(head: &[u8]) -> bool {
    peek_le32(head, SIGNATURE_OFFSET) == Some(SIGNATURE)
}

pub(super) fn read(img: &ImageFile) -> Result<ImageHeader> {
    if !probe(img.head()) {
        return Err(not_format(img, ImageFormat::Vdi));
    }
    let buf = img.bytes(0, HEADER_LEN, "VDI header")?;
    let h = Fields::new(&buf, img.path(), "VDI header");
    let version = h.le32(OFF_VERSION)?;
    if version != VERSION_1_1 {
        return Err(invalid(
            img,
            format_args!("has unsupported VDI header version {}.{}", version >> 16, version & 0xffff),
        ));
    }
    let image_type = h.le32(OFF_TYPE)?;
    // QEMU rounds odd sizes (made by 'VBoxManage convertfromraw') up to a
    // whole sector.
    let disk_size = h.le64(OFF_DISK_SIZE)?;
    let virtual_size = disk_size
        .checked_next_multiple_of(512)
        .ok_or_else(|| invalid(img, format_args!("records an impossible disk size of {disk_size} bytes")))?;
    let uuid = uuid_le(h.array(OFF_UUID_CREATE)?);
    let parent_uuid = uuid_le(h.array(OFF_UUID_LINKAGE)?);
    let parent_modify = uuid_le(h.array(OFF_UUID_PARENT_MODIFY)?);

    Ok(ImageHeader {
        format: ImageFormat::Vdi,
        virtual_size,
        backing_file: None,
        backing_format: None,
        differencing: image_type == TYPE_DIFF || parent_uuid.is_some() || parent_modify.is_some(),
        parent_uuid,
        uuid,
    })
}
