//! Offline image work, whatever runs the domain: the images are files.
//! A new overlay's header is written natively; `qemu-img` is the neutral
//! tool that writes other headers and data while no hypervisor has them
//! open. Each `qemu-img` run goes through core's tool runner
//! (`strata_core::tool`), so it dies with this process and, given the
//! operation lock, holds that lock until it has exited. The async functions run `qemu-img` on the blocking pool (see
//! [`crate::blocking`]), handing it a copy of the operation lock's
//! descriptor: the lock belongs to the open file, so the copy holds it too.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use strata_core::chain::{probe_chain, StorageSource};
use strata_core::store::DomainLock;
use strata_core::{Error, Result};

use crate::blocking::blocking;

/// The image tool, run as a short-lived helper: `$STRATA_QEMU_IMG` or
/// `qemu-img` on `PATH`.
pub fn qemu_img_binary() -> String {
    std::env::var("STRATA_QEMU_IMG").unwrap_or_else(|_| "qemu-img".to_string())
}

/// The operation lock as a task on the blocking pool can own it.
pub fn held(operation: &DomainLock) -> Result<OwnedFd> {
    operation
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::operation_failed(format!("cannot hand the operation lock to a helper: {e}")))
}

/// Runs `qemu-img ARGS…` as a helper that holds the operation lock until
/// it has exited (see [`strata_core::tool::run_tool_output`]).
pub async fn run(operation: &DomainLock, args: &[&str]) -> Result<()> {
    let lock = held(operation)?;
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    blocking(move || run_holding(Some(lock.as_fd()), &args.iter().map(String::as_str).collect::<Vec<_>>())).await
}

/// Points each of `images` at `onto` without copying data (`qemu-img
/// rebase -u`): for images whose backing's data is now in `onto`. An image
/// already on `onto` is left alone, so a resumed delete can run it again.
pub async fn rebase_unsafe(operation: &DomainLock, images: &[&PathBuf], onto: &Path) -> Result<()> {
    let lock = held(operation)?;
    let (images, onto): (Vec<PathBuf>, PathBuf) = (images.iter().map(|i| i.to_path_buf()).collect(), onto.into());
    blocking(move || {
        for image in &images {
            if backing_of(image)?.as_deref() == Some(onto.as_path()) {
                continue;
            }
            let format = image_format(&onto)?;
            let args = ["rebase", "-u", "-b", path_str(&onto)?, "-F", &format, "-f", "qcow2", path_str(image)?];
            run_holding(Some(lock.as_fd()), &args)?;
        }
        Ok(())
    })
    .await
}

/// `qemu-img ARGS…` that dies with this process, holding `operation` if given.
pub fn run_holding(operation: Option<BorrowedFd<'_>>, args: &[&str]) -> Result<()> {
    let tool = qemu_img_binary();
    let out = strata_core::tool::run_tool_output(&tool, args, operation)?;
    if !out.status.success() {
        return Err(Error::operation_failed(format!(
            "{tool} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

pub fn path_str(p: &Path) -> Result<&str> {
    p.to_str().ok_or_else(|| Error::invalid_arg(format!("path '{}' is not UTF-8", p.display())))
}

/// The format of an image Strata created or recorded (probe only used for
/// images whose format Strata wrote itself: overlays are qcow2).
pub fn image_format(p: &Path) -> Result<String> {
    Ok(strata_core::image::detect_format(p)?.as_str().to_string())
}

/// The backing image named in `image`'s header, as a local path.
pub fn backing_of(image: &Path) -> Result<Option<PathBuf>> {
    let chain = probe_chain(&StorageSource::local(image.to_path_buf()), &image_format(image)?)?;
    Ok(chain.main_line().get(1).and_then(|l| l.source.local_path()).map(Path::to_path_buf))
}

pub fn image_size(p: &Path, fmt: &str) -> Result<u64> {
    let f: strata_core::image::ImageFormat = fmt.parse()?;
    Ok(strata_core::image::read_header(p, f)?.virtual_size)
}

/// Whether the image at `p` holds an internal snapshot named `snap`.
pub async fn has_internal(operation: &DomainLock, p: &Path, snap: &str) -> bool {
    let (Ok(lock), Some(path)) = (held(operation), p.to_str()) else { return false };
    let (path, snap) = (path.to_string(), snap.to_string());
    blocking(move || {
        strata_core::tool::run_tool_output(&qemu_img_binary(), &["snapshot", "-U", "-l", &path], Some(lock.as_fd()))
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.split_whitespace().nth(1) == Some(&*snap)))
    })
    .await
    .unwrap_or(false)
}

/// Creates a qcow2 overlay on `image` whose header names `image` and its
/// `format`, so that the overlay reads the same without Strata, and syncs
/// it before returning.
///
/// The header is written natively (`strata_core::image::create_qcow2_overlay`)
/// with the size read from `image`'s own header: `qemu-img create` opens
/// every layer of the chain below (even with `-u` it starts a process that
/// maps the block layer), and an offline snapshot of a 5,000-deep chain
/// took minutes. The chain was already probed and checked by Strata.
pub fn create_overlay(image: &Path, format: &str, overlay: &Path) -> Result<()> {
    write_overlay(image, format, overlay)?.sync()
}

/// [`create_overlay`] without the sync, which is the caller's (see
/// [`strata_core::image::write_qcow2_overlay`]).
pub fn write_overlay(image: &Path, format: &str, overlay: &Path) -> Result<strata_core::image::UnsyncedOverlay> {
    let backing_format: strata_core::image::ImageFormat = format.parse()?;
    let size = image_size(image, format)?;
    strata_core::image::write_qcow2_overlay(overlay, path_str(image)?, backing_format, size)
}
