//! qcow2 images for the benches, made and written with qemu-img and
//! qemu-io, and copied.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{path_str, run_tool};

/// `qemu-img create -q -f qcow2 [-b BACKING -F qcow2] PATH [SIZE]`: a new
/// qcow2 image, on `backing` (its name as written into the header, format
/// recorded) if given.
pub fn create_qcow2(path: &Path, backing: Option<&str>, size: Option<&str>) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some(b) = backing {
        args.extend_from_slice(&["-b", b, "-F", "qcow2"]);
    }
    args.push(path_str(path));
    args.extend(size);
    run_tool("qemu-img", &args);
}

/// How the layers of a chain made by [`qcow2_chain`] name their backing
/// files.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BackingNames {
    /// Absolute paths, as strata (and libvirt) write into the overlays they make.
    Absolute,
    /// Names relative to the image's directory, as `qemu-img create -b l000.qcow2`.
    Relative,
}

impl BackingNames {
    /// `absolute` or `relative`.
    pub fn label(self) -> &'static str {
        match self {
            BackingNames::Absolute => "absolute",
            BackingNames::Relative => "relative",
        }
    }
}

/// A linear qcow2 chain in `dir` (created if missing): `names[0]` is the
/// base of virtual size `size`, each further image an empty overlay of the
/// one before (formats recorded). Returns the images' paths, base first.
pub fn qcow2_chain<S: AsRef<str>>(dir: &Path, names: &[S], size: &str, backing: BackingNames) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).expect("create an image directory");
    let paths: Vec<PathBuf> = names.iter().map(|n| dir.join(n.as_ref())).collect();
    for (i, path) in paths.iter().enumerate() {
        if i == 0 {
            create_qcow2(path, None, Some(size));
        } else {
            let below = match backing {
                BackingNames::Absolute => path_str(&paths[i - 1]),
                BackingNames::Relative => names[i - 1].as_ref(),
            };
            create_qcow2(path, Some(below), None);
        }
    }
    paths
}

/// The name of layer `i` of a [`patched_chain`]: `l00000.qcow2` is the base.
pub fn layer_name(i: usize) -> String {
    format!("l{i:05}.qcow2")
}

/// A linear qcow2 chain of `depth` overlays on a 64 MiB base in `dir`
/// (created if missing), made fast: qemu-img makes the base and the first
/// overlay, the others are copies of that overlay with the backing-file
/// name in the header patched (names of one length, see [`layer_name`], so
/// nothing else moves; formats recorded). Returns the images, base first:
/// the top (index `depth`) has `depth` backing files.
pub fn patched_chain(dir: &Path, depth: usize, backing: BackingNames) -> Vec<PathBuf> {
    assert!(depth >= 1, "a chain of at least one overlay");
    let mut paths = qcow2_chain(dir, &[layer_name(0), layer_name(1)], "64M", backing);
    let name = |i: usize| match backing {
        BackingNames::Absolute => path_str(&dir.join(layer_name(i))).to_string(),
        BackingNames::Relative => layer_name(i),
    };
    let template = std::fs::read(&paths[1]).expect("read the overlay made by qemu-img");
    let be64 = |at: usize| u64::from_be_bytes(template[at..at + 8].try_into().expect("8 bytes"));
    let be32 = |at: usize| u32::from_be_bytes(template[at..at + 4].try_into().expect("4 bytes"));
    assert!(template.len() >= 24 && template.starts_with(b"QFI\xfb"), "qemu-img did not write a qcow2 header");
    let offset = usize::try_from(be64(8)).expect("backing_file_offset fits in usize");
    let size = be32(16) as usize;
    assert_eq!(
        template.get(offset..offset + size),
        Some(name(0).as_bytes()),
        "the overlay's header does not name {} at backing_file_offset {offset}",
        name(0)
    );
    let mut bytes = template.clone();
    for i in 2..=depth {
        let backing = name(i - 1);
        assert_eq!(backing.len(), size, "layer names must all have the same length");
        bytes[offset..offset + size].copy_from_slice(backing.as_bytes());
        let path = dir.join(layer_name(i));
        write_sparse(&path, &bytes);
        paths.push(path);
    }
    paths
}

/// Writes only the non-zero 4 KiB blocks: an empty overlay is ~192 KiB,
/// nearly all zeros, and 10,000 dense copies would take ~2 GB.
fn write_sparse(path: &Path, bytes: &[u8]) {
    const BLOCK: usize = 4096;
    let file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    for (n, block) in bytes.chunks(BLOCK).enumerate() {
        if block.iter().any(|b| *b != 0) {
            file.write_all_at(block, (n * BLOCK) as u64).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        }
    }
    file.set_len(bytes.len() as u64).unwrap_or_else(|e| panic!("size {}: {e}", path.display()));
}

/// Runs `qemu-io -f qcow2 -c CMD IMAGE` (e.g. `write -P 0x11 0 32M`).
pub fn qemu_io(image: &Path, cmd: &str) {
    run_tool("qemu-io", &["-f", "qcow2", "-c", cmd, path_str(image)]);
}

/// Replaces `to` with a copy of the images in `from`, written with plain
/// read/write (never a reflink or in-kernel clone, so the copies are real
/// data) and fsynced: what is timed next finds them clean in the page cache.
pub fn copy_images(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).expect("create an image directory");
    let mut buf = vec![0u8; 1 << 20];
    for entry in std::fs::read_dir(from).expect("read the template directory") {
        let src_path = entry.expect("read the template directory").path();
        let dst_path = to.join(src_path.file_name().expect("a file name"));
        let mut src = File::open(&src_path).expect("open a template image");
        let mut dst = File::create(&dst_path).expect("create an image copy");
        loop {
            let n = src.read(&mut buf).expect("read a template image");
            if n == 0 {
                break;
            }
            dst.write_all(&buf[..n]).expect("write an image copy");
        }
        dst.sync_all().expect("fsync an image copy");
    }
}
