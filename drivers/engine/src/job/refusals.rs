//! What a block job refuses before it changes anything: a second job on a
//! disk, a commit into or a `--delete` of an image a snapshot needs, a copy
//! onto a file that exists or is in use.

use std::path::{Path, PathBuf};

use strata_core::chain::Chain;
use strata_core::store::Store;
use strata_core::{Error, ErrorKind, Result};

use super::record::JobRecord;

/// Refuses a second job on a disk.
pub fn ensure_idle(jobs: &[JobRecord], disk: &str) -> Result<()> {
    if jobs.iter().any(|j| j.disk == disk) {
        return Err(Error::new(ErrorKind::BlockCopyActive, format!("disk '{disk}' already in active block job")));
    }
    Ok(())
}

/// Refuses a commit into an image a snapshot froze, unless asked. The
/// commit writes into `base` what reads through `top`: a snapshot that
/// reads through `top` too reads the same afterwards, any other one that
/// froze `base` does not. After an active commit the guest writes into
/// `base`, which changes every snapshot that froze it.
pub fn refuse_changing_snapshots(
    store: &Store,
    name: &str,
    chain: &Chain,
    top: usize,
    base: usize,
    active: bool,
) -> Result<()> {
    let Some(base_image) = chain.layers[base].source.local_path() else { return Ok(()) };
    let top_image = chain.layers[top].source.local_path();
    let changed: Vec<_> = crate::graph::frozen_images(store, name)?
        .into_iter()
        .filter(|(_, images)| active || top_image.is_none_or(|t| !images.contains(t)))
        .collect();
    match crate::graph::frozen_by(&changed, base_image) {
        Some(snapshots) => Err(Error::operation_invalid(format!(
            "cannot commit into {}: {snapshots} froze it (the data saved there would change); commit with --allow-snapshot-change to change it anyway, or delete {snapshots} first",
            base_image.display()
        ))),
        None => Ok(()),
    }
}

/// Refuses a `--delete` of an image a snapshot's saved definition reads:
/// deleting it would make the snapshot unusable.
pub fn refuse_deleting_snapshot_images(store: &Store, name: &str, delete: &[PathBuf]) -> Result<()> {
    if delete.is_empty() {
        return Ok(());
    }
    let snapshot_images = crate::graph::snapshot_images(store, name)?;
    if let Some((path, snap)) = delete.iter().find_map(|p| snapshot_images.get(p).map(|s| (p, s))) {
        return Err(Error::operation_invalid(format!(
            "--delete would remove {}, which snapshot '{snap}' uses; commit without --delete, or delete the snapshot first",
            path.display()
        )));
    }
    Ok(())
}

/// What a copy's destination is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyDestination {
    pub exists: bool,
    pub is_block: bool,
}

/// Checks a copy's destination against `--reuse-external`: a new file
/// must not exist yet (a block device always may), a reused one must, and
/// an existing one must be no image the domain (`live_chain`) or one of
/// its snapshots reads.
pub fn check_copy_destination(
    store: &Store,
    name: &str,
    disk: &str,
    dest: &Path,
    reuse_external: bool,
    live_chain: &Chain,
) -> Result<CopyDestination> {
    let exists = dest.exists();
    let is_block = std::fs::metadata(dest).map(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_block_device()
    });
    let is_block = is_block.unwrap_or(false);
    if exists && !reuse_external && !is_block {
        return Err(Error::config_unsupported(format!(
            "external destination file for disk {disk} already exists and is not a block device: {}",
            dest.display()
        )));
    }
    if !exists && reuse_external {
        return Err(Error::operation_failed(format!(
            "missing destination file for disk {disk}: {}: No such file or directory",
            dest.display()
        )));
    }
    if exists {
        // The copy would write into an image the guest or a snapshot reads.
        let mut taken = crate::graph::images_read_by(store, name, &crate::definitions::load(store, name)?)?;
        taken.extend(live_chain.layers.iter().filter_map(|l| l.source.local_path().map(Path::to_path_buf)));
        if taken.contains(dest) {
            return Err(Error::config_unsupported(format!(
                "destination for disk {disk} is an image the domain or one of its snapshots uses: {}",
                dest.display()
            )));
        }
    }
    Ok(CopyDestination { exists, is_block })
}
