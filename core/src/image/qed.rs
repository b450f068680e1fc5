//! QED, the QEMU Enhanced Disk format (layout: QEMU's block/qed.h; all
//! fields little-endian).

use super::source::{has_magic, utf8_name, Fields, ImageFile};
use super::{invalid, not_format, ImageFormat, ImageHeader};
use crate::error::Result;

const MAGIC: &[u8] = b"QED\0";
const HEADER_LEN: usize = 64;

const F_BACKING_FILE: u64 = 0x01;
const F_NEED_CHECK: u64 = 0x02;
/// The backing file is raw and must not be probed.
const F_BACKING_FORMAT_NO_PROBE: u64 = 0x04;
const KNOWN_FEATURES: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;

const MIN_CLUSTER_SIZE: u32 = 4 * 1024;
const MAX_CLUSTER_SIZE: u32 = 64 * 1024 * 1024;
/// QEMU reads the backing name into a PATH_MAX buffer, NUL included.
const MAX_BACKING_NAME: u32 = 4095;

pub(super) fn probe(head: &[u8]) -> bool {
    has_magic(head, 0, MAGIC)
}

pub(super) fn read(img: &ImageFile) -> Result<ImageHeader> {
    if !probe(img.head()) {
        return Err(not_format(img, ImageFormat::Qed));
    }
    let path = img.path();
    let buf = img.bytes(0, HEADER_LEN, "QED header")?;
    let h = Fields::new(&buf, path, "QED header");
    let cluster_size = h.le32(4)?;
    let header_clusters = h.le32(12)?;
    let features = h.le64(16)?;
    let virtual_size = h.le64(48)?;
    let backing_offset = h.le32(56)?;
    let backing_len = h.le32(60)?;

    if !cluster_size.is_power_of_two() || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cluster_size) {
        return Err(invalid(img, format_args!("has an invalid QED cluster size of {cluster_size} bytes")));
    }
    let unknown = features & !KNOWN_FEATURES;
    if unknown != 0 {
        return Err(invalid(img, format_args!("uses unknown QED features (bits 0x{unknown:x}); QEMU cannot open it")));
    }

    let (backing_file, backing_format) = if features & F_BACKING_FILE != 0 {
        // Products and sums of two u32 values cannot overflow a u64.
        let header_size = u64::from(cluster_size) * u64::from(header_clusters);
        let name_end = u64::from(backing_offset) + u64::from(backing_len);
        if name_end > header_size {
            return Err(invalid(img, "has a QED backing file name that lies outside its header"));
        }
        if backing_len > MAX_BACKING_NAME {
            return Err(invalid(
                img,
                format_args!("has a backing file name of {backing_len} bytes, which is too long"),
            ));
        }
        let name = img.bytes(u64::from(backing_offset), backing_len as usize, "backing file name")?;
        let name = Some(utf8_name(name, path, "backing file name")?).filter(|name| !name.is_empty());
        let format = (features & F_BACKING_FORMAT_NO_PROBE != 0).then(|| "raw".to_owned());
        (name, format)
    } else {
        (None, None)
    };

    Ok(ImageHeader {
        format: ImageFormat::Qed,
        virtual_size,
        differencing: backing_file.is_some(),
        backing_format: backing_file.as_ref().and(backing_format),
        backing_file,
        parent_uuid: None,
        uuid: None,
    })
}
