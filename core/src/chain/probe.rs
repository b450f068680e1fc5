//! Following a disk's backing chain through its image headers, safely.
//!
//! The policy (seed 000): a format given by the caller is trusted and the
//! top image is never probed; a backing format recorded in a header is used;
//! when a header names a backing file without its format, the backing image
//! may be probed only if the probe finds it has no backing file of its own,
//! since a raw disk whose guest wrote a fake header would otherwise expose
//! any host file to the guest. A raw image is never read as anything else.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{Chain, StorageSource};
use crate::error::{Error, ErrorKind, Result};
use crate::image::{self, ImageFormat};

/// Builds the chain below `top`, whose format the caller vouches for.
///
/// Cost is one `stat` and a few small header reads per layer, with no
/// recursion, so very deep chains are fine.
pub fn probe_chain(top: &StorageSource, top_format: &str) -> Result<Chain> {
    probe(top, top_format, false).map(|(chain, _)| chain)
}

/// A local backing file that a header names and that does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingBacking {
    /// The image whose header names it.
    pub image: PathBuf,
    pub backing: PathBuf,
}

/// Like [`probe_chain`], except that a local backing file that does not
/// exist ends the probe: it is recorded as a layer whose own backing is not
/// known, and returned, so a definition can keep the chain as far as it
/// goes.
pub fn probe_chain_to_missing(top: &StorageSource, top_format: &str) -> Result<(Chain, Option<MissingBacking>)> {
    probe(top, top_format, true)
}

fn probe(top: &StorageSource, top_format: &str, stop_at_missing: bool) -> Result<(Chain, Option<MissingBacking>)> {
    let mut chain = Chain::single(top.clone(), Some(top_format.to_string()));
    let Some(top_path) = top.local_path() else {
        // A network top cannot be opened here; its chain stays unknown.
        return Ok((chain, None));
    };
    if matches!(top, StorageSource::Dir { .. }) {
        // A directory (QEMU's virtual FAT disk) has no backing image.
        chain.end_at(0);
        return Ok((chain, None));
    }
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    seen.insert(identity(top_path)?);

    let mut current = 0usize;
    let mut current_path = top_path.to_path_buf();
    let mut current_format: ImageFormat =
        top_format.parse().map_err(|e: Error| e.context(format!("disk '{}'", top_path.display())))?;
    let mut missing = None;
    loop {
        if current_format == ImageFormat::Raw {
            chain.end_at(current);
            break;
        }
        let header = image::read_header(&current_path, current_format)?;
        let Some(backing_string) = header.backing_file.clone() else {
            if header.differencing {
                return Err(Error::probe_failed(format!(
                    "image '{}' is a differencing {} image whose parent{} cannot be located from its header",
                    current_path.display(),
                    current_format,
                    header.parent_uuid.as_deref().map(|u| format!(" (UUID {u})")).unwrap_or_default()
                )));
            }
            chain.end_at(current);
            break;
        };
        let backing = super::parse_backing_string(&backing_string, &current_path)?;
        // The header's backing format wins over a json: string's, as in QEMU.
        let written_format = header.backing_format.clone().or(backing.format.clone());
        if backing.slice.is_some() && written_format.as_deref() != Some("raw") {
            return Err(Error::probe_failed(format!(
                "backing file '{backing_string}' of '{}' gives an offset or size, which only the raw format \
                 takes, but its format is recorded as '{}'",
                current_path.display(),
                written_format.as_deref().unwrap_or("none")
            )));
        }
        let local = backing.source.local_path().map(Path::to_path_buf);
        let Some(backing_path) = local.filter(|_| !matches!(backing.source, StorageSource::Dir { .. })) else {
            // A network image is recorded, not followed; a directory has
            // no backing image.
            let fat = matches!(backing.source, StorageSource::Dir { .. });
            let id = chain.push_backing(current, backing.source, written_format);
            chain.layers[id].slice = backing.slice;
            if fat {
                chain.end_at(id);
            }
            break;
        };
        // One stat says both whether the file is there and which file it is
        // (a probe of a deep chain is mostly these system calls).
        let found = std::fs::metadata(&backing_path);
        if stop_at_missing && matches!(&found, Err(e) if e.kind() == std::io::ErrorKind::NotFound) {
            let id = chain.push_backing(current, backing.source, written_format);
            chain.layers[id].slice = backing.slice;
            missing = Some(MissingBacking { image: current_path, backing: backing_path });
            break;
        }
        let id = found.map(|meta| (meta.dev(), meta.ino())).map_err(|e| {
            Error::new(
                ErrorKind::StorageProbeFailed,
                format!(
                    "backing file '{}' of '{}' cannot be used: {}",
                    backing_path.display(),
                    current_path.display(),
                    Error::io("open", &backing_path, e).detail()
                ),
            )
        })?;
        if !seen.insert(id) {
            return Err(Error::new(
                ErrorKind::BackingChainCycle,
                if backing_path == current_path {
                    format!("image '{}' names itself as its backing file", current_path.display())
                } else {
                    format!(
                        "backing chain loops: '{}' names '{}' as its backing file, which is already in the chain above it",
                        current_path.display(),
                        backing_path.display()
                    )
                },
            ));
        }
        let backing_format = match &written_format {
            Some(f) => f
                .parse::<ImageFormat>()
                .map_err(|e: Error| e.context(format!("backing format recorded in '{}'", current_path.display())))?,
            None => probe_unrecorded_format(&current_path, &backing_string, &backing_path)?,
        };
        current = chain.push_backing(current, backing.source, Some(backing_format.as_str().to_string()));
        chain.layers[current].slice = backing.slice;
        current_path = backing_path;
        current_format = backing_format;
    }
    chain.renumber();
    Ok((chain, missing))
}

/// `image` names `backing` (written as `written`) without a format. Probing
/// is safe only when what it finds cannot lead anywhere else.
fn probe_unrecorded_format(image: &Path, written: &str, backing: &Path) -> Result<ImageFormat> {
    let detected = image::detect_format(backing)?;
    if detected == ImageFormat::Raw {
        return Ok(ImageFormat::Raw);
    }
    let header = image::read_header(backing, detected)?;
    match header.backing_file {
        None => Ok(detected),
        Some(next) => Err(Error::probe_failed(format!(
            "image '{image}' names its backing file '{backing}' without a backing format, and \
             '{backing}' looks like a {fmt} image that has a backing file of its own ('{next}'). \
             QEMU would probe '{backing}' as {fmt} and also open '{next}'; if '{backing}' were really \
             a raw disk, a guest could have written that header to reach any host file, so Strata \
             refuses to guess. If '{backing}' is {fmt}, record the format with: \
             qemu-img rebase -u -F {fmt} -b {written} {image}",
            image = image.display(),
            backing = backing.display(),
            fmt = detected,
        ))),
    }
}

fn identity(path: &Path) -> Result<(u64, u64)> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io("open", path, e))?;
    Ok((meta.dev(), meta.ino()))
}
