//! Bounded reads from an image file, and panic-free decoding of header fields.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind as IoErrorKind, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, Result};

/// How much of the start of a file is read up front. It covers every magic
/// tested at offset 0, every fixed header, and in practice the qcow2 extension
/// area and backing name, so most images are probed with this single read.
const HEAD_SIZE: usize = 4096;

/// An open image file (regular file or block device) with its length and,
/// unless opened for size only, its first [`HEAD_SIZE`] bytes.
pub(super) struct ImageFile<'a> {
    path: &'a Path,
    file: File,
    len: u64,
    head: Vec<u8>,
}

impl<'a> ImageFile<'a> {
    /// Opens `path` and learns its length without reading any content.
    pub(super) fn open_for_size(path: &'a Path) -> Result<Self> {
        // O_NONBLOCK keeps a FIFO planted at the path from hanging the open;
        // it has no effect on reads from regular files and block devices.
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| Error::io("open", path, e))?;
        let metadata = file.metadata().map_err(|e| Error::io("stat", path, e))?;
        let file_type = metadata.file_type();
        if file_type.is_dir() {
            return Err(Error::probe_failed(format!("'{}' is a directory, not a disk image", path.display())));
        }
        if !file_type.is_file() && !file_type.is_block_device() {
            return Err(Error::probe_failed(format!(
                "'{}' is neither a regular file nor a block device",
                path.display()
            )));
        }
        // A block device's metadata reports a length of 0: its size is where
        // a seek to its end lands.
        let len = if file_type.is_block_device() {
            file.seek(SeekFrom::End(0)).map_err(|e| Error::io("seek", path, e))?
        } else {
            metadata.len()
        };
        Ok(ImageFile { path, file, len, head: Vec::new() })
    }

    /// Opens `path` and reads the start of the file for format detection and
    /// header parsing.
    pub(super) fn open(path: &'a Path) -> Result<Self> {
        let mut img = Self::open_for_size(path)?;
        let head_len = usize::try_from(img.len).map_or(HEAD_SIZE, |len| len.min(HEAD_SIZE));
        img.head = img.read_exact(0, head_len, "first bytes")?;
        Ok(img)
    }

    pub(super) fn path(&self) -> &'a Path {
        self.path
    }

    /// The file's length in bytes (the device size for block devices).
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// The first bytes of the file (fewer than [`HEAD_SIZE`] for small files).
    pub(super) fn head(&self) -> &[u8] {
        &self.head
    }

    /// Exactly `len` bytes at `offset`; a range reaching past the end of the
    /// file is an error naming `what` was being read.
    pub(super) fn bytes(&self, offset: u64, len: usize, what: &str) -> Result<Vec<u8>> {
        let start = usize::try_from(offset).ok();
        let cached =
            start.and_then(|start| Some(start..start.checked_add(len)?)).and_then(|range| self.head.get(range));
        match cached {
            Some(bytes) => Ok(bytes.to_vec()),
            None => self.read_exact(offset, len, what),
        }
    }

    /// Up to `max` bytes at `offset`, fewer when the file ends sooner.
    pub(super) fn bytes_up_to(&self, offset: u64, max: usize, what: &str) -> Result<Vec<u8>> {
        let available = self.len.saturating_sub(offset);
        let len = usize::try_from(available).map_or(max, |available| available.min(max));
        self.bytes(offset, len, what)
    }

    fn read_exact(&self, offset: u64, len: usize, what: &str) -> Result<Vec<u8>> {
        let end = u64::try_from(len).ok().and_then(|len| offset.checked_add(len));
        if end.is_none_or(|end| end > self.len) {
            return Err(self.truncated(offset, len, what));
        }
        let mut buf = vec![0; len];
        match self.file.read_exact_at(&mut buf, offset) {
            Ok(()) => Ok(buf),
            // The file shrank after its length was taken.
            Err(e) if e.kind() == IoErrorKind::UnexpectedEof => Err(self.truncated(offset, len, what)),
            Err(e) => Err(Error::io("read", self.path, e)),
        }
    }

    fn truncated(&self, offset: u64, len: usize, what: &str) -> Error {
        Error::probe_failed(format!(
            "'{}' is truncated or damaged: its {what} ({len} bytes at offset {offset}) \
             lies beyond the end of the file ({} bytes)",
            self.path.display(),
            self.len
        ))
    }
}

/// Bounds-checked access to the fields of a header read from `path`; a field
/// outside the buffer is reported as a truncated `what`.
pub(super) struct Fields<'a> {
    buf: &'a [u8],
    path: &'a Path,
    what: &'a str,
}

impl<'a> Fields<'a> {
    pub(super) fn new(buf: &'a [u8], path: &'a Path, what: &'a str) -> Self {
        Fields { buf, path, what }
    }

    pub(super) fn slice(&self, offset: usize, len: usize) -> Result<&'a [u8]> {
        offset.checked_add(len).and_then(|end| self.buf.get(offset..end)).ok_or_else(|| {
            Error::probe_failed(format!(
                "'{}' is truncated or damaged: a field at offset {offset} lies outside its {}",
                self.path.display(),
                self.what
            ))
        })
    }

    pub(super) fn array<const N: usize>(&self, offset: usize) -> Result<[u8; N]> {
        let mut out = [0; N];
        out.copy_from_slice(self.slice(offset, N)?);
        Ok(out)
    }

    pub(super) fn u8(&self, offset: usize) -> Result<u8> {
        Ok(self.array::<1>(offset)?[0])
    }

    pub(super) fn be16(&self, offset: usize) -> Result<u16> {
        self.array(offset).map(u16::from_be_bytes)
    }

    pub(super) fn be32(&self, offset: usize) -> Result<u32> {
        self.array(offset).map(u32::from_be_bytes)
    }

    pub(super) fn be64(&self, offset: usize) -> Result<u64> {
        self.array(offset).map(u64::from_be_bytes)
    }

    pub(super) fn le16(&self, offset: usize) -> Result<u16> {
        self.array(offset).map(u16::from_le_bytes)
    }

    pub(super) fn le32(&self, offset: usize) -> Result<u32> {
        self.array(offset).map(u32::from_le_bytes)
    }

    pub(super) fn le64(&self, offset: usize) -> Result<u64> {
        self.array(offset).map(u64::from_le_bytes)
    }
}

/// Big-endian u32 at `offset` of `buf`, if it is there (for magic checks on
/// possibly short buffers).
pub(super) fn peek_be32(buf: &[u8], offset: usize) -> Option<u32> {
    let bytes = buf.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

/// Little-endian u32 at `offset` of `buf`, if it is there.
pub(super) fn peek_le32(buf: &[u8], offset: usize) -> Option<u32> {
    peek_be32(buf, offset).map(u32::swap_bytes)
}

/// Whether `buf` holds `magic` at `offset`.
pub(super) fn has_magic(buf: &[u8], offset: usize, magic: &[u8]) -> bool {
    offset.checked_add(magic.len()).and_then(|end| buf.get(offset..end)).is_some_and(|bytes| bytes == magic)
}

/// The bytes of a NUL-padded C string field, up to its first NUL.
pub(super) fn c_str(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    field.get(..end).unwrap_or(field)
}

/// A name stored in a header as UTF-8 bytes; `what` names it in errors. An
/// embedded NUL is refused because QEMU would silently cut the name there.
pub(super) fn utf8_name(bytes: Vec<u8>, path: &Path, what: &str) -> Result<String> {
    if bytes.contains(&0) {
        return Err(Error::probe_failed(format!("'{}' has a {what} containing a NUL byte", path.display())));
    }
    String::from_utf8(bytes)
        .map_err(|_| Error::probe_failed(format!("'{}' has a {what} that is not valid UTF-8", path.display())))
}

/// Decodes UTF-16 code units (stopping at the first NUL), or `None` when
/// they are not valid UTF-16.
pub(super) fn utf16_string(bytes: &[u8], big_endian: bool) -> Option<String> {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|pair| {
            let pair = [pair.first().copied().unwrap_or(0), pair.get(1).copied().unwrap_or(0)];
            if big_endian {
                u16::from_be_bytes(pair)
            } else {
                u16::from_le_bytes(pair)
            }
        })
        .take_while(|&unit| unit != 0)
        .collect();
    String::from_utf16(&units).ok()
}

/// A UUID stored in RFC 4122 byte order, or `None` for the nil UUID.
pub(super) fn uuid_be(bytes: [u8; 16]) -> Option<String> {
    let uuid = uuid::Uuid::from_bytes(bytes);
    (!uuid.is_nil()).then(|| uuid.hyphenated().to_string())
}

/// A UUID stored in Microsoft's GUID layout (first three fields
/// little-endian), or `None` for the nil UUID.
pub(super) fn uuid_le(bytes: [u8; 16]) -> Option<String> {
    let uuid = uuid::Uuid::from_bytes_le(bytes);
    (!uuid.is_nil()).then(|| uuid.hyphenated().to_string())
}
