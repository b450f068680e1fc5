//! VHDX (layout: Microsoft's [MS-VHDX] specification and QEMU's block/vhdx.c;
//! fields little-endian, GUIDs in Microsoft's mixed-endian layout).
//!
//! The path to the metadata: the region table (at 192 KiB, backup at 256 KiB,
//! CRC-32C protected) locates the metadata region, whose table lists the
//! metadata items by GUID. QEMU does not open differencing VHDX files; their
//! parent is reported so that a caller can refuse them knowingly.

use super::source::{has_magic, utf16_string, Fields, ImageFile};
use super::{invalid, not_format, ImageFormat, ImageHeader};
use crate::error::Result;

const MAGIC: &[u8] = b"vhdxfile";

const KIB: u64 = 1024;
const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
const REGION_TABLE_LEN: usize = 64 * 1024;
const REGION_SIGNATURE: &[u8] = b"regi";
const METADATA_TABLE_LEN: usize = 64 * 1024;
const METADATA_SIGNATURE: &[u8] = b"metadata";
/// The specification's limit for both region and metadata table entries.
const MAX_TABLE_ENTRIES: usize = 2047;
/// The specification's limit on the size of one metadata item.
const MAX_ITEM_LEN: u32 = 1024 * 1024;

const REGION_REQUIRED: u32 = 1;
const METADATA_IS_REQUIRED: u32 = 1 << 2;
const FILE_PARAMS_HAS_PARENT: u32 = 1 << 1;

/// The on-disk bytes of a GUID given in its canonical text order
/// (`0xAAAAAAAA_BBBB_CCCC_DDDD_EEEEEEEEEEEE`): the first three fields are
/// stored little-endian, the last eight bytes as they are.
const fn guid(canonical: u128) -> [u8; 16] {
    let b = canonical.to_be_bytes();
    [b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]
}

const REGION_BAT: [u8; 16] = guid(0x2dc27766_f623_4200_9d64_115e9bfd4a08);
const REGION_METADATA: [u8; 16] = guid(0x8b7ca206_4790_4b9a_b8fe_575f050f886e);

const ITEM_FILE_PARAMETERS: [u8; 16] = guid(0xcaa16737_fa36_4d43_b3b6_33f0aa44e76b);
const ITEM_VIRTUAL_DISK_SIZE: [u8; 16] = guid(0x2fa54224_cd1b_4876_b211_5dbed83bf4b8);
const ITEM_PAGE83_DATA: [u8; 16] = guid(0xbeca12ab_b2e6_4523_93ef_c309e000c746);
const ITEM_LOGICAL_SECTOR_SIZE: [u8; 16] = guid(0x8141bf1d_a96f_4709_ba47_f233a8faab5f);
const ITEM_PHYSICAL_SECTOR_SIZE: [u8; 16] = guid(0xcda348c7_445d_4471_9cc9_e9885251c556);
const ITEM_PARENT_LOCATOR: [u8; 16] = guid(0xa8d35f2d_b30b_454d_abf7_d3d84834ab0c);

pub(super) fn probe(head: &[u8]) -> bool {
    has_magic(head, 0, MAGIC)
}

/// One metadata table entry: where an item lies in the metadata region.
#[derive(Clone, Copy)]
struct Item {
    offset: u32,
    len: u32,
}

#[derive(Default)]
struct Items {
    file_parameters: Option<Item>,
    virtual_disk_size: Option<Item>,
    parent_locator: Option<Item>,
}

pub(super) fn read(img: &ImageFile) -> Result<ImageHeader> {
    if !probe(img.head()) {
        return Err(not_format(img, ImageFormat::Vhdx));
    }
    let metadata_offset = metadata_region(img)?;
    let items = metadata_items(img, metadata_offset)?;

    let file_parameters =
        items.file_parameters.ok_or_else(|| invalid(img, "lacks the required VHDX file parameters metadata item"))?;
    let params = read_item(img, metadata_offset, file_parameters, 8, "VHDX file parameters")?;
    let has_parent = Fields::new(&params, img.path(), "VHDX file parameters").le32(4)? & FILE_PARAMS_HAS_PARENT != 0;

    let size_item = items
        .virtual_disk_size
        .ok_or_else(|| invalid(img, "lacks the required VHDX virtual disk size metadata item"))?;
    let size = read_item(img, metadata_offset, size_item, 8, "VHDX virtual disk size")?;
    let virtual_size = Fields::new(&size, img.path(), "VHDX virtual disk size").le64(0)?;

    let mut header = ImageHeader::standalone(ImageFormat::Vhdx, virtual_size);
    header.differencing = has_parent;
    if let Some(locator) = items.parent_locator.filter(|_| has_parent) {
        let len = locator.len;
        let bytes = read_item(img, metadata_offset, locator, len, "VHDX parent locator")?;
        let locator = parse_parent_locator(img, &bytes)?;
        header.backing_file = locator.path;
        header.parent_uuid = locator.linkage;
    }
    Ok(header)
}

/// The file offset of the metadata region, from the first region table copy
/// with a valid signature and checksum.
fn metadata_region(img: &ImageFile) -> Result<u64> {
    let mut table = None;
    for offset in REGION_TABLE_OFFSETS {
        let buf = img.bytes(offset, REGION_TABLE_LEN, "VHDX region table")?;
        if region_table_is_valid(&buf) {
            table = Some(buf);
            break;
        }
    }
    let table = table.ok_or_else(|| invalid(img, "has no valid VHDX region table (both copies are damaged)"))?;
    let t = Fields::new(&table, img.path(), "VHDX region table");
    let count = t.le32(8)? as usize;
    if count > MAX_TABLE_ENTRIES {
        return Err(invalid(img, format_args!("has {count} VHDX region table entries, more than allowed")));
    }
    let (mut metadata, mut bat_seen) = (None, false);
    for i in 0..count {
        let base = 16 + i * 32;
        let id: [u8; 16] = t.array(base)?;
        let file_offset = t.le64(base + 16)?;
        let required = t.le32(base + 28)? & REGION_REQUIRED != 0;
        let duplicate = match id {
            REGION_METADATA => metadata.replace(file_offset).is_some(),
            REGION_BAT => std::mem::replace(&mut bat_seen, true),
            _ if required => {
                return Err(invalid(img, "requires a VHDX region that Strata does not know"));
            }
            _ => false,
        };
        if duplicate {
            return Err(invalid(img, "has a duplicate VHDX region table entry"));
        }
    }
    metadata.ok_or_else(|| invalid(img, "has no VHDX metadata region"))
}

fn region_table_is_valid(table: &[u8]) -> bool {
    let (Some(signature), Some(stored), Some(rest)) = (table.get(..4), table.get(4..8), table.get(8..)) else {
        return false;
    };
    let stored = stored.try_into().ok().map(u32::from_le_bytes);
    // The checksum covers the whole table with its own field taken as zero.
    let crc = crc32c::checksum(&[signature, &[0; 4], rest]);
    signature == REGION_SIGNATURE && stored == Some(crc)
}

fn metadata_items(img: &ImageFile, metadata_offset: u64) -> Result<Items> {
    let table = img.bytes(metadata_offset, METADATA_TABLE_LEN, "VHDX metadata table")?;
    let t = Fields::new(&table, img.path(), "VHDX metadata table");
    if t.slice(0, METADATA_SIGNATURE.len())? != METADATA_SIGNATURE {
        return Err(invalid(img, "has a VHDX metadata table without its 'metadata' signature"));
    }
    let count = usize::from(t.le16(10)?);
    if count > MAX_TABLE_ENTRIES {
        return Err(invalid(img, format_args!("has {count} VHDX metadata entries, more than allowed")));
    }
    let mut items = Items::default();
    for i in 0..count {
        let base = 32 + i * 32;
        let id: [u8; 16] = t.array(base)?;
        let item = Item { offset: t.le32(base + 16)?, len: t.le32(base + 20)? };
        let required = t.le32(base + 24)? & METADATA_IS_REQUIRED != 0;
        let slot = match id {
            ITEM_FILE_PARAMETERS => &mut items.file_parameters,
            ITEM_VIRTUAL_DISK_SIZE => &mut items.virtual_disk_size,
            ITEM_PARENT_LOCATOR => &mut items.parent_locator,
            ITEM_PAGE83_DATA | ITEM_LOGICAL_SECTOR_SIZE | ITEM_PHYSICAL_SECTOR_SIZE => continue,
            _ if required => {
                return Err(invalid(img, "requires a VHDX metadata item that Strata does not know"));
            }
            _ => continue,
        };
        if slot.replace(item).is_some() {
            return Err(invalid(img, "has a duplicate VHDX metadata table entry"));
        }
    }
    Ok(items)
}

/// The first `len` bytes of a metadata item, which must be at least that long.
fn read_item(img: &ImageFile, metadata_offset: u64, item: Item, len: u32, what: &str) -> Result<Vec<u8>> {
    if item.len < len || len > MAX_ITEM_LEN {
        return Err(invalid(img, format_args!("has a {what} metadata item of invalid length {}", item.len)));
    }
    let offset = metadata_offset
        .checked_add(u64::from(item.offset))
        .ok_or_else(|| invalid(img, format_args!("has a {what} metadata item at an impossible offset")))?;
    img.bytes(offset, len as usize, what)
}

struct ParentLocator {
    path: Option<String>,
    linkage: Option<String>,
}

/// Decodes the key/value pairs (UTF-16LE, offsets relative to the item) of
/// a parent locator. The relative path is preferred, as Hyper-V does, then
/// the absolute and volume paths.
fn parse_parent_locator(img: &ImageFile, bytes: &[u8]) -> Result<ParentLocator> {
    let l = Fields::new(bytes, img.path(), "VHDX parent locator");
    let count = usize::from(l.le16(18)?);
    let mut pairs = Vec::with_capacity(count);
    for i in 0..count {
        let base = 20 + i * 12;
        let key = l.slice(l.le32(base)? as usize, usize::from(l.le16(base + 8)?))?;
        let value = l.slice(l.le32(base + 4)? as usize, usize::from(l.le16(base + 10)?))?;
        if let (Some(key), Some(value)) = (utf16_string(key, false), utf16_string(value, false)) {
            pairs.push((key, value));
        }
    }
    let get = |wanted: &str| {
        pairs.iter().find(|(key, value)| key == wanted && !value.is_empty()).map(|(_, value)| value.clone())
    };
    let path = get("relative_path").or_else(|| get("absolute_win32_path")).or_else(|| get("volume_path"));
    let linkage = get("parent_linkage").map(|guid| guid.trim_matches(|c| c == '{' || c == '}').to_ascii_lowercase());
    Ok(ParentLocator { path, linkage })
}

/// CRC-32C (Castagnoli), as used by VHDX checksums.
mod crc32c {
    const POLY: u32 = 0x82f6_3b78;

    const TABLE: [u32; 256] = {
        let mut table = [0; 256];
        let mut i = 0;
        while i < 256 {
            let mut crc = i as u32;
            let mut bit = 0;
            while bit < 8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ POLY } else { crc >> 1 };
                bit += 1;
            }
            table[i] = crc;
            i += 1;
        }
        table
    };

    /// The checksum of the concatenation of `parts`.
    pub(super) fn checksum(parts: &[&[u8]]) -> u32 {
        let mut crc = !0u32;
        for &byte in parts.iter().copied().flatten() {
            // Truncating to the low byte is the table lookup of the algorithm.
            crc = TABLE[usize::from(crc as u8 ^ byte)] ^ (crc >> 8);
        }
        !crc
    }
}
