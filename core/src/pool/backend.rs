//! What `dir` and `fs` pools do to the host, as libvirt's backends do:
//! `dir` is a directory; `fs` mounts its device's filesystem at the target
//! with mount(8), and its build can make that filesystem with mkfs(8).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use super::def::{PoolDef, PoolSizes, PoolType};
use crate::driver::PoolBuildFlags;
use crate::error::{Error, Result};
use crate::tool::run_tool;

/// The kernel's id of this boot of the host.
pub fn boot_id() -> Result<String> {
    let file = Path::new("/proc/sys/kernel/random/boot_id");
    std::fs::read_to_string(file).map(|s| s.trim().to_string()).map_err(|e| Error::io("read", file, e))
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().ok_or_else(|| Error::invalid_arg(format!("path '{}' is not valid UTF-8", p.display())))
}

/// Creates the target directory; for `fs` with a flag, the filesystem too.
pub fn build(def: &PoolDef, flags: PoolBuildFlags) -> Result<()> {
    if flags.overwrite && flags.no_overwrite {
        return Err(Error::invalid_arg("--overwrite and --no-overwrite are mutually exclusive"));
    }
    if def.pool_type == PoolType::Dir && (flags.overwrite || flags.no_overwrite) {
        return Err(Error::invalid_arg(format!(
            "storage pool '{}' of type dir has no device to format; build it without --overwrite or --no-overwrite",
            def.name
        )));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&def.target)
        .map_err(|e| Error::io("create the pool directory", &def.target, e))?;
    let Some(device) = def.device.as_deref().filter(|_| flags.overwrite || flags.no_overwrite) else {
        return Ok(());
    };
    if def.fs_format == "auto" {
        return Err(Error::invalid_arg(format!(
            "storage pool '{}' has source format 'auto'; give the filesystem to make (<format type='ext4'/>)",
            def.name
        )));
    }
    if flags.no_overwrite {
        if let Some(found) = filesystem_on(device)? {
            return Err(Error::operation_invalid(format!(
                "device '{}' already holds a {found} filesystem; build with --overwrite to replace it",
                device.display()
            )));
        }
    }
    run_tool(&format!("mkfs.{}", def.fs_format), &[path_str(device)?]).map(|_| ())
}

/// The filesystem type blkid finds on `device`, if any.
fn filesystem_on(device: &Path) -> Result<Option<String>> {
    let device_str = path_str(device)?;
    if !device.exists() {
        return Err(Error::io("open", device, std::io::Error::from_raw_os_error(libc::ENOENT)));
    }
    // blkid exits 2 when it finds nothing, which run_tool reports as a failure.
    match run_tool("blkid", &["-p", "-o", "value", "-s", "TYPE", device_str]) {
        Ok(out) => Ok(Some(out.trim().to_string()).filter(|t| !t.is_empty())),
        Err(_) => Ok(None),
    }
}

/// Makes the pool usable: its directory must exist; an `fs` pool's
/// filesystem is mounted there unless it already is.
pub fn start(def: &PoolDef) -> Result<()> {
    let meta = std::fs::metadata(&def.target).map_err(|e| Error::io("open directory", &def.target, e))?;
    if !meta.is_dir() {
        return Err(Error::operation_invalid(format!(
            "target '{}' of storage pool '{}' is not a directory",
            def.target.display(),
            def.name
        )));
    }
    let Some(device) = &def.device else { return Ok(()) };
    if def.pool_type != PoolType::Fs || is_mounted(&def.target)? {
        return Ok(());
    }
    if !device.exists() {
        return Err(Error::io("open the source device", device, std::io::Error::from_raw_os_error(libc::ENOENT)));
    }
    let mut args = Vec::new();
    if def.fs_format != "auto" {
        args.extend(["-t", def.fs_format.as_str()]);
    }
    args.extend([path_str(device)?, path_str(&def.target)?]);
    run_tool("mount", &args).map(|_| ())
}

/// Ends the pool's use: an `fs` pool's filesystem is unmounted.
pub fn stop(def: &PoolDef) -> Result<()> {
    if def.pool_type == PoolType::Fs && is_mounted(&def.target)? {
        run_tool("umount", &[path_str(&def.target)?])?;
    }
    Ok(())
}

/// Whether a filesystem is mounted at `target` (from /proc/self/mountinfo).
pub fn is_mounted(target: &Path) -> Result<bool> {
    let file = Path::new("/proc/self/mountinfo");
    let info = std::fs::read_to_string(file).map_err(|e| Error::io("read", file, e))?;
    let target = target.canonicalize().unwrap_or_else(|_| target.to_path_buf());
    Ok(info.lines().filter_map(|l| l.split(' ').nth(4)).any(|mount_point| unescape_mount(mount_point) == target))
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mount(field: &str) -> std::path::PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    std::path::PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// The filesystem's size, use and free space at `target`, as libvirt counts them.
pub fn sizes(target: &Path) -> Result<PoolSizes> {
    let c_path = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| Error::invalid_arg(format!("path '{}' contains a NUL byte", target.display())))?;
    // SAFETY: statvfs is all integers, for which zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a NUL-terminated string and st a valid statvfs to fill.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(Error::io("read the size of", target, std::io::Error::last_os_error()));
    }
    let frsize = st.f_frsize;
    Ok(PoolSizes {
        capacity: st.f_blocks.saturating_mul(frsize),
        allocation: st.f_blocks.saturating_sub(st.f_bfree).saturating_mul(frsize),
        available: st.f_bavail.saturating_mul(frsize),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_with_spaces_are_read_back() {
        assert_eq!(unescape_mount("/mnt/a\\040b"), Path::new("/mnt/a b"));
        assert_eq!(unescape_mount("/"), Path::new("/"));
        assert!(is_mounted(Path::new("/proc")).expect("mountinfo"));
    }
}
