//! VMDK: sparse extents ("KDMV", and the older "COWD") and text descriptor
//! files (layout: VMware's Virtual Disk Format 5.0 and QEMU's block/vmdk.c;
//! binary fields little-endian).
//!
//! The parent is the descriptor's `parentFileNameHint`, found the way QEMU
//! finds it (the first occurrence in the first 10 KiB of the descriptor),
//! so that the name reported is the one QEMU will open. QEMU always opens a
//! VMDK parent as VMDK, hence the implied backing format.

use super::source::{c_str, has_magic, utf8_name, Fields, ImageFile};
use super::{invalid, not_format, sectors_to_bytes, ImageFormat, ImageHeader};
use crate::error::Result;

const MAGIC_VMDK4: &[u8] = b"KDMV";
const MAGIC_VMDK3: &[u8] = b"COWD";
const SECTOR: u64 = 512;

/// Where QEMU reads the descriptor of a sparse extent for its parent hint,
/// whatever the header's descriptor offset says.
const SPARSE_DESCRIPTOR_OFFSET: u64 = 0x200;
/// How much descriptor QEMU searches for the parent hint.
const HINT_SEARCH_LEN: usize = 20 * 512;
/// QEMU reads at most this much of a descriptor file.
const MAX_DESCRIPTOR_LEN: usize = (1 << 20) - 1;
/// QEMU's probe looks at this many bytes of a text descriptor.
const PROBE_LEN: usize = 2048;
/// QEMU keeps the parent name in a PATH_MAX buffer, NUL included.
const MAX_PARENT_NAME: usize = 4095;

const HINT_KEY: &[u8] = b"parentFileNameHint";
const CREATE_TYPE_KEY: &[u8] = b"createType";
/// The create types QEMU accepts in a descriptor file.
const DESCRIPTOR_CREATE_TYPES: [&[u8]; 6] =
    [b"monolithicFlat", b"vmfs", b"vmfsSparse", b"seSparse", b"twoGbMaxExtentSparse", b"twoGbMaxExtentFlat"];
/// Extent types QEMU opens; lines with other types are ignored.
const EXTENT_TYPES: [&[u8]; 5] = [b"FLAT", b"SPARSE", b"VMFS", b"VMFSSPARSE", b"SESPARSE"];

/// Grain directory offset meaning "see the footer" (streamOptimized).
const GD_AT_END: u64 = u64::MAX;
const MARKER_FOOTER: u32 = 3;
const MARKER_END_OF_STREAM: u32 = 0;
/// A streamOptimized footer: footer marker, header copy, end-of-stream marker.
const FOOTER_LEN: usize = 1536;

pub(super) fn probe_sparse(head: &[u8]) -> bool {
    has_magic(head, 0, MAGIC_VMDK4) || has_magic(head, 0, MAGIC_VMDK3)
}

/// QEMU's test for a text descriptor: after comment lines and lines of
/// spaces, a `version=1`, `2` or `3` line.
pub(super) fn probe_descriptor(head: &[u8]) -> bool {
    let mut rest = head.get(..PROBE_LEN).unwrap_or(head);
    loop {
        match rest.first() {
            None => return false,
            Some(b'#') => rest = after_newline(rest),
            Some(b' ') => {
                let spaces = rest.iter().take_while(|&&b| b == b' ').count();
                let line = rest.get(spaces..).unwrap_or_default();
                let line = line.strip_prefix(b"\r").unwrap_or(line);
                match line.strip_prefix(b"\n") {
                    Some(next) => rest = next,
                    None => return false,
                }
            }
            Some(_) => {
                let Some(tail) = rest.strip_prefix(b"version=") else {
                    return false;
                };
                return matches!(tail, [b'1'..=b'3', b'\n', ..] | [b'1'..=b'3', b'\r', b'\n', ..]);
            }
        }
    }
}

fn after_newline(text: &[u8]) -> &[u8] {
    match text.iter().position(|&b| b == b'\n') {
        Some(pos) => text.get(pos + 1..).unwrap_or_default(),
        None => &[],
    }
}

pub(super) fn read(img: &ImageFile) -> Result<ImageHeader> {
    let head = img.head();
    let (virtual_size, hint_offset) = if has_magic(head, 0, MAGIC_VMDK4) {
        (vmdk4_size(img)?, SPARSE_DESCRIPTOR_OFFSET)
    } else if has_magic(head, 0, MAGIC_VMDK3) {
        let buf = img.bytes(0, 16, "VMDK (COWD) header")?;
        let sectors = Fields::new(&buf, img.path(), "VMDK (COWD) header").le32(12)?;
        (sectors_to_bytes(img, u64::from(sectors))?, SPARSE_DESCRIPTOR_OFFSET)
    } else {
        let text = img.bytes_up_to(0, MAX_DESCRIPTOR_LEN, "VMDK descriptor")?;
        // Without a createType, only a file that looks like a descriptor is
        // worth calling a damaged one.
        if find(c_str(&text), CREATE_TYPE_KEY).is_none() && !probe_descriptor(head) {
            return Err(not_format(img, ImageFormat::Vmdk));
        }
        (descriptor_size(img, &text)?, 0)
    };

    let backing_file = parent_hint(img, hint_offset)?;
    Ok(ImageHeader {
        format: ImageFormat::Vmdk,
        virtual_size,
        differencing: backing_file.is_some(),
        backing_format: backing_file.as_ref().map(|_| "vmdk".to_owned()),
        backing_file,
        parent_uuid: None,
        uuid: None,
    })
}

/// The size of a "KDMV" sparse extent: its capacity, from the footer for
/// streamOptimized files, or from the embedded descriptor's extents when the
/// header has no capacity (as ESXi writes them).
fn vmdk4_size(img: &ImageFile) -> Result<u64> {
    let path = img.path();
    let buf = img.bytes(0, 80, "VMDK header")?;
    let h = Fields::new(&buf, path, "VMDK header");
    let mut capacity = h.le64(12)?;
    let desc_offset = h.le64(28)?;
    let mut version = h.le32(4)?;
    if capacity == 0 && desc_offset != 0 {
        let offset =
            desc_offset.checked_mul(SECTOR).ok_or_else(|| invalid(img, "has an impossible VMDK descriptor offset"))?;
        let text = img.bytes_up_to(offset, MAX_DESCRIPTOR_LEN, "VMDK descriptor")?;
        return descriptor_size(img, &text);
    }
    if h.le64(56)? == GD_AT_END {
        let offset = img
            .len()
            .checked_sub(FOOTER_LEN as u64)
            .ok_or_else(|| invalid(img, "is too short for the VMDK footer its header announces"))?;
        let buf = img.bytes(offset, FOOTER_LEN, "VMDK footer")?;
        let f = Fields::new(&buf, path, "VMDK footer");
        let valid = f.slice(512, 4)? == MAGIC_VMDK4
            && f.le32(8)? == 0
            && f.le32(12)? == MARKER_FOOTER
            && f.le64(1024)? == 0
            && f.le32(1032)? == 0
            && f.le32(1036)? == MARKER_END_OF_STREAM;
        if !valid {
            return Err(invalid(img, "has an invalid VMDK footer"));
        }
        version = f.le32(516)?;
        capacity = f.le64(524)?;
    }
    if version > 3 {
        return Err(invalid(img, format_args!("has unsupported VMDK version {version}")));
    }
    sectors_to_bytes(img, capacity)
}

/// The size of the disk a descriptor describes: the sum of the extents QEMU
/// would open, as given by their descriptor lines (extent files are not
/// opened).
fn descriptor_size(img: &ImageFile, text: &[u8]) -> Result<u64> {
    let text = c_str(text);
    let create_type = quoted_value(text, CREATE_TYPE_KEY)
        .ok_or_else(|| invalid(img, "has a VMDK descriptor without a valid createType"))?;
    if !DESCRIPTOR_CREATE_TYPES.contains(&create_type) {
        return Err(invalid(
            img,
            format_args!(
                "has VMDK create type '{}', which QEMU does not support in a descriptor file",
                String::from_utf8_lossy(create_type)
            ),
        ));
    }
    let mut sectors: u64 = 0;
    for line in text.split(|&b| b == b'\n') {
        if let Some(extent) = extent_sectors(img, line)? {
            sectors = sectors
                .checked_add(extent)
                .ok_or_else(|| invalid(img, "has VMDK extents adding up to an impossible size"))?;
        }
    }
    sectors_to_bytes(img, sectors)
}

/// The value QEMU takes for `key`: after its first occurrence, skip two
/// bytes (normally `="`) and read up to the next `"`.
fn quoted_value<'t>(text: &'t [u8], key: &[u8]) -> Option<&'t [u8]> {
    let start = find(text, key)?.checked_add(key.len() + 2)?;
    let value = text.get(start..)?;
    let end = value.iter().position(|&b| b == b'"')?;
    value.get(..end)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

/// The sectors of an extent line QEMU would use, `None` for other lines, or
/// an error for a line QEMU rejects. The line format is
/// `ACCESS SECTORS TYPE "FILE" [OFFSET]`; only RW extents count.
fn extent_sectors(img: &ImageFile, line: &[u8]) -> Result<Option<u64>> {
    let mut rest = line;
    let mut token = || {
        let trimmed = rest.trim_ascii_start();
        let end = trimmed.iter().position(u8::is_ascii_whitespace).unwrap_or(trimmed.len());
        let (token, tail) = trimmed.split_at(end);
        rest = tail;
        token
    };
    let access = token();
    let sectors = std::str::from_utf8(token()).ok().and_then(|s| s.parse::<i64>().ok());
    let kind = token();
    let (Some(sectors), true) = (sectors, access == b"RW") else {
        return Ok(None);
    };
    // The file name is quoted and may contain spaces.
    let Some(quoted) = rest.trim_ascii_start().strip_prefix(b"\"") else {
        return Ok(None);
    };
    let name_len = quoted.iter().position(|&b| matches!(b, b'"' | b'\r' | b'\n')).unwrap_or(quoted.len());
    if name_len == 0 || kind.is_empty() || kind.len() > 10 {
        return Ok(None);
    }
    let offset = quoted
        .get(name_len..)
        .and_then(|after| after.strip_prefix(b"\""))
        .and_then(|after| after.split(u8::is_ascii_whitespace).find(|t| !t.is_empty()))
        .and_then(|t| std::str::from_utf8(t).ok())
        .and_then(|t| t.parse::<i64>().ok());

    let well_formed = match kind {
        b"FLAT" => offset.is_some_and(|offset| offset >= 0),
        _ => offset.is_none(),
    };
    if !well_formed {
        let shown: String = String::from_utf8_lossy(line).chars().take(200).collect();
        return Err(invalid(img, format_args!("has an invalid VMDK extent line: {}", shown.trim_end())));
    }
    if sectors <= 0 || !EXTENT_TYPES.contains(&kind) {
        return Ok(None);
    }
    Ok(u64::try_from(sectors).ok())
}

/// The parent name from `parentFileNameHint` in the descriptor at `offset`.
fn parent_hint(img: &ImageFile, offset: u64) -> Result<Option<String>> {
    let buf = img.bytes_up_to(offset, HINT_SEARCH_LEN, "VMDK descriptor")?;
    let text = c_str(&buf);
    if find(text, HINT_KEY).is_none() {
        return Ok(None);
    }
    let name = quoted_value(text, HINT_KEY)
        .ok_or_else(|| invalid(img, "has a malformed parentFileNameHint in its VMDK descriptor"))?;
    if name.len() > MAX_PARENT_NAME {
        return Err(invalid(img, "has a parentFileNameHint that is too long"));
    }
    let name = utf8_name(name.to_vec(), img.path(), "parentFileNameHint")?;
    Ok(Some(name).filter(|name| !name.is_empty()))
}
