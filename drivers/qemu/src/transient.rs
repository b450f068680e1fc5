//! `<transient/>` disks, with libvirt's semantics: at start each gets a
//! throwaway qcow2 overlay in the domain's runtime directory (its header
//! names the disk's image and format), QEMU opens the image itself
//! read-only and the guest writes only into the overlay. The overlay goes
//! with the runtime directory when the domain stops, is destroyed or is
//! found dead. Definitions, live or persistent, show the disk as defined.
//!
//! Nothing that would keep, merge or copy the guest's writes applies to
//! such a disk, so snapshots covering it, block jobs on it and disk sets
//! holding it are refused. `shareBacking='yes'` (libvirt 7.4) asks that
//! several domains may run on one image at once; opening the image
//! read-only always allows that here, so both forms behave alike.

use std::path::PathBuf;

use strata_core::xml::Domain;
use strata_core::{Error, Result};

use strata_qemu_block::runtime::RuntimePaths;

/// Creates each transient disk's overlay in the runtime directory, before
/// QEMU opens it; on failure removes the overlays already made.
pub(crate) fn create_overlays(dom: &Domain, paths: &RuntimePaths) -> Result<()> {
    let mut made: Vec<PathBuf> = Vec::new();
    let result = (|| {
        for disk in dom.disks()?.iter().filter(|d| d.transient) {
            strata_engine::definitions::check_transient_disk(disk)?;
            let top = disk.chain.as_ref().and_then(|c| c.top());
            let (Some(image), format) = (top.and_then(|l| l.source.local_path()), top.and_then(|l| l.format.clone()))
            else {
                return Err(Error::internal(format!("transient disk '{}' has no image", disk.target)));
            };
            let overlay = paths.transient_overlay(&disk.target);
            strata_engine::image_work::create_overlay(image, format.as_deref().unwrap_or("raw"), &overlay)?;
            made.push(overlay);
        }
        Ok(())
    })();
    if result.is_err() {
        for f in &made {
            let _ = std::fs::remove_file(f);
        }
    }
    result
}
