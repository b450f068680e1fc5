//! The image dependency graph of a domain: which local images its
//! definition and its snapshots' saved definitions read, and which images
//! each snapshot froze.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use strata_core::store::Store;
use strata_core::xml::Domain;
use strata_core::Result;

use crate::records::all;

/// Every local image in the chains of `dom`'s disks and image-holding
/// filesystems.
pub fn images_in_use(dom: &Domain) -> Result<HashSet<PathBuf>> {
    let mut in_use = HashSet::new();
    for device in dom.storage_devices()? {
        if let Some(c) = device.chain() {
            in_use.extend(c.layers.iter().filter_map(|l| l.source.local_path().map(Path::to_path_buf)));
        }
    }
    Ok(in_use)
}

/// Every local image that `current` (the domain's definition) or a saved
/// definition of one of its snapshots reads.
pub fn images_read_by(store: &Store, domain: &str, current: &Domain) -> Result<HashSet<PathBuf>> {
    let mut taken = images_in_use(current)?;
    taken.extend(snapshot_images(store, domain)?.into_keys());
    Ok(taken)
}

/// Every local image a saved definition of a snapshot reads, with the
/// name of one snapshot that reads it.
pub fn snapshot_images(store: &Store, domain: &str) -> Result<HashMap<PathBuf, String>> {
    let mut images = HashMap::new();
    for def in all(store, domain)? {
        if let (Some(el), Some(name)) = (def.domain, def.name) {
            for image in images_in_use(&Domain::from_element(el)?)? {
                images.entry(image).or_insert_with(|| name.clone());
            }
        }
    }
    Ok(images)
}

/// What each snapshot froze, by snapshot name: the local images its saved
/// definition reads and needs unchanged for a revert to give what it
/// holds. An external disk snapshot froze the disk's whole chain; an
/// internal one keeps the top image's data inside that image, so it froze
/// the images below; a disk the snapshot left out froze nothing.
pub fn frozen_images(store: &Store, domain: &str) -> Result<Vec<(String, HashSet<PathBuf>)>> {
    let mut frozen = Vec::new();
    for def in all(store, domain)? {
        let (Some(el), Some(name)) = (def.domain, def.name) else { continue };
        let saved = Domain::from_element(el)?;
        let mut images = HashSet::new();
        for d in &def.disks {
            let from_layer = match d.snapshot.as_deref() {
                Some("external") => 0,
                Some("internal") => 1,
                _ => continue,
            };
            if let Some(chain) = saved.find_storage_device(&d.name).ok().and_then(|device| device.chain().cloned()) {
                images.extend(
                    chain.layers.iter().skip(from_layer).filter_map(|l| l.source.local_path().map(Path::to_path_buf)),
                );
            }
        }
        frozen.push((name, images));
    }
    Ok(frozen)
}

/// The snapshots of [`frozen_images`] that froze `image`, named for a
/// message ("snapshot 's1'", "snapshots 's1', 's2'"); `None` when none did.
pub fn frozen_by(frozen: &[(String, HashSet<PathBuf>)], image: &Path) -> Option<String> {
    let names: Vec<String> =
        frozen.iter().filter(|(_, images)| images.contains(image)).map(|(name, _)| format!("'{name}'")).collect();
    match names.len() {
        0 => None,
        1 => Some(format!("snapshot {}", names[0])),
        _ => Some(format!("snapshots {}", names.join(", "))),
    }
}
