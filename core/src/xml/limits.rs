//! Bounds on the XML documents Strata reads, so that no input — a user's
//! file or a record in the state store — can make a command read without
//! end or hold more than a few hundred MB.
//!
//! The byte limit is virsh's (`VSH_MAX_XML_FILE`, 10 MiB). libvirt has no
//! count of nodes; libxml2 bounds nesting at 256 levels, which Strata cannot
//! use since a backing chain nests one `<backingStore>` per layer. So the
//! number of elements, attributes and comments is bounded instead (a
//! 10,000-layer chain takes about 70,000), which bounds the nesting too.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The largest XML document Strata reads: 10 MiB, as virsh.
pub const MAX_DOCUMENT_BYTES: usize = 10 * 1024 * 1024;

/// The most elements, attributes and comments one document may hold.
pub const MAX_DOCUMENT_NODES: usize = 250_000;

/// Reads an XML document from a file: refuses anything but a regular file
/// (a device such as `/dev/zero`, a FIFO or a directory) before reading,
/// and a file over [`MAX_DOCUMENT_BYTES`] after reading at most one byte
/// more than that.
pub fn read_document(path: &Path) -> io::Result<String> {
    Ok(read_document_keeping(path)?.0)
}

/// [`read_document`], also returning the file, still open.
pub fn read_document_keeping(path: &Path) -> io::Result<(String, File)> {
    // O_NONBLOCK: opening a FIFO must not wait for a writer before it can
    // be refused; O_NOCTTY: a terminal named here must not become ours.
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path)?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "a special file"
        };
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("it is {what}, not a regular file")));
    }
    // Sized from the start: a chain's 370 KB in one read, not in sixteen.
    let size = usize::try_from(meta.len()).unwrap_or(MAX_DOCUMENT_BYTES).min(MAX_DOCUMENT_BYTES);
    let mut text = String::with_capacity(size + 1);
    (&file).take(MAX_DOCUMENT_BYTES as u64 + 1).read_to_string(&mut text)?;
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(io::Error::new(io::ErrorKind::FileTooLarge, too_large()));
    }
    Ok((text, file))
}

/// Why a document over [`MAX_DOCUMENT_BYTES`] is refused.
pub(crate) fn too_large() -> String {
    format!("it is larger than {} MiB, the limit on an XML document", MAX_DOCUMENT_BYTES / (1024 * 1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_files_are_refused_without_reading() {
        for (path, what) in [("/dev/zero", "character device"), ("/", "directory")] {
            let err = read_document(Path::new(path)).expect_err(path);
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{path}");
            assert!(err.to_string().contains(what), "{path}: {err}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        let c_path = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("no NUL");
        // SAFETY: mkfifo(3) with a NUL-terminated path this test owns.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        // No writer ever opens it: a blocking open would hang here.
        let err = read_document(&fifo).expect_err("fifo");
        assert!(err.to_string().contains("FIFO"), "{err}");
    }

    #[test]
    fn files_over_the_limit_are_refused_and_at_the_limit_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let at_limit = dir.path().join("at-limit.xml");
        std::fs::write(&at_limit, vec![b' '; MAX_DOCUMENT_BYTES]).expect("write");
        assert_eq!(read_document(&at_limit).expect("at the limit").len(), MAX_DOCUMENT_BYTES);
        let over = dir.path().join("over.xml");
        std::fs::write(&over, vec![b' '; MAX_DOCUMENT_BYTES + 1]).expect("write");
        let err = read_document(&over).expect_err("over the limit");
        assert_eq!(err.kind(), io::ErrorKind::FileTooLarge);
        assert!(err.to_string().contains("10 MiB"), "{err}");
    }
}
