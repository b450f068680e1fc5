//! Writing a new, empty qcow2 overlay natively: the header that names a
//! backing image and its format, and the metadata an empty image needs.
//!
//! `qemu-img create -b` opens the whole backing chain to write one header
//! (an offline snapshot of a 5,000-deep chain took minutes and hundreds of
//! megabytes inside it); the header only needs the backing image's name,
//! format and virtual size, which the chain prober has already read.
//!
//! The layout is the one `qemu-img create -f qcow2 -b B -F FMT` of QEMU 7.2
//! writes (`compat=1.1`, 64 KiB clusters, 16-bit refcounts, lazy refcounts
//! off), byte for byte: cluster 0 holds the version 3 header, the backing
//! format extension, the feature name table and the backing name; cluster
//! 1 the refcount table, cluster 2 its one refcount block, and cluster 3 on
//! the (all zero) L1 table.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::qcow::{EXT_BACKING_FORMAT, EXT_END, MAGIC, MAX_BACKING_NAME, V3_MIN_HEADER_LEN};
use super::ImageFormat;
use crate::error::{Error, Result};

const CLUSTER_BITS: u32 = 16;
const CLUSTER_SIZE: u64 = 1 << CLUSTER_BITS;
/// The version 3 header with QEMU 7.2's compression type byte, padded to 8.
const HEADER_LEN: u32 = V3_MIN_HEADER_LEN + 8;
/// 16-bit refcounts.
const REFCOUNT_ORDER: u32 = 4;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Bytes of one L1 entry; one L1 entry maps one L2 table of
/// `CLUSTER_SIZE / 8` entries, each mapping one cluster.
const L1_ENTRY: u64 = 8;
const BYTES_PER_L1_ENTRY: u64 = CLUSTER_SIZE * (CLUSTER_SIZE / 8);
/// QEMU's limit on the L1 table (`QCOW_MAX_L1_SIZE`, 32 MiB).
const MAX_L1_BYTES: u64 = 32 << 20;
const REFCOUNT_TABLE_OFFSET: u64 = CLUSTER_SIZE;
const REFCOUNT_BLOCK_OFFSET: u64 = 2 * CLUSTER_SIZE;
const L1_TABLE_OFFSET: u64 = 3 * CLUSTER_SIZE;

/// QEMU's feature name table: (type, bit, name); type 0 incompatible, 1
/// compatible, 2 autoclear.
const FEATURES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];
const FEATURE_NAME_LEN: usize = 46;

/// Creates (or, like `qemu-img create`, truncates) `path` as an empty qcow2
/// image of `virtual_size` bytes (rounded up to 512, as QEMU does) whose
/// header names `backing` in `backing_format`, and syncs it and its
/// directory before returning, so that nothing can name it before it is
/// on disk. The backing image is not opened: `backing` is written as given.
/// A block device at `path` is written in place, zeros included.
pub fn create_qcow2_overlay(path: &Path, backing: &str, backing_format: ImageFormat, virtual_size: u64) -> Result<()> {
    write_qcow2_overlay(path, backing, backing_format, virtual_size)?.sync()
}

/// [`create_qcow2_overlay`] without the sync: the overlay is written but
/// not yet on disk, for a caller that has other work to do in the time the
/// sync takes (a live snapshot adds the overlay's nodes to QEMU, which
/// reads it from the page cache) and calls [`UnsyncedOverlay::sync`]
/// before anything can name the overlay.
pub fn write_qcow2_overlay(
    path: &Path,
    backing: &str,
    backing_format: ImageFormat,
    virtual_size: u64,
) -> Result<UnsyncedOverlay> {
    let layout = Layout::new(path, backing, virtual_size)?;
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::io("create", path, e))?;
    let regular = file.metadata().map_err(|e| Error::io("stat", path, e))?.is_file();
    let metadata = layout.metadata(backing, backing_format);
    let written = if regular {
        // The file is empty: write what is not zero and let the length
        // make the rest, which reads as zeros without being written.
        metadata
            .iter()
            .try_for_each(|(offset, bytes)| file.write_all_at(bytes, *offset))
            .and_then(|()| file.set_len(layout.end()))
    } else {
        write_with_zeros(&file, &metadata, layout.end())
    };
    let overlay = UnsyncedOverlay { file, path: path.to_path_buf(), regular };
    match written {
        Ok(()) => Ok(overlay),
        Err(e) => Err(overlay.fail(Error::io("write", path, e))),
    }
}

/// An overlay [`write_qcow2_overlay`] wrote, not yet synced.
#[derive(Debug)]
pub struct UnsyncedOverlay {
    file: File,
    path: PathBuf,
    regular: bool,
}

impl UnsyncedOverlay {
    /// Syncs the overlay and its directory. On failure a regular file is
    /// removed.
    pub fn sync(self) -> Result<()> {
        if let Err(e) = self.file.sync_all() {
            let err = Error::io("sync", &self.path, e);
            return Err(self.fail(err));
        }
        let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("sync directory", dir, e))
    }

    /// A half-written overlay must not be left for a later command to take
    /// for a snapshot's image (a full filesystem fails here); a block
    /// device is the caller's and stays.
    fn fail(self, err: Error) -> Error {
        if self.regular {
            let _ = std::fs::remove_file(&self.path);
        }
        err
    }
}

/// Writes `[0, end)` of a block device: the `metadata` pieces (sorted, not
/// overlapping) and zeros between and after them, so that whatever the
/// device held before reads as nothing.
fn write_with_zeros(file: &File, metadata: &[(u64, Vec<u8>)], end: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; CLUSTER_SIZE as usize];
    let mut at = 0;
    for (offset, bytes) in metadata.iter().map(|(o, b)| (*o, b.as_slice())).chain([(end, &[][..])]) {
        while at < offset {
            let n = (offset - at).min(CLUSTER_SIZE);
            file.write_all_at(&zeros[..n as usize], at)?;
            at += n;
        }
        file.write_all_at(bytes, offset)?;
        at = offset + bytes.len() as u64;
    }
    Ok(())
}

/// The sizes that depend on the image: its virtual size and L1 table.
struct Layout {
    virtual_size: u64,
    l1_entries: u64,
}

impl Layout {
    fn new(path: &Path, backing: &str, virtual_size: u64) -> Result<Self> {
        let refuse =
            |what: String| Error::invalid_arg(format!("cannot create qcow2 overlay '{}': {what}", path.display()));
        if backing.is_empty() || backing.len() > MAX_BACKING_NAME as usize {
            return Err(refuse(format!(
                "its backing file name must be 1 to {MAX_BACKING_NAME} bytes long, not {}",
                backing.len()
            )));
        }
        let virtual_size = virtual_size
            .checked_next_multiple_of(512)
            .filter(|size| size.div_ceil(BYTES_PER_L1_ENTRY) * L1_ENTRY <= MAX_L1_BYTES)
            .ok_or_else(|| refuse(format!("a virtual size of {virtual_size} bytes is larger than qcow2 allows")))?;
        Ok(Layout { virtual_size, l1_entries: virtual_size.div_ceil(BYTES_PER_L1_ENTRY) })
    }

    fn l1_bytes(&self) -> u64 {
        self.l1_entries * L1_ENTRY
    }

    /// Clusters in use: header, refcount table and block, the L1 table.
    fn clusters(&self) -> u64 {
        3 + self.l1_bytes().div_ceil(CLUSTER_SIZE)
    }

    /// Where the image ends: after the L1 table.
    fn end(&self) -> u64 {
        L1_TABLE_OFFSET + self.l1_bytes()
    }

    /// The bytes that are not zero, by offset: the header cluster's used
    /// start, the refcount table's one entry and the refcount block's
    /// entries, one for each cluster in use.
    fn metadata(&self, backing: &str, backing_format: ImageFormat) -> [(u64, Vec<u8>); 3] {
        let refcounts = (0..self.clusters()).flat_map(|_| 1u16.to_be_bytes()).collect();
        [
            (0, self.header_cluster(backing, backing_format)),
            (REFCOUNT_TABLE_OFFSET, REFCOUNT_BLOCK_OFFSET.to_be_bytes().to_vec()),
            (REFCOUNT_BLOCK_OFFSET, refcounts),
        ]
    }

    /// The header, its extensions and the backing name: the used start of
    /// cluster 0.
    fn header_cluster(&self, backing: &str, backing_format: ImageFormat) -> Vec<u8> {
        let mut extensions = Vec::new();
        push_extension(&mut extensions, EXT_BACKING_FORMAT, backing_format.as_str().as_bytes());
        let mut table = Vec::with_capacity(FEATURES.len() * (2 + FEATURE_NAME_LEN));
        for (kind, bit, name) in FEATURES {
            table.extend_from_slice(&[kind, bit]);
            let mut field = [0u8; FEATURE_NAME_LEN];
            field[..name.len()].copy_from_slice(name.as_bytes());
            table.extend_from_slice(&field);
        }
        push_extension(&mut extensions, EXT_FEATURE_TABLE, &table);
        push_extension(&mut extensions, EXT_END, &[]);
        let backing_offset = u64::from(HEADER_LEN) + extensions.len() as u64;

        let mut h = Vec::with_capacity(backing_offset as usize + backing.len());
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&3u32.to_be_bytes()); // version
        h.extend_from_slice(&backing_offset.to_be_bytes());
        h.extend_from_slice(&(backing.len() as u32).to_be_bytes());
        h.extend_from_slice(&CLUSTER_BITS.to_be_bytes());
        h.extend_from_slice(&self.virtual_size.to_be_bytes());
        h.extend_from_slice(&0u32.to_be_bytes()); // no encryption
        h.extend_from_slice(&(self.l1_entries as u32).to_be_bytes());
        let l1_offset = if self.l1_entries == 0 { 0 } else { L1_TABLE_OFFSET };
        h.extend_from_slice(&l1_offset.to_be_bytes());
        h.extend_from_slice(&REFCOUNT_TABLE_OFFSET.to_be_bytes());
        h.extend_from_slice(&1u32.to_be_bytes()); // refcount table clusters
        h.extend_from_slice(&0u32.to_be_bytes()); // snapshots
        h.extend_from_slice(&0u64.to_be_bytes()); // snapshot table offset
        h.extend_from_slice(&[0u8; 24]); // incompatible, compatible, autoclear features
        h.extend_from_slice(&REFCOUNT_ORDER.to_be_bytes());
        h.extend_from_slice(&HEADER_LEN.to_be_bytes());
        h.resize(HEADER_LEN as usize, 0); // compression type zlib, padding
        h.extend_from_slice(&extensions);
        h.extend_from_slice(backing.as_bytes());
        h
    }
}

/// A header extension: type, length, data padded to 8 bytes.
fn push_extension(out: &mut Vec<u8>, kind: u32, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(8), 0);
}
