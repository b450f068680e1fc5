//! The filesystem on a block device, from its superblock (what libvirt
//! asks libblkid for), so a `type='block'` or loop root is mounted with
//! its own type instead of by trying every type the kernel has.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use strata_core::{Error, Result};

/// The filesystems recognised, in the words `mount -t` takes.
pub const KNOWN: &str = "ext2, ext3, ext4, xfs, btrfs and vfat";

/// Bytes read: enough for btrfs's superblock at 64 KiB.
const PROBE_BYTES: usize = 0x10000 + 0x100;

/// The type of the filesystem at the start of `bytes`, or `None`.
pub fn detect(bytes: &[u8]) -> Option<&'static str> {
    let at = |offset: usize, magic: &[u8]| bytes.get(offset..offset + magic.len()) == Some(magic);
    let le32 = |offset: usize| {
        bytes.get(offset..offset + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(0)
    };
    if at(1024 + 56, &[0x53, 0xEF]) {
        // The ext4 driver mounts ext2 and ext3 too; the features say which it is.
        let (compat, incompat) = (le32(1024 + 92), le32(1024 + 96));
        const EXT4_INCOMPAT: u32 = 0x40 | 0x80 | 0x200 | 0x400 | 0x1000 | 0x8000 | 0x10000;
        return Some(if incompat & EXT4_INCOMPAT != 0 {
            "ext4"
        } else if compat & 0x4 != 0 {
            "ext3"
        } else {
            "ext2"
        });
    }
    if at(0, b"XFSB") {
        return Some("xfs");
    }
    if at(0x10040, b"_BHRfS_M") {
        return Some("btrfs");
    }
    if at(510, &[0x55, 0xAA]) && (at(54, b"FAT") || at(82, b"FAT32")) {
        return Some("vfat");
    }
    None
}

/// The type `mount` is given for a detected filesystem: ext2 and ext3 go
/// through the ext4 driver, which every kernel with ext4 has.
pub fn mount_type(detected: &str) -> &str {
    match detected {
        "ext2" | "ext3" => "ext4",
        other => other,
    }
}

/// Probes the device `device` (holding the filesystem at `target`).
pub fn probe_device(device: &Path, target: &str) -> Result<&'static str> {
    let mut bytes = Vec::with_capacity(PROBE_BYTES);
    File::open(device)
        .and_then(|f| f.take(PROBE_BYTES as u64).read_to_end(&mut bytes))
        .map_err(|e| Error::io(&format!("read the superblock of filesystem '{target}' on"), device, e))?;
    detect(&bytes).ok_or_else(|| {
        Error::operation_failed(format!(
            "filesystem '{target}': '{}' holds no filesystem Strata recognises ({KNOWN} were probed); \
             is it formatted?",
            device.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(len: usize, patches: &[(usize, &[u8])]) -> Vec<u8> {
        let mut b = vec![0u8; len];
        for (offset, bytes) in patches {
            b[*offset..offset + bytes.len()].copy_from_slice(bytes);
        }
        b
    }

    #[test]
    fn superblocks_are_told_apart_and_zeroes_are_nothing() {
        let ext2 = image(4096, &[(1080, &[0x53, 0xEF])]);
        let ext3 = image(4096, &[(1080, &[0x53, 0xEF]), (1116, &[4, 0, 0, 0])]);
        let ext4 = image(4096, &[(1080, &[0x53, 0xEF]), (1116, &[4, 0, 0, 0]), (1120, &[0x42, 0x02, 0, 0])]);
        assert_eq!(detect(&ext2), Some("ext2"));
        assert_eq!(detect(&ext3), Some("ext3"));
        assert_eq!(detect(&ext4), Some("ext4"));
        assert_eq!(detect(&image(4096, &[(0, b"XFSB")])), Some("xfs"));
        assert_eq!(detect(&image(PROBE_BYTES, &[(0x10040, b"_BHRfS_M")])), Some("btrfs"));
        assert_eq!(detect(&image(4096, &[(82, b"FAT32   "), (510, &[0x55, 0xAA])])), Some("vfat"));
        assert_eq!(detect(&image(4096, &[(54, b"FAT16   "), (510, &[0x55, 0xAA])])), Some("vfat"));
        assert_eq!(detect(&image(PROBE_BYTES, &[])), None);
        assert_eq!(detect(&[]), None);
        assert_eq!(mount_type("ext3"), "ext4");
        assert_eq!(mount_type("xfs"), "xfs");
    }
}
