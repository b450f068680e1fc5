//! Which layers of a disk's chain a job works on: `--base`/`--top` as
//! `disk[N]` or a path, checked against the chain the hypervisor has open.

use std::path::Path;

use strata_core::chain::{Backing, Chain};
use strata_core::driver::BlockJobKind;
use strata_core::image::{self, ImageFormat};
use strata_core::options::{BlockCommitOptions, BlockPullOptions};
use strata_core::{Error, Result};

/// Resolves `--base`/`--top`: `disk[N]` (layer N) or a path in the chain.
pub fn resolve_layer(disk: &str, chain: &Chain, spec: &str) -> Result<usize> {
    if let Some(rest) = spec.strip_suffix(']') {
        if let Some((name, n)) = rest.split_once('[') {
            if name != disk {
                return Err(Error::invalid_arg(format!("requested target '{name}' does not match target '{disk}'")));
            }
            let n: usize =
                n.parse().map_err(|_| Error::invalid_arg(format!("'{spec}' is not DISK[N] with a number N")))?;
            return chain.layers.iter().position(|l| l.index == n).ok_or_else(|| {
                Error::invalid_arg(format!(
                    "could not find backing store index '{n}' in chain for '{disk}' (it has layers 0 to {})",
                    chain.layers.len().saturating_sub(1)
                ))
            });
        }
    }
    let top_dir = chain
        .top()
        .and_then(|l| l.source.local_path())
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let wanted = strata_core::chain::clean_path(&top_dir.join(spec));
    chain
        .layers
        .iter()
        .position(|l| l.source.local_path() == Some(wanted.as_path()))
        .ok_or_else(|| Error::invalid_arg(format!("could not find image '{spec}' in chain for '{disk}'")))
}

/// Whether layer `lower` is somewhere below layer `upper` on its line.
fn below(chain: &Chain, upper: usize, lower: usize) -> bool {
    let mut cursor = chain.backing_of(upper).first().copied();
    let mut steps = 0;
    while let Some(c) = cursor {
        if c == lower {
            return true;
        }
        steps += 1;
        if steps > chain.layers.len() {
            return false;
        }
        cursor = chain.backing_of(c).first().copied();
    }
    false
}

/// The backing string to write into the image above `base`: its absolute
/// path, or with `keep_relative` the name the image above it recorded.
pub fn backing_string(chain: &Chain, base: usize, keep_relative: bool) -> Result<Option<String>> {
    let Some(base_layer) = chain.layers.get(base) else { return Ok(None) };
    let Some(base_path) = base_layer.source.local_path() else { return Ok(None) };
    if keep_relative {
        let above = chain.layers.iter().position(|l| matches!(&l.backing, Backing::Layers(v) if v.contains(&base)));
        if let Some(above) = above {
            if let Some(p) = chain.layers[above].source.local_path() {
                let fmt: ImageFormat = chain.layers[above].format.as_deref().unwrap_or("raw").parse()?;
                if let Some(written) = image::read_header(p, fmt)?.backing_file {
                    return Ok(Some(written));
                }
            }
        }
    }
    Ok(Some(base_path.to_string_lossy().into_owned()))
}

/// The layers of a pull: the one pulled into, and the base it stops at
/// (none: everything below `into` is pulled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullLayers {
    pub into: usize,
    pub base: Option<usize>,
}

pub fn pull_layers(disk: &str, chain: &Chain, opts: &BlockPullOptions) -> Result<PullLayers> {
    let into = match &opts.top {
        Some(t) => resolve_layer(disk, chain, t)?,
        None => 0,
    };
    let base = match &opts.base {
        Some(base) => {
            let b = resolve_layer(disk, chain, base)?;
            if !below(chain, into, b) {
                return Err(Error::invalid_arg(format!("could not find base image in chain for '{disk}'")));
            }
            Some(b)
        }
        None => None,
    };
    Ok(PullLayers { into, base })
}

/// The layers of a commit: `top` is merged down into `base`; `removed`
/// are the layers that leave the chain (`top` down to just above `base`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitLayers {
    pub top: usize,
    pub base: usize,
    pub removed: Vec<usize>,
    /// An active commit when `top` is the active layer.
    pub kind: BlockJobKind,
}

pub fn commit_layers(disk: &str, chain: &Chain, opts: &BlockCommitOptions) -> Result<CommitLayers> {
    let top = match &opts.top {
        Some(t) => resolve_layer(disk, chain, t)?,
        None => 0,
    };
    let below_top = chain.backing_of(top).first().copied();
    let base = match (&opts.base, opts.shallow) {
        (Some(b), _) => resolve_layer(disk, chain, b)?,
        (None, true) => {
            below_top.ok_or_else(|| Error::invalid_arg(format!("could not find base image in chain for '{disk}'")))?
        }
        (None, false) => {
            let line = chain.main_line();
            let last = line.last().map(|l| l.index).unwrap_or(0);
            chain.layers.iter().position(|l| l.index == last).unwrap_or(0)
        }
    };
    if below_top.is_none() {
        return Err(Error::invalid_arg(format!("could not find base image in chain for '{disk}'")));
    }
    // The base must be below the top on the top's own line.
    let mut cursor = below_top;
    let mut removed = vec![top];
    let mut found = false;
    while let Some(c) = cursor {
        if c == base {
            found = true;
            break;
        }
        removed.push(c);
        cursor = chain.backing_of(c).first().copied();
    }
    if !found {
        return Err(Error::invalid_arg(format!(
            "base '{}' is not below top '{}' in the chain of '{disk}'",
            opts.base.as_deref().unwrap_or("?"),
            opts.top.as_deref().unwrap_or(disk)
        )));
    }
    let active = top == 0;
    if active && !opts.active {
        return Err(Error::invalid_arg(format!("commit of '{disk}' active layer requires active flag")));
    }
    let kind = if active { BlockJobKind::ActiveCommit } else { BlockJobKind::Commit };
    Ok(CommitLayers { top, base, removed, kind })
}

impl CommitLayers {
    /// The files of the layers that leave the chain (what `--delete` removes).
    pub fn removed_files(&self, chain: &Chain) -> Vec<std::path::PathBuf> {
        self.removed.iter().filter_map(|i| chain.layers[*i].source.local_path().map(Path::to_path_buf)).collect()
    }
}
