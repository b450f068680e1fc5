//! Image header probing (native Rust, no qemu-img at run time).
//!
//! [`detect_format`] recognises a format from its magic bytes alone;
//! [`read_header`] parses the header of a file whose format is already
//! trusted (from domain XML or a parent's backing-format field) and returns
//! what a backing-chain walk needs: virtual size, backing file name and
//! format, and whether the image depends on a parent.
//!
//! Each file is opened once and read with a few positioned reads of the
//! header areas only: chains can be thousands of images deep. Nothing read
//! from a file can make these functions panic; a header that QEMU would
//! refuse, or that Strata cannot follow safely, is a
//! [`ErrorKind::StorageProbeFailed`] error naming the file.
//!
//! [`create_qcow2_overlay`] is the one writer: a new qcow2 overlay's header,
//! written without opening the backing chain.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::error::{Error, ErrorKind, Result};

mod other;
mod overlay;
mod qcow;
mod qed;
mod source;
mod vdi;
mod vhd;
mod vhdx;
mod vmdk;

#[cfg(test)]
mod tests;

pub use overlay::{create_qcow2_overlay, write_qcow2_overlay, UnsyncedOverlay};
use source::ImageFile;

/// The trailing area where fixed VHD footers and DMG trailers live.
const TAIL_LEN: usize = 512;

/// A disk image format, named as QEMU and libvirt name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
    Qcow,
    Qed,
    Vmdk,
    Vdi,
    Vhdx,
    Vpc,
    Luks,
    Iso,
    Dmg,
    Bochs,
    Cloop,
    Parallels,
}

impl ImageFormat {
    /// Every format, in the order used when listing accepted names.
    pub const ALL: [ImageFormat; 14] = [
        ImageFormat::Raw,
        ImageFormat::Qcow2,
        ImageFormat::Qcow,
        ImageFormat::Qed,
        ImageFormat::Vmdk,
        ImageFormat::Vdi,
        ImageFormat::Vhdx,
        ImageFormat::Vpc,
        ImageFormat::Luks,
        ImageFormat::Iso,
        ImageFormat::Dmg,
        ImageFormat::Bochs,
        ImageFormat::Cloop,
        ImageFormat::Parallels,
    ];

    /// The QEMU/libvirt name of the format.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Qcow => "qcow",
            ImageFormat::Qed => "qed",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Vdi => "vdi",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Vpc => "vpc",
            ImageFormat::Luks => "luks",
            ImageFormat::Iso => "iso",
            ImageFormat::Dmg => "dmg",
            ImageFormat::Bochs => "bochs",
            ImageFormat::Cloop => "cloop",
            ImageFormat::Parallels => "parallels",
        }
    }

    /// Whether QEMU opens a backing file named in this format's header.
    /// VHD and VHDX differencing disks and VDI children are reported
    /// (`differencing`) but QEMU never follows their parents.
    pub fn supports_backing(self) -> bool {
        matches!(self, ImageFormat::Qcow2 | ImageFormat::Qcow | ImageFormat::Qed | ImageFormat::Vmdk)
    }
}

impl FromStr for ImageFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if s == "vhd" {
            return Ok(ImageFormat::Vpc);
        }
        ImageFormat::ALL.into_iter().find(|format| format.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = ImageFormat::ALL.iter().map(|f| f.as_str()).collect();
            Error::invalid_arg(format!(
                "unknown image format '{s}'; accepted formats are {} (and 'vhd' for 'vpc')",
                names.join(", ")
            ))
        })
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a backing-chain walk needs to know about one image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageHeader {
    pub format: ImageFormat,
    /// Guest-visible size in bytes; for raw, the file or device size.
    pub virtual_size: u64,
    /// The backing string exactly as written in the header: relative,
    /// absolute, a URI such as `nbd://…`, or `json:{…}`.
    pub backing_file: Option<String>,
    /// The backing format as recorded in the header, unparsed.
    pub backing_format: Option<String>,
    /// Whether the image depends on a parent: it names a backing file, or it
    /// is a VHD/VHDX differencing disk or a VDI child.
    pub differencing: bool,
    /// The parent's UUID (VDI linkage UUID, VHD/VHDX parent identifier),
    /// canonical lowercase, when the header records one.
    pub parent_uuid: Option<String>,
    /// The image's own UUID (VDI, VHD) when the header records one.
    pub uuid: Option<String>,
}

impl ImageHeader {
    /// A header with a size and nothing else.
    fn standalone(format: ImageFormat, virtual_size: u64) -> Self {
        ImageHeader {
            format,
            virtual_size,
            backing_file: None,
            backing_format: None,
            differencing: false,
            parent_uuid: None,
            uuid: None,
        }
    }
}

/// Detect the format from magic bytes only. Anything without a known magic is Raw.
pub fn detect_format(path: &Path) -> Result<ImageFormat> {
    detect(&ImageFile::open(path)?)
}

/// Parse the header of `path` assuming `format` (a trusted format from XML or a backing-format field).
///
/// Raw returns the size only and never looks at the content, since a guest
/// can write any header into a raw disk. For other formats, a file whose
/// magic does not match `format` is an error saying it is not such an image.
pub fn read_header(path: &Path, format: ImageFormat) -> Result<ImageHeader> {
    if format == ImageFormat::Raw {
        let img = ImageFile::open_for_size(path)?;
        return Ok(ImageHeader::standalone(ImageFormat::Raw, img.len()));
    }
    parse(&ImageFile::open(path)?, format)
}

/// detect_format + read_header.
pub fn probe(path: &Path) -> Result<ImageHeader> {
    let img = ImageFile::open(path)?;
    let format = detect(&img)?;
    if format == ImageFormat::Raw {
        return Ok(ImageHeader::standalone(ImageFormat::Raw, img.len()));
    }
    parse(&img, format)
}

/// Magic-byte detection, in the spirit of QEMU's probes: formats with a magic
/// at the start of the file first, then those found further in (ISO 9660) or
/// at the end (fixed VHD footer, DMG trailer).
fn detect(img: &ImageFile) -> Result<ImageFormat> {
    let head = img.head();
    let at_start = [
        (ImageFormat::Qcow2, qcow::is_qcow2(head)),
        (ImageFormat::Qcow, qcow::is_qcow(head)),
        (ImageFormat::Qed, qed::probe(head)),
        (ImageFormat::Vmdk, vmdk::probe_sparse(head)),
        (ImageFormat::Vhdx, vhdx::probe(head)),
        (ImageFormat::Vpc, vhd::probe(head)),
        (ImageFormat::Vdi, vdi::probe(head)),
        (ImageFormat::Luks, other::probe_luks(head)),
        (ImageFormat::Bochs, other::probe_bochs(head)),
        (ImageFormat::Cloop, other::probe_cloop(head)),
        (ImageFormat::Parallels, other::probe_parallels(head)),
        (ImageFormat::Vmdk, vmdk::probe_descriptor(head)),
    ];
    if let Some((format, _)) = at_start.into_iter().find(|(_, found)| *found) {
        return Ok(format);
    }
    if other::probe_iso(img)? {
        return Ok(ImageFormat::Iso);
    }
    // A fixed VHD footer and a DMG trailer both fill the last 512 bytes.
    let tail = match img.len().checked_sub(TAIL_LEN as u64) {
        Some(offset) => img.bytes(offset, TAIL_LEN, "last sector")?,
        None => Vec::new(),
    };
    if vhd::probe_tail(&tail) {
        return Ok(ImageFormat::Vpc);
    }
    if other::probe_dmg_tail(&tail) {
        return Ok(ImageFormat::Dmg);
    }
    Ok(ImageFormat::Raw)
}

fn parse(img: &ImageFile, format: ImageFormat) -> Result<ImageHeader> {
    match format {
        ImageFormat::Raw => Ok(ImageHeader::standalone(ImageFormat::Raw, img.len())),
        ImageFormat::Qcow2 => qcow::read_qcow2(img),
        ImageFormat::Qcow => qcow::read_qcow(img),
        ImageFormat::Qed => qed::read(img),
        ImageFormat::Vmdk => vmdk::read(img),
        ImageFormat::Vdi => vdi::read(img),
        ImageFormat::Vhdx => vhdx::read(img),
        ImageFormat::Vpc => vhd::read(img),
        ImageFormat::Luks => other::read_luks(img),
        ImageFormat::Iso => other::read_iso(img),
        ImageFormat::Dmg => other::read_dmg(img),
        ImageFormat::Bochs => other::read_bochs(img),
        ImageFormat::Cloop => other::read_cloop(img),
        ImageFormat::Parallels => other::read_parallels(img),
    }
}

/// The error for a file whose magic does not match the format it was read as.
fn not_format(img: &ImageFile, format: ImageFormat) -> Error {
    Error::new(
        ErrorKind::StorageProbeFailed,
        format!("'{}' is not a {format} image (its format magic is missing)", img.path().display()),
    )
}

/// A [`ErrorKind::StorageProbeFailed`] error about `img`: "'<path>' <what>".
fn invalid(img: &ImageFile, what: impl fmt::Display) -> Error {
    Error::probe_failed(format!("'{}' {what}", img.path().display()))
}

/// `sectors` 512-byte sectors in bytes, or an error about `img` if that
/// overflows.
fn sectors_to_bytes(img: &ImageFile, sectors: u64) -> Result<u64> {
    sectors
        .checked_mul(512)
        .ok_or_else(|| invalid(img, format_args!("records an impossible size of {sectors} sectors")))
}
