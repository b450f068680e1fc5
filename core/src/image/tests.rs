//! Tests against real images made by qemu-img, plus crafted and damaged
//! headers. qemu-img is needed only here, never at run time.

// A failed unwrap is a test failure with the error printed, which is all a
// test needs.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

/// Runs qemu-img, panicking with its stderr on failure; returns stdout.
fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().expect("qemu-img must be installed for these tests");
    assert!(out.status.success(), "qemu-img {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `virtual-size` as `qemu-img info` reports it for `path` opened as `format`.
fn qemu_size(path: &Path, format: &str) -> u64 {
    let json = qemu_img(&["info", "--output=json", "-f", format, path_str(path)]);
    let info: serde_json::Value = serde_json::from_str(&json).expect("qemu-img info prints JSON");
    info["virtual-size"].as_u64().expect("virtual-size is a number")
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

/// Creates `name` in `dir` with `qemu-img create -f format [extra…] name [size]`.
fn create(dir: &Path, name: &str, format: &str, extra: &[&str], size: Option<&str>) -> PathBuf {
    let path = dir.join(name);
    let mut args = vec!["create", "-q", "-f", format];
    args.extend_from_slice(extra);
    args.push(path_str(&path));
    args.extend(size);
    qemu_img(&args);
    path
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let file = fs::OpenOptions::new().write(true).open(path).expect("open for patching");
    file.write_all_at(bytes, offset).expect("patch image");
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    fs::File::open(path).expect("open").read_exact_at(&mut buf, offset).expect("read");
    buf
}

fn probe_err(path: &Path) -> Error {
    probe(path).expect_err("probing must fail")
}

/// The error is a probe failure whose message names the file and contains
/// `needle`.
fn assert_probe_error(err: &Error, path: &Path, needle: &str) {
    assert_eq!(err.kind(), ErrorKind::StorageProbeFailed, "{err}");
    assert!(err.message().contains(path_str(path)), "message does not name the file: {err}");
    assert!(err.message().contains(needle), "expected {needle:?} in: {err}");
}

fn uuid_le_bytes(text: &str) -> [u8; 16] {
    uuid::Uuid::parse_str(text).expect("valid UUID").to_bytes_le()
}

// ---------------------------------------------------------------- qcow2

#[test]
fn qcow2_v3_without_backing() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "plain.qcow2", "qcow2", &[], Some("64M"));
    assert_eq!(detect_format(&img).unwrap(), ImageFormat::Qcow2);
    let header = probe(&img).unwrap();
    assert_eq!(header, ImageHeader::standalone(ImageFormat::Qcow2, qemu_size(&img, "qcow2")));
    assert_eq!(read_header(&img, ImageFormat::Qcow2).unwrap(), header);
}

#[test]
fn qcow2_v2_with_relative_backing_and_format() {
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "base.qcow2", "qcow2", &["-o", "compat=0.10"], Some("32M"));
    let top = create(dir.path(), "top.qcow2", "qcow2", &["-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2"], None);
    assert_eq!(read_at(&top, 4, 4), [0, 0, 0, 2], "compat=0.10 makes a version 2 image");
    let header = probe(&top).unwrap();
    assert_eq!(header.format, ImageFormat::Qcow2);
    assert_eq!(header.virtual_size, qemu_size(&top, "qcow2"));
    assert_eq!(header.virtual_size, 32 << 20);
    assert_eq!(header.backing_file.as_deref(), Some("base.qcow2"));
    assert_eq!(header.backing_format.as_deref(), Some("qcow2"));
    assert!(header.differencing);
}

#[test]
fn qcow2_v3_with_absolute_raw_backing() {
    let dir = tempfile::tempdir().unwrap();
    let base = create(dir.path(), "base.raw", "raw", &[], Some("16M"));
    let top = create(dir.path(), "top.qcow2", "qcow2", &["-b", path_str(&base), "-F", "raw"], Some("64M"));
    let header = probe(&top).unwrap();
    assert_eq!(header.virtual_size, qemu_size(&top, "qcow2"));
    assert_eq!(header.virtual_size, 64 << 20);
    assert_eq!(header.backing_file.as_deref(), Some(path_str(&base)));
    assert_eq!(header.backing_format.as_deref(), Some("raw"));
    assert!(header.differencing);
}

#[test]
fn qcow2_backing_without_format() {
    // qemu-img 7.2 always records a backing format (-F is mandatory, and
    // 'rebase -u' without -F is refused), so rename the extension to an
    // unknown type, which QEMU skips.
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "base.qcow2", "qcow2", &[], Some("8M"));
    let top = create(dir.path(), "top.qcow2", "qcow2", &["-b", "base.qcow2", "-F", "qcow2"], None);
    let header_len = u32::from_be_bytes(read_at(&top, 100, 4).try_into().unwrap());
    assert_eq!(read_at(&top, header_len.into(), 4), 0xe279_2acau32.to_be_bytes());
    patch(&top, header_len.into(), &0x0bad_cafeu32.to_be_bytes());
    let header = probe(&top).unwrap();
    assert_eq!(header.backing_file.as_deref(), Some("base.qcow2"));
    assert_eq!(header.backing_format, None);
    assert!(header.differencing);
}

#[test]
fn qcow2_backing_uri_and_json_are_returned_verbatim() {
    let dir = tempfile::tempdir().unwrap();
    for (name, backing) in [
        ("nbd.qcow2", "nbd://localhost:10809/export"),
        ("json.qcow2", r#"json:{"driver":"raw","file":{"driver":"file","filename":"/x/y.img"}}"#),
    ] {
        let top = create(dir.path(), name, "qcow2", &["-u", "-b", backing, "-F", "raw"], Some("16M"));
        let header = probe(&top).unwrap();
        assert_eq!(header.backing_file.as_deref(), Some(backing));
        assert_eq!(header.backing_format.as_deref(), Some("raw"));
    }
}

#[test]
fn qcow2_external_data_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("guest.data");
    let img = create(dir.path(), "ext.qcow2", "qcow2", &["-o", &format!("data_file={}", path_str(&data))], Some("16M"));
    let err = probe_err(&img);
    assert_probe_error(&err, &img, "external data file");

    // Without the incompatible bit, the extension alone is refused too, and
    // the message names the data file.
    let incompatible = u64::from_be_bytes(read_at(&img, 72, 8).try_into().unwrap());
    assert_ne!(incompatible & 4, 0);
    patch(&img, 72, &(incompatible & !4).to_be_bytes());
    let err = read_header(&img, ImageFormat::Qcow2).unwrap_err();
    assert_probe_error(&err, &img, "external data file");
    assert!(err.message().contains(path_str(&data)), "{err}");
}

#[test]
fn qcow2_unknown_incompatible_feature_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "future.qcow2", "qcow2", &[], Some("16M"));
    patch(&img, 79, &[0x20]);
    assert_probe_error(&probe_err(&img), &img, "unknown incompatible qcow2 features (bits 0x20)");
    patch(&img, 72, &[0x80, 0, 0, 0, 0, 0, 0, 0]);
    assert_probe_error(&probe_err(&img), &img, "unknown incompatible qcow2 features");
}

#[test]
fn qcow2_corrupt_bit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "corrupt.qcow2", "qcow2", &[], Some("16M"));
    patch(&img, 79, &[0x02]);
    assert_probe_error(&probe_err(&img), &img, "marked corrupt");
    // The dirty bit alone is fine: QEMU repairs refcounts on open.
    patch(&img, 79, &[0x01]);
    assert!(probe(&img).is_ok());
}

#[test]
fn qcow2_unsupported_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "v4.qcow2", "qcow2", &[], Some("16M"));
    patch(&img, 4, &4u32.to_be_bytes());
    assert_eq!(detect_format(&img).unwrap(), ImageFormat::Qcow2);
    assert_probe_error(&probe_err(&img), &img, "unsupported qcow2 version 4");
}

// ------------------------------------------------------------ qcow, qed

#[test]
fn qcow_v1_with_backing() {
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "base.raw", "raw", &[], Some("10M"));
    let img = create(dir.path(), "old.qcow", "qcow", &["-b", "base.raw", "-F", "raw"], None);
    assert_eq!(detect_format(&img).unwrap(), ImageFormat::Qcow);
    let header = probe(&img).unwrap();
    assert_eq!(header.format, ImageFormat::Qcow);
    assert_eq!(header.virtual_size, qemu_size(&img, "qcow"));
    assert_eq!(header.backing_file.as_deref(), Some("base.raw"));
    assert_eq!(header.backing_format, None);
    assert!(header.differencing);
    assert_probe_error(&read_header(&img, ImageFormat::Qcow2).unwrap_err(), &img, "qcow (version 1)");
}

#[test]
fn qed_with_backing() {
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "base.raw", "raw", &[], Some("10M"));
    create(dir.path(), "base.qcow2", "qcow2", &[], Some("20M"));

    let img = create(dir.path(), "raw-child.qed", "qed", &["-b", "base.raw", "-F", "raw"], None);
    assert_eq!(detect_format(&img).unwrap(), ImageFormat::Qed);
    let header = probe(&img).unwrap();
    assert_eq!(header.virtual_size, qemu_size(&img, "qed"));
    assert_eq!(header.virtual_size, 10 << 20);
    assert_eq!(header.backing_file.as_deref(), Some("base.raw"));
    assert_eq!(header.backing_format.as_deref(), Some("raw"), "QED_F_BACKING_FORMAT_NO_PROBE");
    assert!(header.differencing);

    // QED records only "raw"; any other backing format is left to probing.
    let img = create(dir.path(), "qcow2-child.qed", "qed", &["-b", "base.qcow2", "-F", "qcow2"], None);
    let header = probe(&img).unwrap();
    assert_eq!(header.virtual_size, 20 << 20);
    assert_eq!(header.backing_file.as_deref(), Some("base.qcow2"));
    assert_eq!(header.backing_format, None);

    let img = create(dir.path(), "plain.qed", "qed", &[], Some("30M"));
    assert_eq!(probe(&img).unwrap(), ImageHeader::standalone(ImageFormat::Qed, 30 << 20));
}

// ------------------------------------------------------------------ vmdk

#[test]
fn vmdk_monolithic_sparse_and_child() {
    let dir = tempfile::tempdir().unwrap();
    let base = create(dir.path(), "base.vmdk", "vmdk", &[], Some("64M"));
    assert_eq!(detect_format(&base).unwrap(), ImageFormat::Vmdk);
    let header = probe(&base).unwrap();
    assert_eq!(header, ImageHeader::standalone(ImageFormat::Vmdk, qemu_size(&base, "vmdk")));

    let child = create(dir.path(), "child.vmdk", "vmdk", &["-b", "base.vmdk", "-F", "vmdk"], None);
    let header = probe(&child).unwrap();
    assert_eq!(header.virtual_size, 64 << 20);
    assert_eq!(header.virtual_size, qemu_size(&child, "vmdk"));
    assert_eq!(header.backing_file.as_deref(), Some("base.vmdk"));
    assert_eq!(header.backing_format.as_deref(), Some("vmdk"));
    assert!(header.differencing);
}

#[test]
fn vmdk_descriptor_files() {
    let dir = tempfile::tempdir().unwrap();
    for (name, subformat, size) in [
        ("split.vmdk", "twoGbMaxExtentSparse", "5G"),
        ("flat.vmdk", "monolithicFlat", "64M"),
        ("splitflat.vmdk", "twoGbMaxExtentFlat", "3G"),
    ] {
        let img = create(dir.path(), name, "vmdk", &["-o", &format!("subformat={subformat}")], Some(size));
        assert!(fs::read(&img).unwrap().starts_with(b"# Disk DescriptorFile"), "{subformat} is a text descriptor");
        assert_eq!(detect_format(&img).unwrap(), ImageFormat::Vmdk, "{subformat}");
        let header = probe(&img).unwrap();
        assert_eq!(header, ImageHeader::standalone(ImageFormat::Vmdk, qemu_size(&img, "vmdk")), "{subformat}");
    }
}

#[test]
fn vmdk_descriptor_with_parent_and_odd_lines() {
    let dir = tempfile::tempdir().unwrap();
    let desc = dir.path().join("desc.vmdk");
    fs::write(
        &desc,
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=87654321\n\
         createType=\"monolithicFlat\"\nparentFileNameHint=\"/images/my parent.vmdk\"\n\n\
         # Extent description\nRW 2048 FLAT \"a b-flat.vmdk\" 0\nRDONLY 4096 FLAT \"ro.vmdk\" 0\n\
         RW 1024 ZERO\nRW 512 FLAT \"c-flat.vmdk\" 10\r\n",
    )
    .unwrap();
    let header = probe(&desc).unwrap();
    // QEMU opens only RW extents with a file: 2048 + 512 sectors.
    assert_eq!(header.virtual_size, (2048 + 512) * 512);
    assert_eq!(header.backing_file.as_deref(), Some("/images/my parent.vmdk"));
    assert_eq!(header.backing_format.as_deref(), Some("vmdk"));

    fs::write(&desc, "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"x.vmdk\"\n")
        .unwrap();
    assert_probe_error(&probe_err(&desc), &desc, "invalid VMDK extent line");

    fs::write(&desc, "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicSparse\"\n").unwrap();
    assert_probe_error(&probe_err(&desc), &desc, "create type 'monolithicSparse'");

    fs::write(&desc, "# Disk DescriptorFile\nversion=1\ncreateType=\"vmfs\"\nparentFileNameHint=\"unterminated\n")
        .unwrap();
    assert_probe_error(&probe_err(&desc), &desc, "malformed parentFileNameHint");
}

#[test]
fn vmdk_stream_optimized() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "stream.vmdk", "vmdk", &["-o", "subformat=streamOptimized"], Some("100M"));
    let header = probe(&img).unwrap();
    assert_eq!(header, ImageHeader::standalone(ImageFormat::Vmdk, qemu_size(&img, "vmdk")));
}

// ------------------------------------------------------------------- vdi

#[test]
fn vdi_plain_and_differencing() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "disk.vdi", "vdi", &[], Some("64M"));
    assert_eq!(detect_format(&img).unwrap(), ImageFormat::Vdi);
    let header = probe(&img).unwrap();
    assert_eq!(header.format, ImageFormat::Vdi);
    assert_eq!(header.virtual_size, qemu_size(&img, "vdi"));
    assert!(!header.differencing);
    assert_eq!(header.parent_uuid, None);
    let own = header.uuid.expect("qemu-img gives VDI images a UUID");
    assert_eq!(own.len(), 36);
    assert_eq!(own, own.to_lowercase());

    // VDI children name their parent only by UUID (uuidLinkage).
    let parent = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    patch(&img, 0x1a8, &uuid_le_bytes(parent));
    let header = probe(&img).unwrap();
    assert!(header.differencing);
    assert_eq!(header.parent_uuid.as_deref(), Some(parent));
    assert_eq!(header.backing_file, None);
    assert_eq!(header.uuid.as_deref(), Some(own.as_str()));
}

// ------------------------------------------------------------- vpc (VHD)

/// Recomputes the checksum of the 512-byte VHD footer at `offset`.
fn fix_vhd_checksum(path: &Path, offset: u64) {
    let mut footer = read_at(path, offset, 512);
    footer[64..68].fill(0);
    let sum: u32 = footer.iter().map(|&b| u32::from(b)).sum();
    patch(path, offset + 64, &(!sum).to_be_bytes());
}

#[test]
fn vpc_dynamic_and_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let dynamic = create(dir.path(), "dyn.vhd", "vpc", &[], Some("64M"));
    assert_eq!(detect_format(&dynamic).unwrap(), ImageFormat::Vpc);
    let header = probe(&dynamic).unwrap();
    assert_eq!(header.virtual_size, qemu_size(&dynamic, "vpc"));
    assert!(!header.differencing);
    assert!(header.uuid.is_some());

    let fixed = create(dir.path(), "fixed.vhd", "vpc", &["-o", "subformat=fixed"], Some("64M"));
    assert_eq!(detect_format(&fixed).unwrap(), ImageFormat::Vpc, "footer at the end only");
    let header = probe(&fixed).unwrap();
    assert_eq!(header.virtual_size, qemu_size(&fixed, "vpc"));
    assert!(!header.differencing);
    assert_eq!("vhd".parse::<ImageFormat>().unwrap(), ImageFormat::Vpc);

    let sized = create(dir.path(), "sized.vhd", "vpc", &["-o", "force_size=on"], Some("100M"));
    assert_eq!(probe(&sized).unwrap().virtual_size, qemu_size(&sized, "vpc"));
    assert_eq!(probe(&sized).unwrap().virtual_size, 100 << 20);
}

#[test]
fn vpc_differencing_patched() {
    // qemu-img cannot create differencing VHDs: turn a dynamic one into one.
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "diff.vhd", "vpc", &[], Some("64M"));
    let size = qemu_size(&img, "vpc");
    let end_footer = fs::metadata(&img).unwrap().len() - 512;
    for footer in [0, end_footer] {
        patch(&img, footer + 60, &4u32.to_be_bytes());
        fix_vhd_checksum(&img, footer);
    }
    let dyn_header = u64::from_be_bytes(read_at(&img, 16, 8).try_into().unwrap());
    assert_eq!(read_at(&img, dyn_header, 8), b"cxsparse");
    let parent = "6ba7b810-9dad-11d1-80b4-00c04fd430c8";
    patch(&img, dyn_header + 40, uuid::Uuid::parse_str(parent).unwrap().as_bytes());
    let name: Vec<u8> = "parent dir/base.vhd".encode_utf16().flat_map(u16::to_be_bytes).collect();
    patch(&img, dyn_header + 64, &name);

    let header = probe(&img).unwrap();
    assert_eq!(header.format, ImageFormat::Vpc);
    assert!(header.differencing);
    assert_eq!(header.backing_file.as_deref(), Some("parent dir/base.vhd"));
    assert_eq!(header.parent_uuid.as_deref(), Some(parent));
    assert_eq!(header.virtual_size, size);

    // A footer whose checksum no longer matches is refused, as QEMU does.
    patch(&img, 60, &3u32.to_be_bytes());
    assert_probe_error(&probe_err(&img), &img, "incorrect checksum");
}

// ------------------------------------------------------------------ vhdx

const VHDX_FILE_PARAMETERS: &str = "caa16737-fa36-4d43-b3b6-33f0aa44e76b";
const VHDX_PARENT_LOCATOR: &str = "a8d35f2d-b30b-454d-abf7-d3d84834ab0c";
const VHDX_LOCATOR_TYPE: &str = "b04aefb7-d19e-4a81-b789-25b8e9445913";
const VHDX_METADATA_REGION: &str = "8b7ca206-4790-4b9a-b8fe-575f050f886e";

/// The metadata region offset, from the primary region table.
fn vhdx_metadata_offset(path: &Path) -> u64 {
    let table = read_at(path, 192 * 1024, 64 * 1024);
    let count = u32::from_le_bytes(table[8..12].try_into().unwrap()) as usize;
    (0..count)
        .map(|i| &table[16 + i * 32..48 + i * 32])
        .find(|entry| entry[..16] == uuid_le_bytes(VHDX_METADATA_REGION))
        .map(|entry| u64::from_le_bytes(entry[16..24].try_into().unwrap()))
        .expect("metadata region")
}

/// Makes a qemu-made VHDX differencing: sets HasParent and appends a parent
/// locator item with `pairs`.
fn make_vhdx_differencing(path: &Path, pairs: &[(&str, &str)]) {
    let metadata = vhdx_metadata_offset(path);
    let table = read_at(path, metadata, 64 * 1024);
    assert_eq!(&table[..8], b"metadata");
    let count = usize::from(u16::from_le_bytes(table[10..12].try_into().unwrap()));
    let params = (0..count)
        .map(|i| &table[32 + i * 32..64 + i * 32])
        .find(|entry| entry[..16] == uuid_le_bytes(VHDX_FILE_PARAMETERS))
        .expect("file parameters item");
    let params_offset = metadata + u64::from(u32::from_le_bytes(params[16..20].try_into().unwrap()));
    let flags = u32::from_le_bytes(read_at(path, params_offset + 4, 4).try_into().unwrap());
    patch(path, params_offset + 4, &(flags | 2).to_le_bytes());

    // The locator: header, key/value entries, then the UTF-16LE strings.
    let utf16 = |s: &str| -> Vec<u8> { s.encode_utf16().flat_map(u16::to_le_bytes).collect() };
    let mut locator = uuid_le_bytes(VHDX_LOCATOR_TYPE).to_vec();
    locator.extend_from_slice(&0u16.to_le_bytes());
    locator.extend_from_slice(&(pairs.len() as u16).to_le_bytes());
    let mut strings = Vec::new();
    let strings_start = 20 + 12 * pairs.len();
    for (key, value) in pairs {
        let (key, value) = (utf16(key), utf16(value));
        let key_offset = strings_start + strings.len();
        strings.extend_from_slice(&key);
        let value_offset = strings_start + strings.len();
        strings.extend_from_slice(&value);
        locator.extend_from_slice(&(key_offset as u32).to_le_bytes());
        locator.extend_from_slice(&(value_offset as u32).to_le_bytes());
        locator.extend_from_slice(&(key.len() as u16).to_le_bytes());
        locator.extend_from_slice(&(value.len() as u16).to_le_bytes());
    }
    locator.extend_from_slice(&strings);
    let item_offset: u32 = 512 * 1024;
    patch(path, metadata + u64::from(item_offset), &locator);

    let mut entry = uuid_le_bytes(VHDX_PARENT_LOCATOR).to_vec();
    entry.extend_from_slice(&item_offset.to_le_bytes());
    entry.extend_from_slice(&(locator.len() as u32).to_le_bytes());
    entry.extend_from_slice(&(4u32 | 2).to_le_bytes()); // is_required, is_virtual_disk
    entry.extend_from_slice(&0u32.to_le_bytes());
    patch(path, metadata + 32 + 32 * count as u64, &entry);
    patch(path, metadata + 10, &(count as u16 + 1).to_le_bytes());
}

#[test]
fn vhdx_plain() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "disk.vhdx", "vhdx", &[], Some("64M"));
    assert_eq!(detect_format(&img).unwrap(), ImageFormat::Vhdx);
    let header = probe(&img).unwrap();
    assert_eq!(header, ImageHeader::standalone(ImageFormat::Vhdx, qemu_size(&img, "vhdx")));

    // A damaged primary region table falls back to the backup copy.
    patch(&img, 192 * 1024 + 40, &[0xff; 4]);
    assert_eq!(probe(&img).unwrap(), header);
    patch(&img, 256 * 1024 + 40, &[0xff; 4]);
    assert_probe_error(&probe_err(&img), &img, "no valid VHDX region table");
}

#[test]
fn vhdx_differencing_patched() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "child.vhdx", "vhdx", &[], Some("64M"));
    let size = qemu_size(&img, "vhdx");
    let linkage = "83ee4f2c-7d6e-4b5c-a1b2-0123456789ab";
    make_vhdx_differencing(
        &img,
        &[
            ("parent_linkage", &format!("{{{}}}", linkage.to_uppercase())),
            ("absolute_win32_path", "C:\\vms\\base.vhdx"),
            ("relative_path", "..\\base.vhdx"),
        ],
    );
    let header = probe(&img).unwrap();
    assert_eq!(header.format, ImageFormat::Vhdx);
    assert_eq!(header.virtual_size, size);
    assert!(header.differencing);
    assert_eq!(header.backing_file.as_deref(), Some("..\\base.vhdx"));
    assert_eq!(header.parent_uuid.as_deref(), Some(linkage));

    let img = create(dir.path(), "abs.vhdx", "vhdx", &[], Some("64M"));
    make_vhdx_differencing(&img, &[("absolute_win32_path", "C:\\vms\\base.vhdx")]);
    let header = probe(&img).unwrap();
    assert!(header.differencing);
    assert_eq!(header.backing_file.as_deref(), Some("C:\\vms\\base.vhdx"));
}

// -------------------------------------------------- detection-only formats

#[test]
fn luks_and_parallels_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let luks = dir.path().join("disk.luks");
    let args = [
        "create",
        "-q",
        "-f",
        "luks",
        "--object",
        "secret,id=sec0,data=123456",
        "-o",
        "key-secret=sec0,iter-time=10",
        path_str(&luks),
        "16M",
    ];
    // qemu-img times its key derivation by the thread's CPU time and, on a
    // loaded machine, may fail with "Unable to get accurate CPU usage"
    // (seen once in a full suite run): another try measures again.
    for attempt in 1.. {
        let out = Command::new("qemu-img").args(args).output().expect("qemu-img must be installed for these tests");
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            break;
        }
        assert!(
            attempt < 5 && stderr.contains("Unable to get accurate CPU usage"),
            "qemu-img {} failed: {stderr}",
            args.join(" ")
        );
    }
    assert_eq!(detect_format(&luks).unwrap(), ImageFormat::Luks);
    assert_eq!(probe(&luks).unwrap(), ImageHeader::standalone(ImageFormat::Luks, 16 << 20));

    let parallels = create(dir.path(), "disk.hdd", "parallels", &[], Some("64M"));
    assert_eq!(detect_format(&parallels).unwrap(), ImageFormat::Parallels);
    let header = probe(&parallels).unwrap();
    assert_eq!(header, ImageHeader::standalone(ImageFormat::Parallels, qemu_size(&parallels, "parallels")));
}

#[test]
fn synthetic_iso_dmg_bochs_cloop() {
    let dir = tempfile::tempdir().unwrap();

    let iso = dir.path().join("cd.iso");
    let mut bytes = vec![0; 0x9000];
    bytes[0x8000] = 1;
    bytes[0x8001..0x8006].copy_from_slice(b"CD001");
    fs::write(&iso, &bytes).unwrap();
    assert_eq!(probe(&iso).unwrap(), ImageHeader::standalone(ImageFormat::Iso, 0x9000));

    let dmg = dir.path().join("mac.dmg");
    let mut bytes = vec![0; 4096];
    bytes[4096 - 512..4096 - 508].copy_from_slice(b"koly");
    bytes[4096 - 512 + 492..4096 - 512 + 500].copy_from_slice(&2048u64.to_be_bytes());
    fs::write(&dmg, &bytes).unwrap();
    assert_eq!(probe(&dmg).unwrap(), ImageHeader::standalone(ImageFormat::Dmg, 2048 * 512));

    let bochs = dir.path().join("disk.bochs");
    let mut bytes = vec![0; 512];
    bytes[..22].copy_from_slice(b"Bochs Virtual HD Image");
    bytes[32..39].copy_from_slice(b"Redolog");
    bytes[48..55].copy_from_slice(b"Growing");
    bytes[64..68].copy_from_slice(&0x0002_0000u32.to_le_bytes());
    bytes[88..96].copy_from_slice(&(10u64 << 20).to_le_bytes());
    fs::write(&bochs, &bytes).unwrap();
    assert_eq!(probe(&bochs).unwrap(), ImageHeader::standalone(ImageFormat::Bochs, 10 << 20));

    let cloop = dir.path().join("disk.cloop");
    let mut bytes = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n".to_vec();
    bytes.resize(128, 0);
    bytes.extend_from_slice(&65536u32.to_be_bytes());
    bytes.extend_from_slice(&100u32.to_be_bytes());
    fs::write(&cloop, &bytes).unwrap();
    assert_eq!(probe(&cloop).unwrap(), ImageHeader::standalone(ImageFormat::Cloop, 65536 * 100));
}

// ------------------------------------------------------------------- raw

/// A qcow2 version 3 header of a 1 MiB image naming `backing` at 0x200.
fn qcow2_header(backing: &str) -> Vec<u8> {
    let mut h = vec![0u8; 0x200];
    h[0..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[8..16].copy_from_slice(&0x200u64.to_be_bytes());
    h[16..20].copy_from_slice(&(backing.len() as u32).to_be_bytes());
    h[20..24].copy_from_slice(&16u32.to_be_bytes());
    h[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
    h[96..100].copy_from_slice(&4u32.to_be_bytes());
    h[100..104].copy_from_slice(&104u32.to_be_bytes());
    h.extend_from_slice(backing.as_bytes());
    h
}

#[test]
fn raw_with_qcow2_header_is_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("guest.raw");
    let mut bytes = qcow2_header("/etc/shadow");
    bytes.resize(1 << 20, 0);
    fs::write(&disk, &bytes).unwrap();

    let header = read_header(&disk, ImageFormat::Raw).unwrap();
    assert_eq!(header, ImageHeader::standalone(ImageFormat::Raw, 1 << 20));
    // Detection reports what the bytes say; callers decide whether to trust it.
    assert_eq!(detect_format(&disk).unwrap(), ImageFormat::Qcow2);
    assert_eq!(probe(&disk).unwrap().backing_file.as_deref(), Some("/etc/shadow"));
}

#[test]
fn raw_files_and_empty_files() {
    let dir = tempfile::tempdir().unwrap();
    let raw = create(dir.path(), "disk.raw", "raw", &[], Some("3M"));
    assert_eq!(detect_format(&raw).unwrap(), ImageFormat::Raw);
    assert_eq!(probe(&raw).unwrap(), ImageHeader::standalone(ImageFormat::Raw, 3 << 20));

    let empty = dir.path().join("empty");
    fs::write(&empty, b"").unwrap();
    assert_eq!(probe(&empty).unwrap(), ImageHeader::standalone(ImageFormat::Raw, 0));
    assert_probe_error(&read_header(&empty, ImageFormat::Qcow2).unwrap_err(), &empty, "is not a qcow2 image");
}

#[test]
fn directories_and_missing_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    assert_probe_error(&probe_err(dir.path()), dir.path(), "is a directory");
    let err = read_header(&dir.path().join("missing"), ImageFormat::Raw).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::System);
    assert!(err.message().contains("missing"), "{err}");
}

// ------------------------------------------------------- damaged headers

#[test]
fn truncated_and_garbage_headers_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.img");
    let check = |bytes: &[u8], format: ImageFormat, needle: &str| {
        fs::write(&file, bytes).unwrap();
        let err = read_header(&file, format).unwrap_err();
        assert_probe_error(&err, &file, needle);
    };

    let mut short = b"QFI\xfb".to_vec();
    short.extend_from_slice(&[0, 0, 0, 3, 0, 0, 0, 0, 0, 0]);
    fs::write(&file, &short).unwrap();
    assert_eq!(detect_format(&file).unwrap(), ImageFormat::Qcow2);
    check(&short, ImageFormat::Qcow2, "truncated");

    // Backing name offset inside the cluster but past the end of the file.
    let mut h = qcow2_header("base");
    h[8..16].copy_from_slice(&60000u64.to_be_bytes());
    check(&h, ImageFormat::Qcow2, "truncated");
    // Backing name offset beyond the first cluster.
    h[8..16].copy_from_slice(&(1u64 << 40).to_be_bytes());
    check(&h, ImageFormat::Qcow2, "invalid backing file offset");
    // Backing name longer than QEMU allows.
    let mut h = qcow2_header("base");
    h[16..20].copy_from_slice(&2000u32.to_be_bytes());
    check(&h, ImageFormat::Qcow2, "too long");
    // An extension running past the header area.
    let mut h = qcow2_header("base");
    h[104..108].copy_from_slice(&0xe279_2acau32.to_be_bytes());
    h[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
    check(&h, ImageFormat::Qcow2, "runs past the header area");
    // A backing format name longer than QEMU's buffer.
    h[108..112].copy_from_slice(&20u32.to_be_bytes());
    check(&h, ImageFormat::Qcow2, "backing format name of 20 bytes");
    // Header length below the minimum, cluster size out of range.
    let mut h = qcow2_header("base");
    h[100..104].copy_from_slice(&50u32.to_be_bytes());
    check(&h, ImageFormat::Qcow2, "too short");
    let mut h = qcow2_header("base");
    h[20..24].copy_from_slice(&40u32.to_be_bytes());
    check(&h, ImageFormat::Qcow2, "cluster size");
    // A backing name that is not UTF-8 or holds a NUL.
    check(&qcow2_header("ba\u{0}e"), ImageFormat::Qcow2, "NUL");
    let mut h = qcow2_header("base");
    let last = h.len() - 1;
    h[last] = 0xff;
    check(&h, ImageFormat::Qcow2, "UTF-8");

    check(b"QED\0\0\0\x01\0", ImageFormat::Qed, "truncated");
    check(b"KDMV\x01\0\0\0", ImageFormat::Vmdk, "truncated");
    check(b"vhdxfile", ImageFormat::Vhdx, "truncated");
    let mut vdi = vec![0u8; 0x44];
    vdi[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
    check(&vdi, ImageFormat::Vdi, "truncated");
    let mut vhd = b"conectix".to_vec();
    vhd.resize(512, 0xaa);
    check(&vhd, ImageFormat::Vpc, "incorrect checksum");
    check(b"LUKS\xba\xbe\0\x01", ImageFormat::Luks, "truncated");
    check(b"plain text", ImageFormat::Vmdk, "is not a vmdk image");
}

#[test]
fn mismatched_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "disk.qcow2", "qcow2", &[], Some("1M"));
    for format in ImageFormat::ALL.into_iter().filter(|f| !matches!(f, ImageFormat::Raw | ImageFormat::Qcow2)) {
        let err = read_header(&img, format).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::StorageProbeFailed, "{format}: {err}");
        assert!(err.message().contains(path_str(&img)), "{err}");
        if format != ImageFormat::Qcow {
            assert!(err.message().contains(&format!("is not a {format} image")), "{err}");
        }
    }
}

/// Flips bytes of real headers one at a time: every outcome is fine except
/// a panic.
#[test]
fn mutated_headers_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "base.qcow2", "qcow2", &[], Some("1M"));
    let images = [
        (create(d, "top.qcow2", "qcow2", &["-b", "base.qcow2", "-F", "qcow2"], None), 0..1024u64),
        (create(d, "top.qed", "qed", &["-b", "base.qcow2", "-F", "qcow2"], None), 0..128),
        (create(d, "old.qcow", "qcow", &["-b", "base.qcow2", "-F", "qcow2"], None), 0..128),
        (create(d, "base.vmdk", "vmdk", &[], Some("1M")), 0..128),
        (create(d, "child.vmdk", "vmdk", &["-b", "base.vmdk", "-F", "vmdk"], None), 0x200..0x400),
        (create(d, "stream.vmdk", "vmdk", &["-o", "subformat=streamOptimized"], Some("1M")), 0..96),
        (create(d, "disk.vdi", "vdi", &[], Some("1M")), 0..512),
        (create(d, "disk.vhd", "vpc", &[], Some("1M")), 0..512),
        (create(d, "disk.vhdx", "vhdx", &[], Some("1M")), 0..64),
        (create(d, "disk.hdd", "parallels", &[], Some("1M")), 0..64),
    ];
    let vhdx = d.join("disk.vhdx");
    let metadata = vhdx_metadata_offset(&vhdx);
    make_vhdx_differencing(&vhdx, &[("relative_path", "base.vhdx")]);
    let mut targets: Vec<(PathBuf, std::ops::Range<u64>)> = images.into_iter().collect();
    targets.push((vhdx.clone(), metadata..metadata + 256));
    targets.push((vhdx.clone(), metadata + 512 * 1024..metadata + 512 * 1024 + 64));
    let descriptor = d.join("flat.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", path_str(&descriptor), "1M"]);
    let descriptor_len = fs::metadata(&descriptor).unwrap().len();
    targets.push((descriptor, 0..descriptor_len));

    for (path, range) in targets {
        let format = detect_format(&path).unwrap();
        for offset in range {
            let original = read_at(&path, offset, 1);
            for value in [0x00, 0xff, 0x80, 0x22, 0x0a] {
                patch(&path, offset, &[value]);
                let _ = probe(&path);
                let _ = read_header(&path, format);
            }
            patch(&path, offset, &original);
        }
    }
}

/// Pseudo-random garbage after each known magic, at many lengths.
#[test]
fn random_garbage_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("garbage.img");
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let magics: [&[u8]; 10] = [
        b"QFI\xfb\0\0\0\x03",
        b"QFI\xfb\0\0\0\x02",
        b"QFI\xfb\0\0\0\x01",
        b"QED\0",
        b"KDMV",
        b"COWD",
        b"vhdxfile",
        b"conectix",
        b"LUKS\xba\xbe",
        b"# Disk DescriptorFile\nversion=1\ncreateType=\"vmfs\"\nRW ",
    ];
    for round in 0..400 {
        let magic = magics[round % magics.len()];
        let len = [16usize, 64, 200, 600, 5000, 70_000][round % 6];
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let head = magic.len().min(bytes.len());
        bytes[..head].copy_from_slice(&magic[..head]);
        fs::write(&file, &bytes).unwrap();
        let _ = probe(&file);
        for format in ImageFormat::ALL {
            let _ = read_header(&file, format);
        }
    }
}

// ----------------------------------------------------------------- names

#[test]
fn format_names_round_trip() {
    for format in ImageFormat::ALL {
        assert_eq!(format.as_str().parse::<ImageFormat>().unwrap(), format);
        assert_eq!(format.to_string(), format.as_str());
        assert_eq!(serde_json::to_string(&format).unwrap(), format!("\"{format}\""));
    }
    assert_eq!("vhd".parse::<ImageFormat>().unwrap(), ImageFormat::Vpc);
    let err = "qcow3".parse::<ImageFormat>().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArg);
    assert!(err.message().contains("'qcow3'") && err.message().contains("qcow2, qcow, qed"), "{err}");
    let backing: Vec<ImageFormat> = ImageFormat::ALL.into_iter().filter(|f| f.supports_backing()).collect();
    assert_eq!(backing, [ImageFormat::Qcow2, ImageFormat::Qcow, ImageFormat::Qed, ImageFormat::Vmdk]);
}

/// The native overlay is the file `qemu-img create -f qcow2 -u -b B -F FMT`
/// writes, byte for byte, for empty, odd, small, multi-L2 and multi-cluster
/// L1 sizes, on qcow2 and raw backings; `qemu-img check` finds it clean and
/// the prober reads back what was written.
#[test]
fn native_qcow2_overlay_matches_qemu_img_create() {
    let dir = tempfile::tempdir().unwrap();
    let base = create(dir.path(), "base.qcow2", "qcow2", &[], Some("8M"));
    let raw = create(dir.path(), "base.raw", "raw", &[], Some("1M"));
    let cases = [
        (&base, ImageFormat::Qcow2, 0u64, "0"),
        (&base, ImageFormat::Qcow2, 1000, "1000"),
        (&base, ImageFormat::Qcow2, 8 << 20, "8M"),
        (&raw, ImageFormat::Raw, 1 << 30, "1G"),
        (&base, ImageFormat::Qcow2, 300 << 40, "300T"),
    ];
    for (backing, format, size, size_arg) in cases {
        let native = dir.path().join(format!("native-{size_arg}.qcow2"));
        let tool = dir.path().join(format!("tool-{size_arg}.qcow2"));
        create_qcow2_overlay(&native, path_str(backing), format, size).unwrap();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            path_str(backing),
            "-F",
            format.as_str(),
            path_str(&tool),
            size_arg,
        ]);
        assert!(fs::read(&native).unwrap() == fs::read(&tool).unwrap(), "{size_arg}: the overlays differ");
        qemu_img(&["check", "-q", path_str(&native)]);
        let header = read_header(&native, ImageFormat::Qcow2).unwrap();
        assert_eq!(header.virtual_size, size.next_multiple_of(512));
        assert_eq!(header.backing_file.as_deref(), Some(path_str(backing)));
        assert_eq!(header.backing_format.as_deref(), Some(format.as_str()));
    }
}

/// Creating an overlay over an existing file replaces it, as `qemu-img
/// create` does.
#[test]
fn native_qcow2_overlay_replaces_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = create(dir.path(), "base.qcow2", "qcow2", &[], Some("8M"));
    let overlay = dir.path().join("top.qcow2");
    fs::write(&overlay, vec![0xa5u8; 1 << 20]).unwrap();
    create_qcow2_overlay(&overlay, path_str(&base), ImageFormat::Qcow2, 8 << 20).unwrap();
    qemu_img(&["check", "-q", path_str(&overlay)]);
    assert_eq!(fs::metadata(&overlay).unwrap().len(), 3 * 65536 + 8);
}

#[test]
fn native_qcow2_overlay_refuses_what_qcow2_cannot_hold() {
    let dir = tempfile::tempdir().unwrap();
    let overlay = dir.path().join("top.qcow2");
    let long = "b".repeat(1024);
    let err = create_qcow2_overlay(&overlay, &long, ImageFormat::Raw, 1 << 20).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArg);
    assert!(err.to_string().contains("backing file name must be 1 to 1023 bytes long, not 1024"), "{err}");
    let err = create_qcow2_overlay(&overlay, "base", ImageFormat::Raw, 1 << 62).unwrap_err();
    assert!(err.to_string().contains("larger than qcow2 allows"), "{err}");
    let err = create_qcow2_overlay(&overlay, "base", ImageFormat::Raw, u64::MAX).unwrap_err();
    assert!(err.to_string().contains("larger than qcow2 allows"), "{err}");
    assert!(!overlay.exists(), "a refused overlay leaves no file");
}
